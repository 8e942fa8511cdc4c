//! Stress test of the pool on a multi-threaded tokio runtime: 10,000 tasks with random sizes,
//! random directions, random cancellation (racing a short sleep) and timeouts, against a small
//! pool whose background grower grows and shrinks it.
//!
//! Checked:
//! - no task hangs (the whole run is under an overall timeout);
//! - everything a "device" could see was zeroed or fully written for this user first: each
//!   task checks its buffer on receipt (`alloc`: all zero; `map` `ToDevice`: exactly the
//!   caller's bytes then a zero tail; `FromDevice`: all zero), then scribbles its own pattern
//!   over the whole buffer before releasing it, so a stale byte from any earlier user shows;
//! - when all tasks are done, nothing is in use and nobody waits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Direction, Pool, PoolConfig, PoolError};
use tidepool::share::identity::Identity;

const TASKS: u64 = 10_000;
const MAX: usize = 64 << 10;

/// splitmix64: a small, good, seedable generator (no extra dependency).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// A length in 1..=MAX, log-uniform (sizes cluster small, as I/O does, but reach MAX).
    fn len(&mut self) -> usize {
        let bits = self.below(17) as u32; // 0..=16
        let hi = 1usize << bits;
        (hi + self.below(hi as u64) as usize).clamp(1, MAX)
    }
}

/// How each task's outcome is counted.
#[derive(Default)]
struct Tally {
    served: AtomicU64,
    cancelled: AtomicU64,
    timed_out: AtomicU64,
}

/// A byte pattern unique to a task (never zero).
fn pattern(task: u64) -> u8 {
    (task % 251) as u8 + 1
}

/// Reads a whole pool buffer (the identity view has no device: the test plays it).
fn contents(buf: &tidepool::pool::DmaBuf) -> Vec<u8> {
    let mut v = vec![0; buf.capacity()];
    buf.read_at(0, &mut v).expect("in bounds");
    v
}

/// Plays the device writing the whole buffer with the task's pattern.
fn scribble(buf: &tidepool::pool::DmaBuf, task: u64) {
    // SAFETY: the task owns the buffer; no device exists (identity view); the range is the
    // buffer's capacity.
    unsafe { std::ptr::write_bytes(buf.as_ptr(), pattern(task), buf.capacity()) };
}

fn first_nonzero(b: &[u8]) -> Option<(usize, u8)> {
    b.iter().position(|&x| x != 0).map(|i| (i, b[i]))
}

/// One task's work: pick an operation, race it against a short sleep or give it a timeout,
/// check what it got, scribble, hold briefly, release.
async fn task(pool: Pool, id: u64, tally: Arc<Tally>) {
    let mut rng = Rng(id.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xDEAD_BEEF);
    let len = rng.len();
    let race = Duration::from_micros(rng.below(3000));
    let cancel = rng.below(4) == 0; // a quarter race a sleep
    let timeout = Duration::from_micros(500 + rng.below(20_000));
    let kind = rng.below(5);
    let hold = rng.below(3);

    let outcome = match kind {
        // Plain alloc, or alloc with a timeout.
        0 | 1 => {
            let fut = async {
                if kind == 0 {
                    pool.alloc(len).await
                } else {
                    pool.alloc_timeout(len, timeout).await
                }
            };
            let got = if cancel {
                tokio::select! {
                    r = fut => Some(r),
                    _ = tokio::time::sleep(race) => None,
                }
            } else {
                Some(fut.await)
            };
            match got {
                None => Outcome::Cancelled,
                Some(Err(PoolError::Timeout { .. })) => Outcome::TimedOut,
                Some(Err(e)) => panic!("task {id}: alloc({len}) failed: {e}"),
                Some(Ok(buf)) => {
                    assert!(buf.capacity() >= len);
                    let bytes = contents(&buf);
                    assert_eq!(
                        first_nonzero(&bytes),
                        None,
                        "task {id}: alloc({len}) not zeroed"
                    );
                    scribble(&buf, id);
                    release_after(hold).await;
                    drop(buf);
                    Outcome::Served
                }
            }
        }
        // map ToDevice: the device must see exactly the caller's bytes, then zeroes.
        2 | 3 => {
            let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ pattern(id) | 1).collect();
            let fut = async {
                if kind == 2 {
                    pool.map(&data[..], Direction::ToDevice).await
                } else {
                    pool.map_timeout(&data[..], Direction::ToDevice, timeout)
                        .await
                }
            };
            let got = if cancel {
                tokio::select! {
                    r = fut => Some(r),
                    _ = tokio::time::sleep(race) => None,
                }
            } else {
                Some(fut.await)
            };
            match got {
                None => Outcome::Cancelled,
                Some(Err(PoolError::Timeout { .. })) => Outcome::TimedOut,
                Some(Err(e)) => panic!("task {id}: map({len}) failed: {e}"),
                Some(Ok(m)) => {
                    let bytes = contents(m.buffer());
                    assert!(
                        bytes[..len] == data[..],
                        "task {id}: ToDevice bytes differ from the caller's"
                    );
                    assert_eq!(
                        first_nonzero(&bytes[len..]),
                        None,
                        "task {id}: ToDevice tail not zeroed"
                    );
                    scribble(m.buffer(), id);
                    release_after(hold).await;
                    m.unmap();
                    Outcome::Served
                }
            }
        }
        // map FromDevice: the device must see zeroes; what it writes comes back at unmap.
        _ => {
            let mut data = vec![0xA5u8; len];
            let got = {
                let fut = pool.map_timeout(&mut data[..], Direction::FromDevice, timeout);
                let got = if cancel {
                    tokio::select! {
                        r = fut => Some(r),
                        _ = tokio::time::sleep(race) => None,
                    }
                } else {
                    Some(fut.await)
                };
                match got {
                    None => Outcome::Cancelled,
                    Some(Err(PoolError::Timeout { .. })) => Outcome::TimedOut,
                    Some(Err(e)) => panic!("task {id}: map FromDevice({len}) failed: {e}"),
                    Some(Ok(m)) => {
                        let bytes = contents(m.buffer());
                        assert_eq!(
                            first_nonzero(&bytes),
                            None,
                            "task {id}: FromDevice buffer not zeroed"
                        );
                        scribble(m.buffer(), id);
                        release_after(hold).await;
                        m.unmap();
                        Outcome::Served
                    }
                }
            };
            if got == Outcome::Served {
                assert!(
                    data.iter().all(|&b| b == pattern(id)),
                    "task {id}: unmap copied out what the device wrote"
                );
            }
            got
        }
    };
    let counter = match outcome {
        Outcome::Served => &tally.served,
        Outcome::Cancelled => &tally.cancelled,
        Outcome::TimedOut => &tally.timed_out,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// How a task ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Served,
    /// Lost the race against its sleep: the future was dropped.
    Cancelled,
    TimedOut,
}

