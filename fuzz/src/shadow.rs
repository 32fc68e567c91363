//! Target: the shadow engine (`viommu::Shadow`) on its own, installing into the recording
//! mapper (as the `DmaSpace`): guest RAM in several regions with holes (and one high region),
//! two assigned-device BARs (one with a hole where the MSI-X table would be) that move, stop
//! decoding and are revoked, fuzzed reserved guest-physical ranges and host IOVA ranges, maps
//! and unmaps with edges chosen around all of them, injected host failures, `clear`.
//!
//! Invariants checked: every host mapping lies in a guest RAM region's mmap or a BAR mmap and
//! has some access right; the host holds exactly the pieces the shadow recorded (unmaps match
//! maps, a failed call leaves the host as it was); a map succeeds exactly when an independent
//! model says it must (no overlap, inside the host IOVA ranges, no reserved byte, every byte
//! RAM or a decoding BAR, the host call not failed) and then installs exactly the pieces the
//! model composes (split at region and BAR-part edges, host address of each GPA); an unmap
//! succeeds exactly for a recorded mapping; `compose` agrees with the model.

use crate::Input;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use viommu::test_utils::RecordingMapper;
use viommu::{
    BarResolver, BarTargets, DmaSpace, HostMapError, HostMapper, Piece, Prot, Shadow, ShadowConfig,
    X86_MSI_END, X86_MSI_START,
};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};

/// Guest RAM: two adjacent regions (separate mmaps), a hole, one more, one above 4 GiB.
const RAM: [(u64, u64); 4] = [
    (0, 0x10_0000),
    (0x10_0000, 0x8_0000),
    (0x40_0000, 0x10_0000),
    (0x1_0000_0000, 0x4_0000),
];

/// A fake BAR "mmapped" at a made-up host address (the recorder never touches it): parts
/// (offset, size) of the BAR that are mmapped, and where the BAR decodes now.
struct FuzzBar {
    size: u64,
    host: u64,
    parts: &'static [(u64, u64)],
    at: Mutex<Option<u64>>,
}

impl FuzzBar {
    /// (host address, bytes left in the part) for `gpa`, like the resolver must answer.
    fn model(&self, gpa: u64) -> Option<(u64, u64)> {
        let base = (*self.at.lock().unwrap())?;
        let off = gpa.checked_sub(base)?;
        self.parts
            .iter()
            .find(|&&(o, s)| off >= o && off < o + s)
            .map(|&(o, s)| (self.host + off, o + s - off))
    }
}

// SAFETY: only used with the recording mapper, which never accesses the addresses.
unsafe impl BarResolver for FuzzBar {
    fn resolve(&self, gpa: u64) -> Option<(u64, u64)> {
        self.model(gpa)
    }
}

/// The recording mapper as the shadow's `DmaSpace`, failing the call the input chooses and
/// remembering that it did.
#[derive(Default)]
struct FailingSpace {
    rec: RecordingMapper,
    state: Mutex<Injection>,
}

/// Calls so far, the call to fail and how, and whether a failure was injected since the last
/// [`FailingSpace::take_injected`].
#[derive(Default)]
struct Injection {
    calls: u64,
    fail_at: Option<(u64, HostMapError)>,
    injected: bool,
}

impl FailingSpace {
    fn fail_call(&self, n: u64, err: HostMapError) {
        let mut s = self.state.lock().unwrap();
        s.fail_at = Some((s.calls + n, err));
    }
    fn disarm(&self) {
        self.state.lock().unwrap().fail_at = None;
    }
    /// Whether a failure was injected since the last call.
    fn take_injected(&self) -> bool {
        std::mem::take(&mut self.state.lock().unwrap().injected)
    }
    fn injected(&self) -> Result<(), HostMapError> {
        let mut s = self.state.lock().unwrap();
        let call = s.calls;
        s.calls += 1;
        match s.fail_at.take() {
            Some((at, err)) if at == call => {
                s.injected = true;
                Err(err)
            }
            other => {
                s.fail_at = other;
                Ok(())
            }
        }
    }
    fn mappings(&self) -> BTreeMap<u64, (u64, u64, Prot)> {
        self.rec.mappings()
    }
}

impl DmaSpace for FailingSpace {
    unsafe fn map(&self, iova: u64, size: u64, host: u64, prot: Prot) -> Result<(), HostMapError> {
        self.injected()?;
        // SAFETY: the recording mapper never touches `host`.
        unsafe { DmaSpace::map(&self.rec, iova, size, host, prot) }
    }
    fn unmap(&self, iova: u64, size: u64) -> Result<(), HostMapError> {
        self.injected()?;
        DmaSpace::unmap(&self.rec, iova, size)
    }
}

