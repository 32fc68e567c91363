//! Tests of the second-level walk over tables built in guest memory.

use super::*;
use crate::vtd::caps::AddressWidth;
use proptest::prelude::*;
use vm_memory::GuestMemoryMmap;

const RAM: u64 = 64 << 20;
const K4: u64 = 0x1000;
const M2: u64 = 0x20_0000;
const G1: u64 = 0x4000_0000;
const R: u64 = 1;
const W: u64 = 2;
const RW: u64 = 3;

/// Builds second-level tables in guest memory the way Linux lays them out.
struct Builder {
    mem: GuestMemoryMmap,
    next: u64,
    root: u64,
    aw: AddressWidth,
}

impl Builder {
    fn new(aw: AddressWidth) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let mut b = Builder {
            mem,
            next: 0x10_0000,
            root: 0,
            aw,
        };
        b.root = b.alloc();
        b
    }

    fn alloc(&mut self) -> u64 {
        let a = self.next;
        self.next += K4;
        assert!(self.next <= RAM);
        a
    }

    fn read(&self, addr: u64) -> u64 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn write(&self, addr: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(addr)).unwrap();
    }

    /// Address of the entry at `level` for `iova`, creating the tables above it (R/W).
    fn slot(&mut self, iova: u64, level: u8) -> u64 {
        let mut table = self.root;
        for l in ((level + 1)..=self.aw.levels()).rev() {
            let ea = table + ((iova >> level_shift(l)) & 511) * 8;
            let e = self.read(ea);
            table = if e & 3 == 0 {
                let t = self.alloc();
                self.write(ea, t | RW);
                t
            } else {
                e & !0xfff & ((1 << 52) - 1)
            };
        }
        table + ((iova >> level_shift(level)) & 511) * 8
    }

    fn set(&mut self, iova: u64, level: u8, value: u64) {
        let a = self.slot(iova, level);
        self.write(a, value);
    }

    /// Change the R/W bits of the (existing) entry at `level` for `iova`.
    fn rights(&mut self, iova: u64, level: u8, bits: u64) {
        let a = self.slot(iova, level);
        let e = self.read(a);
        self.write(a, (e & !3) | bits);
    }

    fn map4k(&mut self, iova: u64, gpa: u64, bits: u64) {
        self.set(iova, 1, gpa | bits);
    }

    fn map2m(&mut self, iova: u64, gpa: u64, bits: u64) {
        self.set(iova, 2, gpa | bits | PS);
    }

    fn map1g(&mut self, iova: u64, gpa: u64, bits: u64) {
        self.set(iova, 3, gpa | bits | PS);
    }

    fn table(&self) -> PageTable {
        PageTable {
            root: self.root,
            aw: self.aw,
        }
    }

    fn caps(&self) -> Capabilities {
        Capabilities::new(AddressWidth::Bits48)
    }

    fn translate(&self, iova: u64, want: Perm) -> Result<Leaf, FaultReason> {
        translate(&self.mem, &self.caps(), &self.table(), iova, want)
    }

    fn walk(&self, range: Range<u64>, budget: u64) -> Result<RangeWalk, WalkError> {
        walk_range(&self.mem, &self.caps(), &self.table(), range, budget)
    }

    fn runs(&self, range: Range<u64>) -> Vec<Run> {
        self.walk(range, u64::MAX).unwrap().runs
    }
}

fn run(iova: u64, gpa: u64, len: u64, perm: Perm) -> Run {
    Run {
        iova,
        gpa,
        len,
        perm,
    }
}

