//! VFIO passthrough of host PCI functions (`--device path=/sys/bus/pci/devices/BDF[,iommu=on]`).
//!
//! [`Passthrough::open`] runs before the virtio-iommu exists, because the IOMMU's geometry
//! comes from the host: it creates the KVM VFIO pseudo device, one legacy type1
//! `VfioContainer` per IOMMU group (a group keeps its own container for the VM's lifetime) and
//! opens every `VfioDevice`; [`Passthrough::viommu_hosts`] then gives the
//! [`HostIommuInfo`] of each container whose devices sit behind the vIOMMU, for
//! `viommu::viommu_config_for`.
//!
//! [`Passthrough::attach`] turns one opened device into a [`VfioPciDevice`] (BARs mapped into
//! the guest with [`KvmMemorySlots`]) and sets up its DMA:
//! - `iommu=on`: the container is mirrored by one [`Shadow`] (shared by every device of the
//!   container), registered with `Viommu::add_host_endpoint(bdf, shadow)`; guest MAP/UNMAP
//!   requests become VFIO_IOMMU_MAP/UNMAP_DMA. Guest-physical addresses in another assigned
//!   device's BAR resolve through [`BarTargets`] (peer-to-peer); when a BAR stops decoding,
//!   moves or resets, [`BarWatch`] tells every shadow, which revokes (or re-points) the host
//!   mappings into it before the device stops decoding.
//! - `iommu=off`: the container holds the static full-RAM mapping ([`StaticMapping`], IOVA ==
//!   GPA) from device creation on. The VMM has no RAM hot-add, so the RAM map never changes;
//!   `StaticMapping::add_region` is the hook for it.

use std::collections::btree_map::{BTreeMap, Entry};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::{Cap, Kvm, VmFd};
use pci::{MsiIrqManager, VfioPciDevice};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioOps};
use viommu::{
    BarTargets, DmaSpace, HostIommuInfo, HostMapError, Prot, Shadow, StaticMapping, VfioDmaSpace,
};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::VfioDeviceConfig;
use crate::memory_slots::KvmMemorySlots;

