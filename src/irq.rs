//! Interrupt plumbing on KVM: the VM-wide GSI routing table (IOAPIC/PIC defaults plus one MSI
//! route per allocated vector), irqfds, and ioeventfds. Implements [`pci::MsiIrqManager`] and
//! [`pci::IoEventManager`].

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pci::{IoEventManager, MsiIrqManager, MsiMessage, MsiVector};
use vmm_sys_util::eventfd::EventFd;

/// Number of IOAPIC pins (GSIs 0..24 are the IOAPIC's).
pub const IOAPIC_PINS: u32 = 24;
/// Upper bound of GSI numbers (KVM refuses a route with `gsi >= KVM_MAX_IRQ_ROUTES`).
pub const MAX_GSI: u32 = KVM_MAX_IRQ_ROUTES as u32;
/// Most entries one KVM_SET_GSI_ROUTING takes, the IOAPIC/PIC defaults included.
pub const MAX_ROUTES: usize = KVM_MAX_IRQ_ROUTES;
/// The default IOAPIC/PIC routes (16 PIC + 24 IOAPIC entries).
const DEFAULT_ROUTES: usize = 40;
/// MSI vectors that can hold a GSI at once: every one may be routed, and the whole table
/// (defaults included) must still fit in [`MAX_ROUTES`], or every commit would fail.
pub const MAX_MSI_GSIS: usize = MAX_ROUTES - DEFAULT_ROUTES;

