//! A host PCI function passed through to the guest with VFIO.
//!
//! - Config space: see [`crate::vfio_config`] for what is passed through and what is emulated
//!   (BARs, decode bits, MSI, MSI-X, the capability chain, no ROM, no INTx).
//! - BARs: sizes come from the VFIO region info, addresses from our bus. The mmappable part of
//!   each memory BAR is mmapped once and mapped into the guest with a [`MemorySlotManager`]
//!   while the guest enables memory decoding, at the BAR's current address (moved BARs are
//!   remapped). The pages holding the MSI-X table and PBA are never mapped: accesses there
//!   exit and go to [`MsixConfig`]; any other exit is forwarded to the VFIO region.
//! - Interrupts: MSI and MSI-X vectors signal the KVM irqfds of [`MsiIrqManager`] GSIs directly
//!   (VFIO_DEVICE_SET_IRQS), see [`crate::vfio_irq`]. INTx is not offered.
//! - Reset: a PCI Express FLR by the guest, or [`VfioPciDevice::reset`] (VMM reset), disables the
//!   interrupts, resets the emulated state and issues VFIO_DEVICE_RESET.
//! - Peer-to-peer: [`VfioBarMaps`] publishes where BAR memory is mapped (guest-physical and
//!   host-virtual), so the DMA shadow engine can map a guest IOVA that targets a BAR, and tells
//!   its [`BarObserver`] when parts appear or disappear (memory decode on/off, a BAR moved, a
//!   reset, the device dropped) so that engine can revoke or re-point those DMA mappings.
//!   Parts disappear before the device stops decoding or is reset.

use crate::config::{PciConfigSpace, PciHeader, BAR0, BAR_END, COMMAND, NUM_BARS};
use crate::config::{COMMAND_IO, COMMAND_MEMORY};
use crate::device::{BarKind, BarRegion, PciDevice};
use crate::irq::MsiIrqManager;
use crate::memory_slot::MemorySlotManager;
use crate::msi::MsiConfig;
use crate::msix::{MsixConfig, MSIX_CAP_LEN, MSIX_ENTRY_SIZE};
use crate::vfio_backend::{
    RegionInfo, VfioBackend, VfioDeviceBackend, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
};
use crate::vfio_config::{ByteSource, CapKind, CapLayout, KeptCap, PCIE_DEVCTL_FLR};
use crate::vfio_irq::{VfioIrqSync, Want};
use crate::PciError;
use log::{debug, info, warn};
use std::io;
use std::sync::{Arc, RwLock};
use vfio_ioctls::VfioDevice;

/// Granularity of BAR mmaps and memory slots.
pub const PAGE_SIZE: u64 = 4096;
const STATUS_CAPABILITIES: u8 = 1 << 4;
const DECODE_BITS: u8 = (COMMAND_MEMORY | COMMAND_IO) as u8;

/// Errors creating a passthrough device (never caused by the guest).
#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    /// VFIO reported no readable config space region.
    #[error("the VFIO device has no readable PCI config space region")]
    NoConfigRegion,
    /// Reading the device's config space failed.
    #[error("reading the device's config space: {0}")]
    ConfigRead(#[source] io::Error),
    /// The emulated config space rejected something.
    #[error(transparent)]
    Pci(#[from] PciError),
}

/// One part of a BAR currently mapped into the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMapping {
    /// BAR index.
    pub bar: u8,
    /// Guest-physical address of the part.
    pub gpa: u64,
    /// Size in bytes (page multiple).
    pub size: u64,
    /// Host-virtual address of the VFIO mmap backing it.
    pub host_addr: u64,
}

/// Told when BAR parts of a passthrough device stop or start being mapped into the guest
/// (the VMM forwards it to the vIOMMU's shadows, which mirror DMA into BARs). Called on the
/// thread that changed the device, with none of [`VfioBarMaps`]' locks held; `removed` parts
/// are still decoded by the device during the call.
pub trait BarObserver: Send + Sync {
    /// `removed` parts are no longer mapped, `added` ones are now (guest-physical).
    fn bars_changed(&self, removed: &[BarMapping], added: &[BarMapping]);
}

