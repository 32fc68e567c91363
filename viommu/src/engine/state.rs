//! The engine's state: every address space and endpoint of one IOMMU, and the operations a
//! front end calls, in its own words: endpoint E is in space D ([`Engine::attach`]) or leaves
//! it ([`Engine::detach`]); D maps an IOVA range to guest-physical memory with some access
//! rights ([`Engine::map`]) or unmaps a range ([`Engine::unmap`]); endpoints in no space are
//! identity or blocked ([`Engine::set_default_identity`]); publish ([`Engine::publish`]). Each
//! call returns what changed or an [`EngineError`], which the front end turns into its answer.
//!
//! State is bounded by [`Limits`]; every change is mirrored into the host mappers of the
//! space's endpoints (one call per host address space, rolled back on failure; a rollback
//! unmap that keeps failing marks its host address space as needing reset, see
//! `mirror::Stale`); identity spaces, and host endpoints in no space while the default is
//! identity (boot bypass), hold guest RAM identity-mapped in their host address spaces.
//! Removing access waits for the devices still using the old views, at most the pin
//! deadline ([`Engine::set_pin_deadline`]); see [`View`] for what happens past it.

use super::endpoint::{DomainError, Endpoint, EndpointHandle};
use super::fault::FaultSink;
use super::geometry::{Geometry, ResvRegion};
use super::host::{HostMapError, HostMapper};
use super::limits::{Limits, ENDPOINT_BYTES, HOST_RECORD_BYTES, SPACE_BYTES};
use super::mapping::Mapping;
use super::mirror::{map_all, prot, restore, same_host, size_of_mapping, unmap_all, Stale};
use super::space::{Space, SpaceKind};
use super::table::Table;
use super::view::{EndpointShared, Mode, View, PIN_DEADLINE};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[path = "snapshot.rs"]
pub(crate) mod snapshot;

/// Why the engine refused an operation. Nothing changed when it returns one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No endpoint has that ID.
    #[error("unknown endpoint")]
    UnknownEndpoint,
    /// No address space has that ID.
    #[error("unknown address space")]
    UnknownSpace,
    /// The address-space ID lies outside the geometry's range.
    #[error("address-space ID outside the geometry")]
    SpaceIdOutOfRange,
    /// The address space exists with the other [`SpaceKind`].
    #[error("the address space exists with the other kind")]
    KindMismatch,
    /// The endpoint is not in that address space.
    #[error("the endpoint is not in that address space")]
    NotInSpace,
    /// An identity space has no mappings to change.
    #[error("identity address spaces have no mappings")]
    IdentitySpace,
    /// The range ends before it starts.
    #[error("range ends before it starts")]
    EmptyRange,
    /// The range lies outside the input range, or its target past the end of the address
    /// space.
    #[error("range outside what the IOMMU translates")]
    OutOfRange,
    /// The IOVA, the target or the end is not aligned on the granule.
    #[error("range not aligned on the granule")]
    Misaligned,
    /// The range touches a reserved region.
    #[error("range touches a reserved region")]
    Reserved,
    /// The range overlaps an existing mapping.
    #[error("range overlaps a mapping")]
    Overlap,
    /// The range covers only part of a mapping (mappings are removed whole).
    #[error("range would split a mapping")]
    WouldSplit,
    /// `Limits::max_domains` reached.
    #[error("address-space limit reached")]
    TooManySpaces,
    /// `Limits::max_mappings_per_domain` or `max_total_mappings` reached.
    #[error("mapping limit reached")]
    TooManyMappings,
    /// A host mapper refused (after rollback).
    #[error("host: {0}")]
    Host(#[from] HostMapError),
    /// A host address space of the request may hold a stale mapping (undoing an earlier
    /// change failed): nothing more is mapped into it until that is removed (reset).
    #[error("a host address space needs reset")]
    HostNeedsReset,
}

