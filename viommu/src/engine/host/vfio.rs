//! A [`DmaSpace`] on a VFIO type1 container (`vfio_ioctls::VfioContainer` or any open
//! `/dev/vfio/vfio` fd with a group attached and the IOMMU set), and the query of what the host
//! IOMMU behind it can translate ([`HostIommuInfo`]; the front end's config turns it into the
//! geometry the guest is told).
//!
//! The ioctls are issued directly (vfio-ioctls 0.10 always maps read/write and hides errnos):
//! `VFIO_IOMMU_MAP_DMA` with `VFIO_DMA_MAP_FLAG_READ`/`WRITE` from [`Prot`],
//! `VFIO_IOMMU_UNMAP_DMA` checking the bytes actually unmapped, `VFIO_IOMMU_GET_INFO` with the
//! IOVA-range and DMA-available capabilities.
//!
//! Errno -> [`HostMapError`]: MAP `EEXIST` -> Invalid (INVAL), `ENOSPC`/`ENOMEM` -> NoSpace
//! (NOMEM; type1's `dma_entry_limit`, 65535 by default, or RLIMIT_MEMLOCK), `EINVAL` for an
//! IOVA outside the host's ranges (or when the host does not report them) -> OutOfRange
//! (RANGE), anything else -> Failed (DEVERR). UNMAP `EINVAL` (bisect) / `ENOENT` (iommufd
//! compat, nothing mapped) -> Invalid, a short unmap -> Failed.

use super::{DmaSpace, HostMapError, Prot};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};
use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, VFIO_BASE, VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, VFIO_TYPE,
};
use vmm_sys_util::ioctl::{ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);
ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);
ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 14);

/// Size of `struct vfio_iommu_type1_info` (argsz, flags, iova_pgsizes, cap_offset, pad).
const INFO_SIZE: usize = 24;
/// Largest GET_INFO reply accepted (the kernel's is a few hundred bytes).
const MAX_INFO_SIZE: usize = 64 * 1024;
/// Most capabilities walked in one reply.
const MAX_CAPS: usize = 64;

/// What the host IOMMU behind a container can translate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostIommuInfo {
    /// Supported IOVA page sizes (bitmap; 0 when not reported).
    pub page_sizes: u64,
    /// Usable IOVA ranges `(start, end)` inclusive, sorted. Empty when not reported (kernels
    /// before 5.4): the whole 64-bit space is then assumed.
    pub iova_ranges: Vec<(u64, u64)>,
    /// Mappings the container may still create (`dma_entry_limit` minus those in use).
    pub dma_avail: Option<u32>,
}

/// A malformed `VFIO_IOMMU_GET_INFO` reply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InfoParseError {
    /// Shorter than `struct vfio_iommu_type1_info`.
    #[error("info reply of {0} bytes is truncated")]
    Truncated(usize),
    /// A capability header or body outside the reply, or a chain that does not move forward.
    #[error("bad capability at offset {0:#x}")]
    BadCap(usize),
    /// An IOVA range with start > end.
    #[error("empty IOVA range {0:#x}..={1:#x}")]
    BadRange(u64, u64),
}

fn rd_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn rd_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn rd_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