struct Harness {
    mem: GuestMemoryMmap,
    rec: Arc<FailingSpace>,
    shadow: Shadow,
    targets: Arc<BarTargets>,
    bars: Vec<Arc<FuzzBar>>,
    /// The BARs in `targets`, in its order (the first that resolves wins).
    order: Vec<usize>,
    config: ShadowConfig,
    /// What the shadow must hold: iova -> (size, pieces).
    model: BTreeMap<u64, (u64, Vec<Piece>)>,
    /// Host address ranges (start, end) devices may be given: RAM mmaps and BAR mmaps.
    host_ok: Vec<(u64, u64)>,
}

fn prot(b: u8) -> Prot {
    Prot {
        read: b & 1 != 0,
        write: b & 2 != 0,
    }
}

impl Harness {
    fn new(inp: &mut Input) -> Self {
        let ranges: Vec<(GuestAddress, usize)> = RAM
            .iter()
            .map(|&(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let mem = crate::ram(&ranges);
        let rec = Arc::new(FailingSpace::default());
        let bars = vec![
            Arc::new(FuzzBar {
                size: 0x1_0000,
                host: 0x7f00_0000_0000,
                parts: &[(0, 0x1_0000)],
                at: Mutex::new(Some(0xe000_0000)),
            }),
            Arc::new(FuzzBar {
                size: 0x4000,
                host: 0x7f10_0000_0000,
                parts: &[(0, 0x1000), (0x2000, 0x2000)],
                at: Mutex::new(Some(0x8_0000_0000)),
            }),
        ];
        let targets = Arc::new(BarTargets::new());
        for b in &bars {
            targets.add(b.clone());
        }
        // Reserved GPAs: the MSI window and up to two fuzzed ranges; host IOVA ranges: none
        // (unchecked) or up to three.
        let mut config = ShadowConfig::default();
        for _ in 0..inp.u8() % 3 {
            let s = gpa_sel(inp, &bars);
            let len = inp.u16() as u64 * 0x100;
            config.reserved_gpa.push((s, s.saturating_add(len)));
        }
        for _ in 0..inp.u8() % 4 {
            let s = iova_sel(inp);
            let len = (u64::from(inp.u16()) << 16).max(0xfff);
            config.host_iova_ranges.push((s, s.saturating_add(len)));
        }
        let shadow = Shadow::new(rec.clone(), GuestMemoryAtomic::new(mem.clone()))
            .with_bars(targets.clone())
            .with_config(config.clone());
        let mut host_ok: Vec<(u64, u64)> = RAM
            .iter()
            .map(|&(a, l)| {
                let h = mem.get_host_address(GuestAddress(a)).expect("RAM") as u64;
                (h, h + l)
            })
            .collect();
        for b in &bars {
            for &(o, s) in b.parts {
                host_ok.push((b.host + o, b.host + o + s));
            }
        }
        Harness {
            mem,
            rec,
            shadow,
            targets,
            order: (0..bars.len()).collect(),
            bars,
            config,
            model: BTreeMap::new(),
            host_ok,
        }
    }

    /// Whether the range checks before composition pass.
    fn checks_pass(&self, iova: u64, size: u64, gpa: u64) -> bool {
        let Some(len_m1) = size.checked_sub(1) else {
            return false;
        };
        let (Some(last), Some(gpa_last)) = (iova.checked_add(len_m1), gpa.checked_add(len_m1))
        else {
            return false;
        };
        let r = &self.config.host_iova_ranges;
        (r.is_empty() || r.iter().any(|&(s, e)| s <= iova && last <= e))
            && !self
                .config
                .reserved_gpa
                .iter()
                .any(|&(s, e)| gpa <= e && s <= gpa_last)
    }

    /// The pieces `iova..+size -> gpa` must become, or the error the shadow must return
    /// (without host failures).
    fn expect_map(&self, iova: u64, size: u64, gpa: u64) -> Result<Vec<Piece>, HostMapError> {
        let len_m1 = size.checked_sub(1).ok_or(HostMapError::Invalid)?;
        let last = iova.checked_add(len_m1).ok_or(HostMapError::OutOfRange)?;
        let gpa_last = gpa.checked_add(len_m1).ok_or(HostMapError::OutOfRange)?;
        let r = &self.config.host_iova_ranges;
        if !r.is_empty() && !r.iter().any(|&(s, e)| s <= iova && last <= e) {
            return Err(HostMapError::OutOfRange);
        }
        if self
            .config
            .reserved_gpa
            .iter()
            .any(|&(s, e)| gpa <= e && s <= gpa_last)
        {
            return Err(HostMapError::Invalid);
        }
        let mut pieces = Vec::new();
        let (mut cur, mut left, mut at) = (gpa, size, iova);
        while left > 0 {
            let ram = RAM.iter().find(|&&(a, l)| cur >= a && cur - a < l);
            let (host, avail) = if let Some(&(a, l)) = ram {
                let h = self.mem.get_host_address(GuestAddress(cur)).expect("RAM") as u64;
                (h, a + l - cur)
            } else if let Some(hit) = self.order.iter().find_map(|&i| self.bars[i].model(cur)) {
                hit
            } else {
                return Err(HostMapError::OutOfRange);
            };
            if pieces.len() == viommu::MAX_PIECES {
                return Err(HostMapError::Failed(String::new()));
            }
            let take = left.min(avail);
            pieces.push(Piece {
                iova: at,
                size: take,
                host_addr: host,
            });
            left -= take;
            at = at.wrapping_add(take);
            cur = cur.wrapping_add(take);
        }
        Ok(pieces)
    }

    fn overlaps_model(&self, iova: u64, size: u64) -> bool {
        let Some(last) = size.checked_sub(1).and_then(|m| iova.checked_add(m)) else {
            return false;
        };
        self.model
            .range(..=last)
            .next_back()
            .is_some_and(|(&s, &(sz, _))| s + (sz - 1) >= iova)
    }

    fn map(&mut self, iova: u64, size: u64, gpa: u64, p: Prot) {
        let before = self.rec.mappings();
        // No rights: recorded without composing (no host call), after the range checks.
        let expect = match self.expect_map(iova, size, gpa) {
            Err(HostMapError::OutOfRange | HostMapError::Failed(_))
                if !(p.read || p.write) && self.checks_pass(iova, size, gpa) =>
            {
                Ok(Vec::new())
            }
            e => e,
        };
        let overlap = self.overlaps_model(iova, size);
        let got = HostMapper::map(&self.shadow, iova, size, gpa, p);
        let armed = self.rec.take_injected();
        match (&got, &expect) {
            (Ok(()), Ok(pieces)) => {
                assert!(!overlap, "map over a recorded mapping accepted");
                let pieces = if p.read || p.write {
                    pieces.clone()
                } else {
                    Vec::new()
                };
                // Exactly those pieces were added to the host.
                let mut want = before.clone();
                for pc in &pieces {
                    want.insert(pc.iova, (pc.size, pc.host_addr, p));
                }
                assert_eq!(self.rec.mappings(), want, "host pieces of map {iova:#x}");
                self.model.insert(iova, (size, pieces));
            }
            (Ok(()), Err(e)) => panic!("map {iova:#x}+{size:#x} -> {gpa:#x} accepted, model: {e}"),
            (Err(e), _) => {
                // Checks run first in the shadow, then the overlap check, then composition.
                let explained = armed
                    || overlap
                    || matches!(&expect, Err(m) if std::mem::discriminant(m) == std::mem::discriminant(e));
                assert!(
                    explained,
                    "map {iova:#x}+{size:#x} -> {gpa:#x} {p:?} refused ({e}), model {expect:?}"
                );
                assert_eq!(self.rec.mappings(), before, "failed map changed the host");
            }
        }
    }

    fn unmap(&mut self, iova: u64, size: u64) {
        let before = self.rec.mappings();
        let got = HostMapper::unmap(&self.shadow, iova, size);
        let armed = self.rec.take_injected();
        let recorded = self.model.get(&iova).is_some_and(|e| e.0 == size);
        match got {
            Ok(()) => {
                assert!(recorded, "unmap {iova:#x}+{size:#x} of nothing accepted");
                let (_, pieces) = self.model.remove(&iova).expect("recorded");
                let mut want = before;
                for pc in &pieces {
                    assert!(want.remove(&pc.iova).is_some(), "piece not on the host");
                }
                assert_eq!(self.rec.mappings(), want, "host after unmap {iova:#x}");
            }
            Err(e) => {
                assert!(
                    armed || !recorded,
                    "unmap of recorded {iova:#x}+{size:#x} refused: {e}"
                );
                assert_eq!(self.rec.mappings(), before, "failed unmap changed the host");
            }
        }
    }

    fn check(&self) {
        assert_eq!(self.shadow.len(), self.model.len(), "mappings recorded");
        let host = self.rec.mappings();
        let recorded: BTreeMap<u64, (u64, u64)> = self
            .shadow
            .host_mappings()
            .into_iter()
            .map(|p| (p.iova, (p.size, p.host_addr)))
            .collect();
        let on_host: BTreeMap<u64, (u64, u64)> =
            host.iter().map(|(&i, &(s, h, _))| (i, (s, h))).collect();
        assert_eq!(
            on_host, recorded,
            "host mappings differ from the shadow's record"
        );
        for (&iova, &(size, h, p)) in &host {
            assert!(p.read || p.write, "host mapping {iova:#x} without rights");
            let inside = self
                .host_ok
                .iter()
                .any(|&(s, e)| h >= s && h.checked_add(size).is_some_and(|end| end <= e));
            assert!(
                inside,
                "host mapping {iova:#x}+{size:#x} -> {h:#x} outside guest RAM and BAR mmaps"
            );
        }
    }

    fn step(&mut self, inp: &mut Input) {
        match inp.u8() % 8 {
            0..=2 => {
                let iova = iova_sel(inp);
                let gpa = gpa_sel(inp, &self.bars);
                let size = size_sel(inp, gpa);
                let p = prot(inp.u8());
                self.map(iova, size, gpa, p);
            }
            3 => {
                // Unmap a recorded mapping (maybe with a wrong size) or anything.
                let s = inp.u8();
                let (iova, size) = match self.model.iter().nth(usize::from(s % 8)) {
                    Some((&i, &(sz, _))) if s & 0x80 == 0 => (i, sz),
                    Some((&i, &(sz, _))) if s & 0x40 == 0 => (i, sz.wrapping_add(0x1000)),
                    _ => (iova_sel(inp), size_sel(inp, 0)),
                };
                self.unmap(iova, size);
            }
            4 => {
                // A host failure on one of the next calls.
                let n = u64::from(inp.u8() % 4);
                let err = match inp.u8() % 4 {
                    0 => HostMapError::NoSpace,
                    1 => HostMapError::Invalid,
                    2 => HostMapError::OutOfRange,
                    _ => HostMapError::Failed("injected".into()),
                };
                self.rec.fail_call(n, err);
            }
            5 => {
                // A BAR moves or stops decoding (the resolver answers for its new place).
                let i = usize::from(inp.u8()) % self.bars.len();
                let at = match inp.u8() {
                    0..=0x3f => None,
                    s => Some(gpa_sel(inp, &self.bars) & !0xfff | u64::from(s & 1) << 40),
                };
                *self.bars[i].at.lock().unwrap() = at;
            }
            6 => {
                // A device unplugged or plugged again.
                let i = usize::from(inp.u8()) % self.bars.len();
                let r: Arc<dyn BarResolver> = self.bars[i].clone();
                if let Some(at) = self.order.iter().position(|&o| o == i) {
                    self.targets.remove(&r);
                    self.order.remove(at);
                } else {
                    self.targets.add(r);
                    self.order.push(i);
                }
            }
            _ => {
                let iova = iova_sel(inp);
                let gpa = gpa_sel(inp, &self.bars);
                let size = size_sel(inp, gpa);
                let got = self.shadow.compose(iova, size, gpa);
                let want = self.expect_map(iova, size, gpa);
                match (&got, &want) {
                    (Ok(g), Ok(w)) => assert_eq!(g, w, "compose {iova:#x} -> {gpa:#x}"),
                    (Err(g), Err(w)) => assert_eq!(
                        std::mem::discriminant(g),
                        std::mem::discriminant(w),
                        "compose error"
                    ),
                    _ => panic!("compose {iova:#x}+{size:#x} -> {gpa:#x}: {got:?}, model {want:?}"),
                }
                if inp.u8() == 0xff {
                    // Device teardown.
                    let res = self.shadow.clear();
                    let armed = self.rec.take_injected();
                    match res {
                        Ok(()) => {
                            self.model.clear();
                            assert!(self.rec.mappings().is_empty(), "clear left host mappings");
                        }
                        Err(e) => {
                            assert!(
                                armed,
                                "clear failed without a host failure: {e}; recorded {:?}, host {:?}",
                                self.model,
                                self.rec.mappings()
                            );
                            // Mappings before the one that failed are gone, the rest kept.
                            let host = self.rec.mappings();
                            let first_kept = self
                                .model
                                .iter()
                                .find(|(_, (_, ps))| {
                                    ps.first().is_some_and(|p| host.contains_key(&p.iova))
                                })
                                .map(|(&i, _)| i)
                                .expect("the mapping that failed is kept");
                            self.model.retain(|&i, _| i >= first_kept);
                        }
                    }
                }
            }
        }
        self.check();
    }
}

/// Interesting guest-physical addresses: RAM edges, holes, the BARs, the MSI window.
fn gpa_sel(inp: &mut Input, bars: &[Arc<FuzzBar>]) -> u64 {
    let s = inp.u8();
    let anchor = match s % 12 {
        0..=3 => RAM[usize::from(s % 4)].0,
        4..=7 => RAM[usize::from(s % 4)].0 + RAM[usize::from(s % 4)].1,
        8 => bars[0].at.lock().unwrap().unwrap_or(0xe000_0000),
        9 => bars[1].at.lock().unwrap().unwrap_or(0x8_0000_0000),
        10 => X86_MSI_START,
        _ => return inp.u64(),
    };
    let off = i64::from(inp.u8() as i8) * 0x1000
        + i64::from(inp.u8() & 0xf) * 0x100 * i64::from(s >= 0xf0);
    anchor.wrapping_add_signed(off)
}

fn iova_sel(inp: &mut Input) -> u64 {
    match inp.u8() {
        s @ 0..=0xbf => u64::from(s) << 14,
        s @ 0xc0..=0xef => (1u64 << 32).wrapping_add_signed(i64::from(s as i8) << 12),
        _ => inp.u64(),
    }
}

fn size_sel(inp: &mut Input, gpa: u64) -> u64 {
    match inp.u8() {
        s @ 0..=0x9f => u64::from(s % 16 + 1) << 12,
        // Up to the end of the RAM region holding `gpa`, and a bit past it.
        s @ 0xa0..=0xdf => RAM
            .iter()
            .find(|&&(a, l)| gpa >= a && gpa - a < l)
            .map_or(0x1000, |&(a, l)| a + l - gpa + u64::from(s & 3) * 0x1000),
        0xe0..=0xf7 => u64::from(inp.u32()),
        _ => inp.u64(),
    }
}

/// Run one fuzz input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut h = Harness::new(&mut inp);
    let _ = X86_MSI_END;
    let mut steps = 0;
    while !inp.is_empty() && steps < 256 {
        h.step(&mut inp);
        steps += 1;
    }
    // Unmapping everything recorded leaves the host empty.
    h.rec.disarm();
    let all: Vec<(u64, u64)> = h.model.iter().map(|(&i, &(s, _))| (i, s)).collect();
    for (iova, size) in all {
        h.unmap(iova, size);
    }
    h.check();
    assert!(
        h.rec.mappings().is_empty(),
        "host mappings left after unmapping all"
    );
    let _ = h.bars[0].size;
}

/// Seed inputs.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use crate::Enc;
    let mut out = Vec::new();
    // No extra reserved ranges, one host range [0, 4 GiB).
    let mut e = Enc::default();
    e.u8(0).u8(1).u8(0).u16(0xffff);
    // Map across the first region edge, into BAR 0, into BAR 1's hole, the MSI window.
    e.u8(0).u8(4).u8(5).u8(0xff).u8(0).u8(0xa1).u8(3);
    e.u8(1).u8(8).u8(8).u8(0).u8(0).u8(3).u8(3);
    e.u8(2).u8(12).u8(9).u8(1).u8(0).u8(1).u8(1);
    e.u8(0).u8(16).u8(10).u8(0).u8(0).u8(0).u8(3);
    e.u8(0).u8(20).u8(6).u8(0).u8(0).u8(0).u8(0);
    e.u8(3).u8(0);
    e.u8(4).u8(1).u8(0);
    e.u8(0).u8(24).u8(0).u8(0xff).u8(0).u8(0xa2).u8(3);
    e.u8(5).u8(0).u8(0);
    e.u8(0).u8(28).u8(8).u8(0).u8(0).u8(0).u8(3);
    e.u8(6).u8(1);
    e.u8(7).u8(32).u8(9).u8(0).u8(0).u8(0).u8(0xff);
    out.push(("edges".to_string(), e.0));
    out
}
