//! Whether the driver wants an interrupt after used-ring updates. virtio-queue implements the
//! EVENT_IDX rule but not `VRING_AVAIL_F_NO_INTERRUPT`, which Linux sets on queues it polls
//! (virtio-iommu's request queue) and while it processes used entries (virtio-net NAPI).

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Call once after a batch of `add_used`: true when the driver should be interrupted.
///
/// With EVENT_IDX negotiated (`queue.event_idx_enabled()`) the driver's `used_event` decides;
/// without it, the avail ring's `VRING_AVAIL_F_NO_INTERRUPT` flag (virtio 1.x, 2.7.7: "the
/// device ... SHOULD NOT send a notification" while it is set). Either way the used-ring writes
/// are fenced before the driver's field is read. A ring the device cannot read (a hostile or
/// unmapped address) gets the interrupt: the driver then finds nothing new, never a lost entry.
pub fn wants_interrupt<M: GuestMemory>(queue: &mut Queue, mem: &M) -> bool {
    // needs_notification issues a full fence after the used-ring writes in every case.
    match queue.needs_notification(mem) {
        Ok(false) => false,
        Ok(true) if queue.event_idx_enabled() => true,
        Ok(true) => match mem.read_obj::<u16>(GuestAddress(queue.avail_ring())) {
            Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
            Err(_) => true,
        },
        Err(e) => {
            // Guest-controlled (used_event's address): not worth a warning per batch.
            log::debug!("virtio: notification check failed: {e}");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    /// A queue of 16 with one used entry added; avail flags and used_event as given.
    fn queue(m: &GuestMemoryMmap, event_idx: bool, flags: u16, used_event: u16) -> Queue {
        let vq = MockSplitQueue::new(m, 16);
        let avail = vq.avail_addr();
        m.write_obj(flags.to_le(), avail).unwrap();
        // used_event follows the 16 ring entries (flags, idx, ring[16]).
        m.write_obj(used_event.to_le(), avail.unchecked_add(4 + 2 * 16))
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_event_idx(event_idx);
        q.add_used(m, 0, 0).unwrap();
        q
    }

    #[test]
    fn no_interrupt_flag_without_event_idx() {
        let m = mem();
        assert!(wants_interrupt(&mut queue(&m, false, 0, 0), &m));
        let flag = VRING_AVAIL_F_NO_INTERRUPT as u16;
        assert!(!wants_interrupt(&mut queue(&m, false, flag, 0), &m));
    }

    #[test]
    fn event_idx_decides_when_negotiated() {
        let m = mem();
        // used_event 0: the driver wants an interrupt once entry 0 is used (next_used 1).
        assert!(wants_interrupt(&mut queue(&m, true, 0, 0), &m));
        // used_event 5: not yet.
        assert!(!wants_interrupt(&mut queue(&m, true, 0, 5), &m));
        // The NO_INTERRUPT flag is ignored under EVENT_IDX (the driver uses used_event).
        let flag = VRING_AVAIL_F_NO_INTERRUPT as u16;
        assert!(wants_interrupt(&mut queue(&m, true, flag, 0), &m));
    }

    #[test]
    fn unreadable_ring_gets_the_interrupt() {
        let m = mem();
        let mut q = queue(&m, false, 0, 0);
        q.try_set_avail_ring_address(GuestAddress(0x2_0000))
            .unwrap();
        assert!(wants_interrupt(&mut q, &m));
    }
}
