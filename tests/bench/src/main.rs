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

mod accounting;
mod guest;
mod html;
mod micro;
mod profile;
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use guest::{figures, Figures, GuestParams, GuestPrograms, Kind, Workload};
use report::{Better, GuestRow, MicroRow, OverheadRow, PerIoRow, Report, TotalsRow};
use rig::{Mode, Program, RigConfig, STATIC_TARGET};

struct Args {
    runs: usize,
    /// `--profile NAME`: profile one scenario instead of benchmarking.
    profile: Option<String>,
    /// `--program vmm|qemu` (profile only).
    program: Program,
    params: GuestParams,
    started: Option<u64>,
    skip_guest: bool,
    out: Option<PathBuf>,
}

const USAGE: &str = "usage: bench [--runs N] [--quick] [--io-seconds S] [--vfio-4k N] \
                     [--vfio-2m N] [--started UNIX_SECS] [--skip-guest] [--out DIR] [--kinds A,B]
  --quick: 4 read workloads instead of 16, 1 s each, fewer VFIO maps, no testpmd
  --kinds: only the scenario kinds whose name contains A or B (boot, io-none, io-lazy,
           io-strict-vfio, io-vtd-strict-vfio, testpmd-none, testpmd-viommu, testpmd-vtd)
       bench --profile SCENARIO [--program vmm|qemu] [--quick] [--io-seconds S]
  --profile: one scenario with the VMM under perf in L1 (target/profile/; scenarios:
             iommu-strict, iommu-lazy, no-iommu, vtd-strict, vtd-vfio)";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        runs: 3,
        profile: None,
        program: Program::Vmm,
        params: GuestParams {
            io_seconds: 2.0,
            vfio_count_4k: 1000,
            vfio_count_2m: 32,
            pmd_seconds: 10,
            timeout: Duration::from_secs(240),
            workloads: Workload::matrix(),
            skip_net: false,
            kinds: Vec::new(),
        },
        started: None,
        skip_guest: false,
        out: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    // --quick first: explicit options given with it still win.
    if argv.iter().any(|a| a == "--quick") {
        a.params.workloads = Workload::quick();
        a.params.io_seconds = 1.0;
        a.params.vfio_count_4k = 300;
        a.params.vfio_count_2m = 8;
        a.params.skip_net = true;
    }
    let mut it = argv.into_iter();
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
            "--kinds" => {
                a.params.kinds = val(&k)?.split(',').map(str::to_string).collect();
            }
            "--quick" => {}
            "--profile" => a.profile = Some(val(&k)?),
            "--program" => {
                a.program = match val(&k)?.as_str() {
                    "vmm" => Program::Vmm,
                    "qemu" => Program::Qemu,
                    p => return Err(format!("--program {p:?}: vmm or qemu")),
                }
            }
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
    // A profile runs the quick workload set unless --quick was given explicitly (same set).
    if a.profile.is_some() {
        a.params.workloads = Workload::quick();
    }
    // Each read workload adds its seconds plus the phase pauses and the warm-up.
    a.params.timeout +=
        Duration::from_secs_f64(a.params.workloads.len() as f64 * (a.params.io_seconds + 4.0));
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

/// The in-guest programs (static binaries built by `make bench-guest-programs`); the DPDK tree
/// only when `dpdk`.
fn programs(cfg: &RigConfig, dpdk: bool) -> Result<GuestPrograms, String> {
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
    Ok(GuestPrograms {
        bench: load(&bin("guest-bench"))?,
        vfio: load(&bin("guest-vfio"))?,
        dpdk: if dpdk {
            rig::dpdk::tarball_bytes(&cfg.root)?
        } else {
            Vec::new()
        },
    })
}

