//! Failing hosts: every host-mapper call a request sequence makes is failed in turn (with each
//! kind of host error), through the request queue as the guest sends them. After each request
//! the guest's status, the engine's state and the host address spaces are checked: a failed
//! request reports the host's error, leaves the engine exactly as before, and every host
//! address space holds exactly what the engine says (no leaked, no stale mapping).

mod common;

use common::*;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use viommu::RecordingMapper;
use viommu::{HostMapError, HostMapper, Prot, Status, ViommuConfig};

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
