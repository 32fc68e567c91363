//! The report: medians, ratios, targets; rendered as Markdown and JSON.

use std::fmt::Write as _;

/// Which way a figure is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// More is better (IOPS, MB/s, maps/s).
    Higher,
    /// Less is better (seconds, ns).
    Lower,
}

impl Better {
    fn word(self) -> &'static str {
        match self {
            Better::Higher => "higher",
            Better::Lower => "lower",
        }
    }
}

/// The median of the values (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `a / b` when both exist and `b` is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

/// One guest figure: ours and QEMU's, every run's value and the medians.
#[derive(Clone, Debug)]
pub struct GuestRow {
    /// What it is.
    pub metric: String,
    /// Unit.
    pub unit: &'static str,
    /// Which way is better.
    pub better: Better,
    /// Our vmm, one value per run that produced one.
    pub ours: Vec<f64>,
    /// QEMU, one value per run that produced one.
    pub qemu: Vec<f64>,
    /// ours/QEMU per round (the pair ran back to back), rounds where both produced the figure.
    pub paired: Vec<f64>,
}

impl GuestRow {
    /// Our median.
    pub fn ours_median(&self) -> Option<f64> {
        median(&self.ours)
    }

    /// QEMU's median.
    pub fn qemu_median(&self) -> Option<f64> {
        median(&self.qemu)
    }

    /// ours / QEMU (medians).
    pub fn ratio(&self) -> Option<f64> {
        ratio(self.ours_median(), self.qemu_median())
    }

    /// "ours 1.80x better" / "QEMU 1.25x better" / "equal".
    pub fn verdict(&self) -> String {
        verdict(self.ratio(), self.better)
    }
}

/// Which side a ratio (ours/theirs) favours, and by how much.
pub fn verdict(r: Option<f64>, better: Better) -> String {
    let Some(r) = r else {
        return "n/a".into();
    };
    if r <= 0.0 {
        return "n/a".into();
    }
    let ours_better = match better {
        Better::Higher => r > 1.0,
        Better::Lower => r < 1.0,
    };
    let factor = if r >= 1.0 { r } else { 1.0 / r };
    if (factor - 1.0).abs() < 0.005 {
        "equal".into()
    } else if ours_better {
        format!("ours {factor:.2}x better")
    } else {
        format!("QEMU {factor:.2}x better")
    }
}

/// The vIOMMU's cost for one VMM and one I/O figure: lazy and strict against no vIOMMU.
#[derive(Clone, Debug)]
pub struct OverheadRow {
    /// "ours" or "QEMU".
    pub vmm: &'static str,
    /// What it is.
    pub metric: String,
    /// Median with no vIOMMU.
    pub none: Option<f64>,
    /// Median with the vIOMMU, lazy.
    pub lazy: Option<f64>,
    /// Median with the vIOMMU, strict.
    pub strict: Option<f64>,
}

/// One microbenchmark figure.
#[derive(Clone, Debug)]
pub struct MicroRow {
    /// Criterion id.
    pub id: String,
    /// What it is.
    pub what: String,
    /// Median ns.
    pub ns: Option<f64>,
    /// Goal (ns), if any.
    pub target_ns: Option<f64>,
}

/// One of the issue's targets, evaluated.
#[derive(Clone, Debug)]
pub struct TargetRow {
    /// The target in words.
    pub target: String,
    /// What was measured, in words.
    pub measured: String,
    /// Met, missed, or unknown (a figure is missing).
    pub met: Option<bool>,
}

/// Per-I/O figures of one workload, disk kind and VMM (medians over the rounds), see
/// `PER_IO_COLUMNS` in main.rs.
#[derive(Clone, Debug)]
pub struct PerIoRow {
    /// Workload name.
    pub workload: String,
    /// Disk kind in words.
    pub mode: &'static str,
    /// "ours" or "QEMU".
    pub vmm: &'static str,
    /// What the buffers were (`anon`, `hugetlb`, `thp`).
    pub buf: String,
    /// One value per column.
    pub values: Vec<Option<f64>>,
    /// The top L1 exit reasons per I/O, in words.
    pub reasons: String,
}

