//! What a VFIO PCI passthrough device needs from the host device, as a trait: region
//! information, region reads and writes, BAR mmaps, interrupt eventfds and reset.
//!
//! [`VfioDeviceBackend`] is the thin adapter over an opened `vfio_ioctls::VfioDevice`; unit tests
//! drive [`crate::vfio_pci::VfioPciDevice`] with a fake. The container, group and DMA mappings
//! are not handled here: the VMM opens the device through a container it owns and the vIOMMU
//! shadow engine programs the container's DMA mappings. With vfio-ioctls 0.10 (legacy
//! container/group API, which is what L1 kernels without IOMMUFD offer):
//!
//! ```text
//! // once per VM: the KVM VFIO pseudo device (coherency, KVM<->VFIO group tracking)
//! let kvm_vfio = vm_fd.create_device(&mut kvm_create_device {
//!     type_: kvm_device_type_KVM_DEV_TYPE_VFIO, fd: 0, flags: 0 })?;
//! let handle = Arc::new(VfioDeviceFd::new_from_kvm(kvm_vfio));
//! // one container per host address space (opens /dev/vfio/vfio, checks TYPE1v2)
//! let container = Arc::new(VfioContainer::new(Some(handle))?);
//! // opens /dev/vfio/<iommu_group(path)>, VFIO_GROUP_SET_CONTAINER, VFIO_SET_IOMMU(TYPE1v2) on
//! // the first group, KVM_DEV_VFIO_FILE_ADD, VFIO_GROUP_GET_DEVICE_FD, region and irq info
//! let device = Arc::new(VfioDevice::new(Path::new("/sys/bus/pci/devices/0000:00:04.0"),
//!                                       container.clone(), false)?);
//! let pci = VfioPciDevice::from_vfio_device(device, msi_manager, slot_manager)?;
//! // DMA: unsafe { container.vfio_dma_map(iova, size, host_addr) } / vfio_dma_unmap(iova, size)
//! ```
//!
//! The group joins the container in `VfioDevice::new` and leaves it when the last `VfioDevice`
//! of the group is dropped: a device cannot move between containers while it is open.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE, VFIO_TYPE,
};
use vfio_ioctls::{VfioDevice, VfioRegionInfoCap};
use vmm_sys_util::ioctl::{ioctl_with_ptr, ioctl_with_val};
use vmm_sys_util::ioctl_io_nr;

/// VFIO region index of BAR 0 (BARs 1..=5 follow).
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
/// VFIO region index of the PCI config space.
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
/// VFIO interrupt index of MSI.
pub const VFIO_PCI_MSI_IRQ_INDEX: u32 = 1;
/// VFIO interrupt index of MSI-X.
pub const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;
/// Most vectors one `set_irq_eventfds` call may carry (the MSI-X maximum).
pub const MAX_IRQ_VECTORS: usize = 2048;

ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE as u32, VFIO_BASE + 10);
ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);

/// One region of a VFIO device (a BAR, the ROM, config space).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// The region can be read.
    pub readable: bool,
    /// The region can be written.
    pub writable: bool,
    /// The region can be mmapped (subject to `sparse_areas`).
    pub mmap: bool,
    /// If not empty, only these `(offset, size)` areas may be mmapped.
    pub sparse_areas: Vec<(u64, u64)>,
    /// The kernel allows mmapping the MSI-X table (we still trap it).
    pub msix_mappable: bool,
}

/// One interrupt index of a VFIO device (INTx, MSI, MSI-X).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// Number of vectors the index supports (0: unsupported).
    pub count: u32,
}

