//! The FIFO, size-aware, cancel-safe queue of tasks waiting for pool space.
//!
//! When a map finds the pool empty it does not fail: it takes a [`Ticket`] in a [`WaitQueue`]
//! and awaits. Whoever frees space (a dropped mapping, the grower publishing a new chunk) calls
//! [`WaitQueue::dispatch`], which hands space to waiting entries as *grants* (the pool's block
//! handle, generic here as `G`) and collects their wakers in a [`WakeList`].
//!
//! ## Locking protocol
//! `WaitQueue` is a plain data structure. It lives inside the pool's global lock
//! (`Shared::global: Mutex<Global>` in [`crate::pool`]) next to the arena, and **every method
//! must be called with that lock held** (this is what makes
//! `&mut self` enough: the queue has no atomics, no interior mutability and never locks anything
//! itself). It never wakes a task: [`WaitQueue::dispatch`] *returns* the wakers in a
//! [`WakeList`], which the caller wakes with [`WakeList::wake_all`] **after** releasing the lock,
//! as tokio's `batch_semaphore` does. Waking under the lock would make the woken task contend
//! for the lock we still hold, and a waker that polls inline would deadlock.
//!
//! ```text
//! let mut wakes = WakeList::new();
//! {
//!     let mut global = pool.global.lock();
//!     global.arena.release(block);                             // space comes back
//!     let Global { arena, queue, .. } = &mut *global;
//!     queue.dispatch(Instant::now(), &mut wakes, |size| arena.take(size));
//! }                                                            // unlock
//! wakes.wake_all();                                            // then wake
//! ```
//!
//! ## Fairness rule
//! Entries are ordered by arrival (the ticket's sequence number). [`WaitQueue::dispatch`] walks
//! them oldest first and offers each its size through the caller's `grant` function:
//! 1. An entry that fits is granted, in FIFO order.
//! 2. An entry that does not fit is *passed over*, and the walk goes on: a later, smaller entry
//!    that fits may be granted ahead of it (**size-aware**: small requests are not stuck behind a
//!    large one, there is no head-of-line blocking). Each time an entry is granted while older
//!    entries were passed over, every one of those older entries is *bypassed* once more.
//! 3. An entry that has been bypassed [`FairnessConfig::max_bypass`] times, or has waited at
//!    least [`FairnessConfig::aging`], is *starving*. When a starving entry does not fit, the walk
//!    stops there: nothing behind it is granted until it is, so all released space accumulates
//!    for it (older entries that fit are still granted: they are ahead of it).
//!
//! **Why this is fair.** Every entry's bypass count only grows while it waits, and reaching the
//! limit turns it into a barrier that no younger entry passes, so:
//! - *No starvation of large requests:* an entry is bypassed at most `max_bypass` times, and
//!   after at most `aging` it is a barrier no matter how many bypasses it has seen. From then on
//!   it competes only with entries older than itself, which are finitely many and are
//!   themselves served or barriers in FIFO order; every byte released goes to the oldest
//!   starving entry or to entries ahead of it.
//! - *Bounded delay for small requests:* before a large entry starves, it delays nothing behind
//!   it (those are served as soon as they fit). Once it starves, a small entry behind it waits
//!   at most until the large one is served. That takes the time to free its size: the
//!   accumulated releases, or the grower, which sizes growth by [`WaitQueue::waiting_bytes`] and
//!   applies the bounded-wait rule to [`WaitQueue::oldest`].
//! - *Strict FIFO among equal sizes:* if every entry wants the same size, an entry that does not
//!   fit means no later one fits either, so grants come out in exact arrival order.
//! - `max_bypass = 0` gives strict FIFO for all sizes (no entry is ever passed); a large
//!   `max_bypass` and `aging` give greedy first-fit.
//!
//! The queue orders only its own entries. The pool must send *new* requests through it while
//! [`WaitQueue::has_waiters`] (enqueue, dispatch, then poll the new ticket, which may be ready at
//! once), or a stream of fresh allocations would take released space ahead of every waiter
//! without being counted as bypasses. A request that could never be satisfied (larger than the
//! pool's cap or largest block) must be refused before it is enqueued: once starving it would
//! block everything behind it forever.
//!
//! ## Cost
//! A wait allocates nothing once the queue has grown to its working size: entries sit in a
//! deque in arrival order (found by binary search on their sequence number), the per-size
//! counts in a short sorted vector, unclaimed grants in a map keyed by the sequence number
//! with a one-multiplication hash, and a [`WakeList`] holds its first waker inline. The
//! entries are not intrusive nodes inside the waiting futures (tokio's `batch_semaphore`
//! shape): that would make the pool's futures `!Unpin`, a change to their public API.
//!
//! ## Cancel safety
//! A waiting future may be dropped at any point. Its `Drop` calls [`WaitQueue::cancel`] under the
//! lock:
//! - still waiting: the entry is removed, nothing was taken from the pool;
//! - granted but not yet polled: the queue still owns the grant (grants move to the future
//!   only inside [`WaitQueue::poll`], under the lock), so `cancel` returns it and the caller
//!   gives it back to the allocator and dispatches again. Nothing is lost and nothing is
//!   leaked, whatever the interleaving of grant, wake, poll and drop.
//!
//! ## Example
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::{Arc, Mutex};
//! use std::task::{Poll, Wake, Waker};
//! use std::time::Instant;
//! use tidepool::wait::{FairnessConfig, WaitQueue, WakeList};
//!
//! struct CountWakes(AtomicUsize);
//! impl Wake for CountWakes {
//!     fn wake(self: Arc<Self>) {
//!         self.0.fetch_add(1, Ordering::Relaxed);
//!     }
//! }
//!
//! struct Inner {
//!     free: u64,
//!     queue: WaitQueue<u64>,
//! }
//! let pool = Mutex::new(Inner { free: 0, queue: WaitQueue::new(FairnessConfig::default()) });
//! let wakes_seen = Arc::new(CountWakes(AtomicUsize::new(0)));
//! let waker = Waker::from(wakes_seen.clone());
//!
//! // A task needs 4096 bytes; the pool is empty, so it takes a ticket.
//! let ticket = pool.lock().unwrap().queue.enqueue(4096, Instant::now(), &waker);
//! assert!(pool.lock().unwrap().queue.poll(ticket, &waker).is_pending());
//!
//! // 8 KiB is released: hand it to waiters under the lock, wake them after unlocking.
//! let mut wakes = WakeList::new();
//! {
//!     let mut guard = pool.lock().unwrap();
//!     let Inner { free, queue } = &mut *guard;
//!     *free += 8192;
//!     let granted = queue.dispatch(Instant::now(), &mut wakes, |size| {
//!         (size <= *free).then(|| {
//!             *free -= size;
//!             size
//!         })
//!     });
//!     assert_eq!(granted, 1);
//! }
//! wakes.wake_all();
//! assert_eq!(wakes_seen.0.load(Ordering::Relaxed), 1);
//!
//! // The woken task polls again and takes its grant.
//! let mut guard = pool.lock().unwrap();
//! assert_eq!(guard.queue.poll(ticket, &waker), Poll::Ready(Ok(4096)));
//! assert_eq!(guard.free, 4096);
//! assert!(guard.queue.is_empty());
//! ```

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// How long a waiting entry may be passed over before space is reserved for it.
/// See the [module documentation](self) for the rule and the bounds it gives.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FairnessConfig {
    /// How many younger entries may be granted ahead of an entry that does not fit before
    /// nothing behind it is granted any more. `0` means strict FIFO.
    pub max_bypass: u32,
    /// How long an entry may wait before nothing behind it is granted any more, however few
    /// bypasses it has seen.
    pub aging: Duration,
}

