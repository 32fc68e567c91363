//! libFuzzer entry point; the harness is `vmm_fuzz::virtio_net`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::virtio_net::run(data));
