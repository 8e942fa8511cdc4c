//! Running jobs: preparing each clone's engine and workload, the per-thread submission/completion
//! loop, the verify read-back phase, and the optional live progress line.
//!
//! Everything that can fail because of the input (missing file, file too small, block size not a
//! multiple of the device's logical block size) fails in [`prepare_jobs`], before any I/O and
//! before any output, so bad input never produces a partial report.
//!
//! Each clone (`numjobs`) runs [`run_clone`] on its own thread with its own engine. The loop keeps
//! `iodepth` slots busy: it queues requests into every free slot, committing as the engine's
//! [`Batching`](crate::engine::Batching) says (every request for io_uring, as fio; the whole
//! round for the others), then reaps at least one completion and takes as many as the batching
//! allows before refilling. Timestamps (one clock read per round, per commit and per reap, none
//! per request): `queued` is the latest of these reads before the request was prepared, `issued`
//! the end of its commit, `done` the end of the reap that returned it. fio's names follow: slat
//! = issued - queued, clat = done - issued, lat = done - queued. I/Os queued during `ramp_time` are not
//! counted, and a direction's runtime starts when the ramp ends.
//!
//! Jobs run together, as in fio, unless ordered: `stonewall` makes a job wait for every job above
//! it, `wait_for=NAME` for the named one; `startdelay` then delays its start. Reporting groups
//! (`groupid`) start at 0 and advance at each job with `stonewall` or `new_group`.
//!
//! Rate limits (`rate`, `rate_iops`) hold each clone's direction to its cap on average since the
//! clone started: an I/O is queued only once the bytes and I/Os already issued in its direction
//! fit the cap at the present moment. `write_iolog` records every issued I/O in fio's iolog v2
//! text format; `read_iolog` replays one (v2 or v3; v3 timestamps are ignored).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::engine::{open_engine, target_label, Engine, EngineError, IoDirection, IoRequest};
use crate::options::{BlockSizes, JobSpec, OutputFormat, RwMode, VerifyKind};
use crate::stats::DirectionStats;
use crate::verify::{check_block, fill_block, generation, Mismatch};
use crate::workload::{Layout, PlannedIo, SplitMix64, Workload, WorkloadError};

/// The most mismatches kept with their details (all are counted).
pub const MAX_REPORTED_MISMATCHES: usize = 100;

/// fio's `error` value for verify failures (EILSEQ).
pub const VERIFY_ERRNO: i32 = libc::EILSEQ;

/// A job could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The engine could not open or size the target.
    #[error("job {job}: {source}")]
    Engine {
        /// Job name.
        job: String,
        /// Why.
        source: EngineError,
    },
    /// The job does not fit the target's geometry.
    #[error("job {job}: {message}")]
    Geometry {
        /// Job name.
        job: String,
        /// What is wrong and what to change.
        message: String,
    },
    /// An iolog to replay could not be read or understood.
    #[error("job {job}: read_iolog {path}: {message}")]
    Iolog {
        /// Job name.
        job: String,
        /// The log.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// `wait_for` names no earlier job.
    #[error("job {job}: wait_for={target} names no job above it")]
    WaitFor {
        /// Job name.
        job: String,
        /// The missing name.
        target: String,
    },
    /// The workload could not be laid out.
    #[error("job {job}: {source}")]
    Workload {
        /// Job name.
        job: String,
        /// Why.
        source: WorkloadError,
    },
}

/// One clone ready to run: its engine is open and its workload laid out.
pub struct PreparedClone {
    /// The job.
    pub spec: JobSpec,
    /// Clone index within the job (0-based).
    pub clone: u32,
    /// Its open engine.
    pub engine: Box<dyn Engine>,
    /// Its I/O stream.
    pub workload: Workload,
    /// The region size actually used (after defaulting to the target's size).
    pub region_size: u64,
}

/// Verification results of one clone.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyOutcome {
    /// Blocks read and checked.
    pub checked: u64,
    /// Blocks that failed.
    pub mismatches: u64,
    /// The first [`MAX_REPORTED_MISMATCHES`] failures.
    pub bad_blocks: Vec<Mismatch>,
}

/// What one clone did.
#[derive(Debug, Clone)]
pub struct CloneResult {
    /// The job.
    pub spec: JobSpec,
    /// Clone index.
    pub clone: u32,
    /// Engine name.
    pub engine: &'static str,
    /// fio's `error`: 0, the errno of a failed I/O, or EILSEQ for verify mismatches.
    pub error: i32,
    /// A description of the first error.
    pub error_message: Option<String>,
    /// Read counters (including the verify phase's reads).
    pub read: DirectionStats,
    /// Write counters.
    pub write: DirectionStats,
    /// Time reads were measured over.
    pub read_runtime: Duration,
    /// Time writes were measured over.
    pub write_runtime: Duration,
    /// Wall time of the whole clone, ramp included.
    pub elapsed: Duration,
    /// User CPU time of the clone's thread.
    pub user_cpu: Duration,
    /// System CPU time of the clone's thread.
    pub system_cpu: Duration,
    /// Verify results (zero when not verifying).
    pub verify: VerifyOutcome,
    /// The engine's own statistics, for the `tidepool` JSON object.
    pub engine_stats: Option<serde_json::Value>,
    /// Index of the job (section) in the run.
    pub job_index: usize,
    /// fio's reporting group.
    pub groupid: u32,
    /// Wall-clock time the clone started its I/O (after waits and startdelay).
    pub started_at: SystemTime,
    /// I/Os issued per queue depth at issue time: index `i` counts batches found with depth in
    /// fio's bucket `i` (1, 2, 4, 8, 16, 32, >=64).
    pub depth_buckets: [u64; 7],
    /// I/Os submitted per batch, by fio's buckets (0, 1-4, 5-8, 9-16, 17-32, 33-64, >64).
    pub submit_buckets: [u64; 7],
    /// I/Os completed per reap, same buckets as `submit_buckets`.
    pub complete_buckets: [u64; 7],
    /// Voluntary plus involuntary context switches of the clone's thread.
    pub ctx: u64,
    /// Major and minor page faults of the clone's thread.
    pub faults: (u64, u64),
}

/// Live counters a progress line reads.
#[derive(Debug, Default)]
pub struct Progress {
    /// Completed read I/Os.
    pub read_ios: AtomicU64,
    /// Completed write I/Os.
    pub write_ios: AtomicU64,
    /// Completed bytes.
    pub bytes: AtomicU64,
    /// Completed read bytes.
    pub read_bytes: AtomicU64,
    /// Completed write bytes.
    pub write_bytes: AtomicU64,
    /// Clones running now.
    pub running: AtomicU64,
}

