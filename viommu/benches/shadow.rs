//! Cost of the shadowing engine itself (run with `cargo bench -p viommu --bench shadow`): a
//! guest MAP + UNMAP through the rules and the engine into a `Shadow` over a host space that does
//! nothing, with 1 to 100 000 mappings already mirrored; i.e. what we add on top of the VFIO
//! ioctl per request.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;
use viommu::spec::{MAP_F_READ, MAP_F_WRITE};
use viommu::FaultReporter;
use viommu::{DmaSpace, HostMapError, HostMapper, Prot};
use viommu::{Domains, Geometry, Limits};
use viommu::{Shadow, Status};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// A host address space that accepts everything.
struct Null;

impl DmaSpace for Null {
    unsafe fn map(&self, _: u64, _: u64, _: u64, _: Prot) -> Result<(), HostMapError> {
        Ok(())
    }
    fn unmap(&self, _: u64, _: u64) -> Result<(), HostMapError> {
        Ok(())
    }
}

fn main() {
    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x8000_0000),
            (GuestAddress(0x1_0000_0000), 0x4000_0000),
        ])
        .unwrap(),
    );
    for &n in &[1u64, 1_000, 100_000] {
        let mut d = Domains::new(
            Geometry::default(),
            Limits {
                max_mappings_per_domain: 200_000,
                ..Default::default()
            },
            Vec::new(),
            false,
            Arc::new(FaultReporter::new(Default::default(), Default::default())),
        );
        let shadow: Arc<dyn HostMapper> = Arc::new(Shadow::new(Arc::new(Null), mem.clone()));
        d.add_endpoint(8, Some(shadow)).unwrap();
        assert_eq!(d.attach(1, 8, 0), Status::Ok);
        let rw = MAP_F_READ | MAP_F_WRITE;
        for k in 0..n {
            let iova = 0x10_0000_0000 + (k << 12);
            assert_eq!(
                d.map(1, iova, iova + 0xfff, (k << 12) % 0x8000_0000, rw),
                Status::Ok
            );
        }
        let iters = 200_000u64;
        let t = Instant::now();
        for i in 0..iters {
            let gpa = (i << 12) % 0x8000_0000;
            black_box(d.map(1, 0x1000, 0x1fff, gpa, rw));
            black_box(d.unmap(1, 0x1000, 0x1fff));
            d.publish();
        }
        let ns = t.elapsed().as_nanos() as f64 / iters as f64;
        println!("MAP+UNMAP+publish (domains + shadow, null host), {n:>6} mappings: {ns:>7.0} ns");
        // The shadow alone (composition + bookkeeping), same mapping count.
        let alone = Shadow::new(Arc::new(Null), mem.clone());
        for k in 0..n {
            let iova = 0x10_0000_0000 + (k << 12);
            alone
                .map(iova, 0x1000, (k << 12) % 0x8000_0000, Prot::RW)
                .unwrap();
        }
        let t = Instant::now();
        for i in 0..iters {
            let gpa = (i << 12) % 0x8000_0000;
            black_box(alone.map(0x1000, 0x1000, gpa, Prot::RW)).unwrap();
            black_box(alone.unmap(0x1000, 0x1000)).unwrap();
        }
        let ns = t.elapsed().as_nanos() as f64 / iters as f64;
        println!("MAP+UNMAP in the shadow alone (null host),      {n:>6} mappings: {ns:>7.0} ns");
        // A MAP crossing the RAM region edge at 2 GiB is rejected (hole) without host calls.
        let t = Instant::now();
        for _ in 0..iters {
            black_box(d.map(1, 0x1000, 0x2fff, 0x7fff_f000, rw));
        }
        let ns = t.elapsed().as_nanos() as f64 / iters as f64;
        println!("MAP refused by the shadow (GPA runs into a hole), {n:>6} mappings: {ns:>7.0} ns");
    }
}
