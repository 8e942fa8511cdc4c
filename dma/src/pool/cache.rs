//! Per-core caches: the hot path's allocator, with no global lock.
//!
//! Each CPU has a small cache of free blocks per size class, behind its own spinlock. The lock
//! is almost never contended (only a thread migrating between CPUs mid-operation, or the
//! shrinker draining caches, can meet it), so an allocation or release costs one atomic swap, a
//! plain store, a `Vec` push or pop and a read of the CPU number (inline from the thread's rseq
//! area where glibc registered one, else `sched_getcpu`). Misses refill a batch from the shared
//! arena under the pool lock; overflows give half back.
//!
//! Each cache also holds *credits*: references to the pool that buffers allocated here take
//! and buffers released here give back, so that a buffer keeps the pool alive without an
//! atomic reference-count update per allocation and release (see [`CoreCache::credits`]).
//!
//! Lock order: a cache lock is never held while taking the pool lock or another cache's lock.
//! Refills and flushes move blocks through a local vector between the two critical sections.
//!
//! Each cache also counts the bytes its CPU handed out minus those it took back; the sum over
//! all caches is the pool's bytes in use (one CPU may go negative when buffers migrate).

use std::fmt;

use crate::sync::{Arc, SpinGuard, SpinLock};

use super::arena::Block;
use super::Shared;

/// A free-block cache for one CPU.
#[derive(Default)]
pub(crate) struct CoreCache {
    /// Free blocks per size class (index = order - min order) that a caller or device may
    /// have written: released blocks land here. Never carry the pre-zeroed mark.
    pub classes: Vec<Vec<Block>>,
    /// Free blocks per size class that the grower zeroed ahead of time, each carrying the
    /// pre-zeroed mark ([`Block::zeroed`]); only the grower's pre-zeroing pass pushes here.
    /// `classes[c].len() + zeroed[c].len()` stays within the class's limit.
    pub zeroed: Vec<Vec<Block>>,
    /// Requests that wanted a zero block (`alloc`, `FromDevice` maps) and got a pre-zeroed
    /// one through this CPU (no zeroing pass on the hot path).
    pub zero_hits: u64,
    /// Requests that wanted a zero block and had to zero one themselves.
    pub zero_misses: u64,
    /// Bytes handed out minus bytes taken back through this cache's CPU.
    pub in_use: i64,
    /// Strong references to the pool, ready for new buffers to take (every `DmaBuf` owns one).
    /// A release puts its buffer's reference here instead of decrementing the shared count; an
    /// allocation takes one instead of incrementing it. An empty list is topped up with
    /// [`CREDITS_BATCH`] clones at once; a full one ([`CREDITS_MAX`]) lets releases drop their
    /// reference (buffers that move from allocating CPUs to one releasing CPU). Either way the
    /// shared count is touched per batch or per migrated buffer, never per local round trip.
    /// A credit leaves a cache only under its lock.
    ///
    /// These references make a cycle (the pool holds itself): when the last [`super::Pool`]
    /// handle goes, [`Caches::close`] sets `closed` and drops them; after that releases drop
    /// their reference instead of keeping it, and the pool is freed with the last buffer.
    pub credits: Vec<Arc<Shared>>,
    /// Set once, by [`Caches::close`]: no credits may be kept any more.
    pub closed: bool,
}

impl fmt::Debug for CoreCache {
    /// Counts only: the credits point back at the pool.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreCache")
            .field(
                "cached_blocks",
                &self.classes.iter().map(Vec::len).sum::<usize>(),
            )
            .field(
                "zeroed_blocks",
                &self.zeroed.iter().map(Vec::len).sum::<usize>(),
            )
            .field("in_use", &self.in_use)
            .field("credits", &self.credits.len())
            .field("closed", &self.closed)
            .finish()
    }
}

/// Most credits a cache keeps; a release beyond this drops its reference instead.
pub(crate) const CREDITS_MAX: usize = if cfg!(loom) { 2 } else { 256 };
/// Credits an allocation takes at once when its cache has none (one reference-count update each,
/// back to back on one cache line).
pub(crate) const CREDITS_BATCH: usize = if cfg!(loom) { 1 } else { 32 };

/// A cache line of its own for each cache, so that two CPUs never share one.
#[repr(align(128))]
#[derive(Debug, Default)]
pub(crate) struct Padded<T>(pub T);

