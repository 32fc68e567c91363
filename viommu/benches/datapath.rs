//! The device's hot paths, with criterion (run with `cargo bench -p viommu --bench datapath`;
//! `make bench` runs it short and puts the figures in its report):
//!
//! - `map_unmap_request/N`: one request through the device end to end, from the kick of the
//!   request queue (the chain already on it) to the host mapper (a recording mapper behind a
//!   host endpoint attached to the domain) and the used ring; requests alternate MAP and UNMAP of
//!   one page, one kick each (no batching), with N mappings already live in the domain. Only the
//!   device side is timed (the driver's descriptor writes cost another ~25%).
//! - `translate_hit/N`: an 8-byte DMA read at a mapped IOVA through [`TranslatedMemory`] (the
//!   datapath of an emulated device behind the vIOMMU), N live mappings, same IOVA every time.
//! - `translate_alternating/N`: the same alternating between two far-apart mappings.
//! - `read_u64/direct`, `read_u64/pinned` and `read_u64/round`: the same 8-byte read from
//!   guest-physical memory, through a pinned copy (`pin`: each access marked in progress) and
//!   through one round's pinned view (`pin_view`, what blk and net do: marked once per round).
//! - `attach_replay/10000`: ATTACH of a host endpoint to a domain holding 10 000 mappings, which
//!   replays every mapping to the endpoint's host mapper (the DETACH that resets it is untimed).
//!
//! Criterion writes `target/criterion/<group>/<N>/new/estimates.json` (times in ns per
//! iteration = per request / per translation / per ATTACH).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use viommu::{HostMapError, HostMapper, Limits, Prot, TranslatedMemory, Viommu, ViommuConfig};
use vm_memory::{Bytes, GuestAddress};

/// Emulated endpoint (translation through `TranslatedMemory`).
const EP: u32 = 0x08;
/// Host endpoint (mappings mirrored to a host mapper).
const HOST_EP: u32 = 0x10;
/// First IOVA of the pre-populated mappings.
const BASE: u64 = 0x1_0000_0000;

/// A host mapper that records the mapping set and counts calls, checking overlaps like VFIO
/// type1 (the same work as `viommu::RecordingMapper` minus its call log, which
/// would grow without bound over millions of iterations).
#[derive(Default)]
struct CountingMapper {
    mappings: Mutex<BTreeMap<u64, (u64, u64, Prot)>>,
    calls: AtomicU64,
}

impl HostMapper for CountingMapper {
    fn map(&self, iova: u64, size: u64, gpa: u64, prot: Prot) -> Result<(), HostMapError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let last = iova
            .checked_add(size.checked_sub(1).ok_or(HostMapError::Invalid)?)
            .ok_or(HostMapError::OutOfRange)?;
        let mut m = self.mappings.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((&start, &(sz, _, _))) = m.range(..=last).next_back() {
            if start + (sz - 1) >= iova {
                return Err(HostMapError::Invalid);
            }
        }
        m.insert(iova, (size, gpa, prot));
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), HostMapError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut m = self.mappings.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(&iova) {
            Some(&(sz, _, _)) if sz == size => {
                m.remove(&iova);
                Ok(())
            }
            _ => Err(HostMapError::Invalid),
        }
    }
}

/// Room for 100 000 mappings; no boot bypass, so that an unattached host endpoint holds nothing
/// (the ATTACH replay then measures exactly the domain's mappings).
fn config() -> ViommuConfig {
    ViommuConfig {
        bypass: false,
        limits: Limits {
            max_mappings_per_domain: 200_000,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// One request, completed; returns its status byte (the ATTACH bench).
fn one(d: &mut Driver, body: u64, len: u32, reply: u64) -> u8 {
    d.queue_req(&[(body, len, false), (reply, 4, true)]);
    d.kick();
    d.read(reply, 1)[0]
}

/// Adds `n` one-page mappings at `BASE..` to `domain`, through the request queue in batches.
fn populate(d: &mut Driver, domain: u32, n: u64) {
    let mut i = 0;
    while i < n {
        let batch = (n - i).min(QSIZE as u64 / 2);
        for j in 0..batch {
            let k = i + j;
            let body = map(
                domain,
                BASE + (k << 12),
                BASE + (k << 12) + 0xfff,
                0x10_0000,
                RW,
            );
            let b = d.alloc(body.len(), 0);
            d.mem.write_slice(&body, GuestAddress(b)).unwrap();
            let r = d.alloc(4, 0xaa);
            d.queue_req(&[(b, body.len() as u32, false), (r, 4, true)]);
        }
        d.kick();
        assert_eq!(d.used_req().len() as u64, batch);
        i += batch;
        d.reset_data();
    }
}

/// A request body written once into guest memory.
fn place(d: &mut Driver, body: &[u8]) -> (u64, u32) {
    let a = d.alloc(body.len(), 0);
    d.mem.write_slice(body, GuestAddress(a)).unwrap();
    (a, body.len() as u32)
}

fn map_unmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("map_unmap_request");
    g.throughput(Throughput::Elements(1));
    for &n in &[1u64, 1_000, 100_000] {
        let mut dev = Viommu::new(config()).unwrap();
        let mapper = Arc::new(CountingMapper::default());
        dev.add_host_endpoint(HOST_EP, mapper.clone()).unwrap();
        let mut d = Driver::with_device(dev, None);
        assert_eq!(d.status(&attach(1, HOST_EP, 0)), OK);
        populate(&mut d, 1, n);
        assert_eq!(mapper.mappings.lock().unwrap().len() as u64, n);
        let (mb, ml) = place(&mut d, &map(1, 0x1000, 0x1fff, 0x20_0000, RW));
        let (ub, ul) = place(&mut d, &unmap(1, 0x1000, 0x1fff));
        let reply = d.alloc(4, 0xaa);
        let calls_before = mapper.calls.load(Ordering::Relaxed);
        let mut mapped = false;
        let mut ran = 0u64;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            // Only the device's side is timed: the kick (queue_notify) pops the chain, parses,
            // updates the domain, mirrors to the host mapper, publishes and completes. The
            // driver's descriptor writes and the status check are outside the clock.
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (body, len) = if mapped { (ub, ul) } else { (mb, ml) };
                    d.queue_req(&[(body, len, false), (reply, 4, true)]);
                    let t = Instant::now();
                    d.kick();
                    total += t.elapsed();
                    assert_eq!(d.read(reply, 1)[0], OK);
                    mapped = !mapped;
                    ran += 1;
                }
                total
            })
        });
        // Every request reached the host mapper and succeeded (unless a filter skipped it).
        if ran > 0 {
            assert_eq!(d.read(reply, 1)[0], OK);
            assert_eq!(mapper.calls.load(Ordering::Relaxed) - calls_before, ran);
        }
    }
    g.finish();
}

