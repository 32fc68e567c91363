//! What a test asks the rig to run, and what it gets back.

use std::path::PathBuf;
use std::time::Duration;

use crate::cpio::CpioFile;

/// Which VMM runs the L2 guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// Our `vmm` binary.
    Vmm,
    /// `qemu-system-x86_64` (reference VMM; in nested mode copied into L1).
    Qemu,
}

/// Path of the L2 scenario script inside the L2 initramfs.
pub const L2_SCRIPT_PATH: &str = "/rig/scenario.sh";

/// One real-guest run: a VMM command line, the script L2's /init runs, and the disks it gets.
///
/// `vmm_args` may contain placeholders, replaced by the rig with paths valid where the VMM runs
/// (on the host in direct mode, inside L1 in nested mode):
/// - `{kernel}`: the L2 kernel (bzImage); `{initrd}`: the L2 initramfs with the script appended;
/// - `{cmdline}`: the whole L2 kernel command line (console, `run=` and `cmdline_extra`);
/// - `{disk0}`, `{disk1}`, ...: the scenario's disks, in order;
/// - `{vfio0}`, ...: sysfs path (`/sys/bus/pci/devices/0000:00:18.0`) of the scenario's VFIO
///   devices in L1, bound to vfio-pci; `{vfio0-bdf}`, ...: their PCI address (`0000:00:18.0`).
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Unique name (used in progress lines and PASS/FAIL output).
    pub name: String,
    /// The VMM that runs L2.
    pub program: Program,
    /// Arguments for the program, with placeholders.
    pub vmm_args: Vec<String>,
    /// Shell script (busybox sh) L2 runs after loading its modules; its exit status becomes
    /// `GUEST-EXIT <status>` on the console.
    pub l2_script: String,
    /// Extra files added to the L2 initramfs (programs, data).
    pub l2_files: Vec<CpioFile>,
    /// Words appended to the L2 kernel command line.
    pub cmdline_extra: String,
    /// Raw disk images on the host; L2 writes land in these files.
    pub disks: Vec<PathBuf>,
    /// Raw disk images the L0 QEMU gives L1 as virtio-blk devices behind an emulated Intel IOMMU
    /// (nested mode only); L1 binds them to vfio-pci so the VMM can assign them to L2. L2 writes
    /// land in these files. Scenarios with VFIO disks get an L1 boot of their own.
    pub vfio_disks: Vec<PathBuf>,
    /// vCPUs in the default arguments (ignored when `vmm_args` is set).
    pub cpus: u32,
    /// Time the VMM may run before it is killed.
    pub timeout: Duration,
    /// Shell commands run in L1 (nested mode only) before the VMM starts, e.g. binding a device
    /// to vfio-pci. A failure fails the scenario (status of the run script).
    pub l1_setup: String,
    /// Extra arguments for the L0 QEMU (nested mode only), e.g. an emulated IOMMU for L1.
    /// Identical lists from several scenarios of one run are added once.
    pub l0_args: Vec<String>,
    /// Files added to L1's initramfs for this scenario (nested mode only), e.g. helper scripts.
    pub l1_files: Vec<CpioFile>,
    /// Command words run in L1 in front of the program (nested mode only): the scenario runs
    /// `exec WRAP... PROGRAM ARGS...`, e.g. a profiler or a filter of the console.
    pub l1_wrap: Vec<String>,
    /// Prebuilt cpio archives appended to L1's initramfs (nested mode only), e.g. the
    /// profiling tools from `guest-images/build.sh perf`; each path is added once per L1 boot.
    pub l1_archives: Vec<PathBuf>,
}

impl Scenario {
    /// A scenario for our `vmm` with its default command line (512 MiB, 1 CPU, serial on stdout,
    /// every disk as `--disk path={diskN}`).
    pub fn vmm(name: impl Into<String>, l2_script: impl Into<String>) -> Self {
        Self::new(name, Program::Vmm, l2_script)
    }

