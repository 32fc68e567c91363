//! virtio-net on virtio-queue, optionally behind the vIOMMU.
//!
//! Queues: 0 = RX, 1 = TX, 2 = control. Features: VERSION_1, MAC, STATUS (link always up),
//! MRG_RXBUF, CTRL_VQ + CTRL_RX (every control command acknowledged), and ACCESS_PLATFORM
//! with `iommu=on`. No offloads, no EVENT_IDX, no multiqueue.
//!
//! TX is served on the vCPU thread that kicked (inline notify): each frame goes to the
//! backend (a hub delivers it straight into the peers' RX queues). RX frames are written into
//! the guest's buffers when there are some, else kept in a bounded per-port backlog (dropped
//! and counted past it) that is drained when the driver replenishes the RX queue. Behind the
//! vIOMMU every ring and buffer access is translated through the endpoint, one pinned view
//! per TX chain and per RX frame.
//!
//! Every chain is hostile: a bad TX chain is completed with used length 0 and counted, a bad
//! RX chain is completed empty, oversized frames are dropped; nothing panics.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use viommu::{EndpointHandle, TranslatedMemory};
use virtio_dev::{ActivateError, QueueConfig, VirtioDevice, VirtioInterrupt};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic,
    GuestMemoryMmap,
};
use vmm_sys_util::eventfd::EventFd;

use super::rings::{walk_chain, Buffers, Desc, QueueRings};
use crate::net::{Delivery, FrameSink, Hubs, NetBackend, Tap};

/// Virtio device type of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of `struct virtio_net_hdr_v1` (VERSION_1 always has `num_buffers`).
pub const HDR_BYTES: usize = 12;
/// Largest Ethernet frame carried (no GSO is offered, so anything bigger is hostile).
pub const MAX_FRAME_BYTES: usize = 65_550;
/// Frames kept per port while the guest has no RX buffers; more are dropped.
pub const BACKLOG_FRAMES: usize = 256;

/// Queue indexes.
pub const RX_QUEUE: u16 = 0;
/// Transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Control queue.
pub const CTRL_QUEUE: u16 = 2;

/// Feature bits.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Mergeable receive buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// Link status in config space.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// Control queue.
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
/// RX mode control (promiscuous, all-multicast).
pub const VIRTIO_NET_F_CTRL_RX: u64 = 1 << 18;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_ACCESS_PLATFORM (device behind an IOMMU).
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;

/// Config space `status`: link up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Control command acknowledgements.
pub const VIRTIO_NET_OK: u8 = 0;
/// Control command refused.
pub const VIRTIO_NET_ERR: u8 = 1;
/// Control classes we acknowledge: RX mode, MAC table/address, VLAN filter, announce.
const CTRL_CLASSES_OK: [u8; 4] = [0, 1, 2, 3];

const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Where a port's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackendConfig {
    /// A TAP interface of this name.
    Tap(String),
    /// An in-process hub of this name.
    Hub(String),
}

/// `--net` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Backend.
    pub backend: NetBackendConfig,
    /// MAC address (`None`: generated).
    pub mac: Option<[u8; 6]>,
    /// Put the device behind the vIOMMU (offers VIRTIO_F_ACCESS_PLATFORM).
    pub iommu: bool,
}

fn parse_mac(v: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("mac={v}: expected six hex bytes a:b:c:d:e:f"));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| !p.is_empty() && p.len() <= 2)
            .ok_or(format!("mac={v}: bad byte '{p}'"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("mac={v}: multicast address"));
    }
    Ok(mac)
}

impl NetConfig {
    /// Parse `tap=NAME|hub=ID[,mac=52:54:00:12:34:56][,iommu=on]`.
    pub fn parse(s: &str) -> Result<NetConfig, String> {
        let mut backend = None;
        let mut mac = None;
        let mut iommu = false;
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("net option '{part}' is not key=value"))?;
            let set = |b: &mut Option<NetBackendConfig>, n: NetBackendConfig| {
                if b.replace(n).is_some() {
                    Err("net: give one of tap= or hub=".to_string())
                } else {
                    Ok(())
                }
            };
            match k {
                "tap" if !v.is_empty() && v.len() < 16 => {
                    set(&mut backend, NetBackendConfig::Tap(v.into()))?
                }
                "hub" if !v.is_empty() => set(&mut backend, NetBackendConfig::Hub(v.into()))?,
                "mac" => mac = Some(parse_mac(v)?),
                "iommu" => {
                    iommu = match v {
                        "on" | "true" | "yes" | "1" => true,
                        "off" | "false" | "no" | "0" => false,
                        _ => return Err(format!("iommu={v}: expected on or off")),
                    }
                }
                _ => return Err(format!("unknown net option '{part}'")),
            }
        }
        Ok(NetConfig {
            backend: backend.ok_or("net needs tap=NAME or hub=ID")?,
            mac,
            iommu,
        })
    }
}

/// A generated MAC: locally administered, unique within the process.
fn generated_mac() -> [u8; 6] {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    [0x52, 0x54, 0x00, (pid >> 8) as u8, pid as u8, n as u8]
}

/// Per-port counters.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames the guest sent.
    pub tx_frames: AtomicU64,
    /// TX chains refused (bad layout, oversized, translation miss).
    pub tx_errors: AtomicU64,
    /// Frames written into the guest's RX buffers.
    pub rx_frames: AtomicU64,
    /// Frames dropped on the way in (backlog full, device stopped, oversized, guest memory).
    pub rx_dropped: AtomicU64,
    /// RX chains completed empty because they were malformed.
    pub rx_bad_chains: AtomicU64,
    /// Control commands served.
    pub ctrl_commands: AtomicU64,
    /// Driver kicks of the TX queue.
    pub tx_kicks: AtomicU64,
    /// Driver kicks of the RX queue.
    pub rx_kicks: AtomicU64,
}

/// A snapshot of [`NetStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStatsSnapshot {
    /// See [`NetStats::tx_frames`].
    pub tx_frames: u64,
    /// See [`NetStats::tx_errors`].
    pub tx_errors: u64,
    /// See [`NetStats::rx_frames`].
    pub rx_frames: u64,
    /// See [`NetStats::rx_dropped`].
    pub rx_dropped: u64,
    /// See [`NetStats::rx_bad_chains`].
    pub rx_bad_chains: u64,
    /// See [`NetStats::ctrl_commands`].
    pub ctrl_commands: u64,
    /// See [`NetStats::tx_kicks`].
    pub tx_kicks: u64,
    /// See [`NetStats::rx_kicks`].
    pub rx_kicks: u64,
}

impl NetStatsSnapshot {
    /// `net: mac=.. tx_frames=.. ...` for the exit summary (one line per port).
    pub fn summary_line(&self, mac: [u8; 6]) -> String {
        let m: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "net: mac={} tx_frames={} rx_frames={} tx_kicks={} rx_kicks={} tx_errors={} \
             rx_dropped={} rx_bad_chains={} ctrl_commands={}",
            m.join(":"),
            self.tx_frames,
            self.rx_frames,
            self.tx_kicks,
            self.rx_kicks,
            self.tx_errors,
            self.rx_dropped,
            self.rx_bad_chains,
            self.ctrl_commands
        )
    }
}

