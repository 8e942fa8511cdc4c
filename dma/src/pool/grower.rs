//! The grower: the one thread where the pool's blocking work happens.
//!
//! Making a chunk faults hugepages in (≈0.2–0.5 ms per 2 MiB page on the dev box once its host
//! backs the page, several times that the first time) and sharing it is an
//! ioctl; unsharing and unmapping likewise. None of that may run on an async worker or a
//! poller, so a dedicated thread does it, woken through [`Signal`]:
//!
//! 1. **Retire** transient chunks that went idle (unshare, free).
//! 2. **Expire** waiters' deadlines (wake them so they can time out).
//! 3. **Grow** by whole chunks when anyone waits (enough for the waiting bytes plus the
//!    reserve) or when free space is below `low_watermark` while something is allocated (a
//!    wholly idle pool rests at its prefill: enough to bring free space back to the
//!    watermark), up to `max_bytes` and the view's mapping slots; growth for a
//!    waiter that has waited `grow_after` counts as synchronous. Either way an attempt also
//!    grows by what demand, rising at the rate seen since the grower's last look, will take
//!    while it runs (the rise times the latest attempt's duration over the time since that
//!    look, at most the whole rise): a burst is met by several chunks at once, a slow rise
//!    by the deficit alone. The chunks of one attempt are made `PoolConfig::growth_threads`
//!    at a time, on scoped threads the grower starts for the attempt (faulting hugepages in
//!    is the kernel zeroing them: one core's worth of memory bandwidth per thread), each
//!    added to the arena and handed to waiters as soon as it is made; the grower waits for
//!    all of them before its next step, so the pool's blocking work stays on its thread and
//!    the threads it owns. After a failure (no
//!    hugepages, mapping refused, memlock) the attempt stops beginning chunks (those being
//!    made are finished and kept) and it backs off exponentially (1 ms, doubling, at most
//!    [`MAX_BACKOFF`] = 1 s; a success resets it), records the typed cause in
//!    [`GrowthRecord`] and wakes every waiter, which ends or keeps waiting by the
//!    growth-failure rule ([`super`]). Nothing cuts a backoff short: a waiter past its bound
//!    ends with the cause instead, so failure cannot spin and no waiter hangs.
//! 4. **Shrink**: chunks wholly idle for `shrink_delay`, while nobody waits and the pool has not
//!    grown for `shrink_delay`, are unshared and freed — newest first, never below the prefill,
//!    and, while anything is allocated, only while at least `high_watermark` stays free (a
//!    wholly idle pool goes back to its prefill). Since `high_watermark ≥ low_watermark`, a
//!    chunk given back cannot by itself push free space under the growth threshold, and a
//!    chunk grown from below it leaves less than `low_watermark` free without it, so it is not
//!    given back at once: a steady load does not oscillate. Nor does a bursty one: capacity is
//!    also kept at the recent peak of allocated bytes, which decays by half every
//!    `peak_half_life`, so a lull between bursts does not give back what the next burst needs.
//!
//! 5. **Pre-zero**: when the pool is idle enough (nobody waits, and the arena keeps the low
//!    watermark plus the reserve plus what the pass takes out), zero up to
//!    `prezero_bytes_per_pass` of released blocks in the per-CPU caches, oldest first, and
//!    put them on their cache's zeroed list with the pre-zeroed mark, so that `FromDevice`
//!    maps and `alloc` find a zero block and do one pass over the memory, not two. A pass is
//!    made every `prezero_interval` while it finds blocks to zero (else at the grower's next
//!    wake-up, at most a second later). The blocks are out of their cache only while being
//!    zeroed, owned by the grower: no buffer or device has their address, so the mark is
//!    true when set, and a released block (which its caller or device may have written) goes
//!    to the released list, never to the zeroed one.
//!
//! Waiters left waiting while space sits in other CPUs' caches: when the oldest waiter has
//! waited `grow_after`, the grower drains every cache back to the arena first.
//!
//! The thread holds only a weak reference to the pool: when the last handle and buffer are
//! gone the pool is dropped and the thread exits.

use std::time::{Duration, Instant};

use crate::sync::{AtomicBool, Condvar, Mutex, Ordering};
use crate::wait::WakeList;

use super::stats::Counters;
use super::Shared;

