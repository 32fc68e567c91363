//! A [`HostMapper`] that records every call, checks them like VFIO type1 would, and fails on
//! demand, so tests can verify what the engine asks of the host and its rollbacks. It is
//! also a [`DmaSpace`](super::DmaSpace) (then the recorded `gpa` is the host address), to test the shadow engine.

use super::{HostMapError, HostMapper, Prot};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// One call made to the mapper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostOp {
    /// `map(iova, size, gpa, prot)`.
    Map {
        /// First IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
        /// First guest-physical address.
        gpa: u64,
        /// Rights.
        prot: Prot,
    },
    /// `unmap(iova, size)`.
    Unmap {
        /// First IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
    },
}

#[derive(Default)]
struct State {
    mappings: BTreeMap<u64, (u64, u64, Prot)>,
    ops: Vec<HostOp>,
    calls: u64,
    fail_at: Option<(u64, HostMapError)>,
}

/// Records calls and keeps the resulting host mapping set.
#[derive(Default)]
pub struct RecordingMapper {
    state: Mutex<State>,
}

impl RecordingMapper {
    /// A mapper with no mappings that never fails.
    pub fn new() -> Self {
        Self::default()
    }

    /// Make the `n`-th call from now (0 = the next one) fail with `err`, replacing any pending
    /// failure (`u64::MAX` = never: disarms it).
    pub fn fail_call(&self, n: u64, err: HostMapError) {
        let mut s = self.lock();
        let at = s.calls.saturating_add(n);
        s.fail_at = Some((at, err));
    }

    /// Every successful call so far, in order.
    pub fn ops(&self) -> Vec<HostOp> {
        self.lock().ops.clone()
    }

    /// Current host mappings: iova -> (size, gpa, prot).
    pub fn mappings(&self) -> BTreeMap<u64, (u64, u64, Prot)> {
        self.lock().mappings.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn injected(s: &mut State) -> Result<(), HostMapError> {
        let call = s.calls;
        s.calls += 1;
        match &s.fail_at {
            Some((at, err)) if *at == call => {
                let err = err.clone();
                s.fail_at = None;
                Err(err)
            }
            _ => Ok(()),
        }
    }
}

impl HostMapper for RecordingMapper {
    fn map(&self, iova: u64, size: u64, gpa: u64, prot: Prot) -> Result<(), HostMapError> {
        let mut s = self.lock();
        Self::injected(&mut s)?;
        let last = iova
            .checked_add(size.checked_sub(1).ok_or(HostMapError::Invalid)?)
            .ok_or(HostMapError::OutOfRange)?;
        // Like VFIO type1: any overlap with an existing mapping is refused.
        if let Some((&start, &(sz, _, _))) = s.mappings.range(..=last).next_back() {
            if start + (sz - 1) >= iova {
                return Err(HostMapError::Invalid);
            }
        }
        s.mappings.insert(iova, (size, gpa, prot));
        s.ops.push(HostOp::Map {
            iova,
            size,
            gpa,
            prot,
        });
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), HostMapError> {
        let mut s = self.lock();
        Self::injected(&mut s)?;
        // The engine only unmaps exactly what it mapped.
        match s.mappings.get(&iova) {
            Some(&(sz, _, _)) if sz == size => {
                s.mappings.remove(&iova);
                s.ops.push(HostOp::Unmap { iova, size });
                Ok(())
            }
            _ => Err(HostMapError::Invalid),
        }
    }

    fn records(&self) -> usize {
        self.lock().mappings.len()
    }
}

impl super::DmaSpace for RecordingMapper {
    /// Records only; never touches `host_addr`.
    unsafe fn map(
        &self,
        iova: u64,
        size: u64,
        host_addr: u64,
        prot: Prot,
    ) -> Result<(), HostMapError> {
        HostMapper::map(self, iova, size, host_addr, prot)
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), HostMapError> {
        HostMapper::unmap(self, iova, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_checks_like_vfio() {
        let m = RecordingMapper::new();
        m.map(0x1000, 0x1000, 0x8000, Prot::RW).unwrap();
        assert_eq!(
            m.map(0x1800, 0x1000, 0, Prot::RW),
            Err(HostMapError::Invalid)
        );
        assert_eq!(m.unmap(0x1000, 0x800), Err(HostMapError::Invalid));
        m.fail_call(0, HostMapError::NoSpace);
        assert_eq!(
            m.map(0x4000, 0x1000, 0, Prot::RW),
            Err(HostMapError::NoSpace)
        );
        m.map(0x4000, 0x1000, 0, Prot::RW).unwrap();
        m.unmap(0x1000, 0x1000).unwrap();
        assert_eq!(m.mappings().len(), 1);
        assert_eq!(m.ops().len(), 3);
    }
}