/// What [`Engine::attach`] changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// The endpoint was already in that space: nothing changed.
    Already,
    /// The endpoint joined the space.
    Joined {
        /// The space it left, if it was in one.
        left: Option<u32>,
        /// Whether the space it left ceased to exist (it was its last endpoint).
        left_destroyed: bool,
        /// Whether the space was created for it.
        created: bool,
    },
}

/// What [`Engine::detach`] changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detached {
    /// Whether the space ceased to exist (it was its last endpoint).
    pub destroyed: bool,
}

fn collect(table: &Table) -> Vec<Mapping> {
    table.values().copied().collect()
}

/// Host mapping records `hosts` (distinct host mappers) hold together.
fn records_of(hosts: &[Arc<dyn HostMapper>]) -> usize {
    hosts.iter().map(|h| h.records()).sum()
}

/// Every address space and endpoint of one IOMMU.
pub struct Engine {
    geometry: Geometry,
    limits: Limits,
    resv: Vec<ResvRegion>,
    /// Whether endpoints in no space are identity (else blocked).
    default_identity: bool,
    faults: Arc<dyn FaultSink>,
    ram: Vec<Mapping>,
    /// Host address spaces holding guest RAM for boot bypass (all their endpoints in no space
    /// while the default is identity).
    idle_mapped: Vec<Arc<dyn HostMapper>>,
    /// Every distinct host mapper of the registered endpoints (their records are counted
    /// against `Limits::max_host_records`).
    host_mappers: Vec<Arc<dyn HostMapper>>,
    /// Host address spaces whose cleanup failed (see [`Stale`]).
    stale: Stale,
    total_mappings: usize,
    endpoints: BTreeMap<u32, Endpoint>,
    spaces: BTreeMap<u32, Space>,
    dirty_spaces: Vec<u32>,
    dirty_endpoints: Vec<u32>,
    sync_needed: bool,
    generation: u64,
    /// How long removing access waits for devices before revoking old views.
    pin_deadline: Duration,
}

impl Engine {
    /// No endpoints and no spaces; endpoints in no space are identity when
    /// `default_identity`, else blocked. Translation faults go to `faults`.
    pub fn new(
        geometry: Geometry,
        limits: Limits,
        resv: Vec<ResvRegion>,
        default_identity: bool,
        faults: Arc<dyn FaultSink>,
    ) -> Self {
        Engine {
            geometry,
            limits,
            resv,
            default_identity,
            faults,
            ram: Vec::new(),
            idle_mapped: Vec::new(),
            host_mappers: Vec::new(),
            stale: Stale::default(),
            total_mappings: 0,
            endpoints: BTreeMap::new(),
            spaces: BTreeMap::new(),
            dirty_spaces: Vec::new(),
            dirty_endpoints: Vec::new(),
            sync_needed: false,
            generation: 0,
            pin_deadline: PIN_DEADLINE,
        }
    }

    /// The reserved regions.
    pub fn reserved_regions(&self) -> &[ResvRegion] {
        &self.resv
    }

    /// The geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Whether endpoints in no space are identity (else blocked).
    pub fn default_identity(&self) -> bool {
        self.default_identity
    }

    /// How long removing access waits for a device to let go of an old view before revoking
    /// it (default [`PIN_DEADLINE`]; see the `view` module).
    pub fn set_pin_deadline(&mut self, deadline: Duration) {
        self.pin_deadline = deadline;
    }

    #[cfg(test)]
    pub(crate) fn limits_mut(&mut self) -> &mut Limits {
        &mut self.limits
    }

    fn next_view(&mut self, space: Option<u32>) -> View {
        self.generation += 1;
        let mode = match space.and_then(|d| self.spaces.get(&d)) {
            None if self.default_identity => Mode::Bypass,
            None => Mode::Deny,
            Some(d) if d.is_identity() => Mode::Bypass,
            Some(d) => Mode::Translate(d.published.clone().unwrap_or_default()),
        };
        View::new(self.generation, mode)
    }

