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
    /// L1 (nested mode) stopped making progress: a scenario ran past its timeout (which L1
    /// itself enforces) by [`crate::nested::FREEZE_GRACE`] with L1 silent. Seen under QEMU TCG:
    /// both L1 vCPUs halted for good. `done` holds the batch's outcomes before that scenario.
    #[error(
        "rig: L1 froze while scenario '{running}' was running ({:.0} s without a result); last lines seen:\n{last_lines}",
        after.as_secs_f64()
    )]
    L1Froze {
        /// Time since the scenario started.
        after: Duration,
        /// The scenario running.
        running: String,
        /// Outcomes of the scenarios of the batch that finished before it, in order.
        done: Vec<crate::Outcome>,
        /// The last lines of output.
        last_lines: String,
    },
    /// The L0 QEMU (nested mode) ended before reporting every scenario.
    #[error(
        "rig: L1 ended early ({status}) while {}; last lines seen:\n{last_lines}",
        running.as_deref().map(|n| format!("scenario '{n}' was running")).unwrap_or_else(|| "no scenario was running".into())
    )]
    L1Ended {
        /// How the L0 QEMU exited.
        status: String,
        /// The scenario running at that moment, if any.
        running: Option<String>,
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
