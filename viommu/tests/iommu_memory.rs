//! A device written against `vm_memory::IommuMemory` behind the virtio-iommu: the endpoint is
//! its `vm_memory::Iommu`, programmed through the request queue by the mock driver.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use viommu::spec::{FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE, FAULT_R_MAPPING};
use viommu::spec::{MAP_F_READ, MAP_F_WRITE};
use viommu::test_utils::{MockDriver, MockLayout, NoInterrupt};
use viommu::{EndpointHandle, Status, Viommu, ViommuConfig};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, IommuMemory, Permissions,
};

const EP: u32 = 0x08;
const RAM: usize = 8 << 20;
/// IOVA 0x4000_0000..0x4000_2000 -> GPA 0x20_0000 (RW), 0x4000_2000.. -> GPA 0x50_0000 (R).
const IOVA: u64 = 0x4000_0000;
const GPA: u64 = 0x20_0000;
const RO_GPA: u64 = 0x50_0000;

struct Setup {
    ram: GuestMemoryMmap,
    dev: Viommu,
    drv: MockDriver,
    mem: IommuMemory<GuestMemoryMmap, EndpointHandle>,
}

fn setup() -> Setup {
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
    let mut dev = Viommu::new(ViommuConfig {
        bypass: false,
        ..Default::default()
    })
    .unwrap();
    let ep = dev.add_endpoint(EP).unwrap();
    let mut drv = MockDriver::new(ram.clone(), MockLayout::packed(0, 0x10_0000, 16, 16)).unwrap();
    drv.activate_offered(&mut dev, Arc::new(NoInterrupt))
        .unwrap();
    drv.post_fault_buffers(8).unwrap();
    assert_eq!(drv.attach(&mut dev, 1, EP).unwrap(), Status::Ok);
    let rw = MAP_F_READ | MAP_F_WRITE;
    assert_eq!(
        drv.map(&mut dev, 1, IOVA, 0x2000, GPA, rw).unwrap(),
        Status::Ok
    );
    assert_eq!(
        drv.map(&mut dev, 1, IOVA + 0x2000, 0x1000, RO_GPA, MAP_F_READ)
            .unwrap(),
        Status::Ok
    );
    let mem = IommuMemory::new(ram.clone(), ep, true, ());
    Setup { ram, dev, drv, mem }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

#[test]
fn accesses_land_at_the_mapped_gpa_until_unmapped() {
    let mut s = setup();
    // A write spanning both pages of the first mapping lands at its GPA, nowhere else.
    let data = pattern(0x1800, 0x3c);
    s.mem
        .write_slice(&data, GuestAddress(IOVA + 0x800))
        .unwrap();
    let mut back = vec![0u8; data.len()];
    s.ram
        .read_slice(&mut back, GuestAddress(GPA + 0x800))
        .unwrap();
    assert_eq!(back, data);
    let mut ident = vec![0u8; 0x100];
    s.ram.read_slice(&mut ident, GuestAddress(0x800)).unwrap();
    assert!(ident.iter().all(|&b| b == 0), "identity address untouched");
    // A read across the two mappings gathers both targets.
    let ro = pattern(0x100, 0x99);
    s.ram.write_slice(&ro, GuestAddress(RO_GPA)).unwrap();
    let mut got = vec![0u8; 0x200];
    s.mem
        .read_slice(&mut got, GuestAddress(IOVA + 0x1f00))
        .unwrap();
    assert_eq!(&got[..0x100], &data[0x1700..]);
    assert_eq!(&got[0x100..], &ro[..]);
    assert_eq!(
        s.mem.read_obj::<u64>(GuestAddress(IOVA + 0x2008)).unwrap(),
        u64::from_le_bytes(ro[8..16].try_into().unwrap())
    );
    assert!(s
        .mem
        .check_range(GuestAddress(IOVA), 0x3000, Permissions::Read));
    assert_eq!(s.dev.counters().snapshot().faults, 0);
    // Checking for a write finds the read-only mapping (and reports it, as a device's access
    // through `TranslatedMemory` would).
    assert!(!s
        .mem
        .check_range(GuestAddress(IOVA), 0x3000, Permissions::Write));

    // A write to the read-only mapping is refused whole: nothing written, a fault raised.
    let err = s
        .mem
        .write_slice(&[0xee; 0x20], GuestAddress(IOVA + 0x1ff0))
        .unwrap_err();
    assert!(matches!(err, GuestMemoryError::IommuError(_)), "{err:?}");
    let mut after = vec![0u8; 0x10];
    s.ram
        .read_slice(&mut after, GuestAddress(GPA + 0x1ff0))
        .unwrap();
    assert_eq!(after, data[0x17f0..]);
    s.ram.read_slice(&mut after, GuestAddress(RO_GPA)).unwrap();
    assert_eq!(after, ro[..0x10]);

    // UNMAP: the same IOVAs fail now, reads and writes alike.
    assert_eq!(
        s.drv.unmap(&mut s.dev, 1, IOVA, 0x2000).unwrap(),
        Status::Ok
    );
    let mut buf = [0u8; 8];
    let err = s
        .mem
        .read_slice(&mut buf, GuestAddress(IOVA + 0x800))
        .unwrap_err();
    assert!(matches!(err, GuestMemoryError::IommuError(_)), "{err:?}");
    assert!(s.mem.write_obj(1u32, GuestAddress(IOVA)).is_err());
    assert!(!s.mem.check_range(GuestAddress(IOVA), 8, Permissions::Read));
    // The read-only mapping stays.
    assert!(s.mem.read_obj::<u32>(GuestAddress(IOVA + 0x2000)).is_ok());

    // Every miss reached the event queue as an R_MAPPING record naming the endpoint.
    let faults = s.drv.faults().unwrap();
    let got: Vec<(u8, u32, u32, u64)> = faults
        .iter()
        .map(|f| {
            (
                f.reason,
                f.flags.into(),
                f.endpoint.into(),
                f.address.into(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                FAULT_R_MAPPING,
                FAULT_F_WRITE | FAULT_F_ADDRESS,
                EP,
                IOVA + 0x2000
            ),
            (
                FAULT_R_MAPPING,
                FAULT_F_WRITE | FAULT_F_ADDRESS,
                EP,
                IOVA + 0x2000
            ),
            (
                FAULT_R_MAPPING,
                FAULT_F_READ | FAULT_F_ADDRESS,
                EP,
                IOVA + 0x800
            ),
            (FAULT_R_MAPPING, FAULT_F_WRITE | FAULT_F_ADDRESS, EP, IOVA),
            (FAULT_R_MAPPING, FAULT_F_READ | FAULT_F_ADDRESS, EP, IOVA),
        ]
    );
}

#[test]
fn detached_or_disabled() {
    let mut s = setup();
    assert_eq!(s.drv.detach(&mut s.dev, 1, EP).unwrap(), Status::Ok);
    // Unattached with config.bypass = 0: nothing is reachable.
    assert!(s.mem.read_obj::<u32>(GuestAddress(IOVA)).is_err());
    assert!(s.mem.read_obj::<u32>(GuestAddress(GPA)).is_err());
    // Bypass: identity, guest RAM only.
    s.drv.set_bypass(&mut s.dev, true);
    s.ram.write_obj(0x5a5au16, GuestAddress(GPA)).unwrap();
    assert_eq!(s.mem.read_obj::<u16>(GuestAddress(GPA)).unwrap(), 0x5a5a);
    assert!(s.mem.read_obj::<u16>(GuestAddress(RAM as u64)).is_err());
    // IommuMemory with the IOMMU disabled is guest-physical memory, whatever the endpoint says.
    s.drv.set_bypass(&mut s.dev, false);
    assert!(s.mem.read_obj::<u16>(GuestAddress(GPA)).is_err());
    s.mem.set_iommu_enabled(false);
    assert_eq!(s.mem.read_obj::<u16>(GuestAddress(GPA)).unwrap(), 0x5a5a);
}

#[test]
fn unmap_completes_only_after_an_access_in_flight() {
    let mut s = setup();
    let mem = Arc::new(s.mem);
    let (tx, rx) = mpsc::channel();
    let done = Arc::new(AtomicBool::new(false));
    let t = {
        let (mem, done) = (mem.clone(), done.clone());
        std::thread::spawn(move || {
            // An access in progress: its translation is in hand, the copy not finished.
            let slices = mem
                .get_slices(GuestAddress(IOVA), 0x1000, Permissions::Read)
                .unwrap();
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            done.store(true, Ordering::SeqCst);
            drop(slices);
        })
    };
    rx.recv().unwrap();
    assert_eq!(
        s.drv.unmap(&mut s.dev, 1, IOVA, 0x2000).unwrap(),
        Status::Ok
    );
    assert!(
        done.load(Ordering::SeqCst),
        "UNMAP completed while an access still used the mapping"
    );
    t.join().unwrap();
    assert!(mem.read_obj::<u8>(GuestAddress(IOVA)).is_err());
}
