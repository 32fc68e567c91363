//! A minimal split-ring driver over a real `GuestMemoryMmap`, driving the device through
//! `VirtioDevice` exactly like the transport would.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use viommu::{Viommu, ViommuConfig};
use virtio_dev::{QueueConfig, VirtioDevice, VirtioInterrupt};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

pub const QSIZE: u16 = 16;
pub const MEM_SIZE: usize = 16 << 20;

/// Counts interrupts per queue.
#[derive(Default)]
pub struct TestIrq {
    pub queue: [AtomicUsize; 2],
    pub config: AtomicUsize,
}

impl VirtioInterrupt for TestIrq {
    fn signal_queue(&self, queue: u16) {
        self.queue[queue as usize].fetch_add(1, Ordering::SeqCst);
    }
    fn signal_config(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
}

/// One split ring laid out at `base`.
pub struct Ring {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    fn new(base: u64) -> Self {
        Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn config(&self) -> QueueConfig {
        QueueConfig {
            size: QSIZE,
            desc_table: GuestAddress(self.desc),
            avail_ring: GuestAddress(self.avail),
            used_ring: GuestAddress(self.used),
            ready: true,
        }
    }
}

/// A buffer of a chain: (guest address, length, device-writable).
pub type Buf = (u64, u32, bool);

pub struct Driver {
    pub mem: GuestMemoryMmap,
    pub dev: Viommu,
    pub irq: Arc<TestIrq>,
    pub req: Ring,
    pub evt: Ring,
    next_data: u64,
}

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

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
        let req = Ring::new(0x1_0000);
        let evt = Ring::new(0x2_0000);
        let feats = features.unwrap_or_else(|| dev.device_features());
        dev.activate(
            GuestMemoryAtomic::new(mem.clone()),
            feats,
            vec![req.config(), evt.config()],
            vec![],
            irq.clone(),
        )
        .unwrap();
        Driver {
            mem,
            dev,
            irq,
            req,
            evt,
            next_data: 0x10_0000,
        }
    }

    /// Forget every data buffer allocated so far (their completions must have been seen).
    pub fn reset_data(&mut self) {
        self.next_data = 0x10_0000;
    }

    /// Allocate `len` bytes of data buffer, filled with `fill`.
    pub fn alloc(&mut self, len: usize, fill: u8) -> u64 {
        let a = self.next_data;
        self.next_data += (len as u64 + 0xff) & !0xff;
        self.mem
            .write_slice(&vec![fill; len], GuestAddress(a))
            .unwrap();
        a
    }

    fn add_chain(mem: &GuestMemoryMmap, ring: &mut Ring, bufs: &[Buf]) -> u16 {
        let head = ring.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = ring.next_desc;
            ring.next_desc = (ring.next_desc + 1) % QSIZE;
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
                ring.next_desc
            } else {
                0
            };
            let d = ring.desc + 16 * idx as u64;
            mem.write_obj(addr.to_le(), GuestAddress(d)).unwrap();
            mem.write_obj(len.to_le(), GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags.to_le(), GuestAddress(d + 12)).unwrap();
            mem.write_obj(next.to_le(), GuestAddress(d + 14)).unwrap();
        }
        let slot = ring.avail + 4 + 2 * (ring.avail_idx % QSIZE) as u64;
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        mem.write_obj(ring.avail_idx.to_le(), GuestAddress(ring.avail + 2))
            .unwrap();
        head
    }

    /// Queue a chain on the request queue (no kick).
    pub fn queue_req(&mut self, bufs: &[Buf]) -> u16 {
        Self::add_chain(&self.mem, &mut self.req, bufs)
    }

    /// Post a buffer chain on the event queue.
    pub fn post_event(&mut self, bufs: &[Buf]) -> u16 {
        Self::add_chain(&self.mem, &mut self.evt, bufs)
    }

    pub fn kick(&mut self) {
        self.dev.queue_notify(0);
    }

    pub fn set_no_interrupt(&mut self, on: bool) {
        let f: u16 = if on { VRING_AVAIL_F_NO_INTERRUPT } else { 0 };
        self.mem.write_obj(f, GuestAddress(self.req.avail)).unwrap();
    }

    fn take_used(mem: &GuestMemoryMmap, ring: &mut Ring) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(ring.used + 2)).unwrap();
        let mut out = Vec::new();
        while ring.used_seen != idx {
            let e = ring.used + 4 + 8 * (ring.used_seen % QSIZE) as u64;
            let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id, len));
            ring.used_seen = ring.used_seen.wrapping_add(1);
        }
        out
    }

    /// Used entries of the request queue since the last call.
    pub fn used_req(&mut self) -> Vec<(u32, u32)> {
        Self::take_used(&self.mem, &mut self.req)
    }

    /// Used entries of the event queue since the last call.
    pub fn used_evt(&mut self) -> Vec<(u32, u32)> {
        Self::take_used(&self.mem, &mut self.evt)
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Send one request: `body` readable, `reply_len` writable (pre-filled with 0xaa).
    /// Returns (used len, reply bytes).
    pub fn request(&mut self, body: &[u8], reply_len: u32) -> (u32, Vec<u8>) {
        let b = self.alloc(body.len(), 0);
        self.mem.write_slice(body, GuestAddress(b)).unwrap();
        let r = self.alloc(reply_len as usize, 0xaa);
        let head = self.queue_req(&[(b, body.len() as u32, false), (r, reply_len, true)]);
        self.kick();
        let used = self.used_req();
        assert_eq!(used.len(), 1, "one completion");
        assert_eq!(used[0].0, head as u32);
        (used[0].1, self.read(r, reply_len as usize))
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
    let mut v = vec![1, 0, 0, 0];
    v.extend_from_slice(&domain.to_le_bytes());
    v.extend_from_slice(&ep.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v
}

pub fn detach(domain: u32, ep: u32) -> Vec<u8> {
    let mut v = vec![2, 0, 0, 0];
    v.extend_from_slice(&domain.to_le_bytes());
    v.extend_from_slice(&ep.to_le_bytes());
    v.extend_from_slice(&[0; 8]);
    v
}

pub fn map(domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Vec<u8> {
    let mut v = vec![3, 0, 0, 0];
    v.extend_from_slice(&domain.to_le_bytes());
    v.extend_from_slice(&start.to_le_bytes());
    v.extend_from_slice(&end.to_le_bytes());
    v.extend_from_slice(&phys.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

pub fn unmap(domain: u32, start: u64, end: u64) -> Vec<u8> {
    let mut v = vec![4, 0, 0, 0];
    v.extend_from_slice(&domain.to_le_bytes());
    v.extend_from_slice(&start.to_le_bytes());
    v.extend_from_slice(&end.to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v
}

pub fn probe(ep: u32) -> Vec<u8> {
    let mut v = vec![5, 0, 0, 0];
    v.extend_from_slice(&ep.to_le_bytes());
    v.extend_from_slice(&[0; 64]);
    v
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
