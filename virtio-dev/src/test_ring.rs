//! A split ring laid out by hand for the unit tests (`virtio_queue::mock::MockSplitQueue`
//! places its used ring over the end of the available ring, `used_event` included).

use crate::device::QueueConfig;
use crate::queue::usable_queue;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub(crate) const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

pub(crate) fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
}

/// The driver side of one queue in `m`.
pub(crate) struct Ring<'a> {
    pub m: &'a GuestMemoryMmap,
    avail_idx: u16,
}

impl<'a> Ring<'a> {
    pub fn new(m: &'a GuestMemoryMmap) -> Self {
        for a in [AVAIL, AVAIL + 2, USED, USED + 2] {
            m.write_obj(0u16, GuestAddress(a)).unwrap();
        }
        Ring { m, avail_idx: 0 }
    }

    /// The device's queue (EVENT_IDX as given).
    pub fn queue(&self, event_idx: bool) -> Queue {
        let qc = QueueConfig {
            size: QSIZE,
            desc_table: GuestAddress(DESC),
            avail_ring: GuestAddress(AVAIL),
            used_ring: GuestAddress(USED),
            ready: true,
        };
        usable_queue(&qc, 256, event_idx, self.m).unwrap()
    }

    /// Make `n` one-descriptor chains available (descriptor i: 0x10 + i writable bytes).
    pub fn post(&mut self, n: u16) {
        for _ in 0..n {
            let i = self.avail_idx % QSIZE;
            let d = DESC + 16 * u64::from(i);
            let flags = VRING_DESC_F_WRITE as u16;
            self.m
                .write_obj(0x8000 + u64::from(i) * 0x100, GuestAddress(d))
                .unwrap();
            self.m
                .write_obj(0x10 + u32::from(i), GuestAddress(d + 8))
                .unwrap();
            self.m.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.m.write_obj(0u16, GuestAddress(d + 14)).unwrap();
            self.m
                .write_obj(i, GuestAddress(AVAIL + 4 + 2 * u64::from(i)))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.set_avail_idx(self.avail_idx);
    }

    pub fn set_avail_idx(&self, idx: u16) {
        self.m.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    pub fn set_avail_flags(&self, flags: u16) {
        self.m.write_obj(flags, GuestAddress(AVAIL)).unwrap();
    }

    pub fn set_used_event(&self, e: u16) {
        let at = AVAIL + 4 + 2 * u64::from(QSIZE);
        self.m.write_obj(e, GuestAddress(at)).unwrap();
    }

    pub fn used_flags(&self) -> u16 {
        self.m.read_obj(GuestAddress(USED)).unwrap()
    }

    /// The used ring's entries (id, len), oldest first.
    pub fn used(&self) -> Vec<(u32, u32)> {
        let idx: u16 = self.m.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..u64::from(idx))
            .map(|i| {
                let at = USED + 4 + 8 * (i % u64::from(QSIZE));
                (
                    self.m.read_obj(GuestAddress(at)).unwrap(),
                    self.m.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }
}
