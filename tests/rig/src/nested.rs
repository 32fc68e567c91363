//! Nested mode: one L1 Linux under QEMU TCG runs every scenario of a batch.
//!
//! The host builds an archive appended to L1's initramfs (the vmm, one directory per scenario
//! under /rig/scenarios, see guest-images/l1/init) and boots L1 with two serial ports: ttyS0 is
//! L1's console (kept in `l1-console.log`), ttyS1 is the rig channel (QEMU's stdout) on which L1
//! frames each scenario's output with `@@RIG-<token>-*` marker lines (the token, random per run,
//! is on L1's command line, out of L2's reach, so a guest cannot forge a marker).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cpio::CpioFile;
use crate::env::RigConfig;
use crate::error::RigError;
use crate::frames::{Event, Frames, MAX_CAPTURE};
use crate::progress;
use crate::scenario::{
    expand, tail_lines, L1Failure, L1FailureKind, Outcome, Placeholders, Program, Scenario,
};

/// Disks one L1 boot gets at most (PCI slots on QEMU's q35 root bus, with room to spare).
pub const MAX_DISKS_PER_L1: usize = 20;

/// Longest line kept from the rig channel; longer ones are split.
const MAX_LINE: usize = 64 * 1024;
/// Lines remembered for error messages.
const TAIL: usize = 30;

/// VFIO disks one L1 boot gets at most (fixed PCI slots 0x18.. in L1).
pub const MAX_VFIO_PER_L1: usize = 4;

/// First PCI slot (in L1) of the VFIO disks.
const VFIO_FIRST_SLOT: usize = 0x18;

