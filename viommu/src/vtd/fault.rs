//! Primary fault logging: the fault recording registers, the fault status (FSTS) and fault event
//! control (FECTL) bits, and when the fault event interrupt is due.
//!
//! A fault goes into the record at the unit's internal index, which then advances round robin.
//! A record whose F bit is still set when its turn comes means overflow: FSTS.PFO is set and the
//! fault is dropped; while PFO is set nothing more is recorded (as QEMU). A fault identical to a
//! pending record (same source, page, reason and type) is collapsed into it. PPF is derived from
//! the F bits; FRI is the index of the record that set PPF.
//!
//! The fault event is one MSI for every interrupt condition: PPF, PFO or IQE going from clear to
//! set. With FECTL.IM clear it is sent at once; masked, FECTL.IP is set and the MSI goes out when
//! the guest clears IM. IP also clears once the guest has serviced every status bit.
//! Linux's handler reads FSTS, walks the records from FRI reading the dword at +12 (F, type,
//! reason), +8 (source id) and the qword at +0 (page), clears each with a write of F to +12, then
//! writes PFO (with PPF and PRO, which are not writable) to FSTS.

use super::caps::FAULT_RECORDS;

#[path = "fault_state.rs"]
mod state;

/// FSTS.PFO: primary fault overflow (write 1 to clear).
pub const FSTS_PFO: u32 = 1 << 0;
/// FSTS.PPF: primary pending fault (read-only, some record has F set).
pub const FSTS_PPF: u32 = 1 << 1;
/// FSTS.IQE: invalidation queue error (write 1 to clear).
pub const FSTS_IQE: u32 = 1 << 4;
/// FSTS.ICE: invalidation completion error (device-TLB only: never set here).
pub const FSTS_ICE: u32 = 1 << 5;
/// FSTS.ITE: invalidation time-out error (device-TLB only: never set here).
pub const FSTS_ITE: u32 = 1 << 6;
/// FECTL.IM: interrupt mask (set at reset).
pub const FECTL_IM: u32 = 1 << 31;
/// FECTL.IP: interrupt pending (read-only).
pub const FECTL_IP: u32 = 1 << 30;
/// Record bit 127 (bit 31 of the dword at +12): F, fault pending.
pub const RECORD_F: u32 = 1 << 31;
/// Record bit 126 (bit 30 of the dword at +12): type, 1 = read, 0 = write.
pub const RECORD_READ: u32 = 1 << 30;

/// Why a request was not translated (the FR field of a fault record), with Linux's wording.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FaultReason {
    /// 1: the root entry for the bus is not present.
    RootNotPresent = 0x1,
    /// 2: the context entry for the device is not present.
    ContextNotPresent = 0x2,
    /// 3: invalid context entry (unsupported AW or TT, or its SLPTPTR could not be read).
    ContextInvalid = 0x3,
    /// 4: the input address is above the address width.
    AddressBeyondWidth = 0x4,
    /// 5: a write to a page without W (or not present).
    WriteDenied = 0x5,
    /// 6: a read from a page without R (or not present).
    ReadDenied = 0x6,
    /// 7: a next-level table pointer could not be read.
    PagingEntryInvalid = 0x7,
    /// 8: the root table could not be read (or RTADDR's mode is not legacy).
    RootTableInvalid = 0x8,
    /// 9: the context table could not be read.
    ContextTableInvalid = 0x9,
    /// 0xA: reserved bits set in a present root entry.
    RootReserved = 0xa,
    /// 0xB: reserved bits set in a present context entry.
    ContextReserved = 0xb,
    /// 0xC: reserved bits set in a present second-level entry.
    PagingEntryReserved = 0xc,
    /// 0xD: the context entry's translation type blocks the request.
    TranslationTypeBlocked = 0xd,
}

