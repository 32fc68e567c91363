//! The virtio-iommu event queue: the engine's faults become `struct virtio_iommu_fault` records,
//! rate-limited and written to a buffer the driver posted, or dropped cleanly when there is
//! none. [`FaultReporter`] is the [`FaultSink`] of every endpoint of one virtio-iommu.

use crate::engine::fault::{Fault, FaultRateLimit, FaultSink, RateLimiter};
use crate::engine::mapping::{Access, Miss};
use crate::virtio::counters::Counters;
use crate::virtio::spec::{
    FaultRecord, EVENT_QUEUE, FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE, FAULT_R_DOMAIN,
    FAULT_R_MAPPING, FAULT_SIZE,
};
use std::sync::{Arc, Mutex, MutexGuard};
use virtio_dev::VirtioInterrupt;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

/// The event-queue record of `fault`: reason DOMAIN for a blocked endpoint, MAPPING for a
/// missing mapping or right; the access as READ/WRITE flags; the address always valid.
pub(crate) fn record(fault: &Fault) -> FaultRecord {
    let reason = match fault.miss {
        Miss::NoDomain => FAULT_R_DOMAIN,
        Miss::NoMapping => FAULT_R_MAPPING,
    };
    let rw = match fault.access {
        Access::Read => FAULT_F_READ,
        Access::Write => FAULT_F_WRITE,
        Access::ReadWrite => FAULT_F_READ | FAULT_F_WRITE,
    };
    FaultRecord {
        reason,
        flags: (rw | FAULT_F_ADDRESS).into(),
        endpoint: fault.endpoint.into(),
        address: fault.address.into(),
        ..Default::default()
    }
}

/// The event queue once the driver activated the device.
pub(crate) struct EventQueue {
    pub(crate) queue: Queue,
    pub(crate) mem: GuestMemoryAtomic<GuestMemoryMmap>,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
}

struct State {
    bucket: RateLimiter,
    queue: Option<EventQueue>,
}

/// Receives faults from every endpoint of one IOMMU and delivers them on its event queue.
pub struct FaultReporter {
    counters: Arc<Counters>,
    state: Mutex<State>,
}

impl std::fmt::Debug for FaultReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultReporter").finish_non_exhaustive()
    }
}

impl FaultReporter {
    /// A reporter with no event queue yet.
    pub fn new(counters: Arc<Counters>, limit: FaultRateLimit) -> Self {
        FaultReporter {
            counters,
            state: Mutex::new(State {
                bucket: RateLimiter::new(limit),
                queue: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_queue(&self, queue: Option<EventQueue>) {
        self.lock().queue = queue;
    }

    /// The event queue's next available and next used indexes, once activated.
    pub(crate) fn queue_positions(&self) -> Option<(u16, u16)> {
        let st = self.lock();
        st.queue
            .as_ref()
            .map(|q| (q.queue.next_avail(), q.queue.next_used()))
    }

    /// Move the event queue to saved indexes; false when it is not activated.
    pub(crate) fn set_queue_positions(&self, next_avail: u16, next_used: u16) -> bool {
        let mut st = self.lock();
        match st.queue.as_mut() {
            Some(q) => {
                q.queue.set_next_avail(next_avail);
                q.queue.set_next_used(next_used);
                true
            }
            None => false,
        }
    }
}

impl FaultSink for FaultReporter {
    /// Report `fault`: counted always, then rate-limited, then written to the next event buffer
    /// (dropped when there is none). Returns whether it reached the guest.
    fn report(&self, fault: Fault) -> bool {
        self.counters.fault();
        let mut st = self.lock();
        if !st.bucket.take() {
            self.counters.fault_dropped();
            return false;
        }
        let record = record(&fault);
        log::warn!(
            "virtio-iommu: fault endpoint {:#x} address {:#x} reason {} flags {:#x}",
            fault.endpoint,
            fault.address,
            record.reason,
            u32::from(record.flags)
        );
        let delivered = match st.queue.as_mut() {
            Some(q) => deliver(q, &record),
            None => false,
        };
        if delivered {
            self.counters.fault_delivered();
        } else {
            self.counters.fault_dropped();
        }
        delivered
    }
}

/// Write `record` to the first usable buffer. Buffers too small or unwritable are returned
/// with used length 0 (a record is never split across buffers).
fn deliver(q: &mut EventQueue, record: &FaultRecord) -> bool {
    let mem = q.mem.memory();
    let bytes = record.as_slice();
    let mut delivered = false;
    let since = q.queue.next_used();
    // Bounded: each iteration consumes one available buffer.
    for _ in 0..q.queue.size() {
        let Some(chain) = q.queue.pop_descriptor_chain(&*mem) else {
            break;
        };
        let head = chain.head_index();
        // Collect the writable segments first: a buffer too small is not written at all.
        let mut segs = [(vm_memory::GuestAddress(0), 0usize); 4];
        let mut n = 0;
        let mut room = 0usize;
        let mut ok = true;
        for desc in chain {
            if room >= FAULT_SIZE {
                break;
            }
            if !desc.is_write_only() || n == segs.len() {
                ok = false;
                break;
            }
            let take = (desc.len() as usize).min(FAULT_SIZE - room);
            segs[n] = (desc.addr(), take);
            n += 1;
            room += take;
        }
        let mut written = 0usize;
        if ok && room == FAULT_SIZE {
            for &(addr, len) in &segs[..n] {
                if mem
                    .write_slice(&bytes[written..written + len], addr)
                    .is_err()
                {
                    ok = false;
                    break;
                }
                written += len;
            }
        }
        let used = if ok && written == FAULT_SIZE {
            FAULT_SIZE as u32
        } else {
            virtio_dev::guest_warn!(
                "virtio-iommu: unusable event buffer (head {head}), returned empty"
            );
            0
        };
        if q.queue.add_used(&*mem, head, used).is_err() {
            virtio_dev::guest_warn!("virtio-iommu: event queue used ring not writable");
            break;
        }
        if used != 0 {
            delivered = true;
            break;
        }
    }
    if virtio_dev::wants_interrupt(&q.queue, &*mem, since) {
        q.interrupt.signal_queue(EVENT_QUEUE);
    }
    delivered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_drops_past_the_burst() {
        let c = Arc::new(Counters::default());
        let r = FaultReporter::new(
            c.clone(),
            FaultRateLimit {
                burst: 3,
                per_second: 0,
            },
        );
        let f = Fault::from_miss(8, 0x1000, Access::Read, Miss::NoMapping);
        for _ in 0..5 {
            // No event queue: nothing is delivered, everything is counted.
            assert!(!r.report(f));
        }
        let s = c.snapshot();
        assert_eq!(s.faults, 5);
        assert_eq!(s.faults_dropped, 5);
        assert_eq!(s.faults_delivered, 0);
    }

    #[test]
    fn record_layout() {
        let f = Fault::from_miss(0x10, 0xdead_0000, Access::Write, Miss::NoMapping);
        let r = record(&f);
        let b = r.as_slice();
        assert_eq!(b[0], FAULT_R_MAPPING);
        assert_eq!(&b[1..4], &[0, 0, 0]);
        assert_eq!(
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
            FAULT_F_WRITE | FAULT_F_ADDRESS
        );
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 0x10);
        assert_eq!(
            u64::from_le_bytes(b[16..24].try_into().unwrap()),
            0xdead_0000
        );
    }
}
