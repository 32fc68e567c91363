//! Unit tests of the shadowing engine and the static mapping, on the recording mapper.

use super::*;
use crate::domain::{Domains, Geometry, Limits, ResvKind, ResvRegion};
use crate::fault::FaultReporter;
use crate::host::recording::{HostOp, RecordingMapper};
use crate::spec::{Status, ATTACH_F_BYPASS, MAP_F_READ, MAP_F_WRITE};
use crate::static_map::{StaticMapping, StaticRange};

const MIB: u64 = 0x10_0000;
const HIGH: u64 = 0x1_0000_0000;
const BAR_GPA: u64 = 0xe000_0000;
const BAR_HOST: u64 = 0x7f00_dead_0000;
const BAR_SIZE: u64 = 0x1_0000;

/// Three adjacent 1 MiB regions at 0 (separate host mmaps) and one at 4 GiB.
fn memory() -> GuestMemoryAtomic<GuestMemoryMmap> {
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

fn hva(mem: &GuestMemoryAtomic<GuestMemoryMmap>, gpa: u64) -> u64 {
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

fn bar_resolver() -> Arc<dyn BarResolver> {
    Arc::new(FakeBar)
}

fn shadow() -> (
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

fn map_op(iova: u64, size: u64, host: u64, prot: Prot) -> HostOp {
    HostOp::Map {
        iova,
        size,
        gpa: host,
        prot,
    }
}

const RO: Prot = Prot {
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

// ---- through the domain layer -------------------------------------------------------------

const RW: u32 = MAP_F_READ | MAP_F_WRITE;

fn domains() -> Domains {
    let mut d = Domains::new(
        Geometry::default(),
        Limits::default(),
        vec![ResvRegion {
            start: 0xfee0_0000,
            end: 0xfeef_ffff,
            kind: ResvKind::Msi,
        }],
        false,
        Arc::new(FaultReporter::new(Default::default(), Default::default())),
    );
    d.set_negotiated(true, true);
    d
}

#[test]
fn endpoints_sharing_a_container_cost_one_call_per_map() {
    let (rec, mem, s) = shadow();
    let shared: Arc<dyn HostMapper> = Arc::new(s);
    let rec2 = Arc::new(RecordingMapper::new());
    let other: Arc<dyn HostMapper> = Arc::new(Shadow::new(rec2.clone(), mem.clone()));
    let mut d = domains();
    d.add_endpoint(8, Some(shared.clone())).unwrap();
    d.add_endpoint(16, Some(shared)).unwrap();
    assert_eq!(d.attach(1, 8, 0), Status::Ok);
    assert_eq!(d.attach(1, 16, 0), Status::Ok);
    assert_eq!(d.map(1, 0x10_0000, 0x10_ffff, 0x2_0000, RW), Status::Ok);
    assert_eq!(
        rec.ops(),
        vec![map_op(0x10_0000, 0x1_0000, hva(&mem, 0x2_0000), Prot::RW)]
    );
    // A third endpoint in its own container: replayed there, then each MAP costs 2 calls.
    d.add_endpoint(24, Some(other)).unwrap();
    assert_eq!(d.attach(1, 24, 0), Status::Ok);
    assert_eq!(rec2.ops().len(), 1);
    assert_eq!(
        d.map(1, 0x20_0000, 0x20_0fff, 0x3000, MAP_F_READ),
        Status::Ok
    );
    assert_eq!(rec.ops().len(), 2);
    assert_eq!(rec2.ops().len(), 2);
    assert_eq!(rec2.mappings().get(&0x20_0000).map(|m| m.2), Some(RO));
    // Guest statuses of refused targets.
    assert_eq!(
        d.map(1, 0x30_0000, 0x30_0fff, 0x8000_0000, RW),
        Status::Range
    );
    assert_eq!(
        d.map(1, 0x30_0000, 0x30_0fff, 0xfee0_0000, RW),
        Status::Inval
    );
    assert_eq!(d.mappings(1).unwrap().len(), 2);
    // UNMAP spanning both guest mappings: exactly their host mappings, per container.
    assert_eq!(d.unmap(1, 0, 0xff_ffff), Status::Ok);
    assert!(rec.mappings().is_empty());
    assert!(rec2.mappings().is_empty());
}

#[test]
fn map_failure_statuses_and_rollback_across_containers() {
    let cases = [
        (HostMapError::NoSpace, Status::NoMem),
        (HostMapError::OutOfRange, Status::Range),
        (HostMapError::Invalid, Status::Inval),
        (HostMapError::Failed("x".into()), Status::DevErr),
    ];
    // Two containers; the guest MAP splits into 2 pieces: 4 host calls in all.
    for n in 0..4 {
        for (err, status) in &cases {
            let mem = memory();
            let (r1, r2) = (
                Arc::new(RecordingMapper::new()),
                Arc::new(RecordingMapper::new()),
            );
            let mut d = domains();
            d.add_endpoint(8, Some(Arc::new(Shadow::new(r1.clone(), mem.clone()))))
                .unwrap();
            d.add_endpoint(16, Some(Arc::new(Shadow::new(r2.clone(), mem.clone()))))
                .unwrap();
            d.attach(1, 8, 0);
            d.attach(1, 16, 0);
            // Calls 0,1 go to the first container, 2,3 to the second.
            let (rec, k) = if n < 2 { (&r1, n) } else { (&r2, n - 2) };
            rec.fail_call(k, err.clone());
            assert_eq!(
                d.map(1, 0x4000_0000, 0x4000_1fff, MIB - 0x1000, RW),
                *status,
                "call {n}"
            );
            assert!(
                r1.mappings().is_empty() && r2.mappings().is_empty(),
                "call {n}"
            );
            assert!(d.mappings(1).unwrap().is_empty());
            assert_eq!(
                d.map(1, 0x4000_0000, 0x4000_1fff, MIB - 0x1000, RW),
                Status::Ok
            );
            assert_eq!(r1.mappings().len(), 2);
            assert_eq!(r2.mappings().len(), 2);
        }
    }
}

#[test]
fn attach_replay_rolls_back_at_every_failing_call() {
    // Domain 1 (emulated endpoint) holds three mappings, one split in two pieces: 4 calls.
    let maps = [
        (0x1000_0000u64, 0x1000_0fffu64, 0x5000u64),
        (0x2000_0000, 0x2000_1fff, MIB - 0x1000),
        (0x3000_0000, 0x3000_0fff, HIGH),
    ];
    for n in 0..4 {
        let mem = memory();
        let rec = Arc::new(RecordingMapper::new());
        let mut d = domains();
        d.add_endpoint(24, None).unwrap();
        d.add_endpoint(8, Some(Arc::new(Shadow::new(rec.clone(), mem))))
            .unwrap();
        d.attach(1, 24, 0);
        for &(s, e, g) in &maps {
            assert_eq!(d.map(1, s, e, g, RW), Status::Ok);
        }
        // The VFIO endpoint first sits in domain 2 with one mapping of its own.
        d.attach(2, 8, 0);
        d.map(2, 0x9000_0000, 0x9000_0fff, 0x7000, RW);
        let before = rec.mappings();
        // Moving to domain 1: 1 unmap of domain 2's mapping, then 4 map calls.
        rec.fail_call(1 + n, HostMapError::NoSpace);
        assert_eq!(d.attach(1, 8, 0), Status::NoMem, "call {n}");
        assert_eq!(rec.mappings(), before, "call {n}: old contents restored");
        assert_eq!(d.endpoint_domain(8), Some(Some(2)));
        assert_eq!(d.attach(1, 8, 0), Status::Ok);
        assert_eq!(rec.mappings().len(), 4);
        assert_eq!(d.domain_count(), 1, "domain 2 died with its last endpoint");
    }
}

#[test]
fn bypass_domain_maps_each_ram_region_once() {
    let (rec, mem, s) = shadow();
    let mut d = domains();
    let ram: Vec<(u64, u64)> = mem
        .memory()
        .iter()
        .map(|r| (r.start_addr().0, r.len()))
        .collect();
    d.set_ram(&ram);
    let shared: Arc<dyn HostMapper> = Arc::new(s);
    d.add_endpoint(8, Some(shared.clone())).unwrap();
    d.add_endpoint(16, Some(shared)).unwrap();
    assert_eq!(d.attach(3, 8, ATTACH_F_BYPASS), Status::Ok);
    assert_eq!(d.attach(3, 16, ATTACH_F_BYPASS), Status::Ok);
    let expect: Vec<HostOp> = ram
        .iter()
        .map(|&(g, l)| map_op(g, l, hva(&mem, g), Prot::RW))
        .collect();
    assert_eq!(rec.ops(), expect);
    assert_eq!(d.detach(3, 8), Status::Ok);
    assert_eq!(rec.mappings().len(), 4);
    assert_eq!(d.detach(3, 16), Status::Ok);
    assert!(rec.mappings().is_empty());
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

// ---- boot bypass and RAM changes ----------------------------------------------------------

fn bypass_domains() -> Domains {
    let mut d = Domains::new(
        Geometry::default(),
        Limits::default(),
        Vec::new(),
        true,
        Arc::new(FaultReporter::new(Default::default(), Default::default())),
    );
    d.set_negotiated(true, true);
    d
}

fn identity(ranges: &[(u64, u64)]) -> Vec<(u64, (u64, u64, Prot))> {
    ranges.iter().map(|&(g, l)| (g, (l, g, Prot::RW))).collect()
}

#[test]
fn unattached_host_endpoints_get_guest_ram_while_bypass_is_on() {
    let ram = [(0, MIB), (HIGH, MIB)];
    let (a, b) = (
        Arc::new(RecordingMapper::new()),
        Arc::new(RecordingMapper::new()),
    );
    let (ha, hb): (Arc<dyn HostMapper>, Arc<dyn HostMapper>) = (a.clone(), b.clone());
    let mut d = bypass_domains();
    d.set_ram(&ram);
    d.add_endpoint(8, Some(ha.clone())).unwrap();
    assert_eq!(a.mappings().into_iter().collect::<Vec<_>>(), identity(&ram));
    d.add_endpoint(16, Some(ha)).unwrap();
    d.add_endpoint(24, Some(hb)).unwrap();
    assert_eq!(a.ops().len(), 2, "a shared container is mapped once");
    assert_eq!(b.mappings().len(), 2);
    // Attaching drops the boot-bypass RAM first, then mirrors the (empty) domain.
    assert_eq!(d.attach(1, 8, 0), Status::Ok);
    assert!(a.mappings().is_empty());
    assert_eq!(d.map(1, 0x10_0000, 0x10_0fff, 0x5000, RW), Status::Ok);
    assert_eq!(a.mappings().len(), 1);
    // Last attached endpoint of the container leaves: RAM again.
    assert_eq!(d.detach(1, 8), Status::Ok);
    assert_eq!(a.mappings().into_iter().collect::<Vec<_>>(), identity(&ram));
    // config.bypass off: nothing; on again: RAM.
    d.set_bypass(false);
    assert!(a.mappings().is_empty() && b.mappings().is_empty());
    d.set_bypass(true);
    assert_eq!(b.mappings().into_iter().collect::<Vec<_>>(), identity(&ram));
    // A failing boot-bypass unmap fails the ATTACH and keeps RAM mapped and tracked.
    a.fail_call(1, HostMapError::Failed("x".into()));
    assert_eq!(d.attach(1, 8, 0), Status::DevErr);
    assert_eq!(d.endpoint_domain(8), Some(None));
    assert_eq!(a.mappings().into_iter().collect::<Vec<_>>(), identity(&ram));
    d.set_bypass(false);
    assert!(
        a.mappings().is_empty(),
        "still tracked: removed with bypass off"
    );
    d.set_bypass(true);
    // Device reset detaches everything: all containers back to RAM.
    assert_eq!(d.attach(2, 24, 0), Status::Ok);
    assert!(b.mappings().is_empty());
    d.reset();
    assert_eq!(b.mappings().into_iter().collect::<Vec<_>>(), identity(&ram));
}

#[test]
fn ram_changes_reach_bypass_and_idle_containers() {
    let ram = [(0, MIB), (HIGH, MIB)];
    let (a, b) = (
        Arc::new(RecordingMapper::new()),
        Arc::new(RecordingMapper::new()),
    );
    let mut d = bypass_domains();
    d.set_ram(&ram);
    d.add_endpoint(8, Some(a.clone())).unwrap();
    d.add_endpoint(16, Some(b.clone())).unwrap();
    // 16 sits in an identity domain, 8 is unattached (boot bypass).
    assert_eq!(d.attach(7, 16, ATTACH_F_BYPASS), Status::Ok);
    assert_eq!(b.mappings().into_iter().collect::<Vec<_>>(), identity(&ram));
    let (ca, cb) = (a.ops().len(), b.ops().len());
    // The same RAM again (re-activation): no host calls.
    d.set_ram(&ram);
    assert_eq!((a.ops().len(), b.ops().len()), (ca, cb));
    // RAM hot-added: one map per container; then a region removed: one unmap each.
    let more = [(0, MIB), (HIGH, MIB), (2 * HIGH, 2 * MIB)];
    d.set_ram(&more);
    assert_eq!(
        a.mappings().into_iter().collect::<Vec<_>>(),
        identity(&more)
    );
    assert_eq!(
        b.mappings().into_iter().collect::<Vec<_>>(),
        identity(&more)
    );
    assert_eq!((a.ops().len(), b.ops().len()), (ca + 1, cb + 1));
    let less = [(HIGH, MIB), (2 * HIGH, 2 * MIB)];
    d.set_ram(&less);
    assert_eq!(
        a.mappings().into_iter().collect::<Vec<_>>(),
        identity(&less)
    );
    assert_eq!(
        b.mappings().into_iter().collect::<Vec<_>>(),
        identity(&less)
    );
    assert_eq!(b.ops().last(), Some(&HostOp::Unmap { iova: 0, size: MIB }));
    // Leaving the identity domain unmaps exactly the current RAM, then boot bypass maps it.
    assert_eq!(d.detach(7, 16), Status::Ok);
    assert_eq!(
        b.mappings().into_iter().collect::<Vec<_>>(),
        identity(&less)
    );
}

// ---- property: the host always holds exactly the composed domain state ---------------------

mod props {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const PAGE: u64 = 0x1000;
    /// GPA bases a MAP may target: RAM, a region edge, RAM near its end, high RAM, the BAR,
    /// a hole, the MSI window.
    const GPAS: [u64; 7] = [
        0,
        MIB - 0x2000,
        3 * MIB - 0x3000,
        HIGH,
        BAR_GPA,
        0x8000_0000,
        0xfee0_0000,
    ];
    /// Endpoints 8 and 16 share container A, 24 has container B.
    const EPS: [u32; 3] = [8, 16, 24];

    #[derive(Clone, Debug)]
    enum Op {
        Map {
            start: u64,
            pages: u64,
            gpa: usize,
            gpa_page: u64,
            flags: u32,
        },
        Unmap {
            start: u64,
            pages: u64,
        },
        Attach(usize),
        Detach(usize),
        Bypass(bool),
        Fail {
            b: bool,
            k: u64,
            kind: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..48u64, 1..6u64, 0..GPAS.len(), 0..4u64, 0..4u32).prop_map(
                |(start, pages, gpa, gpa_page, flags)| Op::Map {
                    start,
                    pages,
                    gpa,
                    gpa_page,
                    flags
                }
            ),
            2 => (0..48u64, 1..16u64).prop_map(|(start, pages)| Op::Unmap { start, pages }),
            1 => (0..3usize).prop_map(Op::Attach),
            1 => (0..3usize).prop_map(Op::Detach),
            1 => any::<bool>().prop_map(Op::Bypass),
            2 => (any::<bool>(), 0..4u64, 0..4u8).prop_map(|(b, k, kind)| Op::Fail { b, k, kind }),
        ]
    }

    type HostState = BTreeMap<u64, (u64, u64, Prot)>;

    /// What a container mirroring `maps` must hold.
    fn expected(s: &Shadow, maps: &[crate::snapshot::Mapping]) -> HostState {
        let mut out = BTreeMap::new();
        for m in maps.iter().filter(|m| m.read || m.write) {
            let prot = Prot {
                read: m.read,
                write: m.write,
            };
            for p in s.compose(m.start, m.end - m.start + 1, m.gpa).unwrap() {
                out.insert(p.iova, (p.size, p.host_addr, prot));
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn host_state_is_the_composed_domain_state(ops in proptest::collection::vec(op(), 1..60)) {
            let mem = memory();
            let (ra, rb) = (Arc::new(RecordingMapper::new()), Arc::new(RecordingMapper::new()));
            let targets = Arc::new(BarTargets::new());
            targets.add(bar_resolver());
            let sa = Arc::new(Shadow::new(ra.clone(), mem.clone()).with_bars(targets.clone()));
            let sb = Arc::new(Shadow::new(rb.clone(), mem.clone()).with_bars(targets));
            let mut d = bypass_domains();
            let ram: Vec<(u64, u64)> =
                mem.memory().iter().map(|r| (r.start_addr().0, r.len())).collect();
            d.set_ram(&ram);
            d.add_endpoint(8, Some(sa.clone())).unwrap();
            d.add_endpoint(16, Some(sa.clone())).unwrap();
            d.add_endpoint(24, Some(sb.clone())).unwrap();
            let ram_identity: Vec<crate::snapshot::Mapping> = ram
                .iter()
                .map(|&(g, l)| crate::snapshot::Mapping {
                    start: g,
                    end: g + l - 1,
                    gpa: g,
                    read: true,
                    write: true,
                    mmio: false,
                })
                .collect();
            // Once a failure is injected, a failed boot-bypass removal may leave RAM behind
            // (kept and tracked, logged): the unattached checks relax to "RAM or nothing".
            let mut injected = false;
            for op in ops {
                injected |= matches!(op, Op::Fail { .. });
                match op {
                    Op::Map { start, pages, gpa, gpa_page, flags } => {
                        let s = 0x1_0000_0000 + start * PAGE;
                        d.map(1, s, s + pages * PAGE - 1, GPAS[gpa] + gpa_page * PAGE, flags);
                    }
                    Op::Unmap { start, pages } => {
                        let s = 0x1_0000_0000 + start * PAGE;
                        d.unmap(1, s, s + pages * PAGE - 1);
                    }
                    Op::Attach(e) => {
                        d.attach(1, EPS[e], 0);
                    }
                    Op::Detach(e) => {
                        d.detach(1, EPS[e]);
                    }
                    Op::Bypass(on) => d.set_bypass(on),
                    Op::Fail { b, k, kind } => {
                        let err = match kind {
                            0 => HostMapError::NoSpace,
                            1 => HostMapError::OutOfRange,
                            2 => HostMapError::Invalid,
                            _ => HostMapError::Failed("injected".into()),
                        };
                        // One armed failure at a time: a rollback that fails too (double
                        // fault) is only logged and may leave a host mapping behind.
                        let (arm, disarm) = if b { (&rb, &ra) } else { (&ra, &rb) };
                        arm.fail_call(k, err);
                        disarm.fail_call(1 << 40, HostMapError::Invalid);
                    }
                }
                let maps = d.mappings(1).unwrap_or_default();
                for (rec, sh, eps) in [(&ra, &sa, &EPS[..2]), (&rb, &sb, &EPS[2..])] {
                    let attached = eps.iter().any(|&e| d.endpoint_domain(e) == Some(Some(1)));
                    let got = rec.mappings();
                    if attached {
                        prop_assert_eq!(&got, &expected(sh, &maps));
                        prop_assert_eq!(
                            sh.len(),
                            maps.len(),
                            "one recorded entry per guest mapping"
                        );
                    } else if d.bypass() || injected {
                        let ram_mapped = got == expected(sh, &ram_identity);
                        prop_assert!(
                            got.is_empty() || ram_mapped,
                            "unattached: RAM or nothing: {:x?}",
                            got
                        );
                        if !injected {
                            prop_assert!(ram_mapped, "unattached with bypass: RAM: {:x?}", got);
                        }
                    } else {
                        prop_assert!(got.is_empty(), "unattached, bypass off: {:x?}", got);
                    }
                }
            }
        }
    }
}
