//! Memory the device sees: anonymous DMA buffers (mapped into the VFIO container by the
//! caller) and BAR windows (a VFIO region mmap, or pread/pwrite on the region when it cannot be
//! mmapped). Only raw-pointer volatile accesses, never Rust references: the device may read or
//! write this memory at any time.

use crate::ring::Mem;
use crate::Error;
use pci::vfio_backend::{VfioBackend, VfioDeviceBackend};
use std::ptr::NonNull;
use std::sync::Arc;

/// An anonymous, zeroed, `align`-aligned buffer of `len` bytes (both page multiples).
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// The whole mapping (for munmap): `(start, len)`.
    raw: (usize, usize),
}

// SAFETY: the buffer is plain memory accessed only through volatile raw-pointer operations.
unsafe impl Send for DmaBuf {}
// SAFETY: as above; concurrent volatile accesses are the DMA model anyway.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    /// Allocate and touch every page (so pinning does not fault them in during timing).
    pub fn new(len: usize, align: usize) -> Result<DmaBuf, Error> {
        let page = 4096;
        if len == 0 || len & (page - 1) != 0 || !align.is_power_of_two() || align < page {
            return Err(Error::Usage(format!(
                "buffer of {len:#x} bytes aligned to {align:#x}: need page multiples"
            )));
        }
        let total = len
            .checked_add(align - page)
            .ok_or_else(|| Error::Usage("buffer too large".into()))?;
        // SAFETY: a fresh private anonymous mapping chosen by the kernel; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Io(
                "mmap anonymous".into(),
                std::io::Error::last_os_error(),
            ));
        }
        let start = p as usize;
        let aligned = start.next_multiple_of(align);
        let ptr = NonNull::new(aligned as *mut u8).ok_or_else(|| Error::Usage("null".into()))?;
        let buf = DmaBuf {
            ptr,
            len,
            raw: (start, total),
        };
        let huge = 2 << 20;
        if len >= huge && aligned % huge == 0 {
            // Ask for transparent huge pages before the first touch, so that a 2 MiB buffer is
            // one physically contiguous chunk (one IOMMU mapping) whenever the kernel can: the
            // `maps --size 2097152` rates otherwise swing with L2's memory state. Advice only;
            // a failure changes nothing else.
            // SAFETY: `aligned..aligned + len` lies inside the mapping made above.
            unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        }
        for off in (0..len as u64).step_by(page) {
            buf.write(off, &[0]);
        }
        Ok(buf)
    }

    /// Host (process) address of the first byte.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Physically contiguous runs of the buffer's pages (`/proc/self/pagemap`; root sees the
    /// frames): the IOMMU mappings one VFIO map of it becomes, whatever the VMM. `None` where
    /// the frames cannot be read.
    pub fn phys_runs(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open("/proc/self/pagemap").ok()?;
        let pages = self.len / 4096;
        let mut raw = vec![0u8; pages * 8];
        f.read_exact_at(&mut raw, self.addr() / 4096 * 8).ok()?;
        let mut runs = 0;
        let mut prev: Option<u64> = None;
        for e in raw.chunks_exact(8) {
            let e = u64::from_le_bytes(e.try_into().ok()?);
            // Bit 63: present; bits 0-54: the frame (0 when hidden).
            let pfn = e & ((1 << 55) - 1);
            if e >> 63 == 0 || pfn == 0 {
                return None;
            }
            if prev.is_none_or(|p| p + 1 != pfn) {
                runs += 1;
            }
            prev = Some(pfn);
        }
        Some(runs)
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`, which nothing references.
        unsafe { libc::munmap(self.raw.0 as *mut libc::c_void, self.raw.1) };
    }
}

fn in_bounds(len: u64, off: u64, n: usize) -> bool {
    off.checked_add(n as u64).is_some_and(|end| end <= len)
}

impl Mem for DmaBuf {
    fn len(&self) -> u64 {
        self.len as u64
    }

    fn read<const N: usize>(&self, off: u64) -> [u8; N] {
        let mut out = [0u8; N];
        if !in_bounds(self.len(), off, N) {
            log::error!(
                "dma read {off:#x}+{N} outside the {:#x}-byte buffer",
                self.len
            );
            return out;
        }
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: in bounds of the live mapping (checked above); volatile, no reference.
            *b = unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(off as usize + i)) };
        }
        out
    }

    fn write(&self, off: u64, bytes: &[u8]) {
        if !in_bounds(self.len(), off, bytes.len()) {
            log::error!(
                "dma write {off:#x}+{} outside the {:#x}-byte buffer",
                bytes.len(),
                self.len
            );
            return;
        }
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: in bounds of the live mapping (checked above); volatile, no reference.
            unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(off as usize + i), *b) };
        }
    }
}

/// Register access to (part of) one BAR.
pub enum BarIo {
    /// A VFIO region mmap of `len` bytes at `addr`, covering BAR offsets `base..base+len`.
    Mmap {
        /// Backend (for munmap).
        backend: Arc<VfioDeviceBackend>,
        /// Host address.
        addr: u64,
        /// BAR offset of `addr`.
        base: u64,
        /// Bytes mapped.
        len: u64,
    },
    /// pread/pwrite on the VFIO region.
    Region {
        /// Backend.
        backend: Arc<VfioDeviceBackend>,
        /// VFIO region index (the BAR number).
        index: u32,
    },
}

impl BarIo {
    /// Access to BAR `bar` covering offsets `off..off+len`: mmap when VFIO allows it for that
    /// span (whole region, or one sparse area holding it), else region reads/writes.
    pub fn open(backend: &Arc<VfioDeviceBackend>, bar: u8, off: u64, len: u64) -> BarIo {
        let index = u32::from(bar);
        let info = backend.region_info(index);
        let span_end = off.saturating_add(len);
        let area = info.as_ref().and_then(|i| {
            if !i.mmap {
                None
            } else if i.sparse_areas.is_empty() {
                Some((0, i.size))
            } else {
                i.sparse_areas
                    .iter()
                    .copied()
                    .find(|&(o, s)| o <= off && span_end <= o.saturating_add(s))
            }
        });
        if let Some((base, size)) = area {
            match backend.mmap(index, base, size, true) {
                Ok(addr) => {
                    log::info!("BAR{bar}: mmapped {size:#x} bytes at offset {base:#x}");
                    return BarIo::Mmap {
                        backend: backend.clone(),
                        addr,
                        base,
                        len: size,
                    };
                }
                Err(e) => log::warn!("BAR{bar}: mmap failed ({e}), using region read/write"),
            }
        } else {
            log::info!("BAR{bar}: not mmappable here ({info:?}), using region read/write");
        }
        BarIo::Region {
            backend: backend.clone(),
            index,
        }
    }

    fn mmap_ptr(addr: u64, base: u64, len: u64, off: u64, n: usize) -> Option<*mut u8> {
        let rel = off.checked_sub(base)?;
        in_bounds(len, rel, n).then_some((addr + rel) as *mut u8)
    }

    /// Read a naturally aligned 1/2/4-byte register at BAR offset `off` (all-ones on error).
    pub fn read<const N: usize>(&self, off: u64) -> [u8; N] {
        let mut out = [0xffu8; N];
        match self {
            BarIo::Mmap {
                addr, base, len, ..
            } => {
                let Some(p) = Self::mmap_ptr(*addr, *base, *len, off, N) else {
                    log::error!("BAR read {off:#x}+{N} outside the mmap");
                    return out;
                };
                // SAFETY: inside the live region mmap (checked); one access of the register's
                // width, volatile (MMIO must not be split or merged).
                unsafe {
                    match N {
                        1 => out[0] = std::ptr::read_volatile(p),
                        2 => out.copy_from_slice(
                            &std::ptr::read_volatile(p as *const u16).to_ne_bytes()[..N],
                        ),
                        4 => out.copy_from_slice(
                            &std::ptr::read_volatile(p as *const u32).to_ne_bytes()[..N],
                        ),
                        _ => log::error!("BAR read of {N} bytes unsupported"),
                    }
                }
            }
            BarIo::Region { backend, index } => {
                if let Err(e) = backend.region_read(*index, off, &mut out) {
                    log::error!("BAR region read {off:#x}: {e}");
                }
            }
        }
        out
    }

    /// Write a naturally aligned 1/2/4-byte register at BAR offset `off`.
    pub fn write(&self, off: u64, bytes: &[u8]) {
        match self {
            BarIo::Mmap {
                addr, base, len, ..
            } => {
                let Some(p) = Self::mmap_ptr(*addr, *base, *len, off, bytes.len()) else {
                    log::error!("BAR write {off:#x}+{} outside the mmap", bytes.len());
                    return;
                };
                // SAFETY: inside the live region mmap (checked); one volatile access of the
                // register's width.
                unsafe {
                    match *bytes {
                        [a] => std::ptr::write_volatile(p, a),
                        [a, b] => {
                            std::ptr::write_volatile(p as *mut u16, u16::from_ne_bytes([a, b]))
                        }
                        [a, b, c, d] => std::ptr::write_volatile(
                            p as *mut u32,
                            u32::from_ne_bytes([a, b, c, d]),
                        ),
                        _ => log::error!("BAR write of {} bytes unsupported", bytes.len()),
                    }
                }
            }
            BarIo::Region { backend, index } => {
                if let Err(e) = backend.region_write(*index, off, bytes) {
                    log::error!("BAR region write {off:#x}: {e}");
                }
            }
        }
    }

    /// Little-endian u8/u16/u32 helpers.
    pub fn read8(&self, off: u64) -> u8 {
        self.read::<1>(off)[0]
    }
    /// See [`BarIo::read8`].
    pub fn read16(&self, off: u64) -> u16 {
        u16::from_le_bytes(self.read(off))
    }
    /// See [`BarIo::read8`].
    pub fn read32(&self, off: u64) -> u32 {
        u32::from_le_bytes(self.read(off))
    }
    /// See [`BarIo::read8`].
    pub fn write8(&self, off: u64, v: u8) {
        self.write(off, &[v]);
    }
    /// See [`BarIo::read8`].
    pub fn write16(&self, off: u64, v: u16) {
        self.write(off, &v.to_le_bytes());
    }
    /// See [`BarIo::read8`].
    pub fn write32(&self, off: u64, v: u32) {
        self.write(off, &v.to_le_bytes());
    }
}

impl Drop for BarIo {
    fn drop(&mut self) {
        if let BarIo::Mmap {
            backend, addr, len, ..
        } = self
        {
            backend.munmap(*addr, *len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_buf_is_aligned_zeroed_and_bounded() {
        let b = DmaBuf::new(0x4000, 0x20_0000).unwrap();
        assert_eq!(b.addr() % 0x20_0000, 0);
        assert_eq!(b.read::<4>(0x3ffc), [0; 4]);
        b.write_u32(0x10, 0xdead_beef);
        assert_eq!(b.read_u32(0x10), 0xdead_beef);
        // Out of bounds: ignored, reads zero.
        b.write(0x3ffe, &[1, 2, 3, 4]);
        assert_eq!(b.read::<4>(0x3ffe), [0; 4]);
        assert_eq!(b.read::<4>(u64::MAX - 1), [0; 4]);
        assert!(DmaBuf::new(100, 4096).is_err());
        assert!(DmaBuf::new(4096, 3).is_err());
    }

    #[test]
    fn mmap_bounds() {
        assert_eq!(
            BarIo::mmap_ptr(0x1000, 0x100, 0x100, 0x1fc, 4),
            Some(0x10fc as *mut u8)
        );
        assert_eq!(BarIo::mmap_ptr(0x1000, 0x100, 0x100, 0x1fd, 4), None);
        assert_eq!(BarIo::mmap_ptr(0x1000, 0x100, 0x100, 0xff, 1), None);
    }
}
