//! The virtio-iommu specification's request rules (virtio 1.2/1.3 §5.13.6), applied on the
//! engine: what a field, a flag or a negotiated feature means for ATTACH, DETACH, MAP, UNMAP
//! and PROBE, and which status each outcome gets. Each check is written beside the sentence
//! of the spec it implements; the checks that need the engine's state (unknown domain,
//! overlap, limits...) are the engine's, and their [`EngineError`] becomes the status here.
//!
//! [`Domains`] is the device's domain state as the driver sees it: domain and endpoint IDs,
//! `config.bypass`, ATTACH_F_BYPASS domains, MAP_F_* flags.

use crate::engine::endpoint::{DomainError, EndpointHandle};
use crate::engine::fault::FaultSink;
use crate::engine::geometry::{Geometry, ResvKind, ResvRegion};
use crate::engine::host::{HostMapError, HostMapper};
use crate::engine::limits::Limits;
use crate::engine::mapping::Mapping;
use crate::engine::space::SpaceKind;
use crate::engine::state::{Engine, EngineError};
use crate::virtio::request::Request;
use crate::virtio::spec::{
    ProbeProperty, ProbeResvMem, Status, ATTACH_F_BYPASS, MAP_F_MASK, MAP_F_MMIO, MAP_F_READ,
    MAP_F_WRITE, PROBE_T_RESV_MEM, RESV_MEM_SIZE, RESV_MEM_T_MSI, RESV_MEM_T_RESERVED, TAIL_SIZE,
};
use std::sync::Arc;
use vm_memory::ByteValued;

impl From<&HostMapError> for Status {
    /// The status the guest sees when a host mapper refused: out of resources -> NOMEM
    /// (e.g. VFIO's `dma_entry_limit`), outside the host IOMMU's range -> RANGE, a conflicting
    /// request -> INVAL, anything else -> DEVERR ("Internal device error").
    fn from(e: &HostMapError) -> Status {
        match e {
            HostMapError::NoSpace => Status::NoMem,
            HostMapError::OutOfRange => Status::Range,
            HostMapError::Invalid => Status::Inval,
            HostMapError::Failed(_) => Status::DevErr,
        }
    }
}

impl From<&EngineError> for Status {
    /// The status of an engine refusal, for outcomes no request rule below names otherwise.
    fn from(e: &EngineError) -> Status {
        match e {
            EngineError::UnknownEndpoint | EngineError::UnknownSpace => Status::NoEnt,
            EngineError::KindMismatch
            | EngineError::NotInSpace
            | EngineError::IdentitySpace
            | EngineError::EmptyRange
            | EngineError::Reserved
            | EngineError::Overlap => Status::Inval,
            EngineError::SpaceIdOutOfRange
            | EngineError::OutOfRange
            | EngineError::Misaligned
            | EngineError::WouldSplit => Status::Range,
            EngineError::TooManySpaces | EngineError::TooManyMappings => Status::NoMem,
            EngineError::Host(h) => h.into(),
            // A container that may hold a stale mapping: "Internal device error".
            EngineError::HostNeedsReset => Status::DevErr,
        }
    }
}

/// All endpoints and domains of one virtio-iommu, with the spec's rules on top of the engine.
pub struct Domains {
    engine: Engine,
    /// ATTACH_F_BYPASS may be used (VIRTIO_IOMMU_F_BYPASS_CONFIG negotiated, or not yet known).
    bypass_flag_allowed: bool,
    /// MAP_F_MMIO may be used (VIRTIO_IOMMU_F_MMIO offered and, once known, negotiated).
    mmio_allowed: bool,
}

impl Domains {
    /// Empty state; `bypass` is the initial `config.bypass`.
    pub fn new(
        geometry: Geometry,
        limits: Limits,
        resv: Vec<ResvRegion>,
        bypass: bool,
        faults: Arc<dyn FaultSink>,
    ) -> Self {
        Domains {
            engine: Engine::new(geometry, limits, resv, bypass, faults),
            bypass_flag_allowed: true,
            mmio_allowed: true,
        }
    }

    /// The engine (saved state).
    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine (restore).
    pub(crate) fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Which optional request flags the negotiated features allow.
    pub fn set_negotiated(&mut self, bypass_config: bool, mmio: bool) {
        self.bypass_flag_allowed = bypass_config;
        self.mmio_allowed = mmio;
    }

    /// The reserved regions.
    pub fn reserved_regions(&self) -> &[ResvRegion] {
        self.engine.reserved_regions()
    }

    /// The advertised geometry.
    pub fn geometry(&self) -> &Geometry {
        self.engine.geometry()
    }

