//! One address space (a domain): its kind, its mapping table, the endpoints in it and the host
//! address spaces that mirror it.

use super::host::HostMapper;
use super::table::{DualTable, Table};
use std::sync::Arc;

/// What an address space does with the accesses of the endpoints in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpaceKind {
    /// Translate through the space's mappings.
    Paging,
    /// Identity: IOVA == guest-physical, no mappings (bypass / pass-through).
    Identity,
}

/// One address space.
pub(crate) struct Space {
    /// Paging or identity.
    pub(super) kind: SpaceKind,
    /// The mappings (always empty for an identity space).
    pub(super) table: DualTable,
    /// IDs of the endpoints in the space.
    pub(super) endpoints: Vec<u32>,
    /// Distinct host mappers of the endpoints (one per host address space).
    pub(super) hosts: Vec<Arc<dyn HostMapper>>,
    /// The table endpoint views currently share.
    pub(super) published: Option<Arc<Table>>,
    /// Changed since the last publication.
    pub(super) dirty: bool,
}

impl Space {
    /// An empty space of `kind`, with no endpoint yet.
    pub(super) fn new(kind: SpaceKind) -> Self {
        Space {
            kind,
            table: DualTable::new(),
            published: None,
            endpoints: Vec::new(),
            hosts: Vec::new(),
            dirty: false,
        }
    }

    /// Whether the space is an identity space.
    pub(super) fn is_identity(&self) -> bool {
        self.kind == SpaceKind::Identity
    }
}
