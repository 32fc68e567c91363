//! A virtio-iommu driver for tests: two split rings and a buffer area in the caller's guest
//! memory, requests written as the [`spec`](crate::spec) structures, the device driven through
//! `VirtioDevice` (activate, config space, queue notifications) exactly like the transport does.
//!
//! The rings are laid out here rather than with virtio-queue's `MockSplitQueue`: in
//! virtio-queue 0.18 its used ring starts inside its available ring (`SplitQueueRing::end`
//! counts elements as bytes; rust-vmm/vm-virtio#400) and `add_desc_chains` does not wrap the
//! available index, so a driver sending more than half a queue of requests corrupts its own
//! rings; it also borrows the memory, which a driver that owns its device cannot do. The
//! descriptors are virtio-queue's.

use crate::spec::{
    FaultRecord, IommuConfig, ProbeProperty, ProbeResvMem, ReqAttach, ReqDetach, ReqHead, ReqMap,
    ReqProbe, ReqTail, ReqUnmap, ATTACH_F_BYPASS, CONFIG_BYPASS_OFFSET, EVENT_QUEUE, PROBE_T_MASK,
    PROBE_T_NONE, PROBE_T_RESV_MEM, REQUEST_QUEUE, RESV_MEM_SIZE, TAIL_SIZE, T_ATTACH, T_DETACH,
    T_MAP, T_PROBE, T_UNMAP,
};
pub use crate::request::Request;
use crate::Status;
use pci::{ActivateError, QueueConfig, VirtioDevice, VirtioInterrupt};
use std::ops::Range;
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::Arc;
use virtio_bindings::bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryAtomic, GuestMemoryError,
    GuestMemoryMmap, Permissions,
};

/// What a reply buffer holds before the device writes it (so an unwritten reply shows).
pub const REPLY_FILL: u8 = 0xaa;

/// Largest split queue (virtio 1.x §2.7).
const MAX_QUEUE_SIZE: u16 = 32768;
/// Buffers are carved at this alignment.
const BUF_ALIGN: u64 = 16;

/// Why the mock driver could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum MockError {
    /// A guest memory access of the driver failed.
    #[error("guest memory access failed: {0}")]
    Memory(#[from] GuestMemoryError),
    /// A queue size a split ring cannot have.
    #[error("queue size {0} is not a power of two up to 32768")]
    QueueSize(u16),
    /// A part of the layout lies outside guest memory or overlaps another part.
    #[error("{0} at {1:#x} ({2:#x} bytes) is outside guest memory or overlaps another part")]
    Layout(&'static str, u64, u64),
    /// The buffer area cannot hold that many more bytes (see [`MockDriver::reset_buffers`]).
    #[error("request buffers exhausted ({0} bytes asked)")]
    OutOfBuffers(u64),
    /// A chain of no descriptors, or of more than the queue has.
    #[error("a chain of {0} descriptors does not fit the queue")]
    ChainLength(usize),
    /// The device did not complete exactly the one chain just sent.
    #[error("expected one completion of chain {head}, got {got:?}")]
    Completion {
        /// Head of the chain sent.
        head: u16,
        /// Used entries found.
        got: Vec<Used>,
    },
    /// The device returned the request without writing the tail (it could not parse it).
    #[error("request returned unwritten (used length {0})")]
    Unanswered(u32),
    /// The tail holds a status the spec does not define.
    #[error("unknown status {0}")]
    UnknownStatus(u8),
    /// The device refused the activation.
    #[error("activation failed: {0}")]
    Activate(#[from] ActivateError),
}

/// One descriptor of a chain: `len` bytes at guest address `addr`, device-writable or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest address (an IOVA if the queue sits behind an IOMMU).
    pub addr: u64,
    /// Bytes.
    pub len: u32,
    /// The device writes it (`VRING_DESC_F_WRITE`).
    pub writable: bool,
}

impl Segment {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Self {
        Segment {
            addr,
            len,
            writable: false,
        }
    }

    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Self {
        Segment {
            addr,
            len,
            writable: true,
        }
    }
}

impl From<(u64, u32, bool)> for Segment {
    fn from((addr, len, writable): (u64, u32, bool)) -> Self {
        Segment {
            addr,
            len,
            writable,
        }
    }
}

/// One used-ring entry: the head of the chain and the bytes the device wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index of the chain.
    pub id: u32,
    /// Bytes written by the device.
    pub len: u32,
}

