//! The mock driver: two split rings and a buffer area in the caller's guest memory, requests
//! written as the [`spec`](crate::spec) structures, the device driven through `VirtioDevice`
//! (activate, config space, queue notifications) exactly like the transport does.

use super::error::MockError;
use super::request::{Property, Reply, Request, REPLY_FILL};
use super::ring::{MockLayout, Ring, Segment, Used};
use crate::virtio::spec::{
    FaultRecord, IommuConfig, Status, CONFIG_BYPASS_OFFSET, EVENT_QUEUE, REQUEST_QUEUE,
};
use std::sync::Arc;
use virtio_bindings::bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_dev::{QueueConfig, VirtioDevice, VirtioInterrupt};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// Buffers are carved at this alignment.
const BUF_ALIGN: u64 = 16;

/// A virtio-iommu driver over split rings in guest memory (see the module doc). It holds no
/// device: every call that notifies or configures one takes it, so the device can stay wherever
/// the VMM keeps it.
#[derive(Debug)]
pub struct MockDriver {
    mem: GuestMemoryMmap,
    layout: MockLayout,
    req: Ring,
    evt: Ring,
    next_buf: u64,
    /// The chain posted at each head of the event queue (to read fault records back).
    posted: Vec<Vec<Segment>>,
}

impl MockDriver {
    /// A driver with empty rings laid out in `mem` (a clone of the caller's guest memory) as
    /// `layout` says.
    pub fn new(mem: GuestMemoryMmap, layout: MockLayout) -> Result<Self, MockError> {
        layout.check(&mem)?;
        let req = Ring::new(&mem, layout.request)?;
        let evt = Ring::new(&mem, layout.event)?;
        Ok(MockDriver {
            next_buf: layout.buffers.start,
            posted: vec![Vec::new(); usize::from(layout.event.size)],
            mem,
            layout,
            req,
            evt,
        })
    }

    /// The guest memory the rings and buffers live in.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Where the rings and buffers are.
    pub fn layout(&self) -> &MockLayout {
        &self.layout
    }

    /// The request and event queues as the transport hands them to the device.
    pub fn queue_configs(&self) -> Vec<QueueConfig> {
        vec![self.layout.request.config(), self.layout.event.config()]
    }

    /// Start `dev` on this driver's queues with `features` acked (no ioeventfds: the driver
    /// notifies with [`MockDriver::kick`]).
    pub fn activate<D: VirtioDevice + ?Sized>(
        &self,
        dev: &mut D,
        features: u64,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), MockError> {
        dev.activate(
            GuestMemoryAtomic::new(self.mem.clone()),
            features,
            self.queue_configs(),
            Vec::new(),
            interrupt,
        )?;
        Ok(())
    }

    /// [`MockDriver::activate`] with every feature the device offers acked.
    pub fn activate_offered<D: VirtioDevice + ?Sized>(
        &self,
        dev: &mut D,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), MockError> {
        let features = dev.device_features();
        self.activate(dev, features, interrupt)
    }

    /// `len` bytes of the buffer area, filled with `fill`.
    pub fn alloc(&mut self, len: usize, fill: u8) -> Result<u64, MockError> {
        let asked = len as u64;
        let at = self.next_buf;
        let end = asked
            .checked_add(BUF_ALIGN - 1)
            .map(|l| l & !(BUF_ALIGN - 1))
            .and_then(|l| at.checked_add(l))
            .filter(|&e| e <= self.layout.buffers.end)
            .ok_or(MockError::OutOfBuffers(asked))?;
        self.mem.write_slice(&vec![fill; len], GuestAddress(at))?;
        self.next_buf = end;
        Ok(at)
    }

    /// Reuse the whole buffer area (every chain using it must have completed).
    pub fn reset_buffers(&mut self) {
        self.next_buf = self.layout.buffers.start;
    }

