//! VM lifetime: why the VM stops, and the shared flag every vCPU checks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5 or a KVM shutdown system event).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042 0xFE, triple fault).
    Reset,
    /// A vCPU halted with no interrupt controller to wake it (only without an irqchip).
    Halted,
    /// The VM failed (KVM internal error, failed entry, ...).
    Error(String),
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::PowerOff => write!(f, "guest powered off"),
            ExitReason::Reset => write!(f, "guest reset"),
            ExitReason::Halted => write!(f, "vCPU halted with no interrupt controller"),
            ExitReason::Error(e) => write!(f, "VM failure: {e}"),
        }
    }
}

impl ExitReason {
    /// Process exit status for this reason: 0 for a guest-initiated stop.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff | ExitReason::Reset | ExitReason::Halted => 0,
            ExitReason::Error(_) => 1,
        }
    }
}

/// Shared between vCPUs, devices and the main thread: the first stop request wins.
pub struct VmControl {
    reason: Mutex<Option<ExitReason>>,
    stopping: AtomicBool,
    /// Signalled once when a stop is requested.
    pub stop_evt: EventFd,
    /// Where vCPUs park while the VM is paused (`vmm ctl PATH pause`).
    pub pause: crate::snapshot::pause::PauseGate,
}

impl VmControl {
    /// A running VM.
    pub fn new() -> std::io::Result<VmControl> {
        Ok(VmControl {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            stop_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            pause: Default::default(),
        })
    }

    /// Ask the VM to stop for `reason` (ignored if a stop is already under way).
    pub fn request_stop(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            log::info!("VM stopping: {reason:?}");
            *r = Some(reason);
            self.stopping.store(true, Ordering::SeqCst);
            self.pause.stop();
            let _ = self.stop_evt.write(1);
        }
    }

    /// True once a stop was requested.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let c = VmControl::new().unwrap();
        assert!(!c.stopping());
        c.request_stop(ExitReason::PowerOff);
        c.request_stop(ExitReason::Error("late".into()));
        assert!(c.stopping());
        assert_eq!(c.reason(), Some(ExitReason::PowerOff));
        assert_eq!(c.stop_evt.read().unwrap(), 1);
        assert_eq!(ExitReason::Error("x".into()).exit_code(), 1);
        assert_eq!(ExitReason::Reset.exit_code(), 0);
    }
}
