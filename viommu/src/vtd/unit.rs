//! One DMA-remapping unit (DRHD) wired to the engine: the MMIO register page a guest programs,
//! and the endpoints (PCI functions) whose DMA it translates.
//!
//! ```text
//! MMIO write (vCPU thread)
//!   -> regs        register file; GSTS settles within the write; Actions out
//!   -> queue       IQT written: descriptors from IQH to IQT, processed inside the write
//!   -> tables      context invalidation: re-read the entries -> attach / switch / detach /
//!                  identity (TT = 10b) in the engine
//!   -> walk        IOTLB invalidation: the domain's second-level table over that range only
//!   -> diff        against the engine's mappings in the range -> Unmap / Map of whole runs
//!   -> engine      map / unmap; publish (waits out readers of removed translations)
//!   -> queue       only then the invalidation wait's status write (Linux spins on it)
//! ```
//! While GSTS.TES is clear every endpoint is identity (the engine's default, as boot bypass).
//! Faults of emulated devices come back through [`DeferredFaults`] (the engine's fault sink):
//! the unit finds the VT-d reason by reading the tables, honours FPD, fills a fault record and
//! raises the fault event through the VMM's [`MsiSender`].
//!
//! Bounds: a range walk reads at most [`UnitConfig::walk_budget`] table entries (from the
//! mapping cap); over budget, the whole range is unmapped (the device faults rather than use a
//! stale translation) and counted as an error. The engine's limits cap domains and mappings;
//! refusals are counted and leave the affected translations absent, never stale.

use super::caps::{AddressWidth, Capabilities};
use super::counters::Counters;
use super::descriptor::Descriptor;
use super::diff::{diff, Change};
use super::fault::{should_record, Fault, FaultReason};
use super::invalidation::{ContextInvalidation, Invalidation, IotlbInvalidation, IotlbScope};
use super::queue;
use super::regs::{offset, Action, MsiMessage, Registers};
use super::tables::{lookup_context, ContextEntry, PageTable, TableFault, Translation};
use super::walk::{translate, walk_range, Perm, Run};
use crate::engine::endpoint::{DomainError, EndpointHandle};
use crate::engine::fault::{Fault as EngineFault, FaultRateLimit, FaultSink, RateLimiter};
use crate::engine::geometry::Geometry;
use crate::engine::limits::Limits;
use crate::engine::mapping::{Access, Mapping};
use crate::engine::space::SpaceKind;
use crate::engine::state::Engine;
use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError, Weak};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

/// Engine space of every pass-through (TT = 10b) context: one identity space, outside the
/// 16-bit DID range so it never meets a paging domain.
const PASS_THROUGH_SPACE: u32 = 1 << 16;
/// Faults waiting for the unit (reported while it was busy); more are dropped and counted.
const MAX_PENDING_FAULTS: usize = 64;

/// Sends the unit's interrupts (fault event, invalidation completion event): the VMM
/// implements it with its MSI layer.
pub trait MsiSender: Send + Sync {
    /// Deliver `msi` to the guest. Fault events may be sent from any thread that does DMA.
    fn send(&self, msi: MsiMessage);

    /// The guest programmed the fault event registers (FEADDR/FEUADDR/FEDATA) to `msi`, on the
    /// vCPU thread of that write: a sender may prepare its route here so that [`Self::send`]
    /// is a plain signal from any thread.
    fn program(&self, msi: MsiMessage) {
        let _ = msi;
    }
}

/// What one unit implements and how much guest-created state it may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnitConfig {
    /// Maximum guest address width (39 or 48 bits).
    pub aw: AddressWidth,
    /// Caps on domains and mappings.
    pub limits: Limits,
    /// How many DMA faults per second reach the fault registers and the log.
    pub fault_rate: FaultRateLimit,
}

impl Default for UnitConfig {
    fn default() -> Self {
        UnitConfig {
            aw: AddressWidth::Bits48,
            limits: Limits::default(),
            fault_rate: FaultRateLimit::default(),
        }
    }
}

impl UnitConfig {
    /// Table entries one range walk may read: enough for a domain holding its full share of
    /// mappings densely (a few reads per leaf plus every table on the way), capped so that one
    /// invalidation stays a bounded piece of work.
    pub fn walk_budget(&self) -> u64 {
        let per_domain = self.limits.max_mappings_per_domain as u64;
        per_domain
            .saturating_mul(8)
            .saturating_add(4 * 512)
            .min(1 << 24)
    }
}

/// What the unit last read for one endpoint's context entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Binding {
    /// A present, valid entry.
    Entry(ContextEntry),
    /// Every request of the endpoint faults with this.
    Fault(TableFault),
}

