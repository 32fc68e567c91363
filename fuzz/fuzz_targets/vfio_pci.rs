//! libFuzzer entry point; the harness is `vmm_fuzz::vfio_pci`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::vfio_pci::run(data));
