//! The backing file of a virtio-blk device and one request served against it: a chain's
//! descriptors split into the readable header and data and the writable data and status byte,
//! checked (direction, lengths, alignment, disk range), then carried out with bounded bounce
//! buffers. Generic over the guest memory, so behind the vIOMMU the same code runs on a
//! translated view.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_outhdr, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_dev::serve_queue;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};

use super::{BlockStats, ID_BYTES, MAX_REQUEST_BYTES, SECTOR_SIZE};
use crate::config::BlockConfig;
use crate::devices::virtio::{Buffers, ChainHandler, Desc, DeviceMemory, Served};

/// `struct virtio_blk_outhdr`: type, ioprio, sector.
const HEADER_BYTES: u64 = std::mem::size_of::<virtio_blk_outhdr>() as u64;
/// Chains served under one pinned view behind the vIOMMU: one. A request may hold the view
/// through up to [`MAX_REQUEST_BYTES`] of file I/O, and an UNMAP waits for every holder of the
/// old view, so a pin covers a single request.
const CHAINS_PER_PIN: usize = 1;

/// Runs blocking work that touches no guest memory (a flush of the file): behind the vIOMMU
/// outside the round's view ([`Buffers::outside`]), so that an UNMAP past the pin deadline
/// need not wait for it.
type Outside<'a> = &'a dyn Fn(&mut dyn FnMut());

/// Most iovecs per preadv/pwritev call (Linux's IOV_MAX).
const MAX_IOVECS: usize = 1024;

/// One descriptor of a chain, copied out of guest memory.
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: GuestAddress,
    len: u64,
}

/// Why a request failed (turned into a status byte).
#[derive(Debug, thiserror::Error)]
enum ReqError {
    #[error("chain has no writable status byte")]
    NoStatus,
    #[error("readable descriptor after a writable one")]
    WrongDirection,
    #[error("header shorter than 16 bytes")]
    ShortHeader,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("request of {0} bytes is too large")]
    TooLarge(u64),
    #[error("sector {0} + {1} bytes is past the end of the disk")]
    OutOfRange(u64, u64),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("backend I/O: {0}")]
    Io(#[from] io::Error),
    #[error("descriptor chain too long")]
    ChainTooLong,
}

/// The file behind a virtio-blk device and the request logic (no queue or thread state).
pub struct BlockBackend {
    file: File,
    sectors: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
    stats: Arc<BlockStats>,
    /// Tests: called between taking a read's or write's guest slices and the file I/O (a slow
    /// backend).
    #[cfg(test)]
    pub(super) before_transfer: Option<Box<dyn Fn() + Send + Sync>>,
}

/// `addr + off`, failing (instead of wrapping) past the end of the address space.
fn at(addr: GuestAddress, off: u64) -> Result<GuestAddress, ReqError> {
    addr.checked_add(off).ok_or(ReqError::Memory(
        vm_memory::GuestMemoryError::InvalidGuestAddress(addr),
    ))
}

/// Advance through `segs` skipping `skip` bytes, then call `f` on pieces covering `len` bytes.
fn walk<F>(segs: &[Seg], mut skip: u64, mut len: u64, mut f: F) -> Result<(), ReqError>
where
    F: FnMut(GuestAddress, u64, u64) -> Result<(), ReqError>,
{
    let mut done = 0u64;
    for s in segs {
        if len == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(len);
        let addr = at(s.addr, skip)?;
        f(addr, n, done)?;
        done += n;
        len -= n;
        skip = 0;
    }
    Ok(())
}

/// Whether a vectored transfer reads the file into guest memory or writes guest memory to it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// preadv: file -> guest.
    FileToGuest,
    /// pwritev: guest -> file.
    GuestToFile,
}

