//! Test support for devices behind the vIOMMU: mock split queues, and a virtio-iommu driven
//! through its request queue like a driver would, over the same guest memory as the device
//! under test.

use std::sync::Arc;

use viommu::EndpointHandle;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_dev::{QueueConfig, VirtioDevice, VirtioInterrupt};
use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// Append one chain of `(addr, len, device-writable)` descriptors at table index `first`.
pub(crate) fn push_chain(
    vq: &MockSplitQueue<GuestMemoryMmap>,
    first: u16,
    descs: &[(u64, u32, bool)],
) {
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, w))| {
            let last = i == descs.len() - 1;
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let next = if last { 0 } else { first + i as u16 + 1 };
            RawDescriptor::from(SplitDesc::new(addr, len, flags, next))
        })
        .collect();
    vq.add_desc_chains(&raw, first).unwrap();
}

/// An interrupt sink that drops everything.
pub(crate) struct NoIrq;

impl VirtioInterrupt for NoIrq {
    fn signal_queue(&self, _queue: u16) {}
    fn signal_config(&self) {}
}

/// Request queue size (two descriptors per request).
const REQ_QSIZE: u16 = 64;

/// A virtio-iommu (boot bypass off) whose queues live in the guest memory at `base`: the
/// request ring at `base`, the event ring at `base + 0x1000` with four 24-byte fault buffers at
/// [`MockIommu::event_buf_at`], request buffers from `base + 0x2000` (0x40 each, up to 256).
pub(crate) struct MockIommu<'a> {
    /// The device.
    pub dev: viommu::Viommu,
    req: MockSplitQueue<'a, GuestMemoryMmap>,
    m: &'a GuestMemoryMmap,
    base: u64,
    sent: u64,
}

impl<'a> MockIommu<'a> {
    /// The device with endpoints `eps` registered (their handles returned in order), activated.
    pub fn new(m: &'a GuestMemoryMmap, base: u64, eps: &[u32]) -> (Self, Vec<EndpointHandle>) {
        let mut dev = viommu::Viommu::new(viommu::ViommuConfig {
            bypass: false,
            ..Default::default()
        })
        .unwrap();
        let handles = eps.iter().map(|&e| dev.add_endpoint(e).unwrap()).collect();
        let req = MockSplitQueue::create(m, GuestAddress(base), REQ_QSIZE);
        let evt = MockSplitQueue::create(m, GuestAddress(base + 0x1000), 16);
        for i in 0..4u16 {
            push_chain(&evt, i, &[(Self::event_buf_at(base, i), 24, true)]);
        }
        let qc = |q: &MockSplitQueue<GuestMemoryMmap>, size| QueueConfig {
            size,
            desc_table: q.desc_table_addr(),
            avail_ring: q.avail_addr(),
            used_ring: q.used_addr(),
            ready: true,
        };
        dev.activate(
            GuestMemoryAtomic::new(m.clone()),
            dev.device_features(),
            vec![qc(&req, REQ_QSIZE), qc(&evt, 16)],
            vec![],
            Arc::new(NoIrq),
        )
        .unwrap();
        let io = MockIommu {
            dev,
            req,
            m,
            base,
            sent: 0,
        };
        (io, handles)
    }

    /// Guest address of fault buffer `i` (0..4) on the event queue of an IOMMU at `base`.
    pub fn event_buf_at(base: u64, i: u16) -> u64 {
        base + 0x6000 + u64::from(i) * 0x40
    }

    /// Send one request (`body`, then a 4-byte tail) and return the status byte.
    pub fn request(&mut self, body: &[u8]) -> u8 {
        assert!(self.sent < 256, "request buffers exhausted");
        let at = self.base + 0x2000 + self.sent * 0x40;
        let head = (2 * self.sent % u64::from(REQ_QSIZE)) as u16;
        self.sent += 1;
        self.m.write_slice(body, GuestAddress(at)).unwrap();
        self.m.write_obj(0xffu8, GuestAddress(at + 0x3c)).unwrap();
        push_chain(
            &self.req,
            head,
            &[(at, body.len() as u32, false), (at + 0x3c, 4, true)],
        );
        self.dev.queue_notify(0);
        self.m.read_obj(GuestAddress(at + 0x3c)).unwrap()
    }

    /// ATTACH `ep` to `domain` (must succeed).
    pub fn attach(&mut self, domain: u32, ep: u32) {
        let mut b = vec![1u8, 0, 0, 0];
        b.extend_from_slice(&domain.to_le_bytes());
        b.extend_from_slice(&ep.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        assert_eq!(self.request(&b), 0, "attach {ep:#x} to {domain}");
    }

    /// MAP `size` bytes at `iova` to `gpa` with MAP `flags` in `domain` (must succeed).
    pub fn map(&mut self, domain: u32, iova: u64, size: u64, gpa: u64, flags: u32) {
        let mut b = vec![3u8, 0, 0, 0];
        b.extend_from_slice(&domain.to_le_bytes());
        b.extend_from_slice(&iova.to_le_bytes());
        b.extend_from_slice(&(iova + size - 1).to_le_bytes());
        b.extend_from_slice(&gpa.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        assert_eq!(self.request(&b), 0, "map {iova:#x} in {domain}");
    }
}
