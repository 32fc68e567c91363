//! Tests of the diff: named cases, and a property test applying it to a model of the engine.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

const K4: u64 = 0x1000;
const M2: u64 = 0x20_0000;
const RW: Perm = Perm::READ_WRITE;
const RO: Perm = Perm::READ;

fn run(iova: u64, gpa: u64, len: u64, perm: Perm) -> Run {
    Run {
        iova,
        gpa,
        len,
        perm,
    }
}

/// The engine as the diff expects it: UNMAP removes whole mappings inside its range (and must
/// not cut one), MAP adds a mapping where none is.
fn apply(old: &[Run], changes: &[Change]) -> Result<Vec<Run>, String> {
    let mut state: BTreeMap<u64, Run> = old.iter().map(|r| (r.iova, *r)).collect();
    for c in changes {
        match c {
            Change::Unmap(r) => {
                let hits: Vec<Run> = state
                    .values()
                    .filter(|m| m.iova < r.end && m.iova + m.len > r.start)
                    .copied()
                    .collect();
                if hits.is_empty() {
                    return Err(format!("unmap {r:x?} removes nothing"));
                }
                for m in hits {
                    if m.iova < r.start || m.iova + m.len > r.end {
                        return Err(format!("unmap {r:x?} cuts {m:x?}"));
                    }
                    state.remove(&m.iova);
                }
            }
            Change::Map(run) => {
                if let Some(m) = state
                    .values()
                    .find(|m| m.iova < run.iova + run.len && m.iova + m.len > run.iova)
                {
                    return Err(format!("map {run:x?} overlaps {m:x?}"));
                }
                state.insert(run.iova, *run);
            }
        }
    }
    Ok(state.into_values().collect())
}

/// Page -> (GPA, rights) of a set of runs.
fn pages(runs: &[Run]) -> BTreeMap<u64, (u64, Perm)> {
    let mut out = BTreeMap::new();
    for r in runs {
        let mut off = 0;
        while off < r.len {
            out.insert(r.iova + off, (r.gpa + off, r.perm));
            off += K4;
        }
    }
    out
}

/// What the state must translate after the diff: `new` inside `range`, `old` outside.
fn expected(range: &Range<u64>, new: &[Run], old: &[Run]) -> BTreeMap<u64, (u64, Perm)> {
    let mut want: BTreeMap<u64, (u64, Perm)> = pages(old)
        .into_iter()
        .filter(|(p, _)| !range.contains(p))
        .collect();
    want.extend(pages(new));
    want
}

/// Diff, apply, check the result and the minimality rules; returns the changes.
fn check(range: Range<u64>, new: &[Run], old: &[Run]) -> Vec<Change> {
    let changes = diff(range.clone(), new, old).unwrap();
    let after = apply(old, &changes).unwrap_or_else(|e| panic!("{e}: {changes:x?}"));
    let want = expected(&range, new, old);
    assert_eq!(pages(&after), want, "changes {changes:x?}");
    // Every mapping removed had a page that changed.
    let before = pages(old);
    for c in &changes {
        if let Change::Unmap(r) = c {
            for m in old
                .iter()
                .filter(|m| r.start <= m.iova && m.iova + m.len <= r.end)
            {
                let changed = (0..m.len / K4)
                    .map(|i| m.iova + i * K4)
                    .any(|p| before.get(&p) != want.get(&p));
                assert!(changed, "{m:x?} removed although unchanged: {changes:x?}");
            }
        }
    }
    // Maps come out maximal.
    let maps: Vec<Run> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Map(r) => Some(*r),
            _ => None,
        })
        .collect();
    for w in maps.windows(2) {
        assert!(!w[0].continues(&w[1]), "not maximal: {changes:x?}");
    }
    changes
}

#[test]
fn map_into_nothing_and_unmap_everything() {
    let a = run(0x10_0000, 0x8000_0000, 4 * K4, RW);
    assert_eq!(check(0x10_0000..0x10_4000, &[a], &[]), vec![Change::Map(a)]);
    assert_eq!(
        check(0..1 << 39, &[], &[a]),
        vec![Change::Unmap(0x10_0000..0x10_4000)]
    );
    assert_eq!(check(0..1 << 39, &[a], &[a]), vec![], "nothing changed");
}

