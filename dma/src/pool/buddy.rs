//! A binary buddy allocator over the byte range of one chunk.
//!
//! [`Buddy`] hands out *offsets* inside `[0, len)`; it never touches memory. The pool adds the
//! chunk's base address (CPU side) and device address (device side) to an offset to get a
//! buffer, so the same allocator serves every [`crate::share::DeviceView`].
//!
//! ## Why a buddy allocator
//! - **Variable sizes with natural alignment.** The pool serves buffers from 512 B (one sector)
//!   to 2 MiB (one hugepage). A block of order `k` (`1 << k` bytes) always starts at a multiple
//!   of `1 << k`, so every buffer of 4 KiB or more is 4 KiB aligned and never crosses a 4 KiB
//!   boundary more than its size requires: exactly what NVMe PRP lists need (one PRP entry per
//!   4 KiB page, only the first may carry an offset). Smaller buffers never straddle a page.
//! - **O(log) split and merge.** Allocation takes the smallest free block that fits and halves
//!   it until it has the requested order (at most `max_order - min_order` splits); freeing
//!   merges a block with its *buddy* (the other half of its parent, at `offset ^ (1 << k)`)
//!   for as long as that buddy is free, so free space is always kept in the largest possible
//!   blocks ("fully coalesced": two buddies are never both free at the same order).
//! - **Idle detection for shrinking.** Because freeing coalesces eagerly, a chunk whose every
//!   block was returned is again a list of whole top-level blocks, and [`Buddy::is_idle`]
//!   answers in O(1): the shrinker can unshare the chunk and give it back to the kernel.
//!
//! ## The cost: internal fragmentation
//! Every request is rounded up to a power of two ([`Buddy::order_for_size`]), so a request of
//! `2^k + 1` bytes wastes almost half its block (at worst 50 %, about 25 % on average for
//! uniformly spread sizes). The usual I/O sizes (512 B, 4 KiB, 64 KiB, 128 KiB, 1 MiB) are
//! powers of two and waste nothing; callers with odd sizes should split them into a
//! scatter-gather list of power-of-two pieces rather than round one big buffer up.
//!
//! ## Placement: lowest address first
//! [`Buddy::alloc`] takes a block of the *smallest* order that has a free one (best fit, so
//! large blocks are split only when no smaller block is left) and, within that order, the
//! block at the *lowest* offset; when it splits, it keeps the lower half and frees the upper
//! one. Allocation is therefore deterministic (the same sequence of calls gives the same
//! offsets, which makes tests and traces reproducible) and live blocks pack towards the start
//! of the chunk, leaving the upper top-level blocks whole for large requests.
//!
//! ## Detecting wrong frees
//! The allocator keeps a record of every live block (offset → order). [`Buddy::free`] checks
//! the offset and order against it, so a double free, a free of an offset that is inside a
//! block but not its start, or a free with the wrong order is a typed [`BuddyError`] that
//! changes nothing, instead of silent corruption of the free lists. This costs a hash lookup
//! per call, which is acceptable here: see the next section.
//!
//! ## How the pool uses it
//! One `Buddy` per chunk, owned by the pool's global state behind the pool's lock: this type is
//! a plain data structure, it does no locking and no allocation-free tricks, and every method
//! takes `&self`/`&mut self` under the caller's lock. It is the *slow path*: per-core caches
//! serve the hot path without a lock and are refilled (or drained) a batch at a time with
//! [`Buddy::alloc_batch`] (one lock hold per batch).
//!
//! ```
//! use tidepool::pool::buddy::Buddy;
//!
//! // One 2 MiB hugepage, blocks from 512 B (order 9) to 2 MiB (order 21).
//! let mut buddy = Buddy::new(2 << 20, 9, 21)?;
//! let order = Buddy::order_for_size(4096, 9).expect("4 KiB fits");
//! let a = buddy.alloc(order).expect("space");
//! let b = buddy.alloc(order).expect("space");
//! assert_eq!((a, b), (0, 4096)); // lowest addresses first, naturally aligned
//! buddy.free(a, order)?;
//! assert!(buddy.free(a, order).is_err()); // double free is detected
//! buddy.free(b, order)?;
//! assert!(buddy.is_idle());
//! # Ok::<(), tidepool::pool::buddy::BuddyError>(())
//! ```

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes a block offset by one multiplication (Fibonacci hashing): offsets are chosen by the
/// allocator, not by an adversary, so SipHash's cost (a good part of a free or an
/// allocation on the pool's slow path) buys nothing.
#[derive(Debug, Default, Clone, Copy)]
struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The largest `max_order` accepted: blocks of up to 2^62 bytes, so that every block size and
/// every `offset + size` fits in a `u64`.
pub const MAX_SUPPORTED_ORDER: u32 = 62;

