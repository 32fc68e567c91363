//! Tests of the register file: reset values, Linux's bring-up and invalidation sequences,
//! write-1-to-clear and read-only bits, access sizes.

use super::offset::*;
use super::*;
use crate::vtd::caps::AddressWidth;
use crate::vtd::descriptor::DescriptorError;
use crate::vtd::fault::{FaultReason, FECTL_IM, FECTL_IP, FSTS_IQE, FSTS_PFO, FSTS_PPF, RECORD_F};
use crate::vtd::queue::QueueError;

fn regs() -> Registers {
    Registers::new(Capabilities::new(AddressWidth::Bits48))
}

fn r32(r: &mut Registers, off: u64) -> u32 {
    let mut b = [0u8; 4];
    r.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn r64(r: &mut Registers, off: u64) -> u64 {
    let mut b = [0u8; 8];
    r.read(off, &mut b);
    u64::from_le_bytes(b)
}

fn w32(r: &mut Registers, off: u64, v: u32) -> Vec<Action> {
    r.write(off, &v.to_le_bytes())
}

fn w64(r: &mut Registers, off: u64, v: u64) -> Vec<Action> {
    r.write(off, &v.to_le_bytes())
}

/// Linux's bring-up up to translation on: root table, queued invalidation, TE.
fn bring_up(r: &mut Registers) {
    assert_eq!(w64(r, RTADDR, 0x12_3000), vec![]);
    assert_eq!(
        w32(r, GCMD, SRTP),
        vec![Action::SetRootTable(RootTable::Legacy(0x12_3000))]
    );
    w32(r, IQT, 0);
    w64(r, IQA, 0x40_0000);
    assert_eq!(w32(r, GCMD, QIE), vec![]);
    assert_eq!(
        w32(r, GCMD, QIE | TE),
        vec![Action::EnableTranslation(true)]
    );
}

#[test]
fn reset_values() {
    let mut r = regs();
    let caps = Capabilities::new(AddressWidth::Bits48);
    assert_eq!(r32(&mut r, VER), 0x10);
    assert_eq!(r64(&mut r, CAP), caps.cap());
    assert_eq!(r64(&mut r, ECAP), caps.ecap());
    assert_eq!(
        u64::from(r32(&mut r, CAP)) | u64::from(r32(&mut r, CAP + 4)) << 32,
        caps.cap()
    );
    assert_eq!(u64::from(r32(&mut r, ECAP + 4)), caps.ecap() >> 32);
    assert_eq!(r32(&mut r, GSTS), 0);
    assert_eq!(r32(&mut r, FECTL), FECTL_IM);
    assert_eq!(r32(&mut r, IECTL), IECTL_IM);
    assert_eq!(r32(&mut r, FSTS), 0);
    assert_eq!(r32(&mut r, PMEN), 0, "PRS clear: no protected regions");
    assert!(!r.translation_enabled());
    assert_eq!(r.root_table(), None);
    assert_eq!(r.queue(), None);
    assert_eq!(r.capabilities(), &caps);
}

#[test]
fn linux_bring_up_updates_gsts_within_each_write() {
    let mut r = regs();
    w32(&mut r, PMEN, 0); // Linux skips this without PLMR/PHMR; harmless either way
    w64(&mut r, RTADDR, 0x12_3000);
    assert_eq!(r64(&mut r, RTADDR), 0x12_3000);
    assert_eq!(
        w32(&mut r, GCMD, SRTP),
        vec![Action::SetRootTable(RootTable::Legacy(0x12_3000))]
    );
    assert_eq!(r32(&mut r, GSTS), RTPS);
    assert_eq!(r32(&mut r, GCMD), 0, "GCMD is write-only");
    w32(&mut r, IQT, 0);
    w64(&mut r, IQA, 0x40_0000);
    assert_eq!(w32(&mut r, GCMD, QIE), vec![]);
    assert_eq!(r32(&mut r, GSTS), RTPS | QIES);
    assert_eq!(
        r.queue(),
        Some(QueueState {
            base: 0x40_0000,
            entries: 256,
            head: 0,
            tail: 0
        })
    );
    assert_eq!(
        w32(&mut r, GCMD, QIE | TE),
        vec![Action::EnableTranslation(true)]
    );
    assert_eq!(r32(&mut r, GSTS), RTPS | QIES | TES);
    assert!(r.translation_enabled());
    // The same state again: nothing to do; SRTP is one-shot, RTPS stays.
    assert_eq!(w32(&mut r, GCMD, QIE | TE), vec![]);
    assert_eq!(r32(&mut r, GSTS), RTPS | QIES | TES);
    // A new root table while translating.
    w64(&mut r, RTADDR, 0x55_5000);
    assert_eq!(
        r.root_table(),
        Some(RootTable::Legacy(0x12_3000)),
        "latched only on SRTP"
    );
    assert_eq!(
        w32(&mut r, GCMD, QIE | TE | SRTP),
        vec![Action::SetRootTable(RootTable::Legacy(0x55_5000))]
    );
    // Translation off, then queue off (IQH reset).
    assert_eq!(
        w32(&mut r, GCMD, QIE),
        vec![Action::EnableTranslation(false)]
    );
    assert_eq!(w32(&mut r, GCMD, 0), vec![]);
    assert_eq!(r32(&mut r, GSTS), RTPS);
    assert_eq!(r.queue(), None);
    // CFI persists and is reflected; WBF, SFL, SIRTP, IRE do nothing.
    assert_eq!(
        w32(&mut r, GCMD, CFI | 1 << 27 | 1 << 29 | 1 << 24 | 1 << 25),
        vec![]
    );
    assert_eq!(r32(&mut r, GSTS), RTPS | CFIS);
}

#[test]
fn root_table_modes_and_reserved_bits() {
    let mut r = regs();
    w64(&mut r, RTADDR, 0xffff_ffff_ffff_ffff);
    assert_eq!(
        r64(&mut r, RTADDR),
        0xffff_ffff_f000 | RTADDR_TTM,
        "bits 9:0 and above HAW read 0"
    );
    assert_eq!(
        w32(&mut r, GCMD, SRTP),
        vec![Action::SetRootTable(RootTable::Unsupported { ttm: 3 })]
    );
    w64(&mut r, RTADDR, 0x1000 | 1 << 10);
    assert_eq!(
        w32(&mut r, GCMD, SRTP),
        vec![Action::SetRootTable(RootTable::Unsupported { ttm: 1 })]
    );
    // 32-bit halves.
    w32(&mut r, RTADDR, 0x8000);
    w32(&mut r, RTADDR + 4, 0x12);
    assert_eq!(
        w32(&mut r, GCMD, SRTP),
        vec![Action::SetRootTable(RootTable::Legacy(0x12_0000_8000))]
    );
    let mut r39 = Registers::new(Capabilities::new(AddressWidth::Bits39));
    w64(&mut r39, RTADDR, 1 << 39 | 0x1000);
    assert_eq!(r64(&mut r39, RTADDR), 0x1000);
}

#[test]
fn context_command_register() {
    let mut r = regs();
    let ccmd = |cirg: u64| CCMD_ICC | cirg << 61;
    assert_eq!(
        w64(&mut r, CCMD, ccmd(1)),
        vec![Action::Invalidate(Invalidation::Context(
            ContextInvalidation::Global
        ))]
    );
    let v = r64(&mut r, CCMD);
    assert_eq!(v & CCMD_ICC, 0, "ICC cleared within the write");
    assert_eq!((v >> 59) & 3, 1, "CAIG = global");
    assert_eq!(
        w64(&mut r, CCMD, ccmd(2) | 0x42),
        vec![Action::Invalidate(Invalidation::Context(
            ContextInvalidation::Domain { did: 0x42 }
        ))]
    );
    assert_eq!((r64(&mut r, CCMD) >> 59) & 3, 2);
    // Device-selective as 32-bit halves: the low half alone does nothing.
    assert_eq!(w32(&mut r, CCMD, 0x0020_0007), vec![]);
    assert_eq!(
        w32(&mut r, CCMD + 4, (ccmd(3) >> 32) as u32 | 1),
        vec![Action::Invalidate(Invalidation::Context(
            ContextInvalidation::Device {
                did: 7,
                sid: 0x20,
                function_mask: 1
            }
        ))]
    );
    assert_eq!((r64(&mut r, CCMD) >> 59) & 3, 3);
    // Granularity 0 is reserved: not performed, CAIG 0, ICC cleared anyway.
    assert_eq!(w64(&mut r, CCMD, ccmd(0)), vec![]);
    assert_eq!(r64(&mut r, CCMD) & (CCMD_ICC | 3 << 59), 0);
    // CAIG is read-only; without ICC nothing happens.
    assert_eq!(w64(&mut r, CCMD, 3 << 59 | 1 << 61), vec![]);
    assert_eq!((r64(&mut r, CCMD) >> 59) & 3, 0);
}

#[test]
fn iotlb_registers() {
    let mut r = regs();
    let iotlb = |iirg: u64, did: u64| IOTLB_IVT | iirg << 60 | did << 32;
    assert_eq!(
        w64(&mut r, IOTLB_OFFSET, iotlb(1, 0)),
        vec![Action::Invalidate(Invalidation::Iotlb(
            IotlbInvalidation::new(IotlbScope::Global)
        ))]
    );
    assert_eq!(
        r64(&mut r, IOTLB_OFFSET) & (IOTLB_IVT | 3 << 57),
        1 << 57,
        "IVT clear, IAIG global"
    );
    assert_eq!(
        w64(&mut r, IOTLB_OFFSET, iotlb(2, 9) | 1 << 49),
        vec![Action::Invalidate(Invalidation::Iotlb(IotlbInvalidation {
            scope: IotlbScope::Domain { did: 9 },
            drain_reads: true,
            drain_writes: false
        }))]
    );
    // Page-selective, as Linux's __iommu_flush_iotlb: IVA first, then the command.
    w64(&mut r, IVA_OFFSET, 0x7654_3000 | 1 << 6 | 4);
    assert_eq!(r64(&mut r, IVA_OFFSET), 0x7654_3000 | 1 << 6 | 4);
    assert_eq!(
        w64(&mut r, IOTLB_OFFSET, iotlb(3, 5)),
        vec![Action::Invalidate(Invalidation::Iotlb(
            IotlbInvalidation::new(IotlbScope::Page {
                did: 5,
                addr: 0x7654_3000,
                am: 4,
                ih: true
            })
        ))]
    );
    assert_eq!((r64(&mut r, IOTLB_OFFSET) >> 57) & 3, 3);
    assert_eq!(w64(&mut r, IOTLB_OFFSET, iotlb(0, 5)), vec![]);
    assert_eq!(
        (r64(&mut r, IOTLB_OFFSET) >> 57) & 3,
        0,
        "reserved granularity not done"
    );
    // Reserved bits of IVA read 0.
    w64(&mut r, IVA_OFFSET, 0xf80);
    assert_eq!(r64(&mut r, IVA_OFFSET), 0);
}

#[test]
fn queue_tail_writes_and_iqe() {
    let mut r = regs();
    // Queue off: a tail write only latches.
    assert_eq!(w32(&mut r, IQT, 0x20), vec![]);
    w32(&mut r, IQT, 0);
    bring_up(&mut r);
    assert_eq!(w32(&mut r, IQT, 3 << 4), vec![Action::ProcessQueue]);
    assert_eq!(r64(&mut r, IQT), 0x30);
    let q = r.queue().unwrap();
    assert_eq!((q.head, q.tail, q.entries), (0, 3, 256));
    // The second descriptor was bad: IQH stays at it, IQE set, fault event (unmasked).
    w32(&mut r, FEDATA, 0x4041);
    w32(&mut r, FEADDR, 0xfee0_0000);
    w32(&mut r, FECTL, 0);
    let outcome: QueueOutcome<&str> = QueueOutcome {
        head: 1,
        processed: 1,
        wait_interrupt: false,
        error: Some(QueueError::Descriptor {
            index: 1,
            error: DescriptorError::UnsupportedType(6),
        }),
    };
    assert_eq!(
        r.complete_queue(&outcome),
        vec![Action::SendFaultEvent(MsiMessage {
            address: 0xfee0_0000,
            data: 0x4041
        })]
    );
    assert_eq!(r32(&mut r, IQH), 1 << 4);
    assert_eq!(r32(&mut r, FSTS) & FSTS_IQE, FSTS_IQE);
    assert_eq!(r.queue(), None, "nothing fetched while IQE is set");
    assert_eq!(
        w32(&mut r, IQT, 4 << 4),
        vec![],
        "no processing while IQE is set"
    );
    // IQH is read-only.
    w64(&mut r, IQH, 0);
    assert_eq!(r64(&mut r, IQH), 0x10);
    // Linux overwrites the bad slot and clears IQE: processing resumes from IQH.
    assert_eq!(w32(&mut r, FSTS, FSTS_IQE), vec![Action::ProcessQueue]);
    assert_eq!(r.queue().map(|q| (q.head, q.tail)), Some((1, 4)));
    let done: QueueOutcome<&str> = QueueOutcome {
        head: 4,
        processed: 3,
        wait_interrupt: false,
        error: None,
    };
    assert_eq!(r.complete_queue(&done), vec![]);
    assert_eq!(r32(&mut r, IQH), 4 << 4);
    assert_eq!(
        w32(&mut r, FSTS, FSTS_IQE),
        vec![],
        "already clear, queue empty"
    );
}

#[test]
fn invalidation_completion_event() {
    let mut r = regs();
    bring_up(&mut r);
    w32(&mut r, IEDATA, 0x1_0051);
    w32(&mut r, IEADDR, 0xfee0_1003);
    w32(&mut r, IEUADDR, 0);
    assert_eq!(r32(&mut r, IEDATA), 0x51, "16-bit data");
    assert_eq!(r32(&mut r, IEADDR), 0xfee0_1000, "bits 1:0 reserved");
    let wait: QueueOutcome<&str> = QueueOutcome {
        head: 1,
        processed: 1,
        wait_interrupt: true,
        error: None,
    };
    // Masked (reset): IWC and IP set, no MSI.
    assert_eq!(r.complete_queue(&wait), vec![]);
    assert_eq!(r32(&mut r, ICS), 1);
    assert_eq!(r32(&mut r, IECTL), IECTL_IM | IECTL_IP);
    let msi = MsiMessage {
        address: 0xfee0_1000,
        data: 0x51,
    };
    assert_eq!(
        w32(&mut r, IECTL, 0),
        vec![Action::SendInvalidationEvent(msi)]
    );
    assert_eq!(r32(&mut r, IECTL), 0);
    // IWC still set: the next wait raises nothing; clearing IWC re-arms it.
    assert_eq!(r.complete_queue(&wait), vec![]);
    w32(&mut r, ICS, 1);
    assert_eq!(r32(&mut r, ICS), 0);
    assert_eq!(
        r.complete_queue(&wait),
        vec![Action::SendInvalidationEvent(msi)]
    );
    // Clearing IWC also clears a pending IP.
    w32(&mut r, ICS, 1);
    w32(&mut r, IECTL, IECTL_IM);
    r.complete_queue(&wait);
    assert_eq!(r32(&mut r, IECTL), IECTL_IM | IECTL_IP);
    w32(&mut r, ICS, 1);
    assert_eq!(r32(&mut r, IECTL), IECTL_IM);
    assert_eq!(w32(&mut r, IECTL, 0), vec![]);
}

#[test]
fn faults_through_the_registers_as_linux_reads_them() {
    let mut r = regs();
    w32(&mut r, FEDATA, 0x30);
    w32(&mut r, FEADDR, 0xfee0_0000);
    w32(&mut r, FEUADDR, 0);
    let f = Fault {
        sid: 0x0020,
        address: 0xdead_b123,
        reason: FaultReason::ReadDenied,
        write: false,
    };
    // Masked at reset: recorded, IP set, the event goes out on unmask.
    let (outcome, action) = r.record_fault(f);
    assert_eq!((outcome, action), (RecordOutcome::Recorded(0), None));
    assert_eq!(r32(&mut r, FECTL), FECTL_IM | FECTL_IP);
    let msi = MsiMessage {
        address: 0xfee0_0000,
        data: 0x30,
    };
    assert_eq!(w32(&mut r, FECTL, 0), vec![Action::SendFaultEvent(msi)]);
    // dmar_fault: FSTS, then the record's dwords at +12 and +8, the qword at +0.
    let fsts = r32(&mut r, FSTS);
    assert_eq!(fsts & FSTS_PPF, FSTS_PPF);
    let base = FAULT_RECORD_OFFSET + 16 * u64::from((fsts >> 8) & 0xff);
    let d3 = r32(&mut r, base + 12);
    assert_eq!((d3 & RECORD_F, (d3 >> 30) & 1, d3 & 0xff), (RECORD_F, 1, 6));
    assert_eq!(r32(&mut r, base + 8) & 0xffff, 0x20);
    assert_eq!(r64(&mut r, base), 0xdead_b000);
    assert_eq!(
        r64(&mut r, base + 8) >> 63,
        1,
        "64-bit read of the high half"
    );
    // Writes to the other dwords are ignored; F at +12 clears it.
    w32(&mut r, base, 0);
    w64(&mut r, base + 8, 0);
    assert_eq!(r64(&mut r, base), 0xdead_b000);
    w32(&mut r, base + 12, RECORD_F);
    assert_eq!(r32(&mut r, base + 12) & RECORD_F, 0);
    w32(&mut r, FSTS, FSTS_PFO | FSTS_PPF | 1 << 7);
    assert_eq!(r32(&mut r, FSTS) & (FSTS_PPF | FSTS_PFO), 0);
    // Unmasked now: the next fault sends at once.
    let (outcome, action) = r.record_fault(Fault {
        write: true,
        reason: FaultReason::WriteDenied,
        ..f
    });
    assert_eq!(
        (outcome, action),
        (
            RecordOutcome::Recorded(1),
            Some(Action::SendFaultEvent(msi))
        )
    );
    assert_eq!(r.faults().read_fsts() >> 8, 1, "FRI");
    // Past the last record: nothing.
    let end = FAULT_RECORD_OFFSET + 16 * FAULT_RECORDS as u64;
    assert_eq!(r32(&mut r, end + 12), 0);
}

#[test]
fn event_address_and_data_masks() {
    let mut r = regs();
    w32(&mut r, FEDATA, 0xffff_ffff);
    w32(&mut r, FEADDR, 0xffff_ffff);
    w32(&mut r, FEUADDR, 0x1234);
    assert_eq!(
        (
            r32(&mut r, FEDATA),
            r32(&mut r, FEADDR),
            r32(&mut r, FEUADDR)
        ),
        (0xffff, 0xffff_fffc, 0x1234)
    );
    w32(&mut r, FECTL, FECTL_IP);
    assert_eq!(r32(&mut r, FECTL), 0, "IP is read-only, IM now clear");
}

#[test]
fn queue_address_register() {
    let mut r = regs();
    w64(&mut r, IQA, 0xffff_ffff_ffff_ffff);
    assert_eq!(
        r64(&mut r, IQA),
        0xffff_ffff_f000 | 7,
        "DW and bits 10:3 read 0, HAW"
    );
    w64(&mut r, IQA, 0x8000_0000 | 2);
    w32(&mut r, GCMD, QIE);
    assert_eq!(
        r.queue(),
        Some(QueueState {
            base: 0x8000_0000,
            entries: 1024,
            head: 0,
            tail: 0
        })
    );
    // A tail beyond a queue shrunk later is the queue loop's error to report.
    assert_eq!(w32(&mut r, IQT, 1000 << 4), vec![Action::ProcessQueue]);
    w64(&mut r, IQA, 0x8000_0000);
    assert_eq!(r.queue().map(|q| (q.tail, q.entries)), Some((1000, 256)));
    // IQT bits outside 18:4 read 0.
    w64(&mut r, IQT, u64::MAX);
    assert_eq!(r64(&mut r, IQT), 0x7fff0);
}

#[test]
fn read_only_and_unimplemented_offsets() {
    let mut r = regs();
    bring_up(&mut r);
    let before: Vec<u32> = [VER, CAP, CAP + 4, ECAP, ECAP + 4, GSTS, IQH, IQH + 4]
        .iter()
        .map(|&o| r32(&mut r, o))
        .collect();
    for o in [VER, CAP, CAP + 4, ECAP, ECAP + 4, GSTS, IQH, IQH + 4] {
        assert_eq!(w32(&mut r, o, 0xffff_ffff), vec![], "{o:#x}");
    }
    let after: Vec<u32> = [VER, CAP, CAP + 4, ECAP, ECAP + 4, GSTS, IQH, IQH + 4]
        .iter()
        .map(|&o| r32(&mut r, o))
        .collect();
    assert_eq!(before, after);
    let implemented = |o: u64| {
        matches!(o, 0x0..=0x2c | 0x34..=0x44 | 0x80..=0x94 | 0x9c..=0xac)
            || (IVA_OFFSET..IOTLB_OFFSET + 8).contains(&o)
            || (FAULT_RECORD_OFFSET..FAULT_RECORD_OFFSET + 16 * FAULT_RECORDS as u64).contains(&o)
    };
    for o in (0..0x1000).step_by(4).filter(|&o| !implemented(o)) {
        assert_eq!(w32(&mut r, o, 0xffff_ffff), vec![], "{o:#x}");
        assert_eq!(r32(&mut r, o), 0, "{o:#x} reads 0");
    }
    assert_eq!(r64(&mut r, 0xb8), 0, "IRTA: no interrupt remapping");
    assert_eq!(r32(&mut r, GSTS), RTPS | QIES | TES, "state untouched");
}

#[test]
fn bad_sizes_and_alignment_are_ignored() {
    let mut r = regs();
    bring_up(&mut r);
    for (off, len) in [
        (GCMD, 1),
        (GCMD, 2),
        (GCMD + 2, 4),
        (RTADDR + 4, 8),
        (IQT + 1, 4),
        (CAP, 16),
        (CAP, 0),
    ] {
        let data = vec![0xffu8; len];
        assert_eq!(r.write(off, &data), vec![], "write {off:#x}/{len}");
        let mut out = vec![0xaau8; len];
        r.read(off, &mut out);
        assert!(out.iter().all(|&b| b == 0), "read {off:#x}/{len}");
    }
    assert_eq!(r32(&mut r, GSTS), RTPS | QIES | TES);
    assert_eq!(r64(&mut r, RTADDR), 0x12_3000);
    // Many of them: still ignored (the log is rate-limited, the device keeps working).
    for _ in 0..10_000 {
        r.write(GCMD, &[0; 2]);
    }
    assert!(r.translation_enabled());
}

#[test]
fn sixty_four_bit_access_spans_two_thirty_two_bit_registers() {
    let mut r = regs();
    // GCMD + GSTS as one qword: GCMD takes the low half, GSTS ignores the high half.
    assert_eq!(
        w64(&mut r, GCMD, u64::from(QIE) | 0xffff_ffff << 32),
        vec![]
    );
    assert_eq!(r64(&mut r, GCMD), u64::from(QIES) << 32);
    // FEDATA + FEADDR (0x3c is not 8-aligned: ignored); FECTL + FEDATA at 0x38 works.
    assert_eq!(w64(&mut r, FEDATA, 0x1111_2222_3333_4444), vec![]);
    assert_eq!(r32(&mut r, FEDATA), 0);
    w64(&mut r, FECTL, 0x0000_1234_8000_0000);
    assert_eq!(
        (r32(&mut r, FECTL), r32(&mut r, FEDATA)),
        (FECTL_IM, 0x1234)
    );
}
