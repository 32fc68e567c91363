//! A userspace virtio-blk driver over VFIO, just enough to read one sector: modern virtio-pci
//! (common cfg + notify found through the capability list), one split virtqueue polled without
//! interrupts, all rings and buffers in one anonymous buffer mapped into the container at an
//! IOVA of our choice.

use crate::caps::{parse_virtio_caps, VirtioCap, VirtioCaps};
use crate::dma::{BarIo, DmaBuf};
use crate::ring::{Desc, Layout, Mem, SplitQueue, DESC_F_NEXT, DESC_F_WRITE};
use crate::{fnv1a64, hex, now_ns, pick_iova, Error, VfioHandle};
use pci::vfio_backend::{VfioBackend, VFIO_PCI_CONFIG_REGION_INDEX};
use viommu::Prot;

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

/// Register access with offsets relative to one virtio structure.
pub trait Regs {
    /// Read a byte.
    fn read8(&self, off: u64) -> u8;
    /// Read a little-endian u16.
    fn read16(&self, off: u64) -> u16;
    /// Read a little-endian u32.
    fn read32(&self, off: u64) -> u32;
    /// Write a byte.
    fn write8(&self, off: u64, v: u8);
    /// Write a little-endian u16.
    fn write16(&self, off: u64, v: u16);
    /// Write a little-endian u32.
    fn write32(&self, off: u64, v: u32);
}

/// What the driver needs from a virtio-pci function: the common and device structures and the
/// queue doorbell. [`PciTransport`] is the VFIO one; tests plug a fake device.
pub trait Transport {
    /// The common configuration structure.
    fn common(&self) -> &dyn Regs;
    /// The device-specific configuration, if any.
    fn device_cfg(&self) -> Option<&dyn Regs>;
    /// Ring the doorbell of `queue`, whose `queue_notify_off` is `notify_off`.
    fn notify(&self, notify_off: u16, queue: u16);
}

/// A window of a BAR: `base` is the structure's offset in the BAR.
pub struct Window {
    io: BarIo,
    base: u64,
}

impl Regs for Window {
    fn read8(&self, off: u64) -> u8 {
        self.io.read8(self.base + off)
    }
    fn read16(&self, off: u64) -> u16 {
        self.io.read16(self.base + off)
    }
    fn read32(&self, off: u64) -> u32 {
        self.io.read32(self.base + off)
    }
    fn write8(&self, off: u64, v: u8) {
        self.io.write8(self.base + off, v)
    }
    fn write16(&self, off: u64, v: u16) {
        self.io.write16(self.base + off, v)
    }
    fn write32(&self, off: u64, v: u32) {
        self.io.write32(self.base + off, v)
    }
}

/// The virtio-pci structures of a VFIO function, through BAR mmaps (or region reads/writes).
pub struct PciTransport {
    common: Window,
    device: Option<Window>,
    notify: Window,
    multiplier: u32,
}

impl PciTransport {
    /// Open the windows `caps` describe.
    pub fn open(h: &VfioHandle, caps: &VirtioCaps) -> Result<Self, Error> {
        let window = |cap: &VirtioCap, need: u64, what: &str| {
            if u64::from(cap.length) < need {
                return Err(Error::Device(format!(
                    "{what} structure of {} bytes (need {need})",
                    cap.length
                )));
            }
            let base = u64::from(cap.offset);
            Ok(Window {
                io: BarIo::open(&h.backend, cap.bar, base, u64::from(cap.length)),
                base,
            })
        };
        Ok(PciTransport {
            common: window(&caps.common, COMMON_LEN, "common cfg")?,
            device: match &caps.device {
                Some(d) if d.length >= 8 => Some(window(d, 8, "device cfg")?),
                _ => None,
            },
            notify: window(&caps.notify, 2, "notify")?,
            multiplier: caps.notify_multiplier,
        })
    }
}

impl Transport for PciTransport {
    fn common(&self) -> &dyn Regs {
        &self.common
    }
    fn device_cfg(&self) -> Option<&dyn Regs> {
        self.device.as_ref().map(|d| d as &dyn Regs)
    }
    fn notify(&self, notify_off: u16, queue: u16) {
        let off = u64::from(notify_off) * u64::from(self.multiplier);
        log::debug!("notify queue {queue} at notify+{off:#x}");
        self.notify.write16(off, queue);
    }
}

fn status(c: &dyn Regs) -> u8 {
    c.read8(DEVICE_STATUS)
}

