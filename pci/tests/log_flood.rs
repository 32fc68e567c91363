//! Guest-triggered warnings of the PCI layer (bad config accesses to a passthrough function,
//! bad MSI-X table writes) are rate-limited per call site with an exact count of what was
//! suppressed (`virtio_dev::log_limit`). Its own test binary: the limits are process-wide.

use pci::test_utils::{FakeMsi, FakeSlots, FakeVfio};
use pci::{MsixConfig, PciDevice, VfioPciDevice};
use std::sync::Arc;
use std::time::Instant;
use virtio_dev::log_limit::{capture, flush, BURST, INTERVAL};

fn count(lines: &[(log::Level, String)], what: &str, site: &str) -> (u64, u64) {
    let passed = lines.iter().filter(|(_, l)| l.starts_with(what)).count() as u64;
    let suppressed = lines
        .iter()
        .filter(|(_, l)| l.starts_with(site) && l.ends_with("similar line(s) suppressed"))
        .filter_map(|(_, l)| {
            l.rsplit(": ")
                .next()?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    (passed, suppressed)
}

#[test]
fn floods_of_bad_config_and_msix_accesses_log_a_burst_and_count_the_rest() {
    let n = 10_000u64;
    let mut dev = VfioPciDevice::new(
        Arc::new(FakeVfio::new()),
        Arc::new(FakeMsi::default()),
        Arc::new(FakeSlots::default()),
    )
    .unwrap();
    let mut msix = MsixConfig::new(4, Arc::new(FakeMsi::default())).unwrap();
    let start = Instant::now();
    let Some(((), lines)) = capture::lines(|| {
        for _ in 0..n {
            let mut b = [0u8; 3];
            dev.config_read(0x10, &mut b);
            assert_eq!(b, [0xff; 3], "still answered");
            dev.config_write(0x11, &[1, 2]);
            msix.table_write(2, &[0; 4]);
        }
        flush();
    }) else {
        println!("skipped: another logger is installed");
        return;
    };
    let windows = (start.elapsed().as_secs_f64() / INTERVAL.as_secs_f64()).ceil() + 1.0;
    for (what, site) in [
        ("vfio: bad config read", "pci::vfio_pci:"),
        ("vfio: bad config write", "pci::vfio_pci:"),
        ("msix: ignored table write", "pci::msix:"),
    ] {
        let (passed, _) = count(&lines, what, site);
        assert!(passed >= u64::from(BURST), "{what}: {passed}");
        assert!(
            passed as f64 <= f64::from(BURST) * windows,
            "{what}: {passed}"
        );
    }
    let (p1, s1) = count(&lines, "vfio: bad config", "pci::vfio_pci:");
    assert_eq!(p1 + s1, 2 * n, "every vfio line logged or counted");
    let (p2, s2) = count(&lines, "msix: ignored", "pci::msix:");
    assert_eq!(p2 + s2, n, "every msix line logged or counted");
    assert!(
        lines.len() < 100,
        "{} lines for {} bad accesses",
        lines.len(),
        3 * n
    );
}
