//! `--device path=/sys/bus/pci/devices/BDF[,iommu=on|off]` (VFIO passthrough).

use std::path::PathBuf;

use super::options::{on_off, pairs, unknown, OptionError};

/// One `--device` option: a host PCI function passed through with VFIO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfioDeviceConfig {
    /// `/sys/bus/pci/devices/DDDD:BB:DD.F` of a function bound to vfio-pci.
    pub path: PathBuf,
    /// Behind the virtio-iommu (needs `--viommu virtio`); else the static full-RAM mapping.
    pub iommu: bool,
}

impl VfioDeviceConfig {
    /// Parse `path=SYSFS[,iommu=on|off]`.
    pub fn parse(s: &str) -> Result<Self, OptionError> {
        let mut path = None;
        let mut iommu = false;
        for kv in pairs("", s) {
            let (k, v) = kv?;
            match k {
                "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
                "iommu" => iommu = on_off(k, v)?,
                _ => return Err(unknown("", k, v)),
            }
        }
        let path = path.ok_or(OptionError::Required(
            "path=/sys/bus/pci/devices/BDF is required",
        ))?;
        Ok(VfioDeviceConfig { path, iommu })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_device_option() {
        let d = VfioDeviceConfig::parse("path=/sys/bus/pci/devices/0000:00:18.0").unwrap();
        assert_eq!(d.path, PathBuf::from("/sys/bus/pci/devices/0000:00:18.0"));
        assert!(!d.iommu);
        let d = VfioDeviceConfig::parse("path=/x,iommu=on").unwrap();
        assert!(d.iommu);
        assert!(!VfioDeviceConfig::parse("iommu=off,path=/x").unwrap().iommu);
        for bad in [
            "",
            "path=",
            "/x",
            "path=/x,iommu=yes",
            "path=/x,frob=1",
            "iommu=on",
        ] {
            assert!(VfioDeviceConfig::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn device_error_messages() {
        let e = |s: &str| VfioDeviceConfig::parse(s).unwrap_err().to_string();
        assert_eq!(e("/x"), "option '/x' is not key=value");
        assert_eq!(e("path=/x,frob=1"), "unknown option 'frob=1'");
        assert_eq!(e("path="), "unknown option 'path='");
        assert_eq!(e("path=/x,iommu=yes"), "iommu=yes: expected on or off");
        assert_eq!(e("iommu=on"), "path=/sys/bus/pci/devices/BDF is required");
    }
}
