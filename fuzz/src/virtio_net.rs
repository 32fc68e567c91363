//! Target: virtio-net queues (`vmm::devices::net::Net`), activated like a transport would and
//! driven from fuzzed bytes: TX chains (well-formed and mangled: writable descriptors, short
//! headers, oversized or unreachable buffers), RX buffers with and without mergeable buffers,
//! control commands, raw descriptors, avail bumps and memory writes, frames arriving from the
//! backend (one by one or in batches, up to past the largest frame), kicks of any queue,
//! re-activation with fuzzed features and queue sizes, resets; on guest-physical memory or
//! behind the virtio-iommu (one linear mapping).
//!
//! Invariants checked after every step: RX accounting balances (frames offered = delivered +
//! dropped + waiting in the backlog, the backlog bounded); every frame the backend got is
//! counted as transmitted and fits the largest frame; TX used entries = frames + errors;
//! RAM no descriptor may point to (and, behind the IOMMU, RAM the mapping does not reach) is
//! never written (checked at the end). While the driver side is well-formed (no raw writes): TX delivers exactly
//! the frames of well-formed chains, in order; each RX used entry is a posted chain, no
//! longer than its buffers; each control command gets the ack its class calls for. At the
//! end, after a reset, the device still carries a frame each way and acks a command.

use crate::ring::{Area, Space, SplitRing, RING_STRIDE};
use crate::{Enc, Input};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use viommu::test_utils::NoInterrupt;
use virtio_dev::VirtioDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm::config::{NetBackendConfig, NetConfig};
use vmm::devices::net::{
    Net, NetPort, BACKLOG_FRAMES, CTRL_QUEUE, HDR_BYTES, MAX_FRAME_BYTES, RX_QUEUE, TX_QUEUE,
};
use vmm::net::{FrameSink, NetBackend};

const MEM_SIZE: usize = 0x10_0000;
/// Device addresses below this are never handed to the device (written by nobody).
const CANARY: u64 = 0x1000;
/// Rings of queue i at RINGS + i * RING_STRIDE (device addresses).
const RINGS: u64 = 0x1000;
const TX_AREA: (u64, u64) = (0x1_0000, 0x3_0000);
const RX_AREA: (u64, u64) = (0x3_0000, 0x6_0000);
const CTRL_AREA: (u64, u64) = (0x6_0000, 0x6_8000);
/// Behind the IOMMU: IOVA 0..0x80000 -> GPA 0x80000.. (RW); the virtio-iommu's own rings at
/// GPA 0x10000; GPA 0x20000..0x80000 is reached by nothing.
const IOMMU_BASE: u64 = 0x8_0000;
const IOMMU_RING: u64 = 0x1_0000;
const UNREACHED: (u64, u64) = (0x2_0000, 0x8_0000);
const EP: u32 = 0x08;

const F_VERSION_1: u64 = 1 << 32;
const F_ACCESS_PLATFORM: u64 = 1 << 33;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_CTRL_VQ: u64 = 1 << 17;

/// Opcodes.
pub mod op {
    /// A TX chain (well-formed or mangled), not kicked.
    pub const TX: u8 = 0;
    /// RX buffers posted.
    pub const RX_POST: u8 = 1;
    /// A control command, not kicked.
    pub const CTRL: u8 = 2;
    /// Notify a queue (0..3, 3 absent).
    pub const KICK: u8 = 3;
    /// Frames from the backend.
    pub const DELIVER: u8 = 4;
    /// Raw descriptor in a queue's table.
    pub const DESC: u8 = 5;
    /// Raw avail entry and index bump.
    pub const AVAIL: u8 = 6;
    /// Raw memory write.
    pub const MEM: u8 = 7;
    /// Reset, then activate with fuzzed features and queue size.
    pub const ACTIVATE: u8 = 8;
    /// Device reset.
    pub const RESET: u8 = 9;
    /// Number of opcodes.
    pub const COUNT: u8 = 10;
}

