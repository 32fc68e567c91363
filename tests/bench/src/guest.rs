//! The guest benchmarks: one scenario per (kind, VMM, run), interleaved ours/QEMU inside one L1
//! boot, and what each one's console says.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::accounting::{self, kv_map, VmmTotals};

use rig::dpdk::{self, Binding};
use rig::{CpioFile, Outcome, Program, Scenario};

/// The disk both VMMs read in the I/O scenarios: a file in L1's RAM (created by the first
/// scenario that needs it), so that L1's own disk path stays out of the figures.
pub const DISK: &str = "/tmp/bench-disk.img";
/// Its size in MiB.
pub const DISK_MIB: u64 = 64;

/// Where the in-guest programs sit in the L2 initramfs.
pub const GUEST_BENCH: &str = "/usr/bin/guest-bench";
/// The in-guest VFIO exerciser.
pub const GUEST_VFIO: &str = "/usr/bin/guest-vfio";
/// Where rig-l1stat (guest-images/l1/rig-l1stat) sits in L1: every disk scenario's VMM runs
/// under it, so that L1's KVM counters are taken around each workload.
pub const L1STAT: &str = "/usr/bin/rig-l1stat";
/// rig-l1stat itself.
pub const L1STAT_SCRIPT: &str = include_str!("../../../guest-images/l1/rig-l1stat");

/// One in-guest read workload (guest-bench read): block size, offsets, buffer, queue depth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Bytes per read.
    pub bs: u64,
    /// Random (else sequential) offsets.
    pub random: bool,
    /// 2 MiB-aligned / huge-page buffers (else heap buffers).
    pub huge: bool,
    /// Reads in flight.
    pub qd: u32,
}

/// The workload the headline 4 KiB figures come from.
pub const W_4K: Workload = Workload {
    bs: 4096,
    random: true,
    huge: false,
    qd: 1,
};
/// The workload the headline 1 MiB figures come from.
pub const W_1M: Workload = Workload {
    bs: 1 << 20,
    random: false,
    huge: false,
    qd: 1,
};

impl Workload {
    /// `4k-rand-anon-qd1` and the like (phase and table name).
    pub fn name(&self) -> String {
        format!(
            "{}-{}-{}-qd{}",
            if self.bs >= 1 << 20 {
                format!("{}m", self.bs >> 20)
            } else {
                format!("{}k", self.bs >> 10)
            },
            if self.random { "rand" } else { "seq" },
            if self.huge { "huge" } else { "anon" },
            self.qd
        )
    }

    /// Whether throughput (MB/s) rather than IOPS is the figure.
    pub fn is_large(&self) -> bool {
        self.bs >= 1 << 20
    }

    /// Every combination: 4 KiB and 1 MiB, random and sequential, heap and huge-page buffers,
    /// QD1 and QD8 (16 workloads, the headline ones first).
    pub fn matrix() -> Vec<Workload> {
        let mut v = vec![W_4K, W_1M];
        for bs in [4096, 1 << 20] {
            for random in [true, false] {
                for huge in [false, true] {
                    for qd in [1, 8] {
                        let w = Workload {
                            bs,
                            random,
                            huge,
                            qd,
                        };
                        if !v.contains(&w) {
                            v.push(w);
                        }
                    }
                }
            }
        }
        v
    }

    /// The quick set: the headline workloads, 4 KiB at QD8, 1 MiB from huge pages.
    pub fn quick() -> Vec<Workload> {
        vec![
            W_4K,
            W_1M,
            Workload { qd: 8, ..W_4K },
            Workload { huge: true, ..W_1M },
        ]
    }
}

/// What a scenario measures (and so how its VMM is set up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No disk, no vIOMMU, the script exits at once: boot to /init and the whole run's wall time.
    Boot,
    /// The disk with no vIOMMU.
    NoIommu,
    /// The disk behind the vIOMMU, lazy invalidation (the kernel's default).
    Lazy,
    /// The disk behind the vIOMMU, `iommu.strict=1`; afterwards the disk is bound to vfio-pci
    /// in L2 and the VFIO map/unmap rates are measured.
    Strict,
    /// DPDK testpmd `io` forwarding between two virtio-net ports on one hub, no IOMMU: the
    /// ports on uio_pci_generic, IOVA as PA.
    NetNone,
    /// The same behind the vIOMMU: the ports on vfio-pci, IOVA as VA.
    NetViommu,
    /// The disk behind the emulated VT-d (ours `--viommu vtd`, QEMU's `intel-iommu,
    /// caching-mode=on`), `intel_iommu=on iommu.strict=1`; afterwards bound to vfio-pci in L2
    /// and the VFIO map/unmap rates measured, as [`Kind::Strict`].
    VtdStrict,
    /// testpmd behind the emulated VT-d: the ports on vfio-pci, IOVA as VA.
    VtdNet,
}

