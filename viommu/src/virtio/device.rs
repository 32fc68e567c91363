//! The virtio-iommu device (type 23) behind the virtio-pci transport: features, config space,
//! the request queue (served inline on the vCPU thread that kicked) and the event queue.
//!
//! # Work per notification
//! One notification serves at most one round of chains (the queue size: every request a driver
//! can have outstanding at once) and stops early, after the request that crossed it, once the
//! requests of this notification made [`HOST_CALLS_PER_NOTIFY`] host mapper calls (an ATTACH
//! of a host endpoint replays its new domain: one call per mapping). What is left is reported
//! by [`VirtioDevice::queue_pending`] and served by the next `queue_notify` (the VMM's
//! continuation thread calls it at once, see `devices::polled`). One request is never split:
//! the guest may see ATTACH complete only once the container holds exactly the new domain, so
//! the cost of one ATTACH stays one replay (at most the domain's mapping limit); a ping-pong of
//! ATTACHes costs one replay per ATTACH, as the isolation demands, but at most about
//! `HOST_CALLS_PER_NOTIFY` (plus one request's own) per notification under the device lock.

use crate::engine::endpoint::{DomainError, EndpointHandle};
use crate::engine::host::HostMapper;
use crate::virtio::config::{ConfigError, ViommuConfig};
use crate::virtio::counters::Counters;
use crate::virtio::event::{EventQueue, FaultReporter};
use crate::virtio::request::{parse, ParseError, Reply, Request};
use crate::virtio::rules::Domains;
use crate::virtio::spec::{
    IommuConfig, Status, CONFIG_BYPASS_OFFSET, EVENT_QUEUE, F_BYPASS_CONFIG, F_DOMAIN_RANGE,
    F_INPUT_RANGE, F_MAP_UNMAP, F_MMIO, F_PROBE, REQUEST_QUEUE, TAIL_SIZE, VIRTIO_F_VERSION_1,
    VIRTIO_ID_IOMMU,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_dev::{
    build_queue, wants_interrupt, ActivateError, QueueConfig, VirtioDevice, VirtioInterrupt,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

#[path = "snapshot.rs"]
mod snapshot;

/// Host mapper calls (VFIO map/unmap) after which a notification stops serving requests; the
/// rest is served by the next one (see the module doc).
pub const HOST_CALLS_PER_NOTIFY: u64 = 4096;

/// A host mapper that counts the calls made through it (the work budget of a notification).
struct Metered {
    inner: Arc<dyn HostMapper>,
    calls: Arc<AtomicU64>,
}

impl HostMapper for Metered {
    fn map(
        &self,
        iova: u64,
        size: u64,
        gpa: u64,
        prot: crate::engine::host::Prot,
    ) -> Result<(), crate::engine::host::HostMapError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.map(iova, size, gpa, prot)
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), crate::engine::host::HostMapError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.unmap(iova, size)
    }

    fn records(&self) -> usize {
        self.inner.records()
    }
}

struct Active {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// The virtio-iommu device. The VMM registers the endpoints behind it before handing it to the
/// transport, and gives each emulated device the returned [`EndpointHandle`].
pub struct Viommu {
    config: ViommuConfig,
    queue_sizes: [u16; 2],
    domains: Domains,
    counters: Arc<Counters>,
    faults: Arc<FaultReporter>,
    acked: u64,
    active: Option<Active>,
    completions: Vec<(u16, u32)>,
    /// Host mapper calls made through every host endpoint's mapper.
    host_calls: Arc<AtomicU64>,
    /// The wrapper of each host mapper registered (same mapper, same wrapper: the engine
    /// dedupes host address spaces by pointer).
    metered: Vec<(Arc<dyn HostMapper>, Arc<dyn HostMapper>)>,
    /// The last notification stopped at its budget with requests left.
    pending: bool,
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

impl Viommu {
    /// A device with `config` (validated) and no endpoints.
    pub fn new(config: ViommuConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let counters = Arc::new(Counters::default());
        let faults = Arc::new(FaultReporter::new(counters.clone(), config.fault_rate));
        let mut domains = Domains::new(
            config.geometry,
            config.limits,
            config.reserved_regions.clone(),
            config.bypass,
            faults.clone(),
        );
        domains.set_negotiated(true, config.mmio);
        Ok(Viommu {
            queue_sizes: [config.queue_size; 2],
            config,
            domains,
            counters,
            faults,
            acked: 0,
            active: None,
            completions: Vec::new(),
            host_calls: Arc::new(AtomicU64::new(0)),
            metered: Vec::new(),
            pending: false,
        })
    }

