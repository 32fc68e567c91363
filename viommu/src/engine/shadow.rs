//! The shadowing engine: guest mappings (IOVA -> guest-physical) become host DMA mappings
//! (IOVA -> host virtual address) in one host IOMMU address space.
//!
//! [`Shadow`] implements [`HostMapper`], the hook the engine calls with guest-physical
//! addresses. For each guest mapping it composes IOVA -> GPA with the VMM's GPA -> HVA map:
//!
//! - guest RAM: split at `GuestMemoryMmap` region edges (each region is its own host mmap);
//! - a BAR of an assigned device (peer-to-peer DMA, needed by nested VFIO): resolved through a
//!   [`BarResolver`] (the VMM plugs each assigned device's BAR mmaps into a [`BarTargets`]);
//! - the MSI doorbell window and other reserved guest-physical ranges: never mapped,
//!   [`HostMapError::Invalid`] (INVAL, as the front end answers a MAP over a reserved region);
//! - anything else (a GPA that is neither RAM nor a mapped BAR): [`HostMapError::OutOfRange`]
//!   (RANGE, as it answers addresses outside what the device can map), and an IOVA
//!   outside the host IOMMU's usable ranges ([`ShadowConfig::host_iova_ranges`]) is RANGE
//!   too, before any host call.
//!
//! It then calls its [`DmaSpace`] once per piece and records exactly what it installed, so an
//! unmap removes exactly those host mappings (VFIO refuses to bisect). A failure part way
//! through a map unmaps the pieces already installed; one part way through an unmap re-maps
//! the pieces already removed; either way the error goes back unchanged to the engine (which
//! owns the guest-visible state and its rollback), and the front end turns it into the request
//! status (virtio-iommu: NoSpace -> NOMEM (ENOSPC/ENOMEM, e.g. type1's 65535-entry
//! `dma_entry_limit`), OutOfRange -> RANGE, Invalid -> INVAL (EEXIST), Failed -> DEVERR). If a
//! rollback unmap fails too (a double fault, e.g. VFIO refusing to unmap what it just mapped),
//! it is retried [`CLEANUP_TRIES`] times; if it still fails the piece is kept as stale (it
//! only ever points at memory the guest asked to map), logged at error level, and the shadow
//! maps nothing more (Failed -> DEVERR) until a later call could remove it (each map tries
//! once more, as does [`Shadow::clear`]). A failed rollback re-map (after a failed unmap) only
//! loses a mapping: logged.
//!
//! # Host calls per guest request
//! - MAP: one `DmaSpace::map` per host address space of the space, times the number of pieces
//!   (1 unless the GPA range crosses a RAM region or BAR edge). Never split into power-of-two
//!   chunks, never coalesced with neighbouring guest mappings (a later UNMAP of one of them
//!   would have to bisect a host mapping). A mapping with neither READ nor WRITE makes no call
//!   (type1 refuses it; the device can do nothing through it anyway).
//! - UNMAP: one `DmaSpace::unmap` per recorded piece of each removed mapping, per host space.
//! - Read-only guest mappings are installed read-only (`VFIO_DMA_MAP_FLAG_READ` alone);
//!   write-only ones as write-only.
//!
//! # Host address spaces
//! A legacy type1 container cannot take a group whose device is already open, so every
//! assigned group keeps its own container for the VM's lifetime and gets one [`Shadow`]. The
//! VMM registers each device with `Viommu::add_host_endpoint(bdf, shadow)`; endpoints sharing
//! a container (several devices of one group, or groups the VMM put in one container at
//! start-up) must share the same `Arc<Shadow>`: the engine dedupes host mappers by
//! pointer, so a MAP costs one call per *container* of the domain, not per endpoint. With
//! iommufd the intended shape is one IOAS per guest domain (attach the device's HWPT to the
//! domain's IOAS on ATTACH) and a `DmaSpace` per IOAS; the engine then sees a single
//! host mapper per domain whatever its endpoints.
//!
//! Costs of the other operations (per host address space; n = mappings of the space):
//! - An endpoint joining a space the container does not already mirror (virtio-iommu ATTACH):
//!   n map calls (replay); the container's previous contents (old space, if no other endpoint
//!   of that space uses the same container) are first removed: m unmap calls.
//! - Moving an endpoint between spaces: the same, unmap old + replay new; a failure part way
//!   restores the old contents and leaves the endpoint where it was.
//! - Leaving a space (DETACH): n unmap calls when the container leaves the space; none if
//!   another endpoint of the space shares it.
//! - Identity (bypass) spaces: all guest RAM mapped once per container, IOVA == GPA, one call
//!   per RAM region; leaving the space unmaps them (one call per region).
//! - Boot bypass: while endpoints in no space are identity (virtio-iommu: `config.bypass` on),
//!   a container none of whose endpoints is in a space holds all guest RAM the same way (from
//!   `Viommu::set_guest_ram` / endpoint registration); its first attach first unmaps it (one
//!   call per region), its last endpoint leaving maps it back, and blocking the default
//!   empties it.
//! - RAM added or removed (`Viommu::set_guest_ram` with the new map): one map/unmap per changed
//!   region in each identity or boot-bypass container. Paging spaces need nothing: the guest
//!   maps what it wants, and composition reads the current memory map.
//!
//! # BARs that stop decoding, move or reset
//! A guest mapping names a guest-physical address, not a BAR: DMA through it must reach
//! whatever decodes at that address *now*. When an assigned device's BAR stops decoding
//! (memory decode off, function reset / FLR, device removed) or moves, the VMM calls
//! [`Shadow::bars_changed`] (through [`BarTargets::changed`]) with the guest-physical ranges
//! whose BAR mapping appeared or disappeared, before the device stops decoding. Every recorded
//! mapping that went through the [`BarResolver`] and overlaps one of them is composed again
//! against the current map: pieces that still compose the same are left alone, changed ones
//! are unmapped and the new composition installed, and a mapping that no longer composes
//! (its GPA is now neither RAM nor a mapped BAR) is *revoked*: its host pieces are removed but
//! the guest mapping stays recorded, so it comes back when a BAR decodes there again (decode
//! on, the BAR moved back) and the guest's later UNMAP still succeeds. Re-composing at the edge
//! is the only choice: VFIO type1 has no page-request path, so a host IOMMU fault cannot be
//! turned into a lazy re-map ("refault") later. The cost is one scan of the recorded mappings
//! per BAR change plus one host call per affected piece.
//!
//! Devices not behind the vIOMMU use [`StaticMapping`](crate::engine::static_map::StaticMapping)
//! instead.

