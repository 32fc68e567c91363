//! libFuzzer entry point for the emulated VT-d unit (`viommu::vtd::unit::Unit`): register
//! writes and reads of any offset and size, invalidation descriptors (structured and raw) in the
//! queue, root/context/second-level table entries in a small guest RAM, DMA of two endpoints
//! through their views. Invariants besides "no panic, no ASan report": the engine state stays
//! within the limits' memory bound; after a global IOTLB invalidation that completed without an
//! error, every sampled IOVA of an endpoint alone in its domain translates exactly as a walk of
//! the guest's tables says (mapped or not, same GPA, same rights).
#![no_main]

use std::sync::Arc;
use viommu::vtd::caps::{Capabilities, IOTLB_OFFSET, IVA_OFFSET};
use viommu::vtd::regs::{offset, MsiMessage};
use viommu::vtd::tables::{lookup_context, Translation};
use viommu::vtd::unit::{MsiSender, Unit, UnitConfig};
use viommu::vtd::walk::{translate, Perm};
use viommu::{Access, Limits, TranslatedMemory};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_fuzz::Input;

const RAM: u64 = 2 << 20;
const ROOT: u64 = 0x1000;
const CONTEXT: u64 = 0x2000;
const QUEUE: u64 = 0x3000;
const STATUS: u64 = 0x4000;
/// Second-level tables come from this pool of pages.
const POOL: u64 = 0x10_0000;
const POOL_PAGES: u64 = 64;
const SIDS: [u16; 2] = [0x20, 0x28];

struct NoMsi;

impl MsiSender for NoMsi {
    fn send(&self, _: MsiMessage) {}
}

struct Rig {
    unit: Unit,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    devs: Vec<TranslatedMemory>,
    caps: Capabilities,
    limits: Limits,
    tail: u32,
}

impl Rig {
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

    fn put(&self, addr: u64, v: u64) {
        let _ = self.mem.memory().write_obj(v, GuestAddress(addr));
    }

    fn pool(i: u64) -> u64 {
        POOL + (i % POOL_PAGES) * 0x1000
    }

    /// Queue descriptors and a status-writing wait, one IQT write.
    fn submit(&mut self, descs: &[(u64, u64)]) {
        let wait = (5 | 1 << 5 | 1u64 << 32, STATUS);
        for &(lo, hi) in descs.iter().chain(std::iter::once(&wait)) {
            let at = QUEUE + u64::from(self.tail % 256) * 16;
            self.put(at, lo);
            self.put(at + 8, hi);
            self.tail = (self.tail + 1) % 256;
        }
        self.w32(offset::IQT, self.tail << 4);
    }

    fn bring_up(&mut self) {
        self.w32(offset::GCMD, 0);
        self.w32(offset::FSTS, u32::MAX);
        self.w64(offset::RTADDR, ROOT);
        self.w32(offset::GCMD, 1 << 30);
        self.w64(offset::IQA, QUEUE);
        self.tail = 0;
        self.w32(offset::IQT, 0);
        self.w32(offset::GCMD, 1 << 26);
        self.submit(&[(1 | 1 << 4, 0), (2 | 1 << 4, 0)]);
        self.w32(offset::GCMD, 1 << 26 | 1 << 31);
    }

    /// Endpoint `i`'s translation of `iova` must be what its tables say, when it is the only
    /// endpoint of its domain and the last resync had no error.
    fn check(&self, i: usize, iova: u64) {
        let sid = SIDS[i];
        let Some(Some(space)) = self.unit.endpoint_space(sid) else {
            return;
        };
        if space > 0xffff
            || SIDS
                .iter()
                .any(|&o| o != sid && self.unit.endpoint_space(o) == Some(Some(space)))
        {
            return;
        }
        let mem = self.mem.memory();
        let Some(root) = self.root() else { return };
        let Ok(entry) = lookup_context(&*mem, &self.caps, root, sid) else {
            return;
        };
        let Translation::PageTable(t) = entry.translation else {
            return;
        };
        let walked = translate(&*mem, &self.caps, &t, iova, Perm::READ).ok();
        let seen = self.devs[i].translate_quiet(iova, 1, Access::Read);
        match (walked, seen) {
            (Some(leaf), Some(pieces)) => assert_eq!(pieces[0].0, leaf.gpa_of(iova), "{iova:#x}"),
            (None, None) => {}
            (w, s) => panic!("{iova:#x}: tables say {w:?}, the view says {s:?}"),
        }
        let walked_w = translate(&*mem, &self.caps, &t, iova, Perm::WRITE).is_ok();
        let seen_w = self.devs[i]
            .translate_quiet(iova, 1, Access::Write)
            .is_some();
        assert_eq!(walked_w, seen_w, "write right at {iova:#x}");
    }