/// Opens an engine per clone of every job, checks geometry and lays out workloads.
pub fn prepare_jobs(specs: &[JobSpec]) -> Result<Vec<Vec<PreparedClone>>, PrepareError> {
    for (index, spec) in specs.iter().enumerate() {
        if let Some(target) = &spec.wait_for {
            if !specs[..index].iter().any(|earlier| &earlier.name == target) {
                return Err(PrepareError::WaitFor {
                    job: spec.name.clone(),
                    target: target.clone(),
                });
            }
        }
    }
    specs.iter().map(prepare_job).collect()
}

/// Parses a fio iolog (version 2 or 3) into I/Os. File actions (`add`, `open`, `close`) and
/// `sync`/`datasync` are skipped; `trim` and `wait` are refused.
pub fn parse_iolog(text: &str) -> Result<Vec<PlannedIo>, String> {
    let mut lines = text.lines().enumerate();
    let version = match lines.next().map(|(_, line)| line.trim()) {
        Some("fio version 2 iolog") => 2,
        Some("fio version 3 iolog") => 3,
        other => {
            return Err(format!(
                "first line {:?} is not `fio version 2 iolog` or `fio version 3 iolog`",
                other.unwrap_or("")
            ))
        }
    };
    let mut ios = Vec::new();
    for (index, line) in lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        let words = if version == 3 && !words.is_empty() {
            &words[1..]
        } else {
            &words[..]
        };
        let bad = || format!("line {}: cannot parse `{}`", index + 1, line.trim());
        match words {
            [] => continue,
            [_, "add" | "open" | "close"] | [_, "sync" | "datasync", ..] => continue,
            [_, action @ ("read" | "write"), offset, len] => {
                let offset: u64 = offset.parse().map_err(|_| bad())?;
                let len: u32 = len.parse().map_err(|_| bad())?;
                ios.push(PlannedIo {
                    direction: if *action == "read" {
                        IoDirection::Read
                    } else {
                        IoDirection::Write
                    },
                    offset,
                    len,
                    pass: 0,
                });
            }
            [_, action, ..] => {
                return Err(format!(
                    "line {}: action `{action}` is not supported (read, write, sync are)",
                    index + 1
                ))
            }
            _ => return Err(bad()),
        }
    }
    if ios.is_empty() {
        return Err("no read or write in the log".into());
    }
    Ok(ios)
}

/// Prepares every clone of one job.
fn prepare_job(spec: &JobSpec) -> Result<Vec<PreparedClone>, PrepareError> {
    let log = match &spec.read_iolog {
        Some(path) => {
            let iolog_error = |message: String| PrepareError::Iolog {
                job: spec.name.clone(),
                path: path.display().to_string(),
                message,
            };
            let text = std::fs::read_to_string(path).map_err(|e| iolog_error(e.to_string()))?;
            Some(parse_iolog(&text).map_err(iolog_error)?)
        }
        None => None,
    };
    (0..spec.numjobs)
        .map(|clone| {
            let mut spec = spec.clone();
            spec.offset += u64::from(clone) * spec.offset_increment;
            if log
                .as_ref()
                .is_some_and(|ios| ios.iter().any(|io| io.direction == IoDirection::Write))
                && !spec.writes()
            {
                // The log writes: open the target for writing (the log, not rw, decides).
                spec.rw = crate::options::RwMode::Rw;
            }
            let job = spec.name.clone();
            let engine = open_engine(&spec).map_err(|source| PrepareError::Engine {
                job: job.clone(),
                source,
            })?;
            let geometry = engine.geometry();
            let lba = u64::from(geometry.logical_block_size);
            let geometry_error = |message: String| PrepareError::Geometry {
                job: job.clone(),
                message,
            };
            for (what, value) in [
                ("bs (or bsrange/bssplit minimum)", spec.block_sizes.min()),
                ("bs (or bsrange/bssplit maximum)", spec.block_sizes.max()),
                ("offset", spec.offset),
            ] {
                if value % lba != 0 {
                    return Err(geometry_error(format!(
                        "{what}={value} is not a multiple of the logical block size {lba} of {}",
                        target_label(&spec)
                    )));
                }
            }
            let rest = geometry
                .capacity
                .checked_sub(spec.offset)
                .filter(|size| *size > 0)
                .ok_or_else(|| {
                    geometry_error(format!(
                        "offset={} is at or past the end of {} ({} bytes)",
                        spec.offset,
                        target_label(&spec),
                        geometry.capacity
                    ))
                });
            let region_size = match (spec.size, spec.size_percent) {
                (Some(size), _) => size,
                (None, Some(percent)) => {
                    let share = (rest? as f64 * percent / 100.0) as u64;
                    let size = share / lba * lba;
                    spec.size = Some(size);
                    size
                }
                (None, None) => rest?,
            };
            let seed = spec.randseed.wrapping_add(u64::from(clone));
            let workload = match &log {
                Some(ios) => {
                    for io in ios {
                        let end = io.offset.saturating_add(u64::from(io.len));
                        if io.offset % lba != 0
                            || u64::from(io.len) % lba != 0
                            || io.len == 0
                            || end > geometry.capacity
                        {
                            return Err(geometry_error(format!(
                                "read_iolog: {:?} of {} bytes at {} is not aligned to {lba} bytes \
                                 or lies past the end of {} ({} bytes)",
                                io.direction,
                                io.len,
                                io.offset,
                                target_label(&spec),
                                geometry.capacity
                            )));
                        }
                    }
                    let biggest = ios.iter().map(|io| u64::from(io.len)).max().unwrap_or(0);
                    spec.block_sizes = BlockSizes::Fixed(biggest.max(spec.block_sizes.max()));
                    Workload::from_log(ios.clone(), spec.loops)
                }
                None => {
                    let layout = match &spec.block_sizes {
                        BlockSizes::Fixed(bs) => {
                            Layout::fixed(spec.offset, region_size, *bs as u32)
                        }
                        BlockSizes::Range { min, max } => Layout::ranged(
                            spec.offset,
                            region_size,
                            *min as u32,
                            *max as u32,
                            lba as u32,
                            seed,
                        ),
                        BlockSizes::Split(split) => {
                            Layout::split(spec.offset, region_size, split, lba as u32, seed)
                        }
                    }
                    .map_err(|source| PrepareError::Workload {
                        job: job.clone(),
                        source,
                    })?;
                    let read_percent = spec.rw.read_percent(spec.rwmixread);
                    let workload = Workload::new(
                        layout,
                        spec.rw.is_random(),
                        read_percent,
                        spec.time_based,
                        seed,
                    )
                    .with_loops(spec.loops);
                    if spec.norandommap {
                        workload.without_random_map()
                    } else {
                        workload
                    }
                }
            };
            Ok(PreparedClone {
                spec,
                clone,
                engine,
                workload,
                region_size,
            })
        })
        .collect()
}

