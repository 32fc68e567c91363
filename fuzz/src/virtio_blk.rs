//! Target (d): virtio-blk request handling (`vmm::devices::block::BlockBackend::process_queue`)
//! over a fuzzed split ring, either on guest-physical memory or behind the virtio-iommu
//! (`TranslatedMemory`, a few mappings, one read-only).
//!
//! Invariants checked: no panic; the disk never changes size; a read-only disk's content never
//! changes; behind the IOMMU, guest RAM that no writable mapping targets is never written.

use crate::{Enc, Input};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::OnceLock;
use viommu::TranslatedMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm::config::BlockConfig;
use vmm::devices::block::BlockBackend;

const MEM_SIZE: usize = 0x10_0000;
const DISK_BYTES: u64 = 64 * 1024;
/// Where the rings live (in the address space the device uses: GPA or IOVA).
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const DATA: u64 = 0x4000;
/// Behind the IOMMU: IOVA 0..0x40000 RW -> GPA 0x40000, IOVA 0x40000..0x48000 RO -> GPA 0x10000.
const MAPS: [(u64, u64, u64, u32); 2] =
    [(0, 0x4_0000, 0x4_0000, 3), (0x4_0000, 0x8000, 0x1_0000, 1)];
/// Guest RAM no writable mapping targets (must stay untouched behind the IOMMU).
const UNTOUCHED: [(u64, u64); 2] = [(0x1_0000, 0x8000), (0x2_0000, 0x2_0000)];
/// The virtio-iommu's own rings and buffers.
const IOMMU_RING: u64 = 0xe_0000;

/// Opcodes.
pub mod op {
    /// A well-formed request with fuzzed fields.
    pub const REQ: u8 = 0;
    /// Raw descriptor.
    pub const DESC: u8 = 1;
    /// Raw avail entry and index bump.
    pub const AVAIL: u8 = 2;
    /// Raw memory write.
    pub const MEM: u8 = 3;
    /// Process the queue.
    pub const KICK: u8 = 4;
    /// Number of opcodes.
    pub const COUNT: u8 = 5;
}

struct Disk {
    rw: BlockBackend,
    ro: BlockBackend,
    ro_path: PathBuf,
    ro_content: Vec<u8>,
}

fn disk() -> &'static Disk {
    static DISK: OnceLock<Disk> = OnceLock::new();
    DISK.get_or_init(|| {
        let dir = std::env::temp_dir();
        let pid = std::process::id();
        let mk = |name: &str| {
            let p = dir.join(format!("vmm-fuzz-blk-{pid}-{name}.img"));
            let mut f = std::fs::File::create(&p).expect("disk image");
            let content: Vec<u8> = (0..DISK_BYTES).map(|i| (i * 7 % 251) as u8).collect();
            f.write_all(&content).expect("disk image");
            p
        };
        let rw_path = mk("rw");
        let ro_path = mk("ro");
        let open = |p: &PathBuf, readonly| {
            let ro = if readonly { ",readonly=on" } else { "" };
            let cfg = BlockConfig::parse(&format!("path={}{ro}", p.display())).expect("config");
            BlockBackend::open(&cfg).expect("open disk")
        };
        let d = Disk {
            rw: open(&rw_path, false),
            ro: open(&ro_path, true),
            ro_content: std::fs::read(&ro_path).expect("read disk"),
            ro_path,
        };
        // The files stay open; unlink them so nothing is left behind.
        let _ = std::fs::remove_file(&rw_path);
        d
    })
}

struct Ring {
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    data_next: u64,
}

fn write_desc<M: GuestMemory>(m: &M, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let d = DESC + 16 * u64::from(idx);
    let _ = m.write_obj(addr.to_le(), GuestAddress(d));
    let _ = m.write_obj(len.to_le(), GuestAddress(d + 8));
    let _ = m.write_obj(flags.to_le(), GuestAddress(d + 12));
    let _ = m.write_obj(next.to_le(), GuestAddress(d + 14));
}

fn push_avail<M: GuestMemory>(m: &M, r: &mut Ring, head: u16, bump: u16) {
    let slot = AVAIL + 4 + 2 * u64::from(r.avail_idx % r.size);
    let _ = m.write_obj(head.to_le(), GuestAddress(slot));
    r.avail_idx = r.avail_idx.wrapping_add(bump);
    let _ = m.write_obj(r.avail_idx.to_le(), GuestAddress(AVAIL + 2));
}

