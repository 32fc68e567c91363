//! The timed O_DIRECT read loop.

use std::alloc::Layout;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};

use crate::args::{BufKind, Pattern, ReadArgs};
use crate::{account, now_ns, Error, XorShift};

/// What one run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadResult {
    /// Timed requests completed.
    pub requests: u64,
    /// Bytes per request.
    pub bs: u64,
    /// Timed nanoseconds.
    pub nanos: u64,
}

impl ReadResult {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.requests as f64 * 1e9 / self.nanos.max(1) as f64
    }

    /// Megabytes (10^6 bytes) per second.
    pub fn mbps(&self) -> f64 {
        self.iops() * self.bs as f64 / 1e6
    }
}

/// A read buffer for O_DIRECT: page-aligned heap memory, or a 2 MiB-aligned mapping.
struct Buffer {
    ptr: *mut u8,
    len: usize,
    kind: Backing,
}

/// What backs a [`Buffer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backing {
    /// `std::alloc` with 4 KiB alignment.
    Heap(Layout),
    /// An anonymous mapping of `map_len` bytes starting at `map_ptr` (hugetlbfs or THP).
    Mapped {
        map_ptr: *mut u8,
        map_len: usize,
        hugetlb: bool,
    },
}

const HUGE: usize = 2 << 20;

impl Buffer {
    fn new(len: usize, kind: BufKind) -> Result<Self, Error> {
        let b = match kind {
            BufKind::Anon => {
                let layout = Layout::from_size_align(len, 4096)
                    .map_err(|_| Error::Size(format!("bad buffer size {len}")))?;
                // SAFETY: `layout` has a non-zero size (bs >= 512 is checked by the parser).
                let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
                if ptr.is_null() {
                    return Err(Error::Size(format!("cannot allocate {len} bytes")));
                }
                Buffer {
                    ptr,
                    len,
                    kind: Backing::Heap(layout),
                }
            }
            BufKind::Huge => Self::huge(len)?,
        };
        // Fault every page in now, not during the timed reads.
        for off in (0..len).step_by(4096) {
            // SAFETY: `off < len`, inside the buffer.
            unsafe { b.ptr.add(off).write_volatile(1) };
        }
        Ok(b)
    }

    /// 2 MiB-aligned: hugetlbfs pages when reserved, else an aligned anonymous mapping with
    /// MADV_HUGEPAGE (transparent huge pages, when the kernel has them).
    fn huge(len: usize) -> Result<Self, Error> {
        let rounded = len.div_ceil(HUGE) * HUGE;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: a fresh anonymous mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                rounded,
                prot,
                flags | libc::MAP_HUGETLB,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return Ok(Buffer {
                ptr: p.cast(),
                len,
                kind: Backing::Mapped {
                    map_ptr: p.cast(),
                    map_len: rounded,
                    hugetlb: true,
                },
            });
        }
        let map_len = rounded + HUGE;
        // SAFETY: as above.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), map_len, prot, flags, -1, 0) };
        if p == libc::MAP_FAILED {
            return Err(Error::Io(
                format!("mmap {map_len} bytes"),
                std::io::Error::last_os_error(),
            ));
        }
        let skip = (HUGE - (p as usize % HUGE)) % HUGE;
        // SAFETY: `skip < HUGE`, so the aligned start and `rounded` bytes lie in the mapping.
        let ptr = unsafe { p.cast::<u8>().add(skip) };
        // SAFETY: advice on our own mapping; failure (no THP) only loses the hint.
        unsafe { libc::madvise(ptr.cast(), rounded, libc::MADV_HUGEPAGE) };
        Ok(Buffer {
            ptr,
            len,
            kind: Backing::Mapped {
                map_ptr: p.cast(),
                map_len,
                hugetlb: false,
            },
        })
    }

    /// `anon`, `hugetlb` or `thp` (THP asked for; whether the kernel gave huge pages is its
    /// business: see AnonHugePages in /proc/meminfo).
    /// Physically contiguous runs the buffer's pages form (from `/proc/self/pagemap`, which
    /// shows frame numbers to root only): how many pieces an IOMMU must map for one read into
    /// it, whatever the VMM. `None` where the frames cannot be read.
    fn phys_runs(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open("/proc/self/pagemap").ok()?;
        let first = self.ptr as u64 / 4096;
        let pages = (self.len as u64).div_ceil(4096);
        let mut raw = vec![0u8; usize::try_from(pages).ok()? * 8];
        f.read_exact_at(&mut raw, first * 8).ok()?;
        let mut runs = 0u64;
        let mut prev: Option<u64> = None;
        for e in raw.chunks_exact(8) {
            let e = u64::from_le_bytes(e.try_into().ok()?);
            // Bit 63: present; bits 0-54: the frame (0 when hidden from non-root).
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

    fn label(&self) -> &'static str {
        match self.kind {
            Backing::Heap(_) => "anon",
            Backing::Mapped { hugetlb: true, .. } => "hugetlb",
            Backing::Mapped { hugetlb: false, .. } => "thp",
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        match self.kind {
            // SAFETY: allocated in `new` with this layout, freed once.
            Backing::Heap(layout) => unsafe { std::alloc::dealloc(self.ptr, layout) },
            Backing::Mapped {
                map_ptr, map_len, ..
            } => {
                // SAFETY: the mapping made in `huge`, unmapped once.
                unsafe { libc::munmap(map_ptr.cast(), map_len) };
            }
        }
    }
}

/// An open file descriptor, closed on drop.
struct Fd(libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the descriptor was opened by us and is closed once.
        unsafe { libc::close(self.0) };
    }
}

