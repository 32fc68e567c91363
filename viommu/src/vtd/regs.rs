//! The register file of one DMA-remapping unit as a pure state machine.
//!
//! Reads have no side effects. A write updates the registers, including GSTS, before it returns
//! (Linux polls GSTS right after writing GCMD) and returns the [`Action`]s the caller must carry
//! out: latch a root table, turn translation on or off, process the invalidation queue, perform
//! a register-based invalidation, send an MSI. Nothing here touches guest memory or the engine.
//!
//! Accesses: 32 bits at any 4-byte aligned offset and 64 bits at any 8-byte aligned offset (a
//! 64-bit access is the two 32-bit halves, low first, so both halves of every 64-bit register can
//! be used on their own, as Linux does for the fault records). Other sizes and unaligned accesses
//! are ignored (reads give 0) with a rate-limited log line. Offsets with no register read 0 and
//! ignore writes; reserved bits read 0.
//!
//! Register-based invalidation (CCMD, IOTLB with IVA) reports the granularity requested as the
//! one done, and clears ICC/IVT within the write; the caller performs the [`Action::Invalidate`]
//! before the guest can read the register again. It is honoured even while queued invalidation
//! is on (the spec leaves that undefined; invalidating more is always safe).

use super::caps::{
    Capabilities, FAULT_RECORDS, FAULT_RECORD_OFFSET, IOTLB_OFFSET, IVA_OFFSET, VERSION,
};
use super::fault::{Fault, FaultLog, RecordOutcome};
use super::invalidation::{
    ContextInvalidation, Granularity, Invalidation, IotlbInvalidation, IotlbScope,
};
use super::queue::{QueueOutcome, QueueState};
use super::tables::RootTable;

#[path = "regs_state.rs"]
mod state;

/// Register offsets (VT-d spec chapter 11, Linux `iommu.h`).
pub mod offset {
    /// Version.
    pub const VER: u64 = 0x00;
    /// Capability.
    pub const CAP: u64 = 0x08;
    /// Extended capability.
    pub const ECAP: u64 = 0x10;
    /// Global command.
    pub const GCMD: u64 = 0x18;
    /// Global status.
    pub const GSTS: u64 = 0x1c;
    /// Root table address.
    pub const RTADDR: u64 = 0x20;
    /// Context command.
    pub const CCMD: u64 = 0x28;
    /// Fault status.
    pub const FSTS: u64 = 0x34;
    /// Fault event control.
    pub const FECTL: u64 = 0x38;
    /// Fault event data.
    pub const FEDATA: u64 = 0x3c;
    /// Fault event address.
    pub const FEADDR: u64 = 0x40;
    /// Fault event upper address.
    pub const FEUADDR: u64 = 0x44;
    /// Protected memory enable (no PMRs: reads 0).
    pub const PMEN: u64 = 0x64;
    /// Invalidation queue head.
    pub const IQH: u64 = 0x80;
    /// Invalidation queue tail.
    pub const IQT: u64 = 0x88;
    /// Invalidation queue address.
    pub const IQA: u64 = 0x90;
    /// Invalidation completion status.
    pub const ICS: u64 = 0x9c;
    /// Invalidation event control.
    pub const IECTL: u64 = 0xa0;
    /// Invalidation event data.
    pub const IEDATA: u64 = 0xa4;
    /// Invalidation event address.
    pub const IEADDR: u64 = 0xa8;
    /// Invalidation event upper address.
    pub const IEUADDR: u64 = 0xac;
}

/// GCMD/GSTS bits.
const TE: u32 = 1 << 31;
const SRTP: u32 = 1 << 30;
const QIE: u32 = 1 << 26;
const CFI: u32 = 1 << 23;
/// GSTS status bits for TE, SRTP, QIE, CFI.
const TES: u32 = TE;
const RTPS: u32 = SRTP;
const QIES: u32 = QIE;
const CFIS: u32 = CFI;

