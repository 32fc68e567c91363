//! One vCPU's saved state: general and special registers, XSAVE (FPU/SSE/AVX) and XCRs,
//! pending events, the multiprocessing state, debug registers, the local APIC (in-kernel
//! irqchip) and every MSR KVM lists that the vCPU can read.

use super::SnapshotError;
use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// Most MSRs one saved vCPU may hold (KVM lists a few hundred).
pub const MAX_MSRS: usize = 4096;

/// Everything KVM keeps for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u8,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE, AVX state (legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Pending exceptions, interrupts, NMIs, SMM.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// DR0-3, DR6, DR7.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers (with the in-kernel irqchip).
    pub lapic: Option<kvm_lapic_state>,
    /// (index, value) of every readable MSR.
    pub msrs: Vec<(u32, u64)>,
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |e| SnapshotError::Kvm(what, e.errno())
}

/// The MSRs worth saving: every one KVM lists.
pub fn msr_list(kvm_fd: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    let list = kvm_fd
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list.as_slice().to_vec())
}

fn read_msrs(fd: &VcpuFd, indexes: &[u32]) -> Result<Vec<(u32, u64)>, SnapshotError> {
    let entries: Vec<kvm_msr_entry> = indexes
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut out = Vec::with_capacity(indexes.len());
    // KVM stops at the first MSR it cannot read: read on from the one after it.
    let mut at = 0;
    while at < entries.len() {
        let mut msrs = Msrs::from_entries(&entries[at..])
            .map_err(|_| SnapshotError::Invalid("MSR list too long".into()))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        at += n + 1;
    }
    Ok(out)
}

impl VcpuState {
    /// Read vCPU `id`'s state (the vCPU must not be running); `msrs` from [`msr_list`].
    pub fn save(id: u8, fd: &VcpuFd, msrs: &[u32], irqchip: bool) -> Result<Self, SnapshotError> {
        Ok(VcpuState {
            id,
            // The MP state first: KVM completes pending APIC events into it.
            mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            debugregs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            lapic: if irqchip {
                Some(fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?)
            } else {
                None
            },
            msrs: read_msrs(fd, msrs)?,
        })
    }

    /// Load the state into a vCPU created (with its CPUID) like the saved one. KVM checks
    /// every value (reserved bits, canonical addresses, consistent modes) and refuses with
    /// EINVAL what the hardware could not hold: a hostile snapshot gets an error here.
    pub fn restore(&self, fd: &VcpuFd, irqchip: bool) -> Result<(), SnapshotError> {
        if self.msrs.len() > MAX_MSRS {
            return Err(SnapshotError::Invalid(format!(
                "vCPU {}: {} MSRs (at most {MAX_MSRS})",
                self.id,
                self.msrs.len()
            )));
        }
        if self.lapic.is_some() != irqchip {
            return Err(SnapshotError::Mismatch(format!(
                "vCPU {}: saved {} an in-kernel irqchip",
                self.id,
                if irqchip { "without" } else { "with" }
            )));
        }
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        // SAFETY: KVM_SET_XSAVE copies the guest FPU's uABI size, which is at most the 4 KiB of
        // `kvm_xsave` since this VMM never asks for dynamic XSTATE features (AMX) and so never
        // uses KVM_GET_XSAVE2's larger area; `self.xsave` is a whole, initialised `kvm_xsave`.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        if let Some(l) = &self.lapic {
            fd.set_lapic(l).map_err(kvm("KVM_SET_LAPIC"))?;
        }
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|_| SnapshotError::Invalid("MSR list too long".into()))?;
        let n = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if n != entries.len() {
            return Err(SnapshotError::Invalid(format!(
                "vCPU {}: KVM refused MSR {:#x} ({n} of {} set)",
                self.id,
                entries[n].index,
                entries.len()
            )));
        }
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        Ok(())
    }
}
