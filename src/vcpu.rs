//! One virtual CPU: CPUID, MSRs and registers for the 64-bit Linux boot protocol, and the run
//! loop that dispatches exits to the buses until the VM stops.

use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT,
    KVM_PIO_PAGE_OFFSET, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::boot::{
    BootInfo, BOOT_GDT, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PML4_START,
};
use crate::bus::Buses;
use crate::lifecycle::{ExitReason, VmControl};
use crate::watchdog::{ExitKind, VcpuProbe};

/// vCPU setup errors.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {0}: {1} failed")]
    Kvm(u8, &'static str, #[source] kvm_ioctls::Error),
    /// Not every MSR was accepted.
    #[error("vCPU {0}: KVM accepted {1} of {2} MSRs")]
    Msrs(u8, usize, usize),
}

/// A vCPU with the buses its exits go to.
pub struct Vcpu {
    /// vCPU index (also its APIC ID).
    pub id: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    buses: Arc<Buses>,
    control: Arc<VmControl>,
    probe: Arc<VcpuProbe>,
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// Where KVM leaves the data of a port I/O exit in the vCPU mapping: the page after the
/// kvm_run structure (KVM_PIO_PAGE_OFFSET), whole elements only.
const PIO_DATA: std::ops::Range<usize> =
    KVM_PIO_PAGE_OFFSET as usize * 4096..(KVM_PIO_PAGE_OFFSET as usize + 1) * 4096;
const _: () = assert!(std::mem::size_of::<kvm_bindings::kvm_run>() <= PIO_DATA.start);

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Apply the per-vCPU CPUID fixups to KVM's supported CPUID: APIC ID (leaf 1, 0xB, 0x1F),
/// logical processor count, the hypervisor bit.
pub fn fixup_cpuid(cpuid: &mut CpuId, id: u8, cpus: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(cpus) << 16) | (u32::from(id) << 24);
                e.ecx |= 1 << 31; // hypervisor
                if cpus > 1 {
                    e.edx |= 1 << 28; // HTT: the count in EBX[23:16] is valid
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
}

/// Build a KVM segment from a GDT descriptor at `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let type_ = ((entry >> 40) & 0xf) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

impl Vcpu {
    /// Wrap a KVM vCPU.
    pub fn new(id: u8, fd: VcpuFd, buses: Arc<Buses>, control: Arc<VmControl>) -> Vcpu {
        Vcpu {
            id,
            fd,
            buses,
            control,
            probe: Arc::new(VcpuProbe::new()),
        }
    }

    /// The state this vCPU publishes on every exit, for the hang watchdog.
    pub fn probe(&self) -> Arc<VcpuProbe> {
        self.probe.clone()
    }

    fn kvm<T>(&self, what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
        r.map_err(|e| VcpuError::Kvm(self.id, what, e))
    }

    /// Set CPUID from KVM's supported list with the per-vCPU fixups.
    pub fn configure_cpuid(&self, supported: &CpuId, cpus: u8) -> Result<(), VcpuError> {
        let mut cpuid = supported.clone();
        fixup_cpuid(&mut cpuid, self.id, cpus);
        self.kvm("KVM_SET_CPUID2", self.fd.set_cpuid2(&cpuid))
    }

