//! virtio-blk backed by a raw file. Request parsing and processing are generic over
//! `M: vm_memory::GuestMemory` so a translating memory (IOVA -> GPA through a vIOMMU) can be
//! used instead of plain guest RAM without touching this code.
//!
//! Every chain is treated as hostile: a malformed chain gets `VIRTIO_BLK_S_IOERR` (or
//! `UNSUPP` for unknown request types) when it has a writable status byte, and is completed
//! with used length 0 otherwise; the device keeps working.
//!
//! - [`request`]: the backing file and one request (a chain) served against it;
//! - [`device`]: the virtio device (features, config space, activation, inline or worker
//!   thread serving) on the shared layer ([`super::virtio`], `virtio_dev`);
//! - [`stats`]: what the disk did (the exit summary's `blk:` lines).
//!
//! Its options are [`crate::config::BlockConfig`].

pub mod device;
pub mod request;
pub mod stats;
#[cfg(test)]
mod tests;

use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

pub use device::Block;
pub use request::BlockBackend;
pub use stats::{BlockStats, BlockStatsSnapshot};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Maximum queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Longest data transfer of one request (larger requests fail with IOERR).
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;
/// Segments per request advertised in `seg_max`.
pub const SEG_MAX: u32 = (QUEUE_SIZE - 2) as u32;
/// Bytes of the disk ID returned by GET_ID.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
