//! Guest physical memory: RAM allocation, the fixed address-space layout and the e820 map.
//!
//! ```text
//! 0x0000_0000 .. 0xC000_0000   RAM (low part, capped at the start of the 32-bit PCI hole)
//! 0xC000_0000 .. 0xE000_0000   32-bit PCI MMIO window (BARs)
//! 0xE000_0000 .. 0xE010_0000   ECAM (PCI config space of bus 0)
//! 0xFEC0_0000                  IOAPIC
//! 0xFEE0_0000 .. 0xFF00_0000   LAPIC / MSI window
//! 0x1_0000_0000 ..             RAM above 4 GiB (when the guest has more than 3 GiB)
//! align_up(top of RAM, 1 GiB)  64-bit PCI MMIO window (below 2^39)
//! ```

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Start of the 32-bit PCI MMIO window; RAM below 4 GiB stops here.
pub const MMIO32_START: u64 = 0xC000_0000;
/// Size of the 32-bit PCI MMIO window.
pub const MMIO32_SIZE: u64 = 0x2000_0000;
/// Base of the ECAM region (PCI segment 0).
pub const ECAM_START: u64 = 0xE000_0000;
/// ECAM size for bus 0 only: 32 devices x 8 functions x 4 KiB.
pub const ECAM_SIZE: u64 = 0x10_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Local APIC base, also the start of the MSI address window.
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// Size of the MSI address window (0xFEE0_0000..=0xFEEF_FFFF).
pub const MSI_WINDOW_SIZE: u64 = 0x10_0000;
/// Where RAM continues above the 32-bit hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Size of the 64-bit PCI MMIO window.
pub const MMIO64_SIZE: u64 = 0x10_0000_0000; // 64 GiB
/// Upper bound for every guest physical address we hand out (39-bit guest address width).
pub const MAX_GPA: u64 = 1 << 39;
/// First PCI I/O port handed to BARs; 0..0x1000 is left to legacy devices.
pub const PCI_IO_START: u16 = 0x1000;
/// Number of I/O ports in the PCI I/O window (0x1000..0x10000).
pub const PCI_IO_SIZE: u16 = 0xF000;

/// Start of the EBDA; conventional memory below 1 MiB stops here.
pub const EBDA_START: u64 = 0x9_FC00;
/// Start of the legacy BIOS area reserved in e820 (RSDP lives in it).
pub const BIOS_AREA_START: u64 = 0xE_0000;
/// 1 MiB: where the protected-mode kernel gets loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// e820 entry types used here.
pub const E820_RAM: u32 = 1;
/// e820 "reserved" type.
pub const E820_RESERVED: u32 = 2;

/// Errors building guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested RAM size is not usable.
    #[error(
        "invalid memory size {0:#x}: must be a multiple of 4 KiB, at least 64 MiB, and leave \
         room below 2^39"
    )]
    BadSize(u64),
    /// mmap of guest RAM failed.
    #[error("cannot allocate guest RAM")]
    Alloc(#[from] vm_memory::mmap::FromRangesError),
}

/// One e820 map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The guest physical layout derived from the RAM size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Total RAM in bytes.
    pub ram_size: u64,
    /// RAM regions (start, size).
    pub ram_regions: Vec<(u64, u64)>,
    /// 64-bit PCI MMIO window (start, size).
    pub mmio64: (u64, u64),
}

impl Layout {
    /// Compute the layout for `ram_size` bytes of RAM.
    pub fn new(ram_size: u64) -> Result<Layout, MemoryError> {
        if ram_size < (64 << 20) || ram_size & 0xfff != 0 {
            return Err(MemoryError::BadSize(ram_size));
        }
        let low = ram_size.min(MMIO32_START);
        let mut ram_regions = vec![(0, low)];
        let mut top = low;
        if ram_size > low {
            let high = ram_size - low;
            ram_regions.push((HIGH_RAM_START, high));
            top = HIGH_RAM_START
                .checked_add(high)
                .ok_or(MemoryError::BadSize(ram_size))?;
        }
        let mmio64_start = align_up(top.max(HIGH_RAM_START), 1 << 30);
        let mmio64_end = mmio64_start
            .checked_add(MMIO64_SIZE)
            .ok_or(MemoryError::BadSize(ram_size))?;
        if mmio64_end > MAX_GPA {
            return Err(MemoryError::BadSize(ram_size));
        }
        Ok(Layout {
            ram_size,
            ram_regions,
            mmio64: (mmio64_start, MMIO64_SIZE),
        })
    }