#[test]
fn translates_every_leaf_size_at_three_and_four_levels() {
    for aw in [AddressWidth::Bits39, AddressWidth::Bits48] {
        let mut b = Builder::new(aw);
        b.map4k(0x1000, 0xabc_d000, RW);
        b.map2m(0x4000_0000 + M2, 0x8_0000_0000, R);
        b.map1g(0x40_0000_0000, 0x1_c000_0000, W);
        let l = b.translate(0x1234, Perm::READ_WRITE).unwrap();
        assert_eq!(
            l,
            Leaf {
                iova: 0x1000,
                gpa: 0xabc_d000,
                size: K4,
                perm: Perm::READ_WRITE
            }
        );
        assert_eq!(l.gpa_of(0x1234), 0xabc_d234);
        let l = b
            .translate(0x4000_0000 + M2 + 0x12_3456, Perm::READ)
            .unwrap();
        assert_eq!(
            (l.size, l.gpa_of(0x4000_0000 + M2 + 0x12_3456)),
            (M2, 0x8_0012_3456)
        );
        let l = b.translate(0x40_3fff_fff0, Perm::WRITE).unwrap();
        assert_eq!((l.size, l.gpa_of(0x40_3fff_fff0)), (G1, 0x1_ffff_fff0));
        assert_eq!(l.perm, Perm::WRITE);
    }
}

#[test]
fn rights_are_anded_along_the_walk() {
    let mut b = Builder::new(AddressWidth::Bits48);
    b.map4k(0x5000, 0x10_0000, RW);
    b.rights(0x5000, 3, R); // the level-3 (PDPE) entry above is read-only
    let l = b.translate(0x5000, Perm::READ).unwrap();
    assert_eq!(l.perm, Perm::READ);
    assert_eq!(
        b.translate(0x5000, Perm::WRITE),
        Err(FaultReason::WriteDenied)
    );
    assert_eq!(
        b.translate(0x5000, Perm::READ_WRITE),
        Err(FaultReason::WriteDenied)
    );
    b.map4k(0x6000, 0x10_1000, W);
    assert_eq!(
        b.translate(0x6000, Perm::READ),
        Err(FaultReason::ReadDenied)
    );
    assert_eq!(
        b.translate(0x6000, Perm::WRITE),
        Err(FaultReason::WriteDenied),
        "R above, W below"
    );
    // The range walk maps what is left: R for 0x5000, nothing for 0x6000.
    assert_eq!(
        b.runs(0..0x10000),
        vec![run(0x5000, 0x10_0000, K4, Perm::READ)]
    );
}

#[test]
fn not_present_is_a_read_or_write_fault() {
    let mut b = Builder::new(AddressWidth::Bits48);
    b.map4k(0x1000, 0x2000, RW);
    assert_eq!(
        b.translate(0x2000, Perm::READ),
        Err(FaultReason::ReadDenied)
    );
    assert_eq!(
        b.translate(0x2000, Perm::WRITE),
        Err(FaultReason::WriteDenied)
    );
    assert_eq!(
        b.translate(0x80_0000_0000, Perm::WRITE),
        Err(FaultReason::WriteDenied),
        "empty top entry"
    );
    assert_eq!(lookup(&b.mem, &b.caps(), &b.table(), 0x2000), Ok(None));
}

#[test]
fn addresses_above_the_width_fault_with_reason_4() {
    let b = Builder::new(AddressWidth::Bits39);
    assert_eq!(
        b.translate(1 << 39, Perm::READ),
        Err(FaultReason::AddressBeyondWidth)
    );
    assert_eq!(
        b.translate(u64::MAX, Perm::READ),
        Err(FaultReason::AddressBeyondWidth)
    );
    let b = Builder::new(AddressWidth::Bits48);
    assert_eq!(
        b.translate(1 << 48, Perm::WRITE),
        Err(FaultReason::AddressBeyondWidth)
    );
    assert_eq!(
        b.translate((1 << 48) - 1, Perm::READ),
        Err(FaultReason::ReadDenied)
    );
    // A range walk is clipped to the width.
    assert_eq!(b.walk(1 << 48..u64::MAX, 10).unwrap().reads, 0);
}