/// Our vmm's exit-line figures per blk request over a whole run of one disk kind.
#[derive(Clone, Debug)]
pub struct TotalsRow {
    /// Disk kind in words.
    pub mode: &'static str,
    /// blk requests of the run (median).
    pub requests: Option<f64>,
    /// One value per `accounting::PER_IO_FIELDS` column.
    pub values: Vec<Option<f64>>,
}

/// The whole report.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Where the guest figures were measured.
    pub guest_where: String,
    /// Where the microbenchmarks ran.
    pub micro_where: String,
    /// Rounds of guest runs.
    pub runs: usize,
    /// Guest figures.
    pub guest: Vec<GuestRow>,
    /// Every read workload per disk kind, ours against QEMU.
    pub workloads: Vec<GuestRow>,
    /// Per-I/O figures per workload, disk kind and VMM.
    pub per_io: Vec<PerIoRow>,
    /// Our vmm's exit lines per blk request, per disk kind.
    pub totals: Vec<TotalsRow>,
    /// vIOMMU overhead per VMM.
    pub overhead: Vec<OverheadRow>,
    /// Microbenchmarks.
    pub micro: Vec<MicroRow>,
    /// Targets.
    pub targets: Vec<TargetRow>,
    /// Scenarios that did not run cleanly (name: why).
    pub problems: Vec<String>,
    /// Seconds of the guest part (rig run).
    pub guest_seconds: Option<f64>,
    /// Seconds since `make bench` started, when known.
    pub total_seconds: Option<f64>,
    /// UTC time of the report (`date -u` format).
    pub date: String,
    /// The source measured (`git describe --always --dirty`).
    pub revision: String,
    /// Host load (`/proc/loadavg`, first three fields) before and after the guest part: the
    /// figures swing with it, the ratios much less.
    pub load: (String, String),
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.3}"),
    }
}

fn pct(r: Option<f64>) -> String {
    match r {
        None => "n/a".into(),
        Some(r) => format!("{:+.1}%", (r - 1.0) * 100.0),
    }
}

