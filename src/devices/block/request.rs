//! The backing file of a virtio-blk device and one request served against it: a chain's
//! descriptors split into the readable header and data and the writable data and status byte,
//! checked (direction, lengths, alignment, disk range), then carried out with bounded bounce
//! buffers. Generic over the guest memory, so behind the vIOMMU the same code runs on a
//! translated view.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_outhdr, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_dev::serve_queue;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::{BlockStats, ID_BYTES, MAX_REQUEST_BYTES, SECTOR_SIZE};
use crate::config::BlockConfig;
use crate::devices::virtio::{Buffers, ChainHandler, Desc, DeviceMemory};

/// `struct virtio_blk_outhdr`: type, ioprio, sector.
const HEADER_BYTES: u64 = std::mem::size_of::<virtio_blk_outhdr>() as u64;
const BOUNCE_BYTES: usize = 64 << 10;
/// Chains served under one pinned view behind the vIOMMU: one. A request may hold the view
/// through up to [`MAX_REQUEST_BYTES`] of file I/O, and an UNMAP waits for every holder of the
/// old view, so a pin covers a single request.
const CHAINS_PER_PIN: usize = 1;

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
    fn execute<M: GuestMemory + ?Sized>(&self, mem: &M, descs: &[Desc]) -> u32 {
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
        let (status, written) = match self.request(mem, &readable, &writable, data_in) {
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
                let mut buf = vec![0u8; (data_in as usize).min(BOUNCE_BYTES)];
                walk(writable, 0, data_in, |addr, n, done| {
                    let mut pos = 0u64;
                    while pos < n {
                        let chunk = (n - pos).min(buf.len() as u64) as usize;
                        self.file
                            .read_exact_at(&mut buf[..chunk], off + done + pos)?;
                        mem.write_slice(&buf[..chunk], at(addr, pos)?)?;
                        pos += chunk as u64;
                    }
                    Ok(())
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
                let mut buf = vec![0u8; (data_out as usize).min(BOUNCE_BYTES)];
                walk(readable, HEADER_BYTES, data_out, |addr, n, done| {
                    let mut pos = 0u64;
                    while pos < n {
                        let chunk = (n - pos).min(buf.len() as u64) as usize;
                        mem.read_slice(&mut buf[..chunk], at(addr, pos)?)?;
                        self.file.write_all_at(&buf[..chunk], off + done + pos)?;
                        pos += chunk as u64;
                    }
                    Ok(())
                })?;
                BlockStats::add(&self.stats.writes, 1);
                BlockStats::add(&self.stats.written_bytes, data_out);
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.readonly {
                    self.file.sync_data()?;
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
            self.serve_chain(q, chain, mem, &mut descs)
        });
        BlockStats::add(&self.stats.interrupts, u64::from(interrupt));
        interrupt
    }

    /// Serve `queue` after a kick through the device's memory (behind the vIOMMU: one pinned
    /// view per request, so each runs against one consistent view and an UNMAP completes only
    /// after it finished); `descs` is scratch kept between kicks. Returns true if the driver
    /// wants an interrupt.
    pub(super) fn serve(
        &self,
        mem: &DeviceMemory,
        queue: &mut Queue,
        descs: &mut Vec<Desc>,
    ) -> bool {
        BlockStats::add(&self.stats.kicks, 1);
        let mut requests = Requests {
            backend: self,
            descs,
        };
        let interrupt = mem.serve(queue, None, CHAINS_PER_PIN, &mut requests);
        BlockStats::add(&self.stats.interrupts, u64::from(interrupt));
        interrupt
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
        self.execute(mem, descs)
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
        self.backend.serve_chain(queue, chain, bufs, self.descs)
    }
}
