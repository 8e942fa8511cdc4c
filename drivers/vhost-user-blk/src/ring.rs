//! The driver side of a virtio split virtqueue, in memory the backend can write.
//!
//! # Layout (virtio 1.x §2.7), for a queue of `N` descriptors, in one pool buffer
//! ```text
//! 0                 descriptor table  N × {addr u64, len u32, flags u16, next u16}
//! 16N               avail ring        flags u16, idx u16, ring[N] u16, used_event u16
//! align4(16N+6+2N)  used ring         flags u16, idx u16, ring[N] {id u32, len u32}, avail_event u16
//! ```
//!
//! # Trust
//! The backend is untrusted (in a confidential VM it is the host). Everything it can write —
//! the whole buffer, descriptors included — is read only by value, with volatile loads, and
//! each value is checked before use:
//! - the descriptor table is write-only for us: the chain of every request is kept privately
//!   ([`SplitRing`]'s `chains`), never read back;
//! - `used.idx` may advance by at most the number of chains outstanding;
//! - a used entry's `id` must be below `N` and name the head of an outstanding chain;
//! - its `len` must not exceed the bytes that chain lets the device write.
//!
//! A violation is a [`RingError`]; the ring's private state is left untouched, and the caller
//! (the queue) treats the backend as broken. No input makes this module panic or index out of
//! bounds (see the property test).
//!
//! # Ordering
//! Descriptors and the avail entry are written before a release fence and the `avail.idx`
//! store; `used.idx` is loaded before an acquire fence and the entries. A full fence separates
//! publishing from reading `used.flags` (the kick decision), as in Linux's `virtqueue_kick_prepare`.

use std::sync::atomic::{fence, Ordering};

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// `avail.flags`: do not interrupt us (polling).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `used.flags`: the device does not want kicks.
pub const USED_F_NO_NOTIFY: u16 = 1;
/// The largest queue size allowed by the split-ring format.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// One buffer of a request, as placed in a descriptor.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Device address (the region's `guest_phys_addr` space).
    pub addr: u64,
    /// Bytes.
    pub len: u32,
    /// Whether the device writes it (else reads it).
    pub device_writes: bool,
}

/// A completion taken from the used ring, validated.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor of the completed chain (the request's token).
    pub head: u16,
    /// Bytes the device says it wrote (≤ the chain's writable bytes).
    pub len: u32,
}

/// The backend broke the ring protocol. Each message says what it wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// `used.idx` moved further than there are requests outstanding.
    #[error(
        "backend published {published} used entries but only {outstanding} requests are \
         outstanding: it is corrupting the used ring; the device is unusable"
    )]
    UsedIndexAhead {
        /// Entries the new index claims.
        published: u16,
        /// Requests outstanding.
        outstanding: usize,
    },
    /// A used entry's id is not a descriptor index.
    #[error("used entry names descriptor {id}, beyond the queue size {size}")]
    IdOutOfRange {
        /// The id written.
        id: u32,
        /// Queue size.
        size: u16,
    },
    /// A used entry names a descriptor that is not the head of an outstanding request.
    #[error(
        "used entry names descriptor {id}, which heads no outstanding request (completed twice?)"
    )]
    NotOutstanding {
        /// The id written.
        id: u32,
    },
    /// A used entry claims more bytes written than the request offered.
    #[error(
        "used entry for descriptor {id} claims {len} bytes written; the request offered {writable}"
    )]
    LenTooLarge {
        /// The id.
        id: u32,
        /// The length written.
        len: u32,
        /// The writable bytes of that chain.
        writable: u32,
    },
    /// Not enough free descriptors (a caller bug: the queue's semaphore should prevent it).
    #[error("{wanted} descriptors wanted, {free} free")]
    Full {
        /// Descriptors wanted.
        wanted: usize,
        /// Descriptors free.
        free: usize,
    },
    /// An empty chain or one longer than the queue (a caller bug).
    #[error("a chain of {0} descriptors cannot be queued")]
    BadChain(usize),
}

/// Byte offsets of the three parts for a queue of `size` descriptors.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Descriptor table offset (always 0).
    pub desc: usize,
    /// Avail ring offset.
    pub avail: usize,
    /// Used ring offset.
    pub used: usize,
    /// Total bytes.
    pub total: usize,
}

impl Layout {
    /// The layout for `size` descriptors.
    pub fn new(size: u16) -> Layout {
        let n = size as usize;
        let avail = 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        Layout {
            desc: 0,
            avail,
            used,
            total: used + 6 + 8 * n,
        }
    }
}