/// What went wrong with a [`Buddy`] call. Every error leaves the allocator unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuddyError {
    /// `min_order`/`max_order` are not a valid range.
    #[error(
        "invalid block orders {min_order}..={max_order}: need min_order <= max_order <= \
         {MAX_SUPPORTED_ORDER} (e.g. 9..=21 for 512 B..2 MiB blocks)"
    )]
    InvalidOrders {
        /// The smallest order asked for.
        min_order: u32,
        /// The largest order asked for.
        max_order: u32,
    },
    /// The managed length is zero or not a whole number of top-level blocks.
    #[error(
        "chunk length {len} is not a non-zero multiple of the largest block size {block} B \
         (order {max_order}): size the chunk in whole top-level blocks"
    )]
    InvalidLength {
        /// The length asked for.
        len: u64,
        /// The largest order.
        max_order: u32,
        /// `1 << max_order`.
        block: u64,
    },
    /// An order outside `min_order..=max_order` was passed to [`Buddy::free`].
    #[error(
        "block order {order} is outside this allocator's {min_order}..={max_order}: pass the \
         order the block was allocated with"
    )]
    OrderOutOfRange {
        /// The order given.
        order: u32,
        /// The allocator's smallest order.
        min_order: u32,
        /// The allocator's largest order.
        max_order: u32,
    },
    /// The offset is not inside `[0, len)`.
    #[error(
        "offset {offset:#x} is outside this chunk's {len} B: the block belongs to another chunk"
    )]
    OutOfRange {
        /// The offset given.
        offset: u64,
        /// The managed length.
        len: u64,
    },
    /// The offset is not a multiple of the block size of the given order.
    #[error(
        "offset {offset:#x} is not aligned to a block of order {order} ({size} B): pass the \
         offset returned by alloc, not an address inside the block"
    )]
    Misaligned {
        /// The offset given.
        offset: u64,
        /// The order given.
        order: u32,
        /// `1 << order`.
        size: u64,
    },
    /// No live block starts at this offset: a double free, or an offset never allocated.
    #[error(
        "no allocated block starts at offset {offset:#x}: double free, or an offset that was \
         never returned by alloc"
    )]
    NotAllocated {
        /// The offset given.
        offset: u64,
    },
    /// A live block starts at this offset, but with another order.
    #[error(
        "the block at offset {offset:#x} was allocated with order {allocated}, not {given}: \
         free it with the order it was allocated with"
    )]
    WrongOrder {
        /// The offset given.
        offset: u64,
        /// The order given.
        given: u32,
        /// The order the block was allocated with.
        allocated: u32,
    },
}