impl Default for FairnessConfig {
    /// `max_bypass: 16`, `aging: 5 ms`: small I/O keeps flowing around a large request for a few
    /// device round trips (NVMe: ~10-100 µs each), while a large request waits no longer than
    /// about one chunk growth (hugepage fault + IOMMU map, around a millisecond) before all freed
    /// space is kept for it.
    fn default() -> Self {
        Self {
            max_bypass: 16,
            aging: Duration::from_millis(5),
        }
    }
}

/// A place in one [`WaitQueue`], returned by [`WaitQueue::enqueue`].
///
/// Tickets are unique per queue and carry the issuing queue's id, so a ticket passed to the wrong
/// queue is recognised ([`WaitError::ForeignTicket`]) instead of naming someone else's entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ticket {
    /// Id of the queue that issued it.
    queue: u64,
    /// Arrival order within that queue (never reused).
    seq: u64,
}

/// Why [`WaitQueue::poll`] could not answer for a ticket. Both are bugs in the caller; the queue
/// is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    /// The ticket was issued by another queue.
    #[error("ticket {0:?} was issued by another wait queue: poll it on the queue that issued it")]
    ForeignTicket(Ticket),
    /// The ticket is no longer in this queue.
    #[error(
        "ticket {0:?} is no longer in this wait queue: its grant was already taken or it was \
         cancelled; do not poll a finished wait again"
    )]
    UnknownTicket(Ticket),
}

/// Wakers of the entries granted by [`WaitQueue::dispatch`], to be woken after the lock is
/// released.
///
/// If it is dropped without [`WakeList::wake_all`], its drop wakes them anyway (a late wake is
/// better than a lost one), but then possibly under the lock: call `wake_all` after unlocking.
///
/// The first waker is held inline: the common hand-off (one release, one waiter) wakes without
/// a heap allocation.
#[derive(Debug, Default)]
pub struct WakeList {
    first: Option<Waker>,
    rest: Vec<Waker>,
}

impl WakeList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a waker to wake later. Call it under the lock, like `dispatch`.
    pub fn push(&mut self, waker: Waker) {
        if self.first.is_none() {
            self.first = Some(waker);
        } else {
            self.rest.push(waker);
        }
    }

    /// Number of wakers held.
    pub fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    /// `true` if no waker is held.
    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// Wakes every waker once, in the order the entries were granted. Call it **without** the
    /// pool's lock held.
    pub fn wake_all(mut self) {
        self.wake_held();
    }

    fn wake_held(&mut self) {
        if let Some(w) = self.first.take() {
            w.wake();
        }
        for waker in self.rest.drain(..) {
            waker.wake();
        }
    }
}

impl Drop for WakeList {
    /// Wakes whatever `wake_all` did not, so that no granted waiter is left asleep.
    fn drop(&mut self) {
        self.wake_held();
    }
}

