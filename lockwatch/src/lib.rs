//! Device locks that say who holds them, for the vmm's hang watchdog.
//!
//! [`lock`] locks a `std::sync::Mutex` (poison-tolerant, like the `lock()` helpers it replaces)
//! and, while recording is on ([`set_enabled`]), notes in the calling thread's own record
//! which lock it waits for, then holds, and since when on a coarse clock ([`now_ms`], advanced
//! by whoever watches: [`advance_clock`]). Locks are told apart by address and named once with
//! [`name`]. [`snapshot`] lists every thread's waited-for and held locks.
//!
//! Cost on the lock path: one relaxed load when recording is off; when on, a thread-local
//! access and a few relaxed stores to a cache line only this thread writes (no lock, no
//! system call, no clock read).

use std::cell::OnceCell;
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

/// Locks one thread can record at once (more are locked but not recorded).
pub const MAX_DEPTH: usize = 6;

static ENABLED: AtomicBool = AtomicBool::new(false);
static NOW_MS: AtomicU64 = AtomicU64::new(0);

/// Turn recording on or off (off by default; the watchdog turns it on).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether locks are recorded.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Sets the coarse clock to the milliseconds since the first call; returns them.
pub fn advance_clock() -> u64 {
    let ms = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX);
    NOW_MS.fetch_max(ms, Ordering::Relaxed);
    ms
}

/// The coarse clock: milliseconds as of the last [`advance_clock`].
pub fn now_ms() -> u64 {
    NOW_MS.load(Ordering::Relaxed)
}

const FREE: u8 = 0;
const WAITING: u8 = 1;
const HELD: u8 = 2;

#[derive(Default)]
struct Slot {
    addr: AtomicUsize,
    state: AtomicU8,
    since: AtomicU64,
}

/// One thread's record (written only by that thread).
struct ThreadRecord {
    tid: i32,
    name: String,
    slots: [Slot; MAX_DEPTH],
}

fn threads() -> &'static Mutex<Vec<Arc<ThreadRecord>>> {
    static THREADS: OnceLock<Mutex<Vec<Arc<ThreadRecord>>>> = OnceLock::new();
    THREADS.get_or_init(|| Mutex::new(Vec::new()))
}

fn names() -> &'static Mutex<HashMap<usize, String>> {
    static NAMES: OnceLock<Mutex<HashMap<usize, String>>> = OnceLock::new();
    NAMES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The identity of a lock in the records: its address.
fn addr_of<T: ?Sized>(m: &Mutex<T>) -> usize {
    std::ptr::from_ref(m).cast::<()>() as usize
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

thread_local! {
    static ME: OnceCell<Arc<ThreadRecord>> = const { OnceCell::new() };
}

fn with_record<R>(f: impl FnOnce(&ThreadRecord) -> R) -> Option<R> {
    ME.try_with(|cell| {
        let rec = cell.get_or_init(|| {
            let rec = Arc::new(ThreadRecord {
                tid: gettid(),
                name: std::thread::current().name().unwrap_or("?").to_string(),
                slots: Default::default(),
            });
            let mut all = threads().lock().unwrap_or_else(PoisonError::into_inner);
            // Threads that ended hold no lock: drop their records.
            all.retain(|r| Arc::strong_count(r) > 1);
            all.push(rec.clone());
            rec
        });
        f(rec)
    })
    .ok()
}

/// Names the lock `m` in reports (`"pci 00:03.0"`); a later name replaces an earlier one.
pub fn name<T: ?Sized>(m: &Mutex<T>, label: impl Into<String>) {
    names()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(addr_of(m), label.into());
}

/// A held lock: the `MutexGuard`, and the slot of this thread's record that shows it (`None`:
/// not recorded).
pub struct Guard<'a, T: ?Sized> {
    inner: MutexGuard<'a, T>,
    slot: Option<usize>,
}

/// Locks `m` (a poisoned lock is taken over, as the device layer always did), recording the
/// wait and the hold while recording is on.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> Guard<'_, T> {
    if !enabled() {
        return Guard {
            inner: m.lock().unwrap_or_else(PoisonError::into_inner),
            slot: None,
        };
    }
    // The first free slot, not a depth: guards may be dropped in any order.
    let slot = with_record(|r| {
        let (d, s) = r
            .slots
            .iter()
            .enumerate()
            .find(|(_, s)| s.state.load(Ordering::Relaxed) == FREE)?;
        s.addr.store(addr_of(m), Ordering::Relaxed);
        s.since.store(now_ms(), Ordering::Relaxed);
        s.state.store(WAITING, Ordering::Release);
        Some(d)
    })
    .flatten();
    let inner = m.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(d) = slot {
        let _ = with_record(|r| {
            let s = &r.slots[d];
            s.since.store(now_ms(), Ordering::Relaxed);
            s.state.store(HELD, Ordering::Release);
        });
    }
    Guard { inner, slot }
}

