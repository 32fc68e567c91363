//! Device models: the COM1 serial port, the small legacy devices Linux pokes at, virtio-blk and
//! virtio-net on the shared virtio layer ([`virtio`], over the `virtio-dev` crate), and
//! adaptive queue polling for devices whose driver busy-waits (the virtio-iommu).

pub mod block;
pub mod legacy;
pub mod net;
pub mod polled;
pub mod serial;
#[cfg(test)]
mod test_iommu;
pub mod virtio;
