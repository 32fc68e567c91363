//! DPDK's `dpdk-testpmd` in L2 between two virtio-net ports on one in-process hub: the VMM
//! command lines (ours and QEMU's, with or without a vIOMMU), the guest script, and what the
//! console says about each run. Shared by the guest tests and `make bench`.
//!
//! The DPDK tree is `.cache/images/l2-dpdk.tar.gz` (Debian bookworm's dpdk-dev and its
//! libraries, built by `guest-images/build.sh dpdk`), unpacked at `/` in L2.

use std::path::{Path, PathBuf};

use crate::{Program, Scenario};

/// MAC of the first port.
pub const MAC_A: &str = "52:54:00:00:0a:01";
/// MAC of the second port.
pub const MAC_B: &str = "52:54:00:00:0a:02";
/// Where the DPDK tarball sits in the L2 initramfs.
pub const L2_TARBALL: &str = "/rig/dpdk.tar.gz";

/// How L2 hands the ports to DPDK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// vfio-pci behind the virtio-iommu: every buffer goes through a VFIO DMA mapping.
    Vfio,
    /// uio_pci_generic, no IOMMU at all (IOVA = guest-physical): the baseline. Debian's kernel
    /// has no VFIO no-IOMMU mode, so this is the only way to run DPDK without one.
    Uio,
}

impl Binding {
    /// The kernel driver the ports are bound to.
    pub fn driver(self) -> &'static str {
        match self {
            Binding::Vfio => "vfio-pci",
            Binding::Uio => "uio_pci_generic",
        }
    }
}

/// The DPDK tarball on the host, under the repository `root`.
pub fn tarball(root: &Path) -> PathBuf {
    root.join(".cache/images/l2-dpdk.tar.gz")
}

/// The DPDK tarball's bytes, built first by `guest-images/build.sh dpdk` if missing.
pub fn tarball_bytes(root: &Path) -> Result<Vec<u8>, String> {
    let tar = tarball(root);
    if !tar.is_file() {
        let script = root.join("guest-images/build.sh");
        let st = std::process::Command::new(&script)
            .arg("dpdk")
            .status()
            .map_err(|e| format!("{} dpdk: {e}", script.display()))?;
        if !st.success() {
            return Err(format!("{} dpdk failed: {st}", script.display()));
        }
    }
    std::fs::read(&tar).map_err(|e| format!("reading {}: {e}", tar.display()))
}

/// Our vmm's arguments: `cpus` vCPUs, `memory_mib` of RAM, the two hub ports, behind
/// `--viommu virtio` when `viommu`.
pub fn vmm_args(cpus: u32, memory_mib: u32, viommu: bool) -> Vec<String> {
    let mut args = Scenario::base_args(Program::Vmm, cpus, memory_mib, viommu);
    let iommu = if viommu { ",iommu=on" } else { "" };
    for mac in [MAC_A, MAC_B] {
        args.extend(["--net".to_string(), format!("hub=0{iommu},mac={mac}")]);
    }
    args
}

/// QEMU's equivalent of [`vmm_args`]: two modern virtio-net-pci on `-netdev hubport` hub 0,
/// behind its virtio-iommu-pci when `viommu`.
pub fn qemu_args(cpus: u32, memory_mib: u32, viommu: bool) -> Vec<String> {
    let mut args = Scenario::base_args(Program::Qemu, cpus, memory_mib, viommu);
    let iommu = if viommu { ",iommu_platform=on" } else { "" };
    for (i, mac) in [MAC_A, MAC_B].iter().enumerate() {
        args.push("-netdev".into());
        args.push(format!("hubport,id=n{i},hubid=0"));
        args.push("-device".into());
        // No option ROM (romfile=): direct kernel boot needs none.
        args.push(format!(
            "virtio-net-pci,netdev=n{i},mac={mac},romfile=,disable-legacy=on{iommu}"
        ));
    }
    args
}

/// Guest script prefix: find the two ports by MAC (as `$a` and `$b`), print their PCI address
/// and IOMMU domain type (`NET-DOMAIN ifname bdf type`).
pub fn ports_script() -> String {
    PORTS_SH
        .replace("MAC_A)", &format!("{MAC_A})"))
        .replace("MAC_B)", &format!("{MAC_B})"))
}

