//! Pool statistics: counters kept cheaply, a snapshot API, and a JSON form.
//!
//! Counters that change on the hot path (bytes in use) live in the per-core caches, under the
//! cache's own lock, and are summed on [`super::Pool::stats`]; everything else changes only on
//! the slow path and is kept here in relaxed atomics (monotonic counters: no ordering with other
//! memory is needed to read them). The wait-time histogram ([`WaitTimes`]) and the bytes that
//! the slow paths hand out and take back live in the pool's `Global`, under the pool lock that
//! those paths hold anyway: recording them costs no lock or atomic of its own.

use std::time::Duration;

use hdrhistogram::Histogram;

use crate::share::ShareUsage;
use crate::sync::{AtomicU64, Mutex, Ordering};

/// A completed wait at least this long is logged (`tracing` info).
pub const LONG_WAIT: Duration = Duration::from_millis(10);

/// Slow-path counters. All relaxed: each is an independent monotonic count or gauge.
#[derive(Debug)]
pub(crate) struct Counters {
    pub capacity_bytes: AtomicU64,
    pub peak_allocated_bytes: AtomicU64,
    pub chunks: AtomicU64,
    pub timeouts: AtomicU64,
    pub grows: AtomicU64,
    pub sync_grows: AtomicU64,
    pub shrinks: AtomicU64,
    pub growth_failures: AtomicU64,
    pub transient_allocs: AtomicU64,
    pub reserve_allocs: AtomicU64,
    pub immediate_failures: AtomicU64,
    pub cache_refills: AtomicU64,
    /// Bytes the grower zeroed ahead of time.
    pub prezeroed_bytes: AtomicU64,
    /// The last growth failure's message. Guarded by its own mutex (slow path only).
    pub last_growth_error: Mutex<Option<String>>,
}

impl Counters {
    pub fn new() -> Counters {
        Counters {
            capacity_bytes: AtomicU64::new(0),
            peak_allocated_bytes: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            grows: AtomicU64::new(0),
            sync_grows: AtomicU64::new(0),
            shrinks: AtomicU64::new(0),
            growth_failures: AtomicU64::new(0),
            transient_allocs: AtomicU64::new(0),
            reserve_allocs: AtomicU64::new(0),
            immediate_failures: AtomicU64::new(0),
            cache_refills: AtomicU64::new(0),
            prezeroed_bytes: AtomicU64::new(0),
            last_growth_error: Mutex::new(None),
        }
    }

    /// Adds one to a counter.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Completed waits: how many, their total and their histogram, in nanoseconds.
///
/// # Safety
/// Kept in the pool's `Global`: read and written only under the pool lock, which every path
/// that ends a wait holds when it ends it (no lock or atomic of its own).
#[derive(Debug)]
pub(crate) struct WaitTimes {
    /// Completed waits.
    pub count: u64,
    /// Their total, nanoseconds.
    pub sum_ns: u64,
    /// Their histogram, nanoseconds (3 significant digits).
    pub hist: Histogram<u64>,
}

impl WaitTimes {
    pub fn new(histogram_max_ns: u64) -> WaitTimes {
        WaitTimes {
            count: 0,
            sum_ns: 0,
            hist: Histogram::new_with_bounds(1, histogram_max_ns, 3)
                .expect("bounds validated by PoolConfig::validate"),
        }
    }

    /// Records one completed wait. Returns whether it was long ([`LONG_WAIT`]): the caller
    /// logs it after releasing the pool lock ([`log_long_wait`]).
    #[inline]
    pub fn record(&mut self, waited: Duration) -> bool {
        let ns = (waited.as_nanos() as u64).max(1);
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.hist.saturating_record(ns);
        waited >= LONG_WAIT
    }

