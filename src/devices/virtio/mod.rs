//! The VMM's half of the shared virtio device layer, what needs the vIOMMU (the `virtio-dev`
//! crate has the rest: device trait, queue building, interrupt rule, serve loop):
//!
//! - [`memory`]: direct guest-physical memory or translation through a vIOMMU endpoint, the
//!   VIRTIO_F_ACCESS_PLATFORM activation step, one pin per round of work;
//! - [`rings`]: a queue's rings reached directly under a pinned view, chains walked without
//!   indirect tables, packet bytes copied one backend access per mapping.
//!
//! virtio-blk ([`super::block`]) and virtio-net ([`super::net`]) are built on it.

pub mod memory;
pub mod rings;

pub use memory::{ChainHandler, DeviceMemory, Pinned, Served};
pub use rings::{chain_descs, walk_chain, Buffers, Desc, QueueRings};
