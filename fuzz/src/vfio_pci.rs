//! Target: VFIO PCI passthrough emulation (`pci::VfioPciDevice`) over the fake vfio-pci device
//! of `pci::test_utils` (NVMe-like: 64-bit BAR 0 holding the MSI-X table and PBA, I/O BAR 2,
//! sparse-mmappable BAR 3, MSI, PCIe with FLR, MSI-X): config reads and writes anywhere (any
//! size, the decode bits, BAR sizing and moves, MSI and MSI-X control, FLR), BAR reads and
//! writes (the MSI-X table and PBA, straddling them, past the end), BAR placement as the bus
//! does it, interrupts raised by the "hardware", VMM resets; the fake's VFIO interrupt counts,
//! mmap support and MSI-X location vary with the input.
//!
//! Invariants checked after every step (besides the fakes' own: MSI routes only on live GSIs,
//! each released once, slots never overlapping, VFIO's SET_IRQS rules): identity registers and
//! the capability chain never change; memory slots exist only while memory decoding is on,
//! each one a BAR mmap at the BAR's current address, never over the MSI-X table or PBA pages;
//! the published BAR maps (for peer-to-peer DMA) equal the slots; no more MSI vectors than
//! the capabilities have entries; VFIO never has more vectors enabled than it offers. After a
//! reset: decoding off, no slot, no VFIO interrupt. At the end the device still answers
//! config and BAR reads with the hardware's bytes.

use crate::fakes::FakeMsi;
use crate::Input;
use pci::test_utils::{put32, FakeSlots, FakeVfio, PBA, TABLE};
use pci::{PciDevice, VfioPciDevice};
use std::sync::Arc;

const MSIX_CAP: u16 = 0xb0;
const MSI_CAP: u16 = 0x50;
/// PCIe device control (FLR is bit 15).
const DEVCTL: u16 = 0x78;
/// Where BARs go: BAR index -> address (as the bus would place them).
const PLACES: [(u8, u64); 3] = [(0, 0x1_0000_0000), (2, 0xc000), (3, 0xe000_0000)];
const PAGE: u64 = 4096;

struct Harness {
    dev: VfioPciDevice,
    fake: Arc<FakeVfio>,
    msi: Arc<FakeMsi>,
    slots: Arc<FakeSlots>,
    ident: Vec<u8>,
    caps: Vec<(u16, u8, u8)>,
    /// MSI-X table and PBA (BAR, offset, bytes) as the fake describes them.
    msix: Option<[(u8, u64, u64); 2]>,
}

