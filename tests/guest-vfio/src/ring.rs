//! One split virtqueue (virtio 1.x §2.7) laid out in a DMA buffer: descriptor table, driver
//! (available) ring, device (used) ring. All accesses go through [`Mem`] (volatile for DMA
//! memory), never through Rust references.

use std::sync::atomic::{fence, Ordering};

/// Descriptor continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Device writes the buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Driver ring flag: no interrupts wanted (we poll).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Byte-addressed memory the ring lives in. Out-of-bounds accesses are ignored (reads give 0).
pub trait Mem {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// Whether the memory is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Read `N` bytes at `off`.
    fn read<const N: usize>(&self, off: u64) -> [u8; N];
    /// Write `bytes` at `off`.
    fn write(&self, off: u64, bytes: &[u8]);

    /// Little-endian u16 at `off`.
    fn read_u16(&self, off: u64) -> u16 {
        u16::from_le_bytes(self.read(off))
    }
    /// Little-endian u32 at `off`.
    fn read_u32(&self, off: u64) -> u32 {
        u32::from_le_bytes(self.read(off))
    }
    /// Write a little-endian u16.
    fn write_u16(&self, off: u64, v: u16) {
        self.write(off, &v.to_le_bytes());
    }
    /// Write a little-endian u32.
    fn write_u32(&self, off: u64, v: u32) {
        self.write(off, &v.to_le_bytes());
    }
    /// Write a little-endian u64.
    fn write_u64(&self, off: u64, v: u64) {
        self.write(off, &v.to_le_bytes());
    }
}

/// Where the three parts of one queue of `size` entries sit, as offsets in the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Entries (a power of two).
    pub size: u16,
    /// Descriptor table (16-byte aligned, 16 bytes per entry).
    pub desc: u64,
    /// Driver ring: flags, idx, `ring[size]`, used_event.
    pub avail: u64,
    /// Device ring (4-byte aligned; we page-align it): flags, idx, `{id, len}[size]`, avail_event.
    pub used: u64,
    /// First byte after the queue.
    pub end: u64,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Layout {
    /// The layout of a `size`-entry queue starting at offset `base` (16-byte aligned).
    pub fn new(size: u16, base: u64) -> Layout {
        let desc = align_up(base, 16);
        let avail = desc + 16 * u64::from(size);
        let avail_end = avail + 6 + 2 * u64::from(size);
        let used = align_up(avail_end, 4096);
        let end = used + 6 + 8 * u64::from(size);
        Layout {
            size,
            desc,
            avail,
            used,
            end,
        }
    }
}

/// One descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// IOVA of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `DESC_F_*`.
    pub flags: u16,
    /// Next descriptor if `DESC_F_NEXT`.
    pub next: u16,
}

/// The driver side of one split queue.
pub struct SplitQueue<'m, M: Mem> {
    mem: &'m M,
    layout: Layout,
    next_avail: u16,
    last_used: u16,
}

