//! # nvme_driver: tidepool-nvme end to end on the harness's NVMe controller
//!
//! 1. **Identify**: model, serial, firmware, version, MDTS; namespace 1's size must equal the
//!    image size (`TIDEPOOL_NVME_BYTES`, default 256 MiB).
//! 2. **Bad input** gives the typed errors: LBA out of range, a buffer that is not a whole
//!    number of blocks, a queue deeper than MQES, an oversized zero-copy buffer, and a PCI
//!    address that is not bound to vfio-pci.
//! 3. **Polling mode**: `QUEUES` threads, each with its own polled queue, write random sizes
//!    (512 B .. 1 MiB, beyond MDTS so requests split) at random block offsets of its own region,
//!    then read every write back and compare. `TIDEPOOL_NVME_VERIFY_MIB` MiB in all (default 64).
//! 4. **Async mode**: the same over two `AsyncQueue`s from 32 tokio tasks.
//! 5. **Benchmarks** (polling, zero copy, pre-allocated pool buffers, one queue, QD32):
//!    4 KiB random read IOPS and 128 KiB sequential read throughput, `TIDEPOOL_NVME_BENCH_SECS`
//!    seconds each (default 3).
//!
//! Exit 0 = every check passed. The harness also checks dmesg for IOMMU faults.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use tidepool_nvme::{
    AsyncConfig, AsyncQueue, Controller, ControllerConfig, Done, Namespace, NvmeError,
};
use tidepool_vmtests::{env_u64, HarnessEnv, Rng};

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("nvme_driver: PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("nvme_driver: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res<T> = Result<T, String>;

fn run() -> Res<()> {
    let env = HarnessEnv::from_env().map_err(|e| e.to_string())?;
    let bdf = env.nvme_bdf().to_string();
    let cfg = ControllerConfig {
        io_queues: 8,
        ..ControllerConfig::default()
    };
    let ctrl = Controller::open(&bdf, cfg).map_err(|e| format!("open {bdf}: {e}"))?;
    let ns = identify(&ctrl)?;
    bad_input(&ctrl, &ns)?;
    let verify_bytes = env_u64("TIDEPOOL_NVME_VERIFY_MIB", 64) << 20;
    polling_verify(&ctrl, &ns, 4, verify_bytes)?;
    async_verify(&ctrl, &ns, 2, 32, verify_bytes)?;
    let secs = env_u64("TIDEPOOL_NVME_BENCH_SECS", 3);
    bench(&ctrl, &ns, 4096, true, secs)?;
    bench(&ctrl, &ns, 128 << 10, false, secs)?;
    let smart = ctrl.smart_log().map_err(|e| e.to_string())?;
    println!(
        "smart: host reads {} writes {}, critical warning {:#x}, media errors {}",
        smart.host_reads, smart.host_writes, smart.critical_warning, smart.media_errors
    );
    let errors = ctrl.error_log().map_err(|e| e.to_string())?;
    println!("error log: {} entries", errors.len());
    println!("pool: {}", ctrl.pool_stats().to_json());
    Ok(())
}

fn identify(ctrl: &Controller) -> Res<Namespace> {
    let id = ctrl.identify();
    println!(
        "identify: model {:?} serial {:?} firmware {:?} version {} MDTS {} ({:?} B) nn {}",
        id.model,
        id.serial,
        id.firmware,
        ctrl.version(),
        id.mdts,
        id.max_transfer_bytes(ctrl.cap().min_page_bytes()),
        id.nn
    );
    if id.model.is_empty() || id.serial.is_empty() {
        return Err("empty model or serial".into());
    }
    let ns = ctrl.namespace(1).map_err(|e| e.to_string())?;
    let want = env_u64("TIDEPOOL_NVME_BYTES", 256 << 20);
    println!(
        "namespace 1: {} blocks of {} B = {} B (image {} B), max transfer {} B, max queue depth {}",
        ns.blocks(),
        ns.block_bytes(),
        ns.bytes(),
        want,
        ns.max_transfer(),
        ctrl.max_queue_depth()
    );
    if ns.bytes() != want {
        return Err(format!("namespace is {} B, image is {want} B", ns.bytes()));
    }
    Ok(ns)
}

fn expect_err(what: &str, r: Result<(), NvmeError>, ok: impl Fn(&NvmeError) -> bool) -> Res<()> {
    match r {
        Err(e) if ok(&e) => {
            println!("bad input ({what}): {e}");
            Ok(())
        }
        Err(e) => Err(format!("{what}: wrong error: {e}")),
        Ok(()) => Err(format!("{what}: accepted")),
    }
}

fn bad_input(ctrl: &Controller, ns: &Namespace) -> Res<()> {
    let mut q = ctrl.create_io_queue::<()>(8).map_err(|e| e.to_string())?;
    let mut b = vec![0u8; 4096];
    expect_err(
        "LBA out of range",
        q.read(ns, ns.blocks() - 1, &mut b),
        |e| matches!(e, NvmeError::LbaOutOfRange { .. }),
    )?;
    expect_err("not a block multiple", q.read(ns, 0, &mut b[..1000]), |e| {
        matches!(e, NvmeError::NotBlockMultiple { .. })
    })?;
    let too_deep = ctrl.max_queue_depth() + 1;
    expect_err(
        "queue depth beyond MQES",
        ctrl.create_io_queue::<()>(too_deep).map(drop),
        |e| matches!(e, NvmeError::QueueDepth { .. }),
    )?;
    let big = ctrl
        .pool()
        .try_alloc(ns.max_transfer() * 2)
        .map_err(|e| e.to_string())?;
    expect_err(
        "zero-copy buffer beyond MDTS",
        q.submit_read(ns, 0, big, ()).map(drop).map_err(|e| e.error),
        |e| matches!(e, NvmeError::TooLarge { .. }),
    )?;
    expect_err(
        "host bridge is not an NVMe bound to vfio-pci",
        Controller::open("0000:00:00.0", ControllerConfig::default()).map(drop),
        |e| matches!(e, NvmeError::Device(_) | NvmeError::NotNvme { .. }),
    )?;
    // The device still works after all that.
    q.read(ns, 0, &mut b).map_err(|e| e.to_string())?;
    Ok(())
}

/// One thread's random write-then-verify over its region `[first, first + blocks)`.
fn verify_region(
    ns: &Namespace,
    seed: u64,
    first: u64,
    blocks: u64,
    budget: u64,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), NvmeError>,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), NvmeError>,
) -> Res<(u64, usize)> {
    let mut rng = Rng(seed | 1);
    let block = u64::from(ns.block_bytes());
    let max_blocks = (1 << 20) / block; // up to 1 MiB: beyond MDTS (512 KiB), so it splits
    let mut written: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut done = 0u64;
    let mut next_free = first;
    let mut largest = 0usize;
    while done < budget {
        let n = 1 + rng.below(max_blocks);
        // Non-overlapping extents laid out with random gaps, so every write stays verifiable.
        let gap = rng.below(64);
        if next_free + gap + n > first + blocks {
            break;
        }
        let lba = next_free + gap;
        next_free = lba + n;
        let mut data = vec![0u8; (n * block) as usize];
        rng.fill(&mut data);
        write(lba, &data).map_err(|e| format!("write {} B at {lba}: {e}", data.len()))?;
        largest = largest.max(data.len());
        done += data.len() as u64;
        written.push((lba, data));
    }
    for (lba, data) in &written {
        let mut back = vec![0u8; data.len()];
        read(*lba, &mut back).map_err(|e| format!("read {} B at {lba}: {e}", back.len()))?;
        if &back != data {
            let at = back.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!(
                "mismatch reading back {} B at LBA {lba}, first at byte {at}",
                data.len()
            ));
        }
    }
    Ok((done, largest))
}

