//! Interrupt plumbing on KVM: the VM-wide GSI routing table (IOAPIC/PIC defaults plus one MSI
//! route per allocated vector), irqfds, and ioeventfds. Implements [`pci::MsiIrqManager`] and
//! [`pci::IoEventManager`].

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pci::{IoEventManager, MsiIrqManager, MsiMessage, MsiVector};
use vmm_sys_util::eventfd::EventFd;

/// Number of IOAPIC pins (GSIs 0..24 are the IOAPIC's).
pub const IOAPIC_PINS: u32 = 24;
/// Upper bound of GSI numbers (KVM_MAX_IRQ_ROUTES: KVM refuses a route at or above it).
pub const MAX_GSI: u32 = 4096;
/// Routes KVM accepts in one KVM_SET_GSI_ROUTING table (KVM_MAX_IRQ_ROUTES).
pub const MAX_ROUTES: usize = 4096;
/// The default IOAPIC/PIC routes (16 PIC + 24 IOAPIC entries).
const DEFAULT_ROUTES: usize = 40;
/// MSI vectors that can hold a GSI at once: every one may be routed, and the whole table
/// (defaults included) must still fit in [`MAX_ROUTES`], or every commit would fail.
pub const MAX_MSI_GSIS: usize = MAX_ROUTES - DEFAULT_ROUTES;