const PORTS_SH: &str = r#"#!/bin/sh
i=0
while [ $i -lt 30 ]; do
    n=$(ls /sys/class/net | grep -c '^eth' || true)
    [ "$n" -ge 2 ] && break
    sleep 1; i=$((i + 1))
done
a=""; b=""
for n in /sys/class/net/eth*; do
    case "$(cat "$n/address")" in
        MAC_A) a=${n##*/} ;;
        MAC_B) b=${n##*/} ;;
    esac
done
echo "NET-IFS $a $b"
[ -n "$a" ] && [ -n "$b" ] || { echo "ports not found"; ls -l /sys/class/net; exit 10; }
for i in $a $b; do
    bdf=$(basename "$(dirname "$(readlink -f "/sys/class/net/$i/device")")")
    grp=none
    for g in /sys/kernel/iommu_groups/*/devices/"$bdf"; do
        [ -e "$g" ] && grp=$(echo "$g" | cut -d/ -f5)
    done
    echo "NET-DOMAIN $i $bdf $(cat "/sys/kernel/iommu_groups/$grp/type" 2>/dev/null || echo none)"
done
"#;

/// Guest script: find the ports, unpack DPDK, hugepages, bind both ports to `binding`'s driver,
/// then one testpmd run per entry of `modes` (IOVA mode: `va` or `pa`), each `io` forwarding
/// with `--tx-first` for `secs` seconds. Per run it prints `TESTPMD-BEGIN n mode`, testpmd's
/// output, `TESTPMD-RC n rc`, `TESTPMD-TIME n start stop exit` (guest uptime: forwarding
/// started, stop requested, testpmd gone) and `TESTPMD-END n`; a testpmd that does not exit
/// within 60 s of the stop request is reported (`TESTPMD-HUNG n` with its threads' kernel
/// state) and killed.
pub fn testpmd_script(binding: Binding, modes: &[&str], secs: u32) -> String {
    let mut s = ports_script();
    s.push_str(
        &TESTPMD_SH
            .replace("@DRIVER@", binding.driver())
            .replace("@MODES@", &modes.join(" "))
            .replace("@SECS@", &secs.to_string()),
    );
    s
}

const TESTPMD_SH: &str = r#"
set -e
echo "rig: unpacking DPDK"
tar -xzf /rig/dpdk.tar.gz -C /
rm -f /rig/dpdk.tar.gz
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
mkdir -p /dev/hugepages /var/run
mount -t hugetlbfs nodev /dev/hugepages
echo 128 >/proc/sys/vm/nr_hugepages
echo "HUGEPAGES $(cat /proc/sys/vm/nr_hugepages)"
bdfs=""
for i in $a $b; do
    bdf=$(basename "$(dirname "$(readlink -f "/sys/class/net/$i/device")")")
    echo "$bdf" >"/sys/bus/pci/devices/$bdf/driver/unbind"
    echo @DRIVER@ >"/sys/bus/pci/devices/$bdf/driver_override"
    echo "$bdf" >/sys/bus/pci/drivers_probe
    echo "BOUND $bdf $(basename "$(readlink "/sys/bus/pci/devices/$bdf/driver")")"
    bdfs="$bdfs -a $bdf"
done
up() { cut -d' ' -f1 /proc/uptime; }
# testpmd may be gone when its stdin is written: report, do not die of SIGPIPE.
trap '' PIPE
set +e
run=0
for mode in @MODES@; do
    run=$((run + 1))
    echo "TESTPMD-BEGIN $run $mode"
    rm -f /tmp/pmd-in
    mkfifo /tmp/pmd-in
    # Output straight to the console (a tty: line-buffered, seen live); stdin from a FIFO.
    dpdk-testpmd -l 0-1 -n 1 $bdfs --iova-mode=$mode -- --forward-mode=io --tx-first \
        --total-num-mbufs=4096 --nb-cores=1 </tmp/pmd-in 2>&1 &
    pid=$!
    exec 3>/tmp/pmd-in
    # Forwarding runs once the main thread blocks reading stdin ("Press enter to exit").
    i=0
    while kill -0 $pid 2>/dev/null && [ $i -lt 6000 ]; do
        case "$(cat /proc/$pid/wchan 2>/dev/null)" in
            *pipe*) break ;;
        esac
        sleep 0.05; i=$((i + 1))
    done
    t0=$(up)
    sleep @SECS@
    t1=$(up)
    echo >&3 2>/dev/null
    # Bounded: a testpmd that does not exit is a failure with its threads' state on record.
    i=0
    while kill -0 $pid 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
    if kill -0 $pid 2>/dev/null; then
        echo "TESTPMD-HUNG $run"
        for t in /proc/$pid/task/*; do
            echo "task ${t##*/} $(cat $t/comm) wchan=$(cat $t/wchan) state=$(cut -d' ' -f3 $t/stat)"
            head -12 $t/stack 2>/dev/null
        done
        kill -9 $pid
    fi
    wait $pid
    rc=$?
    t2=$(up)
    exec 3>&-
    echo "TESTPMD-RC $run $rc"
    echo "TESTPMD-TIME $run $t0 $t1 $t2"
    echo "TESTPMD-END $run"
