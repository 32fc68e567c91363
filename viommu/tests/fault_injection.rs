//! Failing hosts: every host-mapper call a request sequence makes is failed in turn (with each
//! kind of host error), through the request queue as the guest sends them. After each request
//! the guest's status, the engine's state and the host address spaces are checked: a failed
//! request reports the host's error, leaves the engine exactly as before, and every host
//! address space holds exactly what the engine says (no leaked, no stale mapping).

mod common;

use common::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use viommu::test_utils::RecordingMapper;
use viommu::{HostMapError, HostMapper, Prot, Shadow, Status, ViommuConfig};
use virtio_dev::VirtioDevice;

/// Failure injection shared by every mapper of one run: the `fail_at`-th host call overall
/// fails with `err`.
#[derive(Default)]
struct Ctl {
    calls: u64,
    fail_at: Option<(u64, HostMapError)>,
    failed: u64,
}

/// A recording mapper whose calls go through the shared [`Ctl`].
struct Failing {
    rec: RecordingMapper,
    ctl: Arc<Mutex<Ctl>>,
}

impl Failing {
    fn check(&self) -> Result<(), HostMapError> {
        let mut c = self.ctl.lock().unwrap();
        let call = c.calls;
        c.calls += 1;
        if let Some((at, err)) = &c.fail_at {
            if *at == call {
                let err = err.clone();
                c.fail_at = None;
                c.failed += 1;
                return Err(err);
            }
        }
        Ok(())
    }
}

impl HostMapper for Failing {
    fn map(&self, iova: u64, size: u64, gpa: u64, prot: Prot) -> Result<(), HostMapError> {
        self.check()?;
        self.rec.map(iova, size, gpa, prot)
    }
    fn unmap(&self, iova: u64, size: u64) -> Result<(), HostMapError> {
        self.check()?;
        self.rec.unmap(iova, size)
    }
}

// Endpoints: A and B share host address space H1 (one VFIO container), C has H2, E is
// emulated.
const A: u32 = 0x08;
const B: u32 = 0x10;
const C: u32 = 0x18;
const E: u32 = 0x20;
const BYPASS_DOM: u32 = 100;
const DOMAINS: [u32; 4] = [1, 2, 3, BYPASS_DOM];
const P: u64 = 0x1000;

/// The guest's requests: ATTACH, MAP, UNMAP, DETACH over shared and separate host address
/// spaces, moves between domains, a bypass domain (guest RAM identity-mapped in the host) and
/// an emulated endpoint's domain that a host endpoint joins later.
fn scenario() -> Vec<Vec<u8>> {
    vec![
        attach(1, A, 0),
        map(1, 0x10 * P, 0x13 * P - 1, 0x100 * P, RW),
        map(1, 0x20 * P, 0x21 * P - 1, 0x200 * P, R),
        attach(1, B, 0),
        attach(1, C, 0),
        map(1, 0x30 * P, 0x34 * P - 1, 0x300 * P, W),
        unmap(1, 0x10 * P, 0x30 * P - 1),
        attach(2, C, 0),
        map(2, 0x40 * P, 0x41 * P - 1, 0x400 * P, RW),
        map(2, 0x41 * P, 0x42 * P - 1, 0x500 * P, RW),
        detach(1, B),
        attach(BYPASS_DOM, A, 1),
        attach(BYPASS_DOM, B, 1),
        detach(BYPASS_DOM, A),
        detach(BYPASS_DOM, B),
        attach(3, E, 0),
        map(3, 0x50 * P, 0x52 * P - 1, 0x600 * P, RW),
        map(3, 0x60 * P, 0x61 * P - 1, 0x700 * P, R),
        detach(2, C),
        attach(3, C, 0),
        unmap(3, 0x50 * P, 0x52 * P - 1),
        attach(3, A, 0),
        map(3, 0x70 * P, 0x71 * P - 1, 0x800 * P, RW),
        unmap(3, 0, u64::MAX >> 16),
        detach(3, C),
        detach(3, A),
        detach(3, E),
    ]
}

