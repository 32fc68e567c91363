//! The guest-visible IOMMU's counters line printed at exit (its `--viommu` options are
//! [`crate::config::ViommuOptions`]).

use viommu::{CounterSnapshot, Status};

/// Lower-case names of the error statuses, in wire order (status 1..).
const ERROR_NAMES: [&str; Status::COUNT - 1] = [
    "ioerr", "unsupp", "deverr", "inval", "range", "noent", "fault", "nomem",
];

/// The one-line counters summary printed on stderr at exit, e.g.
/// `viommu: maps=12 unmaps=10 attaches=1 detaches=0 probes=1 faults=0 faults_delivered=0
/// faults_dropped=0 malformed=0 errors=0 ioerr=0 unsupp=0 deverr=0 inval=0 range=0 noent=0
/// fault=0 nomem=0 kicks=9 interrupts=9` (one line; `kicks` are request-queue notifications
/// served, `interrupts` the request-queue interrupts signalled).
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
    line.push_str(&format!(" kicks={} interrupts={}", s.kicks, s.interrupts));
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
            kicks: 9,
            interrupts: 4,
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
        assert_eq!((get("kicks"), get("interrupts")), (Some(9), Some(4)));
        assert_eq!(parse_summary("virtio-iommu: maps=1"), None);
    }
}
