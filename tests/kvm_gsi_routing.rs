//! The VM-wide GSI routing table on the host's /dev/kvm at its limit: every GSI the manager
//! hands out can be routed (the table never outgrows KVM_MAX_IRQ_ROUTES), a full table keeps
//! accepting changes, and a device worker raising a vector that could not be routed stays
//! inside its seccomp filter (a forbidden call would end this process with status 159).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pci::{MsiIrqManager, MsiMessage, MsiVector, MsixConfig};
use vmm::seccomp::{self, SeccompMode, ThreadKind};
use vmm::vcpu::Vcpu;
use vmm::vm::{Vm, VmConfig};

/// A VM with the in-kernel irqchip, or `None` with `test` recorded as skipped.
fn irqchip_vm(test: &str) -> Option<Vm> {
    let test = format!("kvm_gsi_routing::{test}");
    vmm::skip::kvm_or_skip(&test)?;
    // Every MSI vector holds an eventfd: thousands of descriptors.
    if let Err(e) = raise_fd_limit(8192) {
        vmm::skip::skipped(&test, &format!("cannot raise RLIMIT_NOFILE to 8192 ({e})"));
        return None;
    }
    Some(
        Vm::new(VmConfig {
            cpus: 1,
            memory: 64 << 20,
            irqchip: true,
        })
        .unwrap(),
    )
}

fn raise_fd_limit(want: libc::rlim_t) -> std::io::Result<()> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid, initialized rlimit structure.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if r.rlim_cur >= want {
            return Ok(());
        }
        if r.rlim_max < want {
            return Err(std::io::Error::other(format!("hard limit {}", r.rlim_max)));
        }
        r.rlim_cur = want;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn msg(vector: u32) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000, // APIC ID 0, physical
        data: vector,         // fixed, edge
    }
}

fn irr_has(vcpu: &Vcpu, vector: u8) -> bool {
    let lapic = vcpu.fd.get_lapic().unwrap();
    let off = 0x200 + usize::from(vector / 32) * 0x10;
    let word = u32::from_le_bytes([
        lapic.regs[off] as u8,
        lapic.regs[off + 1] as u8,
        lapic.regs[off + 2] as u8,
        lapic.regs[off + 3] as u8,
    ]);
    word & (1 << (vector % 32)) != 0
}

fn wait_irr(vcpu: &Vcpu, vector: u8) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        if irr_has(vcpu, vector) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Allocate GSIs until the manager refuses; route every one of them; the full table still
/// takes changes and KVM delivers through it.
#[test]
fn every_allocated_gsi_can_be_routed_and_a_full_table_keeps_working() {
    let Some(vm) = irqchip_vm("every_allocated_gsi_can_be_routed_and_a_full_table_keeps_working")
    else {
        return;
    };
    let vcpus = vm.create_vcpus().unwrap();
    // Software-enable the LAPIC (SVR bit 8) so fixed interrupts are accepted.
    let mut lapic = vcpus[0].fd.get_lapic().unwrap();
    lapic.regs[0xf1] |= 1;
    vcpus[0].fd.set_lapic(&lapic).unwrap();

    let msi = vm.msi_manager().unwrap();
    let mut vectors: Vec<MsiVector> = Vec::new();
    let refusal = loop {
        match msi.allocate() {
            Ok(v) => vectors.push(v),
            Err(e) => break e,
        }
        assert!(vectors.len() <= 4096, "allocation is unbounded");
    };
    assert!(
        vectors.len() >= 2048,
        "only {} GSIs before '{refusal}'",
        vectors.len()
    );
    for (i, v) in vectors.iter().enumerate() {
        if let Err(e) = msi.set_route(v.gsi, Some(msg(0x40 + (i % 0x80) as u32))) {
            panic!(
                "route {i} of {} allocated GSIs (gsi {}) failed: {e}",
                vectors.len(),
                v.gsi
            );
        }
    }
    // The full table takes changes, and KVM routes through it.
    let first = &vectors[0];
    msi.set_route(first.gsi, Some(msg(0xd5))).unwrap();
    first.irqfd.write(1).unwrap();
    assert!(
        wait_irr(&vcpus[0], 0xd5),
        "vector 0xd5 through a full table"
    );
    // Released GSIs can be allocated and routed again.
    let last = vectors.pop().unwrap();
    let gsi = last.gsi;
    msi.release(last);
    let again = msi.allocate().unwrap();
    assert_eq!(again.gsi, gsi);
    msi.set_route(again.gsi, Some(msg(0x51))).unwrap();
    // The rest goes with the VM (releasing thousands of routes one commit at a time is slow).
}

