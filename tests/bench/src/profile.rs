//! `make profile SCENARIO=..`: one real-guest scenario with the VMM under `perf record` inside
//! L1 (Debian's linux-perf, `guest-images/build.sh perf`, appended to L1 only here), and L1's
//! KVM counters per workload phase. Writes `target/profile/<scenario>-<program>/`:
//! `report.txt` (top symbols, per-thread shares, exits by reason per I/O, the per-I/O table),
//! the raw perf reports (`threads.txt`, `symbols.txt`, `thread-symbols.txt`, `dsos.txt`), the
//! L2 console, the VMM's stderr and L1's kernel log.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rig::{CpioFile, Program, RigConfig};

use crate::accounting::{self, exits_by_reason, kvm_delta, kvm_phases};
use crate::guest::{self, figures, GuestParams, GuestPrograms, Kind, L1STAT};

/// The scenarios `make profile` knows: name, disk kind, what it is.
pub const SCENARIOS: [(&str, Kind, &str); 5] = [
    (
        "iommu-strict",
        Kind::Strict,
        "the disk behind the vIOMMU, iommu.strict=1",
    ),
    (
        "iommu-lazy",
        Kind::Lazy,
        "the disk behind the vIOMMU, lazy invalidation",
    ),
    ("no-iommu", Kind::NoIommu, "the disk without a vIOMMU"),
    (
        "vtd-strict",
        Kind::VtdStrict,
        "the disk behind the emulated VT-d, intel_iommu=on iommu.strict=1",
    ),
    (
        VTD_VFIO,
        Kind::VtdStrict,
        "the disk behind the emulated VT-d, then bound to vfio-pci in L2: in-guest VFIO maps",
    ),
];

/// The profile that keeps the whole bench script: the reads, then guest-vfio's maps and unmaps.
const VTD_VFIO: &str = "vtd-vfio";

/// The sections rig-l1stat prints after the VMM exits (`PROFILE-BEGIN <name>`).
const SECTIONS: [&str; 4] = ["threads", "symbols", "thread-symbols", "dsos"];

/// The lines of section `name` (between `PROFILE-BEGIN name` and `PROFILE-END name`).
pub fn section(serial: &str, name: &str) -> Option<String> {
    let lines = rig::section(
        serial,
        &format!("PROFILE-BEGIN {name}"),
        &format!("PROFILE-END {name}"),
    )?;
    Some(lines.join("\n") + "\n")
}

/// The first `n` sample lines (`  12.34%  ...`) of a perf report.
pub fn top_lines(report: &str, n: usize) -> Vec<String> {
    report
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !t.starts_with('#')
                && t.split_whitespace()
                    .next()
                    .is_some_and(|w| w.ends_with('%'))
        })
        .take(n)
        .map(|l| l.trim_end().to_string())
        .collect()
}