/// The current time, read from the clock at most once, and only if someone asks for it.
///
/// The release path hands one to [`WaitQueue::dispatch_lazy`] and to the arena: most releases
/// (nobody waiting, no chunk going idle, the head waiter fits) then read no clock at all.
#[derive(Debug, Default, Clone, Copy)]
pub struct LazyNow(Option<Instant>);

impl LazyNow {
    /// No time read yet: the first [`LazyNow::get`] reads the clock.
    pub fn new() -> Self {
        Self(None)
    }

    /// A time already known.
    pub fn at(now: Instant) -> Self {
        Self(Some(now))
    }

    /// The time: the one given or read before, else `Instant::now()` (kept for later calls).
    #[inline]
    pub fn get(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }
}

/// Hashes a ticket's sequence number as itself: the keys of [`WaitQueue::granted`] are
/// distinct counters chosen by the queue, not by an adversary, so SipHash's cost buys nothing.
#[derive(Debug, Default, Clone, Copy)]
struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        // Spread the low bits (hashbrown uses the top 7 bits as a tag, the low ones as the
        // bucket): one multiplication by an odd constant (Fibonacci hashing).
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// One entry still waiting for a grant.
///
/// # Safety
/// Like every field of [`WaitQueue`], only read or written with the caller's pool lock held
/// (enforced by `&mut WaitQueue`).
#[derive(Debug)]
struct Waiter {
    /// Bytes wanted, as passed to the grant function.
    size: u64,
    /// When it arrived, for the aging rule and [`WaitQueue::oldest`].
    enqueued: Instant,
    /// The waker of the last poll; moved into the [`WakeList`] when granted.
    waker: Waker,
    /// How many younger entries were granted while this one was passed over.
    bypassed: u32,
}

/// Where the next queue id comes from. A process-wide counter, not shared state: it is touched
/// once per [`WaitQueue::new`], only to give each queue a distinct id for its tickets, and no
/// other memory is published through it, so `Relaxed` is enough (and loom need not model it).
static NEXT_QUEUE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The FIFO, size-aware, cancel-safe queue of waiters. See the [module documentation](self).
///
/// `G` is the grant handed to a waiter (the pool's block handle).
#[derive(Debug)]
pub struct WaitQueue<G> {
    /// This queue's id, stamped into its tickets.
    ///
    /// # Safety
    /// Immutable after `new`.
    id: u64,
    /// The fairness limits.
    ///
    /// # Safety
    /// Immutable after `new`.
    cfg: FairnessConfig,
    /// Sequence number of the next ticket.
    ///
    /// # Safety
    /// Guarded by the caller's pool lock (`&mut self`).
    next_seq: u64,
    /// Entries waiting for a grant with their sequence numbers, oldest (lowest) first: sorted,
    /// since tickets are issued in order and appended. A deque keeps its capacity, so a
    /// steady stream of waits allocates nothing.
    ///
    /// # Safety
    /// Guarded by the caller's pool lock (`&mut self`). Wakers stored here are only cloned or
    /// moved out under the lock, never woken here.
    waiting: VecDeque<(u64, Waiter)>,
    /// Grants handed to entries that have not polled yet: owned by the queue until
    /// [`WaitQueue::poll`] moves them out or [`WaitQueue::cancel`] returns them.
    ///
    /// # Safety
    /// Guarded by the caller's pool lock (`&mut self`).
    granted: HashMap<u64, G, BuildHasherDefault<SeqHasher>>,
    /// How many entries of each size are waiting, by increasing size (few distinct sizes: a
    /// short vector): the smallest lets `dispatch` stop as soon as nothing behind can fit,
    /// instead of walking a long queue on every release.
    ///
    /// # Safety
    /// Guarded by the caller's pool lock (`&mut self`).
    sizes: Vec<(u64, usize)>,
    /// Sum of the sizes in `waiting` (u128: a sum of u64 sizes cannot overflow it).
    ///
    /// # Safety
    /// Guarded by the caller's pool lock (`&mut self`).
    waiting_bytes: u128,
}