impl HostIommuInfo {
    /// Parse a `VFIO_IOMMU_GET_INFO` reply (`struct vfio_iommu_type1_info` and its capability
    /// chain, native endianness). `buf` is what the kernel filled, at most `argsz` bytes.
    pub fn parse(buf: &[u8]) -> Result<Self, InfoParseError> {
        if buf.len() < INFO_SIZE {
            return Err(InfoParseError::Truncated(buf.len()));
        }
        let trunc = || InfoParseError::Truncated(buf.len());
        let flags = rd_u32(buf, 4).ok_or_else(trunc)?;
        let mut info = HostIommuInfo::default();
        if flags & VFIO_IOMMU_INFO_PGSIZES != 0 {
            info.page_sizes = rd_u64(buf, 8).ok_or_else(trunc)?;
        }
        if flags & VFIO_IOMMU_INFO_CAPS == 0 {
            return Ok(info);
        }
        let mut off = rd_u32(buf, 16).ok_or_else(trunc)? as usize;
        let mut seen = 0;
        while off != 0 {
            seen += 1;
            if seen > MAX_CAPS || off < INFO_SIZE || off & 3 != 0 {
                return Err(InfoParseError::BadCap(off));
            }
            let bad = || InfoParseError::BadCap(off);
            let id = rd_u16(buf, off).ok_or_else(bad)?;
            let next = rd_u32(buf, off + 4).ok_or_else(bad)? as usize;
            match u32::from(id) {
                VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                    let nr = rd_u32(buf, off + 8).ok_or_else(bad)? as usize;
                    let body = off + 16;
                    let end = nr
                        .checked_mul(16)
                        .and_then(|n| n.checked_add(body))
                        .ok_or_else(bad)?;
                    if end > buf.len() {
                        return Err(bad());
                    }
                    for i in 0..nr {
                        let s = rd_u64(buf, body + 16 * i).ok_or_else(bad)?;
                        let e = rd_u64(buf, body + 16 * i + 8).ok_or_else(bad)?;
                        if s > e {
                            return Err(InfoParseError::BadRange(s, e));
                        }
                        info.iova_ranges.push((s, e));
                    }
                }
                VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL => {
                    info.dma_avail = Some(rd_u32(buf, off + 8).ok_or_else(bad)?);
                }
                _ => {}
            }
            if next != 0 && next <= off {
                return Err(bad());
            }
            off = next;
        }
        info.iova_ranges.sort_unstable();
        Ok(info)
    }

    /// What two containers can both do (a guest domain may span several).
    pub fn intersect(&self, other: &Self) -> Self {
        let page_sizes = match (self.page_sizes, other.page_sizes) {
            (0, p) | (p, 0) => p,
            (a, b) => a & b,
        };
        let iova_ranges = match (self.iova_ranges.is_empty(), other.iova_ranges.is_empty()) {
            (true, _) => other.iova_ranges.clone(),
            (_, true) => self.iova_ranges.clone(),
            _ => {
                let mut v = Vec::new();
                for &(a, b) in &self.iova_ranges {
                    for &(c, d) in &other.iova_ranges {
                        let (s, e) = (a.max(c), b.min(d));
                        if s <= e {
                            v.push((s, e));
                        }
                    }
                }
                v.sort_unstable();
                v
            }
        };
        let dma_avail = match (self.dma_avail, other.dma_avail) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        HostIommuInfo {
            page_sizes,
            iova_ranges,
            dma_avail,
        }
    }

    /// Whether `iova..=last` lies in one reported range (true when none are reported).
    pub fn contains(&self, iova: u64, last: u64) -> bool {
        self.iova_ranges.is_empty()
            || self
                .iova_ranges
                .iter()
                .any(|&(s, e)| s <= iova && last <= e)
    }
}

/// `VFIO_IOMMU_GET_INFO` on the container `fd` (a group must be attached and the IOMMU set).
pub fn query_info(fd: &dyn AsRawFd) -> io::Result<HostIommuInfo> {
    let mut argsz = INFO_SIZE;
    for _ in 0..2 {
        // A u64 buffer has the struct's alignment; argsz is its first u32 and flags start 0.
        let mut buf = vec![0u64; argsz.div_ceil(8)];
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&(argsz as u32).to_ne_bytes());
        buf[0] = u64::from_ne_bytes(head);
        // SAFETY: the buffer is argsz bytes (rounded up) and the kernel writes at most argsz.
        let ret =
            unsafe { ioctl_with_mut_ptr(&fd.as_raw_fd(), VFIO_IOMMU_GET_INFO(), buf.as_mut_ptr()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let want = rd_u32(&bytes, 0).unwrap_or(0) as usize;
        if want <= argsz {
            return HostIommuInfo::parse(&bytes[..argsz.min(bytes.len())])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        }
        if want > MAX_INFO_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("VFIO_IOMMU_GET_INFO wants {want} bytes"),
            ));
        }
        argsz = want;
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "VFIO_IOMMU_GET_INFO size kept growing",
    ))
}

/// A VFIO type1 container as a host DMA address space.
pub struct VfioDmaSpace {
    fd: Arc<dyn AsRawFd + Send + Sync>,
    /// The host's IOVA ranges, read on the first EINVAL (to tell RANGE from DEVERR).
    ranges: OnceLock<HostIommuInfo>,
}

