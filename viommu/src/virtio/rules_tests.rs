//! Unit tests of the request rules: statuses, limits, views after publication, and host
//! endpoints (mirroring, rollback, boot bypass, RAM changes) through the engine into a
//! [`Shadow`] over the recording mapper.

use super::*;
use crate::engine::host::recording::{HostOp, RecordingMapper};
use crate::engine::host::Prot;
use crate::engine::mapping::Access;
use crate::engine::shadow::tests::{
    bar_resolver, hva, map_op, memory, shadow, BAR_GPA, HIGH, MIB, RO,
};
use crate::engine::shadow::{BarTargets, Shadow};
use crate::engine::view::Mode;
use crate::virtio::event::FaultReporter;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};

fn domains() -> Domains {
    Domains::new(
        Geometry::default(),
        Limits::default(),
        vec![ResvRegion {
            start: 0xfee0_0000,
            end: 0xfeef_ffff,
            kind: ResvKind::Msi,
        }],
        true,
        Arc::new(FaultReporter::new(Default::default(), Default::default())),
    )
}

const RW: u32 = MAP_F_READ | MAP_F_WRITE;

#[test]
fn spec_unmap_examples() {
    let mut d = domains();
    d.add_endpoint(8, None).unwrap();
    assert_eq!(d.attach(1, 8, 0), Status::Ok);
    // Granule is 4 KiB: scale the spec's examples (units of pages).
    let p = |n: u64| n * 0x1000;
    // (1) unmap(0,4) on an empty domain: OK.
    assert_eq!(d.unmap(1, p(0), p(5) - 1), Status::Ok);
    // (4) map(0,9); unmap(0,4): RANGE, nothing removed.
    assert_eq!(d.map(1, p(0), p(10) - 1, 0, RW), Status::Ok);
    assert_eq!(d.unmap(1, p(0), p(5) - 1), Status::Range);
    assert_eq!(d.mappings(1).unwrap().len(), 1);
    assert_eq!(d.unmap(1, p(0), p(10) - 1), Status::Ok);
    // (7) map(0,4), map(10,14); unmap(0,14): removes both.
    assert_eq!(d.map(1, p(0), p(5) - 1, 0, RW), Status::Ok);
    assert_eq!(d.map(1, p(10), p(15) - 1, 0, RW), Status::Ok);
    assert_eq!(d.unmap(1, p(0), p(15) - 1), Status::Ok);
    assert!(d.mappings(1).unwrap().is_empty());
    // Split at the end: map(0,9); unmap(5,14) -> RANGE.
    assert_eq!(d.map(1, p(0), p(10) - 1, 0, RW), Status::Ok);
    assert_eq!(d.unmap(1, p(5), p(15) - 1), Status::Range);
    assert_eq!(d.mappings(1).unwrap().len(), 1);
}

#[test]
fn map_rules() {
    let mut d = domains();
    d.add_endpoint(8, None).unwrap();
    assert_eq!(d.map(1, 0, 0xfff, 0, RW), Status::NoEnt);
    assert_eq!(d.attach(1, 8, 0), Status::Ok);
    assert_eq!(d.map(1, 0, 0xfff, 0, 1 << 3), Status::Inval);
    assert_eq!(d.map(1, 0x1000, 0xfff, 0, RW), Status::Inval);
    assert_eq!(d.map(1, 0x800, 0x17ff, 0, RW), Status::Range);
    assert_eq!(d.map(1, 0x1000, 0x1fff, 0x800, RW), Status::Range);
    assert_eq!(d.map(1, 0x1000, 0x17ff, 0, RW), Status::Range);
    assert_eq!(d.map(1, 1 << 48, (1 << 48) + 0xfff, 0, RW), Status::Range);
    assert_eq!(d.map(1, 0, 0xfff, u64::MAX - 0xfff, RW), Status::Ok);
    assert_eq!(
        d.map(1, 0x1000, 0x2fff, u64::MAX - 0xfff, RW),
        Status::Range
    );
    assert_eq!(d.map(1, 0xfee0_0000, 0xfee0_0fff, 0, RW), Status::Inval);
    assert_eq!(d.map(1, 0x1000, 0x2fff, 0, RW), Status::Ok);
    assert_eq!(d.map(1, 0x2000, 0x2fff, 0, RW), Status::Inval);
    assert_eq!(d.map(1, 0x0, 0x1fff, 0, RW), Status::Inval);
    d.set_negotiated(true, false);
    assert_eq!(d.map(1, 0x8000, 0x8fff, 0, RW | MAP_F_MMIO), Status::Inval);
}

