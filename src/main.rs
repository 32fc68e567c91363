//! `vmm`: command line entry point.

use std::process::ExitCode;

use vmm::cli::{self, Command};
use vmm::lifecycle::ExitReason;
use vmm::machine::Machine;

fn main() -> ExitCode {
    let (config, level) = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Run(c)) => {
            let level = c.log_level;
            (c, level)
        }
        Ok(Command::SeccompSelftest(kind, mode)) => {
            return ExitCode::from(vmm::seccomp::selftest(kind, mode) as u8);
        }
        Ok(Command::Ctl(args)) => {
            return match vmm::snapshot::api::ctl(&args) {
                Ok(out) => {
                    if !out.is_empty() {
                        println!("{out}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vmm ctl: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Ok(Command::Help) => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vmm: {e}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    vmm::logger::init(level);
    let result = Machine::new(config).and_then(|m| {
        let counters = m.viommu_counters();
        let vtd = m.vtd_counters();
        let vfio = m.vfio_counters();
        let nets = m.net_ports();
        let disks = m.disk_stats();
        let r = m.boot();
        // Guest-triggered warnings suppressed by the rate limit and not reported yet.
        virtio_dev::log_limit::flush();
        for (disk, stats) in &disks {
            eprintln!("{}", stats.snapshot().summary_line(disk));
        }
        for (mac, port) in &nets {
            eprintln!("{}", port.stats().snapshot().summary_line(*mac));
        }
        if let Some(v) = vfio {
            eprintln!("{}", v.summary_line());
        }
        // One parseable line, whatever the log level (see vmm::iommu::summary_line).
        if let Some(c) = counters {
            eprintln!("{}", vmm::iommu::summary_line(&c.snapshot()));
        }
        if let Some(c) = vtd {
            eprintln!("{}", vmm::iommu::vtd_summary_line(&c.snapshot()));
        }
        r
    });
    match result {
        Ok(reason @ ExitReason::Error(_)) => {
            eprintln!("vmm: {reason}");
            ExitCode::from(1)
        }
        Ok(reason) => {
            log::info!("{reason}");
            ExitCode::from(reason.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("vmm: error: {}", vmm::report::Chain(&e));
            ExitCode::from(1)
        }
    }
}
