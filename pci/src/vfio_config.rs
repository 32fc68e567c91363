//! Which bytes of a passthrough function's config space the guest sees from the device and
//! which we emulate, and the rewritten capability chain.
//!
//! Policy (standard 256-byte space; the extended space reads zero: no extended capability is
//! exposed, so resizable BARs, SR-IOV, ATS/PRI/PASID, AER and the like stay invisible):
//! - header: IDs, class, status and the other read-only registers come from the device; BARs
//!   and the interrupt line are emulated; the expansion ROM and the interrupt pin read zero
//!   (no ROM, no INTx), the header type reads 0 (single-function type 0 header, the only kind
//!   vfio-pci binds); the command register is forwarded, its I/O and memory decode bits read
//!   back as the guest last set them;
//! - capabilities kept, at their device offsets: power management and vendor-specific ones
//!   (passed through: virtio-pci devices need theirs, the host's vfio-pci already filters
//!   config writes), PCI Express (passed through, except that Function Level Reset is turned
//!   into a VFIO device reset), MSI and MSI-X (emulated);
//! - every other capability is unlinked from the chain and its bytes read zero: we do not
//!   know its semantics, and hiding is what a guest copes with best (e.g. PCI Advanced
//!   Features would offer a second, unmediated FLR).

use crate::msi::{msi_cap_len, MSI_CAP_ID};
use crate::msix::{MSIX_CAP_ID, MSIX_CAP_LEN};

/// Power management capability ID.
pub const PM_CAP_ID: u8 = 0x01;
/// Vendor-specific capability ID.
pub const VENDOR_CAP_ID: u8 = 0x09;
/// PCI Express capability ID.
pub const PCIE_CAP_ID: u8 = 0x10;
/// Offset of the high byte of Device Control inside the PCI Express capability.
pub const PCIE_DEVCTL_HIGH: u16 = 9;
/// Initiate Function Level Reset, in the high byte of Device Control.
pub const PCIE_DEVCTL_FLR: u8 = 0x80;
const PM_CAP_LEN: u16 = 8;
const PCIE_CAP_LEN: u16 = 0x3c;
const PCIE_CAP_V1_LEN: u16 = 0x24;
const FIRST_CAP: u16 = 0x40;
const STD_END: u16 = 0x100;
/// More capabilities than fit in 192 bytes means a loop in the chain.
const MAX_CAPS: usize = 48;

/// How a kept capability is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapKind {
    /// Emulated MSI.
    Msi,
    /// Emulated MSI-X.
    Msix,
    /// PCI Express, passed through with FLR trapped.
    Pcie,
    /// Passed through as is.
    Passthrough,
}

/// A capability visible to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeptCap {
    /// Capability ID.
    pub id: u8,
    /// Offset in config space (as on the device).
    pub offset: u16,
    /// Length in bytes.
    pub len: u16,
    /// Handling.
    pub kind: CapKind,
}

/// Where the guest's view of one config byte comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteSource {
    /// Read from and written to the device.
    Device,
    /// Command register low byte: forwarded, decode bits read from the emulation.
    CommandLow,
    /// Status register low byte: from the device, capability-list bit ours.
    StatusLow,
    /// Emulated in the shadow config space (BARs, interrupt line).
    Shadow,
    /// A constant; writes are dropped.
    Const(u8),
    /// Byte `n` of the emulated MSI capability.
    Msi(usize),
    /// Byte `n` of the emulated MSI-X capability.
    Msix(usize),
    /// High byte of PCI Express Device Control (FLR bit trapped).
    PcieDevCtlHigh,
}

/// The capability chain of a passthrough function as the guest sees it.
#[derive(Clone, Debug, Default)]
pub struct CapLayout {
    /// Every capability found on the device, in chain order: (offset, id).
    all: Vec<(u16, u8)>,
    /// The capabilities the guest sees, in chain order.
    kept: Vec<KeptCap>,
}

