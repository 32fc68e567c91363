//! Tests that cannot run on this machine (no usable /dev/kvm, no TAP, ...) report themselves
//! as skipped instead of passing silently: a `SKIPPED` line on stderr and one line in the skip
//! log, which `make test-unit` and `make test-integration` count and list at the end of the
//! stage (libtest hides the output of tests that return normally, hence the file).
//!
//! The log is `$VMM_SKIP_LOG` when set (the Makefile sets it), else `target/skipped.txt` in
//! the workspace.

use std::io::Write;

/// The skip log's path.
pub fn log_path() -> std::path::PathBuf {
    match std::env::var_os("VMM_SKIP_LOG") {
        Some(p) => p.into(),
        None => concat!(env!("CARGO_MANIFEST_DIR"), "/target/skipped.txt").into(),
    }
}

/// Record that `test` did not run because of `reason`; the caller then returns.
pub fn skipped(test: &str, reason: &str) {
    let line = format!("SKIPPED {test}: {reason}");
    eprintln!("{line}");
    let path = log_path();
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        eprintln!("skip log {}: {e}", path.display());
    }
}

/// `/dev/kvm` if it opens; otherwise records `test` as skipped and returns `None`.
pub fn kvm_or_skip(test: &str) -> Option<kvm_ioctls::Kvm> {
    match kvm_ioctls::Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            skipped(test, &format!("/dev/kvm not usable ({e})"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_lands_in_the_log() {
        let path = log_path();
        let tag = format!("skip-selftest-{}", std::process::id());
        skipped(&tag, "testing the skip log");
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            log.lines()
                .any(|l| l == format!("SKIPPED {tag}: testing the skip log")),
            "{}: {log}",
            path.display()
        );
        // Remove our own line so the stage's count only lists real skips.
        let rest: String = log
            .lines()
            .filter(|l| !l.contains(&tag))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, rest).unwrap();
    }
}