fn list(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|x| num(Some(*x)))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Evaluates the issue's targets against the figures.
pub fn targets(guest: &[GuestRow], overhead: &[OverheadRow], micro: &[MicroRow]) -> Vec<TargetRow> {
    let row = |m: &str| guest.iter().find(|r| r.metric == m);
    let mut t = Vec::new();
    let r = row(METRIC_IOPS_STRICT).and_then(GuestRow::ratio);
    t.push(TargetRow {
        target: "strict-mode 4 KiB read IOPS >= 1.5x QEMU's".into(),
        measured: format!("ours/QEMU = {}", num(r)),
        met: r.map(|r| r >= 1.5),
    });
    let o = overhead
        .iter()
        .find(|o| o.vmm == "ours" && o.metric.starts_with("4 KiB"));
    let lazy = o.and_then(|o| ratio(o.lazy, o.none));
    t.push(TargetRow {
        target: "lazy 4 KiB IOPS within 10% of our no-vIOMMU IOPS".into(),
        measured: format!("lazy/none = {} ({})", num(lazy), pct(lazy)),
        met: lazy.map(|r| r >= 0.9),
    });
    for m in [
        METRIC_MAPS_4K,
        METRIC_UNMAPS_4K,
        METRIC_MAPS_2M,
        METRIC_UNMAPS_2M,
    ] {
        let r = row(m).and_then(GuestRow::ratio);
        t.push(TargetRow {
            target: format!("{m} >= 2x QEMU's"),
            measured: format!("ours/QEMU = {}", num(r)),
            met: r.map(|r| r >= 2.0),
        });
    }
    let none = row(METRIC_PMD_NONE).and_then(GuestRow::ours_median);
    let via = row(METRIC_PMD_VIOMMU).and_then(GuestRow::ours_median);
    let own = ratio(via, none);
    t.push(TargetRow {
        target: "testpmd behind the vIOMMU >= 95% of our figure without an IOMMU".into(),
        measured: format!("vIOMMU/none = {} ({})", num(own), pct(own)),
        met: own.map(|r| r >= 0.95),
    });
    let r = row(METRIC_PMD_VIOMMU).and_then(GuestRow::ratio);
    t.push(TargetRow {
        target: "testpmd behind the vIOMMU >= QEMU's".into(),
        measured: format!("ours/QEMU = {}", num(r)),
        met: r.map(|r| r >= 1.0),
    });
    // The VT-d's (issues 14 and 15).
    let r = row(METRIC_VTD_IOPS).and_then(GuestRow::ratio);
    t.push(TargetRow {
        target: "VT-d 4 KiB read IOPS >= 1.5x QEMU intel-iommu's".into(),
        measured: format!("ours/QEMU = {}", num(r)),
        met: r.map(|r| r >= 1.5),
    });
    let r = row(METRIC_VTD_MBPS).and_then(GuestRow::ratio);
    t.push(TargetRow {
        target: "VT-d 1 MiB read MB/s >= QEMU intel-iommu's".into(),
        measured: format!("ours/QEMU = {}", num(r)),
        met: r.map(|r| r >= 1.0),
    });
    for m in [
        METRIC_VTD_MAPS_4K,
        METRIC_VTD_UNMAPS_4K,
        METRIC_VTD_MAPS_2M,
        METRIC_VTD_UNMAPS_2M,
    ] {
        let r = row(m).and_then(GuestRow::ratio);
        t.push(TargetRow {
            target: format!("{m} >= 2x QEMU intel-iommu's"),
            measured: format!("ours/QEMU = {}", num(r)),
            met: r.map(|r| r >= 2.0),
        });
    }
    let vtd = row(METRIC_PMD_VTD).and_then(GuestRow::ours_median);
    let own = ratio(vtd, none);
    t.push(TargetRow {
        target: "testpmd behind the VT-d >= 95% of our figure without an IOMMU".into(),
        measured: format!("VT-d/none = {} ({})", num(own), pct(own)),
        met: own.map(|r| r >= 0.95),
    });
    let r = row(METRIC_PMD_VTD).and_then(GuestRow::ratio);
    t.push(TargetRow {
        target: "testpmd behind the VT-d >= QEMU intel-iommu's".into(),
        measured: format!("ours/QEMU = {}", num(r)),
        met: r.map(|r| r >= 1.0),
    });
    let worst = |prefix: &str| -> (Option<f64>, bool) {
        let v: Vec<&MicroRow> = micro.iter().filter(|m| m.id.starts_with(prefix)).collect();
        let all = !v.is_empty() && v.iter().all(|m| m.ns.is_some());
        (v.iter().filter_map(|m| m.ns).reduce(f64::max), all)
    };
    let (mu, all) = worst("map_unmap_request/");
    t.push(TargetRow {
        target: "device-side MAP/UNMAP < 1 us per request (1 to 100 000 live mappings)".into(),
        measured: format!("worst {} ns", num(mu)),
        met: mu.filter(|_| all).map(|ns| ns < 1000.0),
    });
    let (th, all) = worst("translate_hit/");
    let best = micro
        .iter()
        .filter(|m| m.id.starts_with("translate_hit/"))
        .filter_map(|m| m.ns)
        .reduce(f64::min);
    t.push(TargetRow {
        target: "translation hit < 50 ns, flat from 1 to 100 000 mappings".into(),
        measured: format!("{} to {} ns", num(best), num(th)),
        met: th.filter(|_| all).map(|ns| ns < 50.0),
    });
    t
}

/// Metric names the targets refer to.
pub const METRIC_IOPS_STRICT: &str = "4 KiB random read IOPS, vIOMMU strict";
/// VFIO 4 KiB maps.
pub const METRIC_MAPS_4K: &str = "in-guest VFIO 4 KiB maps/s";
/// VFIO 4 KiB unmaps.
pub const METRIC_UNMAPS_4K: &str = "in-guest VFIO 4 KiB unmaps/s";
/// VFIO 2 MiB maps.
pub const METRIC_MAPS_2M: &str = "in-guest VFIO 2 MiB maps/s";
/// VFIO 2 MiB unmaps.
pub const METRIC_UNMAPS_2M: &str = "in-guest VFIO 2 MiB unmaps/s";
/// testpmd without an IOMMU.
pub const METRIC_PMD_NONE: &str =
    "testpmd io forwarding per direction, no IOMMU (uio_pci_generic, IOVA=PA)";
