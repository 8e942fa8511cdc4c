//! The IOVA allocator: which device addresses an IOMMU mapping may use.
//!
//! Behind an IOMMU (VFIO type1, later iommufd) *we* choose the device address (IOVA) of every
//! mapping. [`IovaAllocator`] hands out contiguous, aligned extents of that address space and
//! takes them back.
//!
//! ## Which addresses are usable
//! The usable space is computed once, at construction, as
//!
//! ```text
//! usable = (union of the IOMMU's valid ranges) ∩ [0, dma_mask] − (reserved ranges)
//! ```
//!
//! - **Valid ranges** come from `VFIO_IOMMU_GET_INFO` (`VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`),
//!   as inclusive `[start, end]` pairs. They are not the whole 64-bit space: the IOMMU's
//!   address width bounds them from above, and the kernel cuts out *reserved regions* — on x86
//!   the MSI window `0xfee0_0000..=0xfeef_ffff`. A device write to an address in that window is
//!   not DMA at all: the interrupt remapping hardware decodes it as an interrupt message, so a
//!   buffer mapped there would be silently corrupted (or raise spurious interrupts), and the
//!   kernel refuses `VFIO_IOMMU_MAP_DMA` there anyway. With QEMU's intel-iommu the ranges are
//!   `[0, 0xfedf_ffff]` and `[0xfef0_0000, 0x7f_ffff_ffff]`.
//! - **The DMA mask** is the highest address the device can put on the bus (`2^n − 1` for an
//!   `n`-bit device: `0xffff_ffff` for a 32-bit one). The IOMMU would happily map an IOVA above
//!   it, but the device would truncate the address and DMA somewhere else. Space above the mask
//!   is therefore never handed out.
//! - **Reserved ranges** are the caller's own exclusions. [`IovaAllocator::new`] reserves page 0
//!   ([`NULL_PAGE`]) so that IOVA 0 never appears: many devices and drivers treat a zero address
//!   as "no buffer", and a zero IOVA makes a forgotten initialisation look valid.
//!   [`IovaAllocator::with_reserved`] lets the caller choose (including nothing).
//!
//! ## Algorithm
//! The free space is a `BTreeMap` of disjoint, non-adjacent free extents, `start → end`
//! (inclusive ends, so that an extent may end at `u64::MAX` without overflow). Live allocations
//! are a second `BTreeMap`, `start → end`, used to validate every free.
//!
//! - [`IovaAllocator::alloc`] is **lowest-address first fit**: it walks the free extents in
//!   address order and carves the request out of the first one that holds an aligned extent of
//!   the wanted length, at the lowest aligned address in it. Lowest-address first keeps live
//!   IOVAs compact and low, so that space below a small DMA mask (and below 4 GiB in general) is
//!   not scattered by early allocations, and so that freed low holes are reused before fresh high
//!   space is touched (fewer IOMMU page-table pages). Requests in this crate are few and large
//!   (whole multi-hugepage chunks, mapped from setup and the grower thread), so first fit's
//!   worst case — a walk over small holes — is cheap in practice.
//! - [`IovaAllocator::alloc_at`] carves a fixed extent out of the one free extent that must
//!   contain it.
//! - [`IovaAllocator::free`] accepts exactly an extent that `alloc`/`alloc_at` returned, removes
//!   it from the allocation map and inserts it into the free map, merging it with the free
//!   extent that ends just before it and the one that starts just after it.
//!
//! Costs, with `n` free extents and `m` live allocations: `free` and `alloc_at` are
//! `O(log n + log m)`; `alloc` is `O(log m + k)` where `k` is the number of free extents too
//! small (or too badly aligned) for the request that lie below the one chosen — `O(n)` in the
//! worst case, `O(1)` when requests are of one size (every hole then fits). The queries that
//! summarise the free map ([`IovaAllocator::largest_free_extent`]) are `O(n)`.
//!
//! ## Invariants (checked after every operation by the property tests)
//! 1. Free extents and allocations are pairwise disjoint, and their union is exactly the usable
//!    space: `free_bytes() + allocated_bytes() == total_bytes()`.
//! 2. No two free extents are adjacent (they would have been merged), and a free extent never
//!    spans two usable ranges: usable ranges are themselves disjoint and non-adjacent, so an
//!    extent that merges across a gap cannot arise. Hence, when nothing is allocated, the free
//!    map holds exactly one extent per usable range.
//! 3. Every allocation lies inside one usable range (so inside a valid range, outside every
//!    reserved range and at or below the DMA mask), and starts at a multiple of the alignment it
//!    was asked for.
//! 4. A failed operation changes nothing.
//!
//! ## Locking
//! The allocator has no interior mutability and no locks: mutating methods take `&mut self`.
//! The owner (the VFIO backend) keeps it inside the same mutex that serialises its map/unmap
//! ioctls, so that an IOVA is never handed out twice and never freed before its unmap returns.
//!
//! ```
//! use tidepool::iova::{IovaAllocator, IovaRange};
//!
//! // What VFIO_IOMMU_GET_INFO reports with QEMU's intel-iommu, for a 32-bit device.
//! let valid = [IovaRange::new(0, 0xfedf_ffff)?, IovaRange::new(0xfef0_0000, 0x7f_ffff_ffff)?];
//! let mut iova = IovaAllocator::new(&valid, u32::MAX as u64)?;
//!
//! let two_mib = 2 << 20;
//! let a = iova.alloc(4 * two_mib, two_mib)?; // one 8 MiB chunk, 2 MiB aligned
//! assert_eq!(a % two_mib, 0);
//! assert_ne!(a, 0); // page 0 is reserved by default
//! iova.free(a, 4 * two_mib)?;
//! assert_eq!(iova.allocated_bytes(), 0);
//! # Ok::<(), tidepool::iova::IovaError>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;

/// The first 4 KiB page, `[0, 0xfff]`, which [`IovaAllocator::new`] reserves so that IOVA 0
/// is never handed out.
pub const NULL_PAGE: IovaRange = IovaRange {
    start: 0,
    end: 0xfff,
};

