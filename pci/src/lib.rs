//! PCI for the `vmm`: a single-segment PCI bus reached through ECAM and CF8/CFC, config space
//! with BARs and capability lists, MSI and MSI-X, the virtio-pci modern transport, and VFIO
//! passthrough of host PCI functions.
//!
//! The crate knows nothing about KVM. The VMM hands it small services, [`MsiIrqManager`],
//! [`IoEventManager`] and (for passthrough BARs) [`MemorySlotManager`], and dispatches guest
//! accesses into [`PciBus`].

pub mod bar;
pub mod bus;
pub mod config;
pub mod device;
pub mod irq;
pub mod memory_slot;
pub mod msi;
pub mod msix;
/// Test doubles (feature `test-utils`): a fake VFIO device and fake KVM memory slots.
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
mod vectors;
pub mod vfio_backend;
pub mod vfio_config;
pub mod vfio_irq;
pub mod vfio_pci;
pub mod virtio_common;
pub mod virtio_pci;

pub use bar::AddressAllocator;
pub use bus::{DecodedBar, PciBus, PciWindows, HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID};
pub use config::{PciConfigSpace, PciHeader};
pub use device::{BarKind, BarRegion, PciDevice};
pub use irq::{IoEventManager, MsiIrqManager, MsiMessage, MsiVector};
pub use memory_slot::MemorySlotManager;
pub use msi::MsiConfig;
pub use msix::MsixConfig;
pub use vfio_backend::{iommu_group, IrqInfo, RegionInfo, VfioBackend, VfioDeviceBackend};
pub use vfio_pci::{BarMapping, VfioBarMaps, VfioPciDevice, VfioPciError};
pub use virtio_pci::VirtioPciDevice;

/// Errors building the PCI topology (never caused by guest accesses, which are only logged).
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// A device described a BAR the config space cannot hold.
    #[error("invalid BAR {index}: {reason}")]
    InvalidBar {
        /// BAR index as given by the device.
        index: u8,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No window had room for a BAR.
    #[error("no room for a {size:#x}-byte {kind:?} BAR")]
    BarAllocation {
        /// Requested size.
        size: u64,
        /// Requested kind.
        kind: BarKind,
    },
    /// All 31 device numbers of bus 0 are taken.
    #[error("PCI bus 0 is full")]
    BusFull,
    /// The requested device number is taken or above 31.
    #[error("device number {0} is taken or out of range")]
    SlotTaken(u8),
    /// The capability list does not fit in the first 256 bytes of config space.
    #[error("no room for a {0}-byte capability in config space")]
    CapabilitySpaceFull(usize),
    /// A capability shorter than its header or with a mask of another length.
    #[error("malformed capability: {0}")]
    InvalidCapability(&'static str),
    /// MSI-X vector count outside 1..=2048 (or what the BAR layout allows).
    #[error("unsupported MSI-X vector count {0}")]
    InvalidVectorCount(usize),
    /// The virtio device type does not map to a PCI device id.
    #[error("unsupported virtio device type {0}")]
    InvalidDeviceType(u32),
    /// The virtio device has no queues or more than the transport supports.
    #[error("unsupported number of virtio queues {0}")]
    InvalidQueueCount(usize),
    /// Creating an eventfd failed.
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}
