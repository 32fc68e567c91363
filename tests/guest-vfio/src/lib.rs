//! `guest-vfio`: runs inside a (L2) guest on a PCI function bound to vfio-pci and drives it
//! through the viommu crate's own VFIO backend (`viommu::VfioDmaSpace`) against /dev/vfio:
//!
//! - `maps --size 4096|2097152 --count N`: map/unmap rates (`maps_per_s=... unmaps_per_s=...`);
//! - `errors`: VFIO type1 semantics the shadow engine relies on (EEXIST on overlap, EINVAL on
//!   a bisecting unmap, exact unmaps, read-only maps, out-of-range IOVAs), one line per check;
//! - `virtio-blk-read --sector S`: a userspace virtio-blk driver over VFIO (BAR mmap, virtio-pci
//!   capabilities, one split virtqueue in VFIO-mapped anonymous memory at IOVAs of our
//!   choice), prints the sector's FNV-1a digest and first bytes;
//! - `shadow-blk-read --sector S`: the same read with the queue in a small "guest RAM" the
//!   device reaches through `viommu::Shadow` (a guest mapping split at a region edge) and then
//!   through `viommu::StaticMapping` (IOVA == GPA).
//!
//! Results go to stdout, progress and diagnostics to stderr (`GUEST_VFIO_LOG=debug|info|warn`).
//! The exit code is non-zero on any failure.

pub mod args;
pub mod bench;
pub mod blk;
pub mod caps;
pub mod dma;
pub mod ring;
pub mod shadowed;

use pci::vfio_backend::VfioDeviceBackend;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};
use viommu::{HostIommuInfo, VfioDmaSpace};

/// Everything that can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line or parameters.
    #[error("usage: {0}")]
    Usage(String),
    /// A system call failed.
    #[error("{0}: {1}")]
    Io(String, #[source] io::Error),
    /// Opening or using VFIO failed.
    #[error("VFIO: {0}")]
    Vfio(String),
    /// The device misbehaved or is not what we expected.
    #[error("device: {0}")]
    Device(String),
    /// The device did not answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

/// One opened VFIO function: its own container (type1), group and device.
pub struct VfioHandle {
    /// The container (host DMA address space).
    pub container: Arc<VfioContainer>,
    /// The device.
    pub device: Arc<VfioDevice>,
    /// Region access and mmaps.
    pub backend: Arc<VfioDeviceBackend>,
    /// The container as the viommu crate's DMA space.
    pub space: VfioDmaSpace,
    /// `/sys/bus/pci/devices/<BDF>`.
    pub sysfs: PathBuf,
}

impl VfioHandle {
    /// Open the function at `sysfs` (bound to vfio-pci) in a new container.
    pub fn open(sysfs: &Path) -> Result<VfioHandle, Error> {
        let group = pci::iommu_group(sysfs)
            .map_err(|e| Error::Io(format!("iommu_group of {}", sysfs.display()), e))?;
        log::info!("device {} is in IOMMU group {group}", sysfs.display());
        let container = Arc::new(
            VfioContainer::new(None).map_err(|e| Error::Vfio(format!("open container: {e}")))?,
        );
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = Arc::new(VfioDevice::new(sysfs, ops, false).map_err(|e| {
            Error::Vfio(format!(
                "open device {} (group {group}; is it bound to vfio-pci, and did \
                 vfio_iommu_type1 get allow_unsafe_interrupts=1?): {e}",
                sysfs.display()
            ))
        })?);
        log::info!("opened {} through /dev/vfio/{group}", sysfs.display());
        Ok(VfioHandle {
            backend: Arc::new(VfioDeviceBackend::new(device.clone())),
            space: VfioDmaSpace::new(container.clone()),
            container,
            device,
            sysfs: sysfs.to_path_buf(),
        })
    }

    /// The host IOMMU's limits (logged), or defaults if the query fails.
    pub fn info(&self) -> HostIommuInfo {
        match self.space.query_info() {
            Ok(i) => {
                log::info!(
                    "IOMMU: page sizes {:#x}, IOVA ranges {:x?}, dma_avail {:?}",
                    i.page_sizes,
                    i.iova_ranges,
                    i.dma_avail
                );
                i
            }
            Err(e) => {
                log::warn!("VFIO_IOMMU_GET_INFO failed: {e}");
                HostIommuInfo::default()
            }
        }
    }
}

/// First IOVA at or above 1 MiB, aligned to `align`, with `len` bytes inside one of the host's
/// ranges (all of the 64-bit space when none are reported).
pub fn pick_iova(info: &HostIommuInfo, len: u64, align: u64) -> Option<u64> {
    let all = [(0, u64::MAX)];
    let ranges = if info.iova_ranges.is_empty() {
        &all[..]
    } else {
        &info.iova_ranges[..]
    };
    let align = align.max(1);
    ranges.iter().find_map(|&(s, e)| {
        let start = s.max(1 << 20).checked_next_multiple_of(align)?;
        let last = start.checked_add(len.checked_sub(1)?)?;
        (last <= e).then_some(start)
    })
}

/// 64-bit FNV-1a of `data`.
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Lower-case hex of `data`.
pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// A vfio-pci-bound function to use when none is named: the first one (a virtio-blk one when
/// `want_blk`) under /sys/bus/pci/drivers/vfio-pci.
pub fn find_device(want_blk: bool) -> Result<PathBuf, Error> {
    let dir = Path::new("/sys/bus/pci/drivers/vfio-pci");
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::Io(format!("list {}", dir.display()), e))?;
    let mut bdfs: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(':') && n.contains('.'))
        .collect();
    bdfs.sort();
    let read_id = |bdf: &str, f: &str| {
        std::fs::read_to_string(format!("/sys/bus/pci/devices/{bdf}/{f}"))
            .ok()
            .and_then(|s| u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
    };
    for bdf in &bdfs {
        let (v, d) = (read_id(bdf, "vendor"), read_id(bdf, "device"));
        log::info!("vfio-pci device {bdf}: {v:04x?}:{d:04x?}");
        if !want_blk || (v == Some(0x1af4) && matches!(d, Some(0x1042) | Some(0x1001))) {
            return Ok(PathBuf::from(format!("/sys/bus/pci/devices/{bdf}")));
        }
    }
    Err(Error::Usage(format!(
        "no {}device bound to vfio-pci (found {bdfs:?}); pass --device BDF",
        if want_blk { "virtio-blk " } else { "" }
    )))
}

