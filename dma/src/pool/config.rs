//! Pool configuration: sizes, watermarks, the reserve, waiting rules.

use std::time::Duration;

use crate::memory::MemoryConfig;
use crate::wait::FairnessConfig;

use super::PoolError;

/// The smallest buffer the pool hands out: 512 B (one disk sector). Smaller requests round up.
pub const MIN_BUFFER: usize = 512;

/// The most threads a growth attempt uses (see [`PoolConfig::growth_threads`]).
pub const MAX_GROWTH_THREADS: usize = 8;

/// What an awaitable allocation does when the pool is at its hard cap and nothing is free.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub enum AtCap {
    /// Keep waiting for space to be released (the default: at the cap, waiting is the point).
    #[default]
    Wait,
    /// Fail with [`PoolError::AtCap`] once the bounded wait (`grow_after`) has passed at the
    /// cap; below it, fail with [`PoolError::GrowthFailed`] as soon as growth on the
    /// request's behalf fails.
    Fail,
}

/// The 2024 Linux swiotlb throttling RFC's rule, for comparison (the policy lab): once more
/// than `high_percent` of capacity is allocated, awaitable requests wait until it falls below
/// `low_percent`. Disables the per-core caches (every request must see the rule).
#[derive(Copy, Clone, Debug, PartialEq, serde::Serialize)]
pub struct Throttle {
    /// Start holding awaitable requests above this share of capacity (e.g. 70.0).
    pub high_percent: f64,
    /// Let them go again below this share (e.g. 65.0).
    pub low_percent: f64,
}

