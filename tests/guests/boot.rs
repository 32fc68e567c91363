//! Core boot scenarios: L2 boots from our vmm with a virtio-blk disk, reads a pattern the host
//! wrote, writes one back that the host finds in the image file; and a 2-vCPU boot.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rig::{Outcome, Program, Scenario};

use crate::common::{
    clean_exit, kernel_log_clean, nonce, scratch_dir, value, Case, KERNEL_ERRORS_SH,
};

pub(crate) const MIB: usize = 1 << 20;
pub(crate) const DISK_SIZE: usize = 64 * MIB;

/// Deterministic pseudo-random bytes (xorshift64) from `seed`.
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What `yes LINE | head -c len` produces.
pub(crate) fn yes_pattern(line: &str, len: usize) -> Vec<u8> {
    let unit = format!("{line}\n").into_bytes();
    unit.iter().copied().cycle().take(len).collect()
}

pub(crate) fn md5_hex(data: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run md5sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A 64 MiB image whose first MiB is `first`, the rest zeros.
pub(crate) fn make_disk(path: &Path, first: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create disk image");
    f.write_all(first).unwrap();
    f.set_len(DISK_SIZE as u64).unwrap();
}

pub(crate) fn disk_script(token: &str) -> String {
    format!(
        r#"#!/bin/sh
set -e
[ -b /dev/vda ] || {{ echo "no /dev/vda"; exit 10; }}
echo "DISK-SECTORS $(cat /sys/block/vda/size)"
echo "DISK-MD5 $(dd if=/dev/vda bs=65536 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
yes "{token}" | head -c 1048576 | dd of=/dev/vda bs=65536 seek=16 iflag=fullblock conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
echo "DISK2-MD5 $(dd if=/dev/vda bs=65536 skip=16 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
vdapci=$(basename "$(dirname "$(readlink -f /sys/block/vda/device)")")
echo "VDA-PCI $vdapci"
if [ -e "/sys/bus/pci/devices/$vdapci/iommu_group" ]; then
    echo "VDA-IOMMU-GROUP $(basename "$(readlink "/sys/bus/pci/devices/$vdapci/iommu_group")")"
else
    echo "VDA-IOMMU-GROUP none"
fi
echo "VIOMMU-PROBED $(dmesg | grep -c 'virtio_iommu .*input address')"
{KERNEL_ERRORS_SH}
exit 0
"#
    )
}

/// The IOMMU checks: with `behind_iommu`, the disk's PCI function is in an IOMMU group and the
/// virtio-iommu driver probed; without, the disk has no group.
fn iommu_check(o: &Outcome, behind_iommu: bool) -> Result<(), String> {
    let pci = value(&o.serial, "VDA-PCI").ok_or("no VDA-PCI line")?;
    let group = value(&o.serial, "VDA-IOMMU-GROUP").ok_or("no VDA-IOMMU-GROUP line")?;
    let probed = value(&o.serial, "VIOMMU-PROBED").ok_or("no VIOMMU-PROBED line")?;
    if behind_iommu {
        if group == "none" {
            return Err(format!("disk {pci} is in no IOMMU group"));
        }
        if probed == "0" {
            return Err("virtio_iommu did not probe (no 'input address' line)".into());
        }
    } else if group != "none" {
        return Err(format!(
            "disk {pci} is in IOMMU group {group}, expected none"
        ));
    }
    Ok(())
}

fn disk_check(
    image: PathBuf,
    first_md5: String,
    token: String,
    behind_iommu: bool,
) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o| {
        clean_exit(o)?;
        iommu_check(o, behind_iommu)?;
        let sectors = value(&o.serial, "DISK-SECTORS").ok_or("no DISK-SECTORS line")?;
        if sectors != (DISK_SIZE / 512).to_string() {
            return Err(format!(
                "guest sees {sectors} sectors, want {}",
                DISK_SIZE / 512
            ));
        }
        let got = value(&o.serial, "DISK-MD5").ok_or("no DISK-MD5 line")?;
        if got != first_md5 {
            return Err(format!(
                "guest read first MiB md5 {got}, host wrote {first_md5}"
            ));
        }
        let written = yes_pattern(&token, MIB);
        let got2 = value(&o.serial, "DISK2-MD5").ok_or("no DISK2-MD5 line")?;
        if got2 != md5_hex(&written) {
            return Err(format!("guest re-read its second MiB as md5 {got2}"));
        }
        let data =
            std::fs::read(&image).map_err(|e| format!("reading {}: {e}", image.display()))?;
        if data.len() != DISK_SIZE {
            return Err(format!("image size changed to {}", data.len()));
        }
        if md5_hex(&data[..MIB]) != first_md5 {
            return Err("first MiB of the image changed".into());
        }
        if data[MIB..2 * MIB] != written[..] {
            let off = data[MIB..2 * MIB]
                .iter()
                .zip(&written)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(format!(
                "second MiB of the image differs from the guest's pattern at +{off:#x}"
            ));
        }
        if let Some(off) = data[2 * MIB..].iter().position(|&b| b != 0) {
            return Err(format!("stray write at {:#x}", 2 * MIB + off));
        }
        kernel_log_clean(o)
    }
}

