//! MSI-X: the capability's message control, the vector table and the pending bit array.
//!
//! Each vector that becomes deliverable (MSI-X enabled, function and vector unmasked) gets a
//! GSI from the [`MsiIrqManager`] and a route to the message the guest programmed. Triggering
//! a masked vector sets its pending bit; unmasking fires and clears it.

use crate::irq::{MsiIrqManager, MsiMessage};
use crate::vectors::VectorRoutes;
use crate::PciError;
use log::{debug, warn};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// MSI-X capability ID.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Length of the MSI-X capability in config space.
pub const MSIX_CAP_LEN: usize = 12;
/// Offset of message control inside the capability.
pub const MSIX_CAP_CONTROL: u16 = 2;
/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Most vectors a function can have.
pub const MSIX_MAX_VECTORS: usize = 2048;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn word(&self, i: usize) -> u32 {
        [self.addr_lo, self.addr_hi, self.data, self.control][i]
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo),
            data: self.data,
        }
    }

    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
}

/// MSI-X state of one function.
pub struct MsixConfig {
    entries: Vec<Entry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    routes: VectorRoutes,
}

impl MsixConfig {
    /// `num_vectors` (1..=2048) vectors, all masked, MSI-X disabled.
    pub fn new(num_vectors: usize, msi: Arc<dyn MsiIrqManager>) -> Result<Self, PciError> {
        if num_vectors == 0 || num_vectors > MSIX_MAX_VECTORS {
            return Err(PciError::InvalidVectorCount(num_vectors));
        }
        let masked = Entry {
            control: VECTOR_MASKED,
            ..Entry::default()
        };
        Ok(MsixConfig {
            entries: vec![masked; num_vectors],
            pba: vec![0; num_vectors.div_ceil(64)],
            enabled: false,
            function_masked: false,
            routes: VectorRoutes::new(num_vectors, msi, "msix"),
        })
    }

    /// Number of vectors in the table.
    pub fn num_vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Size in bytes of the table.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Size in bytes of the pending bit array.
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// The capability bytes and writable mask for a table at `table_offset` and a PBA at
    /// `pba_offset`, both in BAR `bar` (offsets 8-byte aligned).
    pub fn capability(
        &self,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
    ) -> ([u8; MSIX_CAP_LEN], [u8; MSIX_CAP_LEN]) {
        let mut data = [0u8; MSIX_CAP_LEN];
        data[0] = MSIX_CAP_ID;
        data[2..4].copy_from_slice(&(self.num_vectors() - 1).to_le_bytes());
        data[4..8].copy_from_slice(&((table_offset & !7) | u32::from(bar & 7)).to_le_bytes());
        data[8..12].copy_from_slice(&((pba_offset & !7) | u32::from(bar & 7)).to_le_bytes());
        let mut wmask = [0u8; MSIX_CAP_LEN];
        wmask[3] = ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8;
        (data, wmask)
    }