impl VfioDmaSpace {
    /// Wrap an open container (e.g. `Arc<vfio_ioctls::VfioContainer>`), which it keeps open.
    pub fn new<C: AsRawFd + Send + Sync + 'static>(container: Arc<C>) -> Self {
        VfioDmaSpace {
            fd: container,
            ranges: OnceLock::new(),
        }
    }

    /// What the host IOMMU behind the container can do.
    pub fn query_info(&self) -> io::Result<HostIommuInfo> {
        query_info(&*self.fd)
    }

    /// `VFIO_IOMMU_MAP_DMA` with the exact errno on failure.
    ///
    /// # Safety
    /// As [`DmaSpace::map`].
    pub unsafe fn map_raw(
        &self,
        iova: u64,
        size: u64,
        host_addr: u64,
        prot: Prot,
    ) -> io::Result<()> {
        let mut flags = 0;
        if prot.read {
            flags |= VFIO_DMA_MAP_FLAG_READ;
        }
        if prot.write {
            flags |= VFIO_DMA_MAP_FLAG_WRITE;
        }
        let arg = vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags,
            vaddr: host_addr,
            iova,
            size,
        };
        // SAFETY: the argument is a complete struct the kernel only reads; what the device
        // may then access is the caller's contract.
        let ret = unsafe { ioctl_with_ref(&self.fd.as_raw_fd(), VFIO_IOMMU_MAP_DMA(), &arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `VFIO_IOMMU_UNMAP_DMA`: returns the bytes the kernel actually unmapped.
    pub fn unmap_raw(&self, iova: u64, size: u64) -> io::Result<u64> {
        let mut arg = vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova,
            size,
            ..Default::default()
        };
        // SAFETY: a complete struct without flags (no bitmap follows); the kernel writes back
        // only `size`.
        let ret =
            unsafe { ioctl_with_mut_ref(&self.fd.as_raw_fd(), VFIO_IOMMU_UNMAP_DMA(), &mut arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(arg.size)
    }

    fn in_host_range(&self, iova: u64, size: u64) -> bool {
        let info = self
            .ranges
            .get_or_init(|| self.query_info().unwrap_or_default());
        info.contains(iova, iova.saturating_add(size.saturating_sub(1)))
            && !info.iova_ranges.is_empty()
    }
}

impl DmaSpace for VfioDmaSpace {
    unsafe fn map(
        &self,
        iova: u64,
        size: u64,
        host_addr: u64,
        prot: Prot,
    ) -> Result<(), HostMapError> {
        // SAFETY: forwarded from this function's contract.
        let Err(e) = (unsafe { self.map_raw(iova, size, host_addr, prot) }) else {
            return Ok(());
        };
        let err = match e.raw_os_error() {
            Some(libc::EEXIST) => HostMapError::Invalid,
            Some(libc::ENOSPC) | Some(libc::ENOMEM) => HostMapError::NoSpace,
            Some(libc::EINVAL) if !self.in_host_range(iova, size) => HostMapError::OutOfRange,
            _ => HostMapError::Failed(format!("VFIO_IOMMU_MAP_DMA: {e}")),
        };
        virtio_dev::guest_warn!("viommu vfio: map {iova:#x}+{size:#x} -> {host_addr:#x}: {e}");
        if err == HostMapError::NoSpace {
            virtio_dev::guest_warn!(
                "viommu vfio: the container is out of mappings or locked memory (type1 \
                 dma_entry_limit defaults to 65535; RLIMIT_MEMLOCK)"
            );
        }
        Err(err)
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), HostMapError> {
        match self.unmap_raw(iova, size) {
            Ok(n) if n == size => Ok(()),
            Ok(n) => {
                virtio_dev::guest_warn!(
                    "viommu vfio: unmap {iova:#x}+{size:#x} removed {n:#x} bytes"
                );
                Err(HostMapError::Failed(format!(
                    "unmapped {n:#x} of {size:#x} bytes"
                )))
            }
            Err(e) => {
                virtio_dev::guest_warn!("viommu vfio: unmap {iova:#x}+{size:#x}: {e}");
                Err(match e.raw_os_error() {
                    Some(libc::EINVAL) | Some(libc::ENOENT) => HostMapError::Invalid,
                    _ => HostMapError::Failed(format!("VFIO_IOMMU_UNMAP_DMA: {e}")),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::arch::{X86_MSI_END, X86_MSI_START};

    /// A GET_INFO reply as the kernel lays it out: info, IOVA-range cap, DMA-avail cap.
    fn reply(pgsizes: u64, ranges: &[(u64, u64)], avail: Option<u32>) -> Vec<u8> {
        let mut b = Vec::new();
        let ranges_cap = INFO_SIZE;
        let ranges_len = 16 + 16 * ranges.len();
        let avail_cap = ranges_cap + ranges_len;
        let total = avail_cap + if avail.is_some() { 12 } else { 0 };
        b.extend((total as u32).to_ne_bytes());
        b.extend((VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS).to_ne_bytes());
        b.extend(pgsizes.to_ne_bytes());
        b.extend((ranges_cap as u32).to_ne_bytes());
        b.extend(0u32.to_ne_bytes());
        b.extend((VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16).to_ne_bytes());
        b.extend(1u16.to_ne_bytes());
        let next = if avail.is_some() { avail_cap as u32 } else { 0 };
        b.extend(next.to_ne_bytes());
        b.extend((ranges.len() as u32).to_ne_bytes());
        b.extend(0u32.to_ne_bytes());
        for &(s, e) in ranges {
            b.extend(s.to_ne_bytes());
            b.extend(e.to_ne_bytes());
        }
        if let Some(a) = avail {
            b.extend((VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL as u16).to_ne_bytes());
            b.extend(1u16.to_ne_bytes());
            b.extend(0u32.to_ne_bytes());
            b.extend(a.to_ne_bytes());
        }
        assert_eq!(b.len(), total);
        b
    }

    /// A 39-bit x86 host: everything but the MSI window.
    fn x86_39() -> Vec<(u64, u64)> {
        vec![(0, X86_MSI_START - 1), (X86_MSI_END + 1, (1 << 39) - 1)]
    }

    #[test]
    fn parses_the_kernel_layout() {
        let info = HostIommuInfo::parse(&reply(0x4020_1000, &x86_39(), Some(65000))).unwrap();
        assert_eq!(
            info,
            HostIommuInfo {
                page_sizes: 0x4020_1000,
                iova_ranges: x86_39(),
                dma_avail: Some(65000),
            }
        );
        // Old kernels: no capabilities.
        let mut old = reply(0x1000, &[], None);
        old[4..8].copy_from_slice(&VFIO_IOMMU_INFO_PGSIZES.to_ne_bytes());
        let info = HostIommuInfo::parse(&old[..INFO_SIZE]).unwrap();
        assert_eq!(info.page_sizes, 0x1000);
        assert!(info.iova_ranges.is_empty());
        assert!(info.contains(u64::MAX - 1, u64::MAX));
    }

    #[test]
    fn rejects_malformed_replies() {
        assert_eq!(
            HostIommuInfo::parse(&[0; 8]),
            Err(InfoParseError::Truncated(8))
        );
        let good = reply(0x1000, &x86_39(), Some(1));
        // Range count running past the end.
        let mut b = good.clone();
        b[INFO_SIZE + 8..INFO_SIZE + 12].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(
            HostIommuInfo::parse(&b),
            Err(InfoParseError::BadCap(INFO_SIZE))
        );
        // Huge count must not overflow.
        b[INFO_SIZE + 8..INFO_SIZE + 12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(HostIommuInfo::parse(&b).is_err());
        // A chain pointing backwards (loop).
        let mut b = good.clone();
        let avail_cap = INFO_SIZE + 16 + 32;
        b[avail_cap + 4..avail_cap + 8].copy_from_slice(&(INFO_SIZE as u32).to_ne_bytes());
        assert_eq!(
            HostIommuInfo::parse(&b),
            Err(InfoParseError::BadCap(avail_cap))
        );
        // cap_offset inside the info struct or past the end.
        let mut b = good.clone();
        b[16..20].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(HostIommuInfo::parse(&b), Err(InfoParseError::BadCap(8)));
        let mut b = good.clone();
        b[16..20].copy_from_slice(&4096u32.to_ne_bytes());
        assert_eq!(HostIommuInfo::parse(&b), Err(InfoParseError::BadCap(4096)));
        // An empty range.
        let b = reply(0x1000, &[(0x2000, 0x1000)], None);
        assert_eq!(
            HostIommuInfo::parse(&b),
            Err(InfoParseError::BadRange(0x2000, 0x1000))
        );
    }

    #[test]
    fn intersection_of_two_containers() {
        let a = HostIommuInfo {
            page_sizes: 0x4020_1000,
            iova_ranges: vec![(0, 0xffff), (0x2_0000, 0x2_ffff)],
            dma_avail: Some(10),
        };
        let b = HostIommuInfo {
            page_sizes: 0x20_1000,
            iova_ranges: vec![(0x8000, 0x2_7fff)],
            dma_avail: None,
        };
        let c = a.intersect(&b);
        assert_eq!(c.page_sizes, 0x20_1000);
        assert_eq!(c.iova_ranges, vec![(0x8000, 0xffff), (0x2_0000, 0x2_7fff)]);
        assert_eq!(c.dma_avail, Some(10));
        assert_eq!(a.intersect(&HostIommuInfo::default()), a);
    }

    #[test]
    fn ioctl_failures_become_statuses_not_panics() {
        // Not a VFIO container: every ioctl fails with ENOTTY.
        let f = Arc::new(std::fs::File::open("/dev/null").unwrap());
        let space = VfioDmaSpace::new(f);
        assert!(space.query_info().is_err());
        // SAFETY: the ioctl fails; nothing is mapped.
        let r = unsafe { DmaSpace::map(&space, 0x1000, 0x1000, 0x1000, Prot::RW) };
        assert!(matches!(r, Err(HostMapError::Failed(_))), "{r:?}");
        assert!(matches!(
            DmaSpace::unmap(&space, 0x1000, 0x1000),
            Err(HostMapError::Failed(_))
        ));
    }
}