/// The byte offset of request `i`, block-aligned, within `blocks` blocks of `bs` bytes.
pub fn offset(pattern: Pattern, rng: &mut XorShift, i: u64, blocks: u64, bs: u64) -> u64 {
    let block = match pattern {
        Pattern::Random => rng.next_u64() % blocks,
        Pattern::Sequential => i % blocks,
    };
    block * bs
}

fn read_at(fd: &Fd, buf: &Buffer, dev: &str, off: u64) -> Result<(), Error> {
    // SAFETY: `buf` holds `buf.len` writable bytes; `fd` is open for reading.
    let n = unsafe { libc::pread(fd.0, buf.ptr.cast(), buf.len, off as libc::off_t) };
    if n < 0 {
        return Err(Error::Io(
            format!("pread {dev} at {off}"),
            std::io::Error::last_os_error(),
        ));
    }
    if n as usize != buf.len {
        return Err(Error::Size(format!(
            "short read at {off}: {n} of {}",
            buf.len
        )));
    }
    Ok(())
}

/// What one run measured, besides the rates.
#[derive(Clone, Debug, Default)]
pub struct RunInfo {
    /// `anon`, `hugetlb` or `thp`.
    pub buf: &'static str,
    /// The `acct_*` words (empty without `--account`).
    pub account: String,
    /// Physically contiguous runs per buffer (mean over the QD buffers), where readable.
    pub buf_runs: Option<f64>,
}

/// Pause after a phase marker, so that an observer of the console sees it (and takes its
/// snapshot, a process start in L1 under TCG) before the timed part starts or the next phase.
const PHASE_PAUSE: std::time::Duration = std::time::Duration::from_millis(600);

/// Open `a.dev` with O_DIRECT and time the reads; see [`crate::args::USAGE`].
pub fn run(a: &ReadArgs) -> Result<ReadResult, Error> {
    run_info(a).map(|(r, _)| r)
}