impl Kind {
    /// Every kind, in the order they run within one round.
    pub const ALL: [Kind; 8] = [
        Kind::Boot,
        Kind::NoIommu,
        Kind::Lazy,
        Kind::Strict,
        Kind::VtdStrict,
        Kind::NetNone,
        Kind::NetViommu,
        Kind::VtdNet,
    ];

    /// Short name used in scenario names.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Boot => "boot",
            Kind::NoIommu => "io-none",
            Kind::Lazy => "io-lazy",
            Kind::Strict => "io-strict-vfio",
            Kind::NetNone => "testpmd-none",
            Kind::NetViommu => "testpmd-viommu",
            Kind::VtdStrict => "io-vtd-strict-vfio",
            Kind::VtdNet => "testpmd-vtd",
        }
    }

    /// Behind the virtio-iommu.
    fn viommu(self) -> bool {
        matches!(self, Kind::Lazy | Kind::Strict | Kind::NetViommu)
    }

    /// Behind the emulated VT-d.
    pub fn vtd(self) -> bool {
        matches!(self, Kind::VtdStrict | Kind::VtdNet)
    }

    fn disk(self) -> bool {
        matches!(
            self,
            Kind::NoIommu | Kind::Lazy | Kind::Strict | Kind::VtdStrict
        )
    }

    /// Strict invalidation, then the in-guest VFIO map/unmap rates.
    fn strict_vfio(self) -> bool {
        matches!(self, Kind::Strict | Kind::VtdStrict)
    }

    /// The guest kernel's extra command line.
    fn cmdline(self) -> Option<&'static str> {
        match self {
            Kind::Strict => Some("iommu.strict=1"),
            Kind::VtdStrict => Some("intel_iommu=on iommu.strict=1"),
            Kind::VtdNet => Some("intel_iommu=on"),
            _ => None,
        }
    }

    /// The testpmd kinds: how L2 binds the ports and the IOVA mode.
    fn net(self) -> Option<(Binding, &'static str)> {
        match self {
            Kind::NetNone => Some((Binding::Uio, "pa")),
            Kind::NetViommu | Kind::VtdNet => Some((Binding::Vfio, "va")),
            _ => None,
        }
    }
}

/// Knobs of the guest runs.
#[derive(Clone, Debug)]
pub struct GuestParams {
    /// Seconds per I/O measurement (4 KiB, then 1 MiB).
    pub io_seconds: f64,
    /// 4 KiB mappings the VFIO program makes (then unmaps).
    pub vfio_count_4k: u64,
    /// 2 MiB mappings.
    pub vfio_count_2m: u64,
    /// Seconds of testpmd forwarding.
    pub pmd_seconds: u32,
    /// Per-scenario timeout.
    pub timeout: Duration,
    /// The read workloads of every disk scenario, in order.
    pub workloads: Vec<Workload>,
    /// Leave the testpmd kinds out (quick mode).
    pub skip_net: bool,
    /// Only the kinds whose name contains one of these (`--kinds`); empty: every kind.
    pub kinds: Vec<String>,
}

/// The in-guest programs, as read from the host (static binaries).
pub struct GuestPrograms {
    /// guest-bench.
    pub bench: Vec<u8>,
    /// guest-vfio.
    pub vfio: Vec<u8>,
    /// The DPDK tree for L2 (testpmd), empty when no testpmd kind runs.
    pub dpdk: Vec<u8>,
}

/// Which VMM, for names and tables.
pub fn program_name(p: Program) -> &'static str {
    match p {
        Program::Vmm => "vmm",
        Program::Qemu => "qemu",
    }
}

/// The kind of a scenario named by [`scenario_name`].
pub fn kind_of(name: &str) -> Option<Kind> {
    Kind::ALL
        .into_iter()
        .find(|k| name.starts_with(&format!("bench-{}-", k.name())))
}

/// The scenario name for `kind` under `program`, round `run`.
pub fn scenario_name(kind: Kind, program: Program, run: usize) -> String {
    format!("bench-{}-{}-{run}", kind.name(), program_name(program))
}

