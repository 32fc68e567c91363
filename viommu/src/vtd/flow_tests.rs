//! The building blocks composed as the wiring step will compose them, against a model engine:
//! Linux's bring-up, context and page-selective invalidations under caching mode, an invalid
//! descriptor and its recovery, and a DMA fault read back through the fault registers.

use super::caps::{AddressWidth, Capabilities, FAULT_RECORD_OFFSET};
use super::descriptor::Descriptor;
use super::diff::{diff, Change};
use super::fault::{should_record, Fault, FSTS_IQE, FSTS_PPF, RECORD_F};
use super::invalidation::{ContextInvalidation, Invalidation};
use super::queue::{self, QueueOutcome};
use super::regs::{offset, Action, Registers};
use super::tables::{lookup_context, ContextEntry, RootTable, Translation};
use super::walk::{translate, walk_range, Perm, Run};
use std::collections::BTreeMap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const ROOT: u64 = 0x1_0000;
const CONTEXT: u64 = 0x1_1000;
const QUEUE: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const TABLES: u64 = 0x10_0000;
const SID: u16 = 0x0020; // 00:04.0
const BUDGET: u64 = 1 << 20;

/// The engine as the front end will drive it: endpoints in domains, each domain's mappings.
#[derive(Default)]
struct Engine {
    root: Option<RootTable>,
    translating: bool,
    endpoints: BTreeMap<u16, ContextEntry>,
    domains: BTreeMap<u16, Vec<Run>>,
    maps: usize,
    unmaps: usize,
}

impl Engine {
    fn apply(&mut self, did: u16, changes: &[Change]) {
        let runs = self.domains.entry(did).or_default();
        for c in changes {
            match c {
                Change::Unmap(r) => {
                    self.unmaps += 1;
                    runs.retain(|m| !(r.start <= m.iova && m.iova + m.len <= r.end));
                }
                Change::Map(run) => {
                    self.maps += 1;
                    runs.push(*run);
                    runs.sort_by_key(|r| r.iova);
                }
            }
        }
    }

    /// Re-walk `range` of every table domain `did` is reached through and apply the diff.
    fn resync(
        &mut self,
        mem: &GuestMemoryMmap,
        caps: &Capabilities,
        did: u16,
        range: std::ops::Range<u64>,
    ) {
        let tables: Vec<_> = self
            .endpoints
            .values()
            .filter(|e| e.did == did)
            .filter_map(|e| match e.translation {
                Translation::PageTable(t) => Some(t),
                Translation::PassThrough => None,
            })
            .collect();
        for t in tables {
            let walk = walk_range(mem, caps, &t, range.clone(), BUDGET).expect("within budget");
            let old: Vec<Run> = self
                .domains
                .get(&did)
                .map(|d| {
                    d.iter()
                        .filter(|m| m.iova < range.end && m.iova + m.len > range.start)
                        .copied()
                        .collect()
                })
                .unwrap_or_default();
            let changes = diff(range.clone(), &walk.runs, &old).expect("valid inputs");
            self.apply(did, &changes);
        }
    }

    fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        caps: &Capabilities,
        d: &Descriptor,
    ) -> Result<(), String> {
        match d {
            Descriptor::Context(inv) => {
                let sids: Vec<u16> = match inv {
                    ContextInvalidation::Device { .. } => inv.source_ids().collect(),
                    _ => vec![SID],
                };
                for sid in sids {
                    let root = self.root.ok_or("no root table")?;
                    match lookup_context(mem, caps, root, sid) {
                        Ok(e) => {
                            self.endpoints.insert(sid, e);
                        }
                        Err(_) => {
                            self.endpoints.remove(&sid);
                        }
                    }
                }
            }
            Descriptor::Iotlb(inv) => {
                let dids: Vec<u16> = match inv.did() {
                    Some(did) => vec![did],
                    None => self.endpoints.values().map(|e| e.did).collect(),
                };
                for did in dids {
                    let range = inv.range(caps.aw);
                    self.resync(mem, caps, did, range);
                }
            }
            Descriptor::DeviceTlb(_) | Descriptor::InterruptEntryCache(_) | Descriptor::Wait(_) => {
            }
        }
        Ok(())
    }
}

/// The unit: registers, guest memory, engine; carries out every action of a write.
struct Unit {
    regs: Registers,
    mem: GuestMemoryMmap,
    engine: Engine,
    msis: Vec<u64>,
    next_table: u64,
    tail: u32,
}

