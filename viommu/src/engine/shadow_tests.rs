//! Unit tests of the shadowing engine and the static mapping, on the recording mapper. The
//! helpers (guest memory with region edges, a fake BAR) also serve the front ends' tests of
//! shadowed endpoints.

use super::*;
use crate::engine::host::recording::{HostOp, RecordingMapper};
use crate::engine::static_map::{StaticMapping, StaticRange};

pub(crate) const MIB: u64 = 0x10_0000;
pub(crate) const HIGH: u64 = 0x1_0000_0000;
pub(crate) const BAR_GPA: u64 = 0xe000_0000;
const BAR_HOST: u64 = 0x7f00_dead_0000;
const BAR_SIZE: u64 = 0x1_0000;

/// Three adjacent 1 MiB regions at 0 (separate host mmaps) and one at 4 GiB.
pub(crate) fn memory() -> GuestMemoryAtomic<GuestMemoryMmap> {
    GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), MIB as usize),
            (GuestAddress(MIB), MIB as usize),
            (GuestAddress(2 * MIB), MIB as usize),
            (GuestAddress(HIGH), MIB as usize),
        ])
        .unwrap(),
    )
}

pub(crate) fn hva(mem: &GuestMemoryAtomic<GuestMemoryMmap>, gpa: u64) -> u64 {
    mem.memory().get_host_address(GuestAddress(gpa)).unwrap() as u64
}

/// A fake BAR at `BAR_GPA` "mmapped" at `BAR_HOST` (the recorder never touches it).
struct FakeBar;

// SAFETY: only used with the recording mapper, which never accesses the addresses.
unsafe impl BarResolver for FakeBar {
    fn resolve(&self, gpa: u64) -> Option<(u64, u64)> {
        let off = gpa.checked_sub(BAR_GPA)?;
        (off < BAR_SIZE).then_some((BAR_HOST + off, BAR_SIZE - off))
    }
}

pub(crate) fn bar_resolver() -> Arc<dyn BarResolver> {
    Arc::new(FakeBar)
}

pub(crate) fn shadow() -> (
    Arc<RecordingMapper>,
    GuestMemoryAtomic<GuestMemoryMmap>,
    Shadow,
) {
    let rec = Arc::new(RecordingMapper::new());
    let mem = memory();
    let targets = Arc::new(BarTargets::new());
    targets.add(bar_resolver());
    let s = Shadow::new(rec.clone(), mem.clone()).with_bars(targets);
    (rec, mem, s)
}

pub(crate) fn map_op(iova: u64, size: u64, host: u64, prot: Prot) -> HostOp {
    HostOp::Map {
        iova,
        size,
        gpa: host,
        prot,
    }
}

pub(crate) const RO: Prot = Prot {
    read: true,
    write: false,
};

#[test]
fn one_region_one_call_with_composed_host_address() {
    let (rec, mem, s) = shadow();
    HostMapper::map(&s, 0x5000_0000, 0x2000, 0x3000, RO).unwrap();
    assert_eq!(
        rec.ops(),
        vec![map_op(0x5000_0000, 0x2000, hva(&mem, 0x3000), RO)]
    );
    HostMapper::map(&s, 0x7000_0000, 0x4000, HIGH + 0x8000, Prot::RW).unwrap();
    assert_eq!(
        rec.ops()[1],
        map_op(0x7000_0000, 0x4000, hva(&mem, HIGH + 0x8000), Prot::RW)
    );
    assert_eq!(s.len(), 2);
}

#[test]
fn region_edges_split_the_mapping() {
    let (rec, mem, s) = shadow();
    // 4 KiB before the 1 MiB edge, then all of region 2, then 8 KiB of region 3.
    HostMapper::map(
        &s,
        0x4000_0000,
        0x1000 + MIB + 0x2000,
        MIB - 0x1000,
        Prot::RW,
    )
    .unwrap();
    assert_eq!(
        rec.ops(),
        vec![
            map_op(0x4000_0000, 0x1000, hva(&mem, MIB - 0x1000), Prot::RW),
            map_op(0x4000_1000, MIB, hva(&mem, MIB), Prot::RW),
            map_op(0x4000_1000 + MIB, 0x2000, hva(&mem, 2 * MIB), Prot::RW),
        ]
    );
    assert_eq!(s.len(), 1, "one guest mapping, three host pieces");
    assert_eq!(s.host_mappings().len(), 3);
    // The unmap removes exactly those three.
    HostMapper::unmap(&s, 0x4000_0000, 0x1000 + MIB + 0x2000).unwrap();
    assert!(rec.mappings().is_empty());
    assert_eq!(rec.ops().len(), 6);
    assert!(s.is_empty());
}

