//! The device over a real `GuestMemoryMmap`, driven through `VirtioDevice` exactly like the
//! transport would, by `viommu::test_utils::MockDriver`; request bodies are the `spec`
//! structures' bytes (tests corrupt them byte by byte).

#![allow(dead_code)]

use std::sync::Arc;
use viommu::test_utils::{InterruptCounter, MockDriver, MockLayout, QueueLayout, Request, Segment};
use viommu::{Viommu, ViommuConfig};
use virtio_dev::VirtioDevice;
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub const QSIZE: u16 = 16;
pub const MEM_SIZE: usize = 16 << 20;

/// Counts interrupts per queue.
pub type TestIrq = InterruptCounter;

/// A buffer of a chain: (guest address, length, device-writable).
pub type Buf = (u64, u32, bool);

/// Rings at 0x1_0000 (requests) and 0x2_0000 (events), buffers from 1 MiB to the end of RAM.
fn layout() -> MockLayout {
    MockLayout {
        request: QueueLayout::packed(0x1_0000, QSIZE),
        event: QueueLayout::packed(0x2_0000, QSIZE),
        buffers: 0x10_0000..MEM_SIZE as u64,
    }
}

pub struct Driver {
    pub mem: GuestMemoryMmap,
    pub dev: Viommu,
    pub irq: Arc<TestIrq>,
    drv: MockDriver,
}

fn segs(bufs: &[Buf]) -> Vec<Segment> {
    bufs.iter().map(|&b| Segment::from(b)).collect()
}

impl Driver {
    /// A device with `cfg`, endpoints `eps` registered, activated with `features`
    /// (None = everything offered).
    pub fn new(
        cfg: ViommuConfig,
        eps: &[u32],
        features: Option<u64>,
    ) -> (Self, Vec<viommu::EndpointHandle>) {
        let mut dev = Viommu::new(cfg).unwrap();
        let handles = eps.iter().map(|&e| dev.add_endpoint(e).unwrap()).collect();
        (Self::with_device(dev, features), handles)
    }

    /// Activates `dev` (endpoints already registered, e.g. host endpoints) with `features`
    /// (None = everything offered) and drives it.
    pub fn with_device(mut dev: Viommu, features: Option<u64>) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = Arc::new(TestIrq::default());
        let drv = MockDriver::new(mem.clone(), layout()).unwrap();
        let feats = features.unwrap_or_else(|| dev.device_features());
        drv.activate(&mut dev, feats, irq.clone()).unwrap();
        Driver { mem, dev, irq, drv }
    }

    /// Forget every data buffer allocated so far (their completions must have been seen).
    pub fn reset_data(&mut self) {
        self.drv.reset_buffers();
    }

    /// Allocate `len` bytes of data buffer, filled with `fill`.
    pub fn alloc(&mut self, len: usize, fill: u8) -> u64 {
        self.drv.alloc(len, fill).unwrap()
    }

    /// Queue a chain on the request queue (no kick).
    pub fn queue_req(&mut self, bufs: &[Buf]) -> u16 {
        self.drv.queue_request(&segs(bufs)).unwrap()
    }

    /// Post a buffer chain on the event queue.
    pub fn post_event(&mut self, bufs: &[Buf]) -> u16 {
        self.drv.post_event(&segs(bufs)).unwrap()
    }

    pub fn kick(&mut self) {
        self.drv.kick(&mut self.dev);
    }

    /// Write `config.bypass`.
    pub fn set_bypass(&mut self, on: bool) {
        self.drv.set_bypass(&mut self.dev, on);
    }

    pub fn set_no_interrupt(&mut self, on: bool) {
        self.drv.set_request_interrupts(!on).unwrap();
    }

    /// Used entries of the request queue since the last call.
    pub fn used_req(&mut self) -> Vec<(u32, u32)> {
        let used = self.drv.used_requests().unwrap();
        used.into_iter().map(|u| (u.id, u.len)).collect()
    }

    /// Used entries of the event queue since the last call.
    pub fn used_evt(&mut self) -> Vec<(u32, u32)> {
        let used = self.drv.used_events().unwrap();
        used.into_iter().map(|u| (u.id, u.len)).collect()
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        self.drv.read(addr, len).unwrap()
    }

    /// Send one request: `body` readable, `reply_len` writable (pre-filled with 0xaa).
    /// Returns (used len, reply bytes).
    pub fn request(&mut self, body: &[u8], reply_len: u32) -> (u32, Vec<u8>) {
        let reply = self
            .drv
            .send_bytes(&mut self.dev, body, reply_len)
            .expect("one completion");
        (reply.used_len, reply.bytes)
    }

    /// Send a 4-byte-tail request and return the status (asserting used len 4, zero reserved).
    pub fn status(&mut self, body: &[u8]) -> u8 {
        let (len, reply) = self.request(body, 4);
        assert_eq!(len, 4, "used length is exactly the tail");
        assert_eq!(&reply[1..], &[0, 0, 0], "tail reserved bytes zeroed");
        reply[0]
    }
}

pub fn attach(domain: u32, ep: u32, flags: u32) -> Vec<u8> {
    Request::attach(domain, ep, flags).as_bytes().to_vec()
}

pub fn detach(domain: u32, ep: u32) -> Vec<u8> {
    Request::detach(domain, ep).as_bytes().to_vec()
}

pub fn map(domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Vec<u8> {
    Request::map(domain, start, end, phys, flags)
        .as_bytes()
        .to_vec()
}

pub fn unmap(domain: u32, start: u64, end: u64) -> Vec<u8> {
    Request::unmap(domain, start, end).as_bytes().to_vec()
}

pub fn probe(ep: u32) -> Vec<u8> {
    Request::probe(ep).as_bytes().to_vec()
}

pub const OK: u8 = 0;
pub const UNSUPP: u8 = 2;
pub const DEVERR: u8 = 3;
pub const INVAL: u8 = 4;
pub const RANGE: u8 = 5;
pub const NOENT: u8 = 6;
pub const NOMEM: u8 = 8;
pub const R: u32 = 1;
pub const W: u32 = 2;
pub const RW: u32 = 3;