    /// MSI-X enable bit.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Function mask bit.
    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// The guest wrote message control (enable and function mask bits).
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let masked = control & CONTROL_FUNCTION_MASK != 0;
        if enabled == self.enabled && masked == self.function_masked {
            return;
        }
        let was_enabled = self.enabled;
        self.enabled = enabled;
        self.function_masked = masked;
        if was_enabled && !enabled {
            self.clear_routes();
        }
        self.refresh_all();
    }

    /// Remove every vector's route, in one commit.
    fn clear_routes(&mut self) {
        let changes: Vec<(usize, Option<MsiMessage>)> = (0..self.entries.len())
            .filter(|&v| self.routes.route(v).is_some())
            .map(|v| (v, None))
            .collect();
        self.routes.set_routes(&changes);
    }

    /// [`MsixConfig::refresh`] of every vector, the route changes in one commit (an MSI-X
    /// enable or unmask of the function re-routes up to 2048 vectors).
    fn refresh_all(&mut self) {
        let changes: Vec<(usize, Option<MsiMessage>)> = (0..self.entries.len())
            .filter(|&v| self.deliverable(v))
            .map(|v| (v, Some(self.entries[v].message())))
            .filter(|&(v, msg)| self.routes.route(v) != msg)
            .collect();
        self.routes.set_routes(&changes);
        for v in 0..self.entries.len() {
            let routed = self.routes.route(v) == Some(self.entries[v].message());
            if self.deliverable(v) && routed && self.pending(v as u16) {
                self.set_pending(v, false);
                self.fire(v);
            }
        }
    }

    /// Guest read of the table at `offset` (any size; outside the table reads zero).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| self.table_byte(o))
                .unwrap_or(0);
        }
    }

    /// Guest write of 4 or 8 aligned bytes to the table; other accesses are ignored.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let aligned = matches!(data.len(), 4 | 8) && offset & (data.len() as u64 - 1) == 0;
        if !aligned || offset.saturating_add(data.len() as u64) > self.table_size() {
            virtio_dev::guest_warn!(
                "msix: ignored table write at {offset:#x} size {}",
                data.len()
            );
            return;
        }
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let o = offset + 4 * i as u64;
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            self.write_word(
                (o / MSIX_ENTRY_SIZE) as usize,
                ((o % MSIX_ENTRY_SIZE) / 4) as usize,
                v,
            );
        }
    }

    /// Guest read of the pending bit array (any size; outside reads zero). Writes are ignored.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| {
                    let word = self.pba.get(usize::try_from(o / 8).ok()?)?;
                    Some(word.to_le_bytes()[(o % 8) as usize])
                })
                .unwrap_or(0);
        }
    }

    /// Raise `vector`: deliver it, or set its pending bit if it is masked.
    pub fn trigger(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.entries.len() {
            warn!("msix: trigger of vector {vector} out of range");
            return;
        }
        if !self.enabled {
            debug!("msix: vector {vector} raised while MSI-X is disabled");
            return;
        }
        if self.function_masked || self.entries[v].masked() {
            self.set_pending(v, true);
            return;
        }
        self.fire(v);
    }

    /// The irqfd that injects `vector` while it is deliverable (MSI-X enabled, function and
    /// vector unmasked) and routed; `None` otherwise. A passthrough device hands it to VFIO so
    /// the hardware interrupt reaches KVM without going through the VMM.
    pub fn deliverable_irqfd(&self, vector: u16) -> Option<&EventFd> {
        let v = usize::from(vector);
        if v >= self.entries.len() || !self.deliverable(v) {
            return None;
        }
        self.routes.routed_irqfd(v)
    }

    /// Back to the power-on state (function reset): MSI-X disabled, every vector masked with a
    /// zero message, no pending bits. Allocated GSIs are kept for reuse, their routes removed.
    pub fn reset(&mut self) {
        self.set_control(0);
        self.clear_routes();
        for v in 0..self.entries.len() {
            self.entries[v] = Entry {
                control: VECTOR_MASKED,
                ..Entry::default()
            };
        }
        self.pba.fill(0);
    }

    /// Is `vector`'s pending bit set?
    pub fn pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        v < self.entries.len() && self.pba[v / 64] & (1 << (v % 64)) != 0
    }

    fn table_byte(&self, offset: u64) -> Option<u8> {
        let entry = self
            .entries
            .get(usize::try_from(offset / MSIX_ENTRY_SIZE).ok()?)?;
        let word = entry.word(((offset % MSIX_ENTRY_SIZE) / 4) as usize);
        Some(word.to_le_bytes()[(offset % 4) as usize])
    }

    fn write_word(&mut self, v: usize, word: usize, value: u32) {
        let e = &mut self.entries[v];
        match word {
            0 => e.addr_lo = value & !3,
            1 => e.addr_hi = value,
            2 => e.data = value,
            _ => e.control = value & VECTOR_MASKED,
        }
        self.refresh(v);
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && !self.entries[v].masked()
    }

    /// Bring vector `v`'s route up to date and fire it if it is now deliverable and pending.
    fn refresh(&mut self, v: usize) {
        if !self.deliverable(v) {
            return;
        }
        let msg = self.entries[v].message();
        if self.routes.route(v) != Some(msg) && !self.routes.set_route(v, Some(msg)) {
            return;
        }
        if self.pending(v as u16) {
            self.set_pending(v, false);
            self.fire(v);
        }
    }

    /// Deliver vector `v`, or keep it pending when it has no route (see `VectorRoutes::fire`).
    fn fire(&mut self, v: usize) {
        if !self.routes.fire(v) {
            self.set_pending(v, true);
        }
    }

    fn set_pending(&mut self, v: usize, pending: bool) {
        let bit = 1u64 << (v % 64);
        if pending {
            self.pba[v / 64] |= bit;
        } else {
            self.pba[v / 64] &= !bit;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) use crate::test_utils::FakeMsi;

    fn write_entry(m: &mut MsixConfig, v: u64, addr: u64, data: u32, masked: bool) {
        m.table_write(v * 16, &(addr as u32).to_le_bytes());
        m.table_write(v * 16 + 4, &((addr >> 32) as u32).to_le_bytes());
        m.table_write(v * 16 + 8, &data.to_le_bytes());
        m.table_write(v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    fn read_u32(m: &MsixConfig, offset: u64) -> u32 {
        let mut b = [0; 4];
        m.table_read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn capability_layout() {
        let m = MsixConfig::new(5, Arc::new(FakeMsi::default())).unwrap();
        let (data, wmask) = m.capability(2, 0x8000, 0x9000);
        assert_eq!(data[0], MSIX_CAP_ID);
        assert_eq!(u16::from_le_bytes([data[2], data[3]]), 4);
        assert_eq!(u32::from_le_bytes(data[4..8].try_into().unwrap()), 0x8002);
        assert_eq!(u32::from_le_bytes(data[8..12].try_into().unwrap()), 0x9002);
        assert_eq!(wmask[3], 0xc0);
        assert_eq!(wmask.iter().filter(|&&b| b != 0).count(), 1);
        assert!(MsixConfig::new(0, Arc::new(FakeMsi::default())).is_err());
        assert!(MsixConfig::new(2049, Arc::new(FakeMsi::default())).is_err());
    }

    #[test]
    fn deliverable_irqfd_and_reset() {
        let fake = Arc::new(FakeMsi::default());
        let mut m = MsixConfig::new(2, fake.clone()).unwrap();
        write_entry(&mut m, 0, 0xfee0_0000, 0x30, false);
        assert!(m.deliverable_irqfd(0).is_none(), "MSI-X disabled");
        m.set_control(CONTROL_ENABLE);
        let fd = m.deliverable_irqfd(0).expect("vector 0 deliverable");
        fd.write(1).unwrap();
        let gsi = m.routes.gsi(0).unwrap();
        assert_eq!(fake.fired(gsi), 1, "the irqfd is the one routed to the GSI");
        assert!(m.deliverable_irqfd(1).is_none(), "vector 1 masked");
        assert!(m.deliverable_irqfd(2).is_none());
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(m.deliverable_irqfd(0).is_none(), "function masked");
        m.trigger(0);
        assert!(m.pending(0));
        m.reset();
        assert!(!m.enabled() && !m.function_masked() && !m.pending(0));
        assert_eq!(read_u32(&m, 0), 0);
        assert_eq!(read_u32(&m, 12), 1);
        assert_eq!(fake.last_route(gsi), Some(None));
        // The GSI is reused after reset.
        write_entry(&mut m, 0, 0xfee0_0000, 0x31, false);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(m.routes.gsi(0).unwrap(), gsi);
        assert_eq!(fake.last_route(gsi).unwrap().unwrap().data, 0x31);
    }

    #[test]
    fn table_read_write() {
        let mut m = MsixConfig::new(3, Arc::new(FakeMsi::default())).unwrap();
        // Initially every vector is masked.
        for v in 0..3 {
            assert_eq!(read_u32(&m, v * 16 + 12), 1);
        }
        write_entry(&mut m, 1, 0x1_fee0_1000, 0x4041, true);
        assert_eq!(read_u32(&m, 16), 0xfee0_1000);
        assert_eq!(read_u32(&m, 20), 1);
        assert_eq!(read_u32(&m, 24), 0x4041);
        let mut q = [0u8; 8];
        m.table_read(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_1000);
        // A 64-bit write covers address low and high.
        m.table_write(32, &0x2_fee0_2000u64.to_le_bytes());
        assert_eq!(read_u32(&m, 32), 0xfee0_2000);
        assert_eq!(read_u32(&m, 36), 2);
        // Reserved vector-control bits read zero.
        m.table_write(44, &0xffff_fffeu32.to_le_bytes());
        assert_eq!(read_u32(&m, 44), 0);
    }

    #[test]
    fn masking_and_pending() {
        let fake = Arc::new(FakeMsi::default());
        let mut m = MsixConfig::new(2, fake.clone()).unwrap();
        write_entry(&mut m, 0, 0xfee0_0000, 0x30, true);
        // Disabled: triggering does nothing at all.
        m.trigger(0);
        assert!(!m.pending(0));
        assert!(fake.irqfds.lock().unwrap().is_empty());

        // Enabled but vector masked: the pending bit is set, nothing is allocated.
        m.set_control(CONTROL_ENABLE);
        m.trigger(0);
        assert!(m.pending(0));
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 1);
        assert!(fake.irqfds.lock().unwrap().is_empty());

        // Unmasking allocates, routes, fires and clears the pending bit.
        m.table_write(12, &0u32.to_le_bytes());
        assert!(!m.pending(0));
        let gsi = fake.irqfds.lock().unwrap()[0].0;
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x30,
        };
        assert_eq!(fake.last_route(gsi), Some(Some(msg)));
        assert_eq!(fake.fired(gsi), 1);

        // Unmasked: trigger fires directly.
        m.trigger(0);
        m.trigger(0);
        assert_eq!(fake.fired(gsi), 2);

        // Function mask holds interrupts pending; clearing it delivers them once.
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.trigger(0);
        m.trigger(0);
        assert!(m.pending(0));
        assert_eq!(fake.fired(gsi), 0);
        m.set_control(CONTROL_ENABLE);
        assert!(!m.pending(0));
        assert_eq!(fake.fired(gsi), 1);

        // Changing the message of an unmasked vector updates the route.
        m.table_write(8, &0x31u32.to_le_bytes());
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        };
        assert_eq!(fake.last_route(gsi), Some(Some(msg)));
        let n = fake.routes.lock().unwrap().len();
        // Rewriting the same value does not touch the routing table.
        m.table_write(8, &0x31u32.to_le_bytes());
        assert_eq!(fake.routes.lock().unwrap().len(), n);

        // Disabling MSI-X removes the route; dropping releases the GSI.
        m.set_control(0);
        assert_eq!(fake.last_route(gsi), Some(None));
        drop(m);
        assert_eq!(*fake.released.lock().unwrap(), vec![gsi]);
    }

    /// Raising a vector that has no GSI or no route (the VMM ran out, or KVM refused the
    /// table) calls nothing on the manager: device workers raise vectors and may not make
    /// the allocation and routing calls. The interrupt stays pending; the next table write
    /// (on a vCPU) retries and delivers it once.
    #[test]
    fn raising_an_unrouted_vector_leaves_it_pending_without_manager_calls() {
        let fake = Arc::new(FakeMsi::default());
        *fake.fail_allocate.lock().unwrap() = true;
        *fake.fail_route.lock().unwrap() = true;
        let mut m = MsixConfig::new(2, fake.clone()).unwrap();
        m.set_control(CONTROL_ENABLE);
        write_entry(&mut m, 0, 0xfee0_0000, 0x30, false);
        assert!(m.routes.gsi(0).is_none(), "no GSI");
        *fake.fail_allocate.lock().unwrap() = false;
        write_entry(&mut m, 1, 0xfee0_0000, 0x31, false);
        let gsi1 = m.routes.gsi(1).expect("vector 1 has a GSI");
        assert!(m.deliverable_irqfd(1).is_none(), "vector 1 has no route");

        let calls = *fake.calls.lock().unwrap();
        for _ in 0..3 {
            m.trigger(0);
            m.trigger(1);
        }
        assert_eq!(
            *fake.calls.lock().unwrap(),
            calls,
            "no manager call on trigger"
        );
        assert!(m.pending(0) && m.pending(1));
        assert_eq!(fake.fired(gsi1), 0);
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b11);

        // Room again: a table write retries and delivers the pending interrupt once.
        *fake.fail_route.lock().unwrap() = false;
        m.table_write(16 + 8, &0x31u32.to_le_bytes());
        assert!(!m.pending(1));
        assert_eq!(fake.fired(gsi1), 1);
        m.table_write(8, &0x30u32.to_le_bytes());
        let gsi0 = m.routes.gsi(0).expect("vector 0 has a GSI now");
        assert!(!m.pending(0));
        assert_eq!(fake.fired(gsi0), 1);
        m.trigger(0);
        assert_eq!(fake.fired(gsi0), 1, "routed: delivered directly");
    }

    #[test]
    fn hostile_table_accesses() {
        let fake = Arc::new(FakeMsi::default());
        let mut m = MsixConfig::new(2, fake.clone()).unwrap();
        let before: Vec<u32> = (0..8).map(|i| read_u32(&m, i * 4)).collect();
        for &(off, len) in &[
            (1u64, 4usize),
            (2, 2),
            (0, 1),
            (0, 3),
            (4, 8),
            (32, 4),
            (28, 8),
            (u64::MAX - 2, 4),
            (0, 16),
            (0, 0),
        ] {
            m.table_write(off, &vec![0xffu8; len]);
            let mut d = vec![0xaau8; len];
            m.table_read(off, &mut d);
            m.pba_read(off, &mut d);
        }
        let after: Vec<u32> = (0..8).map(|i| read_u32(&m, i * 4)).collect();
        assert_eq!(before, after);
        let mut d = [0xaau8; 4];
        m.table_read(u64::MAX - 1, &mut d);
        assert_eq!(d, [0; 4]);
        m.trigger(2);
        m.trigger(u16::MAX);
        assert!(fake.irqfds.lock().unwrap().is_empty());
    }

    #[test]
    fn enable_disable_and_reset_of_many_vectors_commit_the_routing_table_once() {
        let fake = Arc::new(FakeMsi::default());
        let n = 64u64;
        let mut m = MsixConfig::new(n as usize, fake.clone()).unwrap();
        for v in 0..n {
            write_entry(&mut m, v, 0xfee0_0000, 0x40 + v as u32, false);
        }
        let commits = || *fake.commits.lock().unwrap();
        assert_eq!(commits(), 0, "nothing is routed while MSI-X is disabled");
        m.set_control(CONTROL_ENABLE);
        assert_eq!(commits(), 1, "64 routes, one commit");
        assert_eq!(fake.routes.lock().unwrap().len(), 64);
        // Writes that change nothing commit nothing: the same message again, the same control,
        // masking and unmasking the function.
        write_entry(&mut m, 5, 0xfee0_0000, 0x45, false);
        m.set_control(CONTROL_ENABLE);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(commits(), 1);
        // A masked vector raised, then the function unmasked: delivered after the route.
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.trigger(7);
        assert!(m.pending(7));
        m.set_control(CONTROL_ENABLE);
        assert!(!m.pending(7));
        let gsi7 = m.routes.gsi(7).unwrap();
        assert_eq!(fake.fired(gsi7), 1);
        // One vector reprogrammed as drivers do (masked first): one commit.
        m.table_write(3 * 16 + 12, &1u32.to_le_bytes());
        write_entry(&mut m, 3, 0xfee0_1000, 0x99, true);
        write_entry(&mut m, 3, 0xfee0_1000, 0x99, false);
        assert_eq!(commits(), 2);
        // Disable: every route removed in one commit; reset likewise.
        m.set_control(0);
        assert_eq!(commits(), 3);
        assert!((0..n).all(|v| fake.last_route(m.routes.gsi(v as usize).unwrap()) == Some(None)));
        m.set_control(CONTROL_ENABLE);
        assert_eq!(commits(), 4);
        m.reset();
        assert_eq!(commits(), 5);
        m.reset();
        assert_eq!(commits(), 5, "nothing left to remove");
    }

    #[test]
    fn a_refused_batch_falls_back_to_one_route_per_vector() {
        let fake = Arc::new(FakeMsi::default());
        let mut m = MsixConfig::new(4, fake.clone()).unwrap();
        for v in 0..4 {
            write_entry(&mut m, v, 0xfee0_0000, 0x40 + v as u32, false);
        }
        *fake.fail_route.lock().unwrap() = true;
        m.set_control(CONTROL_ENABLE);
        assert!(
            (0..4).all(|v| m.deliverable_irqfd(v).is_none()),
            "nothing routed"
        );
        *fake.fail_route.lock().unwrap() = false;
        m.set_control(0);
        m.set_control(CONTROL_ENABLE);
        assert!((0..4).all(|v| m.deliverable_irqfd(v).is_some()));
    }
}
