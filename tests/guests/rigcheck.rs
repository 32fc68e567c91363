//! Checks of the rig itself: a guest exit status other than 0 is reported as such (default set:
//! cheap, and it keeps the other checks honest), and a scenario that outlives its timeout is
//! killed and reported as timed out, with the output it produced before (opt-in: it waits for
//! its timeout). Run both with `cargo test --test guests -- rig-`.

use std::time::Duration;

use rig::{Outcome, Scenario};

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

/// `rig-exit-status`, `rig-timeout`.
pub fn cases() -> Vec<Case> {
    let m1 = format!("RIG-EXIT-{}", nonce());
    let m2 = format!("RIG-SLEEP-{}", nonce());
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
    ]
}
