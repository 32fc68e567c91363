//! `maps` (map/unmap rates) and `errors` (VFIO type1 semantics) on an opened container.

use crate::dma::DmaBuf;
use crate::{now_ns, pick_iova, Error, VfioHandle};
use viommu::{DmaSpace, HostMapError, Prot};

/// Map one `size`-byte buffer at `count` consecutive IOVAs, then unmap them one by one; prints
/// `maps_per_s=... unmaps_per_s=...`.
pub fn maps(h: &VfioHandle, size: u64, count: u64, iova: Option<u64>) -> Result<(), Error> {
    let info = h.info();
    let total = size
        .checked_mul(count)
        .ok_or_else(|| Error::Usage("size * count overflows".into()))?;
    let base = match iova {
        Some(i) => i,
        None => pick_iova(&info, total, size)
            .ok_or_else(|| Error::Usage(format!("no host IOVA range holds {total:#x} bytes")))?,
    };
    if let Some(avail) = info.dma_avail {
        if u64::from(avail) < count {
            log::warn!("the container allows only {avail} more mappings; expect ENOSPC");
        }
    }
    let len = usize::try_from(size).map_err(|_| Error::Usage("size too large".into()))?;
    let buf = DmaBuf::new(len, len.max(4096))?;
    log::info!(
        "mapping {count} x {size:#x} at IOVA {base:#x}.. -> buffer {:#x}",
        buf.addr()
    );
    let t0 = now_ns();
    for i in 0..count {
        // SAFETY: `buf` is an anonymous buffer only accessed volatile; it outlives the
        // mappings (all unmapped below before it is dropped).
        if let Err(e) = unsafe { h.space.map_raw(base + i * size, size, buf.addr(), Prot::RW) } {
            println!("maps: map {i} at {:#x} failed: {e}", base + i * size);
            for j in 0..i {
                let _ = h.space.unmap_raw(base + j * size, size);
            }
            return Err(Error::Vfio(format!("map {i}: {e}")));
        }
    }
    let t1 = now_ns();
    let mut failed = None;
    for i in 0..count {
        match h.space.unmap_raw(base + i * size, size) {
            Ok(n) if n == size => {}
            r => {
                failed.get_or_insert(format!("unmap {i}: {r:?}"));
            }
        }
    }
    let t2 = now_ns();
    let rate = |ns: u64| count as f64 * 1e9 / (ns.max(1) as f64);
    // How many pieces the kernel had to map per VFIO map: a 2 MiB buffer that got no huge
    // page is up to 512, and the rate follows.
    let runs = buf
        .phys_runs()
        .map(|r| format!(" buf_runs={r}"))
        .unwrap_or_default();
    println!(
        "maps_per_s={:.0} unmaps_per_s={:.0} size={size} count={count} map_ns_avg={} \
         unmap_ns_avg={}{runs}",
        rate(t1 - t0),
        rate(t2 - t1),
        (t1 - t0) / count,
        (t2 - t1) / count
    );
    match failed {
        Some(f) => Err(Error::Vfio(f)),
        None => Ok(()),
    }
}

/// One check's outcome.
struct Checks {
    passed: u32,
    failed: u32,
}

impl Checks {
    fn report(&mut self, name: &str, ok: bool, detail: String) {
        println!(
            "check {name}: {} ({detail})",
            if ok { "ok" } else { "fail" }
        );
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }
}

fn errno(r: &std::io::Result<impl std::fmt::Debug>) -> Option<i32> {
    r.as_ref().err().and_then(|e| e.raw_os_error())
}