/// The first backoff after a failed growth: 1 ms, doubling with each failure in a row.
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(1);
/// The longest backoff: while growth keeps failing it is retried at least once a second (if
/// anyone waits or free space is below the low watermark).
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The grower's record of growth attempts, for the growth-failure rule ([`super`]).
#[derive(Debug, Default)]
pub(crate) struct GrowthRecord {
    /// Growth attempts begun; the latest one's id (ids start at 1). A waiter that queued when
    /// this was `n` is the reason for every attempt with an id above `n`: each attempt is
    /// sized by all the bytes waiting when it begins.
    pub attempts: u64,
    /// The id of the latest attempt that made a chunk.
    pub last_ok: u64,
    /// Set while growth is failing: the latest attempt to finish failed.
    pub failing: Option<GrowthFailure>,
}

/// The failure that left growth failing.
#[derive(Debug)]
pub(crate) struct GrowthFailure {
    /// The id of the attempt that failed.
    pub attempt: u64,
    /// Attempts that failed in a row.
    pub failures: u64,
    /// Why: shared by every waiter it ends.
    pub cause: std::sync::Arc<super::PoolError>,
}

impl GrowthRecord {
    /// Begins an attempt; returns its id.
    fn begin(&mut self) -> u64 {
        self.attempts += 1;
        self.attempts
    }

    /// Attempt `id` made a chunk: growth works (unless a later attempt has failed since).
    fn succeeded(&mut self, id: u64) {
        self.last_ok = self.last_ok.max(id);
        if self.failing.as_ref().is_some_and(|f| f.attempt <= id) {
            self.failing = None;
        }
    }

    /// Attempt `id` failed with `cause` (ignored if a later attempt has made a chunk since:
    /// growth works again).
    fn failed(&mut self, id: u64, cause: super::PoolError) {
        if id < self.last_ok {
            return;
        }
        let failures = self.failing.as_ref().map_or(0, |f| f.failures) + 1;
        self.failing = Some(GrowthFailure {
            attempt: id,
            failures,
            cause: std::sync::Arc::new(cause),
        });
    }
}

/// The shortest interval a rate of rising demand is measured over (see `maintain`): a look
/// right after another does not make a few allocations a steep rise.
const RISE_MIN_INTERVAL: Duration = Duration::from_millis(1);

/// The most bytes a pre-zeroing pass takes out of one cache at a time (one batch).
pub(crate) const PREZERO_BATCH: usize = 64 << 10;

/// What one [`super::Pool::maintain`] step did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MaintainReport {
    /// Chunks added.
    pub grew: usize,
    /// Whether growth was forced by a waiter's bounded wait.
    pub forced: bool,
    /// Chunks given back by the shrinker.
    pub shrank: usize,
    /// Transient chunks given back.
    pub retired: usize,
    /// Waiters woken because their deadline passed.
    pub expired: usize,
    /// Bytes of released blocks zeroed ahead of time (see `PoolConfig::prezero_bytes_per_pass`).
    pub prezeroed: usize,
    /// Growth attempts that failed.
    pub failed: usize,
    /// When the grower should look again even if nobody signals it.
    pub next_wake: Option<Duration>,
}

/// How the pool wakes its grower, and how the grower is stopped.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    /// Set by wakers, cleared by the grower. Lets `wake` skip the lock when already pending.
    pending: AtomicBool,
    /// Guards `shutdown` and the condvar's sleeps.
    state: Mutex<SignalState>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct SignalState {
    shutdown: bool,
    #[cfg(not(loom))]
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Signal {
    /// Asks the grower to run a step soon. Cheap when a request is already pending.
    pub fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            let _st = self.state.lock().unwrap();
            self.cond.notify_one();
        }
    }

    /// Sleeps until woken, shut down, or `timeout`. Returns false on shutdown. (Only the
    /// grower thread calls it; there is none under loom.)
    #[cfg(not(loom))]
    fn sleep(&self, timeout: Duration) -> bool {
        let mut st = self.state.lock().unwrap();
        if !st.shutdown && !self.pending.load(Ordering::Acquire) {
            st = self.cond.wait_timeout(st, timeout).unwrap().0;
        }
        self.pending.store(false, Ordering::Release);
        !st.shutdown
    }

    /// Stops the grower thread and waits for it, unless called from the grower itself (its
    /// own last reference dropped the pool: it exits on its next check).
    pub fn shutdown(&self) {
        #[cfg_attr(loom, allow(unused_mut))]
        let mut st = self.state.lock().unwrap();
        st.shutdown = true;
        self.cond.notify_all();
        #[cfg(not(loom))]
        {
            let handle = st.thread.take();
            drop(st);
            if let Some(h) = handle {
                if h.thread().id() != std::thread::current().id() {
                    let _ = h.join();
                }
            }
        }
    }

    #[cfg(not(loom))]
    fn is_shut_down(&self) -> bool {
        self.state.lock().unwrap().shutdown
    }
}

