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
mod stress;
#[path = "guests/vfio.rs"]
mod vfio;
#[path = "guests/vtd.rs"]
mod vtd;

use std::process::ExitCode;

use common::{selects, Case};

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

/// Run again, up to its `retries`, every case that failed because its L2 guest reset itself
/// ([`rig::Outcome::guest_reset_itself`]); the new outcome replaces the old.
fn retry_guest_resets(cases: &[Case], outcomes: &mut [rig::Outcome]) {
    for attempt in 1.. {
        let again: Vec<usize> = (0..cases.len())
            .filter(|&i| {
                let (c, o) = (&cases[i], &outcomes[i]);
                attempt <= c.retries
                    && o.guest_reset_itself(c.scenario.program)
                    && (c.check)(o).is_err()
            })
            .collect();
        if again.is_empty() {
            return;
        }
        for &i in &again {
            let (c, o) = (&cases[i], &outcomes[i]);
            println!(
                "RETRY {} (attempt {} of {}): the L2 guest reset itself (triple fault) before its \
                 script finished, a fault of nested KVM on QEMU TCG that QEMU as the L2 VMM shows \
                 too; last console lines:\n{}",
                c.scenario.name,
                attempt + 1,
                c.retries + 1,
                o.serial_tail(8)
            );
        }
        let scenarios: Vec<rig::Scenario> =
            again.iter().map(|&i| cases[i].scenario.clone()).collect();
        match rig::run(&scenarios) {
            Ok(o) if o.len() == again.len() => {
                for (k, &i) in again.iter().enumerate() {
                    outcomes[i] = o[k].clone();
                }
            }
            Ok(_) => return,
            Err(e) => {
                eprintln!("guests: rig failed on the retry: {e}");
                return;
            }
        }
    }
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
    let mut outcomes = match rig::run(&scenarios) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("guests: rig failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    if outcomes.len() == cases.len() {
        retry_guest_resets(&cases, &mut outcomes);
    }

    let mut failed = Vec::new();
    for (case, outcome) in cases.iter().zip(&outcomes) {
        let name = &case.scenario.name;
        match (case.check)(outcome) {
            Ok(()) => println!("PASS {name} ({:.1} s)", outcome.duration.as_secs_f64()),
            Err(why) => {
                println!(
                    "FAIL {name} ({:.1} s): {why}",
                    outcome.duration.as_secs_f64()
                );
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
        }
    }
    if outcomes.len() != cases.len() {
        println!(
            "FAIL: rig returned {} outcomes for {} scenarios",
            outcomes.len(),
            cases.len()
        );
        return ExitCode::FAILURE;
    }
    println!(
        "guests: {} passed, {} failed{}",
        cases.len() - failed.len(),
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(": {}", failed.join(", "))
        }
    );
    // Disk images stay for a look when something failed.
    if failed.is_empty() {
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