/// Everything the engine exposes about its state.
#[derive(Debug, PartialEq, Eq, Clone)]
struct EngineState {
    endpoints: Vec<Option<Option<u32>>>,
    domains: Vec<(u32, Option<bool>, Option<Vec<viommu::Mapping>>)>,
    count: usize,
}

fn engine(d: &Driver) -> EngineState {
    let doms = d.dev.domains();
    EngineState {
        endpoints: [A, B, C, E]
            .iter()
            .map(|&e| doms.endpoint_domain(e))
            .collect(),
        domains: DOMAINS
            .iter()
            .map(|&id| (id, doms.domain_bypass(id), doms.mappings(id)))
            .collect(),
        count: doms.domain_count(),
    }
}

type HostMap = BTreeMap<u64, (u64, u64, Prot)>;

/// What host address space `eps` (its endpoints) must hold according to the engine. With
/// `config.bypass` on, a host none of whose endpoints is attached holds guest RAM (boot
/// bypass).
fn expected_host(d: &Driver, eps: &[u32]) -> HostMap {
    let doms = d.dev.domains();
    let ram = || HostMap::from([(0, (MEM_SIZE as u64, 0, Prot::RW))]);
    let mut out = HostMap::new();
    let mut attached = false;
    for &ep in eps {
        let Some(Some(dom)) = doms.endpoint_domain(ep) else {
            continue;
        };
        attached = true;
        if doms.domain_bypass(dom) == Some(true) {
            out.extend(ram());
            continue;
        }
        for m in doms.mappings(dom).unwrap_or_default() {
            let prot = Prot {
                read: m.read,
                write: m.write,
            };
            out.insert(m.start, (m.end - m.start + 1, m.gpa, prot));
        }
    }
    if !attached && doms.bypass() {
        return ram();
    }
    out
}

struct Rig {
    d: Driver,
    h1: Arc<Failing>,
    h2: Arc<Failing>,
    ctl: Arc<Mutex<Ctl>>,
}

fn rig(boot_bypass: bool) -> Rig {
    let cfg = ViommuConfig {
        bypass: boot_bypass,
        ..Default::default()
    };
    let (mut d, _) = Driver::new(cfg, &[], None);
    let ctl = Arc::new(Mutex::new(Ctl::default()));
    let mk = || {
        Arc::new(Failing {
            rec: RecordingMapper::new(),
            ctl: ctl.clone(),
        })
    };
    let (h1, h2) = (mk(), mk());
    d.dev.add_host_endpoint(A, h1.clone()).unwrap();
    d.dev.add_host_endpoint(B, h1.clone()).unwrap();
    d.dev.add_host_endpoint(C, h2.clone()).unwrap();
    d.dev.add_endpoint(E).unwrap();
    Rig { d, h1, h2, ctl }
}

impl Rig {
    fn send(&mut self, req: &[u8]) -> u8 {
        self.d.reset_data();
        self.d.status(req)
    }

    /// Every host holds what the engine says. `lenient`: a host whose endpoints are all
    /// unattached may also be empty (boot bypass is best effort: a failed RAM map is logged
    /// and the devices cannot DMA until attached).
    fn check_hosts(&self, what: &str, lenient: bool) {
        for (name, h, eps) in [("H1", &self.h1, &[A, B][..]), ("H2", &self.h2, &[C][..])] {
            let got = h.rec.mappings();
            let want = expected_host(&self.d, eps);
            let idle = eps
                .iter()
                .all(|&e| self.d.dev.domains().endpoint_domain(e) == Some(None));
            if lenient && idle && got.is_empty() {
                continue;
            }
            assert_eq!(got, want, "{name} after {what}");
        }
    }

    fn calls(&self) -> u64 {
        self.ctl.lock().unwrap().calls
    }

    fn failed(&self) -> u64 {
        self.ctl.lock().unwrap().failed
    }
}

