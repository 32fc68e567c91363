//! The virtio-iommu device driven through real split rings over a GuestMemoryMmap.

mod common;

use common::*;
use std::sync::atomic::Ordering;
use viommu::spec::{F_BYPASS_CONFIG, F_MMIO, F_PROBE, VIRTIO_F_VERSION_1};
use viommu::{Limits, ResvKind, ResvRegion, Status, ViommuConfig};
use virtio_dev::VirtioDevice;
use vm_memory::{Bytes, GuestAddress};

const EP: u32 = 0x08; // 00:01.0
const EP2: u32 = 0x10; // 00:02.0

fn driver() -> Driver {
    Driver::new(ViommuConfig::default(), &[EP, EP2], None).0
}

#[test]
fn features_never_offer_legacy_bypass() {
    let d = driver();
    let f = d.dev.device_features();
    assert_eq!(d.dev.device_type(), 23);
    assert_eq!(d.dev.queue_max_sizes().len(), 2);
    for b in [0, 1, 2, 4, 5, 6] {
        assert_ne!(f & (1 << b), 0, "feature bit {b}");
    }
    assert_eq!(f & (1 << 3), 0, "legacy VIRTIO_IOMMU_F_BYPASS");
    assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
    assert!(d.dev.inline_notify());
}

#[test]
fn attach_map_unmap_detach_happy_path() {
    let mut d = driver();
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x10000, 0x1ffff, 0x40000, RW)), OK);
    assert_eq!(d.status(&unmap(1, 0x10000, 0x1ffff)), OK);
    assert_eq!(d.status(&detach(1, EP)), OK);
    let c = d.dev.counters().snapshot();
    assert_eq!((c.attaches, c.maps, c.unmaps, c.detaches), (1, 1, 1, 1));
    assert_eq!(c.status(Status::Ok), 4);
    assert_eq!(c.errors(), 0);
}

#[test]
fn kicks_and_interrupts_are_counted_per_notification() {
    let mut d = driver();
    // Two requests behind one kick: one notification served, one interrupt.
    for body in [attach(1, EP, 0), map(1, 0x10000, 0x1ffff, 0x40000, RW)] {
        let b = d.alloc(body.len(), 0);
        d.mem.write_slice(&body, GuestAddress(b)).unwrap();
        let reply = d.alloc(4, 0xaa);
        d.queue_req(&[(b, body.len() as u32, false), (reply, 4, true)]);
    }
    d.kick();
    assert_eq!(d.used_req().len(), 2);
    let c = d.dev.counters().snapshot();
    assert_eq!((c.kicks, c.interrupts, c.attaches, c.maps), (1, 1, 1, 1));
    // The driver turns interrupts off: the next kick is counted, no interrupt is.
    d.set_no_interrupt(true);
    assert_eq!(d.status(&unmap(1, 0x10000, 0x1ffff)), OK);
    let c = d.dev.counters().snapshot();
    assert_eq!((c.kicks, c.interrupts, c.unmaps), (2, 1, 1));
}

