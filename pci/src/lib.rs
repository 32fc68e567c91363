//! PCI for the `vmm`: a single-segment PCI bus reached through ECAM and CF8/CFC, config space
//! with BARs and capability lists, MSI-X, and the virtio-pci modern transport.
//!
//! The crate knows nothing about KVM. The VMM hands it two small services, [`MsiIrqManager`] and
//! [`IoEventManager`], and dispatches guest accesses into [`PciBus`].

pub mod device;
pub mod irq;
pub mod virtio_device;

pub use device::{BarKind, BarRegion, PciDevice};
pub use irq::{IoEventManager, MsiIrqManager, MsiMessage, MsiVector};
pub use virtio_device::{ActivateError, QueueConfig, VirtioDevice, VirtioInterrupt};