use crate::engine::arch::{X86_MSI_END, X86_MSI_START};
use crate::engine::host::vfio::HostIommuInfo;
use crate::engine::host::{DmaSpace, HostMapError, HostMapper, Prot};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, MemoryRegionAddress,
};

/// Most host pieces one guest mapping may compose into (guards against a misbehaving resolver).
pub const MAX_PIECES: usize = 64;

/// Attempts at a rollback unmap before its piece is kept as stale.
pub(crate) const CLEANUP_TRIES: usize = 3;

/// Where a guest-physical address that is not RAM may point: BARs of assigned devices that
/// are mmapped into this process.
///
/// # Safety
/// Implementations must only return host ranges that are device mmaps (or other memory shared
/// with the guest and never accessed through Rust references): the shadow maps them into the
/// host IOMMU, so the device may write there at any time.
pub unsafe trait BarResolver: Send + Sync {
    /// If `gpa` lies in a mapped BAR part: the host address of `gpa` and the number of bytes
    /// from `gpa` to the end of that part (contiguous in both spaces).
    fn resolve(&self, gpa: u64) -> Option<(u64, u64)>;
}

/// The BARs of every assigned device, as one resolver the VMM grows as it creates devices.
#[derive(Default)]
pub struct BarTargets {
    list: RwLock<Vec<Arc<dyn BarResolver>>>,
    /// Shadows told when a BAR mapping changes.
    watchers: RwLock<Vec<Weak<Shadow>>>,
}

