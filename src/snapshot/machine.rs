//! The machine's side of snapshots: what a `Machine` saves (vCPUs, irqchip, PIT, clock, RAM,
//! the legacy devices, the VT-d unit, the virtio-iommu with its virtio-pci transport), what it
//! cannot save yet (virtio-blk, virtio-net, VFIO functions), the configuration string a
//! restore is checked against, starting the control socket, and `--restore DIR`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use pci::{PciBus, VirtioPciDevice};

use vm_memory::GuestAddressSpace;

use super::api::ApiServer;
use super::controller::{restore, Controller};
use super::vcpu::msr_list;
use super::{Manifest, SnapshotError, FORMAT_VERSION};
use crate::config::VmConfig;
use crate::vcpu::Vcpu;
use crate::vm::Vm;
use viommu::vtd::unit::Unit;

/// What one machine's snapshots hold, from its configuration.
pub struct Plan {
    /// The manifest a snapshot of it has (and a restore into it expects).
    pub manifest: Manifest,
    /// Devices whose state is not saved yet (a snapshot is refused while there is one).
    pub unsupported: Vec<String>,
    vtd: Option<Unit>,
    viommu: Option<PciFunction>,
}

/// A virtio-pci function on the bus.
#[derive(Clone)]
struct PciFunction {
    bus: Arc<PciBus>,
    slot: u8,
    dev: Arc<Mutex<VirtioPciDevice>>,
}

const VIOMMU_UNSUPPORTED: &str = "virtio-iommu (not plugged)";

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device configuration a snapshot records and a restore must match: every option that
/// shapes the machine (not the kernel, command line or logging).
pub fn config_string(c: &VmConfig) -> String {
    format!(
        "disks={:?} nets={:?} devices={:?} viommu={:?} vtd={:?}",
        c.disks, c.nets, c.devices, c.viommu, c.vtd
    )
}

impl Plan {
    /// The plan for a machine built from `c` (with its VT-d unit, if any).
    pub fn new(c: &VmConfig, vtd: Option<Unit>) -> Plan {
        let mut unsupported = Vec::new();
        for d in &c.disks {
            unsupported.push(format!("virtio-blk {}", d.path.display()));
        }
        for _ in &c.nets {
            unsupported.push("virtio-net".to_string());
        }
        for d in &c.devices {
            unsupported.push(format!(
                "VFIO {} (an assigned device's state is not migratable)",
                d.path.display()
            ));
        }
        if c.viommu.is_some() {
            unsupported.push(VIOMMU_UNSUPPORTED.to_string());
        }
        let mut devices = vec!["legacy".to_string()];
        if vtd.is_some() {
            devices.push("vtd".to_string());
        }
        Plan {
            manifest: Manifest {
                version: FORMAT_VERSION,
                cpus: c.cpus,
                memory: c.memory,
                irqchip: true,
                config: config_string(c),
                devices,
            },
            unsupported,
            vtd,
            viommu: None,
        }
    }

    /// The virtio-iommu is plugged at `slot` of `bus`: its state (transport and device) is
    /// saved as `viommu`.
    pub fn set_viommu(&mut self, bus: Arc<PciBus>, slot: u8, dev: Arc<Mutex<VirtioPciDevice>>) {
        self.unsupported.retain(|u| u != VIOMMU_UNSUPPORTED);
        self.manifest.devices.push("viommu".to_string());
        self.viommu = Some(PciFunction { bus, slot, dev });
    }
}

impl Plan {
    /// Refuse a restore into this machine when it has devices whose state is not saved.
    pub fn check_restorable(&self) -> Result<(), SnapshotError> {
        if self.unsupported.is_empty() {
            return Ok(());
        }
        Err(SnapshotError::Mismatch(format!(
            "the state of {} is not restorable yet (docs/snapshot.md)",
            self.unsupported.join(", ")
        )))
    }
}

