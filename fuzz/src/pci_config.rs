//! Target (c): PCI configuration space through ECAM and CF8/CFC on a `PciBus` with the host
//! bridge and two virtio devices, plus BAR accesses wherever the guest moved the BARs.
//!
//! Invariants checked: no panic; absent functions read all-ones; identity registers (vendor,
//! device, class, header type, capability pointer) and the capability chains never change;
//! CONFIG_ADDRESS reads back what was written (masked); every decoding BAR decodes where its
//! register says, with its size.

use crate::fakes::{FakeIoEvents, FakeMsi};
use crate::virtio_pci::{cap_chain, cfg_addr, WINDOWS};
use crate::{Enc, Input};
use pci::{PciBus, VirtioPciDevice};
use std::sync::{Arc, Mutex};
use viommu::{Viommu, ViommuConfig};
use vm_memory::{GuestAddress, GuestMemoryAtomic};

const SLOTS: [u8; 3] = [0, 1, 5];

/// Opcodes.
pub mod op {
    /// Write CONFIG_ADDRESS (structured).
    pub const CF8: u8 = 0;
    /// Write CONFIG_ADDRESS (raw).
    pub const CF8_RAW: u8 = 1;
    /// Read/write CONFIG_DATA.
    pub const CFC: u8 = 2;
    /// ECAM read/write (structured).
    pub const ECAM: u8 = 3;
    /// ECAM read/write (raw offset).
    pub const ECAM_RAW: u8 = 4;
    /// Port I/O anywhere.
    pub const PIO: u8 = 5;
    /// MMIO at a decoding BAR.
    pub const BAR: u8 = 6;
    /// Number of opcodes.
    pub const COUNT: u8 = 7;
}

struct Harness {
    bus: PciBus,
    msi: Arc<FakeMsi>,
    ident: Vec<Vec<u8>>,
    caps: Vec<Vec<(u16, u8, u8)>>,
}

fn ident(bus: &PciBus, slot: u8) -> Vec<u8> {
    let mut v = Vec::new();
    for reg in [0u16, 8, 0x2c, 0x34] {
        let mut b = [0u8; 4];
        bus.ecam_read(cfg_addr(slot, reg), &mut b);
        v.extend_from_slice(&b);
    }
    let mut h = [0u8; 1];
    bus.ecam_read(cfg_addr(slot, 0x0e), &mut h);
    v.push(h[0]);
    v
}

fn len_sel(inp: &mut Input) -> usize {
    match inp.u8() {
        0..=0x3f => 1,
        0x40..=0x7f => 2,
        0x80..=0xef => 4,
        s => usize::from(s % 9),
    }
}

impl Harness {
    fn new() -> Self {
        let mem = crate::ram(&[(GuestAddress(0), 0x1_0000)]);
        let msi = Arc::new(FakeMsi::default());
        let io = Arc::new(FakeIoEvents::default());
        let bus = PciBus::new(WINDOWS);
        for &slot in &SLOTS[1..] {
            let mut iommu = Viommu::new(ViommuConfig::default()).expect("config");
            iommu.add_endpoint(0x08).expect("endpoint");
            let dev = VirtioPciDevice::new(
                Box::new(iommu),
                GuestMemoryAtomic::new(mem.clone()),
                msi.clone(),
                io.clone(),
            )
            .expect("virtio-pci");
            bus.add_device_at(slot, Arc::new(Mutex::new(dev)))
                .expect("slot");
        }
        let ident = SLOTS.iter().map(|&s| ident(&bus, s)).collect();
        let caps = SLOTS.iter().map(|&s| cap_chain(&bus, s)).collect();
        Harness {
            bus,
            msi,
            ident,
            caps,
        }
    }

