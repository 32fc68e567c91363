//! Real-guest scenarios (harness = false): boots Linux guests through the rig, checks what they
//! saw, prints PASS/FAIL per scenario and exits non-zero on any failure.
//!
//!   cargo test --test guests                 # every scenario for our vmm
//!   cargo test --test guests -- boot cpus    # scenarios whose name contains "boot" or "cpus"
//!   cargo test --test guests -- qemu-        # the reference scenarios (QEMU as the L2 VMM)
//!   cargo test --test guests -- --list       # list every scenario name (opt-in ones too)
//!
//!   cargo test --test guests -- rig-         # checks of the rig itself (exit status, timeout)
//!
//! GUESTS_ALL=1 adds the opt-in scenarios (qemu-*, rig-*) to an unfiltered run. Rig knobs (RIG_MODE,
//! RIG_VERBOSE, RIG_KEEP, RIG_VMM, RIG_NO_BUILD): see the rig crate.

#[path = "guests/boot.rs"]
mod boot;
#[path = "guests/common.rs"]
mod common;
#[path = "guests/iommu.rs"]
mod iommu;
#[path = "guests/net.rs"]
mod net;
#[path = "guests/rigcheck.rs"]
mod rigcheck;
#[path = "guests/selftest.rs"]
mod selftest;
#[path = "guests/stress.rs"]
// The rebind workload and cell names are the soak's (tests/soak.rs); only the stress cases run here.
#[allow(dead_code)]
mod stress;
#[path = "guests/vfio.rs"]
mod vfio;
#[path = "guests/vtd.rs"]
mod vtd;

use std::process::ExitCode;

use common::{selects, verdict, Case, Verdict};

fn all_cases() -> Vec<Case> {
    let mut v = selftest::cases();
    v.extend(boot::cases());
    v.extend(iommu::cases());
    v.extend(vfio::cases());
    v.extend(net::cases());
    v.extend(stress::cases());
    v.extend(vtd::cases());
    v.extend(boot::viommu_reference_cases());
    v.extend(rigcheck::cases());
    v
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let list = args.iter().any(|a| a == "--list");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();

    // `--list` names every case, opt-in ones too.
    let cases: Vec<Case> = all_cases()
        .into_iter()
        .filter(|c| (list && filters.is_empty()) || selects(&args, &c.scenario.name, c.opt_in))
        .collect();
    if list {
        for c in &cases {
            println!("{}: test", c.scenario.name);
        }
        return ExitCode::SUCCESS;
    }
    if cases.is_empty() {
        eprintln!("guests: no scenario matches {filters:?}");
        return ExitCode::FAILURE;
    }

    let scenarios: Vec<rig::Scenario> = cases.iter().map(|c| c.scenario.clone()).collect();
    let outcomes = match rig::run(&scenarios) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("guests: rig failed: {e}");
            return ExitCode::FAILURE;
        }
    };

    // No retries: a guest reset fails the scenario unless the scenario documents an
    // environment cause (common::EnvCause); an L1 that froze or died is an environment
    // failure, reported apart from ours (the rig ran the rest in a fresh L1).
    let (mut failed, mut env_failed, mut env_resets) = (Vec::new(), Vec::new(), Vec::new());
    for (case, outcome) in cases.iter().zip(&outcomes) {
        let name = &case.scenario.name;
        let secs = outcome.duration.as_secs_f64();
        let (v, why) = verdict(case, outcome);
        let why = why.unwrap_or_default();
        match v {
            Verdict::Pass => {
                println!("PASS {name} ({secs:.1} s)");
                continue;
            }
            Verdict::L1Failure => {
                println!("ENV-FAIL {name}: {why}: an environment failure, not our vmm's result");
                if let Some(f) = &outcome.l1_failure {
                    println!("---- {name}: L1 console (last lines) ----");
                    println!("{}", f.console_tail);
                }
                println!("---- {name}: L2 console before L1 failed (last 20 lines) ----");
                println!("{}", outcome.serial_tail(20));
                println!("---- end of {name} ----");
                env_failed.push(name.clone());
                continue;
            }
            Verdict::GuestReset => match &case.env_cause {
                Some(c) => {
                    println!(
                        "ENV-RESET {name} ({secs:.1} s): the L2 guest reset itself; documented \
                         environment cause: {} (soak: {}); not a pass",
                        c.reason, c.soak
                    );
                    env_resets.push(name.clone());
                    continue;
                }
                None => println!(
                    "FAIL {name} ({secs:.1} s): the L2 guest reset itself (triple fault) before \
                     its script finished, and the scenario documents no environment cause; \
                     check: {why}"
                ),
            },
            Verdict::Hang => {
                println!("FAIL {name} ({secs:.1} s): hang (killed at its timeout): {why}")
            }
            Verdict::Fail => println!("FAIL {name} ({secs:.1} s): {why}"),
        }
        println!("---- {name}: L2 console (last 40 lines) ----");
        println!("{}", outcome.serial_tail(40));
        println!("---- {name}: VMM stderr (last 40 lines) ----");
        println!("{}", rig::tail_lines(&outcome.vmm_log, 40));
        if !outcome.l1_log.trim().is_empty() {
            println!("---- {name}: L1 kernel log during the scenario (last 20 lines) ----");
            println!("{}", rig::tail_lines(&outcome.l1_log, 20));
        }
        println!("---- end of {name} ----");
        failed.push(name.clone());
    }
    if outcomes.len() != cases.len() {
        println!(
            "FAIL: rig returned {} outcomes for {} scenarios",
            outcomes.len(),
            cases.len()
        );
        return ExitCode::FAILURE;
    }
    let list = |v: &[String]| {
        if v.is_empty() {
            String::new()
        } else {
            format!(" ({})", v.join(", "))
        }
    };
    println!(
        "guests: {} passed, {} failed{}, {} environment failures (L1 froze or died){}, {} \
         environment resets{}",
        cases.len() - failed.len() - env_failed.len() - env_resets.len(),
        failed.len(),
        list(&failed),
        env_failed.len(),
        list(&env_failed),
        env_resets.len(),
        list(&env_resets),
    );
    // An environment failure is not a pass either: the scenario's result is unknown.
    let failed = !failed.is_empty() || !env_failed.is_empty();
    // Disk images stay for a look when something failed.
    if !failed {
        common::remove_scratch_dir();
        ExitCode::SUCCESS
    } else {
        println!(
            "guests: disk images kept in {}",
            common::scratch_dir().display()
        );
        ExitCode::FAILURE
    }
}
