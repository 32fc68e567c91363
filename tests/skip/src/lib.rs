//! Honest skips for tests that cannot run on this host (no /dev/kvm, no TAP access, no guest
//! kernel built).
//!
//! libtest has no runtime "skipped" outcome: a test that returns early is reported `ok`. A test
//! that cannot run calls [`skip`] and returns; that
//! - prints `SKIPPED <test> (<file>:<line>): <reason>` on stderr, past libtest's output
//!   capture, so it shows even though the test is listed as `ok`;
//! - appends the same line to the skip list, [`SKIP_FILE_ENV`] (the Makefile's test stages set
//!   it, empty it first and print the count and the list at the end), or
//!   `<target dir>/<profile>/skipped.txt` next to the test binary's `deps/` when it is unset;
//! - panics instead when [`NO_SKIP_ENV`] is set to `1`, for hosts where every test must run.
//!
//! ```no_run
//! #[test]
//! fn port_io_reaches_the_device() {
//!     let kvm = match std::fs::File::open("/dev/kvm") {
//!         Ok(f) => f,
//!         Err(e) => return test_skip::skip(format_args!("/dev/kvm not usable ({e})")),
//!     };
//!     // ... the test proper.
//! #   drop(kvm);
//! }
//! ```

use std::fmt::Display;
use std::io::Write;
use std::path::PathBuf;

/// Environment variable naming the file skips are appended to.
pub const SKIP_FILE_ENV: &str = "VMM_SKIP_FILE";
/// Environment variable that turns a skip into a failure when set to `1`.
pub const NO_SKIP_ENV: &str = "VMM_TEST_NO_SKIP";

/// The skip list this process appends to.
pub fn skip_file() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(SKIP_FILE_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    // <target>/<profile>/deps/<test binary> -> <target>/<profile>/skipped.txt
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.join("skipped.txt"))
}

/// The line [`skip`] reports for `test`, skipped at `location` for `reason`.
pub fn skip_line(test: &str, location: &str, reason: &dyn Display) -> String {
    // One line per skip, whatever the reason contains.
    let reason = reason.to_string().replace('\n', " ");
    format!("SKIPPED {test} ({location}): {reason}")
}

/// The calling test cannot run here because of `reason`: report and record it (see the crate
/// docs). The caller returns right after. The test's name is its libtest thread's name.
#[track_caller]
pub fn skip(reason: impl Display) {
    let caller = std::panic::Location::caller();
    let location = format!("{}:{}", caller.file(), caller.line());
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("<unnamed thread>");
    if std::env::var_os(NO_SKIP_ENV).is_some_and(|v| v == "1") {
        panic!("{test} cannot run here ({reason}) and {NO_SKIP_ENV}=1 forbids skipping");
    }
    let line = skip_line(test, &location, &reason);
    // Straight to the stderr handle: eprintln! output of a passing test is captured and lost.
    let _ = writeln!(std::io::stderr().lock(), "{line}");
    match skip_file() {
        Some(path) => {
            if let Err(e) = append(&path, &line) {
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "test-skip: cannot record the skip in {}: {e}",
                    path.display()
                );
            }
        }
        None => {
            let _ = writeln!(std::io::stderr().lock(), "test-skip: no skip list found");
        }
    }
}

/// Append `line` in one write (O_APPEND: lines of concurrent tests do not interleave).
fn append(path: &std::path::Path, line: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(format!("{line}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_is_reported_once_per_call_with_its_test_and_place() {
        let path = std::env::temp_dir().join(format!("test-skip-{}.txt", std::process::id()));
        let _ = std::fs::remove_file(&path);
        append(&path, &skip_line("a::b", "src/x.rs:3", &"no /dev/kvm")).unwrap();
        append(&path, &skip_line("c", "tests/y.rs:9", &"two\nlines")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            text,
            "SKIPPED a::b (src/x.rs:3): no /dev/kvm\nSKIPPED c (tests/y.rs:9): two lines\n"
        );
    }
}
