//! Endpoints, domains and their mapping tables: every ATTACH/DETACH/MAP/UNMAP rule of the spec,
//! with the exact status, bounded state, host-mapper mirroring with rollback, and publication of
//! the resulting views to the devices (once per batch).

use crate::virtio::event::FaultReporter;
use crate::engine::host::{HostMapError, HostMapper, Prot};
use crate::engine::table::{DualTable, EndpointShared, Mapping, Mode, Table, View};
use crate::virtio::spec::{Status, ATTACH_F_BYPASS, MAP_F_MASK, MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Caps on guest-created state (requests past them fail with NOMEM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Domains alive at once.
    pub max_domains: usize,
    /// Endpoints the VMM may register.
    pub max_endpoints: usize,
    /// Mappings in one domain.
    pub max_mappings_per_domain: usize,
    /// Mappings in all domains together (bounds the memory a guest can make us hold).
    pub max_total_mappings: usize,
}

/// Heap bytes of one domain apart from its table entries (map node, struct, host list).
const DOMAIN_BYTES: usize = 256 + std::mem::size_of::<Domain>();
/// Heap bytes of one endpoint (map node, shared part, its published view).
const ENDPOINT_BYTES: usize =
    256 + std::mem::size_of::<Endpoint>() + std::mem::size_of::<EndpointShared>();

impl Limits {
    /// The most heap [`Domains::memory_estimate`] can report under these limits between
    /// request batches: every live mapping in up to three table copies (the published one
    /// and a retired one at most twice as large, or a private and the published one) and
    /// four change-log slots, plus per domain 64 spare entries, a small log and its
    /// bookkeeping, plus the endpoints.
    pub fn memory_bound(&self) -> usize {
        let op = crate::engine::table::TABLE_LOG_ENTRY_BYTES;
        let entry = crate::engine::table::TABLE_BYTES_PER_ENTRY;
        let per_mapping = 3 * entry + 4 * op;
        let per_domain = DOMAIN_BYTES + 64 * entry + 256 * op + 4 * self.max_endpoints;
        self.max_total_mappings
            .saturating_mul(per_mapping)
            .saturating_add(self.max_domains.saturating_mul(per_domain))
            .saturating_add(self.max_endpoints.saturating_mul(ENDPOINT_BYTES))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_domains: 1024,
            max_endpoints: 1024,
            max_mappings_per_domain: 1 << 18,
            max_total_mappings: 1 << 20,
        }
    }
}

/// The address and domain geometry advertised in the config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Page sizes; the lowest set bit is the granule every MAP must be aligned to.
    pub page_size_mask: u64,
    /// First valid IOVA.
    pub input_start: u64,
    /// Last valid IOVA.
    pub input_end: u64,
    /// First valid domain ID.
    pub domain_start: u32,
    /// Last valid domain ID.
    pub domain_end: u32,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry {
            page_size_mask: !0xfff,
            input_start: 0,
            input_end: (1 << 48) - 1,
            domain_start: 0,
            domain_end: u32::MAX,
        }
    }
}

impl Geometry {
    /// The smallest page size (1 when the mask is empty, which config validation refuses).
    pub fn granule(&self) -> u64 {
        if self.page_size_mask == 0 {
            1
        } else {
            1u64 << self.page_size_mask.trailing_zeros()
        }
    }
}

/// Kind of a reserved region reported by PROBE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResvKind {
    /// The driver must not map it (RESV_MEM_T_RESERVED).
    Reserved,
    /// MSI doorbell (RESV_MEM_T_MSI).
    Msi,
}

/// A reserved IOVA region `start..=end`, reported to every endpoint and refused to MAP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResvRegion {
    /// First address.
    pub start: u64,
    /// Last address (inclusive).
    pub end: u64,
    /// What it is.
    pub kind: ResvKind,
}

/// Errors of the VMM-facing API (not of guest requests, which get a [`Status`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DomainError {
    /// The endpoint ID is already registered.
    #[error("endpoint {0:#x} already registered")]
    DuplicateEndpoint(u32),
    /// `Limits::max_endpoints` reached.
    #[error("too many endpoints (max {0})")]
    TooManyEndpoints(usize),
}

/// A device's handle on its endpoint: what it translates through. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EndpointHandle {
    pub(crate) shared: Arc<EndpointShared>,
}

impl EndpointHandle {
    /// Endpoint ID (PCI BDF).
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// The endpoint's current published view (lock-free).
    pub fn view(&self) -> arc_swap::Guard<Arc<View>> {
        self.shared.load()
    }

    /// Where this endpoint's faults go.
    pub fn fault_reporter(&self) -> &Arc<FaultReporter> {
        &self.shared.faults
    }
}

