//! VfioPciDevice driven through a fake VFIO device that behaves like the kernel's vfio-pci
//! where it matters (SET_IRQS enable/update rules, region bounds), a fake KVM slot manager and
//! the MSI fake of the msix tests.

use super::*;
use crate::bus::{PciBus, PciWindows};
use crate::irq::MsiMessage;
use crate::msix::tests::FakeMsi;
use crate::test_utils::*;
use std::collections::HashMap;
use std::sync::Mutex;

struct Rig {
    dev: VfioPciDevice,
    fake: Arc<FakeVfio>,
    msi: Arc<FakeMsi>,
    slots: Arc<FakeSlots>,
}

fn rig_with(fake: FakeVfio) -> Rig {
    let fake = Arc::new(fake);
    let msi = Arc::new(FakeMsi::default());
    let slots = Arc::new(FakeSlots::default());
    let dev = VfioPciDevice::new(fake.clone(), msi.clone(), slots.clone()).unwrap();
    Rig {
        dev,
        fake,
        msi,
        slots,
    }
}

fn rig() -> Rig {
    rig_with(FakeVfio::new())
}

impl Rig {
    fn r32(&mut self, o: u16) -> u32 {
        let mut b = [0; 4];
        self.dev.config_read(o, &mut b);
        u32::from_le_bytes(b)
    }

    fn r16(&mut self, o: u16) -> u16 {
        let mut b = [0; 2];
        self.dev.config_read(o, &mut b);
        u16::from_le_bytes(b)
    }

    fn w32(&mut self, o: u16, v: u32) {
        self.dev.config_write(o, &v.to_le_bytes());
    }

    fn w16(&mut self, o: u16, v: u16) {
        self.dev.config_write(o, &v.to_le_bytes());
    }

    /// Assign addresses like the bus does at plug time.
    fn place_bars(&mut self) {
        self.dev.bar_assigned(0, 0x1_0000_0000);
        self.dev.bar_assigned(2, 0xc000);
        self.dev.bar_assigned(3, 0xe000_0000);
    }

