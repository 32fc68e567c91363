//! Command-line parsing for the `vmm` binary: argv into a [`VmConfig`] through the
//! [`crate::config`] parsers.

use std::path::PathBuf;

use log::LevelFilter;

use crate::config::{
    self, BlockConfig, ConfigError, IommuChoice, NetConfig, SerialOutput, VfioDeviceConfig,
    VmConfig, WatchdogOptions, WATCHDOG_ENV,
};
use crate::seccomp::{SeccompMode, ThreadKind};

pub use crate::config::DEFAULT_CMDLINE;

/// Usage text.
pub const USAGE: &str = "\
usage: vmm --kernel BZIMAGE [options]
  --kernel PATH         Linux bzImage to boot (required)
  --initramfs PATH      initramfs (cpio, optionally compressed)
  --cmdline STRING      kernel command line (default: \"console=ttyS0 reboot=k panic=1\")
  --memory SIZE         guest RAM, e.g. 512M, 2G (default: 512M)
  --cpus N              number of vCPUs (default: 2)
  --disk path=FILE[,readonly=on][,iommu=on][,notify=inline|thread][,indirect=on|off]
                        virtio-blk disk backed by a raw file (repeatable); requests are
                        served on the kicking vCPU thread (notify=inline, default) or on a
                        worker thread woken by an ioeventfd (notify=thread); iommu=on puts
                        the disk behind the virtio-iommu (needs --viommu virtio); indirect
                        descriptors are offered except behind the IOMMU (each indirect
                        table costs the guest one more MAP and UNMAP per request)
  --net tap=NAME|hub=ID[,mac=52:54:00:12:34:56][,iommu=on]
                        virtio-net port (repeatable) on a TAP interface or on an in-process
                        hub joining this VM's ports (a frame sent on one port reaches every
                        other port of the hub); iommu=on puts it behind the virtio-iommu
  --device path=/sys/bus/pci/devices/BDF[,iommu=on|off]
                        pass a host PCI function bound to vfio-pci through (repeatable);
                        iommu=on puts it behind the virtio-iommu (needs --viommu virtio,
                        guest mappings are shadowed into its VFIO container), iommu=off
                        (default) maps all guest RAM for it (IOVA == GPA)
  --viommu off|virtio[,bypass=0|1][,max-domains=N][,max-mappings=N][,poll=US]
                        guest-visible IOMMU (default: off): a virtio-iommu PCI function and
                        an ACPI VIOT table; bypass=1 (default) lets unattached endpoints DMA
                        untranslated, bypass=0 blocks them; max-* cap guest-created state;
                        poll: keep serving the request queue without driver kicks for US
                        microseconds after the last request (default 0 = kicks only; a
                        poller needs a spare host CPU: under nested TCG on 2 busy cores it
                        measured slower)
  --viommu vtd[,aw=39|48][,max-domains=N][,max-mappings=N]
                        an emulated Intel VT-d instead (legacy mode, caching mode, no
                        interrupt remapping): its registers at 0xfed90000 and an ACPI DMAR
                        table; iommu=on disks and ports sit behind it (boot the guest with
                        intel_iommu=on); aw: widest second-level table (default 48);
                        VFIO devices with iommu=on are not supported behind it yet
  --serial stdout|file=PATH
                        where COM1 output goes (default: stdout)
  --seccomp off|log|on  system-call filters on every VMM thread once the machine is built
                        (default: on): on stops the VMM on a forbidden call (exit status
                        159, the call named on stderr), log lets the kernel log it
  --log-level LEVEL     off, error, warn, info, debug, trace (default: warn, or RUST_LOG)
  --watchdog SECS[,kmsg=on]
                        hang watchdog (default: off, or VMM_WATCHDOG=SECS[,kmsg=on]): when
                        no vCPU makes progress, or one vCPU stays in one exit handler, for
                        SECS seconds, log one report (each vCPU's last exit, the device
                        locks held, every VMM thread's kernel state); kmsg=on copies it to
                        /dev/kmsg
  --api-socket PATH     control socket (HTTP on a Unix socket, cloud-hypervisor's
                        vm.pause, vm.resume, vm.snapshot, vm.info); needs --seccomp off|log
  --restore DIR         resume the snapshot in DIR instead of booting (the same options as
                        the VM it was taken of: they are checked against it)
  -h, --help            show this help

usage: vmm ctl SOCKET pause|resume|info|snapshot DIR
                        drive a VM started with --api-socket SOCKET (snapshot: pause first;
                        see docs/snapshot.md)";

/// Parsed command line.
#[derive(Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // built once per process
pub enum Command {
    /// Boot a machine.
    Run(VmConfig),
    /// Print help.
    Help,
    /// `vmm ctl SOCKET COMMAND [ARG]`: a client of the control socket.
    Ctl(Vec<String>),
    /// Hidden, for tests (`--seccomp-selftest KIND`): install the filter of thread kind KIND
    /// on a thread, make an allowed call, then a forbidden one (socket), and report.
    SeccompSelftest(ThreadKind, SeccompMode),
}

/// Parse arguments (without the program name).
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, ConfigError> {
    let mut kernel = None;
    let mut c = VmConfig::new(PathBuf::new());
    let mut selftest = None;
    c.log_level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|l| config::parse_level(&l))
        .unwrap_or(LevelFilter::Warn);
    let args: Vec<String> = args.into_iter().collect();
    if args.first().is_some_and(|a| a == "ctl") {
        return Ok(Command::Ctl(args[1..].to_vec()));
    }
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if !name.starts_with("--") {
            return Err(ConfigError::Unexpected(arg));
        }
        let mut value = || -> Result<String, ConfigError> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it.next().ok_or(ConfigError::NeedsValue(name.clone())),
            }
        };
        match name.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initramfs" => c.initramfs = Some(PathBuf::from(value()?)),
            "--cmdline" => c.cmdline = value()?,
            "--memory" => {
                c.memory = config::parse_size(&value()?)
                    .map_err(|source| ConfigError::Memory { source })?
            }
            "--cpus" => {
                c.cpus =
                    config::parse_cpus(&value()?).map_err(|source| ConfigError::Cpus { source })?
            }
            "--disk" => {
                let arg = value()?;
                let d = BlockConfig::parse(&arg).map_err(|source| ConfigError::Disk {
                    arg: arg.clone(),
                    source,
                })?;
                c.disks.push(d);
            }
            "--net" => {
                let arg = value()?;
                let n = NetConfig::parse(&arg).map_err(|source| ConfigError::Net {
                    arg: arg.clone(),
                    source,
                })?;
                c.nets.push(n);
            }
            "--device" => {
                let arg = value()?;
                let d = VfioDeviceConfig::parse(&arg).map_err(|source| ConfigError::Device {
                    arg: arg.clone(),
                    source,
                })?;
                c.devices.push(d);
            }
            "--viommu" => {
                let arg = value()?;
                let choice = IommuChoice::parse(&arg).map_err(|source| ConfigError::Viommu {
                    arg: arg.clone(),
                    source,
                })?;
                (c.viommu, c.vtd) = match choice {
                    IommuChoice::Off => (None, None),
                    IommuChoice::Virtio(o) => (Some(o), None),
                    IommuChoice::Vtd(o) => (None, Some(o)),
                };
            }
            "--serial" => {
                let v = value()?;
                c.serial = SerialOutput::parse(&v).ok_or(ConfigError::Serial(v))?;
            }
            "--seccomp" => {
                c.seccomp = config::parse_seccomp(&value()?)
                    .map_err(|source| ConfigError::Seccomp { source })?
            }
            "--seccomp-selftest" => {
                let v = value()?;
                selftest = Some(ThreadKind::parse(&v).ok_or(ConfigError::SelftestKind(v))?);
            }
            "--watchdog" => {
                let arg = value()?;
                c.watchdog = Some(watchdog(&arg)?);
            }
            "--api-socket" => c.api_socket = Some(PathBuf::from(value()?)),
            "--restore" => c.restore = Some(PathBuf::from(value()?)),
            "--log-level" => {
                let v = value()?;
                c.log_level = config::parse_level(&v).ok_or(ConfigError::LogLevel(v))?;
            }
            _ => return Err(ConfigError::UnknownOption(name)),
        }
    }
    if let Some(kind) = selftest {
        return Ok(Command::SeccompSelftest(kind, c.seccomp));
    }
    if c.watchdog.is_none() {
        if let Some(arg) = std::env::var(WATCHDOG_ENV).ok().filter(|v| !v.is_empty()) {
            c.watchdog = Some(watchdog(&arg)?);
        }
    }
    c.kernel = kernel.ok_or(ConfigError::NoKernel)?;
    c.validate()?;
    Ok(Command::Run(c))
}

