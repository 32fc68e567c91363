//! The emulated Intel VT-d front end: the building blocks of one DMA-remapping unit (DRHD), each
//! a self-contained, tested piece that touches neither the engine nor the VMM.
//!
//! ```text
//! guest writes IQT (vCPU exit)            guest writes GCMD/RTADDR/CCMD/IOTLB
//!   -> regs        register file: W1C, read-only bits, GSTS updated within the write; Actions out
//!   -> queue       descriptors from IQH to IQT ([`descriptor`]: reserved bits -> IQE)
//!   -> tables      root/context entry of a source id -> domain, pass-through or fault
//!   -> walk        the second-level table over the invalidated range -> maximal runs
//!   -> diff        runs vs the engine's mappings for that range -> Unmap/Map changes
//!   -> engine      map / unmap, attach / switch / detach; publish ([`unit`])
//!   -> queue       invalidation wait: status write only after the handler returned
//! ```
//! Faults from emulated devices come back into [`fault`] (records, FSTS, the fault MSI) through
//! [`regs::Registers::record_fault`]. [`caps`] says what the unit implements: legacy mode,
//! caching mode, 39/48-bit second-level tables with 2 MiB and 1 GiB pages, pass-through, queued
//! and register-based invalidation, page-selective invalidation over the whole address space.
//! Without ECAP.SMTS Linux uses legacy mode; without FLTS its domains use second-level tables,
//! which caching mode lets us shadow.
//!
//! [`unit::Unit`] composes them into one DMA-remapping unit on the engine: the MMIO register
//! page, context invalidations -> endpoint attach/switch/detach or identity, IOTLB
//! invalidations -> [`walk::walk_range`] + [`diff::diff`] -> engine map/unmap, device faults ->
//! [`tables::lookup_context`] + [`walk::translate`] -> fault records and the fault MSI through
//! the VMM's [`unit::MsiSender`]. The VMM maps the page and builds the DMAR table
//! (`vmm::dmar`).
//!
//! Out of scope: interrupt remapping (IRTA, IR descriptors, x2APIC; ECAP.IR is 0 and
//! interrupt-entry-cache descriptors are no-ops), scalable mode (PASID tables, first-level and
//! nested translation, 256-bit descriptors; TTM and types >= 6 are rejected), device-TLB / ATS
//! (ECAP.DT is 0; device-TLB descriptors are no-ops), page requests, more than one DRHD.

pub mod caps;
pub mod counters;
pub mod descriptor;
pub mod diff;
pub mod fault;
pub mod invalidation;
pub mod queue;
pub mod regs;
pub mod tables;
pub mod unit;
pub mod walk;

#[cfg(test)]
mod flow_tests;
