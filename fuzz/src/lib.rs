//! Fuzz harnesses for the guest-facing surfaces of the VMM. Each module decodes a fuzz input
//! into a sequence of guest (or host) actions, runs them against the real code and asserts
//! invariants after every step; `fuzz_targets/*.rs` are one-line libFuzzer entry points and
//! `src/bin/seeds.rs` writes a seed corpus from the same encoders.
//!
//! Inputs are byte streams read by [`Input`]: an opcode byte, then its operands. A stream that
//! runs out yields zeros, so every byte string is a valid program.

pub mod pci_config;
pub mod viommu_queue;
#[cfg(feature = "blk")]
pub mod virtio_blk;
pub mod virtio_pci;

#[cfg(feature = "blk")]
pub mod blk_iommu;
pub mod ring;
pub mod shadow;
pub mod vfio_pci;
#[cfg(feature = "blk")]
pub mod virtio_net;
#[cfg(feature = "blk")]
pub mod virtio_pci_devs;

/// Reads operands from a fuzz input; past the end every read returns 0.
pub struct Input<'a> {
    data: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Input<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }

    /// Whether every byte has been consumed.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = end;
        &self.data[start..end]
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// Little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// Little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// Little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A length-prefixed byte string of at most `max` bytes.
    pub fn blob(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u8()) % (max + 1);
        self.bytes(n)
    }
}

/// Whether `VMM_FUZZ_DEBUG` asks for a trace (read once: the environment lock and scan cost
/// more than some whole steps).
pub fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("VMM_FUZZ_DEBUG").is_some())
}

/// Zeroed guest RAM laid out as `ranges`, the same mapping reused from input to input (per
/// thread and layout), so each input sees fresh RAM as before. A new mapping per input cost an
/// mmap, a munmap and a page fault for every page the input touched: about a fifth of a run.
pub fn ram(ranges: &[(vm_memory::GuestAddress, usize)]) -> vm_memory::GuestMemoryMmap {
    use std::cell::RefCell;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
    type Layout = Vec<(u64, usize)>;
    thread_local! {
        static CACHE: RefCell<Vec<(Layout, GuestMemoryMmap)>> = const { RefCell::new(Vec::new()) };
    }
    const ZEROS: [u8; 0x1_0000] = [0; 0x1_0000];
    let layout: Layout = ranges.iter().map(|&(a, l)| (a.0, l)).collect();
    CACHE.with(|c| {
        if let Some((_, m)) = c.borrow().iter().find(|(l, _)| *l == layout) {
            for r in m.iter() {
                let mut at = 0u64;
                while at < r.len() {
                    let n = (r.len() - at).min(ZEROS.len() as u64) as usize;
                    r.write_slice(&ZEROS[..n], vm_memory::MemoryRegionAddress(at))
                        .expect("RAM");
                    at += n as u64;
                }
            }
            return m.clone();
        }
        let m = GuestMemoryMmap::<()>::from_ranges(ranges).expect("guest RAM");
        c.borrow_mut().push((layout, m.clone()));
        m
    })
}

/// Writes operands in the format [`Input`] reads (for seeds).
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// Little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A length-prefixed byte string (at most 255 bytes).
    pub fn blob(&mut self, b: &[u8]) -> &mut Self {
        let n = b.len().min(255);
        self.0.push(n as u8);
        self.0.extend_from_slice(&b[..n]);
        self
    }
}

/// Fake KVM services for the PCI harnesses: MSI vectors and ioeventfds, checked for misuse.
pub mod fakes {
    use pci::{IoEventManager, MsiIrqManager, MsiMessage, MsiVector};
    use std::collections::{BTreeMap, BTreeSet};
    use std::io;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Allocates GSIs; asserts routes are only set on live vectors and each is released once.
    #[derive(Default)]
    pub struct FakeMsi {
        state: Mutex<MsiState>,
    }

    #[derive(Default)]
    struct MsiState {
        next: u32,
        live: BTreeSet<u32>,
        routes: BTreeMap<u32, MsiMessage>,
    }

    impl FakeMsi {
        /// Vectors currently allocated.
        pub fn live(&self) -> usize {
            self.state.lock().unwrap().live.len()
        }
        /// Routes currently installed.
        pub fn routes(&self) -> usize {
            self.state.lock().unwrap().routes.len()
        }
    }