    /// Read `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, MockError> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr))?;
        Ok(v)
    }

    /// Make a chain of `segs` available on the request queue (without notifying); its head.
    pub fn queue_request(&mut self, segs: &[Segment]) -> Result<u16, MockError> {
        self.req.push(&self.mem, segs)
    }

    /// Make a chain of `segs` available on the event queue; its head.
    pub fn post_event(&mut self, segs: &[Segment]) -> Result<u16, MockError> {
        let head = self.evt.push(&self.mem, segs)?;
        if let Some(p) = self.posted.get_mut(usize::from(head)) {
            *p = segs.to_vec();
        }
        Ok(head)
    }

    /// Post `n` buffers of one fault record each on the event queue; their addresses.
    pub fn post_fault_buffers(&mut self, n: usize) -> Result<Vec<u64>, MockError> {
        let size = std::mem::size_of::<FaultRecord>();
        (0..n)
            .map(|_| {
                let at = self.alloc(size, 0)?;
                self.post_event(&[Segment::writable(at, size as u32)])?;
                Ok(at)
            })
            .collect()
    }

    /// Notify the request queue (the device serves it before returning).
    pub fn kick<D: VirtioDevice + ?Sized>(&self, dev: &mut D) {
        dev.queue_notify(REQUEST_QUEUE);
    }

    /// Ask the device not to interrupt for the request queue (`VRING_AVAIL_F_NO_INTERRUPT`).
    pub fn set_request_interrupts(&self, enabled: bool) -> Result<(), MockError> {
        let flags = if enabled {
            0
        } else {
            VRING_AVAIL_F_NO_INTERRUPT as u16
        };
        let at = GuestAddress(self.layout.request.avail_ring);
        Ok(self.mem.write_obj(flags.to_le(), at)?)
    }

    /// Used entries of the request queue since the last call.
    pub fn used_requests(&mut self) -> Result<Vec<Used>, MockError> {
        self.req.take_used(&self.mem)
    }

    /// Used entries of the event queue since the last call.
    pub fn used_events(&mut self) -> Result<Vec<Used>, MockError> {
        self.evt.take_used(&self.mem)
    }

    /// The fault records the device completed on the event queue since the last call, like
    /// [`MockDriver::used_events`] (whose entries it consumes); buffers too short for a record,
    /// which the device returns unwritten, are skipped.
    pub fn faults(&mut self) -> Result<Vec<FaultRecord>, MockError> {
        let size = std::mem::size_of::<FaultRecord>();
        let mut out = Vec::new();
        for u in self.used_events()? {
            if u.len as usize != size {
                continue;
            }
            let segs = usize::try_from(u.id)
                .ok()
                .and_then(|i| self.posted.get(i))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mut bytes = Vec::with_capacity(size);
            for s in segs.iter().filter(|s| s.writable) {
                let take = (s.len as usize).min(size - bytes.len());
                bytes.extend(self.read(s.addr, take)?);
            }
            if let Some(r) = FaultRecord::from_slice(&bytes) {
                out.push(*r);
            }
        }
        Ok(out)
    }

    /// Send `body` followed by a `reply_len`-byte writable buffer (filled with [`REPLY_FILL`]),
    /// kick, and return what the device wrote. Once completed, the request's buffers are reused
    /// by the next one.
    pub fn send_bytes<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        body: &[u8],
        reply_len: u32,
    ) -> Result<Reply, MockError> {
        let mark = self.next_buf;
        let queued = self.queue_body(body, reply_len);
        let (head, reply_at) = match queued {
            Ok(q) => q,
            Err(e) => {
                self.next_buf = mark;
                return Err(e);
            }
        };
        self.kick(dev);
        // Until its completion is seen the chain may still be in flight: keep its buffers.
        let got = self.used_requests()?;
        match got.as_slice() {
            [u] if u.id == u32::from(head) => {
                let bytes = self.read(reply_at, reply_len as usize)?;
                self.next_buf = mark;
                Ok(Reply {
                    used_len: u.len,
                    bytes,
                })
            }
            _ => Err(MockError::Completion { head, got }),
        }
    }

    /// Write `body` and a reply buffer and queue them as one chain: its head, the reply's
    /// address.
    fn queue_body(&mut self, body: &[u8], reply_len: u32) -> Result<(u16, u64), MockError> {
        let blen = u32::try_from(body.len()).map_err(|_| MockError::OutOfBuffers(u64::MAX))?;
        let b = self.alloc(body.len(), 0)?;
        self.mem.write_slice(body, GuestAddress(b))?;
        let r = self.alloc(reply_len as usize, REPLY_FILL)?;
        let segs = [Segment::readable(b, blen), Segment::writable(r, reply_len)];
        Ok((self.queue_request(&segs)?, r))
    }

    /// Send `req` (a PROBE with room for the device's `probe_size`) and return the reply.
    pub fn send<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        req: &Request,
    ) -> Result<Reply, MockError> {
        let probe_size = self.config(&*dev).probe_size.into();
        self.send_bytes(dev, req.as_bytes(), req.reply_len(probe_size))
    }

    /// Send `req` and return the tail's status.
    pub fn status<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        req: &Request,
    ) -> Result<Status, MockError> {
        self.send(dev, req)?.status()
    }

    /// ATTACH `endpoint` to `domain`.
    pub fn attach<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        domain: u32,
        endpoint: u32,
    ) -> Result<Status, MockError> {
        self.status(dev, &Request::attach(domain, endpoint, 0))
    }

    /// ATTACH `endpoint` to the bypass domain `domain`.
    pub fn attach_bypass<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        domain: u32,
        endpoint: u32,
    ) -> Result<Status, MockError> {
        self.status(dev, &Request::attach_bypass(domain, endpoint))
    }

    /// DETACH `endpoint` from `domain`.
    pub fn detach<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        domain: u32,
        endpoint: u32,
    ) -> Result<Status, MockError> {
        self.status(dev, &Request::detach(domain, endpoint))
    }

    /// MAP `size` bytes at IOVA `iova` of `domain` to GPA `gpa` with MAP_F_* `flags`.
    pub fn map<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        domain: u32,
        iova: u64,
        size: u64,
        gpa: u64,
        flags: u32,
    ) -> Result<Status, MockError> {
        let end = iova.wrapping_add(size).wrapping_sub(1);
        self.status(dev, &Request::map(domain, iova, end, gpa, flags))
    }

    /// UNMAP `size` bytes at IOVA `iova` of `domain`.
    pub fn unmap<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        domain: u32,
        iova: u64,
        size: u64,
    ) -> Result<Status, MockError> {
        let end = iova.wrapping_add(size).wrapping_sub(1);
        self.status(dev, &Request::unmap(domain, iova, end))
    }

    /// PROBE `endpoint`: the status and the properties the device reported.
    pub fn probe<D: VirtioDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        endpoint: u32,
    ) -> Result<(Status, Vec<Property>), MockError> {
        let reply = self.send(dev, &Request::probe(endpoint))?;
        Ok((reply.status()?, reply.properties()?))
    }

    /// The device's configuration space.
    pub fn config<D: VirtioDevice + ?Sized>(&self, dev: &D) -> IommuConfig {
        let mut cfg = IommuConfig::default();
        dev.read_config(0, cfg.as_mut_slice());
        cfg
    }

    /// Write `config.bypass` (the device ignores it without VIRTIO_IOMMU_F_BYPASS_CONFIG).
    pub fn set_bypass<D: VirtioDevice + ?Sized>(&self, dev: &mut D, on: bool) {
        dev.write_config(CONFIG_BYPASS_OFFSET, &[u8::from(on)]);
    }

    /// `config.bypass` as the device reports it.
    pub fn bypass<D: VirtioDevice + ?Sized>(&self, dev: &D) -> bool {
        self.config(dev).bypass == 1
    }
}

