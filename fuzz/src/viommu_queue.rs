//! Target (a): the virtio-iommu request path. A real `Viommu` over real split rings in a
//! `GuestMemoryMmap` with a hole; the input decides structured and raw requests, descriptor
//! and avail-ring contents, kicks, config writes (bypass flips), resets, host-mapper failures
//! and device accesses through `TranslatedMemory`.
//!
//! Invariants checked: no panic; every translation equals what the engine's state says
//! (mapping, rights, bypass, deny), succeeds only when every byte lands in guest RAM, and reads
//! or writes exactly those bytes; the host endpoint's recorded host mappings always equal its
//! domain's contents (no leak, no stale mapping, whatever the host mapper fails).

use crate::failing::FailingMapper;
use crate::{Enc, Input};
use std::sync::Arc;
use viommu::spec::{ATTACH_F_BYPASS, TAIL_SIZE};
use viommu::test_utils::{MockDriver, MockLayout, NoInterrupt, QueueLayout, Request};
use viommu::{
    EndpointHandle, HostMapError, Limits, Prot, Status, TranslatedMemory, Viommu, ViommuConfig,
};
use virtio_dev::{QueueConfig, VirtioDevice};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap, Permissions,
};

/// Guest RAM: two regions with a hole between them.
pub const RAM: [(u64, usize); 2] = [(0, 0x10_0000), (0x20_0000, 0x10_0000)];
/// Two emulated endpoints, then two host-backed ones sharing one host address space (one
/// VFIO container).
pub const EPS: [u32; 4] = [0x08, 0x10, 0x18, 0x20];
const HOST_EPS: [usize; 2] = [2, 3];
const QSIZE: u16 = 16;
const REQ_RING: u64 = 0x1000;
const EVT_RING: u64 = 0x4000;
const DATA: u64 = 0x8000;
const DATA_END: u64 = 0x10_0000;
const PROBE_SIZE: u32 = 64;

/// Opcodes of the input language.
pub mod op {
    /// Structured request (queued, not kicked).
    pub const REQ: u8 = 0;
    /// Raw descriptor write.
    pub const DESC: u8 = 1;
    /// Raw avail ring entry + index bump.
    pub const AVAIL: u8 = 2;
    /// Raw guest memory write.
    pub const MEM: u8 = 3;
    /// Notify a queue.
    pub const KICK: u8 = 4;
    /// Device config write.
    pub const CFG_WRITE: u8 = 5;
    /// Device config read.
    pub const CFG_READ: u8 = 6;
    /// Device access through an endpoint.
    pub const ACCESS: u8 = 7;
    /// Post an event buffer.
    pub const EVENT: u8 = 8;
    /// Device reset.
    pub const RESET: u8 = 9;
    /// (Re)activate with fuzzed features and queue layout.
    pub const ACTIVATE: u8 = 10;
    /// System reset.
    pub const SYSTEM_RESET: u8 = 11;
    /// Arm a host-mapper failure.
    pub const FAIL_HOST: u8 = 12;
    /// Number of opcodes.
    pub const COUNT: u8 = 13;
}

#[derive(Clone, Copy)]
struct Ring {
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    fn desc(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + 0x1000
    }
    fn used(&self) -> u64 {
        self.base + 0x2000
    }
}

struct Harness {
    mem: GuestMemoryMmap,
    dev: Viommu,
    rec: Arc<FailingMapper>,
    tms: Vec<TranslatedMemory<GuestMemoryMmap>>,
    req: Ring,
    evt: Ring,
    data_next: u64,
    trace: bool,
}

fn config() -> ViommuConfig {
    ViommuConfig {
        probe_size: PROBE_SIZE,
        limits: Limits {
            max_domains: 4,
            max_endpoints: 8,
            max_mappings_per_domain: 16,
            max_total_mappings: 24,
            ..Default::default()
        },
        queue_size: QSIZE,
        ..Default::default()
    }
}

