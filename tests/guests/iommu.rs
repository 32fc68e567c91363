//! Real-guest scenarios with a disk behind our virtio-iommu (`--viommu virtio`,
//! `--disk ...,iommu=on`): strict and lazy invalidation, identity domains through
//! BYPASS_CONFIG (`iommu.passthrough=1`), and an unbind/rebind of the disk's driver. Each one
//! checks the guest side (driver bound, disk in an IOMMU group of the expected domain type,
//! clean kernel log), the data (the core boot test's pattern round trip, verified in the image
//! file on the host) and the VMM side (the `viommu:` counters line at exit).

use std::path::PathBuf;
use std::time::Duration;

use rig::{Outcome, Program, Scenario};

use crate::boot::{disk_script, make_disk, md5_hex, pattern, yes_pattern, DISK_SIZE, MIB};
use crate::common::{
    clean_exit, counter, counters, disk_group_check, kernel_log_clean, nonce, scratch_dir, section,
    value, Case,
};

/// Where the disk sits in L2: the virtio-iommu takes the first free slot (00:01.0).
const DISK_BDF: &str = "0000:00:02.0";

/// What a scenario does to the guest's IOMMU setup.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// `iommu.strict=1`: every unmap is synced (domain type "DMA").
    Strict,
    /// The default lazy invalidation (flush queue, domain type "DMA-FQ").
    Lazy,
    /// `iommu.passthrough=1`: identity domain through BYPASS_CONFIG, no MAP at all.
    Passthrough,
    /// Lazy, plus an unbind and rebind of the disk's virtio-pci driver before the round trip.
    Rebind,
}

impl Mode {
    fn cmdline(self) -> &'static str {
        match self {
            Mode::Strict => "iommu.strict=1",
            Mode::Lazy | Mode::Rebind => "",
            Mode::Passthrough => "iommu.passthrough=1",
        }
    }

    /// `/sys/kernel/iommu_groups/N/type` of the disk's group.
    fn domain_type(self) -> &'static str {
        match self {
            Mode::Strict => "DMA",
            Mode::Lazy | Mode::Rebind => "DMA-FQ",
            Mode::Passthrough => "identity",
        }
    }
}

