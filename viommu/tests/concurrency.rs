//! Devices translating at full speed on other threads while the guest maps and unmaps through
//! the request queue. Checked, not assumed: every mapping's target page carries a unique tag;
//! the mapper publishes "mapping k of slot i was announced" before sending its MAP and
//! "retired" after its UNMAP (or DETACH) completed; a device read that starts after the
//! retirement must never return that tag, and one that returns a tag must not be ahead of
//! the announcement. Pinned requests (one view per request) must see a stable mapping, and
//! the UNMAP must not complete while they hold it.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};
use viommu::{TranslatedMemory, ViommuConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const EP: u32 = 0x08;
const P: u64 = 0x1000;
const SLOTS: usize = 4;
/// Target pages rotate among this many per slot.
const ROTATION: u64 = 4;
const IOVA_BASE: u64 = 0x40_0000;
const TAG_BASE: u64 = 0x80_0000;
const READERS: usize = 2;
/// The mapping loop runs at least this long...
const MIN_TIME: Duration = Duration::from_secs(3);
/// ...and then until every event was seen often enough (a loaded machine), at most this long.
const MAX_TIME: Duration = Duration::from_secs(15);
/// Events each run must see for its checks to mean something.
const MIN_UNMAPS: u64 = 500;
const MIN_READS: u64 = 1000;
const MIN_PINNED: u64 = 50;

fn iova(slot: usize) -> u64 {
    IOVA_BASE + slot as u64 * 0x10 * P
}

fn page(slot: usize, k: u64) -> u64 {
    TAG_BASE + (slot as u64 * ROTATION + k % ROTATION) * P
}

fn tag(slot: usize, k: u64) -> u64 {
    ((slot as u64) << 48) | k
}

/// What the mapper publishes per slot (epochs start at 1).
#[derive(Default)]
struct Slot {
    announced: AtomicU64,
    retired: AtomicU64,
}

#[derive(Default)]
struct Shared {
    slots: [Slot; SLOTS],
    stop: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
    pinned: AtomicU64,
}

/// Send `reqs` as one batch (one kick), like Linux flushing its queued MAP/UNMAPs.
fn batch(d: &mut Driver, reqs: &[Vec<u8>]) {
    d.reset_data();
    let mut replies = Vec::new();
    for r in reqs {
        let b = d.alloc(r.len(), 0);
        d.mem.write_slice(r, GuestAddress(b)).unwrap();
        let rep = d.alloc(4, 0xaa);
        d.queue_req(&[(b, r.len() as u32, false), (rep, 4, true)]);
        replies.push(rep);
    }
    d.kick();
    assert_eq!(d.used_req().len(), reqs.len());
    for rep in replies {
        assert_eq!(d.read(rep, 1)[0], OK);
    }
}

/// One device thread: reads the tag of random slots as fast as it can.
fn reader(tm: TranslatedMemory<GuestMemoryMmap>, shared: Arc<Shared>, seed: u64) {
    let mut x = seed | 1;
    let mut n = 0u64;
    while !shared.stop.load(SeqCst) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let slot = (x % SLOTS as u64) as usize;
        let s = &shared.slots[slot];
        n += 1;
        if n % 64 == 0 {
            // A pinned request: one view for its whole life.
            let p = tm.pin();
            let retired = s.retired.load(SeqCst);
            let first = p.read_obj::<u64>(GuestAddress(iova(slot)));
            for _ in 0..200 {
                std::hint::spin_loop();
            }
            let second = p.read_obj::<u64>(GuestAddress(iova(slot)));
            assert_eq!(first.is_ok(), second.is_ok(), "pinned view changed");
            if let (Ok(a), Ok(b)) = (&first, &second) {
                assert_eq!(a, b, "pinned mapping changed under a request");
                let k = a & 0xffff_ffff_ffff;
                assert!(
                    k > retired,
                    "pinned read of mapping {k} retired at {retired}"
                );
                assert!(
                    s.retired.load(SeqCst) < k,
                    "UNMAP of {k} completed while a request held it"
                );
            }
            drop(p);
            shared.pinned.fetch_add(1, SeqCst);
            continue;
        }
        let retired = s.retired.load(SeqCst);
        match tm.read_obj::<u64>(GuestAddress(iova(slot))) {
            Ok(t) => {
                assert_eq!(t >> 48, slot as u64, "read another slot's page");
                let k = t & 0xffff_ffff_ffff;
                assert!(
                    k > retired,
                    "slot {slot}: read mapping {k} after the UNMAP of {retired} completed"
                );
                let announced = s.announced.load(SeqCst);
                assert!(
                    k <= announced,
                    "slot {slot}: mapping {k} before it was sent"
                );
                shared.hits.fetch_add(1, SeqCst);
            }
            Err(_) => {
                shared.misses.fetch_add(1, SeqCst);
            }
        }
    }
}

