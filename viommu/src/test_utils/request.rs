//! Requests as the spec structures, and the device's replies read back typed.

use super::error::MockError;
pub use crate::virtio::request::Request;
use crate::virtio::spec::{
    ProbeProperty, ProbeResvMem, ReqAttach, ReqDetach, ReqHead, ReqMap, ReqProbe, ReqTail,
    ReqUnmap, Status, ATTACH_F_BYPASS, PROBE_T_MASK, PROBE_T_NONE, PROBE_T_RESV_MEM, RESV_MEM_SIZE,
    TAIL_SIZE, T_ATTACH, T_DETACH, T_MAP, T_PROBE, T_UNMAP,
};
use vm_memory::ByteValued;

/// What a reply buffer holds before the device writes it (so an unwritten reply shows).
pub const REPLY_FILL: u8 = 0xaa;

fn head(req_type: u8) -> ReqHead {
    ReqHead {
        req_type,
        reserved: [0; 3],
    }
}

/// The driver's side of the typed requests the device parses ([`Request`]: the readable part of
/// the chain, as the spec structure).
impl Request {
    /// ATTACH `endpoint` to `domain` with ATTACH_F_* `flags` (unknown flags are sent as given).
    pub fn attach(domain: u32, endpoint: u32, flags: u32) -> Self {
        Request::Attach(ReqAttach {
            head: head(T_ATTACH),
            domain: domain.into(),
            endpoint: endpoint.into(),
            flags: flags.into(),
            reserved: [0; 4],
        })
    }

    /// ATTACH `endpoint` to the bypass (identity) domain `domain`.
    pub fn attach_bypass(domain: u32, endpoint: u32) -> Self {
        Self::attach(domain, endpoint, ATTACH_F_BYPASS)
    }

    /// DETACH `endpoint` from `domain`.
    pub fn detach(domain: u32, endpoint: u32) -> Self {
        Request::Detach(ReqDetach {
            head: head(T_DETACH),
            domain: domain.into(),
            endpoint: endpoint.into(),
            reserved: [0; 8],
        })
    }

    /// MAP IOVA `virt_start..=virt_end` of `domain` to GPA `phys_start..` with MAP_F_* `flags`.
    pub fn map(domain: u32, virt_start: u64, virt_end: u64, phys_start: u64, flags: u32) -> Self {
        Request::Map(ReqMap {
            head: head(T_MAP),
            domain: domain.into(),
            virt_start: virt_start.into(),
            virt_end: virt_end.into(),
            phys_start: phys_start.into(),
            flags: flags.into(),
        })
    }

    /// UNMAP IOVA `virt_start..=virt_end` of `domain`.
    pub fn unmap(domain: u32, virt_start: u64, virt_end: u64) -> Self {
        Request::Unmap(ReqUnmap {
            head: head(T_UNMAP),
            domain: domain.into(),
            virt_start: virt_start.into(),
            virt_end: virt_end.into(),
            reserved: [0; 4],
        })
    }

    /// PROBE `endpoint`.
    pub fn probe(endpoint: u32) -> Self {
        Request::Probe(ReqProbe {
            head: head(T_PROBE),
            endpoint: endpoint.into(),
            ..Default::default()
        })
    }

    /// The wire bytes of the readable part.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Request::Attach(r) => r.as_slice(),
            Request::Detach(r) => r.as_slice(),
            Request::Map(r) => r.as_slice(),
            Request::Unmap(r) => r.as_slice(),
            Request::Probe(r) => r.as_slice(),
        }
    }

    /// Bytes of the writable part: the tail, after `probe_size` bytes of properties for PROBE.
    pub fn reply_len(&self, probe_size: u32) -> u32 {
        let tail = TAIL_SIZE as u32;
        match self {
            Request::Probe(_) => probe_size.saturating_add(tail),
            _ => tail,
        }
    }
}

/// One PROBE property, read back from the reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Property {
    /// VIRTIO_IOMMU_PROBE_T_RESV_MEM: `start..=end` of RESV_MEM_T_* `subtype`.
    ResvMem {
        /// RESV_MEM_T_* subtype.
        subtype: u8,
        /// First address.
        start: u64,
        /// Last address (inclusive).
        end: u64,
    },
    /// Any other property: its type and the bytes following its header.
    Other {
        /// Property type (low 12 bits of the header's type field).
        ptype: u16,
        /// The property's body.
        body: Vec<u8>,
    },
}

/// What the device wrote back for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Used length of the completion.
    pub used_len: u32,
    /// The whole writable part after the completion (written or still [`REPLY_FILL`]).
    pub bytes: Vec<u8>,
}

impl Reply {
    /// The tail (the last bytes of the writable part), if the device wrote the reply.
    pub fn tail(&self) -> Option<ReqTail> {
        if self.used_len as usize != self.bytes.len() {
            return None;
        }
        let at = self.bytes.len().checked_sub(TAIL_SIZE)?;
        ReqTail::from_slice(&self.bytes[at..]).copied()
    }

    /// The status of the tail.
    pub fn status(&self) -> Result<Status, MockError> {
        let tail = self.tail().ok_or(MockError::Unanswered(self.used_len))?;
        Status::ALL
            .get(usize::from(tail.status))
            .copied()
            .ok_or(MockError::UnknownStatus(tail.status))
    }

    /// The PROBE properties before the tail, up to the first NONE property (or the end).
    pub fn properties(&self) -> Result<Vec<Property>, MockError> {
        self.tail().ok_or(MockError::Unanswered(self.used_len))?;
        let props = &self.bytes[..self.bytes.len() - TAIL_SIZE];
        let header = std::mem::size_of::<ProbeProperty>();
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(h) = props
            .get(at..at + header)
            .and_then(ProbeProperty::from_slice)
        {
            let ptype = u16::from(h.ptype) & PROBE_T_MASK;
            if ptype == PROBE_T_NONE {
                break;
            }
            let len = header + usize::from(u16::from(h.length));
            let Some(bytes) = props.get(at..at + len) else {
                break;
            };
            out.push(match ProbeResvMem::from_slice(bytes) {
                Some(r) if ptype == PROBE_T_RESV_MEM && len == RESV_MEM_SIZE => Property::ResvMem {
                    subtype: r.subtype,
                    start: r.start.into(),
                    end: r.end.into(),
                },
                _ => Property::Other {
                    ptype,
                    body: bytes[header..].to_vec(),
                },
            });
            at += len;
        }
        Ok(out)
    }
}
