//! Real-guest scenarios for virtio-net behind our virtio-iommu (`--net hub=0,iommu=on`, two
//! ports on one in-process hub):
//!
//! - `net-hub-strict` / `net-hub-lazy`: Linux's virtio-net driver. One guest owns both ports, so
//!   IP traffic between them would stay inside its stack; busybox `arping` instead sends raw ARP
//!   requests out of the first port (a packet socket) and the second port's reply must come
//!   back through the hub, from the second port's MAC. Receive counters confirm both crossings.
//! - `net-dpdk-testpmd`: both ports bound to vfio-pci in L2, DPDK's `dpdk-testpmd` (Debian
//!   bookworm's dpdk-dev, from `.cache/images/l2-dpdk.tar.gz`, built on demand by
//!   `guest-images/build.sh dpdk`) forwarding with `io` and `--tx-first`: twice with IOVA as VA
//!   (the second run proves the first one's domains were torn down and the devices re-attached)
//!   and once with `--iova-mode=pa`, all in one boot. Every run must move packets both ways
//!   with no drops.

use std::path::PathBuf;
use std::time::Duration;

use rig::{CpioFile, Outcome, Program, Scenario};

use crate::common::{clean_exit, kernel_log_clean, section, value, Case, KERNEL_ERRORS_SH};

const MAC_A: &str = "52:54:00:00:0a:01";
const MAC_B: &str = "52:54:00:00:0a:02";

/// Guest script prefix: find the two ports by MAC, print their PCI address and IOMMU domain.
const FIND_PORTS_SH: &str = r#"#!/bin/sh
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

/// Guest script: bring both ports up, ARP across the hub, print the counters.
const ARPING_SH: &str = r#"
set -e
for i in $a $b; do
    ip link set "$i" up
    echo 0 >"/proc/sys/net/ipv4/conf/$i/rp_filter"
    # The request's source address is local to this guest: accept it on the receiving port.
    echo 1 >"/proc/sys/net/ipv4/conf/$i/accept_local"
done
echo 0 >/proc/sys/net/ipv4/conf/all/rp_filter
ip addr add 10.0.0.1/24 dev "$a"
ip addr add 10.0.0.2/24 dev "$b"
sleep 1
rxb0=$(cat "/sys/class/net/$b/statistics/rx_packets")
rxa0=$(cat "/sys/class/net/$a/statistics/rx_packets")
set +e
arping -c 5 -w 30 -I "$a" 10.0.0.2
echo "ARPING-RC $?"
set -e
echo "RX-B $(( $(cat "/sys/class/net/$b/statistics/rx_packets") - rxb0 ))"
echo "RX-A $(( $(cat "/sys/class/net/$a/statistics/rx_packets") - rxa0 ))"
echo "ERR-A $(cat "/sys/class/net/$a/statistics/rx_errors") $(cat "/sys/class/net/$a/statistics/tx_errors")"
echo "ERR-B $(cat "/sys/class/net/$b/statistics/rx_errors") $(cat "/sys/class/net/$b/statistics/tx_errors")"
"#;

fn ports_script() -> String {
    FIND_PORTS_SH
        .replace("MAC_A)", &format!("{MAC_A})"))
        .replace("MAC_B)", &format!("{MAC_B})"))
}

/// `--viommu virtio` and the two hub ports behind it.
fn net_args(cpus: u32, memory: &str) -> Vec<String> {
    let mut args = Scenario::default_args(Program::Vmm, cpus, 0, 0);
    if let Some(i) = args.iter().position(|a| a == "--memory") {
        args[i + 1] = memory.to_string();
    }
    args.extend([
        "--viommu".to_string(),
        "virtio".to_string(),
        "--net".to_string(),
        format!("hub=0,iommu=on,mac={MAC_A}"),
        "--net".to_string(),
        format!("hub=0,iommu=on,mac={MAC_B}"),
    ]);
    args
}

