//! The hang watchdog (`--watchdog SECS`): evidence for a guest that stops making progress.
//!
//! Every vCPU thread publishes its state in a [`VcpuProbe`] on each exit: exit count, last exit
//! (kind, port or MMIO address, size), whether it is in KVM_RUN or handling an exit, and since
//! when on the coarse clock of [`lockwatch`]. These are relaxed stores to a cache line only
//! that vCPU writes; no lock, no clock read, no system call on the exit path. Device locks
//! record their holder and waiters through [`lockwatch::lock`].
//!
//! A watchdog thread samples the probes a few times per limit. When no vCPU made progress
//! (its exit count and state unchanged) for the limit, or one vCPU stayed inside one exit
//! handler for the limit, it logs one report: each vCPU's state, every recorded device lock
//! (holder or waiter, for how long), and every VMM thread's `/proc/self/task/*/{comm,stat,
//! wchan,syscall,stack}`. The same episode (nothing changed since) is reported once; at most
//! [`MAX_REPORTS`] per run.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::WatchdogOptions;

/// Reports logged per run at most.
pub const MAX_REPORTS: u32 = 8;

/// First words of every report's first line (for tools reading the VMM's stderr).
pub const REPORT_MARKER: &str = "watchdog: REPORT";

/// What a vCPU thread is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// The thread has not entered KVM_RUN yet.
    NotStarted,
    /// Inside KVM_RUN (the guest runs or is halted in the kernel).
    InKvmRun,
    /// Handling the last exit in the VMM.
    Handling,
    /// The run loop returned.
    Stopped,
}

impl VcpuState {
    fn from_u8(v: u8) -> VcpuState {
        match v {
            1 => VcpuState::InKvmRun,
            2 => VcpuState::Handling,
            3 => VcpuState::Stopped,
            _ => VcpuState::NotStarted,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            VcpuState::NotStarted => 0,
            VcpuState::InKvmRun => 1,
            VcpuState::Handling => 2,
            VcpuState::Stopped => 3,
        }
    }
}

/// The kind of a vCPU exit, as the probe records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// No exit yet.
    None,
    /// Port read.
    IoIn,
    /// Port write.
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// HLT without an in-kernel irqchip.
    Hlt,
    /// Shutdown (triple fault).
    Shutdown,
    /// A KVM system event.
    SystemEvent,
    /// KVM_RUN interrupted (a kick, EINTR or EAGAIN).
    Interrupted,
    /// Internal error or failed entry.
    Failure,
    /// Anything else.
    Other,
}

impl ExitKind {
    const ALL: [ExitKind; 11] = [
        ExitKind::None,
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::Shutdown,
        ExitKind::SystemEvent,
        ExitKind::Interrupted,
        ExitKind::Failure,
        ExitKind::Other,
    ];

    fn to_u8(self) -> u8 {
        Self::ALL.iter().position(|&k| k == self).unwrap_or(0) as u8
    }

    fn from_u8(v: u8) -> ExitKind {
        Self::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(ExitKind::Other)
    }

    /// How the report names it.
    pub fn describe(self, addr: u64, len: u32) -> String {
        match self {
            ExitKind::None => "none".into(),
            ExitKind::IoIn => format!("port read {addr:#x} ({len} bytes)"),
            ExitKind::IoOut => format!("port write {addr:#x} ({len} bytes)"),
            ExitKind::MmioRead => format!("MMIO read {addr:#x} ({len} bytes)"),
            ExitKind::MmioWrite => format!("MMIO write {addr:#x} ({len} bytes)"),
            ExitKind::Hlt => "hlt".into(),
            ExitKind::Shutdown => "shutdown".into(),
            ExitKind::SystemEvent => format!("system event {addr}"),
            ExitKind::Interrupted => "KVM_RUN interrupted".into(),
            ExitKind::Failure => "internal error or failed entry".into(),
            ExitKind::Other => "other".into(),
        }
    }
}

/// Per-vCPU state published on every exit (written by that vCPU's thread only).
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct VcpuProbe {
    exits: AtomicU64,
    state: AtomicU8,
    kind: AtomicU8,
    len: AtomicU32,
    addr: AtomicU64,
    since_ms: AtomicU64,
}

/// A copy of a [`VcpuProbe`] at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSnapshot {
    /// Exits so far.
    pub exits: u64,
    /// What the thread is doing.
    pub state: VcpuState,
    /// The last exit.
    pub kind: ExitKind,
    /// Its port or MMIO address.
    pub addr: u64,
    /// Its size in bytes.
    pub len: u32,
    /// Coarse-clock time ([`lockwatch::now_ms`]) of the last state change.
    pub since_ms: u64,
}