    /// Register an emulated endpoint (PCI BDF `bus << 8 | dev << 3 | fn`).
    pub fn add_endpoint(&mut self, id: u32) -> Result<EndpointHandle, DomainError> {
        self.domains.add_endpoint(id, None)
    }

    /// Register an endpoint whose DMA goes through the host IOMMU `host` (e.g. VFIO); the
    /// engine mirrors its domain's mappings there.
    pub fn add_host_endpoint(
        &mut self,
        id: u32,
        host: Arc<dyn HostMapper>,
    ) -> Result<EndpointHandle, DomainError> {
        let metered = match self.metered.iter().find(|(h, _)| Arc::ptr_eq(h, &host)) {
            Some((_, m)) => m.clone(),
            None => {
                let m: Arc<dyn HostMapper> = Arc::new(Metered {
                    inner: host.clone(),
                    calls: self.host_calls.clone(),
                });
                self.metered.push((host, m.clone()));
                m
            }
        };
        self.domains.add_endpoint(id, Some(metered))
    }

    /// Host mapper calls made so far through the host endpoints' mappers.
    pub fn host_calls(&self) -> u64 {
        self.host_calls.load(Ordering::Relaxed)
    }

    /// Guest RAM as `(start, len)` ranges: identity-mapped into the host address spaces of
    /// bypass domains and, while `config.bypass` is on, of host endpoints that are not attached
    /// (boot bypass: assigned devices can DMA before the guest driver attaches them). Call it
    /// when creating the VM (before any endpoint DMA) and again when RAM is added or removed;
    /// activation refreshes it from the guest memory map.
    pub fn set_guest_ram(&mut self, ranges: &[(u64, u64)]) {
        self.domains.set_ram(ranges);
    }

    /// The live counters.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The fault reporter shared by all endpoints.
    pub fn fault_reporter(&self) -> Arc<FaultReporter> {
        self.faults.clone()
    }

    /// Estimated heap bytes held for guest-created state (domains, tables with their copies,
    /// endpoints, in-flight completions); at most [`ViommuConfig::memory_bound`] between
    /// request batches.
    pub fn memory_estimate(&self) -> usize {
        self.domains.memory_estimate()
            + self.completions.capacity() * std::mem::size_of::<(u16, u32)>()
    }

    /// The domain state (read-only, for tests and debugging).
    pub fn domains(&self) -> &Domains {
        &self.domains
    }

    /// How long an UNMAP (or any removal of access) waits for a device holding the old
    /// translations before revoking them (default `PIN_DEADLINE`, 5 s).
    pub fn set_pin_deadline(&mut self, deadline: std::time::Duration) {
        self.domains.set_pin_deadline(deadline);
    }

    /// System reset: like a device reset, and `config.bypass` returns to its initial value.
    pub fn system_reset(&mut self) {
        self.reset();
        self.domains.set_bypass(self.config.bypass);
    }

    fn negotiated(&self, b: u32) -> bool {
        self.acked & bit(b) != 0
    }

