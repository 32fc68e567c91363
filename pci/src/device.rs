//! The interface every device on the PCI bus implements.

/// How a BAR decodes addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR (allocated below 4 GiB).
    Mem32,
    /// 64-bit memory BAR (takes two BAR slots; allocated above 4 GiB when possible).
    Mem64,
    /// I/O port BAR.
    Io,
}

/// One BAR a device asks for: index, size (a power of two) and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRegion {
    /// BAR index 0..=5 (a 64-bit BAR uses `index` and `index + 1`).
    pub index: u8,
    /// Size in bytes, a power of two, at least 16 (memory) or 4 (I/O).
    pub size: u64,
    /// Address decoding kind.
    pub kind: BarKind,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

/// A PCI function on the bus. Accesses are already decoded to the function: config space
/// offsets are relative to its 4 KiB config space, BAR accesses relative to the BAR start.
pub trait PciDevice: Send {
    /// Read `data.len()` (1, 2 or 4) bytes of config space at `offset` (0..4096).
    fn config_read(&mut self, offset: u16, data: &mut [u8]);
    /// Write config space; BAR, command and capability writes take effect here.
    fn config_write(&mut self, offset: u16, data: &[u8]);
    /// The BARs this device needs, before allocation.
    fn bar_regions(&self) -> Vec<BarRegion>;
    /// The bus allocated `address` to BAR `index` (also called when the guest moves a BAR).
    fn bar_assigned(&mut self, index: u8, address: u64);
    /// Where BAR `index` currently decodes, if memory/IO decoding is enabled for it.
    fn bar_address(&self, index: u8) -> Option<u64>;
    /// Read from BAR `index` at `offset`.
    fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]);
    /// Write to BAR `index` at `offset`.
    fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]);
}
