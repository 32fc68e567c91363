//! The snapshot options of the `vmm` binary end to end: `vmm ctl` against no socket, usage
//! errors, `--api-socket` refused under `--seccomp on`, `--restore` into a machine with a
//! device whose state is not saved yet (refused before anything is loaded or run).

use std::process::{Command, Output};

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run vmm")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn ctl_reports_a_missing_socket_and_bad_usage_with_status_1() {
    let o = vmm(&["ctl", "/nonexistent/vmm.sock", "pause"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/nonexistent/vmm.sock"),
        "{}",
        stderr(&o)
    );
    let o = vmm(&["ctl", "/tmp/x.sock", "snapshot"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("usage: vmm ctl"), "{}", stderr(&o));
}

#[test]
fn api_socket_needs_seccomp_off_or_log() {
    let o = vmm(&["--kernel", "k", "--api-socket", "/tmp/never.sock"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--api-socket needs --seccomp off"),
        "{}",
        stderr(&o)
    );
    assert!(!std::path::Path::new("/tmp/never.sock").exists());
}

#[test]
fn restoring_a_machine_with_pci_devices_is_refused_clearly() {
    if vmm::skip::kvm_or_skip(
        "snapshot_cli::restoring_a_machine_with_pci_devices_is_refused_clearly",
    )
    .is_none()
    {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmm-snapshot-cli-{}", std::process::id()));
    let disk = dir.join("d.img");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={}", disk.display());
    let o = vmm(&[
        "--kernel",
        "/nonexistent/bzImage",
        "--disk",
        &disk_arg,
        "--restore",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("not restorable yet") && e.contains("virtio-blk"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
