//! Address-range buses for port I/O and MMIO exits: devices register a range and get
//! accesses with the offset into it. Accesses no device claims go to an optional fallback
//! (the PCI bus: CF8/CFC, ECAM and BARs).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through a [`Bus`] range.
pub trait BusDevice: Send {
    /// Read `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Write `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors registering a device range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a registered one or is empty/overflows.
    #[error("bus range {0:#x}+{1:#x} overlaps an existing device or is invalid")]
    Overlap(u64, u64),
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Register `dev` for `[base, base + len)`.
    pub fn insert(
        &self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Overlap(base, len))?;
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        if let Some((b, (l, _))) = ranges.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap(base, len));
            }
        }
        lockwatch::name(&*dev, format!("port/MMIO device at {base:#x}"));
        ranges.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (base, (rlen, dev)) = ranges.range(..=addr).next_back()?;
        let off = addr - base;
        // The whole access must fall inside the range.
        if off.checked_add(len as u64)? <= *rlen {
            Some((off, dev.clone()))
        } else {
            None
        }
    }

    /// Dispatch a read; false when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                lockwatch::lock(&*dev).read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch a write; false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                lockwatch::lock(&*dev).write(off, data);
                true
            }
            None => false,
        }
    }
}

/// Handler for accesses no registered range claims (implemented by the PCI glue).
pub trait Fallback: Send + Sync {
    /// Port read; false if unclaimed.
    fn pio_read(&self, port: u16, data: &mut [u8]) -> bool;
    /// Port write; false if unclaimed.
    fn pio_write(&self, port: u16, data: &[u8]) -> bool;
    /// MMIO read; false if unclaimed.
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool;
    /// MMIO write; false if unclaimed.
    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool;
}

/// The port I/O and MMIO buses a vCPU dispatches exits to.
#[derive(Default)]
pub struct Buses {
    /// Port I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// Where unclaimed accesses go.
    pub fallback: RwLock<Option<Arc<dyn Fallback>>>,
}

impl Buses {
    /// Empty buses.
    pub fn new() -> Buses {
        Buses::default()
    }

    /// Set the handler for unclaimed accesses.
    pub fn set_fallback(&self, f: Arc<dyn Fallback>) {
        *self.fallback.write().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    fn fallback(&self) -> Option<Arc<dyn Fallback>> {
        self.fallback
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Port read exit. Unclaimed reads return all ones.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.pio.read(port.into(), data) {
            return;
        }
        if let Some(f) = self.fallback() {
            if f.pio_read(port, data) {
                return;
            }
        }
        log::trace!("unhandled port read {port:#x} ({} bytes)", data.len());
        data.fill(0xff);
    }

    /// Port write exit.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if self.pio.write(port.into(), data) {
            return;
        }
        if let Some(f) = self.fallback() {
            if f.pio_write(port, data) {
                return;
            }
        }
        log::trace!("unhandled port write {port:#x} {data:x?}");
    }

    /// Port read exit of `data.len() / size` elements of `size` bytes each (`rep insb/w/d` gives
    /// several; a plain `in` one): each element is its own access, in order, as on hardware.
    /// A size that does not divide the data area (never given by KVM) is one access.
    pub fn pio_read_elements(&self, port: u16, data: &mut [u8], size: usize) {
        match element_size(data.len(), size) {
            Some(size) => data
                .chunks_exact_mut(size)
                .for_each(|el| self.pio_read(port, el)),
            None => self.pio_read(port, data),
        }
    }

    /// Port write exit of `data.len() / size` elements (`rep outsb/w/d`); see
    /// [`Buses::pio_read_elements`].
    pub fn pio_write_elements(&self, port: u16, data: &[u8], size: usize) {
        match element_size(data.len(), size) {
            Some(size) => data
                .chunks_exact(size)
                .for_each(|el| self.pio_write(port, el)),
            None => self.pio_write(port, data),
        }
    }

    /// MMIO read exit. Unclaimed reads return all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if self.mmio.read(addr, data) {
            return;
        }
        if let Some(f) = self.fallback() {
            if f.mmio_read(addr, data) {
                return;
            }
        }
        log::debug!("unhandled MMIO read {addr:#x} ({} bytes)", data.len());
        data.fill(0xff);
    }

    /// MMIO write exit.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if self.mmio.write(addr, data) {
            return;
        }
        if let Some(f) = self.fallback() {
            if f.mmio_write(addr, data) {
                return;
            }
        }
        log::debug!("unhandled MMIO write {addr:#x} {data:x?}");
    }
}

