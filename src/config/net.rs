//! `--net tap=NAME|hub=ID[,mac=52:54:00:12:34:56][,iommu=on]`: a virtio-net port.

use super::options::{self, OptionError};

/// Longest TAP interface name plus its NUL (the kernel's IFNAMSIZ).
const IFNAMSIZ: usize = 16;

/// Where a port's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackendConfig {
    /// A TAP interface of this name.
    Tap(String),
    /// An in-process hub of this name.
    Hub(String),
}

/// One `--net`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Backend.
    pub backend: NetBackendConfig,
    /// MAC address (`None`: generated).
    pub mac: Option<[u8; 6]>,
    /// Put the device behind the vIOMMU (offers VIRTIO_F_ACCESS_PLATFORM).
    pub iommu: bool,
}

/// Why a `mac=` value is not a unicast Ethernet address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// Not six `:`-separated parts.
    #[error("expected six hex bytes a:b:c:d:e:f")]
    Length,
    /// A part that is not one or two hex digits.
    #[error("bad byte '{0}'")]
    Byte(String),
    /// The group bit is set.
    #[error("multicast address")]
    Multicast,
}

/// Parse `a:b:c:d:e:f` (hex bytes, unicast).
pub fn parse_mac(v: &str) -> Result<[u8; 6], MacError> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() != mac.len() {
        return Err(MacError::Length);
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| !p.is_empty() && p.len() <= 2)
            .ok_or_else(|| MacError::Byte(p.to_string()))?;
    }
    if mac[0] & 1 != 0 {
        return Err(MacError::Multicast);
    }
    Ok(mac)
}

impl NetConfig {
    /// Parse `tap=NAME|hub=ID[,mac=52:54:00:12:34:56][,iommu=on]`.
    pub fn parse(s: &str) -> Result<NetConfig, OptionError> {
        let mut backend = None;
        let mut mac = None;
        let mut iommu = false;
        let mut set = |b: NetBackendConfig| match backend.replace(b) {
            Some(_) => Err(OptionError::Conflict("net: give one of tap= or hub=")),
            None => Ok(()),
        };
        for item in options::items("net option", s) {
            let item = item?;
            match item.key {
                "tap" if !item.value.is_empty() && item.value.len() < IFNAMSIZ => {
                    set(NetBackendConfig::Tap(item.value.into()))?
                }
                "hub" if !item.value.is_empty() => set(NetBackendConfig::Hub(item.value.into()))?,
                "mac" => {
                    mac = Some(parse_mac(item.value).map_err(|source| OptionError::Mac {
                        value: item.value.to_string(),
                        source,
                    })?)
                }
                "iommu" => iommu = item.switch()?,
                _ => return Err(item.unknown()),
            }
        }
        Ok(NetConfig {
            backend: backend.ok_or(OptionError::Missing("net needs tap=NAME or hub=ID"))?,
            mac,
            iommu,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_options_parse() {
        let c = NetConfig::parse("hub=0,mac=52:54:00:ab:cd:ef,iommu=on").unwrap();
        assert_eq!(c.backend, NetBackendConfig::Hub("0".into()));
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert!(c.iommu);
        let t = NetConfig::parse("tap=tap0").unwrap();
        assert_eq!(
            (t.backend, t.mac, t.iommu),
            (NetBackendConfig::Tap("tap0".into()), None, false)
        );
        for bad in [
            "",
            "mac=52:54:00:00:00:01",
            "hub=0,tap=t",
            "hub=0,mac=01:00:00:00:00:00",
            "hub=0,mac=1:2:3",
            "hub=0,mac=zz:00:00:00:00:00",
            "tap=averyveryverylongname",
            "hub=0,iommu=maybe",
            "hub=0,speed=10",
        ] {
            assert!(NetConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_bad_value_class_has_its_message() {
        let e = |s: &str| NetConfig::parse(s).unwrap_err().to_string();
        assert_eq!(e("hub"), "net option 'hub' is not key=value");
        assert_eq!(e("hub=0,frob=1"), "unknown net option 'frob=1'");
        assert_eq!(e("tap="), "unknown net option 'tap='");
        // IFNAMSIZ: 15 characters fit, 16 do not.
        assert!(NetConfig::parse("tap=abcdefghijklmno").is_ok());
        assert_eq!(
            e("tap=abcdefghijklmnop"),
            "unknown net option 'tap=abcdefghijklmnop'"
        );
        assert_eq!(e("tap=a,hub=b"), "net: give one of tap= or hub=");
        assert_eq!(e("hub=a,hub=b"), "net: give one of tap= or hub=");
        assert_eq!(e("mac=52:54:00:00:00:01"), "net needs tap=NAME or hub=ID");
        assert_eq!(e("hub=0,iommu=maybe"), "iommu=maybe: expected on or off");
        assert_eq!(
            e("hub=0,mac=52:54:00:00:01"),
            "mac=52:54:00:00:01: expected six hex bytes a:b:c:d:e:f"
        );
        assert_eq!(
            e("hub=0,mac=52:54:00:00:00:zz"),
            "mac=52:54:00:00:00:zz: bad byte 'zz'"
        );
        assert_eq!(
            e("hub=0,mac=52:54::00:00:01"),
            "mac=52:54::00:00:01: bad byte ''"
        );
        assert_eq!(
            e("hub=0,mac=52:54:00:00:00:123"),
            "mac=52:54:00:00:00:123: bad byte '123'"
        );
        assert_eq!(
            e("hub=0,mac=53:54:00:00:00:01"),
            "mac=53:54:00:00:00:01: multicast address"
        );
        assert!(matches!(
            NetConfig::parse("hub=0,mac=01:00:5e:00:00:01"),
            Err(OptionError::Mac {
                source: MacError::Multicast,
                ..
            })
        ));
    }
}