/// How a [`super::Pool`] sizes, grows, shrinks and waits.
///
/// The defaults suit a storage driver: 16 MiB prefilled, growth in 16 MiB chunks (one IOMMU
/// mapping each) up to 1 GiB, buffers from 512 B to 2 MiB, 1 MiB (1/16 of the prefill) reserved
/// for the immediate path, a waiter that has waited 1 ms triggers growth, and a waiter gives up
/// after 1 s of failing growth.
///
/// ```
/// use tidepool::pool::PoolConfig;
/// let cfg = PoolConfig { prefill_bytes: 32 << 20, max_bytes: 64 << 20, ..PoolConfig::default() };
/// assert!(cfg.validate().is_ok());
/// let bad = PoolConfig { prefill_bytes: 4 << 20, ..cfg };
/// assert!(bad.validate().is_err(), "prefill must be whole chunks");
/// ```
#[derive(Clone, Debug, serde::Serialize)]
pub struct PoolConfig {
    /// Where chunk memory comes from (page size, 4 KiB fallback).
    pub memory: MemoryConfig,
    /// Bytes per chunk: the growth batch, one `DeviceView::share` (one IOMMU mapping) each.
    /// A multiple of the page size and of `max_buffer`.
    pub chunk_bytes: usize,
    /// Bytes made and shared at creation; the shrinker never goes below this floor.
    pub prefill_bytes: usize,
    /// Hard cap on shared bytes, transient chunks included.
    pub max_bytes: usize,
    /// The largest single buffer (a power of two ≥ 4 KiB, ≤ `chunk_bytes`). Larger transfers use
    /// scatter-gather.
    pub max_buffer: usize,
    /// Background growth starts when free bytes fall below this. Such an attempt grows by
    /// what brings free space back to the watermark plus the rise of allocated bytes since the
    /// grower last looked (demand rising fast is met by several chunks at once), at least one
    /// chunk.
    pub low_watermark: usize,
    /// A chunk is given back only if at least this much stays free afterwards (hysteresis: at
    /// least `low_watermark`, so a chunk given back cannot by itself push free space under the
    /// growth threshold, and a chunk grown from below it cannot by itself be given back; more
    /// widens the band where neither happens, at the price of that much more memory kept
    /// free).
    pub high_watermark: usize,
    /// A chunk must be wholly idle this long before it is given back; growth also blocks
    /// shrinking for this long.
    pub shrink_delay: Duration,
    /// The shrinker keeps capacity at least at the recent peak of allocated bytes, decaying
    /// by half every `peak_half_life`: a pool that needed 40 MiB a moment ago keeps most of
    /// it through a short lull instead of giving it back and growing again at the next burst.
    /// `Duration::ZERO` disables this (only `shrink_delay` and the watermarks apply).
    pub peak_half_life: Duration,
    /// Bytes kept for the immediate path ([`super::Pool::try_alloc`]); awaitable allocations
    /// wait rather than dip into it.
    pub reserve_bytes: usize,
    /// Let the immediate path create a one-off chunk when the pool and reserve are empty
    /// (as Linux's SWIOTLB_DYNAMIC does); it is freed as soon as it is idle.
    pub transient: bool,
    /// A waiter that has waited this long makes the grower grow now (synchronous growth;
    /// the grower also drains the per-core caches for it). It does not cut a backoff after
    /// failed growth short: an [`AtCap::Fail`] waiter this old ends with
    /// [`PoolError::GrowthFailed`] instead (see the growth-failure rule in [`crate::pool`]).
    pub grow_after: Duration,
    /// What happens at the cap when nothing is free.
    pub at_cap: AtCap,
    /// How long an [`AtCap::Wait`] request keeps waiting for released space while growth
    /// fails (no hugepages, the mapping limit, memlock): once it has waited this long and the
    /// growth attempted on its behalf failed (or the grower is still backing off from
    /// failures), it ends with [`PoolError::GrowthFailed`]. [`AtCap::Fail`] requests do not
    /// wait for this: they fail as soon as growth on their behalf fails, or after
    /// `grow_after` while the grower backs off. See the growth-failure rule in
    /// [`crate::pool`].
    pub growth_failure_wait: Duration,
    /// Whether awaitable requests ([`super::Pool::alloc`], [`super::Pool::map`]) wait at all.
    /// `false` makes them take the immediate path and fail when it fails: the classic
    /// swiotlb and SWIOTLB_DYNAMIC behaviours, kept for comparison.
    pub waiting: bool,
    /// The throttling RFC's rule, for comparison; `None` (the default) for Tidepool's own.
    pub throttle: Option<Throttle>,
    /// The waiter queue's fairness bounds.
    #[serde(skip)]
    pub fairness: FairnessConfig,
    /// Bytes each per-core cache may hold per size class.
    pub cache_bytes_per_class: usize,
    /// Pre-zeroing: the most bytes of released blocks (in the per-core caches) the grower
    /// zeroes in one pass, so that a later `FromDevice` map or `alloc` finds a block already
    /// zero and does one pass over the memory instead of two. The grower makes a pass every
    /// `prezero_interval`, only while nobody waits and the arena holds at least the low
    /// watermark plus the reserve plus the bytes it takes out (64 KiB of blocks at a time,
    /// out of their cache only while being zeroed): this budget caps the CPU time it spends
    /// (1 MiB per 5 ms is ≤ 200 MB/s, a few percent of a core). `0` disables it.
    pub prezero_bytes_per_pass: usize,
    /// How often the grower makes a pre-zeroing pass (see `prezero_bytes_per_pass`).
    pub prezero_interval: Duration,
    /// How many chunks one growth attempt makes at once (each on its own thread: faulting
    /// pages in is the kernel zeroing them, one core's memory bandwidth per thread). `0` (the
    /// default) means one per CPU this process may run on, at most [`MAX_GROWTH_THREADS`]; `1`
    /// makes them one after the other on the grower thread. An attempt of one chunk always
    /// runs on the grower thread alone.
    pub growth_threads: usize,
    /// Run the background grower/shrinker thread. Off only for deterministic tests and models,
    /// which then call [`super::Pool::maintain`] themselves.
    pub background: bool,
    /// The highest device address the device can reach (e.g. `u32::MAX` for 32-bit devices).
    /// A chunk shared above it is refused. The view (e.g. the IOVA allocator) should already
    /// keep below it; this is the pool's own check.
    pub dma_mask: u64,
    /// Wait-time histogram bound, in nanoseconds (longer waits are clamped).
    pub histogram_max_ns: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            memory: MemoryConfig::default(),
            chunk_bytes: 16 << 20,
            prefill_bytes: 16 << 20,
            max_bytes: 1 << 30,
            max_buffer: 2 << 20,
            low_watermark: 4 << 20,
            high_watermark: 24 << 20,
            shrink_delay: Duration::from_secs(5),
            peak_half_life: Duration::from_secs(5),
            reserve_bytes: 1 << 20,
            transient: true,
            grow_after: Duration::from_millis(1),
            at_cap: AtCap::Wait,
            growth_failure_wait: Duration::from_secs(1),
            waiting: true,
            throttle: None,
            fairness: FairnessConfig::default(),
            cache_bytes_per_class: 256 << 10,
            prezero_bytes_per_pass: 1 << 20,
            prezero_interval: Duration::from_millis(5),
            growth_threads: 0,
            background: true,
            dma_mask: u64::MAX,
            histogram_max_ns: 60_000_000_000,
        }
    }
}

