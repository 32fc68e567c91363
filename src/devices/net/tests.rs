//! virtio-net: two ports on a hub (TX into the peer's RX, mergeable buffers, backlog,
//! interrupts, bad chains, control), config space, and both ports behind the vIOMMU.

use super::*;
use crate::config::{NetBackendConfig, NetConfig};
use crate::devices::test_iommu::{push_chain, MockIommu};
use crate::net::{Delivery, FrameSink, Hubs};
use std::sync::{Arc, Mutex};
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_ERR, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_OK, VIRTIO_NET_S_LINK_UP,
};
use virtio_dev::{ActivateError, QueueConfig, VirtioDevice, VirtioInterrupt};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// Feature bit `b` as a mask.
const fn bit(b: u32) -> u64 {
    1 << b
}

const QSIZE: u16 = 64;
/// Rings of queue i at RING_BASE + i * 0x1000; buffers from BUF_BASE.
const RING_BASE: u64 = 0x1_0000;
const BUF_BASE: u64 = 0x2_0000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
}

#[derive(Default)]
struct Irqs(Mutex<Vec<u16>>);
impl VirtioInterrupt for Irqs {
    fn signal_queue(&self, queue: u16) {
        self.0.lock().unwrap().push(queue);
    }
    fn signal_config(&self) {}
}
impl Irqs {
    fn count(&self, q: u16) -> usize {
        self.0.lock().unwrap().iter().filter(|&&x| x == q).count()
    }
}

/// A device activated on mock queues in `m` (offset `base` so two devices can share one
/// memory); next free descriptor index per queue is tracked by the caller.
struct Port<'a> {
    dev: Net,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    ctrl: MockSplitQueue<'a, GuestMemoryMmap>,
    irqs: Arc<Irqs>,
}

fn cfg(hub: &str, iommu: bool) -> NetConfig {
    NetConfig {
        backend: NetBackendConfig::Hub(hub.into()),
        mac: None,
        iommu,
    }
}

fn port<'a>(
    m: &'a GuestMemoryMmap,
    base: u64,
    dev: Net,
    features: u64,
) -> Result<Port<'a>, ActivateError> {
    port_at(m, base, 0, dev, features)
}

/// [`port`] whose ring addresses the device gets as `win + GPA` (IOVAs behind a vIOMMU
/// window), the mock queues being built at the GPAs.
fn port_at<'a>(
    m: &'a GuestMemoryMmap,
    base: u64,
    win: u64,
    dev: Net,
    features: u64,
) -> Result<Port<'a>, ActivateError> {
    let mk = |i: u64| MockSplitQueue::create(m, GuestAddress(base + i * 0x1000), QSIZE);
    let (rx, tx, ctrl) = (mk(0), mk(1), mk(2));
    let qc = |q: &MockSplitQueue<GuestMemoryMmap>| QueueConfig {
        size: QSIZE,
        desc_table: GuestAddress(win + q.desc_table_addr().0),
        avail_ring: GuestAddress(win + q.avail_addr().0),
        used_ring: GuestAddress(win + q.used_addr().0),
        ready: true,
    };
    let irqs = Arc::new(Irqs::default());
    let mut p = Port {
        dev,
        rx,
        tx,
        ctrl,
        irqs,
    };
    let qs = vec![qc(&p.rx), qc(&p.tx), qc(&p.ctrl)];
    p.dev.activate(
        GuestMemoryAtomic::new(m.clone()),
        features,
        qs,
        vec![],
        p.irqs.clone(),
    )?;
    Ok(p)
}

fn used_idx(m: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
    m.read_obj(q.used_addr().unchecked_add(2)).unwrap()
}

/// (id, len) of used ring entry `i`.
fn used_elem(m: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, i: u64) -> (u32, u32) {
    let at = q.used_addr().unchecked_add(4 + i * 8);
    (
        m.read_obj(at).unwrap(),
        m.read_obj(at.unchecked_add(4)).unwrap(),
    )
}

