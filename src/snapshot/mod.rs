//! Snapshot and restore of a paused VM into a directory:
//!
//! ```text
//! DIR/manifest.json   format version, vCPU count, RAM size, irqchip, the configuration the
//!                     VM was started with (checked on restore), device blob names
//! DIR/vcpu-N.json     each vCPU (`vcpu::VcpuState`)
//! DIR/vm.json         in-kernel irqchip (PIC, IOAPIC), PIT and kvmclock (`VmState`)
//! DIR/memory.bin      guest RAM, sparse (`memory`)
//! DIR/dev-NAME.bin    each device's own blob (viommu's versioned, checksummed format)
//! ```
//! Every file is size-capped before it is read, every value checked before it is used; KVM
//! checks what it loads. See docs/snapshot.md.

pub mod api;
pub mod controller;
pub mod legacy;
pub mod machine;
pub mod memory;
pub mod pause;
pub mod vcpu;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The manifest's format version (the only one read).
pub const FORMAT_VERSION: u32 = 1;
/// Largest JSON file read (manifest, vCPU, VM state).
pub const MAX_JSON_BYTES: u64 = 4 << 20;
/// Largest device blob read (a vIOMMU with a million mappings is ~25 MiB).
pub const MAX_DEVICE_BYTES: u64 = 256 << 20;
/// Most device blobs one snapshot names.
pub const MAX_DEVICES: usize = 256;

/// Why saving or restoring failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing the snapshot directory.
    #[error("snapshot I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A JSON file does not parse (or holds values of the wrong shape).
    #[error("snapshot file {0}: {1}")]
    Json(String, String),
    /// A KVM ioctl failed (on restore: KVM refused the saved value).
    #[error("{0} failed: errno {1}")]
    Kvm(&'static str, i32),
    /// A value is not one a VM could have had.
    #[error("invalid snapshot: {0}")]
    Invalid(String),
    /// The snapshot does not fit the VM it is restored into.
    #[error("snapshot does not match this VM: {0}")]
    Mismatch(String),
    /// A device refused its state.
    #[error("device {0}: {1}")]
    Device(String, viommu::snapshot::SnapshotError),
}

/// What `manifest.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM bytes.
    pub memory: u64,
    /// In-kernel irqchip and PIT.
    pub irqchip: bool,
    /// The device configuration the VM was started with (its arguments, normalised); restore
    /// needs the same.
    pub config: String,
    /// Names of the device blobs (`dev-NAME.bin`).
    pub devices: Vec<String>,
}

