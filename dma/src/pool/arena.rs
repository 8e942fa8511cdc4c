//! The arena: every chunk the pool holds, each with its buddy allocator, behind the pool's one
//! shared lock.
//!
//! The arena is plain data; `Shared::global` guards it. It never makes a system call:
//! chunks are made and shared by the grower (or setup, or the immediate path's transient
//! allocation) *before* they are inserted, and removed chunks are unshared and freed *after*
//! they leave, always outside the lock.
//!
//! Allocation prefers the lowest-numbered chunk with room, so prefill chunks are used first and
//! chunks added under a spike are the first to drain and be given back.

use std::ptr::NonNull;
use std::time::Instant;

use crate::memory::Chunk;
use crate::wait::LazyNow;
use crate::DeviceAddr;

use super::buddy::Buddy;

/// One buffer's worth of a chunk: where it is for the CPU and for the device.
///
/// A block is a capability: whoever holds it owns those bytes until it is given back to the
/// arena. Blocks are never cloned.
///
/// Three 8-byte words, so that the hot path moves it (through the per-CPU caches, into and out
/// of buffers) in whole words; the pointer's niche makes `Option<Block>` the same size.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Block {
    /// First byte, in this process.
    pub ptr: NonNull<u8>,
    /// First byte, for the device.
    pub dev: DeviceAddr,
    /// The chunk's slot in the arena (bits 0–31), log2 of the block size (bits 32–39),
    /// whether the chunk is transient (bit 40: never cached, it must drain promptly), and
    /// whether the block is known to be all zero (bit 41: the pre-zeroed mark, see
    /// [`Block::mark_zeroed`]).
    meta: u64,
}

// SAFETY: a Block is an exclusive claim on a range of a chunk that outlives it (chunks are only
// freed when idle); the pointer carries no thread affinity.
unsafe impl Send for Block {}
// SAFETY: shared references to a Block only read its fields.
unsafe impl Sync for Block {}

const _: () = assert!(std::mem::size_of::<Block>() == 24);
const _: () = assert!(std::mem::size_of::<Option<Block>>() == 24);

impl Block {
    const TRANSIENT: u64 = 1 << 40;
    const ZEROED: u64 = 1 << 41;

    fn new(slot: u32, order: u32, ptr: NonNull<u8>, dev: DeviceAddr, transient: bool) -> Block {
        debug_assert!(order < 64);
        Block {
            ptr,
            dev,
            meta: slot as u64 | (order as u64) << 32 | if transient { Block::TRANSIENT } else { 0 },
        }
    }

    /// The chunk's slot in the arena.
    #[inline]
    pub fn slot(&self) -> u32 {
        self.meta as u32
    }

    /// log2 of the block size.
    #[inline]
    pub fn order(&self) -> u32 {
        (self.meta >> 32) as u8 as u32
    }

    /// Whether the block lives in a transient chunk.
    #[inline]
    pub fn transient(&self) -> bool {
        self.meta & Block::TRANSIENT != 0
    }

    /// The block's size in bytes.
    #[inline]
    pub fn size(&self) -> usize {
        1usize << self.order()
    }

    /// Whether the block carries the pre-zeroed mark: every one of its bytes is zero.
    ///
    /// Only free blocks carry it (in a per-CPU cache's zeroed list), and only after
    /// [`Block::mark_zeroed`]; the arena mints blocks without it, and a buffer clears it as it
    /// takes the block ([`Block::take_zeroed`]), so a block a caller or device may have
    /// written never has it.
    #[inline]
    pub fn zeroed(&self) -> bool {
        self.meta & Block::ZEROED != 0
    }

    /// Marks the block as all zero.
    ///
    /// # Safety
    /// Every byte of the block must be zero, written by the caller (the grower's pre-zeroing
    /// pass) while it owned the block, and nobody else (no buffer, no device) may have the
    /// block's address until it is handed out again.
    #[inline]
    pub unsafe fn mark_zeroed(&mut self) {
        self.meta |= Block::ZEROED;
    }

    /// Clears the pre-zeroed mark (the block is about to be handed to a caller, who may write
    /// it) and returns whether it was set.
    #[inline(always)]
    pub fn take_zeroed(&mut self) -> bool {
        let was = self.zeroed();
        self.meta &= !Block::ZEROED;
        was
    }
}

/// One chunk in the arena.
#[derive(Debug)]
pub(crate) struct ChunkSlot {
    pub chunk: Chunk,
    pub dev: DeviceAddr,
    pub buddy: Buddy,
    /// When the chunk last became wholly free (None while anything is allocated).
    pub idle_since: Option<Instant>,
    /// Made by the immediate path for one burst; given back as soon as it is idle.
    pub transient: bool,
}

/// All chunks, their allocators, and the byte counts derived from them.
#[derive(Debug, Default)]
pub(crate) struct Arena {
    slots: Vec<Option<ChunkSlot>>,
    /// Free bytes in non-transient chunks' allocators (per-core caches not included).
    pub free_bytes: u64,
    /// Bytes of every chunk held, transient ones included.
    pub capacity_bytes: u64,
    /// Bytes taken out of the allocators (in use plus cached in per-core caches).
    pub allocated_bytes: u64,
    /// Chunks held.
    pub chunks: u64,
    /// The highest `allocated_bytes` since the grower last looked (it folds this into its
    /// decaying peak and resets it).
    pub allocated_high: u64,
}