#[test]
fn bar_targets_map_the_bar_mmap() {
    let (rec, _mem, s) = shadow();
    HostMapper::map(&s, 0x9000_0000, 0x2000, BAR_GPA + 0x4000, Prot::RW).unwrap();
    assert_eq!(
        rec.ops(),
        vec![map_op(0x9000_0000, 0x2000, BAR_HOST + 0x4000, Prot::RW)]
    );
    // Running past the end of the BAR into nothing: refused, nothing left mapped.
    assert_eq!(
        HostMapper::map(
            &s,
            0xa000_0000,
            0x2000,
            BAR_GPA + BAR_SIZE - 0x1000,
            Prot::RW
        ),
        Err(HostMapError::OutOfRange)
    );
    assert_eq!(rec.mappings().len(), 1);
    // Without resolvers the BAR is just a hole.
    let plain = Shadow::new(rec.clone(), memory());
    assert_eq!(
        HostMapper::map(&plain, 0xb000_0000, 0x1000, BAR_GPA, Prot::RW),
        Err(HostMapError::OutOfRange)
    );
    // A removed resolver stops resolving.
    let targets = BarTargets::new();
    let r = bar_resolver();
    targets.add(r.clone());
    assert!(targets.resolve(BAR_GPA).is_some());
    targets.remove(&r);
    assert!(targets.resolve(BAR_GPA).is_none());
}

#[test]
fn holes_msi_window_and_host_ranges_are_refused_without_host_calls() {
    let (rec, _mem, s) = shadow();
    // Between RAM (ends at 3 MiB) and the BAR: not backed.
    assert_eq!(
        HostMapper::map(&s, 0x1000, 0x1000, 0x8000_0000, Prot::RW),
        Err(HostMapError::OutOfRange)
    );
    // RAM running into a hole.
    assert_eq!(
        HostMapper::map(&s, 0x1000, 0x2000, 3 * MIB - 0x1000, Prot::RW),
        Err(HostMapError::OutOfRange)
    );
    // The MSI doorbell window as a target, even partly.
    assert_eq!(
        HostMapper::map(&s, 0x1000, 0x1000, 0xfee0_0000, Prot::RW),
        Err(HostMapError::Invalid)
    );
    assert_eq!(
        HostMapper::map(&s, 0x1000, 0x2000, 0xfedf_f000, Prot::RW),
        Err(HostMapError::Invalid)
    );
    // Overflowing ranges and empty ones.
    assert_eq!(
        HostMapper::map(&s, u64::MAX - 0xfff, 0x2000, 0, Prot::RW),
        Err(HostMapError::OutOfRange)
    );
    assert_eq!(
        HostMapper::map(&s, 0, 0x2000, u64::MAX - 0xfff, Prot::RW),
        Err(HostMapError::OutOfRange)
    );
    assert_eq!(
        HostMapper::map(&s, 0, 0, 0, Prot::RW),
        Err(HostMapError::Invalid)
    );
    // IOVAs the host cannot translate (39-bit host with a hole).
    let s = s.with_config(ShadowConfig {
        host_iova_ranges: vec![(0, 0xfedf_ffff), (0xfef0_0000, (1 << 39) - 1)],
        ..ShadowConfig::default()
    });
    assert_eq!(
        HostMapper::map(&s, 1 << 39, 0x1000, 0, Prot::RW),
        Err(HostMapError::OutOfRange)
    );
    assert_eq!(
        HostMapper::map(&s, 0xfedf_f000, 0x2000, 0, Prot::RW),
        Err(HostMapError::OutOfRange)
    );
    assert!(rec.ops().is_empty());
    HostMapper::map(&s, (1 << 39) - 0x1000, 0x1000, 0, Prot::RW).unwrap();
    assert_eq!(rec.ops().len(), 1);
}

