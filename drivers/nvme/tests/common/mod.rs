//! Shared rig for the host tests: an emulated NVMe controller (`tidepool_emu::EmuNvme`) behind
//! the `PciDevice` seam, brought up by the real driver over a small pool of locked 4 KiB pages.
//!
//! RLIMIT_MEMLOCK is 8 MiB on the test hosts: each rig's pool is 2 MiB at most.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Pool, PoolConfig};
use tidepool_emu::{EmuNvme, EmuNvmeConfig};
use tidepool_nvme::{Controller, ControllerConfig, DataPointer, Done, IoQueue, Namespace};

/// A pool of `bytes` (prefilled, no growth, no background thread) with buffers up to
/// `max_buffer`.
pub fn pool_config_sized(bytes: usize, max_buffer: usize) -> PoolConfig {
    PoolConfig {
        memory: MemoryConfig {
            page_size: PageSize::Small4K,
            allow_small_pages: true,
        },
        chunk_bytes: bytes.min(1 << 20).max(max_buffer),
        prefill_bytes: bytes,
        max_bytes: bytes,
        max_buffer,
        low_watermark: 0,
        high_watermark: bytes.min(1 << 20).max(max_buffer),
        shrink_delay: Duration::from_secs(60),
        reserve_bytes: 0,
        transient: false,
        background: false,
        ..PoolConfig::default()
    }
}

/// The default test pool: 1 MiB, buffers up to 256 KiB.
pub fn pool_config() -> PoolConfig {
    pool_config_sized(1 << 20, 256 << 10)
}

/// Polled queues, a short timeout, the test pool.
pub fn ctrl_config() -> ControllerConfig {
    ControllerConfig {
        io_queues: 4,
        admin_entries: 16,
        command_timeout: Duration::from_millis(200),
        interrupts: false,
        pool: pool_config(),
        shadow_doorbells: false,
        data_pointer: DataPointer::Auto,
    }
}

/// The emulated controller's default geometry: 2 MiB namespace of 512 B blocks, 4 queues.
pub fn emu_config() -> EmuNvmeConfig {
    EmuNvmeConfig {
        namespace_bytes: 2 << 20,
        block_bytes: 512,
        max_queues: 4,
        mqes: 255,
        sgl: true,
        msix_vectors: 5,
        mdts: 5,
        inline_doorbells: false,
    }
}

/// A controller up on an emulated device, with namespace 1.
pub struct Rig {
    pub nvme: Arc<EmuNvme>,
    pub ctrl: Controller,
    pub ns: Namespace,
    pub pool: Pool,
    /// Pool bytes in use right after bring-up (the admin rings).
    pub baseline: u64,
}

impl Rig {
    pub fn new() -> Rig {
        Rig::with(emu_config(), ctrl_config())
    }

    pub fn with(emu: EmuNvmeConfig, cfg: ControllerConfig) -> Rig {
        let nvme = Arc::new(EmuNvme::new(emu).expect("emulated controller"));
        let ctrl = Controller::with_device(nvme.clone(), cfg).expect("bring-up");
        Rig::around(nvme, ctrl)
    }

    /// A rig around a controller already brought up on `nvme`.
    pub fn around(nvme: Arc<EmuNvme>, ctrl: Controller) -> Rig {
        let ns = ctrl.namespace(1).expect("namespace 1");
        let pool = ctrl.pool().clone();
        let baseline = pool.stats().in_use_bytes;
        Rig {
            nvme,
            ctrl,
            ns,
            pool,
            baseline,
        }
    }

    pub fn in_use(&self) -> u64 {
        self.pool.stats().in_use_bytes
    }

    pub fn queue(&self, depth: u32) -> IoQueue<u64> {
        self.ctrl.create_io_queue(depth).expect("I/O queue")
    }

    /// The namespace's bytes at `offset`.
    pub fn ns_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.nvme.read_namespace(offset, &mut b).unwrap();
        b
    }

    /// Drops the controller (and the emulator) and checks that every pool byte came back and
    /// the device never did DMA with bus mastering off.
    pub fn finish(self) {
        let Rig {
            nvme, ctrl, pool, ..
        } = self;
        assert_eq!(nvme.stats().dma_after_bus_master_off, 0);
        drop(ctrl);
        drop(nvme);
        assert_eq!(pool.stats().in_use_bytes, 0, "every pool byte is back");
    }
}

/// A deterministic byte pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add((i >> 8) as u8) ^ seed)
        .collect()
}

/// Polls `q` until `n` completions arrived (at most 5 s), returning them.
pub fn poll_n(q: &mut IoQueue<u64>, n: usize) -> Vec<Done<u64>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = Vec::new();
    while out.len() < n {
        q.poll(&mut out).expect("poll");
        assert!(
            Instant::now() < deadline,
            "{} of {n} completions in 5 s",
            out.len()
        );
        std::thread::yield_now();
    }
    out
}

/// Polls with the health check until `poll_checked` reports an error or `limit` passes;
/// returns the error and everything the polls delivered.
pub fn poll_until_error(
    q: &mut IoQueue<u64>,
    limit: Duration,
) -> (tidepool_nvme::NvmeError, Vec<Done<u64>>) {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    loop {
        if let Err(e) = q.poll_checked(&mut out) {
            return (e, out);
        }
        assert!(Instant::now() < deadline, "no error within {limit:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for `cond` (at most 5 s).
pub fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Runs `f` on a thread and fails the test if it has not returned within `limit` (a hang
/// guard: the hung thread is left behind, the test fails).
pub fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("did not finish within {limit:?}: hang")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            panic!("the guarded code panicked (see above)")
        }
    }
}
