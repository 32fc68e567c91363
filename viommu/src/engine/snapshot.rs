//! Saved state of the engine: the default (identity or blocked), the geometry and reserved
//! regions it was built with, every endpoint's space, every space with its kind and mappings.
//!
//! Restore goes through the engine's own operations (attach, map), so every saved value is
//! checked by the same rules as a guest request and every mapping is replayed into the host
//! mappers of its space (one host call per mapping and host address space); the views are
//! published before it returns. Host mappers, guest RAM and the pin deadline are the VMM's:
//! the engine restored into must have been built with the same endpoints (and host-ness).

use super::Engine;
use crate::engine::fault::Fault;
use crate::engine::geometry::{Geometry, ResvKind, ResvRegion};
use crate::engine::mapping::{Access, Mapping, Miss};
use crate::engine::space::SpaceKind;
use crate::snapshot::{Reader, Result, SnapshotError, Writer};

/// Bytes one saved mapping takes (start, end, gpa, flags).
const MAPPING_BYTES: usize = 8 + 8 + 8 + 1;
/// Most reserved regions a saved engine may hold (configurations have a handful).
const MAX_RESV: usize = 1024;

/// One endpoint as saved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EndpointState {
    pub(crate) id: u32,
    pub(crate) space: Option<u32>,
    pub(crate) host: bool,
}

/// One address space as saved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SpaceState {
    pub(crate) id: u32,
    pub(crate) kind: SpaceKind,
    pub(crate) mappings: Vec<Mapping>,
}

/// Everything the engine saves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EngineState {
    pub(crate) default_identity: bool,
    pub(crate) geometry: Geometry,
    pub(crate) resv: Vec<ResvRegion>,
    pub(crate) endpoints: Vec<EndpointState>,
    pub(crate) spaces: Vec<SpaceState>,
}

fn put_mapping(w: &mut Writer, m: &Mapping) {
    w.u64(m.start);
    w.u64(m.end);
    w.u64(m.gpa);
    w.u8(u8::from(m.read) | u8::from(m.write) << 1 | u8::from(m.mmio) << 2);
}

fn get_mapping(r: &mut Reader<'_>) -> Result<Mapping> {
    let (start, end, gpa) = (r.u64()?, r.u64()?, r.u64()?);
    let flags = r.u8()?;
    if flags & !7 != 0 {
        return Err(SnapshotError::Invalid(format!(
            "mapping {start:#x}: flags {flags:#x}"
        )));
    }
    Ok(Mapping {
        start,
        end,
        gpa,
        read: flags & 1 != 0,
        write: flags & 2 != 0,
        mmio: flags & 4 != 0,
    })
}

fn put_opt_u32(w: &mut Writer, v: Option<u32>) {
    w.bool(v.is_some());
    w.u32(v.unwrap_or(0));
}

fn get_opt_u32(r: &mut Reader<'_>) -> Result<Option<u32>> {
    let some = r.bool()?;
    let v = r.u32()?;
    Ok(some.then_some(v))
}

/// Encode one engine fault (pending faults of the VT-d front end).
pub(crate) fn put_fault(w: &mut Writer, f: &Fault) {
    w.u32(f.endpoint);
    w.u64(f.address);
    w.u8(match f.access {
        Access::Read => 0,
        Access::Write => 1,
        Access::ReadWrite => 2,
    });
    w.u8(match f.miss {
        Miss::NoDomain => 0,
        Miss::NoMapping => 1,
    });
}

/// Decode one engine fault.
pub(crate) fn get_fault(r: &mut Reader<'_>) -> Result<Fault> {
    let endpoint = r.u32()?;
    let address = r.u64()?;
    let access = match r.u8()? {
        0 => Access::Read,
        1 => Access::Write,
        2 => Access::ReadWrite,
        v => return Err(SnapshotError::Invalid(format!("fault access {v}"))),
    };
    let miss = match r.u8()? {
        0 => Miss::NoDomain,
        1 => Miss::NoMapping,
        v => return Err(SnapshotError::Invalid(format!("fault reason {v}"))),
    };
    Ok(Fault {
        endpoint,
        address,
        access,
        miss,
    })
}

/// Bytes one saved fault takes.
pub(crate) const FAULT_BYTES: usize = 4 + 8 + 1 + 1;