/// Run `io` on the guest memory behind `len` bytes of `segs` after `skip`, as host slices
/// (translated through the vIOMMU for a translated memory; each slice inside one RAM region),
/// checked for the access `dir` needs. Fails as an access through `mem` would (a fault behind a
/// vIOMMU). The slice iterators stay alive until `io` returns: behind the vIOMMU each holds
/// its view's gate open (an access in progress), so a removal of access that outlives the pin
/// deadline still waits for the file I/O writing or reading through the old translation
/// instead of completing under it (see `viommu::View`).
fn with_guest_slices<M, F>(
    mem: &M,
    segs: &[Seg],
    skip: u64,
    len: u64,
    dir: Dir,
    io: F,
) -> Result<(), ReqError>
where
    M: GuestMemory + ?Sized,
    F: FnOnce(&[VolatileSlice<'_, vm_memory::bitmap::BS<'_, M::Bitmap>>]) -> Result<(), ReqError>,
{
    let access = match dir {
        Dir::FileToGuest => Permissions::Write,
        Dir::GuestToFile => Permissions::Read,
    };
    let mut held = Vec::new();
    let mut out = Vec::new();
    walk(segs, skip, len, |addr, n, _| {
        let n = usize::try_from(n).map_err(|_| ReqError::TooLarge(n))?;
        let mut got = 0usize;
        let mut slices = mem.get_slices(addr, n, access)?;
        for s in slices.by_ref() {
            let s = s?;
            got += s.len();
            out.push(s);
        }
        held.push(slices);
        if got != n {
            return Err(ReqError::Memory(
                vm_memory::GuestMemoryError::InvalidGuestAddress(addr),
            ));
        }
        Ok(())
    })?;
    let r = io(&out);
    drop(out);
    drop(held);
    r
}

