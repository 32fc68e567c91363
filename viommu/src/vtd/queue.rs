//! The invalidation queue: descriptors from IQH to IQT (with wrap) fetched from guest memory,
//! parsed and handed in order to a caller-supplied handler.
//!
//! One call processes at most one queue's worth (the descriptors pending when IQT was written).
//! It stops at the first error and leaves the head at the bad descriptor: the caller turns any
//! error into FSTS.IQE ([`super::regs::Registers::complete_queue`]) and nothing more is fetched
//! until the guest clears IQE. An invalidation wait descriptor is handed to the handler too (the
//! engine completes everything before it, e.g. waits for readers of the old view), and only once
//! the handler returns is its status written: Linux spins on that word.

use super::descriptor::{self, Descriptor, DescriptorError, DESCRIPTOR_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Where the queue is and what is pending: from IQA, IQH and IQT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueState {
    /// Guest-physical base of the queue (IQA, 4 KiB aligned).
    pub base: u64,
    /// Number of 16-byte entries (256 << IQA.QS).
    pub entries: u32,
    /// Index of the next descriptor to fetch (IQH).
    pub head: u32,
    /// Index one past the last descriptor written (IQT).
    pub tail: u32,
}

impl QueueState {
    /// Descriptors pending (0 when the head or tail is out of range).
    pub fn pending(&self) -> u32 {
        if self.head >= self.entries || self.tail >= self.entries {
            return 0;
        }
        (self.tail + self.entries - self.head) % self.entries
    }
}

/// Why processing stopped early; the head is left at `index`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError<E> {
    /// IQT or IQH points beyond the queue (e.g. IQT written after IQA shrank it).
    #[error("invalidation queue head {head} / tail {tail} beyond its {entries} entries")]
    BeyondQueue {
        /// IQH index.
        head: u32,
        /// IQT index.
        tail: u32,
        /// Queue size.
        entries: u32,
    },
    /// The descriptor could not be read (IQA outside guest RAM).
    #[error("invalidation descriptor {index} at {addr:#x} is not in guest RAM")]
    Fetch {
        /// Queue index.
        index: u32,
        /// Guest-physical address.
        addr: u64,
    },
    /// The descriptor is invalid.
    #[error("invalidation descriptor {index}: {error}")]
    Descriptor {
        /// Queue index.
        index: u32,
        /// What is wrong with it.
        error: DescriptorError,
    },
    /// The status write of an invalidation wait failed (address not in guest RAM).
    #[error("invalidation wait {index}: status address {addr:#x} is not in guest RAM")]
    StatusWrite {
        /// Queue index.
        index: u32,
        /// Status address.
        addr: u64,
    },
    /// The handler refused the descriptor.
    #[error("invalidation descriptor {index} failed: {error}")]
    Handler {
        /// Queue index.
        index: u32,
        /// The handler's error.
        error: E,
    },
}

/// What one pass over the queue did.
#[derive(Debug, PartialEq, Eq)]
pub struct QueueOutcome<E> {
    /// The new IQH index: the tail, or the descriptor that failed.
    pub head: u32,
    /// Descriptors completed.
    pub processed: u32,
    /// An invalidation wait with IF completed (set ICS.IWC, raise the completion event).
    pub wait_interrupt: bool,
    /// Why processing stopped before the tail, if it did.
    pub error: Option<QueueError<E>>,
}