/// A binary buddy allocator over the offsets `[0, len)` of one chunk.
///
/// See the [module documentation](self) for the algorithm. Not thread-safe by itself: the pool
/// keeps it behind its lock, and every method must be called with that lock held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buddy {
    /// Bytes managed: a non-zero multiple of `1 << max_order`.
    len: u64,
    /// Order of the smallest block.
    min_order: u32,
    /// Order of the largest (top-level) block.
    max_order: u32,
    /// `free_lists[k - min_order]` holds the offsets of the free blocks of order `k`, ordered so
    /// that the lowest offset is taken first. Invariant: two buddies are never both in the same
    /// list (free space is fully coalesced).
    free_lists: Vec<BTreeSet<u64>>,
    /// The live blocks: start offset → order. Used to reject wrong frees.
    allocated: HashMap<u64, u32, BuildHasherDefault<OffsetHasher>>,
    /// Sum of the sizes of the free blocks.
    free_bytes: u64,
}

impl Buddy {
    /// Creates an allocator managing `[0, len)`, all free, with blocks of `1 << min_order` to
    /// `1 << max_order` bytes.
    ///
    /// `len` must be a non-zero multiple of `1 << max_order` (a chunk of several hugepages has
    /// several top-level blocks) and `min_order <= max_order <= MAX_SUPPORTED_ORDER`.
    /// Allocates one set entry per top-level block.
    pub fn new(len: u64, min_order: u32, max_order: u32) -> Result<Self, BuddyError> {
        if min_order > max_order || max_order > MAX_SUPPORTED_ORDER {
            return Err(BuddyError::InvalidOrders {
                min_order,
                max_order,
            });
        }
        let top = 1u64 << max_order;
        if len == 0 || len % top != 0 {
            return Err(BuddyError::InvalidLength {
                len,
                max_order,
                block: top,
            });
        }
        let levels = (max_order - min_order + 1) as usize;
        let mut free_lists = vec![BTreeSet::new(); levels];
        free_lists[levels - 1] = (0..len / top).map(|i| i * top).collect();
        Ok(Self {
            len,
            min_order,
            max_order,
            free_lists,
            allocated: HashMap::default(),
            free_bytes: len,
        })
    }

    /// The smallest order `k >= min_order` whose block (`1 << k` bytes) holds `size` bytes, or
    /// `None` if `size` is zero or needs an order above [`MAX_SUPPORTED_ORDER`].
    ///
    /// Callers still have to check the result against their allocator's `max_order`
    /// ([`Buddy::can_alloc`] and [`Buddy::alloc`] do).
    ///
    /// ```
    /// use tidepool::pool::buddy::Buddy;
    /// assert_eq!(Buddy::order_for_size(1, 9), Some(9));
    /// assert_eq!(Buddy::order_for_size(4096, 9), Some(12));
    /// assert_eq!(Buddy::order_for_size(4097, 9), Some(13));
    /// assert_eq!(Buddy::order_for_size(0, 9), None);
    /// ```
    pub fn order_for_size(size: u64, min_order: u32) -> Option<u32> {
        if size == 0 {
            return None;
        }
        let order = size
            .checked_next_power_of_two()?
            .trailing_zeros()
            .max(min_order);
        (order <= MAX_SUPPORTED_ORDER).then_some(order)
    }

    /// The size in bytes of a block of `order`.
    pub const fn block_size(order: u32) -> u64 {
        1u64 << order
    }

    /// Bytes managed: the `len` given to [`Buddy::new`] (offsets `[0, len)`).
    pub fn total_bytes(&self) -> u64 {
        self.len
    }

    /// Order of the smallest block.
    pub fn min_order(&self) -> u32 {
        self.min_order
    }

    /// Order of the largest (top-level) block.
    pub fn max_order(&self) -> u32 {
        self.max_order
    }

    /// Bytes in free blocks.
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    /// Bytes in live blocks (including the rounding up to a power of two).
    /// Always `free_bytes() + allocated_bytes() == total_bytes()`.
    pub fn allocated_bytes(&self) -> u64 {
        self.len - self.free_bytes
    }

    /// Number of live blocks.
    pub fn allocated_blocks(&self) -> usize {
        self.allocated.len()
    }

