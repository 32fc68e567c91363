//! The emulated Intel VT-d front end (issue 14): the register file, the invalidation queue,
//! the walk of the guest's root/context/second-level tables and its diff against the engine's
//! state, and fault records. Empty until then; it will call the same
//! [`Engine`](crate::engine::state::Engine) as the virtio-iommu front end.
