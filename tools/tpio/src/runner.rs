//! Running jobs: preparing each clone's engine and workload, the per-thread submission/completion
//! loop, the verify read-back phase, and the optional live progress line.
//!
//! Everything that can fail because of the input (missing file, file too small, block size not a
//! multiple of the device's logical block size) fails in [`prepare_jobs`], before any I/O and
//! before any output, so bad input never produces a partial report.
//!
//! Each clone (`numjobs`) runs [`run_clone`] on its own thread with its own engine. The loop keeps
//! `iodepth` slots busy: it queues requests into every free slot, commits them in one batch, then
//! reaps at least one completion. Timestamps: `queued` when a request is queued, `issued` once per
//! batch after `commit` returns, `done` once per reap batch. fio's names follow: slat = issued -
//! queued, clat = done - issued, lat = done - queued. I/Os queued during `ramp_time` are not
//! counted, and a direction's runtime starts when the ramp ends. Jobs of a file run one after the
//! other (stonewall); the clones of one job run together.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{open_engine, target_label, Engine, EngineError, IoDirection, IoRequest};
use crate::options::{BlockSizes, JobSpec, VerifyKind};
use crate::stats::DirectionStats;
use crate::verify::{check_block, fill_block, generation, Mismatch};
use crate::workload::{Layout, SplitMix64, Workload, WorkloadError};

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
}

/// Opens an engine per clone of every job, checks geometry and lays out workloads.
pub fn prepare_jobs(specs: &[JobSpec]) -> Result<Vec<Vec<PreparedClone>>, PrepareError> {
    specs.iter().map(prepare_job).collect()
}

/// Prepares every clone of one job.
fn prepare_job(spec: &JobSpec) -> Result<Vec<PreparedClone>, PrepareError> {
    (0..spec.numjobs)
        .map(|clone| {
            let job = spec.name.clone();
            let engine = open_engine(spec).map_err(|source| PrepareError::Engine {
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
                ("bs (or bsrange minimum)", spec.block_sizes.min()),
                ("bs (or bsrange maximum)", spec.block_sizes.max()),
                ("offset", spec.offset),
            ] {
                if value % lba != 0 {
                    return Err(geometry_error(format!(
                        "{what}={value} is not a multiple of the logical block size {lba} of {}",
                        target_label(spec)
                    )));
                }
            }
            let region_size = match spec.size {
                Some(size) => size,
                None => geometry
                    .capacity
                    .checked_sub(spec.offset)
                    .filter(|size| *size > 0)
                    .ok_or_else(|| {
                        geometry_error(format!(
                            "offset={} is at or past the end of {} ({} bytes)",
                            spec.offset,
                            target_label(spec),
                            geometry.capacity
                        ))
                    })?,
            };
            let seed = spec.randseed.wrapping_add(u64::from(clone));
            let layout = match spec.block_sizes {
                BlockSizes::Fixed(bs) => Layout::fixed(spec.offset, region_size, bs as u32),
                BlockSizes::Range { min, max } => Layout::ranged(
                    spec.offset,
                    region_size,
                    min as u32,
                    max as u32,
                    lba as u32,
                    seed,
                ),
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
            );
            Ok(PreparedClone {
                spec: spec.clone(),
                clone,
                engine,
                workload,
                region_size,
            })
        })
        .collect()
}

/// Runs the jobs one after another, the clones of each together; returns results in job order.
pub fn run_jobs(jobs: Vec<Vec<PreparedClone>>, show_progress: bool) -> Vec<CloneResult> {
    let mut results = Vec::new();
    for clones in jobs {
        let progress = Arc::new(Progress::default());
        let finished = Arc::new(AtomicBool::new(false));
        let name = clones
            .first()
            .map(|clone| clone.spec.name.clone())
            .unwrap_or_default();
        let job_results = std::thread::scope(|scope| {
            let handles: Vec<_> = clones
                .into_iter()
                .map(|clone| {
                    let progress = Arc::clone(&progress);
                    scope.spawn(move || run_clone(clone, &progress))
                })
                .collect();
            let reporter = show_progress.then(|| {
                let progress = Arc::clone(&progress);
                let finished = Arc::clone(&finished);
                let name = name.clone();
                scope.spawn(move || show_progress_line(&name, &progress, &finished))
            });
            let results: Vec<CloneResult> = handles
                .into_iter()
                .filter_map(|handle| handle.join().ok())
                .collect();
            finished.store(true, Ordering::Relaxed);
            if let Some(reporter) = reporter {
                let _ = reporter.join();
            }
            results
        });
        results.extend(job_results);
    }
    results
}

/// Whether a progress line should be drawn: only when stdout and stderr are terminals.
pub fn progress_wanted() -> bool {
    std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

/// Draws `name: r=IOPS w=IOPS BW` on stderr every 250 ms until `finished`.
fn show_progress_line(name: &str, progress: &Progress, finished: &AtomicBool) {
    let bar = indicatif::ProgressBar::new_spinner();
    let started = Instant::now();
    let mut last = (0u64, 0u64, 0u64, Instant::now());
    while !finished.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        let now = Instant::now();
        let reads = progress.read_ios.load(Ordering::Relaxed);
        let writes = progress.write_ios.load(Ordering::Relaxed);
        let bytes = progress.bytes.load(Ordering::Relaxed);
        let seconds = now.duration_since(last.3).as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{name}: [r={:.0} w={:.0} IOPS][{:.1} MiB/s][{:.0}s]",
            (reads - last.0) as f64 / seconds,
            (writes - last.1) as f64 / seconds,
            (bytes - last.2) as f64 / seconds / 1048576.0,
            started.elapsed().as_secs_f64()
        ));
        bar.tick();
        last = (reads, writes, bytes, now);
    }
    bar.finish_and_clear();
}

