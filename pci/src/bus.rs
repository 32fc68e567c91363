//! PCI bus 0: the host bridge, up to 31 devices, config access through ECAM and CF8/CFC,
//! BAR allocation from the host bridge windows, and MMIO/PIO dispatch to decoding BARs.
//!
//! Locking: the device table and the BAR routing table are read-mostly `RwLock`s, each device
//! has its own `Mutex`. A BAR access takes the routing lock only to find the device, then
//! releases it before locking the device, so a device busy on one vCPU never blocks accesses
//! to the others.

use crate::bar::AddressAllocator;
use crate::config::{overlaps, PciConfigSpace, PciHeader, BAR0, BAR_END, COMMAND};
use crate::device::{BarKind, BarRegion, PciDevice};
use crate::PciError;
use log::debug;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Vendor ID of the host bridge at 00:00.0.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
/// Device ID of the host bridge at 00:00.0.
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;
/// The CONFIG_ADDRESS port of configuration mechanism #1.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// The CONFIG_DATA port of configuration mechanism #1 (through 0xcff).
pub const CONFIG_DATA_PORT: u16 = 0xcfc;
/// Device numbers on a bus.
pub const NUM_DEVICE_SLOTS: usize = 32;
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Enable, bus, device, function, register; bits 27:24 carry register bits 11:8 (the AMD
/// extension reaching the extended config space).
const CONFIG_ADDRESS_MASK: u32 = 0x8fff_fffc;

/// The address windows the host bridge forwards to PCI, as (base, size).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciWindows {
    /// Memory below 4 GiB for 32-bit BARs.
    pub mmio32: (u64, u64),
    /// Memory for 64-bit BARs (32-bit window used when this one is full).
    pub mmio64: (u64, u64),
    /// I/O ports for I/O BARs.
    pub io: (u16, u16),
}

type SharedDevice = Arc<Mutex<dyn PciDevice>>;

/// A BAR that currently decodes guest accesses (see [`PciBus::decoded_bars`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodedBar {
    /// Device number on bus 0.
    pub slot: u8,
    /// BAR index.
    pub bar: u8,
    /// First address (memory address or I/O port).
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// I/O port BAR rather than memory.
    pub io: bool,
}

/// A BAR that currently decodes: `[start, end)` goes to `bar` of the device in `slot`.
#[derive(Clone)]
struct Route {
    start: u64,
    end: u128,
    io: bool,
    slot: u8,
    bar: u8,
    device: SharedDevice,
}

struct Allocators {
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    io: AddressAllocator,
}

/// PCI segment 0, bus 0. Shared by vCPU threads as `Arc<PciBus>`.
pub struct PciBus {
    windows: PciWindows,
    slots: RwLock<Vec<Option<SharedDevice>>>,
    routes: RwLock<Vec<Route>>,
    allocators: Mutex<Allocators>,
    config_address: AtomicU32,
}

