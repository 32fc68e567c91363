//! The engine's device-side read path. Guest memory as a device behind the IOMMU sees it: a
//! `vm_memory::GuestMemory` whose addresses are IOVAs of one endpoint. Every access loads the
//! endpoint's published view once (lock-free), translates range by range (a buffer may span
//! IOVA-adjacent mappings), and only ever touches guest RAM. A miss fails the access and
//! raises a fault (the front end reports it: virtio-iommu on its event queue).
//!
//! The fast path: a device pins one view per batch of work ([`TranslatedMemory::pin_view`]),
//! recent translations are cached per memory (8 entries, tagged with the view generation and
//! clipped to one RAM region), and packet-sized copies ([`TranslatedMemory::read_into`],
//! [`TranslatedMemory::write_from`]) go to the region directly, one access per mapping piece.

use crate::engine::endpoint::EndpointHandle;
use crate::engine::fault::Fault;
use crate::engine::mapping::{Access, Mapping};
use crate::engine::view::{Hold, Slot, View};
use std::cell::Cell;
use std::iter::FusedIterator;
use std::sync::Arc;
use vm_memory::bitmap::{self, BitmapSlice};
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    GuestMemoryRegion, GuestMemoryResult, MemoryRegionAddress, Permissions, VolatileSlice,
};

/// A cached translation: part of a mapping, clipped to the one guest RAM region its target
/// lies in, so that a hit needs no region lookup either.
#[derive(Clone, Copy)]
struct CacheEntry {
    generation: u64,
    mapping: Mapping,
    /// Index of the region among the backend's regions, and its first GPA.
    region: usize,
    region_gpa: u64,
}

/// Entries of the translation cache: enough for a queue's rings and the few mappings its
/// buffers come from at a time (DPDK maps hugepage by hugepage).
const CACHE_ENTRIES: usize = 8;

/// Recently used mappings, tagged with the view generation they were found in (a new
/// publication invalidates them all; generation 0, which no view has, marks a free entry).
/// The last hit is tried first; replacement is round-robin.
#[derive(Clone)]
struct Cache {
    entries: [Cell<CacheEntry>; CACHE_ENTRIES],
    last: Cell<usize>,
    next: Cell<usize>,
}

impl Cache {
    const FREE: CacheEntry = CacheEntry {
        generation: 0,
        mapping: Mapping {
            start: 1,
            end: 0,
            gpa: 0,
            read: false,
            write: false,
            mmio: false,
        },
        region: 0,
        region_gpa: 0,
    };

    fn new() -> Self {
        Cache {
            entries: std::array::from_fn(|_| Cell::new(Self::FREE)),
            last: Cell::new(0),
            next: Cell::new(0),
        }
    }

    #[inline]
    fn find(&self, generation: u64, iova: u64, access: Access) -> Option<CacheEntry> {
        let hit = |c: &CacheEntry| {
            c.generation == generation && c.mapping.contains(iova) && c.mapping.allows(access)
        };
        let last = self.last.get() % CACHE_ENTRIES;
        let c = self.entries[last].get();
        if hit(&c) {
            return Some(c);
        }
        for (i, e) in self.entries.iter().enumerate() {
            let c = e.get();
            if hit(&c) {
                self.last.set(i);
                return Some(c);
            }
        }
        None
    }

    fn insert(&self, entry: CacheEntry) {
        let i = self.next.get() % CACHE_ENTRIES;
        self.entries[i].set(entry);
        self.next.set(i + 1);
        self.last.set(i);
    }
}

/// Guest memory addressed by IOVA through one endpoint. Holds a translation cache, so it is
/// `Send` but not `Sync`: give each queue/thread its own clone.
pub struct TranslatedMemory<M: GuestMemoryBackend = GuestMemoryMmap> {
    /// Shared, so that pinning a copy per request allocates nothing.
    mem: Arc<M>,
    endpoint: EndpointHandle,
    pinned: Option<Arc<View>>,
    cache: Cache,
    /// Where this memory's accesses announce themselves to a revoker (one per memory, never
    /// shared between threads: the memory is not `Sync`).
    slot: Arc<Slot>,
}

