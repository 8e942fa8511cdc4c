//! Growth speed: how soon capacity is usable after the pool runs short, per view, page size
//! and chunk size.
//!
//! Two measurements, each repeated `rounds` times on a fresh pool (all rounds and the median
//! are reported):
//! 1. **Crossing → capacity**: a pool of one chunk (low watermark half a chunk, no reserve, no
//!    transient chunks) is filled with `try_alloc` until free bytes fall below the low
//!    watermark; the clock starts right after that allocation and stops when
//!    `stats().capacity_bytes` first shows the new chunk (polled in a spin loop). This is the
//!    grower's wake-up + making the chunk (memfd, fault-in, lock) + sharing it with the view
//!    (`Identity`: nothing; `vhost-user`: ADD_MEM_REG and the backend's mmap and ack).
//! 2. **Burst**: one chunk plus `burst_bytes` of awaitable 128 KiB allocations are asked for
//!    at once from a one-chunk pool; the clock stops when the last is served. New capacity / time is the
//!    rate at which the pool can absorb a sudden rise of waiting bytes, end to end (the
//!    grower sizes each attempt by all waiting bytes and makes its chunks `growth_threads` at
//!    a time; the tasks' wake-ups and polls on the 2-worker runtime are in the time too).
//! 3. **Batch**: the same waiters queued on a pool without a background grower, then one
//!    [`Pool::maintain`] step timed: the grower's own rate (memfd, fault-in, share, arena,
//!    hand-over to the waiters), one attempt of `burst_bytes / chunk` chunks, without the
//!    scheduling of the burst's tasks.
//!
//! Each measurement runs for every `growth_threads` setting asked for (e.g. 1 = one chunk at a
//! time, 0 = one thread per CPU), the settings alternating A B B A … round by round, so that
//! the host's load drifts over both alike.
//!
//! VFIO's map (`VFIO_IOMMU_MAP_DMA`, or IOMMUFD's `IOAS_MAP`) is not in these numbers: it needs a
//! device, i.e. the VM (`tools/vm`); the vhost-user rows include the real ADD_MEM_REG round trip.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Pool, PoolConfig};
use tidepool::share::identity::Identity;
use tidepool::share::DeviceView;

/// One (view, page, chunk, growth threads) combination's results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GrowthRow {
    /// `identity` or `vhost-user`.
    pub view: String,
    /// `4K`, `2M`, `1G`.
    pub page: String,
    /// Chunk size, bytes.
    pub chunk_bytes: u64,
    /// `PoolConfig::growth_threads` (0 = one per CPU).
    pub growth_threads: usize,
    /// The threads an attempt of many chunks used (`growth_threads`, or the CPUs for 0).
    pub threads_used: usize,
    /// Crossing → capacity, ms, one per round.
    pub crossing_ms: Vec<f64>,
    /// Burst size asked for, bytes.
    pub burst_bytes: u64,
    /// Burst: time until the last allocation was served, ms, one per round.
    pub burst_ms: Vec<f64>,
    /// Burst: new capacity per second, GB/s (10^9 B/s), one per round.
    pub burst_gbps: Vec<f64>,
    /// Batch: one grower step's new capacity per second, GB/s, one per round.
    pub batch_gbps: Vec<f64>,
    /// Batch: chunks that step made, one per round.
    pub batch_chunks: Vec<u64>,
    /// Why the combination could not be measured, if it could not.
    pub error: Option<String>,
}

/// The median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn page_name(p: PageSize) -> &'static str {
    match p {
        PageSize::Small4K => "4K",
        PageSize::Huge2M => "2M",
        PageSize::Huge1G => "1G",
    }
}

/// The pool measured: one chunk, growth by the background grower only, `threads` growth
/// threads.
fn config(page: PageSize, chunk: usize, max: usize, threads: usize) -> PoolConfig {
    let max_buffer = chunk.clamp(4096, 128 << 10);
    PoolConfig {
        memory: MemoryConfig {
            page_size: page,
            allow_small_pages: false,
        },
        chunk_bytes: chunk,
        prefill_bytes: chunk,
        max_bytes: max,
        max_buffer,
        low_watermark: chunk / 2,
        high_watermark: chunk / 2 + chunk,
        shrink_delay: Duration::from_secs(600),
        reserve_bytes: 0,
        transient: false,
        // No per-CPU caches: what the lab counts as allocated is what the grower sees, so the
        // crossing is timed from the allocation that made it.
        cache_bytes_per_class: 0,
        growth_threads: threads,
        ..PoolConfig::default()
    }
}

