//! `guest-bench` command line: see [`guest_bench::args::USAGE`].

use guest_bench::args::{self, Pattern, USAGE};
use guest_bench::{read, Error};
use std::process::ExitCode;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().is_some_and(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let a = match args::parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("guest-bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match read::run_info(&a) {
        Ok((r, info)) => {
            println!(
                "iops={:.1} mbps={:.2} bs={} requests={} seconds={:.3} pattern={} qd={} buf={}{}{}",
                r.iops(),
                r.mbps(),
                r.bs,
                r.requests,
                r.nanos as f64 / 1e9,
                match a.pattern {
                    Pattern::Random => "rand",
                    Pattern::Sequential => "seq",
                },
                a.qd,
                info.buf,
                info.buf_runs
                    .map(|r| format!(" buf_runs={r:.1}"))
                    .unwrap_or_default(),
                info.account
            );
            ExitCode::SUCCESS
        }
        Err(e @ Error::Usage(_)) => {
            eprintln!("guest-bench: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            println!("guest-bench: error: {e}");
            ExitCode::from(1)
        }
    }
}