/// Where one split ring lives in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    /// Queue size (a power of two).
    pub size: u16,
    /// Descriptor table (16 bytes per entry).
    pub desc_table: u64,
    /// Driver (available) ring.
    pub avail_ring: u64,
    /// Device (used) ring.
    pub used_ring: u64,
}

impl QueueLayout {
    /// A ring of `size` entries packed from `base` as virtio 1.x §2.7 lays it out: the
    /// descriptor table, the driver ring right after it, the device ring at the next 4-byte
    /// boundary.
    pub fn packed(base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let avail_ring = base.saturating_add(16 * n);
        let used_ring = avail_ring.saturating_add(6 + 2 * n).saturating_add(3) & !3;
        QueueLayout {
            size,
            desc_table: base,
            avail_ring,
            used_ring,
        }
    }

    /// The three parts (name, first byte, bytes).
    fn parts(&self) -> [(&'static str, u64, u64); 3] {
        let n = u64::from(self.size);
        [
            ("descriptor table", self.desc_table, 16 * n),
            ("available ring", self.avail_ring, 6 + 2 * n),
            ("used ring", self.used_ring, 6 + 8 * n),
        ]
    }

    /// First byte after the ring (the end of its highest part).
    pub fn end(&self) -> u64 {
        self.parts()
            .iter()
            .map(|&(_, a, l)| a.saturating_add(l))
            .max()
            .unwrap_or(0)
    }

    /// The queue as the transport hands it to the device (ready).
    pub fn config(&self) -> QueueConfig {
        QueueConfig {
            size: self.size,
            desc_table: GuestAddress(self.desc_table),
            avail_ring: GuestAddress(self.avail_ring),
            used_ring: GuestAddress(self.used_ring),
            ready: true,
        }
    }
}

/// Where the driver keeps its rings and buffers. The buffer area holds request bodies and
/// replies (and any buffer the caller allocates with [`MockDriver::alloc`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockLayout {
    /// The request queue (queue 0).
    pub request: QueueLayout,
    /// The event queue (queue 1).
    pub event: QueueLayout,
    /// Guest addresses of the buffer area.
    pub buffers: Range<u64>,
}

impl MockLayout {
    /// Everything in `base..base + len`: the request ring at `base`, the event ring at the
    /// next 4 KiB boundary after it, the buffer area from the next 4 KiB boundary after that.
    pub fn packed(base: u64, len: u64, request_size: u16, event_size: u16) -> Self {
        let page = |a: u64| a.saturating_add(0xfff) & !0xfff;
        let request = QueueLayout::packed(base, request_size);
        let event = QueueLayout::packed(page(request.end()), event_size);
        MockLayout {
            request,
            event,
            buffers: page(event.end())..base.saturating_add(len),
        }
    }

    fn parts(&self) -> Vec<(&'static str, u64, u64)> {
        let mut parts: Vec<_> = self.request.parts().into();
        parts.extend(self.event.parts());
        parts.push((
            "buffer area",
            self.buffers.start,
            self.buffers.end.saturating_sub(self.buffers.start),
        ));
        parts
    }

    /// Every part inside `mem`, none overlapping another; queue sizes valid.
    fn check(&self, mem: &GuestMemoryMmap) -> Result<(), MockError> {
        for q in [&self.request, &self.event] {
            if q.size == 0 || q.size > MAX_QUEUE_SIZE || !q.size.is_power_of_two() {
                return Err(MockError::QueueSize(q.size));
            }
        }
        let parts = self.parts();
        for (i, &(what, a, l)) in parts.iter().enumerate() {
            let end = a.checked_add(l);
            let in_ram = usize::try_from(l).is_ok_and(|n| {
                end.is_some()
                    && (l == 0 || mem.check_range(GuestAddress(a), n, Permissions::ReadWrite))
            });
            let overlaps = parts.iter().enumerate().any(|(j, &(_, b, m))| {
                i != j && l > 0 && m > 0 && a < b.saturating_add(m) && b < a.saturating_add(l)
            });
            if !in_ram || overlaps {
                return Err(MockError::Layout(what, a, l));
            }
        }
        Ok(())
    }
}

