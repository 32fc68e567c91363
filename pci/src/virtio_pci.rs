//! The virtio 1.x modern PCI transport: config space identity and vendor capabilities, one
//! 64-bit memory BAR holding every structure, queue notification, and device activation.
//!
//! BAR 0 layout (64 KiB):
//! ```text
//! 0x0000 common config    0x1000 ISR    0x2000 device config    0x3000 notify (4 bytes/queue)
//! 0x8000 MSI-X table      0xc000 MSI-X PBA
//! ```

use crate::config::{overlaps, PciConfigSpace, PciHeader, BAR0, BAR_END, COMMAND};
use crate::device::{BarKind, BarRegion, PciDevice};
use crate::irq::{IoEventManager, MsiIrqManager};
use crate::msix::{MsixConfig, MSIX_CAP_CONTROL};
use crate::virtio_common::{CommonAction, CommonConfig, VirtioInterruptState};
use crate::PciError;
use log::debug;
use std::sync::{Arc, Mutex};
use virtio_dev::{ActivateError, VirtioDevice, VirtioInterrupt};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem ID given to every device.
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
/// The BAR holding all virtio structures.
pub const VIRTIO_BAR: u8 = 0;
/// Size of [`VIRTIO_BAR`].
pub const VIRTIO_BAR_SIZE: u64 = 0x1_0000;
/// Common configuration offset in the BAR.
pub const COMMON_OFFSET: u64 = 0x0;
/// ISR status offset in the BAR.
pub const ISR_OFFSET: u64 = 0x1000;
/// Device-specific configuration offset in the BAR.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Notification area offset in the BAR; queue `q` is notified at `+ q * NOTIFY_OFF_MULTIPLIER`.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between the notify addresses of consecutive queues.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// MSI-X table offset in the BAR.
pub const MSIX_TABLE_OFFSET: u64 = 0x8000;
/// MSI-X pending bit array offset in the BAR.
pub const MSIX_PBA_OFFSET: u64 = 0xc000;
/// Most queues a device may have (one MSI-X vector each plus one for config changes).
pub const MAX_QUEUES: usize = 256;
const REGION_SIZE: u64 = 0x1000;
const MSIX_TABLE_REGION: u64 = MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET;

const CAP_VENDOR: u8 = 0x09;
const CFG_TYPE_COMMON: u8 = 1;
const CFG_TYPE_NOTIFY: u8 = 2;
const CFG_TYPE_ISR: u8 = 3;
const CFG_TYPE_DEVICE: u8 = 4;
const CFG_TYPE_PCI: u8 = 5;
/// Offset of pci_cfg_data inside the PCI configuration access capability.
const PCI_CFG_DATA: u16 = 16;

/// The part of the BAR an access falls in, with the offset inside that part.
enum Region {
    Common(u64),
    Isr(u64),
    DeviceCfg(u64),
    Notify(u64),
    MsixTable(u64),
    MsixPba(u64),
}

fn region(offset: u64, len: usize) -> Option<Region> {
    type Make = fn(u64) -> Region;
    let regions: [(u64, u64, Make); 6] = [
        (COMMON_OFFSET, REGION_SIZE, Region::Common),
        (ISR_OFFSET, REGION_SIZE, Region::Isr),
        (DEVICE_CFG_OFFSET, REGION_SIZE, Region::DeviceCfg),
        (NOTIFY_OFFSET, REGION_SIZE, Region::Notify),
        (MSIX_TABLE_OFFSET, MSIX_TABLE_REGION, Region::MsixTable),
        (MSIX_PBA_OFFSET, REGION_SIZE, Region::MsixPba),
    ];
    let end = offset.checked_add(len as u64)?;
    regions
        .iter()
        .find(|(start, size, _)| offset >= *start && end <= start + size)
        .map(|(start, _, make)| make(offset - start))
}

/// PCI class, subclass for a virtio device type.
fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        1 => (0x02, 0x00),  // network controller
        2 => (0x01, 0x00),  // mass storage (as QEMU does for virtio-blk)
        3 => (0x07, 0x80),  // communication controller
        23 => (0x08, 0x80), // system peripheral (virtio-iommu)
        _ => (0xff, 0x00),
    }
}

