//! A userspace virtio-blk driver over VFIO, just enough to read one sector: modern virtio-pci
//! (common cfg + notify found through the capability list), one split virtqueue polled without
//! interrupts, all rings and buffers in one anonymous buffer mapped into the container at an
//! IOVA of our choice.

use crate::caps::{parse_virtio_caps, VirtioCap, VirtioCaps};
use crate::dma::{BarIo, DmaBuf};
use crate::ring::{Desc, Layout, Mem, SplitQueue, DESC_F_NEXT, DESC_F_WRITE};
use crate::{fnv1a64, hex, now_ns, pick_iova, Error, VfioHandle};
use pci::vfio_backend::{VfioBackend, VFIO_PCI_CONFIG_REGION_INDEX};
use viommu::host::Prot;

// virtio_pci_common_cfg offsets.
const DEVICE_FEATURE_SELECT: u64 = 0;
const DEVICE_FEATURE: u64 = 4;
const DRIVER_FEATURE_SELECT: u64 = 8;
const DRIVER_FEATURE: u64 = 12;
const NUM_QUEUES: u64 = 18;
const DEVICE_STATUS: u64 = 20;
const QUEUE_SELECT: u64 = 22;
const QUEUE_SIZE: u64 = 24;
const QUEUE_MSIX_VECTOR: u64 = 26;
const QUEUE_ENABLE: u64 = 28;
const QUEUE_NOTIFY_OFF: u64 = 30;
const QUEUE_DESC: u64 = 32;
const QUEUE_DRIVER: u64 = 40;
const QUEUE_DEVICE: u64 = 48;
/// Common cfg bytes we touch.
const COMMON_LEN: u64 = 56;

const S_ACKNOWLEDGE: u8 = 1;
const S_DRIVER: u8 = 2;
const S_DRIVER_OK: u8 = 4;
const S_FEATURES_OK: u8 = 8;
const S_NEEDS_RESET: u8 = 0x40;
const S_FAILED: u8 = 0x80;

const F_VERSION_1: u64 = 1 << 32;
const F_ACCESS_PLATFORM: u64 = 1 << 33;
const NO_VECTOR: u16 = 0xffff;

const BLK_T_IN: u32 = 0;
const SECTOR: u64 = 512;

/// Layout of the DMA buffer (offsets): queue at 0, request header, data, status byte.
const BUF_LEN: u64 = 0x10000;
const HDR_OFF: u64 = 0x8000;
const DATA_OFF: u64 = 0x9000;
const STATUS_OFF: u64 = 0xa000;
const _: () =
    assert!(HDR_OFF < DATA_OFF && DATA_OFF + SECTOR <= STATUS_OFF && STATUS_OFF < BUF_LEN);
/// Largest queue we set up (its rings must end below `HDR_OFF`).
const MAX_QUEUE: u16 = 64;

/// The PCI command register and its memory-space and bus-master bits.
const PCI_COMMAND: u64 = 4;
const CMD_MEMORY: u16 = 1 << 1;
const CMD_BUS_MASTER: u16 = 1 << 2;

/// What a successful read returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResult {
    /// The sector's bytes.
    pub data: Vec<u8>,
    /// `len` of the used element.
    pub used_len: u32,
}

/// The largest power of two not above `min(max, MAX_QUEUE)` (0 if `max` is 0).
pub fn queue_size(max: u16) -> u16 {
    let m = max.min(MAX_QUEUE);
    if m == 0 {
        0
    } else {
        1 << (15 - m.leading_zeros())
    }
}

/// The features we accept from `offered`: VERSION_1 (required) and ACCESS_PLATFORM (required
/// by devices behind an IOMMU if offered). `None` without VERSION_1.
pub fn accepted_features(offered: u64) -> Option<u64> {
    (offered & F_VERSION_1 != 0).then_some(offered & (F_VERSION_1 | F_ACCESS_PLATFORM))
}

struct Common<'a> {
    io: &'a BarIo,
    base: u64,
}

impl Common<'_> {
    fn status(&self) -> u8 {
        self.io.read8(self.base + DEVICE_STATUS)
    }
    fn set_status(&self, s: u8) {
        self.io.write8(self.base + DEVICE_STATUS, s);
    }
    fn write64(&self, off: u64, v: u64) {
        self.io.write32(self.base + off, v as u32);
        self.io.write32(self.base + off + 4, (v >> 32) as u32);
    }
    fn reset(&self, timeout_ms: u64) -> Result<(), Error> {
        self.set_status(0);
        let deadline = now_ns() + timeout_ms * 1_000_000;
        while self.status() != 0 {
            if now_ns() > deadline {
                return Err(Error::Timeout("device reset".into()));
            }
            std::thread::yield_now();
        }
        Ok(())
    }
}

fn config_space(h: &VfioHandle) -> Result<Vec<u8>, Error> {
    let mut cfg = vec![0u8; 256];
    h.backend
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut cfg)
        .map_err(|e| Error::Io("read config space".into(), e))?;
    Ok(cfg)
}