#[test]
fn unchanged_neighbours_in_a_rounded_flush_cost_nothing() {
    // Two pages mapped by earlier invalidations; Linux maps the page between them with
    // contiguous GPAs and flushes an aligned 16 KiB range around it.
    let old = [run(0, 0x5000, K4, RW), run(2 * K4, 0x7000, K4, RW)];
    let new = [run(0, 0x5000, 3 * K4, RW)];
    let changes = check(0..4 * K4, &new, &old);
    assert_eq!(changes, vec![Change::Map(run(K4, 0x6000, K4, RW))]);
}

#[test]
fn remap_and_permission_change() {
    let old = [run(0, 0x10_0000, 4 * K4, RW)];
    let new = [run(0, 0x20_0000, 4 * K4, RW)];
    assert_eq!(
        check(0..4 * K4, &new, &old),
        vec![Change::Unmap(0..4 * K4), Change::Map(new[0])]
    );
    // One page becomes read-only: the whole mapping goes, three runs come back.
    let new = [
        run(0, 0x10_0000, K4, RW),
        run(K4, 0x10_1000, K4, RO),
        run(2 * K4, 0x10_2000, 2 * K4, RW),
    ];
    assert_eq!(
        check(0..4 * K4, &new, &old),
        vec![
            Change::Unmap(0..4 * K4),
            Change::Map(new[0]),
            Change::Map(new[1]),
            Change::Map(new[2])
        ]
    );
}

#[test]
fn unmapping_part_of_a_run_maps_back_the_rest_outside_the_range() {
    // One 2 MiB run mapped by one invalidation; the guest unmaps 4 KiB in the middle.
    let old = [run(0, 0x4000_0000, M2, RW)];
    let r = 0x10_0000..0x10_1000;
    assert_eq!(
        check(r, &[], &old),
        vec![
            Change::Unmap(0..M2),
            Change::Map(run(0, 0x4000_0000, 0x10_0000, RW)),
            Change::Map(run(0x10_1000, 0x4010_1000, M2 - 0x10_1000, RW)),
        ]
    );
}

#[test]
fn superpage_split_and_merge() {
    // Split: a 2 MiB superpage replaced by 512 4 KiB leaves with the same GPAs: same runs.
    let old = [run(M2, 0x8000_0000, M2, RW)];
    assert_eq!(check(M2..2 * M2, &old, &old), vec![]);
    // ...then one leaf of it is remapped elsewhere.
    let new = [
        run(M2, 0x8000_0000, K4, RW),
        run(M2 + K4, 0x9000_0000, K4, RW),
        run(M2 + 2 * K4, 0x8000_2000, M2 - 2 * K4, RW),
    ];
    let c = check(M2 + K4..M2 + 2 * K4, &new[1..2], &old);
    assert_eq!(c[0], Change::Unmap(M2..2 * M2));
    assert_eq!(&c[1..], &new.map(Change::Map));
    // Merge: 512 mappings made page by page, replaced by one superpage with the same GPAs:
    // nothing to do; with other GPAs, one unmap spans them all and one map replaces them.
    let small: Vec<Run> = (0..512)
        .map(|i| run(M2 + i * K4, 0x8000_0000 + i * K4, K4, RW))
        .collect();
    let big = [run(M2, 0x8000_0000, M2, RW)];
    assert_eq!(check(M2..2 * M2, &big, &small), vec![]);
    let moved = [run(M2, 0xc000_0000, M2, RW)];
    assert_eq!(
        check(M2..2 * M2, &moved, &small),
        vec![Change::Unmap(M2..2 * M2), Change::Map(moved[0])]
    );
}

#[test]
fn overlapping_page_selective_flushes() {
    // Three invalidations whose ranges overlap, applied in turn to the engine's state.
    let mut state: Vec<Run> = vec![];
    let steps: [(Range<u64>, Vec<Run>); 3] = [
        (0..8 * K4, vec![run(K4, 0x1000_0000, 4 * K4, RW)]),
        (4 * K4..12 * K4, vec![run(4 * K4, 0x1000_3000, 6 * K4, RW)]),
        (
            0..16 * K4,
            vec![
                run(K4, 0x1000_0000, 3 * K4, RW),
                run(6 * K4, 0x1000_5000, 4 * K4, RO),
            ],
        ),
    ];
    for (range, new) in steps {
        let old: Vec<Run> = state.clone();
        let changes = check(range.clone(), &new, &old);
        state = apply(&old, &changes).unwrap();
        assert_eq!(pages(&state), expected(&range, &new, &old));
    }
    assert_eq!(
        pages(&state),
        pages(&[
            run(K4, 0x1000_0000, 3 * K4, RW),
            run(6 * K4, 0x1000_5000, 4 * K4, RO)
        ])
    );
}