/// fio's reporting group of each job: 0 for the first, one more at each later job with
/// `stonewall` or `new_group`.
pub fn group_ids(specs: &[&JobSpec]) -> Vec<u32> {
    let mut group = 0;
    specs
        .iter()
        .enumerate()
        .map(|(index, spec)| {
            if index > 0 && (spec.stonewall || spec.new_group) {
                group += 1;
            }
            group
        })
        .collect()
}

/// The jobs each job waits for: every earlier one for `stonewall`, the named ones for `wait_for`.
fn dependencies(specs: &[&JobSpec]) -> Vec<Vec<usize>> {
    specs
        .iter()
        .enumerate()
        .map(|(index, spec)| {
            let mut waits: Vec<usize> = if spec.stonewall {
                (0..index).collect()
            } else {
                Vec::new()
            };
            if let Some(target) = &spec.wait_for {
                waits.extend(
                    specs[..index]
                        .iter()
                        .enumerate()
                        .filter(|(_, earlier)| &earlier.name == target)
                        .map(|(earlier, _)| earlier),
                );
            }
            waits
        })
        .collect()
}

/// Which jobs have finished, with a condition variable to wait on.
struct Finished {
    done: Mutex<Vec<bool>>,
    changed: Condvar,
}

impl Finished {
    /// Blocks until every job in `waits` has finished.
    fn wait_for(&self, waits: &[usize]) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while !waits.iter().all(|job| done[*job]) {
            done = self.changed.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Marks `job` finished.
    fn finish(&self, job: usize) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        done[job] = true;
        self.changed.notify_all();
    }
}

/// Runs the jobs, together unless `stonewall`/`wait_for` order them, the clones of each job
/// together; returns results in job order.
///
/// With `stats`, a writer thread writes live statistics until the jobs end (`--stats-interval`).
pub fn run_jobs(
    jobs: Vec<Vec<PreparedClone>>,
    show_progress: bool,
    stats: Option<&crate::live_stats::StatsWriter>,
) -> Vec<CloneResult> {
    let specs: Vec<&JobSpec> = jobs
        .iter()
        .filter_map(|clones| clones.first().map(|clone| &clone.spec))
        .collect();
    let groups = group_ids(&specs);
    let waits = dependencies(&specs);
    let modes: Vec<(RwMode, u32)> = specs.iter().map(|spec| (spec.rw, spec.numjobs)).collect();
    // Time-based jobs give the run a planned length; others end when their bytes are done.
    let expected = specs
        .iter()
        .map(|spec| {
            (spec.time_based)
                .then_some(spec.runtime)
                .flatten()
                .map(|r| r + spec.ramp_time + spec.startdelay)
        })
        .collect::<Option<Vec<Duration>>>()
        .and_then(|v| v.into_iter().max());
    let finished = Finished {
        done: Mutex::new(vec![false; jobs.len()]),
        changed: Condvar::new(),
    };
    let progress = Arc::new(Progress::default());
    let all_done = AtomicBool::new(false);
    let run_start = Instant::now();
    let mut results: Vec<CloneResult> = std::thread::scope(|scope| {
        let reporter = show_progress.then(|| {
            let progress = Arc::clone(&progress);
            let all_done = &all_done;
            let modes = modes.clone();
            scope.spawn(move || show_progress_line(&modes, expected, &progress, all_done))
        });
        let stats_writer = stats.map(|writer| {
            let progress = Arc::clone(&progress);
            let all_done = &all_done;
            scope.spawn(move || writer.run(&progress, run_start, all_done))
        });
        let handles: Vec<_> = jobs
            .into_iter()
            .enumerate()
            .filter(|(_, clones)| !clones.is_empty())
            .map(|(index, clones)| {
                let finished = &finished;
                let waits = &waits[index];
                let group = groups[index];
                let progress = Arc::clone(&progress);
                scope.spawn(move || {
                    finished.wait_for(waits);
                    let delay = clones[0].spec.startdelay;
                    std::thread::sleep(delay.saturating_sub(run_start.elapsed()));
                    let started_clones = clones.len() as u64;
                    progress
                        .running
                        .fetch_add(started_clones, Ordering::Relaxed);
                    // The job's thread runs its first clone itself, as fio's job process runs
                    // its job (one thread fewer between the I/O and the scheduler: QD 1 4 KiB
                    // reads 0.566/0.549 -> 0.685/0.602 of fio, ABBA, BENCHMARKS.md); the
                    // others get threads. A clone that panics loses only its own result, as a
                    // clone thread's did.
                    let mut clones = clones.into_iter();
                    let first = clones.next();
                    let job_results: Vec<CloneResult> = std::thread::scope(|inner| {
                        let handles: Vec<_> = clones
                            .map(|clone| {
                                let progress = Arc::clone(&progress);
                                inner.spawn(move || run_clone(clone, &progress))
                            })
                            .collect();
                        let mut results: Vec<CloneResult> = first
                            .and_then(|clone| {
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    run_clone(clone, &progress)
                                }))
                                .ok()
                            })
                            .into_iter()
                            .collect();
                        results.extend(handles.into_iter().filter_map(|handle| handle.join().ok()));
                        results
                    });
                    // Every clone started has ended, those that panicked (and left no result)
                    // included.
                    progress
                        .running
                        .fetch_sub(started_clones, Ordering::Relaxed);
                    finished.finish(index);
                    job_results
                        .into_iter()
                        .map(|result| CloneResult {
                            job_index: index,
                            groupid: group,
                            ..result
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        // Look at the jobs every JOB_WAIT_POLL rather than block in `join`, as fio's main
        // process does (see `crate::session::JOB_WAIT_POLL`).
        while !handles.iter().all(|handle| handle.is_finished()) {
            std::thread::sleep(crate::session::JOB_WAIT_POLL);
        }
        let results: Vec<CloneResult> = handles
            .into_iter()
            .filter_map(|handle| handle.join().ok())
            .flatten()
            .collect();
        all_done.store(true, Ordering::Relaxed);
        if let Some(reporter) = reporter {
            let _ = reporter.join();
        }
        if let Some(writer) = stats_writer {
            let _ = writer.join();
        }
        results
    });
    results.sort_by_key(|result| (result.job_index, result.clone));
    results
}

/// Whether the status line is drawn: only for fio's normal output going to a terminal (never
/// in JSON mode, never into `--output` or a pipe, where it would corrupt what scripts read).
pub fn status_line_wanted(formats: &[OutputFormat], to_file: bool, terminal: bool) -> bool {
    terminal && !to_file && formats.iter().all(|f| *f == OutputFormat::Normal)
}

/// One refresh of the status line, as fio draws it.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// Clones running now.
    pub running: u64,
    /// Jobs' modes with their running clone counts, fio's letters: `r(1)`, `W(4)`...
    pub modes: String,
    /// Share of the planned work done, if known (0..=100).
    pub percent: Option<f64>,
    /// Bytes per second in the last interval: (read, write).
    pub bandwidth: (f64, f64),
    /// I/Os per second in the last interval: (read, write).
    pub iops: (f64, f64),
    /// Time left, if known.
    pub eta: Option<Duration>,
}

/// fio's status letter for a mode: upper case sequential, lower case random.
pub fn mode_letter(rw: RwMode) -> char {
    match rw {
        RwMode::Read => 'R',
        RwMode::Randread => 'r',
        RwMode::Write => 'W',
        RwMode::Randwrite => 'w',
        RwMode::Rw => 'M',
        RwMode::Randrw => 'm',
    }
}

/// fio's short numbers: `79.9k`, `312`, `1.2M`.
fn short(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.1}G", v / 1e9),
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

/// fio's bandwidth: `312MiB/s`, `4096KiB/s`, `512B/s`.
fn short_bw(bps: f64) -> String {
    match bps {
        v if v >= 1024.0 * 1048576.0 => format!("{:.1}GiB/s", v / (1024.0 * 1048576.0)),
        v if v >= 1048576.0 => format!("{:.0}MiB/s", v / 1048576.0),
        v if v >= 1024.0 => format!("{:.0}KiB/s", v / 1024.0),
        v => format!("{v:.0}B/s"),
    }
}

/// The status line: `Jobs: 1 (f=1): [r(1)][40.0%][r=312MiB/s][r=79.9k IOPS][eta 00m:03s]`
/// (both directions appear as `r=..,w=..` when both move).
pub fn format_status(s: &Status) -> String {
    let pair = |r: String, w: String, read: f64, write: f64| match (read > 0.0, write > 0.0) {
        (true, true) => format!("r={r},w={w}"),
        (false, true) => format!("w={w}"),
        _ => format!("r={r}"),
    };
    let (rb, wb) = s.bandwidth;
    let (ri, wi) = s.iops;
    let percent = s.percent.map_or_else(
        || "-.-%".to_string(),
        |p| format!("{:.1}%", p.clamp(0.0, 100.0)),
    );
    let eta = s.eta.map_or_else(
        || "--m:--s".to_string(),
        |d| format!("{:02}m:{:02}s", d.as_secs() / 60, d.as_secs() % 60),
    );
    format!(
        "Jobs: {} (f={}): [{}][{percent}][{}][{} IOPS][eta {eta}]",
        s.running,
        s.running,
        s.modes,
        pair(short_bw(rb), short_bw(wb), rb, wb),
        pair(short(ri), short(wi), ri, wi),
    )
}

/// Draws the status line on stderr every second (in place: carriage return and clear to the
/// end of the line), until `finished`. `expected` is the run's planned duration, if it has one
/// (time-based jobs), for the percentage and ETA.
fn show_progress_line(
    modes: &[(RwMode, u32)],
    expected: Option<Duration>,
    progress: &Progress,
    finished: &AtomicBool,
) {
    let started = Instant::now();
    let mut last = (0u64, 0u64, 0u64, 0u64, Instant::now());
    let mut err = std::io::stderr();
    while !finished.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(1000));
        let now = Instant::now();
        let reads = progress.read_ios.load(Ordering::Relaxed);
        let writes = progress.write_ios.load(Ordering::Relaxed);
        let read_bytes = progress.read_bytes.load(Ordering::Relaxed);
        let write_bytes = progress.write_bytes.load(Ordering::Relaxed);
        let seconds = now.duration_since(last.4).as_secs_f64().max(1e-9);
        let elapsed = started.elapsed();
        let status = Status {
            running: progress.running.load(Ordering::Relaxed),
            modes: modes
                .iter()
                .map(|(rw, n)| format!("{}({n})", mode_letter(*rw)))
                .collect(),
            percent: expected.map(|e| 100.0 * elapsed.as_secs_f64() / e.as_secs_f64().max(1e-9)),
            bandwidth: (
                (read_bytes - last.2) as f64 / seconds,
                (write_bytes - last.3) as f64 / seconds,
            ),
            iops: (
                (reads - last.0) as f64 / seconds,
                (writes - last.1) as f64 / seconds,
            ),
            eta: expected.map(|e| e.saturating_sub(elapsed)),
        };
        let _ = write!(err, "\r{}\x1b[K", format_status(&status));
        let _ = err.flush();
        last = (reads, writes, read_bytes, write_bytes, now);
    }
    let _ = write!(err, "\r\x1b[K");
    let _ = err.flush();
}