struct Endpoint {
    shared: Arc<EndpointShared>,
    domain: Option<u32>,
    host: Option<Arc<dyn HostMapper>>,
    dirty: bool,
}

struct Domain {
    bypass: bool,
    table: DualTable,
    endpoints: Vec<u32>,
    /// Distinct host mappers of the endpoints (one per host address space).
    hosts: Vec<Arc<dyn HostMapper>>,
    /// The table endpoint views currently share.
    published: Option<Arc<Table>>,
    dirty: bool,
}

fn same_host(a: &Arc<dyn HostMapper>, b: &Arc<dyn HostMapper>) -> bool {
    Arc::ptr_eq(a, b)
}

fn prot(m: &Mapping) -> Prot {
    Prot {
        read: m.read,
        write: m.write,
    }
}

/// Size of a mapping in bytes, or `None` for the whole 64-bit space.
fn size_of_mapping(m: &Mapping) -> Option<u64> {
    (m.end - m.start).checked_add(1)
}

fn host_map_all(h: &Arc<dyn HostMapper>, maps: &[Mapping]) -> Result<(), HostMapError> {
    for (i, m) in maps.iter().enumerate() {
        let res = match size_of_mapping(m) {
            Some(size) => h.map(m.start, size, m.gpa, prot(m)),
            None => Err(HostMapError::OutOfRange),
        };
        if let Err(e) = res {
            host_unmap_best_effort(h, &maps[..i]);
            return Err(e);
        }
    }
    Ok(())
}

