//! A split virtqueue (virtio 1.x §2.7) in pool memory, with an untrusting used-ring reader.
//!
//! ## Layout
//! One pool buffer holds, in order, the descriptor table (16 B × size, 16-aligned), the
//! available ring (6 + 2 × size B) and, 4-aligned after it, the used ring (6 + 8 × size B).
//! For 256 entries that is 6,670 B (one 8 KiB buffer). The buffer is zeroed by the pool, so
//! both rings start with flags = idx = 0.
//!
//! ## Ownership of buffers
//! Every buffer the driver posts is one descriptor (no chains, no indirect tables): with
//! VIRTIO_F_VERSION_1 a virtio-net frame and its header may share one buffer. Descriptor ids
//! come from a free list; while a descriptor is posted, the queue owns its [`DmaBuf`] in
//! `slots[id]` together with the length it posted, so the buffer cannot be freed or reused
//! while the device may access it. A used entry gives the buffer back as a [`Completion`].
//!
//! ## Why the reader is safe against a hostile device
//! The device writes the used ring; nothing in it is believed unchecked ([`SplitQueue::pop_used`]):
//! - `used.idx` may only run ahead of our cursor by at most the number of posted buffers
//!   ([`RingError::IndexAhead`]);
//! - an entry's `id` must be < size ([`RingError::IdOutOfRange`]) and posted now
//!   ([`RingError::NotOutstanding`]: catches duplicates and made-up ids);
//! - its `len` must not exceed the length posted ([`RingError::LenTooLong`]).
//!
//! Ring fields are read once each, with volatile loads (the device may change them under us,
//! so no Rust reference is ever formed over ring memory). After the first violation the queue
//! is *broken*: it returns [`RingError::Broken`] from then on, and its buffers stay owned by it
//! until the device is reset — a misbehaving device may still DMA into them.
//!
//! ## Ordering
//! Descriptors and ring slots are written before `avail.idx` is published with a release
//! store; a full fence then orders that store before the read of `used.flags` that decides
//! whether to ring the doorbell (§2.7.7: NO_NOTIFY is an optimisation hint, and missing a
//! concurrent clear only costs one spurious doorbell next time round — we never skip a
//! doorbell the device asked for after seeing our index). `used.idx` is read with an acquire
//! load before the entries it covers.
//!
//! ## Locking
//! None: a queue is owned by one driver object and every method takes `&mut self`.

use std::sync::atomic::{fence, AtomicU16, Ordering};

use tidepool::pool::{DmaBuf, Pool};
use tidepool::DeviceAddr;

use super::pci::Notifier;
use super::VirtioError;

/// Descriptor flag: the device writes this buffer.
const DESC_F_WRITE: u16 = 2;
/// Available ring flag: please do not interrupt.
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used ring flag: no need to notify.
const USED_F_NO_NOTIFY: u16 = 1;

/// A used-ring entry (or index) that breaks the rules: the device is buggy or hostile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// `used.idx` ran further ahead than the buffers posted.
    #[error("queue {queue}: device's used index {used_idx} is {ahead} entries ahead of ours ({last_used}) but only {outstanding} buffers are posted; the device is misbehaving: reset it")]
    IndexAhead {
        /// Queue index.
        queue: u16,
        /// The device's used.idx.
        used_idx: u16,
        /// Our cursor.
        last_used: u16,
        /// The distance.
        ahead: u16,
        /// Buffers posted.
        outstanding: usize,
    },
    /// A used entry names a descriptor id outside the table.
    #[error("queue {queue}: used entry names descriptor {id}, the table has {size}; the device is misbehaving: reset it")]
    IdOutOfRange {
        /// Queue index.
        queue: u16,
        /// The id.
        id: u32,
        /// Queue size.
        size: u16,
    },
    /// A used entry names a descriptor that is not posted (a duplicate or made-up id).
    #[error("queue {queue}: used entry names descriptor {id}, which is not posted (duplicate or bogus completion); the device is misbehaving: reset it")]
    NotOutstanding {
        /// Queue index.
        queue: u16,
        /// The id.
        id: u32,
    },
    /// A used entry claims more bytes than the buffer posted.
    #[error("queue {queue}: descriptor {id} completed with {len} B but only {posted} B were posted; the device is misbehaving: reset it")]
    LenTooLong {
        /// Queue index.
        queue: u16,
        /// The id.
        id: u32,
        /// Claimed length.
        len: u32,
        /// Posted length.
        posted: u32,
    },
    /// An earlier violation broke this queue; reset the device.
    #[error("queue {0} is broken by an earlier device error; drop the driver (which resets the device) and reopen it")]
    Broken(u16),
}