impl BarTargets {
    /// No BARs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one device's BARs (the VMM wraps each passthrough device's BAR mmaps).
    pub fn add(&self, r: Arc<dyn BarResolver>) {
        self.list.write().unwrap_or_else(|e| e.into_inner()).push(r);
    }

    /// Remove a resolver added earlier (device unplugged).
    pub fn remove(&self, r: &Arc<dyn BarResolver>) {
        self.list
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|o| !Arc::ptr_eq(o, r));
    }

    /// Tell `shadow` (which resolves through these targets) about [`BarTargets::changed`].
    /// Held weakly: a dropped shadow is forgotten.
    pub fn watch(&self, shadow: &Arc<Shadow>) {
        let mut w = self.watchers.write().unwrap_or_else(|e| e.into_inner());
        w.retain(|s| s.strong_count() > 0);
        w.push(Arc::downgrade(shadow));
    }

    /// BAR mappings appeared or disappeared at the guest-physical `ranges` (inclusive): every
    /// watching shadow re-composes the mappings that target them ([`Shadow::bars_changed`]).
    pub fn changed(&self, ranges: &[(u64, u64)]) {
        let live: Vec<Arc<Shadow>> = self
            .watchers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for s in live {
            s.bars_changed(ranges);
        }
    }
}

// SAFETY: only returns what the resolvers it holds (each an unsafe-impl BarResolver) return.
unsafe impl BarResolver for BarTargets {
    fn resolve(&self, gpa: u64) -> Option<(u64, u64)> {
        self.list
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find_map(|r| r.resolve(gpa))
    }
}

/// Limits of one shadow: which guest-physical ranges are never mapped, which IOVAs the host can
/// translate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShadowConfig {
    /// Guest-physical ranges (inclusive) never mapped: a MAP touching one fails with INVAL.
    /// Default: the x86 MSI doorbell window.
    pub reserved_gpa: Vec<(u64, u64)>,
    /// IOVA ranges (inclusive) the host IOMMU can translate, e.g. from
    /// [`crate::engine::host::vfio::HostIommuInfo::iova_ranges`]. A mapping must lie inside one of
    /// them, else RANGE without a host call. Empty: not checked (the host still refuses).
    pub host_iova_ranges: Vec<(u64, u64)>,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        ShadowConfig {
            reserved_gpa: vec![(X86_MSI_START, X86_MSI_END)],
            host_iova_ranges: Vec::new(),
        }
    }
}

impl HostIommuInfo {
    /// The shadow limits matching this host: its IOVA ranges, the default reserved GPAs.
    pub fn shadow_config(&self) -> ShadowConfig {
        ShadowConfig {
            host_iova_ranges: self.iova_ranges.clone(),
            ..ShadowConfig::default()
        }
    }
}

/// One host mapping: IOVA `iova..iova+size` -> host virtual `host_addr..`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// First IOVA.
    pub iova: u64,
    /// Bytes.
    pub size: u64,
    /// Host virtual address of `iova`.
    pub host_addr: u64,
}

/// What one guest mapping became in the host: usually one piece, kept inline.
#[derive(Clone, Debug)]
struct Entry {
    size: u64,
    gpa: u64,
    prot: Prot,
    /// Composed through the BAR resolver (re-composed when a BAR changes; no pieces while
    /// revoked).
    bar: bool,
    first: Option<Piece>,
    rest: Vec<Piece>,
}

impl Entry {
    /// Host records it counts for (see [`HostMapper::records`]): one per piece, at least one.
    fn weight(&self) -> usize {
        1 + self.rest.len()
    }