fn host_unmap_best_effort(h: &Arc<dyn HostMapper>, maps: &[Mapping]) {
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
fn host_unmap_all(hosts: &[Arc<dyn HostMapper>], maps: &[Mapping]) -> Result<(), HostMapError> {
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

fn restore(h: &Arc<dyn HostMapper>, m: &Mapping) {
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

fn collect(table: &Table) -> Vec<Mapping> {
    table.values().copied().collect()
}

/// All endpoints and domains of one virtio-iommu.
pub struct Domains {
    geometry: Geometry,
    limits: Limits,
    resv: Vec<ResvRegion>,
    bypass: bool,
    bypass_flag_allowed: bool,
    mmio_allowed: bool,
    faults: Arc<FaultReporter>,
    ram: Vec<Mapping>,
    /// Host address spaces holding guest RAM for boot bypass (all their endpoints unattached
    /// while `config.bypass` is on).
    idle_mapped: Vec<Arc<dyn HostMapper>>,
    total_mappings: usize,
    endpoints: BTreeMap<u32, Endpoint>,
    domains: BTreeMap<u32, Domain>,
    dirty_domains: Vec<u32>,
    dirty_endpoints: Vec<u32>,
    sync_needed: bool,
    generation: u64,
}

impl Domains {
    /// Empty state; `bypass` is the initial `config.bypass`.
    pub fn new(
        geometry: Geometry,
        limits: Limits,
        resv: Vec<ResvRegion>,
        bypass: bool,
        faults: Arc<FaultReporter>,
    ) -> Self {
        Domains {
            geometry,
            limits,
            resv,
            bypass,
            bypass_flag_allowed: true,
            mmio_allowed: true,
            faults,
            ram: Vec::new(),
            idle_mapped: Vec::new(),
            total_mappings: 0,
            endpoints: BTreeMap::new(),
            domains: BTreeMap::new(),
            dirty_domains: Vec::new(),
            dirty_endpoints: Vec::new(),
            sync_needed: false,
            generation: 0,
        }
    }

    /// Which optional request flags the negotiated features allow.
    pub fn set_negotiated(&mut self, bypass_config: bool, mmio: bool) {
        self.bypass_flag_allowed = bypass_config;
        self.mmio_allowed = mmio;
    }

    /// The reserved regions.
    pub fn reserved_regions(&self) -> &[ResvRegion] {
        &self.resv
    }

    /// The advertised geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Current `config.bypass`.
    pub fn bypass(&self) -> bool {
        self.bypass
    }

    fn next_view(&mut self, domain: Option<u32>) -> View {
        self.generation += 1;
        let mode = match domain.and_then(|d| self.domains.get(&d)) {
            None if self.bypass => Mode::Bypass,
            None => Mode::Deny,
            Some(d) if d.bypass => Mode::Bypass,
            Some(d) => Mode::Translate(d.published.clone().unwrap_or_default()),
        };
        View {
            generation: self.generation,
            mode,
        }
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
        let view = View {
            generation: self.generation,
            mode: if self.bypass {
                Mode::Bypass
            } else {
                Mode::Deny
            },
        };
        let shared = Arc::new(EndpointShared::new(id, view, self.faults.clone()));
        self.endpoints.insert(
            id,
            Endpoint {
                shared: shared.clone(),
                domain: None,
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

    /// The domain `endpoint` is attached to (`None` if unknown, `Some(None)` if unattached).
    pub fn endpoint_domain(&self, endpoint: u32) -> Option<Option<u32>> {
        self.endpoints.get(&endpoint).map(|e| e.domain)
    }

    /// The mappings of `domain` in IOVA order (`None` if it does not exist).
    pub fn mappings(&self, domain: u32) -> Option<Vec<Mapping>> {
        self.domains.get(&domain).map(|d| collect(d.table.state()))
    }

    /// Whether `domain` is a bypass (identity) domain (`None` if it does not exist).
    pub fn domain_bypass(&self, domain: u32) -> Option<bool> {
        self.domains.get(&domain).map(|d| d.bypass)
    }

    /// Number of live domains.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Mappings in all domains together (what `Limits::max_total_mappings` caps).
    pub fn total_mappings(&self) -> usize {
        self.total_mappings
    }

    /// Estimated heap bytes held for guest-created and registered state: every domain with
    /// all copies of its table, every endpoint with its view. Bounded by
    /// [`Limits::memory_bound`].
    pub fn memory_estimate(&self) -> usize {
        let domains: usize = self
            .domains
            .values()
            .map(|d| DOMAIN_BYTES + d.table.heap_estimate() + d.endpoints.capacity() * 4)
            .sum();
        domains + self.endpoints.len() * ENDPOINT_BYTES
    }

    fn mark_domain(&mut self, id: u32) {
        if let Some(d) = self.domains.get_mut(&id) {
            if !d.dirty {
                d.dirty = true;
                self.dirty_domains.push(id);
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

    /// Publish every changed view. When the batch removed access, return only once no device
    /// still reads an old view.
    pub fn publish(&mut self) {
        for id in std::mem::take(&mut self.dirty_domains) {
            if let Some(d) = self.domains.get_mut(&id) {
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
            let domain = ep.domain;
            let view = self.next_view(domain);
            if let Some(ep) = self.endpoints.get_mut(&id) {
                ep.dirty = false;
            }
            shared.publish(view, sync);
        }
    }

    /// Change `config.bypass` and publish the unattached endpoints' new views.
    pub fn set_bypass(&mut self, on: bool) {
        if self.bypass == on {
            return;
        }
        self.bypass = on;
        let unattached: Vec<u32> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.domain.is_none())
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

    /// Device reset: detach every endpoint and destroy every domain (`config.bypass` is kept).
    pub fn reset(&mut self) {
        let attached: Vec<(u32, u32)> = self
            .endpoints
            .iter()
            .filter_map(|(&id, e)| e.domain.map(|d| (id, d)))
            .collect();
        for (ep, dom) in attached {
            self.remove_from_domain(ep, dom, false);
            self.mark_endpoint(ep);
        }
        self.domains.clear();
        self.total_mappings = 0;
        self.dirty_domains.clear();
        self.sync_needed = true;
        self.sync_idle_hosts();
        self.publish();
    }

    /// Whether another endpoint of `dom` than `ep` uses host `h`.
    fn host_shared(&self, dom: &Domain, ep: u32, h: &Arc<dyn HostMapper>) -> bool {
        dom.endpoints.iter().any(|x| {
            *x != ep
                && self
                    .endpoints
                    .get(x)
                    .and_then(|e| e.host.as_ref())
                    .is_some_and(|o| same_host(o, h))
        })
    }

    /// What a host address space mirroring a domain contains: its mappings, or for a bypass
    /// domain the identity map of guest RAM.
    fn host_contents(&self, bypass: bool, table: &Table) -> Vec<Mapping> {
        if bypass {
            self.ram.clone()
        } else {
            collect(table)
        }
    }

    /// Guest RAM, identity-mapped into host address spaces of bypass domains and, for boot
    /// bypass, of endpoints that are all unattached while `config.bypass` is on. A change
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
        for d in self.domains.values().filter(|d| d.bypass) {
            hosts.extend(d.hosts.iter().cloned());
        }
        for h in &hosts {
            host_unmap_best_effort(h, &removed);
            if let Err(e) = host_map_all(h, &added) {
                log::error!("virtio-iommu: mapping new guest RAM into a host address space: {e}");
            }
        }
        self.ram = new;
        self.sync_idle_hosts();
    }

    /// Host address spaces none of whose endpoints is attached.
    fn idle_hosts(&self) -> Vec<Arc<dyn HostMapper>> {
        let mut out: Vec<Arc<dyn HostMapper>> = Vec::new();
        let mut busy: Vec<&Arc<dyn HostMapper>> = Vec::new();
        for e in self.endpoints.values() {
            if let (Some(h), Some(_)) = (&e.host, e.domain) {
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

    /// Boot bypass for host-backed endpoints: while `config.bypass` is on, every host address
    /// space none of whose endpoints is attached holds guest RAM identity-mapped; otherwise it
    /// holds nothing. A failed map is logged and leaves that space empty (its devices cannot
    /// DMA until attached).
    fn sync_idle_hosts(&mut self) {
        if !self.bypass && self.idle_mapped.is_empty() {
            return;
        }
        let want = if self.bypass {
            self.idle_hosts()
        } else {
            Vec::new()
        };
        let (mut keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.idle_mapped)
            .into_iter()
            .partition(|h| want.iter().any(|w| same_host(w, h)));
        for h in gone {
            // All or nothing per container, so what we track stays what the host holds.
            if let Err(e) = host_unmap_all(std::slice::from_ref(&h), &self.ram) {
                log::error!("virtio-iommu: removing boot-bypass RAM from a host: {e}");
                keep.push(h);
            }
        }
        self.idle_mapped = keep;
        for h in want {
            if self.idle_mapped.iter().any(|m| same_host(m, &h)) {
                continue;
            }
            match host_map_all(&h, &self.ram) {
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
        match (host, self.domains.get(&dom)) {
            (Some(h), Some(d)) if !self.host_shared(d, ep, h) => {
                self.host_contents(d.bypass, d.table.state())
            }
            _ => Vec::new(),
        }
    }

    /// Take `ep` out of `dom`: a host no longer used by the domain is dropped from it (its
    /// mappings removed best effort unless `host_done`), and an empty domain is destroyed.
    fn remove_from_domain(&mut self, ep: u32, dom: u32, host_done: bool) {
        let host = self.endpoints.get(&ep).and_then(|e| e.host.clone());
        if let Some(e) = self.endpoints.get_mut(&ep) {
            e.domain = None;
        }
        let Some(d) = self.domains.get_mut(&dom) else {
            return;
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
                    let contents = if d.bypass {
                        self.ram.clone()
                    } else {
                        collect(d.table.state())
                    };
                    host_unmap_best_effort(&h, &contents);
                }
            }
        }
        if d.endpoints.is_empty() {
            if let Some(gone) = self.domains.remove(&dom) {
                self.total_mappings = self.total_mappings.saturating_sub(gone.table.len());
            }
        }
        self.sync_needed = true;
    }

    /// ATTACH `endpoint` to `domain` (created on first attach). An endpoint attached elsewhere
    /// moves.
    pub fn attach(&mut self, domain: u32, endpoint: u32, flags: u32) -> Status {
        if flags & !ATTACH_F_BYPASS != 0 {
            return Status::Inval;
        }
        let bypass = flags & ATTACH_F_BYPASS != 0;
        if bypass && !self.bypass_flag_allowed {
            return Status::Inval;
        }
        let Some(ep) = self.endpoints.get(&endpoint) else {
            return Status::NoEnt;
        };
        if domain < self.geometry.domain_start || domain > self.geometry.domain_end {
            return Status::Range;
        }
        let old = ep.domain;
        let host = ep.host.clone();
        match self.domains.get(&domain) {
            Some(d) if d.bypass != bypass => return Status::Inval,
            Some(_) if old == Some(domain) => return Status::Ok,
            Some(_) => {}
            None => {
                // Moving the only endpoint out of its domain frees that slot.
                let frees = old
                    .and_then(|o| self.domains.get(&o))
                    .is_some_and(|o| o.endpoints.len() == 1);
                if self.domains.len() - usize::from(frees) >= self.limits.max_domains {
                    log::warn!(
                        "virtio-iommu: ATTACH {endpoint:#x} -> {domain}: domain limit {} reached",
                        self.limits.max_domains
                    );
                    return Status::NoMem;
                }
            }
        }
        // Host address space: first drop the old domain's mappings (one host space mirrors
        // one domain), then replay the target's; any failure restores the previous state.
        let mut new_host = None;
        if let Some(h) = host {
            // An unattached endpoint's host may hold guest RAM for boot bypass: drop it first.
            let idle = old.is_none() && self.idle_mapped.iter().any(|m| same_host(m, &h));
            let release = match old {
                Some(o) => self.host_release(endpoint, o),
                None if idle => self.ram.clone(),
                None => Vec::new(),
            };
            if let Err(e) = host_unmap_all(std::slice::from_ref(&h), &release) {
                log::warn!("virtio-iommu: ATTACH {endpoint:#x} -> {domain}: host unmap: {e}");
                return e.status();
            }
            let target = self.domains.get(&domain);
            let known = target.is_some_and(|d| d.hosts.iter().any(|o| same_host(o, &h)));
            if !known {
                let contents = match target {
                    Some(d) => self.host_contents(d.bypass, d.table.state()),
                    None => self.host_contents(bypass, &Table::new()),
                };
                if let Err(e) = host_map_all(&h, &contents) {
                    log::warn!("virtio-iommu: ATTACH {endpoint:#x} -> {domain}: host: {e}");
                    for m in &release {
                        restore(&h, m);
                    }
                    return e.status();
                }
                new_host = Some(h.clone());
            }
            if idle {
                self.idle_mapped.retain(|m| !same_host(m, &h));
            }
        }
        if let Some(o) = old {
            self.remove_from_domain(endpoint, o, true);
        }
        let d = self.domains.entry(domain).or_insert_with(|| Domain {
            bypass,
            table: DualTable::new(),
            published: None,
            endpoints: Vec::new(),
            hosts: Vec::new(),
            dirty: false,
        });
        d.endpoints.push(endpoint);
        if let Some(h) = new_host {
            d.hosts.push(h);
        }
        if let Some(e) = self.endpoints.get_mut(&endpoint) {
            e.domain = Some(domain);
        }
        self.mark_domain(domain);
        self.mark_endpoint(endpoint);
        Status::Ok
    }

    /// DETACH `endpoint` from `domain`.
    pub fn detach(&mut self, domain: u32, endpoint: u32) -> Status {
        let Some(ep) = self.endpoints.get(&endpoint) else {
            return Status::NoEnt;
        };
        if ep.domain != Some(domain) {
            return Status::Inval;
        }
        if let Some(h) = ep.host.clone() {
            let release = self.host_release(endpoint, domain);
            if let Err(e) = host_unmap_all(std::slice::from_ref(&h), &release) {
                log::warn!("virtio-iommu: DETACH {endpoint:#x} from {domain}: host: {e}");
                return e.status();
            }
        }
        self.remove_from_domain(endpoint, domain, true);
        self.mark_endpoint(endpoint);
        self.sync_idle_hosts();
        Status::Ok
    }

    /// MAP `virt_start..=virt_end` -> `phys_start` in `domain`.
    pub fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    ) -> Status {
        if flags & !MAP_F_MASK != 0 || (flags & MAP_F_MMIO != 0 && !self.mmio_allowed) {
            return Status::Inval;
        }
        let g = self.geometry;
        let Some(d) = self.domains.get_mut(&domain) else {
            return Status::NoEnt;
        };
        if d.bypass || virt_end < virt_start {
            return Status::Inval;
        }
        if virt_start < g.input_start || virt_end > g.input_end {
            return Status::Range;
        }
        let mask = g.granule() - 1;
        if virt_start & mask != 0 || phys_start & mask != 0 || virt_end.wrapping_add(1) & mask != 0
        {
            return Status::Range;
        }
        if phys_start.checked_add(virt_end - virt_start).is_none() {
            return Status::Range;
        }
        if self
            .resv
            .iter()
            .any(|r| r.start <= virt_end && virt_start <= r.end)
        {
            return Status::Inval;
        }
        if let Some((_, m)) = d.table.state().range(..=virt_end).next_back() {
            if m.end >= virt_start {
                return Status::Inval;
            }
        }
        if d.table.len() >= self.limits.max_mappings_per_domain
            || self.total_mappings >= self.limits.max_total_mappings
        {
            log::warn!(
                "virtio-iommu: MAP in domain {domain}: mapping limit reached ({} per domain, {} \
                 in total)",
                self.limits.max_mappings_per_domain,
                self.limits.max_total_mappings
            );
            return Status::NoMem;
        }
        let m = Mapping {
            start: virt_start,
            end: virt_end,
            gpa: phys_start,
            read: flags & MAP_F_READ != 0,
            write: flags & MAP_F_WRITE != 0,
            mmio: flags & MAP_F_MMIO != 0,
        };
        if !d.hosts.is_empty() {
            let Some(size) = size_of_mapping(&m) else {
                return Status::Range;
            };
            for (i, h) in d.hosts.iter().enumerate() {
                if let Err(e) = h.map(m.start, size, m.gpa, prot(&m)) {
                    log::warn!(
                        "virtio-iommu: MAP {virt_start:#x}+{size:#x} in {domain}: host: {e}"
                    );
                    for prev in &d.hosts[..i] {
                        host_unmap_best_effort(prev, std::slice::from_ref(&m));
                    }
                    return e.status();
                }
            }
        }
        d.table.insert(m);
        self.total_mappings += 1;
        self.mark_domain(domain);
        Status::Ok
    }

    /// UNMAP every mapping inside `virt_start..=virt_end` of `domain`; a range that would split
    /// a mapping removes nothing and fails with RANGE.
    pub fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Status {
        let Some(d) = self.domains.get_mut(&domain) else {
            return Status::NoEnt;
        };
        if d.bypass || virt_end < virt_start {
            return Status::Inval;
        }
        // One reverse walk from the last mapping starting at or before `virt_end`: the first
        // one must not run past `virt_end`, the last one must not start before `virt_start`.
        let mut covered: Vec<Mapping> = Vec::new();
        for (_, m) in d.table.state().range(..=virt_end).rev() {
            if m.end < virt_start {
                break;
            }
            if m.end > virt_end || m.start < virt_start {
                return Status::Range;
            }
            covered.push(*m);
        }
        if covered.is_empty() {
            return Status::Ok;
        }
        if !d.hosts.is_empty() {
            covered.reverse();
            if let Err(e) = host_unmap_all(&d.hosts, &covered) {
                log::warn!(
                    "virtio-iommu: UNMAP {virt_start:#x}..={virt_end:#x} in {domain}: host: {e}"
                );
                return e.status();
            }
        }
        for m in &covered {
            d.table.remove(m.start);
        }
        self.total_mappings = self.total_mappings.saturating_sub(covered.len());
        self.sync_needed = true;
        self.mark_domain(domain);
        Status::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::host::recording::{HostOp, RecordingMapper};

    fn domains() -> Domains {
        Domains::new(
            Geometry::default(),
            Limits::default(),
            vec![ResvRegion {
                start: 0xfee0_0000,
                end: 0xfeef_ffff,
                kind: ResvKind::Msi,
            }],
            true,
            Arc::new(FaultReporter::new(Default::default(), Default::default())),
        )
    }

    const RW: u32 = MAP_F_READ | MAP_F_WRITE;

    #[test]
    fn spec_unmap_examples() {
        let mut d = domains();
        d.add_endpoint(8, None).unwrap();
        assert_eq!(d.attach(1, 8, 0), Status::Ok);
        // Granule is 4 KiB: scale the spec's examples (units of pages).
        let p = |n: u64| n * 0x1000;
        // (1) unmap(0,4) on an empty domain: OK.
        assert_eq!(d.unmap(1, p(0), p(5) - 1), Status::Ok);
        // (4) map(0,9); unmap(0,4): RANGE, nothing removed.
        assert_eq!(d.map(1, p(0), p(10) - 1, 0, RW), Status::Ok);
        assert_eq!(d.unmap(1, p(0), p(5) - 1), Status::Range);
        assert_eq!(d.mappings(1).unwrap().len(), 1);
        assert_eq!(d.unmap(1, p(0), p(10) - 1), Status::Ok);
        // (7) map(0,4), map(10,14); unmap(0,14): removes both.
        assert_eq!(d.map(1, p(0), p(5) - 1, 0, RW), Status::Ok);
        assert_eq!(d.map(1, p(10), p(15) - 1, 0, RW), Status::Ok);
        assert_eq!(d.unmap(1, p(0), p(15) - 1), Status::Ok);
        assert!(d.mappings(1).unwrap().is_empty());
        // Split at the end: map(0,9); unmap(5,14) -> RANGE.
        assert_eq!(d.map(1, p(0), p(10) - 1, 0, RW), Status::Ok);
        assert_eq!(d.unmap(1, p(5), p(15) - 1), Status::Range);
        assert_eq!(d.mappings(1).unwrap().len(), 1);
    }

    #[test]
    fn map_rules() {
        let mut d = domains();
        d.add_endpoint(8, None).unwrap();
        assert_eq!(d.map(1, 0, 0xfff, 0, RW), Status::NoEnt);
        assert_eq!(d.attach(1, 8, 0), Status::Ok);
        assert_eq!(d.map(1, 0, 0xfff, 0, 1 << 3), Status::Inval);
        assert_eq!(d.map(1, 0x1000, 0xfff, 0, RW), Status::Inval);
        assert_eq!(d.map(1, 0x800, 0x17ff, 0, RW), Status::Range);
        assert_eq!(d.map(1, 0x1000, 0x1fff, 0x800, RW), Status::Range);
        assert_eq!(d.map(1, 0x1000, 0x17ff, 0, RW), Status::Range);
        assert_eq!(d.map(1, 1 << 48, (1 << 48) + 0xfff, 0, RW), Status::Range);
        assert_eq!(d.map(1, 0, 0xfff, u64::MAX - 0xfff, RW), Status::Ok);
        assert_eq!(
            d.map(1, 0x1000, 0x2fff, u64::MAX - 0xfff, RW),
            Status::Range
        );
        assert_eq!(d.map(1, 0xfee0_0000, 0xfee0_0fff, 0, RW), Status::Inval);
        assert_eq!(d.map(1, 0x1000, 0x2fff, 0, RW), Status::Ok);
        assert_eq!(d.map(1, 0x2000, 0x2fff, 0, RW), Status::Inval);
        assert_eq!(d.map(1, 0x0, 0x1fff, 0, RW), Status::Inval);
        d.set_negotiated(true, false);
        assert_eq!(d.map(1, 0x8000, 0x8fff, 0, RW | MAP_F_MMIO), Status::Inval);
    }

    #[test]
    fn mapping_cap_gives_nomem() {
        let mut d = domains();
        d.limits.max_mappings_per_domain = 2;
        d.add_endpoint(8, None).unwrap();
        d.attach(1, 8, 0);
        assert_eq!(d.map(1, 0, 0xfff, 0, RW), Status::Ok);
        assert_eq!(d.map(1, 0x1000, 0x1fff, 0, RW), Status::Ok);
        assert_eq!(d.map(1, 0x2000, 0x2fff, 0, RW), Status::NoMem);
        // Global cap across domains; freed by UNMAP and by domain destruction.
        d.limits.max_total_mappings = 3;
        d.add_endpoint(16, None).unwrap();
        d.attach(2, 16, 0);
        assert_eq!(d.map(2, 0, 0xfff, 0, RW), Status::Ok);
        assert_eq!(d.map(2, 0x1000, 0x1fff, 0, RW), Status::NoMem);
        assert_eq!(d.unmap(1, 0, 0xfff), Status::Ok);
        assert_eq!(d.map(2, 0x1000, 0x1fff, 0, RW), Status::Ok);
        assert_eq!(d.detach(2, 16), Status::Ok);
        assert_eq!(d.map(1, 0, 0xfff, 0, RW), Status::Ok);
        assert_eq!(d.total_mappings, 2);
    }

    #[test]
    fn attach_rules_and_moves() {
        let mut d = domains();
        d.limits.max_domains = 2;
        d.add_endpoint(8, None).unwrap();
        d.add_endpoint(16, None).unwrap();
        assert_eq!(d.attach(1, 99, 0), Status::NoEnt);
        assert_eq!(d.attach(1, 8, 2), Status::Inval);
        assert_eq!(d.attach(1, 8, 0), Status::Ok);
        assert_eq!(d.attach(1, 16, ATTACH_F_BYPASS), Status::Inval);
        assert_eq!(d.attach(2, 16, ATTACH_F_BYPASS), Status::Ok);
        assert_eq!(d.attach(3, 16, 0), Status::Ok, "moving frees domain 2");
        assert_eq!(d.domain_count(), 2);
        assert_eq!(d.endpoint_domain(16), Some(Some(3)));
        // Move 8 to domain 3: domain 1 disappears with its mappings.
        d.map(1, 0, 0xfff, 0, RW);
        assert_eq!(d.attach(3, 8, 0), Status::Ok);
        assert_eq!(d.mappings(1), None);
        d.add_endpoint(24, None).unwrap();
        assert_eq!(d.attach(4, 8, 0), Status::Ok, "3 still has 16");
        assert_eq!(d.attach(5, 24, 0), Status::NoMem);
        assert_eq!(d.attach(5, 16, 0), Status::Ok, "16 was alone in 3");
        d.set_negotiated(false, true);
        assert_eq!(d.attach(5, 8, ATTACH_F_BYPASS), Status::Inval);
    }

    #[test]
    fn detach_rules() {
        let mut d = domains();
        d.add_endpoint(8, None).unwrap();
        assert_eq!(d.detach(1, 99), Status::NoEnt);
        assert_eq!(d.detach(1, 8), Status::Inval);
        d.attach(1, 8, 0);
        assert_eq!(d.detach(2, 8), Status::Inval);
        assert_eq!(d.detach(1, 8), Status::Ok);
        assert_eq!(d.domain_count(), 0);
        assert_eq!(d.map(1, 0, 0xfff, 0, RW), Status::NoEnt);
    }

    #[test]
    fn views_follow_state_after_publish() {
        let mut d = domains();
        let h = d.add_endpoint(8, None).unwrap();
        assert!(matches!(h.view().mode, Mode::Bypass));
        d.set_bypass(false);
        assert!(matches!(h.view().mode, Mode::Deny));
        d.attach(1, 8, 0);
        d.map(1, 0x1000, 0x1fff, 0x5000, MAP_F_READ);
        assert!(matches!(h.view().mode, Mode::Deny), "not yet published");
        d.publish();
        let v = h.view();
        let m = v.translate(0x1234, crate::engine::table::Access::Read).unwrap();
        assert_eq!(m.gpa_of(0x1234), 0x5234);
        drop(v);
        d.attach(2, 8, ATTACH_F_BYPASS);
        d.publish();
        assert!(matches!(h.view().mode, Mode::Bypass));
        d.reset();
        assert!(matches!(h.view().mode, Mode::Deny));
        assert_eq!(d.endpoint_domain(8), Some(None));
    }

    #[test]
    fn host_mirroring_and_rollback() {
        let mut d = domains();
        let rec = Arc::new(RecordingMapper::new());
        let host: Arc<dyn HostMapper> = rec.clone();
        d.add_endpoint(8, Some(host.clone())).unwrap();
        d.add_endpoint(16, Some(host)).unwrap();
        d.add_endpoint(24, None).unwrap();
        // Emulated endpoint's domain: no host calls.
        d.attach(1, 24, 0);
        d.map(1, 0, 0xfff, 0x9000, RW);
        assert!(rec.ops().is_empty());
        // Host endpoint joining domain 1: its mapping is replayed.
        assert_eq!(d.attach(1, 8, 0), Status::Ok);
        assert_eq!(rec.mappings().len(), 1);
        // Second endpoint on the same host: no duplicate replay.
        assert_eq!(d.attach(1, 16, 0), Status::Ok);
        assert_eq!(rec.ops().len(), 1);
        // MAP failure in the host: NOMEM, nothing inserted.
        rec.fail_call(0, HostMapError::NoSpace);
        assert_eq!(d.map(1, 0x1000, 0x1fff, 0, MAP_F_READ), Status::NoMem);
        assert_eq!(d.mappings(1).unwrap().len(), 1);
        assert_eq!(d.map(1, 0x1000, 0x1fff, 0, MAP_F_READ), Status::Ok);
        assert_eq!(
            rec.mappings().get(&0x1000),
            Some(&(
                0x1000,
                0,
                Prot {
                    read: true,
                    write: false
                }
            ))
        );
        // UNMAP failing half way: rolled back, mappings intact, status from the host.
        rec.fail_call(1, HostMapError::Failed("boom".into()));
        assert_eq!(d.unmap(1, 0, 0x1fff), Status::DevErr);
        assert_eq!(d.mappings(1).unwrap().len(), 2);
        assert_eq!(rec.mappings().len(), 2);
        assert_eq!(d.unmap(1, 0, 0xfff), Status::Ok);
        assert_eq!(rec.mappings().len(), 1);
        // DETACH of one of two endpoints sharing the host keeps the host mappings.
        assert_eq!(d.detach(1, 16), Status::Ok);
        assert_eq!(rec.mappings().len(), 1);
        // DETACH of the last one with a host failure: rolled back and still attached.
        rec.fail_call(0, HostMapError::Invalid);
        assert_eq!(d.detach(1, 8), Status::Inval);
        assert_eq!(d.endpoint_domain(8), Some(Some(1)));
        assert_eq!(d.detach(1, 8), Status::Ok);
        assert!(rec.mappings().is_empty());
        assert!(matches!(
            rec.ops().last(),
            Some(HostOp::Unmap { iova: 0x1000, .. })
        ));
        // Bypass domain: guest RAM identity-mapped once per host, removed on leaving.
        d.set_ram(&[(0, 0x10_0000), (0x100_0000, 0x20_0000)]);
        assert_eq!(d.attach(9, 8, ATTACH_F_BYPASS), Status::Ok);
        assert_eq!(
            rec.mappings().into_iter().collect::<Vec<_>>(),
            vec![
                (0, (0x10_0000, 0, Prot::RW)),
                (0x100_0000, (0x20_0000, 0x100_0000, Prot::RW))
            ]
        );
        assert_eq!(d.attach(9, 16, ATTACH_F_BYPASS), Status::Ok);
        assert_eq!(rec.mappings().len(), 2, "shared host mapped once");
        assert_eq!(d.detach(9, 8), Status::Ok);
        assert_eq!(rec.mappings().len(), 2, "still used by 16");
        assert_eq!(d.detach(9, 16), Status::Ok);
        assert_eq!(
            rec.mappings().len(),
            2,
            "config.bypass is on: unattached again, boot bypass maps RAM"
        );
        d.set_bypass(false);
        assert!(rec.mappings().is_empty());
        // ATTACH whose replay fails: endpoint stays unattached.
        d.map(1, 0x4000, 0x4fff, 0, RW);
        rec.fail_call(0, HostMapError::OutOfRange);
        assert_eq!(d.attach(1, 8, 0), Status::Range);
        assert_eq!(d.endpoint_domain(8), Some(None));
    }
}
