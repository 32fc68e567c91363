//! Fast tests on the host's /dev/kvm with tiny guests assembled here (hand-written machine
//! code): exit dispatch (port I/O, MMIO, HLT), PCI config cycles through CF8/CFC, ACPI power
//! off, stopping every vCPU, and MSI delivery through irqfd + GSI routing.
//! When /dev/kvm is unusable every test reports itself skipped (`vmm::skip`), never passed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_segment;
use pci::{MsiIrqManager, MsiMessage};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm::bus::BusDevice;
use vmm::config::{self, BlockConfig, SerialOutput};
use vmm::lifecycle::ExitReason;
use vmm::machine::Machine;
use vmm::vcpu::Vcpu;
use vmm::vm::{Vm, VmConfig};

#[path = "support/lapic.rs"]
mod lapic;
use lapic::{irr_has, wait_irr};

/// Whether /dev/kvm is usable; if not, `test` is recorded as skipped (`vmm::skip`).
fn kvm_usable(test: &str) -> bool {
    vmm::skip::kvm_or_skip(&format!("kvm_tiny_guests::{test}")).is_some()
}

const CODE: u64 = 0x1000;

fn load(vm: &Vm, code: &[u8]) {
    vm.memory
        .memory()
        .write_slice(code, GuestAddress(CODE))
        .unwrap();
}

fn real_mode(vcpu: &Vcpu) {
    let mut s = vcpu.fd.get_sregs().unwrap();
    s.cs.base = 0;
    s.cs.selector = 0;
    vcpu.fd.set_sregs(&s).unwrap();
    let mut r = vcpu.fd.get_regs().unwrap();
    r.rip = CODE;
    r.rflags = 2;
    vcpu.fd.set_regs(&r).unwrap();
}

fn flat32(vcpu: &Vcpu) {
    let mut s = vcpu.fd.get_sregs().unwrap();
    let seg = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.cs = seg(8, 0xb);
    s.ds = seg(0x10, 3);
    s.es = s.ds;
    s.ss = s.ds;
    s.cr0 |= 1;
    vcpu.fd.set_sregs(&s).unwrap();
    let mut r = vcpu.fd.get_regs().unwrap();
    r.rip = CODE;
    r.rflags = 2;
    vcpu.fd.set_regs(&r).unwrap();
}

/// Records accesses; reads answer `reply`.
struct Recorder {
    reply: u8,
    log: Vec<(char, u64, Vec<u8>)>,
}

impl BusDevice for Recorder {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(self.reply);
        self.log.push(('r', offset, data.to_vec()));
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.log.push(('w', offset, data.to_vec()));
    }
}

fn recorder(reply: u8) -> Arc<Mutex<Recorder>> {
    Arc::new(Mutex::new(Recorder { reply, log: vec![] }))
}

fn bare_vm() -> Vm {
    Vm::new(VmConfig {
        cpus: 1,
        memory: 64 << 20,
        irqchip: false,
    })
    .unwrap()
}

#[test]
fn port_io_and_hlt_exits_reach_the_right_device() {
    if !kvm_usable("port_io_and_hlt_exits_reach_the_right_device") {
        return;
    }
    let vm = bare_vm();
    let a = recorder(0x17);
    let b = recorder(0x99);
    vm.buses.pio.insert(0x500, 4, a.clone()).unwrap();
    vm.buses.pio.insert(0x510, 4, b.clone()).unwrap();
    load(
        &vm,
        &[
            0xb0, 0x42, // mov al, 0x42
            0xba, 0x02, 0x05, // mov dx, 0x502
            0xee, // out dx, al
            0xec, // in al, dx
            0x88, 0xc3, // mov bl, al
            0xe4, 0x77, // in al, 0x77 (nobody there)
            0x88, 0xc1, // mov cl, al
            0xf4, // hlt
        ],
    );
    let mut vcpus = vm.create_vcpus().unwrap();
    real_mode(&vcpus[0]);
    let reason = vcpus[0].run();
    assert_eq!(reason, ExitReason::Halted);
    let r = vcpus[0].fd.get_regs().unwrap();
    assert_eq!(r.rbx & 0xff, 0x17, "IN returned the device's value");
    assert_eq!(r.rcx & 0xff, 0xff, "unclaimed port reads float high");
    assert_eq!(
        a.lock().unwrap().log,
        vec![('w', 2, vec![0x42]), ('r', 2, vec![0x17])]
    );
    assert!(b.lock().unwrap().log.is_empty());
    assert_eq!(vm.control.reason(), Some(ExitReason::Halted));
}

