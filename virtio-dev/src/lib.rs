//! What every virtio device model of the VMM shares, below both the transport (`pci`'s
//! virtio-pci) and the devices (virtio-blk and virtio-net in the VMM, virtio-iommu in
//! `viommu`), so that neither depends on the other:
//!
//! - [`VirtioDevice`] and its companions: the interface the transport drives;
//! - [`build_queue`] / [`usable_queue`]: a [`virtio_queue::Queue`] from what the driver
//!   configured;
//! - [`wants_interrupt`]: the one interrupt-suppression rule (EVENT_IDX or
//!   `VRING_AVAIL_F_NO_INTERRUPT`), called once per batch of used-ring updates.

#![deny(missing_docs)]

mod device;
mod notify;
mod queue;

pub use device::{ActivateError, QueueConfig, VirtioDevice, VirtioInterrupt};
pub use notify::wants_interrupt;
pub use queue::{build_queue, usable_queue};