/// The VM-wide in-kernel state.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Option<[kvm_irqchip; 3]>,
    /// The PIT.
    pub pit: Option<kvm_pit_state2>,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |e| SnapshotError::Kvm(what, e.errno())
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    /// Read the VM's irqchip, PIT and clock.
    pub fn save(fd: &VmFd, irqchip: bool) -> Result<Self, SnapshotError> {
        let (irqchips, pit) = if irqchip {
            let mut chips = [kvm_irqchip::default(); 3];
            for (c, id) in chips.iter_mut().zip(CHIPS) {
                c.chip_id = id;
                fd.get_irqchip(c).map_err(kvm("KVM_GET_IRQCHIP"))?;
            }
            (
                Some(chips),
                Some(fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?),
            )
        } else {
            (None, None)
        };
        Ok(VmState {
            irqchips,
            pit,
            clock: fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
        })
    }

    /// Load it into a VM created with the same irqchip setting.
    pub fn restore(&self, fd: &VmFd, irqchip: bool) -> Result<(), SnapshotError> {
        if self.irqchips.is_some() != irqchip || self.pit.is_some() != irqchip {
            return Err(SnapshotError::Mismatch(
                "in-kernel irqchip on one side only".into(),
            ));
        }
        if let Some(chips) = &self.irqchips {
            for (c, id) in chips.iter().zip(CHIPS) {
                if c.chip_id != id {
                    return Err(SnapshotError::Invalid(format!(
                        "irqchip {} saved as chip {id}",
                        c.chip_id
                    )));
                }
                fd.set_irqchip(c).map_err(kvm("KVM_SET_IRQCHIP"))?;
            }
        }
        if let Some(p) = &self.pit {
            fd.set_pit2(p).map_err(kvm("KVM_SET_PIT2"))?;
        }
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

/// Read `path` whole, refusing files over `max` bytes.
pub fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, SnapshotError> {
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len > max {
        return Err(SnapshotError::Invalid(format!(
            "{} is {len} bytes (at most {max})",
            path.display()
        )));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(SnapshotError::Invalid(format!("{} grew", path.display())));
    }
    Ok(buf)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, SnapshotError> {
    let bytes = read_capped(path, MAX_JSON_BYTES)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| SnapshotError::Json(path.display().to_string(), e.to_string()))
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), SnapshotError> {
    let bytes = serde_json::to_vec(v)
        .map_err(|e| SnapshotError::Json(path.display().to_string(), e.to_string()))?;
    std::fs::write(path, bytes)?;
    Ok(())
}

/// Whether `name` may name a device blob (letters, digits, `-`, `_`, `.`; no path).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A snapshot directory.
#[derive(Clone, Debug)]
pub struct SnapshotDir {
    dir: PathBuf,
}

impl SnapshotDir {
    /// The snapshot at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SnapshotDir { dir: dir.into() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Create the directory (it must not hold a snapshot already).
    pub fn create(&self) -> Result<(), SnapshotError> {
        std::fs::create_dir_all(&self.dir)?;
        if self.path("manifest.json").exists() {
            return Err(SnapshotError::Invalid(format!(
                "{} already holds a snapshot",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Write the manifest (last: a directory without one is not a snapshot).
    pub fn write_manifest(&self, m: &Manifest) -> Result<(), SnapshotError> {
        for d in &m.devices {
            if !valid_name(d) {
                return Err(SnapshotError::Invalid(format!("device name {d:?}")));
            }
        }
        write_json(&self.path("manifest.json"), m)
    }

    /// Read and check the manifest against this build and `expected` (cpus, memory, irqchip,
    /// configuration and device blobs of the VM restored into).
    pub fn read_manifest(&self, expected: &Manifest) -> Result<Manifest, SnapshotError> {
        let m: Manifest = read_json(&self.path("manifest.json"))?;
        if m.version != FORMAT_VERSION {
            return Err(SnapshotError::Invalid(format!(
                "format version {}, this build reads {FORMAT_VERSION}",
                m.version
            )));
        }
        if m.devices.len() > MAX_DEVICES || !m.devices.iter().all(|d| valid_name(d)) {
            return Err(SnapshotError::Invalid("device list".into()));
        }
        let mut mismatches = Vec::new();
        if m.cpus != expected.cpus {
            mismatches.push(format!("{} vCPUs saved, {} given", m.cpus, expected.cpus));
        }
        if m.memory != expected.memory {
            mismatches.push(format!(
                "{} bytes of RAM saved, {} given",
                m.memory, expected.memory
            ));
        }
        if m.irqchip != expected.irqchip {
            mismatches.push("in-kernel irqchip differs".into());
        }
        if m.config != expected.config {
            mismatches.push(format!(
                "devices saved as `{}`, given `{}`",
                m.config, expected.config
            ));
        }
        if m.devices != expected.devices {
            mismatches.push(format!(
                "device states saved {:?}, this VM has {:?}",
                m.devices, expected.devices
            ));
        }
        if !mismatches.is_empty() {
            return Err(SnapshotError::Mismatch(mismatches.join("; ")));
        }
        Ok(m)
    }

    /// Write vCPU `s.id`'s state.
    pub fn write_vcpu(&self, s: &vcpu::VcpuState) -> Result<(), SnapshotError> {
        write_json(&self.path(&format!("vcpu-{}.json", s.id)), s)
    }

    /// Read vCPU `id`'s state.
    pub fn read_vcpu(&self, id: u8) -> Result<vcpu::VcpuState, SnapshotError> {
        let s: vcpu::VcpuState = read_json(&self.path(&format!("vcpu-{id}.json")))?;
        if s.id != id {
            return Err(SnapshotError::Invalid(format!(
                "vcpu-{id}.json holds vCPU {}",
                s.id
            )));
        }
        Ok(s)
    }

    /// Write the VM-wide state.
    pub fn write_vm(&self, s: &VmState) -> Result<(), SnapshotError> {
        write_json(&self.path("vm.json"), s)
    }

    /// Read the VM-wide state.
    pub fn read_vm(&self) -> Result<VmState, SnapshotError> {
        read_json(&self.path("vm.json"))
    }

    /// Write guest RAM; returns the pages written.
    pub fn write_memory<M>(&self, mem: &M) -> Result<u64, SnapshotError>
    where
        M: vm_memory::GuestMemoryBackend + vm_memory::GuestMemory,
    {
        memory::save(mem, std::fs::File::create(self.path("memory.bin"))?)
    }

    /// Load guest RAM into a fresh VM's memory.
    pub fn read_memory<M>(&self, mem: &M) -> Result<u64, SnapshotError>
    where
        M: vm_memory::GuestMemoryBackend + vm_memory::GuestMemory,
    {
        memory::restore(mem, std::fs::File::open(self.path("memory.bin"))?)
    }

    /// Write one device's blob.
    pub fn write_device(&self, name: &str, blob: &[u8]) -> Result<(), SnapshotError> {
        if !valid_name(name) {
            return Err(SnapshotError::Invalid(format!("device name {name:?}")));
        }
        std::fs::write(self.path(&format!("dev-{name}.bin")), blob)?;
        Ok(())
    }

    /// Read one device's blob (size-capped; its own format checks the rest).
    pub fn read_device(&self, name: &str) -> Result<Vec<u8>, SnapshotError> {
        if !valid_name(name) {
            return Err(SnapshotError::Invalid(format!("device name {name:?}")));
        }
        read_capped(&self.path(&format!("dev-{name}.bin")), MAX_DEVICE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            version: FORMAT_VERSION,
            cpus: 2,
            memory: 512 << 20,
            irqchip: true,
            config: "--disk a.img --viommu".into(),
            devices: vec!["viommu".into(), "virtio-blk.0".into()],
        }
    }

    #[test]
    fn the_manifest_is_checked_against_the_vm_restored_into() {
        let dir = std::env::temp_dir().join(format!("vmm-snap-manifest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = SnapshotDir::new(&dir);
        s.create().unwrap();
        s.write_manifest(&manifest()).unwrap();
        assert!(s.create().is_err(), "a snapshot is not overwritten");
        assert_eq!(s.read_manifest(&manifest()).unwrap(), manifest());
        let other = Manifest {
            config: "--disk b.img".into(),
            cpus: 1,
            ..manifest()
        };
        let e = s.read_manifest(&other).unwrap_err().to_string();
        assert!(e.contains("vCPUs") && e.contains("--disk b.img"), "{e}");
        std::fs::write(dir.join("manifest.json"), b"{\"version\": 1, \"cpus\": ").unwrap();
        assert!(matches!(
            s.read_manifest(&manifest()),
            Err(SnapshotError::Json(..))
        ));
        std::fs::write(
            dir.join("manifest.json"),
            vec![b' '; MAX_JSON_BYTES as usize + 1],
        )
        .unwrap();
        assert!(matches!(
            s.read_manifest(&manifest()),
            Err(SnapshotError::Invalid(_))
        ));
        assert!(s.write_device("../escape", b"x").is_err());
        assert!(s.read_device("a/b").is_err());
        s.write_device("viommu", b"blob").unwrap();
        assert_eq!(s.read_device("viommu").unwrap(), b"blob");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