/// Reads return 0, 1, 2, ... byte after byte; every access is logged with its size.
#[derive(Default)]
struct Counter {
    next: u8,
    log: Vec<(char, u64, Vec<u8>)>,
}

impl BusDevice for Counter {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for b in data.iter_mut() {
            *b = self.next;
            self.next = self.next.wrapping_add(1);
        }
        self.log.push(('r', offset, data.to_vec()));
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.log.push(('w', offset, data.to_vec()));
    }
}

/// `rep outs` / `rep ins` of every element size (KVM batches `rep ins` into one exit with a
/// count): the device sees one access per element, of the element's size, in order, and the
/// elements land in guest memory in order (a 12-byte `rep insd` on an 8-port device too).
#[test]
fn string_port_io_of_every_size_keeps_element_order() {
    if !kvm_usable("string_port_io_of_every_size_keeps_element_order") {
        return;
    }
    let vm = bare_vm();
    let dev = Arc::new(Mutex::new(Counter::default()));
    vm.buses.pio.insert(0x500, 8, dev.clone()).unwrap();
    let src: Vec<u8> = (0xa0..0xa9).collect();
    vm.memory
        .memory()
        .write_slice(&src, GuestAddress(0x2000))
        .unwrap();
    load(
        &vm,
        &[
            0x31, 0xc0, // xor ax, ax
            0x8e, 0xd8, // mov ds, ax
            0x8e, 0xc0, // mov es, ax
            0xfc, // cld
            0xba, 0x00, 0x05, // mov dx, 0x500
            0xbe, 0x00, 0x20, // mov si, 0x2000
            0xb9, 0x05, 0x00, // mov cx, 5
            0xf3, 0x6e, // rep outsb
            0xb9, 0x02, 0x00, // mov cx, 2
            0xf3, 0x6f, // rep outsw
            0xbf, 0x00, 0x30, // mov di, 0x3000
            0xb9, 0x04, 0x00, // mov cx, 4
            0xf3, 0x6c, // rep insb
            0xb9, 0x03, 0x00, // mov cx, 3
            0x66, 0xf3, 0x6d, // rep insd
            0xf4, // hlt
        ],
    );
    let mut vcpus = vm.create_vcpus().unwrap();
    real_mode(&vcpus[0]);
    assert_eq!(vcpus[0].run(), ExitReason::Halted);
    let mut expected: Vec<(char, u64, Vec<u8>)> = Vec::new();
    expected.extend(src[..5].iter().map(|&b| ('w', 0, vec![b])));
    expected.push(('w', 0, src[5..7].to_vec()));
    expected.push(('w', 0, src[7..9].to_vec()));
    expected.extend((0..4).map(|i| ('r', 0, vec![i])));
    expected.extend((0..3u8).map(|i| ('r', 0, (4 + 4 * i..8 + 4 * i).collect())));
    assert_eq!(dev.lock().unwrap().log, expected);
    let mut read = [0u8; 16];
    vm.memory
        .memory()
        .read_slice(&mut read, GuestAddress(0x3000))
        .unwrap();
    let want: Vec<u8> = (0..16).collect();
    assert_eq!(read.to_vec(), want, "rep ins stored every element in order");
    let r = vcpus[0].fd.get_regs().unwrap();
    assert_eq!(r.rcx & 0xffff, 0, "every repetition ran");
}

