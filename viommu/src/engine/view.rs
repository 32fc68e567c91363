//! Published, immutable translation state. The engine owns the master tables and publishes one
//! [`View`] per endpoint through an `ArcSwap`; devices load it without locking. Removing access
//! (unmap, leaving a space, identity off, an endpoint leaving bypass for a paging space)
//! completes only once no reader still holds the old view (publishing waits for that).

use super::fault::FaultSink;
use super::mapping::{Access, Mapping, Miss};
use super::table::{lookup, Table};
use arc_swap::ArcSwap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// What one endpoint sees at one point in time.
#[derive(Debug)]
pub struct View {
    /// Increases with every publication (caches compare it).
    pub generation: u64,
    /// Translation mode.
    pub mode: Mode,
}

impl View {
    /// The mapping that serves `iova` for `access`.
    #[inline]
    pub fn translate(&self, iova: u64, access: Access) -> Result<Mapping, Miss> {
        match &self.mode {
            Mode::Bypass => Ok(Mapping::IDENTITY),
            Mode::Deny => Err(Miss::NoDomain),
            Mode::Translate(t) => match lookup(t, iova) {
                Some(m) if m.allows(access) => Ok(*m),
                _ => Err(Miss::NoMapping),
            },
        }
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
    /// Where translation faults go.
    pub(crate) faults: Arc<dyn FaultSink>,
}

/// How long to wait for readers before logging that a device holds an old view.
const SLOW_READER: Duration = Duration::from_millis(100);

impl EndpointShared {
    pub(crate) fn new(id: u32, initial: View, faults: Arc<dyn FaultSink>) -> Self {
        EndpointShared {
            id,
            view: ArcSwap::from_pointee(initial),
            retired: Mutex::new(Vec::new()),
            faults,
        }
    }

    /// Borrow the current view (lock-free; keep it short).
    pub fn load(&self) -> arc_swap::Guard<Arc<View>> {
        self.view.load()
    }

    /// Take a reference on the current view (for a device pinning it over one request).
    pub fn load_full(&self) -> Arc<View> {
        self.view.load_full()
    }

    /// Publish `view`; when `sync`, return only once no reader holds any earlier view (a
    /// request may have pinned one published before the previous one).
    pub(crate) fn publish(&self, view: View, sync: bool) {
        let old = self.view.swap(Arc::new(view));
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.push(old);
        if sync {
            for v in retired.drain(..) {
                wait_unshared(self.id, v);
            }
        } else {
            retired.retain(|v| Arc::strong_count(v) > 1);
        }
    }
}

/// Wait until `old` is the last reference. `ArcSwap::swap` has already converted every
/// outstanding lock-free guard into a counted reference, so the strong count is exact.
fn wait_unshared(endpoint: u32, old: Arc<View>) {
    wait_for(
        || Arc::strong_count(&old) == 1,
        &format_args!("view of endpoint {endpoint:#x}"),
    );
}

/// Spin, then yield, until `done()`; log once if a reader is slow.
fn wait_for(done: impl Fn() -> bool, what: &dyn std::fmt::Display) {
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
        if !warned && t0.elapsed() > SLOW_READER {
            log::warn!(
                "virtio-iommu: a device still uses an old {what} after {SLOW_READER:?}; \
                 waiting for it"
            );
            warned = true;
        }
        std::thread::yield_now();
    }
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
        let v = View {
            generation: 1,
            mode: Mode::Translate(Arc::new(t)),
        };
        assert!(v.translate(0x10, Access::Read).is_ok());
        assert_eq!(v.translate(0x10, Access::Write), Err(Miss::NoMapping));
        assert_eq!(v.translate(0x1000, Access::Read), Err(Miss::NoMapping));
        let d = View {
            generation: 1,
            mode: Mode::Deny,
        };
        assert_eq!(d.translate(0, Access::Read), Err(Miss::NoDomain));
    }

    #[test]
    fn publish_waits_for_pinned_readers() {
        let faults: Arc<dyn FaultSink> = Arc::new(NoSink);
        let ep = Arc::new(EndpointShared::new(
            1,
            View {
                generation: 0,
                mode: Mode::Bypass,
            },
            faults,
        ));
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
        ep.publish(
            View {
                generation: 1,
                mode: Mode::Deny,
            },
            true,
        );
        assert!(released.load(std::sync::atomic::Ordering::SeqCst));
        t.join().unwrap();
        assert_eq!(ep.load().generation, 1);
    }
}
