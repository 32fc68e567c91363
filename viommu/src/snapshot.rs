//! Published, immutable translation state. The domain layer owns the master tables and
//! publishes one [`View`] per endpoint through an `ArcSwap`; devices load it without locking.
//! Removing access (UNMAP, DETACH, bypass off) completes only once no reader still holds the old
//! view ([`EndpointShared::publish`] waits for that).

use crate::fault::FaultReporter;
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One guest mapping: IOVA `start..=end` -> GPA `gpa..`, with its rights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub end: u64,
    /// Guest-physical address of `start`.
    pub gpa: u64,
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
    /// The target is MMIO (MAP_F_MMIO).
    pub mmio: bool,
}

impl Mapping {
    /// The identity mapping over the whole 64-bit space (bypass).
    pub const IDENTITY: Mapping = Mapping {
        start: 0,
        end: u64::MAX,
        gpa: 0,
        read: true,
        write: true,
        mmio: false,
    };

    /// Whether `iova` lies inside.
    pub fn contains(&self, iova: u64) -> bool {
        self.start <= iova && iova <= self.end
    }

    /// Whether the mapping grants `access`.
    pub fn allows(&self, access: Access) -> bool {
        match access {
            Access::Read => self.read,
            Access::Write => self.write,
            Access::ReadWrite => self.read && self.write,
        }
    }

    /// GPA of `iova` (which must be inside).
    pub fn gpa_of(&self, iova: u64) -> u64 {
        self.gpa.wrapping_add(iova.wrapping_sub(self.start))
    }
}

/// Kind of access a device makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Device reads guest memory.
    Read,
    /// Device writes guest memory.
    Write,
    /// Both.
    ReadWrite,
}

/// A domain's mapping table: a persistent ordered map keyed by the first IOVA (O(1) clone,
/// O(log n) update and lookup).
pub type Table = imbl::OrdMap<u64, Mapping>;

/// The mapping containing `iova`, if any.
pub fn lookup(table: &Table, iova: u64) -> Option<&Mapping> {
    table
        .get_prev(&iova)
        .map(|(_, m)| m)
        .filter(|m| m.end >= iova)
}

/// How an endpoint's accesses are treated.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Unattached with bypass off: every access faults (reason DOMAIN).
    Deny,
    /// Unattached with bypass on, or attached to a bypass domain: identity.
    Bypass,
    /// Attached to a paging domain: translate through its table.
    Translate(Table),
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Miss {
    /// The endpoint has no domain and may not bypass.
    NoDomain,
    /// No mapping covers the address, or it forbids the access.
    NoMapping,
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

/// The part of an endpoint that devices share with the domain layer.
#[derive(Debug)]
pub struct EndpointShared {
    /// Endpoint ID (PCI BDF).
    pub id: u32,
    view: ArcSwap<View>,
    /// Where translation faults go.
    pub(crate) faults: Arc<FaultReporter>,
}

/// How long to wait for readers before logging that a device holds an old view.
const SLOW_READER: Duration = Duration::from_millis(100);

impl EndpointShared {
    pub(crate) fn new(id: u32, initial: View, faults: Arc<FaultReporter>) -> Self {
        EndpointShared {
            id,
            view: ArcSwap::from_pointee(initial),
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

    /// Publish `view`; when `sync`, return only once no reader holds the previous one.
    pub(crate) fn publish(&self, view: View, sync: bool) {
        let old = self.view.swap(Arc::new(view));
        if sync {
            wait_unshared(self.id, old);
        }
    }
}

/// Wait until `old` is the last reference. `ArcSwap::swap` has already converted every
/// outstanding lock-free guard into a counted reference, so the strong count is exact.
fn wait_unshared(endpoint: u32, old: Arc<View>) {
    let mut spins = 0u32;
    let mut started: Option<Instant> = None;
    let mut warned = false;
    while Arc::strong_count(&old) > 1 {
        if spins < 64 {
            spins += 1;
            std::hint::spin_loop();
            continue;
        }
        let t0 = *started.get_or_insert_with(Instant::now);
        if !warned && t0.elapsed() > SLOW_READER {
            log::warn!(
                "virtio-iommu: endpoint {endpoint:#x}: a device still uses an old translation \
                 view after {SLOW_READER:?}; UNMAP/DETACH completion waits for it"
            );
            warned = true;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(start: u64, end: u64, gpa: u64) -> Mapping {
        Mapping {
            start,
            end,
            gpa,
            read: true,
            write: false,
            mmio: false,
        }
    }

    #[test]
    fn lookup_finds_the_covering_mapping() {
        let mut t = Table::new();
        t.insert(0x1000, map(0x1000, 0x1fff, 0x8000));
        t.insert(0x3000, map(0x3000, 0x3fff, 0x9000));
        assert_eq!(lookup(&t, 0xfff), None);
        assert_eq!(lookup(&t, 0x1000).unwrap().gpa_of(0x1000), 0x8000);
        assert_eq!(lookup(&t, 0x1fff).unwrap().gpa_of(0x1fff), 0x8fff);
        assert_eq!(lookup(&t, 0x2000), None);
        assert_eq!(lookup(&t, 0x3abc).unwrap().gpa_of(0x3abc), 0x9abc);
        assert_eq!(lookup(&t, u64::MAX), None);
    }

    #[test]
    fn view_checks_rights() {
        let mut t = Table::new();
        t.insert(0, map(0, 0xfff, 0));
        let v = View {
            generation: 1,
            mode: Mode::Translate(t),
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
        let faults = Arc::new(FaultReporter::new(Default::default(), Default::default()));
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