/// Faults reported by devices, waiting for the unit's lock. The engine calls
/// [`FaultSink::report`] from device threads that may hold a view the unit is waiting for
/// (publish after an unmap), so the sink never blocks on the unit: it queues the fault and
/// records it at once only if the unit is free; otherwise the unit records it when its current
/// register access finishes.
pub struct DeferredFaults {
    pending: Mutex<VecDeque<EngineFault>>,
    unit: OnceLock<Weak<Mutex<UnitState>>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for DeferredFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeferredFaults").finish_non_exhaustive()
    }
}

impl DeferredFaults {
    fn lock_pending(&self) -> MutexGuard<'_, VecDeque<EngineFault>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self) -> Vec<EngineFault> {
        self.lock_pending().drain(..).collect()
    }

    fn has_pending(&self) -> bool {
        !self.lock_pending().is_empty()
    }

    /// Record the pending faults if the unit is free.
    fn try_drain(&self) {
        let Some(unit) = self.unit.get().and_then(Weak::upgrade) else {
            return;
        };
        let mut st = match unit.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        st.drain_faults();
    }
}

impl FaultSink for DeferredFaults {
    fn report(&self, fault: EngineFault) -> bool {
        {
            let mut p = self.lock_pending();
            if p.len() >= MAX_PENDING_FAULTS {
                self.counters.fault_dropped();
                return false;
            }
            p.push_back(fault);
        }
        self.try_drain();
        true
    }
}

/// The unit's state behind its lock.
struct UnitState {
    regs: Registers,
    caps: Capabilities,
    engine: Engine,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    msi: Arc<dyn MsiSender>,
    counters: Arc<Counters>,
    faults: Arc<DeferredFaults>,
    budget: u64,
    rate: RateLimiter,
    /// Registered endpoints by source id, with the context entry last read for each.
    contexts: BTreeMap<u16, Option<Binding>>,
    /// Paging domains live in the engine (space id = DID) and the table each is walked from.
    domains: BTreeMap<u16, PageTable>,
}

/// One emulated VT-d DMA-remapping unit. Cheap to clone (a handle on shared state): give one to
/// the MMIO bus; the engine's fault sink holds only a weak reference.
#[derive(Clone)]
pub struct Unit {
    state: Arc<Mutex<UnitState>>,
    faults: Arc<DeferredFaults>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unit").finish_non_exhaustive()
    }
}

impl Unit {
    /// A unit in its reset state (translation off: every endpoint identity) over guest memory
    /// `mem`, sending its interrupts through `msi`.
    pub fn new(
        config: UnitConfig,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        msi: Arc<dyn MsiSender>,
    ) -> Self {
        let caps = Capabilities::new(config.aw);
        let counters = Arc::new(Counters::default());
        let faults = Arc::new(DeferredFaults {
            pending: Mutex::new(VecDeque::new()),
            unit: OnceLock::new(),
            counters: counters.clone(),
        });
        let geometry = Geometry {
            page_size_mask: !0xfff,
            input_start: 0,
            input_end: config.aw.limit() - 1,
            domain_start: 0,
            domain_end: PASS_THROUGH_SPACE,
        };
        let engine = Engine::new(geometry, config.limits, Vec::new(), true, faults.clone());
        let state = Arc::new(Mutex::new(UnitState {
            regs: Registers::new(caps),
            caps,
            engine,
            mem,
            msi,
            counters: counters.clone(),
            faults: faults.clone(),
            budget: config.walk_budget(),
            rate: RateLimiter::new(config.fault_rate),
            contexts: BTreeMap::new(),
            domains: BTreeMap::new(),
        }));
        // Set once, right here: cannot fail.
        let _ = faults.unit.set(Arc::downgrade(&state));
        Unit {
            state,
            faults,
            counters,
        }
    }

    fn lock(&self) -> MutexGuard<'_, UnitState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register the PCI function `sid` (`bus << 8 | devfn`) as translated by this unit; its
    /// devices translate through the returned handle.
    pub fn add_endpoint(&self, sid: u16) -> Result<EndpointHandle, DomainError> {
        let mut st = self.lock();
        let ep = st.engine.add_endpoint(u32::from(sid), None)?;
        st.contexts.insert(sid, None);
        Ok(ep)
    }

    /// The live counters.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// What the unit implements.
    pub fn capabilities(&self) -> Capabilities {
        self.lock().caps
    }

