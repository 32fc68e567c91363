//! Adaptive queue polling for an inline virtio device whose driver busy-waits for completions:
//! the virtio-iommu request queue (Linux kicks after every MAP/UNMAP batch, then spins on the
//! used ring). Under nested KVM each kick is an exit to the VMM that costs about as much as a
//! whole disk request, and a 4 KiB read behind the vIOMMU needs four of them.
//!
//! How it works: the first kick after an idle period is served inline on the vCPU thread, as
//! without polling, and wakes a poller thread. The poller sets `VRING_USED_F_NO_NOTIFY` (the
//! driver then adds requests without kicking), serves every new avail entry as soon as it sees
//! it, and after `window` without work clears the flag, re-checks the ring (the standard
//! flag / barrier / re-read handshake, so no request is ever stranded) and sleeps until the
//! next kick. CPU time is spent only while the guest is actively issuing requests.
//!
//! The same thread continues a notification the device cut short at its per-notification
//! budget ([`VirtioDevice::queue_pending`]; the virtio-iommu bounds the work it does under its
//! lock per exit): the driver already kicked and waits for those chains, so the poller serves
//! the rest, one budget at a time, releasing the device lock in between. With a zero `window`
//! that is all it does (no polling, kicks stay on). [`Polled::continuing`] is that alone, for
//! any queue of the device: the inline virtio-blk and virtio-net serve one round of a queue's
//! size per notification, so a guest refilling a queue as fast as it is served cannot keep a
//! vCPU in one exit for ever; this thread serves the rest.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
use virtio_dev::{ActivateError, QueueConfig, VirtioDevice, VirtioInterrupt};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::EventFd;

type Shared = Arc<Mutex<Box<dyn VirtioDevice>>>;

fn lock(d: &Shared) -> lockwatch::Guard<'_, Box<dyn VirtioDevice>> {
    lockwatch::lock(d)
}

/// Wake-up state between the vCPU thread and the poller.
#[derive(Default)]
struct Signal {
    state: Mutex<(bool, bool)>, // (wake, stop)
    cv: Condvar,
    sleeping: AtomicBool,
    stop: AtomicBool,
    /// Queues (bit `q` for queue `q`) whose notification was cut short: serve them again
    /// even if their avail index did not move.
    more: AtomicU64,
}

/// Bit of queue `q` in [`Signal::more`] (queues past 63 are finished inline).
fn queue_bit(q: u16) -> Option<u64> {
    1u64.checked_shl(u32::from(q)).filter(|_| q < 64)
}

impl Signal {
    fn wake(&self) {
        if self.sleeping.load(Ordering::Acquire) {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.0 = true;
            self.cv.notify_one();
        }
    }

    /// Wake the poller even if it is not asleep yet, to continue the queues of `bits` (a
    /// continuation must never be lost).
    fn kick(&self, bits: u64) {
        self.more.fetch_or(bits, Ordering::AcqRel);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 = true;
        self.cv.notify_one();
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.1 = true;
        self.cv.notify_one();
    }

