//! # nvme_soak: mixed NVMe I/O for a long time, with cancellation, timeouts, resets and pool
//! growth, every block verified
//!
//! Not in `tests.list` (it runs for minutes): `tools/soak` boots the VM and runs it, for
//! `TIDEPOOL_SOAK_SECS` seconds (default 1800).
//!
//! The run is a sequence of **epochs** on the harness's first vfio NVMe controller. Each epoch
//! creates an interrupt-driven [`AsyncQueue`] and runs `tasks` tokio tasks (the count changes
//! every epoch, so the pool grows under bursts and shrinks in the quiet ones: 2 MiB prefill,
//! short shrink delay). Every task owns a disjoint range of blocks and loops: write a block with
//! a fresh pattern, or read one and compare it with the pattern last written there. Data goes
//! through the library's policy (`DmaPolicy::prepare_wait`: bounce or direct by size) in
//! page-aligned caller memory, 4 KiB to 128 KiB per I/O. One I/O in eight is **cancelled** at a
//! random point (a short `tokio::time::timeout`): the block's content is then unknown (old or
//! new pattern) until it is written again, and the driver must keep the data until the device
//! is done with it.
//!
//! An epoch ends in one of three ways, in turn:
//! - **quietly**: the tasks stop, the queue is dropped;
//! - **controller reset** in the middle of I/O (`Controller::reset`): every in-flight command
//!   fails with `ControllerReset` (its blocks become unknown), then `Controller::recover`;
//! - **forced timeout**: on a polled queue, a write whose completion the driver drops
//!   (`IoQueue::drop_next_completions`, feature `fault-injection`) until the command timeout
//!   resets the controller; then `recover`.
//!
//! At the end every block whose content is known is read back and compared; unknown blocks are
//! rewritten and verified. The test fails on any corrupt block, any I/O error other than the
//! injected ones, or memory left in use; the harness fails it on any IOMMU fault.

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidepool::data::{Completed, DmaPolicy, HostMemory, PageBuf};
use tidepool::pool::{Direction, PoolConfig};
use tidepool::share::direct::DirectMapper;
use tidepool_nvme::{AsyncConfig, AsyncQueue, Controller, ControllerConfig, Namespace, NvmeError};
use tidepool_vmtests::{env_u64, HarnessEnv, Rng};

type Res<T> = Result<T, String>;

/// Blocks (of the namespace's block size) each task owns.
const BLOCKS_PER_TASK: u64 = 512;
/// Most tasks in one epoch.
const MAX_TASKS: u64 = 24;

/// What is known of one I/O unit's content: the seed of the pattern last written, or unknown.
type Known = HashMap<u64, Option<u64>>;

