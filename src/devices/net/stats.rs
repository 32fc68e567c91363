//! Per-port counters of a virtio-net device (the exit summary's `net:` lines).

use std::sync::atomic::{AtomicU64, Ordering};

/// Per-port counters.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames the guest sent.
    pub tx_frames: AtomicU64,
    /// TX chains refused (bad layout, oversized, translation miss).
    pub tx_errors: AtomicU64,
    /// Frames written into the guest's RX buffers.
    pub rx_frames: AtomicU64,
    /// Frames dropped on the way in (backlog full, device stopped, oversized, guest memory).
    pub rx_dropped: AtomicU64,
    /// RX chains completed empty because they were malformed.
    pub rx_bad_chains: AtomicU64,
    /// Control commands served.
    pub ctrl_commands: AtomicU64,
    /// Driver kicks of the TX queue.
    pub tx_kicks: AtomicU64,
    /// Driver kicks of the RX queue.
    pub rx_kicks: AtomicU64,
}

/// A snapshot of [`NetStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStatsSnapshot {
    /// See [`NetStats::tx_frames`].
    pub tx_frames: u64,
    /// See [`NetStats::tx_errors`].
    pub tx_errors: u64,
    /// See [`NetStats::rx_frames`].
    pub rx_frames: u64,
    /// See [`NetStats::rx_dropped`].
    pub rx_dropped: u64,
    /// See [`NetStats::rx_bad_chains`].
    pub rx_bad_chains: u64,
    /// See [`NetStats::ctrl_commands`].
    pub ctrl_commands: u64,
    /// See [`NetStats::tx_kicks`].
    pub tx_kicks: u64,
    /// See [`NetStats::rx_kicks`].
    pub rx_kicks: u64,
}

impl NetStatsSnapshot {
    /// `net: mac=.. tx_frames=.. ...` for the exit summary (one line per port).
    pub fn summary_line(&self, mac: [u8; 6]) -> String {
        let m: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "net: mac={} tx_frames={} rx_frames={} tx_kicks={} rx_kicks={} tx_errors={} \
             rx_dropped={} rx_bad_chains={} ctrl_commands={}",
            m.join(":"),
            self.tx_frames,
            self.rx_frames,
            self.tx_kicks,
            self.rx_kicks,
            self.tx_errors,
            self.rx_dropped,
            self.rx_bad_chains,
            self.ctrl_commands
        )
    }
}

impl NetStats {
    /// Current values.
    pub fn snapshot(&self) -> NetStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetStatsSnapshot {
            tx_frames: l(&self.tx_frames),
            tx_errors: l(&self.tx_errors),
            rx_frames: l(&self.rx_frames),
            rx_dropped: l(&self.rx_dropped),
            rx_bad_chains: l(&self.rx_bad_chains),
            ctrl_commands: l(&self.ctrl_commands),
            tx_kicks: l(&self.tx_kicks),
            rx_kicks: l(&self.rx_kicks),
        }
    }
}

/// Count one.
pub(super) fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}