    /// The snapshot's percentiles and buckets.
    pub fn percentiles(&self) -> WaitPercentiles {
        PoolStats::percentiles(&self.hist, self.sum_ns)
    }
}

/// Logs a wait that [`WaitTimes::record`] found long (`tracing` info). Call without the pool
/// lock.
#[cold]
pub(crate) fn log_long_wait(waited: Duration) {
    tracing::info!(
        waited_ms = waited.as_millis() as u64,
        "a request waited long for pool capacity"
    );
}

/// Wait-time percentiles, in nanoseconds.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct WaitPercentiles {
    /// Completed waits recorded.
    pub count: u64,
    /// Median.
    pub p50_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Longest.
    pub max_ns: u64,
    /// The waits' total, in nanoseconds (exact: summed as they complete).
    pub sum_ns: u64,
    /// Cumulative counts: waits of at most each bound of [`WAIT_BUCKET_BOUNDS_NS`], in that
    /// order (a Prometheus histogram's buckets; waits past the last bound are in `count`
    /// only). Empty when nothing waited.
    pub buckets: Vec<WaitBucket>,
}

/// One cumulative bucket of [`WaitPercentiles::buckets`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WaitBucket {
    /// Upper bound, nanoseconds (inclusive).
    pub le_ns: u64,
    /// Waits of at most `le_ns`.
    pub count: u64,
}

/// The wait histogram's bucket bounds: 1 µs to 10 s, by decades.
pub const WAIT_BUCKET_BOUNDS_NS: [u64; 8] = [
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
    10_000_000_000,
];

/// A snapshot of a pool's state and history. Cheap to take (no lock held across anything slow).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct PoolStats {
    /// Bytes shared with the device (prefill + growth + transient chunks).
    pub capacity_bytes: u64,
    /// Bytes of buffers handed out and not yet released (block sizes, i.e. after rounding).
    pub in_use_bytes: u64,
    /// Highest bytes taken out of the chunks' allocators (in use plus per-core cached).
    pub peak_allocated_bytes: u64,
    /// Chunks (IOMMU mappings) held.
    pub chunks: u64,
    /// Awaitable requests queued now.
    pub waiters: u64,
    /// Bytes those waiters want.
    pub waiting_bytes: u64,
    /// Completed waits.
    pub waits: u64,
    /// Waits that ended in a timeout.
    pub timeouts: u64,
    /// Chunks added after creation.
    pub grows: u64,
    /// Of those, growths forced by the bounded wait.
    pub sync_grows: u64,
    /// Chunks given back.
    pub shrinks: u64,
    /// Failed growth attempts.
    pub growth_failures: u64,
    /// Why the last growth failed.
    pub last_growth_error: Option<String>,
    /// Transient chunks made for the immediate path.
    pub transient_allocs: u64,
    /// Immediate requests served from the reserve.
    pub reserve_allocs: u64,
    /// Immediate requests that failed.
    pub immediate_failures: u64,
    /// Per-core cache refills from the shared allocator.
    pub cache_refills: u64,
    /// Requests that hand the device a zero block (`alloc`, `FromDevice` maps) and found one
    /// the grower had zeroed ahead of time: no zeroing pass on their path.
    pub prezero_hits: u64,
    /// Such requests that found none and zeroed their block themselves.
    pub prezero_misses: u64,
    /// Bytes the grower zeroed ahead of time (`PoolConfig::prezero_bytes_per_pass`).
    pub prezeroed_bytes: u64,
    /// Wait times.
    pub wait: WaitPercentiles,
    /// The device view's mapping budget.
    pub mappings: ShareUsage,
}

impl PoolStats {
    /// The snapshot as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("stats serialize")
    }

    /// Percentiles and cumulative buckets of `h`, with the exact total `sum_ns`. The buckets
    /// have the histogram's precision (3 significant digits): a wait within 0.1 % of a bound
    /// may be counted on either side of it.
    pub(crate) fn percentiles(h: &Histogram<u64>, sum_ns: u64) -> WaitPercentiles {
        if h.is_empty() {
            return WaitPercentiles::default();
        }
        let mut cumulative = 0;
        let mut low = 0;
        let buckets = WAIT_BUCKET_BOUNDS_NS
            .iter()
            .map(|&le_ns| {
                if low <= h.max() {
                    cumulative += h.count_between(low, le_ns);
                }
                low = le_ns + 1;
                WaitBucket {
                    le_ns,
                    count: cumulative.min(h.len()),
                }
            })
            .collect();
        WaitPercentiles {
            count: h.len(),
            p50_ns: h.value_at_quantile(0.5),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
            sum_ns,
            buckets,
        }
    }
}
