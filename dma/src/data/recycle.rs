//! [`Recycler`]: pool buffers a driver keeps for the same device, reused without the pool's
//! zeroing.
//!
//! # The rule
//! The pool zeroes every buffer it hands out, so a device never sees another user's bytes. A
//! buffer that only ever held bytes *this same device* wrote (a received frame) or bytes the
//! driver gave *this same device* (a sent frame) shows the device nothing new when it is
//! posted again, so the zeroing can be skipped: that is what a recycler is for. The driver
//! promises, by calling [`Recycler::give_back`], that the buffer held nothing else while it
//! was out (its own reads through a read-only view are fine; a caller's writes of other data
//! are not). What the recycler checks itself:
//! - the buffer comes from the recycler's own pool (so it is mapped in the same device domain);
//!   any other buffer simply goes back to its pool;
//! - its capacity is exactly one of the registered classes, and that class keeps at most its
//!   limit; the rest go back to the pool.
//!
//! Kept buffers hold pool memory: [`Recycler::release`] gives them all back (e.g. when the
//! device goes idle), and dropping the recycler does too.

use crate::pool::{DmaBuf, Pool, PoolError};

/// Counters of a [`Recycler`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecycleStats {
    /// Buffers handed out from the kept ones (no pool call, no zeroing).
    pub reused: u64,
    /// Buffers handed out fresh from the pool (zeroed), because none of the class was kept.
    pub fresh: u64,
    /// Buffers given back and kept.
    pub kept: u64,
    /// Buffers given back and returned to the pool (another pool, no class, or class full).
    pub returned: u64,
}

/// One size class: buffers of exactly `capacity` bytes, at most `limit` kept.
#[derive(Debug)]
struct Class {
    capacity: usize,
    limit: usize,
    kept: Vec<DmaBuf>,
}

/// Pool buffers kept for reuse by the device whose domain the pool maps (module doc).
#[derive(Debug)]
pub struct Recycler {
    pool: Pool,
    /// Ascending by capacity.
    classes: Vec<Class>,
    stats: RecycleStats,
}

impl Recycler {
    /// A recycler over `pool` with no classes yet (it keeps nothing until
    /// [`Recycler::with_class`]).
    pub fn new(pool: &Pool) -> Recycler {
        Recycler {
            pool: pool.clone(),
            classes: Vec::new(),
            stats: RecycleStats::default(),
        }
    }

    /// Adds a class of buffers of `capacity` bytes, keeping at most `limit` of them. A class of
    /// the same capacity is replaced.
    pub fn with_class(mut self, capacity: usize, limit: usize) -> Recycler {
        self.classes.retain(|c| c.capacity != capacity);
        let at = self.classes.partition_point(|c| c.capacity < capacity);
        self.classes.insert(
            at,
            Class {
                capacity,
                limit,
                kept: Vec::with_capacity(limit),
            },
        );
        self
    }

    /// The pool the recycler takes from and returns to.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The smallest class that holds `len` bytes.
    fn class_for(&mut self, len: usize) -> Option<&mut Class> {
        self.classes.iter_mut().find(|c| c.capacity >= len)
    }

    /// A kept buffer of the smallest class that holds `len` bytes, if one is kept. Its bytes are
    /// what this device last saw in it (or zeros); the caller overwrites what it sends.
    pub fn take_kept(&mut self, len: usize) -> Option<DmaBuf> {
        let buf = self.class_for(len)?.kept.pop()?;
        self.stats.reused += 1;
        Some(buf)
    }

    /// A buffer for `len` bytes: a kept one of the smallest class that holds `len`
    /// ([`Recycler::take_kept`]), else a zeroed one from the pool's immediate path, of the
    /// class's capacity (so that it can be kept when given back) or of `len` bytes when no
    /// class holds it. Never waits.
    pub fn take(&mut self, len: usize) -> Result<DmaBuf, PoolError> {
        if let Some(buf) = self.take_kept(len) {
            return Ok(buf);
        }
        let capacity = self.class_for(len).map_or(len, |c| c.capacity);
        let buf = self.pool.try_alloc(capacity)?;
        self.stats.fresh += 1;
        Ok(buf)
    }

    /// Gives a buffer back under the module's rule: kept if it is from this recycler's pool,
    /// its capacity is a class's and that class is below its limit; otherwise it returns to
    /// its pool now. Returns whether it was kept.
    pub fn give_back(&mut self, buf: DmaBuf) -> bool {
        let own = buf.is_from(&self.pool);
        let capacity = buf.capacity();
        let class = self
            .classes
            .iter_mut()
            .find(|c| c.capacity == capacity)
            .filter(|c| own && c.kept.len() < c.limit);
        match class {
            Some(class) => {
                class.kept.push(buf);
                self.stats.kept += 1;
                true
            }
            None => {
                drop(buf);
                self.stats.returned += 1;
                false
            }
        }
    }

