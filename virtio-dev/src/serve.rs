//! The loop every request-style queue runs on a kick: driver notifications off, pop each
//! available chain, hand it to the device, put it on the used ring, notifications back on
//! (and look again if the driver added more meanwhile), then one interrupt decision for the
//! whole batch ([`crate::wants_interrupt`]).
//!
//! A [`Batch`] may be served in rounds of at most `max` chains, each round through its own
//! memory: a device behind an IOMMU pins the current translations once per round, bounding how
//! long it holds an old view (and so delays an UNMAP that waits for it). Between rounds driver
//! notifications stay off.

use crate::notify::wants_interrupt;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemory;

/// Where a [`Batch`] stands after [`Batch::serve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// `max` chains were served and more may be waiting: call [`Batch::serve`] again (with a
    /// fresh memory if the device pins one per round). Driver notifications are still off.
    More,
    /// The queue is drained (or unusable until reset) and driver notifications are on again;
    /// `interrupt`: the driver wants one for the batch.
    Done {
        /// Signal the queue's interrupt.
        interrupt: bool,
    },
}

/// One batch of work on a queue (what one kick starts), served in one or more rounds.
#[derive(Debug)]
pub struct Batch {
    device: &'static str,
    /// The used index when the batch started (for the interrupt decision).
    since: u16,
    /// Driver notifications are disabled by this batch.
    quiet: bool,
    /// A chain was popped since notifications were last disabled (in this round or an earlier
    /// one).
    popped: bool,
}

impl Batch {
    /// Start a batch on `queue`; `device` names it in log lines (`"virtio-blk"`).
    pub fn new(queue: &Queue, device: &'static str) -> Batch {
        Batch {
            device,
            since: queue.next_used(),
            quiet: false,
            popped: false,
        }
    }

    /// Whether the driver wants an interrupt for what this batch completed so far (when a
    /// batch is cut short: the rest comes later, the completions should not wait for it).
    pub fn interrupt_so_far<M: GuestMemory>(&self, queue: &Queue, mem: &M) -> bool {
        wants_interrupt(queue, mem, self.since)
    }

    /// Serve up to `max` chains of `queue`, reaching its rings through `mem`. `f` gets each
    /// chain (its descriptors are read through `mem`) and returns the chain's used length; the
    /// chain is then completed in order, even if `f` found it malformed. An available index the
    /// queue refuses to walk (more than the queue size ahead) ends the batch without spinning:
    /// the queue stays dead until the driver resets it.
    pub fn serve<M, F>(&mut self, queue: &mut Queue, mem: &M, max: usize, mut f: F) -> Progress
    where
        M: GuestMemory,
        F: FnMut(&Queue, DescriptorChain<&M>) -> u32,
    {
        let mut served = 0usize;
        loop {
            if !self.quiet {
                if let Err(e) = queue.disable_notification(mem) {
                    crate::guest_warn!("{}: disable notification: {e}", self.device);
                    break;
                }
                self.quiet = true;
                self.popped = false;
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                self.popped = true;
                let head = chain.head_index();
                let len = f(queue, chain);
                if let Err(e) = queue.add_used(mem, head, len) {
                    crate::guest_warn!("{}: add_used: {e}", self.device);
                }
                served += 1;
                if served >= max {
                    return Progress::More;
                }
            }
            self.quiet = false;
            match queue.enable_notification(mem) {
                // More is available but nothing could be popped since notifications went off:
                // the driver's avail index is ahead of ours by more than the queue size, or
                // the ring is unreadable. Stop instead of spinning.
                Ok(true) if !self.popped => {
                    crate::guest_error!(
                        "{}: avail index out of range; ignoring the queue until reset",
                        self.device
                    );
                    break;
                }
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    crate::guest_warn!("{}: enable notification: {e}", self.device);
                    break;
                }
            }
        }
        Progress::Done {
            interrupt: wants_interrupt(queue, mem, self.since),
        }
    }
}