#[test]
fn rollback_at_every_failing_call_of_a_split_map() {
    let errors = [
        HostMapError::NoSpace,
        HostMapError::OutOfRange,
        HostMapError::Invalid,
        HostMapError::Failed("x".into()),
    ];
    for n in 0..3 {
        for err in &errors {
            let (rec, _mem, s) = shadow();
            HostMapper::map(&s, 0x10_0000_0000, 0x1000, 0x1000, Prot::RW).unwrap();
            let before = rec.mappings();
            rec.fail_call(n, err.clone());
            assert_eq!(
                HostMapper::map(&s, 0x4000_0000, MIB + 0x2000, MIB - 0x1000, Prot::RW),
                Err(err.clone()),
                "failing call {n}"
            );
            assert_eq!(rec.mappings(), before, "call {n}: rolled back");
            assert_eq!(s.len(), 1);
            // The same MAP then succeeds (nothing left behind to overlap).
            HostMapper::map(&s, 0x4000_0000, MIB + 0x2000, MIB - 0x1000, Prot::RW).unwrap();
        }
    }
}

#[test]
fn unmaps_are_exact_and_adjacent_mappings_never_coalesce() {
    let (rec, mem, s) = shadow();
    // Two guest mappings adjacent in IOVA and GPA (so also in HVA): two host mappings.
    HostMapper::map(&s, 0x2000_0000, 0x1000, 0x5000, Prot::RW).unwrap();
    HostMapper::map(&s, 0x2000_1000, 0x1000, 0x6000, Prot::RW).unwrap();
    assert_eq!(rec.mappings().len(), 2);
    // Overlap with a recorded mapping: refused before the host.
    assert_eq!(
        HostMapper::map(&s, 0x2000_1000, 0x1000, 0x7000, Prot::RW),
        Err(HostMapError::Invalid)
    );
    // Not a recorded mapping (bisecting / spanning): refused, nothing removed.
    assert_eq!(
        HostMapper::unmap(&s, 0x2000_0000, 0x2000),
        Err(HostMapError::Invalid)
    );
    assert_eq!(
        HostMapper::unmap(&s, 0x2000_0800, 0x800),
        Err(HostMapError::Invalid)
    );
    assert_eq!(rec.mappings().len(), 2);
    HostMapper::unmap(&s, 0x2000_1000, 0x1000).unwrap();
    assert_eq!(
        rec.ops().last(),
        Some(&HostOp::Unmap {
            iova: 0x2000_1000,
            size: 0x1000
        })
    );
    assert_eq!(
        rec.mappings().into_iter().collect::<Vec<_>>(),
        vec![(0x2000_0000, (0x1000, hva(&mem, 0x5000), Prot::RW))]
    );
}

#[test]
fn failed_unmap_of_a_split_mapping_restores_removed_pieces() {
    let (rec, _mem, s) = shadow();
    HostMapper::map(&s, 0x4000_0000, 2 * MIB, MIB / 2, Prot::RW).unwrap();
    let before = rec.mappings();
    assert_eq!(before.len(), 3);
    for n in 0..3 {
        rec.fail_call(n, HostMapError::Failed("busy".into()));
        assert_eq!(
            HostMapper::unmap(&s, 0x4000_0000, 2 * MIB),
            Err(HostMapError::Failed("busy".into()))
        );
        assert_eq!(rec.mappings(), before, "unmap failing at piece {n}");
        assert_eq!(s.len(), 1);
    }
    HostMapper::unmap(&s, 0x4000_0000, 2 * MIB).unwrap();
    assert!(rec.mappings().is_empty());
}

#[test]
fn rights_are_forwarded_and_no_rights_make_no_call() {
    let (rec, _mem, s) = shadow();
    let wo = Prot {
        read: false,
        write: true,
    };
    HostMapper::map(&s, 0x1000, 0x1000, 0x1000, RO).unwrap();
    HostMapper::map(&s, 0x2000, 0x1000, 0x1000, wo).unwrap();
    HostMapper::map(&s, 0x3000, 0x1000, 0x1000, Prot::default()).unwrap();
    let prots: Vec<Prot> = rec.mappings().values().map(|m| m.2).collect();
    assert_eq!(prots, vec![RO, wo]);
    assert_eq!(s.len(), 3);
    // Its IOVA is still taken, and unmapping it makes no host call either.
    assert_eq!(
        HostMapper::map(&s, 0x3000, 0x1000, 0x1000, RO),
        Err(HostMapError::Invalid)
    );
    let calls = rec.ops().len();
    HostMapper::unmap(&s, 0x3000, 0x1000).unwrap();
    assert_eq!(rec.ops().len(), calls);
}

