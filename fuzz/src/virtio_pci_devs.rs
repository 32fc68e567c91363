//! Target: the virtio-pci transport with a real virtio-blk (inline notify, a small disk) and a
//! real virtio-net (a recording backend) behind it, on one `PciBus`: common and device config
//! writes and reads of either function (any offset and size, features, queue fields, status,
//! MSI-X vectors), MSI-X table writes, config space writes (BAR moves, decoding, MSI-X
//! control), the driver's init sequence with fuzzed features and queue sizes (steps skipped),
//! queue notifications of any queue, and work for the devices: blk requests, net TX frames and
//! RX buffers in the rings the last init programmed, frames arriving from the net backend, raw
//! memory writes.
//!
//! Invariants checked after every step: identity registers and capability chains never change;
//! MSI routes only on live GSIs, each released once, no more live vectors than the two
//! functions' MSI-X tables have entries; no ioeventfd (both devices serve inline); each BAR
//! decodes where its register says, or nowhere with decoding off; the disk keeps its size; the
//! net backend got exactly the frames the device counted as sent, none too big; the RX backlog
//! stays bounded and RX never counts more frames than were offered. At the end, after a reset
//! and a clean init, blk completes a flush and net sends a frame.

use crate::fakes::{FakeIoEvents, FakeMsi};
use crate::ring::{Area, Space, SplitRing, RING_STRIDE};
use crate::virtio_pci::{cap_chain, cfg_addr, WINDOWS};
use crate::Input;
use pci::{PciBus, VirtioPciDevice};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use vm_memory::{GuestAddress, GuestMemoryAtomic};
use vmm::config::{BlockConfig, NetBackendConfig, NetConfig};
use vmm::devices::block::Block;
use vmm::devices::net::{Net, NetPort, BACKLOG_FRAMES, HDR_BYTES, MAX_FRAME_BYTES};
use vmm::net::{FrameSink, NetBackend};

const MEM_SIZE: usize = 0x10_0000;
const DISK_BYTES: u64 = 32 * 1024;
const BLK: usize = 0;
const NET: usize = 1;
/// PCI device numbers of blk and net.
const SLOTS: [u8; 2] = [1, 2];
const QUEUES: [usize; 2] = [1, 3];
const RINGS: [u64; 2] = [0x1_0000, 0x2_0000];

fn disk() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("vmm-fuzz-vpci-{}.img", std::process::id()));
        std::fs::File::create(&p)
            .and_then(|mut f| f.write_all(&vec![0x5a; DISK_BYTES as usize]))
            .expect("disk image");
        p
    })
}

/// Records the frames the guest sent.
#[derive(Clone, Default)]
struct Sent(Arc<Mutex<Vec<usize>>>);

impl NetBackend for Sent {
    fn transmit(&self, frame: &[u8]) {
        self.0.lock().unwrap().push(frame.len());
    }
}

struct Func {
    slot: u8,
    dev: Arc<Mutex<VirtioPciDevice>>,
    ident: Vec<u8>,
    caps: Vec<(u16, u8, u8)>,
    msix_cap: u16,
    rings: Vec<SplitRing>,
}

struct Harness {
    bus: PciBus,
    space: Space,
    msi: Arc<FakeMsi>,
    io: Arc<FakeIoEvents>,
    funcs: [Func; 2],
    port: Arc<NetPort>,
    sent: Sent,
    blk_stats: Arc<vmm::devices::block::BlockStats>,
    offered: u64,
    areas: [Area; 3],
}

fn identity(bus: &PciBus, slot: u8) -> Vec<u8> {
    let mut v = Vec::new();
    for reg in [0u16, 8, 0x2c, 0x34] {
        let mut b = [0u8; 4];
        bus.ecam_read(cfg_addr(slot, reg), &mut b);
        v.extend_from_slice(&b);
    }
    // The header type (the cache line size and latency timer next to it are writable).
    let mut h = [0u8; 1];
    bus.ecam_read(cfg_addr(slot, 0x0e), &mut h);
    v.push(h[0]);
    v
}

