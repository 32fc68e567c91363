//! The soak (issue 16): are guest resets and hangs ours or the environment's? (harness = false)
//!
//!   make soak SOAK_RUNS=20                       # every cell 20 times
//!   make soak SOAK_RUNS=1 SOAK_ARGS="--cells rebind3-vmm"   # only cells whose name matches
//!
//! Cells: the two-disk rebind workload (`rebind3`) and `stress-rebind-strict`'s (`stress`),
//! under our vmm and under QEMU, behind the virtio-iommu (`iommu`), behind the emulated VT-d
//! (`vtd`: ours `--viommu vtd`, QEMU's `intel-iommu,caching-mode=on`) and without a vIOMMU
//! (`noiommu`), 1 and 2 vCPUs: 24 cells, named like `rebind3-vmm-iommu-2cpu`. Each round runs every cell once, interleaved (our vmm and
//! QEMU alternate) in the same L1 boots; an L1 that froze or died is replaced for the rest of
//! the round. Our vmm runs with `--watchdog SECS,kmsg=on`.
//!
//! Every run is classified from its evidence only (tests/guests/common.rs `verdict`): pass,
//! guest reset (no GUEST-EXIT, the VMM exited 0 after a triple fault / reset), hang (killed at
//! its timeout), L1 failure (L1 froze or died: the rig's `L1Failure`), other failure (a check
//! failed: wrong data, VMM error, guest error). Per run the console, the VMM's stderr, L1's
//! kernel log, the watchdog's reports and (L1 failures) L1's console tail are saved under
//! `target/soak/runs/<run>/`; the table (counts and per 100 runs per cell) is printed and
//! written to `target/soak/report.md` after every round.
//!
//! Options: `--runs N` (default 20), `--cells A,B` (substrings of cell names), `--watchdog SECS`
//! (default 60), `--out DIR` (default target/soak), `--print CELL` (print the cell's L2 script
//! and VMM arguments, run nothing).

#[path = "guests/boot.rs"]
#[allow(dead_code)]
mod boot;
#[path = "guests/common.rs"]
#[allow(dead_code)]
mod common;
#[path = "guests/stress.rs"]
#[allow(dead_code)]
mod stress;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use common::{verdict, Case, Verdict};
use rig::{Outcome, Program};
use stress::{Shape, Workload};

/// The verdicts a cell counts, in table order.
const VERDICTS: [(Verdict, &str); 5] = [
    (Verdict::Pass, "pass"),
    (Verdict::GuestReset, "guest reset"),
    (Verdict::Hang, "hang"),
    (Verdict::L1Failure, "L1 failure"),
    (Verdict::Fail, "other failure"),
];

struct Options {
    /// `--print CELL`: print the cell's L2 script and VMM arguments, run nothing.
    print: Option<String>,
    runs: u32,
    cells: Vec<String>,
    watchdog_secs: u64,
    out: PathBuf,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        print: None,
        runs: 20,
        cells: Vec::new(),
        watchdog_secs: 60,
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/soak"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--runs" => o.runs = val()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--cells" => {
                o.cells = val()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            }
            "--watchdog" => {
                o.watchdog_secs = val()?.parse().map_err(|e| format!("--watchdog: {e}"))?
            }
            "--out" => o.out = PathBuf::from(val()?),
            "--print" => o.print = Some(val()?),
            // cargo test passes harness flags through; none apply here.
            s if s.starts_with("--") => {}
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(o)
}

/// One cell of the table and its counts.
struct Cell {
    name: String,
    shape: Shape,
    counts: [u32; 5],
    runs: u32,
    /// Runs of our vmm whose watchdog reported at least once.
    watchdog_runs: u32,
}

fn all_cells(watchdog_secs: u64) -> Vec<Cell> {
    let mut v = Vec::new();
    for workload in [Workload::Rebind, Workload::Stress] {
        // (vIOMMU, VT-d): virtio-iommu, emulated VT-d, none.
        for (viommu, vtd) in [(true, false), (true, true), (false, false)] {
            for cpus in [2, 1] {
                // Our vmm and QEMU next to each other: interleaved within every L1 boot.
                for program in [Program::Vmm, Program::Qemu] {
                    let name = format!(
                        "{}-{}-{}-{cpus}cpu",
                        workload.name(),
                        if program == Program::Vmm {
                            "vmm"
                        } else {
                            "qemu"
                        },
                        match (viommu, vtd) {
                            (true, false) => "iommu",
                            (true, true) => "vtd",
                            _ => "noiommu",
                        }
                    );
                    v.push(Cell {
                        name,
                        shape: Shape {
                            workload,
                            program,
                            viommu,
                            vtd,
                            cpus,
                            watchdog_secs: Some(watchdog_secs),
                        },
                        counts: [0; 5],
                        runs: 0,
                        watchdog_runs: 0,
                    });
                }
            }
        }
    }
    v
}