    /// A scenario for QEMU with a command line equivalent to [`Scenario::vmm`]'s, plus a
    /// virtio-iommu that every disk sits behind.
    pub fn qemu(name: impl Into<String>, l2_script: impl Into<String>) -> Self {
        Self::new(name, Program::Qemu, l2_script)
    }

    fn new(name: impl Into<String>, program: Program, l2_script: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            program,
            vmm_args: Vec::new(),
            l2_script: l2_script.into(),
            l2_files: Vec::new(),
            cmdline_extra: String::new(),
            disks: Vec::new(),
            vfio_disks: Vec::new(),
            cpus: 1,
            timeout: Duration::from_secs(300),
            l1_setup: String::new(),
            l0_args: Vec::new(),
            l1_files: Vec::new(),
            l1_wrap: Vec::new(),
            l1_archives: Vec::new(),
        }
    }

    /// Adds a disk (raw image file on the host).
    pub fn disk(mut self, path: impl Into<PathBuf>) -> Self {
        self.disks.push(path.into());
        self
    }

    /// Adds a VFIO disk (raw image file on the host), see [`Scenario::vfio_disks`].
    pub fn vfio_disk(mut self, path: impl Into<PathBuf>) -> Self {
        self.vfio_disks.push(path.into());
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Replaces the program arguments (placeholders allowed). Without this, defaults are
    /// generated from the number of CPUs and disks when the scenario runs.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.vmm_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Appends words to the L2 kernel command line.
    pub fn cmdline_extra(mut self, extra: impl Into<String>) -> Self {
        self.cmdline_extra = extra.into();
        self
    }

    /// Adds a file to the L2 initramfs.
    pub fn l2_file(mut self, file: CpioFile) -> Self {
        self.l2_files.push(file);
        self
    }

    /// The VMM's command line without devices: kernel, initramfs and command line from the
    /// rig, `memory_mib` of RAM, `cpus` vCPUs, the serial console on stdout; with `viommu`,
    /// the virtio-iommu (ours: `--viommu virtio`, QEMU: `virtio-iommu-pci`).
    pub fn base_args(program: Program, cpus: u32, memory_mib: u32, viommu: bool) -> Vec<String> {
        let (cpus, mem) = (cpus.to_string(), memory_mib.to_string());
        let mut a: Vec<String> = match program {
            Program::Vmm => [
                "--kernel",
                "{kernel}",
                "--initramfs",
                "{initrd}",
                "--cmdline",
                "{cmdline}",
                "--memory",
                &format!("{mem}M"),
                "--cpus",
                &cpus,
                "--serial",
                "stdout",
            ]
            .map(String::from)
            .to_vec(),
            Program::Qemu => [
                "-machine",
                "q35,accel=kvm",
                "-cpu",
                "host",
                "-m",
                &mem,
                "-smp",
                &cpus,
                "-nodefaults",
                "-no-reboot",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-monitor",
                "none",
                "-kernel",
                "{kernel}",
                "-initrd",
                "{initrd}",
                "-append",
                "{cmdline}",
            ]
            .map(String::from)
            .to_vec(),
        };
        if viommu {
            let dev: [&str; 2] = match program {
                Program::Vmm => ["--viommu", "virtio"],
                Program::Qemu => ["-device", "virtio-iommu-pci"],
            };
            a.extend(dev.map(String::from));
        }
        a
    }

    /// Default arguments for `program` with `cpus` vCPUs, `ndisks` disks and `nvfio` VFIO devices
    /// (QEMU only: our vmm's arguments for VFIO devices must be given with [`Scenario::args`]).
    /// QEMU's come with its virtio-iommu and its disks behind it; ours without.
    pub fn default_args(program: Program, cpus: u32, ndisks: usize, nvfio: usize) -> Vec<String> {
        let mut a = Self::base_args(program, cpus, 512, program == Program::Qemu);
        let mut push = |s: &str| a.push(s.to_string());
        match program {
            Program::Vmm => {
                for i in 0..ndisks {
                    push("--disk");
                    push(&format!("path={{disk{i}}}"));
                }
            }
            Program::Qemu => {
                for i in 0..ndisks {
                    push("-drive");
                    push(&format!("file={{disk{i}}},if=none,id=d{i},format=raw"));
                    push("-device");
                    push(&format!(
                        "virtio-blk-pci,drive=d{i},iommu_platform=on,disable-legacy=on"
                    ));
                }
                for i in 0..nvfio {
                    push("-device");
                    push(&format!("vfio-pci,host={{vfio{i}-bdf}}"));
                }
            }
        }
        a
    }

    /// Sets the number of vCPUs of the default arguments.
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// The arguments actually used: `vmm_args`, or the defaults when empty.
    pub fn effective_args(&self) -> Vec<String> {
        if self.vmm_args.is_empty() {
            Self::default_args(
                self.program,
                self.cpus,
                self.disks.len(),
                self.vfio_disks.len(),
            )
        } else {
            self.vmm_args.clone()
        }
    }

    /// The L2 kernel command line.
    pub fn l2_cmdline(&self) -> String {
        let mut c = format!("console=ttyS0 panic=-1 loglevel=4 run={L2_SCRIPT_PATH}");
        if !self.cmdline_extra.trim().is_empty() {
            c.push(' ');
            c.push_str(self.cmdline_extra.trim());
        }
        c
    }

    /// The archive appended to the L2 initramfs: the script and the extra files.
    pub fn l2_archive(&self) -> Vec<u8> {
        let mut files = vec![CpioFile::new(
            L2_SCRIPT_PATH,
            0o755,
            self.l2_script.as_bytes().to_vec(),
        )];
        files.extend(self.l2_files.iter().cloned());
        crate::cpio::archive(&files)
    }
}