/// A backend that keeps every frame the guest transmitted.
#[derive(Clone, Default)]
struct Sent(Arc<Mutex<Vec<Vec<u8>>>>);

impl NetBackend for Sent {
    fn transmit(&self, frame: &[u8]) {
        self.0.lock().unwrap().push(frame.to_vec());
    }
}

impl Sent {
    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A control command waiting for its ack: the ack byte's address and the expected value
/// (`None`: no ack may be written).
struct CtrlPending {
    head: u16,
    ack_at: u64,
    expect: Option<u8>,
}

struct Harness {
    mem: GuestMemoryMmap,
    space: Space,
    dev: Net,
    port: Arc<NetPort>,
    sent: Sent,
    /// Keeps the virtio-iommu alive behind the IOMMU.
    _iommu: Option<viommu::Viommu>,
    iommu: bool,
    rings: [SplitRing; 3],
    tx_area: Area,
    rx_area: Area,
    ctrl_area: Area,
    active: bool,
    mergeable: bool,
    ctrl_on: bool,
    /// While the driver side is well-formed: frames of the TX chains not yet kicked.
    tx_expect: Option<Vec<Vec<u8>>>,
    /// While well-formed: posted RX chains, head -> writable bytes (0 for a mangled chain).
    rx_posted: Option<HashMap<u16, u64>>,
    ctrl_pending: Option<Vec<CtrlPending>>,
    /// Frames offered to the port since the last activation or reset, and the counters then.
    offered: u64,
    base_rx: (u64, u64),
    /// TX used entries seen and chains counted (frames + errors), since the start.
    tx_used: u64,
    tx_base: u64,
    /// GPA ranges nothing may write, and their contents.
    /// (GPA, bytes) nobody writes: zero, as fresh guest RAM is.
    untouched: Vec<(u64, u64)>,
}

fn frame_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// A device address for a raw descriptor: mostly in the buffer areas, sometimes anything
/// the driver may hand out (never below [`CANARY`]).
fn raw_addr(inp: &mut Input) -> u64 {
    match inp.u8() {
        0..=0xbf => TX_AREA.0 + u64::from(inp.u16()) * 4,
        _ => inp.u64().max(CANARY),
    }
}

impl Harness {
    fn new(iommu: bool) -> Self {
        let mem = crate::ram(&[(GuestAddress(0), MEM_SIZE)]);
        let (viommu, ep, space) = if iommu {
            let (v, ep) = crate::viommu_queue::program_endpoint(
                &mem,
                IOMMU_RING,
                EP,
                &[(0, IOMMU_BASE, IOMMU_BASE, 3)],
            );
            let space = Space {
                mem: mem.clone(),
                base: IOMMU_BASE,
                size: IOMMU_BASE,
            };
            (Some(v), Some(ep), space)
        } else {
            let space = Space {
                mem: mem.clone(),
                base: 0,
                size: MEM_SIZE as u64,
            };
            (None, None, space)
        };
        let port = Net::new_port();
        let sent = Sent::default();
        let cfg = NetConfig {
            backend: NetBackendConfig::Hub("fuzz".into()),
            mac: Some([0x52, 0x54, 0, 0, 0, 1]),
            iommu,
        };
        let dev = Net::with_backend(cfg, ep, port.clone(), Box::new(sent.clone()));
        let mut untouched = vec![(0, CANARY)];
        if iommu {
            untouched[0].0 = IOMMU_BASE;
            untouched.push((UNREACHED.0, UNREACHED.1 - UNREACHED.0));
        }
        let rings = [0u64, 1, 2].map(|i| SplitRing::new(RINGS + i * RING_STRIDE, 16));
        Harness {
            mem,
            space,
            dev,
            port,
            sent,
            _iommu: viommu,
            iommu,
            rings,
            tx_area: Area::new(TX_AREA.0, TX_AREA.1),
            rx_area: Area::new(RX_AREA.0, RX_AREA.1),
            ctrl_area: Area::new(CTRL_AREA.0, CTRL_AREA.1),
            active: false,
            mergeable: false,
            ctrl_on: false,
            tx_expect: None,
            rx_posted: None,
            ctrl_pending: None,
            offered: 0,
            base_rx: (0, 0),
            tx_used: 0,
            tx_base: 0,
            untouched,
        }
    }

