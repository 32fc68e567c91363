//! Saved state of the engine and the virtio-iommu: round trips (100 000 mappings, timed),
//! replay into the host mappers, and corrupt, truncated or hostile blobs refused cleanly.

mod common;

use common::*;
use std::sync::Arc;
use std::time::Instant;
use viommu::snapshot::{frame, SnapshotError, Writer};
use viommu::test_utils::{HostOp, QueueLayout, RecordingMapper};
use viommu::{
    Access, Engine, Fault, FaultSink, Geometry, Limits, Mapping, SpaceKind, ViommuConfig,
};
use virtio_dev::VirtioDevice;
use vm_memory::GuestMemoryAtomic;

const EP: u32 = 0x08;
const EP2: u32 = 0x10;

#[derive(Debug)]
struct NoFaults;

impl FaultSink for NoFaults {
    fn report(&self, _: Fault) -> bool {
        false
    }
}

fn engine(host: Option<Arc<RecordingMapper>>) -> Engine {
    let mut e = Engine::new(
        Geometry::default(),
        Limits::default(),
        Vec::new(),
        true,
        Arc::new(NoFaults),
    );
    e.add_endpoint(EP, host.map(|h| h as Arc<dyn viommu::HostMapper>))
        .unwrap();
    e.add_endpoint(EP2, None).unwrap();
    e
}

fn page(i: u64, write: bool) -> Mapping {
    Mapping {
        start: i * 0x2000,
        end: i * 0x2000 + 0xfff,
        gpa: 0x1000_0000 + i * 0x1000,
        read: true,
        write,
        mmio: false,
    }
}

#[test]
fn engine_round_trip_of_100k_mappings_replays_one_host_call_per_mapping() {
    const N: u64 = 100_000;
    let src_host = Arc::new(RecordingMapper::new());
    let mut src = engine(Some(src_host.clone()));
    src.attach(EP, 1, SpaceKind::Paging).unwrap();
    for i in 0..N {
        src.map(1, page(i, i % 3 == 0)).unwrap();
    }
    src.attach(EP2, 7, SpaceKind::Identity).unwrap();
    src.set_default_identity(false);
    src.publish();

    let t = Instant::now();
    let blob = src.save_state();
    let saved = t.elapsed();

    let dst_host = Arc::new(RecordingMapper::new());
    let mut dst = engine(Some(dst_host.clone()));
    let before = dst_host.ops().len();
    let t = Instant::now();
    dst.restore_state(&blob).unwrap();
    let restored = t.elapsed();
    eprintln!(
        "100k mappings: blob {} bytes, save {saved:?}, restore (with replay) {restored:?}",
        blob.len()
    );

    assert_eq!(dst.mappings(1), src.mappings(1));
    assert_eq!(dst.endpoint_space(EP), Some(Some(1)));
    assert_eq!(dst.endpoint_space(EP2), Some(Some(7)));
    assert_eq!(dst.space_kind(7), Some(SpaceKind::Identity));
    assert!(!dst.default_identity());
    assert_eq!(dst.total_mappings(), N as usize);
    // Replay: the boot-bypass RAM map is dropped (none here), then one map per mapping.
    let maps: Vec<HostOp> = dst_host.ops()[before..]
        .iter()
        .filter(|o| matches!(o, HostOp::Map { .. }))
        .cloned()
        .collect();
    assert_eq!(maps.len(), N as usize);
    assert_eq!(dst_host.mappings(), src_host.mappings());
    // The views are published: the restored endpoint translates at once.
    assert_eq!(dst.save_state(), blob);
}

#[test]
fn restored_views_translate_before_anything_runs() {
    let mut src = engine(None);
    let h = src.add_endpoint(0x18, None).unwrap();
    let _ = h;
    src.attach(0x18, 3, SpaceKind::Paging).unwrap();
    src.map(3, page(5, true)).unwrap();
    src.set_default_identity(false);
    src.publish();
    let blob = src.save_state();

    let mut dst = engine(None);
    let h = dst.add_endpoint(0x18, None).unwrap();
    dst.restore_state(&blob).unwrap();
    let view = h.view();
    assert_eq!(view.translate(0xa000, Access::Write), Ok(page(5, true)));
    assert!(view.translate(0xc000, Access::Read).is_err());
    // Unattached endpoints are blocked, as saved.
    let other = dst.add_endpoint(0x20, None).unwrap();
    assert!(other.view().translate(0, Access::Read).is_err());
}

fn small_blob() -> Vec<u8> {
    let mut e = engine(None);
    e.attach(EP, 1, SpaceKind::Paging).unwrap();
    for i in 0..4 {
        e.map(1, page(i, true)).unwrap();
    }
    e.publish();
    e.save_state()
}