    /// A guest read of the register page at `offset`.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        {
            let mut st = self.lock();
            st.drain_faults();
            st.regs.read(offset, data);
        }
        self.after_access();
    }

    /// A guest write of the register page at `offset`: everything it triggers (queue
    /// processing, invalidations, interrupts) is done when it returns.
    pub fn write(&self, offset: u64, data: &[u8]) {
        {
            let mut st = self.lock();
            st.drain_faults();
            st.write(offset, data);
            st.drain_faults();
        }
        self.after_access();
    }

    /// Faults queued while the lock was held are recorded now.
    fn after_access(&self) {
        if self.faults.has_pending() {
            self.faults.try_drain();
        }
    }

    /// The engine space an endpoint is in (`None`: unknown endpoint; `Some(None)`: in none).
    pub fn endpoint_space(&self, sid: u16) -> Option<Option<u32>> {
        self.lock().engine.endpoint_space(u32::from(sid))
    }

    /// The engine's mappings of paging domain `did` (`None` if it is not live).
    pub fn domain_mappings(&self, did: u16) -> Option<Vec<Mapping>> {
        self.lock().engine.mappings(u32::from(did))
    }

    /// The root table latched by the last GCMD.SRTP.
    pub fn root_table(&self) -> Option<super::tables::RootTable> {
        self.lock().regs.root_table()
    }

    /// Estimated heap bytes of guest-created state (bounded by the limits).
    pub fn memory_estimate(&self) -> usize {
        self.lock().engine.memory_estimate()
    }
}

fn to_run(m: &Mapping) -> Option<Run> {
    let len = (m.end - m.start).checked_add(1)?;
    Some(Run {
        iova: m.start,
        gpa: m.gpa,
        len,
        perm: Perm {
            read: m.read,
            write: m.write,
        },
    })
}

fn want_of(access: Access) -> Perm {
    match access {
        Access::Read => Perm::READ,
        Access::Write => Perm::WRITE,
        Access::ReadWrite => Perm::READ_WRITE,
    }
}

impl UnitState {
    fn error(&mut self, what: std::fmt::Arguments<'_>) {
        self.counters.error();
        virtio_dev::guest_warn!("vtd: {what}");
    }