/// Paths the placeholders stand for, where the program runs.
#[derive(Debug, Clone)]
pub(crate) struct Placeholders {
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    pub disks: Vec<String>,
    /// PCI addresses (in L1) of the VFIO devices.
    pub vfio: Vec<String>,
}

/// Replaces the placeholders in `args`. Unknown `{...}` words and disk indexes out of range are
/// errors (a typo must not reach the VMM).
pub(crate) fn expand(args: &[String], p: &Placeholders) -> Result<Vec<String>, String> {
    args.iter().map(|a| expand_one(a, p)).collect()
}

fn expand_one(arg: &str, p: &Placeholders) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in argument {arg:?}"))?;
        let key = &after[..end];
        let value = match key {
            "kernel" => p.kernel.clone(),
            "initrd" => p.initrd.clone(),
            "cmdline" => p.cmdline.clone(),
            k if k.starts_with("vfio") => {
                let (num, bdf) = match k[4..].strip_suffix("-bdf") {
                    Some(n) => (n, true),
                    None => (&k[4..], false),
                };
                let idx: usize = num
                    .parse()
                    .map_err(|_| format!("bad placeholder {{{k}}} in {arg:?}"))?;
                let addr = p.vfio.get(idx).ok_or_else(|| {
                    format!("{{{k}}} but the scenario has {} VFIO disk(s)", p.vfio.len())
                })?;
                if bdf {
                    addr.clone()
                } else {
                    format!("/sys/bus/pci/devices/{addr}")
                }
            }
            k if k.starts_with("disk") => {
                let idx: usize = k[4..]
                    .parse()
                    .map_err(|_| format!("bad placeholder {{{k}}} in {arg:?}"))?;
                p.disks.get(idx).cloned().ok_or_else(|| {
                    format!("{{{k}}} but the scenario has {} disk(s)", p.disks.len())
                })?
            }
            k => return Err(format!("unknown placeholder {{{k}}} in {arg:?}")),
        };
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// How L1 (nested mode) failed while a scenario ran: an environment failure, told apart from
/// the scenario's own result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L1FailureKind {
    /// L1 went silent past the scenario's timeout plus [`crate::nested::FREEZE_GRACE`].
    Froze,
    /// The L0 QEMU exited (L1 panicked, powered off, reset) before reporting the scenario;
    /// how QEMU exited.
    Ended(String),
}

