//! Saved state of one VT-d unit: the register file (root table address, invalidation queue
//! head/tail/address, fault records, event registers), the context entry last read for every
//! endpoint, the page table each live domain is walked from, the faults reported but not yet
//! recorded, the counters and the engine (every domain and mapping).
//!
//! The walks' results are not re-derived from guest memory on restore: the engine's mappings
//! are what the guest had invalidated when it was saved (caching mode), replayed as saved.

use super::{Binding, Unit, MAX_PENDING_FAULTS, PASS_THROUGH_SPACE};
use crate::engine::space::SpaceKind;
use crate::engine::state::snapshot::{get_fault, put_fault, EngineState, FAULT_BYTES};
use crate::snapshot::{frame, unframe, Reader, Result, SnapshotError, Writer};
use crate::vtd::caps::{AddressWidth, Capabilities};
use crate::vtd::counters::CounterSnapshot;
use crate::vtd::fault::FaultReason;
use crate::vtd::regs::{offset, MsiMessage, Registers};
use crate::vtd::tables::{ContextEntry, PageTable, TableFault, Translation};
use std::collections::BTreeMap;

/// Kind of a VT-d blob.
const KIND: [u8; 4] = *b"VTD1";
/// Bytes one saved context takes at least.
const CONTEXT_BYTES: usize = 3;
/// Bytes one saved domain table takes.
const DOMAIN_BYTES: usize = 2 + 8 + 1;

fn invalid(what: String) -> SnapshotError {
    SnapshotError::Invalid(format!("vtd: {what}"))
}

fn put_table(w: &mut Writer, t: &PageTable) {
    w.u64(t.root);
    w.u8(t.aw.bits() as u8);
}

fn get_table(r: &mut Reader<'_>, caps: &Capabilities) -> Result<PageTable> {
    let root = r.u64()?;
    let bits = r.u8()?;
    let aw = AddressWidth::from_bits(u32::from(bits))
        .filter(|aw| caps.context_width(aw.aw_field()).is_some())
        .ok_or_else(|| invalid(format!("page table width {bits}")))?;
    if root & !caps.haw_page_mask() != 0 {
        return Err(invalid(format!("page table address {root:#x}")));
    }
    Ok(PageTable { root, aw })
}

fn put_binding(w: &mut Writer, b: Option<Binding>) {
    match b {
        None => w.u8(0),
        Some(Binding::Entry(e)) => {
            w.u8(1);
            w.u16(e.did);
            w.bool(e.fpd);
            match e.translation {
                Translation::PageTable(t) => {
                    w.u8(0);
                    put_table(w, &t);
                }
                Translation::PassThrough => w.u8(1),
            }
        }
        Some(Binding::Fault(f)) => {
            w.u8(2);
            w.u8(f.reason.code());
            w.bool(f.fpd);
        }
    }
}

fn get_binding(r: &mut Reader<'_>, caps: &Capabilities) -> Result<Option<Binding>> {
    Ok(match r.u8()? {
        0 => None,
        1 => {
            let did = r.u16()?;
            let fpd = r.bool()?;
            let translation = match r.u8()? {
                0 => Translation::PageTable(get_table(r, caps)?),
                1 => Translation::PassThrough,
                t => return Err(invalid(format!("context translation type {t}"))),
            };
            Some(Binding::Entry(ContextEntry {
                did,
                fpd,
                translation,
            }))
        }
        2 => {
            let code = r.u8()?;
            let reason = FaultReason::from_code(code)
                .ok_or_else(|| invalid(format!("fault reason {code:#x}")))?;
            Some(Binding::Fault(TableFault {
                reason,
                fpd: r.bool()?,
            }))
        }
        t => return Err(invalid(format!("context binding kind {t}"))),
    })
}

fn put_counters(w: &mut Writer, c: &CounterSnapshot) {
    for v in [
        c.maps,
        c.unmaps,
        c.invalidations,
        c.waits,
        c.walk_reads,
        c.faults,
        c.faults_dropped,
        c.errors,
    ] {
        w.u64(v);
    }
}

fn get_counters(r: &mut Reader<'_>) -> Result<CounterSnapshot> {
    Ok(CounterSnapshot {
        maps: r.u64()?,
        unmaps: r.u64()?,
        invalidations: r.u64()?,
        waits: r.u64()?,
        walk_reads: r.u64()?,
        faults: r.u64()?,
        faults_dropped: r.u64()?,
        errors: r.u64()?,
    })
}

