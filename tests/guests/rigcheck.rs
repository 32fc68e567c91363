//! Checks of the rig itself: a guest exit status other than 0 is reported as such (default set:
//! cheap, and it keeps the other checks honest), and a scenario that outlives its timeout is
//! killed and reported as timed out, with the output it produced before (opt-in: it waits for
//! its timeout). Run both with `cargo test --test guests -- rig-`. Also the evidence hangs
//! leave: `rig-watchdog` (opt-in) idles an L2 guest under `--watchdog 5,kmsg=on`, which must
//! log a report per quiet episode, not per tick (every vCPU in KVM_RUN, the VMM's threads), on
//! stderr and in L1's log.

use std::time::Duration;

use rig::{Outcome, Program, Scenario};

use crate::common::{nonce, Case};

fn exit_status_check(marker: String) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o| {
        if o.timed_out {
            return Err("timed out".into());
        }
        if o.guest_exit != Some(7) {
            return Err(format!("guest exit {:?}, want Some(7)", o.guest_exit));
        }
        if o.vmm_status != Some(0) {
            return Err(format!("vmm status {:?}, want Some(0)", o.vmm_status));
        }
        if !o.serial.contains(&marker) {
            return Err("marker missing".into());
        }
        Ok(())
    }
}

fn timeout_check(marker: String) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o| {
        if !o.timed_out {
            return Err(format!(
                "not reported as timed out (vmm status {:?})",
                o.vmm_status
            ));
        }
        if o.vmm_status.is_some() || o.guest_exit.is_some() {
            return Err(format!(
                "timed out but vmm status {:?}, guest exit {:?}",
                o.vmm_status, o.guest_exit
            ));
        }
        if !o.serial.contains(&marker) {
            return Err("output before the timeout was lost".into());
        }
        Ok(())
    }
}

fn watchdog_check(marker: String) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o| {
        crate::common::clean_exit(o)?;
        if !o.serial.contains(&marker) {
            return Err("marker missing".into());
        }
        let reports: Vec<&str> = o
            .vmm_log
            .lines()
            .filter(|l| l.contains(vmm::watchdog::REPORT_MARKER))
            .collect();
        // One per quiet episode: the guest may exit now and then (a timer read), never one
        // report per watchdog tick (20 s idle, 5 s limit: at most 4 episodes).
        if reports.is_empty()
            || reports.len() > 4
            || !reports
                .iter()
                .all(|r| r.contains(": no vCPU made progress"))
        {
            return Err(format!("want 1 to 4 no-progress reports, got {reports:?}"));
        }
        for want in [
            "vCPU 0: in KVM_RUN",
            "vCPU 1: in KVM_RUN",
            " vcpu0: state ",
            "END REPORT 1",
        ] {
            if !o.vmm_log.contains(want) {
                return Err(format!("report without {want:?}"));
            }
        }
        if !o.l1_log.contains("vmm watchdog: REPORT 1") {
            return Err("no /dev/kmsg copy of the report in L1's log".into());
        }
        Ok(())
    }
}

/// `rig-exit-status`, `rig-timeout`, `rig-watchdog`.
pub fn cases() -> Vec<Case> {
    let m1 = format!("RIG-EXIT-{}", nonce());
    let m2 = format!("RIG-SLEEP-{}", nonce());
    let m3 = format!("RIG-IDLE-{}", nonce());
    let mut wd_args = Scenario::default_args(Program::Vmm, 2, 0, 0);
    wd_args.extend(["--watchdog", "5,kmsg=on"].map(String::from));
    vec![
        Case::new(
            Scenario::vmm("rig-exit-status", format!("#!/bin/sh\necho {m1}\nexit 7\n")),
            exit_status_check(m1),
        ),
        Case::opt_in(
            Scenario::vmm(
                "rig-timeout",
                format!("#!/bin/sh\necho {m2}\nsleep 100000\n"),
            )
            .timeout(Duration::from_secs(45)),
            timeout_check(m2),
        ),
        // The guest idles 20 s (few or no exits to the VMM).
        Case::opt_in(
            Scenario::vmm(
                "rig-watchdog",
                format!("#!/bin/sh\nsleep 20\necho {m3}\nexit 0\n"),
            )
            .cpus(2)
            .args(wd_args)
            .timeout(Duration::from_secs(240)),
            watchdog_check(m3),
        ),
    ]
}
