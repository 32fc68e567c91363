//! The second-level page-table walk: 3 or 4 levels of 512 8-byte entries, 2 MiB and 1 GiB leaves
//! (PS), R/W ANDed along the walk, reserved bits rejected.
//!
//! Two entry points: [`translate`] one input address (a device's DMA, a fault's reason), and
//! [`walk_range`], which reads the tables over `[start, end)` and returns the leaf runs merged
//! into maximal runs contiguous in IOVA and GPA with the same rights: what the engine maps after
//! an invalidation. The range walk is bounded: a not-present entry at any level skips its whole
//! span in one read, and the number of entries read per call is capped (a hostile guest cannot
//! make one invalidation cost more than the budget). An entry the hardware would fault on
//! (reserved bits, an unreadable table) maps nothing: a hole in the runs, counted.
//!
//! Entry layout: bit 0 R, bit 1 W, bit 7 PS, bits 12..HAW-1 the address; R = W = 0 means not
//! present. Reserved (fault 0xC): bits HAW..51, bit 11 (SNP, without ECAP.SC), bit 62 (TM,
//! without ECAP.DT), PS at the top of a 4-level table, a superpage's address bits below its
//! size. Bits 52..61 and 63 are ignored, as are 2..6 and 8..10 (no execute or memory types).

use super::caps::Capabilities;
use super::fault::FaultReason;
use super::tables::PageTable;
use std::ops::Range;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Entries per table.
const ENTRIES: usize = 512;
/// PS: this entry is a superpage leaf.
const PS: u64 = 1 << 7;
/// SNP: snoop (reserved without ECAP.SC).
const SNP: u64 = 1 << 11;
/// TM: transient mapping (reserved without ECAP.DT).
const TM: u64 = 1 << 62;
/// Entries read from guest memory in one access.
const CHUNK: usize = 64;

/// Access rights: what a mapping allows, or what a request needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Perm {
    /// Reads allowed / needed.
    pub read: bool,
    /// Writes allowed / needed.
    pub write: bool,
}

impl Perm {
    /// No rights (the entry is not present).
    pub const NONE: Perm = Perm {
        read: false,
        write: false,
    };
    /// Read only.
    pub const READ: Perm = Perm {
        read: true,
        write: false,
    };
    /// Write only.
    pub const WRITE: Perm = Perm {
        read: false,
        write: true,
    };
    /// Read and write.
    pub const READ_WRITE: Perm = Perm {
        read: true,
        write: true,
    };

    /// The R/W bits of a table entry.
    pub fn of_entry(entry: u64) -> Perm {
        Perm {
            read: entry & 1 != 0,
            write: entry & 2 != 0,
        }
    }

    /// Rights of both.
    pub fn and(self, other: Perm) -> Perm {
        Perm {
            read: self.read && other.read,
            write: self.write && other.write,
        }
    }

    /// No right at all.
    pub fn is_none(self) -> bool {
        !self.read && !self.write
    }

    /// The fault a request needing `want` raises when these rights do not cover it: 6 for a
    /// missing read (checked first), 5 for a missing write.
    pub fn check(self, want: Perm) -> Result<(), FaultReason> {
        if want.read && !self.read {
            Err(FaultReason::ReadDenied)
        } else if want.write && !self.write {
            Err(FaultReason::WriteDenied)
        } else {
            Ok(())
        }
    }
}

/// The leaf that translates an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// First input address of the page.
    pub iova: u64,
    /// Guest-physical address of the page.
    pub gpa: u64,
    /// Page size: 4 KiB, 2 MiB or 1 GiB.
    pub size: u64,
    /// Rights, ANDed along the walk.
    pub perm: Perm,
}

impl Leaf {
    /// The guest-physical address of `iova` (inside the page).
    pub fn gpa_of(&self, iova: u64) -> u64 {
        self.gpa + (iova - self.iova)
    }
}

/// A run of the guest's mappings: `len` bytes from `iova` to `gpa`, with `perm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// First input address.
    pub iova: u64,
    /// Guest-physical address of `iova`.
    pub gpa: u64,
    /// Length in bytes (a multiple of 4 KiB from a walk; never 0).
    pub len: u64,
    /// Rights.
    pub perm: Perm,
}

impl Run {
    /// One past the last input address (`None` on overflow).
    pub fn end(&self) -> Option<u64> {
        self.iova.checked_add(self.len)
    }

