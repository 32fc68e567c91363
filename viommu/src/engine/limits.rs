//! Caps on guest-created state and the heap they bound.

use super::endpoint::Endpoint;
use super::space::Space;
use super::table::{TABLE_BYTES_PER_ENTRY, TABLE_LOG_ENTRY_BYTES};
use super::view::EndpointShared;

/// Caps on guest-created state (the front end refuses requests past them: virtio-iommu with
/// NOMEM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Address spaces (domains) alive at once.
    pub max_domains: usize,
    /// Endpoints the VMM may register.
    pub max_endpoints: usize,
    /// Mappings in one address space.
    pub max_mappings_per_domain: usize,
    /// Mappings in all address spaces together (bounds the memory a guest can make us hold).
    pub max_total_mappings: usize,
    /// Host mapping records all host mappers (shadows of VFIO containers) hold together: one
    /// per host mapping piece, at least one per mirrored mapping. A guest mapping is recorded
    /// once per container of its space, in up to `shadow::MAX_PIECES` pieces.
    pub max_host_records: usize,
}

/// Heap bytes of one address space apart from its table entries (map node, struct, host list).
pub(crate) const SPACE_BYTES: usize = 256 + std::mem::size_of::<Space>();
/// Heap bytes of one endpoint (map node, shared part, its published view).
pub(crate) const ENDPOINT_BYTES: usize =
    256 + std::mem::size_of::<Endpoint>() + std::mem::size_of::<EndpointShared>();
/// Most heap bytes one host mapping record (see `HostMapper::records`) costs its mapper: for a
/// shadow, its share of a B-tree node holding the entry (at least half full) and of the
/// entry's piece vector (at most twice as long as needed).
pub(crate) const HOST_RECORD_BYTES: usize = 256;

impl Limits {
    /// The most heap [`Engine::memory_estimate`](super::state::Engine::memory_estimate) can
    /// report under these limits between request batches: every live mapping in up to three
    /// table copies (the published one and a retired one at most twice as large, or a private
    /// and the published one) and four change-log slots, plus per address space 64 spare
    /// entries, a small log and its bookkeeping, plus the endpoints, plus every host mapping
    /// record.
    pub fn memory_bound(&self) -> usize {
        let op = TABLE_LOG_ENTRY_BYTES;
        let entry = TABLE_BYTES_PER_ENTRY;
        let per_mapping = 3 * entry + 4 * op;
        let per_domain = SPACE_BYTES + 64 * entry + 256 * op + 4 * self.max_endpoints;
        self.max_total_mappings
            .saturating_mul(per_mapping)
            .saturating_add(self.max_domains.saturating_mul(per_domain))
            .saturating_add(self.max_endpoints.saturating_mul(ENDPOINT_BYTES))
            .saturating_add(self.max_host_records.saturating_mul(HOST_RECORD_BYTES))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_domains: 1024,
            max_endpoints: 1024,
            max_mappings_per_domain: 1 << 18,
            max_total_mappings: 1 << 20,
            max_host_records: 1 << 20,
        }
    }
}
