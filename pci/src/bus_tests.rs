//! Tests of config access decoding, BAR allocation and BAR dispatch on the bus.

use super::*;

/// (write?, bar, offset, len) of each BAR access.
type AccessLog = Arc<Mutex<Vec<(bool, u8, u64, usize)>>>;
/// (bar, address) of each `bar_assigned` call.
type AssignLog = Arc<Mutex<Vec<(u8, u64)>>>;

/// A device with a 32-bit, a 64-bit and an I/O BAR that records what reaches it.
struct TestDevice {
    config: PciConfigSpace,
    accesses: AccessLog,
    assigned: AssignLog,
}

fn test_device() -> (SharedDevice, AccessLog, AssignLog) {
    let mut config = PciConfigSpace::new(&PciHeader {
        vendor_id: 0x1234,
        device_id: 0x11,
        ..PciHeader::default()
    });
    let bars = [
        BarRegion {
            index: 0,
            size: 0x1000,
            kind: BarKind::Mem32,
            prefetchable: false,
        },
        BarRegion {
            index: 1,
            size: 0x4000,
            kind: BarKind::Mem64,
            prefetchable: true,
        },
        BarRegion {
            index: 3,
            size: 0x20,
            kind: BarKind::Io,
            prefetchable: false,
        },
    ];
    for b in &bars {
        config.add_bar(b).unwrap();
    }
    let accesses = Arc::new(Mutex::new(vec![]));
    let assigned = Arc::new(Mutex::new(vec![]));
    let dev = TestDevice {
        config,
        accesses: accesses.clone(),
        assigned: assigned.clone(),
    };
    (Arc::new(Mutex::new(dev)), accesses, assigned)
}

impl PciDevice for TestDevice {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data)
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data)
    }
    fn bar_regions(&self) -> Vec<BarRegion> {
        [0, 1, 3]
            .iter()
            .filter_map(|&i| self.config.bar(i))
            .collect()
    }
    fn bar_assigned(&mut self, index: u8, address: u64) {
        self.assigned.lock().unwrap().push((index, address));
        self.config.set_bar_address(index, address);
    }
    fn bar_address(&self, index: u8) -> Option<u64> {
        self.config.bar_address(index)
    }
    fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]) {
        self.accesses
            .lock()
            .unwrap()
            .push((false, index, offset, data.len()));
        data.fill(index + 1);
    }
    fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]) {
        self.accesses
            .lock()
            .unwrap()
            .push((true, index, offset, data.len()));
    }
}

const WINDOWS: PciWindows = PciWindows {
    mmio32: (0xc000_0000, 0x1000_0000),
    mmio64: (0x40_0000_0000, 0x10_0000_0000),
    io: (0x1000, 0x1000),
};

fn ecam(dev: u8, reg: u16) -> u64 {
    (u64::from(dev) << 15) | u64::from(reg)
}

fn ecam32(bus: &PciBus, offset: u64) -> u32 {
    let mut b = [0; 4];
    bus.ecam_read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn cf8_32(bus: &PciBus, address: u32, byte: u16, len: usize) -> u32 {
    assert!(bus.pio_write(0xcf8, &address.to_le_bytes()));
    let mut b = [0; 4];
    assert!(bus.pio_read(0xcfc + byte, &mut b[..len]));
    u32::from_le_bytes(b)
}

#[test]
fn bus_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<PciBus>();
}