fn domain_sel(inp: &mut Input) -> u32 {
    let s = inp.u8();
    if s < 0xf0 {
        u32::from(s % 8)
    } else {
        inp.u32()
    }
}

fn ep_sel(inp: &mut Input) -> u32 {
    let s = inp.u8();
    if s < 0xf0 {
        EPS[usize::from(s) % EPS.len()]
    } else {
        inp.u32()
    }
}

/// An address: mostly small page-granular values, sometimes raw.
fn addr_sel(inp: &mut Input) -> u64 {
    let s = inp.u8();
    match s {
        0..=0xbf => u64::from(s) << 12,
        0xc0..=0xdf => 0x20_0000 + (u64::from(s - 0xc0) << 15),
        _ => inp.u64(),
    }
}

fn pages_sel(inp: &mut Input) -> u64 {
    let s = inp.u8();
    if s < 0xf8 {
        u64::from(s % 16 + 1) << 12
    } else {
        inp.u64()
    }
}

impl Harness {
    fn new(features: u64) -> Self {
        let ranges: Vec<(GuestAddress, usize)> =
            RAM.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        let mem = crate::ram(&ranges);
        let mut dev = Viommu::new(config()).expect("config");
        let rec = Arc::new(FailingMapper::default());
        let mut handles: Vec<EndpointHandle> = Vec::new();
        for (i, &ep) in EPS.iter().enumerate() {
            let h = if HOST_EPS.contains(&i) {
                dev.add_host_endpoint(ep, rec.clone())
            } else {
                dev.add_endpoint(ep)
            };
            handles.push(h.expect("endpoint"));
        }
        let tms = handles
            .into_iter()
            .map(|h| TranslatedMemory::new(mem.clone(), h))
            .collect();
        let ring = |base| Ring {
            base,
            size: QSIZE,
            next_desc: 0,
            avail_idx: 0,
        };
        let mut h = Harness {
            mem,
            dev,
            rec,
            tms,
            req: ring(REQ_RING),
            evt: ring(EVT_RING),
            data_next: DATA,
            trace: crate::debug(),
        };
        h.activate(features, QSIZE, None);
        h
    }

    fn activate(&mut self, features: u64, size: u16, raw: Option<[u64; 3]>) {
        self.req.size = size;
        self.evt.size = size;
        self.req.next_desc = 0;
        self.req.avail_idx = 0;
        self.evt.next_desc = 0;
        self.evt.avail_idx = 0;
        // Clear the rings so indexes restart from 0 like a fresh driver would.
        let _ = self.mem.write_slice(&[0u8; 0x6000], GuestAddress(REQ_RING));
        let qc = |r: &Ring| QueueConfig {
            size,
            desc_table: GuestAddress(raw.map_or(r.desc(), |a| a[0])),
            avail_ring: GuestAddress(raw.map_or(r.avail(), |a| a[1])),
            used_ring: GuestAddress(raw.map_or(r.used(), |a| a[2])),
            ready: true,
        };
        let queues = vec![qc(&self.req), qc(&self.evt)];
        let _ = self.dev.activate(
            GuestMemoryAtomic::new(self.mem.clone()),
            features,
            queues,
            vec![],
            Arc::new(NoInterrupt),
        );
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let len = (len + 0xf) & !0xf;
        if self.data_next + len > DATA_END {
            self.data_next = DATA;
        }
        let a = self.data_next;
        self.data_next += len;
        a
    }

