//! The ACPI VIOT table (Virtual I/O Translation): tells the guest which PCI function is the
//! virtio-iommu and which endpoints translate through it.
//!
//! Layout (ACPI 6.4 §5.2.31, Linux `drivers/acpi/viot.c`): the 36-byte header, `node_count`
//! (u16), `node_offset` (u16, 48), 8 reserved bytes, then the nodes. We emit one
//! virtio-pci IOMMU node (type 3, 16 bytes) at offset 48 and one PCI-range node (type 1, 24
//! bytes) per endpoint, each covering exactly that BDF with `endpoint_start = BDF` (so the
//! endpoint ID the guest uses in ATTACH/PROBE is the BDF) and `output_node = 48`.

use crate::acpi::fix_checksum;

/// Offset of the first node (right after the VIOT header).
pub const NODE_OFFSET: u16 = 48;
/// Size of a virtio-pci IOMMU node.
pub const IOMMU_NODE_LEN: u16 = 16;
/// Size of a PCI-range node.
pub const PCI_RANGE_NODE_LEN: u16 = 24;
/// Node type of a PCI range.
pub const NODE_PCI_RANGE: u8 = 1;
/// Node type of a virtio-pci IOMMU.
pub const NODE_VIRTIO_IOMMU_PCI: u8 = 3;

use crate::acpi::OEM_ID;
const OEM_TABLE_ID: [u8; 8] = *b"VMMVIOT ";

/// A PCI function on segment 0 as `bus << 8 | device << 3 | function`.
pub fn bdf(bus: u8, device: u8, function: u8) -> u16 {
    (u16::from(bus) << 8) | (u16::from(device & 0x1f) << 3) | u16::from(function & 7)
}

