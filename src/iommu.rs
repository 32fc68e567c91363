//! The guest-visible IOMMUs' VMM side: the counters lines printed at exit (the `--viommu`
//! options are [`crate::config::IommuChoice`]), and for `--viommu vtd` the unit's register page
//! on the MMIO bus ([`VtdMmio`]) and its interrupts through KVM ([`VtdInterrupts`]).

use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use pci::{MsiIrqManager, MsiVector};
use viommu::vtd::counters::CounterSnapshot as VtdCounterSnapshot;
use viommu::vtd::regs::MsiMessage;
use viommu::vtd::unit::{MsiSender, Unit};
use viommu::{CounterSnapshot, Status};

use crate::bus::BusDevice;
use crate::irq::KvmMsiIrqManager;

/// The VT-d unit's 4 KiB register page as an MMIO bus device.
pub struct VtdMmio(pub Unit);

impl BusDevice for VtdMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
}

/// The VT-d unit's interrupts. The fault event is routed to a GSI when the guest programs it
/// (on its vCPU thread) and raised by writing that GSI's irqfd, which any thread may do (device
/// threads report DMA faults and may not issue KVM ioctls under seccomp); any other message
/// (the invalidation completion event, a fault event not yet routed) goes out with
/// KVM_SIGNAL_MSI from the vCPU thread that caused it.
pub struct VtdInterrupts {
    vm: Arc<VmFd>,
    irq: Arc<KvmMsiIrqManager>,
    vector: MsiVector,
    routed: Mutex<Option<MsiMessage>>,
}

impl VtdInterrupts {
    /// Allocate the fault event's GSI.
    pub fn new(vm: Arc<VmFd>, irq: Arc<KvmMsiIrqManager>) -> std::io::Result<Self> {
        let vector = irq.allocate()?;
        Ok(VtdInterrupts {
            vm,
            irq,
            vector,
            routed: Mutex::new(None),
        })
    }

    fn signal(&self, msi: MsiMessage) {
        let m = kvm_msi {
            address_lo: msi.address as u32,
            address_hi: (msi.address >> 32) as u32,
            data: msi.data,
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(m) {
            virtio_dev::guest_warn!("vtd: MSI {:#x}/{:#x}: {e}", msi.address, msi.data);
        }
    }
}

impl MsiSender for VtdInterrupts {
    fn send(&self, msi: MsiMessage) {
        let routed = *self.routed.lock().unwrap_or_else(|e| e.into_inner());
        if routed == Some(msi) {
            if let Err(e) = self.vector.irqfd.write(1) {
                virtio_dev::guest_warn!("vtd: fault event irqfd: {e}");
            }
        } else {
            self.signal(msi);
        }
    }

    fn program(&self, msi: MsiMessage) {
        let mut routed = self.routed.lock().unwrap_or_else(|e| e.into_inner());
        if *routed == Some(msi) {
            return;
        }
        // An address outside the MSI window cannot be routed: send such events by ioctl.
        let ok = (0xfee0_0000..0xfef0_0000).contains(&msi.address)
            && self
                .irq
                .set_route(
                    self.vector.gsi,
                    Some(pci::MsiMessage {
                        address: msi.address,
                        data: msi.data,
                    }),
                )
                .is_ok();
        *routed = ok.then_some(msi);
    }
}

/// The VT-d counters line printed on stderr at exit, e.g. `vtd: maps=3 unmaps=2
/// invalidations=9 faults=0 errors=0 waits=5 walk_reads=2560 faults_dropped=0`.
pub fn vtd_summary_line(s: &VtdCounterSnapshot) -> String {
    s.summary_line()
}

/// Lower-case names of the error statuses, in wire order (status 1..).
const ERROR_NAMES: [&str; Status::COUNT - 1] = [
    "ioerr", "unsupp", "deverr", "inval", "range", "noent", "fault", "nomem",
];

/// The one-line counters summary printed on stderr at exit, e.g.
/// `viommu: maps=12 unmaps=10 attaches=1 detaches=0 probes=1 faults=0 faults_delivered=0
/// faults_dropped=0 malformed=0 errors=0 ioerr=0 unsupp=0 deverr=0 inval=0 range=0 noent=0
/// fault=0 nomem=0 kicks=9 interrupts=9` (one line; `kicks` are request-queue notifications
/// served, `interrupts` the request-queue interrupts signalled).
pub fn summary_line(s: &CounterSnapshot) -> String {
    let mut line = format!(
        "viommu: maps={} unmaps={} attaches={} detaches={} probes={} faults={} \
         faults_delivered={} faults_dropped={} malformed={} errors={}",
        s.maps,
        s.unmaps,
        s.attaches,
        s.detaches,
        s.probes,
        s.faults,
        s.faults_delivered,
        s.faults_dropped,
        s.malformed,
        s.errors()
    );
    for (name, n) in ERROR_NAMES.iter().zip(s.statuses.iter().skip(1)) {
        line.push_str(&format!(" {name}={n}"));
    }
    line.push_str(&format!(" kicks={} interrupts={}", s.kicks, s.interrupts));
    line
}

/// Parse a [`summary_line`] back into `name -> value` pairs (for tests reading the VMM log).
pub fn parse_summary(line: &str) -> Option<Vec<(String, u64)>> {
    let rest = line.trim().strip_prefix("viommu: ")?;
    rest.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_round_trips() {
        let mut s = CounterSnapshot {
            maps: 7,
            unmaps: 5,
            attaches: 2,
            detaches: 1,
            probes: 1,
            faults: 3,
            faults_delivered: 2,
            faults_dropped: 1,
            malformed: 0,
            kicks: 9,
            interrupts: 4,
            ..CounterSnapshot::default()
        };
        s.statuses[Status::Ok as usize] = 14;
        s.statuses[Status::Range as usize] = 2;
        s.statuses[Status::NoMem as usize] = 1;
        let line = summary_line(&s);
        assert!(!line.contains('\n'));
        let kv = parse_summary(&line).unwrap();
        let get = |k: &str| kv.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        assert_eq!(get("maps"), Some(7));
        assert_eq!(get("unmaps"), Some(5));
        assert_eq!(get("attaches"), Some(2));
        assert_eq!(get("detaches"), Some(1));
        assert_eq!(get("faults"), Some(3));
        assert_eq!(get("errors"), Some(3));
        assert_eq!(get("range"), Some(2));
        assert_eq!(get("nomem"), Some(1));
        assert_eq!(get("inval"), Some(0));
        assert_eq!((get("kicks"), get("interrupts")), (Some(9), Some(4)));
        assert_eq!(parse_summary("virtio-iommu: maps=1"), None);
    }
}