#[test]
fn host_bridge_and_absent_functions() {
    let bus = PciBus::new(WINDOWS);
    let ids = u32::from(HOST_BRIDGE_DEVICE_ID) << 16 | u32::from(HOST_BRIDGE_VENDOR_ID);
    assert_eq!(ecam32(&bus, 0), ids);
    assert_eq!(ecam32(&bus, 8) >> 24, 0x06);
    assert_eq!(cf8_32(&bus, 0x8000_0000, 0, 4), ids);
    // 16-bit read of the device id through the upper half of the data port.
    assert_eq!(
        cf8_32(&bus, 0x8000_0000, 2, 2),
        u32::from(HOST_BRIDGE_DEVICE_ID)
    );
    // Absent device, function, bus: all ones.
    assert_eq!(ecam32(&bus, ecam(3, 0)), 0xffff_ffff);
    assert_eq!(ecam32(&bus, 1 << 12), 0xffff_ffff);
    assert_eq!(ecam32(&bus, 1 << 20), 0xffff_ffff);
    assert_eq!(cf8_32(&bus, 0x8000_1800, 0, 4), 0xffff_ffff);
    assert_eq!(cf8_32(&bus, 0x8001_0000, 0, 4), 0xffff_ffff);
    // Enable bit clear: all ones.
    assert_eq!(cf8_32(&bus, 0x0000_0000, 0, 4), 0xffff_ffff);
    // CONFIG_ADDRESS reads back without the reserved bits.
    let mut b = [0; 4];
    bus.pio_write(0xcf8, &0xffff_ffffu32.to_le_bytes());
    assert!(bus.pio_read(0xcf8, &mut b));
    assert_eq!(u32::from_le_bytes(b), 0x8fff_fffc);
    // Extended register bits 27:24 reach past the first 256 bytes (here: zero, not ones).
    assert_eq!(cf8_32(&bus, 0x8100_0000, 0, 4), 0);
    // Byte access to 0xcf9 (reset control) and unrelated ports are not ours.
    assert!(!bus.pio_write(0xcf9, &[6]));
    assert!(!bus.pio_read(0xcf8, &mut b[..2]));
    assert!(!bus.pio_read(0x3f8, &mut b[..1]));
}

#[test]
fn add_device_allocates_bars_in_windows() {
    let bus = PciBus::new(WINDOWS);
    let (dev, _, assigned) = test_device();
    assert_eq!(bus.add_device(dev).unwrap(), 1);
    let assigned = assigned.lock().unwrap().clone();
    assert_eq!(assigned.len(), 3);
    for &(index, addr) in &assigned {
        let (base, size, align) = match index {
            0 => (0xc000_0000, 0x1000_0000, 0x1000),
            1 => (0x40_0000_0000, 0x10_0000_0000, 0x4000),
            _ => (0x1000, 0x1000, 0x20),
        };
        assert!(
            addr >= base && addr < base + size,
            "BAR {index} at {addr:#x}"
        );
        assert_eq!(addr % align, 0);
    }
    // The guest sees the addresses in the BAR registers.
    let bar1 = assigned.iter().find(|a| a.0 == 1).unwrap().1;
    let low = ecam32(&bus, ecam(1, 0x14));
    let high = ecam32(&bus, ecam(1, 0x18));
    assert_eq!(u64::from(high) << 32 | u64::from(low & !0xf), bar1);
    assert_eq!(low & 0xf, 0xc);
    // A second device gets the next slot and different addresses.
    let (dev2, _, assigned2) = test_device();
    assert_eq!(bus.add_device(dev2).unwrap(), 2);
    let a2 = assigned2.lock().unwrap().clone();
    assert!(a2.iter().all(|x| !assigned.contains(x)));
    assert_eq!(ecam32(&bus, ecam(2, 0)), 0x0011_1234);
}

#[test]
fn sixty_four_bit_bars_fall_back_to_mmio32_and_windows_run_out() {
    let bus = PciBus::new(PciWindows {
        mmio32: (0xc000_0000, 0x8000),
        mmio64: (0, 0),
        io: (0x1000, 0x20),
    });
    let (dev, _, assigned) = test_device();
    bus.add_device(dev).unwrap();
    let bar1 = assigned
        .lock()
        .unwrap()
        .iter()
        .find(|a| a.0 == 1)
        .unwrap()
        .1;
    assert_eq!(bar1, 0xc000_4000);
    let (dev2, _, _) = test_device();
    assert!(matches!(
        bus.add_device(dev2),
        Err(PciError::BarAllocation { .. })
    ));
}

