//! Allocation of BAR addresses inside the host bridge windows.

/// First-fit allocator of naturally aligned blocks inside one window.
#[derive(Debug)]
pub struct AddressAllocator {
    /// Free ranges as (start, end exclusive), sorted and disjoint. `end` is a u128 so a window
    /// reaching the top of the address space is representable.
    free: Vec<(u64, u128)>,
}

impl AddressAllocator {
    /// An allocator over `[base, base + size)`.
    pub fn new(base: u64, size: u64) -> Self {
        let end = u128::from(base) + u128::from(size);
        let free = if size == 0 { vec![] } else { vec![(base, end)] };
        AddressAllocator { free }
    }

    /// Allocate `size` bytes (a power of two) aligned to `size`. None if it does not fit.
    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        if !size.is_power_of_two() {
            return None;
        }
        let (i, start) = self.free.iter().enumerate().find_map(|(i, &(s, e))| {
            let aligned = s.checked_next_multiple_of(size)?;
            (u128::from(aligned) + u128::from(size) <= e).then_some((i, aligned))
        })?;
        let (s, e) = self.free[i];
        let end = u128::from(start) + u128::from(size);
        let mut pieces = Vec::with_capacity(2);
        if s < start {
            pieces.push((s, u128::from(start)));
        }
        if end < e {
            // end < e <= 2^64, so it fits a u64.
            pieces.push((end as u64, e));
        }
        self.free.splice(i..=i, pieces);
        Some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_alignment_and_gap_reuse() {
        let mut a = AddressAllocator::new(0x1000, 0x10_0000);
        assert_eq!(a.allocate(0x1000), Some(0x1000));
        // 64 KiB must be 64 KiB aligned, leaving a gap at 0x2000..0x10000.
        assert_eq!(a.allocate(0x1_0000), Some(0x1_0000));
        // The gap is reused by smaller blocks.
        assert_eq!(a.allocate(0x2000), Some(0x2000));
        assert_eq!(a.allocate(0x100), Some(0x4000));
        assert_eq!(a.allocate(0x8000), Some(0x8000));
        assert_eq!(a.allocate(0x3000), None);
    }

    #[test]
    fn exhaustion_and_top_of_address_space() {
        let mut a = AddressAllocator::new(0xffff_ffff_ffff_0000, 0x1_0000);
        assert_eq!(a.allocate(0x8000), Some(0xffff_ffff_ffff_0000));
        assert_eq!(a.allocate(0x8000), Some(0xffff_ffff_ffff_8000));
        assert_eq!(a.allocate(0x10), None);
        let mut empty = AddressAllocator::new(0x1000, 0);
        assert_eq!(empty.allocate(0x10), None);
        let mut small = AddressAllocator::new(0x1000, 0x1000);
        assert_eq!(small.allocate(0x2000), None);
        assert_eq!(small.allocate(0x1000), Some(0x1000));
    }
}
