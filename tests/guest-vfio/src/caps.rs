//! The virtio-pci vendor capabilities (virtio 1.x §4.1.4) found by walking a function's PCI
//! capability list in its config space.

use crate::Error;

/// PCI status register offset and its "capability list" bit.
const STATUS: usize = 0x06;
const STATUS_CAP_LIST: u8 = 1 << 4;
/// Capabilities pointer.
const CAP_PTR: usize = 0x34;
/// Vendor-specific capability ID (virtio uses it).
const CAP_ID_VENDOR: u8 = 0x09;
/// Most capabilities walked (48 fit in 192 bytes of 4-byte caps).
const MAX_CAPS: usize = 48;

/// `cfg_type` of the common configuration structure.
pub const COMMON_CFG: u8 = 1;
/// `cfg_type` of the notification structure.
pub const NOTIFY_CFG: u8 = 2;
/// `cfg_type` of the ISR status.
pub const ISR_CFG: u8 = 3;
/// `cfg_type` of the device-specific configuration.
pub const DEVICE_CFG: u8 = 4;

/// Where one virtio structure lives: `length` bytes at `offset` in BAR `bar`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCap {
    /// BAR index (0..=5).
    pub bar: u8,
    /// Offset inside the BAR.
    pub offset: u32,
    /// Length in bytes.
    pub length: u32,
}

/// The virtio structures of one function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCaps {
    /// Common configuration.
    pub common: VirtioCap,
    /// Notification area.
    pub notify: VirtioCap,
    /// `notify_off_multiplier` of the notification capability.
    pub notify_multiplier: u32,
    /// ISR status, if present.
    pub isr: Option<VirtioCap>,
    /// Device-specific configuration, if present.
    pub device: Option<VirtioCap>,
}

fn u32_at(cfg: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(cfg.get(off..off + 4)?.try_into().ok()?))
}