    /// `true` when nothing is allocated: all space is free and, since freeing coalesces, made
    /// of whole top-level blocks. The chunk may then be shrunk (unshared and released).
    pub fn is_idle(&self) -> bool {
        self.allocated.is_empty()
    }

    /// The order of the largest free block, or `None` if nothing is free.
    pub fn largest_free_order(&self) -> Option<u32> {
        (self.min_order..=self.max_order)
            .rev()
            .find(|&k| !self.list(k).is_empty())
    }

    /// Number of free blocks of exactly `order` (0 for an order out of range). For stats: a pool
    /// with free bytes but no large free block is fragmented.
    pub fn free_blocks(&self, order: u32) -> usize {
        if order < self.min_order || order > self.max_order {
            return 0;
        }
        self.list(order).len()
    }

    /// `true` if [`Buddy::alloc`] of `order` would succeed now (`order` is in range and a free
    /// block of that order or larger exists).
    pub fn can_alloc(&self, order: u32) -> bool {
        self.first_nonempty_order(order).is_some()
    }

    /// The order a live block starting at `offset` was allocated with, or `None` if no live
    /// block starts there.
    pub fn allocated_order(&self, offset: u64) -> Option<u32> {
        self.allocated.get(&offset).copied()
    }

    /// Allocates a block of `order` (`1 << order` bytes) and returns its offset, which is a
    /// multiple of `1 << order`. Takes the lowest free block of the smallest order that fits,
    /// splitting it (keeping the lower half) as needed.
    ///
    /// Returns `None` if no block is free that large, or if `order` is outside
    /// `min_order..=max_order`. O(log n) per split, at most `max_order - min_order` splits.
    pub fn alloc(&mut self, order: u32) -> Option<u64> {
        let from = self.first_nonempty_order(order)?;
        let offset = self.list_mut(from).pop_first()?;
        // Split down to the requested order: keep the lower half, free the upper one.
        for k in (order..from).rev() {
            self.list_mut(k).insert(offset + (1u64 << k));
        }
        self.allocated.insert(offset, order);
        self.free_bytes -= 1u64 << order;
        Some(offset)
    }

    /// Allocates up to `n` blocks of `order`, appending their offsets to `out` (lowest first),
    /// and returns how many it allocated: fewer than `n` when space runs out, 0 for an invalid
    /// order. Meant for refilling a per-core cache in one lock hold.
    pub fn alloc_batch(&mut self, order: u32, n: usize, out: &mut Vec<u64>) -> usize {
        let mut count = 0;
        while count < n {
            let Some(offset) = self.alloc(order) else {
                break;
            };
            out.push(offset);
            count += 1;
        }
        count
    }

    /// Frees the block of `order` starting at `offset`, merging it with its buddy as long as
    /// the buddy is free.
    ///
    /// Errors (and changes nothing) unless a live block of exactly this `order` starts at
    /// `offset`: see [`BuddyError`] for the cases, checked in the order range, offset range,
    /// alignment, allocation record.
    pub fn free(&mut self, offset: u64, order: u32) -> Result<(), BuddyError> {
        self.check_free(offset, order)?;
        self.allocated.remove(&offset);
        self.free_bytes += 1u64 << order;
        let (mut offset, mut order) = (offset, order);
        while order < self.max_order {
            // The buddy is in the same top-level block (offset < len, len a multiple of the
            // top block size, order < max_order), so it is in range.
            let buddy = offset ^ (1u64 << order);
            if !self.list_mut(order).remove(&buddy) {
                break;
            }
            offset = offset.min(buddy);
            order += 1;
        }
        self.list_mut(order).insert(offset);
        Ok(())
    }