    /// Whether `next` continues this run: contiguous in IOVA and GPA, same rights.
    pub fn continues(&self, next: &Run) -> bool {
        self.perm == next.perm
            && self.end() == Some(next.iova)
            && self.gpa.checked_add(self.len) == Some(next.gpa)
    }
}

/// The result of a range walk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeWalk {
    /// Maximal runs, sorted, inside the walked range.
    pub runs: Vec<Run>,
    /// Table entries read.
    pub reads: u64,
    /// Entries (or unreadable groups of entries) that the hardware would fault on: they map
    /// nothing.
    pub invalid: u64,
    /// The first of those: its input address and fault reason (for a log line).
    pub first_invalid: Option<(u64, FaultReason)>,
}

/// Why a range walk gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// Reading the next entries would exceed the budget.
    #[error("page-table walk over budget ({budget} entries) at {at:#x}")]
    TooMuchWork {
        /// The budget, in entries read.
        budget: u64,
        /// Input address the walk had reached.
        at: u64,
    },
}

/// Shift of the span one entry at `level` (1 = leaf table) covers.
fn level_shift(level: u8) -> u32 {
    12 + 9 * (u32::from(level) - 1)
}

/// Check `entry` (present) at `level` of a `levels`-level table: `Ok(true)` for a leaf.
fn check_entry(
    caps: &Capabilities,
    entry: u64,
    level: u8,
    levels: u8,
) -> Result<bool, FaultReason> {
    let mut rsvd = ((1u64 << 52) - 1) & !((1u64 << caps.haw()) - 1);
    if !caps.device_tlb() {
        rsvd |= TM;
    }
    if !caps.snoop_control() {
        rsvd |= SNP;
    }
    let superpage = entry & PS != 0 && level > 1;
    if superpage {
        let allowed = match level {
            2 => caps.superpage_2m(),
            3 => caps.superpage_1g() && levels >= 3,
            _ => false,
        };
        if !allowed {
            return Err(FaultReason::PagingEntryReserved);
        }
        rsvd |= ((1u64 << level_shift(level)) - 1) & !0xfff;
    }
    if entry & rsvd != 0 {
        return Err(FaultReason::PagingEntryReserved);
    }
    Ok(level == 1 || superpage)
}

/// The address bits of an entry at `level` (a leaf's page or the next table).
fn entry_addr(caps: &Capabilities, entry: u64, level: u8, leaf: bool) -> u64 {
    let low = if leaf {
        (1u64 << level_shift(level)) - 1
    } else {
        0xfff
    };
    entry & caps.haw_page_mask() & !low
}

fn read_failed(level: u8, levels: u8) -> FaultReason {
    // An error reading the table SLPTPTR points to is an invalid context entry (3); reading a
    // table a previous entry points to is reason 7.
    if level == levels {
        FaultReason::ContextInvalid
    } else {
        FaultReason::PagingEntryInvalid
    }
}

/// Walk `table` for `iova`: the leaf (`Ok(None)` when an entry on the way is not present), or the
/// fault the lookup itself raises (4 above the width, 3/7 unreadable table, 0xC reserved bits).
pub fn lookup<M: GuestMemory + ?Sized>(
    mem: &M,
    caps: &Capabilities,
    table: &PageTable,
    iova: u64,
) -> Result<Option<Leaf>, FaultReason> {
    if iova >= table.aw.limit() {
        return Err(FaultReason::AddressBeyondWidth);
    }
    let levels = table.aw.levels();
    let mut next = table.root;
    let mut perm = Perm::READ_WRITE;
    for level in (1..=levels).rev() {
        let shift = level_shift(level);
        let index = (iova >> shift) & (ENTRIES as u64 - 1);
        let entry = next
            .checked_add(index * 8)
            .and_then(|a| mem.read_obj::<u64>(GuestAddress(a)).ok())
            .map(u64::from_le)
            .ok_or(read_failed(level, levels))?;
        let own = Perm::of_entry(entry);
        if own.is_none() {
            return Ok(None);
        }
        let leaf = check_entry(caps, entry, level, levels)?;
        perm = perm.and(own);
        if leaf {
            let size = 1u64 << shift;
            return Ok(Some(Leaf {
                iova: iova & !(size - 1),
                gpa: entry_addr(caps, entry, level, true),
                size,
                perm,
            }));
        }
        next = entry_addr(caps, entry, level, false);
    }
    // Level 1 entries are always leaves.
    Ok(None)
}