#[derive(Default)]
struct Tally {
    writes: AtomicU64,
    reads: AtomicU64,
    verified: AtomicU64,
    cancelled: AtomicU64,
    failed_by_reset: AtomicU64,
    corrupt: AtomicU64,
    other_errors: AtomicU64,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("nvme_soak: PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("nvme_soak: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        out.extend_from_slice(&r.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn run() -> Res<()> {
    let env = HarnessEnv::from_env().map_err(|e| e.to_string())?;
    let secs = env_u64("TIDEPOOL_SOAK_SECS", 1800);
    let pool = PoolConfig {
        prefill_bytes: 2 << 20,
        chunk_bytes: 2 << 20,
        low_watermark: 1 << 20,
        high_watermark: 4 << 20,
        shrink_delay: Duration::from_millis(500),
        peak_half_life: Duration::ZERO,
        max_bytes: 64 << 20,
        ..PoolConfig::default()
    };
    let cfg = ControllerConfig {
        interrupts: true,
        command_timeout: Duration::from_secs(2),
        pool,
        ..ControllerConfig::default()
    };
    let ctrl = Controller::open(env.nvme_bdf(), cfg).map_err(|e| e.to_string())?;
    let ns = ctrl.namespace(1).map_err(|e| e.to_string())?;
    let block = u64::from(ns.block_bytes());
    let unit = 4096u64.max(block);
    let units_per_task = BLOCKS_PER_TASK * block / unit;
    if MAX_TASKS * units_per_task * unit > ns.bytes() {
        return Err("the namespace is too small for the soak's block ranges".into());
    }
    let mapper = Arc::new(DirectMapper::new(Arc::clone(ctrl.pool().view()), 0));
    let known: Arc<Mutex<Known>> = Arc::default();
    let tally = Arc::new(Tally::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut rng = Rng(0x50a4_0001);
    let mut epoch = 0u64;
    let (mut resets, mut timeouts, mut peak_chunks) = (0u64, 0u64, 0u64);
    while start.elapsed() < Duration::from_secs(secs) {
        epoch += 1;
        let tasks = 1 + rng.below(MAX_TASKS);
        // Odd epochs bounce everything (the pool must grow for the bursts); even ones map
        // large transfers directly.
        let policy = if epoch % 2 == 1 {
            DmaPolicy::Bounce
        } else {
            DmaPolicy::Auto {
                threshold: 64 << 10,
            }
        };
        let ending = epoch % 3;
        let len = Duration::from_millis(500 + rng.below(2500));
        let q = rt
            .block_on(async { AsyncQueue::new(&ctrl, 64, AsyncConfig::default()) })
            .map_err(|e| format!("epoch {epoch}: async queue: {e}"))?;
        let stop_at = Instant::now() + len;
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let (q, ns, mapper, known, tally) = (
                    q.clone(),
                    ns,
                    Arc::clone(&mapper),
                    Arc::clone(&known),
                    Arc::clone(&tally),
                );
                let pool = ctrl.pool().clone();
                let seed = epoch * 1000 + t;
                debug_assert!(units_per_task > 32);
                rt.spawn(async move {
                    let base = t * units_per_task;
                    let mut r = Rng(seed | 1);
                    // Units a cancelled write may still change this epoch (NVMe does not order
                    // commands): they stay unknown until the final check.
                    let mut poisoned = HashSet::new();
                    while Instant::now() < stop_at {
                        let unit_no = base + r.below(units_per_task - 32);
                        let units = 1 + r.below(32);
                        let io = IoSpec {
                            policy,
                            lba: unit_no * unit / block,
                            first: unit_no,
                            units,
                            unit,
                            write: r.below(2) == 0,
                            seed: r.next(),
                            cancel_after: (r.below(8) == 0)
                                .then(|| Duration::from_micros(r.below(400))),
                        };
                        let dead =
                            one_io(&q, &ns, &pool, &mapper, &known, &tally, &mut poisoned, io)
                                .await;
                        if dead {
                            break; // the epoch's controller reset failed the queue
                        }
                    }
                })
            })
            .collect();
        match ending {
            1 => {
                // Reset in the middle of the I/O.
                std::thread::sleep(len / 2);
                ctrl.reset("soak: reset in the middle of I/O");
                resets += 1;
            }
            _ => std::thread::sleep(len),
        }
        for h in handles {
            rt.block_on(h)
                .map_err(|e| format!("epoch {epoch}: task: {e}"))?;
        }
        peak_chunks = peak_chunks.max(ctrl.pool_stats().chunks);
        drop(q);
        if ending == 2 {
            forced_timeout(&ctrl, &ns, &known, unit)?;
            timeouts += 1;
        }
        if ending != 0 {
            ctrl.recover()
                .map_err(|e| format!("epoch {epoch}: recover: {e}"))?;
        }
        if epoch % 10 == 0 {
            println!(
                "  {:>5} s: epoch {epoch}, {} writes, {} reads, {} verified, {} cancelled, {} \
                 failed by resets, {} corrupt, pool {} chunk(s)",
                start.elapsed().as_secs(),
                tally.writes.load(Ordering::Relaxed),
                tally.reads.load(Ordering::Relaxed),
                tally.verified.load(Ordering::Relaxed),
                tally.cancelled.load(Ordering::Relaxed),
                tally.failed_by_reset.load(Ordering::Relaxed),
                tally.corrupt.load(Ordering::Relaxed),
                ctrl.pool_stats().chunks,
            );
        }
    }
    // Final pass: every known unit read back; unknown ones rewritten and checked.
    let final_corrupt = final_check(&ctrl, &ns, &known, unit)?;
    let corrupt = tally.corrupt.load(Ordering::Relaxed) + final_corrupt;
    let stats = ctrl.pool_stats();
    println!(
        "nvme_soak: {} s, {epoch} epochs ({resets} resets mid-I/O, {timeouts} forced timeouts), \
         {} writes, {} reads, {} verified reads, {} cancelled, {} failed by resets, \
         {} other errors, {corrupt} corrupt blocks; pool grew to {peak_chunks} chunk(s), {} \
         grows / {} shrinks, {} B in use at the end (admin queue only)",
        start.elapsed().as_secs(),
        tally.writes.load(Ordering::Relaxed),
        tally.reads.load(Ordering::Relaxed),
        tally.verified.load(Ordering::Relaxed),
        tally.cancelled.load(Ordering::Relaxed),
        tally.failed_by_reset.load(Ordering::Relaxed),
        tally.other_errors.load(Ordering::Relaxed),
        stats.grows,
        stats.shrinks,
        stats.in_use_bytes,
    );
    if corrupt > 0 {
        return Err(format!("{corrupt} corrupt blocks"));
    }
    let others = tally.other_errors.load(Ordering::Relaxed);
    if others > 0 {
        return Err(format!("{others} unexpected I/O errors"));
    }
    drop(rt);
    // Only the admin queue's rings may still be in use.
    let in_use = ctrl.pool_stats().in_use_bytes;
    if in_use > 64 << 10 {
        return Err(format!("{in_use} B still in use at the end"));
    }
    Ok(())
}

/// One I/O of a task.
struct IoSpec {
    /// Bounce everything (the pool grows with the load) or map from 64 KiB on.
    policy: DmaPolicy,
    lba: u64,
    first: u64,
    units: u64,
    unit: u64,
    write: bool,
    seed: u64,
    cancel_after: Option<Duration>,
}

#[allow(clippy::too_many_arguments)]
async fn one_io(
    q: &AsyncQueue,
    ns: &Namespace,
    pool: &tidepool::pool::Pool,
    mapper: &DirectMapper,
    known: &Mutex<Known>,
    tally: &Tally,
    poisoned: &mut HashSet<u64>,
    io: IoSpec,
) -> bool {
    let len = (io.units * io.unit) as usize;
    let mut mem = PageBuf::zeroed(len);
    let expect = if io.write {
        // Unknown from the moment the write may reach the device.
        let mut k = known.lock().unwrap();
        for u in 0..io.units {
            k.insert(io.first + u, None);
        }
        drop(k);
        let mut bytes = Vec::with_capacity(len);
        for u in 0..io.units {
            bytes.extend(pattern(io.seed ^ (io.first + u), io.unit as usize));
        }
        mem.as_mut_slice().copy_from_slice(&bytes);
        None
    } else {
        let k = known.lock().unwrap();
        let seeds: Option<Vec<u64>> = (0..io.units)
            .map(|u| k.get(&(io.first + u)).copied().flatten())
            .collect();
        seeds
    };
    let dir = if io.write {
        Direction::ToDevice
    } else {
        Direction::FromDevice
    };
    let fut = async {
        let data = match io.policy.prepare_wait(pool, Some(mapper), mem, dir).await {
            Ok(d) => d,
            Err(r) => return (Err(format!("prepare: {}", r.error)), None),
        };
        let (r, data) = if io.write {
            tally.writes.fetch_add(1, Ordering::Relaxed);
            q.write_data(ns, io.lba, data).await
        } else {
            tally.reads.fetch_add(1, Ordering::Relaxed);
            q.read_data(ns, io.lba, data).await
        };
        (r.map_err(|e| e.to_string()).map(|_| ()), data)
    };
    let outcome = match io.cancel_after {
        Some(after) => match tokio::time::timeout(after, fut).await {
            Ok(o) => o,
            Err(_) => {
                tally.cancelled.fetch_add(1, Ordering::Relaxed);
                if io.write {
                    poisoned.extend(io.first..io.first + io.units);
                }
                return false;
            }
        },
        None => fut.await,
    };
    match outcome {
        (Ok(()), Some(data)) => {
            let Completed::Memory(HostMemory::Page(page)) = data.complete() else {
                tally.other_errors.fetch_add(1, Ordering::Relaxed);
                return false;
            };
            if io.write {
                let mut k = known.lock().unwrap();
                for u in (0..io.units).map(|u| io.first + u) {
                    if !poisoned.contains(&u) {
                        k.insert(u, Some(io.seed ^ u));
                    }
                }
            } else if let Some(seeds) = expect {
                // Known before the read and not written since by this task (blocks are the
                // task's own): compare.
                for (u, seed) in seeds.iter().enumerate() {
                    let at = u * io.unit as usize;
                    let got = &page.as_slice()[at..at + io.unit as usize];
                    if got != pattern(*seed, io.unit as usize).as_slice() {
                        println!("  corrupt: unit {} (lba {})", io.first + u as u64, io.lba);
                        tally.corrupt.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tally.verified.fetch_add(1, Ordering::Relaxed);
            }
        }
        (Err(e), _) if is_reset(&e) => {
            tally.failed_by_reset.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        (Err(e), _) => {
            println!("  unexpected error: {e}");
            tally.other_errors.fetch_add(1, Ordering::Relaxed);
        }
        (Ok(()), None) => {
            tally.other_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    false
}

/// Errors an injected reset or timeout explains.
fn is_reset(e: &str) -> bool {
    e.contains("reset") || e.contains("deleted") || e.contains("closed") || e.contains("stopped")
}

/// A write whose completion the driver drops: the command timeout must reset the controller
/// and fail it (its unit becomes unknown); nothing may be freed while the device can DMA.
fn forced_timeout(ctrl: &Controller, ns: &Namespace, known: &Mutex<Known>, unit: u64) -> Res<()> {
    let mut q = ctrl
        .create_io_queue::<()>(4)
        .map_err(|e| format!("forced timeout: queue: {e}"))?;
    let first = MAX_TASKS * BLOCKS_PER_TASK * u64::from(ns.block_bytes()) / unit;
    known.lock().unwrap().insert(first, None);
    let mut buf = ctrl
        .pool()
        .try_alloc(unit as usize)
        .map_err(|e| e.to_string())?;
    buf.write_at(0, &pattern(7, unit as usize))
        .map_err(|e| e.to_string())?;
    q.drop_next_completions(1);
    q.submit_write(ns, first * unit / u64::from(ns.block_bytes()), buf, ())
        .map_err(|e| format!("forced timeout: submit: {}", e.error))?;
    let start = Instant::now();
    let mut out = Vec::new();
    loop {
        match q.poll_checked(&mut out) {
            Err(NvmeError::CommandTimeout { .. }) => break,
            Err(e) => return Err(format!("forced timeout: expected CommandTimeout, got {e}")),
            Ok(_) if !out.is_empty() => {
                return Err("forced timeout: the dropped completion was delivered".into())
            }
            Ok(_) => {}
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err("forced timeout: no timeout within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if out.len() != 1 || out[0].data.is_none() {
        return Err("forced timeout: the failed write did not give its buffer back".into());
    }
    Ok(())
}

/// Reads back every unit with a known pattern, and rewrites then checks the unknown ones.
/// Returns the corrupt count.
fn final_check(ctrl: &Controller, ns: &Namespace, known: &Mutex<Known>, unit: u64) -> Res<u64> {
    let mut q = ctrl
        .create_io_queue::<()>(8)
        .map_err(|e| format!("final check: queue: {e}"))?;
    let block = u64::from(ns.block_bytes());
    let entries: Vec<(u64, Option<u64>)> = known
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (*k, *v))
        .collect();
    let (mut corrupt, mut checked, mut rewritten) = (0u64, 0u64, 0u64);
    let mut got = vec![0u8; unit as usize];
    for (u, seed) in entries {
        let seed = match seed {
            Some(s) => s,
            None => {
                let s = 0xf1a1 ^ u;
                q.write(ns, u * unit / block, &pattern(s, unit as usize))
                    .map_err(|e| format!("final rewrite of unit {u}: {e}"))?;
                rewritten += 1;
                s
            }
        };
        q.read(ns, u * unit / block, &mut got)
            .map_err(|e| format!("final read of unit {u}: {e}"))?;
        checked += 1;
        if got != pattern(seed, unit as usize) {
            println!("  corrupt at the end: unit {u}");
            corrupt += 1;
        }
    }
    println!(
        "  final check: {checked} units read back ({rewritten} of unknown content rewritten first)"
    );
    Ok(corrupt)
}