/// Start the control socket at `path` for `vm` (call before the vCPUs run).
pub fn serve(path: &Path, vm: &Vm, plan: &Plan) -> Result<ApiServer, SnapshotError> {
    let msrs = msr_list(&vm.kvm)?;
    let mut c = Controller::new(
        vm.control.clone(),
        vm.fd.clone(),
        vm.memory.clone(),
        msrs,
        plan.manifest.clone(),
    );
    if let Some(legacy) = vm.legacy.get().cloned() {
        c.add_device(
            "legacy",
            Box::new(move || serde_json::to_vec(&legacy.save()).unwrap_or_default()),
        );
    }
    if let Some(unit) = plan.vtd.clone() {
        c.add_device("vtd", Box::new(move || unit.save_state()));
    }
    if let Some(f) = plan.viommu.clone() {
        c.add_device(
            "viommu",
            Box::new(move || lock(&f.dev).save_state().unwrap_or_default()),
        );
    }
    for u in &plan.unsupported {
        c.add_unsupported(u);
    }
    Ok(ApiServer::start(path, Arc::new(c))?)
}

/// `--restore DIR`: load the snapshot into `vm` (built from the same configuration, its
/// vCPUs created, nothing run yet).
pub fn restore_machine(
    dir: &Path,
    vm: &Vm,
    vcpus: &[Vcpu],
    plan: &Plan,
) -> Result<(), SnapshotError> {
    plan.check_restorable()?;
    let (snap, manifest) = restore(dir, &vm.fd, &vm.memory.memory(), vcpus, &plan.manifest)?;
    for name in &manifest.devices {
        let blob = snap.read_device(name)?;
        match name.as_str() {
            "legacy" => {
                let state = serde_json::from_slice(&blob)
                    .map_err(|e| SnapshotError::Json("dev-legacy.bin".into(), e.to_string()))?;
                vm.legacy
                    .get()
                    .ok_or_else(|| SnapshotError::Mismatch("no legacy devices".into()))?
                    .restore(&state)?;
            }
            "vtd" => plan
                .vtd
                .as_ref()
                .ok_or_else(|| SnapshotError::Mismatch("no VT-d unit".into()))?
                .restore_state(&blob)
                .map_err(|e| SnapshotError::Device("vtd".into(), e))?,
            "viommu" => {
                let f = plan
                    .viommu
                    .as_ref()
                    .ok_or_else(|| SnapshotError::Mismatch("no virtio-iommu".into()))?;
                restore_function(f, &blob)?;
            }
            other => {
                return Err(SnapshotError::Mismatch(format!(
                    "unknown device state {other}"
                )))
            }
        }
    }
    Ok(())
}