struct Run {
    batches: u64,
    maps: u64,
    unmaps: u64,
    hits: u64,
    misses: u64,
    pinned: u64,
}

/// Map and unmap (or attach and detach, with `detach`) the slots until the budget runs out
/// while `READERS` threads read them.
fn run(detach_mode: bool) -> Run {
    let cfg = ViommuConfig {
        bypass: false,
        ..Default::default()
    };
    let (mut d, h) = Driver::new(cfg, &[EP], None);
    let shared = Arc::new(Shared::default());
    let threads: Vec<_> = (0..READERS)
        .map(|i| {
            let tm = TranslatedMemory::new(d.mem.clone(), h[0].clone());
            let sh = shared.clone();
            std::thread::spawn(move || {
                reader(tm, sh, 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1))
            })
        })
        .collect();
    if !detach_mode {
        batch(&mut d, &[attach(1, EP, 0)]);
    }
    let mut epoch = [0u64; SLOTS];
    let mut mapped = [false; SLOTS];
    let (mut batches, mut maps, mut unmaps) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let mut round = 0u64;
    let enough = |unmaps: u64, sh: &Shared| {
        unmaps >= MIN_UNMAPS
            && sh.hits.load(SeqCst) >= MIN_READS
            && sh.misses.load(SeqCst) >= MIN_READS
            && sh.pinned.load(SeqCst) >= MIN_PINNED
    };
    while start.elapsed() < MIN_TIME || (!enough(unmaps, &shared) && start.elapsed() < MAX_TIME) {
        round += 1;
        // Toggle a varying subset of slots in one batch.
        let mut reqs = Vec::new();
        let mut done = Vec::new();
        for slot in 0..SLOTS {
            if detach_mode && slot > 0 {
                break;
            }
            if (round >> slot) & 1 == 0 && round % 3 != 0 {
                continue;
            }
            if mapped[slot] {
                reqs.push(if detach_mode {
                    detach(1, EP)
                } else {
                    unmap(1, iova(slot), iova(slot) + P - 1)
                });
                done.push((slot, false));
            } else {
                let k = epoch[slot] + 1;
                d.mem
                    .write_obj(tag(slot, k), GuestAddress(page(slot, k)))
                    .unwrap();
                shared.slots[slot].announced.store(k, SeqCst);
                epoch[slot] = k;
                if detach_mode {
                    reqs.push(attach(1, EP, 0));
                }
                reqs.push(map(1, iova(slot), iova(slot) + P - 1, page(slot, k), R));
                done.push((slot, true));
            }
        }
        if reqs.is_empty() {
            continue;
        }
        batch(&mut d, &reqs);
        batches += 1;
        for (slot, was_map) in done {
            mapped[slot] = was_map;
            if was_map {
                maps += 1;
            } else {
                unmaps += 1;
                shared.slots[slot].retired.store(epoch[slot], SeqCst);
            }
        }
    }
    shared.stop.store(true, SeqCst);
    for t in threads {
        t.join().expect("a reader saw a stale translation");
    }
    Run {
        batches,
        maps,
        unmaps,
        hits: shared.hits.load(SeqCst),
        misses: shared.misses.load(SeqCst),
        pinned: shared.pinned.load(SeqCst),
    }
}