/// Process the pending descriptors of `queue` in guest memory `mem`, calling `handler` for each
/// in order. The handler must finish each descriptor's work before returning (for a wait:
/// everything before it); an `Err` stops processing there as an invalidation queue error, so a
/// handler returns errors only for descriptors it refuses, never for work it can degrade safely.
pub fn process<M, E, F>(mem: &M, queue: QueueState, mut handler: F) -> QueueOutcome<E>
where
    M: GuestMemory + ?Sized,
    F: FnMut(&Descriptor) -> Result<(), E>,
{
    let mut out = QueueOutcome {
        head: queue.head,
        processed: 0,
        wait_interrupt: false,
        error: None,
    };
    if queue.head >= queue.entries || queue.tail >= queue.entries {
        out.error = Some(QueueError::BeyondQueue {
            head: queue.head,
            tail: queue.tail,
            entries: queue.entries,
        });
        return out;
    }
    // At most entries - 1 descriptors are pending; the bound also caps the loop.
    for _ in 0..queue.entries {
        if out.head == queue.tail {
            break;
        }
        let index = out.head;
        let Some(addr) = u64::from(index)
            .checked_mul(DESCRIPTOR_SIZE)
            .and_then(|off| queue.base.checked_add(off))
        else {
            out.error = Some(QueueError::Fetch {
                index,
                addr: queue.base,
            });
            return out;
        };
        let Ok([lo, hi]) = mem.read_obj::<[u64; 2]>(GuestAddress(addr)) else {
            out.error = Some(QueueError::Fetch { index, addr });
            return out;
        };
        let desc = match descriptor::parse(u64::from_le(lo), u64::from_le(hi)) {
            Ok(d) => d,
            Err(error) => {
                out.error = Some(QueueError::Descriptor { index, error });
                return out;
            }
        };
        if let Err(error) = handler(&desc) {
            out.error = Some(QueueError::Handler { index, error });
            return out;
        }
        if let Descriptor::Wait(wait) = desc {
            if let Some(status) = wait.status {
                let bytes = status.data.to_le_bytes();
                if mem.write_slice(&bytes, GuestAddress(status.addr)).is_err() {
                    out.error = Some(QueueError::StatusWrite {
                        index,
                        addr: status.addr,
                    });
                    return out;
                }
            }
            out.wait_interrupt |= wait.interrupt;
        }
        out.processed += 1;
        out.head = (index + 1) % queue.entries;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vtd::invalidation::{ContextInvalidation, IotlbInvalidation, IotlbScope};
    use vm_memory::GuestMemoryMmap;

    const RAM: u64 = 0x10_0000;
    const QUEUE: u64 = 0x1_0000;
    const STATUS: u64 = 0x8_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap, index: u32, lo: u64, hi: u64) {
        let addr = QUEUE + u64::from(index) * 16;
        mem.write_obj(lo, GuestAddress(addr)).unwrap();
        mem.write_obj(hi, GuestAddress(addr + 8)).unwrap();
    }

    fn global_iotlb() -> (u64, u64) {
        (2 | 1 << 4, 0)
    }

    fn wait_sw(data: u32) -> (u64, u64) {
        (5 | 1 << 5 | u64::from(data) << 32, STATUS)
    }

    fn q(head: u32, tail: u32) -> QueueState {
        QueueState {
            base: QUEUE,
            entries: 256,
            head,
            tail,
        }
    }

    fn run(
        mem: &GuestMemoryMmap,
        state: QueueState,
    ) -> (QueueOutcome<&'static str>, Vec<Descriptor>) {
        let mut seen = Vec::new();
        let out = process(mem, state, |d| {
            seen.push(*d);
            Ok(())
        });
        (out, seen)
    }

    fn status(mem: &GuestMemoryMmap) -> u32 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn linux_batch_then_wait_writes_status_last() {
        let m = mem();
        // As qi_submit_sync: a context-cache device invalidation, an IOTLB flush, a wait.
        put(&m, 0, 1 | 3 << 4 | 0x0020u64 << 32, 0);
        let (lo, hi) = global_iotlb();
        put(&m, 1, lo, hi);
        let (lo, hi) = wait_sw(1);
        put(&m, 2, lo, hi);
        let mut order = Vec::new();
        let out: QueueOutcome<&str> = process(&m, q(0, 3), |d| {
            // The status word is still untouched when the handler runs for the wait.
            order.push((*d, status(&m)));
            Ok(())
        });
        assert_eq!(
            out,
            QueueOutcome {
                head: 3,
                processed: 3,
                wait_interrupt: false,
                error: None
            }
        );
        assert_eq!(status(&m), 1);
        assert_eq!(order.len(), 3);
        assert_eq!(
            order[0].0,
            Descriptor::Context(ContextInvalidation::Device {
                did: 0,
                sid: 0x20,
                function_mask: 0
            })
        );
        assert_eq!(
            order[1].0,
            Descriptor::Iotlb(IotlbInvalidation::new(IotlbScope::Global))
        );
        assert!(order.iter().all(|(_, s)| *s == 0));
    }

    #[test]
    fn wraps_at_the_end_of_the_queue() {
        let m = mem();
        let (lo, hi) = global_iotlb();
        put(&m, 254, lo, hi);
        put(&m, 255, lo, hi);
        put(&m, 0, lo, hi);
        let (lo, hi) = wait_sw(7);
        put(&m, 1, lo | 1 << 4, hi);
        let (out, seen) = run(&m, q(254, 2));
        assert_eq!((out.head, out.processed, out.wait_interrupt), (2, 4, true));
        assert!(out.error.is_none());
        assert_eq!(seen.len(), 4);
        assert_eq!(status(&m), 7);
        // Empty queue: nothing fetched.
        let (out, seen) = run(&m, q(2, 2));
        assert_eq!((out.head, out.processed, seen.len()), (2, 0, 0));
    }

    #[test]
    fn bad_descriptor_stops_at_it() {
        let m = mem();
        let (lo, hi) = global_iotlb();
        put(&m, 0, lo, hi);
        put(&m, 1, lo | 1 << 8, hi); // reserved bit
        let (wlo, whi) = wait_sw(9);
        put(&m, 2, wlo, whi);
        let (out, seen) = run(&m, q(0, 3));
        assert_eq!((out.head, out.processed, seen.len()), (1, 1, 1));
        assert!(matches!(
            out.error,
            Some(QueueError::Descriptor { index: 1, .. })
        ));
        assert_eq!(status(&m), 0, "nothing after the bad descriptor ran");
        // Linux's recovery: copy its wait over the bad slot, clear IQE, processing resumes there.
        put(&m, 1, wlo, whi);
        let (out, seen) = run(&m, q(1, 3));
        assert_eq!((out.head, out.processed, seen.len()), (3, 2, 2));
        assert_eq!(status(&m), 9);
        // A PASID-type descriptor is an error too.
        put(&m, 3, 6, 0);
        let (out, _) = run(&m, q(3, 4));
        assert!(matches!(
            out.error,
            Some(QueueError::Descriptor {
                index: 3,
                error: DescriptorError::UnsupportedType(6)
            })
        ));
        assert_eq!(out.head, 3);
    }

    #[test]
    fn tail_or_head_beyond_the_queue_is_an_error() {
        let m = mem();
        for (head, tail) in [(0, 256), (300, 1), (0, u32::MAX)] {
            let (out, seen) = run(&m, q(head, tail));
            assert_eq!(out.head, head);
            assert!(seen.is_empty());
            assert!(matches!(out.error, Some(QueueError::BeyondQueue { .. })));
            assert_eq!(q(head, tail).pending(), 0);
        }
        assert_eq!(q(250, 3).pending(), 9);
    }

    #[test]
    fn queue_outside_ram_is_a_fetch_error() {
        let m = mem();
        for base in [RAM, RAM - 8, !0xfffu64] {
            let state = QueueState { base, ..q(0, 2) };
            let (out, seen) = run(&m, state);
            assert!(
                matches!(out.error, Some(QueueError::Fetch { index: 0, .. })),
                "{base:#x}"
            );
            assert_eq!((out.head, seen.len()), (0, 0));
        }
        // The last entry straddles the end of RAM: the first ones are processed.
        let base = RAM - 2 * 16;
        let state = QueueState { base, ..q(0, 3) };
        let raw = [2u64 | 1 << 4, 0];
        for i in 0..2u64 {
            m.write_obj(raw, GuestAddress(base + i * 16)).unwrap();
        }
        let (out, _) = run(&m, state);
        assert_eq!((out.head, out.processed), (2, 2));
        assert!(matches!(
            out.error,
            Some(QueueError::Fetch { index: 2, .. })
        ));
    }

    #[test]
    fn status_write_outside_ram_and_handler_errors_stop() {
        let m = mem();
        put(&m, 0, 5 | 1 << 5, RAM + 0x100);
        let (out, seen) = run(&m, q(0, 1));
        assert_eq!(seen.len(), 1, "the handler saw the wait");
        assert!(matches!(
            out.error,
            Some(QueueError::StatusWrite { index: 0, .. })
        ));
        assert_eq!(out.head, 0);

        let (lo, hi) = global_iotlb();
        put(&m, 0, lo, hi);
        put(&m, 1, lo, hi);
        let mut calls = 0;
        let out = process(&m, q(0, 2), |_| {
            calls += 1;
            if calls == 2 {
                Err("host refused")
            } else {
                Ok(())
            }
        });
        assert_eq!(out.head, 1);
        assert_eq!(
            out.error,
            Some(QueueError::Handler {
                index: 1,
                error: "host refused"
            })
        );
    }

    #[test]
    fn a_full_queue_is_bounded_by_its_size() {
        let m = mem();
        let big = QueueState {
            base: QUEUE,
            entries: 512,
            head: 1,
            tail: 0,
        };
        let (lo, hi) = global_iotlb();
        for i in 0..512 {
            put(&m, i, lo, hi);
        }
        let (out, seen) = run(&m, big);
        assert_eq!((out.head, out.processed, seen.len()), (0, 511, 511));
    }
}