fn head(req_type: u8) -> ReqHead {
    ReqHead {
        req_type,
        reserved: [0; 3],
    }
}

/// The driver's side of the typed requests the device parses ([`Request`]: the readable part of
/// the chain, as the spec structure).
impl Request {
    /// ATTACH `endpoint` to `domain` with ATTACH_F_* `flags` (unknown flags are sent as given).
    pub fn attach(domain: u32, endpoint: u32, flags: u32) -> Self {
        Request::Attach(ReqAttach {
            head: head(T_ATTACH),
            domain: domain.into(),
            endpoint: endpoint.into(),
            flags: flags.into(),
            reserved: [0; 4],
        })
    }

    /// ATTACH `endpoint` to the bypass (identity) domain `domain`.
    pub fn attach_bypass(domain: u32, endpoint: u32) -> Self {
        Self::attach(domain, endpoint, ATTACH_F_BYPASS)
    }

    /// DETACH `endpoint` from `domain`.
    pub fn detach(domain: u32, endpoint: u32) -> Self {
        Request::Detach(ReqDetach {
            head: head(T_DETACH),
            domain: domain.into(),
            endpoint: endpoint.into(),
            reserved: [0; 8],
        })
    }

    /// MAP IOVA `virt_start..=virt_end` of `domain` to GPA `phys_start..` with MAP_F_* `flags`.
    pub fn map(domain: u32, virt_start: u64, virt_end: u64, phys_start: u64, flags: u32) -> Self {
        Request::Map(ReqMap {
            head: head(T_MAP),
            domain: domain.into(),
            virt_start: virt_start.into(),
            virt_end: virt_end.into(),
            phys_start: phys_start.into(),
            flags: flags.into(),
        })
    }

    /// UNMAP IOVA `virt_start..=virt_end` of `domain`.
    pub fn unmap(domain: u32, virt_start: u64, virt_end: u64) -> Self {
        Request::Unmap(ReqUnmap {
            head: head(T_UNMAP),
            domain: domain.into(),
            virt_start: virt_start.into(),
            virt_end: virt_end.into(),
            reserved: [0; 4],
        })
    }

    /// PROBE `endpoint`.
    pub fn probe(endpoint: u32) -> Self {
        Request::Probe(ReqProbe {
            head: head(T_PROBE),
            endpoint: endpoint.into(),
            ..Default::default()
        })
    }

    /// The wire bytes of the readable part.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Request::Attach(r) => r.as_slice(),
            Request::Detach(r) => r.as_slice(),
            Request::Map(r) => r.as_slice(),
            Request::Unmap(r) => r.as_slice(),
            Request::Probe(r) => r.as_slice(),
        }
    }

    /// Bytes of the writable part: the tail, after `probe_size` bytes of properties for PROBE.
    pub fn reply_len(&self, probe_size: u32) -> u32 {
        let tail = TAIL_SIZE as u32;
        match self {
            Request::Probe(_) => probe_size.saturating_add(tail),
            _ => tail,
        }
    }
}

/// One PROBE property, read back from the reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Property {
    /// VIRTIO_IOMMU_PROBE_T_RESV_MEM: `start..=end` of RESV_MEM_T_* `subtype`.
    ResvMem {
        /// RESV_MEM_T_* subtype.
        subtype: u8,
        /// First address.
        start: u64,
        /// Last address (inclusive).
        end: u64,
    },
    /// Any other property: its type and the bytes following its header.
    Other {
        /// Property type (low 12 bits of the header's type field).
        ptype: u16,
        /// The property's body.
        body: Vec<u8>,
    },
}

/// What the device wrote back for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Used length of the completion.
    pub used_len: u32,
    /// The whole writable part after the completion (written or still [`REPLY_FILL`]).
    pub bytes: Vec<u8>,
}

impl Reply {
    /// The tail (the last bytes of the writable part), if the device wrote the reply.
    pub fn tail(&self) -> Option<ReqTail> {
        if self.used_len as usize != self.bytes.len() {
            return None;
        }
        let at = self.bytes.len().checked_sub(TAIL_SIZE)?;
        ReqTail::from_slice(&self.bytes[at..]).copied()
    }