/// Measurement 1 of the module doc, once.
fn crossing(view: Arc<dyn DeviceView>, cfg: PoolConfig) -> Result<Duration, String> {
    let low = cfg.low_watermark as u64;
    let unit = cfg.max_buffer;
    let pool = Pool::new(view, cfg).map_err(|e| e.to_string())?;
    let before = pool.stats().capacity_bytes;
    let mut held = Vec::new();
    let mut allocated = 0u64;
    // The clock starts right after the allocation that crossed (a fast grower may have grown
    // before the first look at the stats: the time is then up to that look).
    let t0 = loop {
        held.push(pool.try_alloc(unit).map_err(|e| e.to_string())?);
        let at = Instant::now();
        allocated += unit as u64;
        if before - allocated < low {
            break at;
        }
    };
    while pool.stats().capacity_bytes <= before {
        if t0.elapsed() > Duration::from_secs(20) {
            return Err(format!(
                "no growth within 20 s: {:?}",
                pool.stats().last_growth_error
            ));
        }
        std::hint::spin_loop();
    }
    let took = t0.elapsed();
    drop(held);
    Ok(took)
}

/// Measurement 2 of the module doc, once: (time, new capacity bytes).
fn burst(
    view: Arc<dyn DeviceView>,
    cfg: PoolConfig,
    bytes: u64,
    rt: &tokio::runtime::Runtime,
) -> Result<(Duration, u64), String> {
    let unit = cfg.max_buffer;
    let pool = Pool::new(view, cfg).map_err(|e| e.to_string())?;
    let before = pool.stats().capacity_bytes;
    // The prefill and then `bytes` more: all of `bytes` must be grown.
    let n = (before as usize + bytes as usize).div_ceil(unit);
    let (took, held) = rt.block_on(async {
        let t0 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let p = pool.clone();
            tasks.spawn(async move { p.alloc_timeout(unit, Duration::from_secs(30)).await });
        }
        let mut held = Vec::with_capacity(n);
        while let Some(r) = tasks.join_next().await {
            held.push(r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?);
        }
        Ok::<_, String>((t0.elapsed(), held))
    })?;
    let grown = pool.stats().capacity_bytes - before;
    drop(held);
    Ok((took, grown))
}