impl NetStats {
    /// Current values.
    pub fn snapshot(&self) -> NetStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetStatsSnapshot {
            tx_frames: l(&self.tx_frames),
            tx_errors: l(&self.tx_errors),
            rx_frames: l(&self.rx_frames),
            rx_dropped: l(&self.rx_dropped),
            rx_bad_chains: l(&self.rx_bad_chains),
            ctrl_commands: l(&self.ctrl_commands),
            tx_kicks: l(&self.tx_kicks),
            rx_kicks: l(&self.rx_kicks),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// How an activated device reaches guest memory.
enum NetMemory {
    /// Guest-physical addresses (no vIOMMU).
    Direct(GuestMemoryAtomic<GuestMemoryMmap>),
    /// IOVAs of a vIOMMU endpoint.
    Translated(Box<TranslatedMemory>),
}

/// Whether the driver wants an interrupt (no EVENT_IDX: the avail ring's NO_INTERRUPT flag).
fn wants_interrupt<M: GuestMemory>(queue: &Queue, mem: &M) -> bool {
    std::sync::atomic::fence(Ordering::SeqCst);
    match mem.read_obj::<u16>(GuestAddress(queue.avail_ring())) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

// ---------------------------------------------------------------------------------------
// RX side: the port's sink, shared with the backend (a hub peer's vCPU, a TAP reader).
// ---------------------------------------------------------------------------------------

/// The activated RX queue.
struct RxQueue {
    mem: NetMemory,
    ring: RxRing,
}

/// The RX virtqueue and what writing frames into it needs (apart from its memory, which a
/// batch pins separately).
struct RxRing {
    queue: Queue,
    rings: QueueRings,
    interrupt: Arc<dyn VirtioInterrupt>,
    mergeable: bool,
    /// Scratch kept between frames (no allocation per frame): the descriptors of the chains
    /// taken for the frame being written, and per chain (head, end in `descs`, bytes).
    descs: Vec<Desc>,
    chains: Vec<(u16, usize, u64)>,
}

/// Why a frame could not be written now.
#[derive(Debug, PartialEq, Eq)]
enum RxError {
    /// Not enough RX buffers available: keep the frame for later.
    NoBuffers,
    /// The frame can never fit (or guest memory failed): drop it.
    Drop,
}

/// Number of writable bytes in a chain, or `None` if it has a readable descriptor.
fn writable_bytes(descs: &[Desc]) -> Option<u64> {
    if descs.is_empty() || descs.iter().any(|d| !d.2) {
        return None;
    }
    Some(descs.iter().map(|d| u64::from(d.1)).sum())
}

/// Write the concatenation of `parts` across the descriptors of one chain; returns the bytes
/// written (at most the chain's room).
fn write_chain<M: Buffers>(
    mem: &M,
    descs: &[Desc],
    parts: [&[u8]; 2],
) -> Result<usize, vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    let mut part = 0usize; // index in `parts`
    let mut at = 0usize; // offset in parts[part]
    for &(addr, len, _) in descs {
        let mut room = len as usize;
        let mut dst = addr;
        while room > 0 && part < parts.len() {
            let src = &parts[part][at..];
            if src.is_empty() {
                part += 1;
                at = 0;
                continue;
            }
            let n = room.min(src.len());
            mem.write_buf(&src[..n], dst)?;
            room -= n;
            if room > 0 {
                dst = dst
                    .checked_add(n as u64)
                    .ok_or(vm_memory::GuestMemoryError::GuestAddressOverflow)?;
            }
            at += n;
            done += n;
        }
        if part == parts.len() {
            break;
        }
    }
    Ok(done)
}

impl RxRing {
    /// Write one frame (header prepended) into as many chains as it needs.
    fn write_frame<R: GuestMemory, B: Buffers>(
        &mut self,
        rings: &R,
        bufs: &B,
        frame: &[u8],
        stats: &NetStats,
    ) -> Result<(), RxError> {
        let needed = (HDR_BYTES + frame.len()) as u64;
        let size = self.queue.size();
        self.descs.clear();
        self.chains.clear();
        let mut total = 0u64;
        while total < needed {
            let Some(chain) = self.queue.pop_descriptor_chain(rings) else {
                // Put back what we took; if the whole ring is ours and still too small,
                // the frame can never fit.
                let popped = self.chains.len();
                for _ in 0..popped {
                    self.queue.go_to_previous_position();
                }
                return if popped >= usize::from(size) {
                    Err(RxError::Drop)
                } else {
                    Err(RxError::NoBuffers)
                };
            };
            let head = chain.head_index();
            let from = self.descs.len();
            let n = if walk_chain(rings, &self.queue, head, &mut self.descs) {
                writable_bytes(&self.descs[from..]).filter(|&n| n > 0)
            } else {
                None
            };
            match n {
                Some(n) => {
                    total += n;
                    self.chains.push((head, self.descs.len(), n));
                }
                None => {
                    self.descs.truncate(from);
                    log::warn!("virtio-net: malformed RX chain {head}, completed empty");
                    bump(&stats.rx_bad_chains);
                    if self.chains.is_empty() {
                        if let Err(e) = self.queue.add_used(rings, head, 0) {
                            log::warn!("virtio-net: add_used: {e}");
                        }
                        continue;
                    }
                    // The chains popped before it must be completed first (used ring order):
                    // give them back empty too and drop the frame.
                    for i in 0..self.chains.len() {
                        let _ = self.queue.add_used(rings, self.chains[i].0, 0);
                    }
                    let _ = self.queue.add_used(rings, head, 0);
                    return Err(RxError::Drop);
                }
            }
            if !self.mergeable && total < needed {
                // One chain per frame: it does not fit. Give the chain back, drop the frame.
                self.queue.go_to_previous_position();
                return Err(RxError::Drop);
            }
        }
        // Header + frame, spread over the chains.
        let mut hdr = [0u8; HDR_BYTES];
        let nbufs = if self.mergeable {
            self.chains.len() as u16
        } else {
            1
        };
        hdr[10..12].copy_from_slice(&nbufs.to_le_bytes());
        let mut failed = false;
        let mut off = 0usize; // offset in header+frame
        let mut from = 0usize;
        for i in 0..self.chains.len() {
            let (_, end, cap) = self.chains[i];
            let want = (cap as usize).min(needed as usize - off);
            // The part of header+frame for this chain: [off, off + want).
            let h = &hdr[off.min(HDR_BYTES)..(off + want).min(HDR_BYTES)];
            let f = &frame[off.saturating_sub(HDR_BYTES)..(off + want).saturating_sub(HDR_BYTES)];
            let len = match write_chain(bufs, &self.descs[from..end], [h, f]) {
                Ok(n) => n as u32,
                Err(e) => {
                    log::warn!("virtio-net: RX buffer write: {e}");
                    failed = true;
                    0
                }
            };
            // The used length of chain i goes where its byte count was.
            self.chains[i].2 = u64::from(len);
            off += want;
            from = end;
        }
        if failed {
            self.chains.iter_mut().for_each(|c| c.2 = 0);
        }
        self.publish(rings);
        if failed {
            Err(RxError::Drop)
        } else {
            Ok(())
        }
    }

    /// Put the taken chains (with their used lengths) on the used ring and make them visible
    /// with one index update (so the driver never sees part of a merged frame).
    fn publish<M: GuestMemory>(&mut self, mem: &M) {
        let size = self.queue.size();
        let n = self.chains.len();
        if size == 0 || n == 0 {
            return;
        }
        let first = self.queue.next_used();
        for (i, &(head, _, len)) in self.chains.iter().enumerate().take(n - 1) {
            let slot = u64::from(first.wrapping_add(i as u16) % size);
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&(len as u32).to_le_bytes());
            let at = GuestAddress(self.queue.used_ring()).checked_add(4 + slot * 8);
            if let Some(at) = at {
                if let Err(e) = mem.write_slice(&elem, at) {
                    log::warn!("virtio-net: used ring write: {e}");
                }
            }
        }
        self.queue.set_next_used(first.wrapping_add(n as u16 - 1));
        let (head, _, len) = self.chains[n - 1];
        if let Err(e) = self.queue.add_used(mem, head, len as u32) {
            log::warn!("virtio-net: add_used: {e}");
        }
    }
}

/// Mutable RX state of a port.
#[derive(Default)]
struct RxState {
    active: Option<RxQueue>,
    backlog: VecDeque<Vec<u8>>,
}

/// The receive side of a port: RX queue (once activated) and backlog, behind one lock taken
/// by whoever delivers (a hub peer's vCPU, a TAP reader) and by the RX kick.
pub struct NetPort {
    state: Mutex<RxState>,
    stats: NetStats,
}

impl NetPort {
    fn new() -> NetPort {
        NetPort {
            state: Mutex::new(RxState::default()),
            stats: NetStats::default(),
        }
    }

    /// The port's counters.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Frames waiting for RX buffers.
    pub fn backlog_len(&self) -> usize {
        self.lock().backlog.len()
    }