    /// Boot MSRs (syscall MSRs cleared, fast strings on, MTRRs default write-back).
    pub fn configure_msrs(&self) -> Result<(), VcpuError> {
        let entries: Vec<kvm_msr_entry> = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, 1),
            (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
        ]
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs(self.id, 0, 0))?;
        let n = self.kvm("KVM_SET_MSRS", self.fd.set_msrs(&msrs))?;
        if n != entries.len() {
            return Err(VcpuError::Msrs(self.id, n, entries.len()));
        }
        Ok(())
    }

    /// LINT0 as ExtINT (the PIC) and LINT1 as NMI, like a BIOS leaves them.
    pub fn configure_lapic(&self) -> Result<(), VcpuError> {
        let mut lapic = self.kvm("KVM_GET_LAPIC", self.fd.get_lapic())?;
        for (off, mode) in [(0x350usize, 7u32), (0x360, 4)] {
            let mut b = [0u8; 4];
            for (i, x) in b.iter_mut().enumerate() {
                *x = lapic.regs[off + i] as u8;
            }
            let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
            for (i, x) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[off + i] = *x as _;
            }
        }
        self.kvm("KVM_SET_LAPIC", self.fd.set_lapic(&lapic))
    }

    /// Registers for the 64-bit boot protocol: long mode with the boot GDT and identity page
    /// tables, RIP at the kernel's 64-bit entry, RSI at the zero page.
    pub fn configure_long_mode(&self, boot: &BootInfo) -> Result<(), VcpuError> {
        let mut sregs = self.kvm("KVM_GET_SREGS", self.fd.get_sregs())?;
        let code = segment_from_gdt(BOOT_GDT[1], 1);
        let data = segment_from_gdt(BOOT_GDT[2], 2);
        let tss = segment_from_gdt(BOOT_GDT[3], 3);
        sregs.gdt.base = BOOT_GDT_START;
        sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
        sregs.idt.base = BOOT_IDT_START;
        sregs.idt.limit = 7;
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
        sregs.cr3 = PML4_START;
        sregs.cr4 = X86_CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
        self.kvm("KVM_SET_SREGS", self.fd.set_sregs(&sregs))?;

        let regs = kvm_regs {
            rflags: 0x2,
            rip: boot.entry.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: boot.zero_page.0,
            ..Default::default()
        };
        self.kvm("KVM_SET_REGS", self.fd.set_regs(&regs))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.kvm("KVM_SET_FPU", self.fd.set_fpu(&fpu))
    }

    fn internal_error(&mut self) -> String {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
        // union member.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        format!(
            "vCPU {}: KVM internal error, suberror {} data {:x?} at rip {rip:#x}",
            self.id,
            internal.suberror,
            &internal.data[..n]
        )
    }

    /// The registers worth logging when the guest dies unexpectedly.
    fn state_summary(&self) -> String {
        let regs = match self.fd.get_regs() {
            Ok(r) => format!(
                "rip {:#x} rsp {:#x} rflags {:#x} rax {:#x}",
                r.rip, r.rsp, r.rflags, r.rax
            ),
            Err(e) => format!("registers unavailable ({e})"),
        };
        let sregs = match self.fd.get_sregs() {
            Ok(s) => format!(
                "cs {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} idt {:#x}/{:#x}",
                s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit
            ),
            Err(e) => format!("special registers unavailable ({e})"),
        };
        format!("{regs} {sregs}")
    }

    /// Serve the KVM_EXIT_IO the vCPU just made: `count` elements of `size` bytes in the run
    /// area's data page (kvm-ioctls' `VcpuExit::IoIn/IoOut` hand over the bytes without the
    /// element size), one bus access per element.
    fn port_io(&mut self) {
        let id = self.id;
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_IO, so `io` is the active union member.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size);
        let len = size.saturating_mul(io.count as usize);
        let Some(start) = usize::try_from(io.data_offset)
            .ok()
            .filter(|&o| o >= PIO_DATA.start && o.saturating_add(len) <= PIO_DATA.end)
        else {
            virtio_dev::guest_error!(
                "vCPU {id}: port I/O exit with {} x {size} bytes at offset {:#x}, outside the data page",
                io.count,
                io.data_offset
            );
            return;
        };
        let base = std::ptr::from_mut(run).cast::<u8>();
        // SAFETY: the vCPU mapping kvm-ioctls made (KVM_GET_VCPU_MMAP_SIZE bytes: the kvm_run
        // structure, then KVM's PIO data page, then more) covers [start, start + len), checked
        // above to lie within the data page, past the kvm_run structure; kvm-ioctls' own
        // `VcpuExit::IoIn/IoOut` slice is this one. Nothing else refers to those bytes while
        // this thread is out of KVM_RUN.
        let data = unsafe { std::slice::from_raw_parts_mut(base.add(start), len) };
        match u32::from(io.direction) {
            KVM_EXIT_IO_IN => self.buses.pio_read_elements(io.port, data, size),
            KVM_EXIT_IO_OUT => self.buses.pio_write_elements(io.port, data, size),
            d => virtio_dev::guest_error!("vCPU {id}: port I/O exit with direction {d}"),
        }
    }

    /// Run until the VM stops; returns the reason this vCPU saw (or the VM's).
    pub fn run(&mut self) -> ExitReason {
        self.control.pause.register(self.id);
        let reason = self.run_loop();
        self.control.pause.unregister(self.id);
        self.probe.stopped();
        reason
    }

    /// Finish the I/O or MMIO exit just handled before the state is read: KVM completes it
    /// (an IN's value into RAX, RIP past the instruction) only on the next `KVM_RUN`, so enter
    /// it once with `immediate_exit` set, which returns at once with EINTR (the KVM API's way
    /// to bring a vCPU to a consistent state before saving it).
    fn complete_pending_exit(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => log::warn!(
                "vCPU {}: completing the last exit before a pause: {e}",
                self.id
            ),
            Ok(exit) => log::warn!(
                "vCPU {}: unexpected exit {exit:?} completing the last exit before a pause",
                self.id
            ),
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    fn run_loop(&mut self) -> ExitReason {
        loop {
            if self.control.stopping() {
                break;
            }
            if self.control.pause.requested() {
                self.complete_pending_exit();
                self.control.pause.park(self.id, &self.fd);
                continue;
            }
            self.probe.entering_run();
            let stop = match self.fd.run() {
                Ok(exit) => match observed(&self.probe, exit) {
                    VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => {
                        self.port_io();
                        None
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        self.buses.mmio_read(addr, data);
                        None
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        self.buses.mmio_write(addr, data);
                        None
                    }
                    VcpuExit::Hlt => Some(ExitReason::Halted),
                    VcpuExit::Shutdown => {
                        // Linux resets through ACPI or port 0xcf9 first; a shutdown exit is a
                        // triple fault (or `reboot=t`), worth the registers in the log.
                        log::warn!(
                            "vCPU {}: shutdown exit (triple fault or reboot=t): guest reset; {}",
                            self.id,
                            self.state_summary()
                        );
                        Some(ExitReason::Reset)
                    }
                    VcpuExit::SystemEvent(kind, data) => match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::PowerOff),
                        KVM_SYSTEM_EVENT_RESET => Some(ExitReason::Reset),
                        KVM_SYSTEM_EVENT_CRASH => Some(ExitReason::Error(format!(
                            "vCPU {}: guest crash event {data:x?}",
                            self.id
                        ))),
                        other => {
                            log::warn!("vCPU {}: ignoring system event {other}", self.id);
                            None
                        }
                    },
                    VcpuExit::Intr => None,
                    VcpuExit::InternalError => Some(ExitReason::Error(self.internal_error())),
                    VcpuExit::FailEntry(reason, cpu) => Some(ExitReason::Error(format!(
                        "vCPU {}: VM entry failed, hardware reason {reason:#x} on host CPU {cpu}",
                        self.id
                    ))),
                    other => Some(ExitReason::Error(format!(
                        "vCPU {}: unexpected exit {other:?}",
                        self.id
                    ))),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.probe.exited(ExitKind::Interrupted, 0, 0);
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                Err(e) => Some(ExitReason::Error(format!(
                    "vCPU {}: KVM_RUN failed: {e}",
                    self.id
                ))),
            };
            if let Some(reason) = stop {
                self.control.request_stop(reason.clone());
                return reason;
            }
        }
        self.control
            .reason()
            .unwrap_or(ExitReason::Error("stopped without a reason".into()))
    }
}

