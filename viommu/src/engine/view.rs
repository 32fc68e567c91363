//! Published, immutable translation state. The engine owns the master tables and publishes one
//! [`View`] per endpoint through an `ArcSwap`; devices load it without locking.
//!
//! # Removing access
//! Removing access (unmap, leaving a space, identity off, an endpoint leaving bypass for a
//! paging space) completes only once no device can use the old view's translations any more.
//! Publishing waits for that, in two steps:
//!
//! 1. Until every reader let go of the old views (a request drops its pin when done), at
//!    most the pin deadline ([`PIN_DEADLINE`] unless the engine was given another).
//! 2. Past it (a stuck backend: a blk request holding its pin across file I/O that does not
//!    return), the old views are *revoked*: from then on every access through a revoked view
//!    translates through the endpoint's current view instead (it sees the removal: an access
//!    to what was unmapped fails, one to what is still mapped works, so the request can still
//!    complete with an error status). Publishing then waits for the accesses already in
//!    progress through the old views (each access enters the view's gate for its duration,
//!    memory copies and slices handed to `vm-memory` alike), which does not depend on the
//!    backend, and completes. This is logged at error level.
//!
//! # What an access costs
//! A device's memory (`TranslatedMemory`, and the `PinnedView`s it lends for rounds of work)
//! owns a [`Slot`], registered with the endpoint once when the memory is created: an access
//! through it stores the view's address in the slot, checks the view's gate word with a plain
//! load, and clears the slot at its end. No atomic read-modify-write, and the slot's cache line
//! is the device thread's own. The revoker pays instead: it sets the revoked bit, runs the heavy
//! side of an asymmetric barrier ([`super::barrier`], one `membarrier` system call), and waits
//! until no slot names the view. An access either saw the revocation or is seen by the revoker:
//! the same guarantee as counting every access on the shared gate word, which the accesses
//! without a slot of their own still do (one nested in another on the same memory, those
//! that fall back to the current view of a revoked one, `vm-memory`'s `Iommu` glue).
//!
//! A device's round of work (`TranslatedMemory::pin_view`, one blk request or one net batch)
//! announces itself once at the pin and withdraws at its end: all its accesses, including
//! the file I/O blk does straight into guest memory with slices taken from the view, count as
//! in progress. Blocking work that touches no guest memory (blk's flush) runs in
//! `PinnedView::outside`, with the announcement withdrawn, so a revocation past the deadline
//! does not wait for it; the round's later accesses then see the current mappings.
//!
//! A view from which guest-physical addresses were taken out (`TranslatedMemory::translate`,
//! `translate_quiet`, [`View::translate`]: a device's prepared rings, a host mapper) cannot
//! be revoked that way, since its holder reaches memory without entering the gate: for it,
//! step 2 waits for the holder to let go, however long (logged). So the removal never
//! completes while a device can still use an old translation; a device that takes addresses
//! out of a view must not hold its pin across blocking work. (Accesses through such a view
//! are not counted either: one atomic load instead of two read-modify-writes per access.)

use super::fault::FaultSink;
use super::mapping::{Access, Mapping, Miss};
use super::table::{lookup, Table};
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// How long removing access waits for a device to let go of an old view before revoking it.
pub const PIN_DEADLINE: Duration = Duration::from_secs(5);

/// Set in [`Gate::state`] once the view is revoked.
const REVOKED: usize = 1 << (usize::BITS - 1);
/// Set in [`Gate::state`] once guest-physical addresses were handed out of the view (it can
/// no longer be revoked, so its accesses need not be counted either).
const RAW: usize = 1 << (usize::BITS - 2);
/// The count of accesses in progress in [`Gate::state`].
const COUNT: usize = !(REVOKED | RAW);

/// Accesses in progress through one view, and whether it was revoked or handed addresses out
/// (see the module doc). One atomic word: an access that enters after the revocation sees it,
/// one that entered before is counted; [`RAW`] is only ever set from inside a counted access,
/// so the revoker, which waits for those, always learns of it.
#[derive(Debug, Default)]
struct Gate {
    state: AtomicUsize,
}

/// The access in progress through one device memory (see the module doc): the address of the
/// view it goes through, 0 when none. Written only by the thread owning the memory, read by a
/// revoker; on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct Slot {
    view: AtomicUsize,
}

impl Slot {
    /// Whether an access of the owner is in progress (the owner's own view of it).
    #[inline]
    fn busy(&self) -> bool {
        self.view.load(Ordering::Relaxed) != 0
    }

