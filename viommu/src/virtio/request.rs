//! Parsing one request-queue chain into a typed request, with exact-length checks. Nothing read
//! from guest memory is trusted after this point; a chain that does not parse is returned
//! unwritten with used length 0.

use crate::virtio::spec::{
    ReqAttach, ReqDetach, ReqHead, ReqMap, ReqProbe, ReqUnmap, TAIL_SIZE, T_ATTACH, T_DETACH,
    T_MAP, T_PROBE, T_UNMAP,
};
use std::mem::size_of;
use std::ops::Deref;
use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory};

/// Largest readable part of any request (PROBE).
const MAX_READABLE: usize = size_of::<ReqProbe>();
/// Writable descriptors accepted in one chain.
const MAX_WRITE_SEGS: usize = 8;

/// A request of the right size for its type (the rules check its reserved fields).
#[derive(Clone, Copy, Debug)]
pub enum Request {
    /// ATTACH.
    Attach(ReqAttach),
    /// DETACH.
    Detach(ReqDetach),
    /// MAP.
    Map(ReqMap),
    /// UNMAP.
    Unmap(ReqUnmap),
    /// PROBE.
    Probe(ReqProbe),
}

impl Request {
    /// Whether the header's reserved bytes are zero.
    pub fn head_reserved_zero(&self) -> bool {
        let head = match self {
            Request::Attach(r) => r.head,
            Request::Detach(r) => r.head,
            Request::Map(r) => r.head,
            Request::Unmap(r) => r.head,
            Request::Probe(r) => r.head,
        };
        head.reserved == [0; 3]
    }
}

/// Why a chain could not be parsed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A readable descriptor follows a writable one.
    #[error("readable descriptor after a writable one")]
    WrongDirection,
    /// The readable part is larger than any request of its type.
    #[error("readable part too long")]
    Oversized,
    /// The readable part does not have the exact size of its type.
    #[error("readable part is {got} bytes, type {req_type} needs {want}")]
    BadLength {
        /// Request type.
        req_type: u8,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The writable part does not have the exact size the request needs.
    #[error("writable part is {got} bytes, {want} needed")]
    BadWritable {
        /// Bytes received.
        got: u64,
        /// Bytes expected.
        want: u64,
    },
    /// Too many writable descriptors.
    #[error("too many writable descriptors")]
    TooManySegments,
    /// Unknown request type.
    #[error("unknown request type {0}")]
    UnknownType(u8),
    /// A descriptor points outside guest memory.
    #[error("descriptor outside guest memory")]
    Memory,
    /// A PROBE though the driver did not negotiate VIRTIO_IOMMU_F_PROBE.
    #[error("PROBE without VIRTIO_IOMMU_F_PROBE")]
    ProbeNotNegotiated,
}

/// The writable part of a chain: where the reply goes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reply {
    segs: [(u64, u32); MAX_WRITE_SEGS],
    n: usize,
    total: u64,
}

impl Reply {
    /// Total writable bytes.
    pub fn len(&self) -> u64 {
        self.total
    }

    fn push(&mut self, addr: u64, len: u32) -> Result<(), ParseError> {
        if len == 0 {
            return Ok(());
        }
        if self.n == MAX_WRITE_SEGS {
            return Err(ParseError::TooManySegments);
        }
        self.segs[self.n] = (addr, len);
        self.n += 1;
        self.total += u64::from(len);
        Ok(())
    }

    /// Write `data` from the start of the writable part, across descriptors.
    pub fn write<M: GuestMemory + ?Sized>(&self, mem: &M, data: &[u8]) -> Result<(), ParseError> {
        let mut done = 0usize;
        for &(addr, len) in &self.segs[..self.n] {
            if done == data.len() {
                break;
            }
            let n = (len as usize).min(data.len() - done);
            mem.write_slice(&data[done..done + n], GuestAddress(addr))
                .map_err(|_| ParseError::Memory)?;
            done += n;
        }
        if done == data.len() {
            Ok(())
        } else {
            Err(ParseError::BadWritable {
                got: self.total,
                want: data.len() as u64,
            })
        }
    }
}

fn exact<T: ByteValued>(req_type: u8, buf: &[u8]) -> Result<T, ParseError> {
    let want = size_of::<T>();
    if buf.len() != want {
        return Err(ParseError::BadLength {
            req_type,
            got: buf.len(),
            want,
        });
    }
    T::from_slice(buf).copied().ok_or(ParseError::BadLength {
        req_type,
        got: buf.len(),
        want,
    })
}

/// Parse `chain`: readable descriptors then writable ones; the readable part must be exactly
/// the size of its type and the writable part exactly the tail (PROBE: `probe_size` + tail).
/// `probe_size` is `None` when PROBE was not negotiated.
pub fn parse<M>(
    chain: DescriptorChain<M>,
    probe_size: Option<u32>,
) -> Result<(Request, Reply), ParseError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mem = chain.memory();
    let mut buf = [0u8; MAX_READABLE];
    let mut filled = 0usize;
    let mut reply = Reply::default();
    let mut in_writable = false;
    let mut oversized = false;
    for desc in chain.clone() {
        if desc.is_write_only() {
            in_writable = true;
            reply.push(desc.addr().0, desc.len())?;
            continue;
        }
        if in_writable {
            return Err(ParseError::WrongDirection);
        }
        let len = desc.len() as usize;
        if oversized || len > MAX_READABLE - filled {
            oversized = true;
            continue;
        }
        mem.read_slice(&mut buf[filled..filled + len], desc.addr())
            .map_err(|_| ParseError::Memory)?;
        filled += len;
    }
    if oversized {
        return Err(ParseError::Oversized);
    }
    let body = &buf[..filled];
    let head = ReqHead::from_slice(body.get(..size_of::<ReqHead>()).ok_or(
        ParseError::BadLength {
            req_type: 0,
            got: filled,
            want: size_of::<ReqHead>(),
        },
    )?)
    .copied()
    .ok_or(ParseError::Memory)?;
    let t = head.req_type;
    let (req, want_writable) = match t {
        T_ATTACH => (Request::Attach(exact(t, body)?), TAIL_SIZE as u64),
        T_DETACH => (Request::Detach(exact(t, body)?), TAIL_SIZE as u64),
        T_MAP => (Request::Map(exact(t, body)?), TAIL_SIZE as u64),
        T_UNMAP => (Request::Unmap(exact(t, body)?), TAIL_SIZE as u64),
        T_PROBE => {
            let size = probe_size.ok_or(ParseError::ProbeNotNegotiated)?;
            (
                Request::Probe(exact(t, body)?),
                u64::from(size) + TAIL_SIZE as u64,
            )
        }
        other => return Err(ParseError::UnknownType(other)),
    };
    if reply.len() != want_writable {
        return Err(ParseError::BadWritable {
            got: reply.len(),
            want: want_writable,
        });
    }
    Ok((req, reply))
}