fn frame(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

/// Put `frame` (with a zero header) at `at` as one TX chain at descriptor `first`.
fn send(m: &GuestMemoryMmap, p: &mut Port, first: u16, at: u64, frame: &[u8]) {
    m.write_slice(&[0u8; HDR_BYTES], GuestAddress(at)).unwrap();
    m.write_slice(frame, GuestAddress(at + HDR_BYTES as u64))
        .unwrap();
    push_chain(
        &p.tx,
        first,
        &[
            (at, HDR_BYTES as u32, false),
            (at + HDR_BYTES as u64, frame.len() as u32, false),
        ],
    );
    p.dev.queue_notify(TX_QUEUE);
}

const ALL: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_CTRL_VQ)
    | bit(VIRTIO_NET_F_CTRL_RX);

fn pair(m: &GuestMemoryMmap, features: u64) -> (Port<'_>, Port<'_>) {
    let hubs = Hubs::new();
    let a = Net::new(cfg("h", false), None, &hubs).unwrap();
    let b = Net::new(cfg("h", false), None, &hubs).unwrap();
    (
        port(m, RING_BASE, a, features).unwrap(),
        port(m, RING_BASE + 0x8000, b, features).unwrap(),
    )
}

#[test]
fn tx_crosses_the_hub_into_the_peer_rx_buffers() {
    let m = mem();
    let (mut a, mut b) = pair(&m, ALL);
    push_chain(&b.rx, 0, &[(BUF_BASE + 0x10_000, 2048, true)]);
    b.dev.queue_notify(RX_QUEUE);
    let f = frame(100, 1);
    send(&m, &mut a, 0, BUF_BASE, &f);
    assert_eq!(used_idx(&m, &a.tx), 1, "TX chain completed");
    assert_eq!(used_elem(&m, &a.tx, 0), (0, 0));
    assert_eq!(used_idx(&m, &b.rx), 1);
    assert_eq!(used_elem(&m, &b.rx, 0), (0, (HDR_BYTES + 100) as u32));
    let mut got = vec![0u8; HDR_BYTES + 100];
    m.read_slice(&mut got, GuestAddress(BUF_BASE + 0x10_000))
        .unwrap();
    assert_eq!(&got[HDR_BYTES..], &f[..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(b.irqs.count(RX_QUEUE), 1);
    assert_eq!(a.irqs.count(TX_QUEUE), 1);
    assert_eq!(used_idx(&m, &a.rx), 0, "no echo to the sender");
    let (sa, sb) = (
        a.dev.port().stats().snapshot(),
        b.dev.port().stats().snapshot(),
    );
    assert_eq!((sa.tx_frames, sb.rx_frames, sa.rx_frames), (1, 1, 0));
    assert_eq!(
        (sa.tx_kicks, sa.rx_kicks, sb.tx_kicks, sb.rx_kicks),
        (1, 0, 0, 1)
    );
    assert_eq!(
        sa.summary_line([0x52, 0x54, 0, 0, 0xa, 1]),
        "net: mac=52:54:00:00:0a:01 tx_frames=1 rx_frames=0 tx_kicks=1 rx_kicks=0 \
         tx_errors=0 rx_dropped=0 rx_bad_chains=0 ctrl_commands=0"
    );
}

#[test]
fn mergeable_buffers_carry_a_big_frame_published_at_once() {
    let m = mem();
    let (mut a, b) = pair(&m, ALL);
    for i in 0..8u16 {
        push_chain(
            &b.rx,
            i,
            &[(BUF_BASE + 0x10_000 + u64::from(i) * 0x100, 64, true)],
        );
    }
    let f = frame(200, 2);
    send(&m, &mut a, 0, BUF_BASE, &f);
    // 12 + 200 = 212 bytes = 64 * 3 + 20: four buffers.
    assert_eq!(used_idx(&m, &b.rx), 4);
    let lens: Vec<u32> = (0..4).map(|i| used_elem(&m, &b.rx, i).1).collect();
    assert_eq!(lens, vec![64, 64, 64, 20]);
    let ids: Vec<u32> = (0..4).map(|i| used_elem(&m, &b.rx, i).0).collect();
    assert_eq!(ids, vec![0, 1, 2, 3]);
    let mut got = Vec::new();
    for i in 0..4u64 {
        let mut c = vec![0u8; lens[i as usize] as usize];
        m.read_slice(&mut c, GuestAddress(BUF_BASE + 0x10_000 + i * 0x100))
            .unwrap();
        got.extend_from_slice(&c);
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 4, "num_buffers");
    assert_eq!(&got[HDR_BYTES..], &f[..]);
    // The other four buffers are still there for the next frame.
    send(&m, &mut a, 2, BUF_BASE + 0x1000, &frame(10, 3));
    assert_eq!(used_idx(&m, &b.rx), 5);
}

#[test]
fn without_mergeable_a_too_small_buffer_drops_the_frame_and_stays_posted() {
    let m = mem();
    let (mut a, b) = pair(&m, ALL & !bit(VIRTIO_NET_F_MRG_RXBUF));
    push_chain(&b.rx, 0, &[(BUF_BASE + 0x10_000, 64, true)]);
    send(&m, &mut a, 0, BUF_BASE, &frame(200, 4));
    assert_eq!(used_idx(&m, &b.rx), 0, "buffer not consumed");
    assert_eq!(b.dev.port().stats().snapshot().rx_dropped, 1);
    assert_eq!(b.dev.port().backlog_len(), 0);
    send(&m, &mut a, 2, BUF_BASE + 0x1000, &frame(40, 5));
    assert_eq!(used_idx(&m, &b.rx), 1, "a small frame still fits");
    assert_eq!(used_elem(&m, &b.rx, 0).1, (HDR_BYTES + 40) as u32);
}

/// The RX interrupt follows the used ring: one when a chain was completed (even empty, with
/// the frame left waiting), none when nothing was (a frame dropped without taking a buffer).
#[test]
fn rx_interrupts_follow_the_used_ring() {
    let m = mem();
    let (mut a, b) = pair(&m, ALL & !bit(VIRTIO_NET_F_MRG_RXBUF));
    // Too small for the frame: dropped, the buffer stays posted, nothing to signal.
    push_chain(&b.rx, 0, &[(BUF_BASE + 0x10_000, 64, true)]);
    send(&m, &mut a, 0, BUF_BASE, &frame(200, 4));
    assert_eq!(used_idx(&m, &b.rx), 0);
    assert_eq!(
        b.irqs.count(RX_QUEUE),
        0,
        "no interrupt without a used buffer"
    );
    // The buffer is used by a frame that fits: one interrupt.
    send(&m, &mut a, 2, BUF_BASE + 0x1000, &frame(40, 5));
    assert_eq!(used_idx(&m, &b.rx), 1);
    assert_eq!(b.irqs.count(RX_QUEUE), 1);
    // Only a malformed chain (device-readable): completed empty, the frame waits in the
    // backlog; the driver is told about the completed chain.
    push_chain(&b.rx, 1, &[(BUF_BASE + 0x11_000, 2048, false)]);
    send(&m, &mut a, 4, BUF_BASE + 0x2000, &frame(40, 6));
    assert_eq!(used_idx(&m, &b.rx), 2);
    assert_eq!(used_elem(&m, &b.rx, 1), (1, 0));
    assert_eq!(b.dev.port().backlog_len(), 1);
    assert_eq!(
        b.irqs.count(RX_QUEUE),
        2,
        "the empty completion is signalled"
    );
}

#[test]
fn backlog_waits_for_buffers_is_bounded_and_drains_on_rx_kick() {
    let m = mem();
    let (a, mut b) = pair(&m, ALL);
    let sink = b.dev.port().clone();
    assert_eq!(sink.deliver(&frame(60, 6)), Delivery::Queued);
    for i in 1..BACKLOG_FRAMES + 10 {
        sink.deliver(&frame(60, i as u8));
    }
    assert_eq!(sink.backlog_len(), BACKLOG_FRAMES);
    assert_eq!(sink.stats().snapshot().rx_dropped, 10);
    // Waiting frames: the driver must kick RX when it adds buffers.
    let used_flags: u16 = m.read_obj(b.rx.used_addr()).unwrap();
    assert_eq!(used_flags & 1, 0, "RX kicks enabled while frames wait");
    for i in 0..4u16 {
        push_chain(
            &b.rx,
            i,
            &[(BUF_BASE + 0x10_000 + u64::from(i) * 0x800, 2048, true)],
        );
    }
    b.dev.queue_notify(RX_QUEUE);
    assert_eq!(used_idx(&m, &b.rx), 4);
    assert_eq!(sink.backlog_len(), BACKLOG_FRAMES - 4);
    assert_eq!(b.irqs.count(RX_QUEUE), 1);
    let mut first = vec![0u8; 60];
    m.read_slice(
        &mut first,
        GuestAddress(BUF_BASE + 0x10_000 + HDR_BYTES as u64),
    )
    .unwrap();
    assert_eq!(first, frame(60, 6), "oldest frame first");
    drop(a);
}

#[test]
fn no_rx_kicks_requested_when_nothing_waits() {
    let m = mem();
    let (mut a, b) = pair(&m, ALL);
    push_chain(&b.rx, 0, &[(BUF_BASE + 0x10_000, 2048, true)]);
    send(&m, &mut a, 0, BUF_BASE, &frame(60, 1));
    let used_flags: u16 = m.read_obj(b.rx.used_addr()).unwrap();
    assert_eq!(
        used_flags & 1,
        1,
        "VRING_USED_F_NO_NOTIFY on RX with an empty backlog"
    );
}

#[test]
fn driver_suppressed_interrupts_are_not_sent() {
    let m = mem();
    let (mut a, b) = pair(&m, ALL);
    // VRING_AVAIL_F_NO_INTERRUPT on both rings (as DPDK's PMD does).
    m.write_obj(1u16, b.rx.avail_addr()).unwrap();
    m.write_obj(1u16, a.tx.avail_addr()).unwrap();
    push_chain(&b.rx, 0, &[(BUF_BASE + 0x10_000, 2048, true)]);
    send(&m, &mut a, 0, BUF_BASE, &frame(60, 1));
    assert_eq!(used_idx(&m, &b.rx), 1);
    assert_eq!((a.irqs.count(TX_QUEUE), b.irqs.count(RX_QUEUE)), (0, 0));
}

#[test]
fn bad_chains_are_completed_and_counted_never_panic() {
    let m = mem();
    let (mut a, b) = pair(&m, ALL);
    push_chain(&b.rx, 0, &[(BUF_BASE + 0x10_000, 2048, true)]);
    let tx_err = |a: &Port| a.dev.port().stats().snapshot().tx_errors;
    // TX chain with a device-writable descriptor.
    push_chain(
        &a.tx,
        0,
        &[(BUF_BASE, 12, false), (BUF_BASE + 12, 60, true)],
    );
    a.dev.queue_notify(TX_QUEUE);
    assert_eq!((used_idx(&m, &a.tx), tx_err(&a)), (1, 1));
    // Shorter than the header.
    push_chain(&a.tx, 2, &[(BUF_BASE, 5, false)]);
    a.dev.queue_notify(TX_QUEUE);
    assert_eq!((used_idx(&m, &a.tx), tx_err(&a)), (2, 2));
    // Oversized frame (length sums past MAX_FRAME_BYTES).
    push_chain(
        &a.tx,
        3,
        &[(BUF_BASE, 12, false), (BUF_BASE, 0xffff_0000, false)],
    );
    a.dev.queue_notify(TX_QUEUE);
    assert_eq!((used_idx(&m, &a.tx), tx_err(&a)), (3, 3));
    // Outside guest RAM.
    push_chain(&a.tx, 5, &[(0x1_0000_0000, 100, false)]);
    a.dev.queue_notify(TX_QUEUE);
    assert_eq!((used_idx(&m, &a.tx), tx_err(&a)), (4, 4));
    assert_eq!(used_idx(&m, &b.rx), 0, "nothing reached the peer");
    // RX chain with a readable descriptor: completed empty, the next one is used.
    push_chain(&b.rx, 1, &[(BUF_BASE + 0x11_000, 2048, false)]);
    // (index 0 is still a good buffer: consume it first)
    send(&m, &mut a, 6, BUF_BASE + 0x1000, &frame(30, 1));
    send(&m, &mut a, 8, BUF_BASE + 0x2000, &frame(30, 2));
    assert_eq!(b.dev.port().stats().snapshot().rx_bad_chains, 1);
    assert_eq!(used_elem(&m, &b.rx, 1), (1, 0));
    // An absent queue and notifies after reset are ignored.
    a.dev.queue_notify(9);
    a.dev.reset();
    a.dev.queue_notify(TX_QUEUE);
    assert_eq!(
        b.dev.port().deliver(&vec![0u8; MAX_FRAME_BYTES + 1]),
        Delivery::Dropped
    );
}

#[test]
fn control_commands_are_acknowledged() {
    let m = mem();
    let (a, _b) = pair(&m, ALL);
    // VIRTIO_NET_CTRL_RX / PROMISC on.
    m.write_slice(&[0u8, 0, 1], GuestAddress(BUF_BASE)).unwrap();
    m.write_obj(0xeeu8, GuestAddress(BUF_BASE + 0x100)).unwrap();
    push_chain(
        &a.ctrl,
        0,
        &[
            (BUF_BASE, 2, false),
            (BUF_BASE + 2, 1, false),
            (BUF_BASE + 0x100, 1, true),
        ],
    );
    // Unknown class 0x77: refused.
    m.write_slice(&[0x77u8, 0], GuestAddress(BUF_BASE + 0x200))
        .unwrap();
    push_chain(
        &a.ctrl,
        3,
        &[(BUF_BASE + 0x200, 2, false), (BUF_BASE + 0x300, 1, true)],
    );
    // No ack byte: used length 0.
    push_chain(&a.ctrl, 5, &[(BUF_BASE, 2, false)]);
    let mut a = a;
    a.dev.queue_notify(CTRL_QUEUE);
    assert_eq!(used_idx(&m, &a.ctrl), 3);
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(BUF_BASE + 0x100)).unwrap(),
        VIRTIO_NET_OK as u8
    );
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(BUF_BASE + 0x300)).unwrap(),
        VIRTIO_NET_ERR as u8
    );
    assert_eq!(used_elem(&m, &a.ctrl, 0).1, 1);
    assert_eq!(used_elem(&m, &a.ctrl, 2).1, 0);
    assert_eq!(a.dev.port().stats().snapshot().ctrl_commands, 3);
}