    /// Whether the owner's access in progress goes through `view`.
    #[inline]
    pub(crate) fn holds(&self, view: &View) -> bool {
        self.view.load(Ordering::Relaxed) == view as *const View as usize
    }

    /// End the access in progress: its memory operations happen before a revoker sees it end.
    #[inline]
    fn clear(&self) {
        self.view.store(0, Ordering::Release);
    }
}

/// How one access holds its view (what ends it).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Hold<'s> {
    /// Announced in the memory's [`Slot`]: clear it.
    Slot(&'s Slot),
    /// Counted on the view's gate: [`View::exit`].
    Counted,
    /// Not counted: the view handed addresses out and is never revoked.
    Free,
}

/// How an endpoint's accesses are treated.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Blocked (in no address space while unattached endpoints are blocked): every access
    /// faults with [`Miss::NoDomain`].
    Deny,
    /// Identity (bypass): in an identity space, or in none while unattached endpoints are
    /// identity-mapped.
    Bypass,
    /// In a paging address space: translate through its table.
    Translate(Arc<Table>),
}

/// What one endpoint sees at one point in time. Removing access waits for the devices holding
/// the old view, at most the pin deadline ([`PIN_DEADLINE`] by default); past it the old view
/// is revoked (its later accesses see the current mappings) unless addresses were taken out
/// of it with [`View::translate`] or `TranslatedMemory::translate*`, in which case the wait
/// goes on until the holder lets go.
#[derive(Debug)]
pub struct View {
    /// Increases with every publication (caches compare it).
    pub generation: u64,
    /// Translation mode.
    pub mode: Mode,
    gate: Gate,
}

impl View {
    /// A view of `mode`, publication number `generation`.
    pub(crate) fn new(generation: u64, mode: Mode) -> Self {
        View {
            generation,
            mode,
            gate: Gate::default(),
        }
    }

    /// The mapping that serves `iova` for `access`. Its guest-physical address is used outside
    /// any access of the engine's, so the view can no longer be revoked (see the module doc).
    #[inline]
    pub fn translate(&self, iova: u64, access: Access) -> Result<Mapping, Miss> {
        let Some(counted) = self.try_enter() else {
            // Revoked: this view no longer translates.
            return Err(Miss::NoMapping);
        };
        self.mark_raw();
        let r = self.find(iova, access);
        if counted {
            self.exit();
        }
        r
    }

    /// [`Self::translate`] for an access that entered the view (or hands the address out
    /// and said so with [`Self::mark_raw`]).
    #[inline]
    pub(crate) fn find(&self, iova: u64, access: Access) -> Result<Mapping, Miss> {
        match &self.mode {
            Mode::Bypass => Ok(Mapping::IDENTITY),
            Mode::Deny => Err(Miss::NoDomain),
            Mode::Translate(t) => match lookup(t, iova) {
                Some(m) if m.allows(access) => Ok(*m),
                _ => Err(Miss::NoMapping),
            },
        }
    }

    /// Start one access through the view: `Some(true)` if counted (end it with
    /// [`Self::exit`]), `Some(false)` if the view handed addresses out (never revoked: nothing
    /// to count, a removal waits for every holder), `None` (nothing started) if revoked.
    #[inline]
    pub(crate) fn try_enter(&self) -> Option<bool> {
        if self.gate.state.load(Ordering::Relaxed) & RAW != 0 {
            return Some(false);
        }
        let s = self.gate.state.fetch_add(1, Ordering::Acquire);
        if s & REVOKED != 0 {
            self.gate.state.fetch_sub(1, Ordering::Release);
            return (s & RAW != 0).then_some(false);
        }
        Some(true)
    }

    /// End an access [`Self::try_enter`] counted.
    #[inline]
    pub(crate) fn exit(&self) {
        self.gate.state.fetch_sub(1, Ordering::Release);
    }

