//! The virtio-pci common configuration structure: feature negotiation, device status and
//! per-queue setup, plus the interrupt state it shares with the running device.

use crate::msix::MsixConfig;
use log::{debug, warn};
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use virtio_bindings::virtio_config::{
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use virtio_dev::{QueueConfig, VirtioInterrupt};
use vm_memory::GuestAddress;

/// "No MSI-X vector" in msix_config and queue_msix_vector.
pub const NO_VECTOR: u16 = 0xffff;
/// Length of the common configuration structure this transport implements.
pub const COMMON_CFG_LEN: u64 = 0x38;

/// Device status bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: the device may start.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// ISR bit: a queue was used.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: the device configuration changed.
pub const ISR_CONFIG: u8 = 2;

/// Interrupt routing shared between the transport and the running device: the MSI-X vector
/// of each queue and of config changes, the ISR byte, and the MSI-X table.
pub struct VirtioInterruptState {
    isr: AtomicU8,
    config_generation: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Box<[AtomicU16]>,
    msix: Arc<Mutex<MsixConfig>>,
}

impl VirtioInterruptState {
    /// State for `num_queues` queues, every vector NO_VECTOR.
    pub fn new(num_queues: usize, msix: Arc<Mutex<MsixConfig>>) -> Self {
        VirtioInterruptState {
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..num_queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            msix,
        }
    }

    /// Read and clear the ISR byte.
    pub fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::AcqRel)
    }

    /// The MSI-X state.
    pub fn msix(&self) -> &Arc<Mutex<MsixConfig>> {
        &self.msix
    }

    fn reset(&self) {
        self.isr.store(0, Ordering::Release);
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in self.queue_vectors.iter() {
            v.store(NO_VECTOR, Ordering::Release);
        }
    }

    fn raise(&self, isr: u8, vector: u16) {
        self.isr.fetch_or(isr, Ordering::AcqRel);
        if vector != NO_VECTOR {
            lockwatch::lock(&self.msix).trigger(vector);
        }
    }
}

impl VirtioInterrupt for VirtioInterruptState {
    fn signal_queue(&self, queue: u16) {
        match self.queue_vectors.get(usize::from(queue)) {
            Some(v) => self.raise(ISR_QUEUE, v.load(Ordering::Acquire)),
            None => warn!("virtio-pci: signal for queue {queue} out of range"),
        }
    }

    /// A configuration change also bumps config_generation, so a driver reading a multi-field
    /// configuration notices it changed under its feet.
    fn signal_config(&self) {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.raise(ISR_CONFIG, self.config_vector.load(Ordering::Acquire));
    }
}