#[test]
fn every_error_status() {
    let cfg = ViommuConfig {
        limits: Limits {
            max_domains: 2,
            max_endpoints: 8,
            max_mappings_per_domain: 2,
            max_total_mappings: 100,
            ..Default::default()
        },
        ..Default::default()
    };
    let (mut d, _) = Driver::new(cfg, &[EP, EP2, 0x18], None);
    // Unknown endpoint.
    assert_eq!(d.status(&attach(1, 0x99, 0)), NOENT);
    assert_eq!(d.status(&detach(1, 0x99)), NOENT);
    // Unknown domain.
    assert_eq!(d.status(&map(7, 0, 0xfff, 0, RW)), NOENT);
    assert_eq!(d.status(&unmap(7, 0, 0xfff)), NOENT);
    // Reserved bits.
    let mut a = attach(1, EP, 0);
    a[1] = 1;
    assert_eq!(d.status(&a), INVAL, "head reserved");
    let mut a = attach(1, EP, 0);
    a[19] = 1;
    assert_eq!(d.status(&a), INVAL, "attach reserved");
    assert_eq!(d.status(&attach(1, EP, 2)), INVAL, "unknown attach flag");
    let mut dt = detach(1, EP);
    dt[12] = 1;
    assert_eq!(d.status(&dt), INVAL, "detach reserved");
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    let mut u = unmap(1, 0, 0xfff);
    u[27] = 1;
    assert_eq!(d.status(&u), INVAL, "unmap reserved");
    assert_eq!(d.status(&map(1, 0, 0xfff, 0, 8)), INVAL, "unknown map flag");
    // Alignment and range.
    assert_eq!(d.status(&map(1, 0x800, 0x17ff, 0, RW)), RANGE);
    assert_eq!(d.status(&map(1, 0x1000, 0x1fff, 0x10, RW)), RANGE);
    assert_eq!(d.status(&map(1, 0x1000, 0x1ffe, 0, RW)), RANGE);
    assert_eq!(d.status(&map(1, 1 << 48, (1 << 48) + 0xfff, 0, RW)), RANGE);
    assert_eq!(d.status(&map(1, 0x2000, 0x1fff, 0, RW)), INVAL);
    // Overlap.
    assert_eq!(d.status(&map(1, 0x1000, 0x2fff, 0, RW)), OK);
    assert_eq!(d.status(&map(1, 0x2000, 0x3fff, 0, RW)), INVAL);
    // Reserved region (MSI window).
    assert_eq!(d.status(&map(1, 0xfee0_0000, 0xfee0_0fff, 0, RW)), INVAL);
    // Split.
    assert_eq!(d.status(&unmap(1, 0x1000, 0x1fff)), RANGE);
    assert_eq!(d.dev.domains().mappings(1).unwrap().len(), 1);
    // Mapping cap.
    assert_eq!(d.status(&map(1, 0x4000, 0x4fff, 0, RW)), OK);
    assert_eq!(d.status(&map(1, 0x5000, 0x5fff, 0, RW)), NOMEM);
    // Domain cap.
    assert_eq!(d.status(&attach(2, EP2, 0)), OK);
    assert_eq!(d.status(&attach(3, 0x18, 0)), NOMEM);
    // Bypass domain rules.
    assert_eq!(d.status(&attach(2, 0x18, 1)), INVAL, "bypass mismatch");
    assert_eq!(d.status(&detach(2, EP)), INVAL, "not attached there");
    let c = d.dev.counters().snapshot();
    assert_eq!(c.status(Status::NoEnt), 4);
    assert_eq!(c.status(Status::NoMem), 2);
    assert!(c.status(Status::Range) >= 5);
}

#[test]
fn attach_elsewhere_moves_the_endpoint() {
    let mut d = driver();
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0, 0xfff, 0, RW)), OK);
    assert_eq!(d.status(&attach(2, EP, 0)), OK);
    assert_eq!(d.dev.domains().endpoint_domain(EP), Some(Some(2)));
    // Domain 1 lost its last endpoint: it ceased to exist with its mappings.
    assert_eq!(d.dev.domains().mappings(1), None);
    assert_eq!(d.status(&map(1, 0, 0xfff, 0, RW)), NOENT);
}

#[test]
fn spec_unmap_examples_through_the_queue() {
    let mut d = driver();
    let p = |n: u64| n << 12;
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&unmap(1, p(0), p(5) - 1)), OK);
    assert_eq!(d.status(&map(1, p(0), p(10) - 1, 0, RW)), OK);
    assert_eq!(d.status(&unmap(1, p(0), p(5) - 1)), RANGE);
    assert_eq!(d.dev.domains().mappings(1).unwrap().len(), 1);
    assert_eq!(d.status(&unmap(1, p(0), p(10) - 1)), OK);
    assert_eq!(d.status(&map(1, p(0), p(5) - 1, 0, RW)), OK);
    assert_eq!(d.status(&map(1, p(10), p(15) - 1, 0, RW)), OK);
    assert_eq!(d.status(&unmap(1, p(0), p(15) - 1)), OK);
    assert!(d.dev.domains().mappings(1).unwrap().is_empty());
}

