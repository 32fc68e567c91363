//! The virtio-iommu front end (virtio device type 23).

pub(crate) mod config;
pub(crate) mod counters;
pub(crate) mod device;
pub(crate) mod event;
pub(crate) mod request;
pub(crate) mod rules;
pub mod spec;
