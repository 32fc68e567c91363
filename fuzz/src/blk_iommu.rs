//! Target: virtio-blk behind the virtio-iommu, end to end: a `vmm::devices::block::Block`
//! activated like a transport would (`iommu=on`, inline notify) and a real `Viommu` driven by
//! the viommu `MockDriver`, sharing one guest memory. The input interleaves blk requests
//! (well-formed and mangled, buffers in any IOVA window), kicks, raw descriptors and avail
//! bumps, guest CPU writes, and MAP / UNMAP of the IOVA windows (data windows, and the rings'
//! own window) with any access, and re-activation.
//!
//! Invariants checked: guest RAM behind a window that is not device-writable (unmapped or
//! read-only) never changes except by the guest's own writes; a request the device completed
//! with status OK had every buffer mapped with the access it needed when it was kicked (no DMA
//! through a stale or read-only mapping); a read returning OK returned the disk's bytes; a
//! read-only disk never changes. At the end, with every window mapped again, a write and a
//! read of the same sectors round-trip.

use crate::Input;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use viommu::test_utils::{MockDriver, MockLayout, NoInterrupt, QueueLayout};
use viommu::{Status, Viommu, ViommuConfig};
use virtio_dev::{QueueConfig, VirtioDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm::config::BlockConfig;
use vmm::devices::block::Block;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: usize = 0x10_0000;
const DISK_BYTES: u64 = 64 * 1024;
const EP: u32 = 0x10;
const DOMAIN: u32 = 1;
/// Windows: 4 data windows and the rings' window (index 4), IOVA -> GPA, 16 KiB each.
const WINDOWS: usize = 5;
const RING_WIN: usize = 4;
const WIN_SIZE: u64 = 0x4000;
const QSIZE: u16 = 16;

fn win_iova(i: usize) -> u64 {
    0x40_0000 + i as u64 * 0x10_0000
}

fn win_gpa(i: usize) -> u64 {
    0x2_0000 + i as u64 * WIN_SIZE
}

/// Rings inside the ring window (offsets).
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

const READ: u32 = 1;
const WRITE: u32 = 2;

struct Disks {
    rw: PathBuf,
    ro: PathBuf,
    ro_content: Vec<u8>,
}

fn disks() -> &'static Disks {
    static D: OnceLock<Disks> = OnceLock::new();
    D.get_or_init(|| {
        let dir = std::env::temp_dir();
        let pid = std::process::id();
        let content: Vec<u8> = (0..DISK_BYTES).map(|i| (i * 13 % 251) as u8).collect();
        let mk = |name: &str| {
            let p = dir.join(format!("vmm-fuzz-blkiommu-{pid}-{name}.img"));
            std::fs::File::create(&p)
                .and_then(|mut f| f.write_all(&content))
                .expect("disk image");
            p
        };
        Disks {
            rw: mk("rw"),
            ro: mk("ro"),
            ro_content: content.clone(),
        }
    })
}

/// A request waiting for its kick: what it needs of each window, and where its status and
/// data are.
struct Pending {
    /// (window, access) the request needs.
    needs: Vec<(usize, u32)>,
    /// GPA of the status byte (None: not in a window).
    status: Option<u64>,
    /// For a read: sector and (GPA, len) of its data.
    read: Option<(u64, Vec<(u64, u32)>)>,
    out: bool,
}

struct Harness {
    mem: GuestMemoryMmap,
    iommu: Viommu,
    drv: MockDriver,
    blk: Block,
    path: PathBuf,
    readonly: bool,
    /// Access each window is mapped with (0: none, or unmapped).
    access: [u32; WINDOWS],
    /// Which windows are mapped (maybe with no access).
    mapped: [bool; WINDOWS],
    /// Expected content of windows the device may not write.
    frozen: [Option<Vec<u8>>; WINDOWS],
    /// Next free byte in each data window.
    next: [u64; WINDOWS],
    next_desc: u16,
    avail_idx: u16,
    pending: Option<Vec<Pending>>,
    /// Descriptors published since the device last drained the queue.
    outstanding: usize,
    /// A published chain may be left unserved (rings unmapped, broken avail index): exact
    /// checks stop until the next activation.
    stale: bool,
    active: bool,
}