    /// Block until woken; false when told to stop.
    fn wait(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.sleeping.store(true, Ordering::Release);
        while !st.0 && !st.1 {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        self.sleeping.store(false, Ordering::Release);
        st.0 = false;
        !st.1
    }
}

struct Poller {
    signal: Arc<Signal>,
    thread: JoinHandle<()>,
}

/// The ring words the poller touches (guest-physical: the polled device is not behind an
/// IOMMU).
#[derive(Clone, Copy)]
struct Ring {
    avail_idx: GuestAddress,
    used_flags: GuestAddress,
}

fn set_no_notify(mem: &GuestMemoryMmap, ring: Ring, on: bool) {
    let flags = if on { VRING_USED_F_NO_NOTIFY as u16 } else { 0 };
    if let Err(e) = mem.write_obj(flags.to_le(), ring.used_flags) {
        virtio_dev::guest_warn!("polled queue: cannot write used flags: {e}");
    }
}

fn avail_idx(mem: &GuestMemoryMmap, ring: Ring) -> Option<u16> {
    mem.read_obj::<u16>(ring.avail_idx).ok().map(u16::from_le)
}

/// One `queue_notify` under the device lock; whether the device left work for another.
fn serve(dev: &Shared, queue: u16) -> bool {
    let mut d = lock(dev);
    d.queue_notify(queue);
    d.queue_pending(queue)
}

/// Serve, one budget each, the queues whose notification was cut short; the ones still not
/// done stay marked. Whether any was marked.
fn continue_pending(dev: &Shared, signal: &Signal) -> bool {
    let marked = signal.more.swap(0, Ordering::AcqRel);
    let mut left = marked;
    while left != 0 {
        let q = left.trailing_zeros() as u16;
        left &= left - 1;
        if signal.stop.load(Ordering::Acquire) {
            break;
        }
        if serve(dev, q) {
            signal.more.fetch_or(1 << q, Ordering::AcqRel);
        }
    }
    marked != 0
}

fn poll_loop(
    dev: Shared,
    signal: Arc<Signal>,
    mem: GuestMemoryMmap,
    polled: Option<(Ring, u16)>,
    window: Duration,
    kind: crate::seccomp::ThreadKind,
) {
    if let Err(e) = crate::seccomp::apply(kind) {
        log::error!(
            "polled queue: {}; serving on kicks only",
            crate::report::Chain(&e)
        );
        return;
    }
    while signal.wait() {
        let Some((ring, queue)) = polled.filter(|_| !window.is_zero()) else {
            // Continuation only: serve what the last notifications left, one budget at a time.
            while !signal.stop.load(Ordering::Acquire) && continue_pending(&dev, &signal) {
                std::thread::yield_now();
            }
            continue;
        };
        let own = 1u64 << queue;
        set_no_notify(&mem, ring, true);
        fence(Ordering::SeqCst);
        let mut seen = None;
        let mut last_work = Instant::now();
        let mut spins = 0u32;
        loop {
            if signal.stop.load(Ordering::Acquire) {
                return;
            }
            let marked = signal.more.swap(0, Ordering::AcqRel);
            if marked & !own != 0 {
                // Other queues cut short: continue them (one budget each) as well.
                signal.more.fetch_or(marked & !own, Ordering::AcqRel);
                continue_pending(&dev, &signal);
                last_work = Instant::now();
            }
            let idx = avail_idx(&mem, ring);
            if idx.is_none() || idx != seen || marked & own != 0 {
                seen = idx;
                if serve(&dev, queue) && idx.is_some() {
                    // Cut short at the device's budget: go again even though the index is
                    // unchanged.
                    seen = None;
                }
                last_work = Instant::now();
                if idx.is_none() {
                    // The ring is unreadable: stop polling, the inline path still works.
                    break;
                }
                continue;
            }
            spins = spins.wrapping_add(1);
            if spins & 63 == 0 && last_work.elapsed() > window {
                set_no_notify(&mem, ring, false);
                fence(Ordering::SeqCst);
                if avail_idx(&mem, ring) != seen || signal.more.load(Ordering::Acquire) != 0 {
                    set_no_notify(&mem, ring, true);
                    continue;
                }
                break;
            }
            std::hint::spin_loop();
        }
    }
}

/// An inline virtio device with queue `queue` polled adaptively, or only continued (see the
/// module doc).
pub struct Polled {
    dev: Shared,
    queue_sizes: Vec<u16>,
    /// The polled queue (none: continuation only).
    queue: Option<u16>,
    window: Duration,
    /// The seccomp filter of the thread: what serving the device needs.
    kind: crate::seccomp::ThreadKind,
    poller: Option<Poller>,
}

impl Polled {
    /// Wrap `dev` (which must serve inline) and poll its queue `queue` for up to `window`
    /// after the last request; a zero `window` only continues notifications the device cut
    /// short. The thread runs under the poller's seccomp filter (the virtio-iommu).
    pub fn new(dev: Box<dyn VirtioDevice>, queue: u16, window: Duration) -> Polled {
        Polled::with(dev, Some(queue), window, crate::seccomp::ThreadKind::Poller)
    }

    /// Wrap `dev` (which must serve inline): its thread only continues the notifications of
    /// any queue that the device cut short at its budget, under the block worker's seccomp
    /// filter (file I/O; virtio-blk and virtio-net).
    pub fn continuing(dev: Box<dyn VirtioDevice>) -> Polled {
        Polled::with(
            dev,
            None,
            Duration::ZERO,
            crate::seccomp::ThreadKind::BlockWorker,
        )
    }

    fn with(
        dev: Box<dyn VirtioDevice>,
        queue: Option<u16>,
        window: Duration,
        kind: crate::seccomp::ThreadKind,
    ) -> Polled {
        let (ty, queue_sizes) = (dev.device_type(), dev.queue_max_sizes().to_vec());
        let dev = Arc::new(Mutex::new(dev));
        lockwatch::name(&dev, format!("polled virtio device type {ty}"));
        Polled {
            queue_sizes,
            dev,
            queue,
            window,
            kind,
            poller: None,
        }
    }