fn check(r: &Run, what: &str) {
    eprintln!(
        "{what}: {} batches, {} maps, {} unmaps; readers: {} hits, {} misses, {} pinned",
        r.batches, r.maps, r.unmaps, r.hits, r.misses, r.pinned
    );
    // Enough of every event for the checks above to mean something.
    assert!(r.unmaps >= MIN_UNMAPS, "{what}: only {} unmaps", r.unmaps);
    assert!(
        r.hits >= MIN_READS && r.misses >= MIN_READS,
        "{what}: readers too slow"
    );
    assert!(
        r.pinned >= MIN_PINNED,
        "{what}: {} pinned requests",
        r.pinned
    );
}

#[test]
fn no_translation_survives_a_completed_unmap() {
    let r = run(false);
    check(&r, "map/unmap");
}

#[test]
fn no_translation_survives_a_completed_detach() {
    let r = run(true);
    check(&r, "attach/detach");
}

/// The deterministic case the stress test found: a request pins a view, a later MAP of
/// something else publishes a newer one (no wait: nothing was removed), then an UNMAP of the
/// pinned mapping must still wait for that request, though it no longer holds the view the
/// UNMAP replaces.
#[test]
fn unmap_waits_for_a_request_pinned_before_an_intervening_map() {
    let cfg = ViommuConfig {
        bypass: false,
        ..Default::default()
    };
    let (mut d, h) = Driver::new(cfg, &[EP], None);
    let tm = TranslatedMemory::new(d.mem.clone(), h[0].clone());
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x10000, 0x10fff, 0x50000, RW)), OK);
    let pinned = tm.pin();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let mut b = [0u8; 4];
        pinned.read_slice(&mut b, GuestAddress(0x10000)).unwrap();
        tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        pinned.write_slice(&[7; 4], GuestAddress(0x10000)).unwrap();
        done2.store(true, SeqCst);
    });
    rx.recv().unwrap();
    assert_eq!(d.status(&map(1, 0x20000, 0x20fff, 0x60000, RW)), OK);
    assert_eq!(d.status(&unmap(1, 0x10000, 0x10fff)), OK);
    assert!(
        done.load(SeqCst),
        "UNMAP completed while a request still used the mapping"
    );
    t.join().unwrap();
    assert_eq!(d.read(0x50000, 4), vec![7; 4]);
}

/// A request pinned at `pin` while `op` removes its access: `op` must not return before the
/// request finished (it reads, holds the view 200 ms, writes through it). Returns whether
/// the write happened through the old view.
fn removal_waits_for(
    d: &mut Driver,
    tm: &TranslatedMemory<GuestMemoryMmap>,
    iova: u64,
    op: impl FnOnce(&mut Driver),
    what: &str,
) {
    let pinned = tm.pin();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let mut b = [0u8; 4];
        pinned.read_slice(&mut b, GuestAddress(iova)).unwrap();
        tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        pinned.write_slice(&[7; 4], GuestAddress(iova)).unwrap();
        done2.store(true, SeqCst);
    });
    rx.recv().unwrap();
    op(d);
    assert!(
        done.load(SeqCst),
        "{what} completed while a request still used the old view"
    );
    t.join().unwrap();
}

/// Issue 16, 2.2: an endpoint unattached while `bypass=1` reaches all guest RAM; ATTACH to a
/// paging domain removes that, so it must wait for a request that pinned the identity view.
#[test]
fn attach_from_bypass_waits_for_a_request_pinned_on_identity() {
    let cfg = ViommuConfig {
        bypass: true,
        ..Default::default()
    };
    let (mut d, h) = Driver::new(cfg, &[EP], None);
    let tm = TranslatedMemory::new(d.mem.clone(), h[0].clone());
    removal_waits_for(
        &mut d,
        &tm,
        0x50000,
        |d| assert_eq!(d.status(&attach(1, EP, 0)), OK),
        "ATTACH",
    );
    assert_eq!(d.read(0x50000, 4), vec![7; 4]);
    assert!(tm.read_obj::<u32>(GuestAddress(0x50000)).is_err());
}

