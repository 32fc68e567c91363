//! The IOMMU engine: address spaces and their mapping tables, endpoints, the published views
//! emulated devices translate through, the shadowing into host DMA address spaces, the static
//! full-RAM map, faults and limits. It knows nothing of virtio or VT-d: a front end calls
//! [`state::Engine`] in neutral words and turns its answers into its own.

pub(crate) mod arch;
mod barrier;
pub(crate) mod endpoint;
pub(crate) mod fault;
pub(crate) mod geometry;
pub(crate) mod host;
pub(crate) mod limits;
pub(crate) mod mapping;
mod mirror;
pub(crate) mod shadow;
pub(crate) mod space;
pub(crate) mod state;
pub(crate) mod static_map;
pub(crate) mod table;
pub(crate) mod translate;
pub(crate) mod view;
