//! The VMM's configuration: every option the `vmm` binary takes, parsed into typed values.
//!
//! One module per option family ([`disk`], [`net`], [`device`] for VFIO, [`viommu`],
//! [`memory`] sizes, [`serial`]), all reading their `key=value[,key=value]` lists through
//! [`options`]. [`VmConfigBuilder`] applies options one at a time (as `cli` meets them on the
//! command line) and [`VmConfigBuilder::build`] checks what spans options; the result,
//! [`VmConfig`], is what [`crate::machine::Machine`] is built from.
//!
//! Every value comes from the user: parsing never panics, and a bad value is a
//! [`ConfigError`] naming the option, whose `Display` is the whole message and whose source
//! is the typed cause ([`OptionError`], [`SizeError`]).
//!
//! ```
//! use vmm::config::{ConfigError, Notify, OptionError, VmConfigBuilder, VmOption};
//!
//! let mut options = VmConfigBuilder::new(None);
//! options.set(VmOption::Kernel, "bzImage")?;
//! options.set(VmOption::Disk, "path=disk.img,notify=thread")?;
//! let config = options.build()?;
//! assert_eq!(config.disks[0].notify, Notify::Thread);
//!
//! let e = VmConfigBuilder::new(None)
//!     .set(VmOption::Disk, "path=x,readonly=maybe")
//!     .unwrap_err();
//! assert_eq!(e.to_string(), "--disk: readonly=maybe: expected on or off");
//! assert!(matches!(e, ConfigError::Disk { source: OptionError::Invalid { .. }, .. }));
//! # Ok::<(), ConfigError>(())
//! ```

pub mod device;
pub mod disk;
pub mod memory;
pub mod net;
pub mod options;
pub mod serial;
pub mod viommu;

use std::path::PathBuf;

use log::LevelFilter;

use crate::seccomp::SeccompMode;

pub use device::DeviceConfig;
pub use disk::{DiskConfig, Notify};
pub use memory::{parse_size, SizeError};
pub use net::{MacError, NetBackendConfig, NetConfig};
pub use options::OptionError;
pub use serial::SerialOutput;
pub use viommu::ViommuOptions;

/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Default guest RAM (`--memory`), in bytes.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Default vCPU count (`--cpus`).
pub const DEFAULT_CPUS: u8 = 2;
/// Most vCPUs a guest may have (one APIC ID is the broadcast ID).
pub const MAX_CPUS: u8 = 254;
/// Default log level, unless `RUST_LOG` names one.
pub const DEFAULT_LOG_LEVEL: LevelFilter = LevelFilter::Warn;

/// Everything a machine is built from: the `vmm` command line, typed. (The KVM VM's own
/// shape, vCPUs, RAM and irqchip, is [`crate::vm::VmConfig`].)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// RAM in bytes.
    pub memory: u64,
    /// vCPU count.
    pub cpus: u8,
    /// virtio-blk disks, in PCI slot order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net ports (`--net`), plugged after the disks.
    pub nets: Vec<NetConfig>,
    /// Host PCI functions passed through with VFIO, plugged after the ports.
    pub devices: Vec<DeviceConfig>,
    /// The guest-visible IOMMU (`None`: no vIOMMU; `iommu=on` devices are then refused).
    pub viommu: Option<ViommuOptions>,
    /// Serial output.
    pub serial: SerialOutput,
    /// seccomp filters on every VMM thread once the machine is built (`--seccomp`).
    pub seccomp: SeccompMode,
    /// Log level of the VMM (`--log-level`).
    pub log_level: LevelFilter,
}

