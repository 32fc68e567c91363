//! An address space's mapping table as a left-right pair: the engine updates a private copy in
//! place, readers get the published copy (immutable, behind an `Arc`); publishing swaps them
//! and the retired copy catches up by replaying a change log.

use super::mapping::Mapping;
use std::collections::BTreeMap;
use std::sync::Arc;

/// An address space's mapping table, keyed by the first IOVA (O(log n) update and lookup).
pub type Table = BTreeMap<u64, Mapping>;

/// The mapping containing `iova`, if any.
pub fn lookup(table: &Table, iova: u64) -> Option<&Mapping> {
    table
        .range(..=iova)
        .next_back()
        .map(|(_, m)| m)
        .filter(|m| m.end >= iova)
}

/// Heap bytes one entry of a [`Table`] costs at most: a B-tree leaf (11 slots of key +
/// [`Mapping`], ~456 bytes) at its minimum fill of 5, plus the amortized internal nodes above
/// it and allocator overhead. `viommu/tests/limits.rs` checks it against a counting allocator.
pub const TABLE_BYTES_PER_ENTRY: usize = 128;

/// Heap bytes of one change-log entry.
pub const TABLE_LOG_ENTRY_BYTES: usize = std::mem::size_of::<TableOp>();

/// Log entries a table may keep whatever its size.
const LOG_KEEP: usize = 64;

/// One change to a table, logged so the spare copy can catch up.
#[derive(Clone, Copy, Debug)]
enum TableOp {
    Insert(Mapping),
    Remove(u64),
}

/// An address space's table as a left-right pair: readers use the published copy (immutable,
/// behind an `Arc`), the engine updates a private copy in place. Publishing hands the private
/// copy to readers; the previously published copy is taken back once no reader holds it and
/// catches up by replaying the logged changes. Every update is O(log n) and nothing is ever copied
/// whole, whatever the table size.
#[derive(Debug, Default)]
pub struct DualTable {
    /// Up-to-date private copy (`None` right after publishing, until reclaimed).
    cur: Option<Table>,
    /// What readers see.
    published: Option<Arc<Table>>,
    /// The copy published before `published`, reclaimed as the next private copy.
    retired: Option<Arc<Table>>,
    /// Changes from the content of `published` (or of `retired` while `cur` is `None`) to the
    /// current state.
    log: Vec<TableOp>,
    /// Whether there are changes not yet published.
    changed: bool,
}

impl DualTable {
    /// An empty table.
    pub fn new() -> Self {
        DualTable {
            cur: Some(Table::new()),
            ..Default::default()
        }
    }

    /// The current state (for reads by the engine).
    pub fn state(&self) -> &Table {
        static EMPTY: Table = Table::new();
        match (&self.cur, &self.published) {
            (Some(t), _) => t,
            (None, Some(p)) => p,
            (None, None) => &EMPTY,
        }
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.state().len()
    }

    /// Estimated heap bytes of every copy this pair holds (private, published, retired) and
    /// of its change log; an upper bound for B-tree nodes at their minimum fill.
    pub fn heap_estimate(&self) -> usize {
        let mut copies: Vec<&Table> = Vec::new();
        for t in [
            self.cur.as_ref(),
            self.published.as_deref(),
            self.retired.as_deref(),
        ]
        .into_iter()
        .flatten()
        {
            if !copies.iter().any(|c| std::ptr::eq(*c, t)) {
                copies.push(t);
            }
        }
        let entries: usize = copies.iter().map(|t| t.len()).sum();
        entries * TABLE_BYTES_PER_ENTRY
            + self.log.capacity() * std::mem::size_of::<TableOp>()
            + 2 * std::mem::size_of::<Table>()
    }

    /// The private copy, reclaiming the retired one first if needed.
    fn writable(&mut self) -> &mut Table {
        if self.cur.is_none() {
            // Reclaim the retired copy if readers left it (they normally have by the next
            // batch); a reader still holding it must not stall the guest's MAPs, so after a
            // short spin copy the published table instead (O(n), rare).
            let reclaimed = self.retired.take().and_then(|old| {
                if spin_until(|| Arc::strong_count(&old) == 1, RECLAIM_SPINS) {
                    Arc::try_unwrap(old).ok()
                } else {
                    None
                }
            });
            let t = match reclaimed {
                Some(mut t) => {
                    for op in self.log.drain(..) {
                        match op {
                            TableOp::Insert(m) => {
                                t.insert(m.start, m);
                            }
                            TableOp::Remove(k) => {
                                t.remove(&k);
                            }
                        }
                    }
                    t
                }
                None => {
                    self.log.clear();
                    self.published.as_deref().cloned().unwrap_or_default()
                }
            };
            self.cur = Some(t);
        }
        self.changed = true;
        self.cur.get_or_insert_with(Table::new)
    }