/// Guest script prefix: the IOMMU's kernel log, the disk's BDF, group and domain type.
const IOMMU_INFO_SH: &str = r#"#!/bin/sh
echo IOMMU-DMESG-BEGIN
dmesg | grep -iE 'iommu' || true
echo IOMMU-DMESG-END
bdf=$(basename "$(dirname "$(readlink -f /sys/block/vda/device)")")
echo "VDA-BDF $bdf"
grp=none
for g in /sys/kernel/iommu_groups/*/devices/"$bdf"; do
    [ -e "$g" ] && grp=$(echo "$g" | cut -d/ -f5)
done
echo "VDA-GROUP $grp"
echo "VDA-DOMAIN $(cat "/sys/kernel/iommu_groups/$grp/type" 2>/dev/null || echo none)"
"#;

/// Guest script fragment: read through the first binding, unbind the disk's driver, bind it
/// again and wait for /dev/vda to come back.
const REBIND_SH: &str = r#"
echo "BEFORE-MD5 $(dd if=/dev/vda bs=65536 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "$bdf" >/sys/bus/pci/drivers/virtio-pci/unbind || { echo "unbind failed"; exit 21; }
i=0
while [ -b /dev/vda ] && [ $i -lt 30 ]; do sleep 1; i=$((i + 1)); done
[ -b /dev/vda ] && { echo "/dev/vda still present after unbind"; exit 22; }
echo "UNBOUND $bdf"
echo "$bdf" >/sys/bus/pci/drivers/virtio-pci/bind || { echo "bind failed"; exit 23; }
i=0
while [ ! -b /dev/vda ] && [ $i -lt 30 ]; do sleep 1; i=$((i + 1)); done
echo "REBOUND $(basename "$(readlink "/sys/bus/pci/devices/$bdf/driver")")"
"#;

/// The guest bound the virtio-iommu driver and put the disk in a group of the expected type.
fn guest_iommu_check(o: &Outcome, mode: Mode) -> Result<(), String> {
    let log = section(&o.serial, "IOMMU-DMESG-BEGIN", "IOMMU-DMESG-END")
        .ok_or("the IOMMU kernel log section is missing")?;
    for want in ["input address:", "page mask:"] {
        if !log
            .iter()
            .any(|l| l.contains("virtio_iommu") && l.contains(want))
        {
            return Err(format!(
                "no 'virtio_iommu ... {want}' line in the guest log"
            ));
        }
    }
    disk_group_check(o, mode.domain_type(), Some(DISK_BDF))
}

/// The VMM served what the mode implies, with no error status and no translation fault.
fn vmm_counters_check(o: &Outcome, mode: Mode) -> Result<(), String> {
    let c = counters(o)?;
    let (maps, unmaps) = (counter(&c, "maps")?, counter(&c, "unmaps")?);
    if counter(&c, "attaches")? == 0 {
        return Err("no ATTACH request".into());
    }
    for bad in ["errors", "faults", "malformed"] {
        let n = counter(&c, bad)?;
        if n != 0 {
            return Err(format!("{bad}={n} in the counters line"));
        }
    }
    match mode {
        Mode::Passthrough if maps != 0 || unmaps != 0 => Err(format!(
            "identity domain but maps={maps} unmaps={unmaps} (want none: BYPASS_CONFIG)"
        )),
        Mode::Passthrough => Ok(()),
        _ if maps == 0 || unmaps == 0 => Err(format!("maps={maps} unmaps={unmaps}, want both > 0")),
        _ => Ok(()),
    }
}

/// The core boot test's round trip: the guest read the host's first MiB, wrote its token
/// pattern to the second MiB and read it back, and the image file holds exactly that.
pub(crate) fn round_trip_check(
    o: &Outcome,
    image: &PathBuf,
    first_md5: &str,
    token: &str,
) -> Result<(), String> {
    let sectors = value(&o.serial, "DISK-SECTORS").ok_or("no DISK-SECTORS line")?;
    if sectors != (DISK_SIZE / 512).to_string() {
        return Err(format!("guest sees {sectors} sectors"));
    }
    let got = value(&o.serial, "DISK-MD5").ok_or("no DISK-MD5 line")?;
    if got != first_md5 {
        return Err(format!(
            "guest read first MiB md5 {got}, host wrote {first_md5}"
        ));
    }
    let written = yes_pattern(token, MIB);
    let got2 = value(&o.serial, "DISK2-MD5").ok_or("no DISK2-MD5 line")?;
    if got2 != md5_hex(&written) {
        return Err(format!("guest re-read its second MiB as md5 {got2}"));
    }
    let data = std::fs::read(image).map_err(|e| format!("reading {}: {e}", image.display()))?;
    if data.len() != DISK_SIZE {
        return Err(format!("image size changed to {}", data.len()));
    }
    if md5_hex(&data[..MIB]) != first_md5 {
        return Err("first MiB of the image changed".into());
    }
    if data[MIB..2 * MIB] != written[..] {
        return Err("second MiB of the image differs from the guest's pattern".into());
    }
    if let Some(off) = data[2 * MIB..].iter().position(|&b| b != 0) {
        return Err(format!("stray write at {:#x}", 2 * MIB + off));
    }
    Ok(())
}

fn case(name: &str, mode: Mode) -> Case {
    case_with(name, mode, "virtio")
}

/// A scenario with `--viommu VIOMMU` (e.g. `virtio,bypass=0`).
fn case_with(name: &str, mode: Mode, viommu: &str) -> Case {
    let n = nonce();
    let seed = u64::from_str_radix(&n[..n.len().min(15)], 16).unwrap_or(0x10bb);
    let first = pattern(seed ^ 0x1077_u64, MIB);
    let image = scratch_dir().join(format!("{name}.img"));
    make_disk(&image, &first);
    let token = format!("iommu-{n}");
    let mut script = IOMMU_INFO_SH.to_string();
    if mode == Mode::Rebind {
        script.push_str(REBIND_SH);
    }
    script.push_str(&disk_script(&token));
    let mut args = Scenario::default_args(Program::Vmm, 1, 0, 0);
    args.extend(["--viommu", viommu, "--disk", "path={disk0},iommu=on"].map(String::from));
    let scenario = Scenario::vmm(name, script)
        .disk(&image)
        .args(args)
        .cmdline_extra(mode.cmdline())
        .timeout(Duration::from_secs(300));
    let first_md5 = md5_hex(&first);
    Case::new(scenario, move |o| {
        clean_exit(o)?;
        guest_iommu_check(o, mode)?;
        if mode == Mode::Rebind {
            let before = value(&o.serial, "BEFORE-MD5").ok_or("no BEFORE-MD5 line")?;
            if before != first_md5 {
                return Err(format!(
                    "read before unbind: md5 {before}, want {first_md5}"
                ));
            }
            match value(&o.serial, "REBOUND") {
                Some("virtio-pci") => {}
                other => return Err(format!("after rebind the driver is {other:?}")),
            }
        }
        round_trip_check(o, &image, &first_md5, &token)?;
        kernel_log_clean(o)?;
        vmm_counters_check(o, mode)
    })
}

/// 4 KiB O_DIRECT reads per benchmark run.
const BENCH_4K_READS: u32 = 3000;
/// 1 MiB O_DIRECT reads per benchmark run (the 64 MiB disk, twice).
const BENCH_1M_READS: u32 = 128;

/// Guest script of a benchmark run: busybox `dd iflag=direct`, timed with /proc/uptime (10 ms
/// resolution; each phase takes seconds). With `with_1m` false only the 4 KiB phase runs (its
/// MAP/UNMAP counts, separated from the 1 MiB phase's).
fn bench_script(with_1m: bool) -> String {
    let mut s = format!(
        "#!/bin/sh\nset -e\n[ -b /dev/vda ] || {{ echo 'no /dev/vda'; exit 10; }}\n\
         up() {{ cut -d' ' -f1 /proc/uptime; }}\n\
         t0=$(up)\n\
         dd if=/dev/vda of=/dev/null bs=4096 count={BENCH_4K_READS} iflag=direct 2>/dev/null\n\
         t1=$(up)\n\
         echo \"BENCH-4K $t0 $t1\"\n"
    );
    if with_1m {
        s.push_str(
            "dd if=/dev/vda of=/dev/null bs=1M count=64 iflag=direct 2>/dev/null\n\
             dd if=/dev/vda of=/dev/null bs=1M count=64 iflag=direct 2>/dev/null\n\
             t2=$(up)\n\
             echo \"BENCH-1M $t1 $t2\"\n",
        );
    }
    s.push_str("exit 0\n");
    s
}

/// Seconds between the two uptime stamps on the `key` line.
fn bench_secs(o: &Outcome, key: &str) -> Result<f64, String> {
    let v = value(&o.serial, key).ok_or(format!("no {key} line"))?;
    let t: Vec<f64> = v
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    match t[..] {
        [a, b] if b > a => Ok(b - a),
        _ => Err(format!("bad {key} line {v:?}")),
    }
}

/// One benchmark run (`mode` None: no vIOMMU; `opts`: `--viommu` value and extra disk options).
/// The check prints a `BENCH` line: 4 KiB read IOPS, 1 MiB read MB/s, and the MAP/UNMAP
/// requests the device served in the whole run (boot included: 4 MAPs and 3 UNMAPs).
fn bench_case(name: String, mode: Option<Mode>, opts: (&str, &str), with_1m: bool) -> Case {
    let (viommu, disk_opts) = opts;
    let image = scratch_dir().join(format!("{name}.img"));
    make_disk(&image, &pattern(0xbe4c, MIB));
    let mut args = Scenario::default_args(Program::Vmm, 1, 0, 0);
    let disk = match mode {
        Some(_) => {
            args.extend(["--viommu".to_string(), viommu.to_string()]);
            "path={disk0},iommu=on"
        }
        None => "path={disk0}",
    };
    args.extend(["--disk".to_string(), format!("{disk}{disk_opts}")]);
    let scenario = Scenario::vmm(name.clone(), bench_script(with_1m))
        .disk(&image)
        .args(args)
        .cmdline_extra(mode.map(Mode::cmdline).unwrap_or(""))
        .timeout(Duration::from_secs(600));
    Case::opt_in(scenario, move |o| {
        clean_exit(o)?;
        let (maps, unmaps) = match mode {
            Some(_) => {
                let c = counters(o)?;
                (counter(&c, "maps")?, counter(&c, "unmaps")?)
            }
            None => (0, 0),
        };
        let t4k = bench_secs(o, "BENCH-4K")?;
        if !with_1m {
            println!(
                "BENCH {name} 4k_iops={:.0} maps={maps} unmaps={unmaps} \
                 ({BENCH_4K_READS} 4k reads only, in {t4k:.2} s)",
                f64::from(BENCH_4K_READS) / t4k
            );
            return Ok(());
        }
        let t1m = bench_secs(o, "BENCH-1M")?;
        println!(
            "BENCH {name} 4k_iops={:.0} 1m_mbps={:.1} maps={maps} unmaps={unmaps} \
             (4k {BENCH_4K_READS} reads in {t4k:.2} s, 1M {BENCH_1M_READS} reads in {t1m:.2} s)",
            f64::from(BENCH_4K_READS) / t4k,
            f64::from(BENCH_1M_READS) * 1.048_576 / t1m,
        );
        Ok(())
    })
}

/// `blkbench-*` (opt-in; run with `cargo test --test guests -- blkbench`, the name keeps them out
/// of `-- iommu`): no vIOMMU, lazy and strict (the defaults: kicks, no indirect
/// descriptors behind the IOMMU), lazy with indirect descriptors and lazy with the request
/// queue polled, interleaved three times in one L1 boot, plus a 4 KiB-only run per
/// invalidation mode that separates the two phases' MAP/UNMAP counts.
pub fn bench_cases() -> Vec<Case> {
    let modes = [
        ("off", None, "", ""),
        ("lazy", Some(Mode::Lazy), "virtio", ""),
        ("strict", Some(Mode::Strict), "virtio", ""),
        ("lazy-indirect", Some(Mode::Lazy), "virtio", ",indirect=on"),
        ("lazy-poll", Some(Mode::Lazy), "virtio,poll=1000", ""),
    ];
    let mut v = Vec::new();
    for (label, mode, viommu, disk) in &modes[1..3] {
        let name = format!("blkbench-{label}-4konly");
        v.push(bench_case(name, *mode, (viommu, disk), false));
    }
    for rep in 1..=3 {
        for (label, mode, viommu, disk) in modes {
            let name = format!("blkbench-{label}-{rep}");
            v.push(bench_case(name, mode, (viommu, disk), true));
        }
    }
    v
}

/// `iommu-strict`, `iommu-lazy`, `iommu-passthrough`, `iommu-rebind`, `iommu-nobypass`, and
/// the opt-in `blkbench-*` runs.
pub fn cases() -> Vec<Case> {
    let mut v = vec![
        case("iommu-strict", Mode::Strict),
        case("iommu-lazy", Mode::Lazy),
        case("iommu-passthrough", Mode::Passthrough),
        case("iommu-rebind", Mode::Rebind),
        // No boot bypass: the disk cannot DMA before Linux attaches it to a domain.
        case_with("iommu-nobypass", Mode::Lazy, "virtio,bypass=0"),
    ];
    v.extend(bench_cases());
    v
}