fn translate(c: &mut Criterion) {
    let mut hit = c.benchmark_group("translate_hit");
    let mut fixtures = Vec::new();
    for &n in &[1u64, 1_000, 100_000] {
        let (mut d, h) = Driver::new(config(), &[EP], None);
        assert_eq!(d.status(&attach(1, EP, 0)), OK);
        populate(&mut d, 1, n);
        let tm = TranslatedMemory::new(d.mem.clone(), h[0].clone());
        let iova = GuestAddress(BASE + ((n / 2) << 12) + 0x10);
        tm.read_obj::<u64>(iova).unwrap();
        hit.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(tm.read_obj::<u64>(black_box(iova)).unwrap()))
        });
        fixtures.push((n, d, tm, iova));
    }
    hit.finish();
    let mut alt = c.benchmark_group("translate_alternating");
    for (n, _d, tm, iova) in &fixtures {
        let far = GuestAddress(BASE + 0x10);
        let mut flip = false;
        alt.bench_with_input(BenchmarkId::from_parameter(n), n, |b, _| {
            b.iter(|| {
                flip = !flip;
                let a = if flip { *iova } else { far };
                black_box(tm.read_obj::<u64>(black_box(a)).unwrap())
            })
        });
    }
    alt.finish();
    // One 8-byte read as a device's ring access makes it: straight from guest-physical memory,
    // and through a pinned translated view (one pin per request, as the devices do).
    let mut read = c.benchmark_group("read_u64");
    if let Some((_, d, tm, iova)) = fixtures.first() {
        let gpa = GuestAddress(0x10_0000);
        let mem = d.mem.clone();
        read.bench_function("direct", |b| {
            b.iter(|| black_box(mem.read_obj::<u64>(black_box(gpa)).unwrap()))
        });
        let pinned = tm.pin();
        read.bench_function("pinned", |b| {
            b.iter(|| black_box(pinned.read_obj::<u64>(black_box(*iova)).unwrap()))
        });
        // Through one round's pinned view (`pin_view`, what blk and net do per round): the
        // round is marked in progress once, not per access.
        let round = tm.pin_view();
        read.bench_function("round", |b| {
            b.iter(|| black_box(round.read_obj::<u64>(black_box(*iova)).unwrap()))
        });
    }
    read.finish();
}

fn attach_replay(c: &mut Criterion) {
    const N: u64 = 10_000;
    let mut g = c.benchmark_group("attach_replay");
    let mut dev = Viommu::new(config()).unwrap();
    let mapper = Arc::new(CountingMapper::default());
    dev.add_endpoint(EP).unwrap();
    dev.add_host_endpoint(HOST_EP, mapper.clone()).unwrap();
    let mut d = Driver::with_device(dev, None);
    // The domain lives through its emulated endpoint while the host endpoint comes and goes.
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    populate(&mut d, 1, N);
    let (ab, al) = place(&mut d, &attach(1, HOST_EP, 0));
    let (db, dl) = place(&mut d, &detach(1, HOST_EP));
    let reply = d.alloc(4, 0xaa);
    g.bench_function(BenchmarkId::from_parameter(N), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let st = one(&mut d, ab, al, reply);
                total += t.elapsed();
                assert_eq!(st, OK);
                let held = mapper.mappings.lock().unwrap().len() as u64;
                assert!(held >= N, "ATTACH replayed {held} of {N} mappings");
                assert_eq!(one(&mut d, db, dl, reply), OK);
            }
            total
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = map_unmap, translate, attach_replay
}
criterion_main!(benches);
