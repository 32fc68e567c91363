//! Whether the driver wants an interrupt after used-ring updates. virtio-queue handles
//! EVENT_IDX but not `VRING_AVAIL_F_NO_INTERRUPT`, which Linux sets on the request queue (it
//! has no callback and busy-polls): honour it here.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// `VRING_AVAIL_F_NO_INTERRUPT`.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Call after a batch of `add_used`: true when the driver should be interrupted.
pub(crate) fn wants_interrupt<M: GuestMemory>(queue: &mut Queue, mem: &M) -> bool {
    match queue.needs_notification(mem) {
        Ok(false) => false,
        Ok(true) if queue.event_idx_enabled() => true,
        Ok(true) => {
            // needs_notification issued a full fence after the used-ring writes.
            match mem.read_obj::<u16>(GuestAddress(queue.avail_ring())) {
                Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0,
                Err(_) => true,
            }
        }
        Err(e) => {
            log::warn!("virtio-iommu: notification check failed: {e}");
            true
        }
    }
}