#[test]
fn string_port_io_is_one_access_per_element() {
    if !kvm_usable("string_port_io_is_one_access_per_element") {
        return;
    }
    let vm = bare_vm();
    let dev = recorder(0x3c);
    vm.buses.pio.insert(0x500, 2, dev.clone()).unwrap();
    vm.memory
        .memory()
        .write_slice(&[1, 2, 3, 4, 5, 6], GuestAddress(0x2000))
        .unwrap();
    load(
        &vm,
        &[
            0xfc, // cld
            0xbe, 0x00, 0x20, // mov si, 0x2000
            0xba, 0x00, 0x05, // mov dx, 0x500
            0xb9, 0x03, 0x00, // mov cx, 3
            0xf3, 0x6f, // rep outsw: three 2-byte writes
            0xbf, 0x00, 0x21, // mov di, 0x2100
            0xb9, 0x04, 0x00, // mov cx, 4
            0xf3, 0x6c, // rep insb: four 1-byte reads
            0xf4, // hlt
        ],
    );
    let mut vcpus = vm.create_vcpus().unwrap();
    real_mode(&vcpus[0]);
    assert_eq!(vcpus[0].run(), ExitReason::Halted);
    let mut got = [0u8; 4];
    vm.memory
        .memory()
        .read_slice(&mut got, GuestAddress(0x2100))
        .unwrap();
    assert_eq!(got, [0x3c; 4], "every element of rep insb read the device");
    assert_eq!(
        dev.lock().unwrap().log,
        vec![
            ('w', 0, vec![1, 2]),
            ('w', 0, vec![3, 4]),
            ('w', 0, vec![5, 6]),
            ('r', 0, vec![0x3c]),
            ('r', 0, vec![0x3c]),
            ('r', 0, vec![0x3c]),
            ('r', 0, vec![0x3c]),
        ]
    );
}

#[test]
fn mmio_exits_reach_the_right_device() {
    if !kvm_usable("mmio_exits_reach_the_right_device") {
        return;
    }
    let vm = bare_vm();
    let dev = recorder(0x5a);
    // Just above the 64 MiB of RAM: no memory slot, so accesses exit as MMIO.
    vm.buses
        .mmio
        .insert(0x0400_0000, 0x100, dev.clone())
        .unwrap();
    load(
        &vm,
        &[
            0xb8, 0x78, 0x56, 0x34, 0x12, // mov eax, 0x12345678
            0xa3, 0x00, 0x00, 0x00, 0x04, // mov [0x04000000], eax
            0x8b, 0x0d, 0x10, 0x00, 0x00, 0x04, // mov ecx, [0x04000010]
            0xf4, // hlt
        ],
    );
    let mut vcpus = vm.create_vcpus().unwrap();
    flat32(&vcpus[0]);
    assert_eq!(vcpus[0].run(), ExitReason::Halted);
    let r = vcpus[0].fd.get_regs().unwrap();
    assert_eq!(r.rcx & 0xffff_ffff, 0x5a5a_5a5a);
    assert_eq!(
        dev.lock().unwrap().log,
        vec![
            ('w', 0, vec![0x78, 0x56, 0x34, 0x12]),
            ('r', 0x10, vec![0x5a; 4])
        ]
    );
}

fn temp_disk() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("vmm-kvm-test-{}.img", std::process::id()));
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    p
}