/// `config.bypass` 1 -> 0 blocks unattached endpoints: it waits for identity pins too.
#[test]
fn bypass_off_waits_for_a_request_pinned_on_identity() {
    let cfg = ViommuConfig {
        bypass: true,
        ..Default::default()
    };
    let (mut d, h) = Driver::new(cfg, &[EP], None);
    let tm = TranslatedMemory::new(d.mem.clone(), h[0].clone());
    removal_waits_for(&mut d, &tm, 0x50000, |d| d.set_bypass(false), "bypass=0");
    assert_eq!(d.read(0x50000, 4), vec![7; 4]);
    assert!(tm.read_obj::<u32>(GuestAddress(0x50000)).is_err());
}

/// A device reset detaches every endpoint: it waits for requests pinned on a mapping, and on
/// a bypass domain.
#[test]
fn reset_waits_for_pinned_requests() {
    use virtio_dev::VirtioDevice;
    for bypass_domain in [false, true] {
        let cfg = ViommuConfig {
            bypass: false,
            ..Default::default()
        };
        let (mut d, h) = Driver::new(cfg, &[EP], None);
        let tm = TranslatedMemory::new(d.mem.clone(), h[0].clone());
        let iova = if bypass_domain {
            assert_eq!(d.status(&attach(1, EP, 1)), OK);
            0x50000
        } else {
            assert_eq!(d.status(&attach(1, EP, 0)), OK);
            assert_eq!(d.status(&map(1, 0x10000, 0x10fff, 0x50000, RW)), OK);
            0x10000
        };
        removal_waits_for(&mut d, &tm, iova, |d| d.dev.reset(), "reset");
        assert_eq!(d.read(0x50000, 4), vec![7; 4]);
        assert!(tm.read_obj::<u32>(GuestAddress(iova)).is_err());
    }
}

/// What GPA `IOVA_BASE` holds: a read of it through the endpoint is an identity read.
const IDENTITY: u64 = 0x1d1d_1d1d_1d1d_1d1d;
/// Closes each bypass run must see (each waits for the pinned readers: slower than UNMAPs on
/// a loaded machine; the bug this guards against showed within 60).
const MIN_CLOSES: u64 = 100;

/// The bypass windows: the mapper counts identity-closing operations once they completed
/// (ATTACH from bypass, `bypass=0`) and identity-opening ones before it sends them (DETACH
/// back to bypass, `bypass=1`). An identity read that started after close number C completed
/// must end before open number C was announced.
#[derive(Default)]
struct Windows {
    closed: AtomicU64,
    opened: AtomicU64,
    stop: AtomicBool,
    identity: AtomicU64,
    mapped: AtomicU64,
    denied: AtomicU64,
    pinned_identity: AtomicU64,
    slot: Slot,
}

fn bypass_reader(tm: TranslatedMemory<GuestMemoryMmap>, w: Arc<Windows>) {
    let mut n = 0u64;
    let at = GuestAddress(IOVA_BASE);
    while !w.stop.load(SeqCst) {
        n += 1;
        if n % 64 == 0 {
            let p = tm.pin();
            let closed = w.closed.load(SeqCst);
            let retired = w.slot.retired.load(SeqCst);
            let first = p.read_obj::<u64>(at);
            for _ in 0..200 {
                std::hint::spin_loop();
            }
            let second = p.read_obj::<u64>(at);
            assert_eq!(
                first.as_ref().ok(),
                second.as_ref().ok(),
                "pinned view changed"
            );
            match first {
                Ok(IDENTITY) => {
                    assert_eq!(
                        w.closed.load(SeqCst),
                        closed,
                        "identity closed while a request held the identity view"
                    );
                    w.pinned_identity.fetch_add(1, SeqCst);
                }
                Ok(t) => {
                    let k = t & 0xffff_ffff_ffff;
                    assert!(k > retired && w.slot.retired.load(SeqCst) < k);
                }
                Err(_) => {}
            }
            continue;
        }
        let closed = w.closed.load(SeqCst);
        let retired = w.slot.retired.load(SeqCst);
        match tm.read_obj::<u64>(at) {
            Ok(IDENTITY) => {
                let opened = w.opened.load(SeqCst);
                assert!(
                    opened >= closed,
                    "identity read after close {closed} completed (opens sent: {opened})"
                );
                w.identity.fetch_add(1, SeqCst);
            }
            Ok(t) => {
                let k = t & 0xffff_ffff_ffff;
                assert!(k > retired, "read mapping {k} after its DETACH completed");
                assert!(k <= w.slot.announced.load(SeqCst));
                w.mapped.fetch_add(1, SeqCst);
            }
            Err(_) => {
                w.denied.fetch_add(1, SeqCst);
            }
        }
    }
}

