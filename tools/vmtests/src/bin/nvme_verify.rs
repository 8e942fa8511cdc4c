//! # nvme_verify: volume write/read-back through tidepool-nvme, checked again on the host
//!
//! Each completion mode writes `TIDEPOOL_NVME_VERIFY_MIB` MiB (default 256) and reads it
//! back, verified, over 4 I/O queues:
//! - **polling**: 4 threads, each with its own polled `IoQueue`, over LBA region A;
//! - **async** (MSI-X): 4 `AsyncQueue`s shared by 32 tokio tasks, over region B.
//!
//! A region is tiled by extents of random size (512 B .. 1 MiB, beyond MDTS = 512 KiB, so
//! requests split), written in a random order and read back in another random order. Every
//! 512-byte block holds a pattern that depends only on its LBA ([`pattern_word`]), so the host
//! can recompute it: after the VM exits, `tools/vmtests/host-checks/nvme_verify` samples blocks
//! of both regions in the image file (and blocks past them, which must still be zero).
//!
//! The namespace must be at least 4x the per-mode volume (`--nvme-size 1G` for the default):
//! region A starts at byte 0, region B at half the namespace. The test prints a
//! `VERIFY-REGIONS` line the host check reads.

use std::process::ExitCode;
use std::time::Instant;

use tidepool_nvme::{AsyncConfig, AsyncQueue, Controller, ControllerConfig, Namespace};
use tidepool_vmtests::{HarnessEnv, Rng};

type Res<T> = Result<T, String>;

/// The pattern: 64-bit word `i` (0..64) of the 512-byte block at `lba`. The host check
/// computes the same function.
fn pattern_word(lba: u64, i: u64) -> u64 {
    ((lba << 6) | i).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x7469_6465_706f_6f6c
}

/// Fills `buf` (whole 512-byte blocks) with the pattern of the blocks from `lba`.
fn fill(lba: u64, buf: &mut [u8]) {
    for (b, block) in buf.chunks_exact_mut(512).enumerate() {
        for (i, w) in block.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&pattern_word(lba + b as u64, i as u64).to_le_bytes());
        }
    }
}

/// The first block of `buf` (from `lba`) that does not hold its pattern.
fn first_bad_block(lba: u64, buf: &[u8]) -> Option<u64> {
    buf.chunks_exact(512).enumerate().find_map(|(b, block)| {
        let ok = block
            .chunks_exact(8)
            .enumerate()
            .all(|(i, w)| w == pattern_word(lba + b as u64, i as u64).to_le_bytes());
        (!ok).then_some(lba + b as u64)
    })
}