/// The `viommu:` counters line from the VMM's stderr, as name -> value.
fn counters(o: &Outcome) -> Result<Vec<(String, u64)>, String> {
    let line = o
        .vmm_log
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("viommu: "))
        .ok_or("no 'viommu:' counters line in the VMM's stderr")?;
    println!("    {}: {}", o.name, line.trim());
    vmm::iommu::parse_summary(line).ok_or_else(|| format!("unparseable counters line {line:?}"))
}

fn counter(c: &[(String, u64)], name: &str) -> Result<u64, String> {
    c.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| format!("counter {name} missing"))
}

fn num(o: &Outcome, key: &str) -> Result<i64, String> {
    value(&o.serial, key)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no '{key} N' line on the console"))
}

/// Both ports sit in IOMMU groups with a translated domain of type `want`.
fn domains_check(o: &Outcome, want: &str) -> Result<(), String> {
    let lines: Vec<&str> = o
        .serial
        .lines()
        .filter_map(|l| l.trim().strip_prefix("NET-DOMAIN "))
        .collect();
    if lines.len() != 2 {
        return Err(format!("want 2 NET-DOMAIN lines, got {lines:?}"));
    }
    for l in lines {
        if l.split_whitespace().nth(2) != Some(want) {
            return Err(format!("port domain {l:?}, want type {want}"));
        }
    }
    Ok(())
}

fn linux_case(name: &str, strict: bool) -> Case {
    let mut script = ports_script();
    script.push_str(ARPING_SH);
    script.push_str(KERNEL_ERRORS_SH);
    let scenario = Scenario::vmm(name, script)
        .args(net_args(1, "512M"))
        .cmdline_extra(if strict { "iommu.strict=1" } else { "" })
        .timeout(Duration::from_secs(300));
    let want = if strict { "DMA" } else { "DMA-FQ" };
    Case::new(scenario, move |o| {
        clean_exit(o)?;
        domains_check(o, want)?;
        let replies = o
            .serial
            .lines()
            .filter(|l| l.contains("reply from 10.0.0.2") && l.contains(MAC_B))
            .count();
        if replies < 3 {
            return Err(format!(
                "{replies} ARP replies from 10.0.0.2 [{MAC_B}] came back through the hub, want >= 3 \
                 (ARPING-RC {:?})",
                value(&o.serial, "ARPING-RC")
            ));
        }
        let (rx_b, rx_a) = (num(o, "RX-B")?, num(o, "RX-A")?);
        if rx_b < 3 || rx_a < 3 {
            return Err(format!(
                "receive counters grew by {rx_b} (b) and {rx_a} (a), want >= 3"
            ));
        }
        for k in ["ERR-A", "ERR-B"] {
            let v = value(&o.serial, k).ok_or(format!("no {k} line"))?;
            if v != "0 0" {
                return Err(format!("{k} {v}: errors counted"));
            }
        }
        kernel_log_clean(o)?;
        println!(
            "    {}: {replies} ARP replies from {MAC_B} came back through the hub; receive \
             counters +{rx_b} (b) +{rx_a} (a)",
            o.name
        );
        let c = counters(o)?;
        if counter(&c, "maps")? == 0 {
            return Err("the virtio-iommu saw no MAP: were the ports translated?".into());
        }
        Ok(())
    })
}

/// Where `guest-images/build.sh dpdk` leaves the DPDK tree.
fn dpdk_tarball() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/images/l2-dpdk.tar.gz")
}

/// The DPDK tree, built first if missing (a no-op when current).
fn dpdk_files() -> Result<Vec<u8>, String> {
    let tar = dpdk_tarball();
    if !tar.is_file() {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest-images/build.sh");
        let st = std::process::Command::new(script)
            .arg("dpdk")
            .status()
            .map_err(|e| format!("guest-images/build.sh dpdk: {e}"))?;
        if !st.success() {
            return Err(format!("guest-images/build.sh dpdk failed: {st}"));
        }
    }
    std::fs::read(&tar).map_err(|e| format!("reading {}: {e}", tar.display()))
}

/// Seconds of forwarding per testpmd run of the functional scenario.
const FWD_SECS: u32 = 6;
/// Seconds of forwarding per benchmark run.
const BENCH_SECS: u32 = 15;

