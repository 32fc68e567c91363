//! The timed O_DIRECT read loop.

use std::alloc::Layout;
use std::ffi::CString;

use crate::args::{Pattern, ReadArgs};
use crate::{now_ns, Error, XorShift};

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

/// A page-aligned heap buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

impl Aligned {
    fn new(len: usize) -> Result<Self, Error> {
        let layout = Layout::from_size_align(len, 4096)
            .map_err(|_| Error::Size(format!("bad buffer size {len}")))?;
        // SAFETY: `layout` has a non-zero size (bs >= 512 is checked by the parser).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::Size(format!("cannot allocate {len} bytes")));
        }
        Ok(Self { ptr, layout })
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
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

/// Open `a.dev` with O_DIRECT and time the reads; see [`crate::args::USAGE`].
pub fn run(a: &ReadArgs) -> Result<ReadResult, Error> {
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
    let buf = Aligned::new(len)?;
    let mut rng = XorShift::new(a.seed);
    let read_at = |off: u64| -> Result<(), Error> {
        // SAFETY: `buf` holds `len` writable bytes; `fd` is open for reading.
        let n = unsafe { libc::pread(fd.0, buf.ptr.cast(), len, off as libc::off_t) };
        if n < 0 {
            return Err(Error::Io(
                format!("pread {} at {off}", a.dev),
                std::io::Error::last_os_error(),
            ));
        }
        if n as usize != len {
            return Err(Error::Size(format!("short read at {off}: {n} of {len}")));
        }
        Ok(())
    };
    for i in 0..a.warmup {
        read_at(offset(a.pattern, &mut rng, i, blocks, a.bs))?;
    }
    let limit = a.millis.saturating_mul(1_000_000);
    let t0 = now_ns();
    let mut done = 0u64;
    let mut elapsed = 0u64;
    while done < a.count {
        read_at(offset(a.pattern, &mut rng, a.warmup + done, blocks, a.bs))?;
        done += 1;
        elapsed = now_ns().saturating_sub(t0);
        if elapsed >= limit {
            break;
        }
    }
    Ok(ReadResult {
        requests: done,
        bs: a.bs,
        nanos: elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
        };
        match run(&a) {
            Ok(r) => {
                assert_eq!(r.requests, 50);
                assert!(r.nanos > 0);
            }
            Err(Error::Io(_, e)) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => panic!("{e}"),
        }
        let small = ReadArgs { bs: 2 << 20, ..a };
        assert!(matches!(
            run(&small),
            Err(Error::Size(_)) | Err(Error::Io(..))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