    fn rebase(&mut self) {
        let s = self.port.stats().snapshot();
        self.offered = 0;
        self.base_rx = (s.rx_frames, s.rx_dropped);
        self.tx_expect = Some(Vec::new());
        self.rx_posted = Some(HashMap::new());
        self.ctrl_pending = Some(Vec::new());
        self.sent.take();
        self.tx_area.reset();
        self.tx_used = 0;
        self.tx_base = s.tx_frames + s.tx_errors;
        for r in &mut self.rings {
            r.used_seen = r.used_idx(&self.space);
        }
    }

    fn activate(&mut self, features: u64, size: u16) {
        self.dev.reset();
        for r in &mut self.rings {
            r.size = size;
            r.clear(&self.space);
        }
        self.rebase();
        let qs = self.rings.iter().map(|r| r.config()).collect();
        let mem = GuestMemoryAtomic::new(self.mem.clone());
        self.active = self
            .dev
            .activate(mem, features, qs, vec![], Arc::new(NoInterrupt))
            .is_ok();
        self.mergeable = features & F_MRG_RXBUF != 0;
        self.ctrl_on = features & F_CTRL_VQ != 0;
        self.rebase();
    }

    fn unclean(&mut self) {
        self.tx_expect = None;
        self.rx_posted = None;
        self.ctrl_pending = None;
    }

    fn tx(&mut self, inp: &mut Input) {
        let trace = crate::debug();
        let len = match inp.u8() {
            0..=0xef => usize::from(inp.u16() % 2048),
            _ => MAX_FRAME_BYTES + usize::from(inp.u8() % 4) - 2,
        };
        let pieces = usize::from(inp.u8() % 4) + 1;
        let mangle = inp.u8();
        let seed = inp.u8();
        let total = HDR_BYTES + len;
        let at = self.tx_area.alloc(total as u64);
        let f = frame_bytes(len, seed);
        let mut bytes = vec![0u8; HDR_BYTES];
        bytes.extend_from_slice(&f);
        self.space.write(at, &bytes);
        // Split header+frame into `pieces` descriptors at fuzzed cut points.
        let mut cuts: Vec<usize> = (1..pieces)
            .map(|_| usize::from(inp.u16()) % (total + 1))
            .collect();
        cuts.sort_unstable();
        let mut bufs = Vec::new();
        let mut prev = 0;
        for c in cuts.into_iter().chain(std::iter::once(total)) {
            bufs.push((at + prev as u64, (c - prev) as u32, false));
            prev = c;
        }
        let mut ok = len <= MAX_FRAME_BYTES;
        if mangle & 0x10 != 0 {
            match mangle & 3 {
                // A device-writable descriptor.
                0 => {
                    let i = usize::from(inp.u8()) % bufs.len();
                    bufs[i].2 = true;
                    ok = false;
                }
                // Shorter than the header.
                1 => {
                    bufs = vec![(at, u32::from(mangle >> 5) % HDR_BYTES as u32, false)];
                    ok = false;
                }
                // One buffer unreachable: an error unless the device never reads it (all
                // of it in the header, or empty).
                2 => {
                    let i = usize::from(inp.u8()) % bufs.len();
                    bufs[i].0 = inp.u64() | 0x8000_0000_0000;
                    let end: usize = bufs[..=i].iter().map(|b| b.1 as usize).sum();
                    ok &= end <= HDR_BYTES || bufs[i].1 == 0;
                }
                // Longer than the largest frame.
                _ => {
                    let i = usize::from(inp.u8()) % bufs.len();
                    bufs[i].1 = bufs[i].1.wrapping_add(0x2_0000);
                    ok = false;
                }
            }
        }
        if trace {
            eprintln!("TX chain {bufs:x?} ok {ok}");
        }
        if self.tx_area.wrapped {
            // The frame may overwrite one not sent yet.
            self.unclean();
        }
        self.push(TX_QUEUE, &bufs);
        if let (true, Some(e)) = (ok, &mut self.tx_expect) {
            e.push(f);
        }
    }