/// An L1 failure during a scenario, with the evidence.
#[derive(Debug, Clone)]
pub struct L1Failure {
    /// What happened.
    pub kind: L1FailureKind,
    /// The last lines of L1's console (its kernel log: a panic, an RCU stall, ...).
    pub console_tail: String,
    /// The last lines of the rig channel (the scenario's console as it arrived).
    pub channel_tail: String,
}

impl std::fmt::Display for L1Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            L1FailureKind::Froze => write!(f, "L1 froze"),
            L1FailureKind::Ended(status) => write!(f, "L1 ended early ({status})"),
        }
    }
}

/// What one scenario produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The scenario's name.
    pub name: String,
    /// The L2 console (the VMM's stdout), carriage returns removed.
    pub serial: String,
    /// The VMM's exit status; `None` when it was killed (timeout, signal).
    pub vmm_status: Option<i32>,
    /// The VMM's stderr.
    pub vmm_log: String,
    /// The status from the last `GUEST-EXIT <status>` line on the console, if any.
    pub guest_exit: Option<i32>,
    /// Whether the scenario's timeout killed the VMM.
    pub timed_out: bool,
    /// Wall time of the VMM run (in L1's clock in nested mode).
    pub duration: Duration,
    /// L1's kernel log lines printed while the scenario ran (nested mode; empty in direct mode),
    /// e.g. KVM complaining about the VMM or the guest.
    pub l1_log: String,
    /// Set when L1 froze or died while the scenario ran (nested mode): `serial` and `vmm_log`
    /// then hold only what arrived before, and the scenario has no result of its own.
    pub l1_failure: Option<L1Failure>,
}

impl Outcome {
    /// Builds an outcome, deriving `guest_exit` from the console text.
    pub fn new(
        name: String,
        serial: String,
        vmm_status: Option<i32>,
        vmm_log: String,
        timed_out: bool,
        duration: Duration,
    ) -> Self {
        let guest_exit = parse_guest_exit(&serial);
        Self {
            name,
            serial,
            vmm_status,
            vmm_log,
            guest_exit,
            timed_out,
            duration,
            l1_log: String::new(),
            l1_failure: None,
        }
    }

    /// The L2 guest reset itself before its script finished: no `GUEST-EXIT`, the VMM exited
    /// 0 without a timeout, and (our vmm, `program`) it logged a shutdown exit, i.e. a triple
    /// fault. Under nested KVM on QEMU TCG this happens to L2 guests whose vCPUs stay busy,
    /// whichever VMM runs them (QEMU, run with `-no-reboot`, exits 0 on the reset).
    pub fn guest_reset_itself(&self, program: Program) -> bool {
        self.l1_failure.is_none()
            && !self.timed_out
            && self.guest_exit.is_none()
            && self.vmm_status == Some(0)
            && match program {
                Program::Vmm => self.vmm_log.contains("shutdown exit (triple fault"),
                Program::Qemu => true,
            }
    }

    /// The last `n` lines of the console, for error messages.
    pub fn serial_tail(&self, n: usize) -> String {
        tail_lines(&self.serial, n)
    }
}

/// The status of the last `GUEST-EXIT <n>` line in `serial`.
pub fn parse_guest_exit(serial: &str) -> Option<i32> {
    serial.lines().rev().find_map(|l| {
        let rest = l.trim().strip_prefix("GUEST-EXIT ")?;
        rest.trim().parse().ok()
    })
}