fn vmm_args(kind: Kind) -> Vec<String> {
    let mut a = Scenario::base_args(Program::Vmm, 1, 512, kind.viommu());
    if kind.vtd() {
        a.extend(["--viommu", "vtd"].map(String::from));
    }
    if kind.disk() {
        a.push("--disk".into());
        let mut disk = if kind.viommu() || kind.vtd() {
            format!("path={DISK},iommu=on")
        } else {
            format!("path={DISK}")
        };
        // `BENCH_VMM_DISK_OPTS=notify=thread make profile ...`: extra --disk options of ours
        // (e.g. the worker thread instead of inline serving), to compare their counts.
        if let Ok(extra) = std::env::var("BENCH_VMM_DISK_OPTS") {
            if !extra.is_empty() {
                disk.push(',');
                disk.push_str(&extra);
            }
        }
        a.push(disk);
    }
    a
}

/// QEMU's VT-d, as the `qemu-vtd-strict` scenario runs it: caching mode (the guest tells it
/// every change, as ours requires), no interrupt remapping (ours has none either).
pub const QEMU_VTD: &str = "intel-iommu,intremap=off,caching-mode=on";

/// Our vmm's arguments for the testpmd kinds: [`dpdk::vmm_args`], or behind our VT-d.
fn vmm_net_args(kind: Kind) -> Vec<String> {
    if !kind.vtd() {
        return dpdk::vmm_args(2, 1024, kind.viommu());
    }
    let mut a = Scenario::base_args(Program::Vmm, 2, 1024, false);
    a.extend(["--viommu", "vtd"].map(String::from));
    for mac in [dpdk::MAC_A, dpdk::MAC_B] {
        a.extend(["--net".to_string(), format!("hub=0,iommu=on,mac={mac}")]);
    }
    a
}

/// QEMU's for the testpmd kinds: [`dpdk::qemu_args`], or the ports behind its intel-iommu
/// (created first).
fn qemu_net_args(kind: Kind) -> Vec<String> {
    if !kind.vtd() {
        return dpdk::qemu_args(2, 1024, kind.viommu());
    }
    let mut a = Scenario::base_args(Program::Qemu, 2, 1024, false);
    a.extend(["-device", QEMU_VTD].map(String::from));
    for (i, mac) in [dpdk::MAC_A, dpdk::MAC_B].iter().enumerate() {
        a.push("-netdev".into());
        a.push(format!("hubport,id=n{i},hubid=0"));
        a.push("-device".into());
        a.push(format!(
            "virtio-net-pci,netdev=n{i},mac={mac},romfile=,disable-legacy=on,iommu_platform=on"
        ));
    }
    a
}

/// QEMU's command line as in test-environment.md section 6; with no vIOMMU the disk is the
/// same modern virtio-blk without `iommu_platform`.
fn qemu_args(kind: Kind) -> Vec<String> {
    let mut a = Scenario::base_args(Program::Qemu, 1, 512, kind.viommu());
    if kind.vtd() {
        a.extend(["-device", QEMU_VTD].map(String::from));
    }
    if kind.disk() {
        a.push("-drive".into());
        a.push(format!("file={DISK},if=none,id=d0,format=raw"));
        a.push("-device".into());
        a.push(if kind.viommu() || kind.vtd() {
            "virtio-blk-pci,drive=d0,iommu_platform=on,disable-legacy=on".into()
        } else {
            "virtio-blk-pci,drive=d0,disable-legacy=on".into()
        });
    }
    a
}

