//! Guest memory as a device behind the IOMMU sees it: a `vm_memory::GuestMemory` whose
//! addresses are IOVAs of one endpoint. Every access loads the endpoint's published view once
//! (lock-free), translates range by range (a buffer may span IOVA-adjacent mappings), and only
//! ever touches guest RAM. A miss fails the access and raises a fault on the event queue.

use crate::domain::EndpointHandle;
use crate::fault::Fault;
use crate::snapshot::{Access, Mapping, View};
use std::cell::Cell;
use std::iter::FusedIterator;
use std::sync::Arc;
use vm_memory::bitmap::{self, BitmapSlice};
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    GuestMemoryRegion, GuestMemoryResult, MemoryRegionAddress, Permissions, VolatileSlice,
};

#[derive(Clone, Copy)]
struct CacheEntry {
    generation: u64,
    mapping: Mapping,
}

/// Guest memory addressed by IOVA through one endpoint. Holds a last-hit cache, so it is
/// `Send` but not `Sync`: give each queue/thread its own clone.
pub struct TranslatedMemory<M: GuestMemoryBackend = GuestMemoryMmap> {
    /// Shared, so that pinning a copy per request allocates nothing.
    mem: Arc<M>,
    endpoint: EndpointHandle,
    pinned: Option<Arc<View>>,
    cache: Cell<Option<CacheEntry>>,
}

impl<M: GuestMemoryBackend> Clone for TranslatedMemory<M> {
    fn clone(&self) -> Self {
        TranslatedMemory {
            mem: self.mem.clone(),
            endpoint: self.endpoint.clone(),
            pinned: self.pinned.clone(),
            cache: Cell::new(None),
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
            mem,
            endpoint,
            pinned: None,
            cache: Cell::new(None),
        }
    }

    /// A copy that keeps the current view for its whole life: use one per request, so an UNMAP
    /// or DETACH completes only after the request finished with the old mappings.
    pub fn pin(&self) -> Self {
        TranslatedMemory {
            mem: self.mem.clone(),
            endpoint: self.endpoint.clone(),
            pinned: Some(self.endpoint.shared.load_full()),
            cache: Cell::new(self.cache.get()),
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

    /// Translate one IOVA through `view`, using and refreshing the last-hit cache; on a miss,
    /// report the fault.
    fn lookup(&self, view: &View, iova: u64, access: Access) -> Option<Mapping> {
        if let Some(c) = self.cache.get() {
            if c.generation == view.generation
                && c.mapping.contains(iova)
                && c.mapping.allows(access)
            {
                return Some(c.mapping);
            }
        }
        match view.translate(iova, access) {
            Ok(m) => {
                self.cache.set(Some(CacheEntry {
                    generation: view.generation,
                    mapping: m,
                }));
                Some(m)
            }
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

    /// Translate `iova..iova+len` into guest-physical ranges (for callers that do their own
    /// accesses, e.g. a host mapper). A miss raises a fault and returns `None`.
    pub fn translate(&self, iova: u64, len: u64, access: Access) -> Option<Vec<(u64, u64)>> {
        let view = self.view();
        let mut out = Vec::new();
        let mut cur = iova;
        let mut left = len;
        while left > 0 {
            let m = self.lookup(view.get(), cur, access)?;
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

enum ViewRef<'a> {
    Pinned(&'a View),
    Loaded(arc_swap::Guard<Arc<View>>),
}

impl ViewRef<'_> {
    fn get(&self) -> &View {
        match self {
            ViewRef::Pinned(v) => v,
            ViewRef::Loaded(g) => g,
        }
    }
}

/// The slices of one IOVA range, translated lazily; the view is loaded once at creation.
pub struct TranslatedSlices<'a, M: GuestMemoryBackend> {
    owner: &'a TranslatedMemory<M>,
    view: ViewRef<'a>,
    iova: u64,
    remaining: usize,
    access: Access,
    done: bool,
}

impl<'a, M: GuestMemoryBackend> TranslatedSlices<'a, M> {
    fn step(&mut self) -> GuestMemoryResult<VolatileSlice<'a, bitmap::MS<'a, M>>> {
        let owner: &'a TranslatedMemory<M> = self.owner;
        let iova = self.iova;
        let m = owner
            .lookup(self.view.get(), iova, self.access)
            .ok_or(GuestMemoryError::InvalidGuestAddress(GuestAddress(iova)))?;
        let in_map = (m.end - iova).saturating_add(1);
        let want = u64::try_from(self.remaining)
            .unwrap_or(u64::MAX)
            .min(in_map);
        let gpa = GuestAddress(m.gpa_of(iova));
        // Only guest RAM is reachable: a mapping to anything else fails here.
        let Some((region, off)) = owner.mem.to_region_addr(gpa) else {
            log::warn!(
                "virtio-iommu: endpoint {:#x}: IOVA {iova:#x} maps to {:#x}, not guest RAM",
                owner.endpoint.id(),
                gpa.0
            );
            return Err(GuestMemoryError::InvalidGuestAddress(gpa));
        };
        let MemoryRegionAddress(o) = off;
        let len = want.min(region.len() - o);
        // `len` <= `remaining`, a usize.
        let len = usize::try_from(len).map_err(|_| GuestMemoryError::GuestAddressOverflow)?;
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
        match self.get_slices(addr, count, access) {
            Ok(mut it) => it.all(|s| s.is_ok()),
            Err(_) => false,
        }
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'a, bitmap::BS<'a, Self::Bitmap>>> {
        Ok(TranslatedSlices {
            owner: self,
            view: self.view(),
            iova: addr.0,
            remaining: count,
            access: access_of(access),
            done: false,
        })
    }

    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        None
    }
}