/// All CPUs' caches and the per-class limits.
#[derive(Debug)]
pub(crate) struct Caches {
    cores: Box<[Padded<SpinLock<CoreCache>>]>,
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
                Padded(SpinLock::new(CoreCache {
                    classes: (0..classes).map(|_| Vec::new()).collect(),
                    zeroed: (0..classes).map(|_| Vec::new()).collect(),
                    ..CoreCache::default()
                }))
            })
            .collect();
        Caches {
            cores,
            limits,
            min_order,
        }
    }

    /// How many caches: every CPU the system may have; under loom, the models' CPUs.
    #[cfg(not(loom))]
    fn cpu_count() -> usize {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .max(
                // CPUs may be numbered beyond the ones we are allowed on.
                // SAFETY: sysconf has no memory effects.
                unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize,
            )
    }

    #[cfg(loom)]
    fn cpu_count() -> usize {
        crate::sync::model_cpu::COUNT
    }

    /// The CPU the calling thread runs on: the `cpu_id` the kernel keeps in the thread's rseq
    /// area where glibc registered one ([`rseq_cpu`]), else `sched_getcpu`; under loom, the
    /// CPU the model gave the thread ([`crate::sync::model_cpu`]), so that which cache a
    /// thread meets is part of the model, not of the host's scheduling.
    #[cfg(not(loom))]
    #[inline]
    fn current_cpu() -> usize {
        if let Some(cpu) = rseq_cpu::current() {
            return cpu;
        }
        // SAFETY: sched_getcpu has no memory effects; it returns -1 on error.
        unsafe { libc::sched_getcpu() }.max(0) as usize
    }

    #[cfg(loom)]
    fn current_cpu() -> usize {
        crate::sync::model_cpu::current()
    }

    /// The calling CPU's cache, locked.
    #[inline]
    pub fn local(&self) -> SpinGuard<'_, CoreCache> {
        self.cores[self.current_index()].0.lock()
    }

    /// Every cache in turn (for stats and draining).
    pub fn each(&self) -> impl Iterator<Item = &SpinLock<CoreCache>> {
        self.cores.iter().map(|p| &p.0)
    }

    /// The last pool handle is gone: marks every cache closed and returns the credits they
    /// held, for the caller to drop *after* this returns (dropping one may free the pool, whose
    /// memory holds these locks). Takes each cache lock in turn.
    pub fn close(&self) -> Vec<Arc<Shared>> {
        let mut credits = Vec::new();
        for c in self.each() {
            let mut c = c.lock();
            c.closed = true;
            credits.append(&mut c.credits);
        }
        credits
    }

    /// The calling CPU's index into the caches.
    #[inline]
    pub fn current_index(&self) -> usize {
        let cpu = Caches::current_cpu();
        // CPU numbers are below the configured count, so the division (tens of cycles) is
        // only for the unexpected.
        if cpu < self.cores.len() {
            cpu
        } else {
            cpu % self.cores.len()
        }
    }

    /// The class index of `order`.
    #[inline]
    pub fn class(&self, order: u32) -> usize {
        (order - self.min_order) as usize
    }

    /// The order of class index `class`.
    #[inline]
    pub fn order(&self, class: usize) -> u32 {
        self.min_order + class as u32
    }

    /// How many blocks of `order` a cache may hold.
    #[inline]
    pub fn limit(&self, order: u32) -> usize {
        self.limits[self.class(order)]
    }
}

/// The calling thread's CPU read inline from its rseq area (x86_64 glibc): what glibc's own
/// `sched_getcpu` does, without the call through the PLT, which on the hot path cost a few
/// percent by itself and made the compiler save and reload the registers live across it.
///
/// glibc (2.35 and later) registers an rseq area for every thread at `thread pointer +
/// __rseq_offset`; the kernel writes the thread's current CPU into its `cpu_id` field (offset
/// 4) before the thread runs again after any migration. The symbol is looked up once at run
/// time (`dlsym`, so the binary still loads on an older glibc or another libc); where it is
/// missing, or `__rseq_size` says registration failed, or `cpu_id` is negative (not
/// registered), [`current`] returns None and the caller asks `sched_getcpu`, as glibc does.
/// The value is a hint, as `sched_getcpu`'s is: the thread may migrate right after the read,
/// and the cache lock, not the CPU number, makes the caches' accesses exclusive.
#[cfg(all(
    not(loom),
    target_arch = "x86_64",
    target_os = "linux",
    target_env = "gnu"
))]
mod rseq_cpu {
    use std::sync::atomic::{AtomicIsize, Ordering};