/// The L2 script for `kind`: every line the harness reads starts with `BENCH-`.
pub fn l2_script(kind: Kind, p: &GuestParams) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
echo "BENCH-UPTIME $(cut -d' ' -f1 /proc/uptime)"
echo "BENCH-INIT $(dmesg | grep -m1 'Run /init as init process' | sed -n 's/^\[ *\([0-9.]*\)\].*/\1/p')"
"#,
    );
    if kind.disk() {
        s.push_str(
            r#"[ -b /dev/vda ] || { echo "BENCH-ERROR no /dev/vda"; exit 10; }
rc=0
# Guest-side counters (guest-bench --account): kprobe histograms under events/rig/.
T=/sys/kernel/tracing
[ -d $T/events ] || mount -t tracefs tracefs $T 2>/dev/null
for p in vp_notify:vp_notify viommu_map:viommu_map_pages viommu_unmap:viommu_unmap_pages \
    viommu_sync:__viommu_sync_req vtd_map:intel_iommu_map_pages \
    vtd_unmap:intel_iommu_unmap_pages vtd_qi:qi_submit_sync; do
    echo "p:rig/${p%%:*} ${p#*:}" >>$T/kprobe_events 2>/dev/null &&
        echo 'hist:keys=common_pid' >$T/events/rig/${p%%:*}/trigger 2>/dev/null
done
echo 64 >/proc/sys/vm/nr_hugepages 2>/dev/null
echo "BENCH-HUGEPAGES $(cat /proc/sys/vm/nr_hugepages 2>/dev/null)"
"#,
        );
        for w in &p.workloads {
            s.push_str(&format!(
                "{GUEST_BENCH} read --dev /dev/vda --bs {bs} --pattern {pat} --qd {qd} --buf {buf} \\\n    \
                 --seconds {secs} --phase {name} --account vda >/tmp/r || rc=11\n\
                 sed 's/^/BENCH-READ {name} /' /tmp/r\n",
                bs = w.bs,
                pat = if w.random { "rand" } else { "seq" },
                qd = w.qd,
                buf = if w.huge { "huge" } else { "anon" },
                secs = p.io_seconds,
                name = w.name(),
            ));
        }
    }
    if kind.strict_vfio() {
        s.push_str(&format!(
            r#"bdf=$(basename "$(dirname "$(readlink -f /sys/block/vda/device)")")
d=/sys/bus/pci/devices/$bdf
echo vfio-pci >"$d/driver_override"
[ -e "$d/driver" ] && echo "$bdf" >"$d/driver/unbind"
echo "$bdf" >/sys/bus/pci/drivers_probe
echo "BENCH-VFIO-DRIVER $(basename "$(readlink "$d/driver")")"
{GUEST_VFIO} maps --device "$bdf" --size 4096 --count {c4} >/tmp/v4k 2>&1 || rc=13
sed 's/^/BENCH-VFIO-4K /' /tmp/v4k
{GUEST_VFIO} maps --device "$bdf" --size 2097152 --count {c2} >/tmp/v2m 2>&1 || rc=14
sed 's/^/BENCH-VFIO-2M /' /tmp/v2m
"#,
            c4 = p.vfio_count_4k,
            c2 = p.vfio_count_2m
        ));
    }
    if kind.disk() {
        s.push_str("exit $rc\n");
    } else {
        s.push_str("exit 0\n");
    }
    s
}

/// The scenario for `kind` under `program`, round `run`.
pub fn scenario(
    kind: Kind,
    program: Program,
    run: usize,
    p: &GuestParams,
    progs: &GuestPrograms,
) -> Scenario {
    if let Some((binding, mode)) = kind.net() {
        let name = scenario_name(kind, program, run);
        let script = dpdk::testpmd_script(binding, &[mode], p.pmd_seconds);
        let (s, args) = match program {
            Program::Vmm => (Scenario::vmm(name, script), vmm_net_args(kind)),
            Program::Qemu => (Scenario::qemu(name, script), qemu_net_args(kind)),
        };
        let mut s = s.args(args).timeout(p.timeout);
        if let Some(c) = kind.cmdline() {
            s = s.cmdline_extra(c);
        }
        return s.l2_file(CpioFile::new(dpdk::L2_TARBALL, 0o644, progs.dpdk.clone()));
    }
    let args = match program {
        Program::Vmm => vmm_args(kind),
        Program::Qemu => qemu_args(kind),
    };
    let (name, script) = (scenario_name(kind, program, run), l2_script(kind, p));
    let mut s = match program {
        Program::Vmm => Scenario::vmm(name, script),
        Program::Qemu => Scenario::qemu(name, script),
    }
    .args(args)
    .timeout(p.timeout);
    if let Some(c) = kind.cmdline() {
        s = s.cmdline_extra(c);
    }
    if kind.disk() {
        s.l1_setup = format!(
            "[ -e {DISK} ] || dd if=/dev/zero of={DISK} bs=1M count={DISK_MIB} 2>/dev/null"
        );
        s = s.l2_file(CpioFile::new(GUEST_BENCH, 0o755, progs.bench.clone()));
        s.l1_files.push(CpioFile::new(
            L1STAT,
            0o755,
            L1STAT_SCRIPT.as_bytes().to_vec(),
        ));
        s.l1_wrap = vec![L1STAT.to_string()];
    }
    if kind.strict_vfio() {
        s = s.l2_file(CpioFile::new(GUEST_VFIO, 0o755, progs.vfio.clone()));
    }
    s
}

/// Every scenario of `runs` rounds, interleaved: per round, per kind, ours then QEMU's.
pub fn all_scenarios(runs: usize, p: &GuestParams, progs: &GuestPrograms) -> Vec<Scenario> {
    let mut v = Vec::new();
    for run in 0..runs {
        for kind in Kind::ALL {
            if p.skip_net && kind.net().is_some() {
                continue;
            }
            if !p.kinds.is_empty() && !p.kinds.iter().any(|k| kind.name().contains(k.as_str())) {
                continue;
            }
            for program in [Program::Vmm, Program::Qemu] {
                v.push(scenario(kind, program, run, p, progs));
            }
        }
    }
    v
}

