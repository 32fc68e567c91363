//! Endpoints: the devices behind one IOMMU, each in at most one address space, and the handle a
//! device translates through.

use super::fault::FaultSink;
use super::host::HostMapper;
use super::view::{EndpointShared, View};
use std::sync::Arc;

/// Errors of registering endpoints (the VMM's calls; guest requests get an
/// [`EngineError`](super::state::EngineError)).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DomainError {
    /// The endpoint ID is already registered.
    #[error("endpoint {0:#x} already registered")]
    DuplicateEndpoint(u32),
    /// `Limits::max_endpoints` reached.
    #[error("too many endpoints (max {0})")]
    TooManyEndpoints(usize),
}

/// A device's handle on its endpoint: what it translates through. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EndpointHandle {
    pub(crate) shared: Arc<EndpointShared>,
}

impl EndpointHandle {
    /// Endpoint ID (PCI BDF).
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// The endpoint's current published view (lock-free).
    pub fn view(&self) -> arc_swap::Guard<Arc<View>> {
        self.shared.load()
    }

    /// Where this endpoint's faults go.
    pub fn fault_sink(&self) -> &Arc<dyn FaultSink> {
        &self.shared.faults
    }
}

/// The engine's record of one endpoint.
pub(crate) struct Endpoint {
    /// What devices share: the published view and the fault sink.
    pub(super) shared: Arc<EndpointShared>,
    /// The address space it is in, if any.
    pub(super) space: Option<u32>,
    /// The host address space its DMA goes through (an assigned device), if any.
    pub(super) host: Option<Arc<dyn HostMapper>>,
    /// Its view must be published again.
    pub(super) dirty: bool,
}
