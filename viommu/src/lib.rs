//! The guest-visible IOMMU: the virtio-iommu device model, per-domain mapping tables, the
//! translation snapshots emulated devices read, and the shadowing engine that installs guest
//! mappings in the host IOMMU.
//!
//! Data flows one way: [`device`] pops a chain, [`request`] parses it, [`domain`] applies the
//! spec's rules (mirroring into [`host`] mappers), and [`snapshot`] publishes per-endpoint views
//! that [`translate::TranslatedMemory`] reads lock-free for the devices behind the IOMMU;
//! misses become [`fault`] events.
//!
//! VMM usage:
//! ```text
//! let mut iommu = viommu::Viommu::new(viommu::ViommuConfig::default())?;
//! let ep = iommu.add_endpoint(bdf)?;               // one per device behind the IOMMU
//! // device side, after its own activate(): translate every address through the endpoint
//! let mem = viommu::TranslatedMemory::from_atomic(&guest_mem_atomic, ep.clone());
//! let req_mem = mem.pin();                         // one pinned copy per request
//! // hand `iommu` (Box<dyn pci::VirtioDevice>) to the virtio-pci transport
//! ```
//!
//! Tables are left-right pairs (`snapshot::DualTable`): O(log n) in-place updates, one
//! publication per request-queue batch, an UNMAP/DETACH completes only once no device still
//! holds the previous view.

pub mod counters;
pub mod device;
pub mod domain;
pub mod fault;
pub mod host;
mod notify;
pub mod request;
pub mod shadow;
pub mod snapshot;
pub mod spec;
pub mod static_map;
pub mod translate;

pub use counters::{CounterSnapshot, Counters};
pub use device::{ConfigError, Viommu, ViommuConfig};
pub use domain::{DomainError, EndpointHandle, Geometry, Limits, ResvKind, ResvRegion};
pub use fault::{Fault, FaultRateLimit};
pub use host::vfio::{HostIommuInfo, VfioDmaSpace};
pub use host::{DmaSpace, HostMapError, HostMapper, Prot};
pub use shadow::{BarResolver, BarTargets, Shadow, ShadowConfig};
pub use snapshot::{Access, Mapping};
pub use spec::Status;
pub use static_map::StaticMapping;
pub use translate::TranslatedMemory;
