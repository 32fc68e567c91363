//! How an activated device reaches guest memory: guest-physical addresses directly, or (behind
//! the vIOMMU) IOVAs translated through its endpoint, one pinned view per round of work.
//!
//! What every device behind the vIOMMU repeats lives here once: at activation,
//! [`DeviceMemory::activate`] picks the memory and refuses a driver that did not accept
//! VIRTIO_F_ACCESS_PLATFORM, and [`DeviceMemory::build_queues`] checks the rings through the
//! memory the device will use; on a kick, [`DeviceMemory::serve`] runs the shared serve loop
//! ([`virtio_dev::Batch`]) one pin per round, the rings reached directly when [`QueueRings`]
//! allows, and [`DeviceMemory::pinned`] runs any other work (virtio-net's receive side) under
//! one pin.
//!
//! The work is generic over the memories it gets ([`Pinned`], [`ChainHandler`]): compiled once
//! per kind of memory, called without dynamic dispatch, nothing allocated or reference-counted
//! per chain (a round costs one guest-memory guard or one pinned view).

use viommu::{EndpointHandle, PinnedView, TranslatedMemory};
use virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;
use virtio_dev::{usable_queue, ActivateError, Batch, Progress, QueueConfig};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap};

use super::rings::{Buffers, QueueRings};

/// How an activated device reaches guest memory.
#[derive(Clone)]
pub enum DeviceMemory {
    /// Guest-physical addresses (no vIOMMU).
    Direct(GuestMemoryAtomic<GuestMemoryMmap>),
    /// IOVAs of a vIOMMU endpoint: every access is translated, through one pinned view per
    /// round of work.
    Translated(Box<TranslatedMemory>),
}

/// Work on a queue under one pinned memory (see [`DeviceMemory::pinned`]).
pub trait Pinned {
    /// What the work returns.
    type Output;

    /// Behind the vIOMMU, before [`Pinned::run`]: point the queue at its rings for the view
    /// `view` pins ([`QueueRings::prepare`]); true when they are reached directly. The default
    /// keeps every ring access translated.
    fn prepare(&mut self, _view: &PinnedView) -> bool {
        false
    }

    /// Do the work: the queue's rings through `rings`, the buffers its descriptors point to
    /// through `bufs` (the same memory unless the rings are reached directly).
    fn run<R: GuestMemory, B: Buffers>(self, rings: &R, bufs: &B) -> Self::Output;
}

/// Serves one chain of a request-style queue (see [`DeviceMemory::serve`]).
pub trait ChainHandler {
    /// The device, for log lines (`"virtio-blk"`).
    const DEVICE: &'static str;

    /// Serve `chain` of `queue`: its descriptors are read through the chain's memory (the
    /// rings'), what they point to through `bufs`. Returns the chain's used length.
    fn chain<R: GuestMemory, B: Buffers>(
        &mut self,
        queue: &Queue,
        chain: DescriptorChain<&R>,
        bufs: &B,
    ) -> u32;
}

/// The queues of `configs`, rings checked through `mem`.
fn queues_in<M: GuestMemory>(
    configs: &[QueueConfig],
    max_size: u16,
    event_idx: bool,
    mem: &M,
) -> Result<Vec<Queue>, ActivateError> {
    configs
        .iter()
        .map(|qc| usable_queue(qc, max_size, event_idx, mem))
        .collect()
}

impl DeviceMemory {
    /// The activation step of a device created with `iommu` (`iommu=on`: behind the vIOMMU,
    /// through `endpoint`) whose driver acknowledged `acked_features`. A device behind the
    /// vIOMMU needs its endpoint, and a driver that accepted VIRTIO_F_ACCESS_PLATFORM: any other
    /// would hand it guest-physical addresses, and the device must not bypass the IOMMU.
    /// `device` names it in the error and log line (`"virtio-blk"`).
    pub fn activate(
        device: &str,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
        iommu: bool,
        endpoint: Option<&EndpointHandle>,
        acked_features: u64,
    ) -> Result<DeviceMemory, ActivateError> {
        match (endpoint, iommu) {
            (_, false) => Ok(DeviceMemory::Direct(mem.clone())),
            (None, true) => Err(ActivateError::BadQueue(format!(
                "iommu=on {device} without a vIOMMU endpoint"
            ))),
            (Some(_), true) if acked_features & (1 << VIRTIO_F_ACCESS_PLATFORM) == 0 => {
                virtio_dev::guest_warn!("{device}: driver did not accept VIRTIO_F_ACCESS_PLATFORM");
                Err(ActivateError::BadQueue(
                    "VIRTIO_F_ACCESS_PLATFORM not accepted by the driver".into(),
                ))
            }
            (Some(ep), true) => Ok(DeviceMemory::Translated(Box::new(
                TranslatedMemory::from_atomic(mem, ep.clone()),
            ))),
        }
    }