#[test]
fn fixed_device_numbers() {
    let bus = PciBus::new(WINDOWS);
    let (a, _, _) = test_device();
    let (b, _, _) = test_device();
    let (c, _, _) = test_device();
    assert_eq!(bus.add_device_at(5, a).unwrap(), 5);
    assert!(matches!(
        bus.add_device_at(5, b.clone()),
        Err(PciError::SlotTaken(5))
    ));
    assert!(matches!(
        bus.add_device_at(0, b.clone()),
        Err(PciError::SlotTaken(0))
    ));
    assert!(matches!(
        bus.add_device_at(32, b.clone()),
        Err(PciError::SlotTaken(32))
    ));
    assert_eq!(bus.add_device(b).unwrap(), 1);
    assert_eq!(bus.add_device(c).unwrap(), 2);
    assert_eq!(ecam32(&bus, ecam(5, 0)), 0x0011_1234);
}

#[test]
fn bus_full() {
    let bus = PciBus::new(PciWindows {
        mmio32: (0x1000_0000, 0x1000_0000),
        mmio64: (0, 0),
        io: (0, 0),
    });
    for i in 1..32u8 {
        let mut config = PciConfigSpace::new(&PciHeader {
            vendor_id: 1,
            ..PciHeader::default()
        });
        config
            .add_bar(&BarRegion {
                index: 0,
                size: 0x10,
                kind: BarKind::Mem32,
                prefetchable: false,
            })
            .unwrap();
        let d = TestDevice {
            config,
            accesses: Default::default(),
            assigned: Default::default(),
        };
        // The test device declares BARs 0, 1 and 3 only if present; here just BAR 0.
        assert_eq!(bus.add_device(Arc::new(Mutex::new(d))).unwrap(), i);
    }
    let config = PciConfigSpace::new(&PciHeader::default());
    let d = TestDevice {
        config,
        accesses: Default::default(),
        assigned: Default::default(),
    };
    assert!(matches!(
        bus.add_device(Arc::new(Mutex::new(d))),
        Err(PciError::BusFull)
    ));
}

#[test]
fn bar_dispatch_follows_decoding_and_moves() {
    let bus = PciBus::new(WINDOWS);
    let (dev, accesses, assigned) = test_device();
    let slot = bus.add_device(dev).unwrap();
    let addr = |i: u8| {
        assigned
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|a| a.0 == i)
            .unwrap()
            .1
    };
    let (bar0, bar1, io) = (addr(0), addr(1), addr(3) as u16);
    let mut b = [0u8; 4];
    // Decoding disabled: nothing answers.
    assert!(!bus.mmio_read(bar0, &mut b));
    assert!(!bus.pio_read(io, &mut b));
    assert!(bus.decoded_bars().is_empty());
    // Memory decoding on.
    bus.ecam_write(ecam(slot, 4), &2u16.to_le_bytes());
    let mut decoded = bus.decoded_bars();
    decoded.sort_by_key(|d| d.bar);
    assert_eq!(
        decoded,
        vec![
            DecodedBar {
                slot,
                bar: 0,
                start: bar0,
                size: 0x1000,
                io: false
            },
            DecodedBar {
                slot,
                bar: 1,
                start: bar1,
                size: 0x4000,
                io: false
            },
        ]
    );
    assert!(bus.mmio_read(bar0 + 0x10, &mut b));
    assert_eq!(b, [1; 4]);
    assert!(bus.mmio_write(bar1 + 0x3ff8, &[0; 8]));
    assert!(!bus.pio_read(io, &mut b));
    assert!(!bus.mmio_read(bar0 + 0x1000, &mut b));
    // Crossing the end of a BAR is absorbed, not forwarded.
    assert!(bus.mmio_read(bar0 + 0xffe, &mut b));
    assert_eq!(b, [0xff; 4]);
    // I/O decoding through CF8/CFC.
    bus.pio_write(
        0xcf8,
        &(0x8000_0004u32 | u32::from(slot) << 11).to_le_bytes(),
    );
    bus.pio_write(0xcfc, &3u16.to_le_bytes());
    assert!(bus.pio_write(io + 4, &[1, 2]));
    assert_eq!(
        *accesses.lock().unwrap(),
        vec![(false, 0, 0x10, 4), (true, 1, 0x3ff8, 8), (true, 3, 4, 2)]
    );
    // The guest moves BAR 0 with decoding on; the device is told and dispatch follows.
    bus.ecam_write(ecam(slot, 0x10), &0xd000_0000u32.to_le_bytes());
    assert_eq!(addr(0), 0xd000_0000);
    assert!(!bus.mmio_read(bar0, &mut b));
    assert!(bus.mmio_read(0xd000_0ffc, &mut b));
    assert_eq!(accesses.lock().unwrap().last(), Some(&(false, 0, 0xffc, 4)));
    // Sizing with decoding off, then restoring: no stale route remains.
    bus.ecam_write(ecam(slot, 4), &0u16.to_le_bytes());
    bus.ecam_write(ecam(slot, 0x10), &[0xff; 4]);
    assert_eq!(ecam32(&bus, ecam(slot, 0x10)), 0xffff_f000);
    bus.ecam_write(ecam(slot, 0x10), &0xd000_0000u32.to_le_bytes());
    assert!(!bus.mmio_read(0xd000_0000, &mut b));
    bus.ecam_write(ecam(slot, 4), &2u16.to_le_bytes());
    assert!(bus.mmio_read(0xd000_0000, &mut b));
}