fn resv_le(bytes: &[u8], at: usize) -> (u16, u16, u8, u64, u64) {
    let b = &bytes[at..at + 24];
    (
        u16::from_le_bytes([b[0], b[1]]),
        u16::from_le_bytes([b[2], b[3]]),
        b[4],
        u64::from_le_bytes(b[8..16].try_into().unwrap()),
        u64::from_le_bytes(b[16..24].try_into().unwrap()),
    )
}

#[test]
fn probe_layout_is_exact() {
    let cfg = ViommuConfig {
        reserved_regions: vec![
            ResvRegion {
                start: 0xfee0_0000,
                end: 0xfeef_ffff,
                kind: ResvKind::Msi,
            },
            ResvRegion {
                start: 0xe000_0000,
                end: 0xefff_ffff,
                kind: ResvKind::Reserved,
            },
        ],
        probe_size: 128,
        ..Default::default()
    };
    let (mut d, _) = Driver::new(cfg, &[EP], None);
    let (len, reply) = d.request(&probe(EP), 128 + 4);
    assert_eq!(len, 132, "used len == probe_size + tail");
    assert_eq!(resv_le(&reply, 0), (1, 20, 1, 0xfee0_0000, 0xfeef_ffff));
    assert_eq!(&reply[5..8], &[0, 0, 0]);
    assert_eq!(resv_le(&reply, 24), (1, 20, 0, 0xe000_0000, 0xefff_ffff));
    assert!(
        reply[48..128].iter().all(|&b| b == 0),
        "zero-filled remainder"
    );
    assert_eq!(&reply[128..], &[0, 0, 0, 0], "tail OK");
    // Unknown endpoint: NOENT, properties zeroed, still the full length.
    let (len, reply) = d.request(&probe(0x77), 132);
    assert_eq!(len, 132);
    assert!(reply[..128].iter().all(|&b| b == 0));
    assert_eq!(reply[128], NOENT);
    // Reserved bytes: INVAL.
    let mut p = probe(EP);
    p[40] = 1;
    let (_, reply) = d.request(&p, 132);
    assert_eq!(reply[128], INVAL);
    // Wrong buffer size: not parseable, returned unwritten.
    let (len, reply) = d.request(&probe(EP), 64);
    assert_eq!(len, 0);
    assert!(reply.iter().all(|&b| b == 0xaa));
    assert_eq!(d.dev.counters().snapshot().probes, 3);
}

#[test]
fn probe_without_the_feature_is_not_answered() {
    let all = Driver::new(ViommuConfig::default(), &[], None)
        .0
        .dev
        .device_features();
    let (mut d, _) = Driver::new(ViommuConfig::default(), &[EP], Some(all & !(1 << F_PROBE)));
    let (len, reply) = d.request(&probe(EP), 512 + 4);
    assert_eq!(len, 0);
    assert!(reply.iter().all(|&b| b == 0xaa));
}