/// Passthrough setup errors (never caused by the guest).
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// KVM_CREATE_DEVICE(VFIO) failed.
    #[error("creating the KVM VFIO device")]
    KvmDevice(#[source] kvm_ioctls::Error),
    /// The device's IOMMU group could not be read.
    #[error("{}: no IOMMU group; is the IOMMU on and the device bound to vfio-pci?", .0.display())]
    Group(PathBuf, #[source] io::Error),
    /// Opening /dev/vfio/vfio failed.
    #[error("opening a VFIO container")]
    Container(#[source] vfio_ioctls::VfioError),
    /// Opening the device (group into the container, device fd) failed.
    #[error(
        "{}: opening through VFIO failed (driver: {driver}; the function must be bound to \
         vfio-pci; behind a virtio-iommu, vfio_iommu_type1 needs allow_unsafe_interrupts=1)",
        path.display()
    )]
    Device {
        /// The device.
        path: PathBuf,
        /// The host driver it is bound to (`none` if unbound).
        driver: String,
        /// Why.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// The device's container was dropped before the device was attached (a VMM bug).
    #[error("{}: container vanished", .0.display())]
    ContainerGone(PathBuf),
    /// The passthrough function could not be plugged into the PCI bus.
    #[error("{}: plugging", .0.display())]
    Plug(PathBuf, #[source] pci::PciError),
    /// Two devices of one group disagree on `iommu=`.
    #[error("{0}: IOMMU group {1} mixes iommu=on and iommu=off devices")]
    MixedGroup(PathBuf, u32),
    /// VFIO_IOMMU_GET_INFO failed.
    #[error("group {0}: VFIO_IOMMU_GET_INFO")]
    Info(u32, #[source] io::Error),
    /// The passthrough PCI function could not be built.
    #[error("{}", .0.display())]
    Pci(PathBuf, #[source] pci::VfioPciError),
    /// The static full-RAM mapping failed.
    #[error("{}: static DMA mapping of guest RAM", .0.display())]
    StaticMap(PathBuf, #[source] viommu::HostMapError),
    /// The device is behind the vIOMMU but there is none.
    #[error("{0}: iommu=on needs --viommu virtio")]
    NoViommu(PathBuf),
}

/// Host DMA calls made by the VMM into every VFIO container of the VM (all successful and
/// failed `VFIO_IOMMU_MAP_DMA` / `UNMAP_DMA` ioctls), for the exit summary.
#[derive(Debug, Default)]
pub struct DmaCounters {
    /// Map calls.
    pub maps: AtomicU64,
    /// Unmap calls.
    pub unmaps: AtomicU64,
    /// Calls the host refused.
    pub failures: AtomicU64,
}

impl DmaCounters {
    /// `vfio: host_maps=N host_unmaps=N host_failures=N` (one line, parsed by tests).
    pub fn summary_line(&self) -> String {
        format!(
            "vfio: host_maps={} host_unmaps={} host_failures={}",
            self.maps.load(Ordering::Relaxed),
            self.unmaps.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed)
        )
    }
}

/// A container's DMA space that counts the calls made into it.
struct Counted {
    inner: Arc<dyn DmaSpace>,
    counters: Arc<DmaCounters>,
}

impl Counted {
    fn tally<T>(&self, r: Result<T, HostMapError>) -> Result<T, HostMapError> {
        if r.is_err() {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl DmaSpace for Counted {
    unsafe fn map(
        &self,
        iova: u64,
        size: u64,
        host_addr: u64,
        prot: Prot,
    ) -> Result<(), HostMapError> {
        self.counters.maps.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded from this function's contract.
        let r = unsafe { self.inner.map(iova, size, host_addr, prot) };
        self.tally(r)
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), HostMapError> {
        self.counters.unmaps.fetch_add(1, Ordering::Relaxed);
        let r = self.inner.unmap(iova, size);
        self.tally(r)
    }
}

/// A container's `VfioDmaSpace` that classifies a failed map with the host ranges read at
/// open, so that no `VFIO_IOMMU_GET_INFO` is issued while the VM runs (the vCPU threads'
/// seccomp filter allows only the map and unmap ioctls; `VfioDmaSpace::map` queries the ranges
/// lazily on its first EINVAL).
struct Prequeried {
    space: Arc<VfioDmaSpace>,
    info: HostIommuInfo,
}

impl DmaSpace for Prequeried {
    unsafe fn map(
        &self,
        iova: u64,
        size: u64,
        host_addr: u64,
        prot: Prot,
    ) -> Result<(), HostMapError> {
        // SAFETY: forwarded from this function's contract.
        let Err(e) = (unsafe { self.space.map_raw(iova, size, host_addr, prot) }) else {
            return Ok(());
        };
        virtio_dev::guest_warn!("vfio: map {iova:#x}+{size:#x} -> {host_addr:#x}: {e}");
        let last = iova.saturating_add(size.saturating_sub(1));
        let in_range = !self.info.iova_ranges.is_empty() && self.info.contains(iova, last);
        Err(match e.raw_os_error() {
            Some(libc::EEXIST) => HostMapError::Invalid,
            Some(libc::ENOSPC) | Some(libc::ENOMEM) => {
                virtio_dev::guest_warn!(
                    "vfio: the container is out of mappings or locked memory (type1 \
                     dma_entry_limit defaults to 65535; RLIMIT_MEMLOCK)"
                );
                HostMapError::NoSpace
            }
            Some(libc::EINVAL) if !in_range => HostMapError::OutOfRange,
            _ => HostMapError::Failed(format!("VFIO_IOMMU_MAP_DMA: {e}")),
        })
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), HostMapError> {
        self.space.unmap(iova, size)
    }
}

/// One legacy type1 container (one IOMMU group) and what mirrors guest DMA into it.
struct Container {
    /// Kept open for the VM's lifetime.
    #[allow(dead_code)]
    container: Arc<VfioContainer>,
    space: Arc<dyn DmaSpace>,
    iommu: bool,
    info: HostIommuInfo,
    shadow: Option<Arc<Shadow>>,
    statics: Option<StaticMapping>,
}

/// A device opened into its container, waiting for [`Passthrough::attach`].
struct Opened {
    config: VfioDeviceConfig,
    group: u32,
    device: Arc<VfioDevice>,
}

/// DMA setup of one attached device, for the caller (the machine) to finish.
pub enum DmaSetup {
    /// Register this shadow as the endpoint's host mapper (`Viommu::add_host_endpoint`).
    Translated(Arc<Shadow>),
    /// Static full-RAM mapping installed; nothing to register.
    Static,
}

/// Every assigned device of a VM and its host address spaces.
pub struct Passthrough {
    containers: BTreeMap<u32, Container>,
    pending: Vec<Opened>,
    bars: Arc<BarTargets>,
    slots: Arc<KvmMemorySlots>,
    counters: Arc<DmaCounters>,
    /// Every opened device, never dropped (see the `Drop` impl).
    devices: Vec<Arc<VfioDevice>>,
    /// Kept open for the VM's lifetime (the containers hold a handle too).
    #[allow(dead_code)]
    kvm_vfio: Option<Arc<VfioDeviceFd>>,
}

impl Passthrough {
    /// Open every device of `configs` into its group's container (no device: nothing opened,
    /// no KVM VFIO device).
    pub fn open(
        kvm: &Kvm,
        vm: &Arc<VmFd>,
        configs: &[VfioDeviceConfig],
    ) -> Result<Self, VfioError> {
        let max_slots = u32::try_from(kvm.get_nr_memslots()).unwrap_or(u32::MAX);
        let slots = Arc::new(KvmMemorySlots::new(
            vm.clone(),
            max_slots,
            vm.check_extension(Cap::ReadonlyMem),
        ));
        let mut p = Passthrough {
            containers: BTreeMap::new(),
            pending: Vec::new(),
            bars: Arc::new(BarTargets::new()),
            slots,
            counters: Arc::new(DmaCounters::default()),
            devices: Vec::new(),
            kvm_vfio: None,
        };
        if configs.is_empty() {
            return Ok(p);
        }
        let mut dev = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let fd = vm.create_device(&mut dev).map_err(VfioError::KvmDevice)?;
        let handle = Arc::new(VfioDeviceFd::new_from_kvm(fd));
        p.kvm_vfio = Some(handle.clone());
        for c in configs {
            p.open_one(c, &handle)?;
        }
        Ok(p)
    }

    fn open_one(
        &mut self,
        config: &VfioDeviceConfig,
        handle: &Arc<VfioDeviceFd>,
    ) -> Result<(), VfioError> {
        let path = &config.path;
        let group = pci::iommu_group(path).map_err(|e| VfioError::Group(path.to_path_buf(), e))?;
        if let Some(c) = self.containers.get(&group) {
            if c.iommu != config.iommu {
                return Err(VfioError::MixedGroup(path.to_path_buf(), group));
            }
        }
        let new_container = match self.containers.get(&group) {
            Some(c) => c.container.clone(),
            None => {
                Arc::new(VfioContainer::new(Some(handle.clone())).map_err(VfioError::Container)?)
            }
        };
        let ops: Arc<dyn VfioOps> = new_container.clone();
        let device = VfioDevice::new(path, ops, false).map_err(|source| VfioError::Device {
            path: path.to_path_buf(),
            driver: bound_driver(path),
            source,
        })?;
        if let Entry::Vacant(slot) = self.containers.entry(group) {
            let vfio = Arc::new(VfioDmaSpace::new(new_container.clone()));
            let info = vfio.query_info().map_err(|e| VfioError::Info(group, e))?;
            let space: Arc<dyn DmaSpace> = Arc::new(Counted {
                inner: Arc::new(Prequeried {
                    space: vfio,
                    info: info.clone(),
                }),
                counters: self.counters.clone(),
            });
            log::info!(
                "vfio: group {group}: host IOMMU page sizes {:#x}, IOVA ranges {:x?}, \
                 dma_avail {:?}",
                info.page_sizes,
                info.iova_ranges,
                info.dma_avail
            );
            slot.insert(Container {
                container: new_container,
                space,
                iommu: config.iommu,
                info,
                shadow: None,
                statics: None,
            });
        }
        log::info!(
            "vfio: opened {} (group {group}, {})",
            path.display(),
            if config.iommu {
                "behind the virtio-iommu"
            } else {
                "static full-RAM mapping"
            }
        );
        let device = Arc::new(device);
        self.devices.push(device.clone());
        self.pending.push(Opened {
            config: config.clone(),
            group,
            device,
        });
        Ok(())
    }

    /// The host IOMMU limits of every container whose devices sit behind the vIOMMU.
    pub fn viommu_hosts(&self) -> Vec<HostIommuInfo> {
        self.containers
            .values()
            .filter(|c| c.iommu)
            .map(|c| c.info.clone())
            .collect()
    }

    /// Whether any opened device sits behind the vIOMMU.
    pub fn any_translated(&self) -> bool {
        self.containers.values().any(|c| c.iommu)
    }

    /// Devices opened and not attached yet: (sysfs path, iommu=on).
    pub fn pending(&self) -> Vec<(PathBuf, bool)> {
        self.pending
            .iter()
            .map(|o| (o.config.path.clone(), o.config.iommu))
            .collect()
    }

    /// The shared resolver of every assigned device's BARs (peer-to-peer DMA).
    pub fn bar_targets(&self) -> Arc<BarTargets> {
        self.bars.clone()
    }

    /// Host DMA calls into the containers so far.
    pub fn dma_counters(&self) -> Arc<DmaCounters> {
        self.counters.clone()
    }

    /// The KVM memory slots used for BARs.
    pub fn memory_slots(&self) -> Arc<KvmMemorySlots> {
        self.slots.clone()
    }

    /// Build the next pending device as a PCI function (the caller plugs it) and set up its
    /// DMA. Returns `None` when every device is attached.
    pub fn attach_next(
        &mut self,
        msi: Arc<dyn MsiIrqManager>,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> Option<Result<(PathBuf, VfioPciDevice, DmaSetup), VfioError>> {
        if self.pending.is_empty() {
            return None;
        }
        let o = self.pending.remove(0);
        Some(self.attach(o, msi, mem))
    }

    fn attach(
        &mut self,
        o: Opened,
        msi: Arc<dyn MsiIrqManager>,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> Result<(PathBuf, VfioPciDevice, DmaSetup), VfioError> {
        let path = o.config.path.clone();
        let dev = VfioPciDevice::from_vfio_device(o.device, msi, self.slots.clone())
            .map_err(|e| VfioError::Pci(path.clone(), e))?;
        self.bars.add(Arc::new(DeviceBars(dev.bar_maps())));
        dev.bar_maps()
            .set_observer(Arc::new(BarWatch(self.bars.clone())));
        let c = self
            .containers
            .get_mut(&o.group)
            .ok_or_else(|| VfioError::ContainerGone(path.clone()))?;
        let setup = if c.iommu {
            let bars = &self.bars;
            let shadow = c.shadow.get_or_insert_with(|| {
                let s = Arc::new(
                    Shadow::new(c.space.clone(), mem.clone())
                        .with_bars(bars.clone())
                        .with_config(c.info.shadow_config()),
                );
                bars.watch(&s);
                s
            });
            DmaSetup::Translated(shadow.clone())
        } else {
            if c.statics.is_none() {
                let m = StaticMapping::new(c.space.clone(), &*mem.memory())
                    .map_err(|e| VfioError::StaticMap(path.clone(), e))?;
                log::info!(
                    "vfio: group {}: guest RAM mapped IOVA == GPA in {} host mapping(s)",
                    o.group,
                    m.ranges().len()
                );
                c.statics = Some(m);
            }
            DmaSetup::Static
        };
        Ok((path, dev, setup))
    }
}

impl Drop for Passthrough {
    /// The opened `VfioDevice`s are leaked on purpose: their groups, containers and device fds
    /// are closed by the kernel when the process exits. `vfio_ioctls::VfioDevice::drop` reads
    /// the device's sysfs `iommu_group` link (readlink, which the main thread's seccomp filter
    /// forbids once the VM runs) and unwraps the result (a panic if the device vanished).
    /// The passthrough PCI functions themselves are dropped normally (BAR slots removed,
    /// interrupts disabled).
    fn drop(&mut self) {
        for d in self.devices.drain(..) {
            std::mem::forget(d);
        }
    }
}

/// The host driver `path` is bound to (`none` if unbound), for a failed `VfioDevice::new`.
fn bound_driver(path: &Path) -> String {
    std::fs::read_link(path.join("driver"))
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "none".into())
}

/// One passthrough device's BAR mmaps as a peer-to-peer target of the vIOMMU's shadow.
struct DeviceBars(Arc<pci::VfioBarMaps>);

// SAFETY: `VfioBarMaps` lists the VFIO region mmaps of a passthrough device's BARs: device
// memory shared with the guest, never reached through Rust references.
unsafe impl viommu::BarResolver for DeviceBars {
    fn resolve(&self, gpa: u64) -> Option<(u64, u64)> {
        self.0.mappings().into_iter().find_map(|m| {
            let off = gpa.checked_sub(m.gpa)?;
            (off < m.size).then(|| Some((m.host_addr.checked_add(off)?, m.size - off)))?
        })
    }
}

/// Forwards a passthrough device's BAR changes (decode off/on, moves, resets) to every shadow
/// resolving through the shared [`BarTargets`]: the PCI side knows nothing of the vIOMMU.
struct BarWatch(Arc<BarTargets>);

impl pci::BarObserver for BarWatch {
    fn bars_changed(&self, removed: &[pci::BarMapping], added: &[pci::BarMapping]) {
        let ranges: Vec<(u64, u64)> = removed
            .iter()
            .chain(added)
            .filter(|m| m.size > 0)
            .map(|m| (m.gpa, m.gpa.saturating_add(m.size - 1)))
            .collect();
        self.0.changed(&ranges);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfio_bar_maps_resolver_without_mappings_resolves_nothing() {
        use viommu::BarResolver;
        let maps = DeviceBars(Arc::new(pci::VfioBarMaps::default()));
        assert_eq!(maps.resolve(0x2_0000_0000), None);
    }

    /// Peer-to-peer DMA into an assigned device's BAR (the fake VFIO device of the pci tests,
    /// wired as `Passthrough::attach` wires it) through a shadow on the recording mapper:
    /// decode off, FLR and a BAR move revoke the host mapping, decode on brings it back.
    #[test]
    fn iova_mappings_into_a_bar_follow_its_decoding_resets_and_moves() {
        use pci::test_utils::{FakeMsi, FakeSlots, FakeVfio};
        use pci::PciDevice;
        use viommu::test_utils::RecordingMapper;
        use viommu::HostMapper;
        let fake = Arc::new(FakeVfio::new());
        let mut dev = VfioPciDevice::new(
            fake.clone(),
            Arc::new(FakeMsi::default()),
            Arc::new(FakeSlots::default()),
        )
        .unwrap();
        let bars = Arc::new(BarTargets::new());
        bars.add(Arc::new(DeviceBars(dev.bar_maps())));
        dev.bar_maps()
            .set_observer(Arc::new(BarWatch(bars.clone())));
        let rec = Arc::new(RecordingMapper::new());
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x10_0000)]).unwrap(),
        );
        let shadow = Arc::new(Shadow::new(rec.clone(), mem).with_bars(bars.clone()));
        bars.watch(&shadow);
        // BAR 3 (its mmappable page at offset 0x1000) at 0xe000_0000, memory decode on.
        dev.bar_assigned(3, 0xe000_0000);
        dev.config_write(0x04, &[0x06, 0x00]);
        let bar3 = |d: &VfioPciDevice| d.bar_maps().mappings().into_iter().find(|m| m.bar == 3);
        let host = bar3(&dev).unwrap().host_addr;
        shadow
            .map(0x4000_0000, 0x1000, 0xe000_1000, Prot::RW)
            .unwrap();
        let mapped = || rec.mappings().get(&0x4000_0000).map(|&(_, h, _)| h);
        assert_eq!(mapped(), Some(host));
        // Memory decode off: revoked.
        dev.config_write(0x04, &[0x04, 0x00]);
        assert_eq!(mapped(), None, "DMA into a BAR that does not decode");
        dev.config_write(0x04, &[0x06, 0x00]);
        assert_eq!(mapped(), Some(host));
        // FLR (PCIe Device Control at 0x78 with Initiate FLR): revoked before the reset.
        dev.config_write(0x78, &[0x10, 0xa8]);
        assert_eq!(*fake.resets.lock().unwrap(), 1);
        assert_eq!(mapped(), None, "DMA into a BAR across a reset");
        dev.config_write(0x04, &[0x06, 0x00]);
        assert_eq!(mapped(), Some(host));
        // The BAR moves: the old guest-physical address reaches nothing.
        dev.config_write(0x1c, &0xd000_0000u32.to_le_bytes());
        assert_eq!(bar3(&dev).unwrap().gpa, 0xd000_1000);
        assert_eq!(mapped(), None, "DMA into a BAR that moved away");
        // The guest's UNMAP of the revoked mapping still succeeds.
        shadow.unmap(0x4000_0000, 0x1000).unwrap();
        assert!(rec.mappings().is_empty());
    }

    #[test]
    fn counted_space_counts_every_call_and_failure() {
        use viommu::test_utils::RecordingMapper;
        let rec = Arc::new(RecordingMapper::new());
        let counters = Arc::new(DmaCounters::default());
        let space = Counted {
            inner: rec.clone(),
            counters: counters.clone(),
        };
        // SAFETY: the recording mapper never touches host memory.
        unsafe {
            space.map(0x1000, 0x1000, 0x7000_0000, Prot::RW).unwrap();
            // Overlap: refused by the mapper, still one call.
            assert!(space.map(0x1000, 0x2000, 0x7000_0000, Prot::RW).is_err());
        }
        space.unmap(0x1000, 0x1000).unwrap();
        assert!(space.unmap(0x1000, 0x1000).is_err());
        assert_eq!(rec.ops().len(), 2);
        assert_eq!(
            counters.summary_line(),
            "vfio: host_maps=2 host_unmaps=2 host_failures=2"
        );
    }

    #[test]
    fn prequeried_space_reports_host_failures_without_panicking() {
        // Not a container: every ioctl fails with ENOTTY, which is neither a conflict, nor a
        // lack of space, nor out of range.
        let null = Arc::new(std::fs::File::open("/dev/null").unwrap());
        let space = Prequeried {
            space: Arc::new(VfioDmaSpace::new(null)),
            info: HostIommuInfo {
                iova_ranges: vec![(0, 0xffff_ffff)],
                ..HostIommuInfo::default()
            },
        };
        let buf = [0u8; 4096];
        // SAFETY: the ioctl fails; nothing is mapped.
        let r = unsafe { space.map(0x1000, 0x1000, buf.as_ptr() as u64, Prot::RW) };
        assert!(matches!(r, Err(HostMapError::Failed(_))), "{r:?}");
        assert!(space.unmap(0x1000, 0x1000).is_err());
    }

    #[test]
    fn no_devices_opens_nothing() {
        let Some(kvm) = crate::skip::kvm_or_skip("vfio::no_devices_opens_nothing") else {
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        let p = Passthrough::open(&kvm, &vm, &[]).unwrap();
        assert!(p.viommu_hosts().is_empty());
        assert!(!p.any_translated());
        assert!(p.pending().is_empty());
        assert!(p.kvm_vfio.is_none());
    }

    #[test]
    fn a_missing_device_is_a_clear_error() {
        let Some(kvm) = crate::skip::kvm_or_skip("vfio::a_missing_device_is_a_clear_error") else {
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        let cfg = VfioDeviceConfig {
            path: "/sys/bus/pci/devices/ffff:ff:1f.7".into(),
            iommu: false,
        };
        // KVM_CREATE_DEVICE(VFIO) needs the kvm VFIO support; either error is a clean one.
        match Passthrough::open(&kvm, &vm, &[cfg]) {
            Err(VfioError::Group(p, _)) => assert!(p.ends_with("ffff:ff:1f.7")),
            Err(VfioError::KvmDevice(_)) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a missing device opened"),
        }
    }
}