    fn write_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.req.desc() + 16 * u64::from(idx);
        let _ = self.mem.write_obj(addr.to_le(), GuestAddress(d));
        let _ = self.mem.write_obj(len.to_le(), GuestAddress(d + 8));
        let _ = self.mem.write_obj(flags.to_le(), GuestAddress(d + 12));
        let _ = self.mem.write_obj(next.to_le(), GuestAddress(d + 14));
    }

    fn push_avail(ring: &mut Ring, mem: &GuestMemoryMmap, head: u16) {
        let size = ring.size.max(1);
        let slot = ring.avail() + 4 + 2 * u64::from(ring.avail_idx % size);
        let _ = mem.write_obj(head.to_le(), GuestAddress(slot));
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(ring.avail_idx.to_le(), GuestAddress(ring.avail() + 2));
    }

    /// Queue a chain made of `bufs` (address, length, writable).
    fn queue_chain(&mut self, bufs: &[(u64, u32, bool)]) {
        let size = self.req.size.max(1);
        let head = self.req.next_desc % size;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = self.req.next_desc % size;
            self.req.next_desc = (self.req.next_desc + 1) % size;
            let mut flags = if write { 2 } else { 0 };
            let next = if i + 1 < bufs.len() {
                flags |= 1;
                self.req.next_desc
            } else {
                0
            };
            self.write_desc(idx, addr, len, flags, next);
        }
        Self::push_avail(&mut self.req, &self.mem, head);
    }

    fn request(&mut self, inp: &mut Input) {
        let kind = inp.u8();
        let mut reply = TAIL_SIZE as u32;
        // Well-formed requests are the spec structures; kind 6 and 7 are raw bytes.
        let req = match kind % 8 {
            0 | 1 => {
                let flags = if kind % 8 == 1 { ATTACH_F_BYPASS } else { 0 };
                Some(Request::attach(domain_sel(inp), ep_sel(inp), flags))
            }
            2 => Some(Request::detach(domain_sel(inp), ep_sel(inp))),
            3 => {
                let dom = domain_sel(inp);
                let start = addr_sel(inp);
                let end = start.wrapping_add(pages_sel(inp)).wrapping_sub(1);
                let phys = addr_sel(inp);
                let flags = u32::from(inp.u8() % 16);
                Some(Request::map(dom, start, end, phys, flags))
            }
            4 => {
                let dom = domain_sel(inp);
                let start = addr_sel(inp);
                let end = start.wrapping_add(pages_sel(inp)).wrapping_sub(1);
                Some(Request::unmap(dom, start, end))
            }
            5 => {
                let r = Request::probe(ep_sel(inp));
                reply = r.reply_len(PROBE_SIZE);
                Some(r)
            }
            _ => None,
        };
        let mut body = match req {
            Some(r) => r.as_bytes().to_vec(),
            None => {
                let raw = inp.blob(96).to_vec();
                reply = u32::from(inp.u8());
                raw
            }
        };
        // Mangling: flip one body byte, split the body, change the reply size, or put the
        // writable buffer first.
        let mangle = inp.u8();
        if mangle & 1 != 0 && !body.is_empty() {
            let at = usize::from(inp.u8()) % body.len();
            body[at] = inp.u8();
        }
        if mangle & 2 != 0 {
            reply = u32::from(inp.u8());
        }
        if self.trace {
            eprintln!("  request {body:02x?} reply {reply} mangle {mangle:#x}");
        }
        let b = self.alloc(body.len() as u64);
        let _ = self.mem.write_slice(&body, GuestAddress(b));
        let r = self.alloc(u64::from(reply));
        let _ = self
            .mem
            .write_slice(&vec![0xaa; reply as usize], GuestAddress(r));
        let blen = body.len() as u32;
        if mangle & 4 != 0 && blen > 1 {
            let cut = 1 + u32::from(inp.u8()) % (blen - 1);
            self.queue_chain(&[
                (b, cut, false),
                (b + u64::from(cut), blen - cut, false),
                (r, reply, true),
            ]);
        } else if mangle & 8 != 0 {
            self.queue_chain(&[(r, reply, true), (b, blen, false)]);
        } else {
            self.queue_chain(&[(b, blen, false), (r, reply, true)]);
        }
    }

    /// The host mappings the engine says the shared host address space must hold: the
    /// contents of every domain a host endpoint is attached to (guest RAM for a bypass
    /// domain), or with none attached, guest RAM while `config.bypass` is on (boot bypass).
    fn expected_host(&self) -> Vec<(u64, (u64, u64, Prot))> {
        let doms = self.dev.domains();
        let ram = RAM.iter().map(|&(a, l)| (a, (l as u64, a, Prot::RW)));
        let mut out = std::collections::BTreeMap::new();
        let mut attached = false;
        for i in HOST_EPS {
            let Some(Some(d)) = doms.endpoint_domain(EPS[i]) else {
                continue;
            };
            attached = true;
            if doms.domain_bypass(d) == Some(true) {
                out.extend(ram.clone());
                continue;
            }
            for m in doms.mappings(d).unwrap_or_default() {
                let p = Prot {
                    read: m.read,
                    write: m.write,
                };
                out.insert(m.start, (m.end - m.start + 1, m.gpa, p));
            }
        }
        if !attached && doms.bypass() {
            out.extend(ram);
        }
        out.into_iter().collect()
    }

    /// The host address space holds exactly what the engine says. Boot bypass of unattached
    /// endpoints is best effort (a failed map or unmap is logged and retried at the next
    /// change), so once a failure was injected it is only checked to be all-or-nothing.
    fn check_host_mirror(&self) {
        if self.rec.double_fault() {
            // A rollback call failed too: documented to possibly leave a host mapping behind
            // (logged at error level); nothing exact can be checked any more.
            return;
        }
        let got: Vec<_> = self.rec.inner.mappings().into_iter().collect();
        let want = self.expected_host();
        let unattached = HOST_EPS
            .iter()
            .all(|&i| self.dev.domains().endpoint_domain(EPS[i]) == Some(None));
        if unattached && self.rec.failures() > 0 {
            let ram: Vec<u64> = RAM.iter().map(|r| r.0).collect();
            let keys: Vec<u64> = got.iter().map(|g| g.0).collect();
            assert!(
                got.is_empty() || keys == ram,
                "partial boot-bypass RAM: {got:x?}"
            );
        } else {
            assert_eq!(got, want, "host mappings diverge from the engine");
        }
    }

    /// What the engine says a `len`-byte access at `iova` by endpoint `i` resolves to: the
    /// guest-physical pieces, one per mapping crossed, or `None` if any byte is refused.
    fn model(&self, i: usize, iova: u64, len: u64, write: bool) -> Option<Vec<(u64, u64)>> {
        let doms = self.dev.domains();
        // Identity: one piece, refused if it runs past the top of the address space.
        let identity = || {
            if len == 0 {
                Some(vec![])
            } else {
                iova.checked_add(len - 1).map(|_| vec![(iova, len)])
            }
        };
        let dom = match doms.endpoint_domain(EPS[i]) {
            Some(Some(d)) => d,
            _ if doms.bypass() => return identity(),
            _ => return if len == 0 { Some(vec![]) } else { None },
        };
        if doms.domain_bypass(dom) == Some(true) {
            return identity();
        }
        let maps = doms.mappings(dom).unwrap_or_default();
        let mut out = Vec::new();
        let mut cur = iova;
        let mut left = len;
        while left > 0 {
            let m = maps.iter().find(|m| m.start <= cur && cur <= m.end)?;
            if (write && !m.write) || (!write && !m.read) {
                return None;
            }
            let n = (m.end - cur).saturating_add(1).min(left);
            out.push((m.gpa.wrapping_add(cur - m.start), n));
            left -= n;
            if left > 0 {
                cur = cur.checked_add(n)?;
            }
        }
        Some(out)
    }

    fn access(&mut self, inp: &mut Input) {
        let i = usize::from(inp.u8()) % EPS.len();
        let iova = addr_sel(inp).wrapping_add(u64::from(inp.u16() % 0x1000));
        let len = u64::from(inp.u16() % 0x3000);
        let write = inp.u8() & 1 != 0;
        let fill = inp.u8();
        let tm = &self.tms[i];
        let access = if write {
            viommu::Access::Write
        } else {
            viommu::Access::Read
        };
        let model = self.model(i, iova, len, write);
        let got = tm.translate(iova, len, access);
        assert_eq!(got, model, "translate({iova:#x}, {len:#x}) of endpoint {i}");
        let in_ram = model.as_ref().is_some_and(|pieces| {
            pieces.iter().all(|&(g, n)| {
                self.mem
                    .check_range(GuestAddress(g), n as usize, Permissions::Read)
            })
        });
        let mut buf = vec![fill; len as usize];
        if write {
            let r = tm.write_slice(&buf, GuestAddress(iova));
            assert_eq!(r.is_ok(), in_ram, "write at {iova:#x}+{len:#x}: {r:?}");
            if let (Ok(()), Some(pieces)) = (r, model) {
                for (g, n) in pieces {
                    let mut back = vec![0u8; n as usize];
                    self.mem
                        .read_slice(&mut back, GuestAddress(g))
                        .expect("checked in RAM");
                    assert!(back.iter().all(|&b| b == fill), "write landed elsewhere");
                }
            }
        } else {
            let r = tm.read_slice(&mut buf, GuestAddress(iova));
            assert_eq!(r.is_ok(), in_ram, "read at {iova:#x}+{len:#x}: {r:?}");
            if let (Ok(()), Some(pieces)) = (r, model) {
                let mut want = Vec::new();
                for (g, n) in pieces {
                    let mut part = vec![0u8; n as usize];
                    self.mem
                        .read_slice(&mut part, GuestAddress(g))
                        .expect("checked in RAM");
                    want.extend_from_slice(&part);
                }
                assert!(
                    want == buf,
                    "read returned other bytes than the mapped ones"
                );
            }
        }
    }

    fn step(&mut self, inp: &mut Input) {
        let code = inp.u8() % op::COUNT;
        if self.trace {
            eprintln!(
                "op {code} at {}: eps {:?} host {}",
                inp.pos,
                EPS.map(|e| self.dev.domains().endpoint_domain(e)),
                self.rec.inner.mappings().len()
            );
        }
        match code {
            op::REQ => self.request(inp),
            op::DESC => {
                let idx = inp.u16() % 512;
                let addr = if inp.u8() & 1 == 0 {
                    DATA + u64::from(inp.u16()) * 8
                } else {
                    inp.u64()
                };
                let (len, flags, next) = (inp.u32(), inp.u16(), inp.u16());
                self.write_desc(idx, addr, len, flags, next);
            }
            op::AVAIL => {
                let head = inp.u16();
                let bump = inp.u8();
                let slot = self.req.avail() + 4 + 2 * u64::from(self.req.avail_idx % QSIZE);
                let _ = self.mem.write_obj(head.to_le(), GuestAddress(slot));
                self.req.avail_idx = self.req.avail_idx.wrapping_add(u16::from(bump));
                let _ = self.mem.write_obj(
                    self.req.avail_idx.to_le(),
                    GuestAddress(self.req.avail() + 2),
                );
            }
            op::MEM => {
                let addr = u64::from(inp.u32()) % RAM[0].1 as u64;
                let b = inp.blob(64);
                let _ = self.mem.write_slice(b, GuestAddress(addr));
            }
            op::KICK => {
                let q = match inp.u8() {
                    0..=0xef => 0,
                    0xf0..=0xf7 => 1,
                    _ => inp.u16(),
                };
                let ops = self.rec.inner.ops().len();
                self.rec.begin();
                self.dev.queue_notify(q);
                if self.trace {
                    let c = self.dev.counters().snapshot();
                    eprintln!("  kick {q}: statuses {:?}", c.statuses);
                    for o in &self.rec.inner.ops()[ops..] {
                        eprintln!("  host {o:x?}");
                    }
                    for i in HOST_EPS {
                        let d = self.dev.domains().endpoint_domain(EPS[i]);
                        let m = d.flatten().and_then(|d| self.dev.domains().mappings(d));
                        eprintln!("  ep {i}: {d:?} {m:x?}");
                    }
                }
                self.check_host_mirror();
            }
            op::CFG_WRITE => {
                let off = u64::from(inp.u8() % 48);
                let data = inp.blob(8);
                self.rec.begin();
                self.dev.write_config(off, data);
                self.check_host_mirror();
            }
            op::CFG_READ => {
                let off = u64::from(inp.u8() % 48);
                let mut data = vec![0u8; usize::from(inp.u8() % 9)];
                self.dev.read_config(off, &mut data);
                let mut b = [0u8; 1];
                self.dev.read_config(36, &mut b);
                assert_eq!(b[0], u8::from(self.dev.domains().bypass()));
            }
            op::ACCESS => self.access(inp),
            op::EVENT => {
                let len = u32::from(inp.u8() % 48);
                let writable = inp.u8() & 1 == 0;
                let a = self.alloc(u64::from(len));
                let size = self.evt.size.max(1);
                let idx = self.evt.next_desc % size;
                self.evt.next_desc = (idx + 1) % size;
                let d = self.evt.desc() + 16 * u64::from(idx);
                let _ = self.mem.write_obj(a.to_le(), GuestAddress(d));
                let _ = self.mem.write_obj(len.to_le(), GuestAddress(d + 8));
                let flags: u16 = if writable { 2 } else { 0 };
                let _ = self.mem.write_obj(flags.to_le(), GuestAddress(d + 12));
                Self::push_avail(&mut self.evt, &self.mem, idx);
            }
            op::RESET => {
                // A pending injected failure would hit the best-effort cleanup of the reset,
                // which cannot report it (logged): disarm it first.
                self.rec.disarm();
                self.dev.reset();
                self.check_host_mirror();
            }
            op::ACTIVATE => {
                let features = inp.u64();
                let size = match inp.u8() {
                    0..=0x7f => QSIZE,
                    s => u16::from(s) % 33,
                };
                let raw = if inp.u8() >= 0xf0 {
                    Some([inp.u64(), inp.u64(), inp.u64()])
                } else {
                    None
                };
                self.rec.disarm();
                self.dev.reset();
                self.activate(features, size, raw);
                self.check_host_mirror();
            }
            op::SYSTEM_RESET => {
                self.rec.disarm();
                self.dev.system_reset();
                self.check_host_mirror();
            }
            _ => {
                let n = u64::from(inp.u8() % 8);
                let err = match inp.u8() % 4 {
                    0 => HostMapError::NoSpace,
                    1 => HostMapError::Invalid,
                    2 => HostMapError::OutOfRange,
                    _ => HostMapError::Failed("injected".into()),
                };
                self.rec.fail_call(n, err);
            }
        }
    }
}

