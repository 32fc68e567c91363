//! GSI-backed interrupt vectors, shared by MSI and MSI-X: a vector gets its GSI from the VMM's
//! [`MsiIrqManager`] on first use, is routed to the message the guest programmed, raised by
//! writing its irqfd, and released (route removed) when the owner is dropped.

use crate::irq::{MsiIrqManager, MsiMessage, MsiVector};
use log::{debug, warn};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// The vectors of one MSI or MSI-X capability and the route each currently has.
pub(crate) struct VectorRoutes {
    vectors: Vec<Option<MsiVector>>,
    routes: Vec<Option<MsiMessage>>,
    msi: Arc<dyn MsiIrqManager>,
    /// "msi" or "msix", for log lines.
    label: &'static str,
}

impl VectorRoutes {
    /// `count` vectors, none allocated yet.
    pub(crate) fn new(count: usize, msi: Arc<dyn MsiIrqManager>, label: &'static str) -> Self {
        VectorRoutes {
            vectors: (0..count).map(|_| None).collect(),
            routes: vec![None; count],
            msi,
            label,
        }
    }

    /// The route of vector `v` (`None` when unrouted or out of range).
    pub(crate) fn route(&self, v: usize) -> Option<MsiMessage> {
        self.routes.get(v).copied().flatten()
    }

    /// The irqfd of vector `v` if it is routed.
    pub(crate) fn routed_irqfd(&self, v: usize) -> Option<&EventFd> {
        self.route(v)?;
        self.vectors[v].as_ref().map(|vector| &vector.irqfd)
    }

    /// The GSI allocated to vector `v`, if any.
    #[cfg(test)]
    pub(crate) fn gsi(&self, v: usize) -> Option<u32> {
        self.vectors.get(v)?.as_ref().map(|vector| vector.gsi)
    }

    /// Program the route of vector `v`, allocating its GSI on first use. False on failure.
    pub(crate) fn set_route(&mut self, v: usize, msg: Option<MsiMessage>) -> bool {
        if self.vectors[v].is_none() {
            if msg.is_none() {
                return true;
            }
            match self.msi.allocate() {
                Ok(vector) => self.vectors[v] = Some(vector),
                Err(e) => {
                    virtio_dev::guest_warn!(
                        "{}: cannot allocate a GSI for vector {v}: {e}",
                        self.label
                    );
                    return false;
                }
            }
        }
        let Some(vector) = &self.vectors[v] else {
            return false;
        };
        match self.msi.set_route(vector.gsi, msg) {
            Ok(()) => {
                self.routes[v] = msg;
                true
            }
            Err(e) => {
                virtio_dev::guest_warn!(
                    "{}: cannot route vector {v} (gsi {}): {e}",
                    self.label,
                    vector.gsi
                );
                self.routes[v] = None;
                false
            }
        }
    }

    /// Program the routes of several vectors (`(vector, route)`), allocating GSIs on first use,
    /// in one [`MsiIrqManager::set_routes`] commit; vectors whose route would not change are
    /// left alone (no commit at all when none changes). If the batch is refused, each vector
    /// is retried alone (as [`VectorRoutes::set_route`]), so one bad vector does not keep the
    /// others unrouted.
    pub(crate) fn set_routes(&mut self, changes: &[(usize, Option<MsiMessage>)]) {
        let mut batch = Vec::with_capacity(changes.len());
        let mut vectors = Vec::with_capacity(changes.len());
        for &(v, msg) in changes {
            if v >= self.vectors.len() || self.routes[v] == msg {
                continue;
            }
            if self.vectors[v].is_none() {
                if msg.is_none() {
                    continue;
                }
                match self.msi.allocate() {
                    Ok(vector) => self.vectors[v] = Some(vector),
                    Err(e) => {
                        virtio_dev::guest_warn!(
                            "{}: cannot allocate a GSI for vector {v}: {e}",
                            self.label
                        );
                        continue;
                    }
                }
            }
            if let Some(vector) = &self.vectors[v] {
                batch.push((vector.gsi, msg));
                vectors.push((v, msg));
            }
        }
        match batch.len() {
            0 => {}
            1 => {
                let (v, msg) = vectors[0];
                self.set_route(v, msg);
            }
            _ => match self.msi.set_routes(&batch) {
                Ok(()) => {
                    for (v, msg) in vectors {
                        self.routes[v] = msg;
                    }
                }
                Err(e) => {
                    debug!(
                        "{}: batched route change refused ({e}); one by one",
                        self.label
                    );
                    for (v, msg) in vectors {
                        self.set_route(v, msg);
                    }
                }
            },
        }
    }

    /// Raise vector `v` through its irqfd. False, and nothing done, when it has no GSI or no
    /// route: the caller keeps it pending and the next [`VectorRoutes::set_route`] (on a vCPU,
    /// after a guest write) retries. Raising never allocates or routes: device worker threads
    /// raise vectors, and their seccomp filters allow neither eventfd creation nor KVM ioctls.
    pub(crate) fn fire(&mut self, v: usize) -> bool {
        let Some(vector) = self.vectors[v]
            .as_ref()
            .filter(|_| self.routes[v].is_some())
        else {
            debug!(
                "{}: vector {v} raised without a route, left pending",
                self.label
            );
            return false;
        };
        if let Err(e) = vector.irqfd.write(1) {
            virtio_dev::guest_warn!("{}: irqfd write for vector {v} failed: {e}", self.label);
        }
        true
    }
}

impl Drop for VectorRoutes {
    fn drop(&mut self) {
        for (v, vector) in self.vectors.iter_mut().enumerate() {
            if let Some(vector) = vector.take() {
                if self.routes[v].is_some() {
                    if let Err(e) = self.msi.set_route(vector.gsi, None) {
                        warn!(
                            "{}: cannot remove route of gsi {}: {e}",
                            self.label, vector.gsi
                        );
                    }
                }
                self.msi.release(vector);
            }
        }
    }
}