/// Guest script: unpack DPDK, hugepages, bind both ports to vfio-pci, then one testpmd run per
/// entry of `modes` (IOVA mode), each forwarding for `secs` seconds timed from the moment
/// forwarding started.
fn dpdk_script(modes: &[&str], secs: u32) -> String {
    let mut s = ports_script();
    s.push_str(&format!(
        r#"
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
    echo vfio-pci >"/sys/bus/pci/devices/$bdf/driver_override"
    echo "$bdf" >/sys/bus/pci/drivers_probe
    echo "BOUND $bdf $(basename "$(readlink "/sys/bus/pci/devices/$bdf/driver")")"
    bdfs="$bdfs -a $bdf"
done
ls /dev/vfio
up() {{ cut -d' ' -f1 /proc/uptime; }}
# testpmd may be gone when its stdin is written: report, do not die of SIGPIPE.
trap '' PIPE
set +e
run=0
for mode in {modes}; do
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
    while kill -0 $pid 2>/dev/null && [ $i -lt 1200 ]; do
        case "$(cat /proc/$pid/wchan 2>/dev/null)" in
            *pipe*) break ;;
        esac
        sleep 0.25; i=$((i + 1))
    done
    t0=$(up)
    sleep {secs}
    echo >&3 2>/dev/null
    wait $pid
    rc=$?
    t1=$(up)
    exec 3>&-
    echo "TESTPMD-RC $run $rc"
    echo "TESTPMD-TIME $run $t0 $t1"
    echo "TESTPMD-END $run"
done
set -e
"#,
        modes = modes.join(" "),
    ));
    s.push_str(KERNEL_ERRORS_SH);
    s
}

