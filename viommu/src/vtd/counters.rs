//! What one DMA-remapping unit did, counted lock-free for the exit line and the benches.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one unit (shared with the VMM through an `Arc`).
#[derive(Debug, Default)]
pub struct Counters {
    maps: AtomicU64,
    unmaps: AtomicU64,
    invalidations: AtomicU64,
    waits: AtomicU64,
    walk_reads: AtomicU64,
    faults: AtomicU64,
    faults_dropped: AtomicU64,
    errors: AtomicU64,
}

/// A copy of [`Counters`] at one point in time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Engine MAPs (one per contiguous run the diff produced).
    pub maps: u64,
    /// Engine UNMAPs (one per range the diff produced).
    pub unmaps: u64,
    /// Context-cache, IOTLB, device-TLB and interrupt-entry invalidations (queued or
    /// register-based).
    pub invalidations: u64,
    /// Invalidation wait descriptors completed.
    pub waits: u64,
    /// Second-level table entries read by range walks.
    pub walk_reads: u64,
    /// DMA faults recorded in the fault registers (or overflowed).
    pub faults: u64,
    /// DMA faults not recorded: FPD, rate limit, or the pending list was full.
    pub faults_dropped: u64,
    /// Queue errors (IQE), walks over budget, engine refusals.
    pub errors: u64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn maps(&self, n: u64) {
        add(&self.maps, n);
    }
    pub(crate) fn unmaps(&self, n: u64) {
        add(&self.unmaps, n);
    }
    pub(crate) fn invalidation(&self) {
        add(&self.invalidations, 1);
    }
    pub(crate) fn wait(&self) {
        add(&self.waits, 1);
    }
    pub(crate) fn walk_reads(&self, n: u64) {
        add(&self.walk_reads, n);
    }
    pub(crate) fn fault(&self) {
        add(&self.faults, 1);
    }
    pub(crate) fn fault_dropped(&self) {
        add(&self.faults_dropped, 1);
    }
    pub(crate) fn error(&self) {
        add(&self.errors, 1);
    }

    /// Set every counter to `s` (restore of saved state).
    pub(crate) fn restore(&self, s: &CounterSnapshot) {
        let set = |c: &AtomicU64, v: u64| c.store(v, Ordering::Relaxed);
        set(&self.maps, s.maps);
        set(&self.unmaps, s.unmaps);
        set(&self.invalidations, s.invalidations);
        set(&self.waits, s.waits);
        set(&self.walk_reads, s.walk_reads);
        set(&self.faults, s.faults);
        set(&self.faults_dropped, s.faults_dropped);
        set(&self.errors, s.errors);
    }

    /// The current values.
    pub fn snapshot(&self) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            maps: get(&self.maps),
            unmaps: get(&self.unmaps),
            invalidations: get(&self.invalidations),
            waits: get(&self.waits),
            walk_reads: get(&self.walk_reads),
            faults: get(&self.faults),
            faults_dropped: get(&self.faults_dropped),
            errors: get(&self.errors),
        }
    }
}

impl CounterSnapshot {
    /// The one-line summary printed at exit: `vtd: maps=.. unmaps=.. invalidations=.. faults=..
    /// errors=.. waits=.. walk_reads=.. faults_dropped=..`.
    pub fn summary_line(&self) -> String {
        format!(
            "vtd: maps={} unmaps={} invalidations={} faults={} errors={} waits={} walk_reads={} \
             faults_dropped={}",
            self.maps,
            self.unmaps,
            self.invalidations,
            self.faults,
            self.errors,
            self.waits,
            self.walk_reads,
            self.faults_dropped
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_summarizes() {
        let c = Counters::default();
        c.maps(3);
        c.unmaps(2);
        c.invalidation();
        c.invalidation();
        c.wait();
        c.walk_reads(40);
        c.fault();
        c.fault_dropped();
        c.error();
        let s = c.snapshot();
        assert_eq!(
            s.summary_line(),
            "vtd: maps=3 unmaps=2 invalidations=2 faults=1 errors=1 waits=1 walk_reads=40 \
             faults_dropped=1"
        );
        assert_eq!(CounterSnapshot::default().maps, 0);
    }
}
