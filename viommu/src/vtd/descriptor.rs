//! 128-bit invalidation descriptors (legacy mode) parsed into typed values, every reserved bit
//! checked. A descriptor that does not parse is an invalidation queue error: the caller sets
//! FSTS.IQE and leaves IQH at it (see [`super::queue`]).
//!
//! Types (bits 3:0, with bits 11:9 as type bits 6:4): 1 context-cache, 2 IOTLB, 3 device-TLB,
//! 4 interrupt-entry cache, 5 invalidation wait. Device-TLB and interrupt-entry-cache
//! descriptors parse (the guest may send them) but do nothing while ECAP.DT and ECAP.IR are 0.
//! Types 6 and up are PASID / scalable-mode descriptors: invalid without ECAP.SMTS, like 0.

use super::invalidation::{ContextInvalidation, IotlbInvalidation, IotlbScope};

/// Size of one descriptor in the queue (IQA.DW = 0).
pub const DESCRIPTOR_SIZE: u64 = 16;

const TYPE_CONTEXT: u8 = 1;
const TYPE_IOTLB: u8 = 2;
const TYPE_DEVICE_TLB: u8 = 3;
const TYPE_IEC: u8 = 4;
const TYPE_WAIT: u8 = 5;

/// Reserved bits of the low qword, type bits excluded (the type is checked on its own).
const CONTEXT_LO_RSVD: u64 = 0xfffc_0000_0000_f1c0;
const IOTLB_LO_RSVD: u64 = 0xffff_ffff_0000_f100;
const IOTLB_HI_RSVD: u64 = 0xf80;
const DEVICE_TLB_LO_RSVD: u64 = 0x000f_0000_ffe0_01f0;
const DEVICE_TLB_HI_RSVD: u64 = 0xffe;
const IEC_LO_RSVD: u64 = 0xffff_0000_07ff_f1e0;
const WAIT_LO_RSVD: u64 = 0xffff_f180;
const WAIT_HI_RSVD: u64 = 0x3;

/// The status write of an invalidation wait descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusWrite {
    /// Guest-physical address of the 32-bit status word (4-byte aligned).
    pub addr: u64,
    /// The value to write there.
    pub data: u32,
}

/// An invalidation wait descriptor: completes once everything before it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wait {
    /// IF: set ICS.IWC and raise the invalidation completion event.
    pub interrupt: bool,
    /// FN: fence (nothing after it starts before it completes; always true here, the queue is
    /// processed in order).
    pub fence: bool,
    /// SW: write the status data to the status address.
    pub status: Option<StatusWrite>,
}

/// A device-TLB invalidation (accepted as a no-op: no ATS without ECAP.DT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceTlbInvalidation {
    /// Source id of the endpoint.
    pub sid: u16,
    /// Physical function source id (PFSID).
    pub pfsid: u16,
    /// Maximum invalidations pending (MIP).
    pub max_pending: u8,
    /// Address (bits 63:12).
    pub addr: u64,
    /// S: the size is encoded in the address bits.
    pub size: bool,
}

/// An interrupt-entry-cache invalidation (accepted as a no-op: no interrupt remapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptEntryInvalidation {
    /// All entries.
    Global,
    /// `2^mask` entries from `index`.
    Index {
        /// First interrupt index.
        index: u16,
        /// Index mask.
        mask: u8,
    },
}

/// One parsed descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Descriptor {
    /// Context-cache invalidation.
    Context(ContextInvalidation),
    /// IOTLB invalidation.
    Iotlb(IotlbInvalidation),
    /// Device-TLB invalidation (no-op).
    DeviceTlb(DeviceTlbInvalidation),
    /// Interrupt-entry-cache invalidation (no-op).
    InterruptEntryCache(InterruptEntryInvalidation),
    /// Invalidation wait.
    Wait(Wait),
}