/// A bad option value, or options that do not fit together. The `Display` is the message
/// the user reads (after `vmm: `); the source, where there is one, is the typed cause.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A bad `--disk`.
    #[error("--disk: {source}")]
    Disk {
        /// The option's value.
        arg: String,
        /// What is wrong in it.
        source: OptionError,
    },
    /// A bad `--net`.
    #[error("--net: {source}")]
    Net {
        /// The option's value.
        arg: String,
        /// What is wrong in it.
        source: OptionError,
    },
    /// A bad `--device`.
    #[error("--device: {source}")]
    Device {
        /// The option's value.
        arg: String,
        /// What is wrong in it.
        source: OptionError,
    },
    /// A bad `--viommu`.
    #[error("--viommu: {source}")]
    Viommu {
        /// The option's value.
        arg: String,
        /// What is wrong in it.
        source: OptionError,
    },
    /// A bad `--memory`.
    #[error("--memory: bad size '{arg}'")]
    Memory {
        /// The option's value.
        arg: String,
        /// Why it is not a size.
        source: SizeError,
    },
    /// A bad `--cpus`.
    #[error("--cpus: {source}")]
    Cpus {
        /// The option's value.
        arg: String,
        /// What is wrong in it.
        source: OptionError,
    },
    /// A bad `--serial`.
    #[error("--serial: {source}")]
    Serial {
        /// The option's value.
        arg: String,
        /// What is wrong in it.
        source: OptionError,
    },
    /// A bad `--seccomp`.
    #[error("--seccomp: {source}")]
    Seccomp {
        /// The option's value.
        arg: String,
        /// What is wrong in it.
        source: OptionError,
    },
    /// A bad `--log-level`.
    #[error("--log-level: bad level '{arg}'")]
    LogLevel {
        /// The option's value.
        arg: String,
    },
    /// No `--kernel`.
    #[error("--kernel is required")]
    NoKernel,
    /// An `iommu=on` disk without a vIOMMU.
    #[error("--disk path={path},iommu=on: the disk must sit behind a vIOMMU, add --viommu virtio")]
    DiskNeedsViommu {
        /// The disk's backing file.
        path: PathBuf,
    },
    /// An `iommu=on` port without a vIOMMU.
    #[error("--net ...,iommu=on: the port must sit behind a vIOMMU, add --viommu virtio")]
    NetNeedsViommu,
    /// An `iommu=on` VFIO device without a vIOMMU.
    #[error(
        "--device path={path},iommu=on: the device must sit behind a vIOMMU, add --viommu \
         virtio"
    )]
    DeviceNeedsViommu {
        /// The device's sysfs path.
        path: PathBuf,
    },
}

/// An option of the `vmm` command line that takes a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmOption {
    /// `--kernel PATH`.
    Kernel,
    /// `--initramfs PATH`.
    Initramfs,
    /// `--cmdline STRING`.
    Cmdline,
    /// `--memory SIZE`.
    Memory,
    /// `--cpus N`.
    Cpus,
    /// `--disk LIST` (repeatable).
    Disk,
    /// `--net LIST` (repeatable).
    Net,
    /// `--device LIST` (repeatable).
    Device,
    /// `--viommu off|virtio[,LIST]`.
    Viommu,
    /// `--serial stdout|file=PATH`.
    Serial,
    /// `--seccomp off|log|on`.
    Seccomp,
    /// `--log-level LEVEL`.
    LogLevel,
}

impl VmOption {
    /// Every option.
    pub const ALL: [VmOption; 12] = [
        VmOption::Kernel,
        VmOption::Initramfs,
        VmOption::Cmdline,
        VmOption::Memory,
        VmOption::Cpus,
        VmOption::Disk,
        VmOption::Net,
        VmOption::Device,
        VmOption::Viommu,
        VmOption::Serial,
        VmOption::Seccomp,
        VmOption::LogLevel,
    ];

    /// The option as written on the command line (`--disk`).
    pub fn flag(self) -> &'static str {
        match self {
            VmOption::Kernel => "--kernel",
            VmOption::Initramfs => "--initramfs",
            VmOption::Cmdline => "--cmdline",
            VmOption::Memory => "--memory",
            VmOption::Cpus => "--cpus",
            VmOption::Disk => "--disk",
            VmOption::Net => "--net",
            VmOption::Device => "--device",
            VmOption::Viommu => "--viommu",
            VmOption::Serial => "--serial",
            VmOption::Seccomp => "--seccomp",
            VmOption::LogLevel => "--log-level",
        }
    }

    /// The option written `flag` (`None`: not an option).
    pub fn from_flag(flag: &str) -> Option<VmOption> {
        Self::ALL.into_iter().find(|o| o.flag() == flag)
    }
}

impl VmConfig {
    /// `kernel` with every other option at its default.
    pub fn new(kernel: PathBuf) -> VmConfig {
        VmConfig {
            kernel,
            initramfs: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            memory: DEFAULT_MEMORY,
            cpus: DEFAULT_CPUS,
            disks: Vec::new(),
            nets: Vec::new(),
            devices: Vec::new(),
            viommu: None,
            serial: SerialOutput::Stdout,
            seccomp: SeccompMode::On,
            log_level: DEFAULT_LOG_LEVEL,
        }
    }