#[test]
fn invalid_inputs_are_errors() {
    let a = run(0, 0, K4, RW);
    let b = run(K4 / 2, 0, K4, RW);
    assert_eq!(
        diff(0..M2, &[a, b], &[]),
        Err(DiffError::Unsorted("new", K4 / 2))
    );
    assert_eq!(
        diff(0..M2, &[], &[b, a]),
        Err(DiffError::Unsorted("old", 0))
    );
    assert_eq!(
        diff(0..M2, &[run(0, 0, 0, RW)], &[]),
        Err(DiffError::BadRun("new", 0))
    );
    assert_eq!(
        diff(0..M2, &[], &[run(u64::MAX, 0, 2, RW)]),
        Err(DiffError::BadRun("old", u64::MAX))
    );
    assert_eq!(diff(K4..M2, &[a], &[]), Err(DiffError::OutsideRange(0)));
}

/// A space of 64 pages: old mappings anywhere, a range, and new runs inside it derived from the
/// old state by edits (so that they overlap in interesting ways), made maximal like a walk.
#[derive(Clone, Debug)]
struct Case {
    old: Vec<Run>,
    range: Range<u64>,
    new: Vec<Run>,
}

fn perm_of(v: u8) -> Perm {
    match v % 3 {
        0 => Perm::READ,
        1 => Perm::WRITE,
        _ => Perm::READ_WRITE,
    }
}

fn maximal(pages: &BTreeMap<u64, (u64, Perm)>) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (&p, &(g, perm)) in pages {
        let r = run(p, g, K4, perm);
        match out.last_mut() {
            Some(last) if last.continues(&r) => last.len += K4,
            _ => out.push(r),
        }
    }
    out
}

fn case() -> impl Strategy<Value = Case> {
    let old = proptest::collection::vec((0u64..64, 1u64..12, 0u64..96, any::<u8>()), 0..10);
    let edits =
        proptest::collection::vec((0u64..64, 1u64..10, 0u8..4, 0u64..96, any::<u8>()), 0..6);
    (old, 0u64..64, 1u64..64, edits).prop_map(|(old, start, len, edits)| {
        // Non-overlapping old mappings (not necessarily maximal: the engine keeps what it got).
        let mut runs: Vec<Run> = Vec::new();
        let mut sorted = old;
        sorted.sort();
        for (p, l, g, perm) in sorted {
            let l = l.min(64 - p);
            if runs.last().is_some_and(|r: &Run| r.iova + r.len > p * K4) || l == 0 {
                continue;
            }
            runs.push(run(p * K4, g * K4, l * K4, perm_of(perm)));
        }
        let range = start * K4..(start + len).min(64) * K4;
        let mut inside: BTreeMap<u64, (u64, Perm)> = pages(&runs)
            .into_iter()
            .filter(|(p, _)| range.contains(p))
            .collect();
        for (p, l, kind, g, perm) in edits {
            for i in 0..l {
                let page = (p + i) * K4;
                if !range.contains(&page) {
                    continue;
                }
                match kind {
                    0 => {
                        inside.remove(&page);
                    }
                    1 => {
                        inside.insert(page, ((g + i) * K4, perm_of(perm)));
                    }
                    2 => {
                        if let Some(e) = inside.get_mut(&page) {
                            e.1 = perm_of(perm);
                        }
                    }
                    _ => {}
                }
            }
        }
        Case {
            old: runs,
            range,
            new: maximal(&inside),
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Applying the diff to the old state yields the walk's state inside the range and the old
    /// one outside, never cuts or overlaps a mapping, and removes only mappings that changed.
    #[test]
    fn applying_the_diff_yields_the_walked_state(c in case()) {
        check(c.range.clone(), &c.new, &c.old);
    }

    /// Walking again without a change gives no changes.
    #[test]
    fn a_second_identical_flush_is_free(c in case()) {
        let changes = diff(c.range.clone(), &c.new, &c.old).unwrap();
        let after = apply(&c.old, &changes).unwrap();
        prop_assert_eq!(diff(c.range.clone(), &c.new, &after).unwrap(), vec![]);
    }
}