    fn stop_poller(&mut self) {
        if let Some(p) = self.poller.take() {
            p.signal.stop();
            if p.thread.join().is_err() {
                log::error!("polled queue: poller thread panicked");
            }
        }
    }
}

impl Drop for Polled {
    fn drop(&mut self) {
        self.stop_poller();
    }
}

impl VirtioDevice for Polled {
    fn device_type(&self) -> u32 {
        lock(&self.dev).device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        lock(&self.dev).device_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        lock(&self.dev).read_config(offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        lock(&self.dev).write_config(offset, data)
    }

    fn activate(
        &mut self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        acked_features: u64,
        queues: Vec<QueueConfig>,
        kicks: Vec<EventFd>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.stop_poller();
        let qc = self
            .queue
            .and_then(|q| Some((queues.get(usize::from(q)).copied()?, q)));
        lock(&self.dev).activate(mem.clone(), acked_features, queues, kicks, interrupt)?;
        // The polled queue's ring words; none (or unusable): no polling, continuation only.
        let polled = qc.and_then(|(qc, q)| {
            let ring = Ring {
                avail_idx: qc.avail_ring.checked_add(2)?,
                used_flags: qc.used_ring,
            };
            Some((ring, q))
        });
        if self.queue.is_some() && polled.is_none() {
            return Ok(());
        }
        let signal = Arc::new(Signal::default());
        let (dev, sig) = (self.dev.clone(), signal.clone());
        let snapshot = (*mem.memory()).clone();
        let (window, kind) = (self.window, self.kind);
        let thread = std::thread::Builder::new()
            .name("vq-poll".into())
            .spawn(move || poll_loop(dev, sig, snapshot, polled, window, kind))?;
        self.poller = Some(Poller { signal, thread });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_poller();
        lock(&self.dev).reset();
    }

    fn inline_notify(&self) -> bool {
        true
    }

    fn queue_notify(&mut self, queue: u16) {
        let pending = serve(&self.dev, queue);
        match (&self.poller, queue_bit(queue)) {
            (Some(p), Some(bit)) if !p.thread.is_finished() => {
                if pending {
                    p.signal.kick(bit);
                } else if self.queue == Some(queue) && !self.window.is_zero() {
                    p.signal.wake();
                }
            }
            // No thread (it could not start), or a queue it cannot be told about: finish
            // inline.
            _ => while pending && serve(&self.dev, queue) {},
        }
    }

    fn queue_pending(&self, _queue: u16) -> bool {
        // Continued here (see the module doc).
        false
    }

    fn save_state(&self) -> Option<Vec<u8>> {
        lock(&self.dev).save_state()
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        lock(&self.dev).restore_state(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_iommu::NoIrq;
    use std::sync::atomic::AtomicU64;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    /// An inline device that records, on each notification, the avail index it found.
    struct Recorder {
        mem: GuestMemoryMmap,
        calls: Arc<AtomicU64>,
        last_idx: Arc<AtomicU64>,
    }

    impl VirtioDevice for Recorder {
        fn device_type(&self) -> u32 {
            23
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn device_features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0x42);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemoryAtomic<GuestMemoryMmap>,
            _acked: u64,
            _queues: Vec<QueueConfig>,
            _kicks: Vec<EventFd>,
            _irq: Arc<dyn VirtioInterrupt>,
        ) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn inline_notify(&self) -> bool {
            true
        }
        fn queue_notify(&mut self, _queue: u16) {
            let idx: u16 = self.mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
            self.last_idx.store(u64::from(idx), Ordering::SeqCst);
            self.calls.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn polls_after_a_kick_without_further_kicks_then_sleeps() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let calls = Arc::new(AtomicU64::new(0));
        let last_idx = Arc::new(AtomicU64::new(0));
        let rec = Recorder {
            mem: mem.clone(),
            calls: calls.clone(),
            last_idx: last_idx.clone(),
        };
        let mut p = Polled::new(Box::new(rec), 0, Duration::from_millis(50));
        assert_eq!(p.queue_max_sizes(), &[16, 16]);
        assert_eq!(p.device_type(), 23);
        let mut cfg = [0u8; 2];
        p.read_config(0, &mut cfg);
        assert_eq!(cfg, [0x42; 2]);
        let qc = QueueConfig {
            size: 16,
            desc_table: GuestAddress(0),
            avail_ring: GuestAddress(AVAIL),
            used_ring: GuestAddress(USED),
            ready: true,
        };
        p.activate(
            GuestMemoryAtomic::new(mem.clone()),
            1 << VIRTIO_F_VERSION_1,
            vec![qc, qc],
            vec![],
            Arc::new(NoIrq),
        )
        .unwrap();
        let used_flags = || mem.read_obj::<u16>(GuestAddress(USED)).unwrap();
        // Idle: nothing polled, kicks allowed.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(used_flags(), 0);
        // A kick is served inline and starts polling: kicks get suppressed.
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        p.queue_notify(0);
        assert!(calls.load(Ordering::SeqCst) >= 1);
        wait_for("NO_NOTIFY set", || {
            used_flags() == VRING_USED_F_NO_NOTIFY as u16
        });
        // New requests without a kick are served by the poller.
        for idx in 2..6u16 {
            mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
            wait_for("poller served the new entry", || {
                last_idx.load(Ordering::SeqCst) == u64::from(idx)
            });
        }
        // After the window without work, kicks are re-enabled and polling stops.
        wait_for("NO_NOTIFY cleared", || used_flags() == 0);
        let settled = calls.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            settled,
            "no polling while idle"
        );
        // A kick on another queue does not start polling.
        p.queue_notify(1);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(used_flags(), 0);
        // Reset joins the poller; a later entry is not served without a kick.
        p.reset();
        assert!(p.poller.is_none());
        let before = calls.load(Ordering::SeqCst);
        mem.write_obj(9u16, GuestAddress(AVAIL + 2)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(calls.load(Ordering::SeqCst), before);
    }

    /// An inline device that serves one unit of work per notification and reports the rest
    /// as pending, like the virtio-iommu at its budget.
    struct Budgeted {
        left: Arc<AtomicU64>,
        calls: Arc<AtomicU64>,
        /// Calls made by the poller thread.
        poller_calls: Arc<AtomicU64>,
    }

    impl VirtioDevice for Budgeted {
        fn device_type(&self) -> u32 {
            23
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn device_features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1
        }
        fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemoryAtomic<GuestMemoryMmap>,
            _acked: u64,
            _queues: Vec<QueueConfig>,
            _kicks: Vec<EventFd>,
            _irq: Arc<dyn VirtioInterrupt>,
        ) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn inline_notify(&self) -> bool {
            true
        }
        fn queue_notify(&mut self, _queue: u16) {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if std::thread::current().name() == Some("vq-poll") {
                self.poller_calls.fetch_add(1, Ordering::SeqCst);
            }
            let _ = self
                .left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1));
        }
        fn queue_pending(&self, _queue: u16) -> bool {
            self.left.load(Ordering::SeqCst) > 0
        }
    }