impl Arena {
    /// Adds a chunk (already shared at `dev`) and returns its slot.
    pub fn insert(&mut self, chunk: Chunk, dev: DeviceAddr, buddy: Buddy, transient: bool) -> u32 {
        let len = chunk.len() as u64;
        let slot = ChunkSlot {
            chunk,
            dev,
            buddy,
            idle_since: Some(Instant::now()),
            transient,
        };
        self.capacity_bytes += len;
        self.chunks += 1;
        if !transient {
            self.free_bytes += len;
        }
        match self.slots.iter().position(Option::is_none) {
            Some(i) => {
                self.slots[i] = Some(slot);
                i as u32
            }
            None => {
                self.slots.push(Some(slot));
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Takes an idle chunk out of the arena (to be unshared and freed by the caller outside the
    /// lock). Returns None if the slot is empty or anything in it is still allocated.
    pub fn remove_idle(&mut self, slot: u32) -> Option<ChunkSlot> {
        let s = self.slots.get_mut(slot as usize)?;
        if !s.as_ref()?.buddy.is_idle() {
            return None;
        }
        let taken = s.take()?;
        let len = taken.chunk.len() as u64;
        self.capacity_bytes -= len;
        self.chunks -= 1;
        if !taken.transient {
            self.free_bytes -= len;
        }
        Some(taken)
    }

    /// Allocates a block of `order` from the lowest chunk with room. Transient chunks are used
    /// only if `use_transient` (the immediate path).
    pub fn alloc(&mut self, order: u32, use_transient: bool) -> Option<Block> {
        for (i, s) in self.slots.iter_mut().enumerate() {
            let Some(s) = s else { continue };
            if s.transient && !use_transient {
                continue;
            }
            if let Some(offset) = s.buddy.alloc(order) {
                s.idle_since = None;
                let size = 1u64 << order;
                self.allocated_bytes += size;
                self.allocated_high = self.allocated_high.max(self.allocated_bytes);
                if !s.transient {
                    self.free_bytes -= size;
                }
                return Some(Arena::block(i as u32, s, order, offset));
            }
        }
        None
    }

    /// Allocates up to `n` blocks of `order` from non-transient chunks into `out` (a per-core
    /// cache refill); returns how many.
    pub fn alloc_batch(&mut self, order: u32, n: usize, out: &mut Vec<Block>) -> usize {
        let mut got = 0;
        let mut offsets = Vec::with_capacity(n);
        for (i, s) in self.slots.iter_mut().enumerate() {
            if got == n {
                break;
            }
            let Some(s) = s else { continue };
            if s.transient {
                continue;
            }
            offsets.clear();
            let k = s.buddy.alloc_batch(order, n - got, &mut offsets);
            if k == 0 {
                continue;
            }
            s.idle_since = None;
            let bytes = (k as u64) << order;
            self.allocated_bytes += bytes;
            self.allocated_high = self.allocated_high.max(self.allocated_bytes);
            self.free_bytes -= bytes;
            out.extend(
                offsets
                    .iter()
                    .map(|&off| Arena::block(i as u32, s, order, off)),
            );
            got += k;
        }
        got
    }

    fn block(slot: u32, s: &ChunkSlot, order: u32, offset: u64) -> Block {
        // SAFETY: offset + (1 << order) lies inside the chunk (the buddy manages [0, len)), so
        // the pointer stays within the chunk's mapping.
        let ptr = unsafe { NonNull::new_unchecked(s.chunk.as_ptr().add(offset as usize)) };
        Block::new(slot, order, ptr, s.dev.offset(offset), s.transient)
    }

    /// Gives a block back. Returns the slot if it was a transient chunk that is now idle (the
    /// caller retires it). Reads the clock (`now`) only if the chunk goes idle.
    ///
    /// A block that does not belong here is a bug in the pool (blocks are capabilities minted
    /// only by this arena); it is reported and leaked rather than corrupting the allocator.
    pub fn free(&mut self, block: Block, now: &mut LazyNow) -> Option<u32> {
        let Some(Some(s)) = self.slots.get_mut(block.slot() as usize) else {
            debug_assert!(false, "block for an empty slot: {block:?}");
            return None;
        };
        if let Err(e) = s.buddy.free(block.dev.0 - s.dev.0, block.order()) {
            debug_assert!(false, "bad free {block:?}: {e}");
            return None;
        }
        let size = block.size() as u64;
        self.allocated_bytes -= size;
        if !s.transient {
            self.free_bytes += size;
        }
        if s.buddy.is_idle() {
            s.idle_since = Some(now.get());
            if s.transient {
                return Some(block.slot());
            }
        }
        None
    }

    /// Non-transient chunks idle since before `before`, newest slot first.
    pub fn idle_candidates(&self, before: Instant) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let s = s.as_ref()?;
                (!s.transient && s.idle_since.is_some_and(|t| t <= before)).then_some(i as u32)
            })
            .collect();
        v.reverse();
        v
    }

    /// The length of the chunk in `slot`.
    pub fn chunk_len(&self, slot: u32) -> Option<u64> {
        Some(self.slots.get(slot as usize)?.as_ref()?.chunk.len() as u64)
    }

    /// Takes every chunk out, whatever its state (pool teardown).
    pub fn drain_all(&mut self) -> Vec<ChunkSlot> {
        self.free_bytes = 0;
        self.capacity_bytes = 0;
        self.chunks = 0;
        self.slots.drain(..).flatten().collect()
    }
}
