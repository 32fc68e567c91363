//! In-guest I/O timer for `make bench`: O_DIRECT reads on a block device (random or sequential
//! offsets, for a number of requests or a number of seconds), timed with
//! `clock_gettime(CLOCK_MONOTONIC)`, one result line `iops=... mbps=...`.
//!
//! Built statically (`RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target
//! x86_64-unknown-linux-gnu -p guest-bench`) and put into the L2 initramfs by the bench harness.

pub mod account;
pub mod args;
pub mod read;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line.
    #[error("usage: {0}")]
    Usage(String),
    /// A system call failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The device is too small for the requested block size / span.
    #[error("{0}")]
    Size(String),
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// A small xorshift64 generator for the random offsets (deterministic per seed).
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (0 is replaced by a fixed odd value).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}
