//! VFIO scenarios for our vmm.
//!
//! Passthrough through the whole chain (`vfio-pt-*`): the L0 QEMU gives L1 a virtio-blk behind
//! an emulated Intel IOMMU, L1 binds it to vfio-pci, our vmm assigns it to L2 with
//! `--device path={vfio0}[,iommu=on]`; L2's own virtio-blk driver reads the pattern the host
//! wrote and writes its token pattern back, which the check finds in the image file on the
//! host. `iommu=on` behind L2's virtio-iommu in strict and lazy mode (guest MAPs shadowed into
//! the device's VFIO container), and `iommu=off` (the static full-RAM mapping). Each also times
//! a few O_DIRECT reads and writes and prints a `VFIO-FIGURES` line.
//!
//! VFIO inside L2 (`vfio-l2-dpdk`): L2 unbinds our emulated virtio-blk (behind our
//! virtio-iommu), binds it to vfio-pci and runs guest-vfio (DPDK-style userspace driver): the
//! VFIO error-semantics checks, 4 KiB and 2 MiB map/unmap rates, and a userspace virtio-blk read
//! of the sector the host wrote.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rig::{CpioFile, Outcome, Program, Scenario, STATIC_TARGET};

use crate::boot::{disk_script, make_disk, md5_hex, pattern, yes_pattern, DISK_SIZE, MIB};
use crate::common::{
    clean_exit, kernel_log_clean, nonce, scratch_dir, section, value, Case, KERNEL_ERRORS_SH,
};

/// Where guest-vfio sits in the L2 initramfs.
const GUEST_VFIO: &str = "/usr/bin/guest-vfio";
/// Sector the host fills for the in-guest userspace virtio-blk read.
const BLK_SECTOR: u64 = 5;
/// Mappings per in-guest map/unmap rate run.
const MAPS_4K: u64 = 1000;
const MAPS_2M: u64 = 64;
/// 2 MiB mappings when the device is itself assigned: L2's type1 maps a 2 MiB buffer that is
/// not one huge page as up to 512 IOMMU pages, each a MAP request and a host VFIO call.
const MAPS_2M_PASSTHROUGH: u64 = 16;
/// Timed O_DIRECT transfers in the passthrough scenarios.
const READS_4K: u32 = 400;
const READS_1M: u32 = 16;
const WRITES_1M: usize = 8;

/// How the passthrough device reaches L2.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pt {
    /// Behind L2's virtio-iommu, `iommu.strict=1`.
    Strict,
    /// Behind L2's virtio-iommu, lazy invalidation.
    Lazy,
    /// No vIOMMU: the static full-RAM mapping.
    Static,
}

/// The static guest-vfio binary, built when missing (unless `RIG_NO_BUILD=1`).
fn guest_vfio_binary() -> Result<Vec<u8>, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join(format!("target/{STATIC_TARGET}/release/guest-vfio"));
    let no_build = std::env::var("RIG_NO_BUILD").is_ok_and(|v| !v.is_empty() && v != "0");
    if !bin.is_file() && !no_build {
        eprintln!("guests: building the static guest-vfio");
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "build",
                "--release",
                "--target",
                STATIC_TARGET,
                "-p",
                "guest-vfio",
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .current_dir(root)
            .stdout(std::process::Stdio::from(std::io::stderr()))
            .status()
            .map_err(|e| format!("running cargo: {e}"))?;
        if !status.success() {
            return Err(format!("building guest-vfio failed: {status}"));
        }
    }
    std::fs::read(&bin).map_err(|e| {
        format!(
            "{}: {e} (make bench-guest-programs builds it)",
            bin.display()
        )
    })
}

/// The `name=value` words of the last stderr line starting with `prefix`.
fn kv_line(log: &str, prefix: &str) -> Result<Vec<(String, u64)>, String> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with(prefix))
        .ok_or_else(|| format!("no '{prefix}' line in the VMM's stderr"))?;
    line.trim()
        .trim_start_matches(prefix)
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| format!("unparseable line {line:?}"))
}

fn get(c: &[(String, u64)], name: &str) -> Result<u64, String> {
    c.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| format!("counter {name} missing"))
}

/// Seconds between the two /proc/uptime stamps on the `key` line.
fn secs(o: &Outcome, key: &str) -> Result<f64, String> {
    let v = value(&o.serial, key).ok_or(format!("no {key} line"))?;
    let t: Vec<f64> = v
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    match t[..] {
        [a, b] if b >= a => Ok((b - a).max(0.01)),
        _ => Err(format!("bad {key} line {v:?}")),
    }
}