impl<M: GuestMemoryBackend> Clone for TranslatedMemory<M> {
    fn clone(&self) -> Self {
        TranslatedMemory {
            mem: self.mem.clone(),
            endpoint: self.endpoint.clone(),
            pinned: self.pinned.clone(),
            cache: Cache::new(),
            slot: self.endpoint.shared.register_slot(),
        }
    }
}

impl<M: GuestMemoryBackend> std::fmt::Debug for TranslatedMemory<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TranslatedMemory")
            .field("endpoint", &self.endpoint.id())
            .field("pinned", &self.pinned.is_some())
            .finish_non_exhaustive()
    }
}

fn access_of(p: Permissions) -> Access {
    match p {
        Permissions::No | Permissions::Read => Access::Read,
        Permissions::Write => Access::Write,
        Permissions::ReadWrite => Access::ReadWrite,
    }
}

impl<M: GuestMemoryBackend> TranslatedMemory<M> {
    /// The view of `mem` through `endpoint`.
    pub fn new(mem: M, endpoint: EndpointHandle) -> Self {
        Self::from_shared(Arc::new(mem), endpoint)
    }

    /// The view of shared `mem` through `endpoint`.
    pub fn from_shared(mem: Arc<M>, endpoint: EndpointHandle) -> Self {
        TranslatedMemory {
            slot: endpoint.shared.register_slot(),
            mem,
            endpoint,
            pinned: None,
            cache: Cache::new(),
        }
    }

    /// A copy that keeps the current view for its whole life: use one per request, so an unmap
    /// or a detach completes only after the request finished with the old mappings (or, if
    /// it holds the view past the pin deadline, revokes it: the copy's later accesses then see
    /// the current mappings; see [`View`]).
    pub fn pin(&self) -> Self {
        TranslatedMemory {
            mem: self.mem.clone(),
            endpoint: self.endpoint.clone(),
            pinned: Some(self.endpoint.shared.load_full()),
            cache: self.cache.clone(),
            slot: self.endpoint.shared.register_slot(),
        }
    }
}

impl TranslatedMemory<GuestMemoryMmap> {
    /// The view of the memory currently in `mem` through `endpoint`.
    pub fn from_atomic(
        mem: &vm_memory::GuestMemoryAtomic<GuestMemoryMmap>,
        endpoint: EndpointHandle,
    ) -> Self {
        use vm_memory::GuestAddressSpace;
        Self::from_shared(mem.memory().into_inner(), endpoint)
    }
}

impl<M: GuestMemoryBackend> TranslatedMemory<M> {
    /// The endpoint this memory belongs to.
    pub fn endpoint(&self) -> &EndpointHandle {
        &self.endpoint
    }

    /// The underlying guest-physical memory.
    pub fn backend(&self) -> &M {
        &self.mem
    }

