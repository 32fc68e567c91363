//! What the control socket drives: pause and resume through the VM's [`PauseGate`], and the
//! snapshot of a paused VM (vCPUs saved on their own threads, then the VM-wide state, guest
//! RAM, each device's blob and the manifest last); and [`restore`], which loads one into a VM
//! built with the same configuration before any vCPU runs.
//!
//! [`PauseGate`]: super::pause::PauseGate

use std::path::Path;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::api::VmActions;
use super::vcpu::VcpuState;
use super::{Manifest, SnapshotDir, SnapshotError, VmState};
use crate::lifecycle::VmControl;
use crate::vcpu::Vcpu;

/// Saves one device's state (called while the VM is paused).
pub type DeviceSaver = Box<dyn Fn() -> Vec<u8> + Send + Sync>;

/// The VM as the control socket sees it.
pub struct Controller {
    control: Arc<VmControl>,
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    msrs: Vec<u32>,
    manifest: Manifest,
    devices: Vec<(String, DeviceSaver)>,
    /// Devices whose state is not saved yet: snapshot refuses while there is one.
    unsupported: Vec<String>,
}

impl Controller {
    /// A controller for the VM described by `manifest` (its `devices` are filled from the
    /// savers added); `msrs` from [`super::vcpu::msr_list`].
    pub fn new(
        control: Arc<VmControl>,
        vm_fd: Arc<VmFd>,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
        msrs: Vec<u32>,
        manifest: Manifest,
    ) -> Self {
        Controller {
            control,
            vm_fd,
            memory,
            msrs,
            manifest,
            devices: Vec::new(),
            unsupported: Vec::new(),
        }
    }

    /// Save device `name` with `saver` in every snapshot.
    pub fn add_device(&mut self, name: &str, saver: DeviceSaver) {
        self.devices.push((name.to_string(), saver));
    }

    /// Device `what` has state no snapshot saves yet: snapshots are refused, naming it.
    pub fn add_unsupported(&mut self, what: &str) {
        self.unsupported.push(what.to_string());
    }

    fn save(&self, dir: &Path) -> Result<(), SnapshotError> {
        if !self.control.pause.is_paused() {
            return Err(SnapshotError::Invalid(
                "the VM must be paused first (vmm ctl SOCKET pause)".into(),
            ));
        }
        if !self.unsupported.is_empty() {
            return Err(SnapshotError::Invalid(format!(
                "the state of {} is not saved yet (docs/snapshot.md)",
                self.unsupported.join(", ")
            )));
        }
        let snap = SnapshotDir::new(dir);
        snap.create()?;
        let msrs = self.msrs.clone();
        let irqchip = self.manifest.irqchip;
        let states = self
            .control
            .pause
            .on_each(move |id, fd| {
                let s = VcpuState::save(id, fd, &msrs, irqchip).map_err(|e| e.to_string())?;
                serde_json::to_vec(&s).map_err(|e| e.to_string())
            })
            .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        if states.len() != usize::from(self.manifest.cpus) {
            return Err(SnapshotError::Invalid(format!(
                "{} of {} vCPUs saved",
                states.len(),
                self.manifest.cpus
            )));
        }
        for (id, s) in states {
            let bytes = s.map_err(|e| SnapshotError::Invalid(format!("vCPU {id}: {e}")))?;
            std::fs::write(dir.join(format!("vcpu-{id}.json")), bytes)?;
        }
        snap.write_vm(&VmState::save(&self.vm_fd, irqchip)?)?;
        let pages = snap.write_memory(&*self.memory.memory())?;
        let mut manifest = self.manifest.clone();
        manifest.devices.clear();
        for (name, saver) in &self.devices {
            snap.write_device(name, &saver())?;
            manifest.devices.push(name.clone());
        }
        snap.write_manifest(&manifest)?;
        log::info!(
            "snapshot: {} vCPUs, {pages} RAM pages, devices {:?} saved to {}",
            manifest.cpus,
            manifest.devices,
            dir.display()
        );
        Ok(())
    }
}

impl VmActions for Controller {
    fn pause(&self) -> Result<(), String> {
        self.control
            .pause
            .pause(crate::vm::kick_signal())
            .map_err(|e| e.to_string())
    }

    fn resume(&self) -> Result<(), String> {
        self.control.pause.resume().map_err(|e| e.to_string())
    }

    fn snapshot(&self, dir: &Path) -> Result<(), String> {
        self.save(dir).map_err(|e| e.to_string())
    }

    fn paused(&self) -> bool {
        self.control.pause.is_paused()
    }
}

/// Load the snapshot in `dir` into a VM built like the saved one (`expected`: its cpus,
/// memory, irqchip and configuration) whose vCPUs are created but have not run: RAM, the
/// VM-wide state, then every vCPU. Returns the manifest (its device blobs are the caller's to
/// restore, before any vCPU runs).
pub fn restore(
    dir: &Path,
    vm_fd: &VmFd,
    memory: &GuestMemoryMmap,
    vcpus: &[Vcpu],
    expected: &Manifest,
) -> Result<(SnapshotDir, Manifest), SnapshotError> {
    let snap = SnapshotDir::new(dir);
    let manifest = snap.read_manifest(expected)?;
    if vcpus.len() != usize::from(manifest.cpus) {
        return Err(SnapshotError::Mismatch(format!(
            "{} vCPUs saved, {} created",
            manifest.cpus,
            vcpus.len()
        )));
    }
    let pages = snap.read_memory(memory)?;
    snap.read_vm()?.restore(vm_fd, manifest.irqchip)?;
    for v in vcpus {
        snap.read_vcpu(v.id)?.restore(&v.fd, manifest.irqchip)?;
    }
    log::info!(
        "restore: {} vCPUs, {pages} RAM pages from {}",
        manifest.cpus,
        dir.display()
    );
    Ok((snap, manifest))
}
