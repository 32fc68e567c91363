//! A driver's side of split virtqueues for the device harnesses: a [`Space`] (the addresses
//! the device uses, guest-physical or IOVAs of one linear mapping) and [`SplitRing`]s laid out
//! in it, written the way a driver would, plus raw descriptor and avail-ring writes.

use virtio_dev::QueueConfig;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
/// Device-writable descriptor.
pub const F_WRITE: u16 = 2;

/// The device's view of guest RAM as the driver programs it: device address `a` (below
/// `size`) is guest-physical `base + a` (`base` 0 and `size` all of RAM without an IOMMU; one
/// linear IOVA mapping behind it).
#[derive(Clone)]
pub struct Space {
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// Guest-physical address of device address 0.
    pub base: u64,
    /// Device addresses the driver can reach.
    pub size: u64,
}

impl Space {
    /// Guest-physical address of device address `a` (`None` outside the space).
    pub fn gpa(&self, a: u64) -> Option<u64> {
        (a < self.size).then(|| self.base + a)
    }

    /// Write `data` at device address `a`; false (nothing written) if it leaves the space.
    pub fn write(&self, a: u64, data: &[u8]) -> bool {
        let fits = a
            .checked_add(data.len() as u64)
            .is_some_and(|e| e <= self.size);
        fits && self
            .mem
            .write_slice(data, GuestAddress(self.base + a))
            .is_ok()
    }

    /// Read `buf.len()` bytes at device address `a`; false if it leaves the space.
    pub fn read(&self, a: u64, buf: &mut [u8]) -> bool {
        let fits = a
            .checked_add(buf.len() as u64)
            .is_some_and(|e| e <= self.size);
        fits && self
            .mem
            .read_slice(buf, GuestAddress(self.base + a))
            .is_ok()
    }

    /// Little-endian u16 at device address `a` (0 outside).
    pub fn u16(&self, a: u64) -> u16 {
        let mut b = [0u8; 2];
        self.read(a, &mut b);
        u16::from_le_bytes(b)
    }

    /// Little-endian u32 at device address `a` (0 outside).
    pub fn u32(&self, a: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(a, &mut b);
        u32::from_le_bytes(b)
    }
}

/// One split virtqueue: descriptor table at `base`, avail ring at `base + 0x1000`, used ring
/// at `base + 0x2000` (room for 256 entries each), and the driver's bookkeeping.
#[derive(Clone, Copy, Debug)]
pub struct SplitRing {
    /// Descriptor table (device address).
    pub desc: u64,
    /// Avail ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Queue size (entries).
    pub size: u16,
    /// Next free descriptor index.
    pub next_desc: u16,
    /// The avail index the driver published.
    pub avail_idx: u16,
    /// Used entries already read by [`SplitRing::take_used`].
    pub used_seen: u16,
    /// Descriptors written since the device last drained the queue: past `size` a chain the
    /// device has not read yet was overwritten.
    pub outstanding: usize,
}

/// Bytes a [`SplitRing`] occupies.
pub const RING_STRIDE: u64 = 0x3000;

impl SplitRing {
    /// A ring of `size` entries at `base`.
    pub fn new(base: u64, size: u16) -> Self {
        SplitRing {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            outstanding: 0,
        }
    }

    /// Zero the rings in `s` (a fresh driver) and restart the bookkeeping.
    pub fn clear(&mut self, s: &Space) {
        s.write(self.desc, &[0u8; 0x3000]);
        *self = SplitRing::new(self.desc, self.size);
    }

    /// The queue configuration a transport would hand the device.
    pub fn config(&self) -> QueueConfig {
        QueueConfig {
            size: self.size,
            desc_table: GuestAddress(self.desc),
            avail_ring: GuestAddress(self.avail),
            used_ring: GuestAddress(self.used),
            ready: true,
        }
    }

    /// Write descriptor `idx` (taken modulo 256, the table's room).
    pub fn write_desc(&self, s: &Space, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        s.write(self.desc + 16 * u64::from(idx % 256), &raw);
    }

    /// Append one chain of `(addr, len, device-writable)` and publish it; returns its head.
    pub fn push_chain(&mut self, s: &Space, bufs: &[(u64, u32, bool)]) -> u16 {
        let size = self.size.max(1);
        let head = self.next_desc % size;
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let idx = self.next_desc % size;
            self.next_desc = (idx + 1) % size;
            let last = i + 1 == bufs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let next = if last { 0 } else { self.next_desc };
            self.write_desc(s, idx, addr, len, flags, next);
        }
        self.outstanding += bufs.len();
        self.publish(s, head, 1);
        head
    }

    /// Put `head` in the next avail slot and move the avail index by `bump`.
    pub fn publish(&mut self, s: &Space, head: u16, bump: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size.max(1));
        s.write(slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(bump);
        s.write(self.avail + 2, &self.avail_idx.to_le_bytes());
    }

    /// The used index the device published.
    pub fn used_idx(&self, s: &Space) -> u16 {
        s.u16(self.used + 2)
    }

    /// Used entries (id, len) published since the last call.
    pub fn take_used(&mut self, s: &Space) -> Vec<(u32, u32)> {
        let idx = self.used_idx(s);
        let n = idx.wrapping_sub(self.used_seen);
        let mut out = Vec::with_capacity(usize::from(n.min(self.size)));
        for i in 0..n.min(self.size) {
            let slot = u64::from(self.used_seen.wrapping_add(i) % self.size.max(1));
            let at = self.used + 4 + 8 * slot;
            out.push((s.u32(at), s.u32(at + 4)));
        }
        self.used_seen = idx;
        out
    }
}

/// A bump allocator over `[start, end)` that wraps around (old buffers get reused).
#[derive(Clone, Copy, Debug)]
pub struct Area {
    start: u64,
    end: u64,
    next: u64,
    /// Set when an allocation wrapped (it may overlap buffers still in use).
    pub wrapped: bool,
}

impl Area {
    /// Allocate from `[start, end)`.
    pub fn new(start: u64, end: u64) -> Self {
        Area {
            start,
            end,
            next: start,
            wrapped: false,
        }
    }

    /// Start over (every buffer is free again).
    pub fn reset(&mut self) {
        self.next = self.start;
        self.wrapped = false;
    }

    /// `len` bytes (16-byte aligned), wrapping to the start when the area is used up.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let len = (len.min(self.end - self.start) + 0xf) & !0xf;
        if self.next + len > self.end {
            self.next = self.start;
            self.wrapped = true;
        }
        let a = self.next;
        self.next += len;
        a
    }
}