/// What one run left behind, for the report's list of non-passing runs.
struct RunNote {
    run: String,
    verdict: &'static str,
    why: String,
    watchdog_reports: usize,
}

/// Lines of the watchdog's reports in `text` (the VMM's stderr, or their `/dev/kmsg` copies
/// in L1's kernel log and console).
fn watchdog_lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.contains("watchdog: ")).collect()
}

fn write(dir: &Path, file: &str, text: &str) {
    if let Err(e) = std::fs::write(dir.join(file), text) {
        eprintln!("soak: writing {}/{file}: {e}", dir.display());
    }
}

/// Saves the evidence of one run; returns the number of watchdog reports found.
fn save_run(dir: &Path, o: &Outcome, verdict: &str, why: &str) -> usize {
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("soak: creating {}: {e}", dir.display());
        return 0;
    }
    write(dir, "console.txt", &o.serial);
    write(dir, "vmm-stderr.txt", &o.vmm_log);
    write(dir, "l1-log.txt", &o.l1_log);
    let mut wd: Vec<&str> = watchdog_lines(&o.vmm_log);
    if wd.is_empty() {
        // The VMM's stderr is lost with L1; the kmsg copies may have reached L1's log.
        wd = watchdog_lines(&o.l1_log);
    }
    let console_tail = o.l1_failure.as_ref().map(|f| f.console_tail.as_str());
    if wd.is_empty() {
        wd = console_tail.map(watchdog_lines).unwrap_or_default();
    }
    if let Some(f) = &o.l1_failure {
        write(dir, "l1-console-tail.txt", &f.console_tail);
        write(dir, "rig-channel-tail.txt", &f.channel_tail);
    }
    let reports = wd
        .iter()
        .filter(|l| l.contains(vmm::watchdog::REPORT_MARKER))
        .count();
    if !wd.is_empty() {
        write(dir, "watchdog.txt", &(wd.join("\n") + "\n"));
    }
    write(
        dir,
        "verdict.txt",
        &format!(
            "{verdict}\n{why}\nvmm status {:?}, guest exit {:?}, timed out {}, {:.1} s\n",
            o.vmm_status,
            o.guest_exit,
            o.timed_out,
            o.duration.as_secs_f64()
        ),
    );
    reports
}

fn per100(n: u32, runs: u32) -> String {
    if runs == 0 {
        "-".into()
    } else {
        format!("{:.0}", f64::from(n) * 100.0 / f64::from(runs))
    }
}

fn table(cells: &[Cell]) -> String {
    let mut t = String::from("| cell | runs |");
    for (_, name) in VERDICTS {
        let _ = write!(t, " {name} |");
    }
    t.push_str(" watchdog reported |\n|---|---|");
    for _ in 0..=VERDICTS.len() {
        t.push_str("---|");
    }
    t.push('\n');
    for c in cells {
        let _ = write!(t, "| {} | {} |", c.name, c.runs);
        for n in c.counts {
            let _ = write!(t, " {n} ({}/100) |", per100(n, c.runs));
        }
        let wd = if c.shape.program == Program::Vmm {
            format!(
                "{} ({}/100)",
                c.watchdog_runs,
                per100(c.watchdog_runs, c.runs)
            )
        } else {
            "n/a".into()
        };
        let _ = writeln!(t, " {wd} |");
    }
    t
}