    /// The rules that span options: a device with `iommu=on` needs a vIOMMU (disks are
    /// checked first, then ports, then VFIO devices).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.viommu.is_some() {
            return Ok(());
        }
        if let Some(d) = self.disks.iter().find(|d| d.iommu) {
            return Err(ConfigError::DiskNeedsViommu {
                path: d.path.clone(),
            });
        }
        if self.nets.iter().any(|n| n.iommu) {
            return Err(ConfigError::NetNeedsViommu);
        }
        if let Some(d) = self.devices.iter().find(|d| d.iommu) {
            return Err(ConfigError::DeviceNeedsViommu {
                path: d.path.clone(),
            });
        }
        Ok(())
    }
}

/// Parse `--cpus`: 1..=[`MAX_CPUS`].
pub fn parse_cpus(s: &str) -> Result<u8, OptionError> {
    s.parse::<u8>()
        .ok()
        .filter(|n| (1..=MAX_CPUS).contains(n))
        .ok_or_else(|| OptionError::Expected {
            value: s.to_string(),
            expected: "1..254",
        })
}

/// Parse `--seccomp`: `off`, `log` or `on`.
pub fn parse_seccomp(s: &str) -> Result<SeccompMode, OptionError> {
    match s {
        "off" => Ok(SeccompMode::Off),
        "log" => Ok(SeccompMode::Log),
        "on" => Ok(SeccompMode::On),
        _ => Err(OptionError::Expected {
            value: s.to_string(),
            expected: "off, log or on",
        }),
    }
}

/// Parse a log level name: `off`, `error`, `warn`, `info`, `debug`, `trace` (any case).
pub fn parse_log_level(s: &str) -> Option<LevelFilter> {
    s.parse().ok()
}

/// A [`VmConfig`] being assembled from options, in command-line order: a repeated option
/// adds a device (`--disk`, `--net`, `--device`) or replaces the earlier value.
#[derive(Clone, Debug)]
pub struct VmConfigBuilder {
    kernel: Option<PathBuf>,
    /// Every field but `kernel`, which is required and set at [`VmConfigBuilder::build`].
    config: VmConfig,
}

impl VmConfigBuilder {
    /// Every option at its default; the log level is `rust_log`'s (the `RUST_LOG` variable)
    /// when it names one.
    pub fn new(rust_log: Option<&str>) -> VmConfigBuilder {
        let mut config = VmConfig::new(PathBuf::new());
        config.log_level = rust_log
            .and_then(parse_log_level)
            .unwrap_or(DEFAULT_LOG_LEVEL);
        VmConfigBuilder {
            kernel: None,
            config,
        }
    }

    /// Apply `option` with `value`.
    pub fn set(&mut self, option: VmOption, value: &str) -> Result<(), ConfigError> {
        let arg = || value.to_string();
        let c = &mut self.config;
        match option {
            VmOption::Kernel => self.kernel = Some(PathBuf::from(value)),
            VmOption::Initramfs => c.initramfs = Some(PathBuf::from(value)),
            VmOption::Cmdline => c.cmdline = value.to_string(),
            VmOption::Memory => {
                c.memory = parse_size(value)
                    .map_err(|source| ConfigError::Memory { arg: arg(), source })?
            }
            VmOption::Cpus => {
                c.cpus =
                    parse_cpus(value).map_err(|source| ConfigError::Cpus { arg: arg(), source })?
            }
            VmOption::Disk => c.disks.push(
                DiskConfig::parse(value)
                    .map_err(|source| ConfigError::Disk { arg: arg(), source })?,
            ),
            VmOption::Net => c.nets.push(
                NetConfig::parse(value)
                    .map_err(|source| ConfigError::Net { arg: arg(), source })?,
            ),
            VmOption::Device => c.devices.push(
                DeviceConfig::parse(value)
                    .map_err(|source| ConfigError::Device { arg: arg(), source })?,
            ),
            VmOption::Viommu => {
                c.viommu = ViommuOptions::parse(value)
                    .map_err(|source| ConfigError::Viommu { arg: arg(), source })?
            }
            VmOption::Serial => {
                c.serial = SerialOutput::parse(value)
                    .map_err(|source| ConfigError::Serial { arg: arg(), source })?
            }
            VmOption::Seccomp => {
                c.seccomp = parse_seccomp(value)
                    .map_err(|source| ConfigError::Seccomp { arg: arg(), source })?
            }
            VmOption::LogLevel => {
                c.log_level =
                    parse_log_level(value).ok_or_else(|| ConfigError::LogLevel { arg: arg() })?
            }
        }
        Ok(())
    }

