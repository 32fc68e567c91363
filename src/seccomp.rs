//! seccomp-bpf filters, one per kind of VMM thread (built with `seccompiler`).
//!
//! Every thread installs the filter of its kind once its setup is done: the main thread after
//! every device exists and before any vCPU enters KVM_RUN, vCPU threads before their first
//! KVM_RUN, worker threads (virtio-blk `notify=thread`, the virtio-iommu poller, TAP readers)
//! at their start. A filter allows only the system calls the thread needs; `ioctl` is allowed
//! per request number, `prctl`, `fcntl`, `clone`, `mmap`/`mprotect` (never `PROT_EXEC`) and
//! `seccomp` per argument.
//!
//! Filters stack: a thread created by a filtered thread (the worker threads a vCPU spawns when
//! the guest activates a device) keeps its parent's filter under its own, so it can do only
//! what both allow. vCPU threads may therefore create threads (`clone` with `CLONE_THREAD`
//! only; `clone3`, whose flags BPF cannot see, fails with `ENOSYS` so glibc falls back to
//! `clone`) and stack a filter (`seccomp(SECCOMP_SET_MODE_FILTER)`), nothing else of the kind.
//!
//! Modes ([`SeccompMode`]): `on` (default for the binary) traps a forbidden call with SIGSYS;
//! the handler names the system call on stderr and ends the process with status 159
//! (128 + SIGSYS; a call made with signals blocked, as glibc's `pthread_kill` does, is killed
//! by the kernel with SIGSYS directly, without the report). `log` allows it and lets the kernel log it (`audit: type=1326 ...
//! syscall=N`). `off` installs nothing (the library default, for tests that run VMs in-process).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, Once};

use kvm_bindings::{
    kvm_device_attr, kvm_ioeventfd, kvm_irq_routing, kvm_irqfd, kvm_msi, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, KVMIO,
};
use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

/// Exit status of a process stopped by a forbidden system call (128 + SIGSYS).
pub const SIGSYS_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// What a filter does with a call outside its allow list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// No filter.
    #[default]
    Off,
    /// Allow and log (SECCOMP_RET_LOG): for finding what a new code path needs.
    Log,
    /// Refuse: SIGSYS, reported and fatal.
    On,
}

impl SeccompMode {
    fn to_u8(self) -> u8 {
        match self {
            SeccompMode::Off => 0,
            SeccompMode::Log => 1,
            SeccompMode::On => 2,
        }
    }

    fn from_u8(v: u8) -> SeccompMode {
        match v {
            1 => SeccompMode::Log,
            2 => SeccompMode::On,
            _ => SeccompMode::Off,
        }
    }
}

/// The kinds of VMM threads, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the machine is built: waits for a stop, kicks and joins the
    /// vCPUs, tears the devices down, prints the exit summary.
    Main,
    /// A vCPU: KVM_RUN and every device exit served inline (virtio-blk file I/O, the
    /// virtio-iommu with its VFIO DMA calls, virtio-net TX, MSI-X and BAR reprogramming).
    Vcpu,
    /// A virtio-blk worker (`notify=thread`), or the continuation thread of an inline
    /// virtio-blk or virtio-net (`devices::polled`): eventfds, file I/O, irqfds.
    BlockWorker,
    /// The virtio-iommu request-queue poller (`--viommu virtio,poll=US`): request processing
    /// incl. VFIO DMA calls, sleeps, irqfds.
    Poller,
    /// A TAP reader: reads frames, writes them into guest buffers, irqfds.
    TapReader,
    /// The hang watchdog (`--watchdog`): reads `/proc/self/task/*` (files opened read-only),
    /// logs, sleeps.
    Watchdog,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::BlockWorker,
        ThreadKind::Poller,
        ThreadKind::TapReader,
        ThreadKind::Watchdog,
    ];

    /// Parse a kind name (`main`, `vcpu`, `blk-worker`, `poller`, `tap-reader`, `watchdog`).
    pub fn parse(s: &str) -> Option<ThreadKind> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::BlockWorker => "blk-worker",
            ThreadKind::Poller => "poller",
            ThreadKind::TapReader => "tap-reader",
            ThreadKind::Watchdog => "watchdog",
        }
    }
}

