//! Real-device replay: a trace through the vhost-user-blk data plane against
//! `qemu-storage-daemon`, under each policy.
//!
//! The pool is the same `tidepool::pool::Pool`, but on the driver's `VhostUserView`: each chunk
//! is a memory region the daemon maps (SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG), so growth
//! and shrinking pay the real protocol round trips, and the device is real: the daemon reads
//! and writes a file image through io_uring. Nothing is modelled except arrivals.
//!
//! The request loop is [`crate::replay`]'s: each request, at its arrival time, is a
//! `BlockDevice::read_at` / `write_at` of a private buffer of its size (rounded up to 512 B).
//! That call allocates from the pool (awaiting capacity), copies, submits, awaits the
//! completion and copies out. What differs from the model, beyond what [`crate::replay`] says:
//! - **holds** are the daemon's real service times, not the trace's `hold_us`. With
//!   `--bps` the daemon is throttled (a QEMU throttle group) to the bandwidth the trace's
//!   disk was modelled with (400 MB/s for `bursty`), so that bursts pile up as they do there;
//! - the virtqueue rings (one queue of 256 descriptors) live in the pool too, and a request
//!   holds its pool buffer while it waits for free descriptors.
//!
//! The daemon is started per replay on a fresh sparse image (as the driver's tests do:
//! `drivers/vhost-user-blk/tests/common/mod.rs`) and stopped afterwards, so every policy meets
//! the same cold backend.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool::pool::{Pool, PoolConfig};
use tidepool_vhost_user_blk::{
    BlockDevice, ConnectOptions, Connection, DeviceOptions, VhostUserView, ViewOptions,
};

use crate::replay::{self, BlockTarget};
use crate::run::RunResult;
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
    let dev = BlockDevice::start(
        conn,
        pool.clone(),
        DeviceOptions {
            io_timeout: Duration::from_secs(60),
            ..DeviceOptions::default()
        },
    )
    .await
    .map_err(|e| format!("starting the block device: {e}"))?;
    let target = Arc::new(VhostTarget {
        dev,
        span: image_bytes,
    });
    let mut result =
        replay::replay_requests(trace, config, &pool, target.clone(), stop_on_failure).await?;
    let target = Arc::try_unwrap(target).map_err(|_| "a replay task still holds the device")?;
    target.dev.shutdown().await;
    // After the shutdown, so that the rings' memory is back too: in use must be 0.
    result.stats = pool.stats();
    Ok(result)
}

/// The vhost-user-blk device as a replay target.
struct VhostTarget {
    dev: BlockDevice,
    span: u64,
}

impl BlockTarget for VhostTarget {
    fn span_bytes(&self) -> u64 {
        self.span
    }

    fn block_bytes(&self) -> usize {
        512
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.dev
            .read_at(offset, buf)
            .await
            .map_err(|e| e.to_string())
    }

    async fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), String> {
        self.dev
            .write_at(offset, buf)
            .await
            .map_err(|e| e.to_string())
    }
}