#[test]
fn config_space_reads_and_bypass_writes() {
    let (mut d, h) = Driver::new(ViommuConfig::default(), &[EP], None);
    let mut c = [0u8; 40];
    d.dev.read_config(0, &mut c);
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), !0xfff);
    assert_eq!(u64::from_le_bytes(c[8..16].try_into().unwrap()), 0);
    assert_eq!(
        u64::from_le_bytes(c[16..24].try_into().unwrap()),
        (1 << 48) - 1
    );
    assert_eq!(u32::from_le_bytes(c[24..28].try_into().unwrap()), 0);
    assert_eq!(u32::from_le_bytes(c[28..32].try_into().unwrap()), u32::MAX);
    assert_eq!(u32::from_le_bytes(c[32..36].try_into().unwrap()), 512);
    assert_eq!(c[36], 1, "boot bypass");
    assert_eq!(&c[37..40], &[0, 0, 0]);
    // Partial and out-of-range reads.
    let mut b = [0xffu8; 4];
    d.dev.read_config(36, &mut b);
    assert_eq!(b, [1, 0, 0, 0]);
    d.dev.read_config(60, &mut b);
    assert_eq!(b, [0; 4]);
    // Writes: only bypass, only 0/1, only one byte.
    d.dev.write_config(0, &[0; 8]);
    d.dev.write_config(36, &[2]);
    d.dev.write_config(36, &[0, 0]);
    d.dev.read_config(0, &mut c);
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), !0xfff);
    assert_eq!(c[36], 1);
    let ok = |h: &viommu::EndpointHandle| {
        h.view()
            .translate(0x1234, viommu::Access::Read)
            .map(|m| m.gpa_of(0x1234))
    };
    assert_eq!(ok(&h[0]), Ok(0x1234), "unattached + bypass=1: identity");
    d.dev.write_config(36, &[0]);
    d.dev.read_config(36, &mut b[..1]);
    assert_eq!(b[0], 0);
    assert!(ok(&h[0]).is_err(), "unattached + bypass=0: denied");
    // Device reset keeps the value.
    d.dev.reset();
    d.dev.read_config(36, &mut b[..1]);
    assert_eq!(b[0], 0);
    // System reset restores it.
    d.dev.system_reset();
    d.dev.read_config(36, &mut b[..1]);
    assert_eq!(b[0], 1);
}

#[test]
fn bypass_write_refused_without_the_feature() {
    let all = Driver::new(ViommuConfig::default(), &[], None)
        .0
        .dev
        .device_features();
    let (mut d, _) = Driver::new(
        ViommuConfig::default(),
        &[EP],
        Some(all & !(1 << F_BYPASS_CONFIG)),
    );
    d.dev.write_config(36, &[0]);
    let mut b = [0u8; 1];
    d.dev.read_config(36, &mut b);
    assert_eq!(b[0], 1);
    // Without BYPASS_CONFIG the ATTACH bypass flag is unknown.
    assert_eq!(d.status(&attach(1, EP, 1)), INVAL);
}

#[test]
fn mmio_flag_needs_the_feature() {
    let all = Driver::new(ViommuConfig::default(), &[], None)
        .0
        .dev
        .device_features();
    let (mut d, _) = Driver::new(ViommuConfig::default(), &[EP], Some(all & !(1 << F_MMIO)));
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0, 0xfff, 0, RW | 4)), INVAL);
    let mut d = driver();
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0, 0xfff, 0xd000_0000, RW | 4)), OK);
}

#[test]
fn malformed_chains_are_returned_unwritten() {
    let mut d = driver();
    // Short.
    let (len, reply) = d.request(&attach(1, EP, 0)[..16], 4);
    assert_eq!((len, reply.as_slice()), (0, &[0xaa; 4][..]));
    // Oversized.
    let mut m = map(1, 0, 0xfff, 0, RW);
    m.push(0);
    let (len, reply) = d.request(&m, 4);
    assert_eq!((len, reply.as_slice()), (0, &[0xaa; 4][..]));
    // Unknown type.
    let mut a = attach(1, EP, 0);
    a[0] = 9;
    let (len, reply) = d.request(&a, 4);
    assert_eq!((len, reply.as_slice()), (0, &[0xaa; 4][..]));
    // Writable part too short / too long.
    let (len, _) = d.request(&attach(1, EP, 0), 2);
    assert_eq!(len, 0);
    let (len, _) = d.request(&attach(1, EP, 0), 8);
    assert_eq!(len, 0);
    // Wrong direction: writable before readable.
    let body = attach(1, EP, 0);
    let b = d.alloc(body.len(), 0);
    d.mem
        .write_slice(&body, vm_memory::GuestAddress(b))
        .unwrap();
    let r = d.alloc(4, 0xaa);
    d.queue_req(&[(r, 4, true), (b, body.len() as u32, false)]);
    d.kick();
    assert_eq!(d.used_req()[0].1, 0);
    assert_eq!(d.read(r, 4), vec![0xaa; 4]);
    // Descriptor outside guest memory.
    d.queue_req(&[(MEM_SIZE as u64 + 0x1000, 20, false), (r, 4, true)]);
    d.kick();
    assert_eq!(d.used_req()[0].1, 0);
    // The ATTACH never happened, and the device still works.
    assert_eq!(d.dev.domains().endpoint_domain(EP), Some(None));
    assert_eq!(d.dev.counters().snapshot().malformed, 7);
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
}