/// Per-slot bookkeeping of one in-flight I/O.
#[derive(Debug, Clone, Copy)]
struct SlotState {
    direction: IoDirection,
    offset: u64,
    len: u32,
    pass: u64,
    /// The clock read that preceded the I/O's preparation: its round's start or the previous
    /// commit's end. So its slat also holds the preparing of the I/Os queued before it in its
    /// batch (a few tens of ns each), which were submitted with it, as in fio's batches.
    queued: Instant,
    issued: Instant,
}

/// What a phase needs to know beyond the engine and workload.
struct PhaseSettings {
    verify: VerifyKind,
    /// Expected generation of blocks read back; `None` accepts any (verify of a read job).
    expect_own_generation: bool,
    seed: u64,
    counted_from: Instant,
    deadline: Option<Instant>,
    /// Stop after this many I/Os (verify replay of what the write phase issued).
    limit: Option<u64>,
    /// The job's `iodepth_batch_submit` / `iodepth_batch_complete_max`, overriding the
    /// engine's [`Batching`](crate::engine::Batching) where given.
    batch_submit: Option<u32>,
    batch_complete: Option<u32>,
}

/// Accumulated state of a clone across phases.
struct CloneState {
    read: DirectionStats,
    write: DirectionStats,
    verify: VerifyOutcome,
    error: i32,
    error_message: Option<String>,
    limiter: RateLimiter,
    iolog: Option<IologWriter>,
    depth_buckets: [u64; 7],
    submit_buckets: [u64; 7],
    complete_buckets: [u64; 7],
}

/// Holds each direction to `rate` bytes/s and `rate_iops` I/Os/s on average since `start`.
struct RateLimiter {
    start: Instant,
    bytes: [Option<u64>; 2],
    ios: [Option<u64>; 2],
    issued_bytes: [u64; 2],
    issued_ios: [u64; 2],
}

impl RateLimiter {
    /// When an I/O of `len` bytes in `direction` may be issued (now or later).
    fn ready_at(&self, direction: IoDirection, len: u32) -> Instant {
        let d = direction_index(direction);
        let mut wait = Duration::ZERO;
        if let Some(rate) = self.bytes[d] {
            let due = (self.issued_bytes[d] + u64::from(len)) as f64 / rate as f64;
            wait = wait.max(Duration::from_secs_f64(due));
        }
        if let Some(rate) = self.ios[d] {
            let due = self.issued_ios[d] as f64 / rate as f64;
            wait = wait.max(Duration::from_secs_f64(due));
        }
        self.start + wait
    }