/// Issue 16, 2.2 under load: readers (some pinned) on an endpoint that goes from bypass to a
/// paging domain and back (ATTACH/DETACH), or from bypass to blocked and back (`bypass`
/// 0/1), while they read.
#[test]
fn no_identity_access_survives_attach_or_bypass_off() {
    let cfg = ViommuConfig {
        bypass: true,
        ..Default::default()
    };
    let (mut d, h) = Driver::new(cfg, &[EP], None);
    d.mem.write_obj(IDENTITY, GuestAddress(IOVA_BASE)).unwrap();
    let w = Arc::new(Windows::default());
    let threads: Vec<_> = (0..READERS)
        .map(|_| {
            let tm = TranslatedMemory::new(d.mem.clone(), h[0].clone());
            let w = w.clone();
            std::thread::spawn(move || bypass_reader(tm, w))
        })
        .collect();
    let start = Instant::now();
    let mut closes = 0u64;
    let mut k = 0u64;
    let enough = |closes: u64, w: &Windows| {
        closes >= MIN_CLOSES
            && w.identity.load(SeqCst) >= MIN_READS
            && w.mapped.load(SeqCst) >= MIN_READS
            && w.denied.load(SeqCst) >= MIN_READS
            && w.pinned_identity.load(SeqCst) >= MIN_PINNED
    };
    while start.elapsed() < MIN_TIME || (!enough(closes, &w) && start.elapsed() < MAX_TIME) {
        closes += 1;
        if closes % 2 == 0 {
            k += 1;
            d.mem
                .write_obj(tag(0, k), GuestAddress(page(0, k)))
                .unwrap();
            w.slot.announced.store(k, SeqCst);
            batch(
                &mut d,
                &[
                    attach(1, EP, 0),
                    map(1, IOVA_BASE, IOVA_BASE + P - 1, page(0, k), R),
                ],
            );
            w.closed.fetch_add(1, SeqCst);
            std::thread::sleep(Duration::from_micros(50));
            w.opened.fetch_add(1, SeqCst);
            batch(&mut d, &[detach(1, EP)]);
            w.slot.retired.store(k, SeqCst);
        } else {
            d.set_bypass(false);
            w.closed.fetch_add(1, SeqCst);
            std::thread::sleep(Duration::from_micros(50));
            w.opened.fetch_add(1, SeqCst);
            d.set_bypass(true);
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    w.stop.store(true, SeqCst);
    for t in threads {
        t.join().expect("a reader saw identity after it was closed");
    }
    eprintln!(
        "bypass: {closes} closes; readers: {} identity, {} mapped, {} denied, {} pinned identity",
        w.identity.load(SeqCst),
        w.mapped.load(SeqCst),
        w.denied.load(SeqCst),
        w.pinned_identity.load(SeqCst)
    );
    assert!(closes >= MIN_CLOSES, "only {closes} closes");
    assert!(
        w.identity.load(SeqCst) >= MIN_READS
            && w.mapped.load(SeqCst) >= MIN_READS
            && w.denied.load(SeqCst) >= MIN_READS,
        "readers too slow"
    );
    assert!(w.pinned_identity.load(SeqCst) >= MIN_PINNED);
}

/// Issue 16, 2.7: a request stuck in its backend (blk holds its pin across file I/O) while
/// the guest UNMAPs its buffer. The UNMAP waits the pin deadline, then revokes the old view
/// and completes; the request's later accesses see the current mappings: the write into the
/// unmapped buffer fails (guest memory untouched), the status byte, still mapped, is written.
#[test]
fn unmap_past_the_deadline_revokes_a_stuck_request() {
    let cfg = ViommuConfig {
        bypass: false,
        ..Default::default()
    };
    let (mut d, h) = Driver::new(cfg, &[EP], None);
    d.dev.set_pin_deadline(Duration::from_millis(200));
    let tm = TranslatedMemory::new(d.mem.clone(), h[0].clone());
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x10000, 0x10fff, 0x50000, RW)), OK);
    assert_eq!(d.status(&map(1, 0x20000, 0x20fff, 0x60000, RW)), OK);
    let pinned = tm.pin();
    let (started, started_rx) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        let mut b = [0u8; 4];
        pinned.read_slice(&mut b, GuestAddress(0x10000)).unwrap();
        started.send(()).unwrap();
        // The backend's file I/O, stuck until the test lets it go (or 10 s).
        let _ = release_rx.recv_timeout(Duration::from_secs(10));
        let data = pinned.write_slice(&[7; 4], GuestAddress(0x10000));
        let status = pinned.write_slice(&[1], GuestAddress(0x20000));
        (data.is_err(), status.is_ok())
    });
    started_rx.recv().unwrap();
    let t0 = Instant::now();
    assert_eq!(d.status(&unmap(1, 0x10000, 0x10fff)), OK);
    let took = t0.elapsed();
    let _ = release.send(());
    let (data_failed, status_written) = t.join().unwrap();
    assert!(
        took < Duration::from_secs(5),
        "UNMAP waited {took:?} for a stuck request"
    );
    assert!(
        took >= Duration::from_millis(200),
        "UNMAP did not wait: {took:?}"
    );
    assert!(
        data_failed,
        "a request wrote through the old view after the UNMAP completed"
    );
    assert_eq!(d.read(0x50000, 4), vec![0; 4]);
    assert!(
        status_written,
        "the still-mapped status byte was not written"
    );
    assert_eq!(d.read(0x60000, 1), vec![1]);
}