    fn view(&self) -> ViewRef<'_> {
        match &self.pinned {
            Some(v) => ViewRef::Pinned(v),
            None => ViewRef::Loaded(self.endpoint.shared.load()),
        }
    }

    /// Translate one IOVA through `view`, using and refreshing the cache; on a miss, report
    /// the fault. The mapping returned may be a part (clipped to one RAM region) of the
    /// domain's; with it, where its target lies (region index, region's first GPA) if known.
    fn lookup(
        &self,
        view: &View,
        iova: u64,
        access: Access,
    ) -> Option<(Mapping, Option<(usize, u64)>)> {
        self.lookup_with(view, iova, access, true)
    }

    /// [`Self::lookup`], raising the fault on a miss only when `report`.
    fn lookup_with(
        &self,
        view: &View,
        iova: u64,
        access: Access,
        report: bool,
    ) -> Option<(Mapping, Option<(usize, u64)>)> {
        if let Some(c) = self.cache.find(view.generation, iova, access) {
            return Some((c.mapping, Some((c.region, c.region_gpa))));
        }
        match view.find(iova, access) {
            Ok(m) => Some(match self.clip(view.generation, m, iova) {
                Some(c) => {
                    self.cache.insert(c);
                    (c.mapping, Some((c.region, c.region_gpa)))
                }
                None => (m, None),
            }),
            Err(_) if !report => None,
            Err(miss) => {
                self.endpoint.shared.faults.report(Fault::from_miss(
                    self.endpoint.id(),
                    iova,
                    access,
                    miss,
                ));
                None
            }
        }
    }

    /// The cache entry for `m` around `iova`: the part of `m` whose target lies in the RAM
    /// region holding `iova`'s; `None` if that is not RAM.
    fn clip(&self, generation: u64, m: Mapping, iova: u64) -> Option<CacheEntry> {
        let gpa = m.gpa_of(iova);
        let (region, r) = self
            .mem
            .iter()
            .enumerate()
            .find(|(_, r)| r.start_addr().0 <= gpa && gpa <= r.last_addr().0)?;
        let (rs, rl) = (r.start_addr().0, r.last_addr().0);
        let m_last = m.gpa.checked_add(m.end - m.start)?;
        let (lo, hi) = (m.gpa.max(rs), m_last.min(rl));
        Some(CacheEntry {
            generation,
            mapping: Mapping {
                start: m.start + (lo - m.gpa),
                end: m.start + (hi - m.gpa),
                gpa: lo,
                ..m
            },
            region,
            region_gpa: rs,
        })
    }

    /// Translate `iova..iova+len` into guest-physical ranges (for callers that do their own
    /// accesses, e.g. a host mapper). A miss raises a fault and returns `None`.
    pub fn translate(&self, iova: u64, len: u64, access: Access) -> Option<Vec<(u64, u64)>> {
        self.translate_with(self.view(), iova, len, access, true)
    }

    /// Enter `view` for one access, or the endpoint's current view if `view` was revoked
    /// (held past the pin deadline: see [`View`]).
    #[inline]
    fn enter<'v>(&'v self, view: ViewRef<'v>) -> Entered<'v> {
        if let ViewRef::Held(_) = view {
            // The round announced it once for all its accesses.
            return Entered {
                view,
                hold: Hold::Free,
            };
        }
        match view.get().enter_with(&self.slot) {
            Some(hold) => Entered { view, hold },
            None => {
                let (current, counted) = self.endpoint.shared.enter_current();
                Entered {
                    view: ViewRef::Loaded(current),
                    hold: if counted { Hold::Counted } else { Hold::Free },
                }
            }
        }
    }

    /// Copy `buf.len()` bytes at IOVA `iova` into `buf`: like `read_slice`, but each piece
    /// (one cached mapping) is a single backend access at its guest-physical address, without
    /// the generic slice iteration. A miss raises a fault.
    pub fn read_into(&self, buf: &mut [u8], iova: GuestAddress) -> GuestMemoryResult<()> {
        self.read_into_view(self.view(), buf, iova)
    }

    fn read_into_view(
        &self,
        view: ViewRef<'_>,
        buf: &mut [u8],
        iova: GuestAddress,
    ) -> GuestMemoryResult<()> {
        let entered = self.enter(view);
        let view = entered.get();
        let mut done = 0usize;
        while done < buf.len() {
            let (at, n) = self.piece(view, iova.0, done, buf.len(), Access::Read)?;
            let dst = &mut buf[done..done + n];
            match at {
                Place::Region(r, off) => r.read_slice(dst, off)?,
                Place::Gpa(gpa) => self.mem.read_slice(dst, gpa)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Write `data` at IOVA `iova`, piece by piece like [`Self::read_into`].
    pub fn write_from(&self, data: &[u8], iova: GuestAddress) -> GuestMemoryResult<()> {
        self.write_from_view(self.view(), data, iova)
    }

    fn write_from_view(
        &self,
        view: ViewRef<'_>,
        data: &[u8],
        iova: GuestAddress,
    ) -> GuestMemoryResult<()> {
        let entered = self.enter(view);
        let view = entered.get();
        let mut done = 0usize;
        while done < data.len() {
            let (at, n) = self.piece(view, iova.0, done, data.len(), Access::Write)?;
            let src = &data[done..done + n];
            match at {
                Place::Region(r, off) => r.write_slice(src, off)?,
                Place::Gpa(gpa) => self.mem.write_slice(src, gpa)?,
            }
            done += n;
        }
        Ok(())
    }

    /// The piece of `[iova + done, iova + len)` that one mapping covers: where it starts (in
    /// a known RAM region when the mapping is cached) and its length.
    #[inline]
    fn piece(
        &self,
        view: &View,
        iova: u64,
        done: usize,
        len: usize,
        access: Access,
    ) -> GuestMemoryResult<(Place<'_, M::R>, usize)> {
        let at = iova
            .checked_add(done as u64)
            .ok_or(GuestMemoryError::GuestAddressOverflow)?;
        let (m, host) = self
            .lookup(view, at, access)
            .ok_or(GuestMemoryError::InvalidGuestAddress(GuestAddress(at)))?;
        let in_map = (m.end - at).saturating_add(1);
        let n = usize::try_from(in_map)
            .unwrap_or(usize::MAX)
            .min(len - done);
        let gpa = m.gpa_of(at);
        let place = host
            .and_then(|(i, region_gpa)| {
                let r = self.mem.iter().nth(i)?;
                Some(Place::Region(r, MemoryRegionAddress(gpa - region_gpa)))
            })
            .unwrap_or(Place::Gpa(GuestAddress(gpa)));
        Ok((place, n))
    }

    /// [`Self::translate`] without raising a fault on a miss (for a device checking whether
    /// a range is mapped before relying on it).
    pub fn translate_quiet(&self, iova: u64, len: u64, access: Access) -> Option<Vec<(u64, u64)>> {
        self.translate_with(self.view(), iova, len, access, false)
    }

    /// Pin the current view for one batch of work, borrowing this memory (and sharing its
    /// translation cache, which stays warm from batch to batch) instead of copying it like
    /// [`Self::pin`]: one reference count for the whole batch. An unmap or a detach completes
    /// only after the batch dropped it.
    ///
    /// The round announces itself in this memory's slot once, at the pin, for all its
    /// accesses (see [`View`]): a removal of access past the pin deadline waits for the round
    /// to end, or to step out with [`PinnedView::outside`] for blocking work that touches no
    /// guest memory through it. A round that cannot announce itself (another is in progress
    /// on this memory) marks each access instead.
    pub fn pin_view(&self) -> PinnedView<'_, M> {
        let view = self.endpoint.shared.load_full();
        let held = Cell::new(announce(&view, &self.slot));
        PinnedView {
            mem: self,
            view,
            held,
        }
    }

    /// Generation of the view this memory translates through now (pinned, or current).
    #[inline]
    pub fn generation(&self) -> u64 {
        self.view().get().generation
    }

    /// The guest-physical pieces of `iova..iova+len`; they are used outside this call, so the
    /// view they come from can no longer be revoked (see [`View`]).
    fn translate_with(
        &self,
        view: ViewRef<'_>,
        iova: u64,
        len: u64,
        access: Access,
        report: bool,
    ) -> Option<Vec<(u64, u64)>> {
        let entered = self.enter(view);
        let view = entered.get();
        view.mark_raw();
        let mut out = Vec::new();
        let mut cur = iova;
        let mut left = len;
        while left > 0 {
            let (m, _) = self.lookup_with(view, cur, access, report)?;
            let in_map = (m.end - cur).saturating_add(1);
            let n = in_map.min(left);
            out.push((m.gpa_of(cur), n));
            left -= n;
            if left > 0 {
                cur = cur.checked_add(n)?;
            }
        }
        Some(out)
    }
}

/// Where a piece of an access lands: at an offset in a known RAM region (a cache hit), or at
/// a guest-physical address for the backend to resolve.
enum Place<'a, R> {
    Region(&'a R, MemoryRegionAddress),
    Gpa(GuestAddress),
}

enum ViewRef<'a> {
    Pinned(&'a View),
    /// Pinned, and entered once by the round for all its accesses (see
    /// [`TranslatedMemory::pin_view`]).
    Held(&'a View),
    Loaded(arc_swap::Guard<Arc<View>>),
}

/// Start a round's one announced access through `view` in `slot`: whether its accesses are
/// covered (announced, or a view that handed addresses out and is never revoked). False
/// when the slot is busy or the view was revoked: each access then enters on its own.
fn announce(view: &View, slot: &Slot) -> bool {
    match view.enter_with(slot) {
        Some(Hold::Slot(_)) | Some(Hold::Free) => true,
        Some(hold @ Hold::Counted) => {
            view.leave(hold);
            false
        }
        None => false,
    }
}

impl ViewRef<'_> {
    #[inline]
    fn get(&self) -> &View {
        match self {
            ViewRef::Pinned(v) | ViewRef::Held(v) => v,
            ViewRef::Loaded(g) => g,
        }
    }
}

/// A view entered for one access (a removal of access past the pin deadline waits for the
/// accesses in progress through the views it revokes); exits on drop.
struct Entered<'a> {
    view: ViewRef<'a>,
    /// How the access holds the view (announced in the memory's slot, counted on the view's
    /// gate, or neither for a view that handed addresses out).
    hold: Hold<'a>,
}