done
set -e
"#;

/// One testpmd run's result.
#[derive(Clone, Debug, PartialEq)]
pub struct PmdRun {
    /// Per port (RX-packets, RX-dropped, TX-packets, TX-dropped) from the final statistics.
    pub ports: Vec<(u64, u64, u64, u64)>,
    /// Seconds from forwarding start to the stop request.
    pub secs: f64,
}

impl PmdRun {
    /// Packets per second per direction: the ports' mean RX count over the forwarding time.
    pub fn pps(&self) -> f64 {
        if self.ports.is_empty() || self.secs <= 0.0 {
            return 0.0;
        }
        let rx: u64 = self.ports.iter().map(|p| p.0).sum();
        rx as f64 / self.ports.len() as f64 / self.secs
    }
}

/// Per-port (RX-packets, RX-dropped, TX-packets, TX-dropped) from testpmd's final "Forward
/// statistics for port N" blocks.
pub fn port_stats(lines: &[&str]) -> Vec<(u64, u64, u64, u64)> {
    let field = |l: &str, k: &str| -> Option<u64> {
        let i = l.find(k)?;
        l[i + k.len()..].split_whitespace().next()?.parse().ok()
    };
    let mut out = Vec::new();
    let mut cur: Option<(u64, u64)> = None;
    let mut in_port = false;
    for l in lines {
        if l.contains("Forward statistics for port") {
            in_port = true;
            continue;
        }
        if !in_port {
            continue;
        }
        if let (Some(p), Some(d)) = (field(l, "RX-packets:"), field(l, "RX-dropped:")) {
            cur = Some((p, d));
        } else if let (Some(p), Some(d), Some((rp, rd))) =
            (field(l, "TX-packets:"), field(l, "TX-dropped:"), cur)
        {
            out.push((rp, rd, p, d));
            cur = None;
            in_port = false;
        }
    }
    out
}