/// One virtio device exposed on the PCI bus through the modern transport.
pub struct VirtioPciDevice {
    config: PciConfigSpace,
    msix_cap: u16,
    pci_cfg_cap: u16,
    device: Box<dyn VirtioDevice>,
    inline_notify: bool,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    common: CommonConfig,
    interrupt: Arc<VirtioInterruptState>,
    ioevents: Arc<dyn IoEventManager>,
    kicks: Vec<EventFd>,
    notify_registered: Option<u64>,
    activated: bool,
}

impl VirtioPciDevice {
    /// Wrap `device`; MSI-X vectors come from `msi`, queue notifications are registered with
    /// `ioevents` once the BAR decodes (unless the device wants inline notification).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        msi: Arc<dyn MsiIrqManager>,
        ioevents: Arc<dyn IoEventManager>,
    ) -> Result<Self, PciError> {
        let device_type = device.device_type();
        let device_id = u16::try_from(device_type)
            .ok()
            .and_then(|t| VIRTIO_PCI_DEVICE_ID_BASE.checked_add(t))
            .ok_or(PciError::InvalidDeviceType(device_type))?;
        let num_queues = device.queue_max_sizes().len();
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(PciError::InvalidQueueCount(num_queues));
        }
        let (class, subclass) = class_of(device_type);
        let mut config = PciConfigSpace::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id,
            revision_id: 1,
            class,
            subclass,
            prog_if: 0,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
            interrupt_pin: 0,
        });
        // Not prefetchable: reading the ISR has a side effect.
        config.add_bar(&BarRegion {
            index: VIRTIO_BAR,
            size: VIRTIO_BAR_SIZE,
            kind: BarKind::Mem64,
            prefetchable: false,
        })?;
        let notify_len = num_queues as u32 * NOTIFY_OFF_MULTIPLIER;
        let caps: [(u8, u64, u32); 4] = [
            (
                CFG_TYPE_COMMON,
                COMMON_OFFSET,
                crate::virtio_common::COMMON_CFG_LEN as u32,
            ),
            (CFG_TYPE_NOTIFY, NOTIFY_OFFSET, notify_len),
            (CFG_TYPE_ISR, ISR_OFFSET, 1),
            (CFG_TYPE_DEVICE, DEVICE_CFG_OFFSET, REGION_SIZE as u32),
        ];
        for (cfg_type, offset, length) in caps {
            let mut cap = vec![CAP_VENDOR, 0, 16, cfg_type, VIRTIO_BAR, 0, 0, 0];
            cap.extend_from_slice(&(offset as u32).to_le_bytes());
            cap.extend_from_slice(&length.to_le_bytes());
            if cfg_type == CFG_TYPE_NOTIFY {
                cap[2] = 20;
                cap.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
            }
            config.add_capability(&cap, &vec![0; cap.len()])?;
        }
        // VIRTIO_PCI_CAP_PCI_CFG: a window into the BAR through config space (bar, offset,
        // length and the 4 data bytes are writable).
        let mut cap = vec![0u8; 20];
        cap[..4].copy_from_slice(&[CAP_VENDOR, 0, 20, CFG_TYPE_PCI]);
        let mut wmask = vec![0u8; 20];
        wmask[4] = 0xff;
        wmask[8..20].fill(0xff);
        let pci_cfg_cap = u16::from(config.add_capability(&cap, &wmask)?);
        let msix = MsixConfig::new(num_queues + 1, msi)?;
        let (cap, wmask) =
            msix.capability(VIRTIO_BAR, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_cap = u16::from(config.add_capability(&cap, &wmask)?);
        let num_vectors = msix.num_vectors();
        let msix = Arc::new(Mutex::new(msix));
        lockwatch::name(&msix, format!("MSI-X of virtio device type {device_type}"));
        let interrupt = Arc::new(VirtioInterruptState::new(num_queues, msix));
        let common = CommonConfig::new(
            device.device_features(),
            device.queue_max_sizes(),
            num_vectors,
            interrupt.clone(),
        );
        let kicks = (0..num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(PciError::EventFd)?;
        Ok(VirtioPciDevice {
            config,
            msix_cap,
            pci_cfg_cap,
            inline_notify: device.inline_notify(),
            device,
            mem,
            common,
            interrupt,
            ioevents,
            kicks,
            notify_registered: None,
            activated: false,
        })
    }

    /// The driver set DRIVER_OK and the device accepted the configuration.
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// The wrapped device model.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The wrapped device model, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The interrupt handle given to the device on activation (also usable to signal a
    /// configuration change from outside).
    pub fn interrupt(&self) -> Arc<dyn VirtioInterrupt> {
        self.interrupt.clone()
    }

    fn msix(&self) -> lockwatch::Guard<'_, MsixConfig> {
        lockwatch::lock(self.interrupt.msix())
    }

    /// Make the ioeventfd registrations match where the notify area currently decodes.
    fn sync_notify(&mut self) {
        let want = if self.inline_notify {
            None
        } else {
            self.config
                .bar_address(VIRTIO_BAR)
                .and_then(|a| a.checked_add(NOTIFY_OFFSET))
        };
        if want == self.notify_registered {
            return;
        }
        if let Some(old) = self.notify_registered.take() {
            self.unregister_kicks(old, self.kicks.len());
        }
        let Some(base) = want else {
            return;
        };
        for (q, fd) in self.kicks.iter().enumerate() {
            let addr = base + q as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
            if let Err(e) = self.ioevents.register(fd, addr) {
                virtio_dev::guest_warn!("virtio-pci: ioeventfd for queue {q} at {addr:#x} failed: {e}; notifying through MMIO exits");
                self.unregister_kicks(base, q);
                return;
            }
        }
        debug!("virtio-pci: notify ioeventfds registered at {base:#x}");
        self.notify_registered = Some(base);
    }

    fn unregister_kicks(&self, base: u64, count: usize) {
        for (q, fd) in self.kicks.iter().enumerate().take(count) {
            let addr = base + q as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
            if let Err(e) = self.ioevents.unregister(fd, addr) {
                virtio_dev::guest_warn!(
                    "virtio-pci: removing ioeventfd for queue {q} at {addr:#x} failed: {e}"
                );
            }
        }
    }

    fn notify(&mut self, offset: u64) {
        let q = offset / u64::from(NOTIFY_OFF_MULTIPLIER);
        let Some(kick) = self.kicks.get(q as usize) else {
            virtio_dev::guest_warn!("virtio-pci: notify for absent queue {q}");
            return;
        };
        if !self.activated {
            debug!("virtio-pci: notify for queue {q} before activation ignored");
            return;
        }
        if self.inline_notify {
            self.device.queue_notify(q as u16);
        } else if let Err(e) = kick.write(1) {
            virtio_dev::guest_warn!("virtio-pci: kick for queue {q} failed: {e}");
        }
    }

    /// Carry out a BAR access through the PCI configuration access capability.
    fn pci_cfg_access(&mut self, write: bool) {
        let c = self.pci_cfg_cap;
        let mut b = [0u8; 20];
        for (i, chunk) in b.chunks_exact_mut(4).enumerate() {
            self.config.read(c + 4 * i as u16, chunk);
        }
        let bar = b[4];
        let offset = u64::from(u32::from_le_bytes([b[8], b[9], b[10], b[11]]));
        let length = u32::from_le_bytes([b[12], b[13], b[14], b[15]]) as usize;
        if bar != VIRTIO_BAR || !matches!(length, 1 | 2 | 4) || offset % length as u64 != 0 {
            debug!("virtio-pci: pci_cfg access to BAR {bar} at {offset:#x} size {length} ignored");
            return;
        }
        let data = &mut b[16..16 + length];
        if write {
            self.bar_write(bar, offset, data);
        } else {
            self.bar_read(bar, offset, data);
            let data = b[16..20].to_vec();
            self.config.set_bytes(c + PCI_CFG_DATA, &data);
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        match self.common.write(offset, data) {
            CommonAction::None => {}
            CommonAction::Reset => self.reset(),
            CommonAction::Activate => self.activate(),
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.activated = false;
        self.common.reset();
        for kick in &self.kicks {
            // Drop kicks left over from before the reset (EAGAIN when there are none).
            let _ = kick.read();
        }
    }

    fn activate(&mut self) {
        let result = self
            .kicks
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ActivateError::Backend)
            .and_then(|kicks| {
                self.device.activate(
                    self.mem.clone(),
                    self.common.acked_features(),
                    self.common.queue_configs(),
                    kicks,
                    self.interrupt.clone(),
                )
            });
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                virtio_dev::guest_warn!(
                    "virtio-pci: device type {} failed to activate: {e}",
                    self.device.device_type()
                );
                self.common.set_needs_reset();
                self.interrupt.signal_config();
            }
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        let window = self.pci_cfg_cap + PCI_CFG_DATA;
        if overlaps(offset, data.len(), window, window + 4) {
            self.pci_cfg_access(false);
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        let window = self.pci_cfg_cap + PCI_CFG_DATA;
        if overlaps(offset, data.len(), window, window + 4) {
            self.pci_cfg_access(true);
        }
        let control = self.msix_cap + MSIX_CAP_CONTROL;
        if overlaps(offset, data.len(), control, control + 2) {
            let value = self.config.read_u16(control);
            self.msix().set_control(value);
        }
        if overlaps(offset, data.len(), COMMAND, COMMAND + 2)
            || overlaps(offset, data.len(), BAR0, BAR_END)
        {
            self.sync_notify();
        }
    }

    fn bar_regions(&self) -> Vec<BarRegion> {
        self.config.bar(VIRTIO_BAR).into_iter().collect()
    }

    fn bar_assigned(&mut self, index: u8, address: u64) {
        if index != VIRTIO_BAR {
            virtio_dev::guest_warn!("virtio-pci: address assigned to absent BAR {index}");
            return;
        }
        self.config.set_bar_address(index, address);
        self.sync_notify();
    }

    fn bar_address(&self, index: u8) -> Option<u64> {
        self.config.bar_address(index)
    }

    fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let region = region(offset, data.len());
        if index != VIRTIO_BAR || data.is_empty() || data.len() > 8 || region.is_none() {
            virtio_dev::guest_warn!(
                "virtio-pci: bad read of BAR {index} at {offset:#x} size {}",
                data.len()
            );
            return;
        }
        match region {
            Some(Region::Common(o)) => self.common.read(o, data),
            Some(Region::Isr(0)) => data[0] = self.interrupt.take_isr(),
            Some(Region::Isr(_)) | Some(Region::Notify(_)) | None => {}
            Some(Region::DeviceCfg(o)) => self.device.read_config(o, data),
            Some(Region::MsixTable(o)) => self.msix().table_read(o, data),
            Some(Region::MsixPba(o)) => self.msix().pba_read(o, data),
        }
    }

    fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]) {
        let region = region(offset, data.len());
        if index != VIRTIO_BAR || data.is_empty() || data.len() > 8 || region.is_none() {
            virtio_dev::guest_warn!(
                "virtio-pci: bad write of BAR {index} at {offset:#x} size {}",
                data.len()
            );
            return;
        }
        match region {
            Some(Region::Common(o)) => self.write_common(o, data),
            Some(Region::DeviceCfg(o)) => self.device.write_config(o, data),
            Some(Region::Notify(o)) => self.notify(o),
            Some(Region::MsixTable(o)) => self.msix().table_write(o, data),
            Some(Region::MsixPba(_)) | Some(Region::Isr(_)) | None => {
                debug!("virtio-pci: write to read-only area at {offset:#x} ignored")
            }
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        if let Some(base) = self.notify_registered.take() {
            self.unregister_kicks(base, self.kicks.len());
        }
    }
}

#[path = "virtio_pci_state.rs"]
mod state;

#[cfg(test)]
#[path = "virtio_pci_tests.rs"]
mod tests;