fn polling_verify(ctrl: &Controller, ns: &Namespace, queues: u64, bytes: u64) -> Res<()> {
    let start = Instant::now();
    let region = ns.blocks() / queues;
    let results: Vec<Res<(u64, usize)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..queues)
            .map(|i| {
                s.spawn(move || {
                    let q = std::cell::RefCell::new(
                        ctrl.create_io_queue::<()>(32).map_err(|e| e.to_string())?,
                    );
                    verify_region(
                        ns,
                        0x9e37_79b9 * (i + 1),
                        i * region,
                        region,
                        bytes / queues,
                        |lba, d| q.borrow_mut().write(ns, lba, d),
                        |lba, d| q.borrow_mut().read(ns, lba, d),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let mut total = 0;
    let mut largest = 0;
    for r in results {
        let (b, l) = r?;
        total += b;
        largest = largest.max(l);
    }
    println!(
        "polling verify: {} queues, {:.1} MiB written and read back, largest request {} KiB, {:.2} s",
        queues,
        total as f64 / (1 << 20) as f64,
        largest >> 10,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn async_verify(
    ctrl: &Controller,
    ns: &Namespace,
    queues: usize,
    tasks: u64,
    bytes: u64,
) -> Res<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let (total, largest) = rt.block_on(async {
        let qs: Vec<AsyncQueue> = (0..queues)
            .map(|_| AsyncQueue::new(ctrl, 64, AsyncConfig::default()))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let region = ns.blocks() / tasks;
        let mut handles = Vec::new();
        for t in 0..tasks {
            let q = qs[t as usize % queues].clone();
            let ns = *ns;
            handles.push(tokio::spawn(async move {
                let mut rng = Rng(0x51_7cc1_b727_220a * (t + 7));
                let block = u64::from(ns.block_bytes());
                let mut done = 0u64;
                let mut largest = 0usize;
                let mut next_free = t * region;
                let mut written = Vec::new();
                while done < bytes / tasks {
                    let n = 1 + rng.below((1 << 20) / block);
                    let lba = next_free + rng.below(16);
                    if lba + n > (t + 1) * region {
                        break;
                    }
                    next_free = lba + n;
                    let mut data = vec![0u8; (n * block) as usize];
                    rng.fill(&mut data);
                    q.write(&ns, lba, &data)
                        .await
                        .map_err(|e| format!("async write at {lba}: {e}"))?;
                    done += data.len() as u64;
                    largest = largest.max(data.len());
                    written.push((lba, data));
                }
                for (lba, data) in written {
                    let mut back = vec![0u8; data.len()];
                    q.read(&ns, lba, &mut back)
                        .await
                        .map_err(|e| format!("async read at {lba}: {e}"))?;
                    if back != data {
                        return Err(format!("async mismatch at LBA {lba} ({} B)", data.len()));
                    }
                }
                Ok::<_, String>((done, largest))
            }));
        }
        let mut total = 0;
        let mut largest = 0;
        for h in handles {
            let (d, l) = h.await.map_err(|e| e.to_string())??;
            total += d;
            largest = largest.max(l);
        }
        Ok::<_, String>((total, largest))
    })?;
    println!(
        "async verify: {queues} queues, {tasks} tasks, {:.1} MiB written and read back, largest request {} KiB, {:.2} s",
        total as f64 / (1 << 20) as f64,
        largest >> 10,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Polling zero-copy read benchmark on one queue at QD32.
fn bench(ctrl: &Controller, ns: &Namespace, size: usize, random: bool, secs: u64) -> Res<()> {
    const QD: usize = 32;
    let mut q = ctrl
        .create_io_queue::<u64>(QD as u32)
        .map_err(|e| e.to_string())?;
    // One SQ doorbell per poll batch instead of one per command.
    q.defer_doorbells(true);
    let blocks = (size / ns.block_bytes() as usize) as u64;
    let span = ns.blocks() / blocks;
    let mut rng = Rng(12345);
    let mut seq = 0u64;
    let mut next_lba = |rng: &mut Rng| {
        if random {
            rng.below(span) * blocks
        } else {
            seq = (seq + 1) % span;
            seq * blocks
        }
    };
    for _ in 0..QD {
        let buf = ctrl.pool().try_alloc(size).map_err(|e| e.to_string())?;
        let lba = next_lba(&mut rng);
        q.submit_read(ns, lba, buf, lba)
            .map_err(|e| e.error.to_string())?;
    }
    let mut out: Vec<Done<u64>> = Vec::with_capacity(QD);
    let start = Instant::now();
    let limit = Duration::from_secs(secs);
    let mut ios = 0u64;
    let mut polls = 0u64;
    while polls % 256 != 0 || start.elapsed() < limit {
        polls += 1;
        q.poll(&mut out).map_err(|e| e.to_string())?;
        for d in out.drain(..) {
            d.result.map_err(|e| e.to_string())?;
            ios += 1;
            let buf = d.data.ok_or("buffer not returned")?;
            let lba = next_lba(&mut rng);
            q.submit_read(ns, lba, buf, lba)
                .map_err(|e| e.error.to_string())?;
        }
    }
    let el = start.elapsed().as_secs_f64();
    // Drain what is in flight.
    while q.outstanding() > 0 {
        q.poll(&mut out).map_err(|e| e.to_string())?;
        out.clear();
    }
    println!(
        "bench: {} {} KiB read QD{QD}, polling: {:.0} IOPS, {:.2} GB/s ({} I/Os in {:.2} s)",
        if random { "random" } else { "sequential" },
        size >> 10,
        ios as f64 / el,
        ios as f64 * size as f64 / el / 1e9,
        ios,
        el
    );
    Ok(())
}