fn cfg_read(dev: &mut VfioPciDevice, off: u16, len: usize) -> u64 {
    let mut b = [0u8; 8];
    dev.config_read(off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn cap_chain(dev: &mut VfioPciDevice) -> Vec<(u16, u8, u8)> {
    let mut out = Vec::new();
    let mut at = cfg_read(dev, 0x34, 1) as u8 & !3;
    while at != 0 && out.len() < 48 {
        let h = cfg_read(dev, u16::from(at), 2);
        out.push((u16::from(at), h as u8, (h >> 8) as u8));
        at = (h >> 8) as u8 & !3;
    }
    out
}

fn identity(dev: &mut VfioPciDevice) -> Vec<u8> {
    [0u16, 2, 8, 0x2c, 0x2e, 0x34]
        .iter()
        .flat_map(|&o| cfg_read(dev, o, 2).to_le_bytes()[..2].to_vec())
        .collect()
}

impl Harness {
    fn new(inp: &mut Input) -> Option<Self> {
        let mut fake = FakeVfio::new();
        let shape = inp.u8();
        if shape & 1 != 0 {
            fake.irq_counts.insert(2, u32::from(inp.u8() % 6));
        }
        if shape & 2 != 0 {
            fake.irq_counts.insert(1, u32::from(inp.u8() % 6));
        }
        fake.fail_mmap = shape & 4 != 0;
        let mut msix = Some([(0u8, TABLE, 4 * 16u64), (0, PBA, 8)]);
        if shape & 8 != 0 {
            // The MSI-X table somewhere else (maybe outside its BAR, or in the I/O BAR).
            let table = inp.u32();
            let pba = inp.u32();
            let cfg = &mut fake.config.lock().unwrap();
            put32(cfg, usize::from(MSIX_CAP) + 4, table);
            put32(cfg, usize::from(MSIX_CAP) + 8, pba);
            msix = Some([
                ((table & 7) as u8, u64::from(table & !7), 4 * 16),
                ((pba & 7) as u8, u64::from(pba & !7), 8),
            ]);
        }
        let fake = Arc::new(fake);
        let msi = Arc::new(FakeMsi::default());
        let slots = Arc::new(FakeSlots::default());
        let mut dev = VfioPciDevice::new(fake.clone(), msi.clone(), slots.clone()).ok()?;
        // MSI-X hidden (no VFIO vectors, a bad layout): nothing of it is emulated.
        let has_msix = cap_chain(&mut dev).iter().any(|c| c.1 == 0x11);
        if !has_msix {
            msix = None;
        }
        for &(bar, addr) in &PLACES {
            dev.bar_assigned(bar, addr);
        }
        let ident = identity(&mut dev);
        let caps = cap_chain(&mut dev);
        Some(Harness {
            dev,
            fake,
            msi,
            slots,
            ident,
            caps,
            msix,
        })
    }

    fn check(&mut self) {
        assert_eq!(
            identity(&mut self.dev),
            self.ident,
            "identity registers changed"
        );
        assert_eq!(
            cap_chain(&mut self.dev),
            self.caps,
            "capability chain changed"
        );
        let cmd = cfg_read(&mut self.dev, 4, 2);
        let slots = self.slots.active();
        if cmd & 2 == 0 {
            assert!(slots.is_empty(), "BAR slots while memory decoding is off");
        }
        let mmaps = self.fake.mmaps.lock().unwrap().clone();
        for &(gpa, size, host, _) in &slots {
            // A slot is one mmap, at its BAR's current address.
            let m = mmaps
                .iter()
                .find(|m| m.3 == host && m.2 == size)
                .unwrap_or_else(|| panic!("slot {gpa:#x}+{size:#x} -> {host:#x} is no BAR mmap"));
            let bar = m.0 as u8;
            let at = self.dev.bar_address(bar);
            assert_eq!(
                at.map(|a| a + m.1),
                Some(gpa),
                "slot of BAR {bar} not where it decodes"
            );
            for (sbar, o, l) in self.msix.into_iter().flatten() {
                if sbar == bar {
                    {
                        let (ps, pe) = (o / PAGE * PAGE, (o + l).div_ceil(PAGE) * PAGE);
                        let (ms, me) = (m.1, m.1 + m.2);
                        assert!(
                            me <= ps || ms >= pe || o >= self.fake.regions[&u32::from(bar)].size,
                            "BAR {bar} mmap {ms:#x}..{me:#x} over MSI-X page {ps:#x}"
                        );
                    }
                }
            }
        }
        let mut published: Vec<(u64, u64, u64)> = self
            .dev
            .bar_maps()
            .mappings()
            .iter()
            .map(|m| (m.gpa, m.size, m.host_addr))
            .collect();
        published.sort_unstable();
        let live: Vec<(u64, u64, u64)> = slots.iter().map(|s| (s.0, s.1, s.2)).collect();
        assert_eq!(published, live, "published BAR maps differ from the slots");
        // 4 MSI-X entries, MSI with 4 vectors (multiple message capable).
        assert!(self.msi.live() <= 8, "{} MSI vectors", self.msi.live());
        for (index, fds) in self.fake.irqs.lock().unwrap().iter() {
            let max = self.fake.irq_counts.get(index).copied().unwrap_or(0) as usize;
            assert!(
                fds.len() <= max,
                "VFIO index {index}: {} vectors",
                fds.len()
            );
        }
    }

    fn step(&mut self, inp: &mut Input) {
        match inp.u8() % 12 {
            0 | 1 => {
                // Config write: anywhere, or at the registers that matter.
                let off = match inp.u8() {
                    s @ 0..=0x7f => {
                        [4u16, 0x10, 0x14, 0x18, 0x1c, 0x30, 0x3c, MSI_CAP + 2][usize::from(s % 8)]
                            + u16::from(s >> 7)
                    }
                    s @ 0x80..=0xbf => {
                        [MSIX_CAP + 2, MSI_CAP + 4, MSI_CAP + 8, MSI_CAP + 12][usize::from(s % 4)]
                    }
                    _ => inp.u16() % 0x1010,
                };
                let len = [1, 2, 4, 4, 3, 8][usize::from(inp.u8() % 6)];
                let v = inp.u64().to_le_bytes();
                self.dev.config_write(off, &v[..len]);
            }
            2 => {
                let off = inp.u16() % 0x1010;
                let len = [1, 2, 4, 3, 8][usize::from(inp.u8() % 5)];
                cfg_read(&mut self.dev, off, len);
            }
            3 => {
                // Memory decoding on or off (and I/O, bus master).
                let v = u16::from(inp.u8() & 7);
                self.dev.config_write(4, &v.to_le_bytes());
            }
            4 | 5 => {
                // MSI-X table / PBA write (or near them).
                let [(bar, base, _), (pbar, pba, _)] =
                    self.msix.unwrap_or([(0, TABLE, 0), (0, PBA, 0)]);
                let (bar, off) = match inp.u8() {
                    s @ 0..=0xbf => (bar, base + u64::from(s % 0x48)),
                    s => (pbar, pba + u64::from(s % 16)),
                };
                let len = [4, 4, 8, 2, 1, 3][usize::from(inp.u8() % 6)];
                let v = inp.u64().to_le_bytes();
                self.dev.bar_write(bar, off, &v[..len]);
            }
            6 => {
                let bar = inp.u8() % 7;
                let off = u64::from(inp.u16()) % 0x5000;
                let len = usize::from(inp.u8() % 10);
                let mut b = vec![0u8; len];
                if inp.u8() & 1 == 0 {
                    self.dev.bar_read(bar, off, &mut b);
                } else {
                    b.fill(inp.u8());
                    self.dev.bar_write(bar, off, &b);
                }
            }
            7 => {
                // The bus moves a BAR (hot re-layout), or the guest reprograms it.
                let bar = inp.u8() % 6;
                let addr = match inp.u8() {
                    0..=0xbf => PLACES[usize::from(inp.u8() % 3)].1 + u64::from(inp.u8()) * PAGE,
                    _ => inp.u64(),
                };
                if inp.u8() & 1 == 0 {
                    self.dev.bar_assigned(bar, addr);
                } else {
                    let reg = 0x10 + 4 * u16::from(bar);
                    self.dev.config_write(reg, &(addr as u32).to_le_bytes());
                }
            }
            8 => {
                // The hardware raises an interrupt.
                let index = u32::from(inp.u8() % 3);
                let v = usize::from(inp.u8() % 6);
                self.fake.fire(index, v);
            }
            9 => {
                // FLR through PCIe device control.
                let v = u16::from(inp.u8()) << 8 | 0x10;
                self.dev.config_write(DEVCTL, &v.to_le_bytes());
                if v & 0x8000 != 0 {
                    self.after_reset();
                }
            }
            10 => {
                self.dev.reset();
                self.after_reset();
            }
            _ => {
                // Program an MSI-X entry and enable MSI-X (or MSI) in one go.
                let (bar, base) = self.msix.map_or((0, TABLE), |m| (m[0].0, m[0].1));
                let e = u64::from(inp.u8() % 4);
                let data = inp.u32();
                self.dev
                    .bar_write(bar, base + e * 16, &0xfee0_0000u32.to_le_bytes());
                self.dev
                    .bar_write(bar, base + e * 16 + 8, &data.to_le_bytes());
                self.dev.bar_write(
                    bar,
                    base + e * 16 + 12,
                    &u32::from(inp.u8() & 1).to_le_bytes(),
                );
                let ctl = inp.u8();
                if ctl & 1 != 0 {
                    self.dev.config_write(MSIX_CAP + 3, &[ctl & 0xc0]);
                } else {
                    self.dev.config_write(MSI_CAP + 2, &[ctl | 1, 0]);
                }
            }
        }
        self.check();
    }

    fn after_reset(&mut self) {
        assert_eq!(
            cfg_read(&mut self.dev, 4, 2) & 3,
            0,
            "decoding survived a reset"
        );
        assert!(self.slots.active().is_empty(), "slots survived a reset");
        assert!(
            self.fake.irqs.lock().unwrap().is_empty(),
            "VFIO interrupts survived a reset"
        );
    }
}

/// Run one fuzz input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let Some(mut h) = Harness::new(&mut inp) else {
        return;
    };
    h.check();
    let mut steps = 0;
    while !inp.is_empty() && steps < 256 {
        h.step(&mut inp);
        steps += 1;
    }
    if crate::debug() {
        eprintln!(
            "vfio_pci: {steps} steps, {} slots, {} MSI vectors ({} routes), VFIO irqs {:?}, {} SET_IRQS",
            h.slots.active().len(),
            h.msi.live(),
            h.msi.routes(),
            h.fake.irqs.lock().unwrap(),
            h.fake.set_irq_calls.lock().unwrap().len()
        );
    }
    // Still answering with the hardware's bytes.
    assert_eq!(cfg_read(&mut h.dev, 0, 4), 0x0010_1b36);
    // A BAR word outside the MSI-X structures (which the input may have moved anywhere).
    let emulated = |bar: u8, off: u64| {
        h.msix
            .into_iter()
            .flatten()
            .any(|(b, o, l)| b == bar && off < o + l && o < off + 4)
    };
    let spot = [(3u8, 0x1000u64), (3, 0), (0, 0), (0, 0x1000)]
        .into_iter()
        .find(|&(bar, off)| !emulated(bar, off));
    if let Some((bar, off)) = spot {
        let mut b = [0u8; 4];
        h.dev.bar_read(bar, off, &mut b);
        let o = off as usize;
        let want = h.fake.bar_data.lock().unwrap()[&u32::from(bar)][o..o + 4].to_vec();
        assert_eq!(b.to_vec(), want, "BAR {bar} read at {off:#x}");
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use crate::Enc;
    let mut out = Vec::new();
    // Decoding on, MSI-X entries, enable, fire, move BAR 0, FLR.
    let mut e = Enc::default();
    e.u8(0);
    e.u8(3).u8(6);
    for v in 0..4u8 {
        e.u8(11).u8(v).u32(0x40 + u32::from(v)).u8(0).u8(0x81);
    }
    e.u8(8).u8(2).u8(1);
    e.u8(4).u8(12).u8(0).u64(1);
    e.u8(8).u8(2).u8(0);
    e.u8(6).u8(0).u16(0x3000).u8(8).u8(0);
    e.u8(7).u8(0).u8(0).u8(0).u8(5).u8(0);
    e.u8(9).u8(0x80);
    out.push(("msix-flr".to_string(), e.0));
    // MSI, BAR sizing, decoding toggles.
    let mut e = Enc::default();
    e.u8(0);
    e.u8(3).u8(2);
    e.u8(11).u8(0).u32(0x50).u8(0).u8(0x20);
    e.u8(8).u8(1).u8(0);
    e.u8(0).u8(1).u8(2).u64(0xffff_ffff);
    e.u8(2).u16(0x10).u8(2);
    e.u8(3).u8(0);
    e.u8(3).u8(2);
    e.u8(10);
    out.push(("msi-sizing".to_string(), e.0));
    // No VFIO MSI-X vectors, a table in the I/O BAR, mmaps failing.
    let mut e = Enc::default();
    e.u8(1 | 4 | 8).u8(0).u32(0x2002).u32(0x3002);
    e.u8(3).u8(2);
    e.u8(11).u8(1).u32(1).u8(0).u8(0x81);
    out.push(("odd-layout".to_string(), e.0));
    out
}
