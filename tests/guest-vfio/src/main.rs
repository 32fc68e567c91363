//! `guest-vfio` command line: see the library docs and `guest-vfio --help`.

use guest_vfio::args::{self, Mode, USAGE};
use guest_vfio::{bench, blk, find_device, init_logging, shadowed, sysfs_path, Error, VfioHandle};
use std::process::ExitCode;

fn run(argv: &[String]) -> Result<bool, Error> {
    let a = args::parse(argv)?;
    let want_blk = matches!(a.mode, Mode::BlkRead { .. } | Mode::ShadowBlkRead { .. });
    let path = match &a.device {
        Some(d) => sysfs_path(d),
        None => find_device(want_blk)?,
    };
    log::info!("mode {:?} on {}", a.mode, path.display());
    let h = VfioHandle::open(&path)?;
    match a.mode {
        Mode::Maps { size, count } => bench::maps(&h, size, count, a.iova).map(|_| true),
        Mode::Errors => bench::errors(&h, a.iova),
        Mode::BlkRead { sector, timeout_ms } => {
            blk::read_sector(&h, sector, a.iova, timeout_ms).map(|_| true)
        }
        Mode::ShadowBlkRead { sector, timeout_ms } => {
            let (a, b) = shadowed::shadow_blk_read(&h, sector, a.iova, timeout_ms)?;
            Ok(a.data == b.data)
        }
    }
}

fn main() -> ExitCode {
    init_logging();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().is_some_and(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match run(&argv) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            println!("guest-vfio: some checks failed");
            ExitCode::from(1)
        }
        Err(e) => {
            if matches!(e, Error::Usage(_)) {
                eprintln!("{USAGE}");
            }
            println!("guest-vfio: error: {e}");
            ExitCode::from(2)
        }
    }
}
