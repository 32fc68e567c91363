//! Event counters of one virtio-iommu: readable by tests at any time and logged at exit.

use crate::virtio::spec::Status;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, shared between the device, its endpoints and the fault reporter.
#[derive(Debug, Default)]
pub struct Counters {
    kicks: AtomicU64,
    interrupts: AtomicU64,
    maps: AtomicU64,
    unmaps: AtomicU64,
    attaches: AtomicU64,
    detaches: AtomicU64,
    probes: AtomicU64,
    faults: AtomicU64,
    faults_delivered: AtomicU64,
    faults_dropped: AtomicU64,
    malformed: AtomicU64,
    statuses: [AtomicU64; Status::COUNT],
}

/// A point-in-time copy of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Request-queue notifications served (driver kicks that reached the device).
    pub kicks: u64,
    /// Request-queue interrupts signalled to the driver.
    pub interrupts: u64,
    /// MAP requests handled (any status).
    pub maps: u64,
    /// UNMAP requests handled.
    pub unmaps: u64,
    /// ATTACH requests handled.
    pub attaches: u64,
    /// DETACH requests handled.
    pub detaches: u64,
    /// PROBE requests handled.
    pub probes: u64,
    /// Translation faults raised by devices behind the IOMMU (before rate limiting).
    pub faults: u64,
    /// Fault records written to the event queue.
    pub faults_delivered: u64,
    /// Faults not delivered (rate limited, no buffer, queue not ready).
    pub faults_dropped: u64,
    /// Chains returned unwritten (unparseable, unknown type).
    pub malformed: u64,
    /// Requests completed with each status, indexed by the status' wire value.
    pub statuses: [u64; Status::COUNT],
}

impl CounterSnapshot {
    /// Requests completed with `status`.
    pub fn status(&self, status: Status) -> u64 {
        self.statuses[status as usize]
    }

    /// Requests completed with an error status.
    pub fn errors(&self) -> u64 {
        self.statuses.iter().skip(1).sum()
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn kick(&self) {
        bump(&self.kicks)
    }
    pub(crate) fn interrupt(&self) {
        bump(&self.interrupts)
    }
    pub(crate) fn map(&self) {
        bump(&self.maps)
    }
    pub(crate) fn unmap(&self) {
        bump(&self.unmaps)
    }
    pub(crate) fn attach(&self) {
        bump(&self.attaches)
    }
    pub(crate) fn detach(&self) {
        bump(&self.detaches)
    }
    pub(crate) fn probe(&self) {
        bump(&self.probes)
    }
    pub(crate) fn fault(&self) {
        bump(&self.faults)
    }
    pub(crate) fn fault_delivered(&self) {
        bump(&self.faults_delivered)
    }
    pub(crate) fn fault_dropped(&self) {
        bump(&self.faults_dropped)
    }
    pub(crate) fn malformed(&self) {
        bump(&self.malformed)
    }
    pub(crate) fn status(&self, s: Status) {
        bump(&self.statuses[s as usize])
    }

    /// Copy every counter.
    pub fn snapshot(&self) -> CounterSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut statuses = [0; Status::COUNT];
        for (d, s) in statuses.iter_mut().zip(self.statuses.iter()) {
            *d = r(s);
        }
        CounterSnapshot {
            kicks: r(&self.kicks),
            interrupts: r(&self.interrupts),
            maps: r(&self.maps),
            unmaps: r(&self.unmaps),
            attaches: r(&self.attaches),
            detaches: r(&self.detaches),
            probes: r(&self.probes),
            faults: r(&self.faults),
            faults_delivered: r(&self.faults_delivered),
            faults_dropped: r(&self.faults_dropped),
            malformed: r(&self.malformed),
            statuses,
        }
    }

    /// Set every counter to `s` (restore of saved state).
    pub(crate) fn restore(&self, s: &CounterSnapshot) {
        let w = |c: &AtomicU64, v: u64| c.store(v, Ordering::Relaxed);
        w(&self.kicks, s.kicks);
        w(&self.interrupts, s.interrupts);
        w(&self.maps, s.maps);
        w(&self.unmaps, s.unmaps);
        w(&self.attaches, s.attaches);
        w(&self.detaches, s.detaches);
        w(&self.probes, s.probes);
        w(&self.faults, s.faults);
        w(&self.faults_delivered, s.faults_delivered);
        w(&self.faults_dropped, s.faults_dropped);
        w(&self.malformed, s.malformed);
        for (c, v) in self.statuses.iter().zip(s.statuses.iter()) {
            w(c, *v);
        }
    }

    /// Write one `info` line with every counter (call at exit).
    pub fn log_summary(&self) {
        let s = self.snapshot();
        log::info!(
            "virtio-iommu: maps={} unmaps={} attaches={} detaches={} probes={} faults={} \
             (delivered={} dropped={}) malformed={} status[ok,ioerr,unsupp,deverr,inval,range,\
             noent,fault,nomem]={:?}",
            s.maps,
            s.unmaps,
            s.attaches,
            s.detaches,
            s.probes,
            s.faults,
            s.faults_delivered,
            s.faults_dropped,
            s.malformed,
            s.statuses
        );
    }
}
