//! `make run`: boots the demo L2 guest (the image's default script: PCI devices, IOMMU groups,
//! relevant kernel log, a read from /dev/vda) through the rig and prints what it saw.
//!
//!   cargo run -p rig --example demo [-- qemu|vtd]  # `qemu`: QEMU as the L2 VMM, for comparison;
//!                                                 # `vtd`: our vmm with the emulated Intel VT-d

use std::process::ExitCode;

use rig::{Program, Scenario};

fn main() -> ExitCode {
    let (program, front_end) = match std::env::args().nth(1).as_deref() {
        None | Some("vmm") => (Program::Vmm, "virtio"),
        Some("vtd") => (Program::Vmm, "vtd"),
        Some("qemu") => (Program::Qemu, "virtio"),
        Some(other) => {
            eprintln!("demo: unknown program {other:?} (vmm, vtd or qemu)");
            return ExitCode::from(2);
        }
    };
    let disk = std::env::temp_dir().join(format!("rig-demo-{}.img", std::process::id()));
    let mut data = b"rig demo disk\n".repeat(256);
    data.resize(16 << 20, 0);
    if let Err(e) = std::fs::write(&disk, &data) {
        eprintln!("demo: cannot write {}: {e}", disk.display());
        return ExitCode::FAILURE;
    }
    let script = "#!/bin/sh\nexec sh /etc/rig/demo.sh\n";
    let scenario = match program {
        // The disk sits behind our virtio-iommu or VT-d (QEMU's default arguments: virtio-iommu).
        Program::Vmm => {
            let s = Scenario::vmm("demo", script).args(
                Scenario::default_args(Program::Vmm, 1, 0, 0)
                    .into_iter()
                    .chain(
                        ["--viommu", front_end, "--disk", "path={disk0},iommu=on"]
                            .map(String::from),
                    ),
            );
            if front_end == "vtd" {
                s.cmdline_extra("intel_iommu=on")
            } else {
                s
            }
        }
        Program::Qemu => Scenario::qemu("demo-qemu", script),
    }
    .disk(&disk);
    let result = rig::run(&[scenario]);
    let _ = std::fs::remove_file(&disk);
    let outcomes = match result {
        Ok(o) => o,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(o) = outcomes.first() else {
        eprintln!("demo: no outcome");
        return ExitCode::FAILURE;
    };
    println!("===== L2 console =====\n{}", o.serial);
    println!("===== VMM stderr =====\n{}", o.vmm_log);
    if !o.l1_log.trim().is_empty() {
        println!("===== L1 kernel log during the run =====\n{}", o.l1_log);
    }
    println!(
        "===== vmm status {:?}, guest exit {:?}, {}{:.1} s =====",
        o.vmm_status,
        o.guest_exit,
        if o.timed_out { "TIMED OUT, " } else { "" },
        o.duration.as_secs_f64()
    );
    if o.vmm_status == Some(0) && o.guest_exit == Some(0) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
