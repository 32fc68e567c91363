//! Used-buffer notification suppression: whether the driver wants an interrupt for what a
//! batch just put on a split queue's used ring. One rule for every device.
//!
//! The spec (virtio 1.x, split virtqueues, "Used Buffer Notification Suppression", device
//! requirements):
//!
//! > If the VIRTIO_F_EVENT_IDX feature bit is not negotiated: The device MUST ignore the
//! > used_event value. After the device writes a descriptor index into the used ring: If the
//! > flags field is 1, the device SHOULD NOT send a notification. If the flags field is 0, the
//! > device MUST send a notification.
//! >
//! > Otherwise, if the VIRTIO_F_EVENT_IDX feature bit is negotiated: The device MUST ignore the
//! > lower bit of flags. After the device writes a descriptor index into the used ring: If the
//! > idx field in the used ring (which determined where that descriptor index was placed) was
//! > equal to used_event, the device MUST send a notification. Otherwise the device SHOULD NOT
//! > send a notification.
//!
//! A batch puts several entries on the ring and decides once, so "was equal to used_event"
//! becomes "used_event lies among the indexes the batch used" ([`need_event`], Linux's
//! `vring_need_event`). `virtio-queue` implements the EVENT_IDX half (`needs_notification`)
//! but not the flag, and counts the entries it added itself, which misses entries a device
//! publishes with `set_next_used` (virtio-net's merged receive buffers); [`wants_interrupt`]
//! takes the batch's first used index instead.

use std::sync::atomic::{fence, Ordering};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Whether the driver wants an interrupt for the used-ring entries `queue` gained since its
/// used index was `since` (read [`QueueT::next_used`] before the batch's first `add_used`,
/// call this once after the last). Nothing gained: false. A suppression word the device cannot
/// read: true (a spurious interrupt is harmless, a missing one stalls the driver).
pub fn wants_interrupt<M: GuestMemory>(queue: &Queue, mem: &M, since: u16) -> bool {
    let new = queue.next_used();
    if new == since {
        return false;
    }
    // The used-ring writes (entries, then `used.idx`) must be visible to the driver before
    // the device reads its suppression word: the driver writes that word, then (after its own
    // full barrier) re-reads `used.idx`. Without a full fence here both sides may read stale
    // values and the interrupt is lost.
    fence(Ordering::SeqCst);
    let avail = GuestAddress(queue.avail_ring());
    if queue.event_idx_enabled() {
        // used_event follows the available ring's `size` entries (after flags and idx).
        let used_event = avail
            .checked_add(4 + 2 * u64::from(queue.size()))
            .and_then(|at| mem.load::<u16>(at, Ordering::Relaxed).ok());
        match used_event {
            Some(event) => need_event(u16::from_le(event), new, since),
            None => true,
        }
    } else {
        match mem.load::<u16>(avail, Ordering::Relaxed) {
            Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
            Err(_) => true,
        }
    }
}