fn report(o: &Options, cells: &[Cell], rounds: u32, notes: &[RunNote], rig_errors: &[String]) {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "# Soak report\n\n{rounds} of {} rounds, watchdog {} s for our vmm. Counts, then per 100 \
         runs of the cell. Verdicts from the evidence only: pass (the scenario's checks held), \
         guest reset (no GUEST-EXIT, the VMM exited 0 after a reset/triple fault), hang (killed \
         at its timeout), L1 failure (L1 froze or died under it), other failure (a check \
         failed).\n",
        o.runs, o.watchdog_secs
    );
    r.push_str(&table(cells));
    if !rig_errors.is_empty() {
        let _ = writeln!(r, "\n## Rounds the rig could not finish\n");
        for e in rig_errors {
            let _ = writeln!(r, "- {}", e.lines().next().unwrap_or(""));
        }
    }
    let _ = writeln!(
        r,
        "\n## Runs that did not pass\n\nEvidence in `runs/<run>/` next to this file.\n"
    );
    for n in notes {
        let _ = writeln!(
            r,
            "- `{}`: {}: {} (watchdog reports: {})",
            n.run,
            n.verdict,
            n.why.lines().next().unwrap_or(""),
            n.watchdog_reports
        );
    }
    if let Err(e) =
        std::fs::create_dir_all(&o.out).and_then(|()| std::fs::write(o.out.join("report.md"), &r))
    {
        eprintln!("soak: writing the report: {e}");
    }
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::FAILURE;
        }
    };
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    let mut cells: Vec<Cell> = all_cells(o.watchdog_secs)
        .into_iter()
        .filter(|c| o.cells.is_empty() || o.cells.iter().any(|f| c.name.contains(f.as_str())))
        .collect();
    if cells.is_empty() {
        eprintln!("soak: no cell matches {:?}", o.cells);
        return ExitCode::FAILURE;
    }
    if let Some(name) = &o.print {
        let Some(c) = cells.iter().find(|c| &c.name == name) else {
            eprintln!("soak: no cell {name}");
            return ExitCode::FAILURE;
        };
        let case = stress::case(name, c.shape);
        println!("{}", case.scenario.l2_script);
        eprintln!("args: {}", case.scenario.effective_args().join(" "));
        eprintln!("cmdline: {}", case.scenario.l2_cmdline());
        common::remove_scratch_dir();
        return ExitCode::SUCCESS;
    }
    let mut cfg = match rig::RigConfig::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Every L1 failure of a round is counted; the rest of the round runs in a fresh L1.
    cfg.max_l1_restarts = cfg.max_l1_restarts.max(cells.len() as u32);
    let runs_dir = o.out.join("runs");
    let (mut notes, mut rig_errors) = (Vec::new(), Vec::new());
    for round in 0..o.runs {
        // Rotate the order by whole vmm/QEMU pairs, so that no cell always runs first.
        let n = cells.len();
        let order: Vec<usize> = (0..n).map(|i| (i + 2 * round as usize) % n).collect();
        let cases: Vec<Case> = order
            .iter()
            .map(|&i| stress::case(&format!("{}-r{round}", cells[i].name), cells[i].shape))
            .collect();
        let scenarios: Vec<rig::Scenario> = cases.iter().map(|c| c.scenario.clone()).collect();
        rig::progress(&format!(
            "soak round {} of {}: {} runs",
            round + 1,
            o.runs,
            cases.len()
        ));
        match rig::run_with(&cfg, &scenarios) {
            Ok(outcomes) => {
                for ((&i, case), out) in order.iter().zip(&cases).zip(&outcomes) {
                    let (v, why) = verdict(case, out);
                    let why = why.unwrap_or_default();
                    let k = VERDICTS.iter().position(|(x, _)| *x == v).unwrap_or(4);
                    let label = VERDICTS[k].1;
                    let run = case.scenario.name.clone();
                    let reports = save_run(&runs_dir.join(&run), out, label, &why);
                    let cell = &mut cells[i];
                    cell.runs += 1;
                    cell.counts[k] += 1;
                    if reports > 0 {
                        cell.watchdog_runs += 1;
                    }
                    println!(
                        "SOAK {run}: {label}{}{}",
                        if why.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", why.lines().next().unwrap_or(""))
                        },
                        if reports > 0 {
                            format!(" ({reports} watchdog reports)")
                        } else {
                            String::new()
                        }
                    );
                    if v != Verdict::Pass {
                        notes.push(RunNote {
                            run,
                            verdict: label,
                            why,
                            watchdog_reports: reports,
                        });
                    }
                }
            }
            Err(e) => {
                println!("SOAK round {round}: the rig failed: {e}");
                rig_errors.push(format!("round {round}: {e}"));
            }
        }
        common::remove_scratch_dir();
        report(&o, &cells, round + 1, &notes, &rig_errors);
    }
    println!("{}", table(&cells));
    println!("soak: report in {}", o.out.join("report.md").display());
    if rig_errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
