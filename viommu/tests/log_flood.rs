//! A guest flooding the virtio-iommu with malformed requests gets a bounded number of log
//! lines, and the lines it did not get are counted exactly (`virtio_dev::log_limit`). Its own
//! test binary: the rate limit is per call site and process-wide.

mod common;

use common::*;
use std::time::Instant;
use viommu::ViommuConfig;
use virtio_dev::log_limit::{capture, flush, BURST, INTERVAL};

/// `flush` reports every source on the calling thread: one flood at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Lines of `lines` starting with `what`, and the suppressed counts reported by summaries.
fn tally(lines: &[(log::Level, String)], what: &str, site: &str) -> (u64, u64) {
    let passed = lines.iter().filter(|(_, l)| l.contains(what)).count() as u64;
    let suppressed = lines
        .iter()
        .filter(|(_, l)| l.starts_with(site) && l.ends_with("similar line(s) suppressed"))
        .map(|(_, l)| {
            l.rsplit(": ")
                .next()
                .and_then(|t| t.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .expect("a count")
        })
        .sum();
    (passed, suppressed)
}

#[test]
fn a_flood_of_malformed_requests_logs_a_burst_and_counts_the_rest() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = 2000u64;
    let (mut d, _) = Driver::new(ViommuConfig::default(), &[0x08], None);
    let start = Instant::now();
    let Some((served, lines)) = capture::lines(|| {
        let mut served = 0;
        for _ in 0..n / u64::from(QSIZE / 2) {
            // Requests of 3 bytes: shorter than any header.
            for _ in 0..QSIZE / 2 {
                let at = d.alloc(3, 0);
                let tail = d.alloc(4, 0);
                d.queue_req(&[(at, 3, false), (tail, 4, true)]);
            }
            d.kick();
            served += d.used_req().len();
            d.reset_data();
        }
        flush();
        served
    }) else {
        println!("skipped: another logger is installed");
        return;
    };
    let windows = start.elapsed().as_secs_f64() / INTERVAL.as_secs_f64();
    assert_eq!(served as u64, n, "every request completed");
    let (passed, suppressed) = tally(&lines, "malformed request", "viommu::virtio::device:");
    assert!(passed >= u64::from(BURST));
    assert!(
        passed as f64 <= f64::from(BURST) * (windows.ceil() + 1.0),
        "{passed} lines in {windows:.2} intervals"
    );
    assert_eq!(
        passed + suppressed,
        n,
        "every line logged or counted: {lines:?}"
    );
    assert!(lines.len() as u64 <= passed + 3, "{} lines", lines.len());
    assert_eq!(d.dev.counters().snapshot().malformed, n);
}

#[test]
fn device_accesses_through_a_mapping_to_no_ram_log_a_burst_and_count_the_rest() {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = 5000u64;
    let (mut d, eps) = Driver::new(ViommuConfig::default(), &[0x08], None);
    assert_eq!(d.status(&attach(1, 0x08, 0)), OK);
    // IOVA 0x10000 -> a guest-physical page past the end of RAM.
    let past_ram = MEM_SIZE as u64 * 4;
    assert_eq!(d.status(&map(1, 0x10000, 0x10fff, past_ram, RW)), OK);
    let mem = viommu::TranslatedMemory::from_atomic(
        &GuestMemoryAtomic::new(d.mem.clone()),
        eps[0].clone(),
    );
    let start = Instant::now();
    let Some((failed, lines)) = capture::lines(|| {
        let failed = (0..n)
            .filter(|_| mem.read_obj::<u32>(GuestAddress(0x10000)).is_err())
            .count();
        flush();
        failed
    }) else {
        println!("skipped: another logger is installed");
        return;
    };
    let windows = start.elapsed().as_secs_f64() / INTERVAL.as_secs_f64();
    assert_eq!(failed as u64, n, "every access refused");
    let (passed, suppressed) = tally(
        &lines,
        "is not mapped to guest RAM",
        "viommu::engine::translate:",
    );
    assert!(passed >= u64::from(BURST));
    assert!(passed as f64 <= f64::from(BURST) * (windows.ceil() + 1.0));
    assert_eq!(
        passed + suppressed,
        n,
        "every line logged or counted: {lines:?}"
    );
}
