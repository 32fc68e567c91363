//! The VMM's typed configuration: every command-line option family parsed into a value of its
//! own ([`BlockConfig`], [`NetConfig`], [`VfioDeviceConfig`], [`ViommuOptions`], sizes) and
//! gathered into one [`VmConfig`]. `cli` turns argv into a `VmConfig` through this module only;
//! the devices and the machine builder take the typed values.
//!
//! The `key=value[,key=value]` lists share one reader ([`options`]); each family's errors are
//! an [`OptionError`], wrapped in a [`ConfigError`] that names the option. A `ConfigError`'s
//! `Display` is the whole one-line message for the user (the option, then its cause), and
//! `source()` gives the typed cause.

pub mod device;
pub mod disk;
pub mod net;
pub mod options;
pub mod size;
pub mod viommu;
pub mod watchdog;

use std::path::PathBuf;

use log::LevelFilter;

use crate::seccomp::SeccompMode;

pub use device::VfioDeviceConfig;
pub use disk::BlockConfig;
pub use net::{NetBackendConfig, NetConfig};
pub use options::OptionError;
pub use size::{parse_cpus, parse_size, CpusError, SizeError};
pub use viommu::{IommuChoice, ViommuOptions, VtdOptions};
pub use watchdog::{WatchdogOptions, WATCHDOG_ENV};

/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Default guest RAM (512 MiB).
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// Default vCPU count.
pub const DEFAULT_CPUS: u8 = 2;

/// Where the guest's serial output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's stdout.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
}

impl SerialOutput {
    /// Parse `stdout` or `file=PATH` (`None` for anything else).
    pub fn parse(s: &str) -> Option<SerialOutput> {
        if s == "stdout" {
            Some(SerialOutput::Stdout)
        } else {
            s.strip_prefix("file=")
                .filter(|p| !p.is_empty())
                .map(|p| SerialOutput::File(p.into()))
        }
    }
}

/// Everything needed to boot a guest.
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
    pub disks: Vec<BlockConfig>,
    /// virtio-net ports (`--net`), plugged after the disks.
    pub nets: Vec<NetConfig>,
    /// Host PCI functions passed through with VFIO, plugged after the disks.
    pub devices: Vec<VfioDeviceConfig>,
    /// The guest-visible virtio-iommu (`None`: none; `iommu=on` devices then need `vtd`).
    pub viommu: Option<ViommuOptions>,
    /// The emulated Intel VT-d (`--viommu vtd`; never together with `viommu`).
    pub vtd: Option<VtdOptions>,
    /// Serial output.
    pub serial: SerialOutput,
    /// seccomp filters on every VMM thread once the machine is built (`--seccomp`).
    pub seccomp: SeccompMode,
    /// Log level (`--log-level`, else `RUST_LOG`, else warn).
    pub log_level: LevelFilter,
    /// The hang watchdog (`--watchdog`, else `VMM_WATCHDOG`; `None`: off).
    pub watchdog: Option<WatchdogOptions>,
    /// The control socket (`--api-socket PATH`; see `vmm::snapshot::api`).
    pub api_socket: Option<PathBuf>,
    /// Restore the snapshot in this directory instead of booting (`--restore DIR`).
    pub restore: Option<PathBuf>,
}

impl VmConfig {
    /// A configuration booting `kernel` with every other option at its default.
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
            vtd: None,
            serial: SerialOutput::Stdout,
            seccomp: SeccompMode::On,
            log_level: LevelFilter::Warn,
            watchdog: None,
            api_socket: None,
            restore: None,
        }
    }

    /// Check the options against each other: an `iommu=on` disk, port or device needs a
    /// vIOMMU.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.viommu.is_some() && self.vtd.is_some() {
            return Err(ConfigError::TwoIommus);
        }
        if self.api_socket.is_some() && self.seccomp == SeccompMode::On {
            return Err(ConfigError::ApiSocketSeccomp);
        }
        if self.vtd.is_some() {
            if let Some(d) = self.devices.iter().find(|d| d.iommu) {
                return Err(ConfigError::DeviceBehindVtd(d.path.clone()));
            }
            return Ok(());
        }
        if self.viommu.is_some() {
            return Ok(());
        }
        if let Some(d) = self.disks.iter().find(|d| d.iommu) {
            return Err(ConfigError::DiskNeedsViommu(d.path.clone()));
        }
        if self.nets.iter().any(|n| n.iommu) {
            return Err(ConfigError::NetNeedsViommu);
        }
        if let Some(d) = self.devices.iter().find(|d| d.iommu) {
            return Err(ConfigError::DeviceNeedsViommu(d.path.clone()));
        }
        Ok(())
    }
}