impl VcpuProbe {
    /// A probe of a vCPU that has not run yet.
    pub fn new() -> VcpuProbe {
        VcpuProbe::default()
    }

    fn set_state(&self, s: VcpuState) {
        self.since_ms.store(lockwatch::now_ms(), Ordering::Relaxed);
        self.state.store(s.to_u8(), Ordering::Release);
    }

    /// The thread is about to enter KVM_RUN.
    pub fn entering_run(&self) {
        self.set_state(VcpuState::InKvmRun);
    }

    /// KVM_RUN returned with `kind` at `addr` (`len` bytes); the thread handles it now.
    pub fn exited(&self, kind: ExitKind, addr: u64, len: u32) {
        // Single writer: a load and a store, no locked read-modify-write.
        let n = self.exits.load(Ordering::Relaxed);
        self.exits.store(n.wrapping_add(1), Ordering::Relaxed);
        self.kind.store(kind.to_u8(), Ordering::Relaxed);
        self.addr.store(addr, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.set_state(VcpuState::Handling);
    }

    /// The run loop returned.
    pub fn stopped(&self) {
        self.set_state(VcpuState::Stopped);
    }

    /// The published state (fields read one by one: a racy but harmless copy).
    pub fn snapshot(&self) -> ProbeSnapshot {
        let state = VcpuState::from_u8(self.state.load(Ordering::Acquire));
        ProbeSnapshot {
            exits: self.exits.load(Ordering::Relaxed),
            state,
            kind: ExitKind::from_u8(self.kind.load(Ordering::Relaxed)),
            addr: self.addr.load(Ordering::Relaxed),
            len: self.len.load(Ordering::Relaxed),
            since_ms: self.since_ms.load(Ordering::Relaxed),
        }
    }
}

/// Why a report is due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// vCPU `vcpu` has been inside one exit handler for `for_ms`.
    StuckHandler {
        /// The vCPU index.
        vcpu: usize,
        /// How long (watchdog-observed).
        for_ms: u64,
    },
    /// No vCPU changed state for `for_ms`.
    NoProgress {
        /// How long (watchdog-observed).
        for_ms: u64,
    },
}

/// The decision part of the watchdog: fed snapshots, says when to report (pure, for tests).
#[derive(Debug)]
pub struct Detector {
    limit_ms: u64,
    /// Per vCPU: (exits, state) last seen and when it last changed.
    seen: Vec<(u64, VcpuState, u64)>,
    /// Per vCPU: the exit count at which it was reported stuck in a handler.
    reported_stuck: Vec<Option<u64>>,
    /// The (exits, state) of every vCPU at the last report.
    reported_sig: Option<Vec<(u64, VcpuState)>>,
    reports: u32,
}

impl Detector {
    /// A detector for `vcpus` vCPUs reporting after `limit_ms`, started at `now_ms`.
    pub fn new(vcpus: usize, limit_ms: u64, now_ms: u64) -> Detector {
        Detector {
            limit_ms,
            seen: vec![(0, VcpuState::NotStarted, now_ms); vcpus],
            reported_stuck: vec![None; vcpus],
            reported_sig: None,
            reports: 0,
        }
    }

    /// Reports made so far.
    pub fn reports(&self) -> u32 {
        self.reports
    }

    /// Takes the snapshots seen at `now_ms`; returns a trigger when a report is due (and
    /// counts it as made).
    pub fn observe(&mut self, now_ms: u64, snaps: &[ProbeSnapshot]) -> Option<Trigger> {
        for (seen, s) in self.seen.iter_mut().zip(snaps) {
            if (seen.0, seen.1) != (s.exits, s.state) {
                *seen = (s.exits, s.state, now_ms);
            }
        }
        let live: Vec<&(u64, VcpuState, u64)> = self
            .seen
            .iter()
            .filter(|s| s.1 != VcpuState::Stopped)
            .collect();
        if live.is_empty() || self.reports >= MAX_REPORTS {
            return None;
        }
        let quiet = |s: &(u64, VcpuState, u64)| now_ms.saturating_sub(s.2);
        let stuck = self.seen.iter().enumerate().find(|(i, s)| {
            s.1 == VcpuState::Handling
                && quiet(s) >= self.limit_ms
                && self.reported_stuck[*i] != Some(s.0)
        });
        let sig: Vec<(u64, VcpuState)> = self.seen.iter().map(|s| (s.0, s.1)).collect();
        let trigger = if let Some((vcpu, s)) = stuck {
            Some(Trigger::StuckHandler {
                vcpu,
                for_ms: quiet(s),
            })
        } else if live.iter().all(|s| quiet(s) >= self.limit_ms)
            && self.reported_sig.as_ref() != Some(&sig)
        {
            live.iter()
                .map(|s| quiet(s))
                .min()
                .map(|for_ms| Trigger::NoProgress { for_ms })
        } else {
            None
        }?;
        for (i, s) in self.seen.iter().enumerate() {
            if s.1 == VcpuState::Handling && quiet(s) >= self.limit_ms {
                self.reported_stuck[i] = Some(s.0);
            }
        }
        self.reported_sig = Some(sig);
        self.reports += 1;
        Some(trigger)
    }
}

