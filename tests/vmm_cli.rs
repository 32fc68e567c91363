//! The `vmm` binary's command line, end to end: help, a bad option (message, usage, status 2)
//! and a machine that cannot be built (the error with each of its causes once, on one line,
//! status 1).

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
fn help_goes_to_stdout_with_status_0() {
    for flag in ["--help", "-h"] {
        let o = vmm(&[flag]);
        assert_eq!(o.status.code(), Some(0));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            format!("{}\n", vmm::cli::USAGE)
        );
    }
}

#[test]
fn a_bad_option_prints_the_reason_and_the_usage_with_status_2() {
    for (args, msg) in [
        (
            &["--disk", "ro"][..],
            "--disk: disk option 'ro' is not key=value",
        ),
        (
            &["--kernel", "k", "--net", "hub=0,mac=53:54:00:00:00:01"][..],
            "--net: mac=53:54:00:00:00:01: multicast address",
        ),
        (
            &["--kernel", "k", "--memory", "lots"][..],
            "--memory: bad size 'lots'",
        ),
        (&["--frobnicate"][..], "unknown option '--frobnicate'"),
        (&["--kernel"][..], "--kernel needs a value"),
        (&[][..], "--kernel is required"),
        (
            &["--kernel", "k", "--device", "path=/x,iommu=on"][..],
            "--device path=/x,iommu=on: the device must sit behind a vIOMMU, add --viommu virtio",
        ),
    ] {
        let o = vmm(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert_eq!(
            stderr(&o),
            format!("vmm: {msg}\n\n{}\n", vmm::cli::USAGE),
            "{args:?}"
        );
    }
}

#[test]
fn a_machine_error_prints_its_causes_on_one_line_with_status_1() {
    let o = vmm(&[
        "--kernel",
        "/nonexistent/bzImage",
        "--memory",
        "64M",
        "--cpus",
        "1",
        "--seccomp",
        "off",
        "--disk",
        "path=/nonexistent/disk.img",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    let line = err
        .lines()
        .find(|l| l.starts_with("vmm: error: "))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    if kvm_ioctls::Kvm::new().is_err() {
        vmm::skip::skipped(
            "vmm_cli::a_machine_error_prints_its_causes_on_one_line_with_status_1",
            "/dev/kvm not usable: the disk is never reached",
        );
        assert!(
            line.starts_with("vmm: error: cannot open /dev/kvm: caused by "),
            "{line}"
        );
        return;
    }
    assert_eq!(
        line,
        format!(
            "vmm: error: disk /nonexistent/disk.img: caused by {}",
            std::io::Error::from_raw_os_error(libc::ENOENT)
        )
    );
}

#[test]
fn a_kernel_that_is_no_bzimage_is_reported_once() {
    let kernel = std::env::temp_dir().join(format!("vmm-cli-junk-{}.bzImage", std::process::id()));
    std::fs::write(&kernel, vec![0x5a; 64 << 10]).unwrap();
    let k = kernel.to_str().unwrap();
    let o = vmm(&[
        "--kernel",
        k,
        "--memory",
        "64M",
        "--cpus",
        "1",
        "--seccomp",
        "off",
    ]);
    let _ = std::fs::remove_file(&kernel);
    assert_eq!(o.status.code(), Some(1));
    if kvm_ioctls::Kvm::new().is_err() {
        vmm::skip::skipped(
            "vmm_cli::a_kernel_that_is_no_bzimage_is_reported_once",
            "/dev/kvm not usable: the kernel is never loaded",
        );
        return;
    }
    // linux-loader's error shows its cause and returns it as its source: printed once.
    let err = stderr(&o);
    assert_eq!(
        err.lines().find(|l| l.starts_with("vmm: error: ")),
        Some(
            "vmm: error: cannot load kernel: caused by Kernel Loader: failed to load bzImage \
             kernel image: Kernel Loader: Invalid bzImage"
        ),
        "{err}"
    );
}