#[test]
fn request_split_across_descriptors() {
    let mut d = driver();
    let body = map(1, 0, 0xfff, 0, RW);
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    let b = d.alloc(body.len(), 0);
    d.mem
        .write_slice(&body, vm_memory::GuestAddress(b))
        .unwrap();
    let r = d.alloc(4, 0xaa);
    d.queue_req(&[
        (b, 4, false),
        (b + 4, 32, false),
        (r, 2, true),
        (r + 2, 2, true),
    ]);
    d.kick();
    assert_eq!(d.used_req()[0].1, 4);
    assert_eq!(d.read(r, 4), vec![0; 4]);
}

#[test]
fn interrupts_honour_suppression() {
    let mut d = driver();
    d.set_no_interrupt(true);
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.irq.queue[0].load(Ordering::SeqCst), 0);
    d.set_no_interrupt(false);
    assert_eq!(d.status(&detach(1, EP)), OK);
    assert_eq!(d.irq.queue[0].load(Ordering::SeqCst), 1);
}

#[test]
fn a_batch_publishes_once() {
    let (mut d, h) = Driver::new(ViommuConfig::default(), &[EP], None);
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    let g0 = h[0].view().generation;
    let mut heads = Vec::new();
    let mut replies = Vec::new();
    for i in 0..8u64 {
        let body = map(1, i << 12, (i << 12) + 0xfff, 0x40_0000 + (i << 12), RW);
        let b = d.alloc(body.len(), 0);
        d.mem
            .write_slice(&body, vm_memory::GuestAddress(b))
            .unwrap();
        let r = d.alloc(4, 0xaa);
        heads.push(d.queue_req(&[(b, body.len() as u32, false), (r, 4, true)]) as u32);
        replies.push(r);
    }
    d.kick();
    let used = d.used_req();
    assert_eq!(used.iter().map(|u| u.0).collect::<Vec<_>>(), heads);
    assert!(used.iter().all(|u| u.1 == 4));
    assert!(replies.iter().all(|&r| d.read(r, 4) == vec![0; 4]));
    assert_eq!(h[0].view().generation, g0 + 1, "one publication per batch");
    assert_eq!(d.dev.domains().mappings(1).unwrap().len(), 8);
}

#[test]
fn reset_detaches_everything() {
    let (mut d, h) = Driver::new(ViommuConfig::default(), &[EP], None);
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0, 0xfff, 0, RW)), OK);
    d.dev.reset();
    assert_eq!(d.dev.domains().domain_count(), 0);
    assert_eq!(d.dev.domains().endpoint_domain(EP), Some(None));
    // Bypass is still 1: identity again.
    assert!(h[0].view().translate(0x5000, viommu::Access::Write).is_ok());
    // Requests before re-activation are ignored without panicking.
    d.dev.queue_notify(0);
}

#[test]
fn usable_as_a_boxed_virtio_device() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<viommu::Viommu>();
    send::<viommu::TranslatedMemory>();
    send_sync::<viommu::EndpointHandle>();
    let mut dev = viommu::Viommu::new(ViommuConfig::default()).unwrap();
    dev.add_endpoint(EP).unwrap();
    assert!(dev.add_endpoint(EP).is_err(), "duplicate endpoint");
    let b: Box<dyn VirtioDevice> = Box::new(dev);
    assert_eq!(b.device_type(), 23);
}