/// A device that took guest-physical addresses out of its pinned view (prepared rings, a host
/// mapper) reaches memory without the engine: its view cannot be revoked, so the UNMAP waits
/// for it past the deadline.
#[test]
fn unmap_waits_past_the_deadline_for_addresses_taken_out() {
    let cfg = ViommuConfig {
        bypass: false,
        ..Default::default()
    };
    let (mut d, h) = Driver::new(cfg, &[EP], None);
    d.dev.set_pin_deadline(Duration::from_millis(100));
    let tm = TranslatedMemory::new(d.mem.clone(), h[0].clone());
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x10000, 0x10fff, 0x50000, RW)), OK);
    let pinned = tm.pin();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let gpas = pinned.translate_quiet(0x10000, 4, viommu::Access::Write);
        assert_eq!(gpas, Some(vec![(0x50000, 4)]));
        tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        // Through the backend, as a device with prepared rings does.
        pinned
            .backend()
            .write_slice(&[7; 4], GuestAddress(0x50000))
            .unwrap();
        done2.store(true, SeqCst);
    });
    rx.recv().unwrap();
    assert_eq!(d.status(&unmap(1, 0x10000, 0x10fff)), OK);
    assert!(
        done.load(SeqCst),
        "UNMAP completed while a device still held addresses from the old view"
    );
    t.join().unwrap();
}

/// Reads from a slow backend straight into guest memory (`read_volatile_from` a file that
/// takes `delay`): one access in progress for the whole time.
struct SlowSource {
    delay: Duration,
    started: std::sync::mpsc::Sender<()>,
    wrote: Arc<AtomicBool>,
}

impl vm_memory::ReadVolatile for SlowSource {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        let _ = self.started.send(());
        std::thread::sleep(self.delay);
        let n = buf.len().min(4);
        buf.copy_from(&[9u8; 4][..n]);
        self.wrote.store(true, SeqCst);
        Ok(n)
    }
}