/// The scenario without failures: per request, its status, the host calls it made and the
/// engine state after it.
fn clean_run(boot_bypass: bool) -> (Vec<u8>, Vec<u64>, Vec<EngineState>) {
    let mut r = rig(boot_bypass);
    let (mut statuses, mut calls, mut states) = (Vec::new(), Vec::new(), Vec::new());
    for (i, req) in scenario().iter().enumerate() {
        let before = r.calls();
        statuses.push(r.send(req));
        calls.push(r.calls() - before);
        states.push(engine(&r.d));
        r.check_hosts(&format!("clean request {i}"), false);
    }
    (statuses, calls, states)
}

#[test]
fn scenario_is_meaningful_without_failures() {
    for boot_bypass in [false, true] {
        let (statuses, calls, _) = clean_run(boot_bypass);
        assert!(statuses.iter().all(|&s| s == OK), "{statuses:?}");
        let total: u64 = calls.iter().sum();
        assert!(total >= 20, "{calls:?}");
        // Every kind of request makes host calls somewhere.
        let reqs = scenario();
        for t in 1..=4u8 {
            assert!(
                reqs.iter().zip(&calls).any(|(r, &c)| r[0] == t && c > 0),
                "request type {t} never reaches the host"
            );
        }
    }
}

/// Fail each host call of the scenario in turn with each error; returns the cases run.
fn inject_everywhere(boot_bypass: bool) -> usize {
    let (clean, calls, states) = clean_run(boot_bypass);
    let total: u64 = calls.iter().sum();
    let errors = [
        HostMapError::NoSpace,
        HostMapError::Invalid,
        HostMapError::OutOfRange,
        HostMapError::Failed("injected".into()),
    ];
    let mut cases = 0;
    let mut refused = 0;
    for n in 0..total {
        for err in &errors {
            let mut r = rig(boot_bypass);
            // Counted from the first request (registering endpoints may map boot-bypass RAM).
            let base = r.calls();
            r.ctl.lock().unwrap().fail_at = Some((base + n, err.clone()));
            let mut lenient = false;
            for (i, req) in scenario().iter().enumerate() {
                let what = format!(
                    "request {i} with host call {n} failing ({err}, boot bypass {boot_bypass})"
                );
                let before = engine(&r.d);
                let failed_before = r.failed();
                let status = r.send(req);
                if r.failed() > failed_before {
                    if status == Status::from(err) as u8 {
                        // Refused: nothing changed, and a retry behaves like the clean run.
                        refused += 1;
                        assert_eq!(engine(&r.d), before, "engine changed by {what}");
                        r.check_hosts(&what, false);
                        assert_eq!(r.send(req), clean[i], "retry of {what}");
                    } else {
                        // Only boot-bypass upkeep may fail without failing the request.
                        assert!(boot_bypass, "{what}: status {status}");
                        assert_eq!(status, clean[i], "status of {what}");
                        lenient = true;
                    }
                } else {
                    assert_eq!(status, clean[i], "status of {what}");
                }
                assert_eq!(engine(&r.d), states[i], "engine after {what}");
                r.check_hosts(&what, lenient);
            }
            assert_eq!(r.failed(), 1, "host call {n} was made");
            cases += 1;
        }
    }
    assert!(
        refused * 2 >= cases,
        "{refused} of {cases} failures reached the guest"
    );
    eprintln!(
        "fault injection (boot bypass {boot_bypass}): {cases} cases ({total} host calls x {} \
         errors), {refused} refused requests",
        errors.len()
    );
    cases
}

#[test]
fn every_host_call_failing_in_turn() {
    assert!(inject_everywhere(false) >= 80);
}

#[test]
fn every_host_call_failing_in_turn_with_boot_bypass() {
    assert!(inject_everywhere(true) >= 80);
}

/// A host that refuses mappings past a count, like VFIO type1's `dma_entry_limit` (ENOSPC).
struct Capped {
    rec: RecordingMapper,
    cap: usize,
}