    /// Push a structured chain on queue `q`; a chain that overwrites one the device has not
    /// read yet ends the exact checks.
    fn push(&mut self, q: u16, bufs: &[(u64, u32, bool)]) -> u16 {
        let r = &mut self.rings[usize::from(q)];
        let head = r.push_chain(&self.space, bufs);
        if r.outstanding > usize::from(r.size) {
            self.unclean();
        }
        head
    }

    fn rx_post(&mut self, inp: &mut Input) {
        let chains = usize::from(inp.u8() % 4) + 1;
        for _ in 0..chains {
            let n = usize::from(inp.u8() % 3) + 1;
            let mangle = inp.u8();
            let mut bufs = Vec::new();
            for _ in 0..n {
                let len = match inp.u8() {
                    0..=0x7f => 1526,
                    0x80..=0xbf => u32::from(inp.u16() % 4096),
                    _ => 4096,
                };
                let a = self.rx_area.alloc(u64::from(len));
                bufs.push((a, len, true));
            }
            let bad = mangle & 0xe0 == 0xe0;
            if bad {
                bufs[0].2 = false;
            }
            let cap: u64 = if bad {
                0
            } else {
                bufs.iter().map(|b| u64::from(b.1)).sum()
            };
            let head = self.push(RX_QUEUE, &bufs);
            if let Some(p) = &mut self.rx_posted {
                if p.insert(head, cap).is_some() {
                    // Head reused while still posted: the ring wrapped.
                    self.unclean();
                }
            }
        }
    }

    fn ctrl(&mut self, inp: &mut Input) {
        let class = match inp.u8() {
            s @ 0..=0xdf => s % 6,
            s => s,
        };
        let cmd = inp.u8();
        let data = inp.blob(16).to_vec();
        let shape = inp.u8();
        let mut body = vec![class, cmd];
        body.extend_from_slice(&data);
        let at = self.ctrl_area.alloc(body.len() as u64 + 1);
        self.space.write(at, &body);
        let ack_at = at + body.len() as u64;
        self.space.write(ack_at, &[0xee]);
        let mut bufs = if shape & 1 != 0 {
            // class and command in separate descriptors
            let mut b = vec![(at, 1, false), (at + 1, 1, false)];
            if !data.is_empty() {
                b.push((at + 2, data.len() as u32, false));
            }
            b
        } else {
            vec![(at, body.len() as u32, false)]
        };
        let expect = match shape >> 5 {
            // no ack byte (last descriptor readable)
            0 => None,
            // header shorter than class + command
            1 => {
                bufs = vec![(at, 1, false)];
                bufs.push((ack_at, 1, true));
                Some(1)
            }
            _ => {
                bufs.push((ack_at, 1, true));
                Some(if class <= 3 { 0 } else { 1 })
            }
        };
        let head = self.push(CTRL_QUEUE, &bufs);
        if let Some(p) = &mut self.ctrl_pending {
            p.push(CtrlPending {
                head,
                ack_at,
                expect,
            });
        }
    }

    fn deliver(&mut self, inp: &mut Input) {
        let n = usize::from(inp.u8() % 4) + 1;
        let batch = inp.u8() & 1 != 0;
        let frames: Vec<Vec<u8>> = (0..n)
            .map(|_| {
                let len = match inp.u8() {
                    0..=0xdf => usize::from(inp.u16() % 3000),
                    0xe0..=0xf7 => usize::from(inp.u16()),
                    _ => MAX_FRAME_BYTES + usize::from(inp.u8() % 4) - 2,
                };
                frame_bytes(len, inp.u8())
            })
            .collect();
        self.offered += n as u64;
        if batch {
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            let taken = self.port.deliver_batch(&refs);
            assert!(taken <= n);
        } else {
            for f in &frames {
                self.port.deliver(f);
            }
        }
    }

