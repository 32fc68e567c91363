//! Glue between the vCPU exit buses and the `pci` crate: CF8/CFC port I/O, the ECAM window
//! and BAR accesses all go to one [`PciBus`].

use std::sync::Arc;

use pci::PciBus;

use crate::bus::Fallback;
use crate::memory::{ECAM_SIZE, ECAM_START};

/// Routes unclaimed exits to the PCI bus: ECAM offsets for the ECAM window, BAR dispatch
/// for other MMIO, CF8/CFC and I/O BARs for ports.
pub struct PciExits {
    bus: Arc<PciBus>,
}

impl PciExits {
    /// Dispatch to `bus`.
    pub fn new(bus: Arc<PciBus>) -> PciExits {
        PciExits { bus }
    }
}

fn ecam_offset(addr: u64, len: usize) -> Option<u64> {
    let off = addr.checked_sub(ECAM_START)?;
    (off.checked_add(len as u64)? <= ECAM_SIZE).then_some(off)
}

impl Fallback for PciExits {
    fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        self.bus.pio_read(port, data)
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        self.bus.pio_write(port, data)
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if let Some(off) = ecam_offset(addr, data.len()) {
            self.bus.ecam_read(off, data);
            return true;
        }
        self.bus.mmio_read(addr, data)
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        if let Some(off) = ecam_offset(addr, data.len()) {
            self.bus.ecam_write(off, data);
            return true;
        }
        self.bus.mmio_write(addr, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MMIO32_SIZE, MMIO32_START};
    use pci::{PciWindows, HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID};

    fn exits() -> PciExits {
        PciExits::new(Arc::new(PciBus::new(PciWindows {
            mmio32: (MMIO32_START, MMIO32_SIZE),
            mmio64: (1 << 32, 1 << 32),
            io: (0x1000, 0xf000),
        })))
    }

    #[test]
    fn ecam_and_cf8_reach_the_host_bridge() {
        let e = exits();
        let mut id = [0u8; 4];
        assert!(e.mmio_read(ECAM_START, &mut id));
        let want = u32::from(HOST_BRIDGE_VENDOR_ID) | (u32::from(HOST_BRIDGE_DEVICE_ID) << 16);
        assert_eq!(u32::from_le_bytes(id), want);
        assert!(e.pio_write(0xcf8, &0x8000_0000u32.to_le_bytes()));
        let mut v = [0u8; 4];
        assert!(e.pio_read(0xcfc, &mut v));
        assert_eq!(u32::from_le_bytes(v), want);
        // An empty slot reads all ones through ECAM.
        let mut empty = [0u8; 4];
        assert!(e.mmio_read(ECAM_START + (5 << 15), &mut empty));
        assert_eq!(empty, [0xff; 4]);
    }

    #[test]
    fn ecam_window_edges() {
        assert_eq!(ecam_offset(ECAM_START - 1, 1), None);
        assert_eq!(
            ecam_offset(ECAM_START + ECAM_SIZE - 4, 4),
            Some(ECAM_SIZE - 4)
        );
        assert_eq!(ecam_offset(ECAM_START + ECAM_SIZE - 2, 4), None);
        assert_eq!(ecam_offset(u64::MAX, 8), None);
        // Outside ECAM and BARs: not claimed.
        assert!(!exits().mmio_read(0xd000_0000, &mut [0u8; 4]));
    }
}
