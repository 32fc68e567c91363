//! The real-guest test rig.
//!
//! A test describes [`Scenario`]s (a VMM command line, the script the L2 guest runs, its disks)
//! and calls [`run`]. On a host with hardware KVM every scenario's VMM runs on the host; otherwise
//! the rig boots one L1 Linux under QEMU TCG (nested SVM) and runs all scenarios inside it, one
//! after another. Either way each scenario yields an [`Outcome`]: the L2 console, the VMM's exit
//! status and stderr, the guest's `GUEST-EXIT` status.
//!
//! Images come from `guest-images/build.sh` (cached in `.cache/images`), the vmm is built
//! statically for L1; both are (re)built on demand. Environment knobs: see [`RigConfig::from_env`].

mod cpio;
mod direct;
pub mod dpdk;
mod env;
mod error;
mod frames;
mod nested;
mod scenario;

use std::path::PathBuf;
use std::time::Instant;

pub use cpio::{archive as cpio_archive, CpioFile};
pub use env::{Mode, RigConfig, STATIC_TARGET};
pub use error::RigError;
pub use nested::{MAX_DISKS_PER_L1, MAX_VFIO_PER_L1};
pub use scenario::{
    parse_guest_exit, tail_lines, L1Failure, L1FailureKind, Outcome, Program, Scenario,
    L2_SCRIPT_PATH,
};

/// The console lines strictly between the line `begin` and the next line `end` (both
/// trimmed); `None` if either is missing.
pub fn section<'a>(serial: &'a str, begin: &str, end: &str) -> Option<Vec<&'a str>> {
    let mut lines = serial.lines().skip_while(|l| l.trim() != begin);
    lines.next()?;
    let mut out = Vec::new();
    for l in lines {
        if l.trim() == end {
            return Some(out);
        }
        out.push(l);
    }
    None
}

/// Fresh L1 boots allowed per batch after L1 froze or died (nested mode), unless
/// [`RigConfig::max_l1_restarts`] says otherwise.
pub const MAX_L1_RESTARTS: u32 = 2;

/// Prints a progress line on stderr.
pub fn progress(msg: &str) {
    eprintln!("rig: {msg}");
}

/// Runs `scenarios` with the configuration from the environment; outcomes in the same order.
pub fn run(scenarios: &[Scenario]) -> Result<Vec<Outcome>, RigError> {
    run_with(&RigConfig::from_env()?, scenarios)
}

/// Runs `scenarios` with an explicit configuration; outcomes in the same order.
pub fn run_with(cfg: &RigConfig, scenarios: &[Scenario]) -> Result<Vec<Outcome>, RigError> {
    validate(scenarios)?;
    if scenarios.is_empty() {
        return Ok(Vec::new());
    }
    let t = Instant::now();
    let with_qemu =
        cfg.mode == Mode::Nested && scenarios.iter().any(|s| s.program == Program::Qemu);
    cfg.ensure_images(with_qemu)?;
    if scenarios.iter().any(|s| s.program == Program::Vmm) {
        cfg.ensure_vmm()?;
    }
    let work = work_dir(cfg)?;
    progress(&format!(
        "running {} scenario(s) in {:?} mode (work dir {})",
        scenarios.len(),
        cfg.mode,
        work.display()
    ));
    let result = match cfg.mode {
        Mode::Direct => scenarios
            .iter()
            .enumerate()
            .map(|(i, s)| direct::run_one(cfg, i, s, &work))
            .collect::<Result<Vec<_>, _>>(),
        Mode::Nested => {
            let mut all: Vec<Option<Outcome>> = vec![None; scenarios.len()];
            let mut res = Ok(());
            for (n, batch) in nested::batches(scenarios).into_iter().enumerate() {
                let dir = work.join(format!("l1-{n}"));
                if let Err(e) = std::fs::create_dir_all(&dir) {
                    res = Err(RigError::io(format!("creating {}", dir.display()), e));
                    break;
                }
                // An L1 that froze or died (an environment failure, not the scenario's own
                // result) is replaced by a fresh one for the rest of the batch. The scenario it
                // happened under gets an outcome saying so (`Outcome::l1_failure`, with L1's
                // console tail); it is not run again.
                let mut rest: Vec<usize> = batch;
                let mut restarts = 0;
                while !rest.is_empty() {
                    let list: Vec<&Scenario> = rest.iter().map(|&i| &scenarios[i]).collect();
                    let dir = if restarts == 0 {
                        dir.clone()
                    } else {
                        let d = work.join(format!("l1-{n}-restart{restarts}"));
                        if let Err(e) = std::fs::create_dir_all(&d) {
                            res = Err(RigError::io(format!("creating {}", d.display()), e));
                            break;
                        }
                        d
                    };
                    match nested::run_batch(cfg, &list, &dir) {
                        Ok(o) => {
                            for (&i, o) in rest.iter().zip(o) {
                                all[i] = Some(o);
                            }
                            break;
                        }
                        Err(RigError::L1Failed { done, failed, .. })
                            if restarts < cfg.max_l1_restarts =>
                        {
                            restarts += 1;
                            let n = done.len();
                            progress(&format!(
                                "{} while '{}' ran: an environment failure for it; starting a \
                                 fresh L1 for the {} scenario(s) after it",
                                failed
                                    .l1_failure
                                    .as_ref()
                                    .map_or("L1 failed".into(), |f| f.to_string()),
                                failed.name,
                                rest.len() - n - 1
                            ));
                            for (&i, o) in rest.iter().zip(done.into_iter().chain([*failed])) {
                                all[i] = Some(o);
                            }
                            rest.drain(..(n + 1).min(rest.len()));
                        }
                        Err(e) => {
                            res = Err(e);
                            break;
                        }
                    }
                }
                if res.is_err() {
                    break;
                }
            }
            res.map(|()| all.into_iter().flatten().collect())
        }
    };
    match &result {
        Ok(_) if !cfg.keep => {
            let _ = std::fs::remove_dir_all(&work);
        }
        _ => progress(&format!("work dir kept: {}", work.display())),
    }
    progress(&format!("rig run took {:.1} s", t.elapsed().as_secs_f64()));
    result
}

fn validate(scenarios: &[Scenario]) -> Result<(), RigError> {
    let mut names = std::collections::HashSet::new();
    for s in scenarios {
        if s.name.is_empty() || s.name.contains(['\n', '\r']) {
            return Err(RigError::Config(format!("bad scenario name {:?}", s.name)));
        }
        if !names.insert(s.name.as_str()) {
            return Err(RigError::Config(format!(
                "duplicate scenario name '{}'",
                s.name
            )));
        }
        if s.vfio_disks.len() > MAX_VFIO_PER_L1 {
            return Err(RigError::Config(format!(
                "scenario '{}' has {} VFIO disks, at most {MAX_VFIO_PER_L1} are supported",
                s.name,
                s.vfio_disks.len()
            )));
        }
        if !s.vfio_disks.is_empty() && s.program == Program::Vmm && s.vmm_args.is_empty() {
            return Err(RigError::Config(format!(
                "scenario '{}' has VFIO disks: give vmm arguments naming {{vfio0}}...",
                s.name
            )));
        }
        if s.disks.len() > MAX_DISKS_PER_L1 {
            return Err(RigError::Config(format!(
                "scenario '{}' has {} disks, at most {MAX_DISKS_PER_L1} are supported",
                s.name,
                s.disks.len()
            )));
        }
    }
    Ok(())
}

fn work_dir(cfg: &RigConfig) -> Result<PathBuf, RigError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let dir = cfg
        .root
        .join(".cache/rig")
        .join(format!("run-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| RigError::io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}