    /// Write backlog frames into RX buffers while there are some; signal the driver if it
    /// wants it. Keeps RX kicks enabled only while frames wait.
    fn drain(&self, st: &mut RxState) {
        self.fill(st, &[]);
    }

    /// Write the backlog, then `frames` (new arrivals, in order), into RX buffers while there
    /// are some; what does not fit waits in the backlog (bounded). One pinned view, one
    /// notification update and at most one interrupt for the whole call. Returns how many of
    /// `frames` were taken (delivered or queued).
    fn fill(&self, st: &mut RxState, frames: &[&[u8]]) -> usize {
        let RxState { active, backlog } = st;
        let Some(rx) = active.as_mut() else {
            for _ in frames {
                bump(&self.stats.rx_dropped);
            }
            return 0;
        };
        match &rx.mem {
            NetMemory::Direct(m) => {
                let g = m.memory();
                rx.ring.fill(&*g, &*g, backlog, frames, &self.stats)
            }
            NetMemory::Translated(t) => {
                let p = t.pin_view();
                let ring = &mut rx.ring;
                if ring.rings.prepare(&mut ring.queue, &p) {
                    ring.fill(p.backend(), &p, backlog, frames, &self.stats)
                } else {
                    ring.fill(&p, &p, backlog, frames, &self.stats)
                }
            }
        }
    }
}

impl RxRing {
    /// See [`NetPort::fill`]; `mem` is the queue's memory, pinned by the caller.
    fn fill<R: GuestMemory, B: Buffers>(
        &mut self,
        rings: &R,
        bufs: &B,
        backlog: &mut VecDeque<Vec<u8>>,
        frames: &[&[u8]],
        stats: &NetStats,
    ) -> usize {
        let mut next = 0; // first of `frames` not yet handled
        let mut taken = 0;
        let mut used = false;
        let mut idle_rounds = 0;
        loop {
            let mut progress = false;
            loop {
                // Backlog first (arrival order), then the new frames.
                let (r, from_backlog) = match (backlog.front(), frames.get(next)) {
                    (Some(f), _) => (self.write_frame(rings, bufs, f, stats), true),
                    (None, Some(f)) => (self.write_frame(rings, bufs, f, stats), false),
                    (None, None) => break,
                };
                let delivered = match r {
                    Ok(()) => {
                        bump(&stats.rx_frames);
                        true
                    }
                    Err(RxError::NoBuffers) => break,
                    Err(RxError::Drop) => {
                        bump(&stats.rx_dropped);
                        false
                    }
                };
                used = true;
                progress = true;
                if from_backlog {
                    backlog.pop_front();
                } else {
                    next += 1;
                    taken += usize::from(delivered);
                }
            }
            // No buffers for the rest of the new frames: they wait, while there is room.
            for f in &frames[next..] {
                if backlog.len() >= BACKLOG_FRAMES {
                    bump(&stats.rx_dropped);
                } else {
                    backlog.push_back(f.to_vec());
                    taken += 1;
                }
            }
            next = frames.len();
            // Ask for kicks only while something waits; recheck after enabling.
            let more = set_notify(&mut self.queue, rings, !backlog.is_empty());
            // Buffers arrived while kicks were off: look again, but only once more without
            // progress (a merged frame may need more buffers than the driver has posted yet;
            // its next kick brings them).
            if !more {
                break;
            }
            if !progress {
                idle_rounds += 1;
                if idle_rounds > 1 {
                    break;
                }
            }
        }
        if used && wants_interrupt(&self.queue, rings) {
            self.interrupt.signal_queue(RX_QUEUE);
        }
        taken
    }
}

/// Enable (`on`) or disable driver kicks; true if buffers arrived meanwhile and the caller
/// should look again.
fn set_notify<M: GuestMemory>(q: &mut Queue, mem: &M, on: bool) -> bool {
    if on {
        match q.enable_notification(mem) {
            Ok(more) => {
                more && q.pop_descriptor_chain(mem).is_some() && {
                    q.go_to_previous_position();
                    true
                }
            }
            Err(e) => {
                log::warn!("virtio-net: enable notification: {e}");
                false
            }
        }
    } else {
        if let Err(e) = q.disable_notification(mem) {
            log::warn!("virtio-net: disable notification: {e}");
        }
        false
    }
}

impl FrameSink for NetPort {
    fn deliver(&self, frame: &[u8]) -> Delivery {
        if frame.len() > MAX_FRAME_BYTES {
            bump(&self.stats.rx_dropped);
            return Delivery::Dropped;
        }
        let mut st = self.lock();
        let before = self.stats.rx_frames.load(Ordering::Relaxed);
        if self.fill(&mut st, &[frame]) == 0 {
            Delivery::Dropped
        } else if self.stats.rx_frames.load(Ordering::Relaxed) > before {
            Delivery::Delivered
        } else {
            Delivery::Queued
        }
    }

    fn deliver_batch(&self, frames: &[&[u8]]) -> usize {
        let ok: Vec<&[u8]> = frames
            .iter()
            .copied()
            .filter(|f| f.len() <= MAX_FRAME_BYTES)
            .collect();
        for _ in ok.len()..frames.len() {
            bump(&self.stats.rx_dropped);
        }
        let mut st = self.lock();
        self.fill(&mut st, &ok)
    }
}

// ---------------------------------------------------------------------------------------
// TX and control: served on the kicking vCPU thread.
// ---------------------------------------------------------------------------------------

/// Frames read from a TX queue, handed to the backend together (one lock and one interrupt
/// on the receiving side per batch). Its buffers are kept between batches.
#[derive(Default)]
struct TxBatch {
    data: Vec<u8>,
    /// End offset of each frame in `data`.
    ends: Vec<usize>,
}

impl TxBatch {
    /// Frames per batch.
    const MAX_FRAMES: usize = 64;
    /// Bytes per batch (a batch of full-size frames is cut short).
    const MAX_BYTES: usize = 256 << 10;

    fn full(&self) -> bool {
        self.ends.len() >= Self::MAX_FRAMES || self.data.len() >= Self::MAX_BYTES
    }