/// The BAR mappings of one passthrough device, shared with whoever resolves DMA targets.
#[derive(Default)]
pub struct VfioBarMaps {
    maps: RwLock<Vec<BarMapping>>,
    observer: RwLock<Option<Arc<dyn BarObserver>>>,
}

impl std::fmt::Debug for VfioBarMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioBarMaps")
            .field("maps", &self.mappings())
            .finish_non_exhaustive()
    }
}

impl VfioBarMaps {
    /// Tell `observer` about every later change (replaces an earlier observer).
    pub fn set_observer(&self, observer: Arc<dyn BarObserver>) {
        *self.observer.write().unwrap_or_else(|e| e.into_inner()) = Some(observer);
    }

    /// Every BAR part mapped into the guest right now.
    pub fn mappings(&self) -> Vec<BarMapping> {
        self.maps.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The host address backing guest-physical `[gpa, gpa + len)` if one mapped BAR part
    /// holds all of it (peer-to-peer DMA into this device's memory).
    pub fn resolve(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.checked_add(len)?;
        self.maps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|m| gpa >= m.gpa && u128::from(end) <= u128::from(m.gpa) + u128::from(m.size))
            .map(|m| m.host_addr + (gpa - m.gpa))
    }

    fn set(&self, maps: Vec<BarMapping>) {
        let old = std::mem::replace(
            &mut *self.maps.write().unwrap_or_else(|e| e.into_inner()),
            maps.clone(),
        );
        let removed: Vec<BarMapping> = old.iter().filter(|m| !maps.contains(m)).copied().collect();
        let added: Vec<BarMapping> = maps.iter().filter(|m| !old.contains(m)).copied().collect();
        if removed.is_empty() && added.is_empty() {
            return;
        }
        let observer = self
            .observer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(o) = observer {
            o.bars_changed(&removed, &added);
        }
    }
}

/// A host mmap of part of a BAR region.
#[derive(Clone, Copy, Debug)]
struct Mmap {
    offset: u64,
    size: u64,
    host_addr: u64,
}

/// A memory slot currently mapping one [`Mmap`].
#[derive(Clone, Copy, Debug)]
struct Slot {
    id: u32,
    mapping: BarMapping,
}

struct VfioBar {
    region: BarRegion,
    writable: bool,
    mmaps: Vec<Mmap>,
    slots: Vec<Slot>,
    /// The guest address the mmaps are mapped at (None: not mapped).
    mapped_at: Option<u64>,
}

/// An area of a BAR given as (bar, offset, size).
type BarArea = (u8, u64, u64);

struct MsixState {
    config: MsixConfig,
    /// The device's capability bytes (table size, table and PBA locations).
    cap_bytes: [u8; MSIX_CAP_LEN],
    table: BarArea,
    pba: BarArea,
    /// Vectors VFIO can enable (the table size, unless VFIO offers fewer).
    vfio_vectors: usize,
    sync: VfioIrqSync,
}

struct MsiState {
    config: MsiConfig,
    vfio_vectors: usize,
    sync: VfioIrqSync,
}

/// Where a BAR access lands relative to the emulated MSI-X structures.
enum MsixHit {
    Table(u64),
    Pba(u64),
    Straddle,
}

/// A VFIO PCI function on our bus.
pub struct VfioPciDevice {
    backend: Arc<dyn VfioBackend>,
    slots: Arc<dyn MemorySlotManager>,
    /// Emulated registers: BARs (with sizing), the command register, the interrupt line.
    shadow: PciConfigSpace,
    layout: CapLayout,
    bars: Vec<VfioBar>,
    msix: Option<MsixState>,
    msi: Option<MsiState>,
    bar_maps: Arc<VfioBarMaps>,
}

