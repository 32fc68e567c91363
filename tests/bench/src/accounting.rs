//! Per-I/O accounting: what one block request cost, from the counters our vmm prints at exit
//! (`blk: disk=..` and `viommu: ..` lines) and from the guest-side and L1-side counters the
//! workloads print (`acct_*=` fields of guest-bench, `L1-KVMSTAT` lines of rig-l1stat).

use std::collections::BTreeMap;

/// `key=value` words of a line (values that are not integers are skipped).
pub fn kv_map(line: &str) -> BTreeMap<String, u64> {
    line.split_whitespace()
        .filter_map(|w| {
            let (k, v) = w.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The totals of one vmm run, from its exit lines (every disk added up).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmmTotals {
    /// blk: request-queue services (kicks that reached the device).
    pub blk_kicks: u64,
    /// blk: requests completed.
    pub requests: u64,
    /// blk: descriptors of all chains.
    pub descriptors: u64,
    /// blk: data segments.
    pub segments: u64,
    /// blk: bytes moved (read + written).
    pub bytes: u64,
    /// blk: used-ring interrupts.
    pub blk_interrupts: u64,
    /// viommu: MAP requests (None without a vIOMMU line).
    pub maps: Option<u64>,
    /// viommu: UNMAP requests.
    pub unmaps: Option<u64>,
    /// viommu: request-queue kicks served.
    pub iommu_kicks: Option<u64>,
    /// viommu: request-queue interrupts.
    pub iommu_interrupts: Option<u64>,
    /// vtd: invalidations processed (queued descriptors and register-based ones).
    pub vtd_invalidations: Option<u64>,
    /// vtd: guest page-table entries read by the invalidation walks.
    pub vtd_walk_reads: Option<u64>,
}

impl VmmTotals {
    /// Reads the `blk:` and `viommu:` lines of a vmm log; `None` without any `blk:` line.
    pub fn parse(log: &str) -> Option<Self> {
        let mut t = VmmTotals::default();
        let mut any = false;
        for l in log.lines() {
            let l = l.trim();
            if let Some(rest) = l.strip_prefix("blk: ") {
                let m = kv_map(rest);
                let g = |k: &str| m.get(k).copied().unwrap_or(0);
                any = true;
                t.blk_kicks += g("kicks");
                t.requests += g("requests");
                t.descriptors += g("descriptors");
                t.segments += g("segments");
                t.bytes += g("read_bytes") + g("written_bytes");
                t.blk_interrupts += g("interrupts");
            } else if let Some(rest) = l.strip_prefix("viommu: ") {
                let m = kv_map(rest);
                t.maps = m.get("maps").copied();
                t.unmaps = m.get("unmaps").copied();
                t.iommu_kicks = m.get("kicks").copied();
                t.iommu_interrupts = m.get("interrupts").copied();
            } else if let Some(rest) = l.strip_prefix("vtd: ") {
                // The VT-d's MAPs/UNMAPs are the engine changes its invalidations made.
                let m = kv_map(rest);
                t.maps = m.get("maps").copied();
                t.unmaps = m.get("unmaps").copied();
                t.vtd_invalidations = m.get("invalidations").copied();
                t.vtd_walk_reads = m.get("walk_reads").copied();
            }
        }
        any.then_some(t)
    }

    /// Every figure divided by the number of requests, in [`PER_IO_FIELDS`] order (`None`
    /// where the figure is absent or there was no request).
    pub fn per_io(&self) -> Vec<Option<f64>> {
        let per = |v: Option<u64>| {
            v.filter(|_| self.requests > 0)
                .map(|v| v as f64 / self.requests as f64)
        };
        vec![
            per(Some(self.blk_kicks)),
            per(Some(self.descriptors)),
            per(Some(self.segments)),
            per(Some(self.bytes)).map(|b| b / 1024.0),
            per(Some(self.blk_interrupts)),
            per(self.maps),
            per(self.unmaps),
            per(self.iommu_kicks),
            per(self.iommu_interrupts),
            per(self.vtd_invalidations),
            per(self.vtd_walk_reads),
        ]
    }
}

/// Column names of [`VmmTotals::per_io`].
pub const PER_IO_FIELDS: [&str; 11] = [
    "blk kicks",
    "descriptors",
    "segments",
    "KiB",
    "blk irqs",
    "MAPs",
    "UNMAPs",
    "viommu kicks",
    "viommu irqs",
    "VT-d invalidations",
    "walk reads",
];

/// SVM exit code names (AMD APM vol. 2, appendix C) for L1's `kvm_exit` histogram.
pub fn svm_exit_name(code: u64) -> String {
    let fixed = match code {
        0x60 => "INTR",
        0x61 => "NMI",
        0x62 => "SMI",
        0x63 => "INIT",
        0x64 => "VINTR",
        0x65 => "CR0_SEL_WRITE",
        0x6e => "RDTSC",
        0x6f => "RDPMC",
        0x72 => "CPUID",
        0x74 => "IRET",
        0x77 => "PAUSE",
        0x78 => "HLT",
        0x79 => "INVLPG",
        0x7b => "IOIO",
        0x7c => "MSR",
        0x7d => "TASK_SWITCH",
        0x7f => "SHUTDOWN",
        0x80 => "VMRUN",
        0x81 => "VMMCALL",
        0x87 => "RDTSCP",
        0x89 => "WBINVD",
        0x8a => "MONITOR",
        0x8b => "MWAIT",
        0x8d => "XSETBV",
        0x8f => "EFER_WRITE_TRAP",
        0x400 => "NPF",
        0x401 => "AVIC_INCOMPLETE_IPI",
        0x402 => "AVIC_UNACCEL",
        _ => "",
    };
    if !fixed.is_empty() {
        return fixed.to_string();
    }
    match code {
        0x00..=0x0f => format!("READ_CR{}", code),
        0x10..=0x1f => format!("WRITE_CR{}", code - 0x10),
        0x20..=0x3f => format!("DR_{:#x}", code),
        0x40..=0x5f => format!("EXCP{}", code - 0x40),
        0x90..=0x9f => format!("CR{}_WRITE_TRAP", code - 0x90),
        _ => format!("exit_{code:#x}"),
    }
}

/// One `L1-KVMSTAT <begin|end> <phase> k=v ...` line of rig-l1stat: L1's KVM counters
/// (debugfs sums over the running VMs, `r_<code>` exits by SVM exit code, `mmio_w` MMIO writes
/// outside the local APIC page).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KvmSnap {
    /// Counter name -> value.
    pub values: BTreeMap<String, u64>,
}

/// Begin and end snapshots of every phase in a console, by phase name (the last pair wins).
pub fn kvm_phases(serial: &str) -> BTreeMap<String, (KvmSnap, KvmSnap)> {
    let mut begins: BTreeMap<String, KvmSnap> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for l in serial.lines() {
        let Some(rest) = l.trim().strip_prefix("L1-KVMSTAT ") else {
            continue;
        };
        let mut w = rest.splitn(3, ' ');
        let (Some(edge), Some(phase)) = (w.next(), w.next()) else {
            continue;
        };
        let snap = KvmSnap {
            values: kv_map(w.next().unwrap_or("")),
        };
        match edge {
            "begin" => {
                begins.insert(phase.to_string(), snap);
            }
            "end" => {
                if let Some(b) = begins.remove(phase) {
                    out.insert(phase.to_string(), (b, snap));
                }
            }
            _ => {}
        }
    }
    out
}

/// `end - begin` of every counter present in both (counters never go down; a smaller end
/// means a different VM, and the counter is left out).
pub fn kvm_delta(b: &KvmSnap, e: &KvmSnap) -> BTreeMap<String, u64> {
    e.values
        .iter()
        .filter_map(|(k, &ve)| {
            let vb = b.values.get(k).copied().unwrap_or(0);
            (ve >= vb).then(|| (k.clone(), ve - vb))
        })
        .collect()
}

/// Exits by reason name from a delta (`r_<code>` keys), largest first.
pub fn exits_by_reason(d: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = d
        .iter()
        .filter_map(|(k, &n)| {
            let code = k.strip_prefix("r_")?;
            let code = u64::from_str_radix(code.trim_start_matches("0x"), 16).ok()?;
            (n > 0).then(|| (svm_exit_name(code), n))
        })
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "[vmm INFO] something\n\
        blk: disk=/tmp/d kicks=100 requests=200 reads=200 writes=0 flushes=0 descriptors=800 \
        segments=400 read_bytes=819200 written_bytes=0 interrupts=150 errors=0\n\
        viommu: maps=800 unmaps=790 attaches=1 detaches=0 probes=1 faults=0 faults_delivered=0 \
        faults_dropped=0 malformed=0 errors=0 ioerr=0 unsupp=0 deverr=0 inval=0 range=0 noent=0 \
        fault=0 nomem=0 kicks=400 interrupts=0\n";

    #[test]
    fn exit_lines_give_per_request_figures() {
        let t = VmmTotals::parse(LOG).unwrap();
        assert_eq!(t.requests, 200);
        assert_eq!(t.maps, Some(800));
        let p = t.per_io();
        assert_eq!(p.len(), PER_IO_FIELDS.len());
        assert_eq!(p[0], Some(0.5));
        assert_eq!(p[1], Some(4.0));
        assert_eq!(p[2], Some(2.0));
        assert_eq!(p[3], Some(4.0));
        assert_eq!(p[4], Some(0.75));
        assert_eq!(p[5], Some(4.0));
        assert_eq!(p[6], Some(3.95));
        assert_eq!(p[7], Some(2.0));
        assert_eq!(p[8], Some(0.0));
        // No vIOMMU line: the vIOMMU columns are absent, not zero.
        let no =
            VmmTotals::parse(LOG.lines().take(2).collect::<Vec<_>>().join("\n").as_str()).unwrap();
        assert_eq!(no.per_io()[5], None);
        assert_eq!(VmmTotals::parse("nothing here"), None);
        // Two disks add up.
        let two = format!("{LOG}blk: disk=/x kicks=1 requests=0\n");
        assert_eq!(VmmTotals::parse(&two).unwrap().blk_kicks, 101);
    }

    #[test]
    fn the_vtd_line_gives_invalidations_and_walk_reads_per_request() {
        let log = format!(
            "{}\nvtd: maps=600 unmaps=598 invalidations=1200 faults=0 errors=0 waits=1200 \
             walk_reads=4800 faults_dropped=0\n",
            LOG.lines().take(2).collect::<Vec<_>>().join("\n")
        );
        let t = VmmTotals::parse(&log).unwrap();
        assert_eq!((t.maps, t.unmaps), (Some(600), Some(598)));
        let p = t.per_io();
        assert_eq!(p[5], Some(3.0));
        assert_eq!(p[9], Some(6.0));
        assert_eq!(p[10], Some(24.0));
        // Behind the virtio-iommu the VT-d columns are absent.
        assert_eq!(VmmTotals::parse(LOG).unwrap().per_io()[9], None);
    }

    #[test]
    fn kvm_phases_pair_up_and_diff() {
        let serial = "L1-KVMSTAT begin r4k exits=10 r_0x400=4 r_0x7c=1 mmio_w=3\n\
            noise\n\
            L1-KVMSTAT end r4k exits=110 r_0x400=64 r_0x7c=31 mmio_w=43\n\
            L1-KVMSTAT end orphan exits=5\n";
        let p = kvm_phases(serial);
        assert_eq!(p.len(), 1);
        let (b, e) = &p["r4k"];
        let d = kvm_delta(b, e);
        assert_eq!(d["exits"], 100);
        assert_eq!(d["mmio_w"], 40);
        let r = exits_by_reason(&d);
        assert_eq!(r, vec![("NPF".to_string(), 60), ("MSR".to_string(), 30)]);
        let back = KvmSnap {
            values: [("exits".to_string(), 1)].into(),
        };
        assert!(kvm_delta(e, &back).is_empty());
    }

    /// rig-l1stat itself (sh), over fake debugfs and tracefs trees, around a "VMM" that prints
    /// two phase markers and bumps the counters in between.
    #[test]
    fn rig_l1stat_brackets_each_phase_with_l1_counters() {
        let dir = std::env::temp_dir().join(format!("rig-l1stat-{}", std::process::id()));
        let (d, t) = (dir.join("debug"), dir.join("tracing"));
        std::fs::create_dir_all(d.join("kvm")).unwrap();
        for h in ["kvm_exit", "kvm_mmio"] {
            std::fs::create_dir_all(t.join("events/kvm").join(h)).unwrap();
        }
        let hist = |reason_npf: u64, mmio: u64| {
            std::fs::write(
                t.join("events/kvm/kvm_exit/hist"),
                format!(
                    "# event histogram\n\n{{ exit_reason:        120 }} hitcount:          3\n\
                     {{ exit_reason:       1024 }} hitcount:  {reason_npf}\n\nTotals:\n    Hits: 9\n"
                ),
            )
            .unwrap();
            std::fs::write(
                t.join("events/kvm/kvm_mmio/hist"),
                format!(
                    "{{ gpa: 4276092928 }} hitcount: 50\n{{ gpa: 3758096384 }} hitcount: {mmio}\n\
                     \nTotals:\n    Hits: 1\n"
                ),
            )
            .unwrap();
        };
        hist(10, 7);
        std::fs::write(d.join("kvm/exits"), "100\n").unwrap();
        std::fs::write(d.join("kvm/mmio_exits"), "40\n").unwrap();
        // The "VMM": phase begin, the counters move, phase end.
        let bump = format!(
            "echo 'BENCH-PHASE begin w1'; sleep 0.3; echo 250 >{ex}; echo 90 >{mm}; \
             printf '%s\\n' '{{ exit_reason:       1024 }} hitcount: 60' >{h}; \
             echo 'BENCH-PHASE end w1'; sleep 0.3; echo tail; exit 3",
            ex = d.join("kvm/exits").display(),
            mm = d.join("kvm/mmio_exits").display(),
            h = t.join("events/kvm/kvm_exit/hist").display(),
        );
        let out = std::process::Command::new("sh")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../guest-images/l1/rig-l1stat"
            ))
            .args(["sh", "-c", &bump])
            .env("RIG_L1STAT_DEBUGFS", &d)
            .env("RIG_L1STAT_TRACEFS", &t)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(3), "the VMM's status: {text}");
        assert!(
            text.contains("BENCH-PHASE end w1") && text.ends_with("tail\n"),
            "{text}"
        );
        let p = kvm_phases(&text);
        let (b, e) = p.get("w1").unwrap_or_else(|| panic!("no phase in {text}"));
        assert_eq!(
            b.values.get("mmio_w"),
            Some(&7),
            "the APIC page is left out: {text}"
        );
        let dl = kvm_delta(b, e);
        assert_eq!((dl["exits"], dl["mmio_exits"]), (150, 50), "{text}");
        assert_eq!(exits_by_reason(&dl), vec![("NPF".to_string(), 50)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn exit_names() {
        assert_eq!(svm_exit_name(0x78), "HLT");
        assert_eq!(svm_exit_name(0x4e), "EXCP14");
        assert_eq!(svm_exit_name(0x13), "WRITE_CR3");
        assert_eq!(svm_exit_name(0x999), "exit_0x999");
    }
}