fn run_guests(
    cfg: &RigConfig,
    a: &Args,
    out_dir: &Path,
    report: &mut Report,
) -> Result<Results, String> {
    let progs = programs(cfg, !a.params.skip_net)?;
    let scenarios = guest::all_scenarios(a.runs, &a.params, &progs);
    eprintln!(
        "bench: {} scenario(s): {} round(s) of {} (ours and QEMU interleaved), {} read workload(s) \
         of {} s per disk scenario; the rig prints each scenario's start (n/total, elapsed)",
        scenarios.len(),
        a.runs,
        scenarios.len() / a.runs.max(1),
        a.params.workloads.len(),
        a.params.io_seconds
    );
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
        let Some(kind) = guest::kind_of(&scenarios[i].name) else {
            continue;
        };
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
fn values(
    r: &Results,
    kind: Kind,
    program: Program,
    get: impl Fn(&Figures) -> Option<f64>,
) -> Vec<f64> {
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
    get: impl Fn(&Figures) -> Option<f64>,
) -> Vec<Option<f64>> {
    r.iter()
        .filter(|(k, p, _)| *k == kind && *p == program)
        .map(|(_, _, f)| if f.problem.is_none() { get(f) } else { None })
        .collect()
}

/// ours/QEMU of each round where both produced the figure (the two ran back to back).
fn paired(r: &Results, kind: Kind, get: impl Fn(&Figures) -> Option<f64>) -> Vec<f64> {
    per_run(r, kind, Program::Vmm, &get)
        .into_iter()
        .zip(per_run(r, kind, Program::Qemu, &get))
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
            "boot to /init, disk behind the VT-d (strict)".into(),
            "s",
            Better::Lower,
            Kind::VtdStrict,
            |f| f.init_s,
        ),
        (
            report::METRIC_VTD_IOPS.into(),
            "IOPS",
            Better::Higher,
            Kind::VtdStrict,
            |f| f.iops_4k,
        ),
        (
            report::METRIC_VTD_MBPS.into(),
            "MB/s",
            Better::Higher,
            Kind::VtdStrict,
            |f| f.mbps_1m,
        ),
        (
            report::METRIC_VTD_MAPS_4K.into(),
            "maps/s",
            Better::Higher,
            Kind::VtdStrict,
            |f| f.maps_4k,
        ),
        (
            report::METRIC_VTD_UNMAPS_4K.into(),
            "unmaps/s",
            Better::Higher,
            Kind::VtdStrict,
            |f| f.unmaps_4k,
        ),
        (
            report::METRIC_VTD_MAPS_2M.into(),
            "maps/s",
            Better::Higher,
            Kind::VtdStrict,
            |f| f.maps_2m,
        ),
        (
            report::METRIC_VTD_UNMAPS_2M.into(),
            "unmaps/s",
            Better::Higher,
            Kind::VtdStrict,
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
        (
            report::METRIC_PMD_VTD.into(),
            "pkt/s",
            Better::Higher,
            Kind::VtdNet,
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

/// The disk kinds, with the words the tables use for them.
const DISK_KINDS: [(Kind, &str); 4] = [
    (Kind::NoIommu, "no vIOMMU"),
    (Kind::Lazy, "vIOMMU lazy"),
    (Kind::Strict, "vIOMMU strict"),
    (Kind::VtdStrict, "VT-d strict"),
];

/// The read workload `name`'s figures of one run.
fn read_of<'a>(f: &'a Figures, name: &str) -> Option<&'a guest::ReadFig> {
    f.reads.iter().find(|r| r.name == name)
}

/// Per workload and disk kind: IOPS (4 KiB) or MB/s (1 MiB), ours against QEMU.
fn workload_rows(r: &Results, workloads: &[Workload]) -> Vec<GuestRow> {
    let mut v = Vec::new();
    for w in workloads {
        let name = w.name();
        for (kind, mode) in DISK_KINDS {
            let large = w.is_large();
            let get = |f: &Figures| {
                let x = read_of(f, &name)?;
                if large {
                    x.mbps
                } else {
                    x.iops
                }
            };
            v.push(GuestRow {
                metric: format!("{name}, {mode}"),
                unit: if large { "MB/s" } else { "IOPS" },
                better: Better::Higher,
                ours: values(r, kind, Program::Vmm, get),
                qemu: values(r, kind, Program::Qemu, get),
                paired: paired(r, kind, get),
            });
        }
    }
    v
}

/// The per-I/O columns of [`PerIoRow`] (per timed read of the workload).
pub const PER_IO_COLUMNS: [&str; 10] = [
    "blk requests",
    "blk kicks",
    "vIOMMU kicks",
    "VT-d QI submits",
    "MAPs",
    "UNMAPs",
    "blk irqs",
    "L1 exits",
    "exits to VMM",
    "MMIO writes",
];

/// `a + b` of a read's guest counters, `None` when neither was counted.
fn sum(x: &guest::ReadFig, a: &str, b: &str) -> Option<u64> {
    match (x.acct.get(a), x.acct.get(b)) {
        (None, None) => None,
        (a, b) => Some(a.copied().unwrap_or(0) + b.copied().unwrap_or(0)),
    }
}

/// Per workload, disk kind and VMM: the median per-I/O figures (guest-side counters and L1's
/// KVM counters over the phase, divided by the timed reads) and the top exit reasons.
fn per_io_rows(r: &Results, workloads: &[Workload]) -> Vec<PerIoRow> {
    let mut v = Vec::new();
    for w in workloads {
        let name = w.name();
        for (kind, mode) in DISK_KINDS {
            for (program, vmm) in [(Program::Vmm, "ours"), (Program::Qemu, "QEMU")] {
                let reads: Vec<&guest::ReadFig> = r
                    .iter()
                    .filter(|(k, p, f)| *k == kind && *p == program && f.problem.is_none())
                    .filter_map(|(_, _, f)| read_of(f, &name))
                    .collect();
                if reads.is_empty() {
                    continue;
                }
                let col = |get: &dyn Fn(&guest::ReadFig) -> Option<u64>| {
                    let vals: Vec<f64> = reads.iter().filter_map(|x| x.per_io(get(x))).collect();
                    report::median(&vals)
                };
                let a = |k: &'static str| move |x: &guest::ReadFig| x.acct.get(k).copied();
                let l = |k: &'static str| move |x: &guest::ReadFig| x.l1.get(k).copied();
                let values = vec![
                    col(&a("reqs")),
                    col(&a("blk_kicks")),
                    col(&a("viommu_sync")),
                    col(&a("vtd_qi")),
                    // The front end's map/unmap calls: virtio-iommu's or intel-iommu's.
                    col(&|x| sum(x, "viommu_map", "vtd_map")),
                    col(&|x| sum(x, "viommu_unmap", "vtd_unmap")),
                    col(&a("irqs")),
                    col(&l("exits")),
                    col(&|x| Some(x.l1.get("io_exits")? + x.l1.get("mmio_exits")?)),
                    col(&l("mmio_w")),
                ];
                // Exit reasons of the median run by L1 exits, per I/O.
                let mut by_exits: Vec<&&guest::ReadFig> = reads.iter().collect();
                by_exits.sort_by_key(|x| x.l1.get("exits").copied().unwrap_or(0));
                let mid = by_exits[by_exits.len() / 2];
                let reasons = accounting::exits_by_reason(&mid.l1)
                    .into_iter()
                    .take(4)
                    .filter_map(|(n, c)| Some(format!("{n} {:.2}", mid.per_io(Some(c))?)))
                    .collect::<Vec<_>>()
                    .join(", ");
                v.push(PerIoRow {
                    workload: name.clone(),
                    mode,
                    vmm,
                    // The buffer and, median over the runs, its physical runs in the guest:
                    // a heap buffer's contiguity is the guest allocator's luck, and it sets
                    // the MAPs per read for every VMM alike.
                    buf: match report::median(
                        &reads.iter().filter_map(|x| x.buf_runs).collect::<Vec<_>>(),
                    ) {
                        Some(r) => format!("{} ({r:.0} runs)", mid.buf),
                        None => mid.buf.clone(),
                    },
                    values,
                    reasons,
                });
            }
        }
    }
    v
}

/// Our vmm's exit lines per disk kind: whole-run figures per blk request (medians of runs).
fn totals_rows(r: &Results) -> Vec<TotalsRow> {
    DISK_KINDS
        .iter()
        .filter_map(|&(kind, mode)| {
            let per: Vec<Vec<Option<f64>>> = r
                .iter()
                .filter(|(k, p, f)| *k == kind && *p == Program::Vmm && f.problem.is_none())
                .filter_map(|(_, _, f)| Some(f.vmm_totals.as_ref()?.per_io()))
                .collect();
            if per.is_empty() {
                return None;
            }
            let values = (0..accounting::PER_IO_FIELDS.len())
                .map(|i| report::median(&per.iter().filter_map(|p| p[i]).collect::<Vec<_>>()))
                .collect();
            let requests = report::median(
                &r.iter()
                    .filter(|(k, p, f)| *k == kind && *p == Program::Vmm && f.problem.is_none())
                    .filter_map(|(_, _, f)| Some(f.vmm_totals.as_ref()?.requests as f64))
                    .collect::<Vec<_>>(),
            );
            Some(TotalsRow {
                mode,
                requests,
                values,
            })
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
    if let Some(name) = &a.profile {
        let result = programs(&cfg, false)
            .and_then(|progs| profile::run(&cfg, name, a.program, &a.params, &progs));
        return match result {
            Ok(dir) => {
                eprintln!("profile: wrote {}", dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "profile: {e} (reports under {})",
                    profile::out_dir(&cfg.root).display()
                );
                ExitCode::FAILURE
            }
        };
    }
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
    report.workloads = workload_rows(&results, &a.params.workloads);
    report.per_io = per_io_rows(&results, &a.params.workloads);
    report.totals = totals_rows(&results);
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
        .and_then(|()| std::fs::write(out.join("report.json"), report.json()))
        .and_then(|()| std::fs::write(out.join("report.html"), html::page(&report)));
    {
        // A closed stdout (`make bench | head`) must not lose the files or the exit status.
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "{md}");
    }
    match written {
        Ok(()) => eprintln!(
            "bench: wrote {}, {} and {}",
            out.join("report.md").display(),
            out.join("report.json").display(),
            out.join("report.html").display()
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