/// The host side of a passthrough PCI function.
pub trait VfioBackend: Send + Sync {
    /// Information about region `index`, `None` if it does not exist.
    fn region_info(&self, index: u32) -> Option<RegionInfo>;
    /// Read `data.len()` bytes of region `index` at `offset` (the caller checked the bounds).
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()>;
    /// Write `data` to region `index` at `offset` (the caller checked the bounds).
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Map `size` bytes of region `index` at `offset` (page aligned) into this process; returns
    /// the host address. Undone with [`VfioBackend::munmap`].
    fn mmap(&self, index: u32, offset: u64, size: u64, writable: bool) -> io::Result<u64>;
    /// Undo one [`VfioBackend::mmap`].
    fn munmap(&self, host_addr: u64, size: u64);
    /// Information about interrupt index `index`, `None` if it does not exist.
    fn irq_info(&self, index: u32) -> Option<IrqInfo>;
    /// VFIO_DEVICE_SET_IRQS (eventfd trigger) for vectors `start..start + fds.len()` of `index`;
    /// an fd of -1 detaches that vector. The first call on a disabled index enables it with
    /// exactly `fds.len()` vectors.
    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[RawFd]) -> io::Result<()>;
    /// Disable every vector of interrupt index `index`.
    fn disable_irq(&self, index: u32) -> io::Result<()>;
    /// Reset the function (VFIO_DEVICE_RESET: FLR or another reset method of the host).
    fn reset(&self) -> io::Result<()>;
}

/// The IOMMU group of the PCI device at `sysfs_path` (`/sys/bus/pci/devices/BDF`), from its
/// `iommu_group` link: the VMM opens `/dev/vfio/<group>` into the container that will hold the
/// device's DMA mappings.
pub fn iommu_group(sysfs_path: &Path) -> io::Result<u32> {
    let link = std::fs::read_link(sysfs_path.join("iommu_group"))?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad iommu_group link"))
}

/// A `struct vfio_irq_set` for VFIO_DEVICE_SET_IRQS: eventfd triggers for vectors
/// `start..start + fds.len()`, or (no fds) "disable the whole index". A u32 buffer has the
/// struct's layout and alignment: five u32 fields, then one s32 fd per vector.
fn irq_set_buffer(index: u32, start: u32, fds: &[RawFd]) -> Vec<u32> {
    let data = if fds.is_empty() {
        VFIO_IRQ_SET_DATA_NONE
    } else {
        VFIO_IRQ_SET_DATA_EVENTFD
    };
    let mut buf: Vec<u32> = Vec::with_capacity(5 + fds.len());
    buf.push(((5 + fds.len()) * 4) as u32);
    buf.push(data | VFIO_IRQ_SET_ACTION_TRIGGER);
    buf.push(index);
    buf.push(start);
    buf.push(fds.len() as u32);
    buf.extend(fds.iter().map(|&fd| fd as u32));
    buf
}

/// [`VfioBackend`] on an opened `vfio_ioctls::VfioDevice`.
pub struct VfioDeviceBackend {
    device: Arc<VfioDevice>,
}

impl VfioDeviceBackend {
    /// Wrap an opened device (its group already attached to a container).
    pub fn new(device: Arc<VfioDevice>) -> Self {
        VfioDeviceBackend { device }
    }

    /// The wrapped device.
    pub fn device(&self) -> &Arc<VfioDevice> {
        &self.device
    }

    fn check_bounds(&self, index: u32, offset: u64, len: usize) -> io::Result<()> {
        let size = self.device.get_region_size(index);
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("access at {offset:#x} size {len} outside region {index} ({size:#x})"),
            )),
        }
    }
}