fn open_cap(h: &VfioHandle, cap: &VirtioCap, need: u64, what: &str) -> Result<BarIo, Error> {
    if u64::from(cap.length) < need {
        return Err(Error::Device(format!(
            "{what} structure of {} bytes (need {need})",
            cap.length
        )));
    }
    Ok(BarIo::open(
        &h.backend,
        cap.bar,
        u64::from(cap.offset),
        u64::from(cap.length),
    ))
}

/// Read sector `sector` of the virtio-blk function behind `h`; prints the result line.
pub fn read_sector(
    h: &VfioHandle,
    sector: u64,
    iova: Option<u64>,
    timeout_ms: u64,
) -> Result<ReadResult, Error> {
    let cfg = config_space(h)?;
    let (vendor, device) = (
        u16::from_le_bytes([cfg[0], cfg[1]]),
        u16::from_le_bytes([cfg[2], cfg[3]]),
    );
    log::info!("function {vendor:04x}:{device:04x}");
    if vendor != 0x1af4 {
        return Err(Error::Device(format!("vendor {vendor:04x} is not virtio")));
    }
    let caps = parse_virtio_caps(&cfg)?;
    log::info!("virtio caps: {caps:x?}");
    let cmd = u16::from_le_bytes([cfg[4], cfg[5]]);
    let on = cmd | CMD_MEMORY | CMD_BUS_MASTER;
    h.backend
        .region_write(VFIO_PCI_CONFIG_REGION_INDEX, PCI_COMMAND, &on.to_le_bytes())
        .map_err(|e| Error::Io("enable bus mastering".into(), e))?;
    let info = h.info();
    let base = match iova {
        Some(i) => i,
        None => pick_iova(&info, BUF_LEN, BUF_LEN)
            .ok_or_else(|| Error::Usage("no usable host IOVA range".into()))?,
    };
    let buf = DmaBuf::new(BUF_LEN as usize, 4096)?;
    // SAFETY: `buf` is only accessed volatile and is unmapped below before it is dropped.
    unsafe { h.space.map_raw(base, BUF_LEN, buf.addr(), Prot::RW) }
        .map_err(|e| Error::Io(format!("VFIO map {base:#x}+{BUF_LEN:#x}"), e))?;
    log::info!("DMA buffer {:#x} mapped at IOVA {base:#x}", buf.addr());
    let common_io = open_cap(h, &caps.common, COMMON_LEN, "common cfg")?;
    let common = Common {
        io: &common_io,
        base: u64::from(caps.common.offset),
    };
    let res = drive(h, &caps, &common, &buf, base, sector, timeout_ms);
    // Stop the device before its memory goes away, whatever happened.
    if let Err(e) = common.reset(timeout_ms) {
        log::error!("final reset: {e}");
    }
    match h.space.unmap_raw(base, BUF_LEN) {
        Ok(n) if n == BUF_LEN => {}
        r => log::error!("VFIO unmap of the DMA buffer: {r:?}"),
    }
    if let Err(e) = h.backend.region_write(
        VFIO_PCI_CONFIG_REGION_INDEX,
        PCI_COMMAND,
        &cmd.to_le_bytes(),
    ) {
        log::warn!("restoring the command register: {e}");
    }
    let r = res?;
    println!(
        "virtio-blk-read: sector={sector} status=ok used_len={} fnv1a64={:#018x} first32={}",
        r.used_len,
        fnv1a64(&r.data),
        hex(&r.data[..32])
    );
    Ok(r)
}