/// Measurement 3 of the module doc, once: (time of the grower's step, new capacity bytes,
/// chunks made).
fn batch(
    view: Arc<dyn DeviceView>,
    cfg: PoolConfig,
    bytes: u64,
    rt: &tokio::runtime::Runtime,
) -> Result<(Duration, u64, u64), String> {
    let unit = cfg.max_buffer;
    let cfg = PoolConfig {
        background: false,
        ..cfg
    };
    let pool = Pool::new(view, cfg).map_err(|e| e.to_string())?;
    let before = pool.stats().capacity_bytes;
    // The prefill first (taken at once), then `bytes` of waiters.
    let prefill: Vec<_> = (0..before as usize / unit)
        .map(|_| pool.try_alloc(unit))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let n = (bytes as usize).div_ceil(unit);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let p = pool.clone();
        tasks.spawn_on(
            async move { p.alloc_timeout(unit, Duration::from_secs(30)).await },
            rt.handle(),
        );
    }
    let queued = Instant::now();
    while pool.stats().waiters < n as u64 {
        if queued.elapsed() > Duration::from_secs(20) {
            return Err(format!(
                "only {} of {n} waiters queued",
                pool.stats().waiters
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let t0 = Instant::now();
    let step = pool.maintain();
    let took = t0.elapsed();
    let grown = pool.stats().capacity_bytes - before;
    let held = rt.block_on(async {
        let mut held = Vec::with_capacity(n);
        while let Some(r) = tasks.join_next().await {
            held.push(r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?);
        }
        Ok::<_, String>(held)
    })?;
    drop((held, prefill));
    Ok((took, grown, step.grew as u64))
}

/// Measures one (view, page, chunk) combination under each of `threads` (growth threads
/// settings, alternating ABBA round by round); `make_view` makes a fresh view per pool. One
/// row per setting, in the order given.
pub fn measure(
    view_name: &str,
    make_view: &mut dyn FnMut() -> Result<Arc<dyn DeviceView>, String>,
    page: PageSize,
    chunk: usize,
    burst_bytes: u64,
    rounds: usize,
    threads: &[usize],
) -> Vec<GrowthRow> {
    let mut rows: Vec<GrowthRow> = threads
        .iter()
        .map(|&t| GrowthRow {
            view: view_name.into(),
            page: page_name(page).into(),
            chunk_bytes: chunk as u64,
            growth_threads: t,
            threads_used: config(page, chunk, chunk, t).growth_workers(u64::MAX),
            crossing_ms: Vec::new(),
            burst_bytes,
            burst_ms: Vec::new(),
            burst_gbps: Vec::new(),
            batch_gbps: Vec::new(),
            batch_chunks: Vec::new(),
            error: None,
        })
        .collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            for row in &mut rows {
                row.error = Some(e.to_string());
            }
            return rows;
        }
    };
    let max = chunk * 3 + burst_bytes as usize;
    for round in 0..rounds {
        // A B, then B A: each setting runs first as often as second.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..rows.len()).collect()
        } else {
            (0..rows.len()).rev().collect()
        };
        for i in order {
            let row = &mut rows[i];
            if row.error.is_some() {
                continue;
            }
            let cfg = config(page, chunk, max, row.growth_threads);
            let r = make_view()
                .and_then(|v| crossing(v, cfg.clone()))
                .and_then(|d| {
                    row.crossing_ms.push(d.as_secs_f64() * 1e3);
                    make_view().and_then(|v| burst(v, cfg.clone(), burst_bytes, &rt))
                })
                .and_then(|(d, grown)| {
                    row.burst_ms.push(d.as_secs_f64() * 1e3);
                    row.burst_gbps.push(grown as f64 / d.as_secs_f64() / 1e9);
                    make_view().and_then(|v| batch(v, cfg.clone(), burst_bytes, &rt))
                });
            match r {
                Ok((d, grown, chunks)) => {
                    row.batch_gbps.push(grown as f64 / d.as_secs_f64() / 1e9);
                    row.batch_chunks.push(chunks);
                }
                Err(e) => row.error = Some(e),
            }
        }
    }
    rows
}

/// The identity view's maker.
pub fn identity_view() -> Result<Arc<dyn DeviceView>, String> {
    Ok(Arc::new(Identity::new()))
}

/// The rows as a markdown table.
pub fn markdown(rows: &[GrowthRow], command: &str) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "Command: `{command}`  \nMedians, every round in brackets. Burst: awaitable allocations \
         of the burst size asked for at once from a one-chunk pool, until the last is served. \
         Batch: the same waiters queued, then one grower step timed. Growth threads: \
         `PoolConfig::growth_threads` (0 = one per CPU; threads used in brackets).\n\n\
         | view | page | chunk | growth threads | low-watermark crossing → new chunk usable, ms | burst | burst served in, ms | burst: new capacity GB/s | batch: grower step GB/s |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    );
    let list = |v: &[f64], digits: usize| {
        v.iter()
            .map(|x| format!("{x:.digits$}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for r in rows {
        if let Some(e) = &r.error {
            let _ = writeln!(
                s,
                "| {} | {} | {} MiB | {} ({}) | not measured: {e} | | | | |",
                r.view,
                r.page,
                r.chunk_bytes >> 20,
                r.growth_threads,
                r.threads_used
            );
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} MiB | {} ({}) | {:.2} [{}] | {} MiB | {:.1} [{}] | {:.2} [{}] | {:.2} [{}] |",
            r.view,
            r.page,
            r.chunk_bytes >> 20,
            r.growth_threads,
            r.threads_used,
            median(&r.crossing_ms),
            list(&r.crossing_ms, 2),
            r.burst_bytes >> 20,
            median(&r.burst_ms),
            list(&r.burst_ms, 1),
            median(&r.burst_gbps),
            list(&r.burst_gbps, 2),
            median(&r.batch_gbps),
            list(&r.batch_gbps, 2)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        for chunk in [2 << 20, 8 << 20, 32 << 20] {
            config(PageSize::Huge2M, chunk, chunk * 8, 0)
                .validate()
                .unwrap();
            config(PageSize::Small4K, chunk, chunk * 8, 1)
                .validate()
                .unwrap();
        }
    }
}