    /// Counts an issued I/O.
    fn issued(&mut self, direction: IoDirection, len: u32) {
        let d = direction_index(direction);
        self.issued_bytes[d] += u64::from(len);
        self.issued_ios[d] += 1;
    }

    /// Whether any cap is set.
    fn limits(&self) -> bool {
        self.bytes
            .iter()
            .chain(self.ios.iter())
            .any(Option::is_some)
    }
}

/// 0 for reads, 1 for writes.
fn direction_index(direction: IoDirection) -> usize {
    match direction {
        IoDirection::Read => 0,
        IoDirection::Write => 1,
    }
}

/// fio's bucket of a count for the `iodepth_submit`/`iodepth_complete` maps:
/// 0, 1-4, 5-8, 9-16, 17-32, 33-64, more.
pub fn batch_bucket(count: usize) -> usize {
    match count {
        0 => 0,
        1..=4 => 1,
        5..=8 => 2,
        9..=16 => 3,
        17..=32 => 4,
        33..=64 => 5,
        _ => 6,
    }
}

/// fio's bucket of a queue depth for the `iodepth_level` map: 1, 2, 4, 8, 16, 32, >=64.
pub fn depth_bucket(depth: usize) -> usize {
    match depth {
        0 | 1 => 0,
        2..=3 => 1,
        4..=7 => 2,
        8..=15 => 3,
        16..=31 => 4,
        32..=63 => 5,
        _ => 6,
    }
}

/// A fio iolog (version 2) being written.
struct IologWriter {
    file: std::io::BufWriter<std::fs::File>,
    target: String,
    path: PathBuf,
}

impl IologWriter {
    /// Creates `path` and writes the header naming `target`.
    fn create(path: &Path, target: &str) -> std::io::Result<Self> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(file, "fio version 2 iolog\n{target} add\n{target} open")?;
        Ok(IologWriter {
            file,
            target: target.to_string(),
            path: path.to_path_buf(),
        })
    }

    /// Records one issued I/O.
    fn record(&mut self, direction: IoDirection, offset: u64, len: u32) -> std::io::Result<()> {
        let action = match direction {
            IoDirection::Read => "read",
            IoDirection::Write => "write",
        };
        writeln!(self.file, "{} {action} {offset} {len}", self.target)
    }

    /// Writes the close line and flushes.
    fn finish(mut self) -> std::io::Result<()> {
        writeln!(self.file, "{} close", self.target)?;
        self.file.flush()
    }
}

/// The iolog path of clone `clone`: the job's path, with `.N` appended for clones after the first.
pub fn iolog_path(path: &Path, clone: u32) -> PathBuf {
    if clone == 0 {
        path.to_path_buf()
    } else {
        let mut name = path.as_os_str().to_os_string();
        name.push(format!(".{clone}"));
        PathBuf::from(name)
    }
}

impl CloneState {
    /// Records the first error; later ones are dropped (fio reports the first too).
    fn fail(&mut self, errno: i32, message: String) {
        if self.error == 0 {
            self.error = errno;
            self.error_message = Some(message);
        }
    }
}

/// Runs one clone to completion on the calling thread.
fn run_clone(mut prepared: PreparedClone, progress: &Progress) -> CloneResult {
    let spec = prepared.spec.clone();
    let cpu_before = thread_cpu_time();
    let usage_before = thread_usage();
    let started = Instant::now();
    let started_at = SystemTime::now();
    let mut state = CloneState {
        read: DirectionStats::default(),
        write: DirectionStats::default(),
        verify: VerifyOutcome::default(),
        error: 0,
        error_message: None,
        limiter: RateLimiter {
            start: started,
            bytes: spec.rate,
            ios: spec.rate_iops,
            issued_bytes: [0; 2],
            issued_ios: [0; 2],
        },
        iolog: None,
        depth_buckets: [0; 7],
        submit_buckets: [0; 7],
        complete_buckets: [0; 7],
    };
    if let Some(path) = &spec.write_iolog {
        let path = iolog_path(path, prepared.clone);
        match IologWriter::create(&path, &target_label(&spec)) {
            Ok(writer) => state.iolog = Some(writer),
            Err(error) => state.fail(
                error.raw_os_error().unwrap_or(libc::EIO),
                format!("write_iolog {}: {error}", path.display()),
            ),
        }
    }
    let engine = prepared.engine.as_mut();
    let seed = spec.randseed.wrapping_add(u64::from(prepared.clone));
    let slot_bytes = spec.block_sizes.max() as u32;
    let mut read_runtime = Duration::ZERO;
    let mut write_runtime = Duration::ZERO;
    // cpus_allowed: pin before prepare, so the queue and its memory are set up on the CPU
    // that will use them.
    let pinned = spec.cpus_allowed.as_ref().map_or(Ok(()), |cpus| {
        crate::affinity::pin_current_thread(
            &cpus.for_clone(spec.cpus_allowed_policy, prepared.clone),
        )
    });
    if let Err(error) = pinned {
        state.fail(libc::EINVAL, error);
    } else if let Err(error) = engine.prepare(spec.iodepth, slot_bytes) {
        state.fail(libc::EIO, error.to_string());
    } else {
        fill_slots_with_noise(engine, spec.iodepth, slot_bytes, seed);
        let ramp_end = started + spec.ramp_time;
        let main = PhaseSettings {
            verify: spec.verify,
            expect_own_generation: false,
            seed,
            counted_from: ramp_end,
            deadline: spec.runtime.map(|runtime| ramp_end + runtime),
            limit: None,
            batch_submit: spec.iodepth_batch_submit,
            batch_complete: spec.iodepth_batch_complete_max,
        };
        let mut replay = prepared.workload.replay_as_reads();
        let backlog = spec.verify_backlog.filter(|_| spec.has_verify_phase());
        let main = PhaseSettings {
            limit: backlog,
            ..main
        };
        let mut verify_time = Duration::ZERO;
        let mut issued_total = 0;
        loop {
            let issued = run_phase(
                engine,
                &mut prepared.workload,
                &main,
                &mut state,
                progress,
                spec.iodepth,
                slot_bytes,
            );
            issued_total += issued;
            if backlog.is_none() || issued == 0 || state.error != 0 {
                break;
            }
            // verify_backlog: read back and check what this chunk wrote, then go on writing.
            let verify_start = Instant::now();
            let chunk = PhaseSettings {
                verify: spec.verify,
                expect_own_generation: true,
                seed,
                counted_from: ramp_end,
                deadline: None,
                limit: Some(issued),
                ..main
            };
            run_phase(
                engine,
                &mut replay,
                &chunk,
                &mut state,
                progress,
                spec.iodepth,
                slot_bytes,
            );
            verify_time += verify_start.elapsed();
        }
        let main_end = Instant::now();
        let main_runtime = main_end.saturating_duration_since(ramp_end);
        if state.read.total_ios > 0 {
            read_runtime = main_runtime;
        }
        if state.write.total_ios > 0 {
            write_runtime = main_runtime.saturating_sub(verify_time);
        }
        if spec.has_verify_phase() && backlog.is_none() && state.error == 0 {
            let verify_phase = PhaseSettings {
                verify: spec.verify,
                expect_own_generation: true,
                seed,
                counted_from: main_end,
                deadline: None,
                limit: Some(issued_total),
                ..main
            };
            run_phase(
                engine,
                &mut replay,
                &verify_phase,
                &mut state,
                progress,
                spec.iodepth,
                slot_bytes,
            );
            read_runtime = main_end.elapsed();
        }
    }
    if let Err(error) = engine.close() {
        state.fail(libc::EIO, error.to_string());
    }
    if state.verify.mismatches > 0 {
        state.fail(
            VERIFY_ERRNO,
            format!(
                "verify: {} of {} blocks did not match",
                state.verify.mismatches, state.verify.checked
            ),
        );
    }
    if let Some(writer) = state.iolog.take() {
        let path = writer.path.clone();
        if let Err(error) = writer.finish() {
            state.fail(
                libc::EIO,
                format!("write_iolog {}: {error}", path.display()),
            );
        }
    }
    let cpu_after = thread_cpu_time();
    let usage_after = thread_usage();
    CloneResult {
        engine: engine.name(),
        engine_stats: engine.stats(),
        spec,
        clone: prepared.clone,
        error: state.error,
        error_message: state.error_message,
        read: state.read,
        write: state.write,
        read_runtime,
        write_runtime,
        elapsed: started.elapsed(),
        user_cpu: cpu_after.0.saturating_sub(cpu_before.0),
        system_cpu: cpu_after.1.saturating_sub(cpu_before.1),
        verify: state.verify,
        job_index: 0,
        groupid: 0,
        started_at,
        depth_buckets: state.depth_buckets,
        submit_buckets: state.submit_buckets,
        complete_buckets: state.complete_buckets,
        ctx: usage_after.0.saturating_sub(usage_before.0),
        faults: (
            usage_after.1.saturating_sub(usage_before.1),
            usage_after.2.saturating_sub(usage_before.2),
        ),
    }
}