/// Splits `scenarios` into batches of indexes that each fit one L1 boot: scenarios without VFIO
/// disks first, then those with (their L1 has an emulated IOMMU), each group in order.
pub(crate) fn batches(scenarios: &[Scenario]) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    for vfio_group in [false, true] {
        let mut cur: Vec<usize> = Vec::new();
        let (mut disks, mut vfio) = (0, 0);
        for (i, s) in scenarios.iter().enumerate() {
            if s.vfio_disks.is_empty() == vfio_group {
                continue;
            }
            if !cur.is_empty()
                && (disks + s.disks.len() > MAX_DISKS_PER_L1
                    || vfio + s.vfio_disks.len() > MAX_VFIO_PER_L1)
            {
                out.push(std::mem::take(&mut cur));
                disks = 0;
                vfio = 0;
            }
            disks += s.disks.len();
            vfio += s.vfio_disks.len();
            cur.push(i);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    out
}

/// A hard-to-guess word for the marker lines (time, pid and a std hash seed).
fn marker_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// Single-quotes `s` for /bin/sh.
pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A path as a QEMU option value (commas doubled).
fn qemu_escape(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

fn disk_serial(idx: usize, disk: usize) -> String {
    format!("s{idx:03}d{disk}")
}

/// PCI addresses (in L1) of each scenario's VFIO disks.
fn vfio_addresses(batch: &[&Scenario]) -> Vec<Vec<String>> {
    let mut slot = VFIO_FIRST_SLOT;
    batch
        .iter()
        .map(|s| {
            s.vfio_disks
                .iter()
                .map(|_| {
                    let a = format!("0000:00:{slot:02x}.0");
                    slot += 1;
                    a
                })
                .collect()
        })
        .collect()
}

/// L1 shell commands binding the device at `bdf` to vfio-pci.
fn bind_vfio_sh(bdf: &str) -> String {
    let d = format!("/sys/bus/pci/devices/{bdf}");
    format!(
        "[ -e {d} ] || {{ echo \"rig-l1: no PCI device {bdf}\" >&2; exit 90; }}\n\
         echo vfio-pci >{d}/driver_override\n\
         if [ -e {d}/driver ]; then echo {bdf} >{d}/driver/unbind; fi\n\
         echo {bdf} >/sys/bus/pci/drivers_probe\n\
         [ -e {d}/iommu_group ] || {{ echo \"rig-l1: {bdf} has no IOMMU group\" >&2; exit 91; }}\n\
         echo \"rig-l1: {bdf} bound to $(basename $(readlink {d}/driver)), group $(basename $(readlink {d}/iommu_group))\" >&2\n"
    )
}

/// The archive for L1: the vmm and one directory per scenario.
fn l1_archive(cfg: &RigConfig, batch: &[&Scenario]) -> Result<Vec<u8>, RigError> {
    let vfio = vfio_addresses(batch);
    let mut files = Vec::new();
    if batch.iter().any(|s| s.program == Program::Vmm) {
        let vmm = std::fs::read(&cfg.vmm)
            .map_err(|e| RigError::io(format!("reading {}", cfg.vmm.display()), e))?;
        files.push(CpioFile::new("/usr/bin/vmm", 0o755, vmm));
    }
    for (idx, s) in batch.iter().enumerate() {
        let dir = format!("/rig/scenarios/{idx:03}");
        let initrd = format!("/tmp/rig-{idx:03}.initrd");
        let ph = Placeholders {
            kernel: "/l2/vmlinuz".into(),
            initrd: initrd.clone(),
            cmdline: s.l2_cmdline(),
            disks: (0..s.disks.len())
                .map(|d| format!("/dev/rigdisk/{}", disk_serial(idx, d)))
                .collect(),
            vfio: vfio[idx].clone(),
        };
        let args = expand(&s.effective_args(), &ph)
            .map_err(|e| RigError::Config(format!("scenario '{}': {e}", s.name)))?;
        let program = match s.program {
            Program::Vmm => "/usr/bin/vmm",
            Program::Qemu => "/usr/bin/qemu-system-x86_64",
        };
        let mut run = String::from("#!/bin/sh\nset -e\n");
        for bdf in &vfio[idx] {
            run.push_str(&bind_vfio_sh(bdf));
        }
        if !s.l1_setup.trim().is_empty() {
            run.push_str(&s.l1_setup);
            run.push('\n');
        }
        run.push_str(&format!("cat /l2/initrd ./l2extra.cpio >{initrd}\nexec"));
        for w in &s.l1_wrap {
            run.push(' ');
            run.push_str(&shell_quote(w));
        }
        run.push(' ');
        run.push_str(program);
        for a in &args {
            run.push(' ');
            run.push_str(&shell_quote(a));
        }
        run.push('\n');
        files.push(CpioFile::new(format!("{dir}/run"), 0o755, run));
        files.push(CpioFile::new(
            format!("{dir}/name"),
            0o644,
            format!("{}\n", s.name),
        ));
        files.push(CpioFile::new(
            format!("{dir}/timeout"),
            0o644,
            format!("{}\n", s.timeout.as_secs().max(1)),
        ));
        files.push(CpioFile::new(
            format!("{dir}/l2extra.cpio"),
            0o644,
            s.l2_archive(),
        ));
        files.extend(s.l1_files.iter().cloned());
    }
    Ok(crate::cpio::archive(&files))
}

/// Runs one batch in one L1 boot.
pub(crate) fn run_batch(
    cfg: &RigConfig,
    batch: &[&Scenario],
    work: &Path,
) -> Result<Vec<Outcome>, RigError> {
    let images = cfg.images();
    let mut initrd = Vec::new();
    let mut parts = vec![images.join("l1.cpio.gz"), images.join("l1-l2.cpio")];
    if batch.iter().any(|s| s.program == Program::Qemu) {
        parts.push(images.join("l1-qemu.cpio"));
    }
    for a in batch.iter().flat_map(|s| &s.l1_archives) {
        if !parts.contains(a) {
            parts.push(a.clone());
        }
    }
    for p in &parts {
        let mut f = std::fs::File::open(p)
            .map_err(|e| RigError::io(format!("opening {}", p.display()), e))?;
        f.read_to_end(&mut initrd)
            .map_err(|e| RigError::io(format!("reading {}", p.display()), e))?;
    }
    initrd.extend_from_slice(&l1_archive(cfg, batch)?);
    let initrd_path = work.join("l1-initrd");
    std::fs::write(&initrd_path, &initrd)
        .map_err(|e| RigError::io(format!("writing {}", initrd_path.display()), e))?;

    let console = work.join("l1-console.log");
    let token = marker_token();
    let with_vfio = batch.iter().any(|s| !s.vfio_disks.is_empty());
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35", "-accel"])
        .arg(format!("tcg,thread={}", cfg.l1_tcg_thread))
        .args(["-cpu", "max"])
        .args([
            "-smp", "2", "-m", "3072", "-display", "none", "-monitor", "none",
        ])
        .args(["-no-reboot", "-nodefaults"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-serial", "stdio", "-kernel"])
        .arg(images.join("vmlinuz"))
        .arg("-initrd")
        .arg(&initrd_path)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 loglevel=4 rigout=/dev/ttyS1 rigtoken={token}{}",
            if with_vfio {
                " intel_iommu=on iommu=pt"
            } else {
                ""
            }
        ));
    let mut seen_l0: Vec<&Vec<String>> = Vec::new();
    for (idx, s) in batch.iter().enumerate() {
        for (d, path) in s.disks.iter().enumerate() {
            let serial = disk_serial(idx, d);
            let file = path.canonicalize().map_err(|e| {
                RigError::io(format!("scenario '{}': disk {}", s.name, path.display()), e)
            })?;
            cmd.arg("-drive")
                .arg(format!(
                    "file={},if=none,id={serial},format=raw,cache=writeback",
                    qemu_escape(&file)
                ))
                .arg("-device")
                .arg(format!("virtio-blk-pci,drive={serial},serial={serial}"));
        }
        if !s.l0_args.is_empty() && !seen_l0.contains(&&s.l0_args) {
            seen_l0.push(&s.l0_args);
            cmd.args(&s.l0_args);
        }
    }
    let vfio = vfio_addresses(batch);
    for (idx, s) in batch.iter().enumerate() {
        for (j, (path, bdf)) in s.vfio_disks.iter().zip(&vfio[idx]).enumerate() {
            let id = format!("s{idx:03}v{j}");
            let file = path.canonicalize().map_err(|e| {
                RigError::io(
                    format!("scenario '{}': VFIO disk {}", s.name, path.display()),
                    e,
                )
            })?;
            // bdf is 0000:00:SS.0
            let slot = &bdf[8..10];
            cmd.arg("-drive")
                .arg(format!(
                    "file={},if=none,id={id},format=raw,cache=writeback",
                    qemu_escape(&file)
                ))
                .arg("-device")
                .arg(format!(
                    "virtio-blk-pci,drive={id},serial={id},iommu_platform=on,\
                     disable-legacy=on,addr=0x{slot}.0"
                ));
        }
    }
    if with_vfio {
        cmd.args(["-device", "intel-iommu,intremap=on,caching-mode=on"]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let limit = Duration::from_secs(
        batch
            .iter()
            .map(|s| s.timeout.as_secs().max(1) + 5)
            .sum::<u64>()
            + cfg.l1_allowance_secs,
    );
    progress(&format!(
        "booting L1 under QEMU TCG for {} scenario(s) ({} MiB initramfs, global limit {} s)",
        batch.len(),
        initrd.len() >> 20,
        limit.as_secs()
    ));
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| RigError::io("starting qemu-system-x86_64 (make deps)", e))?;
    let tag = format!("@@RIG-{token}-");
    let result = drive(cfg, batch, &mut child, started, limit, &console, &tag);
    let _ = child.kill();
    let status = child.wait();
    if let Err(e) = &result {
        if cfg.verbose {
            progress(&format!("L0 QEMU: {status:?}; error: {e}"));
        }
    }
    result
}

/// How far past its timeout a scenario may go before L1 counts as frozen (L1 kills a scenario
/// at its timeout and reports within seconds).
pub const FREEZE_GRACE: Duration = Duration::from_secs(90);

/// A message from the reader threads.
enum Msg {
    Line(String),
    Eof,
    Stderr(String),
}

fn spawn_line_reader<R: Read + Send + 'static>(r: R, tx: mpsc::Sender<Msg>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            // Read up to a newline, in bounded pieces.
            let n = (&mut reader)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut buf)
                .unwrap_or_default();
            if n == 0 {
                let _ = tx.send(Msg::Eof);
                return;
            }
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches('\n')
                .replace('\r', "");
            if tx.send(Msg::Line(line)).is_err() {
                return;
            }
        }
    });
}