impl FaultReason {
    /// The FR code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The reason for an FR code.
    pub fn from_code(code: u8) -> Option<Self> {
        use FaultReason::*;
        Some(match code {
            0x1 => RootNotPresent,
            0x2 => ContextNotPresent,
            0x3 => ContextInvalid,
            0x4 => AddressBeyondWidth,
            0x5 => WriteDenied,
            0x6 => ReadDenied,
            0x7 => PagingEntryInvalid,
            0x8 => RootTableInvalid,
            0x9 => ContextTableInvalid,
            0xa => RootReserved,
            0xb => ContextReserved,
            0xc => PagingEntryReserved,
            0xd => TranslationTypeBlocked,
            _ => return None,
        })
    }

    /// Whether a context entry's FPD bit suppresses recording of this fault ("qualified"
    /// faults: those detected at or after the context entry; QEMU's table).
    pub fn is_qualified(self) -> bool {
        use FaultReason::*;
        matches!(
            self,
            ContextNotPresent
                | ContextInvalid
                | AddressBeyondWidth
                | WriteDenied
                | ReadDenied
                | PagingEntryInvalid
                | PagingEntryReserved
                | TranslationTypeBlocked
        )
    }

    /// Linux's description (`dma_remap_fault_reasons`), for our own log lines.
    pub fn describe(self) -> &'static str {
        use FaultReason::*;
        match self {
            RootNotPresent => "Present bit in root entry is clear",
            ContextNotPresent => "Present bit in context entry is clear",
            ContextInvalid => "Invalid context entry",
            AddressBeyondWidth => "Access beyond MGAW",
            WriteDenied => "PTE Write access is not set",
            ReadDenied => "PTE Read access is not set",
            PagingEntryInvalid => "Next page table ptr is invalid",
            RootTableInvalid => "Root table address invalid",
            ContextTableInvalid => "Context table ptr is invalid",
            RootReserved => "non-zero reserved fields in RTP",
            ContextReserved => "non-zero reserved fields in CTP",
            PagingEntryReserved => "non-zero reserved fields in PTE",
            TranslationTypeBlocked => "PCE for translation request specifies blocking",
        }
    }
}

/// Whether a fault must be recorded: always, unless the context entry it came through has FPD
/// set and the reason is qualified.
pub fn should_record(reason: FaultReason, fpd: bool) -> bool {
    !(fpd && reason.is_qualified())
}

/// One DMA-remapping fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Requester: `bus << 8 | devfn`.
    pub sid: u16,
    /// The faulting input address (the record keeps its page, bits 63:12).
    pub address: u64,
    /// Why.
    pub reason: FaultReason,
    /// A write request (else a read).
    pub write: bool,
}

impl Fault {
    /// The 128-bit record with F set: (qword at +0, qword at +8).
    fn encode(&self) -> (u64, u64) {
        let lo = self.address & !0xfff;
        let mut hi = u64::from(self.sid) | (u64::from(self.reason.code()) << 32);
        if !self.write {
            hi |= u64::from(RECORD_READ) << 32;
        }
        hi |= u64::from(RECORD_F) << 32;
        (lo, hi)
    }
}

/// What happened to a fault handed to [`FaultLog::record`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordOutcome {
    /// Written to this record.
    Recorded(usize),
    /// Identical to the pending fault in this record: not recorded again.
    Collapsed(usize),
    /// The next record was still pending: PFO set, fault dropped.
    Overflow,
    /// PFO was already set: fault dropped.
    Dropped,
}

/// The result of an operation that may raise the fault event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recording {
    /// What happened to the fault.
    pub outcome: RecordOutcome,
    /// Send the fault event MSI now.
    pub send_event: bool,
}

/// The fault recording registers and the FSTS/FECTL state of one unit.
#[derive(Clone, Debug)]
pub struct FaultLog {
    /// (qword at +0, qword at +8) of each record; F is bit 63 of the second.
    records: [(u64, u64); FAULT_RECORDS],
    /// Internal index of the record the next fault goes to.
    next: usize,
    pfo: bool,
    iqe: bool,
    fri: u8,
    im: bool,
    ip: bool,
}