#[test]
fn reserved_bits_fault_with_reason_0xc() {
    let caps = Capabilities::new(AddressWidth::Bits48);
    let levels = 4;
    // Leaf bits.
    for bit in (48..52).chain([11, 62]) {
        assert_eq!(
            check_entry(&caps, 0x1000 | RW | 1 << bit, 1, levels),
            Err(FaultReason::PagingEntryReserved),
            "bit {bit}"
        );
    }
    for bit in (52..62).chain([63, 2, 3, 4, 5, 6, 7, 8, 9, 10]) {
        assert_eq!(
            check_entry(&caps, 0x1000 | RW | 1 << bit, 1, levels),
            Ok(true),
            "ignored bit {bit}"
        );
    }
    // PS at the top of a 4-level table; superpage address bits below the page size.
    assert_eq!(
        check_entry(&caps, RW | PS, 4, levels),
        Err(FaultReason::PagingEntryReserved)
    );
    assert_eq!(
        check_entry(&caps, M2 | RW | PS | K4, 2, levels),
        Err(FaultReason::PagingEntryReserved)
    );
    assert_eq!(
        check_entry(&caps, M2 | RW | PS | 0x10_0000, 2, levels),
        Err(FaultReason::PagingEntryReserved)
    );
    assert_eq!(
        check_entry(&caps, G1 | RW | PS | M2, 3, levels),
        Err(FaultReason::PagingEntryReserved)
    );
    assert_eq!(check_entry(&caps, G1 | RW | PS, 3, levels), Ok(true));
    assert_eq!(check_entry(&caps, M2 | RW | PS, 2, levels), Ok(true));
    assert_eq!(
        check_entry(&caps, M2 | RW, 2, levels),
        Ok(false),
        "a table pointer"
    );
    // Non-leaf entries: the same address and SNP/TM checks.
    assert_eq!(
        check_entry(&caps, 0x1000 | RW | 1 << 50, 3, levels),
        Err(FaultReason::PagingEntryReserved)
    );
    assert_eq!(
        check_entry(&caps, 0x1000 | RW | SNP, 4, levels),
        Err(FaultReason::PagingEntryReserved)
    );
    // A 39-bit unit reserves bits 39..51.
    let c39 = Capabilities::new(AddressWidth::Bits39);
    assert_eq!(
        check_entry(&c39, 1 << 39 | RW, 1, 3),
        Err(FaultReason::PagingEntryReserved)
    );
    assert_eq!(check_entry(&caps, 1 << 39 | RW, 1, 3), Ok(true));

    // Through a walk: the fault, and a hole in the runs.
    let mut b = Builder::new(AddressWidth::Bits48);
    b.map4k(0x1000, 0x1_0000, RW);
    b.map4k(0x2000, 0x1_1000 | SNP, RW);
    b.map4k(0x3000, 0x1_2000, RW);
    assert_eq!(
        b.translate(0x2000, Perm::READ),
        Err(FaultReason::PagingEntryReserved)
    );
    let w = b.walk(0..0x4000, 100).unwrap();
    assert_eq!(
        w.runs,
        vec![
            run(0x1000, 0x1_0000, K4, Perm::READ_WRITE),
            run(0x3000, 0x1_2000, K4, Perm::READ_WRITE)
        ]
    );
    assert_eq!(
        (w.invalid, w.first_invalid),
        (1, Some((0x2000, FaultReason::PagingEntryReserved)))
    );
}