impl EngineState {
    pub(crate) fn encode(&self, w: &mut Writer) {
        w.bool(self.default_identity);
        let g = &self.geometry;
        w.u64(g.page_size_mask);
        w.u64(g.input_start);
        w.u64(g.input_end);
        w.u32(g.domain_start);
        w.u32(g.domain_end);
        w.count(self.resv.len());
        for r in &self.resv {
            w.u64(r.start);
            w.u64(r.end);
            w.u8(match r.kind {
                ResvKind::Reserved => 0,
                ResvKind::Msi => 1,
            });
        }
        w.count(self.endpoints.len());
        for e in &self.endpoints {
            w.u32(e.id);
            put_opt_u32(w, e.space);
            w.bool(e.host);
        }
        w.count(self.spaces.len());
        for s in &self.spaces {
            w.u32(s.id);
            w.u8(match s.kind {
                SpaceKind::Paging => 0,
                SpaceKind::Identity => 1,
            });
            w.count(s.mappings.len());
            for m in &s.mappings {
                put_mapping(w, m);
            }
        }
    }

    /// Decode, allocating no more than `limits` allow.
    pub(crate) fn decode(
        r: &mut Reader<'_>,
        limits: &crate::engine::limits::Limits,
    ) -> Result<Self> {
        let default_identity = r.bool()?;
        let geometry = Geometry {
            page_size_mask: r.u64()?,
            input_start: r.u64()?,
            input_end: r.u64()?,
            domain_start: r.u32()?,
            domain_end: r.u32()?,
        };
        let n = r.count("reserved regions", MAX_RESV, 17)?;
        let mut resv = Vec::with_capacity(n);
        for _ in 0..n {
            let (start, end) = (r.u64()?, r.u64()?);
            let kind = match r.u8()? {
                0 => ResvKind::Reserved,
                1 => ResvKind::Msi,
                v => return Err(SnapshotError::Invalid(format!("reserved region kind {v}"))),
            };
            resv.push(ResvRegion { start, end, kind });
        }
        let n = r.count("endpoints", limits.max_endpoints, 10)?;
        let mut endpoints = Vec::with_capacity(n);
        for _ in 0..n {
            endpoints.push(EndpointState {
                id: r.u32()?,
                space: get_opt_u32(r)?,
                host: r.bool()?,
            });
        }
        let n = r.count("domains", limits.max_domains, 13)?;
        let mut spaces = Vec::with_capacity(n);
        let mut total = 0usize;
        for _ in 0..n {
            let id = r.u32()?;
            let kind = match r.u8()? {
                0 => SpaceKind::Paging,
                1 => SpaceKind::Identity,
                v => return Err(SnapshotError::Invalid(format!("domain {id}: kind {v}"))),
            };
            let max = limits
                .max_mappings_per_domain
                .min(limits.max_total_mappings - total);
            let k = r.count("mappings in one domain", max, MAPPING_BYTES)?;
            total += k;
            let mut mappings = Vec::with_capacity(k);
            for _ in 0..k {
                mappings.push(get_mapping(r)?);
            }
            spaces.push(SpaceState { id, kind, mappings });
        }
        Ok(EngineState {
            default_identity,
            geometry,
            resv,
            endpoints,
            spaces,
        })
    }
}

fn invalid(what: String) -> SnapshotError {
    SnapshotError::Invalid(what)
}

impl Engine {
    /// The engine's state.
    pub(crate) fn state(&self) -> EngineState {
        EngineState {
            default_identity: self.default_identity,
            geometry: self.geometry,
            resv: self.resv.clone(),
            endpoints: self
                .endpoints
                .iter()
                .map(|(&id, e)| EndpointState {
                    id,
                    space: e.space,
                    host: e.host.is_some(),
                })
                .collect(),
            spaces: self
                .spaces
                .iter()
                .map(|(&id, s)| SpaceState {
                    id,
                    kind: s.kind,
                    mappings: s.table.state().values().copied().collect(),
                })
                .collect(),
        }
    }

    /// The caps on guest-created state (what a decoded state may hold).
    pub(crate) fn limits(&self) -> crate::engine::limits::Limits {
        self.limits
    }

    /// Append the state to `w`.
    pub(crate) fn encode_state(&self, w: &mut Writer) {
        self.state().encode(w);
    }

