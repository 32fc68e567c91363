//! Typed invalidation requests, the same whether they come from the invalidation queue
//! ([`super::descriptor`]) or the register-based interface ([`super::regs`]).
//!
//! With caching mode every request means "re-read what the guest's tables now say": a context
//! invalidation re-reads context entries (attach, detach, switch domain), an IOTLB invalidation
//! re-walks the second-level tables of the domains it names over the range it names.

use super::caps::AddressWidth;
use std::ops::Range;

/// A context-cache invalidation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextInvalidation {
    /// Every context entry.
    Global,
    /// The context entries of one domain.
    Domain {
        /// Domain id.
        did: u16,
    },
    /// The context entries of one device (or a function group): re-read whatever DID they
    /// carry (Linux invalidates a new entry with DID 0 under caching mode).
    Device {
        /// Domain id given by the guest (informational).
        did: u16,
        /// Source id `bus << 8 | devfn`.
        sid: u16,
        /// Function mask: how many low bits of the function number are ignored (0..=3, FM).
        function_mask: u8,
    },
}

impl ContextInvalidation {
    /// The source ids a device-selective invalidation covers (1, 2, 4 or 8 of them), in order;
    /// empty for global and domain scope.
    pub fn source_ids(&self) -> impl Iterator<Item = u16> {
        let (base, shift, count) = match *self {
            ContextInvalidation::Device {
                sid, function_mask, ..
            } => {
                // FM = n masks the n most significant bits of the 3-bit function number.
                let fm = function_mask.min(3);
                let shift = 3 - fm;
                let masked = ((1u16 << fm) - 1) << shift;
                (sid & !masked, shift, 1u16 << fm)
            }
            _ => (0, 0, 0),
        };
        (0..count).map(move |k| base | (k << shift))
    }
}

/// Which translations an IOTLB invalidation covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbScope {
    /// Every domain, every address.
    Global,
    /// Every address of one domain.
    Domain {
        /// Domain id.
        did: u16,
    },
    /// An aligned power-of-two range of one domain.
    Page {
        /// Domain id.
        did: u16,
        /// Address as given (bits 63:12; bits below the mask are ignored, as the spec says).
        addr: u64,
        /// Address mask: the range is 2^AM pages (0..=63).
        am: u8,
        /// Invalidation hint: only leaf entries changed.
        ih: bool,
    },
}

/// An IOTLB invalidation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbInvalidation {
    /// What it covers.
    pub scope: IotlbScope,
    /// Drain reads (DR): accepted and ignored (CAP.DRD is 0).
    pub drain_reads: bool,
    /// Drain writes (DW): accepted and ignored (CAP.DWD is 0).
    pub drain_writes: bool,
}

impl IotlbInvalidation {
    /// An invalidation of `scope` without drain flags.
    pub fn new(scope: IotlbScope) -> Self {
        IotlbInvalidation {
            scope,
            drain_reads: false,
            drain_writes: false,
        }
    }

    /// The domain it names (none for global scope).
    pub fn did(&self) -> Option<u16> {
        match self.scope {
            IotlbScope::Global => None,
            IotlbScope::Domain { did } | IotlbScope::Page { did, .. } => Some(did),
        }
    }

    /// The input-address range to re-walk for a table of width `aw`: the whole space for global
    /// and domain scope, the aligned range for page scope (clipped to the width; empty when it
    /// lies wholly above it).
    pub fn range(&self, aw: AddressWidth) -> Range<u64> {
        match self.scope {
            IotlbScope::Global | IotlbScope::Domain { .. } => 0..aw.limit(),
            IotlbScope::Page { addr, am, .. } => page_range(addr, am, aw),
        }
    }
}

/// The range `2^am` pages at `addr` (aligned down to that size), clipped to `aw`.
pub fn page_range(addr: u64, am: u8, aw: AddressWidth) -> Range<u64> {
    let shift = u32::from(am) + 12;
    let limit = aw.limit();
    if shift >= aw.bits() {
        return 0..limit;
    }
    let size = 1u64 << shift;
    let start = addr & !(size - 1);
    if start >= limit {
        return limit..limit;
    }
    // start < limit and start is size-aligned with size < limit: no overflow.
    start..(start + size).min(limit)
}