    /// The status of the tail.
    pub fn status(&self) -> Result<Status, MockError> {
        let tail = self.tail().ok_or(MockError::Unanswered(self.used_len))?;
        Status::ALL
            .get(usize::from(tail.status))
            .copied()
            .ok_or(MockError::UnknownStatus(tail.status))
    }

    /// The PROBE properties before the tail, up to the first NONE property (or the end).
    pub fn properties(&self) -> Result<Vec<Property>, MockError> {
        self.tail().ok_or(MockError::Unanswered(self.used_len))?;
        let props = &self.bytes[..self.bytes.len() - TAIL_SIZE];
        let header = std::mem::size_of::<ProbeProperty>();
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(h) = props
            .get(at..at + header)
            .and_then(ProbeProperty::from_slice)
        {
            let ptype = u16::from(h.ptype) & PROBE_T_MASK;
            if ptype == PROBE_T_NONE {
                break;
            }
            let len = header + usize::from(u16::from(h.length));
            let Some(bytes) = props.get(at..at + len) else {
                break;
            };
            out.push(match ProbeResvMem::from_slice(bytes) {
                Some(r) if ptype == PROBE_T_RESV_MEM && len == RESV_MEM_SIZE => Property::ResvMem {
                    subtype: r.subtype,
                    start: r.start.into(),
                    end: r.end.into(),
                },
                _ => Property::Other {
                    ptype,
                    body: bytes[header..].to_vec(),
                },
            });
            at += len;
        }
        Ok(out)
    }
}

/// Counts the interrupts the device raises, per queue (request, event) and for config changes.
#[derive(Debug, Default)]
pub struct InterruptCounter {
    /// Interrupts of the request queue and of the event queue.
    pub queue: [AtomicUsize; 2],
    /// Configuration-change interrupts.
    pub config: AtomicUsize,
}

impl VirtioInterrupt for InterruptCounter {
    fn signal_queue(&self, queue: u16) {
        if let Some(n) = self.queue.get(usize::from(queue)) {
            n.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn signal_config(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
}

/// Drops every interrupt.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn signal_queue(&self, _queue: u16) {}
    fn signal_config(&self) {}
}

/// The driver's side of one split ring: descriptors are used round-robin from the table, one
/// chain after the other (the caller keeps at most `size` descriptors in flight).
#[derive(Debug)]
struct Ring {
    layout: QueueLayout,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    /// An empty ring: both ring headers (and the event fields) zeroed.
    fn new(mem: &GuestMemoryMmap, layout: QueueLayout) -> Result<Self, MockError> {
        let n = usize::from(layout.size);
        mem.write_slice(&vec![0; 6 + 2 * n], GuestAddress(layout.avail_ring))?;
        mem.write_slice(&vec![0; 6 + 8 * n], GuestAddress(layout.used_ring))?;
        Ok(Ring {
            layout,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        })
    }

    /// Write `segs` as one chain and make it available; returns its head.
    fn push(&mut self, mem: &GuestMemoryMmap, segs: &[Segment]) -> Result<u16, MockError> {
        let size = self.layout.size;
        if segs.is_empty() || segs.len() > usize::from(size) {
            return Err(MockError::ChainLength(segs.len()));
        }
        let head = self.next_desc;
        for (i, s) in segs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (idx + 1) % size;
            let mut flags = if s.writable { VRING_DESC_F_WRITE } else { 0 } as u16;
            let next = if i + 1 < segs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                self.next_desc
            } else {
                0
            };
            let d = RawDescriptor::from(Descriptor::new(s.addr, s.len, flags, next));
            let at = self.layout.desc_table + 16 * u64::from(idx);
            mem.write_obj(d, GuestAddress(at))?;
        }
        let slot = self.layout.avail_ring + 4 + 2 * u64::from(self.avail_idx % size);
        mem.write_obj(head.to_le(), GuestAddress(slot))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The device may read the index as soon as it is written: entries first.
        fence(Ordering::Release);
        mem.write_obj(
            self.avail_idx.to_le(),
            GuestAddress(self.layout.avail_ring + 2),
        )?;
        Ok(head)
    }