impl Entered<'_> {
    #[inline]
    fn get(&self) -> &View {
        self.view.get()
    }
}

impl Drop for Entered<'_> {
    #[inline]
    fn drop(&mut self) {
        self.view.get().leave(self.hold);
    }
}

/// The slices of one IOVA range, translated lazily; the view is loaded (and entered: the
/// slices are used while the iterator lives) once at creation. The slices' lifetime is the
/// memory's, not the iterator's: a caller that keeps them (blk's preadv into guest memory)
/// must keep the iterator alive as long, or a removal of access past the pin deadline stops
/// waiting for it.
pub struct TranslatedSlices<'a, M: GuestMemoryBackend> {
    owner: &'a TranslatedMemory<M>,
    view: Entered<'a>,
    iova: u64,
    remaining: usize,
    access: Access,
    done: bool,
}

impl<'a, M: GuestMemoryBackend> TranslatedSlices<'a, M> {
    fn new(
        owner: &'a TranslatedMemory<M>,
        view: ViewRef<'a>,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> Self {
        TranslatedSlices {
            owner,
            view: owner.enter(view),
            iova: addr.0,
            remaining: count,
            access: access_of(access),
            done: false,
        }
    }

    fn step(&mut self) -> GuestMemoryResult<VolatileSlice<'a, bitmap::MS<'a, M>>> {
        let owner: &'a TranslatedMemory<M> = self.owner;
        let iova = self.iova;
        let (place, want) = owner.piece(self.view.get(), iova, 0, self.remaining, self.access)?;
        // A cache hit knows the region; otherwise look it up. Only guest RAM is reachable: a
        // mapping to anything else fails here.
        let found = match place {
            Place::Region(r, off) => Some((r, off)),
            Place::Gpa(gpa) => owner.mem.to_region_addr(gpa),
        };
        let Some((region, off)) = found else {
            virtio_dev::guest_warn!(
                "virtio-iommu: endpoint {:#x}: IOVA {iova:#x} is not mapped to guest RAM",
                owner.endpoint.id(),
            );
            return Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(iova)));
        };
        let MemoryRegionAddress(o) = off;
        // `len` <= `want` <= `remaining`, a usize.
        let len = usize::try_from(region.len() - o)
            .unwrap_or(usize::MAX)
            .min(want);
        let slice = region.get_slice(off, len)?;
        self.remaining -= len;
        if self.remaining > 0 {
            self.iova = iova
                .checked_add(len as u64)
                .ok_or(GuestMemoryError::GuestAddressOverflow)?;
        }
        Ok(slice)
    }
}