    /// Current `config.bypass`.
    pub fn bypass(&self) -> bool {
        self.engine.default_identity()
    }

    /// Register an endpoint (a PCI BDF); `host` when its DMA goes through a host IOMMU.
    pub fn add_endpoint(
        &mut self,
        id: u32,
        host: Option<Arc<dyn HostMapper>>,
    ) -> Result<EndpointHandle, DomainError> {
        self.engine.add_endpoint(id, host)
    }

    /// Whether `id` is a registered endpoint.
    pub fn has_endpoint(&self, id: u32) -> bool {
        self.engine.has_endpoint(id)
    }

    /// The domain `endpoint` is attached to (`None` if unknown, `Some(None)` if unattached).
    pub fn endpoint_domain(&self, endpoint: u32) -> Option<Option<u32>> {
        self.engine.endpoint_space(endpoint)
    }

    /// The mappings of `domain` in IOVA order (`None` if it does not exist).
    pub fn mappings(&self, domain: u32) -> Option<Vec<Mapping>> {
        self.engine.mappings(domain)
    }

    /// Whether `domain` is a bypass (identity) domain (`None` if it does not exist).
    pub fn domain_bypass(&self, domain: u32) -> Option<bool> {
        self.engine
            .space_kind(domain)
            .map(|k| k == SpaceKind::Identity)
    }

    /// Number of live domains.
    pub fn domain_count(&self) -> usize {
        self.engine.space_count()
    }

    /// Mappings in all domains together (what `Limits::max_total_mappings` caps).
    pub fn total_mappings(&self) -> usize {
        self.engine.total_mappings()
    }

    /// Estimated heap bytes held for guest-created and registered state (see
    /// [`Engine::memory_estimate`]). Bounded by [`Limits::memory_bound`].
    pub fn memory_estimate(&self) -> usize {
        self.engine.memory_estimate()
    }

    /// Publish every changed view. When the batch removed access, return only once no device
    /// still reads an old view.
    pub fn publish(&mut self) {
        self.engine.publish();
    }

    /// How long removing access waits for a device holding an old view before revoking it
    /// (see [`Engine::set_pin_deadline`]).
    pub fn set_pin_deadline(&mut self, deadline: std::time::Duration) {
        self.engine.set_pin_deadline(deadline);
    }

    /// Change `config.bypass` and publish the unattached endpoints' new views.
    pub fn set_bypass(&mut self, on: bool) {
        self.engine.set_default_identity(on);
    }

    /// Device reset: "When the device is reset, endpoints are not attached to any domain."
    /// Every domain is destroyed; `config.bypass` is kept ("Field bypass SHOULD NOT change on
    /// device reset").
    pub fn reset(&mut self) {
        self.engine.reset();
    }

    /// Guest RAM as `(start, len)` ranges (see [`Engine::set_ram`]).
    pub fn set_ram(&mut self, ranges: &[(u64, u64)]) {
        self.engine.set_ram(ranges);
    }

    /// Apply one parsed request: the reserved-field rules, then the request's own rules.
    pub(crate) fn apply(&mut self, req: &Request) -> Status {
        // Deviation kept from the first version: the spec says "The device MUST ignore field
        // reserved of struct virtio_iommu_req_head"; this device answers INVAL.
        if !req.head_reserved_zero() {
            return Status::Inval;
        }
        match req {
            Request::Attach(r) => {
                // "If the reserved field of an ATTACH request is not zero, the device MUST
                // reject the request and set status to VIRTIO_IOMMU_S_INVAL."
                if r.reserved != [0; 4] {
                    return Status::Inval;
                }
                self.attach(r.domain.into(), r.endpoint.into(), r.flags.into())
            }
            Request::Detach(r) => {
                // Deviation kept from the first version: the spec says "The device MUST
                // ignore reserved" (DETACH); this device answers INVAL.
                if r.reserved != [0; 8] {
                    return Status::Inval;
                }
                self.detach(r.domain.into(), r.endpoint.into())
            }
            Request::Map(r) => self.map(
                r.domain.into(),
                r.virt_start.into(),
                r.virt_end.into(),
                r.phys_start.into(),
                r.flags.into(),
            ),
            Request::Unmap(r) => {
                // "If the reserved field of an UNMAP request is not zero, the device MAY set
                // the request status to VIRTIO_IOMMU_S_INVAL, in which case the device MAY
                // perform the UNMAP operation." (It does not.)
                if r.reserved != [0; 4] {
                    return Status::Inval;
                }
                self.unmap(r.domain.into(), r.virt_start.into(), r.virt_end.into())
            }
            Request::Probe(r) => {
                // Deviation kept from the first version: the spec says "The device MUST
                // ignore field reserved of a PROBE request"; this device answers INVAL.
                if r.reserved != [0; 64] {
                    return Status::Inval;
                }
                self.probe(r.endpoint.into())
            }
        }
    }