impl Default for FaultLog {
    fn default() -> Self {
        FaultLog::new()
    }
}

impl FaultLog {
    /// The reset state: no records, interrupt masked.
    pub fn new() -> Self {
        FaultLog {
            records: [(0, 0); FAULT_RECORDS],
            next: 0,
            pfo: false,
            iqe: false,
            fri: 0,
            im: true,
            ip: false,
        }
    }

    fn pending(&self, i: usize) -> bool {
        self.records[i].1 & (u64::from(RECORD_F) << 32) != 0
    }

    /// FSTS.PPF: some record is pending.
    pub fn ppf(&self) -> bool {
        (0..FAULT_RECORDS).any(|i| self.pending(i))
    }

    /// FSTS.IQE.
    pub fn iqe(&self) -> bool {
        self.iqe
    }

    /// FSTS.PFO.
    pub fn pfo(&self) -> bool {
        self.pfo
    }

    /// Any status bit that makes an interrupt condition is still set.
    fn condition_pending(&self) -> bool {
        self.pfo || self.iqe || self.ppf()
    }

    /// An interrupt condition arose: send now, or remember it if masked.
    fn raise(&mut self) -> bool {
        if self.ip {
            false
        } else if self.im {
            self.ip = true;
            false
        } else {
            true
        }
    }

    /// The guest serviced status bits: IP drops once nothing is left.
    fn serviced(&mut self) {
        if !self.condition_pending() {
            self.ip = false;
        }
    }

    /// Record `fault` (the caller has already applied [`should_record`]).
    pub fn record(&mut self, fault: Fault) -> Recording {
        if self.pfo {
            return Recording {
                outcome: RecordOutcome::Dropped,
                send_event: false,
            };
        }
        let (lo, hi) = fault.encode();
        if let Some(i) =
            (0..FAULT_RECORDS).find(|&i| self.pending(i) && self.records[i] == (lo, hi))
        {
            return Recording {
                outcome: RecordOutcome::Collapsed(i),
                send_event: false,
            };
        }
        let i = self.next;
        if self.pending(i) {
            self.pfo = true;
            return Recording {
                outcome: RecordOutcome::Overflow,
                send_event: self.raise(),
            };
        }
        let had_ppf = self.ppf();
        self.records[i] = (lo, hi);
        self.next = (i + 1) % FAULT_RECORDS;
        let mut send_event = false;
        if !had_ppf {
            self.fri = i as u8;
            send_event = self.raise();
        }
        Recording {
            outcome: RecordOutcome::Recorded(i),
            send_event,
        }
    }

    /// Set FSTS.IQE; true when the fault event must be sent now.
    pub fn set_iqe(&mut self) -> bool {
        if self.iqe {
            return false;
        }
        self.iqe = true;
        self.raise()
    }

    /// FSTS as the guest reads it.
    pub fn read_fsts(&self) -> u32 {
        let mut v = u32::from(self.fri) << 8;
        if self.pfo {
            v |= FSTS_PFO;
        }
        if self.ppf() {
            v |= FSTS_PPF;
        }
        if self.iqe {
            v |= FSTS_IQE;
        }
        v
    }

    /// A guest write to FSTS (PFO and IQE are write-1-to-clear, the rest read-only). Returns
    /// true when this write cleared IQE (queue processing may resume).
    pub fn write_fsts(&mut self, value: u32) -> bool {
        if value & FSTS_PFO != 0 {
            self.pfo = false;
        }
        let iqe_cleared = self.iqe && value & FSTS_IQE != 0;
        if iqe_cleared {
            self.iqe = false;
        }
        self.serviced();
        iqe_cleared
    }

    /// FECTL as the guest reads it.
    pub fn read_fectl(&self) -> u32 {
        (if self.im { FECTL_IM } else { 0 }) | (if self.ip { FECTL_IP } else { 0 })
    }

