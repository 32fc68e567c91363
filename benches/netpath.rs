//! virtio-net forwarding through the in-process hub, per frame (run with
//! `cargo bench --bench netpath`): port A's TX queue holds a burst (2 or 32) of 64-byte frames (one
//! descriptor each, header included, as DPDK's virtio PMD posts them), port B's RX queue as many
//! 2 KiB buffers; one kick of A's TX moves the burst into B's buffers and both used rings.
//! Only the device's side is timed (the two kicks), not the descriptor writes.
//!
//! - `net_forward/direct/B`: no vIOMMU (guest-physical addresses), bursts of B frames.
//! - `net_forward/viommu/B`: both ports behind the virtio-iommu, each in its own domain (the
//!   path testpmd's packets take behind the vIOMMU: rings reached directly under a pinned view,
//!   buffers translated).
//!
//! The gap between the two is the per-packet cost of translation in our device model.

#[path = "../viommu/tests/common/mod.rs"]
mod common;

use common::{attach, map, Driver};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_dev::{QueueConfig, VirtioDevice, VirtioInterrupt};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm::config::{NetBackendConfig, NetConfig};
use vmm::devices::net::Net;
use vmm::net::Hubs;

const EP_A: u32 = 0x10;
const EP_B: u32 = 0x18;
/// IOVA windows: IOVA = WIN + GPA.
const WIN_A: u64 = 0x40_0000_0000;
const WIN_B: u64 = 0x80_0000_0000;
const QSIZE: u16 = 256;
/// Mapping granule behind the vIOMMU (a hugepage).
const HUGE: u64 = 2 << 20;
/// Frames per kick: testpmd's full burst, and the small bursts of a lightly loaded queue
/// (where the per-kick cost of the vIOMMU path shows).
const BURSTS: [u16; 2] = [2, 32];
const FRAME: u32 = 12 + 64;
const RX_BUF: u32 = 2048;
/// Where the net rings and buffers live (the iommu driver uses the first 2 MiB).
const NET_BASE: u64 = 0x20_0000;

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn signal_queue(&self, _queue: u16) {}
    fn signal_config(&self) {}
}

/// One split ring of QSIZE at `gpa`, one descriptor per chain; addresses the device sees are
/// `win + gpa`.
struct Ring {
    gpa: u64,
    win: u64,
    avail_idx: u16,
}

impl Ring {
    fn desc(&self) -> u64 {
        self.gpa
    }
    fn avail(&self) -> u64 {
        self.gpa + 0x1000
    }
    fn used(&self) -> u64 {
        self.gpa + 0x2000
    }
    fn config(&self) -> QueueConfig {
        QueueConfig {
            size: QSIZE,
            desc_table: GuestAddress(self.win + self.desc()),
            avail_ring: GuestAddress(self.win + self.avail()),
            used_ring: GuestAddress(self.win + self.used()),
            ready: true,
        }
    }
    /// Post one single-descriptor chain of the buffer at GPA `buf`.
    fn post(&mut self, mem: &GuestMemoryMmap, buf: u64, len: u32, write: bool) {
        let i = self.avail_idx % QSIZE;
        let d = self.desc() + 16 * u64::from(i);
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        mem.write_obj((self.win + buf).to_le(), GuestAddress(d))
            .unwrap();
        mem.write_obj(len.to_le(), GuestAddress(d + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(d + 12)).unwrap();
        mem.write_obj(0u16, GuestAddress(d + 14)).unwrap();
        mem.write_obj(i.to_le(), GuestAddress(self.avail() + 4 + 2 * u64::from(i)))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }
    fn publish(&self, mem: &GuestMemoryMmap) {
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail() + 2))
            .unwrap();
    }
    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used() + 2)).unwrap()
    }
}

struct Setup {
    /// Keeps the vIOMMU (and its endpoints' domains) alive.
    _iommu: Option<Driver>,
    mem: GuestMemoryMmap,
    a: Net,
    b: Net,
    a_tx: Ring,
    b_rx: Ring,
}

