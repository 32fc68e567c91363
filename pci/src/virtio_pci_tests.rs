//! Tests of the virtio-pci transport with a fake device, fake MSI and fake ioeventfd manager.

use super::*;
use crate::msix::tests::FakeMsi;
use crate::virtio_common::NO_VECTOR;
use std::io;
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_dev::QueueConfig;
use vm_memory::GuestAddress;

const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM) | 0x5;

#[derive(Default)]
struct FakeState {
    activations: Vec<(u64, Vec<QueueConfig>)>,
    kicks: Vec<EventFd>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    resets: usize,
    notified: Vec<u16>,
    config: [u8; 8],
    fail_activate: bool,
}

struct FakeDevice {
    state: Arc<Mutex<FakeState>>,
    inline: bool,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        23
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[64, 256]
    }
    fn device_features(&self) -> u64 {
        FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let s = self.state.lock().unwrap();
        for (i, b) in data.iter_mut().enumerate() {
            *b = s.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut s = self.state.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = s.config.get_mut(offset as usize + i) {
                *slot = *b;
            }
        }
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryAtomic<GuestMemoryMmap>,
        acked_features: u64,
        queues: Vec<QueueConfig>,
        kicks: Vec<EventFd>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let mut s = self.state.lock().unwrap();
        if s.fail_activate {
            return Err(ActivateError::BadQueue("test".into()));
        }
        s.activations.push((acked_features, queues));
        s.kicks = kicks;
        s.interrupt = Some(interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        let mut s = self.state.lock().unwrap();
        s.resets += 1;
        s.kicks.clear();
        s.interrupt = None;
    }
    fn inline_notify(&self) -> bool {
        self.inline
    }
    fn queue_notify(&mut self, queue: u16) {
        self.state.lock().unwrap().notified.push(queue);
    }
}

/// Records registrations; keeps a clone of each registered eventfd.
#[derive(Default)]
struct FakeIoEvents {
    registered: Mutex<Vec<(u64, EventFd)>>,
    log: Mutex<Vec<(bool, u64)>>,
    fail_at: Mutex<Option<u64>>,
}

impl FakeIoEvents {
    fn addresses(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .registered
            .lock()
            .unwrap()
            .iter()
            .map(|(a, _)| *a)
            .collect();
        v.sort();
        v
    }
}

impl IoEventManager for FakeIoEvents {
    fn register(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        if *self.fail_at.lock().unwrap() == Some(addr) {
            return Err(io::Error::other("refused"));
        }
        self.log.lock().unwrap().push((true, addr));
        self.registered
            .lock()
            .unwrap()
            .push((addr, fd.try_clone()?));
        Ok(())
    }
    fn unregister(&self, _fd: &EventFd, addr: u64) -> io::Result<()> {
        self.log.lock().unwrap().push((false, addr));
        let mut r = self.registered.lock().unwrap();
        let i = r
            .iter()
            .position(|(a, _)| *a == addr)
            .ok_or(io::ErrorKind::NotFound)?;
        r.remove(i);
        Ok(())
    }
}

struct Rig {
    dev: VirtioPciDevice,
    msi: Arc<FakeMsi>,
    ioevents: Arc<FakeIoEvents>,
    state: Arc<Mutex<FakeState>>,
}

fn rig(inline: bool) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let state = Arc::new(Mutex::new(FakeState::default()));
    let msi = Arc::new(FakeMsi::default());
    let ioevents = Arc::new(FakeIoEvents::default());
    let device = Box::new(FakeDevice {
        state: state.clone(),
        inline,
    });
    let dev = VirtioPciDevice::new(
        device,
        GuestMemoryAtomic::new(mem),
        msi.clone(),
        ioevents.clone(),
    )
    .unwrap();
    Rig {
        dev,
        msi,
        ioevents,
        state,
    }
}

