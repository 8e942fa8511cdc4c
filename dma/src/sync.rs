//! Synchronisation primitives, routed through `loom` when built with `--cfg loom` so that the
//! same pool and waiter code is model-checked (as tokio does with its `loom` module).
//!
//! Everything the pool synchronises with comes from here, never from `std` directly:
//! - `Arc`, `Mutex`, `Condvar`, `thread` and the atomics at the top level (std's or loom's);
//! - [`atomic`], [`cell`] (an `UnsafeCell` reached only through `with` / `with_mut`, so loom
//!   checks every access to its data), [`hint`]: the pieces [`SpinLock`] is built from;
//! - [`model_cpu`] (loom only): which CPU a model thread "runs on", for the per-CPU caches.
//!
//! [`SpinLock`] is the same code in both builds: under loom its flag is loom's `AtomicBool`,
//! its spin yields to loom's scheduler and its value is loom's `UnsafeCell`, so the models
//! explore its real atomics (and would report a missing `Acquire`/`Release` as a data race).

#[cfg(loom)]
#[allow(unused_imports)]
pub(crate) use loom::sync::{
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, MutexGuard,
};
#[cfg(loom)]
#[allow(unused_imports)]
pub(crate) use loom::{hint, thread};

#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use std::sync::{
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, MutexGuard,
};
#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use std::{hint, thread};

pub(crate) use spin::{SpinGuard, SpinLock};

/// Atomics: std's, or loom's under `--cfg loom`.
pub(crate) mod atomic {
    #[cfg(loom)]
    #[allow(unused_imports)]
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
    #[cfg(not(loom))]
    #[allow(unused_imports)]
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
}

/// An `UnsafeCell` whose data is reached only through closures: loom's under `--cfg loom`
/// (which checks each access against the others for a data race), a zero-cost wrapper of
/// std's otherwise (tokio's `loom::std::unsafe_cell` shape).
pub(crate) mod cell {
    #[cfg(loom)]
    pub(crate) use loom::cell::UnsafeCell;

    /// `std::cell::UnsafeCell` with loom's access API.
    #[cfg(not(loom))]
    #[derive(Debug, Default)]
    pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

    #[cfg(not(loom))]
    impl<T> UnsafeCell<T> {
        pub(crate) const fn new(data: T) -> UnsafeCell<T> {
            UnsafeCell(std::cell::UnsafeCell::new(data))
        }

        /// Calls `f` with a pointer for reading.
        #[inline(always)]
        pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
            f(self.0.get())
        }

        /// Calls `f` with a pointer for writing.
        #[inline(always)]
        pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }
}

/// Under loom: which of [`model_cpu::COUNT`] CPUs the calling model thread "runs on" (a loom
/// thread-local, 0 until [`model_cpu::set`]), so that the per-CPU caches are several and which
/// one a thread uses is chosen by the model, not by the host's scheduler. A thread may call
/// `set` again between operations to model a migration.
#[cfg(loom)]
pub(crate) mod model_cpu {
    use std::cell::Cell;

    /// How many per-CPU caches a pool has under loom.
    pub(crate) const COUNT: usize = 2;

    loom::thread_local! {
        static CPU: Cell<usize> = Cell::new(0);
    }

    /// The calling model thread's CPU.
    pub(crate) fn current() -> usize {
        CPU.with(Cell::get)
    }

    /// Moves the calling model thread to `cpu` (below [`COUNT`]).
    #[allow(dead_code)] // Only the models call it.
    pub(crate) fn set(cpu: usize) {
        assert!(cpu < COUNT, "model CPU {cpu} of {COUNT}");
        CPU.with(|c| c.set(cpu));
    }
}

/// A lock for critical sections of a few instructions that are almost never contended (the
/// per-CPU caches). Taking it is one compare-and-swap and releasing it one plain store, where
/// a futex mutex needs a read-modify-write for both; a waiter spins briefly, then yields.
///
/// The same code under loom: the flag, the spin hint, the yield and the cell come from this
/// module's shims, so the models explore the lock's real atomics and check every access to
/// the value against the lock's `Acquire`/`Release` edges.
mod spin {
    use std::ops::{Deref, DerefMut};