    /// The seccomp mode given so far.
    pub fn seccomp(&self) -> SeccompMode {
        self.config.seccomp
    }

    /// The configuration, once `--kernel` was given and [`VmConfig::validate`] passes.
    pub fn build(self) -> Result<VmConfig, ConfigError> {
        let config = VmConfig {
            kernel: self.kernel.ok_or(ConfigError::NoKernel)?,
            ..self.config
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    fn build(opts: &[(VmOption, &str)]) -> Result<VmConfig, ConfigError> {
        let mut b = VmConfigBuilder::new(None);
        for (o, v) in opts {
            b.set(*o, v)?;
        }
        b.build()
    }

    #[test]
    fn flags_round_trip() {
        for o in VmOption::ALL {
            assert_eq!(VmOption::from_flag(o.flag()), Some(o));
        }
        assert_eq!(VmOption::from_flag("--seccomp-selftest"), None);
        assert_eq!(VmOption::from_flag("disk"), None);
    }

    #[test]
    fn defaults() {
        let c = build(&[(VmOption::Kernel, "/k")]).unwrap();
        assert_eq!(c, VmConfig::new("/k".into()));
        assert_eq!(c.memory, 512 << 20);
        assert_eq!(c.cpus, 2);
        assert_eq!(c.seccomp, SeccompMode::On);
        assert_eq!(c.log_level, LevelFilter::Warn);
        let b = |env| VmConfigBuilder::new(env).config.log_level;
        assert_eq!(b(Some("debug")), LevelFilter::Debug);
        assert_eq!(b(Some("TRACE")), LevelFilter::Trace);
        assert_eq!(b(Some("vmm=debug")), LevelFilter::Warn);
        // An empty kernel path is a path (the boot fails on it), not a missing --kernel.
        assert_eq!(
            build(&[(VmOption::Kernel, "")]).unwrap().kernel,
            PathBuf::new()
        );
    }

    #[test]
    fn repeated_options_add_devices_or_replace_values() {
        let c = build(&[
            (VmOption::Kernel, "/a"),
            (VmOption::Kernel, "/b"),
            (VmOption::Disk, "path=/d1"),
            (VmOption::Disk, "path=/d2,iommu=on"),
            (VmOption::Viommu, "virtio"),
            (VmOption::Viommu, "off"),
            (VmOption::Viommu, "virtio,bypass=0"),
            (VmOption::Memory, "1G"),
            (VmOption::Memory, "2G"),
            (VmOption::Net, "hub=0"),
            (VmOption::Device, "path=/sys/x"),
        ])
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("/b"));
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.nets.len(), 1);
        assert_eq!(c.devices.len(), 1);
        assert_eq!(c.memory, 2 << 30);
        assert!(!c.viommu.unwrap().bypass);
    }

    #[test]
    fn errors_name_the_option_and_keep_their_cause() {
        let e = |o, v: &str| {
            let mut b = VmConfigBuilder::new(None);
            b.set(o, v).unwrap_err()
        };
        let d = e(VmOption::Disk, "path=x,readonly=maybe");
        assert_eq!(d.to_string(), "--disk: readonly=maybe: expected on or off");
        assert_eq!(
            d,
            ConfigError::Disk {
                arg: "path=x,readonly=maybe".into(),
                source: OptionError::Invalid {
                    key: "readonly".into(),
                    value: "maybe".into(),
                    expected: "on or off"
                }
            }
        );
        assert_eq!(
            d.source().map(|s| s.to_string()),
            Some("readonly=maybe: expected on or off".to_string())
        );
        let m = e(VmOption::Memory, "lots");
        assert_eq!(m.to_string(), "--memory: bad size 'lots'");
        assert!(matches!(
            m,
            ConfigError::Memory {
                source: SizeError::Number(_),
                ..
            }
        ));
        assert!(m.source().and_then(|s| s.source()).is_some());
        for (o, v, msg) in [
            (VmOption::Cpus, "0", "--cpus: expected 1..254, got '0'"),
            (VmOption::Cpus, "255", "--cpus: expected 1..254, got '255'"),
            (VmOption::Cpus, "two", "--cpus: expected 1..254, got 'two'"),
            (VmOption::Memory, "", "--memory: bad size ''"),
            (
                VmOption::Serial,
                "tty",
                "--serial: expected stdout or file=PATH, got 'tty'",
            ),
            (
                VmOption::Seccomp,
                "strict",
                "--seccomp: expected off, log or on, got 'strict'",
            ),
            (VmOption::LogLevel, "loud", "--log-level: bad level 'loud'"),
            (
                VmOption::Net,
                "hub",
                "--net: net option 'hub' is not key=value",
            ),
            (
                VmOption::Device,
                "iommu=on",
                "--device: path=/sys/bus/pci/devices/BDF is required",
            ),
            (
                VmOption::Viommu,
                "virtio,poll=-1",
                "--viommu: poll=-1: expected microseconds, 0..=1000000",
            ),
        ] {
            assert_eq!(e(o, v).to_string(), msg);
        }
        assert_eq!(parse_cpus("254"), Ok(254));
        assert_eq!(parse_cpus("1"), Ok(1));
    }