    fn root(&self) -> Option<viommu::vtd::tables::RootTable> {
        self.unit.root_table()
    }
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let limits = Limits {
        max_domains: 4,
        max_endpoints: 4,
        max_mappings_per_domain: 1 << 12,
        max_total_mappings: 1 << 13,
        ..Limits::default()
    };
    let config = UnitConfig {
        aw: if input.u8() & 1 == 0 {
            viommu::vtd::caps::AddressWidth::Bits48
        } else {
            viommu::vtd::caps::AddressWidth::Bits39
        },
        limits,
        ..UnitConfig::default()
    };
    let Ok(m) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]) else {
        return;
    };
    let mem = GuestMemoryAtomic::new(m);
    let unit = Unit::new(config, mem.clone(), Arc::new(NoMsi));
    let mut devs = Vec::new();
    for sid in SIDS {
        let Ok(ep) = unit.add_endpoint(sid) else {
            return;
        };
        devs.push(TranslatedMemory::from_atomic(&mem, ep));
    }
    let mut rig = Rig {
        caps: unit.capabilities(),
        unit,
        mem,
        devs,
        limits,
        tail: 0,
    };
    let mut ops = 0;
    while !input.is_empty() && ops < 512 {
        ops += 1;
        match input.u8() % 12 {
            0 => {
                let off = u64::from(input.u16()) & 0xffc;
                rig.w32(off, input.u32());
            }
            1 => {
                let off = u64::from(input.u16()) & 0xff8;
                rig.w64(off, input.u64());
            }
            2 => {
                // Any size, any alignment, both directions.
                let off = u64::from(input.u16()) & 0xfff;
                let len = usize::from(input.u8() % 9);
                let mut buf = [0u8; 8];
                rig.unit.read(off, &mut buf[..len]);
                let v = input.bytes(len).to_vec();
                rig.unit.write(off, &v);
            }
            3 => {
                let addr = (u64::from(input.u32()) % RAM) & !7;
                rig.put(addr, input.u64());
            }
            4 => rig.bring_up(),
            5 => {
                // A context entry for one endpoint, pointing into the pool, then the CM flushes.
                let i = usize::from(input.u8() % 2);
                let sid = SIDS[i];
                let b = input.u8();
                let slpt = Rig::pool(u64::from(input.u8()));
                let lo = if b & 1 != 0 { slpt | 1 } else { 0 }
                    | u64::from((b >> 1) & 3) << 2
                    | u64::from((b >> 3) & 1) << 1;
                let hi = u64::from((b >> 4) & 3) | u64::from(input.u16() % 4) << 8;
                rig.put(ROOT, CONTEXT | 1);
                rig.put(CONTEXT + u64::from(sid & 0xff) * 16, lo);
                rig.put(CONTEXT + u64::from(sid & 0xff) * 16 + 8, hi);
                rig.submit(&[(1 | 3 << 4 | u64::from(sid) << 32, 0), (2 | 2 << 4, 0)]);
            }
            6 => {
                // A second-level entry: a pool table or a leaf (4 KiB or superpage) into RAM.
                let table = Rig::pool(u64::from(input.u8()));
                let index = u64::from(input.u16() % 512);
                let k = input.u8();
                let rights = u64::from(k & 3);
                let v = match (k >> 2) % 4 {
                    0 => Rig::pool(u64::from(input.u8())) | rights,
                    1 => (u64::from(input.u32()) % RAM) & !0xfff | rights,
                    2 => (u64::from(input.u32()) % RAM) & !0x1f_ffff | rights | 1 << 7,
                    _ => input.u64(),
                };
                rig.put(table + index * 8, v);
            }
            7 => {
                // Page-selective, domain or raw IOTLB descriptors.
                let did = u64::from(input.u16() % 4);
                let addr = input.u64() & ((1 << 48) - 1) & !0xfff;
                let am = u64::from(input.u8() % 40);
                match input.u8() % 3 {
                    0 => rig.submit(&[(2 | 3 << 4 | did << 16, addr | am)]),
                    1 => rig.submit(&[(2 | 2 << 4 | did << 16, 0)]),
                    _ => {
                        let (lo, hi) = (input.u64(), input.u64());
                        rig.submit(&[(lo, hi)]);
                    }
                }
            }
            8 => {
                // Register-based PSI.
                rig.w64(IVA_OFFSET, input.u64());
                rig.w64(
                    IOTLB_OFFSET,
                    1 << 63 | u64::from(input.u8() % 4) << 60 | input.u64() & (0xffff << 32),
                );
            }
            9 => {
                // DMA by an endpoint.
                let i = usize::from(input.u8() % 2);
                let iova = input.u64() % (1 << 40);
                let len = usize::from(input.u8()) * 16;
                let mut buf = vec![0u8; len];
                if input.u8() & 1 == 0 {
                    let _ = rig.devs[i].read_into(&mut buf, GuestAddress(iova));
                } else {
                    let _ = rig.devs[i].write_from(&buf, GuestAddress(iova));
                }
            }
            10 => {
                // A global resync, then the invariant on sampled addresses.
                let errors = rig.unit.counters().snapshot().errors;
                rig.submit(&[(1 | 1 << 4, 0), (2 | 1 << 4, 0)]);
                let clean = rig.unit.counters().snapshot().errors == errors
                    && rig.r32(offset::FSTS) & (1 << 4) == 0
                    && rig.r32(offset::GSTS) & (1 << 31) != 0;
                if clean {
                    for _ in 0..8 {
                        let i = usize::from(input.u8() % 2);
                        let iova = (input.u64() % (1 << 39)) & !0xfff;
                        rig.check(i, iova);
                    }
                }
            }
            _ => {
                let v = input.u32();
                rig.w32(offset::FSTS, v);
                rig.w32(offset::FECTL, v);
                rig.w32(offset::ICS, 1);
            }
        }
        assert!(rig.unit.memory_estimate() <= rig.limits.memory_bound());
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| run(data));
