//! Replaying a trace through a real block device: the request loop both real-device replays
//! share ([`crate::vhost`]: vhost-user-blk against `qemu-storage-daemon`; [`crate::nvme`]: the
//! NVMe driver on a VFIO controller).
//!
//! For each request, at its arrival time (tokio's timer: ≤ 1 ms late, measured as the arrival
//! lag), a task takes a slot of its trace device (the trace's queue depth), then reads or
//! writes a private buffer of the request's size (rounded up to the device's block) at an
//! offset that walks the device. The device's call allocates from the pool (awaiting capacity,
//! or failing at once when the policy does not wait), copies, submits, awaits the completion
//! and copies out. A sampler thread records the pool's capacity, bytes in use and waiters every
//! millisecond. What differs from the model ([`crate::run`]):
//! - **latency** is the whole I/O (pool wait + queueing + the device's service), not the map
//!   call alone; the pool's own wait histogram is in the "pool waits" column;
//! - **holds** are the device's real service times, not the trace's `hold_us`;
//! - the block APIs always await: a trace's `may_wait = false` requests await as well.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidepool::pool::{Direction, Pool, PoolConfig};
use tokio::sync::Semaphore;

use crate::device::ClockReport;
use crate::run::{sample, sample_loop, MapResult, Outcome, RunResult};
use crate::trace::Trace;

/// A block device a trace is replayed through. Errors are reported as text: the replay only
/// counts them as failed requests.
pub trait BlockTarget: Send + Sync + 'static {
    /// Bytes the device can be addressed over (the replay walks `0..span` less a margin).
    fn span_bytes(&self) -> u64;
    /// The device's block: request sizes are rounded up to it, offsets aligned to it.
    fn block_bytes(&self) -> usize;
    /// Reads `buf.len()` bytes at byte `offset` into `buf` (through the pool).
    fn read_at(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Writes `buf` at byte `offset` (through the pool).
    fn write_at(&self, offset: u64, buf: &[u8]) -> impl Future<Output = Result<(), String>> + Send;
}

/// Replays `trace` through `dev`, whose data moves through `pool` (made with `config`), on the
/// current tokio runtime (see the module doc). `stop_on_failure` stops releasing arrivals at
/// the first failed I/O (the static search's probes). The caller shuts the device down
/// afterwards and may then read the pool's final stats.
pub async fn replay_requests<D: BlockTarget>(
    trace: &Trace,
    config: PoolConfig,
    pool: &Pool,
    dev: Arc<D>,
    stop_on_failure: bool,
) -> Result<RunResult, String> {
    let start = Instant::now();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (pool, sampling) = (pool.clone(), sampling.clone());
        let first = sample(&pool, start);
        std::thread::Builder::new()
            .name("tplab-sampler".into())
            .spawn(move || sample_loop(&pool, start, first, Duration::from_millis(1), &sampling))
            .map_err(|e| e.to_string())?
    };
    let slots: Vec<Option<Arc<Semaphore>>> = trace
        .devices
        .iter()
        .map(|d| d.queue_depth.map(|q| Arc::new(Semaphore::new(q))))
        .collect();
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(trace.requests.len())));
    let failed = Arc::new(AtomicBool::new(false));
    let block = dev.block_bytes().max(1);
    let span = dev.span_bytes().saturating_sub(4 << 20).max(1 << 20);
    let mut lags = Vec::with_capacity(trace.requests.len());
    let mut tasks = tokio::task::JoinSet::new();
    let mut offset = 0u64;
    for (index, req) in trace.requests.iter().enumerate() {
        if stop_on_failure && failed.load(Ordering::SeqCst) {
            break;
        }
        let due = start + Duration::from_micros(req.time_us);
        tokio::time::sleep_until(due.into()).await;
        lags.push(Instant::now().saturating_duration_since(due).as_micros() as u64);
        let len = req.size.div_ceil(block) * block;
        if offset + len as u64 > span {
            offset = 0;
        }
        let at = offset;
        offset = (offset + len as u64).next_multiple_of(4096);
        let (dev, slot, outcomes, failed) = (
            dev.clone(),
            slots[req.device].clone(),
            outcomes.clone(),
            failed.clone(),
        );
        let direction = req.direction;
        tasks.spawn(async move {
            let _permit = match slot {
                Some(s) => s.acquire_owned().await.ok(),
                None => None,
            };
            let t0 = Instant::now();
            let r = if direction == Direction::FromDevice {
                let mut buf = vec![0u8; len];
                dev.read_at(at, &mut buf).await
            } else {
                let buf = vec![0x5au8; len];
                dev.write_at(at, &buf).await
            };
            let map_ns = t0.elapsed().as_nanos() as u64;
            let result = match r {
                Ok(()) => MapResult::Completed {
                    done_us: start.elapsed().as_micros() as u64,
                },
                Err(_) => {
                    failed.store(true, Ordering::SeqCst);
                    MapResult::Failed
                }
            };
            outcomes.lock().expect("outcomes lock").push(Outcome {
                index,
                map_ns,
                result,
            });
        });
    }
    let released = lags.len();
    while tasks.join_next().await.is_some() {}
    let elapsed_us = start.elapsed().as_micros() as u64;
    sampling.store(false, Ordering::SeqCst);
    let mut samples = sampler.join().map_err(|_| "the sampler panicked")?;
    samples.push(sample(pool, start));
    lags.sort_unstable();
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes lock"));
    Ok(RunResult {
        config,
        samples,
        outcomes,
        stats: pool.stats(),
        elapsed_us,
        stopped_early: stop_on_failure && failed.load(Ordering::SeqCst),
        clock: ClockReport {
            arrival_lag_us: lags,
            released,
        },
    })
}
