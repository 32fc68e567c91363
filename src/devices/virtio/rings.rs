//! How a device behind the vIOMMU reaches a virtqueue's rings during one batch of work.
//!
//! The descriptor table, the available ring and the used ring sit at IOVAs fixed at activation.
//! Translating every ring access (a dozen per packet) costs more than the access itself, so
//! once per view generation [`QueueRings::prepare`] translates each ring whole and, when every
//! ring lies in one mapping with the access it needs and in guest RAM, points the queue at the
//! rings' guest-physical addresses: the batch then reaches the rings directly, under the same
//! pinned view, with the same result. Buffers (what the descriptors point to) are still
//! translated access by access. A ring not mapped that way keeps the queue on its IOVAs and
//! every access translated, faults included.
//!
//! Packet bytes go through [`Buffers`]: behind the vIOMMU each copy is one translation and one
//! backend access per mapping it spans.
//!
//! Chains are walked here ([`walk_chain`]) rather than by `virtio_queue::DescriptorChain`:
//! indirect descriptors are refused (the devices using this module do not offer them), so the
//! descriptor table is the only ring memory a chain reads.

use viommu::{Access, PinnedView};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};

/// One descriptor: (address, length, device-writable).
pub type Desc = (GuestAddress, u32, bool);

/// Guest memory a device copies packet bytes to and from: guest-physical memory directly, or
/// behind the vIOMMU one backend access per mapping covered (no generic slice iteration).
pub trait Buffers: GuestMemory {
    /// Fill `buf` from `at`.
    fn read_buf(&self, buf: &mut [u8], at: GuestAddress) -> Result<(), GuestMemoryError>;
    /// Write `data` at `at`.
    fn write_buf(&self, data: &[u8], at: GuestAddress) -> Result<(), GuestMemoryError>;
    /// Run `f`, blocking work that touches no guest memory through this memory (behind the
    /// vIOMMU outside the round's pinned view: `PinnedView::outside`).
    fn outside(&self, f: &mut dyn FnMut()) {
        f()
    }
}

impl Buffers for GuestMemoryMmap {
    fn read_buf(&self, buf: &mut [u8], at: GuestAddress) -> Result<(), GuestMemoryError> {
        self.read_slice(buf, at)
    }
    fn write_buf(&self, data: &[u8], at: GuestAddress) -> Result<(), GuestMemoryError> {
        self.write_slice(data, at)
    }
}

impl Buffers for PinnedView<'_> {
    fn read_buf(&self, buf: &mut [u8], at: GuestAddress) -> Result<(), GuestMemoryError> {
        self.read_into(buf, at)
    }
    fn write_buf(&self, data: &[u8], at: GuestAddress) -> Result<(), GuestMemoryError> {
        self.write_from(data, at)
    }
    fn outside(&self, f: &mut dyn FnMut()) {
        PinnedView::outside(self, f)
    }
}

/// The rings of one queue as the driver gave them (IOVAs), and where the queue points now.
#[derive(Debug)]
pub struct QueueRings {
    /// Descriptor table, available ring, used ring (IOVAs).
    iova: [GuestAddress; 3],
    /// View generation the queue's addresses were set for (0: none yet).
    generation: u64,
    /// The queue points at guest-physical addresses.
    direct: bool,
}

impl QueueRings {
    /// The rings `queue` was activated with (its current addresses, IOVAs).
    pub fn new(queue: &Queue) -> Self {
        QueueRings {
            iova: [
                GuestAddress(queue.desc_table()),
                GuestAddress(queue.avail_ring()),
                GuestAddress(queue.used_ring()),
            ],
            generation: 0,
            direct: false,
        }
    }