fn alloc(r: &mut Ring, len: u64) -> u64 {
    let len = (len + 0xf) & !0xf;
    if r.data_next + len > 0x3_0000 {
        r.data_next = DATA;
    }
    let a = r.data_next;
    r.data_next += len;
    a
}

fn step<M: GuestMemory>(
    m: &M,
    q: &mut Queue,
    r: &mut Ring,
    backend: &BlockBackend,
    inp: &mut Input,
) {
    match inp.u8() % op::COUNT {
        op::REQ => {
            let t = match inp.u8() {
                s @ 0..=0x3f => u32::from(s % 3) * 4, // IN, FLUSH or GET_ID
                0x40..=0x9f => 1,
                0xa0..=0xdf => 0,
                _ => inp.u32(),
            };
            let sector = u64::from(inp.u8() % 160);
            let segs = usize::from(inp.u8() % 4);
            let seg_len = (u32::from(inp.u8() % 9) * 512).max(u32::from(inp.u8() % 2));
            let mangle = inp.u8();
            let mut hdr = [0u8; 16];
            hdr[..4].copy_from_slice(&t.to_le_bytes());
            hdr[8..].copy_from_slice(&sector.to_le_bytes());
            let h = alloc(r, 16);
            let _ = m.write_slice(&hdr, GuestAddress(h));
            let write_dir = t != 1;
            let mut bufs = vec![(h, if mangle & 1 != 0 { 8 } else { 16 }, false)];
            for _ in 0..segs {
                let a = alloc(r, u64::from(seg_len));
                bufs.push((a, seg_len, write_dir ^ (mangle & 2 != 0)));
            }
            if mangle & 4 == 0 {
                let s = alloc(r, 1);
                bufs.push((s, 1, true));
            }
            if mangle & 8 != 0 {
                // Point one buffer outside everything the device may reach.
                let i = usize::from(inp.u8()) % bufs.len();
                bufs[i].0 = inp.u64();
            }
            let head = r.next_desc;
            for (i, &(addr, len, w)) in bufs.iter().enumerate() {
                let idx = r.next_desc;
                r.next_desc = (r.next_desc + 1) % r.size;
                let mut flags = if w { 2 } else { 0 };
                let next = if i + 1 < bufs.len() {
                    flags |= 1;
                    r.next_desc
                } else {
                    0
                };
                write_desc(m, idx, addr, len, flags, next);
            }
            push_avail(m, r, head, 1);
        }
        op::DESC => {
            let idx = inp.u16() % 512;
            let addr = if inp.u8() & 1 == 0 {
                DATA + u64::from(inp.u16()) * 8
            } else {
                inp.u64()
            };
            let (len, flags, next) = (inp.u32(), inp.u16(), inp.u16());
            write_desc(m, idx, addr, len, flags, next);
        }
        op::AVAIL => {
            let head = inp.u16();
            let bump = u16::from(inp.u8());
            push_avail(m, r, head, bump);
        }
        op::MEM => {
            let addr = u64::from(inp.u32()) % 0x4_0000;
            let data = inp.blob(64);
            let _ = m.write_slice(data, GuestAddress(addr));
        }
        _ => {
            // An avail index more than the queue size ahead once made `process_queue` spin for
            // ever (seed avail-jump); it must now return without completing anything.
            let broken = avail_index_invalid(m, q);
            let used = q.next_used();
            backend.process_queue(q, m);
            assert!(
                !broken || q.next_used() == used,
                "used entries from a broken avail ring"
            );
        }
    }
}

/// Whether the driver's avail index is further ahead than the queue size (the device must
/// treat the queue as broken).
fn avail_index_invalid<M: GuestMemory>(m: &M, q: &Queue) -> bool {
    match m.read_obj::<u16>(GuestAddress(AVAIL + 2)) {
        Ok(idx) => u16::from_le(idx).wrapping_sub(q.next_avail()) > q.size(),
        Err(_) => false,
    }
}

/// Copy the RAM no writable mapping targets into `into` (buffers reused from input to input).
fn snapshot(mem: &GuestMemoryMmap, into: &mut Vec<Vec<u8>>) {
    into.resize_with(UNTOUCHED.len(), Vec::new);
    for (buf, &(a, l)) in into.iter_mut().zip(UNTOUCHED.iter()) {
        buf.resize(l as usize, 0);
        mem.read_slice(buf, GuestAddress(a)).expect("RAM");
    }
}