/// Serve `queue` to the end through one memory (a single-round [`Batch`]); returns whether
/// the driver wants an interrupt.
pub fn serve_queue<M, F>(queue: &mut Queue, mem: &M, device: &'static str, mut f: F) -> bool
where
    M: GuestMemory,
    F: FnMut(&Queue, DescriptorChain<&M>) -> u32,
{
    let mut batch = Batch::new(queue, device);
    loop {
        if let Progress::Done { interrupt } = batch.serve(queue, mem, usize::MAX, &mut f) {
            return interrupt;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_ring::{mem, Ring, QSIZE};
    use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn every_chain_is_handled_completed_in_order_and_one_interrupt_decided() {
        let m = mem();
        let mut r = Ring::new(&m);
        r.post(3);
        let mut q = r.queue(false);
        let mut seen = Vec::new();
        let irq = serve_queue(&mut q, &m, "test", |q, chain| {
            assert_eq!(q.size(), QSIZE);
            let head = chain.head_index();
            let lens: Vec<u32> = chain.map(|d| d.len()).collect();
            seen.push((head, lens));
            u32::from(head) * 2
        });
        assert!(irq);
        assert_eq!(
            seen,
            vec![(0, vec![0x10]), (1, vec![0x11]), (2, vec![0x12])]
        );
        assert_eq!(r.used(), vec![(0, 0), (1, 2), (2, 4)]);
        assert_eq!(r.used_flags(), 0, "driver notifications on again");
        // Nothing new: no interrupt.
        assert!(!serve_queue(&mut q, &m, "test", |_, _| 0));
        // The driver suppressed interrupts: the work is done, no interrupt.
        r.set_avail_flags(1);
        r.post(1);
        assert!(!serve_queue(&mut q, &m, "test", |_, _| 0));
        assert_eq!(r.used().len(), 4);
    }

    #[test]
    fn rounds_are_bounded_and_keep_notifications_off_between_them() {
        let m = mem();
        let mut r = Ring::new(&m);
        r.post(5);
        let mut q = r.queue(false);
        let mut batch = Batch::new(&q, "test");
        let mut calls = 0;
        let mut rounds = Vec::new();
        loop {
            let p = batch.serve(&mut q, &m, 2, |_, _| {
                calls += 1;
                0
            });
            rounds.push((p, r.used().len(), r.used_flags()));
            if p != Progress::More {
                break;
            }
        }
        let no_notify = VRING_USED_F_NO_NOTIFY as u16;
        assert_eq!(
            rounds,
            vec![
                (Progress::More, 2, no_notify),
                (Progress::More, 4, no_notify),
                (Progress::Done { interrupt: true }, 5, 0),
            ]
        );
        assert_eq!(calls, 5);
    }

    #[test]
    fn an_avail_index_beyond_the_queue_ends_the_batch() {
        // A hostile driver publishes avail.idx far ahead of what the ring can hold: nothing can
        // be popped, yet "more is available" stays true. Serving must return, not spin.
        let m = mem();
        let r = Ring::new(&m);
        let mut q = r.queue(false);
        r.set_avail_idx(0x4000);
        let (tx, rx) = std::sync::mpsc::channel();
        let m2 = m.clone();
        std::thread::spawn(move || {
            let irq = serve_queue(&mut q, &m2, "test", |_, _| 0);
            let _ = tx.send((irq, q.next_used()));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("serve_queue spun on an out-of-range avail index");
        assert_eq!(got, (false, 0));
    }

    /// Guest memory that runs `hook` once, just before the device writes the EVENT_IDX
    /// `avail_event` word (the moment it re-enables notifications).
    struct Hooked<'a> {
        mem: &'a GuestMemoryMmap,
        avail_event: GuestAddress,
        hook: std::cell::RefCell<Option<Box<dyn FnMut() + 'a>>>,
    }

    impl GuestMemory for Hooked<'_> {
        type PhysicalMemory = GuestMemoryMmap;
        type Bitmap = ();

        fn check_range(
            &self,
            addr: GuestAddress,
            count: usize,
            access: vm_memory::Permissions,
        ) -> bool {
            self.mem.check_range(addr, count, access)
        }

        fn get_slices<'b>(
            &'b self,
            addr: GuestAddress,
            count: usize,
            access: vm_memory::Permissions,
        ) -> vm_memory::GuestMemoryResult<
            impl vm_memory::guest_memory::GuestMemorySliceIterator<'b, vm_memory::bitmap::BS<'b, ()>>,
        > {
            if addr == self.avail_event && access == vm_memory::Permissions::Write {
                if let Some(mut hook) = self.hook.borrow_mut().take() {
                    hook();
                }
            }
            self.mem.get_slices(addr, count, access)
        }

        fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
            Some(self.mem)
        }
    }

    #[test]
    fn a_chain_added_just_as_the_device_re_enables_notifications_is_not_lost() {
        // EVENT_IDX: the driver posts a chain after the device's last pop but before its
        // avail_event write is visible. The driver then sees the old avail_event and does not
        // kick; only the device's re-read after re-enabling can find the chain.
        let m = mem();
        let mut r = Ring::new(&m);
        r.post(1);
        let mut q = r.queue(true);
        let avail_event = GuestAddress(q.used_ring() + 4 + 8 * u64::from(QSIZE));
        let kicked = std::cell::Cell::new(None);
        let ring = std::cell::RefCell::new(&mut r);
        let hooked = Hooked {
            mem: &m,
            avail_event,
            hook: std::cell::RefCell::new(Some(Box::new(|| {
                let event: u16 = m.read_obj(avail_event).unwrap();
                let mut ring = ring.borrow_mut();
                let old: u16 = m.read_obj(GuestAddress(q_avail_idx_at())).unwrap();
                ring.post(1);
                // Linux's virtqueue_kick_prepare: vring_need_event(avail_event, new, old).
                kicked.set(Some(crate::need_event(event, old.wrapping_add(1), old)));
            }))),
        };
        let mut served = 0;
        let irq = serve_queue(&mut q, &hooked, "test", |_, _| {
            served += 1;
            0
        });
        assert_eq!(kicked.get(), Some(false), "the driver must not have kicked");
        assert_eq!(
            served, 2,
            "the chain added during the re-enable was left behind"
        );
        assert_eq!(q.next_used(), 2);
        assert!(irq);
        // And once the device is idle, a new chain makes the driver kick (avail_event is ours).
        let event: u16 = m.read_obj(avail_event).unwrap();
        assert!(crate::need_event(event, 3, 2));
    }

    /// Where the test ring's available index lives.
    fn q_avail_idx_at() -> u64 {
        0x2000 + 2
    }

    #[test]
    fn chains_added_while_notifications_were_off_are_served_in_the_same_batch() {
        let m = mem();
        let mut r = Ring::new(&m);
        r.post(1);
        let mut q = r.queue(false);
        let mut n = 0;
        let irq = serve_queue(&mut q, &m, "test", |_, _| {
            n += 1;
            if n == 1 {
                // The driver adds a chain without kicking (notifications are off).
                r.post(1);
            }
            0
        });
        assert!(irq);
        assert_eq!(n, 2);
        assert_eq!(r.used().len(), 2);
    }
}
