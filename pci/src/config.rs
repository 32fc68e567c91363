//! A type 0 PCI function's 4 KiB config space: header, BAR registers with sizing, command
//! register decoding, and the capability list.
//!
//! Every register is backed by bytes plus a per-byte writable mask, so a guest write only ever
//! changes writable bits. BAR sizing falls out of the masks: writing all-ones leaves exactly the
//! address bits the BAR's size allows.

use crate::device::{BarKind, BarRegion};
use crate::PciError;
use log::warn;

/// Size of a PCIe function's config space.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Offset of the command register.
pub const COMMAND: u16 = 0x04;
/// Offset of the status register.
pub const STATUS: u16 = 0x06;
/// Offset of the first BAR register.
pub const BAR0: u16 = 0x10;
/// One past the last BAR register.
pub const BAR_END: u16 = 0x28;
/// Offset of the capabilities pointer.
pub const CAPABILITIES_POINTER: u16 = 0x34;
/// Number of BARs in a type 0 header.
pub const NUM_BARS: usize = 6;

/// Command register: I/O space decoding enable.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: memory space decoding enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master enable.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_WRITABLE: u16 = COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_BUS_MASTER
    | (1 << 6) // parity error response
    | (1 << 8) // SERR# enable
    | (1 << 10); // INTx disable
const STATUS_CAPABILITIES: u16 = 1 << 4;
const FIRST_CAPABILITY: usize = 0x40;
const CAPABILITIES_END: usize = 0x100;

/// Identity of a function, written into its header once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision_id: u8,
    /// Base class code.
    pub class: u8,
    /// Sub-class code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Interrupt pin (0 = no INTx, 1..=4 = INTA..INTD).
    pub interrupt_pin: u8,
}

/// The config space of one type 0 function.
pub struct PciConfigSpace {
    regs: Box<[u8; CONFIG_SPACE_SIZE]>,
    wmask: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: [Option<BarRegion>; NUM_BARS],
    next_capability: usize,
    last_capability: Option<usize>,
}

impl PciConfigSpace {
    /// A config space with `header` filled in, no BARs and no capabilities.
    pub fn new(header: &PciHeader) -> Self {
        let mut cfg = PciConfigSpace {
            regs: Box::new([0; CONFIG_SPACE_SIZE]),
            wmask: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: [None; NUM_BARS],
            next_capability: FIRST_CAPABILITY,
            last_capability: None,
        };
        cfg.set_u16(0x00, header.vendor_id);
        cfg.set_u16(0x02, header.device_id);
        cfg.regs[0x08] = header.revision_id;
        cfg.regs[0x09] = header.prog_if;
        cfg.regs[0x0a] = header.subclass;
        cfg.regs[0x0b] = header.class;
        cfg.set_u16(0x2c, header.subsystem_vendor_id);
        cfg.set_u16(0x2e, header.subsystem_id);
        cfg.regs[0x3d] = header.interrupt_pin;
        cfg.set_wmask_u16(COMMAND, COMMAND_WRITABLE);
        cfg.wmask[0x0c] = 0xff; // cache line size
        cfg.wmask[0x3c] = 0xff; // interrupt line
        cfg
    }

    /// Declare a BAR. Its register reads back the kind bits and an address of zero.
    pub fn add_bar(&mut self, bar: &BarRegion) -> Result<(), PciError> {
        let index = bar.index;
        let invalid = |reason| PciError::InvalidBar { index, reason };
        let slots = if bar.kind == BarKind::Mem64 { 2 } else { 1 };
        let i = usize::from(index);
        if i + slots > NUM_BARS {
            return Err(invalid("index out of range"));
        }
        if (i..i + slots).any(|s| self.bar_slot_used(s)) {
            return Err(invalid("slot already used"));
        }
        let min = if bar.kind == BarKind::Io { 4 } else { 16 };
        if !bar.size.is_power_of_two() || bar.size < min {
            return Err(invalid(
                "size must be a power of two of at least 16 (4 for I/O)",
            ));
        }
        if bar.kind != BarKind::Mem64 && bar.size > 1 << 31 {
            return Err(invalid("size too large for a 32-bit BAR"));
        }
        let mask = !(bar.size - 1);
        let reg = bar_reg(i);
        match bar.kind {
            BarKind::Io => {
                self.set_u32(reg, 0x1);
                self.set_wmask_u32(reg, mask as u32 & !0x3);
            }
            BarKind::Mem32 | BarKind::Mem64 => {
                let mut flags = if bar.prefetchable { 0x8 } else { 0 };
                if bar.kind == BarKind::Mem64 {
                    flags |= 0x4;
                    self.set_wmask_u32(reg + 4, (mask >> 32) as u32);
                }
                self.set_u32(reg, flags);
                self.set_wmask_u32(reg, mask as u32 & !0xf);
            }
        }
        self.bars[i] = Some(*bar);
        Ok(())
    }