thread_local! {
    /// The snapshots before and after a run behind the IOMMU.
    static SNAPSHOTS: std::cell::RefCell<[Vec<Vec<u8>>; 2]> = const {
        std::cell::RefCell::new([Vec::new(), Vec::new()])
    };
}

/// Run one fuzz input.
pub fn run(data: &[u8]) {
    let d = disk();
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let backend = if mode & 1 == 0 { &d.rw } else { &d.ro };
    let behind_iommu = mode & 2 != 0;
    let size = match inp.u8() {
        0..=0x7f => 16,
        s => 1u16 << (s % 9),
    };
    let mem = crate::ram(&[(GuestAddress(0), MEM_SIZE)]);
    let mut q = Queue::new(256).expect("queue");
    q.set_size(size);
    let _ = q.try_set_desc_table_address(GuestAddress(DESC));
    let _ = q.try_set_avail_ring_address(GuestAddress(AVAIL));
    let _ = q.try_set_used_ring_address(GuestAddress(USED));
    q.set_ready(true);
    let mut r = Ring {
        size,
        next_desc: 0,
        avail_idx: 0,
        data_next: DATA,
    };
    let mut steps = 0;
    if behind_iommu {
        let (_iommu, ep) = crate::viommu_queue::program_endpoint(&mem, IOMMU_RING, 0x08, &MAPS);
        SNAPSHOTS.with(|s| snapshot(&mem, &mut s.borrow_mut()[0]));
        let tm = TranslatedMemory::new(mem.clone(), ep);
        while !inp.is_empty() && steps < 256 {
            step(&tm, &mut q, &mut r, backend, &mut inp);
            steps += 1;
        }
        SNAPSHOTS.with(|s| {
            let [before, after] = &mut *s.borrow_mut();
            snapshot(&mem, after);
            assert!(
                after == before,
                "device wrote RAM no writable mapping targets"
            );
        });
    } else {
        while !inp.is_empty() && steps < 256 {
            step(&mem, &mut q, &mut r, backend, &mut inp);
            steps += 1;
        }
    }
    assert_eq!(backend.sectors(), DISK_BYTES / 512);
    if mode & 1 != 0 {
        let mut f = std::fs::File::open(&d.ro_path).expect("ro disk");
        assert_eq!(f.seek(SeekFrom::End(0)).expect("seek"), DISK_BYTES);
        f.seek(SeekFrom::Start(0)).expect("seek");
        let mut now = Vec::new();
        f.read_to_end(&mut now).expect("read");
        assert!(now == d.ro_content, "read-only disk changed");
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, mode) in [("plain", 0u8), ("ro", 1), ("iommu", 2), ("iommu-ro", 3)] {
        let mut e = Enc::default();
        e.u8(mode).u8(0);
        // write 2 sectors at 4, read them back, flush, get id, bad type, short header.
        e.u8(op::REQ).u8(0x40).u8(4).u8(1).u8(2).u8(0).u8(0);
        e.u8(op::KICK);
        e.u8(op::REQ).u8(0xa0).u8(4).u8(1).u8(2).u8(0).u8(0);
        e.u8(op::REQ).u8(1).u8(0).u8(0).u8(0).u8(0).u8(0);
        e.u8(op::REQ).u8(2).u8(0).u8(1).u8(0).u8(1).u8(0);
        e.u8(op::KICK);
        e.u8(op::REQ).u8(0xff).u32(77).u8(0).u8(1).u8(1).u8(0).u8(0);
        e.u8(op::REQ).u8(0xa0).u8(159).u8(2).u8(8).u8(0).u8(1);
        e.u8(op::REQ)
            .u8(0xa0)
            .u8(0)
            .u8(1)
            .u8(1)
            .u8(0)
            .u8(8)
            .u8(0)
            .u64(0x4_2000);
        e.u8(op::KICK);
        e.u8(op::AVAIL).u16(300).u8(1);
        e.u8(op::KICK);
        out.push((name.to_string(), e.0));
    }
    // The avail index jumps 200 ahead of a 16-entry queue: `process_queue` must not spin.
    let mut e = Enc::default();
    e.u8(0).u8(0);
    e.u8(op::REQ).u8(0xa0).u8(0).u8(1).u8(1).u8(0).u8(0);
    e.u8(op::AVAIL).u16(0).u8(200);
    e.u8(op::KICK);
    out.push(("avail-jump".to_string(), e.0));
    out
}
