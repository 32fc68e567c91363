//! The driver's side of the split rings (virtio 1.x §2.7): where they lie, descriptor chains
//! made available, used entries read back.
//!
//! The rings are laid out here rather than with virtio-queue's `MockSplitQueue`: in
//! virtio-queue 0.18 its used ring starts inside its available ring (`SplitQueueRing::end`
//! counts elements as bytes; rust-vmm/vm-virtio#400) and `add_desc_chains` does not wrap the
//! available index, so a driver sending more than half a queue of requests corrupts its own
//! rings; it also borrows the memory, which a driver that owns its rings cannot do. The
//! descriptors are virtio-queue's.

use super::error::MockError;
use std::ops::Range;
use std::sync::atomic::{fence, Ordering};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_dev::QueueConfig;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// Largest split queue (virtio 1.x §2.7).
const MAX_QUEUE_SIZE: u16 = 32768;

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
    pub(super) fn check(&self, mem: &GuestMemoryMmap) -> Result<(), MockError> {
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

/// The driver's side of one split ring: descriptors are used round-robin from the table, one
/// chain after the other (the caller keeps at most `size` descriptors in flight).
#[derive(Debug)]
pub(super) struct Ring {
    layout: QueueLayout,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    /// An empty ring: both ring headers (and the event fields) zeroed.
    pub(super) fn new(mem: &GuestMemoryMmap, layout: QueueLayout) -> Result<Self, MockError> {
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
    pub(super) fn push(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[Segment],
    ) -> Result<u16, MockError> {
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
    pub(super) fn take_used(&mut self, mem: &GuestMemoryMmap) -> Result<Vec<Used>, MockError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(matches!(l.check(&mem), Err(MockError::Layout(..))));
        let l = MockLayout::packed(0, 0x2_0000, 16, 16);
        assert!(matches!(
            l.check(&mem),
            Err(MockError::Layout("buffer area", ..))
        ));
        let l = MockLayout::packed(0, 0x1_0000, 12, 16);
        assert!(matches!(l.check(&mem), Err(MockError::QueueSize(12))));
    }
}