/// RTADDR.TTM (bits 11:10).
const RTADDR_TTM: u64 = 3 << 10;
/// CCMD fields.
const CCMD_ICC: u64 = 1 << 63;
const CCMD_CAIG_SHIFT: u32 = 59;
const CCMD_WRITABLE: u64 = CCMD_ICC | (3 << 61) | (3 << 32) | 0xffff_ffff;
/// IOTLB register fields.
const IOTLB_IVT: u64 = 1 << 63;
const IOTLB_IAIG_SHIFT: u32 = 57;
const IOTLB_WRITABLE: u64 = IOTLB_IVT | (3 << 60) | (3 << 48) | (0xffff << 32);
/// IVA: ADDR 63:12, IH 6, AM 5:0.
const IVA_WRITABLE: u64 = !0xfff | 0x7f;
/// IQT.QT / IQH.QH: bits 18:4 (128-bit descriptors).
const IQ_INDEX_MASK: u64 = 0x7fff0;
/// IQA.QS.
const IQA_QS: u64 = 7;
/// ICS.IWC.
const ICS_IWC: u32 = 1;
/// IECTL bits.
const IECTL_IM: u32 = 1 << 31;
const IECTL_IP: u32 = 1 << 30;
/// Interrupt data registers: 16-bit data (no extended interrupt mode).
const EVENT_DATA_MASK: u32 = 0xffff;
/// Interrupt address registers: bits 1:0 reserved.
const EVENT_ADDR_MASK: u32 = !3;

/// An MSI the unit sends: fault events and invalidation completion events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Address (upper register << 32 | address register).
    pub address: u64,
    /// Data.
    pub data: u32,
}

/// What the caller must do after a register write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// GCMD.SRTP: use this root table from now on (re-read every context entry).
    SetRootTable(RootTable),
    /// GCMD.TE changed: translate DMA (true) or let it through untranslated (false).
    EnableTranslation(bool),
    /// Descriptors are pending: run [`super::queue::process`] on [`Registers::queue`] and hand
    /// the outcome to [`Registers::complete_queue`].
    ProcessQueue,
    /// A register-based invalidation.
    Invalidate(Invalidation),
    /// Send the fault event interrupt.
    SendFaultEvent(MsiMessage),
    /// Send the invalidation completion event interrupt.
    SendInvalidationEvent(MsiMessage),
}

/// The registers of one DRHD.
#[derive(Clone, Debug)]
pub struct Registers {
    caps: Capabilities,
    cap: u64,
    ecap: u64,
    translation: bool,
    queue_enabled: bool,
    cfi: bool,
    root_latched: bool,
    rtaddr: u64,
    root: Option<RootTable>,
    ccmd: u64,
    iva: u64,
    iotlb: u64,
    faults: FaultLog,
    fedata: u32,
    feaddr: u32,
    feuaddr: u32,
    /// IQH as an index.
    head: u32,
    iqt: u64,
    iqa: u64,
    iwc: bool,
    iectl_im: bool,
    iectl_ip: bool,
    iedata: u32,
    ieaddr: u32,
    ieuaddr: u32,
}

fn lo32(v: u64) -> u32 {
    v as u32
}

fn hi32(v: u64) -> u32 {
    (v >> 32) as u32
}

/// `reg` with the half at `high` replaced by `value`.
fn merge(reg: u64, high: bool, value: u32) -> u64 {
    if high {
        (reg & 0xffff_ffff) | (u64::from(value) << 32)
    } else {
        (reg & !0xffff_ffff) | u64::from(value)
    }
}

impl Registers {
    /// The reset state of a unit with `caps`: translation and queued invalidation off, no root
    /// table, fault and invalidation events masked.
    pub fn new(caps: Capabilities) -> Self {
        Registers {
            caps,
            cap: caps.cap(),
            ecap: caps.ecap(),
            translation: false,
            queue_enabled: false,
            cfi: false,
            root_latched: false,
            rtaddr: 0,
            root: None,
            ccmd: 0,
            iva: 0,
            iotlb: 0,
            faults: FaultLog::new(),
            fedata: 0,
            feaddr: 0,
            feuaddr: 0,
            head: 0,
            iqt: 0,
            iqa: 0,
            iwc: false,
            iectl_im: true,
            iectl_ip: false,
            iedata: 0,
            ieaddr: 0,
            ieuaddr: 0,
        }
    }

    /// What the unit implements.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// GSTS.TES: DMA is translated.
    pub fn translation_enabled(&self) -> bool {
        self.translation
    }

    /// The root table latched by the last SRTP (none before the first).
    pub fn root_table(&self) -> Option<RootTable> {
        self.root
    }