/// Run one fuzz input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let features = inp.u64();
    let mut h = Harness::new(features);
    let mut steps = 0;
    while !inp.is_empty() && steps < 512 {
        h.step(&mut inp);
        steps += 1;
    }
    h.check_host_mirror();
    if crate::debug() {
        eprintln!(
            "viommu_queue: {steps} steps, {:?}, host ops {}, injected {}, double fault {}",
            h.dev.counters().snapshot(),
            h.rec.inner.ops().len(),
            h.rec.failures(),
            h.rec.double_fault()
        );
    }
}

/// Encoders for seeds.
pub mod enc {
    use super::op;
    use crate::Enc;

    /// Request kinds for [`req`].
    pub const ATTACH: u8 = 0;
    /// ATTACH with the bypass flag.
    pub const ATTACH_BYPASS: u8 = 1;
    /// DETACH.
    pub const DETACH: u8 = 2;
    /// MAP.
    pub const MAP: u8 = 3;
    /// UNMAP.
    pub const UNMAP: u8 = 4;
    /// PROBE.
    pub const PROBE: u8 = 5;

    /// ATTACH/DETACH: domain (0..8) and endpoint index (0..4).
    pub fn attach(e: &mut Enc, kind: u8, domain: u8, ep: u8) {
        e.u8(op::REQ).u8(kind).u8(domain).u8(ep).u8(0);
    }
    /// MAP `pages` pages at page `iova_page` to page `gpa_page` (page selectors < 0xc0).
    pub fn map(e: &mut Enc, domain: u8, iova_page: u8, pages: u8, gpa_page: u8, flags: u8) {
        e.u8(op::REQ).u8(MAP).u8(domain).u8(iova_page).u8(pages - 1);
        e.u8(gpa_page).u8(flags).u8(0);
    }
    /// UNMAP.
    pub fn unmap(e: &mut Enc, domain: u8, iova_page: u8, pages: u8) {
        e.u8(op::REQ)
            .u8(UNMAP)
            .u8(domain)
            .u8(iova_page)
            .u8(pages - 1)
            .u8(0);
    }
    /// PROBE endpoint index `ep`.
    pub fn probe(e: &mut Enc, ep: u8) {
        e.u8(op::REQ).u8(PROBE).u8(ep).u8(0);
    }
    /// Kick the request queue.
    pub fn kick(e: &mut Enc) {
        e.u8(op::KICK).u8(0);
    }
    /// Access `len` bytes at page `page` + `off` through endpoint `ep`.
    pub fn access(e: &mut Enc, ep: u8, page: u8, off: u16, len: u16, write: bool) {
        e.u8(op::ACCESS)
            .u8(ep)
            .u8(page)
            .u16(off)
            .u16(len)
            .u8(u8::from(write))
            .u8(0x5a);
    }
}