/// The element size of a port I/O exit whose data area is `len` bytes, if it splits evenly.
fn element_size(len: usize, size: usize) -> Option<usize> {
    (size > 0 && len.is_multiple_of(size) && len > size).then_some(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        log: Vec<(bool, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
            self.log.push((false, offset, data.to_vec()));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.log.push((true, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder { log: vec![] }));
        let b = Arc::new(Mutex::new(Recorder { log: vec![] }));
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x70, 2, b.clone()).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert!(bus.write(0x71, &[9]));
        assert!(!bus.write(0x72, &[9]));
        assert!(!bus.read(0x3f7, &mut d));
        // An access straddling the end of a range is not claimed.
        assert!(!bus.write(0x3ff, &[1, 2]));
        assert_eq!(a.lock().unwrap().log, vec![(false, 5, vec![5])]);
        assert_eq!(b.lock().unwrap().log, vec![(true, 1, vec![9])]);
    }

    #[test]
    fn rejects_overlaps() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder { log: vec![] }));
        bus.insert(0x100, 0x10, a.clone()).unwrap();
        assert!(bus.insert(0x10f, 1, a.clone()).is_err());
        assert!(bus.insert(0xf8, 9, a.clone()).is_err());
        assert!(bus.insert(0, 0, a.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, a.clone()).is_err());
        bus.insert(0x110, 1, a.clone()).unwrap();
        bus.insert(0xf0, 0x10, a).unwrap();
    }

    #[test]
    fn unclaimed_reads_float_high() {
        let buses = Buses::new();
        let mut d = [0u8; 4];
        buses.pio_read(0x1234, &mut d);
        assert_eq!(d, [0xff; 4]);
        buses.mmio_read(0xd000_0000, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn string_port_io_is_one_access_per_element() {
        let buses = Buses::new();
        let dev = Arc::new(Mutex::new(Recorder { log: vec![] }));
        buses.pio.insert(0x80, 4, dev.clone()).unwrap();
        // rep outsw of three words to port 0x80: three 2-byte writes in order.
        buses.pio_write_elements(0x80, &[1, 2, 3, 4, 5, 6], 2);
        // rep insb of four bytes from port 0x81: four 1-byte reads.
        let mut d = [0u8; 4];
        buses.pio_read_elements(0x81, &mut d, 1);
        assert_eq!(d, [1; 4]);
        // A plain 4-byte out is one access.
        buses.pio_write_elements(0x80, &[7, 8, 9, 10], 4);
        // An element count of 2 dwords on a 4-byte range: each dword fits, so both land.
        buses.pio_write_elements(0x80, &[1, 1, 1, 1, 2, 2, 2, 2], 4);
        let log = dev.lock().unwrap().log.clone();
        assert_eq!(
            log,
            vec![
                (true, 0, vec![1, 2]),
                (true, 0, vec![3, 4]),
                (true, 0, vec![5, 6]),
                (false, 1, vec![1]),
                (false, 1, vec![1]),
                (false, 1, vec![1]),
                (false, 1, vec![1]),
                (true, 0, vec![7, 8, 9, 10]),
                (true, 0, vec![1, 1, 1, 1]),
                (true, 0, vec![2, 2, 2, 2]),
            ]
        );
        // Sizes that do not split the area evenly fall back to one access.
        assert_eq!(element_size(6, 4), None);
        assert_eq!(element_size(6, 0), None);
        assert_eq!(element_size(2, 2), None);
        assert_eq!(element_size(8, 2), Some(2));
    }
}
