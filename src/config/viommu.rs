//! `--viommu off|virtio[,bypass=0|1][,max-domains=N][,max-mappings=N][,poll=US]|
//! vtd[,aw=39|48][,max-domains=N][,max-mappings=N]`.

use viommu::vtd::caps::AddressWidth;
use viommu::vtd::unit::UnitConfig;
use viommu::ViommuConfig;

use super::options::{bad_value, pairs, unknown, OptionError};

/// Default request-queue polling window (see [`crate::devices::polled`]): off. A poller only
/// pays off with a spare host CPU; nested under TCG on two shared cores it made 4 KiB reads
/// 2-4x slower (the guest's vCPU waits while the poller's vCPU is descheduled).
pub const DEFAULT_POLL_US: u64 = 0;

/// The accepted forms of `--viommu`, as the error message names them.
const FORMS: &str = "off, virtio[,bypass=0|1][,max-domains=N][,max-mappings=N][,poll=US] or \
                     vtd[,aw=39|48][,max-domains=N][,max-mappings=N]";

/// `--viommu virtio[,bypass=0|1][,max-domains=N][,max-mappings=N][,poll=US]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViommuOptions {
    /// Initial `config.bypass`: endpoints not attached to a domain bypass translation (the
    /// spec's boot-bypass); with 0 they cannot DMA until the driver attaches them.
    pub bypass: bool,
    /// Cap on live domains (requests past it fail with NOMEM).
    pub max_domains: Option<usize>,
    /// Cap on mappings, per domain and in total (requests past it fail with NOMEM).
    pub max_mappings: Option<usize>,
    /// Keep polling the request queue this many microseconds after the last request, with
    /// driver kicks suppressed (0: serve only on kicks).
    pub poll_us: u64,
}

impl Default for ViommuOptions {
    fn default() -> Self {
        ViommuOptions {
            bypass: true,
            max_domains: None,
            max_mappings: None,
            poll_us: DEFAULT_POLL_US,
        }
    }
}

fn parse_count(key: &str, v: &str) -> Result<usize, OptionError> {
    v.parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| bad_value(key, v, "expected a positive number"))
}

impl ViommuOptions {
    /// Parse the value of `--viommu`: `off` gives `None`.
    pub fn parse(s: &str) -> Result<Option<ViommuOptions>, OptionError> {
        let (head, rest) = match s.split_once(',') {
            Some((h, r)) => (h, Some(r)),
            None => (s, None),
        };
        match (head, rest) {
            ("off", None) => return Ok(None),
            ("virtio", _) => {}
            _ => {
                return Err(OptionError::Head {
                    expected: FORMS,
                    got: s.to_string(),
                })
            }
        }
        let mut o = ViommuOptions::default();
        for kv in rest.into_iter().flat_map(|r| pairs("viommu", r)) {
            let (k, v) = kv?;
            match k {
                "bypass" => {
                    o.bypass = match v {
                        "1" | "on" => true,
                        "0" | "off" => false,
                        _ => return Err(bad_value(k, v, "expected 0 or 1")),
                    }
                }
                "max-domains" => o.max_domains = Some(parse_count(k, v)?),
                "max-mappings" => o.max_mappings = Some(parse_count(k, v)?),
                "poll" => {
                    o.poll_us = v
                        .parse::<u64>()
                        .ok()
                        .filter(|&n| n <= 1_000_000)
                        .ok_or_else(|| bad_value(k, v, "expected microseconds, 0..=1000000"))?
                }
                _ => return Err(unknown("viommu", k, v)),
            }
        }
        Ok(Some(o))
    }

    /// The device configuration: defaults (x86 MSI window reserved, 48-bit input range, 4 KiB
    /// granule) with these options applied.
    pub fn config(&self) -> ViommuConfig {
        let mut c = ViommuConfig {
            bypass: self.bypass,
            ..ViommuConfig::default()
        };
        if let Some(n) = self.max_domains {
            c.limits.max_domains = n;
        }
        if let Some(n) = self.max_mappings {
            c.limits.max_total_mappings = n;
            c.limits.max_mappings_per_domain = c.limits.max_mappings_per_domain.min(n);
        }
        c
    }
}

/// `--viommu vtd[,aw=39|48][,max-domains=N][,max-mappings=N]`: one emulated Intel VT-d
/// DMA-remapping unit (legacy mode, caching mode, no interrupt remapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdOptions {
    /// Maximum guest address width (MGAW; 48 also offers 39-bit tables).
    pub aw: AddressWidth,
    /// Cap on live domains (contexts past it are blocked).
    pub max_domains: Option<usize>,
    /// Cap on mappings, per domain and in total (runs past it stay unmapped).
    pub max_mappings: Option<usize>,
}

impl Default for VtdOptions {
    fn default() -> Self {
        VtdOptions {
            aw: AddressWidth::Bits48,
            max_domains: None,
            max_mappings: None,
        }
    }
}

impl VtdOptions {
    /// Parse the options after `vtd` (`None`: none given).
    fn parse(rest: Option<&str>) -> Result<VtdOptions, OptionError> {
        let mut o = VtdOptions::default();
        for kv in rest.into_iter().flat_map(|r| pairs("viommu", r)) {
            let (k, v) = kv?;
            match k {
                "aw" => {
                    o.aw = v
                        .parse::<u32>()
                        .ok()
                        .and_then(AddressWidth::from_bits)
                        .ok_or_else(|| bad_value(k, v, "expected 39 or 48"))?
                }
                "max-domains" => o.max_domains = Some(parse_count(k, v)?),
                "max-mappings" => o.max_mappings = Some(parse_count(k, v)?),
                _ => return Err(unknown("viommu", k, v)),
            }
        }
        Ok(o)
    }