/// Runs the profile of scenario `name` under `program`; returns the report directory.
pub fn run(
    cfg: &RigConfig,
    name: &str,
    program: Program,
    params: &GuestParams,
    progs: &GuestPrograms,
) -> Result<PathBuf, String> {
    let (_, kind, what) = SCENARIOS
        .iter()
        .find(|(n, _, _)| *n == name)
        .ok_or_else(|| {
            format!(
                "unknown scenario {name:?}; known: {}",
                SCENARIOS.map(|s| s.0).join(", ")
            )
        })?;
    let perf_cpio = cfg.images().join("l1-perf.cpio");
    if !perf_cpio.is_file() {
        return Err(format!(
            "{} missing: guest-images/build.sh perf (make profile builds it)",
            perf_cpio.display()
        ));
    }
    let mut s = guest::scenario(*kind, program, 0, params, progs);
    if name != VTD_VFIO {
        // The read workloads only (strictness comes from the command line, not the script).
        s.l2_script = guest::l2_script(Kind::Lazy, params);
        s.l2_files.retain(|f| f.path == guest::GUEST_BENCH);
    }
    s.name = format!("profile-{name}-{}", guest::program_name(program));
    s.l1_wrap = vec![L1STAT.to_string(), "--perf".to_string()];
    s.l1_files = vec![CpioFile::new(
        L1STAT,
        0o755,
        guest::L1STAT_SCRIPT.as_bytes().to_vec(),
    )];
    s.l1_archives = vec![perf_cpio];
    // perf report over a static binary with debug info takes a while under TCG.
    s.timeout += std::time::Duration::from_secs(300);
    eprintln!(
        "profile: {name} ({what}) under {}, {} read workload(s) of {} s, perf in L1",
        guest::program_name(program),
        params.workloads.len(),
        params.io_seconds
    );
    let outcomes = rig::run_with(cfg, std::slice::from_ref(&s)).map_err(|e| format!("rig: {e}"))?;
    let o = outcomes
        .into_iter()
        .next()
        .ok_or("the rig returned no outcome")?;
    let dir = cfg
        .root
        .join("target/profile")
        .join(format!("{name}-{}", guest::program_name(program)));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let write = |file: &str, text: &str| {
        std::fs::write(dir.join(file), text)
            .map_err(|e| format!("{}: {e}", dir.join(file).display()))
    };
    write("console.log", &o.serial)?;
    write("vmm.log", &o.vmm_log)?;
    write("l1.log", &o.l1_log)?;
    for sec in SECTIONS {
        if let Some(text) = section(&o.serial, sec) {
            write(&format!("{sec}.txt"), &text)?;
        }
    }
    let f = figures(*kind, &o);
    let text = summary(name, what, program, &o, &f);
    write("report.txt", &text)?;
    println!("{text}");
    if let Some(p) = &f.problem {
        return Err(format!(
            "the run had a problem ({p}); the files are in {}",
            dir.display()
        ));
    }
    Ok(dir)
}

/// The text report of one profile run.
pub fn summary(
    name: &str,
    what: &str,
    program: Program,
    o: &rig::Outcome,
    f: &guest::Figures,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# make profile SCENARIO={name}: {what}, {} (L1 under QEMU TCG; perf cpu-clock samples at 499 Hz)\n",
        guest::program_name(program)
    );
    let _ = writeln!(
        s,
        "VMM status {:?}, guest exit {:?}, {:.1} s in L1{}\n",
        o.vmm_status,
        o.guest_exit,
        o.duration.as_secs_f64(),
        f.problem
            .as_deref()
            .map(|p| format!(", PROBLEM: {p}"))
            .unwrap_or_default()
    );
    let _ = writeln!(s, "## Workloads\n");
    for r in &f.reads {
        let _ = writeln!(
            s,
            "{:<18} iops={} mbps={} reads={} buf={}",
            r.name,
            r.iops.map_or("n/a".into(), |v| format!("{v:.1}")),
            r.mbps.map_or("n/a".into(), |v| format!("{v:.2}")),
            r.requests.map_or("n/a".into(), |v| format!("{v:.0}")),
            r.buf
        );
    }
    let _ = writeln!(
        s,
        "\n## Per I/O (per timed read): guest-side counters, L1 exits by reason\n"
    );
    for r in &f.reads {
        let per = |k: &str, m: &std::collections::BTreeMap<String, u64>| {
            r.per_io(m.get(k).copied())
                .map_or("n/a".into(), |v| format!("{v:.2}"))
        };
        let _ = writeln!(
            s,
            "{}: blk requests {}, blk kicks {}, vIOMMU kicks {}, MAPs {}, UNMAPs {}, blk irqs {}",
            r.name,
            per("reqs", &r.acct),
            per("blk_kicks", &r.acct),
            per("viommu_sync", &r.acct),
            per("viommu_map", &r.acct),
            per("viommu_unmap", &r.acct),
            per("irqs", &r.acct)
        );
        let _ = writeln!(
            s,
            "    L1: exits {}, to the VMM (PIO {} + MMIO {}), MMIO writes {}, irq injections {}, \
             halt exits {}",
            per("exits", &r.l1),
            per("io_exits", &r.l1),
            per("mmio_exits", &r.l1),
            per("mmio_w", &r.l1),
            per("irq_injections", &r.l1),
            per("halt_exits", &r.l1)
        );
        let reasons: Vec<String> = exits_by_reason(&r.l1)
            .into_iter()
            .filter_map(|(n, c)| Some(format!("{n} {:.2}", r.per_io(Some(c))?)))
            .collect();
        let _ = writeln!(s, "    L1 exits by reason: {}", reasons.join(", "));
    }
    if let Some((b, e)) = kvm_phases(&o.serial).get("whole-run") {
        let d = kvm_delta(b, e);
        let _ = writeln!(
            s,
            "\n## L1 KVM over the whole run (boot included; tracepoint counts: the debugfs \
             sums cover live VMs only)\n"
        );
        let words: Vec<String> = d
            .iter()
            .filter(|(k, v)| !k.starts_with("r_") && **v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(s, "{}", words.join(" "));
        let reasons: Vec<String> = exits_by_reason(&d)
            .into_iter()
            .map(|(n, c)| format!("{n}={c}"))
            .collect();
        let _ = writeln!(s, "exits by reason: {}", reasons.join(" "));
    }
    if let Some(t) = &f.vmm_totals {
        let _ = writeln!(
            s,
            "\n## Our vmm's exit lines per blk request (whole run, {} requests)\n",
            t.requests
        );
        let cols: Vec<String> = accounting::PER_IO_FIELDS
            .iter()
            .zip(t.per_io())
            .map(|(c, v)| format!("{c} {}", v.map_or("n/a".into(), |v| format!("{v:.2}"))))
            .collect();
        let _ = writeln!(s, "{}", cols.join(", "));
    }
    for (sec, title, n) in [
        (
            "threads",
            "CPU per thread (perf report --sort comm,pid)",
            20,
        ),
        ("symbols", "Top symbols (perf report --sort dso,sym)", 40),
        (
            "thread-symbols",
            "Top symbols per thread (--sort comm,dso,sym)",
            60,
        ),
    ] {
        let _ = writeln!(s, "\n## {title}\n");
        match section(&o.serial, sec) {
            Some(text) => {
                for l in top_lines(&text, n) {
                    let _ = writeln!(s, "{l}");
                }
            }
            None => {
                let _ = writeln!(s, "(no perf report: see vmm.log for perf's messages)");
            }
        }
    }
    s
}