impl<G> WaitQueue<G> {
    /// Creates an empty queue with the given fairness limits. Lock: none needed (not shared yet).
    pub fn new(cfg: FairnessConfig) -> Self {
        let id = NEXT_QUEUE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            id,
            cfg,
            next_seq: 0,
            waiting: VecDeque::new(),
            granted: HashMap::default(),
            sizes: Vec::new(),
            waiting_bytes: 0,
        }
    }

    /// Counts a waiting entry of `size` in `sizes` and `waiting_bytes`. Lock: the pool lock.
    fn count_in(&mut self, size: u64) {
        match self.sizes.binary_search_by_key(&size, |&(s, _)| s) {
            Ok(i) => self.sizes[i].1 += 1,
            Err(i) => self.sizes.insert(i, (size, 1)),
        }
        self.waiting_bytes += u128::from(size);
    }

    /// Uncounts a waiting entry of `size` that left `waiting`. Lock: the pool lock.
    fn count_out(&mut self, size: u64) {
        if let Ok(i) = self.sizes.binary_search_by_key(&size, |&(s, _)| s) {
            self.sizes[i].1 -= 1;
            if self.sizes[i].1 == 0 {
                self.sizes.remove(i);
            }
        }
        self.waiting_bytes -= u128::from(size);
    }

    /// The fairness limits this queue applies.
    pub fn config(&self) -> FairnessConfig {
        self.cfg
    }

    /// Adds a waiter for `size` bytes at the back of the queue and returns its ticket.
    /// Lock: the pool lock must be held.
    ///
    /// `now` is its arrival time for the aging rule; `waker` is woken (via a [`WakeList`]) when
    /// it is granted. It is not granted here: call [`WaitQueue::dispatch`] next if space may be
    /// free, then [`WaitQueue::poll`]. Refuse a `size` that can never be satisfied before
    /// calling this (see the module documentation).
    pub fn enqueue(&mut self, size: u64, now: Instant, waker: &Waker) -> Ticket {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.waiting.push_back((
            seq,
            Waiter {
                size,
                enqueued: now,
                waker: waker.clone(),
                bypassed: 0,
            },
        ));
        self.count_in(size);
        Ticket {
            queue: self.id,
            seq,
        }
    }

    /// Polls the wait of `ticket`. Lock: the pool lock must be held.
    ///
    /// - `Ready(Ok(grant))`: the entry was granted; the grant moves to the caller and the entry
    ///   is gone (the ticket is finished).
    /// - `Pending`: still waiting; `waker` replaces the stored one unless it would wake the same
    ///   task (`Waker::will_wake`), so a task that moved to another executor thread is still
    ///   woken.
    /// - `Ready(Err(_))`: the ticket was issued by another queue, or is finished (taken or
    ///   cancelled). Nothing changes.
    pub fn poll(&mut self, ticket: Ticket, waker: &Waker) -> Poll<Result<G, WaitError>> {
        if ticket.queue != self.id {
            return Poll::Ready(Err(WaitError::ForeignTicket(ticket)));
        }
        if let Some(grant) = self.granted.remove(&ticket.seq) {
            return Poll::Ready(Ok(grant));
        }
        match self.find(ticket.seq).map(|i| &mut self.waiting[i].1) {
            Some(waiter) => {
                if !waiter.waker.will_wake(waker) {
                    waiter.waker = waker.clone();
                }
                Poll::Pending
            }
            None => Poll::Ready(Err(WaitError::UnknownTicket(ticket))),
        }
    }

    /// Removes the entry of `ticket`, as the `Drop` of a waiting future does.
    /// Lock: the pool lock must be held.
    ///
    /// Returns the grant if the entry had been granted but had not polled yet: the caller must
    /// give it back to the allocator. Returns `None` if it was still waiting (nothing was taken),
    /// if it is already finished, or if the ticket is from another queue (then nothing changes).
    ///
    /// Removing an entry can unblock others (it may have been a starving barrier, or a grant came
    /// back): if [`WaitQueue::has_waiters`], call [`WaitQueue::dispatch`] afterwards.
    pub fn cancel(&mut self, ticket: Ticket) -> Option<G> {
        if ticket.queue != self.id {
            return None;
        }
        if let Some((_, waiter)) = self.find(ticket.seq).and_then(|i| self.waiting.remove(i)) {
            self.count_out(waiter.size);
            return None;
        }
        self.granted.remove(&ticket.seq)
    }

    /// The index in `waiting` of the entry with sequence number `seq`, if it is waiting.
    fn find(&self, seq: u64) -> Option<usize> {
        // The newest entries are polled most (a fresh waiter polls right after enqueueing).
        if self.waiting.back().is_some_and(|&(s, _)| s == seq) {
            return Some(self.waiting.len() - 1);
        }
        self.waiting.binary_search_by_key(&seq, |&(s, _)| s).ok()
    }

    /// The wakers of every waiting entry (a failed growth wakes them all: see the pool's
    /// growth-failure rule). Lock: the pool lock must be held.
    pub fn wakers(&self) -> impl Iterator<Item = &Waker> {
        self.waiting.iter().map(|(_, w)| &w.waker)
    }

    /// Hands grants to waiting entries by the fairness rule of the module documentation and
    /// returns how many were granted. Lock: the pool lock must be held; wake `wakes` after
    /// releasing it.
    ///
    /// `grant(size)` is called for the entries in FIFO order; it either takes `size` bytes from
    /// the allocator and returns the grant, or returns `None` when they do not fit. Each granted
    /// entry's waker is moved into `wakes` (exactly once: the entry leaves the waiting set) and
    /// its grant is kept until the entry polls or cancels. `now` decides which entries have
    /// aged.
    ///
    /// `grant` is assumed monotone during one call: once it refuses a size, it would refuse any
    /// larger size (true of a byte counter and of a buddy allocator, whose free space only
    /// shrinks during the call). Entries at least as large as a refused size are therefore
    /// passed over without calling it. A `grant` that breaks this assumption only makes dispatch
    /// less eager, never unfair.
    pub fn dispatch(
        &mut self,
        now: Instant,
        wakes: &mut WakeList,
        mut grant: impl FnMut(u64) -> Option<G>,
    ) -> usize {
        self.dispatch_lazy(&mut LazyNow::at(now), wakes, |size, _| grant(size))
    }

    /// [`WaitQueue::dispatch`] reading the clock only if it must: the aging rule needs the
    /// time only for an entry that does not fit, and `grant` gets `now` to read it only if it
    /// needs it too (for instance to time-stamp the grant). A release that serves the head of
    /// the queue at once, or finds nobody waiting, reads no clock here.
    pub fn dispatch_lazy(
        &mut self,
        now: &mut LazyNow,
        wakes: &mut WakeList,
        mut grant: impl FnMut(u64, &mut LazyNow) -> Option<G>,
    ) -> usize {
        let mut granted = 0;
        // Entries passed over in this walk, oldest first, by index in `waiting` (entries are
        // removed only at the walk's position, behind them, so their indices hold): each is
        // bypassed by every later grant.
        let mut passed_over: Vec<usize> = Vec::new();
        // The smallest size refused so far in this walk: larger entries cannot fit.
        let mut smallest_refused = u64::MAX;
        let mut at = 0;
        while let Some((seq, waiter)) = self.waiting.get(at) {
            let seq = *seq;
            let size = waiter.size;
            let offered = if size < smallest_refused {
                grant(size, now)
            } else {
                None
            };
            let Some(handed) = offered else {
                smallest_refused = smallest_refused.min(size);
                if self.is_starving(waiter, now.get()) {
                    break; // Space is kept for it: nothing behind it is served.
                }
                if self
                    .sizes
                    .first()
                    .is_some_and(|&(min, _)| smallest_refused <= min)
                {
                    break; // No waiting entry is smaller than a refused size: none can fit.
                }
                passed_over.push(at);
                at += 1;
                continue;
            };
            if let Some((_, waiter)) = self.waiting.remove(at) {
                self.count_out(waiter.size);
                wakes.push(waiter.waker);
                self.granted.insert(seq, handed);
                granted += 1;
            }
            let mut barrier_reached = false;
            for &older in &passed_over {
                if let Some((_, waiter)) = self.waiting.get_mut(older) {
                    waiter.bypassed = waiter.bypassed.saturating_add(1);
                    barrier_reached |= waiter.bypassed >= self.cfg.max_bypass;
                }
            }
            if barrier_reached {
                break; // An older entry just used up its bypasses.
            }
        }
        granted
    }

    /// Whether `waiter` may no longer be passed over: bypassed `max_bypass` times, or waiting for
    /// at least `aging` at `now`.
    fn is_starving(&self, waiter: &Waiter, now: Instant) -> bool {
        waiter.bypassed >= self.cfg.max_bypass
            || now.saturating_duration_since(waiter.enqueued) >= self.cfg.aging
    }

    /// Number of entries still waiting for a grant. Lock: the pool lock must be held.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Number of entries granted but not yet polled (their grants are held by the queue).
    /// Lock: the pool lock must be held.
    pub fn unclaimed(&self) -> usize {
        self.granted.len()
    }

    /// `true` if some entry is waiting for a grant: new requests must then go through the queue.
    /// Lock: the pool lock must be held.
    pub fn has_waiters(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// `true` if the queue holds nothing: no entry waiting and no grant unclaimed.
    /// Lock: the pool lock must be held.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.granted.is_empty()
    }

    /// The oldest waiting entry: its ticket, size and arrival time, for the bounded-wait rule
    /// (grow synchronously when it has waited too long). Lock: the pool lock must be held.
    pub fn oldest(&self) -> Option<(Ticket, u64, Instant)> {
        self.waiting.front().map(|&(seq, ref waiter)| {
            (
                Ticket {
                    queue: self.id,
                    seq,
                },
                waiter.size,
                waiter.enqueued,
            )
        })
    }

    /// Total bytes wanted by the waiting entries (saturating at `u64::MAX`); the grower sizes
    /// growth by it. Lock: the pool lock must be held.
    pub fn waiting_bytes(&self) -> u64 {
        u64::try_from(self.waiting_bytes).unwrap_or(u64::MAX)
    }

    /// `true` if some waiting entry is starving at `now` (bypassed `max_bypass` times or waited
    /// `aging`): if it does not fit, nothing behind it will be granted. For stats and the
    /// grower's urgency. Lock: the pool lock must be held.
    pub fn has_starving(&self, now: Instant) -> bool {
        self.waiting.iter().any(|(_, w)| self.is_starving(w, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    /// A waker that counts how often it was woken.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Counter {
        fn new() -> (Arc<Counter>, Waker) {
            let counter = Arc::new(Counter::default());
            let waker = Waker::from(counter.clone());
            (counter, waker)
        }

        fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// Dispatches from a free-byte counter, grants are the sizes; wakes after "unlocking".
    fn dispatch_from(q: &mut WaitQueue<u64>, free: &mut u64, now: Instant) -> usize {
        let mut wakes = WakeList::new();
        let n = q.dispatch(now, &mut wakes, |size| {
            (size <= *free).then(|| {
                *free -= size;
                size
            })
        });
        assert_eq!(wakes.len(), n);
        wakes.wake_all();
        n
    }

    fn cfg(max_bypass: u32, aging_ms: u64) -> FairnessConfig {
        FairnessConfig {
            max_bypass,
            aging: Duration::from_millis(aging_ms),
        }
    }

    #[test]
    fn equal_sizes_are_granted_in_fifo_order() {
        let mut q = WaitQueue::new(cfg(4, 1000));
        let now = Instant::now();
        let entries: Vec<_> = (0..8)
            .map(|_| {
                let (c, w) = Counter::new();
                (q.enqueue(512, now, &w), c, w)
            })
            .collect();
        let mut free = 0;
        for (i, (ticket, counter, waker)) in entries.iter().enumerate() {
            free += 512;
            assert_eq!(dispatch_from(&mut q, &mut free, now), 1);
            assert_eq!(counter.count(), 1, "entry {i} woken");
            for (_, later, _) in &entries[i + 1..] {
                assert_eq!(later.count(), 0);
            }
            assert_eq!(q.poll(*ticket, waker), Poll::Ready(Ok(512)));
        }
        assert!(q.is_empty());
        assert_eq!(free, 0);
    }

    #[test]
    fn small_entries_bypass_a_large_one_at_most_max_bypass_times() {
        let mut q = WaitQueue::new(cfg(2, 1000));
        let now = Instant::now();
        let (large_count, large_waker) = Counter::new();
        let large = q.enqueue(10, now, &large_waker);
        let small: Vec<_> = (0..4)
            .map(|_| {
                let (c, w) = Counter::new();
                (q.enqueue(1, now, &w), c)
            })
            .collect();
        assert_eq!(q.waiting_bytes(), 14);
        let mut free = 3;
        // Two small ones pass, then the large one is a barrier although space remains.
        assert_eq!(dispatch_from(&mut q, &mut free, now), 2);
        assert_eq!(free, 1);
        assert_eq!((small[0].1.count(), small[1].1.count()), (1, 1));
        assert_eq!(small[2].1.count(), 0);
        assert!(q.has_starving(now));
        assert_eq!(q.oldest().map(|(t, size, _)| (t, size)), Some((large, 10)));
        free += 8;
        assert_eq!(
            dispatch_from(&mut q, &mut free, now),
            0,
            "space accumulates"
        );
        free += 3;
        // The large one gets 10, then the rest is FIFO again.
        assert_eq!(dispatch_from(&mut q, &mut free, now), 3);
        assert_eq!(large_count.count(), 1);
        assert_eq!((small[2].1.count(), small[3].1.count()), (1, 1));
        assert_eq!(free, 0);
        assert_eq!(q.waiting(), 0);
        assert_eq!(q.unclaimed(), 5);
    }

    #[test]
    fn strict_fifo_with_zero_bypass() {
        let mut q = WaitQueue::new(cfg(0, 1000));
        let now = Instant::now();
        let (_, w) = Counter::new();
        q.enqueue(10, now, &w);
        q.enqueue(1, now, &w);
        let mut free = 5;
        assert_eq!(dispatch_from(&mut q, &mut free, now), 0);
        free += 6;
        assert_eq!(dispatch_from(&mut q, &mut free, now), 2);
    }

    #[test]
    fn aged_entry_is_not_bypassed() {
        let mut q = WaitQueue::new(cfg(100, 5));
        let t0 = Instant::now();
        let (_, w) = Counter::new();
        q.enqueue(10, t0, &w);
        q.enqueue(1, t0, &w);
        q.enqueue(1, t0, &w);
        let mut free = 1;
        assert_eq!(dispatch_from(&mut q, &mut free, t0), 1, "young: bypassed");
        free = 1;
        let later = t0 + Duration::from_millis(5);
        assert!(q.has_starving(later));
        assert_eq!(dispatch_from(&mut q, &mut free, later), 0, "aged: barrier");
        free = 11;
        assert_eq!(dispatch_from(&mut q, &mut free, later), 2);
    }

    #[test]
    fn cancel_returns_unclaimed_grant_and_lifts_barrier() {
        let mut q = WaitQueue::new(cfg(0, 1000));
        let now = Instant::now();
        let (_, w) = Counter::new();
        let a = q.enqueue(4, now, &w);
        let big = q.enqueue(100, now, &w);
        let c = q.enqueue(4, now, &w);
        let mut free = 8;
        assert_eq!(dispatch_from(&mut q, &mut free, now), 1);
        // `a` was granted but its future is dropped before polling: the grant comes back.
        assert_eq!(q.cancel(a), Some(4));
        assert_eq!(q.cancel(a), None, "second cancel is a no-op");
        free += 4;
        assert_eq!(
            dispatch_from(&mut q, &mut free, now),
            0,
            "strict FIFO: big blocks c"
        );
        // Cancelling the waiting barrier takes nothing and lets `c` through.
        assert_eq!(q.cancel(big), None);
        assert_eq!(q.waiting_bytes(), 4);
        assert_eq!(dispatch_from(&mut q, &mut free, now), 1);
        assert_eq!(q.poll(c, &w), Poll::Ready(Ok(4)));
        assert_eq!(free, 4);
        assert!(q.is_empty());
    }

    #[test]
    fn foreign_and_finished_tickets_are_errors() {
        let mut q1 = WaitQueue::<u64>::new(FairnessConfig::default());
        let mut q2 = WaitQueue::<u64>::new(FairnessConfig::default());
        let now = Instant::now();
        let (_, w) = Counter::new();
        let t1 = q1.enqueue(1, now, &w);
        let t2 = q2.enqueue(1, now, &w);
        assert_eq!(t1.seq, t2.seq, "same position, different queues");
        assert_eq!(
            q2.poll(t1, &w),
            Poll::Ready(Err(WaitError::ForeignTicket(t1)))
        );
        assert_eq!(q2.cancel(t1), None);
        assert_eq!(q2.waiting(), 1, "foreign cancel changed nothing");
        assert_eq!(q1.cancel(t1), None);
        assert_eq!(
            q1.poll(t1, &w),
            Poll::Ready(Err(WaitError::UnknownTicket(t1)))
        );
    }

    #[test]
    fn poll_replaces_waker_only_when_needed() {
        let mut q = WaitQueue::new(FairnessConfig::default());
        let now = Instant::now();
        let (first, first_waker) = Counter::new();
        let (second, second_waker) = Counter::new();
        let t = q.enqueue(1, now, &first_waker);
        assert!(q.poll(t, &first_waker).is_pending());
        assert_eq!(Arc::strong_count(&first), 3, "same waker not cloned again");
        assert!(q.poll(t, &second_waker).is_pending());
        assert_eq!(Arc::strong_count(&first), 2, "old waker dropped");
        let mut free = 1;
        assert_eq!(dispatch_from(&mut q, &mut free, now), 1);
        assert_eq!((first.count(), second.count()), (0, 1));
        assert_eq!(q.poll(t, &second_waker), Poll::Ready(Ok(1)));
    }

    #[test]
    fn dispatch_lazy_reads_the_clock_only_when_it_must() {
        let mut q = WaitQueue::new(cfg(4, 1000));
        let t0 = Instant::now();
        let (_, w) = Counter::new();
        let mut wakes = WakeList::new();
        // Nobody waiting: no clock read.
        let mut now = LazyNow::new();
        assert_eq!(q.dispatch_lazy(&mut now, &mut wakes, |_, _| Some(())), 0);
        assert_eq!(now.0, None);
        // The head fits and the grant does not ask for the time: no clock read either.
        q.enqueue(1, t0, &w);
        assert_eq!(q.dispatch_lazy(&mut now, &mut wakes, |_, _| Some(())), 1);
        assert_eq!(now.0, None);
        // An entry that does not fit: the aging rule reads the clock, once.
        q.enqueue(8, t0, &w);
        assert_eq!(q.dispatch_lazy(&mut now, &mut wakes, |_, _| None), 0);
        let read = now.0.expect("aging needed the time");
        assert!(read >= t0);
        assert_eq!(now.get(), read, "read once, then kept");
        // A grant that asks for the time gets the one already read.
        let mut stamped = None;
        assert_eq!(
            q.dispatch_lazy(&mut now, &mut wakes, |_, now| {
                stamped = Some(now.get());
                Some(())
            }),
            1
        );
        assert_eq!(stamped, Some(read));
        wakes.wake_all();
    }

    #[test]
    fn dropped_wake_list_still_wakes() {
        let mut q = WaitQueue::new(FairnessConfig::default());
        let (c, w) = Counter::new();
        q.enqueue(1, Instant::now(), &w);
        {
            let mut wakes = WakeList::new();
            assert_eq!(q.dispatch(Instant::now(), &mut wakes, Some), 1);
            assert_eq!(c.count(), 0, "not woken inside dispatch");
        }
        assert_eq!(c.count(), 1);
    }

    /// One step of the random simulation.
    #[derive(Debug, Clone)]
    enum Op {
        /// A new waiter of this size arrives (and dispatch runs, as the pool would).
        Enqueue(u64),
        /// A task polls its ticket (index into the tasks), maybe with a fresh waker.
        Poll(usize, bool),
        /// A task's future is dropped.
        Cancel(usize),
        /// A task releases the grant it took.
        Release(usize),
        /// Time passes (ms).
        Advance(u64),
    }

    struct Task {
        ticket: Ticket,
        size: u64,
        enqueued: Instant,
        wakers: Vec<(Arc<Counter>, Waker)>,
        granted: bool,
        finished: bool,
        bypassed: u32,
    }

    const CAPACITY: u64 = 16;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1..=CAPACITY).prop_map(Op::Enqueue),
            3 => (any::<usize>(), any::<bool>()).prop_map(|(i, fresh)| Op::Poll(i, fresh)),
            1 => any::<usize>().prop_map(Op::Cancel),
            3 => any::<usize>().prop_map(Op::Release),
            1 => (0u64..4).prop_map(Op::Advance),
        ]
    }

    struct Sim {
        q: WaitQueue<u64>,
        free: u64,
        held: Vec<u64>,
        tasks: Vec<Task>,
        now: Instant,
    }

    impl Sim {
        /// Runs dispatch and checks the fairness rule against an independent model of the
        /// bypass counts: no entry is bypassed more than `max_bypass` times, no aged entry is
        /// bypassed, every entry ahead of the first starving one (and that one) does not fit, and
        /// each granted entry's current waker is woken exactly once.
        fn dispatch(&mut self) -> Result<(), TestCaseError> {
            let cfg = self.q.config();
            let before: Vec<usize> = self
                .tasks
                .iter()
                .map(|t| t.wakers.iter().map(|(c, _)| c.count()).sum())
                .collect();
            let now = self.now;
            let n = dispatch_from(&mut self.q, &mut self.free, now);
            let mut newly = Vec::new();
            for (i, task) in self.tasks.iter_mut().enumerate() {
                let after: usize = task.wakers.iter().map(|(c, _)| c.count()).sum();
                if after != before[i] {
                    prop_assert!(!task.granted && !task.finished, "woken twice");
                    prop_assert_eq!(after, before[i] + 1);
                    let current = task.wakers.last().map(|(c, _)| c.count());
                    prop_assert_eq!(current, Some(1), "the latest waker is the one woken");
                    task.granted = true;
                    newly.push(task.ticket.seq);
                }
            }
            prop_assert_eq!(newly.len(), n);
            let mut blocked_by_starving = false;
            for task in self.tasks.iter_mut().filter(|t| !t.granted && !t.finished) {
                let aged = now.saturating_duration_since(task.enqueued) >= cfg.aging;
                let younger_granted = newly.iter().filter(|&&s| s > task.ticket.seq).count();
                if aged && task.bypassed < cfg.max_bypass {
                    prop_assert_eq!(younger_granted, 0, "aged entry bypassed");
                }
                task.bypassed += younger_granted as u32;
                prop_assert!(task.bypassed <= cfg.max_bypass, "bypassed too often");
                if !blocked_by_starving {
                    prop_assert!(task.size > self.free, "a fitting entry was not served");
                    blocked_by_starving = task.bypassed >= cfg.max_bypass || aged;
                }
            }
            Ok(())
        }

        fn check_conservation(&self) -> Result<(), TestCaseError> {
            let unclaimed: u64 = self.q.granted.values().sum();
            let held: u64 = self.held.iter().sum();
            prop_assert_eq!(self.free + unclaimed + held, CAPACITY);
            let waiting: u64 = self
                .tasks
                .iter()
                .filter(|t| !t.granted && !t.finished)
                .map(|t| t.size)
                .sum();
            prop_assert_eq!(self.q.waiting_bytes(), waiting);
            prop_assert_eq!(
                self.q.waiting(),
                self.tasks
                    .iter()
                    .filter(|t| !t.granted && !t.finished)
                    .count()
            );
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_schedules_are_fair_conserving_and_wake_once(
            max_bypass in 0u32..4,
            ops in prop::collection::vec(op(), 1..120),
        ) {
            let mut sim = Sim {
                q: WaitQueue::new(cfg(max_bypass, 5)),
                free: CAPACITY,
                held: Vec::new(),
                tasks: Vec::new(),
                now: Instant::now(),
            };
            for op in ops {
                match op {
                    Op::Enqueue(size) => {
                        let (c, w) = Counter::new();
                        let ticket = sim.q.enqueue(size, sim.now, &w);
                        sim.tasks.push(Task {
                            ticket,
                            size,
                            enqueued: sim.now,
                            wakers: vec![(c, w)],
                            granted: false,
                            finished: false,
                            bypassed: 0,
                        });
                        sim.dispatch()?;
                    }
                    Op::Poll(i, fresh) if !sim.tasks.is_empty() => {
                        let i = i % sim.tasks.len();
                        if fresh {
                            sim.tasks[i].wakers.push(Counter::new());
                        }
                        let task = &mut sim.tasks[i];
                        let waker = task.wakers.last().map(|(_, w)| w.clone());
                        let Some(waker) = waker else { continue };
                        match sim.q.poll(task.ticket, &waker) {
                            Poll::Ready(Ok(grant)) => {
                                prop_assert!(task.granted && !task.finished);
                                prop_assert_eq!(grant, task.size);
                                task.finished = true;
                                sim.held.push(grant);
                            }
                            Poll::Ready(Err(WaitError::UnknownTicket(_))) => {
                                prop_assert!(task.finished)
                            }
                            Poll::Ready(Err(e)) => prop_assert!(false, "{}", e),
                            Poll::Pending => prop_assert!(!task.granted && !task.finished),
                        }
                    }
                    Op::Cancel(i) if !sim.tasks.is_empty() => {
                        let i = i % sim.tasks.len();
                        let task = &mut sim.tasks[i];
                        let returned = sim.q.cancel(task.ticket);
                        if task.granted && !task.finished {
                            prop_assert_eq!(returned, Some(task.size));
                        } else {
                            prop_assert_eq!(returned, None);
                        }
                        task.finished = true;
                        sim.free += returned.unwrap_or(0);
                        sim.dispatch()?;
                    }
                    Op::Release(i) if !sim.held.is_empty() => {
                        let i = i % sim.held.len();
                        sim.free += sim.held.swap_remove(i);
                        sim.dispatch()?;
                    }
                    Op::Advance(ms) => {
                        sim.now += Duration::from_millis(ms);
                        sim.dispatch()?;
                    }
                    _ => {}
                }
                sim.check_conservation()?;
            }
            // Liveness: with every grant taken and released, the queue drains.
            for _ in 0..=sim.tasks.len() {
                for task in sim.tasks.iter_mut().filter(|t| !t.finished) {
                    let Some(waker) = task.wakers.last().map(|(_, w)| w.clone()) else {
                        continue;
                    };
                    if let Poll::Ready(Ok(grant)) = sim.q.poll(task.ticket, &waker) {
                        task.finished = true;
                        sim.free += grant;
                    }
                }
                sim.free += sim.held.drain(..).sum::<u64>();
                sim.dispatch()?;
                sim.check_conservation()?;
            }
            prop_assert_eq!(sim.q.waiting(), 0);
            for task in &sim.tasks {
                let wakes: usize = task.wakers.iter().map(|(c, _)| c.count()).sum();
                prop_assert_eq!(wakes, usize::from(task.granted));
            }
        }
    }
}
