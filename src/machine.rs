//! Assembles a bootable Linux machine: VM, legacy devices, PCI bus with virtio-blk disks,
//! ACPI tables, kernel loading, and running it to completion.
//!
//! Extension points: [`Machine::pci_bus`] to add PCI devices, [`Machine::add_acpi_table`] to add
//! a table before [`Machine::boot`].
//!
//! With `--viommu virtio` ([`crate::config::VmConfig::viommu`]) the machine gets a virtio-iommu
//! PCI function (its slot is reserved at creation, it is plugged at boot once every endpoint is
//! known), every `iommu=on` disk is registered as an endpoint (ID = its BDF) and translates all
//! its DMA through it, and a VIOT table describes the topology to the guest.
//!
//! With `--viommu vtd` ([`crate::config::VmConfig::vtd`]) the machine gets an emulated Intel VT-d
//! unit instead: its register page at [`dmar::DEFAULT_REGISTER_BASE`] on the MMIO bus, every
//! `iommu=on` disk and port an endpoint of it (ID = its BDF, translating through the unit's
//! views), and a DMAR table listing them (INCLUDE_PCI_ALL when every device is behind it).

use std::io::Write;

use std::sync::{Arc, Mutex};
use std::time::Duration;
use vm_memory::GuestAddressSpace;

use pci::{PciBus, PciWindows, VirtioPciDevice};
use viommu::spec::REQUEST_QUEUE;
use viommu::{Counters, EndpointHandle, Viommu};
use virtio_dev::VirtioDevice;

use crate::acpi::{self, AcpiConfig};
use crate::boot::{self, LinuxBoot};
use crate::config::{BlockConfig, NetBackendConfig, NetConfig, SerialOutput};
use crate::devices::block::Block;
use crate::devices::net::{Net, NetPort};
use crate::devices::polled::Polled;
use crate::dmar;
use crate::iommu::{VtdInterrupts, VtdMmio};
use crate::lifecycle::ExitReason;
use crate::memory::{MMIO32_SIZE, MMIO32_START, PCI_IO_SIZE, PCI_IO_START};
use crate::pci_host::PciExits;
use crate::vfio::{DmaSetup, Passthrough, VfioError};
use crate::viot;
use crate::vm::{Vm, VmConfig, VmError};
use viommu::vtd::unit::Unit;

