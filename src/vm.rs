//! The KVM virtual machine: RAM, in-kernel irqchip and PIT, the I/O and MMIO buses with the
//! legacy devices, vCPU creation, and running every vCPU on its own thread until the VM stops.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::acpi::SLEEP_CONTROL_PORT;
use crate::boot::BootInfo;
use crate::bus::Buses;
use crate::devices::legacy::{AcpiPm, Cmos, Sink, I8042};
use crate::devices::serial::{SerialDevice, COM1_IRQ, COM1_PORT};
use crate::irq::{KvmIoEventManager, KvmMsiIrqManager};
use crate::lifecycle::{ExitReason, VmControl};
use crate::memory::{Layout, MemoryError};
use crate::vcpu::{Vcpu, VcpuError};

/// Identity map page address (just below the TSS, outside RAM and MMIO windows).
pub const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// TSS address for KVM_SET_TSS_ADDR (three pages).
pub const TSS_ADDR: u64 = 0xfffb_d000;

/// VM construction errors.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A VM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Memory layout or allocation failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// vCPU setup failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Host resource (eventfd, thread) failure.
    #[error("{0}")]
    Io(&'static str, #[source] std::io::Error),
    /// Unsupported configuration.
    #[error("device setup: {0}")]
    Device(String),
    /// A legacy device could not be registered on a bus.
    #[error("device setup")]
    Bus(#[from] crate::bus::BusError),
    /// Guest RAM has no host mapping.
    #[error("device setup: guest RAM")]
    Ram(#[source] vm_memory::GuestMemoryError),
}

/// What the VM is made of.
#[derive(Clone, Copy, Debug)]
pub struct VmConfig {
    /// Number of vCPUs (1..=254).
    pub cpus: u8,
    /// RAM size in bytes.
    pub memory: u64,
    /// Create the in-kernel irqchip (IOAPIC, PIC, LAPICs) and PIT. Tests of bare exits turn
    /// it off so HLT reaches user space.
    pub irqchip: bool,
}

/// A KVM VM with its memory and buses.
pub struct Vm {
    /// The /dev/kvm handle.
    pub kvm: Kvm,
    /// The VM file descriptor.
    pub fd: Arc<VmFd>,
    /// Address-space layout.
    pub layout: Layout,
    /// Guest RAM.
    pub memory: GuestMemoryAtomic<GuestMemoryMmap>,
    /// Exit dispatch targets shared by all vCPUs.
    pub buses: Arc<Buses>,
    /// Stop flag and reason.
    pub control: Arc<VmControl>,
    /// The configuration it was built from.
    pub config: VmConfig,
    msi: Mutex<Option<Arc<KvmMsiIrqManager>>>,
    /// COM1 and the CMOS, once added (their state is saved in snapshots).
    pub legacy: std::sync::OnceLock<crate::snapshot::legacy::LegacyDevices>,
}

impl Vm {
    /// Create the VM, its RAM and (optionally) the in-kernel irqchip and PIT.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        if config.cpus == 0 || config.cpus > 254 {
            return Err(VmError::Device(format!(
                "unsupported vCPU count {}",
                config.cpus
            )));
        }
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
        fd.set_identity_map_address(IDENTITY_MAP_ADDR)
            .map_err(|e| VmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        fd.set_tss_address(TSS_ADDR as usize)
            .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        if config.irqchip {
            fd.create_irq_chip()
                .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit)
                .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;
        }
        let layout = Layout::new(config.memory)?;
        let mem = layout.allocate()?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(VmError::Ram)?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the Vm keeps alive (in
            // `memory`) for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(r) }
                .map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            layout,
            memory: GuestMemoryAtomic::new(mem),
            buses: Arc::new(Buses::new()),
            control: Arc::new(VmControl::new().map_err(|e| VmError::Io("eventfd", e))?),
            config,
            msi: Mutex::new(None),
            legacy: std::sync::OnceLock::new(),
        })
    }

    /// The MSI/GSI routing manager (created on first use; installs the routing table).
    pub fn msi_manager(&self) -> Result<Arc<KvmMsiIrqManager>, VmError> {
        let mut m = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = &*m {
            return Ok(m.clone());
        }
        let new = Arc::new(
            KvmMsiIrqManager::new(self.fd.clone())
                .map_err(|e| VmError::Io("KVM_SET_GSI_ROUTING", e))?,
        );
        *m = Some(new.clone());
        Ok(new)
    }

    /// The ioeventfd registrar.
    pub fn ioevent_manager(&self) -> Arc<KvmIoEventManager> {
        Arc::new(KvmIoEventManager::new(self.fd.clone()))
    }

    /// COM1 (IRQ 4 through an irqfd), CMOS, i8042, the ACPI PM registers and port 0x80.
    pub fn add_legacy_devices(&self, serial_out: Box<dyn Write + Send>) -> Result<(), VmError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Io("eventfd", e))?;
        if self.config.irqchip {
            self.fd
                .register_irqfd(&irq, COM1_IRQ)
                .map_err(|e| VmError::Kvm("KVM_IRQFD (serial)", e))?;
        }
        let serial = Arc::new(Mutex::new(SerialDevice::new(irq, serial_out)));
        let cmos = Arc::new(Mutex::new(Cmos::new()));
        let pio = &self.buses.pio;
        pio.insert(COM1_PORT.into(), 8, serial.clone())?;
        pio.insert(0x70, 2, cmos.clone())?;
        let _ = self
            .legacy
            .set(crate::snapshot::legacy::LegacyDevices { serial, cmos });
        pio.insert(
            0x60,
            5,
            Arc::new(Mutex::new(I8042::new(self.control.clone()))),
        )?;
        pio.insert(
            SLEEP_CONTROL_PORT.into(),
            3,
            Arc::new(Mutex::new(AcpiPm::new(self.control.clone()))),
        )?;
        pio.insert(0x80, 1, Arc::new(Mutex::new(Sink)))?;
        Ok(())
    }

    /// Create `config.cpus` vCPUs with CPUID, MSRs and (with an irqchip) LAPIC LINT setup.
    pub fn create_vcpus(&self) -> Result<Vec<Vcpu>, VmError> {
        let supported: CpuId = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut vcpus = Vec::new();
        for id in 0..self.config.cpus {
            let fd = self
                .fd
                .create_vcpu(id.into())
                .map_err(|e| VmError::Kvm("KVM_CREATE_VCPU", e))?;
            let vcpu = Vcpu::new(id, fd, self.buses.clone(), self.control.clone());
            vcpu.configure_cpuid(&supported, self.config.cpus)?;
            vcpu.configure_msrs()?;
            if self.config.irqchip {
                vcpu.configure_lapic()?;
            }
            vcpus.push(vcpu);
        }
        Ok(vcpus)
    }

    /// Point the boot vCPU at the kernel (the others wait for INIT/SIPI).
    pub fn configure_boot_vcpu(&self, vcpus: &[Vcpu], boot: &BootInfo) -> Result<(), VmError> {
        if let Some(bsp) = vcpus.first() {
            bsp.configure_long_mode(boot)?;
        }
        Ok(())
    }

    /// Run every vCPU on its own thread until one of them, a device or a signal stops the VM;
    /// then stop and join all vCPU threads.
    pub fn run(&self, vcpus: Vec<Vcpu>) -> Result<ExitReason, VmError> {
        run_vcpus(vcpus, &self.control)
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Run `vcpus` on threads named `vcpuN`, wait for a stop request on `control`, then kick the
/// threads out of KVM_RUN until all have exited.
pub fn run_vcpus(vcpus: Vec<Vcpu>, control: &Arc<VmControl>) -> Result<ExitReason, VmError> {
    static HANDLER: Once = Once::new();
    let mut handler_err = None;
    HANDLER.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
            handler_err = Some(e);
        }
    });
    if let Some(e) = handler_err {
        return Err(VmError::Io(
            "signal handler",
            std::io::Error::from_raw_os_error(e.errno()),
        ));
    }
    let mut threads: Vec<JoinHandle<ExitReason>> = Vec::new();
    // vCPUs install their seccomp filter, then wait for the main thread's before the first
    // KVM_RUN (crate::seccomp; nothing is installed when the mode is off).
    let go = Arc::new(crate::seccomp::StartGate::default());
    for mut vcpu in vcpus {
        let name = format!("vcpu{}", vcpu.id);
        let (gate, ctl) = (go.clone(), control.clone());
        let t = std::thread::Builder::new().name(name).spawn(move || {
            if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu) {
                let reason =
                    ExitReason::Error(format!("vCPU {}: {}", vcpu.id, crate::report::Chain(&e)));
                ctl.request_stop(reason.clone());
                return reason;
            }
            gate.wait();
            vcpu.run()
        });
        match t {
            Ok(t) => threads.push(t),
            Err(e) => {
                control.request_stop(ExitReason::Error(format!("cannot spawn vCPU thread: {e}")));
                break;
            }
        }
    }
    if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Main) {
        control.request_stop(ExitReason::Error(crate::report::Chain(&e).to_string()));
    }
    go.open();
    // Wait for the stop request.
    let mut pfd = libc::pollfd {
        fd: control.stop_evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !control.stopping() {
        // SAFETY: `pfd` is a valid pollfd for the lifetime of the call.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
    }
    // Kick until every thread has left KVM_RUN and returned.
    while threads.iter().any(|t| !t.is_finished()) {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            let _ = t.kill(kick_signal());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for t in threads {
        if t.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
    Ok(control
        .reason()
        .unwrap_or(ExitReason::Error("VM stopped without a reason".into())))
}

/// Size in bytes of the guest's RAM as KVM sees it (sum of regions).
pub fn ram_bytes(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}