/// Why a descriptor is invalid (an invalidation queue error).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// Type 0, a PASID / scalable-mode type (6 and up) or any other unknown type.
    #[error("invalidation descriptor type {0:#x} is not supported in legacy mode")]
    UnsupportedType(u8),
    /// A reserved bit is set.
    #[error("reserved bits set in a {kind} descriptor ({lo:#018x} {hi:#018x})")]
    Reserved {
        /// Descriptor kind.
        kind: &'static str,
        /// Low qword.
        lo: u64,
        /// High qword.
        hi: u64,
    },
    /// Granularity 0 (reserved) in a context-cache or IOTLB descriptor.
    #[error("{0} descriptor with reserved granularity 0")]
    Granularity(&'static str),
}

/// The 7-bit type of a descriptor (bits 3:0 and 11:9).
pub fn descriptor_type(lo: u64) -> u8 {
    ((lo & 0xf) | (((lo >> 9) & 0x7) << 4)) as u8
}

fn check(
    kind: &'static str,
    lo: u64,
    hi: u64,
    lo_rsvd: u64,
    hi_rsvd: u64,
) -> Result<(), DescriptorError> {
    if lo & lo_rsvd != 0 || hi & hi_rsvd != 0 {
        return Err(DescriptorError::Reserved { kind, lo, hi });
    }
    Ok(())
}