/// Reads 00:00.0 and 00:01.0 IDs through CF8/CFC, then powers off through the ACPI sleep
/// control register, all from real mode, in a full machine (irqchip, PCI bus, virtio-blk).
#[test]
fn pci_config_cycles_and_acpi_poweroff() {
    if !kvm_usable("pci_config_cycles_and_acpi_poweroff") {
        return;
    }
    let disk = temp_disk();
    let machine = Machine::new(config::VmConfig {
        kernel: "/nonexistent".into(),
        initramfs: None,
        cmdline: String::new(),
        memory: 64 << 20,
        cpus: 2,
        disks: vec![BlockConfig {
            path: disk.clone(),
            readonly: true,
            iommu: false,
            inline: false,
            indirect: true,
        }],
        serial: SerialOutput::File(std::env::temp_dir().join("vmm-kvm-test-serial.txt")),
        viommu: None,
        vtd: None,
        devices: Vec::new(),
        nets: Vec::new(),
        seccomp: vmm::seccomp::SeccompMode::Off,
        log_level: log::LevelFilter::Warn,
        watchdog: None,
        api_socket: None,
        restore: None,
    })
    .unwrap();
    load(
        &machine.vm,
        &[
            0xba, 0xf8, 0x0c, // mov dx, 0xcf8
            0x66, 0xb8, 0x00, 0x00, 0x00, 0x80, // mov eax, 0x80000000 (00:00.0 reg 0)
            0x66, 0xef, // out dx, eax
            0xba, 0xfc, 0x0c, // mov dx, 0xcfc
            0x66, 0xed, // in eax, dx
            0x66, 0x89, 0xc3, // mov ebx, eax
            0xba, 0xf8, 0x0c, // mov dx, 0xcf8
            0x66, 0xb8, 0x00, 0x08, 0x00, 0x80, // mov eax, 0x80000800 (00:01.0 reg 0)
            0x66, 0xef, // out dx, eax
            0xba, 0xfc, 0x0c, // mov dx, 0xcfc
            0x66, 0xed, // in eax, dx
            0x66, 0x89, 0xc1, // mov ecx, eax
            0xba, 0x00, 0x06, // mov dx, 0x600 (ACPI sleep control)
            0xb0, 0x34, // mov al, SLP_EN | S5 << 2
            0xee, // out dx, al
            0xeb, 0xfe, // jmp $
        ],
    );
    assert_eq!(machine.disks().len(), 1);
    assert_eq!(machine.disks()[0].1, 1, "first disk in slot 1");
    let vm = &machine.vm;
    let mut vcpus = vm.create_vcpus().unwrap();
    real_mode(&vcpus[0]);
    assert_eq!(vcpus[0].run(), ExitReason::PowerOff);
    let r = vcpus[0].fd.get_regs().unwrap();
    let host_bridge =
        u64::from(pci::HOST_BRIDGE_VENDOR_ID) | (u64::from(pci::HOST_BRIDGE_DEVICE_ID) << 16);
    assert_eq!(r.rbx & 0xffff_ffff, host_bridge);
    assert_eq!(
        r.rcx & 0xffff_ffff,
        0x1042_1af4,
        "virtio-blk (modern) at 00:01.0"
    );
    std::fs::remove_file(disk).unwrap();
}

/// Both vCPUs on their own threads (the AP waits for a SIPI that never comes, inside
/// KVM_RUN); the BSP powers off and every thread must be stopped and joined.
#[test]
fn poweroff_stops_every_vcpu_thread() {
    if !kvm_usable("poweroff_stops_every_vcpu_thread") {
        return;
    }
    let vm = Vm::new(VmConfig {
        cpus: 2,
        memory: 64 << 20,
        irqchip: true,
    })
    .unwrap();
    vm.add_legacy_devices(Box::new(std::io::sink())).unwrap();
    load(
        &vm,
        &[
            0xb9, 0x00, 0x10, // mov cx, 0x1000 (spin a little first)
            0xe2, 0xfe, // loop $
            0xba, 0x00, 0x06, // mov dx, 0x600
            0xb0, 0x34, // mov al, 0x34
            0xee, // out dx, al
            0xeb, 0xfe, // jmp $
        ],
    );
    let vcpus = vm.create_vcpus().unwrap();
    real_mode(&vcpus[0]);
    let start = Instant::now();
    let reason = vm.run(vcpus).unwrap();
    assert_eq!(reason, ExitReason::PowerOff);
    assert!(start.elapsed() < Duration::from_secs(30));
}

/// An i8042 pulse-reset (0xFE to port 0x64) stops the VM as a reset.
#[test]
fn i8042_reset_stops_the_vm() {
    if !kvm_usable("i8042_reset_stops_the_vm") {
        return;
    }
    let vm = bare_vm();
    vm.add_legacy_devices(Box::new(std::io::sink())).unwrap();
    load(&vm, &[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]); // mov al,0xfe; out 0x64,al; jmp $
    let vcpus = vm.create_vcpus().unwrap();
    real_mode(&vcpus[0]);
    assert_eq!(vm.run(vcpus).unwrap(), ExitReason::Reset);
}