/// Per-slot bookkeeping of one in-flight I/O.
#[derive(Debug, Clone, Copy)]
struct SlotState {
    direction: IoDirection,
    offset: u64,
    len: u32,
    pass: u64,
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
}

/// Accumulated state of a clone across phases.
struct CloneState {
    read: DirectionStats,
    write: DirectionStats,
    verify: VerifyOutcome,
    error: i32,
    error_message: Option<String>,
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
    let started = Instant::now();
    let mut state = CloneState {
        read: DirectionStats::default(),
        write: DirectionStats::default(),
        verify: VerifyOutcome::default(),
        error: 0,
        error_message: None,
    };
    let engine = prepared.engine.as_mut();
    let seed = spec.randseed.wrapping_add(u64::from(prepared.clone));
    let slot_bytes = spec.block_sizes.max() as u32;
    let mut read_runtime = Duration::ZERO;
    let mut write_runtime = Duration::ZERO;
    if let Err(error) = engine.prepare(spec.iodepth, slot_bytes) {
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
        };
        let replay = prepared.workload.replay_as_reads();
        let issued = run_phase(
            engine,
            &mut prepared.workload,
            &main,
            &mut state,
            progress,
            spec.iodepth,
            slot_bytes,
        );
        let main_end = Instant::now();
        let main_runtime = main_end.saturating_duration_since(ramp_end);
        let percent = spec.rw.read_percent(spec.rwmixread);
        if percent > 0 {
            read_runtime = main_runtime;
        }
        if percent < 100 {
            write_runtime = main_runtime;
        }
        if spec.has_verify_phase() && state.error == 0 {
            let mut replay = replay;
            let verify_phase = PhaseSettings {
                verify: spec.verify,
                expect_own_generation: true,
                seed,
                counted_from: main_end,
                deadline: None,
                limit: Some(issued),
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
    let cpu_after = thread_cpu_time();
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
        if let Ok(buffer) = engine.slot_buffer(slot) {
            let _ = buffer.copy_in(&noise);
        }
    }
}

/// Runs `workload` through `engine` until it ends, the deadline passes, the limit is reached or an
/// error occurs; waits for every in-flight I/O. Returns the number of I/Os issued.
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
    let mut batch: Vec<u32> = Vec::with_capacity(slots as usize);
    let mut completions = Vec::with_capacity(slots as usize);
    let mut scratch = vec![0u8; slot_bytes as usize];
    let mut issuing = true;
    let mut issued = 0u64;
    loop {
        if issuing
            && settings
                .deadline
                .is_some_and(|deadline| Instant::now() >= deadline)
        {
            issuing = false;
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
            let Some(io) = workload.next() else {
                issuing = false;
                break;
            };
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
                queued: Instant::now(),
                issued: now,
            };
            batch.push(slot);
        }
        if !batch.is_empty() {
            if let Err(error) = engine.commit() {
                state.fail(libc::EIO, error.to_string());
                return issued;
            }
            let issued_at = Instant::now();
            for slot in &batch {
                slot_states[*slot as usize].issued = issued_at;
            }
        }
        if free.len() == slots as usize {
            return issued;
        }
        completions.clear();
        if let Err(error) = engine.reap(1, &mut completions) {
            state.fail(libc::EIO, error.to_string());
            return issued;
        }
        let done = Instant::now();
        let (mut reads, mut writes, mut bytes) = (0, 0, 0);
        for completion in &completions {
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
                IoDirection::Read => reads += 1,
                IoDirection::Write => writes += 1,
            }
            bytes += u64::from(slot_state.len);
        }
        progress.read_ios.fetch_add(reads, Ordering::Relaxed);
        progress.write_ios.fetch_add(writes, Ordering::Relaxed);
        progress.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Fills a write's slot (verify header and pattern when verifying) and queues the request.
fn queue_one(
    engine: &mut dyn Engine,
    slot: u32,
    io: crate::workload::PlannedIo,
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
        engine.slot_buffer(slot)?.copy_in(block)?;
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
    if let Err(error) = engine
        .slot_buffer(slot)
        .and_then(|buffer| buffer.copy_out(block))
    {
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