use crate::msix::tests::FakeMsi;
use crate::virtio_pci::VirtioPciDevice;
use virtio_dev::{ActivateError, QueueConfig, VirtioDevice, VirtioInterrupt};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

struct Null;
impl VirtioDevice for Null {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[128]
    }
    fn device_features(&self) -> u64 {
        1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0x77);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        _mem: GuestMemoryAtomic<GuestMemoryMmap>,
        _acked: u64,
        _queues: Vec<QueueConfig>,
        _kicks: Vec<EventFd>,
        _interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        Ok(())
    }
    fn reset(&mut self) {}
}
struct NoIoEvents;
impl crate::irq::IoEventManager for NoIoEvents {
    fn register(&self, _fd: &EventFd, _addr: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("none"))
    }
    fn unregister(&self, _fd: &EventFd, _addr: u64) -> std::io::Result<()> {
        Ok(())
    }
}

fn virtio_device() -> SharedDevice {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let dev = VirtioPciDevice::new(
        Box::new(Null),
        GuestMemoryAtomic::new(mem),
        Arc::new(FakeMsi::default()),
        Arc::new(NoIoEvents),
    )
    .unwrap();
    Arc::new(Mutex::new(dev))
}

#[test]
fn virtio_device_on_the_bus() {
    let bus = PciBus::new(WINDOWS);
    let slot = bus.add_device(virtio_device()).unwrap();
    assert_eq!(ecam32(&bus, ecam(slot, 0)), 0x1042_1af4);
    let low = ecam32(&bus, ecam(slot, 0x10));
    let high = ecam32(&bus, ecam(slot, 0x14));
    let base = u64::from(high) << 32 | u64::from(low & !0xf);
    assert!(base >= 0x40_0000_0000);
    bus.ecam_write(ecam(slot, 4), &2u16.to_le_bytes());
    let mut b = [0u8; 2];
    assert!(bus.mmio_read(base + 0x12, &mut b));
    assert_eq!(u16::from_le_bytes(b), 1);
    let mut c = [0u8; 4];
    assert!(bus.mmio_read(base + 0x2000, &mut c));
    assert_eq!(c, [0x77; 4]);
}

