//! The virtio-iommu front end.

pub mod counters;
pub mod device;
pub mod event;
mod notify;
pub mod request;
pub mod spec;