/// testpmd behind the vIOMMU.
pub const METRIC_PMD_VIOMMU: &str =
    "testpmd io forwarding per direction, vIOMMU (vfio-pci, IOVA=VA)";
/// testpmd behind the VT-d.
pub const METRIC_PMD_VTD: &str = "testpmd io forwarding per direction, VT-d (vfio-pci, IOVA=VA)";
/// 4 KiB reads behind the VT-d.
pub const METRIC_VTD_IOPS: &str = "4 KiB random read IOPS, VT-d strict";
/// 1 MiB reads behind the VT-d.
pub const METRIC_VTD_MBPS: &str = "1 MiB sequential read, VT-d strict";
/// VFIO 4 KiB maps behind the VT-d.
pub const METRIC_VTD_MAPS_4K: &str = "in-guest VFIO 4 KiB maps/s, VT-d";
/// VFIO 4 KiB unmaps behind the VT-d.
pub const METRIC_VTD_UNMAPS_4K: &str = "in-guest VFIO 4 KiB unmaps/s, VT-d";
/// VFIO 2 MiB maps behind the VT-d.
pub const METRIC_VTD_MAPS_2M: &str = "in-guest VFIO 2 MiB maps/s, VT-d";
/// VFIO 2 MiB unmaps behind the VT-d.
pub const METRIC_VTD_UNMAPS_2M: &str = "in-guest VFIO 2 MiB unmaps/s, VT-d";