    /// Hand the frames to `backend` and start over.
    fn flush(&mut self, backend: &dyn NetBackend) {
        if self.ends.is_empty() {
            return;
        }
        let mut frames = Vec::with_capacity(self.ends.len());
        let mut start = 0;
        for &end in &self.ends {
            frames.push(&self.data[start..end]);
            start = end;
        }
        backend.transmit_batch(&frames);
        self.data.clear();
        self.ends.clear();
    }
}

/// Serve one TX chain: its frame joins `batch` (sent when full); 0 is its used length.
fn tx_chain<M: Buffers>(
    mem: &M,
    descs: Option<&[Desc]>,
    batch: &mut TxBatch,
    backend: &dyn NetBackend,
    stats: &NetStats,
) -> u32 {
    if descs.is_some_and(|d| read_tx(mem, d, &mut batch.data)) {
        bump(&stats.tx_frames);
        batch.ends.push(batch.data.len());
        if batch.full() {
            batch.flush(backend);
        }
    } else {
        log::warn!("virtio-net: malformed or oversized TX chain dropped");
        bump(&stats.tx_errors);
    }
    0
}

/// Append a TX chain's frame (what follows the header) to `out`; false (and `out` as it
/// was) if the chain is malformed.
fn read_tx<M: Buffers>(mem: &M, descs: &[Desc], out: &mut Vec<u8>) -> bool {
    if descs.iter().any(|d| d.2) {
        return false;
    }
    let total: u64 = descs.iter().map(|d| u64::from(d.1)).sum();
    if total < HDR_BYTES as u64 || total - HDR_BYTES as u64 > MAX_FRAME_BYTES as u64 {
        return false;
    }
    let start = out.len();
    out.resize(start + (total - HDR_BYTES as u64) as usize, 0);
    let mut skip = HDR_BYTES;
    let mut off = start;
    for &(addr, len, _) in descs {
        let len = len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = len - skip;
        let ok = addr
            .checked_add(skip as u64)
            .is_some_and(|a| mem.read_buf(&mut out[off..off + n], a).is_ok());
        if !ok {
            out.truncate(start);
            return false;
        }
        skip = 0;
        off += n;
    }
    true
}

/// Serve one control command; returns the used length (1 for the ack byte, 0 if malformed).
fn ctrl_command<M: GuestMemory>(mem: &M, descs: &[Desc]) -> u32 {
    let first_w = descs.iter().position(|d| d.2).unwrap_or(descs.len());
    let ack_at = match descs.last() {
        Some(&(a, l, true)) if l > 0 && descs[first_w..].iter().all(|d| d.2) => a,
        _ => {
            log::warn!("virtio-net: control command without an ack byte");
            return 0;
        }
    };
    let mut class_cmd = [0u8; 2];
    let mut got = 0;
    for &(addr, len, _) in &descs[..first_w] {
        if got == 2 {
            break;
        }
        let n = (len as usize).min(2 - got);
        if mem.read_slice(&mut class_cmd[got..got + n], addr).is_err() {
            return 0;
        }
        got += n;
    }
    let ack = if got == 2 && CTRL_CLASSES_OK.contains(&class_cmd[0]) {
        log::debug!(
            "virtio-net: control class {} cmd {}: ok",
            class_cmd[0],
            class_cmd[1]
        );
        VIRTIO_NET_OK
    } else {
        log::debug!("virtio-net: control {class_cmd:?} ({got} bytes): refused");
        VIRTIO_NET_ERR
    };
    match mem.write_obj(ack, ack_at) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

/// Chains served under one pinned view before taking a fresh one: bounds how long a busy
/// queue can hold an old view (and so delay a synchronous UNMAP).
const CHAINS_PER_PIN: u32 = 64;

/// What one round of [`serve_some`] did.
#[derive(Clone, Copy, Debug, Default)]
struct Round {
    /// Chains were completed.
    used: bool,
    /// The queue is empty and kicks are enabled again (else: call again, with a fresh pin).
    finished: bool,
    /// When finished: the driver wants interrupts.
    interrupt: bool,
}

/// Pop and serve up to [`CHAINS_PER_PIN`] chains of a TX or control queue, rings through
/// `rings` and buffers through `bufs` (one pinned view); `f` gets each chain's descriptors
/// (`None` if malformed) and returns its used length.
fn serve_some<R, B, F>(queue: &mut Queue, rings: &R, bufs: &B, mut f: F) -> Round
where
    R: GuestMemory,
    B: GuestMemory,
    F: FnMut(&B, Option<&[Desc]>) -> u32,
{
    let mut round = Round::default();
    let mut descs: Vec<Desc> = Vec::new();
    let mut served = 0u32;
    loop {
        if let Err(e) = queue.disable_notification(rings) {
            log::warn!("virtio-net: disable notification: {e}");
            round.finished = true;
            return round;
        }
        let mut popped = false;
        while let Some(chain) = queue.pop_descriptor_chain(rings) {
            popped = true;
            let head = chain.head_index();
            descs.clear();
            let ok = walk_chain(rings, queue, head, &mut descs);
            let len = f(bufs, ok.then_some(&descs[..]));
            if let Err(e) = queue.add_used(rings, head, len) {
                log::warn!("virtio-net: add_used: {e}");
            }
            round.used = true;
            served += 1;
            if served == CHAINS_PER_PIN {
                // Kicks stay off: the caller comes back at once with a fresh view.
                return round;
            }
        }
        match queue.enable_notification(rings) {
            Ok(true) if !popped => {
                log::error!("virtio-net: avail index out of range; ignoring the queue until reset");
                break;
            }
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                log::warn!("virtio-net: enable notification: {e}");
                break;
            }
        }
    }
    round.finished = true;
    round.interrupt = wants_interrupt(queue, rings);
    round
}

/// Serve a TX or control `queue` to the end, one pinned view (and ring preparation) per
/// [`serve_some`] round; `f` serves one chain given its buffer memory. Returns whether to
/// interrupt the driver.
macro_rules! serve_queue {
    ($mem:expr, $queue:expr, $rings:expr, $f:expr) => {{
        let mut used = false;
        loop {
            let r = match $mem {
                NetMemory::Direct(m) => {
                    let g = m.memory();
                    serve_some($queue, &*g, &*g, $f)
                }
                NetMemory::Translated(t) => {
                    let p = t.pin_view();
                    if $rings.prepare($queue, &p) {
                        serve_some($queue, p.backend(), &p, $f)
                    } else {
                        serve_some($queue, &p, &p, $f)
                    }
                }
            };
            used |= r.used;
            if r.finished {
                break used && r.interrupt;
            }
        }
    }};
}

/// State of an activated device (TX and control queues; RX lives in the [`NetPort`]).
struct Active {
    mem: NetMemory,
    tx: Queue,
    tx_rings: QueueRings,
    ctrl: Option<(Queue, QueueRings)>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// The virtio-net device model.
pub struct Net {
    config: NetConfig,
    mac: [u8; 6],
    endpoint: Option<EndpointHandle>,
    features: u64,
    port: Arc<NetPort>,
    backend: Box<dyn NetBackend>,
    tx_batch: TxBatch,
    active: Option<Active>,
}

impl Net {
    /// Create a device joined to its backend (`hubs` resolves `hub=ID`); with `endpoint`
    /// every DMA is translated through that vIOMMU endpoint.
    pub fn new(
        cfg: NetConfig,
        endpoint: Option<EndpointHandle>,
        hubs: &Hubs,
    ) -> std::io::Result<Net> {
        let port = Arc::new(NetPort::new());
        let backend: Box<dyn NetBackend> = match &cfg.backend {
            NetBackendConfig::Hub(id) => {
                let sink: Weak<dyn FrameSink> = Arc::downgrade(&port) as Weak<dyn FrameSink>;
                Box::new(hubs.get(id).join(sink))
            }
            NetBackendConfig::Tap(name) => Box::new(Tap::open(name, port.clone())?),
        };
        Ok(Net::with_backend(cfg, endpoint, port, backend))
    }

    /// Create a device with an explicit backend; `port` must be the sink the backend
    /// delivers to.
    pub fn with_backend(
        cfg: NetConfig,
        endpoint: Option<EndpointHandle>,
        port: Arc<NetPort>,
        backend: Box<dyn NetBackend>,
    ) -> Net {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_MRG_RXBUF
            | VIRTIO_NET_F_CTRL_VQ
            | VIRTIO_NET_F_CTRL_RX;
        if cfg.iommu {
            features |= VIRTIO_F_ACCESS_PLATFORM;
        }
        let mac = cfg.mac.unwrap_or_else(generated_mac);
        Net {
            config: cfg,
            mac,
            endpoint,
            features,
            port,
            backend,
            tx_batch: TxBatch::default(),
            active: None,
        }
    }

    /// A fresh RX port to pass to [`Net::with_backend`].
    pub fn new_port() -> Arc<NetPort> {
        Arc::new(NetPort::new())
    }

    /// The options the device was created with.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The MAC address in config space.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The port (RX side and counters).
    pub fn port(&self) -> &Arc<NetPort> {
        &self.port
    }

    fn stop(&mut self) {
        self.active = None;
        let mut st = self.port.lock();
        st.active = None;
        st.backlog.clear();
    }

    fn serve_tx(&mut self) {
        let Net {
            active,
            port,
            backend,
            tx_batch,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return;
        };
        let stats = &port.stats;
        let backend: &dyn NetBackend = &**backend;
        let irq = serve_queue!(&a.mem, &mut a.tx, a.tx_rings, |mem: &_, d| tx_chain(
            mem, d, tx_batch, backend, stats
        ));
        tx_batch.flush(backend);
        if irq {
            a.interrupt.signal_queue(TX_QUEUE);
        }
    }

