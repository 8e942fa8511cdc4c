//! virtio-net's owner of a split virtqueue: the ring itself is the shared
//! [`tidepool_virtqueue::SplitRing`] (layout, chains, publishing, the untrusting used-ring
//! reader and its [`RingError`]s: see that crate's docs); this module keeps what is
//! virtio-net's own: the ring memory as a pool buffer, the posted buffers as owned
//! [`DmaBuf`]s, and the doorbell.
//!
//! ## Ownership of buffers
//! Every buffer the driver posts is a one-descriptor chain (no indirect tables): with
//! VIRTIO_F_VERSION_1 a virtio-net frame and its header share one buffer. While it is posted,
//! the ring holds its [`DmaBuf`] as the chain's token, so the buffer cannot be freed or reused
//! while the device may access it; a used entry gives it back as a [`Completion`], with a
//! length validated against the posted length. After the first device violation the queue is
//! broken ([`RingError::Broken`]) and its buffers stay with it until the device is reset
//! ([`SplitQueue::take_all_after_reset`]), or are leaked if the reset failed
//! ([`SplitQueue::leak_after_failed_reset`]).
//!
//! ## Batching
//! [`SplitQueue::push`] writes a descriptor and avail slot; [`SplitQueue::publish`] makes the
//! whole batch visible with one `avail.idx` store and rings the doorbell at most once, unless
//! the device set NO_NOTIFY.
//!
//! ## Locking
//! None: a queue is owned by one driver object and every method takes `&mut self`.

use tidepool::pool::{DmaBuf, Pool};
use tidepool::DeviceAddr;
use tidepool_virtqueue::{Desc, SplitRing};

pub use tidepool_virtqueue::{Layout, RingError};

use super::pci::Notifier;
use super::VirtioError;

/// A buffer the device finished with.
#[derive(Debug)]
pub struct Completion {
    /// The buffer, back in the driver's hands.
    pub buf: DmaBuf,
    /// Bytes the device says it wrote (validated ≤ the posted length).
    pub len: u32,
}