/// Route an MSI to vector V on APIC 0, signal the irqfd, and find V pending in the LAPIC IRR;
/// re-routing and unrouting take effect.
#[test]
fn msi_through_irqfd_and_gsi_routing_reaches_the_lapic() {
    if !kvm_usable("msi_through_irqfd_and_gsi_routing_reaches_the_lapic") {
        return;
    }
    let vm = Vm::new(VmConfig {
        cpus: 1,
        memory: 64 << 20,
        irqchip: true,
    })
    .unwrap();
    let vcpus = vm.create_vcpus().unwrap();
    // Software-enable the LAPIC (SVR bit 8) so fixed interrupts are accepted.
    let mut lapic = vcpus[0].fd.get_lapic().unwrap();
    lapic.regs[0xf1] |= 1;
    vcpus[0].fd.set_lapic(&lapic).unwrap();

    let msi = vm.msi_manager().unwrap();
    let v = msi.allocate().unwrap();
    assert!(v.gsi >= 24, "MSI GSIs live above the IOAPIC pins");
    let route = |vector: u32| MsiMessage {
        address: 0xfee0_0000, // APIC ID 0, physical
        data: vector,         // fixed, edge
    };
    msi.set_route(v.gsi, Some(route(0x45))).unwrap();
    assert!(!irr_has(&vcpus[0], 0x45));
    v.irqfd.write(1).unwrap();
    assert!(
        wait_irr(&vcpus[0], 0x45),
        "vector 0x45 pending after the irqfd"
    );

    // Re-route to another vector.
    msi.set_route(v.gsi, Some(route(0x61))).unwrap();
    v.irqfd.write(1).unwrap();
    assert!(
        wait_irr(&vcpus[0], 0x61),
        "vector 0x61 pending after re-routing"
    );

    // Routed to 0x72 and then unrouted before the signal: nothing arrives.
    msi.set_route(v.gsi, Some(route(0x72))).unwrap();
    msi.set_route(v.gsi, None).unwrap();
    v.irqfd.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!irr_has(&vcpus[0], 0x72), "an unrouted GSI must not inject");
    let gsi = v.gsi;
    msi.release(v);
    assert_eq!(msi.allocate().unwrap().gsi, gsi, "released GSIs are reused");
}

/// The 64-bit boot state the kernel entry sees: long mode with the boot GDT, the identity map
/// (an access near 1 GiB goes through the page tables and exits as MMIO), RSI = zero page.
#[test]
fn long_mode_boot_state() {
    if !kvm_usable("long_mode_boot_state") {
        return;
    }
    let vm = bare_vm();
    let port = recorder(0);
    let mmio = recorder(0x33);
    vm.buses.pio.insert(0x500, 4, port.clone()).unwrap();
    vm.buses
        .mmio
        .insert(0x3ff0_0000, 0x10, mmio.clone())
        .unwrap();
    let entry = 0x10_0200u64;
    let code = [
        0x89, 0xf0, // mov eax, esi
        0x66, 0xba, 0x00, 0x05, // mov dx, 0x500
        0xef, // out dx, eax
        0x8b, 0x04, 0x25, 0x00, 0x00, 0xf0, 0x3f, // mov eax, [0x3ff00000]
        0xf4, // hlt
    ];
    let mem = vm.memory.memory();
    mem.write_slice(&code, GuestAddress(entry)).unwrap();
    vmm::boot::write_boot_tables(&*mem).unwrap();
    drop(mem);
    let mut vcpus = vm.create_vcpus().unwrap();
    vcpus[0]
        .configure_long_mode(&vmm::boot::BootInfo {
            entry: GuestAddress(entry),
            zero_page: GuestAddress(vmm::boot::ZERO_PAGE_START),
        })
        .unwrap();
    assert_eq!(vcpus[0].run(), ExitReason::Halted);
    let s = vcpus[0].fd.get_sregs().unwrap();
    assert_ne!(s.efer & (1 << 10), 0, "EFER.LMA");
    assert_eq!((s.cs.l, s.cs.selector), (1, 8));
    let r = vcpus[0].fd.get_regs().unwrap();
    assert_eq!(r.rax & 0xffff_ffff, 0x3333_3333);
    assert_eq!(
        port.lock().unwrap().log,
        vec![(
            'w',
            0,
            (vmm::boot::ZERO_PAGE_START as u32).to_le_bytes().to_vec()
        )]
    );
    assert_eq!(mmio.lock().unwrap().log, vec![('r', 0, vec![0x33; 4])]);
}
