//! KVM memory slots for device memory: [`KvmMemorySlots`] implements
//! [`pci::MemorySlotManager`] on `KVM_SET_USER_MEMORY_REGION`, so a passthrough device's BAR
//! mmaps appear in the guest's physical address space without exits.
//!
//! Slot ids come from a range above the RAM slots (RAM uses 0..regions, see [`crate::vm`]);
//! freed ids are reused. Every failure is an `io::Error` for the caller to log, never a panic.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;

/// First slot id handed to device memory (RAM slots stay far below it).
pub const FIRST_DEVICE_SLOT: u32 = 64;

#[derive(Default)]
struct State {
    /// Live slots: id -> (gpa, size).
    live: BTreeMap<u32, (u64, u64)>,
    /// Ids freed by `unmap`, reused first.
    free: BTreeSet<u32>,
    /// Next never-used id.
    next: u32,
}

/// Device-memory slots of one VM.
pub struct KvmMemorySlots {
    vm: Arc<VmFd>,
    /// One past the last usable slot id.
    end: u32,
    readonly: bool,
    state: Mutex<State>,
}

impl KvmMemorySlots {
    /// Slots `FIRST_DEVICE_SLOT..max_slots` of `vm`; `readonly` tells whether KVM supports
    /// read-only slots (`KVM_CAP_READONLY_MEM`).
    pub fn new(vm: Arc<VmFd>, max_slots: u32, readonly: bool) -> Self {
        KvmMemorySlots {
            vm,
            end: max_slots,
            readonly,
            state: Mutex::new(State {
                next: FIRST_DEVICE_SLOT,
                ..State::default()
            }),
        }
    }

    /// Live slots as (id, gpa, size), in id order.
    pub fn live(&self) -> Vec<(u32, u64, u64)> {
        self.lock()
            .live
            .iter()
            .map(|(&id, &(g, s))| (id, g, s))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, slot: u32, gpa: u64, size: u64, host: u64, flags: u32) -> io::Result<()> {
        let r = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: `host..host+size` is a live mmap of device memory (a VFIO BAR) that its owner
        // keeps until it calls `unmap` (the MemorySlotManager contract); size 0 deletes the slot.
        unsafe { self.vm.set_user_memory_region(r) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl pci::MemorySlotManager for KvmMemorySlots {
    fn map(&self, gpa: u64, size: u64, host_addr: u64, readonly: bool) -> io::Result<u32> {
        const PAGE: u64 = 4096;
        if size == 0 || (gpa | size | host_addr) & (PAGE - 1) != 0 {
            return Err(invalid(format!(
                "slot {gpa:#x}+{size:#x} -> {host_addr:#x} is empty or not page aligned"
            )));
        }
        if gpa.checked_add(size).is_none() || host_addr.checked_add(size).is_none() {
            return Err(invalid(format!("slot {gpa:#x}+{size:#x} wraps")));
        }
        if readonly && !self.readonly {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "KVM has no read-only memory slots",
            ));
        }
        let mut st = self.lock();
        if st
            .live
            .values()
            .any(|&(g, s)| gpa < g.saturating_add(s) && g < gpa + size)
        {
            return Err(invalid(format!(
                "slot {gpa:#x}+{size:#x} overlaps a live slot"
            )));
        }
        let id = match st.free.pop_first() {
            Some(id) => id,
            None if st.next < self.end => {
                st.next += 1;
                st.next - 1
            }
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    format!("all KVM memory slots below {} are in use", self.end),
                ))
            }
        };
        let flags = if readonly { KVM_MEM_READONLY } else { 0 };
        if let Err(e) = self.set(id, gpa, size, host_addr, flags) {
            st.free.insert(id);
            return Err(e);
        }
        st.live.insert(id, (gpa, size));
        log::debug!("memory slot {id}: {gpa:#x}+{size:#x} -> {host_addr:#x}");
        Ok(id)
    }

    fn unmap(&self, slot: u32) -> io::Result<()> {
        let mut st = self.lock();
        let &(gpa, _) = st
            .live
            .get(&slot)
            .ok_or_else(|| invalid(format!("memory slot {slot} is not mapped")))?;
        self.set(slot, gpa, 0, 0, 0)?;
        st.live.remove(&slot);
        st.free.insert(slot);
        log::debug!("memory slot {slot} removed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pci::MemorySlotManager;

    fn anon(len: usize) -> u64 {
        // SAFETY: a fresh anonymous mapping; leaked for the test's lifetime.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as u64
    }

    /// Slots on a fresh VM; `None` (`test` recorded as skipped) without a usable /dev/kvm.
    fn slots(test: &str, max: u32) -> Option<KvmMemorySlots> {
        let kvm = crate::skip::kvm_or_skip(test)?;
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        Some(KvmMemorySlots::new(Arc::new(vm), max, false))
    }

    #[test]
    fn ids_above_ram_reused_and_bounded() {
        let Some(s) = slots(
            "memory_slots::ids_above_ram_reused_and_bounded",
            FIRST_DEVICE_SLOT + 2,
        ) else {
            return;
        };
        let host = anon(0x4000);
        let a = s.map(0x1_0000_0000, 0x1000, host, false).unwrap();
        let b = s.map(0x1_0000_1000, 0x1000, host + 0x1000, false).unwrap();
        assert_eq!((a, b), (FIRST_DEVICE_SLOT, FIRST_DEVICE_SLOT + 1));
        // Out of ids: an error, not a panic.
        let e = s.map(0x1_0000_2000, 0x1000, host + 0x2000, false);
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::OutOfMemory);
        s.unmap(a).unwrap();
        assert_eq!(s.live().len(), 1);
        assert_eq!(
            s.map(0x1_0000_2000, 0x1000, host + 0x2000, false).unwrap(),
            a
        );
        assert!(s.unmap(999).is_err());
        assert!(s.unmap(a).is_ok());
        assert!(s.unmap(a).is_err());
    }

    #[test]
    fn bad_requests_are_refused() {
        let Some(s) = slots(
            "memory_slots::bad_requests_are_refused",
            FIRST_DEVICE_SLOT + 8,
        ) else {
            return;
        };
        let host = anon(0x2000);
        assert!(s.map(0x1000_0001, 0x1000, host, false).is_err());
        assert!(s.map(0x1000_0000, 0, host, false).is_err());
        assert!(s.map(u64::MAX - 0xfff, 0x2000, host, false).is_err());
        assert_eq!(
            s.map(0x1000_0000, 0x1000, host, true).unwrap_err().kind(),
            io::ErrorKind::Unsupported
        );
        s.map(0x1000_0000, 0x2000, host, false).unwrap();
        assert!(s.map(0x1000_1000, 0x1000, host, false).is_err());
        assert_eq!(s.live().len(), 1);
    }
}