/// Any invalidation request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// Context-cache invalidation.
    Context(ContextInvalidation),
    /// IOTLB invalidation.
    Iotlb(IotlbInvalidation),
}

/// Granularity of an invalidation, as CCMD.CAIG / IOTLB.IAIG report the one actually done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// Global (1).
    Global,
    /// Domain-selective (2).
    Domain,
    /// Device-selective for the context cache, page-selective for the IOTLB (3).
    Selective,
}

impl Granularity {
    /// The 2-bit field value.
    pub fn field(self) -> u64 {
        match self {
            Granularity::Global => 1,
            Granularity::Domain => 2,
            Granularity::Selective => 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(sid: u16, fm: u8) -> Vec<u16> {
        ContextInvalidation::Device {
            did: 0,
            sid,
            function_mask: fm,
        }
        .source_ids()
        .collect()
    }

    #[test]
    fn function_mask_covers_the_function_group() {
        // 00:04.5 = 0x25.
        assert_eq!(device(0x25, 0), vec![0x25]);
        assert_eq!(device(0x25, 1), vec![0x21, 0x25], "function bit 2 masked");
        assert_eq!(
            device(0x25, 2),
            vec![0x21, 0x23, 0x25, 0x27],
            "bits 2:1 masked"
        );
        assert_eq!(
            device(0x125, 3),
            (0x120..0x128).collect::<Vec<_>>(),
            "whole slot, bus kept"
        );
        assert_eq!(device(0xffff, 3), (0xfff8..=0xffff).collect::<Vec<_>>());
        assert_eq!(ContextInvalidation::Global.source_ids().count(), 0);
        assert_eq!(
            ContextInvalidation::Domain { did: 3 }.source_ids().count(),
            0
        );
    }

    #[test]
    fn page_ranges_are_aligned_and_clipped() {
        let aw = AddressWidth::Bits48;
        assert_eq!(page_range(0x5000, 0, aw), 0x5000..0x6000);
        assert_eq!(
            page_range(0x5000, 2, aw),
            0x4000..0x8000,
            "low bits ignored"
        );
        assert_eq!(page_range(0x20_0000, 9, aw), 0x20_0000..0x40_0000);
        assert_eq!(page_range(0xdead_b000, 36, aw), 0..1 << 48, "whole space");
        assert_eq!(page_range(0, 63, aw), 0..1 << 48);
        assert_eq!(
            page_range(!0xfffu64, 0, aw),
            1 << 48..1 << 48,
            "above the width"
        );
        let aw39 = AddressWidth::Bits39;
        assert_eq!(page_range(0x7f_ffff_f000, 0, aw39), 0x7f_ffff_f000..1 << 39);
        assert_eq!(page_range(1 << 39, 5, aw39), 1 << 39..1 << 39);
        assert_eq!(
            page_range(0x40_0000_0000, 26, aw39),
            0x40_0000_0000..0x80_0000_0000
        );
    }

    #[test]
    fn iotlb_ranges_by_scope() {
        let aw = AddressWidth::Bits39;
        let g = IotlbInvalidation::new(IotlbScope::Global);
        assert_eq!((g.did(), g.range(aw)), (None, 0..1 << 39));
        let d = IotlbInvalidation::new(IotlbScope::Domain { did: 4 });
        assert_eq!((d.did(), d.range(aw)), (Some(4), 0..1 << 39));
        let p = IotlbInvalidation::new(IotlbScope::Page {
            did: 5,
            addr: 0x1_2345_6000,
            am: 1,
            ih: true,
        });
        assert_eq!(
            (p.did(), p.range(aw)),
            (Some(5), 0x1_2345_6000..0x1_2345_8000)
        );
        assert_eq!(Granularity::Selective.field(), 3);
    }
}
