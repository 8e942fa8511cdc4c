//! The driver side of a virtio split virtqueue (virtio 1.x §2.7) in memory the device can
//! write, with an untrusting used-ring reader. One implementation for Tidepool's virtio drivers
//! (virtio-net over VFIO, vhost-user-blk over shared memory); each keeps its own ownership layer
//! on top (which buffers a request holds, what a completion hands back) and passes it in as the
//! per-chain token `T` of [`SplitRing<T>`].
//!
//! # Layout, for a queue of `N` descriptors, in one zeroed buffer ([`Layout`])
//! ```text
//! 0                 descriptor table  N × {addr u64, len u32, flags u16, next u16}
//! 16N               avail ring        flags u16, idx u16, ring[N] u16, used_event u16
//! align4(16N+6+2N)  used ring         flags u16, idx u16, ring[N] {id u32, len u32}, avail_event u16
//! ```
//! For 256 entries that is 6,670 bytes.
//!
//! # Chains and tokens
//! [`SplitRing::add`] writes a chain of one or more descriptors ([`Desc`]) into free
//! descriptors and its head into the next avail slot, and keeps the caller's token with the
//! head until the device hands the chain back ([`SplitRing::pop_used`] returns it in [`Used`])
//! or the caller takes every token back after a reset ([`SplitRing::abandon_all`]). A chain
//! costs no allocation: descriptor ids come from a free list sized once, and the links of a
//! chain are kept in a private array (the descriptor table is write-only for us, never read
//! back).
//!
//! # Publishing
//! `add` does not make the chain visible: [`SplitRing::publish`] does, for every chain added
//! since the last publish, with one store of `avail.idx`; [`SplitRing::needs_kick`] then says
//! whether the device wants a doorbell (`used.flags`). A driver that batches (virtio-net) adds
//! a batch and publishes once; one that does not (vhost-user-blk) publishes after each add.
//!
//! # Trust
//! The device (or vhost-user backend; in a confidential VM, the host) is untrusted. Everything
//! it can write — the whole buffer, descriptors included — is accessed only through the raw
//! base pointer, by value, with volatile loads and stores; no Rust reference is ever formed
//! over it. Each used-ring field is read once and checked before use:
//! - `used.idx` may run ahead of our cursor by at most the number of chains outstanding
//!   ([`RingError::IndexAhead`]);
//! - an entry's `id` must be below `N` ([`RingError::IdOutOfRange`]) and name the head of an
//!   outstanding chain ([`RingError::NotOutstanding`]: catches duplicates, made-up ids and ids
//!   of the middle of a chain);
//! - its `len` must not exceed what that chain allows ([`RingError::LenTooLong`]): the bytes
//!   of its device-writable descriptors, or, for a chain the device only reads, the bytes
//!   posted (the spec says 0 there, but devices differ and Linux ignores it; virtio-net's TX
//!   queue has always accepted up to the posted length, and a working device must not be
//!   failed for it).
//!
//! A violation consumes nothing and *breaks* the ring: from then on `pop_used` and `add`
//! return [`RingError::Broken`], and the tokens stay with the ring until the caller takes them
//! back after resetting the device ([`SplitRing::abandon_all`]) — or leaks them, if the reset
//! failed and the device may still DMA into their memory. No input makes this module panic or
//! index out of bounds (property test below; fuzz targets in both drivers).
//!
//! # Ordering
//! Descriptors and avail slots are written before a release fence and the `avail.idx` store;
//! a full fence separates that store from the read of `used.flags` that decides the doorbell
//! (as Linux's `virtqueue_kick_prepare`: NO_NOTIFY is a hint; missing a concurrent clear only
//! costs a doorbell the device asked for before seeing our index, which it rechecks). `used.idx`
//! is loaded before an acquire fence and the entries it covers.
//!
//! # Locking
//! None: every mutating method takes `&mut self`; the owner serialises (virtio-net owns its
//! queues, vhost-user-blk wraps each in a mutex).

use std::sync::atomic::{fence, Ordering};

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// `avail.flags`: do not interrupt us (polling).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `used.flags`: the device does not want doorbells.
pub const USED_F_NO_NOTIFY: u16 = 1;
/// The largest queue size allowed by the split-ring format.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// One buffer of a chain, as placed in a descriptor.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Device address.
    pub addr: u64,
    /// Bytes.
    pub len: u32,
    /// Whether the device writes it (else reads it).
    pub device_writes: bool,
}