/// [`run`], with what the buffers were and the guest-side counters.
pub fn run_info(a: &ReadArgs) -> Result<(ReadResult, RunInfo), Error> {
    let path = CString::new(a.dev.as_bytes())
        .map_err(|_| Error::Usage(format!("bad path {:?}", a.dev)))?;
    // SAFETY: `path` is a valid NUL-terminated string.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_DIRECT) };
    if fd < 0 {
        return Err(Error::Io(
            format!("open {} O_DIRECT", a.dev),
            std::io::Error::last_os_error(),
        ));
    }
    let fd = Fd(fd);
    // SAFETY: plain lseek on our descriptor.
    let end = unsafe { libc::lseek(fd.0, 0, libc::SEEK_END) };
    if end < 0 {
        return Err(Error::Io(
            format!("size of {}", a.dev),
            std::io::Error::last_os_error(),
        ));
    }
    let dev_size = end as u64;
    let span = if a.span == 0 {
        dev_size
    } else {
        a.span.min(dev_size)
    };
    let blocks = span / a.bs;
    if blocks == 0 {
        return Err(Error::Size(format!(
            "{} has {dev_size} bytes (span {span}), less than one {}-byte block",
            a.dev, a.bs
        )));
    }
    let len = usize::try_from(a.bs).map_err(|_| Error::Size("block size too large".into()))?;
    let qd = a.qd.max(1) as usize;
    let limit = a.millis.saturating_mul(1_000_000);
    // Timed requests are numbered from `warmup` on; sequential offsets follow the number.
    let next = AtomicU64::new(a.warmup);
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let label: Mutex<&'static str> = Mutex::new("anon");
    // Physical runs over every buffer that could be measured, and how many could.
    let runs = (AtomicU64::new(0), AtomicU64::new(0));
    let ready = Barrier::new(qd + 1);
    let go = Barrier::new(qd + 1);
    let t0 = AtomicU64::new(0);
    let fail = |e: Error| {
        stop.store(true, Ordering::Relaxed);
        if let Ok(mut f) = failure.lock() {
            f.get_or_insert(e);
        }
    };
    let mut before = None;
    let mut info = RunInfo::default();
    std::thread::scope(|s| {
        for t in 0..qd {
            let (fd, next, done, stop, ready, go, t0, fail, label, runs) = (
                &fd, &next, &done, &stop, &ready, &go, &t0, &fail, &label, &runs,
            );
            s.spawn(move || {
                let buf = Buffer::new(len, a.buf);
                let mut rng = XorShift::new(a.seed.wrapping_add(t as u64));
                if let Ok(b) = &buf {
                    if let Ok(mut l) = label.lock() {
                        *l = b.label();
                    }
                    if let Some(n) = b.phys_runs() {
                        runs.0.fetch_add(n, Ordering::Relaxed);
                        runs.1.fetch_add(1, Ordering::Relaxed);
                    }
                    // Warm-up: this thread's share, untimed.
                    for i in (t as u64..a.warmup).step_by(qd) {
                        if let Err(e) =
                            read_at(fd, b, &a.dev, offset(a.pattern, &mut rng, i, blocks, a.bs))
                        {
                            fail(e);
                            break;
                        }
                    }
                }
                ready.wait();
                go.wait();
                let b = match buf {
                    Ok(b) => b,
                    Err(e) => return fail(e),
                };
                let start = t0.load(Ordering::Relaxed);
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i - a.warmup >= a.count {
                        break;
                    }
                    let off = offset(a.pattern, &mut rng, i, blocks, a.bs);
                    if let Err(e) = read_at(fd, &b, &a.dev, off) {
                        return fail(e);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    if now_ns().saturating_sub(start) >= limit {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            });
        }
        ready.wait();
        if !a.phase.is_empty() {
            eprintln!("BENCH-PHASE begin {}", a.phase);
            std::thread::sleep(PHASE_PAUSE);
        }
        if !a.account.is_empty() {
            before = Some(account::snapshot(&a.account));
        }
        t0.store(now_ns(), Ordering::Relaxed);
        go.wait();
    });
    let elapsed = now_ns().saturating_sub(t0.load(Ordering::Relaxed));
    if let Some(b) = &before {
        info.account = account::delta_words(b, &account::snapshot(&a.account));
    }
    if !a.phase.is_empty() {
        eprintln!("BENCH-PHASE end {}", a.phase);
        std::thread::sleep(PHASE_PAUSE);
    }
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    info.buf = label.into_inner().unwrap_or("anon");
    let measured = runs.1.load(Ordering::Relaxed);
    info.buf_runs = (measured > 0).then(|| runs.0.load(Ordering::Relaxed) as f64 / measured as f64);
    Ok((
        ReadResult {
            requests: done.load(Ordering::Relaxed),
            bs: a.bs,
            nanos: elapsed,
        },
        info,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn physical_runs_are_counted_where_frames_are_visible() {
        let b = Buffer::new(64 << 10, BufKind::Anon).unwrap();
        // SAFETY: plain getter.
        let root = unsafe { libc::geteuid() } == 0;
        match b.phys_runs() {
            Some(n) => assert!(root && (1..=16).contains(&n), "{n} runs of 16 pages"),
            // Without CAP_SYS_ADMIN the kernel shows frame 0: no figure rather than a wrong one.
            None => assert!(!root, "root sees the frames"),
        }
    }

    #[test]
    fn offsets_stay_block_aligned_inside_the_span() {
        let mut r = XorShift::new(7);
        for i in 0..10_000 {
            let o = offset(Pattern::Random, &mut r, i, 100, 4096);
            assert_eq!(o % 4096, 0);
            assert!(o < 100 * 4096);
        }
        assert_eq!(offset(Pattern::Sequential, &mut r, 103, 100, 512), 3 * 512);
    }

    #[test]
    fn rates_follow_from_requests_and_time() {
        let r = ReadResult {
            requests: 500,
            bs: 1 << 20,
            nanos: 2_000_000_000,
        };
        assert_eq!(r.iops(), 250.0);
        assert!((r.mbps() - 262.144).abs() < 1e-9);
    }

    #[test]
    fn reads_a_file_for_the_requested_count() {
        // O_DIRECT needs a file system that supports it; fall back to skipping on tmpfs.
        let dir = std::env::temp_dir().join(format!("guest-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("img");
        std::fs::File::create(&f)
            .unwrap()
            .write_all(&vec![0x5a; 1 << 20])
            .unwrap();
        let a = ReadArgs {
            dev: f.display().to_string(),
            bs: 4096,
            count: 50,
            millis: 10_000,
            pattern: Pattern::Random,
            span: 0,
            seed: 3,
            warmup: 2,
            qd: 1,
            buf: BufKind::Anon,
            phase: String::new(),
            account: String::new(),
        };
        match run(&a) {
            Ok(r) => {
                assert_eq!(r.requests, 50);
                assert!(r.nanos > 0);
            }
            Err(Error::Io(_, e)) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => panic!("{e}"),
        }
        for (qd, buf) in [(4, BufKind::Anon), (3, BufKind::Huge)] {
            let q = ReadArgs {
                qd,
                buf,
                ..a.clone()
            };
            match run_info(&q) {
                Ok((r, info)) => {
                    assert_eq!(
                        r.requests, 50,
                        "qd {qd}: the count is shared, not per thread"
                    );
                    assert!(["anon", "hugetlb", "thp"].contains(&info.buf));
                    assert_eq!(info.buf == "anon", buf == BufKind::Anon);
                }
                Err(Error::Io(_, e)) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => panic!("{e}"),
            }
        }
        let small = ReadArgs { bs: 2 << 20, ..a };
        assert!(matches!(
            run(&small),
            Err(Error::Size(_)) | Err(Error::Io(..))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