/// The grower thread's body before it runs: what a [`Spawner`] starts.
#[cfg(not(loom))]
pub(crate) struct GrowerLoop {
    /// The pool, held weakly: the thread must not keep it alive.
    pool: std::sync::Weak<Shared>,
    signal: std::sync::Arc<Signal>,
}

#[cfg(not(loom))]
impl GrowerLoop {
    /// Runs maintenance steps until the pool is gone or shut down.
    pub(crate) fn run(self) {
        loop {
            let next = {
                let Some(shared) = self.pool.upgrade() else {
                    return;
                };
                if self.signal.is_shut_down() {
                    return;
                }
                let r = shared.maintain(Instant::now());
                r.next_wake.unwrap_or(Duration::from_secs(1))
            };
            // Sleeps without holding the pool alive.
            if !self.signal.sleep(next) {
                return;
            }
        }
    }

    /// The pool this loop would maintain (tests check that a pool whose grower never
    /// started is freed).
    #[cfg(test)]
    pub(crate) fn pool(&self) -> std::sync::Weak<Shared> {
        self.pool.clone()
    }
}

/// Starts a thread from a builder and a loop: [`spawn_thread`] in production; tests pass one
/// that fails, to drive [`super::Pool::new`]'s error path.
#[cfg(not(loom))]
pub(crate) type Spawner<'a> = &'a mut dyn FnMut(
    std::thread::Builder,
    GrowerLoop,
) -> std::io::Result<std::thread::JoinHandle<()>>;

/// The real [`Spawner`].
#[cfg(not(loom))]
pub(crate) fn spawn_thread(
    builder: std::thread::Builder,
    body: GrowerLoop,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    builder.spawn(move || body.run())
}

/// Starts the grower thread for `shared` through `spawner`. Fails (the thread limit,
/// memory) with [`super::PoolError::GrowerSpawn`]; the caller then drops the pool.
#[cfg(not(loom))]
pub(crate) fn spawn(
    shared: &std::sync::Arc<Shared>,
    spawner: Spawner<'_>,
) -> Result<(), super::PoolError> {
    let body = GrowerLoop {
        pool: std::sync::Arc::downgrade(shared),
        signal: shared.grower.clone(),
    };
    let builder = std::thread::Builder::new().name("tidepool-grower".into());
    let handle = spawner(builder, body).map_err(super::PoolError::GrowerSpawn)?;
    shared.grower.state.lock().unwrap().thread = Some(handle);
    Ok(())
}

/// Loom models run the grower's steps by hand (`background: false`).
#[cfg(loom)]
pub(crate) fn spawn(_shared: &crate::sync::Arc<Shared>) -> Result<(), super::PoolError> {
    panic!("PoolConfig::background must be false under loom");
}