/// Fills every slot with pseudo-random bytes so plain writes do not write zeroes.
fn fill_slots_with_noise(engine: &mut dyn Engine, slots: u32, slot_bytes: u32, seed: u64) {
    let mut generator = SplitMix64::new(seed ^ 0x6e6f_6973_6521);
    let mut noise = vec![0u8; slot_bytes as usize];
    for chunk in noise.chunks_mut(8) {
        let bytes = generator.next_u64().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    for slot in 0..slots {
        let _ = engine.fill_slot(slot, &noise);
    }
}

/// Runs `workload` through `engine` until it ends, the deadline passes, the limit is reached or an
/// error occurs; waits for every in-flight I/O. Returns the number of I/Os issued.
///
/// Batching follows the engine's [`Batching`](crate::engine::Batching): requests are committed every `submit` queued,
/// and at most `complete` completions are taken per round before their slots are refilled (the
/// others wait, as in the engine's completion queue, and are taken without waiting next round).
fn run_phase(
    engine: &mut dyn Engine,
    workload: &mut Workload,
    settings: &PhaseSettings,
    state: &mut CloneState,
    progress: &Progress,
    slots: u32,
    slot_bytes: u32,
) -> u64 {
    let now = Instant::now();
    let batching = engine.batching();
    let submit_batch = settings
        .batch_submit
        .map_or(batching.submit, |n| n as usize)
        .max(1);
    let complete_batch = settings
        .batch_complete
        .map_or(batching.complete, |n| n as usize)
        .max(1);
    let mut slot_states = vec![
        SlotState {
            direction: IoDirection::Read,
            offset: 0,
            len: 0,
            pass: 0,
            queued: now,
            issued: now
        };
        slots as usize
    ];
    let mut free: Vec<u32> = (0..slots).rev().collect();
    // Queued since the last commit.
    let mut batch: Vec<u32> = Vec::with_capacity(slots as usize);
    // The last reap's completions; those before `taken` are handled.
    let mut completions = Vec::with_capacity(slots as usize);
    let mut taken = 0;
    let mut scratch = vec![0u8; slot_bytes as usize];
    let mut issuing = true;
    let mut issued = 0u64;
    let mut pending: Option<PlannedIo> = None;
    // The last round's successful completions, accounted after the next commit.
    let mut finished: Vec<SlotState> = Vec::with_capacity(slots as usize);
    let mut finished_at = now;
    let mut reaped_at = now;
    loop {
        // The latest clock read, the `queued` time of the next I/O: the round's start, then
        // each commit's end (one read fewer per I/O than stamping each; see `SlotState`).
        let mut clock = reaped_at;
        if issuing {
            clock = Instant::now();
            if settings.deadline.is_some_and(|deadline| clock >= deadline) {
                issuing = false;
            }
        }
        batch.clear();
        while issuing {
            let Some(slot) = free.last().copied() else {
                break;
            };
            if settings.limit.is_some_and(|limit| issued >= limit) {
                issuing = false;
                break;
            }
            let Some(io) = pending.take().or_else(|| workload.next()) else {
                issuing = false;
                break;
            };
            if state.limiter.limits() {
                let ready = state.limiter.ready_at(io.direction, io.len);
                let now = Instant::now();
                if ready > now {
                    pending = Some(io);
                    if free.len() < slots as usize {
                        // Others are in flight: reap them meanwhile.
                        break;
                    }
                    let until = settings
                        .deadline
                        .map_or(ready, |deadline| ready.min(deadline));
                    std::thread::sleep(until.saturating_duration_since(now));
                    clock = Instant::now();
                    if settings.deadline.is_some_and(|deadline| clock >= deadline) {
                        issuing = false;
                        break;
                    }
                    continue;
                }
                state.limiter.issued(io.direction, io.len);
            }
            if let Some(writer) = &mut state.iolog {
                if let Err(error) = writer.record(io.direction, io.offset, io.len) {
                    state.fail(libc::EIO, format!("write_iolog: {error}"));
                    state.iolog = None;
                }
            }
            if let Err(error) = queue_one(engine, slot, io, settings, &mut scratch) {
                state.fail(libc::EIO, error.to_string());
                issuing = false;
                break;
            }
            free.pop();
            issued += 1;
            slot_states[slot as usize] = SlotState {
                direction: io.direction,
                offset: io.offset,
                len: io.len,
                pass: io.pass,
                queued: clock,
                issued: clock,
            };
            batch.push(slot);
            if batch.len() >= submit_batch {
                let in_flight = slots as usize - free.len();
                match commit(engine, &batch, in_flight, &mut slot_states, state) {
                    Ok(issued_at) => clock = issued_at,
                    Err(error) => {
                        account(&finished, finished_at, settings, state, progress);
                        state.fail(libc::EIO, error.to_string());
                        return issued;
                    }
                }
                batch.clear();
            }
        }
        if !batch.is_empty() {
            let in_flight = slots as usize - free.len();
            if let Err(error) = commit(engine, &batch, in_flight, &mut slot_states, state) {
                account(&finished, finished_at, settings, state, progress);
                state.fail(libc::EIO, error.to_string());
                return issued;
            }
        }
        account(&finished, finished_at, settings, state, progress);
        finished.clear();
        if free.len() == slots as usize {
            return issued;
        }
        if taken == completions.len() {
            completions.clear();
            taken = 0;
            if let Err(error) = engine.reap(1, &mut completions) {
                state.fail(libc::EIO, error.to_string());
                return issued;
            }
            reaped_at = Instant::now();
        }
        let take = (completions.len() - taken).min(complete_batch);
        state.complete_buckets[batch_bucket(take)] += take as u64;
        // Triage only what must happen before a slot is reused (errors, verify reads); the
        // accounting (latencies, histograms, counters) waits until the next batch is committed,
        // so the device works while it runs.
        finished_at = reaped_at;
        for completion in &completions[taken..taken + take] {
            let Some(slot_state) = slot_states.get(completion.slot as usize).copied() else {
                state.fail(
                    libc::EIO,
                    format!("engine completed unknown slot {}", completion.slot),
                );
                issuing = false;
                continue;
            };
            free.push(completion.slot);
            match completion.result {
                Err(errno) => {
                    state.fail(
                        errno,
                        format!(
                            "{:?} of {} bytes at offset {} failed: {}",
                            slot_state.direction,
                            slot_state.len,
                            slot_state.offset,
                            std::io::Error::from_raw_os_error(errno)
                        ),
                    );
                    issuing = false;
                    continue;
                }
                Ok(moved) if moved != slot_state.len => {
                    state.fail(
                        libc::EIO,
                        format!(
                            "short {:?}: {moved} of {} bytes at offset {}",
                            slot_state.direction, slot_state.len, slot_state.offset
                        ),
                    );
                    issuing = false;
                    continue;
                }
                Ok(_) => {}
            }
            if slot_state.direction == IoDirection::Read && settings.verify != VerifyKind::None {
                check_one(
                    engine,
                    completion.slot,
                    &slot_state,
                    settings,
                    state,
                    &mut scratch,
                );
            }
            finished.push(slot_state);
        }
        taken += take;
    }
}

/// Commits the requests queued on `batch`'s slots (`in_flight` requests outstanding with them)
/// and stamps their issue time, which it returns; counts the batch in the submit and depth maps.
fn commit(
    engine: &mut dyn Engine,
    batch: &[u32],
    in_flight: usize,
    slot_states: &mut [SlotState],
    state: &mut CloneState,
) -> Result<Instant, EngineError> {
    engine.commit()?;
    let issued_at = Instant::now();
    state.submit_buckets[batch_bucket(batch.len())] += batch.len() as u64;
    state.depth_buckets[depth_bucket(in_flight)] += batch.len() as u64;
    for slot in batch {
        slot_states[*slot as usize].issued = issued_at;
    }
    Ok(issued_at)
}

/// Accounts I/Os that completed successfully at `done`: latencies into the statistics (from
/// `counted_from` on) and the progress counters.
fn account(
    finished: &[SlotState],
    done: Instant,
    settings: &PhaseSettings,
    state: &mut CloneState,
    progress: &Progress,
) {
    let (mut reads, mut writes, mut bytes) = (0, 0, 0);
    let (mut read_bytes, mut write_bytes) = (0, 0);
    for slot_state in finished {
        if slot_state.queued >= settings.counted_from {
            let slat = slot_state
                .issued
                .saturating_duration_since(slot_state.queued)
                .as_nanos() as u64;
            let clat = done.saturating_duration_since(slot_state.issued).as_nanos() as u64;
            let stats = match slot_state.direction {
                IoDirection::Read => &mut state.read,
                IoDirection::Write => &mut state.write,
            };
            stats.record(u64::from(slot_state.len), slat, clat);
        }
        match slot_state.direction {
            IoDirection::Read => {
                reads += 1;
                read_bytes += u64::from(slot_state.len);
            }
            IoDirection::Write => {
                writes += 1;
                write_bytes += u64::from(slot_state.len);
            }
        }
        bytes += u64::from(slot_state.len);
    }
    progress.read_ios.fetch_add(reads, Ordering::Relaxed);
    progress.write_ios.fetch_add(writes, Ordering::Relaxed);
    progress.bytes.fetch_add(bytes, Ordering::Relaxed);
    progress.read_bytes.fetch_add(read_bytes, Ordering::Relaxed);
    progress
        .write_bytes
        .fetch_add(write_bytes, Ordering::Relaxed);
}

/// Fills a write's slot (verify header and pattern when verifying) and queues the request.
fn queue_one(
    engine: &mut dyn Engine,
    slot: u32,
    io: PlannedIo,
    settings: &PhaseSettings,
    scratch: &mut [u8],
) -> Result<(), EngineError> {
    if io.direction == IoDirection::Write && settings.verify != VerifyKind::None {
        let block = &mut scratch[..io.len as usize];
        fill_block(
            settings.verify,
            block,
            io.offset,
            generation(settings.seed, io.pass),
        );
        engine.fill_slot(slot, block)?;
    }
    engine.queue(IoRequest {
        slot,
        direction: io.direction,
        offset: io.offset,
        len: io.len,
    })
}

/// Copies a completed read out of its slot and checks it, recording any mismatch.
fn check_one(
    engine: &dyn Engine,
    slot: u32,
    slot_state: &SlotState,
    settings: &PhaseSettings,
    state: &mut CloneState,
    scratch: &mut [u8],
) {
    let block = &mut scratch[..slot_state.len as usize];
    if let Err(error) = engine.read_slot(slot, block) {
        state.fail(libc::EIO, error.to_string());
        return;
    }
    let expected = settings
        .expect_own_generation
        .then(|| generation(settings.seed, slot_state.pass));
    state.verify.checked += 1;
    if let Err(mismatch) = check_block(settings.verify, block, slot_state.offset, expected) {
        state.verify.mismatches += 1;
        if state.verify.bad_blocks.len() < MAX_REPORTED_MISMATCHES {
            state.verify.bad_blocks.push(mismatch);
        }
    }
}

/// Context switches (voluntary + involuntary), major and minor faults of the calling thread.
fn thread_usage() -> (u64, u64, u64) {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the buffer we own; zeroed is a valid rusage.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr());
        usage.assume_init()
    };
    (
        (usage.ru_nvcsw.max(0) + usage.ru_nivcsw.max(0)) as u64,
        usage.ru_majflt.max(0) as u64,
        usage.ru_minflt.max(0) as u64,
    )
}