fn window_of(gpa: u64) -> Option<usize> {
    (0..WINDOWS).find(|&i| gpa >= win_gpa(i) && gpa - win_gpa(i) < WIN_SIZE)
}

impl Harness {
    fn new(readonly: bool) -> Self {
        let mem = crate::ram(&[(GuestAddress(0), MEM_SIZE)]);
        let mut iommu = Viommu::new(ViommuConfig {
            queue_size: QSIZE,
            bypass: false,
            ..Default::default()
        })
        .expect("config");
        let ep = iommu.add_endpoint(EP).expect("endpoint");
        let base = 0xe_0000;
        let layout = MockLayout {
            request: QueueLayout::packed(base, QSIZE),
            event: QueueLayout::packed(base + 0x3000, QSIZE),
            buffers: base + 0x6000..base + 0x6400,
        };
        let mut drv = MockDriver::new(mem.clone(), layout).expect("driver");
        drv.activate_offered(&mut iommu, Arc::new(NoInterrupt))
            .expect("activate");
        assert_eq!(
            drv.attach(&mut iommu, DOMAIN, EP).expect("attach"),
            Status::Ok
        );
        let d = disks();
        let path = if readonly { d.ro.clone() } else { d.rw.clone() };
        let ro = if readonly { ",readonly=on" } else { "" };
        let cfg = BlockConfig::parse(&format!("path={},iommu=on{ro}", path.display()))
            .expect("disk config");
        let blk = Block::with_endpoint(cfg, Some(ep)).expect("open disk");
        Harness {
            mem,
            iommu,
            drv,
            blk,
            path,
            readonly,
            access: [0; WINDOWS],
            mapped: [false; WINDOWS],
            frozen: Default::default(),
            next: [0; WINDOWS],
            next_desc: 0,
            avail_idx: 0,
            pending: None,
            outstanding: 0,
            stale: false,
            active: false,
        }
    }

    /// The guest CPU writes `data` at `gpa` (kept in the frozen copies).
    fn cpu_write(&mut self, gpa: u64, data: &[u8]) {
        let _ = self.mem.write_slice(data, GuestAddress(gpa));
        for i in 0..WINDOWS {
            if let Some(copy) = &mut self.frozen[i] {
                let (ws, we) = (win_gpa(i), win_gpa(i) + WIN_SIZE);
                for (k, &b) in data.iter().enumerate() {
                    let a = gpa + k as u64;
                    if a >= ws && a < we {
                        copy[(a - ws) as usize] = b;
                    }
                }
            }
        }
    }

    fn snapshot(&self, i: usize) -> Vec<u8> {
        let mut v = vec![0u8; WIN_SIZE as usize];
        self.mem
            .read_slice(&mut v, GuestAddress(win_gpa(i)))
            .expect("RAM");
        v
    }

    fn set_access(&mut self, i: usize, access: u32) {
        self.access[i] = access;
        self.frozen[i] = if access & WRITE == 0 {
            Some(self.snapshot(i))
        } else {
            None
        };
    }

    fn map(&mut self, i: usize, flags: u32) {
        let st = self
            .drv
            .map(
                &mut self.iommu,
                DOMAIN,
                win_iova(i),
                WIN_SIZE,
                win_gpa(i),
                flags,
            )
            .expect("MAP request");
        if st == Status::Ok {
            assert!(!self.mapped[i], "MAP over a mapped window accepted");
            self.mapped[i] = true;
            self.set_access(i, flags & 3);
        }
    }

    fn unmap(&mut self, i: usize) {
        let st = self
            .drv
            .unmap(&mut self.iommu, DOMAIN, win_iova(i), WIN_SIZE)
            .expect("UNMAP request");
        assert_eq!(st, Status::Ok, "UNMAP of window {i}");
        self.mapped[i] = false;
        self.set_access(i, 0);
    }

