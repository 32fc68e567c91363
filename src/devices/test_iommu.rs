//! Test support for devices behind the vIOMMU: mock split queues, and a virtio-iommu driven
//! through its request queue like a driver would, over the same guest memory as the device
//! under test.

use std::marker::PhantomData;
use std::sync::Arc;

use viommu::test_utils::{MockDriver, MockLayout, QueueLayout, Segment};
use viommu::{EndpointHandle, Status};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemoryMmap;

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
pub(crate) use viommu::test_utils::NoInterrupt as NoIrq;

/// Request queue size.
const REQ_QSIZE: u16 = 64;

/// A virtio-iommu (boot bypass off) whose queues live in the guest memory at `base`: the
/// request ring at `base`, the event ring at `base + 0x1000` with four 24-byte fault buffers at
/// [`MockIommu::event_buf_at`], request buffers in `base + 0x2000..base + 0x6000`. Requests go
/// through [`viommu::test_utils::MockDriver`].
pub(crate) struct MockIommu<'a> {
    /// The device.
    pub dev: viommu::Viommu,
    drv: MockDriver,
    /// Tied to the caller's guest memory, where the queues live (the driver holds a clone).
    _mem: PhantomData<&'a GuestMemoryMmap>,
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
        let layout = MockLayout {
            request: QueueLayout::packed(base, REQ_QSIZE),
            event: QueueLayout::packed(base + 0x1000, 16),
            buffers: base + 0x2000..base + 0x6000,
        };
        let mut drv = MockDriver::new(m.clone(), layout).unwrap();
        for i in 0..4u16 {
            let at = Self::event_buf_at(base, i);
            drv.post_event(&[Segment::writable(at, 24)]).unwrap();
        }
        drv.activate_offered(&mut dev, Arc::new(NoIrq)).unwrap();
        let io = MockIommu {
            dev,
            drv,
            _mem: PhantomData,
        };
        (io, handles)
    }

    /// Guest address of fault buffer `i` (0..4) on the event queue of an IOMMU at `base`.
    pub fn event_buf_at(base: u64, i: u16) -> u64 {
        base + 0x6000 + u64::from(i) * 0x40
    }

    /// ATTACH `ep` to `domain` (must succeed).
    pub fn attach(&mut self, domain: u32, ep: u32) {
        let st = self.drv.attach(&mut self.dev, domain, ep).unwrap();
        assert_eq!(st, Status::Ok, "attach {ep:#x} to {domain}");
    }

    /// MAP `size` bytes at `iova` to `gpa` with MAP `flags` in `domain` (must succeed).
    pub fn map(&mut self, domain: u32, iova: u64, size: u64, gpa: u64, flags: u32) {
        let st = self.drv.map(&mut self.dev, domain, iova, size, gpa, flags);
        assert_eq!(st.unwrap(), Status::Ok, "map {iova:#x} in {domain}");
    }

    /// UNMAP `size` bytes at `iova` in `domain` (must succeed).
    pub fn unmap(&mut self, domain: u32, iova: u64, size: u64) {
        let st = self.drv.unmap(&mut self.dev, domain, iova, size);
        assert_eq!(st.unwrap(), Status::Ok, "unmap {iova:#x} in {domain}");
    }
}