/// Figures read from one scenario's console.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    /// Guest uptime (s) when the kernel ran /init.
    pub init_s: Option<f64>,
    /// Wall time of the VMM run (s), where the VMM ran.
    pub wall_s: Option<f64>,
    /// 4 KiB random O_DIRECT reads per second.
    pub iops_4k: Option<f64>,
    /// 1 MiB sequential O_DIRECT read MB/s.
    pub mbps_1m: Option<f64>,
    /// VFIO 4 KiB maps per second.
    pub maps_4k: Option<f64>,
    /// VFIO 4 KiB unmaps per second.
    pub unmaps_4k: Option<f64>,
    /// VFIO 2 MiB maps per second.
    pub maps_2m: Option<f64>,
    /// VFIO 2 MiB unmaps per second.
    pub unmaps_2m: Option<f64>,
    /// testpmd packets per second per direction.
    pub pps: Option<f64>,
    /// Every read workload's figures, in run order.
    pub reads: Vec<ReadFig>,
    /// Our vmm's exit-line totals (None for QEMU or without a `blk:` line).
    pub vmm_totals: Option<VmmTotals>,
    /// Why the run is not usable, if it is not.
    pub problem: Option<String>,
}

/// The value of `key=` in a `k=v k=v` line.
pub fn kv(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .filter(|v: &f64| v.is_finite())
}

/// The last line starting with `prefix ` (prefix removed).
fn line<'a>(serial: &'a str, prefix: &str) -> Option<&'a str> {
    serial
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(prefix)?.strip_prefix(' '))
}

/// Reads the figures of `kind` from an outcome.
pub fn figures(kind: Kind, o: &Outcome) -> Figures {
    let s = &o.serial;
    let mut f = Figures {
        init_s: line(s, "BENCH-INIT").and_then(|v| v.trim().parse().ok()),
        wall_s: Some(o.duration.as_secs_f64()),
        ..Default::default()
    };
    if kind.disk() {
        f.reads = read_figs(s);
        let get = |w: Workload| f.reads.iter().find(|r| r.name == w.name());
        f.iops_4k = get(W_4K).and_then(|r| r.iops);
        f.mbps_1m = get(W_1M).and_then(|r| r.mbps);
        f.vmm_totals = VmmTotals::parse(&o.vmm_log);
    }
    if kind.strict_vfio() {
        let v4 = line(s, "BENCH-VFIO-4K");
        let v2 = line(s, "BENCH-VFIO-2M");
        f.maps_4k = v4.and_then(|l| kv(l, "maps_per_s"));
        f.unmaps_4k = v4.and_then(|l| kv(l, "unmaps_per_s"));
        f.maps_2m = v2.and_then(|l| kv(l, "maps_per_s"));
        f.unmaps_2m = v2.and_then(|l| kv(l, "unmaps_per_s"));
    }
    if let Some((_, mode)) = kind.net() {
        match dpdk::pmd_run(s, 1, mode) {
            Ok(r) => f.pps = Some(r.pps()),
            Err(e) => f.problem = Some(e.lines().next().unwrap_or_default().to_string()),
        }
    }
    if o.timed_out {
        f.problem = Some("timed out".into());
        f.wall_s = None;
    } else if o.guest_exit != Some(0) || o.vmm_status != Some(0) {
        f.problem = Some(format!(
            "guest exit {:?}, VMM status {:?}",
            o.guest_exit, o.vmm_status
        ));
    }
    f
}

/// One read workload's result: the rates, the guest-side counters (`acct_*` of guest-bench)
/// and L1's KVM counters over the phase (rig-l1stat), as differences.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReadFig {
    /// The workload's name ([`Workload::name`]).
    pub name: String,
    /// Reads per second.
    pub iops: Option<f64>,
    /// MB/s.
    pub mbps: Option<f64>,
    /// Timed reads.
    pub requests: Option<f64>,
    /// `anon`, `hugetlb` or `thp`: what the buffers were.
    pub buf: String,
    /// Physically contiguous runs per read buffer in the guest (`buf_runs=`, guest-bench reads
    /// its page frames): what one read into it must map, whichever VMM runs the guest.
    pub buf_runs: Option<f64>,
    /// Guest-side counter differences (`reqs`, `irqs`, `blk_kicks`, `viommu_map`, ...).
    pub acct: BTreeMap<String, u64>,
    /// L1's KVM counter differences over the phase (`exits`, `r_0x400`, `mmio_w`, ...).
    pub l1: BTreeMap<String, u64>,
}