    /// Used entries the device added since the last call.
    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Result<Vec<Used>, MockError> {
        let idx = u16::from_le(mem.read_obj(GuestAddress(self.layout.used_ring + 2))?);
        fence(Ordering::Acquire);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.layout.size);
            let e = self.layout.used_ring + 4 + 8 * slot;
            let id = u32::from_le(mem.read_obj(GuestAddress(e))?);
            let len = u32::from_le(mem.read_obj(GuestAddress(e + 4))?);
            out.push(Used { id, len });
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        Ok(out)
    }
}

/// A virtio-iommu driver over split rings in guest memory (see the module doc). It holds no
/// device: every call that notifies or configures one takes it, so the device can stay wherever
/// the VMM keeps it.
#[derive(Debug)]
pub struct MockDriver {
    mem: GuestMemoryMmap,
    layout: MockLayout,
    req: Ring,
    evt: Ring,
    next_buf: u64,
    /// The chain posted at each head of the event queue (to read fault records back).
    posted: Vec<Vec<Segment>>,
}

impl MockDriver {
    /// A driver with empty rings laid out in `mem` (a clone of the caller's guest memory) as
    /// `layout` says.
    pub fn new(mem: GuestMemoryMmap, layout: MockLayout) -> Result<Self, MockError> {
        layout.check(&mem)?;
        let req = Ring::new(&mem, layout.request)?;
        let evt = Ring::new(&mem, layout.event)?;
        Ok(MockDriver {
            next_buf: layout.buffers.start,
            posted: vec![Vec::new(); usize::from(layout.event.size)],
            mem,
            layout,
            req,
            evt,
        })
    }

    /// The guest memory the rings and buffers live in.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Where the rings and buffers are.
    pub fn layout(&self) -> &MockLayout {
        &self.layout
    }

    /// The request and event queues as the transport hands them to the device.
    pub fn queue_configs(&self) -> Vec<QueueConfig> {
        vec![self.layout.request.config(), self.layout.event.config()]
    }

    /// Start `dev` on this driver's queues with `features` acked (no ioeventfds: the driver
    /// notifies with [`MockDriver::kick`]).
    pub fn activate<D: VirtioDevice + ?Sized>(
        &self,
        dev: &mut D,
        features: u64,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), MockError> {
        dev.activate(
            GuestMemoryAtomic::new(self.mem.clone()),
            features,
            self.queue_configs(),
            Vec::new(),
            interrupt,
        )?;
        Ok(())
    }

    /// [`MockDriver::activate`] with every feature the device offers acked.
    pub fn activate_offered<D: VirtioDevice + ?Sized>(
        &self,
        dev: &mut D,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), MockError> {
        let features = dev.device_features();
        self.activate(dev, features, interrupt)
    }

    /// `len` bytes of the buffer area, filled with `fill`.
    pub fn alloc(&mut self, len: usize, fill: u8) -> Result<u64, MockError> {
        let asked = len as u64;
        let at = self.next_buf;
        let end = asked
            .checked_add(BUF_ALIGN - 1)
            .map(|l| l & !(BUF_ALIGN - 1))
            .and_then(|l| at.checked_add(l))
            .filter(|&e| e <= self.layout.buffers.end)
            .ok_or(MockError::OutOfBuffers(asked))?;
        self.mem.write_slice(&vec![fill; len], GuestAddress(at))?;
        self.next_buf = end;
        Ok(at)
    }

    /// Reuse the whole buffer area (every chain using it must have completed).
    pub fn reset_buffers(&mut self) {
        self.next_buf = self.layout.buffers.start;
    }