/// Transfer between the file at `off` and guest memory `slices`, in order, with one
/// preadv/pwritev per [`MAX_IOVECS`] slices (more only after a short transfer).
fn transfer_vectored<B: BitmapSlice>(
    file: &File,
    slices: &[VolatileSlice<'_, B>],
    off: u64,
    dir: Dir,
) -> Result<(), ReqError> {
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iovs: Vec<libc::iovec> = guards
        .iter()
        .zip(slices)
        .filter(|(_, s)| !s.is_empty())
        .map(|(g, s)| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect();
    let mut idx = 0usize;
    let mut pos = off;
    while idx < iovs.len() {
        let end = (idx + MAX_IOVECS).min(iovs.len());
        let off = libc::off_t::try_from(pos).map_err(|_| ReqError::OutOfRange(pos, 0))?;
        let cnt = (end - idx) as libc::c_int;
        // SAFETY: every iovec points into a guest RAM slice returned by `get_slices` (valid
        // for its length for as long as `guards` and `slices` live, which outlast the call);
        // the kernel writes (preadv) or reads (pwritev) at most `iov_len` bytes of each.
        let n = unsafe {
            match dir {
                Dir::FileToGuest => libc::preadv(file.as_raw_fd(), iovs[idx..].as_ptr(), cnt, off),
                Dir::GuestToFile => libc::pwritev(file.as_raw_fd(), iovs[idx..].as_ptr(), cnt, off),
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        let mut n = n as usize;
        pos += n as u64;
        // Step over what was transferred (a short transfer ends inside an iovec).
        while n > 0 && idx < iovs.len() {
            let l = iovs[idx].iov_len;
            if n >= l {
                n -= l;
                idx += 1;
            } else {
                // SAFETY: `n < iov_len`: the new base stays inside the same slice.
                iovs[idx].iov_base = unsafe { iovs[idx].iov_base.cast::<u8>().add(n) }.cast();
                iovs[idx].iov_len = l - n;
                n = 0;
            }
        }
    }
    if dir == Dir::FileToGuest {
        for s in slices {
            s.bitmap().mark_dirty(0, s.len());
        }
    }
    Ok(())
}

impl BlockBackend {
    /// Open the backing file of `cfg`.
    pub fn open(cfg: &BlockConfig) -> io::Result<BlockBackend> {
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.readonly)
            .open(&cfg.path)?;
        // Seek to the end rather than stat: block devices report a length of 0.
        let len = (&file).seek(SeekFrom::End(0))?;
        let mut id = [0u8; ID_BYTES];
        let name = cfg
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(ID_BYTES);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(BlockBackend {
            file,
            sectors: len / SECTOR_SIZE,
            readonly: cfg.readonly,
            id,
            stats: Arc::default(),
            #[cfg(test)]
            before_transfer: None,
        })
    }

    /// What this disk did so far.
    pub fn stats(&self) -> &Arc<BlockStats> {
        &self.stats
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Process one chain (given as its descriptors); returns the used length.
    fn execute<M: GuestMemory + ?Sized>(&self, mem: &M, descs: &[Desc], outside: Outside) -> u32 {
        let stats = &*self.stats;
        BlockStats::add(&stats.requests, 1);
        BlockStats::add(&stats.descriptors, descs.len() as u64);
        // Data segments: every descriptor but the header's and the status byte's.
        BlockStats::add(&stats.segments, descs.len().saturating_sub(2) as u64);
        // Split into the readable prefix and the writable suffix.
        let first_w = descs.iter().position(|d| d.2).unwrap_or(descs.len());
        let segs = |ds: &[Desc]| -> Vec<Seg> {
            ds.iter()
                .map(|d| Seg {
                    addr: d.0,
                    len: d.1.into(),
                })
                .collect()
        };
        let readable = segs(&descs[..first_w]);
        let writable = segs(&descs[first_w..]);
        let wrong_dir = descs[first_w..].iter().any(|d| !d.2);
        // The status byte is the last byte of the last descriptor, if it is writable.
        let status_addr = match descs.last() {
            Some(&(addr, len, true)) if len > 0 && !wrong_dir => {
                addr.checked_add(u64::from(len) - 1)
            }
            _ => None,
        };
        let Some(status_addr) = status_addr else {
            BlockStats::add(&stats.errors, 1);
            virtio_dev::guest_warn!(
                "virtio-blk: {}",
                if wrong_dir {
                    ReqError::WrongDirection
                } else {
                    ReqError::NoStatus
                }
            );
            return 0;
        };
        let w_total: u64 = writable.iter().map(|s| s.len).sum();
        let data_in = w_total - 1; // bytes before the status byte
        let (status, written) = match self.request(mem, &readable, &writable, data_in, outside) {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(ReqError::Unsupported(t)) => {
                BlockStats::add(&stats.errors, 1);
                log::debug!("virtio-blk: unsupported request type {t}");
                (VIRTIO_BLK_S_UNSUPP as u8, 0)
            }
            Err(e) => {
                BlockStats::add(&stats.errors, 1);
                virtio_dev::guest_warn!("virtio-blk: request failed: {e}");
                (VIRTIO_BLK_S_IOERR as u8, 0)
            }
        };
        match mem.write_obj(status, status_addr) {
            Ok(()) => (written + 1) as u32,
            Err(e) => {
                virtio_dev::guest_warn!("virtio-blk: cannot write status byte: {e}");
                0
            }
        }
    }

    /// Carry out a request; returns the number of data bytes written to the guest.
    fn request<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        readable: &[Seg],
        writable: &[Seg],
        data_in: u64,
        outside: Outside,
    ) -> Result<u64, ReqError> {
        let r_total: u64 = readable.iter().map(|s| s.len).sum();
        if r_total < HEADER_BYTES {
            return Err(ReqError::ShortHeader);
        }
        let mut hdr = [0u8; HEADER_BYTES as usize];
        walk(readable, 0, HEADER_BYTES, |a, n, off| {
            mem.read_slice(&mut hdr[off as usize..(off + n) as usize], a)?;
            Ok(())
        })?;
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let data_out = r_total - HEADER_BYTES;
        match req_type {
            VIRTIO_BLK_T_IN => {
                let off = self.check_range(sector, data_in)?;
                // Straight into guest memory, the whole chain in one preadv.
                with_guest_slices(mem, writable, 0, data_in, Dir::FileToGuest, |slices| {
                    self.slow_backend();
                    transfer_vectored(&self.file, slices, off, Dir::FileToGuest)
                })?;
                BlockStats::add(&self.stats.reads, 1);
                BlockStats::add(&self.stats.read_bytes, data_in);
                Ok(data_in)
            }
            VIRTIO_BLK_T_OUT => {
                if self.readonly {
                    return Err(ReqError::ReadOnly);
                }
                let off = self.check_range(sector, data_out)?;
                let dir = Dir::GuestToFile;
                with_guest_slices(mem, readable, HEADER_BYTES, data_out, dir, |slices| {
                    self.slow_backend();
                    transfer_vectored(&self.file, slices, off, dir)
                })?;
                BlockStats::add(&self.stats.writes, 1);
                BlockStats::add(&self.stats.written_bytes, data_out);
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.readonly {
                    let mut r = Ok(());
                    outside(&mut || r = self.file.sync_data());
                    r?;
                }
                BlockStats::add(&self.stats.flushes, 1);
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = data_in.min(ID_BYTES as u64);
                walk(writable, 0, n, |addr, len, done| {
                    mem.write_slice(&self.id[done as usize..(done + len) as usize], addr)?;
                    Ok(())
                })?;
                Ok(n)
            }
            t => Err(ReqError::Unsupported(t)),
        }
    }

    /// Tests: the slow backend hook (see `before_transfer`).
    #[inline]
    fn slow_backend(&self) {
        #[cfg(test)]
        if let Some(f) = &self.before_transfer {
            f();
        }
    }

    /// Byte offset of `sector` after checking `len` bytes fit on the disk.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, ReqError> {
        if len & (SECTOR_SIZE - 1) != 0 {
            return Err(ReqError::Unaligned(len));
        }
        if len > MAX_REQUEST_BYTES {
            return Err(ReqError::TooLarge(len));
        }
        sector
            .checked_add(len / SECTOR_SIZE)
            .filter(|&end| end <= self.sectors)
            .ok_or(ReqError::OutOfRange(sector, len))?;
        // sector < self.sectors, so this cannot overflow.
        Ok(sector * SECTOR_SIZE)
    }

    /// Pop and serve every available chain of `queue` through `mem`; returns true if the
    /// driver wants an interrupt for the completions.
    pub fn process_queue<M: GuestMemory>(&self, queue: &mut Queue, mem: &M) -> bool {
        BlockStats::add(&self.stats.kicks, 1);
        let mut descs = Vec::new();
        let interrupt = serve_queue(queue, mem, "virtio-blk", |q, chain| {
            self.serve_chain(q, chain, mem, &mut descs, &|f| f())
        });
        BlockStats::add(&self.stats.interrupts, u64::from(interrupt));
        interrupt
    }

    /// Serve `queue` after a kick through the device's memory (behind the vIOMMU: one pinned
    /// view per request, so each runs against one consistent view and an UNMAP completes only
    /// after it finished), at most one round of the queue's size: a driver refilling the
    /// queue as fast as it is served cannot keep one notification (a vCPU exit, inline) busy
    /// for ever; `more` in the result says the rest waits for the next call. `descs` is
    /// scratch kept between kicks.
    pub(super) fn serve(
        &self,
        mem: &DeviceMemory,
        queue: &mut Queue,
        descs: &mut Vec<Desc>,
    ) -> Served {
        BlockStats::add(&self.stats.kicks, 1);
        let mut requests = Requests {
            backend: self,
            descs,
        };
        let budget = usize::from(queue.size());
        let served = mem.serve(queue, None, CHAINS_PER_PIN, budget, &mut requests);
        BlockStats::add(&self.stats.interrupts, u64::from(served.interrupt));
        served
    }

    /// Serve one chain of `queue`: its descriptors (at most twice the queue size; a longer
    /// chain loops or is hostile) read through the chain's memory, the request carried out
    /// against `mem`. Returns the used length; `descs` is scratch kept between chains.
    fn serve_chain<R: GuestMemory, M: GuestMemory>(
        &self,
        queue: &Queue,
        chain: DescriptorChain<&R>,
        mem: &M,
        descs: &mut Vec<Desc>,
        outside: Outside,
    ) -> u32 {
        let max = usize::from(queue.size()).max(1) * 2;
        descs.clear();
        for d in chain {
            if descs.len() >= max {
                BlockStats::add(&self.stats.requests, 1);
                BlockStats::add(&self.stats.errors, 1);
                virtio_dev::guest_warn!("virtio-blk: {}", ReqError::ChainTooLong);
                return 0;
            }
            descs.push((d.addr(), d.len(), d.is_write_only()));
        }
        self.execute(mem, descs, outside)
    }
}

/// The requests of a queue, served by a backend (its handler for the shared serve loop).
struct Requests<'a> {
    backend: &'a BlockBackend,
    descs: &'a mut Vec<Desc>,
}

impl ChainHandler for Requests<'_> {
    const DEVICE: &'static str = "virtio-blk";

    #[inline]
    fn chain<R: GuestMemory, B: Buffers>(
        &mut self,
        queue: &Queue,
        chain: DescriptorChain<&R>,
        bufs: &B,
    ) -> u32 {
        self.backend
            .serve_chain(queue, chain, bufs, self.descs, &|f| bufs.outside(f))
    }
}