/// Past the deadline the UNMAP revokes the old view but still waits for an access already in
/// progress through it (here a slow read into the buffer): it never completes while a device
/// is writing through the old translation.
#[test]
fn unmap_past_the_deadline_waits_for_an_access_in_progress() {
    let cfg = ViommuConfig {
        bypass: false,
        ..Default::default()
    };
    let (mut d, h) = Driver::new(cfg, &[EP], None);
    d.dev.set_pin_deadline(Duration::from_millis(100));
    let tm = TranslatedMemory::new(d.mem.clone(), h[0].clone());
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x10000, 0x10fff, 0x50000, RW)), OK);
    let pinned = tm.pin();
    let wrote = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let mut src = SlowSource {
        delay: Duration::from_millis(500),
        started: tx,
        wrote: wrote.clone(),
    };
    let t = std::thread::spawn(move || {
        pinned
            .read_volatile_from(GuestAddress(0x10000), &mut src, 4)
            .unwrap()
    });
    rx.recv().unwrap();
    assert_eq!(d.status(&unmap(1, 0x10000, 0x10fff)), OK);
    assert!(
        wrote.load(SeqCst),
        "UNMAP completed while an access through the old view was in progress"
    );
    assert_eq!(t.join().unwrap(), 4);
    assert_eq!(d.read(0x50000, 4), vec![9; 4]);
}

/// A device's round of work (`pin_view`) announces itself once for all its accesses: an
/// UNMAP past the deadline waits for the round while it may access memory, and revokes the
/// view only while the round stepped out (`PinnedView::outside`, a flush of the backing file)
/// or ended; the round's accesses after stepping back in see the UNMAP.
#[test]
fn a_pinned_round_is_revoked_only_while_it_stepped_out() {
    for stepped_out in [true, false] {
        let cfg = ViommuConfig {
            bypass: false,
            ..Default::default()
        };
        let (mut d, h) = Driver::new(cfg, &[EP], None);
        d.dev.set_pin_deadline(Duration::from_millis(200));
        assert_eq!(d.status(&attach(1, EP, 0)), OK);
        assert_eq!(d.status(&map(1, 0x10000, 0x10fff, 0x50000, RW)), OK);
        assert_eq!(d.status(&map(1, 0x20000, 0x20fff, 0x60000, RW)), OK);
        let tm = TranslatedMemory::new(d.mem.clone(), h[0].clone());
        let (started, started_rx) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let round = tm.pin_view();
            let mut b = [0u8; 4];
            round.read_slice(&mut b, GuestAddress(0x10000)).unwrap();
            started.send(()).unwrap();
            // Blocking work, stuck until released (at most 10 s).
            let block = || {
                let _ = release_rx.recv_timeout(Duration::from_secs(10));
            };
            if stepped_out {
                round.outside(block);
            } else {
                block();
            }
            let data = round.write_slice(&[7; 4], GuestAddress(0x10000));
            let status = round.write_slice(&[1], GuestAddress(0x20000));
            (data.is_ok(), status.is_ok())
        });
        started_rx.recv().unwrap();
        // Let the round go after 800 ms whatever the UNMAP does.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(800));
            let _ = release.send(());
        });
        let t0 = Instant::now();
        assert_eq!(d.status(&unmap(1, 0x10000, 0x10fff)), OK);
        let took = t0.elapsed();
        let (data_written, status_written) = t.join().unwrap();
        releaser.join().unwrap();
        assert!(
            status_written,
            "the still-mapped status byte was not written"
        );
        if stepped_out {
            assert!(
                took >= Duration::from_millis(200) && took < Duration::from_millis(800),
                "UNMAP took {took:?}: it must revoke the stepped-out round past the deadline"
            );
            assert!(
                !data_written,
                "a round wrote through the old view after the UNMAP"
            );
            assert_eq!(d.read(0x50000, 4), vec![0; 4]);
        } else {
            assert!(
                took >= Duration::from_millis(800),
                "UNMAP took {took:?}: it completed while the round could still access memory"
            );
            // The round's write happened before the UNMAP completed, as the guest may see.
            assert!(data_written);
            assert_eq!(d.read(0x50000, 4), vec![7; 4]);
        }
    }
}