#[test]
fn config_space_and_features() {
    let hubs = Hubs::new();
    let mut c = cfg("x", true);
    c.mac = Some([0x52, 0x54, 0, 1, 2, 3]);
    let n = Net::new(c, None, &hubs).unwrap();
    let mut b = [0u8; 12];
    n.read_config(0, &mut b);
    assert_eq!(&b[..6], &[0x52, 0x54, 0, 1, 2, 3]);
    assert_eq!(
        u16::from_le_bytes([b[6], b[7]]),
        VIRTIO_NET_S_LINK_UP as u16
    );
    let mut far = [0xffu8; 4];
    n.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
    let f = n.device_features();
    for bit in [
        bit(VIRTIO_F_ACCESS_PLATFORM),
        bit(VIRTIO_NET_F_MRG_RXBUF),
        bit(VIRTIO_NET_F_CTRL_VQ),
    ] {
        assert_ne!(f & bit, 0);
    }
    let plain = Net::new(cfg("x", false), None, &hubs).unwrap();
    assert_eq!(plain.device_features() & bit(VIRTIO_F_ACCESS_PLATFORM), 0);
    assert_ne!(plain.mac(), n.mac());
    assert_eq!(plain.queue_max_sizes().len(), 3);
}

// ---- Behind the vIOMMU. ----