fn sized(inp: &mut Input) -> usize {
    [1, 2, 4, 8, 3][usize::from(inp.u8() % 5)]
}

impl Harness {
    fn new(decode: bool) -> Self {
        let mem = crate::ram(&[(GuestAddress(0), MEM_SIZE)]);
        let msi = Arc::new(FakeMsi::default());
        let io = Arc::new(FakeIoEvents::default());
        let cfg = BlockConfig::parse(&format!("path={}", disk().display())).expect("config");
        let blk = Block::new(cfg).expect("disk");
        let blk_stats = blk.stats().clone();
        let port = Net::new_port();
        let sent = Sent::default();
        let net = Net::with_backend(
            NetConfig {
                backend: NetBackendConfig::Hub("fuzz".into()),
                mac: Some([0x52, 0x54, 0, 0, 0, 2]),
                iommu: false,
            },
            None,
            port.clone(),
            Box::new(sent.clone()),
        );
        let bus = PciBus::new(WINDOWS);
        let gm = GuestMemoryAtomic::new(mem.clone());
        let mk = |d: Box<dyn virtio_dev::VirtioDevice>, slot: u8| {
            let dev =
                VirtioPciDevice::new(d, gm.clone(), msi.clone(), io.clone()).expect("virtio-pci");
            let dev = Arc::new(Mutex::new(dev));
            bus.add_device_at(slot, dev.clone()).expect("slot");
            if decode {
                bus.ecam_write(cfg_addr(slot, 4), &6u16.to_le_bytes());
            }
            dev
        };
        let devs = [mk(Box::new(blk), SLOTS[BLK]), mk(Box::new(net), SLOTS[NET])];
        let funcs = devs.map(|dev| dev).into_iter().enumerate().map(|(i, dev)| {
            let caps = cap_chain(&bus, SLOTS[i]);
            Func {
                slot: SLOTS[i],
                dev,
                ident: identity(&bus, SLOTS[i]),
                msix_cap: caps.iter().find(|c| c.1 == 0x11).map_or(0, |c| c.0),
                caps,
                rings: (0..QUEUES[i])
                    .map(|q| SplitRing::new(RINGS[i] + q as u64 * RING_STRIDE, 16))
                    .collect(),
            }
        });
        let funcs: Vec<Func> = funcs.collect();
        let [f0, f1]: [Func; 2] = funcs.try_into().ok().expect("two functions");
        Harness {
            bus,
            space: Space {
                mem,
                base: 0,
                size: MEM_SIZE as u64,
            },
            msi,
            io,
            funcs: [f0, f1],
            port,
            sent,
            blk_stats,
            offered: 0,
            areas: [
                Area::new(0x4_0000, 0x6_0000),
                Area::new(0x6_0000, 0x8_0000),
                Area::new(0x8_0000, 0xa_0000),
            ],
        }
    }

    /// Where BAR 0 of function `f` decodes (a made-up address when it does not).
    fn bar(&self, f: usize) -> u64 {
        self.bus
            .decoded_bars()
            .iter()
            .find(|b| b.slot == self.funcs[f].slot && b.bar == 0)
            .map_or(WINDOWS.mmio64.0 + 0x10_0000 * f as u64, |b| b.start)
    }

    fn write(&self, f: usize, off: u64, len: usize, v: u64) {
        let b = v.to_le_bytes();
        self.bus
            .mmio_write(self.bar(f).wrapping_add(off), &b[..len.min(8)]);
    }

    fn read(&self, f: usize, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.bus
            .mmio_read(self.bar(f).wrapping_add(off), &mut b[..len.min(8)]);
        u64::from_le_bytes(b)
    }