    fn kick(&mut self, q: u16) {
        let before = self.port.stats().snapshot();
        self.dev.queue_notify(q);
        let after = self.port.stats().snapshot();
        let sent = self.sent.take();
        assert_eq!(
            sent.len() as u64,
            after.tx_frames - before.tx_frames,
            "frames at the backend vs counted"
        );
        for f in &sent {
            assert!(f.len() <= MAX_FRAME_BYTES, "{}-byte frame sent", f.len());
        }
        if q == TX_QUEUE {
            let seen = self.rings[1].used_seen;
            let used = self.rings[1].take_used(&self.space);
            if crate::debug() {
                eprintln!(
                    "TX kick: used {seen}..{} ({} entries), frames +{} errors +{}, avail {} outstanding {}",
                    self.rings[1].used_seen,
                    used.len(),
                    after.tx_frames - before.tx_frames,
                    after.tx_errors - before.tx_errors,
                    self.rings[1].avail_idx,
                    self.rings[1].outstanding
                );
            }
            self.tx_used += used.len() as u64;
            if self.active {
                self.rings[1].outstanding = 0;
                self.tx_area.reset();
            }
            if let Some(e) = &mut self.tx_expect {
                if self.active {
                    let e = std::mem::take(e);
                    if crate::debug() {
                        for (i, (a, b)) in e.iter().zip(&sent).enumerate() {
                            if let Some(at) = a.iter().zip(b).position(|(x, y)| x != y) {
                                eprintln!(
                                    "frame {i} differs at {at}: {:x?} vs {:x?}",
                                    &a[at..(at + 8).min(a.len())],
                                    &b[at..(at + 8).min(b.len())]
                                );
                            }
                        }
                    }
                    assert!(
                        e == sent,
                        "TX frames differ: expected lengths {:?}, sent {:?}",
                        e.iter().map(Vec::len).collect::<Vec<_>>(),
                        sent.iter().map(Vec::len).collect::<Vec<_>>()
                    );
                    assert!(used.iter().all(|u| u.1 == 0), "TX used length");
                } else {
                    assert!(sent.is_empty(), "inactive device transmitted");
                }
            }
        } else {
            assert!(sent.is_empty(), "frames sent on a kick of queue {q}");
        }
        if q == CTRL_QUEUE {
            let used = self.rings[2].take_used(&self.space);
            if self.active && self.ctrl_on {
                self.rings[2].outstanding = 0;
            }
            if let (Some(p), true) = (&mut self.ctrl_pending, self.active && self.ctrl_on) {
                let pending = std::mem::take(p);
                assert_eq!(used.len(), pending.len(), "control commands completed");
                for (c, u) in pending.iter().zip(&used) {
                    assert_eq!(u.0, u32::from(c.head), "control used order");
                    let mut ack = [0u8];
                    self.space.read(c.ack_at, &mut ack);
                    match c.expect {
                        Some(v) => {
                            assert_eq!((u.1, ack[0]), (1, v), "control ack");
                        }
                        None => assert_eq!((u.1, ack[0]), (0, 0xee), "ack without an ack byte"),
                    }
                }
            }
        }
    }

