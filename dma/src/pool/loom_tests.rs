//! Loom models of the pool's concurrency: the real `Pool` code (arena, per-CPU caches, wait
//! queue, grower step) over the identity view, with every `Mutex`, `Condvar` and atomic in the
//! pool routed through `loom` (see [`crate::sync`]), so loom explores their interleavings. The
//! per-CPU caches' [`SpinLock`](crate::sync::SpinLock) is the production code over loom's
//! atomics and `UnsafeCell`: loom explores its compare-and-swap and release store and checks
//! every access to a cache against them.
//!
//! Run with `tools/loom` (`RUSTFLAGS="--cfg loom" cargo test -p tidepool --lib --release
//! loom`; `LOOM_MAX_PREEMPTIONS=3` there, every model under ~6 s on a quiet core, each
//! printing its interleavings count, bound and time).
//!
//! # Configuration
//! Every pool model uses chunks of one 64 KiB block (the largest size class; the reserve
//! model uses one chunk of two blocks), so "the pool is full" is one allocation and the
//! state space stays small. The grower runs only when a model calls [`Pool::maintain`]
//! (`background: false`), and `grow_after` is zero so any waiter counts as past its bounded
//! wait. A pool has two per-CPU caches under loom ([`crate::sync::model_cpu`]): a thread
//! uses the cache of the CPU the model gave it (CPU 0 unless it calls `model_cpu::set`), so
//! which cache a release lands in, and whose cache a drain empties, is part of the model.
//! Futures are driven either by `loom::future::block_on` on their own thread or polled by
//! hand on the main thread with a counting waker (a second waiter without a third thread).
//!
//! # The models and what each proves (all: nothing lost, in-use bytes back to 0, every block
//! allocatable again at the end; loom reports a deadlock for any lost wake-up)
//! - `loom_spinlock_no_lost_update`: the spinlock alone; two threads increment a counter
//!   twice under it: one holder at a time, no lost update, no data race on the value.
//! - `loom_spinlock_publishes_data_written_under_it`: data written outside the lock while
//!   holding it is visible to the next holder (what the caches' `Vec`s rely on). Both
//!   spinlock models, and eight of the pool models, fail with a loom causality violation when
//!   the guard's release store is weakened to `Relaxed`.
//! - (a) `loom_last_block_waiter_is_woken`: awaitable and immediate allocations race for the
//!   last block while a third awaits it; every waiter completes. (Three threads: one
//!   preemption, see `model_bounded`.)
//! - (a') `loom_cached_release_reaches_waiter_after_grower_drain`: two waiters on CPUs 0 and
//!   1 with caches on; a release that misses a new waiter lands in a cache and the grower's
//!   drain hands it on. (Three threads: one preemption.)
//! - (b), (b') `loom_cancel_racing_grant_loses_nothing`,
//!   `loom_poll_then_cancel_racing_grant_loses_nothing`: a waiter dropped (after polling again
//!   or not) while a release grants it: the grant is taken or returned, never lost.
//! - (c) `loom_grow_racing_waiter_and_release`: growth and a release race to serve one
//!   waiter: it is served once, the other space stays free, every chunk is shared once.
//! - (d) `loom_shrink_racing_alloc`: the shrinker never frees a chunk an allocation lands in.
//! - `loom_last_handle_and_last_buffer_race`: the pool is freed once, after its last handle
//!   and its last buffer (the caches' credits).
//! - (e) `loom_growth_failure_ends_both_waiters`: a failed growth ends both waiters with its
//!   typed cause; nothing stays queued, watched or armed.
//! - (f) `loom_reserve_kept_from_awaitable_for_immediate`: an immediate allocation (CPU 1)
//!   always gets the reserve; a racing awaitable one (CPU 0) never takes it, and is served,
//!   woken once, when the held block comes back (through the grower's drain if the immediate
//!   thread's release landed in CPU 1's cache).
//! - (g) `loom_transient_chunk_retired_exactly_once`: an immediate allocation (CPU 1) makes a
//!   transient chunk (or drains CPU 0's cache) while the holder releases and the grower runs:
//!   the transient chunk is retired exactly once and unshared, capacity back to the prefill.
//! - (h) `loom_timeout_racing_release_either_served_or_timed_out`: of two waiters, the older
//!   one's timeout is due while the block is released on CPU 1: it is served or times out,
//!   never both; if it timed out the block reaches the second waiter, woken once.
//! - (i) `loom_growth_serves_waiters_in_fifo_order`: growth completes while a second waiter
//!   (CPU 1) arrives behind the first: the new chunk goes to the first (FIFO, no barging),
//!   woken once; the second is served by the next release.
//! - (j) `loom_prezero_racing_from_device_maps_hands_out_only_zero_blocks`: the grower's
//!   pre-zeroing pass races two `FromDevice` maps (each written by the "device", then
//!   released) on the same CPU's cache: every map hands out an all-zero block, a released
//!   block never carries the pre-zeroed mark, every marked block is zero, hits plus misses
//!   count the maps, nothing is lost.
//!
//! # What is not modelled
//! - Real time: `Instant::now()` is not loom's. Models make it irrelevant (`grow_after` zero,
//!   a zero timeout, `growth_failure_wait` zero), so the grower's expiry of a *future*
//!   deadline, `AtCap::Fail`'s recheck and backoff lengths are not explored.
//! - The background grower thread and its `Signal` sleep: models call `maintain` by hand.
//! - Three threads spinning at two preemptions: loom does not count a switch away from a
//!   yielding spinner as a preemption, so two spinners can pass the turn to each other
//!   forever while the holder waits (at two preemptions an execution of (a) ran past 3000
//!   branches; at one, every execution stays under 1200); models with three threads on cache
//!   locks run at one preemption (`model_bounded`). The new models keep to two threads (the main thread polls
//!   the second waiter by hand) and run at the full bound.
//! - More than two CPUs, the credits' refill batch sizes of production (`CREDITS_BATCH` is
//!   1 and `CREDITS_MAX` 2 under loom), and size classes below the largest (buddy splitting
//!   is single-threaded code under the pool lock, covered by the unit and property tests).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use loom::future::block_on;
use loom::thread;