    /// A guest write to FECTL (only IM is writable). True when a pending event must be sent
    /// now (unmasked with IP set).
    pub fn write_fectl(&mut self, value: u32) -> bool {
        self.im = value & FECTL_IM != 0;
        if !self.im && self.ip {
            self.ip = false;
            return true;
        }
        false
    }

    /// Dword `dword` (0..4) of record `index`, as the guest reads it; 0 outside.
    pub fn read_record(&self, index: usize, dword: usize) -> u32 {
        let Some(&(lo, hi)) = self.records.get(index) else {
            return 0;
        };
        match dword {
            0 => lo as u32,
            1 => (lo >> 32) as u32,
            2 => hi as u32,
            3 => (hi >> 32) as u32,
            _ => 0,
        }
    }

    /// A guest write to dword `dword` of record `index`: F (bit 31 of dword 3) is write-1-to-
    /// clear, everything else is read-only.
    pub fn write_record(&mut self, index: usize, dword: usize, value: u32) {
        if dword != 3 || value & RECORD_F == 0 {
            return;
        }
        if let Some(r) = self.records.get_mut(index) {
            r.1 &= !(u64::from(RECORD_F) << 32);
            self.serviced();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(sid: u16, address: u64, reason: FaultReason, write: bool) -> Fault {
        Fault {
            sid,
            address,
            reason,
            write,
        }
    }

    fn unmasked() -> FaultLog {
        let mut log = FaultLog::new();
        assert!(!log.write_fectl(0));
        log
    }

    /// What Linux's `dmar_fault` does: returns the faults it printed, in order.
    fn linux_handler(log: &mut FaultLog) -> Vec<(u16, u64, u8, bool)> {
        let mut seen = Vec::new();
        let fsts = log.read_fsts();
        if fsts & FSTS_PPF != 0 {
            let mut i = ((fsts >> 8) & 0xff) as usize;
            loop {
                let d3 = log.read_record(i, 3);
                if d3 & RECORD_F == 0 {
                    break;
                }
                let reason = (d3 & 0xff) as u8;
                let read = (d3 >> 30) & 1 == 1;
                let sid = (log.read_record(i, 2) & 0xffff) as u16;
                let addr =
                    u64::from(log.read_record(i, 0)) | u64::from(log.read_record(i, 1)) << 32;
                log.write_record(i, 3, RECORD_F);
                seen.push((sid, addr & !0xfff, reason, read));
                i = (i + 1) % FAULT_RECORDS;
            }
        }
        log.write_fsts(FSTS_PFO | FSTS_PPF | (1 << 7));
        seen
    }

    #[test]
    fn record_layout_and_linux_clear_sequence() {
        let mut log = unmasked();
        let r = log.record(fault(
            0x20,
            0x1234_5678_9abc,
            FaultReason::ReadDenied,
            false,
        ));
        assert_eq!(
            r,
            Recording {
                outcome: RecordOutcome::Recorded(0),
                send_event: true
            }
        );
        assert_eq!(log.read_fsts(), FSTS_PPF, "PPF, FRI 0");
        assert_eq!(log.read_record(0, 0), 0x5678_9000);
        assert_eq!(log.read_record(0, 1), 0x1234);
        assert_eq!(log.read_record(0, 2), 0x20);
        assert_eq!(log.read_record(0, 3), RECORD_F | RECORD_READ | 6);
        let w = log.record(fault(0x28, 0x2000, FaultReason::WriteDenied, true));
        assert_eq!(w.outcome, RecordOutcome::Recorded(1));
        assert!(!w.send_event, "PPF already set: no second event");
        assert_eq!(log.read_record(1, 3), RECORD_F | 5, "write: type bit clear");
        let seen = linux_handler(&mut log);
        assert_eq!(
            seen,
            vec![(0x20, 0x1234_5678_9000, 6, true), (0x28, 0x2000, 5, false)]
        );
        assert_eq!(log.read_fsts() & (FSTS_PPF | FSTS_PFO), 0);
        assert_eq!(log.read_record(0, 3) & RECORD_F, 0, "F cleared, rest kept");
        assert_eq!(log.read_record(0, 2), 0x20);
        // The next fault goes to record 2 and sets FRI there, with a new event.
        let n = log.record(fault(0x30, 0x3000, FaultReason::ReadDenied, false));
        assert_eq!(
            n,
            Recording {
                outcome: RecordOutcome::Recorded(2),
                send_event: true
            }
        );
        assert_eq!(log.read_fsts(), FSTS_PPF | (2 << 8));
        assert_eq!(linux_handler(&mut log).len(), 1);
    }

    #[test]
    fn overflow_sets_pfo_drops_and_blocks_until_cleared() {
        let mut log = unmasked();
        for i in 0..FAULT_RECORDS {
            let r = log.record(fault(1, (i as u64) << 12, FaultReason::ReadDenied, false));
            assert_eq!(r.outcome, RecordOutcome::Recorded(i));
            assert_eq!(r.send_event, i == 0);
        }
        // All busy: overflow raises PFO, which is a new interrupt condition.
        let o = log.record(fault(1, 0x100_0000, FaultReason::ReadDenied, false));
        assert_eq!(
            o,
            Recording {
                outcome: RecordOutcome::Overflow,
                send_event: true
            }
        );
        assert_eq!(log.read_fsts() & FSTS_PFO, FSTS_PFO);
        // While PFO is set nothing is recorded, even once every record is free again.
        for i in 0..FAULT_RECORDS {
            log.write_record(i, 3, RECORD_F);
        }
        assert_eq!(log.read_fsts() & (FSTS_PFO | FSTS_PPF), FSTS_PFO);
        let d = log.record(fault(2, 0x5000, FaultReason::WriteDenied, true));
        assert_eq!(
            d,
            Recording {
                outcome: RecordOutcome::Dropped,
                send_event: false
            }
        );
        assert_eq!(log.read_record(0, 3) & RECORD_F, 0);
        // PFO cleared: recording resumes at the internal index (wrapped to 0).
        log.write_fsts(FSTS_PFO);
        assert_eq!(log.read_fsts() & (FSTS_PFO | FSTS_PPF), 0);
        let r = log.record(fault(2, 0x5000, FaultReason::WriteDenied, true));
        assert_eq!(
            r,
            Recording {
                outcome: RecordOutcome::Recorded(0),
                send_event: true
            }
        );
        // Linux's handler sees exactly that one.
        assert_eq!(linux_handler(&mut log), vec![(2, 0x5000, 5, false)]);
    }

    #[test]
    fn linux_handler_drains_a_full_log() {
        let mut log = unmasked();
        for i in 0..FAULT_RECORDS + 3 {
            log.record(fault(1, (i as u64) << 12, FaultReason::ReadDenied, false));
        }
        assert_eq!(log.read_fsts() & (FSTS_PFO | FSTS_PPF), FSTS_PFO | FSTS_PPF);
        let seen = linux_handler(&mut log);
        assert_eq!(seen.len(), FAULT_RECORDS, "the dropped ones are lost");
        assert_eq!(seen[0].1, 0);
        assert_eq!(log.read_fsts() & (FSTS_PFO | FSTS_PPF), 0);
    }

    #[test]
    fn identical_pending_fault_is_collapsed() {
        let mut log = unmasked();
        let f = fault(7, 0x4123, FaultReason::ReadDenied, false);
        assert_eq!(log.record(f).outcome, RecordOutcome::Recorded(0));
        let same_page = Fault {
            address: 0x4fff,
            ..f
        };
        assert_eq!(log.record(same_page).outcome, RecordOutcome::Collapsed(0));
        let as_write = Fault {
            write: true,
            reason: FaultReason::WriteDenied,
            ..f
        };
        assert_eq!(log.record(as_write).outcome, RecordOutcome::Recorded(1));
        let other_sid = Fault { sid: 8, ..f };
        assert_eq!(log.record(other_sid).outcome, RecordOutcome::Recorded(2));
        // Once cleared, the same fault is recorded again.
        log.write_record(0, 3, RECORD_F);
        assert_eq!(log.record(f).outcome, RecordOutcome::Recorded(3));
    }

    #[test]
    fn masked_event_is_sent_on_unmask() {
        let mut log = FaultLog::new();
        assert_eq!(log.read_fectl(), FECTL_IM, "masked at reset");
        let r = log.record(fault(1, 0, FaultReason::ReadDenied, false));
        assert!(!r.send_event);
        assert_eq!(log.read_fectl(), FECTL_IM | FECTL_IP);
        // IP is read-only: writing it changes nothing.
        assert!(!log.write_fectl(FECTL_IM | FECTL_IP));
        assert_eq!(log.read_fectl(), FECTL_IM | FECTL_IP);
        assert!(log.write_fectl(0), "unmask with IP: send now");
        assert_eq!(log.read_fectl(), 0);
        assert!(!log.write_fectl(0), "only once");
    }

    #[test]
    fn servicing_everything_clears_ip_without_an_event() {
        let mut log = FaultLog::new();
        log.record(fault(1, 0, FaultReason::ReadDenied, false));
        assert!(!log.set_iqe() && log.iqe());
        assert_eq!(log.read_fectl() & FECTL_IP, FECTL_IP);
        log.write_record(0, 3, RECORD_F);
        assert_eq!(log.read_fectl() & FECTL_IP, FECTL_IP, "IQE still set");
        assert!(log.write_fsts(FSTS_IQE), "IQE cleared");
        assert_eq!(log.read_fectl(), FECTL_IM, "nothing left: IP cleared");
        assert!(!log.write_fectl(0), "no stale event on unmask");
    }

    #[test]
    fn iqe_raises_one_event_and_is_w1c() {
        let mut log = unmasked();
        assert!(log.set_iqe());
        assert!(!log.set_iqe(), "already set");
        assert_eq!(log.read_fsts(), FSTS_IQE);
        assert!(!log.write_fsts(0), "writing 0 clears nothing");
        assert!(log.iqe());
        // PPF and FRI are read-only.
        log.write_fsts(FSTS_PPF | 0xff00);
        assert_eq!(log.read_fsts(), FSTS_IQE);
        assert!(log.write_fsts(FSTS_IQE));
        assert_eq!(log.read_fsts(), 0);
        assert!(log.set_iqe(), "a new IQE is a new condition");
    }

    #[test]
    fn fpd_suppresses_only_qualified_faults() {
        assert!(should_record(FaultReason::ReadDenied, false));
        assert!(!should_record(FaultReason::ReadDenied, true));
        assert!(!should_record(FaultReason::ContextNotPresent, true));
        assert!(should_record(FaultReason::RootNotPresent, true));
        assert!(should_record(FaultReason::RootTableInvalid, true));
        for code in 0..=0xffu8 {
            if let Some(r) = FaultReason::from_code(code) {
                assert_eq!(r.code(), code);
                assert!(!r.describe().is_empty());
            } else {
                assert!(code == 0 || code > 0xd);
            }
        }
    }

    #[test]
    fn record_access_outside_is_harmless() {
        let mut log = unmasked();
        assert_eq!(log.read_record(FAULT_RECORDS, 3), 0);
        assert_eq!(log.read_record(0, 4), 0);
        log.write_record(FAULT_RECORDS, 3, RECORD_F);
        log.record(fault(1, 0, FaultReason::ReadDenied, false));
        log.write_record(0, 2, u32::MAX);
        log.write_record(0, 3, !RECORD_F);
        assert_eq!(
            log.read_record(0, 3) & RECORD_F,
            RECORD_F,
            "only F is writable"
        );
        assert_eq!(log.read_record(0, 2), 1);
    }
}