impl<'a, M: GuestMemoryBackend> Iterator for TranslatedSlices<'a, M> {
    type Item = GuestMemoryResult<VolatileSlice<'a, bitmap::MS<'a, M>>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.remaining == 0 {
            return None;
        }
        let r = self.step();
        if r.is_err() {
            self.done = true;
        }
        Some(r)
    }
}

impl<M: GuestMemoryBackend> FusedIterator for TranslatedSlices<'_, M> {}

impl<'a, M: GuestMemoryBackend> GuestMemorySliceIterator<'a, bitmap::MS<'a, M>>
    for TranslatedSlices<'a, M>
{
}

impl<M: GuestMemoryBackend> GuestMemory for TranslatedMemory<M>
where
    for<'a> bitmap::MS<'a, M>: BitmapSlice,
{
    type PhysicalMemory = M;
    type Bitmap = <M::R as GuestMemoryRegion>::B;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        TranslatedSlices::new(self, self.view(), addr, count, access).all(|s| s.is_ok())
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'a, bitmap::BS<'a, Self::Bitmap>>> {
        Ok(TranslatedSlices::new(
            self,
            self.view(),
            addr,
            count,
            access,
        ))
    }

    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        None
    }
}

/// A [`TranslatedMemory`] pinned to one view for a batch of work (see
/// [`TranslatedMemory::pin_view`]): the same accesses, through that view only.
pub struct PinnedView<'a, M: GuestMemoryBackend = GuestMemoryMmap> {
    mem: &'a TranslatedMemory<M>,
    view: Arc<View>,
    /// The round holds the view announced in the memory's slot (or needs not: a raw view).
    held: Cell<bool>,
}