#[derive(Clone, Copy, Debug)]
struct QueueState {
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueState {
    fn new(max_size: u16) -> Self {
        QueueState {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// What the transport must do after a common config write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommonAction {
    /// Nothing.
    None,
    /// The driver wrote 0 to device_status: reset the device.
    Reset,
    /// The driver set DRIVER_OK: activate the device.
    Activate,
}

/// The common configuration registers of one virtio-pci function.
pub struct CommonConfig {
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    acked_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<QueueState>,
    num_vectors: u16,
    interrupt: Arc<VirtioInterruptState>,
}

impl CommonConfig {
    /// Registers for a device offering `device_features` with `queue_max_sizes`; vector numbers
    /// must be below `num_vectors` (the MSI-X table size).
    pub fn new(
        device_features: u64,
        queue_max_sizes: &[u16],
        num_vectors: u16,
        interrupt: Arc<VirtioInterruptState>,
    ) -> Self {
        CommonConfig {
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            acked_features: 0,
            status: 0,
            queue_select: 0,
            queues: queue_max_sizes
                .iter()
                .map(|&m| QueueState::new(m))
                .collect(),
            num_vectors,
            interrupt,
        }
    }

    /// Back to the power-on state (the interrupt vectors too).
    pub fn reset(&mut self) {
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.acked_features = 0;
        self.status = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueState::new(q.max_size);
        }
        self.interrupt.reset();
    }

    /// Device status byte.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Set DEVICE_NEEDS_RESET (the device failed).
    pub fn set_needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
    }

    /// The queues as the driver configured them.
    pub fn queue_configs(&self) -> Vec<QueueConfig> {
        self.queues
            .iter()
            .map(|q| QueueConfig {
                size: q.size,
                desc_table: GuestAddress(q.desc),
                avail_ring: GuestAddress(q.driver),
                used_ring: GuestAddress(q.device),
                ready: q.enabled,
            })
            .collect()
    }

    /// Guest read at `offset`; any size, bytes past the structure read zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let regs = self.snapshot();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| regs.get(usize::try_from(o).ok()?).copied())
                .unwrap_or(0);
        }
    }

    /// Guest write: only whole fields (64-bit fields also as two 32-bit halves) are accepted.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> CommonAction {
        let value = match *data {
            [a] => u64::from(a),
            [a, b] => u64::from(u16::from_le_bytes([a, b])),
            [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
            [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
            _ => {
                virtio_dev::guest_warn!(
                    "virtio-pci: common config write of {} bytes ignored",
                    data.len()
                );
                return CommonAction::None;
            }
        };
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) => self.write_driver_features(value as u32),
            (0x10, 2) => self.write_config_vector(value as u16),
            (0x14, 1) => return self.write_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x18, 2) => self.write_queue_size(value as u16),
            (0x1a, 2) => self.write_queue_vector(value as u16),
            (0x1c, 2) => self.write_queue_enable(value as u16),
            (0x20..=0x37, 4 | 8) if offset & (data.len() as u64 - 1) == 0 => {
                self.write_queue_address(offset, data.len(), value)
            }
            _ => virtio_dev::guest_warn!(
                "virtio-pci: common config write at {offset:#x} size {} ignored",
                data.len()
            ),
        }
        CommonAction::None
    }

    fn snapshot(&self) -> [u8; COMMON_CFG_LEN as usize] {
        let mut r = [0u8; COMMON_CFG_LEN as usize];
        let feature_word = |select: u32, features: u64| match select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        r[0x00..0x04].copy_from_slice(&self.device_feature_select.to_le_bytes());
        let dev = feature_word(self.device_feature_select, self.device_features);
        r[0x04..0x08].copy_from_slice(&dev.to_le_bytes());
        r[0x08..0x0c].copy_from_slice(&self.driver_feature_select.to_le_bytes());
        let drv = feature_word(self.driver_feature_select, self.acked_features);
        r[0x0c..0x10].copy_from_slice(&drv.to_le_bytes());
        let config_vector = self.interrupt.config_vector.load(Ordering::Acquire);
        r[0x10..0x12].copy_from_slice(&config_vector.to_le_bytes());
        r[0x12..0x14].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        r[0x14] = self.status;
        r[0x15] = self.interrupt.config_generation.load(Ordering::Acquire);
        r[0x16..0x18].copy_from_slice(&self.queue_select.to_le_bytes());
        let sel = usize::from(self.queue_select);
        if let Some(q) = self.queues.get(sel) {
            let vector = self.interrupt.queue_vectors[sel].load(Ordering::Acquire);
            r[0x18..0x1a].copy_from_slice(&q.size.to_le_bytes());
            r[0x1a..0x1c].copy_from_slice(&vector.to_le_bytes());
            r[0x1c..0x1e].copy_from_slice(&u16::from(q.enabled).to_le_bytes());
            r[0x1e..0x20].copy_from_slice(&self.queue_select.to_le_bytes());
            r[0x20..0x28].copy_from_slice(&q.desc.to_le_bytes());
            r[0x28..0x30].copy_from_slice(&q.driver.to_le_bytes());
            r[0x30..0x38].copy_from_slice(&q.device.to_le_bytes());
        } else {
            // queue_size 0 tells the driver the queue does not exist.
            r[0x1a..0x1c].copy_from_slice(&NO_VECTOR.to_le_bytes());
        }
        r
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            virtio_dev::guest_warn!(
                "virtio-pci: driver features written after FEATURES_OK, ignored"
            );
            return;
        }
        let shift = match self.driver_feature_select {
            0 => 0,
            1 => 32,
            s => {
                debug!("virtio-pci: driver feature word {s} ignored");
                return;
            }
        };
        let offered = (self.device_features >> shift) as u32;
        if value & !offered != 0 {
            virtio_dev::guest_warn!(
                "virtio-pci: driver acked unoffered features {:#x} (word {})",
                value & !offered,
                shift / 32
            );
        }
        let word = u64::from(value & offered) << shift;
        self.acked_features = (self.acked_features & !(0xffff_ffffu64 << shift)) | word;
    }

    fn valid_vector(&self, vector: u16) -> u16 {
        if vector < self.num_vectors {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn write_config_vector(&mut self, vector: u16) {
        let v = self.valid_vector(vector);
        self.interrupt.config_vector.store(v, Ordering::Release);
    }

    fn write_status(&mut self, value: u8) -> CommonAction {
        if value == 0 {
            return CommonAction::Reset;
        }
        let old = self.status;
        // The driver may only add bits; DEVICE_NEEDS_RESET belongs to the device.
        if old & !value & !status::DEVICE_NEEDS_RESET != 0 {
            virtio_dev::guest_warn!(
                "virtio-pci: status {old:#x} -> {value:#x} clears bits, ignored"
            );
            return CommonAction::None;
        }
        let mut new = (value & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET);
        if new & status::FEATURES_OK != 0
            && old & status::FEATURES_OK == 0
            && !self.features_acceptable()
        {
            new &= !status::FEATURES_OK;
        }
        if new & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            virtio_dev::guest_warn!("virtio-pci: DRIVER_OK without FEATURES_OK, ignored");
            new &= !status::DRIVER_OK;
        }
        self.status = new;
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            return CommonAction::Activate;
        }
        CommonAction::None
    }

    /// Refuse FEATURES_OK without VERSION_1, or without ACCESS_PLATFORM when the device offers
    /// it (the device then relies on the IOMMU translating its DMA).
    fn features_acceptable(&self) -> bool {
        let version_1 = 1u64 << VIRTIO_F_VERSION_1;
        let platform = 1u64 << VIRTIO_F_ACCESS_PLATFORM;
        if self.acked_features & version_1 == 0 {
            virtio_dev::guest_warn!(
                "virtio-pci: driver did not accept VIRTIO_F_VERSION_1, FEATURES_OK refused"
            );
            return false;
        }
        if self.device_features & platform != 0 && self.acked_features & platform == 0 {
            virtio_dev::guest_warn!(
                "virtio-pci: driver refused VIRTIO_F_ACCESS_PLATFORM, FEATURES_OK refused"
            );
            return false;
        }
        true
    }

    /// The selected queue, if it exists and may still be configured.
    fn configurable_queue(&mut self, what: &str) -> Option<&mut QueueState> {
        let sel = self.queue_select;
        if self.status & status::DRIVER_OK != 0 {
            virtio_dev::guest_warn!(
                "virtio-pci: queue {sel} {what} written after DRIVER_OK, ignored"
            );
            return None;
        }
        match self.queues.get_mut(usize::from(sel)) {
            Some(q) if q.enabled => {
                virtio_dev::guest_warn!(
                    "virtio-pci: queue {sel} {what} written while enabled, ignored"
                );
                None
            }
            Some(q) => Some(q),
            None => {
                virtio_dev::guest_warn!("virtio-pci: {what} write for absent queue {sel}, ignored");
                None
            }
        }
    }

    fn write_queue_size(&mut self, size: u16) {
        let packed = self.acked_features & (1u64 << VIRTIO_F_RING_PACKED) != 0;
        let Some(q) = self.configurable_queue("size") else {
            return;
        };
        if size == 0 || size > q.max_size || (!packed && !size.is_power_of_two()) {
            virtio_dev::guest_warn!(
                "virtio-pci: invalid queue size {size} (max {}), ignored",
                q.max_size
            );
            return;
        }
        q.size = size;
    }

    fn write_queue_vector(&mut self, vector: u16) {
        let v = self.valid_vector(vector);
        let sel = usize::from(self.queue_select);
        match self.interrupt.queue_vectors.get(sel) {
            Some(slot) => slot.store(v, Ordering::Release),
            None => virtio_dev::guest_warn!(
                "virtio-pci: msix vector write for absent queue {sel}, ignored"
            ),
        }
    }

    fn write_queue_enable(&mut self, value: u16) {
        if value != 1 {
            virtio_dev::guest_warn!("virtio-pci: queue_enable write of {value} ignored");
            return;
        }
        if let Some(q) = self.configurable_queue("enable") {
            q.enabled = true;
        }
    }

    fn write_queue_address(&mut self, offset: u64, len: usize, value: u64) {
        let Some(q) = self.configurable_queue("address") else {
            return;
        };
        let field = match offset & !7 {
            0x20 => &mut q.desc,
            0x28 => &mut q.driver,
            _ => &mut q.device,
        };
        *field = match (len, offset % 8) {
            (8, _) => value,
            (_, 0) => (*field & !0xffff_ffff) | value,
            _ => (*field & 0xffff_ffff) | (value << 32),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msix::tests::FakeMsi;

    const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM) | 0b1010;

    fn common() -> CommonConfig {
        let msix = MsixConfig::new(3, Arc::new(FakeMsi::default())).unwrap();
        let irq = Arc::new(VirtioInterruptState::new(2, Arc::new(Mutex::new(msix))));
        CommonConfig::new(FEATURES, &[256, 64], 3, irq)
    }

    fn r(c: &CommonConfig, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        c.read(offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn w(c: &mut CommonConfig, offset: u64, len: usize, v: u64) -> CommonAction {
        c.write(offset, &v.to_le_bytes()[..len])
    }

    fn negotiate(c: &mut CommonConfig, low: u32, high: u32) {
        w(c, 0x14, 1, 1);
        w(c, 0x14, 1, 3);
        w(c, 0x08, 4, 0);
        w(c, 0x0c, 4, u64::from(low));
        w(c, 0x08, 4, 1);
        w(c, 0x0c, 4, u64::from(high));
        w(c, 0x14, 1, 0xb);
    }

    #[test]
    fn feature_negotiation_both_words() {
        let mut c = common();
        assert_eq!(r(&c, 0x04, 4), 0b1010);
        w(&mut c, 0x00, 4, 1);
        assert_eq!(r(&c, 0x04, 4), 0b11);
        w(&mut c, 0x00, 4, 7);
        assert_eq!(r(&c, 0x04, 4), 0);
        // The driver can only ack offered bits, per word.
        negotiate(&mut c, 0xffff_ffff, 0xffff_ffff);
        assert_eq!(c.acked_features(), FEATURES);
        assert_eq!(r(&c, 0x14, 1), 0xb);
        w(&mut c, 0x08, 4, 0);
        assert_eq!(r(&c, 0x0c, 4), 0b1010);
        // After FEATURES_OK the features are frozen.
        w(&mut c, 0x0c, 4, 0);
        assert_eq!(c.acked_features(), FEATURES);
    }

    #[test]
    fn features_ok_refused_without_version_1_or_platform() {
        let mut c = common();
        negotiate(&mut c, 0b10, 0);
        assert_eq!(r(&c, 0x14, 1), 3);
        let mut c = common();
        negotiate(&mut c, 0b10, 1);
        assert_eq!(r(&c, 0x14, 1), 3);
        let mut c = common();
        negotiate(&mut c, 0b10, 3);
        assert_eq!(r(&c, 0x14, 1), 0xb);
        assert_eq!(c.acked_features(), FEATURES & !0b1000);
    }

    #[test]
    fn queue_setup_through_select() {
        let mut c = common();
        assert_eq!(r(&c, 0x12, 2), 2);
        w(&mut c, 0x16, 2, 1);
        assert_eq!(r(&c, 0x18, 2), 64);
        assert_eq!(r(&c, 0x1e, 2), 1);
        assert_eq!(r(&c, 0x1a, 2), u64::from(NO_VECTOR));
        w(&mut c, 0x18, 2, 32);
        w(&mut c, 0x18, 2, 48); // not a power of two
        w(&mut c, 0x18, 2, 128); // above max
        w(&mut c, 0x1a, 2, 2);
        w(&mut c, 0x20, 8, 0x1_0000_1000);
        w(&mut c, 0x28, 4, 0x2000);
        w(&mut c, 0x2c, 4, 0x3);
        w(&mut c, 0x30, 4, 0x4000);
        w(&mut c, 0x1c, 2, 1);
        // Enabled: further writes are ignored.
        w(&mut c, 0x18, 2, 16);
        w(&mut c, 0x20, 8, 0xdead_0000);
        assert_eq!(r(&c, 0x18, 2), 32);
        assert_eq!(r(&c, 0x1a, 2), 2);
        assert_eq!(r(&c, 0x1c, 2), 1);
        assert_eq!(r(&c, 0x20, 8), 0x1_0000_1000);
        assert_eq!(r(&c, 0x28, 8), 0x3_0000_2000);
        // Invalid vectors read back as NO_VECTOR.
        w(&mut c, 0x1a, 2, 3);
        assert_eq!(r(&c, 0x1a, 2), u64::from(NO_VECTOR));
        w(&mut c, 0x10, 2, 0);
        assert_eq!(r(&c, 0x10, 2), 0);
        w(&mut c, 0x10, 2, 9);
        assert_eq!(r(&c, 0x10, 2), u64::from(NO_VECTOR));
        // Queue 0 untouched.
        w(&mut c, 0x16, 2, 0);
        assert_eq!(r(&c, 0x18, 2), 256);
        assert_eq!(r(&c, 0x1c, 2), 0);
        // Absent queue: size 0, writes ignored.
        w(&mut c, 0x16, 2, 9);
        assert_eq!(r(&c, 0x18, 2), 0);
        w(&mut c, 0x18, 2, 4);
        w(&mut c, 0x1a, 2, 0);
        w(&mut c, 0x1c, 2, 1);
        assert_eq!(r(&c, 0x18, 4), u64::from(NO_VECTOR) << 16);
        let q = c.queue_configs();
        assert_eq!(q.len(), 2);
        assert_eq!(
            q[1],
            QueueConfig {
                size: 32,
                desc_table: GuestAddress(0x1_0000_1000),
                avail_ring: GuestAddress(0x3_0000_2000),
                used_ring: GuestAddress(0x4000),
                ready: true
            }
        );
        assert!(!q[0].ready);
    }

    #[test]
    fn status_transitions_and_reset() {
        let mut c = common();
        // DRIVER_OK without FEATURES_OK is refused.
        assert_eq!(w(&mut c, 0x14, 1, 7), CommonAction::None);
        assert_eq!(r(&c, 0x14, 1), 3);
        negotiate(&mut c, 0, 3);
        w(&mut c, 0x1a, 2, 1);
        assert_eq!(w(&mut c, 0x14, 1, 0xf), CommonAction::Activate);
        assert_eq!(c.status(), 0xf);
        // Setting DRIVER_OK again does not re-activate; clearing bits is refused.
        assert_eq!(w(&mut c, 0x14, 1, 0xf), CommonAction::None);
        assert_eq!(w(&mut c, 0x14, 1, 0x3), CommonAction::None);
        assert_eq!(c.status(), 0xf);
        // Queue writes after DRIVER_OK are ignored.
        w(&mut c, 0x18, 2, 16);
        assert_eq!(r(&c, 0x18, 2), 256);
        c.set_needs_reset();
        assert_eq!(w(&mut c, 0x14, 1, 0x8f), CommonAction::None);
        assert_eq!(c.status(), 0xcf);
        assert_eq!(w(&mut c, 0x14, 1, 0), CommonAction::Reset);
        c.reset();
        assert_eq!(c.status(), 0);
        assert_eq!(c.acked_features(), 0);
        assert_eq!(r(&c, 0x1a, 2), u64::from(NO_VECTOR));
        assert_eq!(r(&c, 0x18, 2), 256);
    }

    /// All-ones writes of every size at every offset: only whole fields take effect, as the
    /// rules say (unoffered features, invalid vectors, an absent queue, DRIVER_OK without
    /// FEATURES_OK all refused); the registers end in exactly that state, and a reset brings
    /// the device back to a working negotiation.
    #[test]
    fn hostile_writes_leave_only_valid_state() {
        let mut c = common();
        let initial = c.queue_configs();
        for off in 0..0x48u64 {
            for len in [0usize, 1, 2, 3, 4, 5, 8, 9] {
                let data = vec![0xffu8; len];
                assert_eq!(c.write(off, &data), CommonAction::None, "{off:#x}+{len}");
                let mut d = vec![0u8; len];
                c.read(off, &mut d);
            }
        }
        // Feature selects took the all-ones words; nothing was acked (select 0xffffffff
        // names no feature word).
        assert_eq!(r(&c, 0x00, 4), 0xffff_ffff);
        assert_eq!(r(&c, 0x04, 4), 0, "no device feature word 0xffffffff");
        assert_eq!(r(&c, 0x08, 4), 0xffff_ffff);
        assert_eq!(c.acked_features(), 0);
        // Vector 0xffff is NO_VECTOR; num_queues is read-only.
        assert_eq!(r(&c, 0x10, 2), u64::from(NO_VECTOR));
        assert_eq!(r(&c, 0x12, 2), 2);
        // Status 0xff: DEVICE_NEEDS_RESET is the device's, FEATURES_OK is refused (VERSION_1
        // not acked), and with it DRIVER_OK; the rest is stored. No activation.
        let refused = status::DEVICE_NEEDS_RESET | status::FEATURES_OK | status::DRIVER_OK;
        assert_eq!(c.status(), !refused, "0xff without the refused bits");
        // Queue select 0xffff is an absent queue: it reads as size 0, NO_VECTOR; the
        // queue writes that followed changed no queue.
        assert_eq!(r(&c, 0x16, 2), 0xffff);
        assert_eq!(r(&c, 0x18, 2), 0);
        assert_eq!(r(&c, 0x1a, 2), u64::from(NO_VECTOR));
        assert_eq!(r(&c, 0x1c, 2), 0);
        assert_eq!(c.queue_configs(), initial);
        // Past the structure and at the end of the address space: nothing, reads zero.
        c.write(u64::MAX, &[1, 2, 3, 4]);
        let mut d = [0u8; 8];
        c.read(u64::MAX - 3, &mut d);
        assert_eq!(d, [0; 8]);
        c.read(COMMON_CFG_LEN, &mut d);
        assert_eq!(d, [0; 8]);
        // The driver resets and the device negotiates normally again.
        assert_eq!(w(&mut c, 0x14, 1, 0), CommonAction::Reset);
        c.reset();
        assert_eq!((c.status(), c.acked_features()), (0, 0));
        w(&mut c, 0x16, 2, 1);
        assert_eq!(r(&c, 0x18, 2), 64, "reset restores queue 1's size");
        assert_eq!(r(&c, 0x1c, 2), 0, "and disables it");
        negotiate(&mut c, 0b10, 3);
        assert_eq!(c.status(), 0xb);
        assert_eq!(c.acked_features(), FEATURES & !0b1000);
        w(&mut c, 0x16, 2, 0);
        w(&mut c, 0x1c, 2, 1);
        assert_eq!(w(&mut c, 0x14, 1, 0xf), CommonAction::Activate);
        assert!(c.queue_configs()[0].ready);
    }
}
