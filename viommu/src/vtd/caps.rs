//! What this DMA-remapping unit implements, and the CAP/ECAP register values that tell the guest.
//!
//! Legacy mode, second-level translation only, caching mode on (the guest invalidates after every
//! change of its tables, which is what lets the engine hold a complete copy of them). The layout of
//! the register set (IVA/IOTLB at [`IVA_OFFSET`], fault records at [`FAULT_RECORD_OFFSET`]) is the
//! one QEMU uses, so the same guest driver paths run against both.

/// Size of the register set (one 4 KiB page: the DRHD's `size` field is 0).
pub const REGISTER_SET_SIZE: u64 = 0x1000;
/// Offset of the invalidate-address register; the IOTLB register follows at +8 (ECAP.IRO).
pub const IVA_OFFSET: u64 = 0xf0;
/// Offset of the IOTLB invalidate register.
pub const IOTLB_OFFSET: u64 = IVA_OFFSET + 8;
/// Offset of the first 16-byte fault recording register (CAP.FRO).
pub const FAULT_RECORD_OFFSET: u64 = 0x220;
/// Number of fault recording registers (CAP.NFR + 1). Linux walks them all in its handler; a few
/// more than one let a burst of faults from several devices be reported before overflow.
pub const FAULT_RECORDS: usize = 8;
/// Version register value: architecture 1.0 (legacy mode).
pub const VERSION: u32 = 0x10;

/// CAP.ND value: 16-bit domain ids (64 Ki domains; Linux computes `1 << (4 + 2 * ND)`).
const CAP_ND: u64 = 6;
/// CAP.CM: caching mode.
const CAP_CM: u64 = 1 << 7;
/// CAP.SLLPS: 2 MiB (bit 34) and 1 GiB (bit 35) second-level superpages.
const CAP_SLLPS_2M: u64 = 1 << 34;
const CAP_SLLPS_1G: u64 = 1 << 35;
/// CAP.PSI: page-selective invalidation.
const CAP_PSI: u64 = 1 << 39;

/// ECAP.C: page-walk coherency (no clflush after table updates).
const ECAP_C: u64 = 1 << 0;
/// ECAP.QI: queued invalidation.
const ECAP_QI: u64 = 1 << 1;
/// ECAP.PT: pass-through context entries (TT = 10b).
const ECAP_PT: u64 = 1 << 6;

/// The adjusted guest address width of a second-level table: how many levels it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddressWidth {
    /// 39 bits, 3-level table (context AW = 1, SAGAW bit 1).
    Bits39,
    /// 48 bits, 4-level table (context AW = 2, SAGAW bit 2).
    Bits48,
}

impl AddressWidth {
    /// The width in bits.
    pub fn bits(self) -> u32 {
        match self {
            AddressWidth::Bits39 => 39,
            AddressWidth::Bits48 => 48,
        }
    }

    /// Number of page-table levels.
    pub fn levels(self) -> u8 {
        match self {
            AddressWidth::Bits39 => 3,
            AddressWidth::Bits48 => 4,
        }
    }

    /// The value of the context entry's AW field (and the SAGAW bit index) for this width.
    pub fn aw_field(self) -> u8 {
        match self {
            AddressWidth::Bits39 => 1,
            AddressWidth::Bits48 => 2,
        }
    }

    /// The width for `bits` (39 or 48), as given on the command line.
    pub fn from_bits(bits: u32) -> Option<Self> {
        match bits {
            39 => Some(AddressWidth::Bits39),
            48 => Some(AddressWidth::Bits48),
            _ => None,
        }
    }

    /// One past the highest input address: `1 << bits`.
    pub fn limit(self) -> u64 {
        1u64 << self.bits()
    }
}

/// What one DRHD implements; shapes CAP/ECAP and the checks of tables and walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Maximum guest address width (MGAW); also the widest table the unit walks.
    pub aw: AddressWidth,
}

impl Capabilities {
    /// A unit of maximum address width `aw`.
    pub fn new(aw: AddressWidth) -> Self {
        Capabilities { aw }
    }

    /// Host address width: bits a guest-physical address in a table entry may use. Equal to the
    /// MGAW, as in QEMU (the VMM's guest-physical space is below 2^39).
    pub fn haw(&self) -> u32 {
        self.aw.bits()
    }

    /// Mask of the address bits 12..HAW-1 of a table entry or pointer register.
    pub fn haw_page_mask(&self) -> u64 {
        ((1u64 << self.haw()) - 1) & !0xfff
    }

    /// Supported adjusted guest address widths (CAP.SAGAW): 39-bit always, 48-bit when the
    /// unit is 48 bits wide (Linux picks the largest).
    pub fn sagaw(&self) -> u8 {
        match self.aw {
            AddressWidth::Bits39 => 1 << 1,
            AddressWidth::Bits48 => (1 << 1) | (1 << 2),
        }
    }

    /// The table width a context entry's AW field selects, if SAGAW supports it.
    pub fn context_width(&self, aw_field: u8) -> Option<AddressWidth> {
        let aw = match aw_field {
            1 => AddressWidth::Bits39,
            2 => AddressWidth::Bits48,
            _ => return None,
        };
        (self.sagaw() & (1 << aw_field) != 0).then_some(aw)
    }

    /// Maximum address mask value of a page-selective invalidation (CAP.MAMV): large enough that
    /// one PSI can cover the whole address space (`aw - 12`). A PSI is walked only over its
    /// range and a walk costs the present entries in that range (a not-present subtree is one
    /// read), so a PSI never costs more than the domain-selective flush Linux would send instead
    /// for a mask above MAMV (QEMU's 18 turns every flush above 1 GiB into a full resync).
    pub fn mamv(&self) -> u8 {
        (self.aw.bits() - 12) as u8
    }

