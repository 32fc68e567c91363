//! Device models: the COM1 serial port, the small legacy devices Linux pokes at, and
//! virtio-blk.

pub mod block;
pub mod legacy;
pub mod serial;
