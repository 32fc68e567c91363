//! Test doubles (feature `test-utils`, like virtio-queue's `test-utils`), for our own tests and
//! for VMMs embedding the crate:
//!
//! - [`MockDriver`]: a virtio-iommu driver over split rings in the caller's guest memory. It
//!   sends the [`spec`](crate::spec) request structures ([`Request`]), kicks the device through
//!   `VirtioDevice` like a transport would, and reads back the typed tail status, the PROBE
//!   properties and the fault records of the event queue.
//! - [`RecordingMapper`]: a host mapper (and DMA space) that records every call, checks them like
//!   VFIO type1 and fails on demand.
//! - [`InterruptCounter`] and [`NoInterrupt`]: interrupt sinks for the device's activation.

mod driver;
mod error;
mod interrupt;
mod request;
mod ring;

pub use crate::engine::host::recording::{HostOp, RecordingMapper};
pub use driver::MockDriver;
pub use error::MockError;
pub use interrupt::{InterruptCounter, NoInterrupt};
pub use request::{Property, Reply, Request, REPLY_FILL};
pub use ring::{MockLayout, QueueLayout, Segment, Used};
