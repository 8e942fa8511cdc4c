//! Property tests of the pool through its public API: random sequences of immediate
//! allocations, hand-polled awaitable allocations, drops, cancellations and grower steps, with
//! random sizes, checked after every step for the allocator's invariants:
//! - no two live buffers overlap in device address space;
//! - every buffer is aligned: 4 KiB if it is at least 4 KiB, else to its size class;
//! - every buffer is at least as large as asked and holds zeroes when handed out;
//! - `in_use_bytes` equals the sum of live buffers' capacities;
//! - when everything is dropped, `in_use_bytes` returns to 0 and nobody waits.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use proptest::prelude::*;
use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Alloc, DmaBuf, Pool, PoolConfig, PoolError};
use tidepool::share::identity::Identity;

/// The largest buffer in these tests.
const MAX: usize = 64 << 10;

/// One step of a random run. Indices are taken modulo the number of live items.
#[derive(Clone, Debug)]
enum Op {
    /// `try_alloc(len)`: the immediate path.
    TryAlloc(usize),
    /// Start an awaitable `alloc(len)` and poll it once.
    StartAlloc(usize),
    /// Poll every pending awaitable allocation once.
    PollAll,
    /// Drop a live buffer.
    Drop(usize),
    /// Drop (cancel) a pending awaitable allocation.
    Cancel(usize),
    /// Run one grower step (grow, retire, shrink).
    Maintain,
    /// Sleep past `shrink_delay` so that the next `Maintain` may shrink.
    Age,
}

fn op() -> impl Strategy<Value = Op> {
    let len = 1..=MAX;
    prop_oneof![
        4 => len.clone().prop_map(Op::TryAlloc),
        3 => len.prop_map(Op::StartAlloc),
        2 => Just(Op::PollAll),
        4 => any::<usize>().prop_map(Op::Drop),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => Just(Op::Maintain),
        1 => Just(Op::Age),
    ]
}

/// A small pool: 128 KiB chunks of 4 KiB pages, up to 512 KiB, with a reserve for the
/// immediate path and transient chunks on; no background thread (the test drives `maintain`).
fn config() -> PoolConfig {
    PoolConfig {
        memory: MemoryConfig {
            page_size: PageSize::Small4K,
            allow_small_pages: true,
        },
        chunk_bytes: 128 << 10,
        prefill_bytes: 128 << 10,
        max_bytes: 512 << 10,
        max_buffer: MAX,
        low_watermark: 16 << 10,
        high_watermark: 144 << 10,
        shrink_delay: Duration::from_millis(1),
        reserve_bytes: 16 << 10,
        transient: true,
        grow_after: Duration::ZERO,
        cache_bytes_per_class: 16 << 10,
        background: false,
        ..PoolConfig::default()
    }
}

/// A waker that counts wakes.
#[derive(Default)]
struct Counter(AtomicUsize);
impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A live buffer and the length it was asked for.
struct Live {
    buf: DmaBuf,
    len: usize,
}

/// Checks a buffer as handed out: large enough, aligned, zeroed.
fn check_new(buf: &DmaBuf, len: usize) -> Result<(), TestCaseError> {
    let cap = buf.capacity();
    prop_assert!(
        cap >= len && cap.is_power_of_two() && cap <= MAX,
        "len {len} got capacity {cap}"
    );
    prop_assert_eq!(buf.len(), len);
    let align = cap.min(4096) as u64;
    let addr = buf.device_addr().0;
    prop_assert_eq!(
        addr % align,
        0,
        "buffer of {} at {:#x} not {}-aligned",
        cap,
        addr,
        align
    );
    let mut bytes = vec![0xFFu8; cap];
    buf.read_at(0, &mut bytes).unwrap();
    prop_assert!(
        bytes.iter().all(|&b| b == 0),
        "fresh buffer of {} not zeroed",
        cap
    );
    Ok(())
}

/// No two live buffers overlap, and the stats count exactly their capacities.
fn check_live(pool: &Pool, live: &[Live]) -> Result<(), TestCaseError> {
    let mut ranges: Vec<(u64, u64)> = live
        .iter()
        .map(|l| {
            (
                l.buf.device_addr().0,
                l.buf.device_addr().0 + l.buf.capacity() as u64,
            )
        })
        .collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        prop_assert!(w[0].1 <= w[1].0, "overlap: {:#x?} and {:#x?}", w[0], w[1]);
    }
    let sum: u64 = live.iter().map(|l| l.buf.capacity() as u64).sum();
    prop_assert_eq!(pool.stats().in_use_bytes, sum);
    Ok(())
}

