//! `--device path=/sys/bus/pci/devices/BDF[,iommu=on|off]`: a host PCI function passed
//! through with VFIO.

use std::path::PathBuf;

use super::options::{self, OptionError, ON_OFF};

/// One `--device`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// `/sys/bus/pci/devices/DDDD:BB:DD.F` of a function bound to vfio-pci.
    pub path: PathBuf,
    /// Behind the virtio-iommu (needs `--viommu virtio`); else the static full-RAM mapping.
    pub iommu: bool,
}

impl DeviceConfig {
    /// Parse `path=SYSFS[,iommu=on|off]`.
    pub fn parse(s: &str) -> Result<DeviceConfig, OptionError> {
        let mut path = None;
        let mut iommu = false;
        for item in options::items("option", s) {
            let item = item?;
            match item.key {
                "path" if !item.value.is_empty() => path = Some(PathBuf::from(item.value)),
                "iommu" => iommu = item.choice(ON_OFF, "on or off")?,
                _ => return Err(item.unknown()),
            }
        }
        let path = path.ok_or(OptionError::Missing(
            "path=/sys/bus/pci/devices/BDF is required",
        ))?;
        Ok(DeviceConfig { path, iommu })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_device_option() {
        let d = DeviceConfig::parse("path=/sys/bus/pci/devices/0000:00:18.0").unwrap();
        assert_eq!(d.path, PathBuf::from("/sys/bus/pci/devices/0000:00:18.0"));
        assert!(!d.iommu);
        let d = DeviceConfig::parse("path=/x,iommu=on").unwrap();
        assert!(d.iommu);
        assert!(!DeviceConfig::parse("iommu=off,path=/x").unwrap().iommu);
        for bad in [
            "",
            "path=",
            "/x",
            "path=/x,iommu=yes",
            "path=/x,frob=1",
            "iommu=on",
        ] {
            assert!(DeviceConfig::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_bad_value_class_has_its_message() {
        let e = |s: &str| DeviceConfig::parse(s).unwrap_err().to_string();
        assert_eq!(e("/x"), "option '/x' is not key=value");
        assert_eq!(e("path=/x,frob=1"), "unknown option 'frob=1'");
        assert_eq!(e("path="), "unknown option 'path='");
        // Only on and off: the other spellings --disk takes are refused here, as before.
        assert_eq!(e("path=/x,iommu=yes"), "iommu=yes: expected on or off");
        assert_eq!(e("path=/x,iommu=1"), "iommu=1: expected on or off");
        assert_eq!(e("iommu=on"), "path=/sys/bus/pci/devices/BDF is required");
    }
}