    fn set_pieces(&mut self, pieces: Vec<Piece>) {
        let mut it = pieces.into_iter();
        self.first = it.next();
        self.rest = it.collect();
    }

    fn pieces(
        &self,
    ) -> std::iter::Chain<std::option::Iter<'_, Piece>, std::slice::Iter<'_, Piece>> {
        self.first.iter().chain(self.rest.iter())
    }
}

fn overlaps(a_start: u64, a_last: u64, b_start: u64, b_last: u64) -> bool {
    a_start <= b_last && b_start <= a_last
}

/// Mirrors guest mappings of one guest domain into one host address space (see the module doc).
pub struct Shadow {
    space: Arc<dyn DmaSpace>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    bars: Option<Arc<dyn BarResolver>>,
    config: ShadowConfig,
    recorded: Mutex<BTreeMap<u64, Entry>>,
    /// Sum of the recorded entries' weights: every insert into / removal from `recorded` goes
    /// through [`Shadow::record`] / [`Shadow::forget`] so that it stays exact.
    weight: AtomicUsize,
    /// Pieces a failed rollback left installed: while any remain, nothing more is mapped.
    stale: Mutex<Vec<Piece>>,
}

impl Shadow {
    /// A shadow installing into `space`, resolving guest RAM through `mem` (which follows RAM
    /// added later), with the default [`ShadowConfig`] and no BAR targets. Every region of
    /// `mem` is taken to be guest RAM (shared with the guest, accessed through vm-memory only):
    /// devices may DMA into whatever the guest maps there.
    pub fn new(space: Arc<dyn DmaSpace>, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> Self {
        Shadow {
            space,
            mem,
            bars: None,
            config: ShadowConfig::default(),
            recorded: Mutex::new(BTreeMap::new()),
            weight: AtomicUsize::new(0),
            stale: Mutex::new(Vec::new()),
        }
    }

    /// Resolve non-RAM guest-physical addresses through `bars` (peer-to-peer DMA).
    pub fn with_bars(mut self, bars: Arc<dyn BarResolver>) -> Self {
        self.bars = Some(bars);
        self
    }

    /// Replace the configuration.
    pub fn with_config(mut self, config: ShadowConfig) -> Self {
        self.config = config;
        self
    }

    /// The host address space.
    pub fn space(&self) -> &Arc<dyn DmaSpace> {
        &self.space
    }

    /// Number of guest mappings currently mirrored.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is mirrored.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Every host mapping installed, in IOVA order.
    pub fn host_mappings(&self) -> Vec<Piece> {
        self.lock()
            .values()
            .flat_map(|e| e.pieces().copied().collect::<Vec<_>>())
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.recorded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Try once more to remove the stale pieces; whether none remain.
    fn stale_cleared(&self) -> bool {
        let mut stale = self.stale.lock().unwrap_or_else(|e| e.into_inner());
        if stale.is_empty() {
            return true;
        }
        stale.retain(|p| self.space.unmap(p.iova, p.size).is_err());
        if stale.is_empty() {
            log::info!("viommu shadow: stale host mappings removed; mapping again");
        }
        stale.is_empty()
    }

    /// Remove `p` (rollback), retried; if it still fails, keep it as stale.
    fn undo(&self, p: &Piece) {
        let mut last = None;
        for _ in 0..CLEANUP_TRIES {
            match self.space.unmap(p.iova, p.size) {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
        }
        let e = last.map(|e| e.to_string()).unwrap_or_default();
        let mut stale = self.stale.lock().unwrap_or_else(|e| e.into_inner());
        if stale.is_empty() {
            log::error!(
                "viommu shadow: rollback unmap {:#x}+{:#x} failed {CLEANUP_TRIES} times ({e}): \
                 the host keeps a stale mapping; mapping nothing more until it is removed",
                p.iova,
                p.size
            );
        }
        stale.push(*p);
    }

    /// Record `e` at `iova` (the caller holds `rec`, this shadow's lock).
    fn record(&self, rec: &mut BTreeMap<u64, Entry>, iova: u64, e: Entry) {
        self.weight.fetch_add(e.weight(), Ordering::Relaxed);
        if let Some(old) = rec.insert(iova, e) {
            self.weight.fetch_sub(old.weight(), Ordering::Relaxed);
        }
    }

    /// Replace the host pieces of a recorded entry, keeping the record count exact (the caller
    /// holds this shadow's lock).
    fn set_pieces(&self, e: &mut Entry, pieces: Vec<Piece>) {
        self.weight.fetch_sub(e.weight(), Ordering::Relaxed);
        e.set_pieces(pieces);
        self.weight.fetch_add(e.weight(), Ordering::Relaxed);
    }

    /// Forget the entry at `iova` (the caller holds `rec`, this shadow's lock).
    fn forget(&self, rec: &mut BTreeMap<u64, Entry>, iova: u64) {
        if let Some(old) = rec.remove(&iova) {
            self.weight.fetch_sub(old.weight(), Ordering::Relaxed);
        }
    }

    /// The host pieces `iova..iova+size` -> guest-physical `gpa..` composes into, without
    /// installing anything. Errors as [`HostMapper::map`] would return them.
    pub fn compose(&self, iova: u64, size: u64, gpa: u64) -> Result<Vec<Piece>, HostMapError> {
        let (_, gpa_last) = self.check(iova, size, gpa)?;
        let mut pieces = Vec::new();
        self.compose_into(iova, size, gpa, gpa_last, true, |p, _| {
            pieces.push(p);
        })?;
        Ok(pieces)
    }

    /// Range checks common to every mapping; returns the last IOVA and last GPA.
    fn check(&self, iova: u64, size: u64, gpa: u64) -> Result<(u64, u64), HostMapError> {
        let len_m1 = size.checked_sub(1).ok_or(HostMapError::Invalid)?;
        let last = iova.checked_add(len_m1).ok_or(HostMapError::OutOfRange)?;
        let gpa_last = gpa.checked_add(len_m1).ok_or(HostMapError::OutOfRange)?;
        let ranges = &self.config.host_iova_ranges;
        if !ranges.is_empty() && !ranges.iter().any(|&(s, e)| s <= iova && last <= e) {
            virtio_dev::guest_warn!(
                "viommu shadow: IOVA {iova:#x}..={last:#x} outside the host IOMMU's ranges"
            );
            return Err(HostMapError::OutOfRange);
        }
        if let Some(&(s, e)) = self
            .config
            .reserved_gpa
            .iter()
            .find(|&&(s, e)| overlaps(gpa, gpa_last, s, e))
        {
            virtio_dev::guest_warn!(
                "viommu shadow: GPA {gpa:#x}..={gpa_last:#x} touches reserved {s:#x}..={e:#x}"
            );
            return Err(HostMapError::Invalid);
        }
        Ok((last, gpa_last))
    }

    fn compose_into(
        &self,
        iova: u64,
        size: u64,
        gpa: u64,
        gpa_last: u64,
        log: bool,
        mut push: impl FnMut(Piece, bool),
    ) -> Result<(), HostMapError> {
        let mem = self.mem.memory();
        let (mut cur_iova, mut cur_gpa, mut left) = (iova, gpa, size);
        let mut n = 0;
        while left > 0 {
            let (host_addr, avail, bar) = if let Some(r) = mem.find_region(GuestAddress(cur_gpa)) {
                let off = cur_gpa - r.start_addr().0;
                let host = r
                    .get_host_address(MemoryRegionAddress(off))
                    .map_err(|e| HostMapError::Failed(format!("GPA {cur_gpa:#x}: {e}")))?;
                (host as u64, r.len() - off, false)
            } else if let Some((host, avail)) = self
                .bars
                .as_ref()
                .and_then(|b| b.resolve(cur_gpa))
                .filter(|&(_, avail)| avail > 0)
            {
                (host, avail, true)
            } else {
                if log {
                    virtio_dev::guest_warn!(
                        "viommu shadow: GPA {cur_gpa:#x} (of {gpa:#x}..={gpa_last:#x}) is \
                         neither guest RAM nor a device BAR"
                    );
                }
                return Err(HostMapError::OutOfRange);
            };
            n += 1;
            if n > MAX_PIECES {
                virtio_dev::guest_warn!(
                    "viommu shadow: GPA {gpa:#x}..={gpa_last:#x} spans more than {MAX_PIECES} \
                     regions"
                );
                return Err(HostMapError::Failed("too many pieces".into()));
            }
            let take = left.min(avail);
            push(
                Piece {
                    iova: cur_iova,
                    size: take,
                    host_addr,
                },
                bar,
            );
            left -= take;
            // Cannot overflow: `check` bounded both ends of the whole range.
            cur_iova = cur_iova.wrapping_add(take);
            cur_gpa = cur_gpa.wrapping_add(take);
        }
        Ok(())
    }

    /// BAR mappings appeared or disappeared at the guest-physical `ranges` (inclusive):
    /// re-compose every recorded mapping that went through the BAR resolver and overlaps one
    /// of them (see "BARs that stop decoding, move or reset" in the module doc). Host failures
    /// are logged; a mapping whose old pieces cannot be removed keeps them recorded (so a later
    /// change or the guest's UNMAP retries), one whose new pieces cannot be installed stays
    /// revoked.
    pub fn bars_changed(&self, ranges: &[(u64, u64)]) {
        if ranges.is_empty() {
            return;
        }
        let mut rec = self.lock();
        let affected: Vec<u64> = rec
            .iter()
            .filter(|(_, e)| {
                let last = e.gpa.saturating_add(e.size - 1);
                e.bar && ranges.iter().any(|&(s, l)| overlaps(e.gpa, last, s, l))
            })
            .map(|(&iova, _)| iova)
            .collect();
        let (mut revoked, mut moved) = (0usize, 0usize);
        for iova in affected {
            let Some(e) = rec.get_mut(&iova) else {
                continue;
            };
            let gpa_last = e.gpa + (e.size - 1);
            let mut new = Vec::new();
            let composed = self
                .compose_into(iova, e.size, e.gpa, gpa_last, false, |p, _| new.push(p))
                .is_ok();
            if composed && e.pieces().eq(new.iter()) {
                continue;
            }
            if e.first.is_some() {
                if let Err(err) = self.unmap_entry(e) {
                    virtio_dev::guest_error!(
                        "viommu shadow: revoking {iova:#x}+{:#x} (GPA {:#x}, a BAR that \
                         changed) failed: {err}; the host keeps the old mapping",
                        e.size,
                        e.gpa
                    );
                    continue;
                }
                self.set_pieces(e, Vec::new());
            }
            if !composed {
                revoked += 1;
                continue;
            }
            match self.map_pieces(new.iter(), e.prot) {
                Ok(()) => {
                    self.set_pieces(e, new);
                    moved += 1;
                }
                Err(err) => {
                    virtio_dev::guest_error!(
                        "viommu shadow: re-mapping {iova:#x}+{:#x} onto the BAR now at GPA \
                         {:#x} failed: {err}; left revoked",
                        e.size,
                        e.gpa
                    );
                    revoked += 1;
                }
            }
        }
        if revoked + moved > 0 {
            log::debug!(
                "viommu shadow: BAR change at {ranges:x?}: {revoked} mapping(s) revoked, \
                 {moved} re-mapped"
            );
        }
    }

    /// Unmap every recorded mapping (device teardown). Stops at the first host failure, leaving
    /// the rest recorded.
    pub fn clear(&self) -> Result<(), HostMapError> {
        let mut rec = self.lock();
        if !self.stale_cleared() {
            return Err(HostMapError::Failed("stale host mappings remain".into()));
        }
        while let Some((&iova, _)) = rec.iter().next() {
            if let Some(e) = rec.get(&iova).cloned() {
                self.unmap_entry(&e)?;
            }
            self.forget(&mut rec, iova);
        }
        Ok(())
    }

    /// Install `pieces`; on failure remove the ones installed and return the error.
    fn map_pieces<'a>(
        &self,
        pieces: impl Iterator<Item = &'a Piece> + Clone,
        prot: Prot,
    ) -> Result<(), HostMapError> {
        for (i, p) in pieces.clone().enumerate() {
            // SAFETY: every host address comes from a guest RAM region of the VMM's memory map
            // or from a BarResolver (VFIO BAR mmaps): memory shared with the guest and its
            // devices, which the VMM only ever accesses volatile / through vm-memory.
            let res = unsafe { self.space.map(p.iova, p.size, p.host_addr, prot) };
            if let Err(e) = res {
                for done in pieces.take(i) {
                    self.undo(done);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Remove every piece of `e`; on failure re-map the ones removed and return the error.
    fn unmap_entry(&self, e: &Entry) -> Result<(), HostMapError> {
        for (i, p) in e.pieces().enumerate() {
            if let Err(err) = self.space.unmap(p.iova, p.size) {
                virtio_dev::guest_warn!(
                    "viommu shadow: host unmap {:#x}+{:#x} failed: {err}",
                    p.iova,
                    p.size
                );
                for done in e.pieces().take(i) {
                    // SAFETY: re-installs a mapping this shadow installed before (same origin).
                    let res =
                        unsafe { self.space.map(done.iova, done.size, done.host_addr, e.prot) };
                    if let Err(m) = res {
                        log::error!(
                            "viommu shadow: rollback re-map {:#x}+{:#x} failed: {m}",
                            done.iova,
                            done.size
                        );
                    }
                }
                return Err(err);
            }
        }
        Ok(())
    }
}

impl HostMapper for Shadow {
    fn map(&self, iova: u64, size: u64, gpa: u64, prot: Prot) -> Result<(), HostMapError> {
        let (last, gpa_last) = self.check(iova, size, gpa)?;
        let mut rec = self.lock();
        if !self.stale_cleared() {
            log::debug!("viommu shadow: map {iova:#x}+{size:#x} refused: stale host mappings");
            return Err(HostMapError::Failed(
                "stale host mapping: needs reset".into(),
            ));
        }
        if let Some((&s, e)) = rec.range(..=last).next_back() {
            if overlaps(s, s + (e.size - 1), iova, last) {
                virtio_dev::guest_warn!(
                    "viommu shadow: map {iova:#x}..={last:#x} overlaps recorded {s:#x}+{:#x}",
                    e.size
                );
                return Err(HostMapError::Invalid);
            }
        }
        let mut entry = Entry {
            size,
            gpa,
            prot,
            bar: false,
            first: None,
            rest: Vec::new(),
        };
        if prot.read || prot.write {
            self.compose_into(iova, size, gpa, gpa_last, true, |p, bar| {
                entry.bar |= bar;
                if entry.first.is_none() {
                    entry.first = Some(p);
                } else {
                    entry.rest.push(p);
                }
            })?;
            self.map_pieces(entry.pieces(), prot)?;
        }
        self.record(&mut rec, iova, entry);
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), HostMapError> {
        let mut rec = self.lock();
        match rec.get(&iova) {
            Some(e) if e.size == size => {
                self.unmap_entry(e)?;
                self.forget(&mut rec, iova);
                Ok(())
            }
            _ => {
                virtio_dev::guest_warn!(
                    "viommu shadow: unmap {iova:#x}+{size:#x} is not a recorded mapping"
                );
                Err(HostMapError::Invalid)
            }
        }
    }

    fn records(&self) -> usize {
        self.weight.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
#[path = "shadow_tests.rs"]
pub(crate) mod tests;
