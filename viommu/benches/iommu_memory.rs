//! The cost of one device access behind the vIOMMU through vm-memory's `IommuMemory` (the
//! endpoint as its `vm_memory::Iommu`) next to `TranslatedMemory` and to guest-physical memory
//! (run with `cargo bench -p viommu --bench iommu_memory`): an 8-byte read (`read_u64/*`, a
//! ring access) and a 1500-byte copy (`read_1500/*`, a packet), at a mapped IOVA, one domain
//! of 64 one-page mappings. The figures are quoted in the `vm_iommu` module doc.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use viommu::spec::{MAP_F_READ, MAP_F_WRITE};
use viommu::test_utils::{MockDriver, MockLayout, NoInterrupt};
use viommu::{Status, TranslatedMemory, Viommu, ViommuConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};

const EP: u32 = 0x08;
const IOVA: u64 = 0x1_0000_0000;
const GPA: u64 = 0x10_0000;
const PAGES: u64 = 64;

fn bench(c: &mut Criterion) {
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let mut dev = Viommu::new(ViommuConfig::default()).unwrap();
    let ep = dev.add_endpoint(EP).unwrap();
    let mut drv = MockDriver::new(ram.clone(), MockLayout::packed(0, 0x1_0000, 16, 16)).unwrap();
    drv.activate_offered(&mut dev, Arc::new(NoInterrupt))
        .unwrap();
    assert_eq!(drv.attach(&mut dev, 1, EP).unwrap(), Status::Ok);
    for p in 0..PAGES {
        let (iova, gpa) = (IOVA + (p << 12), GPA + (p << 12));
        let st = drv.map(&mut dev, 1, iova, 0x1000, gpa, MAP_F_READ | MAP_F_WRITE);
        assert_eq!(st.unwrap(), Status::Ok);
    }
    let tm = TranslatedMemory::new(ram.clone(), ep.clone());
    let im = IommuMemory::new(ram.clone(), ep, true, ());
    // Mid-domain, and a packet crossing a page (so two mappings) for the copies.
    let mid = (PAGES / 2) << 12;
    let at = GuestAddress(IOVA + mid + 0x10);
    let pkt = GuestAddress(IOVA + mid + 0x800);
    let phys = GuestAddress(GPA + mid + 0x10);
    assert_eq!(
        tm.read_obj::<u64>(at).unwrap(),
        im.read_obj::<u64>(at).unwrap()
    );

    let mut g = c.benchmark_group("read_u64");
    g.bench_function("direct", |b| {
        b.iter(|| black_box(ram.read_obj::<u64>(black_box(phys)).unwrap()))
    });
    g.bench_function("translated", |b| {
        b.iter(|| black_box(tm.read_obj::<u64>(black_box(at)).unwrap()))
    });
    g.bench_function("iommu_memory", |b| {
        b.iter(|| black_box(im.read_obj::<u64>(black_box(at)).unwrap()))
    });
    g.finish();

    let mut g = c.benchmark_group("read_1500");
    let mut buf = vec![0u8; 1500];
    g.bench_function("translated_read_into", |b| {
        b.iter(|| tm.read_into(black_box(&mut buf), black_box(pkt)).unwrap())
    });
    g.bench_function("iommu_memory", |b| {
        b.iter(|| im.read_slice(black_box(&mut buf), black_box(pkt)).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    targets = bench
}
criterion_main!(benches);
