//! Legacy-mode root and context tables: which translation a request id (bus, devfn) gets.
//!
//! The root table (RTADDR, latched by GCMD.SRTP) holds 256 16-byte root entries by bus, each
//! pointing to a context table of 256 16-byte context entries by devfn. A present context entry
//! names the domain (DID), the translation type (TT: 00 second-level table, 10 pass-through; 01
//! needs ECAP.DT, 11 is reserved) and, for TT 00, the second-level table and its width (AW,
//! one of CAP.SAGAW). Every check QEMU and the spec make is made here, with its fault reason; any
//! failure means the device's requests fault (and are recorded unless FPD says otherwise).

use super::caps::{AddressWidth, Capabilities};
use super::fault::FaultReason;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Size of a root or context entry.
pub const ENTRY_SIZE: u64 = 16;

/// Root entry, low qword: bits 11:1 reserved.
const ROOT_LO_RSVD: u64 = 0xffe;
/// Context entry, low qword: bits 11:4 reserved.
const CONTEXT_LO_RSVD: u64 = 0xff0;
/// Context entry, high qword: bit 7 and bits 63:24 reserved (AVL 6:3 is ignored).
const CONTEXT_HI_RSVD: u64 = 0xffff_ffff_ff00_0080;
/// Context entry FPD (fault processing disable).
const CONTEXT_FPD: u64 = 1 << 1;

/// The root table the unit uses, as latched by GCMD.SRTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootTable {
    /// A legacy-mode root table at this guest-physical address.
    Legacy(u64),
    /// RTADDR.TTM was not legacy (scalable mode or reserved, neither advertised): every
    /// request faults with reason 8.
    Unsupported {
        /// The TTM field.
        ttm: u8,
    },
}

/// A second-level page table: its top-level table and width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageTable {
    /// Guest-physical address of the top-level table (SLPTPTR).
    pub root: u64,
    /// Width: 3 or 4 levels.
    pub aw: AddressWidth,
}

/// How a present, valid context entry translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translation {
    /// Through a second-level page table (TT = 00).
    PageTable(PageTable),
    /// Untranslated: IOVA = GPA (TT = 10, ECAP.PT).
    PassThrough,
}

/// A present, valid context entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextEntry {
    /// Domain id.
    pub did: u16,
    /// FPD: qualified faults through this entry are not recorded.
    pub fpd: bool,
    /// How requests are translated.
    pub translation: Translation,
}

/// Why a request id has no usable context entry: the fault every request of it raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableFault {
    /// Fault reason.
    pub reason: FaultReason,
    /// FPD of the context entry, when one was read.
    pub fpd: bool,
}

impl TableFault {
    fn new(reason: FaultReason) -> Self {
        TableFault { reason, fpd: false }
    }
}

/// The context-table pointer of a root entry (`Ok(None)`: not present).
pub fn parse_root_entry(lo: u64, hi: u64, caps: &Capabilities) -> Result<Option<u64>, FaultReason> {
    if lo & 1 == 0 {
        return Ok(None);
    }
    let addr_mask = caps.haw_page_mask();
    if lo & ROOT_LO_RSVD != 0 || lo & !(addr_mask | 0xfff) != 0 || hi != 0 {
        return Err(FaultReason::RootReserved);
    }
    Ok(Some(lo & addr_mask))
}

/// A context entry (`Ok(None)`: not present).
pub fn parse_context_entry(
    lo: u64,
    hi: u64,
    caps: &Capabilities,
) -> Result<Option<ContextEntry>, FaultReason> {
    if lo & 1 == 0 {
        return Ok(None);
    }
    let addr_mask = caps.haw_page_mask();
    if lo & CONTEXT_LO_RSVD != 0 || lo & !(addr_mask | 0xfff) != 0 || hi & CONTEXT_HI_RSVD != 0 {
        return Err(FaultReason::ContextReserved);
    }
    let aw = caps
        .context_width((hi & 7) as u8)
        .ok_or(FaultReason::ContextInvalid)?;
    let translation = match (lo >> 2) & 3 {
        0 => Translation::PageTable(PageTable {
            root: lo & addr_mask,
            aw,
        }),
        1 if caps.device_tlb() => Translation::PageTable(PageTable {
            root: lo & addr_mask,
            aw,
        }),
        2 if caps.pass_through() => Translation::PassThrough,
        _ => return Err(FaultReason::ContextInvalid),
    };
    Ok(Some(ContextEntry {
        did: (hi >> 8) as u16,
        fpd: lo & CONTEXT_FPD != 0,
        translation,
    }))
}

