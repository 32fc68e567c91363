//! Guest-side counters of one block device, read before and after a timed run so that the same
//! per-I/O figures exist for every VMM: requests the block layer completed
//! (`/sys/block/DEV/stat`), the device's interrupts (`/proc/interrupts`), and the hits of the
//! kprobe histograms the bench script sets up under `events/rig/` in tracefs: virtio-pci
//! notifications (`vp_notify`: kicks of any virtqueue), virtio-iommu MAP and UNMAP requests
//! (`viommu_map_pages`, `viommu_unmap_pages`) and request-queue syncs (`__viommu_sync_req`:
//! one kick of the vIOMMU each); behind a VT-d, intel-iommu's map and unmap calls
//! (`intel_iommu_map_pages`, `intel_iommu_unmap_pages`) and queued-invalidation submissions
//! (`qi_submit_sync`: one IQT write, the VT-d's kick, each).

use std::collections::BTreeMap;

/// The tracefs directory of the bench's kprobe events.
pub const RIG_EVENTS: &str = "/sys/kernel/tracing/events/rig";

/// The kprobe events read (name under [`RIG_EVENTS`]).
pub const EVENTS: [&str; 7] = [
    "vp_notify",
    "viommu_map",
    "viommu_unmap",
    "viommu_sync",
    "vtd_map",
    "vtd_unmap",
    "vtd_qi",
];

/// Counter name -> value at one moment.
pub type Counters = BTreeMap<String, u64>;

/// Read and write requests completed by the block layer, from `/sys/block/DEV/stat`
/// (fields 1 and 5), and sectors read (field 3).
pub fn parse_block_stat(text: &str) -> Option<(u64, u64)> {
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|w| w.parse().ok())
        .collect::<Option<_>>()?;
    Some((f.first()? + f.get(4)?, *f.get(2)?))
}

/// The interrupts of `/proc/interrupts` lines whose name is `name` or starts with `name-`
/// (e.g. `virtio1-req.0`), summed over CPUs.
pub fn parse_interrupts(text: &str, name: &str) -> u64 {
    let prefix = format!("{name}-");
    text.lines()
        .filter(|l| {
            l.split_whitespace()
                .last()
                .is_some_and(|n| n == name || n.starts_with(&prefix))
        })
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// `Hits: N` of a tracefs histogram.
pub fn parse_hist_hits(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Hits:")?.trim().parse().ok())
}

/// The virtio device name (`virtioN`) behind block device `dev`.
fn virtio_name(dev: &str) -> Option<String> {
    let p = std::fs::read_link(format!("/sys/block/{dev}/device")).ok()?;
    Some(p.file_name()?.to_string_lossy().into_owned())
}

/// Every counter of `dev` now; what cannot be read is left out.
pub fn snapshot(dev: &str) -> Counters {
    let mut c = Counters::new();
    if let Some((reqs, sectors)) = std::fs::read_to_string(format!("/sys/block/{dev}/stat"))
        .ok()
        .as_deref()
        .and_then(parse_block_stat)
    {
        c.insert("reqs".into(), reqs);
        c.insert("sectors".into(), sectors);
    }
    if let (Some(name), Ok(text)) = (
        virtio_name(dev),
        std::fs::read_to_string("/proc/interrupts"),
    ) {
        c.insert("irqs".into(), parse_interrupts(&text, &name));
    }
    for e in EVENTS {
        if let Some(n) = std::fs::read_to_string(format!("{RIG_EVENTS}/{e}/hist"))
            .ok()
            .as_deref()
            .and_then(parse_hist_hits)
        {
            c.insert(e.into(), n);
        }
    }
    c
}

/// `acct_NAME=after-before` words for the result line, plus `acct_blk_kicks` (notifications
/// other than the vIOMMU's: the disk is the only busy virtio device).
pub fn delta_words(before: &Counters, after: &Counters) -> String {
    let mut d = BTreeMap::new();
    for (k, &a) in after {
        if let Some(&b) = before.get(k) {
            d.insert(k.as_str(), a.saturating_sub(b));
        }
    }
    let mut out = String::new();
    for (k, v) in &d {
        out.push_str(&format!(" acct_{k}={v}"));
    }
    if let Some(&n) = d.get("vp_notify") {
        let iommu = d.get("viommu_sync").copied().unwrap_or(0);
        out.push_str(&format!(" acct_blk_kicks={}", n.saturating_sub(iommu)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_stat_fields() {
        let s = "    1234        5    98765      100        7        0       56        3        0      200      103        0        0        0        0        0        0\n";
        assert_eq!(parse_block_stat(s), Some((1241, 98765)));
        assert_eq!(parse_block_stat("1 2"), None);
        assert_eq!(parse_block_stat("a b c d e"), None);
    }

    #[test]
    fn interrupts_of_one_device() {
        let s = "           CPU0       CPU1\n\
             24:         10          2  PCI-MSIX-0000:00:02.0   0-edge      virtio0-config\n\
             25:       1000        500  PCI-MSIX-0000:00:02.0   1-edge      virtio0-req.0\n\
             26:         77          0  PCI-MSIX-0000:00:03.0   1-edge      virtio10-req.0\n\
             11:          5          0  IO-APIC  11-fasteoi   virtio1\n\
            LOC:      99999      88888  Local timer interrupts\n";
        assert_eq!(parse_interrupts(s, "virtio0"), 1512);
        assert_eq!(parse_interrupts(s, "virtio1"), 5);
        assert_eq!(parse_interrupts(s, "virtio9"), 0);
    }

    #[test]
    fn hist_hits_and_deltas() {
        let h = "# event histogram\n\n{ common_pid: 1 } hitcount: 3\n\nTotals:\n    Hits: 42\n    Entries: 1\n";
        assert_eq!(parse_hist_hits(h), Some(42));
        assert_eq!(parse_hist_hits("nothing"), None);
        let b: Counters = [("reqs", 10), ("vp_notify", 100), ("viommu_sync", 40)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let mut a = b.clone();
        a.insert("reqs".into(), 30);
        a.insert("vp_notify".into(), 200);
        a.insert("viommu_sync".into(), 90);
        a.insert("irqs".into(), 5);
        assert_eq!(
            delta_words(&b, &a),
            " acct_reqs=20 acct_viommu_sync=50 acct_vp_notify=100 acct_blk_kicks=50"
        );
    }
}
