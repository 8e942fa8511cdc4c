//! Running one trace against one real pool: the request tasks, the device model and the
//! memory sampler.
//!
//! For each request, at its arrival time the clock ([`crate::device`]) spawns a task on a
//! tokio multi-thread runtime (2 workers). The task
//! 1. takes a slot of its device (a FIFO semaphore of the device's queue depth), as a block
//!    layer takes a tag before it maps;
//! 2. maps a private buffer of the request's size: `pool.map(..).await` if the request may
//!    wait, `pool.try_map(..)` if not, timing the call;
//! 3. hands the mapping's hold to the device model and awaits its completion;
//! 4. unmaps (copying out for reads) and records the outcome.
//!
//! A sampler thread reads `pool.stats()` every `sample_every` (1 ms by default) for the
//! memory-over-time series. The pool is the real `tidepool::pool::Pool` on the
//! `Identity` view: real memfd chunks (4 KiB locked pages, or hugepages), real copies.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tidepool::pool::{Direction, Pool, PoolConfig, PoolError, PoolStats, UserBuf};
use tidepool::share::identity::Identity;
use tokio::sync::Semaphore;

use crate::device::{run_clock, ClockReport, Hold};
use crate::trace::{Request, Trace};

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Memory sampling period.
    pub sample_every: Duration,
    /// Stop releasing arrivals at the first failed map (the static search's probes).
    pub stop_on_failure: bool,
    /// tokio worker threads.
    pub workers: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            sample_every: Duration::from_millis(1),
            stop_on_failure: false,
            workers: 2,
        }
    }
}

/// One memory sample.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Sample {
    /// µs since the run started.
    pub t_us: u64,
    /// `PoolStats::capacity_bytes`: memory the pool holds.
    pub capacity_bytes: u64,
    /// `PoolStats::in_use_bytes`: bytes mapped.
    pub in_use_bytes: u64,
    /// `PoolStats::waiters`: requests waiting for capacity.
    pub waiters: u64,
}

/// How a request's map ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum MapResult {
    /// Mapped, held and unmapped; completed at this many µs after the start.
    Completed {
        /// Completion time, µs from the start.
        done_us: u64,
    },
    /// The map failed (the pool was exhausted or at its cap).
    Failed,
}

/// What happened to one request.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Index into the trace's requests.
    pub index: usize,
    /// Time the map call took (including any wait), ns.
    pub map_ns: u64,
    /// How it ended.
    pub result: MapResult,
}