fn drive(
    cfg: &RigConfig,
    batch: &[&Scenario],
    child: &mut Child,
    started: Instant,
    limit: Duration,
    console: &Path,
    tag: &str,
) -> Result<Vec<Outcome>, RigError> {
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        spawn_line_reader(out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(err)
                .take(MAX_CAPTURE as u64)
                .read_to_string(&mut s);
            let _ = tx.send(Msg::Stderr(s));
        });
    }
    drop(tx);

    let mut frames = Frames::new(tag, batch.iter().map(|s| s.name.clone()).collect());
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut scenario_start = Instant::now();
    let mut qemu_stderr = String::new();
    let deadline = started + limit;

    let last_lines = |tail: &VecDeque<String>| -> String {
        let t: Vec<&str> = tail.iter().map(String::as_str).collect();
        let mut s = t.join("\n");
        if let Ok(c) = std::fs::read_to_string(console) {
            s.push_str("\n--- L1 console (last lines) ---\n");
            s.push_str(&tail_lines(&c, 15));
        }
        s
    };

    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(RigError::Timeout {
                after: started.elapsed(),
                running: frames.running().map(str::to_string),
                last_lines: last_lines(&tail),
            });
        }
        // L1 enforces each scenario's timeout itself; far past it, L1 is frozen.
        if let Some(i) = frames.running_index() {
            let over = batch[i].timeout + FREEZE_GRACE;
            if scenario_start.elapsed() > over {
                return Err(l1_failed(
                    batch,
                    &frames,
                    L1FailureKind::Froze,
                    console,
                    last_lines(&tail),
                ));
            }
        }
        let wait = (deadline - now).min(Duration::from_secs(5));
        let msg = match rx.recv_timeout(wait) {
            Ok(m) => m,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let line = match msg {
            Msg::Line(l) => l,
            Msg::Stderr(s) => {
                qemu_stderr = s;
                continue;
            }
            Msg::Eof => break,
        };
        if cfg.verbose {
            eprintln!("L1| {line}");
        }
        if tail.len() == TAIL {
            tail.pop_front();
        }
        tail.push_back(line.clone());
        match frames.feed(&line) {
            None => {}
            Some(Event::L1Ready(ms)) => progress(&format!(
                "L1 ready after {:.1} s (L1 uptime {ms} ms)",
                started.elapsed().as_secs_f64(),
            )),
            Some(Event::Started(i)) => {
                scenario_start = Instant::now();
                progress(&format!(
                    "[{}] started ({}/{} in this L1, {:.0} s since its boot)",
                    batch[i].name,
                    i + 1,
                    batch.len(),
                    started.elapsed().as_secs_f64()
                ));
            }
            Some(Event::Finished(i)) => {
                if let Some(o) = frames.outcome(i) {
                    report_finished(o, batch[i], scenario_start.elapsed());
                }
            }
            Some(Event::Done) => progress(&format!(
                "L1 done after {:.1} s",
                started.elapsed().as_secs_f64()
            )),
        }
    }

    // The channel ended: QEMU closed its stdout (it exited). Its stderr may still be on the way.
    if qemu_stderr.is_empty() {
        while let Ok(m) = rx.recv_timeout(Duration::from_secs(2)) {
            if let Msg::Stderr(s) = m {
                qemu_stderr = s;
                break;
            }
        }
    }
    let missing = frames.missing();
    if !missing.is_empty() {
        let status = match child.wait() {
            Ok(s) => s.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        let mut last = last_lines(&tail);
        if !qemu_stderr.trim().is_empty() {
            last.push_str("\n--- L0 QEMU stderr ---\n");
            last.push_str(&tail_lines(&qemu_stderr, 15));
        }
        last.push_str(&format!("\n(no result for: {})", missing.join(", ")));
        return Err(l1_failed(
            batch,
            &frames,
            L1FailureKind::Ended(status),
            console,
            last,
        ));
    }
    if !frames.done() {
        progress("L1 ended without its done marker, after reporting every scenario");
    }
    frames
        .into_outcomes()
        .ok_or_else(|| RigError::Config("outcomes missing".into()))
}

