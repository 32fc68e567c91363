//! Property test: random ATTACH/DETACH/MAP/UNMAP/bypass sequences against a plain reference
//! model; every status and every published translation must agree with the model.

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use viommu::FaultReporter;
use viommu::Miss;
use viommu::{Access, Status};
use viommu::{Domains, EndpointHandle, Geometry, Limits};

const PAGE: u64 = 0x1000;
const EPS: [u32; 3] = [0x08, 0x10, 0x18];
const UNKNOWN_EP: u32 = 0x99;

#[derive(Clone, Debug)]
enum Op {
    Attach {
        d: u32,
        e: usize,
        bypass: bool,
    },
    Detach {
        d: u32,
        e: usize,
    },
    Map {
        d: u32,
        start: u64,
        pages: u64,
        gpa: u64,
        flags: u32,
        misalign: bool,
    },
    Unmap {
        d: u32,
        start: u64,
        pages: u64,
    },
    SetBypass(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0..4u32, 0..4usize, prop::bool::weighted(0.2))
            .prop_map(|(d, e, bypass)| Op::Attach { d, e, bypass }),
        1 => (0..4u32, 0..4usize).prop_map(|(d, e)| Op::Detach { d, e }),
        4 => (0..4u32, 0..48u64, 1..8u64, 0..64u64, 0..4u32, prop::bool::weighted(0.05))
            .prop_map(|(d, start, pages, gpa, flags, misalign)| Op::Map {
                d, start, pages, gpa, flags, misalign
            }),
        2 => (0..4u32, 0..56u64, 1..16u64).prop_map(|(d, start, pages)| Op::Unmap { d, start, pages }),
        1 => prop::bool::ANY.prop_map(Op::SetBypass),
    ]
}

#[derive(Clone, Copy, Debug)]
struct M {
    start: u64,
    end: u64,
    gpa: u64,
    r: bool,
    w: bool,
}

#[derive(Default)]
struct Model {
    bypass: bool,
    ep: BTreeMap<u32, Option<u32>>,
    dom: BTreeMap<u32, (bool, Vec<M>)>,
}

impl Model {
    fn ep_id(e: usize) -> u32 {
        EPS.get(e).copied().unwrap_or(UNKNOWN_EP)
    }

    fn leave(&mut self, e: u32) {
        if let Some(Some(d)) = self.ep.get(&e).copied() {
            self.ep.insert(e, None);
            if !self.ep.values().any(|x| *x == Some(d)) {
                self.dom.remove(&d);
            }
        }
    }

    fn apply(&mut self, op: &Op) -> Status {
        match *op {
            Op::Attach { d, e, bypass } => {
                let e = Self::ep_id(e);
                let Some(cur) = self.ep.get(&e).copied() else {
                    return Status::NoEnt;
                };
                if let Some((b, _)) = self.dom.get(&d) {
                    if *b != bypass {
                        return Status::Inval;
                    }
                }
                if cur == Some(d) {
                    return Status::Ok;
                }
                self.leave(e);
                self.dom.entry(d).or_insert((bypass, Vec::new()));
                self.ep.insert(e, Some(d));
                Status::Ok
            }
            Op::Detach { d, e } => {
                let e = Self::ep_id(e);
                match self.ep.get(&e) {
                    None => Status::NoEnt,
                    Some(x) if *x != Some(d) => Status::Inval,
                    Some(_) => {
                        self.leave(e);
                        Status::Ok
                    }
                }
            }
            Op::Map {
                d,
                start,
                pages,
                gpa,
                flags,
                misalign,
            } => {
                let Some((bypass, maps)) = self.dom.get_mut(&d) else {
                    return Status::NoEnt;
                };
                if *bypass {
                    return Status::Inval;
                }
                if misalign {
                    return Status::Range;
                }
                let (s, e) = (start * PAGE, (start + pages) * PAGE - 1);
                if maps.iter().any(|m| m.start <= e && s <= m.end) {
                    return Status::Inval;
                }
                maps.push(M {
                    start: s,
                    end: e,
                    gpa: gpa * PAGE,
                    r: flags & 1 != 0,
                    w: flags & 2 != 0,
                });
                Status::Ok
            }
            Op::Unmap { d, start, pages } => {
                let Some((bypass, maps)) = self.dom.get_mut(&d) else {
                    return Status::NoEnt;
                };
                if *bypass {
                    return Status::Inval;
                }
                let (s, e) = (start * PAGE, (start + pages) * PAGE - 1);
                let inside = |m: &M| s <= m.start && m.end <= e;
                let touches = |m: &M| m.start <= e && s <= m.end;
                if maps.iter().any(|m| touches(m) && !inside(m)) {
                    return Status::Range;
                }
                maps.retain(|m| !inside(m));
                Status::Ok
            }
            Op::SetBypass(b) => {
                self.bypass = b;
                Status::Ok
            }
        }
    }

