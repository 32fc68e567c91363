//! The IOMMU engine.

pub mod host;
pub mod shadow;
pub mod state;
pub mod static_map;
pub mod table;
pub mod translate;