    impl MsiIrqManager for FakeMsi {
        fn allocate(&self) -> io::Result<MsiVector> {
            let mut s = self.state.lock().unwrap();
            let gsi = s.next;
            s.next += 1;
            s.live.insert(gsi);
            Ok(MsiVector {
                gsi,
                irqfd: EventFd::new(EFD_NONBLOCK)?,
            })
        }
        fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
            let mut s = self.state.lock().unwrap();
            assert!(s.live.contains(&gsi), "route set on dead GSI {gsi}");
            match msg {
                Some(m) => s.routes.insert(gsi, m),
                None => s.routes.remove(&gsi),
            };
            Ok(())
        }
        fn release(&self, vector: MsiVector) {
            let mut s = self.state.lock().unwrap();
            assert!(
                s.live.remove(&vector.gsi),
                "GSI {} released twice",
                vector.gsi
            );
            s.routes.remove(&vector.gsi);
        }
    }

    /// Records ioeventfd registrations; asserts unregister matches a registration.
    #[derive(Default)]
    pub struct FakeIoEvents {
        registered: Mutex<BTreeMap<u64, usize>>,
    }

    impl FakeIoEvents {
        /// Addresses with a registration.
        pub fn registered(&self) -> Vec<u64> {
            self.registered.lock().unwrap().keys().copied().collect()
        }
    }

    impl IoEventManager for FakeIoEvents {
        fn register(&self, _fd: &EventFd, addr: u64) -> io::Result<()> {
            *self.registered.lock().unwrap().entry(addr).or_default() += 1;
            Ok(())
        }
        fn unregister(&self, _fd: &EventFd, addr: u64) -> io::Result<()> {
            let mut r = self.registered.lock().unwrap();
            let n = r.get_mut(&addr).expect("unregister without register");
            *n -= 1;
            if *n == 0 {
                r.remove(&addr);
            }
            Ok(())
        }
    }
}

/// A host mapper that records like [`viommu::test_utils::RecordingMapper`] and fails the
/// call chosen by the harness, counting the failures it injected.
pub mod failing {
    use std::sync::Mutex;
    use viommu::test_utils::RecordingMapper;
    use viommu::{HostMapError, HostMapper, Prot};

    #[derive(Default)]
    struct Injection {
        calls: u64,
        fail_at: Option<(u64, HostMapError)>,
        failures: u64,
        /// Errors (injected or from the recording mapper) since [`FailingMapper::begin`].
        window_errors: u64,
        double_fault: bool,
    }

    /// See the module docs.
    #[derive(Default)]
    pub struct FailingMapper {
        /// The recording (and VFIO-checking) mapper calls go to.
        pub inner: RecordingMapper,
        state: Mutex<Injection>,
    }

    impl FailingMapper {
        /// Fail the `n`-th call from now (replacing any pending failure).
        pub fn fail_call(&self, n: u64, err: HostMapError) {
            let mut s = self.state.lock().unwrap();
            s.fail_at = Some((s.calls.saturating_add(n), err));
        }
        /// Cancel a pending failure.
        pub fn disarm(&self) {
            self.state.lock().unwrap().fail_at = None;
        }
        /// Failures injected so far.
        pub fn failures(&self) -> u64 {
            self.state.lock().unwrap().failures
        }
        /// Start of a guest request batch (for [`FailingMapper::double_fault`]).
        pub fn begin(&self) {
            self.state.lock().unwrap().window_errors = 0;
        }
        /// Whether an injected failure ever hit a call made after another call of the same
        /// batch had failed, i.e. a rollback: the documented double fault after which the
        /// host may keep a mapping the engine dropped (viommu/src/engine/shadow.rs).
        pub fn double_fault(&self) -> bool {
            self.state.lock().unwrap().double_fault
        }
        fn natural<T>(&self, r: Result<T, HostMapError>) -> Result<T, HostMapError> {
            if r.is_err() {
                self.state.lock().unwrap().window_errors += 1;
            }
            r
        }
        fn injected(&self) -> Result<(), HostMapError> {
            let mut s = self.state.lock().unwrap();
            let call = s.calls;
            s.calls += 1;
            match s.fail_at.take() {
                Some((at, err)) if at == call => {
                    s.failures += 1;
                    if s.window_errors > 0 {
                        s.double_fault = true;
                    }
                    s.window_errors += 1;
                    Err(err)
                }
                other => {
                    s.fail_at = other;
                    Ok(())
                }
            }
        }
    }

    impl HostMapper for FailingMapper {
        fn map(&self, iova: u64, size: u64, gpa: u64, prot: Prot) -> Result<(), HostMapError> {
            self.injected()?;
            self.natural(self.inner.map(iova, size, gpa, prot))
        }
        fn unmap(&self, iova: u64, size: u64) -> Result<(), HostMapError> {
            self.injected()?;
            self.natural(self.inner.unmap(iova, size))
        }
    }
}
