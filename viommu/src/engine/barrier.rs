//! An asymmetric memory barrier: a cheap side for the datapath (every access through a view
//! announces itself, then checks whether the view was revoked) and an expensive side for the
//! rare revocation (past the pin deadline), so that the pair orders like two full fences.
//!
//! The light side is a compiler barrier; the heavy side is Linux's
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which runs a full memory barrier on every
//! CPU running a thread of this process before it returns (liburcu and Folly's
//! `asymmetricHeavyBarrier` use it the same way). The process registers once
//! ([`init`], when the engine creates an endpoint: before the VMM's seccomp filters apply).
//! Without it (an old kernel, a refused registration) both sides are full fences: correct,
//! and as slow as an atomic read-modify-write per access.

use std::sync::atomic::{compiler_fence, fence, Ordering};
use std::sync::OnceLock;

/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED` (linux/membarrier.h).
const CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
/// `MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED`.
const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

/// Whether the process registered for expedited private membarriers.
static REGISTERED: OnceLock<bool> = OnceLock::new();

fn membarrier(cmd: libc::c_int) -> bool {
    // SAFETY: membarrier(2) takes two integers and touches no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_uint,
            0 as libc::c_int,
        ) == 0
    }
}

/// Register the process for the heavy side (idempotent; the first call decides).
pub(crate) fn init() -> bool {
    *REGISTERED.get_or_init(|| {
        let ok = membarrier(CMD_REGISTER_PRIVATE_EXPEDITED);
        if !ok {
            log::info!(
                "viommu: membarrier unavailable ({}); view accesses use full fences",
                std::io::Error::last_os_error()
            );
        }
        ok
    })
}

/// The datapath side: orders this thread's earlier store before its later load against a
/// [`heavy`] on another thread.
#[inline(always)]
pub(crate) fn light() {
    if REGISTERED.get() == Some(&true) {
        compiler_fence(Ordering::SeqCst);
    } else {
        fence(Ordering::SeqCst);
    }
}

/// The revoker's side: after it returns, every [`light`] that ran before it has its earlier
/// stores visible here, and every later one sees what this thread stored before the call.
/// Returns false when the barrier could not be run (the caller must not rely on it: only
/// possible if the kernel refuses a registered process, which it does not).
pub(crate) fn heavy() -> bool {
    fence(Ordering::SeqCst);
    if !init() {
        // Every light side is a full fence too.
        return true;
    }
    let ok = membarrier(CMD_PRIVATE_EXPEDITED);
    fence(Ordering::SeqCst);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_once_and_the_heavy_side_runs() {
        let first = init();
        assert_eq!(init(), first, "the first registration decides");
        assert!(heavy(), "a registered process can always run the barrier");
        light();
    }
}