    /// End (exclusive) of RAM below the 32-bit hole.
    pub fn low_ram_end(&self) -> u64 {
        self.ram_regions[0].1
    }

    /// The e820 map handed to the guest: RAM, and reserved ranges for the legacy BIOS area,
    /// ECAM and the MSI window. The 32-bit PCI MMIO window is deliberately *not* marked
    /// reserved: Linux clips host-bridge windows against e820 reservations (pci=use_e820 is the
    /// default without DMI), which would leave no room for BARs.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut map = vec![
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM,
            },
            E820Entry {
                addr: BIOS_AREA_START,
                size: HIMEM_START - BIOS_AREA_START,
                kind: E820_RESERVED,
            },
            E820Entry {
                addr: HIMEM_START,
                size: self.low_ram_end() - HIMEM_START,
                kind: E820_RAM,
            },
            E820Entry {
                addr: ECAM_START,
                size: ECAM_SIZE,
                kind: E820_RESERVED,
            },
            E820Entry {
                addr: LAPIC_START,
                size: MSI_WINDOW_SIZE,
                kind: E820_RESERVED,
            },
        ];
        for &(start, size) in self.ram_regions.iter().skip(1) {
            map.push(E820Entry {
                addr: start,
                size,
                kind: E820_RAM,
            });
        }
        map
    }

    /// Allocate anonymous guest RAM for this layout.
    pub fn allocate(&self) -> Result<GuestMemoryMmap, MemoryError> {
        let ranges: Vec<(GuestAddress, usize)> = self
            .ram_regions
            .iter()
            .map(|&(s, l)| (GuestAddress(s), l as usize))
            .collect();
        Ok(GuestMemoryMmap::from_ranges(&ranges)?)
    }
}

/// Round `v` up to a multiple of `align` (a power of two).
pub fn align_up(v: u64, align: u64) -> u64 {
    (v + align - 1) & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_only_low_ram() {
        let l = Layout::new(512 << 20).unwrap();
        assert_eq!(l.ram_regions, vec![(0, 512 << 20)]);
        assert_eq!(l.mmio64.0, HIGH_RAM_START);
        let e = l.e820();
        assert!(e
            .iter()
            .any(|x| x.addr == HIMEM_START && x.addr + x.size == 512 << 20 && x.kind == E820_RAM));
        assert!(e
            .iter()
            .any(|x| x.addr == LAPIC_START && x.size == 0x10_0000 && x.kind == E820_RESERVED));
        // The 32-bit MMIO window is neither RAM nor reserved.
        assert!(!e
            .iter()
            .any(|x| x.addr < MMIO32_START + MMIO32_SIZE && x.addr + x.size > MMIO32_START));
    }

    #[test]
    fn big_guest_splits_around_hole() {
        let l = Layout::new(5 << 30).unwrap();
        assert_eq!(
            l.ram_regions,
            vec![
                (0, MMIO32_START),
                (HIGH_RAM_START, (5 << 30) - MMIO32_START)
            ]
        );
        let top = HIGH_RAM_START + (5u64 << 30) - MMIO32_START;
        assert!(l.mmio64.0 >= top);
        assert_eq!(l.mmio64.0 % (1 << 30), 0);
        assert!(l.mmio64.0 + l.mmio64.1 <= MAX_GPA);
    }

    #[test]
    fn rejects_absurd_sizes() {
        assert!(Layout::new(1 << 20).is_err());
        assert!(Layout::new(1 << 40).is_err());
        assert!(Layout::new((64 << 20) + 1).is_err());
    }
}