/// Everything a run produced.
#[derive(Debug)]
pub struct RunResult {
    /// The pool's configuration.
    pub config: PoolConfig,
    /// Memory samples, in time order; the first at t = 0 and the last after every request
    /// ended.
    pub samples: Vec<Sample>,
    /// One per released request, in no particular order.
    pub outcomes: Vec<Outcome>,
    /// The pool's stats after the run.
    pub stats: PoolStats,
    /// µs from start to the last request's end.
    pub elapsed_us: u64,
    /// Whether the run stopped early (a failure with `stop_on_failure`).
    pub stopped_early: bool,
    /// The device model's self-measurement.
    pub clock: ClockReport,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The pool could not be made (memory, limits, bad config).
    #[error("making the pool failed: {0}")]
    Pool(#[from] PoolError),
    /// The tokio runtime could not be started.
    #[error("starting the tokio runtime failed: {0}")]
    Runtime(std::io::Error),
}

/// What the request tasks share.
struct Shared {
    pool: Pool,
    start: Instant,
    slots: Vec<Option<Arc<Semaphore>>>,
    outcomes: Mutex<Vec<Outcome>>,
    failed: Arc<AtomicBool>,
    stop_on_failure: bool,
    live: AtomicUsize,
}

/// Runs `trace` against a fresh pool made with `config` (see the module doc). Blocks until
/// every released request has ended.
pub fn run(trace: &Trace, config: PoolConfig, opts: &RunOptions) -> Result<RunResult, RunError> {
    let pool = Pool::new(Arc::new(Identity::new()), config.clone())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.workers.max(1))
        .thread_name("tplab-worker")
        .build()
        .map_err(RunError::Runtime)?;
    let start = Instant::now();
    let failed = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        pool: pool.clone(),
        start,
        slots: trace
            .devices
            .iter()
            .map(|d| d.queue_depth.map(|q| Arc::new(Semaphore::new(q))))
            .collect(),
        outcomes: Mutex::new(Vec::with_capacity(trace.requests.len())),
        failed: failed.clone(),
        stop_on_failure: opts.stop_on_failure,
        live: AtomicUsize::new(0),
    });

    let sampling = Arc::new(AtomicBool::new(true));
    // The t = 0 sample is taken here, before any request is released: the sampler thread may
    // start late on a loaded host, after the pool has already grown.
    let first = sample(&pool, start);
    let sampler = {
        let (pool, sampling, every) = (pool.clone(), sampling.clone(), opts.sample_every);
        std::thread::Builder::new()
            .name("tplab-sampler".into())
            .spawn(move || sample_loop(&pool, start, first, every, &sampling))
            .expect("spawning the sampler thread")
    };

    let arrivals: Vec<u64> = trace.requests.iter().map(|r| r.time_us).collect();
    let (hold_tx, hold_rx) = mpsc::channel::<Hold>();
    let handle = rt.handle().clone();
    let release = {
        let shared = shared.clone();
        let requests = trace.requests.clone();
        move |i: usize| {
            shared.live.fetch_add(1, Ordering::SeqCst);
            let req = requests[i].clone();
            let (shared, tx) = (shared.clone(), hold_tx.clone());
            handle.spawn(serve(shared, i, req, tx));
        }
    };
    let clock = run_clock(start, &arrivals, release, hold_rx, failed.clone());
    // Every hold sender is gone, so every task has at least finished its hold; wait for the
    // last ones to record their outcome.
    while shared.live.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed_us = start.elapsed().as_micros() as u64;
    sampling.store(false, Ordering::SeqCst);
    let mut samples = sampler.join().expect("sampler thread panicked");
    let stats = pool.stats();
    samples.push(Sample {
        t_us: start.elapsed().as_micros() as u64,
        capacity_bytes: stats.capacity_bytes,
        in_use_bytes: stats.in_use_bytes,
        waiters: stats.waiters,
    });
    drop(rt);
    let outcomes = std::mem::take(&mut *shared.outcomes.lock().expect("outcomes lock"));
    Ok(RunResult {
        config,
        samples,
        outcomes,
        stats,
        elapsed_us,
        stopped_early: failed.load(Ordering::SeqCst) && opts.stop_on_failure,
        clock,
    })
}

/// One request's task (see the module doc). Records its outcome, then leaves `live`.
async fn serve(shared: Arc<Shared>, index: usize, req: Request, hold_tx: mpsc::Sender<Hold>) {
    let permit = match &shared.slots[req.device] {
        Some(s) => s.clone().acquire_owned().await.ok(),
        None => None,
    };
    let mut data = vec![0u8; req.size];
    let user = if req.direction == Direction::ToDevice {
        UserBuf::Shared(&data[..])
    } else {
        UserBuf::Exclusive(&mut data[..])
    };
    let t0 = Instant::now();
    let mapped = if req.may_wait {
        shared.pool.map(user, req.direction).await
    } else {
        shared.pool.try_map(user, req.direction)
    };
    let map_ns = t0.elapsed().as_nanos() as u64;
    let result = match mapped {
        Ok(mapping) => {
            let (done, wait) = tokio::sync::oneshot::channel();
            let until = Instant::now() + Duration::from_micros(req.hold_us);
            if hold_tx.send(Hold { until, done }).is_ok() {
                let _ = wait.await;
            }
            mapping.unmap();
            MapResult::Completed {
                done_us: shared.start.elapsed().as_micros() as u64,
            }
        }
        Err(_) => {
            if shared.stop_on_failure {
                shared.failed.store(true, Ordering::SeqCst);
            }
            MapResult::Failed
        }
    };
    drop(permit);
    drop(hold_tx);
    shared
        .outcomes
        .lock()
        .expect("outcomes lock")
        .push(Outcome {
            index,
            map_ns,
            result,
        });
    shared.live.fetch_sub(1, Ordering::SeqCst);
}

/// The pool's memory now, timed from `start`.
pub(crate) fn sample(pool: &Pool, start: Instant) -> Sample {
    let s = pool.stats();
    Sample {
        t_us: start.elapsed().as_micros() as u64,
        capacity_bytes: s.capacity_bytes,
        in_use_bytes: s.in_use_bytes,
        waiters: s.waiters,
    }
}

/// Samples the pool's memory every `every` after `first` until `running` is cleared.
pub(crate) fn sample_loop(
    pool: &Pool,
    start: Instant,
    first: Sample,
    every: Duration,
    running: &AtomicBool,
) -> Vec<Sample> {
    let mut out = vec![first];
    let mut next = start;
    while running.load(Ordering::SeqCst) {
        next += every;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
        out.push(sample(pool, start));
    }
    out
}