#[test]
fn config_validation() {
    let bad = ViommuConfig {
        reserved_regions: vec![
            ResvRegion {
                start: 0x1000,
                end: 0x2fff,
                kind: ResvKind::Reserved,
            },
            ResvRegion {
                start: 0x2000,
                end: 0x3fff,
                kind: ResvKind::Reserved,
            },
        ],
        ..Default::default()
    };
    assert!(viommu::Viommu::new(bad).is_err());
    let small = ViommuConfig {
        probe_size: 8,
        ..Default::default()
    };
    assert!(viommu::Viommu::new(small).is_err());
    let mut g = ViommuConfig::default();
    g.geometry.page_size_mask = 0;
    assert!(viommu::Viommu::new(g).is_err());
}

#[test]
fn host_backed_endpoint_statuses_reach_the_tail() {
    use viommu::test_utils::RecordingMapper;
    use viommu::HostMapError;
    let rec = std::sync::Arc::new(RecordingMapper::new());
    let (mut d, _) = Driver::new(ViommuConfig::default(), &[EP], None);
    d.dev.add_host_endpoint(0x20, rec.clone()).unwrap();
    assert_eq!(d.status(&attach(1, 0x20, 0)), OK);
    assert_eq!(d.status(&map(1, 0x10000, 0x1ffff, 0x40000, R)), OK);
    assert_eq!(
        rec.mappings().get(&0x10000),
        Some(&(
            0x10000,
            0x40000,
            viommu::Prot {
                read: true,
                write: false
            }
        ))
    );
    rec.fail_call(0, HostMapError::NoSpace);
    assert_eq!(d.status(&map(1, 0x20000, 0x20fff, 0, RW)), NOMEM);
    rec.fail_call(0, HostMapError::OutOfRange);
    assert_eq!(d.status(&map(1, 0x20000, 0x20fff, 0, RW)), RANGE);
    rec.fail_call(0, HostMapError::Failed("ioctl".into()));
    assert_eq!(d.status(&unmap(1, 0x10000, 0x1ffff)), DEVERR);
    assert_eq!(
        d.dev.domains().mappings(1).unwrap().len(),
        1,
        "nothing removed"
    );
    assert_eq!(d.status(&unmap(1, 0x10000, 0x1ffff)), OK);
    assert!(rec.mappings().is_empty());
}

/// Queue `body` as one request chain (readable body, 4-byte writable tail), no kick.
fn queue_body(d: &mut Driver, body: &[u8]) -> u16 {
    let at = d.alloc(body.len(), 0);
    d.mem
        .write_slice(body, vm_memory::GuestAddress(at))
        .unwrap();
    let tail = d.alloc(4, 0xaa);
    d.queue_req(&[(at, body.len() as u32, false), (tail, 4, true)])
}

#[test]
fn attach_ping_pong_of_a_host_endpoint_is_bounded_per_notification_and_none_is_lost() {
    use std::sync::Arc;
    use viommu::test_utils::RecordingMapper;
    use viommu::HOST_CALLS_PER_NOTIFY;
    const HOST: u32 = 0x20;
    let m = 3000u64;
    let rec = Arc::new(RecordingMapper::new());
    let (mut d, _) = Driver::new(ViommuConfig::default(), &[EP], None);
    d.dev.add_host_endpoint(HOST, rec.clone()).unwrap();
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    for i in 0..m {
        let iova = 0x100_0000 + i * 0x1000;
        assert_eq!(d.status(&map(1, iova, iova + 0xfff, 0x40000, RW)), OK);
    }
    d.reset_data();
    // Eight ATTACHes of the host endpoint, alternating between the full domain 1 and the
    // empty domain 2: each replays or removes the m mappings in the host.
    for k in 0..8 {
        queue_body(&mut d, &attach(if k % 2 == 0 { 1 } else { 2 }, HOST, 0));
    }
    let mut served = 0;
    let mut notifications = 0;
    loop {
        let before = d.dev.host_calls();
        d.kick();
        notifications += 1;
        let calls = d.dev.host_calls() - before;
        assert!(
            calls < HOST_CALLS_PER_NOTIFY + 2 * m + 1,
            "{calls} host calls in one notification"
        );
        let used = d.used_req();
        served += used.len();
        assert!(used.iter().all(|&(_, len)| len == 4));
        if !d.dev.queue_pending(viommu::spec::REQUEST_QUEUE) {
            break;
        }
        assert!(notifications < 20, "the continuation never ends");
    }
    assert_eq!(served, 8, "every ATTACH completed, none lost");
    assert!(
        notifications >= 4,
        "cut into {notifications} notification(s)"
    );
    assert_eq!(d.dev.domains().endpoint_domain(HOST), Some(Some(2)));
    assert!(rec.mappings().is_empty(), "domain 2 is empty");
}

