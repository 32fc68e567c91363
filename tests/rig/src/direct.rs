//! Direct mode: the host has hardware KVM, each scenario's VMM runs as a host process.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::env::RigConfig;
use crate::error::RigError;
use crate::progress;
use crate::scenario::{expand, Outcome, Placeholders, Program, Scenario};

const MAX_CAPTURE: u64 = 16 * 1024 * 1024;

fn read_capped(path: &Path) -> String {
    let mut s = Vec::new();
    if let Ok(f) = File::open(path) {
        let _ = f.take(MAX_CAPTURE).read_to_end(&mut s);
    }
    String::from_utf8_lossy(&s).replace('\r', "")
}

/// Runs one scenario on the host.
pub(crate) fn run_one(
    cfg: &RigConfig,
    idx: usize,
    s: &Scenario,
    work: &Path,
) -> Result<Outcome, RigError> {
    if !s.vfio_disks.is_empty() {
        return Err(RigError::Config(format!(
            "scenario '{}': VFIO disks need nested mode (RIG_MODE=nested)",
            s.name
        )));
    }
    let dir = work.join(format!("{idx:03}"));
    std::fs::create_dir_all(&dir)
        .map_err(|e| RigError::io(format!("creating {}", dir.display()), e))?;
    let images = cfg.images();
    let mut initrd = std::fs::read(images.join("l2.cpio.gz"))
        .map_err(|e| RigError::io("reading l2.cpio.gz", e))?;
    initrd.extend_from_slice(&s.l2_archive());
    let initrd_path = dir.join("initrd");
    std::fs::write(&initrd_path, &initrd).map_err(|e| RigError::io("writing the L2 initrd", e))?;
    let mut disks = Vec::new();
    for d in &s.disks {
        let p = d
            .canonicalize()
            .map_err(|e| RigError::io(format!("scenario '{}': disk {}", s.name, d.display()), e))?;
        disks.push(p.display().to_string());
    }
    let ph = Placeholders {
        kernel: images.join("vmlinuz").display().to_string(),
        initrd: initrd_path.display().to_string(),
        cmdline: s.l2_cmdline(),
        disks,
        vfio: Vec::new(),
    };
    let args = expand(&s.effective_args(), &ph)
        .map_err(|e| RigError::Config(format!("scenario '{}': {e}", s.name)))?;
    let program = match s.program {
        Program::Vmm => cfg.vmm.clone(),
        Program::Qemu => "qemu-system-x86_64".into(),
    };
    let out_path = dir.join("serial");
    let err_path = dir.join("stderr");
    let out = File::create(&out_path).map_err(|e| RigError::io("creating serial file", e))?;
    let err = File::create(&err_path).map_err(|e| RigError::io("creating stderr file", e))?;
    progress(&format!("[{}] started", s.name));
    let start = Instant::now();
    let mut child = Command::new(&program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| RigError::io(format!("starting {}", program.display()), e))?;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(e) => return Err(RigError::io("waiting for the VMM", e)),
        }
        if start.elapsed() >= s.timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let o = Outcome::new(
        s.name.clone(),
        read_capped(&out_path),
        status.and_then(|st| st.code()),
        read_capped(&err_path),
        timed_out,
        start.elapsed(),
    );
    progress(&format!(
        "[{}] finished in {:.1} s: {}vmm status {}, guest exit {}",
        o.name,
        o.duration.as_secs_f64(),
        if timed_out { "TIMED OUT, " } else { "" },
        o.vmm_status.map_or("none".into(), |s| s.to_string()),
        o.guest_exit.map_or("none".into(), |s| s.to_string()),
    ));
    if timed_out {
        progress(&format!(
            "[{}] timed out after {} s; last console lines:\n{}",
            o.name,
            s.timeout.as_secs(),
            o.serial_tail(15)
        ));
    }
    Ok(o)
}