/// A buffer the device finished with.
#[derive(Debug)]
pub struct Completion {
    /// The buffer, back in the driver's hands.
    pub buf: DmaBuf,
    /// Bytes the device says it wrote (validated ≤ the posted length).
    pub len: u32,
}

/// One posted buffer.
#[derive(Debug)]
struct Slot {
    buf: DmaBuf,
    posted: u32,
}

/// A split virtqueue whose rings live in a pool buffer. See the module docs.
#[derive(Debug)]
pub struct SplitQueue {
    index: u16,
    size: u16,
    ring: DmaBuf,
    avail_off: usize,
    used_off: usize,
    free: Vec<u16>,
    slots: Vec<Option<Slot>>,
    /// Next avail.idx to publish (entries written but maybe not yet published).
    avail_idx: u16,
    /// What the device has seen in avail.idx.
    published: u16,
    last_used: u16,
    notifier: Option<Notifier>,
    broken: bool,
    notifications: u64,
}

/// Bytes of ring memory for `size` entries and the offsets of the rings in it.
pub fn ring_layout(size: u16) -> (usize, usize, usize) {
    let n = usize::from(size);
    let avail = 16 * n;
    let used = (avail + 6 + 2 * n + 3) & !3;
    (used + 6 + 8 * n, avail, used)
}