/// Seed inputs: typical driver sessions.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use enc::*;
    let all = u64::MAX;
    let mut out = Vec::new();
    // Linux-like session: probe, attach, maps, accesses, unmaps, detach.
    let mut e = Enc::default();
    e.u64(all);
    probe(&mut e, 0);
    attach(&mut e, ATTACH, 1, 0);
    kick(&mut e);
    map(&mut e, 1, 0x10, 4, 0x40, 3);
    map(&mut e, 1, 0x14, 1, 0x80, 1);
    kick(&mut e);
    access(&mut e, 0, 0x10, 0x10, 0x4000, false);
    access(&mut e, 0, 0x13, 0xff0, 0x20, true);
    access(&mut e, 0, 0x14, 0, 0x10, true);
    unmap(&mut e, 1, 0x10, 4);
    kick(&mut e);
    access(&mut e, 0, 0x10, 0, 8, false);
    attach(&mut e, DETACH, 1, 0);
    kick(&mut e);
    out.push(("session".to_string(), e.0));
    // Host endpoint: attach, map, injected failure, unmap, move to a bypass domain.
    let mut e = Enc::default();
    e.u64(all);
    attach(&mut e, ATTACH, 2, 2);
    map(&mut e, 2, 0x20, 2, 0x30, 3);
    kick(&mut e);
    e.u8(op::FAIL_HOST).u8(0).u8(0);
    map(&mut e, 2, 0x30, 1, 0x30, 3);
    kick(&mut e);
    e.u8(op::FAIL_HOST).u8(0).u8(1);
    unmap(&mut e, 2, 0x20, 2);
    kick(&mut e);
    attach(&mut e, ATTACH_BYPASS, 3, 2);
    kick(&mut e);
    access(&mut e, 2, 0x20, 0, 0x100, false);
    attach(&mut e, ATTACH, 2, 2);
    kick(&mut e);
    out.push(("host".to_string(), e.0));
    // Two endpoints sharing one host address space: same domain, then different domains
    // (their mappings meet in one container), a bypass domain, detach all.
    let mut e = Enc::default();
    e.u64(all);
    attach(&mut e, ATTACH, 2, 2);
    attach(&mut e, ATTACH, 2, 3);
    map(&mut e, 2, 0x20, 2, 0x30, 3);
    kick(&mut e);
    attach(&mut e, ATTACH, 3, 3);
    map(&mut e, 3, 0x21, 1, 0x40, 1);
    map(&mut e, 3, 0x40, 1, 0x40, 1);
    kick(&mut e);
    e.u8(op::FAIL_HOST).u8(1).u8(3);
    attach(&mut e, ATTACH_BYPASS, 4, 2);
    kick(&mut e);
    attach(&mut e, DETACH, 2, 2);
    attach(&mut e, DETACH, 3, 3);
    kick(&mut e);
    e.u8(op::CFG_WRITE).u8(36).blob(&[0]);
    e.u8(op::CFG_WRITE).u8(36).blob(&[1]);
    out.push(("shared-container".to_string(), e.0));
    // Bypass flips through the config space, event buffers and faults.
    let mut e = Enc::default();
    e.u64(all);
    e.u8(op::EVENT).u8(24).u8(0);
    e.u8(op::CFG_WRITE).u8(36).blob(&[0]);
    access(&mut e, 1, 0x10, 0, 4, false);
    e.u8(op::CFG_WRITE).u8(36).blob(&[1]);
    access(&mut e, 1, 0x10, 0, 4, false);
    e.u8(op::CFG_READ).u8(0).u8(8);
    out.push(("bypass".to_string(), e.0));
    // Hostile ring: raw descriptors forming a loop, a jumping avail index, a reset and a
    // re-activation with a smaller queue.
    let mut e = Enc::default();
    e.u64(all);
    e.u8(op::DESC).u16(0).u8(0).u16(0).u32(20).u16(1).u16(1);
    e.u8(op::DESC).u16(1).u8(0).u16(4).u32(4).u16(3).u16(0);
    e.u8(op::AVAIL).u16(0).u8(1);
    kick(&mut e);
    e.u8(op::AVAIL).u16(7).u8(200);
    kick(&mut e);
    e.u8(op::RESET);
    e.u8(op::ACTIVATE).u64(all).u8(0x88).u8(0);
    attach(&mut e, ATTACH, 1, 0);
    kick(&mut e);
    out.push(("hostile-ring".to_string(), e.0));
    // Limits: fill a domain past its mapping cap.
    let mut e = Enc::default();
    e.u64(all);
    attach(&mut e, ATTACH, 1, 0);
    for i in 0..18u8 {
        map(&mut e, 1, i * 2, 1, i, 3);
        if i % 6 == 5 {
            kick(&mut e);
        }
    }
    kick(&mut e);
    unmap(&mut e, 1, 0, 64);
    kick(&mut e);
    out.push(("limits".to_string(), e.0));
    out
}

