//! Real-guest scenarios behind our emulated Intel VT-d (`--viommu vtd`, `intel_iommu=on`):
//!
//! - `vtd-strict`: the disk behind the unit; Linux's intel-iommu driver comes up (`DMAR: ...
//!   Intel(R) Virtualization Technology for Directed I/O`, queued invalidation), the disk is in
//!   an IOMMU group of type DMA (caching mode makes Linux strict), reads the host's pattern and
//!   writes one the host finds in the image.
//! - `vtd-pt`: `iommu=pt`: pass-through context entries (identity group), no mapping at all.
//! - `vtd-rebind`: the disk's driver unbound and bound again three times, data intact each time.
//! - `vtd-net`: two virtio-net ports on one hub behind the unit exchange ARP through the hub.
//! - `vtd-fault`: the disk's driver unbound, the function driven by hand (/dev/mem) with rings
//!   at unmapped IOVAs: the device's DMA faults and Linux prints `DMAR: [DMA Read NO_PASID]
//!   Request device [00:01.0] fault addr ...`.
//! - `qemu-vtd-strict` (opt-in): the reference, QEMU's `intel-iommu,caching-mode=on` running
//!   the strict script.
//!
//! Each one checks the guest side, the data, and for our vmm the `vtd:` counters line at exit.

use std::time::Duration;

use rig::dpdk::{self, MAC_A, MAC_B};
use rig::{Outcome, Program, Scenario};

use crate::boot::{disk_script, make_disk, md5_hex, pattern, MIB};
use crate::common::{
    clean_exit, disk_group_check, kernel_log_clean, nonce, scratch_dir, section, value,
    vtd_counter as get, vtd_counters, vtd_counters_check, vtd_warnings, Case,
};
use crate::iommu::round_trip_check;
use crate::net::ARPING_SH;

/// Where the disk sits in L2 under our vmm: the first free slot (no IOMMU function with VT-d).
const DISK_BDF: &str = "0000:00:01.0";

/// Guest script prefix: the DMAR/IOMMU kernel log lines between markers.
const DMESG_SH: &str = r#"#!/bin/sh
echo VTD-DMESG-BEGIN
dmesg | grep -E 'DMAR|iommu|IOMMU' || true
echo VTD-DMESG-END
echo "DMAR-FAULTS $(dmesg | grep -c 'DMAR: \[DMA' || true)"
"#;