/// seccomp errors.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules did not compile.
    #[error("seccomp filter for {0} threads")]
    Build(&'static str, #[source] BackendError),
    /// The kernel refused the filter.
    #[error("installing the seccomp filter for {0} threads")]
    Apply(&'static str, #[source] seccompiler::Error),
}

static MODE: AtomicU8 = AtomicU8::new(0);

/// Set the mode every later [`apply`] uses (the binary sets it from `--seccomp`).
pub fn set_mode(mode: SeccompMode) {
    MODE.store(mode.to_u8(), Ordering::SeqCst);
}

/// The mode [`apply`] uses.
pub fn mode() -> SeccompMode {
    SeccompMode::from_u8(MODE.load(Ordering::SeqCst))
}

// KVM ioctls (linux/kvm.h).
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
// VFIO ioctls (linux/vfio.h: type ';', base 100).
const VFIO_TYPE: u32 = b';' as u32;
ioctl_io_nr!(VFIO_GROUP_UNSET_CONTAINER, VFIO_TYPE, 100 + 5);
ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE, 100 + 10);
ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE, 100 + 11);
ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE, 100 + 13);
ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE, 100 + 14);

/// Flags every thread-creating `clone` carries (glibc's pthread_create); a `clone` without
/// them (a fork) is refused.
const CLONE_THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD) as u64;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(conds)
}

/// One rule per value: argument `arg` equals one of `values`.
fn arg_in(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, BackendError> {
    values
        .iter()
        .map(|&v| rule(vec![cond(arg, SeccompCmpOp::Eq, v)?]))
        .collect()
}

fn allow(rules: &mut Rules, calls: &[libc::c_long]) {
    for &c in calls {
        rules.insert(c, Vec::new());
    }
}

/// Calls every thread makes: locks, memory allocation, eventfd and log I/O, signal return
/// (the vCPU kick), thread exit.
fn base_rules() -> Result<Rules, BackendError> {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_futex,
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_munmap,
            libc::SYS_madvise,
            libc::SYS_mremap,
            libc::SYS_brk,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_sched_yield,
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_clock_gettime,
            libc::SYS_time,
            libc::SYS_gettimeofday,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_getrandom,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_restart_syscall,
            // glibc's thread start and exit (a thread stacks its filter after its start).
            libc::SYS_rseq,
            libc::SYS_set_robust_list,
        ],
    );
    // Anonymous or file mappings, never executable.
    let no_exec = || -> Result<Vec<SeccompRule>, BackendError> {
        Ok(vec![rule(vec![cond(
            2,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])?])
    };
    r.insert(libc::SYS_mmap, no_exec()?);
    r.insert(libc::SYS_mprotect, no_exec()?);
    // Thread names only.
    r.insert(libc::SYS_prctl, arg_in(0, &[libc::PR_SET_NAME as u64])?);
    // Rust's debug-build check that an fd is open before it is closed.
    r.insert(libc::SYS_fcntl, arg_in(1, &[libc::F_GETFD as u64])?);
    // The vIOMMU's asymmetric barrier (viommu engine/barrier.rs): its registration, and the
    // heavy side a revocation past the pin deadline runs on whichever thread publishes.
    r.insert(
        libc::SYS_membarrier,
        arg_in(
            0,
            &[
                MEMBARRIER_CMD_PRIVATE_EXPEDITED,
                MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
            ],
        )?,
    );
    Ok(r)
}

