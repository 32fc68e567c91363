//! The interface between a virtio transport (the `pci` crate's virtio-pci) and a virtio device
//! model (virtio-blk and virtio-net in the VMM, virtio-iommu in the `viommu` crate).

use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// A queue as the driver configured it through the common config structure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue size the driver chose (<= the device's maximum).
    pub size: u16,
    /// Descriptor table address (an IOVA when VIRTIO_F_ACCESS_PLATFORM was negotiated).
    pub desc_table: GuestAddress,
    /// Driver (available) ring address.
    pub avail_ring: GuestAddress,
    /// Device (used) ring address.
    pub used_ring: GuestAddress,
    /// `queue_enable` was written with 1.
    pub ready: bool,
}

/// Interrupts toward the driver; the transport maps them to MSI-X vectors.
pub trait VirtioInterrupt: Send + Sync {
    /// Signal that the used ring of `queue` was updated.
    fn signal_queue(&self, queue: u16);
    /// Signal a configuration change.
    fn signal_config(&self);
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The queue setup the driver made is unusable.
    #[error("bad queue configuration: {0}")]
    BadQueue(String),
    /// The device could not start its backend.
    #[error("device backend failed: {0}")]
    Backend(#[from] std::io::Error),
}

/// A virtio device model behind the virtio-pci transport.
pub trait VirtioDevice: Send {
    /// Virtio device type (2 = block, 23 = iommu, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (including VIRTIO_F_VERSION_1 and, behind an IOMMU,
    /// VIRTIO_F_ACCESS_PLATFORM).
    fn device_features(&self) -> u64;
    /// Read the device-specific configuration structure.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write the device-specific configuration structure.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start serving. `kicks[i]` is signalled when queue `i` is
    /// notified (through an ioeventfd, or by the transport itself).
    fn activate(
        &mut self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        acked_features: u64,
        queues: Vec<QueueConfig>,
        kicks: Vec<EventFd>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: stop all processing and return to the initial state.
    fn reset(&mut self);
    /// Devices that answer on the vCPU thread that kicked (no ioeventfd, no thread hop)
    /// return true; the transport then calls [`VirtioDevice::queue_notify`] from the MMIO
    /// exit instead of registering an ioeventfd.
    fn inline_notify(&self) -> bool {
        false
    }
    /// Process queue `queue` now (only called when [`VirtioDevice::inline_notify`] is true).
    /// A device may stop at a per-notification budget (bounded work under its lock per exit)
    /// and say so through [`VirtioDevice::queue_pending`].
    fn queue_notify(&mut self, _queue: u16) {}
    /// Whether the last [`VirtioDevice::queue_notify`] of `queue` stopped at its budget with
    /// chains still available. The driver will not notify again for them (it already did), so
    /// whoever delivers notifications must call `queue_notify` again soon: from a worker
    /// thread, or on the next exit.
    fn queue_pending(&self, _queue: u16) -> bool {
        false
    }
    /// The device's own state for a snapshot (the VM paused, nothing in flight), or `None`
    /// when it cannot save it (the default): the transport's state is saved around it.
    fn save_state(&self) -> Option<Vec<u8>> {
        None
    }
    /// Load a state from [`VirtioDevice::save_state`], after the transport re-activated the
    /// device with the saved features and queues. Refuses what it cannot check.
    fn restore_state(&mut self, _state: &[u8]) -> Result<(), String> {
        Err("this device cannot restore a saved state".into())
    }
}

/// Fill `data` from the device configuration structure `space` at `offset`; bytes past its end
/// (or past the end of the address space) read as 0. What [`VirtioDevice::read_config`] does for
/// a device whose configuration is a plain byte array.
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| space.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let space = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 3];
        read_config_space(&space, 1, &mut d);
        assert_eq!(d, [2, 3, 4]);
        read_config_space(&space, 3, &mut d);
        assert_eq!(d, [4, 0, 0]);
        read_config_space(&space, u64::MAX - 1, &mut d);
        assert_eq!(d, [0, 0, 0]);
    }
}
