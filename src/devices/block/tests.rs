//! virtio-blk: requests on guest-physical memory, the device (features, config space, inline
//! and worker serving), and everything behind the vIOMMU.

use super::*;
use crate::config::BlockConfig;
use crate::devices::test_iommu::{push_chain, MockIommu, NoIrq};
use crate::devices::virtio::DeviceMemory;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use viommu::{EndpointHandle, TranslatedMemory};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_dev::{QueueConfig, VirtioDevice, VirtioInterrupt};
use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::EventFd;

const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Status bytes.
const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Feature bit `b` as a mask.
fn bit(b: u32) -> u64 {
    1 << b
}

struct Disk {
    path: PathBuf,
}
impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn disk(sectors: u64) -> Disk {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "vmm-blk-{}-{}.img",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let data: Vec<u8> = (0..sectors * SECTOR_SIZE)
        .map(|i| (i / 512) as u8 ^ (i as u8))
        .collect();
    std::fs::write(&path, data).unwrap();
    Disk { path }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn header(mem: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
    mem.write_obj(t, GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDesc::new(addr, len, flags, 0))
}

/// Put `descs` (chained in order) on a fresh queue, process it, return (used len, status).
fn run(
    backend: &BlockBackend,
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
    status_at: u64,
) -> (u32, u8) {
    let vq = MockSplitQueue::create(mem, GuestAddress(0), 16);
    let chained: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let s = SplitDesc::from(*r);
            let last = i == descs.len() - 1;
            let flags = if last {
                s.flags() & !F_NEXT
            } else {
                s.flags() | F_NEXT
            };
            RawDescriptor::from(SplitDesc::new(s.addr().0, s.len(), flags, i as u16 + 1))
        })
        .collect();
    vq.add_desc_chains(&chained, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    mem.write_obj(0xeeu8, GuestAddress(status_at)).unwrap();
    backend.process_queue(&mut q, mem);
    assert_eq!(q.next_used(), 1, "chain must be completed");
    let used_len: u32 = mem.read_obj(vq.used_addr().unchecked_add(4 + 4)).unwrap();
    (used_len, mem.read_obj(GuestAddress(status_at)).unwrap())
}

fn backend(sectors: u64, readonly: bool) -> (Disk, BlockBackend) {
    let dk = disk(sectors);
    let b = BlockBackend::open(&BlockConfig {
        path: dk.path.clone(),
        readonly,
        iommu: false,
        inline: false,
        indirect: true,
    })
    .unwrap();
    (dk, b)
}