    use super::atomic::{AtomicBool, Ordering};
    use super::cell::UnsafeCell;
    use super::{hint, thread};

    /// A test-and-test-and-set spinlock over a `T`.
    pub(crate) struct SpinLock<T> {
        locked: AtomicBool,
        /// # Safety
        /// Accessed only through a [`SpinGuard`], i.e. while `locked` is held.
        value: UnsafeCell<T>,
    }

    // SAFETY: the lock hands out access to `value` to one thread at a time, so sharing the lock
    // is sharing ownership of a `T` between threads in turn: `T: Send` suffices (as for
    // `std::sync::Mutex`).
    unsafe impl<T: Send> Sync for SpinLock<T> {}
    // SAFETY: as above; moving the lock moves the `T`.
    unsafe impl<T: Send> Send for SpinLock<T> {}

    impl<T: Default> Default for SpinLock<T> {
        fn default() -> Self {
            SpinLock::new(T::default())
        }
    }

    impl<T> SpinLock<T> {
        /// A new, unlocked lock over `value`.
        pub(crate) fn new(value: T) -> Self {
            SpinLock {
                locked: AtomicBool::new(false),
                value: UnsafeCell::new(value),
            }
        }

        /// Takes the lock, spinning (then yielding the CPU) while another thread holds it.
        /// Never fails: there is no poisoning (a panic while it is held releases it through
        /// the guard's drop, as a `Mutex` whose poisoning is ignored would).
        #[inline]
        pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
            // Acquire: pairs with the Release store of the guard's drop, so this thread's
            // accesses to `value` come after the previous holder's. A compare-and-swap rather
            // than a swap: a loser writes nothing (a failed swap would store `true` again,
            // which loom cannot order against the holder's later release, so its model would
            // let the loser read its own `true` forever).
            if self
                .locked
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return SpinGuard { lock: self };
            }
            self.lock_contended()
        }

        /// [`SpinLock::lock`] after a failed first attempt: kept out of line, so that the hot
        /// paths that inline `lock` carry no spin loop (fewer registers and bytes of code).
        #[cold]
        #[inline(never)]
        fn lock_contended(&self) -> SpinGuard<'_, T> {
            let mut spins = 0u32;
            loop {
                // Wait with plain loads (no cache-line ping-pong), yielding if the holder was
                // descheduled. (Under loom both the hint and the yield hand the turn to
                // another thread, so the model's spin is finite.)
                while self.locked.load(Ordering::Relaxed) {
                    spins = spins.saturating_add(1);
                    if spins < 64 {
                        hint::spin_loop();
                    } else {
                        thread::yield_now();
                    }
                }
                // Acquire, compare-and-swap: as in `lock`.
                if self
                    .locked
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return SpinGuard { lock: self };
                }
            }
        }
    }

    impl<T> std::fmt::Debug for SpinLock<T> {
        /// Does not take the lock (the caller may hold it).
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("SpinLock")
                .field("locked", &self.locked.load(Ordering::Relaxed))
                .finish_non_exhaustive()
        }
    }

    /// Access to a [`SpinLock`]'s value; releases the lock when dropped.
    pub(crate) struct SpinGuard<'a, T> {
        lock: &'a SpinLock<T>,
    }

    impl<T> Deref for SpinGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            // SAFETY: the guard exists only while this thread holds the lock, so no other
            // thread accesses `value` until the guard's drop; the reference cannot outlive the
            // guard. (Under loom, `with` checks this access against every other one.)
            self.lock.value.with(|p| unsafe { &*p })
        }
    }

    impl<T> DerefMut for SpinGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            // SAFETY: as in `deref`, and `&mut self` makes this the only access through the
            // guard.
            self.lock.value.with_mut(|p| unsafe { &mut *p })
        }
    }

    impl<T> Drop for SpinGuard<'_, T> {
        /// Releases the lock. The store is the guard's last access to the lock's memory.
        fn drop(&mut self) {
            // Release: publishes this holder's accesses to `value` to the next `Acquire` swap.
            self.lock.locked.store(false, Ordering::Release);
        }
    }
}