/// Lines of L1's console kept as the evidence of an L1 failure.
const L1_CONSOLE_TAIL: usize = 60;

/// The error for an L1 that froze or died: the outcomes before the first scenario without
/// one, and that scenario's outcome marked as an L1 failure (with what it printed so far).
fn l1_failed(
    batch: &[&Scenario],
    frames: &Frames,
    kind: L1FailureKind,
    console: &Path,
    last_lines: String,
) -> RigError {
    let done: Vec<Outcome> = (0..batch.len())
        .map_while(|k| frames.outcome(k).cloned())
        .collect();
    let i = done.len().min(batch.len().saturating_sub(1));
    let (serial, stderr) = frames.partial(i);
    let mut failed = Outcome::new(
        batch[i].name.clone(),
        serial,
        None,
        stderr,
        false,
        Duration::ZERO,
    );
    failed.l1_failure = Some(L1Failure {
        kind,
        console_tail: std::fs::read_to_string(console)
            .map(|c| tail_lines(&c, L1_CONSOLE_TAIL))
            .unwrap_or_else(|e| format!("(L1 console unreadable: {e})")),
        channel_tail: last_lines.clone(),
    });
    RigError::L1Failed {
        done,
        failed: Box::new(failed),
        last_lines,
    }
}

/// Progress lines for a finished scenario (with the console tail when it timed out).
fn report_finished(o: &Outcome, s: &Scenario, host: Duration) {
    progress(&format!(
        "[{}] finished in {:.1} s (host {:.1} s): {}vmm status {}, guest exit {}",
        o.name,
        o.duration.as_secs_f64(),
        host.as_secs_f64(),
        if o.timed_out { "TIMED OUT, " } else { "" },
        o.vmm_status.map_or("none".into(), |s| s.to_string()),
        o.guest_exit.map_or("none".into(), |s| s.to_string()),
    ));
    if o.timed_out {
        progress(&format!(
            "[{}] timed out after {} s; last console lines:\n{}",
            o.name,
            s.timeout.as_secs(),
            o.serial_tail(15)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_limits_and_put_vfio_scenarios_apart() {
        let mk = |n: usize, disks: usize, vfio: usize| {
            let mut s = Scenario::vmm(format!("s{n}"), "true");
            for d in 0..disks {
                s = s.disk(format!("/d{d}"));
            }
            for d in 0..vfio {
                s = s.vfio_disk(format!("/v{d}"));
            }
            s
        };
        let list: Vec<Scenario> = vec![
            mk(0, 15, 0),
            mk(1, 5, 0),
            mk(2, 0, 3),
            mk(3, 1, 0),
            mk(4, 0, 0),
            mk(5, 25, 0),
            mk(6, 0, 1),
            mk(7, 0, 1),
        ];
        assert_eq!(
            batches(&list),
            vec![vec![0, 1], vec![3, 4], vec![5], vec![2, 6], vec![7]]
        );
        assert!(batches(&[]).is_empty());
    }

    #[test]
    fn vfio_devices_get_consecutive_fixed_slots() {
        let a = Scenario::vmm("a", "true").vfio_disk("/x").vfio_disk("/y");
        let b = Scenario::vmm("b", "true");
        let c = Scenario::vmm("c", "true").vfio_disk("/z");
        assert_eq!(
            vfio_addresses(&[&a, &b, &c]),
            vec![
                vec!["0000:00:18.0".to_string(), "0000:00:19.0".to_string()],
                vec![],
                vec!["0000:00:1a.0".to_string()]
            ]
        );
    }

    #[test]
    fn an_l1_failure_keeps_earlier_outcomes_and_blames_the_running_scenario() {
        let (a, b, c) = (
            Scenario::vmm("a", "true"),
            Scenario::vmm("b", "true"),
            Scenario::vmm("c", "true"),
        );
        let mut f = Frames::new("@@T-", vec!["a".into(), "b".into(), "c".into()]);
        for l in [
            "@@T-BEGIN 000",
            "GUEST-EXIT 0",
            "@@T-END 000 status=0 timedout=0 ms=10",
            "@@T-STDERR-BEGIN 000",
            "@@T-STDERR-END 000",
            "@@T-L1LOG-BEGIN 000",
            "@@T-L1LOG-END 000",
            "@@T-BEGIN 001",
            "[    3.1] virtio_iommu virtio0: input address: 39 bits",
        ] {
            f.feed(l);
        }
        let dir = std::env::temp_dir().join(format!("rig-l1fail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let console = dir.join("l1-console.log");
        std::fs::write(
            &console,
            "boot\nKernel panic - not syncing: corrupted stack end\n",
        )
        .unwrap();
        let e = l1_failed(
            &[&a, &b, &c],
            &f,
            L1FailureKind::Ended("exit status: 0".into()),
            &console,
            "tail".into(),
        );
        let _ = std::fs::remove_dir_all(&dir);
        let RigError::L1Failed { done, failed, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].guest_exit, Some(0));
        assert_eq!(failed.name, "b");
        assert!(failed.serial.contains("input address"));
        assert_eq!((failed.vmm_status, failed.guest_exit), (None, None));
        let l1 = failed.l1_failure.as_ref().unwrap();
        assert_eq!(l1.kind, L1FailureKind::Ended("exit status: 0".into()));
        assert!(l1.console_tail.contains("Kernel panic"));
        // Not a guest reset, whatever the program: L1 took the result with it.
        assert!(!failed.guest_reset_itself(Program::Qemu));
        assert!(e
            .to_string()
            .contains("L1 ended early (exit status: 0) while scenario 'b'"));
    }

    #[test]
    fn wrapper_words_go_between_exec_and_the_program_and_l1_files_are_added() {
        let cfg = RigConfig {
            root: "/nonexistent".into(),
            mode: crate::Mode::Nested,
            vmm: "/nonexistent/vmm".into(),
            build: false,
            keep: false,
            verbose: false,
            l1_allowance_secs: 0,
            max_l1_restarts: 0,
            l1_tcg_thread: "multi",
        };
        let mut s = Scenario::qemu("w", "true");
        s.l1_wrap = vec!["/usr/bin/rig-wrap".into(), "a b".into()];
        s.l1_files
            .push(CpioFile::new("/usr/bin/rig-wrap", 0o755, "#!/bin/sh\n"));
        let a = l1_archive(&cfg, &[&s]).unwrap();
        let text = String::from_utf8_lossy(&a);
        assert!(
            text.contains("exec '/usr/bin/rig-wrap' 'a b' /usr/bin/qemu-system-x86_64 '-machine'"),
            "{text}"
        );
        assert!(text.contains("usr/bin/rig-wrap"));
        let plain = l1_archive(&cfg, &[&Scenario::qemu("p", "true")]).unwrap();
        assert!(
            String::from_utf8_lossy(&plain).contains("exec /usr/bin/qemu-system-x86_64 '-machine'")
        );
    }

    #[test]
    fn qemu_option_values_double_commas() {
        assert_eq!(qemu_escape(Path::new("/a,b/c.img")), "/a,,b/c.img");
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