    /// ATTACH `endpoint` to `domain` (created on first attach). An endpoint attached elsewhere
    /// moves.
    pub fn attach(&mut self, domain: u32, endpoint: u32, flags: u32) -> Status {
        // "If the device does not recognize a flags bit, it MUST reject the request and set
        // status to VIRTIO_IOMMU_S_INVAL."
        if flags & !ATTACH_F_BYPASS != 0 {
            return Status::Inval;
        }
        // "When the VIRTIO_IOMMU_F_BYPASS_CONFIG is negotiated, the driver can set the
        // VIRTIO_IOMMU_ATTACH_F_BYPASS flag to create a bypass domain": not otherwise.
        let bypass = flags & ATTACH_F_BYPASS != 0;
        if bypass && !self.bypass_flag_allowed {
            return Status::Inval;
        }
        let kind = if bypass {
            SpaceKind::Identity
        } else {
            SpaceKind::Paging
        };
        // "If the endpoint identified by endpoint is already attached to another domain, then
        // the device SHOULD first detach it from that domain and attach it to the one
        // identified by domain." The engine moves it.
        match self.engine.attach(endpoint, domain, kind) {
            Ok(_) => Status::Ok,
            // "If the endpoint identified by endpoint doesn't exist, the device MUST reject
            // the request and set status to VIRTIO_IOMMU_S_NOENT."
            Err(EngineError::UnknownEndpoint) => Status::NoEnt,
            // Outside domain_range ("the driver MUST NOT send requests with domain less than
            // domain_range.start or greater than domain_range.end"): RANGE.
            Err(EngineError::SpaceIdOutOfRange) => Status::Range,
            // "If the domain already exists and the VIRTIO_IOMMU_ATTACH_F_BYPASS flag is not
            // consistent with that domain, the device SHOULD reject the request and set status
            // to VIRTIO_IOMMU_S_INVAL."
            Err(EngineError::KindMismatch) => Status::Inval,
            // Past `Limits::max_domains`: "Insufficient resources".
            Err(EngineError::TooManySpaces) => Status::NoMem,
            Err(e) => Status::from(&e),
        }
    }

    /// DETACH `endpoint` from `domain`.
    pub fn detach(&mut self, domain: u32, endpoint: u32) -> Status {
        // "The device MUST ensure that after being detached from a domain, the endpoint cannot
        // access any mapping from that domain": the engine publishes, and waits for readers.
        match self.engine.detach(endpoint, domain) {
            Ok(_) => Status::Ok,
            // "If the endpoint identified by endpoint doesn't exist, then the device MUST
            // reject the request and set status to VIRTIO_IOMMU_S_NOENT."
            Err(EngineError::UnknownEndpoint) => Status::NoEnt,
            // "If the domain identified by domain doesn't exist, or if the endpoint identified
            // by endpoint isn't attached to this domain, then the device MAY set the request
            // status to VIRTIO_IOMMU_S_INVAL."
            Err(EngineError::NotInSpace) => Status::Inval,
            Err(e) => Status::from(&e),
        }
    }