    fn translate(&self, e: u32, iova: u64, write: bool) -> Result<u64, Miss> {
        match self.ep[&e] {
            None if self.bypass => Ok(iova),
            None => Err(Miss::NoDomain),
            Some(d) => {
                let (bypass, maps) = &self.dom[&d];
                if *bypass {
                    return Ok(iova);
                }
                maps.iter()
                    .find(|m| m.start <= iova && iova <= m.end && if write { m.w } else { m.r })
                    .map(|m| m.gpa + (iova - m.start))
                    .ok_or(Miss::NoMapping)
            }
        }
    }
}

fn run(ops: &[(Op, bool)]) -> Result<(), TestCaseError> {
    let mut dut = Domains::new(
        Geometry::default(),
        Limits::default(),
        Vec::new(),
        true,
        Arc::new(FaultReporter::new(Default::default(), Default::default())),
    );
    let mut model = Model {
        bypass: true,
        ..Default::default()
    };
    let handles: Vec<EndpointHandle> = EPS
        .iter()
        .map(|&e| {
            model.ep.insert(e, None);
            dut.add_endpoint(e, None).unwrap()
        })
        .collect();
    for (i, (op, publish)) in ops.iter().enumerate() {
        let want = model.apply(op);
        let got = match *op {
            Op::Attach { d, e, bypass } => dut.attach(d, Model::ep_id(e), u32::from(bypass)),
            Op::Detach { d, e } => dut.detach(d, Model::ep_id(e)),
            Op::Map {
                d,
                start,
                pages,
                gpa,
                flags,
                misalign,
            } => {
                let off = if misalign { 0x800 } else { 0 };
                dut.map(
                    d,
                    start * PAGE + off,
                    (start + pages) * PAGE - 1 + off,
                    gpa * PAGE,
                    flags,
                )
            }
            Op::Unmap { d, start, pages } => dut.unmap(d, start * PAGE, (start + pages) * PAGE - 1),
            Op::SetBypass(b) => {
                dut.set_bypass(b);
                Status::Ok
            }
        };
        prop_assert_eq!(got, want, "op #{} {:?}", i, op);
        // Several requests per batch, like a guest queueing many MAPs before one kick.
        if !publish && i + 1 < ops.len() {
            continue;
        }
        dut.publish();
        for h in &handles {
            let view = h.view();
            for page in 0..66u64 {
                let iova = page * PAGE + 0x123;
                for write in [false, true] {
                    let access = if write { Access::Write } else { Access::Read };
                    let got = view.translate(iova, access).map(|m| m.gpa_of(iova));
                    let want = model.translate(h.id(), iova, write);
                    prop_assert_eq!(
                        got,
                        want,
                        "after op #{} ep {:#x} iova {:#x} write {}",
                        i,
                        h.id(),
                        iova,
                        write
                    );
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn translations_agree_with_the_model(
        ops in prop::collection::vec((op(), prop::bool::weighted(0.5)), 1..80)
    ) {
        run(&ops)?;
    }
}