    /// Start one access through the view announced in `slot` (the accessing memory's own) if
    /// it is free, else counted on the gate like [`Self::try_enter`]; `None` (nothing started)
    /// if revoked. End it with [`Self::leave`].
    #[inline]
    pub(crate) fn enter_with<'s>(&self, slot: &'s Slot) -> Option<Hold<'s>> {
        if self.gate.state.load(Ordering::Relaxed) & RAW != 0 {
            return Some(Hold::Free);
        }
        if slot.busy() {
            // Nested in another access of the same memory: count this one.
            return self
                .try_enter()
                .map(|counted| if counted { Hold::Counted } else { Hold::Free });
        }
        slot.view
            .store(self as *const View as usize, Ordering::Relaxed);
        // Pairs with the revoker's heavy barrier: it sees the slot, or we see REVOKED.
        super::barrier::light();
        let s = self.gate.state.load(Ordering::Acquire);
        if s & REVOKED != 0 {
            slot.clear();
            return (s & RAW != 0).then_some(Hold::Free);
        }
        Some(Hold::Slot(slot))
    }

    /// End an access started with [`Self::enter_with`].
    #[inline]
    pub(crate) fn leave(&self, hold: Hold<'_>) {
        match hold {
            Hold::Slot(slot) => slot.clear(),
            Hold::Counted => self.exit(),
            Hold::Free => {}
        }
    }

    /// Guest-physical addresses from this view are used outside the engine's accesses. Only
    /// from inside an access started with [`Self::try_enter`].
    #[inline]
    pub(crate) fn mark_raw(&self) {
        if self.gate.state.load(Ordering::Relaxed) & RAW == 0 {
            self.gate.state.fetch_or(RAW, Ordering::Release);
        }
    }

    /// Whether the view was revoked (held past the pin deadline by a device) while it could
    /// be: its accesses now go through the endpoint's current view.
    pub fn revoked(&self) -> bool {
        let s = self.gate.state.load(Ordering::Acquire);
        s & REVOKED != 0 && s & RAW == 0
    }

    /// Revoke; whether addresses had been handed out (then the revocation does not hold).
    fn revoke(&self) -> bool {
        self.gate.state.fetch_or(REVOKED, Ordering::SeqCst) & RAW != 0
    }

    fn accesses(&self) -> usize {
        self.gate.state.load(Ordering::Acquire) & COUNT
    }

    fn raw(&self) -> bool {
        self.gate.state.load(Ordering::Acquire) & RAW != 0
    }
}

/// The part of an endpoint that devices share with the engine.
#[derive(Debug)]
pub struct EndpointShared {
    /// Endpoint ID (PCI BDF).
    pub id: u32,
    view: ArcSwap<View>,
    /// Views replaced since the last synchronous publication that a device may still hold
    /// (pinned for a request): a later unmap must wait for them too, not only for the view it
    /// replaces. Holds only views still referenced, so it is bounded by what devices pin.
    retired: Mutex<Vec<Arc<View>>>,
    /// The slots of the device memories translating through this endpoint (see the module
    /// doc); dead ones are pruned when a memory registers.
    slots: Mutex<Vec<Weak<Slot>>>,
    /// Where translation faults go.
    pub(crate) faults: Arc<dyn FaultSink>,
}

/// How long to wait for readers before logging that a device holds an old view.
const SLOW_READER: Duration = Duration::from_millis(100);

impl EndpointShared {
    pub(crate) fn new(id: u32, initial: View, faults: Arc<dyn FaultSink>) -> Self {
        // The revoker's barrier needs the process registered before any thread is confined.
        super::barrier::init();
        EndpointShared {
            id,
            view: ArcSwap::from_pointee(initial),
            retired: Mutex::new(Vec::new()),
            slots: Mutex::new(Vec::new()),
            faults,
        }
    }

    /// A slot for a new device memory translating through this endpoint (one per
    /// `TranslatedMemory`, created with it: not per access or per pin round).
    pub(crate) fn register_slot(&self) -> Arc<Slot> {
        let slot = Arc::new(Slot::default());
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|s| s.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
        slot
    }

    /// Whether an access announced in a slot is in progress through `view`.
    fn slot_holds(&self, view: &Arc<View>) -> bool {
        let at = Arc::as_ptr(view) as usize;
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .filter_map(Weak::upgrade)
            .any(|s| s.view.load(Ordering::Acquire) == at)
    }

    /// Borrow the current view (lock-free; keep it short).
    pub fn load(&self) -> arc_swap::Guard<Arc<View>> {
        self.view.load()
    }

    /// Take a reference on the current view (for a device pinning it over one request).
    pub fn load_full(&self) -> Arc<View> {
        self.view.load_full()
    }

    /// The current view, entered for one access, and whether that access is counted (the
    /// caller then exits it). Loops only if a publication and a revocation both happened
    /// between loading and entering.
    pub(crate) fn enter_current(&self) -> (arc_swap::Guard<Arc<View>>, bool) {
        loop {
            let v = self.view.load();
            if let Some(counted) = v.try_enter() {
                return (v, counted);
            }
            std::hint::spin_loop();
        }
    }

    /// Publish `view`; when `sync`, return only once no device can use any earlier view (a
    /// request may have pinned one published before the previous one): readers let go within
    /// `deadline`, or the views were revoked (see the module doc).
    pub(crate) fn publish(&self, view: View, sync: bool, deadline: Duration) {
        let old = self.view.swap(Arc::new(view));
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.push(old);
        if sync {
            let until = Instant::now().checked_add(deadline);
            for v in retired.drain(..) {
                self.wait_unshared(v, until, deadline);
            }
        } else {
            retired.retain(|v| Arc::strong_count(v) > 1);
        }
    }

