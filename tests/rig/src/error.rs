//! Errors of a rig run (a scenario failing its check is not one of them).

use std::time::Duration;

/// Why a rig run could not produce outcomes.
#[derive(Debug, thiserror::Error)]
pub enum RigError {
    /// Bad scenario list or environment.
    #[error("rig configuration: {0}")]
    Config(String),
    /// Building images or the vmm failed.
    #[error("rig build: {0}")]
    Build(String),
    /// An I/O operation failed.
    #[error("rig I/O: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The whole run took longer than its global limit.
    #[error(
        "rig: global timeout after {:.0} s while {}; last lines seen:\n{last_lines}",
        after.as_secs_f64(),
        running.as_deref().map(|n| format!("scenario '{n}' was running")).unwrap_or_else(|| "no scenario was running (L1 boot or shutdown)".into())
    )]
    Timeout {
        /// Time waited.
        after: Duration,
        /// The scenario running at that moment, if any.
        running: Option<String>,
        /// The last lines of output (scenario output, else the L1 console).
        last_lines: String,
    },
    /// L1 (nested mode) froze or died before reporting every scenario of a batch: a scenario
    /// ran past its timeout (which L1 itself enforces) by [`crate::nested::FREEZE_GRACE`] with
    /// L1 silent (seen under QEMU TCG: both L1 vCPUs halted for good), or the L0 QEMU exited
    /// (L1 panicked, powered off). `done` holds the batch's outcomes before the scenario it
    /// happened under, `failed` that scenario's outcome ([`crate::Outcome::l1_failure`] set).
    #[error(
        "rig: {} while scenario '{}' was running; last lines seen:\n{last_lines}",
        failed.l1_failure.as_ref().map_or("L1 failed".into(), |f| f.to_string()),
        failed.name
    )]
    L1Failed {
        /// Outcomes of the scenarios of the batch that finished before it, in order.
        done: Vec<crate::Outcome>,
        /// The scenario L1 failed under.
        failed: Box<crate::Outcome>,
        /// The last lines of output.
        last_lines: String,
    },
}

impl RigError {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RigError::Io {
            context: context.into(),
            source,
        }
    }
}