    fn serve_ctrl(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some((q, rings)) = a.ctrl.as_mut() else {
            return;
        };
        let stats = &self.port.stats;
        let irq = serve_queue!(&a.mem, q, rings, |mem: &_, d: Option<&[Desc]>| {
            bump(&stats.ctrl_commands);
            d.map_or(0, |d| ctrl_command(mem, d))
        });
        if irq {
            a.interrupt.signal_queue(CTRL_QUEUE);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop();
    }
}

fn build_queue<M: GuestMemory>(qc: &QueueConfig, mem: &M) -> Result<Queue, ActivateError> {
    if !qc.ready {
        return Err(ActivateError::BadQueue(format!("{qc:?} is not enabled")));
    }
    let mut q = Queue::new(QUEUE_SIZE).map_err(|e| ActivateError::BadQueue(e.to_string()))?;
    q.set_size(qc.size);
    let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
    let (l, h) = split(qc.desc_table);
    q.set_desc_table_address(l, h);
    let (l, h) = split(qc.avail_ring);
    q.set_avail_ring_address(l, h);
    let (l, h) = split(qc.used_ring);
    q.set_used_ring_address(l, h);
    q.set_ready(true);
    if !q.is_valid(mem) {
        return Err(ActivateError::BadQueue(format!(
            "{qc:?} is not a valid queue"
        )));
    }
    Ok(q)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    /// `struct virtio_net_config`: mac[6], status, max_virtqueue_pairs, mtu.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&1500u16.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-net: ignoring config write at {offset:#x} ({} bytes)",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        acked_features: u64,
        queues: Vec<QueueConfig>,
        _kicks: Vec<EventFd>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.stop();
        let ctrl_on = acked_features & VIRTIO_NET_F_CTRL_VQ != 0;
        let wanted = if ctrl_on { 3 } else { 2 };
        if queues.len() < wanted {
            return Err(ActivateError::BadQueue(format!(
                "expected {wanted} queues, got {}",
                queues.len()
            )));
        }
        let netmem = match (&self.endpoint, self.config.iommu) {
            (_, false) => NetMemory::Direct(mem.clone()),
            (None, true) => {
                return Err(ActivateError::BadQueue(
                    "iommu=on net without a vIOMMU endpoint".into(),
                ))
            }
            (Some(_), true) if acked_features & VIRTIO_F_ACCESS_PLATFORM == 0 => {
                log::warn!("virtio-net: driver did not accept VIRTIO_F_ACCESS_PLATFORM");
                return Err(ActivateError::BadQueue(
                    "VIRTIO_F_ACCESS_PLATFORM not accepted by the driver".into(),
                ));
            }
            (Some(ep), true) => {
                NetMemory::Translated(Box::new(TranslatedMemory::from_atomic(&mem, ep.clone())))
            }
        };
        let mut qs = match &netmem {
            NetMemory::Direct(m) => {
                let g = m.memory();
                queues[..wanted]
                    .iter()
                    .map(|qc| build_queue(qc, &*g))
                    .collect::<Result<Vec<_>, _>>()?
            }
            NetMemory::Translated(t) => {
                let p = t.pin();
                queues[..wanted]
                    .iter()
                    .map(|qc| build_queue(qc, &p))
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        let ctrl = if ctrl_on { qs.pop() } else { None };
        let tx = qs
            .pop()
            .ok_or(ActivateError::BadQueue("no TX queue".into()))?;
        let rxq = qs
            .pop()
            .ok_or(ActivateError::BadQueue("no RX queue".into()))?;
        let rx_mem = match &netmem {
            NetMemory::Direct(m) => NetMemory::Direct(m.clone()),
            NetMemory::Translated(t) => NetMemory::Translated(t.clone()),
        };
        {
            let mut st = self.port.lock();
            st.backlog.clear();
            st.active = Some(RxQueue {
                mem: rx_mem,
                ring: RxRing {
                    descs: Vec::new(),
                    chains: Vec::new(),
                    rings: QueueRings::new(&rxq),
                    queue: rxq,
                    interrupt: interrupt.clone(),
                    mergeable: acked_features & VIRTIO_NET_F_MRG_RXBUF != 0,
                },
            });
            // No frames wait yet: the driver need not kick RX.
            self.port.drain(&mut st);
        }
        self.active = Some(Active {
            mem: netmem,
            tx_rings: QueueRings::new(&tx),
            tx,
            ctrl: ctrl.map(|q| {
                let r = QueueRings::new(&q);
                (q, r)
            }),
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }

    fn inline_notify(&self) -> bool {
        true
    }

    fn queue_notify(&mut self, queue: u16) {
        match queue {
            RX_QUEUE => {
                bump(&self.port.stats.rx_kicks);
                let mut st = self.port.lock();
                self.port.drain(&mut st);
            }
            TX_QUEUE => {
                bump(&self.port.stats.tx_kicks);
                self.serve_tx()
            }
            CTRL_QUEUE => self.serve_ctrl(),
            q => log::warn!("virtio-net: notify for absent queue {q}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_iommu::{push_chain, MockIommu};
    use virtio_queue::mock::MockSplitQueue;

    const QSIZE: u16 = 64;
    /// Rings of queue i at RING_BASE + i * 0x1000; buffers from BUF_BASE.
    const RING_BASE: u64 = 0x1_0000;
    const BUF_BASE: u64 = 0x2_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    #[derive(Default)]
    struct Irqs(Mutex<Vec<u16>>);
    impl VirtioInterrupt for Irqs {
        fn signal_queue(&self, queue: u16) {
            self.0.lock().unwrap().push(queue);
        }
        fn signal_config(&self) {}
    }
    impl Irqs {
        fn count(&self, q: u16) -> usize {
            self.0.lock().unwrap().iter().filter(|&&x| x == q).count()
        }
    }

    /// A device activated on mock queues in `m` (offset `base` so two devices can share one
    /// memory); next free descriptor index per queue is tracked by the caller.
    struct Port<'a> {
        dev: Net,
        rx: MockSplitQueue<'a, GuestMemoryMmap>,
        tx: MockSplitQueue<'a, GuestMemoryMmap>,
        ctrl: MockSplitQueue<'a, GuestMemoryMmap>,
        irqs: Arc<Irqs>,
    }

    fn cfg(hub: &str, iommu: bool) -> NetConfig {
        NetConfig {
            backend: NetBackendConfig::Hub(hub.into()),
            mac: None,
            iommu,
        }
    }

    fn port<'a>(
        m: &'a GuestMemoryMmap,
        base: u64,
        dev: Net,
        features: u64,
    ) -> Result<Port<'a>, ActivateError> {
        port_at(m, base, 0, dev, features)
    }

    /// [`port`] whose ring addresses the device gets as `win + GPA` (IOVAs behind a vIOMMU
    /// window), the mock queues being built at the GPAs.
    fn port_at<'a>(
        m: &'a GuestMemoryMmap,
        base: u64,
        win: u64,
        dev: Net,
        features: u64,
    ) -> Result<Port<'a>, ActivateError> {
        let mk = |i: u64| MockSplitQueue::create(m, GuestAddress(base + i * 0x1000), QSIZE);
        let (rx, tx, ctrl) = (mk(0), mk(1), mk(2));
        let qc = |q: &MockSplitQueue<GuestMemoryMmap>| QueueConfig {
            size: QSIZE,
            desc_table: GuestAddress(win + q.desc_table_addr().0),
            avail_ring: GuestAddress(win + q.avail_addr().0),
            used_ring: GuestAddress(win + q.used_addr().0),
            ready: true,
        };
        let irqs = Arc::new(Irqs::default());
        let mut p = Port {
            dev,
            rx,
            tx,
            ctrl,
            irqs,
        };
        let qs = vec![qc(&p.rx), qc(&p.tx), qc(&p.ctrl)];
        p.dev.activate(
            GuestMemoryAtomic::new(m.clone()),
            features,
            qs,
            vec![],
            p.irqs.clone(),
        )?;
        Ok(p)
    }

    fn used_idx(m: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
        m.read_obj(q.used_addr().unchecked_add(2)).unwrap()
    }

    /// (id, len) of used ring entry `i`.
    fn used_elem(m: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, i: u64) -> (u32, u32) {
        let at = q.used_addr().unchecked_add(4 + i * 8);
        (
            m.read_obj(at).unwrap(),
            m.read_obj(at.unchecked_add(4)).unwrap(),
        )
    }

    fn frame(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
    }

    /// Put `frame` (with a zero header) at `at` as one TX chain at descriptor `first`.
    fn send(m: &GuestMemoryMmap, p: &mut Port, first: u16, at: u64, frame: &[u8]) {
        m.write_slice(&[0u8; HDR_BYTES], GuestAddress(at)).unwrap();
        m.write_slice(frame, GuestAddress(at + HDR_BYTES as u64))
            .unwrap();
        push_chain(
            &p.tx,
            first,
            &[
                (at, HDR_BYTES as u32, false),
                (at + HDR_BYTES as u64, frame.len() as u32, false),
            ],
        );
        p.dev.queue_notify(TX_QUEUE);
    }

    const ALL: u64 = VIRTIO_F_VERSION_1
        | VIRTIO_NET_F_MAC
        | VIRTIO_NET_F_STATUS
        | VIRTIO_NET_F_MRG_RXBUF
        | VIRTIO_NET_F_CTRL_VQ
        | VIRTIO_NET_F_CTRL_RX;

    fn pair(m: &GuestMemoryMmap, features: u64) -> (Port<'_>, Port<'_>) {
        let hubs = Hubs::new();
        let a = Net::new(cfg("h", false), None, &hubs).unwrap();
        let b = Net::new(cfg("h", false), None, &hubs).unwrap();
        (
            port(m, RING_BASE, a, features).unwrap(),
            port(m, RING_BASE + 0x8000, b, features).unwrap(),
        )
    }

    #[test]
    fn tx_crosses_the_hub_into_the_peer_rx_buffers() {
        let m = mem();
        let (mut a, mut b) = pair(&m, ALL);
        push_chain(&b.rx, 0, &[(BUF_BASE + 0x10_000, 2048, true)]);
        b.dev.queue_notify(RX_QUEUE);
        let f = frame(100, 1);
        send(&m, &mut a, 0, BUF_BASE, &f);
        assert_eq!(used_idx(&m, &a.tx), 1, "TX chain completed");
        assert_eq!(used_elem(&m, &a.tx, 0), (0, 0));
        assert_eq!(used_idx(&m, &b.rx), 1);
        assert_eq!(used_elem(&m, &b.rx, 0), (0, (HDR_BYTES + 100) as u32));
        let mut got = vec![0u8; HDR_BYTES + 100];
        m.read_slice(&mut got, GuestAddress(BUF_BASE + 0x10_000))
            .unwrap();
        assert_eq!(&got[HDR_BYTES..], &f[..]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert_eq!(b.irqs.count(RX_QUEUE), 1);
        assert_eq!(a.irqs.count(TX_QUEUE), 1);
        assert_eq!(used_idx(&m, &a.rx), 0, "no echo to the sender");
        let (sa, sb) = (
            a.dev.port().stats().snapshot(),
            b.dev.port().stats().snapshot(),
        );
        assert_eq!((sa.tx_frames, sb.rx_frames, sa.rx_frames), (1, 1, 0));
        assert_eq!(
            (sa.tx_kicks, sa.rx_kicks, sb.tx_kicks, sb.rx_kicks),
            (1, 0, 0, 1)
        );
        assert_eq!(
            sa.summary_line([0x52, 0x54, 0, 0, 0xa, 1]),
            "net: mac=52:54:00:00:0a:01 tx_frames=1 rx_frames=0 tx_kicks=1 rx_kicks=0 \
             tx_errors=0 rx_dropped=0 rx_bad_chains=0 ctrl_commands=0"
        );
    }

    #[test]
    fn mergeable_buffers_carry_a_big_frame_published_at_once() {
        let m = mem();
        let (mut a, b) = pair(&m, ALL);
        for i in 0..8u16 {
            push_chain(
                &b.rx,
                i,
                &[(BUF_BASE + 0x10_000 + u64::from(i) * 0x100, 64, true)],
            );
        }
        let f = frame(200, 2);
        send(&m, &mut a, 0, BUF_BASE, &f);
        // 12 + 200 = 212 bytes = 64 * 3 + 20: four buffers.
        assert_eq!(used_idx(&m, &b.rx), 4);
        let lens: Vec<u32> = (0..4).map(|i| used_elem(&m, &b.rx, i).1).collect();
        assert_eq!(lens, vec![64, 64, 64, 20]);
        let ids: Vec<u32> = (0..4).map(|i| used_elem(&m, &b.rx, i).0).collect();
        assert_eq!(ids, vec![0, 1, 2, 3]);
        let mut got = Vec::new();
        for i in 0..4u64 {
            let mut c = vec![0u8; lens[i as usize] as usize];
            m.read_slice(&mut c, GuestAddress(BUF_BASE + 0x10_000 + i * 0x100))
                .unwrap();
            got.extend_from_slice(&c);
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 4, "num_buffers");
        assert_eq!(&got[HDR_BYTES..], &f[..]);
        // The other four buffers are still there for the next frame.
        send(&m, &mut a, 2, BUF_BASE + 0x1000, &frame(10, 3));
        assert_eq!(used_idx(&m, &b.rx), 5);
    }

    #[test]
    fn without_mergeable_a_too_small_buffer_drops_the_frame_and_stays_posted() {
        let m = mem();
        let (mut a, b) = pair(&m, ALL & !VIRTIO_NET_F_MRG_RXBUF);
        push_chain(&b.rx, 0, &[(BUF_BASE + 0x10_000, 64, true)]);
        send(&m, &mut a, 0, BUF_BASE, &frame(200, 4));
        assert_eq!(used_idx(&m, &b.rx), 0, "buffer not consumed");
        assert_eq!(b.dev.port().stats().snapshot().rx_dropped, 1);
        assert_eq!(b.dev.port().backlog_len(), 0);
        send(&m, &mut a, 2, BUF_BASE + 0x1000, &frame(40, 5));
        assert_eq!(used_idx(&m, &b.rx), 1, "a small frame still fits");
        assert_eq!(used_elem(&m, &b.rx, 0).1, (HDR_BYTES + 40) as u32);
    }

    #[test]
    fn backlog_waits_for_buffers_is_bounded_and_drains_on_rx_kick() {
        let m = mem();
        let (a, mut b) = pair(&m, ALL);
        let sink = b.dev.port().clone();
        assert_eq!(sink.deliver(&frame(60, 6)), Delivery::Queued);
        for i in 1..BACKLOG_FRAMES + 10 {
            sink.deliver(&frame(60, i as u8));
        }
        assert_eq!(sink.backlog_len(), BACKLOG_FRAMES);
        assert_eq!(sink.stats().snapshot().rx_dropped, 10);
        // Waiting frames: the driver must kick RX when it adds buffers.
        let used_flags: u16 = m.read_obj(b.rx.used_addr()).unwrap();
        assert_eq!(used_flags & 1, 0, "RX kicks enabled while frames wait");
        for i in 0..4u16 {
            push_chain(
                &b.rx,
                i,
                &[(BUF_BASE + 0x10_000 + u64::from(i) * 0x800, 2048, true)],
            );
        }
        b.dev.queue_notify(RX_QUEUE);
        assert_eq!(used_idx(&m, &b.rx), 4);
        assert_eq!(sink.backlog_len(), BACKLOG_FRAMES - 4);
        assert_eq!(b.irqs.count(RX_QUEUE), 1);
        let mut first = vec![0u8; 60];
        m.read_slice(
            &mut first,
            GuestAddress(BUF_BASE + 0x10_000 + HDR_BYTES as u64),
        )
        .unwrap();
        assert_eq!(first, frame(60, 6), "oldest frame first");
        drop(a);
    }

    #[test]
    fn no_rx_kicks_requested_when_nothing_waits() {
        let m = mem();
        let (mut a, b) = pair(&m, ALL);
        push_chain(&b.rx, 0, &[(BUF_BASE + 0x10_000, 2048, true)]);
        send(&m, &mut a, 0, BUF_BASE, &frame(60, 1));
        let used_flags: u16 = m.read_obj(b.rx.used_addr()).unwrap();
        assert_eq!(
            used_flags & 1,
            1,
            "VRING_USED_F_NO_NOTIFY on RX with an empty backlog"
        );
    }

    #[test]
    fn driver_suppressed_interrupts_are_not_sent() {
        let m = mem();
        let (mut a, b) = pair(&m, ALL);
        // VRING_AVAIL_F_NO_INTERRUPT on both rings (as DPDK's PMD does).
        m.write_obj(1u16, b.rx.avail_addr()).unwrap();
        m.write_obj(1u16, a.tx.avail_addr()).unwrap();
        push_chain(&b.rx, 0, &[(BUF_BASE + 0x10_000, 2048, true)]);
        send(&m, &mut a, 0, BUF_BASE, &frame(60, 1));
        assert_eq!(used_idx(&m, &b.rx), 1);
        assert_eq!((a.irqs.count(TX_QUEUE), b.irqs.count(RX_QUEUE)), (0, 0));
    }

    #[test]
    fn bad_chains_are_completed_and_counted_never_panic() {
        let m = mem();
        let (mut a, b) = pair(&m, ALL);
        push_chain(&b.rx, 0, &[(BUF_BASE + 0x10_000, 2048, true)]);
        let tx_err = |a: &Port| a.dev.port().stats().snapshot().tx_errors;
        // TX chain with a device-writable descriptor.
        push_chain(
            &a.tx,
            0,
            &[(BUF_BASE, 12, false), (BUF_BASE + 12, 60, true)],
        );
        a.dev.queue_notify(TX_QUEUE);
        assert_eq!((used_idx(&m, &a.tx), tx_err(&a)), (1, 1));
        // Shorter than the header.
        push_chain(&a.tx, 2, &[(BUF_BASE, 5, false)]);
        a.dev.queue_notify(TX_QUEUE);
        assert_eq!((used_idx(&m, &a.tx), tx_err(&a)), (2, 2));
        // Oversized frame (length sums past MAX_FRAME_BYTES).
        push_chain(
            &a.tx,
            3,
            &[(BUF_BASE, 12, false), (BUF_BASE, 0xffff_0000, false)],
        );
        a.dev.queue_notify(TX_QUEUE);
        assert_eq!((used_idx(&m, &a.tx), tx_err(&a)), (3, 3));
        // Outside guest RAM.
        push_chain(&a.tx, 5, &[(0x1_0000_0000, 100, false)]);
        a.dev.queue_notify(TX_QUEUE);
        assert_eq!((used_idx(&m, &a.tx), tx_err(&a)), (4, 4));
        assert_eq!(used_idx(&m, &b.rx), 0, "nothing reached the peer");
        // RX chain with a readable descriptor: completed empty, the next one is used.
        push_chain(&b.rx, 1, &[(BUF_BASE + 0x11_000, 2048, false)]);
        // (index 0 is still a good buffer: consume it first)
        send(&m, &mut a, 6, BUF_BASE + 0x1000, &frame(30, 1));
        send(&m, &mut a, 8, BUF_BASE + 0x2000, &frame(30, 2));
        assert_eq!(b.dev.port().stats().snapshot().rx_bad_chains, 1);
        assert_eq!(used_elem(&m, &b.rx, 1), (1, 0));
        // An absent queue and notifies after reset are ignored.
        a.dev.queue_notify(9);
        a.dev.reset();
        a.dev.queue_notify(TX_QUEUE);
        assert_eq!(
            b.dev.port().deliver(&vec![0u8; MAX_FRAME_BYTES + 1]),
            Delivery::Dropped
        );
    }

    #[test]
    fn control_commands_are_acknowledged() {
        let m = mem();
        let (a, _b) = pair(&m, ALL);
        // VIRTIO_NET_CTRL_RX / PROMISC on.
        m.write_slice(&[0u8, 0, 1], GuestAddress(BUF_BASE)).unwrap();
        m.write_obj(0xeeu8, GuestAddress(BUF_BASE + 0x100)).unwrap();
        push_chain(
            &a.ctrl,
            0,
            &[
                (BUF_BASE, 2, false),
                (BUF_BASE + 2, 1, false),
                (BUF_BASE + 0x100, 1, true),
            ],
        );
        // Unknown class 0x77: refused.
        m.write_slice(&[0x77u8, 0], GuestAddress(BUF_BASE + 0x200))
            .unwrap();
        push_chain(
            &a.ctrl,
            3,
            &[(BUF_BASE + 0x200, 2, false), (BUF_BASE + 0x300, 1, true)],
        );
        // No ack byte: used length 0.
        push_chain(&a.ctrl, 5, &[(BUF_BASE, 2, false)]);
        let mut a = a;
        a.dev.queue_notify(CTRL_QUEUE);
        assert_eq!(used_idx(&m, &a.ctrl), 3);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(BUF_BASE + 0x100)).unwrap(),
            VIRTIO_NET_OK
        );
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(BUF_BASE + 0x300)).unwrap(),
            VIRTIO_NET_ERR
        );
        assert_eq!(used_elem(&m, &a.ctrl, 0).1, 1);
        assert_eq!(used_elem(&m, &a.ctrl, 2).1, 0);
        assert_eq!(a.dev.port().stats().snapshot().ctrl_commands, 3);
    }