    fn check(&mut self) {
        let s = self.port.stats().snapshot();
        let backlog = self.port.backlog_len();
        assert!(backlog <= BACKLOG_FRAMES, "backlog {backlog}");
        assert_eq!(
            (s.rx_frames - self.base_rx.0) + (s.rx_dropped - self.base_rx.1) + backlog as u64,
            self.offered,
            "RX accounting: delivered + dropped + waiting != offered"
        );
        // TX: every used entry is one counted chain (frames + errors) while the driver side is
        // well-formed (a raw avail entry naming no descriptor is counted but cannot complete).
        let tx_used_now = self.tx_used
            + u64::from(
                self.rings[1]
                    .used_idx(&self.space)
                    .wrapping_sub(self.rings[1].used_seen),
            );
        assert!(
            self.tx_expect.is_none() || tx_used_now == s.tx_frames + s.tx_errors - self.tx_base,
            "TX used entries {tx_used_now} vs chains counted {}",
            s.tx_frames + s.tx_errors - self.tx_base
        );

        // RX used entries: posted chains, no longer than their buffers.
        let used = self.rings[0].take_used(&self.space);
        if let Some(p) = &mut self.rx_posted {
            for (id, len) in used {
                let cap = p.remove(&(id as u16));
                assert!(id < 0x1_0000, "RX used id {id}");
                let cap = cap.unwrap_or_else(|| panic!("RX used id {id} was not posted"));
                assert!(u64::from(len) <= cap, "RX used len {len} > {cap}");
            }
            if p.is_empty() {
                self.rings[0].outstanding = 0;
            }
        }
    }

    /// RAM no descriptor may point to, and (behind the IOMMU) RAM not mapped, is intact.
    fn check_untouched(&self) {
        let mut now = [0u8; 4096];
        for &(gpa, len) in &self.untouched {
            for at in (gpa..gpa + len).step_by(now.len()) {
                self.mem
                    .read_slice(&mut now, GuestAddress(at))
                    .expect("RAM");
                assert!(
                    now.iter().all(|&b| b == 0),
                    "device wrote RAM at {at:#x}.. it may not reach"
                );
            }
        }
    }

    fn step(&mut self, inp: &mut Input) {
        let o = inp.u8() % op::COUNT;
        if crate::debug() {
            let s = self.port.stats().snapshot();
            eprintln!(
                "op {o}: tx used {} (+{} unseen), frames {} errors {} base {}; size {} active {}",
                self.tx_used,
                self.rings[1]
                    .used_idx(&self.space)
                    .wrapping_sub(self.rings[1].used_seen),
                s.tx_frames,
                s.tx_errors,
                self.tx_base,
                self.rings[1].size,
                self.active
            );
        }
        match o {
            op::TX => self.tx(inp),
            op::RX_POST => self.rx_post(inp),
            op::CTRL => self.ctrl(inp),
            op::KICK => {
                let q = u16::from(inp.u8() % 4);
                self.kick(q);
            }
            op::DELIVER => self.deliver(inp),
            op::DESC => {
                let q = usize::from(inp.u8() % 3);
                let idx = inp.u16();
                let addr = raw_addr(inp);
                let (len, flags, next) = (inp.u32(), inp.u16(), inp.u16());
                self.rings[q].write_desc(&self.space, idx, addr, len, flags, next);
                self.unclean();
            }
            op::AVAIL => {
                let q = usize::from(inp.u8() % 3);
                let head = inp.u16();
                let bump = u16::from(inp.u8());
                self.rings[q].publish(&self.space, head, bump);
                self.unclean();
            }
            op::MEM => {
                // Buffers only (rings are corrupted through DESC and AVAIL).
                let a = TX_AREA.0 + u64::from(inp.u32()) % (CTRL_AREA.1 - TX_AREA.0);
                let data = inp.blob(64);
                let n = (data.len() as u64).min(CTRL_AREA.1 - a) as usize;
                self.space.write(a, &data[..n]);
                self.unclean();
            }
            op::ACTIVATE => {
                let (features, size) = features_and_size(inp, self.dev.device_features());
                self.activate(features, size);
            }
            _ => {
                self.dev.reset();
                self.active = false;
                self.rebase();
            }
        }
        self.check();
    }