#[test]
fn read_returns_file_contents() {
    let (dk, b) = backend(8, false);
    let m = mem();
    header(&m, 0x1000, VIRTIO_BLK_T_IN, 2);
    let (len, st) = run(
        &b,
        &m,
        &[
            d(0x1000, 16, 0),
            d(0x2000, 1024, F_WRITE),
            d(0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!((len, st), (1025, S_OK));
    let mut got = vec![0u8; 1024];
    m.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
    let file = std::fs::read(&dk.path).unwrap();
    assert_eq!(got, file[1024..2048]);
}

#[test]
fn read_scattered_over_descriptors_with_status_in_data_desc() {
    let (dk, b) = backend(8, false);
    let m = mem();
    header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    // 512 bytes split 100 + 412, status byte at the end of the second descriptor.
    let (len, st) = run(
        &b,
        &m,
        &[
            d(0x1000, 16, 0),
            d(0x2000, 100, F_WRITE),
            d(0x4000, 413, F_WRITE),
        ],
        0x4000 + 412,
    );
    assert_eq!((len, st), (513, S_OK));
    let file = std::fs::read(&dk.path).unwrap();
    let mut a = vec![0u8; 100];
    m.read_slice(&mut a, GuestAddress(0x2000)).unwrap();
    let mut bb = vec![0u8; 412];
    m.read_slice(&mut bb, GuestAddress(0x4000)).unwrap();
    assert_eq!(a, file[..100]);
    assert_eq!(bb, file[100..512]);
}

#[test]
fn write_lands_in_file_and_flush_succeeds() {
    let (dk, b) = backend(8, false);
    let m = mem();
    header(&m, 0x1000, VIRTIO_BLK_T_OUT, 3);
    m.write_slice(&[0xabu8; 512], GuestAddress(0x2000)).unwrap();
    let (len, st) = run(
        &b,
        &m,
        &[d(0x1000, 16, 0), d(0x2000, 512, 0), d(0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!((len, st), (1, S_OK));
    let file = std::fs::read(&dk.path).unwrap();
    assert!(file[3 * 512..4 * 512].iter().all(|&x| x == 0xab));
    assert_ne!(file[2 * 512 + 5], 0xab);

    header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
    let (len, st) = run(&b, &m, &[d(0x1000, 16, 0), d(0x3000, 1, F_WRITE)], 0x3000);
    assert_eq!((len, st), (1, S_OK));
}

#[test]
fn readonly_disk_refuses_writes() {
    let (dk, b) = backend(8, true);
    let m = mem();
    header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
    let (_, st) = run(
        &b,
        &m,
        &[d(0x1000, 16, 0), d(0x2000, 512, 0), d(0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, S_IOERR);
    let file = std::fs::read(&dk.path).unwrap();
    assert_eq!(file[0], 0);
}

#[test]
fn get_id_returns_file_name() {
    let (dk, b) = backend(1, false);
    let m = mem();
    header(&m, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
    let (len, st) = run(
        &b,
        &m,
        &[
            d(0x1000, 16, 0),
            d(0x2000, 20, F_WRITE),
            d(0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!((len, st), (21, S_OK));
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(0x2000)).unwrap();
    let name = dk.path.file_name().unwrap().to_string_lossy().into_owned();
    let n = name.len().min(20);
    assert_eq!(&id[..n], &name.as_bytes()[..n]);
}

#[test]
fn stats_count_requests_descriptors_segments_bytes_and_errors() {
    let (_dk, b) = backend(8, false);
    let m = mem();
    header(&m, 0x1000, VIRTIO_BLK_T_IN, 2);
    let read = [
        d(0x1000, 16, 0),
        d(0x2000, 512, F_WRITE),
        d(0x2200, 512, F_WRITE),
        d(0x3000, 1, F_WRITE),
    ];
    assert_eq!(run(&b, &m, &read, 0x3000).1, S_OK);
    header(&m, 0x1000, VIRTIO_BLK_T_OUT, 3);
    let write = [d(0x1000, 16, 0), d(0x2000, 512, 0), d(0x3000, 1, F_WRITE)];
    assert_eq!(run(&b, &m, &write, 0x3000).1, S_OK);
    header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
    let flush = [d(0x1000, 16, 0), d(0x3000, 1, F_WRITE)];
    assert_eq!(run(&b, &m, &flush, 0x3000).1, S_OK);
    // Out of range: an error status.
    header(&m, 0x1000, VIRTIO_BLK_T_IN, 100);
    assert_eq!(run(&b, &m, &read, 0x3000).1, S_IOERR);
    let s = b.stats().snapshot();
    assert_eq!(
        s,
        BlockStatsSnapshot {
            kicks: 4,
            requests: 4,
            reads: 1,
            writes: 1,
            flushes: 1,
            descriptors: 4 + 3 + 2 + 4,
            segments: 2 + 1 + 2,
            read_bytes: 1024,
            written_bytes: 512,
            interrupts: s.interrupts,
            errors: 1,
        }
    );
    // Each run completed one chain on a queue whose driver did not suppress interrupts.
    assert_eq!(s.interrupts, 4);
    assert!(s
        .summary_line("d0")
        .starts_with("blk: disk=d0 kicks=4 requests=4 reads=1 writes=1 flushes=1"));
}

#[test]
fn bad_chains_get_error_status_and_never_panic() {
    let (_dk, b) = backend(8, false);
    let m = mem();
    // Past the end of the disk.
    header(&m, 0x1000, VIRTIO_BLK_T_IN, 8);
    let (_, st) = run(
        &b,
        &m,
        &[
            d(0x1000, 16, 0),
            d(0x2000, 512, F_WRITE),
            d(0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!(st, S_IOERR);
    // Sector overflow.
    header(&m, 0x1000, VIRTIO_BLK_T_IN, u64::MAX);
    let (_, st) = run(
        &b,
        &m,
        &[
            d(0x1000, 16, 0),
            d(0x2000, 512, F_WRITE),
            d(0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!(st, S_IOERR);
    // Short header.
    header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    let (_, st) = run(&b, &m, &[d(0x1000, 8, 0), d(0x3000, 1, F_WRITE)], 0x3000);
    assert_eq!(st, S_IOERR);
    // Unknown type.
    header(&m, 0x1000, 99, 0);
    let (_, st) = run(&b, &m, &[d(0x1000, 16, 0), d(0x3000, 1, F_WRITE)], 0x3000);
    assert_eq!(st, S_UNSUPP);
    // Unaligned length.
    header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    let (_, st) = run(
        &b,
        &m,
        &[
            d(0x1000, 16, 0),
            d(0x2000, 100, F_WRITE),
            d(0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!(st, S_IOERR);
    // Oversized request (descriptor lengths beyond the limit, addresses outside RAM).
    header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    let (_, st) = run(
        &b,
        &m,
        &[
            d(0x1000, 16, 0),
            d(0x2000, 0x7fff_fe00, F_WRITE),
            d(0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!(st, S_IOERR);
    // Data buffer outside guest memory.
    header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    let (_, st) = run(
        &b,
        &m,
        &[
            d(0x1000, 16, 0),
            d(0x8000_0000, 512, F_WRITE),
            d(0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!(st, S_IOERR);
    // Header outside guest memory.
    let (_, st) = run(
        &b,
        &m,
        &[d(0x9000_0000, 16, 0), d(0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, S_IOERR);
    // Missing status byte: last descriptor readable -> used len 0, memory untouched.
    header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    let (len, st) = run(&b, &m, &[d(0x1000, 16, 0), d(0x3000, 1, 0)], 0x3000);
    assert_eq!((len, st), (0, 0xee));
    // Readable after writable (wrong direction).
    let (len, st) = run(
        &b,
        &m,
        &[d(0x1000, 16, 0), d(0x2000, 512, F_WRITE), d(0x3000, 1, 0)],
        0x3000,
    );
    assert_eq!((len, st), (0, 0xee));
    // The device still works afterwards.
    header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    let (_, st) = run(
        &b,
        &m,
        &[
            d(0x1000, 16, 0),
            d(0x2000, 512, F_WRITE),
            d(0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!(st, S_OK);
}

#[test]
fn avail_index_beyond_queue_size_does_not_hang() {
    // A hostile driver publishes avail.idx far ahead of what the ring can hold: nothing can
    // be popped, yet "more is available" stays true. Processing must return, not spin.
    let (_dk, b) = backend(8, false);
    let m = mem();
    let vq = MockSplitQueue::create(&m, GuestAddress(0), 16);
    let mut q: Queue = vq.create_queue().unwrap();
    m.write_obj(0x4000u16, vq.avail_addr().unchecked_add(2))
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = b.process_queue(&mut q, &m);
        let _ = tx.send((r, q.next_used()));
    });
    let (interrupt, used) = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("process_queue spun on an out-of-range avail index");
    assert!(!interrupt);
    assert_eq!(used, 0);
}

#[test]
fn no_interrupt_when_driver_suppresses_it() {
    let (_dk, b) = backend(8, false);
    let m = mem();
    let vq = MockSplitQueue::create(&m, GuestAddress(0), 16);
    header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
    vq.add_desc_chains(
        &[
            d(0x1000, 16, F_NEXT),
            RawDescriptor::from(SplitDesc::new(0x3000, 1, F_WRITE, 0)),
        ],
        0,
    )
    .unwrap();
    // Fix the next index of the first descriptor.
    vq.desc_table()
        .store(
            0,
            RawDescriptor::from(SplitDesc::new(0x1000, 16, F_NEXT, 1)),
        )
        .unwrap();
    // VRING_AVAIL_F_NO_INTERRUPT.
    m.write_obj(1u16, vq.avail_addr()).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(!b.process_queue(&mut q, &m));
    assert_eq!(q.next_used(), 1);
    // Without the flag the same work asks for an interrupt.
    let vq = MockSplitQueue::create(&m, GuestAddress(0x8000), 16);
    vq.add_desc_chains(
        &[
            RawDescriptor::from(SplitDesc::new(0x1000, 16, F_NEXT, 1)),
            RawDescriptor::from(SplitDesc::new(0x3000, 1, F_WRITE, 0)),
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(b.process_queue(&mut q, &m));
    // EVENT_IDX: used_event far ahead -> no interrupt; used_event 0 -> interrupt.
    for (used_event, want) in [(5u16, false), (0u16, true)] {
        let vq = MockSplitQueue::create(&m, GuestAddress(0x8000), 16);
        vq.add_desc_chains(
            &[
                RawDescriptor::from(SplitDesc::new(0x1000, 16, F_NEXT, 1)),
                RawDescriptor::from(SplitDesc::new(0x3000, 1, F_WRITE, 0)),
            ],
            0,
        )
        .unwrap();
        m.write_obj(used_event, vq.avail_addr().unchecked_add(4 + 2 * 16))
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_event_idx(true);
        assert_eq!(b.process_queue(&mut q, &m), want, "used_event {used_event}");
        assert_eq!(q.next_used(), 1);
    }
}

#[test]
fn features_and_config_space() {
    let dk = disk(16);
    let blk = Block::new(BlockConfig {
        path: dk.path.clone(),
        readonly: true,
        iommu: true,
        inline: false,
        indirect: false,
    })
    .unwrap();
    let f = blk.device_features();
    assert_ne!(f & bit(VIRTIO_F_VERSION_1), 0);
    assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
    assert_ne!(f & bit(VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(f & bit(VIRTIO_F_ACCESS_PLATFORM), 0);
    assert_eq!(
        f & bit(VIRTIO_RING_F_INDIRECT_DESC),
        0,
        "no indirect tables behind the IOMMU"
    );
    let mut cap = [0u8; 8];
    blk.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 16);
    let mut bs = [0u8; 4];
    blk.read_config(20, &mut bs);
    assert_eq!(u32::from_le_bytes(bs), 512);
    let mut far = [0xffu8; 4];
    blk.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
    let rw = Block::new(BlockConfig {
        path: dk.path.clone(),
        readonly: false,
        iommu: false,
        inline: false,
        indirect: true,
    })
    .unwrap();
    assert_eq!(
        rw.device_features() & (bit(VIRTIO_BLK_F_RO) | bit(VIRTIO_F_ACCESS_PLATFORM)),
        0
    );
    assert_ne!(rw.device_features() & bit(VIRTIO_RING_F_INDIRECT_DESC), 0);
}

struct CountingInterrupt(AtomicUsize);
impl VirtioInterrupt for CountingInterrupt {
    fn signal_queue(&self, _queue: u16) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn signal_config(&self) {}
}

/// Activate a device on a mock queue holding one flush request; returns what the caller
/// needs to drive and observe it.
fn activated(
    inline: bool,
) -> (
    Disk,
    Block,
    GuestMemoryAtomic<GuestMemoryMmap>,
    Arc<CountingInterrupt>,
    EventFd,
) {
    let dk = disk(8);
    let mut blk = Block::new(BlockConfig {
        path: dk.path.clone(),
        readonly: false,
        iommu: false,
        inline,
        indirect: true,
    })
    .unwrap();
    let gm = GuestMemoryAtomic::new(mem());
    let g = gm.memory();
    let vq = MockSplitQueue::create(&*g, GuestAddress(0), 16);
    header(&g, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
    g.write_obj(0xeeu8, GuestAddress(0x3000)).unwrap();
    vq.add_desc_chains(
        &[
            RawDescriptor::from(SplitDesc::new(0x1000, 16, F_NEXT, 1)),
            RawDescriptor::from(SplitDesc::new(0x3000, 1, F_WRITE, 0)),
        ],
        0,
    )
    .unwrap();
    let qc = QueueConfig {
        size: 16,
        desc_table: vq.desc_table_addr(),
        avail_ring: vq.avail_addr(),
        used_ring: vq.used_addr(),
        ready: true,
    };
    let irq = Arc::new(CountingInterrupt(AtomicUsize::new(0)));
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    blk.activate(
        gm.clone(),
        bit(VIRTIO_F_VERSION_1),
        vec![qc],
        vec![kick.try_clone().unwrap()],
        irq.clone(),
    )
    .unwrap();
    drop(g);
    (dk, blk, gm, irq, kick)
}

fn status(gm: &GuestMemoryAtomic<GuestMemoryMmap>) -> u8 {
    gm.memory().read_obj(GuestAddress(0x3000)).unwrap()
}

#[test]
fn worker_thread_serves_kicks_and_stops_on_reset() {
    let (_dk, mut blk, gm, irq, kick) = activated(false);
    assert!(!blk.inline_notify());
    kick.write(1).unwrap();
    let start = std::time::Instant::now();
    while irq.0.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "no completion"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(status(&gm), S_OK);
    blk.reset();
    assert!(!blk.has_worker(), "reset joins the worker");
}

#[test]
fn inline_mode_serves_on_queue_notify() {
    let (_dk, mut blk, gm, irq, _kick) = activated(true);
    assert!(blk.inline_notify());
    assert!(!blk.has_worker(), "no worker thread in inline mode");
    blk.queue_notify(7); // absent queue: ignored
    assert_eq!(status(&gm), 0xee);
    blk.queue_notify(0);
    assert_eq!(status(&gm), S_OK);
    assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    blk.reset();
    blk.queue_notify(0); // after reset: nothing to serve, no panic
    assert_eq!(irq.0.load(Ordering::SeqCst), 1);
}

/// Eight 512-byte reads (QD8) queued before one kick, inline and on the worker thread, with
/// and without EVENT_IDX: one kick serves the whole batch and raises one interrupt; with
/// EVENT_IDX the driver's used_event decides (asked for after the first completion: one
/// interrupt; asked for after one beyond the batch: none until then).
#[test]
fn a_qd8_batch_is_served_by_one_kick_with_one_interrupt() {
    use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    for (inline, event_idx, used_event, want_irqs) in [
        (true, true, 0u16, 1usize),
        (false, true, 0, 1),
        (true, false, 0, 1),
        (false, false, 0, 1),
        (true, true, 8, 0),
        (false, true, 8, 0),
    ] {
        let what = format!("inline {inline} event_idx {event_idx} used_event {used_event}");
        let dk = disk(64);
        let mut blk = Block::new(BlockConfig {
            path: dk.path.clone(),
            readonly: false,
            iommu: false,
            inline,
            indirect: false,
        })
        .unwrap();
        let gm = GuestMemoryAtomic::new(mem());
        let g = gm.memory();
        let vq = MockSplitQueue::create(&*g, GuestAddress(0), 32);
        let mut descs = Vec::new();
        for i in 0..8u64 {
            let (hdr, data, st) = (0x1000 + i * 0x20, 0x4000 + i * 0x200, 0x3000 + i);
            header(&g, hdr, VIRTIO_BLK_T_IN, i);
            g.write_obj(0xeeu8, GuestAddress(st)).unwrap();
            let n = descs.len() as u16;
            descs.push(RawDescriptor::from(SplitDesc::new(hdr, 16, F_NEXT, n + 1)));
            descs.push(RawDescriptor::from(SplitDesc::new(
                data,
                512,
                F_NEXT | F_WRITE,
                n + 2,
            )));
            descs.push(RawDescriptor::from(SplitDesc::new(st, 1, F_WRITE, 0)));
        }
        // Three descriptors per chain.
        for (c, chain) in descs.chunks(3).enumerate() {
            vq.add_desc_chains(chain, (c * 3) as u16).unwrap();
        }
        // used_event follows the available ring's entries; the mock's used ring would overlap
        // it (the mock has no EVENT_IDX words), so the queue's used ring goes elsewhere.
        let used_ring = GuestAddress(0x800);
        g.write_obj(used_event, vq.avail_addr().unchecked_add(4 + 2 * 32))
            .unwrap();
        let qc = QueueConfig {
            size: 32,
            desc_table: vq.desc_table_addr(),
            avail_ring: vq.avail_addr(),
            used_ring,
            ready: true,
        };
        let irq = Arc::new(CountingInterrupt(AtomicUsize::new(0)));
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut features = bit(VIRTIO_F_VERSION_1);
        if event_idx {
            features |= bit(VIRTIO_RING_F_EVENT_IDX);
        }
        blk.activate(
            gm.clone(),
            features,
            vec![qc],
            vec![kick.try_clone().unwrap()],
            irq.clone(),
        )
        .unwrap();
        if inline {
            blk.queue_notify(0);
        } else {
            kick.write(1).unwrap();
        }
        let start = std::time::Instant::now();
        while blk.stats().snapshot().requests < 8 {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "{what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Let the worker finish its batch (the interrupt comes after the last completion).
        std::thread::sleep(std::time::Duration::from_millis(20));
        let s = blk.stats().snapshot();
        assert_eq!((s.kicks, s.reads), (1, 8), "{what}");
        assert_eq!(irq.0.load(Ordering::SeqCst), want_irqs, "{what}");
        assert_eq!(s.interrupts as usize, want_irqs, "{what}");
        for i in 0..8u64 {
            assert_eq!(
                g.read_obj::<u8>(GuestAddress(0x3000 + i)).unwrap(),
                S_OK,
                "{what}"
            );
        }
        let used: u16 = g.read_obj(used_ring.unchecked_add(2)).unwrap();
        assert_eq!(used, 8, "{what}");
        if event_idx {
            // Notifications are on again: avail_event names the next entry the driver adds,
            // so its next chain makes it kick (no lost wakeup).
            let avail_event: u16 = g.read_obj(used_ring.unchecked_add(4 + 8 * 32)).unwrap();
            assert_eq!(avail_event, 8, "{what}");
        }
        blk.reset();
    }
}

// ---- Behind the vIOMMU: every access translated through an endpoint. ----

const MAP_R: u32 = 1;
const MAP_W: u32 = 2;
const EP: u32 = 0x10;
/// Where the mock virtio-iommu keeps its queues and buffers (up to 0x8_7000).
const IOMMU_BASE: u64 = 0x8_0000;

fn big_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
}

/// A virtio-iommu over `m` whose endpoint `EP` is attached to domain 1 with `maps` (iova,
/// size, gpa, MAP flags), all sent through its request queue like a driver would; four
/// fault buffers are posted on its event queue (the first at `IOMMU_BASE + 0x6000`).
fn iommu_with(
    m: &GuestMemoryMmap,
    maps: &[(u64, u64, u64, u32)],
) -> (viommu::Viommu, EndpointHandle) {
    let (mut io, eps) = MockIommu::new(m, IOMMU_BASE, &[EP]);
    io.attach(1, EP);
    for &(iova, size, gpa, flags) in maps {
        io.map(1, iova, size, gpa, flags);
    }
    let ep = eps[0].clone();
    (io.dev, ep)
}

/// Rings identity-mapped (IOVA 0..0x1000 -> GPA 0), the request header at IOVA 0x5000_1000
/// (read-only, GPA 0x1000), the data buffer at IOVA 0x6000_0000 (write-only, GPA 0x2000) and
/// a read-only window at IOVA 0x6100_0000 (GPA 0x4000), the status at IOVA 0x7000_0000
/// (GPA 0x3000).
const MAPS: [(u64, u64, u64, u32); 5] = [
    (0, 0x1000, 0, MAP_R | MAP_W),
    (0x5000_1000, 0x1000, 0x1000, MAP_R),
    (0x6000_0000, 0x1000, 0x2000, MAP_W),
    (0x6100_0000, 0x1000, 0x4000, MAP_R),
    (0x7000_0000, 0x1000, 0x3000, MAP_W),
];

/// Serve one read request whose descriptors use `data_iova`/`status_iova` through the
/// endpoint; returns (used len, status byte at GPA 0x3000).
fn translated_read(
    b: &BlockBackend,
    m: &GuestMemoryMmap,
    ep: &EndpointHandle,
    data_iova: u64,
    status_iova: u64,
) -> (u32, u8) {
    header(m, 0x1000, VIRTIO_BLK_T_IN, 2);
    m.write_obj(0xeeu8, GuestAddress(0x3000)).unwrap();
    let vq = MockSplitQueue::create(m, GuestAddress(0), 16);
    push_chain(
        &vq,
        0,
        &[
            (0x5000_1000, 16, false),
            (data_iova, 1024, true),
            (status_iova, 1, true),
        ],
    );
    let mut q: Queue = vq.create_queue().unwrap();
    let tm = DeviceMemory::Translated(Box::new(TranslatedMemory::new(m.clone(), ep.clone())));
    b.serve(&tm, &mut q, &mut Vec::new());
    assert_eq!(q.next_used(), 1, "chain must be completed");
    let used_len: u32 = m.read_obj(vq.used_addr().unchecked_add(8)).unwrap();
    (used_len, m.read_obj(GuestAddress(0x3000)).unwrap())
}

#[test]
fn translated_read_lands_at_the_mapped_gpa() {
    let (dk, b) = backend(8, false);
    let m = big_mem();
    let (iommu, ep) = iommu_with(&m, &MAPS);
    let (len, st) = translated_read(&b, &m, &ep, 0x6000_0000, 0x7000_0000);
    assert_eq!((len, st), (1025, S_OK));
    let mut got = vec![0u8; 1024];
    m.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
    let file = std::fs::read(&dk.path).unwrap();
    assert_eq!(got, file[1024..2048]);
    // Identity addresses are not mapped: nothing was written at GPA 0x6000_0000's
    // identity (outside RAM anyway) and no fault was raised.
    assert_eq!(iommu.counters().snapshot().faults, 0);
}

#[test]
fn translation_miss_fails_the_request_and_raises_a_fault() {
    let (_dk, b) = backend(8, false);
    let m = big_mem();
    let (iommu, ep) = iommu_with(&m, &MAPS);
    // Data buffer at an unmapped IOVA: IOERR, a fault, and RAM behind the IOVA's numeric
    // value (GPA 0x8000, inside RAM) untouched.
    m.write_slice(&[0x5a; 1024], GuestAddress(0x8000)).unwrap();
    let (len, st) = translated_read(&b, &m, &ep, 0x8000, 0x7000_0000);
    assert_eq!((len, st), (1, S_IOERR));
    let mut after = [0u8; 1024];
    m.read_slice(&mut after, GuestAddress(0x8000)).unwrap();
    assert!(after.iter().all(|&x| x == 0x5a), "identity GPA written");
    let s = iommu.counters().snapshot();
    assert!(s.faults >= 1, "{s:?}");
    assert!(s.faults_delivered >= 1, "fault on the event queue: {s:?}");
    // The fault record names the endpoint and the address (first event buffer).
    let rec = MockIommu::event_buf_at(IOMMU_BASE, 0);
    let reason: u8 = m.read_obj(GuestAddress(rec)).unwrap();
    let endpoint: u32 = m.read_obj(GuestAddress(rec + 8)).unwrap();
    let addr: u64 = m.read_obj(GuestAddress(rec + 16)).unwrap();
    assert_eq!(
        (reason, endpoint, addr),
        (2, EP, 0x8000),
        "R_MAPPING record"
    );

    // Device write into a read-only mapping: refused the same way.
    let before = iommu.counters().snapshot().faults;
    let (len, st) = translated_read(&b, &m, &ep, 0x6100_0000, 0x7000_0000);
    assert_eq!((len, st), (1, S_IOERR));
    assert!(iommu.counters().snapshot().faults > before);

    // Status byte unmapped: nothing can be reported, used length 0.
    let (len, st) = translated_read(&b, &m, &ep, 0x6000_0000, 0x7100_0000);
    assert_eq!((len, st), (0, 0xee));

    // And the device keeps working.
    let (len, st) = translated_read(&b, &m, &ep, 0x6000_0000, 0x7000_0000);
    assert_eq!((len, st), (1025, S_OK));
}

#[test]
fn iommu_disk_activates_only_with_access_platform_and_translates_inline() {
    let dk = disk(8);
    let m = big_mem();
    let (_iommu, ep) = iommu_with(&m, &MAPS);
    let cfg = BlockConfig {
        path: dk.path.clone(),
        readonly: false,
        iommu: true,
        inline: true,
        indirect: false,
    };
    let vq = MockSplitQueue::create(&m, GuestAddress(0), 16);
    let qc = QueueConfig {
        size: 16,
        desc_table: vq.desc_table_addr(),
        avail_ring: vq.avail_addr(),
        used_ring: vq.used_addr(),
        ready: true,
    };
    let gm = GuestMemoryAtomic::new(m.clone());
    let kick = || vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()];
    let irq = Arc::new(CountingInterrupt(AtomicUsize::new(0)));
    // No endpoint: cannot activate an iommu=on disk.
    let mut lone = Block::new(cfg.clone()).unwrap();
    let feats = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_ACCESS_PLATFORM);
    assert!(lone
        .activate(gm.clone(), feats, vec![qc], kick(), irq.clone())
        .is_err());
    // Driver without ACCESS_PLATFORM: refused.
    let mut blk = Block::with_endpoint(cfg, Some(ep)).unwrap();
    assert!(blk
        .activate(
            gm.clone(),
            bit(VIRTIO_F_VERSION_1),
            vec![qc],
            kick(),
            irq.clone()
        )
        .is_err());
    blk.activate(gm, feats, vec![qc], kick(), irq.clone())
        .unwrap();
    header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    m.write_obj(0xeeu8, GuestAddress(0x3000)).unwrap();
    push_chain(
        &vq,
        0,
        &[
            (0x5000_1000, 16, false),
            (0x6000_0000, 512, true),
            (0x7000_0000, 1, true),
        ],
    );
    blk.queue_notify(0);
    let st: u8 = m.read_obj(GuestAddress(0x3000)).unwrap();
    assert_eq!(st, S_OK);
    let mut got = vec![0u8; 512];
    m.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
    assert_eq!(got, std::fs::read(&dk.path).unwrap()[..512]);
    assert_eq!(irq.0.load(Ordering::SeqCst), 1);
}

#[test]
fn rings_are_reached_through_the_iommu_too() {
    let dk = disk(8);
    let m = big_mem();
    // Everything but the ring mapping: the rings' IOVAs miss, activation is refused.
    let (iommu, ep) = iommu_with(&m, &MAPS[1..]);
    let vq = MockSplitQueue::create(&m, GuestAddress(0), 16);
    let qc = QueueConfig {
        size: 16,
        desc_table: vq.desc_table_addr(),
        avail_ring: vq.avail_addr(),
        used_ring: vq.used_addr(),
        ready: true,
    };
    let mut blk = Block::with_endpoint(
        BlockConfig {
            path: dk.path.clone(),
            readonly: false,
            iommu: true,
            inline: true,
            indirect: false,
        },
        Some(ep),
    )
    .unwrap();
    let r = blk.activate(
        GuestMemoryAtomic::new(m.clone()),
        bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_ACCESS_PLATFORM),
        vec![qc],
        vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
        Arc::new(NoIrq),
    );
    assert!(r.is_err());
    assert!(iommu.counters().snapshot().faults >= 1);
}

/// Issue 16: a read whose file I/O is slow (longer than the pin deadline) while the guest
/// UNMAPs its data buffer. The request writes straight into the guest slices it translated
/// (preadv), so the UNMAP may complete only once that write is over: otherwise the device
/// writes through a translation the guest saw removed, into memory it may already reuse.
#[test]
fn unmap_waits_for_a_read_in_its_file_io_past_the_pin_deadline() {
    use std::time::{Duration, Instant};
    let (dk, mut b) = backend(8, false);
    let want = std::fs::read(&dk.path).unwrap()[1024..2048].to_vec();
    let m = big_mem();
    let (mut io, eps) = MockIommu::new(&m, IOMMU_BASE, &[EP]);
    io.attach(1, EP);
    for &(iova, size, gpa, flags) in &MAPS {
        io.map(1, iova, size, gpa, flags);
    }
    io.dev.set_pin_deadline(Duration::from_millis(100));
    let (in_io, in_io_rx) = std::sync::mpsc::channel();
    let in_io = std::sync::Mutex::new(in_io);
    b.before_transfer = Some(Box::new(move || {
        let _ = in_io.lock().unwrap().send(());
        // The file I/O takes longer than the pin deadline.
        std::thread::sleep(Duration::from_millis(600));
    }));
    let ep = eps[0].clone();
    std::thread::scope(|s| {
        let (b, m) = (&b, &m);
        let reader = s.spawn(move || translated_read(b, m, &ep, 0x6000_0000, 0x7000_0000));
        in_io_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the read reached its file I/O");
        let t0 = Instant::now();
        io.unmap(1, 0x6000_0000, 0x1000);
        let took = t0.elapsed();
        // What the buffer holds when the guest sees the UNMAP complete: the device may not
        // write it any more from here on, so the read's data must already be there.
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        let (len, st) = reader.join().unwrap();
        assert!(
            got == want,
            "UNMAP completed after {took:?} before the read finished writing the buffer \
             through the old translation"
        );
        // It ran against the view it started with.
        assert_eq!((len, st), (1025, S_OK));
    });
}

/// What [`refilled_inline_disk`] sets up.
type Refilled = (
    Disk,
    Block,
    GuestMemoryAtomic<GuestMemoryMmap>,
    Arc<CountingInterrupt>,
    GuestAddress,
    Arc<std::sync::Mutex<Vec<String>>>,
    QueueConfig,
);

/// Reads posted as head 0 over and over on a 16-entry queue at 0: the driver refills the
/// queue from inside each request's file I/O (as a guest on another vCPU keeps it topped
/// up), `total` requests in all. Returns the device (inline, activated), its memory, its
/// interrupts, the used ring's address and the names of the threads that served each request.
fn refilled_inline_disk(total: u16) -> Refilled {
    let dk = disk(8);
    let mut blk = Block::new(BlockConfig {
        path: dk.path.clone(),
        readonly: false,
        iommu: false,
        inline: true,
        indirect: true,
    })
    .unwrap();
    let gm = GuestMemoryAtomic::new(mem());
    let g = gm.memory();
    // Rings apart from each other (the mock queue packs the used ring into the available
    // ring's used_event and padding, which a refill past entry 8 would overwrite).
    let (table, avail, used) = (GuestAddress(0), GuestAddress(0x400), GuestAddress(0x800));
    header(&g, 0x1000, VIRTIO_BLK_T_IN, 0);
    for (i, (addr, len, flags)) in [
        (0x1000u64, 16u32, F_NEXT),
        (0x2000, 512, F_WRITE | F_NEXT),
        (0x3000, 1, F_WRITE),
    ]
    .into_iter()
    .enumerate()
    {
        let next = i as u16 + 1;
        let raw = RawDescriptor::from(SplitDesc::new(addr, len, flags, next));
        g.write_obj(raw, table.unchecked_add(16 * i as u64))
            .unwrap();
    }
    // avail.ring[0] = head 0, avail.idx = 1.
    g.write_obj(0u16, avail.unchecked_add(4)).unwrap();
    g.write_obj(1u16, avail.unchecked_add(2)).unwrap();
    let ram = (*g).clone();
    let posted = Arc::new(AtomicUsize::new(1));
    let served_by = Arc::new(std::sync::Mutex::new(Vec::new()));
    let by = served_by.clone();
    blk.set_before_transfer(Box::new(move || {
        let name = std::thread::current().name().unwrap_or("").to_string();
        by.lock().unwrap().push(name);
        let n = posted.load(Ordering::SeqCst);
        if n < usize::from(total) {
            // avail.ring[n % 16] = head 0, then avail.idx = n + 1.
            let slot = avail.unchecked_add(4 + 2 * (n as u64 % 16));
            ram.write_obj(0u16, slot).unwrap();
            ram.write_obj((n + 1) as u16, avail.unchecked_add(2))
                .unwrap();
            posted.store(n + 1, Ordering::SeqCst);
        }
    }));
    let qc = QueueConfig {
        size: 16,
        desc_table: table,
        avail_ring: avail,
        used_ring: used,
        ready: true,
    };
    drop(g);
    let irq = Arc::new(CountingInterrupt(AtomicUsize::new(0)));
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    blk.activate(
        gm.clone(),
        bit(VIRTIO_F_VERSION_1),
        vec![qc],
        vec![kick],
        irq.clone(),
    )
    .unwrap();
    (dk, blk, gm, irq, used, served_by, qc)
}

fn used_index(gm: &GuestMemoryAtomic<GuestMemoryMmap>, used: GuestAddress) -> u16 {
    gm.memory().read_obj(used.unchecked_add(2)).unwrap()
}

/// Issue 16: an inline disk's notification (a vCPU exit) serves one round of the queue's
/// size, not until the queue is empty while the driver keeps refilling it; the rest is
/// reported pending and served by the next calls, none lost, each call signalling what it
/// completed.
#[test]
fn an_inline_notification_serves_one_round_while_the_driver_refills() {
    let (_dk, mut blk, gm, irq, used, _, _) = refilled_inline_disk(100);
    blk.queue_notify(0);
    assert_eq!(
        used_index(&gm, used),
        16,
        "one notification served more than one round of the queue"
    );
    assert!(blk.queue_pending(0), "the rest is reported pending");
    assert_eq!(
        irq.0.load(Ordering::SeqCst),
        1,
        "the round's completions signalled"
    );
    let mut calls = 1;
    while blk.queue_pending(0) {
        blk.queue_notify(0);
        calls += 1;
        assert!(calls <= 20, "pending never cleared");
    }
    assert_eq!(used_index(&gm, used), 100);
    assert_eq!(calls, 7, "100 requests in rounds of 16");
    assert_eq!(status(&gm), S_OK);
    assert!(irq.0.load(Ordering::SeqCst) >= 7);
    // Nothing left: a further notification serves nothing and leaves nothing pending.
    blk.queue_notify(0);
    assert!(!blk.queue_pending(0));
    assert_eq!(used_index(&gm, used), 100);
}

/// In the VMM an inline disk is wrapped in `Polled::continuing`: the kicking thread serves
/// one round, the continuation thread the rest, without another notification.
#[test]
fn the_continuation_thread_serves_what_an_inline_notification_left() {
    use crate::devices::polled::Polled;
    let (_dk, blk, gm, irq, used, served_by, qc) = refilled_inline_disk(100);
    // Re-activate through the wrapper (it starts its thread on activation).
    let mut p = Polled::continuing(Box::new(blk));
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    p.activate(
        gm.clone(),
        bit(VIRTIO_F_VERSION_1),
        vec![qc],
        vec![kick],
        irq.clone(),
    )
    .unwrap();
    let me = std::thread::current().name().unwrap_or("").to_string();
    p.queue_notify(0);
    let on_notify = served_by
        .lock()
        .unwrap()
        .iter()
        .filter(|n| **n == me)
        .count();
    assert!(
        on_notify <= 16,
        "the notification served {on_notify} requests"
    );
    let start = std::time::Instant::now();
    while used_index(&gm, used) != 100 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "stalled at {} of 100: a notification was lost",
            used_index(&gm, used)
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let by = served_by.lock().unwrap();
    assert_eq!(by.len(), 100);
    assert_eq!(by.iter().filter(|n| **n == me).count(), on_notify);
    assert!(
        by.iter().any(|n| n == "vq-poll"),
        "served by the continuation"
    );
    drop(by);
    p.reset();
}
