//! Target (b): the virtio-pci transport (common config, device config, notify, ISR, MSI-X table
//! and PBA, MSI-X control in config space) of a real virtio-iommu on a `PciBus`, with fake MSI
//! and ioeventfd services that assert they are used correctly.
//!
//! Invariants checked: no panic; MSI routes only on live GSIs, each released once (asserted
//! by [`crate::fakes::FakeMsi`]); no more live vectors than MSI-X table entries; the inline
//! virtio-iommu never gets an ioeventfd; identity registers and the capability chain never
//! change; the BAR decodes where its register says.

use crate::fakes::{FakeIoEvents, FakeMsi};
use crate::{Enc, Input};
use pci::{PciBus, PciWindows, VirtioPciDevice};
use std::sync::{Arc, Mutex};
use viommu::{Viommu, ViommuConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

const MEM_SIZE: usize = 0x10_0000;
/// The windows the harness bus forwards.
pub const WINDOWS: PciWindows = PciWindows {
    mmio32: (0xc000_0000, 0x1000_0000),
    mmio64: (0x1_0000_0000, 0x1_0000_0000),
    io: (0x1000, 0x1000),
};
/// Device number of the virtio-iommu.
pub const SLOT: u8 = 1;

/// Opcodes.
pub mod op {
    /// Common config write.
    pub const COMMON_W: u8 = 0;
    /// Common config read.
    pub const COMMON_R: u8 = 1;
    /// MSI-X table write.
    pub const MSIX_W: u8 = 2;
    /// MSI-X table / PBA read.
    pub const MSIX_R: u8 = 3;
    /// Queue notify.
    pub const NOTIFY: u8 = 4;
    /// Device config write.
    pub const DEVCFG_W: u8 = 5;
    /// Device config read + ISR read.
    pub const DEVCFG_R: u8 = 6;
    /// Config space write (ECAM).
    pub const CFG_W: u8 = 7;
    /// Config space read (ECAM).
    pub const CFG_R: u8 = 8;
    /// Raw BAR access.
    pub const RAW: u8 = 9;
    /// Guest memory write.
    pub const MEM: u8 = 10;
    /// The driver's init sequence up to DRIVER_OK.
    pub const INIT: u8 = 11;
    /// MSI-X capability control write.
    pub const MSIX_CTL: u8 = 12;
    /// Number of opcodes.
    pub const COUNT: u8 = 13;
}

struct Harness {
    bus: PciBus,
    dev: Arc<Mutex<VirtioPciDevice>>,
    mem: GuestMemoryMmap,
    msi: Arc<FakeMsi>,
    io: Arc<FakeIoEvents>,
    ident: Vec<u8>,
    caps: Vec<(u16, u8, u8)>,
    msix_cap: u16,
}

fn sized(inp: &mut Input) -> usize {
    [1, 2, 4, 8][usize::from(inp.u8() % 4)]
}

/// Read the capability chain: (offset, id, next), bounded.
pub fn cap_chain(bus: &PciBus, slot: u8) -> Vec<(u16, u8, u8)> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    bus.ecam_read(cfg_addr(slot, 0x34), &mut b);
    let mut at = b[0] & !3;
    while at != 0 && out.len() < 48 {
        let mut h = [0u8; 2];
        bus.ecam_read(cfg_addr(slot, u16::from(at)), &mut h);
        out.push((u16::from(at), h[0], h[1]));
        at = h[1] & !3;
    }
    out
}

/// ECAM offset of register `reg` of 00:`slot`.0.
pub fn cfg_addr(slot: u8, reg: u16) -> u64 {
    (u64::from(slot) << 15) | u64::from(reg)
}