    /// Point `queue` at the rings for the view `mem` pins; true when they are reached
    /// directly (use `mem.backend()` for ring accesses), false when through `mem`.
    pub fn prepare(&mut self, queue: &mut Queue, mem: &PinnedView) -> bool {
        let generation = mem.generation();
        if generation == self.generation {
            return self.direct;
        }
        self.generation = generation;
        let size = u64::from(queue.size());
        let spans = [
            (self.iova[0], 16 * size, Access::Read),
            (self.iova[1], 4 + 2 * size, Access::Read),
            (self.iova[2], 4 + 8 * size, Access::Write),
        ];
        let mut gpas = [GuestAddress(0); 3];
        let mut direct = true;
        for (i, &(iova, len, access)) in spans.iter().enumerate() {
            match mem.translate_quiet(iova.0, len, access).as_deref() {
                Some(&[(gpa, n)])
                    if n == len
                        && GuestMemoryBackend::check_range(
                            mem.backend(),
                            GuestAddress(gpa),
                            len as usize,
                        ) =>
                {
                    gpas[i] = GuestAddress(gpa);
                }
                _ => {
                    direct = false;
                    break;
                }
            }
        }
        let addrs = if direct { gpas } else { self.iova };
        // Same alignment as the IOVAs (the queue checked them at activation) when direct: a
        // translation keeps the offset within the page.
        let ok = queue.try_set_desc_table_address(addrs[0]).is_ok()
            && queue.try_set_avail_ring_address(addrs[1]).is_ok()
            && queue.try_set_used_ring_address(addrs[2]).is_ok();
        if !ok {
            // Unreachable for page-granular mappings; stay on the IOVAs.
            let _ = queue.try_set_desc_table_address(self.iova[0]);
            let _ = queue.try_set_avail_ring_address(self.iova[1]);
            let _ = queue.try_set_used_ring_address(self.iova[2]);
            direct = false;
        }
        self.direct = direct;
        direct
    }
}

/// The descriptors of `chain` (just popped from `queue`; its descriptor table is read through
/// the chain's memory) in `out`, cleared first; `None` if the chain is malformed (see
/// [`walk_chain`]).
pub fn chain_descs<'d, M: GuestMemory>(
    queue: &Queue,
    chain: &DescriptorChain<&M>,
    out: &'d mut Vec<Desc>,
) -> Option<&'d [Desc]> {
    out.clear();
    walk_chain(chain.memory(), queue, chain.head_index(), out).then_some(&out[..])
}

/// Append the descriptors of the chain at `head` in `queue`'s descriptor table (read through
/// `mem`) to `out`; false (and `out` as it was) if the chain is malformed: an index out of
/// the table, a loop (longer than the table), an indirect descriptor, or unreadable.
pub fn walk_chain<M: GuestMemory>(mem: &M, queue: &Queue, head: u16, out: &mut Vec<Desc>) -> bool {
    let start = out.len();
    let size = queue.size();
    let table = queue.desc_table();
    let mut idx = head;
    for _ in 0..size {
        if idx >= size {
            break;
        }
        let mut raw = [0u8; 16];
        let Some(at) = table.checked_add(16 * u64::from(idx)) else {
            break;
        };
        if mem.read_slice(&mut raw, GuestAddress(at)).is_err() {
            break;
        }
        let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
            break;
        }
        out.push((
            GuestAddress(addr),
            len,
            flags & VRING_DESC_F_WRITE as u16 != 0,
        ));
        if flags & VRING_DESC_F_NEXT as u16 == 0 {
            return true;
        }
        idx = next;
    }
    out.truncate(start);
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn desc(m: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        m.write_slice(&raw, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }

    fn queue(table: u64) -> Queue {
        let mut q = Queue::new(8).unwrap();
        q.try_set_desc_table_address(GuestAddress(table)).unwrap();
        q
    }

    #[test]
    fn chains_are_walked_and_bad_ones_refused() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let q = queue(0x1000);
        desc(&m, 0x1000, 0, 0x5000, 12, VRING_DESC_F_NEXT as u16, 3);
        desc(&m, 0x1000, 3, 0x6000, 100, VRING_DESC_F_WRITE as u16, 0);
        let mut out = vec![(GuestAddress(1), 1, false)];
        assert!(walk_chain(&m, &q, 0, &mut out));
        assert_eq!(
            out[1..],
            [
                (GuestAddress(0x5000), 12, false),
                (GuestAddress(0x6000), 100, true)
            ]
        );
        // A loop, an index past the table, an indirect descriptor: refused, `out` untouched.
        desc(&m, 0x1000, 1, 0x5000, 1, VRING_DESC_F_NEXT as u16, 1);
        desc(&m, 0x1000, 2, 0x5000, 1, VRING_DESC_F_NEXT as u16, 9);
        desc(&m, 0x1000, 4, 0x5000, 16, VRING_DESC_F_INDIRECT as u16, 0);
        for head in [1, 2, 4, 8] {
            let mut out = Vec::new();
            assert!(!walk_chain(&m, &q, head, &mut out), "head {head}");
            assert!(out.is_empty());
        }
        // A table outside guest memory.
        let far = queue(0x10_0000);
        assert!(!walk_chain(&m, &far, 0, &mut Vec::new()));
    }
}