use super::*;
use crate::memory::{MemoryConfig, PageSize};
use crate::share::identity::Identity;
use crate::sync::model_cpu;

/// Runs `f` under loom for every interleaving (up to `LOOM_MAX_PREEMPTIONS`), and reports how
/// many it explored (so that a model that explores nothing is visible).
fn model(f: impl Fn() + Sync + Send + 'static) {
    model_bounded(usize::MAX, f)
}

/// [`model`] with at most `max_preemptions` (or `LOOM_MAX_PREEMPTIONS`, if lower).
///
/// Why some models need it: a thread waiting for a spinlock yields, and loom does not count a
/// switch away from a yielding thread as a preemption. With three or more threads, two
/// waiters can then hand the turn to each other forever while the holder never runs (a
/// schedule no real CPU keeps up, but one loom must explore to its branch limit), so a model
/// with three threads that meet on a cache lock explodes at two preemptions. Those run at one.
fn model_bounded(max_preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = runs.clone();
    let mut builder = loom::model::Builder::new();
    // The real spinlock and two caches make an execution of the pool models a few thousand
    // loom operations long; loom's default bound (1000) would call that a livelock.
    if std::env::var_os("LOOM_MAX_BRANCHES").is_none() {
        builder.max_branches = 20_000;
    }
    let bound = builder.preemption_bound.unwrap_or(2).min(max_preemptions);
    builder.preemption_bound = Some(bound);
    let start = std::time::Instant::now();
    builder.check(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    let runs = runs.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{runs} interleavings explored ({bound} preemptions) in {:.1?}",
        start.elapsed()
    );
    assert!(runs > 1, "the model has no concurrency to explore");
}

/// One block of the largest size class.
const BLOCK: usize = 64 << 10;

/// A pool config whose single prefilled chunk is one `BLOCK`; `max_chunks` caps growth.
/// `cache` turns the per-core cache on (one block per class) or off.
fn config(max_chunks: usize, cache: bool) -> PoolConfig {
    PoolConfig {
        memory: MemoryConfig {
            page_size: PageSize::Small4K,
            allow_small_pages: true,
        },
        chunk_bytes: BLOCK,
        prefill_bytes: BLOCK,
        max_bytes: BLOCK * max_chunks,
        max_buffer: BLOCK,
        low_watermark: 0,
        high_watermark: BLOCK,
        shrink_delay: Duration::from_secs(3600),
        reserve_bytes: 0,
        transient: false,
        grow_after: Duration::ZERO,
        cache_bytes_per_class: if cache { BLOCK } else { 0 },
        // Off except in the pre-zeroing model: a pass in every `maintain` would multiply the
        // other models' interleavings without exploring anything they are about.
        prezero_bytes_per_pass: 0,
        background: false,
        ..PoolConfig::default()
    }
}

/// A pool over a fresh identity view (`pool.view().usage()` counts its chunk mappings).
fn pool(cfg: PoolConfig) -> Pool {
    let view: std::sync::Arc<dyn crate::share::DeviceView> = std::sync::Arc::new(Identity::new());
    Pool::new(view, cfg).expect("pool")
}

