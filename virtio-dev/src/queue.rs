//! A [`Queue`] from the configuration the driver wrote through the transport.

use crate::device::{ActivateError, QueueConfig};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

/// The queue `qc` describes, for a device whose queues hold at most `max` entries, with
/// EVENT_IDX on when negotiated: sizes and addresses checked (power of two within `max`, ring
/// alignment), ready if the driver enabled it. Whether its rings lie in memory is the caller's
/// check ([`usable_queue`], or the device's own policy).
pub fn build_queue(qc: &QueueConfig, max: u16, event_idx: bool) -> Result<Queue, ActivateError> {
    let bad = |e: virtio_queue::Error| ActivateError::BadQueue(format!("{qc:?}: {e}"));
    let mut q = Queue::new(max).map_err(bad)?;
    q.try_set_size(qc.size).map_err(bad)?;
    q.try_set_desc_table_address(qc.desc_table).map_err(bad)?;
    q.try_set_avail_ring_address(qc.avail_ring).map_err(bad)?;
    q.try_set_used_ring_address(qc.used_ring).map_err(bad)?;
    q.set_event_idx(event_idx);
    q.set_ready(qc.ready);
    Ok(q)
}

/// [`build_queue`] for a queue the device needs: it must be enabled and its rings must lie in
/// `mem` (for a device behind an IOMMU, the translated memory it will use).
pub fn usable_queue<M: GuestMemory>(
    qc: &QueueConfig,
    max: u16,
    event_idx: bool,
    mem: &M,
) -> Result<Queue, ActivateError> {
    let q = build_queue(qc, max, event_idx)?;
    if !q.is_valid(mem) {
        return Err(ActivateError::BadQueue(format!(
            "{qc:?} is not a valid queue"
        )));
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn cfg(size: u16, base: u64) -> QueueConfig {
        QueueConfig {
            size,
            desc_table: GuestAddress(base),
            avail_ring: GuestAddress(base + 0x1000),
            used_ring: GuestAddress(base + 0x2000),
            ready: true,
        }
    }

    #[test]
    fn builds_what_the_driver_configured() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let q = usable_queue(&cfg(64, 0x1000), 256, true, &m).unwrap();
        assert_eq!(q.size(), 64);
        assert_eq!(q.desc_table(), 0x1000);
        assert_eq!(q.avail_ring(), 0x2000);
        assert_eq!(q.used_ring(), 0x3000);
        assert!(q.ready() && q.event_idx_enabled());
    }

    #[test]
    fn refuses_bad_sizes_alignment_and_rings_outside_memory() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        for size in [0, 48, 512] {
            assert!(
                build_queue(&cfg(size, 0x1000), 256, false).is_err(),
                "{size}"
            );
        }
        // Rings off the spec's alignment (the queue would otherwise keep address 0).
        let mut c = cfg(64, 0x1000);
        c.used_ring = GuestAddress(0x3002);
        assert!(build_queue(&c, 256, false).is_err());
        let mut c = cfg(64, 0x1000);
        c.avail_ring = GuestAddress(0x2001);
        assert!(build_queue(&c, 256, false).is_err());
        let mut c = cfg(64, 0x1008);
        c.avail_ring = GuestAddress(0x2000);
        assert!(build_queue(&c, 256, false).is_err());
        // Rings past the end of memory: built, but not usable.
        assert!(build_queue(&cfg(64, 0xf000), 256, false).is_ok());
        assert!(usable_queue(&cfg(64, 0xf000), 256, false, &m).is_err());
        // Not enabled by the driver: built not ready, and not usable.
        let mut c = cfg(64, 0x1000);
        c.ready = false;
        assert!(!build_queue(&c, 256, false).unwrap().ready());
        assert!(usable_queue(&c, 256, false, &m).is_err());
    }
}