/// Parse one descriptor from its two qwords (`lo` at offset 0, `hi` at offset 8).
pub fn parse(lo: u64, hi: u64) -> Result<Descriptor, DescriptorError> {
    let granularity = (lo >> 4) & 3;
    match descriptor_type(lo) {
        TYPE_CONTEXT => {
            check("context-cache", lo, hi, CONTEXT_LO_RSVD, u64::MAX)?;
            let did = (lo >> 16) as u16;
            let inv = match granularity {
                1 => ContextInvalidation::Global,
                2 => ContextInvalidation::Domain { did },
                3 => ContextInvalidation::Device {
                    did,
                    sid: (lo >> 32) as u16,
                    function_mask: ((lo >> 48) & 3) as u8,
                },
                _ => return Err(DescriptorError::Granularity("context-cache")),
            };
            Ok(Descriptor::Context(inv))
        }
        TYPE_IOTLB => {
            check("IOTLB", lo, hi, IOTLB_LO_RSVD, IOTLB_HI_RSVD)?;
            let did = (lo >> 16) as u16;
            let scope = match granularity {
                1 => IotlbScope::Global,
                2 => IotlbScope::Domain { did },
                3 => IotlbScope::Page {
                    did,
                    addr: hi & !0xfff,
                    am: (hi & 0x3f) as u8,
                    ih: hi & (1 << 6) != 0,
                },
                _ => return Err(DescriptorError::Granularity("IOTLB")),
            };
            Ok(Descriptor::Iotlb(IotlbInvalidation {
                scope,
                drain_reads: lo & (1 << 7) != 0,
                drain_writes: lo & (1 << 6) != 0,
            }))
        }
        TYPE_DEVICE_TLB => {
            check("device-TLB", lo, hi, DEVICE_TLB_LO_RSVD, DEVICE_TLB_HI_RSVD)?;
            Ok(Descriptor::DeviceTlb(DeviceTlbInvalidation {
                sid: (lo >> 32) as u16,
                pfsid: (((lo >> 12) & 0xf) | (((lo >> 52) & 0xfff) << 4)) as u16,
                max_pending: ((lo >> 16) & 0x1f) as u8,
                addr: hi & !0xfff,
                size: hi & 1 != 0,
            }))
        }
        TYPE_IEC => {
            check("interrupt-entry-cache", lo, hi, IEC_LO_RSVD, u64::MAX)?;
            let inv = if lo & (1 << 4) == 0 {
                InterruptEntryInvalidation::Global
            } else {
                InterruptEntryInvalidation::Index {
                    index: (lo >> 32) as u16,
                    mask: ((lo >> 27) & 0x1f) as u8,
                }
            };
            Ok(Descriptor::InterruptEntryCache(inv))
        }
        TYPE_WAIT => {
            check("invalidation wait", lo, hi, WAIT_LO_RSVD, WAIT_HI_RSVD)?;
            let status = (lo & (1 << 5) != 0).then_some(StatusWrite {
                addr: hi,
                data: (lo >> 32) as u32,
            });
            Ok(Descriptor::Wait(Wait {
                interrupt: lo & (1 << 4) != 0,
                fence: lo & (1 << 6) != 0,
                status,
            }))
        }
        other => Err(DescriptorError::UnsupportedType(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Encoders as Linux writes them (QI_* macros).
    fn cc(gran: u64, did: u16, sid: u16, fm: u64) -> u64 {
        1 | gran << 4 | u64::from(did) << 16 | u64::from(sid) << 32 | fm << 48
    }
    fn iotlb(gran: u64, did: u16, dr: bool, dw: bool) -> u64 {
        2 | gran << 4 | u64::from(did) << 16 | u64::from(dr) << 7 | u64::from(dw) << 6
    }

    #[test]
    fn context_cache_every_granularity() {
        assert_eq!(
            parse(cc(1, 0, 0, 0), 0),
            Ok(Descriptor::Context(ContextInvalidation::Global))
        );
        assert_eq!(
            parse(cc(2, 0x1234, 0, 0), 0),
            Ok(Descriptor::Context(ContextInvalidation::Domain {
                did: 0x1234
            }))
        );
        assert_eq!(
            parse(cc(3, 0, 0x0420, 2), 0),
            Ok(Descriptor::Context(ContextInvalidation::Device {
                did: 0,
                sid: 0x0420,
                function_mask: 2
            }))
        );
        assert_eq!(
            parse(cc(0, 1, 0, 0), 0),
            Err(DescriptorError::Granularity("context-cache"))
        );
    }

    #[test]
    fn iotlb_every_granularity() {
        let g = parse(iotlb(1, 0, false, false), 0).unwrap();
        assert_eq!(
            g,
            Descriptor::Iotlb(IotlbInvalidation::new(IotlbScope::Global))
        );
        let d = parse(iotlb(2, 7, true, true), 0).unwrap();
        assert_eq!(
            d,
            Descriptor::Iotlb(IotlbInvalidation {
                scope: IotlbScope::Domain { did: 7 },
                drain_reads: true,
                drain_writes: true
            })
        );
        let hi = 0x1234_5000 | 1 << 6 | 9;
        let p = parse(iotlb(3, 9, false, true), hi).unwrap();
        assert_eq!(
            p,
            Descriptor::Iotlb(IotlbInvalidation {
                scope: IotlbScope::Page {
                    did: 9,
                    addr: 0x1234_5000,
                    am: 9,
                    ih: true
                },
                drain_reads: false,
                drain_writes: true
            })
        );
        assert_eq!(
            parse(iotlb(0, 1, false, false), 0),
            Err(DescriptorError::Granularity("IOTLB"))
        );
    }

    #[test]
    fn wait_with_and_without_status() {
        let lo = 5 | 1 << 5 | 1 << 6 | 0xabcd_0001u64 << 32;
        assert_eq!(
            parse(lo, 0x7000_1004),
            Ok(Descriptor::Wait(Wait {
                interrupt: false,
                fence: true,
                status: Some(StatusWrite {
                    addr: 0x7000_1004,
                    data: 0xabcd_0001
                })
            }))
        );
        assert_eq!(
            parse(5 | 1 << 4, 0),
            Ok(Descriptor::Wait(Wait {
                interrupt: true,
                fence: false,
                status: None
            }))
        );
        // Status address must be 4-byte aligned (bits 1:0 reserved).
        assert!(matches!(
            parse(lo, 0x7000_1002),
            Err(DescriptorError::Reserved { .. })
        ));
        // PD (page-request drain, bit 7) is reserved without ECAP.PRS.
        assert!(matches!(
            parse(5 | 1 << 7, 0),
            Err(DescriptorError::Reserved { .. })
        ));
    }

    #[test]
    fn device_tlb_and_iec_parse_as_no_ops() {
        // As Linux's qi_flush_dev_iotlb: SID, QDEP, PFSID split across 15:12 and 63:52.
        let pfsid: u64 = 0x0a3c;
        let lo = 3 | 0x0018u64 << 32 | 0x10 << 16 | (pfsid & 0xf) << 12 | (pfsid >> 4) << 52;
        assert_eq!(
            parse(lo, 0x8000_0000 | 1),
            Ok(Descriptor::DeviceTlb(DeviceTlbInvalidation {
                sid: 0x18,
                pfsid: 0x0a3c,
                max_pending: 0x10,
                addr: 0x8000_0000,
                size: true
            }))
        );
        assert_eq!(
            parse(4, 0),
            Ok(Descriptor::InterruptEntryCache(
                InterruptEntryInvalidation::Global
            ))
        );
        assert_eq!(
            parse(4 | 1 << 4 | 3 << 27 | 0x40u64 << 32, 0),
            Ok(Descriptor::InterruptEntryCache(
                InterruptEntryInvalidation::Index {
                    index: 0x40,
                    mask: 3
                }
            ))
        );
    }

    #[test]
    fn every_reserved_bit_is_rejected() {
        // (valid lo, valid hi, lo reserved mask, hi reserved mask) per type.
        let cases: [(u64, u64, u64, u64); 5] = [
            (cc(3, 1, 2, 1), 0, CONTEXT_LO_RSVD, u64::MAX),
            (
                iotlb(3, 1, true, true),
                0x1000 | 0x7f,
                IOTLB_LO_RSVD,
                IOTLB_HI_RSVD,
            ),
            (3 | 1 << 32, 0x1000, DEVICE_TLB_LO_RSVD, DEVICE_TLB_HI_RSVD),
            (4 | 1 << 4, 0, IEC_LO_RSVD, u64::MAX),
            (5 | 1 << 5, 0x1000, WAIT_LO_RSVD, WAIT_HI_RSVD),
        ];
        for (lo, hi, lo_rsvd, hi_rsvd) in cases {
            assert!(parse(lo, hi).is_ok(), "{lo:#x} {hi:#x}");
            for bit in 0..64 {
                if lo_rsvd & (1 << bit) != 0 {
                    let r = parse(lo | 1 << bit, hi);
                    assert!(
                        matches!(r, Err(DescriptorError::Reserved { .. })),
                        "lo bit {bit} of {lo:#x}: {r:?}"
                    );
                }
                if hi_rsvd & (1 << bit) != 0 {
                    let r = parse(lo, hi | 1 << bit);
                    assert!(
                        matches!(r, Err(DescriptorError::Reserved { .. })),
                        "hi bit {bit} of {lo:#x}: {r:?}"
                    );
                }
            }
            // Type bits 11:9 turn it into a PASID-era type.
            for bit in 9..12 {
                assert!(matches!(
                    parse(lo | 1 << bit, hi),
                    Err(DescriptorError::UnsupportedType(_))
                ));
            }
        }
    }

    #[test]
    fn unknown_and_pasid_types_are_errors() {
        for ty in [0u64, 6, 7, 8, 9, 0xa, 0xf] {
            assert_eq!(
                parse(ty, 0),
                Err(DescriptorError::UnsupportedType(ty as u8))
            );
        }
        // A scalable-mode PASID-cache descriptor with type bits 6:4 set.
        assert_eq!(descriptor_type(7 | 1 << 9), 0x17);
        assert_eq!(
            parse(7 | 1 << 9, 0),
            Err(DescriptorError::UnsupportedType(0x17))
        );
    }
}