/// Build a VIOT (header and checksum included) for a virtio-pci IOMMU at `iommu_bdf` and the
/// endpoints `endpoints` (BDFs on segment 0) behind it. Duplicates and the IOMMU's own BDF
/// are skipped (the IOMMU never translates itself).
pub fn build(iommu_bdf: u16, endpoints: &[u16]) -> Vec<u8> {
    let mut eps: Vec<u16> = endpoints
        .iter()
        .copied()
        .filter(|&e| e != iommu_bdf)
        .collect();
    eps.sort_unstable();
    eps.dedup();

    let mut t = Vec::with_capacity(
        usize::from(NODE_OFFSET)
            + usize::from(IOMMU_NODE_LEN)
            + eps.len() * usize::from(PCI_RANGE_NODE_LEN),
    );
    // Standard header: signature, length (patched below), revision 0, checksum (patched).
    t.extend_from_slice(b"VIOT");
    t.extend_from_slice(&0u32.to_le_bytes());
    t.push(0);
    t.push(0);
    t.extend_from_slice(&OEM_ID);
    t.extend_from_slice(&OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"RVMM"); // creator ID
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    debug_assert_eq!(t.len(), 36);
    // 1 IOMMU node + one range per endpoint; at most 1 + 65536, saturate rather than wrap.
    let count = u16::try_from(1 + eps.len()).unwrap_or(u16::MAX);
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&NODE_OFFSET.to_le_bytes());
    t.extend_from_slice(&[0; 8]);

    // Virtio-pci IOMMU node: type, reserved, length, segment, bdf, reserved[8].
    let iommu_offset = t.len() as u16;
    t.push(NODE_VIRTIO_IOMMU_PCI);
    t.push(0);
    t.extend_from_slice(&IOMMU_NODE_LEN.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes());
    t.extend_from_slice(&iommu_bdf.to_le_bytes());
    t.extend_from_slice(&[0; 8]);

    for ep in eps.iter().take(usize::from(count) - 1) {
        // PCI range: type, reserved, length, endpoint_start, segment_start, segment_end,
        // bdf_start, bdf_end, output_node, reserved[6].
        t.push(NODE_PCI_RANGE);
        t.push(0);
        t.extend_from_slice(&PCI_RANGE_NODE_LEN.to_le_bytes());
        t.extend_from_slice(&u32::from(*ep).to_le_bytes());
        t.extend_from_slice(&0u16.to_le_bytes());
        t.extend_from_slice(&0u16.to_le_bytes());
        t.extend_from_slice(&ep.to_le_bytes());
        t.extend_from_slice(&ep.to_le_bytes());
        t.extend_from_slice(&iommu_offset.to_le_bytes());
        t.extend_from_slice(&[0; 6]);
    }
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    fix_checksum(&mut t);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// Walk the nodes the way Linux's viot.c does; returns (type, offset, bytes).
    fn nodes(t: &[u8]) -> Vec<(u8, usize, &[u8])> {
        let count = u16_at(t, 36);
        let mut off = usize::from(u16_at(t, 38));
        let mut out = Vec::new();
        for _ in 0..count {
            let len = usize::from(u16_at(t, off + 2));
            assert!(len >= 4 && off + len <= t.len(), "node at {off} overruns");
            out.push((t[off], off, &t[off..off + len]));
            off += len;
        }
        assert_eq!(off, t.len(), "trailing bytes after the nodes");
        out
    }

    /// What Linux computes for a PCI device on segment `seg`: the first range node containing
    /// it gives ((seg - seg_start) << 16) + bdf - bdf_start + endpoint_start, and the node
    /// offset of its IOMMU.
    fn linux_endpoint_id(t: &[u8], seg: u16, dev: u16) -> Option<(u32, u16)> {
        nodes(t).into_iter().find_map(|(ty, _, n)| {
            if ty != NODE_PCI_RANGE {
                return None;
            }
            let (ep_start, seg_s, seg_e) = (u32_at(n, 4), u16_at(n, 8), u16_at(n, 10));
            let (bdf_s, bdf_e, out) = (u16_at(n, 12), u16_at(n, 14), u16_at(n, 16));
            if !(seg_s..=seg_e).contains(&seg) || !(bdf_s..=bdf_e).contains(&dev) {
                return None;
            }
            let id = (u32::from(seg - seg_s) << 16) + u32::from(dev - bdf_s) + ep_start;
            Some((id, out))
        })
    }

    #[test]
    fn header_checksum_and_length() {
        let t = build(bdf(0, 1, 0), &[bdf(0, 2, 0), bdf(0, 3, 0)]);
        assert_eq!(&t[..4], b"VIOT");
        assert_eq!(u32_at(&t, 4) as usize, t.len());
        assert_eq!(t.len(), 48 + 16 + 2 * 24);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(u16_at(&t, 36), 3, "node_count");
        assert_eq!(u16_at(&t, 38), NODE_OFFSET);
        assert_eq!(&t[40..48], &[0; 8]);
    }

    #[test]
    fn iommu_node_then_one_range_per_endpoint() {
        let iommu = bdf(0, 1, 0);
        let t = build(iommu, &[bdf(0, 3, 0), bdf(0, 2, 0)]);
        let n = nodes(&t);
        assert_eq!(n.len(), 3);
        // The IOMMU node at 48: type 3, length 16, segment 0, its BDF, reserved zero.
        let (ty, off, node) = n[0];
        assert_eq!((ty, off, node.len()), (NODE_VIRTIO_IOMMU_PCI, 48, 16));
        assert_eq!(u16_at(node, 4), 0);
        assert_eq!(u16_at(node, 6), 0x08);
        assert_eq!(&node[8..], &[0; 8]);
        // Range nodes at 64 and 88, sorted by BDF, each exactly one function.
        for (i, want) in [(1, bdf(0, 2, 0)), (2, bdf(0, 3, 0))] {
            let (ty, off, node) = n[i];
            assert_eq!(
                (ty, off, node.len()),
                (NODE_PCI_RANGE, 64 + (i - 1) * 24, 24)
            );
            assert_eq!(u32_at(node, 4), u32::from(want), "endpoint_start = BDF");
            assert_eq!((u16_at(node, 8), u16_at(node, 10)), (0, 0), "segment 0..0");
            assert_eq!((u16_at(node, 12), u16_at(node, 14)), (want, want));
            assert_eq!(
                u16_at(node, 16),
                48,
                "output_node = offset of the IOMMU node"
            );
            assert_eq!(&node[18..], &[0; 6]);
        }
    }

    #[test]
    fn guest_derives_endpoint_id_equal_to_bdf() {
        let eps = [bdf(0, 2, 0), bdf(0, 5, 0), bdf(0, 31, 7), bdf(3, 4, 1)];
        let t = build(bdf(0, 1, 0), &eps);
        for ep in eps {
            assert_eq!(linux_endpoint_id(&t, 0, ep), Some((u32::from(ep), 48)));
        }
        // Functions not listed (the IOMMU, an unrelated slot, another segment) are not covered.
        assert_eq!(linux_endpoint_id(&t, 0, bdf(0, 1, 0)), None);
        assert_eq!(linux_endpoint_id(&t, 0, bdf(0, 6, 0)), None);
        assert_eq!(linux_endpoint_id(&t, 1, bdf(0, 2, 0)), None);
    }

    #[test]
    fn iommu_itself_and_duplicates_are_skipped() {
        let iommu = bdf(0, 4, 0);
        let t = build(iommu, &[iommu, bdf(0, 2, 0), bdf(0, 2, 0)]);
        assert_eq!(u16_at(&t, 36), 2);
        assert_eq!(linux_endpoint_id(&t, 0, iommu), None);
        let only = build(iommu, &[]);
        assert_eq!(only.len(), 64);
        assert_eq!(only.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    #[test]
    fn bdf_encoding() {
        assert_eq!(bdf(0, 1, 0), 0x08);
        assert_eq!(bdf(0, 31, 7), 0xff);
        assert_eq!(bdf(1, 0, 0), 0x100);
    }
}
