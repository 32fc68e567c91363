//! An in-process Ethernet hub: every frame a port transmits is delivered to every other port
//! of the same hub (no learning, like QEMU's `-netdev hubport`). Delivery runs on the
//! transmitting thread (the vCPU that kicked the TX queue): no thread hop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};

use super::{Delivery, FrameSink, NetBackend};

/// One hub: its ports' sinks (weak: a dropped device leaves the hub).
#[derive(Default)]
pub struct Hub {
    ports: RwLock<Vec<(usize, Weak<dyn FrameSink>)>>,
    next: Mutex<usize>,
}

impl Hub {
    /// Join `sink` to the hub; frames sent through the returned port reach every other port.
    pub fn join(self: &Arc<Self>, sink: Weak<dyn FrameSink>) -> HubPort {
        let id = {
            let mut n = self.next.lock().unwrap_or_else(|e| e.into_inner());
            *n += 1;
            *n
        };
        let mut ports = self.ports.write().unwrap_or_else(|e| e.into_inner());
        ports.retain(|(_, s)| s.strong_count() > 0);
        ports.push((id, sink));
        HubPort {
            hub: self.clone(),
            id,
        }
    }

    /// Number of live ports.
    pub fn ports(&self) -> usize {
        let ports = self.ports.read().unwrap_or_else(|e| e.into_inner());
        ports.iter().filter(|(_, s)| s.strong_count() > 0).count()
    }

    /// Deliver `frames` to every port but `from`, each port taking the whole batch at once.
    fn broadcast_batch(&self, from: usize, frames: &[&[u8]]) {
        let ports = self.ports.read().unwrap_or_else(|e| e.into_inner());
        for (id, sink) in ports.iter() {
            if *id == from {
                continue;
            }
            if let Some(s) = sink.upgrade() {
                s.deliver_batch(frames);
            }
        }
    }

    /// Deliver `frame` to every port but `from`; returns how many ports took it (delivered or
    /// queued).
    fn broadcast(&self, from: usize, frame: &[u8]) -> usize {
        let ports = self.ports.read().unwrap_or_else(|e| e.into_inner());
        let mut taken = 0;
        for (id, sink) in ports.iter() {
            if *id == from {
                continue;
            }
            if let Some(s) = sink.upgrade() {
                if s.deliver(frame) != Delivery::Dropped {
                    taken += 1;
                }
            }
        }
        taken
    }
}

/// A device's connection to a [`Hub`].
pub struct HubPort {
    hub: Arc<Hub>,
    id: usize,
}

impl HubPort {
    /// The hub this port belongs to.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }
}

impl NetBackend for HubPort {
    fn transmit(&self, frame: &[u8]) {
        self.hub.broadcast(self.id, frame);
    }

    fn transmit_batch(&self, frames: &[&[u8]]) {
        self.hub.broadcast_batch(self.id, frames);
    }
}

/// The hubs of one machine, by name (`--net hub=ID`).
#[derive(Default)]
pub struct Hubs {
    hubs: Mutex<HashMap<String, Arc<Hub>>>,
}

impl Hubs {
    /// No hubs yet.
    pub fn new() -> Hubs {
        Hubs::default()
    }

    /// The hub named `id`, created on first use.
    pub fn get(&self, id: &str) -> Arc<Hub> {
        let mut hubs = self.hubs.lock().unwrap_or_else(|e| e.into_inner());
        hubs.entry(id.to_string()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(Mutex<Vec<Vec<u8>>>, Delivery);
    impl FrameSink for Collect {
        fn deliver(&self, frame: &[u8]) -> Delivery {
            self.0.lock().unwrap().push(frame.to_vec());
            self.1
        }
    }

    #[test]
    fn frames_reach_every_other_port_only() {
        let hubs = Hubs::new();
        let a = Arc::new(Collect(Mutex::new(vec![]), Delivery::Delivered));
        let b = Arc::new(Collect(Mutex::new(vec![]), Delivery::Delivered));
        let c = Arc::new(Collect(Mutex::new(vec![]), Delivery::Dropped));
        let other = Arc::new(Collect(Mutex::new(vec![]), Delivery::Delivered));
        let pa = hubs
            .get("0")
            .join(Arc::downgrade(&a) as Weak<dyn FrameSink>);
        let _pb = hubs
            .get("0")
            .join(Arc::downgrade(&b) as Weak<dyn FrameSink>);
        let _pc = hubs
            .get("0")
            .join(Arc::downgrade(&c) as Weak<dyn FrameSink>);
        let _po = hubs
            .get("1")
            .join(Arc::downgrade(&other) as Weak<dyn FrameSink>);
        assert_eq!(pa.hub().ports(), 3);
        assert_eq!(pa.hub().broadcast(pa.id, b"hello"), 1, "c dropped it");
        pa.transmit(b"again");
        assert!(a.0.lock().unwrap().is_empty(), "no echo to the sender");
        assert_eq!(
            *b.0.lock().unwrap(),
            vec![b"hello".to_vec(), b"again".to_vec()]
        );
        assert_eq!(c.0.lock().unwrap().len(), 2);
        assert!(
            other.0.lock().unwrap().is_empty(),
            "other hubs are separate"
        );
        drop(b);
        assert_eq!(pa.hub().ports(), 2, "a dropped device leaves the hub");
        pa.transmit(b"x");
        assert_eq!(c.0.lock().unwrap().len(), 3);
    }
}
