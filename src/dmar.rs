//! The ACPI DMAR table (DMA Remapping Reporting, Intel VT-d spec chapter 8): tells the guest
//! where the emulated VT-d unit's registers are and which PCI functions translate through it.
//!
//! Layout: the 36-byte header (revision 1), host address width - 1 (u8), flags (u8: INTR_REMAP,
//! X2APIC_OPT_OUT, DMA_CTRL_PLATFORM_OPT_IN, all clear here: no interrupt remapping), 10 reserved
//! bytes, then one DRHD (type 0): u16 type, u16 length, u8 flags (INCLUDE_PCI_ALL), u8 size
//! (register set of 2^size 4 KiB pages), u16 segment, u64 register base, then device scopes
//! (type 1 PCI endpoint: u8 type, u8 length, u16 reserved, u8 enumeration id, u8 start bus, one
//! (device, function) path entry). Linux leaves functions outside every DRHD's scope untranslated
//! (dma-direct), which is how `iommu=on` per device works. acpi_tables has no DMAR type; the
//! header, length and checksum come from its [`Sdt`].

use acpi_tables::sdt::Sdt;

/// Where the register set goes: QEMU's base, in the MMIO hole clear of the PCI windows, the
/// IOAPIC (0xFEC0_0000) and the LAPIC/MSI window (0xFEE0_0000).
pub const DEFAULT_REGISTER_BASE: u64 = 0xFED9_0000;
/// Offset of the first remapping structure.
pub const STRUCTURES_OFFSET: usize = 48;
/// Remapping structure type of a DRHD.
pub const TYPE_DRHD: u16 = 0;
/// DRHD flag: the unit covers every PCI function of its segment not claimed by another one.
pub const DRHD_INCLUDE_PCI_ALL: u8 = 1;
/// Device scope type of a PCI endpoint.
pub const SCOPE_PCI_ENDPOINT: u8 = 1;
/// Length of a DRHD without device scopes.
pub const DRHD_LEN: usize = 16;
/// Length of a device scope with one path entry.
pub const SCOPE_LEN: usize = 8;

use crate::acpi::OEM_ID;
const OEM_TABLE_ID: [u8; 8] = *b"VMMDMAR ";

/// Which PCI functions (segment 0) translate through the unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// All of them (INCLUDE_PCI_ALL).
    AllPci,
    /// These functions, as `bus << 8 | device << 3 | function`.
    Endpoints(Vec<u16>),
}

/// Inputs of the DMAR table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmarConfig {
    /// Host address width in bits (the unit's MGAW: 39 or 48).
    pub host_address_width: u8,
    /// Guest-physical base of the 4 KiB register set.
    pub register_base: u64,
    /// The DRHD's scope.
    pub scope: Scope,
}

/// Why a DMAR table cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmarError {
    /// The register base is 0 (Linux calls that a firmware bug) or not 4 KiB aligned.
    #[error("VT-d register base {0:#x} must be a non-zero multiple of 4 KiB")]
    BadBase(u64),
    /// The host address width is outside 32..=52 bits.
    #[error("host address width {0} is outside 32..=52 bits")]
    BadWidth(u8),
    /// Too many device scopes for one DRHD (its length is 16 bits).
    #[error("{0} device scopes do not fit in one DRHD")]
    TooManyEndpoints(usize),
}