impl VfioPciDevice {
    /// Pass through the function behind `backend`. MSI/MSI-X vectors come from `msi`; BAR
    /// memory is mapped into the guest with `slots`.
    pub fn new(
        backend: Arc<dyn VfioBackend>,
        msi: Arc<dyn MsiIrqManager>,
        slots: Arc<dyn MemorySlotManager>,
    ) -> Result<Self, VfioPciError> {
        backend
            .region_info(VFIO_PCI_CONFIG_REGION_INDEX)
            .filter(|i| i.readable && i.size >= 256)
            .ok_or(VfioPciError::NoConfigRegion)?;
        let mut cfg = [0u8; 256];
        for (i, dword) in cfg.chunks_exact_mut(4).enumerate() {
            backend
                .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 4 * i as u64, dword)
                .map_err(VfioPciError::ConfigRead)?;
        }
        let mut shadow = PciConfigSpace::new(&PciHeader::default());
        let mut bars = Vec::new();
        let mut i = 0;
        while i < NUM_BARS {
            let reg = usize::from(BAR0) + 4 * i;
            let raw = u32::from_le_bytes([cfg[reg], cfg[reg + 1], cfg[reg + 2], cfg[reg + 3]]);
            let kind = if raw & 1 != 0 {
                BarKind::Io
            } else if raw & 0x6 == 0x4 {
                BarKind::Mem64
            } else {
                BarKind::Mem32
            };
            let info = backend
                .region_info(VFIO_PCI_BAR0_REGION_INDEX + i as u32)
                .filter(|r| r.size > 0);
            if let Some(info) = info {
                let region = BarRegion {
                    index: i as u8,
                    size: info.size,
                    kind,
                    prefetchable: kind != BarKind::Io && raw & 0x8 != 0,
                };
                match shadow.add_bar(&region) {
                    Ok(()) => bars.push(VfioBar {
                        region,
                        writable: info.writable,
                        mmaps: Vec::new(),
                        slots: Vec::new(),
                        mapped_at: None,
                    }),
                    Err(e) => warn!("vfio: BAR {i} ({:#x} bytes) not exposed: {e}", info.size),
                }
            }
            i += if kind == BarKind::Mem64 { 2 } else { 1 };
        }
        let mut layout = CapLayout::scan(&cfg);
        let msix = setup_msix(backend.as_ref(), &cfg, &mut layout, &bars, msi.clone());
        let msi = setup_msi(backend.as_ref(), &cfg, &mut layout, msi);
        for bar in &mut bars {
            let info = backend
                .region_info(VFIO_PCI_BAR0_REGION_INDEX + u32::from(bar.region.index))
                .unwrap_or_default();
            bar.mmaps = mmap_bar(backend.as_ref(), &bar.region, &info, msix.as_ref());
        }
        info!(
            "vfio: {:04x}:{:04x} with {} BARs, capabilities {:?}",
            u16::from_le_bytes([cfg[0], cfg[1]]),
            u16::from_le_bytes([cfg[2], cfg[3]]),
            bars.len(),
            layout
                .kept()
                .iter()
                .map(|c| (c.id, c.offset))
                .collect::<Vec<_>>()
        );
        Ok(VfioPciDevice {
            backend,
            slots,
            shadow,
            layout,
            bars,
            msix,
            msi,
            bar_maps: Arc::new(VfioBarMaps::default()),
        })
    }

    /// Pass through an opened `vfio_ioctls::VfioDevice` (its group attached to a container).
    pub fn from_vfio_device(
        device: Arc<VfioDevice>,
        msi: Arc<dyn MsiIrqManager>,
        slots: Arc<dyn MemorySlotManager>,
    ) -> Result<Self, VfioPciError> {
        Self::new(Arc::new(VfioDeviceBackend::new(device)), msi, slots)
    }

    /// The live BAR mappings, shared (for resolving peer-to-peer DMA targets).
    pub fn bar_maps(&self) -> Arc<VfioBarMaps> {
        self.bar_maps.clone()
    }

    /// The capabilities the guest sees, in chain order.
    pub fn capabilities(&self) -> &[KeptCap] {
        self.layout.kept()
    }

    /// Function reset (VMM reset, or the guest's FLR): interrupts disabled, MSI/MSI-X state
    /// and the command register cleared (BARs unmapped, their addresses kept), then
    /// VFIO_DEVICE_RESET.
    pub fn reset(&mut self) {
        if let Some(m) = &mut self.msix {
            m.sync.disable(self.backend.as_ref());
            m.config.reset();
        }
        if let Some(m) = &mut self.msi {
            m.sync.disable(self.backend.as_ref());
            m.config.reset();
        }
        self.shadow.write(COMMAND, &[0, 0]);
        self.sync_bars();
        match self.backend.reset() {
            Ok(()) => debug!("vfio: device reset"),
            Err(e) => virtio_dev::guest_warn!("vfio: device reset failed: {e}"),
        }
    }

    /// Map every memory BAR that decodes at its current address; unmap the others.
    fn sync_bars(&mut self) {
        let mut changed = false;
        for bar in &mut self.bars {
            let want = self.shadow.bar_address(bar.region.index);
            if bar.mmaps.is_empty() || want == bar.mapped_at {
                continue;
            }
            changed = true;
            for slot in bar.slots.drain(..) {
                if let Err(e) = self.slots.unmap(slot.id) {
                    virtio_dev::guest_warn!(
                        "vfio: unmapping slot {} of BAR {}: {e}",
                        slot.id,
                        slot.mapping.bar
                    );
                }
            }
            bar.mapped_at = want;
            let Some(base) = want else {
                continue;
            };
            for m in &bar.mmaps {
                let Some(gpa) = base
                    .checked_add(m.offset)
                    .filter(|g| g.checked_add(m.size).is_some())
                else {
                    continue;
                };
                let mapping = BarMapping {
                    bar: bar.region.index,
                    gpa,
                    size: m.size,
                    host_addr: m.host_addr,
                };
                match self.slots.map(gpa, m.size, m.host_addr, !bar.writable) {
                    Ok(id) => bar.slots.push(Slot { id, mapping }),
                    Err(e) => virtio_dev::guest_warn!(
                        "vfio: mapping BAR {} at {gpa:#x} size {:#x} failed ({e}); accesses will exit",
                        bar.region.index, m.size
                    ),
                }
            }
        }
        if changed {
            let maps = self
                .bars
                .iter()
                .flat_map(|b| b.slots.iter().map(|s| s.mapping))
                .collect();
            self.bar_maps.set(maps);
        }
    }

    /// Record interrupts that arrived on masked vectors as pending.
    fn harvest(&mut self) {
        if let Some(m) = &mut self.msix {
            for v in m.sync.harvest() {
                m.config.trigger(v as u16);
            }
        }
        if let Some(m) = &mut self.msi {
            for v in m.sync.harvest() {
                m.config.trigger(v);
            }
        }
    }

    /// Point VFIO's MSI-X and MSI vectors at the eventfds the emulated state asks for.
    fn sync_irqs(&mut self) {
        self.harvest();
        let backend = self.backend.as_ref();
        if let Some(m) = &mut self.msix {
            let want: Vec<Want> = if m.config.enabled() {
                (0..m.vfio_vectors)
                    .map(|v| {
                        m.config
                            .deliverable_irqfd(v as u16)
                            .map_or(Want::Masked, Want::Deliver)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            m.sync.sync(backend, &want);
        }
        if let Some(m) = &mut self.msi {
            let want: Vec<Want> = if m.config.enabled() {
                (0..m.config.num_vectors().min(m.vfio_vectors))
                    .map(|v| {
                        m.config
                            .deliverable_irqfd(v)
                            .map_or(Want::Masked, Want::Deliver)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            m.sync.sync(backend, &want);
        }
        // Interrupts that hit a pending eventfd while VFIO was being reprogrammed.
        self.harvest();
    }

    fn msix_cap_byte(&self, rel: usize) -> u8 {
        let Some(m) = &self.msix else {
            return 0;
        };
        match rel {
            3 => {
                let mut b = m.cap_bytes[3] & 0x07;
                if m.config.enabled() {
                    b |= 0x80;
                }
                if m.config.function_masked() {
                    b |= 0x40;
                }
                b
            }
            r => m.cap_bytes.get(r).copied().unwrap_or(0),
        }
    }

    fn msix_hit(&self, index: u8, offset: u64, len: u64) -> Option<MsixHit> {
        let m = self.msix.as_ref()?;
        let end = offset + len;
        for ((bar, start, size), table) in [(m.table, true), (m.pba, false)] {
            if bar != index || end <= start || offset >= start + size {
                continue;
            }
            if offset < start || end > start + size {
                return Some(MsixHit::Straddle);
            }
            let o = offset - start;
            return Some(if table {
                MsixHit::Table(o)
            } else {
                MsixHit::Pba(o)
            });
        }
        None
    }

    fn bar(&self, index: u8) -> Option<&VfioBar> {
        self.bars.iter().find(|b| b.region.index == index)
    }

    /// The BAR access `[offset, offset + len)` if it is valid for BAR `index`.
    fn check_bar_access(&self, index: u8, offset: u64, len: usize) -> bool {
        let Some(bar) = self.bar(index) else {
            return false;
        };
        (1..=8).contains(&len)
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= bar.region.size)
    }

    /// Write the device-owned bytes of a config write, in naturally aligned pieces.
    fn forward_config(&self, offset: u16, bytes: &[Option<u8>]) {
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i].is_none() {
                i += 1;
                continue;
            }
            let o = usize::from(offset) + i;
            let run = bytes[i..].iter().take_while(|b| b.is_some()).count();
            let size = [4, 2, 1]
                .into_iter()
                .find(|&s| s <= run && o % s == 0)
                .unwrap_or(1);
            let data: Vec<u8> = bytes[i..i + size].iter().flatten().copied().collect();
            if let Err(e) = self
                .backend
                .region_write(VFIO_PCI_CONFIG_REGION_INDEX, o as u64, &data)
            {
                virtio_dev::guest_warn!("vfio: config write at {o:#x} failed: {e}");
            }
            i += size;
        }
    }
}

fn setup_msix(
    backend: &dyn VfioBackend,
    cfg: &[u8; 256],
    layout: &mut CapLayout,
    bars: &[VfioBar],
    msi: Arc<dyn MsiIrqManager>,
) -> Option<MsixState> {
    let cap = layout.find(CapKind::Msix)?;
    let o = usize::from(cap.offset);
    let mut cap_bytes = [0u8; MSIX_CAP_LEN];
    cap_bytes.copy_from_slice(&cfg[o..o + MSIX_CAP_LEN]);
    let control = u16::from_le_bytes([cap_bytes[2], cap_bytes[3]]);
    let count = usize::from(control & 0x7ff) + 1;
    let reg = |at: usize| {
        u32::from_le_bytes([
            cap_bytes[at],
            cap_bytes[at + 1],
            cap_bytes[at + 2],
            cap_bytes[at + 3],
        ])
    };
    let (table_reg, pba_reg) = (reg(4), reg(8));
    let table = (
        (table_reg & 7) as u8,
        u64::from(table_reg & !7),
        count as u64 * MSIX_ENTRY_SIZE,
    );
    let pba = (
        (pba_reg & 7) as u8,
        u64::from(pba_reg & !7),
        count.div_ceil(64) as u64 * 8,
    );
    let inside = |(bar, offset, size): BarArea| {
        bars.iter().any(|b| {
            b.region.index == bar
                && b.region.kind != BarKind::Io
                && offset.checked_add(size).is_some_and(|e| e <= b.region.size)
        })
    };
    let vfio_vectors = backend
        .irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
        .map_or(0, |i| i.count as usize)
        .min(count);
    if vfio_vectors == 0 || !inside(table) || !inside(pba) {
        warn!("vfio: MSI-X unusable (VFIO vectors {vfio_vectors}, table {table:?}, PBA {pba:?}); hidden");
        layout.hide(cap.offset);
        return None;
    }
    match MsixConfig::new(count, msi) {
        Ok(config) => Some(MsixState {
            config,
            cap_bytes,
            table,
            pba,
            vfio_vectors,
            sync: VfioIrqSync::new(VFIO_PCI_MSIX_IRQ_INDEX),
        }),
        Err(e) => {
            warn!("vfio: MSI-X hidden: {e}");
            layout.hide(cap.offset);
            None
        }
    }
}

fn setup_msi(
    backend: &dyn VfioBackend,
    cfg: &[u8; 256],
    layout: &mut CapLayout,
    msi: Arc<dyn MsiIrqManager>,
) -> Option<MsiState> {
    let cap = layout.find(CapKind::Msi)?;
    let o = usize::from(cap.offset);
    let control = u16::from_le_bytes([cfg[o + 2], cfg[o + 3]]);
    let vfio_vectors = backend
        .irq_info(VFIO_PCI_MSI_IRQ_INDEX)
        .map_or(0, |i| i.count as usize);
    if vfio_vectors == 0 {
        warn!("vfio: VFIO offers no MSI vectors; MSI capability hidden");
        layout.hide(cap.offset);
        return None;
    }
    Some(MsiState {
        config: MsiConfig::new(control, msi),
        vfio_vectors,
        sync: VfioIrqSync::new(VFIO_PCI_MSI_IRQ_INDEX),
    })
}

/// `[start, end)` ranges of `ranges` minus `[hole_start, hole_end)`.
fn subtract(ranges: Vec<(u64, u64)>, (hs, he): (u64, u64)) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for (s, e) in ranges {
        if he <= s || hs >= e {
            out.push((s, e));
            continue;
        }
        if s < hs {
            out.push((s, hs));
        }
        if he < e {
            out.push((he, e));
        }
    }
    out
}

/// The page-aligned parts of a memory BAR that may be mmapped: what VFIO allows, minus the
/// pages of the MSI-X table and PBA.
fn mappable_parts(
    region: &BarRegion,
    info: &RegionInfo,
    msix: Option<&MsixState>,
) -> Vec<(u64, u64)> {
    if region.kind == BarKind::Io || !info.mmap {
        return Vec::new();
    }
    let areas = if info.sparse_areas.is_empty() {
        vec![(0, region.size)]
    } else {
        info.sparse_areas.clone()
    };
    let mut parts: Vec<(u64, u64)> = areas
        .into_iter()
        .filter_map(|(offset, size)| {
            let start = offset.checked_next_multiple_of(PAGE_SIZE)?;
            let end = offset.checked_add(size)?.min(region.size) / PAGE_SIZE * PAGE_SIZE;
            (start < end).then_some((start, end))
        })
        .collect();
    if let Some(m) = msix {
        for (bar, offset, size) in [m.table, m.pba] {
            if bar == region.index {
                let start = offset / PAGE_SIZE * PAGE_SIZE;
                let end = (offset + size)
                    .checked_next_multiple_of(PAGE_SIZE)
                    .unwrap_or(u64::MAX);
                parts = subtract(parts, (start, end));
            }
        }
    }
    parts
}

fn mmap_bar(
    backend: &dyn VfioBackend,
    region: &BarRegion,
    info: &RegionInfo,
    msix: Option<&MsixState>,
) -> Vec<Mmap> {
    let index = VFIO_PCI_BAR0_REGION_INDEX + u32::from(region.index);
    mappable_parts(region, info, msix)
        .into_iter()
        .filter_map(|(start, end)| {
            let size = end - start;
            match backend.mmap(index, start, size, info.writable) {
                Ok(host_addr) => Some(Mmap {
                    offset: start,
                    size,
                    host_addr,
                }),
                Err(e) => {
                    warn!(
                        "vfio: mmap of BAR {} at {start:#x} size {size:#x} failed ({e}); accesses will exit",
                        region.index
                    );
                    None
                }
            }
        })
        .collect()
}

/// 1, 2 or 4 naturally aligned bytes inside the 4 KiB config space.
fn valid_config_access(offset: u16, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && usize::from(offset) % len == 0 && usize::from(offset) + len <= 4096
}

impl PciDevice for VfioPciDevice {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0xff);
        if !valid_config_access(offset, data.len()) {
            virtio_dev::guest_warn!("vfio: bad config read at {offset:#x} size {}", data.len());
            return;
        }
        let sources: Vec<ByteSource> = (0..data.len() as u16)
            .map(|i| self.layout.source(offset + i))
            .collect();
        if sources.iter().any(|s| matches!(s, ByteSource::Msi(_))) {
            // The MSI pending bits must reflect interrupts parked on pending eventfds.
            self.harvest();
        }
        let mut dev = [0xffu8; 4];
        let from_device = sources.iter().any(|s| {
            matches!(
                s,
                ByteSource::Device
                    | ByteSource::CommandLow
                    | ByteSource::StatusLow
                    | ByteSource::PcieDevCtlHigh
            )
        });
        if from_device {
            let dev = &mut dev[..data.len()];
            if let Err(e) =
                self.backend
                    .region_read(VFIO_PCI_CONFIG_REGION_INDEX, u64::from(offset), dev)
            {
                virtio_dev::guest_warn!("vfio: config read at {offset:#x} failed: {e}");
                dev.fill(0xff);
            }
        }
        for (i, (b, src)) in data.iter_mut().zip(sources).enumerate() {
            let o = offset + i as u16;
            *b = match src {
                ByteSource::Device | ByteSource::PcieDevCtlHigh => dev[i],
                ByteSource::CommandLow => {
                    let mut shadow = [0u8];
                    self.shadow.read(o, &mut shadow);
                    (dev[i] & !DECODE_BITS) | (shadow[0] & DECODE_BITS)
                }
                ByteSource::StatusLow => {
                    let caps = if self.layout.kept().is_empty() {
                        0
                    } else {
                        STATUS_CAPABILITIES
                    };
                    (dev[i] & !STATUS_CAPABILITIES) | caps
                }
                ByteSource::Shadow => {
                    let mut shadow = [0u8];
                    self.shadow.read(o, &mut shadow);
                    shadow[0]
                }
                ByteSource::Const(v) => v,
                ByteSource::Msi(rel) => {
                    let mut v = [0u8];
                    if let Some(m) = &self.msi {
                        m.config.read(rel, &mut v);
                    }
                    v[0]
                }
                ByteSource::Msix(rel) => self.msix_cap_byte(rel),
            };
        }
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        if !valid_config_access(offset, data.len()) {
            virtio_dev::guest_warn!("vfio: bad config write at {offset:#x} size {}", data.len());
            return;
        }
        let old_command = self.shadow.command();
        let mut forward: Vec<Option<u8>> = vec![None; data.len()];
        let mut decode_or_bar = false;
        let mut msi_write: Option<(usize, Vec<u8>)> = None;
        let mut msix_control = None;
        let mut flr = false;
        for (i, &v) in data.iter().enumerate() {
            let o = offset + i as u16;
            match self.layout.source(o) {
                ByteSource::Device | ByteSource::StatusLow => forward[i] = Some(v),
                ByteSource::CommandLow => {
                    self.shadow.write(o, &[v]);
                    forward[i] = Some(v);
                    decode_or_bar = true;
                }
                ByteSource::Shadow => {
                    self.shadow.write(o, &[v]);
                    decode_or_bar |= (BAR0..BAR_END).contains(&o);
                }
                ByteSource::Const(_) => {}
                ByteSource::Msi(rel) => msi_write.get_or_insert((rel, Vec::new())).1.push(v),
                ByteSource::Msix(3) => msix_control = Some(v),
                ByteSource::Msix(_) => {}
                ByteSource::PcieDevCtlHigh => {
                    flr |= v & PCIE_DEVCTL_FLR != 0;
                    forward[i] = Some(v & !PCIE_DEVCTL_FLR);
                }
            }
        }
        // Stop the guest's direct access before the device stops decoding; start it after.
        let turned_off = old_command & !self.shadow.command() & (COMMAND_MEMORY | COMMAND_IO);
        if turned_off != 0 {
            self.sync_bars();
        }
        self.forward_config(offset, &forward);
        if decode_or_bar {
            self.sync_bars();
        }
        if msix_control.is_some() || msi_write.is_some() {
            self.harvest();
            if let (Some(b), Some(m)) = (msix_control, &mut self.msix) {
                m.config.set_control(u16::from(b) << 8);
            }
            if let (Some((rel, bytes)), Some(m)) = (msi_write, &mut self.msi) {
                m.config.write(rel, &bytes);
            }
            self.sync_irqs();
        }
        if flr {
            info!("vfio: guest requested a function level reset");
            self.reset();
        }
    }

    fn bar_regions(&self) -> Vec<BarRegion> {
        self.bars.iter().map(|b| b.region).collect()
    }

    fn bar_assigned(&mut self, index: u8, address: u64) {
        if self.bar(index).is_none() {
            virtio_dev::guest_warn!("vfio: address assigned to absent BAR {index}");
            return;
        }
        self.shadow.set_bar_address(index, address);
        self.sync_bars();
    }

    fn bar_address(&self, index: u8) -> Option<u64> {
        self.shadow.bar_address(index)
    }

    fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if !self.check_bar_access(index, offset, data.len()) {
            virtio_dev::guest_warn!(
                "vfio: bad read of BAR {index} at {offset:#x} size {}",
                data.len()
            );
            return;
        }
        match self.msix_hit(index, offset, data.len() as u64) {
            Some(MsixHit::Table(o)) => {
                if let Some(m) = &self.msix {
                    m.config.table_read(o, data);
                }
            }
            Some(MsixHit::Pba(o)) => {
                self.harvest();
                if let Some(m) = &self.msix {
                    m.config.pba_read(o, data);
                }
            }
            Some(MsixHit::Straddle) => {
                virtio_dev::guest_warn!(
                    "vfio: BAR {index} read at {offset:#x} straddles the MSI-X structures"
                )
            }
            None => {
                let region = VFIO_PCI_BAR0_REGION_INDEX + u32::from(index);
                if let Err(e) = self.backend.region_read(region, offset, data) {
                    virtio_dev::guest_warn!("vfio: read of BAR {index} at {offset:#x} failed: {e}");
                    data.fill(0xff);
                }
            }
        }
    }

    fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]) {
        if !self.check_bar_access(index, offset, data.len()) {
            virtio_dev::guest_warn!(
                "vfio: bad write of BAR {index} at {offset:#x} size {}",
                data.len()
            );
            return;
        }
        match self.msix_hit(index, offset, data.len() as u64) {
            Some(MsixHit::Table(o)) => {
                self.harvest();
                if let Some(m) = &mut self.msix {
                    m.config.table_write(o, data);
                }
                self.sync_irqs();
            }
            Some(MsixHit::Pba(_)) => debug!("vfio: write to the MSI-X PBA ignored"),
            Some(MsixHit::Straddle) => {
                virtio_dev::guest_warn!(
                    "vfio: BAR {index} write at {offset:#x} straddles the MSI-X structures"
                )
            }
            None => {
                let region = VFIO_PCI_BAR0_REGION_INDEX + u32::from(index);
                if let Err(e) = self.backend.region_write(region, offset, data) {
                    virtio_dev::guest_warn!(
                        "vfio: write of BAR {index} at {offset:#x} failed: {e}"
                    );
                }
            }
        }
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        if let Some(m) = &mut self.msix {
            m.sync.disable(self.backend.as_ref());
        }
        if let Some(m) = &mut self.msi {
            m.sync.disable(self.backend.as_ref());
        }
        self.bar_maps.set(Vec::new());
        for bar in &mut self.bars {
            for slot in bar.slots.drain(..) {
                if let Err(e) = self.slots.unmap(slot.id) {
                    warn!("vfio: unmapping slot {}: {e}", slot.id);
                }
            }
            for m in bar.mmaps.drain(..) {
                self.backend.munmap(m.host_addr, m.size);
            }
        }
    }
}

#[cfg(test)]
#[path = "vfio_pci_tests.rs"]
mod tests;
