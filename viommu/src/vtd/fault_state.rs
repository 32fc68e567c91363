//! Saved state of the fault log: the records, the next record index, FSTS and FECTL bits.

use super::{FaultLog, FAULT_RECORDS};
use crate::snapshot::{Reader, Result, SnapshotError, Writer};

impl FaultLog {
    pub(crate) fn encode_state(&self, w: &mut Writer) {
        for (lo, hi) in self.records {
            w.u64(lo);
            w.u64(hi);
        }
        w.u8(self.next as u8);
        w.u8(self.fri);
        for b in [self.pfo, self.iqe, self.im, self.ip] {
            w.bool(b);
        }
    }

    pub(crate) fn decode_state(r: &mut Reader<'_>) -> Result<Self> {
        let mut log = FaultLog::new();
        for rec in log.records.iter_mut() {
            *rec = (r.u64()?, r.u64()?);
        }
        let next = usize::from(r.u8()?);
        let fri = r.u8()?;
        if next >= FAULT_RECORDS || usize::from(fri) >= FAULT_RECORDS {
            return Err(SnapshotError::Invalid(format!(
                "vtd fault log: next record {next}, FRI {fri} (there are {FAULT_RECORDS})"
            )));
        }
        log.next = next;
        log.fri = fri;
        log.pfo = r.bool()?;
        log.iqe = r.bool()?;
        log.im = r.bool()?;
        log.ip = r.bool()?;
        Ok(log)
    }
}
