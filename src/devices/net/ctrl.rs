//! The control queue of a virtio-net port: every command of a class we know (RX mode, MAC
//! table and address, VLAN filter, announce) is acknowledged, others refused; nothing changes
//! (the port delivers every frame).

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_VLAN,
    VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemory};

use super::stats::{bump, NetStats};
use crate::devices::virtio::{chain_descs, Buffers, ChainHandler, Desc};

/// Control classes we acknowledge: RX mode, MAC table/address, VLAN filter, announce.
const CTRL_CLASSES_OK: [u32; 4] = [
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_VLAN,
    VIRTIO_NET_CTRL_ANNOUNCE,
];

/// Serve one control command; returns the used length (1 for the ack byte, 0 if malformed).
fn ctrl_command<M: GuestMemory>(mem: &M, descs: &[Desc]) -> u32 {
    let first_w = descs.iter().position(|d| d.2).unwrap_or(descs.len());
    let ack_at = match descs.last() {
        Some(&(a, l, true)) if l > 0 && descs[first_w..].iter().all(|d| d.2) => a,
        _ => {
            virtio_dev::guest_warn!("virtio-net: control command without an ack byte");
            return 0;
        }
    };
    let mut class_cmd = [0u8; 2];
    let mut got = 0;
    for &(addr, len, _) in &descs[..first_w] {
        if got == 2 {
            break;
        }
        let n = (len as usize).min(2 - got);
        if mem.read_slice(&mut class_cmd[got..got + n], addr).is_err() {
            return 0;
        }
        got += n;
    }
    let ack = if got == 2 && CTRL_CLASSES_OK.contains(&u32::from(class_cmd[0])) {
        log::debug!(
            "virtio-net: control class {} cmd {}: ok",
            class_cmd[0],
            class_cmd[1]
        );
        VIRTIO_NET_OK as u8
    } else {
        log::debug!("virtio-net: control {class_cmd:?} ({got} bytes): refused");
        VIRTIO_NET_ERR as u8
    };
    match mem.write_obj(ack, ack_at) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

/// The control queue's chains (the device's handler for the shared serve loop).
pub(super) struct CtrlChains<'a> {
    /// The port's counters.
    pub stats: &'a NetStats,
    /// Scratch for one chain's descriptors.
    pub descs: &'a mut Vec<Desc>,
}

impl ChainHandler for CtrlChains<'_> {
    const DEVICE: &'static str = "virtio-net";

    fn chain<R: GuestMemory, B: Buffers>(
        &mut self,
        queue: &Queue,
        chain: DescriptorChain<&R>,
        bufs: &B,
    ) -> u32 {
        bump(&self.stats.ctrl_commands);
        chain_descs(queue, &chain, self.descs).map_or(0, |d| ctrl_command(bufs, d))
    }
}
