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
    /// Why this scenario's L2 guest may reset itself because of the environment, with the
    /// soak figures that show it. Without one (every case for now) a guest reset fails the
    /// scenario; with one it is reported as an environment reset, not a pass.
    pub env_cause: Option<EnvCause>,
}

/// A documented environment cause of guest resets ([`Case::env_cause`]).
#[derive(Clone, Copy, Debug)]
pub struct EnvCause {
    /// What in the environment resets the guest, and how that was shown.
    pub reason: &'static str,
    /// The soak figures (`make soak`: resets per 100 runs, ours and QEMU's, per cell).
    pub soak: &'static str,
}

/// How one outcome is judged, from the evidence only (rig, console, exit status, check).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The check passed.
    Pass,
    /// The L2 guest reset itself before its script finished ([`rig::Outcome::guest_reset_itself`]).
    GuestReset,
    /// The VMM was killed at the scenario's timeout.
    Hang,
    /// L1 froze or died while the scenario ran: an environment failure ([`rig::L1Failure`]).
    L1Failure,
    /// The check failed otherwise (a wrong result, a VMM error, a guest error).
    Fail,
}

/// The verdict for `o` under `case`, and the check's message when it did not pass.
pub fn verdict(case: &Case, o: &Outcome) -> (Verdict, Option<String>) {
    if let Some(f) = &o.l1_failure {
        return (Verdict::L1Failure, Some(f.to_string()));
    }
    match (case.check)(o) {
        Ok(()) => (Verdict::Pass, None),
        Err(why) if o.guest_reset_itself(case.scenario.program) => (Verdict::GuestReset, Some(why)),
        Err(why) if o.timed_out => (Verdict::Hang, Some(why)),
        Err(why) => (Verdict::Fail, Some(why)),
    }
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
            env_cause: None,
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
            env_cause: None,
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

/// The `vtd:` counters line of the VMM's stderr, printed, as name -> value.
pub(crate) fn vtd_counters(o: &Outcome) -> Result<Vec<(String, u64)>, String> {
    let line = o
        .vmm_log
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("vtd: "))
        .ok_or("no 'vtd:' counters line in the VMM's stderr")?;
    println!("    {}: {}", o.name, line.trim());
    line.trim()
        .trim_start_matches("vtd: ")
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| format!("unparseable counters line {line:?}"))
}

pub(crate) fn vtd_counter(c: &[(String, u64)], name: &str) -> Result<u64, String> {
    c.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| format!("counter {name} missing"))
}

/// VT-d warnings and errors in the VMM's log.
pub(crate) fn vtd_warnings(o: &Outcome) -> Vec<&str> {
    o.vmm_log
        .lines()
        .filter(|l| {
            (l.starts_with("[vmm WARN") || l.starts_with("[vmm ERROR")) && l.contains("vtd")
        })
        .collect()
}

/// The unit saw invalidations, no fault and no error, logged no warning; mappings as the mode
/// implies.
pub(crate) fn vtd_counters_check(o: &Outcome, translated: bool) -> Result<(), String> {
    let warnings = vtd_warnings(o);
    if !warnings.is_empty() {
        return Err(format!("the VMM logged:\n{}", warnings.join("\n")));
    }
    let c = vtd_counters(o)?;
    for bad in ["errors", "faults"] {
        let n = vtd_counter(&c, bad)?;
        if n != 0 {
            return Err(format!("{bad}={n} in the vtd counters line"));
        }
    }
    if vtd_counter(&c, "invalidations")? == 0 {
        return Err("no invalidation reached the unit".into());
    }
    let (maps, unmaps) = (vtd_counter(&c, "maps")?, vtd_counter(&c, "unmaps")?);
    match translated {
        true if maps == 0 || unmaps == 0 => Err(format!("maps={maps} unmaps={unmaps}, want > 0")),
        false if maps != 0 => Err(format!("pass-through but maps={maps}")),
        _ => Ok(()),
    }
}

/// The disk (the script's `VDA-BDF`/`VDA-GROUP`/`VDA-DOMAIN` lines) is at `bdf` when given and in
/// an IOMMU group whose domain type is `want` (`DMA`, `DMA-FQ`, `identity`).
pub(crate) fn disk_group_check(o: &Outcome, want: &str, bdf: Option<&str>) -> Result<(), String> {
    let got = value(&o.serial, "VDA-BDF").ok_or("no VDA-BDF line")?;
    if bdf.is_some_and(|b| b != got) {
        return Err(format!("disk at {got}, want {bdf:?}"));
    }
    let group = value(&o.serial, "VDA-GROUP").ok_or("no VDA-GROUP line")?;
    if group == "none" {
        return Err(format!("disk {got} is in no IOMMU group"));
    }
    let ty = value(&o.serial, "VDA-DOMAIN").ok_or("no VDA-DOMAIN line")?;
    if ty != want {
        return Err(format!("group {group} has domain type {ty}, want {want}"));
    }
    Ok(())
}