    /// Validates a free of (`offset`, `order`) without changing anything.
    fn check_free(&self, offset: u64, order: u32) -> Result<(), BuddyError> {
        if order < self.min_order || order > self.max_order {
            return Err(BuddyError::OrderOutOfRange {
                order,
                min_order: self.min_order,
                max_order: self.max_order,
            });
        }
        if offset >= self.len {
            return Err(BuddyError::OutOfRange {
                offset,
                len: self.len,
            });
        }
        let size = 1u64 << order;
        if offset % size != 0 {
            return Err(BuddyError::Misaligned {
                offset,
                order,
                size,
            });
        }
        match self.allocated.get(&offset) {
            None => Err(BuddyError::NotAllocated { offset }),
            Some(&allocated) if allocated != order => Err(BuddyError::WrongOrder {
                offset,
                given: order,
                allocated,
            }),
            Some(_) => Ok(()),
        }
    }

    /// The smallest order `>= order` with a free block, if `order` is valid.
    fn first_nonempty_order(&self, order: u32) -> Option<u32> {
        if order < self.min_order || order > self.max_order {
            return None;
        }
        (order..=self.max_order).find(|&k| !self.list(k).is_empty())
    }

    /// The free list of `order` (which must be in range).
    fn list(&self, order: u32) -> &BTreeSet<u64> {
        &self.free_lists[(order - self.min_order) as usize]
    }

