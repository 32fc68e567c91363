//! Cost of one VT-d invalidation on the device side (`cargo bench -p viommu --bench vtd`): the
//! guest changes one 4 KiB leaf of its second-level table and submits a page-selective IOTLB
//! invalidation plus a wait descriptor with one IQT write, as Linux's `qi_submit_sync` does under
//! caching mode. The unit walks the range, diffs it against the engine's mappings, hands the
//! engine the change and publishes the view before it writes the wait's status. Alternate
//! iterations map and unmap, so the figure is the mean of the two; the domain holds 1 or 10 000
//! other live mappings (the walk and the diff are range-local: the figure should stay flat).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;
use std::sync::Arc;
use viommu::vtd::regs::offset;
use viommu::vtd::regs::MsiMessage;
use viommu::vtd::unit::{MsiSender, Unit, UnitConfig};
use viommu::Limits;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

const RAM: u64 = 128 << 20;
const ROOT: u64 = 0x1_0000;
const CONTEXT: u64 = 0x1_1000;
const QUEUE: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const TABLES: u64 = 0x10_0000;
const TABLES_END: u64 = 0x100_0000;
const DATA: u64 = 0x100_0000;
const SID: u16 = 0x20;
const DID: u16 = 1;
const GCMD_TE: u32 = 1 << 31;
const GCMD_SRTP: u32 = 1 << 30;
const GCMD_QIE: u32 = 1 << 26;

struct NoMsi;

impl MsiSender for NoMsi {
    fn send(&self, _: MsiMessage) {}
}

/// A guest driver reduced to what the measurement needs.
struct Guest {
    unit: Unit,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    tail: u32,
    next_table: u64,
}

impl Guest {
    fn put(&self, addr: u64, v: u64) {
        self.mem
            .memory()
            .write_obj(v, GuestAddress(addr))
            .expect("in RAM");
    }

    fn get(&self, addr: u64) -> u64 {
        self.mem
            .memory()
            .read_obj(GuestAddress(addr))
            .expect("in RAM")
    }

    fn w32(&self, off: u64, v: u32) {
        self.unit.write(off, &v.to_le_bytes());
    }

    fn w64(&self, off: u64, v: u64) {
        self.unit.write(off, &v.to_le_bytes());
    }

    /// The descriptors and a wait with status write, one IQT write; the status must be written
    /// by the time the write returns (the unit processes the queue synchronously).
    fn submit(&mut self, descs: &[(u64, u64)]) {
        self.put(STATUS, 0);
        let wait = (5 | 1 << 5 | 1u64 << 32, STATUS);
        for &(lo, hi) in descs.iter().chain(std::iter::once(&wait)) {
            let at = QUEUE + u64::from(self.tail) * 16;
            self.put(at, lo);
            self.put(at + 8, hi);
            self.tail = (self.tail + 1) % 256;
        }
        self.w32(offset::IQT, self.tail << 4);
        assert_eq!(self.get(STATUS) as u32, 1, "wait status written");
    }

    fn alloc(&mut self) -> u64 {
        self.next_table += 0x1000;
        assert!(self.next_table < TABLES_END);
        self.next_table
    }

    /// The leaf slot for `iova` in the 4-level table at `root`, allocating tables on the way.
    fn leaf(&mut self, root: u64, iova: u64) -> u64 {
        let mut table = root;
        for l in (2..=4u32).rev() {
            let ea = table + ((iova >> (12 + 9 * (l - 1))) & 511) * 8;
            let e = self.get(ea);
            table = if e & 3 == 0 {
                let t = self.alloc();
                self.put(ea, t | 3);
                t
            } else {
                e & !0xfff
            };
        }
        table + ((iova >> 12) & 511) * 8
    }