/// Parse the virtio capabilities from the first 256 bytes (or more) of config space. The first
/// capability of each type wins (as the spec tells drivers); caps naming a BAR above 5 are
/// skipped. Fails without a common or notify structure, or on a malformed list.
pub fn parse_virtio_caps(cfg: &[u8]) -> Result<VirtioCaps, Error> {
    let bad = |m: String| Error::Device(m);
    if cfg.len() < 0x40 {
        return Err(bad(format!("config space of {} bytes", cfg.len())));
    }
    if cfg[STATUS] & STATUS_CAP_LIST == 0 {
        return Err(bad("no capability list".into()));
    }
    let (mut common, mut notify, mut isr, mut device) = (None, None, None, None);
    let mut ptr = usize::from(cfg[CAP_PTR] & 0xfc);
    let mut walked = 0;
    while ptr != 0 {
        walked += 1;
        if walked > MAX_CAPS || ptr < 0x40 || ptr + 2 > cfg.len() {
            return Err(bad(format!("bad capability pointer {ptr:#x}")));
        }
        let (id, next) = (cfg[ptr], usize::from(cfg[ptr + 1] & 0xfc));
        if id == CAP_ID_VENDOR {
            // struct virtio_pci_cap: vndr, next, len, cfg_type, bar, id, pad[2], offset, length
            let cap_len = usize::from(*cfg.get(ptr + 2).unwrap_or(&0));
            let cfg_type = *cfg.get(ptr + 3).unwrap_or(&0);
            let bar = *cfg.get(ptr + 4).unwrap_or(&0xff);
            let body = (u32_at(cfg, ptr + 8), u32_at(cfg, ptr + 12));
            if let (true, true, (Some(offset), Some(length))) = (cap_len >= 16, bar <= 5, body) {
                let cap = VirtioCap {
                    bar,
                    offset,
                    length,
                };
                match cfg_type {
                    COMMON_CFG if common.is_none() => common = Some(cap),
                    NOTIFY_CFG if notify.is_none() && cap_len >= 20 => {
                        notify = u32_at(cfg, ptr + 16).map(|m| (cap, m));
                    }
                    ISR_CFG if isr.is_none() => isr = Some(cap),
                    DEVICE_CFG if device.is_none() => device = Some(cap),
                    _ => {}
                }
            }
        }
        ptr = next;
    }
    let common = common.ok_or_else(|| bad("no virtio common cfg capability".into()))?;
    let (notify, notify_multiplier) =
        notify.ok_or_else(|| bad("no virtio notify capability".into()))?;
    Ok(VirtioCaps {
        common,
        notify,
        notify_multiplier,
        isr,
        device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Config space with a capability chain: MSI-X at 0x40, then virtio caps.
    fn config() -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
        c[2..4].copy_from_slice(&0x1042u16.to_le_bytes());
        c[STATUS] = STATUS_CAP_LIST;
        c[CAP_PTR] = 0x40;
        // MSI-X (id 0x11), next 0x50.
        c[0x40] = 0x11;
        c[0x41] = 0x50;
        let mut put = |at: usize, next: u8, len: u8, ty: u8, bar: u8, off: u32, length: u32| {
            c[at] = CAP_ID_VENDOR;
            c[at + 1] = next;
            c[at + 2] = len;
            c[at + 3] = ty;
            c[at + 4] = bar;
            c[at + 8..at + 12].copy_from_slice(&off.to_le_bytes());
            c[at + 12..at + 16].copy_from_slice(&length.to_le_bytes());
        };
        put(0x50, 0x60, 16, COMMON_CFG, 4, 0x0, 0x1000);
        put(0x60, 0x70, 16, ISR_CFG, 4, 0x1000, 0x1000);
        put(0x70, 0x84, 16, DEVICE_CFG, 4, 0x2000, 0x1000);
        put(0x84, 0x98, 20, NOTIFY_CFG, 4, 0x3000, 0x1000);
        // A second common cfg (must be ignored) and a PCI-cfg access cap (type 5).
        put(0x98, 0xa8, 16, COMMON_CFG, 2, 0x0, 0x100);
        put(0xa8, 0x00, 20, 5, 0, 0, 0);
        c[0x84 + 16..0x84 + 20].copy_from_slice(&4u32.to_le_bytes());
        c
    }

    #[test]
    fn finds_every_structure() {
        let caps = parse_virtio_caps(&config()).unwrap();
        assert_eq!(
            caps,
            VirtioCaps {
                common: VirtioCap {
                    bar: 4,
                    offset: 0,
                    length: 0x1000
                },
                notify: VirtioCap {
                    bar: 4,
                    offset: 0x3000,
                    length: 0x1000
                },
                notify_multiplier: 4,
                isr: Some(VirtioCap {
                    bar: 4,
                    offset: 0x1000,
                    length: 0x1000
                }),
                device: Some(VirtioCap {
                    bar: 4,
                    offset: 0x2000,
                    length: 0x1000
                }),
            }
        );
    }

    #[test]
    fn malformed_lists_fail_cleanly() {
        // Loop: the last cap points back to the first.
        let mut c = config();
        c[0xa9] = 0x40;
        assert!(parse_virtio_caps(&c).is_err());
        // Pointer into the header.
        let mut c = config();
        c[CAP_PTR] = 0x10;
        assert!(parse_virtio_caps(&c).is_err());
        // No cap list bit.
        let mut c = config();
        c[STATUS] = 0;
        assert!(parse_virtio_caps(&c).is_err());
        // Truncated config space.
        assert!(parse_virtio_caps(&config()[..0x30]).is_err());
        // A cap at the very end of the space cannot read past it.
        let mut c = config();
        c[0xa9] = 0xfc;
        c[0xfc] = CAP_ID_VENDOR;
        c[0xfd] = 0;
        c[0xfe] = 16;
        c[0xff] = COMMON_CFG;
        assert!(parse_virtio_caps(&c).is_ok());
        // Notify cap too short for its multiplier, BAR out of range: not usable.
        let mut c = config();
        c[0x86] = 16;
        assert!(parse_virtio_caps(&c).is_err());
        let mut c = config();
        c[0x54] = 7;
        let caps = parse_virtio_caps(&c).unwrap();
        assert_eq!(caps.common.bar, 2, "the valid second common cfg is used");
    }
}