    /// After a reset and a clean activation the device carries a frame each way and acks a
    /// command.
    fn still_works(&mut self) {
        let feats = self.dev.device_features();
        self.activate(feats, 16);
        assert!(self.active, "clean activation refused");
        let f = frame_bytes(100, 0x5a);
        let at = self.tx_area.alloc(200);
        let mut b = vec![0u8; HDR_BYTES];
        b.extend_from_slice(&f);
        self.space.write(at, &b);
        self.push(TX_QUEUE, &[(at, b.len() as u32, false)]);
        self.tx_expect = Some(vec![f.clone()]);
        self.kick(TX_QUEUE);
        let at = self.ctrl_area.alloc(4);
        self.space.write(at, &[0, 0, 0xee]);
        self.push(CTRL_QUEUE, &[(at, 2, false), (at + 2, 1, true)]);
        self.dev.queue_notify(CTRL_QUEUE);
        let mut ack = [0u8];
        self.space.read(at + 2, &mut ack);
        assert_eq!(ack[0], 0, "control command not acked after reset");
        let buf = self.rx_area.alloc(2048);
        let head = self.push(RX_QUEUE, &[(buf, 2048, true)]);
        self.rx_posted = Some(HashMap::from([(head, 2048)]));
        self.dev.queue_notify(RX_QUEUE);
        let before = self.rings[0].used_seen;
        self.offered += 1;
        let _ = self.port.deliver(&f);
        let used_idx = self.rings[0].used_idx(&self.space);
        assert_eq!(
            used_idx.wrapping_sub(before),
            1,
            "RX frame not delivered after reset"
        );
        let at = self.rings[0].used + 4 + 8 * u64::from(before % 16);
        assert_eq!(self.space.u32(at), u32::from(head));
        assert_eq!(self.space.u32(at + 4), (HDR_BYTES + f.len()) as u32);
        let mut got = vec![0u8; f.len()];
        self.space.read(buf + HDR_BYTES as u64, &mut got);
        assert!(got == f, "RX frame content after reset");
    }
}

fn features_and_size(inp: &mut Input, offered: u64) -> (u64, u16) {
    let drop = inp.u8();
    let mut f = offered;
    if drop & 1 != 0 {
        f &= !F_MRG_RXBUF;
    }
    if drop & 2 != 0 {
        f &= !F_CTRL_VQ;
    }
    if drop & 4 != 0 {
        f &= !F_ACCESS_PLATFORM;
    }
    if drop & 8 != 0 {
        f &= !F_VERSION_1;
    }
    if drop & 0xf0 == 0xf0 {
        f = inp.u64();
    }
    let s = inp.u8();
    let size = if s < 0xf0 {
        1u16 << (s % 9)
    } else {
        u16::from(s)
    };
    (f, size)
}

/// Run one fuzz input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let mut h = Harness::new(mode & 1 != 0);
    let (features, size) = features_and_size(&mut inp, h.dev.device_features());
    h.activate(features, size);
    let mut steps = 0;
    while !inp.is_empty() && steps < 256 {
        h.step(&mut inp);
        steps += 1;
    }
    if crate::debug() {
        eprintln!(
            "virtio_net: {steps} steps, active {}, exact checks {}, {:?}",
            h.active,
            h.tx_expect.is_some(),
            h.port.stats().snapshot()
        );
    }
    h.check_untouched();
    h.still_works();
    h.check();
    h.check_untouched();
    assert!(!h.iommu || h._iommu.is_some());
}

/// Seed encoders.
pub mod enc {
    use super::op;
    use crate::Enc;

    /// RX chains, each a list of buffer-length selectors (0: 1526 bytes, 0xff: 4096).
    pub fn rx_post(e: &mut Enc, chains: &[&[u8]]) {
        e.u8(op::RX_POST).u8(chains.len() as u8 - 1);
        for c in chains {
            e.u8(c.len() as u8 - 1).u8(0);
            for &l in c.iter() {
                e.u8(l);
            }
        }
    }

    /// Frames of these lengths from the backend.
    pub fn deliver(e: &mut Enc, batch: bool, lens: &[u16]) {
        e.u8(op::DELIVER)
            .u8(lens.len() as u8 - 1)
            .u8(u8::from(batch));
        for (i, &l) in lens.iter().enumerate() {
            if l < 3000 {
                e.u8(0).u16(l);
            } else {
                e.u8(0xe0).u16(l);
            }
            e.u8(i as u8);
        }
    }