#[test]
fn truncated_and_corrupt_engine_blobs_are_refused_and_leave_no_domain() {
    let blob = small_blob();
    for cut in 0..blob.len() {
        let mut e = engine(None);
        assert!(e.restore_state(&blob[..cut]).is_err(), "cut at {cut}");
        assert_eq!(e.space_count(), 0);
    }
    for i in 0..blob.len() {
        for bit in [0x01u8, 0x80] {
            let mut bad = blob.clone();
            bad[i] ^= bit;
            let mut e = engine(None);
            assert!(e.restore_state(&bad).is_err(), "flip {bit:#x} at {i}");
            assert_eq!(e.space_count(), 0);
        }
    }
    let mut e = engine(None);
    e.restore_state(&blob).unwrap();
    assert_eq!(e.total_mappings(), 4);
}

/// A well-framed engine blob with the given content (the checksum is right: only the
/// content's checks can refuse it).
fn hostile(
    default_identity: bool,
    endpoints: &[(u32, Option<u32>, bool)],
    spaces: &[(u32, u8, &[Mapping])],
    mapping_count: Option<u64>,
) -> Vec<u8> {
    let mut w = Writer::new();
    w.bool(default_identity);
    let g = Geometry::default();
    w.u64(g.page_size_mask);
    w.u64(g.input_start);
    w.u64(g.input_end);
    w.u32(g.domain_start);
    w.u32(g.domain_end);
    w.count(0);
    w.count(endpoints.len());
    for &(id, space, host) in endpoints {
        w.u32(id);
        w.bool(space.is_some());
        w.u32(space.unwrap_or(0));
        w.bool(host);
    }
    w.count(spaces.len());
    for &(id, kind, maps) in spaces {
        w.u32(id);
        w.u8(kind);
        w.u64(mapping_count.unwrap_or(maps.len() as u64));
        for m in maps {
            w.u64(m.start);
            w.u64(m.end);
            w.u64(m.gpa);
            w.u8(u8::from(m.read) | u8::from(m.write) << 1);
        }
    }
    frame(*b"ENGN", &w.into_inner())
}

#[test]
fn hostile_engine_content_gets_a_clear_error() {
    let eps = [(EP, Some(1), false), (EP2, None, false)];
    let one = [page(0, true)];
    let ok = hostile(true, &eps, &[(1, 0, &one)], None);
    engine(None).restore_state(&ok).unwrap();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "huge mapping count",
            hostile(true, &eps, &[(1, 0, &one)], Some(1 << 40)),
        ),
        (
            "count larger than the bytes",
            hostile(true, &eps, &[(1, 0, &one)], Some(1000)),
        ),
        (
            "overlap",
            hostile(
                true,
                &eps,
                &[(1, 0, &[page(0, true), page(0, false)])],
                None,
            ),
        ),
        (
            "misaligned",
            hostile(
                true,
                &eps,
                &[(
                    1,
                    0,
                    &[Mapping {
                        start: 0x10,
                        ..page(0, true)
                    }],
                )],
                None,
            ),
        ),
        (
            "end before start",
            hostile(
                true,
                &eps,
                &[(
                    1,
                    0,
                    &[Mapping {
                        end: 0,
                        start: 0x1000,
                        ..page(0, true)
                    }],
                )],
                None,
            ),
        ),
        ("kind", hostile(true, &eps, &[(1, 9, &one)], None)),
        (
            "identity with mappings",
            hostile(true, &eps, &[(1, 1, &one)], None),
        ),
        (
            "endpoint in an unsaved domain",
            hostile(
                true,
                &[(EP, Some(2), false), (EP2, None, false)],
                &[(1, 0, &one)],
                None,
            ),
        ),
        (
            "domain without endpoint",
            hostile(
                true,
                &[(EP, None, false), (EP2, None, false)],
                &[(1, 0, &one)],
                None,
            ),
        ),
        (
            "other endpoints",
            hostile(true, &[(EP, Some(1), false)], &[(1, 0, &one)], None),
        ),
        (
            "assigned on one side only",
            hostile(
                true,
                &[(EP, Some(1), true), (EP2, None, false)],
                &[(1, 0, &one)],
                None,
            ),
        ),
    ];
    for (what, blob) in cases {
        let mut e = engine(None);
        let err = e.restore_state(&blob).expect_err(what);
        assert!(
            matches!(
                err,
                SnapshotError::Invalid(_)
                    | SnapshotError::TooMany { .. }
                    | SnapshotError::Truncated { .. }
                    | SnapshotError::Mismatch(_)
            ),
            "{what}: {err}"
        );
        assert!(!err.to_string().is_empty());
        assert_eq!(e.space_count(), 0, "{what}");
    }
}

