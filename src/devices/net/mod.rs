//! virtio-net on virtio-queue, optionally behind the vIOMMU.
//!
//! Queues: 0 = RX, 1 = TX, 2 = control. Features: VERSION_1, MAC, STATUS (link always up),
//! MRG_RXBUF, CTRL_VQ + CTRL_RX (every control command acknowledged), and ACCESS_PLATFORM
//! with `iommu=on`. No offloads, no EVENT_IDX, no multiqueue.
//!
//! TX is served on the vCPU thread that kicked (inline notify): each frame goes to the
//! backend (a hub delivers it straight into the peers' RX queues). RX frames are written into
//! the guest's buffers when there are some, else kept in a bounded per-port backlog (dropped
//! and counted past it) that is drained when the driver replenishes the RX queue. Behind the
//! vIOMMU every ring and buffer access is translated through the endpoint, one pinned view
//! per round of TX or control chains and per RX delivery (see [`crate::devices::virtio`]).
//!
//! Every chain is hostile: a bad TX chain is completed with used length 0 and counted, a bad
//! RX chain is completed empty, oversized frames are dropped; nothing panics.
//!
//! - [`device`]: the virtio device (features, config space, activation, kicks);
//! - [`rx`]: the port's receive side and backlog; [`tx`]: the transmit queue; [`ctrl`]: the
//!   control queue; [`stats`]: the port's counters.
//!
//! Its options are [`crate::config::NetConfig`].

pub mod ctrl;
pub mod device;
pub mod rx;
pub mod stats;
#[cfg(test)]
mod tests;
pub mod tx;

use virtio_bindings::virtio_net::virtio_net_hdr_v1;

pub use device::Net;
pub use rx::NetPort;
pub use stats::{NetStats, NetStatsSnapshot};

/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of `struct virtio_net_hdr_v1` (VERSION_1 always has `num_buffers`).
pub const HDR_BYTES: usize = std::mem::size_of::<virtio_net_hdr_v1>();
/// Largest Ethernet frame carried (no GSO is offered, so anything bigger is hostile).
pub const MAX_FRAME_BYTES: usize = 65_550;
/// Frames kept per port while the guest has no RX buffers; more are dropped.
pub const BACKLOG_FRAMES: usize = 256;

/// Queue indexes.
pub const RX_QUEUE: u16 = 0;
/// Transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Control queue.
pub const CTRL_QUEUE: u16 = 2;