    fn config_space(&self) -> IommuConfig {
        let g = &self.config.geometry;
        IommuConfig {
            page_size_mask: g.page_size_mask.into(),
            input_start: g.input_start.into(),
            input_end: g.input_end.into(),
            domain_start: g.domain_start.into(),
            domain_end: g.domain_end.into(),
            probe_size: self.config.probe_size.into(),
            bypass: u8::from(self.domains.bypass()),
            reserved: [0; 3],
        }
    }

    /// Count and execute one parsed request ([`Domains`] applies the spec's rules); returns its
    /// status (the reply body for PROBE is written by the caller).
    fn execute(&mut self, req: &Request) -> Status {
        match req {
            Request::Attach(_) => self.counters.attach(),
            Request::Detach(_) => self.counters.detach(),
            Request::Map(_) => self.counters.map(),
            Request::Unmap(_) => self.counters.unmap(),
            Request::Probe(_) => self.counters.probe(),
        }
        self.domains.apply(req)
    }

    /// Serve one chain; returns the used length.
    fn serve(
        &mut self,
        head: u16,
        reply_result: Result<(Request, Reply), ParseError>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let (req, reply) = match reply_result {
            Ok(x) => x,
            Err(e) => {
                virtio_dev::guest_warn!("virtio-iommu: malformed request (head {head}): {e}");
                self.counters.malformed();
                return 0;
            }
        };
        let status = self.execute(&req);
        if status != Status::Ok {
            virtio_dev::guest_warn!("virtio-iommu: {req:?} -> {status:?}");
        }
        self.counters.status(status);
        let tail = [status as u8, 0, 0, 0];
        let written = if matches!(req, Request::Probe(_)) {
            let mut data = if status == Status::Ok {
                self.domains.probe_properties(self.config.probe_size)
            } else {
                vec![0u8; self.config.probe_size as usize + TAIL_SIZE]
            };
            let at = data.len() - TAIL_SIZE;
            data[at..].copy_from_slice(&tail);
            reply.write(mem, &data).map(|()| data.len())
        } else {
            reply.write(mem, &tail).map(|()| TAIL_SIZE)
        };
        match written {
            // Bounded by MAX_PROBE_SIZE + TAIL_SIZE.
            Ok(n) => n as u32,
            Err(e) => {
                virtio_dev::guest_warn!("virtio-iommu: cannot write reply (head {head}): {e}");
                0
            }
        }
    }