/// Per-port (RX-packets, RX-dropped, TX-packets, TX-dropped) from one testpmd run's final
/// forward statistics.
fn port_stats(lines: &[&str]) -> Vec<(u64, u64, u64, u64)> {
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

/// One testpmd run's result.
struct PmdRun {
    /// Per port (RX, RX-dropped, TX, TX-dropped).
    ports: Vec<(u64, u64, u64, u64)>,
    /// Seconds from forwarding start to exit.
    secs: f64,
}

/// Parse run `run` (IOVA mode `mode`) of the console: it must have exited 0 with packets both
/// ways on both ports and no drops.
fn pmd_run(o: &Outcome, run: usize, mode: &str) -> Result<PmdRun, String> {
    let lines = section(
        &o.serial,
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
    let rc = tagged("TESTPMD-RC").unwrap_or_else(|| "?".into());
    let secs = tagged("TESTPMD-TIME")
        .and_then(|t| {
            let v: Vec<f64> = t
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (v.len() == 2).then(|| v[1] - v[0])
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

/// Whether this run of the guests binary may select the scenario `name` (the same rule as
/// tests/guests.rs: no filter selects every default case, `--list` runs nothing).
fn selected(name: &str) -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return false;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}

/// The DPDK tree as an L2 file, or why it is missing (only read when `name` may run).
fn dpdk_payload(name: &str) -> (Vec<u8>, Option<String>) {
    if !selected(name) {
        return (Vec::new(), None);
    }
    match dpdk_files() {
        Ok(f) => (f, None),
        Err(e) => (Vec::new(), Some(e)),
    }
}

fn dpdk_case() -> Case {
    let name = "net-dpdk-testpmd";
    let (files, err) = dpdk_payload(name);
    let modes = ["va", "va", "pa"];
    let scenario = Scenario::vmm(name, dpdk_script(&modes, FWD_SECS))
        .args(net_args(2, "1024M"))
        .l2_file(CpioFile::new("/rig/dpdk.tar.gz", 0o644, files))
        .timeout(Duration::from_secs(1500));
    // Opt-in for now: it passed in 3 of 4 full runs (55-73 s) but hung once until its timeout
    // in a clean-clone run on a quiet machine; the cause (VMM or guest side) is not found yet.
    Case::opt_in(scenario, move |o| {
        if let Some(e) = &err {
            return Err(e.clone());
        }
        clean_exit(o)?;
        domains_check(o, "DMA-FQ")?;
        let mut report = Vec::new();
        for (i, mode) in modes.iter().enumerate() {
            let r = pmd_run(o, i + 1, mode)?;
            report.push(format!(
                "run {} iova={mode}: port0 rx={} tx={}, port1 rx={} tx={} in {:.1} s ({:.0} pkt/s \
                 per direction)",
                i + 1,
                r.ports[0].0,
                r.ports[0].2,
                r.ports[1].0,
                r.ports[1].2,
                r.secs,
                r.ports[0].0 as f64 / r.secs
            ));
        }
        for r in &report {
            println!("    {name}: {r}");
        }
        kernel_log_clean(o)?;
        let c = counters(o)?;
        if counter(&c, "maps")? == 0 {
            return Err("the virtio-iommu saw no MAP".into());
        }
        Ok(())
    })
}

/// QEMU's equivalent of [`net_args`]: two virtio-net on hub 0 behind its virtio-iommu.
fn qemu_net_args() -> Vec<String> {
    let mut args = Scenario::default_args(Program::Qemu, 2, 0, 0);
    if let Some(i) = args.iter().position(|a| a == "-m") {
        args[i + 1] = "1024".into();
    }
    for (i, mac) in [MAC_A, MAC_B].iter().enumerate() {
        args.push("-netdev".into());
        args.push(format!("hubport,id=n{i},hubid=0"));
        args.push("-device".into());
        // No option ROM (romfile=): direct kernel boot needs none.
        args.push(format!(
            "virtio-net-pci,netdev=n{i},mac={mac},romfile=,disable-legacy=on,iommu_platform=on"
        ));
    }
    args
}

/// `net-bench-*` (opt-in): testpmd io forwarding for BENCH_SECS between two hub ports behind
/// the vIOMMU (IOVA as VA), ours and QEMU's (`-netdev hubport`), interleaved twice in one L1
/// boot. Prints a `BENCH` line with packets/s per direction. No row without a vIOMMU: the
/// Debian kernel has no VFIO_NOIOMMU (vfio-pci then needs an IOMMU) and the L2 image no uio.
pub fn bench_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for round in 1..=2 {
        for (program, prog) in [(Program::Vmm, "ours"), (Program::Qemu, "qemu")] {
            let name = format!("net-bench-testpmd-{prog}-viommu-{round}");
            let (files, err) = dpdk_payload(&name);
            let script = dpdk_script(&["va"], BENCH_SECS);
            let (scenario, args) = match program {
                Program::Vmm => (Scenario::vmm(name.clone(), script), net_args(2, "1024M")),
                Program::Qemu => (Scenario::qemu(name.clone(), script), qemu_net_args()),
            };
            let scenario = scenario
                .args(args)
                .l2_file(CpioFile::new("/rig/dpdk.tar.gz", 0o644, files))
                .timeout(Duration::from_secs(1200));
            v.push(Case::opt_in(scenario, move |o| {
                if let Some(e) = &err {
                    return Err(e.clone());
                }
                clean_exit(o)?;
                let r = pmd_run(o, 1, "va")?;
                let maps = if program == Program::Vmm {
                    let c = counters(o)?;
                    format!(
                        " maps={} unmaps={}",
                        counter(&c, "maps")?,
                        counter(&c, "unmaps")?
                    )
                } else {
                    String::new()
                };
                println!(
                    "BENCH {} pps_0to1={:.0} pps_1to0={:.0} packets={}+{} secs={:.1}{maps}",
                    o.name,
                    r.ports[1].0 as f64 / r.secs,
                    r.ports[0].0 as f64 / r.secs,
                    r.ports[0].0,
                    r.ports[1].0,
                    r.secs
                );
                Ok(())
            }));
        }
    }
    v
}

/// The virtio-net scenarios.
pub fn cases() -> Vec<Case> {
    vec![
        linux_case("net-hub-strict", true),
        linux_case("net-hub-lazy", false),
        dpdk_case(),
    ]
}
