//! A function brought up as a driver does (MSI-X entries, BAR, features, two queues,
//! DRIVER_OK), saved and restored into a fresh one: the same activation, vectors, routes and
//! ioeventfds; truncated or mismatched states refused; a device that saves nothing gives none.

use super::*;
use crate::test_utils::FakeMsi;
use std::io;
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_dev::QueueConfig;
use vm_memory::GuestAddress;

const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM) | 0x5;
const BAR_ADDR: u64 = 0x1_2340_0000;

#[derive(Default)]
struct Seen {
    activations: Vec<(u64, Vec<QueueConfig>)>,
    restored: Vec<Vec<u8>>,
}

struct Dev {
    seen: Arc<Mutex<Seen>>,
    saves: bool,
}

impl VirtioDevice for Dev {
    fn device_type(&self) -> u32 {
        23
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[64, 256]
    }
    fn device_features(&self) -> u64 {
        FEATURES
    }
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(
        &mut self,
        _mem: GuestMemoryAtomic<GuestMemoryMmap>,
        acked: u64,
        queues: Vec<QueueConfig>,
        _kicks: Vec<EventFd>,
        _interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.seen.lock().unwrap().activations.push((acked, queues));
        Ok(())
    }
    fn reset(&mut self) {}
    fn save_state(&self) -> Option<Vec<u8>> {
        self.saves.then(|| b"queue positions".to_vec())
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        self.seen.lock().unwrap().restored.push(state.to_vec());
        Ok(())
    }
}

#[derive(Default)]
struct IoEvents(Mutex<Vec<u64>>);

impl IoEventManager for IoEvents {
    fn register(&self, _: &EventFd, addr: u64) -> io::Result<()> {
        self.0.lock().unwrap().push(addr);
        Ok(())
    }
    fn unregister(&self, _: &EventFd, addr: u64) -> io::Result<()> {
        self.0.lock().unwrap().retain(|a| *a != addr);
        Ok(())
    }
}

struct Rig {
    dev: VirtioPciDevice,
    msi: Arc<FakeMsi>,
    io: Arc<IoEvents>,
    seen: Arc<Mutex<Seen>>,
}

fn rig(saves: bool) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let msi = Arc::new(FakeMsi::default());
    let io = Arc::new(IoEvents::default());
    let dev = VirtioPciDevice::new(
        Box::new(Dev {
            seen: seen.clone(),
            saves,
        }),
        GuestMemoryAtomic::new(mem),
        msi.clone(),
        io.clone(),
    )
    .unwrap();
    Rig { dev, msi, io, seen }
}

fn bar_w(d: &mut VirtioPciDevice, offset: u64, len: usize, v: u64) {
    d.bar_write(0, offset, &v.to_le_bytes()[..len]);
}

fn bar_r(d: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.bar_read(0, offset, &mut b[..len]);
    u64::from_le_bytes(b)
}

/// What a driver does: BAR, memory decode, MSI-X entries and enable, features, two queues,
/// DRIVER_OK.
fn bring_up(d: &mut VirtioPciDevice) {
    d.config_write(BAR0, &(BAR_ADDR as u32 | 4).to_le_bytes());
    d.config_write(BAR0 + 4, &((BAR_ADDR >> 32) as u32).to_le_bytes());
    d.bar_assigned(VIRTIO_BAR, BAR_ADDR);
    d.config_write(COMMAND, &2u16.to_le_bytes());
    for v in 0..3u64 {
        let e = MSIX_TABLE_OFFSET + v * 16;
        bar_w(d, e, 4, 0xfee0_0000 + (v << 12));
        bar_w(d, e + 4, 4, 0);
        bar_w(d, e + 8, 4, 0x40 + v);
        bar_w(d, e + 12, 4, 0);
    }
    let cap = d.msix_cap + MSIX_CAP_CONTROL;
    d.config_write(cap, &0x8000u16.to_le_bytes());
    bar_w(d, 0x14, 1, 3);
    for (sel, word) in [(0, FEATURES as u32), (1, (FEATURES >> 32) as u32)] {
        bar_w(d, 0x08, 4, sel);
        bar_w(d, 0x0c, 4, u64::from(word));
    }
    bar_w(d, 0x14, 1, 0xb);
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
    assert!(d.activated());
}

