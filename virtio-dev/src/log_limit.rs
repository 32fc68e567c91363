//! Rate-limited log lines for what the guest can trigger at will (a malformed request, an
//! access nowhere, a bad register write): one warning per event would let a guest flood the
//! host's log (65 536 malformed virtio-iommu requests per kick).
//!
//! Each call site of [`guest_warn!`](crate::guest_warn) / [`guest_error!`](crate::guest_error)
//! is one *source* with its own [`LogLimit`]: in every [`INTERVAL`] the first [`BURST`] lines
//! pass, the rest are counted, and the source's next line after the interval is preceded by one
//! line saying how many were suppressed. [`flush`] logs the counts not reported yet (the VMM
//! calls it at exit). Host and setup errors keep plain `log::warn!` / `log::error!`.
//!
//! It lives here because every device crate (pci, viommu, the VMM's devices) already depends
//! on this crate and on nothing else in common: no new edge between crates.
//!
//! ```
//! fn on_bad_request(head: u16) {
//!     virtio_dev::guest_warn!("example: malformed request (head {head})");
//! }
//! for head in 0..1000 {
//!     on_bad_request(head); // logs BURST lines, counts the rest
//! }
//! virtio_dev::log_limit::flush(); // "... 990 similar line(s) suppressed"
//! ```

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Lines one source may log per [`INTERVAL`].
pub const BURST: u32 = 10;
/// The rate-limiting window of each source.
pub const INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    passed: u32,
    suppressed: u64,
    level: log::Level,
    listed: bool,
}

/// The counter of one source of guest-triggered log lines (one per call site of the macros).
#[derive(Debug)]
pub struct LogLimit {
    name: &'static str,
    state: Mutex<State>,
}

/// Sources with lines suppressed at some point (for [`flush`]); bounded by the call sites.
static LISTED: Mutex<Vec<&'static LogLimit>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LogLimit {
    /// A source named `name` (the macros use the call site's module path and line).
    pub const fn new(name: &'static str) -> LogLimit {
        LogLimit {
            name,
            state: Mutex::new(State {
                window_start: None,
                passed: 0,
                suppressed: 0,
                level: log::Level::Warn,
                listed: false,
            }),
        }
    }

    /// Whether a line at `level` may be logged now; counts it as suppressed if not. When a new
    /// interval starts, lines suppressed in the previous one are reported first.
    pub fn admit(&'static self, level: log::Level) -> bool {
        self.admit_at(Instant::now(), level)
    }

    /// [`LogLimit::admit`] at time `now` (monotonic; for tests).
    pub fn admit_at(&'static self, now: Instant, level: log::Level) -> bool {
        let mut st = lock(&self.state);
        let expired = st
            .window_start
            .is_none_or(|s| now.saturating_duration_since(s) >= INTERVAL);
        if expired {
            self.report(&mut st);
            st.window_start = Some(now);
            st.passed = 0;
        }
        if st.passed < BURST {
            st.passed += 1;
            return true;
        }
        st.suppressed += 1;
        st.level = st.level.min(level);
        if !st.listed {
            st.listed = true;
            lock(&LISTED).push(self);
        }
        false
    }

    /// Lines suppressed and not reported yet.
    pub fn suppressed(&self) -> u64 {
        lock(&self.state).suppressed
    }

    fn report(&self, st: &mut State) {
        if st.suppressed > 0 {
            log::log!(
                st.level,
                "{}: {} similar line(s) suppressed",
                self.name,
                st.suppressed
            );
            st.suppressed = 0;
            st.level = log::Level::Warn;
        }
    }
}

/// Report every source's suppressed lines now (one line each) and reset their counts.
pub fn flush() {
    let listed: Vec<&'static LogLimit> = lock(&LISTED).clone();
    for l in listed {
        l.report(&mut lock(&l.state));
    }
}

#[doc(hidden)]
pub use log as __log;

/// `log::warn!` for a line the guest can trigger at will: rate-limited per call site (see
/// [`crate::log_limit`]).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimit =
            $crate::log_limit::LogLimit::new(concat!(module_path!(), ":", line!()));
        if LIMIT.admit($crate::log_limit::__log::Level::Warn) {
            $crate::log_limit::__log::warn!($($arg)+);
        }
    }};
}