    #[test]
    fn config_space_and_features() {
        let hubs = Hubs::new();
        let mut c = cfg("x", true);
        c.mac = Some([0x52, 0x54, 0, 1, 2, 3]);
        let n = Net::new(c, None, &hubs).unwrap();
        let mut b = [0u8; 12];
        n.read_config(0, &mut b);
        assert_eq!(&b[..6], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), VIRTIO_NET_S_LINK_UP);
        let mut far = [0xffu8; 4];
        n.read_config(u64::MAX - 1, &mut far);
        assert_eq!(far, [0; 4]);
        let f = n.device_features();
        for bit in [
            VIRTIO_F_ACCESS_PLATFORM,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CTRL_VQ,
        ] {
            assert_ne!(f & bit, 0);
        }
        let plain = Net::new(cfg("x", false), None, &hubs).unwrap();
        assert_eq!(plain.device_features() & VIRTIO_F_ACCESS_PLATFORM, 0);
        assert_ne!(plain.mac(), n.mac());
        assert_eq!(plain.queue_max_sizes().len(), 3);
    }

    #[test]
    fn net_options_parse() {
        let c = NetConfig::parse("hub=0,mac=52:54:00:ab:cd:ef,iommu=on").unwrap();
        assert_eq!(c.backend, NetBackendConfig::Hub("0".into()));
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert!(c.iommu);
        let t = NetConfig::parse("tap=tap0").unwrap();
        assert_eq!(
            (t.backend, t.mac, t.iommu),
            (NetBackendConfig::Tap("tap0".into()), None, false)
        );
        for bad in [
            "",
            "mac=52:54:00:00:00:01",
            "hub=0,tap=t",
            "hub=0,mac=01:00:00:00:00:00",
            "hub=0,mac=1:2:3",
            "hub=0,mac=zz:00:00:00:00:00",
            "tap=averyveryverylongname",
            "hub=0,iommu=maybe",
            "hub=0,speed=10",
        ] {
            assert!(NetConfig::parse(bad).is_err(), "{bad}");
        }
    }