/// With EVENT_IDX: whether the used index passing from `old` to `new` (modulo 2^16) crossed
/// `event`, i.e. one of the entries `old..new` was written at index `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_ring::{mem, Ring};
    use vm_memory::GuestMemoryMmap;

    /// Complete `n` chains; returns the used index before them.
    fn complete(q: &mut Queue, m: &GuestMemoryMmap, n: u16) -> u16 {
        let since = q.next_used();
        for _ in 0..n {
            let c = q.pop_descriptor_chain(m).unwrap();
            q.add_used(m, c.head_index(), 0).unwrap();
        }
        since
    }

    /// A queue of 16 with one used entry added (returns it and the used index before it);
    /// avail flags and used_event as given.
    fn one_used(m: &GuestMemoryMmap, event_idx: bool, flags: u16, used_event: u16) -> (Queue, u16) {
        let mut r = Ring::new(m);
        r.post(1);
        r.set_avail_flags(flags);
        r.set_used_event(used_event);
        let mut q = r.queue(event_idx);
        let since = complete(&mut q, m, 1);
        (q, since)
    }

    #[test]
    fn no_interrupt_flag_without_event_idx() {
        let m = mem();
        let (q, since) = one_used(&m, false, 0, 0);
        assert!(wants_interrupt(&q, &m, since));
        let flag = VRING_AVAIL_F_NO_INTERRUPT as u16;
        let (q, since) = one_used(&m, false, flag, 0);
        assert!(!wants_interrupt(&q, &m, since));
    }

    #[test]
    fn event_idx_decides_when_negotiated() {
        let m = mem();
        // used_event 0: the driver wants an interrupt once entry 0 is used (next_used 1).
        let (q, since) = one_used(&m, true, 0, 0);
        assert!(wants_interrupt(&q, &m, since));
        // used_event 5: not yet.
        let (q, since) = one_used(&m, true, 0, 5);
        assert!(!wants_interrupt(&q, &m, since));
        // The NO_INTERRUPT flag is ignored under EVENT_IDX (the driver uses used_event).
        let flag = VRING_AVAIL_F_NO_INTERRUPT as u16;
        let (q, since) = one_used(&m, true, flag, 0);
        assert!(wants_interrupt(&q, &m, since));
    }

    #[test]
    fn need_event_is_the_window_of_the_batch() {
        // Entries 3 and 4 written (old 3, new 5): asked for after 3 or 4, not 2 or 5.
        assert!(need_event(3, 5, 3));
        assert!(need_event(4, 5, 3));
        assert!(!need_event(2, 5, 3));
        assert!(!need_event(5, 5, 3));
        // Across the 16-bit wrap.
        assert!(need_event(0xffff, 1, 0xfffe));
        assert!(need_event(0, 1, 0xfffe));
        assert!(!need_event(1, 1, 0xfffe));
        // An empty batch never crosses anything.
        assert!(!need_event(7, 7, 7));
    }

    #[test]
    fn without_event_idx_the_flag_decides_and_used_event_is_ignored() {
        let m = mem();
        let mut r = Ring::new(&m);
        r.post(4);
        let mut q = r.queue(false);
        // Flag clear: interrupt, whatever used_event says.
        r.set_used_event(100);
        let since = complete(&mut q, &m, 1);
        assert!(wants_interrupt(&q, &m, since));
        // VRING_AVAIL_F_NO_INTERRUPT: none.
        r.set_avail_flags(1);
        let since = complete(&mut q, &m, 2);
        assert!(!wants_interrupt(&q, &m, since));
        // Other flag bits do not suppress.
        r.set_avail_flags(2);
        let since = complete(&mut q, &m, 1);
        assert!(wants_interrupt(&q, &m, since));
    }

    #[test]
    fn with_event_idx_used_event_decides_and_the_flag_is_ignored() {
        let m = mem();
        let mut r = Ring::new(&m);
        r.post(8);
        let mut q = r.queue(true);
        // The driver wants to hear once entry 2 is used, and sets the flag (to be ignored).
        r.set_avail_flags(1);
        r.set_used_event(2);
        let since = complete(&mut q, &m, 2); // entries 0, 1
        assert!(!wants_interrupt(&q, &m, since));
        let since = complete(&mut q, &m, 2); // entries 2, 3: crosses 2
        assert!(wants_interrupt(&q, &m, since));
        // Not asked again (used_event still 2): the next batch stays quiet.
        let since = complete(&mut q, &m, 1);
        assert!(!wants_interrupt(&q, &m, since));
        // A batch that ends exactly after used_event.
        r.set_used_event(5);
        let since = complete(&mut q, &m, 1); // entry 5
        assert!(wants_interrupt(&q, &m, since));
        // With the flag clear and used_event behind: still none (the flag means nothing).
        r.set_avail_flags(0);
        let since = complete(&mut q, &m, 1);
        assert!(!wants_interrupt(&q, &m, since));
    }

    #[test]
    fn entries_published_without_add_used_count_too() {
        // virtio-net publishes a merged frame's first entries with set_next_used and only the
        // last with add_used: the batch window must cover all of them.
        let m = mem();
        let mut r = Ring::new(&m);
        r.post(4);
        let mut q = r.queue(true);
        r.set_used_event(0);
        let since = q.next_used();
        for _ in 0..3 {
            q.pop_descriptor_chain(&m).unwrap();
        }
        q.set_next_used(2);
        q.add_used(&m, 2, 0).unwrap();
        assert!(wants_interrupt(&q, &m, since));
    }

    #[test]
    fn nothing_used_means_no_interrupt() {
        let m = mem();
        for event_idx in [false, true] {
            let mut r = Ring::new(&m);
            r.post(1);
            let q = r.queue(event_idx);
            assert!(
                !wants_interrupt(&q, &m, q.next_used()),
                "event_idx {event_idx}"
            );
        }
    }

    #[test]
    fn unreadable_ring_gets_the_interrupt() {
        let m = mem();
        for event_idx in [false, true] {
            let mut r = Ring::new(&m);
            r.post(1);
            let mut q = r.queue(event_idx);
            let since = complete(&mut q, &m, 1);
            // The available ring moved outside guest memory after the batch.
            q.try_set_avail_ring_address(GuestAddress(0x2_0000))
                .unwrap();
            assert!(wants_interrupt(&q, &m, since), "event_idx {event_idx}");
        }
    }
}
