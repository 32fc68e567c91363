//! The virtio-net device: features, config space, activation (memory, queues) and the kicks
//! (TX and control served inline, RX handed to the port).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use viommu::EndpointHandle;
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_dev::{read_config_space, ActivateError, QueueConfig, VirtioDevice, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::ctrl::CtrlChains;
use super::rx::NetPort;
use super::stats::bump;
use super::tx::{TxBatch, TxChains};
use super::{CTRL_QUEUE, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::config::{NetBackendConfig, NetConfig};
use crate::devices::virtio::{Desc, DeviceMemory, QueueRings};
use crate::net::{FrameSink, Hubs, NetBackend, Tap};

/// Chains served under one pinned view before taking a fresh one: bounds how long a busy
/// queue can hold an old view (and so delay a synchronous UNMAP).
const CHAINS_PER_PIN: usize = 64;

/// A generated MAC: locally administered, unique within the process.
fn generated_mac() -> [u8; 6] {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    [0x52, 0x54, 0x00, (pid >> 8) as u8, pid as u8, n as u8]
}

/// State of an activated device (TX and control queues; RX lives in the [`NetPort`]).
struct Active {
    mem: DeviceMemory,
    tx: Queue,
    tx_rings: QueueRings,
    ctrl: Option<(Queue, QueueRings)>,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// Scratch for one chain's descriptors.
    descs: Vec<Desc>,
    /// TX and control: the last notification stopped at its budget with chains possibly
    /// left (see [`VirtioDevice::queue_pending`]).
    tx_pending: bool,
    ctrl_pending: bool,
}

/// The virtio-net device model.
pub struct Net {
    config: NetConfig,
    mac: [u8; 6],
    endpoint: Option<EndpointHandle>,
    features: u64,
    port: Arc<NetPort>,
    backend: Box<dyn NetBackend>,
    tx_batch: TxBatch,
    active: Option<Active>,
}

impl Net {
    /// Create a device joined to its backend (`hubs` resolves `hub=ID`); with `endpoint`
    /// every DMA is translated through that vIOMMU endpoint.
    pub fn new(
        cfg: NetConfig,
        endpoint: Option<EndpointHandle>,
        hubs: &Hubs,
    ) -> std::io::Result<Net> {
        let port = Arc::new(NetPort::new());
        let backend: Box<dyn NetBackend> = match &cfg.backend {
            NetBackendConfig::Hub(id) => {
                let sink: Weak<dyn FrameSink> = Arc::downgrade(&port) as Weak<dyn FrameSink>;
                Box::new(hubs.get(id).join(sink))
            }
            NetBackendConfig::Tap(name) => Box::new(Tap::open(name, port.clone())?),
        };
        Ok(Net::with_backend(cfg, endpoint, port, backend))
    }

    /// Create a device with an explicit backend; `port` must be the sink the backend
    /// delivers to.
    pub fn with_backend(
        cfg: NetConfig,
        endpoint: Option<EndpointHandle>,
        port: Arc<NetPort>,
        backend: Box<dyn NetBackend>,
    ) -> Net {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_CTRL_VQ
            | 1 << VIRTIO_NET_F_CTRL_RX;
        if cfg.iommu {
            features |= 1 << VIRTIO_F_ACCESS_PLATFORM;
        }
        let mac = cfg.mac.unwrap_or_else(generated_mac);
        Net {
            config: cfg,
            mac,
            endpoint,
            features,
            port,
            backend,
            tx_batch: TxBatch::default(),
            active: None,
        }
    }

    /// A fresh RX port to pass to [`Net::with_backend`].
    pub fn new_port() -> Arc<NetPort> {
        Arc::new(NetPort::new())
    }

    /// The options the device was created with.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The MAC address in config space.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The port (RX side and counters).
    pub fn port(&self) -> &Arc<NetPort> {
        &self.port
    }

    fn stop(&mut self) {
        self.active = None;
        self.port.stop();
    }

    /// Serve TX for one budget (a round of the queue's size: a driver refilling the ring as
    /// fast as it is served cannot keep one notification busy for ever).
    fn serve_tx(&mut self) {
        let Net {
            active,
            port,
            backend,
            tx_batch,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return;
        };
        let backend: &dyn NetBackend = &**backend;
        let mut chains = TxChains {
            batch: tx_batch,
            backend,
            stats: port.stats(),
            descs: &mut a.descs,
        };
        let budget = usize::from(a.tx.size());
        let served = a.mem.serve(
            &mut a.tx,
            Some(&mut a.tx_rings),
            CHAINS_PER_PIN,
            budget,
            &mut chains,
        );
        tx_batch.flush(backend);
        a.tx_pending = served.more;
        if served.interrupt {
            a.interrupt.signal_queue(TX_QUEUE);
        }
    }

    /// Serve the control queue for one budget (as TX).
    fn serve_ctrl(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some((q, rings)) = a.ctrl.as_mut() else {
            return;
        };
        let mut chains = CtrlChains {
            stats: self.port.stats(),
            descs: &mut a.descs,
        };
        let budget = usize::from(q.size());
        let served = a
            .mem
            .serve(q, Some(rings), CHAINS_PER_PIN, budget, &mut chains);
        a.ctrl_pending = served.more;
        if served.interrupt {
            a.interrupt.signal_queue(CTRL_QUEUE);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    /// `struct virtio_net_config`: mac[6], status, max_virtqueue_pairs, mtu.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&1500u16.to_le_bytes());
        read_config_space(&cfg, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-net: ignoring config write at {offset:#x} ({} bytes)",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        acked_features: u64,
        queues: Vec<QueueConfig>,
        _kicks: Vec<EventFd>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.stop();
        let ctrl_on = acked_features & (1 << VIRTIO_NET_F_CTRL_VQ) != 0;
        let wanted = if ctrl_on { 3 } else { 2 };
        if queues.len() < wanted {
            return Err(ActivateError::BadQueue(format!(
                "expected {wanted} queues, got {}",
                queues.len()
            )));
        }
        let netmem = DeviceMemory::activate(
            "virtio-net",
            &mem,
            self.config.iommu,
            self.endpoint.as_ref(),
            acked_features,
        )?;
        let mut qs = netmem.build_queues(&queues[..wanted], QUEUE_SIZE, false)?;
        let ctrl = if ctrl_on { qs.pop() } else { None };
        let tx = qs
            .pop()
            .ok_or(ActivateError::BadQueue("no TX queue".into()))?;
        let rxq = qs
            .pop()
            .ok_or(ActivateError::BadQueue("no RX queue".into()))?;
        let mergeable = acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        self.port
            .start(netmem.clone(), rxq, interrupt.clone(), mergeable);
        self.active = Some(Active {
            mem: netmem,
            tx_rings: QueueRings::new(&tx),
            tx,
            ctrl: ctrl.map(|q| {
                let r = QueueRings::new(&q);
                (q, r)
            }),
            interrupt,
            descs: Vec::new(),
            tx_pending: false,
            ctrl_pending: false,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }

    fn inline_notify(&self) -> bool {
        true
    }

    fn queue_notify(&mut self, queue: u16) {
        match queue {
            RX_QUEUE => self.port.kick(),
            TX_QUEUE => {
                bump(&self.port.stats().tx_kicks);
                self.serve_tx()
            }
            CTRL_QUEUE => self.serve_ctrl(),
            q => virtio_dev::guest_warn!("virtio-net: notify for absent queue {q}"),
        }
    }

    /// TX or control cut short at its budget: the VMM's continuation thread
    /// (`devices::polled`) calls `queue_notify` again.
    fn queue_pending(&self, queue: u16) -> bool {
        match (&self.active, queue) {
            (Some(a), TX_QUEUE) => a.tx_pending,
            (Some(a), CTRL_QUEUE) => a.ctrl_pending,
            _ => false,
        }
    }
}
