//! The unit driven as Linux 6.12's intel-iommu driver drives it (bring-up, domains under caching
//! mode, page-selective flushes, context switches, faults), and as a hostile guest might.

use super::*;
use crate::engine::translate::TranslatedMemory;
use crate::vtd::caps::{FAULT_RECORD_OFFSET, IOTLB_OFFSET, IVA_OFFSET};
use crate::vtd::fault::{FECTL_IP, FSTS_IQE, FSTS_PFO, FSTS_PPF, RECORD_F, RECORD_READ};
use crate::vtd::regs::offset;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const RAM: u64 = 32 << 20;
const ROOT: u64 = 0x1_0000;
const CONTEXT: u64 = 0x1_1000;
const QUEUE: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const TABLES: u64 = 0x10_0000;
const DATA: u64 = 0x100_0000;
const DISK: u16 = 0x20; // 00:04.0
const NET: u16 = 0x28; // 00:05.0

const GCMD_TE: u32 = 1 << 31;
const GCMD_SRTP: u32 = 1 << 30;
const GCMD_QIE: u32 = 1 << 26;

#[derive(Default)]
struct Msis(Mutex<Vec<MsiMessage>>, Mutex<Option<MsiMessage>>);

impl MsiSender for Msis {
    fn send(&self, msi: MsiMessage) {
        self.0.lock().unwrap().push(msi);
    }

    fn program(&self, msi: MsiMessage) {
        *self.1.lock().unwrap() = Some(msi);
    }
}

impl Msis {
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// A guest driver: RAM, the unit, a table allocator and the invalidation queue's tail.
struct Guest {
    unit: Unit,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    msis: Arc<Msis>,
    tail: u32,
    next_table: u64,
}

fn context_cache_device(sid: u16, did: u16) -> (u64, u64) {
    (1 | 3 << 4 | u64::from(did) << 16 | u64::from(sid) << 32, 0)
}

fn iotlb_domain(did: u16) -> (u64, u64) {
    (2 | 2 << 4 | u64::from(did) << 16, 0)
}

fn psi(did: u16, addr: u64, am: u64) -> (u64, u64) {
    (2 | 3 << 4 | u64::from(did) << 16, addr | am)
}

impl Guest {
    fn with(config: UnitConfig) -> Self {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let mem = GuestMemoryAtomic::new(m);
        let msis = Arc::new(Msis::default());
        let unit = Unit::new(config, mem.clone(), msis.clone());
        Guest {
            unit,
            mem,
            msis,
            tail: 0,
            next_table: TABLES,
        }
    }

    fn new() -> Self {
        Self::with(UnitConfig::default())
    }

    fn w32(&self, off: u64, v: u32) {
        self.unit.write(off, &v.to_le_bytes());
    }

    fn w64(&self, off: u64, v: u64) {
        self.unit.write(off, &v.to_le_bytes());
    }