    /// Register an endpoint (a PCI BDF); `host` when its DMA goes through a host IOMMU.
    pub fn add_endpoint(
        &mut self,
        id: u32,
        host: Option<Arc<dyn HostMapper>>,
    ) -> Result<EndpointHandle, DomainError> {
        if self.endpoints.contains_key(&id) {
            return Err(DomainError::DuplicateEndpoint(id));
        }
        if self.endpoints.len() >= self.limits.max_endpoints {
            return Err(DomainError::TooManyEndpoints(self.limits.max_endpoints));
        }
        self.generation += 1;
        let mode = if self.default_identity {
            Mode::Bypass
        } else {
            Mode::Deny
        };
        let view = View::new(self.generation, mode);
        let shared = Arc::new(EndpointShared::new(id, view, self.faults.clone()));
        if let Some(h) = &host {
            if !self.host_mappers.iter().any(|o| same_host(o, h)) {
                self.host_mappers.push(h.clone());
            }
        }
        self.endpoints.insert(
            id,
            Endpoint {
                shared: shared.clone(),
                space: None,
                host,
                dirty: false,
            },
        );
        self.sync_idle_hosts();
        Ok(EndpointHandle { shared })
    }

    /// Whether `id` is a registered endpoint.
    pub fn has_endpoint(&self, id: u32) -> bool {
        self.endpoints.contains_key(&id)
    }

    /// The space `endpoint` is in (`None` if unknown, `Some(None)` if in none).
    pub fn endpoint_space(&self, endpoint: u32) -> Option<Option<u32>> {
        self.endpoints.get(&endpoint).map(|e| e.space)
    }

    /// The mappings of `space` in IOVA order (`None` if it does not exist).
    pub fn mappings(&self, space: u32) -> Option<Vec<Mapping>> {
        self.spaces.get(&space).map(|d| collect(d.table.state()))
    }

    /// The mappings of `space` that intersect `start..=end`, in IOVA order, each whole
    /// (`None` if the space does not exist). O(log n + k), for front ends that resync a range.
    pub fn mappings_in(&self, space: u32, start: u64, end: u64) -> Option<Vec<Mapping>> {
        let t = self.spaces.get(&space)?.table.state();
        let mut out: Vec<Mapping> = t
            .range(..start)
            .next_back()
            .map(|(_, m)| *m)
            .filter(|m| m.end >= start)
            .into_iter()
            .collect();
        if start <= end {
            out.extend(t.range(start..=end).map(|(_, m)| *m));
        }
        Some(out)
    }

    /// The kind of `space` (`None` if it does not exist).
    pub fn space_kind(&self, space: u32) -> Option<SpaceKind> {
        self.spaces.get(&space).map(|d| d.kind)
    }

    /// Number of live spaces.
    pub fn space_count(&self) -> usize {
        self.spaces.len()
    }

    /// Mappings in all spaces together (what `Limits::max_total_mappings` caps).
    pub fn total_mappings(&self) -> usize {
        self.total_mappings
    }

    /// Host mapping records all host mappers hold together (what
    /// `Limits::max_host_records` caps).
    pub fn host_records(&self) -> usize {
        records_of(&self.host_mappers)
    }

    /// Estimated heap bytes held for guest-created and registered state: every space with
    /// all copies of its table, every endpoint with its view, the host mappers' records.
    /// Bounded by [`Limits::memory_bound`].
    pub fn memory_estimate(&self) -> usize {
        let spaces: usize = self
            .spaces
            .values()
            .map(|d| SPACE_BYTES + d.table.heap_estimate() + d.endpoints.capacity() * 4)
            .sum();
        spaces
            + self.endpoints.len() * ENDPOINT_BYTES
            + self.host_records().saturating_mul(HOST_RECORD_BYTES)
    }

    fn mark_space(&mut self, id: u32) {
        if let Some(d) = self.spaces.get_mut(&id) {
            if !d.dirty {
                d.dirty = true;
                self.dirty_spaces.push(id);
            }
        }
    }

