//! Network backends of the virtio-net device ([`crate::devices::net`]): where a port's
//! transmitted frames go and where its received frames come from.
//!
//! - [`hub`]: an in-process hub joining our own virtio-net devices; one port's TX is delivered
//!   to every other port of the same hub, on the thread that transmitted.
//! - [`tap`]: a Linux TAP interface; a reader thread delivers its frames.
//!
//! Received frames are handed to a [`FrameSink`] (the device's RX side), which queues them in
//! the guest's RX buffers or in a bounded backlog.

pub mod hub;
pub mod tap;

pub use hub::{Hub, HubPort, Hubs};
pub use tap::Tap;

/// What happened to a frame handed to a [`FrameSink`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Written into the guest's RX buffers.
    Delivered,
    /// No RX buffers right now: kept in the port's backlog.
    Queued,
    /// Dropped (backlog full, device not running, or frame unusable); counted by the sink.
    Dropped,
}

/// The receiving side of a port: takes frames coming from the backend.
pub trait FrameSink: Send + Sync {
    /// Deliver one Ethernet frame (no virtio-net header) to the guest.
    fn deliver(&self, frame: &[u8]) -> Delivery;

    /// Deliver `frames` in order; returns how many were taken (delivered or queued). A sink
    /// may do this cheaper than frame by frame (one lock, one interrupt).
    fn deliver_batch(&self, frames: &[&[u8]]) -> usize {
        frames
            .iter()
            .filter(|f| self.deliver(f) != Delivery::Dropped)
            .count()
    }
}

/// The transmitting side of a port: takes frames the guest sent.
pub trait NetBackend: Send {
    /// Send one Ethernet frame (no virtio-net header) out of the port.
    fn transmit(&self, frame: &[u8]);

    /// Send `frames` in order.
    fn transmit_batch(&self, frames: &[&[u8]]) {
        for f in frames {
            self.transmit(f);
        }
    }
}
