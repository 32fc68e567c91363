//! Interrupt sinks for the device's activation.

use std::sync::atomic::{AtomicUsize, Ordering};
use virtio_dev::VirtioInterrupt;

/// Counts the interrupts the device raises, per queue (request, event) and for config changes.
#[derive(Debug, Default)]
pub struct InterruptCounter {
    /// Interrupts of the request queue and of the event queue.
    pub queue: [AtomicUsize; 2],
    /// Configuration-change interrupts.
    pub config: AtomicUsize,
}

impl VirtioInterrupt for InterruptCounter {
    fn signal_queue(&self, queue: u16) {
        if let Some(n) = self.queue.get(usize::from(queue)) {
            n.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn signal_config(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
}

/// Drops every interrupt.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn signal_queue(&self, _queue: u16) {}
    fn signal_config(&self) {}
}
