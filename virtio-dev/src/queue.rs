//! A [`virtio_queue::Queue`] built from what the driver configured through the transport.

use crate::device::{ActivateError, QueueConfig};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

fn bad(e: virtio_queue::Error) -> ActivateError {
    ActivateError::BadQueue(e.to_string())
}

/// The split queue `qc` describes, for a device whose queue holds at most `max_size` entries:
/// its size, its ring addresses (refused unless aligned as the spec requires: descriptor table
/// 16, available ring 2, used ring 4) and EVENT_IDX; `ready` as the driver left it. Nothing is
/// checked against guest memory (see [`build_queue`]).
pub fn queue_from_config(
    max_size: u16,
    qc: &QueueConfig,
    event_idx: bool,
) -> Result<Queue, ActivateError> {
    let mut q = Queue::new(max_size).map_err(bad)?;
    q.try_set_size(qc.size).map_err(bad)?;
    q.try_set_desc_table_address(qc.desc_table).map_err(bad)?;
    q.try_set_avail_ring_address(qc.avail_ring).map_err(bad)?;
    q.try_set_used_ring_address(qc.used_ring).map_err(bad)?;
    q.set_event_idx(event_idx);
    q.set_ready(qc.ready);
    Ok(q)
}

/// [`queue_from_config`] for a queue the device is about to serve: the driver must have
/// enabled it, and its three rings must lie in `mem` (the memory the device reaches the rings
/// through: guest-physical, or translated by an IOMMU) with the access each needs.
pub fn build_queue<M: GuestMemory>(
    max_size: u16,
    qc: &QueueConfig,
    event_idx: bool,
    mem: &M,
) -> Result<Queue, ActivateError> {
    if !qc.ready {
        return Err(ActivateError::BadQueue(format!("{qc:?} is not enabled")));
    }
    let q = queue_from_config(max_size, qc, event_idx)?;
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

    fn qc(desc: u64, avail: u64, used: u64) -> QueueConfig {
        QueueConfig {
            size: 16,
            desc_table: GuestAddress(desc),
            avail_ring: GuestAddress(avail),
            used_ring: GuestAddress(used),
            ready: true,
        }
    }

    #[test]
    fn a_valid_configuration_becomes_the_queue() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let q = build_queue(256, &qc(0x1000, 0x2000, 0x3000), true, &m).unwrap();
        assert_eq!(q.size(), 16);
        assert_eq!(
            (q.desc_table(), q.avail_ring(), q.used_ring()),
            (0x1000, 0x2000, 0x3000)
        );
        assert!(q.event_idx_enabled());
        assert!(q.ready());
        let q = build_queue(16, &qc(0x1000, 0x2000, 0x3000), false, &m).unwrap();
        assert!(!q.event_idx_enabled());
    }

    #[test]
    fn bad_configurations_are_refused() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        // Misaligned rings (the queue would otherwise keep its default address 0).
        for c in [
            qc(0x1008, 0x2000, 0x3000),
            qc(0x1000, 0x2001, 0x3000),
            qc(0x1000, 0x2000, 0x3002),
        ] {
            assert!(build_queue(256, &c, false, &m).is_err(), "{c:?}");
            assert!(queue_from_config(256, &c, false).is_err(), "{c:?}");
        }
        // Larger than the device's maximum, or not a power of two.
        for size in [0, 3, 32] {
            let c = QueueConfig {
                size,
                ..qc(0x1000, 0x2000, 0x3000)
            };
            assert!(build_queue(16, &c, false, &m).is_err(), "size {size}");
        }
        // Rings outside guest memory.
        assert!(build_queue(256, &qc(0x1000, 0x2000, 0xfff0), false, &m).is_err());
        assert!(build_queue(256, &qc(0x20000, 0x2000, 0x3000), false, &m).is_err());
        // Not enabled by the driver: refused to serve, but still built as configured.
        let off = QueueConfig {
            ready: false,
            ..qc(0x1000, 0x2000, 0x3000)
        };
        assert!(build_queue(256, &off, false, &m).is_err());
        let q = queue_from_config(256, &off, false).unwrap();
        assert!(!q.ready());
        assert!(!q.is_valid(&m));
    }
}