/// Build the DMAR table (header and checksum included).
pub fn build(cfg: &DmarConfig) -> Result<Vec<u8>, DmarError> {
    if cfg.register_base == 0 || !cfg.register_base.is_multiple_of(0x1000) {
        return Err(DmarError::BadBase(cfg.register_base));
    }
    if !(32..=52).contains(&cfg.host_address_width) {
        return Err(DmarError::BadWidth(cfg.host_address_width));
    }
    let (flags, mut endpoints) = match &cfg.scope {
        Scope::AllPci => (DRHD_INCLUDE_PCI_ALL, Vec::new()),
        Scope::Endpoints(eps) => (0, eps.clone()),
    };
    endpoints.sort_unstable();
    endpoints.dedup();
    let drhd_len = u16::try_from(DRHD_LEN + SCOPE_LEN * endpoints.len())
        .map_err(|_| DmarError::TooManyEndpoints(endpoints.len()))?;

    let mut body = Vec::with_capacity(12 + usize::from(drhd_len));
    body.push(cfg.host_address_width - 1);
    body.push(0); // flags: no INTR_REMAP, X2APIC_OPT_OUT, DMA_CTRL_PLATFORM_OPT_IN
    body.extend_from_slice(&[0; 10]);
    body.extend_from_slice(&TYPE_DRHD.to_le_bytes());
    body.extend_from_slice(&drhd_len.to_le_bytes());
    body.push(flags);
    body.push(0); // size: 2^0 pages of 4 KiB
    body.extend_from_slice(&0u16.to_le_bytes()); // segment
    body.extend_from_slice(&cfg.register_base.to_le_bytes());
    for bdf in endpoints {
        let [devfn, bus] = bdf.to_le_bytes();
        body.extend_from_slice(&[
            SCOPE_PCI_ENDPOINT,
            SCOPE_LEN as u8,
            0,
            0,
            0, // enumeration id (IOAPIC/HPET only)
            bus,
            devfn >> 3,
            devfn & 7,
        ]);
    }
    let mut table = Sdt::new(*b"DMAR", 36, 1, OEM_ID, OEM_TABLE_ID, 1);
    table.append_slice(&body);
    Ok(table.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::viot::bdf;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// A device scope as (type, bus, device, function).
    type DevScope = (u8, u8, u8, u8);
    /// A DRHD as (flags, size, segment, register base, scopes).
    type Unit = (u8, u8, u16, u64, Vec<DevScope>);

    /// What Linux's dmar.c finds: (HAW, flags, [(DRHD flags, size, segment, base, scopes)]) with
    /// each scope as (type, bus, device, function); every length checked.
    fn parse(t: &[u8]) -> (u8, u8, Vec<Unit>) {
        assert_eq!(&t[..4], b"DMAR");
        assert_eq!(u32_at(t, 4) as usize, t.len());
        assert_eq!(t[8], 1, "revision");
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        assert_eq!(&t[38..48], &[0; 10]);
        let mut units = Vec::new();
        let mut off = STRUCTURES_OFFSET;
        while off < t.len() {
            let len = usize::from(u16_at(t, off + 2));
            assert!(
                len >= DRHD_LEN && off + len <= t.len(),
                "structure at {off} overruns"
            );
            assert_eq!(u16_at(t, off), TYPE_DRHD);
            let mut scopes = Vec::new();
            let mut s = off + DRHD_LEN;
            while s < off + len {
                let slen = usize::from(t[s + 1]);
                assert!(slen >= 6 && (slen - 6) % 2 == 0 && s + slen <= off + len);
                assert_eq!((t[s + 2], t[s + 3], t[s + 4]), (0, 0, 0));
                assert_eq!(slen, 8, "one path entry");
                scopes.push((t[s], t[s + 5], t[s + 6], t[s + 7]));
                s += slen;
            }
            units.push((
                t[off + 4],
                t[off + 5],
                u16_at(t, off + 6),
                u64_at(t, off + 8),
                scopes,
            ));
            off += len;
        }
        assert_eq!(off, t.len());
        (t[36], t[37], units)
    }

    #[test]
    fn include_pci_all() {
        let t = build(&DmarConfig {
            host_address_width: 48,
            register_base: DEFAULT_REGISTER_BASE,
            scope: Scope::AllPci,
        })
        .unwrap();
        assert_eq!(t.len(), 48 + 16);
        let (haw, flags, units) = parse(&t);
        assert_eq!((haw, flags), (47, 0), "width - 1, no INTR_REMAP");
        assert_eq!(
            units,
            vec![(DRHD_INCLUDE_PCI_ALL, 0, 0, 0xfed9_0000, vec![])]
        );
        // The raw DRHD bytes.
        assert_eq!(
            &t[48..64],
            &[0, 0, 16, 0, 1, 0, 0, 0, 0x00, 0x00, 0xd9, 0xfe, 0, 0, 0, 0]
        );
    }

    #[test]
    fn one_scope_per_endpoint_sorted_and_deduplicated() {
        let eps = vec![bdf(0, 5, 0), bdf(0, 3, 0), bdf(1, 31, 7), bdf(0, 3, 0)];
        let t = build(&DmarConfig {
            host_address_width: 39,
            register_base: 0xfed9_0000,
            scope: Scope::Endpoints(eps),
        })
        .unwrap();
        assert_eq!(t.len(), 48 + 16 + 3 * 8);
        let (haw, _, units) = parse(&t);
        assert_eq!(haw, 38);
        assert_eq!(units.len(), 1);
        let (flags, size, seg, base, scopes) = &units[0];
        assert_eq!((*flags, *size, *seg, *base), (0, 0, 0, 0xfed9_0000));
        assert_eq!(
            scopes,
            &vec![
                (SCOPE_PCI_ENDPOINT, 0, 3, 0),
                (SCOPE_PCI_ENDPOINT, 0, 5, 0),
                (SCOPE_PCI_ENDPOINT, 1, 31, 7)
            ]
        );
        assert_eq!(&t[64..72], &[1, 8, 0, 0, 0, 0, 3, 0]);
        // No endpoints at all: a valid table whose unit Linux ignores.
        let empty = build(&DmarConfig {
            host_address_width: 39,
            register_base: 0x1000,
            scope: Scope::Endpoints(vec![]),
        })
        .unwrap();
        assert_eq!(parse(&empty).2, vec![(0, 0, 0, 0x1000, vec![])]);
    }

    #[test]
    fn invalid_inputs() {
        let ok = DmarConfig {
            host_address_width: 48,
            register_base: DEFAULT_REGISTER_BASE,
            scope: Scope::AllPci,
        };
        for base in [0, 0xfed9_0800] {
            let cfg = DmarConfig {
                register_base: base,
                ..ok.clone()
            };
            assert_eq!(build(&cfg), Err(DmarError::BadBase(base)));
        }
        for w in [0, 31, 53, 255] {
            let cfg = DmarConfig {
                host_address_width: w,
                ..ok.clone()
            };
            assert_eq!(build(&cfg), Err(DmarError::BadWidth(w)));
        }
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let cfg = DmarConfig {
            scope: Scope::Endpoints(all),
            ..ok.clone()
        };
        assert_eq!(build(&cfg), Err(DmarError::TooManyEndpoints(65536)));
        // The largest scope that fits.
        let most: Vec<u16> = (0..((0xffff - 16) / 8) as u16).collect();
        let t = build(&DmarConfig {
            scope: Scope::Endpoints(most.clone()),
            ..ok
        })
        .unwrap();
        assert_eq!(parse(&t).2[0].4.len(), most.len());
    }

    #[test]
    fn register_base_is_clear_of_the_fixed_layout() {
        use crate::memory::{
            ECAM_SIZE, ECAM_START, IOAPIC_START, LAPIC_START, MMIO32_SIZE, MMIO32_START,
        };
        let (base, end) = (DEFAULT_REGISTER_BASE, DEFAULT_REGISTER_BASE + 0x1000);
        for (start, len) in [
            (MMIO32_START, MMIO32_SIZE),
            (ECAM_START, ECAM_SIZE),
            (IOAPIC_START, 0x1000),
            (LAPIC_START, crate::memory::MSI_WINDOW_SIZE),
        ] {
            assert!(end <= start || base >= start + len, "overlaps {start:#x}");
        }
        assert!(end <= 1 << 32);
    }
}
