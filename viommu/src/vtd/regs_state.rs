//! Saved state of the register file: every register a guest can set, checked on restore
//! against the bits the write paths can produce (commands completed, reserved bits clear).

use super::{
    Capabilities, FaultLog, Registers, RootTable, CCMD_CAIG_SHIFT, CCMD_ICC, CCMD_WRITABLE,
    EVENT_ADDR_MASK, EVENT_DATA_MASK, IOTLB_IAIG_SHIFT, IOTLB_IVT, IOTLB_WRITABLE, IQA_QS,
    IQ_INDEX_MASK, IVA_WRITABLE, RTADDR_TTM,
};
use crate::snapshot::{Reader, Result, SnapshotError, Writer};

fn invalid(what: String) -> SnapshotError {
    SnapshotError::Invalid(format!("vtd registers: {what}"))
}

impl Registers {
    pub(crate) fn encode_state(&self, w: &mut Writer) {
        w.u64(self.cap);
        w.u64(self.ecap);
        for b in [
            self.translation,
            self.queue_enabled,
            self.cfi,
            self.root_latched,
        ] {
            w.bool(b);
        }
        w.u64(self.rtaddr);
        match self.root {
            None => w.u8(0),
            Some(RootTable::Legacy(a)) => {
                w.u8(1);
                w.u64(a);
            }
            Some(RootTable::Unsupported { ttm }) => {
                w.u8(2);
                w.u64(u64::from(ttm));
            }
        }
        w.u64(self.ccmd);
        w.u64(self.iva);
        w.u64(self.iotlb);
        self.faults.encode_state(w);
        for v in [self.fedata, self.feaddr, self.feuaddr, self.head] {
            w.u32(v);
        }
        w.u64(self.iqt);
        w.u64(self.iqa);
        for b in [self.iwc, self.iectl_im, self.iectl_ip] {
            w.bool(b);
        }
        for v in [self.iedata, self.ieaddr, self.ieuaddr] {
            w.u32(v);
        }
    }

    /// Registers of a unit with `caps` from saved state; refused unless the unit has the
    /// same capabilities and every value is one the register file could hold.
    pub(crate) fn decode_state(r: &mut Reader<'_>, caps: Capabilities) -> Result<Self> {
        let mut s = Registers::new(caps);
        let (cap, ecap) = (r.u64()?, r.u64()?);
        if (cap, ecap) != (s.cap, s.ecap) {
            return Err(SnapshotError::Mismatch(format!(
                "vtd CAP/ECAP {cap:#x}/{ecap:#x}, this unit has {:#x}/{:#x}",
                s.cap, s.ecap
            )));
        }
        s.translation = r.bool()?;
        s.queue_enabled = r.bool()?;
        s.cfi = r.bool()?;
        s.root_latched = r.bool()?;
        let page = caps.haw_page_mask();
        s.rtaddr = r.u64()?;
        if s.rtaddr & !(page | RTADDR_TTM) != 0 {
            return Err(invalid(format!("RTADDR {:#x}", s.rtaddr)));
        }
        s.root = match (r.u8()?, r.u64()?) {
            (0, _) => None,
            (1, a) if a & !page == 0 => Some(RootTable::Legacy(a)),
            (2, t @ 1..=3) => Some(RootTable::Unsupported { ttm: t as u8 }),
            (k, v) => return Err(invalid(format!("root table {k}/{v:#x}"))),
        };
        if s.root.is_some() != s.root_latched {
            return Err(invalid(
                "root table latched without one (or the reverse)".into(),
            ));
        }
        s.ccmd = r.u64()?;
        if s.ccmd & !((CCMD_WRITABLE & !CCMD_ICC) | 3 << CCMD_CAIG_SHIFT) != 0 {
            return Err(invalid(format!(
                "CCMD {:#x} (a command in progress?)",
                s.ccmd
            )));
        }
        s.iva = r.u64()?;
        if s.iva & !IVA_WRITABLE != 0 {
            return Err(invalid(format!("IVA {:#x}", s.iva)));
        }
        s.iotlb = r.u64()?;
        if s.iotlb & !((IOTLB_WRITABLE & !IOTLB_IVT) | 3 << IOTLB_IAIG_SHIFT) != 0 {
            return Err(invalid(format!(
                "IOTLB {:#x} (a command in progress?)",
                s.iotlb
            )));
        }
        s.faults = FaultLog::decode_state(r)?;
        s.fedata = r.u32()?;
        s.feaddr = r.u32()?;
        s.feuaddr = r.u32()?;
        s.head = r.u32()?;
        if s.fedata & !EVENT_DATA_MASK != 0 || s.feaddr & !EVENT_ADDR_MASK != 0 {
            return Err(invalid("fault event data/address reserved bits".into()));
        }
        if u64::from(s.head) << 4 & !IQ_INDEX_MASK != 0 {
            return Err(invalid(format!("IQH index {}", s.head)));
        }
        s.iqt = r.u64()?;
        if s.iqt & !IQ_INDEX_MASK != 0 {
            return Err(invalid(format!("IQT {:#x}", s.iqt)));
        }
        s.iqa = r.u64()?;
        if s.iqa & !(page | IQA_QS) != 0 {
            return Err(invalid(format!("IQA {:#x}", s.iqa)));
        }
        s.iwc = r.bool()?;
        s.iectl_im = r.bool()?;
        s.iectl_ip = r.bool()?;
        s.iedata = r.u32()?;
        s.ieaddr = r.u32()?;
        s.ieuaddr = r.u32()?;
        if s.iedata & !EVENT_DATA_MASK != 0 || s.ieaddr & !EVENT_ADDR_MASK != 0 {
            return Err(invalid(
                "invalidation event data/address reserved bits".into(),
            ));
        }
        Ok(s)
    }
}