const EP_A: u32 = 0x10;
const EP_B: u32 = 0x18;
/// The mock virtio-iommu's queues and buffers (up to 0x18_7000).
const IOMMU_BASE: u64 = 0x18_0000;
/// MAP_F_READ | MAP_F_WRITE.
const RW: u32 = 3;

/// IOVA base of each device's window: IOVA = WIN + GPA for GPAs below 0x18_0000.
const WIN_A: u64 = 0x40_0000_0000;
const WIN_B: u64 = 0x80_0000_0000;

/// Two iommu=on ports on one hub, each in its own domain mapping GPA 0..0x18_0000 at its
/// window; queues are given to the devices as IOVAs.
fn translated_pair(m: &GuestMemoryMmap) -> (MockIommu<'_>, Port<'_>, Port<'_>) {
    let (mut iommu, eps) = MockIommu::new(m, IOMMU_BASE, &[EP_A, EP_B]);
    let (ea, eb) = (eps[0].clone(), eps[1].clone());
    iommu.attach(1, EP_A);
    iommu.map(1, WIN_A, 0x18_0000, 0, RW);
    iommu.attach(2, EP_B);
    iommu.map(2, WIN_B, 0x18_0000, 0, RW);
    let hubs = Hubs::new();
    let a = Net::new(cfg("h", true), Some(ea), &hubs).unwrap();
    let b = Net::new(cfg("h", true), Some(eb), &hubs).unwrap();
    let feats = ALL | bit(VIRTIO_F_ACCESS_PLATFORM);
    // Activate with IOVA ring addresses: build the mock at the GPA, hand IOVAs over.
    let act = |dev: Net, base: u64, win: u64| port_at(m, base, win, dev, feats).unwrap();
    let pa = act(a, RING_BASE, WIN_A);
    let pb = act(b, RING_BASE + 0x8000, WIN_B);
    (iommu, pa, pb)
}