    fn reg32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.regs.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let end = offset.saturating_add(data.len() as u64);
        if offset < offset::FEUADDR + 4 && end > offset::FEDATA {
            self.write_actions(offset, data);
            let msi = MsiMessage {
                address: u64::from(self.reg32(offset::FEUADDR)) << 32
                    | u64::from(self.reg32(offset::FEADDR)),
                data: self.reg32(offset::FEDATA),
            };
            self.msi.program(msi);
        } else {
            self.write_actions(offset, data);
        }
    }

    fn write_actions(&mut self, offset: u64, data: &[u8]) {
        let mut actions: VecDeque<Action> = self.regs.write(offset, data).into();
        while let Some(a) = actions.pop_front() {
            match a {
                Action::SetRootTable(_) => {} // used from the next context invalidation on
                Action::EnableTranslation(on) => self.set_translation(on),
                Action::ProcessQueue => actions.extend(self.process_queue()),
                Action::Invalidate(inv) => {
                    self.invalidate(inv);
                    self.engine.publish();
                }
                Action::SendFaultEvent(m) | Action::SendInvalidationEvent(m) => self.msi.send(m),
            }
        }
    }

    /// Run the queue from IQH to IQT; the wait descriptors publish before their status write.
    fn process_queue(&mut self) -> Vec<Action> {
        let Some(q) = self.regs.queue() else {
            return Vec::new();
        };
        let mem = self.mem.memory();
        let out = queue::process(&*mem, q, |d| {
            self.descriptor(d);
            Ok::<(), std::convert::Infallible>(())
        });
        drop(mem);
        // Whatever ran after the last wait is visible to devices too.
        self.engine.publish();
        if out.error.is_some() {
            self.counters.error();
        }
        self.regs.complete_queue(&out)
    }

    fn descriptor(&mut self, d: &Descriptor) {
        match d {
            Descriptor::Context(inv) => self.invalidate(Invalidation::Context(*inv)),
            Descriptor::Iotlb(inv) => self.invalidate(Invalidation::Iotlb(*inv)),
            Descriptor::DeviceTlb(_) | Descriptor::InterruptEntryCache(_) => {
                self.counters.invalidation();
            }
            Descriptor::Wait(_) => {
                // Everything before the wait is complete, for devices too, before its status
                // write or interrupt.
                self.engine.publish();
                self.counters.wait();
            }
        }
    }

    fn invalidate(&mut self, inv: Invalidation) {
        self.counters.invalidation();
        match inv {
            Invalidation::Context(c) => self.context_invalidation(c),
            Invalidation::Iotlb(i) => self.iotlb_invalidation(i),
        }
    }

    /// Re-read the context entries the invalidation covers. Domain and global scope re-read
    /// every endpoint (there are few): an entry may have moved into the named domain.
    fn context_invalidation(&mut self, inv: ContextInvalidation) {
        let sids: Vec<u16> = match inv {
            ContextInvalidation::Device { .. } => inv
                .source_ids()
                .filter(|s| self.contexts.contains_key(s))
                .collect(),
            ContextInvalidation::Global | ContextInvalidation::Domain { .. } => {
                self.contexts.keys().copied().collect()
            }
        };
        for sid in sids {
            self.reload_context(sid);
        }
    }

    fn read_context(&self, sid: u16) -> Binding {
        let Some(root) = self.regs.root_table() else {
            return Binding::Fault(TableFault {
                reason: FaultReason::RootTableInvalid,
                fpd: false,
            });
        };
        let mem = self.mem.memory();
        match lookup_context(&*mem, &self.caps, root, sid) {
            Ok(e) => Binding::Entry(e),
            Err(f) => Binding::Fault(f),
        }
    }

    /// Read `sid`'s context entry again and put the endpoint where it says.
    fn reload_context(&mut self, sid: u16) {
        let binding = self.read_context(sid);
        self.contexts.insert(sid, Some(binding));
        if self.regs.translation_enabled() {
            self.place(sid, binding);
        }
    }

    /// Put endpoint `sid` in the engine space `binding` names (translation is on).
    fn place(&mut self, sid: u16, binding: Binding) {
        let ep = u32::from(sid);
        let current = self.engine.endpoint_space(ep).flatten();
        match binding {
            Binding::Fault(_) => {
                if let Some(space) = current {
                    if let Err(e) = self.engine.detach(ep, space) {
                        self.error(format_args!("detach of {sid:#06x}: {e}"));
                    }
                }
            }
            Binding::Entry(ContextEntry {
                translation: Translation::PassThrough,
                ..
            }) => {
                if let Err(e) = self
                    .engine
                    .attach(ep, PASS_THROUGH_SPACE, SpaceKind::Identity)
                {
                    self.error(format_args!("pass-through for {sid:#06x}: {e}"));
                    self.detach_quietly(ep);
                }
            }
            Binding::Entry(ContextEntry {
                did,
                translation: Translation::PageTable(table),
                ..
            }) => {
                let space = u32::from(did);
                match self.engine.attach(ep, space, SpaceKind::Paging) {
                    Ok(_) => {
                        // A new domain, or one whose table the guest changed: walk it whole.
                        if self.domains.get(&did) != Some(&table) {
                            self.domains.insert(did, table);
                            self.resync(did, 0..table.aw.limit());
                        }
                    }
                    Err(e) => {
                        self.error(format_args!("{sid:#06x} into domain {did}: {e}"));
                        self.detach_quietly(ep);
                    }
                }
            }
        }
        self.prune_domains();
    }

    fn detach_quietly(&mut self, ep: u32) {
        if let Some(Some(space)) = self.engine.endpoint_space(ep) {
            let _ = self.engine.detach(ep, space);
        }
    }

    /// Forget domains the engine destroyed with their last endpoint.
    fn prune_domains(&mut self) {
        let engine = &self.engine;
        self.domains
            .retain(|did, _| engine.space_kind(u32::from(*did)).is_some());
    }

    fn iotlb_invalidation(&mut self, inv: IotlbInvalidation) {
        let dids: Vec<u16> = match inv.did() {
            Some(did) => vec![did],
            None => self.domains.keys().copied().collect(),
        };
        for did in dids {
            let Some(table) = self.domains.get(&did).copied() else {
                continue; // not a live domain (e.g. DID 0 after a context change under CM)
            };
            let range = match inv.scope {
                IotlbScope::Global | IotlbScope::Domain { .. } => 0..table.aw.limit(),
                IotlbScope::Page { .. } => inv.range(table.aw),
            };
            self.resync(did, range);
        }
    }

    /// Bring domain `did`'s engine mappings in `range` in line with its table.
    fn resync(&mut self, did: u16, range: Range<u64>) {
        let Some(table) = self.domains.get(&did).copied() else {
            return;
        };
        let range = range.start.min(table.aw.limit())..range.end.min(table.aw.limit());
        if range.is_empty() {
            return;
        }
        let walked = {
            let mem = self.mem.memory();
            walk_range(&*mem, &self.caps, &table, range.clone(), self.budget)
        };
        let new = match walked {
            Ok(w) => {
                self.counters.walk_reads(w.reads);
                if let Some((iova, reason)) = w.first_invalid {
                    virtio_dev::guest_warn!(
                        "vtd: domain {did}: {} invalid table entries from {iova:#x} ({}); \
                         not mapped",
                        w.invalid,
                        reason.describe()
                    );
                }
                w.runs
            }
            Err(e) => {
                self.counters.walk_reads(self.budget);
                self.error(format_args!(
                    "domain {did}: {e}; {:#x}..{:#x} left unmapped",
                    range.start, range.end
                ));
                Vec::new()
            }
        };
        let space = u32::from(did);
        let old: Vec<Run> = self
            .engine
            .mappings_in(space, range.start, range.end - 1)
            .unwrap_or_default()
            .iter()
            .filter_map(to_run)
            .collect();
        let changes = match diff(range, &new, &old) {
            Ok(c) => c,
            Err(e) => {
                self.error(format_args!("domain {did}: diff: {e}"));
                return;
            }
        };
        let (mut maps, mut unmaps) = (0, 0);
        for c in changes {
            match c {
                Change::Unmap(r) => {
                    unmaps += 1;
                    if let Err(e) = self.engine.unmap(space, r.start, r.end - 1) {
                        self.error(format_args!("domain {did}: unmap {r:#x?}: {e}"));
                    }
                }
                Change::Map(run) => {
                    maps += 1;
                    let m = Mapping {
                        start: run.iova,
                        end: run.iova + (run.len - 1),
                        gpa: run.gpa,
                        read: run.perm.read,
                        write: run.perm.write,
                        mmio: false,
                    };
                    if let Err(e) = self.engine.map(space, m) {
                        self.error(format_args!(
                            "domain {did}: map {:#x}+{:#x}: {e}",
                            run.iova, run.len
                        ));
                    }
                }
            }
        }
        self.counters.maps(maps);
        self.counters.unmaps(unmaps);
    }

    /// GCMD.TE changed. On: every endpoint goes where its context entry (read now) says, the
    /// rest are blocked. Off: every endpoint is identity again.
    fn set_translation(&mut self, on: bool) {
        let sids: Vec<u16> = self.contexts.keys().copied().collect();
        if on {
            // Attach first, while unattached endpoints are still identity, then block the rest.
            for sid in sids {
                self.reload_context(sid);
            }
            self.engine.set_default_identity(false);
        } else {
            self.engine.set_default_identity(true);
            for sid in sids {
                self.detach_quietly(u32::from(sid));
            }
            self.domains.clear();
        }
        self.engine.publish();
    }

    /// Record the faults devices reported (see [`DeferredFaults`]).
    fn drain_faults(&mut self) {
        for f in self.faults.take() {
            self.record(f);
        }
    }

    fn record(&mut self, f: EngineFault) {
        if !self.regs.translation_enabled() {
            return; // reported against a view from before TE was cleared
        }
        let Ok(sid) = u16::try_from(f.endpoint) else {
            return;
        };
        let want = want_of(f.access);
        let binding = match self.contexts.get(&sid).copied().flatten() {
            Some(b) => b,
            None => self.read_context(sid),
        };
        let (reason, fpd) = match binding {
            Binding::Fault(t) => (t.reason, t.fpd),
            Binding::Entry(e) => match e.translation {
                Translation::PassThrough => return, // identity: a fault from an older view
                Translation::PageTable(t) => {
                    let mem = self.mem.memory();
                    let reason = match translate(&*mem, &self.caps, &t, f.address, want) {
                        Err(r) => r,
                        // The tables map it but the engine does not (not invalidated yet, or
                        // not mappable): the missing right is the reason.
                        Ok(_) if want.read => FaultReason::ReadDenied,
                        Ok(_) => FaultReason::WriteDenied,
                    };
                    (reason, e.fpd)
                }
            },
        };
        if !should_record(reason, fpd) || !self.rate.take() {
            self.counters.fault_dropped();
            return;
        }
        let write = match f.access {
            Access::Read => false,
            Access::Write => true,
            Access::ReadWrite => reason == FaultReason::WriteDenied,
        };
        self.counters.fault();
        virtio_dev::guest_warn!(
            "vtd: DMA {} fault from {:02x}:{:02x}.{} at {:#x}: {}",
            if write { "write" } else { "read" },
            sid >> 8,
            (sid >> 3) & 0x1f,
            sid & 7,
            f.address,
            reason.describe()
        );
        let (_, action) = self.regs.record_fault(Fault {
            sid,
            address: f.address,
            reason,
            write,
        });
        if let Some(Action::SendFaultEvent(m)) = action {
            self.msi.send(m);
        }
    }
}

#[path = "snapshot.rs"]
mod snapshot;

#[cfg(test)]
#[path = "unit_tests.rs"]
mod tests;