impl Shared {
    /// One step of the grower's work (see the module doc). Blocks while growing or shrinking;
    /// takes the pool lock only around bookkeeping, never across a system call.
    pub(crate) fn maintain(&self, now: Instant) -> MaintainReport {
        let mut report = MaintainReport::default();
        let cfg = &self.cfg;

        // Waiters stuck while space sits in per-core caches: bring it back first.
        let stuck = {
            let g = self.global.lock().unwrap();
            g.queue
                .oldest()
                .is_some_and(|(_, _, t)| now.duration_since(t) >= cfg.grow_after)
        };
        if stuck {
            self.drain_caches();
        }

        let mut wakes = WakeList::new();
        let (retired, grow_chunks, chunk, forced, attempt) = {
            let mut g = self.global.lock().unwrap();
            let slots: Vec<u32> = std::mem::take(&mut g.retired);
            let retired: Vec<_> = slots
                .into_iter()
                .filter_map(|s| g.arena.remove_idle(s))
                .collect();

            let later = g.deadlines.split_off(&(now, u64::MAX));
            let expired = std::mem::replace(&mut g.deadlines, later);
            report.expired = expired.len();
            for (_, w) in expired {
                wakes.push(w);
            }

            let free = g.arena.free_bytes;
            let room =
                (cfg.max_bytes as u64).saturating_sub(g.arena.capacity_bytes + g.growing_bytes);
            let chunk = self.growth_chunk_bytes(room);
            // Demand rising fast keeps rising while the pool grows: an attempt also grows by
            // what the rise since the last look, at its rate, takes in the time the latest
            // attempt took (at most the whole rise: the last look was at least that long ago,
            // or it was the start), so a fast rise is met by several chunks at once.
            let rise = g.arena.allocated_bytes.saturating_sub(g.allocated_seen);
            let since = now
                .saturating_duration_since(g.seen_at)
                .max(RISE_MIN_INTERVAL);
            let ahead = (rise as f64
                * (g.last_growth_took.as_secs_f64() / since.as_secs_f64()).min(1.0))
                as u64;
            g.allocated_seen = g.arena.allocated_bytes;
            g.seen_at = now;
            let in_backoff = g.backoff_until.is_some_and(|t| t > now);
            let oldest = g.queue.oldest();
            // A waiter past grow_after makes this a synchronous growth, but never cuts a
            // backoff short: while it runs, waiters past their bound end with the last
            // failure's cause instead (the growth-failure rule), so failure cannot spin.
            let forced = !in_backoff
                && oldest.is_some_and(|(_, _, t)| now.duration_since(t) >= cfg.grow_after);
            let want = if g.queue.has_waiters() {
                let short =
                    (g.queue.waiting_bytes() + cfg.reserve_bytes as u64).saturating_sub(free);
                if in_backoff && !forced {
                    0
                } else {
                    (short + ahead).max(chunk)
                }
            } else if free < cfg.low_watermark as u64 && !in_backoff && g.arena.allocated_bytes > 0
            {
                // The watermark anticipates demand while there is some: a wholly idle pool
                // rests at its prefill (and shrinks back to it) instead of growing for nobody.
                (cfg.low_watermark as u64 - free + ahead).max(chunk)
            } else {
                0
            };
            let n = want
                .div_ceil(chunk)
                .min(room / chunk)
                // With no slot left one chunk is still tried: its failure (the view's
                // `MappingLimit`) is what the waiters are told.
                .min(self.free_mapping_slots().max(1));
            g.growing_bytes += n * chunk;
            let attempt = if n > 0 { g.growth.begin() } else { 0 };
            self.publish_capacity(&g);
            (retired, n, chunk, forced && n > 0, attempt)
        };
        wakes.wake_all();
        report.retired = retired.len();
        self.unshare_all(retired);

        report.forced = forced;
        let _growth_span = (grow_chunks > 0).then(|| {
            tracing::info_span!("pool_growth", chunks = grow_chunks, chunk_bytes = chunk).entered()
        });
        if grow_chunks > 0 {
            self.grow(grow_chunks, chunk, attempt, forced, &mut report);
        }
        drop(_growth_span);
        report.shrank = self.shrink(now);
        report.prezeroed = self.prezero(cfg.prezero_bytes_per_pass);

        // When to look again without being asked.
        let g = self.global.lock().unwrap();
        let mut next: Option<Instant> = g.deadlines.keys().next().map(|(t, _)| *t);
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some((_, _, t)) = g.queue.oldest() {
            consider((t + cfg.grow_after).max(now + Duration::from_micros(100)));
        }
        // Only a backoff still to run: one that has run out stays recorded until growth
        // works, and looking again at once for it would busy-loop the grower.
        if let Some(t) = g.backoff_until.filter(|&t| t > now) {
            consider(t);
        }
        if report.prezeroed > 0 {
            // Blocks were released since the last pass: look again soon for more.
            consider(now + cfg.prezero_interval);
        }
        if g.arena.capacity_bytes > cfg.prefill_bytes as u64 || !g.retired.is_empty() {
            let tick =
                (cfg.shrink_delay / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
            consider(now + tick);
        }
        report.next_wake = next.map(|t| t.saturating_duration_since(Instant::now()));
        report
    }

    /// Growth attempt `attempt`: makes `n` chunks of `chunk` bytes (counted in
    /// `growing_bytes` by the caller) on up to `PoolConfig::growth_workers` threads at once,
    /// each chunk added to the arena and handed to waiters as soon as it is made. The first
    /// failure stops the attempt: chunks already being made are finished and kept, the rest
    /// are not begun, and once every thread is done the attempt is recorded as failed once
    /// (backoff, the growth-failure rule, one tracing event), whatever else it made.
    fn grow(&self, n: u64, chunk: u64, attempt: u64, forced: bool, report: &mut MaintainReport) {
        use std::sync::atomic::{AtomicBool as Stop, AtomicU64 as Next, Ordering as O};
        let started = Instant::now();
        let next = Next::new(0);
        let stop = Stop::new(false);
        // One thread's share: chunks until none is left or one has failed. Returns what it
        // made and its failure.
        let work = || -> (u64, Option<super::PoolError>) {
            let mut made = 0;
            while !stop.load(O::Acquire) && next.fetch_add(1, O::AcqRel) < n {
                match self.make_chunk(chunk as usize) {
                    Ok(parts) => {
                        self.add_grown(parts, chunk, attempt, forced, started);
                        made += 1;
                    }
                    Err(e) => {
                        stop.store(true, O::Release);
                        return (made, Some(e));
                    }
                }
            }
            (made, None)
        };
        let workers = if cfg!(loom) {
            1
        } else {
            self.cfg.growth_workers(n)
        };
        let results: Vec<(u64, Option<super::PoolError>)> = if workers == 1 {
            vec![work()]
        } else {
            // The helpers log to the grower's subscriber, inside its `pool_growth` span.
            let dispatch = tracing::dispatcher::get_default(|d| d.clone());
            let span = tracing::Span::current();
            let helper = || tracing::dispatcher::with_default(&dispatch, || span.in_scope(work));
            std::thread::scope(|s| {
                // A thread that cannot be started leaves its share to the others: the grower
                // itself always works.
                let helpers: Vec<_> = (1..workers)
                    .filter_map(|i| {
                        std::thread::Builder::new()
                            .name(format!("tidepool-grow{i}"))
                            .spawn_scoped(s, helper)
                            .ok()
                    })
                    .collect();
                let mut results = vec![work()];
                for h in helpers {
                    match h.join() {
                        Ok(r) => results.push(r),
                        Err(p) => std::panic::resume_unwind(p),
                    }
                }
                results
            })
        };
        let made: u64 = results.iter().map(|r| r.0).sum();
        report.grew += made as usize;
        self.global.lock().unwrap().last_growth_took = started.elapsed();
        let Some(e) = results.into_iter().find_map(|r| r.1) else {
            return;
        };
        let mut wakes = WakeList::new();
        let mut g = self.global.lock().unwrap();
        // Every chunk of the attempt not added is not coming.
        g.growing_bytes -= (n - made) * chunk;
        g.backoff_until = Some(Instant::now() + g.backoff);
        g.backoff = (g.backoff * 2).min(MAX_BACKOFF);
        let text = e.to_string();
        tracing::warn!(
            error = %text,
            chunk_bytes = chunk,
            chunks_made = made,
            chunks_asked = n,
            capacity_bytes = g.arena.capacity_bytes,
            next_try_ms = g.backoff.as_millis() as u64,
            "pool growth failed"
        );
        g.growth.failed(attempt, e);
        // Every waiter checks whether this failure ends it (the growth-failure rule); the
        // space the failed attempt counted on is not coming.
        for w in g.queue.wakers() {
            wakes.push(w.clone());
        }
        self.publish_capacity(&g);
        drop(g);
        // Counted before anyone is told, so the stats a woken waiter reads agree.
        report.failed += 1;
        Counters::bump(&self.counters.growth_failures);
        *self.counters.last_growth_error.lock().unwrap() = Some(text);
        wakes.wake_all();
    }

    /// Adds a chunk made by growth attempt `attempt` to the arena and hands it to waiters.
    fn add_grown(
        &self,
        (c, dev, buddy): (crate::memory::Chunk, crate::DeviceAddr, super::buddy::Buddy),
        chunk: u64,
        attempt: u64,
        forced: bool,
        started: Instant,
    ) {
        let mut wakes = WakeList::new();
        let mut g = self.global.lock().unwrap();
        g.growing_bytes -= chunk;
        g.arena.insert(c, dev, buddy, false);
        // dispatch publishes only when someone waits: publish the new chunk here.
        self.publish_capacity(&g);
        g.last_grow = Some(Instant::now());
        g.backoff = MIN_BACKOFF;
        g.backoff_until = None;
        g.growth.succeeded(attempt);
        Counters::bump(&self.counters.grows);
        if forced {
            Counters::bump(&self.counters.sync_grows);
        }
        tracing::info!(
            chunk_bytes = chunk,
            capacity_bytes = g.arena.capacity_bytes,
            forced_by_waiter = forced,
            took_us = started.elapsed().as_micros() as u64,
            "pool grew by a chunk"
        );
        self.dispatch(&mut g, Instant::now(), &mut wakes);
        drop(g);
        wakes.wake_all();
    }

    /// Mapping slots the view has left (`u64::MAX` without a limit): an attempt never asks
    /// for more chunks than that (VFIO type1's 65,535 mappings, vhost-user's regions).
    fn free_mapping_slots(&self) -> u64 {
        let usage = self.view.usage();
        usage
            .mapping_limit
            .map_or(u64::MAX, |limit| limit.saturating_sub(usage.mappings))
    }

    /// The size of the next growth chunk: `chunk_bytes`, or more when the view has few mapping
    /// slots left (vhost-user backends take 32 regions), so that the cap stays reachable with
    /// the slots that remain: `room / free slots`, rounded up to whole pages and buffers.
    /// When no slot is left, growth fails with the view's clear `MappingLimit` error.
    fn growth_chunk_bytes(&self, room: u64) -> u64 {
        let base = self.cfg.chunk_bytes as u64;
        let usage = self.view.usage();
        let Some(limit) = usage.mapping_limit else {
            return base;
        };
        let free_slots = limit.saturating_sub(usage.mappings);
        if free_slots == 0 {
            return base;
        }
        // Both are powers of two: the larger is a multiple of the smaller.
        let unit = (self.cfg.memory.page_size.bytes().max(self.cfg.max_buffer)) as u64;
        let spread = room.div_ceil(free_slots).div_ceil(unit) * unit;
        // Never more than fits (rounding up must not make a last chunk that cannot be made:
        // growth would stop short of the cap with room left).
        base.max(spread.min(room / unit * unit))
    }

    /// Folds the allocation high-water mark since the last look into the decaying recent
    /// peak. Call with the pool lock held.
    fn decay_peak(&self, g: &mut super::Global, now: Instant) {
        let half = self.cfg.peak_half_life;
        let decayed = if half.is_zero() {
            0.0
        } else {
            let halves =
                now.saturating_duration_since(g.peak_updated).as_secs_f64() / half.as_secs_f64();
            g.recent_peak * 0.5f64.powf(halves)
        };
        g.recent_peak = decayed.max(g.arena.allocated_high as f64);
        g.arena.allocated_high = g.arena.allocated_bytes;
        g.peak_updated = now;
    }

    /// Gives back chunks idle for `shrink_delay` while enough stays free and the capacity
    /// stays at the decaying recent peak. Returns how many.
    fn shrink(&self, now: Instant) -> usize {
        let cfg = &self.cfg;
        let eligible = {
            let mut g = self.global.lock().unwrap();
            self.decay_peak(&mut g, now);
            g.arena.capacity_bytes > cfg.prefill_bytes as u64
                && !g.queue.has_waiters()
                && g.last_grow
                    .is_none_or(|t| now.duration_since(t) >= cfg.shrink_delay)
        };
        if !eligible {
            return 0;
        }
        // Cached blocks keep a chunk from looking idle.
        self.drain_caches();
        let gone = {
            let mut g = self.global.lock().unwrap();
            let Some(before) = now.checked_sub(cfg.shrink_delay) else {
                return 0;
            };
            let mut gone = Vec::new();
            // Nothing allocated (the caches were just drained): the free-space floor is for
            // a pool in use; an idle one goes back to its prefill.
            let idle = g.arena.allocated_bytes == 0;
            for slot in g.arena.idle_candidates(before) {
                let len = g.arena.chunk_len(slot).unwrap_or(0);
                if g.arena.capacity_bytes < cfg.prefill_bytes as u64 + len
                    || (!idle && g.arena.free_bytes < cfg.high_watermark as u64 + len)
                    || ((g.arena.capacity_bytes - len) as f64) < g.recent_peak
                {
                    break;
                }
                gone.extend(g.arena.remove_idle(slot));
            }
            self.publish_capacity(&g);
            gone
        };
        let n = gone.len();
        for _ in 0..n {
            Counters::bump(&self.counters.shrinks);
        }
        if n > 0 {
            tracing::info!(
                chunks = n,
                capacity_bytes = self.counters.capacity_bytes.load(Ordering::Relaxed),
                "pool shrank"
            );
        }
        self.unshare_all(gone);
        n
    }

    /// One pre-zeroing pass (step 5 of the module doc): takes up to `budget` bytes of released
    /// blocks out of the per-CPU caches, oldest first, zeroes them outside every lock, marks
    /// them and puts them on their cache's zeroed list (or, if the cache filled up, closed or
    /// someone started waiting meanwhile, back in the arena). Returns the bytes zeroed.
    pub(crate) fn prezero(&self, budget: usize) -> usize {
        let mut done = 0;
        'caches: for cache in self.caches.each() {
            // In batches of at most `PREZERO_BATCH` bytes: a block is out of its cache only
            // for the few microseconds its batch takes to zero.
            loop {
                if done >= budget {
                    break 'caches;
                }
                match self.prezero_batch(cache, budget - done) {
                    Some(0) | None => continue 'caches,
                    Some(bytes) => done += bytes,
                }
            }
        }
        self.counters
            .prezeroed_bytes
            .fetch_add(done as u64, Ordering::Relaxed);
        done
    }

