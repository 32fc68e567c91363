//! The MSI capability (PCI 3.0 §6.8.1), emulated: message control, address, data, and the
//! optional per-vector mask and pending bits.
//!
//! Each vector that becomes deliverable (MSI enabled, vector inside the enabled count and
//! unmasked) gets a GSI from the [`MsiIrqManager`] routed to the programmed message, with the
//! vector number in the low data bits. Triggering a masked vector sets its pending bit;
//! unmasking fires and clears it.

use crate::irq::{MsiIrqManager, MsiMessage};
use crate::vectors::VectorRoutes;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// MSI capability ID.
pub const MSI_CAP_ID: u8 = 0x05;
/// Most vectors MSI can have.
pub const MSI_MAX_VECTORS: usize = 32;
const CONTROL: usize = 2;
const CONTROL_ENABLE: u16 = 1 << 0;
const CONTROL_64BIT: u16 = 1 << 7;
const CONTROL_PER_VECTOR_MASK: u16 = 1 << 8;
const MAX_LEN: usize = 24;

/// Length in bytes of an MSI capability with message control `control`.
pub fn msi_cap_len(control: u16) -> usize {
    let mut len = 10;
    if control & CONTROL_64BIT != 0 {
        len += 4;
    }
    if control & CONTROL_PER_VECTOR_MASK != 0 {
        len += 10;
    }
    len
}

/// MSI state of one function.
pub struct MsiConfig {
    regs: [u8; MAX_LEN],
    wmask: [u8; MAX_LEN],
    len: usize,
    is64: bool,
    per_vector_mask: bool,
    /// Multiple message capable: log2 of the vectors the function supports.
    mmc: u8,
    pending: u32,
    routes: VectorRoutes,
}

impl MsiConfig {
    /// An MSI capability with the read-only bits of `control` (64-bit, per-vector masking,
    /// multiple message capable), disabled, address and data zero, vectors unmasked.
    pub fn new(control: u16, msi: Arc<dyn MsiIrqManager>) -> Self {
        let is64 = control & CONTROL_64BIT != 0;
        let per_vector_mask = control & CONTROL_PER_VECTOR_MASK != 0;
        let mmc = ((control >> 1) & 0x7).min(5) as u8;
        let len = msi_cap_len(control);
        let mut cfg = MsiConfig {
            regs: [0; MAX_LEN],
            wmask: [0; MAX_LEN],
            len,
            is64,
            per_vector_mask,
            mmc,
            pending: 0,
            routes: VectorRoutes::new(MSI_MAX_VECTORS, msi, "msi"),
        };
        let ro = (control & (CONTROL_64BIT | CONTROL_PER_VECTOR_MASK)) | (u16::from(mmc) << 1);
        cfg.regs[CONTROL..CONTROL + 2].copy_from_slice(&ro.to_le_bytes());
        cfg.wmask[CONTROL] = 0x71; // enable, multiple message enable
        cfg.wmask[4..8].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
        if is64 {
            cfg.wmask[8..12].fill(0xff);
        }
        let data = cfg.data_offset();
        cfg.wmask[data..data + 2].fill(0xff);
        if per_vector_mask {
            let bits = cfg.supported_mask();
            let mask = cfg.mask_offset();
            cfg.wmask[mask..mask + 4].copy_from_slice(&bits.to_le_bytes());
        }
        cfg
    }

    /// Length of the capability in config space.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a capability has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// MSI enable bit.
    pub fn enabled(&self) -> bool {
        self.control() & CONTROL_ENABLE != 0
    }

    /// Vectors the guest enabled (1, 2, 4, ... 32), meaningful while [`MsiConfig::enabled`].
    pub fn num_vectors(&self) -> usize {
        let mme = ((self.control() >> 4) & 0x7) as u8;
        1 << mme.min(self.mmc)
    }