/// User and system CPU time of the calling thread.
fn thread_cpu_time() -> (Duration, Duration) {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the buffer we own; zeroed is a valid rusage.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr());
        usage.assume_init()
    };
    let to_duration = |time: libc::timeval| {
        Duration::from_secs(time.tv_sec.max(0) as u64)
            + Duration::from_micros(time.tv_usec.max(0) as u64)
    };
    (to_duration(usage.ru_utime), to_duration(usage.ru_stime))
}

#[cfg(test)]
mod status_tests {
    use super::*;

    #[test]
    fn the_status_line_looks_like_fios() {
        let s = Status {
            running: 1,
            modes: format!("{}(1)", mode_letter(RwMode::Randread)),
            percent: Some(40.0),
            bandwidth: (312.0 * 1048576.0, 0.0),
            iops: (79_900.0, 0.0),
            eta: Some(Duration::from_secs(3)),
        };
        assert_eq!(
            format_status(&s),
            "Jobs: 1 (f=1): [r(1)][40.0%][r=312MiB/s][r=79.9k IOPS][eta 00m:03s]"
        );
        let mixed = Status {
            running: 4,
            modes: "m(4)".into(),
            percent: None,
            bandwidth: (150.0 * 1048576.0, 2048.0),
            iops: (38_400.0, 512.0),
            eta: None,
        };
        assert_eq!(
            format_status(&mixed),
            "Jobs: 4 (f=4): [m(4)][-.-%][r=150MiB/s,w=2KiB/s][r=38.4k,w=512 IOPS][eta --m:--s]"
        );
        assert_eq!(mode_letter(RwMode::Write), 'W');
        assert_eq!(mode_letter(RwMode::Rw), 'M');
    }