impl HostMapper for Capped {
    fn map(&self, iova: u64, size: u64, gpa: u64, prot: Prot) -> Result<(), HostMapError> {
        if self.rec.mappings().len() >= self.cap {
            return Err(HostMapError::NoSpace);
        }
        self.rec.map(iova, size, gpa, prot)
    }
    fn unmap(&self, iova: u64, size: u64) -> Result<(), HostMapError> {
        self.rec.unmap(iova, size)
    }
}

#[test]
fn host_mapping_limit_gives_nomem_and_rolls_back_the_other_host() {
    let (mut d, _) = Driver::new(
        ViommuConfig {
            bypass: false,
            ..Default::default()
        },
        &[],
        None,
    );
    let roomy = Arc::new(Capped {
        rec: RecordingMapper::new(),
        cap: usize::MAX,
    });
    let small = Arc::new(Capped {
        rec: RecordingMapper::new(),
        cap: 5,
    });
    d.dev.add_host_endpoint(A, roomy.clone()).unwrap();
    d.dev.add_host_endpoint(C, small.clone()).unwrap();
    assert_eq!(d.status(&attach(1, A, 0)), OK);
    assert_eq!(d.status(&attach(1, C, 0)), OK);
    let mut ok = 0u64;
    for i in 0..8u64 {
        d.reset_data();
        let s = d.status(&map(1, i * P, (i + 1) * P - 1, i * P, RW));
        if s == OK {
            ok += 1;
        } else {
            assert_eq!(s, NOMEM, "past the host's limit");
        }
    }
    assert_eq!(ok, 5);
    assert_eq!(d.dev.domains().mappings(1).unwrap().len(), 5);
    // The host that had room was rolled back: both hold exactly the engine's 5 mappings.
    assert_eq!(roomy.rec.mappings(), small.rec.mappings());
    assert_eq!(roomy.rec.mappings().len(), 5);
    // Freeing one makes room for one more.
    assert_eq!(d.status(&unmap(1, 0, P - 1)), OK);
    assert_eq!(d.status(&map(1, 7 * P, 8 * P - 1, 0, RW)), OK);
    assert_eq!(d.status(&map(1, 8 * P, 9 * P - 1, 0, RW)), NOMEM);
    assert_eq!(roomy.rec.mappings(), small.rec.mappings());
    // A domain whose replay does not fit: ATTACH fails, nothing stays behind.
    assert_eq!(d.status(&detach(1, C)), OK);
    assert!(small.rec.mappings().is_empty());
    for i in 0..6u64 {
        assert_eq!(
            d.status(&map(1, (0x100 + i) * P, (0x101 + i) * P - 1, 0, RW)),
            OK
        );
    }
    assert_eq!(d.status(&attach(1, C, 0)), NOMEM);
    assert!(
        small.rec.mappings().is_empty(),
        "partial replay left behind"
    );
    assert_eq!(d.dev.domains().endpoint_domain(C), Some(None));
    let c = d.dev.counters().snapshot();
    assert_eq!(c.status(Status::NoMem), 5);
}

/// A recording mapper whose next `map_failures` maps and next `unmap_failures` unmaps fail
/// with NoSpace / Failed (a VFIO container that refuses to unmap what it just mapped).
/// Also fails the map call numbered `fail_map_at` (counting from 0).
struct Flaky {
    rec: RecordingMapper,
    map_failures: AtomicU64,
    unmap_failures: AtomicU64,
    maps: AtomicU64,
    fail_map_at: AtomicU64,
}

impl Default for Flaky {
    fn default() -> Self {
        Flaky {
            rec: RecordingMapper::new(),
            map_failures: AtomicU64::new(0),
            unmap_failures: AtomicU64::new(0),
            maps: AtomicU64::new(0),
            fail_map_at: AtomicU64::new(u64::MAX),
        }
    }
}

fn take(n: &AtomicU64) -> bool {
    n.fetch_update(SeqCst, SeqCst, |v| v.checked_sub(1)).is_ok()
}

