//! Real-device replay: a trace through the vhost-user-blk data plane against
//! `qemu-storage-daemon`, under each policy.
//!
//! The pool is the same `tidepool::pool::Pool`, but on the driver's `VhostUserView`: each chunk
//! is a memory region the daemon maps (SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG), so growth
//! and shrinking pay the real protocol round trips, and the device is real: the daemon reads
//! and writes a file image through io_uring. Nothing is modelled except arrivals.
//!
//! For each request, at its arrival time (tokio's timer: ≤ 1 ms late, measured as the arrival
//! lag), a task takes a slot of its trace device (the trace's queue depth), then calls
//! `BlockDevice::read_at` / `write_at` with a private buffer of the request's size (rounded up
//! to 512 B) at an offset that walks the image. That call allocates from the pool (awaiting
//! capacity, or failing at once when the policy does not wait), copies, submits, awaits the
//! completion and copies out. What differs from the model:
//! - **latency** is the whole I/O (pool wait + queueing + the daemon's service), not the map
//!   call alone; the pool's own wait histogram is in the "pool waits" column;
//! - **holds** are the daemon's real service times, not the trace's `hold_us`. With
//!   `--bps` the daemon is throttled (a QEMU throttle group) to the bandwidth the trace's
//!   disk was modelled with (400 MB/s for `bursty`), so that bursts pile up as they do there;
//! - the block API always awaits: a trace's `may_wait = false` requests await as well;
//! - the virtqueue rings (one queue of 256 descriptors) live in the pool too, and a request
//!   holds its pool buffer while it waits for free descriptors.
//!
//! The daemon is started per replay on a fresh sparse image (as the driver's tests do:
//! `drivers/vhost-user-blk/tests/common/mod.rs`) and stopped afterwards, so every policy meets
//! the same cold backend.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidepool::pool::{Direction, Pool, PoolConfig};
use tidepool_vhost_user_blk::{
    BlockDevice, ConnectOptions, Connection, DeviceOptions, VhostUserView, ViewOptions,
};
use tokio::sync::Semaphore;

use crate::device::ClockReport;
use crate::run::{MapResult, Outcome, RunResult, Sample};
use crate::trace::Trace;

/// How to reach the backend.
#[derive(Clone, Debug)]
pub struct BackendOptions {
    /// Directory for the image, socket and log.
    pub dir: PathBuf,
    /// Image size, bytes.
    pub image_bytes: u64,
    /// Throttle the daemon to this many bytes/s (reads + writes), or not at all.
    pub bps: Option<u64>,
}

/// A running `qemu-storage-daemon` exporting one vhost-user-blk device; killed on drop.
pub struct Backend {
    child: Child,
    socket: PathBuf,
}

