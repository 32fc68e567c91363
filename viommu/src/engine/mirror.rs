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

/// Attempts at an unmap that undoes or cleans up (a rollback, a space going away) before the
/// host address space is taken to hold a stale mapping.
pub(super) const CLEANUP_TRIES: usize = 3;

/// Host address spaces that may still hold mappings the engine removed, because undoing or
/// cleaning them up failed [`CLEANUP_TRIES`] times (a double fault: e.g. VFIO refusing to
/// unmap what it just mapped). A device there could DMA through such a mapping, so nothing
/// more is mapped into that host address space (the engine answers
/// [`EngineError::HostNeedsReset`](super::state::EngineError::HostNeedsReset)) until every one
/// of them is gone: removing them is retried once per later request that would map into it,
/// and on reset.
#[derive(Default)]
pub(super) struct Stale {
    hosts: Vec<(Arc<dyn HostMapper>, Vec<Mapping>)>,
}

impl Stale {
    /// Unmap `m` from `h` (cleanup), retried; if it still fails, remember it.
    pub(super) fn unmap(&mut self, h: &Arc<dyn HostMapper>, m: &Mapping) {
        let Some(size) = size_of_mapping(m) else {
            return;
        };
        let mut last = None;
        for _ in 0..CLEANUP_TRIES {
            match h.unmap(m.start, size) {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
        }
        let e = last.map(|e| e.to_string()).unwrap_or_default();
        match self.hosts.iter_mut().find(|(o, _)| same_host(o, h)) {
            Some((_, list)) => list.push(*m),
            None => {
                log::error!(
                    "virtio-iommu: host unmap {:#x}+{size:#x} failed {CLEANUP_TRIES} times \
                     during cleanup ({e}): the host address space may keep a stale mapping; \
                     nothing more is mapped into it until that is removed (device reset)",
                    m.start
                );
                self.hosts.push((h.clone(), vec![*m]));
            }
        }
    }

    /// Unmap every one of `maps` from `h` (cleanup), remembering what fails.
    pub(super) fn unmap_all(&mut self, h: &Arc<dyn HostMapper>, maps: &[Mapping]) {
        for m in maps {
            self.unmap(h, m);
        }
    }

    /// Whether `h` still holds stale mappings, after trying once more to remove them.
    pub(super) fn blocks(&mut self, h: &Arc<dyn HostMapper>) -> bool {
        let Some(i) = self.hosts.iter().position(|(o, _)| same_host(o, h)) else {
            return false;
        };
        self.retry(i)
    }

    /// Try once more to remove every stale mapping (reset).
    pub(super) fn retry_all(&mut self) {
        let mut i = 0;
        while i < self.hosts.len() {
            if self.retry(i) {
                i += 1;
            }
        }
    }

    /// One attempt at each stale mapping of host `i`; drops the host once it has none left
    /// (returns whether some remain).
    fn retry(&mut self, i: usize) -> bool {
        let (h, list) = &mut self.hosts[i];
        list.retain(|m| size_of_mapping(m).is_some_and(|size| h.unmap(m.start, size).is_err()));
        if !list.is_empty() {
            return true;
        }
        log::info!("virtio-iommu: stale host mappings removed; the host address space maps again");
        self.hosts.swap_remove(i);
        false
    }
}

/// Map every one of `maps` into `h`; on failure unmap those already mapped.
pub(super) fn map_all(
    h: &Arc<dyn HostMapper>,
    maps: &[Mapping],
    stale: &mut Stale,
) -> Result<(), HostMapError> {
    for (i, m) in maps.iter().enumerate() {
        let res = match size_of_mapping(m) {
            Some(size) => h.map(m.start, size, m.gpa, prot(m)),
            None => Err(HostMapError::OutOfRange),
        };
        if let Err(e) = res {
            stale.unmap_all(h, &maps[..i]);
            return Err(e);
        }
    }
    Ok(())
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
