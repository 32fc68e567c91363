//! Caps on guest-created state and the memory the device holds: requests past the caps fail
//! with NOMEM and change nothing; `memory_estimate()` follows the real heap (measured with a
//! counting allocator) and never exceeds `ViommuConfig::memory_bound()`, whatever the guest
//! sends; memory returns when mappings and domains go away.

mod common;

use common::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use viommu::test_utils::RecordingMapper;
use viommu::{DomainError, Limits, Shadow, Status, ViommuConfig};

/// Counts the heap bytes each thread holds (tests run on their own threads; the device
/// serves requests inline on the caller's thread).
struct Counting;

thread_local! {
    static NET: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    let _ = NET.try_with(|n| n.set(n.get() + delta));
}

/// Net heap bytes allocated by this thread so far.
fn heap() -> isize {
    NET.with(|n| n.get())
}

// SAFETY: every call is forwarded unchanged to the system allocator; the wrapper only counts
// sizes in a thread-local `Cell` (const-initialised, so counting never allocates).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (we forward every call).
        unsafe { System.dealloc(ptr, layout) };
        account(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new_size` is checked by our caller.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            account(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const P: u64 = 0x1000;
const EPS: [u32; 4] = [0x08, 0x10, 0x18, 0x20];

fn limits() -> Limits {
    Limits {
        max_domains: 3,
        max_endpoints: 5,
        max_mappings_per_domain: 8,
        max_total_mappings: 12,
        ..Default::default()
    }
}

#[test]
fn every_cap_gives_nomem_and_changes_nothing() {
    let cfg = ViommuConfig {
        limits: limits(),
        ..Default::default()
    };
    let (mut d, _) = Driver::new(cfg, &EPS, None);
    // Endpoints are registered by the VMM: the cap is an error, not a status.
    assert!(d.dev.add_endpoint(0x28).is_ok());
    assert_eq!(
        d.dev.add_endpoint(0x30).unwrap_err(),
        DomainError::TooManyEndpoints(5)
    );
    // Domains.
    for (i, &ep) in EPS[..3].iter().enumerate() {
        assert_eq!(d.status(&attach(i as u32 + 1, ep, 0)), OK);
    }
    assert_eq!(d.status(&attach(4, EPS[3], 0)), NOMEM);
    assert_eq!(d.dev.domains().endpoint_domain(EPS[3]), Some(None));
    assert_eq!(
        d.status(&attach(4, EPS[3], 1)),
        NOMEM,
        "bypass domains count too"
    );
    // Moving the only endpoint of a domain to a new one is fine at the cap.
    assert_eq!(d.status(&attach(5, EPS[2], 0)), OK);
    assert_eq!(d.dev.domains().domain_count(), 3);
    // Per-domain mappings.
    for i in 0..10u64 {
        d.reset_data();
        let s = d.status(&map(1, i * P, (i + 1) * P - 1, 0, RW));
        assert_eq!(s, if i < 8 { OK } else { NOMEM }, "map {i}");
    }
    // All domains together.
    for i in 0..6u64 {
        d.reset_data();
        let s = d.status(&map(2, i * P, (i + 1) * P - 1, 0, RW));
        assert_eq!(s, if i < 4 { OK } else { NOMEM }, "map {i} in domain 2");
    }
    assert_eq!(d.dev.domains().total_mappings(), 12);
    assert_eq!(d.dev.domains().mappings(1).unwrap().len(), 8);
    assert_eq!(d.dev.domains().mappings(2).unwrap().len(), 4);
    assert_eq!(d.status(&map(5, 0, P - 1, 0, RW)), NOMEM);
    // Freed by UNMAP and by a domain going away.
    assert_eq!(d.status(&unmap(1, 0, 2 * P - 1)), OK);
    assert_eq!(d.status(&map(5, 0, P - 1, 0, RW)), OK);
    assert_eq!(d.status(&detach(2, EPS[1])), OK);
    assert_eq!(d.dev.domains().total_mappings(), 7);
    assert_eq!(d.status(&attach(4, EPS[3], 0)), OK);
    let c = d.dev.counters().snapshot();
    assert_eq!(c.status(Status::NoMem), 2 + 2 + 2 + 1);
}

#[test]
fn a_full_queue_of_maps_past_the_cap() {
    let cfg = ViommuConfig {
        limits: limits(),
        ..Default::default()
    };
    let (mut d, _) = Driver::new(cfg, &EPS, None);
    assert_eq!(d.status(&attach(1, EPS[0], 0)), OK);
    fill(&mut d, 1, 0x100, 2);
    // 8 requests in one kick (16 descriptors): the cap holds inside a batch too.
    d.reset_data();
    let mut replies = Vec::new();
    for i in 0..8u64 {
        let body = map(1, i * P, (i + 1) * P - 1, 0, RW);
        let b = d.alloc(body.len(), 0);
        vm_memory::Bytes::write_slice(&d.mem, &body, vm_memory::GuestAddress(b)).unwrap();
        let r = d.alloc(4, 0xaa);
        d.queue_req(&[(b, body.len() as u32, false), (r, 4, true)]);
        replies.push(r);
    }
    d.kick();
    assert_eq!(d.used_req().len(), 8);
    let statuses: Vec<u8> = replies.iter().map(|&r| d.read(r, 1)[0]).collect();
    assert_eq!(statuses, [OK, OK, OK, OK, OK, OK, NOMEM, NOMEM]);
    assert_eq!(d.dev.domains().mappings(1).unwrap().len(), 8);
}

/// Fill `n` mappings in `domain` (pages `base..base + n`) through the queue.
fn fill(d: &mut Driver, domain: u32, base: u64, n: u64) {
    for i in 0..n {
        d.reset_data();
        let a = (base + i) * P;
        assert_eq!(d.status(&map(domain, a, a + P - 1, 0, RW)), OK);
    }
}

#[test]
fn memory_estimate_follows_the_heap() {
    let cfg = ViommuConfig::default();
    let bound = cfg.memory_bound();
    let (mut d, _) = Driver::new(cfg, &EPS, None);
    let est0 = d.dev.domains().memory_estimate();
    let heap0 = heap();
    for (i, &ep) in EPS.iter().enumerate() {
        assert_eq!(d.status(&attach(i as u32 + 1, ep, 0)), OK);
    }
    for dom in 1..=4 {
        fill(&mut d, dom, 0x100, 2000);
    }
    let est = d.dev.domains().memory_estimate() - est0;
    let real = (heap() - heap0) as usize;
    eprintln!("8000 mappings: estimate {est} bytes, heap {real} bytes");
    assert!(real <= est, "estimate {est} below the real heap {real}");
    assert!(
        est <= 4 * real,
        "estimate {est} far above the real heap {real}"
    );
    assert!(d.dev.memory_estimate() <= bound);
    // Everything unmapped in one request per domain, domains destroyed: back to the start.
    for (i, &ep) in EPS.iter().enumerate() {
        d.reset_data();
        assert_eq!(d.status(&unmap(i as u32 + 1, 0, u64::MAX >> 16)), OK);
        assert_eq!(d.status(&detach(i as u32 + 1, ep)), OK);
    }
    assert_eq!(d.dev.domains().memory_estimate(), est0);
    let left = heap() - heap0;
    assert!(
        left < 16 << 10,
        "{left} bytes still held after everything went away"
    );
}

/// An UNMAP of a large table leaves a quiet domain holding only about its live mappings (not
/// the pre-UNMAP copy and a change log as long as the table, per domain, for ever).
#[test]
fn big_unmaps_do_not_leave_copies_behind() {
    let (mut d, _) = Driver::new(ViommuConfig::default(), &EPS, None);
    for (i, &ep) in EPS.iter().enumerate() {
        assert_eq!(d.status(&attach(i as u32 + 1, ep, 0)), OK);
    }
    let heap0 = heap();
    let est0 = d.dev.memory_estimate();
    for dom in 1..=4 {
        fill(&mut d, dom, 0x100, 3000);
        // Keep one mapping, remove the rest in one request.
        d.reset_data();
        assert_eq!(d.status(&unmap(dom, 0x101 * P, u64::MAX >> 16)), OK);
        assert_eq!(d.dev.domains().mappings(dom).unwrap().len(), 1);
    }
    let held = heap() - heap0;
    let est = d.dev.memory_estimate() - est0;
    eprintln!("after big UNMAPs: heap {held} bytes, estimate {est} bytes");
    assert!(held < 64 << 10, "{held} bytes held for 4 live mappings");
    assert!(est < 64 << 10, "estimate {est} bytes for 4 live mappings");
}

/// A hostile guest: random MAP/UNMAP/ATTACH/DETACH in random batches, checked after every
/// batch against the configured bound (estimate and real heap).
#[test]
fn memory_never_exceeds_the_bound() {
    let cfg = ViommuConfig {
        limits: Limits {
            max_domains: 4,
            max_endpoints: 4,
            max_mappings_per_domain: 400,
            max_total_mappings: 1000,
            ..Default::default()
        },
        ..Default::default()
    };
    let bound = cfg.memory_bound();
    let (mut d, _) = Driver::new(cfg, &EPS, None);
    let heap0 = heap() - d.dev.memory_estimate() as isize;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut peak = 0usize;
    let mut nomem = 0;
    for _ in 0..4000 {
        d.reset_data();
        let dom = rnd(4) as u32 + 1;
        let ep = EPS[dom as usize - 1];
        let req = match rnd(400) {
            0..=11 => attach(dom, ep, 0),
            12 => detach(dom, ep),
            13..=32 => {
                let a = rnd(4000) * P;
                unmap(dom, a, a + rnd(64) * P + P - 1)
            }
            _ => {
                let a = rnd(4000) * P;
                map(dom, a, a + P - 1, 0, RW)
            }
        };
        if d.status(&req) == NOMEM {
            nomem += 1;
        }
        let est = d.dev.memory_estimate();
        let real = (heap() - heap0).max(0) as usize;
        peak = peak.max(est);
        assert!(est <= bound, "estimate {est} above the bound {bound}");
        assert!(real <= bound, "heap {real} above the bound {bound}");
    }
    eprintln!(
        "hostile mix: peak estimate {peak} bytes, bound {bound}, {nomem} NOMEM, {:?}",
        d.dev.counters().snapshot().statuses
    );
    assert!(nomem > 0, "the mix never reached a cap");
}

/// 64 guest RAM regions of one page each, back to back from GPA 0: a 64-page mapping of GPA 0
/// composes into 64 host pieces in a shadow.
fn fragmented_ram() -> vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap> {
    let ranges: Vec<_> = (0..64u64)
        .map(|i| (vm_memory::GuestAddress(i * P), P as usize))
        .collect();
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
    vm_memory::GuestMemoryAtomic::new(mem)
}

/// A host endpoint behind a shadow of fragmented RAM, attached to domain 1.
fn shadowed(cfg: ViommuConfig) -> (Driver, Arc<RecordingMapper>, Arc<Shadow>) {
    let (mut d, _) = Driver::new(cfg, &[], None);
    let host = Arc::new(RecordingMapper::new());
    let shadow = Arc::new(Shadow::new(host.clone(), fragmented_ram()));
    d.dev.add_host_endpoint(EPS[0], shadow.clone()).unwrap();
    assert_eq!(d.status(&attach(1, EPS[0], 0)), OK);
    (d, host, shadow)
}

/// Issue 16, 2.6: what a shadow records for the host (one piece per RAM region a mapping
/// crosses, up to `MAX_PIECES` per mapping) is part of the memory estimate.
#[test]
fn shadow_records_count_in_the_memory_estimate() {
    let cfg = ViommuConfig {
        bypass: false,
        ..Default::default()
    };
    let (mut d, host, shadow) = shadowed(cfg.clone());
    let est0 = d.dev.memory_estimate();
    for i in 0..8u64 {
        d.reset_data();
        let iova = 0x100_0000 + i * 64 * P;
        assert_eq!(d.status(&map(1, iova, iova + 64 * P - 1, 0, RW)), OK);
    }
    assert_eq!(shadow.host_mappings().len(), 8 * 64);
    assert_eq!(host.mappings().len(), 8 * 64);
    let grown = d.dev.memory_estimate() - est0;
    // At the very least each extra piece's 24 bytes (the shadow's real heap is more).
    let pieces = 8 * 63 * std::mem::size_of::<viommu::Piece>();
    assert!(
        grown >= pieces,
        "estimate grew {grown} bytes for 8 mappings of 64 host pieces each"
    );
    assert!(d.dev.memory_estimate() <= cfg.memory_bound());
    // And it shrinks back when they go.
    assert_eq!(d.status(&unmap(1, 0, u64::MAX >> 16)), OK);
    assert!(shadow.is_empty());
    assert!(d.dev.memory_estimate() < est0 + 4096);
}

/// Issue 16, 2.6: past `Limits::max_host_records` a MAP (or an ATTACH replay) gets NOMEM and
/// leaves the host and the engine unchanged, so the records stay under the memory bound.
#[test]
fn host_records_past_the_cap_give_nomem() {
    let cfg = ViommuConfig {
        bypass: false,
        limits: Limits {
            max_host_records: 200,
            ..Default::default()
        },
        ..Default::default()
    };
    let (mut d, host, shadow) = shadowed(cfg.clone());
    for i in 0..4u64 {
        d.reset_data();
        let iova = 0x100_0000 + i * 64 * P;
        let s = d.status(&map(1, iova, iova + 64 * P - 1, 0, RW));
        assert_eq!(s, if i < 3 { OK } else { NOMEM }, "map {i}");
        assert!(d.dev.memory_estimate() <= cfg.memory_bound());
    }
    assert_eq!(d.dev.domains().mappings(1).unwrap().len(), 3);
    assert_eq!(host.mappings().len(), 3 * 64, "the refused MAP was undone");
    assert_eq!(shadow.len(), 3);
    // Single-page mappings still fit up to the cap: 192 + 8.
    for i in 0..9u64 {
        d.reset_data();
        let s = d.status(&map(1, i * P, (i + 1) * P - 1, 0, RW));
        assert_eq!(s, if i < 8 { OK } else { NOMEM }, "page {i}");
    }
    assert_eq!(host.mappings().len(), 200);
    // A second container joining the domain would record all 11 mappings again: refused.
    let host2 = Arc::new(RecordingMapper::new());
    let shadow2 = Arc::new(Shadow::new(host2.clone(), fragmented_ram()));
    d.dev.add_host_endpoint(EPS[1], shadow2.clone()).unwrap();
    assert_eq!(d.status(&attach(1, EPS[1], 0)), NOMEM);
    assert!(host2.mappings().is_empty() && shadow2.is_empty());
    assert_eq!(d.dev.domains().endpoint_domain(EPS[1]), Some(None));
    // Room again after an UNMAP.
    assert_eq!(d.status(&unmap(1, 0x100_0000, 0x100_0000 + 64 * P - 1)), OK);
    assert_eq!(
        d.status(&map(1, 0x200_0000, 0x200_0000 + 64 * P - 1, 0, RW)),
        OK
    );
}