impl ReadFig {
    /// `counter / timed reads`.
    pub fn per_io(&self, counter: Option<u64>) -> Option<f64> {
        let n = self.requests.filter(|&n| n > 0.0)?;
        counter.map(|c| c as f64 / n)
    }
}

/// Every `BENCH-READ <name> ...` result of a console, with its phase's L1 counters.
pub fn read_figs(serial: &str) -> Vec<ReadFig> {
    let phases = accounting::kvm_phases(serial);
    serial
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("BENCH-READ ")?;
            let (name, rest) = rest.split_once(' ')?;
            let acct = kv_map(rest)
                .into_iter()
                .filter_map(|(k, v)| Some((k.strip_prefix("acct_")?.to_string(), v)))
                .collect();
            let l1 = phases
                .get(name)
                .map(|(b, e)| accounting::kvm_delta(b, e))
                .unwrap_or_default();
            Some(ReadFig {
                name: name.to_string(),
                iops: kv(rest, "iops"),
                mbps: kv(rest, "mbps"),
                requests: kv(rest, "requests"),
                buf: rest
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("buf="))
                    .unwrap_or("")
                    .to_string(),
                buf_runs: kv(rest, "buf_runs"),
                acct,
                l1,
            })
        })
        .collect()
}

/// Reads a static in-guest program, stripped of its debug info when `strip` is available (the
/// L2 initramfs of every scenario carries it).
pub fn load_program(path: &Path, tmp: &Path) -> std::io::Result<Vec<u8>> {
    let out = tmp.join(path.file_name().unwrap_or_default());
    let stripped = std::process::Command::new("strip")
        .arg("-o")
        .arg(&out)
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    let data = std::fs::read(if stripped { &out } else { path })?;
    let _ = std::fs::remove_file(&out);
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> GuestParams {
        GuestParams {
            io_seconds: 2.0,
            vfio_count_4k: 500,
            vfio_count_2m: 32,
            pmd_seconds: 5,
            timeout: Duration::from_secs(100),
            workloads: Workload::matrix(),
            skip_net: false,
            kinds: Vec::new(),
        }
    }

    fn progs() -> GuestPrograms {
        GuestPrograms {
            bench: vec![1],
            vfio: vec![2],
            dpdk: vec![3],
        }
    }

    #[test]
    fn workload_matrix_covers_every_combination_once() {
        let m = Workload::matrix();
        assert_eq!(m.len(), 16);
        assert_eq!((m[0], m[1]), (W_4K, W_1M));
        let names: std::collections::BTreeSet<String> = m.iter().map(Workload::name).collect();
        assert_eq!(names.len(), 16);
        assert!(names.contains("1m-rand-huge-qd8") && names.contains("4k-seq-anon-qd1"));
        assert!(Workload::quick().iter().all(|w| m.contains(w)));
        let quick = GuestParams {
            skip_net: true,
            ..params()
        };
        let v = all_scenarios(1, &quick, &progs());
        assert!(v.iter().all(|s| !s.name.contains("testpmd")));
        assert_eq!(v.len(), 2 * (Kind::ALL.len() - 3));
        let vtd = GuestParams {
            kinds: vec!["vtd".into()],
            ..params()
        };
        let names: Vec<String> = all_scenarios(1, &vtd, &progs())
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(
            names,
            [
                "bench-io-vtd-strict-vfio-vmm-0",
                "bench-io-vtd-strict-vfio-qemu-0",
                "bench-testpmd-vtd-vmm-0",
                "bench-testpmd-vtd-qemu-0"
            ]
        );
    }

    #[test]
    fn scenarios_interleave_ours_and_qemu() {
        let v = all_scenarios(2, &params(), &progs());
        assert_eq!(v.len(), 2 * Kind::ALL.len() * 2);
        for pair in v.chunks(2) {
            assert_eq!(pair[0].program, Program::Vmm);
            assert_eq!(pair[1].program, Program::Qemu);
        }
        assert_eq!(v[0].name, "bench-boot-vmm-0");
        for (i, s) in v.iter().enumerate() {
            assert_eq!(
                kind_of(&s.name),
                Some(Kind::ALL[(i % (2 * Kind::ALL.len())) / 2])
            );
        }
        assert_eq!(v[v.len() - 1].name, "bench-testpmd-vtd-qemu-1");
    }

    #[test]
    fn command_lines_match_the_kind() {
        let p = params();
        let g = progs();
        let j = |k, prog| scenario(k, prog, 0, &p, &g).effective_args().join(" ");
        assert!(!j(Kind::NoIommu, Program::Vmm).contains("--viommu"));
        assert!(j(Kind::NoIommu, Program::Vmm).contains(&format!("path={DISK}")));
        assert!(j(Kind::Lazy, Program::Vmm)
            .contains(&format!("--viommu virtio --disk path={DISK},iommu=on")));
        assert!(!j(Kind::NoIommu, Program::Qemu).contains("virtio-iommu-pci"));
        assert!(!j(Kind::NoIommu, Program::Qemu).contains("iommu_platform"));
        assert!(j(Kind::Strict, Program::Qemu).contains("virtio-iommu-pci"));
        assert!(j(Kind::Strict, Program::Qemu).contains("iommu_platform=on,disable-legacy=on"));
        assert!(!j(Kind::Boot, Program::Qemu).contains("-drive"));
        let s = scenario(Kind::Strict, Program::Vmm, 0, &p, &g);
        assert!(s.l2_cmdline().contains("iommu.strict=1"));
        assert_eq!(s.l2_files.len(), 2);
        assert!(s.l2_script.contains("guest-vfio maps"));
        for w in Workload::matrix() {
            assert!(s
                .l2_script
                .contains(&format!("--phase {} --account vda", w.name())));
        }
        assert_eq!(s.l1_wrap, vec![L1STAT.to_string()]);
        assert_eq!(s.l1_files.len(), 1);
        let b = scenario(Kind::Boot, Program::Vmm, 0, &p, &g);
        assert!(b.l1_wrap.is_empty() && !b.l2_script.contains("guest-bench"));
        let l = scenario(Kind::Lazy, Program::Qemu, 0, &p, &g);
        assert!(!l.l2_cmdline().contains("strict"));
        assert!(!l.l2_script.contains("guest-vfio"));
    }

    #[test]
    fn vtd_kinds_put_the_devices_behind_the_vtd() {
        let p = params();
        let g = progs();
        let args = |k, prog| scenario(k, prog, 0, &p, &g).effective_args().join(" ");
        let ours = args(Kind::VtdStrict, Program::Vmm);
        assert!(ours.contains(&format!("--viommu vtd --disk path={DISK},iommu=on")));
        assert!(!ours.contains("virtio"), "{ours}");
        let qemu = args(Kind::VtdStrict, Program::Qemu);
        let (unit, disk) = (qemu.find(QEMU_VTD), qemu.find("virtio-blk-pci"));
        assert!(
            unit.is_some() && unit < disk,
            "the unit before the disk: {qemu}"
        );
        assert!(qemu.contains("iommu_platform=on") && !qemu.contains("virtio-iommu"));
        let s = scenario(Kind::VtdStrict, Program::Qemu, 0, &p, &g);
        assert!(s.l2_cmdline().contains("intel_iommu=on iommu.strict=1"));
        assert!(s.l2_script.contains("guest-vfio maps") && s.l2_script.contains("vtd_qi:"));
        let net = scenario(Kind::VtdNet, Program::Vmm, 0, &p, &g);
        let a = net.effective_args().join(" ");
        assert_eq!(a.matches(",iommu=on,mac=").count(), 2, "{a}");
        assert!(a.contains("--viommu vtd") && net.l2_cmdline().contains("intel_iommu=on"));
        assert!(net.l2_script.contains("echo vfio-pci >"));
        let q = args(Kind::VtdNet, Program::Qemu);
        assert_eq!(q.matches("iommu_platform=on").count(), 2, "{q}");
        assert!(q.contains(QEMU_VTD) && !q.contains("virtio-iommu"));
        assert_eq!(
            kind_of("bench-io-vtd-strict-vfio-qemu-0"),
            Some(Kind::VtdStrict)
        );
        assert_eq!(kind_of("bench-io-strict-vfio-qemu-0"), Some(Kind::Strict));
        assert_eq!(kind_of("bench-testpmd-vtd-vmm-2"), Some(Kind::VtdNet));
    }

    #[test]
    fn testpmd_kinds_bind_and_map_as_intended() {
        let p = params();
        let g = progs();
        let none = scenario(Kind::NetNone, Program::Vmm, 0, &p, &g);
        let via = scenario(Kind::NetViommu, Program::Vmm, 0, &p, &g);
        let qnone = scenario(Kind::NetNone, Program::Qemu, 0, &p, &g);
        let qvia = scenario(Kind::NetViommu, Program::Qemu, 0, &p, &g);
        assert!(none.l2_script.contains("echo uio_pci_generic >"));
        assert!(none.l2_script.contains("for mode in pa; do"));
        assert!(via.l2_script.contains("echo vfio-pci >"));
        assert!(via.l2_script.contains("for mode in va; do"));
        assert!(!none.effective_args().join(" ").contains("iommu"));
        assert!(via.effective_args().join(" ").contains("--viommu virtio"));
        assert!(!qnone.effective_args().join(" ").contains("iommu"));
        assert!(qvia
            .effective_args()
            .join(" ")
            .contains("iommu_platform=on"));
        for s in [&none, &via, &qnone, &qvia] {
            assert_eq!(s.l2_files.len(), 1, "{}: the DPDK tree only", s.name);
        }
        let serial = "TESTPMD-BEGIN 1 va
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 3000           RX-dropped: 0             RX-total: 3000
  TX-packets: 3000           TX-dropped: 0             TX-total: 3000
  ---------------------- Forward statistics for port 1  ----------------------
  RX-packets: 1000           RX-dropped: 0             RX-total: 1000
  TX-packets: 1000           TX-dropped: 0             TX-total: 1000
TESTPMD-RC 1 0
TESTPMD-TIME 1 1.0 11.0 12.0
TESTPMD-END 1
GUEST-EXIT 0
";
        let o = Outcome::new(
            "x".into(),
            serial.into(),
            Some(0),
            String::new(),
            false,
            Duration::from_secs(30),
        );
        assert_eq!(figures(Kind::NetViommu, &o).pps, Some(200.0));
        // The uio run's section is `TESTPMD-BEGIN 1 pa`: absent here, so a problem.
        assert!(figures(Kind::NetNone, &o).problem.is_some());
    }

    #[test]
    fn figures_come_from_the_marked_lines() {
        let serial = "noise\nBENCH-INIT 1.234567\n\
            L1-KVMSTAT begin 4k-rand-anon-qd1 exits=100 io_exits=5 r_0x400=10\n\
            L1-KVMSTAT end 4k-rand-anon-qd1 exits=5038 io_exits=5 r_0x400=2479\n\
            BENCH-READ 4k-rand-anon-qd1 iops=1234.5 mbps=5.06 bs=4096 requests=2469 seconds=2.000 \
            pattern=rand qd=1 buf=anon acct_reqs=2469 acct_viommu_map=9876 acct_blk_kicks=2469\n\
            BENCH-READ 1m-seq-anon-qd1 iops=80.0 mbps=83.89 bs=1048576 requests=160 seconds=2.0 pattern=seq\n\
            BENCH-VFIO-4K maps_per_s=2500 unmaps_per_s=3200 size=4096 count=500\n\
            BENCH-VFIO-2M maps_per_s=400 unmaps_per_s=nan size=2097152 count=32\nGUEST-EXIT 0\n";
        let o = Outcome::new(
            "x".into(),
            serial.into(),
            Some(0),
            String::new(),
            false,
            Duration::from_millis(12_500),
        );
        let f = figures(Kind::Strict, &o);
        assert_eq!(f.init_s, Some(1.234567));
        assert_eq!(f.wall_s, Some(12.5));
        assert_eq!(f.iops_4k, Some(1234.5));
        assert_eq!(f.mbps_1m, Some(83.89));
        assert_eq!((f.maps_4k, f.unmaps_4k), (Some(2500.0), Some(3200.0)));
        assert_eq!((f.maps_2m, f.unmaps_2m), (Some(400.0), None));
        assert_eq!(f.problem, None);
        assert_eq!(f.reads.len(), 2);
        let r = &f.reads[0];
        assert_eq!(
            (r.name.as_str(), r.buf.as_str()),
            ("4k-rand-anon-qd1", "anon")
        );
        assert_eq!(r.per_io(r.acct.get("viommu_map").copied()), Some(4.0));
        assert_eq!(r.per_io(r.l1.get("exits").copied()), Some(2.0));
        assert_eq!(r.l1.get("r_0x400"), Some(&2469));
        assert!(f.reads[1].l1.is_empty() && f.reads[1].acct.is_empty());
        let lazy = figures(Kind::Lazy, &o);
        assert_eq!(lazy.maps_4k, None);
        let bad = Outcome::new(
            "x".into(),
            serial.into(),
            None,
            String::new(),
            true,
            Duration::ZERO,
        );
        assert!(figures(Kind::Boot, &bad).problem.is_some());
    }
}