/// An inclusive range `[start, end]` of IOVAs, as `VFIO_IOMMU_GET_INFO` reports valid ranges
/// (`struct vfio_iova_range`).
///
/// Inclusive, so that a range may end at `u64::MAX`. A range is well formed when
/// `start <= end`; [`IovaRange::new`] checks that, and the allocator checks every range it is
/// given.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IovaRange {
    /// First address in the range.
    pub start: u64,
    /// Last address in the range (inclusive).
    pub end: u64,
}

impl IovaRange {
    /// The range `[start, end]`, both inclusive.
    ///
    /// Fails with [`IovaError::InvalidRange`] when `start > end`.
    pub fn new(start: u64, end: u64) -> Result<IovaRange, IovaError> {
        if start > end {
            return Err(IovaError::InvalidRange { start, end });
        }
        Ok(IovaRange { start, end })
    }

    /// The range of `len` bytes starting at `start`.
    ///
    /// Fails with [`IovaError::ZeroLength`] when `len` is 0 and with [`IovaError::Overflow`]
    /// when the range would run past `u64::MAX`.
    pub fn from_start_len(start: u64, len: u64) -> Result<IovaRange, IovaError> {
        let end = last_address(start, len)?;
        Ok(IovaRange { start, end })
    }

    /// Its size in bytes.
    ///
    /// The one range whose size does not fit in a `u64` is the whole space `[0, u64::MAX]`
    /// (2^64 bytes); for it this saturates to `u64::MAX`. Every range an [`IovaAllocator`]
    /// returns is smaller than that.
    pub fn size(&self) -> u64 {
        (self.end - self.start).saturating_add(1)
    }

    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr <= self.end
    }
}

impl fmt::Debug for IovaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..={:#x}", self.start, self.end)
    }
}

impl From<vfio_bindings::bindings::vfio::vfio_iova_range> for IovaRange {
    /// The kernel's inclusive range, field for field. The allocator rejects it later if it is
    /// inverted.
    fn from(range: vfio_bindings::bindings::vfio::vfio_iova_range) -> IovaRange {
        IovaRange {
            start: range.start,
            end: range.end,
        }
    }
}

/// What went wrong allocating or freeing IOVA space, each variant saying what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IovaError {
    /// No free extent can hold the request below the DMA mask.
    #[error(
        "no free {len} B extent aligned to {align} B below DMA mask {mask:#x} (largest free \
         extent: {largest_free} B); map in smaller chunks, unmap idle chunks, or use a device \
         with a wider DMA mask"
    )]
    NoSpace {
        /// Bytes wanted.
        len: u64,
        /// Alignment wanted.
        align: u64,
        /// The size of the largest free extent (it may be large enough but not aligned).
        largest_free: u64,
        /// The device's DMA mask.
        mask: u64,
    },
    /// The alignment is not a power of two.
    #[error(
        "IOVA alignment {align} is not a power of two; pass 1 for none, or the page/chunk size"
    )]
    BadAlign {
        /// The alignment given.
        align: u64,
    },
    /// A zero-length extent was asked for or freed.
    #[error("zero-length IOVA extent; ask for (or free) at least one byte")]
    ZeroLength,
    /// `free` was given something that is not exactly a live allocation.
    #[error(
        "IOVA extent {iova:#x} (+{len} B) is not allocated (double free, partial free, or an \
         address this allocator never handed out); free exactly the iova and length that \
         alloc/alloc_at returned"
    )]
    NotAllocated {
        /// The address given.
        iova: u64,
        /// The length given.
        len: u64,
    },
    /// `alloc_at` asked for an extent that is not entirely free.
    #[error(
        "IOVA extent {iova:#x} (+{len} B) is not free: part of it is allocated, reserved, outside \
         the IOMMU's valid ranges, or above the DMA mask; pick another address or let alloc choose"
    )]
    NotFree {
        /// The address given.
        iova: u64,
        /// The length given.
        len: u64,
    },
    /// Nothing is left once the DMA mask and the reserved ranges are applied to the valid ranges.
    #[error(
        "no usable IOVA range at or below DMA mask {mask:#x} once reserved ranges are removed; \
         check the valid ranges VFIO_IOMMU_GET_INFO reported, the device's DMA mask, and the \
         reserved ranges"
    )]
    EmptyRanges {
        /// The device's DMA mask.
        mask: u64,
    },
    /// An extent would run past the end of the 64-bit address space.
    #[error(
        "IOVA extent at {start:#x} of {len} B would wrap past the end of the 64-bit address space; \
         check the address and length"
    )]
    Overflow {
        /// First address.
        start: u64,
        /// Length.
        len: u64,
    },
    /// A range was given with `start > end`.
    #[error(
        "IOVA range [{start:#x}, {end:#x}] is inverted; ranges are inclusive [start, end] pairs \
         with start <= end, as VFIO_IOMMU_GET_INFO reports them"
    )]
    InvalidRange {
        /// First address given.
        start: u64,
        /// Last address given.
        end: u64,
    },
    /// The usable space is the entire 64-bit space, whose size (2^64 B) does not fit in a `u64`.
    #[error(
        "the usable IOVA space is the entire 64-bit address space, whose size does not fit in \
         64 bits; reserve at least one page (IovaAllocator::new reserves page 0)"
    )]
    UnboundedSpace,
}

/// Hands out contiguous, aligned extents of IOVA space inside the IOMMU's valid ranges and
/// below a device's DMA mask. See the [module documentation](self) for the algorithm and its
/// invariants.
///
/// Not internally synchronised: the owner keeps it under the lock that serialises its IOMMU
/// map/unmap calls.
#[derive(Clone, PartialEq, Eq)]
pub struct IovaAllocator {
    /// The device's DMA mask: the highest usable address.
    dma_mask: u64,
    /// The usable space: sorted, disjoint, non-adjacent, non-empty ranges.
    usable: Vec<IovaRange>,
    /// Sum of the sizes of `usable` (fits in `u64`: checked at construction).
    total_bytes: u64,
    /// Free extents, `start → end` (inclusive): disjoint, non-adjacent, each inside one usable
    /// range.
    free: BTreeMap<u64, u64>,
    /// Live allocations, `start → end` (inclusive).
    allocated: BTreeMap<u64, u64>,
    /// Sum of the sizes of `allocated`.
    allocated_bytes: u64,
}

