//! libFuzzer entry point; the harness is `vmm_fuzz::shadow`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::shadow::run(data));