/// Takes a buffer in: checks it, marks it with its owner's pattern, keeps it.
fn accept(live: &mut Vec<Live>, buf: DmaBuf, len: usize) -> Result<(), TestCaseError> {
    check_new(&buf, len)?;
    let mut buf = buf;
    let mark = (live.len() as u8) | 1;
    buf.write_at(0, &vec![mark; buf.capacity()]).unwrap();
    live.push(Live { buf, len });
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let pool = Pool::new(Arc::new(Identity::new()), config()).unwrap();
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(counter.clone());
    let mut cx = Context::from_waker(&waker);
    let mut live: Vec<Live> = Vec::new();
    let mut pending: Vec<(Pin<Box<Alloc<'_>>>, usize)> = Vec::new();

    for op in ops {
        match op {
            Op::TryAlloc(len) => match pool.try_alloc(len) {
                Ok(buf) => accept(&mut live, buf, len)?,
                Err(PoolError::Exhausted { .. }) => {}
                Err(e) => return Err(TestCaseError::fail(format!("try_alloc({len}): {e}"))),
            },
            Op::StartAlloc(len) => {
                let mut fut = Box::pin(pool.alloc(len));
                match fut.as_mut().poll(&mut cx) {
                    Poll::Ready(Ok(buf)) => accept(&mut live, buf, len)?,
                    Poll::Ready(Err(e)) => {
                        return Err(TestCaseError::fail(format!("alloc({len}): {e}")))
                    }
                    Poll::Pending => pending.push((fut, len)),
                }
            }
            Op::PollAll => {
                let mut still = Vec::new();
                for (mut fut, len) in pending.drain(..) {
                    match fut.as_mut().poll(&mut cx) {
                        Poll::Ready(Ok(buf)) => accept(&mut live, buf, len)?,
                        Poll::Ready(Err(e)) => {
                            return Err(TestCaseError::fail(format!("alloc({len}): {e}")))
                        }
                        Poll::Pending => still.push((fut, len)),
                    }
                }
                pending = still;
            }
            Op::Drop(i) if !live.is_empty() => {
                let l = live.swap_remove(i % live.len());
                prop_assert!(l.buf.len() == l.len);
                drop(l);
            }
            Op::Cancel(i) if !pending.is_empty() => {
                drop(pending.swap_remove(i % pending.len()));
            }
            Op::Maintain => {
                pool.maintain();
            }
            Op::Age => std::thread::sleep(Duration::from_millis(2)),
            Op::Drop(_) | Op::Cancel(_) => {}
        }
        check_live(&pool, &live)?;
        let s = pool.stats();
        prop_assert!(s.capacity_bytes <= 512 << 10, "over the cap: {s:?}");
        prop_assert!(s.waiters as usize <= pending.len(), "{s:?}");
    }

    // Wind down: release everything, let waiters finish, drop them too.
    live.clear();
    for (mut fut, len) in pending.drain(..) {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(buf)) => check_new(&buf, len)?,
            Poll::Ready(Err(e)) => return Err(TestCaseError::fail(format!("alloc({len}): {e}"))),
            Poll::Pending => {}
        }
    }
    pool.maintain();
    let s = pool.stats();
    prop_assert_eq!(s.in_use_bytes, 0, "{:?}", s);
    prop_assert_eq!(s.waiters, 0, "{:?}", s);
    // The pool still serves (per-core caches may hold fragments, so ask for a page).
    prop_assert!(pool.try_alloc(4096).is_ok());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn random_operation_sequences_keep_the_pool_consistent(ops in prop::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}

/// Once every awaitable allocation is released, an awaiting one blocked behind them completes:
/// waiters are served as space returns, in a long deterministic run of the same machinery.
#[test]
fn waiters_are_served_as_space_returns() {
    let pool = Pool::new(
        Arc::new(Identity::new()),
        PoolConfig {
            max_bytes: 128 << 10,
            reserve_bytes: 0,
            ..config()
        },
    )
    .unwrap();
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(counter.clone());
    let mut cx = Context::from_waker(&waker);
    let mut held: Vec<DmaBuf> = Vec::new();
    while let Ok(b) = pool.try_alloc(MAX) {
        held.push(b);
    }
    let mut futs: Vec<_> = (0..held.len()).map(|_| Box::pin(pool.alloc(MAX))).collect();
    for f in &mut futs {
        assert!(f.as_mut().poll(&mut cx).is_pending());
    }
    let woken_before = counter.0.load(Ordering::Relaxed);
    held.clear();
    assert_eq!(
        counter.0.load(Ordering::Relaxed) - woken_before,
        futs.len(),
        "each waiter woken once"
    );
    for mut f in futs {
        let Poll::Ready(Ok(b)) = f.as_mut().poll(&mut cx) else {
            panic!("woken waiter served")
        };
        assert_eq!(b.capacity(), MAX);
    }
    assert_eq!(pool.stats().in_use_bytes, 0);
}