impl Backend {
    /// Starts the daemon on a fresh sparse image (see the module doc).
    pub fn start(o: &BackendOptions) -> Result<Backend, String> {
        std::fs::create_dir_all(&o.dir)
            .map_err(|e| format!("creating {}: {e}", o.dir.display()))?;
        let image = o.dir.join("disk.img");
        let socket = o.dir.join("vhost.sock");
        let _ = std::fs::remove_file(&socket);
        let f = std::fs::File::create(&image)
            .map_err(|e| format!("creating {}: {e}", image.display()))?;
        f.set_len(o.image_bytes)
            .map_err(|e| format!("sizing {}: {e}", image.display()))?;
        drop(f);
        let log = std::fs::File::create(o.dir.join("daemon.log"))
            .map_err(|e| format!("creating the daemon log: {e}"))?;
        let mut cmd = Command::new("qemu-storage-daemon");
        let mut export_node = "disk0";
        if let Some(bps) = o.bps {
            cmd.arg("--object")
                .arg(format!("throttle-group,id=tg0,x-bps-total={bps}"));
        }
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct=off,aio=io_uring",
                image.display()
            ))
            .arg("--blockdev")
            .arg("driver=raw,node-name=disk0,file=file0");
        if o.bps.is_some() {
            cmd.arg("--blockdev")
                .arg("driver=throttle,node-name=thr0,throttle-group=tg0,file=disk0");
            export_node = "thr0";
        }
        cmd.arg("--export").arg(format!(
            "type=vhost-user-blk,id=exp0,node-name={export_node},addr.type=unix,addr.path={},writable=on,num-queues=1",
            socket.display()
        ));
        let child = cmd
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "starting qemu-storage-daemon: {e} (Debian: apt-get install qemu-system-common)"
                )
            })?;
        let mut b = Backend { child, socket };
        let t = Instant::now();
        while !b.socket.exists() {
            if let Ok(Some(status)) = b.child.try_wait() {
                return Err(format!(
                    "qemu-storage-daemon exited ({status}); see {}",
                    o.dir.join("daemon.log").display()
                ));
            }
            if t.elapsed() > Duration::from_secs(10) {
                return Err("qemu-storage-daemon did not create its socket in 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(b)
    }

    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replays `trace` through a fresh daemon with a pool made from `config` (see the module doc).
/// `stop_on_failure` stops releasing arrivals at the first failed I/O (the static search's
/// probes).
pub fn replay(
    trace: &Trace,
    config: PoolConfig,
    backend: &BackendOptions,
    stop_on_failure: bool,
) -> Result<RunResult, String> {
    let daemon = Backend::start(backend)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("tplab-vhost")
        .build()
        .map_err(|e| format!("starting the tokio runtime: {e}"))?;
    let socket = daemon.socket().to_path_buf();
    let result = rt.block_on(replay_on(
        trace,
        config,
        socket,
        backend.image_bytes,
        stop_on_failure,
    ));
    drop(rt);
    drop(daemon);
    result
}

async fn replay_on(
    trace: &Trace,
    config: PoolConfig,
    socket: PathBuf,
    image_bytes: u64,
    stop_on_failure: bool,
) -> Result<RunResult, String> {
    let conn = tokio::task::spawn_blocking(move || {
        Connection::connect(&socket, &ConnectOptions::default())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let view = Arc::new(VhostUserView::new(conn.clone(), ViewOptions::new()));
    let cfg = config.clone();
    let pool = tokio::task::spawn_blocking(move || Pool::new(view, cfg))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("making the pool on the vhost-user view: {e}"))?;
    let dev = Arc::new(
        BlockDevice::start(
            conn,
            pool.clone(),
            DeviceOptions {
                io_timeout: Duration::from_secs(60),
                ..DeviceOptions::default()
            },
        )
        .await
        .map_err(|e| format!("starting the block device: {e}"))?,
    );
    let start = Instant::now();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (pool, sampling) = (pool.clone(), sampling.clone());
        std::thread::Builder::new()
            .name("tplab-sampler".into())
            .spawn(move || {
                let mut out = Vec::new();
                while sampling.load(Ordering::SeqCst) {
                    out.push(sample(&pool, start));
                    std::thread::sleep(Duration::from_millis(1));
                }
                out
            })
            .map_err(|e| e.to_string())?
    };
    let slots: Vec<Option<Arc<Semaphore>>> = trace
        .devices
        .iter()
        .map(|d| d.queue_depth.map(|q| Arc::new(Semaphore::new(q))))
        .collect();
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(trace.requests.len())));
    let failed = Arc::new(AtomicBool::new(false));
    let span = image_bytes.saturating_sub(4 << 20).max(1 << 20);
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
        let len = req.size.div_ceil(512) * 512;
        let at = offset;
        offset = (offset + len as u64).next_multiple_of(4096) % span;
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
    samples.push(sample(&pool, start));
    let dev = Arc::try_unwrap(dev).map_err(|_| "a replay task still holds the device")?;
    dev.shutdown().await;
    // After the shutdown, so that the rings' memory is back too: in use must be 0.
    let stats = pool.stats();
    lags.sort_unstable();
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes lock"));
    Ok(RunResult {
        config,
        samples,
        outcomes,
        stats,
        elapsed_us,
        stopped_early: stop_on_failure && failed.load(Ordering::SeqCst),
        clock: ClockReport {
            arrival_lag_us: lags,
            released,
        },
    })
}

fn sample(pool: &Pool, start: Instant) -> Sample {
    let s = pool.stats();
    Sample {
        t_us: start.elapsed().as_micros() as u64,
        capacity_bytes: s.capacity_bytes,
        in_use_bytes: s.in_use_bytes,
        waiters: s.waiters,
    }
}
