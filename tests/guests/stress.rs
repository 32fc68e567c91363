//! `stress-rebind-strict`: two disks behind our virtio-iommu, each in its own IOMMU group (its
//! own default domain), `iommu.strict=1`, 2 vCPUs. Phase 1: a background loop unbinds and
//! rebinds disk B's driver (and reads B back after every rebind) while the foreground reads,
//! writes and re-reads disk A with O_DIRECT; phase 2 the reverse. Every read is checked against
//! the md5 of what the host wrote or what the guest just wrote; after exit the host checks the
//! last write of each phase in the image files. The VMM must exit 0 with no fault, error status
//! or malformed request in its counters, and the guest's kernel log must stay clean.
//!
//! Disk B is served by a worker thread (`notify=thread`): each rebind re-activates it, so a
//! vCPU thread starts a new worker that stacks its own seccomp filter (the VMM runs with its
//! default `--seccomp on`).
//!
//! Opt-in (run it by name: `make test-guests FILTER=stress`) until issue 16's soak explains why
//! it fails here: in this session's clean-clone and by-name runs (nested L1 under QEMU TCG,
//! 2 vCPUs in L2) it failed 4 times of 6 with three different symptoms: a 420 s hang in phase 2
//! with L1's QEMU at 100% CPU; L1's kernel panicking ("corrupted stack end detected inside
//! scheduler") in the vmm's vcpu0 thread; L2's RCU stalling on CPU 1, then L1 powering off.
//! Two of the failures were with a device-layer change that did not land, two without it.
//! A scenario that takes L1 down also takes every later scenario's result with it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rig::{Outcome, Program, Scenario};

use crate::boot::{make_disk, md5_hex, pattern, yes_pattern, DISK_SIZE, MIB};
use crate::common::{
    clean_exit, counter, counters, kernel_log_clean, nonce, scratch_dir, value, viommu_line, Case,
    KERNEL_ERRORS_SH,
};

/// Disk A and B in L2 (the virtio-iommu takes 00:01.0).
const BDF_A: &str = "0000:00:02.0";
const BDF_B: &str = "0000:00:03.0";
/// Unbind/rebind cycles per phase.
const REBINDS: u32 = 16;

