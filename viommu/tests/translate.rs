//! Devices behind the IOMMU: IOVA -> GPA translation through `TranslatedMemory`, faults on the
//! event queue, bypass rules, and UNMAP waiting for in-flight requests.

mod common;

use common::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use viommu::{TranslatedMemory, ViommuConfig};
use virtio_dev::VirtioDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

const EP: u32 = 0x08;

fn setup() -> (Driver, TranslatedMemory<GuestMemoryMmap>) {
    let (d, h) = Driver::new(ViommuConfig::default(), &[EP], None);
    let tm = TranslatedMemory::new(d.mem.clone(), h[0].clone());
    (d, tm)
}

fn fault_bytes(d: &Driver, addr: u64) -> (u8, u32, u32, u64) {
    let b = d.read(addr, 24);
    assert_eq!(&b[1..4], &[0, 0, 0]);
    assert_eq!(&b[12..16], &[0, 0, 0, 0]);
    (
        b[0],
        u32::from_le_bytes(b[4..8].try_into().unwrap()),
        u32::from_le_bytes(b[8..12].try_into().unwrap()),
        u64::from_le_bytes(b[16..24].try_into().unwrap()),
    )
}

#[test]
fn buffer_spanning_adjacent_mappings() {
    let (mut d, tm) = setup();
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    // IOVA 0x10000..0x10fff -> GPA 0x50000, IOVA 0x11000..0x11fff -> GPA 0x70000.
    assert_eq!(d.status(&map(1, 0x10000, 0x10fff, 0x50000, RW)), OK);
    assert_eq!(d.status(&map(1, 0x11000, 0x11fff, 0x70000, RW)), OK);
    let a: Vec<u8> = (0..0x1000).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..0x1000).map(|i| (i % 241) as u8 ^ 0x5a).collect();
    d.mem.write_slice(&a, GuestAddress(0x50000)).unwrap();
    d.mem.write_slice(&b, GuestAddress(0x70000)).unwrap();
    let mut buf = vec![0u8; 0x1000];
    tm.read_slice(&mut buf, GuestAddress(0x10800)).unwrap();
    assert_eq!(&buf[..0x800], &a[0x800..]);
    assert_eq!(&buf[0x800..], &b[..0x800]);
    // The devices' copy path gives the same bytes.
    let mut fast = vec![0u8; 0x1000];
    tm.read_into(&mut fast, GuestAddress(0x10800)).unwrap();
    assert_eq!(fast, buf);
    // Writes too, both ways.
    tm.write_slice(&[0xee; 16], GuestAddress(0x10ff8)).unwrap();
    assert_eq!(d.read(0x50ff8, 8), vec![0xee; 8]);
    assert_eq!(d.read(0x70000, 8), vec![0xee; 8]);
    tm.write_from(&[0xdd; 16], GuestAddress(0x10ff8)).unwrap();
    assert_eq!(d.read(0x50ff8, 8), vec![0xdd; 8]);
    assert_eq!(d.read(0x70000, 8), vec![0xdd; 8]);
    assert!(tm.check_range(GuestAddress(0x10000), 0x2000, Permissions::ReadWrite));
    assert_eq!(d.dev.counters().snapshot().faults, 0);
}

#[test]
fn a_miss_fails_the_access_and_raises_a_fault_event() {
    let (mut d, tm) = setup();
    let ev = d.alloc(24, 0xaa);
    d.post_event(&[(ev, 24, true)]);
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x10000, 0x10fff, 0x50000, RW)), OK);
    // A read running off the end of the mapping fails as a whole.
    let mut buf = vec![0u8; 0x20];
    assert!(tm.read_slice(&mut buf, GuestAddress(0x10ff0)).is_err());
    assert_eq!(d.used_evt(), vec![(0, 24)]);
    assert_eq!(fault_bytes(&d, ev), (2, 1 | 1 << 8, EP, 0x11000));
    assert_eq!(d.irq.queue[1].load(Ordering::SeqCst), 1);
    // No more event buffers: the next fault is dropped cleanly.
    assert!(tm.write_slice(&[1], GuestAddress(0x90000)).is_err());
    assert!(d.used_evt().is_empty());
    assert_eq!(
        d.irq.queue[1].load(Ordering::SeqCst),
        1,
        "no interrupt without a used buffer"
    );
    let c = d.dev.counters().snapshot();
    assert_eq!((c.faults, c.faults_delivered, c.faults_dropped), (2, 1, 1));
}