fn watchdog(arg: &str) -> Result<WatchdogOptions, ConfigError> {
    WatchdogOptions::parse(arg).map_err(|source| ConfigError::Watchdog {
        arg: arg.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ViommuOptions, VtdOptions};

    fn p(a: &[&str]) -> Result<Command, String> {
        parse(a.iter().map(|s| s.to_string())).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_full_set() {
        let Command::Run(c) = p(&["--kernel", "/k"]).unwrap() else {
            panic!()
        };
        assert_eq!(c.memory, 512 << 20);
        assert_eq!(c.cpus, 2);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert_eq!(c.serial, SerialOutput::Stdout);
        assert_eq!(c.viommu, None);
        assert_eq!(c.seccomp, crate::seccomp::SeccompMode::On);
        let Command::Run(c) = p(&[
            "--kernel=/k",
            "--initramfs",
            "/i",
            "--cmdline",
            "console=ttyS0 quiet",
            "--memory",
            "1G",
            "--cpus",
            "4",
            "--disk",
            "path=/a",
            "--disk",
            "path=/b,readonly=on,iommu=on",
            "--viommu",
            "virtio,bypass=0",
            "--serial",
            "file=/tmp/s",
            "--log-level",
            "debug",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(c.initramfs, Some("/i".into()));
        assert_eq!(c.cmdline, "console=ttyS0 quiet");
        assert_eq!(c.memory, 1 << 30);
        assert_eq!(c.cpus, 4);
        assert_eq!(c.disks.len(), 2);
        assert!(c.disks[1].readonly && c.disks[1].iommu);
        assert_eq!(
            c.viommu,
            Some(ViommuOptions {
                bypass: false,
                ..ViommuOptions::default()
            })
        );
        assert_eq!(c.serial, SerialOutput::File("/tmp/s".into()));
        assert_eq!(c.log_level, LevelFilter::Debug);
    }

    #[test]
    fn errors_are_clear() {
        assert!(p(&[]).unwrap_err().contains("--kernel"));
        assert!(p(&["--kernel"]).unwrap_err().contains("needs a value"));
        assert!(p(&["--kernel", "k", "--cpus", "0"])
            .unwrap_err()
            .contains("--cpus"));
        assert!(p(&["--kernel", "k", "--memory", "lots"])
            .unwrap_err()
            .contains("--memory"));
        assert!(p(&["--kernel", "k", "--serial", "tty"])
            .unwrap_err()
            .contains("--serial"));
        assert!(p(&["--kernel", "k", "--disk", "ro"])
            .unwrap_err()
            .contains("--disk"));
        assert!(p(&["--kernel", "k", "--frobnicate"])
            .unwrap_err()
            .contains("unknown option"));
        assert!(p(&["stray"]).unwrap_err().contains("unexpected"));
        assert!(p(&["--kernel", "k", "--viommu", "intel"])
            .unwrap_err()
            .contains("--viommu"));
        // iommu=on without a vIOMMU (absent or off) is refused, naming the fix.
        for extra in [&[][..], &["--viommu", "off"][..]] {
            let mut a = vec!["--kernel", "k", "--disk", "path=/d,iommu=on"];
            a.extend_from_slice(extra);
            let e = p(&a).unwrap_err();
            assert!(
                e.contains("iommu=on") && e.contains("--viommu virtio"),
                "{e}"
            );
        }
        assert!(p(&[
            "--kernel",
            "k",
            "--disk",
            "path=/d,iommu=on",
            "--viommu",
            "virtio"
        ])
        .is_ok());
        assert_eq!(p(&["--help"]).unwrap(), Command::Help);
        assert!(p(&["--kernel", "k", "--seccomp", "strict"])
            .unwrap_err()
            .contains("--seccomp"));
        let Command::Run(c) = p(&["--kernel", "k", "--seccomp=log"]).unwrap() else {
            panic!()
        };
        assert_eq!(c.seccomp, crate::seccomp::SeccompMode::Log);
        assert_eq!(
            p(&["--seccomp-selftest", "vcpu", "--seccomp", "off"]).unwrap(),
            Command::SeccompSelftest(
                crate::seccomp::ThreadKind::Vcpu,
                crate::seccomp::SeccompMode::Off
            )
        );
    }

    #[test]
    fn watchdog_flag() {
        let Command::Run(c) = p(&["--kernel", "k", "--watchdog", "20,kmsg=on"]).unwrap() else {
            panic!()
        };
        assert_eq!(
            c.watchdog,
            Some(WatchdogOptions {
                limit_secs: 20,
                kmsg: true
            })
        );
        let e = p(&["--kernel", "k", "--watchdog", "0"]).unwrap_err();
        assert!(e.starts_with("--watchdog: SECS=0"), "{e}");
    }

    #[test]
    fn vfio_devices() {
        let Command::Run(c) = p(&[
            "--kernel",
            "k",
            "--device",
            "path=/sys/bus/pci/devices/0000:00:18.0,iommu=on",
            "--device=path=/sys/bus/pci/devices/0000:00:19.0",
            "--viommu",
            "virtio",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(c.devices.len(), 2);
        assert!(c.devices[0].iommu && !c.devices[1].iommu);
        assert!(c.devices[1].path.ends_with("0000:00:19.0"));
        let e = p(&["--kernel", "k", "--device", "path=/x,iommu=on"]).unwrap_err();
        assert!(e.contains("--viommu virtio"), "{e}");
        assert!(p(&["--kernel", "k", "--device", "path=/x"]).is_ok());
        assert!(p(&["--kernel", "k", "--device", "iommu=on"])
            .unwrap_err()
            .contains("--device"));
    }

    #[test]
    fn errors_carry_the_option_and_its_typed_cause() {
        use crate::config::OptionError;
        use std::error::Error;
        let e = parse(["--kernel", "k", "--disk", "ro"].map(String::from)).unwrap_err();
        let ConfigError::Disk { arg, source } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(arg, "ro");
        assert!(matches!(
            source,
            OptionError::NotKeyValue { family: "disk", .. }
        ));
        assert_eq!(e.to_string(), "--disk: disk option 'ro' is not key=value");
        assert!(e.source().unwrap().is::<OptionError>());
        let e = parse(["--kernel", "k", "--viommu=virtio,poll=x"].map(String::from)).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Viommu { arg, .. } if arg == "virtio,poll=x"),
            "{e:?}"
        );
        let e = parse(["--kernel", "k", "--memory", "1T"].map(String::from)).unwrap_err();
        assert_eq!(e.to_string(), "--memory: bad size '1T'");
        assert!(e.source().is_some());
        assert!(matches!(
            parse(["--cpus"].map(String::from)),
            Err(ConfigError::NeedsValue(n)) if n == "--cpus"
        ));
    }

    #[test]
    fn viommu_vtd() {
        let Command::Run(c) = p(&[
            "--kernel",
            "k",
            "--viommu",
            "vtd,aw=39",
            "--disk",
            "path=/d,iommu=on",
        ])
        .unwrap() else {
            panic!("run")
        };
        assert_eq!(c.viommu, None);
        assert_eq!(
            c.vtd,
            Some(VtdOptions {
                aw: viommu::vtd::caps::AddressWidth::Bits39,
                ..VtdOptions::default()
            })
        );
        // The last --viommu wins.
        let Command::Run(c) =
            p(&["--kernel", "k", "--viommu", "vtd", "--viommu", "virtio"]).unwrap()
        else {
            panic!("run")
        };
        assert_eq!((c.viommu, c.vtd), (Some(ViommuOptions::default()), None));
        let e = p(&[
            "--kernel",
            "k",
            "--viommu",
            "vtd",
            "--device",
            "path=/sys/bus/pci/devices/0000:00:05.0,iommu=on",
        ])
        .unwrap_err();
        assert!(e.contains("not supported yet"), "{e}");
        let e = p(&["--kernel", "k", "--viommu", "vtd,aw=40"]).unwrap_err();
        assert!(e.contains("aw=40: expected 39 or 48"), "{e}");
        // VFIO without iommu=on is fine next to the unit.
        assert!(p(&[
            "--kernel",
            "k",
            "--viommu",
            "vtd",
            "--device",
            "path=/sys/bus/pci/devices/0000:00:05.0"
        ])
        .is_ok());
    }
}