    /// The unit's configuration: engine defaults with these caps applied.
    pub fn config(&self) -> UnitConfig {
        let mut c = UnitConfig {
            aw: self.aw,
            ..UnitConfig::default()
        };
        if let Some(n) = self.max_domains {
            c.limits.max_domains = n;
        }
        if let Some(n) = self.max_mappings {
            c.limits.max_total_mappings = n;
            c.limits.max_mappings_per_domain = c.limits.max_mappings_per_domain.min(n);
        }
        c
    }
}

/// What `--viommu` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IommuChoice {
    /// No vIOMMU.
    Off,
    /// A virtio-iommu.
    Virtio(ViommuOptions),
    /// An emulated Intel VT-d.
    Vtd(VtdOptions),
}

impl IommuChoice {
    /// Parse the value of `--viommu`.
    pub fn parse(s: &str) -> Result<IommuChoice, OptionError> {
        let (head, rest) = match s.split_once(',') {
            Some((h, r)) => (h, Some(r)),
            None => (s, None),
        };
        if head == "vtd" {
            return VtdOptions::parse(rest).map(IommuChoice::Vtd);
        }
        Ok(match ViommuOptions::parse(s)? {
            Some(o) => IommuChoice::Virtio(o),
            None => IommuChoice::Off,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_off_default_and_knobs() {
        assert_eq!(ViommuOptions::parse("off").unwrap(), None);
        assert_eq!(
            ViommuOptions::parse("virtio").unwrap(),
            Some(ViommuOptions::default())
        );
        let o = ViommuOptions::parse("virtio,bypass=0,max-domains=8,max-mappings=4096,poll=250")
            .unwrap()
            .unwrap();
        assert!(!o.bypass);
        assert_eq!(o.poll_us, 250);
        assert_eq!(o.max_domains, Some(8));
        assert_eq!(o.max_mappings, Some(4096));
        let c = o.config();
        assert!(!c.bypass);
        assert_eq!(c.limits.max_domains, 8);
        assert_eq!(c.limits.max_total_mappings, 4096);
        assert_eq!(c.limits.max_mappings_per_domain, 4096);
        assert!(c.validate().is_ok());
        assert!(ViommuOptions::default().config().bypass);
    }

    #[test]
    fn parse_errors() {
        for bad in [
            "",
            "on",
            "intel",
            "off,bypass=1",
            "virtio,bypass=2",
            "virtio,bypass",
            "virtio,max-domains=0",
            "virtio,max-mappings=-1",
            "virtio,max-mappings=lots",
            "virtio,frob=1",
            "virtio,poll=-1",
            "virtio,poll=2000000",
        ] {
            assert!(ViommuOptions::parse(bad).is_err(), "{bad:?} must fail");
        }
    }

    #[test]
    fn error_messages() {
        let e = |s: &str| ViommuOptions::parse(s).unwrap_err().to_string();
        assert_eq!(
            e("off,bypass=1"),
            "expected off, virtio[,bypass=0|1][,max-domains=N][,max-mappings=N][,poll=US] or \
             vtd[,aw=39|48][,max-domains=N][,max-mappings=N], got 'off,bypass=1'"
        );
        assert_eq!(
            e("virtio,bypass"),
            "viommu option 'bypass' is not key=value"
        );
        assert_eq!(e("virtio,"), "viommu option '' is not key=value");
        assert_eq!(e("virtio,frob=1"), "unknown viommu option 'frob=1'");
        assert_eq!(e("virtio,bypass=2"), "bypass=2: expected 0 or 1");
        assert_eq!(
            e("virtio,max-domains=0"),
            "max-domains=0: expected a positive number"
        );
        assert_eq!(
            e("virtio,poll=2000000"),
            "poll=2000000: expected microseconds, 0..=1000000"
        );
        assert!(
            !ViommuOptions::parse("virtio,bypass=off")
                .unwrap()
                .unwrap()
                .bypass
        );
    }

    #[test]
    fn vtd_options() {
        let p = |s: &str| IommuChoice::parse(s);
        assert_eq!(p("vtd").unwrap(), IommuChoice::Vtd(VtdOptions::default()));
        assert_eq!(p("off").unwrap(), IommuChoice::Off);
        assert_eq!(
            p("virtio").unwrap(),
            IommuChoice::Virtio(ViommuOptions::default())
        );
        let IommuChoice::Vtd(o) = p("vtd,aw=39,max-domains=4,max-mappings=100").unwrap() else {
            panic!("vtd")
        };
        assert_eq!(
            o,
            VtdOptions {
                aw: AddressWidth::Bits39,
                max_domains: Some(4),
                max_mappings: Some(100)
            }
        );
        let c = o.config();
        assert_eq!(c.aw, AddressWidth::Bits39);
        assert_eq!(c.limits.max_domains, 4);
        assert_eq!(c.limits.max_total_mappings, 100);
        assert_eq!(c.limits.max_mappings_per_domain, 100);
        assert_eq!(VtdOptions::default().config().aw, AddressWidth::Bits48);
        let e = |s: &str| p(s).unwrap_err().to_string();
        assert_eq!(e("vtd,aw=57"), "aw=57: expected 39 or 48");
        assert_eq!(e("vtd,aw=x"), "aw=x: expected 39 or 48");
        assert_eq!(e("vtd,bypass=1"), "unknown viommu option 'bypass=1'");
        assert_eq!(e("vtd,poll=10"), "unknown viommu option 'poll=10'");
        assert_eq!(
            e("vtd,max-domains=0"),
            "max-domains=0: expected a positive number"
        );
        assert_eq!(e("vtd,"), "viommu option '' is not key=value");
        assert!(e("intel").starts_with("expected off, virtio"));
        assert!(p("vtdx").is_err());
    }
}