/// Run `run` (IOVA mode `mode`) from the console: it must have exited 0 with packets both ways
/// on both ports and no drops.
pub fn pmd_run(serial: &str, run: usize, mode: &str) -> Result<PmdRun, String> {
    let lines = crate::section(
        serial,
        &format!("TESTPMD-BEGIN {run} {mode}"),
        &format!("TESTPMD-END {run}"),
    )
    .ok_or(format!("testpmd run {run} ({mode}) did not finish"))?;
    let tagged = |tag: &str| {
        lines
            .iter()
            .find_map(|l| l.trim().strip_prefix(&format!("{tag} {run} ")))
            .map(str::to_string)
    };
    if lines
        .iter()
        .any(|l| l.trim() == format!("TESTPMD-HUNG {run}"))
    {
        return Err(format!(
            "testpmd run {run} ({mode}) did not exit within 60 s of the stop request; its \
             output:\n{}",
            lines.join("\n")
        ));
    }
    let rc = tagged("TESTPMD-RC").unwrap_or_else(|| "?".into());
    let secs = tagged("TESTPMD-TIME")
        .and_then(|t| {
            let v: Vec<f64> = t
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (v.len() == 3).then(|| v[1] - v[0])
        })
        .filter(|s| *s > 0.0)
        .ok_or(format!("testpmd run {run}: no TESTPMD-TIME"))?;
    let ports = port_stats(&lines);
    if rc != "0" || ports.len() != 2 {
        return Err(format!(
            "testpmd run {run} ({mode}): exit {rc}, {} port stats; its output:\n{}",
            ports.len(),
            lines.join("\n")
        ));
    }
    for (port, &(rx, rxd, tx, txd)) in ports.iter().enumerate() {
        if rx == 0 || tx == 0 || rxd != 0 || txd != 0 {
            return Err(format!(
                "testpmd run {run} ({mode}) port {port}: RX {rx} (dropped {rxd}), TX {tx} \
                 (dropped {txd}); want traffic both ways, no drops; its output:\n{}",
                lines.join("\n")
            ));
        }
    }
    Ok(PmdRun { ports, secs })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATS: &str = "TESTPMD-BEGIN 1 va
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 1000           RX-dropped: 0             RX-total: 1000
  TX-packets: 990            TX-dropped: 0             TX-total: 990
  ----------------------------------------------------------------------------
  ---------------------- Forward statistics for port 1  ----------------------
  RX-packets: 990            RX-dropped: 0             RX-total: 990
  TX-packets: 1000           TX-dropped: 0             TX-total: 1000
  ----------------------------------------------------------------------------
  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 1990           RX-dropped: 0             RX-total: 1990
TESTPMD-RC 1 0
TESTPMD-TIME 1 10.00 20.00 21.50
TESTPMD-END 1
";

    #[test]
    fn a_clean_run_gives_counts_and_rate() {
        let r = pmd_run(STATS, 1, "va").unwrap();
        assert_eq!(r.ports, vec![(1000, 0, 990, 0), (990, 0, 1000, 0)]);
        assert_eq!(r.secs, 10.0);
        assert_eq!(r.pps(), 99.5);
        assert!(pmd_run(STATS, 2, "va").is_err());
    }

    #[test]
    fn drops_failures_and_hangs_are_errors() {
        let dropped = STATS.replacen("RX-dropped: 0 ", "RX-dropped: 5 ", 1);
        assert!(pmd_run(&dropped, 1, "va")
            .unwrap_err()
            .contains("dropped 5"));
        let failed = STATS.replace("TESTPMD-RC 1 0", "TESTPMD-RC 1 137");
        assert!(pmd_run(&failed, 1, "va").unwrap_err().contains("exit 137"));
        let hung = STATS.replace("TESTPMD-RC 1 0", "TESTPMD-HUNG 1\nTESTPMD-RC 1 137");
        assert!(pmd_run(&hung, 1, "va")
            .unwrap_err()
            .contains("did not exit"));
        let no_time = STATS.replace("TESTPMD-TIME 1 10.00 20.00 21.50\n", "");
        assert!(pmd_run(&no_time, 1, "va").is_err());
    }

    #[test]
    fn command_lines_follow_the_vmm_and_the_iommu() {
        let ours = vmm_args(2, 1024, true).join(" ");
        assert!(ours.contains("--viommu virtio"));
        assert!(ours.contains(&format!("--net hub=0,iommu=on,mac={MAC_B}")));
        let bare = vmm_args(2, 1024, false).join(" ");
        assert!(!bare.contains("viommu") && !bare.contains("iommu=on"));
        assert!(bare.contains("--memory 1024M"));
        let q = qemu_args(2, 1024, true).join(" ");
        assert!(q.contains("virtio-iommu-pci") && q.contains("iommu_platform=on"));
        let qb = qemu_args(2, 1024, false).join(" ");
        assert!(!qb.contains("iommu"));
        assert!(qb.contains("-m 1024") && qb.contains("hubport,id=n1,hubid=0"));
    }

    #[test]
    fn the_script_binds_the_chosen_driver_and_runs_every_mode() {
        let s = testpmd_script(Binding::Uio, &["pa", "pa"], 7);
        assert!(s.contains("echo uio_pci_generic >"));
        assert!(s.contains("for mode in pa pa; do"));
        assert!(s.contains("sleep 7\n"));
        assert!(!s.contains('@'));
        assert!(s.contains(&format!("{MAC_A})")));
    }
}