impl PoolConfig {
    /// Checks the configuration, naming the first field that is wrong and why.
    pub fn validate(&self) -> Result<(), PoolError> {
        let bad = |field: &'static str, why: String| Err(PoolError::Config { field, why });
        let page = self.memory.page_size.bytes();
        if self.chunk_bytes == 0 || self.chunk_bytes % page != 0 {
            return bad(
                "chunk_bytes",
                format!(
                    "{} is not a non-zero multiple of the {page} B page",
                    self.chunk_bytes
                ),
            );
        }
        if !self.max_buffer.is_power_of_two() || self.max_buffer < 4096 {
            return bad(
                "max_buffer",
                format!("{} is not a power of two ≥ 4096", self.max_buffer),
            );
        }
        if self.max_buffer > self.chunk_bytes || self.chunk_bytes % self.max_buffer != 0 {
            return bad(
                "max_buffer",
                format!(
                    "{} must divide chunk_bytes {}",
                    self.max_buffer, self.chunk_bytes
                ),
            );
        }
        if self.prefill_bytes % self.chunk_bytes != 0 {
            return bad(
                "prefill_bytes",
                format!(
                    "{} is not a multiple of chunk_bytes {}",
                    self.prefill_bytes, self.chunk_bytes
                ),
            );
        }
        if self.max_bytes < self.prefill_bytes.max(self.chunk_bytes) {
            return bad(
                "max_bytes",
                format!(
                    "{} is below the prefill {} or one chunk {}",
                    self.max_bytes, self.prefill_bytes, self.chunk_bytes
                ),
            );
        }
        if self.reserve_bytes > self.max_bytes / 2 {
            return bad(
                "reserve_bytes",
                format!(
                    "{} is more than half the cap {}",
                    self.reserve_bytes, self.max_bytes
                ),
            );
        }
        if self.high_watermark < self.low_watermark {
            return bad(
                "high_watermark",
                format!(
                    "{} must be ≥ low_watermark {} so growth and shrinking cannot oscillate",
                    self.high_watermark, self.low_watermark
                ),
            );
        }
        if let Some(t) = self.throttle {
            if !(0.0 < t.low_percent && t.low_percent <= t.high_percent && t.high_percent <= 100.0)
            {
                return bad(
                    "throttle",
                    format!(
                        "need 0 < low ({}) ≤ high ({}) ≤ 100",
                        t.low_percent, t.high_percent
                    ),
                );
            }
        }
        if self.histogram_max_ns < 1000 {
            return bad("histogram_max_ns", "must be at least 1000".into());
        }
        if self.prezero_bytes_per_pass > 0 && self.prezero_interval.is_zero() {
            return bad(
                "prezero_interval",
                "must be non-zero while prezero_bytes_per_pass is (the grower would spin); \
                 set prezero_bytes_per_pass to 0 to disable pre-zeroing"
                    .into(),
            );
        }
        Ok(())
    }

    /// The size class (log2 of the block size) for a request of `len` bytes.
    #[inline]
    pub(crate) fn order_for(&self, len: usize) -> u32 {
        len.max(MIN_BUFFER).next_power_of_two().trailing_zeros()
    }

    /// log2 of [`MIN_BUFFER`].
    pub(crate) const fn min_order() -> u32 {
        MIN_BUFFER.trailing_zeros()
    }

    /// The threads a growth attempt of `chunks` chunks uses: `growth_threads` (or the CPUs
    /// this process may use, when 0), at most [`MAX_GROWTH_THREADS`] and `chunks`, at least 1.
    pub fn growth_workers(&self, chunks: u64) -> usize {
        let threads = match self.growth_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let chunks = usize::try_from(chunks).unwrap_or(usize::MAX);
        threads.min(MAX_GROWTH_THREADS).min(chunks).max(1)
    }

    /// log2 of `max_buffer`.
    pub(crate) fn max_order(&self) -> u32 {
        self.max_buffer.trailing_zeros()
    }
}