impl IovaAllocator {
    /// An allocator over `valid` (the IOMMU's valid ranges, inclusive, in any order, possibly
    /// overlapping) below `dma_mask` (the highest address the device can generate: `u32::MAX as
    /// u64` for a 32-bit device, `u64::MAX` for no limit), with page 0 ([`NULL_PAGE`])
    /// reserved so that IOVA 0 is never handed out.
    ///
    /// Fails with [`IovaError::InvalidRange`] for an inverted range and with
    /// [`IovaError::EmptyRanges`] when nothing usable is left.
    ///
    /// Locking: none (a constructor).
    pub fn new(valid: &[IovaRange], dma_mask: u64) -> Result<IovaAllocator, IovaError> {
        IovaAllocator::with_reserved(valid, dma_mask, &[NULL_PAGE])
    }

    /// Like [`IovaAllocator::new`], but with the caller's own `reserved` ranges (never handed
    /// out, not even by `alloc_at`) in place of the default [`NULL_PAGE`]. Pass `&[]` to
    /// reserve nothing — IOVA 0 may then be returned.
    ///
    /// Fails with [`IovaError::InvalidRange`] for an inverted range, with
    /// [`IovaError::EmptyRanges`] when nothing usable is left, and with
    /// [`IovaError::UnboundedSpace`] when everything — all 2^64 addresses — is usable.
    ///
    /// Locking: none (a constructor).
    pub fn with_reserved(
        valid: &[IovaRange],
        dma_mask: u64,
        reserved: &[IovaRange],
    ) -> Result<IovaAllocator, IovaError> {
        for range in valid.iter().chain(reserved) {
            IovaRange::new(range.start, range.end)?;
        }
        let mut holes = reserved.to_vec();
        if dma_mask < u64::MAX {
            holes.push(IovaRange {
                start: dma_mask + 1,
                end: u64::MAX,
            });
        }
        let usable = subtract(&normalize(valid), &normalize(&holes));
        if usable.is_empty() {
            return Err(IovaError::EmptyRanges { mask: dma_mask });
        }
        let mut total_bytes: u64 = 0;
        for range in &usable {
            total_bytes = (range.end - range.start)
                .checked_add(1)
                .and_then(|size| total_bytes.checked_add(size))
                .ok_or(IovaError::UnboundedSpace)?;
        }
        let free = usable.iter().map(|r| (r.start, r.end)).collect();
        Ok(IovaAllocator {
            dma_mask,
            usable,
            total_bytes,
            free,
            allocated: BTreeMap::new(),
            allocated_bytes: 0,
        })
    }

    /// Allocates `len` contiguous bytes starting at a multiple of `align` (a power of two; 1
    /// for none) and returns the first address: the lowest such extent that is free
    /// (lowest-address first fit, see the [module documentation](self)).
    ///
    /// The allocator counts bytes; IOMMUs map whole pages. Callers that map what they allocate
    /// pass page-multiple lengths and at least page alignment (the VFIO backend passes the
    /// chunk length and 2 MiB), or two extents may share a page.
    ///
    /// Fails with [`IovaError::ZeroLength`], [`IovaError::BadAlign`], or
    /// [`IovaError::NoSpace`] (nothing changes then).
    ///
    /// Locking: `&mut self`; the caller serialises.
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64, IovaError> {
        if len == 0 {
            return Err(IovaError::ZeroLength);
        }
        if !align.is_power_of_two() {
            return Err(IovaError::BadAlign { align });
        }
        let found = if len <= self.free_bytes() {
            self.first_fit(len, align)
        } else {
            None
        };
        let Some((extent, taken)) = found else {
            return Err(IovaError::NoSpace {
                len,
                align,
                largest_free: self.largest_free_extent().map_or(0, |r| r.size()),
                mask: self.dma_mask,
            });
        };
        self.carve(extent, taken);
        Ok(taken.start)
    }

    /// Allocates exactly `[iova, iova + len)`, which must be entirely free (inside the usable
    /// space and not allocated), and returns `iova`.
    ///
    /// For callers that need a fixed address (identity or direct-mapping schemes). Fails with
    /// [`IovaError::ZeroLength`], [`IovaError::Overflow`] or [`IovaError::NotFree`] (nothing
    /// changes then).
    ///
    /// Locking: `&mut self`; the caller serialises.
    pub fn alloc_at(&mut self, iova: u64, len: u64) -> Result<u64, IovaError> {
        let end = last_address(iova, len)?;
        // The only free extent that can contain `iova` is the last one starting at or before it.
        match self.free.range(..=iova).next_back() {
            Some((&extent_start, &extent_end)) if end <= extent_end => {
                let extent = IovaRange {
                    start: extent_start,
                    end: extent_end,
                };
                self.carve(extent, IovaRange { start: iova, end });
                Ok(iova)
            }
            _ => Err(IovaError::NotFree { iova, len }),
        }
    }

    /// Returns `[iova, iova + len)` to the free space, merging it with free neighbours.
    ///
    /// `iova` and `len` must be exactly those of a live allocation; anything else (a double
    /// free, part of an allocation, a range never handed out) fails with
    /// [`IovaError::NotAllocated`] (or [`IovaError::ZeroLength`] / [`IovaError::Overflow`] for
    /// malformed input) and changes nothing.
    ///
    /// Locking: `&mut self`; the caller serialises. Free only after the IOMMU unmap of this
    /// extent has returned, or the address may be handed out while still mapped.
    pub fn free(&mut self, iova: u64, len: u64) -> Result<(), IovaError> {
        let end = last_address(iova, len)?;
        if self.allocated.get(&iova) != Some(&end) {
            return Err(IovaError::NotAllocated { iova, len });
        }
        self.allocated.remove(&iova);
        self.allocated_bytes -= len;
        self.insert_free(IovaRange { start: iova, end });
        Ok(())
    }

    /// Bytes free to allocate. Locking: `&self`.
    pub fn free_bytes(&self) -> u64 {
        self.total_bytes - self.allocated_bytes
    }