    /// Wait until no device can use `old`: it is the last reference (`ArcSwap::swap` has
    /// already converted every outstanding lock-free guard into a counted reference, so the
    /// strong count is exact), or, past `until`, it is revoked and no access through it is in
    /// progress (counted on its gate or announced in a slot).
    fn wait_unshared(&self, old: Arc<View>, until: Option<Instant>, deadline: Duration) {
        let endpoint = self.id;
        let what = ViewOf(endpoint);
        if wait_for(|| Arc::strong_count(&old) == 1, until, &what) {
            return;
        }
        let raw = old.revoke();
        if !raw && !super::barrier::heavy() {
            log::error!(
                "virtio-iommu: endpoint {endpoint:#x}: membarrier failed; waiting for the \
                 device holding an old view to let go instead of revoking it"
            );
            wait_for(|| Arc::strong_count(&old) == 1, None, &what);
            return;
        }
        if !raw {
            wait_for(
                || old.accesses() == 0 && !self.slot_holds(&old),
                None,
                &what,
            );
        }
        if !raw && !old.raw() {
            log::error!(
                "virtio-iommu: endpoint {endpoint:#x}: a device held an old view past \
                 {deadline:?} (a stuck backend?); revoked it: its further accesses see the \
                 current mappings"
            );
            return;
        }
        log::error!(
            "virtio-iommu: endpoint {endpoint:#x}: a device held an old view past {deadline:?} \
             and took addresses out of it: cannot revoke, waiting for it to let go"
        );
        wait_for(|| Arc::strong_count(&old) == 1, None, &what);
    }
}

/// "view of endpoint E", for the logs.
struct ViewOf(u32);

impl std::fmt::Display for ViewOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "view of endpoint {:#x}", self.0)
    }
}

