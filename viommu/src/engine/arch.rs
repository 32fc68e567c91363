//! Platform constants the engine needs (x86).

/// First byte of the x86 MSI doorbell window (interrupt messages, never DMA to memory).
pub const X86_MSI_START: u64 = 0xfee0_0000;
/// Last byte of the x86 MSI window.
pub const X86_MSI_END: u64 = 0xfeef_ffff;
