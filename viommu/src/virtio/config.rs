//! Everything configurable about one virtio-iommu ([`ViommuConfig`]), its validation, and its
//! restriction to what the host IOMMUs of assigned devices can translate
//! ([`viommu_config_for`]).

use crate::engine::arch::{X86_MSI_END, X86_MSI_START};
use crate::engine::fault::FaultRateLimit;
use crate::engine::geometry::{Geometry, ResvKind, ResvRegion};
use crate::engine::host::vfio::HostIommuInfo;
use crate::engine::limits::Limits;
use crate::virtio::spec::RESV_MEM_SIZE;

/// Largest `probe_size` accepted (the PROBE reply is built in a host buffer of that size).
pub const MAX_PROBE_SIZE: u32 = 64 * 1024;
/// Everything configurable about one virtio-iommu.
#[derive(Clone, Debug)]
pub struct ViommuConfig {
    /// Advertised geometry (page sizes, input range, domain range).
    pub geometry: Geometry,
    /// Reserved regions reported by PROBE and refused to MAP. Default: the x86 MSI window.
    pub reserved_regions: Vec<ResvRegion>,
    /// Size of the PROBE property area.
    pub probe_size: u32,
    /// Initial (and system-reset) value of `config.bypass`.
    pub bypass: bool,
    /// Offer VIRTIO_IOMMU_F_MMIO.
    pub mmio: bool,
    /// Caps on domains, endpoints and mappings.
    pub limits: Limits,
    /// Maximum size of each queue.
    pub queue_size: u16,
    /// Rate of faults reaching the guest.
    pub fault_rate: FaultRateLimit,
}

impl Default for ViommuConfig {
    fn default() -> Self {
        ViommuConfig {
            geometry: Geometry::default(),
            reserved_regions: vec![ResvRegion {
                start: X86_MSI_START,
                end: X86_MSI_END,
                kind: ResvKind::Msi,
            }],
            probe_size: 512,
            bypass: true,
            mmio: true,
            limits: Limits::default(),
            queue_size: 256,
            fault_rate: FaultRateLimit::default(),
        }
    }
}

/// A configuration the device cannot honour.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `page_size_mask` is 0.
    #[error("page_size_mask must have at least one bit")]
    EmptyPageMask,
    /// Input or domain range with start > end.
    #[error("empty input or domain range")]
    EmptyRange,
    /// A reserved region with start > end, or two that overlap.
    #[error("reserved region {0:#x}..={1:#x} is empty or overlaps another")]
    BadReservedRegion(u64, u64),
    /// More than one MSI region.
    #[error("at most one MSI reserved region")]
    TwoMsiRegions,
    /// The reserved regions do not fit in `probe_size`, or it is too large.
    #[error("probe_size {0} cannot hold the reserved regions (or exceeds {MAX_PROBE_SIZE})")]
    ProbeSize(u32),
    /// Queue size 0 or not a power of two.
    #[error("queue size {0} must be a power of two")]
    QueueSize(u16),
}

impl ViommuConfig {
    /// The most heap a guest can make the device hold under these limits (see
    /// [`Viommu::memory_estimate`](super::device::Viommu::memory_estimate)).
    pub fn memory_bound(&self) -> usize {
        self.limits
            .memory_bound()
            .saturating_add(usize::from(self.queue_size) * std::mem::size_of::<(u16, u32)>())
    }

    /// Check the configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let g = &self.geometry;
        if g.page_size_mask == 0 {
            return Err(ConfigError::EmptyPageMask);
        }
        if g.input_start > g.input_end || g.domain_start > g.domain_end {
            return Err(ConfigError::EmptyRange);
        }
        let mut sorted = self.reserved_regions.clone();
        sorted.sort_by_key(|r| r.start);
        for (i, r) in sorted.iter().enumerate() {
            if r.start > r.end || (i > 0 && sorted[i - 1].end >= r.start) {
                return Err(ConfigError::BadReservedRegion(r.start, r.end));
            }
        }
        if sorted.iter().filter(|r| r.kind == ResvKind::Msi).count() > 1 {
            return Err(ConfigError::TwoMsiRegions);
        }
        let need = sorted.len() * RESV_MEM_SIZE;
        if self.probe_size > MAX_PROBE_SIZE || (self.probe_size as usize) < need {
            return Err(ConfigError::ProbeSize(self.probe_size));
        }
        if self.queue_size == 0 || !self.queue_size.is_power_of_two() {
            return Err(ConfigError::QueueSize(self.queue_size));
        }
        Ok(())
    }
}