impl CapLayout {
    /// Walk the device's capability list in `cfg` (its first 256 config bytes) and apply the
    /// policy above. A malformed chain (pointer into the header, loop) ends the walk there.
    pub fn scan(cfg: &[u8; 256]) -> Self {
        let mut layout = CapLayout::default();
        let status = u16::from_le_bytes([cfg[6], cfg[7]]);
        if status & (1 << 4) == 0 {
            return layout;
        }
        let mut ptr = u16::from(cfg[0x34] & 0xfc);
        while ptr >= FIRST_CAP && layout.all.len() < MAX_CAPS {
            if layout.all.iter().any(|&(o, _)| o == ptr) {
                log::warn!("vfio: capability chain loops at {ptr:#x}");
                break;
            }
            let o = usize::from(ptr);
            let id = cfg[o];
            layout.all.push((ptr, id));
            let room = STD_END - ptr;
            let seen = |want| layout.kept.iter().any(|c: &KeptCap| c.id == want);
            let kept = match id {
                MSI_CAP_ID if !seen(MSI_CAP_ID) => {
                    let control = u16::from_le_bytes([cfg[o + 2], cfg[(o + 3) & 0xff]]);
                    Some((msi_cap_len(control) as u16, CapKind::Msi))
                }
                MSIX_CAP_ID if !seen(MSIX_CAP_ID) => Some((MSIX_CAP_LEN as u16, CapKind::Msix)),
                PCIE_CAP_ID if !seen(PCIE_CAP_ID) => {
                    let len = if cfg[o + 2] & 0xf >= 2 {
                        PCIE_CAP_LEN
                    } else {
                        PCIE_CAP_V1_LEN
                    };
                    Some((len, CapKind::Pcie))
                }
                PM_CAP_ID => Some((PM_CAP_LEN, CapKind::Passthrough)),
                VENDOR_CAP_ID => {
                    Some((u16::from(cfg[(o + 2) & 0xff]).max(3), CapKind::Passthrough))
                }
                _ => None,
            };
            match kept {
                // A capability that does not fit is hidden rather than truncated.
                Some((len, kind)) if len <= room => layout.kept.push(KeptCap {
                    id,
                    offset: ptr,
                    len,
                    kind,
                }),
                _ => log::info!("vfio: hiding capability {id:#04x} at {ptr:#x}"),
            }
            ptr = u16::from(cfg[o + 1] & 0xfc);
        }
        // A capability never extends over the next one: passed-through ones are cut short,
        // emulated ones (whose layout we rely on) are hidden.
        let starts: Vec<u16> = layout.all.iter().map(|&(o, _)| o).collect();
        layout.kept.retain_mut(|cap| {
            let gap = starts
                .iter()
                .filter(|&&s| s > cap.offset)
                .map(|&s| s - cap.offset)
                .min()
                .unwrap_or(u16::MAX);
            if gap >= cap.len {
                return true;
            }
            if matches!(cap.kind, CapKind::Msi | CapKind::Msix) {
                log::warn!(
                    "vfio: capability {:#04x} at {:#x} overlaps the next one; hidden",
                    cap.id,
                    cap.offset
                );
                return false;
            }
            cap.len = gap;
            true
        });
        layout
    }

    /// Unlink the capability at `offset` (e.g. an MSI-X capability we cannot emulate).
    pub fn hide(&mut self, offset: u16) {
        self.kept.retain(|c| c.offset != offset);
    }

    /// The capabilities the guest sees, in chain order.
    pub fn kept(&self) -> &[KeptCap] {
        &self.kept
    }

    /// The kept capability of kind `kind`, if any.
    pub fn find(&self, kind: CapKind) -> Option<KeptCap> {
        self.kept.iter().copied().find(|c| c.kind == kind)
    }

    /// The capabilities pointer the guest reads at 0x34.
    pub fn first(&self) -> u8 {
        self.kept.first().map_or(0, |c| c.offset as u8)
    }