    /// Buffers kept now, over all classes.
    pub fn kept(&self) -> usize {
        self.classes.iter().map(|c| c.kept.len()).sum()
    }

    /// Returns every kept buffer to the pool.
    pub fn release(&mut self) {
        for class in &mut self.classes {
            class.kept.clear();
        }
    }

    /// Leaks every kept buffer: its pool space is lost, never reused. For a device that could
    /// not be stopped (a failed reset): it may still write what it was last given.
    pub fn leak_kept(&mut self) {
        for class in &mut self.classes {
            for buf in class.kept.drain(..) {
                std::mem::forget(buf);
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> RecycleStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryConfig, PageSize};
    use crate::pool::PoolConfig;
    use crate::share::identity::Identity;
    use std::sync::Arc;

    fn pool() -> Pool {
        let cfg = PoolConfig {
            memory: MemoryConfig {
                page_size: PageSize::Small4K,
                allow_small_pages: true,
            },
            chunk_bytes: 256 << 10,
            prefill_bytes: 256 << 10,
            max_bytes: 256 << 10,
            max_buffer: 64 << 10,
            low_watermark: 0,
            high_watermark: 256 << 10,
            reserve_bytes: 0,
            transient: false,
            background: false,
            ..PoolConfig::default()
        };
        Pool::new(Arc::new(Identity::new()), cfg).unwrap()
    }

    #[test]
    fn a_kept_buffer_comes_back_unzeroed_and_fresh_ones_are_class_sized() {
        let pool = pool();
        let mut r = Recycler::new(&pool).with_class(2048, 2).with_class(512, 4);
        let mut a = r.take(1500).unwrap();
        assert_eq!(
            a.capacity(),
            2048,
            "fresh buffers have the class's capacity"
        );
        a.write_at(0, b"frame").unwrap();
        assert!(r.give_back(a));
        let b = r.take(1000).unwrap();
        let mut head = [0u8; 5];
        b.read_at(0, &mut head).unwrap();
        assert_eq!(&head, b"frame", "reused without zeroing");
        assert_eq!(
            r.take(100).unwrap().capacity(),
            512,
            "the smallest class that fits"
        );
        assert_eq!(
            r.take(4000).unwrap().capacity(),
            4096,
            "no class: the length asked"
        );
        let s = r.stats();
        assert_eq!((s.reused, s.fresh, s.kept), (1, 3, 1));
        drop(b);
    }

    #[test]
    fn only_own_class_sized_buffers_are_kept_up_to_the_limit() {
        let pool = pool();
        let other = self::pool();
        let mut r = Recycler::new(&pool).with_class(2048, 1);
        assert!(
            !r.give_back(other.try_alloc(2048).unwrap()),
            "another pool's"
        );
        assert!(!r.give_back(pool.try_alloc(1024).unwrap()), "no such class");
        assert!(r.give_back(pool.try_alloc(2048).unwrap()));
        assert!(!r.give_back(pool.try_alloc(2048).unwrap()), "class full");
        assert_eq!(r.kept(), 1);
        assert_eq!(r.stats().returned, 3);
        let in_use = pool.stats().in_use_bytes;
        assert_eq!(in_use, 2048, "only the kept buffer holds pool memory");
        r.release();
        assert_eq!(pool.stats().in_use_bytes, 0);
        assert_eq!(other.stats().in_use_bytes, 0);
    }

    #[test]
    fn leaked_buffers_are_never_handed_out_again() {
        let pool = pool();
        let mut r = Recycler::new(&pool).with_class(512, 8);
        let buf = r.take(512).unwrap();
        r.give_back(buf);
        r.leak_kept();
        assert_eq!(r.kept(), 0);
        assert_eq!(
            pool.stats().in_use_bytes,
            512,
            "the leaked buffer stays in use"
        );
        assert!(r.take_kept(512).is_none());
    }

    #[test]
    fn dropping_the_recycler_returns_what_it_kept() {
        let pool = pool();
        let mut r = Recycler::new(&pool).with_class(512, 8);
        for _ in 0..3 {
            let buf = r.take(512).unwrap();
            r.give_back(buf);
        }
        let kept: Vec<_> = (0..3).map(|_| pool.try_alloc(512).unwrap()).collect();
        for buf in kept {
            r.give_back(buf);
        }
        assert_eq!(r.kept(), 4);
        drop(r);
        assert_eq!(pool.stats().in_use_bytes, 0);
    }
}