/// The routing table and the GSI allocator, independent of KVM (unit-testable).
#[derive(Debug, Clone)]
pub struct RoutingTable {
    defaults: Vec<kvm_irq_routing_entry>,
    msi: BTreeMap<u32, MsiMessage>,
    allocated: BTreeSet<u32>,
    next: u32,
    free: Vec<u32>,
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
        }
    }

    /// Reserve a GSI above the IOAPIC pins (at most [`MAX_MSI_GSIS`] at once).
    pub fn allocate(&mut self) -> io::Result<u32> {
        if self.allocated.len() >= MAX_MSI_GSIS {
            return Err(io::Error::other("out of GSIs"));
        }
        let gsi = match self.free.pop() {
            Some(g) => g,
            None if self.next < MAX_GSI => {
                self.next += 1;
                self.next - 1
            }
            None => return Err(io::Error::other("out of GSIs")),
        };
        self.allocated.insert(gsi);
        Ok(gsi)
    }

    /// Set or clear the MSI route of an allocated GSI; returns the route it had.
    pub fn set_route(
        &mut self,
        gsi: u32,
        msg: Option<MsiMessage>,
    ) -> io::Result<Option<MsiMessage>> {
        if !self.allocated.contains(&gsi) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("GSI {gsi} is not allocated"),
            ));
        }
        Ok(match msg {
            Some(m) => self.msi.insert(gsi, m),
            None => self.msi.remove(&gsi),
        })
    }

    /// Change `gsi`'s route and `commit` the whole table; if the commit fails the table is
    /// left exactly as it was (so one refused route cannot make every later commit fail).
    pub fn update(
        &mut self,
        gsi: u32,
        msg: Option<MsiMessage>,
        commit: impl FnOnce(&RoutingTable) -> io::Result<()>,
    ) -> io::Result<()> {
        let old = self.set_route(gsi, msg)?;
        if let Err(e) = commit(self) {
            // `gsi` is allocated (checked above), so restoring cannot fail.
            let _ = self.set_route(gsi, old);
            return Err(e);
        }
        Ok(())
    }

    /// Return a GSI to the pool (its route goes with it).
    pub fn release(&mut self, gsi: u32) {
        if self.allocated.remove(&gsi) {
            self.msi.remove(&gsi);
            self.free.push(gsi);
        }
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
        m.commit(&m.lock())?;
        Ok(m)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RoutingTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn commit(&self, t: &RoutingTable) -> io::Result<()> {
        let routing = KvmIrqRouting::from_entries(&t.entries())
            .map_err(|e| io::Error::other(format!("routing table: {e:?}")))?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

impl MsiIrqManager for KvmMsiIrqManager {
    fn allocate(&self) -> io::Result<MsiVector> {
        let gsi = self.lock().allocate()?;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
        if let Err(e) = self.vm.register_irqfd(&irqfd, gsi) {
            self.lock().release(gsi);
            return Err(io::Error::from_raw_os_error(e.errno()));
        }
        Ok(MsiVector { gsi, irqfd })
    }

    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        self.lock().update(gsi, msg, |t| self.commit(t))
    }

    fn release(&self, vector: MsiVector) {
        if let Err(e) = self.vm.unregister_irqfd(&vector.irqfd, vector.gsi) {
            log::warn!("unregister irqfd for GSI {}: {e}", vector.gsi);
        }
        let mut t = self.lock();
        t.release(vector.gsi);
        if let Err(e) = self.commit(&t) {
            log::warn!("commit GSI routing after release: {e}");
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

    #[test]
    fn msi_routes_follow_allocation() {
        let mut t = RoutingTable::new();
        let a = t.allocate().unwrap();
        let b = t.allocate().unwrap();
        assert_eq!((a, b), (24, 25));
        let msg = MsiMessage {
            address: 0x1_fee0_1000,
            data: 0x41,
        };
        t.set_route(b, Some(msg)).unwrap();
        let e = t.entries();
        let m = e.iter().find(|x| x.type_ == KVM_IRQ_ROUTING_MSI).unwrap();
        assert_eq!(m.gsi, b);
        // SAFETY (test): MSI entries carry the msi union member.
        unsafe {
            assert_eq!(m.u.msi.address_lo, 0xfee0_1000);
            assert_eq!(m.u.msi.address_hi, 1);
            assert_eq!(m.u.msi.data, 0x41);
        }
        t.set_route(b, None).unwrap();
        assert_eq!(t.entries().len(), 40);
        assert!(t.set_route(99, Some(msg)).is_err());
        t.set_route(a, Some(msg)).unwrap();
        t.release(a);
        assert_eq!(t.entries().len(), 40);
        assert_eq!(t.allocate().unwrap(), a);
    }

    const MSG: MsiMessage = MsiMessage {
        address: 0xfee0_0000,
        data: 0x30,
    };

    #[test]
    fn allocation_is_bounded_so_every_route_fits_in_one_table() {
        let mut t = RoutingTable::new();
        assert_eq!(t.entries().len(), DEFAULT_ROUTES);
        let mut gsis = vec![];
        while let Ok(g) = t.allocate() {
            assert!(g < MAX_GSI);
            gsis.push(g);
        }
        assert_eq!(gsis.len(), MAX_MSI_GSIS);
        for g in &gsis {
            t.set_route(*g, Some(MSG)).unwrap();
        }
        // KVM takes at most KVM_MAX_IRQ_ROUTES entries: the full table must still commit.
        assert_eq!(t.entries().len(), MAX_ROUTES);
        assert!(KvmIrqRouting::from_entries(&t.entries()).is_ok());
        // A released GSI can be allocated again, and only then.
        t.release(gsis[7]);
        assert_eq!(t.allocate().unwrap(), gsis[7]);
        assert!(t.allocate().is_err());
    }

    #[test]
    fn a_failed_commit_leaves_the_table_unchanged() {
        let mut t = RoutingTable::new();
        let a = t.allocate().unwrap();
        let b = t.allocate().unwrap();
        t.update(a, Some(MSG), |_| Ok(())).unwrap();
        let before = t.entries().len();
        let refuse = |_: &RoutingTable| Err(io::Error::other("refused"));
        // A new route refused: gone again.
        assert!(t.update(b, Some(MSG), refuse).is_err());
        assert_eq!(t.entries().len(), before);
        // A change of an existing route refused: the old message stays.
        let other = MsiMessage {
            address: 0xfee0_1000,
            data: 0x31,
        };
        assert!(t.update(a, Some(other), refuse).is_err());
        assert_eq!(t.msi.get(&a), Some(&MSG));
        // A removal refused: the route stays.
        assert!(t.update(a, None, refuse).is_err());
        assert_eq!(t.msi.get(&a), Some(&MSG));
        // Later commits see exactly the committed table.
        let mut seen = 0;
        t.update(b, Some(other), |t| {
            seen = t.entries().len();
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, before + 1);
        assert!(t.update(99, Some(MSG), |_| Ok(())).is_err());
    }
}
