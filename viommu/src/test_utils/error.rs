//! What can go wrong driving the device.

use super::ring::Used;
use virtio_dev::ActivateError;
use vm_memory::GuestMemoryError;

/// Why the mock driver could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum MockError {
    /// A guest memory access of the driver failed.
    #[error("guest memory access failed: {0}")]
    Memory(#[from] GuestMemoryError),
    /// A queue size a split ring cannot have.
    #[error("queue size {0} is not a power of two up to 32768")]
    QueueSize(u16),
    /// A part of the layout lies outside guest memory or overlaps another part.
    #[error("{0} at {1:#x} ({2:#x} bytes) is outside guest memory or overlaps another part")]
    Layout(&'static str, u64, u64),
    /// The buffer area cannot hold that many more bytes (see [`MockDriver::reset_buffers`]).
    #[error("request buffers exhausted ({0} bytes asked)")]
    OutOfBuffers(u64),
    /// A chain of no descriptors, or of more than the queue has.
    #[error("a chain of {0} descriptors does not fit the queue")]
    ChainLength(usize),
    /// The device did not complete exactly the one chain just sent.
    #[error("expected one completion of chain {head}, got {got:?}")]
    Completion {
        /// Head of the chain sent.
        head: u16,
        /// Used entries found.
        got: Vec<Used>,
    },
    /// The device returned the request without writing the tail (it could not parse it).
    #[error("request returned unwritten (used length {0})")]
    Unanswered(u32),
    /// The tail holds a status the spec does not define.
    #[error("unknown status {0}")]
    UnknownStatus(u8),
    /// The device refused the activation.
    #[error("activation failed: {0}")]
    Activate(#[from] ActivateError),
}