    /// Pop and serve the available requests up to this notification's budget (see the module
    /// doc), publish the resulting views once, then complete the chains (an UNMAP completes
    /// only after no device can use the old mapping).
    fn process_requests(&mut self) {
        self.pending = false;
        let Some(mut active) = self.active.take() else {
            return;
        };
        self.counters.kick();
        let mem = active.mem.memory();
        let probe_size = self.negotiated(F_PROBE).then_some(self.config.probe_size);
        let since = active.queue.next_used();
        let mut completions = std::mem::take(&mut self.completions);
        let calls_at_start = self.host_calls();
        completions.clear();
        let mut over_budget = false;
        while completions.len() < usize::from(active.queue.size()) {
            if self.host_calls().wrapping_sub(calls_at_start) >= HOST_CALLS_PER_NOTIFY {
                over_budget = true;
                break;
            }
            let Some(chain) = active.queue.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let parsed = parse(chain, probe_size);
            let len = self.serve(head, parsed, &mem);
            completions.push((head, len));
        }
        if !completions.is_empty() {
            self.domains.publish();
            for &(head, len) in &completions {
                if let Err(e) = active.queue.add_used(&*mem, head, len) {
                    virtio_dev::guest_warn!("virtio-iommu: request queue used ring: {e}");
                }
            }
            let full_round = completions.len() >= usize::from(active.queue.size());
            self.pending = (over_budget || full_round)
                && active
                    .queue
                    .avail_idx(&*mem, std::sync::atomic::Ordering::Acquire)
                    .is_ok_and(|idx| idx.0 != active.queue.next_avail());
        }
        if wants_interrupt(&active.queue, &*mem, since) {
            self.counters.interrupt();
            active.interrupt.signal_queue(REQUEST_QUEUE);
        }
        self.completions = completions;
        drop(mem);
        self.active = Some(active);
    }
}

impl Drop for Viommu {
    fn drop(&mut self) {
        self.counters.log_summary();
        log::info!(
            "virtio-iommu: memory estimate {} bytes (bound {})",
            self.memory_estimate(),
            self.config.memory_bound()
        );
    }
}

impl VirtioDevice for Viommu {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_IOMMU
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(F_INPUT_RANGE)
            | bit(F_DOMAIN_RANGE)
            | bit(F_MAP_UNMAP)
            | bit(F_PROBE)
            | bit(F_BYPASS_CONFIG);
        if self.config.mmio {
            f |= bit(F_MMIO);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_space();
        let bytes = cfg.as_slice();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| bytes.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `bypass` is writable, by a driver that may use it: before activation the
        // negotiated features are not known yet, after it BYPASS_CONFIG must be acked.
        let allowed = self.active.is_none() || self.negotiated(F_BYPASS_CONFIG);
        match (offset, data) {
            (CONFIG_BYPASS_OFFSET, [v @ (0 | 1)]) if allowed => self.domains.set_bypass(*v == 1),
            _ => virtio_dev::guest_warn!(
                "virtio-iommu: ignored config write at {offset:#x} ({} bytes)",
                data.len()
            ),
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        acked_features: u64,
        queues: Vec<QueueConfig>,
        _kicks: Vec<EventFd>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 {
            return Err(ActivateError::BadQueue(format!(
                "{} queues, need 2",
                queues.len()
            )));
        }
        let req = build_queue(&queues[0], self.queue_sizes[0], false)?;
        let evt = build_queue(&queues[1], self.queue_sizes[1], false)?;
        let evt_ok = {
            let m = mem.memory();
            if !req.is_valid(&*m) {
                return Err(ActivateError::BadQueue(
                    "request queue not ready or outside guest memory".into(),
                ));
            }
            evt.is_valid(&*m)
        };
        if !evt_ok {
            virtio_dev::guest_warn!(
                "virtio-iommu: event queue unusable; faults will not be reported"
            );
        }
        {
            use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
            let m = mem.memory();
            let ram: Vec<(u64, u64)> = m.iter().map(|r| (r.start_addr().0, r.len())).collect();
            self.domains.set_ram(&ram);
        }
        self.acked = acked_features & self.device_features();
        self.domains
            .set_negotiated(self.negotiated(F_BYPASS_CONFIG), self.negotiated(F_MMIO));
        self.faults.set_queue(evt_ok.then(|| EventQueue {
            queue: evt,
            mem: mem.clone(),
            interrupt: interrupt.clone(),
        }));
        self.active = Some(Active {
            mem,
            queue: req,
            interrupt,
        });
        log::info!("virtio-iommu: activated, features {:#x}", self.acked);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.pending = false;
        self.faults.set_queue(None);
        self.acked = 0;
        self.domains.set_negotiated(true, self.config.mmio);
        self.domains.reset();
    }

    fn inline_notify(&self) -> bool {
        true
    }

    fn queue_pending(&self, queue: u16) -> bool {
        queue == REQUEST_QUEUE && self.pending && self.active.is_some()
    }

    fn save_state(&self) -> Option<Vec<u8>> {
        Some(Viommu::save_state(self))
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        Viommu::restore_state(self, state).map_err(|e| e.to_string())
    }

    fn queue_notify(&mut self, queue: u16) {
        match queue {
            REQUEST_QUEUE => self.process_requests(),
            // Event buffers are consumed when faults happen; nothing is queued meanwhile.
            EVENT_QUEUE => {}
            q => virtio_dev::guest_warn!("virtio-iommu: notify for unknown queue {q}"),
        }
    }
}
