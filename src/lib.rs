//! `vmm`: a small KVM virtual machine monitor that boots unmodified Linux with PCI, ACPI,
//! MSI-X and virtio-blk, built to host a guest-visible IOMMU.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod devices;
pub mod irq;
pub mod lifecycle;
pub mod memory;
pub mod vcpu;
pub mod vm;