    /// Bytes in live allocations. Locking: `&self`.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_bytes
    }

    /// Bytes in the usable space (`free_bytes() + allocated_bytes()`). Locking: `&self`.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The device's DMA mask this allocator was built with. Locking: `&self`.
    pub fn dma_mask(&self) -> u64 {
        self.dma_mask
    }

    /// The largest free extent (the lowest one if several tie), or `None` when everything is
    /// allocated. Its start is not necessarily aligned to anything. `O(n)` in free extents.
    /// Locking: `&self`.
    pub fn largest_free_extent(&self) -> Option<IovaRange> {
        self.free_extents()
            .fold(None, |best: Option<IovaRange>, range| match best {
                Some(b) if b.size() >= range.size() => Some(b),
                _ => Some(range),
            })
    }

    /// The usable space — valid ranges ∩ `[0, dma_mask]` − reserved ranges — as sorted,
    /// disjoint, non-adjacent ranges. Locking: `&self`.
    pub fn usable_ranges(&self) -> &[IovaRange] {
        &self.usable
    }

    /// The free extents in address order. Locking: `&self`.
    pub fn free_extents(&self) -> impl Iterator<Item = IovaRange> + '_ {
        self.free
            .iter()
            .map(|(&start, &end)| IovaRange { start, end })
    }

    /// The live allocations in address order. Locking: `&self`.
    pub fn allocations(&self) -> impl Iterator<Item = IovaRange> + '_ {
        self.allocated
            .iter()
            .map(|(&start, &end)| IovaRange { start, end })
    }

    /// Finds the lowest free extent holding `len` bytes at a multiple of `align`, and returns
    /// (that free extent, the aligned `len` bytes to take from it). `len > 0`; `align` is a
    /// power of two. Locking: `&self`.
    fn first_fit(&self, len: u64, align: u64) -> Option<(IovaRange, IovaRange)> {
        for (&extent_start, &extent_end) in &self.free {
            // Extents are visited in ascending order, so once an aligned start or its end
            // would wrap, no later extent can do better: stop.
            let start = extent_start.checked_next_multiple_of(align)?;
            let end = start.checked_add(len - 1)?;
            if end <= extent_end {
                let extent = IovaRange {
                    start: extent_start,
                    end: extent_end,
                };
                return Some((extent, IovaRange { start, end }));
            }
        }
        None
    }

    /// Removes `taken` from the free extent `extent` (which contains it), keeps what is left on
    /// either side free, and records `taken` as allocated. Locking: `&mut self`.
    fn carve(&mut self, extent: IovaRange, taken: IovaRange) {
        debug_assert_eq!(self.free.get(&extent.start), Some(&extent.end));
        debug_assert!(extent.start <= taken.start && taken.end <= extent.end);
        self.free.remove(&extent.start);
        if extent.start < taken.start {
            self.free.insert(extent.start, taken.start - 1);
        }
        if taken.end < extent.end {
            self.free.insert(taken.end + 1, extent.end);
        }
        self.allocated.insert(taken.start, taken.end);
        self.allocated_bytes += taken.size();
    }

    /// Inserts `range` (disjoint from every free extent) into the free map, merged with the
    /// free extent ending just before it and the one starting just after it. Locking:
    /// `&mut self`.
    fn insert_free(&mut self, range: IovaRange) {
        let mut merged = range;
        if let Some((&before_start, &before_end)) = self.free.range(..range.start).next_back() {
            if before_end.checked_add(1) == Some(range.start) {
                self.free.remove(&before_start);
                merged.start = before_start;
            }
        }
        if let Some(after_start) = range.end.checked_add(1) {
            if let Some(after_end) = self.free.remove(&after_start) {
                merged.end = after_end;
            }
        }
        self.free.insert(merged.start, merged.end);
    }
}

impl fmt::Debug for IovaAllocator {
    /// One line: mask, usable ranges, byte counts, and the free extents (the first few).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 8;
        write!(
            f,
            "IovaAllocator {{ dma_mask: {:#x}, usable: {:?}, allocated: {} B in {} extent(s), \
             free: {} B in {} extent(s) [",
            self.dma_mask,
            self.usable,
            self.allocated_bytes,
            self.allocated.len(),
            self.free_bytes(),
            self.free.len(),
        )?;
        for (i, range) in self.free_extents().take(SHOWN).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{range:?}")?;
        }
        if self.free.len() > SHOWN {
            write!(f, ", … {} more", self.free.len() - SHOWN)?;
        }
        f.write_str("] }")
    }
}

/// The last address of the `len` bytes starting at `start`, or `ZeroLength` / `Overflow`.
fn last_address(start: u64, len: u64) -> Result<u64, IovaError> {
    if len == 0 {
        return Err(IovaError::ZeroLength);
    }
    start
        .checked_add(len - 1)
        .ok_or(IovaError::Overflow { start, len })
}

/// Sorts well-formed `ranges` and merges overlapping and adjacent ones: the result is sorted,
/// disjoint and non-adjacent.
fn normalize(ranges: &[IovaRange]) -> Vec<IovaRange> {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    let mut merged: Vec<IovaRange> = Vec::with_capacity(sorted.len());
    for range in sorted {
        match merged.last_mut() {
            // `end == u64::MAX` swallows everything after it.
            Some(last) if last.end == u64::MAX || range.start <= last.end + 1 => {
                last.end = last.end.max(range.end);
            }
            _ => merged.push(range),
        }
    }
    merged
}

