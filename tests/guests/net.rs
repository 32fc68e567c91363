//! Real-guest scenarios for virtio-net behind our virtio-iommu (`--net hub=0,iommu=on`, two
//! ports on one in-process hub):
//!
//! - `net-hub-strict` / `net-hub-lazy`: Linux's virtio-net driver. One guest owns both ports, so
//!   IP traffic between them would stay inside its stack; busybox `arping` instead sends raw ARP
//!   requests out of the first port (a packet socket) and the second port's reply must come
//!   back through the hub, from the second port's MAC. Receive counters confirm both crossings.
//! - `net-dpdk-testpmd`: both ports bound to vfio-pci in L2, DPDK's `dpdk-testpmd` (see
//!   [`rig::dpdk`]) forwarding with `io` and `--tx-first`: twice with IOVA as VA (the second
//!   run proves the first one's domains were torn down and the devices re-attached) and once
//!   with `--iova-mode=pa`, all in one boot. Every run must move packets both ways with no
//!   drops. `net-dpdk-soak` (opt-in) does ten such runs; `net-dpdk-uio` (opt-in) is the
//!   baseline without a vIOMMU (uio_pci_generic, IOVA as PA) that `make bench` compares with.

use std::time::Duration;

use rig::dpdk::{self, Binding, MAC_B};
use rig::{CpioFile, Outcome, Program, Scenario};

use crate::common::{
    clean_exit, counter, counters as common_counters, kernel_log_clean, value, viommu_line,
    will_run, Case, KERNEL_ERRORS_SH,
};

/// Guest script: bring both ports up, ARP across the hub, print the counters.
pub(crate) const ARPING_SH: &str = r#"
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

/// [`crate::common::counters`], printing the line.
fn counters(o: &Outcome) -> Result<Vec<(String, u64)>, String> {
    if let Some(line) = viommu_line(o) {
        println!("    {}: {}", o.name, line.trim());
    }
    common_counters(o)
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
    let mut script = dpdk::ports_script();
    script.push_str(ARPING_SH);
    script.push_str(KERNEL_ERRORS_SH);
    let scenario = Scenario::vmm(name, script)
        .args(dpdk::vmm_args(1, 512, true))
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

/// IOVA modes of the soak's testpmd runs.
const SOAK: &[&str] = &["va", "pa", "va", "pa", "va", "pa", "va", "pa", "va", "pa"];

/// Seconds of forwarding per testpmd run.
const FWD_SECS: u32 = 6;

/// The DPDK tree as an L2 file, or why it is missing (only read when `name` will run).
fn dpdk_payload(name: &str, opt_in: bool) -> (CpioFile, Option<String>) {
    let bytes = if will_run(name, opt_in) {
        dpdk::tarball_bytes(std::path::Path::new(env!("CARGO_MANIFEST_DIR")))
    } else {
        Ok(Vec::new())
    };
    match bytes {
        Ok(b) => (CpioFile::new(dpdk::L2_TARBALL, 0o644, b), None),
        Err(e) => (CpioFile::new(dpdk::L2_TARBALL, 0o644, Vec::new()), Some(e)),
    }
}

/// One testpmd run per entry of `modes` (IOVA mode) in one boot, ports behind our vIOMMU.
fn dpdk_case(
    program: Program,
    name: &'static str,
    modes: &'static [&'static str],
    opt_in: bool,
) -> Case {
    let (file, err) = dpdk_payload(name, opt_in);
    let mut script = dpdk::testpmd_script(Binding::Vfio, modes, FWD_SECS);
    script.push_str(KERNEL_ERRORS_SH);
    let scenario = match program {
        Program::Vmm => Scenario::vmm(name, script).args(dpdk::vmm_args(2, 1024, true)),
        Program::Qemu => Scenario::qemu(name, script).args(dpdk::qemu_args(2, 1024, true)),
    };
    let scenario = scenario
        .l2_file(file)
        .timeout(Duration::from_secs(300 + 60 * modes.len() as u64));
    let mut case = Case::new(scenario, move |o| {
        if let Some(e) = &err {
            return Err(e.clone());
        }
        clean_exit(o)?;
        domains_check(o, "DMA-FQ")?;
        let mut report = Vec::new();
        for (i, mode) in modes.iter().enumerate() {
            let r = dpdk::pmd_run(&o.serial, i + 1, mode)?;
            report.push(format!(
                "run {} iova={mode}: port0 rx={} tx={}, port1 rx={} tx={} in {:.1} s ({:.0} pkt/s \
                 per direction)",
                i + 1,
                r.ports[0].0,
                r.ports[0].2,
                r.ports[1].0,
                r.ports[1].2,
                r.secs,
                r.pps()
            ));
        }
        for r in &report {
            println!("    {name}: {r}");
        }
        kernel_log_clean(o)?;
        if program == Program::Vmm {
            let c = counters(o)?;
            if counter(&c, "maps")? == 0 {
                return Err("the virtio-iommu saw no MAP".into());
            }
        }
        Ok(())
    });
    case.opt_in = opt_in;
    case
}

/// `net-dpdk-uio` (opt-in): the baseline without a vIOMMU, ports bound to uio_pci_generic,
/// testpmd with IOVA as PA.
fn uio_case() -> Case {
    let name = "net-dpdk-uio";
    let (file, err) = dpdk_payload(name, true);
    let mut script = dpdk::testpmd_script(Binding::Uio, &["pa"], FWD_SECS);
    script.push_str(KERNEL_ERRORS_SH);
    let scenario = Scenario::vmm(name, script)
        .args(dpdk::vmm_args(2, 1024, false))
        .l2_file(file)
        .timeout(Duration::from_secs(400));
    Case::opt_in(scenario, move |o| {
        if let Some(e) = &err {
            return Err(e.clone());
        }
        clean_exit(o)?;
        let r = dpdk::pmd_run(&o.serial, 1, "pa")?;
        println!(
            "    {name}: port0 rx={} tx={}, port1 rx={} tx={} in {:.1} s ({:.0} pkt/s per \
             direction)",
            r.ports[0].0,
            r.ports[0].2,
            r.ports[1].0,
            r.ports[1].2,
            r.secs,
            r.pps()
        );
        kernel_log_clean(o)
    })
}

/// The virtio-net scenarios.
pub fn cases() -> Vec<Case> {
    vec![
        linux_case("net-hub-strict", true),
        linux_case("net-hub-lazy", false),
        dpdk_case(Program::Vmm, "net-dpdk-testpmd", &["va", "va", "pa"], false),
        // Many testpmd start/stop cycles in one boot, under our vmm and under QEMU (a guest
        // failure under both is not the vmm's).
        dpdk_case(Program::Vmm, "net-dpdk-soak", SOAK, true),
        dpdk_case(Program::Qemu, "qemu-net-dpdk-soak", SOAK, true),
        uio_case(),
    ]
}