fn table(d: &mut VirtioPciDevice) -> Vec<u64> {
    (0..6u64)
        .map(|i| bar_r(d, MSIX_TABLE_OFFSET + i * 8, 8))
        .collect()
}

#[test]
fn a_restored_function_is_activated_routed_and_decoding_as_saved() {
    let mut a = rig(true);
    bring_up(&mut a.dev);
    bar_w(&mut a.dev, 0x16, 2, 1); // the driver left queue 1 selected
    let blob = a.dev.save_state().expect("the device saves its state");
    assert_eq!(bar_r(&mut a.dev, 0x16, 2), 1, "saving keeps queue_select");

    let mut b = rig(true);
    let writes = b.dev.restore_state(&blob).unwrap();
    for (off, data) in &writes {
        b.dev.config_write(*off, data);
    }
    // What a bus does after a BAR write: report the address.
    let addr = b.dev.bar_address(VIRTIO_BAR).unwrap();
    b.dev.bar_assigned(VIRTIO_BAR, addr);
    assert_eq!(addr, BAR_ADDR);
    assert!(b.dev.activated());
    let (sa, sb) = (a.seen.lock().unwrap(), b.seen.lock().unwrap());
    assert_eq!(sb.activations.len(), 1);
    assert_eq!(sb.activations[0].0, sa.activations[0].0, "acked features");
    assert_eq!(
        sb.activations[0].1, sa.activations[0].1,
        "queue configuration"
    );
    assert_eq!(sb.restored, vec![b"queue positions".to_vec()]);
    drop((sa, sb));
    for q in 0..2u64 {
        bar_w(&mut b.dev, 0x16, 2, q);
        assert_eq!(bar_r(&mut b.dev, 0x1a, 2), q + 1, "queue {q} vector");
    }
    assert_eq!(table(&mut b.dev), table(&mut a.dev));
    assert_eq!(
        *b.io.0.lock().unwrap(),
        *a.io.0.lock().unwrap(),
        "ioeventfds"
    );
    // MSI-X is enabled: every entry has its route, as on the source.
    let gsis: Vec<u32> = a
        .msi
        .routes
        .lock()
        .unwrap()
        .iter()
        .map(|(g, _)| *g)
        .collect();
    assert_eq!(gsis.len(), 3);
    for gsi in gsis {
        assert_eq!(b.msi.last_route(gsi), a.msi.last_route(gsi), "GSI {gsi}");
        assert!(
            b.msi.last_route(gsi).flatten().is_some(),
            "GSI {gsi} routed"
        );
    }
    assert_eq!(b.dev.save_state().unwrap().len(), blob.len());
}

#[test]
fn bad_states_are_refused_and_devices_that_save_nothing_give_none() {
    let mut a = rig(true);
    bring_up(&mut a.dev);
    let blob = a.dev.save_state().unwrap();
    for cut in 0..blob.len() {
        let mut b = rig(true);
        assert!(b.dev.restore_state(&blob[..cut]).is_err(), "cut {cut}");
    }
    let mut long = blob.clone();
    long.push(0);
    assert!(rig(true).dev.restore_state(&long).is_err());
    let mut bad = blob.clone();
    bad[0] = b'X';
    assert!(rig(true).dev.restore_state(&bad).is_err());
    // Into a function that is not in its reset state.
    let mut busy = rig(true);
    bring_up(&mut busy.dev);
    assert!(busy.dev.restore_state(&blob).is_err());
    // Features the device does not offer: FEATURES_OK refused on replay, nothing activated.
    let mut b = rig(true);
    let acked_at = 4 + 2 + 2 + 8 + 1 + 2 + 2 + 3 * 16;
    let mut hostile = blob.clone();
    hostile[acked_at..acked_at + 8].copy_from_slice(&0u64.to_le_bytes());
    assert!(b.dev.restore_state(&hostile).is_err());
    assert!(!b.dev.activated());
    let mut none = rig(false);
    bring_up(&mut none.dev);
    assert!(none.dev.save_state().is_none());
}
