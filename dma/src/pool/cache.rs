//! Per-core caches: the hot path's allocator, with no global lock.
//!
//! Each CPU has a small cache of free blocks per size class, behind its own mutex. The mutex is
//! almost never contended (only a thread migrating between CPUs mid-operation, or the shrinker
//! draining caches, can meet it), so an allocation or release costs one uncontended lock pair,
//! a `Vec` push or pop and a `sched_getcpu` (a vDSO/rseq read). Misses refill a batch from the
//! shared arena under the pool lock; overflows give half back.
//!
//! Lock order: a cache lock is never held while taking the pool lock or another cache's lock.
//! Refills and flushes move blocks through a local vector between the two critical sections.
//!
//! Each cache also counts the bytes its CPU handed out minus those it took back; the sum over
//! all caches is the pool's bytes in use (one CPU may go negative when buffers migrate).

use crate::sync::{Mutex, MutexGuard};

use super::arena::Block;

/// A free-block cache for one CPU.
#[derive(Debug, Default)]
pub(crate) struct CoreCache {
    /// Free blocks per size class (index = order - min order).
    pub classes: Vec<Vec<Block>>,
    /// Bytes handed out minus bytes taken back through this cache's CPU.
    pub in_use: i64,
}

/// A cache line of its own for each cache, so that two CPUs never share one.
#[repr(align(128))]
#[derive(Debug, Default)]
pub(crate) struct Padded<T>(pub T);

/// All CPUs' caches and the per-class limits.
#[derive(Debug)]
pub(crate) struct Caches {
    cores: Box<[Padded<Mutex<CoreCache>>]>,
    /// Blocks each cache may hold per class (0: the class is not cached).
    limits: Vec<usize>,
    min_order: u32,
}

impl Caches {
    /// Caches for every possible CPU, each holding up to `bytes_per_class` per class.
    pub fn new(min_order: u32, max_order: u32, bytes_per_class: usize) -> Caches {
        let ncpu = Caches::cpu_count();
        let classes = (max_order - min_order + 1) as usize;
        let limits = (min_order..=max_order)
            .map(|o| bytes_per_class >> o)
            .collect();
        let cores = (0..ncpu)
            .map(|_| {
                Padded(Mutex::new(CoreCache {
                    classes: (0..classes).map(|_| Vec::new()).collect(),
                    in_use: 0,
                }))
            })
            .collect();
        Caches {
            cores,
            limits,
            min_order,
        }
    }

    fn cpu_count() -> usize {
        if cfg!(loom) {
            return 1;
        }
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .max(
                // CPUs may be numbered beyond the ones we are allowed on.
                // SAFETY: sysconf has no memory effects.
                unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize,
            )
    }

    /// The calling CPU's cache, locked.
    pub fn local(&self) -> MutexGuard<'_, CoreCache> {
        self.cores[self.current_index()].0.lock().unwrap()
    }

    /// Every cache in turn (for stats and draining).
    pub fn each(&self) -> impl Iterator<Item = &Mutex<CoreCache>> {
        self.cores.iter().map(|p| &p.0)
    }

    /// How many caches (one per possible CPU).
    pub fn len(&self) -> usize {
        self.cores.len()
    }

    /// The calling CPU's index into the caches.
    pub fn current_index(&self) -> usize {
        if cfg!(loom) {
            return 0;
        }
        // SAFETY: sched_getcpu has no memory effects; it returns -1 on error.
        let cpu = unsafe { libc::sched_getcpu() }.max(0) as usize;
        // CPU numbers are below the configured count, so the division (tens of cycles) is
        // only for the unexpected.
        if cpu < self.cores.len() {
            cpu
        } else {
            cpu % self.cores.len()
        }
    }

    /// The class index of `order`.
    pub fn class(&self, order: u32) -> usize {
        (order - self.min_order) as usize
    }

    /// How many blocks of `order` a cache may hold.
    pub fn limit(&self, order: u32) -> usize {
        self.limits[self.class(order)]
    }
}