    /// Read `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, MockError> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr))?;
        Ok(v)
    }

    /// Make a chain of `segs` available on the request queue (without notifying); its head.
    pub fn queue_request(&mut self, segs: &[Segment]) -> Result<u16, MockError> {
        self.req.push(&self.mem, segs)
    }

    /// Make a chain of `segs` available on the event queue; its head.
    pub fn post_event(&mut self, segs: &[Segment]) -> Result<u16, MockError> {
        let head = self.evt.push(&self.mem, segs)?;
        if let Some(p) = self.posted.get_mut(usize::from(head)) {
            *p = segs.to_vec();
        }
        Ok(head)
    }

    /// Post `n` buffers of one fault record each on the event queue; their addresses.
    pub fn post_fault_buffers(&mut self, n: usize) -> Result<Vec<u64>, MockError> {
        let size = std::mem::size_of::<FaultRecord>();
        (0..n)
            .map(|_| {
                let at = self.alloc(size, 0)?;
                self.post_event(&[Segment::writable(at, size as u32)])?;
                Ok(at)
            })
            .collect()
    }

    /// Notify the request queue (the device serves it before returning).
    pub fn kick<D: VirtioDevice + ?Sized>(&self, dev: &mut D) {
        dev.queue_notify(REQUEST_QUEUE);
    }

    /// Ask the device not to interrupt for the request queue (`VRING_AVAIL_F_NO_INTERRUPT`).
    pub fn set_request_interrupts(&self, enabled: bool) -> Result<(), MockError> {
        let flags = if enabled {
            0
        } else {
            VRING_AVAIL_F_NO_INTERRUPT as u16
        };
        let at = GuestAddress(self.layout.request.avail_ring);
        Ok(self.mem.write_obj(flags.to_le(), at)?)
    }

    /// Used entries of the request queue since the last call.
    pub fn used_requests(&mut self) -> Result<Vec<Used>, MockError> {
        self.req.take_used(&self.mem)
    }

    /// Used entries of the event queue since the last call.
    pub fn used_events(&mut self) -> Result<Vec<Used>, MockError> {
        self.evt.take_used(&self.mem)
    }

    /// The fault records the device completed on the event queue since the last call, like
    /// [`MockDriver::used_events`] (whose entries it consumes); buffers too short for a record,
    /// which the device returns unwritten, are skipped.
    pub fn faults(&mut self) -> Result<Vec<FaultRecord>, MockError> {
        let size = std::mem::size_of::<FaultRecord>();
        let mut out = Vec::new();
        for u in self.used_events()? {
            if u.len as usize != size {
                continue;
            }
            let segs = usize::try_from(u.id)
                .ok()
                .and_then(|i| self.posted.get(i))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mut bytes = Vec::with_capacity(size);
            for s in segs.iter().filter(|s| s.writable) {
                let take = (s.len as usize).min(size - bytes.len());
                bytes.extend(self.read(s.addr, take)?);
            }
            if let Some(r) = FaultRecord::from_slice(&bytes) {
                out.push(*r);
            }
        }
        Ok(out)
    }

    /// Send `body` followed by a `reply_len`-byte writable buffer (filled with [`REPLY_FILL`]),
    /// kick, and return what the device wrote. Once completed, the request's buffers are reused
    /// by the next one.
    pub fn send_bytes<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        body: &[u8],
        reply_len: u32,
    ) -> Result<Reply, MockError> {
        let mark = self.next_buf;
        let queued = self.queue_body(body, reply_len);
        let (head, reply_at) = match queued {
            Ok(q) => q,
            Err(e) => {
                self.next_buf = mark;
                return Err(e);
            }
        };
        self.kick(dev);
        // Until its completion is seen the chain may still be in flight: keep its buffers.
        let got = self.used_requests()?;
        match got.as_slice() {
            [u] if u.id == u32::from(head) => {
                let bytes = self.read(reply_at, reply_len as usize)?;
                self.next_buf = mark;
                Ok(Reply {
                    used_len: u.len,
                    bytes,
                })
            }
            _ => Err(MockError::Completion { head, got }),
        }
    }

    /// Write `body` and a reply buffer and queue them as one chain: its head, the reply's
    /// address.
    fn queue_body(&mut self, body: &[u8], reply_len: u32) -> Result<(u16, u64), MockError> {
        let blen = u32::try_from(body.len()).map_err(|_| MockError::OutOfBuffers(u64::MAX))?;
        let b = self.alloc(body.len(), 0)?;
        self.mem.write_slice(body, GuestAddress(b))?;
        let r = self.alloc(reply_len as usize, REPLY_FILL)?;
        let segs = [Segment::readable(b, blen), Segment::writable(r, reply_len)];
        Ok((self.queue_request(&segs)?, r))
    }

    /// Send `req` (a PROBE with room for the device's `probe_size`) and return the reply.
    pub fn send<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        req: &Request,
    ) -> Result<Reply, MockError> {
        let probe_size = self.config(&*dev).probe_size.into();
        self.send_bytes(dev, req.as_bytes(), req.reply_len(probe_size))
    }

    /// Send `req` and return the tail's status.
    pub fn status<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        req: &Request,
    ) -> Result<Status, MockError> {
        self.send(dev, req)?.status()
    }

    /// ATTACH `endpoint` to `domain`.
    pub fn attach<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        domain: u32,
        endpoint: u32,
    ) -> Result<Status, MockError> {
        self.status(dev, &Request::attach(domain, endpoint, 0))
    }

    /// ATTACH `endpoint` to the bypass domain `domain`.
    pub fn attach_bypass<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        domain: u32,
        endpoint: u32,
    ) -> Result<Status, MockError> {
        self.status(dev, &Request::attach_bypass(domain, endpoint))
    }

    /// DETACH `endpoint` from `domain`.
    pub fn detach<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        domain: u32,
        endpoint: u32,
    ) -> Result<Status, MockError> {
        self.status(dev, &Request::detach(domain, endpoint))
    }

    /// MAP `size` bytes at IOVA `iova` of `domain` to GPA `gpa` with MAP_F_* `flags`.
    pub fn map<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        domain: u32,
        iova: u64,
        size: u64,
        gpa: u64,
        flags: u32,
    ) -> Result<Status, MockError> {
        let end = iova.wrapping_add(size).wrapping_sub(1);
        self.status(dev, &Request::map(domain, iova, end, gpa, flags))
    }

    /// UNMAP `size` bytes at IOVA `iova` of `domain`.
    pub fn unmap<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        domain: u32,
        iova: u64,
        size: u64,
    ) -> Result<Status, MockError> {
        let end = iova.wrapping_add(size).wrapping_sub(1);
        self.status(dev, &Request::unmap(domain, iova, end))
    }

    /// PROBE `endpoint`: the status and the properties the device reported.
    pub fn probe<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        endpoint: u32,
    ) -> Result<(Status, Vec<Property>), MockError> {
        let reply = self.send(dev, &Request::probe(endpoint))?;
        Ok((reply.status()?, reply.properties()?))
    }

    /// The device's configuration space.
    pub fn config<D: VirtioDevice + ?Sized>(&self, dev: &D) -> IommuConfig {
        let mut cfg = IommuConfig::default();
        dev.read_config(0, cfg.as_mut_slice());
        cfg
    }

    /// Write `config.bypass` (the device ignores it without VIRTIO_IOMMU_F_BYPASS_CONFIG).
    pub fn set_bypass<D: VirtioDevice + ?Sized>(&self, dev: &mut D, on: bool) {
        dev.write_config(CONFIG_BYPASS_OFFSET, &[u8::from(on)]);
    }

    /// `config.bypass` as the device reports it.
    pub fn bypass<D: VirtioDevice + ?Sized>(&self, dev: &D) -> bool {
        self.config(dev).bypass == 1
    }
}

