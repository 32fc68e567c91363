//! `vmm`: a small KVM virtual machine monitor that boots unmodified Linux with PCI, ACPI,
//! MSI-X and virtio-blk, built to host a guest-visible IOMMU.
//!
//! One file per idea: `memory` (layout, e820), `boot` (Linux boot protocol), `acpi` (tables),
//! `vm` (KVM VM assembly), `vcpu` (registers, run loop), `bus` (exit dispatch), `irq` (GSI
//! routing, irqfd, ioeventfd), `pci_host` (exits into the `pci` crate), `devices` (serial,
//! legacy, virtio-blk), `iommu` (the virtio-iommu exit counters), `viot` (the ACPI table
//! naming the IOMMU and its endpoints), `dmar` (the ACPI table of the emulated VT-d, not wired
//! yet), `machine` (a bootable Linux machine), `config` (the typed options), `cli`, `report`
//! (error chains), `watchdog` (the hang watchdog) and `logger` for the binary.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod config;
pub mod devices;
pub mod dmar;
pub mod iommu;
pub mod irq;
pub mod lifecycle;
pub mod logger;
pub mod machine;
pub mod memory;
pub mod memory_slots;
pub mod net;
pub mod pci_host;
pub mod report;
pub mod seccomp;
pub mod skip;
pub mod snapshot;
pub mod vcpu;
pub mod vfio;
pub mod viot;
pub mod vm;
pub mod watchdog;