/// The last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_reset_is_told_from_other_failures() {
        let o = |serial: &str, status, log: &str, timed_out| {
            Outcome::new(
                "x".into(),
                serial.into(),
                status,
                log.into(),
                timed_out,
                Duration::ZERO,
            )
        };
        let reset = "[vmm WARN  vmm::vcpu] vCPU 1: shutdown exit (triple fault or reboot=t): ..";
        assert!(o("booting", Some(0), reset, false).guest_reset_itself(Program::Vmm));
        assert!(o("booting", Some(0), "", false).guest_reset_itself(Program::Qemu));
        // Our vmm exiting 0 without the shutdown exit, a finished script, a VMM error or a
        // timeout: not a reset.
        assert!(!o("booting", Some(0), "", false).guest_reset_itself(Program::Vmm));
        assert!(!o("GUEST-EXIT 1\n", Some(0), reset, false).guest_reset_itself(Program::Vmm));
        assert!(!o("booting", Some(1), reset, false).guest_reset_itself(Program::Vmm));
        assert!(!o("booting", None, reset, true).guest_reset_itself(Program::Vmm));
    }

    fn ph() -> Placeholders {
        Placeholders {
            kernel: "/l2/vmlinuz".into(),
            initrd: "/tmp/i".into(),
            cmdline: "console=ttyS0 run=/x".into(),
            disks: vec!["/dev/rigdisk/s0d0".into(), "/dev/rigdisk/s0d1".into()],
            vfio: vec!["0000:00:18.0".into()],
        }
    }

    #[test]
    fn expands_placeholders() {
        let args: Vec<String> = [
            "--kernel",
            "{kernel}",
            "--disk",
            "path={disk1},readonly=on",
            "{cmdline}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let e = expand(&args, &ph()).unwrap();
        assert_eq!(
            e,
            [
                "--kernel",
                "/l2/vmlinuz",
                "--disk",
                "path=/dev/rigdisk/s0d1,readonly=on",
                "console=ttyS0 run=/x"
            ]
        );
    }

    #[test]
    fn rejects_unknown_and_out_of_range_placeholders() {
        assert!(expand(&["{kernal}".into()], &ph())
            .unwrap_err()
            .contains("unknown"));
        assert!(expand(&["{disk2}".into()], &ph())
            .unwrap_err()
            .contains("2 disk"));
        assert!(expand(&["{diskx}".into()], &ph()).is_err());
        assert!(expand(&["a{kernel".into()], &ph())
            .unwrap_err()
            .contains("unclosed"));
        assert!(expand(&["{vfio1}".into()], &ph())
            .unwrap_err()
            .contains("1 VFIO"));
        assert!(expand(&["{vfio0-x}".into()], &ph()).is_err());
    }

    #[test]
    fn expands_vfio_placeholders() {
        let args = vec!["path={vfio0}".to_string(), "host={vfio0-bdf}".to_string()];
        assert_eq!(
            expand(&args, &ph()).unwrap(),
            [
                "path=/sys/bus/pci/devices/0000:00:18.0",
                "host=0000:00:18.0"
            ]
        );
    }

    #[test]
    fn default_vmm_args_name_every_disk() {
        let s = Scenario::vmm("x", "true").cpus(2).disk("/a").disk("/b");
        let a = s.effective_args();
        let joined = a.join(" ");
        assert!(joined.contains("--cpus 2"), "{joined}");
        assert!(
            joined.contains("--disk path={disk0} --disk path={disk1}"),
            "{joined}"
        );
        assert!(joined.contains("--cmdline {cmdline}"));
    }

    #[test]
    fn guest_exit_takes_the_last_marker() {
        assert_eq!(
            parse_guest_exit("a\nGUEST-EXIT 3\nGUEST-EXIT 0\r\nx"),
            Some(0)
        );
        assert_eq!(parse_guest_exit("GUEST-EXIT 17"), Some(17));
        assert_eq!(parse_guest_exit("no marker\nGUEST-EXIT abc"), None);
    }

    #[test]
    fn cmdline_has_run_and_extra() {
        let s = Scenario::vmm("x", "true").cmdline_extra(" iommu.strict=1 ");
        assert_eq!(
            s.l2_cmdline(),
            "console=ttyS0 panic=-1 loglevel=4 run=/rig/scenario.sh iommu.strict=1"
        );
    }
}