    fn bar_r32(&mut self, bar: u8, offset: u64) -> u32 {
        let mut b = [0; 4];
        self.dev.bar_read(bar, offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn bar_w32(&mut self, bar: u8, offset: u64, v: u32) {
        self.dev.bar_write(bar, offset, &v.to_le_bytes());
    }

    fn msix_entry(&mut self, v: u64, addr: u64, data: u32, masked: bool) {
        self.bar_w32(0, TABLE + v * 16, addr as u32);
        self.bar_w32(0, TABLE + v * 16 + 4, (addr >> 32) as u32);
        self.bar_w32(0, TABLE + v * 16 + 8, data);
        self.bar_w32(0, TABLE + v * 16 + 12, u32::from(masked));
    }

    fn msix_mask(&mut self, v: u64, masked: bool) {
        self.bar_w32(0, TABLE + v * 16 + 12, u32::from(masked));
    }

    /// The GSI whose route currently carries MSI data `data`.
    fn gsi_for(&self, data: u32) -> u32 {
        let routes = self.msi.routes.lock().unwrap();
        let mut last: HashMap<u32, Option<MsiMessage>> = HashMap::new();
        for (g, m) in routes.iter() {
            last.insert(*g, *m);
        }
        *last
            .iter()
            .find(|(_, m)| m.is_some_and(|m| m.data == data))
            .expect("a route with this data")
            .0
    }
}

#[test]
fn identity_and_header_passthrough_rom_and_intx_hidden() {
    let mut r = rig();
    assert_eq!(r.r32(0x00), 0x0010_1b36);
    assert_eq!(r.r32(0x08), 0x0108_0202);
    assert_eq!(r.r32(0x2c), 0x1100_1af4);
    // A multi-function host device shows up as a single function.
    r.fake.config.lock().unwrap()[0x0e] = 0x80;
    assert_eq!(r.r32(0x0c) >> 16 & 0xff, 0);
    // The host's ROM is hidden, even after a sizing write.
    assert_eq!(r.r32(0x30), 0);
    r.w32(0x30, 0xffff_ffff);
    assert_eq!(r.r32(0x30), 0);
    // No INTx: pin 0; the interrupt line is emulated and writable.
    r.w16(0x3c, 0x010b);
    assert_eq!(r.r16(0x3c), 0x000b);
    assert!(r.fake.forwarded_to(0x30, 0x40).is_empty());
    // Status comes from the device, the capability bit is ours.
    assert_eq!(r.r16(0x06) & 0x10, 0x10);
    // Device-owned registers are forwarded (cache line size).
    r.dev.config_write(0x0c, &[0x10]);
    assert_eq!(r.fake.forwarded_to(0x0c, 0x0d), vec![(0x0c, vec![0x10])]);
    assert_eq!(r.r32(0x0c) & 0xff, 0x10);
    // No extended capabilities, and writes there are dropped.
    assert_eq!(r.r32(0x100), 0);
    r.w32(0x100, 0xffff_ffff);
    assert!(r.fake.forwarded_to(0x100, 0x1000).is_empty());
}

#[test]
fn bar_sizing_is_emulated_and_never_forwarded() {
    let mut r = rig();
    let regions = r.dev.bar_regions();
    assert_eq!(
        regions,
        vec![
            BarRegion {
                index: 0,
                size: BAR0_SIZE,
                kind: BarKind::Mem64,
                prefetchable: false
            },
            BarRegion {
                index: 2,
                size: 0x100,
                kind: BarKind::Io,
                prefetchable: false
            },
            BarRegion {
                index: 3,
                size: 0x2000,
                kind: BarKind::Mem32,
                prefetchable: true
            },
        ]
    );
    r.place_bars();
    assert_eq!(r.r32(0x10), 0x0000_0004);
    assert_eq!(r.r32(0x14), 0x1);
    for o in (0x10..0x28).step_by(4) {
        r.w32(o, 0xffff_ffff);
    }
    assert_eq!(r.r32(0x10), 0xffff_c004);
    assert_eq!(r.r32(0x14), 0xffff_ffff);
    assert_eq!(r.r32(0x18), 0xffff_ff01);
    assert_eq!(r.r32(0x1c), 0xffff_e008);
    assert_eq!(r.r32(0x20), 0);
    assert_eq!(r.r32(0x24), 0);
    assert!(r.fake.forwarded_to(0x10, 0x28).is_empty());
    // The host's BAR registers are untouched.
    assert_eq!(r.fake.config.lock().unwrap()[0x10..0x14], [4, 0, 0, 0]);
}

#[test]
fn command_decode_bits_are_emulated_rest_forwarded() {
    let mut r = rig();
    r.w16(0x04, 0x0006); // memory + bus master
    assert_eq!(
        r.fake.forwarded_to(0x04, 0x06),
        vec![(0x04, vec![0x06, 0x00])]
    );
    // The host loses the decode bits (e.g. reset behind our back): the guest still reads its
    // own decode bits, but the device's bus master bit.
    r.fake.config.lock().unwrap()[0x04] = 0x00;
    assert_eq!(r.r16(0x04), 0x0002);
    // A dword write to command+status forwards status too (its RW1C bits), in one access.
    r.fake.config_writes.lock().unwrap().clear();
    r.w32(0x04, 0xf900_0400);
    assert_eq!(
        r.fake.forwarded_to(0x04, 0x08),
        vec![(0x04, vec![0x00, 0x04, 0x00, 0xf9])]
    );
    assert_eq!(r.r16(0x04) & 0x3, 0);
}

#[test]
fn capability_chain_is_rewritten() {
    let mut r = rig();
    let mut chain = vec![];
    let mut ptr = r.r32(0x34) as u8;
    while ptr != 0 {
        let hdr = r.r16(u16::from(ptr));
        chain.push((ptr, hdr as u8));
        ptr = (hdr >> 8) as u8;
    }
    assert_eq!(
        chain,
        vec![(0x40, 0x01), (0x50, 0x05), (0x70, 0x10), (0xb0, 0x11)]
    );
    // The hidden Advanced Features capability reads zero and ignores writes.
    assert_eq!(r.r32(0xc0), 0);
    r.w32(0xc4, 0x0100);
    assert!(r.fake.forwarded_to(0xc0, 0xc8).is_empty());
    // Power management is passed through both ways.
    assert_eq!(r.r32(0x44), 0x8);
    r.w16(0x44, 0x0003);
    assert_eq!(r.fake.forwarded_to(0x44, 0x46), vec![(0x44, vec![3, 0])]);
    // PCI Express registers pass through.
    assert_eq!(r.r32(PCIE_CAP + 4), 1 << 28);
    // Next pointers cannot be written.
    r.w32(0x40, 0xffff_ffff);
    assert_eq!(r.r16(0x40), 0x5001);
    assert_eq!(r.dev.capabilities().len(), 4);
}

#[test]
fn memory_decode_maps_and_unmaps_bar_slots() {
    let mut r = rig();
    r.place_bars();
    // BAR 0: pages 0-1 mappable (the table page 0x2000 and PBA page 0x3000 are trapped);
    // BAR 3: only its sparse area (second page).
    let mmaps = r.fake.mmaps.lock().unwrap().clone();
    assert_eq!(
        mmaps,
        vec![
            (0, 0, 0x2000, HOST_BASE),
            (3, 0x1000, 0x1000, HOST_BASE + 0x10_0000)
        ]
    );
    assert!(r.slots.active().is_empty());
    r.w16(0x04, 0x0003); // I/O + memory
    assert_eq!(
        r.slots.active(),
        vec![
            (0xe000_1000, 0x1000, HOST_BASE + 0x10_0000, false),
            (0x1_0000_0000, 0x2000, HOST_BASE, false),
        ]
    );
    let maps = r.dev.bar_maps();
    assert_eq!(maps.mappings().len(), 2);
    assert_eq!(maps.resolve(0x1_0000_0100, 8), Some(HOST_BASE + 0x100));
    assert_eq!(maps.resolve(0x1_0000_1ffc, 8), None); // crosses into the trapped page
    assert_eq!(maps.resolve(0xe000_1ff8, 8), Some(HOST_BASE + 0x10_0ff8));
    assert_eq!(maps.resolve(u64::MAX, 2), None);
    // Turning memory decoding off removes every slot; I/O decoding alone maps nothing.
    r.w16(0x04, 0x0001);
    assert!(r.slots.active().is_empty());
    assert!(maps.mappings().is_empty());
    assert_eq!(r.dev.bar_address(2), Some(0xc000));
    assert_eq!(r.dev.bar_address(0), None);
    r.w16(0x04, 0x0002);
    assert_eq!(r.slots.active().len(), 2);
}

#[test]
fn moving_a_bar_remaps_it() {
    let mut r = rig();
    r.place_bars();
    r.w16(0x04, 0x0002);
    // The guest moves BAR 0 (two dword writes, as Linux does).
    r.w32(0x10, 0x8000_0000);
    r.w32(0x14, 0x2);
    let active = r.slots.active();
    assert!(active.contains(&(0x2_8000_0000, 0x2000, HOST_BASE, false)));
    assert!(!active.iter().any(|s| s.0 == 0x1_0000_0000));
    assert_eq!(active.len(), 2);
    assert_eq!(
        r.dev.bar_maps().resolve(0x2_8000_0010, 4),
        Some(HOST_BASE + 0x10)
    );
    // Moving onto an occupied range: the slot manager refuses, accesses exit instead.
    r.w32(0x1c, 0x8000_0000);
    r.w32(0x14, 0x0);
    r.w32(0x10, 0x8000_0000);
    let active = r.slots.active();
    assert_eq!(active.len(), 1, "BAR 0 overlaps BAR 3's slot: {active:x?}");
    // bar_assigned (plug time, or the bus following a move) remaps too.
    r.dev.bar_assigned(0, 0x3_0000_0000);
    assert!(r
        .slots
        .active()
        .contains(&(0x3_0000_0000, 0x2000, HOST_BASE, false)));
}

#[test]
fn bus_integration_follows_guest_programming() {
    let fake = Arc::new(FakeVfio::new());
    let msi = Arc::new(FakeMsi::default());
    let slots = Arc::new(FakeSlots::default());
    let dev = VfioPciDevice::new(fake.clone(), msi, slots.clone()).unwrap();
    let bus = PciBus::new(PciWindows {
        mmio32: (0xc000_0000, 0x2000_0000),
        mmio64: (0x1_0000_0000, 0x1_0000_0000),
        io: (0x1000, 0x1000),
    });
    let slot = bus.add_device(Arc::new(Mutex::new(dev))).unwrap();
    let ecam = |reg: u64| (u64::from(slot) << 15) | reg;
    let mut b = [0u8; 4];
    bus.ecam_read(ecam(0), &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x0010_1b36);
    bus.ecam_write(ecam(4), &2u16.to_le_bytes());
    let decoded = bus.decoded_bars();
    let bar0 = decoded.iter().find(|d| d.bar == 0).unwrap();
    assert_eq!(bar0.size, BAR0_SIZE);
    assert_eq!(slots.active()[1].0, bar0.start);
    // An exit in BAR 0's register page reaches the VFIO region.
    let mut v = [0u8; 4];
    assert!(bus.mmio_read(bar0.start + 0x10, &mut v));
    assert_eq!(v, [0x10, 0x11, 0x12, 0x13]);
    // The MSI-X table page is emulated: all vectors masked.
    assert!(bus.mmio_read(bar0.start + TABLE + 12, &mut v));
    assert_eq!(u32::from_le_bytes(v), 1);
}

#[test]
fn bar_exits_go_to_the_region_except_msix() {
    let mut r = rig();
    r.place_bars();
    // Register page of BAR 0 (normally mapped; an exit still works).
    assert_eq!(r.bar_r32(0, 0x8), 0x0b0a_0908);
    r.bar_w32(0, 0x1000, 0xdead_beef);
    assert_eq!(
        r.fake.bar_writes.lock().unwrap().last().cloned(),
        Some((0, 0x1000, 0xdead_beefu32.to_le_bytes().to_vec()))
    );
    // Bytes of the trapped page outside the table and PBA go to the device too.
    let mut q = [0u8; 8];
    r.dev.bar_read(0, TABLE + 0x100, &mut q);
    assert_eq!(q, [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07]);
    // The table itself is emulated: the device's bytes are never read or written.
    r.bar_w32(0, TABLE, 0xfee0_0000);
    assert_eq!(r.bar_r32(0, TABLE), 0xfee0_0000);
    assert!(!r
        .fake
        .bar_writes
        .lock()
        .unwrap()
        .iter()
        .any(|w| w.1 == TABLE));
    // I/O BAR.
    let mut w = [0u8; 2];
    r.dev.bar_read(2, 0x10, &mut w);
    assert_eq!(w, [0x90, 0x91]);
    r.dev.bar_write(2, 0x20, &[1]);
    assert_eq!(
        r.fake.bar_writes.lock().unwrap().last().cloned(),
        Some((2, 0x20, vec![1]))
    );
    // Straddling the table, past the end, bad sizes, absent BARs: all-ones, nothing forwarded.
    let before = r.fake.bar_writes.lock().unwrap().len();
    r.dev.bar_read(0, TABLE - 4, &mut q);
    assert_eq!(q, [0xff; 8]);
    r.dev.bar_write(0, TABLE - 4, &[0; 8]);
    r.dev.bar_write(0, BAR0_SIZE - 2, &[0; 4]);
    r.dev.bar_write(0, 0, &[0; 16]);
    r.dev.bar_write(0, 0, &[]);
    r.dev.bar_write(1, 0, &[0; 4]);
    r.dev.bar_write(5, 0, &[0; 4]);
    assert_eq!(r.fake.bar_writes.lock().unwrap().len(), before);
    assert_eq!(r.bar_r32(4, 0), 0xffff_ffff);
}

#[test]
fn msix_vectors_signal_irqfds_through_vfio() {
    let mut r = rig();
    r.place_bars();
    r.msix_entry(0, 0xfee0_0000, 0x41, false);
    r.msix_entry(1, 0xfee0_1000, 0x42, true);
    assert_eq!(r.fake.enabled_vectors(VFIO_PCI_MSIX_IRQ_INDEX), None);
    // Enable MSI-X: VFIO gets all 4 vectors at once, vector 0 on its irqfd.
    r.w16(MSIX_CAP + 2, 0x8000);
    assert_eq!(r.r16(MSIX_CAP + 2), 0x8003);
    assert_eq!(r.fake.enabled_vectors(VFIO_PCI_MSIX_IRQ_INDEX), Some(4));
    let gsi0 = r.gsi_for(0x41);
    assert!(r.fake.fire(VFIO_PCI_MSIX_IRQ_INDEX, 0));
    assert_eq!(r.msi.fired(gsi0), 1);
    // Vector 1 was never unmasked: nothing listens (the guest did not set it up).
    assert!(!r.fake.fire(VFIO_PCI_MSIX_IRQ_INDEX, 1));
    // Mask vector 0: the interrupt becomes pending instead of reaching the guest...
    r.msix_mask(0, true);
    assert!(r.fake.fire(VFIO_PCI_MSIX_IRQ_INDEX, 0));
    assert_eq!(r.msi.fired(gsi0), 0);
    assert_eq!(r.bar_r32(0, PBA), 1);
    // ...and is delivered on unmask, which clears the pending bit.
    r.msix_mask(0, false);
    assert_eq!(r.msi.fired(gsi0), 1);
    assert_eq!(r.bar_r32(0, PBA), 0);
    // Unmasking vector 1 updates only that vector in VFIO.
    r.fake.set_irq_calls.lock().unwrap().clear();
    r.msix_mask(1, false);
    assert_eq!(
        *r.fake.set_irq_calls.lock().unwrap(),
        vec![(VFIO_PCI_MSIX_IRQ_INDEX, 1, 1)]
    );
    let gsi1 = r.gsi_for(0x42);
    assert!(r.fake.fire(VFIO_PCI_MSIX_IRQ_INDEX, 1));
    assert_eq!(r.msi.fired(gsi1), 1);
    // Function mask: both vectors pend (one VFIO call for the contiguous pair), and both fire
    // on function unmask.
    r.fake.set_irq_calls.lock().unwrap().clear();
    r.w16(MSIX_CAP + 2, 0xc000);
    assert_eq!(
        *r.fake.set_irq_calls.lock().unwrap(),
        vec![(VFIO_PCI_MSIX_IRQ_INDEX, 0, 2)]
    );
    assert_eq!(r.r16(MSIX_CAP + 2), 0xc003);
    assert!(r.fake.fire(VFIO_PCI_MSIX_IRQ_INDEX, 0));
    assert!(r.fake.fire(VFIO_PCI_MSIX_IRQ_INDEX, 1));
    assert_eq!(r.msi.fired(gsi0) + r.msi.fired(gsi1), 0);
    assert_eq!(r.bar_r32(0, PBA), 0b11);
    r.w16(MSIX_CAP + 2, 0x8000);
    assert_eq!((r.msi.fired(gsi0), r.msi.fired(gsi1)), (1, 1));
    // A new message for vector 0 reroutes its GSI.
    r.msix_entry(0, 0xfee0_2000, 0x51, false);
    assert_eq!(r.gsi_for(0x51), gsi0);
    // The physical MSI-X control is never touched by the guest.
    assert!(r
        .fake
        .forwarded_to(u64::from(MSIX_CAP), u64::from(MSIX_CAP) + 12)
        .is_empty());
    // Disable: VFIO's MSI-X is off and routes are gone.
    r.w16(MSIX_CAP + 2, 0x0000);
    assert_eq!(r.fake.enabled_vectors(VFIO_PCI_MSIX_IRQ_INDEX), None);
    assert_eq!(r.msi.last_route(gsi0), Some(None));
}

#[test]
fn msi_vectors_signal_irqfds_through_vfio() {
    let mut r = rig();
    let cap = MSI_CAP;
    assert_eq!(r.r16(cap + 2), 0x0184);
    r.w32(cap + 4, 0xfee0_0000);
    r.w32(cap + 8, 0);
    r.w16(cap + 12, 0x60);
    r.w16(cap + 2, 0x0011); // enable, 2 vectors
    assert_eq!(r.fake.enabled_vectors(VFIO_PCI_MSI_IRQ_INDEX), Some(2));
    let (g0, g1) = (r.gsi_for(0x60), r.gsi_for(0x61));
    assert!(r.fake.fire(VFIO_PCI_MSI_IRQ_INDEX, 1));
    assert_eq!((r.msi.fired(g0), r.msi.fired(g1)), (0, 1));
    // Per-vector mask: pending bit set, delivered on unmask.
    r.w32(cap + 16, 0b01);
    assert!(r.fake.fire(VFIO_PCI_MSI_IRQ_INDEX, 0));
    assert_eq!(r.msi.fired(g0), 0);
    assert_eq!(r.r32(cap + 20), 0b01);
    r.w32(cap + 16, 0);
    assert_eq!(r.msi.fired(g0), 1);
    assert_eq!(r.r32(cap + 20), 0);
    // More vectors while enabled: VFIO is re-enabled with the new count.
    r.w16(cap + 2, 0x0021);
    assert_eq!(r.fake.enabled_vectors(VFIO_PCI_MSI_IRQ_INDEX), Some(4));
    assert!(r.fake.fire(VFIO_PCI_MSI_IRQ_INDEX, 3));
    assert_eq!(r.msi.fired(r.gsi_for(0x63)), 1);
    // MSI-X cannot be enabled at the same time (vfio-pci refuses); nothing breaks.
    r.w16(MSIX_CAP + 2, 0x8000);
    assert_eq!(r.fake.enabled_vectors(VFIO_PCI_MSIX_IRQ_INDEX), None);
    r.w16(MSIX_CAP + 2, 0);
    r.w16(cap + 2, 0);
    assert_eq!(r.fake.enabled_vectors(VFIO_PCI_MSI_IRQ_INDEX), None);
    assert!(r
        .fake
        .forwarded_to(u64::from(cap), u64::from(cap) + 24)
        .is_empty());
}

#[test]
fn flr_resets_device_and_emulated_state() {
    let mut r = rig();
    r.place_bars();
    r.w16(0x04, 0x0006);
    r.msix_entry(0, 0xfee0_0000, 0x41, false);
    r.w16(MSIX_CAP + 2, 0x8000);
    assert_eq!(r.slots.active().len(), 2);
    // Device Control with Initiate FLR.
    let devctl = PCIE_CAP + 8;
    r.w16(devctl, 0xa810);
    assert_eq!(*r.fake.resets.lock().unwrap(), 1);
    // The FLR bit itself is not forwarded, the rest of Device Control is.
    assert_eq!(
        r.fake
            .forwarded_to(u64::from(devctl), u64::from(devctl) + 2),
        vec![(u64::from(devctl), vec![0x10, 0x28])]
    );
    assert_eq!(r.fake.enabled_vectors(VFIO_PCI_MSIX_IRQ_INDEX), None);
    assert!(r.slots.active().is_empty());
    assert_eq!(r.r16(0x04) & 0x3, 0);
    assert_eq!(r.r16(MSIX_CAP + 2), 0x0003);
    assert_eq!(r.bar_r32(0, TABLE + 12), 1);
    assert_eq!(r.bar_r32(0, TABLE), 0);
    // BAR addresses survive; re-enabling decoding maps again.
    r.w16(0x04, 0x0002);
    assert_eq!(r.slots.active().len(), 2);
    // VMM reset.
    r.dev.reset();
    assert_eq!(*r.fake.resets.lock().unwrap(), 2);
    assert!(r.slots.active().is_empty());
}

#[test]
fn drop_releases_slots_mmaps_and_interrupts() {
    let mut r = rig();
    r.place_bars();
    r.w16(0x04, 0x0002);
    r.msix_entry(0, 0xfee0_0000, 0x41, false);
    r.w16(MSIX_CAP + 2, 0x8000);
    let maps = r.dev.bar_maps();
    let Rig {
        dev,
        fake,
        msi,
        slots,
    } = r;
    let gsi = {
        let routes = msi.routes.lock().unwrap();
        routes[0].0
    };
    drop(dev);
    assert!(slots.active().is_empty());
    assert_eq!(fake.munmaps.lock().unwrap().len(), 2);
    assert_eq!(fake.enabled_vectors(VFIO_PCI_MSIX_IRQ_INDEX), None);
    assert!(maps.mappings().is_empty());
    assert_eq!(*msi.released.lock().unwrap(), vec![gsi]);
}

#[test]
fn unusable_msix_is_hidden_and_not_trapped() {
    // Table in the I/O BAR: MSI-X cannot be emulated there.
    let fake = FakeVfio::new();
    put32(&mut fake.config.lock().unwrap(), 0xb4, 0x2);
    let mut r = rig_with(fake);
    assert_eq!(r.r16(0x70) >> 8, 0); // PCIe is now last
    assert!(r.dev.capabilities().iter().all(|c| c.id != 0x11));
    // Nothing trapped in BAR 0: the whole BAR is mmapped.
    assert_eq!(
        r.fake.mmaps.lock().unwrap()[0],
        (0, 0, BAR0_SIZE, HOST_BASE)
    );

    // A table running past its BAR.
    let fake = FakeVfio::new();
    put32(&mut fake.config.lock().unwrap(), 0xb4, 0x3ff8);
    let mut r = rig_with(fake);
    assert_eq!(r.r16(0x70) >> 8, 0);

    // VFIO offering no MSI-X or MSI vectors.
    let mut fake = FakeVfio::new();
    fake.irq_counts.insert(VFIO_PCI_MSIX_IRQ_INDEX, 0);
    fake.irq_counts.remove(&VFIO_PCI_MSI_IRQ_INDEX);
    let mut r = rig_with(fake);
    assert_eq!(r.r16(0x40) >> 8, 0x70);
    assert_eq!(r.r16(0x70) >> 8, 0);
}

#[test]
fn mmap_failure_falls_back_to_exits() {
    let mut fake = FakeVfio::new();
    fake.fail_mmap = true;
    let mut r = rig_with(fake);
    r.place_bars();
    r.w16(0x04, 0x0002);
    assert!(r.slots.active().is_empty());
    assert_eq!(r.bar_r32(0, 0x4), 0x0706_0504);
}

#[test]
fn missing_config_region_is_an_error() {
    let mut fake = FakeVfio::new();
    fake.regions.remove(&VFIO_PCI_CONFIG_REGION_INDEX);
    let res = VfioPciDevice::new(
        Arc::new(fake),
        Arc::new(FakeMsi::default()),
        Arc::new(FakeSlots::default()),
    );
    assert!(matches!(res, Err(VfioPciError::NoConfigRegion)));
}

#[test]
fn hostile_accesses_do_not_panic() {
    let mut r = rig();
    r.place_bars();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let x = next();
        let len = (x % 10) as usize;
        let mut buf = vec![0u8; len];
        match (x >> 8) % 4 {
            0 => r.dev.config_read((x >> 16) as u16 % 0x1100, &mut buf),
            1 => {
                let o = (x >> 16) as u16 % 0x1100;
                // Keep the guest from resetting the test's own view too often.
                buf.fill((x >> 40) as u8);
                r.dev.config_write(o, &buf);
            }
            2 => {
                let off = if x & (1 << 60) != 0 {
                    u64::MAX - (x >> 50)
                } else {
                    (x >> 20) % 0x5000
                };
                r.dev.bar_read((x >> 32) as u8 % 8, off, &mut buf)
            }
            _ => {
                let off = if x & (1 << 60) != 0 {
                    u64::MAX - (x >> 50)
                } else {
                    (x >> 20) % 0x5000
                };
                buf.fill((x >> 40) as u8);
                r.dev.bar_write((x >> 32) as u8 % 8, off, &buf)
            }
        }
    }
    // Still the same device, still consistent.
    assert_eq!(r.r32(0x00), 0x0010_1b36);
    let active = r.slots.active();
    for w in active.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0);
    }
    r.dev.reset();
    assert!(r.slots.active().is_empty());
}