impl<T: ?Sized> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        if let Some(d) = self.slot {
            let _ = with_record(|r| r.slots[d].state.store(FREE, Ordering::Release));
        }
    }
}

impl<T: ?Sized> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: ?Sized> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

/// One recorded lock of one thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockState {
    /// The lock's name ([`name`]), or `lock@0x...`.
    pub label: String,
    /// Held (true) or waited for (false).
    pub held: bool,
    /// Coarse-clock time ([`now_ms`]) the wait or hold began.
    pub since_ms: u64,
}

/// A thread with at least one recorded lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadLocks {
    /// Kernel thread ID.
    pub tid: i32,
    /// Thread name.
    pub thread: String,
    /// Its locks, outermost first.
    pub locks: Vec<LockState>,
}

/// Every thread's waited-for and held locks right now (a racy but consistent-enough read:
/// each slot is read once).
pub fn snapshot() -> Vec<ThreadLocks> {
    let all: Vec<Arc<ThreadRecord>> = threads()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let names = names().lock().unwrap_or_else(PoisonError::into_inner);
    all.iter()
        .filter_map(|r| {
            let locks: Vec<LockState> = r
                .slots
                .iter()
                .filter_map(|s| {
                    let state = s.state.load(Ordering::Acquire);
                    if state == FREE {
                        return None;
                    }
                    let addr = s.addr.load(Ordering::Relaxed);
                    Some(LockState {
                        label: names
                            .get(&addr)
                            .cloned()
                            .unwrap_or_else(|| format!("lock@{addr:#x}")),
                        held: state == HELD,
                        since_ms: s.since.load(Ordering::Relaxed),
                    })
                })
                .collect();
            (!locks.is_empty()).then(|| ThreadLocks {
                tid: r.tid,
                thread: r.name.clone(),
                locks,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    // One test: recording is process-wide.
    #[test]
    fn records_holder_and_waiter_until_released() {
        set_enabled(true);
        advance_clock();
        let dev = Arc::new(Mutex::new(5u32));
        name(&dev, "pci 00:03.0");
        let (held_tx, held_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let d = dev.clone();
        let holder = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                let mut g = lock(&d);
                *g += 1;
                held_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            })
            .unwrap();
        held_rx.recv().unwrap();
        let d = dev.clone();
        let waiter = std::thread::Builder::new()
            .name("blk-worker".into())
            .spawn(move || *lock(&d))
            .unwrap();
        // The waiter shows up as waiting once it has asked for the lock.
        let mut snap = Vec::new();
        for _ in 0..500 {
            snap = snapshot();
            if snap.len() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let find = |t: &str| snap.iter().find(|x| x.thread == t).cloned();
        let h = find("vcpu0").expect("holder recorded");
        assert_eq!(h.locks.len(), 1);
        assert_eq!(h.locks[0].label, "pci 00:03.0");
        assert!(h.locks[0].held);
        let w = find("blk-worker").expect("waiter recorded");
        assert!(!w.locks[0].held);
        assert_eq!(w.locks[0].label, "pci 00:03.0");
        go_tx.send(()).unwrap();
        holder.join().unwrap();
        assert_eq!(waiter.join().unwrap(), 6);
        assert!(snapshot()
            .iter()
            .all(|t| t.thread != "vcpu0" && t.thread != "blk-worker"));
        // Unnamed and nested locks; nothing recorded once released or when off.
        let a = Mutex::new(());
        let b = Mutex::new(());
        {
            let _ga = lock(&a);
            let _gb = lock(&b);
            let me = snapshot().into_iter().find(|t| t.tid == gettid()).unwrap();
            assert_eq!(me.locks.len(), 2);
            assert!(me.locks[1].label.starts_with("lock@0x"));
        }
        assert!(snapshot().iter().all(|t| t.tid != gettid()));
        // Guards dropped out of order: each drop clears its own record.
        let ga = lock(&a);
        let gb = lock(&b);
        drop(ga);
        let c = Mutex::new(());
        name(&c, "c");
        let gc = lock(&c);
        drop(gb);
        let me = snapshot().into_iter().find(|t| t.tid == gettid()).unwrap();
        assert_eq!(me.locks.len(), 1);
        assert_eq!(me.locks[0].label, "c");
        drop(gc);
        assert!(snapshot().iter().all(|t| t.tid != gettid()));
        set_enabled(false);
        let _g = lock(&a);
        assert!(snapshot().iter().all(|t| t.tid != gettid()));
    }
}
