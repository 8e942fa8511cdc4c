//! Synchronisation primitives, routed through `loom` when built with `--cfg loom` so that the
//! same pool and waiter code is model-checked (as tokio does).

#[cfg(loom)]
#[allow(unused_imports)]
pub(crate) use loom::sync::{
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, MutexGuard,
};
#[cfg(loom)]
#[allow(unused_imports)]
pub(crate) use loom::thread;

#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use std::sync::{
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, MutexGuard,
};
#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use std::thread;

pub(crate) use spin::{SpinGuard, SpinLock};

/// A lock for critical sections of a few instructions that are almost never contended (the
/// per-CPU caches). Taking it is one atomic swap and releasing it one plain store, where a
/// futex mutex needs a read-modify-write for both; a waiter spins briefly, then yields.
///
/// Under loom it is loom's `Mutex`, so the models see every acquisition.
#[cfg(not(loom))]
mod spin {
    use std::cell::UnsafeCell;
    use std::ops::{Deref, DerefMut};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A test-and-test-and-set spinlock over a `T`.
    #[derive(Default)]
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
        pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
            let mut spins = 0u32;
            loop {
                if !self.locked.swap(true, Ordering::Acquire) {
                    return SpinGuard { lock: self };
                }
                // Wait with plain loads (no cache-line ping-pong), yielding if the holder was
                // descheduled.
                while self.locked.load(Ordering::Relaxed) {
                    spins = spins.saturating_add(1);
                    if spins < 64 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
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
            // SAFETY: the guard exists only while this thread holds the lock.
            unsafe { &*self.lock.value.get() }
        }
    }

    impl<T> DerefMut for SpinGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            // SAFETY: as in `deref`, and `&mut self` makes this the only access.
            unsafe { &mut *self.lock.value.get() }
        }
    }

    impl<T> Drop for SpinGuard<'_, T> {
        /// Releases the lock. The store is the guard's last access to the lock's memory.
        fn drop(&mut self) {
            self.lock.locked.store(false, Ordering::Release);
        }
    }
}

/// Under loom: a `Mutex` with the spinlock's interface.
#[cfg(loom)]
mod spin {
    /// loom's `Mutex` behind the spinlock's interface.
    #[derive(Debug, Default)]
    pub(crate) struct SpinLock<T>(loom::sync::Mutex<T>);

    pub(crate) type SpinGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> SpinLock<T> {
        pub(crate) fn new(value: T) -> Self {
            SpinLock(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
            self.0.lock().unwrap()
        }
    }
}