    // ---- Behind the vIOMMU. ----

    const EP_A: u32 = 0x10;
    const EP_B: u32 = 0x18;
    /// The mock virtio-iommu's queues and buffers (up to 0x18_7000).
    const IOMMU_BASE: u64 = 0x18_0000;
    /// MAP_F_READ | MAP_F_WRITE.
    const RW: u32 = 3;

    /// IOVA base of each device's window: IOVA = WIN + GPA for GPAs below 0x18_0000.
    const WIN_A: u64 = 0x40_0000_0000;
    const WIN_B: u64 = 0x80_0000_0000;

    /// Two iommu=on ports on one hub, each in its own domain mapping GPA 0..0x18_0000 at its
    /// window; queues are given to the devices as IOVAs.
    fn translated_pair(m: &GuestMemoryMmap) -> (MockIommu<'_>, Port<'_>, Port<'_>) {
        let (mut iommu, eps) = MockIommu::new(m, IOMMU_BASE, &[EP_A, EP_B]);
        let (ea, eb) = (eps[0].clone(), eps[1].clone());
        iommu.attach(1, EP_A);
        iommu.map(1, WIN_A, 0x18_0000, 0, RW);
        iommu.attach(2, EP_B);
        iommu.map(2, WIN_B, 0x18_0000, 0, RW);
        let hubs = Hubs::new();
        let a = Net::new(cfg("h", true), Some(ea), &hubs).unwrap();
        let b = Net::new(cfg("h", true), Some(eb), &hubs).unwrap();
        let feats = ALL | VIRTIO_F_ACCESS_PLATFORM;
        // Activate with IOVA ring addresses: build the mock at the GPA, hand IOVAs over.
        let act = |dev: Net, base: u64, win: u64| port_at(m, base, win, dev, feats).unwrap();
        let pa = act(a, RING_BASE, WIN_A);
        let pb = act(b, RING_BASE + 0x8000, WIN_B);
        (iommu, pa, pb)
    }

