//! Test support: a real `qemu-storage-daemon` exporting a temporary image over vhost-user-blk.
#![allow(dead_code)]

pub mod backend;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Pool, PoolConfig};
use tidepool_vhost_user_blk::*;

/// A running daemon on a temporary image. Killed and cleaned up on drop.
pub struct Daemon {
    pub dir: PathBuf,
    pub image: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts the daemon on a fresh sparse image of `bytes`, `queues` queues, io_uring AIO.
    pub fn start(name: &str, bytes: u64, queues: u16) -> Daemon {
        let dir = std::env::temp_dir().join(format!("vhost-blk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(bytes).unwrap();
        drop(f);
        let socket = dir.join("vhost.sock");
        let log = dir.join("daemon.log");
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct=off,aio=io_uring",
                image.display()
            ))
            .arg("--blockdev")
            .arg("driver=raw,node-name=disk0,file=file0")
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                socket.display()
            ))
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon must be installed (apt-get install qemu-system-common)");
        // Ready when the socket listens: the file appears at bind(), a moment before listen(),
        // and a connection in between is refused (seen under load).
        let t = Instant::now();
        while !listening(&socket) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "daemon did not listen on its socket within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            dir,
            image,
            socket,
            log,
            child: Some(child),
        }
    }

    /// Kills the daemon at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the daemon cleanly (SIGTERM) and waits for it, so the image is complete.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            loop {
                if c.try_wait().unwrap().is_some() {
                    break;
                }
                if t.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asserts the daemon logged nothing alarming.
    pub fn assert_quiet_log(&self) {
        let log = self.log_text();
        for bad in ["panic", "rror", "nvalid", "ailed", "not found"] {
            assert!(!log.contains(bad), "daemon log mentions {bad:?}:\n{log}");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// 2 MiB hugepages if free, else 4 KiB pages.
pub fn memory() -> MemoryConfig {
    MemoryConfig {
        page_size: PageSize::Huge2M,
        allow_small_pages: true,
    }
}

/// A pool config of `chunk`-byte chunks, `prefill` bytes prefilled, capped at `max`.
pub fn pool_config(chunk: usize, prefill: usize, max: usize) -> PoolConfig {
    PoolConfig {
        memory: memory(),
        chunk_bytes: chunk,
        prefill_bytes: prefill,
        max_bytes: max,
        max_buffer: (2 << 20).min(chunk),
        low_watermark: chunk / 4,
        high_watermark: chunk / 4 + chunk,
        reserve_bytes: 64 << 10,
        ..PoolConfig::default()
    }
}

/// Connects, builds the pool on the connection's view and starts the device.
pub async fn open(
    d: &Daemon,
    cfg: PoolConfig,
    view_opts: ViewOptions,
    opts: DeviceOptions,
) -> (BlockDevice, Arc<VhostUserView>) {
    let sock = d.socket.clone();
    let conn =
        tokio::task::spawn_blocking(move || Connection::connect(&sock, &ConnectOptions::default()))
            .await
            .unwrap()
            .expect("connect");
    let view = Arc::new(VhostUserView::new(conn.clone(), view_opts));
    let v2 = view.clone();
    let pool = tokio::task::spawn_blocking(move || Pool::new(v2, cfg))
        .await
        .unwrap()
        .expect("pool");
    let dev = BlockDevice::start(conn, pool, opts).await.expect("start");
    (dev, view)
}

/// Connects to the backend on `socket`, builds the pool on the connection's view and starts
/// the device. Returns what `start` returned and a handle on the pool, so that a test can
/// check that it ends with nothing in use whatever happened.
pub async fn try_open(
    socket: &Path,
    cfg: PoolConfig,
    opts: DeviceOptions,
) -> (Result<BlockDevice, Error>, Pool) {
    let sock = socket.to_path_buf();
    let conn =
        tokio::task::spawn_blocking(move || Connection::connect(&sock, &ConnectOptions::default()))
            .await
            .unwrap()
            .expect("connect");
    let view = Arc::new(VhostUserView::new(conn.clone(), ViewOptions::new()));
    let pool = tokio::task::spawn_blocking(move || Pool::new(view, cfg))
        .await
        .unwrap()
        .expect("pool");
    (BlockDevice::start(conn, pool.clone(), opts).await, pool)
}

/// xorshift64*: reproducible test randomness without a dependency.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Whether a Unix socket bound at `path` is listening: its line in `/proc/net/unix` has
/// `__SO_ACCEPTCON` (0x10000) in its flags column.
fn listening(path: &std::path::Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() >= 8
            && cols[7] == path
            && u32::from_str_radix(cols[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}
