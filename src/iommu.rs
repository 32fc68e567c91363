//! The guest-visible IOMMU as the VMM configures it: `--viommu` options, the
//! [`viommu::ViommuConfig`] they produce, and the counters line printed at exit.

use viommu::{CounterSnapshot, Status, ViommuConfig};

/// Default request-queue polling window (see [`crate::devices::polled`]): off. A poller only
/// pays off with a spare host CPU; nested under TCG on two shared cores it made 4 KiB reads
/// 2-4x slower (the guest's vCPU waits while the poller's vCPU is descheduled).
pub const DEFAULT_POLL_US: u64 = 0;

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

fn parse_count(key: &str, v: &str) -> Result<usize, String> {
    v.parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or(format!("{key}={v}: expected a positive number"))
}

impl ViommuOptions {
    /// Parse the value of `--viommu`: `off` gives `None`.
    pub fn parse(s: &str) -> Result<Option<ViommuOptions>, String> {
        let mut parts = s.split(',');
        match parts.next() {
            Some("off") if s == "off" => return Ok(None),
            Some("virtio") => {}
            _ => {
                return Err(format!(
                    "expected off or virtio[,bypass=0|1][,max-domains=N][,max-mappings=N]\
                     [,poll=US], got '{s}'"
                ))
            }
        }
        let mut o = ViommuOptions::default();
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("viommu option '{part}' is not key=value"))?;
            match k {
                "bypass" => {
                    o.bypass = match v {
                        "1" | "on" => true,
                        "0" | "off" => false,
                        _ => return Err(format!("bypass={v}: expected 0 or 1")),
                    }
                }
                "max-domains" => o.max_domains = Some(parse_count(k, v)?),
                "max-mappings" => o.max_mappings = Some(parse_count(k, v)?),
                "poll" => {
                    o.poll_us = v
                        .parse::<u64>()
                        .ok()
                        .filter(|&n| n <= 1_000_000)
                        .ok_or(format!("poll={v}: expected microseconds, 0..=1000000"))?
                }
                _ => return Err(format!("unknown viommu option '{part}'")),
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

/// Lower-case names of the error statuses, in wire order (status 1..).
const ERROR_NAMES: [&str; Status::COUNT - 1] = [
    "ioerr", "unsupp", "deverr", "inval", "range", "noent", "fault", "nomem",
];

/// The one-line counters summary printed on stderr at exit, e.g.
/// `viommu: maps=12 unmaps=10 attaches=1 detaches=0 probes=1 faults=0 faults_delivered=0
/// faults_dropped=0 malformed=0 errors=0 ioerr=0 unsupp=0 deverr=0 inval=0 range=0 noent=0
/// fault=0 nomem=0` (one line).
pub fn summary_line(s: &CounterSnapshot) -> String {
    let mut line = format!(
        "viommu: maps={} unmaps={} attaches={} detaches={} probes={} faults={} \
         faults_delivered={} faults_dropped={} malformed={} errors={}",
        s.maps,
        s.unmaps,
        s.attaches,
        s.detaches,
        s.probes,
        s.faults,
        s.faults_delivered,
        s.faults_dropped,
        s.malformed,
        s.errors()
    );
    for (name, n) in ERROR_NAMES.iter().zip(s.statuses.iter().skip(1)) {
        line.push_str(&format!(" {name}={n}"));
    }
    line
}

/// Parse a [`summary_line`] back into `name -> value` pairs (for tests reading the VMM log).
pub fn parse_summary(line: &str) -> Option<Vec<(String, u64)>> {
    let rest = line.trim().strip_prefix("viommu: ")?;
    rest.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
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
    fn summary_round_trips() {
        let mut s = CounterSnapshot {
            maps: 7,
            unmaps: 5,
            attaches: 2,
            detaches: 1,
            probes: 1,
            faults: 3,
            faults_delivered: 2,
            faults_dropped: 1,
            malformed: 0,
            ..CounterSnapshot::default()
        };
        s.statuses[Status::Ok as usize] = 14;
        s.statuses[Status::Range as usize] = 2;
        s.statuses[Status::NoMem as usize] = 1;
        let line = summary_line(&s);
        assert!(!line.contains('\n'));
        let kv = parse_summary(&line).unwrap();
        let get = |k: &str| kv.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        assert_eq!(get("maps"), Some(7));
        assert_eq!(get("unmaps"), Some(5));
        assert_eq!(get("attaches"), Some(2));
        assert_eq!(get("detaches"), Some(1));
        assert_eq!(get("faults"), Some(3));
        assert_eq!(get("errors"), Some(3));
        assert_eq!(get("range"), Some(2));
        assert_eq!(get("nomem"), Some(1));
        assert_eq!(get("inval"), Some(0));
        assert_eq!(parse_summary("virtio-iommu: maps=1"), None);
    }
}
