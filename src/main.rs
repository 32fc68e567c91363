//! `vmm`: command line entry point.

use std::process::ExitCode;

use vmm::cli::{self, Command};
use vmm::error::ErrorChain;
use vmm::lifecycle::ExitReason;
use vmm::machine::Machine;

fn main() -> ExitCode {
    let rust_log = std::env::var("RUST_LOG").ok();
    let config = match cli::parse(std::env::args().skip(1), rust_log.as_deref()) {
        Ok(Command::Run(c)) => c,
        Ok(Command::SeccompSelftest(kind, mode)) => {
            return ExitCode::from(vmm::seccomp::selftest(kind, mode) as u8);
        }
        Ok(Command::Help) => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        // The message names the option and what is wrong with its value.
        Err(e) => {
            eprintln!("vmm: {e}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    vmm::logger::init(config.log_level);
    let result = Machine::new(config).and_then(|m| {
        let counters = m.viommu_counters();
        let vfio = m.vfio_counters();
        let nets = m.net_ports();
        let r = m.boot();
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
            eprintln!("vmm: error: {}", ErrorChain(&e));
            ExitCode::from(1)
        }
    }
}