    /// Where config byte `offset` comes from.
    pub fn source(&self, offset: u16) -> ByteSource {
        match offset {
            0x04 => ByteSource::CommandLow,
            0x06 => ByteSource::StatusLow,
            0x10..=0x27 | 0x3c => ByteSource::Shadow,
            // Header type 0 without the multi-function bit: we expose this one function.
            0x0e | 0x30..=0x33 | 0x3d => ByteSource::Const(0),
            0x34 => ByteSource::Const(self.first()),
            0x35..=0x3b => ByteSource::Const(0),
            o if o < FIRST_CAP => ByteSource::Device,
            o if o < STD_END => self.cap_source(o),
            _ => ByteSource::Const(0),
        }
    }

    fn cap_source(&self, o: u16) -> ByteSource {
        if let Some((i, cap)) = self
            .kept
            .iter()
            .enumerate()
            .find(|(_, c)| (c.offset..c.offset + c.len).contains(&o))
        {
            let rel = o - cap.offset;
            return match (rel, cap.kind) {
                (0, _) => ByteSource::Const(cap.id),
                (1, _) => ByteSource::Const(self.kept.get(i + 1).map_or(0, |n| n.offset as u8)),
                (r, CapKind::Msi) => ByteSource::Msi(usize::from(r)),
                (r, CapKind::Msix) => ByteSource::Msix(usize::from(r)),
                (PCIE_DEVCTL_HIGH, CapKind::Pcie) => ByteSource::PcieDevCtlHigh,
                _ => ByteSource::Device,
            };
        }
        // A hidden capability's bytes, up to the next capability, read zero.
        let hidden = self.all.iter().any(|&(start, _)| {
            start <= o
                && !self.kept.iter().any(|c| c.offset == start)
                && !self.all.iter().any(|&(s, _)| s > start && s <= o)
        });
        if hidden {
            ByteSource::Const(0)
        } else {
            ByteSource::Device
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Config bytes with capabilities placed at the given offsets, chained in order.
    pub(crate) fn with_caps(caps: &[(u8, &[u8])]) -> [u8; 256] {
        let mut cfg = [0u8; 256];
        cfg[6] = 0x10;
        let mut prev = 0x34usize;
        for &(off, bytes) in caps {
            let o = usize::from(off);
            cfg[prev] = off;
            cfg[o..o + bytes.len()].copy_from_slice(bytes);
            prev = o + 1;
        }
        cfg
    }

    #[test]
    fn chain_keeps_known_caps_and_hides_the_rest() {
        let cfg = with_caps(&[
            (0x40, &[PM_CAP_ID, 0, 3, 0, 0, 0, 0, 0]),
            (0x50, &[MSI_CAP_ID, 0, 0x80, 0]),
            (0x68, &[0x13, 0, 6, 3]), // Advanced Features: hidden
            (0x70, &[PCIE_CAP_ID, 0, 2, 0]),
            (0xb0, &[MSIX_CAP_ID, 0, 7, 0]),
            (0xc0, &[VENDOR_CAP_ID, 0, 16, 1]),
            (0xd0, &[0x03, 0, 0, 0]), // VPD: hidden
        ]);
        let l = CapLayout::scan(&cfg);
        let kept: Vec<_> = l.kept().iter().map(|c| (c.offset, c.id, c.len)).collect();
        assert_eq!(
            kept,
            vec![
                (0x40, PM_CAP_ID, 8),
                (0x50, MSI_CAP_ID, 14),
                (0x70, PCIE_CAP_ID, 0x3c),
                (0xb0, MSIX_CAP_ID, 12),
                (0xc0, VENDOR_CAP_ID, 16),
            ]
        );
        assert_eq!(l.first(), 0x40);
        assert_eq!(l.source(0x41), ByteSource::Const(0x50));
        assert_eq!(l.source(0x51), ByteSource::Const(0x70));
        assert_eq!(l.source(0xc1), ByteSource::Const(0));
        assert_eq!(l.source(0x68), ByteSource::Const(0));
        assert_eq!(l.source(0x6b), ByteSource::Const(0));
        assert_eq!(l.source(0xd2), ByteSource::Const(0));
        assert_eq!(l.source(0x52), ByteSource::Msi(2));
        assert_eq!(l.source(0xb3), ByteSource::Msix(3));
        assert_eq!(l.source(0x79), ByteSource::PcieDevCtlHigh);
        assert_eq!(l.source(0x78), ByteSource::Device);
        assert_eq!(l.source(0x42), ByteSource::Device);
        assert_eq!(l.source(0xc4), ByteSource::Device);
        // Header and extended space.
        assert_eq!(l.source(0x00), ByteSource::Device);
        assert_eq!(l.source(0x04), ByteSource::CommandLow);
        assert_eq!(l.source(0x05), ByteSource::Device);
        assert_eq!(l.source(0x10), ByteSource::Shadow);
        assert_eq!(l.source(0x30), ByteSource::Const(0));
        assert_eq!(l.source(0x34), ByteSource::Const(0x40));
        assert_eq!(l.source(0x3d), ByteSource::Const(0));
        assert_eq!(l.source(0x100), ByteSource::Const(0));
        assert_eq!(l.source(0xfff), ByteSource::Const(0));

        let mut l = l;
        l.hide(0x40);
        assert_eq!(l.first(), 0x50);
        assert_eq!(l.source(0x40), ByteSource::Const(0));
        l.hide(0xc0);
        assert_eq!(l.source(0xb1), ByteSource::Const(0));
    }

    #[test]
    fn overlapping_capabilities_are_cut_or_hidden() {
        // A PCIe v1 capability is 0x24 bytes, v2 0x3c; a vendor capability claiming more room
        // than it has is cut at the next capability; an MSI-X capability overlapped is hidden.
        let cfg = with_caps(&[
            (0x40, &[PCIE_CAP_ID, 0, 1, 0]),
            (0x64, &[VENDOR_CAP_ID, 0, 0x40, 0]),
            (0x70, &[MSIX_CAP_ID, 0, 0, 0]),
            (0x78, &[PM_CAP_ID, 0]),
        ]);
        let l = CapLayout::scan(&cfg);
        let kept: Vec<_> = l.kept().iter().map(|c| (c.offset, c.len)).collect();
        assert_eq!(kept, vec![(0x40, 0x24), (0x64, 0x0c), (0x78, 8)]);
        assert_eq!(l.source(0x65), ByteSource::Const(0x78));
        assert_eq!(l.source(0x70), ByteSource::Const(0));
        let cfg = with_caps(&[(0x40, &[PCIE_CAP_ID, 0, 2, 0]), (0x60, &[PM_CAP_ID, 0])]);
        let l = CapLayout::scan(&cfg);
        assert_eq!(l.kept()[0].len, 0x20);
        assert_eq!(l.source(0x61), ByteSource::Const(0));
    }

    #[test]
    fn malformed_chains_terminate() {
        // A loop.
        let mut cfg = with_caps(&[
            (0x40, &[PM_CAP_ID, 0x50]),
            (0x50, &[VENDOR_CAP_ID, 0x40, 4]),
        ]);
        cfg[0x51] = 0x40;
        let l = CapLayout::scan(&cfg);
        assert_eq!(l.kept().len(), 2);
        // A pointer into the header ends the chain; a capability running past 0x100 is hidden.
        let cfg = with_caps(&[(0x40, &[PM_CAP_ID, 0x10])]);
        assert_eq!(CapLayout::scan(&cfg).kept().len(), 1);
        assert_eq!(CapLayout::scan(&cfg).source(0x41), ByteSource::Const(0));
        let cfg = with_caps(&[(0xf0, &[PCIE_CAP_ID, 0])]);
        assert!(CapLayout::scan(&cfg).kept().is_empty());
        // No capability-list bit in status: no capabilities at all.
        let mut cfg = with_caps(&[(0x40, &[PM_CAP_ID, 0])]);
        cfg[6] = 0;
        assert_eq!(CapLayout::scan(&cfg).first(), 0);
        // Every byte of a random space classifies without panicking.
        let mut cfg = [0u8; 256];
        for (i, b) in cfg.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(97).wrapping_add(13);
        }
        cfg[6] = 0x10;
        let l = CapLayout::scan(&cfg);
        for o in 0..0x1000u16 {
            let _ = l.source(o);
        }
    }
}