    fn activate(&mut self, features: u64) {
        self.blk.reset();
        let ring = win_gpa(RING_WIN);
        self.cpu_write(ring, &[0u8; 0x3000]);
        self.next_desc = 0;
        self.avail_idx = 0;
        let qc = QueueConfig {
            size: QSIZE,
            desc_table: GuestAddress(win_iova(RING_WIN) + DESC),
            avail_ring: GuestAddress(win_iova(RING_WIN) + AVAIL),
            used_ring: GuestAddress(win_iova(RING_WIN) + USED),
            ready: true,
        };
        let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        self.active = self
            .blk
            .activate(
                GuestMemoryAtomic::new(self.mem.clone()),
                features,
                vec![qc],
                vec![kick],
                Arc::new(NoInterrupt),
            )
            .is_ok();
        self.pending = Some(Vec::new());
        self.outstanding = 0;
        self.stale = false;
        self.next = [0; WINDOWS];
    }

    /// `len` bytes in window `w` (its bump allocator; wrapping ends exact checks).
    fn alloc(&mut self, w: usize, len: u64) -> u64 {
        let len = (len + 0xf) & !0xf;
        if self.next[w] + len > WIN_SIZE {
            self.next[w] = 0;
            self.pending = None;
        }
        let at = win_gpa(w) + self.next[w];
        self.next[w] += len;
        at
    }

    fn write_desc(&mut self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        self.cpu_write(win_gpa(RING_WIN) + DESC + 16 * u64::from(idx % QSIZE), &raw);
    }

