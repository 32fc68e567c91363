//! `--net tap=NAME|hub=ID[,mac=52:54:00:12:34:56][,iommu=on]`.

use super::options::{bad_value, pairs, switch, unknown, OptionError};

/// Where a port's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackendConfig {
    /// A TAP interface of this name.
    Tap(String),
    /// An in-process hub of this name.
    Hub(String),
}

/// `--net` options: one virtio-net port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Backend.
    pub backend: NetBackendConfig,
    /// MAC address (`None`: generated).
    pub mac: Option<[u8; 6]>,
    /// Put the device behind the vIOMMU (offers VIRTIO_F_ACCESS_PLATFORM).
    pub iommu: bool,
}

/// A unicast MAC address `a:b:c:d:e:f` (one or two hex digits per byte).
fn parse_mac(v: &str) -> Result<[u8; 6], OptionError> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() != 6 {
        return Err(bad_value("mac", v, "expected six hex bytes a:b:c:d:e:f"));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| !p.is_empty() && p.len() <= 2)
            .ok_or_else(|| bad_value("mac", v, format!("bad byte '{p}'")))?;
    }
    if mac[0] & 1 != 0 {
        return Err(bad_value("mac", v, "multicast address"));
    }
    Ok(mac)
}

impl NetConfig {
    /// Parse `tap=NAME|hub=ID[,mac=52:54:00:12:34:56][,iommu=on]`.
    pub fn parse(s: &str) -> Result<NetConfig, OptionError> {
        let mut backend = None;
        let mut mac = None;
        let mut iommu = false;
        let set = |b: &mut Option<NetBackendConfig>, n: NetBackendConfig| {
            if b.replace(n).is_some() {
                Err(OptionError::Required("net: give one of tap= or hub="))
            } else {
                Ok(())
            }
        };
        for kv in pairs("net", s) {
            let (k, v) = kv?;
            match k {
                "tap" if !v.is_empty() && v.len() < 16 => {
                    set(&mut backend, NetBackendConfig::Tap(v.into()))?
                }
                "hub" if !v.is_empty() => set(&mut backend, NetBackendConfig::Hub(v.into()))?,
                "mac" => mac = Some(parse_mac(v)?),
                "iommu" => iommu = switch(k, v)?,
                _ => return Err(unknown("net", k, v)),
            }
        }
        Ok(NetConfig {
            backend: backend.ok_or(OptionError::Required("net needs tap=NAME or hub=ID"))?,
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
    fn net_error_messages() {
        let e = |s: &str| NetConfig::parse(s).unwrap_err().to_string();
        assert_eq!(e(""), "net option '' is not key=value");
        assert_eq!(e("hub=0,speed=10"), "unknown net option 'speed=10'");
        assert_eq!(
            e("tap=averyveryverylongname"),
            "unknown net option 'tap=averyveryverylongname'"
        );
        assert_eq!(e("hub=0,tap=t"), "net: give one of tap= or hub=");
        assert_eq!(e("mac=52:54:00:00:00:01"), "net needs tap=NAME or hub=ID");
        assert_eq!(
            e("hub=0,mac=1:2:3"),
            "mac=1:2:3: expected six hex bytes a:b:c:d:e:f"
        );
        assert_eq!(
            e("hub=0,mac=zz:00:00:00:00:00"),
            "mac=zz:00:00:00:00:00: bad byte 'zz'"
        );
        assert_eq!(
            e("hub=0,mac=52:54::00:00:01"),
            "mac=52:54::00:00:01: bad byte ''"
        );
        assert_eq!(
            e("hub=0,mac=01:00:00:00:00:00"),
            "mac=01:00:00:00:00:00: multicast address"
        );
        assert_eq!(e("hub=0,iommu=maybe"), "iommu=maybe: expected on or off");
        assert!(NetConfig::parse("hub=h,iommu=yes").unwrap().iommu);
        assert_eq!(
            NetConfig::parse("tap=fifteen-chars").unwrap().backend,
            NetBackendConfig::Tap("fifteen-chars".into())
        );
    }
}
