//! Keeps one VFIO interrupt index (MSI or MSI-X) pointing at the right eventfds.
//!
//! A deliverable vector signals its KVM irqfd directly: the hardware interrupt reaches the guest
//! without waking the VMM. VFIO cannot mask MSI/MSI-X vectors, so a vector the guest masks is
//! pointed at a private "pending" eventfd instead (as QEMU does); [`VfioIrqSync::harvest`]
//! reports the vectors that fired there so the emulation sets their pending bit, and
//! unmasking delivers them. Pending eventfds are only created for vectors that were
//! deliverable at least once since the index was enabled ("armed"), so a 2048-vector device
//! does not cost 2048 file descriptors up front.

use crate::vfio_backend::VfioBackend;
use log::debug;
use std::os::fd::{AsRawFd, RawFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What one vector should signal.
#[derive(Clone, Copy, Debug)]
pub enum Want<'a> {
    /// Deliverable: signal this irqfd.
    Deliver(&'a EventFd),
    /// Enabled but masked: record it as pending.
    Masked,
    /// Not in use.
    Off,
}

/// VFIO programming state of one interrupt index.
pub struct VfioIrqSync {
    index: u32,
    /// Vectors VFIO has enabled on this index, `None` while disabled.
    enabled: Option<usize>,
    /// The fd each vector signals now (-1: none).
    current: Vec<RawFd>,
    armed: Vec<bool>,
    pending_fds: Vec<Option<EventFd>>,
}

impl VfioIrqSync {
    /// State for VFIO interrupt index `index`, disabled.
    pub fn new(index: u32) -> Self {
        VfioIrqSync {
            index,
            enabled: None,
            current: Vec::new(),
            armed: Vec::new(),
            pending_fds: Vec::new(),
        }
    }

    /// Vectors enabled in VFIO, `None` if the index is disabled.
    pub fn enabled(&self) -> Option<usize> {
        self.enabled
    }

    /// The fd vector `v` signals now, if any.
    pub fn current_fd(&self, v: usize) -> Option<RawFd> {
        self.current.get(v).copied().filter(|&fd| fd >= 0)
    }

    /// Make VFIO match `want` (one entry per vector); an empty `want` disables the index.
    /// Failures are logged: the affected vectors keep their previous eventfd.
    pub fn sync(&mut self, backend: &dyn VfioBackend, want: &[Want]) {
        if want.is_empty() {
            self.disable(backend);
            return;
        }
        let n = want.len();
        if self.armed.len() != n {
            self.armed = vec![false; n];
            self.pending_fds = (0..n).map(|_| None).collect();
        }
        let mut fds = Vec::with_capacity(n);
        for (v, w) in want.iter().enumerate() {
            let fd = match w {
                Want::Deliver(fd) => {
                    self.armed[v] = true;
                    fd.as_raw_fd()
                }
                Want::Masked if self.armed[v] => self.pending_fd(v),
                Want::Masked | Want::Off => -1,
            };
            fds.push(fd);
        }
        if self.enabled != Some(n) {
            if self.enabled.is_some() {
                // MSI cannot change its vector count while enabled.
                self.disable_vfio(backend);
            }
            match backend.set_irq_eventfds(self.index, 0, &fds) {
                Ok(()) => {
                    debug!("vfio: irq index {} enabled with {n} vectors", self.index);
                    self.enabled = Some(n);
                    self.current = fds;
                }
                Err(e) => virtio_dev::guest_warn!(
                    "vfio: enabling irq index {} with {n} vectors failed: {e}",
                    self.index
                ),
            }
            return;
        }
        let mut v = 0;
        while v < n {
            if fds[v] == self.current[v] {
                v += 1;
                continue;
            }
            let start = v;
            while v < n && fds[v] != self.current[v] {
                v += 1;
            }
            match backend.set_irq_eventfds(self.index, start as u32, &fds[start..v]) {
                Ok(()) => self.current[start..v].copy_from_slice(&fds[start..v]),
                Err(e) => virtio_dev::guest_warn!(
                    "vfio: setting vectors {start}..{v} of irq index {} failed: {e}",
                    self.index
                ),
            }
        }
    }

    /// Vectors whose pending eventfd was signalled since the last call.
    pub fn harvest(&mut self) -> Vec<usize> {
        self.pending_fds
            .iter()
            .enumerate()
            .filter_map(|(v, fd)| match fd.as_ref()?.read() {
                Ok(n) if n > 0 => Some(v),
                _ => None,
            })
            .collect()
    }

    /// Disable the index in VFIO and forget every vector.
    pub fn disable(&mut self, backend: &dyn VfioBackend) {
        if self.enabled.is_some() {
            self.disable_vfio(backend);
        }
        self.armed.clear();
        self.pending_fds.clear();
    }

    fn disable_vfio(&mut self, backend: &dyn VfioBackend) {
        if let Err(e) = backend.disable_irq(self.index) {
            virtio_dev::guest_warn!("vfio: disabling irq index {} failed: {e}", self.index);
        }
        self.enabled = None;
        self.current.clear();
    }

    fn pending_fd(&mut self, v: usize) -> RawFd {
        if self.pending_fds[v].is_none() {
            match EventFd::new(EFD_NONBLOCK) {
                Ok(fd) => self.pending_fds[v] = Some(fd),
                Err(e) => virtio_dev::guest_warn!("vfio: no pending eventfd for vector {v}: {e}"),
            }
        }
        self.pending_fds[v].as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }
}