fn write_entry(m: &mut MsixConfig, v: u64, data: u32) {
    let (lo, hi) = (0xfee0_0000u32, 0u32);
    m.table_write(v * 16, &lo.to_le_bytes());
    m.table_write(v * 16 + 4, &hi.to_le_bytes());
    m.table_write(v * 16 + 8, &data.to_le_bytes());
    m.table_write(v * 16 + 12, &0u32.to_le_bytes()); // unmasked
}

/// An MSI-X table of `n` vectors, enabled, every entry programmed and unmasked (what a
/// vCPU does on the guest's table writes: each vector gets a GSI and a route, or fails to).
fn programmed_table(msi: Arc<dyn MsiIrqManager>, n: u16) -> MsixConfig {
    let mut m = MsixConfig::new(usize::from(n), msi).unwrap();
    m.set_control(1 << 15);
    for v in 0..u64::from(n) {
        write_entry(&mut m, v, 0x40 + (v % 0x80) as u32);
    }
    m
}

/// Other devices hold every GSI, so an MSI-X table gets none; then some are freed. Its
/// vectors are raised from a thread under the virtio-blk worker's filter, which allows no
/// eventfd creation and no KVM ioctl: they stay pending, and are delivered once a vCPU-side
/// table write allocates and routes them.
#[test]
fn a_worker_raising_an_unrouted_vector_stays_inside_its_filter() {
    let Some(vm) = irqchip_vm("a_worker_raising_an_unrouted_vector_stays_inside_its_filter") else {
        return;
    };
    let msi: Arc<dyn MsiIrqManager> = vm.msi_manager().unwrap();
    let mut others: Vec<MsiVector> = std::iter::from_fn(|| msi.allocate().ok())
        .take(5000)
        .collect();
    assert!(others.len() < 5000, "allocation is unbounded");
    let table = Arc::new(Mutex::new(programmed_table(msi.clone(), 64)));
    for v in 0..64 {
        assert!(table.lock().unwrap().deliverable_irqfd(v).is_none());
    }
    // Room for 16 vectors again.
    for v in others.drain(..16) {
        msi.release(v);
    }

    let worker = {
        let table = table.clone();
        std::thread::Builder::new()
            .name("test-blk-worker".into())
            .spawn(move || {
                seccomp::apply_mode(ThreadKind::BlockWorker, SeccompMode::On).unwrap();
                let mut t = table.lock().unwrap();
                for v in 0..64 {
                    t.trigger(v);
                }
            })
            .unwrap()
    };
    worker.join().expect("worker thread");
    let mut t = table.lock().unwrap();
    for v in 0..64 {
        assert!(
            t.pending(v),
            "vector {v}: raised without a route, must stay pending"
        );
    }
    // The vCPU side retries on the next table write and delivers what is pending.
    for v in 0..16 {
        write_entry(&mut t, u64::from(v), 0x40 + u32::from(v));
        assert!(t.deliverable_irqfd(v).is_some(), "vector {v} routed now");
        assert!(!t.pending(v), "vector {v}: pending interrupt delivered");
    }
    write_entry(&mut t, 16, 0x50);
    assert!(t.pending(16), "no GSI left for vector 16: still pending");
}
