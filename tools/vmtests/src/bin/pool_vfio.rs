//! # pool_vfio: the pool against real VFIO — growth maps, shrink unmaps, the device DMAs
//!
//! The pool issue's VM check, on QEMU's NVMe behind the emulated Intel IOMMU:
//! 1. a pool over the device's view (VFIO type1 or iommufd, as `TIDEPOOL_VFIO_BACKEND` asks)
//!    starts with one 2 MiB hugepage chunk;
//! 2. awaiting allocations beyond it make the background grower add chunks, each one
//!    `VFIO_IOMMU_MAP_DMA` (type1: the kernel's `dma_avail` drops by exactly the pool's chunk
//!    count) or `IOMMU_IOAS_MAP` (iommufd: the kernel keeps no count; the view's own is checked);
//! 3. the NVMe controller writes from and reads into buffers in those grown chunks (zero copy),
//!    and every byte read back is checked;
//! 4. once everything is released and idle past the shrink delay, the grower gives chunks back:
//!    `dma_avail` rises by exactly the chunks unmapped, and nothing is left in use; at teardown
//!    every chunk is unshared (iommufd: an unmap-all of the IOAS then finds 0 bytes mapped).
//!
//! The harness fails the test if the IOMMU blocked any of that DMA (dmesg), which is how a
//! wrong IOVA in a grown chunk would show: QEMU's NVMe completes such commands with success.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool::device::backend::{BackendChoice, VfioDomain};
use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{DmaBuf, Pool, PoolConfig};
use tidepool::share::DeviceView;
use tidepool_nvme::{Controller, ControllerConfig, Done};
use tidepool_vmtests::HarnessEnv;

type Res<T> = Result<T, String>;