#[test]
fn unreadable_tables() {
    let mut b = Builder::new(AddressWidth::Bits48);
    let caps = b.caps();
    let beyond = PageTable {
        root: RAM,
        aw: AddressWidth::Bits48,
    };
    assert_eq!(
        translate(&b.mem, &caps, &beyond, 0, Perm::READ),
        Err(FaultReason::ContextInvalid)
    );
    let w = walk_range(&b.mem, &caps, &beyond, 0..1 << 48, 1000).unwrap();
    assert!(w.runs.is_empty());
    assert_eq!(w.first_invalid, Some((0, FaultReason::ContextInvalid)));
    // A next-table pointer outside RAM (within HAW).
    b.set(0x20_0000, 2, 0x1_0000_0000 | RW);
    assert_eq!(
        b.translate(0x20_0000, Perm::READ),
        Err(FaultReason::PagingEntryInvalid)
    );
    let w = b.walk(0..0x40_0000, 1000).unwrap();
    assert_eq!(
        w.first_invalid,
        Some((0x20_0000, FaultReason::PagingEntryInvalid))
    );
}

#[test]
fn contiguous_leaves_merge_across_tables_and_sizes() {
    // 4 KiB pages up to the 2 MiB boundary (one leaf table), a 2 MiB superpage, then 4 KiB
    // pages in the next leaf table, all contiguous in GPA: one run.
    let mut b = Builder::new(AddressWidth::Bits48);
    let g = 0x4000_0000 + M2; // GPA of iova M2
    for i in 0..4 {
        b.map4k(M2 - 4 * K4 + i * K4, g - 4 * K4 + i * K4, RW);
    }
    b.map2m(M2, g, RW);
    for i in 0..3 {
        b.map4k(2 * M2 + i * K4, g + M2 + i * K4, RW);
    }
    let runs = b.runs(0..1 << 48);
    assert_eq!(
        runs,
        vec![run(
            M2 - 4 * K4,
            g - 4 * K4,
            4 * K4 + M2 + 3 * K4,
            Perm::READ_WRITE
        )]
    );
    // A GPA discontinuity or a different right splits it.
    b.map4k(2 * M2 + K4, 0x7_0000_0000, RW);
    b.rights(2 * M2 + 2 * K4, 1, R);
    let runs = b.runs(0..1 << 48);
    assert_eq!(
        runs,
        vec![
            run(M2 - 4 * K4, g - 4 * K4, 4 * K4 + M2 + K4, Perm::READ_WRITE),
            run(2 * M2 + K4, 0x7_0000_0000, K4, Perm::READ_WRITE),
            run(2 * M2 + 2 * K4, g + M2 + 2 * K4, K4, Perm::READ),
        ]
    );
}

#[test]
fn range_is_clipped_inside_superpages() {
    let mut b = Builder::new(AddressWidth::Bits48);
    b.map1g(G1, 0x8_0000_0000, R);
    let runs = b.runs(G1 + 0x12_3000..G1 + 0x12_5000);
    assert_eq!(
        runs,
        vec![run(G1 + 0x12_3000, 0x8_0012_3000, 0x2000, Perm::READ)]
    );
    let w = b.walk(G1 + 0x12_3000..G1 + 0x12_5000, 100).unwrap();
    assert_eq!(w.reads, 2, "one entry per level down to the 1 GiB leaf");
}

#[test]
fn not_present_subtrees_are_skipped_in_one_read() {
    let mut b = Builder::new(AddressWidth::Bits48);
    b.map4k(0x7f_1234_5000, 0x9000, RW);
    // The whole 256 TiB space: 512 entries per level on the way, nothing below empty entries.
    let w = b.walk(0..1 << 48, u64::MAX).unwrap();
    assert_eq!(
        w.runs,
        vec![run(0x7f_1234_5000, 0x9000, K4, Perm::READ_WRITE)]
    );
    assert_eq!(w.reads, 4 * 512);
    // A PSI of one page reads one entry per level.
    assert_eq!(b.walk(0x7f_1234_5000..0x7f_1234_6000, 4).unwrap().reads, 4);
    // A 1 GiB PSI over an empty level-3 entry costs one read below the top, over an empty
    // top-level entry one read in all.
    assert_eq!(
        b.walk(0x40_0000_0000..0x40_4000_0000, 100).unwrap().reads,
        2
    );
    assert_eq!(
        b.walk(0x80_0000_0000..0x80_4000_0000, 100).unwrap().reads,
        1
    );
}