#[test]
fn clear_unmaps_everything() {
    let (rec, _mem, s) = shadow();
    HostMapper::map(&s, 0x1000, 0x1000, 0x1000, RO).unwrap();
    HostMapper::map(&s, 0x4000_0000, 2 * MIB, MIB / 2, Prot::RW).unwrap();
    s.clear().unwrap();
    assert!(rec.mappings().is_empty());
    assert!(s.is_empty());
}

// ---- static mapping -----------------------------------------------------------------------

#[test]
fn static_mapping_maps_all_ram_and_later_regions() {
    let rec = Arc::new(RecordingMapper::new());
    let mem = memory();
    let st = StaticMapping::new(rec.clone(), &*mem.memory()).unwrap();
    let expect: Vec<HostOp> = mem
        .memory()
        .iter()
        .map(|r| {
            map_op(
                r.start_addr().0,
                r.len(),
                hva(&mem, r.start_addr().0),
                Prot::RW,
            )
        })
        .collect();
    assert_eq!(rec.ops(), expect);
    // RAM added later (hot-plug): one more call, identity.
    let more: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(2 * HIGH), 2 * MIB as usize)]).unwrap();
    let region = more.iter().next().unwrap();
    st.add_region(region).unwrap();
    let host = more.get_host_address(GuestAddress(2 * HIGH)).unwrap() as u64;
    assert_eq!(
        rec.ops().last(),
        Some(&map_op(2 * HIGH, 2 * MIB, host, Prot::RW))
    );
    assert_eq!(
        st.ranges().last(),
        Some(&StaticRange {
            gpa: 2 * HIGH,
            size: 2 * MIB,
            host_addr: host,
            prot: Prot::RW
        })
    );
    // The same region twice: refused before the host.
    assert_eq!(st.add_region(region), Err(HostMapError::Invalid));
    // A BAR for peer-to-peer, read-only.
    // SAFETY: the recorder never touches the address.
    unsafe { st.add_range(BAR_GPA, BAR_SIZE, BAR_HOST, RO) }.unwrap();
    assert_eq!(
        rec.mappings().get(&BAR_GPA),
        Some(&(BAR_SIZE, BAR_HOST, RO))
    );
    st.remove(2 * HIGH).unwrap();
    assert_eq!(st.remove(2 * HIGH), Err(HostMapError::Invalid));
    assert_eq!(rec.mappings().len(), 5);
    st.clear().unwrap();
    assert!(rec.mappings().is_empty());
    assert!(st.ranges().is_empty());
}

#[test]
fn static_mapping_failure_leaves_nothing_mapped() {
    for n in 0..4 {
        let rec = Arc::new(RecordingMapper::new());
        let mem = memory();
        rec.fail_call(n, HostMapError::NoSpace);
        assert!(matches!(
            StaticMapping::new(rec.clone(), &*mem.memory()),
            Err(HostMapError::NoSpace)
        ));
        assert!(rec.mappings().is_empty(), "failing call {n}");
    }
}

/// A BAR whose guest address the test moves (None: not decoding), "mmapped" at `BAR_HOST`.
struct MovableBar(Mutex<Option<u64>>);

// SAFETY: only used with the recording mapper, which never accesses the addresses.
unsafe impl BarResolver for MovableBar {
    fn resolve(&self, gpa: u64) -> Option<(u64, u64)> {
        let base = (*self.0.lock().unwrap())?;
        let off = gpa.checked_sub(base)?;
        (off < BAR_SIZE).then(|| (BAR_HOST + off, BAR_SIZE - off))
    }
}

fn movable_shadow() -> (
    Arc<RecordingMapper>,
    Arc<MovableBar>,
    Arc<BarTargets>,
    Arc<Shadow>,
) {
    let rec = Arc::new(RecordingMapper::new());
    let bar = Arc::new(MovableBar(Mutex::new(Some(BAR_GPA))));
    let targets = Arc::new(BarTargets::new());
    targets.add(bar.clone());
    let s = Arc::new(Shadow::new(rec.clone(), memory()).with_bars(targets.clone()));
    targets.watch(&s);
    (rec, bar, targets, s)
}

