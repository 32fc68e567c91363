//! What every virtio device model of the VMM shares, below both the transport (`pci`'s
//! virtio-pci) and the devices (virtio-blk and virtio-net in the VMM, virtio-iommu in
//! `viommu`), so that neither depends on the other:
//!
//! - [`VirtioDevice`] and its companions ([`VirtioInterrupt`], [`QueueConfig`],
//!   [`ActivateError`]): the interface the transport drives;
//! - [`build_queue`] / [`usable_queue`]: a [`virtio_queue::Queue`] from what the driver
//!   configured;
//! - [`wants_interrupt`]: the one interrupt-suppression rule (EVENT_IDX or
//!   `VRING_AVAIL_F_NO_INTERRUPT`), decided once per batch of used-ring updates;
//! - [`Batch`] / [`serve_queue`]: the serve loop of a request queue (pop, handle, complete,
//!   re-enable notifications, decide the interrupt), in bounded rounds if the device wants;
//! - [`guest_warn!`] / [`guest_error!`] ([`log_limit`]): log lines the guest can trigger at
//!   will, rate-limited per call site with a count of what was suppressed.
//!
//! Devices keep what is theirs: how a chain is parsed and served, and which memory the rings
//! and buffers are reached through (guest-physical, or translated by an IOMMU).
//!
//! ```
//! use virtio_dev::{serve_queue, usable_queue, QueueConfig};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
//! // What the driver wrote into the transport's queue registers.
//! let qc = QueueConfig {
//!     size: 16,
//!     desc_table: GuestAddress(0x1000),
//!     avail_ring: GuestAddress(0x2000),
//!     used_ring: GuestAddress(0x3000),
//!     ready: true,
//! };
//! let mut queue = usable_queue(&qc, 256, false, &mem).unwrap();
//! // On a kick: serve every chain (used length 0 here), then signal if the driver wants it.
//! let interrupt = serve_queue(&mut queue, &mem, "example", |_queue, _chain| 0);
//! assert!(!interrupt, "nothing was available");
//! ```
//!
//! The crate depends only on rust-vmm crates (`virtio-queue`, `vm-memory`, `virtio-bindings`),
//! so device crates (the virtio-iommu in `viommu`) need neither the transport nor the VMM.

#![deny(missing_docs)]

mod device;
pub mod log_limit;
mod notify;
mod queue;
mod serve;
#[cfg(test)]
mod test_ring;

pub use device::{read_config_space, ActivateError, QueueConfig, VirtioDevice, VirtioInterrupt};
pub use notify::{need_event, wants_interrupt};
pub use queue::{build_queue, usable_queue};
pub use serve::{serve_queue, Batch, Progress};