impl Report {
    /// The Markdown tables.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "### Guest benchmarks: our vmm vs QEMU, same L2 guest\n");
        let _ = writeln!(
            s,
            "Where: {}. Each figure is the median of {} runs, ours and QEMU interleaved in one L1 \
             boot; ratio = ours/QEMU (the `better` column says which way is better).\n",
            self.guest_where, self.runs
        );
        let _ = writeln!(
            s,
            "| figure | unit | ours | QEMU | ours/QEMU | median of per-run ratios | better | verdict |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---|---|");
        for r in &self.guest {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.metric,
                r.unit,
                num(r.ours_median()),
                num(r.qemu_median()),
                num(r.ratio()),
                num(median(&r.paired)),
                r.better.word(),
                r.verdict()
            );
        }
        if !self.workloads.is_empty() {
            let _ = writeln!(
                s,
                "\n### Read workloads (guest-bench: block size, offsets, buffer, queue depth)\n"
            );
            let _ = writeln!(
                s,
                "| workload, disk | unit | ours | QEMU | ours/QEMU | median of per-run ratios | \
                 verdict |"
            );
            let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---|");
            for r in &self.workloads {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    r.metric,
                    r.unit,
                    num(r.ours_median()),
                    num(r.qemu_median()),
                    num(r.ratio()),
                    num(median(&r.paired)),
                    r.verdict()
                );
            }
        }
        if !self.per_io.is_empty() {
            let _ = writeln!(
                s,
                "\n### Per I/O (per timed read; medians of the rounds)\n\n\
                 Guest side (same for both VMMs): blk requests completed, kicks (the disk's: \
                 virtio-pci notifications minus the vIOMMU's request-queue syncs, approximate \
                 when a sync has nothing to send; the vIOMMU's: its syncs), virtio-iommu MAP and \
                 UNMAP requests, the disk's interrupts. L1 side (its KVM over the workload's \
                 phase, a little wider than the timed part): all exits of the L2 VM, exits to \
                 the VMM in userspace (PIO + MMIO), MMIO writes outside the LAPIC (kicks as \
                 L1 sees them), and the top exit reasons per I/O (SVM exit codes).\n"
            );
            let _ = writeln!(
                s,
                "| workload | disk | VMM | buf | {} | top L1 exits per I/O |",
                crate::PER_IO_COLUMNS.join(" | ")
            );
            let _ = writeln!(
                s,
                "|---|---|---|---|{}---|",
                "---:|".repeat(crate::PER_IO_COLUMNS.len())
            );
            for r in &self.per_io {
                let vals: Vec<String> = r.values.iter().map(|v| num(*v)).collect();
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    r.workload,
                    r.mode,
                    r.vmm,
                    r.buf,
                    vals.join(" | "),
                    r.reasons
                );
            }
        }
        if !self.totals.is_empty() {
            let _ = writeln!(
                s,
                "\n### Our vmm's exit lines per blk request (whole run, boot included)\n"
            );
            let _ = writeln!(
                s,
                "| disk | requests | {} |",
                crate::accounting::PER_IO_FIELDS.join(" | ")
            );
            let _ = writeln!(
                s,
                "|---|---:|{}",
                "---:|".repeat(crate::accounting::PER_IO_FIELDS.len())
            );
            for t in &self.totals {
                let vals: Vec<String> = t.values.iter().map(|v| num(*v)).collect();
                let _ = writeln!(
                    s,
                    "| {} | {} | {} |",
                    t.mode,
                    num(t.requests),
                    vals.join(" | ")
                );
            }
        }
        let _ = writeln!(
            s,
            "\n### vIOMMU overhead against no vIOMMU (same VMM, medians)\n"
        );
        let _ = writeln!(
            s,
            "| VMM | figure | no vIOMMU | lazy | strict | lazy/none | strict/none |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|");
        for o in &self.overhead {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} ({}) | {} ({}) |",
                o.vmm,
                o.metric,
                num(o.none),
                num(o.lazy),
                num(o.strict),
                num(ratio(o.lazy, o.none)),
                pct(ratio(o.lazy, o.none)),
                num(ratio(o.strict, o.none)),
                pct(ratio(o.strict, o.none)),
            );
        }
        let _ = writeln!(
            s,
            "\n### Microbenchmarks (criterion, viommu/benches/datapath.rs)\n\nWhere: {}. \
             Median per iteration; ratio = figure/target (< 1 meets it).\n",
            self.micro_where
        );
        let _ = writeln!(
            s,
            "| benchmark | what | median ns | target ns | figure/target |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|");
        for m in &self.micro {
            let _ = writeln!(
                s,
                "| `{}` | {} | {} | {} | {} |",
                m.id,
                m.what,
                num(m.ns),
                m.target_ns.map_or("-".into(), |t| num(Some(t))),
                m.target_ns
                    .map_or("-".into(), |t| num(ratio(m.ns, Some(t)))),
            );
        }
        let _ = writeln!(s, "\n### Targets (reported, not asserted)\n");
        let _ = writeln!(s, "| target | measured | met |");
        let _ = writeln!(s, "|---|---|---|");
        for t in &self.targets {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                t.target,
                t.measured,
                match t.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "n/a",
                }
            );
        }
        let _ = writeln!(s, "\n### Every run (ours / QEMU, in run order)\n");
        let _ = writeln!(s, "| figure | ours | QEMU | ours/QEMU per run |");
        let _ = writeln!(s, "|---|---|---|---|");
        for r in self.guest.iter().chain(&self.workloads) {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                r.metric,
                list(&r.ours),
                list(&r.qemu),
                list(&r.paired)
            );
        }
        if !self.problems.is_empty() {
            let _ = writeln!(s, "\nRuns with problems (their figures are left out):\n");
            for p in &self.problems {
                let _ = writeln!(s, "- {p}");
            }
        }
        let _ = writeln!(
            s,
            "\nGuest part: {} s; `make bench` total: {} s; report written {} (source {}).",
            self.guest_seconds
                .map_or("n/a".into(), |x| format!("{x:.0}")),
            self.total_seconds
                .map_or("n/a".into(), |x| format!("{x:.0}")),
            self.date,
            self.revision
        );
        let _ = writeln!(
            s,
            "Host load average (1/5/15 min) before the guest part: {}; after: {}.",
            self.load.0, self.load.1
        );
        s
    }

    /// The same as JSON.
    pub fn json(&self) -> String {
        let mut s = String::from("{\n");
        let _ = writeln!(s, "  \"date\": {},", q(&self.date));
        let _ = writeln!(s, "  \"revision\": {},", q(&self.revision));
        let _ = writeln!(
            s,
            "  \"loadavg_before\": {},\n  \"loadavg_after\": {},",
            q(&self.load.0),
            q(&self.load.1)
        );
        let _ = writeln!(s, "  \"guest_where\": {},", q(&self.guest_where));
        let _ = writeln!(s, "  \"micro_where\": {},", q(&self.micro_where));
        let _ = writeln!(s, "  \"runs\": {},", self.runs);
        let _ = writeln!(s, "  \"guest_seconds\": {},", jn(self.guest_seconds));
        let _ = writeln!(s, "  \"total_seconds\": {},", jn(self.total_seconds));
        s.push_str("  \"guest\": [\n");
        let rows: Vec<String> = self
            .guest
            .iter()
            .chain(&self.workloads)
            .map(|r| {
                format!(
                    "    {{\"metric\": {}, \"unit\": {}, \"better\": {}, \"ours\": {}, \"qemu\": {}, \
                     \"ratio_ours_over_qemu\": {}, \"verdict\": {}, \"where\": {}, \
                     \"ours_runs\": {}, \"qemu_runs\": {}, \"paired_ratios\": {}, \
                     \"median_paired_ratio\": {}}}",
                    q(&r.metric),
                    q(r.unit),
                    q(r.better.word()),
                    jn(r.ours_median()),
                    jn(r.qemu_median()),
                    jn(r.ratio()),
                    q(&r.verdict()),
                    q(&self.guest_where),
                    jarr(&r.ours),
                    jarr(&r.qemu),
                    jarr(&r.paired),
                    jn(median(&r.paired))
                )
            })
            .collect();
        s.push_str(&rows.join(",\n"));
        s.push_str("\n  ],\n  \"per_io\": [\n");
        let rows: Vec<String> = self
            .per_io
            .iter()
            .map(|r| {
                let cols: Vec<String> = crate::PER_IO_COLUMNS
                    .iter()
                    .zip(&r.values)
                    .map(|(c, v)| format!("{}: {}", q(c), jn(*v)))
                    .collect();
                format!(
                    "    {{\"workload\": {}, \"disk\": {}, \"vmm\": {}, \"buf\": {}, {}, \
                     \"top_exits\": {}}}",
                    q(&r.workload),
                    q(r.mode),
                    q(r.vmm),
                    q(&r.buf),
                    cols.join(", "),
                    q(&r.reasons)
                )
            })
            .collect();
        s.push_str(&rows.join(",\n"));
        s.push_str("\n  ],\n  \"overhead\": [\n");
        let rows: Vec<String> = self
            .overhead
            .iter()
            .map(|o| {
                format!(
                    "    {{\"vmm\": {}, \"metric\": {}, \"none\": {}, \"lazy\": {}, \"strict\": {}, \
                     \"lazy_over_none\": {}, \"strict_over_none\": {}}}",
                    q(o.vmm),
                    q(&o.metric),
                    jn(o.none),
                    jn(o.lazy),
                    jn(o.strict),
                    jn(ratio(o.lazy, o.none)),
                    jn(ratio(o.strict, o.none))
                )
            })
            .collect();
        s.push_str(&rows.join(",\n"));
        s.push_str("\n  ],\n  \"micro\": [\n");
        let rows: Vec<String> = self
            .micro
            .iter()
            .map(|m| {
                format!(
                    "    {{\"id\": {}, \"what\": {}, \"median_ns\": {}, \"target_ns\": {}, \
                     \"ratio_over_target\": {}, \"where\": {}}}",
                    q(&m.id),
                    q(&m.what),
                    jn(m.ns),
                    jn(m.target_ns),
                    jn(ratio(m.ns, m.target_ns)),
                    q(&self.micro_where)
                )
            })
            .collect();
        s.push_str(&rows.join(",\n"));
        s.push_str("\n  ],\n  \"targets\": [\n");
        let rows: Vec<String> = self
            .targets
            .iter()
            .map(|t| {
                format!(
                    "    {{\"target\": {}, \"measured\": {}, \"met\": {}}}",
                    q(&t.target),
                    q(&t.measured),
                    t.met.map_or("null".into(), |b| b.to_string())
                )
            })
            .collect();
        s.push_str(&rows.join(",\n"));
        s.push_str("\n  ],\n  \"problems\": [");
        s.push_str(
            &self
                .problems
                .iter()
                .map(|p| q(p))
                .collect::<Vec<_>>()
                .join(", "),
        );
        s.push_str("]\n}\n");
        s
    }
}