    fn check(&self) {
        for (i, &s) in SLOTS.iter().enumerate() {
            assert_eq!(
                ident(&self.bus, s),
                self.ident[i],
                "identity of slot {s} changed"
            );
            assert_eq!(
                cap_chain(&self.bus, s),
                self.caps[i],
                "caps of slot {s} changed"
            );
        }
        let mut b = [0u8; 4];
        self.bus.ecam_read(cfg_addr(2, 0), &mut b);
        assert_eq!(b, [0xff; 4], "absent device");
        self.bus.ecam_read((1 << 20) | cfg_addr(1, 0), &mut b);
        assert_eq!(b, [0xff; 4], "bus 1 is empty");
        self.bus.ecam_read((1 << 12) | cfg_addr(1, 0), &mut b);
        assert_eq!(b, [0xff; 4], "function 1 is absent");
        for bar in self.bus.decoded_bars() {
            let reg = 0x10 + 4 * u16::from(bar.bar);
            let mut lo = [0u8; 4];
            let mut hi = [0u8; 4];
            self.bus.ecam_read(cfg_addr(bar.slot, reg), &mut lo);
            self.bus.ecam_read(cfg_addr(bar.slot, reg + 4), &mut hi);
            let lo = u32::from_le_bytes(lo);
            let addr = if lo & 1 != 0 {
                u64::from(lo & !3)
            } else if lo & 6 == 4 {
                (u64::from(u32::from_le_bytes(hi)) << 32) | u64::from(lo & !0xf)
            } else {
                u64::from(lo & !0xf)
            };
            assert_eq!(
                bar.start, addr,
                "BAR {} of slot {} decodes elsewhere",
                bar.bar, bar.slot
            );
            assert!(bar.size.is_power_of_two());
            assert_eq!(bar.start % bar.size, 0, "BAR not naturally aligned");
        }
        assert!(self.msi.routes() <= self.msi.live());
    }

    fn data_rw(&self, inp: &mut Input, read: impl Fn(&mut [u8]), write: impl Fn(&[u8])) {
        let len = len_sel(inp);
        if inp.u8() & 1 == 0 {
            let mut b = vec![0u8; len];
            read(&mut b);
        } else {
            let v = inp.u64().to_le_bytes();
            let mut b = vec![0u8; len];
            for (i, x) in b.iter_mut().enumerate() {
                *x = v[i % 8];
            }
            write(&b);
        }
    }

    fn step(&mut self, inp: &mut Input) {
        match inp.u8() % op::COUNT {
            op::CF8 => {
                let slot = SLOTS[usize::from(inp.u8()) % SLOTS.len()];
                let reg = u32::from(inp.u16() % 0x1000);
                let bus = u32::from(inp.u8() % 2);
                let func = u32::from(inp.u8() % 2);
                let v = (1 << 31)
                    | (bus << 16)
                    | (u32::from(slot) << 11)
                    | (func << 8)
                    | (reg & 0xfc)
                    | ((reg & 0xf00) << 16);
                self.bus.pio_write(0xcf8, &v.to_le_bytes());
                let mut back = [0u8; 4];
                assert!(self.bus.pio_read(0xcf8, &mut back));
                assert_eq!(u32::from_le_bytes(back), v, "CONFIG_ADDRESS read back");
            }
            op::CF8_RAW => {
                let v = inp.u32();
                let len = len_sel(inp);
                let port = 0xcf8 + u16::from(inp.u8() % 4);
                let b = v.to_le_bytes();
                let mut d = vec![0u8; len];
                for (i, x) in d.iter_mut().enumerate() {
                    *x = b[i % 4];
                }
                self.bus.pio_write(port, &d);
            }
            op::CFC => {
                let port = 0xcfc + u16::from(inp.u8() % 4);
                self.data_rw(
                    inp,
                    |b| {
                        assert!(self.bus.pio_read(port, b));
                    },
                    |b| {
                        assert!(self.bus.pio_write(port, b));
                    },
                );
            }
            op::ECAM => {
                let slot = SLOTS[usize::from(inp.u8()) % SLOTS.len()];
                let reg = inp.u16() % 0x1000;
                let off = cfg_addr(slot, reg);
                self.data_rw(
                    inp,
                    |b| self.bus.ecam_read(off, b),
                    |b| self.bus.ecam_write(off, b),
                );
            }
            op::ECAM_RAW => {
                let off = inp.u64() >> (inp.u8() % 64);
                self.data_rw(
                    inp,
                    |b| self.bus.ecam_read(off, b),
                    |b| self.bus.ecam_write(off, b),
                );
            }
            op::PIO => {
                let port = inp.u16();
                self.data_rw(
                    inp,
                    |b| {
                        self.bus.pio_read(port, b);
                    },
                    |b| {
                        self.bus.pio_write(port, b);
                    },
                );
            }
            _ => {
                let bars = self.bus.decoded_bars();
                let addr = match bars.get(usize::from(inp.u8()) % bars.len().max(1)) {
                    Some(b) => b.start.wrapping_add(u64::from(inp.u32()) % (b.size + 16)),
                    None => inp.u64(),
                };
                self.data_rw(
                    inp,
                    |b| {
                        self.bus.mmio_read(addr, b);
                    },
                    |b| {
                        self.bus.mmio_write(addr, b);
                    },
                );
            }
        }
    }
}

