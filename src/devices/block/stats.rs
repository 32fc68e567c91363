//! What a virtio-blk device did, for the exit summary and the per-I/O figures of the bench:
//! kicks, requests by type, descriptors and data segments per request, bytes, interrupts.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one disk, updated lock-free by whichever thread serves its queue.
#[derive(Debug, Default)]
pub struct BlockStats {
    /// Queue services (one per driver kick that found the device, inline or on the worker).
    pub kicks: AtomicU64,
    /// Requests (descriptor chains) completed.
    pub requests: AtomicU64,
    /// `VIRTIO_BLK_T_IN` requests.
    pub reads: AtomicU64,
    /// `VIRTIO_BLK_T_OUT` requests.
    pub writes: AtomicU64,
    /// `VIRTIO_BLK_T_FLUSH` requests.
    pub flushes: AtomicU64,
    /// Descriptors in all chains (header, data and status descriptors).
    pub descriptors: AtomicU64,
    /// Descriptors between each chain's first (header) and last (status) one: the data
    /// segments of well-formed requests.
    pub segments: AtomicU64,
    /// Bytes read from the disk into guest memory.
    pub read_bytes: AtomicU64,
    /// Bytes written from guest memory to the disk.
    pub written_bytes: AtomicU64,
    /// Used-ring interrupts the driver wanted (and got).
    pub interrupts: AtomicU64,
    /// Requests completed with an error status or none (malformed chains).
    pub errors: AtomicU64,
}

/// A copy of [`BlockStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStatsSnapshot {
    /// See [`BlockStats::kicks`].
    pub kicks: u64,
    /// See [`BlockStats::requests`].
    pub requests: u64,
    /// See [`BlockStats::reads`].
    pub reads: u64,
    /// See [`BlockStats::writes`].
    pub writes: u64,
    /// See [`BlockStats::flushes`].
    pub flushes: u64,
    /// See [`BlockStats::descriptors`].
    pub descriptors: u64,
    /// See [`BlockStats::segments`].
    pub segments: u64,
    /// See [`BlockStats::read_bytes`].
    pub read_bytes: u64,
    /// See [`BlockStats::written_bytes`].
    pub written_bytes: u64,
    /// See [`BlockStats::interrupts`].
    pub interrupts: u64,
    /// See [`BlockStats::errors`].
    pub errors: u64,
}

impl BlockStats {
    /// Add `n` to `counter`.
    #[inline]
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Current values.
    pub fn snapshot(&self) -> BlockStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlockStatsSnapshot {
            kicks: l(&self.kicks),
            requests: l(&self.requests),
            reads: l(&self.reads),
            writes: l(&self.writes),
            flushes: l(&self.flushes),
            descriptors: l(&self.descriptors),
            segments: l(&self.segments),
            read_bytes: l(&self.read_bytes),
            written_bytes: l(&self.written_bytes),
            interrupts: l(&self.interrupts),
            errors: l(&self.errors),
        }
    }
}

impl BlockStatsSnapshot {
    /// `blk: disk=NAME kicks=.. requests=.. ...` for the exit summary (one line per disk).
    pub fn summary_line(&self, disk: &str) -> String {
        format!(
            "blk: disk={disk} kicks={} requests={} reads={} writes={} flushes={} descriptors={} \
             segments={} read_bytes={} written_bytes={} interrupts={} errors={}",
            self.kicks,
            self.requests,
            self.reads,
            self.writes,
            self.flushes,
            self.descriptors,
            self.segments,
            self.read_bytes,
            self.written_bytes,
            self.interrupts,
            self.errors
        )
    }
}