fn identity(bus: &PciBus, slot: u8) -> Vec<u8> {
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

impl Harness {
    fn new(decode: bool) -> Self {
        let mem = crate::ram(&[(GuestAddress(0), MEM_SIZE)]);
        let msi = Arc::new(FakeMsi::default());
        let io = Arc::new(FakeIoEvents::default());
        let mut iommu = Viommu::new(ViommuConfig {
            queue_size: 16,
            ..Default::default()
        })
        .expect("config");
        iommu.add_endpoint(0x10).expect("endpoint");
        let dev = VirtioPciDevice::new(
            Box::new(iommu),
            GuestMemoryAtomic::new(mem.clone()),
            msi.clone(),
            io.clone(),
        )
        .expect("virtio-pci");
        let bus = PciBus::new(WINDOWS);
        let dev = Arc::new(Mutex::new(dev));
        bus.add_device_at(SLOT, dev.clone()).expect("slot");
        if decode {
            bus.ecam_write(cfg_addr(SLOT, 4), &6u16.to_le_bytes());
        }
        let caps = cap_chain(&bus, SLOT);
        let msix_cap = caps.iter().find(|c| c.1 == 0x11).map_or(0, |c| c.0);
        let ident = identity(&bus, SLOT);
        Harness {
            bus,
            dev,
            mem,
            msi,
            io,
            ident,
            caps,
            msix_cap,
        }
    }

    /// Where BAR 0 decodes, or a made-up address when it does not (accesses then miss).
    fn bar(&self) -> u64 {
        self.bus
            .decoded_bars()
            .iter()
            .find(|b| b.slot == SLOT && b.bar == 0)
            .map_or(WINDOWS.mmio64.0, |b| b.start)
    }

    fn write(&self, off: u64, len: usize, v: u64) {
        let b = v.to_le_bytes();
        self.bus.mmio_write(self.bar().wrapping_add(off), &b[..len]);
    }

    fn read(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.bus
            .mmio_read(self.bar().wrapping_add(off), &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn init(&self, inp: &mut Input) {
        let skip = inp.u8();
        let feats = inp.u64();
        self.write(0x14, 1, 0);
        self.write(0x14, 1, 1 | 2);
        for sel in 0..2u64 {
            self.write(0x08, 4, sel);
            self.write(0x0c, 4, feats >> (32 * sel));
        }
        if skip & 1 == 0 {
            self.write(0x14, 1, 1 | 2 | 8);
        }
        for q in 0..2u64 {
            if skip & 2 != 0 && q == 1 {
                break;
            }
            let base = 0x1000 + q * 0x4000;
            self.write(0x16, 2, q);
            self.write(0x18, 2, u64::from(inp.u8() % 2) * 8 + 8);
            self.write(0x1a, 2, q);
            self.write(0x20, 8, base);
            self.write(0x28, 8, base + 0x1000);
            self.write(0x30, 8, base + 0x2000);
            self.write(0x1c, 2, 1);
        }
        self.write(0x10, 2, 2);
        if skip & 4 == 0 {
            self.write(0x14, 1, 1 | 2 | 4 | 8);
        }
        if crate::debug() {
            let activated = self.dev.lock().map(|d| d.activated()).unwrap_or(false);
            eprintln!("virtio_pci: init (skip {skip:#x}): activated {activated}");
        }
    }

    fn check(&self) {
        assert_eq!(
            identity(&self.bus, SLOT),
            self.ident,
            "identity registers changed"
        );
        assert_eq!(
            cap_chain(&self.bus, SLOT),
            self.caps,
            "capability chain changed"
        );
        assert!(
            self.io.registered().is_empty(),
            "inline device got an ioeventfd"
        );
        // 2 queues + config: 3 MSI-X vectors.
        assert!(self.msi.live() <= 3, "{} live vectors", self.msi.live());
        assert!(self.msi.routes() <= self.msi.live());
        let mut bar = [0u8; 8];
        self.bus.ecam_read(cfg_addr(SLOT, 0x10), &mut bar[..4]);
        self.bus.ecam_read(cfg_addr(SLOT, 0x14), &mut bar[4..]);
        let reg = u64::from_le_bytes(bar) & !0xf;
        let mut cmd = [0u8; 2];
        self.bus.ecam_read(cfg_addr(SLOT, 4), &mut cmd);
        let decoding: Vec<_> = self
            .bus
            .decoded_bars()
            .into_iter()
            .filter(|b| b.slot == SLOT)
            .collect();
        if cmd[0] & 2 != 0 {
            assert_eq!(decoding.len(), 1);
            assert_eq!(
                decoding[0].start, reg,
                "BAR decodes elsewhere than programmed"
            );
            assert_eq!(decoding[0].size, 0x1_0000);
        } else {
            assert!(decoding.is_empty(), "BAR decodes with memory decoding off");
        }
    }

    fn step(&mut self, inp: &mut Input) {
        match inp.u8() % op::COUNT {
            op::COMMON_W => {
                let off = u64::from(inp.u8() % 0x40);
                let len = sized(inp);
                let v = inp.u64();
                self.write(off, len, v);
            }
            op::COMMON_R => {
                let off = u64::from(inp.u8() % 0x40);
                let len = sized(inp);
                self.read(off, len);
            }
            op::MSIX_W => {
                let entry = u64::from(inp.u8() % 5);
                let field = u64::from(inp.u8() % 4);
                let len = sized(inp);
                let v = inp.u64();
                self.write(0x8000 + entry * 16 + field * 4, len, v);
            }
            op::MSIX_R => {
                let off = if inp.u8() & 1 == 0 {
                    0x8000 + u64::from(inp.u8() % 0x50)
                } else {
                    0xc000 + u64::from(inp.u8() % 0x10)
                };
                let len = sized(inp);
                self.read(off, len);
            }
            op::NOTIFY => {
                let q = u64::from(inp.u8() % 4);
                let len = sized(inp);
                self.write(0x3000 + q * 4, len, 0);
            }
            op::DEVCFG_W => {
                let off = u64::from(inp.u8() % 0x30);
                let len = sized(inp);
                let v = inp.u64();
                self.write(0x2000 + off, len, v);
            }
            op::DEVCFG_R => {
                let off = u64::from(inp.u8() % 0x30);
                let len = sized(inp);
                self.read(0x2000 + off, len);
                self.read(0x1000, 1);
            }
            op::CFG_W => {
                let reg = inp.u16() % 0x1000;
                let len = sized(inp);
                let v = inp.u64().to_le_bytes();
                self.bus.ecam_write(cfg_addr(SLOT, reg), &v[..len]);
            }
            op::CFG_R => {
                let reg = inp.u16() % 0x1000;
                let mut b = [0u8; 8];
                let len = sized(inp);
                self.bus.ecam_read(cfg_addr(SLOT, reg), &mut b[..len]);
            }
            op::RAW => {
                let off = u64::from(inp.u16());
                let len = usize::from(inp.u8() % 10);
                let mut b = vec![0u8; len];
                if inp.u8() & 1 == 0 {
                    self.bus.mmio_read(self.bar().wrapping_add(off), &mut b);
                } else {
                    let v = inp.u64().to_le_bytes();
                    for (i, x) in b.iter_mut().enumerate() {
                        *x = v[i % 8];
                    }
                    self.bus.mmio_write(self.bar().wrapping_add(off), &b);
                }
            }
            op::MEM => {
                let addr = u64::from(inp.u32()) % MEM_SIZE as u64;
                let data = inp.blob(64);
                let _ = self.mem.write_slice(data, GuestAddress(addr));
            }
            op::INIT => self.init(inp),
            _ => {
                let v = inp.u16();
                if self.msix_cap != 0 {
                    self.bus
                        .ecam_write(cfg_addr(SLOT, self.msix_cap + 2), &v.to_le_bytes());
                }
            }
        }
        self.check();
    }
}

/// Run one fuzz input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut h = Harness::new(inp.u8() & 0x80 == 0);
    h.check();
    let mut steps = 0;
    while !inp.is_empty() && steps < 512 {
        h.step(&mut inp);
        steps += 1;
    }
    if crate::debug() {
        let activated = h.dev.lock().map(|d| d.activated()).unwrap_or(false);
        eprintln!(
            "virtio_pci: {steps} steps, activated {activated}, {} vectors, {} routes",
            h.msi.live(),
            h.msi.routes()
        );
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    // Init, MSI-X on, program vectors, unmask, notify, config change, reset.
    let mut e = Enc::default();
    e.u8(0);
    e.u8(op::INIT).u8(0).u64(u64::MAX).u8(0).u8(1);
    e.u8(op::MSIX_CTL).u16(0x8000);
    for v in 0..3u8 {
        e.u8(op::MSIX_W).u8(v).u8(0).u8(2).u64(0xfee0_0000);
        e.u8(op::MSIX_W).u8(v).u8(2).u8(2).u64(0x40 + u64::from(v));
        e.u8(op::MSIX_W).u8(v).u8(3).u8(2).u64(0);
    }
    e.u8(op::NOTIFY).u8(0).u8(2);
    e.u8(op::DEVCFG_W).u8(36).u8(0).u64(0);
    e.u8(op::DEVCFG_R).u8(0).u8(3);
    e.u8(op::MSIX_R).u8(1).u8(0).u8(3);
    e.u8(op::COMMON_W).u8(0x14).u8(0).u64(0);
    e.u8(op::MSIX_CTL).u16(0x4000);
    e.u8(op::MSIX_CTL).u16(0);
    out.push(("init-msix".to_string(), e.0));
    // BAR moves and decoding toggles.
    let mut e = Enc::default();
    e.u8(0);
    e.u8(op::CFG_W).u16(0x10).u8(2).u64(0xffff_ffff);
    e.u8(op::CFG_R).u16(0x10).u8(2);
    e.u8(op::CFG_W).u16(0x10).u8(2).u64(0xd000_0000);
    e.u8(op::CFG_W).u16(0x14).u8(2).u64(0);
    e.u8(op::CFG_W).u16(4).u8(1).u64(0);
    e.u8(op::CFG_W).u16(4).u8(1).u64(2);
    e.u8(op::COMMON_R).u8(0).u8(2);
    out.push(("bar-move".to_string(), e.0));
    // Out-of-order init: DRIVER_OK without FEATURES_OK, queue fields after enable.
    let mut e = Enc::default();
    e.u8(0);
    e.u8(op::INIT).u8(1).u64(0).u8(1);
    e.u8(op::COMMON_W).u8(0x16).u8(1).u64(7);
    e.u8(op::COMMON_W).u8(0x18).u8(1).u64(3);
    e.u8(op::COMMON_W).u8(0x20).u8(3).u64(u64::MAX);
    e.u8(op::NOTIFY).u8(3).u8(0);
    out.push(("misorder".to_string(), e.0));
    out
}