/// The passthrough guest script: the boot test's round trip, then timed O_DIRECT reads and
/// 1 MiB writes of the token pattern at 2 MiB.. (checked in the image afterwards).
fn pt_script(token: &str) -> String {
    let round_trip = disk_script(token);
    let round_trip = round_trip
        .trim_end()
        .strip_suffix("exit 0")
        .unwrap_or(&round_trip);
    format!(
        "{round_trip}\n\
         up() {{ cut -d' ' -f1 /proc/uptime; }}\n\
         t0=$(up)\n\
         dd if=/dev/vda of=/dev/null bs=4096 count={READS_4K} iflag=direct 2>/dev/null\n\
         t1=$(up)\n\
         dd if=/dev/vda of=/dev/null bs=1M count={READS_1M} iflag=direct 2>/dev/null\n\
         t2=$(up)\n\
         yes \"{token}\" | head -c {w} | dd of=/dev/vda bs=1M seek=2 iflag=fullblock oflag=direct 2>/dev/null\n\
         t3=$(up)\n\
         echo \"PT-4K $t0 $t1\"\n\
         echo \"PT-1M $t1 $t2\"\n\
         echo \"PT-W1M $t2 $t3\"\n\
         exit 0\n",
        w = WRITES_1M * MIB
    )
}

/// The image holds the host's first MiB, the guest's token pattern in the second MiB and at
/// 2 MiB.. (the timed writes), zeros elsewhere; the guest read what the host wrote.
fn pt_data_check(o: &Outcome, image: &Path, first_md5: &str, token: &str) -> Result<(), String> {
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
    let one = yes_pattern(token, MIB);
    let got2 = value(&o.serial, "DISK2-MD5").ok_or("no DISK2-MD5 line")?;
    if got2 != md5_hex(&one) {
        return Err(format!("guest re-read its second MiB as md5 {got2}"));
    }
    let data = std::fs::read(image).map_err(|e| format!("reading {}: {e}", image.display()))?;
    if data.len() != DISK_SIZE {
        return Err(format!("image size changed to {}", data.len()));
    }
    if md5_hex(&data[..MIB]) != first_md5 {
        return Err("first MiB of the image changed".into());
    }
    if data[MIB..2 * MIB] != one[..] {
        return Err("second MiB of the image differs from the guest's pattern".into());
    }
    let end = 2 * MIB + WRITES_1M * MIB;
    if data[2 * MIB..end] != yes_pattern(token, WRITES_1M * MIB)[..] {
        return Err("the timed writes at 2 MiB.. are not in the image".into());
    }
    if let Some(off) = data[end..].iter().position(|&b| b != 0) {
        return Err(format!("stray write at {:#x}", end + off));
    }
    Ok(())
}

/// Guest and host side of an `iommu=on` run: the disk is in an IOMMU group, the vIOMMU served
/// MAP/UNMAP without error or fault, every guest MAP reached the VFIO container. Returns the
/// figures line.
fn pt_iommu_check(o: &Outcome) -> Result<String, String> {
    let group = value(&o.serial, "VDA-IOMMU-GROUP").ok_or("no VDA-IOMMU-GROUP line")?;
    if group == "none" {
        return Err("the assigned disk is in no IOMMU group in L2".into());
    }
    let c = kv_line(&o.vmm_log, "viommu: ")?;
    let v = kv_line(&o.vmm_log, "vfio: ")?;
    let (maps, unmaps) = (get(&c, "maps")?, get(&c, "unmaps")?);
    for bad in ["errors", "faults", "malformed"] {
        if get(&c, bad)? != 0 {
            return Err(format!("{bad}={} in the viommu line", get(&c, bad)?));
        }
    }
    if get(&v, "host_failures")? != 0 {
        return Err(format!(
            "{} host VFIO calls failed",
            get(&v, "host_failures")?
        ));
    }
    let (hm, hu) = (get(&v, "host_maps")?, get(&v, "host_unmaps")?);
    if maps == 0 || hm < maps {
        return Err(format!(
            "guest MAPs {maps} but host map calls {hm}: MAPs did not reach the container"
        ));
    }
    Ok(format!(
        "guest_maps={maps} guest_unmaps={unmaps} host_maps={hm} host_unmaps={hu} \
         host_maps_per_guest_map={:.3}",
        hm as f64 / maps as f64
    ))
}