/// Machine errors; each keeps its cause as `source()` (see [`crate::report::Chain`]).
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// VM creation or setup failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A disk could not be opened or attached.
    #[error("disk {name}")]
    Disk {
        /// The disk's path.
        name: String,
        /// Why.
        #[source]
        source: AttachError,
    },
    /// A network port could not be opened or attached.
    #[error("{name}")]
    Net {
        /// `net tap=NAME` or `net hub=ID`.
        name: String,
        /// Why.
        #[source]
        source: AttachError,
    },
    /// The serial output file could not be created.
    #[error("serial output {path}")]
    Serial {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Kernel loading failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The virtio-iommu could not be created or plugged.
    #[error("virtio-iommu")]
    Viommu(#[from] ViommuSetupError),
    /// The VT-d unit could not be set up.
    #[error("vtd")]
    Vtd(#[from] VtdSetupError),
    /// No free PCI slot is left.
    #[error("no free PCI slot for {0}")]
    NoSlot(String),
    /// A VFIO passthrough device could not be opened or attached.
    #[error("vfio")]
    Vfio(#[from] VfioError),
    /// `--restore` or `--api-socket` failed.
    #[error("snapshot")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// Why a virtio disk or port could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// `iommu=on` without a vIOMMU.
    #[error("iommu=on needs --viommu virtio")]
    NoViommu,
    /// The vIOMMU refused the endpoint.
    #[error("vIOMMU endpoint")]
    Endpoint(#[source] viommu::DomainError),
    /// The backend (disk file, TAP interface) could not be opened.
    #[error(transparent)]
    Backend(#[from] std::io::Error),
    /// The MSI routing could not be set up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The virtio-pci transport or the PCI bus refused the device.
    #[error(transparent)]
    Pci(#[from] pci::PciError),
}

/// Why the virtio-iommu could not be created or plugged.
#[derive(Debug, thiserror::Error)]
pub enum ViommuSetupError {
    /// The host IOMMUs of the assigned devices do not fit the configuration.
    #[error("host IOMMU geometry")]
    Geometry(#[source] viommu::GeometryError),
    /// The device refused its configuration.
    #[error(transparent)]
    Config(#[from] viommu::ConfigError),
    /// An assigned device could not become an endpoint.
    #[error(transparent)]
    Endpoint(#[from] viommu::DomainError),
    /// The virtio-pci transport or the PCI bus refused the device.
    #[error(transparent)]
    Pci(#[from] pci::PciError),
}

/// Why the VT-d unit could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VtdSetupError {
    /// Its interrupt vector could not be allocated.
    #[error("fault event interrupt")]
    Interrupt(#[source] std::io::Error),
    /// Its register page overlaps another MMIO device.
    #[error("register page")]
    Mmio(#[source] crate::bus::BusError),
    /// The DMAR table could not be built.
    #[error("DMAR table")]
    Dmar(#[source] dmar::DmarError),
}

/// The VT-d unit between creation and boot: endpoints are registered while devices are added,
/// the DMAR table is built at boot.
struct PendingVtd {
    unit: Unit,
    endpoints: Vec<u16>,
}

/// The virtio-iommu's slot and function once plugged (its state is saved in snapshots).
type PluggedIommu = (u8, Arc<Mutex<VirtioPciDevice>>);

/// The virtio-iommu between creation and boot: endpoints are registered while disks are
/// added, the device is plugged (and the VIOT built) at boot.
struct PendingIommu {
    dev: Viommu,
    slot: u8,
    endpoints: Vec<u16>,
    poll: Duration,
}

/// A VM with its devices, ready to boot.
pub struct Machine {
    /// The VM.
    pub vm: Vm,
    pci: Arc<PciBus>,
    config: crate::config::VmConfig,
    extra_tables: Vec<Vec<u8>>,
    disks: Vec<(BlockConfig, u8)>,
    iommu: Option<PendingIommu>,
    iommu_counters: Option<Arc<Counters>>,
    vtd: Option<PendingVtd>,
    vtd_counters: Option<Arc<viommu::vtd::counters::Counters>>,
    passthrough: Passthrough,
    hubs: crate::net::Hubs,
    /// Every virtio-net port (MAC, counters), for the exit summary.
    net_ports: Vec<([u8; 6], Arc<NetPort>)>,
    /// Every disk (path, counters), for the exit summary.
    disk_stats: Vec<(String, Arc<crate::devices::block::BlockStats>)>,
}

impl Machine {
    /// Create the VM, legacy devices, the PCI bus and the disks.
    pub fn new(config: crate::config::VmConfig) -> Result<Machine, MachineError> {
        // Threads install their filter under this mode: TAP readers as they start, the main
        // thread and the vCPUs in Vm::run, device workers when the guest starts them.
        crate::seccomp::set_mode(config.seccomp);
        let vm = Vm::new(VmConfig {
            cpus: config.cpus,
            memory: config.memory,
            irqchip: true,
        })?;
        let out: Box<dyn Write + Send> = match &config.serial {
            SerialOutput::Stdout => Box::new(std::io::stdout()),
            SerialOutput::File(p) => {
                Box::new(
                    std::fs::File::create(p).map_err(|source| MachineError::Serial {
                        path: p.display().to_string(),
                        source,
                    })?,
                )
            }
        };
        vm.add_legacy_devices(out)?;
        let pci = Arc::new(PciBus::new(PciWindows {
            mmio32: (MMIO32_START, MMIO32_SIZE),
            mmio64: vm.layout.mmio64,
            io: (PCI_IO_START, PCI_IO_SIZE),
        }));
        vm.buses.set_fallback(Arc::new(PciExits::new(pci.clone())));
        // VFIO devices first: the vIOMMU's geometry comes from their host IOMMUs.
        let passthrough = Passthrough::open(&vm.kvm, &vm.fd, &config.devices)?;
        let mut m = Machine {
            vm,
            pci,
            config,
            extra_tables: Vec::new(),
            disks: Vec::new(),
            iommu: None,
            iommu_counters: None,
            vtd: None,
            vtd_counters: None,
            passthrough,
            hubs: crate::net::Hubs::new(),
            net_ports: Vec::new(),
            disk_stats: Vec::new(),
        };
        if let Some(opts) = m.config.viommu.clone() {
            let hosts = m.passthrough.viommu_hosts();
            let cfg = viommu::viommu_config_for(opts.config(), &hosts)
                .map_err(ViommuSetupError::Geometry)?;
            let mut dev = Viommu::new(cfg).map_err(ViommuSetupError::from)?;
            if m.passthrough.any_translated() {
                // Boot bypass for assigned endpoints: all RAM in their containers until the
                // driver attaches them.
                dev.set_guest_ram(&m.vm.layout.ram_regions);
            }
            let slot = m
                .free_slot()
                .ok_or_else(|| MachineError::NoSlot("the virtio-iommu".into()))?;
            m.iommu_counters = Some(dev.counters());
            m.iommu = Some(PendingIommu {
                dev,
                slot,
                endpoints: Vec::new(),
                poll: Duration::from_micros(opts.poll_us),
            });
        }
        if let Some(opts) = m.config.vtd {
            m.create_vtd(opts)?;
        }
        for disk in m.config.disks.clone() {
            m.add_disk(disk)?;
        }
        for net in m.config.nets.clone() {
            m.add_net(net)?;
        }
        m.add_vfio_devices()?;
        Ok(m)
    }

    /// The PCI bus (to add more devices before booting).
    pub fn pci_bus(&self) -> &Arc<PciBus> {
        &self.pci
    }

    /// Add a fully formed ACPI table (header and checksum included) to the XSDT.
    pub fn add_acpi_table(&mut self, table: Vec<u8>) {
        self.extra_tables.push(table);
    }

    /// The attached disks and their PCI device numbers (bus 0, function 0), e.g. to list the
    /// `iommu=on` endpoints in a VIOT.
    pub fn disks(&self) -> &[(BlockConfig, u8)] {
        &self.disks
    }

    /// Create the VT-d unit and map its register page.
    fn create_vtd(&mut self, opts: crate::config::VtdOptions) -> Result<(), MachineError> {
        let irq = self.vm.msi_manager()?;
        let msi = VtdInterrupts::new(self.vm.fd.clone(), irq).map_err(VtdSetupError::Interrupt)?;
        let unit = Unit::new(opts.config(), self.vm.memory.clone(), Arc::new(msi));
        self.vm
            .buses
            .mmio
            .insert(
                dmar::DEFAULT_REGISTER_BASE,
                viommu::vtd::caps::REGISTER_SET_SIZE,
                Arc::new(Mutex::new(VtdMmio(unit.clone()))),
            )
            .map_err(VtdSetupError::Mmio)?;
        self.vtd_counters = Some(unit.counters());
        self.vtd = Some(PendingVtd {
            unit,
            endpoints: Vec::new(),
        });
        Ok(())
    }

    /// The VT-d unit's live counters (`None` without `--viommu vtd`); read them after
    /// [`Machine::boot`] returns for the exit summary.
    pub fn vtd_counters(&self) -> Option<Arc<viommu::vtd::counters::Counters>> {
        self.vtd_counters.clone()
    }

    /// The vIOMMU's live counters (`None` without `--viommu virtio`); read them after
    /// [`Machine::boot`] returns for the exit summary.
    pub fn viommu_counters(&self) -> Option<Arc<Counters>> {
        self.iommu_counters.clone()
    }

    /// Host DMA calls made into the VFIO containers (`None` without `--device`); read them
    /// after [`Machine::boot`] returns for the exit summary.
    pub fn vfio_counters(&self) -> Option<Arc<crate::vfio::DmaCounters>> {
        (!self.config.devices.is_empty()).then(|| self.passthrough.dma_counters())
    }

    /// Each virtio-net port's MAC and counters; read them after [`Machine::boot`] returns for
    /// the exit summary.
    pub fn net_ports(&self) -> Vec<([u8; 6], Arc<NetPort>)> {
        self.net_ports.clone()
    }

    /// Each disk's path and counters; read them after [`Machine::boot`] returns for the exit
    /// summary.
    pub fn disk_stats(&self) -> Vec<(String, Arc<crate::devices::block::BlockStats>)> {
        self.disk_stats.clone()
    }

    /// PCI device number of the virtio-iommu (`None` without one).
    pub fn viommu_slot(&self) -> Option<u8> {
        self.iommu.as_ref().map(|i| i.slot)
    }

    /// The first device number on bus 0 with nothing plugged and not reserved for the IOMMU.
    fn free_slot(&self) -> Option<u8> {
        let reserved = self.iommu.as_ref().map(|i| i.slot);
        (1u8..32).find(|&s| {
            let mut id = [0u8; 2];
            self.pci.ecam_read(u64::from(s) << 15, &mut id);
            Some(s) != reserved && id == [0xff, 0xff]
        })
    }

    /// Register the device about to be plugged at `slot` as an endpoint of the virtio-iommu
    /// (which must exist).
    fn iommu_endpoint(&mut self, slot: u8) -> Result<EndpointHandle, AttachError> {
        if let Some(vtd) = self.vtd.as_mut() {
            let bdf = viot::bdf(0, slot, 0);
            let ep = vtd.unit.add_endpoint(bdf).map_err(AttachError::Endpoint)?;
            vtd.endpoints.push(bdf);
            return Ok(ep);
        }
        let iommu = self.iommu.as_mut().ok_or(AttachError::NoViommu)?;
        let bdf = viot::bdf(0, slot, 0);
        let ep = iommu
            .dev
            .add_endpoint(u32::from(bdf))
            .map_err(AttachError::Endpoint)?;
        iommu.endpoints.push(bdf);
        Ok(ep)
    }

    /// Put a virtio device model behind the virtio-pci transport at device number `slot`.
    fn plug_virtio(&mut self, slot: u8, model: Box<dyn VirtioDevice>) -> Result<u8, AttachError> {
        let msi = self.vm.msi_manager()?;
        let dev = VirtioPciDevice::new(
            model,
            self.vm.memory.clone(),
            msi,
            self.vm.ioevent_manager(),
        )?;
        Ok(self.pci.add_device_at(slot, Arc::new(Mutex::new(dev)))?)
    }

    /// Attach a virtio-blk disk; returns its PCI device number. An `iommu=on` disk becomes an
    /// endpoint of the virtio-iommu (which must exist).
    pub fn add_disk(&mut self, disk: BlockConfig) -> Result<u8, MachineError> {
        let name = disk.path.display().to_string();
        let slot = self
            .free_slot()
            .ok_or_else(|| MachineError::NoSlot(format!("disk {name}")))?;
        let attach = |m: &mut Self| -> Result<u8, AttachError> {
            let endpoint = if disk.iommu {
                Some(m.iommu_endpoint(slot)?)
            } else {
                None
            };
            let blk = Block::with_endpoint(disk.clone(), endpoint)?;
            let stats = blk.stats().clone();
            // Inline, a notification serves one round of the queue; the continuation thread
            // serves the rest (see `devices::polled`).
            let model: Box<dyn VirtioDevice> = if disk.inline {
                Box::new(Polled::continuing(Box::new(blk)))
            } else {
                Box::new(blk)
            };
            let slot = m.plug_virtio(slot, model)?;
            m.disk_stats.push((disk.path.display().to_string(), stats));
            Ok(slot)
        };
        let slot = attach(self).map_err(|source| MachineError::Disk {
            name: name.clone(),
            source,
        })?;
        log::info!(
            "disk {name} at PCI 00:{slot:02x}.0{}",
            if disk.iommu { self.iommu_name() } else { "" }
        );
        self.disks.push((disk, slot));
        Ok(slot)
    }

    /// Plug every opened VFIO device in the next free slots: `iommu=on` ones become endpoints
    /// of the virtio-iommu (their container mirrored by a shadow), the others got the static
    /// full-RAM mapping.
    fn add_vfio_devices(&mut self) -> Result<(), MachineError> {
        while let Some(r) = self
            .passthrough
            .attach_next(self.vm.msi_manager()?, &self.vm.memory)
        {
            let (path, dev, dma) = r?;
            let name = path.display().to_string();
            let slot = self
                .free_slot()
                .ok_or_else(|| MachineError::NoSlot(format!("VFIO device {name}")))?;
            if let DmaSetup::Translated(shadow) = dma {
                let iommu = self
                    .iommu
                    .as_mut()
                    .ok_or_else(|| VfioError::NoViommu(path.clone()))?;
                let bdf = viot::bdf(0, slot, 0);
                iommu
                    .dev
                    .add_host_endpoint(u32::from(bdf), shadow)
                    .map_err(ViommuSetupError::from)?;
                iommu.endpoints.push(bdf);
            }
            let slot = self
                .pci
                .add_device_at(slot, Arc::new(Mutex::new(dev)))
                .map_err(|e| VfioError::Plug(path.clone(), e))?;
            log::info!("VFIO device {name} at PCI 00:{slot:02x}.0");
        }
        Ok(())
    }

    /// Attach a virtio-net port; returns its PCI device number. An `iommu=on` port becomes an
    /// endpoint of the virtio-iommu (which must exist).
    pub fn add_net(&mut self, net: NetConfig) -> Result<u8, MachineError> {
        let name = match &net.backend {
            NetBackendConfig::Tap(t) => format!("net tap={t}"),
            NetBackendConfig::Hub(h) => format!("net hub={h}"),
        };
        let slot = self
            .free_slot()
            .ok_or_else(|| MachineError::NoSlot(name.clone()))?;
        let attach = |m: &mut Self| -> Result<(u8, [u8; 6]), AttachError> {
            let endpoint = if net.iommu {
                Some(m.iommu_endpoint(slot)?)
            } else {
                None
            };
            let dev = Net::new(net.clone(), endpoint, &m.hubs)?;
            let mac = dev.mac();
            m.net_ports.push((mac, dev.port().clone()));
            // TX and control are served inline, one round per notification; the
            // continuation thread serves the rest (see `devices::polled`).
            let model = Box::new(Polled::continuing(Box::new(dev)));
            Ok((m.plug_virtio(slot, model)?, mac))
        };
        let (slot, mac) = attach(self).map_err(|source| MachineError::Net {
            name: name.clone(),
            source,
        })?;
        log::info!(
            "{name} mac {:02x?} at PCI 00:{slot:02x}.0{}",
            mac,
            if net.iommu { self.iommu_name() } else { "" }
        );
        Ok(slot)
    }

    /// How the log names the vIOMMU a device sits behind.
    fn iommu_name(&self) -> &'static str {
        if self.vtd.is_some() {
            " behind the VT-d unit"
        } else {
            " behind the virtio-iommu"
        }
    }

    /// Add the DMAR table describing the VT-d unit: INCLUDE_PCI_ALL when every PCI device
    /// (disks, ports, VFIO functions) is behind it, else one scope per endpoint.
    fn describe_vtd(&mut self) -> Result<(), MachineError> {
        let Some(vtd) = self.vtd.take() else {
            return Ok(());
        };
        let all = self.config.disks.iter().all(|d| d.iommu)
            && self.config.nets.iter().all(|n| n.iommu)
            && self.config.devices.is_empty()
            && !vtd.endpoints.is_empty();
        let scope = if all {
            dmar::Scope::AllPci
        } else {
            dmar::Scope::Endpoints(vtd.endpoints.clone())
        };
        let caps = vtd.unit.capabilities();
        let table = dmar::build(&dmar::DmarConfig {
            host_address_width: caps.haw() as u8,
            register_base: dmar::DEFAULT_REGISTER_BASE,
            scope,
        })
        .map_err(VtdSetupError::Dmar)?;
        self.add_acpi_table(table);
        log::info!(
            "vtd: unit at {:#x}, endpoints {:x?}{}",
            dmar::DEFAULT_REGISTER_BASE,
            vtd.endpoints,
            if all { " (INCLUDE_PCI_ALL)" } else { "" }
        );
        Ok(())
    }

    /// Plug the pending virtio-iommu at its reserved slot and add the VIOT describing it and
    /// its endpoints.
    fn plug_iommu(&mut self) -> Result<Option<PluggedIommu>, MachineError> {
        let Some(iommu) = self.iommu.take() else {
            return Ok(None);
        };
        // Always wrapped: its thread continues a notification cut short at the device's
        // per-notification budget (and polls when `poll` is set).
        let model: Box<dyn VirtioDevice> =
            Box::new(Polled::new(Box::new(iommu.dev), REQUEST_QUEUE, iommu.poll));
        let dev = VirtioPciDevice::new(
            model,
            self.vm.memory.clone(),
            self.vm.msi_manager()?,
            self.vm.ioevent_manager(),
        )
        .map_err(ViommuSetupError::from)?;
        let dev = Arc::new(Mutex::new(dev));
        let slot = self
            .pci
            .add_device_at(iommu.slot, dev.clone())
            .map_err(ViommuSetupError::from)?;
        let table = viot::build(viot::bdf(0, slot, 0), &iommu.endpoints);
        self.add_acpi_table(table);
        log::info!(
            "virtio-iommu at PCI 00:{slot:02x}.0, endpoints {:x?}",
            iommu.endpoints
        );
        Ok(Some((slot, dev)))
    }

    /// Write ACPI tables, load the kernel, and run all vCPUs until the guest stops.
    pub fn boot(mut self) -> Result<ExitReason, MachineError> {
        let mut snapshots = crate::snapshot::machine::Plan::new(
            &self.config,
            self.vtd.as_ref().map(|v| v.unit.clone()),
        );
        if let Some((slot, dev)) = self.plug_iommu()? {
            snapshots.set_viommu(self.pci.clone(), slot, dev);
        }
        if self.config.restore.is_some() {
            snapshots.check_restorable()?;
        }
        self.describe_vtd()?;
        let mem = self.vm.memory.memory();
        let rsdp = acpi::write(
            &*mem,
            &AcpiConfig {
                cpus: self.config.cpus,
                mmio64: self.vm.layout.mmio64,
                pci_io: (PCI_IO_START, PCI_IO_SIZE),
                extra_tables: self.extra_tables.clone(),
            },
        )?;
        let info = boot::load_linux(
            &mem,
            &self.vm.layout,
            &LinuxBoot {
                kernel: &self.config.kernel,
                initramfs: self.config.initramfs.as_deref(),
                cmdline: &self.config.cmdline,
                rsdp,
            },
        )?;
        drop(mem);
        let vcpus = self.vm.create_vcpus()?;
        self.vm.configure_boot_vcpu(&vcpus, &info)?;
        if let Some(dir) = &self.config.restore {
            crate::snapshot::machine::restore_machine(dir, &self.vm, &vcpus, &snapshots)?;
        }
        let _api = match &self.config.api_socket {
            Some(path) => Some(crate::snapshot::machine::serve(path, &self.vm, &snapshots)?),
            None => None,
        };
        // Started before the main thread's seccomp filter; it installs its own.
        let watchdog = match &self.config.watchdog {
            Some(w) => Some(
                crate::watchdog::Watchdog::start(w, vcpus.iter().map(|v| v.probe()).collect())
                    .map_err(|e| VmError::Io("watchdog thread", e))?,
            ),
            None => None,
        };
        let r = self.vm.run(vcpus);
        if let Some(w) = watchdog {
            w.stop();
        }
        Ok(r?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Chain;
    use std::error::Error;

    #[test]
    fn errors_keep_their_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = MachineError::Disk {
            name: "/d.img".into(),
            source: AttachError::Backend(io),
        };
        assert_eq!(e.to_string(), "disk /d.img");
        let cause = e.source().unwrap();
        assert!(matches!(
            cause.downcast_ref::<AttachError>(),
            Some(AttachError::Backend(_))
        ));
        assert_eq!(Chain(&e).to_string(), "disk /d.img: caused by no such file");
        let e = MachineError::Net {
            name: "net hub=0".into(),
            source: AttachError::NoViommu,
        };
        assert_eq!(
            Chain(&e).to_string(),
            "net hub=0: caused by iommu=on needs --viommu virtio"
        );
        let e = MachineError::from(VfioError::ContainerGone("/sys/x".into()));
        assert_eq!(
            Chain(&e).to_string(),
            "vfio: caused by /sys/x: container vanished"
        );
    }
}