#[test]
fn behind_the_iommu_frames_and_rings_are_translated() {
    let m = mem();
    let (iommu, mut a, b) = translated_pair(&m);
    push_chain(&b.rx, 0, &[(WIN_B + BUF_BASE + 0x10_000, 2048, true)]);
    let f = frame(90, 9);
    // The frame lives at GPA BUF_BASE; the descriptors carry IOVAs.
    m.write_slice(&[0u8; HDR_BYTES], GuestAddress(BUF_BASE))
        .unwrap();
    m.write_slice(&f, GuestAddress(BUF_BASE + HDR_BYTES as u64))
        .unwrap();
    push_chain(
        &a.tx,
        0,
        &[(WIN_A + BUF_BASE, (HDR_BYTES + 90) as u32, false)],
    );
    a.dev.queue_notify(TX_QUEUE);
    assert_eq!(used_idx(&m, &a.tx), 1);
    assert_eq!(used_idx(&m, &b.rx), 1);
    let mut got = vec![0u8; 90];
    m.read_slice(
        &mut got,
        GuestAddress(BUF_BASE + 0x10_000 + HDR_BYTES as u64),
    )
    .unwrap();
    assert_eq!(got, f);
    assert_eq!(iommu.dev.counters().snapshot().faults, 0);
    // A buffer address that is a GPA, not a mapped IOVA: the TX fails, a fault is raised.
    push_chain(&a.tx, 1, &[(BUF_BASE, (HDR_BYTES + 90) as u32, false)]);
    a.dev.queue_notify(TX_QUEUE);
    assert_eq!(used_idx(&m, &a.tx), 2);
    assert_eq!(a.dev.port().stats().snapshot().tx_errors, 1);
    assert!(iommu.dev.counters().snapshot().faults >= 1);
    // An RX buffer that misses translation: the frame is dropped, the chain completed
    // empty, the device keeps working.
    push_chain(&b.rx, 1, &[(0x7_0000_0000, 2048, true)]);
    send_iova(&m, &mut a, 2, WIN_A, BUF_BASE + 0x1000, &frame(20, 1));
    assert_eq!(used_idx(&m, &b.rx), 2);
    assert_eq!(used_elem(&m, &b.rx, 1), (1, 0));
    push_chain(&b.rx, 2, &[(WIN_B + BUF_BASE + 0x11_000, 2048, true)]);
    send_iova(&m, &mut a, 3, WIN_A, BUF_BASE + 0x2000, &frame(20, 2));
    assert_eq!(used_idx(&m, &b.rx), 3);
    assert_eq!(used_elem(&m, &b.rx, 2).1, (HDR_BYTES + 20) as u32);
}