/// The routing table and the GSI allocator, independent of KVM (unit-testable).
///
/// Changes are transactional: [`RoutingTable::set_route`] and [`RoutingTable::release`] hand
/// the would-be table to a commit function (KVM_SET_GSI_ROUTING) and keep the change only when
/// it succeeds, so the table always matches what KVM last accepted. The allocator hands out at
/// most as many GSIs as can all be routed at once ([`RoutingTable::capacity`]): the table
/// never outgrows what one commit takes.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    defaults: Vec<kvm_irq_routing_entry>,
    msi: BTreeMap<u32, MsiMessage>,
    allocated: BTreeSet<u32>,
    next: u32,
    free: Vec<u32>,
    /// Released GSIs whose route removal KVM has not accepted yet: KVM may still route them,
    /// so they are reused only after the next successful commit.
    retired: Vec<u32>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_entry(gsi: u32, msg: &MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

impl Default for RoutingTable {
    fn default() -> Self {
        Self::new()
    }
}

impl RoutingTable {
    /// KVM's default routes: GSI 0..16 to the PIC pair and the IOAPIC, 16..24 to the IOAPIC.
    pub fn new() -> RoutingTable {
        let mut defaults = Vec::new();
        for gsi in 0..IOAPIC_PINS {
            if gsi < 8 {
                defaults.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                defaults.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
            defaults.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        RoutingTable {
            defaults,
            msi: BTreeMap::new(),
            allocated: BTreeSet::new(),
            next: IOAPIC_PINS,
            free: Vec::new(),
            retired: Vec::new(),
        }
    }

    /// How many GSIs can be allocated at once ([`MAX_MSI_GSIS`]): every one of them fits a
    /// commit with its route.
    pub fn capacity(&self) -> usize {
        MAX_ROUTES - self.defaults.len()
    }

    /// Reserve a GSI above the IOAPIC pins (`OutOfMemory` once [`RoutingTable::capacity`]
    /// GSIs are allocated).
    pub fn allocate(&mut self) -> io::Result<u32> {
        let in_use = self.allocated.len() + self.retired.len();
        if in_use >= self.capacity() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("out of GSIs: all {} MSI routes in use", self.capacity()),
            ));
        }
        let gsi = match self.free.pop() {
            Some(g) => g,
            None if self.next < MAX_GSI => {
                self.next += 1;
                self.next - 1
            }
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    "out of GSI numbers",
                ))
            }
        };
        self.allocated.insert(gsi);
        Ok(gsi)
    }

    /// The MSI route of `gsi`, if it has one.
    pub fn route(&self, gsi: u32) -> Option<MsiMessage> {
        self.msi.get(&gsi).copied()
    }

    /// Set or clear the MSI route of an allocated GSI and hand the resulting table to
    /// `commit`; the change is kept only if `commit` succeeds (otherwise the table is as
    /// before and the error is returned). A change that changes nothing commits nothing.
    pub fn set_route(
        &mut self,
        gsi: u32,
        msg: Option<MsiMessage>,
        commit: impl FnOnce(&[kvm_irq_routing_entry]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.set_routes(&[(gsi, msg)], commit)
    }

    /// Several route changes ([`RoutingTable::set_route`] each) handed to `commit` as one
    /// table: all kept if it succeeds, none if it fails or any GSI is not allocated. Changes
    /// that change nothing are dropped; when none is left nothing is committed.
    pub fn set_routes(
        &mut self,
        changes: &[(u32, Option<MsiMessage>)],
        commit: impl FnOnce(&[kvm_irq_routing_entry]) -> io::Result<()>,
    ) -> io::Result<()> {
        if let Some(&(gsi, _)) = changes.iter().find(|(g, _)| !self.allocated.contains(g)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("GSI {gsi} is not allocated"),
            ));
        }
        let mut old = Vec::with_capacity(changes.len());
        for &(gsi, msg) in changes {
            let before = self.route(gsi);
            if before != msg {
                old.push((gsi, before));
                self.put(gsi, msg);
            }
        }
        if old.is_empty() {
            return Ok(());
        }
        let entries = self.entries();
        let result = if entries.len() > MAX_ROUTES {
            Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("{} routes, KVM takes {MAX_ROUTES}", entries.len()),
            ))
        } else {
            commit(&entries)
        };
        match result {
            Ok(()) => self.committed(),
            Err(_) => {
                // Undo in reverse: a GSI listed twice gets its original route back.
                for (gsi, msg) in old.into_iter().rev() {
                    self.put(gsi, msg);
                }
            }
        }
        result
    }

    /// Return a GSI to the pool, removing its route first (committed with `commit`). When that
    /// commit fails the GSI is held back until a later commit succeeds, as KVM may still route
    /// it; with `reuse` false (its irqfd could not be detached) it is never handed out again.
    pub fn release(
        &mut self,
        gsi: u32,
        reuse: bool,
        commit: impl FnOnce(&[kvm_irq_routing_entry]) -> io::Result<()>,
    ) -> io::Result<()> {
        if !self.allocated.remove(&gsi) {
            return Ok(());
        }
        let routed = self.msi.remove(&gsi).is_some();
        let result = if routed {
            commit(&self.entries())
        } else {
            Ok(())
        };
        match (&result, reuse) {
            (Ok(()), true) => self.free.push(gsi),
            (Err(_), true) => self.retired.push(gsi),
            (_, false) => {}
        }
        if routed && result.is_ok() {
            self.committed();
        }
        result
    }

    fn put(&mut self, gsi: u32, msg: Option<MsiMessage>) {
        match msg {
            Some(m) => self.msi.insert(gsi, m),
            None => self.msi.remove(&gsi),
        };
    }

    /// KVM accepted the table: no retired GSI is routed any more.
    fn committed(&mut self) {
        self.free.append(&mut self.retired);
    }

    /// All entries to hand to KVM_SET_GSI_ROUTING.
    pub fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        let mut v = self.defaults.clone();
        v.extend(self.msi.iter().map(|(g, m)| msi_entry(*g, m)));
        v
    }
}

/// [`MsiIrqManager`] on a KVM VM.
pub struct KvmMsiIrqManager {
    vm: Arc<VmFd>,
    table: Mutex<RoutingTable>,
}

impl KvmMsiIrqManager {
    /// Install the default routing table on `vm`.
    pub fn new(vm: Arc<VmFd>) -> io::Result<KvmMsiIrqManager> {
        let m = KvmMsiIrqManager {
            vm,
            table: Mutex::new(RoutingTable::new()),
        };
        m.commit(&m.lock().entries())?;
        Ok(m)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RoutingTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn commit(&self, entries: &[kvm_irq_routing_entry]) -> io::Result<()> {
        let routing = KvmIrqRouting::from_entries(entries)
            .map_err(|e| io::Error::other(format!("routing table: {e:?}")))?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

impl MsiIrqManager for KvmMsiIrqManager {
    fn allocate(&self) -> io::Result<MsiVector> {
        let gsi = self.lock().allocate()?;
        let undo = |e: io::Error| {
            // Never routed: nothing to commit.
            let _ = self.lock().release(gsi, true, |_| Ok(()));
            e
        };
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(undo)?;
        if let Err(e) = self.vm.register_irqfd(&irqfd, gsi) {
            return Err(undo(io::Error::from_raw_os_error(e.errno())));
        }
        Ok(MsiVector { gsi, irqfd })
    }

    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        self.lock().set_route(gsi, msg, |e| self.commit(e))
    }

    fn set_routes(&self, routes: &[(u32, Option<MsiMessage>)]) -> io::Result<()> {
        self.lock().set_routes(routes, |e| self.commit(e))
    }

    fn release(&self, vector: MsiVector) {
        // A GSI whose irqfd stays attached is never handed out again: the old eventfd would
        // raise the next owner's interrupt.
        let detached = match self.vm.unregister_irqfd(&vector.irqfd, vector.gsi) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("unregister irqfd for GSI {}: {e}", vector.gsi);
                false
            }
        };
        let mut t = self.lock();
        if let Err(e) = t.release(vector.gsi, detached, |e| self.commit(e)) {
            log::warn!("commit GSI routing after releasing GSI {}: {e}", vector.gsi);
        }
    }
}

