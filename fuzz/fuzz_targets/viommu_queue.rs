//! libFuzzer entry point; the harness is `vmm_fuzz::viommu_queue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::viommu_queue::run(data));
