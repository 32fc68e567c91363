//! `make bench`: the vIOMMU measured side by side with QEMU on the same L2 guest, every figure a
//! ratio. Runs the guest scenarios through the rig (ours and QEMU interleaved, every kind
//! `--runs` times, all in one L1 boot when nested), reads the criterion microbenchmarks'
//! estimates, and writes `target/bench/report.md` and `target/bench/report.json`.
//!
//!   cargo run -p bench -- [--runs N] [--io-seconds S] [--vfio-4k N] [--vfio-2m N]
//!                         [--started UNIX_SECS] [--skip-guest] [--out DIR]
//!
//! Needs the static guest-bench and guest-vfio binaries (`make bench` builds them) and, unless
//! `--skip-guest`, the rig's images and static vmm (RIG_* knobs apply).

mod guest;
mod micro;
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use guest::{figures, Figures, GuestParams, GuestPrograms, Kind};
use report::{Better, GuestRow, MicroRow, OverheadRow, Report};
use rig::{Mode, Program, RigConfig, STATIC_TARGET};

struct Args {
    runs: usize,
    params: GuestParams,
    started: Option<u64>,
    skip_guest: bool,
    out: Option<PathBuf>,
}

const USAGE: &str = "usage: bench [--runs N] [--io-seconds S] [--vfio-4k N] [--vfio-2m N] \
                     [--started UNIX_SECS] [--skip-guest] [--out DIR]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        runs: 3,
        params: GuestParams {
            io_seconds: 2.0,
            vfio_count_4k: 1000,
            vfio_count_2m: 32,
            pmd_seconds: 10,
            timeout: Duration::from_secs(240),
        },
        started: None,
        skip_guest: false,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = |k: &str| it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--runs" => a.runs = val(&k)?.parse().map_err(|_| "bad --runs")?,
            "--io-seconds" => {
                a.params.io_seconds = val(&k)?.parse().map_err(|_| "bad --io-seconds")?
            }
            "--vfio-4k" => {
                a.params.vfio_count_4k = val(&k)?.parse().map_err(|_| "bad --vfio-4k")?
            }
            "--vfio-2m" => {
                a.params.vfio_count_2m = val(&k)?.parse().map_err(|_| "bad --vfio-2m")?
            }
            "--started" => a.started = Some(val(&k)?.parse().map_err(|_| "bad --started")?),
            "--skip-guest" => a.skip_guest = true,
            "--out" => a.out = Some(PathBuf::from(val(&k)?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.runs == 0 || a.runs > 20 {
        return Err("--runs: 1..=20".into());
    }
    if !(a.params.io_seconds > 0.0 && a.params.io_seconds <= 60.0) {
        return Err("--io-seconds: 0..60".into());
    }
    if a.params.vfio_count_4k == 0 || a.params.vfio_count_2m == 0 {
        return Err("--vfio-4k/--vfio-2m: at least 1".into());
    }
    Ok(a)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn date_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The first three fields of /proc/loadavg.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Per kind and program, the figures of every run (scenario order).
type Results = Vec<(Kind, Program, Figures)>;

fn run_guests(
    cfg: &RigConfig,
    a: &Args,
    out_dir: &Path,
    report: &mut Report,
) -> Result<Results, String> {
    let bin = |name: &str| {
        cfg.root
            .join("target")
            .join(STATIC_TARGET)
            .join("release")
            .join(name)
    };
    let tmp = std::env::temp_dir();
    let load = |p: &Path| {
        guest::load_program(p, &tmp).map_err(|e| {
            format!(
                "{}: {e} (build it: RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build \
                 --release --target {STATIC_TARGET} -p guest-bench -p guest-vfio)",
                p.display()
            )
        })
    };
    let progs = GuestPrograms {
        bench: load(&bin("guest-bench"))?,
        vfio: load(&bin("guest-vfio"))?,
        dpdk: rig::dpdk::tarball_bytes(&cfg.root)?,
    };
    let scenarios = guest::all_scenarios(a.runs, &a.params, &progs);
    let t = Instant::now();
    let outcomes = rig::run_with(cfg, &scenarios).map_err(|e| format!("rig: {e}"))?;
    report.guest_seconds = Some(t.elapsed().as_secs_f64());
    let mut out = Vec::new();
    // Every scenario's console and VMM log, for a look at what a figure came from.
    let logs = out_dir.join("logs");
    if std::fs::create_dir_all(&logs).is_ok() {
        for o in &outcomes {
            let _ = std::fs::write(logs.join(format!("{}.console", o.name)), &o.serial);
            let _ = std::fs::write(logs.join(format!("{}.stderr", o.name)), &o.vmm_log);
        }
    }
    for (i, o) in outcomes.iter().enumerate() {
        let per_round = Kind::ALL.len() * 2;
        let kind = Kind::ALL[(i % per_round) / 2];
        let program = scenarios[i].program;
        let f = figures(kind, o);
        if let Some(p) = &f.problem {
            report.problems.push(format!("{}: {p}", o.name));
            eprintln!(
                "bench: {} had a problem ({p}); last console lines:\n{}\n--- VMM stderr ---\n{}",
                o.name,
                o.serial_tail(25),
                rig::tail_lines(&o.vmm_log, 15)
            );
        }
        out.push((kind, program, f));
    }
    Ok(out)
}

/// Values of one figure for one program and kind, from clean runs only.
fn values(r: &Results, kind: Kind, program: Program, get: fn(&Figures) -> Option<f64>) -> Vec<f64> {
    r.iter()
        .filter(|(k, p, f)| *k == kind && *p == program && f.problem.is_none())
        .filter_map(|(_, _, f)| get(f))
        .collect()
}

/// Per run (in order) the figure, `None` where the run failed; ours and QEMU's lists line up
/// run by run because every round runs both.
fn per_run(
    r: &Results,
    kind: Kind,
    program: Program,
    get: fn(&Figures) -> Option<f64>,
) -> Vec<Option<f64>> {
    r.iter()
        .filter(|(k, p, _)| *k == kind && *p == program)
        .map(|(_, _, f)| if f.problem.is_none() { get(f) } else { None })
        .collect()
}

/// ours/QEMU of each round where both produced the figure (the two ran back to back).
fn paired(r: &Results, kind: Kind, get: fn(&Figures) -> Option<f64>) -> Vec<f64> {
    per_run(r, kind, Program::Vmm, get)
        .into_iter()
        .zip(per_run(r, kind, Program::Qemu, get))
        .filter_map(|(a, b)| report::ratio(a, b))
        .collect()
}

fn guest_rows(r: &Results) -> Vec<GuestRow> {
    type Get = fn(&Figures) -> Option<f64>;
    let spec: Vec<(String, &'static str, Better, Kind, Get)> = vec![
        (
            "boot to /init (guest uptime at /init), no disk, no vIOMMU".into(),
            "s",
            Better::Lower,
            Kind::Boot,
            |f| f.init_s,
        ),
        (
            "host wall time, VMM start to exit (boot + poweroff), no disk, no vIOMMU".into(),
            "s",
            Better::Lower,
            Kind::Boot,
            |f| f.wall_s,
        ),
        (
            "boot to /init, disk behind the vIOMMU (lazy)".into(),
            "s",
            Better::Lower,
            Kind::Lazy,
            |f| f.init_s,
        ),
        (
            "4 KiB random read IOPS, no vIOMMU".into(),
            "IOPS",
            Better::Higher,
            Kind::NoIommu,
            |f| f.iops_4k,
        ),
        (
            "4 KiB random read IOPS, vIOMMU lazy".into(),
            "IOPS",
            Better::Higher,
            Kind::Lazy,
            |f| f.iops_4k,
        ),
        (
            report::METRIC_IOPS_STRICT.into(),
            "IOPS",
            Better::Higher,
            Kind::Strict,
            |f| f.iops_4k,
        ),
        (
            "1 MiB sequential read, no vIOMMU".into(),
            "MB/s",
            Better::Higher,
            Kind::NoIommu,
            |f| f.mbps_1m,
        ),
        (
            "1 MiB sequential read, vIOMMU lazy".into(),
            "MB/s",
            Better::Higher,
            Kind::Lazy,
            |f| f.mbps_1m,
        ),
        (
            "1 MiB sequential read, vIOMMU strict".into(),
            "MB/s",
            Better::Higher,
            Kind::Strict,
            |f| f.mbps_1m,
        ),
        (
            report::METRIC_MAPS_4K.into(),
            "maps/s",
            Better::Higher,
            Kind::Strict,
            |f| f.maps_4k,
        ),
        (
            report::METRIC_UNMAPS_4K.into(),
            "unmaps/s",
            Better::Higher,
            Kind::Strict,
            |f| f.unmaps_4k,
        ),
        (
            report::METRIC_MAPS_2M.into(),
            "maps/s",
            Better::Higher,
            Kind::Strict,
            |f| f.maps_2m,
        ),
        (
            report::METRIC_UNMAPS_2M.into(),
            "unmaps/s",
            Better::Higher,
            Kind::Strict,
            |f| f.unmaps_2m,
        ),
        (
            report::METRIC_PMD_NONE.into(),
            "pkt/s",
            Better::Higher,
            Kind::NetNone,
            |f| f.pps,
        ),
        (
            report::METRIC_PMD_VIOMMU.into(),
            "pkt/s",
            Better::Higher,
            Kind::NetViommu,
            |f| f.pps,
        ),
    ];
    spec.into_iter()
        .map(|(metric, unit, better, kind, get)| GuestRow {
            metric,
            unit,
            better,
            ours: values(r, kind, Program::Vmm, get),
            qemu: values(r, kind, Program::Qemu, get),
            paired: paired(r, kind, get),
        })
        .collect()
}

fn overhead_rows(r: &Results) -> Vec<OverheadRow> {
    let mut v = Vec::new();
    for (program, name) in [(Program::Vmm, "ours"), (Program::Qemu, "QEMU")] {
        type Get = fn(&Figures) -> Option<f64>;
        let figs: [(&str, Get); 2] = [
            ("4 KiB random read IOPS", |f| f.iops_4k),
            ("1 MiB sequential read MB/s", |f| f.mbps_1m),
        ];
        for (metric, get) in figs {
            let m = |k| report::median(&values(r, k, program, get));
            v.push(OverheadRow {
                vmm: name,
                metric: metric.into(),
                none: m(Kind::NoIommu),
                lazy: m(Kind::Lazy),
                strict: m(Kind::Strict),
            });
        }
    }
    v
}

fn micro_rows(criterion: &Path) -> Vec<MicroRow> {
    micro::MICRO
        .iter()
        .map(|m| MicroRow {
            id: m.id.into(),
            what: m.what.into(),
            ns: micro::median_ns(criterion, m.id),
            target_ns: m.target_ns,
        })
        .collect()
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("bench: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let cfg = match RigConfig::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut report = Report {
        guest_where: match cfg.mode {
            Mode::Direct => "hardware KVM (VMMs run on the host)".into(),
            Mode::Nested => "nested: L1 Linux under QEMU TCG (-cpu max, 2 vCPUs), both VMMs \
                             run in L1 on its (emulated SVM) KVM"
                .into(),
        },
        micro_where: "host CPU, no VM (the device model driven in-process)".into(),
        runs: a.runs,
        ..Default::default()
    };
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| cfg.root.join("target/bench"));
    let mut failed = false;
    report.load.0 = loadavg();
    let results = if a.skip_guest {
        Vec::new()
    } else {
        match run_guests(&cfg, &a, &out, &mut report) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("bench: guest benchmarks failed: {e}");
                failed = true;
                Vec::new()
            }
        }
    };
    report.load.1 = loadavg();
    report.guest = guest_rows(&results);
    report.overhead = overhead_rows(&results);
    report.micro = micro_rows(&cfg.root.join("target/criterion"));
    report.targets = report::targets(&report.guest, &report.overhead, &report.micro);
    report.date = date_utc();
    report.revision = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(&cfg.root)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    report.total_seconds = a.started.map(|s| now_unix().saturating_sub(s) as f64);

    let md = report.markdown();
    let written = std::fs::create_dir_all(&out)
        .and_then(|()| std::fs::write(out.join("report.md"), &md))
        .and_then(|()| std::fs::write(out.join("report.json"), report.json()));
    {
        // A closed stdout (`make bench | head`) must not lose the files or the exit status.
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "{md}");
    }
    match written {
        Ok(()) => eprintln!(
            "bench: wrote {} and {}",
            out.join("report.md").display(),
            out.join("report.json").display()
        ),
        Err(e) => {
            eprintln!("bench: writing the report under {}: {e}", out.display());
            failed = true;
        }
    }
    if !a.skip_guest && !report.problems.is_empty() {
        eprintln!("bench: {} run(s) had problems", report.problems.len());
        failed = true;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(iops: f64, problem: bool) -> Figures {
        Figures {
            iops_4k: Some(iops),
            problem: problem.then(|| "x".to_string()),
            ..Default::default()
        }
    }

    #[test]
    fn pairs_line_up_by_round_and_skip_failed_runs() {
        let r: Results = vec![
            (Kind::Lazy, Program::Vmm, fig(300.0, false)),
            (Kind::Lazy, Program::Qemu, fig(100.0, false)),
            (Kind::NoIommu, Program::Vmm, fig(9.0, false)),
            (Kind::Lazy, Program::Vmm, fig(999.0, true)),
            (Kind::Lazy, Program::Qemu, fig(50.0, false)),
            (Kind::Lazy, Program::Vmm, fig(200.0, false)),
            (Kind::Lazy, Program::Qemu, fig(400.0, false)),
        ];
        assert_eq!(paired(&r, Kind::Lazy, |f| f.iops_4k), vec![3.0, 0.5]);
        assert_eq!(
            values(&r, Kind::Lazy, Program::Vmm, |f| f.iops_4k),
            vec![300.0, 200.0]
        );
        let rows = guest_rows(&r);
        let lazy = rows
            .iter()
            .find(|g| g.metric == "4 KiB random read IOPS, vIOMMU lazy")
            .unwrap();
        assert_eq!(lazy.ours_median(), Some(250.0));
        assert_eq!(lazy.qemu_median(), Some(100.0));
        let o = overhead_rows(&r);
        assert_eq!(o[0].none, Some(9.0));
        assert_eq!(o[0].lazy, Some(250.0));
    }
}
