//! The local APIC's interrupt request register, read back by the host-KVM tests that deliver
//! MSIs (`#[path]`-included: not a test target of its own).

use std::time::{Duration, Instant};

use vmm::vcpu::Vcpu;

/// Is `vector` pending in `vcpu`'s LAPIC IRR?
pub fn irr_has(vcpu: &Vcpu, vector: u8) -> bool {
    let lapic = vcpu.fd.get_lapic().unwrap();
    let off = 0x200 + usize::from(vector / 32) * 0x10;
    let word = u32::from_le_bytes([
        lapic.regs[off] as u8,
        lapic.regs[off + 1] as u8,
        lapic.regs[off + 2] as u8,
        lapic.regs[off + 3] as u8,
    ]);
    word & (1 << (vector % 32)) != 0
}

/// Wait up to 2 s for `vector` to become pending.
pub fn wait_irr(vcpu: &Vcpu, vector: u8) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        if irr_has(vcpu, vector) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}