    #[test]
    fn modes_parse() {
        assert_eq!(parse_seccomp("on"), Ok(SeccompMode::On));
        assert_eq!(parse_seccomp("log"), Ok(SeccompMode::Log));
        assert_eq!(parse_seccomp("off"), Ok(SeccompMode::Off));
        assert!(parse_seccomp("strict").is_err());
    }

    #[test]
    fn iommu_devices_need_a_viommu() {
        assert_eq!(
            build(&[(VmOption::Disk, "path=/d,iommu=on")]).unwrap_err(),
            ConfigError::NoKernel
        );
        let k = (VmOption::Kernel, "/k");
        let msg = |opts: &[(VmOption, &str)]| build(opts).unwrap_err().to_string();
        assert_eq!(
            msg(&[k, (VmOption::Disk, "path=/d,iommu=on")]),
            "--disk path=/d,iommu=on: the disk must sit behind a vIOMMU, add --viommu virtio"
        );
        assert_eq!(
            msg(&[k, (VmOption::Net, "hub=0,iommu=on")]),
            "--net ...,iommu=on: the port must sit behind a vIOMMU, add --viommu virtio"
        );
        assert_eq!(
            msg(&[k, (VmOption::Device, "path=/x,iommu=on")]),
            "--device path=/x,iommu=on: the device must sit behind a vIOMMU, add --viommu \
             virtio"
        );
        // Disks are named first, then ports, then VFIO devices.
        assert!(matches!(
            build(&[
                k,
                (VmOption::Device, "path=/x,iommu=on"),
                (VmOption::Net, "hub=0,iommu=on"),
                (VmOption::Disk, "path=/d,iommu=on"),
            ]),
            Err(ConfigError::DiskNeedsViommu { .. })
        ));
        assert!(build(&[
            k,
            (VmOption::Device, "path=/x,iommu=on"),
            (VmOption::Net, "hub=0,iommu=on"),
            (VmOption::Disk, "path=/d,iommu=on"),
            (VmOption::Viommu, "virtio"),
        ])
        .is_ok());
    }

    /// Every option value comes from the user: mangled values are errors, never panics.
    #[test]
    fn mangled_values_never_panic() {
        let seeds = [
            "path=/a/b.img,readonly=on,iommu=on,notify=thread,indirect=off",
            "tap=tap0,mac=52:54:00:12:34:56,iommu=on",
            "hub=0,mac=52:54:00:ab:cd:ef",
            "path=/sys/bus/pci/devices/0000:00:18.0,iommu=on",
            "virtio,bypass=0,max-domains=8,max-mappings=4096,poll=250",
            "512M",
            "file=/tmp/s",
            "254",
        ];
        let alphabet = [
            ",", "=", ":", "", "0", "k", "G", "-", "é", "\u{0}", " ", "ff",
        ];
        let mut tried = 0usize;
        for seed in seeds {
            let cuts: Vec<usize> = (0..=seed.len())
                .filter(|&i| seed.is_char_boundary(i))
                .collect();
            for (n, &i) in cuts.iter().enumerate() {
                for a in alphabet {
                    // Insert `a` at i, and replace the character at i by `a`.
                    let next = cuts.get(n + 1).copied().unwrap_or(seed.len());
                    for v in [
                        format!("{}{a}{}", &seed[..i], &seed[i..]),
                        format!("{}{a}{}", &seed[..i], &seed[next..]),
                    ] {
                        for o in VmOption::ALL {
                            let mut b = VmConfigBuilder::new(None);
                            let _ = b.set(o, &v);
                            tried += 1;
                        }
                    }
                }
            }
        }
        assert!(tried > 10_000, "{tried}");
    }
}