/// A virtio-iommu over `mem` (rings at `ring`..`ring + 0x6000`, request buffers after them)
/// with endpoint `ep` attached to domain 1 holding `maps` (iova, size, gpa, MAP flags), all
/// sent through the request queue by the mock driver. For harnesses of devices behind the IOMMU.
pub fn program_endpoint(
    mem: &GuestMemoryMmap,
    ring: u64,
    ep: u32,
    maps: &[(u64, u64, u64, u32)],
) -> (Viommu, EndpointHandle) {
    let mut dev = Viommu::new(ViommuConfig {
        queue_size: QSIZE,
        bypass: false,
        ..Default::default()
    })
    .expect("config");
    let handle = dev.add_endpoint(ep).expect("endpoint");
    let layout = MockLayout {
        request: QueueLayout::packed(ring, QSIZE),
        event: QueueLayout::packed(ring + 0x3000, QSIZE),
        buffers: ring + 0x6000..ring + 0x6200,
    };
    let mut drv = MockDriver::new(mem.clone(), layout).expect("driver layout");
    drv.activate_offered(&mut dev, Arc::new(NoInterrupt))
        .expect("activate");
    let st = drv.attach(&mut dev, 1, ep).expect("attach");
    assert_eq!(st, Status::Ok, "setup attach failed");
    for (i, &(iova, size, gpa, flags)) in maps.iter().enumerate() {
        let st = drv.map(&mut dev, 1, iova, size, gpa, flags).expect("map");
        assert_eq!(st, Status::Ok, "setup map {i} failed");
    }
    (dev, handle)
}