/// `ranges` minus `holes`, both normalised (sorted, disjoint, non-adjacent); the result is
/// normalised too (pieces of one range are separated by at least one hole address, pieces of
/// different ranges by the gap that already separated those ranges).
fn subtract(ranges: &[IovaRange], holes: &[IovaRange]) -> Vec<IovaRange> {
    let mut out = Vec::new();
    for range in ranges {
        let mut rest = Some(range.start); // start of what is left of `range`, if anything
        for hole in holes {
            let Some(start) = rest else { break };
            if hole.end < start {
                continue;
            }
            if hole.start > range.end {
                break;
            }
            if hole.start > start {
                out.push(IovaRange {
                    start,
                    end: hole.start - 1,
                });
            }
            // `hole.end < range.end` implies `hole.end + 1` does not wrap.
            rest = (hole.end < range.end).then(|| hole.end + 1);
        }
        if let Some(start) = rest {
            out.push(IovaRange {
                start,
                end: range.end,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB2: u64 = 2 << 20;
    const MSI_HOLE: IovaRange = IovaRange {
        start: 0xfee0_0000,
        end: 0xfeef_ffff,
    };

    /// The ranges VFIO reports with QEMU's intel-iommu.
    fn intel_ranges() -> [IovaRange; 2] {
        [
            IovaRange {
                start: 0,
                end: 0xfedf_ffff,
            },
            IovaRange {
                start: 0xfef0_0000,
                end: 0x7f_ffff_ffff,
            },
        ]
    }

    fn overlaps(a: IovaRange, b: IovaRange) -> bool {
        a.start <= b.end && b.start <= a.end
    }

    #[test]
    fn intel_ranges_reserve_page_zero_and_the_msi_hole() {
        let iova = IovaAllocator::new(&intel_ranges(), u64::MAX).unwrap();
        assert_eq!(
            iova.usable_ranges(),
            &[
                IovaRange::new(0x1000, 0xfedf_ffff).unwrap(),
                IovaRange::new(0xfef0_0000, 0x7f_ffff_ffff).unwrap()
            ]
        );
        assert_eq!(iova.total_bytes(), 0x80_0000_0000 - 0x1000 - 0x10_0000);
        assert_eq!(iova.free_bytes(), iova.total_bytes());
        assert_eq!(iova.allocated_bytes(), 0);
    }

    #[test]
    fn nothing_is_allocated_inside_the_msi_hole() {
        let mut iova = IovaAllocator::new(&intel_ranges(), u32::MAX as u64).unwrap();
        // Fill everything below 4 GiB with 2 MiB chunks; none may touch the hole.
        let mut chunks = Vec::new();
        while let Ok(a) = iova.alloc(MIB2, MIB2) {
            let r = IovaRange::from_start_len(a, MIB2).unwrap();
            assert!(!overlaps(r, MSI_HOLE), "{r:?} overlaps the MSI hole");
            chunks.push(a);
        }
        // 4 GiB / 2 MiB = 2048 slots, minus the one holding page 0 and the one holding the hole.
        assert_eq!(chunks.len(), 2046);
        assert!(!chunks.contains(&0));
        assert!(!chunks.contains(&MSI_HOLE.start));
        // alloc_at cannot take it either.
        assert_eq!(
            iova.alloc_at(MSI_HOLE.start, 0x1000),
            Err(IovaError::NotFree {
                iova: MSI_HOLE.start,
                len: 0x1000
            })
        );
    }

    #[test]
    fn a_32_bit_mask_keeps_everything_below_4_gib() {
        let mut iova = IovaAllocator::new(&intel_ranges(), u32::MAX as u64).unwrap();
        assert_eq!(iova.usable_ranges().last().unwrap().end, 0xffff_ffff);
        let mut live = Vec::new();
        let mut len = 0x1000;
        loop {
            match iova.alloc(len, 0x1000) {
                Ok(a) => {
                    assert!(a.checked_add(len - 1).unwrap() <= 0xffff_ffff);
                    live.push((a, len));
                }
                Err(IovaError::NoSpace { mask, .. }) => {
                    assert_eq!(mask, 0xffff_ffff);
                    if len == 0x1000 {
                        break;
                    }
                    len = 0x1000;
                    continue;
                }
                Err(e) => panic!("unexpected {e}"),
            }
            len = (len * 3).min(64 << 20);
        }
        assert_eq!(iova.free_bytes(), 0);
        assert!(iova.alloc_at(0x1_0000_0000, 0x1000).is_err());
    }

    #[test]
    fn exhaustion_gives_no_space_and_freeing_restores() {
        let mut iova = IovaAllocator::new(&intel_ranges(), u32::MAX as u64).unwrap();
        let before = iova.clone();
        let big = 1 << 30;
        let mut chunks = Vec::new();
        while let Ok(a) = iova.alloc(big, big) {
            chunks.push(a);
        }
        // [0x1000, 0xfedfffff] holds aligned 1 GiB extents at 1, 2 GiB only (0 has page 0,
        // 3 GiB has the hole); the upper range is [0xfef00000, 0xffffffff]: none.
        assert_eq!(chunks, vec![1 << 30, 2 << 30]);
        let err = iova.alloc(big, big).unwrap_err();
        let largest = iova.largest_free_extent().unwrap();
        assert_eq!(largest, IovaRange::new(0x1000, 0x3fff_ffff).unwrap());
        assert_eq!(
            err,
            IovaError::NoSpace {
                len: big,
                align: big,
                largest_free: largest.size(),
                mask: 0xffff_ffff
            }
        );
        assert!(err.to_string().contains("smaller chunks"));
        // An unaligned request of the same size does not fit either...
        assert!(iova.alloc(big, 1).is_err());
        // ...but a smaller one does, at the lowest address.
        assert_eq!(iova.alloc(MIB2, MIB2), Ok(MIB2));
        iova.free(MIB2, MIB2).unwrap();
        for a in chunks {
            iova.free(a, big).unwrap();
        }
        assert_eq!(iova, before);
    }

    #[test]
    fn first_fit_is_lowest_address_and_reuses_holes() {
        let mut iova = IovaAllocator::new(&intel_ranges(), u64::MAX).unwrap();
        let a = iova.alloc(MIB2, MIB2).unwrap();
        let b = iova.alloc(MIB2, MIB2).unwrap();
        let c = iova.alloc(MIB2, MIB2).unwrap();
        assert_eq!((a, b, c), (MIB2, 2 * MIB2, 3 * MIB2));
        assert_eq!(iova.alloc(0x1000, 1), Ok(0x1000));
        iova.free(b, MIB2).unwrap();
        assert_eq!(iova.alloc(MIB2, MIB2), Ok(b));
    }

    #[test]
    fn invalid_frees_are_rejected_and_change_nothing() {
        let mut iova = IovaAllocator::new(&intel_ranges(), u64::MAX).unwrap();
        let a = iova.alloc(4 * MIB2, MIB2).unwrap();
        let snapshot = iova.clone();
        let bad = [
            (a, MIB2),             // part of it
            (a + MIB2, MIB2),      // part of it, not at its start
            (a, 8 * MIB2),         // more than it
            (0xfee0_0000, 0x1000), // never handed out (the MSI hole)
            (0, 0x1000),           // reserved page 0
        ];
        for (iova_addr, len) in bad {
            assert_eq!(
                iova.free(iova_addr, len),
                Err(IovaError::NotAllocated {
                    iova: iova_addr,
                    len
                })
            );
            assert_eq!(iova, snapshot);
        }
        assert_eq!(iova.free(a, 0), Err(IovaError::ZeroLength));
        assert_eq!(
            iova.free(u64::MAX, 2),
            Err(IovaError::Overflow {
                start: u64::MAX,
                len: 2
            })
        );
        iova.free(a, 4 * MIB2).unwrap();
        let freed = iova.clone();
        assert_eq!(
            iova.free(a, 4 * MIB2),
            Err(IovaError::NotAllocated {
                iova: a,
                len: 4 * MIB2
            })
        );
        assert_eq!(iova, freed);
    }

    #[test]
    fn alloc_at_takes_exactly_a_free_extent() {
        let mut iova = IovaAllocator::new(&intel_ranges(), u64::MAX).unwrap();
        assert_eq!(iova.alloc_at(0x1_0000_0000, MIB2), Ok(0x1_0000_0000));
        assert_eq!(
            iova.alloc_at(0x1_0000_0000 + 0x1000, 0x1000),
            Err(IovaError::NotFree {
                iova: 0x1_0000_0000 + 0x1000,
                len: 0x1000
            })
        );
        // Straddling the end of the valid space.
        assert!(iova.alloc_at(0x7f_ffff_f000, 0x2000).is_err());
        assert_eq!(iova.alloc_at(0x7f_ffff_f000, 0x1000), Ok(0x7f_ffff_f000));
        assert_eq!(iova.allocations().count(), 2);
        iova.free(0x1_0000_0000, MIB2).unwrap();
        iova.free(0x7f_ffff_f000, 0x1000).unwrap();
        assert_eq!(iova.free_extents().count(), 2);
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        let mut iova = IovaAllocator::new(&intel_ranges(), u64::MAX).unwrap();
        assert_eq!(iova.alloc(0, 1), Err(IovaError::ZeroLength));
        assert_eq!(iova.alloc(1, 0), Err(IovaError::BadAlign { align: 0 }));
        assert_eq!(iova.alloc(1, 3), Err(IovaError::BadAlign { align: 3 }));
        assert_eq!(iova.alloc_at(1, 0), Err(IovaError::ZeroLength));
        assert_eq!(
            IovaRange::new(2, 1),
            Err(IovaError::InvalidRange { start: 2, end: 1 })
        );
        assert_eq!(
            IovaAllocator::new(&[IovaRange { start: 5, end: 4 }], u64::MAX),
            Err(IovaError::InvalidRange { start: 5, end: 4 })
        );
        // Everything above a 32-bit mask, or only page 0 below it: nothing usable.
        assert_eq!(
            IovaAllocator::new(
                &[IovaRange::new(1 << 32, 1 << 40).unwrap()],
                u32::MAX as u64
            ),
            Err(IovaError::EmptyRanges { mask: 0xffff_ffff })
        );
        assert_eq!(
            IovaAllocator::new(&[NULL_PAGE], u64::MAX),
            Err(IovaError::EmptyRanges { mask: u64::MAX })
        );
        assert_eq!(
            IovaAllocator::new(&[], u64::MAX),
            Err(IovaError::EmptyRanges { mask: u64::MAX })
        );
        let everything = IovaRange::new(0, u64::MAX).unwrap();
        assert_eq!(
            IovaAllocator::with_reserved(&[everything], u64::MAX, &[]),
            Err(IovaError::UnboundedSpace)
        );
        // With page 0 reserved, the whole space minus one page works, up to u64::MAX.
        let mut top = IovaAllocator::new(&[everything], u64::MAX).unwrap();
        assert_eq!(top.total_bytes(), u64::MAX - 0xfff);
        assert_eq!(top.alloc_at(u64::MAX, 1), Ok(u64::MAX));
        top.free(u64::MAX, 1).unwrap();
        assert_eq!(top.free_extents().count(), 1);
    }

    #[test]
    fn with_reserved_nothing_can_return_zero() {
        let mut iova = IovaAllocator::with_reserved(&intel_ranges(), u64::MAX, &[]).unwrap();
        assert_eq!(iova.alloc(MIB2, MIB2), Ok(0));
    }

    #[test]
    fn debug_is_readable() {
        let mut iova = IovaAllocator::new(&intel_ranges(), u32::MAX as u64).unwrap();
        iova.alloc(MIB2, MIB2).unwrap();
        let text = format!("{iova:?}");
        assert_eq!(
            text,
            "IovaAllocator { dma_mask: 0xffffffff, usable: [0x1000..=0xfedfffff, \
             0xfef00000..=0xffffffff], allocated: 2097152 B in 1 extent(s), free: 4291817472 \
             B in 3 extent(s) [0x1000..=0x1fffff, 0x400000..=0xfedfffff, 0xfef00000..=0xffffffff] }"
        );
    }
}

/// Property tests: random range sets, masks and reservations, then random sequences of
/// `alloc`, `alloc_at` and (valid and invalid) `free`, checked after every step against an
/// independent model of the usable space and of the live allocations.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    /// The usable space computed independently of `normalize`/`subtract`: cut the line at every
    /// boundary of every input, and keep each elementary piece whose first address is in some
    /// valid range, in no reserved range and at or below the mask. Exclusive `u128` ends.
    fn model_usable(valid: &[IovaRange], mask: u64, reserved: &[IovaRange]) -> Vec<(u128, u128)> {
        let mut cuts: Vec<u128> = vec![0, 1 << 64, u128::from(mask) + 1];
        for r in valid.iter().chain(reserved) {
            cuts.push(r.start.into());
            cuts.push(u128::from(r.end) + 1);
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut pieces: Vec<(u128, u128)> = Vec::new();
        for pair in cuts.windows(2) {
            let (lo, hi) = (pair[0], pair[1]);
            if lo > u128::from(u64::MAX) {
                break;
            }
            let addr = lo as u64;
            let usable = addr <= mask
                && valid.iter().any(|r| r.contains(addr))
                && !reserved.iter().any(|r| r.contains(addr));
            if !usable {
                continue;
            }
            match pieces.last_mut() {
                Some(last) if last.1 == lo => last.1 = hi,
                _ => pieces.push((lo, hi)),
            }
        }
        pieces
    }

    /// Whether `[start, end]` lies inside one piece of the modelled usable space.
    fn inside_usable(usable: &[(u128, u128)], range: IovaRange) -> bool {
        usable
            .iter()
            .any(|&(lo, hi)| lo <= range.start.into() && u128::from(range.end) < hi)
    }

    /// Checks every invariant of the module documentation against the model.
    fn check(iova: &IovaAllocator, usable: &[(u128, u128)], live: &BTreeMap<u64, u64>) {
        let total: u128 = usable.iter().map(|&(lo, hi)| hi - lo).sum();
        assert_eq!(u128::from(iova.total_bytes()), total);
        let allocations: Vec<IovaRange> = iova.allocations().collect();
        let expected: Vec<IovaRange> = live
            .iter()
            .map(|(&start, &len)| IovaRange::from_start_len(start, len).unwrap())
            .collect();
        assert_eq!(allocations, expected, "allocations differ from the model");
        let free: Vec<IovaRange> = iova.free_extents().collect();
        let free_sum: u128 = free.iter().map(|r| u128::from(r.end - r.start) + 1).sum();
        let live_sum: u128 = live.values().map(|&len| u128::from(len)).sum();
        assert_eq!(u128::from(iova.free_bytes()), free_sum);
        assert_eq!(u128::from(iova.allocated_bytes()), live_sum);
        assert_eq!(free_sum + live_sum, total, "free + allocated != usable");
        for pair in free.windows(2) {
            assert!(
                pair[0].end + 1 < pair[1].start,
                "free extents {:?} and {:?} overlap or were not merged",
                pair[0],
                pair[1]
            );
        }
        let mut everything: Vec<IovaRange> = free.iter().chain(&allocations).copied().collect();
        everything.sort_unstable();
        for pair in everything.windows(2) {
            assert!(
                pair[0].end < pair[1].start,
                "{:?} overlaps {:?}",
                pair[0],
                pair[1]
            );
        }
        for range in &everything {
            assert!(range.end <= iova.dma_mask(), "{range:?} above the mask");
            assert!(
                inside_usable(usable, *range),
                "{range:?} outside the usable space"
            );
        }
        let largest = free.iter().map(|r| r.size()).max();
        assert_eq!(iova.largest_free_extent().map(|r| r.size()), largest);
    }

    /// The lowest aligned start of `len` bytes in `free`, found by brute force.
    fn model_first_fit(free: &[IovaRange], len: u64, align: u64) -> Option<u64> {
        free.iter().find_map(|r| {
            let start = u128::from(r.start).next_multiple_of(u128::from(align));
            let end = start + u128::from(len) - 1;
            (end <= u128::from(r.end)).then_some(start as u64)
        })
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc {
            len: u64,
            align_log2: u32,
        },
        AllocAt {
            iova: u64,
            len: u64,
        },
        FreeLive(Index),
        /// A live allocation changed by `start_delta` and `len_delta`: a partial, overlapping or
        /// oversized free (or an exact one when both are zero).
        FreeNear {
            which: Index,
            start_delta: i64,
            len_delta: i64,
        },
        /// Anything at all: usually never allocated.
        FreeAny {
            iova: u64,
            len: u64,
        },
        /// Free something already freed.
        DoubleFree(Index),
    }

    /// Addresses that make collisions likely: a small window at the bottom (with page 0 and
    /// 2 MiB boundaries in it) and one at the very top of the 64-bit space.
    fn addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            4 => 0..0x80_0000u64,
            1 => (u64::MAX - 0x80_0000)..=u64::MAX,
            1 => Just(0u64),
            1 => Just(u64::MAX),
        ]
    }

    fn range() -> impl Strategy<Value = IovaRange> {
        prop_oneof![
            3 => (addr(), addr()).prop_map(|(a, b)| IovaRange { start: a.min(b), end: a.max(b) }),
            1 => (0..0x40_0000u64, 1..0x40_0000u64)
                .prop_map(|(s, l)| IovaRange { start: s, end: s + l - 1 }),
            // On a coarse 64 KiB grid, so that ranges often touch end to start.
            2 => (0..64u64, 1..16u64)
                .prop_map(|(s, l)| IovaRange { start: s << 16, end: ((s + l) << 16) - 1 }),
        ]
    }

    /// A few ranges, sometimes with one added that starts right after the first one ends
    /// (adjacent ranges must merge into one usable range).
    fn ranges(max: usize) -> impl Strategy<Value = Vec<IovaRange>> {
        (
            prop::collection::vec(range(), 0..max),
            any::<bool>(),
            1..0x10_0000u64,
        )
            .prop_map(|(mut list, touch, len)| {
                if let (true, Some(first)) = (touch, list.first().copied()) {
                    if let Some(start) = first.end.checked_add(1) {
                        list.push(IovaRange {
                            start,
                            end: start.saturating_add(len - 1),
                        });
                    }
                }
                list
            })
    }

    fn mask() -> impl Strategy<Value = u64> {
        prop_oneof![
            2 => Just(u64::MAX),
            1 => addr(),
            2 => (12..64u32).prop_map(|bits| (1u64 << bits) - 1),
        ]
    }

    fn len() -> impl Strategy<Value = u64> {
        prop_oneof![
            1..0x2000u64,
            0x1000..0x40_0000u64,
            (1..8u64).prop_map(|n| n << 21)
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (len(), 0..23u32).prop_map(|(len, align_log2)| Op::Alloc { len, align_log2 }),
            2 => (addr(), len()).prop_map(|(iova, len)| Op::AllocAt { iova, len }),
            3 => any::<Index>().prop_map(Op::FreeLive),
            1 => (any::<Index>(), -0x2000..0x2000i64, -0x2000..0x2000i64).prop_map(
                |(which, start_delta, len_delta)| Op::FreeNear { which, start_delta, len_delta }
            ),
            1 => (addr(), len()).prop_map(|(iova, len)| Op::FreeAny { iova, len }),
            1 => any::<Index>().prop_map(Op::DoubleFree),
        ]
    }

    /// Applies `op` to `iova`, checks its result against the model, and updates the model.
    fn apply(
        iova: &mut IovaAllocator,
        live: &mut BTreeMap<u64, u64>,
        freed: &mut Vec<(u64, u64)>,
        usable: &[(u128, u128)],
        op: Op,
    ) {
        let before = iova.clone();
        let free_before: Vec<IovaRange> = iova.free_extents().collect();
        let pick = |index: &Index, from: &[(u64, u64)]| -> Option<(u64, u64)> {
            (!from.is_empty()).then(|| from[index.index(from.len())])
        };
        let free_request = match op {
            Op::Alloc { len, align_log2 } => {
                let align = 1u64 << align_log2;
                let expected = model_first_fit(&free_before, len, align);
                match iova.alloc(len, align) {
                    Ok(start) => {
                        assert_eq!(Some(start), expected, "not the lowest first fit");
                        assert_eq!(start % align, 0);
                        live.insert(start, len);
                    }
                    Err(IovaError::NoSpace {
                        len: l,
                        align: a,
                        largest_free,
                        mask,
                    }) => {
                        assert_eq!(expected, None, "NoSpace although {expected:?} fits");
                        assert_eq!((l, a, mask), (len, align, iova.dma_mask()));
                        let largest = free_before.iter().map(|r| r.size()).max().unwrap_or(0);
                        assert_eq!(largest_free, largest);
                        assert!(*iova == before, "a failed alloc changed the allocator");
                    }
                    Err(e) => panic!("alloc({len:#x}, {align:#x}): unexpected {e}"),
                }
                None
            }
            Op::AllocAt { iova: at, len } => {
                let wanted = IovaRange::from_start_len(at, len);
                let fits = wanted.as_ref().is_ok_and(|w| {
                    free_before
                        .iter()
                        .any(|f| f.start <= w.start && w.end <= f.end)
                });
                // Independently: usable and overlapping no live allocation.
                let fits_model = wanted.as_ref().is_ok_and(|w| {
                    inside_usable(usable, *w)
                        && !live
                            .iter()
                            .any(|(&s, &l)| s <= w.end && w.start <= s + (l - 1))
                });
                assert_eq!(fits, fits_model);
                match iova.alloc_at(at, len) {
                    Ok(start) => {
                        assert!(fits);
                        assert_eq!(start, at);
                        live.insert(at, len);
                    }
                    Err(e) => {
                        assert!(
                            !fits,
                            "alloc_at({at:#x}, {len:#x}) refused a free extent: {e}"
                        );
                        assert!(*iova == before, "a failed alloc_at changed the allocator");
                    }
                }
                None
            }
            Op::FreeLive(which) => {
                let all: Vec<(u64, u64)> = live.iter().map(|(&s, &l)| (s, l)).collect();
                pick(&which, &all)
            }
            Op::FreeNear {
                which,
                start_delta,
                len_delta,
            } => {
                let all: Vec<(u64, u64)> = live.iter().map(|(&s, &l)| (s, l)).collect();
                pick(&which, &all).map(|(s, l)| {
                    (
                        s.wrapping_add_signed(start_delta),
                        l.saturating_add_signed(len_delta),
                    )
                })
            }
            Op::FreeAny { iova: at, len } => Some((at, len)),
            Op::DoubleFree(which) => pick(&which, freed),
        };
        if let Some((at, len)) = free_request {
            let exact = live.get(&at) == Some(&len);
            match iova.free(at, len) {
                Ok(()) => {
                    assert!(exact, "free({at:#x}, {len:#x}) accepted a non-allocation");
                    live.remove(&at);
                    freed.push((at, len));
                }
                Err(e) => {
                    assert!(
                        !exact,
                        "free({at:#x}, {len:#x}) refused a live allocation: {e}"
                    );
                    let expected = if len == 0 {
                        IovaError::ZeroLength
                    } else if at.checked_add(len - 1).is_none() {
                        IovaError::Overflow { start: at, len }
                    } else {
                        IovaError::NotAllocated { iova: at, len }
                    };
                    assert_eq!(e, expected);
                    assert!(*iova == before, "a failed free changed the allocator");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn random_sequences_keep_every_invariant(
            valid in ranges(5),
            reserved in prop_oneof![
                1 => Just(None),
                1 => ranges(4).prop_map(Some),
            ],
            mask in mask(),
            ops in prop::collection::vec(op(), 1..60),
        ) {
            let reserved_list = reserved.clone().unwrap_or_else(|| vec![NULL_PAGE]);
            let usable = model_usable(&valid, mask, &reserved_list);
            let total: u128 = usable.iter().map(|&(lo, hi)| hi - lo).sum();
            let built = match &reserved {
                None => IovaAllocator::new(&valid, mask),
                Some(list) => IovaAllocator::with_reserved(&valid, mask, list),
            };
            let mut iova = match built {
                Ok(iova) => iova,
                Err(e) => {
                    let expected = if total == 0 {
                        IovaError::EmptyRanges { mask }
                    } else {
                        IovaError::UnboundedSpace
                    };
                    prop_assert!(total == 0 || total == 1 << 64, "refused {total} B: {e}");
                    prop_assert_eq!(e, expected);
                    return Ok(());
                }
            };
            let expected_usable: Vec<IovaRange> = usable
                .iter()
                .map(|&(lo, hi)| IovaRange { start: lo as u64, end: (hi - 1) as u64 })
                .collect();
            prop_assert_eq!(iova.usable_ranges(), &expected_usable[..]);

            let mut live = BTreeMap::new();
            let mut freed = Vec::new();
            check(&iova, &usable, &live);
            for op in ops {
                apply(&mut iova, &mut live, &mut freed, &usable, op);
                check(&iova, &usable, &live);
            }
            // Free everything, in an order unrelated to allocation order: every hole must merge
            // back, leaving exactly one free extent per usable range.
            let mut remaining: Vec<(u64, u64)> = live.iter().map(|(&s, &l)| (s, l)).collect();
            remaining.sort_unstable_by_key(|&(s, l)| (s.wrapping_mul(0x9e37_79b9_7f4a_7c15), l));
            for (at, len) in remaining {
                iova.free(at, len).unwrap();
                live.remove(&at);
                check(&iova, &usable, &live);
            }
            prop_assert_eq!(iova.free_extents().collect::<Vec<_>>(), expected_usable);
            prop_assert_eq!(iova.free_bytes(), iova.total_bytes());
        }
    }
}