/// Tiles `[first, first + blocks)` with extents of 1..=2048 blocks, shuffled.
fn extents(rng: &mut Rng, first: u64, blocks: u64) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    let mut at = first;
    while at < first + blocks {
        let n = (1 + rng.next() % 2048).min(first + blocks - at);
        v.push((at, n));
        at += n;
    }
    rng.shuffle(&mut v);
    v
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("nvme_verify: PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("nvme_verify: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Res<()> {
    let env = HarnessEnv::from_env().map_err(|e| e.to_string())?;
    let mib: u64 = std::env::var("TIDEPOOL_NVME_VERIFY_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let ctrl =
        Controller::open(env.nvme_bdf(), ControllerConfig::default()).map_err(|e| e.to_string())?;
    let ns = ctrl.namespace(1).map_err(|e| e.to_string())?;
    if ns.block_bytes() != 512 {
        return Err(format!("need 512 B blocks, have {} B", ns.block_bytes()));
    }
    let mut blocks = (mib << 20) / 512;
    if ns.blocks() < 4 * blocks {
        blocks = ns.blocks() / 4;
        println!(
            "namespace of {} MiB: volume reduced to {} MiB per mode (run with --nvme-size {}M for {mib} MiB)",
            ns.bytes() >> 20,
            (blocks * 512) >> 20,
            4 * mib
        );
    }
    let region_b = ns.blocks() / 2;
    println!("VERIFY-REGIONS 0 {blocks} {region_b} {blocks}");
    let before = ctrl.pool_stats().in_use_bytes;
    polling(&ctrl, &ns, 0, blocks)?;
    asynchronous(&ctrl, &ns, region_b, blocks)?;
    let after = ctrl.pool_stats().in_use_bytes;
    println!("pool in use: {before} B before, {after} B after");
    if after > before {
        return Err(format!(
            "pool leak: {before} B in use before, {after} B after"
        ));
    }
    Ok(())
}

/// Region `[first, first + blocks)` split among 4 threads, each with its own polled queue.
fn polling(ctrl: &Controller, ns: &Namespace, first: u64, blocks: u64) -> Res<()> {
    let start = Instant::now();
    let quarter = blocks / 4;
    let results: Vec<Res<(u64, usize)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                s.spawn(move || -> Res<(u64, usize)> {
                    let mut q = ctrl.create_io_queue::<()>(32).map_err(|e| e.to_string())?;
                    let mut rng = Rng(0x5eed_0001 + t);
                    let from = first + t * quarter;
                    let n = if t == 3 {
                        blocks - 3 * quarter
                    } else {
                        quarter
                    };
                    let mut ext = extents(&mut rng, from, n);
                    let mut largest = 0;
                    for &(lba, n) in &ext {
                        let mut data = vec![0u8; n as usize * 512];
                        fill(lba, &mut data);
                        q.write(ns, lba, &data)
                            .map_err(|e| format!("polling write {n} blocks at {lba}: {e}"))?;
                        largest = largest.max(data.len());
                    }
                    rng.shuffle(&mut ext);
                    for &(lba, n) in &ext {
                        let mut back = vec![0u8; n as usize * 512];
                        q.read(ns, lba, &mut back)
                            .map_err(|e| format!("polling read {n} blocks at {lba}: {e}"))?;
                        if let Some(bad) = first_bad_block(lba, &back) {
                            return Err(format!("polling: block {bad} read back wrong"));
                        }
                    }
                    Ok((ext.len() as u64, largest))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let mut requests = 0;
    let mut largest = 0;
    for r in results {
        let (n, l) = r?;
        requests += n;
        largest = largest.max(l);
    }
    println!(
        "polling: 4 queues, {} MiB in {requests} requests (largest {} KiB) written and read back, verified, {:.1} s",
        (blocks * 512) >> 20,
        largest >> 10,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Region `[first, first + blocks)` split among 32 tasks sharing 4 interrupt-driven queues.
fn asynchronous(ctrl: &Controller, ns: &Namespace, first: u64, blocks: u64) -> Res<()> {
    const TASKS: u64 = 32;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let (requests, wakes) = rt.block_on(async {
        let qs: Vec<AsyncQueue> = (0..4)
            .map(|_| AsyncQueue::new(ctrl, 64, AsyncConfig::default()))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let share = blocks / TASKS;
        let mut handles = Vec::new();
        for t in 0..TASKS {
            let q = qs[(t % 4) as usize].clone();
            let ns = *ns;
            let from = first + t * share;
            let n = if t == TASKS - 1 {
                blocks - (TASKS - 1) * share
            } else {
                share
            };
            handles.push(tokio::spawn(async move {
                let mut rng = Rng(0xa5a5_0000 + t);
                let mut ext = extents(&mut rng, from, n);
                for &(lba, n) in &ext {
                    let mut data = vec![0u8; n as usize * 512];
                    fill(lba, &mut data);
                    q.write(&ns, lba, &data)
                        .await
                        .map_err(|e| format!("async write {n} blocks at {lba}: {e}"))?;
                }
                rng.shuffle(&mut ext);
                for &(lba, n) in &ext {
                    let mut back = vec![0u8; n as usize * 512];
                    q.read(&ns, lba, &mut back)
                        .await
                        .map_err(|e| format!("async read {n} blocks at {lba}: {e}"))?;
                    if let Some(bad) = first_bad_block(lba, &back) {
                        return Err(format!("async: block {bad} read back wrong"));
                    }
                }
                Ok::<u64, String>(ext.len() as u64)
            }));
        }
        let mut requests = 0;
        for h in handles {
            requests += h.await.map_err(|e| e.to_string())??;
        }
        let wakes: Vec<_> = qs.iter().map(AsyncQueue::wake_counts).collect();
        Ok::<_, String>((requests, wakes))
    })?;
    println!(
        "async: 4 queues, {TASKS} tasks, {} MiB in {requests} requests written and read back, verified, {:.1} s",
        (blocks * 512) >> 20,
        start.elapsed().as_secs_f64()
    );
    for (i, w) in wakes.iter().enumerate() {
        println!("async queue {i}: {w:?}");
    }
    Ok(())
}