impl<'m, M: Mem> SplitQueue<'m, M> {
    /// Zero the queue's memory and set the driver ring's no-interrupt flag.
    pub fn new(mem: &'m M, layout: Layout) -> Self {
        for off in (layout.desc..layout.end).step_by(4) {
            mem.write_u32(off, 0);
        }
        mem.write_u16(layout.avail, AVAIL_F_NO_INTERRUPT);
        SplitQueue {
            mem,
            layout,
            next_avail: 0,
            last_used: 0,
        }
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Write descriptor `i` (taken modulo the queue size).
    pub fn set_desc(&self, i: u16, d: Desc) {
        let at = self.layout.desc + 16 * u64::from(i % self.layout.size);
        self.mem.write_u64(at, d.addr);
        self.mem.write_u32(at + 8, d.len);
        self.mem.write_u16(at + 12, d.flags);
        self.mem.write_u16(at + 14, d.next);
    }

    /// Make the chain starting at `head` available: ring entry, then (after a fence) idx.
    pub fn push(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % self.layout.size);
        self.mem.write_u16(self.layout.avail + 4 + 2 * slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.mem.write_u16(self.layout.avail + 2, self.next_avail);
        fence(Ordering::SeqCst);
    }

    /// The next used element `(id, len)`, if the device published one.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        let idx = self.mem.read_u16(self.layout.used + 2);
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = u64::from(self.last_used % self.layout.size);
        let at = self.layout.used + 4 + 8 * slot;
        let elem = (self.mem.read_u32(at), self.mem.read_u32(at + 4));
        self.last_used = self.last_used.wrapping_add(1);
        Some(elem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct VecMem(RefCell<Vec<u8>>);

    impl Mem for VecMem {
        fn len(&self) -> u64 {
            self.0.borrow().len() as u64
        }
        fn read<const N: usize>(&self, off: u64) -> [u8; N] {
            let v = self.0.borrow();
            let mut out = [0; N];
            if let Some(s) = v.get(off as usize..off as usize + N) {
                out.copy_from_slice(s);
            }
            out
        }
        fn write(&self, off: u64, bytes: &[u8]) {
            let mut v = self.0.borrow_mut();
            if let Some(s) = v.get_mut(off as usize..off as usize + bytes.len()) {
                s.copy_from_slice(bytes);
            }
        }
    }

    #[test]
    fn layout_follows_the_spec_alignment() {
        let l = Layout::new(8, 0);
        assert_eq!((l.desc, l.avail, l.used), (0, 128, 4096));
        assert_eq!(l.end, 4096 + 6 + 64);
        let l = Layout::new(256, 8);
        assert_eq!(l.desc, 16);
        assert_eq!(l.avail, 16 + 4096);
        assert_eq!(l.used, 8192, "avail ends at 16+4096+518, page-aligned up");
    }

    #[test]
    fn chain_avail_and_used_bytes() {
        let mem = VecMem(RefCell::new(vec![0xaa; 3 * 4096]));
        let mut q = SplitQueue::new(&mem, Layout::new(4, 0));
        assert_eq!(mem.read_u16(q.layout().avail), AVAIL_F_NO_INTERRUPT);
        q.set_desc(
            0,
            Desc {
                addr: 0x1122_3344_5566_7788,
                len: 16,
                flags: DESC_F_NEXT,
                next: 1,
            },
        );
        q.set_desc(
            5, // wraps to 1
            Desc {
                addr: 0x10_0000,
                len: 512,
                flags: DESC_F_WRITE,
                next: 0,
            },
        );
        let d0: [u8; 16] = mem.read(0);
        assert_eq!(
            d0,
            [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 16, 0, 0, 0, 1, 0, 1, 0]
        );
        let d1: [u8; 16] = mem.read(16);
        assert_eq!(&d1[8..14], &[0, 2, 0, 0, 2, 0]);
        // Five pushes wrap the 4-entry ring.
        for head in [0u16, 3, 2, 1, 0] {
            q.push(head);
        }
        let avail = q.layout().avail;
        assert_eq!(mem.read_u16(avail + 2), 5);
        assert_eq!(
            mem.read_u16(avail + 4),
            0,
            "slot 0 rewritten by the 5th push"
        );
        assert_eq!(mem.read_u16(avail + 6), 3);
        // Nothing used yet; then the device publishes two elements.
        assert_eq!(q.pop_used(), None);
        let used = q.layout().used;
        mem.write_u32(used + 4, 0);
        mem.write_u32(used + 8, 513);
        mem.write_u32(used + 12, 3);
        mem.write_u32(used + 16, 1);
        mem.write_u16(used + 2, 2);
        assert_eq!(q.pop_used(), Some((0, 513)));
        assert_eq!(q.pop_used(), Some((3, 1)));
        assert_eq!(q.pop_used(), None);
    }
}