    #[test]
    fn a_notification_cut_short_is_continued_by_the_thread_not_the_vcpu() {
        for window in [Duration::ZERO, Duration::from_millis(5)] {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            let left = Arc::new(AtomicU64::new(0));
            let calls = Arc::new(AtomicU64::new(0));
            let poller_calls = Arc::new(AtomicU64::new(0));
            let dev = Budgeted {
                left: left.clone(),
                calls: calls.clone(),
                poller_calls: poller_calls.clone(),
            };
            let mut p = Polled::new(Box::new(dev), 0, window);
            let qc = QueueConfig {
                size: 16,
                desc_table: GuestAddress(0),
                avail_ring: GuestAddress(AVAIL),
                used_ring: GuestAddress(USED),
                ready: true,
            };
            p.activate(
                GuestMemoryAtomic::new(mem.clone()),
                1 << VIRTIO_F_VERSION_1,
                vec![qc, qc],
                vec![],
                Arc::new(NoIrq),
            )
            .unwrap();
            // A kick with nothing left over: one call, no continuation, kicks stay on.
            p.queue_notify(0);
            std::thread::sleep(Duration::from_millis(30));
            let idle = calls.load(Ordering::SeqCst);
            if window.is_zero() {
                assert_eq!(idle, 1, "a zero window never polls");
                assert_eq!(mem.read_obj::<u16>(GuestAddress(USED)).unwrap(), 0);
            }
            // A kick that leaves 50 budgets of work: the vCPU serves one, the thread the rest.
            left.store(51, Ordering::SeqCst);
            let (before, by_poller) = (
                calls.load(Ordering::SeqCst),
                poller_calls.load(Ordering::SeqCst),
            );
            p.queue_notify(0);
            wait_for("the continuation drained the work", || {
                left.load(Ordering::SeqCst) == 0
            });
            let by_vcpu = (calls.load(Ordering::SeqCst) - before)
                - (poller_calls.load(Ordering::SeqCst) - by_poller);
            assert_eq!(by_vcpu, 1, "the vCPU thread did one budget");
            p.reset();
        }
    }
}
