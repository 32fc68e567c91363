//! Rough timings of the two hot paths (run with `cargo bench -p viommu`):
//! device-side MAP+UNMAP through the request queue, and a translation hit, with 1 to 100 000
//! mappings already in the domain.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::hint::black_box;
use std::time::Instant;
use viommu::{Limits, TranslatedMemory, ViommuConfig};
use vm_memory::{Bytes, GuestAddress};

const EP: u32 = 0x08;

fn main() {
    for &n in &[1u64, 1_000, 100_000] {
        let cfg = ViommuConfig {
            limits: Limits {
                max_mappings_per_domain: 200_000,
                ..Default::default()
            },
            ..Default::default()
        };
        let (mut d, h) = Driver::new(cfg, &[EP], None);
        assert_eq!(d.status(&attach(1, EP, 0)), OK);
        // Pre-populate through the domain's own path, in batches of QSIZE.
        let mut i = 0;
        while i < n {
            let batch = (n - i).min(QSIZE as u64 / 2);
            for j in 0..batch {
                let k = i + j;
                let body = map(
                    1,
                    0x1_0000_0000 + (k << 12),
                    0x1_0000_0000 + (k << 12) + 0xfff,
                    0x10_0000,
                    RW,
                );
                let b = d.alloc(body.len(), 0);
                d.mem.write_slice(&body, GuestAddress(b)).unwrap();
                let r = d.alloc(4, 0);
                d.queue_req(&[(b, body.len() as u32, false), (r, 4, true)]);
            }
            d.kick();
            let used = d.used_req();
            assert_eq!(used.len() as u64, batch);
            i += batch;
            // Reuse data area.
            if i % 4096 == 0 {
                d.reset_data();
            }
        }
        d.reset_data();
        // MAP + UNMAP of one page, one kick each (worst case: no batching).
        let mb = map(1, 0x1000, 0x1fff, 0x20_0000, RW);
        let ub = unmap(1, 0x1000, 0x1fff);
        let (mapb, unmapb, reply) = (d.alloc(mb.len(), 0), d.alloc(ub.len(), 0), d.alloc(4, 0));
        d.mem.write_slice(&mb, GuestAddress(mapb)).unwrap();
        d.mem.write_slice(&ub, GuestAddress(unmapb)).unwrap();
        let iters = 20_000;
        let t = Instant::now();
        for _ in 0..iters {
            d.queue_req(&[(mapb, mb.len() as u32, false), (reply, 4, true)]);
            d.kick();
            d.queue_req(&[(unmapb, ub.len() as u32, false), (reply, 4, true)]);
            d.kick();
        }
        let per_req = t.elapsed().as_nanos() as f64 / (2 * iters) as f64;
        assert_eq!(d.used_req().len(), 2 * iters);
        assert_eq!(d.read(reply, 1)[0], 0);
        // MAP + UNMAP batched: QSIZE/2 chains per kick.
        let t = Instant::now();
        let rounds = 5_000;
        for _ in 0..rounds {
            for _ in 0..QSIZE / 4 {
                d.queue_req(&[(mapb, mb.len() as u32, false), (reply, 4, true)]);
                d.queue_req(&[(unmapb, ub.len() as u32, false), (reply, 4, true)]);
            }
            d.kick();
        }
        let per_req_batched =
            t.elapsed().as_nanos() as f64 / (rounds * (QSIZE as usize / 2)) as f64;
        d.used_req();

        // Translation hit: 8-byte read at a mapped IOVA.
        let tm = TranslatedMemory::new(d.mem.clone(), h[0].clone());
        let iova = GuestAddress(0x1_0000_0000 + ((n / 2) << 12) + 0x10);
        let iters = 2_000_000;
        let t = Instant::now();
        for _ in 0..iters {
            black_box(tm.read_obj::<u64>(black_box(iova)).unwrap());
        }
        let hit = t.elapsed().as_nanos() as f64 / iters as f64;
        // Translation with a cold cache (alternating two far-apart mappings).
        let iova2 = GuestAddress(0x1_0000_0000 + 0x10);
        let t = Instant::now();
        for i in 0..iters {
            let a = if i & 1 == 0 { iova } else { iova2 };
            black_box(tm.read_obj::<u64>(black_box(a)).unwrap());
        }
        let miss = t.elapsed().as_nanos() as f64 / iters as f64;
        println!(
            "mappings={n:>6}: MAP/UNMAP per request {per_req:6.0} ns (kick each), \
             {per_req_batched:6.0} ns (batched); translate hit {hit:5.1} ns, \
             cache-miss lookup {miss:5.1} ns"
        );
    }
}