/// Private record of one outstanding chain.
#[derive(Clone, Debug)]
struct Chain {
    /// Descriptor indices, head first.
    descs: Vec<u16>,
    /// Bytes the device may write.
    writable: u32,
}

/// The driver side of one split virtqueue. Not thread-safe by itself: the queue wraps it in a
/// mutex.
#[derive(Debug)]
pub struct SplitRing {
    base: *mut u8,
    size: u16,
    layout: Layout,
    /// Free descriptor indices.
    free: Vec<u16>,
    /// Our copy of `avail.idx` (never read back from shared memory).
    next_avail: u16,
    /// Used entries consumed so far (wrapping).
    last_used: u16,
    /// Outstanding chains by head index.
    chains: Vec<Option<Chain>>,
    outstanding: usize,
}

// SAFETY: `base` points into memory owned by the queue (a pool buffer) for the ring's life;
// the ring is used from one thread at a time (the queue's mutex).
unsafe impl Send for SplitRing {}

impl SplitRing {
    /// A ring of `size` descriptors over `Layout::new(size).total` bytes at `base`, which
    /// must be zeroed (a fresh pool buffer is).
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `Layout::new(size).total` bytes, aligned to
    /// 16, for the ring's whole life, and accessed by no one else in this process.
    pub unsafe fn new(base: *mut u8, size: u16) -> Result<SplitRing, RingError> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(RingError::BadChain(size as usize));
        }
        Ok(SplitRing {
            base,
            size,
            layout: Layout::new(size),
            free: (0..size).rev().collect(),
            next_avail: 0,
            last_used: 0,
            chains: vec![None; size as usize],
            outstanding: 0,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Offsets of the parts.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Requests outstanding.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// The head index the next [`SplitRing::add`] will use, if any descriptor is free (lets
    /// the caller fill per-head state, such as a request header slot, before publishing).
    pub fn next_head(&self) -> Option<u16> {
        self.free.last().copied()
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Stores a little-endian `u16` at `off`.
    fn store16(&self, off: usize, v: u16) {
        debug_assert!(off + 2 <= self.layout.total);
        // SAFETY: in bounds of the ring memory (offsets come from `layout` and indices < size);
        // 2-aligned; volatile because the backend reads it concurrently.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u16>(), v.to_le()) }
    }

    /// Stores a little-endian `u32` at `off`.
    fn store32(&self, off: usize, v: u32) {
        debug_assert!(off + 4 <= self.layout.total);
        // SAFETY: as in `store16`, 4-aligned.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u32>(), v.to_le()) }
    }

    /// Stores a little-endian `u64` at `off`.
    fn store64(&self, off: usize, v: u64) {
        debug_assert!(off + 8 <= self.layout.total);
        // SAFETY: as in `store16`, 8-aligned (descriptors are 16 bytes from a 16-aligned base).
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u64>(), v.to_le()) }
    }

    /// Loads a `u16` the backend may write: one volatile read, by value.
    fn load16(&self, off: usize) -> u16 {
        debug_assert!(off + 2 <= self.layout.total);
        // SAFETY: in bounds, aligned; a by-value volatile copy (no reference to shared memory).
        u16::from_le(unsafe { std::ptr::read_volatile(self.base.add(off).cast::<u16>()) })
    }

    /// Loads a `u32` the backend may write: one volatile read, by value.
    fn load32(&self, off: usize) -> u32 {
        debug_assert!(off + 4 <= self.layout.total);
        // SAFETY: as in `load16`.
        u32::from_le(unsafe { std::ptr::read_volatile(self.base.add(off).cast::<u32>()) })
    }

    /// Sets or clears `avail.flags`' NO_INTERRUPT bit (polling mode sets it).
    pub fn set_no_interrupt(&mut self, on: bool) {
        self.store16(self.layout.avail, if on { AVAIL_F_NO_INTERRUPT } else { 0 });
        fence(Ordering::SeqCst);
    }

    /// Writes `chain` into free descriptors, publishes its head in the avail ring and returns
    /// the head (the request's token). Does not kick: see [`SplitRing::needs_kick`].
    pub fn add(&mut self, chain: &[Desc]) -> Result<u16, RingError> {
        if chain.is_empty() || chain.len() > self.size as usize {
            return Err(RingError::BadChain(chain.len()));
        }
        if self.free.len() < chain.len() {
            return Err(RingError::Full {
                wanted: chain.len(),
                free: self.free.len(),
            });
        }
        let at = self.free.len() - chain.len();
        let idx: Vec<u16> = self.free.drain(at..).rev().collect();
        let mut writable: u32 = 0;
        for (i, d) in chain.iter().enumerate() {
            let off = self.layout.desc + 16 * idx[i] as usize;
            let mut flags = 0;
            if d.device_writes {
                flags |= DESC_F_WRITE;
                writable = writable.saturating_add(d.len);
            }
            let next = if i + 1 < chain.len() {
                flags |= DESC_F_NEXT;
                idx[i + 1]
            } else {
                0
            };
            self.store64(off, d.addr);
            self.store32(off + 8, d.len);
            self.store16(off + 12, flags);
            self.store16(off + 14, next);
        }
        let head = idx[0];
        let slot = (self.next_avail % self.size) as usize;
        self.store16(self.layout.avail + 4 + 2 * slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::Release);
        self.store16(self.layout.avail + 2, self.next_avail);
        self.chains[head as usize] = Some(Chain {
            descs: idx,
            writable,
        });
        self.outstanding += 1;
        Ok(head)
    }

    /// Whether the backend wants a kick for what was just published (`used.flags`).
    pub fn needs_kick(&self) -> bool {
        fence(Ordering::SeqCst);
        self.load16(self.layout.used) & USED_F_NO_NOTIFY == 0
    }

    /// Takes the next completion from the used ring, validated; `Ok(None)` if there is none.
    /// On error nothing is consumed.
    pub fn pop_used(&mut self) -> Result<Option<Used>, RingError> {
        let published = self.load16(self.layout.used + 2);
        let pending = published.wrapping_sub(self.last_used);
        if pending == 0 {
            return Ok(None);
        }
        if pending as usize > self.outstanding {
            return Err(RingError::UsedIndexAhead {
                published: pending,
                outstanding: self.outstanding,
            });
        }
        fence(Ordering::Acquire);
        let slot = (self.last_used % self.size) as usize;
        let off = self.layout.used + 4 + 8 * slot;
        let id = self.load32(off);
        let len = self.load32(off + 4);
        let used = self.validate(id, len)?;
        let chain = self.chains[used.head as usize]
            .take()
            .expect("validated as outstanding");
        self.free.extend(chain.descs);
        self.outstanding -= 1;
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some(used))
    }

    /// Checks one used entry (`id`, `len`, as read once from shared memory) against our
    /// private record of outstanding chains.
    pub fn validate(&self, id: u32, len: u32) -> Result<Used, RingError> {
        if id >= self.size as u32 {
            return Err(RingError::IdOutOfRange {
                id,
                size: self.size,
            });
        }
        let Some(chain) = &self.chains[id as usize] else {
            return Err(RingError::NotOutstanding { id });
        };
        if len > chain.writable {
            return Err(RingError::LenTooLarge {
                id,
                len,
                writable: chain.writable,
            });
        }
        Ok(Used {
            head: id as u16,
            len,
        })
    }

    /// Forgets every outstanding chain (the backend is gone), returning their heads.
    pub fn abandon_all(&mut self) -> Vec<u16> {
        let mut heads = Vec::new();
        for (i, c) in self.chains.iter_mut().enumerate() {
            if let Some(c) = c.take() {
                self.free.extend(c.descs);
                heads.push(i as u16);
            }
        }
        self.outstanding = 0;
        heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Ring memory for tests: 16-aligned, zeroed, owned by the test (the "backend" writes it
    /// through the same raw pointer).
    struct Mem(Vec<u128>);
    impl Mem {
        fn new(size: u16) -> Mem {
            Mem(vec![0u128; Layout::new(size).total.div_ceil(16)])
        }
        fn ptr(&mut self) -> *mut u8 {
            self.0.as_mut_ptr().cast()
        }
    }

    /// Plays the backend: writes a used entry and bumps used.idx.
    fn complete(base: *mut u8, l: Layout, size: u16, used_idx: u16, id: u32, len: u32) {
        let slot = (used_idx % size) as usize;
        // SAFETY: test memory of `l.total` bytes; offsets within it.
        unsafe {
            std::ptr::write_volatile(base.add(l.used + 4 + 8 * slot).cast::<u32>(), id);
            std::ptr::write_volatile(base.add(l.used + 8 + 8 * slot).cast::<u32>(), len);
            std::ptr::write_volatile(base.add(l.used + 2).cast::<u16>(), used_idx + 1);
        }
    }

    fn req(write_len: u32) -> [Desc; 3] {
        [
            Desc {
                addr: 0x1000,
                len: 16,
                device_writes: false,
            },
            Desc {
                addr: 0x2000,
                len: write_len,
                device_writes: true,
            },
            Desc {
                addr: 0x3000,
                len: 1,
                device_writes: true,
            },
        ]
    }

    #[test]
    fn add_then_complete() {
        let mut m = Mem::new(8);
        // SAFETY: `m` outlives the ring and is 16-aligned.
        let mut r = unsafe { SplitRing::new(m.ptr(), 8) }.unwrap();
        let predicted = r.next_head().unwrap();
        let h = r.add(&req(4096)).unwrap();
        assert_eq!(h, predicted);
        assert_eq!(r.free_descriptors(), 5);
        assert_eq!(r.pop_used().unwrap(), None);
        complete(m.ptr(), r.layout(), 8, 0, h as u32, 4097);
        assert_eq!(r.pop_used().unwrap(), Some(Used { head: h, len: 4097 }));
        assert_eq!(r.free_descriptors(), 8);
        assert_eq!(r.outstanding(), 0);
    }

    #[test]
    fn bad_entries_are_typed_errors() {
        let mut m = Mem::new(8);
        // SAFETY: as above.
        let mut r = unsafe { SplitRing::new(m.ptr(), 8) }.unwrap();
        let h = r.add(&req(512)).unwrap();
        complete(m.ptr(), r.layout(), 8, 0, 99, 0);
        assert!(matches!(
            r.pop_used(),
            Err(RingError::IdOutOfRange { id: 99, .. })
        ));
        complete(m.ptr(), r.layout(), 8, 0, (h as u32 + 1) % 8, 0);
        assert!(matches!(
            r.pop_used(),
            Err(RingError::NotOutstanding { .. })
        ));
        complete(m.ptr(), r.layout(), 8, 0, h as u32, 514);
        assert!(matches!(r.pop_used(), Err(RingError::LenTooLarge { .. })));
        complete(m.ptr(), r.layout(), 8, 1, h as u32, 0);
        assert!(matches!(
            r.pop_used(),
            Err(RingError::UsedIndexAhead { .. })
        ));
        assert_eq!(r.outstanding(), 1, "errors consume nothing");
    }

    proptest! {
        /// Arbitrary used-ring contents (index and every entry) never panic: each pop is a
        /// valid completion of an outstanding request or a typed error, and the ring's own
        /// bookkeeping stays consistent.
        #[test]
        fn arbitrary_used_ring_never_panics(
            n_reqs in 0usize..6,
            used_idx in any::<u16>(),
            used_flags in any::<u16>(),
            entries in proptest::collection::vec((any::<u32>(), any::<u32>()), 16),
        ) {
            let size = 16u16;
            let mut m = Mem::new(size);
            // SAFETY: as above.
            let mut r = unsafe { SplitRing::new(m.ptr(), size) }.unwrap();
            let mut heads = Vec::new();
            for _ in 0..n_reqs {
                heads.push(r.add(&req(4096)).unwrap());
            }
            let l = r.layout();
            let base = m.ptr();
            // SAFETY: writes inside the test memory.
            unsafe {
                std::ptr::write_volatile(base.add(l.used).cast::<u16>(), used_flags);
                for (i, (id, len)) in entries.iter().enumerate() {
                    std::ptr::write_volatile(base.add(l.used + 4 + 8 * i).cast::<u32>(), *id);
                    std::ptr::write_volatile(base.add(l.used + 8 + 8 * i).cast::<u32>(), *len);
                }
                std::ptr::write_volatile(base.add(l.used + 2).cast::<u16>(), used_idx);
            }
            let _ = r.needs_kick();
            let mut completed = Vec::new();
            for _ in 0..32 {
                match r.pop_used() {
                    Ok(Some(u)) => {
                        prop_assert!(heads.contains(&u.head));
                        prop_assert!(!completed.contains(&u.head));
                        prop_assert!(u.len <= 4097);
                        completed.push(u.head);
                    }
                    Ok(None) => break,
                    Err(_) => break,
                }
            }
            prop_assert_eq!(r.outstanding(), n_reqs - completed.len());
            prop_assert_eq!(r.free_descriptors(), size as usize - 3 * r.outstanding());
            prop_assert_eq!(r.abandon_all().len(), n_reqs - completed.len());
            prop_assert_eq!(r.free_descriptors(), size as usize);
        }
    }
}
