//! The machine's side of snapshots: what a `Machine` saves (vCPUs, irqchip, PIT, clock, RAM,
//! the legacy devices, the VT-d unit), what it cannot save yet (every PCI device: virtio-blk,
//! virtio-net, the virtio-iommu's transport, VFIO functions), the configuration string a
//! restore is checked against, starting the control socket, and `--restore DIR`.

use std::path::Path;
use std::sync::Arc;

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
            unsupported.push("virtio-iommu (its virtio-pci transport)".to_string());
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
        }
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
            other => {
                return Err(SnapshotError::Mismatch(format!(
                    "unknown device state {other}"
                )))
            }
        }
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
