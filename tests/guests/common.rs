//! Shared pieces of the real-guest scenarios: the case type and common checks.

use std::path::PathBuf;

use rig::{Outcome, Scenario};

/// A check of one outcome: `Err(reason)` fails the scenario.
pub type Check = Box<dyn Fn(&Outcome) -> Result<(), String>>;

/// A scenario and the check its outcome must pass.
pub struct Case {
    /// What to run.
    pub scenario: Scenario,
    /// What must hold afterwards.
    pub check: Check,
    /// Opt-in cases (QEMU as the L2 VMM, checks of the rig itself) test the rig and the images,
    /// not our vmm; they run only when a name filter selects them or `GUESTS_ALL=1`.
    pub opt_in: bool,
    /// Times the scenario runs again when the L2 guest reset itself before its script ended
    /// ([`rig::Outcome::guest_reset_itself`]); any other failure counts at once.
    pub retries: u32,
}

impl Case {
    /// A case for our vmm.
    pub fn new(
        scenario: Scenario,
        check: impl Fn(&Outcome) -> Result<(), String> + 'static,
    ) -> Self {
        Self {
            scenario,
            check: Box::new(check),
            opt_in: false,
            retries: GUEST_RESET_RETRIES,
        }
    }

    /// An opt-in case (QEMU as the L2 VMM, or a check of the rig itself).
    pub fn opt_in(
        scenario: Scenario,
        check: impl Fn(&Outcome) -> Result<(), String> + 'static,
    ) -> Self {
        Self {
            scenario,
            check: Box::new(check),
            opt_in: true,
            retries: GUEST_RESET_RETRIES,
        }
    }
}

/// A value unique to this test run, so that output from an earlier run cannot pass a check.
pub fn nonce() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", t & 0xffff_ffff_ffff, std::process::id())
}

/// A directory for this process's disk images (under the target directory; per process, so
/// that concurrent runs do not overwrite each other's images).
pub fn scratch_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("guests")
        .join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Removes this process's scratch directory.
pub fn remove_scratch_dir() {
    let _ = std::fs::remove_dir_all(scratch_dir());
}

/// The VMM ran to the end: not killed, exit status 0, and the guest script reported 0.
pub fn clean_exit(o: &Outcome) -> Result<(), String> {
    if o.timed_out {
        return Err("timed out".into());
    }
    if o.guest_exit != Some(0) {
        return Err(format!("guest exit {:?}, want Some(0)", o.guest_exit));
    }
    if o.vmm_status != Some(0) {
        return Err(format!("VMM exit status {:?}, want Some(0)", o.vmm_status));
    }
    Ok(())
}

pub use rig::section;

/// The vmm's `viommu:` counters line (the last one on its stderr).
pub fn viommu_line(o: &Outcome) -> Option<&str> {
    o.vmm_log
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("viommu: "))
}

/// The `viommu:` counters line from the VMM's stderr, as name -> value.
pub fn counters(o: &Outcome) -> Result<Vec<(String, u64)>, String> {
    let line = viommu_line(o).ok_or("no 'viommu:' counters line in the VMM's stderr")?;
    vmm::iommu::parse_summary(line).ok_or_else(|| format!("unparseable counters line {line:?}"))
}

/// The counter `name` of [`counters`].
pub fn counter(c: &[(String, u64)], name: &str) -> Result<u64, String> {
    c.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| format!("counter {name} missing"))
}

/// Times any case runs again when its L2 guest reset itself (a triple fault of the nested
/// environment, which QEMU as the L2 VMM shows too: `qemu-net-dpdk-soak`). Seen in
/// `net-dpdk-testpmd` and `stress-rebind-strict`, whose 2 vCPUs stay busy.
pub const GUEST_RESET_RETRIES: u32 = 2;

/// Whether a case runs in this invocation of the guests binary: name filters (arguments not
/// starting with `-`) select by substring; with none, every default case runs, and the opt-in
/// ones only with `GUESTS_ALL=1`. `--list` runs nothing.
pub fn will_run(name: &str, opt_in: bool) -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return false;
    }
    selects(&args, name, opt_in)
}

/// The selection rule of [`will_run`] for explicit `args`.
pub fn selects(args: &[String], name: &str, opt_in: bool) -> bool {
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if filters.is_empty() {
        !opt_in || std::env::var("GUESTS_ALL").is_ok_and(|v| v == "1")
    } else {
        filters.iter().any(|f| name.contains(f.as_str()))
    }
}

/// The value printed by the guest as `KEY value` on a line of its own (last occurrence).
pub fn value<'a>(serial: &'a str, key: &str) -> Option<&'a str> {
    serial
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .map(str::trim)
}

/// Guest script fragment printing the kernel log lines of level err or worse between markers.
pub const KERNEL_ERRORS_SH: &str = r#"
echo KERNEL-ERRORS-BEGIN
dmesg -r | grep -E '^<[0-3]>' || true
echo KERNEL-ERRORS-END
"#;

/// The guest's kernel log had no line of level err or worse, and the console no oops.
pub fn kernel_log_clean(o: &Outcome) -> Result<(), String> {
    let errors = section(&o.serial, "KERNEL-ERRORS-BEGIN", "KERNEL-ERRORS-END")
        .ok_or("the kernel error section is missing from the console")?;
    if !errors.is_empty() {
        return Err(format!("kernel logged errors:\n{}", errors.join("\n")));
    }
    for bad in ["Kernel panic", "Call Trace:", "BUG:", "Oops"] {
        if o.serial.contains(bad) {
            return Err(format!("console contains {bad:?}"));
        }
    }
    Ok(())
}
