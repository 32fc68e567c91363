//! The static full-RAM mapping of devices that are not behind the vIOMMU (no vIOMMU at all, or
//! a device assigned with `iommu=off`): their host address space holds IOVA == GPA for all
//! guest RAM from device creation on, and RAM the VMM adds later is mapped too.
//!
//! One host map call per RAM region (regions are separate host mmaps), never split further;
//! removal unmaps exactly what was mapped. Several such devices may share one container (they
//! never move), and then one `StaticMapping` serves them all.
//!
//! ```text
//! let space = Arc::new(VfioDmaSpace::new(container.clone()));
//! let statics = StaticMapping::new(space, &*guest_memory.memory())?;   // at device creation
//! statics.add_region(&new_region)?;                                    // RAM hot-added later
//! ```

use crate::engine::host::{DmaSpace, HostMapError, Prot};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// One identity-mapped range: GPA (== IOVA) `gpa..gpa+size` backed by host `host_addr..`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticRange {
    /// First guest-physical address (and IOVA).
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Host virtual address of `gpa`.
    pub host_addr: u64,
    /// Rights.
    pub prot: Prot,
}

/// Guest RAM identity-mapped into one host address space.
pub struct StaticMapping {
    space: Arc<dyn DmaSpace>,
    ranges: Mutex<BTreeMap<u64, StaticRange>>,
}

impl StaticMapping {
    /// Map every region of `mem` (IOVA == GPA, read/write). On failure nothing stays mapped.
    pub fn new<M: GuestMemoryBackend>(
        space: Arc<dyn DmaSpace>,
        mem: &M,
    ) -> Result<Self, HostMapError> {
        let s = StaticMapping {
            space,
            ranges: Mutex::new(BTreeMap::new()),
        };
        for r in mem.iter() {
            if let Err(e) = s.add_region(r) {
                if let Err(c) = s.clear() {
                    log::error!("viommu static map: cleanup after failure: {c}");
                }
                return Err(e);
            }
        }
        Ok(s)
    }

    /// Map one more guest RAM region (e.g. RAM added after the device was created).
    pub fn add_region<R: GuestMemoryRegion>(&self, region: &R) -> Result<(), HostMapError> {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| HostMapError::Failed(format!("region without host memory: {e}")))?;
        // SAFETY: the region is guest RAM: shared with the guest, accessed by the VMM only
        // through vm-memory's volatile accessors.
        unsafe { self.add_range(region.start_addr().0, region.len(), host as u64, Prot::RW) }
    }

    /// Map GPA `gpa..gpa+size` -> host `host_addr` (e.g. another device's BAR for
    /// peer-to-peer DMA).
    ///
    /// # Safety
    /// As [`DmaSpace::map`]: the host range must be memory shared with the guest or a device.
    pub unsafe fn add_range(
        &self,
        gpa: u64,
        size: u64,
        host_addr: u64,
        prot: Prot,
    ) -> Result<(), HostMapError> {
        let last = size
            .checked_sub(1)
            .and_then(|l| gpa.checked_add(l))
            .ok_or(HostMapError::Invalid)?;
        let mut ranges = self.lock();
        if let Some((_, r)) = ranges.range(..=last).next_back() {
            if r.gpa + (r.size - 1) >= gpa {
                return Err(HostMapError::Invalid);
            }
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { self.space.map(gpa, size, host_addr, prot) }.inspect_err(|e| {
            log::warn!("viommu static map: map {gpa:#x}+{size:#x}: {e}");
        })?;
        ranges.insert(
            gpa,
            StaticRange {
                gpa,
                size,
                host_addr,
                prot,
            },
        );
        Ok(())
    }

    /// Unmap the range that starts at `gpa` (RAM removed, BAR moved).
    pub fn remove(&self, gpa: u64) -> Result<(), HostMapError> {
        let mut ranges = self.lock();
        let r = *ranges.get(&gpa).ok_or(HostMapError::Invalid)?;
        self.space.unmap(r.gpa, r.size)?;
        ranges.remove(&gpa);
        Ok(())
    }

    /// Unmap everything (stops at the first host failure, leaving the rest recorded).
    pub fn clear(&self) -> Result<(), HostMapError> {
        let mut ranges = self.lock();
        while let Some((&gpa, r)) = ranges.iter().next() {
            self.space.unmap(gpa, r.size)?;
            ranges.remove(&gpa);
        }
        Ok(())
    }

    /// The ranges mapped now, in address order.
    pub fn ranges(&self) -> Vec<StaticRange> {
        self.lock().values().copied().collect()
    }

    /// The host address space.
    pub fn space(&self) -> &Arc<dyn DmaSpace> {
        &self.space
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, StaticRange>> {
        self.ranges.lock().unwrap_or_else(|e| e.into_inner())
    }
}