/// [`IoEventManager`] on a KVM VM (MMIO ioeventfds of any width, no datamatch).
pub struct KvmIoEventManager {
    vm: Arc<VmFd>,
}

impl KvmIoEventManager {
    /// ioeventfds on `vm`.
    pub fn new(vm: Arc<VmFd>) -> KvmIoEventManager {
        KvmIoEventManager { vm }
    }
}

impl IoEventManager for KvmIoEventManager {
    fn register(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_cover_pic_and_ioapic() {
        let t = RoutingTable::new();
        let e = t.entries();
        // 16 PIC + 24 IOAPIC entries.
        assert_eq!(e.len(), 40);
        // SAFETY (test): irqchip entries carry the irqchip union member.
        let pins: Vec<(u32, u32, u32)> = e
            .iter()
            .map(|x| unsafe { (x.gsi, x.u.irqchip.irqchip, x.u.irqchip.pin) })
            .collect();
        assert!(pins.contains(&(4, KVM_IRQCHIP_IOAPIC, 4)));
        assert!(pins.contains(&(4, KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(pins.contains(&(12, KVM_IRQCHIP_PIC_SLAVE, 4)));
        assert!(pins.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(!pins.iter().any(|p| p.0 >= 16 && p.1 != KVM_IRQCHIP_IOAPIC));
    }

    fn ok(_: &[kvm_irq_routing_entry]) -> io::Result<()> {
        Ok(())
    }

    fn refused(_: &[kvm_irq_routing_entry]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }

    const MSG: MsiMessage = MsiMessage {
        address: 0x1_fee0_1000,
        data: 0x41,
    };

    #[test]
    fn msi_routes_follow_allocation() {
        let mut t = RoutingTable::new();
        let a = t.allocate().unwrap();
        let b = t.allocate().unwrap();
        assert_eq!((a, b), (24, 25));
        t.set_route(b, Some(MSG), ok).unwrap();
        let e = t.entries();
        let m = e.iter().find(|x| x.type_ == KVM_IRQ_ROUTING_MSI).unwrap();
        assert_eq!(m.gsi, b);
        // SAFETY (test): MSI entries carry the msi union member.
        unsafe {
            assert_eq!(m.u.msi.address_lo, 0xfee0_1000);
            assert_eq!(m.u.msi.address_hi, 1);
            assert_eq!(m.u.msi.data, 0x41);
        }
        t.set_route(b, None, ok).unwrap();
        assert_eq!(t.entries().len(), 40);
        assert!(t.set_route(99, Some(MSG), ok).is_err());
        t.set_route(a, Some(MSG), ok).unwrap();
        t.release(a, true, ok).unwrap();
        assert_eq!(t.entries().len(), 40);
        assert_eq!(t.allocate().unwrap(), a);
    }

    #[test]
    fn allocation_is_bounded_so_every_gsi_can_be_routed() {
        let mut t = RoutingTable::new();
        let mut gsis = Vec::new();
        while let Ok(g) = t.allocate() {
            gsis.push(g);
        }
        assert_eq!(gsis.len(), MAX_MSI_GSIS);
        assert_eq!(t.capacity(), gsis.len());
        assert_eq!(RoutingTable::new().entries().len(), DEFAULT_ROUTES);
        assert!(gsis.iter().all(|&g| (IOAPIC_PINS..MAX_GSI).contains(&g)));
        assert_eq!(t.allocate().unwrap_err().kind(), io::ErrorKind::OutOfMemory);
        let mut commits = 0;
        for &g in &gsis {
            t.set_route(g, Some(MSG), |e| {
                assert!(e.len() <= MAX_ROUTES);
                commits += 1;
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(commits, gsis.len());
        // KVM takes at most KVM_MAX_IRQ_ROUTES entries: the full table still commits.
        assert_eq!(t.entries().len(), MAX_ROUTES);
        assert!(KvmIrqRouting::from_entries(&t.entries()).is_ok());
    }

    #[test]
    fn a_refused_commit_changes_nothing() {
        let mut t = RoutingTable::new();
        let a = t.allocate().unwrap();
        let b = t.allocate().unwrap();
        t.set_route(a, Some(MSG), ok).unwrap();
        let before = t.clone();
        let other = MsiMessage { data: 0x42, ..MSG };
        // A new route, a changed one, a removed one: all refused, all undone.
        assert!(t.set_route(b, Some(other), refused).is_err());
        assert!(t.set_route(a, Some(other), refused).is_err());
        assert!(t.set_route(a, None, refused).is_err());
        assert_eq!(t.route(a), Some(MSG));
        assert_eq!(t.route(b), None);
        assert_eq!(t.entries().len(), before.entries().len());
        // The next commit sees exactly the accepted table plus its own change.
        t.set_route(b, Some(other), |e| {
            assert_eq!(e.len(), 42);
            Ok(())
        })
        .unwrap();
        assert_eq!(t.route(b), Some(other));
        // Unchanged routes commit nothing.
        t.set_route(b, Some(other), |_| panic!("no-op commit"))
            .unwrap();
        t.set_route(99, None, |_| panic!("unallocated GSI"))
            .unwrap_err();
    }

    #[test]
    fn a_gsi_whose_route_removal_was_refused_is_reused_only_after_a_commit() {
        let mut t = RoutingTable::new();
        let a = t.allocate().unwrap();
        let b = t.allocate().unwrap();
        t.set_route(a, Some(MSG), ok).unwrap();
        assert!(t.release(a, true, refused).is_err());
        // KVM may still route `a`: it is not handed out again yet, and still counts.
        let mut held = t.clone();
        let mut n = 0;
        while let Ok(g) = held.allocate() {
            assert_ne!(g, a);
            n += 1;
        }
        assert_eq!(n, t.capacity() - 2, "b and the held-back a are in use");
        t.set_route(b, Some(MSG), ok).unwrap();
        assert_eq!(t.allocate().unwrap(), a, "reused after a successful commit");
        // An unrouted release needs no commit; with `reuse` false the GSI never comes back.
        let c = t.allocate().unwrap();
        t.release(c, false, |_| panic!("nothing to commit"))
            .unwrap();
        while let Ok(g) = t.allocate() {
            assert_ne!(g, c);
        }
    }

    #[test]
    fn batched_route_changes_commit_once_all_or_nothing() {
        let mut t = RoutingTable::new();
        let gsis: Vec<u32> = (0..100).map(|_| t.allocate().unwrap()).collect();
        let msg = |i: u32| MsiMessage {
            address: 0xfee0_0000,
            data: 0x40 + i,
        };
        let all: Vec<(u32, Option<MsiMessage>)> = gsis.iter().map(|&g| (g, Some(msg(g)))).collect();
        let mut commits = 0;
        t.set_routes(&all, |e| {
            commits += 1;
            assert_eq!(e.len(), 140);
            Ok(())
        })
        .unwrap();
        assert_eq!(commits, 1);
        // Nothing changes: no commit.
        t.set_routes(&all, |_| panic!("committed an unchanged table"))
            .unwrap();
        // A refused commit keeps the table as before, a GSI listed twice included.
        let before = t.route(gsis[0]);
        let refused = [(gsis[0], None), (gsis[0], Some(msg(7))), (gsis[1], None)];
        assert!(t
            .set_routes(&refused, |_| Err(io::Error::other("no")))
            .is_err());
        assert_eq!(t.route(gsis[0]), before);
        assert_eq!(t.route(gsis[1]), Some(msg(gsis[1])));
        assert_eq!(t.entries().len(), 140);
        // An unallocated GSI refuses the whole batch.
        assert!(t.set_routes(&[(gsis[0], None), (9999, None)], ok).is_err());
        assert_eq!(t.route(gsis[0]), before);
        let none: Vec<_> = gsis.iter().map(|&g| (g, None)).collect();
        t.set_routes(&none, ok).unwrap();
        assert_eq!(t.entries().len(), 40);
    }
}