    /// The fault log (records, FSTS, FECTL).
    pub fn faults(&self) -> &FaultLog {
        &self.faults
    }

    fn bad_access(&mut self, what: &str, offset: u64, len: usize) {
        virtio_dev::guest_warn!(
            "vtd: ignored {what} of {len} bytes at register offset {offset:#x}"
        );
    }

    /// A guest read of `data.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data.len() {
            4 if offset % 4 == 0 => data.copy_from_slice(&self.read32(offset).to_le_bytes()),
            8 if offset % 8 == 0 => {
                let v = u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32);
                data.copy_from_slice(&v.to_le_bytes());
            }
            len => {
                data.fill(0);
                self.bad_access("read", offset, len);
            }
        }
    }

    /// A guest write of `data` at `offset`: the actions the caller must carry out, in order.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Vec<Action> {
        let mut actions = Vec::new();
        match *data {
            [a, b, c, d] if offset % 4 == 0 => {
                self.write32(offset, u32::from_le_bytes([a, b, c, d]), &mut actions);
            }
            [a, b, c, d, e, f, g, h] if offset % 8 == 0 => {
                self.write32(offset, u32::from_le_bytes([a, b, c, d]), &mut actions);
                self.write32(offset + 4, u32::from_le_bytes([e, f, g, h]), &mut actions);
            }
            _ => self.bad_access("write", offset, data.len()),
        }
        actions
    }

    fn gsts(&self) -> u32 {
        let mut v = 0;
        if self.translation {
            v |= TES;
        }
        if self.root_latched {
            v |= RTPS;
        }
        if self.queue_enabled {
            v |= QIES;
        }
        if self.cfi {
            v |= CFIS;
        }
        v
    }

    fn fault_record_at(offset: u64) -> Option<(usize, usize)> {
        let rel = offset.checked_sub(FAULT_RECORD_OFFSET)?;
        let index = usize::try_from(rel / 16).ok()?;
        (index < FAULT_RECORDS).then_some((index, (rel % 16 / 4) as usize))
    }

    /// The 32-bit register (or half of a 64-bit one) at `offset` (4-byte aligned).
    fn read32(&self, offset: u64) -> u32 {
        use offset::*;
        let half = |v: u64| if offset % 8 == 0 { lo32(v) } else { hi32(v) };
        match offset {
            VER => VERSION,
            0x08 | 0x0c => half(self.cap),
            0x10 | 0x14 => half(self.ecap),
            GSTS => self.gsts(),
            0x20 | 0x24 => half(self.rtaddr),
            0x28 | 0x2c => half(self.ccmd),
            FSTS => self.faults.read_fsts(),
            FECTL => self.faults.read_fectl(),
            FEDATA => self.fedata,
            FEADDR => self.feaddr,
            FEUADDR => self.feuaddr,
            0x80 => (u64::from(self.head) << 4) as u32,
            0x88 | 0x8c => half(self.iqt),
            0x90 | 0x94 => half(self.iqa),
            ICS => u32::from(self.iwc),
            IECTL => {
                (if self.iectl_im { IECTL_IM } else { 0 })
                    | (if self.iectl_ip { IECTL_IP } else { 0 })
            }
            IEDATA => self.iedata,
            IEADDR => self.ieaddr,
            IEUADDR => self.ieuaddr,
            o if o == IVA_OFFSET || o == IVA_OFFSET + 4 => half(self.iva),
            o if o == IOTLB_OFFSET || o == IOTLB_OFFSET + 4 => half(self.iotlb),
            o => match Self::fault_record_at(o) {
                Some((index, dword)) => self.faults.read_record(index, dword),
                None => 0, // GCMD (write-only), PMEN, IQH high half, IRTA, unimplemented
            },
        }
    }

    fn write32(&mut self, offset: u64, value: u32, actions: &mut Vec<Action>) {
        use offset::*;
        let high = offset % 8 != 0;
        match offset {
            GCMD => self.write_gcmd(value, actions),
            0x20 | 0x24 => {
                let mask = self.caps.haw_page_mask() | RTADDR_TTM;
                self.rtaddr = merge(self.rtaddr, high, value) & mask;
            }
            0x28 | 0x2c => {
                self.ccmd = merge(self.ccmd, high, value) & CCMD_WRITABLE;
                if self.ccmd & CCMD_ICC != 0 {
                    self.context_command(actions);
                }
            }
            FSTS => {
                if self.faults.write_fsts(value) && self.queue_pending() {
                    actions.push(Action::ProcessQueue);
                }
            }
            FECTL => {
                if self.faults.write_fectl(value) {
                    actions.push(Action::SendFaultEvent(self.fault_msi()));
                }
            }
            FEDATA => self.fedata = value & EVENT_DATA_MASK,
            FEADDR => self.feaddr = value & EVENT_ADDR_MASK,
            FEUADDR => self.feuaddr = value,
            0x88 | 0x8c => {
                self.iqt = merge(self.iqt, high, value) & IQ_INDEX_MASK;
                if self.queue_pending() {
                    actions.push(Action::ProcessQueue);
                }
            }
            0x90 | 0x94 => {
                // DW (bit 11, 256-bit descriptors) needs scalable mode: reserved, reads 0.
                let mask = self.caps.haw_page_mask() | IQA_QS;
                self.iqa = merge(self.iqa, high, value) & mask;
            }
            ICS => {
                if value & ICS_IWC != 0 {
                    self.iwc = false;
                    self.iectl_ip = false;
                }
            }
            IECTL => {
                self.iectl_im = value & IECTL_IM != 0;
                if !self.iectl_im && self.iectl_ip {
                    self.iectl_ip = false;
                    actions.push(Action::SendInvalidationEvent(self.invalidation_msi()));
                }
            }
            IEDATA => self.iedata = value & EVENT_DATA_MASK,
            IEADDR => self.ieaddr = value & EVENT_ADDR_MASK,
            IEUADDR => self.ieuaddr = value,
            o if o == IVA_OFFSET || o == IVA_OFFSET + 4 => {
                self.iva = merge(self.iva, high, value) & IVA_WRITABLE;
            }
            o if o == IOTLB_OFFSET || o == IOTLB_OFFSET + 4 => {
                self.iotlb = merge(self.iotlb, high, value) & IOTLB_WRITABLE;
                if self.iotlb & IOTLB_IVT != 0 {
                    self.iotlb_command(actions);
                }
            }
            o => {
                if let Some((index, dword)) = Self::fault_record_at(o) {
                    self.faults.write_record(index, dword, value);
                }
                // Everything else (PMEN with no PMRs, read-only and unimplemented registers)
                // ignores writes.
            }
        }
    }

    /// GCMD carries the whole desired state (TE, QIE, IRE, CFI) plus one-shot commands (SRTP,
    /// SFL, WBF, SIRTP); GSTS follows within the write. WBF, SFL and SIRTP complete at once with
    /// nothing to do (no write buffer, no advanced fault log, no interrupt remapping); IRE is
    /// ignored (ECAP.IR is 0).
    fn write_gcmd(&mut self, value: u32, actions: &mut Vec<Action>) {
        if value & SRTP != 0 {
            let ttm = ((self.rtaddr & RTADDR_TTM) >> 10) as u8;
            let root = if ttm == 0 {
                RootTable::Legacy(self.rtaddr & self.caps.haw_page_mask())
            } else {
                virtio_dev::guest_warn!(
                    "vtd: root table mode {ttm} is not legacy mode; DMA will fault"
                );
                RootTable::Unsupported { ttm }
            };
            self.root = Some(root);
            self.root_latched = true;
            actions.push(Action::SetRootTable(root));
        }
        let qie = value & QIE != 0;
        if qie != self.queue_enabled {
            self.queue_enabled = qie;
            // IQH is reset to 0 when queued invalidation is enabled (and when disabled).
            self.head = 0;
            if self.queue_pending() {
                actions.push(Action::ProcessQueue);
            }
        }
        let te = value & TE != 0;
        if te != self.translation {
            self.translation = te;
            actions.push(Action::EnableTranslation(te));
        }
        self.cfi = value & CFI != 0;
    }

    fn context_command(&mut self, actions: &mut Vec<Action>) {
        let v = self.ccmd;
        let did = v as u16;
        let inv = match (v >> 61) & 3 {
            1 => Some(ContextInvalidation::Global),
            2 => Some(ContextInvalidation::Domain { did }),
            3 => Some(ContextInvalidation::Device {
                did,
                sid: (v >> 16) as u16,
                function_mask: ((v >> 32) & 3) as u8,
            }),
            _ => None,
        };
        let done = inv.map_or(0, |i| match i {
            ContextInvalidation::Global => Granularity::Global.field(),
            ContextInvalidation::Domain { .. } => Granularity::Domain.field(),
            ContextInvalidation::Device { .. } => Granularity::Selective.field(),
        });
        self.ccmd = (v & !(CCMD_ICC | (3 << CCMD_CAIG_SHIFT))) | (done << CCMD_CAIG_SHIFT);
        if let Some(inv) = inv {
            actions.push(Action::Invalidate(Invalidation::Context(inv)));
        }
    }

    fn iotlb_command(&mut self, actions: &mut Vec<Action>) {
        let v = self.iotlb;
        let did = (v >> 32) as u16;
        let scope = match (v >> 60) & 3 {
            1 => Some(IotlbScope::Global),
            2 => Some(IotlbScope::Domain { did }),
            3 => Some(IotlbScope::Page {
                did,
                addr: self.iva & !0xfff,
                am: (self.iva & 0x3f) as u8,
                ih: self.iva & (1 << 6) != 0,
            }),
            _ => None,
        };
        let done = scope.map_or(0, |s| match s {
            IotlbScope::Global => Granularity::Global.field(),
            IotlbScope::Domain { .. } => Granularity::Domain.field(),
            IotlbScope::Page { .. } => Granularity::Selective.field(),
        });
        self.iotlb = (v & !(IOTLB_IVT | (3 << IOTLB_IAIG_SHIFT))) | (done << IOTLB_IAIG_SHIFT);
        if let Some(scope) = scope {
            actions.push(Action::Invalidate(Invalidation::Iotlb(IotlbInvalidation {
                scope,
                drain_reads: v & (1 << 49) != 0,
                drain_writes: v & (1 << 48) != 0,
            })));
        }
    }

    fn fault_msi(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.feuaddr) << 32) | u64::from(self.feaddr),
            data: self.fedata,
        }
    }

    fn invalidation_msi(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.ieuaddr) << 32) | u64::from(self.ieaddr),
            data: self.iedata,
        }
    }

    fn tail(&self) -> u32 {
        ((self.iqt & IQ_INDEX_MASK) >> 4) as u32
    }

    fn queue_pending(&self) -> bool {
        self.queue_enabled && !self.faults.iqe() && self.head != self.tail()
    }

    /// The queue to process: `Some` while queued invalidation is on and no IQE is pending.
    pub fn queue(&self) -> Option<QueueState> {
        (self.queue_enabled && !self.faults.iqe()).then(|| QueueState {
            base: self.iqa & self.caps.haw_page_mask(),
            entries: 256 << (self.iqa & IQA_QS),
            head: self.head,
            tail: self.tail(),
        })
    }

    /// Take the outcome of processing [`Self::queue`]: IQH moves, an invalidation wait with IF
    /// sets ICS.IWC (and raises the completion event once), an error sets FSTS.IQE (and raises
    /// the fault event).
    pub fn complete_queue<E: std::fmt::Display>(
        &mut self,
        outcome: &QueueOutcome<E>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        self.head = outcome.head;
        if outcome.wait_interrupt && !self.iwc {
            self.iwc = true;
            if self.iectl_im {
                self.iectl_ip = true;
            } else {
                actions.push(Action::SendInvalidationEvent(self.invalidation_msi()));
            }
        }
        if let Some(err) = &outcome.error {
            virtio_dev::guest_warn!("vtd: invalidation queue error: {err}");
            if self.faults.set_iqe() {
                actions.push(Action::SendFaultEvent(self.fault_msi()));
            }
        }
        actions
    }

    /// Record a fault (the caller has applied [`super::fault::should_record`]): what happened
    /// to it, and the fault event to send if one is due.
    pub fn record_fault(&mut self, fault: Fault) -> (RecordOutcome, Option<Action>) {
        let r = self.faults.record(fault);
        let action = r
            .send_event
            .then(|| Action::SendFaultEvent(self.fault_msi()));
        (r.outcome, action)
    }
}

#[cfg(test)]
#[path = "regs_tests.rs"]
mod tests;