    /// Check `s` against this engine's configuration and endpoints (the engine must hold no
    /// spaces yet), then rebuild every space through attach and map (replaying each mapping
    /// into the hosts) and publish. On error the engine is reset to no spaces.
    pub(crate) fn apply_state(&mut self, s: &EngineState) -> Result<()> {
        if !self.spaces.is_empty() {
            return Err(SnapshotError::Mismatch(
                "the IOMMU already holds domains (restore needs a fresh device)".into(),
            ));
        }
        if s.geometry != self.geometry {
            return Err(SnapshotError::Mismatch(format!(
                "geometry {:?}, this device has {:?}",
                s.geometry, self.geometry
            )));
        }
        if s.resv != self.resv {
            return Err(SnapshotError::Mismatch(
                "reserved regions differ from this device's".into(),
            ));
        }
        let mine: Vec<(u32, bool)> = self
            .endpoints
            .iter()
            .map(|(&id, e)| (id, e.host.is_some()))
            .collect();
        let saved: Vec<(u32, bool)> = s.endpoints.iter().map(|e| (e.id, e.host)).collect();
        if mine != saved {
            return Err(SnapshotError::Mismatch(format!(
                "endpoints (id, assigned) {saved:x?}, this device has {mine:x?}"
            )));
        }
        // Structure first: unique increasing ids, each space with its endpoints, no endpoint
        // in a space that was not saved, identity spaces empty.
        let mut prev: Option<u32> = None;
        for sp in &s.spaces {
            if prev.is_some_and(|p| p >= sp.id) {
                return Err(invalid(format!("domain {} out of order", sp.id)));
            }
            prev = Some(sp.id);
            if sp.kind == SpaceKind::Identity && !sp.mappings.is_empty() {
                return Err(invalid(format!("identity domain {} has mappings", sp.id)));
            }
            if !s.endpoints.iter().any(|e| e.space == Some(sp.id)) {
                return Err(invalid(format!("domain {} has no endpoint", sp.id)));
            }
        }
        for e in &s.endpoints {
            if let Some(d) = e.space {
                if s.spaces.binary_search_by_key(&d, |sp| sp.id).is_err() {
                    return Err(invalid(format!(
                        "endpoint {:#x} in domain {d}, which was not saved",
                        e.id
                    )));
                }
            }
        }
        let res = self.rebuild(s);
        if res.is_err() {
            self.reset();
        }
        res
    }

    fn rebuild(&mut self, s: &EngineState) -> Result<()> {
        // The default first (while nothing is attached), then per space: its first endpoint
        // (creates it, empty), every mapping (one host call per host), the other endpoints
        // (a new host replays the space).
        self.set_default_identity(s.default_identity);
        for sp in &s.spaces {
            let mut members = s.endpoints.iter().filter(|e| e.space == Some(sp.id));
            let first = members.next().map(|e| e.id);
            if let Some(ep) = first {
                self.attach(ep, sp.id, sp.kind)
                    .map_err(|e| invalid(format!("endpoint {ep:#x} into domain {}: {e}", sp.id)))?;
            }
            for m in &sp.mappings {
                self.map(sp.id, *m).map_err(|e| {
                    invalid(format!(
                        "domain {}: mapping {:#x}..={:#x} -> {:#x}: {e}",
                        sp.id, m.start, m.end, m.gpa
                    ))
                })?;
            }
            for e in members {
                self.attach(e.id, sp.id, sp.kind).map_err(|err| {
                    invalid(format!("endpoint {:#x} into domain {}: {err}", e.id, sp.id))
                })?;
            }
        }
        self.publish();
        Ok(())
    }
}

/// Kind of a standalone engine blob.
const KIND: [u8; 4] = *b"ENGN";

impl Engine {
    /// The engine's state as a standalone blob (front ends embed it in their own).
    pub fn save_state(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.encode_state(&mut w);
        crate::snapshot::frame(KIND, &w.into_inner())
    }

    /// Restore a blob from [`Self::save_state`] into this engine, built with the same
    /// configuration and endpoints and holding no domains: every mapping is checked like a
    /// guest request and replayed into the host mappers, the views are published. On error
    /// the engine holds no domains.
    pub fn restore_state(&mut self, blob: &[u8]) -> Result<()> {
        let payload = crate::snapshot::unframe(KIND, blob)?;
        let mut r = Reader::new(payload);
        let s = EngineState::decode(&mut r, &self.limits)?;
        r.finish()?;
        self.apply_state(&s)
    }
}
