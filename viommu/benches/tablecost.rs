//! Where MAP/UNMAP time goes in the rules and the engine (run with
//! `cargo bench -p viommu --bench tablecost`).

use std::sync::Arc;
use std::time::Instant;
use viommu::FaultReporter;
use viommu::{Domains, Geometry, Limits};

fn main() {
    for &n in &[1u64, 1_000, 100_000] {
        for publish in [false, true] {
            let mut d = Domains::new(
                Geometry::default(),
                Limits {
                    max_mappings_per_domain: 200_000,
                    ..Default::default()
                },
                Vec::new(),
                true,
                Arc::new(FaultReporter::new(Default::default(), Default::default())),
            );
            let _h = d.add_endpoint(8, None).unwrap();
            d.attach(1, 8, 0);
            for k in 0..n {
                d.map(
                    1,
                    0x1_0000_0000 + (k << 12),
                    0x1_0000_0000 + (k << 12) + 0xfff,
                    0,
                    3,
                );
            }
            d.publish();
            let iters = 200_000;
            let t = Instant::now();
            for _ in 0..iters {
                d.map(1, 0x1000, 0x1fff, 0x2000, 3);
                if publish {
                    d.publish();
                }
                d.unmap(1, 0x1000, 0x1fff);
                if publish {
                    d.publish();
                }
            }
            let ns = t.elapsed().as_nanos() as f64 / (2 * iters) as f64;
            println!("n={n:>6} publish={publish}: {ns:6.0} ns per request");
        }
    }
}
