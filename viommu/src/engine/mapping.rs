//! The engine's core values: one mapping of an address space (IOVA range -> guest-physical,
//! with its rights), the kind of access a device makes, and why a translation missed.

/// One guest mapping: IOVA `start..=end` -> GPA `gpa..`, with its rights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub end: u64,
    /// Guest-physical address of `start`.
    pub gpa: u64,
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
    /// The target is device memory (MMIO) rather than RAM.
    pub mmio: bool,
}

impl Mapping {
    /// The identity mapping over the whole 64-bit space (identity / bypass).
    pub const IDENTITY: Mapping = Mapping {
        start: 0,
        end: u64::MAX,
        gpa: 0,
        read: true,
        write: true,
        mmio: false,
    };

    /// Whether `iova` lies inside.
    #[inline]
    pub fn contains(&self, iova: u64) -> bool {
        self.start <= iova && iova <= self.end
    }

    /// Whether the mapping grants `access`.
    #[inline]
    pub fn allows(&self, access: Access) -> bool {
        match access {
            Access::Read => self.read,
            Access::Write => self.write,
            Access::ReadWrite => self.read && self.write,
        }
    }

    /// GPA of `iova` (which must be inside).
    #[inline]
    pub fn gpa_of(&self, iova: u64) -> u64 {
        self.gpa.wrapping_add(iova.wrapping_sub(self.start))
    }
}

/// Kind of access a device makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Device reads guest memory.
    Read,
    /// Device writes guest memory.
    Write,
    /// Both.
    ReadWrite,
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Miss {
    /// The endpoint is in no address space and is blocked (not identity).
    NoDomain,
    /// No mapping covers the address, or it forbids the access.
    NoMapping,
}
