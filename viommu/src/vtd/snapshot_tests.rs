//! A unit brought up as Linux does (root table, queued invalidation, translation, a paging
//! domain and a pass-through context, a recorded fault), saved and restored into a fresh unit
//! over the same guest memory; corrupt and hostile blobs refused.

use super::super::{MsiSender, Unit, UnitConfig};
use crate::engine::endpoint::EndpointHandle;
use crate::engine::mapping::Access;
use crate::engine::translate::TranslatedMemory;
use crate::snapshot::SnapshotError;
use crate::vtd::caps::{AddressWidth, FAULT_RECORD_OFFSET};
use crate::vtd::regs::{offset, MsiMessage};
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

const RAM: u64 = 32 << 20;
const ROOT: u64 = 0x1_0000;
const CONTEXT: u64 = 0x1_1000;
const QUEUE: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const SLPT: u64 = 0x10_0000;
const DISK: u16 = 0x20;
const NET: u16 = 0x28;

#[derive(Default)]
struct Msis(Mutex<Option<MsiMessage>>);

impl MsiSender for Msis {
    fn send(&self, _: MsiMessage) {}
    fn program(&self, msi: MsiMessage) {
        *self.0.lock().unwrap() = Some(msi);
    }
}

struct Guest {
    unit: Unit,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    msis: Arc<Msis>,
    disk: EndpointHandle,
    net: EndpointHandle,
}

impl Guest {
    fn over(mem: GuestMemoryAtomic<GuestMemoryMmap>) -> Self {
        let msis = Arc::new(Msis::default());
        let unit = Unit::new(UnitConfig::default(), mem.clone(), msis.clone());
        let disk = unit.add_endpoint(DISK).unwrap();
        let net = unit.add_endpoint(NET).unwrap();
        Guest {
            unit,
            mem,
            msis,
            disk,
            net,
        }
    }

    fn new() -> Self {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        Self::over(GuestMemoryAtomic::new(m))
    }

    fn w32(&self, off: u64, v: u32) {
        self.unit.write(off, &v.to_le_bytes());
    }
    fn w64(&self, off: u64, v: u64) {
        self.unit.write(off, &v.to_le_bytes());
    }
    fn r64(&self, off: u64) -> u64 {
        let mut b = [0; 8];
        self.unit.read(off, &mut b);
        u64::from_le_bytes(b)
    }
    fn put(&self, addr: u64, v: u64) {
        self.mem.memory().write_obj(v, GuestAddress(addr)).unwrap();
    }

    /// Descriptors then a wait with status write, one IQT write.
    fn submit(&self, tail: &mut u32, descs: &[(u64, u64)]) {
        self.put(STATUS, 0);
        let wait = (5 | 1 << 5 | 1u64 << 32, STATUS);
        for &(lo, hi) in descs.iter().chain(std::iter::once(&wait)) {
            let at = QUEUE + u64::from(*tail) * 16;
            self.put(at, lo);
            self.put(at + 8, hi);
            *tail = (*tail + 1) % 256;
        }
        self.w32(offset::IQT, *tail << 4);
    }

    /// Bring-up, DISK in domain 5 with two pages mapped, NET pass-through, the fault event
    /// registers programmed and a fault of DISK on an unmapped page recorded.
    fn set_up(&self) {
        let mut tail = 0;
        self.w64(offset::RTADDR, ROOT);
        self.w32(offset::GCMD, 1 << 30);
        self.w64(offset::IQA, QUEUE);
        self.w32(offset::GCMD, 1 << 26);
        self.w32(offset::FEDATA, 0x41);
        self.w32(offset::FEADDR, 0xfee0_0000);
        self.w32(offset::FECTL, 0);
        // 4-level table: one leaf table for IOVA 0..2 MiB.
        let (l3, l2, l1) = (SLPT + 0x1000, SLPT + 0x2000, SLPT + 0x3000);
        self.put(SLPT, l3 | 3);
        self.put(l3, l2 | 3);
        self.put(l2, l1 | 3);
        self.put(l1 + 8, 0x40_0000 | 3); // IOVA 0x1000 -> 0x40_0000 RW
        self.put(l1 + 16, 0x50_0000 | 1); // IOVA 0x2000 -> 0x50_0000 R
        self.put(ROOT, CONTEXT | 1);
        let slot = |sid: u16| CONTEXT + u64::from(sid & 0xff) * 16;
        self.put(slot(DISK) + 8, 2 | 5 << 8);
        self.put(slot(DISK), SLPT | 1);
        self.put(slot(NET) + 8, 2 | 6 << 8);
        self.put(slot(NET), 2 << 2 | 1); // TT = 10b: pass-through
        self.submit(&mut tail, &[(1 | 1 << 4, 0), (2 | 1 << 4, 0)]);
        self.w32(offset::GCMD, 1 << 26 | 1 << 31);
        assert_eq!(self.unit.domain_mappings(5).map(|m| m.len()), Some(2));
        // A DMA to an unmapped IOVA: a fault record.
        let mut b = [0u8; 4];
        let dev = TranslatedMemory::from_atomic(&self.mem, self.disk.clone());
        assert!(dev.read_slice(&mut b, GuestAddress(0x8000)).is_err());
        self.unit.read(offset::FSTS, &mut b);
        assert_ne!(u32::from_le_bytes(b) & 2, 0, "PPF");
    }
}