// `MockDriver::queue_configs` lists the queues in index order.
const _: () = assert!(REQUEST_QUEUE == 0 && EVENT_QUEUE == 1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{FAULT_R_MAPPING, MAP_F_READ, MAP_F_WRITE, RESV_MEM_T_MSI};
    use crate::{Access, TranslatedMemory, Viommu, ViommuConfig};

    const EP: u32 = 0x08;

    fn setup(cfg: ViommuConfig) -> (MockDriver, Viommu, crate::EndpointHandle) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut dev = Viommu::new(cfg).unwrap();
        let ep = dev.add_endpoint(EP).unwrap();
        let drv = MockDriver::new(mem, MockLayout::packed(0, 0x1_0000, 16, 16)).unwrap();
        drv.activate_offered(&mut dev, Arc::new(NoInterrupt))
            .unwrap();
        (drv, dev, ep)
    }

    #[test]
    fn packed_layout_follows_the_spec_alignment() {
        let q = QueueLayout::packed(0x1000, 16);
        assert_eq!(
            (q.desc_table, q.avail_ring, q.used_ring),
            (0x1000, 0x1100, 0x1128)
        );
        assert_eq!(q.end(), 0x1128 + 6 + 8 * 16);
        let l = MockLayout::packed(0, 0x1_0000, 16, 16);
        assert_eq!(l.event.desc_table, 0x1000);
        assert_eq!(l.buffers, 0x2000..0x1_0000);
    }

    #[test]
    fn bad_layouts_are_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let mut l = MockLayout::packed(0, 0x1_0000, 16, 16);
        l.event = l.request;
        assert!(matches!(
            MockDriver::new(mem.clone(), l),
            Err(MockError::Layout(..))
        ));
        let l = MockLayout::packed(0, 0x2_0000, 16, 16);
        assert!(matches!(
            MockDriver::new(mem.clone(), l),
            Err(MockError::Layout("buffer area", ..))
        ));
        let l = MockLayout::packed(0, 0x1_0000, 12, 16);
        assert!(matches!(
            MockDriver::new(mem, l),
            Err(MockError::QueueSize(12))
        ));
    }

    #[test]
    fn typed_requests_reach_the_engine() {
        let (mut drv, mut dev, ep) = setup(ViommuConfig::default());
        assert_eq!(drv.attach(&mut dev, 1, EP).unwrap(), Status::Ok);
        let rw = MAP_F_READ | MAP_F_WRITE;
        assert_eq!(
            drv.map(&mut dev, 1, 0x10_0000, 0x1000, 0x8000, rw).unwrap(),
            Status::Ok
        );
        let m = ep.view().translate(0x10_0010, Access::Write).unwrap();
        assert_eq!(m.gpa_of(0x10_0010), 0x8010);
        assert_eq!(
            drv.map(&mut dev, 7, 0, 0x1000, 0, rw).unwrap(),
            Status::NoEnt
        );
        assert_eq!(
            drv.unmap(&mut dev, 1, 0x10_0000, 0x1000).unwrap(),
            Status::Ok
        );
        assert!(ep.view().translate(0x10_0010, Access::Read).is_err());
        assert_eq!(drv.detach(&mut dev, 1, EP).unwrap(), Status::Ok);
        // Every request gave its buffers back.
        assert_eq!(drv.next_buf, drv.layout().buffers.start);
        // More requests than the queue has entries: the rings wrap.
        for _ in 0..40 {
            assert_eq!(drv.attach_bypass(&mut dev, 2, EP).unwrap(), Status::Ok);
        }
    }

    #[test]
    fn probe_properties_and_unwritten_replies() {
        let (mut drv, mut dev, _) = setup(ViommuConfig::default());
        let (st, props) = drv.probe(&mut dev, EP).unwrap();
        assert_eq!(st, Status::Ok);
        assert_eq!(
            props,
            vec![Property::ResvMem {
                subtype: RESV_MEM_T_MSI,
                start: 0xfee0_0000,
                end: 0xfeef_ffff
            }]
        );
        // A body one byte short is returned unwritten.
        let body = Request::attach(1, EP, 0);
        let reply = drv.send_bytes(&mut dev, &body.as_bytes()[..19], 4).unwrap();
        assert_eq!(reply.bytes, vec![REPLY_FILL; 4]);
        assert!(matches!(reply.status(), Err(MockError::Unanswered(0))));
    }

    #[test]
    fn bypass_config_and_fault_records() {
        let (mut drv, mut dev, ep) = setup(ViommuConfig::default());
        assert!(drv.bypass(&dev));
        drv.set_bypass(&mut dev, false);
        assert!(!drv.bypass(&dev));
        drv.post_fault_buffers(2).unwrap();
        assert_eq!(drv.attach(&mut dev, 1, EP).unwrap(), Status::Ok);
        let tm = TranslatedMemory::new(drv.mem().clone(), ep);
        assert!(tm.read_obj::<u32>(GuestAddress(0x4000)).is_err());
        let f = drv.faults().unwrap();
        assert_eq!(f.len(), 1);
        let (reason, endpoint, address) = (f[0].reason, f[0].endpoint, f[0].address);
        assert_eq!(
            (reason, u32::from(endpoint), u64::from(address)),
            (FAULT_R_MAPPING, EP, 0x4000)
        );
        assert!(drv.faults().unwrap().is_empty(), "read once");
    }
}
