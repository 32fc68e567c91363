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
//! // hand `iommu` (Box<dyn virtio_dev::VirtioDevice>) to the virtio-pci transport
//! ```
//!
//! Assigned (VFIO) devices: [`shadow::Shadow`] mirrors a domain's mappings into the device's
//! container (IOVA -> GPA -> host address, split at RAM-region and BAR edges, exact unmaps,
//! rollback); devices not behind the vIOMMU get [`static_map::StaticMapping`] (all guest RAM,
//! IOVA == GPA, RAM added later too). See the [`shadow`] module doc for host calls per request.
//! ```text
//! // per assigned group, after opening its device into its own container:
//! let space = Arc::new(viommu::VfioDmaSpace::new(container.clone()));
//! let info = space.query_info()?;                          // host IOVA ranges, page sizes
//! let config = viommu::host::vfio::viommu_config_for(ViommuConfig::default(), &[info.clone()])?;
//! bars.add(Arc::new(DeviceBars(..)));  // Arc<BarTargets>; your `unsafe impl BarResolver`
//! let shadow = Arc::new(viommu::Shadow::new(space, guest_mem_atomic.clone())
//!     .with_bars(bars.clone()).with_config(info.shadow_config()));
//! iommu.add_host_endpoint(bdf, shadow)?;                   // same Arc for one container
//! iommu.set_guest_ram(&ram_ranges);                        // boot bypass before the driver
//! // or, not behind the vIOMMU:
//! let statics = viommu::StaticMapping::new(space, &*guest_mem_atomic.memory())?;
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
pub use translate::{PinnedView, TranslatedMemory};
