//! The `vmm` binary's seccomp filters refuse what they must: `--seccomp-selftest KIND` installs
//! the real filter of a thread kind through the same code path the VMM uses, makes an allowed
//! call, then a forbidden one (`socket`).

use std::process::Command;

fn selftest(kind: &str, mode: &str) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["--seccomp-selftest", kind, "--seccomp", mode])
        .output()
        .expect("run vmm");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn forbidden_call_stops_the_vmm_in_every_thread_kind() {
    for kind in [
        "main",
        "vcpu",
        "blk-worker",
        "poller",
        "tap-reader",
        "watchdog",
    ] {
        let (code, err) = selftest(kind, "on");
        assert!(err.contains("allowed call ok"), "{kind}: {err}");
        assert!(
            err.contains(&format!(
                "vmm: seccomp: forbidden system call {}",
                libc::SYS_socket
            )),
            "{kind}: {err}"
        );
        assert!(!err.contains("forbidden call returned"), "{kind}: {err}");
        if kind == "vcpu" {
            // A vCPU serves the CMOS RTC (glibc's gmtime_r must not open /etc/localtime
            // under the filter) ...
            let hour = err
                .lines()
                .find_map(|l| l.strip_prefix("seccomp selftest: RTC hour "))
                .and_then(|h| u8::from_str_radix(h.trim(), 16).ok())
                .unwrap_or_else(|| panic!("no RTC line: {err}"));
            assert!(
                hour <= 0x23 && hour & 0xf <= 9,
                "RTC hour {hour:#x} is not BCD 0..23"
            );
            // ... and may start a device worker thread that stacks its own filter.
            assert!(err.contains("worker thread filter installed"), "{err}");
        }
        if kind == "watchdog" {
            // A report reads every thread's /proc files under the filter (this process has
            // at least its main thread and the selftest thread).
            let n: usize = err
                .lines()
                .find_map(|l| l.strip_prefix("seccomp selftest: watchdog read the state of "))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no watchdog line: {err}"));
            assert!(n >= 2, "{err}");
        }
        assert_eq!(code, Some(159), "{kind}: {err}");
    }
}

#[test]
fn log_mode_lets_the_call_through_and_off_installs_nothing() {
    for mode in ["log", "off"] {
        let (code, err) = selftest("vcpu", mode);
        assert_eq!(code, Some(0), "{mode}: {err}");
        let fd: i32 = err
            .lines()
            .find_map(|l| l.strip_prefix("seccomp selftest: forbidden call returned "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{mode}: {err}"));
        assert!(fd >= 0, "{mode}: socket() must succeed unfiltered: {err}");
    }
}