impl HostMapper for Flaky {
    fn map(&self, iova: u64, size: u64, gpa: u64, prot: Prot) -> Result<(), HostMapError> {
        let n = self.maps.fetch_add(1, SeqCst);
        if take(&self.map_failures) || n == self.fail_map_at.load(SeqCst) {
            return Err(HostMapError::NoSpace);
        }
        self.rec.map(iova, size, gpa, prot)
    }
    fn unmap(&self, iova: u64, size: u64) -> Result<(), HostMapError> {
        if take(&self.unmap_failures) {
            return Err(HostMapError::Failed("injected unmap failure".into()));
        }
        self.rec.unmap(iova, size)
    }
}

impl viommu::DmaSpace for Flaky {
    /// Records only; never touches `host_addr`.
    unsafe fn map(
        &self,
        iova: u64,
        size: u64,
        host_addr: u64,
        prot: Prot,
    ) -> Result<(), HostMapError> {
        HostMapper::map(self, iova, size, host_addr, prot)
    }
    fn unmap(&self, iova: u64, size: u64) -> Result<(), HostMapError> {
        HostMapper::unmap(self, iova, size)
    }
}

/// What the engine says host `eps` must hold equals what it holds.
fn host_matches(d: &Driver, h: &Flaky, eps: &[u32]) -> bool {
    h.rec.mappings() == expected_host(d, eps)
}

/// A MAP into a domain with two host address spaces fails in the second; undoing it in the
/// first fails too (a double fault). A transient failure is retried away; a lasting one leaves
/// the first container marked: nothing more is mapped into it (DEVERR) until the stale
/// mapping could be removed, which is retried on later requests and on reset.
#[test]
fn failed_rollback_is_retried_then_blocks_the_container() {
    let cfg = ViommuConfig {
        bypass: false,
        ..Default::default()
    };
    let (mut d, _) = Driver::new(cfg, &[], None);
    let h1 = Arc::new(Flaky::default());
    let h2 = Arc::new(Flaky::default());
    d.dev.add_host_endpoint(A, h1.clone()).unwrap();
    d.dev.add_host_endpoint(C, h2.clone()).unwrap();
    assert_eq!(d.status(&attach(1, A, 0)), OK);
    assert_eq!(d.status(&attach(1, C, 0)), OK);
    assert_eq!(d.status(&map(1, 0, P - 1, 0x100 * P, RW)), OK);

    // Transient: the rollback's first unmap fails, a retry succeeds.
    h2.map_failures.store(1, SeqCst);
    h1.unmap_failures.store(1, SeqCst);
    assert_eq!(d.status(&map(1, P, 2 * P - 1, 0x101 * P, RW)), NOMEM);
    assert!(
        host_matches(&d, &h1, &[A]),
        "stale mapping after a retried rollback"
    );
    assert_eq!(d.status(&map(1, P, 2 * P - 1, 0x101 * P, RW)), OK);

    // Lasting: every retry fails; the container holds a mapping the guest never got.
    h2.map_failures.store(1, SeqCst);
    h1.unmap_failures.store(1000, SeqCst);
    assert_eq!(d.status(&map(1, 2 * P, 3 * P - 1, 0x102 * P, RW)), NOMEM);
    assert!(h1.unmap_failures.load(SeqCst) < 1000, "no rollback tried");
    assert!(
        h1.unmap_failures.load(SeqCst) > 1000 - 10,
        "rollback retried without bound"
    );
    // Marked: further MAPs are refused before reaching either host.
    let maps = (h1.maps.load(SeqCst), h2.maps.load(SeqCst));
    assert_eq!(d.status(&map(1, 3 * P, 4 * P - 1, 0x103 * P, RW)), DEVERR);
    assert_eq!(d.status(&map(1, 3 * P, 4 * P - 1, 0x103 * P, RW)), DEVERR);
    assert_eq!((h1.maps.load(SeqCst), h2.maps.load(SeqCst)), maps);
    assert_eq!(d.dev.domains().mappings(1).unwrap().len(), 2);
    // ...and so is replaying a domain into it.
    assert_eq!(d.status(&attach(2, A, 0)), DEVERR);
    assert_eq!(d.dev.domains().endpoint_domain(A), Some(Some(1)));
    // The other container is unaffected: a domain of its own still works.
    assert_eq!(d.status(&attach(3, C, 0)), OK);
    assert_eq!(d.status(&map(3, 0, P - 1, 0x200 * P, R)), OK);
    assert!(host_matches(&d, &h2, &[C]));

    // The host heals: the next request on the container removes the stale mapping first.
    h1.unmap_failures.store(0, SeqCst);
    assert_eq!(d.status(&map(1, 3 * P, 4 * P - 1, 0x103 * P, RW)), OK);
    assert!(
        host_matches(&d, &h1, &[A]),
        "stale mapping left after healing"
    );

    // Lasting again, then a device reset while it still fails, then after it heals.
    assert_eq!(d.status(&attach(1, C, 0)), OK);
    h2.map_failures.store(1, SeqCst);
    h1.unmap_failures.store(1000, SeqCst);
    assert_eq!(d.status(&map(1, 4 * P, 5 * P - 1, 0x104 * P, RW)), NOMEM);
    assert!(h1.rec.mappings().contains_key(&(4 * P)));
    h1.unmap_failures.store(0, SeqCst);
    d.dev.reset();
    assert!(
        h1.rec.mappings().is_empty() && h2.rec.mappings().is_empty(),
        "reset left host mappings: {:?}",
        h1.rec.mappings()
    );
}