/// The host's limits cannot be expressed in the virtio-iommu config.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GeometryError {
    /// No page size is both advertised by the config and supported by the host.
    #[error("no common page size (config {config:#x}, host {host:#x})")]
    NoCommonPageSize {
        /// The config's mask.
        config: u64,
        /// The host's bitmap.
        host: u64,
    },
    /// No host IOVA range intersects the configured input range.
    #[error("no host IOVA range inside the input range")]
    NoIovaRange,
    /// Too many holes to report in `MAX_PROBE_SIZE` bytes of PROBE properties.
    #[error("{0} reserved regions do not fit in a PROBE reply")]
    TooManyRegions(usize),
    /// The resulting config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// `ranges` minus every range of `cut` (all inclusive), in order.
fn subtract(ranges: &[(u64, u64)], cut: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in ranges {
        let mut pieces = vec![(s, e)];
        for &(cs, ce) in cut {
            let mut next = Vec::new();
            for (ps, pe) in pieces {
                if ce < ps || cs > pe {
                    next.push((ps, pe));
                    continue;
                }
                if cs > ps {
                    next.push((ps, cs - 1));
                }
                if ce < pe {
                    next.push((ce + 1, pe));
                }
            }
            pieces = next;
        }
        out.extend(pieces);
    }
    out
}

impl HostIommuInfo {
    /// Restrict `config` to what this host can do: `page_size_mask` intersected with the host's
    /// page sizes, the input range narrowed to the host's IOVA ranges, every hole between them
    /// reported as a RESV_MEM reserved region (minus regions already reserved, e.g. the MSI
    /// window), and `probe_size` grown to hold them. The result is validated.
    pub fn apply_to(&self, config: &mut ViommuConfig) -> Result<(), GeometryError> {
        let g = &mut config.geometry;
        if self.page_sizes != 0 {
            let mask = g.page_size_mask & self.page_sizes;
            if mask == 0 {
                return Err(GeometryError::NoCommonPageSize {
                    config: g.page_size_mask,
                    host: self.page_sizes,
                });
            }
            if mask.trailing_zeros() > 12 {
                log::warn!(
                    "viommu: host IOMMU granule {:#x} exceeds 4 KiB: x86 guests cannot use it",
                    1u64 << mask.trailing_zeros()
                );
            }
            g.page_size_mask = mask;
        }
        if !self.iova_ranges.is_empty() {
            let clipped: Vec<(u64, u64)> = self
                .iova_ranges
                .iter()
                .map(|&(s, e)| (s.max(g.input_start), e.min(g.input_end)))
                .filter(|&(s, e)| s <= e)
                .collect();
            let (Some(first), Some(last)) = (clipped.first(), clipped.last()) else {
                return Err(GeometryError::NoIovaRange);
            };
            g.input_start = first.0;
            g.input_end = last.1;
            let holes: Vec<(u64, u64)> = clipped
                .windows(2)
                .filter(|w| w[0].1 < u64::MAX && w[0].1 + 1 < w[1].0)
                .map(|w| (w[0].1 + 1, w[1].0 - 1))
                .collect();
            let existing: Vec<(u64, u64)> = config
                .reserved_regions
                .iter()
                .map(|r| (r.start, r.end))
                .collect();
            for (start, end) in subtract(&holes, &existing) {
                config.reserved_regions.push(ResvRegion {
                    start,
                    end,
                    kind: ResvKind::Reserved,
                });
            }
        }
        let n = config.reserved_regions.len();
        let need = n * RESV_MEM_SIZE;
        if need > MAX_PROBE_SIZE as usize {
            return Err(GeometryError::TooManyRegions(n));
        }
        if (config.probe_size as usize) < need {
            config.probe_size = need as u32;
        }
        config.validate()?;
        Ok(())
    }
}