/// The guest script: `md5a`/`md5b` are the md5s of the first MiB the host wrote, `tok_a`/`tok_b`
/// the tokens of the guest's writes (suffixed with the iteration number).
fn script(md5a: &str, md5b: &str, tok_a: &str, tok_b: &str) -> String {
    format!(
        r#"#!/bin/sh
A={BDF_A}
B={BDF_B}
N={REBINDS}
drv=/sys/bus/pci/drivers/virtio-pci
dev_of() {{
    for d in /sys/bus/pci/devices/$1/virtio*/block/*; do
        [ -e "$d" ] && {{ basename "$d"; return; }}
    done
    echo none
}}
md5_first() {{ dd if=/dev/$1 bs=65536 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1; }}
for x in A B; do
    eval bdf=\$$x
    g=$(basename "$(readlink /sys/bus/pci/devices/$bdf/iommu_group 2>/dev/null)")
    echo "STRESS-$x-DEV $(dev_of $bdf)"
    echo "STRESS-$x-GROUP $g"
    echo "STRESS-$x-DOMAIN $(cat /sys/kernel/iommu_groups/$g/type 2>/dev/null || echo none)"
done
# Unbind and rebind $1's driver N times; after each rebind its first MiB must read as $2.
rebind_loop() {{
    i=0
    while [ $i -lt $N ]; do
        echo $1 >$drv/unbind || {{ echo "STRESS-ERR unbind $1"; return 1; }}
        t=0
        while [ "$(dev_of $1)" != none ] && [ $t -lt 300 ]; do sleep 0.1; t=$((t + 1)); done
        [ "$(dev_of $1)" = none ] || {{ echo "STRESS-ERR $1 still has a disk"; return 1; }}
        echo $1 >$drv/bind || {{ echo "STRESS-ERR bind $1"; return 1; }}
        t=0
        d=none
        while [ $t -lt 300 ]; do
            d=$(dev_of $1)
            [ "$d" != none ] && [ -b /dev/$d ] && break
            sleep 0.1
            t=$((t + 1))
        done
        [ -b /dev/$d ] || {{ echo "STRESS-ERR $1 did not come back"; return 1; }}
        m=$(md5_first $d)
        [ "$m" = "$2" ] || {{ echo "STRESS-ERR $1 read $m after rebind $i"; return 1; }}
        i=$((i + 1))
    done
    echo "STRESS-REBINDS $1 $i"
}}
# While process $4 lives (at least once): read $1's first MiB (must be $2), write "$3-n"
# lines to its second MiB, read them back.
io_loop() {{
    n=0
    bad=0
    while :; do
        d=$(dev_of $1)
        m=$(md5_first $d)
        [ "$m" = "$2" ] || {{ bad=$((bad + 1)); echo "STRESS-BAD $1 read $m"; }}
        yes "$3-$n" | head -c 1048576 | dd of=/dev/$d bs=65536 seek=16 iflag=fullblock conv=fsync 2>/dev/null \
            || {{ bad=$((bad + 1)); echo "STRESS-BAD $1 write $n"; }}
        w=$(dd if=/dev/$d bs=65536 skip=16 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
        e=$(yes "$3-$n" | head -c 1048576 | md5sum | cut -d' ' -f1)
        [ "$w" = "$e" ] || {{ bad=$((bad + 1)); echo "STRESS-BAD $1 readback $w"; }}
        n=$((n + 1))
        kill -0 $4 2>/dev/null || break
    done
    echo "STRESS-IO-$5 $n $bad $3-$((n - 1))"
}}
t0=$(cut -d' ' -f1 /proc/uptime)
rebind_loop $B {md5b} &
p=$!
io_loop $A {md5a} {tok_a} $p 1
wait $p
echo "STRESS-PHASE1 $?"
rebind_loop $A {md5a} &
p=$!
io_loop $B {md5b} {tok_b} $p 2
wait $p
echo "STRESS-PHASE2 $?"
echo "STRESS-SECONDS $t0 $(cut -d' ' -f1 /proc/uptime)"
{KERNEL_ERRORS_SH}
exit 0
"#
    )
}

/// `STRESS-IO-<phase> iterations bad last_token` -> (iterations, bad, last token).
fn io_line(o: &Outcome, phase: u32) -> Result<(u64, u64, String), String> {
    let key = format!("STRESS-IO-{phase}");
    let v = value(&o.serial, &key).ok_or(format!("no {key} line"))?;
    let f: Vec<&str> = v.split_whitespace().collect();
    match f[..] {
        [n, bad, last] => Ok((
            n.parse().map_err(|_| format!("bad {key} line {v:?}"))?,
            bad.parse().map_err(|_| format!("bad {key} line {v:?}"))?,
            last.to_string(),
        )),
        _ => Err(format!("bad {key} line {v:?}")),
    }
}

/// The image holds the host's first MiB, the guest's last write in the second, zeros after.
fn image_check(image: &Path, first_md5: &str, last_token: &str) -> Result<(), String> {
    let data = std::fs::read(image).map_err(|e| format!("reading {}: {e}", image.display()))?;
    if data.len() != DISK_SIZE {
        return Err(format!(
            "{}: size changed to {}",
            image.display(),
            data.len()
        ));
    }
    if md5_hex(&data[..MIB]) != first_md5 {
        return Err(format!("{}: first MiB changed", image.display()));
    }
    if data[MIB..2 * MIB] != yes_pattern(last_token, MIB)[..] {
        return Err(format!(
            "{}: second MiB is not the guest's last write ({last_token})",
            image.display()
        ));
    }
    if let Some(off) = data[2 * MIB..].iter().position(|&b| b != 0) {
        return Err(format!(
            "{}: stray write at {:#x}",
            image.display(),
            2 * MIB + off
        ));
    }
    Ok(())
}

fn counters_check(o: &Outcome) -> Result<String, String> {
    let c = counters(o)?;
    let get = |name: &str| counter(&c, name);
    for bad in ["errors", "faults", "malformed"] {
        let n = get(bad)?;
        if n != 0 {
            return Err(format!("{bad}={n} in {:?}", viommu_line(o)));
        }
    }
    let (maps, unmaps, attaches) = (get("maps")?, get("unmaps")?, get("attaches")?);
    if attaches < 2 || maps == 0 || unmaps == 0 {
        return Err(format!(
            "attaches={attaches} maps={maps} unmaps={unmaps}: want both disks attached, \
             maps and unmaps served"
        ));
    }
    Ok(format!("maps={maps} unmaps={unmaps} attaches={attaches}"))
}

fn stress_case(name: &str) -> Case {
    let n = nonce();
    let seed = u64::from_str_radix(&n[..n.len().min(15)], 16).unwrap_or(0x57e5);
    let (first_a, first_b) = (pattern(seed ^ 0xa, MIB), pattern(seed ^ 0xb, MIB));
    let (md5a, md5b) = (md5_hex(&first_a), md5_hex(&first_b));
    let image_a: PathBuf = scratch_dir().join(format!("{name}-a.img"));
    let image_b: PathBuf = scratch_dir().join(format!("{name}-b.img"));
    make_disk(&image_a, &first_a);
    make_disk(&image_b, &first_b);
    let (tok_a, tok_b) = (format!("sa{n}"), format!("sb{n}"));
    let mut args = Scenario::default_args(Program::Vmm, 2, 0, 0);
    args.extend(
        [
            "--viommu",
            "virtio",
            "--disk",
            "path={disk0},iommu=on",
            "--disk",
            "path={disk1},iommu=on,notify=thread",
        ]
        .map(String::from),
    );
    let scenario = Scenario::vmm(name, script(&md5a, &md5b, &tok_a, &tok_b))
        .disk(&image_a)
        .disk(&image_b)
        .cpus(2)
        .args(args)
        .cmdline_extra("iommu.strict=1")
        .timeout(Duration::from_secs(420));
    let name = name.to_string();
    Case::opt_in(scenario, move |o| {
        clean_exit(o)?;
        let mut groups = Vec::new();
        for x in ["A", "B"] {
            let g = value(&o.serial, &format!("STRESS-{x}-GROUP"))
                .filter(|g| !g.is_empty())
                .ok_or(format!("disk {x} is in no IOMMU group"))?;
            let ty = value(&o.serial, &format!("STRESS-{x}-DOMAIN")).unwrap_or("none");
            if ty != "DMA" {
                return Err(format!("disk {x}: domain type {ty}, want DMA (strict)"));
            }
            groups.push(g.to_string());
        }
        if groups[0] == groups[1] {
            return Err(format!(
                "both disks in group {}: want two domains",
                groups[0]
            ));
        }
        if let Some(l) = o.serial.lines().find(|l| l.contains("STRESS-ERR")) {
            return Err(format!("rebind loop failed: {l}"));
        }
        for (phase, bdf) in [(1, BDF_B), (2, BDF_A)] {
            match value(&o.serial, &format!("STRESS-PHASE{phase}")) {
                Some("0") => {}
                other => return Err(format!("phase {phase} rebind loop status {other:?}")),
            }
            let want = format!("{bdf} {REBINDS}");
            if !o
                .serial
                .lines()
                .any(|l| l.trim().strip_prefix("STRESS-REBINDS ") == Some(want.as_str()))
            {
                return Err(format!("phase {phase}: no 'STRESS-REBINDS {want}' line"));
            }
        }
        let (n1, bad1, last_a) = io_line(o, 1)?;
        let (n2, bad2, last_b) = io_line(o, 2)?;
        if bad1 != 0 || bad2 != 0 || n1 == 0 || n2 == 0 {
            return Err(format!(
                "I/O loops: disk A {n1} iterations {bad1} bad, disk B {n2} iterations {bad2} bad"
            ));
        }
        if !last_a.starts_with(&tok_a) || !last_b.starts_with(&tok_b) {
            return Err(format!("last tokens {last_a} {last_b}"));
        }
        image_check(&image_a, &md5a, &last_a)?;
        image_check(&image_b, &md5b, &last_b)?;
        kernel_log_clean(o)?;
        let c = counters_check(o)?;
        println!(
            "STRESS {name}: {REBINDS}+{REBINDS} rebinds, A {n1} and B {n2} read/write/verify \
             iterations of 1 MiB, {c}, guest time {}",
            value(&o.serial, "STRESS-SECONDS").unwrap_or("?")
        );
        Ok(())
    })
}

/// `stress-rebind-strict`.
pub fn cases() -> Vec<Case> {
    vec![stress_case("stress-rebind-strict")]
}