impl<M: GuestMemoryBackend> Drop for PinnedView<'_, M> {
    fn drop(&mut self) {
        self.withdraw();
    }
}

impl<M: GuestMemoryBackend> PinnedView<'_, M> {
    /// The view, as the accesses of the round see it.
    #[inline]
    fn view_ref(&self) -> ViewRef<'_> {
        if self.held.get() {
            ViewRef::Held(&self.view)
        } else {
            ViewRef::Pinned(&self.view)
        }
    }

    /// End the round's announcement (if it holds the slot with this view).
    fn withdraw(&self) {
        if self.held.replace(false) && self.mem.slot.holds(&self.view) {
            self.view.leave(Hold::Slot(&self.mem.slot));
        }
    }

    /// Run `f`, blocking work that touches no guest memory through this view (a flush of the
    /// backing file), with the round's announcement withdrawn: a removal of access past the
    /// pin deadline may revoke the view meanwhile, and the accesses after `f` then see the
    /// endpoint's current mappings.
    pub fn outside<R>(&self, f: impl FnOnce() -> R) -> R {
        let was = self.held.get();
        self.withdraw();
        let r = f();
        if was {
            self.held.set(announce(&self.view, &self.mem.slot));
        }
        r
    }

    /// Generation of the pinned view.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.view.generation
    }

    /// The underlying guest-physical memory.
    pub fn backend(&self) -> &M {
        &self.mem.mem
    }

    /// See [`TranslatedMemory::translate_quiet`].
    pub fn translate_quiet(&self, iova: u64, len: u64, access: Access) -> Option<Vec<(u64, u64)>> {
        self.mem
            .translate_with(self.view_ref(), iova, len, access, false)
    }

    /// See [`TranslatedMemory::read_into`].
    pub fn read_into(&self, buf: &mut [u8], iova: GuestAddress) -> GuestMemoryResult<()> {
        self.mem.read_into_view(self.view_ref(), buf, iova)
    }

    /// See [`TranslatedMemory::write_from`].
    pub fn write_from(&self, data: &[u8], iova: GuestAddress) -> GuestMemoryResult<()> {
        self.mem.write_from_view(self.view_ref(), data, iova)
    }
}

impl<M: GuestMemoryBackend> GuestMemory for PinnedView<'_, M>
where
    for<'a> bitmap::MS<'a, M>: BitmapSlice,
{
    type PhysicalMemory = M;
    type Bitmap = <M::R as GuestMemoryRegion>::B;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        TranslatedSlices::new(self.mem, self.view_ref(), addr, count, access).all(|s| s.is_ok())
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'a, bitmap::BS<'a, Self::Bitmap>>> {
        Ok(TranslatedSlices::new(
            self.mem,
            self.view_ref(),
            addr,
            count,
            access,
        ))
    }

    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        None
    }
}
