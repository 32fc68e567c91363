//! The service a passthrough device needs from the VMM to let the guest reach device memory
//! without exits: mapping host memory (an mmap of a VFIO BAR) at a guest-physical address.
//! The VMM implements it on `KVM_SET_USER_MEMORY_REGION`; tests use a fake.

use std::io;

/// Installs and removes guest-physical mappings of host memory (KVM memory slots).
pub trait MemorySlotManager: Send + Sync {
    /// Map `size` bytes of host memory at `host_addr` at guest-physical `gpa` (all page aligned).
    /// Returns the slot id to pass to [`MemorySlotManager::unmap`].
    fn map(&self, gpa: u64, size: u64, host_addr: u64, readonly: bool) -> io::Result<u32>;
    /// Remove a mapping made by [`MemorySlotManager::map`].
    fn unmap(&self, slot: u32) -> io::Result<()>;
}