fn pt_case(name: &str, mode: Pt) -> Case {
    let n = nonce();
    let seed = u64::from_str_radix(&n[..n.len().min(15)], 16).unwrap_or(0xf10);
    let first = pattern(seed ^ 0xf1f0, MIB);
    let image = scratch_dir().join(format!("{name}.img"));
    make_disk(&image, &first);
    let token = format!("vfio-{n}");
    let mut args = Scenario::default_args(Program::Vmm, 1, 0, 0);
    match mode {
        Pt::Strict | Pt::Lazy => args
            .extend(["--viommu", "virtio", "--device", "path={vfio0},iommu=on"].map(String::from)),
        Pt::Static => args.extend(["--device", "path={vfio0}"].map(String::from)),
    }
    let scenario = Scenario::vmm(name, pt_script(&token))
        .vfio_disk(&image)
        .args(args)
        .cmdline_extra(if mode == Pt::Strict {
            "iommu.strict=1"
        } else {
            ""
        })
        .timeout(Duration::from_secs(300));
    let first_md5 = md5_hex(&first);
    let name = name.to_string();
    Case::new(scenario, move |o| {
        clean_exit(o)?;
        pt_data_check(o, &image, &first_md5, &token)?;
        kernel_log_clean(o)?;
        let host = match mode {
            Pt::Strict | Pt::Lazy => pt_iommu_check(o)?,
            Pt::Static => {
                let group = value(&o.serial, "VDA-IOMMU-GROUP").unwrap_or("?");
                if group != "none" {
                    return Err(format!("no vIOMMU but the disk is in IOMMU group {group}"));
                }
                let v = kv_line(&o.vmm_log, "vfio: ")?;
                let (hm, hu) = (get(&v, "host_maps")?, get(&v, "host_unmaps")?);
                // 512 MiB of RAM is one region: one static host mapping, never undone.
                if hm != 1 || hu != 0 || get(&v, "host_failures")? != 0 {
                    return Err(format!(
                        "static mapping made {hm} maps and {hu} unmaps, want 1 and 0"
                    ));
                }
                format!("host_maps={hm} host_unmaps={hu}")
            }
        };
        let (t4k, t1m, tw) = (secs(o, "PT-4K")?, secs(o, "PT-1M")?, secs(o, "PT-W1M")?);
        println!(
            "VFIO-FIGURES {name} read_4k_iops={:.0} read_1m_mbps={:.1} write_1m_mbps={:.1} {host} \
             ({READS_4K} 4k reads in {t4k:.2} s, {READS_1M} 1M reads in {t1m:.2} s, \
             {WRITES_1M} 1M writes in {tw:.2} s)",
            f64::from(READS_4K) / t4k,
            f64::from(READS_1M) * 1.048_576 / t1m,
            WRITES_1M as f64 * 1.048_576 / tw,
        );
        Ok(())
    })
}

/// Sector `BLK_SECTOR`'s bytes: byte i = (13 i + 7) mod 256.
fn sector_bytes() -> Vec<u8> {
    (0..512u32).map(|i| ((i * 13 + 7) & 0xff) as u8).collect()
}

fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn l2_vfio_script(maps_2m: u64) -> String {
    format!(
        r#"#!/bin/sh
[ -b /dev/vda ] || {{ echo "no /dev/vda"; exit 10; }}
bdf=$(basename "$(dirname "$(readlink -f /sys/block/vda/device)")")
d=/sys/bus/pci/devices/$bdf
echo "L2VFIO-BDF $bdf"
echo "L2VFIO-GROUP $(basename "$(readlink "$d/iommu_group")")"
echo "L2VFIO-PARAM $(cat /sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts)"
echo vfio-pci >"$d/driver_override"
[ -e "$d/driver" ] && echo "$bdf" >"$d/driver/unbind"
echo "$bdf" >/sys/bus/pci/drivers_probe
echo "L2VFIO-DRIVER $(basename "$(readlink "$d/driver")")"
rc=0
echo ERRORS-BEGIN
{GUEST_VFIO} errors --device "$bdf" 2>&1 || rc=11
echo ERRORS-END
{GUEST_VFIO} maps --device "$bdf" --size 4096 --count {MAPS_4K} >/tmp/m4 2>/tmp/e4 || {{ rc=12; cat /tmp/e4; }}
sed 's/^/L2VFIO-4K /' /tmp/m4
{GUEST_VFIO} maps --device "$bdf" --size 2097152 --count {maps_2m} >/tmp/m2 2>/tmp/e2 || {{ rc=13; cat /tmp/e2; }}
sed 's/^/L2VFIO-2M /' /tmp/m2
{GUEST_VFIO} virtio-blk-read --device "$bdf" --sector {BLK_SECTOR} >/tmp/r 2>/tmp/er || {{ rc=14; cat /tmp/er; }}
sed 's/^/L2VFIO-READ /' /tmp/r
{KERNEL_ERRORS_SH}
exit $rc
"#
    )
}

