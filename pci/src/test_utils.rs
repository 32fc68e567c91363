//! Test doubles (feature `test-utils`): a fake VFIO device that behaves like the kernel's
//! vfio-pci where it matters (SET_IRQS enable/update rules, region bounds) and fake KVM memory
//! slots, for this crate's tests of [`crate::VfioPciDevice`] and for fuzzers.

use crate::memory_slot::MemorySlotManager;
use crate::vfio_backend::{IrqInfo, RegionInfo, VfioBackend, VFIO_PCI_CONFIG_REGION_INDEX};
use crate::vfio_pci::PAGE_SIZE;
use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;

/// Layout of the fake device: `MSIX_CAP`.
pub const MSIX_CAP: u16 = 0xb0;
/// Layout of the fake device: `MSI_CAP`.
pub const MSI_CAP: u16 = 0x50;
/// Layout of the fake device: `PCIE_CAP`.
pub const PCIE_CAP: u16 = 0x70;
/// Layout of the fake device: `BAR0_SIZE`.
pub const BAR0_SIZE: u64 = 0x4000;
/// Layout of the fake device: `TABLE`.
pub const TABLE: u64 = 0x2000;
/// Layout of the fake device: `PBA`.
pub const PBA: u64 = 0x3000;
/// Layout of the fake device: `HOST_BASE`.
pub const HOST_BASE: u64 = 0x7f00_0000_0000;

/// A fake vfio-pci device: an NVMe-like function with a 64-bit BAR 0 holding the MSI-X table
/// and PBA, an I/O BAR 2, a sparse-mmappable prefetchable BAR 3, a ROM, and capabilities PM,
/// MSI, PCIe, MSI-X and Advanced Features.
pub struct FakeVfio {
    /// The device's config space (4 KiB).
    pub config: Mutex<Vec<u8>>,
    /// Every config write forwarded to the device: (offset, bytes).
    pub config_writes: Mutex<Vec<(u64, Vec<u8>)>>,
    /// VFIO regions by index.
    pub regions: HashMap<u32, RegionInfo>,
    /// Contents of the BAR regions.
    pub bar_data: Mutex<HashMap<u32, Vec<u8>>>,
    /// Every BAR write forwarded: (region, offset, bytes).
    pub bar_writes: Mutex<Vec<(u32, u64, Vec<u8>)>>,
    /// mmaps made: (region, offset, size, host address).
    pub mmaps: Mutex<Vec<(u32, u64, u64, u64)>>,
    /// munmaps made: (host address, size).
    pub munmaps: Mutex<Vec<(u64, u64)>>,
    /// Refuse every mmap (ENOMEM).
    pub fail_mmap: bool,
    /// Vectors VFIO offers per interrupt index.
    pub irq_counts: HashMap<u32, u32>,
    /// Per interrupt index: the fd of each enabled vector (absent: index disabled).
    pub irqs: Mutex<HashMap<u32, Vec<RawFd>>>,
    /// Every SET_IRQS call: (index, start, count).
    pub set_irq_calls: Mutex<Vec<(u32, u32, usize)>>,
    /// VFIO_DEVICE_RESET calls.
    pub resets: Mutex<u32>,
}