fn write64(c: &dyn Regs, off: u64, v: u64) {
    c.write32(off, v as u32);
    c.write32(off + 4, (v >> 32) as u32);
}

/// Reset the device and wait until it reads back 0.
pub fn reset(c: &dyn Regs, timeout_ms: u64) -> Result<(), Error> {
    c.write8(DEVICE_STATUS, 0);
    let deadline = now_ns() + timeout_ms * 1_000_000;
    while status(c) != 0 {
        if now_ns() > deadline {
            return Err(Error::Timeout("device reset".into()));
        }
        std::thread::yield_now();
    }
    Ok(())
}

fn config_space(h: &VfioHandle) -> Result<Vec<u8>, Error> {
    let mut cfg = vec![0u8; 256];
    h.backend
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut cfg)
        .map_err(|e| Error::Io("read config space".into(), e))?;
    Ok(cfg)
}

/// Read sector `sector` of the virtio-blk function behind `h` into an anonymous buffer mapped
/// at `iova` (default: a free spot); prints the result line.
pub fn read_sector(
    h: &VfioHandle,
    sector: u64,
    iova: Option<u64>,
    timeout_ms: u64,
) -> Result<ReadResult, Error> {
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
    let res = read_via(h, &buf, base, sector, timeout_ms);
    match h.space.unmap_raw(base, BUF_LEN) {
        Ok(n) if n == BUF_LEN => {}
        r => log::error!("VFIO unmap of the DMA buffer: {r:?}"),
    }
    let r = res?;
    print_result("virtio-blk-read", sector, &r);
    Ok(r)
}

/// Print one result line: `<what>: sector=S status=ok used_len=L fnv1a64=... first32=...`.
pub fn print_result(what: &str, sector: u64, r: &ReadResult) {
    println!(
        "{what}: sector={sector} status=ok used_len={} fnv1a64={:#018x} first32={}",
        r.used_len,
        fnv1a64(&r.data),
        hex(&r.data[..r.data.len().min(32)])
    );
}

/// Read `sector` with the queue and buffers in `mem`, which the device reaches at IOVA `base`
/// (the caller mapped it). Enables bus mastering for the read and stops the device after it.
pub fn read_via<M: Mem>(
    h: &VfioHandle,
    mem: &M,
    base: u64,
    sector: u64,
    timeout_ms: u64,
) -> Result<ReadResult, Error> {
    if mem.len() < BUF_LEN {
        return Err(Error::Usage(format!(
            "DMA window of {:#x} bytes",
            mem.len()
        )));
    }
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
    let transport = PciTransport::open(h, &caps)?;
    let cmd = u16::from_le_bytes([cfg[4], cfg[5]]);
    let on = cmd | CMD_MEMORY | CMD_BUS_MASTER;
    h.backend
        .region_write(VFIO_PCI_CONFIG_REGION_INDEX, PCI_COMMAND, &on.to_le_bytes())
        .map_err(|e| Error::Io("enable bus mastering".into(), e))?;
    let res = drive(&transport, mem, base, sector, timeout_ms);
    // Stop the device before its memory goes away, whatever happened.
    if let Err(e) = reset(transport.common(), timeout_ms) {
        log::error!("final reset: {e}");
    }
    if let Err(e) = h.backend.region_write(
        VFIO_PCI_CONFIG_REGION_INDEX,
        PCI_COMMAND,
        &cmd.to_le_bytes(),
    ) {
        log::warn!("restoring the command register: {e}");
    }
    res
}