/// Where report lines go.
pub trait ReportSink: Send {
    /// One whole report (lines separated by `\n`).
    fn report(&mut self, text: &str);
}

/// The log (error level), and `/dev/kmsg` at error level when opened.
pub struct LogSink {
    kmsg: Option<std::fs::File>,
}

impl LogSink {
    /// A sink logging each line; with `kmsg`, also writing it to `/dev/kmsg` (opened now: the
    /// watchdog thread's seccomp filter opens files read-only).
    pub fn new(kmsg: bool) -> LogSink {
        let kmsg = kmsg
            .then(|| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/kmsg")
                    .map_err(|e| log::warn!("watchdog: cannot open /dev/kmsg: {e}"))
                    .ok()
            })
            .flatten();
        LogSink { kmsg }
    }
}

impl ReportSink for LogSink {
    fn report(&mut self, text: &str) {
        for line in text.lines() {
            log::error!("{line}");
            if let Some(k) = &mut self.kmsg {
                // One record per write; kmsg truncates records near 1 KiB.
                let rec: String = format!("<3>vmm {line}").chars().take(900).collect();
                let _ = k.write_all(rec.as_bytes());
            }
        }
    }
}

fn ms(v: u64) -> String {
    format!("{:.1} s", v as f64 / 1000.0)
}

/// Appends each VMM thread's kernel-side state: comm, stat (state, CPU times, last CPU),
/// wchan, syscall and stack (when readable).
pub fn thread_states(out: &mut String) {
    let dir = match std::fs::read_dir("/proc/self/task") {
        Ok(d) => d,
        Err(e) => {
            let _ = writeln!(out, "watchdog: /proc/self/task unreadable: {e}");
            return;
        }
    };
    let mut tids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    for tid in tids {
        let read = |f: &str| std::fs::read_to_string(format!("/proc/self/task/{tid}/{f}")).ok();
        let comm = read("comm").unwrap_or_default();
        let stat = read("stat").unwrap_or_default();
        // Fields after the parenthesised comm: state is field 3, utime 14, stime 15,
        // processor 39 (proc(5)).
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| rest.get(n - 3).copied().unwrap_or("?");
        let wchan = read("wchan").unwrap_or_else(|| "?".into());
        let syscall = read("syscall").unwrap_or_else(|| "?".into());
        let _ = writeln!(
            out,
            "watchdog: thread {tid} {}: state {} utime {} stime {} cpu {} wchan {} syscall {}",
            comm.trim(),
            field(3),
            field(14),
            field(15),
            field(39),
            wchan.trim(),
            syscall.trim()
        );
        if let Some(stack) = read("stack") {
            for l in stack.lines().filter(|l| !l.trim().is_empty()) {
                let _ = writeln!(out, "watchdog: thread {tid} stack {}", l.trim());
            }
        }
    }
}

/// The whole report for `trigger`.
pub fn render(
    n: u32,
    trigger: &Trigger,
    limit_ms: u64,
    now_ms: u64,
    snaps: &[ProbeSnapshot],
    locks: &[lockwatch::ThreadLocks],
    with_threads: bool,
) -> String {
    let mut out = String::new();
    let why = match trigger {
        Trigger::StuckHandler { vcpu, for_ms } => {
            format!("vCPU {vcpu} inside one exit handler for {}", ms(*for_ms))
        }
        Trigger::NoProgress { for_ms } => format!("no vCPU made progress for {}", ms(*for_ms)),
    };
    let _ = writeln!(
        out,
        "{REPORT_MARKER} {n}: {why} (limit {}, VMM clock {})",
        ms(limit_ms),
        ms(now_ms)
    );
    for (i, s) in snaps.iter().enumerate() {
        let doing = match s.state {
            VcpuState::NotStarted => "not started".to_string(),
            VcpuState::InKvmRun => "in KVM_RUN".to_string(),
            VcpuState::Handling => format!("handling {}", s.kind.describe(s.addr, s.len)),
            VcpuState::Stopped => "stopped".to_string(),
        };
        let _ = writeln!(
            out,
            "watchdog: vCPU {i}: {doing} for {}, {} exits, last exit {}",
            ms(now_ms.saturating_sub(s.since_ms)),
            s.exits,
            s.kind.describe(s.addr, s.len)
        );
    }
    if locks.is_empty() {
        let _ = writeln!(out, "watchdog: no device lock held or waited for");
    }
    for t in locks {
        for l in &t.locks {
            let _ = writeln!(
                out,
                "watchdog: lock {} {} thread {} ({}) for {}",
                l.label,
                if l.held { "held by" } else { "waited for by" },
                t.tid,
                t.thread,
                ms(now_ms.saturating_sub(l.since_ms))
            );
        }
    }
    if with_threads {
        thread_states(&mut out);
    }
    let _ = writeln!(out, "watchdog: END REPORT {n}");
    out
}