/// `(maps_per_s, unmaps_per_s)` from a guest-vfio `maps` line.
fn rates(o: &Outcome, key: &str, size: u64, count: u64) -> Result<(f64, f64), String> {
    let v = value(&o.serial, key).ok_or(format!("no {key} line"))?;
    let kv: Vec<(&str, &str)> = v
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect();
    let f = |k: &str| -> Result<f64, String> {
        kv.iter()
            .find(|(n, _)| *n == k)
            .and_then(|(_, x)| x.parse().ok())
            .ok_or(format!("{key}: no {k} in {v:?}"))
    };
    if f("size")? as u64 != size || f("count")? as u64 != count {
        return Err(format!("{key}: unexpected size/count in {v:?}"));
    }
    Ok((f("maps_per_s")?, f("unmaps_per_s")?))
}

/// guest-vfio in L2 on our emulated disk (`passthrough` false) or on the L0 disk assigned to
/// L2 with `--device ...,iommu=on` (true: every guest MAP is shadowed into L1's VFIO container,
/// VFIO inside VFIO).
fn l2_vfio_case(name: &str, program: Vec<u8>, passthrough: bool) -> Case {
    let image = scratch_dir().join(format!("{name}.img"));
    let mut first = vec![0u8; MIB];
    let off = BLK_SECTOR as usize * 512;
    first[off..off + 512].copy_from_slice(&sector_bytes());
    make_disk(&image, &first);
    let mut args = Scenario::default_args(Program::Vmm, 1, 0, 0);
    let maps_2m = if passthrough {
        MAPS_2M_PASSTHROUGH
    } else {
        MAPS_2M
    };
    let mut scenario = Scenario::vmm(name, l2_vfio_script(maps_2m));
    if passthrough {
        // Info level: the vmm logs the host IOMMU's page sizes, which L2 must see.
        args.extend(
            [
                "--viommu",
                "virtio",
                "--device",
                "path={vfio0},iommu=on",
                "--log-level",
                "info",
            ]
            .map(String::from),
        );
        scenario = scenario.vfio_disk(&image);
    } else {
        args.extend(["--viommu", "virtio", "--disk", "path={disk0},iommu=on"].map(String::from));
        scenario = scenario.disk(&image);
    }
    let scenario = scenario
        .args(args)
        .l2_file(CpioFile::new(GUEST_VFIO, 0o755, program))
        .timeout(Duration::from_secs(300));
    let want = format!("fnv1a64={:#018x}", fnv1a64(&sector_bytes()));
    let name = name.to_string();
    Case::new(scenario, move |o| {
        clean_exit(o)?;
        if value(&o.serial, "L2VFIO-PARAM") != Some("Y") {
            return Err(format!(
                "vfio_iommu_type1 allow_unsafe_interrupts is {:?}, want Y",
                value(&o.serial, "L2VFIO-PARAM")
            ));
        }
        if value(&o.serial, "L2VFIO-DRIVER") != Some("vfio-pci") {
            return Err(format!(
                "the disk is bound to {:?}, want vfio-pci",
                value(&o.serial, "L2VFIO-DRIVER")
            ));
        }
        let errors = section(&o.serial, "ERRORS-BEGIN", "ERRORS-END")
            .ok_or("the guest-vfio errors section is missing")?;
        let checks: Vec<&&str> = errors.iter().filter(|l| l.starts_with("check ")).collect();
        let failed: Vec<&&str> = checks
            .iter()
            .copied()
            .filter(|l| !l.contains(": ok (") && !l.contains(": skip"))
            .collect();
        if checks.len() < 5 || !failed.is_empty() {
            return Err(format!(
                "guest-vfio errors: {} checks, failed: {failed:?}",
                checks.len()
            ));
        }
        let (m4, u4) = rates(o, "L2VFIO-4K", 4096, MAPS_4K)?;
        let (m2, u2) = rates(o, "L2VFIO-2M", 2 << 20, maps_2m)?;
        let read = value(&o.serial, "L2VFIO-READ").ok_or("no L2VFIO-READ line")?;
        if !read.contains(&format!("sector={BLK_SECTOR} status=ok")) || !read.contains(&want) {
            return Err(format!("userspace virtio-blk read {read:?}, want {want}"));
        }
        kernel_log_clean(o)?;
        let c = kv_line(&o.vmm_log, "viommu: ")?;
        let maps = get(&c, "maps")?;
        if maps < MAPS_4K + maps_2m {
            return Err(format!(
                "the vIOMMU served {maps} MAPs, fewer than guest-vfio made"
            ));
        }
        let host = if passthrough {
            host_geometry_check(o, &errors)?;
            let v = kv_line(&o.vmm_log, "vfio: ")?;
            let (hm, hu) = (get(&v, "host_maps")?, get(&v, "host_unmaps")?);
            if hm < maps {
                return Err(format!(
                    "{maps} guest MAPs but {hm} host map calls: MAPs did not reach L1's VFIO"
                ));
            }
            format!(
                " host_maps={hm} host_unmaps={hu} host_failures={} host_maps_per_guest_map={:.3}",
                get(&v, "host_failures")?,
                hm as f64 / maps as f64
            )
        } else {
            String::new()
        };
        println!(
            "VFIO-FIGURES {name} maps_4k_per_s={m4:.0} unmaps_4k_per_s={u4:.0} \
             maps_2m_per_s={m2:.0} unmaps_2m_per_s={u2:.0} viommu_maps={maps} \
             viommu_unmaps={} viommu_errors={}{host} ({} VFIO checks ok)",
            get(&c, "unmaps")?,
            get(&c, "errors")?,
            checks.len()
        );
        Ok(())
    })
}