    /// The BAR declared at `index` (the low slot of a 64-bit BAR).
    pub fn bar(&self, index: u8) -> Option<BarRegion> {
        self.bars.get(usize::from(index)).copied().flatten()
    }

    /// Program BAR `index` with `address` (low bits below the BAR size are dropped).
    pub fn set_bar_address(&mut self, index: u8, address: u64) {
        let Some(bar) = self.bar(index) else {
            warn!("pci: set_bar_address on undeclared BAR {index}");
            return;
        };
        let reg = bar_reg(usize::from(index));
        let mask = !(bar.size - 1);
        let low_mask = self.wmask_u32(reg);
        let low = (self.u32_at(reg) & !low_mask) | (address as u32 & low_mask);
        self.set_u32(reg, low);
        if bar.kind == BarKind::Mem64 {
            self.set_u32(reg + 4, ((address & mask) >> 32) as u32);
        }
    }

    /// The address programmed in BAR `index`, whether or not decoding is enabled.
    pub fn bar_programmed_address(&self, index: u8) -> Option<u64> {
        let bar = self.bar(index)?;
        let reg = bar_reg(usize::from(index));
        let low = u64::from(self.u32_at(reg));
        Some(match bar.kind {
            BarKind::Io => low & !0x3,
            BarKind::Mem32 => low & !0xf,
            BarKind::Mem64 => (u64::from(self.u32_at(reg + 4)) << 32) | (low & !0xf),
        })
    }