    fn r32(&self, off: u64) -> u32 {
        let mut b = [0; 4];
        self.unit.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn r64(&self, off: u64) -> u64 {
        let mut b = [0; 8];
        self.unit.read(off, &mut b);
        u64::from_le_bytes(b)
    }

    fn put(&self, addr: u64, v: u64) {
        self.mem.memory().write_obj(v, GuestAddress(addr)).unwrap();
    }

    fn get(&self, addr: u64) -> u64 {
        self.mem.memory().read_obj(GuestAddress(addr)).unwrap()
    }

    fn status(&self) -> u32 {
        self.mem.memory().read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// qi_submit_sync: the descriptors and a wait with status write, one IQT write; true when
    /// the status word was written by the time the write returned.
    fn submit(&mut self, descs: &[(u64, u64)]) -> bool {
        self.put(STATUS, 0);
        let wait = (5 | 1 << 5 | 1u64 << 32, STATUS);
        for &(lo, hi) in descs.iter().chain(std::iter::once(&wait)) {
            let at = QUEUE + u64::from(self.tail) * 16;
            self.put(at, lo);
            self.put(at + 8, hi);
            self.tail = (self.tail + 1) % 256;
        }
        self.w32(offset::IQT, self.tail << 4);
        self.status() == 1
    }

    /// intel_iommu_init: PMEN, root table, queued invalidation, global flushes, TE; GSTS is
    /// checked after every command, as Linux polls it.
    fn bring_up(&mut self) {
        self.w32(offset::PMEN, 0);
        self.w64(offset::RTADDR, ROOT);
        self.w32(offset::GCMD, GCMD_SRTP);
        assert_ne!(self.r32(offset::GSTS) & GCMD_SRTP, 0, "RTPS");
        self.w64(offset::IQA, QUEUE);
        self.w32(offset::IQT, 0);
        self.w32(offset::GCMD, GCMD_QIE);
        assert_ne!(self.r32(offset::GSTS) & GCMD_QIE, 0, "QIES");
        assert_eq!(self.r64(offset::IQH), 0);
        assert!(self.submit(&[(1 | 1 << 4, 0), (2 | 1 << 4, 0)]));
        self.w32(offset::GCMD, GCMD_QIE | GCMD_TE);
        assert_ne!(self.r32(offset::GSTS) & GCMD_TE, 0, "TES");
    }

    fn alloc(&mut self) -> u64 {
        self.next_table += 0x1000;
        assert!(self.next_table < DATA);
        self.next_table
    }

    fn context_slot(sid: u16) -> u64 {
        CONTEXT + u64::from(sid & 0xff) * 16
    }

    /// A context entry as Linux writes it (bus 0), then CM's invalidations with DID 0.
    fn set_context(&mut self, sid: u16, lo: u64, hi: u64) {
        self.put(ROOT, CONTEXT | 1);
        self.put(Self::context_slot(sid) + 8, hi);
        self.put(Self::context_slot(sid), lo);
        assert!(self.submit(&[context_cache_device(sid, 0), iotlb_domain(0)]));
    }

    fn attach(&mut self, sid: u16, did: u16) -> u64 {
        let slpt = self.alloc();
        self.set_context(sid, slpt | 1, 2 | u64::from(did) << 8);
        slpt
    }

    /// domain_context_clear_one: clear, flush with the old DID.
    fn detach(&mut self, sid: u16, did: u16) {
        self.put(Self::context_slot(sid), 0);
        self.put(Self::context_slot(sid) + 8, 0);
        assert!(self.submit(&[context_cache_device(sid, did), iotlb_domain(did)]));
    }

    /// The table entry for `iova` at `level` (1 = leaf table) of a 4-level table, allocating
    /// the tables on the way.
    fn slot(&mut self, root: u64, iova: u64, level: u32) -> u64 {
        let mut table = root;
        for l in ((level + 1)..=4).rev() {
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
        table + ((iova >> (12 + 9 * (level - 1))) & 511) * 8
    }

    fn map(&mut self, root: u64, iova: u64, gpa: u64, bits: u64) {
        let s = self.slot(root, iova, 1);
        self.put(s, gpa | bits);
    }

    fn map_2m(&mut self, root: u64, iova: u64, gpa: u64, bits: u64) {
        let s = self.slot(root, iova, 2);
        self.put(s, gpa | bits | 1 << 7);
    }

    fn device(&self, ep: &EndpointHandle) -> TranslatedMemory {
        TranslatedMemory::from_atomic(&self.mem, ep.clone())
    }

    fn fault_record(&self, index: u64) -> (u64, u32, u32) {
        let at = FAULT_RECORD_OFFSET + index * 16;
        (self.r64(at), self.r32(at + 8), self.r32(at + 12))
    }
}

fn dma_read(dev: &TranslatedMemory, iova: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    dev.read_into(&mut b, GuestAddress(iova)).ok()?;
    Some(u64::from_le_bytes(b))
}

fn dma_write(dev: &TranslatedMemory, iova: u64, v: u64) -> bool {
    dev.write_from(&v.to_le_bytes(), GuestAddress(iova)).is_ok()
}

#[test]
fn registers_answer_32_and_64_bit_accesses() {
    let g = Guest::new();
    let caps = g.unit.capabilities();
    assert_eq!(g.r64(offset::CAP), caps.cap());
    assert_eq!(
        u64::from(g.r32(offset::CAP)) | u64::from(g.r32(offset::CAP + 4)) << 32,
        caps.cap()
    );
    assert_eq!(g.r64(offset::ECAP), caps.ecap());
    assert_eq!(g.r32(offset::VER), 0x10);
    // RTADDR in two halves, as a 32-bit-only driver would write it.
    g.w32(offset::RTADDR, 0x1234_5000);
    g.w32(offset::RTADDR + 4, 0x1);
    assert_eq!(g.r64(offset::RTADDR), 0x1_1234_5000);
    // IQA in one 64-bit write, read back in halves.
    g.w64(offset::IQA, 0x8_0000_2001);
    assert_eq!((g.r32(offset::IQA), g.r32(offset::IQA + 4)), (0x2001, 0x8));
    // Unimplemented offsets read 0 and ignore writes; odd sizes read 0.
    for off in [0x50u64, 0x60, 0xb8, 0x200, 0xff8] {
        g.w64(off, u64::MAX);
        assert_eq!(g.r64(off), 0, "{off:#x}");
    }
    let mut b = [0xffu8; 2];
    g.unit.read(offset::GSTS, &mut b);
    assert_eq!(b, [0, 0]);
    // GCMD settles GSTS within the write: SRTP is one-shot, RTPS stays.
    g.w32(offset::GCMD, GCMD_SRTP);
    assert_eq!(g.r32(offset::GSTS), GCMD_SRTP);
    assert_eq!(g.r32(offset::GCMD), 0, "GCMD reads 0");
}

#[test]
fn translation_off_is_identity_and_on_blocks_unconfigured_devices() {
    let mut g = Guest::new();
    let ep = g.unit.add_endpoint(DISK).unwrap();
    let dev = g.device(&ep);
    g.put(DATA, 0x1122_3344);
    assert_eq!(dma_read(&dev, DATA), Some(0x1122_3344), "boot: identity");
    g.w32(offset::FEDATA, 0x41);
    g.w32(offset::FEADDR, 0xfee0_0000);
    g.w32(offset::FECTL, 0);
    g.bring_up();
    assert_eq!(g.unit.endpoint_space(DISK), Some(None));
    // TE on, the root table is empty: the device is blocked, reason 1 recorded, MSI sent.
    assert_eq!(dma_read(&dev, DATA), None);
    assert_eq!(g.msis.count(), 1);
    assert_eq!(g.msis.0.lock().unwrap()[0].data, 0x41);
    let (addr, sid, d3) = g.fault_record(0);
    assert_eq!((addr, sid), (DATA, u32::from(DISK)));
    assert_eq!(d3 & 0xff, 1, "root entry not present");
    assert_ne!(d3 & RECORD_F, 0);
    assert_ne!(d3 & RECORD_READ, 0, "a read");
    // TE off again: identity.
    g.w32(offset::GCMD, GCMD_QIE);
    assert_eq!(g.r32(offset::GSTS) & GCMD_TE, 0);
    assert_eq!(dma_read(&dev, DATA), Some(0x1122_3344));
}

#[test]
fn linux_bring_up_map_psi_unmap_switch_and_fault() {
    let mut g = Guest::new();
    let ep = g.unit.add_endpoint(DISK).unwrap();
    let dev = g.device(&ep);
    g.bring_up();
    g.w32(offset::FEDATA, 0x42);
    g.w64(offset::FEADDR, 0xfee0_1000);
    g.w32(offset::FECTL, 0);
    assert_eq!(
        *g.msis.1.lock().unwrap(),
        Some(MsiMessage {
            address: 0xfee0_1000,
            data: 0x42
        }),
        "the sender learns the route when the guest programs it"
    );

    // A DMA domain (DID 1) for the disk.
    let slpt = g.attach(DISK, 1);
    assert_eq!(g.unit.endpoint_space(DISK), Some(Some(1)));
    assert_eq!(g.unit.domain_mappings(1), Some(vec![]));

    // dma_map_page of a buffer at IOVA 0xffff_f000 (Linux allocates top-down) + PSI.
    g.put(DATA + 0x10, 0xabcd);
    g.map(slpt, 0xffff_f000, DATA, 3);
    assert!(g.submit(&[psi(1, 0xffff_f000, 0)]));
    assert_eq!(dma_read(&dev, 0xffff_f010), Some(0xabcd));
    let c0 = g.unit.counters().snapshot();
    // The page below, contiguous in GPA, flushed as an aligned 8 KiB range (Linux rounds): one
    // MAP for the new page only; the unchanged neighbour costs nothing.
    g.map(slpt, 0xffff_e000, DATA - 0x1000, 1);
    assert!(g.submit(&[psi(1, 0xffff_e000, 1)]));
    let c1 = g.unit.counters().snapshot();
    assert_eq!((c1.maps - c0.maps, c1.unmaps - c0.unmaps), (1, 0));
    assert!(dma_read(&dev, 0xffff_e000).is_some());
    assert!(!dma_write(&dev, 0xffff_e000, 1), "read-only page");
    // The write fault: reason 5, type write.
    let (addr, sid, d3) = g.fault_record(0);
    assert_eq!((addr, sid, d3 & 0xff), (0xffff_e000, u32::from(DISK), 5));
    assert_eq!(d3 & RECORD_READ, 0);
    assert_eq!(g.msis.count(), 1);
    // Linux's handler: clear the record (F is W1C), then FSTS.
    g.w32(FAULT_RECORD_OFFSET + 12, RECORD_F);
    g.w32(offset::FSTS, FSTS_PFO);
    assert_eq!(g.r32(offset::FSTS) & FSTS_PPF, 0);

    // dma_unmap_page: clear the leaf, flush, gone before the wait's status write.
    let leaf = g.slot(slpt, 0xffff_f000, 1);
    g.put(leaf, 0);
    assert!(g.submit(&[psi(1, 0xffff_f000, 0)]));
    assert_eq!(dma_read(&dev, 0xffff_f010), None);
    let (addr, _, d3) = g.fault_record(1);
    assert_eq!(
        (addr, d3 & 0xff),
        (0xffff_f000, 6),
        "read of a non-present page"
    );
    assert_eq!(g.msis.count(), 2);
    assert_eq!(g.msis.0.lock().unwrap()[1].address, 0xfee0_1000);
    assert_eq!(
        g.unit.domain_mappings(1).unwrap().len(),
        1,
        "the read-only page stays"
    );

    // Context switch (rebind): clear, flush with the old DID, new domain 2 with its own table.
    g.detach(DISK, 1);
    assert_eq!(g.unit.endpoint_space(DISK), Some(None));
    assert_eq!(g.unit.domain_mappings(1), None, "domain 1 destroyed");
    let slpt2 = g.attach(DISK, 2);
    g.map(slpt2, 0x1000, DATA, 3);
    assert!(g.submit(&[psi(2, 0x1000, 0)]));
    assert_eq!(dma_read(&dev, 0x1010), Some(0xabcd));
    assert!(dma_write(&dev, 0x1018, 7));
    assert_eq!(g.get(DATA + 0x18), 7);
    assert_eq!(
        dma_read(&dev, 0xffff_e000),
        None,
        "old domain's mapping gone"
    );

    let s = g.unit.counters().snapshot();
    assert!(s.invalidations >= 10 && s.waits >= 8, "{s:?}");
    assert_eq!((s.faults, s.errors), (3, 0));
}

#[test]
fn pass_through_and_shared_domains() {
    let mut g = Guest::new();
    let disk = g.unit.add_endpoint(DISK).unwrap();
    let net = g.unit.add_endpoint(NET).unwrap();
    g.bring_up();
    // iommu=pt: TT = 10b, identity.
    g.set_context(DISK, 2 << 2 | 1, 2 | 5 << 8);
    g.put(DATA, 99);
    assert_eq!(dma_read(&g.device(&disk), DATA), Some(99));
    assert_eq!(g.unit.endpoint_space(DISK), Some(Some(PASS_THROUGH_SPACE)));
    // Two functions in one domain (same DID, same table) see the same mappings.
    let slpt = g.attach(NET, 3);
    g.set_context(DISK, slpt | 1, 2 | 3 << 8);
    g.map(slpt, 0x4000, DATA, 3);
    assert!(g.submit(&[psi(3, 0x4000, 0)]));
    assert_eq!(dma_read(&g.device(&net), 0x4000), Some(99));
    assert_eq!(dma_read(&g.device(&disk), 0x4000), Some(99));
    assert_eq!(g.unit.domain_mappings(3).unwrap().len(), 1);
    // TT = 01b (device-TLB, no ECAP.DT) is invalid: blocked, reason 3.
    g.set_context(NET, slpt | 1 << 2 | 1, 2 | 3 << 8);
    assert_eq!(dma_read(&g.device(&net), 0x4000), None);
    assert_eq!(g.fault_record(0).2 & 0xff, 3);
}

#[test]
fn register_based_invalidation_without_the_queue() {
    let mut g = Guest::new();
    let ep = g.unit.add_endpoint(DISK).unwrap();
    g.w64(offset::RTADDR, ROOT);
    g.w32(offset::GCMD, GCMD_SRTP);
    // CCMD global, IOTLB global, TE.
    g.w64(offset::CCMD, 1 << 63 | 1 << 61);
    assert_eq!(g.r64(offset::CCMD) >> 63, 0, "ICC clears");
    assert_eq!((g.r64(offset::CCMD) >> 59) & 3, 1, "CAIG global");
    g.w64(IOTLB_OFFSET, 1 << 63 | 1 << 60);
    g.w32(offset::GCMD, GCMD_TE);
    let slpt = g.alloc();
    g.put(ROOT, CONTEXT | 1);
    g.put(Guest::context_slot(DISK) + 8, 2 | 7 << 8);
    g.put(Guest::context_slot(DISK), slpt | 1);
    // Device-selective CCMD (SID 31:16, DID 15:0).
    g.w64(offset::CCMD, 1 << 63 | 3 << 61 | u64::from(DISK) << 16);
    assert_eq!(g.unit.endpoint_space(DISK), Some(Some(7)));
    g.map(slpt, 0x20_0000, DATA, 3);
    g.put(DATA, 5);
    // PSI through IVA + IOTLB.
    g.w64(IVA_OFFSET, 0x20_0000);
    g.w64(IOTLB_OFFSET, 1 << 63 | 3 << 60 | 7 << 32);
    assert_eq!(g.r64(IOTLB_OFFSET) >> 63, 0, "IVT clears");
    assert_eq!((g.r64(IOTLB_OFFSET) >> 57) & 3, 3, "IAIG page");
    assert_eq!(dma_read(&g.device(&ep), 0x20_0000), Some(5));
}

#[test]
fn malformed_descriptor_sets_iqe_and_the_unit_recovers() {
    let mut g = Guest::new();
    let ep = g.unit.add_endpoint(DISK).unwrap();
    g.bring_up();
    g.w32(offset::FECTL, 0);
    let slpt = g.attach(DISK, 1);
    let errors = g.unit.counters().snapshot().errors;
    let bad_at = g.tail;
    // A PASID-cache descriptor (type 7): invalid in legacy mode.
    assert!(!g.submit(&[(7, 0)]));
    assert_ne!(g.r32(offset::FSTS) & FSTS_IQE, 0);
    assert_eq!(g.r64(offset::IQH) >> 4, u64::from(bad_at));
    assert_eq!(g.msis.count(), 1, "fault event for IQE");
    assert_eq!(g.unit.counters().snapshot().errors, errors + 1);
    // Nothing is fetched while IQE is set.
    g.map(slpt, 0x5000, DATA, 3);
    assert!(!g.submit(&[psi(1, 0x5000, 0)]));
    // qi_check_fault: overwrite the bad slot with a no-op wait, clear IQE: the rest runs.
    g.put(QUEUE + u64::from(bad_at) * 16, 5);
    g.put(QUEUE + u64::from(bad_at) * 16 + 8, 0);
    g.w32(offset::FSTS, FSTS_IQE);
    assert_eq!(g.r32(offset::FSTS) & FSTS_IQE, 0);
    assert_eq!(g.status(), 1);
    assert_eq!(g.r64(offset::IQH) >> 4, u64::from(g.tail));
    g.put(DATA, 11);
    assert_eq!(dma_read(&g.device(&ep), 0x5000), Some(11));
    // Reserved bits in a wait and an IOTLB descriptor: IQE again, still no panic.
    g.w32(offset::FSTS, FSTS_IQE);
    for bad in [(5 | 1 << 8, 0), (2 | 3 << 4 | 1 << 8, 0), (0, 0)] {
        let at = g.tail;
        assert!(!g.submit(&[bad]));
        assert_eq!(g.r64(offset::IQH) >> 4, u64::from(at));
        g.put(QUEUE + u64::from(at) * 16, 5);
        g.put(QUEUE + u64::from(at) * 16 + 8, 0);
        g.w32(offset::FSTS, FSTS_IQE);
        assert_eq!(g.status(), 1);
    }
}

#[test]
fn fpd_suppresses_records_and_a_masked_event_waits_for_unmask() {
    let mut g = Guest::new();
    let ep = g.unit.add_endpoint(DISK).unwrap();
    g.bring_up();
    // FECTL.IM is set at reset: the fault is recorded, IP set, no MSI.
    let slpt = g.attach(DISK, 1);
    assert_eq!(dma_read(&g.device(&ep), 0x9000), None);
    assert_eq!(g.msis.count(), 0);
    assert_ne!(g.r32(offset::FECTL) & FECTL_IP, 0);
    g.w32(offset::FECTL, 0);
    assert_eq!(g.msis.count(), 1, "sent on unmask");
    g.w32(FAULT_RECORD_OFFSET + 12, RECORD_F);
    // FPD: qualified faults are not recorded.
    g.set_context(DISK, slpt | 1 << 1 | 1, 2 | 1 << 8);
    let dropped = g.unit.counters().snapshot().faults_dropped;
    assert_eq!(dma_read(&g.device(&ep), 0xa000), None);
    assert_eq!(g.r32(offset::FSTS) & FSTS_PPF, 0);
    assert_eq!(g.unit.counters().snapshot().faults_dropped, dropped + 1);
    assert_eq!(g.msis.count(), 1);
}

#[test]
fn fault_overflow_sets_pfo() {
    let mut g = Guest::new();
    let ep = g.unit.add_endpoint(DISK).unwrap();
    g.bring_up();
    g.attach(DISK, 1);
    let dev = g.device(&ep);
    for i in 0..(crate::vtd::caps::FAULT_RECORDS as u64 + 2) {
        assert_eq!(dma_read(&dev, 0x10_0000 + i * 0x1000), None);
    }
    assert_ne!(g.r32(offset::FSTS) & FSTS_PFO, 0);
    assert_ne!(g.r32(offset::FSTS) & FSTS_PPF, 0);
}

#[test]
fn superpages_map_as_one_run_and_split_exactly() {
    let mut g = Guest::new();
    let ep = g.unit.add_endpoint(DISK).unwrap();
    g.bring_up();
    let slpt = g.attach(DISK, 1);
    // Two adjacent 2 MiB leaves, contiguous in GPA: one engine mapping.
    g.map_2m(slpt, 0x4000_0000, 0x40_0000, 3);
    g.map_2m(slpt, 0x4020_0000, 0x60_0000, 3);
    assert!(g.submit(&[psi(1, 0x4000_0000, 10)]));
    let m = g.unit.domain_mappings(1).unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(
        (m[0].start, m[0].end, m[0].gpa),
        (0x4000_0000, 0x403f_ffff, 0x40_0000)
    );
    g.put(0x50_0008, 77);
    assert_eq!(dma_read(&g.device(&ep), 0x4010_0008), Some(77));
    // The second becomes read-only: the run is replaced by two.
    let s = g.slot(slpt, 0x4020_0000, 2);
    g.put(s, 0x60_0000 | 1 | 1 << 7);
    assert!(g.submit(&[psi(1, 0x4020_0000, 9)]));
    let m = g.unit.domain_mappings(1).unwrap();
    assert_eq!(m.len(), 2);
    assert!(m[0].write && !m[1].write);
    // A domain-selective flush of an unchanged table changes nothing.
    let c = g.unit.counters().snapshot();
    assert!(g.submit(&[iotlb_domain(1)]));
    let d = g.unit.counters().snapshot();
    assert_eq!((d.maps, d.unmaps), (c.maps, c.unmaps));
}

#[test]
fn a_walk_over_budget_leaves_the_range_unmapped() {
    let limits = Limits {
        max_mappings_per_domain: 4,
        ..Limits::default()
    };
    let config = UnitConfig {
        limits,
        ..UnitConfig::default()
    };
    assert_eq!(config.walk_budget(), 4 * 8 + 2048);
    let mut g = Guest::with(config);
    let ep = g.unit.add_endpoint(DISK).unwrap();
    g.bring_up();
    let slpt = g.attach(DISK, 1);
    g.map(slpt, 0x1000, DATA, 3);
    assert!(g.submit(&[iotlb_domain(1)]));
    assert!(dma_read(&g.device(&ep), 0x1000).is_some());
    // Leaves scattered over many leaf tables: a full walk costs 512 reads per table.
    for i in 0..8u64 {
        g.map(slpt, (i + 1) << 21, DATA, 3);
    }
    let errors = g.unit.counters().snapshot().errors;
    assert!(g.submit(&[iotlb_domain(1)]), "the wait still completes");
    assert_eq!(g.unit.counters().snapshot().errors, errors + 1);
    assert_eq!(g.unit.domain_mappings(1), Some(vec![]));
    assert_eq!(dma_read(&g.device(&ep), 0x1000), None, "never stale");
}

#[test]
fn domain_limit_blocks_the_extra_endpoint() {
    let limits = Limits {
        max_domains: 1,
        ..Limits::default()
    };
    let mut g = Guest::with(UnitConfig {
        limits,
        ..UnitConfig::default()
    });
    g.unit.add_endpoint(DISK).unwrap();
    let net = g.unit.add_endpoint(NET).unwrap();
    g.bring_up();
    g.attach(DISK, 1);
    let errors = g.unit.counters().snapshot().errors;
    g.attach(NET, 2);
    assert_eq!(g.unit.endpoint_space(NET), Some(None));
    assert_eq!(g.unit.counters().snapshot().errors, errors + 1);
    assert_eq!(
        dma_read(&g.device(&net), DATA),
        None,
        "blocked, not identity"
    );
}

#[test]
fn mapping_limit_refuses_runs_without_stale_state() {
    let limits = Limits {
        max_mappings_per_domain: 2,
        max_total_mappings: 2,
        ..Limits::default()
    };
    let mut g = Guest::with(UnitConfig {
        limits,
        ..UnitConfig::default()
    });
    let ep = g.unit.add_endpoint(DISK).unwrap();
    g.bring_up();
    let slpt = g.attach(DISK, 1);
    // Three separate runs (gaps in IOVA): the third MAP is refused.
    for i in 0..3u64 {
        g.map(slpt, 0x1000 + i * 0x2000, DATA, 3);
    }
    assert!(g.submit(&[psi(1, 0, 4)]));
    assert_eq!(g.unit.domain_mappings(1).unwrap().len(), 2);
    assert!(g.unit.counters().snapshot().errors >= 1);
    assert_eq!(dma_read(&g.device(&ep), 0x5000), None);
}

#[test]
fn hostile_tables_fault_with_their_reasons() {
    let mut g = Guest::new();
    let ep = g.unit.add_endpoint(DISK).unwrap();
    g.bring_up();
    g.w32(offset::FECTL, 0);
    let dev = g.device(&ep);
    let reason = |g: &Guest, i: u64| g.fault_record(i).2 & 0xff;
    // Reserved bits in the context entry.
    g.set_context(DISK, TABLES | 1 << 5 | 1, 2 | 1 << 8);
    assert_eq!(dma_read(&dev, 0), None);
    assert_eq!(reason(&g, 0), 0xb);
    // AW not in SAGAW (3 = 57-bit).
    g.set_context(DISK, TABLES | 1, 3 | 1 << 8);
    assert_eq!(dma_read(&dev, 0x1000), None);
    assert_eq!(reason(&g, 1), 3);
    // Context table beyond RAM.
    g.put(ROOT, 0x4000_0000 | 1);
    assert!(g.submit(&[context_cache_device(DISK, 0)]));
    assert_eq!(dma_read(&dev, 0x2000), None);
    assert_eq!(reason(&g, 2), 9);
    // Root entry reserved bits.
    g.put(ROOT, CONTEXT | 1 << 3 | 1);
    assert!(g.submit(&[(1 | 1 << 4, 0)]));
    assert_eq!(dma_read(&dev, 0x3000), None);
    assert_eq!(reason(&g, 3), 0xa);
    // A page table whose entries point outside RAM or carry reserved bits maps nothing.
    let slpt = g.attach(DISK, 1);
    g.put(slpt, 0x7f_0000_0000 | 3); // next table beyond RAM (within HAW)
    g.put(slpt + 8, TABLES | 1 << 11 | 3); // SNP without ECAP.SC: reserved
    assert!(g.submit(&[iotlb_domain(1)]));
    assert_eq!(g.unit.domain_mappings(1), Some(vec![]));
    assert_eq!(dma_read(&dev, 1 << 39), None);
    assert_eq!(reason(&g, 4), 0xc);
    // A leaf to a GPA beyond RAM maps (the engine maps GPAs), but DMA there fails cleanly.
    g.put(slpt, 0);
    g.put(slpt + 8, 0);
    g.map(slpt, 0x6000, 0x7000_0000, 3);
    assert!(g.submit(&[psi(1, 0x6000, 0)]));
    assert_eq!(dma_read(&dev, 0x6000), None);
    assert_eq!(g.unit.counters().snapshot().errors, 0);
}

#[test]
fn unmap_completes_only_after_a_pinned_reader_is_done() {
    let mut g = Guest::new();
    let ep = g.unit.add_endpoint(DISK).unwrap();
    g.bring_up();
    let slpt = g.attach(DISK, 1);
    g.map(slpt, 0x1000, DATA, 3);
    assert!(g.submit(&[psi(1, 0x1000, 0)]));
    let dev = g.device(&ep);
    let pinned = dev.pin();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // Still translates through the pinned view, then lets go.
        let ok = dma_read(&pinned, 0x1000).is_some();
        drop(pinned);
        ok
    });
    rx.recv().unwrap();
    let t0 = Instant::now();
    let leaf = g.slot(slpt, 0x1000, 1);
    g.put(leaf, 0);
    assert!(g.submit(&[psi(1, 0x1000, 0)]));
    assert!(
        t0.elapsed() >= Duration::from_millis(50),
        "waited for the reader"
    );
    assert!(reader.join().unwrap());
    assert_eq!(dma_read(&dev, 0x1000), None);
}

#[test]
fn a_fault_reported_while_the_unit_is_busy_is_recorded_after() {
    let mut g = Guest::new();
    let ep = g.unit.add_endpoint(DISK).unwrap();
    g.bring_up();
    g.attach(DISK, 1);
    let dev = g.device(&ep);
    {
        let _busy = g.unit.lock();
        assert_eq!(dma_read(&dev, 0x8000), None, "the sink does not block");
    }
    assert_ne!(
        g.r32(offset::FSTS) & FSTS_PPF,
        0,
        "recorded by the next access"
    );
    assert_eq!(g.fault_record(0).0, 0x8000);
}

/// A small deterministic generator (xorshift) for hostile inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_register_writes_queues_and_tables_do_not_break_the_unit() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let limits = Limits {
        max_domains: 8,
        max_mappings_per_domain: 64,
        max_total_mappings: 256,
        ..Limits::default()
    };
    let mut g = Guest::with(UnitConfig {
        limits,
        ..UnitConfig::default()
    });
    let eps: Vec<_> = [DISK, NET, 0x100, 0xffff]
        .iter()
        .map(|&s| g.unit.add_endpoint(s).unwrap())
        .collect();
    let interesting = [
        offset::GCMD,
        offset::RTADDR,
        offset::CCMD,
        offset::FSTS,
        offset::FECTL,
        offset::IQT,
        offset::IQA,
        offset::ICS,
        offset::IECTL,
        IVA_OFFSET,
        IOTLB_OFFSET,
        FAULT_RECORD_OFFSET + 12,
    ];
    for round in 0..20_000u32 {
        let r = rng.next();
        // Scribble over the first 2 MiB of RAM (root, context, queue, tables live there).
        let addr = (rng.next() % (2 << 20)) & !7;
        let v = match r % 4 {
            0 => rng.next(),
            1 => (rng.next() & 0x1f_f000) | 3,
            2 => (rng.next() & 0x1f_f000) | 1 | (rng.next() & 0x180),
            _ => 0,
        };
        g.put(addr, v);
        let off = if r % 3 == 0 {
            (rng.next() % 0x1000) & !3
        } else {
            interesting[(rng.next() % interesting.len() as u64) as usize]
        };
        let v = match (r >> 8) % 4 {
            0 => rng.next(),
            1 => rng.next() & 0x1f_f000,
            2 => 1 << 63 | (rng.next() & (3 << 61 | 3 << 59 | 0xffff_ffff)),
            _ => rng.next() & 0xfff0,
        };
        if r & 1 == 0 {
            g.w64(off & !7, v);
        } else {
            g.w32(off, v as u32);
        }
        let _ = g.r64(off & !7);
        if round % 16 == 0 {
            for ep in &eps {
                let _ = dma_read(&g.device(ep), rng.next() % (4 << 20));
            }
        }
    }
    assert!(g.unit.memory_estimate() <= limits.memory_bound());
    let s = g.unit.counters().snapshot();
    assert!(s.invalidations > 0, "{s:?}");
    // Still a working unit: off, status cleared, clean memory, a clean bring-up translates.
    g.w32(offset::GCMD, 0);
    g.w32(offset::FSTS, u32::MAX);
    g.mem
        .memory()
        .write_slice(&vec![0u8; 2 << 20], GuestAddress(0))
        .unwrap();
    g.tail = 0;
    g.next_table = TABLES;
    g.bring_up();
    let slpt = g.attach(DISK, 1);
    g.map(slpt, 0x1000, DATA, 3);
    g.put(DATA, 1234);
    assert!(g.submit(&[psi(1, 0x1000, 0)]));
    assert_eq!(dma_read(&g.device(&eps[0]), 0x1000), Some(1234));
}
