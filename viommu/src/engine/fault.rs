//! Translation faults as the engine sees them: a device behind the IOMMU touched an IOVA its
//! view does not map (or lacks the right). The engine hands each one to the [`FaultSink`] of
//! the IOMMU the endpoint belongs to; the front end turns it into its own report (virtio-iommu:
//! an event-queue record; VT-d: a fault record and its interrupt). [`FaultRateLimit`] is the
//! policy front ends apply before a guest-triggered fault reaches the guest or the log.

use super::mapping::{Access, Miss};
use std::time::Instant;

/// One translation fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Endpoint ID.
    pub endpoint: u32,
    /// Faulting IOVA.
    pub address: u64,
    /// The access that was refused.
    pub access: Access,
    /// Why it was refused.
    pub miss: Miss,
}

impl Fault {
    /// The fault for a failed translation of `address` by `endpoint`.
    pub fn from_miss(endpoint: u32, address: u64, access: Access, miss: Miss) -> Self {
        Fault {
            endpoint,
            address,
            access,
            miss,
        }
    }
}

/// Where the faults of one IOMMU's endpoints go (the front end's reporter).
pub trait FaultSink: Send + Sync + std::fmt::Debug {
    /// Report `fault`; returns whether it reached the guest.
    fn report(&self, fault: Fault) -> bool;
}

/// Token bucket limiting how many faults reach the guest (and the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRateLimit {
    /// Faults allowed in a burst.
    pub burst: u32,
    /// Sustained faults per second.
    pub per_second: u32,
}

impl Default for FaultRateLimit {
    fn default() -> Self {
        FaultRateLimit {
            burst: 32,
            per_second: 100,
        }
    }
}

/// The state of one [`FaultRateLimit`] bucket.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    limit: FaultRateLimit,
    tokens: f64,
    last: Option<Instant>,
}

impl RateLimiter {
    /// A bucket that starts full at its first use.
    pub(crate) fn new(limit: FaultRateLimit) -> Self {
        RateLimiter {
            limit,
            tokens: 0.0,
            last: None,
        }
    }

    /// Take one token; false when the bucket is empty.
    pub(crate) fn take(&mut self) -> bool {
        let now = Instant::now();
        let cap = f64::from(self.limit.burst);
        self.tokens = match self.last {
            None => cap,
            Some(t) => (self.tokens
                + now.duration_since(t).as_secs_f64() * f64::from(self.limit.per_second))
            .min(cap),
        };
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