/// A split virtqueue whose rings live in a pool buffer. See the module docs.
#[derive(Debug)]
pub struct SplitQueue {
    /// The shared ring over `ring_mem`, holding each posted buffer as its chain's token.
    /// Declared before `ring_mem`: it points into it.
    ring: SplitRing<DmaBuf>,
    ring_mem: DmaBuf,
    notifier: Option<Notifier>,
    notifications: u64,
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
        if size == 0 || !size.is_power_of_two() || size > tidepool_virtqueue::MAX_QUEUE_SIZE {
            return Err(VirtioError::Queue {
                queue: index,
                problem: format!("size {size} is not a power of two in 1..=32768"),
            });
        }
        let ring_mem = pool.try_alloc(Layout::new(size).total)?;
        // SAFETY: `ring_mem` is a fresh, zeroed pool buffer of at least `Layout::new(size).total`
        // bytes, aligned to at least 16 (pool blocks are naturally aligned), owned by this
        // queue and dropped after `ring` (field order; `leak_after_failed_reset` forgets both);
        // nothing else in this process touches it.
        let ring = unsafe { SplitRing::new(ring_mem.as_ptr(), index, size) }.map_err(|e| {
            VirtioError::Queue {
                queue: index,
                problem: e.to_string(),
            }
        })?;
        Ok(SplitQueue {
            ring,
            ring_mem,
            notifier,
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
        let base = self.ring_mem.device_addr();
        let l = self.ring.layout();
        (
            base.offset(l.desc as u64),
            base.offset(l.avail as u64),
            base.offset(l.used as u64),
        )
    }

    /// The queue number.
    pub fn index(&self) -> u16 {
        self.ring.queue()
    }

    /// Entries in the queue.
    pub fn size(&self) -> u16 {
        self.ring.size()
    }

    /// Descriptors free for posting.
    #[inline]
    pub fn free_slots(&self) -> usize {
        self.ring.free_descriptors()
    }

    /// Buffers posted and not yet completed.
    #[inline]
    pub fn outstanding(&self) -> usize {
        self.ring.outstanding()
    }

    /// Doorbells rung so far.
    pub fn notifications(&self) -> u64 {
        self.notifications
    }

    /// Whether a device error broke the queue.
    pub fn is_broken(&self) -> bool {
        self.ring.is_broken()
    }

    /// Posts `buf` (its first `len` bytes; `device_writes`: an RX-style buffer the device
    /// fills) in the next available slot, without publishing it: call
    /// [`SplitQueue::publish`] after a batch. Gives the buffer back if the queue is broken, no
    /// descriptor is free or `len` exceeds the buffer.
    #[inline]
    pub fn push(&mut self, buf: DmaBuf, len: u32, device_writes: bool) -> Result<(), DmaBuf> {
        if len as usize > buf.capacity() {
            return Err(buf);
        }
        let d = Desc {
            addr: buf.device_addr().0,
            len,
            device_writes,
        };
        match self.ring.add(&[d], buf) {
            Ok(_) => Ok(()),
            Err((_, buf)) => Err(buf),
        }
    }

    /// Publishes every pushed entry (one release store of `avail.idx`) and rings the doorbell
    /// unless the device set NO_NOTIFY. Returns whether it rang. Nothing pushed: no-op.
    #[inline]
    pub fn publish(&mut self) -> bool {
        if !self.ring.publish() || !self.ring.needs_kick() {
            return false;
        }
        if let Some(n) = &self.notifier {
            n.notify();
            self.notifications += 1;
        }
        true
    }

    /// Whether the device has completed entries we have not popped (cheap; no validation).
    #[inline]
    pub fn has_used(&self) -> bool {
        self.ring.has_used()
    }

    /// Asks the device not to interrupt for this queue (polling mode), or to interrupt again.
    /// After enabling, re-check [`SplitQueue::has_used`] before sleeping: a completion may have
    /// arrived while interrupts were off.
    pub fn set_interrupts(&mut self, enabled: bool) {
        self.ring.set_no_interrupt(!enabled);
    }

    /// Takes the next completed buffer off the used ring, validated by the shared ring, or
    /// `Ok(None)` if there is none. An error breaks the queue for good.
    #[inline]
    pub fn pop_used(&mut self) -> Result<Option<Completion>, RingError> {
        Ok(self.ring.pop_used()?.map(|u| Completion {
            buf: u.token,
            len: u.len,
        }))
    }

    /// Takes back every posted buffer. Only call after the device was reset (it no longer
    /// touches them). The queue is empty afterwards (and stays broken if it was).
    pub fn take_all_after_reset(&mut self) -> Vec<DmaBuf> {
        self.ring
            .abandon_all()
            .into_iter()
            .map(|(_, buf)| buf)
            .collect()
    }

    /// Leaks every posted buffer and the ring itself: for when the device could not be reset
    /// and may still DMA into them. Their pool space is never reused.
    pub fn leak_after_failed_reset(self) {
        let SplitQueue {
            mut ring, ring_mem, ..
        } = self;
        for (_, buf) in ring.abandon_all() {
            std::mem::forget(buf);
        }
        drop(ring);
        std::mem::forget(ring_mem);
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

    /// Ring memory and layout, as the device sees them (identity view).
    fn mem(q: &SplitQueue) -> (*mut u8, Layout) {
        (q.ring_mem.as_ptr(), q.ring.layout())
    }

    /// Reads a u16 of ring memory as the device would.
    fn read16(q: &SplitQueue, off: usize) -> u16 {
        let (p, l) = mem(q);
        assert!(off + 2 <= l.total);
        // SAFETY: test-only read inside the ring buffer, 2-aligned.
        u16::from_le(unsafe { p.add(off).cast::<u16>().read_volatile() })
    }

    /// Plays the device: writes used entry number `slot` and then used.idx.
    fn device_complete(q: &SplitQueue, slot: u16, id: u32, len: u32) {
        let (p, l) = mem(q);
        let e = l.used + 4 + 8 * usize::from(slot % q.size());
        // SAFETY: test-only writes inside the ring buffer.
        unsafe {
            p.add(e).cast::<u32>().write_volatile(id.to_le());
            p.add(e + 4).cast::<u32>().write_volatile(len.to_le());
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            p.add(l.used + 2)
                .cast::<u16>()
                .write_volatile(slot.wrapping_add(1).to_le());
        }
    }

    /// What the device would read: the id in avail slot `i`.
    fn avail_id(q: &SplitQueue, i: u16) -> u16 {
        read16(q, q.ring.layout().avail + 4 + 2 * usize::from(i % q.size()))
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
        assert_eq!(read16(&q, q.ring.layout().avail + 2), 8);
        // Descriptor of avail slot 0 points at a posted buffer with WRITE set.
        let id = avail_id(&q, 0);
        assert_eq!(
            read16(&q, 16 * usize::from(id) + 12),
            tidepool_virtqueue::DESC_F_WRITE
        );
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
                allowed: 600,
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
            used in proptest::collection::vec(0u8..=255, Layout::new(16).total - Layout::new(16).used),
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
                let (p, l) = mem(&q);
                std::ptr::copy_nonoverlapping(used.as_ptr(), p.add(l.used), used.len());
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