/// A waker that only counts (for futures polled by hand on the model's main thread; wakes
/// happen on other loom threads and are read after joining them).
#[derive(Default)]
struct CountingWaker(std::sync::atomic::AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The pool has nothing in use, nobody waiting, and its whole capacity can be allocated again.
fn assert_quiescent(p: &Pool) {
    {
        let g = p.shared.global.lock().unwrap();
        assert!(
            g.queue.is_empty(),
            "no waiter and no unclaimed grant left: {} waiting, {} unclaimed",
            g.queue.waiting(),
            g.queue.unclaimed()
        );
    }
    let s = p.stats();
    assert_eq!(s.in_use_bytes, 0, "{s:?}");
    assert_eq!(s.waiters, 0, "{s:?}");
    let chunks = s.capacity_bytes as usize / BLOCK;
    let all: Vec<_> = (0..chunks)
        .map(|i| {
            p.try_alloc(BLOCK)
                .unwrap_or_else(|e| panic!("block {i} of {chunks}: {e}"))
        })
        .collect();
    assert_eq!(all.len(), chunks);
}

/// Allocates the block with the awaitable path, touches it, and frees it.
fn alloc_and_free(p: &Pool, tag: u8) {
    let mut b = block_on(p.alloc(BLOCK)).expect("awaitable alloc is served");
    b.write_at(0, &[tag; 64]).unwrap();
    drop(b);
}

/// (a) Two threads take and free the last block (one awaitable, one immediate) while a third
/// awaits it; caches off, so every release goes through the arena and the wait queue. The
/// awaiting threads always complete (loom reports a deadlock if a wake-up were lost).
#[test]
fn loom_last_block_waiter_is_woken() {
    // Three threads meeting on cache locks: see `model_bounded`.
    model_bounded(1, || {
        let p = pool(config(1, false));
        let p1 = p.clone();
        let a = thread::spawn(move || {
            model_cpu::set(1);
            alloc_and_free(&p1, 1)
        });
        let p2 = p.clone();
        let b = thread::spawn(move || {
            // The immediate path may find the block taken: that is an error, not a wait.
            match p2.try_alloc(BLOCK) {
                Ok(buf) => drop(buf),
                Err(PoolError::Exhausted { .. }) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        });
        alloc_and_free(&p, 3);
        a.join().unwrap();
        b.join().unwrap();
        assert_quiescent(&p);
    });
}

/// (a') As (a) with the per-core cache on: a release that misses a brand-new waiter (the
/// `waiting` mirror is read without the lock) lands in the cache, and the design relies on the
/// grower's drain to hand it on. The main thread plays the grower, stepping until the waiter
/// is served: the waiter never hangs as long as the grower runs.
#[test]
fn loom_cached_release_reaches_waiter_after_grower_drain() {
    // Three threads meeting on cache locks: see `model_bounded`.
    model_bounded(1, || {
        let p = pool(config(1, true));
        let done = Arc::new(AtomicUsize::new(0));
        let users: Vec<_> = (1..=2u8)
            .map(|tag| {
                let (p, done) = (p.clone(), done.clone());
                thread::spawn(move || {
                    model_cpu::set(tag as usize - 1);
                    alloc_and_free(&p, tag);
                    done.fetch_add(1, Ordering::Release);
                })
            })
            .collect();
        // The grower: steps until both are served (a waiter past grow_after, zero here, makes
        // a step drain the caches). The background grower is woken by each enqueue and
        // rechecks after grow_after, which this loop stands for.
        while done.load(Ordering::Acquire) < 2 {
            p.maintain();
            thread::yield_now();
        }
        for u in users {
            u.join().unwrap();
        }
        assert_quiescent(&p);
    });
}

/// (b) A queued waiter is dropped while a release grants it the block: the grant is either
/// taken back by the cancel and returned to the arena, or never made. Nothing is lost.
#[test]
fn loom_cancel_racing_grant_loses_nothing() {
    // Without and with the per-core cache (a release may land there instead).
    for cache in [false, true] {
        model(move || {
            let p = pool(config(1, cache));
            let held = p.try_alloc(BLOCK).unwrap();
            let waker = std::sync::Arc::new(CountingWaker::default());
            let waker_handle = Waker::from(waker.clone());
            // Boxed, so that `drop(fut)` below drops (cancels) the future itself, not a pin.
            let mut fut = Box::pin(p.alloc(BLOCK));
            assert!(fut
                .as_mut()
                .poll(&mut Context::from_waker(&waker_handle))
                .is_pending());
            let releaser = thread::spawn(move || drop(held));
            drop(fut); // Cancel, concurrently with the release's grant.
            releaser.join().unwrap();
            assert!(waker.0.load(std::sync::atomic::Ordering::SeqCst) <= 1);
            assert_quiescent(&p);
        });
    }
}

/// (b') As (b), but the waiter polls once more before it is dropped: if the grant arrived it
/// takes the block (and frees it with the buffer), otherwise the cancel returns it.
#[test]
fn loom_poll_then_cancel_racing_grant_loses_nothing() {
    // Without and with the per-core cache (a release may land there instead).
    for cache in [false, true] {
        model(move || {
            let p = pool(config(1, cache));
            let held = p.try_alloc(BLOCK).unwrap();
            let waker = Waker::from(std::sync::Arc::new(CountingWaker::default()));
            let mut fut = Box::pin(p.alloc(BLOCK));
            let mut cx = Context::from_waker(&waker);
            assert!(fut.as_mut().poll(&mut cx).is_pending());
            let releaser = thread::spawn(move || drop(held));
            let got = fut.as_mut().poll(&mut cx);
            if let Poll::Ready(r) = got {
                drop(r.expect("granted"));
            }
            drop(fut);
            releaser.join().unwrap();
            assert_quiescent(&p);
        });
    }
}

/// (c) The grower grows while a waiter waits and the holder releases: the waiter is served by
/// whichever comes first, and the other's space stays free (not leaked, not double-granted).
#[test]
fn loom_grow_racing_waiter_and_release() {
    model(|| {
        let p = pool(config(2, false));
        let held = p.try_alloc(BLOCK).unwrap();
        let pw = p.clone();
        let waiter = thread::spawn(move || alloc_and_free(&pw, 2));
        let pg = p.clone();
        let grower = thread::spawn(move || {
            pg.maintain();
        });
        drop(held);
        waiter.join().unwrap();
        grower.join().unwrap();
        let s = p.stats();
        assert!(
            s.capacity_bytes == BLOCK as u64 || s.capacity_bytes == 2 * BLOCK as u64,
            "{s:?}"
        );
        assert_eq!(
            p.view().usage().mappings,
            s.chunks,
            "every chunk shared once"
        );
        assert_quiescent(&p);
    });
}

/// (d) The shrinker gives back an idle chunk while another thread allocates and writes: the
/// allocation never lands in a chunk being freed (a write would fault), capacity never drops
/// below the prefill, and the books balance.
#[test]
fn loom_shrink_racing_alloc() {
    model(|| {
        let cfg = PoolConfig {
            shrink_delay: Duration::ZERO,
            ..config(2, true)
        };
        let p = pool(cfg);
        // Grow to two chunks: one waiter, one grower step.
        let held = p.try_alloc(BLOCK).unwrap();
        {
            let waker = Waker::from(std::sync::Arc::new(CountingWaker::default()));
            let mut cx = Context::from_waker(&waker);
            let mut fut = pin!(p.alloc(BLOCK));
            assert!(fut.as_mut().poll(&mut cx).is_pending());
            assert_eq!(p.maintain().grew, 1);
            let Poll::Ready(Ok(b)) = fut.as_mut().poll(&mut cx) else {
                panic!("served by growth")
            };
            drop((held, b));
        }
        assert_eq!(p.stats().chunks, 2);

        let pa = p.clone();
        let user = thread::spawn(move || {
            if let Ok(mut b) = pa.try_alloc(BLOCK) {
                b.write_at(BLOCK - 8, &[7; 8]).unwrap();
                let mut back = [0; 8];
                b.read_at(BLOCK - 8, &mut back).unwrap();
                assert_eq!(back, [7; 8]);
            }
        });
        let r = p.maintain();
        user.join().unwrap();
        assert!(r.shrank <= 1, "{r:?}");
        let s = p.stats();
        assert!(s.chunks >= 1, "never below the prefill: {s:?}");
        assert_eq!(
            p.view().usage().mappings,
            s.chunks,
            "shared chunks match the arena"
        );
        assert_quiescent(&p);
    });
}

/// A buffer's pool reference comes from the cache's credits and goes back to them: the last
/// handle and the last buffer race (handle dropped on one thread, buffer released on another,
/// with credits in the cache): the pool is freed exactly once, after both, and nothing leaks
/// (loom reports a leaked `Arc` or a use after free).
#[test]
fn loom_last_handle_and_last_buffer_race() {
    model(|| {
        let view: std::sync::Arc<dyn crate::share::DeviceView> =
            std::sync::Arc::new(Identity::new());
        let p = Pool::new(view.clone(), config(1, true)).expect("pool");
        // A round trip first, so the cache holds a credit when the race starts.
        drop(p.try_alloc(BLOCK).unwrap());
        let b = p.try_alloc(BLOCK).unwrap();
        let t = thread::spawn(move || drop(b));
        drop(p);
        t.join().unwrap();
        assert_eq!(view.usage().mappings, 0, "the pool was freed");
    });
}

/// (e) The growth-failure hand-off: two waiters queue for the one block (held), and the
/// grower's attempt to grow fails (the view's single mapping slot is the prefill's). The
/// failed attempt was made on behalf of both, so each ends with `GrowthFailed` carrying the
/// view's `MappingLimit`: the one on its own thread whichever way the failure's wake races
/// its first poll (loom reports a deadlock if a wake-up were lost), the one polled by hand
/// woken exactly once. Nothing stays queued, watched or armed.
///
/// `AtCap::Wait` with a zero `growth_failure_wait`: the rule then turns on "on its behalf"
/// alone and no deadline is armed, so real time (which loom does not control) cannot change
/// the model's path. (`AtCap::Fail` arms a 1 ms recheck that the grower would expire or not
/// depending on the clock.) The second waiter is polled by hand on the model's thread to
/// keep the state space small.
#[test]
fn loom_growth_failure_ends_both_waiters() {
    fn is_mapping_limit(e: &PoolError) -> bool {
        matches!(e, PoolError::GrowthFailed { .. })
            && matches!(
                e.growth_cause(),
                Some(PoolError::Share(
                    crate::share::ShareError::MappingLimit { .. }
                ))
            )
    }
    model(|| {
        let view: std::sync::Arc<dyn crate::share::DeviceView> =
            std::sync::Arc::new(Identity::with_limit(1));
        let cfg = PoolConfig {
            growth_failure_wait: Duration::ZERO,
            ..config(2, false)
        };
        let p = Pool::new(view, cfg).expect("pool");
        let held = p.try_alloc(BLOCK).unwrap();
        let counter = std::sync::Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut mine = Box::pin(p.alloc(BLOCK));
        assert!(mine.as_mut().poll(&mut cx).is_pending());
        let pt = p.clone();
        let theirs = thread::spawn(move || match block_on(pt.alloc(BLOCK)) {
            Err(e) => assert!(is_mapping_limit(&e), "{e}"),
            Ok(_) => panic!("expected GrowthFailed, got a buffer"),
        });
        // The grower runs once both wait (the attempt is then made on behalf of both).
        while p.shared.global.lock().unwrap().queue.waiting() < 2 {
            thread::yield_now();
        }
        let r = p.maintain();
        assert_eq!((r.grew, r.failed), (0, 1), "{r:?}");
        assert_eq!(counter.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        match mine.as_mut().poll(&mut cx) {
            Poll::Ready(Err(e)) => assert!(is_mapping_limit(&e), "{e}"),
            other => panic!("expected GrowthFailed, got {other:?}"),
        }
        drop(mine);
        theirs.join().unwrap();
        {
            let g = p.shared.global.lock().unwrap();
            assert!(
                g.deadlines.is_empty(),
                "{} deadlines left",
                g.deadlines.len()
            );
        }
        drop(held);
        assert_quiescent(&p);
    });
}

// ---- The per-CPU caches' spinlock alone ------------------------------------------------------

/// The spinlock's mutual exclusion: two threads each increment a counter twice under the lock
/// (reading it, then writing it back, with a loom atomic marking the critical section so that
/// loom can switch threads inside it). No two holders at once, no lost update; loom's
/// `UnsafeCell` checks every access to the counter against the lock's Acquire/Release edges.
#[test]
fn loom_spinlock_no_lost_update() {
    model(|| {
        let lock = Arc::new(crate::sync::SpinLock::new(0u32));
        let inside = Arc::new(AtomicUsize::new(0));
        let bump = |lock: Arc<crate::sync::SpinLock<u32>>, inside: Arc<AtomicUsize>| {
            move || {
                for _ in 0..2 {
                    let mut g = lock.lock();
                    assert_eq!(inside.fetch_add(1, Ordering::Relaxed), 0, "two holders");
                    let v = *g;
                    inside.fetch_sub(1, Ordering::Relaxed);
                    *g = v + 1;
                }
            }
        };
        let t = thread::spawn(bump(lock.clone(), inside.clone()));
        bump(lock.clone(), inside)();
        t.join().unwrap();
        assert_eq!(*lock.lock(), 4, "an increment was lost");
    });
}

/// The spinlock as a publication edge, which the caches rely on (a block pushed into a
/// cache's `Vec` by one CPU is popped by another): one thread writes a payload that lives
/// *outside* the lock while holding it and sets a flag in the lock; the other takes the lock
/// once and, if it sees the flag, reads the payload. Loom's `UnsafeCell` reports that read as
/// a data race unless the guard's release store synchronises with the next acquiring
/// compare-and-swap: this model fails if the release store is weakened to `Relaxed` (checked
/// by hand when it was written, see the commit message).
#[test]
fn loom_spinlock_publishes_data_written_under_it() {
    model(|| {
        let lock = Arc::new(crate::sync::SpinLock::new(false));
        let payload = Arc::new(loom::cell::UnsafeCell::new(0u64));
        let (l, p) = (lock.clone(), payload.clone());
        let writer = thread::spawn(move || {
            let mut g = l.lock();
            // SAFETY: the payload is written only here, under the lock, before the flag is
            // set; the reader reads it only under the lock after seeing the flag.
            p.with_mut(|v| unsafe { *v = 42 });
            *g = true;
        });
        {
            let g = lock.lock();
            if *g {
                // SAFETY: the flag is set: the writer's write came before it, under the lock.
                assert_eq!(payload.with(|v| unsafe { *v }), 42);
            }
        }
        writer.join().unwrap();
    });
}

// ---- The pool's protocols over two CPU caches -----------------------------------------------

/// A waker for a future polled by hand on the model's main thread, and how often it was woken.
fn counting_waker() -> (std::sync::Arc<CountingWaker>, Waker) {
    let counter = std::sync::Arc::new(CountingWaker::default());
    let waker = Waker::from(counter.clone());
    (counter, waker)
}

impl CountingWaker {
    fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// (f) The reserve: an immediate allocation on CPU 1 races an awaitable one polled on CPU 0,
/// with one block in use (held by the main thread) and the other kept as the reserve
/// (`reserve_bytes` = one block), caches on. The immediate path always gets a block (the
/// reserve is there for it); the awaitable one never takes the reserve: it waits, and is
/// served only once the held block is back. When the immediate thread's release landed in
/// CPU 1's cache (it may read the `waiting` mirror before the waiter's store), the grower's
/// drain brings it back: the main thread runs one grower step after dropping its block, and
/// the waiter is then served, woken exactly once.
#[test]
fn loom_reserve_kept_from_awaitable_for_immediate() {
    model(|| {
        let cfg = PoolConfig {
            chunk_bytes: 2 * BLOCK,
            prefill_bytes: 2 * BLOCK,
            max_bytes: 2 * BLOCK,
            high_watermark: 2 * BLOCK,
            reserve_bytes: BLOCK,
            ..config(1, true)
        };
        let p = pool(cfg);
        let held = p.try_alloc(BLOCK).unwrap();
        let pi = p.clone();
        let immediate = thread::spawn(move || {
            model_cpu::set(1);
            let b = pi
                .try_alloc(BLOCK)
                .expect("the reserve is kept for the immediate path");
            drop(b);
        });
        let (counter, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut waiter = Box::pin(p.alloc(BLOCK));
        // Whatever the immediate thread has done, one block is held: only the reserve's
        // worth (or less) is free, which an awaitable request may not take.
        assert!(
            waiter.as_mut().poll(&mut cx).is_pending(),
            "took the reserve"
        );
        immediate.join().unwrap();
        assert!(
            waiter.as_mut().poll(&mut cx).is_pending(),
            "took the reserve"
        );
        assert_eq!(
            p.stats().reserve_allocs,
            1,
            "the immediate path used the reserve"
        );
        drop(held);
        if counter.count() == 0 {
            // The immediate thread's block sits in CPU 1's cache: the grower's drain.
            p.maintain();
        }
        assert_eq!(counter.count(), 1, "woken once");
        let Poll::Ready(Ok(b)) = waiter.as_mut().poll(&mut cx) else {
            panic!("the waiter is served once both blocks are free")
        };
        drop(b);
        drop(waiter);
        assert_quiescent(&p);
    });
}

/// (g) The transient path: the pool's one block is held on CPU 0; an immediate allocation on
/// CPU 1 finds nothing (or, if the holder's release landed in CPU 0's cache first, drains it
/// from there) and makes a transient chunk, then frees its buffer, while the main thread
/// drops its block and runs a grower step concurrently, and another after joining. Whatever
/// the order: a transient chunk made is retired exactly once (by one of the two steps),
/// capacity and the view's mappings are back to the prefill, in-use bytes are 0.
#[test]
fn loom_transient_chunk_retired_exactly_once() {
    model(|| {
        let cfg = PoolConfig {
            transient: true,
            ..config(2, true)
        };
        let p = pool(cfg);
        let held = p.try_alloc(BLOCK).unwrap();
        let pt = p.clone();
        let immediate = thread::spawn(move || {
            model_cpu::set(1);
            let mut b = pt
                .try_alloc(BLOCK)
                .expect("pool, other CPU's cache or transient");
            b.write_at(0, &[5; 64]).unwrap();
            drop(b);
        });
        drop(held);
        let first = p.maintain();
        immediate.join().unwrap();
        let second = p.maintain();
        let third = p.maintain();
        let s = p.stats();
        assert!(s.transient_allocs <= 1, "{s:?}");
        assert_eq!(
            (first.retired + second.retired + third.retired) as u64,
            s.transient_allocs,
            "a transient chunk is retired exactly once: {first:?} {second:?} {third:?}"
        );
        assert_eq!(s.capacity_bytes, BLOCK as u64, "{s:?}");
        assert_eq!(
            p.view().usage().mappings,
            1,
            "the transient chunk was unshared"
        );
        assert_eq!(s.in_use_bytes, 0, "{s:?}");
        assert_quiescent(&p);
    });
}

/// (h) Deadlines: two waiters queue for the held block (A with a timeout, then B without),
/// both polled by hand on CPU 0; the block is released on CPU 1 while A is polled again with
/// its timeout due. A either gets the block or times out, never both: if it times out, the
/// block (released before or after) goes to B, woken exactly once; if A got it, B is still
/// waiting and is served when A's buffer is dropped. Nothing is lost, the timeout is counted
/// once or not at all.
///
/// Loom does not control `Instant::now()`: A's timeout is zero, so it is due at every poll
/// after it queued and the interleaving alone decides (a zero timeout arms no deadline, so
/// the grower's expiry wake is not modelled here: it is a plain waker call under the lock).
#[test]
fn loom_timeout_racing_release_either_served_or_timed_out() {
    model(|| {
        let p = pool(config(1, true));
        let held = p.try_alloc(BLOCK).unwrap();
        let (count_a, waker_a) = counting_waker();
        let (count_b, waker_b) = counting_waker();
        let mut a = Box::pin(p.alloc_timeout(BLOCK, Duration::ZERO));
        let mut b = Box::pin(p.alloc(BLOCK));
        assert!(a
            .as_mut()
            .poll(&mut Context::from_waker(&waker_a))
            .is_pending());
        assert!(b
            .as_mut()
            .poll(&mut Context::from_waker(&waker_b))
            .is_pending());
        let releaser = thread::spawn(move || {
            model_cpu::set(1);
            drop(held);
        });
        let got_a = match a.as_mut().poll(&mut Context::from_waker(&waker_a)) {
            Poll::Ready(Ok(buf)) => Some(buf),
            Poll::Ready(Err(PoolError::Timeout { .. })) => None,
            other => panic!("a due waiter ends: {other:?}"),
        };
        releaser.join().unwrap();
        assert!(count_a.count() <= 1);
        let timed_out = got_a.is_none();
        assert_eq!(p.stats().timeouts, timed_out as u64);
        if let Some(buf) = got_a {
            assert_eq!(
                count_b.count(),
                0,
                "B is behind A: not served with A's block"
            );
            assert!(b
                .as_mut()
                .poll(&mut Context::from_waker(&waker_b))
                .is_pending());
            drop(buf);
        }
        assert_eq!(count_b.count(), 1, "B woken once, with the block");
        let Poll::Ready(Ok(buf)) = b.as_mut().poll(&mut Context::from_waker(&waker_b)) else {
            panic!("B is served")
        };
        drop((buf, a, b));
        assert_quiescent(&p);
    });
}

/// (i) The grower hand-off: waiter A queues (polled by hand on CPU 0) for the held block;
/// waiter B, on CPU 1, arrives while the main thread runs a grower step that makes one
/// chunk (the cap). The new chunk goes to A, the oldest, however B's arrival interleaves with
/// the growth (B may not barge: it queues behind A even if it sees the free block first); A
/// is woken exactly once. B is served when the held block is released (loom reports a
/// deadlock if its wake-up were lost). Two chunks, both shared once, nothing in use.
#[test]
fn loom_growth_serves_waiters_in_fifo_order() {
    model(|| {
        let p = pool(config(2, false));
        let held = p.try_alloc(BLOCK).unwrap();
        let (count_a, waker_a) = counting_waker();
        let mut cx = Context::from_waker(&waker_a);
        let mut a = Box::pin(p.alloc(BLOCK));
        assert!(a.as_mut().poll(&mut cx).is_pending());
        let pb = p.clone();
        let b = thread::spawn(move || {
            model_cpu::set(1);
            let mut buf = block_on(pb.alloc(BLOCK)).expect("B is served");
            buf.write_at(0, &[2; 64]).unwrap();
            drop(buf);
        });
        let r = p.maintain();
        assert_eq!(r.grew, 1, "{r:?}");
        assert_eq!(count_a.count(), 1, "A woken once, by the growth");
        let Poll::Ready(Ok(buf)) = a.as_mut().poll(&mut cx) else {
            panic!("A, the oldest waiter, gets the new chunk")
        };
        drop(held);
        b.join().unwrap();
        drop((buf, a));
        let s = p.stats();
        assert_eq!(s.chunks, 2, "{s:?}");
        assert_eq!(p.view().usage().mappings, 2, "every chunk shared once");
        assert_quiescent(&p);
    });
}

/// Every block on a cache's zeroed list carries the mark and is all zero; no block on a
/// released list carries it.
fn assert_zeroed_lists_hold_zero_blocks(p: &Pool) {
    for c in p.shared.caches.each() {
        let c = c.lock();
        for b in c.zeroed.iter().flatten() {
            assert!(b.zeroed(), "unmarked block on a zeroed list: {b:?}");
            let mut bytes = vec![0xEEu8; b.size()];
            // SAFETY: the block is free and in the cache whose lock we hold; nobody writes it.
            unsafe { crate::copy::copy_from_device(b.ptr.as_ptr(), &mut bytes) };
            assert!(bytes.iter().all(|&x| x == 0), "a marked block is not zero");
        }
        for b in c.classes.iter().flatten() {
            assert!(!b.zeroed(), "a released block carries the pre-zeroed mark");
        }
    }
}

/// (j) Pre-zeroing racing the hot path: the grower's pass (taking a released, written block
/// out of CPU 0's cache, zeroing it outside the lock, marking it and putting it back) runs
/// while the owner of CPU 0 maps `FromDevice` twice, letting its "device" write the buffer
/// and releasing it in between. Whatever the interleaving, each map hands the device an all
/// zero block (a pre-zeroed one, one it zeroed itself, or a fresh one from the arena), a
/// released block is never marked, every marked block is zero, the hits and misses add up,
/// and nothing is lost. (Two threads: the full preemption bound.)
#[test]
fn loom_prezero_racing_from_device_maps_hands_out_only_zero_blocks() {
    model(|| {
        let cfg = PoolConfig {
            chunk_bytes: 2 * BLOCK,
            prefill_bytes: 2 * BLOCK,
            max_bytes: 2 * BLOCK,
            high_watermark: 2 * BLOCK,
            prezero_bytes_per_pass: BLOCK,
            ..config(1, true)
        };
        let p = pool(cfg);
        // A written block in CPU 0's cache; the arena keeps the other one (room for the pass).
        let mut b = p.try_alloc(BLOCK).unwrap();
        b.write_at(0, &vec![0xAB; BLOCK]).unwrap();
        drop(b);
        let p1 = p.clone();
        let grower = thread::spawn(move || p1.shared.prezero(BLOCK));
        let mut dst = vec![0u8; BLOCK];
        for junk in [0xCDu8, 0xEF] {
            let m = p.try_map(&mut dst[..], Direction::FromDevice).unwrap();
            let mut seen = vec![0xEEu8; BLOCK];
            m.buffer().read_at(0, &mut seen).unwrap();
            assert!(seen.iter().all(|&x| x == 0), "the device saw stale data");
            // The device writes the whole buffer.
            // SAFETY: the mapping's block is ours, `BLOCK` bytes long.
            unsafe { crate::copy::copy_to_device(&vec![junk; BLOCK], m.buffer().as_ptr()) };
            m.unmap();
            assert!(dst.iter().all(|&x| x == junk));
        }
        let zeroed = grower.join().unwrap();
        assert!(zeroed == 0 || zeroed == BLOCK);
        assert_zeroed_lists_hold_zero_blocks(&p);
        let s = p.stats();
        // The setup's `try_alloc` (from the arena: a miss) and the two maps.
        assert_eq!(s.prezero_hits + s.prezero_misses, 3, "{s:?}");
        assert_eq!(s.prezeroed_bytes, zeroed as u64);
        assert_quiescent(&p);
    });
}