    /// One batch of [`Shared::prezero`] on one cache: at most `budget` (and
    /// [`PREZERO_BATCH`]) bytes. Returns the bytes zeroed, or None if the pool is not idle
    /// enough or the cache is closed.
    fn prezero_batch(
        &self,
        cache: &crate::sync::SpinLock<super::cache::CoreCache>,
        budget: usize,
    ) -> Option<usize> {
        let mut done = 0;
        {
            // Idle enough: nobody waits, and the arena keeps enough free that no request needs
            // the blocks this batch holds for a moment.
            let room = {
                let g = self.global.lock().unwrap();
                if g.queue.has_waiters() {
                    return None;
                }
                let keep = (self.cfg.low_watermark + self.cfg.reserve_bytes) as u64;
                g.arena.free_bytes.saturating_sub(keep)
            };
            let cap = budget.min(usize::try_from(room).unwrap_or(usize::MAX));
            let mut taken = Vec::new();
            {
                let mut c = cache.lock();
                if c.closed {
                    return None;
                }
                // Up to `PREZERO_BATCH` bytes (or one block, if larger) within `cap`.
                let mut took = 0;
                for class in 0..c.classes.len() {
                    let size = 1usize << self.caches.order(class);
                    let list = &mut c.classes[class];
                    let mut n = 0;
                    while n < list.len() && took < PREZERO_BATCH && took + size <= cap {
                        n += 1;
                        took += size;
                    }
                    if n > 0 {
                        // The oldest: the hot path pops the newest, which may still be warm.
                        taken.extend(list.drain(..n));
                    }
                }
            }
            if taken.is_empty() {
                return Some(0);
            }
            for b in &mut taken {
                // SAFETY: the block was taken out of its cache's free list under the cache's
                // lock, so this thread owns it alone: no buffer holds it and no device has its
                // address (a buffer's block reaches the list only when the buffer is dropped,
                // after its device is done with it). It is zeroed here, then marked.
                unsafe {
                    crate::copy::zero_device(b.ptr.as_ptr(), b.size());
                    b.mark_zeroed();
                }
                done += b.size();
            }
            let mut back = Vec::new();
            {
                let mut c = cache.lock();
                // Blocks come back to the cache (publishing the zeroes with the lock's release)
                // unless it is closed or someone waits: waiters must see the space.
                let open = !c.closed && self.waiting.load(Ordering::Relaxed) == 0;
                for b in taken {
                    let class = self.caches.class(b.order());
                    if open
                        && c.classes[class].len() + c.zeroed[class].len()
                            < self.caches.limit(b.order())
                    {
                        c.zeroed[class].push(b);
                    } else {
                        back.push(b);
                    }
                }
            }
            if !back.is_empty() {
                self.give_back(back);
            }
        }
        Some(done)
    }

    /// Unshares and frees chunks that left the arena. A chunk the view refuses to unshare is
    /// leaked, never freed while a device might still reach it.
    fn unshare_all(&self, slots: Vec<super::arena::ChunkSlot>) {
        for s in slots {
            if let Err(e) = self.view.unshare(&s.chunk.region(), s.dev) {
                *self.counters.last_growth_error.lock().unwrap() =
                    Some(format!("unsharing a chunk failed, leaked it: {e}"));
                std::mem::forget(s.chunk);
            }
        }
    }
}