#[test]
fn mapping_cap_gives_nomem() {
    let mut d = domains();
    d.engine.limits_mut().max_mappings_per_domain = 2;
    d.add_endpoint(8, None).unwrap();
    d.attach(1, 8, 0);
    assert_eq!(d.map(1, 0, 0xfff, 0, RW), Status::Ok);
    assert_eq!(d.map(1, 0x1000, 0x1fff, 0, RW), Status::Ok);
    assert_eq!(d.map(1, 0x2000, 0x2fff, 0, RW), Status::NoMem);
    // Global cap across domains; freed by UNMAP and by domain destruction.
    d.engine.limits_mut().max_total_mappings = 3;
    d.add_endpoint(16, None).unwrap();
    d.attach(2, 16, 0);
    assert_eq!(d.map(2, 0, 0xfff, 0, RW), Status::Ok);
    assert_eq!(d.map(2, 0x1000, 0x1fff, 0, RW), Status::NoMem);
    assert_eq!(d.unmap(1, 0, 0xfff), Status::Ok);
    assert_eq!(d.map(2, 0x1000, 0x1fff, 0, RW), Status::Ok);
    assert_eq!(d.detach(2, 16), Status::Ok);
    assert_eq!(d.map(1, 0, 0xfff, 0, RW), Status::Ok);
    assert_eq!(d.total_mappings(), 2);
}

#[test]
fn attach_rules_and_moves() {
    let mut d = domains();
    d.engine.limits_mut().max_domains = 2;
    d.add_endpoint(8, None).unwrap();
    d.add_endpoint(16, None).unwrap();
    assert_eq!(d.attach(1, 99, 0), Status::NoEnt);
    assert_eq!(d.attach(1, 8, 2), Status::Inval);
    assert_eq!(d.attach(1, 8, 0), Status::Ok);
    assert_eq!(d.attach(1, 16, ATTACH_F_BYPASS), Status::Inval);
    assert_eq!(d.attach(2, 16, ATTACH_F_BYPASS), Status::Ok);
    assert_eq!(d.attach(3, 16, 0), Status::Ok, "moving frees domain 2");
    assert_eq!(d.domain_count(), 2);
    assert_eq!(d.endpoint_domain(16), Some(Some(3)));
    // Move 8 to domain 3: domain 1 disappears with its mappings.
    d.map(1, 0, 0xfff, 0, RW);
    assert_eq!(d.attach(3, 8, 0), Status::Ok);
    assert_eq!(d.mappings(1), None);
    d.add_endpoint(24, None).unwrap();
    assert_eq!(d.attach(4, 8, 0), Status::Ok, "3 still has 16");
    assert_eq!(d.attach(5, 24, 0), Status::NoMem);
    assert_eq!(d.attach(5, 16, 0), Status::Ok, "16 was alone in 3");
    d.set_negotiated(false, true);
    assert_eq!(d.attach(5, 8, ATTACH_F_BYPASS), Status::Inval);
}

#[test]
fn detach_rules() {
    let mut d = domains();
    d.add_endpoint(8, None).unwrap();
    assert_eq!(d.detach(1, 99), Status::NoEnt);
    assert_eq!(d.detach(1, 8), Status::Inval);
    d.attach(1, 8, 0);
    assert_eq!(d.detach(2, 8), Status::Inval);
    assert_eq!(d.detach(1, 8), Status::Ok);
    assert_eq!(d.domain_count(), 0);
    assert_eq!(d.map(1, 0, 0xfff, 0, RW), Status::NoEnt);
}

#[test]
fn views_follow_state_after_publish() {
    let mut d = domains();
    let h = d.add_endpoint(8, None).unwrap();
    assert!(matches!(h.view().mode, Mode::Bypass));
    d.set_bypass(false);
    assert!(matches!(h.view().mode, Mode::Deny));
    d.attach(1, 8, 0);
    d.map(1, 0x1000, 0x1fff, 0x5000, MAP_F_READ);
    assert!(matches!(h.view().mode, Mode::Deny), "not yet published");
    d.publish();
    let v = h.view();
    let m = v.translate(0x1234, Access::Read).unwrap();
    assert_eq!(m.gpa_of(0x1234), 0x5234);
    drop(v);
    d.attach(2, 8, ATTACH_F_BYPASS);
    d.publish();
    assert!(matches!(h.view().mode, Mode::Bypass));
    d.reset();
    assert!(matches!(h.view().mode, Mode::Deny));
    assert_eq!(d.endpoint_domain(8), Some(None));
}

