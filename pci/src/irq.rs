//! Services the VMM provides to PCI devices: MSI delivery and ioeventfd registration.
//! The VMM implements them on KVM (GSI routing + irqfd, KVM_IOEVENTFD); tests use fakes.

use std::io;
use vmm_sys_util::eventfd::EventFd;

/// An MSI message as programmed by the guest in an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (low and high halves combined).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// One interrupt vector backed by a GSI: writing `irqfd` injects the routed MSI.
#[derive(Debug)]
pub struct MsiVector {
    /// The GSI the VMM allocated for this vector.
    pub gsi: u32,
    /// Eventfd registered with KVM as irqfd for `gsi`; `write(1)` raises the interrupt.
    pub irqfd: EventFd,
}

/// Allocates MSI vectors and keeps the VM's GSI routing table in sync with the guest's
/// MSI-X tables.
pub trait MsiIrqManager: Send + Sync {
    /// Allocate a GSI and an irqfd bound to it (initially routed nowhere).
    fn allocate(&self) -> io::Result<MsiVector>;
    /// Route `gsi` to `msg` (Some) or remove its route (None), then commit the routing table.
    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()>;
    /// Several route changes at once (a whole MSI-X enable or disable), committed together
    /// where the VMM can: one KVM_SET_GSI_ROUTING instead of one per vector, all or nothing.
    /// The default makes one [`MsiIrqManager::set_route`] each and stops at the first failure.
    fn set_routes(&self, routes: &[(u32, Option<MsiMessage>)]) -> io::Result<()> {
        for &(gsi, msg) in routes {
            self.set_route(gsi, msg)?;
        }
        Ok(())
    }
    /// Free a vector allocated by [`MsiIrqManager::allocate`].
    fn release(&self, vector: MsiVector);
}

/// Registers eventfds signalled by guest MMIO writes (virtio notify) without a VM exit to
/// the device model.
pub trait IoEventManager: Send + Sync {
    /// Signal `fd` when the guest writes to MMIO address `addr` (any value, any width).
    fn register(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
    /// Undo [`IoEventManager::register`].
    fn unregister(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
}