    /// Bring-up as intel_iommu_init does it, the endpoint attached to `DID` with a 4-level table.
    fn new(live: u64) -> (Self, u64) {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("RAM");
        let mem = GuestMemoryAtomic::new(m);
        let config = UnitConfig {
            limits: Limits {
                max_mappings_per_domain: 100_000,
                ..Default::default()
            },
            ..Default::default()
        };
        let unit = Unit::new(config, mem.clone(), Arc::new(NoMsi));
        let _endpoint = unit.add_endpoint(SID).expect("endpoint");
        let mut g = Guest {
            unit,
            mem,
            tail: 0,
            next_table: TABLES,
        };
        g.w64(offset::RTADDR, ROOT);
        g.w32(offset::GCMD, GCMD_SRTP);
        g.w64(offset::IQA, QUEUE);
        g.w32(offset::IQT, 0);
        g.w32(offset::GCMD, GCMD_QIE);
        g.submit(&[(1 | 1 << 4, 0), (2 | 1 << 4, 0)]);
        g.w32(offset::GCMD, GCMD_QIE | GCMD_TE);
        let slpt = g.alloc();
        g.put(ROOT, CONTEXT | 1);
        let slot = CONTEXT + u64::from(SID & 0xff) * 16;
        g.put(slot + 8, 2 | u64::from(DID) << 8);
        g.put(slot, slpt | 1);
        // Context-cache device-selective (DID 0 under caching mode), IOTLB domain-selective.
        g.submit(&[(1 | 3 << 4 | u64::from(SID) << 32, 0), (2 | 2 << 4, 0)]);
        // The live mappings, far from the measured page: one PSI each, as Linux maps.
        for k in 0..live {
            let iova = 0x40_0000_0000 + (k << 12);
            let s = g.leaf(slpt, iova);
            g.put(s, (DATA + ((k << 12) % (64 << 20))) | 3);
            g.submit(&[psi(iova)]);
        }
        let mapped = g
            .unit
            .domain_mappings(DID)
            .map(|m| m.len() as u64)
            .unwrap_or(0);
        assert!(
            mapped >= live.min(1),
            "the live mappings reached the engine"
        );
        (g, slpt)
    }
}

/// IOTLB page-selective invalidation of one 4 KiB page in `DID`.
fn psi(iova: u64) -> (u64, u64) {
    (2 | 3 << 4 | u64::from(DID) << 16, iova)
}

fn invalidation(c: &mut Criterion) {
    let mut g = c.benchmark_group("vtd_invalidation");
    for live in [1u64, 10_000] {
        let (mut guest, slpt) = Guest::new(live);
        let iova = 0x1000_0000u64;
        let slot = guest.leaf(slpt, iova);
        let mut mapped = false;
        g.bench_with_input(BenchmarkId::new("psi_4k", live), &live, |b, _| {
            b.iter(|| {
                guest.put(slot, if mapped { 0 } else { DATA | 3 });
                mapped = !mapped;
                guest.submit(black_box(&[psi(iova)]));
            })
        });
        eprintln!(
            "vtd_invalidation/psi_4k/{live}: {}",
            guest.unit.counters().snapshot().summary_line()
        );
    }
    // 2 MiB as a guest VFIO map of pinned anonymous memory arrives: 512 leaves with scattered
    // GPAs (every other page, so no two are contiguous), one PSI with AM=9.
    let (mut guest, slpt) = Guest::new(1);
    let base = 0x2000_0000u64;
    let slots: Vec<u64> = (0..512)
        .map(|i| guest.leaf(slpt, base + (i << 12)))
        .collect();
    let mut mapped = false;
    g.bench_function("psi_2m_scattered", |b| {
        b.iter(|| {
            for (i, &s) in slots.iter().enumerate() {
                let gpa = DATA + ((i as u64) << 13);
                guest.put(s, if mapped { 0 } else { gpa | 3 });
            }
            mapped = !mapped;
            guest.submit(black_box(&[(2 | 3 << 4 | u64::from(DID) << 16, base | 9)]));
        })
    });
    eprintln!(
        "vtd_invalidation/psi_2m_scattered: {}",
        guest.unit.counters().snapshot().summary_line()
    );
    g.finish();
}

criterion_group!(benches, invalidation);
criterion_main!(benches);
