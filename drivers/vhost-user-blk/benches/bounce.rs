//! Bouncing block I/O through the pool, three pool policies side by side, against a real
//! `qemu-storage-daemon` (io_uring AIO, image in the page cache), random reads at QD 32:
//! - `prefilled`: capacity made up front, never grows;
//! - `grow`: one chunk prefilled, grows on demand (each batch starts after the pool had
//!   time to shrink back, so growth is inside the measurement);
//! - `fixed-small-waits`: a pool a quarter the size of the working set, which cannot grow,
//!   so maps wait for each other's buffers.
//!
//! Run: `cargo bench -p tidepool-vhost-user-blk --bench bounce`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::PoolConfig;
use tidepool_vhost_user_blk::{BlockDevice, DeviceOptions, ViewOptions};

use common::{open, pool_config, Daemon, Rng};

const QD: u64 = 32;
const DISK: u64 = 64 << 20;

/// The three pool policies for requests of `size` bytes.
fn policies(size: usize) -> Vec<(&'static str, PoolConfig, Duration)> {
    let max_buffer = size.next_power_of_two().max(16 << 10);
    let small = (QD as usize * size / 4)
        .max(64 << 10)
        .next_multiple_of(max_buffer);
    vec![
        (
            "prefilled",
            pool_config(2 << 20, 16 << 20, 16 << 20),
            Duration::ZERO,
        ),
        (
            "grow",
            PoolConfig {
                shrink_delay: Duration::from_millis(5),
                ..pool_config(2 << 20, 2 << 20, 32 << 20)
            },
            Duration::from_millis(40),
        ),
        (
            "fixed-small-waits",
            PoolConfig {
                memory: MemoryConfig {
                    page_size: PageSize::Small4K,
                    allow_small_pages: true,
                },
                chunk_bytes: small,
                prefill_bytes: small,
                max_bytes: small,
                max_buffer,
                low_watermark: 0,
                high_watermark: small,
                reserve_bytes: 0,
                transient: false,
                ..PoolConfig::default()
            },
            Duration::ZERO,
        ),
    ]
}

/// `iters` random reads of `size` bytes from `QD` concurrent tasks; returns the elapsed time.
async fn batch(dev: &Arc<BlockDevice>, size: usize, iters: u64, seed: u64) -> Duration {
    let t = Instant::now();
    let mut hs = Vec::new();
    for w in 0..QD {
        let n = iters / QD + u64::from(w < iters % QD);
        let dev = dev.clone();
        hs.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ (w + 1));
            let mut buf = vec![0u8; size];
            let slots = DISK / size as u64;
            for _ in 0..n {
                let off = rng.below(slots) * size as u64;
                dev.read_at(off, &mut buf).await.expect("read");
            }
        }));
    }
    for h in hs {
        h.await.unwrap();
    }
    t.elapsed()
}

fn bounce(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let d = Daemon::start("bench", DISK, 1);
    std::fs::write(&d.image, vec![0x3cu8; DISK as usize]).unwrap();
    let mut g = c.benchmark_group("vhost_blk_read_qd32");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for size in [4usize << 10, 128 << 10] {
        g.throughput(Throughput::Bytes(size as u64));
        for (name, cfg, settle) in policies(size) {
            let (dev, _view) =
                rt.block_on(open(&d, cfg, ViewOptions::new(), DeviceOptions::default()));
            let dev = Arc::new(dev);
            let mut seed = 1;
            g.bench_with_input(BenchmarkId::new(name, size), &size, |b, &size| {
                b.iter_custom(|iters| {
                    seed += 1;
                    rt.block_on(async {
                        if !settle.is_zero() {
                            tokio::time::sleep(settle).await; // let the pool shrink back
                        }
                        batch(&dev, size, iters, seed).await
                    })
                })
            });
            let s = dev.pool().stats();
            eprintln!(
                "{name}/{size}: capacity {} KiB, grows {}, shrinks {}, waits {}, wait p50/p99 {:?}",
                s.capacity_bytes >> 10,
                s.grows,
                s.shrinks,
                s.waits,
                s.wait
            );
            rt.block_on(Arc::try_unwrap(dev).unwrap().shutdown());
        }
    }
    g.finish();
    d.assert_quiet_log();
}

criterion_group!(benches, bounce);
criterion_main!(benches);