/// `target/profile`, for messages.
pub fn out_dir(root: &Path) -> PathBuf {
    root.join("target/profile")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_and_top_lines() {
        let serial = "x\nPROFILE-BEGIN symbols\n# Samples: 10\n#\n    40.00%  vmm  [.] vmm::blk::serve\n    \
                      20.00%  [kernel.kallsyms]  [k] svm_vcpu_run\nPROFILE-END symbols\nGUEST-EXIT 0\n";
        let sec = section(serial, "symbols").unwrap();
        assert!(sec.contains("svm_vcpu_run"));
        let top = top_lines(&sec, 1);
        assert_eq!(
            top,
            vec!["    40.00%  vmm  [.] vmm::blk::serve".to_string()]
        );
        assert_eq!(top_lines(&sec, 5).len(), 2);
        assert!(section(serial, "threads").is_none());
    }

    #[test]
    fn summary_reports_per_io_and_the_whole_run() {
        let serial = "L1-KVMSTAT begin whole-run exits=0 r_0x7b=0\n\
            L1-KVMSTAT begin 4k-rand-anon-qd1 exits=10 r_0x400=0\n\
            L1-KVMSTAT end 4k-rand-anon-qd1 exits=410 r_0x400=200\n\
            BENCH-READ 4k-rand-anon-qd1 iops=100.0 mbps=0.41 requests=200 buf=anon acct_viommu_map=800\n\
            GUEST-EXIT 0\nL1-KVMSTAT end whole-run exits=1000 r_0x7b=5\n";
        let o = rig::Outcome::new(
            "p".into(),
            serial.into(),
            Some(0),
            String::new(),
            false,
            std::time::Duration::from_secs(3),
        );
        let f = figures(Kind::Strict, &o);
        let s = summary("iommu-strict", "w", Program::Vmm, &o, &f);
        assert!(s.contains("MAPs 4.00"), "{s}");
        assert!(s.contains("exits 2.00"), "{s}");
        assert!(s.contains("NPF 1.00"), "{s}");
        assert!(s.contains("IOIO=5"), "{s}");
        assert!(s.contains("no perf report"));
    }
}