fn read_entry<M: GuestMemory + ?Sized>(mem: &M, table: u64, index: u8) -> Option<(u64, u64)> {
    let addr = table.checked_add(u64::from(index) * ENTRY_SIZE)?;
    let [lo, hi] = mem.read_obj::<[u64; 2]>(GuestAddress(addr)).ok()?;
    Some((u64::from_le(lo), u64::from_le(hi)))
}

/// The context entry of `sid` (`bus << 8 | devfn`) under `root`, read from guest memory, or the
/// fault its requests raise: 8/9 when a table cannot be read, 1/2 when an entry is not present,
/// 0xA/0xB for reserved bits, 3 for an unsupported AW or TT.
pub fn lookup_context<M: GuestMemory + ?Sized>(
    mem: &M,
    caps: &Capabilities,
    root: RootTable,
    sid: u16,
) -> Result<ContextEntry, TableFault> {
    let RootTable::Legacy(root) = root else {
        return Err(TableFault::new(FaultReason::RootTableInvalid));
    };
    let [devfn, bus] = sid.to_le_bytes();
    let (lo, hi) =
        read_entry(mem, root, bus).ok_or(TableFault::new(FaultReason::RootTableInvalid))?;
    let context_table = parse_root_entry(lo, hi, caps)
        .map_err(TableFault::new)?
        .ok_or(TableFault::new(FaultReason::RootNotPresent))?;
    let (lo, hi) = read_entry(mem, context_table, devfn)
        .ok_or(TableFault::new(FaultReason::ContextTableInvalid))?;
    let fpd = lo & CONTEXT_FPD != 0;
    match parse_context_entry(lo, hi, caps) {
        Ok(Some(entry)) => Ok(entry),
        Ok(None) => Err(TableFault {
            reason: FaultReason::ContextNotPresent,
            fpd,
        }),
        Err(reason) => Err(TableFault { reason, fpd }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const ROOT: u64 = 0x1_0000;
    const CTX: u64 = 0x2_0000;
    const SLPT: u64 = 0x3_0000;

    fn caps48() -> Capabilities {
        Capabilities::new(AddressWidth::Bits48)
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap, addr: u64, lo: u64, hi: u64) {
        mem.write_obj([lo.to_le(), hi.to_le()], GuestAddress(addr))
            .unwrap();
    }

    /// As Linux writes them: context_set_address_width, _domain_id, _translation_type, present.
    fn context(tt: u64, aw: u64, did: u16) -> (u64, u64) {
        (SLPT | tt << 2 | 1, aw | u64::from(did) << 8)
    }

    fn setup(bus: u8, devfn: u8, ctx: (u64, u64)) -> GuestMemoryMmap {
        let m = mem();
        put(&m, ROOT + u64::from(bus) * 16, CTX | 1, 0);
        put(&m, CTX + u64::from(devfn) * 16, ctx.0, ctx.1);
        m
    }

    fn sid(bus: u8, devfn: u8) -> u16 {
        u16::from(bus) << 8 | u16::from(devfn)
    }

    #[test]
    fn translated_and_pass_through_entries() {
        let caps = caps48();
        let m = setup(0, 0x20, context(0, 2, 5));
        let e = lookup_context(&m, &caps, RootTable::Legacy(ROOT), sid(0, 0x20)).unwrap();
        assert_eq!(
            e,
            ContextEntry {
                did: 5,
                fpd: false,
                translation: Translation::PageTable(PageTable {
                    root: SLPT,
                    aw: AddressWidth::Bits48
                })
            }
        );
        let (lo, hi) = context(2, 2, 0xffff);
        let m = setup(3, 0xff, (lo & 0xfff | CONTEXT_FPD, hi));
        let e = lookup_context(&m, &caps, RootTable::Legacy(ROOT), sid(3, 0xff)).unwrap();
        assert_eq!(
            (e.did, e.fpd, e.translation),
            (0xffff, true, Translation::PassThrough)
        );
        // AW 1 (3-level) is in SAGAW too.
        let m = setup(0, 8, context(0, 1, 1));
        let e = lookup_context(&m, &caps, RootTable::Legacy(ROOT), sid(0, 8)).unwrap();
        assert_eq!(
            e.translation,
            Translation::PageTable(PageTable {
                root: SLPT,
                aw: AddressWidth::Bits39
            })
        );
        // Ignored AVL bits 6:3 of the high qword are accepted.
        let (lo, hi) = context(0, 2, 1);
        assert!(parse_context_entry(lo, hi | 0x78, &caps).unwrap().is_some());
    }

    #[test]
    fn not_present_entries() {
        let caps = caps48();
        let m = setup(0, 0x20, context(0, 2, 5));
        let r = lookup_context(&m, &caps, RootTable::Legacy(ROOT), sid(1, 0x20));
        assert_eq!(
            r,
            Err(TableFault {
                reason: FaultReason::RootNotPresent,
                fpd: false
            })
        );
        let r = lookup_context(&m, &caps, RootTable::Legacy(ROOT), sid(0, 0x21));
        assert_eq!(
            r,
            Err(TableFault {
                reason: FaultReason::ContextNotPresent,
                fpd: false
            })
        );
        // A not-present entry carries its FPD (QEMU reads it the same way).
        put(&m, CTX + 0x22 * 16, CONTEXT_FPD, 0);
        let r = lookup_context(&m, &caps, RootTable::Legacy(ROOT), sid(0, 0x22));
        assert_eq!(
            r,
            Err(TableFault {
                reason: FaultReason::ContextNotPresent,
                fpd: true
            })
        );
    }

    #[test]
    fn translation_types() {
        let caps = caps48();
        for (tt, want) in [
            (1, Err(FaultReason::ContextInvalid)), // device-TLB without ECAP.DT
            (3, Err(FaultReason::ContextInvalid)), // reserved
        ] {
            let (lo, hi) = context(tt, 2, 1);
            assert_eq!(parse_context_entry(lo, hi, &caps), want, "TT {tt}");
        }
        for aw in [0, 3, 4, 7] {
            let (lo, hi) = context(0, aw, 1);
            assert_eq!(
                parse_context_entry(lo, hi, &caps),
                Err(FaultReason::ContextInvalid),
                "AW {aw}"
            );
        }
        let c39 = Capabilities::new(AddressWidth::Bits39);
        let (lo, hi) = context(0, 2, 1);
        assert_eq!(
            parse_context_entry(lo, hi, &c39),
            Err(FaultReason::ContextInvalid),
            "48-bit not in SAGAW"
        );
    }

    #[test]
    fn reserved_bits() {
        let caps = caps48();
        let (lo, hi) = context(0, 2, 1);
        for bit in 4..12 {
            assert_eq!(
                parse_context_entry(lo | 1 << bit, hi, &caps),
                Err(FaultReason::ContextReserved)
            );
        }
        for bit in 48..64 {
            let r = parse_context_entry(lo | 1 << bit, hi, &caps);
            assert_eq!(
                r,
                Err(FaultReason::ContextReserved),
                "SLPTPTR bit {bit} above HAW"
            );
        }
        for bit in (24..64).chain([7]) {
            let r = parse_context_entry(lo, hi | 1 << bit, &caps);
            assert_eq!(r, Err(FaultReason::ContextReserved), "high bit {bit}");
        }
        for bit in 1..12 {
            assert_eq!(
                parse_root_entry(CTX | 1 | 1 << bit, 0, &caps),
                Err(FaultReason::RootReserved)
            );
        }
        assert_eq!(
            parse_root_entry(CTX | 1 | 1 << 48, 0, &caps),
            Err(FaultReason::RootReserved),
            "above HAW"
        );
        assert_eq!(
            parse_root_entry(CTX | 1, 1, &caps),
            Err(FaultReason::RootReserved),
            "high qword"
        );
        assert_eq!(
            parse_root_entry(CTX | 1 << 48, 1, &caps),
            Ok(None),
            "not present: nothing checked"
        );
        let c39 = Capabilities::new(AddressWidth::Bits39);
        assert_eq!(
            parse_root_entry(1 << 39 | 1, 0, &c39),
            Err(FaultReason::RootReserved)
        );
        // The lookup reports them with their reason.
        let m = setup(0, 0, (lo | 1 << 5, hi));
        let r = lookup_context(&m, &caps, RootTable::Legacy(ROOT), 0);
        assert_eq!(r.map_err(|f| f.reason), Err(FaultReason::ContextReserved));
    }

    #[test]
    fn unreadable_tables_and_unsupported_modes() {
        let caps = caps48();
        let m = setup(0, 0, context(0, 2, 1));
        for root in [0x10_0000, 0x10_0000 - 0x800, !0xfffu64] {
            let r = lookup_context(&m, &caps, RootTable::Legacy(root), sid(0xff, 0));
            assert_eq!(
                r.map_err(|f| f.reason),
                Err(FaultReason::RootTableInvalid),
                "{root:#x}"
            );
        }
        // A context table pointer beyond RAM (but within HAW).
        put(&m, ROOT + 16, 0x8000_0000 | 1, 0);
        let r = lookup_context(&m, &caps, RootTable::Legacy(ROOT), sid(1, 0));
        assert_eq!(
            r.map_err(|f| f.reason),
            Err(FaultReason::ContextTableInvalid)
        );
        for ttm in 1..4 {
            let r = lookup_context(&m, &caps, RootTable::Unsupported { ttm }, 0);
            assert_eq!(r.map_err(|f| f.reason), Err(FaultReason::RootTableInvalid));
        }
    }
}