/// `base` restricted to what every container in `hosts` can do (see
/// [`HostIommuInfo::apply_to`]); `base` unchanged when `hosts` is empty.
pub fn viommu_config_for(
    base: ViommuConfig,
    hosts: &[HostIommuInfo],
) -> Result<ViommuConfig, GeometryError> {
    let mut config = base;
    if let Some((first, rest)) = hosts.split_first() {
        let all = rest.iter().fold(first.clone(), |acc, h| acc.intersect(h));
        all.apply_to(&mut config)?;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 39-bit x86 host: everything but the MSI window.
    fn x86_39() -> Vec<(u64, u64)> {
        vec![(0, X86_MSI_START - 1), (X86_MSI_END + 1, (1 << 39) - 1)]
    }

    #[test]
    fn geometry_from_a_39_bit_host() {
        let info = HostIommuInfo {
            page_sizes: 0x4020_1000,
            iova_ranges: vec![
                (0, 0xfedf_ffff),
                (0xfef0_0000, 0x7f_ffff_ffff),
                (0x80_0000_1000, 0x80_ffff_ffff),
            ],
            dma_avail: None,
        };
        let mut cfg = ViommuConfig::default();
        info.apply_to(&mut cfg).unwrap();
        assert_eq!(cfg.geometry.page_size_mask, 0x4020_1000);
        assert_eq!(cfg.geometry.input_start, 0);
        assert_eq!(cfg.geometry.input_end, 0x80_ffff_ffff);
        // The MSI hole is already the MSI region; the other hole becomes RESV_MEM reserved.
        assert_eq!(
            cfg.reserved_regions,
            vec![
                ResvRegion {
                    start: X86_MSI_START,
                    end: X86_MSI_END,
                    kind: ResvKind::Msi
                },
                ResvRegion {
                    start: 0x80_0000_0000,
                    end: 0x80_0000_0fff,
                    kind: ResvKind::Reserved
                },
            ]
        );
        assert_eq!(
            info.shadow_config().host_iova_ranges,
            info.iova_ranges.clone()
        );
        // A host hole partly overlapping the MSI region: only the rest is added.
        let info = HostIommuInfo {
            page_sizes: 0,
            iova_ranges: vec![(0, 0xfebf_ffff), (0xfef0_0000, 0xffff_ffff)],
            dma_avail: None,
        };
        let mut cfg = ViommuConfig::default();
        info.apply_to(&mut cfg).unwrap();
        assert_eq!(
            cfg.geometry.page_size_mask, !0xfff,
            "unknown page sizes keep the mask"
        );
        assert_eq!(cfg.geometry.input_end, 0xffff_ffff);
        assert_eq!(
            cfg.reserved_regions[1],
            ResvRegion {
                start: 0xfec0_0000,
                end: 0xfedf_ffff,
                kind: ResvKind::Reserved
            }
        );
    }

    #[test]
    fn geometry_errors_and_probe_size_growth() {
        let mut cfg = ViommuConfig::default();
        let info = HostIommuInfo {
            page_sizes: 0x800,
            ..Default::default()
        };
        assert!(matches!(
            info.apply_to(&mut cfg),
            Err(GeometryError::NoCommonPageSize { .. })
        ));
        let mut cfg = ViommuConfig::default();
        let info = HostIommuInfo {
            iova_ranges: vec![(1 << 50, 1 << 51)],
            ..Default::default()
        };
        assert_eq!(info.apply_to(&mut cfg), Err(GeometryError::NoIovaRange));
        // Many holes: probe_size grows to hold them.
        let ranges: Vec<(u64, u64)> = (0..100u64)
            .map(|i| (i << 33, (i << 33) + 0xffff_ffff))
            .collect();
        let info = HostIommuInfo {
            iova_ranges: ranges,
            ..Default::default()
        };
        let mut cfg = ViommuConfig::default();
        info.apply_to(&mut cfg).unwrap();
        assert_eq!(cfg.reserved_regions.len(), 1 + 99);
        assert_eq!(cfg.probe_size as usize, 100 * RESV_MEM_SIZE);
        // Too many to report.
        let ranges: Vec<(u64, u64)> = (0..4000u64).map(|i| (i << 20, (i << 20) + 0xfff)).collect();
        let info = HostIommuInfo {
            iova_ranges: ranges,
            ..Default::default()
        };
        let mut cfg = ViommuConfig::default();
        assert!(matches!(
            info.apply_to(&mut cfg),
            Err(GeometryError::TooManyRegions(_))
        ));
    }

    #[test]
    fn config_for_several_hosts() {
        let a = HostIommuInfo {
            page_sizes: 0x4020_1000,
            iova_ranges: x86_39(),
            dma_avail: None,
        };
        let b = HostIommuInfo {
            page_sizes: 0x1000,
            iova_ranges: vec![(0, (1 << 48) - 1)],
            dma_avail: None,
        };
        let cfg = viommu_config_for(ViommuConfig::default(), &[a, b]).unwrap();
        assert_eq!(cfg.geometry.page_size_mask, 0x1000);
        assert_eq!(cfg.geometry.input_end, (1 << 39) - 1);
        assert_eq!(
            cfg.reserved_regions.len(),
            1,
            "the only hole is the MSI window"
        );
        assert_eq!(
            viommu_config_for(ViommuConfig::default(), &[])
                .unwrap()
                .geometry,
            ViommuConfig::default().geometry
        );
    }

    #[test]
    fn subtract_cuts_holes() {
        assert_eq!(
            subtract(&[(0, 100)], &[(10, 20), (50, 200)]),
            vec![(0, 9), (21, 49)]
        );
        assert_eq!(subtract(&[(0, u64::MAX)], &[(0, u64::MAX)]), vec![]);
        assert_eq!(subtract(&[(5, 6)], &[]), vec![(5, 6)]);
    }
}