    /// The driver's init sequence for function `f`, maybe skipping steps.
    fn init(&mut self, f: usize, skip: u8, features: u64, size: u16) {
        self.write(f, 0x14, 1, 0);
        self.write(f, 0x14, 1, 1 | 2);
        for sel in 0..2u64 {
            self.write(f, 0x08, 4, sel);
            self.write(f, 0x0c, 4, features >> (32 * sel));
        }
        if skip & 1 == 0 {
            self.write(f, 0x14, 1, 1 | 2 | 8);
        }
        for q in 0..QUEUES[f] {
            if skip & 2 != 0 && q + 1 == QUEUES[f] && q > 0 {
                break;
            }
            let r = &mut self.funcs[f].rings[q];
            r.size = size;
            r.clear(&self.space);
            let r = *r;
            self.write(f, 0x16, 2, q as u64);
            self.write(f, 0x18, 2, u64::from(size));
            self.write(f, 0x1a, 2, q as u64);
            self.write(f, 0x20, 8, r.desc);
            self.write(f, 0x28, 8, r.avail);
            self.write(f, 0x30, 8, r.used);
            self.write(f, 0x1c, 2, 1);
        }
        self.write(f, 0x10, 2, QUEUES[f] as u64);
        if skip & 4 == 0 {
            self.write(f, 0x14, 1, 1 | 2 | 4 | 8);
        }
    }

    fn notify(&self, f: usize, q: u64) {
        self.write(f, 0x3000 + q * 4, 2, q);
    }

    fn blk_request(&mut self, inp: &mut Input) {
        let t = [0u32, 1, 4, 8, 99][usize::from(inp.u8() % 5)];
        let sector = u64::from(inp.u8() % 70);
        let len = u32::from(inp.u8() % 5) * 512;
        let h = self.areas[0].alloc(16);
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&t.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        self.space.write(h, &hdr);
        let d = self.areas[0].alloc(u64::from(len));
        let s = self.areas[0].alloc(1);
        let mut bufs = vec![(h, 16, false)];
        if len > 0 {
            bufs.push((d, len, t != 1));
        }
        bufs.push((s, 1, true));
        self.funcs[BLK].rings[0].push_chain(&self.space, &bufs);
    }

    fn net_tx(&mut self, inp: &mut Input) {
        let len = usize::from(inp.u16() % 1600);
        let a = self.areas[1].alloc((HDR_BYTES + len) as u64);
        let bytes: Vec<u8> = (0..HDR_BYTES + len).map(|i| i as u8).collect();
        self.space.write(a, &bytes);
        let split = (usize::from(inp.u8()) % (HDR_BYTES + len + 1)) as u32;
        let total = (HDR_BYTES + len) as u32;
        let bufs = if split == 0 || split == total {
            vec![(a, total, false)]
        } else {
            vec![
                (a, split, false),
                (a + u64::from(split), total - split, false),
            ]
        };
        self.funcs[NET].rings[1].push_chain(&self.space, &bufs);
    }

    fn net_rx(&mut self, inp: &mut Input) {
        let len = [1526u32, 4096, 64, 12][usize::from(inp.u8() % 4)];
        let a = self.areas[2].alloc(u64::from(len));
        self.funcs[NET].rings[0].push_chain(&self.space, &[(a, len, true)]);
    }

