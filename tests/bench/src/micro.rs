//! The criterion microbenchmarks' figures, read from `target/criterion/<group>/<N>/new/
//! estimates.json` (written by `cargo bench -p viommu --bench datapath`, `--bench vtd` and
//! `cargo bench --bench netpath`).

use std::path::Path;

/// One microbenchmark: its criterion directory, what it is, its target (ns) if it has one.
#[derive(Clone, Debug)]
pub struct MicroSpec {
    /// `<group>/<N>` under target/criterion.
    pub id: &'static str,
    /// What it measures, for the table.
    pub what: &'static str,
    /// The goal, in ns per iteration (lower is better).
    pub target_ns: Option<f64>,
}

/// Every microbenchmark the report shows.
pub const MICRO: &[MicroSpec] = &[
    MicroSpec {
        id: "map_unmap_request/1",
        what: "MAP or UNMAP request, queue to host mapper, 1 live mapping (ns/request)",
        target_ns: Some(1000.0),
    },
    MicroSpec {
        id: "map_unmap_request/1000",
        what: "MAP or UNMAP request, queue to host mapper, 1 000 live mappings (ns/request)",
        target_ns: Some(1000.0),
    },
    MicroSpec {
        id: "map_unmap_request/100000",
        what: "MAP or UNMAP request, queue to host mapper, 100 000 live mappings (ns/request)",
        target_ns: Some(1000.0),
    },
    MicroSpec {
        id: "translate_hit/1",
        what: "IOVA translation hit on the datapath, 1 live mapping (ns)",
        target_ns: Some(50.0),
    },
    MicroSpec {
        id: "translate_hit/1000",
        what: "IOVA translation hit on the datapath, 1 000 live mappings (ns)",
        target_ns: Some(50.0),
    },
    MicroSpec {
        id: "translate_hit/100000",
        what: "IOVA translation hit on the datapath, 100 000 live mappings (ns)",
        target_ns: Some(50.0),
    },
    MicroSpec {
        id: "translate_alternating/1",
        what: "translation alternating two far-apart mappings, 1 live mapping (ns)",
        target_ns: None,
    },
    MicroSpec {
        id: "translate_alternating/1000",
        what: "translation alternating two far-apart mappings, 1 000 live mappings (ns)",
        target_ns: None,
    },
    MicroSpec {
        id: "translate_alternating/100000",
        what: "translation alternating two far-apart mappings, 100 000 live mappings (ns)",
        target_ns: None,
    },
    MicroSpec {
        id: "read_u64/direct",
        what: "8-byte device read from guest-physical memory, no vIOMMU (ns)",
        target_ns: None,
    },
    MicroSpec {
        id: "read_u64/pinned",
        what: "8-byte device read through a pinned vIOMMU view (ns)",
        target_ns: None,
    },
    MicroSpec {
        id: "net_forward/direct/2",
        what: "virtio-net hub forwarding, burst of 2 64-byte frames, no vIOMMU (ns/burst)",
        target_ns: None,
    },
    MicroSpec {
        id: "net_forward/viommu/2",
        what: "virtio-net hub forwarding, burst of 2 64-byte frames, behind the vIOMMU \
               (ns/burst)",
        target_ns: None,
    },
    MicroSpec {
        id: "net_forward/direct/32",
        what: "virtio-net hub forwarding, burst of 32 64-byte frames, no vIOMMU (ns/burst)",
        target_ns: None,
    },
    MicroSpec {
        id: "net_forward/viommu/32",
        what: "virtio-net hub forwarding, burst of 32 64-byte frames, behind the vIOMMU \
               (ns/burst)",
        target_ns: None,
    },
    MicroSpec {
        id: "attach_replay/10000",
        what: "ATTACH of a host endpoint replaying 10 000 mappings (ns)",
        target_ns: None,
    },
    MicroSpec {
        id: "vtd_invalidation/psi_4k/1",
        what: "VT-d 4 KiB map or unmap: PTE write, PSI + wait, walk, diff, engine, publish; 1 live mapping (ns)",
        target_ns: None,
    },
    MicroSpec {
        id: "vtd_invalidation/psi_4k/10000",
        what: "VT-d 4 KiB map or unmap: PTE write, PSI + wait, walk, diff, engine, publish; 10 000 live mappings (ns)",
        target_ns: None,
    },
];

/// The `point_estimate` of the `stat` object ("median", "mean", ...) in a criterion
/// estimates.json.
pub fn point_estimate(json: &str, stat: &str) -> Option<f64> {
    let key = format!("\"{stat}\"");
    let start = json.find(&key)? + key.len();
    let rest = &json[start..];
    let pe = rest.find("\"point_estimate\"")? + "\"point_estimate\"".len();
    let rest = rest[pe..].trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok().filter(|v: &f64| v.is_finite())
}

/// The median (ns) of `id` under `criterion_dir`, if criterion wrote it.
pub fn median_ns(criterion_dir: &Path, id: &str) -> Option<f64> {
    let p = criterion_dir.join(id).join("new/estimates.json");
    let s = std::fs::read_to_string(p).ok()?;
    point_estimate(&s, "median")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_median_not_the_mean() {
        let j = r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":10.0,"upper_bound":12.0},"point_estimate":11.5,"standard_error":0.1},"median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":9.0,"upper_bound":10.0},"point_estimate":9.75e1,"standard_error":0.2},"median_abs_dev":null}"#;
        assert_eq!(point_estimate(j, "median"), Some(97.5));
        assert_eq!(point_estimate(j, "mean"), Some(11.5));
        assert_eq!(point_estimate(j, "slope"), None);
        assert_eq!(
            point_estimate("{\"median\":{\"point_estimate\":x}}", "median"),
            None
        );
    }

    #[test]
    fn missing_files_give_none() {
        assert_eq!(median_ns(Path::new("/nonexistent"), "a/1"), None);
    }
}