/// The host bridge: identity only.
struct HostBridge {
    config: PciConfigSpace,
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn bar_regions(&self) -> Vec<BarRegion> {
        Vec::new()
    }
    fn bar_assigned(&mut self, _index: u8, _address: u64) {}
    fn bar_address(&self, _index: u8) -> Option<u64> {
        None
    }
    fn bar_read(&mut self, _index: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _index: u8, _offset: u64, _data: &[u8]) {}
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Locks a device, recorded for the vmm's hang watchdog (see `lockwatch`).
fn lock_device(d: &SharedDevice) -> lockwatch::Guard<'_, dyn PciDevice> {
    lockwatch::lock(d)
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// A config access the bus accepts: 1, 2 or 4 bytes, naturally aligned, inside 4 KiB.
fn valid_config_access(reg: u16, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && usize::from(reg) % len == 0 && usize::from(reg) + len <= 4096
}

impl PciBus {
    /// A bus with the host bridge at 00:00.0 forwarding `windows`.
    pub fn new(windows: PciWindows) -> Self {
        let bridge = HostBridge {
            config: PciConfigSpace::new(&PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR_ID,
                device_id: HOST_BRIDGE_DEVICE_ID,
                class: 0x06,
                ..PciHeader::default()
            }),
        };
        let mut slots: Vec<Option<SharedDevice>> = vec![None; NUM_DEVICE_SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(bridge)));
        PciBus {
            windows,
            slots: RwLock::new(slots),
            routes: RwLock::new(Vec::new()),
            allocators: Mutex::new(Allocators {
                mmio32: AddressAllocator::new(windows.mmio32.0, windows.mmio32.1),
                mmio64: AddressAllocator::new(windows.mmio64.0, windows.mmio64.1),
                io: AddressAllocator::new(u64::from(windows.io.0), u64::from(windows.io.1)),
            }),
            config_address: AtomicU32::new(0),
        }
    }

    /// The windows given at creation (for the ACPI description of the host bridge).
    pub fn windows(&self) -> PciWindows {
        self.windows
    }

    /// Plug `dev` into the first free device number, allocate and program its BARs.
    /// Decoding stays disabled until the guest sets the command register.
    pub fn add_device(&self, dev: SharedDevice) -> Result<u8, PciError> {
        self.plug(None, dev)
    }

    /// Plug `dev` at device number `slot` (1..=31), e.g. to keep a topology described in ACPI
    /// stable. Fails with [`PciError::SlotTaken`] if the number is in use or out of range.
    pub fn add_device_at(&self, slot: u8, dev: SharedDevice) -> Result<u8, PciError> {
        self.plug(Some(slot), dev)
    }

    fn plug(&self, want: Option<u8>, dev: SharedDevice) -> Result<u8, PciError> {
        let mut slots = write(&self.slots);
        let slot = match want {
            Some(s) if slots.get(usize::from(s)).is_some_and(Option::is_none) => usize::from(s),
            Some(s) => return Err(PciError::SlotTaken(s)),
            None => slots
                .iter()
                .position(Option::is_none)
                .ok_or(PciError::BusFull)?,
        };
        lockwatch::name(&*dev, format!("pci 00:{slot:02x}.0"));
        {
            let mut guard = lock_device(&dev);
            let mut alloc = lock(&self.allocators);
            for bar in guard.bar_regions() {
                let addr = match bar.kind {
                    BarKind::Mem64 => alloc
                        .mmio64
                        .allocate(bar.size)
                        .or_else(|| alloc.mmio32.allocate(bar.size)),
                    BarKind::Mem32 => alloc.mmio32.allocate(bar.size),
                    BarKind::Io => alloc.io.allocate(bar.size),
                };
                let addr = addr.ok_or(PciError::BarAllocation {
                    size: bar.size,
                    kind: bar.kind,
                })?;
                debug!(
                    "pci: 00:{slot:02x}.0 BAR {} at {addr:#x} size {:#x}",
                    bar.index, bar.size
                );
                guard.bar_assigned(bar.index, addr);
            }
            self.refresh_routes(slot as u8, &dev, &mut *guard);
        }
        slots[slot] = Some(dev);
        Ok(slot as u8)
    }

    /// Port I/O: CF8/CFC config mechanism #1 and I/O BARs. False if the port is not ours
    /// (including byte/word accesses to 0xcf8..0xcfb: 0xcf9 is the PC reset register).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            CONFIG_ADDRESS_PORT if data.len() == 4 => {
                let v = self.config_address.load(Ordering::Acquire);
                data.copy_from_slice(&v.to_le_bytes());
                true
            }
            CONFIG_ADDRESS_PORT..=0xcfb => false,
            CONFIG_DATA_PORT..=0xcff => {
                match self.cf8_target(port, data.len()) {
                    Some((b, d, f, reg)) => self.config_read(b, d, f, reg, data),
                    None => data.fill(0xff),
                }
                true
            }
            _ => {
                data.fill(0xff);
                self.bar_access(true, u64::from(port), data.len(), |dev, bar, off| {
                    dev.bar_read(bar, off, data)
                })
            }
        }
    }

    /// Port I/O write; see [`PciBus::pio_read`].
    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match port {
            CONFIG_ADDRESS_PORT if data.len() == 4 => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.config_address
                    .store(v & CONFIG_ADDRESS_MASK, Ordering::Release);
                true
            }
            CONFIG_ADDRESS_PORT..=0xcfb => false,
            CONFIG_DATA_PORT..=0xcff => {
                if let Some((b, d, f, reg)) = self.cf8_target(port, data.len()) {
                    self.config_write(b, d, f, reg, data);
                }
                true
            }
            _ => self.bar_access(true, u64::from(port), data.len(), |dev, bar, off| {
                dev.bar_write(bar, off, data)
            }),
        }
    }

    /// ECAM read at `offset` inside the window (bus << 20 | dev << 15 | fn << 12 | reg).
    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        match Self::ecam_target(offset) {
            Some((b, d, f, reg)) => self.config_read(b, d, f, reg, data),
            None => data.fill(0xff),
        }
    }

    /// ECAM write; see [`PciBus::ecam_read`].
    pub fn ecam_write(&self, offset: u64, data: &[u8]) {
        if let Some((b, d, f, reg)) = Self::ecam_target(offset) {
            self.config_write(b, d, f, reg, data);
        }
    }

    /// Every BAR that decodes right now, e.g. to resolve a DMA address that targets a BAR.
    pub fn decoded_bars(&self) -> Vec<DecodedBar> {
        read(&self.routes)
            .iter()
            .map(|r| DecodedBar {
                slot: r.slot,
                bar: r.bar,
                start: r.start,
                size: (r.end - u128::from(r.start)) as u64,
                io: r.io,
            })
            .collect()
    }

    /// MMIO read from whichever enabled memory BAR holds `addr`; false if none does.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        data.fill(0xff);
        self.bar_access(false, addr, data.len(), |dev, bar, off| {
            dev.bar_read(bar, off, data)
        })
    }

    /// MMIO write; see [`PciBus::mmio_read`].
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.bar_access(false, addr, data.len(), |dev, bar, off| {
            dev.bar_write(bar, off, data)
        })
    }

    fn ecam_target(offset: u64) -> Option<(u8, u8, u8, u16)> {
        if offset >= 1 << 28 {
            virtio_dev::guest_warn!("pci: ECAM offset {offset:#x} beyond 256 buses");
            return None;
        }
        Some((
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            (offset & 0xfff) as u16,
        ))
    }

    fn cf8_target(&self, port: u16, len: usize) -> Option<(u8, u8, u8, u16)> {
        let byte = port - CONFIG_DATA_PORT;
        if usize::from(byte) + len > 4 {
            virtio_dev::guest_warn!(
                "pci: config data access at {port:#x} size {len} crosses the data port"
            );
            return None;
        }
        let a = self.config_address.load(Ordering::Acquire);
        if a & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            (((a >> 16) & 0xf00) | (a & 0xfc)) as u16 + byte,
        ))
    }

    fn device(&self, bus: u8, dev: u8, func: u8) -> Option<SharedDevice> {
        if bus != 0 || func != 0 {
            return None;
        }
        read(&self.slots).get(usize::from(dev)).cloned().flatten()
    }

    fn config_read(&self, bus: u8, dev: u8, func: u8, reg: u16, data: &mut [u8]) {
        if !valid_config_access(reg, data.len()) {
            virtio_dev::guest_warn!(
                "pci: bad config read {bus:02x}:{dev:02x}.{func} reg {reg:#x} size {}",
                data.len()
            );
            data.fill(0xff);
            return;
        }
        match self.device(bus, dev, func) {
            Some(d) => lock_device(&d).config_read(reg, data),
            None => data.fill(0xff),
        }
    }

    fn config_write(&self, bus: u8, dev: u8, func: u8, reg: u16, data: &[u8]) {
        if !valid_config_access(reg, data.len()) {
            virtio_dev::guest_warn!(
                "pci: bad config write {bus:02x}:{dev:02x}.{func} reg {reg:#x} size {}",
                data.len()
            );
            return;
        }
        let Some(d) = self.device(bus, dev, func) else {
            return;
        };
        let mut guard = lock_device(&d);
        guard.config_write(reg, data);
        if overlaps(reg, data.len(), COMMAND, COMMAND + 2)
            || overlaps(reg, data.len(), BAR0, BAR_END)
        {
            self.refresh_routes(dev, &d, &mut *guard);
        }
    }

    /// Recompute where the device in `slot` decodes. A BAR that starts decoding at a new
    /// address is reported to the device through `bar_assigned`. Called with the device locked.
    fn refresh_routes(&self, slot: u8, shared: &SharedDevice, dev: &mut dyn PciDevice) {
        let mut routes = write(&self.routes);
        let old: Vec<Route> = routes.iter().filter(|r| r.slot == slot).cloned().collect();
        routes.retain(|r| r.slot != slot);
        for bar in dev.bar_regions() {
            let Some(start) = dev.bar_address(bar.index) else {
                continue;
            };
            let moved = !old.iter().any(|r| r.bar == bar.index && r.start == start);
            if moved {
                dev.bar_assigned(bar.index, start);
            }
            routes.push(Route {
                start,
                end: u128::from(start) + u128::from(bar.size),
                io: bar.kind == BarKind::Io,
                slot,
                bar: bar.index,
                device: shared.clone(),
            });
        }
    }

    /// Find the BAR holding `[addr, addr + len)` and run `f` on its device, unlocked routes.
    fn bar_access(
        &self,
        io: bool,
        addr: u64,
        len: usize,
        f: impl FnOnce(&mut dyn PciDevice, u8, u64),
    ) -> bool {
        let found = read(&self.routes)
            .iter()
            .find(|r| r.io == io && r.start <= addr && u128::from(addr) < r.end)
            .map(|r| (r.device.clone(), r.bar, addr - r.start, r.end));
        let Some((device, bar, offset, end)) = found else {
            return false;
        };
        if len == 0 || len > 8 || u128::from(addr) + len as u128 > end {
            virtio_dev::guest_warn!(
                "pci: BAR access at {addr:#x} size {len} crosses the end of BAR {bar}"
            );
            return true;
        }
        f(&mut *lock_device(&device), bar, offset);
        true
    }
}

#[cfg(test)]
#[path = "bus_tests.rs"]
mod tests;