/// A completion taken from the used ring, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Used<T> {
    /// Head descriptor of the completed chain.
    pub head: u16,
    /// Bytes the device says it wrote (≤ what the chain allows).
    pub len: u32,
    /// The token the chain was added with.
    pub token: T,
}

/// The device broke the ring protocol (or, for the last three, the caller asked for the
/// impossible). Each message says what the device wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// `used.idx` ran further ahead than the chains outstanding.
    #[error("queue {queue}: the device's used index {used_idx} is {ahead} entries ahead of ours ({last_used}) but only {outstanding} requests are outstanding: it is corrupting the used ring; reset it")]
    IndexAhead {
        /// Queue index.
        queue: u16,
        /// The device's `used.idx`.
        used_idx: u16,
        /// Our cursor.
        last_used: u16,
        /// The distance.
        ahead: u16,
        /// Chains outstanding.
        outstanding: usize,
    },
    /// A used entry's id is not a descriptor index.
    #[error("queue {queue}: used entry names descriptor {id}, beyond the queue size {size}; the device is misbehaving: reset it")]
    IdOutOfRange {
        /// Queue index.
        queue: u16,
        /// The id written.
        id: u32,
        /// Queue size.
        size: u16,
    },
    /// A used entry names a descriptor that is not the head of an outstanding chain.
    #[error("queue {queue}: used entry names descriptor {id}, which heads no outstanding request (completed twice or made up); the device is misbehaving: reset it")]
    NotOutstanding {
        /// Queue index.
        queue: u16,
        /// The id written.
        id: u32,
    },
    /// A used entry claims more bytes than the chain allows (module docs).
    #[error("queue {queue}: used entry for descriptor {id} claims {len} bytes written; the request offered {allowed}; the device is misbehaving: reset it")]
    LenTooLong {
        /// Queue index.
        queue: u16,
        /// The id.
        id: u32,
        /// The length written.
        len: u32,
        /// What the chain allows.
        allowed: u32,
    },
    /// An earlier violation broke this queue; reset the device.
    #[error("queue {0} is broken by an earlier device error; reset the device and set the queue up again")]
    Broken(u16),
    /// Not enough free descriptors (a caller bug where the caller budgets descriptors).
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
    /// A queue size that is not a power of two in 1..=32768 (a caller bug).
    #[error("queue size {0} is not a power of two in 1..=32768")]
    BadSize(u16),
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
    pub const fn new(size: u16) -> Layout {
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

/// Private record of one outstanding chain, kept at its head.
#[derive(Debug)]
struct Head<T> {
    token: T,
    /// Descriptors in the chain (links in `SplitRing::next`).
    descs: u16,
    /// The most bytes a used entry may claim for it.
    allowed: u32,
}

/// The driver side of one split virtqueue over ring memory at a raw base pointer; `T` is what
/// the owner keeps with each outstanding chain. See the module docs.
#[derive(Debug)]
pub struct SplitRing<T> {
    base: *mut u8,
    queue: u16,
    size: u16,
    /// `size - 1` (size is a power of two).
    mask: u16,
    layout: Layout,
    /// Free descriptor ids (capacity `size`, never grows).
    free: Vec<u16>,
    /// Private copy of each descriptor's `next` while it is in a chain (never read back from
    /// shared memory).
    next: Vec<u16>,
    /// Outstanding chains by head id.
    heads: Vec<Option<Head<T>>>,
    /// Our `avail.idx`, including chains added but not yet published.
    next_avail: u16,
    /// The `avail.idx` last stored for the device.
    published: u16,
    /// Used entries consumed (wrapping).
    last_used: u16,
    outstanding: usize,
    broken: bool,
}

// SAFETY: `base` points into memory owned by the ring's owner for the ring's whole life (the
// contract of `SplitRing::new`) and is only accessed through `&mut self` for writes; moving the
// ring to another thread moves that access with it. The tokens move too, hence `T: Send`.
unsafe impl<T: Send> Send for SplitRing<T> {}
// SAFETY: the `&self` methods only load ring memory by value (volatile), which is sound
// concurrently with other loads; every store needs `&mut self`.
unsafe impl<T: Sync> Sync for SplitRing<T> {}

impl<T> SplitRing<T> {
    /// A ring of `size` descriptors (a power of two, 1..=32768) for queue number `queue`, over
    /// `Layout::new(size).total` bytes at `base`, which must be zeroed (a fresh pool buffer
    /// is).
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `Layout::new(size).total` bytes, aligned to
    /// 16, for the ring's whole life, and accessed by no one else in this process while the
    /// ring lives (the device, or a test playing it, may write it at any time).
    pub unsafe fn new(base: *mut u8, queue: u16, size: u16) -> Result<SplitRing<T>, RingError> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(RingError::BadSize(size));
        }
        debug_assert_eq!(base as usize % 16, 0, "ring memory must be 16-aligned");
        Ok(SplitRing {
            base,
            queue,
            size,
            mask: size - 1,
            layout: Layout::new(size),
            free: (0..size).rev().collect(),
            next: vec![0; usize::from(size)],
            heads: (0..size).map(|_| None).collect(),
            next_avail: 0,
            published: 0,
            last_used: 0,
            outstanding: 0,
            broken: false,
        })
    }

    /// The queue number (named in errors).
    #[inline]
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// Queue size.
    #[inline]
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Offsets of the parts.
    #[inline]
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Chains outstanding (added, not yet completed or abandoned).
    #[inline]
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Free descriptors.
    #[inline]
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// The head id the next [`SplitRing::add`] will use, if any descriptor is free (lets the
    /// caller fill per-head state, such as a request header slot, before adding).
    #[inline]
    pub fn next_head(&self) -> Option<u16> {
        self.free.last().copied()
    }

    /// Whether a device error broke the ring.
    #[inline]
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Stores a little-endian `u16` at `off`.
    #[inline(always)]
    fn store16(&mut self, off: usize, v: u16) {
        debug_assert!(off + 2 <= self.layout.total);
        // SAFETY: in bounds of the ring memory (offsets come from `layout` and ids < size),
        // 2-aligned (16-aligned base, even offsets); volatile and by value because the device
        // reads (and may write) it concurrently.
        unsafe { self.base.add(off).cast::<u16>().write_volatile(v.to_le()) }
    }

    /// Loads a `u16` the device may write: one volatile read, by value.
    #[inline(always)]
    fn load16(&self, off: usize) -> u16 {
        debug_assert!(off + 2 <= self.layout.total);
        // SAFETY: as in `store16`; a by-value copy, no reference to shared memory.
        u16::from_le(unsafe { self.base.add(off).cast::<u16>().read_volatile() })
    }

    /// Loads a `u32` the device may write: one volatile read, by value.
    #[inline(always)]
    fn load32(&self, off: usize) -> u32 {
        debug_assert!(off + 4 <= self.layout.total);
        // SAFETY: as in `load16`; 4-aligned (used entries are 8 bytes from a 4-aligned offset).
        u32::from_le(unsafe { self.base.add(off).cast::<u32>().read_volatile() })
    }

    /// Writes descriptor `id`.
    #[inline(always)]
    fn write_desc(&mut self, id: u16, d: &Desc, flags: u16, next: u16) {
        let off = self.layout.desc + 16 * usize::from(id);
        debug_assert!(off + 16 <= self.layout.total);
        // SAFETY: id < size, so the 16 bytes lie in the descriptor table at the start of the
        // ring memory, 16-aligned; volatile stores by value (the device reads the table).
        unsafe {
            let p = self.base.add(off);
            p.cast::<u64>().write_volatile(d.addr.to_le());
            p.add(8).cast::<u32>().write_volatile(d.len.to_le());
            p.add(12).cast::<u16>().write_volatile(flags.to_le());
            p.add(14).cast::<u16>().write_volatile(next.to_le());
        }
    }

    /// Sets or clears `avail.flags`' NO_INTERRUPT bit (polling mode sets it). After clearing
    /// it, re-check [`SplitRing::has_used`] before sleeping: a completion may have arrived
    /// while interrupts were off.
    pub fn set_no_interrupt(&mut self, on: bool) {
        self.store16(self.layout.avail, if on { AVAIL_F_NO_INTERRUPT } else { 0 });
        fence(Ordering::SeqCst);
    }

    /// Writes `chain` into free descriptors and its head into the next avail slot, keeps
    /// `token` with it, and returns the head (the [`SplitRing::next_head`] predicted). Does not
    /// publish: see [`SplitRing::publish`]. Gives the token back with the error on a broken
    /// ring, an empty or too long chain, or too few free descriptors; nothing changes then.
    #[inline]
    pub fn add(&mut self, chain: &[Desc], token: T) -> Result<u16, (RingError, T)> {
        let n = chain.len();
        if self.broken {
            return Err((RingError::Broken(self.queue), token));
        }
        if n == 0 || n > usize::from(self.size) {
            return Err((RingError::BadChain(n), token));
        }
        let free = self.free.len();
        if free < n {
            return Err((RingError::Full { wanted: n, free }, token));
        }
        // Ids are taken from the top of the free list: head = free[top], then free[top - 1]…
        let top = free - 1;
        let head = self.free[top];
        let (mut id, mut writable, mut readable, mut any_writable) = (head, 0u32, 0u32, false);
        for (i, d) in chain.iter().enumerate() {
            let mut flags = 0;
            if d.device_writes {
                flags |= DESC_F_WRITE;
                any_writable = true;
                writable = writable.saturating_add(d.len);
            } else {
                readable = readable.saturating_add(d.len);
            }
            let last = i + 1 == n;
            let next = if last {
                0
            } else {
                flags |= DESC_F_NEXT;
                let next = self.free[top - 1 - i];
                self.next[usize::from(id)] = next;
                next
            };
            self.write_desc(id, d, flags, next);
            id = next;
        }
        self.free.truncate(free - n);
        let slot = usize::from(self.next_avail & self.mask);
        self.store16(self.layout.avail + 4 + 2 * slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.heads[usize::from(head)] = Some(Head {
            token,
            descs: n as u16,
            allowed: if any_writable { writable } else { readable },
        });
        self.outstanding += 1;
        Ok(head)
    }

    /// Makes every chain added since the last call visible to the device: one release store of
    /// `avail.idx`. Returns whether there was anything to publish (nothing added: no store).
    #[inline]
    pub fn publish(&mut self) -> bool {
        if self.next_avail == self.published {
            return false;
        }
        fence(Ordering::Release);
        self.store16(self.layout.avail + 2, self.next_avail);
        self.published = self.next_avail;
        true
    }

    /// Whether the device wants a doorbell for what was just published (`used.flags`; a full
    /// fence orders the read after the `avail.idx` store).
    #[inline]
    pub fn needs_kick(&self) -> bool {
        fence(Ordering::SeqCst);
        self.load16(self.layout.used) & USED_F_NO_NOTIFY == 0
    }

    /// Whether the device has published used entries we have not popped (cheap; validates
    /// nothing).
    #[inline]
    pub fn has_used(&self) -> bool {
        self.load16(self.layout.used + 2) != self.last_used
    }

    /// Takes the next completion off the used ring, validated (module docs), with its token;
    /// `Ok(None)` if there is none. An error consumes nothing and breaks the ring for good.
    #[inline]
    pub fn pop_used(&mut self) -> Result<Option<Used<T>>, RingError> {
        if self.broken {
            return Err(RingError::Broken(self.queue));
        }
        let used_idx = self.load16(self.layout.used + 2);
        if used_idx == self.last_used {
            return Ok(None);
        }
        let ahead = used_idx.wrapping_sub(self.last_used);
        if usize::from(ahead) > self.outstanding {
            return Err(self.break_with(RingError::IndexAhead {
                queue: self.queue,
                used_idx,
                last_used: self.last_used,
                ahead,
                outstanding: self.outstanding,
            }));
        }
        fence(Ordering::Acquire);
        let off = self.layout.used + 4 + 8 * usize::from(self.last_used & self.mask);
        let id = self.load32(off);
        let len = self.load32(off + 4);
        let head = match self.validate(id, len) {
            Ok(head) => head,
            Err(e) => return Err(self.break_with(e)),
        };
        let Some(h) = self.heads[usize::from(head)].take() else {
            // Validated as outstanding just above; never panic on the I/O path.
            return Err(self.break_with(RingError::NotOutstanding {
                queue: self.queue,
                id,
            }));
        };
        self.release(head, h.descs);
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some(Used {
            head,
            len,
            token: h.token,
        }))
    }

    /// Checks one used entry (`id`, `len`, as read once from shared memory) against the
    /// private record of outstanding chains; returns the head it completes. Changes nothing.
    #[inline]
    pub fn validate(&self, id: u32, len: u32) -> Result<u16, RingError> {
        if id >= u32::from(self.size) {
            return Err(RingError::IdOutOfRange {
                queue: self.queue,
                id,
                size: self.size,
            });
        }
        let Some(h) = &self.heads[id as usize] else {
            return Err(RingError::NotOutstanding {
                queue: self.queue,
                id,
            });
        };
        if len > h.allowed {
            return Err(RingError::LenTooLong {
                queue: self.queue,
                id,
                len,
                allowed: h.allowed,
            });
        }
        Ok(id as u16)
    }

    /// Returns the `descs` descriptors of the chain at `head` to the free list (no allocation:
    /// the list never holds more than `size`).
    #[inline(always)]
    fn release(&mut self, head: u16, descs: u16) {
        let mut id = head;
        for i in 0..descs {
            self.free.push(id);
            if i + 1 < descs {
                id = self.next[usize::from(id)];
            }
        }
        self.outstanding -= 1;
    }

    /// Marks the ring broken and returns `e`.
    #[cold]
    fn break_with(&mut self, e: RingError) -> RingError {
        tracing::warn!(queue = self.queue, error = %e, "used-ring violation: queue broken until reset");
        self.broken = true;
        e
    }

    /// Takes back every outstanding chain's token, with its head, and frees every descriptor.
    /// Only call when the device no longer touches the chains' memory (it was reset, or the
    /// backend is gone); if the reset failed, leak the tokens' memory instead of reusing it.
    /// A broken ring stays broken.
    pub fn abandon_all(&mut self) -> Vec<(u16, T)> {
        let mut out = Vec::new();
        for head in 0..self.size {
            if let Some(h) = self.heads[usize::from(head)].take() {
                self.release(head, h.descs);
                out.push((head, h.token));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Ring memory for tests: 16-aligned, zeroed, owned by the test (which plays the device
    /// through the same raw pointer, with volatile accesses).
    struct Mem(Vec<u128>);
    impl Mem {
        fn new(size: u16) -> Mem {
            Mem(vec![0u128; Layout::new(size).total.div_ceil(16)])
        }
        fn ptr(&mut self) -> *mut u8 {
            self.0.as_mut_ptr().cast()
        }
        fn ring<T>(&mut self, queue: u16, size: u16) -> SplitRing<T> {
            // SAFETY: the memory is 16-aligned, zeroed, `Layout::new(size).total` bytes, and
            // outlives the ring in every test (declared first, dropped last).
            unsafe { SplitRing::new(self.ptr(), queue, size) }.unwrap()
        }
        fn read16(&mut self, off: usize) -> u16 {
            // SAFETY: test memory; offsets within its layout.
            unsafe { self.ptr().add(off).cast::<u16>().read_volatile() }
        }
    }

    /// Plays the device: writes used entry `used_idx` and sets used.idx to `used_idx + 1`.
    fn complete(m: &mut Mem, size: u16, used_idx: u16, id: u32, len: u32) {
        let l = Layout::new(size);
        let slot = usize::from(used_idx % size);
        let base = m.ptr();
        // SAFETY: test memory of `l.total` bytes; offsets within it.
        unsafe {
            base.add(l.used + 4 + 8 * slot)
                .cast::<u32>()
                .write_volatile(id);
            base.add(l.used + 8 + 8 * slot)
                .cast::<u32>()
                .write_volatile(len);
            base.add(l.used + 2)
                .cast::<u16>()
                .write_volatile(used_idx.wrapping_add(1));
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
    fn layout_of_256_entries() {
        let l = Layout::new(256);
        assert_eq!((l.desc, l.avail, l.used, l.total), (0, 4096, 4616, 6670));
    }

    #[test]
    fn add_publish_complete() {
        let mut m = Mem::new(8);
        let mut r = m.ring::<&str>(3, 8);
        let l = r.layout();
        let predicted = r.next_head().unwrap();
        let h = r.add(&req(4096), "a").unwrap();
        assert_eq!(h, predicted);
        assert_eq!(r.free_descriptors(), 5);
        assert_eq!(m.read16(l.avail + 2), 0, "add does not publish");
        assert!(r.publish());
        assert_eq!(m.read16(l.avail + 2), 1);
        assert!(!r.publish(), "nothing new to publish");
        assert!(r.needs_kick());
        // The chain as the device follows it.
        let mut at = h;
        for (i, d) in req(4096).iter().enumerate() {
            let off = 16 * usize::from(at);
            let flags = m.read16(off + 12);
            assert_eq!(flags & DESC_F_WRITE != 0, d.device_writes);
            assert_eq!(flags & DESC_F_NEXT != 0, i < 2);
            at = m.read16(off + 14);
        }
        assert_eq!(r.pop_used().unwrap(), None);
        complete(&mut m, 8, 0, u32::from(h), 4097);
        assert!(r.has_used());
        assert_eq!(
            r.pop_used().unwrap(),
            Some(Used {
                head: h,
                len: 4097,
                token: "a"
            })
        );
        assert!(!r.has_used());
        assert_eq!(r.free_descriptors(), 8);
        assert_eq!(r.outstanding(), 0);
    }

    #[test]
    fn batch_publishes_once() {
        let mut m = Mem::new(4);
        let mut r = m.ring::<u32>(0, 4);
        let one = |n| Desc {
            addr: 0x1000 * u64::from(n),
            len: 100,
            device_writes: false,
        };
        for i in 0..4 {
            r.add(&[one(i)], i).unwrap();
        }
        let (e, back) = r.add(&[one(9)], 9).unwrap_err();
        assert_eq!((e, back), (RingError::Full { wanted: 1, free: 0 }, 9));
        assert_eq!(m.read16(r.layout().avail + 2), 0);
        assert!(r.publish());
        assert_eq!(m.read16(r.layout().avail + 2), 4);
        // A read-only chain allows up to its posted bytes.
        assert_eq!(r.validate(3, 100), Ok(3));
        assert!(matches!(
            r.validate(3, 101),
            Err(RingError::LenTooLong { allowed: 100, .. })
        ));
    }

    #[test]
    fn each_violation_is_typed_consumes_nothing_and_breaks() {
        type Case = (u16, u32, u32, fn(&RingError) -> bool);
        let cases: [Case; 4] = [
            (0, 99, 0, |e| {
                matches!(
                    e,
                    RingError::IdOutOfRange {
                        queue: 5,
                        id: 99,
                        size: 8
                    }
                )
            }),
            (0, 7, 0, |e| {
                matches!(e, RingError::NotOutstanding { queue: 5, id: 7 })
            }),
            (0, u32::MAX, 514, |e| {
                matches!(
                    e,
                    RingError::LenTooLong {
                        len: 514,
                        allowed: 513,
                        ..
                    }
                )
            }),
            (1, u32::MAX, 0, |e| {
                matches!(
                    e,
                    RingError::IndexAhead {
                        ahead: 2,
                        outstanding: 1,
                        ..
                    }
                )
            }),
        ];
        for (used_idx, id, len, want) in cases {
            let mut m = Mem::new(8);
            let mut r = m.ring::<()>(5, 8);
            let h = r.add(&req(512), ()).unwrap();
            r.publish();
            let id = if id == u32::MAX { u32::from(h) } else { id };
            complete(&mut m, 8, used_idx, id, len);
            let e = r.pop_used().unwrap_err();
            assert!(want(&e), "{e:?}");
            assert!(r.is_broken());
            assert_eq!(r.outstanding(), 1, "errors consume nothing");
            assert_eq!(r.pop_used(), Err(RingError::Broken(5)));
            assert!(matches!(
                r.add(&req(1), ()),
                Err((RingError::Broken(5), ()))
            ));
            assert_eq!(r.abandon_all(), vec![(h, ())]);
            assert_eq!(r.free_descriptors(), 8);
        }
    }

    #[test]
    fn middle_of_a_chain_is_not_a_head() {
        let mut m = Mem::new(8);
        let mut r = m.ring::<()>(0, 8);
        let h = r.add(&req(512), ()).unwrap();
        r.publish();
        let second = m.read16(16 * usize::from(h) + 14);
        complete(&mut m, 8, 0, u32::from(second), 0);
        assert!(matches!(
            r.pop_used(),
            Err(RingError::NotOutstanding { .. })
        ));
    }

    #[test]
    fn wraps_the_16_bit_indices() {
        let mut m = Mem::new(4);
        let mut r = m.ring::<u32>(0, 4);
        let avail = r.layout().avail;
        for round in 0..70_000u32 {
            let d = Desc {
                addr: 0x1000,
                len: 512,
                device_writes: true,
            };
            let h = r.add(&[d, d], round).unwrap();
            r.publish();
            let slot = round as u16;
            assert_eq!(m.read16(avail + 4 + 2 * usize::from(slot % 4)), h);
            complete(&mut m, 4, slot, u32::from(h), 1024);
            let u = r.pop_used().unwrap().expect("a completion");
            assert_eq!((u.head, u.len, u.token), (h, 1024, round));
        }
        assert_eq!(r.outstanding(), 0);
        assert_eq!(r.free_descriptors(), 4);
    }

    #[test]
    fn bad_sizes_and_chains() {
        let mut m = Mem::new(8);
        for size in [0u16, 3, 12] {
            // SAFETY: refused before the memory is used.
            assert!(matches!(
                unsafe { SplitRing::<()>::new(m.ptr(), 0, size) },
                Err(RingError::BadSize(s)) if s == size
            ));
        }
        let mut r = m.ring::<()>(0, 2);
        assert!(matches!(r.add(&[], ()), Err((RingError::BadChain(0), ()))));
        assert!(matches!(
            r.add(&req(1), ()),
            Err((RingError::BadChain(3), ()))
        ));
    }

    proptest! {
        /// Arbitrary used-ring contents (flags, index and every entry) never panic: each pop is
        /// a valid completion of an outstanding chain or a typed error, after an error only
        /// `Broken`, and the ring's own bookkeeping stays consistent.
        #[test]
        fn arbitrary_used_ring_never_panics(
            n_reqs in 0usize..6,
            single in 0usize..=6,
            used_idx in any::<u16>(),
            used_flags in any::<u16>(),
            entries in proptest::collection::vec((any::<u32>(), any::<u32>()), 16),
        ) {
            let size = 16u16;
            let mut m = Mem::new(size);
            let mut r = m.ring::<usize>(0, size);
            let mut heads = Vec::new();
            for i in 0..n_reqs {
                heads.push(r.add(&req(4096), i).unwrap());
            }
            // One-descriptor chains (virtio-net's shape) in the remaining descriptors.
            let single = single.min(usize::from(size) - 3 * n_reqs);
            for i in 0..single {
                let d = Desc { addr: 0x9000, len: 512 + i as u32, device_writes: i % 2 == 0 };
                heads.push(r.add(&[d], n_reqs + i).unwrap());
            }
            r.publish();
            let l = r.layout();
            let base = m.ptr();
            // SAFETY: writes inside the test memory.
            unsafe {
                base.add(l.used).cast::<u16>().write_volatile(used_flags);
                for (i, (id, len)) in entries.iter().enumerate() {
                    base.add(l.used + 4 + 8 * i).cast::<u32>().write_volatile(*id);
                    base.add(l.used + 8 + 8 * i).cast::<u32>().write_volatile(*len);
                }
                base.add(l.used + 2).cast::<u16>().write_volatile(used_idx);
            }
            prop_assert_eq!(r.needs_kick(), used_flags & USED_F_NO_NOTIFY == 0);
            let mut completed = Vec::new();
            let mut failed = false;
            for _ in 0..32 {
                match r.pop_used() {
                    Ok(Some(u)) => {
                        prop_assert!(!failed);
                        prop_assert!(heads.contains(&u.head));
                        prop_assert_eq!(heads[u.token], u.head, "the wrong token came back");
                        prop_assert!(!completed.contains(&u.head));
                        let allowed = if u.token < n_reqs { 4097 } else { 512 + (u.token - n_reqs) as u32 };
                        prop_assert!(u.len <= allowed);
                        completed.push(u.head);
                    }
                    Ok(None) => { prop_assert!(!failed); break }
                    Err(e) => {
                        if failed {
                            prop_assert_eq!(e, RingError::Broken(0));
                        }
                        failed = true;
                    }
                }
            }
            prop_assert_eq!(r.is_broken(), failed);
            let total = n_reqs + single;
            prop_assert_eq!(r.outstanding(), total - completed.len());
            let (reqs_left, singles_left) = heads.iter().enumerate().fold((0, 0), |(a, b), (i, h)| {
                if completed.contains(h) { (a, b) } else if i < n_reqs { (a + 1, b) } else { (a, b + 1) }
            });
            prop_assert_eq!(r.free_descriptors(), usize::from(size) - 3 * reqs_left - singles_left);
            prop_assert_eq!(r.abandon_all().len(), total - completed.len());
            prop_assert_eq!(r.free_descriptors(), usize::from(size));
        }
    }
}
