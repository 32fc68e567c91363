//! Saved state of the virtio-iommu: its configuration (checked, not restored), the negotiated
//! features, the request and event queue positions, the counters, `config.bypass` and the
//! engine (every endpoint, domain and mapping). Requests are served inline on the vCPU that
//! kicked, so a paused VM has none in flight; faults are delivered or dropped when raised, so
//! none are pending.
//!
//! Restore order: the transport re-activates the device with the saved queue configuration
//! and features first, then [`Viommu::restore_state`] moves the queues to their saved
//! positions and rebuilds the domains (replayed into the host mappers), publishing every view
//! before it returns.

use super::Viommu;
use crate::engine::state::snapshot::EngineState;
use crate::snapshot::{frame, unframe, Reader, Result, SnapshotError, Writer};
use crate::virtio::counters::CounterSnapshot;
use crate::virtio::spec::Status;
use virtio_dev::VirtioDevice;
use virtio_queue::QueueT;

/// Kind of a virtio-iommu blob.
const KIND: [u8; 4] = *b"VIOM";

fn put_counters(w: &mut Writer, c: &CounterSnapshot) {
    for v in [
        c.kicks,
        c.interrupts,
        c.maps,
        c.unmaps,
        c.attaches,
        c.detaches,
        c.probes,
        c.faults,
        c.faults_delivered,
        c.faults_dropped,
        c.malformed,
    ] {
        w.u64(v);
    }
    for v in c.statuses {
        w.u64(v);
    }
}

fn get_counters(r: &mut Reader<'_>) -> Result<CounterSnapshot> {
    let mut c = CounterSnapshot {
        kicks: r.u64()?,
        interrupts: r.u64()?,
        maps: r.u64()?,
        unmaps: r.u64()?,
        attaches: r.u64()?,
        detaches: r.u64()?,
        probes: r.u64()?,
        faults: r.u64()?,
        faults_delivered: r.u64()?,
        faults_dropped: r.u64()?,
        malformed: r.u64()?,
        statuses: [0; Status::COUNT],
    };
    for v in c.statuses.iter_mut() {
        *v = r.u64()?;
    }
    Ok(c)
}

fn put_positions(w: &mut Writer, p: Option<(u16, u16)>) {
    w.bool(p.is_some());
    let (a, u) = p.unwrap_or_default();
    w.u16(a);
    w.u16(u);
}

fn get_positions(r: &mut Reader<'_>) -> Result<Option<(u16, u16)>> {
    let some = r.bool()?;
    let (a, u) = (r.u16()?, r.u16()?);
    Ok(some.then_some((a, u)))
}

impl Viommu {
    /// The device's state as one blob (call while the VM is paused).
    pub fn save_state(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u16(self.config.queue_size);
        w.u32(self.config.probe_size);
        w.bool(self.config.mmio);
        w.u64(self.acked);
        put_positions(
            &mut w,
            self.active
                .as_ref()
                .map(|a| (a.queue.next_avail(), a.queue.next_used())),
        );
        put_positions(&mut w, self.faults.queue_positions());
        w.bool(self.pending);
        put_counters(&mut w, &self.counters.snapshot());
        self.domains.engine().encode_state(&mut w);
        frame(KIND, &w.into_inner())
    }

    /// Restore a blob from [`Self::save_state`] into a device built with the same
    /// configuration and endpoints, activated by its transport as it was when saved (or not
    /// activated if it was not). Everything is checked before anything changes, except the
    /// domains, which are rebuilt through the engine's own checks: on error the device holds
    /// no domains and keeps its `config.bypass`.
    pub fn restore_state(&mut self, blob: &[u8]) -> Result<()> {
        let payload = unframe(KIND, blob)?;
        let mut r = Reader::new(payload);
        let queue_size = r.u16()?;
        let probe_size = r.u32()?;
        let mmio = r.bool()?;
        let acked = r.u64()?;
        let request = get_positions(&mut r)?;
        let event = get_positions(&mut r)?;
        let pending = r.bool()?;
        let counters = get_counters(&mut r)?;
        let engine = EngineState::decode(&mut r, &self.config.limits)?;
        r.finish()?;
        let c = &self.config;
        if (queue_size, probe_size, mmio) != (c.queue_size, c.probe_size, c.mmio) {
            return Err(SnapshotError::Mismatch(format!(
                "virtio-iommu queue size {queue_size}, probe size {probe_size}, mmio {mmio}; \
                 this device has {}, {}, {}",
                c.queue_size, c.probe_size, c.mmio
            )));
        }
        if acked & !self.device_features() != 0 {
            return Err(SnapshotError::Invalid(format!(
                "virtio-iommu features {acked:#x} beyond those offered ({:#x})",
                self.device_features()
            )));
        }
        match (&self.active, request) {
            (None, None) if acked == 0 && event.is_none() && !pending => {}
            (None, None) => {
                return Err(SnapshotError::Invalid(
                    "virtio-iommu not activated but with features or queue state".into(),
                ))
            }
            (Some(_), Some(_)) if acked == self.acked => {}
            (Some(_), Some(_)) => {
                return Err(SnapshotError::Mismatch(format!(
                    "virtio-iommu saved with features {acked:#x}, activated with {:#x}",
                    self.acked
                )))
            }
            (Some(_), None) => {
                return Err(SnapshotError::Mismatch(
                    "virtio-iommu saved before activation but already activated".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(SnapshotError::Mismatch(
                    "virtio-iommu saved activated: its transport must activate it first".into(),
                ))
            }
        }
        if event.is_some() != self.faults.queue_positions().is_some() {
            return Err(SnapshotError::Mismatch(
                "virtio-iommu event queue usable on one side only".into(),
            ));
        }
        let bypass = self.domains.bypass();
        if let Err(e) = self.domains.engine_mut().apply_state(&engine) {
            self.domains.set_bypass(bypass);
            return Err(e);
        }
        if let (Some(a), Some((avail, used))) = (self.active.as_mut(), request) {
            a.queue.set_next_avail(avail);
            a.queue.set_next_used(used);
        }
        if let Some((avail, used)) = event {
            self.faults.set_queue_positions(avail, used);
        }
        self.pending = pending;
        self.counters.restore(&counters);
        Ok(())
    }
}