/// Spin, then yield, until `done()` (true) or `until` passed (false); log once if a reader
/// is slow.
fn wait_for(done: impl Fn() -> bool, until: Option<Instant>, what: &dyn std::fmt::Display) -> bool {
    let mut spins = 0u32;
    let mut started: Option<Instant> = None;
    let mut warned = false;
    while !done() {
        if spins < 64 {
            spins += 1;
            std::hint::spin_loop();
            continue;
        }
        let t0 = *started.get_or_insert_with(Instant::now);
        if until.is_some_and(|u| Instant::now() >= u) {
            return false;
        }
        if !warned && t0.elapsed() > SLOW_READER {
            log::warn!(
                "virtio-iommu: a device still uses an old {what} after {SLOW_READER:?}; \
                 waiting for it"
            );
            warned = true;
        }
        std::thread::yield_now();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fault::Fault;

    /// A sink that drops every fault.
    #[derive(Debug)]
    struct NoSink;

    impl FaultSink for NoSink {
        fn report(&self, _: Fault) -> bool {
            false
        }
    }

    fn map(start: u64, end: u64, gpa: u64) -> Mapping {
        Mapping::read_only(start, end, gpa)
    }

    #[test]
    fn view_checks_rights() {
        let mut t = Table::new();
        t.insert(0, map(0, 0xfff, 0));
        let v = View::new(1, Mode::Translate(Arc::new(t)));
        assert!(v.translate(0x10, Access::Read).is_ok());
        assert_eq!(v.translate(0x10, Access::Write), Err(Miss::NoMapping));
        assert_eq!(v.translate(0x1000, Access::Read), Err(Miss::NoMapping));
        let d = View::new(1, Mode::Deny);
        assert_eq!(d.translate(0, Access::Read), Err(Miss::NoDomain));
    }

    #[test]
    fn a_view_held_past_the_deadline_is_revoked_unless_addresses_left_it() {
        let faults: Arc<dyn FaultSink> = Arc::new(NoSink);
        for raw in [false, true] {
            let ep = Arc::new(EndpointShared::new(
                1,
                View::new(0, Mode::Bypass),
                faults.clone(),
            ));
            let pinned = ep.load_full();
            if raw {
                assert!(pinned.translate(0x1000, Access::Read).is_ok());
            }
            // An access in progress when the deadline passes is waited for; with addresses
            // taken out of the view, so is the pin itself (dropped 150 ms after the access).
            let counted = pinned.try_enter();
            assert_eq!(
                counted,
                Some(!raw),
                "accesses of a raw view are not counted"
            );
            let p2 = pinned.clone();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(150));
                if counted == Some(true) {
                    p2.exit();
                }
                std::thread::sleep(Duration::from_millis(150));
                drop(p2);
            });
            let held = if raw { None } else { Some(pinned.clone()) };
            let weak = Arc::downgrade(&pinned);
            drop(pinned);
            let t0 = Instant::now();
            ep.publish(View::new(1, Mode::Deny), true, Duration::from_millis(20));
            let took = t0.elapsed();
            assert!(took >= Duration::from_millis(150), "{took:?}");
            match held {
                Some(v) => {
                    assert!(took < Duration::from_millis(300), "{took:?}");
                    assert!(v.revoked());
                    assert_eq!(v.try_enter(), None, "a revoked view admits no access");
                    assert!(v.translate(0, Access::Read).is_err());
                }
                None => {
                    assert!(took >= Duration::from_millis(300), "{took:?}");
                    assert!(weak.upgrade().is_none());
                }
            }
            assert!(!ep.load().revoked());
            t.join().unwrap();
        }
    }

    #[test]
    fn an_access_announced_in_a_slot_holds_off_the_revoker_and_none_starts_after() {
        let faults: Arc<dyn FaultSink> = Arc::new(NoSink);
        let ep = Arc::new(EndpointShared::new(1, View::new(0, Mode::Bypass), faults));
        let slot = ep.register_slot();
        let pinned = ep.load_full();
        // Announced in the slot, not on the gate; a nested access is counted on the gate.
        assert!(matches!(pinned.enter_with(&slot), Some(Hold::Slot(s)) if std::ptr::eq(s, &*slot)));
        assert_eq!(pinned.accesses(), 0);
        assert!(matches!(pinned.enter_with(&slot), Some(Hold::Counted)));
        assert_eq!(pinned.accesses(), 1);
        pinned.leave(Hold::Counted);
        let (p2, s2) = (pinned.clone(), slot.clone());
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            p2.leave(Hold::Slot(&s2));
            // After the revocation: nothing starts through the old view.
            let after = p2.enter_with(&s2).is_some();
            drop(p2);
            after
        });
        let t0 = Instant::now();
        ep.publish(View::new(1, Mode::Deny), true, Duration::from_millis(20));
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(150), "{took:?}");
        assert!(pinned.revoked());
        assert!(
            !t.join().unwrap(),
            "an access started through a revoked view"
        );
        assert!(!slot.busy());
    }

    #[test]
    fn no_slot_access_goes_on_after_a_revocation_completes() {
        // A device thread keeps entering the pinned view through its slot and writing a
        // "guest page" while entered; once publish returns, no write may happen any more.
        let faults: Arc<dyn FaultSink> = Arc::new(NoSink);
        for _ in 0..20 {
            let ep = Arc::new(EndpointShared::new(
                1,
                View::new(0, Mode::Bypass),
                faults.clone(),
            ));
            let slot = ep.register_slot();
            let pinned = ep.load_full();
            let page = Arc::new(AtomicUsize::new(0));
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (p2, pg, st) = (pinned.clone(), page.clone(), stop.clone());
            let t = std::thread::spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    if let Some(hold) = p2.enter_with(&slot) {
                        pg.fetch_add(1, Ordering::Relaxed);
                        p2.leave(hold);
                    }
                }
            });
            std::thread::sleep(Duration::from_millis(5));
            ep.publish(View::new(1, Mode::Deny), true, Duration::from_millis(1));
            let at = page.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(
                page.load(Ordering::SeqCst),
                at,
                "written after the revocation"
            );
            stop.store(true, Ordering::Relaxed);
            t.join().unwrap();
            drop(pinned);
        }
    }

    #[test]
    fn publish_waits_for_pinned_readers() {
        let faults: Arc<dyn FaultSink> = Arc::new(NoSink);
        let ep = Arc::new(EndpointShared::new(1, View::new(0, Mode::Bypass), faults));
        let pinned = ep.load_full();
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let (r2, b2, ep2) = (released.clone(), barrier.clone(), ep.clone());
        let t = std::thread::spawn(move || {
            // A lock-free guard taken on another thread: the swap must account for it.
            let guard = ep2.load();
            b2.wait();
            std::thread::sleep(Duration::from_millis(50));
            r2.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(guard);
        });
        barrier.wait();
        drop(pinned);
        ep.publish(View::new(1, Mode::Deny), true, PIN_DEADLINE);
        assert!(released.load(std::sync::atomic::Ordering::SeqCst));
        t.join().unwrap();
        assert_eq!(ep.load().generation, 1);
    }
}