/// Publishes `exit` in `probe` (its kind, port or address, and size) and hands it back.
fn observed<'a>(probe: &VcpuProbe, exit: VcpuExit<'a>) -> VcpuExit<'a> {
    let len = |d: &[u8]| u32::try_from(d.len()).unwrap_or(u32::MAX);
    let (kind, addr, n) = match &exit {
        VcpuExit::IoIn(port, d) => (ExitKind::IoIn, u64::from(*port), len(d)),
        VcpuExit::IoOut(port, d) => (ExitKind::IoOut, u64::from(*port), len(d)),
        VcpuExit::MmioRead(addr, d) => (ExitKind::MmioRead, *addr, len(d)),
        VcpuExit::MmioWrite(addr, d) => (ExitKind::MmioWrite, *addr, len(d)),
        VcpuExit::Hlt => (ExitKind::Hlt, 0, 0),
        VcpuExit::Shutdown => (ExitKind::Shutdown, 0, 0),
        VcpuExit::SystemEvent(kind, _) => (ExitKind::SystemEvent, u64::from(*kind), 0),
        VcpuExit::Intr => (ExitKind::Interrupted, 0, 0),
        VcpuExit::InternalError | VcpuExit::FailEntry(..) => (ExitKind::Failure, 0, 0),
        _ => (ExitKind::Other, 0, 0),
    };
    probe.exited(kind, addr, n);
    exit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let cs = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.s, cs.present),
            (8, 0xb, 1, 0, 1, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((ds.selector, ds.type_, ds.l, ds.db), (0x10, 3, 0, 1));
        let tr = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((tr.selector, tr.type_, tr.s), (0x18, 0xb, 0));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn cpuid_fixups_set_apic_id_and_hypervisor_bit() {
        let mut c = CpuId::from_entries(&[
            kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: 0xb,
                edx: 7,
                ..Default::default()
            },
        ])
        .unwrap();
        fixup_cpuid(&mut c, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0xffff);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_ne!(e[0].edx & (1 << 28), 0);
        assert_eq!(e[1].edx, 3);
    }
}