    fn mark_endpoint(&mut self, id: u32) {
        if let Some(e) = self.endpoints.get_mut(&id) {
            if !e.dirty {
                e.dirty = true;
                self.dirty_endpoints.push(id);
            }
        }
    }

    /// Publish every changed view. When the changes since the last publication removed
    /// access, return only once no device still reads an old view.
    pub fn publish(&mut self) {
        for id in std::mem::take(&mut self.dirty_spaces) {
            if let Some(d) = self.spaces.get_mut(&id) {
                d.dirty = false;
                d.published = Some(d.table.publish());
                for &e in &d.endpoints {
                    if let Some(ep) = self.endpoints.get_mut(&e) {
                        if !ep.dirty {
                            ep.dirty = true;
                            self.dirty_endpoints.push(e);
                        }
                    }
                }
            }
        }
        let sync = std::mem::take(&mut self.sync_needed);
        for id in std::mem::take(&mut self.dirty_endpoints) {
            let Some(ep) = self.endpoints.get(&id) else {
                continue;
            };
            let shared = ep.shared.clone();
            let space = ep.space;
            let view = self.next_view(space);
            if let Some(ep) = self.endpoints.get_mut(&id) {
                ep.dirty = false;
            }
            shared.publish(view, sync, self.pin_deadline);
        }
    }

