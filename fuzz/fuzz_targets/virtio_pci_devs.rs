//! libFuzzer entry point; the harness is `vmm_fuzz::virtio_pci_devs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::virtio_pci_devs::run(data));