impl Unit {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        Unit {
            regs: Registers::new(Capabilities::new(AddressWidth::Bits48)),
            mem,
            engine: Engine::default(),
            msis: Vec::new(),
            next_table: TABLES,
            tail: 0,
        }
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        let mut actions = self.regs.write(off, data);
        while let Some(a) = (!actions.is_empty()).then(|| actions.remove(0)) {
            let caps = *self.regs.capabilities();
            match a {
                Action::SetRootTable(r) => self.engine.root = Some(r),
                Action::EnableTranslation(on) => self.engine.translating = on,
                Action::ProcessQueue => {
                    let q = self.regs.queue().expect("queue enabled");
                    let (mem, engine) = (&self.mem, &mut self.engine);
                    let out: QueueOutcome<String> =
                        queue::process(mem, q, |d| engine.handle(mem, &caps, d));
                    actions.extend(self.regs.complete_queue(&out));
                }
                Action::Invalidate(Invalidation::Context(inv)) => {
                    self.engine
                        .handle(&self.mem, &caps, &Descriptor::Context(inv))
                        .unwrap();
                }
                Action::Invalidate(Invalidation::Iotlb(inv)) => {
                    self.engine
                        .handle(&self.mem, &caps, &Descriptor::Iotlb(inv))
                        .unwrap();
                }
                Action::SendFaultEvent(m) | Action::SendInvalidationEvent(m) => {
                    self.msis.push(m.address)
                }
            }
        }
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.write(off, &v.to_le_bytes());
    }

    fn w64(&mut self, off: u64, v: u64) {
        self.write(off, &v.to_le_bytes());
    }

    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0; 4];
        self.regs.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn put(&self, addr: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(addr)).unwrap();
    }

    /// qi_submit_sync: the descriptors, a wait with status write, one IQT write; then spin.
    fn submit(&mut self, descs: &[(u64, u64)]) -> bool {
        self.put(STATUS, 0);
        for &(lo, hi) in descs
            .iter()
            .chain([(5 | 1 << 5 | 1u64 << 32, STATUS)].iter())
        {
            let at = QUEUE + u64::from(self.tail) * 16;
            self.put(at, lo);
            self.put(at + 8, hi);
            self.tail = (self.tail + 1) % 256;
        }
        self.w32(offset::IQT, self.tail << 4);
        self.mem.read_obj::<u32>(GuestAddress(STATUS)).unwrap() == 1
    }

    /// A 4 KiB leaf for `iova` in a 4-level table rooted at `root` (tables allocated as needed).
    fn map(&mut self, root: u64, iova: u64, gpa: u64, bits: u64) {
        let mut table = root;
        for level in (2..=4u32).rev() {
            let ea = table + ((iova >> (12 + 9 * (level - 1))) & 511) * 8;
            let e: u64 = self.mem.read_obj(GuestAddress(ea)).unwrap();
            table = if e & 3 == 0 {
                self.next_table += 0x1000;
                self.put(ea, self.next_table | 3);
                self.next_table
            } else {
                e & !0xfff
            };
        }
        self.put(table + ((iova >> 12) & 511) * 8, gpa | bits);
    }
}

fn psi(did: u16, addr: u64, am: u64) -> (u64, u64) {
    (2 | 3 << 4 | u64::from(did) << 16, addr | am)
}

