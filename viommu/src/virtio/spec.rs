//! virtio-iommu wire format (virtio 1.2/1.3 §5.13): constants and the little-endian structures
//! the driver and the device exchange. Everything here is plain data.

use vm_memory::{ByteValued, Le16, Le32, Le64};

/// Virtio device ID of the IOMMU.
pub use virtio_bindings::virtio_ids::VIRTIO_ID_IOMMU;
/// Index of the request queue.
pub const REQUEST_QUEUE: u16 = 0;
/// Index of the event queue.
pub const EVENT_QUEUE: u16 = 1;

/// `VIRTIO_F_VERSION_1`.
pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_IOMMU_F_INPUT_RANGE`.
pub const F_INPUT_RANGE: u32 = 0;
/// `VIRTIO_IOMMU_F_DOMAIN_RANGE`.
pub const F_DOMAIN_RANGE: u32 = 1;
/// `VIRTIO_IOMMU_F_MAP_UNMAP`.
pub const F_MAP_UNMAP: u32 = 2;
/// `VIRTIO_IOMMU_F_BYPASS` (legacy; never offered).
pub const F_BYPASS: u32 = 3;
/// `VIRTIO_IOMMU_F_PROBE`.
pub const F_PROBE: u32 = 4;
/// `VIRTIO_IOMMU_F_MMIO`.
pub const F_MMIO: u32 = 5;
/// `VIRTIO_IOMMU_F_BYPASS_CONFIG`.
pub const F_BYPASS_CONFIG: u32 = 6;

/// Request types.
pub const T_ATTACH: u8 = 1;
/// DETACH request type.
pub const T_DETACH: u8 = 2;
/// MAP request type.
pub const T_MAP: u8 = 3;
/// UNMAP request type.
pub const T_UNMAP: u8 = 4;
/// PROBE request type.
pub const T_PROBE: u8 = 5;

/// ATTACH flag: the domain is a bypass (identity) domain.
pub const ATTACH_F_BYPASS: u32 = 1 << 0;

/// MAP flag: reads allowed.
pub const MAP_F_READ: u32 = 1 << 0;
/// MAP flag: writes allowed.
pub const MAP_F_WRITE: u32 = 1 << 1;
/// MAP flag: the target is MMIO (only with F_MMIO).
pub const MAP_F_MMIO: u32 = 1 << 2;
/// All MAP flags this device knows.
pub const MAP_F_MASK: u32 = MAP_F_READ | MAP_F_WRITE | MAP_F_MMIO;

/// PROBE property: end of list.
pub const PROBE_T_NONE: u16 = 0;
/// PROBE property: reserved memory region.
pub const PROBE_T_RESV_MEM: u16 = 1;
/// Bits of the property type field that hold the type.
pub const PROBE_T_MASK: u16 = 0xfff;

/// RESV_MEM subtype: the driver must not map this range.
pub const RESV_MEM_T_RESERVED: u8 = 0;
/// RESV_MEM subtype: MSI doorbell, translated by the platform.
pub const RESV_MEM_T_MSI: u8 = 1;

/// Fault reasons.
pub const FAULT_R_UNKNOWN: u8 = 0;
/// The endpoint is not attached to a domain (and may not bypass).
pub const FAULT_R_DOMAIN: u8 = 1;
/// No mapping, or the mapping forbids the access.
pub const FAULT_R_MAPPING: u8 = 2;
/// Fault flag: read access.
pub const FAULT_F_READ: u32 = 1 << 0;
/// Fault flag: write access.
pub const FAULT_F_WRITE: u32 = 1 << 1;
/// Fault flag: `address` is valid.
pub const FAULT_F_ADDRESS: u32 = 1 << 8;

/// Request status values written to the tail.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// Generic I/O error.
    IoErr = 1,
    /// Request unsupported.
    Unsupp = 2,
    /// Internal device error.
    DevErr = 3,
    /// Invalid parameters.
    Inval = 4,
    /// Out of range.
    Range = 5,
    /// Entity not found.
    NoEnt = 6,
    /// Bad address.
    Fault = 7,
    /// Insufficient resources.
    NoMem = 8,
}

impl Status {
    /// Number of status values.
    pub const COUNT: usize = 9;
    /// Every status, indexed by its wire value.
    pub const ALL: [Status; Status::COUNT] = [
        Status::Ok,
        Status::IoErr,
        Status::Unsupp,
        Status::DevErr,
        Status::Inval,
        Status::Range,
        Status::NoEnt,
        Status::Fault,
        Status::NoMem,
    ];
}

/// `struct virtio_iommu_req_head`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReqHead {
    /// Request type.
    pub req_type: u8,
    /// Must be zero.
    pub reserved: [u8; 3],
}

/// `struct virtio_iommu_req_tail`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReqTail {
    /// Status value.
    pub status: u8,
    /// Written as zero.
    pub reserved: [u8; 3],
}

/// Readable part of an ATTACH request.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReqAttach {
    /// Header.
    pub head: ReqHead,
    /// Domain ID.
    pub domain: Le32,
    /// Endpoint ID.
    pub endpoint: Le32,
    /// ATTACH_F_* flags.
    pub flags: Le32,
    /// Must be zero.
    pub reserved: [u8; 4],
}

/// Readable part of a DETACH request.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReqDetach {
    /// Header.
    pub head: ReqHead,
    /// Domain ID.
    pub domain: Le32,
    /// Endpoint ID.
    pub endpoint: Le32,
    /// Must be zero.
    pub reserved: [u8; 8],
}

/// Readable part of a MAP request.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReqMap {
    /// Header.
    pub head: ReqHead,
    /// Domain ID.
    pub domain: Le32,
    /// First IOVA.
    pub virt_start: Le64,
    /// Last IOVA (inclusive).
    pub virt_end: Le64,
    /// First guest-physical address.
    pub phys_start: Le64,
    /// MAP_F_* flags.
    pub flags: Le32,
}

/// Readable part of an UNMAP request.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReqUnmap {
    /// Header.
    pub head: ReqHead,
    /// Domain ID.
    pub domain: Le32,
    /// First IOVA.
    pub virt_start: Le64,
    /// Last IOVA (inclusive).
    pub virt_end: Le64,
    /// Must be zero.
    pub reserved: [u8; 4],
}

/// Readable part of a PROBE request.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug)]
pub struct ReqProbe {
    /// Header.
    pub head: ReqHead,
    /// Endpoint ID.
    pub endpoint: Le32,
    /// Must be zero.
    pub reserved: [u8; 64],
}

impl Default for ReqProbe {
    fn default() -> Self {
        ReqProbe {
            head: ReqHead::default(),
            endpoint: Le32::default(),
            reserved: [0; 64],
        }
    }
}

/// Header of a PROBE property.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbeProperty {
    /// Property type (low 12 bits).
    pub ptype: Le16,
    /// Bytes following this 4-byte header.
    pub length: Le16,
}

/// `struct virtio_iommu_probe_resv_mem` (24 bytes, including the property header).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbeResvMem {
    /// Header with type RESV_MEM and length 20.
    pub head: ProbeProperty,
    /// RESV_MEM_T_* subtype.
    pub subtype: u8,
    /// Zero.
    pub reserved: [u8; 3],
    /// First address.
    pub start: Le64,
    /// Last address (inclusive).
    pub end: Le64,
}

/// `struct virtio_iommu_fault`, the event queue record.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultRecord {
    /// FAULT_R_* reason.
    pub reason: u8,
    /// Zero.
    pub reserved: [u8; 3],
    /// FAULT_F_* flags.
    pub flags: Le32,
    /// Endpoint ID.
    pub endpoint: Le32,
    /// Zero.
    pub reserved1: [u8; 4],
    /// Faulting address (valid with FAULT_F_ADDRESS).
    pub address: Le64,
}

/// `struct virtio_iommu_config` (40 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IommuConfig {
    /// Supported page sizes; the lowest bit is the granule.
    pub page_size_mask: Le64,
    /// First valid IOVA.
    pub input_start: Le64,
    /// Last valid IOVA.
    pub input_end: Le64,
    /// First valid domain ID.
    pub domain_start: Le32,
    /// Last valid domain ID.
    pub domain_end: Le32,
    /// Size of the PROBE property buffer.
    pub probe_size: Le32,
    /// Unattached endpoints bypass the IOMMU when 1.
    pub bypass: u8,
    /// Zero.
    pub reserved: [u8; 3],
}

/// Byte offset of `bypass` in [`IommuConfig`].
pub const CONFIG_BYPASS_OFFSET: u64 = 36;

// SAFETY: all the structures below are `repr(C, packed)` aggregates of integers and byte
// arrays: no padding, no invalid bit patterns, no pointers.
unsafe impl ByteValued for ReqHead {}
// SAFETY: see above.
unsafe impl ByteValued for ReqTail {}
// SAFETY: see above.
unsafe impl ByteValued for ReqAttach {}
// SAFETY: see above.
unsafe impl ByteValued for ReqDetach {}
// SAFETY: see above.
unsafe impl ByteValued for ReqMap {}
// SAFETY: see above.
unsafe impl ByteValued for ReqUnmap {}
// SAFETY: see above.
unsafe impl ByteValued for ReqProbe {}
// SAFETY: see above.
unsafe impl ByteValued for ProbeProperty {}
// SAFETY: see above.
unsafe impl ByteValued for ProbeResvMem {}
// SAFETY: see above.
unsafe impl ByteValued for FaultRecord {}
// SAFETY: see above.
unsafe impl ByteValued for IommuConfig {}

/// Bytes of the tail of every request.
pub const TAIL_SIZE: usize = std::mem::size_of::<ReqTail>();
/// Bytes of one RESV_MEM property.
pub const RESV_MEM_SIZE: usize = std::mem::size_of::<ProbeResvMem>();
/// Bytes of one fault record.
pub const FAULT_SIZE: usize = std::mem::size_of::<FaultRecord>();

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn wire_sizes_match_the_spec() {
        assert_eq!(size_of::<ReqHead>(), 4);
        assert_eq!(size_of::<ReqTail>(), 4);
        assert_eq!(size_of::<ReqAttach>(), 20);
        assert_eq!(size_of::<ReqDetach>(), 20);
        assert_eq!(size_of::<ReqMap>(), 36);
        assert_eq!(size_of::<ReqUnmap>(), 28);
        assert_eq!(size_of::<ReqProbe>(), 72);
        assert_eq!(size_of::<ProbeResvMem>(), 24);
        assert_eq!(size_of::<FaultRecord>(), 24);
        assert_eq!(size_of::<IommuConfig>(), 40);
    }

    #[test]
    fn config_bypass_offset() {
        let c = IommuConfig {
            bypass: 0xab,
            ..Default::default()
        };
        assert_eq!(c.as_slice()[CONFIG_BYPASS_OFFSET as usize], 0xab);
    }
}