fn cfg32(d: &mut VirtioPciDevice, offset: u16) -> u32 {
    let mut b = [0; 4];
    d.config_read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn bar_r(d: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.bar_read(0, offset, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn bar_w(d: &mut VirtioPciDevice, offset: u64, len: usize, v: u64) {
    d.bar_write(0, offset, &v.to_le_bytes()[..len]);
}

/// Walk the capability list: (offset, id) pairs.
fn caps(d: &mut VirtioPciDevice) -> Vec<(u16, u8)> {
    let mut out = vec![];
    let mut ptr = (cfg32(d, 0x34) & 0xff) as u16;
    while ptr != 0 && out.len() < 48 {
        let hdr = cfg32(d, ptr);
        out.push((ptr, hdr as u8));
        ptr = ((hdr >> 8) & 0xff) as u16;
    }
    out
}

/// Drive the device to DRIVER_OK with both queues enabled, queue q using MSI-X vector q + 1.
fn bring_up(d: &mut VirtioPciDevice) {
    bar_w(d, 0x14, 1, 1);
    bar_w(d, 0x14, 1, 3);
    bar_w(d, 0x08, 4, 0);
    bar_w(d, 0x0c, 4, 0xffff_ffff);
    bar_w(d, 0x08, 4, 1);
    bar_w(d, 0x0c, 4, 0xffff_ffff);
    bar_w(d, 0x14, 1, 0xb);
    assert_eq!(bar_r(d, 0x14, 1), 0xb);
    bar_w(d, 0x10, 2, 0);
    for q in 0..2u64 {
        bar_w(d, 0x16, 2, q);
        bar_w(d, 0x18, 2, 32);
        bar_w(d, 0x1a, 2, q + 1);
        bar_w(d, 0x20, 8, 0x1000 * (q + 1));
        bar_w(d, 0x28, 8, 0x1000 * (q + 1) + 0x200);
        bar_w(d, 0x30, 8, 0x1000 * (q + 1) + 0x400);
        bar_w(d, 0x1c, 2, 1);
    }
    bar_w(d, 0x14, 1, 0xf);
}

fn enable_msix(d: &mut VirtioPciDevice, vectors: u64) {
    let cap = caps(d).iter().find(|c| c.1 == 0x11).unwrap().0;
    d.config_write(cap + 2, &0x8000u16.to_le_bytes());
    for v in 0..vectors {
        let e = MSIX_TABLE_OFFSET + v * 16;
        bar_w(d, e, 4, 0xfee0_0000);
        bar_w(d, e + 4, 4, 0);
        bar_w(d, e + 8, 4, 0x40 + v);
        bar_w(d, e + 12, 4, 0);
    }
}

#[test]
fn identity_and_capabilities() {
    let mut r = rig(false);
    let d = &mut r.dev;
    assert_eq!(cfg32(d, 0), 0x1057_1af4);
    assert_eq!(cfg32(d, 8), 0x0880_0001);
    assert_eq!(cfg32(d, 0x2c), 0x1100_1af4);
    assert!(cfg32(d, 4) & (1 << 20) != 0);
    // 64-bit BAR 0 of 64 KiB.
    d.config_write(0x10, &[0xff; 4]);
    d.config_write(0x14, &[0xff; 4]);
    assert_eq!(cfg32(d, 0x10), 0xffff_0004);
    assert_eq!(cfg32(d, 0x14), 0xffff_ffff);
    assert_eq!(cfg32(d, 0x18), 0);
    let list = caps(d);
    let mut seen = vec![];
    for &(off, id) in &list {
        if id == 0x09 {
            let w0 = cfg32(d, off);
            let cfg_type = (w0 >> 24) as u8;
            let bar = cfg32(d, off + 4) as u8;
            let offset = cfg32(d, off + 8);
            let length = cfg32(d, off + 12);
            assert_eq!(bar, 0);
            seen.push((cfg_type, offset, length));
            let cap_len = if matches!(cfg_type, 2 | 5) { 20 } else { 16 };
            assert_eq!((w0 >> 16) & 0xff, cap_len);
            if cfg_type == 2 {
                assert_eq!(cfg32(d, off + 16), 4);
            }
        } else {
            assert_eq!(id, 0x11);
            // 3 vectors (2 queues + config), table and PBA in BAR 0.
            assert_eq!(cfg32(d, off) >> 16, 2);
            assert_eq!(cfg32(d, off + 4), MSIX_TABLE_OFFSET as u32);
            assert_eq!(cfg32(d, off + 8), MSIX_PBA_OFFSET as u32);
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (1, 0, 0x38),
            (2, 0x3000, 8),
            (3, 0x1000, 1),
            (4, 0x2000, 0x1000),
            (5, 0, 0)
        ]
    );
    assert_eq!(list.len(), 6);
}

#[test]
fn activation_receives_queue_configs() {
    let mut r = rig(false);
    bring_up(&mut r.dev);
    assert!(r.dev.activated());
    let s = r.state.lock().unwrap();
    assert_eq!(s.activations.len(), 1);
    let (features, queues) = &s.activations[0];
    assert_eq!(*features, FEATURES);
    assert_eq!(queues.len(), 2);
    for (q, cfg) in queues.iter().enumerate() {
        let base = 0x1000 * (q as u64 + 1);
        assert_eq!(
            *cfg,
            QueueConfig {
                size: 32,
                desc_table: GuestAddress(base),
                avail_ring: GuestAddress(base + 0x200),
                used_ring: GuestAddress(base + 0x400),
                ready: true,
            }
        );
    }
    assert_eq!(s.kicks.len(), 2);
}

#[test]
fn device_interrupts_reach_msix_vectors() {
    let mut r = rig(false);
    enable_msix(&mut r.dev, 3);
    bring_up(&mut r.dev);
    let irq = r.state.lock().unwrap().interrupt.clone().unwrap();
    irq.signal_queue(1);
    // Queue 1 uses vector 2: find its GSI by its route's data.
    let gsi_of = |data: u32| {
        r.msi
            .routes
            .lock()
            .unwrap()
            .iter()
            .find(|(_, m)| m.map(|m| m.data) == Some(data))
            .unwrap()
            .0
    };
    assert_eq!(r.msi.fired(gsi_of(0x42)), 1);
    assert_eq!(r.msi.fired(gsi_of(0x41)), 0);
    irq.signal_config();
    assert_eq!(r.msi.fired(gsi_of(0x40)), 1);
    // ISR holds both causes and clears on read.
    assert_eq!(bar_r(&mut r.dev, ISR_OFFSET, 1), 3);
    assert_eq!(bar_r(&mut r.dev, ISR_OFFSET, 1), 0);
    // A masked vector collects a pending bit instead.
    bar_w(&mut r.dev, MSIX_TABLE_OFFSET + 2 * 16 + 12, 4, 1);
    irq.signal_queue(1);
    assert_eq!(bar_r(&mut r.dev, MSIX_PBA_OFFSET, 8), 0b100);
    bar_w(&mut r.dev, MSIX_TABLE_OFFSET + 2 * 16 + 12, 4, 0);
    assert_eq!(bar_r(&mut r.dev, MSIX_PBA_OFFSET, 8), 0);
    assert_eq!(r.msi.fired(gsi_of(0x42)), 1);
    irq.signal_queue(7);
}

#[test]
fn reset_returns_to_initial_state() {
    let mut r = rig(false);
    let d = &mut r.dev;
    let initial: Vec<u64> = (0..0x38).step_by(2).map(|o| bar_r(d, o, 2)).collect();
    bring_up(d);
    assert!(d.activated());
    bar_w(d, 0x14, 1, 0);
    assert!(!d.activated());
    assert_eq!(r.state.lock().unwrap().resets, 1);
    let after: Vec<u64> = (0..0x38).step_by(2).map(|o| bar_r(d, o, 2)).collect();
    assert_eq!(initial, after);
    bar_w(d, 0x16, 2, 1);
    assert_eq!(bar_r(d, 0x1a, 2), u64::from(NO_VECTOR));
    assert_eq!(bar_r(d, 0x18, 2), 256);
    assert_eq!(bar_r(d, 0x1c, 2), 0);
    // The device can be brought up again.
    bring_up(d);
    assert_eq!(r.state.lock().unwrap().activations.len(), 2);
}

#[test]
fn activation_failure_sets_needs_reset() {
    let mut r = rig(false);
    r.state.lock().unwrap().fail_activate = true;
    bring_up(&mut r.dev);
    assert!(!r.dev.activated());
    assert_eq!(bar_r(&mut r.dev, 0x14, 1), 0x4f);
    // The config-change cause was raised.
    assert_eq!(bar_r(&mut r.dev, ISR_OFFSET, 1) & 2, 2);
    // Reset clears it.
    bar_w(&mut r.dev, 0x14, 1, 0);
    assert_eq!(bar_r(&mut r.dev, 0x14, 1), 0);
}

#[test]
fn device_config_passthrough() {
    let mut r = rig(false);
    bar_w(&mut r.dev, DEVICE_CFG_OFFSET + 2, 2, 0xbeef);
    assert_eq!(
        r.state.lock().unwrap().config,
        [0, 0, 0xef, 0xbe, 0, 0, 0, 0]
    );
    assert_eq!(bar_r(&mut r.dev, DEVICE_CFG_OFFSET, 4), 0xbeef_0000);
}

#[test]
fn notify_ioeventfds_follow_the_bar() {
    let mut r = rig(false);
    let d = &mut r.dev;
    d.bar_assigned(0, 0x1_0000_0000);
    // Decoding disabled: nothing registered yet.
    assert!(r.ioevents.addresses().is_empty());
    d.config_write(4, &2u16.to_le_bytes());
    assert_eq!(r.ioevents.addresses(), vec![0x1_0000_3000, 0x1_0000_3004]);
    // The registered eventfd is the kick the device receives.
    bring_up(d);
    {
        let reg = r.ioevents.registered.lock().unwrap();
        let (_, fd) = reg.iter().find(|(a, _)| *a == 0x1_0000_3004).unwrap();
        fd.write(1).unwrap();
        let s = r.state.lock().unwrap();
        assert_eq!(s.kicks[1].read().unwrap(), 1);
        assert!(s.kicks[0].read().is_err());
    }
    // The guest moves the BAR: registrations move with it.
    d.config_write(0x10, &0x2000_0000u32.to_le_bytes());
    d.config_write(0x14, &0u32.to_le_bytes());
    assert_eq!(r.ioevents.addresses(), vec![0x2000_3000, 0x2000_3004]);
    assert_eq!(d.bar_address(0), Some(0x2000_0000));
    // Memory decoding off: unregistered.
    d.config_write(4, &0u16.to_le_bytes());
    assert!(r.ioevents.addresses().is_empty());
    assert_eq!(d.bar_address(0), None);
    // A notify that reaches the transport (no ioeventfd) kicks the eventfd itself.
    bar_w(d, NOTIFY_OFFSET, 2, 0);
    assert_eq!(r.state.lock().unwrap().kicks[0].read().unwrap(), 1);
    bar_w(d, NOTIFY_OFFSET + 8, 2, 2); // absent queue
    d.config_write(4, &2u16.to_le_bytes());
    assert_eq!(r.ioevents.addresses(), vec![0x2000_3000, 0x2000_3004]);
    drop(r.dev);
    assert!(r.ioevents.addresses().is_empty());
}

#[test]
fn failed_registration_falls_back_to_mmio() {
    let mut r = rig(false);
    *r.ioevents.fail_at.lock().unwrap() = Some(0x8000_3004);
    r.dev.config_write(4, &2u16.to_le_bytes());
    r.dev.bar_assigned(0, 0x8000_0000);
    // Queue 0's registration was rolled back.
    assert!(r.ioevents.addresses().is_empty());
    bring_up(&mut r.dev);
    bar_w(&mut r.dev, NOTIFY_OFFSET + 4, 2, 1);
    assert_eq!(r.state.lock().unwrap().kicks[1].read().unwrap(), 1);
}

#[test]
fn inline_notify_calls_the_device() {
    let mut r = rig(true);
    r.dev.bar_assigned(0, 0x8000_0000);
    r.dev.config_write(4, &2u16.to_le_bytes());
    assert!(r.ioevents.log.lock().unwrap().is_empty());
    // Before activation notifies are dropped.
    bar_w(&mut r.dev, NOTIFY_OFFSET + 4, 2, 1);
    assert!(r.state.lock().unwrap().notified.is_empty());
    bring_up(&mut r.dev);
    bar_w(&mut r.dev, NOTIFY_OFFSET + 4, 2, 1);
    bar_w(&mut r.dev, NOTIFY_OFFSET, 2, 0);
    assert_eq!(r.state.lock().unwrap().notified, vec![1, 0]);
    assert!(r.state.lock().unwrap().kicks[1].read().is_err());
}

#[test]
fn hostile_bar_accesses_do_not_panic() {
    let mut r = rig(false);
    enable_msix(&mut r.dev, 3);
    bring_up(&mut r.dev);
    let offsets = [
        0u64,
        1,
        0x13,
        0x37,
        0x38,
        0xfff,
        0x1000,
        0x1001,
        0x2ffe,
        0x3000,
        0x3ffc,
        0x3fff,
        0x7fff,
        0x8000,
        0x802f,
        0xbffc,
        0xc000,
        0xfffc,
        0xffff,
        0x1_0000,
        u64::MAX,
        u64::MAX - 3,
    ];
    for &o in &offsets {
        for len in [0usize, 1, 2, 3, 4, 8, 16] {
            let mut b = vec![0x5a; len];
            r.dev.bar_read(0, o, &mut b);
            r.dev.bar_read(3, o, &mut b);
            r.dev.bar_write(0, o, &vec![0xff; len]);
            r.dev.bar_write(2, o, &vec![0xff; len]);
        }
    }
    // Config space abuse.
    for o in [0u16, 3, 0x10, 0x3e, 0xfff, 0x1000, u16::MAX] {
        for len in [0usize, 1, 2, 3, 4, 8] {
            let mut b = vec![0; len];
            r.dev.config_read(o, &mut b);
            r.dev.config_write(o, &b);
        }
    }
    r.dev.bar_assigned(5, 0x1000);
    // Still identifies itself and still answers on the common config.
    assert_eq!(cfg32(&mut r.dev, 0), 0x1057_1af4);
    assert_eq!(bar_r(&mut r.dev, 0x12, 2), 2);
}

#[test]
fn pci_cfg_capability_window() {
    let mut r = rig(false);
    let d = &mut r.dev;
    let cap = caps(d)
        .into_iter()
        .find(|&(off, id)| id == 0x09 && cfg32(d, off) >> 24 == 5)
        .unwrap()
        .0;
    // Read num_queues (2 bytes at 0x12 of the common config) through the window.
    d.config_write(cap + 4, &[0, 0, 0, 0]);
    d.config_write(cap + 8, &0x12u32.to_le_bytes());
    d.config_write(cap + 12, &2u32.to_le_bytes());
    assert_eq!(cfg32(d, cap + 16) & 0xffff, 2);
    // Write device_status through the window.
    d.config_write(cap + 8, &0x14u32.to_le_bytes());
    d.config_write(cap + 12, &1u32.to_le_bytes());
    d.config_write(cap + 16, &[1]);
    assert_eq!(bar_r(d, 0x14, 1), 1);
    // Bad length, misaligned offset or another BAR: nothing happens.
    d.config_write(cap + 12, &3u32.to_le_bytes());
    d.config_write(cap + 16, &[0]);
    d.config_write(cap + 8, &0x13u32.to_le_bytes());
    d.config_write(cap + 12, &2u32.to_le_bytes());
    d.config_write(cap + 16, &[0, 0]);
    d.config_write(cap + 4, &[2]);
    d.config_write(cap + 8, &0x14u32.to_le_bytes());
    d.config_write(cap + 12, &1u32.to_le_bytes());
    d.config_write(cap + 16, &[0]);
    assert_eq!(bar_r(d, 0x14, 1), 1);
}

#[test]
fn config_change_bumps_generation() {
    let mut r = rig(false);
    let g0 = bar_r(&mut r.dev, 0x15, 1);
    r.dev.interrupt().signal_config();
    assert_eq!(bar_r(&mut r.dev, 0x15, 1), (g0 + 1) & 0xff);
    assert_eq!(bar_r(&mut r.dev, ISR_OFFSET, 1), 2);
}