#[test]
fn host_mirroring_and_rollback() {
    let mut d = domains();
    let rec = Arc::new(RecordingMapper::new());
    let host: Arc<dyn HostMapper> = rec.clone();
    d.add_endpoint(8, Some(host.clone())).unwrap();
    d.add_endpoint(16, Some(host)).unwrap();
    d.add_endpoint(24, None).unwrap();
    // Emulated endpoint's domain: no host calls.
    d.attach(1, 24, 0);
    d.map(1, 0, 0xfff, 0x9000, RW);
    assert!(rec.ops().is_empty());
    // Host endpoint joining domain 1: its mapping is replayed.
    assert_eq!(d.attach(1, 8, 0), Status::Ok);
    assert_eq!(rec.mappings().len(), 1);
    // Second endpoint on the same host: no duplicate replay.
    assert_eq!(d.attach(1, 16, 0), Status::Ok);
    assert_eq!(rec.ops().len(), 1);
    // MAP failure in the host: NOMEM, nothing inserted.
    rec.fail_call(0, HostMapError::NoSpace);
    assert_eq!(d.map(1, 0x1000, 0x1fff, 0, MAP_F_READ), Status::NoMem);
    assert_eq!(d.mappings(1).unwrap().len(), 1);
    assert_eq!(d.map(1, 0x1000, 0x1fff, 0, MAP_F_READ), Status::Ok);
    assert_eq!(
        rec.mappings().get(&0x1000),
        Some(&(
            0x1000,
            0,
            Prot {
                read: true,
                write: false
            }
        ))
    );
    // UNMAP failing half way: rolled back, mappings intact, status from the host.
    rec.fail_call(1, HostMapError::Failed("boom".into()));
    assert_eq!(d.unmap(1, 0, 0x1fff), Status::DevErr);
    assert_eq!(d.mappings(1).unwrap().len(), 2);
    assert_eq!(rec.mappings().len(), 2);
    assert_eq!(d.unmap(1, 0, 0xfff), Status::Ok);
    assert_eq!(rec.mappings().len(), 1);
    // DETACH of one of two endpoints sharing the host keeps the host mappings.
    assert_eq!(d.detach(1, 16), Status::Ok);
    assert_eq!(rec.mappings().len(), 1);
    // DETACH of the last one with a host failure: rolled back and still attached.
    rec.fail_call(0, HostMapError::Invalid);
    assert_eq!(d.detach(1, 8), Status::Inval);
    assert_eq!(d.endpoint_domain(8), Some(Some(1)));
    assert_eq!(d.detach(1, 8), Status::Ok);
    assert!(rec.mappings().is_empty());
    assert!(matches!(
        rec.ops().last(),
        Some(HostOp::Unmap { iova: 0x1000, .. })
    ));
    // Bypass domain: guest RAM identity-mapped once per host, removed on leaving.
    d.set_ram(&[(0, 0x10_0000), (0x100_0000, 0x20_0000)]);
    assert_eq!(d.attach(9, 8, ATTACH_F_BYPASS), Status::Ok);
    assert_eq!(
        rec.mappings().into_iter().collect::<Vec<_>>(),
        vec![
            (0, (0x10_0000, 0, Prot::RW)),
            (0x100_0000, (0x20_0000, 0x100_0000, Prot::RW))
        ]
    );
    assert_eq!(d.attach(9, 16, ATTACH_F_BYPASS), Status::Ok);
    assert_eq!(rec.mappings().len(), 2, "shared host mapped once");
    assert_eq!(d.detach(9, 8), Status::Ok);
    assert_eq!(rec.mappings().len(), 2, "still used by 16");
    assert_eq!(d.detach(9, 16), Status::Ok);
    assert_eq!(
        rec.mappings().len(),
        2,
        "config.bypass is on: unattached again, boot bypass maps RAM"
    );
    d.set_bypass(false);
    assert!(rec.mappings().is_empty());
    // ATTACH whose replay fails: endpoint stays unattached.
    d.map(1, 0x4000, 0x4fff, 0, RW);
    rec.fail_call(0, HostMapError::OutOfRange);
    assert_eq!(d.attach(1, 8, 0), Status::Range);
    assert_eq!(d.endpoint_domain(8), Some(None));
}

/// Host endpoints behind [`Shadow`]s over recording mappers.
mod shadowed {
    use super::*;

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
        fn expected(s: &Shadow, maps: &[Mapping]) -> HostState {
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
                let ram_identity: Vec<Mapping> = ram
                    .iter()
                    .map(|&(g, l)| Mapping {
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
}
