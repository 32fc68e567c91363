//! Rig self-test: L2 boots, its script prints a marker the check must find.

use rig::{Outcome, Scenario};

use crate::common::{clean_exit, nonce, Case};

fn script(marker: &str) -> String {
    format!("#!/bin/sh\necho \"RIG-SELFTEST {marker}\"\nexit 0\n")
}

fn check(marker: String) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o| {
        clean_exit(o)?;
        let want = format!("RIG-SELFTEST {marker}");
        if !o.serial.lines().any(|l| l.trim() == want) {
            return Err(format!("marker line {want:?} not on the console"));
        }
        Ok(())
    }
}

/// `selftest` (our vmm) and `qemu-selftest` (reference).
pub fn cases() -> Vec<Case> {
    let m1 = nonce();
    let m2 = format!("q{}", nonce());
    vec![
        Case::new(Scenario::vmm("selftest", script(&m1)), check(m1)),
        Case::opt_in(Scenario::qemu("qemu-selftest", script(&m2)), check(m2)),
    ]
}
