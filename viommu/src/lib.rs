//! The guest-visible IOMMU: one engine and its front ends.
//!
//! - `engine/`: address spaces (domains) and their mapping tables, endpoints, the published
//!   views emulated devices translate through, the shadowing into host DMA address spaces
//!   (VFIO), the static full-RAM map, faults (a [`FaultSink`]) and limits. It knows nothing of
//!   virtio or VT-d: a front end calls [`Engine`] in neutral words ("endpoint E is in space D",
//!   "D maps R -> G with A", "unmap R", "E is identity / blocked", "publish") and turns each
//!   answer ([`Attached`], [`EngineError`], ...) into its own.
//! - `virtio/`: the virtio-iommu device ([`Viommu`]): the wire format ([`spec`]), request
//!   parsing, the spec's rules ([`Domains`]), the event queue ([`FaultReporter`]), counters and
//!   the configuration ([`ViommuConfig`]).
//! - `vtd/`: the emulated Intel VT-d front end ([`vtd::unit::Unit`], one DMA-remapping unit):
//!   register file, invalidation queue, root/context tables, second-level walk, diff, fault
//!   records, driving the same engine.
//!
//! Data flows one way: front end -> engine -> host mappers / published views. For the
//! virtio-iommu: the device pops a chain, the request parser types it, the rules check it and
//! call the engine, which mirrors the change into the [`HostMapper`]s of the space's endpoints
//! and publishes one [`View`] per endpoint (once per request-queue batch) that
//! [`TranslatedMemory`] reads lock-free for the devices behind the IOMMU; misses become
//! [`Fault`]s, which the front end reports (virtio: event-queue records).
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
//! Assigned (VFIO) devices: a [`Shadow`] mirrors a space's mappings into the device's container
//! (IOVA -> GPA -> host address, split at RAM-region and BAR edges, exact unmaps, rollback);
//! devices not behind the vIOMMU get a [`StaticMapping`] (all guest RAM, IOVA == GPA, RAM added
//! later too). See the [`Shadow`] doc for host calls per request.
//! ```text
//! // per assigned group, after opening its device into its own container:
//! let space = Arc::new(viommu::VfioDmaSpace::new(container.clone()));
//! let info = space.query_info()?;                          // host IOVA ranges, page sizes
//! let config = viommu::viommu_config_for(ViommuConfig::default(), &[info.clone()])?;
//! bars.add(Arc::new(DeviceBars(..)));  // Arc<BarTargets>; your `unsafe impl BarResolver`
//! let shadow = Arc::new(viommu::Shadow::new(space, guest_mem_atomic.clone())
//!     .with_bars(bars.clone()).with_config(info.shadow_config()));
//! iommu.add_host_endpoint(bdf, shadow)?;                   // same Arc for one container
//! iommu.set_guest_ram(&ram_ranges);                        // boot bypass before the driver
//! // or, not behind the vIOMMU:
//! let statics = viommu::StaticMapping::new(space, &*guest_mem_atomic.memory())?;
//! ```
//!
//! Tables are left-right pairs: O(log n) in-place updates, one publication per request-queue
//! batch, an unmap or detach completes only once no device still holds the previous view, or,
//! for one held past the pin deadline (a stuck backend), once that view is revoked and no
//! access through it is in progress (see [`View`] and [`Viommu::set_pin_deadline`]).
#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub(crate) mod engine;
pub mod snapshot;
pub(crate) mod virtio;
pub mod vtd;

/// Test doubles (feature `test-utils`): a mock virtio-iommu driver and a recording host mapper.
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
#[cfg(feature = "vm-memory-iommu")]
mod vm_iommu;

/// The virtio-iommu wire format (mock drivers and fuzzers encode requests with its structs).
pub use virtio::spec;

// The engine: its API for front ends, and what devices and the VMM hold.
pub use engine::arch::{X86_MSI_END, X86_MSI_START};
pub use engine::endpoint::{DomainError, EndpointHandle};
pub use engine::fault::{Fault, FaultRateLimit, FaultSink};
pub use engine::geometry::{Geometry, ResvKind, ResvRegion};
pub use engine::limits::Limits;
pub use engine::mapping::{Access, Mapping, Miss};
pub use engine::space::SpaceKind;
pub use engine::state::{Attached, Detached, Engine, EngineError};
pub use engine::translate::{PinnedView, TranslatedMemory};
pub use engine::view::{Mode, View, PIN_DEADLINE};
#[cfg(feature = "vm-memory-iommu")]
pub use vm_iommu::ViewIotlb;

// Host address spaces: the mapper hook, VFIO, shadowing and the static map.
pub use engine::host::vfio::{HostIommuInfo, InfoParseError, VfioDmaSpace};
pub use engine::host::{DmaSpace, HostMapError, HostMapper, Prot};
pub use engine::shadow::{BarResolver, BarTargets, Piece, Shadow, ShadowConfig, MAX_PIECES};
pub use engine::static_map::{StaticMapping, StaticRange};

// The virtio-iommu front end.
pub use virtio::config::{
    viommu_config_for, ConfigError, GeometryError, ViommuConfig, MAX_PROBE_SIZE,
};
pub use virtio::counters::{CounterSnapshot, Counters};
pub use virtio::device::{Viommu, HOST_CALLS_PER_NOTIFY};
pub use virtio::event::FaultReporter;
pub use virtio::rules::Domains;
pub use virtio::spec::Status;
