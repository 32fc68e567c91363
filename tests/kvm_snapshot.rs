//! Snapshot and restore end to end on the host's /dev/kvm with a tiny guest: the guest stops
//! half way, its vCPU, in-kernel irqchip, PIT, clock and RAM are saved to a directory, a new
//! VM restored from it runs the second half. When /dev/kvm (or one of the state ioctls) is
//! unusable the test reports itself skipped (`vmm::skip`), never passed.

use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_msr_entry, Msrs};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm::bus::BusDevice;
use vmm::lifecycle::{ExitReason, VmControl};
use vmm::snapshot::vcpu::{msr_list, VcpuState};
use vmm::snapshot::{Manifest, SnapshotDir, SnapshotError, VmState, FORMAT_VERSION};
use vmm::vcpu::Vcpu;
use vmm::vm::{Vm, VmConfig};

const CODE: u64 = 0x1000;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;

/// Port 0x500: every write stops the VM (the guest's "snapshot me" and "done").
struct Stop(Arc<VmControl>, Arc<Mutex<u32>>);

impl BusDevice for Stop {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, _: &[u8]) {
        *self.1.lock().unwrap() += 1;
        self.0.request_stop(ExitReason::Halted);
    }
}

fn vm() -> (Vm, Arc<Mutex<u32>>) {
    let vm = Vm::new(VmConfig {
        cpus: 1,
        memory: 64 << 20,
        irqchip: true,
    })
    .unwrap();
    let stops = Arc::new(Mutex::new(0));
    vm.buses
        .pio
        .insert(
            0x500,
            1,
            Arc::new(Mutex::new(Stop(vm.control.clone(), stops.clone()))),
        )
        .unwrap();
    (vm, stops)
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

fn manifest() -> Manifest {
    Manifest {
        version: FORMAT_VERSION,
        cpus: 1,
        memory: 64 << 20,
        irqchip: true,
        config: "tiny".into(),
        devices: vec![],
    }
}

/// A state ioctl this KVM does not implement: the test cannot run here.
fn unsupported(e: &SnapshotError) -> bool {
    matches!(e, SnapshotError::Kvm(_, errno) if *errno == libc::ENOTTY || *errno == libc::ENOSYS)
}

#[test]
fn a_tiny_guest_resumes_from_its_snapshot_in_a_new_vm() {
    const TEST: &str = "kvm_snapshot::a_tiny_guest_resumes_from_its_snapshot_in_a_new_vm";
    let Some(kvm) = vmm::skip::kvm_or_skip(TEST) else {
        return;
    };
    let (src, _) = vm();
    #[rustfmt::skip]
    let code = [
        0xb8, 0x34, 0x12,       // mov ax, 0x1234
        0xa3, 0x00, 0x30,       // mov [0x3000], ax
        0xbb, 0x78, 0x56,       // mov bx, 0x5678
        0xba, 0x00, 0x05,       // mov dx, 0x500
        0xee,                   // out dx, al        <- snapshot here
        0x8b, 0x0e, 0x00, 0x30, // mov cx, [0x3000]
        0x01, 0xd9,             // add cx, bx
        0x89, 0x0e, 0x02, 0x30, // mov [0x3002], cx
        0xee,                   // out dx, al        <- done
        0xeb, 0xfe,             // jmp $
    ];
    src.memory
        .memory()
        .write_slice(&code, GuestAddress(CODE))
        .unwrap();
    let mut vcpus = src.create_vcpus().unwrap();
    real_mode(&vcpus[0]);
    assert_eq!(vcpus[0].run(), ExitReason::Halted);
    // Something of every kind to carry over: an MSR, the LAPIC's TPR.
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_SYSENTER_ESP,
        data: 0xfeed_f00d,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(vcpus[0].fd.set_msrs(&msrs).unwrap(), 1);
    let mut lapic = vcpus[0].fd.get_lapic().unwrap();
    lapic.regs[0x80] = 0x30; // TPR
    vcpus[0].fd.set_lapic(&lapic).unwrap();

    let dir = std::env::temp_dir().join(format!("vmm-kvm-snapshot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let snap = SnapshotDir::new(&dir);
    snap.create().unwrap();
    let list = msr_list(&kvm).unwrap();
    let state = match VcpuState::save(0, &vcpus[0].fd, &list, true) {
        Ok(s) => s,
        Err(e) if unsupported(&e) => {
            vmm::skip::skipped(TEST, &format!("this KVM lacks a vCPU state ioctl: {e}"));
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let vm_state = match VmState::save(&src.fd, true) {
        Ok(s) => s,
        Err(e) if unsupported(&e) => {
            vmm::skip::skipped(TEST, &format!("this KVM lacks a VM state ioctl: {e}"));
            return;
        }
        Err(e) => panic!("{e}"),
    };
    snap.write_vcpu(&state).unwrap();
    snap.write_vm(&vm_state).unwrap();
    let pages = snap.write_memory(&*src.memory.memory()).unwrap();
    assert!(pages >= 2, "code and data pages saved ({pages})");
    snap.write_manifest(&manifest()).unwrap();
    drop(vcpus);
    drop(src);

    // A new VM, as `vmm --restore` builds it: same configuration, then the saved state.
    let (dst, stops) = vm();
    snap.read_manifest(&manifest()).unwrap();
    let mismatch = Manifest {
        memory: 128 << 20,
        ..manifest()
    };
    assert!(matches!(
        snap.read_manifest(&mismatch),
        Err(SnapshotError::Mismatch(_))
    ));
    snap.read_memory(&*dst.memory.memory()).unwrap();
    snap.read_vm().unwrap().restore(&dst.fd, true).unwrap();
    let mut vcpus = dst.create_vcpus().unwrap();
    snap.read_vcpu(0)
        .unwrap()
        .restore(&vcpus[0].fd, true)
        .unwrap();
    let again = VcpuState::save(0, &vcpus[0].fd, &list, true).unwrap();
    assert_eq!(again.regs.rip, state.regs.rip);
    assert_eq!(again.lapic.unwrap().regs[0x80], 0x30);
    assert!(again
        .msrs
        .iter()
        .any(|&(i, v)| i == MSR_IA32_SYSENTER_ESP && v == 0xfeed_f00d));

    assert_eq!(vcpus[0].run(), ExitReason::Halted);
    assert_eq!(*stops.lock().unwrap(), 1, "only the second stop ran here");
    let r = vcpus[0].fd.get_regs().unwrap();
    assert_eq!(
        r.rcx & 0xffff,
        0x68ac,
        "bx from the registers + [0x3000] from RAM"
    );
    let v: u16 = dst.memory.memory().read_obj(GuestAddress(0x3002)).unwrap();
    assert_eq!(v, 0x68ac);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kvm_refuses_a_hostile_vcpu_state_with_an_error() {
    const TEST: &str = "kvm_snapshot::kvm_refuses_a_hostile_vcpu_state_with_an_error";
    let Some(kvm) = vmm::skip::kvm_or_skip(TEST) else {
        return;
    };
    let (vm, _) = vm();
    let vcpus = vm.create_vcpus().unwrap();
    let list = msr_list(&kvm).unwrap();
    let mut s = match VcpuState::save(0, &vcpus[0].fd, &list, true) {
        Ok(s) => s,
        Err(e) if unsupported(&e) => {
            vmm::skip::skipped(TEST, &format!("this KVM lacks a vCPU state ioctl: {e}"));
            return;
        }
        Err(e) => panic!("{e}"),
    };
    // An MSR no CPU has: refused with the index named.
    s.msrs.push((0xdead_0000, 1));
    let e = s.restore(&vcpus[0].fd, true).unwrap_err().to_string();
    assert!(e.contains("0xdead0000"), "{e}");
    s.msrs.pop();
    // Saved without an irqchip, restored with one.
    s.lapic = None;
    assert!(matches!(
        s.restore(&vcpus[0].fd, true),
        Err(SnapshotError::Mismatch(_))
    ));
}

/// The whole control path on a running guest: `vmm ctl` pause (the guest's counter stops),
/// snapshot, resume (it counts on), stop; then a new VM restored from the snapshot counts on
/// from the paused value.
#[test]
fn pause_snapshot_resume_through_the_control_socket_then_restore() {
    use vmm::snapshot::api::{ctl, ApiServer};
    use vmm::snapshot::controller::{restore, Controller};
    const TEST: &str =
        "kvm_snapshot::pause_snapshot_resume_through_the_control_socket_then_restore";
    let Some(kvm) = vmm::skip::kvm_or_skip(TEST) else {
        return;
    };
    #[rustfmt::skip]
    let code = [
        0xff, 0x06, 0x00, 0x30, // inc word [0x3000]
        0xeb, 0xfa,             // jmp back to the inc
    ];
    let counter = |vm: &Vm| -> u16 { vm.memory.memory().read_obj(GuestAddress(0x3000)).unwrap() };
    let (src, _) = vm();
    src.memory
        .memory()
        .write_slice(&code, GuestAddress(CODE))
        .unwrap();
    let vcpus = src.create_vcpus().unwrap();
    real_mode(&vcpus[0]);
    let list = msr_list(&kvm).unwrap();
    let controller = Controller::new(
        src.control.clone(),
        src.fd.clone(),
        src.memory.clone(),
        list.clone(),
        manifest(),
    );
    let sock = std::env::temp_dir().join(format!("vmm-kvm-snapshot-{}.sock", std::process::id()));
    let dir = std::env::temp_dir().join(format!("vmm-kvm-snapshot-ctl-{}", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_dir_all(&dir);
    let mut server = ApiServer::start(&sock, Arc::new(controller)).unwrap();
    let s = sock.display().to_string();
    let run = |args: &[&str]| {
        let mut v = vec![s.clone()];
        v.extend(args.iter().map(|a| a.to_string()));
        ctl(&v)
    };
    let control = src.control.clone();
    let runner = std::thread::spawn(move || vmm::vm::run_vcpus(vcpus, &control));
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(run(&["snapshot", dir.to_str().unwrap()])
        .unwrap_err()
        .contains("paused first"));
    run(&["pause"]).unwrap();
    assert_eq!(run(&["info"]).unwrap(), r#"{"state":"Paused"}"#);
    let at_pause = counter(&src);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(counter(&src), at_pause, "no vCPU runs while paused");
    match run(&["snapshot", dir.to_str().unwrap()]) {
        Ok(_) => {}
        Err(e) if e.contains("errno 25") || e.contains("errno 38") => {
            src.control.request_stop(ExitReason::PowerOff);
            let _ = runner.join();
            vmm::skip::skipped(TEST, &format!("this KVM lacks a state ioctl: {e}"));
            return;
        }
        Err(e) => panic!("{e}"),
    }
    assert!(run(&["snapshot", dir.to_str().unwrap()])
        .unwrap_err()
        .contains("already holds"));
    run(&["resume"]).unwrap();
    let t = std::time::Instant::now();
    while counter(&src) == at_pause && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_ne!(counter(&src), at_pause, "the guest runs again after resume");
    src.control.request_stop(ExitReason::PowerOff);
    assert_eq!(runner.join().unwrap().unwrap(), ExitReason::PowerOff);
    server.stop();

    let (dst, _) = vm();
    let vcpus = dst.create_vcpus().unwrap();
    restore(&dir, &dst.fd, &dst.memory.memory(), &vcpus, &manifest()).unwrap();
    assert_eq!(counter(&dst), at_pause, "RAM as it was when paused");
    let control = dst.control.clone();
    let runner = std::thread::spawn(move || vmm::vm::run_vcpus(vcpus, &control));
    let t = std::time::Instant::now();
    while counter(&dst) == at_pause && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_ne!(counter(&dst), at_pause, "the restored guest counts on");
    dst.control.request_stop(ExitReason::PowerOff);
    runner.join().unwrap().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The machine's snapshot plan on a tiny guest with the legacy devices: the guest programs
/// COM1's scratch register and the CMOS, pauses, is saved through the control socket the
/// machine starts, and a new VM with the same configuration restores the devices too.
#[test]
fn the_machine_plan_saves_and_restores_the_legacy_devices() {
    use vmm::snapshot::api::ctl;
    use vmm::snapshot::machine::{restore_machine, serve, Plan};
    const TEST: &str = "kvm_snapshot::the_machine_plan_saves_and_restores_the_legacy_devices";
    if vmm::skip::kvm_or_skip(TEST).is_none() {
        return;
    }
    let mut cfg = vmm::config::VmConfig::new("k".into());
    cfg.cpus = 1;
    cfg.memory = 64 << 20;
    let plan = Plan::new(&cfg, None);
    let machine_vm = || {
        let vm = Vm::new(VmConfig {
            cpus: 1,
            memory: 64 << 20,
            irqchip: true,
        })
        .unwrap();
        vm.add_legacy_devices(Box::new(std::io::sink())).unwrap();
        vm
    };
    #[rustfmt::skip]
    let code = [
        0xba, 0xff, 0x03,       // mov dx, 0x3ff (COM1 scratch)
        0xb0, 0xa5,             // mov al, 0xa5
        0xee,                   // out dx, al
        0xb0, 0x40, 0xe6, 0x70, // mov al, 0x40; out 0x70, al (CMOS index)
        0xb0, 0x3c, 0xe6, 0x71, // mov al, 0x3c; out 0x71, al (NVRAM[0x40])
        0xff, 0x06, 0x00, 0x30, // inc word [0x3000]
        0xeb, 0xfa,             // jmp back to the inc
    ];
    let src = machine_vm();
    src.memory
        .memory()
        .write_slice(&code, GuestAddress(CODE))
        .unwrap();
    let vcpus = src.create_vcpus().unwrap();
    real_mode(&vcpus[0]);
    let id = std::process::id();
    let sock = std::env::temp_dir().join(format!("vmm-kvm-plan-{id}.sock"));
    let dir = std::env::temp_dir().join(format!("vmm-kvm-plan-{id}"));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_dir_all(&dir);
    let server = serve(&sock, &src, &plan).unwrap();
    let control = src.control.clone();
    let runner = std::thread::spawn(move || vmm::vm::run_vcpus(vcpus, &control));
    let s = sock.display().to_string();
    let t = std::time::Instant::now();
    while src
        .memory
        .memory()
        .read_obj::<u16>(GuestAddress(0x3000))
        .unwrap()
        == 0
        && t.elapsed() < std::time::Duration::from_secs(5)
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    ctl(&[s.clone(), "pause".into()]).unwrap();
    match ctl(&[s.clone(), "snapshot".into(), dir.display().to_string()]) {
        Ok(_) => {}
        Err(e) if e.contains("errno 25") || e.contains("errno 38") => {
            src.control.request_stop(ExitReason::PowerOff);
            let _ = runner.join();
            vmm::skip::skipped(TEST, &format!("this KVM lacks a state ioctl: {e}"));
            return;
        }
        Err(e) => panic!("{e}"),
    }
    src.control.request_stop(ExitReason::PowerOff);
    runner.join().unwrap().unwrap();
    drop(server);

    let dst = machine_vm();
    let vcpus = dst.create_vcpus().unwrap();
    restore_machine(&dir, &dst, &vcpus, &plan).unwrap();
    let legacy = dst.legacy.get().unwrap();
    let mut v = [0u8];
    vmm::bus::BusDevice::read(&mut *legacy.serial.lock().unwrap(), 7, &mut v);
    assert_eq!(v[0], 0xa5, "COM1 scratch register restored");
    vmm::bus::BusDevice::write(&mut *legacy.cmos.lock().unwrap(), 0, &[0x40]);
    vmm::bus::BusDevice::read(&mut *legacy.cmos.lock().unwrap(), 1, &mut v);
    assert_eq!(v[0], 0x3c, "CMOS NVRAM restored");
    // Another configuration is refused, naming the difference.
    let mut other = cfg.clone();
    other.cpus = 2;
    let e = restore_machine(&dir, &dst, &vcpus, &Plan::new(&other, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vCPUs"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Port 0x510: reads answer 0x5a and are counted.
struct Reads(Arc<Mutex<u64>>);

impl BusDevice for Reads {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        *self.0.lock().unwrap() += 1;
        data.fill(0x5a);
    }
    fn write(&mut self, _: u64, _: &[u8]) {}
}

/// Two vCPUs, the boot one looping on a port read (every exit an IN to complete before its
/// state is read), the other waiting for its SIPI inside KVM_RUN: both park, are saved, and
/// the restored VM goes on with every IN completed exactly once and the AP still waiting.
#[test]
fn a_two_vcpu_vm_pauses_with_its_ins_completed_and_its_ap_waiting() {
    use vmm::snapshot::api::ctl;
    use vmm::snapshot::controller::{restore, Controller};
    const TEST: &str =
        "kvm_snapshot::a_two_vcpu_vm_pauses_with_its_ins_completed_and_its_ap_waiting";
    let Some(kvm) = vmm::skip::kvm_or_skip(TEST) else {
        return;
    };
    #[rustfmt::skip]
    let code = [
        0xba, 0x10, 0x05,       // mov dx, 0x510
        0xb0, 0x00,             // mov al, 0
        0xec,                   // in al, dx
        0x3c, 0x5a,             // cmp al, 0x5a
        0x75, 0x06,             // jne bad
        0xff, 0x06, 0x00, 0x30, // inc word [0x3000]
        0xeb, 0xf3,             // jmp back to mov al, 0
        0xff, 0x06, 0x02, 0x30, // bad: inc word [0x3002]
        0xeb, 0xfe,             // jmp $
    ];
    let two = || {
        let vm = Vm::new(VmConfig {
            cpus: 2,
            memory: 64 << 20,
            irqchip: true,
        })
        .unwrap();
        let reads = Arc::new(Mutex::new(0u64));
        vm.buses
            .pio
            .insert(0x510, 1, Arc::new(Mutex::new(Reads(reads.clone()))))
            .unwrap();
        (vm, reads)
    };
    let word = |vm: &Vm, at: u64| -> u16 { vm.memory.memory().read_obj(GuestAddress(at)).unwrap() };
    let m = Manifest {
        cpus: 2,
        ..manifest()
    };
    let (src, src_reads) = two();
    src.memory
        .memory()
        .write_slice(&code, GuestAddress(CODE))
        .unwrap();
    let vcpus = src.create_vcpus().unwrap();
    real_mode(&vcpus[0]);
    let ap_state = vcpus[1].fd.get_mp_state().unwrap();
    let list = msr_list(&kvm).unwrap();
    let c = Controller::new(
        src.control.clone(),
        src.fd.clone(),
        src.memory.clone(),
        list,
        m.clone(),
    );
    let id = std::process::id();
    let sock = std::env::temp_dir().join(format!("vmm-kvm-two-{id}.sock"));
    let dir = std::env::temp_dir().join(format!("vmm-kvm-two-{id}"));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_dir_all(&dir);
    let server = vmm::snapshot::api::ApiServer::start(&sock, Arc::new(c)).unwrap();
    let s = sock.display().to_string();
    let control = src.control.clone();
    let runner = std::thread::spawn(move || vmm::vm::run_vcpus(vcpus, &control));
    std::thread::sleep(std::time::Duration::from_millis(100));
    ctl(&[s.clone(), "pause".into()]).unwrap();
    let (count, reads) = (word(&src, 0x3000), *src_reads.lock().unwrap());
    assert!(count > 0, "the guest ran");
    // Every IN was completed before the pause: none waits for its result.
    assert!(
        reads == u64::from(count) || reads == u64::from(count) + 1,
        "{reads} port reads, {count} counted"
    );
    match ctl(&[s.clone(), "snapshot".into(), dir.display().to_string()]) {
        Ok(_) => {}
        Err(e) if e.contains("errno 25") || e.contains("errno 38") => {
            src.control.request_stop(ExitReason::PowerOff);
            let _ = runner.join();
            vmm::skip::skipped(TEST, &format!("this KVM lacks a state ioctl: {e}"));
            return;
        }
        Err(e) => panic!("{e}"),
    }
    src.control.request_stop(ExitReason::PowerOff);
    runner.join().unwrap().unwrap();
    drop(server);
    // The saved state is at an instruction boundary: a read that happened has its value in
    // AL and RIP past the IN (not at the IN, waiting for KVM to complete it).
    let saved = SnapshotDir::new(&dir).read_vcpu(0).unwrap();
    if reads == u64::from(count) + 1 {
        let rip = saved.regs.rip;
        assert!(
            (CODE + 6..=CODE + 13).contains(&rip) && saved.regs.rax & 0xff == 0x5a,
            "an IN read from the device but not completed: rip {rip:#x} rax {:#x}",
            saved.regs.rax
        );
    }

    let (dst, dst_reads) = two();
    let vcpus = dst.create_vcpus().unwrap();
    restore(&dir, &dst.fd, &dst.memory.memory(), &vcpus, &m).unwrap();
    assert_eq!(
        vcpus[1].fd.get_mp_state().unwrap().mp_state,
        ap_state.mp_state
    );
    let control = dst.control.clone();
    let runner = std::thread::spawn(move || vmm::vm::run_vcpus(vcpus, &control));
    let t = std::time::Instant::now();
    while word(&dst, 0x3000) < count + 100 && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    dst.control.request_stop(ExitReason::PowerOff);
    runner.join().unwrap().unwrap();
    let after = word(&dst, 0x3000);
    assert!(
        after >= count + 100,
        "the restored guest runs ({count} -> {after})"
    );
    assert_eq!(
        word(&dst, 0x3002),
        0,
        "no IN ever came back without its value"
    );
    // Reads here + reads there = INs counted, +1 for one in flight at the last stop: no IN
    // is read twice across the snapshot.
    let total = reads + *dst_reads.lock().unwrap();
    assert!(
        total >= u64::from(after) && total <= u64::from(after) + 1,
        "{total} port reads for {after} INs counted"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
