//! The changes that bring the engine's mappings for a range in line with a fresh walk of it.
//!
//! Input: the walked range R, the runs the walk found in R ([`super::walk::walk_range`]:
//! sorted, inside R) and the engine's current mappings that intersect R (sorted, with their
//! whole extents, which may reach outside R). Output: [`Change`]s, in address order, grouped so
//! that each `Unmap` is directly followed by the `Map`s that replace what it removed.
//!
//! A point of R is *dirty* when the old and new translations differ there (mapped vs not, GPA,
//! rights). Unchanged points produce nothing, so the neighbours Linux's rounding of page-selective
//! flushes to aligned power-of-two ranges pulls in cost no engine call. An old mapping that has a
//! dirty point is removed whole (VFIO type1v2 cannot unmap part of a mapping, and the engine's
//! UNMAP, like virtio-iommu's, removes whole mappings inside its range), and what it mapped that
//! stays valid (its parts outside R, its unchanged parts inside R) is mapped back together with
//! the new translations, in maximal runs.
//!
//! How the engine consumes it: apply the changes in order. `Unmap(r)` removes the mappings inside
//! `r`; `r` never cuts a mapping (it spans exactly the removed mappings and the unmapped gaps
//! between them). `Map(run)` adds one mapping where nothing is mapped. Publishing once after the
//! whole list makes the change atomic for emulated devices. For a host (VFIO) address space the
//! re-mapped remainder of a split mapping is briefly unmapped between the two calls: a split only
//! happens when the guest changes part of what one earlier invalidation mapped as one run.

use super::walk::{Perm, Run};
use std::ops::Range;

/// One change to the engine's mappings of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Remove every mapping inside the range (no mapping straddles its ends).
    Unmap(Range<u64>),
    /// Add a mapping where none is.
    Map(Run),
}

/// Inputs that do not describe a valid state (a bug in the caller, never guest-controlled).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiffError {
    /// A run is empty or its end overflows.
    #[error("{0} run at {1:#x} is empty or overflows")]
    BadRun(&'static str, u64),
    /// Runs are not sorted or overlap.
    #[error("{0} runs overlap or are unsorted at {1:#x}")]
    Unsorted(&'static str, u64),
    /// A new run lies outside the walked range.
    #[error("new run at {0:#x} is outside the walked range")]
    OutsideRange(u64),
}

fn validate(which: &'static str, runs: &[Run]) -> Result<(), DiffError> {
    let mut prev_end = 0u64;
    for (i, r) in runs.iter().enumerate() {
        let end = r.end().filter(|_| r.len > 0);
        if end.is_none() || r.gpa.checked_add(r.len).is_none() {
            return Err(DiffError::BadRun(which, r.iova));
        }
        if i > 0 && r.iova < prev_end {
            return Err(DiffError::Unsorted(which, r.iova));
        }
        prev_end = end.unwrap_or(u64::MAX);
    }
    Ok(())
}

/// The run of `runs` covering `at`, advancing the cursor `i` (points are visited in order).
fn covering(runs: &[Run], i: &mut usize, at: u64) -> Option<usize> {
    while *i < runs.len() && runs[*i].end().is_some_and(|e| e <= at) {
        *i += 1;
    }
    (*i < runs.len() && runs[*i].iova <= at).then_some(*i)
}

/// The translation of `at` by run `r`: (GPA, rights).
fn translation(runs: &[Run], r: Option<usize>, at: u64) -> Option<(u64, Perm)> {
    r.map(|i| (runs[i].gpa + (at - runs[i].iova), runs[i].perm))
}

/// One elementary interval: no run of either side starts or ends inside it.
struct Piece {
    start: u64,
    end: u64,
    old: Option<usize>,
    new: Option<usize>,
    in_range: bool,
}

/// The changes that turn `old` (the engine's mappings intersecting `range`) into the state where
/// `range` translates as `new` and everything outside it is unchanged.
pub fn diff(range: Range<u64>, new: &[Run], old: &[Run]) -> Result<Vec<Change>, DiffError> {
    validate("new", new)?;
    validate("old", old)?;
    if let Some(r) = new
        .iter()
        .find(|r| r.iova < range.start || r.end().is_none_or(|e| e > range.end))
    {
        return Err(DiffError::OutsideRange(r.iova));
    }
    // Every boundary; between two consecutive ones nothing starts or ends.
    let mut points = Vec::with_capacity(2 + 2 * (new.len() + old.len()));
    points.extend([range.start, range.end]);
    for r in new.iter().chain(old) {
        points.extend([r.iova, r.iova + r.len]);
    }
    points.sort_unstable();
    points.dedup();

    let (mut oi, mut ni) = (0, 0);
    let mut pieces = Vec::with_capacity(points.len());
    let mut victim = vec![false; old.len()];
    for w in points.windows(2) {
        let (start, end) = (w[0], w[1]);
        let o = covering(old, &mut oi, start);
        let n = covering(new, &mut ni, start);
        let in_range = range.start <= start && start < range.end;
        if o.is_none() && (n.is_none() || !in_range) {
            continue; // nothing mapped, nothing to map
        }
        let dirty = in_range && translation(old, o, start) != translation(new, n, start);
        if dirty {
            if let Some(o) = o {
                victim[o] = true;
            }
        }
        pieces.push((
            Piece {
                start,
                end,
                old: o,
                new: n,
                in_range,
            },
            dirty,
        ));
    }

    let mut changes = Vec::new();
    // Pieces to (re)map, in order; a component is a maximal stretch of touching pieces that
    // are dirty or belong to a removed mapping.
    let mut component: Vec<Run> = Vec::new();
    let mut unmap: Option<Range<u64>> = None;
    let mut last_end: Option<u64> = None;
    let flush = |changes: &mut Vec<Change>, unmap: &mut Option<Range<u64>>, maps: &mut Vec<Run>| {
        if let Some(r) = unmap.take() {
            changes.push(Change::Unmap(r));
        }
        changes.extend(maps.drain(..).map(Change::Map));
    };
    for (p, dirty) in &pieces {
        let removed = p.old.is_some_and(|o| victim[o]);
        if !dirty && !removed {
            continue;
        }
        if last_end != Some(p.start) {
            flush(&mut changes, &mut unmap, &mut component);
        }
        last_end = Some(p.end);
        if let Some(o) = p.old.filter(|&o| victim[o]) {
            let (s, e) = (old[o].iova, old[o].iova + old[o].len);
            unmap = Some(match unmap.take() {
                Some(u) => u.start.min(s)..u.end.max(e),
                None => s..e,
            });
        }
        let target = if p.in_range {
            p.new.map(|n| (new, n))
        } else {
            p.old.map(|o| (old, o))
        };
        if let Some((runs, i)) = target {
            let piece = Run {
                iova: p.start,
                gpa: runs[i].gpa + (p.start - runs[i].iova),
                len: p.end - p.start,
                perm: runs[i].perm,
            };
            match component.last_mut() {
                Some(last) if last.continues(&piece) => last.len += piece.len,
                _ => component.push(piece),
            }
        }
    }
    flush(&mut changes, &mut unmap, &mut component);
    Ok(changes)
}

#[cfg(test)]
#[path = "diff_tests.rs"]
mod tests;