/// `/sys/bus/pci/devices/...` for a `--device` argument: a path, `DDDD:BB:DD.F` or `BB:DD.F`.
pub fn sysfs_path(arg: &str) -> PathBuf {
    if arg.starts_with('/') {
        PathBuf::from(arg)
    } else if arg.matches(':').count() == 1 {
        PathBuf::from(format!("/sys/bus/pci/devices/0000:{arg}"))
    } else {
        PathBuf::from(format!("/sys/bus/pci/devices/{arg}"))
    }
}

/// A stderr logger for the `log` facade.
pub struct StderrLogger(log::LevelFilter);

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.0
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("guest-vfio {} {}: {}", r.level(), r.target(), r.args());
        }
    }
    fn flush(&self) {}
}

/// Install the logger at the level named by `GUEST_VFIO_LOG` (default info).
pub fn init_logging() {
    let level = match std::env::var("GUEST_VFIO_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("warn") => log::LevelFilter::Warn,
        Ok("error") => log::LevelFilter::Error,
        _ => log::LevelFilter::Info,
    };
    let logger: &'static StderrLogger = Box::leak(Box::new(StderrLogger(level)));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_and_hex() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }

    #[test]
    fn iova_choice_respects_host_ranges() {
        let none = HostIommuInfo::default();
        assert_eq!(pick_iova(&none, 0x1000, 0x1000), Some(1 << 20));
        assert_eq!(pick_iova(&none, 0x10_0000, 0x20_0000), Some(0x20_0000));
        let info = HostIommuInfo {
            iova_ranges: vec![(0, 0x1f_ffff), (0x100_0000, 0x7f_ffff_ffff)],
            ..Default::default()
        };
        assert_eq!(pick_iova(&info, 0x10_0000, 0x1000), Some(0x10_0000));
        assert_eq!(pick_iova(&info, 0x20_0000, 0x1000), Some(0x100_0000));
        assert_eq!(pick_iova(&info, 1 << 40, 0x1000), None);
        assert_eq!(pick_iova(&none, 0, 0x1000), None);
        let top = HostIommuInfo {
            iova_ranges: vec![(u64::MAX - 0xfff, u64::MAX)],
            ..Default::default()
        };
        assert_eq!(pick_iova(&top, 0x1000, 0x2000), None, "alignment overflows");
    }

    #[test]
    fn device_arguments() {
        assert_eq!(
            sysfs_path("00:04.0"),
            PathBuf::from("/sys/bus/pci/devices/0000:00:04.0")
        );
        assert_eq!(
            sysfs_path("0000:00:04.0"),
            PathBuf::from("/sys/bus/pci/devices/0000:00:04.0")
        );
        assert_eq!(sysfs_path("/x/y"), PathBuf::from("/x/y"));
    }
}