/// Translate a request for `want` at `iova`: the leaf, or the fault reason to record (a
/// not-present entry is a read or write fault, like missing rights).
pub fn translate<M: GuestMemory + ?Sized>(
    mem: &M,
    caps: &Capabilities,
    table: &PageTable,
    iova: u64,
    want: Perm,
) -> Result<Leaf, FaultReason> {
    match lookup(mem, caps, table, iova)? {
        Some(leaf) => leaf.perm.check(want).map(|()| leaf),
        None => Err(Perm::NONE
            .check(want)
            .err()
            .unwrap_or(FaultReason::ReadDenied)),
    }
}

struct RangeWalker<'a, M: ?Sized> {
    mem: &'a M,
    caps: &'a Capabilities,
    range: Range<u64>,
    levels: u8,
    budget: u64,
    out: RangeWalk,
}

impl<M: GuestMemory + ?Sized> RangeWalker<'_, M> {
    fn hole(&mut self, iova: u64, reason: FaultReason) {
        self.out.invalid += 1;
        if self.out.first_invalid.is_none() {
            self.out.first_invalid = Some((iova, reason));
        }
    }

    fn emit(&mut self, run: Run) {
        match self.out.runs.last_mut() {
            Some(last) if last.continues(&run) => last.len += run.len,
            _ => self.out.runs.push(run),
        }
    }

    /// Walk the table at `table` (level `level`, first input address `base`) over the range.
    fn table(&mut self, table: u64, level: u8, base: u64, perm: Perm) -> Result<(), WalkError> {
        let shift = level_shift(level);
        let span = 1u64 << shift;
        // Level <= 4: a table spans at most 2^48, so base + span * 512 fits.
        let table_end = base + span * ENTRIES as u64;
        let lo = self.range.start.max(base);
        let hi = self.range.end.min(table_end);
        if lo >= hi {
            return Ok(());
        }
        let first = ((lo - base) >> shift) as usize;
        let last = ((hi - 1 - base) >> shift) as usize;
        let mut index = first;
        while index <= last {
            let n = CHUNK.min(last + 1 - index);
            let at = base + ((index as u64) << shift);
            if self.out.reads + n as u64 > self.budget {
                return Err(WalkError::TooMuchWork {
                    budget: self.budget,
                    at,
                });
            }
            self.out.reads += n as u64;
            let mut buf = [0u8; CHUNK * 8];
            let read = table
                .checked_add(index as u64 * 8)
                .map(|a| self.mem.read_slice(&mut buf[..n * 8], GuestAddress(a)));
            if !matches!(read, Some(Ok(()))) {
                self.hole(at, read_failed(level, self.levels));
                index += n;
                continue;
            }
            for (k, raw) in buf[..n * 8].chunks_exact(8).enumerate() {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(raw);
                let entry = u64::from_le_bytes(bytes);
                let iova = base + (((index + k) as u64) << shift);
                let own = Perm::of_entry(entry);
                if own.is_none() {
                    continue; // not present: the whole span in one read
                }
                let leaf = match check_entry(self.caps, entry, level, self.levels) {
                    Ok(leaf) => leaf,
                    Err(reason) => {
                        self.hole(iova, reason);
                        continue;
                    }
                };
                let perm = perm.and(own);
                if perm.is_none() {
                    continue; // nothing below can grant a right
                }
                if leaf {
                    let start = iova.max(self.range.start);
                    let end = (iova + span).min(self.range.end);
                    let gpa = entry_addr(self.caps, entry, level, true) + (start - iova);
                    self.emit(Run {
                        iova: start,
                        gpa,
                        len: end - start,
                        perm,
                    });
                } else {
                    let next = entry_addr(self.caps, entry, level, false);
                    self.table(next, level - 1, iova, perm)?;
                }
            }
            index += n;
        }
        Ok(())
    }
}

/// Walk `table` over `range` (clipped to the table's width) reading at most `budget` entries:
/// the maximal runs it maps.
pub fn walk_range<M: GuestMemory + ?Sized>(
    mem: &M,
    caps: &Capabilities,
    table: &PageTable,
    range: Range<u64>,
    budget: u64,
) -> Result<RangeWalk, WalkError> {
    let limit = table.aw.limit();
    let range = range.start.min(limit)..range.end.min(limit);
    let mut walker = RangeWalker {
        mem,
        caps,
        range,
        levels: table.aw.levels(),
        budget,
        out: RangeWalk::default(),
    };
    walker.table(table.root, walker.levels, 0, Perm::READ_WRITE)?;
    Ok(walker.out)
}

#[cfg(test)]
#[path = "walk_tests.rs"]
mod tests;