#[test]
fn linux_under_caching_mode() {
    let mut u = Unit::new();
    // Bring-up (intel_iommu_init): root table, queued invalidation, global flushes, TE.
    u.w64(offset::RTADDR, ROOT);
    u.w32(offset::GCMD, 1 << 30);
    u.w32(offset::IQT, 0);
    u.w64(offset::IQA, QUEUE);
    u.w32(offset::GCMD, 1 << 26);
    assert!(u.submit(&[(1 | 1 << 4, 0), (2 | 1 << 4, 0)]));
    u.w32(offset::GCMD, 1 << 26 | 1 << 31);
    assert!(u.engine.translating && u.engine.root == Some(RootTable::Legacy(ROOT)));

    // The device gets a DMA domain (did 1): context entry, then (CM) context-device and
    // IOTLB domain-selective invalidations with DID 0.
    u.next_table += 0x1000;
    let slpt = u.next_table;
    u.put(ROOT, CONTEXT | 1);
    u.put(CONTEXT + u64::from(SID & 0xff) * 16, slpt | 1);
    u.put(CONTEXT + u64::from(SID & 0xff) * 16 + 8, 2 | 1 << 8);
    assert!(u.submit(&[(1 | 3 << 4 | u64::from(SID) << 32, 0), (2 | 2 << 4, 0)]));
    assert_eq!(u.engine.endpoints.get(&SID).map(|e| e.did), Some(1));

    // dma_map_page: one 4 KiB page, PSI of that page.
    u.map(slpt, 0xffff_f000, 0x80_0000, 3);
    assert!(u.submit(&[psi(1, 0xffff_f000, 0)]));
    assert_eq!(
        u.engine.domains[&1],
        vec![Run {
            iova: 0xffff_f000,
            gpa: 0x80_0000,
            len: 0x1000,
            perm: Perm::READ_WRITE
        }]
    );
    // The next page below, contiguous in GPA; Linux rounds the flush to an aligned 8 KiB range
    // covering the first page too: only the new page is mapped.
    u.map(slpt, 0xffff_e000, 0x7f_f000, 3);
    let (maps, unmaps) = (u.engine.maps, u.engine.unmaps);
    assert!(u.submit(&[psi(1, 0xffff_e000, 1)]));
    assert_eq!((u.engine.maps - maps, u.engine.unmaps - unmaps), (1, 0));
    // dma_unmap_page of the first: cleared, flushed, gone from the engine.
    let leaf_table = {
        let l4: u64 = u.mem.read_obj(GuestAddress(slpt)).unwrap();
        let l3: u64 = u.mem.read_obj(GuestAddress((l4 & !0xfff) + 3 * 8)).unwrap();
        let l2: u64 = u
            .mem
            .read_obj(GuestAddress((l3 & !0xfff) + 511 * 8))
            .unwrap();
        l2 & !0xfff
    };
    u.put(leaf_table + 511 * 8, 0);
    assert!(u.submit(&[psi(1, 0xffff_f000, 0)]));
    assert_eq!(
        u.engine.domains[&1],
        vec![Run {
            iova: 0xffff_e000,
            gpa: 0x7f_f000,
            len: 0x1000,
            perm: Perm::READ_WRITE
        }]
    );

    // A DMA to the page just unmapped faults; Linux reads it back from the fault registers.
    u.w32(offset::FEADDR, 0xfee0_0000);
    u.w32(offset::FECTL, 0);
    let caps = *u.regs.capabilities();
    let entry = lookup_context(&u.mem, &caps, u.engine.root.unwrap(), SID).unwrap();
    let Translation::PageTable(t) = entry.translation else {
        panic!("translated")
    };
    assert!(translate(&u.mem, &caps, &t, 0xffff_e010, Perm::WRITE).is_ok());
    let reason = translate(&u.mem, &caps, &t, 0xffff_f010, Perm::READ).unwrap_err();
    assert!(should_record(reason, entry.fpd));
    let (_, action) = u.regs.record_fault(Fault {
        sid: SID,
        address: 0xffff_f010,
        reason,
        write: false,
    });
    assert!(matches!(action, Some(Action::SendFaultEvent(m)) if m.address == 0xfee0_0000));
    assert_eq!(u.r32(offset::FSTS) & FSTS_PPF, FSTS_PPF);
    let d3 = u.r32(FAULT_RECORD_OFFSET + 12);
    assert_eq!((d3 & RECORD_F != 0, d3 & 0xff), (true, 6));
    assert_eq!(u.r32(FAULT_RECORD_OFFSET + 8), u32::from(SID));
    assert_eq!(u.r32(FAULT_RECORD_OFFSET), 0xffff_f000);
    u.w32(FAULT_RECORD_OFFSET + 12, RECORD_F);
    u.w32(offset::FSTS, 1);
    assert_eq!(u.r32(offset::FSTS) & FSTS_PPF, 0);

    // An invalid descriptor: IQE, fault event, IQH left at it, the wait after it not done.
    let msis = u.msis.len();
    let bad_at = u.tail;
    assert!(!u.submit(&[(6, 0)]));
    assert_eq!(u.r32(offset::FSTS) & FSTS_IQE, FSTS_IQE);
    assert_eq!(u.r32(offset::IQH) >> 4, bad_at);
    assert_eq!(u.msis.len(), msis + 1);
    // qi_check_fault: copy the wait over the bad slot, clear IQE: the queue runs on.
    let wait_at = QUEUE + u64::from((bad_at + 1) % 256) * 16;
    let (lo, hi): (u64, u64) = (
        u.mem.read_obj(GuestAddress(wait_at)).unwrap(),
        u.mem.read_obj(GuestAddress(wait_at + 8)).unwrap(),
    );
    u.put(QUEUE + u64::from(bad_at) * 16, lo);
    u.put(QUEUE + u64::from(bad_at) * 16 + 8, hi);
    u.w32(offset::FSTS, FSTS_IQE);
    assert_eq!(u.mem.read_obj::<u32>(GuestAddress(STATUS)).unwrap(), 1);
    assert_eq!(u.r32(offset::IQH) >> 4, u.tail);

    // Detach: context entry cleared, invalidated with the old DID; the engine drops it.
    u.put(CONTEXT + u64::from(SID & 0xff) * 16, 0);
    u.put(CONTEXT + u64::from(SID & 0xff) * 16 + 8, 0);
    assert!(u.submit(&[(1 | 3 << 4 | 1 << 16 | u64::from(SID) << 32, 0)]));
    assert!(!u.engine.endpoints.contains_key(&SID));
}