    #[test]
    fn behind_the_iommu_frames_and_rings_are_translated() {
        let m = mem();
        let (iommu, mut a, b) = translated_pair(&m);
        push_chain(&b.rx, 0, &[(WIN_B + BUF_BASE + 0x10_000, 2048, true)]);
        let f = frame(90, 9);
        // The frame lives at GPA BUF_BASE; the descriptors carry IOVAs.
        m.write_slice(&[0u8; HDR_BYTES], GuestAddress(BUF_BASE))
            .unwrap();
        m.write_slice(&f, GuestAddress(BUF_BASE + HDR_BYTES as u64))
            .unwrap();
        push_chain(
            &a.tx,
            0,
            &[(WIN_A + BUF_BASE, (HDR_BYTES + 90) as u32, false)],
        );
        a.dev.queue_notify(TX_QUEUE);
        assert_eq!(used_idx(&m, &a.tx), 1);
        assert_eq!(used_idx(&m, &b.rx), 1);
        let mut got = vec![0u8; 90];
        m.read_slice(
            &mut got,
            GuestAddress(BUF_BASE + 0x10_000 + HDR_BYTES as u64),
        )
        .unwrap();
        assert_eq!(got, f);
        assert_eq!(iommu.dev.counters().snapshot().faults, 0);
        // A buffer address that is a GPA, not a mapped IOVA: the TX fails, a fault is raised.
        push_chain(&a.tx, 1, &[(BUF_BASE, (HDR_BYTES + 90) as u32, false)]);
        a.dev.queue_notify(TX_QUEUE);
        assert_eq!(used_idx(&m, &a.tx), 2);
        assert_eq!(a.dev.port().stats().snapshot().tx_errors, 1);
        assert!(iommu.dev.counters().snapshot().faults >= 1);
        // An RX buffer that misses translation: the frame is dropped, the chain completed
        // empty, the device keeps working.
        push_chain(&b.rx, 1, &[(0x7_0000_0000, 2048, true)]);
        send_iova(&m, &mut a, 2, WIN_A, BUF_BASE + 0x1000, &frame(20, 1));
        assert_eq!(used_idx(&m, &b.rx), 2);
        assert_eq!(used_elem(&m, &b.rx, 1), (1, 0));
        push_chain(&b.rx, 2, &[(WIN_B + BUF_BASE + 0x11_000, 2048, true)]);
        send_iova(&m, &mut a, 3, WIN_A, BUF_BASE + 0x2000, &frame(20, 2));
        assert_eq!(used_idx(&m, &b.rx), 3);
        assert_eq!(used_elem(&m, &b.rx, 2).1, (HDR_BYTES + 20) as u32);
    }

    fn send_iova(m: &GuestMemoryMmap, p: &mut Port, first: u16, win: u64, gpa: u64, f: &[u8]) {
        m.write_slice(&[0u8; HDR_BYTES], GuestAddress(gpa)).unwrap();
        m.write_slice(f, GuestAddress(gpa + HDR_BYTES as u64))
            .unwrap();
        push_chain(
            &p.tx,
            first,
            &[(win + gpa, (HDR_BYTES + f.len()) as u32, false)],
        );
        p.dev.queue_notify(TX_QUEUE);
    }

    /// DPDK's exit: no UNMAP, the endpoint is re-attached to another (default) domain. The old
    /// domain dies with its last endpoint: its IOVAs must stop working for the device at once.
    #[test]
    fn reattach_to_another_domain_drops_the_old_mappings_for_the_device() {
        let m = mem();
        let (mut iommu, mut a, b) = translated_pair(&m);
        push_chain(&b.rx, 0, &[(WIN_B + BUF_BASE + 0x10_000, 2048, true)]);
        send_iova(&m, &mut a, 0, WIN_A, BUF_BASE, &frame(20, 1));
        assert_eq!(used_idx(&m, &b.rx), 1, "works in domain 1");
        // Move EP_A into a fresh domain 3 that maps only the rings (identity of WIN_A for the
        // ring pages), not the buffers.
        iommu.attach(3, EP_A);
        iommu.map(3, WIN_A + RING_BASE, 0x8000, RING_BASE, RW);
        let faults = iommu.dev.counters().snapshot().faults;
        send_iova(&m, &mut a, 1, WIN_A, BUF_BASE, &frame(20, 2));
        assert_eq!(
            used_idx(&m, &a.tx),
            2,
            "the ring still works through domain 3"
        );
        assert_eq!(
            a.dev.port().stats().snapshot().tx_errors,
            1,
            "old IOVA refused"
        );
        assert!(iommu.dev.counters().snapshot().faults > faults);
        assert_eq!(used_idx(&m, &b.rx), 1, "nothing crossed");
        // Domain 1 is gone: attaching EP_A back to it creates an empty domain.
        iommu.attach(1, EP_A);
        iommu.map(1, WIN_A + RING_BASE, 0x8000, RING_BASE, RW);
        send_iova(&m, &mut a, 2, WIN_A, BUF_BASE, &frame(20, 3));
        assert_eq!(
            a.dev.port().stats().snapshot().tx_errors,
            2,
            "domain 1 lost its mappings"
        );
    }

    /// The rings are reached at their guest-physical addresses only while the current view
    /// maps them: once their IOVAs are gone, the device must not touch them at all.
    #[test]
    fn rings_follow_the_view_and_are_left_alone_once_unmapped() {
        let m = mem();
        let (mut iommu, mut a, b) = translated_pair(&m);
        push_chain(&b.rx, 0, &[(WIN_B + BUF_BASE + 0x10_000, 2048, true)]);
        send_iova(&m, &mut a, 0, WIN_A, BUF_BASE, &frame(20, 1));
        assert_eq!(
            used_idx(&m, &a.tx),
            1,
            "served through the rings' direct GPAs"
        );
        assert_eq!(used_idx(&m, &b.rx), 1);
        // EP_A moves to a domain with nothing mapped: a new chain on the TX ring is not
        // served (its rings are unreachable), the used ring is not written, faults are raised.
        iommu.attach(4, EP_A);
        let faults = iommu.dev.counters().snapshot().faults;
        send_iova(&m, &mut a, 1, WIN_A, BUF_BASE, &frame(20, 2));
        assert_eq!(used_idx(&m, &a.tx), 1, "unmapped rings untouched");
        assert_eq!(a.dev.port().stats().snapshot().tx_frames, 1);
        assert!(iommu.dev.counters().snapshot().faults > faults);
        // Mapped again (rings and buffers): the pending chain is served.
        iommu.map(4, WIN_A, 0x18_0000, 0, RW);
        a.dev.queue_notify(TX_QUEUE);
        assert_eq!(used_idx(&m, &a.tx), 2);
        assert_eq!(a.dev.port().stats().snapshot().tx_frames, 2);
    }

    #[test]
    fn iommu_port_needs_access_platform_and_an_endpoint() {
        let m = mem();
        let hubs = Hubs::new();
        let (_iommu, eps) = MockIommu::new(&m, IOMMU_BASE, &[EP_A, EP_B]);
        let ea = eps[0].clone();
        let n = Net::new(cfg("h", true), Some(ea), &hubs).unwrap();
        assert!(
            port(&m, RING_BASE, n, ALL).is_err(),
            "ACCESS_PLATFORM refused"
        );
        let n = Net::new(cfg("h", true), None, &hubs).unwrap();
        assert!(port(&m, RING_BASE, n, ALL | VIRTIO_F_ACCESS_PLATFORM).is_err());
    }
}