    /// Make endpoints in no space identity (`on`) or blocked, and publish their new views.
    pub fn set_default_identity(&mut self, on: bool) {
        if self.default_identity == on {
            return;
        }
        self.default_identity = on;
        let unattached: Vec<u32> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.space.is_none())
            .map(|(&id, _)| id)
            .collect();
        for id in unattached {
            self.mark_endpoint(id);
        }
        if !on {
            self.sync_needed = true;
        }
        self.sync_idle_hosts();
        self.publish();
    }

    /// Take every endpoint out of its space and destroy every space (the default is kept),
    /// then publish.
    pub fn reset(&mut self) {
        let attached: Vec<(u32, u32)> = self
            .endpoints
            .iter()
            .filter_map(|(&id, e)| e.space.map(|d| (id, d)))
            .collect();
        for (ep, dom) in attached {
            self.remove_from_space(ep, dom, false);
            self.mark_endpoint(ep);
        }
        self.spaces.clear();
        self.total_mappings = 0;
        self.dirty_spaces.clear();
        self.sync_needed = true;
        self.stale.retry_all();
        self.sync_idle_hosts();
        self.publish();
    }

    /// Whether another endpoint of `dom` than `ep` uses host `h`.
    fn host_shared(&self, dom: &Space, ep: u32, h: &Arc<dyn HostMapper>) -> bool {
        dom.endpoints.iter().any(|x| {
            *x != ep
                && self
                    .endpoints
                    .get(x)
                    .and_then(|e| e.host.as_ref())
                    .is_some_and(|o| same_host(o, h))
        })
    }

    /// What a host address space mirroring a space contains: its mappings, or for an
    /// identity space the identity map of guest RAM.
    fn host_contents(&self, identity: bool, table: &Table) -> Vec<Mapping> {
        if identity {
            self.ram.clone()
        } else {
            collect(table)
        }
    }

    /// Guest RAM, identity-mapped into host address spaces of identity spaces and, for boot
    /// bypass, of endpoints that are all in no space while the default is identity. A change
    /// (RAM added or removed) updates those host address spaces: regions that went away are
    /// unmapped, new ones mapped (best effort, failures logged).
    pub fn set_ram(&mut self, ranges: &[(u64, u64)]) {
        let new: Vec<Mapping> = ranges
            .iter()
            .filter(|(_, len)| *len > 0)
            .filter_map(|&(start, len)| {
                Some(Mapping {
                    start,
                    end: start.checked_add(len - 1)?,
                    gpa: start,
                    read: true,
                    write: true,
                    mmio: false,
                })
            })
            .collect();
        if new == self.ram {
            return;
        }
        let removed: Vec<Mapping> = self
            .ram
            .iter()
            .filter(|m| !new.contains(m))
            .copied()
            .collect();
        let added: Vec<Mapping> = new
            .iter()
            .filter(|m| !self.ram.contains(m))
            .copied()
            .collect();
        let mut hosts: Vec<Arc<dyn HostMapper>> = self.idle_mapped.clone();
        for d in self.spaces.values().filter(|d| d.is_identity()) {
            hosts.extend(d.hosts.iter().cloned());
        }
        for h in &hosts {
            self.stale.unmap_all(h, &removed);
            if self.stale.blocks(h) {
                log::warn!("virtio-iommu: new guest RAM not mapped into a host that needs reset");
                continue;
            }
            if let Err(e) = map_all(h, &added, &mut self.stale) {
                log::error!("virtio-iommu: mapping new guest RAM into a host address space: {e}");
            }
        }
        self.ram = new;
        self.sync_idle_hosts();
    }

    /// Host address spaces none of whose endpoints is in a space.
    fn idle_hosts(&self) -> Vec<Arc<dyn HostMapper>> {
        let mut out: Vec<Arc<dyn HostMapper>> = Vec::new();
        let mut busy: Vec<&Arc<dyn HostMapper>> = Vec::new();
        for e in self.endpoints.values() {
            if let (Some(h), Some(_)) = (&e.host, e.space) {
                busy.push(h);
            }
        }
        for h in self.endpoints.values().filter_map(|e| e.host.as_ref()) {
            if !busy.iter().any(|b| same_host(b, h)) && !out.iter().any(|o| same_host(o, h)) {
                out.push(h.clone());
            }
        }
        out
    }

    /// Boot bypass for host-backed endpoints: while the default is identity, every host
    /// address space none of whose endpoints is in a space holds guest RAM identity-mapped;
    /// otherwise it holds nothing. A failed map is logged and leaves that space empty (its
    /// devices cannot DMA until attached).
    fn sync_idle_hosts(&mut self) {
        if !self.default_identity && self.idle_mapped.is_empty() {
            return;
        }
        let want = if self.default_identity {
            self.idle_hosts()
        } else {
            Vec::new()
        };
        let (mut keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.idle_mapped)
            .into_iter()
            .partition(|h| want.iter().any(|w| same_host(w, h)));
        for h in gone {
            // All or nothing per container, so what we track stays what the host holds.
            if let Err(e) = unmap_all(std::slice::from_ref(&h), &self.ram) {
                log::error!("virtio-iommu: removing boot-bypass RAM from a host: {e}");
                keep.push(h);
            }
        }
        self.idle_mapped = keep;
        for h in want {
            if self.idle_mapped.iter().any(|m| same_host(m, &h)) {
                continue;
            }
            if self.stale.blocks(&h) {
                log::warn!(
                    "virtio-iommu: no boot-bypass RAM for a host address space that needs \
                     reset; its devices cannot DMA until attached"
                );
                continue;
            }
            match map_all(&h, &self.ram, &mut self.stale) {
                Ok(()) => self.idle_mapped.push(h),
                Err(e) => log::warn!(
                    "virtio-iommu: boot-bypass map of guest RAM into a host address space: \
                     {e}; its devices cannot DMA until attached"
                ),
            }
        }
    }

    /// The mappings to remove from `ep`'s host when it leaves `dom` (empty when none).
    fn host_release(&self, ep: u32, dom: u32) -> Vec<Mapping> {
        let host = self.endpoints.get(&ep).and_then(|e| e.host.as_ref());
        match (host, self.spaces.get(&dom)) {
            (Some(h), Some(d)) if !self.host_shared(d, ep, h) => {
                self.host_contents(d.is_identity(), d.table.state())
            }
            _ => Vec::new(),
        }
    }

    /// Take `ep` out of `dom`: a host no longer used by the space is dropped from it (its
    /// mappings removed best effort unless `host_done`), and an empty space is destroyed
    /// (returns whether it was).
    fn remove_from_space(&mut self, ep: u32, dom: u32, host_done: bool) -> bool {
        let host = self.endpoints.get(&ep).and_then(|e| e.host.clone());
        if let Some(e) = self.endpoints.get_mut(&ep) {
            e.space = None;
        }
        let Some(d) = self.spaces.get_mut(&dom) else {
            return false;
        };
        d.endpoints.retain(|&x| x != ep);
        if let Some(h) = host {
            let still_used = d.endpoints.iter().any(|x| {
                self.endpoints
                    .get(x)
                    .and_then(|e| e.host.as_ref())
                    .is_some_and(|o| same_host(o, &h))
            });
            if !still_used {
                d.hosts.retain(|o| !same_host(o, &h));
                if !host_done {
                    let contents = if d.is_identity() {
                        self.ram.clone()
                    } else {
                        collect(d.table.state())
                    };
                    self.stale.unmap_all(&h, &contents);
                }
            }
        }
        let mut destroyed = false;
        if d.endpoints.is_empty() {
            if let Some(gone) = self.spaces.remove(&dom) {
                self.total_mappings = self.total_mappings.saturating_sub(gone.table.len());
                destroyed = true;
            }
        }
        self.sync_needed = true;
        destroyed
    }

    /// Endpoint `endpoint` is in space `space` of `kind` (created on first use). An endpoint
    /// in another space moves: as if it left that one first.
    pub fn attach(
        &mut self,
        endpoint: u32,
        space: u32,
        kind: SpaceKind,
    ) -> Result<Attached, EngineError> {
        let Some(ep) = self.endpoints.get(&endpoint) else {
            return Err(EngineError::UnknownEndpoint);
        };
        if space < self.geometry.domain_start || space > self.geometry.domain_end {
            return Err(EngineError::SpaceIdOutOfRange);
        }
        let old = ep.space;
        let host = ep.host.clone();
        let created = match self.spaces.get(&space) {
            Some(d) if d.kind != kind => return Err(EngineError::KindMismatch),
            Some(_) if old == Some(space) => return Ok(Attached::Already),
            Some(_) => false,
            None => {
                // Moving the only endpoint out of its space frees that slot.
                let frees = old
                    .and_then(|o| self.spaces.get(&o))
                    .is_some_and(|o| o.endpoints.len() == 1);
                if self.spaces.len() - usize::from(frees) >= self.limits.max_domains {
                    virtio_dev::guest_warn!(
                        "virtio-iommu: ATTACH {endpoint:#x} -> {space}: domain limit {} reached",
                        self.limits.max_domains
                    );
                    return Err(EngineError::TooManySpaces);
                }
                true
            }
        };
        // Host address space: first drop the old space's mappings (one host space mirrors
        // one space), then replay the target's; any failure restores the previous state.
        let mut new_host = None;
        if let Some(h) = host {
            // A host endpoint in no space may hold guest RAM for boot bypass: drop it first.
            let idle = old.is_none() && self.idle_mapped.iter().any(|m| same_host(m, &h));
            let release = match old {
                Some(o) => self.host_release(endpoint, o),
                None if idle => self.ram.clone(),
                None => Vec::new(),
            };
            let known = self
                .spaces
                .get(&space)
                .is_some_and(|d| d.hosts.iter().any(|o| same_host(o, &h)));
            // Replaying into a host address space that may hold a stale mapping: refused.
            if !known && self.stale.blocks(&h) {
                log::debug!("virtio-iommu: ATTACH {endpoint:#x} -> {space}: host needs reset");
                return Err(EngineError::HostNeedsReset);
            }
            if let Err(e) = unmap_all(std::slice::from_ref(&h), &release) {
                virtio_dev::guest_warn!(
                    "virtio-iommu: ATTACH {endpoint:#x} -> {space}: host unmap: {e}"
                );
                return Err(e.into());
            }
            let target = self.spaces.get(&space);
            if !known {
                let contents = match target {
                    Some(d) => self.host_contents(d.is_identity(), d.table.state()),
                    None => self.host_contents(kind == SpaceKind::Identity, &Table::new()),
                };
                let res = match map_all(&h, &contents, &mut self.stale) {
                    Ok(()) if self.host_records() > self.limits.max_host_records => {
                        virtio_dev::guest_warn!(
                            "virtio-iommu: ATTACH {endpoint:#x} -> {space}: host mapping \
                             record limit {} reached",
                            self.limits.max_host_records
                        );
                        self.stale.unmap_all(&h, &contents);
                        Err(EngineError::TooManyMappings)
                    }
                    Ok(()) => Ok(()),
                    Err(e) => {
                        virtio_dev::guest_warn!(
                            "virtio-iommu: ATTACH {endpoint:#x} -> {space}: host: {e}"
                        );
                        Err(e.into())
                    }
                };
                if let Err(e) = res {
                    for m in &release {
                        restore(&h, m);
                    }
                    return Err(e);
                }
                new_host = Some(h.clone());
            }
            if idle {
                self.idle_mapped.retain(|m| !same_host(m, &h));
            }
        }
        let left_destroyed = match old {
            Some(o) => self.remove_from_space(endpoint, o, true),
            None => {
                // Leaving boot bypass for a paging space removes access to all guest RAM:
                // like an unmap, the publication waits for requests pinning the identity view.
                if self.default_identity && kind == SpaceKind::Paging {
                    self.sync_needed = true;
                }
                false
            }
        };
        let d = self.spaces.entry(space).or_insert_with(|| Space::new(kind));
        d.endpoints.push(endpoint);
        if let Some(h) = new_host {
            d.hosts.push(h);
        }
        if let Some(e) = self.endpoints.get_mut(&endpoint) {
            e.space = Some(space);
        }
        self.mark_space(space);
        self.mark_endpoint(endpoint);
        Ok(Attached::Joined {
            left: old,
            left_destroyed,
            created,
        })
    }

    /// Endpoint `endpoint` leaves space `space`: it is then identity or blocked, as the
    /// default says; the space ceases to exist with its last endpoint.
    pub fn detach(&mut self, endpoint: u32, space: u32) -> Result<Detached, EngineError> {
        let Some(ep) = self.endpoints.get(&endpoint) else {
            return Err(EngineError::UnknownEndpoint);
        };
        if ep.space != Some(space) {
            return Err(EngineError::NotInSpace);
        }
        if let Some(h) = ep.host.clone() {
            let release = self.host_release(endpoint, space);
            if let Err(e) = unmap_all(std::slice::from_ref(&h), &release) {
                virtio_dev::guest_warn!(
                    "virtio-iommu: DETACH {endpoint:#x} from {space}: host: {e}"
                );
                return Err(e.into());
            }
        }
        let destroyed = self.remove_from_space(endpoint, space, true);
        self.mark_endpoint(endpoint);
        self.sync_idle_hosts();
        Ok(Detached { destroyed })
    }

    /// Space `space` maps IOVA `m.start..=m.end` to guest-physical `m.gpa..` with `m`'s
    /// rights, mirrored into every host of the space (one call each).
    pub fn map(&mut self, space: u32, m: Mapping) -> Result<(), EngineError> {
        let g = self.geometry;
        let Some(d) = self.spaces.get_mut(&space) else {
            return Err(EngineError::UnknownSpace);
        };
        if d.is_identity() {
            return Err(EngineError::IdentitySpace);
        }
        if m.end < m.start {
            return Err(EngineError::EmptyRange);
        }
        if m.start < g.input_start || m.end > g.input_end {
            return Err(EngineError::OutOfRange);
        }
        let mask = g.granule() - 1;
        if m.start & mask != 0 || m.gpa & mask != 0 || m.end.wrapping_add(1) & mask != 0 {
            return Err(EngineError::Misaligned);
        }
        if m.gpa.checked_add(m.end - m.start).is_none() {
            return Err(EngineError::OutOfRange);
        }
        if self
            .resv
            .iter()
            .any(|r| r.start <= m.end && m.start <= r.end)
        {
            return Err(EngineError::Reserved);
        }
        if let Some((_, o)) = d.table.state().range(..=m.end).next_back() {
            if o.end >= m.start {
                return Err(EngineError::Overlap);
            }
        }
        if d.table.len() >= self.limits.max_mappings_per_domain
            || self.total_mappings >= self.limits.max_total_mappings
        {
            virtio_dev::guest_warn!(
                "virtio-iommu: MAP in domain {space}: mapping limit reached ({} per domain, {} \
                 in total)",
                self.limits.max_mappings_per_domain,
                self.limits.max_total_mappings
            );
            return Err(EngineError::TooManyMappings);
        }
        if !d.hosts.is_empty() {
            let Some(size) = size_of_mapping(&m) else {
                return Err(EngineError::OutOfRange);
            };
            // Every host records the mapping at least once: refuse before the host calls when
            // that alone would pass the cap, and undo them when the pieces did.
            let cap = self.limits.max_host_records;
            let over = |hosts: &[Arc<dyn HostMapper>], extra: usize| {
                records_of(hosts).saturating_add(extra) > cap
            };
            if d.hosts.iter().any(|h| self.stale.blocks(h)) {
                log::debug!("virtio-iommu: MAP in domain {space}: a host needs reset");
                return Err(EngineError::HostNeedsReset);
            }
            if over(&self.host_mappers, d.hosts.len()) {
                log::warn!(
                    "virtio-iommu: MAP in domain {space}: host mapping record limit {cap} reached"
                );
                return Err(EngineError::TooManyMappings);
            }
            for (i, h) in d.hosts.iter().enumerate() {
                if let Err(e) = h.map(m.start, size, m.gpa, prot(&m)) {
                    virtio_dev::guest_warn!(
                        "virtio-iommu: MAP {:#x}+{size:#x} in {space}: host: {e}",
                        m.start
                    );
                    for prev in &d.hosts[..i] {
                        self.stale.unmap(prev, &m);
                    }
                    return Err(e.into());
                }
            }
            if over(&self.host_mappers, 0) {
                log::warn!(
                    "virtio-iommu: MAP {:#x}+{size:#x} in domain {space}: host mapping record \
                     limit {cap} reached",
                    m.start
                );
                for h in &d.hosts {
                    self.stale.unmap(h, &m);
                }
                return Err(EngineError::TooManyMappings);
            }
        }
        d.table.insert(m);
        self.total_mappings += 1;
        self.mark_space(space);
        Ok(())
    }

    /// Space `space` unmaps every mapping inside `start..=end` and returns how many; a range
    /// that would split a mapping removes nothing.
    pub fn unmap(&mut self, space: u32, start: u64, end: u64) -> Result<usize, EngineError> {
        let Some(d) = self.spaces.get_mut(&space) else {
            return Err(EngineError::UnknownSpace);
        };
        if d.is_identity() {
            return Err(EngineError::IdentitySpace);
        }
        if end < start {
            return Err(EngineError::EmptyRange);
        }
        // One reverse walk from the last mapping starting at or before `end`: the first one
        // must not run past `end`, the last one must not start before `start`.
        let mut covered: Vec<Mapping> = Vec::new();
        for (_, m) in d.table.state().range(..=end).rev() {
            if m.end < start {
                break;
            }
            if m.end > end || m.start < start {
                return Err(EngineError::WouldSplit);
            }
            covered.push(*m);
        }
        if covered.is_empty() {
            return Ok(0);
        }
        if !d.hosts.is_empty() {
            covered.reverse();
            if let Err(e) = unmap_all(&d.hosts, &covered) {
                virtio_dev::guest_warn!(
                    "virtio-iommu: UNMAP {start:#x}..={end:#x} in {space}: host: {e}"
                );
                return Err(e.into());
            }
        }
        for m in &covered {
            d.table.remove(m.start);
        }
        self.total_mappings = self.total_mappings.saturating_sub(covered.len());
        self.sync_needed = true;
        self.mark_space(space);
        Ok(covered.len())
    }
}
