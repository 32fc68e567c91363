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