    fn check(&self) {
        for (i, f) in self.funcs.iter().enumerate() {
            assert_eq!(
                identity(&self.bus, f.slot),
                f.ident,
                "identity of function {i}"
            );
            assert_eq!(
                cap_chain(&self.bus, f.slot),
                f.caps,
                "capabilities of function {i}"
            );
            let mut bar = [0u8; 8];
            self.bus.ecam_read(cfg_addr(f.slot, 0x10), &mut bar[..4]);
            self.bus.ecam_read(cfg_addr(f.slot, 0x14), &mut bar[4..]);
            let reg = u64::from_le_bytes(bar) & !0xf;
            let mut cmd = [0u8; 2];
            self.bus.ecam_read(cfg_addr(f.slot, 4), &mut cmd);
            let decoding: Vec<_> = self
                .bus
                .decoded_bars()
                .into_iter()
                .filter(|b| b.slot == f.slot)
                .collect();
            if cmd[0] & 2 != 0 {
                // Two BARs may collide: the bus then decodes neither (or one); never elsewhere.
                assert!(
                    decoding.iter().all(|b| b.start == reg),
                    "BAR decodes elsewhere"
                );
            } else {
                assert!(decoding.is_empty(), "BAR decodes with decoding off");
            }
        }
        assert!(
            self.io.registered().is_empty(),
            "inline device got an ioeventfd"
        );
        // blk: 1 queue + config, net: 3 queues + config.
        assert!(self.msi.live() <= 2 + 4, "{} live vectors", self.msi.live());
        assert!(self.msi.routes() <= self.msi.live());
        let s = self.port.stats().snapshot();
        let sent = self.sent.0.lock().unwrap();
        assert_eq!(sent.len() as u64, s.tx_frames, "frames sent vs counted");
        assert!(sent.iter().all(|&l| l <= MAX_FRAME_BYTES));
        assert!(self.port.backlog_len() <= BACKLOG_FRAMES);
        assert!(
            s.rx_frames + s.rx_dropped <= self.offered,
            "RX counted more than offered"
        );
        let _ = self.blk_stats.snapshot();
        assert_eq!(
            std::fs::metadata(disk()).map(|m| m.len()).ok(),
            Some(DISK_BYTES)
        );
    }

    fn step(&mut self, inp: &mut Input) {
        let f = usize::from(inp.u8() & 1);
        match inp.u8() % 14 {
            0 => {
                let off = u64::from(inp.u8() % 0x40);
                let len = sized(inp);
                self.write(f, off, len, inp.u64());
            }
            1 => {
                let off = u64::from(inp.u8() % 0x40);
                let len = sized(inp);
                self.read(f, off, len);
            }
            2 => {
                let e = u64::from(inp.u8() % 5);
                let field = u64::from(inp.u8() % 4);
                let len = sized(inp);
                self.write(f, 0x8000 + e * 16 + field * 4, len, inp.u64());
            }
            3 | 4 => {
                let q = u64::from(inp.u8() % 4);
                self.notify(f, q);
            }
            5 => {
                let off = u64::from(inp.u8() % 0x40);
                let len = sized(inp);
                if inp.u8() & 1 == 0 {
                    self.read(f, 0x2000 + off, len);
                } else {
                    self.write(f, 0x2000 + off, len, inp.u64());
                }
                self.read(f, 0x1000, 1);
            }
            6 => {
                let reg = inp.u16() % 0x1000;
                let len = sized(inp);
                let v = inp.u64().to_le_bytes();
                self.bus
                    .ecam_write(cfg_addr(self.funcs[f].slot, reg), &v[..len]);
            }
            7 => {
                let skip = inp.u8();
                let features = match inp.u8() {
                    0..=0xbf => u64::MAX,
                    s => u64::from(s) << 28 | inp.u64(),
                };
                let size = 1u16 << (inp.u8() % 9);
                self.init(f, skip, features, size);
            }
            8 => {
                let v = inp.u16();
                let cap = self.funcs[f].msix_cap;
                if cap != 0 {
                    self.bus
                        .ecam_write(cfg_addr(self.funcs[f].slot, cap + 2), &v.to_le_bytes());
                }
            }
            9 => {
                if f == BLK {
                    self.blk_request(inp);
                } else {
                    self.net_tx(inp);
                }
            }
            10 => self.net_rx(inp),
            11 => {
                let n = usize::from(inp.u8() % 3) + 1;
                for _ in 0..n {
                    let len = usize::from(inp.u16() % 2000);
                    self.offered += 1;
                    self.port.deliver(&vec![0xab; len]);
                }
            }
            12 => {
                let a = 0x1_0000 + u64::from(inp.u32()) % 0x9_0000;
                let data = inp.blob(32);
                self.space.write(a, data);
            }
            _ => {
                // Raw avail bump on some queue.
                let q = usize::from(inp.u8()) % QUEUES[f];
                let head = inp.u16();
                let bump = u16::from(inp.u8() % 8);
                self.funcs[f].rings[q].publish(&self.space, head, bump);
            }
        }
        self.check();
    }