/// Guest script fragment: the disk's BDF, IOMMU group and its domain type.
const DISK_INFO_SH: &str = r#"
bdf=$(basename "$(dirname "$(readlink -f /sys/block/vda/device)")")
echo "VDA-BDF $bdf"
grp=none
for g in /sys/kernel/iommu_groups/*/devices/"$bdf"; do
    [ -e "$g" ] && grp=$(echo "$g" | cut -d/ -f5)
done
echo "VDA-GROUP $grp"
echo "VDA-DOMAIN $(cat "/sys/kernel/iommu_groups/$grp/type" 2>/dev/null || echo none)"
"#;

/// Guest script fragment: three unbind/bind cycles of the disk's driver, an O_DIRECT read of
/// the first MiB after each.
const REBIND3_SH: &str = r#"
for r in 1 2 3; do
    echo "$bdf" >/sys/bus/pci/drivers/virtio-pci/unbind || { echo "unbind $r failed"; exit 21; }
    i=0
    while [ -b /dev/vda ] && [ $i -lt 30 ]; do sleep 1; i=$((i + 1)); done
    [ -b /dev/vda ] && { echo "/dev/vda still present after unbind $r"; exit 22; }
    echo "$bdf" >/sys/bus/pci/drivers/virtio-pci/bind || { echo "bind $r failed"; exit 23; }
    i=0
    while [ ! -b /dev/vda ] && [ $i -lt 30 ]; do sleep 1; i=$((i + 1)); done
    drv=$(basename "$(readlink "/sys/bus/pci/devices/$bdf/driver")")
    sum=$(dd if=/dev/vda bs=65536 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    echo "REBIND-$r $drv $sum"
done
"#;

/// Guest script of `vtd-fault`: unbind the disk's driver (its DMA domain stays, now without a
/// mapping), then drive the virtio-pci function by hand through /dev/mem with rings at IOVAs
/// the guest never mapped: the device's DMA at DRIVER_OK must fault, and Linux's DMAR fault
/// handler must name the device and the address.
const FAULT_SH: &str = r#"
echo "$bdf" >/sys/bus/pci/drivers/virtio-pci/unbind || { echo "unbind failed"; exit 21; }
i=0
while [ -b /dev/vda ] && [ $i -lt 30 ]; do sleep 1; i=$((i + 1)); done
bar=$(head -n 1 "/sys/bus/pci/devices/$bdf/resource" | cut -d' ' -f1)
echo "BAR0 $bar"
# Memory decode and bus mastering (unbinding cleared the latter).
printf '\006\000' | dd of="/sys/bus/pci/devices/$bdf/config" bs=1 seek=4 count=2 conv=notrunc 2>/dev/null
w() { devmem "$(printf '0x%x' $((bar + $1)))" "$2" "$3"; }
r() { devmem "$(printf '0x%x' $((bar + $1)))" "$2"; }
w 0x14 8 0
w 0x14 8 1
w 0x14 8 3
w 0x08 32 1
w 0x0c 32 3
w 0x14 8 11
echo "FEATURES-STATUS $(r 0x14 8)"
w 0x16 16 0
w 0x20 32 0x100000
w 0x24 32 0
w 0x28 32 0x101000
w 0x2c 32 0
w 0x30 32 0x102000
w 0x34 32 0
w 0x1c 16 1
w 0x14 8 15
sleep 1
w 0x3000 16 0
sleep 2
echo "DEVICE-STATUS $(r 0x14 8)"
echo FAULT-DMESG-BEGIN
dmesg | grep -E 'DMAR' | grep -iE 'fault' || true
echo FAULT-DMESG-END
exit 0
"#;

/// What a scenario asks of the guest's IOMMU setup.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// `intel_iommu=on`: DMA domains (strict: caching mode disallows batching).
    Strict,
    /// `intel_iommu=on iommu=pt`: identity domains through pass-through context entries.
    PassThrough,
    /// Strict, with three unbind/rebind cycles before the round trip.
    Rebind,
}

impl Mode {
    fn cmdline(self) -> &'static str {
        match self {
            Mode::Strict | Mode::Rebind => "intel_iommu=on",
            Mode::PassThrough => "intel_iommu=on iommu=pt",
        }
    }

    fn domain_type(self) -> &'static str {
        match self {
            Mode::Strict | Mode::Rebind => "DMA",
            Mode::PassThrough => "identity",
        }
    }
}

/// The guest's intel-iommu driver came up on our unit (or QEMU's) with queued invalidation, and
/// logged no DMA fault. Prints the DMAR lines.
fn dmar_check(o: &Outcome) -> Result<(), String> {
    let log = section(&o.serial, "VTD-DMESG-BEGIN", "VTD-DMESG-END")
        .ok_or("the DMAR kernel log section is missing")?;
    for l in log.iter().filter(|l| l.contains("DMAR")) {
        println!("    {}: {}", o.name, l.trim());
    }
    for want in [
        "Intel(R) Virtualization Technology for Directed I/O",
        "Using Queued invalidation",
    ] {
        if !log.iter().any(|l| l.contains("DMAR") && l.contains(want)) {
            return Err(format!("no 'DMAR: ... {want}' line in the guest log"));
        }
    }
    match value(&o.serial, "DMAR-FAULTS") {
        Some("0") => Ok(()),
        other => Err(format!("DMAR fault lines in the guest log: {other:?}")),
    }
}

/// QEMU's arguments for the reference: its intel-iommu (caching mode, no interrupt remapping
/// with the in-kernel irqchip) created before the disk, the disk behind it.
fn qemu_vtd_args() -> Vec<String> {
    let mut a = Scenario::base_args(Program::Qemu, 1, 512, false);
    a.extend(
        [
            "-device",
            "intel-iommu,intremap=off,caching-mode=on",
            "-drive",
            "file={disk0},if=none,id=d0,format=raw",
            "-device",
            "virtio-blk-pci,drive=d0,iommu_platform=on,disable-legacy=on",
        ]
        .map(String::from),
    );
    a
}

fn disk_case(name: &str, mode: Mode, program: Program) -> Case {
    let n = nonce();
    let seed = u64::from_str_radix(&n[..n.len().min(15)], 16).unwrap_or(0x7d7d);
    let first = pattern(seed ^ 0x7d_u64, MIB);
    let image = scratch_dir().join(format!("{name}.img"));
    make_disk(&image, &first);
    let token = format!("vtd-{n}");
    let mut script = format!("{DMESG_SH}{DISK_INFO_SH}");
    if mode == Mode::Rebind {
        script.push_str(REBIND3_SH);
    }
    script.push_str(&disk_script(&token));
    let (scenario, args) = match program {
        Program::Vmm => {
            let mut args = Scenario::base_args(Program::Vmm, 1, 512, false);
            args.extend(["--viommu", "vtd", "--disk", "path={disk0},iommu=on"].map(String::from));
            (Scenario::vmm(name, script), args)
        }
        Program::Qemu => (Scenario::qemu(name, script), qemu_vtd_args()),
    };
    let scenario = scenario
        .disk(&image)
        .args(args)
        .cmdline_extra(mode.cmdline())
        .timeout(Duration::from_secs(300));
    let first_md5 = md5_hex(&first);
    let check = move |o: &Outcome| {
        clean_exit(o)?;
        dmar_check(o)?;
        let bdf = (program == Program::Vmm).then_some(DISK_BDF);
        disk_group_check(o, mode.domain_type(), bdf)?;
        if mode == Mode::Rebind {
            for r in 1..=3 {
                let key = format!("REBIND-{r}");
                let v = value(&o.serial, &key).ok_or(format!("no {key} line"))?;
                if v != format!("virtio-pci {first_md5}") {
                    return Err(format!("{key} {v:?}, want virtio-pci {first_md5}"));
                }
            }
        }
        round_trip_check(o, &image, &first_md5, &token)?;
        kernel_log_clean(o)?;
        if program == Program::Vmm {
            vtd_counters_check(o, mode != Mode::PassThrough)?;
        }
        Ok(())
    };
    match program {
        Program::Vmm => Case::new(scenario, check),
        Program::Qemu => Case::opt_in(scenario, check),
    }
}

/// `vtd-net`: the two hub ports behind the unit, ARP across the hub.
fn net_case() -> Case {
    let name = "vtd-net";
    let mut script = DMESG_SH.to_string();
    // ports_script() starts with its own #!/bin/sh line: harmless in the middle.
    script.push_str(&dpdk::ports_script());
    script.push_str(ARPING_SH);
    script.push_str(crate::common::KERNEL_ERRORS_SH);
    let mut args = Scenario::base_args(Program::Vmm, 1, 512, false);
    args.extend(["--viommu".to_string(), "vtd".to_string()]);
    for mac in [MAC_A, MAC_B] {
        args.extend(["--net".to_string(), format!("hub=0,iommu=on,mac={mac}")]);
    }
    let scenario = Scenario::vmm(name, script)
        .args(args)
        .cmdline_extra("intel_iommu=on")
        .timeout(Duration::from_secs(300));
    Case::new(scenario, move |o| {
        clean_exit(o)?;
        dmar_check(o)?;
        let domains: Vec<&str> = o
            .serial
            .lines()
            .filter_map(|l| l.trim().strip_prefix("NET-DOMAIN "))
            .collect();
        if domains.len() != 2 || domains.iter().any(|l| !l.ends_with(" DMA")) {
            return Err(format!("want 2 ports in DMA domains, got {domains:?}"));
        }
        let replies = o
            .serial
            .lines()
            .filter(|l| l.contains("reply from 10.0.0.2") && l.contains(MAC_B))
            .count();
        if replies < 3 {
            return Err(format!(
                "{replies} ARP replies from 10.0.0.2 [{MAC_B}] came back through the hub, want \
                 >= 3 (ARPING-RC {:?})",
                value(&o.serial, "ARPING-RC")
            ));
        }
        for k in ["ERR-A", "ERR-B"] {
            let v = value(&o.serial, k).ok_or(format!("no {k} line"))?;
            if v != "0 0" {
                return Err(format!("{k} {v}: errors counted"));
            }
        }
        kernel_log_clean(o)?;
        println!("    {name}: {replies} ARP replies from {MAC_B} through the hub");
        vtd_counters_check(o, true)
    })
}

/// `vtd-fault`: a DMA to IOVAs the guest never mapped is refused, recorded, and reported by
/// Linux with the device and the address.
fn fault_case() -> Case {
    let name = "vtd-fault";
    let image = scratch_dir().join(format!("{name}.img"));
    make_disk(&image, &pattern(0xfa17, MIB));
    let script = format!("{DMESG_SH}{DISK_INFO_SH}{FAULT_SH}");
    let mut args = Scenario::base_args(Program::Vmm, 1, 512, false);
    args.extend(["--viommu", "vtd", "--disk", "path={disk0},iommu=on"].map(String::from));
    let scenario = Scenario::vmm(name, script)
        .disk(&image)
        .args(args)
        .cmdline_extra("intel_iommu=on")
        .timeout(Duration::from_secs(300));
    Case::new(scenario, move |o| {
        clean_exit(o)?;
        disk_group_check(o, Mode::Strict.domain_type(), Some(DISK_BDF))?;
        match value(&o.serial, "FEATURES-STATUS") {
            Some("0x0B") | Some("0x0b") => {}
            other => return Err(format!("FEATURES_OK not accepted: status {other:?}")),
        }
        let log = section(&o.serial, "FAULT-DMESG-BEGIN", "FAULT-DMESG-END")
            .ok_or("the fault section is missing")?;
        for l in &log {
            println!("    {name}: {}", l.trim());
        }
        let want = "Request device [00:01.0] fault addr 0x10";
        if !log
            .iter()
            .any(|l| l.contains("[DMA Read NO_PASID]") && l.contains(want))
        {
            return Err(format!("no 'DMAR: [DMA Read NO_PASID] {want}...' line"));
        }
        for l in vtd_warnings(o) {
            println!("    {name}: vmm: {l}");
        }
        let c = vtd_counters(o)?;
        let (faults, errors) = (get(&c, "faults")?, get(&c, "errors")?);
        if faults == 0 || errors != 0 {
            return Err(format!(
                "faults={faults} errors={errors}, want faults > 0, no error"
            ));
        }
        Ok(())
    })
}

/// `vtd-strict`, `vtd-pt`, `vtd-rebind`, `vtd-net`, `vtd-fault` and the opt-in
/// `qemu-vtd-strict`.
pub fn cases() -> Vec<Case> {
    vec![
        fault_case(),
        disk_case("vtd-strict", Mode::Strict, Program::Vmm),
        disk_case("vtd-pt", Mode::PassThrough, Program::Vmm),
        disk_case("vtd-rebind", Mode::Rebind, Program::Vmm),
        net_case(),
        disk_case("qemu-vtd-strict", Mode::Strict, Program::Qemu),
    ]
}