/// `log::error!` for a line the guest can trigger at will: rate-limited per call site (see
/// [`crate::log_limit`]).
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimit =
            $crate::log_limit::LogLimit::new(concat!(module_path!(), ":", line!()));
        if LIMIT.admit($crate::log_limit::__log::Level::Error) {
            $crate::log_limit::__log::error!($($arg)+);
        }
    }};
}

/// Capturing the log lines a test makes (feature `test-utils`): a process-wide logger that
/// keeps the warning and error lines of the threads that asked for them.
#[cfg(any(test, feature = "test-utils"))]
pub mod capture {
    use std::cell::RefCell;
    use std::sync::OnceLock;

    thread_local! {
        static LINES: RefCell<Option<Vec<(log::Level, String)>>> = const { RefCell::new(None) };
    }

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= log::Level::Warn
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                LINES.with(|l| {
                    if let Some(v) = l.borrow_mut().as_mut() {
                        v.push((r.level(), r.args().to_string()));
                    }
                });
            }
        }
        fn flush(&self) {}
    }

    static INSTALLED: OnceLock<bool> = OnceLock::new();

    /// Run `f` and return what it logged at warning level or above on this thread; `None` if
    /// another logger was installed first (the caller reports the test as skipped).
    pub fn lines<R>(f: impl FnOnce() -> R) -> Option<(R, Vec<(log::Level, String)>)> {
        let ok = *INSTALLED.get_or_init(|| {
            let ok = log::set_logger(&Capture).is_ok();
            if ok {
                log::set_max_level(log::LevelFilter::Warn);
            }
            ok
        });
        if !ok {
            return None;
        }
        LINES.with(|l| *l.borrow_mut() = Some(Vec::new()));
        let r = f();
        let lines = LINES.with(|l| l.borrow_mut().take()).unwrap_or_default();
        Some((r, lines))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_lines_are_counted_and_reported_once_per_interval() {
        static L: LogLimit = LogLimit::new("test source");
        let t0 = Instant::now();
        let passed = (0..1000)
            .filter(|_| L.admit_at(t0, log::Level::Warn))
            .count();
        assert_eq!(passed, BURST as usize);
        assert_eq!(L.suppressed(), 1000 - u64::from(BURST));
        // Still in the interval: suppressed.
        assert!(!L.admit_at(t0 + INTERVAL / 2, log::Level::Error));
        // The next interval: the summary goes out first, then the line.
        let (ok, lines) = capture::lines(|| L.admit_at(t0 + INTERVAL, log::Level::Warn)).unwrap();
        assert!(ok);
        assert_eq!(
            lines,
            vec![(
                log::Level::Error,
                "test source: 991 similar line(s) suppressed".to_string()
            )],
            "at the most severe level suppressed"
        );
        assert_eq!(L.suppressed(), 0);
        // Sequential on purpose: `flush` reports every source, this test's `L` included.
        the_macros_limit_each_call_site_and_flush_reports_the_rest();
    }

    fn the_macros_limit_each_call_site_and_flush_reports_the_rest() {
        fn bad(i: u32) {
            crate::guest_warn!("bad thing {i}");
        }
        fn other() {
            crate::guest_error!("other thing");
        }
        let (_, lines) = capture::lines(|| {
            for i in 0..500 {
                bad(i);
                if i < 3 {
                    other();
                }
            }
            flush();
        })
        .unwrap();
        let bad_lines = lines
            .iter()
            .filter(|(_, l)| l.starts_with("bad thing"))
            .count();
        assert_eq!(bad_lines, BURST as usize);
        assert_eq!(lines.iter().filter(|(_, l)| l == "other thing").count(), 3);
        let summary: Vec<_> = lines
            .iter()
            .filter(|(_, l)| l.contains("similar line(s) suppressed"))
            .filter(|(_, l)| l.starts_with("virtio_dev::log_limit::tests:"))
            .collect();
        assert_eq!(summary.len(), 1, "{lines:?}");
        assert!(summary[0].1.ends_with(": 490 similar line(s) suppressed"));
    }
}