#[test]
fn write_to_a_read_only_mapping_faults() {
    let (mut d, tm) = setup();
    let ev = d.alloc(24, 0);
    d.post_event(&[(ev, 24, true)]);
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x10000, 0x10fff, 0x50000, R)), OK);
    let mut b = [0u8; 4];
    tm.read_slice(&mut b, GuestAddress(0x10010)).unwrap();
    d.mem.write_slice(&[7; 4], GuestAddress(0x50010)).unwrap();
    assert!(tm.write_slice(&[9; 4], GuestAddress(0x10010)).is_err());
    assert!(tm.write_from(&[9; 4], GuestAddress(0x10010)).is_err());
    assert_eq!(d.read(0x50010, 4), vec![7; 4], "nothing written");
    assert_eq!(fault_bytes(&d, ev), (2, 2 | 1 << 8, EP, 0x10010));
}

#[test]
fn small_event_buffers_are_not_used() {
    let (mut d, tm) = setup();
    let small = d.alloc(16, 0xaa);
    let ev = d.alloc(24, 0xaa);
    d.post_event(&[(small, 16, true)]);
    d.post_event(&[(ev, 24, true)]);
    d.dev.write_config(36, &[0]);
    assert!(tm.read_slice(&mut [0u8; 4], GuestAddress(0x1000)).is_err());
    assert_eq!(d.used_evt(), vec![(0, 0), (1, 24)]);
    assert_eq!(d.read(small, 16), vec![0xaa; 16]);
    // Unattached with bypass off: reason DOMAIN.
    assert_eq!(fault_bytes(&d, ev), (1, 1 | 1 << 8, EP, 0x1000));
}

#[test]
fn bypass_rules() {
    let (mut d, tm) = setup();
    d.mem.write_slice(&[0x42; 4], GuestAddress(0x3000)).unwrap();
    let mut b = [0u8; 4];
    // Unattached, bypass = 1: identity.
    tm.read_slice(&mut b, GuestAddress(0x3000)).unwrap();
    assert_eq!(b, [0x42; 4]);
    // Unattached, bypass = 0: denied.
    d.dev.write_config(36, &[0]);
    assert!(tm.read_slice(&mut b, GuestAddress(0x3000)).is_err());
    // Attached to a bypass domain: identity regardless of config.bypass.
    assert_eq!(d.status(&attach(1, EP, 1)), OK);
    tm.read_slice(&mut b, GuestAddress(0x3000)).unwrap();
    // Bypass domains take no MAP/UNMAP.
    assert_eq!(d.status(&map(1, 0, 0xfff, 0, RW)), INVAL);
    assert_eq!(d.status(&unmap(1, 0, 0xfff)), INVAL);
    // Attached to a paging domain with nothing mapped: denied.
    assert_eq!(d.status(&attach(2, EP, 0)), OK);
    assert!(tm.read_slice(&mut b, GuestAddress(0x3000)).is_err());
    // Never outside guest RAM, even in bypass.
    d.dev.write_config(36, &[1]);
    assert_eq!(d.status(&detach(2, EP)), OK);
    assert!(tm
        .read_slice(&mut b, GuestAddress(MEM_SIZE as u64 - 2))
        .is_err());
}

#[test]
fn mapping_to_non_ram_is_refused() {
    let (mut d, tm) = setup();
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x10000, 0x10fff, 1 << 40, RW)), OK);
    let mut b = [0u8; 4];
    assert!(tm.read_slice(&mut b, GuestAddress(0x10000)).is_err());
    assert!(tm.read_into(&mut b, GuestAddress(0x10000)).is_err());
    assert!(tm.write_from(&b, GuestAddress(0x10000)).is_err());
}

/// A mapping whose target spans two RAM regions: every access path splits at the boundary.
#[test]
fn a_mapping_across_two_ram_regions() {
    let (mut d, h) = Driver::new(ViommuConfig::default(), &[EP], None);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x8_0000),
        (GuestAddress(0x8_0000), 0x8_0000),
    ])
    .unwrap();
    let tm = TranslatedMemory::new(mem.clone(), h[0].clone());
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    // IOVA 0x10_0000.. -> GPA 0x7_8000.., across the region boundary at 0x8_0000.
    assert_eq!(d.status(&map(1, 0x10_0000, 0x10_ffff, 0x7_8000, RW)), OK);
    let data: Vec<u8> = (0..0x4000).map(|i| (i % 253) as u8).collect();
    tm.write_from(&data, GuestAddress(0x10_6000)).unwrap();
    let mut back = vec![0u8; 0x4000];
    mem.read_slice(&mut back, GuestAddress(0x7_e000)).unwrap();
    assert_eq!(back, data);
    for _ in 0..2 {
        // Twice: a cold cache, then the cached (region-clipped) entries.
        let mut a = vec![0u8; 0x4000];
        let mut b = vec![0u8; 0x4000];
        tm.read_into(&mut a, GuestAddress(0x10_6000)).unwrap();
        tm.read_slice(&mut b, GuestAddress(0x10_6000)).unwrap();
        assert_eq!(a, data);
        assert_eq!(b, data);
    }
    assert_eq!(d.dev.counters().snapshot().faults, 0);
    // Running past the mapping's end: refused, with a fault.
    assert!(tm
        .read_into(&mut [0u8; 16], GuestAddress(0x10_fff8))
        .is_err());
    assert_eq!(d.dev.counters().snapshot().faults, 1);
}

