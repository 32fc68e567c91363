//! What one IOMMU can translate: its page sizes, input (IOVA) range and address-space IDs
//! ([`Geometry`]), and the IOVA regions no address space may map ([`ResvRegion`]).

/// The address and address-space geometry of one IOMMU (the virtio-iommu advertises it in its
/// config space).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Page sizes; the lowest set bit is the granule every mapping must be aligned to.
    pub page_size_mask: u64,
    /// First valid IOVA.
    pub input_start: u64,
    /// Last valid IOVA.
    pub input_end: u64,
    /// First valid address-space (domain) ID.
    pub domain_start: u32,
    /// Last valid address-space (domain) ID.
    pub domain_end: u32,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry {
            page_size_mask: !0xfff,
            input_start: 0,
            input_end: (1 << 48) - 1,
            domain_start: 0,
            domain_end: u32::MAX,
        }
    }
}

impl Geometry {
    /// The smallest page size (1 when the mask is empty, which config validation refuses).
    pub fn granule(&self) -> u64 {
        if self.page_size_mask == 0 {
            1
        } else {
            1u64 << self.page_size_mask.trailing_zeros()
        }
    }
}

/// Kind of a reserved IOVA region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResvKind {
    /// Never mapped (virtio-iommu reports it as RESV_MEM_T_RESERVED).
    Reserved,
    /// MSI doorbell, translated by the platform (virtio-iommu: RESV_MEM_T_MSI).
    Msi,
}

/// A reserved IOVA region `start..=end`, reported to every endpoint and refused to map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResvRegion {
    /// First address.
    pub start: u64,
    /// Last address (inclusive).
    pub end: u64,
    /// What it is.
    pub kind: ResvKind,
}