/// The page sizes L2's VFIO reports (`check info: ok (pgsizes=0x..`, from our virtio-iommu's
/// page_size_mask) are the host IOMMU's (`host IOMMU page sizes 0x..` in the vmm's log) at 4 KiB
/// and above.
fn host_geometry_check(o: &Outcome, errors: &[&str]) -> Result<(), String> {
    let hex_after = |text: &str, key: &str| -> Option<u64> {
        let rest = &text[text.find(key)? + key.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
        u64::from_str_radix(&digits, 16).ok()
    };
    let host = o
        .vmm_log
        .lines()
        .find_map(|l| hex_after(l, "host IOMMU page sizes 0x"))
        .ok_or("no 'host IOMMU page sizes' line in the vmm's log")?;
    let guest = errors
        .iter()
        .find_map(|l| hex_after(l, "check info: ok (pgsizes=0x"))
        .ok_or("no 'check info' line from guest-vfio")?;
    if guest != host & !0xfff {
        return Err(format!(
            "L2 sees IOMMU page sizes {guest:#x}, the host IOMMU has {host:#x}"
        ));
    }
    Ok(())
}

/// A case that fails with `why` (the in-guest program is missing).
fn broken_case(name: &str, why: String) -> Case {
    Case::new(Scenario::vmm(name, "#!/bin/sh\nexit 0\n"), move |_| {
        Err(why.clone())
    })
}

/// `vfio-pt-strict`, `vfio-pt-lazy`, `vfio-pt-static`, `vfio-l2-dpdk` and `vfio-l2-nested`.
pub fn cases() -> Vec<Case> {
    let mut v = vec![
        pt_case("vfio-pt-strict", Pt::Strict),
        pt_case("vfio-pt-lazy", Pt::Lazy),
        pt_case("vfio-pt-static", Pt::Static),
    ];
    match guest_vfio_binary() {
        Ok(bin) => {
            v.push(l2_vfio_case("vfio-l2-dpdk", bin.clone(), false));
            v.push(l2_vfio_case("vfio-l2-nested", bin, true));
        }
        Err(e) => {
            v.push(broken_case("vfio-l2-dpdk", e.clone()));
            v.push(broken_case("vfio-l2-nested", e));
        }
    }
    v
}