    #[test]
    fn no_status_line_in_json_into_a_file_or_off_a_terminal() {
        use OutputFormat::*;
        assert!(status_line_wanted(&[Normal], false, true));
        assert!(
            !status_line_wanted(&[Normal], false, false),
            "not a terminal"
        );
        assert!(
            !status_line_wanted(&[Normal], true, true),
            "--output to a file"
        );
        assert!(!status_line_wanted(&[Json], false, true), "JSON mode");
        assert!(
            !status_line_wanted(&[Normal, JsonPlus], false, true),
            "JSON among formats"
        );
    }
}

#[cfg(test)]
mod panic_tests {
    use super::*;
    use crate::engine::{Batching, Geometry, IoCompletion};

    /// Wraps a real engine and panics at the first `commit`, after `prepare` and the first
    /// requests are queued: a clone that dies mid-run.
    struct PanicsOnCommit(Box<dyn Engine>);

    impl Engine for PanicsOnCommit {
        fn name(&self) -> &'static str {
            self.0.name()
        }
        fn geometry(&self) -> Geometry {
            self.0.geometry()
        }
        fn prepare(&mut self, slots: u32, slot_bytes: u32) -> Result<(), EngineError> {
            self.0.prepare(slots, slot_bytes)
        }
        fn fill_slot(&mut self, slot: u32, data: &[u8]) -> Result<(), EngineError> {
            self.0.fill_slot(slot, data)
        }
        fn read_slot(&self, slot: u32, out: &mut [u8]) -> Result<(), EngineError> {
            self.0.read_slot(slot, out)
        }
        fn queue(&mut self, request: IoRequest) -> Result<(), EngineError> {
            self.0.queue(request)
        }
        fn commit(&mut self) -> Result<(), EngineError> {
            panic!("injected test panic: this clone's engine fails mid-run");
        }
        fn reap(&mut self, min: usize, out: &mut Vec<IoCompletion>) -> Result<(), EngineError> {
            self.0.reap(min, out)
        }
        fn close(&mut self) -> Result<(), EngineError> {
            self.0.close()
        }
        fn batching(&self) -> Batching {
            self.0.batching()
        }
    }

    /// A null-engine job named `name`: `numjobs` clones, each reading 64 KiB in 4 KiB blocks.
    fn null_job(name: &str, numjobs: u32) -> JobSpec {
        let argv: Vec<std::ffi::OsString> = [
            "tpio".to_string(),
            format!("--name={name}"),
            "--ioengine=null".into(),
            "--rw=read".into(),
            "--bs=4k".into(),
            "--size=64k".into(),
            format!("--numjobs={numjobs}"),
        ]
        .into_iter()
        .map(Into::into)
        .collect();
        let (mut specs, _) = crate::cli::parse(&argv).expect("options parse");
        specs.pop().expect("one job")
    }

    /// Runs `specs` with the clones at `(job, clone)` in `panicking` made to panic; returns
    /// `(job_index, clone, read I/Os, error)` of every result reported.
    fn run_with_panics(
        specs: &[JobSpec],
        panicking: &[(usize, u32)],
    ) -> Vec<(usize, u32, u64, i32)> {
        let mut jobs = prepare_jobs(specs).expect("null jobs prepare");
        for &(job, clone) in panicking {
            let prepared = &mut jobs[job][clone as usize];
            let real = std::mem::replace(
                &mut prepared.engine,
                Box::new(crate::engine::null::NullEngine::new(&prepared.spec)),
            );
            prepared.engine = Box::new(PanicsOnCommit(real));
        }
        run_jobs(jobs, false, None)
            .into_iter()
            .map(|r| (r.job_index, r.clone, r.read.total_ios, r.error))
            .collect()
    }

    #[test]
    fn clones_that_panic_lose_only_their_own_results() {
        // 64 KiB / 4 KiB = 16 reads per clone that completes.
        let specs = [null_job("first", 3), null_job("second", 2)];
        assert_eq!(
            run_with_panics(&specs, &[]),
            [
                (0, 0, 16, 0),
                (0, 1, 16, 0),
                (0, 2, 16, 0),
                (1, 0, 16, 0),
                (1, 1, 16, 0)
            ],
            "without a panic every clone reports"
        );
        // Clone 0 runs on the job's own thread under catch_unwind; clone 1 of the second job
        // runs on a thread of its own. Each loses its own result and nothing else: its
        // siblings and the other job still report in full.
        assert_eq!(
            run_with_panics(&specs, &[(0, 0), (1, 1)]),
            [(0, 1, 16, 0), (0, 2, 16, 0), (1, 0, 16, 0)]
        );
        // Every clone of a job panicking loses the job's results, not the other job's.
        assert_eq!(
            run_with_panics(&specs, &[(1, 0), (1, 1)]),
            [(0, 0, 16, 0), (0, 1, 16, 0), (0, 2, 16, 0)]
        );
    }
}