#[test]
fn round_trip_keeps_registers_domains_faults_and_views() {
    let src = Guest::new();
    src.set_up();
    let blob = src.unit.save_state();
    let regs: Vec<u64> = [
        offset::GSTS,
        offset::RTADDR,
        offset::FSTS,
        offset::FEDATA,
        offset::IQH,
        offset::IQT,
        offset::IQA,
        FAULT_RECORD_OFFSET,
        FAULT_RECORD_OFFSET + 8,
    ]
    .iter()
    .map(|&o| src.r64(o))
    .collect();

    let dst = Guest::over(src.mem.clone());
    dst.unit.restore_state(&blob).unwrap();
    let now: Vec<u64> = [
        offset::GSTS,
        offset::RTADDR,
        offset::FSTS,
        offset::FEDATA,
        offset::IQH,
        offset::IQT,
        offset::IQA,
        FAULT_RECORD_OFFSET,
        FAULT_RECORD_OFFSET + 8,
    ]
    .iter()
    .map(|&o| dst.r64(o))
    .collect();
    assert_eq!(now, regs);
    assert_eq!(dst.unit.domain_mappings(5), src.unit.domain_mappings(5));
    assert_eq!(dst.unit.endpoint_space(NET), src.unit.endpoint_space(NET));
    assert_eq!(
        dst.unit.counters().snapshot(),
        src.unit.counters().snapshot()
    );
    assert_eq!(
        *dst.msis.0.lock().unwrap(),
        Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x41
        })
    );
    // Views are live: DISK translates its pages, NET passes through.
    let v = dst.disk.view();
    assert_eq!(
        v.translate(0x1008, Access::Write).map(|m| m.gpa_of(0x1008)),
        Ok(0x40_0008)
    );
    assert!(v.translate(0x2000, Access::Write).is_err());
    assert!(dst.net.view().translate(0x1234_5000, Access::Read).is_ok());
    assert_eq!(dst.unit.save_state(), blob);
    // The restored unit keeps working: the guest's next invalidations go on from IQT.
    dst.put(SLPT + 0x3000 + 24, 0x60_0000 | 3);
    let mut tail = (regs[5] >> 4) as u32;
    dst.submit(&mut tail, &[(2 | 2 << 4 | 5 << 16, 0)]);
    assert_eq!(dst.unit.domain_mappings(5).map(|m| m.len()), Some(3));
    let status: u32 = dst.mem.memory().read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(
        status, 1,
        "the wait after the restored queue position completed"
    );
}

#[test]
fn truncated_corrupt_and_mismatched_blobs_are_refused() {
    let src = Guest::new();
    src.set_up();
    let blob = src.unit.save_state();
    for cut in (0..blob.len()).step_by(3) {
        let dst = Guest::over(src.mem.clone());
        assert!(dst.unit.restore_state(&blob[..cut]).is_err(), "cut {cut}");
        assert_eq!(dst.unit.domain_mappings(5), None);
        // Still the reset state: translation off, the endpoint identity.
        assert!(dst.disk.view().translate(0x1234_5000, Access::Read).is_ok());
    }
    for i in (0..blob.len()).step_by(5) {
        let mut bad = blob.clone();
        bad[i] ^= 0x10;
        let dst = Guest::over(src.mem.clone());
        assert!(dst.unit.restore_state(&bad).is_err(), "flip at {i}");
    }
    // Another address width: CAP differs.
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let narrow = Unit::new(
        UnitConfig {
            aw: AddressWidth::Bits39,
            ..Default::default()
        },
        GuestMemoryAtomic::new(m),
        Arc::new(Msis::default()),
    );
    narrow.add_endpoint(DISK).unwrap();
    narrow.add_endpoint(NET).unwrap();
    assert!(matches!(
        narrow.restore_state(&blob),
        Err(SnapshotError::Mismatch(_))
    ));
    // Other endpoints.
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let few = Unit::new(
        UnitConfig::default(),
        GuestMemoryAtomic::new(m),
        Arc::new(Msis::default()),
    );
    few.add_endpoint(DISK).unwrap();
    assert!(few.restore_state(&blob).is_err());
    assert_eq!(few.domain_mappings(5), None);
}