/// Initialise the device, set up queue 0 in `buf` (device address `base`), read `sector`.
pub fn drive<M: Mem>(
    t: &dyn Transport,
    buf: &M,
    base: u64,
    sector: u64,
    timeout_ms: u64,
) -> Result<ReadResult, Error> {
    let c = t.common();
    reset(c, timeout_ms)?;
    c.write8(DEVICE_STATUS, S_ACKNOWLEDGE);
    c.write8(DEVICE_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    let mut offered = 0u64;
    for sel in 0..2u32 {
        c.write32(DEVICE_FEATURE_SELECT, sel);
        offered |= u64::from(c.read32(DEVICE_FEATURE)) << (32 * sel);
    }
    let Some(features) = accepted_features(offered) else {
        c.write8(DEVICE_STATUS, S_FAILED);
        return Err(Error::Device(format!(
            "features {offered:#x} lack VERSION_1"
        )));
    };
    log::info!("features offered {offered:#x}, accepting {features:#x}");
    for sel in 0..2u32 {
        c.write32(DRIVER_FEATURE_SELECT, sel);
        c.write32(DRIVER_FEATURE, (features >> (32 * sel)) as u32);
    }
    c.write8(DEVICE_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if status(c) & S_FEATURES_OK == 0 {
        c.write8(DEVICE_STATUS, S_FAILED);
        return Err(Error::Device("FEATURES_OK not accepted".into()));
    }
    if let Some(dev) = t.device_cfg() {
        let capacity = u64::from(dev.read32(4)) << 32 | u64::from(dev.read32(0));
        log::info!("capacity {capacity} sectors");
        if sector >= capacity {
            return Err(Error::Usage(format!(
                "sector {sector} beyond the disk ({capacity} sectors)"
            )));
        }
    }
    log::info!("{} queues", c.read16(NUM_QUEUES));
    c.write16(QUEUE_SELECT, 0);
    let max = c.read16(QUEUE_SIZE);
    let qsize = queue_size(max);
    if qsize == 0 {
        return Err(Error::Device("queue 0 unavailable".into()));
    }
    c.write16(QUEUE_SIZE, qsize);
    c.write16(QUEUE_MSIX_VECTOR, NO_VECTOR);
    let notify_off = c.read16(QUEUE_NOTIFY_OFF);
    let layout = Layout::new(qsize, 0);
    let mut q = SplitQueue::new(buf, layout);
    write64(c, QUEUE_DESC, base + layout.desc);
    write64(c, QUEUE_DRIVER, base + layout.avail);
    write64(c, QUEUE_DEVICE, base + layout.used);
    c.write16(QUEUE_ENABLE, 1);
    log::info!("queue 0: size {qsize} (max {max}), notify_off {notify_off}, layout {layout:x?}");
    c.write8(
        DEVICE_STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );

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
    t.notify(notify_off, 0);
    log::info!("request posted and notified");

    let start = now_ns();
    let deadline = start + timeout_ms * 1_000_000;
    let (id, used_len) = loop {
        if let Some(e) = q.pop_used() {
            break e;
        }
        let st = status(c);
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
    use std::cell::RefCell;

    const IOVA: u64 = 0x10_0000;
    const NOTIFY_OFF: u16 = 3;

    #[derive(Default)]
    struct State {
        dfsel: u32,
        gfsel: u32,
        driver_features: u64,
        status: u8,
        qsel: u16,
        qsize: u16,
        msix: u16,
        enable: u16,
        addrs: [u32; 6],
        notifies: Vec<(u16, u16)>,
        last_avail: u16,
        used_idx: u16,
    }

    /// A virtio-blk device model on the other side of the DMA buffer.
    struct FakeBlk<'a, M: Mem = DmaBuf> {
        mem: &'a M,
        disk: Vec<u8>,
        offered: u64,
        refuse_features: bool,
        respond: bool,
        io_error: bool,
        cfg: Capacity,
        s: RefCell<State>,
    }

    struct Capacity(u64);

    impl Regs for Capacity {
        fn read8(&self, _: u64) -> u8 {
            0
        }
        fn read16(&self, _: u64) -> u16 {
            0
        }
        fn read32(&self, off: u64) -> u32 {
            match off {
                0 => self.0 as u32,
                4 => (self.0 >> 32) as u32,
                _ => 0,
            }
        }
        fn write8(&self, _: u64, _: u8) {}
        fn write16(&self, _: u64, _: u16) {}
        fn write32(&self, _: u64, _: u32) {}
    }

    impl<'a, M: Mem> FakeBlk<'a, M> {
        fn new(mem: &'a M) -> Self {
            let disk: Vec<u8> = (0..64 * 512u32).map(|i| (i * 7 + i / 512) as u8).collect();
            FakeBlk {
                mem,
                cfg: Capacity(disk.len() as u64 / 512),
                disk,
                offered: F_VERSION_1 | F_ACCESS_PLATFORM | (1 << 9) | (1 << 34),
                refuse_features: false,
                respond: true,
                io_error: false,
                s: RefCell::new(State {
                    qsize: 256,
                    ..State::default()
                }),
            }
        }

        fn off(&self, iova: u64, len: u64) -> u64 {
            let o = iova.checked_sub(IOVA).expect("IOVA below the buffer");
            assert!(
                o + len <= self.mem.len(),
                "IOVA {iova:#x}+{len} outside the buffer"
            );
            o
        }

        fn addr(&self, i: usize) -> u64 {
            let s = self.s.borrow();
            u64::from(s.addrs[i + 1]) << 32 | u64::from(s.addrs[i])
        }

        /// Serve every new available chain.
        fn process(&self) {
            let (desc, avail, used) = (self.addr(0), self.addr(2), self.addr(4));
            let mut s = self.s.borrow_mut();
            assert_eq!(s.enable, 1, "queue not enabled");
            assert_ne!(s.status & S_DRIVER_OK, 0, "DRIVER_OK not set");
            let q = u64::from(s.qsize);
            let m = self.mem;
            let avail_idx = m.read_u16(self.off(avail + 2, 2));
            while s.last_avail != avail_idx {
                let head = m.read_u16(self.off(avail + 4 + 2 * (u64::from(s.last_avail) % q), 2));
                s.last_avail = s.last_avail.wrapping_add(1);
                let mut chain = Vec::new();
                let mut i = head;
                loop {
                    let d = self.off(desc + 16 * u64::from(i), 16);
                    let addr = u64::from_le_bytes(m.read(d));
                    let len = m.read_u32(d + 8);
                    let flags = m.read_u16(d + 12);
                    chain.push((addr, len, flags));
                    if flags & DESC_F_NEXT == 0 || chain.len() > 8 {
                        break;
                    }
                    i = m.read_u16(d + 14);
                }
                assert_eq!(chain.len(), 3);
                let (h, data, st) = (chain[0], chain[1], chain[2]);
                assert_eq!((h.1, h.2 & DESC_F_WRITE), (16, 0));
                assert_eq!((data.1, data.2 & DESC_F_WRITE), (512, DESC_F_WRITE));
                assert_eq!((st.1, st.2), (1, DESC_F_WRITE));
                let ho = self.off(h.0, 16);
                assert_eq!(m.read_u32(ho), BLK_T_IN);
                let sector = u64::from_le_bytes(m.read(ho + 8));
                let at = (sector * 512) as usize;
                let status = if self.io_error || at + 512 > self.disk.len() {
                    1
                } else {
                    m.write(self.off(data.0, 512), &self.disk[at..at + 512]);
                    0
                };
                m.write(self.off(st.0, 1), &[status]);
                let slot = used + 4 + 8 * (u64::from(s.used_idx) % q);
                m.write_u32(self.off(slot, 8), u32::from(head));
                m.write_u32(self.off(slot, 8) + 4, 513);
                s.used_idx = s.used_idx.wrapping_add(1);
                m.write_u16(self.off(used + 2, 2), s.used_idx);
            }
        }
    }

    impl<M: Mem> Regs for FakeBlk<'_, M> {
        fn read8(&self, off: u64) -> u8 {
            match off {
                DEVICE_STATUS => self.s.borrow().status,
                _ => 0,
            }
        }
        fn read16(&self, off: u64) -> u16 {
            let s = self.s.borrow();
            match off {
                NUM_QUEUES => 1,
                QUEUE_SIZE if s.qsel == 0 => s.qsize,
                QUEUE_NOTIFY_OFF => NOTIFY_OFF,
                _ => 0,
            }
        }
        fn read32(&self, off: u64) -> u32 {
            match off {
                DEVICE_FEATURE => (self.offered >> (32 * self.s.borrow().dfsel)) as u32,
                _ => 0,
            }
        }
        fn write8(&self, off: u64, v: u8) {
            assert_eq!(off, DEVICE_STATUS);
            let mut s = self.s.borrow_mut();
            if v == 0 {
                *s = State {
                    qsize: 256,
                    notifies: std::mem::take(&mut s.notifies),
                    ..State::default()
                };
                return;
            }
            let mut v = v;
            let f = s.driver_features;
            if v & S_FEATURES_OK != 0
                && (self.refuse_features || f & !self.offered != 0 || f & F_VERSION_1 == 0)
            {
                v &= !S_FEATURES_OK;
            }
            s.status = v;
        }
        fn write16(&self, off: u64, v: u16) {
            let mut s = self.s.borrow_mut();
            match off {
                QUEUE_SELECT => s.qsel = v,
                QUEUE_SIZE => {
                    assert!(v.is_power_of_two() && v <= 256);
                    s.qsize = v;
                }
                QUEUE_MSIX_VECTOR => s.msix = v,
                QUEUE_ENABLE => s.enable = v,
                _ => panic!("16-bit write at {off}"),
            }
        }
        fn write32(&self, off: u64, v: u32) {
            let mut s = self.s.borrow_mut();
            match off {
                DEVICE_FEATURE_SELECT => s.dfsel = v,
                DRIVER_FEATURE_SELECT => s.gfsel = v,
                DRIVER_FEATURE => {
                    let sh = 32 * s.gfsel;
                    s.driver_features =
                        s.driver_features & !(0xffff_ffffu64 << sh) | u64::from(v) << sh;
                }
                QUEUE_DESC..=0x37 => s.addrs[((off - QUEUE_DESC) / 4) as usize] = v,
                _ => panic!("32-bit write at {off}"),
            }
        }
    }

    impl<M: Mem> Transport for FakeBlk<'_, M> {
        fn common(&self) -> &dyn Regs {
            self
        }
        fn device_cfg(&self) -> Option<&dyn Regs> {
            Some(&self.cfg)
        }
        fn notify(&self, notify_off: u16, queue: u16) {
            self.s.borrow_mut().notifies.push((notify_off, queue));
            if self.respond {
                self.process();
            }
        }
    }

    fn buffer() -> DmaBuf {
        DmaBuf::new(BUF_LEN as usize, 4096).unwrap()
    }

    #[test]
    fn reads_a_sector_from_a_device_model() {
        let buf = buffer();
        let dev = FakeBlk::new(&buf);
        let r = drive(&dev, &buf, IOVA, 5, 1000).unwrap();
        assert_eq!(r.data, dev.disk[5 * 512..6 * 512]);
        assert_eq!(r.used_len, 513);
        let s = dev.s.borrow();
        assert_eq!(s.driver_features, F_VERSION_1 | F_ACCESS_PLATFORM);
        assert_eq!(s.qsize, MAX_QUEUE);
        assert_eq!(s.msix, NO_VECTOR);
        assert_eq!(s.notifies, vec![(NOTIFY_OFF, 0)]);
        assert_eq!(
            s.status,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
        );
        // The rings were given as IOVAs inside our buffer.
        drop(s);
        assert_eq!(dev.addr(0), IOVA);
        assert_eq!(dev.addr(4), IOVA + Layout::new(MAX_QUEUE, 0).used);
        // A second read on the same device (driver resets it first).
        let r = drive(&dev, &buf, IOVA, 63, 1000).unwrap();
        assert_eq!(r.data, dev.disk[63 * 512..]);
    }

    #[test]
    fn reads_into_guest_ram_across_a_region_edge() {
        use crate::shadowed::{guest_ram, GuestWindow, REGION};
        let ram = guest_ram().unwrap();
        let win = GuestWindow::new(ram.clone(), REGION - BUF_LEN / 2, BUF_LEN);
        let dev = FakeBlk::new(&win);
        let r = drive(&dev, &win, IOVA, 9, 1000).unwrap();
        assert_eq!(r.data, dev.disk[9 * 512..10 * 512]);
        // The data buffer (offset DATA_OFF, past the edge) really is in the second region.
        let mut b = [0u8; 4];
        vm_memory::Bytes::read_slice(
            &ram,
            &mut b,
            vm_memory::GuestAddress(REGION - BUF_LEN / 2 + DATA_OFF),
        )
        .unwrap();
        assert_eq!(b[..], dev.disk[9 * 512..9 * 512 + 4]);
    }

    #[test]
    fn device_failures_are_errors_not_hangs() {
        let buf = buffer();
        let mut dev = FakeBlk::new(&buf);
        dev.offered = F_ACCESS_PLATFORM;
        assert!(matches!(
            drive(&dev, &buf, IOVA, 0, 100),
            Err(Error::Device(_))
        ));
        assert_eq!(dev.s.borrow().status, S_FAILED);

        let mut dev = FakeBlk::new(&buf);
        dev.refuse_features = true;
        assert!(matches!(
            drive(&dev, &buf, IOVA, 0, 100),
            Err(Error::Device(_))
        ));

        let dev = FakeBlk::new(&buf);
        assert!(matches!(
            drive(&dev, &buf, IOVA, 64, 100),
            Err(Error::Usage(_))
        ));
        assert!(dev.s.borrow().notifies.is_empty());

        let mut dev = FakeBlk::new(&buf);
        dev.respond = false;
        assert!(matches!(
            drive(&dev, &buf, IOVA, 0, 30),
            Err(Error::Timeout(_))
        ));

        let mut dev = FakeBlk::new(&buf);
        dev.io_error = true;
        assert!(matches!(
            drive(&dev, &buf, IOVA, 0, 100),
            Err(Error::Device(_))
        ));
    }

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