    /// A reset, a clean init, then blk completes a flush and net sends a frame.
    fn still_works(&mut self) {
        // Decoding on at fresh BAR addresses, MSI-X off.
        for (i, f) in self.funcs.iter().enumerate() {
            let at = WINDOWS.mmio64.0 + 0x10_0000 * i as u64;
            self.bus
                .ecam_write(cfg_addr(f.slot, 4), &0u16.to_le_bytes());
            self.bus
                .ecam_write(cfg_addr(f.slot, 0x10), &(at as u32 | 4).to_le_bytes());
            self.bus
                .ecam_write(cfg_addr(f.slot, 0x14), &((at >> 32) as u32).to_le_bytes());
            self.bus
                .ecam_write(cfg_addr(f.slot, 4), &6u16.to_le_bytes());
        }
        for f in [BLK, NET] {
            let offered = self.read(f, 0x04, 4);
            let _ = offered;
            self.init(f, 0, u64::MAX, 16);
            let dev = self.funcs[f].dev.lock().unwrap();
            assert!(
                dev.activated(),
                "function {f} not activated by a clean init"
            );
        }
        let s = self.areas[0].alloc(1);
        let h = self.areas[0].alloc(16);
        let mut hdr = [0u8; 16];
        hdr[0] = 4; // FLUSH
        self.space.write(h, &hdr);
        self.space.write(s, &[0xff]);
        self.funcs[BLK].rings[0].push_chain(&self.space, &[(h, 16, false), (s, 1, true)]);
        self.notify(BLK, 0);
        let mut st = [0u8];
        self.space.read(s, &mut st);
        assert_eq!(st[0], 0, "blk flush after a clean init");
        let before = self.port.stats().snapshot().tx_frames;
        let a = self.areas[1].alloc(100);
        self.space.write(a, &[0u8; 100]);
        self.funcs[NET].rings[1].push_chain(&self.space, &[(a, 100, false)]);
        self.notify(NET, 1);
        assert_eq!(
            self.port.stats().snapshot().tx_frames,
            before + 1,
            "net TX after a clean init"
        );
        self.check();
    }
}

/// Run one fuzz input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut h = Harness::new(inp.u8() & 0x80 == 0);
    h.check();
    let mut steps = 0;
    while !inp.is_empty() && steps < 256 {
        h.step(&mut inp);
        steps += 1;
    }
    h.still_works();
}

/// Seed inputs.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use crate::Enc;
    let mut out = Vec::new();
    let mut e = Enc::default();
    e.u8(0);
    // Init both, MSI-X on, work on both, notify, reset one.
    e.u8(0).u8(7).u8(0).u8(0).u8(4);
    e.u8(1).u8(7).u8(0).u8(0).u8(4);
    e.u8(0).u8(8).u16(0x8000);
    e.u8(0).u8(9).u8(1).u8(4).u8(2);
    e.u8(0).u8(9).u8(0).u8(4).u8(2);
    e.u8(0).u8(3).u8(0);
    e.u8(1).u8(10).u8(0);
    e.u8(1).u8(9).u16(100).u8(20);
    e.u8(1).u8(3).u8(1);
    e.u8(1).u8(11).u8(1).u16(60).u16(1500);
    e.u8(1).u8(3).u8(0);
    e.u8(0).u8(0).u8(0x14).u8(0).u64(0);
    e.u8(0).u8(3).u8(0);
    out.push(("both".to_string(), e.0));
    // Skipped init steps, BAR moves.
    let mut e = Enc::default();
    e.u8(0);
    e.u8(1).u8(7).u8(5).u8(0xc0).u64(0).u8(3);
    e.u8(1).u8(3).u8(2);
    e.u8(0).u8(6).u16(0x10).u8(2).u64(0xffff_ffff);
    e.u8(0).u8(6).u16(0x10).u8(2).u64(0xd000_0000);
    e.u8(1).u8(6).u16(4).u8(0).u64(0);
    e.u8(0).u8(9).u8(0).u8(1).u8(1);
    e.u8(0).u8(4).u8(0);
    out.push(("skips".to_string(), e.0));
    out
}