#[test]
fn a_failing_replay_rolls_back_the_host() {
    let mut src = engine(Some(Arc::new(RecordingMapper::new())));
    src.attach(EP, 1, SpaceKind::Paging).unwrap();
    for i in 0..10 {
        src.map(1, page(i, true)).unwrap();
    }
    src.publish();
    let blob = src.save_state();
    let host = Arc::new(RecordingMapper::new());
    let mut dst = engine(Some(host.clone()));
    // Boot bypass maps no RAM here (none set): the 6th replayed map fails.
    host.fail_call(5, viommu::HostMapError::NoSpace);
    assert!(dst.restore_state(&blob).is_err());
    assert_eq!(dst.space_count(), 0);
    assert!(host.mappings().is_empty(), "{:?}", host.mappings());
}

fn queues() -> Vec<virtio_dev::QueueConfig> {
    vec![
        QueueLayout::packed(0x1_0000, QSIZE).config(),
        QueueLayout::packed(0x2_0000, QSIZE).config(),
    ]
}

#[test]
fn virtio_iommu_round_trip_keeps_domains_queues_counters_and_bypass() {
    let (mut d, _) = Driver::new(ViommuConfig::default(), &[EP, EP2], None);
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x10000, 0x1ffff, 0x40000, RW)), OK);
    assert_eq!(d.status(&map(1, 0x30000, 0x30fff, 0x50000, R)), OK);
    assert_eq!(d.status(&attach(2, EP2, 1)), OK); // bypass domain
    d.set_bypass(false);
    let blob = d.dev.save_state();
    let counters = d.dev.counters().snapshot();

    // The destination: same configuration and endpoints, activated by its transport on the
    // same rings (as restored guest memory holds them), then the device state.
    let mut dev = viommu::Viommu::new(ViommuConfig::default()).unwrap();
    let h = dev.add_endpoint(EP).unwrap();
    dev.add_endpoint(EP2).unwrap();
    let features = d.dev.device_features();
    dev.activate(
        GuestMemoryAtomic::new(d.mem.clone()),
        features,
        queues(),
        Vec::new(),
        d.irq.clone(),
    )
    .unwrap();
    dev.restore_state(&blob).unwrap();
    assert_eq!(dev.counters().snapshot(), counters);
    assert_eq!(dev.domains().mappings(1), d.dev.domains().mappings(1));
    assert_eq!(dev.domains().domain_bypass(2), Some(true));
    assert!(!dev.domains().bypass());
    assert_eq!(
        h.view()
            .translate(0x10008, Access::Write)
            .map(|m| m.gpa_of(0x10008)),
        Ok(0x40008)
    );
    assert_eq!(dev.save_state(), blob);

    // The driver goes on where it was: the next request is the next ring entry.
    let old = std::mem::replace(&mut d.dev, dev);
    drop(old);
    assert_eq!(d.status(&unmap(1, 0x10000, 0x1ffff)), OK);
    assert_eq!(d.dev.domains().mappings(1).map(|m| m.len()), Some(1));
    assert_eq!(d.dev.counters().snapshot().unmaps, 1);
}

#[test]
fn virtio_iommu_restore_checks_configuration_and_activation() {
    let (mut d, _) = Driver::new(ViommuConfig::default(), &[EP], None);
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    let blob = d.dev.save_state();

    // Not activated by a transport.
    let mut dev = viommu::Viommu::new(ViommuConfig::default()).unwrap();
    dev.add_endpoint(EP).unwrap();
    assert!(matches!(
        dev.restore_state(&blob),
        Err(SnapshotError::Mismatch(_))
    ));
    // Another configuration.
    let cfg = ViommuConfig {
        probe_size: 256,
        ..Default::default()
    };
    let (mut other, _) = Driver::new(cfg, &[EP], None);
    assert!(matches!(
        other.dev.restore_state(&blob),
        Err(SnapshotError::Mismatch(_))
    ));
    // Every truncation refused.
    for cut in (0..blob.len()).step_by(7) {
        let (mut fresh, _) = Driver::new(ViommuConfig::default(), &[EP], None);
        assert!(fresh.dev.restore_state(&blob[..cut]).is_err(), "cut {cut}");
        assert_eq!(fresh.dev.domains().domain_count(), 0);
    }
    // An engine blob is not a virtio-iommu blob.
    let e = engine(None).save_state();
    assert!(matches!(
        d.dev.restore_state(&e),
        Err(SnapshotError::WrongKind { .. })
    ));
}