fn drive(
    h: &VfioHandle,
    caps: &VirtioCaps,
    common: &Common,
    buf: &DmaBuf,
    base: u64,
    sector: u64,
    timeout_ms: u64,
) -> Result<ReadResult, Error> {
    common.reset(timeout_ms)?;
    common.set_status(S_ACKNOWLEDGE);
    common.set_status(S_ACKNOWLEDGE | S_DRIVER);
    let c = common.base;
    let mut offered = 0u64;
    for sel in 0..2u32 {
        common.io.write32(c + DEVICE_FEATURE_SELECT, sel);
        offered |= u64::from(common.io.read32(c + DEVICE_FEATURE)) << (32 * sel);
    }
    let features = accepted_features(offered)
        .ok_or_else(|| Error::Device(format!("features {offered:#x} lack VERSION_1")))?;
    log::info!("features offered {offered:#x}, accepting {features:#x}");
    for sel in 0..2u32 {
        common.io.write32(c + DRIVER_FEATURE_SELECT, sel);
        common
            .io
            .write32(c + DRIVER_FEATURE, (features >> (32 * sel)) as u32);
    }
    common.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if common.status() & S_FEATURES_OK == 0 {
        common.set_status(S_FAILED);
        return Err(Error::Device("FEATURES_OK not accepted".into()));
    }
    if let Some(dev) = caps.device.filter(|d| d.length >= 8) {
        let io = BarIo::open(&h.backend, dev.bar, u64::from(dev.offset), 8);
        let lo = u64::from(io.read32(u64::from(dev.offset)));
        let hi = u64::from(io.read32(u64::from(dev.offset) + 4));
        let capacity = hi << 32 | lo;
        log::info!("capacity {capacity} sectors");
        if sector >= capacity {
            return Err(Error::Usage(format!(
                "sector {sector} beyond the disk ({capacity} sectors)"
            )));
        }
    }
    log::info!("{} queues", common.io.read16(c + NUM_QUEUES));
    common.io.write16(c + QUEUE_SELECT, 0);
    let max = common.io.read16(c + QUEUE_SIZE);
    let qsize = queue_size(max);
    if qsize == 0 {
        return Err(Error::Device("queue 0 unavailable".into()));
    }
    common.io.write16(c + QUEUE_SIZE, qsize);
    common.io.write16(c + QUEUE_MSIX_VECTOR, NO_VECTOR);
    let notify_off = common.io.read16(c + QUEUE_NOTIFY_OFF);
    let layout = Layout::new(qsize, 0);
    let mut q = SplitQueue::new(buf, layout);
    common.write64(QUEUE_DESC, base + layout.desc);
    common.write64(QUEUE_DRIVER, base + layout.avail);
    common.write64(QUEUE_DEVICE, base + layout.used);
    common.io.write16(c + QUEUE_ENABLE, 1);
    log::info!("queue 0: size {qsize} (max {max}), notify_off {notify_off}, layout {layout:x?}");
    common.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);

    // Request: header (device-readable), data and status (device-writable).
    buf.write_u32(HDR_OFF, BLK_T_IN);
    buf.write_u32(HDR_OFF + 4, 0);
    buf.write_u64(HDR_OFF + 8, sector);
    for off in (DATA_OFF..DATA_OFF + SECTOR).step_by(4) {
        buf.write_u32(off, 0xa5a5_a5a5);
    }
    buf.write(STATUS_OFF, &[0xff]);
    q.set_desc(
        0,
        Desc {
            addr: base + HDR_OFF,
            len: 16,
            flags: DESC_F_NEXT,
            next: 1,
        },
    );
    q.set_desc(
        1,
        Desc {
            addr: base + DATA_OFF,
            len: SECTOR as u32,
            flags: DESC_F_WRITE | DESC_F_NEXT,
            next: 2,
        },
    );
    q.set_desc(
        2,
        Desc {
            addr: base + STATUS_OFF,
            len: 1,
            flags: DESC_F_WRITE,
            next: 0,
        },
    );
    q.push(0);
    let notify_at =
        u64::from(caps.notify.offset) + u64::from(notify_off) * u64::from(caps.notify_multiplier);
    let notify = BarIo::open(&h.backend, caps.notify.bar, notify_at, 2);
    notify.write16(notify_at, 0);
    log::info!(
        "request posted, notified at BAR{} {notify_at:#x}",
        caps.notify.bar
    );

    let start = now_ns();
    let deadline = start + timeout_ms * 1_000_000;
    let (id, used_len) = loop {
        if let Some(e) = q.pop_used() {
            break e;
        }
        let st = common.status();
        if st & (S_NEEDS_RESET | S_FAILED) != 0 {
            return Err(Error::Device(format!(
                "device status {st:#x} while waiting"
            )));
        }
        if now_ns() > deadline {
            return Err(Error::Timeout(format!(
                "no completion after {timeout_ms} ms (device status {st:#x})"
            )));
        }
        std::thread::yield_now();
    };
    log::info!(
        "completed in {} us: id {id}, len {used_len}",
        (now_ns() - start) / 1000
    );
    let status = buf.read::<1>(STATUS_OFF)[0];
    if id != 0 || status != 0 {
        return Err(Error::Device(format!(
            "request failed: used id {id}, len {used_len}, virtio-blk status {status}"
        )));
    }
    let mut data = Vec::with_capacity(SECTOR as usize);
    for off in (DATA_OFF..DATA_OFF + SECTOR).step_by(4) {
        data.extend(buf.read::<4>(off));
    }
    Ok(ReadResult { data, used_len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_sizes() {
        assert_eq!(queue_size(0), 0);
        assert_eq!(queue_size(1), 1);
        assert_eq!(queue_size(100), 64);
        assert_eq!(queue_size(48), 32);
        assert_eq!(queue_size(u16::MAX), 64);
        // The largest queue's rings end before the request header.
        assert!(Layout::new(MAX_QUEUE, 0).end <= HDR_OFF);
    }

    #[test]
    fn feature_negotiation() {
        assert_eq!(accepted_features(0x1234), None);
        assert_eq!(
            accepted_features(F_VERSION_1 | F_ACCESS_PLATFORM | 0xffff),
            Some(F_VERSION_1 | F_ACCESS_PLATFORM)
        );
        assert_eq!(accepted_features(F_VERSION_1 | 1 << 34), Some(F_VERSION_1));
    }
}