    /// MAP `virt_start..=virt_end` -> `phys_start` in `domain`.
    pub fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    ) -> Status {
        // "If the device doesn't recognize a flags bit, it MUST reject the request and set
        // status to VIRTIO_IOMMU_S_INVAL."
        if flags & !MAP_F_MASK != 0 {
            return Status::Inval;
        }
        // "The VIRTIO_IOMMU_MAP_F_MMIO flag ... is only available when the
        // VIRTIO_IOMMU_F_MMIO feature has been negotiated."
        if flags & MAP_F_MMIO != 0 && !self.mmio_allowed {
            return Status::Inval;
        }
        // "The device MUST NOT allow writes to a range mapped without the
        // VIRTIO_IOMMU_MAP_F_WRITE flag": rights are exactly the flags.
        let m = Mapping {
            start: virt_start,
            end: virt_end,
            gpa: phys_start,
            read: flags & MAP_F_READ != 0,
            write: flags & MAP_F_WRITE != 0,
            mmio: flags & MAP_F_MMIO != 0,
        };
        match self.engine.map(domain, m) {
            Ok(()) => Status::Ok,
            // "If domain does not exist, the device SHOULD reject the request and set status to
            // VIRTIO_IOMMU_S_NOENT."
            Err(EngineError::UnknownSpace) => Status::NoEnt,
            // "If the domain is a bypass domain, the device SHOULD reject the request and set
            // status to VIRTIO_IOMMU_S_INVAL."
            Err(EngineError::IdentitySpace) => Status::Inval,
            // "virt_end MUST be strictly greater than virt_start" (driver): INVAL.
            Err(EngineError::EmptyRange) => Status::Inval,
            // input_range: "Any mapping request to virtual addresses outside of this range
            // fails"; a phys_end past the 64-bit space is out of range too.
            Err(EngineError::OutOfRange) => Status::Range,
            // "If virt_start, phys_start or (virt_end + 1) is not aligned on the page
            // granularity, the device SHOULD reject the request and set status to
            // VIRTIO_IOMMU_S_RANGE."
            Err(EngineError::Misaligned) => Status::Range,
            // "The device SHOULD reject a MAP request that overlaps a RESV_MEM region."
            Err(EngineError::Reserved) => Status::Inval,
            // "If a mapping already exists in the requested range, the device SHOULD reject the
            // request and set status to VIRTIO_IOMMU_S_INVAL."
            Err(EngineError::Overlap) => Status::Inval,
            // Past the mapping limits: "Insufficient resources".
            Err(EngineError::TooManyMappings) => Status::NoMem,
            Err(e) => Status::from(&e),
        }
    }

    /// UNMAP every mapping inside `virt_start..=virt_end` of `domain`; a range that would split
    /// a mapping removes nothing and fails with RANGE.
    pub fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Status {
        match self.engine.unmap(domain, virt_start, virt_end) {
            // "If part of the range or the full range is not covered by an existing mapping,
            // then the device SHOULD remove all mappings affected by the range and set the
            // request status to VIRTIO_IOMMU_S_OK."
            Ok(_) => Status::Ok,
            // "If domain does not exist, the device SHOULD set the request status to
            // VIRTIO_IOMMU_S_NOENT."
            Err(EngineError::UnknownSpace) => Status::NoEnt,
            // "If the domain is a bypass domain, the device SHOULD reject the request and set
            // status to VIRTIO_IOMMU_S_INVAL."
            Err(EngineError::IdentitySpace) => Status::Inval,
            // An inverted range (virt_end < virt_start) is invalid.
            Err(EngineError::EmptyRange) => Status::Inval,
            // "If a mapping affected by the range is not covered in its entirety by the range
            // (the UNMAP request would split the mapping), then the device SHOULD set the
            // request status to VIRTIO_IOMMU_S_RANGE, and SHOULD NOT remove any mapping."
            Err(EngineError::WouldSplit) => Status::Range,
            Err(e) => Status::from(&e),
        }
    }

    /// PROBE `endpoint` (the device writes the reply body: one RESV_MEM property per reserved
    /// region).
    pub fn probe(&self, endpoint: u32) -> Status {
        // "If the endpoint identified by endpoint doesn't exist, then the device SHOULD reject
        // the request and set status to VIRTIO_IOMMU_S_NOENT."
        if !self.engine.has_endpoint(endpoint) {
            return Status::NoEnt;
        }
        Status::Ok
    }

    /// The PROBE property area for an endpoint followed by room for the tail: one RESV_MEM
    /// per reserved region. "If the device doesn't fill all probe_size bytes with properties,
    /// it SHOULD fill the remaining bytes of properties with zeroes."
    pub(crate) fn probe_properties(&self, probe_size: u32) -> Vec<u8> {
        let mut out = vec![0u8; probe_size as usize + TAIL_SIZE];
        let mut off = 0;
        for r in self.engine.reserved_regions() {
            let prop = ProbeResvMem {
                head: ProbeProperty {
                    ptype: PROBE_T_RESV_MEM.into(),
                    // "The device MUST write the size of a property without the struct
                    // virtio_iommu_probe_property header, in bytes, into length."
                    length: ((RESV_MEM_SIZE - std::mem::size_of::<ProbeProperty>()) as u16).into(),
                },
                subtype: match r.kind {
                    ResvKind::Msi => RESV_MEM_T_MSI,
                    ResvKind::Reserved => RESV_MEM_T_RESERVED,
                },
                reserved: [0; 3],
                start: r.start.into(),
                end: r.end.into(),
            };
            // Config validation guarantees the properties fit in probe_size.
            if let Some(dst) = out.get_mut(off..off + RESV_MEM_SIZE) {
                dst.copy_from_slice(prop.as_slice());
            }
            off += RESV_MEM_SIZE;
        }
        out
    }
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