const MIB: usize = 1 << 20;
/// One buffer: the controller's largest transfer (MDTS: 512 KiB on QEMU's NVMe).
const BUF: usize = 512 << 10;
/// Buffers held at once: 16 MiB, eight times the prefill.
const BUFFERS: usize = 32;

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("pool_vfio: PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("pool_vfio: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `dma_avail` for printing ("-" for iommufd).
fn fmt_avail(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// The kernel's count of mappings still available: type1's `dma_avail`; `None` for iommufd,
/// which has no such count.
fn dma_avail(domain: &VfioDomain) -> Res<Option<u64>> {
    match domain {
        VfioDomain::Type1(c) => {
            let info = c.iommu_info().map_err(|e| e.to_string())?;
            info.dma_avail
                .map(|n| Some(u64::from(n)))
                .ok_or_else(|| "the kernel reports no dma_avail".to_string())
        }
        VfioDomain::Iommufd(_) => Ok(None),
    }
}

fn run() -> Res<()> {
    let env = HarnessEnv::from_env().map_err(|e| e.to_string())?;
    let choice = BackendChoice::from_env().map_err(|e| e.to_string())?;
    let domain = VfioDomain::for_device(choice, env.nvme_bdf()).map_err(|e| e.to_string())?;
    let device = domain.open(env.nvme_bdf()).map_err(|e| e.to_string())?;
    let view = domain.view(u64::MAX).map_err(|e| e.to_string())?;
    println!("pool_vfio: backend {} ({})", domain.backend(), view.kind());
    let before = dma_avail(&domain)?;
    let cfg = PoolConfig {
        memory: MemoryConfig {
            page_size: PageSize::Huge2M,
            allow_small_pages: false,
        },
        chunk_bytes: 2 * MIB,
        prefill_bytes: 2 * MIB,
        max_bytes: 64 * MIB,
        max_buffer: MIB,
        low_watermark: 0,
        high_watermark: 2 * MIB,
        reserve_bytes: 0,
        shrink_delay: Duration::from_millis(200),
        peak_half_life: Duration::ZERO,
        ..PoolConfig::default()
    };
    let pool = Pool::new(view.clone(), cfg).map_err(|e| e.to_string())?;
    let ctrl_cfg = ControllerConfig {
        interrupts: false,
        ..ControllerConfig::default()
    };
    let ctrl = Controller::new(device, pool.clone(), ctrl_cfg).map_err(|e| e.to_string())?;
    let ns = ctrl.namespace(1).map_err(|e| e.to_string())?;
    // In use now: the admin queue. The I/O queue adds its rings and, as it goes, one PRP list
    // page per command slot (kept for reuse); all of it returns when the queue is dropped.
    let before_queue = pool.stats().in_use_bytes;
    let mut q = ctrl
        .create_io_queue::<usize>(64)
        .map_err(|e| e.to_string())?;
    let base = pool.stats();
    println!(
        "pool_vfio: start: {} chunk(s), {} B in use (controller queues), dma_avail {} -> {}",
        base.chunks,
        base.in_use_bytes,
        fmt_avail(before),
        fmt_avail(dma_avail(&domain)?)
    );
    check_mappings(&pool, &domain, &view, before)?;

    // 1. Awaiting allocations beyond the prefill: the grower must add chunks.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let pattern = |i: usize, j: usize| ((i * 131 + j * 7) % 251) as u8;
    let mut bufs: Vec<DmaBuf> = Vec::new();
    for i in 0..BUFFERS {
        let mut b = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(20), pool.alloc(BUF)).await
            })
            .map_err(|_| format!("allocation {i} not served within 20 s: {:?}", pool.stats()))?
            .map_err(|e| e.to_string())?;
        let data: Vec<u8> = (0..BUF).map(|j| pattern(i, j)).collect();
        b.write_at(0, &data).map_err(|e| e.to_string())?;
        bufs.push(b);
    }
    let grown = pool.stats();
    println!(
        "pool_vfio: after {BUFFERS} x 512 KiB: {} chunks, {} grows ({} forced by the bounded wait), {} waits, dma_avail {}",
        grown.chunks,
        grown.grows,
        grown.sync_grows,
        grown.waits,
        fmt_avail(dma_avail(&domain)?)
    );
    if grown.grows == 0 {
        return Err("the pool never grew".into());
    }
    check_mappings(&pool, &domain, &view, before)?;

    // 2. The device reads every grown buffer (write to disk), then writes fresh pool buffers
    //    (read back), all zero copy.
    let blocks_per_buf = (BUF / ns.block_bytes() as usize) as u64;
    let mut done: Vec<Done<usize>> = Vec::new();
    for (i, b) in bufs.drain(..).enumerate() {
        q.submit_write(&ns, i as u64 * blocks_per_buf, b, i)
            .map_err(|e| format!("submit write {i}: {e:?}"))?;
    }
    wait_all(&mut q, &mut done, BUFFERS)?;
    let mut back = Vec::new();
    for d in done.drain(..) {
        d.result.map_err(|e| format!("write {}: {e}", d.user))?;
        back.push(d.data.ok_or("write gave no buffer back")?);
    }
    drop(back);
    for i in 0..BUFFERS {
        let b = rt.block_on(pool.alloc(BUF)).map_err(|e| e.to_string())?;
        q.submit_read(&ns, i as u64 * blocks_per_buf, b, i)
            .map_err(|e| format!("submit read {i}: {e:?}"))?;
    }
    wait_all(&mut q, &mut done, BUFFERS)?;
    let mut got = vec![0u8; BUF];
    for d in done.drain(..) {
        d.result.map_err(|e| format!("read {}: {e}", d.user))?;
        let b = d
            .data
            .and_then(tidepool::data::DmaData::into_buf)
            .ok_or("read gave no buffer back")?;
        b.read_at(0, &mut got).map_err(|e| e.to_string())?;
        if let Some(j) = (0..BUF).find(|&j| got[j] != pattern(d.user, j)) {
            return Err(format!("buffer {} differs at byte {j}", d.user));
        }
    }
    println!(
        "pool_vfio: {} MiB written from and read into grown chunks, all bytes match",
        BUFFERS * BUF / MIB
    );

    // 3. Idle: the grower gives the grown chunks back.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = pool.stats();
        if s.shrinks > 0 && s.chunks <= base.chunks + 1 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("no shrink within 20 s of going idle: {s:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let end = pool.stats();
    println!(
        "pool_vfio: idle: {} chunks after {} shrinks, {} B in use, dma_avail {}",
        end.chunks,
        end.shrinks,
        end.in_use_bytes,
        fmt_avail(dma_avail(&domain)?)
    );
    check_mappings(&pool, &domain, &view, before)?;
    drop(q);
    let in_use = pool.stats().in_use_bytes;
    if in_use != before_queue {
        return Err(format!(
            "in use {in_use} B after dropping the I/O queue, {before_queue} B before creating it"
        ));
    }
    // Teardown: the pool (its last handle may be released on the grower thread) unshares
    // every chunk. The controller closes the device too, after which the container has no
    // IOMMU left to ask, so the view's own count is the evidence here; the kernel's count
    // was checked against it above at every stage.
    drop(pool);
    drop(ctrl);
    let deadline = Instant::now() + Duration::from_secs(5);
    while view.usage().mappings != 0 {
        if Instant::now() > deadline {
            return Err(format!("{:?} still shared after teardown", view.usage()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "pool_vfio: teardown unshared every chunk ({:?})",
        view.usage()
    );
    // iommufd's IOAS outlives its devices: ask the kernel itself that nothing is left mapped.
    if let VfioDomain::Iommufd(ioas) = &domain {
        let left = ioas.unmap_all().map_err(|e| e.to_string())?;
        if left != 0 {
            return Err(format!(
                "the IOAS still had {left} B mapped after the pool was dropped"
            ));
        }
        println!("pool_vfio: the kernel confirms the IOAS is empty (unmap-all found 0 B)");
    }
    Ok(())
}

/// The kernel's count of mappings used equals the pool's chunks (the pool is this
/// container's only user) and the view's own count.
fn check_mappings(
    pool: &Pool,
    domain: &VfioDomain,
    view: &Arc<dyn DeviceView>,
    before: Option<u64>,
) -> Res<()> {
    let chunks = pool.stats().chunks;
    let view_count = view.usage().mappings;
    // iommufd keeps no count the kernel reports: the view's own count stands in for it.
    let used = match (before, dma_avail(domain)?) {
        (Some(before), Some(now)) => before - now,
        _ => view_count,
    };
    if used != chunks || view_count != chunks {
        return Err(format!(
            "kernel counts {used} mappings, view {view_count}, pool {chunks} chunks"
        ));
    }
    Ok(())
}

fn wait_all(
    q: &mut tidepool_nvme::IoQueue<usize>,
    done: &mut Vec<Done<usize>>,
    n: usize,
) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.len() < n {
        q.poll(done).map_err(|e| e.to_string())?;
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {n} commands completed in 30 s",
                done.len()
            ));
        }
    }
    Ok(())
}