    fn publish(&mut self, head: u16, bump: u16) {
        let slot = win_gpa(RING_WIN) + AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.cpu_write(slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(bump);
        let idx = self.avail_idx.to_le_bytes();
        self.cpu_write(win_gpa(RING_WIN) + AVAIL + 2, &idx);
    }

    /// IOVA of `gpa` in its window.
    fn iova(gpa: u64) -> u64 {
        let w = window_of(gpa).expect("in a window");
        win_iova(w) + (gpa - win_gpa(w))
    }

    fn request(&mut self, inp: &mut Input) {
        let t = match inp.u8() {
            s @ 0..=0x3f => u32::from(s % 3) * 4, // IN, FLUSH, GET_ID
            0x40..=0x9f => 1,                     // OUT
            0xa0..=0xef => 0,                     // IN
            _ => inp.u32(),
        };
        let sector = u64::from(inp.u8() % 140);
        let segs = usize::from(inp.u8() % 4);
        let seg_len = u32::from(inp.u8() % 5) * 512;
        let place = inp.u16();
        let win = |k: usize| usize::from((place >> (2 * k)) as u8 & 3);
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&t.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        let hw = win(0);
        let h = self.alloc(hw, 16);
        self.cpu_write(h, &hdr);
        let out = t == 1;
        // The rings: read to fetch the chain (the used ring may be read-only: the request then runs
        // but cannot complete).
        let mut needs = vec![(hw, READ), (RING_WIN, READ)];
        let mut bufs = vec![(h, 16u32, false)];
        let mut data = Vec::new();
        for k in 0..segs {
            let w = win(k + 1);
            let a = self.alloc(w, u64::from(seg_len));
            if out {
                let fill: Vec<u8> = (0..seg_len)
                    .map(|b| (b as u8) ^ (k as u8 * 0x21) ^ 0x5a)
                    .collect();
                self.cpu_write(a, &fill);
            }
            bufs.push((a, seg_len, !out));
            // What the device must reach: every data byte of a read or write, the first 20
            // bytes of GET_ID, nothing of a flush.
            let touched = match t {
                0 | 1 => seg_len > 0,
                8 => seg_len > 0 && k == 0,
                _ => false,
            };
            if touched {
                needs.push((w, if out { READ } else { WRITE }));
            }
            data.push((a, seg_len));
        }
        let sw = win(5);
        let s = self.alloc(sw, 1);
        self.cpu_write(s, &[0xff]);
        bufs.push((s, 1, true));
        needs.push((sw, WRITE));
        let head = self.next_desc;
        for (k, &(gpa, len, w)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QSIZE;
            let last = k + 1 == bufs.len();
            let flags = if w { 2 } else { 0 } | if last { 0 } else { 1 };
            let next = if last { 0 } else { self.next_desc };
            self.write_desc(idx, Self::iova(gpa), len, flags, next);
        }
        self.publish(head, 1);
        self.outstanding += bufs.len();
        if self.outstanding > usize::from(QSIZE) {
            // The ring wrapped over a chain not served yet.
            self.pending = None;
        }
        if let Some(p) = &mut self.pending {
            p.push(Pending {
                needs,
                status: Some(s),
                read: (t == 0).then_some((sector, data)),
                out,
            });
        }
    }

    fn check_frozen(&self) {
        for i in 0..WINDOWS {
            if let Some(copy) = &self.frozen[i] {
                assert!(
                    self.snapshot(i) == *copy,
                    "device wrote window {i} (access {:#x}) it may not write",
                    self.access[i]
                );
            }
        }
    }

    fn kick(&mut self) {
        let access = self.access;
        self.blk.queue_notify(0);
        self.check_frozen();
        let mut used = [0u8; 2];
        self.mem
            .read_slice(&mut used, GuestAddress(win_gpa(RING_WIN) + USED + 2))
            .expect("RAM");
        if u16::from_le_bytes(used) != self.avail_idx {
            self.stale = true;
        }
        let pending = self.pending.take();
        if !self.stale {
            // Everything published was served: buffers and descriptors are free again.
            self.pending = Some(Vec::new());
            self.outstanding = 0;
            self.next = [0; WINDOWS];
        }
        let Some(pending) = pending else {
            return;
        };
        let any_out = pending.iter().any(|p| p.out);
        let disk = std::fs::read(&self.path).expect("disk");
        for p in &pending {
            let Some(sa) = p.status else { continue };
            let mut st = [0u8];
            self.mem.read_slice(&mut st, GuestAddress(sa)).expect("RAM");
            if st[0] != 0 {
                continue;
            }
            for &(w, need) in &p.needs {
                assert_eq!(
                    access[w] & need,
                    need,
                    "request completed OK although window {w} lacked access {need:#x}"
                );
            }
            if let (Some((sector, data)), false) = (&p.read, any_out) {
                let mut off = (sector * 512) as usize;
                for &(gpa, len) in data {
                    let mut got = vec![0u8; len as usize];
                    self.mem
                        .read_slice(&mut got, GuestAddress(gpa))
                        .expect("RAM");
                    assert!(
                        got[..] == disk[off..off + len as usize],
                        "read data differs"
                    );
                    off += len as usize;
                }
            }
        }
    }

    fn step(&mut self, inp: &mut Input) {
        match inp.u8() % 10 {
            0..=2 => self.request(inp),
            3 => self.kick(),
            4 => {
                let i = usize::from(inp.u8()) % WINDOWS;
                let flags = u32::from(inp.u8() % 4);
                self.map(i, flags);
            }
            5 => {
                let i = usize::from(inp.u8()) % WINDOWS;
                if self.mapped[i] {
                    self.unmap(i);
                }
            }
            6 => {
                let idx = inp.u16();
                let addr = match inp.u8() {
                    s @ 0..=0xbf => {
                        win_iova(usize::from(s) % WINDOWS) + u64::from(inp.u16() % 0x4000)
                    }
                    _ => inp.u64(),
                };
                let (len, flags, next) = (inp.u32(), inp.u16(), inp.u16());
                self.write_desc(idx, addr, len, flags, next);
                self.pending = None;
                self.stale = true;
            }
            7 => {
                let head = inp.u16();
                let bump = u16::from(inp.u8() % 32);
                self.publish(head, bump);
                self.pending = None;
                self.stale = true;
            }
            8 => {
                let w = usize::from(inp.u8()) % WINDOWS;
                let off = u64::from(inp.u16()) % WIN_SIZE;
                let data = inp.blob(32).to_vec();
                let n = data.len().min((WIN_SIZE - off) as usize);
                self.cpu_write(win_gpa(w) + off, &data[..n]);
                self.pending = None;
            }
            _ => {
                let f = self.blk.device_features();
                let drop = inp.u8();
                let f = if drop & 0xe0 == 0xe0 {
                    f & !(1 << 33)
                } else {
                    f & !(u64::from(drop & 0x1f) << 28)
                };
                self.activate(f);
            }
        }
    }

    /// Every window mapped RW again: a write then a read of the same sectors round-trip.
    fn still_works(&mut self) {
        for i in 0..WINDOWS {
            if self.access[i] != READ | WRITE {
                if self.mapped[i] {
                    self.unmap(i);
                }
                self.map(i, READ | WRITE);
            }
        }
        let f = self.blk.device_features();
        self.activate(f);
        assert!(self.active, "clean activation refused");
        self.next = [0; WINDOWS];
        let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        let (h, d, s) = (self.alloc(0, 16), self.alloc(1, 1024), self.alloc(2, 1));
        let mut hdr = [0u8; 16];
        hdr[0] = 1;
        hdr[8] = 10;
        self.cpu_write(h, &hdr);
        self.cpu_write(d, &data);
        self.cpu_write(s, &[0xff]);
        self.write_desc(0, Self::iova(h), 16, 1, 1);
        self.write_desc(1, Self::iova(d), 1024, 1, 2);
        self.write_desc(2, Self::iova(s), 1, 2, 0);
        self.publish(0, 1);
        self.blk.queue_notify(0);
        if crate::debug() {
            eprintln!(
                "blk_iommu: access {:?}, stats {:?}",
                self.access,
                self.blk.stats().snapshot()
            );
        }
        let mut st = [0u8];
        self.mem.read_slice(&mut st, GuestAddress(s)).expect("RAM");
        assert_eq!(st[0], if self.readonly { 1 } else { 0 }, "write status");
        hdr[0] = 0;
        self.cpu_write(h, &hdr);
        self.cpu_write(d, &[0u8; 1024]);
        self.cpu_write(s, &[0xff]);
        self.write_desc(3, Self::iova(h), 16, 1, 4);
        self.write_desc(4, Self::iova(d), 1024, 3, 5);
        self.write_desc(5, Self::iova(s), 1, 2, 0);
        self.publish(3, 1);
        self.blk.queue_notify(0);
        self.mem.read_slice(&mut st, GuestAddress(s)).expect("RAM");
        assert_eq!(st[0], 0, "read status");
        let mut got = vec![0u8; 1024];
        self.mem.read_slice(&mut got, GuestAddress(d)).expect("RAM");
        if !self.readonly {
            assert!(got == data, "write then read did not round-trip");
        }
    }
}

/// Run one fuzz input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let mut h = Harness::new(mode & 1 != 0);
    // Rings mapped, then the data windows as the input says.
    h.map(RING_WIN, READ | WRITE);
    for i in 0..RING_WIN {
        let flags = if mode & (2 << i) != 0 {
            READ
        } else {
            READ | WRITE
        };
        h.map(i, flags);
    }
    let f = h.blk.device_features();
    h.activate(f);
    let mut steps = 0;
    while !inp.is_empty() && steps < 256 {
        h.step(&mut inp);
        steps += 1;
    }
    h.kick();
    h.still_works();
    h.check_frozen();
    if h.readonly {
        let mut f = std::fs::File::open(&h.path).expect("ro disk");
        assert_eq!(f.seek(SeekFrom::End(0)).expect("seek"), DISK_BYTES);
        f.seek(SeekFrom::Start(0)).expect("seek");
        let mut now = Vec::new();
        f.read_to_end(&mut now).expect("read");
        assert!(now == disks().ro_content, "read-only disk changed");
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use crate::Enc;
    let mut out = Vec::new();
    for (name, mode) in [("rw", 0u8), ("ro", 1)] {
        let mut e = Enc::default();
        e.u8(mode);
        // Write 2 sectors, read them back, then UNMAP the data window and read again.
        e.u8(0).u8(0x40).u8(4).u8(1).u8(2).u16(0b01_01_00);
        e.u8(3);
        e.u8(0).u8(0xa0).u8(4).u8(1).u8(2).u16(0b10_01_00);
        e.u8(3);
        e.u8(5).u8(1);
        e.u8(0).u8(0xa0).u8(4).u8(1).u8(2).u16(0b10_01_00);
        e.u8(3);
        // Read-only data window: a read into it must fail.
        e.u8(4).u8(1).u8(1);
        e.u8(0).u8(0xa0).u8(8).u8(2).u8(1).u16(0b10_01_01_00);
        e.u8(3);
        // The rings unmapped mid-run, then mapped again.
        e.u8(0).u8(0x10).u8(0).u8(0).u8(0).u16(0);
        e.u8(5).u8(4);
        e.u8(3);
        e.u8(4).u8(4).u8(3);
        e.u8(3);
        e.u8(9).u8(0);
        out.push((name.to_string(), e.0));
    }
    out
}