/// A host mapper that, like a hostile driver on another vCPU, makes another request available
/// on every host map call, so a notification never runs out of chains.
struct Refill {
    mem: vm_memory::GuestMemoryMmap,
    avail: u64,
    heads: std::sync::Mutex<(bool, u16, Vec<u16>)>, // (on, next avail idx, heads to post)
}

impl Refill {
    fn post(&self) {
        let mut st = self.heads.lock().unwrap();
        if !st.0 {
            return;
        }
        for i in 0..st.2.len() {
            let (idx, head) = (st.1, st.2[i]);
            let slot = self.avail + 4 + 2 * u64::from(idx % QSIZE);
            self.mem
                .write_obj(head, vm_memory::GuestAddress(slot))
                .unwrap();
            st.1 = idx.wrapping_add(1);
            self.mem
                .write_obj(st.1, vm_memory::GuestAddress(self.avail + 2))
                .unwrap();
        }
    }
}

impl viommu::HostMapper for Refill {
    fn map(&self, _: u64, _: u64, _: u64, _: viommu::Prot) -> Result<(), viommu::HostMapError> {
        self.post();
        Ok(())
    }
    fn unmap(&self, _: u64, _: u64) -> Result<(), viommu::HostMapError> {
        Ok(())
    }
}

#[test]
fn a_driver_refilling_the_queue_during_a_notification_gets_one_round_per_notification() {
    use std::sync::Arc;
    const HOST: u32 = 0x20;
    let cfg = ViommuConfig {
        bypass: false,
        ..ViommuConfig::default()
    };
    let (mut d, _) = Driver::new(cfg, &[EP], None);
    let refill = Arc::new(Refill {
        mem: d.mem.clone(),
        avail: viommu::test_utils::QueueLayout::packed(0x1_0000, QSIZE).avail_ring,
        heads: std::sync::Mutex::new((false, 0, Vec::new())),
    });
    d.dev.add_host_endpoint(HOST, refill.clone()).unwrap();
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x10000, 0x10fff, 0x40000, RW)), OK);
    d.reset_data();
    // A: ATTACH host -> 1 (one host map, which makes B and A available again), B: ATTACH
    // host -> 2 (one unmap; again: nothing): the queue never drains.
    let avail_idx = |d: &Driver| -> u16 {
        d.mem
            .read_obj(vm_memory::GuestAddress(refill.avail + 2))
            .unwrap()
    };
    let start = avail_idx(&d);
    let a = queue_body(&mut d, &attach(1, HOST, 0));
    let b = queue_body(&mut d, &attach(2, HOST, 0));
    *refill.heads.lock().unwrap() = (true, avail_idx(&d), vec![b, a]);
    d.kick();
    let used = d.used_req().len();
    assert_eq!(
        used,
        usize::from(QSIZE),
        "one round of chains per notification"
    );
    assert!(d.dev.queue_pending(viommu::spec::REQUEST_QUEUE));
    // The driver stops refilling: the continuation drains what is left.
    refill.heads.lock().unwrap().0 = false;
    let mut rounds = 0;
    while d.dev.queue_pending(viommu::spec::REQUEST_QUEUE) {
        d.kick();
        rounds += 1;
        assert!(rounds < 10);
    }
    let posted = refill.heads.lock().unwrap().1.wrapping_sub(start);
    let total = used + d.used_req().len();
    assert_eq!(
        total,
        usize::from(posted),
        "every chain made available was served"
    );
}