/// Write `v` little-endian at `o`.
pub fn put32(cfg: &mut [u8], o: usize, v: u32) {
    cfg[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

impl FakeVfio {
    /// The device described above.
    pub fn new() -> Self {
        let mut cfg = vec![0u8; 4096];
        put32(&mut cfg, 0x00, 0x0010_1b36);
        put32(&mut cfg, 0x08, 0x0108_0202);
        put32(&mut cfg, 0x04, 0x0010_0000); // status: capability list
        put32(&mut cfg, 0x10, 0x4); // BAR0: 64-bit memory
        put32(&mut cfg, 0x18, 0x1); // BAR2: I/O
        put32(&mut cfg, 0x1c, 0x8); // BAR3: 32-bit prefetchable
        put32(&mut cfg, 0x2c, 0x1100_1af4);
        put32(&mut cfg, 0x30, 0xfeb0_0000); // ROM address on the host
        cfg[0x34] = 0x40;
        cfg[0x3d] = 1; // INTA on the host
        cfg[0x40..0x48].copy_from_slice(&[0x01, 0x50, 0x03, 0x00, 0x08, 0, 0, 0]); // PM
        cfg[0x50..0x54].copy_from_slice(&[0x05, 0x70, 0x84, 0x01]); // MSI 64-bit, PVM, 4 vectors
        cfg[0x70..0x74].copy_from_slice(&[0x10, 0xb0, 0x02, 0x00]); // PCIe endpoint
        put32(&mut cfg, 0x74, 1 << 28); // DevCap: FLR capable
        put32(&mut cfg, 0x78, 0x2810); // DevCtl
        cfg[0xb0..0xb4].copy_from_slice(&[0x11, 0xc0, 0x03, 0x00]); // MSI-X, 4 vectors
        put32(&mut cfg, 0xb4, TABLE as u32);
        put32(&mut cfg, 0xb8, PBA as u32);
        cfg[0xc0..0xc4].copy_from_slice(&[0x13, 0x00, 0x06, 0x03]); // Advanced Features
        put32(&mut cfg, 0x100, 0x1401_0001); // AER extended capability
        let mut regions = HashMap::new();
        let mem = |size, mmap, sparse: Vec<(u64, u64)>| RegionInfo {
            size,
            readable: true,
            writable: true,
            mmap,
            sparse_areas: sparse,
            msix_mappable: false,
        };
        regions.insert(0, mem(BAR0_SIZE, true, vec![]));
        regions.insert(2, mem(0x100, false, vec![]));
        regions.insert(3, mem(0x2000, true, vec![(0x1000, 0x1000)]));
        regions.insert(6, mem(0x1_0000, false, vec![]));
        regions.insert(7, mem(4096, false, vec![]));
        let bar_data = [0u32, 2, 3]
            .into_iter()
            .map(|i| {
                let size = regions[&i].size as usize;
                (i, (0..size).map(|b| (b as u8) ^ (i as u8 * 0x40)).collect())
            })
            .collect();
        FakeVfio {
            config: Mutex::new(cfg),
            config_writes: Mutex::new(Vec::new()),
            regions,
            bar_data: Mutex::new(bar_data),
            bar_writes: Mutex::new(Vec::new()),
            mmaps: Mutex::new(Vec::new()),
            munmaps: Mutex::new(Vec::new()),
            fail_mmap: false,
            irq_counts: HashMap::from([(0, 1), (1, 4), (2, 4)]),
            irqs: Mutex::new(HashMap::new()),
            set_irq_calls: Mutex::new(Vec::new()),
            resets: Mutex::new(0),
        }
    }

    /// EINVAL unless `[offset, offset + len)` lies in region `index`.
    pub fn bounds(&self, index: u32, offset: u64, len: usize) -> io::Result<()> {
        let size = self.regions.get(&index).map_or(0, |r| r.size);
        if offset.checked_add(len as u64).is_some_and(|e| e <= size) {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
    }

    /// The hardware raises `vector` of interrupt `index`: VFIO signals the programmed eventfd.
    pub fn fire(&self, index: u32, vector: usize) -> bool {
        let fd = self
            .irqs
            .lock()
            .unwrap()
            .get(&index)
            .and_then(|fds| fds.get(vector).copied())
            .unwrap_or(-1);
        if fd < 0 {
            return false;
        }
        let one = 1u64;
        // SAFETY: `fd` is an eventfd owned by the device under test, programmed into this fake
        // and alive until it is reprogrammed; the 8-byte buffer is valid for the call.
        let n = unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
        n == 8
    }

    /// Vectors enabled on interrupt `index` (`None`: disabled).
    pub fn enabled_vectors(&self, index: u32) -> Option<usize> {
        self.irqs.lock().unwrap().get(&index).map(Vec::len)
    }

    /// Forwarded config writes touching `[start, end)`.
    pub fn forwarded_to(&self, start: u64, end: u64) -> Vec<(u64, Vec<u8>)> {
        self.config_writes
            .lock()
            .unwrap()
            .iter()
            .filter(|(o, d)| *o < end && o + d.len() as u64 > start)
            .cloned()
            .collect()
    }
}

impl Default for FakeVfio {
    fn default() -> Self {
        Self::new()
    }
}

impl VfioBackend for FakeVfio {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        self.regions.get(&index).cloned()
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        self.bounds(index, offset, data.len())?;
        let o = offset as usize;
        if index == VFIO_PCI_CONFIG_REGION_INDEX {
            data.copy_from_slice(&self.config.lock().unwrap()[o..o + data.len()]);
        } else {
            let bars = self.bar_data.lock().unwrap();
            data.copy_from_slice(&bars[&index][o..o + data.len()]);
        }
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.bounds(index, offset, data.len())?;
        let o = offset as usize;
        if index == VFIO_PCI_CONFIG_REGION_INDEX {
            self.config_writes
                .lock()
                .unwrap()
                .push((offset, data.to_vec()));
            // Like hardware behind vfio-pci, only some registers take writes.
            let mut cfg = self.config.lock().unwrap();
            for (i, &b) in data.iter().enumerate() {
                if matches!(o + i, 0x04..=0x07 | 0x0c | 0x44..=0x47 | 0x78..=0x79) {
                    cfg[o + i] = b;
                }
            }
        } else {
            self.bar_writes
                .lock()
                .unwrap()
                .push((index, offset, data.to_vec()));
            let mut bars = self.bar_data.lock().unwrap();
            bars.get_mut(&index).unwrap()[o..o + data.len()].copy_from_slice(data);
        }
        Ok(())
    }

    fn mmap(&self, index: u32, offset: u64, size: u64, _writable: bool) -> io::Result<u64> {
        let info = self.regions.get(&index).unwrap();
        assert!(info.mmap, "mmap of a region without the mmap flag");
        assert_eq!(offset % PAGE_SIZE, 0);
        assert_eq!(size % PAGE_SIZE, 0);
        self.bounds(index, offset, size as usize)?;
        if self.fail_mmap {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        let mut mmaps = self.mmaps.lock().unwrap();
        let host = HOST_BASE + mmaps.len() as u64 * 0x10_0000;
        mmaps.push((index, offset, size, host));
        Ok(host)
    }

    fn munmap(&self, host_addr: u64, size: u64) {
        self.munmaps.lock().unwrap().push((host_addr, size));
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        self.irq_counts.get(&index).map(|&count| IrqInfo { count })
    }

    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[RawFd]) -> io::Result<()> {
        self.set_irq_calls
            .lock()
            .unwrap()
            .push((index, start, fds.len()));
        let einval = || Err(io::Error::from_raw_os_error(libc::EINVAL));
        let max = self.irq_counts.get(&index).copied().unwrap_or(0) as usize;
        let mut irqs = self.irqs.lock().unwrap();
        if irqs.keys().any(|&k| k != index) {
            return einval(); // vfio-pci: one interrupt type at a time
        }
        let start = start as usize;
        match irqs.get_mut(&index) {
            None if start == 0 && !fds.is_empty() && fds.len() <= max => {
                irqs.insert(index, fds.to_vec());
                Ok(())
            }
            Some(cur) if start + fds.len() <= cur.len() => {
                cur[start..start + fds.len()].copy_from_slice(fds);
                Ok(())
            }
            _ => einval(),
        }
    }

    fn disable_irq(&self, index: u32) -> io::Result<()> {
        self.irqs.lock().unwrap().remove(&index);
        Ok(())
    }

    fn reset(&self) -> io::Result<()> {
        *self.resets.lock().unwrap() += 1;
        Ok(())
    }
}

/// KVM memory slots: overlapping slots are refused like KVM does (EEXIST).
#[derive(Default)]
pub struct FakeSlots {
    /// Last slot id handed out.
    pub next: Mutex<u32>,
    /// Live slots: id -> (gpa, size, host, readonly).
    pub active: Mutex<HashMap<u32, (u64, u64, u64, bool)>>,
    /// Slots unmapped, in order.
    pub unmapped: Mutex<Vec<u32>>,
}

impl FakeSlots {
    /// Active slots as (gpa, size, host, readonly), sorted by gpa.
    pub fn active(&self) -> Vec<(u64, u64, u64, bool)> {
        let mut v: Vec<_> = self.active.lock().unwrap().values().copied().collect();
        v.sort();
        v
    }
}

impl MemorySlotManager for FakeSlots {
    fn map(&self, gpa: u64, size: u64, host_addr: u64, readonly: bool) -> io::Result<u32> {
        assert_eq!(gpa % PAGE_SIZE, 0);
        let mut active = self.active.lock().unwrap();
        if active
            .values()
            .any(|&(g, s, _, _)| gpa < g + s && g < gpa + size)
        {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        let mut next = self.next.lock().unwrap();
        *next += 1;
        active.insert(*next, (gpa, size, host_addr, readonly));
        Ok(*next)
    }

    fn unmap(&self, slot: u32) -> io::Result<()> {
        self.unmapped.lock().unwrap().push(slot);
        match self.active.lock().unwrap().remove(&slot) {
            Some(_) => Ok(()),
            None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}
