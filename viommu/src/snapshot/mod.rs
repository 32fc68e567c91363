//! Saved state of the IOMMU and its front ends: a versioned, checksummed, length-checked binary
//! format ([`codec`]) and the errors of loading one ([`SnapshotError`]).
//!
//! Every blob is `magic "VMMS" | kind (4 bytes) | version u16 | payload length u64 | payload |
//! CRC-32 of everything before`, little-endian. The payload is read with a [`Reader`] that
//! refuses to read past its end, and every count is checked against the [`Limits`] it may
//! reach and against the bytes left before anything is allocated, so a hostile, corrupt or
//! truncated blob gets a [`SnapshotError`], never a panic or an allocation it did not pay for.
//! What each front end saves: `Engine::save_state` (engine), `Viommu::save_state`
//! (virtio-iommu), `vtd::unit::Unit::save_state` (VT-d).
//!
//! [`Limits`]: crate::Limits

pub mod codec;

pub use codec::{crc32, crc32_update, frame, unframe, Reader, Writer, FORMAT_VERSION, MAGIC};

/// Why a saved state was refused. Nothing was changed when restore returns one, except as
/// each `restore_state` documents (the engine is reset to no domains).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The blob ends before a field it needs.
    #[error("snapshot truncated: {need} bytes needed at offset {at}, {have} left")]
    Truncated {
        /// Offset of the field.
        at: usize,
        /// Bytes it needs.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// Not a snapshot blob.
    #[error("not a snapshot (bad magic)")]
    BadMagic,
    /// A blob of another kind (e.g. VT-d state given to the virtio-iommu).
    #[error("snapshot of kind {found:?}, expected {expected:?}")]
    WrongKind {
        /// Kind expected.
        expected: String,
        /// Kind found.
        found: String,
    },
    /// A format version this build cannot read.
    #[error("snapshot format version {found}, this build reads version {supported}")]
    UnsupportedVersion {
        /// Version found.
        found: u16,
        /// Version supported.
        supported: u16,
    },
    /// The checksum does not match the content.
    #[error("snapshot checksum mismatch (corrupt)")]
    Checksum,
    /// Bytes left after the last field.
    #[error("{0} unexpected bytes after the snapshot's last field")]
    Trailing(usize),
    /// A count larger than the limits allow (or than the bytes left could hold).
    #[error("snapshot holds {count} {what}, at most {max} allowed")]
    TooMany {
        /// What was counted.
        what: &'static str,
        /// The count found.
        count: u64,
        /// The most allowed.
        max: u64,
    },
    /// A field holds a value the device could never have had.
    #[error("invalid snapshot: {0}")]
    Invalid(String),
    /// The snapshot does not fit the device it is restored into (other configuration,
    /// endpoints, or the device is not in the state restore needs).
    #[error("snapshot does not match this device: {0}")]
    Mismatch(String),
}

/// Result of loading saved state.
pub type Result<T> = std::result::Result<T, SnapshotError>;