/// Restore a virtio-pci function's blob, then replay its config-space writes through the
/// bus, as the guest's config cycles were (the bus routes the BAR again).
fn restore_function(f: &PciFunction, blob: &[u8]) -> Result<(), SnapshotError> {
    let writes = lock(&f.dev)
        .restore_state(blob)
        .map_err(|e| SnapshotError::Invalid(format!("PCI function at slot {}: {e}", f.slot)))?;
    for (reg, data) in writes {
        let ecam = u64::from(f.slot) << 15 | u64::from(reg);
        f.bus.ecam_write(ecam, &data);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse, Command};

    fn config(args: &[&str]) -> VmConfig {
        match parse(args.iter().map(|s| s.to_string())) {
            Ok(Command::Run(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_plan_names_what_is_not_saved_and_the_configuration_is_compared() {
        let plain = config(&["--kernel", "k", "--seccomp", "off", "--api-socket", "/s"]);
        assert_eq!(plain.api_socket.as_deref(), Some(Path::new("/s")));
        let p = Plan::new(&plain, None);
        assert!(p.unsupported.is_empty());
        p.check_restorable().unwrap();
        assert_eq!(p.manifest.devices, vec!["legacy".to_string()]);
        let disk = config(&[
            "--kernel",
            "k",
            "--disk",
            "path=/d.img",
            "--restore",
            "/snap",
        ]);
        assert_eq!(disk.restore.as_deref(), Some(Path::new("/snap")));
        let p = Plan::new(&disk, None);
        let e = p.check_restorable().unwrap_err().to_string();
        assert!(e.contains("virtio-blk /d.img"), "{e}");
        assert_ne!(config_string(&plain), config_string(&disk));
        let more_ram = config(&["--kernel", "other", "--memory", "1G"]);
        assert_eq!(
            config_string(&plain),
            config_string(&more_ram),
            "RAM is its own field"
        );
        assert_eq!(
            parse(["ctl", "/s", "pause"].iter().map(|s| s.to_string())).unwrap(),
            Command::Ctl(vec!["/s".into(), "pause".into()])
        );
    }
}

#[cfg(test)]
mod viommu_tests {
    use super::*;
    use pci::test_utils::FakeMsi;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    struct NoIoEvents;

    impl pci::IoEventManager for NoIoEvents {
        fn register(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn unregister(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn function(mem: &GuestMemoryAtomic<GuestMemoryMmap>) -> PciFunction {
        let bus = Arc::new(PciBus::new(pci::PciWindows {
            mmio32: (0xc000_0000, 0x1000_0000),
            mmio64: (1 << 36, 1 << 32),
            io: (0x1000, 0x1000),
        }));
        let mut iommu = viommu::Viommu::new(viommu::ViommuConfig::default()).unwrap();
        iommu.add_endpoint(0x18).unwrap();
        let dev = VirtioPciDevice::new(
            Box::new(iommu),
            mem.clone(),
            Arc::new(FakeMsi::default()),
            Arc::new(NoIoEvents),
        )
        .unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let slot = bus.add_device_at(4, dev.clone()).unwrap();
        PciFunction { bus, slot, dev }
    }

    fn bar(f: &PciFunction) -> u64 {
        pci::PciDevice::bar_address(&*lock(&f.dev), 0).unwrap()
    }

    fn w(f: &PciFunction, off: u64, v: u64, len: usize) {
        assert!(f.bus.mmio_write(bar(f) + off, &v.to_le_bytes()[..len]));
    }

    fn r(f: &PciFunction, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(f.bus.mmio_read(bar(f) + off, &mut b[..len]));
        u64::from_le_bytes(b)
    }

    /// The virtio-iommu's function, as a Linux driver brings it up, through the bus.
    fn bring_up(f: &PciFunction) {
        f.bus
            .ecam_write(u64::from(f.slot) << 15 | 4, &2u16.to_le_bytes());
        w(f, 0x14, 3, 1);
        let features = viommu::Viommu::new(viommu::ViommuConfig::default())
            .map(|d| virtio_dev::VirtioDevice::device_features(&d))
            .unwrap();
        for (sel, word) in [(0u64, features & 0xffff_ffff), (1, features >> 32)] {
            w(f, 0x08, sel, 4);
            w(f, 0x0c, word, 4);
        }
        w(f, 0x14, 0xb, 1);
        for q in 0..2u64 {
            w(f, 0x16, q, 2);
            w(f, 0x18, 16, 2);
            w(f, 0x20, 0x1_0000 * (q + 1), 8);
            w(f, 0x28, 0x1_0000 * (q + 1) + 0x1000, 8);
            w(f, 0x30, 0x1_0000 * (q + 1) + 0x2000, 8);
            w(f, 0x1c, 1, 2);
        }
        w(f, 0x14, 0xf, 1);
    }

    #[test]
    fn the_virtio_iommu_function_restores_through_the_bus() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mem = GuestMemoryAtomic::new(m);
        let src = function(&mem);
        bring_up(&src);
        assert_eq!(r(&src, 0x14, 1), 0xf);
        assert!(lock(&src.dev).activated());
        let blob = lock(&src.dev)
            .save_state()
            .expect("the virtio-iommu saves its state");

        let dst = function(&mem);
        restore_function(&dst, &blob).unwrap();
        assert!(lock(&dst.dev).activated());
        assert_eq!(bar(&dst), bar(&src));
        // The bus decodes the BAR: the driver reads the state it left.
        assert_eq!(r(&dst, 0x14, 1), 0xf);
        w(&dst, 0x16, 1, 2);
        assert_eq!(r(&dst, 0x20, 8), 0x2_0000);
        assert_eq!(lock(&dst.dev).save_state().unwrap(), blob);
        // A corrupt device part is refused by the virtio-iommu itself.
        let mut bad = blob.clone();
        let last = bad.len() - 5;
        bad[last] ^= 0xff;
        let e = restore_function(&function(&mem), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("slot 4"), "{e}");
    }
}
