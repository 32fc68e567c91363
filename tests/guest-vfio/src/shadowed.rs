//! `shadow-blk-read`: the viommu crate's shadowing engine and static mapping on real VFIO. A
//! small "guest RAM" (two separately mmapped regions, as a VMM's `GuestMemoryMmap`) holds the
//! virtqueue and buffers; the device reaches it
//! 1. through a [`Shadow`] guest mapping IOVA -> GPA that straddles the region edge (so the
//!    engine composes it into two host mappings), then
//! 2. through a [`StaticMapping`] (IOVA == GPA for all of that RAM),
//!
//! and reads one sector each way. Both digests must match `virtio-blk-read`'s.

use crate::blk::{print_result, read_via, ReadResult};
use crate::ring::Mem;
use crate::{pick_iova, Error, VfioHandle};
use std::sync::Arc;
use viommu::VfioDmaSpace;
use viommu::{DmaSpace, HostMapper, Prot};
use viommu::{Shadow, StaticMapping};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// Size of each of the two RAM regions.
pub const REGION: u64 = 1 << 20;
/// Bytes of the DMA window (the blk driver's buffer layout).
const WINDOW: u64 = 0x10000;

/// `len` bytes of guest RAM from `gpa`, as the driver's DMA memory (vm-memory's accessors, which
/// handle the region edge).
pub struct GuestWindow {
    mem: GuestMemoryMmap,
    gpa: u64,
    len: u64,
}

impl GuestWindow {
    /// The window `gpa..gpa+len` of `mem`.
    pub fn new(mem: GuestMemoryMmap, gpa: u64, len: u64) -> Self {
        GuestWindow { mem, gpa, len }
    }

    fn at(&self, off: u64, n: usize) -> Option<GuestAddress> {
        let end = off.checked_add(n as u64)?;
        (end <= self.len).then(|| GuestAddress(self.gpa + off))
    }
}

impl Mem for GuestWindow {
    fn len(&self) -> u64 {
        self.len
    }

    fn read<const N: usize>(&self, off: u64) -> [u8; N] {
        let mut out = [0u8; N];
        match self.at(off, N) {
            Some(a) => {
                if let Err(e) = self.mem.read_slice(&mut out, a) {
                    log::error!("guest RAM read at {a:?}: {e}");
                }
            }
            None => log::error!("window read {off:#x}+{N} out of bounds"),
        }
        out
    }

    fn write(&self, off: u64, bytes: &[u8]) {
        match self.at(off, bytes.len()) {
            Some(a) => {
                if let Err(e) = self.mem.write_slice(bytes, a) {
                    log::error!("guest RAM write at {a:?}: {e}");
                }
            }
            None => log::error!("window write {off:#x}+{} out of bounds", bytes.len()),
        }
    }
}

/// Two adjacent 1 MiB regions at GPA 0 (separate host mmaps).
pub fn guest_ram() -> Result<GuestMemoryMmap, Error> {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION as usize),
        (GuestAddress(REGION), REGION as usize),
    ])
    .map_err(|e| Error::Device(format!("guest RAM: {e}")))
}

/// Read `sector` through a shadowed guest mapping, then through the static mapping.
pub fn shadow_blk_read(
    h: &VfioHandle,
    sector: u64,
    iova: Option<u64>,
    timeout_ms: u64,
) -> Result<(ReadResult, ReadResult), Error> {
    let info = h.info();
    let ram = guest_ram()?;
    let space: Arc<dyn DmaSpace> = Arc::new(VfioDmaSpace::new(h.container.clone()));

    // 1. A guest mapping straddling the region edge: GPA REGION - WINDOW/2 ..
    let gpa = REGION - WINDOW / 2;
    let base = match iova {
        Some(i) => i,
        None => pick_iova(&info, WINDOW, WINDOW)
            .ok_or_else(|| Error::Usage("no usable host IOVA range".into()))?,
    };
    let shadow = Shadow::new(space.clone(), GuestMemoryAtomic::new(ram.clone()))
        .with_config(info.shadow_config());
    shadow
        .map(base, WINDOW, gpa, Prot::RW)
        .map_err(|e| Error::Vfio(format!("shadow map {base:#x} -> GPA {gpa:#x}: {e}")))?;
    let pieces = shadow.host_mappings();
    println!(
        "shadow: guest mapping {base:#x}+{WINDOW:#x} -> GPA {gpa:#x} became {} host mappings: {}",
        pieces.len(),
        pieces
            .iter()
            .map(|p| format!("{:#x}+{:#x}", p.iova, p.size))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let via_shadow = read_via(
        h,
        &GuestWindow::new(ram.clone(), gpa, WINDOW),
        base,
        sector,
        timeout_ms,
    );
    if let Err(e) = shadow.unmap(base, WINDOW) {
        log::error!("shadow unmap: {e}");
    }
    let via_shadow = via_shadow?;
    print_result("shadow-blk-read", sector, &via_shadow);
    if pieces.len() != 2 || !shadow.is_empty() {
        return Err(Error::Vfio(format!(
            "expected 2 pieces and an empty shadow after unmap, got {} and {}",
            pieces.len(),
            shadow.len()
        )));
    }

    // 2. All of that RAM identity-mapped; the window at GPA (== IOVA) 0x4000.
    let statics =
        StaticMapping::new(space, &ram).map_err(|e| Error::Vfio(format!("static mapping: {e}")))?;
    println!("static: {} ranges identity-mapped", statics.ranges().len());
    let gpa2 = 0x4000;
    let via_static = read_via(
        h,
        &GuestWindow::new(ram, gpa2, WINDOW),
        gpa2,
        sector,
        timeout_ms,
    );
    if let Err(e) = statics.clear() {
        log::error!("static unmap: {e}");
    }
    let via_static = via_static?;
    print_result("static-blk-read", sector, &via_static);
    Ok((via_shadow, via_static))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_spans_the_region_edge_and_stays_in_bounds() {
        let ram = guest_ram().unwrap();
        let w = GuestWindow::new(ram.clone(), REGION - 2, 8);
        w.write(0, &[1, 2, 3, 4]);
        assert_eq!(w.read::<4>(0), [1, 2, 3, 4]);
        let mut b = [0u8; 2];
        ram.read_slice(&mut b, GuestAddress(REGION)).unwrap();
        assert_eq!(b, [3, 4], "the second half landed in the second region");
        w.write(6, &[9, 9, 9]);
        assert_eq!(
            w.read::<4>(6),
            [0; 4],
            "out of the window: ignored, reads zero"
        );
        let far = GuestWindow::new(ram, 2 * REGION - 2, 8);
        assert_eq!(
            far.read::<4>(0),
            [0; 4],
            "past guest RAM: error logged, zero"
        );
    }
}