/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED` and its registration (linux/membarrier.h).
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: u64 = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: u64 = 1 << 4;

/// Calls of a thread that may create threads and stack filters on them.
fn spawn_rules(r: &mut Rules) -> Result<(), BackendError> {
    r.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(CLONE_THREAD_FLAGS),
            CLONE_THREAD_FLAGS,
        )?])?],
    );
    // A thread keeps its creator's filter under its own: what the workers a vCPU starts
    // (virtio-blk notify=thread, the virtio-iommu poller) need must pass here too.
    allow(r, &[libc::SYS_poll, libc::SYS_ppoll]);
    // Refused with ENOSYS by the stacked clone3 filter (see the module docs).
    allow(r, &[libc::SYS_clone3, libc::SYS_sched_getaffinity]);
    r.insert(
        libc::SYS_prctl,
        arg_in(
            0,
            &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
        )?,
    );
    r.insert(
        libc::SYS_seccomp,
        arg_in(0, &[libc::SECCOMP_SET_MODE_FILTER as u64])?,
    );
    Ok(())
}

/// Virtio-blk backing-file I/O.
fn file_io(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_lseek,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
        ],
    );
}

/// Eventfds created and duplicated when the guest (re)activates a device.
fn eventfd_setup(r: &mut Rules) -> Result<(), BackendError> {
    allow(r, &[libc::SYS_eventfd2, libc::SYS_dup]);
    r.insert(
        libc::SYS_fcntl,
        arg_in(
            1,
            &[
                libc::F_DUPFD_CLOEXEC as u64,
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
            ],
        )?,
    );
    Ok(())
}

fn ioctls(r: &mut Rules, requests: &[u64]) -> Result<(), BackendError> {
    r.insert(libc::SYS_ioctl, arg_in(1, requests)?);
    Ok(())
}

/// ioctl request numbers a vCPU thread may issue.
pub fn vcpu_ioctls() -> Vec<u64> {
    [
        KVM_RUN(),
        // Internal-error and triple-fault reports.
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        // Device reprogramming by the guest: MSI-X routes, irqfds, ioeventfds, BAR slots.
        KVM_SET_GSI_ROUTING(),
        KVM_IRQFD(),
        KVM_IOEVENTFD(),
        KVM_SIGNAL_MSI(),
        KVM_SET_USER_MEMORY_REGION(),
        // The virtio-iommu shadowing guest mappings into VFIO containers, VFIO interrupts.
        VFIO_IOMMU_MAP_DMA(),
        VFIO_IOMMU_UNMAP_DMA(),
        VFIO_DEVICE_SET_IRQS(),
        VFIO_DEVICE_RESET(),
    ]
    .to_vec()
}

/// ioctl request numbers the main thread may issue after setup (device teardown).
pub fn main_ioctls() -> Vec<u64> {
    [
        KVM_SET_GSI_ROUTING(),
        KVM_IRQFD(),
        KVM_IOEVENTFD(),
        KVM_SET_USER_MEMORY_REGION(),
        KVM_SET_DEVICE_ATTR(),
        VFIO_IOMMU_UNMAP_DMA(),
        VFIO_GROUP_UNSET_CONTAINER(),
        VFIO_DEVICE_SET_IRQS(),
        VFIO_DEVICE_RESET(),
    ]
    .to_vec()
}

/// The allow list of a thread kind: system call number -> argument rules (empty: any
/// arguments).
pub fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let build = || -> Result<Rules, BackendError> {
        let mut r = base_rules()?;
        match kind {
            ThreadKind::Main => {
                // Waiting for the stop request, kicking vCPUs out of KVM_RUN (signals to this
                // process's threads only), joining them.
                allow(&mut r, &[libc::SYS_poll, libc::SYS_ppoll]);
                r.insert(
                    libc::SYS_tgkill,
                    arg_in(0, &[u64::from(std::process::id())])?,
                );
                ioctls(&mut r, &main_ioctls())?;
            }
            ThreadKind::Vcpu => {
                file_io(&mut r);
                eventfd_setup(&mut r)?;
                spawn_rules(&mut r)?;
                ioctls(&mut r, &vcpu_ioctls())?;
            }
            ThreadKind::BlockWorker => {
                file_io(&mut r);
                allow(&mut r, &[libc::SYS_poll, libc::SYS_ppoll]);
            }
            ThreadKind::Poller => {
                ioctls(&mut r, &[VFIO_IOMMU_MAP_DMA(), VFIO_IOMMU_UNMAP_DMA()])?;
            }
            ThreadKind::TapReader => {
                allow(&mut r, &[libc::SYS_poll, libc::SYS_ppoll]);
            }
            ThreadKind::Watchdog => {
                // Directory listing and whole-file reads of /proc; never a file opened for
                // writing (the kmsg copy is opened before the filter).
                let write_flags =
                    (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC) as u64;
                r.insert(
                    libc::SYS_openat,
                    vec![rule(vec![cond(
                        2,
                        SeccompCmpOp::MaskedEq(write_flags),
                        0,
                    )?])?],
                );
                allow(
                    &mut r,
                    &[
                        libc::SYS_getdents64,
                        libc::SYS_statx,
                        libc::SYS_fstat,
                        libc::SYS_newfstatat,
                        libc::SYS_lseek,
                    ],
                );
            }
        }
        Ok(r)
    };
    build().map_err(|e| SeccompError::Build(kind.name(), e))
}

/// `(system calls, ioctl request numbers)` a thread kind may use.
pub fn allowed_counts(kind: ThreadKind) -> Result<(usize, usize), SeccompError> {
    let r = rules(kind)?;
    let ioctls = r.get(&libc::SYS_ioctl).map_or(0, Vec::len);
    Ok((r.len(), ioctls))
}

fn arch() -> Result<TargetArch, BackendError> {
    std::env::consts::ARCH.try_into()
}

/// The BPF program of `kind` under `mode` (`None` for [`SeccompMode::Off`]).
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::On => SeccompAction::Trap,
    };
    let err = |e: BackendError| SeccompError::Build(kind.name(), e);
    let f = SeccompFilter::new(
        rules(kind)?,
        mismatch,
        SeccompAction::Allow,
        arch().map_err(err)?,
    )
    .map_err(err)?;
    let prog: BpfProgram = f.try_into().map_err(err)?;
    Ok(Some(prog))
}

/// The filter stacked under a spawning thread's: `clone3` fails with ENOSYS (glibc then uses
/// `clone`, whose flags the main filter checks).
fn clone3_filter() -> Result<BpfProgram, BackendError> {
    let f = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )?;
    f.try_into()
}

/// A fixed buffer for the SIGSYS report (no allocation in a signal handler).
struct Report {
    buf: [u8; 160],
    len: usize,
}

impl Report {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_num(&mut self, mut n: u64, base: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(n % base) as usize];
            n /= base;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

thread_local! {
    /// The kind of filter this thread installed (an index into [`ThreadKind::ALL`]), for the
    /// SIGSYS report.
    static KIND: std::cell::Cell<u8> = const { std::cell::Cell::new(u8::MAX) };
}

/// Write `vmm: seccomp: forbidden system call N (args A B C) in a KIND thread` to stderr and
/// exit with [`SIGSYS_EXIT_STATUS`]; async-signal-safe (write and exit_group only, both
/// allowed everywhere; the thread-local is const-initialized).
extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t; for SIGSYS from seccomp, si_syscall sits
    // at offset 24 of the 128-byte structure (after si_signo, si_errno, si_code, pad,
    // si_call_addr).
    let nr = unsafe { *((info as *const u8).add(24) as *const i32) };
    let mut r = Report {
        buf: [0; 160],
        len: 0,
    };
    r.push(b"vmm: seccomp: forbidden system call ");
    r.push_num(u64::from(nr.unsigned_abs()), 10);
    if !ctx.is_null() {
        // SAFETY: with SA_SIGINFO the third argument is the interrupted context; the system
        // call's first arguments are in RDI, RSI, RDX.
        let g = unsafe { (*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs };
        r.push(b" (args");
        for reg in [libc::REG_RDI, libc::REG_RSI, libc::REG_RDX] {
            r.push(b" 0x");
            r.push_num(g[reg as usize] as u64, 16);
        }
        r.push(b")");
    }
    let kind = KIND.with(|k| k.get());
    r.push(b" in a ");
    r.push(
        ThreadKind::ALL
            .get(usize::from(kind))
            .map_or("unfiltered", |k| k.name())
            .as_bytes(),
    );
    r.push(b" thread\n");
    // SAFETY: writing a stack buffer to fd 2 and exiting are async-signal-safe.
    unsafe {
        libc::write(2, r.buf.as_ptr().cast(), r.len);
        libc::_exit(SIGSYS_EXIT_STATUS);
    }
}

fn install_sigsys_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler and SA_SIGINFO; the handler only
        // makes async-signal-safe calls.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = sigsys_handler as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                log::warn!(
                    "seccomp: no SIGSYS handler: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

/// A gate threads wait at until it is opened (vCPUs wait for the main thread's filter).
#[derive(Default)]
pub struct StartGate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl StartGate {
    /// Block until [`StartGate::open`] was called.
    pub fn wait(&self) {
        let mut o = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while !*o {
            o = self.cv.wait(o).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Let every waiter (and later caller of [`StartGate::wait`]) through.
    pub fn open(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
}

extern "C" {
    fn tzset();
}

/// Process-wide state libc loads lazily with calls no filter allows, loaded once before the
/// first filter: the time zone (glibc's `gmtime_r`, used by the CMOS RTC on vCPU threads,
/// opens /etc/localtime on its first call).
fn preload_libc_state() {
    static ONCE: Once = Once::new();
    // SAFETY: tzset only reads TZ and the zone file into libc's own state.
    ONCE.call_once(|| unsafe { tzset() });
}

/// Install the filter of `kind` on the calling thread under `mode`.
pub fn apply_mode(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    let Some(prog) = filter(kind, mode)? else {
        return Ok(());
    };
    preload_libc_state();
    install_sigsys_handler();
    if kind == ThreadKind::Vcpu {
        let c3 = clone3_filter().map_err(|e| SeccompError::Build(kind.name(), e))?;
        seccompiler::apply_filter(&c3).map_err(|e| SeccompError::Apply(kind.name(), e))?;
    }
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Apply(kind.name(), e))?;
    if let Some(i) = ThreadKind::ALL.iter().position(|&k| k == kind) {
        KIND.with(|k| k.set(i as u8));
    }
    log::debug!("seccomp: {} filter installed ({mode:?})", kind.name());
    Ok(())
}

/// Install the filter of `kind` on the calling thread under the mode set by [`set_mode`]
/// (nothing when it is off).
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    apply_mode(kind, mode())
}

/// The `--seccomp-selftest KIND` check of the binary: on a new thread, install `kind`'s filter
/// under `mode`, make an allowed call (a write to stderr), then a forbidden one (`socket`).
/// Under [`SeccompMode::On`] the process ends in the SIGSYS handler (status
/// [`SIGSYS_EXIT_STATUS`]); otherwise this returns 0 after reporting what the call returned.
pub fn selftest(kind: ThreadKind, mode: SeccompMode) -> i32 {
    let t = std::thread::Builder::new()
        .name("seccomp-selftest".into())
        .spawn(move || {
            if let Err(e) = apply_mode(kind, mode) {
                eprintln!("seccomp selftest: {}", crate::report::Chain(&e));
                return 1;
            }
            eprintln!(
                "seccomp selftest: {} filter installed, allowed call ok",
                kind.name()
            );
            if kind == ThreadKind::Vcpu {
                // The guest reading the RTC (the hour register, BCD): libc time functions.
                use crate::bus::BusDevice;
                let mut cmos = crate::devices::legacy::Cmos::new();
                let mut hour = [0xffu8];
                cmos.write(0, &[0x04]);
                cmos.read(1, &mut hour);
                eprintln!("seccomp selftest: RTC hour {:02x}", hour[0]);
                // What a vCPU does when the guest activates a notify=thread disk: start a
                // worker that stacks its own filter.
                let worker = std::thread::Builder::new()
                    .name("selftest-worker".into())
                    .spawn(move || {
                        apply_mode(ThreadKind::BlockWorker, mode).is_ok() && {
                            // The worker's wait (under both filters).
                            // SAFETY: poll on no fds with a zero timeout.
                            unsafe { libc::poll(std::ptr::null_mut(), 0, 0) == 0 }
                        }
                    });
                match worker.map(|w| w.join()) {
                    Ok(Ok(true)) => eprintln!("seccomp selftest: worker thread filter installed"),
                    other => eprintln!("seccomp selftest: worker thread failed: {other:?}"),
                }
            }
            if kind == ThreadKind::Watchdog {
                // What a report reads: every thread's /proc files.
                let mut out = String::new();
                crate::watchdog::thread_states(&mut out);
                let threads = out.lines().filter(|l| l.contains(": state ")).count();
                eprintln!("seccomp selftest: watchdog read the state of {threads} threads");
            }
            // SAFETY: a plain socket() call; the fd is closed below if it is returned.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            eprintln!("seccomp selftest: forbidden call returned {fd}");
            if fd >= 0 {
                // SAFETY: closing the fd just returned.
                unsafe { libc::close(fd) };
            }
            0
        });
    match t.map(|t| t.join()) {
        Ok(Ok(code)) => code,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse() {
        for k in ThreadKind::ALL {
            assert_eq!(ThreadKind::parse(k.name()), Some(k));
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(KVM_SET_GSI_ROUTING(), 0x4008_ae6a);
        assert_eq!(KVM_IRQFD(), 0x4020_ae76);
        assert_eq!(KVM_IOEVENTFD(), 0x4040_ae79);
        assert_eq!(KVM_SIGNAL_MSI(), 0x4020_aea5);
        assert_eq!(KVM_SET_DEVICE_ATTR(), 0x4018_aee1);
        assert_eq!(VFIO_IOMMU_MAP_DMA(), 0x3b71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA(), 0x3b72);
        assert_eq!(VFIO_DEVICE_SET_IRQS(), 0x3b6e);
        assert_eq!(VFIO_GROUP_UNSET_CONTAINER(), 0x3b69);
    }

    #[test]
    fn every_kind_compiles_and_is_narrow() {
        for k in ThreadKind::ALL {
            let (calls, _) = allowed_counts(k).unwrap();
            assert!(calls < 60, "{k:?} allows {calls} calls");
            for m in [SeccompMode::Log, SeccompMode::On] {
                assert!(!filter(k, m).unwrap().unwrap().is_empty());
            }
            assert!(filter(k, SeccompMode::Off).unwrap().is_none());
            let r = rules(k).unwrap();
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_socket,
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_ptrace,
                libc::SYS_fork,
                libc::SYS_kill,
            ] {
                // The watchdog opens /proc files, read-only (checked in a child below).
                if k == ThreadKind::Watchdog && forbidden == libc::SYS_openat {
                    assert_eq!(r[&forbidden].len(), 1);
                    continue;
                }
                assert!(!r.contains_key(&forbidden), "{k:?} allows {forbidden}");
            }
        }
        assert_eq!(allowed_counts(ThreadKind::Vcpu).unwrap().1, 12);
        assert_eq!(allowed_counts(ThreadKind::BlockWorker).unwrap().1, 0);
    }

    /// Workers a vCPU starts keep the vCPU filter under their own: their allow list must be
    /// a subset of the vCPU's (found by a real guest: poll in the virtio-blk worker).
    #[test]
    fn workers_started_by_vcpus_need_nothing_the_vcpu_filter_refuses() {
        let vcpu = rules(ThreadKind::Vcpu).unwrap();
        for kind in [ThreadKind::BlockWorker, ThreadKind::Poller] {
            for (nr, conds) in rules(kind).unwrap() {
                let Some(v) = vcpu.get(&nr) else {
                    panic!("{kind:?} needs system call {nr}, which vCPU threads may not make");
                };
                // Unconditional on the worker side must be unconditional on the vCPU side;
                // argument rules must be among the vCPU's.
                if conds.is_empty() {
                    assert!(v.is_empty(), "{kind:?}: {nr} restricted for vCPUs");
                } else if !v.is_empty() {
                    for c in &conds {
                        assert!(v.contains(c), "{kind:?}: rule {c:?} of {nr} not in vCPU's");
                    }
                }
            }
        }
    }

    /// Fork a child that installs `kind`'s filter (mode on, no handler: SIGSYS kills it),
    /// reports on a pipe after `allowed` succeeds, then runs `forbidden`. Returns the bytes
    /// the child wrote and how it ended.
    fn in_child(
        kind: ThreadKind,
        allowed: fn(i32) -> bool,
        forbidden: fn() -> i64,
    ) -> (Vec<u8>, i32) {
        let prog = filter(kind, SeccompMode::On).unwrap().unwrap();
        let mut fds = [0i32; 2];
        // SAFETY: test-only: a pipe, a fork; the child makes raw system calls only (no
        // allocation, no locks) and ends with _exit.
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::close(fds[0]);
                let fprog = libc::sock_fprog {
                    len: prog.len() as u16,
                    filter: prog.as_ptr() as *mut libc::sock_filter,
                };
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &fprog)
                        != 0
                {
                    libc::_exit(3);
                }
                if !allowed(fds[1]) {
                    libc::_exit(4);
                }
                libc::write(fds[1], b"A".as_ptr().cast(), 1);
                let r = forbidden();
                // Only reached if the call was let through.
                libc::write(fds[1], b"F".as_ptr().cast(), 1);
                libc::_exit(if r >= 0 { 0 } else { 5 });
            }
            libc::close(fds[1]);
            let mut out = Vec::new();
            let mut b = [0u8; 16];
            loop {
                let n = libc::read(fds[0], b.as_mut_ptr().cast(), b.len());
                if n <= 0 {
                    break;
                }
                out.extend_from_slice(&b[..n as usize]);
            }
            libc::close(fds[0]);
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            (out, status)
        }
    }

    #[test]
    fn watchdog_filter_opens_read_only() {
        let (out, st) = in_child(
            ThreadKind::Watchdog,
            |_| {
                // SAFETY: raw calls on a NUL-terminated literal path and the fd returned.
                unsafe {
                    let fd = libc::openat(
                        libc::AT_FDCWD,
                        c"/proc/self/stat".as_ptr(),
                        libc::O_RDONLY | libc::O_CLOEXEC,
                    );
                    fd >= 0 && libc::close(fd) == 0
                }
            },
            // SAFETY: a raw openat for writing; the filter must stop it.
            || unsafe {
                i64::from(libc::openat(
                    libc::AT_FDCWD,
                    c"/dev/null".as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                ))
            },
        );
        assert_eq!(out, b"A");
        assert!(killed_by_sigsys(st), "status {st:#x}");
    }

    fn killed_by_sigsys(status: i32) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    #[test]
    fn vcpu_filter_allows_file_io_and_kills_socket() {
        let (out, st) = in_child(
            ThreadKind::Vcpu,
            |fd| {
                // pwrite on a pipe fails with ESPIPE: allowed through the filter, refused by
                // the pipe; fdatasync likewise (EINVAL).
                // SAFETY: raw calls on our own fd.
                unsafe {
                    libc::pwrite(fd, b"x".as_ptr().cast(), 1, 0) == -1
                        && *libc::__errno_location() == libc::ESPIPE
                }
            },
            // SAFETY: a raw socket() call; the filter must stop it.
            || unsafe { i64::from(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0)) },
        );
        assert_eq!(
            out, b"A",
            "allowed call must pass, forbidden must not return"
        );
        assert!(killed_by_sigsys(st), "status {st:#x}");
    }

    #[test]
    fn vcpu_filter_allows_the_viommu_barrier_and_no_other_membarrier() {
        let (out, st) = in_child(
            ThreadKind::Vcpu,
            |_| {
                // Registration then the expedited barrier (what a revocation runs); a kernel
                // without membarrier says ENOSYS, which still proves the filter let it pass.
                // SAFETY: raw membarrier calls, no memory passed.
                unsafe {
                    let ok = |r: libc::c_long| r == 0 || *libc::__errno_location() == libc::ENOSYS;
                    ok(libc::syscall(
                        libc::SYS_membarrier,
                        MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
                        0,
                        0,
                    )) && ok(libc::syscall(
                        libc::SYS_membarrier,
                        MEMBARRIER_CMD_PRIVATE_EXPEDITED,
                        0,
                        0,
                    ))
                }
            },
            // MEMBARRIER_CMD_GLOBAL (1): IPIs every CPU of the host; the filter must stop it.
            // SAFETY: a raw membarrier call, no memory passed.
            || unsafe { libc::syscall(libc::SYS_membarrier, 1, 0, 0) },
        );
        assert_eq!(
            out, b"A",
            "the barrier must pass, MEMBARRIER_CMD_GLOBAL must not"
        );
        assert!(killed_by_sigsys(st), "status {st:#x}");
    }

    #[test]
    fn vcpu_filter_checks_ioctl_request_numbers() {
        let (out, st) = in_child(
            ThreadKind::Vcpu,
            |fd| {
                // KVM_IRQFD on a pipe: passes the filter, the pipe says ENOTTY.
                // SAFETY: ioctl with a null argument on our own pipe fd.
                unsafe {
                    libc::ioctl(fd, KVM_IRQFD() as _, 0) == -1
                        && *libc::__errno_location() == libc::ENOTTY
                }
            },
            // TIOCGWINSZ is not on the list.
            // SAFETY: a raw ioctl the filter must stop before the kernel looks at it.
            || unsafe { i64::from(libc::ioctl(0, libc::TIOCGWINSZ, 0)) },
        );
        assert_eq!(out, b"A");
        assert!(killed_by_sigsys(st), "status {st:#x}");
    }

    #[test]
    fn worker_filters_refuse_what_only_vcpus_may_do() {
        for kind in [
            ThreadKind::BlockWorker,
            ThreadKind::TapReader,
            ThreadKind::Main,
        ] {
            let (out, st) = in_child(
                kind,
                // SAFETY: write to our own pipe.
                |fd| unsafe { libc::write(fd, b"w".as_ptr().cast(), 1) == 1 },
                // KVM_RUN is the vCPU's alone.
                // SAFETY: a raw ioctl the filter must stop.
                || unsafe { i64::from(libc::ioctl(0, KVM_RUN() as _, 0)) },
            );
            assert_eq!(out, b"wA", "{kind:?}");
            assert!(killed_by_sigsys(st), "{kind:?}: status {st:#x}");
        }
        // No kind may spawn a process.
        let (out, st) = in_child(
            ThreadKind::Vcpu,
            |_| true,
            // SAFETY: a fork-like clone (no CLONE_THREAD) the filter must stop.
            || unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) },
        );
        assert_eq!(out, b"A");
        assert!(killed_by_sigsys(st), "status {st:#x}");
    }
}