/// The same double fault inside a shadow: a guest mapping crossing two RAM regions is two host
/// mappings; the second fails and removing the first fails too. The shadow retries, then keeps
/// the piece as stale and refuses to map anything (DEVERR) until it could remove it.
#[test]
fn failed_rollback_inside_a_shadow_blocks_its_container() {
    let ram = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[
        (vm_memory::GuestAddress(0), P as usize),
        (vm_memory::GuestAddress(P), P as usize),
    ])
    .unwrap();
    let host = Arc::new(Flaky::default());
    let shadow = Arc::new(Shadow::new(
        host.clone(),
        vm_memory::GuestMemoryAtomic::new(ram),
    ));
    let cfg = ViommuConfig {
        bypass: false,
        ..Default::default()
    };
    let (mut d, _) = Driver::new(cfg, &[], None);
    d.dev.add_host_endpoint(A, shadow.clone()).unwrap();
    assert_eq!(d.status(&attach(1, A, 0)), OK);
    // Transient: retried away.
    host.fail_map_at.store(host.maps.load(SeqCst) + 1, SeqCst);
    host.unmap_failures.store(1, SeqCst);
    assert_eq!(d.status(&map(1, 0x10 * P, 0x12 * P - 1, 0, RW)), NOMEM);
    assert!(
        host.rec.mappings().is_empty(),
        "stale piece after a retried rollback"
    );
    // Lasting.
    host.fail_map_at.store(host.maps.load(SeqCst) + 1, SeqCst);
    host.unmap_failures.store(1000, SeqCst);
    assert_eq!(d.status(&map(1, 0x10 * P, 0x12 * P - 1, 0, RW)), NOMEM);
    assert_eq!(host.rec.mappings().len(), 1, "the stale piece");
    assert!(host.unmap_failures.load(SeqCst) > 1000 - 10);
    let maps = host.maps.load(SeqCst);
    assert_eq!(d.status(&map(1, 0x20 * P, 0x21 * P - 1, 0, RW)), DEVERR);
    assert_eq!(
        host.maps.load(SeqCst),
        maps,
        "mapped into a container needing reset"
    );
    assert!(d.dev.domains().mappings(1).unwrap().is_empty());
    // Healed: the next MAP removes the stale piece first.
    host.unmap_failures.store(0, SeqCst);
    assert_eq!(d.status(&map(1, 0x20 * P, 0x21 * P - 1, 0, RW)), OK);
    let want: Vec<u64> = shadow.host_mappings().iter().map(|p| p.iova).collect();
    let got: Vec<u64> = host.rec.mappings().keys().copied().collect();
    assert_eq!(got, want);
    assert_eq!(got, vec![0x20 * P]);
}