fn send_iova(m: &GuestMemoryMmap, p: &mut Port, first: u16, win: u64, gpa: u64, f: &[u8]) {
    m.write_slice(&[0u8; HDR_BYTES], GuestAddress(gpa)).unwrap();
    m.write_slice(f, GuestAddress(gpa + HDR_BYTES as u64))
        .unwrap();
    push_chain(
        &p.tx,
        first,
        &[(win + gpa, (HDR_BYTES + f.len()) as u32, false)],
    );
    p.dev.queue_notify(TX_QUEUE);
}

/// DPDK's exit: no UNMAP, the endpoint is re-attached to another (default) domain. The old
/// domain dies with its last endpoint: its IOVAs must stop working for the device at once.
#[test]
fn reattach_to_another_domain_drops_the_old_mappings_for_the_device() {
    let m = mem();
    let (mut iommu, mut a, b) = translated_pair(&m);
    push_chain(&b.rx, 0, &[(WIN_B + BUF_BASE + 0x10_000, 2048, true)]);
    send_iova(&m, &mut a, 0, WIN_A, BUF_BASE, &frame(20, 1));
    assert_eq!(used_idx(&m, &b.rx), 1, "works in domain 1");
    // Move EP_A into a fresh domain 3 that maps only the rings (identity of WIN_A for the
    // ring pages), not the buffers.
    iommu.attach(3, EP_A);
    iommu.map(3, WIN_A + RING_BASE, 0x8000, RING_BASE, RW);
    let faults = iommu.dev.counters().snapshot().faults;
    send_iova(&m, &mut a, 1, WIN_A, BUF_BASE, &frame(20, 2));
    assert_eq!(
        used_idx(&m, &a.tx),
        2,
        "the ring still works through domain 3"
    );
    assert_eq!(
        a.dev.port().stats().snapshot().tx_errors,
        1,
        "old IOVA refused"
    );
    assert!(iommu.dev.counters().snapshot().faults > faults);
    assert_eq!(used_idx(&m, &b.rx), 1, "nothing crossed");
    // Domain 1 is gone: attaching EP_A back to it creates an empty domain.
    iommu.attach(1, EP_A);
    iommu.map(1, WIN_A + RING_BASE, 0x8000, RING_BASE, RW);
    send_iova(&m, &mut a, 2, WIN_A, BUF_BASE, &frame(20, 3));
    assert_eq!(
        a.dev.port().stats().snapshot().tx_errors,
        2,
        "domain 1 lost its mappings"
    );
}

