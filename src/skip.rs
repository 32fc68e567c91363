//! Tests that cannot run on this machine (no usable /dev/kvm, no TAP, ...) report themselves
//! as skipped instead of passing silently: a `SKIPPED <test>: <reason>` line on stderr and the
//! same line in the skip log, which `make test-unit` and `make test-integration` count and list
//! at the end of the stage (libtest lists a test that returns as `ok`, and captures what a
//! passing test prints through `eprintln!`, hence the file and the direct stderr write).
//!
//! The log is `$VMM_SKIP_LOG` when set (the Makefile sets it), else `target/skipped.txt` in
//! the workspace. With `VMM_TEST_NO_SKIP=1` a test that cannot run fails instead, for hosts
//! where every test must run.

use std::io::Write;
use std::path::Path;

/// Environment variable that turns a skip into a failure when set to `1`.
pub const NO_SKIP_ENV: &str = "VMM_TEST_NO_SKIP";

/// The skip log's path.
pub fn log_path() -> std::path::PathBuf {
    match std::env::var_os("VMM_SKIP_LOG") {
        Some(p) if !p.is_empty() => p.into(),
        _ => concat!(env!("CARGO_MANIFEST_DIR"), "/target/skipped.txt").into(),
    }
}

/// Record that `test` did not run because of `reason`; the caller then returns. Panics
/// instead (failing `test`) when `VMM_TEST_NO_SKIP=1`.
#[track_caller]
pub fn skipped(test: &str, reason: &str) {
    if std::env::var_os(NO_SKIP_ENV).is_some_and(|v| v == "1") {
        panic!("{test} cannot run here ({reason}) and {NO_SKIP_ENV}=1 forbids skipping");
    }
    let line = line(test, reason);
    // Straight to the stderr handle: eprintln! output of a passing test is captured and lost.
    let _ = writeln!(std::io::stderr().lock(), "{line}");
    let path = log_path();
    if let Err(e) = append(&path, &line) {
        let _ = writeln!(std::io::stderr().lock(), "skip log {}: {e}", path.display());
    }
}

/// `/dev/kvm` if it opens; otherwise records `test` as skipped and returns `None`.
#[track_caller]
pub fn kvm_or_skip(test: &str) -> Option<kvm_ioctls::Kvm> {
    match kvm_ioctls::Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            skipped(test, &format!("/dev/kvm not usable ({e})"));
            None
        }
    }
}

/// The log line of a skip (one line, whatever `reason` holds).
fn line(test: &str, reason: &str) -> String {
    format!("SKIPPED {test}: {}", reason.replace('\n', " "))
}

/// Append `line` in one write: O_APPEND keeps the lines of tests running in parallel whole.
fn append(path: &Path, line: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(format!("{line}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    // A file of its own: tests of this binary that skip append to the real log meanwhile.
    #[test]
    fn skips_append_one_line_each() {
        let path = std::env::temp_dir().join(format!("vmm-skip-selftest-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        append(&path, &line("a::b", "no /dev/kvm")).unwrap();
        append(&path, &line("c", "two\nlines")).unwrap();
        let log = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(log, "SKIPPED a::b: no /dev/kvm\nSKIPPED c: two lines\n");
    }
}