#[test]
fn hostile_config_and_bar_accesses_do_not_panic() {
    let bus = PciBus::new(WINDOWS);
    let (dev, _, _) = test_device();
    let slot = bus.add_device(dev).unwrap();
    bus.ecam_write(ecam(slot, 4), &3u16.to_le_bytes());
    let offsets = [
        0u64,
        1,
        2,
        3,
        0xffd,
        0xffe,
        0xfff,
        0x1000,
        1 << 28,
        (1 << 28) - 1,
        u64::MAX,
        ecam(slot, 0x13),
        ecam(slot, 0xfff),
    ];
    for &o in &offsets {
        for len in [0usize, 1, 2, 3, 4, 8, 64] {
            let mut b = vec![0u8; len];
            bus.ecam_read(o, &mut b);
            if len != 1 && len != 2 && len != 4 || o % len as u64 != 0 || o >= 1 << 28 {
                assert!(b.iter().all(|&x| x == 0xff), "offset {o:#x} len {len}");
            }
            bus.ecam_write(o, &b);
        }
    }
    for port in 0xcf8..=0xcffu16 {
        for len in [0usize, 1, 2, 3, 4, 8] {
            let mut b = vec![0u8; len];
            bus.pio_write(0xcf8, &0x8000_0000u32.to_le_bytes());
            bus.pio_read(port, &mut b);
            bus.pio_write(port, &b);
        }
    }
    let mut big = vec![0u8; 64];
    assert!(!bus.mmio_read(u64::MAX, &mut big));
    assert!(!bus.mmio_write(0, &big));
    assert!(!bus.pio_read(u16::MAX, &mut big));
    // The device still works.
    assert_eq!(ecam32(&bus, ecam(slot, 0)), 0x0011_1234);
    assert_eq!(
        ecam32(&bus, 0),
        u32::from(HOST_BRIDGE_DEVICE_ID) << 16 | u32::from(HOST_BRIDGE_VENDOR_ID)
    );
}

/// Deterministic xorshift so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize]
    }
}

#[test]
fn random_guest_accesses_do_not_panic() {
    let bus = PciBus::new(WINDOWS);
    let (dev, _, _) = test_device();
    bus.add_device(dev).unwrap();
    bus.add_device(virtio_device()).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut bar_hits = 0;
    for _ in 0..100_000 {
        let len = rng.pick(&[0usize, 1, 2, 3, 4, 4, 4, 8]);
        let mut data = rng.next().to_le_bytes().to_vec();
        data.resize(len, 0);
        let write = rng.next() & 1 == 0;
        if rng.next() & 63 == 0 {
            // Keep decoding on most of the time so BAR accesses reach the devices.
            bus.ecam_write(ecam(rng.pick(&[1, 2]), 4), &[7, 0]);
        }
        match rng.next() % 3 {
            0 => {
                let off = ecam(rng.pick(&[0, 1, 2, 3]), (rng.next() % 0x1008) as u16);
                if write {
                    bus.ecam_write(off, &data)
                } else {
                    bus.ecam_read(off, &mut data)
                }
            }
            1 => {
                let port = rng.pick(&[
                    0xcf8u16, 0xcf9, 0xcfc, 0xcfd, 0xcfe, 0xcff, 0x1000, 0x1010, 0x101f,
                ]);
                if write {
                    bus.pio_write(port, &data);
                } else {
                    bus.pio_read(port, &mut data);
                }
            }
            _ => {
                // Somewhere around a BAR the guest currently programs.
                let slot = rng.pick(&[1u8, 2]);
                let low = ecam32(&bus, ecam(slot, 0x10)) & !0xf;
                let high = if slot == 2 {
                    ecam32(&bus, ecam(slot, 0x14))
                } else {
                    0
                };
                let base = u64::from(high) << 32 | u64::from(low);
                let addr = base.wrapping_add(rng.next() % 0x10010);
                let hit = if write {
                    bus.mmio_write(addr, &data)
                } else {
                    bus.mmio_read(addr, &mut data)
                };
                bar_hits += usize::from(hit);
            }
        }
    }
    let ids = u32::from(HOST_BRIDGE_DEVICE_ID) << 16 | u32::from(HOST_BRIDGE_VENDOR_ID);
    assert_eq!(ecam32(&bus, 0), ids);
    assert_eq!(ecam32(&bus, ecam(2, 0)), 0x1042_1af4);
    // The BAR accesses really reached devices.
    assert!(bar_hits > 1000, "only {bar_hits} BAR hits");
}
