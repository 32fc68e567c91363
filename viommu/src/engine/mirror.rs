//! Mirroring an address space's mappings into host mappers, with rollback: a failure part way
//! through undoes what the call already did, so the host holds what the engine's state says.

use super::host::{HostMapError, HostMapper, Prot};
use super::mapping::Mapping;
use std::sync::Arc;

/// Whether two host mappers are the same host address space.
pub(super) fn same_host(a: &Arc<dyn HostMapper>, b: &Arc<dyn HostMapper>) -> bool {
    Arc::ptr_eq(a, b)
}

/// The host rights of `m`.
pub(super) fn prot(m: &Mapping) -> Prot {
    Prot {
        read: m.read,
        write: m.write,
    }
}

/// Size of a mapping in bytes, or `None` for the whole 64-bit space.
pub(super) fn size_of_mapping(m: &Mapping) -> Option<u64> {
    (m.end - m.start).checked_add(1)
}

/// Map every one of `maps` into `h`; on failure unmap those already mapped.
pub(super) fn map_all(h: &Arc<dyn HostMapper>, maps: &[Mapping]) -> Result<(), HostMapError> {
    for (i, m) in maps.iter().enumerate() {
        let res = match size_of_mapping(m) {
            Some(size) => h.map(m.start, size, m.gpa, prot(m)),
            None => Err(HostMapError::OutOfRange),
        };
        if let Err(e) = res {
            unmap_best_effort(h, &maps[..i]);
            return Err(e);
        }
    }
    Ok(())
}

/// Unmap `maps` from `h`, logging failures.
pub(super) fn unmap_best_effort(h: &Arc<dyn HostMapper>, maps: &[Mapping]) {
    for m in maps {
        if let Some(size) = size_of_mapping(m) {
            if let Err(e) = h.unmap(m.start, size) {
                log::error!(
                    "virtio-iommu: host unmap {:#x}+{:#x} failed during cleanup: {e}",
                    m.start,
                    size
                );
            }
        }
    }
}

/// Unmap `maps` from every host; on failure re-map what was removed and return the error.
pub(super) fn unmap_all(
    hosts: &[Arc<dyn HostMapper>],
    maps: &[Mapping],
) -> Result<(), HostMapError> {
    for (hi, h) in hosts.iter().enumerate() {
        for (mi, m) in maps.iter().enumerate() {
            let Some(size) = size_of_mapping(m) else {
                continue;
            };
            if let Err(e) = h.unmap(m.start, size) {
                // Roll back: restore this host's removed mappings and the earlier hosts'.
                for done in &maps[..mi] {
                    restore(h, done);
                }
                for prev in &hosts[..hi] {
                    for done in maps {
                        restore(prev, done);
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Map `m` back into `h` (rollback), logging a failure.
pub(super) fn restore(h: &Arc<dyn HostMapper>, m: &Mapping) {
    if let Some(size) = size_of_mapping(m) {
        if let Err(e) = h.map(m.start, size, m.gpa, prot(m)) {
            log::error!(
                "virtio-iommu: host re-map {:#x}+{:#x} failed during rollback: {e}",
                m.start,
                size
            );
        }
    }
}
