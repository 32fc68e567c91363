//! The transmit side of a virtio-net port, served on the kicking vCPU thread: each TX chain's
//! frame (what follows the header) joins a batch handed to the backend.

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Address, GuestMemory};

use super::stats::{bump, NetStats};
use super::{HDR_BYTES, MAX_FRAME_BYTES};
use crate::devices::virtio::{chain_descs, Buffers, ChainHandler, Desc};
use crate::net::NetBackend;

/// Frames read from a TX queue, handed to the backend together (one lock and one interrupt
/// on the receiving side per batch). Its buffers are kept between batches.
#[derive(Default)]
pub(super) struct TxBatch {
    data: Vec<u8>,
    /// End offset of each frame in `data`.
    ends: Vec<usize>,
}

impl TxBatch {
    /// Frames per batch.
    const MAX_FRAMES: usize = 64;
    /// Bytes per batch (a batch of full-size frames is cut short).
    const MAX_BYTES: usize = 256 << 10;

    fn full(&self) -> bool {
        self.ends.len() >= Self::MAX_FRAMES || self.data.len() >= Self::MAX_BYTES
    }

    /// Hand the frames to `backend` and start over.
    pub(super) fn flush(&mut self, backend: &dyn NetBackend) {
        if self.ends.is_empty() {
            return;
        }
        let mut frames = Vec::with_capacity(self.ends.len());
        let mut start = 0;
        for &end in &self.ends {
            frames.push(&self.data[start..end]);
            start = end;
        }
        backend.transmit_batch(&frames);
        self.data.clear();
        self.ends.clear();
    }
}

/// Serve one TX chain: its frame joins `batch` (sent when full); 0 is its used length.
fn tx_chain<M: Buffers>(
    mem: &M,
    descs: Option<&[Desc]>,
    batch: &mut TxBatch,
    backend: &dyn NetBackend,
    stats: &NetStats,
) -> u32 {
    if descs.is_some_and(|d| read_tx(mem, d, &mut batch.data)) {
        bump(&stats.tx_frames);
        batch.ends.push(batch.data.len());
        if batch.full() {
            batch.flush(backend);
        }
    } else {
        virtio_dev::guest_warn!("virtio-net: malformed or oversized TX chain dropped");
        bump(&stats.tx_errors);
    }
    0
}

/// Append a TX chain's frame (what follows the header) to `out`; false (and `out` as it
/// was) if the chain is malformed.
fn read_tx<M: Buffers>(mem: &M, descs: &[Desc], out: &mut Vec<u8>) -> bool {
    if descs.iter().any(|d| d.2) {
        return false;
    }
    let total: u64 = descs.iter().map(|d| u64::from(d.1)).sum();
    if total < HDR_BYTES as u64 || total - HDR_BYTES as u64 > MAX_FRAME_BYTES as u64 {
        return false;
    }
    let start = out.len();
    out.resize(start + (total - HDR_BYTES as u64) as usize, 0);
    let mut skip = HDR_BYTES;
    let mut off = start;
    for &(addr, len, _) in descs {
        let len = len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = len - skip;
        let ok = addr
            .checked_add(skip as u64)
            .is_some_and(|a| mem.read_buf(&mut out[off..off + n], a).is_ok());
        if !ok {
            out.truncate(start);
            return false;
        }
        skip = 0;
        off += n;
    }
    true
}

/// The TX queue's chains (the device's handler for the shared serve loop).
pub(super) struct TxChains<'a> {
    /// Frames read so far, sent when full and after the queue is drained.
    pub batch: &'a mut TxBatch,
    /// Where frames go.
    pub backend: &'a dyn NetBackend,
    /// The port's counters.
    pub stats: &'a NetStats,
    /// Scratch for one chain's descriptors.
    pub descs: &'a mut Vec<Desc>,
}

impl ChainHandler for TxChains<'_> {
    const DEVICE: &'static str = "virtio-net";

    #[inline]
    fn chain<R: GuestMemory, B: Buffers>(
        &mut self,
        queue: &Queue,
        chain: DescriptorChain<&R>,
        bufs: &B,
    ) -> u32 {
        let descs = chain_descs(queue, &chain, self.descs);
        tx_chain(bufs, descs, self.batch, self.backend, self.stats)
    }
}
