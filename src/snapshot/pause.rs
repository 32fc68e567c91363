//! Pausing the vCPUs: a [`PauseGate`] every vCPU thread registers with and checks between
//! `KVM_RUN`s. [`PauseGate::pause`] kicks every vCPU out of `KVM_RUN` (the VM's kick signal)
//! until all are parked; parked vCPUs run the jobs posted to them ([`PauseGate::on_each`]:
//! saving their state) on their own thread, and go on after [`PauseGate::resume`] (or leave
//! when the VM stops).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

/// How long [`PauseGate::pause`] waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why pausing (or a job on the parked vCPUs) failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    /// Not every vCPU parked in time (one is stuck outside `KVM_RUN`, e.g. in a device).
    #[error("{parked} of {running} vCPUs parked within {0:?}", PAUSE_TIMEOUT)]
    Timeout {
        /// vCPUs parked.
        parked: usize,
        /// vCPUs running.
        running: usize,
    },
    /// The VM is not paused (jobs run only on parked vCPUs).
    #[error("the VM is not paused")]
    NotPaused,
    /// The VM is already paused.
    #[error("the VM is already paused")]
    AlreadyPaused,
    /// The VM stopped meanwhile.
    #[error("the VM stopped")]
    Stopped,
}

/// What a job gave on one vCPU: its output, or why it failed.
pub type JobResult = Result<Vec<u8>, String>;

/// A job for every parked vCPU: (vCPU id, its fd) -> result text or error text.
type Job = std::sync::Arc<dyn Fn(u8, &VcpuFd) -> Result<Vec<u8>, String> + Send + Sync>;

#[derive(Default)]
struct Inner {
    paused: bool,
    stopped: bool,
    /// Registered vCPU threads (id, pthread).
    threads: Vec<(u8, libc::pthread_t)>,
    parked: Vec<u8>,
    job: Option<(u64, Job)>,
    /// Results of the current job, by vCPU.
    results: Vec<(u8, JobResult)>,
    job_seq: u64,
}

/// Shared by the vCPU threads and whoever pauses them (the API server).
#[derive(Default)]
pub struct PauseGate {
    requested: AtomicBool,
    inner: Mutex<Inner>,
    cv: Condvar,
}

impl std::fmt::Debug for PauseGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PauseGate")
            .field("requested", &self.requested.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by each vCPU thread before its first `KVM_RUN`.
    pub fn register(&self, id: u8) {
        // SAFETY: pthread_self has no preconditions and always succeeds.
        let me = unsafe { libc::pthread_self() };
        self.lock().threads.push((id, me));
    }

    /// Called by each vCPU thread when it leaves its run loop.
    pub fn unregister(&self, id: u8) {
        let mut g = self.lock();
        g.threads.retain(|(i, _)| *i != id);
        g.parked.retain(|i| *i != id);
        self.cv.notify_all();
    }

    /// Whether the vCPUs should park (checked by each vCPU between `KVM_RUN`s).
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Whether the VM is paused (every vCPU parked).
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// The VM stops: parked vCPUs leave, pausing fails from now on.
    pub fn stop(&self) {
        let mut g = self.lock();
        g.stopped = true;
        self.requested.store(false, Ordering::Release);
        self.cv.notify_all();
    }

    /// Park vCPU `id` until resumed (or the VM stops), running the jobs posted meanwhile.
    pub fn park(&self, id: u8, fd: &VcpuFd) {
        let mut g = self.lock();
        if !g.parked.contains(&id) {
            g.parked.push(id);
        }
        self.cv.notify_all();
        let mut done = 0u64;
        while self.requested() && !g.stopped {
            if let Some((seq, job)) = g.job.clone() {
                if seq != done {
                    done = seq;
                    drop(g);
                    let r = job(id, fd);
                    g = self.lock();
                    if g.job.as_ref().is_some_and(|(s, _)| *s == seq) {
                        g.results.push((id, r));
                        self.cv.notify_all();
                    }
                    continue;
                }
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.parked.retain(|i| *i != id);
    }

    /// Kick every vCPU out of `KVM_RUN` with `signal` until all are parked.
    pub fn pause(&self, signal: libc::c_int) -> Result<(), PauseError> {
        {
            let g = self.lock();
            if g.stopped {
                return Err(PauseError::Stopped);
            }
            if g.paused {
                return Err(PauseError::AlreadyPaused);
            }
        }
        self.requested.store(true, Ordering::Release);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            let g = self.lock();
            if g.stopped {
                drop(g);
                self.requested.store(false, Ordering::Release);
                return Err(PauseError::Stopped);
            }
            let all = g.threads.iter().all(|(i, _)| g.parked.contains(i));
            if all {
                drop(g);
                self.lock().paused = true;
                return Ok(());
            }
            if Instant::now() > deadline {
                let (parked, running) = (g.parked.len(), g.threads.len());
                drop(g);
                self.resume_unchecked();
                return Err(PauseError::Timeout { parked, running });
            }
            for (i, t) in &g.threads {
                if !g.parked.contains(i) {
                    // SAFETY: `t` is a live vCPU thread (it unregisters before it exits, under
                    // this lock); the kick signal has a no-op handler installed by run_vcpus.
                    unsafe { libc::pthread_kill(*t, signal) };
                }
            }
            let _ = self
                .cv
                .wait_timeout(g, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    fn resume_unchecked(&self) {
        let mut g = self.lock();
        g.paused = false;
        g.job = None;
        g.results.clear();
        self.requested.store(false, Ordering::Release);
        self.cv.notify_all();
    }

    /// Let the parked vCPUs run again.
    pub fn resume(&self) -> Result<(), PauseError> {
        if !self.is_paused() {
            return Err(PauseError::NotPaused);
        }
        self.resume_unchecked();
        Ok(())
    }

    /// Run `job` on every parked vCPU (on its own thread); the results by vCPU id.
    pub fn on_each(
        &self,
        job: impl Fn(u8, &VcpuFd) -> Result<Vec<u8>, String> + Send + Sync + 'static,
    ) -> Result<Vec<(u8, JobResult)>, PauseError> {
        let mut g = self.lock();
        if !g.paused {
            return Err(PauseError::NotPaused);
        }
        g.job_seq += 1;
        let seq = g.job_seq;
        g.job = Some((seq, std::sync::Arc::new(job)));
        g.results.clear();
        self.cv.notify_all();
        while g.results.len() < g.threads.len() {
            if g.stopped {
                return Err(PauseError::Stopped);
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.job = None;
        let mut out = std::mem::take(&mut g.results);
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }
}