    /// Second-level 2 MiB superpages (CAP.SLLPS bit 0).
    pub fn superpage_2m(&self) -> bool {
        true
    }

    /// Second-level 1 GiB superpages (CAP.SLLPS bit 1).
    pub fn superpage_1g(&self) -> bool {
        true
    }

    /// Pass-through context entries (ECAP.PT).
    pub fn pass_through(&self) -> bool {
        true
    }

    /// Device-TLB / ATS (ECAP.DT): not implemented.
    pub fn device_tlb(&self) -> bool {
        false
    }

    /// Snoop control (ECAP.SC): not implemented, so PTE bit 11 (SNP) is reserved.
    pub fn snoop_control(&self) -> bool {
        false
    }

    /// The capability register.
    pub fn cap(&self) -> u64 {
        let mut cap = CAP_ND | CAP_CM | CAP_PSI;
        cap |= u64::from(self.sagaw()) << 8;
        cap |= u64::from(self.aw.bits() - 1) << 16; // MGAW
        cap |= (FAULT_RECORD_OFFSET / 16) << 24; // FRO
        if self.superpage_2m() {
            cap |= CAP_SLLPS_2M;
        }
        if self.superpage_1g() {
            cap |= CAP_SLLPS_1G;
        }
        cap |= (FAULT_RECORDS as u64 - 1) << 40; // NFR
        cap |= u64::from(self.mamv()) << 48;
        cap
    }

    /// The extended capability register.
    pub fn ecap(&self) -> u64 {
        let mut ecap = ECAP_C | ECAP_QI;
        if self.pass_through() {
            ecap |= ECAP_PT;
        }
        ecap |= (IVA_OFFSET / 16) << 8; // IRO
        ecap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields as Linux's `cap_*` / `ecap_*` macros decode them.
    fn field(v: u64, shift: u32, bits: u32) -> u64 {
        (v >> shift) & ((1 << bits) - 1)
    }

    #[test]
    fn cap_decodes_as_linux_reads_it() {
        for (aw, sagaw, mgaw) in [
            (AddressWidth::Bits39, 0b010, 39),
            (AddressWidth::Bits48, 0b110, 48),
        ] {
            let cap = Capabilities::new(aw).cap();
            assert_eq!(1u64 << (4 + 2 * field(cap, 0, 3)), 65536, "cap_ndoms");
            assert_eq!(field(cap, 3, 1), 0, "AFL");
            assert_eq!(field(cap, 4, 1), 0, "RWBF");
            assert_eq!(field(cap, 5, 2), 0, "PLMR/PHMR");
            assert_eq!(field(cap, 7, 1), 1, "caching mode");
            assert_eq!(field(cap, 8, 5), sagaw, "SAGAW");
            assert_eq!(field(cap, 16, 6) + 1, mgaw, "cap_mgaw");
            assert_eq!(field(cap, 22, 1), 0, "ZLR");
            assert_eq!(
                field(cap, 24, 10) * 16,
                FAULT_RECORD_OFFSET,
                "fault reg offset"
            );
            assert_eq!(field(cap, 34, 4), 0b11, "SLLPS 2M + 1G");
            assert_eq!(field(cap, 39, 1), 1, "PSI");
            assert_eq!(
                field(cap, 40, 8) + 1,
                FAULT_RECORDS as u64,
                "num fault regs"
            );
            assert_eq!(field(cap, 48, 6), mgaw - 12, "MAMV");
            assert_eq!(field(cap, 54, 10), 0, "drain, FL1GP, PI, FL5LP, ESRTPS...");
            // The fault records fit in the register page.
            let end = field(cap, 24, 10) * 16 + (field(cap, 40, 8) + 1) * 16;
            assert!(end <= REGISTER_SET_SIZE);
        }
    }

    #[test]
    fn ecap_decodes_as_linux_reads_it() {
        let ecap = Capabilities::new(AddressWidth::Bits48).ecap();
        assert_eq!(field(ecap, 0, 1), 1, "coherent");
        assert_eq!(field(ecap, 1, 1), 1, "QI");
        assert_eq!(field(ecap, 2, 1), 0, "DT");
        assert_eq!(field(ecap, 3, 2), 0, "IR, EIM");
        assert_eq!(field(ecap, 6, 1), 1, "PT");
        assert_eq!(field(ecap, 7, 1), 0, "SC");
        assert_eq!(field(ecap, 8, 10) * 16, IVA_OFFSET, "ecap_iotlb_offset");
        assert_eq!(
            field(ecap, 18, 46),
            0,
            "no MHMV, NEST, PRS, PASID, SMTS, SLTS, FLTS"
        );
        const { assert!(IOTLB_OFFSET + 8 <= FAULT_RECORD_OFFSET) };
    }

    #[test]
    fn context_widths_follow_sagaw() {
        let c39 = Capabilities::new(AddressWidth::Bits39);
        let c48 = Capabilities::new(AddressWidth::Bits48);
        assert_eq!(c39.context_width(1), Some(AddressWidth::Bits39));
        assert_eq!(c39.context_width(2), None);
        assert_eq!(c48.context_width(2), Some(AddressWidth::Bits48));
        assert_eq!(c48.context_width(1), Some(AddressWidth::Bits39));
        for bad in [0, 3, 4, 7] {
            assert_eq!(c48.context_width(bad), None);
        }
        assert_eq!(c39.haw_page_mask(), 0x7f_ffff_f000);
        assert_eq!(AddressWidth::from_bits(48), Some(AddressWidth::Bits48));
        assert_eq!(AddressWidth::from_bits(57), None);
        assert_eq!(AddressWidth::Bits39.limit(), 1 << 39);
        assert_eq!(AddressWidth::Bits48.levels(), 4);
    }
}