    /// The queues `configs` describe (at most `max_size` entries each, EVENT_IDX as
    /// negotiated), every one enabled and with its rings reachable through this memory (behind
    /// the vIOMMU: mapped for the device; a miss raises a fault).
    pub fn build_queues(
        &self,
        configs: &[QueueConfig],
        max_size: u16,
        event_idx: bool,
    ) -> Result<Vec<Queue>, ActivateError> {
        match self {
            DeviceMemory::Direct(m) => queues_in(configs, max_size, event_idx, &*m.memory()),
            DeviceMemory::Translated(t) => queues_in(configs, max_size, event_idx, &t.pin_view()),
        }
    }

    /// Run `work` under one pin: the current guest memory, or one pinned view of the
    /// endpoint's translations (an UNMAP or DETACH completes only once the work dropped it).
    #[inline]
    pub fn pinned<W: Pinned>(&self, mut work: W) -> W::Output {
        match self {
            DeviceMemory::Direct(m) => {
                let g = m.memory();
                work.run(&*g, &*g)
            }
            DeviceMemory::Translated(t) => {
                let p = t.pin_view();
                if work.prepare(&p) {
                    work.run(p.backend(), &p)
                } else {
                    work.run(&p, &p)
                }
            }
        }
    }

    /// Serve at most `budget` chains of `queue` with `handler` (the shared serve loop; one
    /// notification's work, see [`Served`]): in one round on guest-physical memory; behind the
    /// vIOMMU in rounds of at most `per_pin` chains, each under a fresh pin, the rings reached
    /// directly when `rings` (the queue's [`QueueRings`], for devices that walk chains with
    /// [`super::rings::walk_chain`]) allows.
    pub fn serve<H: ChainHandler>(
        &self,
        queue: &mut Queue,
        mut rings: Option<&mut QueueRings>,
        per_pin: usize,
        budget: usize,
        handler: &mut H,
    ) -> Served {
        let per_round = match self {
            DeviceMemory::Direct(_) => usize::MAX,
            DeviceMemory::Translated(_) => per_pin.max(1),
        };
        let mut left = budget.max(1);
        let mut batch = Batch::new(queue, H::DEVICE);
        loop {
            let max = per_round.min(left);
            let round = Round {
                queue: &mut *queue,
                rings: rings.as_deref_mut(),
                batch: &mut batch,
                max,
                last: max == left,
                handler: &mut *handler,
            };
            match self.pinned(round) {
                (Progress::Done { interrupt }, _) => {
                    return Served {
                        interrupt,
                        more: false,
                    }
                }
                (Progress::More, so_far) if max == left => {
                    return Served {
                        interrupt: so_far,
                        more: true,
                    }
                }
                (Progress::More, _) => left -= max,
            }
        }
    }
}

/// What one notification's [`DeviceMemory::serve`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// The driver wants an interrupt for the chains completed.
    pub interrupt: bool,
    /// The budget ran out with chains possibly left (driver notifications still off): serve
    /// again soon, without waiting for a notification (`VirtioDevice::queue_pending`).
    pub more: bool,
}

/// One round of [`DeviceMemory::serve`].
struct Round<'a, H> {
    queue: &'a mut Queue,
    rings: Option<&'a mut QueueRings>,
    batch: &'a mut Batch,
    max: usize,
    /// The budget ends with this round: if cut short, decide the interrupt for the chains
    /// completed so far (through this round's memory).
    last: bool,
    handler: &'a mut H,
}

impl<H: ChainHandler> Pinned for Round<'_, H> {
    type Output = (Progress, bool);

    fn prepare(&mut self, view: &PinnedView) -> bool {
        match self.rings.as_deref_mut() {
            Some(r) => r.prepare(self.queue, view),
            None => false,
        }
    }

    fn run<R: GuestMemory, B: Buffers>(self, rings: &R, bufs: &B) -> (Progress, bool) {
        let handler = self.handler;
        let p = self.batch.serve(self.queue, rings, self.max, |q, chain| {
            handler.chain(q, chain, bufs)
        });
        let so_far =
            p == Progress::More && self.last && self.batch.interrupt_so_far(self.queue, rings);
        (p, so_far)
    }
}