// `MockDriver::queue_configs` lists the queues in index order.
const _: () = assert!(REQUEST_QUEUE == 0 && EVENT_QUEUE == 1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::endpoint::EndpointHandle;
    use crate::engine::mapping::Access;
    use crate::engine::translate::TranslatedMemory;
    use crate::test_utils::NoInterrupt;
    use crate::virtio::config::ViommuConfig;
    use crate::virtio::device::Viommu;
    use crate::virtio::spec::{FAULT_R_MAPPING, MAP_F_READ, MAP_F_WRITE, RESV_MEM_T_MSI};

    const EP: u32 = 0x08;

    fn setup(cfg: ViommuConfig) -> (MockDriver, Viommu, EndpointHandle) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut dev = Viommu::new(cfg).unwrap();
        let ep = dev.add_endpoint(EP).unwrap();
        let drv = MockDriver::new(mem, MockLayout::packed(0, 0x1_0000, 16, 16)).unwrap();
        drv.activate_offered(&mut dev, Arc::new(NoInterrupt))
            .unwrap();
        (drv, dev, ep)
    }

    #[test]
    fn typed_requests_reach_the_engine() {
        let (mut drv, mut dev, ep) = setup(ViommuConfig::default());
        assert_eq!(drv.attach(&mut dev, 1, EP).unwrap(), Status::Ok);
        let rw = MAP_F_READ | MAP_F_WRITE;
        assert_eq!(
            drv.map(&mut dev, 1, 0x10_0000, 0x1000, 0x8000, rw).unwrap(),
            Status::Ok
        );
        let m = ep.view().translate(0x10_0010, Access::Write).unwrap();
        assert_eq!(m.gpa_of(0x10_0010), 0x8010);
        assert_eq!(
            drv.map(&mut dev, 7, 0, 0x1000, 0, rw).unwrap(),
            Status::NoEnt
        );
        assert_eq!(
            drv.unmap(&mut dev, 1, 0x10_0000, 0x1000).unwrap(),
            Status::Ok
        );
        assert!(ep.view().translate(0x10_0010, Access::Read).is_err());
        assert_eq!(drv.detach(&mut dev, 1, EP).unwrap(), Status::Ok);
        // Every request gave its buffers back.
        assert_eq!(drv.next_buf, drv.layout().buffers.start);
        // More requests than the queue has entries: the rings wrap.
        for _ in 0..40 {
            assert_eq!(drv.attach_bypass(&mut dev, 2, EP).unwrap(), Status::Ok);
        }
    }

    #[test]
    fn probe_properties_and_unwritten_replies() {
        let (mut drv, mut dev, _) = setup(ViommuConfig::default());
        let (st, props) = drv.probe(&mut dev, EP).unwrap();
        assert_eq!(st, Status::Ok);
        assert_eq!(
            props,
            vec![Property::ResvMem {
                subtype: RESV_MEM_T_MSI,
                start: 0xfee0_0000,
                end: 0xfeef_ffff
            }]
        );
        // A body one byte short is returned unwritten.
        let body = Request::attach(1, EP, 0);
        let reply = drv.send_bytes(&mut dev, &body.as_bytes()[..19], 4).unwrap();
        assert_eq!(reply.bytes, vec![REPLY_FILL; 4]);
        assert!(matches!(reply.status(), Err(MockError::Unanswered(0))));
    }

    #[test]
    fn bypass_config_and_fault_records() {
        let (mut drv, mut dev, ep) = setup(ViommuConfig::default());
        assert!(drv.bypass(&dev));
        drv.set_bypass(&mut dev, false);
        assert!(!drv.bypass(&dev));
        drv.post_fault_buffers(2).unwrap();
        assert_eq!(drv.attach(&mut dev, 1, EP).unwrap(), Status::Ok);
        let tm = TranslatedMemory::new(drv.mem().clone(), ep);
        assert!(tm.read_obj::<u32>(GuestAddress(0x4000)).is_err());
        let f = drv.faults().unwrap();
        assert_eq!(f.len(), 1);
        let (reason, endpoint, address) = (f[0].reason, f[0].endpoint, f[0].address);
        assert_eq!(
            (reason, u32::from(endpoint), u64::from(address)),
            (FAULT_R_MAPPING, EP, 0x4000)
        );
        assert!(drv.faults().unwrap().is_empty(), "read once");
    }
}
