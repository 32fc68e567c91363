//! Where things are and how the rig runs: repository paths, images, the VMM binary, the mode.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::error::RigError;
use crate::progress;

/// Target triple of the statically linked `vmm` copied into L1.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// How scenarios are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The host has hardware KVM: each scenario's VMM runs directly on the host.
    Direct,
    /// No hardware KVM: all scenarios run inside one L1 Linux booted under QEMU TCG.
    Nested,
}

impl Mode {
    /// `RIG_MODE=direct|nested` if set, else `Direct` when kvm_intel or kvm_amd is loaded.
    pub fn detect() -> Result<Self, RigError> {
        match std::env::var("RIG_MODE").ok().as_deref() {
            Some("direct") => return Ok(Mode::Direct),
            Some("nested") => return Ok(Mode::Nested),
            Some("") | None => {}
            Some(other) => {
                return Err(RigError::Config(format!(
                    "RIG_MODE={other}: expected direct or nested"
                )))
            }
        }
        let hw = ["/sys/module/kvm_intel", "/sys/module/kvm_amd"]
            .iter()
            .any(|p| Path::new(p).exists());
        Ok(if hw { Mode::Direct } else { Mode::Nested })
    }
}

/// Everything the rig needs to know about the machine and the repository.
#[derive(Debug, Clone)]
pub struct RigConfig {
    /// Repository root (holds `guest-images/` and `.cache/`).
    pub root: PathBuf,
    /// Direct or nested.
    pub mode: Mode,
    /// The `vmm` binary (static for nested mode).
    pub vmm: PathBuf,
    /// Build the images and the vmm before running (`RIG_NO_BUILD=1` turns this off).
    pub build: bool,
    /// Keep the work directory (`RIG_KEEP=1`).
    pub keep: bool,
    /// Echo everything L1 prints to stderr (`RIG_VERBOSE=1`).
    pub verbose: bool,
    /// Extra seconds allowed for the L1 boot and shutdown on top of the scenario timeouts.
    pub l1_allowance_secs: u64,
    /// Fresh L1 boots per batch after L1 froze or died (`RIG_L1_RESTARTS`, default
    /// [`crate::MAX_L1_RESTARTS`]); past them the run fails.
    pub max_l1_restarts: u32,
    /// L0 QEMU's TCG threading for L1 (`RIG_L1_TCG=multi|single`, default multi): `single`
    /// runs both L1 vCPUs on one host thread, an experiment that takes MTTCG's cross-vCPU
    /// races (IPIs, timers) out of the emulated SVM under L2.
    pub l1_tcg_thread: &'static str,
}

impl RigConfig {
    /// The configuration from the environment: `RIG_MODE`, `RIG_VMM` (binary to use instead of
    /// building one), `RIG_NO_BUILD`, `RIG_KEEP`, `RIG_VERBOSE`, `RIG_ROOT`, `RIG_L1_RESTARTS`,
    /// `RIG_L1_TCG`.
    pub fn from_env() -> Result<Self, RigError> {
        let root = match std::env::var_os("RIG_ROOT") {
            Some(r) => PathBuf::from(r),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
        };
        let root = root
            .canonicalize()
            .map_err(|e| RigError::io(format!("repository root {}", root.display()), e))?;
        let flag = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0");
        let (vmm, build) = match std::env::var_os("RIG_VMM") {
            Some(p) => (PathBuf::from(p), false),
            None => (
                root.join("target").join(STATIC_TARGET).join("release/vmm"),
                !flag("RIG_NO_BUILD"),
            ),
        };
        Ok(Self {
            mode: Mode::detect()?,
            vmm,
            build,
            keep: flag("RIG_KEEP"),
            verbose: flag("RIG_VERBOSE"),
            l1_allowance_secs: 300,
            max_l1_restarts: match std::env::var("RIG_L1_RESTARTS") {
                Ok(v) => v.parse().map_err(|_| {
                    RigError::Config(format!("RIG_L1_RESTARTS={v}: expected a number"))
                })?,
                Err(_) => crate::MAX_L1_RESTARTS,
            },
            l1_tcg_thread: match std::env::var("RIG_L1_TCG").ok().as_deref() {
                None | Some("") | Some("multi") => "multi",
                Some("single") => "single",
                Some(other) => {
                    return Err(RigError::Config(format!(
                        "RIG_L1_TCG={other}: expected multi or single"
                    )))
                }
            },
            root,
        })
    }

    /// `.cache/images` under the root.
    pub fn images(&self) -> PathBuf {
        self.root.join(".cache/images")
    }

    /// Builds the guest images (and QEMU's L1 archive when `with_qemu`): a no-op when current.
    pub fn ensure_images(&self, with_qemu: bool) -> Result<(), RigError> {
        let script = self.root.join("guest-images/build.sh");
        let what = if with_qemu { "all" } else { "images" };
        run_step(
            "guest images",
            Command::new(&script).arg(what).current_dir(&self.root),
        )
    }

    /// Builds the static `vmm` (a quick no-op when it is current) unless building is off; checks
    /// that the binary exists.
    pub fn ensure_vmm(&self) -> Result<(), RigError> {
        if self.build {
            run_step(
                "static vmm",
                Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                    .args([
                        "build",
                        "--release",
                        "--target",
                        STATIC_TARGET,
                        "--bin",
                        "vmm",
                    ])
                    .env("RUSTFLAGS", "-C target-feature=+crt-static")
                    .current_dir(&self.root),
            )?;
        }
        if !self.vmm.is_file() {
            return Err(RigError::Config(format!(
                "vmm binary {} not found",
                self.vmm.display()
            )));
        }
        Ok(())
    }
}

fn run_step(what: &str, cmd: &mut Command) -> Result<(), RigError> {
    let t = Instant::now();
    progress(&format!("building {what}"));
    // stdout goes to our stderr so that the test's own stdout stays clean.
    let status = cmd
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .map_err(|e| RigError::io(format!("starting {cmd:?}"), e))?;
    if !status.success() {
        return Err(RigError::Build(format!(
            "{what}: {cmd:?} failed with {status}"
        )));
    }
    progress(&format!(
        "{what} ready ({:.1} s)",
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}