#[test]
fn budget_caps_the_entries_read() {
    let mut b = Builder::new(AddressWidth::Bits48);
    for i in 0..512 {
        b.map4k(i * K4, 0x100_0000 + i * K4, RW);
    }
    let need = b.walk(0..M2, u64::MAX).unwrap().reads;
    assert_eq!(need, 1 + 1 + 1 + 512);
    assert!(b.walk(0..M2, need).is_ok());
    let err = b.walk(0..M2, need - 1).unwrap_err();
    assert!(matches!(err, WalkError::TooMuchWork { budget, .. } if budget == need - 1));
    assert!(matches!(
        b.walk(0..M2, 0),
        Err(WalkError::TooMuchWork { at: 0, .. })
    ));
}

#[test]
fn hostile_tables_stay_bounded() {
    // Every entry of every table points back at the root: a cyclic "tree" of 512^4 leaves.
    let b = Builder::new(AddressWidth::Bits48);
    for i in 0..512 {
        b.write(b.root + i * 8, b.root | RW);
    }
    let budget = 100_000;
    let err = b.walk(0..1 << 48, budget).unwrap_err();
    assert!(matches!(err, WalkError::TooMuchWork { .. }));
    // The root as a leaf table maps its own page at every 4 KiB: translate still terminates.
    let l = b.translate(0x1234_5678_9000, Perm::READ).unwrap();
    assert_eq!((l.gpa, l.size), (b.root, K4));
}

#[derive(Clone, Debug)]
struct Mapped {
    page: u64,
    gpa_page: u64,
    huge: bool,
    bits: u64,
}

fn mapped() -> impl Strategy<Value = Mapped> {
    (0u64..2048, 0u64..64, any::<bool>(), 1u64..4).prop_map(|(page, gpa_page, huge, bits)| Mapped {
        page,
        gpa_page,
        huge,
        bits,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The runs of a range walk say exactly what translate says for every page, and are
    /// maximal (no run continues the one before it).
    #[test]
    fn runs_agree_with_translate(maps in proptest::collection::vec(mapped(), 0..40),
                                 start in 0u64..2048, len in 1u64..2048) {
        let mut b = Builder::new(AddressWidth::Bits48);
        for m in &maps {
            if m.huge {
                // A 2 MiB leaf somewhere in the first 8 MiB of IOVA (replacing a table).
                let iova = (m.page % 4) * M2;
                b.map2m(iova, (m.gpa_page % 8) * M2, m.bits);
            } else {
                // Mostly contiguous GPAs so that runs merge.
                let gpa = if m.gpa_page < 48 { 0x1000_0000 + m.page * K4 } else { m.gpa_page * K4 };
                let slot = b.slot(m.page * K4, 2);
                if b.read(slot) & PS != 0 {
                    continue; // a superpage covers it
                }
                b.map4k(m.page * K4, gpa, m.bits);
            }
        }
        let range = start * K4..(start + len).min(2048) * K4;
        let w = b.walk(range.clone(), u64::MAX).unwrap();
        for pair in w.runs.windows(2) {
            prop_assert!(pair[0].end().unwrap() <= pair[1].iova);
            prop_assert!(!pair[0].continues(&pair[1]), "not maximal: {:?}", pair);
        }
        let mut page = range.start;
        while page < range.end {
            let from_runs = w.runs.iter().find(|r| r.iova <= page && page < r.end().unwrap())
                .map(|r| (r.gpa + (page - r.iova), r.perm));
            let looked = lookup(&b.mem, &b.caps(), &b.table(), page).unwrap()
                .filter(|l| !l.perm.is_none())
                .map(|l| (l.gpa_of(page), l.perm));
            prop_assert_eq!(from_runs, looked, "page {:#x}", page);
            page += K4;
        }
    }
}