impl VfioBackend for VfioDeviceBackend {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let size = self.device.get_region_size(index);
        if size == 0 {
            return None;
        }
        let flags = self.device.get_region_flags(index);
        let mut info = RegionInfo {
            size,
            readable: flags & VFIO_REGION_INFO_FLAG_READ != 0,
            writable: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap: flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
            ..RegionInfo::default()
        };
        for cap in self.device.get_region_caps(index) {
            match cap {
                VfioRegionInfoCap::SparseMmap(s) => {
                    info.sparse_areas = s.areas.iter().map(|a| (a.offset, a.size)).collect();
                }
                VfioRegionInfoCap::MsixMappable => info.msix_mappable = true,
                _ => {}
            }
        }
        Some(info)
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        self.check_bounds(index, offset, data.len())?;
        // vfio-ioctls logs and leaves the buffer alone on failure: make that read all-ones.
        data.fill(0xff);
        self.device.region_read(index, data, offset);
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_bounds(index, offset, data.len())?;
        self.device.region_write(index, data, offset);
        Ok(())
    }

    fn mmap(&self, index: u32, offset: u64, size: u64, writable: bool) -> io::Result<u64> {
        self.check_bounds(index, offset, usize::try_from(size).unwrap_or(usize::MAX))?;
        let file_offset = self
            .device
            .get_region_offset(index)
            .checked_add(offset)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "mmap offset overflow"))?;
        let len = usize::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mmap size overflow"))?;
        let mut prot = libc::PROT_READ;
        if writable {
            prot |= libc::PROT_WRITE;
        }
        // SAFETY: a fresh shared mapping of the device fd chosen by the kernel (no fixed
        // address), so no existing memory is affected; the result is checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                self.device.as_raw_fd(),
                file_offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(addr as u64)
    }

    fn munmap(&self, host_addr: u64, size: u64) {
        // SAFETY: the caller passes back exactly a mapping returned by `mmap` above, which no
        // Rust reference points into (only KVM slots, removed by the caller beforehand).
        let ret = unsafe { libc::munmap(host_addr as *mut libc::c_void, size as usize) };
        if ret != 0 {
            log::warn!(
                "vfio: munmap of {host_addr:#x} size {size:#x} failed: {}",
                io::Error::last_os_error()
            );
        }
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        self.device
            .get_irq_info(index)
            .map(|i| IrqInfo { count: i.count })
    }

    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[RawFd]) -> io::Result<()> {
        if fds.is_empty() || fds.len() > MAX_IRQ_VECTORS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad vector count",
            ));
        }
        let buf = irq_set_buffer(index, start, fds);
        // SAFETY: `buf` is a complete vfio_irq_set with `count` trailing fds, valid for the
        // duration of the call; the kernel only reads it.
        let ret = unsafe { ioctl_with_ptr(&*self.device, VFIO_DEVICE_SET_IRQS(), buf.as_ptr()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn disable_irq(&self, index: u32) -> io::Result<()> {
        let buf = irq_set_buffer(index, 0, &[]);
        // SAFETY: a complete vfio_irq_set without data, valid for the duration of the call.
        let ret = unsafe { ioctl_with_ptr(&*self.device, VFIO_DEVICE_SET_IRQS(), buf.as_ptr()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn reset(&self) -> io::Result<()> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument and touches no process memory.
        let ret = unsafe { ioctl_with_val(&*self.device, VFIO_DEVICE_RESET(), 0) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use vfio_bindings::bindings::vfio::vfio_irq_set;

    #[test]
    fn ioctl_numbers_match_linux_vfio_h() {
        // _IO(';', 100 + 10) and _IO(';', 100 + 11).
        assert_eq!(VFIO_DEVICE_SET_IRQS(), 0x3b6e);
        assert_eq!(VFIO_DEVICE_RESET(), 0x3b6f);
    }

    #[test]
    fn irq_set_buffer_has_the_kernel_layout() {
        assert_eq!(size_of::<vfio_irq_set>(), 20);
        assert_eq!(offset_of!(vfio_irq_set, start), 12);
        assert_eq!(offset_of!(vfio_irq_set, count), 16);
        let b = irq_set_buffer(VFIO_PCI_MSIX_IRQ_INDEX, 3, &[7, -1]);
        assert_eq!(
            b,
            vec![
                28,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                2,
                3,
                2,
                7,
                u32::MAX
            ]
        );
        let d = irq_set_buffer(VFIO_PCI_MSI_IRQ_INDEX, 0, &[]);
        assert_eq!(
            d,
            vec![
                20,
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                1,
                0,
                0
            ]
        );
    }

    #[test]
    fn iommu_group_reads_the_sysfs_link() {
        let dir = std::env::temp_dir().join(format!("pci-vfio-group-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink("../../../kernel/iommu_groups/17", dir.join("iommu_group"))
            .unwrap();
        assert_eq!(iommu_group(&dir).unwrap(), 17);
        std::fs::remove_file(dir.join("iommu_group")).unwrap();
        std::os::unix::fs::symlink("../../../kernel/iommu_groups/x", dir.join("iommu_group"))
            .unwrap();
        assert!(iommu_group(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(iommu_group(&dir).is_err());
    }
}