    /// Not looked up yet.
    const UNKNOWN: isize = isize::MIN;
    /// No usable rseq area: use `sched_getcpu`.
    const NONE: isize = isize::MIN + 1;

    /// The offset of the rseq area from the thread pointer, or [`UNKNOWN`] / [`NONE`].
    static OFFSET: AtomicIsize = AtomicIsize::new(UNKNOWN);

    /// The calling thread's CPU, or None where there is no rseq area to read it from.
    #[inline(always)]
    pub(super) fn current() -> Option<usize> {
        let off = OFFSET.load(Ordering::Relaxed);
        if off < NONE + 1 {
            return if off == UNKNOWN { lookup() } else { None };
        }
        let cpu: i32;
        // SAFETY: `off` is glibc's `__rseq_offset`, and `__rseq_size` said the area is
        // registered, so `fs:[off + 4]` (the thread pointer is the `fs` base on x86_64) is the
        // `cpu_id` field of this thread's rseq area, a 4-byte aligned word of the thread's
        // own control block that lives as long as the thread. The read has no other effect.
        unsafe {
            std::arch::asm!(
                "mov {cpu:e}, dword ptr fs:[{off} + 4]",
                cpu = lateout(reg) cpu,
                off = in(reg) off,
                options(nostack, readonly, preserves_flags),
            );
        }
        usize::try_from(cpu).ok()
    }

    /// Looks the offset up (once per process in effect: racing first callers store the same
    /// value) and answers as [`current`].
    #[cold]
    #[inline(never)]
    fn lookup() -> Option<usize> {
        // SAFETY: dlsym with RTLD_DEFAULT and NUL-terminated names only searches the loaded
        // objects' symbol tables.
        let (offset, size) = unsafe {
            (
                libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()),
                libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()),
            )
        };
        let off = if offset.is_null() || size.is_null() {
            NONE
        } else {
            // SAFETY: glibc defines `__rseq_offset` as a `ptrdiff_t` and `__rseq_size` as an
            // `unsigned int`, both constant once the program runs (set before `main`).
            let (offset, size) = unsafe { (*(offset as *const isize), *(size as *const u32)) };
            // A registered area holds at least the 20 bytes of the original ABI; the offsets
            // we could mistake for our sentinels are not plausible ones.
            if size >= 20 && offset > NONE + 1 {
                offset
            } else {
                NONE
            }
        };
        OFFSET.store(off, Ordering::Relaxed);
        if off == NONE {
            None
        } else {
            current()
        }
    }
}

/// Elsewhere: no inline read; `sched_getcpu` answers.
#[cfg(all(
    not(loom),
    not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))
))]
mod rseq_cpu {
    #[inline(always)]
    pub(super) fn current() -> Option<usize> {
        None
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    /// The inline rseq read agrees with `sched_getcpu` (retried: the thread may migrate
    /// between the two reads), and on x86_64 glibc it is available unless turned off.
    #[test]
    fn rseq_cpu_matches_sched_getcpu() {
        let avail = super::rseq_cpu::current().is_some();
        // `GLIBC_TUNABLES=glibc.pthread.rseq=0` turns registration off: then the fallback
        // must be taken.
        let disabled = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("rseq=0"));
        #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
        {
            // glibc registers an rseq area (and exports `__rseq_offset`) from 2.35 on.
            // SAFETY: returns a pointer to a static NUL-terminated string.
            let version = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
            let version = version.to_str().unwrap_or("0.0");
            let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
            let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
            let registers = (major, minor) >= (2, 35);
            assert_eq!(
                avail,
                registers && !disabled,
                "rseq area available: {avail}, glibc {version}"
            );
        }
        if !avail {
            return;
        }
        let agree = (0..1000).any(|_| {
            // SAFETY: sched_getcpu has no memory effects.
            let sys = unsafe { libc::sched_getcpu() };
            super::rseq_cpu::current() == usize::try_from(sys).ok()
        });
        assert!(agree);
    }
}