/// Parse `--seccomp`: `off`, `log` or `on`.
pub fn parse_seccomp(s: &str) -> Result<SeccompMode, OptionError> {
    match s {
        "off" => Ok(SeccompMode::Off),
        "log" => Ok(SeccompMode::Log),
        "on" => Ok(SeccompMode::On),
        _ => Err(OptionError::Head {
            expected: "off, log or on",
            got: s.to_string(),
        }),
    }
}

/// Parse a log level: `off`, `error`, `warn`, `info`, `debug`, `trace` (any case).
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    s.parse().ok()
}

/// A command line the VMM refuses. The `Display` is the whole message (option and cause).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A word that is not an option.
    #[error("unexpected argument '{0}'")]
    Unexpected(String),
    /// An option the VMM does not know.
    #[error("unknown option '{0}'")]
    UnknownOption(String),
    /// An option given last without its value.
    #[error("{0} needs a value")]
    NeedsValue(String),
    /// No `--kernel`.
    #[error("--kernel is required")]
    NoKernel,
    /// `--memory`.
    #[error("--memory: {source}")]
    Memory {
        /// Why.
        #[source]
        source: SizeError,
    },
    /// `--cpus`.
    #[error("--cpus: {source}")]
    Cpus {
        /// Why.
        #[source]
        source: CpusError,
    },
    /// `--disk`.
    #[error("--disk: {source}")]
    Disk {
        /// The value as given.
        arg: String,
        /// Why.
        #[source]
        source: OptionError,
    },
    /// `--net`.
    #[error("--net: {source}")]
    Net {
        /// The value as given.
        arg: String,
        /// Why.
        #[source]
        source: OptionError,
    },
    /// `--device`.
    #[error("--device: {source}")]
    Device {
        /// The value as given.
        arg: String,
        /// Why.
        #[source]
        source: OptionError,
    },
    /// `--viommu`.
    #[error("--viommu: {source}")]
    Viommu {
        /// The value as given.
        arg: String,
        /// Why.
        #[source]
        source: OptionError,
    },
    /// `--watchdog` (or `VMM_WATCHDOG`).
    #[error("--watchdog: {source}")]
    Watchdog {
        /// The value as given.
        arg: String,
        /// Why.
        #[source]
        source: OptionError,
    },
    /// `--serial`.
    #[error("--serial: expected stdout or file=PATH, got '{0}'")]
    Serial(String),
    /// `--seccomp`.
    #[error("--seccomp: {source}")]
    Seccomp {
        /// Why.
        #[source]
        source: OptionError,
    },
    /// `--seccomp-selftest`.
    #[error("--seccomp-selftest: unknown thread kind '{0}'")]
    SelftestKind(String),
    /// `--log-level`.
    #[error("--log-level: bad level '{0}'")]
    LogLevel(String),
    /// An `iommu=on` disk without a vIOMMU.
    #[error(
        "--disk path={},iommu=on: the disk must sit behind a vIOMMU, add --viommu virtio",
        .0.display()
    )]
    DiskNeedsViommu(PathBuf),
    /// An `iommu=on` port without a vIOMMU.
    #[error("--net ...,iommu=on: the port must sit behind a vIOMMU, add --viommu virtio")]
    NetNeedsViommu,
    /// An `iommu=on` VFIO device without a vIOMMU.
    #[error(
        "--device path={},iommu=on: the device must sit behind a vIOMMU, add --viommu virtio",
        .0.display()
    )]
    DeviceNeedsViommu(PathBuf),
    /// `--device ...,iommu=on` with `--viommu vtd` (assigned devices behind VT-d are issue 15).
    #[error(
        "--device path={},iommu=on: VFIO devices behind --viommu vtd are not supported yet; \
         use --viommu virtio or iommu=off",
        .0.display()
    )]
    DeviceBehindVtd(PathBuf),
    /// Both a virtio-iommu and a VT-d (the configuration API allows it, the command line not).
    #[error("one vIOMMU at a time: virtio or vtd")]
    TwoIommus,
    /// `--api-socket` with `--seccomp on`: the control thread and the vCPU state ioctls have
    /// no filter rules yet.
    #[error("--api-socket needs --seccomp off or --seccomp log (no filter rules for the control socket yet)")]
    ApiSocketSeccomp,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn serial() {
        assert_eq!(SerialOutput::parse("stdout"), Some(SerialOutput::Stdout));
        assert_eq!(
            SerialOutput::parse("file=/tmp/s"),
            Some(SerialOutput::File("/tmp/s".into()))
        );
        for bad in ["", "tty", "file=", "stderr", "file"] {
            assert_eq!(SerialOutput::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!(parse_seccomp("on"), Ok(SeccompMode::On));
        assert_eq!(parse_seccomp("log"), Ok(SeccompMode::Log));
        assert_eq!(parse_seccomp("off"), Ok(SeccompMode::Off));
        assert!(parse_seccomp("strict").is_err());
        let e = ConfigError::Seccomp {
            source: parse_seccomp("On").unwrap_err(),
        };
        assert_eq!(
            e.to_string(),
            "--seccomp: expected off, log or on, got 'On'"
        );
        assert!(e.source().unwrap().is::<OptionError>());
    }

    #[test]
    fn levels() {
        assert_eq!(parse_level("debug"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("OFF"), Some(LevelFilter::Off));
        assert_eq!(parse_level("loud"), None);
    }

    #[test]
    fn vtd_refuses_vfio_behind_it_and_a_second_iommu() {
        let mut c = VmConfig::new("k".into());
        c.vtd = Some(VtdOptions::default());
        c.disks
            .push(BlockConfig::parse("path=/d,iommu=on").unwrap());
        assert!(c.validate().is_ok());
        c.devices
            .push(VfioDeviceConfig::parse("path=/x,iommu=on").unwrap());
        let e = c.validate().unwrap_err();
        assert!(matches!(e, ConfigError::DeviceBehindVtd(_)));
        assert_eq!(
            e.to_string(),
            "--device path=/x,iommu=on: VFIO devices behind --viommu vtd are not supported \
             yet; use --viommu virtio or iommu=off"
        );
        c.devices.clear();
        c.viommu = Some(ViommuOptions::default());
        assert!(matches!(c.validate(), Err(ConfigError::TwoIommus)));
    }

    #[test]
    fn iommu_on_needs_a_viommu() {
        let mut c = VmConfig::new("/k".into());
        assert!(c.validate().is_ok());
        c.nets.push(NetConfig::parse("hub=0,iommu=on").unwrap());
        assert!(matches!(c.validate(), Err(ConfigError::NetNeedsViommu)));
        c.disks
            .push(BlockConfig::parse("path=/d,iommu=on").unwrap());
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "--disk path=/d,iommu=on: the disk must sit behind a vIOMMU, add --viommu virtio"
        );
        c.viommu = Some(ViommuOptions::default());
        assert!(c.validate().is_ok());
        let mut c = VmConfig::new("/k".into());
        c.devices
            .push(VfioDeviceConfig::parse("path=/x,iommu=on").unwrap());
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "--device path=/x,iommu=on: the device must sit behind a vIOMMU, add --viommu virtio"
        );
    }

    #[test]
    fn errors_keep_their_source() {
        let source = BlockConfig::parse("path=x,bogus=1").unwrap_err();
        let e = ConfigError::Disk {
            arg: "path=x,bogus=1".into(),
            source: source.clone(),
        };
        assert_eq!(e.to_string(), "--disk: unknown disk option 'bogus=1'");
        let s = e.source().unwrap().downcast_ref::<OptionError>().unwrap();
        assert_eq!(s, &source);
        let e = ConfigError::Memory {
            source: parse_size("lots").unwrap_err(),
        };
        assert_eq!(e.to_string(), "--memory: bad size 'lots'");
        assert!(e.source().unwrap().is::<SizeError>());
    }

    /// Every option value comes from the user: each family's parser, given mangled versions of
    /// good values, returns a value or an error and never panics.
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
            "log",
        ];
        let pieces = [
            ",", "=", ":", "", "0", "k", "G", "-", "+", "é", "\u{0}", " ", "ff",
        ];
        let mut tried = 0usize;
        for seed in seeds {
            let cuts: Vec<usize> = (0..=seed.len())
                .filter(|&i| seed.is_char_boundary(i))
                .collect();
            for (n, &i) in cuts.iter().enumerate() {
                let next = cuts.get(n + 1).copied().unwrap_or(seed.len());
                for p in pieces {
                    // `p` inserted at i, and in place of the character at i.
                    for v in [
                        format!("{}{p}{}", &seed[..i], &seed[i..]),
                        format!("{}{p}{}", &seed[..i], &seed[next..]),
                    ] {
                        let _ = BlockConfig::parse(&v);
                        let _ = NetConfig::parse(&v);
                        let _ = VfioDeviceConfig::parse(&v);
                        let _ = ViommuOptions::parse(&v).map(|o| o.map(|o| o.config()));
                        let _ = IommuChoice::parse(&v);
                        let _ = parse_size(&v);
                        let _ = parse_cpus(&v);
                        let _ = SerialOutput::parse(&v);
                        let _ = parse_seccomp(&v);
                        let _ = parse_level(&v);
                        tried += 1;
                    }
                }
            }
        }
        assert!(tried > 5_000, "{tried}");
    }
}
