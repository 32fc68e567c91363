//! The host-mapper hook: where guest mappings of address spaces with host-backed (VFIO)
//! endpoints are mirrored into a host IOMMU address space. The engine calls a [`HostMapper`]
//! with guest physical addresses; [`Shadow`](crate::engine::shadow::Shadow) implements it by
//! composing them with the VMM's memory map and calling a [`DmaSpace`] (host virtual
//! addresses): [`vfio::VfioDmaSpace`] on a VFIO container, or `recording::RecordingMapper` in
//! tests (feature `test-utils`; it implements both).

#[cfg(any(test, feature = "test-utils"))]
pub(crate) mod recording;
pub(crate) mod vfio;

/// Access rights of one host mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Prot {
    /// Device reads allowed.
    pub read: bool,
    /// Device writes allowed.
    pub write: bool,
}

impl Prot {
    /// Read and write.
    pub const RW: Prot = Prot {
        read: true,
        write: true,
    };
}

/// Why a host mapper refused an operation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostMapError {
    /// The host ran out of mapping slots or memory (VFIO ENOSPC/ENOMEM).
    #[error("host IOMMU out of resources")]
    NoSpace,
    /// The IOVA lies outside what the host IOMMU can translate.
    #[error("IOVA outside the host IOMMU's range")]
    OutOfRange,
    /// The request conflicts with existing host mappings (overlap, bisecting unmap).
    #[error("invalid host mapping request")]
    Invalid,
    /// Anything else.
    #[error("host mapper failed: {0}")]
    Failed(String),
}

/// One host address space that mirrors a guest domain. `iova..iova+size` maps to guest-physical
/// `gpa..gpa+size`; the implementation resolves the GPA to host memory.
pub trait HostMapper: Send + Sync {
    /// Install one mapping (never split or coalesced by the caller).
    fn map(&self, iova: u64, size: u64, gpa: u64, prot: Prot) -> Result<(), HostMapError>;
    /// Remove exactly one mapping previously installed with the same `iova` and `size`.
    fn unmap(&self, iova: u64, size: u64) -> Result<(), HostMapError>;
    /// How many host mapping records it holds for the mappings installed: one per host
    /// mapping piece, at least one per installed mapping, each at most 256 heap bytes.
    /// Counted against [`Limits::max_host_records`](crate::Limits::max_host_records) and
    /// [`Limits::memory_bound`](crate::Limits::memory_bound). A mapper that keeps no
    /// per-mapping state says 0.
    fn records(&self) -> usize {
        0
    }
}

/// One host IOMMU address space taking host virtual addresses: a VFIO type1 container today, an
/// iommufd IOAS later. Calls are exact: one `map` installs one host mapping, `unmap` removes
/// exactly one earlier `map` (VFIO refuses to bisect).
pub trait DmaSpace: Send + Sync {
    /// Map IOVA `iova..iova+size` to this process's memory at `host_addr` with rights `prot`.
    ///
    /// # Safety
    /// Until unmapped, devices may read and write `host_addr..host_addr+size` at any time: it
    /// must be memory shared with the guest or a device (guest RAM, a VFIO BAR mmap) that the
    /// process only accesses through raw pointers / volatile accesses, never Rust references.
    unsafe fn map(
        &self,
        iova: u64,
        size: u64,
        host_addr: u64,
        prot: Prot,
    ) -> Result<(), HostMapError>;
    /// Remove the mapping installed by `map(iova, size, ..)`.
    fn unmap(&self, iova: u64, size: u64) -> Result<(), HostMapError>;
}
