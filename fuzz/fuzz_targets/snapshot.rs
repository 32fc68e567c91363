//! libFuzzer entry point for loading saved vIOMMU state: the input, as a blob (and, with a
//! valid frame and checksum put around it, as a payload) restored into a fresh engine, a fresh
//! activated virtio-iommu and a fresh VT-d unit. Invariants besides "no panic, no ASan
//! report": a refused blob leaves no domain behind and the engine stays within the limits'
//! memory bound; what an accepted blob restored saves back, and restores again to the same
//! state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use viommu::snapshot::frame;
use viommu::vtd::regs::MsiMessage;
use viommu::vtd::unit::{MsiSender, Unit, UnitConfig};
use viommu::{Engine, Fault, FaultSink, Geometry, Limits};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

#[derive(Debug)]
struct NoFaults;

impl FaultSink for NoFaults {
    fn report(&self, _: Fault) -> bool {
        false
    }
}

struct NoMsi;

impl MsiSender for NoMsi {
    fn send(&self, _: MsiMessage) {}
}

fn limits() -> Limits {
    Limits {
        max_domains: 8,
        max_endpoints: 8,
        max_mappings_per_domain: 256,
        max_total_mappings: 512,
        max_host_records: 1024,
    }
}

fn engine() -> Engine {
    let mut e = Engine::new(
        Geometry::default(),
        limits(),
        Vec::new(),
        true,
        Arc::new(NoFaults),
    );
    for id in [0x08, 0x10] {
        let _ = e.add_endpoint(id, None);
    }
    e
}

fn unit() -> Unit {
    let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let u = Unit::new(
        UnitConfig {
            limits: limits(),
            ..Default::default()
        },
        GuestMemoryAtomic::new(m),
        Arc::new(NoMsi),
    );
    for sid in [0x20, 0x28] {
        let _ = u.add_endpoint(sid);
    }
    u
}

fuzz_target!(|data: &[u8]| {
    let (kind, payload) = match data.split_first() {
        Some((k, p)) => (*k, p),
        None => return,
    };
    let framed = |tag: [u8; 4]| frame(tag, payload);
    match kind % 4 {
        0 | 1 => {
            let blob = if kind % 4 == 0 {
                framed(*b"ENGN")
            } else {
                payload.to_vec()
            };
            let mut e = engine();
            match e.restore_state(&blob) {
                Ok(()) => {
                    let saved = e.save_state();
                    let mut again = engine();
                    again.restore_state(&saved).expect("a saved state restores");
                    assert_eq!(again.save_state(), saved);
                }
                Err(_) => assert_eq!(e.space_count(), 0),
            }
            assert!(e.memory_estimate() <= limits().memory_bound());
        }
        2 => {
            let u = unit();
            if u.restore_state(&framed(*b"VTD1")).is_err() {
                assert_eq!(u.domain_mappings(1), None);
            }
            assert!(u.memory_estimate() <= limits().memory_bound());
        }
        _ => {
            let cfg = viommu::ViommuConfig {
                limits: limits(),
                ..Default::default()
            };
            let Ok(mut dev) = viommu::Viommu::new(cfg) else {
                return;
            };
            let _ = dev.add_endpoint(0x08);
            if dev.restore_state(&framed(*b"VIOM")).is_err() {
                assert_eq!(dev.domains().domain_count(), 0);
            }
        }
    }
});
