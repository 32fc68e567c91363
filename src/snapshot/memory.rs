//! Guest RAM in a snapshot: the region layout, then every page that is not all zero as
//! `(gpa, 4 KiB)`, an end marker and a CRC-32 of the whole file. Restore writes every saved
//! page and zeroes the rest (the VM restored into may have loaded a kernel): the layout must
//! match, pages must be aligned, in order and inside a region.

use super::SnapshotError;
use std::io::{Read, Write};
use viommu::snapshot::crc32_update;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion};

const MAGIC: [u8; 8] = *b"VMMRAM01";
const PAGE: usize = 4096;
const END: u64 = u64::MAX;
/// Most RAM regions a layout has (below and above the 32-bit hole).
const MAX_REGIONS: u64 = 64;

struct Crc<W> {
    inner: W,
    crc: u32,
}

impl<W: Write> Crc<W> {
    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.crc = crc32_update(self.crc, b);
        self.inner.write_all(b)
    }
}

impl<R: Read> Crc<R> {
    fn get(&mut self, b: &mut [u8]) -> Result<(), SnapshotError> {
        self.inner
            .read_exact(b)
            .map_err(|e| SnapshotError::Invalid(format!("guest RAM file: {e} (truncated?)")))?;
        self.crc = crc32_update(self.crc, b);
        Ok(())
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        let mut b = [0u8; 8];
        self.get(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

fn regions<M: GuestMemoryBackend>(mem: &M) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// Zero guest RAM from `from` up to (not including) `to`, within the regions of `layout`.
fn zero<M: GuestMemory>(
    mem: &M,
    layout: &[(u64, u64)],
    from: u64,
    to: u64,
) -> Result<(), SnapshotError> {
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    for &(start, len) in layout {
        let (a, b) = (from.max(start), to.min(start + len));
        let mut at = a;
        while at < b {
            let n = (b - at).min(ZEROS.len() as u64) as usize;
            mem.write_slice(&ZEROS[..n], GuestAddress(at))
                .map_err(|e| SnapshotError::Invalid(format!("zeroing RAM at {at:#x}: {e}")))?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Write `mem` to `out`; returns the number of pages written.
pub fn save<M, W>(mem: &M, out: W) -> Result<u64, SnapshotError>
where
    M: GuestMemoryBackend + GuestMemory,
    W: Write,
{
    let mut w = Crc {
        inner: std::io::BufWriter::new(out),
        crc: !0,
    };
    let layout = regions(mem);
    w.put(&MAGIC)?;
    w.put(&(layout.len() as u64).to_le_bytes())?;
    for (start, len) in &layout {
        w.put(&start.to_le_bytes())?;
        w.put(&len.to_le_bytes())?;
    }
    let mut page = [0u8; PAGE];
    let mut pages = 0;
    for (start, len) in layout {
        let mut at = 0;
        while at < len {
            let n = PAGE.min((len - at) as usize);
            let gpa = start + at;
            mem.read_slice(&mut page[..n], GuestAddress(gpa))
                .map_err(|e| SnapshotError::Invalid(format!("reading RAM at {gpa:#x}: {e}")))?;
            page[n..].fill(0);
            if page.iter().any(|&b| b != 0) {
                w.put(&gpa.to_le_bytes())?;
                w.put(&page)?;
                pages += 1;
            }
            at += PAGE as u64;
        }
    }
    w.put(&END.to_le_bytes())?;
    let crc = !w.crc;
    w.inner.write_all(&crc.to_le_bytes())?;
    w.inner.flush()?;
    Ok(pages)
}

/// Load RAM written by [`save`] into `mem` (fresh, all zero, with the same layout).
pub fn restore<M, R>(mem: &M, input: R) -> Result<u64, SnapshotError>
where
    M: GuestMemoryBackend + GuestMemory,
    R: Read,
{
    let mut r = Crc {
        inner: std::io::BufReader::new(input),
        crc: !0,
    };
    let mut magic = [0u8; 8];
    r.get(&mut magic)?;
    if magic != MAGIC {
        return Err(SnapshotError::Invalid("guest RAM file: bad magic".into()));
    }
    let n = r.u64()?;
    if n > MAX_REGIONS {
        return Err(SnapshotError::Invalid(format!(
            "guest RAM file: {n} regions"
        )));
    }
    let mut saved = Vec::with_capacity(n as usize);
    for _ in 0..n {
        saved.push((r.u64()?, r.u64()?));
    }
    let layout = regions(mem);
    if saved != layout {
        return Err(SnapshotError::Mismatch(format!(
            "guest RAM layout {saved:x?}, this VM has {layout:x?} (same --memory?)"
        )));
    }
    let mut page = [0u8; PAGE];
    let mut next = 0u64;
    let mut pages = 0;
    loop {
        let gpa = r.u64()?;
        if gpa == END {
            break;
        }
        let inside = layout
            .iter()
            .find(|(s, l)| gpa >= *s && gpa - s < *l)
            .map(|(s, l)| (s + l - gpa).min(PAGE as u64) as usize);
        let Some(n) = inside.filter(|_| gpa % PAGE as u64 == 0 && gpa >= next) else {
            return Err(SnapshotError::Invalid(format!(
                "guest RAM file: page at {gpa:#x} misaligned, out of order or outside RAM"
            )));
        };
        r.get(&mut page)?;
        zero(mem, &layout, next, gpa)?;
        mem.write_slice(&page[..n], GuestAddress(gpa))
            .map_err(|e| SnapshotError::Invalid(format!("writing RAM at {gpa:#x}: {e}")))?;
        next = gpa + PAGE as u64;
        pages += 1;
    }
    zero(mem, &layout, next, u64::MAX)?;
    let want = !r.crc;
    let mut b = [0u8; 4];
    r.inner
        .read_exact(&mut b)
        .map_err(|e| SnapshotError::Invalid(format!("guest RAM file: {e} (truncated?)")))?;
    if u32::from_le_bytes(b) != want {
        return Err(SnapshotError::Invalid(
            "guest RAM file: checksum mismatch (corrupt)".into(),
        ));
    }
    let mut extra = [0u8; 1];
    if r.inner.read(&mut extra)? != 0 {
        return Err(SnapshotError::Invalid(
            "guest RAM file: trailing bytes".into(),
        ));
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap()
    }

    #[test]
    fn sparse_round_trip_and_damage_refused() {
        let src = ram();
        src.write_slice(b"hello", GuestAddress(0x3003)).unwrap();
        src.write_obj(0xdead_beefu32, GuestAddress((1 << 32) + 0xff000))
            .unwrap();
        let mut file = Vec::new();
        assert_eq!(save(&src, &mut file).unwrap(), 2);
        let dst = ram();
        dst.write_slice(b"stale", GuestAddress(0x8000)).unwrap();
        dst.write_slice(b"stale", GuestAddress((1 << 32) + 0x1000))
            .unwrap();
        assert_eq!(restore(&dst, &file[..]).unwrap(), 2);
        for at in [0x8000, (1 << 32) + 0x1000] {
            let mut z = [1u8; 5];
            dst.read_slice(&mut z, GuestAddress(at)).unwrap();
            assert_eq!(z, [0; 5], "pages not saved are zero after restore");
        }
        let mut b = [0u8; 5];
        dst.read_slice(&mut b, GuestAddress(0x3003)).unwrap();
        assert_eq!(&b, b"hello");
        let v: u32 = dst.read_obj(GuestAddress((1 << 32) + 0xff000)).unwrap();
        assert_eq!(v, 0xdead_beef);
        for cut in [0, 7, 16, 40, 100, file.len() - 1] {
            assert!(restore(&ram(), &file[..cut]).is_err(), "cut {cut}");
        }
        let mut bad = file.clone();
        bad[60 + 8] ^= 1; // a byte of the first page
        assert!(restore(&ram(), &bad[..]).is_err());
        let mut moved = file.clone();
        moved[48..56].copy_from_slice(&(5u64 << 32).to_le_bytes()); // page outside RAM
        assert!(restore(&ram(), &moved[..]).is_err());
        let other = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        assert!(matches!(
            restore(&other, &file[..]),
            Err(SnapshotError::Mismatch(_))
        ));
    }
}