/// A JSON string.
fn q(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A JSON number or null.
fn jn(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x}"),
        _ => "null".into(),
    }
}

fn jarr(v: &[f64]) -> String {
    format!(
        "[{}]",
        v.iter()
            .map(|x| jn(Some(*x)))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn verdict_follows_the_direction() {
        assert_eq!(verdict(Some(2.0), Better::Higher), "ours 2.00x better");
        assert_eq!(verdict(Some(0.5), Better::Higher), "QEMU 2.00x better");
        assert_eq!(verdict(Some(0.5), Better::Lower), "ours 2.00x better");
        assert_eq!(verdict(Some(1.25), Better::Lower), "QEMU 1.25x better");
        assert_eq!(verdict(Some(1.001), Better::Lower), "equal");
        assert_eq!(verdict(None, Better::Lower), "n/a");
    }

    fn row(metric: &str, ours: &[f64], qemu: &[f64]) -> GuestRow {
        GuestRow {
            metric: metric.into(),
            unit: "x",
            better: Better::Higher,
            ours: ours.to_vec(),
            qemu: qemu.to_vec(),
            paired: Vec::new(),
        }
    }

    #[test]
    fn targets_use_medians_and_report_missing_figures() {
        let guest = vec![
            row(
                METRIC_IOPS_STRICT,
                &[300.0, 100.0, 310.0],
                &[200.0, 190.0, 1000.0],
            ),
            row(METRIC_MAPS_4K, &[5000.0], &[2400.0]),
        ];
        let overhead = vec![OverheadRow {
            vmm: "ours",
            metric: "4 KiB random read IOPS".into(),
            none: Some(1000.0),
            lazy: Some(850.0),
            strict: Some(300.0),
        }];
        let micro = vec![
            MicroRow {
                id: "map_unmap_request/1".into(),
                what: String::new(),
                ns: Some(400.0),
                target_ns: Some(1000.0),
            },
            MicroRow {
                id: "map_unmap_request/100000".into(),
                what: String::new(),
                ns: Some(1200.0),
                target_ns: Some(1000.0),
            },
            MicroRow {
                id: "translate_hit/1".into(),
                what: String::new(),
                ns: Some(20.0),
                target_ns: Some(50.0),
            },
            MicroRow {
                id: "translate_hit/100000".into(),
                what: String::new(),
                ns: None,
                target_ns: Some(50.0),
            },
        ];
        let t = targets(&guest, &overhead, &micro);
        let met = |prefix: &str| t.iter().find(|r| r.target.starts_with(prefix)).unwrap().met;
        // strict: median 300 vs 200 -> 1.5: met.
        assert_eq!(met("strict-mode"), Some(true));
        assert_eq!(met("lazy"), Some(false));
        assert_eq!(met(METRIC_MAPS_4K), Some(true));
        assert_eq!(met(METRIC_UNMAPS_4K), None);
        assert_eq!(met("device-side"), Some(false));
        assert_eq!(met("translation hit"), None);
    }

    #[test]
    fn json_escapes_and_nulls() {
        let r = Report {
            guest: vec![row("a \"b\"", &[1.0], &[])],
            problems: vec!["x\ny".into()],
            ..Default::default()
        };
        let j = r.json();
        assert!(j.contains(r#""metric": "a \"b\"""#), "{j}");
        assert!(j.contains(r#""qemu": null"#), "{j}");
        assert!(j.contains(r#""x\ny""#), "{j}");
        let md = r.markdown();
        assert!(
            md.contains("| a \"b\" | x | 1.000 | n/a | n/a | n/a | higher | n/a |"),
            "{md}"
        );
    }
}