    /// Where BAR `index` decodes: its address if the command register enables its kind.
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        let bar = self.bar(index)?;
        let enable = match bar.kind {
            BarKind::Io => COMMAND_IO,
            BarKind::Mem32 | BarKind::Mem64 => COMMAND_MEMORY,
        };
        if self.command() & enable == 0 {
            return None;
        }
        self.bar_programmed_address(index)
    }

    /// The BAR (index, offset) that decodes `[addr, addr + len)` entirely, if any.
    pub fn find_bar(&self, addr: u64, len: u64) -> Option<(u8, u64)> {
        (0..NUM_BARS as u8).find_map(|i| {
            let base = self.bar_address(i)?;
            let size = self.bar(i)?.size;
            let offset = addr.checked_sub(base)?;
            (offset.checked_add(len)? <= size).then_some((i, offset))
        })
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(usize::from(COMMAND))
    }

    /// Append a capability. `data[0]` is the capability ID, `data[1]` (the next pointer) is
    /// filled in here; `wmask` marks the bits the guest may change and must match `data`'s length.
    /// Returns the capability's offset in config space.
    pub fn add_capability(&mut self, data: &[u8], wmask: &[u8]) -> Result<u8, PciError> {
        if data.len() < 2 {
            return Err(PciError::InvalidCapability(
                "shorter than its 2-byte header",
            ));
        }
        if wmask.len() != data.len() {
            return Err(PciError::InvalidCapability(
                "mask length differs from data length",
            ));
        }
        let offset = self.next_capability;
        let end = offset + data.len();
        if end > CAPABILITIES_END {
            return Err(PciError::CapabilitySpaceFull(data.len()));
        }
        self.regs[offset..end].copy_from_slice(data);
        self.wmask[offset..end].copy_from_slice(wmask);
        self.regs[offset + 1] = 0;
        self.wmask[offset..offset + 2].fill(0);
        match self.last_capability {
            Some(last) => self.regs[last + 1] = offset as u8,
            None => self.regs[usize::from(CAPABILITIES_POINTER)] = offset as u8,
        }
        let status = self.u16_at(usize::from(STATUS)) | STATUS_CAPABILITIES;
        self.set_u16(usize::from(STATUS), status);
        self.last_capability = Some(offset);
        self.next_capability = (end + 3) & !3;
        Ok(offset as u8)
    }

    /// Guest read of 1, 2 or 4 naturally aligned bytes; anything else reads all-ones.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        match checked_range(offset, data.len()) {
            Some(r) => data.copy_from_slice(&self.regs[r]),
            None => {
                virtio_dev::guest_warn!("pci: bad config read at {offset:#x} size {}", data.len());
                data.fill(0xff);
            }
        }
    }

    /// Guest write of 1, 2 or 4 naturally aligned bytes; only writable bits change.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(r) = checked_range(offset, data.len()) else {
            virtio_dev::guest_warn!("pci: bad config write at {offset:#x} size {}", data.len());
            return;
        };
        for (i, v) in r.zip(data) {
            self.regs[i] = (self.regs[i] & !self.wmask[i]) | (v & self.wmask[i]);
        }
    }

    /// Little-endian u16 at `offset` (for devices reacting to their own registers).
    pub fn read_u16(&self, offset: u16) -> u16 {
        let o = usize::from(offset);
        if o + 2 > CONFIG_SPACE_SIZE {
            return 0xffff;
        }
        self.u16_at(o)
    }

    /// Device-side store of `data` at `offset`, ignoring the writable mask (e.g. a register
    /// the device computes on read). Out-of-range stores are dropped with a log line.
    pub fn set_bytes(&mut self, offset: u16, data: &[u8]) {
        let start = usize::from(offset);
        match self.regs.get_mut(start..start + data.len()) {
            Some(dst) => dst.copy_from_slice(data),
            None => warn!(
                "pci: set_bytes at {offset:#x} size {} out of range",
                data.len()
            ),
        }
    }

    fn bar_slot_used(&self, slot: usize) -> bool {
        self.bars[slot].is_some()
            || (slot > 0 && matches!(self.bars[slot - 1], Some(b) if b.kind == BarKind::Mem64))
    }

    fn u16_at(&self, o: usize) -> u16 {
        u16::from_le_bytes([self.regs[o], self.regs[o + 1]])
    }

    fn u32_at(&self, o: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.regs[o..o + 4]);
        u32::from_le_bytes(b)
    }

    fn wmask_u32(&self, o: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.wmask[o..o + 4]);
        u32::from_le_bytes(b)
    }

    fn set_u16(&mut self, o: usize, v: u16) {
        self.regs[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_u32(&mut self, o: usize, v: u32) {
        self.regs[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn set_wmask_u16(&mut self, o: u16, v: u16) {
        let o = usize::from(o);
        self.wmask[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_wmask_u32(&mut self, o: usize, v: u32) {
        self.wmask[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }
}

fn bar_reg(index: usize) -> usize {
    usize::from(BAR0) + 4 * index
}

/// The byte range of a valid config access: 1, 2 or 4 bytes, naturally aligned, in bounds.
fn checked_range(offset: u16, len: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::from(offset);
    let ok = matches!(len, 1 | 2 | 4) && start % len == 0 && start + len <= CONFIG_SPACE_SIZE;
    ok.then_some(start..start + len)
}

/// True if the config access `[offset, offset + len)` touches `[start, end)`.
pub fn overlaps(offset: u16, len: usize, start: u16, end: u16) -> bool {
    let (o, s, e) = (usize::from(offset), usize::from(start), usize::from(end));
    o < e && o + len > s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            revision_id: 2,
            class: 0x01,
            subclass: 0x80,
            prog_if: 0x05,
            subsystem_vendor_id: 0xaaaa,
            subsystem_id: 0xbbbb,
            interrupt_pin: 1,
        }
    }

    fn r32(c: &PciConfigSpace, o: u16) -> u32 {
        let mut b = [0; 4];
        c.read(o, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(c: &mut PciConfigSpace, o: u16, v: u32) {
        c.write(o, &v.to_le_bytes());
    }

    fn bar(index: u8, size: u64, kind: BarKind, prefetchable: bool) -> BarRegion {
        BarRegion {
            index,
            size,
            kind,
            prefetchable,
        }
    }

    #[test]
    fn header_fields_and_read_only_ids() {
        let mut c = PciConfigSpace::new(&header());
        assert_eq!(r32(&c, 0), 0x5678_1234);
        assert_eq!(r32(&c, 8), 0x0180_0502);
        assert_eq!(r32(&c, 0x2c), 0xbbbb_aaaa);
        assert_eq!(r32(&c, 0x3c) >> 8 & 0xff, 1);
        w32(&mut c, 0, 0xffff_ffff);
        w32(&mut c, 8, 0xffff_ffff);
        assert_eq!(r32(&c, 0), 0x5678_1234);
        assert_eq!(r32(&c, 8), 0x0180_0502);
        // Interrupt line is writable, pin is not.
        c.write(0x3c, &[0x0b, 0x0b]);
        assert_eq!(r32(&c, 0x3c) & 0xffff, 0x010b);
        // Command: only the defined bits stick; status ignores writes.
        w32(&mut c, 4, 0xffff_ffff);
        assert_eq!(r32(&c, 4), u32::from(COMMAND_WRITABLE));
        // Extended space reads zero and cannot be written.
        w32(&mut c, 0x100, 0xdead_beef);
        assert_eq!(r32(&c, 0x100), 0);
    }

    #[test]
    fn bar_sizing_32_64_io() {
        let mut c = PciConfigSpace::new(&header());
        c.add_bar(&bar(0, 0x1000, BarKind::Mem32, false)).unwrap();
        c.add_bar(&bar(1, 0x10_0000, BarKind::Mem64, true)).unwrap();
        c.add_bar(&bar(3, 0x20, BarKind::Io, false)).unwrap();
        assert_eq!(r32(&c, 0x10), 0);
        assert_eq!(r32(&c, 0x14), 0xc);
        assert_eq!(r32(&c, 0x1c), 0x1);
        for o in (0x10..0x28).step_by(4) {
            w32(&mut c, o, 0xffff_ffff);
        }
        assert_eq!(r32(&c, 0x10), 0xffff_f000);
        assert_eq!(r32(&c, 0x14), 0xfff0_000c);
        assert_eq!(r32(&c, 0x18), 0xffff_ffff);
        assert_eq!(r32(&c, 0x1c), 0xffff_ffe1);
        // Unimplemented BARs read zero even after an all-ones write.
        assert_eq!(r32(&c, 0x20), 0);
        assert_eq!(r32(&c, 0x24), 0);
        // Expansion ROM absent.
        w32(&mut c, 0x30, 0xffff_ffff);
        assert_eq!(r32(&c, 0x30), 0);
    }

    #[test]
    fn bar_address_follows_decoding_and_moves() {
        let mut c = PciConfigSpace::new(&header());
        c.add_bar(&bar(0, 0x4000, BarKind::Mem64, false)).unwrap();
        c.add_bar(&bar(2, 0x100, BarKind::Io, false)).unwrap();
        c.set_bar_address(0, 0x1_2345_8000);
        c.set_bar_address(2, 0xc000);
        assert_eq!(c.bar_programmed_address(0), Some(0x1_2345_8000));
        assert_eq!(c.bar_address(0), None);
        assert_eq!(c.bar_address(2), None);
        w32(&mut c, 4, u32::from(COMMAND_MEMORY));
        assert_eq!(c.bar_address(0), Some(0x1_2345_8000));
        assert_eq!(c.bar_address(2), None);
        w32(&mut c, 4, u32::from(COMMAND_MEMORY | COMMAND_IO));
        assert_eq!(c.bar_address(2), Some(0xc000));
        // The guest moves the 64-bit BAR; low bits below the size are read-only.
        w32(&mut c, 0x10, 0xe000_1fff);
        w32(&mut c, 0x14, 0x2);
        assert_eq!(c.bar_address(0), Some(0x2_e000_0000));
        assert_eq!(r32(&c, 0x10), 0xe000_0004);
        assert_eq!(c.find_bar(0x2_e000_3ff0, 0x10), Some((0, 0x3ff0)));
        assert_eq!(c.find_bar(0x2_e000_3ff8, 0x10), None);
        assert_eq!(c.find_bar(0xc010, 2), Some((2, 0x10)));
        assert_eq!(c.bar_address(1), None);
        assert_eq!(c.bar_address(200), None);
    }

    #[test]
    fn invalid_bars_are_rejected() {
        let mut c = PciConfigSpace::new(&header());
        assert!(c.add_bar(&bar(5, 0x1000, BarKind::Mem64, false)).is_err());
        assert!(c.add_bar(&bar(6, 0x1000, BarKind::Mem32, false)).is_err());
        assert!(c.add_bar(&bar(0, 0x1001, BarKind::Mem32, false)).is_err());
        assert!(c.add_bar(&bar(0, 8, BarKind::Mem32, false)).is_err());
        c.add_bar(&bar(0, 0x1000, BarKind::Mem64, false)).unwrap();
        assert!(c.add_bar(&bar(1, 0x1000, BarKind::Mem32, false)).is_err());
        assert!(c.add_bar(&bar(0, 0x1000, BarKind::Mem32, false)).is_err());
    }

    #[test]
    fn capability_walk() {
        let mut c = PciConfigSpace::new(&header());
        assert_eq!(r32(&c, 4) >> 16 & u32::from(STATUS_CAPABILITIES), 0);
        let a = c.add_capability(&[0x09, 0xee, 5, 1, 2], &[0; 5]).unwrap();
        let b = c
            .add_capability(&[0x11, 0, 0, 0], &[0, 0, 0, 0xc0])
            .unwrap();
        let d = c
            .add_capability(&[0x05, 0, 1, 2, 3, 4, 5, 6], &[0; 8])
            .unwrap();
        assert!(r32(&c, 4) >> 16 & u32::from(STATUS_CAPABILITIES) != 0);
        let mut walked = vec![];
        let mut ptr = r32(&c, 0x34) as u8;
        while ptr != 0 {
            let mut hdr = [0; 2];
            c.read(u16::from(ptr), &mut hdr);
            walked.push((ptr, hdr[0]));
            ptr = hdr[1];
        }
        assert_eq!(walked, vec![(a, 0x09), (b, 0x11), (d, 0x05)]);
        assert_eq!(a, 0x40);
        assert_eq!(b % 4, 0);
        // Only masked capability bits are writable; the next pointer never is.
        w32(&mut c, u16::from(b), 0xffff_ffff);
        assert_eq!(
            r32(&c, u16::from(b)),
            0xc000_0000 | u32::from(d) << 8 | 0x11
        );
        assert!(c.add_capability(&[0; 200], &[0; 200]).is_err());
        assert!(c.add_capability(&[0], &[0]).is_err());
        assert!(c.add_capability(&[0, 0, 0], &[0]).is_err());
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let mut c = PciConfigSpace::new(&header());
        for &(off, len) in &[
            (0x1u16, 2usize),
            (0x2, 4),
            (0xfff, 2),
            (0xffe, 4),
            (0xfff, 1),
            (0, 3),
            (0, 8),
            (0, 0),
            (0xffff, 4),
        ] {
            let mut d = vec![0u8; len];
            c.read(off, &mut d);
            if len != 1 || off >= 0x1000 {
                assert!(d.iter().all(|&b| b == 0xff), "off {off:#x} len {len}");
            }
            c.write(off, &vec![0xffu8; len]);
        }
        assert_eq!(r32(&c, 0), 0x5678_1234);
        assert_eq!(c.read_u16(0xffff), 0xffff);
    }
}
