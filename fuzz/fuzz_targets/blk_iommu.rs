//! libFuzzer entry point; the harness is `vmm_fuzz::blk_iommu`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::blk_iommu::run(data));