    /// Guest read of capability bytes at `rel` (offset from the capability start; the ID and
    /// next pointer bytes read as stored here, i.e. zero). Outside the capability reads zero.
    pub fn read(&self, rel: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let o = rel.saturating_add(i);
            *b = if self.per_vector_mask && (self.pending_offset()..self.len).contains(&o) {
                self.pending.to_le_bytes()[o - self.pending_offset()]
            } else {
                self.regs
                    .get(o)
                    .copied()
                    .filter(|_| o < self.len)
                    .unwrap_or(0)
            };
        }
    }

    /// Guest write of capability bytes at `rel`; only writable bits change, then routes follow.
    pub fn write(&mut self, rel: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let o = rel.saturating_add(i);
            if o < self.len {
                self.regs[o] = (self.regs[o] & !self.wmask[o]) | (v & self.wmask[o]);
            }
        }
        self.update();
    }

    /// The irqfd injecting `vector` while it is deliverable and routed, else `None`.
    pub fn deliverable_irqfd(&self, vector: usize) -> Option<&EventFd> {
        if !self.deliverable(vector) {
            return None;
        }
        self.routes.routed_irqfd(vector)
    }

    /// Raise `vector`: deliver it, or set its pending bit if it is masked.
    pub fn trigger(&mut self, vector: usize) {
        if !self.enabled() || vector >= self.num_vectors() {
            virtio_dev::guest_warn!("msi: vector {vector} raised while not enabled");
            return;
        }
        if self.masked(vector) {
            self.pending |= 1 << vector;
            return;
        }
        self.fire(vector);
    }

    /// Is `vector`'s pending bit set?
    pub fn pending(&self, vector: usize) -> bool {
        vector < MSI_MAX_VECTORS && self.pending & (1 << vector) != 0
    }

    /// Back to the power-on state: disabled, zero message, unmasked, nothing pending. GSIs are
    /// kept for reuse, their routes removed.
    pub fn reset(&mut self) {
        for o in 0..self.len {
            self.regs[o] &= !self.wmask[o];
        }
        self.pending = 0;
        self.update();
    }

    fn control(&self) -> u16 {
        u16::from_le_bytes([self.regs[CONTROL], self.regs[CONTROL + 1]])
    }

    fn data_offset(&self) -> usize {
        if self.is64 {
            12
        } else {
            8
        }
    }

    fn mask_offset(&self) -> usize {
        self.data_offset() + 4
    }

    fn pending_offset(&self) -> usize {
        self.mask_offset() + 4
    }

    fn supported_mask(&self) -> u32 {
        let n = 1u64 << self.mmc;
        ((1u64 << n) - 1) as u32
    }

    fn u32_at(&self, o: usize) -> u32 {
        u32::from_le_bytes([
            self.regs[o],
            self.regs[o + 1],
            self.regs[o + 2],
            self.regs[o + 3],
        ])
    }

    fn masked(&self, vector: usize) -> bool {
        self.per_vector_mask && self.u32_at(self.mask_offset()) & (1 << vector) != 0
    }

    fn deliverable(&self, vector: usize) -> bool {
        self.enabled() && vector < self.num_vectors() && !self.masked(vector)
    }

    fn message(&self, vector: usize) -> MsiMessage {
        let lo = u64::from(self.u32_at(4));
        let hi = if self.is64 {
            u64::from(self.u32_at(8))
        } else {
            0
        };
        let d = self.data_offset();
        let data = u32::from(u16::from_le_bytes([self.regs[d], self.regs[d + 1]]));
        let n = self.num_vectors() as u32;
        MsiMessage {
            address: (hi << 32) | lo,
            data: (data & !(n - 1)) | vector as u32,
        }
    }

    /// Bring every route up to date, the changes in one commit (a data write re-routes every
    /// enabled vector); fire pending vectors that became deliverable.
    fn update(&mut self) {
        if !self.enabled() {
            self.pending = 0;
        }
        let changes: Vec<(usize, Option<MsiMessage>)> = (0..MSI_MAX_VECTORS)
            .filter_map(|v| {
                let want = self.deliverable(v).then(|| self.message(v));
                let stale = !self.enabled() || v >= self.num_vectors();
                match want {
                    Some(msg) if self.routes.route(v) != Some(msg) => Some((v, Some(msg))),
                    None if stale && self.routes.route(v).is_some() => Some((v, None)),
                    _ => None,
                }
            })
            .collect();
        self.routes.set_routes(&changes);
        for v in 0..MSI_MAX_VECTORS {
            let routed = self.deliverable(v) && self.routes.route(v) == Some(self.message(v));
            if routed && self.pending(v) {
                self.pending &= !(1 << v);
                self.fire(v);
            }
        }
    }

    /// Deliver vector `v`, or keep it pending when it has no route (see `VectorRoutes::fire`).
    fn fire(&mut self, v: usize) {
        if !self.routes.fire(v) {
            self.pending |= 1 << v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msix::tests::FakeMsi;

    fn w16(m: &mut MsiConfig, rel: usize, v: u16) {
        m.write(rel, &v.to_le_bytes());
    }

    fn w32(m: &mut MsiConfig, rel: usize, v: u32) {
        m.write(rel, &v.to_le_bytes());
    }

    fn r32(m: &MsiConfig, rel: usize) -> u32 {
        let mut b = [0; 4];
        m.read(rel, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn layouts_and_read_only_bits() {
        assert_eq!(msi_cap_len(0), 10);
        assert_eq!(msi_cap_len(CONTROL_64BIT), 14);
        assert_eq!(msi_cap_len(CONTROL_PER_VECTOR_MASK), 20);
        assert_eq!(msi_cap_len(CONTROL_64BIT | CONTROL_PER_VECTOR_MASK), 24);
        let fake = Arc::new(FakeMsi::default());
        // 64-bit, per-vector mask, 4 vectors capable; the enable bit in `control` is ignored.
        let mut m = MsiConfig::new(0x0185, fake);
        assert_eq!(r32(&m, 0) >> 16, 0x0184);
        // Writing all-ones: enable + MME stick, capable/64-bit/PVM bits do not change.
        w16(&mut m, 2, 0xffff);
        assert_eq!(r32(&m, 0) >> 16, 0x01f5);
        assert_eq!(m.num_vectors(), 4);
        w32(&mut m, 4, 0xffff_ffff);
        assert_eq!(r32(&m, 4), 0xffff_fffc);
        // Only the 4 supported vectors have mask bits; pending bits are read-only.
        w32(&mut m, 16, 0xffff_ffff);
        assert_eq!(r32(&m, 16), 0xf);
        w32(&mut m, 20, 0xffff_ffff);
        assert_eq!(r32(&m, 20), 0);
        // Past the capability reads zero.
        assert_eq!(r32(&m, 24), 0);
        assert_eq!(r32(&m, usize::MAX - 1), 0);
    }

    #[test]
    fn multi_vector_routes_masking_and_pending() {
        let fake = Arc::new(FakeMsi::default());
        let mut m = MsiConfig::new(0x0184, fake.clone());
        w32(&mut m, 4, 0xfee0_1000);
        w32(&mut m, 8, 0);
        w16(&mut m, 12, 0x4040);
        w32(&mut m, 16, 0b0010); // vector 1 masked
        w16(&mut m, 2, (2 << 4) | 1); // enable 4 vectors
        assert!(m.enabled());
        let gsi0 = m.routes.gsi(0).unwrap();
        assert_eq!(
            fake.last_route(gsi0),
            Some(Some(MsiMessage {
                address: 0xfee0_1000,
                data: 0x4040
            }))
        );
        let gsi3 = m.routes.gsi(3).unwrap();
        assert_eq!(fake.last_route(gsi3).unwrap().unwrap().data, 0x4043);
        assert!(m.deliverable_irqfd(0).is_some());
        assert!(m.deliverable_irqfd(1).is_none());
        assert!(m.deliverable_irqfd(4).is_none());
        // Masked vector 1: pending, then fired on unmask.
        m.trigger(1);
        assert!(m.pending(1));
        assert_eq!(r32(&m, 20), 0b0010);
        w32(&mut m, 16, 0);
        assert!(!m.pending(1));
        let gsi1 = m.routes.gsi(1).unwrap();
        assert_eq!(fake.fired(gsi1), 1);
        m.trigger(0);
        assert_eq!(fake.fired(gsi0), 1);
        // Out-of-range vectors are ignored.
        m.trigger(7);
        m.trigger(usize::MAX);
        // Disable removes every route.
        w16(&mut m, 2, 0);
        for g in [gsi0, gsi1, gsi3] {
            assert_eq!(fake.last_route(g), Some(None));
        }
        assert!(m.deliverable_irqfd(0).is_none());
    }

    /// A vector KVM refused a route for is raised without any manager call (workers raise
    /// vectors); it stays pending until a capability write (a vCPU) routes and delivers it.
    #[test]
    fn raising_an_unrouted_vector_leaves_it_pending_without_manager_calls() {
        let fake = Arc::new(FakeMsi::default());
        *fake.fail_route.lock().unwrap() = true;
        let mut m = MsiConfig::new(0, fake.clone());
        w32(&mut m, 4, 0xfee0_0000);
        w16(&mut m, 8, 0x31);
        w16(&mut m, 2, 1);
        let gsi = m.routes.gsi(0).unwrap();
        assert!(m.deliverable_irqfd(0).is_none(), "no route");
        let calls = *fake.calls.lock().unwrap();
        m.trigger(0);
        m.trigger(0);
        assert_eq!(
            *fake.calls.lock().unwrap(),
            calls,
            "no manager call on trigger"
        );
        assert!(m.pending(0));
        assert_eq!(fake.fired(gsi), 0);
        *fake.fail_route.lock().unwrap() = false;
        w16(&mut m, 8, 0x31);
        assert!(m.deliverable_irqfd(0).is_some());
        assert!(!m.pending(0));
        assert_eq!(fake.fired(gsi), 1);
    }

    #[test]
    fn reset_and_drop_release_vectors() {
        let fake = Arc::new(FakeMsi::default());
        let mut m = MsiConfig::new(0, fake.clone());
        w32(&mut m, 4, 0xfee0_0000);
        w16(&mut m, 8, 0x31);
        w16(&mut m, 2, 1);
        let gsi = m.routes.gsi(0).unwrap();
        m.reset();
        assert!(!m.enabled());
        assert_eq!(r32(&m, 4), 0);
        assert_eq!(fake.last_route(gsi), Some(None));
        drop(m);
        assert_eq!(*fake.released.lock().unwrap(), vec![gsi]);
    }

    #[test]
    fn enabling_or_retargeting_all_vectors_commits_once() {
        let fake = Arc::new(FakeMsi::default());
        // 32 vectors capable (MMC 5), 64-bit, per-vector masking.
        let mut m = MsiConfig::new(0x018a, fake.clone());
        w32(&mut m, 4, 0xfee0_1000);
        w32(&mut m, 8, 0);
        w16(&mut m, 12, 0x4000);
        let commits = || *fake.commits.lock().unwrap();
        w16(&mut m, 2, (5 << 4) | 1); // enable 32 vectors
        assert_eq!(m.num_vectors(), 32);
        assert_eq!(commits(), 1, "32 routes, one commit");
        w16(&mut m, 12, 0x4020); // new data: every vector re-routed
        assert_eq!(commits(), 2);
        w16(&mut m, 12, 0x4020); // the same again: nothing
        assert_eq!(commits(), 2);
        w16(&mut m, 2, 0); // disable: every route removed
        assert_eq!(commits(), 3);
        assert!((0..32).all(|v| m.deliverable_irqfd(v).is_none()));
    }
}
