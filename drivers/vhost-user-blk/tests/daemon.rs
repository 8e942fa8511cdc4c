//! Against a real `qemu-storage-daemon`: data integrity from many tasks, growth and shrinking
//! under load, the backend dying mid-run, and the less common commands.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tidepool::share::DeviceView;
use tidepool_vhost_user_blk::*;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_write_read_flush_zeroes_discard() {
    let d = Daemon::start("smoke", 16 * MIB, 1);
    let (dev, view) = open(
        &d,
        pool_config(2 << 20, 2 << 20, 8 << 20),
        ViewOptions::new(),
        DeviceOptions::default(),
    )
    .await;
    assert_eq!(dev.capacity(), 16 * MIB);
    assert_eq!(view.usage().mappings, 1);
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    dev.write_at(4096, &data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    dev.read_at(4096, &mut back).await.unwrap();
    assert_eq!(back, data);
    dev.flush().await.unwrap();
    dev.write_zeroes(8192, 8192, false).await.unwrap();
    dev.read_at(4096, &mut back).await.unwrap();
    assert_eq!(&back[..4096], &data[..4096]);
    assert!(back[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(&back[12288..], &data[12288..]);
    dev.discard(0, MIB).await.unwrap();
    assert!(matches!(
        dev.read_at(1, &mut back[..512]).await,
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        dev.read_at(16 * MIB, &mut back[..512]).await,
        Err(Error::OutOfRange { .. })
    ));
    let pool = dev.pool().clone();
    dev.shutdown().await;
    assert_eq!(pool.stats().in_use_bytes, 0);
    d.assert_quiet_log();
}

/// Random writes then verified reads, from many tasks over disjoint slices of the disk, on two
/// queues; afterwards a sample of sectors is checked in the image file itself. Total bytes
/// written: `VHOST_TEST_BYTES` (default 256 MiB).
async fn integrity(completion: CompletionMode, name: &str) {
    let total: u64 = std::env::var("VHOST_TEST_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256 * MIB);
    let disk = 64 * MIB;
    let tasks = 16u64;
    let slice = disk / tasks;
    let mut d = Daemon::start(name, disk, 2);
    let (dev, _view) = open(
        &d,
        pool_config(2 << 20, 4 << 20, 32 << 20),
        ViewOptions::new(),
        DeviceOptions {
            queues: 2,
            completion,
            ..DeviceOptions::default()
        },
    )
    .await;
    assert_eq!(dev.queues(), 2);
    let dev = Arc::new(dev);
    let written = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (dev, written) = (dev.clone(), written.clone());
        handles.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((t + 1) * 0x1234_5678));
            let base = t * slice;
            let mut shadow = vec![0u8; slice as usize];
            let mut buf = Vec::new();
            while written.load(Ordering::Relaxed) < total {
                let sectors = 1 + rng.below(512); // 512 B ..= 256 KiB
                let len = sectors * 512;
                let off = rng.below(slice / 512 - sectors + 1) * 512;
                buf.resize(len as usize, 0);
                rng.fill(&mut buf);
                dev.write_at(base + off, &buf).await.expect("write");
                shadow[off as usize..(off + len) as usize].copy_from_slice(&buf);
                written.fetch_add(len, Ordering::Relaxed);
                // Read back a random range (possibly spanning several writes).
                let rs = 1 + rng.below(256);
                let roff = rng.below(slice / 512 - rs + 1) * 512;
                let mut back = vec![0xAAu8; (rs * 512) as usize];
                dev.read_at(base + roff, &mut back).await.expect("read");
                assert_eq!(
                    &back[..],
                    &shadow[roff as usize..(roff + rs * 512) as usize],
                    "task {t} read mismatch at {roff}"
                );
            }
            // Whole slice at the end, in 1 MiB reads.
            let mut back = vec![0u8; slice as usize];
            for (i, c) in back.chunks_mut(MIB as usize).enumerate() {
                dev.read_at(base + i as u64 * MIB, c)
                    .await
                    .expect("final read");
            }
            assert!(back == shadow, "task {t}: final contents differ");
            shadow
        }));
    }
    let mut image = Vec::new();
    for h in handles {
        image.extend(h.await.unwrap());
    }
    dev.flush().await.unwrap();
    let pool = dev.pool().clone();
    let stats = pool.stats();
    eprintln!(
        "{name}: wrote {} MiB; 2 MiB hugepages (total, free) during the run: {:?}; pool capacity {} MiB, grows {}, waits {}",
        written.load(Ordering::Relaxed) >> 20,
        tidepool::memory::hugepage_counts(tidepool::memory::PageSize::Huge2M),
        stats.capacity_bytes >> 20,
        stats.grows,
        stats.waits
    );
    Arc::try_unwrap(dev).unwrap().shutdown().await;
    assert_eq!(pool.stats().in_use_bytes, 0);
    d.stop();
    d.assert_quiet_log();
    // The bytes really are in the image: check 512 random sectors.
    let mut f = std::fs::File::open(&d.image).unwrap();
    let mut rng = Rng(42);
    let mut sector = [0u8; 512];
    for _ in 0..512 {
        let s = rng.below(disk / 512);
        f.seek(SeekFrom::Start(s * 512)).unwrap();
        f.read_exact(&mut sector).unwrap();
        assert_eq!(
            &sector[..],
            &image[(s * 512) as usize..(s * 512 + 512) as usize],
            "sector {s}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrity_interrupt_mode() {
    integrity(CompletionMode::Interrupt, "irq").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrity_poll_mode() {
    integrity(CompletionMode::Poll, "poll").await;
}

/// A small pool grows (ADD_MEM_REG) while I/O is in flight, shrinks (REM_MEM_REG) only
/// drained chunks once the load stops (none while all 32 tasks still run), and grows again; no
/// I/O fails and the daemon logs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growth_under_load_and_shrink_when_drained() {
    let disk = 64 * MIB;
    let d = Daemon::start("grow", disk, 1);
    let cfg = tidepool::pool::PoolConfig {
        // Long enough that a busy chunk never looks idle on a loaded CI host, short enough
        // that the idle phase below is quick.
        shrink_delay: Duration::from_millis(300),
        peak_half_life: Duration::from_millis(250),
        ..pool_config(2 << 20, 2 << 20, 24 << 20)
    };
    let (dev, view) = open(&d, cfg, ViewOptions::new(), DeviceOptions::default()).await;
    let dev = Arc::new(dev);
    assert_eq!(view.usage().mappings, 1);
    for round in 0..2 {
        let peak_regions = Arc::new(AtomicU64::new(0));
        // Shrinks counted when the first task finishes: up to then all 32 run, and the tail
        // after it (fewer tasks, less demand) may legitimately give chunks back.
        let shrinks_at_full_load = Arc::new(AtomicU64::new(u64::MAX));
        let shrinks_before = dev.pool().stats().shrinks;
        let mut hs = Vec::new();
        for t in 0..32u64 {
            let (dev, view, peak) = (dev.clone(), view.clone(), peak_regions.clone());
            let at_full = shrinks_at_full_load.clone();
            hs.push(tokio::spawn(async move {
                let mut rng = Rng(t + 7 + round * 100);
                let mut buf = vec![0u8; 256 << 10];
                for _ in 0..24 {
                    let off = rng.below(disk / (256 << 10)) * (256 << 10);
                    rng.fill(&mut buf);
                    dev.write_at(off, &buf).await.expect("write during growth");
                    let mut back = vec![0u8; buf.len()];
                    dev.read_at(off, &mut back)
                        .await
                        .expect("read during growth");
                    peak.fetch_max(view.usage().mappings, Ordering::Relaxed);
                }
                let shrinks = dev.pool().stats().shrinks;
                let _ = at_full.compare_exchange(
                    u64::MAX,
                    shrinks,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
        let s = dev.pool().stats();
        let peak = peak_regions.load(Ordering::Relaxed);
        eprintln!(
            "round {round}: grows {} shrinks {} peak regions {peak} capacity {} MiB",
            s.grows,
            s.shrinks,
            s.capacity_bytes >> 20
        );
        assert!(
            peak > 2,
            "the pool grew into new regions under load (peak {peak})"
        );
        assert_eq!(
            shrinks_at_full_load.load(Ordering::Acquire),
            shrinks_before,
            "nothing is given back while all 32 tasks keep every chunk busy"
        );
        // Idle: idle chunks are given back. The pool's hysteresis keeps `high_watermark`
        // (2.5 MiB) free, so with 2 MiB chunks the floor is two regions.
        let t = Instant::now();
        while view.usage().mappings > 2 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "pool did not shrink: {:?}",
                view.usage()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "round {round}: shrank to {:?} in {:?}",
            view.usage().mappings,
            t.elapsed()
        );
        assert!(dev.pool().stats().shrinks > 0);
    }
    // Still fully usable after regions came and went.
    let data = vec![0x5Au8; 1 << 20];
    dev.write_at(0, &data).await.unwrap();
    let mut back = vec![0u8; 1 << 20];
    dev.read_at(0, &mut back).await.unwrap();
    assert_eq!(back, data);
    let pool = dev.pool().clone();
    Arc::try_unwrap(dev).unwrap().shutdown().await;
    assert_eq!(pool.stats().in_use_bytes, 0);
    d.assert_quiet_log();
}

/// SIGKILL the daemon while 32 tasks have I/O in flight: every call ends (success before the
/// kill, a clear Disconnected error after), well within the I/O timeout; the pool ends with
/// nothing in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_daemon_fails_io_cleanly() {
    let mut d = Daemon::start("kill", 64 * MIB, 1);
    let io_timeout = Duration::from_secs(3);
    let (dev, _view) = open(
        &d,
        pool_config(2 << 20, 4 << 20, 16 << 20),
        ViewOptions::new(),
        DeviceOptions {
            io_timeout,
            ..DeviceOptions::default()
        },
    )
    .await;
    let dev = Arc::new(dev);
    let ok = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    for t in 0..32u64 {
        let (dev, ok) = (dev.clone(), ok.clone());
        hs.push(tokio::spawn(async move {
            let mut rng = Rng(t + 1);
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let off = rng.below(1024) * (64 << 10);
                let r = if rng.below(2) == 0 {
                    dev.write_at(off, &buf).await
                } else {
                    dev.read_at(off, &mut buf).await
                };
                match r {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => return e,
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        ok.load(Ordering::Relaxed) > 0,
        "I/O was running before the kill"
    );
    let killed = Instant::now();
    d.kill();
    for h in hs {
        let e = tokio::time::timeout(io_timeout * 2, h)
            .await
            .expect("a task hung after the daemon died")
            .unwrap();
        assert!(matches!(e, Error::Disconnected(_)), "unexpected error: {e}");
        assert!(e.to_string().contains("disconnected"), "{e}");
    }
    let took = killed.elapsed();
    eprintln!(
        "all 32 tasks failed {took:?} after the kill; {} I/Os had succeeded",
        ok.load(Ordering::Relaxed)
    );
    assert!(
        took < io_timeout,
        "failures came from the watchdog, not the timeout ({took:?})"
    );
    assert!(matches!(dev.flush().await, Err(Error::Disconnected(_))));
    let pool = dev.pool().clone();
    Arc::try_unwrap(dev).unwrap().shutdown().await;
    assert_eq!(
        pool.stats().in_use_bytes,
        0,
        "the pool ends with nothing in use"
    );
    // The pool can still be torn down (its unshares see a closed connection).
    drop(pool);
}

/// A region beyond the backend's slots is refused by the view before anything is sent, with
/// the mapping-limit error; the connection stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_limit_is_a_typed_error() {
    use tidepool::memory::{Chunk, PageSize};
    let d = Daemon::start("slots", 16 * MIB, 1);
    let sock = d.socket.clone();
    tokio::task::spawn_blocking(move || {
        let conn = Connection::connect(&sock, &ConnectOptions::default()).unwrap();
        // qemu-storage-daemon has reported 32 slots (an older build) and 509 (10.0.2): fill
        // whatever it reports, then one more.
        let limit = conn.max_mem_slots;
        assert!(
            (1..=4096).contains(&limit),
            "implausible slot count {limit}"
        );
        let view = VhostUserView::new(conn.clone(), ViewOptions::new());
        let chunks: Vec<Chunk> = (0..=limit)
            .map(|_| Chunk::with_page_size(64 << 10, PageSize::Small4K).unwrap())
            .collect();
        let (fitting, beyond) = chunks.split_at(limit as usize);
        let mut addrs = Vec::new();
        for c in fitting {
            addrs.push(view.share(&c.region()).expect("every reported slot fits"));
        }
        let e = view.share(&beyond[0].region()).unwrap_err();
        assert!(
            matches!(
                e,
                tidepool::share::ShareError::MappingLimit { used, limit: l }
                    if used == limit && l == limit
            ),
            "{e}"
        );
        conn.probe().expect("backend still healthy");
        for (c, a) in chunks.iter().zip(&addrs).rev() {
            view.unshare(&c.region(), *a).unwrap();
        }
        assert_eq!(view.usage().mappings, 0);
        conn.probe().expect("backend still healthy after removals");
    })
    .await
    .unwrap();
    d.assert_quiet_log();
}

/// The configured sharing cost (a confidential VM's page-state changes) is paid per byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_cost_is_paid_per_byte() {
    use tidepool::memory::{Chunk, PageSize};
    let d = Daemon::start("cost", 16 * MIB, 1);
    let sock = d.socket.clone();
    tokio::task::spawn_blocking(move || {
        let conn = Connection::connect(&sock, &ConnectOptions::default()).unwrap();
        let opts = ViewOptions {
            share_cost_per_mib: Duration::from_millis(100),
            ..ViewOptions::new()
        };
        let view = VhostUserView::new(conn, opts);
        let c = Chunk::with_page_size(512 << 10, PageSize::Small4K).unwrap();
        let t = Instant::now();
        let a = view.share(&c.region()).unwrap();
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(50),
            "0.5 MiB at 100 ms/MiB took {took:?}"
        );
        view.unshare(&c.region(), a).unwrap();
    })
    .await
    .unwrap();
    d.assert_quiet_log();
}

/// A fixed pool far smaller than the working set (64 KiB, 4 KiB pages, no growth) serves 32
/// concurrent tasks by making them wait: every I/O completes, nothing deadlocks (a request
/// holds exactly one awaited buffer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_fixed_pool_waits_without_deadlock() {
    use tidepool::memory::{MemoryConfig, PageSize};
    let d = Daemon::start("tiny", 16 * MIB, 1);
    let cfg = tidepool::pool::PoolConfig {
        memory: MemoryConfig {
            page_size: PageSize::Small4K,
            allow_small_pages: true,
        },
        chunk_bytes: 64 << 10,
        prefill_bytes: 64 << 10,
        max_bytes: 64 << 10,
        max_buffer: 16 << 10,
        low_watermark: 0,
        high_watermark: 64 << 10,
        reserve_bytes: 0,
        transient: false,
        ..tidepool::pool::PoolConfig::default()
    };
    let (dev, _view) = open(&d, cfg, ViewOptions::new(), DeviceOptions::default()).await;
    let dev = Arc::new(dev);
    let mut hs = Vec::new();
    for t in 0..32u64 {
        let dev = dev.clone();
        hs.push(tokio::spawn(async move {
            let mut buf = vec![t as u8; 16 << 10];
            for i in 0..50u64 {
                let off = ((t * 50 + i) % 1024) * (16 << 10);
                dev.write_at(off, &buf).await.unwrap();
                dev.read_at(off, &mut buf).await.unwrap();
            }
        }));
    }
    for h in hs {
        tokio::time::timeout(Duration::from_secs(30), h)
            .await
            .expect("deadlock: a task never finished")
            .unwrap();
    }
    let s = dev.pool().stats();
    assert!(s.waits > 0, "the pool was small enough to make tasks wait");
    assert_eq!(s.capacity_bytes, 64 << 10);
    Arc::try_unwrap(dev).unwrap().shutdown().await;
    d.assert_quiet_log();
}