/// A running watchdog thread; [`Watchdog::stop`] ends it.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the watchdog thread for `opts` over `probes` (in vCPU order), logging reports.
    pub fn start(opts: &WatchdogOptions, probes: Vec<Arc<VcpuProbe>>) -> std::io::Result<Self> {
        let sink = LogSink::new(opts.kmsg);
        Self::start_with(
            Duration::from_secs(opts.limit_secs),
            probes,
            Box::new(sink),
            true,
        )
    }

    /// Starts the watchdog thread with an explicit `limit` and `sink`; `with_threads` adds the
    /// /proc thread states to each report.
    pub fn start_with(
        limit: Duration,
        probes: Vec<Arc<VcpuProbe>>,
        mut sink: Box<dyn ReportSink>,
        with_threads: bool,
    ) -> std::io::Result<Self> {
        lockwatch::set_enabled(true);
        let start = lockwatch::advance_clock();
        let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
        let tick = (limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Watchdog) {
                    log::error!("watchdog: {}; not watching", crate::report::Chain(&e));
                    return;
                }
                let mut det = Detector::new(probes.len(), limit_ms, start);
                while !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    let now = lockwatch::advance_clock();
                    let snaps: Vec<ProbeSnapshot> = probes.iter().map(|p| p.snapshot()).collect();
                    if let Some(t) = det.observe(now, &snaps) {
                        let locks = lockwatch::snapshot();
                        sink.report(&render(
                            det.reports(),
                            &t,
                            limit_ms,
                            now,
                            &snaps,
                            &locks,
                            with_threads,
                        ));
                        if det.reports() == MAX_REPORTS {
                            sink.report("watchdog: report limit reached, no more reports");
                        }
                    }
                }
            })?;
        Ok(Watchdog {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and joins the thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("watchdog: thread panicked");
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn snap(exits: u64, state: VcpuState) -> ProbeSnapshot {
        ProbeSnapshot {
            exits,
            state,
            kind: ExitKind::MmioWrite,
            addr: 0x1000,
            len: 4,
            since_ms: 0,
        }
    }

    #[test]
    fn detector_reports_a_stuck_handler_once_per_episode() {
        let mut d = Detector::new(2, 100, 0);
        let busy = |n| snap(n, VcpuState::InKvmRun);
        // vCPU 1 keeps exiting; vCPU 0 sits in one handler.
        assert_eq!(
            d.observe(50, &[snap(7, VcpuState::Handling), busy(1)]),
            None
        );
        assert_eq!(
            d.observe(160, &[snap(7, VcpuState::Handling), busy(2)]),
            Some(Trigger::StuckHandler {
                vcpu: 0,
                for_ms: 110
            })
        );
        for t in 3..20 {
            assert_eq!(
                d.observe(160 + t * 50, &[snap(7, VcpuState::Handling), busy(t)]),
                None
            );
        }
        // It moves on, then gets stuck in another exit: a new episode.
        assert_eq!(
            d.observe(1200, &[snap(8, VcpuState::Handling), busy(30)]),
            None
        );
        assert!(matches!(
            d.observe(1350, &[snap(8, VcpuState::Handling), busy(31)]),
            Some(Trigger::StuckHandler { vcpu: 0, .. })
        ));
        assert_eq!(d.reports(), 2);
    }

    #[test]
    fn detector_reports_no_progress_once_and_ignores_stopped_vcpus() {
        let mut d = Detector::new(2, 100, 0);
        let run = |n| snap(n, VcpuState::InKvmRun);
        assert_eq!(d.observe(50, &[run(1), run(1)]), None);
        assert_eq!(
            d.observe(170, &[run(1), run(1)]),
            Some(Trigger::NoProgress { for_ms: 120 })
        );
        assert_eq!(d.observe(400, &[run(1), run(1)]), None);
        // Progress, then quiet again: a second report.
        assert_eq!(d.observe(450, &[run(2), run(1)]), None);
        assert!(matches!(
            d.observe(600, &[run(2), run(1)]),
            Some(Trigger::NoProgress { .. })
        ));
        // A VM whose vCPUs stopped is not hung.
        let mut d = Detector::new(1, 100, 0);
        assert_eq!(d.observe(500, &[snap(9, VcpuState::Stopped)]), None);
    }

    #[test]
    fn detector_stops_at_the_report_limit() {
        let mut d = Detector::new(1, 10, 0);
        let mut n = 0;
        for i in 0..100u64 {
            // A new exit every 30 ms, each one stuck past the limit.
            if d.observe(i * 15, &[snap(i / 2, VcpuState::Handling)])
                .is_some()
            {
                n += 1;
            }
        }
        assert_eq!(n, MAX_REPORTS);
    }

    #[test]
    fn probe_publishes_exits_and_state() {
        let p = VcpuProbe::new();
        assert_eq!(p.snapshot().state, VcpuState::NotStarted);
        p.entering_run();
        p.exited(ExitKind::IoOut, 0x3f8, 1);
        let s = p.snapshot();
        assert_eq!(
            (s.exits, s.state, s.kind, s.addr, s.len),
            (1, VcpuState::Handling, ExitKind::IoOut, 0x3f8, 1)
        );
        p.entering_run();
        assert_eq!(p.snapshot().state, VcpuState::InKvmRun);
        p.stopped();
        assert_eq!(p.snapshot().state, VcpuState::Stopped);
        for k in ExitKind::ALL {
            assert_eq!(ExitKind::from_u8(k.to_u8()), k);
        }
    }

    struct Collect(Arc<Mutex<Vec<String>>>);
    impl ReportSink for Collect {
        fn report(&mut self, text: &str) {
            self.0.lock().unwrap().push(text.to_string());
        }
    }

    /// A fake vCPU stuck in an MMIO write handler holding a named device lock, another vCPU
    /// busy: exactly one report, naming the stuck vCPU, its exit and the lock with its holder.
    #[test]
    fn a_stuck_handler_gets_exactly_one_report_naming_vcpu_and_lock() {
        let stuck = Arc::new(VcpuProbe::new());
        let busy = Arc::new(VcpuProbe::new());
        let reports = Arc::new(Mutex::new(Vec::new()));
        let wd = Watchdog::start_with(
            Duration::from_millis(200),
            vec![busy.clone(), stuck.clone()],
            Box::new(Collect(reports.clone())),
            true,
        )
        .unwrap();
        let dev = Arc::new(Mutex::new(0u32));
        lockwatch::name(&dev, "pci 00:05.0 (test device)");
        let done = Arc::new(AtomicBool::new(false));
        let (p, d, f) = (stuck.clone(), dev.clone(), done.clone());
        let handler = std::thread::Builder::new()
            .name("vcpu1".into())
            .spawn(move || {
                p.entering_run();
                p.exited(ExitKind::MmioWrite, 0xfebf_1000, 4);
                let _g = lockwatch::lock(&d);
                while !f.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
            .unwrap();
        // The other vCPU keeps making progress for the whole test (~6 limits).
        for _ in 0..120 {
            busy.entering_run();
            busy.exited(ExitKind::IoOut, 0x3f8, 1);
            std::thread::sleep(Duration::from_millis(10));
        }
        done.store(true, Ordering::Relaxed);
        handler.join().unwrap();
        wd.stop();
        let r = reports.lock().unwrap();
        assert_eq!(r.len(), 1, "{r:#?}");
        let text = &r[0];
        assert!(
            text.starts_with(&format!(
                "{REPORT_MARKER} 1: vCPU 1 inside one exit handler"
            )),
            "{text}"
        );
        assert!(
            text.contains("vCPU 1: handling MMIO write 0xfebf1000 (4 bytes)"),
            "{text}"
        );
        assert!(text.contains("vCPU 0: "), "{text}");
        let lock_line = text
            .lines()
            .find(|l| l.contains("lock pci 00:05.0 (test device) held by thread"))
            .unwrap_or_else(|| panic!("no lock line in {text}"));
        assert!(lock_line.contains("(vcpu1)"), "{lock_line}");
        assert!(text.contains(" vcpu1: state "), "{text}");
        assert!(text.ends_with("watchdog: END REPORT 1\n"), "{text}");
    }
}
