//! The guest-visible IOMMU: the virtio-iommu device model, per-domain mapping tables, the
//! translation snapshots emulated devices read, and the shadowing engine that installs guest
//! mappings in the host IOMMU.