#[cfg(test)]
mod vectored_tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn file_with(data: &[u8]) -> (std::path::PathBuf, File) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "vmm-blk-vec-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::write(&p, data).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        (p, f)
    }

    #[test]
    fn more_slices_than_one_call_takes_land_in_order_both_ways() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let data: Vec<u8> = (0..1500 * 8u32).map(|i| (i * 7 + i / 8) as u8).collect();
        let (path, file) = file_with(&data);
        // 1500 8-byte segments 16 bytes apart: more iovecs than one preadv takes.
        let segs: Vec<Seg> = (0..1500u64)
            .map(|i| Seg {
                addr: GuestAddress(0x1000 + i * 16),
                len: 8,
            })
            .collect();
        let total = 1500 * 8;
        with_guest_slices(&m, &segs, 0, total, Dir::FileToGuest, |slices| {
            assert_eq!(slices.len(), 1500);
            transfer_vectored(&file, slices, 0, Dir::FileToGuest)
        })
        .unwrap();
        for (i, s) in segs.iter().enumerate() {
            let mut got = [0u8; 8];
            m.read_slice(&mut got, s.addr).unwrap();
            assert_eq!(got, data[i * 8..i * 8 + 8], "segment {i}");
        }
        // Back out to the file, after the header-like skip of 4 bytes, at offset 100.
        with_guest_slices(&m, &segs, 4, total - 4, Dir::GuestToFile, |slices| {
            transfer_vectored(&file, slices, 100, Dir::GuestToFile)
        })
        .unwrap();
        let after = std::fs::read(&path).unwrap();
        assert_eq!(
            after[100..100 + total as usize - 4],
            data[4..total as usize]
        );
        assert_eq!(after[..100], data[..100]);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_file_shorter_than_the_request_is_an_error_not_a_hang() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let (path, file) = file_with(&[0xab; 1000]);
        let segs = [Seg {
            addr: GuestAddress(0x100),
            len: 4096,
        }];
        let r = with_guest_slices(&m, &segs, 0, 4096, Dir::FileToGuest, |slices| {
            transfer_vectored(&file, slices, 0, Dir::FileToGuest)
        });
        assert!(matches!(
            r,
            Err(ReqError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof
        ));
        // What was there arrived.
        let mut got = [0u8; 1000];
        m.read_slice(&mut got, GuestAddress(0x100)).unwrap();
        assert!(got.iter().all(|&b| b == 0xab));
        // Memory outside guest RAM is refused before any I/O.
        let past = [Seg {
            addr: GuestAddress(0xf000),
            len: 0x2000,
        }];
        let mut ran = false;
        let r = with_guest_slices(&m, &past, 0, 0x2000, Dir::FileToGuest, |_| {
            ran = true;
            Ok(())
        });
        assert!(r.is_err() && !ran, "no I/O on memory outside guest RAM");
        std::fs::remove_file(&path).unwrap();
    }
}