#[test]
fn the_last_hit_cache_never_outlives_an_unmap() {
    let (mut d, tm) = setup();
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x10000, 0x10fff, 0x50000, RW)), OK);
    let mut b = [0u8; 4];
    tm.read_slice(&mut b, GuestAddress(0x10000)).unwrap();
    tm.read_slice(&mut b, GuestAddress(0x10004)).unwrap();
    tm.read_into(&mut b, GuestAddress(0x10004)).unwrap();
    assert_eq!(d.status(&unmap(1, 0x10000, 0x10fff)), OK);
    assert!(tm.read_slice(&mut b, GuestAddress(0x10008)).is_err());
    assert!(tm.read_into(&mut b, GuestAddress(0x10008)).is_err());
    // Remapped elsewhere: the new target is used.
    assert_eq!(d.status(&map(1, 0x10000, 0x10fff, 0x60000, RW)), OK);
    d.mem.write_slice(&[5; 4], GuestAddress(0x60008)).unwrap();
    tm.read_slice(&mut b, GuestAddress(0x10008)).unwrap();
    assert_eq!(b, [5; 4]);
}

#[test]
fn unmap_completes_only_after_in_flight_requests() {
    let (mut d, tm) = setup();
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x10000, 0x10fff, 0x50000, RW)), OK);
    let pinned = tm.pin();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done2 = done.clone();
    let t = std::thread::spawn(move || {
        let mut b = [0u8; 4];
        pinned.read_slice(&mut b, GuestAddress(0x10000)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // Still valid: the UNMAP has not completed.
        pinned.write_slice(&[3; 4], GuestAddress(0x10000)).unwrap();
        done2.store(true, Ordering::SeqCst);
        drop(pinned);
    });
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.status(&unmap(1, 0x10000, 0x10fff)), OK);
    assert!(
        done.load(Ordering::SeqCst),
        "UNMAP completed before the request finished"
    );
    t.join().unwrap();
    assert_eq!(d.read(0x50000, 4), vec![3; 4]);
}

#[test]
fn a_virtqueue_behind_the_iommu() {
    use virtio_queue::{Queue, QueueT};
    let (mut d, tm) = setup();
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    // Rings at IOVA 0x100000 (GPA 0x800000), data at IOVA 0x200000 spanning two mappings.
    assert_eq!(d.status(&map(1, 0x100000, 0x102fff, 0x800000, RW)), OK);
    assert_eq!(d.status(&map(1, 0x200000, 0x200fff, 0x900000, RW)), OK);
    assert_eq!(d.status(&map(1, 0x201000, 0x201fff, 0xa00000, RW)), OK);
    // Write one descriptor + avail entry through the IOMMU view (as a driver would via IOVA).
    let desc = 0x100000u64;
    let avail = 0x101000u64;
    let used = 0x102000u64;
    tm.write_obj(0x200ff0u64, GuestAddress(desc)).unwrap();
    tm.write_obj(0x20u32, GuestAddress(desc + 8)).unwrap();
    tm.write_obj(0u16, GuestAddress(desc + 12)).unwrap();
    tm.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
    tm.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    d.mem
        .write_slice(&[0x11; 16], GuestAddress(0x900ff0))
        .unwrap();
    d.mem
        .write_slice(&[0x22; 16], GuestAddress(0xa00000))
        .unwrap();
    let mut q = Queue::new(16).unwrap();
    q.set_size(16);
    q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
    q.try_set_used_ring_address(GuestAddress(used)).unwrap();
    q.set_ready(true);
    assert!(q.is_valid(&tm));
    let chain = q.pop_descriptor_chain(&tm).unwrap();
    let mut reader = chain.clone().reader(&tm).unwrap();
    let mut data = [0u8; 32];
    std::io::Read::read_exact(&mut reader, &mut data).unwrap();
    assert_eq!(&data[..16], &[0x11; 16]);
    assert_eq!(&data[16..], &[0x22; 16]);
    q.add_used(&tm, chain.head_index(), 0).unwrap();
    let used_idx: u16 = d.mem.read_obj(GuestAddress(0x802002)).unwrap();
    assert_eq!(used_idx, 1);
}