/// The rings are reached at their guest-physical addresses only while the current view
/// maps them: once their IOVAs are gone, the device must not touch them at all.
#[test]
fn rings_follow_the_view_and_are_left_alone_once_unmapped() {
    let m = mem();
    let (mut iommu, mut a, b) = translated_pair(&m);
    push_chain(&b.rx, 0, &[(WIN_B + BUF_BASE + 0x10_000, 2048, true)]);
    send_iova(&m, &mut a, 0, WIN_A, BUF_BASE, &frame(20, 1));
    assert_eq!(
        used_idx(&m, &a.tx),
        1,
        "served through the rings' direct GPAs"
    );
    assert_eq!(used_idx(&m, &b.rx), 1);
    // EP_A moves to a domain with nothing mapped: a new chain on the TX ring is not
    // served (its rings are unreachable), the used ring is not written, faults are raised.
    iommu.attach(4, EP_A);
    let faults = iommu.dev.counters().snapshot().faults;
    send_iova(&m, &mut a, 1, WIN_A, BUF_BASE, &frame(20, 2));
    assert_eq!(used_idx(&m, &a.tx), 1, "unmapped rings untouched");
    assert_eq!(a.dev.port().stats().snapshot().tx_frames, 1);
    assert!(iommu.dev.counters().snapshot().faults > faults);
    // Mapped again (rings and buffers): the pending chain is served.
    iommu.map(4, WIN_A, 0x18_0000, 0, RW);
    a.dev.queue_notify(TX_QUEUE);
    assert_eq!(used_idx(&m, &a.tx), 2);
    assert_eq!(a.dev.port().stats().snapshot().tx_frames, 2);
}

#[test]
fn iommu_port_needs_access_platform_and_an_endpoint() {
    let m = mem();
    let hubs = Hubs::new();
    let (_iommu, eps) = MockIommu::new(&m, IOMMU_BASE, &[EP_A, EP_B]);
    let ea = eps[0].clone();
    let n = Net::new(cfg("h", true), Some(ea), &hubs).unwrap();
    assert!(
        port(&m, RING_BASE, n, ALL).is_err(),
        "ACCESS_PLATFORM refused"
    );
    let n = Net::new(cfg("h", true), None, &hubs).unwrap();
    assert!(port(&m, RING_BASE, n, ALL | bit(VIRTIO_F_ACCESS_PLATFORM)).is_err());
}