#[test]
fn a_bar_that_stops_decoding_loses_its_host_mappings_and_gets_them_back() {
    let (rec, bar, targets, s) = movable_shadow();
    let ram = hva(&s.mem, 0x3000);
    HostMapper::map(&*s, 0x5000_0000, 0x2000, BAR_GPA + 0x1000, Prot::RW).unwrap();
    HostMapper::map(&*s, 0x6000_0000, 0x1000, 0x3000, Prot::RW).unwrap();
    assert_eq!(rec.mappings().len(), 2);
    // Decode off: the BAR's part is revoked, the RAM mapping untouched.
    *bar.0.lock().unwrap() = None;
    targets.changed(&[(BAR_GPA, BAR_GPA + BAR_SIZE - 1)]);
    assert_eq!(
        rec.mappings().into_iter().collect::<Vec<_>>(),
        vec![(0x6000_0000, (0x1000, ram, Prot::RW))],
        "the BAR mapping left the host IOMMU"
    );
    assert_eq!(s.len(), 2, "the guest mapping stays recorded");
    // A change elsewhere does not touch it.
    let ops = rec.ops().len();
    targets.changed(&[(0x9000_0000, 0x9000_ffff)]);
    assert_eq!(rec.ops().len(), ops);
    // Decode on again: back at the same host address.
    *bar.0.lock().unwrap() = Some(BAR_GPA);
    targets.changed(&[(BAR_GPA, BAR_GPA + BAR_SIZE - 1)]);
    assert_eq!(
        rec.mappings().get(&0x5000_0000),
        Some(&(0x2000, BAR_HOST + 0x1000, Prot::RW))
    );
    // Unchanged composition: no host call.
    let ops = rec.ops().len();
    targets.changed(&[(BAR_GPA, BAR_GPA + BAR_SIZE - 1)]);
    assert_eq!(rec.ops().len(), ops);
    // Revoked, then unmapped by the guest: no host call, nothing left.
    *bar.0.lock().unwrap() = None;
    targets.changed(&[(BAR_GPA, BAR_GPA + BAR_SIZE - 1)]);
    let ops = rec.ops().len();
    HostMapper::unmap(&*s, 0x5000_0000, 0x2000).unwrap();
    assert_eq!(rec.ops().len(), ops);
    assert_eq!(s.len(), 1);
    // Revocations and re-mappings kept the record count exact: one entry of one piece left.
    assert_eq!(HostMapper::records(&*s), 1);
}

#[test]
fn a_moved_bar_is_not_followed_and_a_bar_moved_in_is_picked_up() {
    let (rec, bar, targets, s) = movable_shadow();
    let new_base = BAR_GPA + 0x100_0000;
    HostMapper::map(&*s, 0x5000_0000, 0x1000, BAR_GPA, Prot::RW).unwrap();
    HostMapper::map(&*s, 0x5100_0000, 0x1000, new_base + 0x2000, Prot::RW)
        .expect_err("nothing decodes there yet");
    // The BAR moves: the old address no longer reaches it.
    *bar.0.lock().unwrap() = Some(new_base);
    targets.changed(&[
        (BAR_GPA, BAR_GPA + BAR_SIZE - 1),
        (new_base, new_base + BAR_SIZE - 1),
    ]);
    assert!(rec.mappings().is_empty(), "{:x?}", rec.mappings());
    // A mapping made after the move reaches the new place; moving back restores the first.
    HostMapper::map(&*s, 0x5100_0000, 0x1000, new_base + 0x2000, Prot::RW).unwrap();
    *bar.0.lock().unwrap() = Some(BAR_GPA);
    targets.changed(&[
        (BAR_GPA, BAR_GPA + BAR_SIZE - 1),
        (new_base, new_base + BAR_SIZE - 1),
    ]);
    assert_eq!(
        rec.mappings().into_iter().collect::<Vec<_>>(),
        vec![(0x5000_0000, (0x1000, BAR_HOST, Prot::RW))]
    );
    assert_eq!(s.len(), 2);
}

#[test]
fn a_failed_revocation_keeps_the_mapping_recorded_for_a_retry() {
    let (rec, bar, targets, s) = movable_shadow();
    HostMapper::map(&*s, 0x5000_0000, 0x1000, BAR_GPA, Prot::RW).unwrap();
    *bar.0.lock().unwrap() = None;
    rec.fail_call(0, HostMapError::Failed("busy".into()));
    targets.changed(&[(BAR_GPA, BAR_GPA + BAR_SIZE - 1)]);
    assert_eq!(
        s.host_mappings().len(),
        1,
        "still installed, still recorded"
    );
    targets.changed(&[(BAR_GPA, BAR_GPA + BAR_SIZE - 1)]);
    assert!(s.host_mappings().is_empty());
    assert!(rec.mappings().is_empty());
    drop(s);
    // A dropped shadow is no longer told.
    targets.changed(&[(BAR_GPA, BAR_GPA + BAR_SIZE - 1)]);
}
