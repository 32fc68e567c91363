//! The virtio-blk device: features, config space, activation (memory, queues) and serving,
//! inline on the kicking vCPU thread or on a worker thread woken by ioeventfds.

use std::io;
use std::mem::offset_of;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use viommu::EndpointHandle;
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_dev::{read_config_space, ActivateError, QueueConfig, VirtioDevice, VirtioInterrupt};
use virtio_queue::Queue;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{BlockBackend, BlockStats, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX};
use crate::config::BlockConfig;
use crate::devices::virtio::{Desc, DeviceMemory};

/// Queue state of an activated device, served inline (on the kicking vCPU thread) or by the
/// worker thread.
struct Queues {
    mem: DeviceMemory,
    queues: Vec<Queue>,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// Scratch for one chain's descriptors.
    descs: Vec<Desc>,
    /// Per queue: the last serve stopped at its budget with chains possibly left.
    pending: Vec<bool>,
}

impl Queues {
    /// Serve queue `i` (after a kick) for one budget (a round of the queue's size); signal
    /// the driver if it wants it. Returns whether chains may be left for another call.
    fn serve(&mut self, backend: &BlockBackend, i: usize) -> bool {
        let Queues {
            mem,
            queues,
            interrupt,
            descs,
            pending,
        } = self;
        let (Some(q), Some(left)) = (queues.get_mut(i), pending.get_mut(i)) else {
            virtio_dev::guest_warn!("virtio-blk: notify for absent queue {i}");
            return false;
        };
        let served = backend.serve(mem, q, descs);
        if served.interrupt {
            interrupt.signal_queue(i as u16);
        }
        *left = served.more;
        served.more
    }
}

/// The virtio-blk device model.
pub struct Block {
    config: BlockConfig,
    endpoint: Option<EndpointHandle>,
    backend: Arc<BlockBackend>,
    features: u64,
    config_space: Vec<u8>,
    worker: Option<(JoinHandle<()>, EventFd)>,
    inline: Option<Queues>,
}

impl Block {
    /// Open the disk described by `cfg` (not behind a vIOMMU: with `iommu=on` it cannot be
    /// activated, use [`Block::with_endpoint`]).
    pub fn new(cfg: BlockConfig) -> io::Result<Block> {
        Block::with_endpoint(cfg, None)
    }

    /// What this disk did so far (shared with its queue server).
    pub fn stats(&self) -> &Arc<BlockStats> {
        self.backend.stats()
    }

    /// Open the disk described by `cfg`; with `endpoint`, every DMA of the device (rings and
    /// buffers) is translated through that vIOMMU endpoint.
    pub fn with_endpoint(cfg: BlockConfig, endpoint: Option<EndpointHandle>) -> io::Result<Block> {
        let backend = Arc::new(BlockBackend::open(&cfg)?);
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_RING_F_EVENT_IDX;
        if cfg.indirect {
            features |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
        }
        if cfg.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        if cfg.iommu {
            features |= 1 << VIRTIO_F_ACCESS_PLATFORM;
        }
        // struct virtio_blk_config up to (without) the secure-erase fields: capacity,
        // size_max, seg_max, geometry, blk_size, ...
        let mut config_space = vec![0u8; offset_of!(virtio_blk_config, max_secure_erase_sectors)];
        let mut put = |at: usize, v: &[u8]| config_space[at..at + v.len()].copy_from_slice(v);
        put(
            offset_of!(virtio_blk_config, capacity),
            &backend.sectors().to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &SEG_MAX.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &(SECTOR_SIZE as u32).to_le_bytes(),
        );
        Ok(Block {
            config: cfg,
            endpoint,
            backend,
            features,
            config_space,
            worker: None,
            inline: None,
        })
    }

    /// The options the device was created with.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Path of the backing file.
    pub fn path(&self) -> &Path {
        &self.config.path
    }

    fn stop_worker(&mut self) {
        self.inline = None;
        if let Some((thread, stop)) = self.worker.take() {
            let _ = stop.write(1);
            if thread.join().is_err() {
                log::error!("virtio-blk worker panicked");
            }
        }
    }

    /// Tests: a slow or refilling backend (see `BlockBackend::before_transfer`); before
    /// activation.
    #[cfg(test)]
    pub(super) fn set_before_transfer(&mut self, f: Box<dyn Fn() + Send + Sync>) {
        if let Some(b) = Arc::get_mut(&mut self.backend) {
            b.before_transfer = Some(f);
        }
    }

    /// Whether a worker thread serves the queues (for tests).
    #[cfg(test)]
    pub(super) fn has_worker(&self) -> bool {
        self.worker.is_some()
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// Whether the stop eventfd was written (without consuming it).
fn stop_requested(stop: &EventFd) -> bool {
    let mut fd = libc::pollfd {
        fd: stop.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a zero timeout never blocks.
    let r = unsafe { libc::poll(&mut fd, 1, 0) };
    r > 0 && fd.revents != 0
}

/// Wait on the kick eventfds and the stop eventfd; serve queues until stopped.
fn worker_loop(backend: Arc<BlockBackend>, mut queues: Queues, kicks: Vec<EventFd>, stop: EventFd) {
    if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::BlockWorker) {
        log::error!("virtio-blk worker: {}", crate::report::Chain(&e));
        return;
    }
    let mut fds: Vec<libc::pollfd> = kicks
        .iter()
        .chain(std::iter::once(&stop))
        .map(|e| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("virtio-blk worker: poll: {e}");
            return;
        }
        if fds[kicks.len()].revents != 0 {
            return;
        }
        for (i, kick) in kicks.iter().enumerate() {
            if fds[i].revents == 0 {
                continue;
            }
            let _ = kick.read();
            // One budget at a time, looking for a stop request in between (a reset waits
            // for this thread).
            while queues.serve(&backend, i) {
                if stop_requested(&stop) {
                    return;
                }
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-blk: ignoring config write at {offset:#x} ({} bytes)",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        acked_features: u64,
        queues: Vec<QueueConfig>,
        kicks: Vec<EventFd>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.stop_worker();
        if queues.len() != 1 || kicks.len() != 1 {
            return Err(ActivateError::BadQueue(format!(
                "expected 1 queue, got {} queues and {} kicks",
                queues.len(),
                kicks.len()
            )));
        }
        let event_idx = acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mem = DeviceMemory::activate(
            "virtio-blk",
            &mem,
            self.config.iommu,
            self.endpoint.as_ref(),
            acked_features,
        )?;
        let queues = Queues {
            queues: mem.build_queues(&queues, QUEUE_SIZE, event_idx)?,
            pending: vec![false; queues.len()],
            mem,
            interrupt,
            descs: Vec::new(),
        };
        if self.config.inline {
            self.inline = Some(queues);
            return Ok(());
        }
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop2 = stop.try_clone()?;
        let backend = self.backend.clone();
        let thread = std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || worker_loop(backend, queues, kicks, stop2))?;
        self.worker = Some((thread, stop));
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    fn inline_notify(&self) -> bool {
        self.config.inline
    }

    /// Inline: one budget per notification (see [`BlockBackend::serve`]); what is left is
    /// reported by [`VirtioDevice::queue_pending`] for the VMM's continuation thread
    /// (`devices::polled`) to serve.
    fn queue_notify(&mut self, queue: u16) {
        if let Some(st) = self.inline.as_mut() {
            st.serve(&self.backend, usize::from(queue));
        }
    }

    fn queue_pending(&self, queue: u16) -> bool {
        self.inline
            .as_ref()
            .and_then(|st| st.pending.get(usize::from(queue)))
            .copied()
            .unwrap_or(false)
    }
}