impl Unit {
    /// The unit's state as one blob (call while no vCPU or device runs).
    pub fn save_state(&self) -> Vec<u8> {
        let st = self.lock();
        let mut w = Writer::new();
        st.regs.encode_state(&mut w);
        w.count(st.contexts.len());
        for (&sid, &b) in &st.contexts {
            w.u16(sid);
            put_binding(&mut w, b);
        }
        w.count(st.domains.len());
        for (&did, t) in &st.domains {
            w.u16(did);
            put_table(&mut w, t);
        }
        let pending: Vec<_> = self.faults.lock_pending().iter().copied().collect();
        w.count(pending.len());
        for f in &pending {
            put_fault(&mut w, f);
        }
        put_counters(&mut w, &self.counters.snapshot());
        st.engine.encode_state(&mut w);
        frame(KIND, &w.into_inner())
    }

    /// Restore a blob from [`Self::save_state`] into a unit built with the same configuration
    /// and endpoints, fresh from [`Unit::new`] (no domains). Everything is checked before
    /// anything changes, except the domains, rebuilt through the engine's checks (every
    /// mapping replayed into the host mappers, views published): on error the unit is left
    /// in its reset state (no domains, reset registers, every endpoint identity).
    pub fn restore_state(&self, blob: &[u8]) -> Result<()> {
        let payload = unframe(KIND, blob)?;
        let mut st = self.lock();
        let caps = st.caps;
        let mut r = Reader::new(payload);
        let regs = Registers::decode_state(&mut r, caps)?;
        let n = r.count("contexts", st.contexts.len(), CONTEXT_BYTES)?;
        let mut contexts = BTreeMap::new();
        for _ in 0..n {
            let sid = r.u16()?;
            let b = get_binding(&mut r, &caps)?;
            if contexts.insert(sid, b).is_some() {
                return Err(invalid(format!("context {sid:#06x} saved twice")));
            }
        }
        let n = r.count("domain tables", 1 << 16, DOMAIN_BYTES)?;
        let mut domains = BTreeMap::new();
        for _ in 0..n {
            let did = r.u16()?;
            let t = get_table(&mut r, &caps)?;
            if domains.insert(did, t).is_some() {
                return Err(invalid(format!("domain {did} saved twice")));
            }
        }
        let n = r.count("pending faults", MAX_PENDING_FAULTS, FAULT_BYTES)?;
        let mut pending = Vec::with_capacity(n);
        for _ in 0..n {
            pending.push(get_fault(&mut r)?);
        }
        let counters = get_counters(&mut r)?;
        let engine = EngineState::decode(&mut r, &st.engine.limits())?;
        r.finish()?;
        if !contexts.keys().eq(st.contexts.keys()) {
            return Err(SnapshotError::Mismatch(format!(
                "vtd endpoints {:x?}, this unit has {:x?}",
                contexts.keys().collect::<Vec<_>>(),
                st.contexts.keys().collect::<Vec<_>>()
            )));
        }
        if engine.default_identity == regs.translation_enabled() {
            return Err(invalid("identity default does not follow GSTS.TES".into()));
        }
        for sp in &engine.spaces {
            let ok = match sp.kind {
                SpaceKind::Identity => sp.id == PASS_THROUGH_SPACE,
                SpaceKind::Paging => u16::try_from(sp.id).is_ok_and(|d| domains.contains_key(&d)),
            };
            if !ok {
                return Err(invalid(format!(
                    "engine space {} has no domain table",
                    sp.id
                )));
            }
        }
        for did in domains.keys() {
            let live = engine
                .spaces
                .iter()
                .any(|sp| sp.id == u32::from(*did) && sp.kind == SpaceKind::Paging);
            if !live {
                return Err(invalid(format!("domain table {did} with no live domain")));
            }
        }
        if let Err(e) = st.engine.apply_state(&engine) {
            // Back to the reset state: translation off, every endpoint identity.
            st.engine.set_default_identity(true);
            return Err(e);
        }
        st.regs = regs;
        st.contexts = contexts;
        st.domains = domains;
        self.counters.restore(&counters);
        self.faults.lock_pending().extend(pending);
        // The VMM's fault route follows FEADDR/FEDATA, as after the guest's own write.
        let msi = MsiMessage {
            address: u64::from(st.reg32(offset::FEUADDR)) << 32
                | u64::from(st.reg32(offset::FEADDR)),
            data: st.reg32(offset::FEDATA),
        };
        st.msi.program(msi);
        Ok(())
    }
}

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod tests;
