//! The receive side of a virtio-net port: frames from the backend (a hub peer, a TAP reader)
//! written into the guest's RX buffers (merged over several when negotiated), or kept in a
//! bounded backlog until the driver posts buffers.

use std::collections::VecDeque;
use std::mem::offset_of;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use viommu::PinnedView;
use virtio_bindings::virtio_net::virtio_net_hdr_v1;
use virtio_dev::{wants_interrupt, VirtioInterrupt};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::stats::{bump, NetStats};
use super::{BACKLOG_FRAMES, HDR_BYTES, MAX_FRAME_BYTES, RX_QUEUE};
use crate::devices::virtio::{walk_chain, Buffers, Desc, DeviceMemory, Pinned, QueueRings};
use crate::net::{Delivery, FrameSink};

/// Offset of `num_buffers` in `struct virtio_net_hdr_v1`.
const NUM_BUFFERS: usize = offset_of!(virtio_net_hdr_v1, num_buffers);

/// The activated RX queue.
struct RxQueue {
    mem: DeviceMemory,
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
                    virtio_dev::guest_warn!(
                        "virtio-net: malformed RX chain {head}, completed empty"
                    );
                    bump(&stats.rx_bad_chains);
                    if self.chains.is_empty() {
                        if let Err(e) = self.queue.add_used(rings, head, 0) {
                            virtio_dev::guest_warn!("virtio-net: add_used: {e}");
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
        hdr[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&nbufs.to_le_bytes());
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
                    virtio_dev::guest_warn!("virtio-net: RX buffer write: {e}");
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
                    virtio_dev::guest_warn!("virtio-net: used ring write: {e}");
                }
            }
        }
        self.queue.set_next_used(first.wrapping_add(n as u16 - 1));
        let (head, _, len) = self.chains[n - 1];
        if let Err(e) = self.queue.add_used(mem, head, len as u32) {
            virtio_dev::guest_warn!("virtio-net: add_used: {e}");
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
    pub(super) fn new() -> NetPort {
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
        rx.mem.pinned(Fill {
            ring: &mut rx.ring,
            backlog,
            frames,
            stats: &self.stats,
        })
    }

    /// The driver activated the device: frames go into `queue` (reached through `mem`) from
    /// now on, the backlog starts empty.
    pub(super) fn start(
        &self,
        mem: DeviceMemory,
        queue: Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
        mergeable: bool,
    ) {
        let mut st = self.lock();
        st.backlog.clear();
        st.active = Some(RxQueue {
            mem,
            ring: RxRing {
                descs: Vec::new(),
                chains: Vec::new(),
                rings: QueueRings::new(&queue),
                queue,
                interrupt,
                mergeable,
            },
        });
        // No frames wait yet: the driver need not kick RX.
        self.drain(&mut st);
    }

    /// The device stopped (reset, or activated again): drop the queue and the backlog.
    pub(super) fn stop(&self) {
        let mut st = self.lock();
        st.active = None;
        st.backlog.clear();
    }

    /// The driver kicked the RX queue (it added buffers): write what waits.
    pub(super) fn kick(&self) {
        bump(&self.stats.rx_kicks);
        let mut st = self.lock();
        self.drain(&mut st);
    }
}

/// One [`RxRing::fill`] under a pinned memory.
struct Fill<'a, 'f> {
    ring: &'a mut RxRing,
    backlog: &'a mut VecDeque<Vec<u8>>,
    frames: &'a [&'f [u8]],
    stats: &'a NetStats,
}

impl Pinned for Fill<'_, '_> {
    type Output = usize;

    fn prepare(&mut self, view: &PinnedView) -> bool {
        self.ring.rings.prepare(&mut self.ring.queue, view)
    }

    fn run<R: GuestMemory, B: Buffers>(self, rings: &R, bufs: &B) -> usize {
        self.ring
            .fill(rings, bufs, self.backlog, self.frames, self.stats)
    }
}

impl RxRing {
    /// See [`NetPort::fill`]; `rings` and `bufs` are the queue's memory, pinned by the caller.
    fn fill<R: GuestMemory, B: Buffers>(
        &mut self,
        rings: &R,
        bufs: &B,
        backlog: &mut VecDeque<Vec<u8>>,
        frames: &[&[u8]],
        stats: &NetStats,
    ) -> usize {
        let since = self.queue.next_used();
        let mut next = 0; // first of `frames` not yet handled
        let mut taken = 0;
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
        if wants_interrupt(&self.queue, rings, since) {
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
                virtio_dev::guest_warn!("virtio-net: enable notification: {e}");
                false
            }
        }
    } else {
        if let Err(e) = q.disable_notification(mem) {
            virtio_dev::guest_warn!("virtio-net: disable notification: {e}");
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