/// Two ports on one hub, behind the vIOMMU when `viommu`, activated with RX, TX and control
/// queues; returns the ports and the rings the benchmark drives.
fn setup(viommu: bool) -> Setup {
    let (iommu, mem, eps) = if viommu {
        let (mut d, eps) = Driver::new(
            viommu::ViommuConfig {
                bypass: false,
                ..Default::default()
            },
            &[EP_A, EP_B],
            None,
        );
        // One MAP per 2 MiB, as DPDK maps its hugepages: rings and buffers sit in different
        // mappings, like testpmd's memzones and mbuf pool.
        assert_eq!(d.status(&attach(1, EP_A, 0)), 0);
        assert_eq!(d.status(&attach(2, EP_B, 0)), 0);
        for gpa in (0..common::MEM_SIZE as u64).step_by(HUGE as usize) {
            for (dom, win) in [(1, WIN_A), (2, WIN_B)] {
                let iova = win + gpa;
                assert_eq!(d.status(&map(dom, iova, iova + HUGE - 1, gpa, 3)), 0);
            }
            d.reset_data();
        }
        let mem = d.mem.clone();
        let mut eps = eps.into_iter();
        (Some(d), mem, vec![eps.next(), eps.next()])
    } else {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), common::MEM_SIZE)]).unwrap();
        (None, mem, vec![None, None])
    };
    let (wa, wb) = if viommu { (WIN_A, WIN_B) } else { (0, 0) };
    let hubs = Hubs::new();
    let mut features: u64 = [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CTRL_VQ,
    ]
    .iter()
    .map(|b| 1 << b)
    .sum();
    if viommu {
        features |= 1 << VIRTIO_F_ACCESS_PLATFORM;
    }
    let mut devs = Vec::new();
    let mut rings = Vec::new();
    for (i, (ep, win)) in eps.into_iter().zip([wa, wb]).enumerate() {
        let cfg = NetConfig {
            backend: NetBackendConfig::Hub("0".into()),
            mac: None,
            iommu: viommu,
        };
        let mut dev = Net::new(cfg, ep, &hubs).unwrap();
        let base = NET_BASE + i as u64 * 0x10_0000;
        let qs: Vec<Ring> = (0..3)
            .map(|q| Ring {
                gpa: base + q * 0x3000,
                win,
                avail_idx: 0,
            })
            .collect();
        dev.activate(
            GuestMemoryAtomic::new(mem.clone()),
            features,
            qs.iter().map(Ring::config).collect(),
            vec![],
            Arc::new(NoIrq),
        )
        .unwrap();
        devs.push(dev);
        rings.push(qs);
    }
    let b = devs.pop().unwrap();
    let a = devs.pop().unwrap();
    let b_rx = rings[1].remove(0);
    let a_tx = rings[0].remove(1);
    Setup {
        _iommu: iommu,
        mem,
        a,
        b,
        a_tx,
        b_rx,
    }
}

/// Data buffers, each side in its own hugepage, away from the rings: A's TX frames, B's RX
/// buffers.
const TX_BUFS: u64 = NET_BASE + 2 * HUGE;
const RX_BUFS: u64 = NET_BASE + 3 * HUGE;

/// The driver's part of a burst: `burst` RX buffers on B, `burst` frames on A (not timed).
fn post(s: &mut Setup, burst: u16) {
    for i in 0..u64::from(burst) {
        s.b_rx
            .post(&s.mem, RX_BUFS + i * u64::from(RX_BUF), RX_BUF, true);
        s.a_tx.post(&s.mem, TX_BUFS + i * 128, FRAME, false);
    }
    s.b_rx.publish(&s.mem);
    s.a_tx.publish(&s.mem);
}

/// The device's part: B's RX kick, then A's TX kick, which forwards the burst.
fn kick(s: &mut Setup) {
    s.b.queue_notify(0);
    s.a.queue_notify(1);
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("net_forward");
    for (burst, viommu) in BURSTS.iter().flat_map(|&b| [(b, false), (b, true)]) {
        g.throughput(Throughput::Elements(u64::from(burst)));
        let mut s = setup(viommu);
        // The frames' content: zero header, a recognisable payload.
        for i in 0..u64::from(burst) {
            s.mem
                .write_slice(&[0xab; FRAME as usize], GuestAddress(TX_BUFS + i * 128))
                .unwrap();
        }
        // Every burst must arrive: check one before timing.
        let before = s.b_rx.used_idx(&s.mem);
        post(&mut s, burst);
        kick(&mut s);
        assert_eq!(
            s.b_rx.used_idx(&s.mem).wrapping_sub(before),
            burst,
            "a burst reaches B's RX used ring (viommu={viommu})"
        );
        assert_eq!(s.a_tx.used_idx(&s.mem), s.a_tx.avail_idx);
        let name = if viommu { "viommu" } else { "direct" };
        g.bench_function(BenchmarkId::new(name, burst), |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    post(&mut s, burst);
                    let t0 = Instant::now();
                    kick(&mut s);
                    t += t0.elapsed();
                }
                t
            })
        });
        assert_eq!(s.b_rx.used_idx(&s.mem), s.b_rx.avail_idx, "no frame lost");
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