    /// The free list of `order` (which must be in range), mutably.
    fn list_mut(&mut self, order: u32) -> &mut BTreeSet<u64> {
        &mut self.free_lists[(order - self.min_order) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    /// Checks the free lists against the allocation record: every free block is aligned and in
    /// range, free and live blocks tile `[0, len)` exactly, no two buddies are both free at one
    /// order, and the byte counters agree.
    fn check_invariants(b: &Buddy) {
        let mut spans: Vec<(u64, u64, bool)> = Vec::new();
        for k in b.min_order..=b.max_order {
            for &off in b.list(k) {
                assert_eq!(
                    off % (1 << k),
                    0,
                    "free block {off:#x} misaligned for order {k}"
                );
                if k < b.max_order {
                    assert!(
                        !b.list(k).contains(&(off ^ (1 << k))),
                        "free buddies {off:#x} at order {k} not coalesced"
                    );
                }
                spans.push((off, 1 << k, true));
            }
        }
        for (&off, &k) in &b.allocated {
            assert_eq!(off % (1 << k), 0);
            spans.push((off, 1 << k, false));
        }
        spans.sort_unstable();
        let mut next = 0;
        let mut free = 0;
        for (off, size, is_free) in spans {
            assert_eq!(off, next, "gap or overlap at {off:#x}");
            next = off + size;
            if is_free {
                free += size;
            }
        }
        assert_eq!(next, b.len);
        assert_eq!(free, b.free_bytes());
        assert_eq!(b.free_bytes() + b.allocated_bytes(), b.total_bytes());
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(matches!(
            Buddy::new(0, 9, 21),
            Err(BuddyError::InvalidLength { .. })
        ));
        assert!(matches!(
            Buddy::new(3 * MIB, 9, 21),
            Err(BuddyError::InvalidLength { .. })
        ));
        assert!(matches!(
            Buddy::new(2 * MIB, 22, 21),
            Err(BuddyError::InvalidOrders { .. })
        ));
        assert!(matches!(
            Buddy::new(1 << 63, 9, 63),
            Err(BuddyError::InvalidOrders { .. })
        ));
        let b = Buddy::new(6 * MIB, 9, 21).unwrap();
        assert_eq!(b.free_bytes(), 6 * MIB);
        assert_eq!(b.largest_free_order(), Some(21));
        check_invariants(&b);
    }

    #[test]
    fn splits_low_first_and_coalesces() {
        let mut b = Buddy::new(2 * MIB, 9, 21).unwrap();
        let small = b.alloc(9).unwrap();
        assert_eq!(small, 0);
        // The split left one free block of each order 9..=20 in the upper halves.
        for k in 9..21 {
            assert_eq!(b.list(k).iter().copied().collect::<Vec<_>>(), vec![1 << k]);
        }
        let page = b.alloc(12).unwrap();
        assert_eq!(page, 4 * KIB, "best fit takes the existing order-12 block");
        let next_small = b.alloc(9).unwrap();
        assert_eq!(next_small, 512);
        assert_eq!(b.largest_free_order(), Some(20));
        assert!(!b.can_alloc(21));
        check_invariants(&b);
        b.free(page, 12).unwrap();
        b.free(small, 9).unwrap();
        assert!(!b.is_idle());
        b.free(next_small, 9).unwrap();
        assert!(b.is_idle());
        assert_eq!(b.largest_free_order(), Some(21));
        assert_eq!(b.list(21).len(), 1);
        check_invariants(&b);
    }

    #[test]
    fn invalid_frees_change_nothing() {
        let mut b = Buddy::new(4 * MIB, 9, 21).unwrap();
        let a = b.alloc(12).unwrap();
        let before = b.clone();
        assert_eq!(
            b.free(a, 13),
            Err(BuddyError::WrongOrder {
                offset: a,
                given: 13,
                allocated: 12
            })
        );
        assert_eq!(
            b.free(a + 512, 9),
            Err(BuddyError::NotAllocated { offset: a + 512 })
        );
        assert!(matches!(
            b.free(a + 512, 12),
            Err(BuddyError::Misaligned { .. })
        ));
        assert!(matches!(
            b.free(4 * MIB, 12),
            Err(BuddyError::OutOfRange { .. })
        ));
        assert!(matches!(
            b.free(a, 8),
            Err(BuddyError::OrderOutOfRange { .. })
        ));
        assert!(matches!(
            b.free(a, 22),
            Err(BuddyError::OrderOutOfRange { .. })
        ));
        assert_eq!(b, before);
        b.free(a, 12).unwrap();
        assert_eq!(b.free(a, 12), Err(BuddyError::NotAllocated { offset: a }));
        assert!(b.is_idle());
    }

    #[test]
    fn exhaustion_and_batch() {
        let mut b = Buddy::new(2 * MIB, 9, 21).unwrap();
        let mut out = Vec::new();
        assert_eq!(b.alloc_batch(20, 3, &mut out), 2);
        assert_eq!(out, vec![0, MIB]);
        assert_eq!(b.free_bytes(), 0);
        assert_eq!(b.largest_free_order(), None);
        assert!(!b.can_alloc(9));
        assert_eq!(b.alloc(9), None);
        assert_eq!(b.alloc(8), None, "order below min_order");
        assert_eq!(b.alloc(22), None, "order above max_order");
        assert_eq!(b.alloc_batch(22, 5, &mut out), 0);
        for off in out.drain(..) {
            b.free(off, 20).unwrap();
        }
        assert!(b.is_idle());
        let mut out = Vec::new();
        assert_eq!(b.alloc_batch(12, 512, &mut out), 512);
        assert!(out
            .iter()
            .enumerate()
            .all(|(i, &o)| o == i as u64 * 4 * KIB));
        check_invariants(&b);
    }

    #[test]
    fn reuses_the_lowest_free_block() {
        let mut b = Buddy::new(4 * MIB, 9, 21).unwrap();
        let mut out = Vec::new();
        assert_eq!(b.alloc_batch(21, 2, &mut out), 2);
        assert_eq!(out, vec![0, 2 * MIB]);
        b.free(0, 21).unwrap();
        // The free top block at 0 is split rather than anything above it.
        assert_eq!(b.alloc(12), Some(0));
        assert_eq!(b.free_blocks(20), 1);
        assert_eq!(b.free_blocks(12), 1);
        assert_eq!(b.free_blocks(8), 0);
        b.free(2 * MIB, 21).unwrap();
        assert_eq!(
            b.alloc(21),
            Some(2 * MIB),
            "whole top block kept for large requests"
        );
        check_invariants(&b);
    }

    #[test]
    fn order_for_size_edges() {
        assert_eq!(Buddy::order_for_size(512, 9), Some(9));
        assert_eq!(Buddy::order_for_size(513, 9), Some(10));
        assert_eq!(Buddy::order_for_size(2 * MIB, 9), Some(21));
        assert_eq!(Buddy::order_for_size(1 << 62, 9), Some(62));
        assert_eq!(Buddy::order_for_size((1 << 62) + 1, 9), None);
        assert_eq!(Buddy::order_for_size(u64::MAX, 9), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u32),
        Batch(u32, usize),
        Free(usize),
        BadFree(u64, u32),
    }

    fn op(min: u32, max: u32) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (min..=max).prop_map(Op::Alloc),
            1 => (min..=max, 0usize..8).prop_map(|(o, n)| Op::Batch(o, n)),
            4 => any::<usize>().prop_map(Op::Free),
            1 => (0u64..(8 << 12), (min - 1)..=(max + 1)).prop_map(|(o, k)| Op::BadFree(o, k)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random alloc/free sequences over a 4-top-block allocator (orders 9..=14): live blocks
        /// never overlap and are aligned, free + allocated == len, frees that do not name a
        /// live block are rejected without change, and freeing everything coalesces fully.
        #[test]
        fn random_sequences_keep_invariants(ops in prop::collection::vec(op(9, 14), 1..200)) {
            let (min, max) = (9, 14);
            let len = 4u64 << max;
            let mut b = Buddy::new(len, min, max).unwrap();
            let mut live: Vec<(u64, u32)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(k) => {
                        let could = b.can_alloc(k);
                        match b.alloc(k) {
                            Some(off) => {
                                prop_assert!(could);
                                prop_assert_eq!(off % (1 << k), 0);
                                prop_assert!(off + (1 << k) <= len);
                                live.push((off, k));
                            }
                            None => {
                                prop_assert!(!could);
                                // Fully coalesced free space: nothing of order >= k is free.
                                prop_assert!(!matches!(b.largest_free_order(), Some(l) if l >= k));
                            }
                        }
                    }
                    Op::Batch(k, n) => {
                        let mut out = Vec::new();
                        let got = b.alloc_batch(k, n, &mut out);
                        prop_assert_eq!(got, out.len());
                        prop_assert!(got == n || !b.can_alloc(k));
                        live.extend(out.into_iter().map(|o| (o, k)));
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let (off, k) = live.swap_remove(i % live.len());
                        prop_assert_eq!(b.free(off, k), Ok(()));
                    }
                    Op::Free(_) => {}
                    Op::BadFree(off, k) => {
                        if live.contains(&(off, k)) {
                            continue;
                        }
                        let before = b.clone();
                        prop_assert!(b.free(off, k).is_err());
                        prop_assert_eq!(&b, &before);
                    }
                }
                let mut sorted = live.clone();
                sorted.sort_unstable();
                for w in sorted.windows(2) {
                    prop_assert!(w[0].0 + (1 << w[0].1) <= w[1].0, "overlap {:?}", w);
                }
                let used: u64 = live.iter().map(|&(_, k)| 1u64 << k).sum();
                prop_assert_eq!(b.allocated_bytes(), used);
                prop_assert_eq!(b.free_bytes() + b.allocated_bytes(), len);
                prop_assert_eq!(b.is_idle(), live.is_empty());
                check_invariants(&b);
            }
            for (off, k) in live.drain(..) {
                prop_assert_eq!(b.free(off, k), Ok(()));
            }
            prop_assert!(b.is_idle());
            prop_assert_eq!(b.free_bytes(), len);
            prop_assert_eq!(b.largest_free_order(), Some(max));
            prop_assert_eq!(b.list(max).len() as u64, len >> max);
            for k in min..max {
                prop_assert!(b.list(k).is_empty());
            }
        }
    }
}
