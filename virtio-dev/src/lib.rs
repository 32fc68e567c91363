//! What every virtio device model of the VMM shares, below any transport and any IOMMU:
//!
//! - [`VirtioDevice`] and its companions ([`VirtioInterrupt`], [`QueueConfig`],
//!   [`ActivateError`]): the interface a transport (virtio-pci in the `pci` crate) drives.
//!
//! The crate depends only on rust-vmm crates (`virtio-queue`, `vm-memory`, `virtio-bindings`),
//! so device crates (the virtio-iommu in `viommu`) need neither the transport nor the VMM.

#![deny(missing_docs)]

pub mod device;

pub use device::{ActivateError, QueueConfig, VirtioDevice, VirtioInterrupt};