/// Holds a buffer for a moment: not at all, across a yield, or across a short sleep.
async fn release_after(hold: u64) {
    match hold {
        0 => {}
        1 => tokio::task::yield_now().await,
        _ => tokio::time::sleep(Duration::from_micros(200)).await,
    }
}

#[test]
fn ten_thousand_tasks_cancel_time_out_and_leave_nothing_behind() {
    let cfg = PoolConfig {
        memory: MemoryConfig {
            page_size: PageSize::Small4K,
            allow_small_pages: true,
        },
        chunk_bytes: 256 << 10,
        prefill_bytes: 256 << 10,
        max_bytes: 1 << 20,
        max_buffer: MAX,
        low_watermark: 32 << 10,
        high_watermark: 320 << 10,
        shrink_delay: Duration::from_millis(20),
        reserve_bytes: 32 << 10,
        transient: true,
        grow_after: Duration::from_millis(1),
        cache_bytes_per_class: 32 << 10,
        background: true,
        ..PoolConfig::default()
    };
    let pool = Pool::new(Arc::new(Identity::new()), cfg).unwrap();
    let tally = Arc::new(Tally::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let all = async {
            let handles: Vec<_> = (0..TASKS)
                .map(|id| tokio::spawn(task(pool.clone(), id, tally.clone())))
                .collect();
            for h in handles {
                h.await.expect("task panicked");
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .unwrap_or_else(|_| panic!("tasks hung; pool: {:?}", pool.stats()));
    });
    drop(rt);
    let (served, cancelled, timed_out) = (
        tally.served.load(Ordering::Relaxed),
        tally.cancelled.load(Ordering::Relaxed),
        tally.timed_out.load(Ordering::Relaxed),
    );
    let s = pool.stats();
    eprintln!("served {served}, cancelled {cancelled}, timed out {timed_out}; pool {s:?}");
    assert_eq!(served + cancelled + timed_out, TASKS);
    // All 10,000 tasks start at once against ~1 MiB, so many time out or lose their race:
    // every path must have been taken, and a good share served.
    assert!(served >= TASKS / 10, "served {served}");
    assert!(
        cancelled > 0 && timed_out > 0,
        "cancellation and timeouts exercised"
    );
    assert!(s.waits > 0, "the pool was small enough that tasks waited");
    assert_eq!(s.in_use_bytes, 0, "{s:?}");
    assert_eq!(s.waiters, 0, "{s:?}");
    assert!(s.capacity_bytes <= 1 << 20, "{s:?}");
}