/// How the scenario's disk reaches L2.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attach {
    /// The VMM's own virtio-blk, backed by the image (via L1's virtio-blk in nested mode).
    Emulated,
    /// The L0 QEMU's virtio-blk assigned through L1's VFIO to L2 (behind L2's virtio-iommu).
    Vfio,
}

/// One disk scenario: who runs L2, how the disk reaches it, whether it sits behind L2's
/// virtio-iommu, extra L2 command-line words.
struct DiskCase {
    name: &'static str,
    program: Program,
    attach: Attach,
    viommu: bool,
    cmdline_extra: &'static str,
}

impl DiskCase {
    fn build(self) -> Case {
        let n = nonce();
        let seed = u64::from_str_radix(&n[..n.len().min(15)], 16).unwrap_or(0x5eed);
        let first = pattern(seed, MIB);
        let image = scratch_dir().join(format!("{}.img", self.name));
        make_disk(&image, &first);
        let token = format!("rig-{n}");
        let script = disk_script(&token);
        let mut scenario = match self.program {
            Program::Vmm => Scenario::vmm(self.name, script),
            Program::Qemu => Scenario::qemu(self.name, script),
        }
        .timeout(Duration::from_secs(300))
        .cmdline_extra(self.cmdline_extra);
        scenario = match self.attach {
            Attach::Emulated => scenario.disk(&image),
            Attach::Vfio => scenario.vfio_disk(&image),
        };
        if self.program == Program::Vmm && self.viommu {
            let mut args = Scenario::default_args(Program::Vmm, 1, 0, 0);
            args.extend(
                ["--viommu", "virtio", "--disk", "path={disk0},iommu=on"].map(String::from),
            );
            scenario = scenario.args(args);
        }
        // QEMU's default arguments always put a virtio-iommu in front of the disks.
        let behind_iommu = self.viommu || self.program == Program::Qemu;
        let check = disk_check(image, md5_hex(&first), token, behind_iommu);
        match self.program {
            Program::Vmm => Case::new(scenario, check),
            Program::Qemu => Case::opt_in(scenario, check),
        }
    }
}

fn disk_case(name: &'static str, program: Program, attach: Attach) -> Case {
    DiskCase {
        name,
        program,
        attach,
        viommu: false,
        cmdline_extra: "",
    }
    .build()
}

/// `qemu-strict-disk`: the reference for the vIOMMU disk scenarios of `iommu.rs` (QEMU's
/// virtio-iommu, strict invalidation).
pub fn viommu_reference_cases() -> Vec<Case> {
    vec![DiskCase {
        name: "qemu-strict-disk",
        program: Program::Qemu,
        attach: Attach::Emulated,
        viommu: true,
        cmdline_extra: "iommu.strict=1",
    }
    .build()]
}

const CPUS_SCRIPT: &str = r#"#!/bin/sh
echo "CPUS-ONLINE $(cat /sys/devices/system/cpu/online)"
echo "NPROC $(nproc)"
exit 0
"#;

fn cpus_check(o: &Outcome) -> Result<(), String> {
    clean_exit(o)?;
    match value(&o.serial, "CPUS-ONLINE") {
        Some("0-1") => Ok(()),
        other => Err(format!("online CPUs {other:?}, want \"0-1\"")),
    }
}

/// `boot-disk`, `cpus2` (our vmm), their QEMU references, and `qemu-vfio-disk` (QEMU in L1
/// assigns L1's VFIO-bound virtio-blk to L2; the disk check is the same).
pub fn cases() -> Vec<Case> {
    vec![
        disk_case("boot-disk", Program::Vmm, Attach::Emulated),
        Case::new(Scenario::vmm("cpus2", CPUS_SCRIPT).cpus(2), cpus_check),
        disk_case("qemu-boot-disk", Program::Qemu, Attach::Emulated),
        Case::opt_in(
            Scenario::qemu("qemu-cpus2", CPUS_SCRIPT).cpus(2),
            cpus_check,
        ),
        disk_case("qemu-vfio-disk", Program::Qemu, Attach::Vfio),
    ]
}