impl SplitQueue {
    /// A queue of `size` entries (a power of two, 1..=32768) for queue number `index`, its
    /// rings in a zeroed buffer taken from `pool` with the immediate path. `notifier` is the
    /// doorbell (None: a detached queue for tests, never notified).
    pub fn new(
        pool: &Pool,
        index: u16,
        size: u16,
        notifier: Option<Notifier>,
    ) -> Result<SplitQueue, VirtioError> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(VirtioError::Queue {
                queue: index,
                problem: format!("size {size} is not a power of two in 1..=32768"),
            });
        }
        let (bytes, avail_off, used_off) = ring_layout(size);
        let ring = pool.try_alloc(bytes)?;
        Ok(SplitQueue {
            index,
            size,
            ring,
            avail_off,
            used_off,
            free: (0..size).rev().collect(),
            slots: (0..size).map(|_| None).collect(),
            avail_idx: 0,
            published: 0,
            last_used: 0,
            notifier,
            broken: false,
            notifications: 0,
        })
    }

    /// Attaches the doorbell once the transport has one (queues are made before they are
    /// programmed into the device).
    pub fn set_notifier(&mut self, notifier: Notifier) {
        self.notifier = Some(notifier);
    }

    /// Device addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (DeviceAddr, DeviceAddr, DeviceAddr) {
        let base = self.ring.device_addr();
        (
            base,
            base.offset(self.avail_off as u64),
            base.offset(self.used_off as u64),
        )
    }

    /// The queue number.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Entries in the queue.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptors free for posting.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Buffers posted and not yet completed.
    pub fn outstanding(&self) -> usize {
        usize::from(self.size) - self.free.len()
    }

    /// Doorbells rung so far.
    pub fn notifications(&self) -> u64 {
        self.notifications
    }

    /// Whether a device error broke the queue.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// A pointer `offset` bytes into ring memory, which must be in bounds (internal callers
    /// only compute offsets from `ring_layout` and ids < size).
    fn ring_ptr(&self, offset: usize) -> *mut u8 {
        debug_assert!(offset < self.ring.capacity());
        self.ring.as_ptr().wrapping_add(offset)
    }

    /// Reads a little-endian u16 of ring memory once.
    fn read16(&self, offset: usize) -> u16 {
        // SAFETY: offset is inside the ring buffer (see ring_ptr), 2-aligned by layout; the
        // buffer lives as long as self; volatile because the device may write it.
        u16::from_le(unsafe { self.ring_ptr(offset).cast::<u16>().read_volatile() })
    }

    /// Reads a little-endian u32 of ring memory once.
    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: as read16, 4-aligned by layout.
        u32::from_le(unsafe { self.ring_ptr(offset).cast::<u32>().read_volatile() })
    }

    /// Writes a little-endian u16 of ring memory.
    fn write16(&self, offset: usize, v: u16) {
        // SAFETY: as read16.
        unsafe {
            self.ring_ptr(offset)
                .cast::<u16>()
                .write_volatile(v.to_le())
        }
    }

    /// Writes one descriptor (addr, len, flags, next = 0).
    fn write_desc(&self, id: u16, addr: u64, len: u32, flags: u16) {
        let p = self.ring_ptr(16 * usize::from(id));
        // SAFETY: id < size, so the 16-byte descriptor lies in the table at the start of the
        // ring buffer, 16-aligned; the device only reads descriptors.
        unsafe {
            p.cast::<u64>().write_volatile(addr.to_le());
            p.add(8).cast::<u32>().write_volatile(len.to_le());
            p.add(12).cast::<u16>().write_volatile(flags.to_le());
            p.add(14).cast::<u16>().write_volatile(0);
        }
    }

    /// The ring's 16-bit index field at `offset` as an atomic (for release/acquire).
    fn index_atomic(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: offset is avail_off + 2 or used_off + 2: inside the ring buffer, 2-aligned,
        // valid for as long as &self. AtomicU16 is an UnsafeCell, so concurrent writes by the
        // device (another agent) do not make this shared reference unsound; all accesses
        // through it are atomic.
        unsafe { AtomicU16::from_ptr(self.ring_ptr(offset).cast::<u16>()) }
    }

    /// Posts `buf` (its first `len` bytes; `device_writes`: an RX-style buffer the device
    /// fills) in the next available slot, without publishing it: call
    /// [`SplitQueue::publish`] after a batch. Gives the buffer back if no descriptor is free
    /// or `len` exceeds the buffer.
    pub fn push(&mut self, buf: DmaBuf, len: u32, device_writes: bool) -> Result<(), DmaBuf> {
        if self.broken || len as usize > buf.capacity() {
            return Err(buf);
        }
        let Some(id) = self.free.pop() else {
            return Err(buf);
        };
        let flags = if device_writes { DESC_F_WRITE } else { 0 };
        self.write_desc(id, buf.device_addr().0, len, flags);
        let slot = 4 + 2 * usize::from(self.avail_idx % self.size);
        self.write16(self.avail_off + slot, id);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.slots[usize::from(id)] = Some(Slot { buf, posted: len });
        Ok(())
    }

    /// Publishes every pushed entry (one release store of `avail.idx`) and rings the doorbell
    /// unless the device set NO_NOTIFY. Returns whether it rang. Nothing pushed: no-op.
    pub fn publish(&mut self) -> bool {
        if self.avail_idx == self.published {
            return false;
        }
        self.index_atomic(self.avail_off + 2)
            .store(self.avail_idx.to_le(), Ordering::Release);
        self.published = self.avail_idx;
        fence(Ordering::SeqCst);
        if self.read16(self.used_off) & USED_F_NO_NOTIFY != 0 {
            return false;
        }
        if let Some(n) = &self.notifier {
            n.notify();
            self.notifications += 1;
        }
        true
    }

    /// Whether the device has completed entries we have not popped (cheap; no validation).
    pub fn has_used(&self) -> bool {
        let idx = u16::from_le(self.index_atomic(self.used_off + 2).load(Ordering::Acquire));
        idx != self.last_used
    }

    /// Asks the device not to interrupt for this queue (polling mode), or to interrupt again.
    /// After enabling, re-check [`SplitQueue::has_used`] before sleeping: a completion may have
    /// arrived while interrupts were off.
    pub fn set_interrupts(&mut self, enabled: bool) {
        let flags = if enabled { 0 } else { AVAIL_F_NO_INTERRUPT };
        self.write16(self.avail_off, flags);
        fence(Ordering::SeqCst);
    }

    /// Takes the next completed buffer off the used ring, validating it (module docs), or
    /// `Ok(None)` if there is none. An error breaks the queue for good.
    pub fn pop_used(&mut self) -> Result<Option<Completion>, RingError> {
        if self.broken {
            return Err(RingError::Broken(self.index));
        }
        let used_idx = u16::from_le(self.index_atomic(self.used_off + 2).load(Ordering::Acquire));
        if used_idx == self.last_used {
            return Ok(None);
        }
        let ahead = used_idx.wrapping_sub(self.last_used);
        let outstanding = self.outstanding();
        if usize::from(ahead) > outstanding {
            return Err(self.break_with(RingError::IndexAhead {
                queue: self.index,
                used_idx,
                last_used: self.last_used,
                ahead,
                outstanding,
            }));
        }
        let entry = self.used_off + 4 + 8 * usize::from(self.last_used % self.size);
        let id = self.read32(entry);
        let len = self.read32(entry + 4);
        if id >= u32::from(self.size) {
            return Err(self.break_with(RingError::IdOutOfRange {
                queue: self.index,
                id,
                size: self.size,
            }));
        }
        let posted = match &self.slots[id as usize] {
            Some(slot) => slot.posted,
            None => {
                return Err(self.break_with(RingError::NotOutstanding {
                    queue: self.index,
                    id,
                }))
            }
        };
        if len > posted {
            return Err(self.break_with(RingError::LenTooLong {
                queue: self.index,
                id,
                len,
                posted,
            }));
        }
        let Some(slot) = self.slots[id as usize].take() else {
            // Checked just above; unreachable, but never panic on the I/O path.
            return Err(self.break_with(RingError::NotOutstanding {
                queue: self.index,
                id,
            }));
        };
        self.free.push(id as u16);
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some(Completion { buf: slot.buf, len }))
    }

    /// Marks the queue broken and returns `e`.
    fn break_with(&mut self, e: RingError) -> RingError {
        self.broken = true;
        e
    }

    /// Takes back every posted buffer. Only call after the device was reset (it no longer
    /// touches them). The queue is empty afterwards.
    pub fn take_all_after_reset(&mut self) -> Vec<DmaBuf> {
        let mut out = Vec::new();
        for (id, slot) in self.slots.iter_mut().enumerate() {
            if let Some(s) = slot.take() {
                out.push(s.buf);
                self.free.push(id as u16);
            }
        }
        out
    }

    /// Leaks every posted buffer and the ring itself: for when the device could not be reset
    /// and may still DMA into them. Their pool space is never reused.
    pub fn leak_after_failed_reset(self) {
        let SplitQueue { ring, slots, .. } = self;
        std::mem::forget(ring);
        for s in slots.into_iter().flatten() {
            std::mem::forget(s.buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;
    use tidepool::memory::{MemoryConfig, PageSize};
    use tidepool::pool::PoolConfig;
    use tidepool::share::identity::Identity;

    /// A small pool of ordinary (locked 4 KiB) memory, shared with the identity view.
    pub(crate) fn test_pool() -> Pool {
        let cfg = PoolConfig {
            memory: MemoryConfig {
                page_size: PageSize::Small4K,
                allow_small_pages: true,
            },
            chunk_bytes: 2 << 20,
            prefill_bytes: 2 << 20,
            max_bytes: 8 << 20,
            max_buffer: 64 << 10,
            low_watermark: 0,
            high_watermark: 2 << 20,
            reserve_bytes: 0,
            background: false,
            ..PoolConfig::default()
        };
        Pool::new(Arc::new(Identity::new()), cfg).expect("test pool")
    }

    /// Plays the device: writes used entry number `slot` and then used.idx.
    fn device_complete(q: &SplitQueue, slot: u16, id: u32, len: u32) {
        let e = q.used_off + 4 + 8 * usize::from(slot % q.size);
        // SAFETY: test-only writes inside the ring buffer.
        unsafe {
            q.ring_ptr(e).cast::<u32>().write_volatile(id);
            q.ring_ptr(e + 4).cast::<u32>().write_volatile(len);
        }
        q.index_atomic(q.used_off + 2)
            .store(slot.wrapping_add(1), Ordering::Release);
    }

    /// What the device would read: the id in avail slot `i`.
    fn avail_id(q: &SplitQueue, i: u16) -> u16 {
        q.read16(q.avail_off + 4 + 2 * usize::from(i % q.size))
    }

    #[test]
    fn post_complete_round_trip() {
        let pool = test_pool();
        let mut q = SplitQueue::new(&pool, 0, 8, None).unwrap();
        for _ in 0..8 {
            q.push(pool.try_alloc(2048).unwrap(), 2048, true).unwrap();
        }
        let extra = pool.try_alloc(2048).unwrap();
        assert!(q.push(extra, 2048, true).is_err(), "a full queue refuses");
        assert!(q.publish());
        assert_eq!(q.read16(q.avail_off + 2), 8);
        // Descriptor of avail slot 0 points at a posted buffer with WRITE set.
        let id = avail_id(&q, 0);
        assert_eq!(q.read16(16 * usize::from(id) + 12), DESC_F_WRITE);
        device_complete(&q, 0, u32::from(id), 100);
        let c = q.pop_used().unwrap().unwrap();
        assert_eq!(c.len, 100);
        assert_eq!(q.outstanding(), 7);
        assert!(q.pop_used().unwrap().is_none());
        // The same id again: a duplicate completion.
        device_complete(&q, 1, u32::from(id), 1);
        assert_eq!(
            q.pop_used().unwrap_err(),
            RingError::NotOutstanding {
                queue: 0,
                id: u32::from(id)
            }
        );
        assert_eq!(q.pop_used().unwrap_err(), RingError::Broken(0));
        drop(c);
        drop(q.take_all_after_reset());
        drop(q);
        assert_eq!(pool.stats().in_use_bytes, 0);
    }

    #[test]
    fn bad_len_and_id_and_index() {
        let pool = test_pool();
        let mut q = SplitQueue::new(&pool, 1, 4, None).unwrap();
        q.push(pool.try_alloc(600).unwrap(), 600, true).unwrap();
        q.publish();
        let id = avail_id(&q, 0);
        device_complete(&q, 0, u32::from(id), 601);
        assert!(matches!(
            q.pop_used(),
            Err(RingError::LenTooLong {
                len: 601,
                posted: 600,
                ..
            })
        ));

        let mut q = SplitQueue::new(&pool, 1, 4, None).unwrap();
        q.push(pool.try_alloc(600).unwrap(), 600, true).unwrap();
        q.publish();
        device_complete(&q, 0, 4, 1);
        assert!(matches!(
            q.pop_used(),
            Err(RingError::IdOutOfRange { id: 4, .. })
        ));

        let mut q = SplitQueue::new(&pool, 1, 4, None).unwrap();
        q.push(pool.try_alloc(600).unwrap(), 600, true).unwrap();
        q.publish();
        device_complete(&q, 1, 0, 1); // used.idx = 2 with one buffer posted
        assert!(matches!(
            q.pop_used(),
            Err(RingError::IndexAhead {
                ahead: 2,
                outstanding: 1,
                ..
            })
        ));
    }

    #[test]
    fn wraps_the_16_bit_indices() {
        let pool = test_pool();
        let mut q = SplitQueue::new(&pool, 0, 4, None).unwrap();
        for round in 0..70_000u32 {
            q.push(pool.try_alloc(512).unwrap(), 512, false).unwrap();
            q.publish();
            let slot = round as u16;
            let id = avail_id(&q, slot);
            device_complete(&q, slot, u32::from(id), 0);
            let c = q.pop_used().unwrap().expect("a completion");
            assert_eq!(c.len, 0);
        }
        assert_eq!(q.outstanding(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Arbitrary bytes over the whole used ring: popping never panics, every completion
        /// it accepts is a posted buffer with len ≤ posted, and after an error only errors.
        #[test]
        fn arbitrary_used_ring_never_panics(
            posted in 0usize..=16,
            used in proptest::collection::vec(0u8..=255, ring_layout(16).0 - ring_layout(16).2),
        ) {
            let pool = test_pool();
            let mut q = SplitQueue::new(&pool, 0, 16, None).unwrap();
            let mut lens = std::collections::HashMap::new();
            for i in 0..posted {
                let len = 512 + i as u32;
                let b = pool.try_alloc(len as usize).unwrap();
                lens.insert(b.device_addr(), len);
                q.push(b, len, true).unwrap();
            }
            q.publish();
            // SAFETY: test-only write of the used ring region inside the ring buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(used.as_ptr(), q.ring_ptr(q.used_off), used.len());
            }
            let mut seen = std::collections::HashSet::new();
            let mut failed = false;
            for _ in 0..40 {
                match q.pop_used() {
                    Ok(Some(c)) => {
                        prop_assert!(!failed);
                        let posted_len = lens[&c.buf.device_addr()];
                        prop_assert!(c.len <= posted_len);
                        prop_assert!(seen.insert(c.buf.device_addr()), "a buffer completed twice");
                    }
                    Ok(None) => prop_assert!(!failed),
                    Err(_) => failed = true,
                }
            }
            prop_assert!(seen.len() <= posted);
            drop(q.take_all_after_reset());
        }
    }
}