/// Run one fuzz input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut h = Harness::new();
    h.check();
    let mut steps = 0;
    while !inp.is_empty() && steps < 512 {
        h.step(&mut inp);
        steps += 1;
        // The full check reads ~50 registers: every few steps keeps the target fast.
        if steps % 8 == 0 {
            h.check();
        }
    }
    h.check();
}

/// Seed inputs.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    // BAR sizing through CF8/CFC, reprogramming, enabling decoding, BAR access.
    let mut e = Enc::default();
    e.u8(op::CF8).u8(1).u16(0x10).u8(0).u8(0);
    e.u8(op::CFC).u8(0).u8(0x80).u8(1).u64(0xffff_ffff);
    e.u8(op::CFC).u8(0).u8(0x80).u8(0);
    e.u8(op::CFC).u8(0).u8(0x80).u8(1).u64(0xe000_0000);
    e.u8(op::CF8).u8(1).u16(0x14).u8(0).u8(0);
    e.u8(op::CFC).u8(0).u8(0x80).u8(1).u64(0);
    e.u8(op::CF8).u8(1).u16(4).u8(0).u8(0);
    e.u8(op::CFC).u8(0).u8(0x40).u8(1).u64(6);
    e.u8(op::BAR).u8(0).u32(0x14).u8(0x30).u8(0);
    out.push(("bar-sizing".to_string(), e.0));
    // ECAM walks of the capability lists and the extended space, byte writes everywhere.
    let mut e = Enc::default();
    for reg in (0x34u16..0x100).step_by(4) {
        e.u8(op::ECAM).u8(1).u16(reg).u8(0x80).u8(0);
        e.u8(op::ECAM).u8(2).u16(reg).u8(0).u8(1).u64(0xff);
    }
    e.u8(op::ECAM).u8(1).u16(0x100).u8(0x80).u8(0);
    e.u8(op::ECAM_RAW).u64(u64::MAX).u8(0).u8(0x80).u8(0);
    e.u8(op::PIO).u16(0xcf9).u8(0).u8(1).u64(6);
    out.push(("ecam-walk".to_string(), e.0));
    // Overlapping BARs of two devices.
    let mut e = Enc::default();
    for slot in [1u8, 2] {
        e.u8(op::ECAM)
            .u8(slot)
            .u16(0x10)
            .u8(0x80)
            .u8(1)
            .u64(0xd000_0000);
        e.u8(op::ECAM).u8(slot).u16(0x14).u8(0x80).u8(1).u64(0);
        e.u8(op::ECAM).u8(slot).u16(4).u8(0x40).u8(1).u64(2);
    }
    e.u8(op::BAR).u8(1).u32(0x3000).u8(0x80).u8(1).u64(0);
    out.push(("overlap".to_string(), e.0));
    out
}