    /// Insert `m` (the caller checked it overlaps nothing).
    pub fn insert(&mut self, m: Mapping) {
        self.writable().insert(m.start, m);
        self.log.push(TableOp::Insert(m));
    }

    /// Remove the mapping starting at `start`.
    pub fn remove(&mut self, start: u64) {
        if self.writable().remove(&start).is_some() {
            self.log.push(TableOp::Remove(start));
        }
    }

    /// The table readers should see now: publishes the private copy if anything changed.
    /// The previous copy is kept for reclaiming only while catching it up is cheaper than
    /// copying: after a batch with more changes than the new table has entries (e.g. an
    /// unmap of most of it) it is dropped with the log, so a quiet space never holds more
    /// than about three times its live mappings.
    pub fn publish(&mut self) -> Arc<Table> {
        if self.changed || self.published.is_none() {
            let new = Arc::new(self.cur.take().unwrap_or_else(|| self.state().clone()));
            let live = new.len();
            self.retired = self.published.replace(new);
            self.changed = false;
            if self.log.len() > live.max(LOG_KEEP) {
                self.retired = None;
                self.log = Vec::new();
            } else if self.log.capacity() > 4 * self.log.len().max(LOG_KEEP) {
                self.log.shrink_to(2 * self.log.len().max(LOG_KEEP));
            }
        }
        match &self.published {
            Some(p) => p.clone(),
            None => Arc::new(Table::new()),
        }
    }
}

/// Spins spent waiting for readers to leave a retired table before copying instead.
const RECLAIM_SPINS: u32 = 4096;

/// Spin up to `max` times until `done()`.
fn spin_until(done: impl Fn() -> bool, max: u32) -> bool {
    for _ in 0..max {
        if done() {
            return true;
        }
        std::hint::spin_loop();
    }
    done()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(start: u64, end: u64, gpa: u64) -> Mapping {
        Mapping {
            start,
            end,
            gpa,
            read: true,
            write: false,
            mmio: false,
        }
    }

    #[test]
    fn lookup_finds_the_covering_mapping() {
        let mut t = Table::new();
        t.insert(0x1000, map(0x1000, 0x1fff, 0x8000));
        t.insert(0x3000, map(0x3000, 0x3fff, 0x9000));
        assert_eq!(lookup(&t, 0xfff), None);
        assert_eq!(lookup(&t, 0x1000).unwrap().gpa_of(0x1000), 0x8000);
        assert_eq!(lookup(&t, 0x1fff).unwrap().gpa_of(0x1fff), 0x8fff);
        assert_eq!(lookup(&t, 0x2000), None);
        assert_eq!(lookup(&t, 0x3abc).unwrap().gpa_of(0x3abc), 0x9abc);
        assert_eq!(lookup(&t, u64::MAX), None);
    }

    #[test]
    fn dual_table_catches_up_and_never_changes_a_published_copy() {
        let mut t = DualTable::new();
        t.insert(map(0x1000, 0x1fff, 1));
        t.insert(map(0x2000, 0x2fff, 2));
        let p1 = t.publish();
        assert_eq!(p1.len(), 2);
        t.remove(0x1000);
        t.insert(map(0x5000, 0x5fff, 5));
        assert_eq!(p1.len(), 2, "published copy untouched");
        assert_eq!(t.len(), 2);
        drop(p1);
        let p2 = t.publish();
        let keys: Vec<u64> = p2.keys().copied().collect();
        assert_eq!(keys, vec![0x2000, 0x5000]);
        // A reader holding p2 while the writer reclaims p1's copy: both stay consistent.
        t.insert(map(0x9000, 0x9fff, 9));
        let p3 = t.publish();
        assert_eq!(p2.keys().copied().collect::<Vec<_>>(), vec![0x2000, 0x5000]);
        assert_eq!(p3.len(), 3);
        drop(p2);
        t.remove(0x2000);
        let p4 = t.publish();
        assert_eq!(p4.keys().copied().collect::<Vec<_>>(), vec![0x5000, 0x9000]);
        assert_eq!(p3.len(), 3);
        // Publishing without changes returns the same copy.
        assert!(Arc::ptr_eq(&t.publish(), &p4));
        // A reader that keeps the retired copy does not block the writer: it copies instead.
        let held = p3;
        t.insert(map(0xa000, 0xafff, 10));
        let p5 = t.publish();
        assert_eq!(
            p5.keys().copied().collect::<Vec<_>>(),
            vec![0x5000, 0x9000, 0xa000]
        );
        assert_eq!(held.len(), 3);
        drop(p4);
        t.remove(0x5000);
        assert_eq!(
            t.publish().keys().copied().collect::<Vec<_>>(),
            vec![0x9000, 0xa000]
        );
    }
}