/// The VFIO behaviours the shadow engine depends on. Returns whether every check passed.
pub fn errors(h: &VfioHandle, iova: Option<u64>) -> Result<bool, Error> {
    let info = h.info();
    let page = 4096u64;
    let buf = DmaBuf::new(4 * page as usize, page as usize)?;
    let b = match iova {
        Some(i) => i,
        None => pick_iova(&info, 4 * page, page)
            .ok_or_else(|| Error::Usage("no usable host IOVA range".into()))?,
    };
    let a = buf.addr();
    let mut c = Checks {
        passed: 0,
        failed: 0,
    };
    c.report(
        "info",
        h.space.query_info().is_ok(),
        format!(
            "pgsizes={:#x} ranges={:x?} dma_avail={:?}",
            info.page_sizes, info.iova_ranges, info.dma_avail
        ),
    );
    let raw_map = |iova: u64, size: u64, addr: u64, prot: Prot| {
        // SAFETY: every address passed lies in `buf`, an anonymous buffer only accessed
        // volatile, which lives until the end of this function, after the final cleanup unmap.
        unsafe { h.space.map_raw(iova, size, addr, prot) }
    };
    let space_map = |iova: u64, size: u64, addr: u64, prot: Prot| {
        // SAFETY: as for `raw_map`.
        unsafe { DmaSpace::map(&h.space, iova, size, addr, prot) }
    };
    let r = raw_map(b, 2 * page, a, Prot::RW);
    c.report("map_rw", r.is_ok(), format!("{b:#x}+0x2000: {r:?}"));
    let r = raw_map(b + page, 2 * page, a, Prot::RW);
    c.report(
        "overlap_map_eexist",
        errno(&r) == Some(libc::EEXIST),
        format!("{r:?}"),
    );
    let r = space_map(b + page, 2 * page, a, Prot::RW);
    c.report(
        "overlap_map_status_inval",
        r == Err(HostMapError::Invalid),
        format!("{r:?}"),
    );
    let r = h.space.unmap_raw(b, page);
    c.report(
        "bisect_unmap_einval",
        errno(&r) == Some(libc::EINVAL),
        format!("{r:?}"),
    );
    let r = DmaSpace::unmap(&h.space, b + page, page);
    c.report(
        "bisect_unmap_status_inval",
        r == Err(HostMapError::Invalid),
        format!("{r:?}"),
    );
    let r = raw_map(b, page, a, Prot::RW);
    c.report(
        "bisect_left_mapping_intact",
        errno(&r) == Some(libc::EEXIST),
        format!("{r:?}"),
    );
    let r = h.space.unmap_raw(b, 2 * page);
    c.report(
        "unmap_exact",
        matches!(r, Ok(n) if n == 2 * page),
        format!("{r:?}"),
    );
    let r = h.space.unmap_raw(b, 2 * page);
    c.report(
        "unmap_nothing",
        matches!(r, Ok(0)) || errno(&r) == Some(libc::ENOENT),
        format!("{r:?} (type1: Ok(0); iommufd native: ENOENT)"),
    );
    let ro = Prot {
        read: true,
        write: false,
    };
    let r = space_map(b, page, a, ro);
    let u = DmaSpace::unmap(&h.space, b, page);
    c.report(
        "map_read_only",
        r.is_ok() && u.is_ok(),
        format!("map {r:?}, unmap {u:?}"),
    );
    let r = space_map(b, page, a, Prot::default());
    c.report(
        "map_no_rights_refused",
        r.is_err(),
        format!("{r:?} (the shadow never sends these)"),
    );
    match info.iova_ranges.last() {
        Some(&(_, end)) if end < u64::MAX - page => {
            let r = space_map(end + 1, page, a, Prot::RW);
            if r.is_ok() {
                let _ = DmaSpace::unmap(&h.space, end + 1, page);
            }
            c.report(
                "out_of_range_status_range",
                r == Err(HostMapError::OutOfRange),
                format!("iova {:#x}: {r:?}", end + 1),
            );
        }
        _ => println!("check out_of_range_status_range: skip (no finite host range)"),
    }
    // Two mappings at adjacent IOVAs stay two: unmapping one leaves the other.
    let r1 = raw_map(b, page, a, Prot::RW);
    let r2 = raw_map(b + page, page, a + page, Prot::RW);
    let u1 = h.space.unmap_raw(b, page);
    let u2 = h.space.unmap_raw(b + page, page);
    c.report(
        "adjacent_mappings_separate",
        r1.is_ok()
            && r2.is_ok()
            && matches!(u1, Ok(n) if n == page)
            && matches!(u2, Ok(n) if n == page),
        format!("{r1:?} {r2:?} {u1:?} {u2:?}"),
    );
    // Leave nothing behind whatever failed above.
    let _ = h.space.unmap_raw(b, 4 * page);
    println!("errors: {} ok, {} failed", c.passed, c.failed);
    Ok(c.failed == 0)
}