    /// A well-formed TX frame of `len` bytes in `cuts.len() + 1` pieces.
    pub fn tx(e: &mut Enc, len: u16, cuts: &[u16]) {
        e.u8(op::TX).u8(0).u16(len).u8(cuts.len() as u8).u8(0).u8(7);
        for &c in cuts {
            e.u16(c);
        }
    }

    /// Kick queue `q`.
    pub fn kick(e: &mut Enc, q: u8) {
        e.u8(op::KICK).u8(q);
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, mode, drop) in [
        ("merge", 0u8, 0u8),
        ("nomerge", 0, 1),
        ("noctrl", 0, 2),
        ("iommu", 1, 0),
        ("iommu-nomerge", 1, 1),
    ] {
        let mut e = Enc::default();
        e.u8(mode).u8(drop).u8(4); // 16 entries
        enc::rx_post(&mut e, &[&[0], &[0xff, 0xff]]);
        enc::kick(&mut e, 0);
        enc::deliver(&mut e, true, &[60, 2900]);
        enc::deliver(&mut e, false, &[9000]);
        enc::rx_post(&mut e, &[&[0], &[0], &[0xff, 0xff, 0xff], &[0]]);
        enc::kick(&mut e, 0);
        // TX: a frame in 3 pieces, a writable descriptor, an unreachable one.
        enc::tx(&mut e, 1000, &[5, 500]);
        e.u8(op::TX).u8(0).u16(64).u8(0).u8(0x10).u8(1).u8(0);
        e.u8(op::TX)
            .u8(0)
            .u16(64)
            .u8(1)
            .u8(0x12)
            .u8(1)
            .u16(30)
            .u8(1)
            .u64(0);
        e.u8(op::TX)
            .u8(0)
            .u16(64)
            .u8(1)
            .u8(0x12)
            .u8(1)
            .u16(6)
            .u8(0)
            .u64(0);
        enc::kick(&mut e, 1);
        // Control: ok, unknown class, no ack, short.
        e.u8(op::CTRL).u8(0).u8(1).u8(1).u8(1).u8(0x40);
        e.u8(op::CTRL).u8(5).u8(0).u8(0).u8(0x41);
        e.u8(op::CTRL).u8(1).u8(0).u8(0).u8(0);
        e.u8(op::CTRL).u8(2).u8(0).u8(0).u8(0x20);
        enc::kick(&mut e, 2);
        enc::kick(&mut e, 3);
        out.push((name.to_string(), e.0));
    }
    // A full backlog, then buffers.
    let mut e = Enc::default();
    e.u8(0).u8(0).u8(8);
    for _ in 0..70 {
        enc::deliver(&mut e, true, &[100, 100, 100, 100]);
    }
    enc::rx_post(&mut e, &[&[0], &[0], &[0], &[0]]);
    enc::kick(&mut e, 0);
    out.push(("backlog".to_string(), e.0));
    // A broken avail index on TX, then re-activation.
    let mut e = Enc::default();
    e.u8(0).u8(0).u8(4);
    e.u8(op::AVAIL).u8(1).u16(0).u8(200);
    enc::kick(&mut e, 1);
    e.u8(op::ACTIVATE).u8(0).u8(3);
    enc::tx(&mut e, 100, &[]);
    enc::kick(&mut e, 1);
    out.push(("avail-jump".to_string(), e.0));
    // The largest frame each way.
    let mut e = Enc::default();
    e.u8(0).u8(0).u8(8);
    e.u8(op::TX).u8(0xf0).u8(2).u8(0).u8(0).u8(1);
    enc::kick(&mut e, 1);
    let big: Vec<&[u8]> = vec![&[0xff, 0xff, 0xff]; 6];
    enc::rx_post(&mut e, &big[..4]);
    enc::rx_post(&mut e, &big[..4]);
    e.u8(op::DELIVER)
        .u8(1)
        .u8(0)
        .u8(0xf8)
        .u8(2)
        .u8(1)
        .u8(0xf8)
        .u8(3)
        .u8(2);
    out.push(("max-frame".to_string(), e.0));
    out
}
