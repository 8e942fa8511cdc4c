//! Against the scripted backend of `common::backend` (the real vhost-user protocol over a Unix
//! socket, the frontend's memory mapped from its memfds): configurations that lie or make I/O
//! impossible, and a backend that corrupts the used ring, completes out of order, never
//! completes, or dies with requests in flight.
//!
//! Every test is bounded by [`GUARD`] (a hang fails it), checks the error's type and text, and
//! ends by checking that the pool has nothing in use once the device is gone.

mod common;

use std::future::Future;
use std::time::Duration;

use common::backend::{Backend, Log, Script};
use common::*;
use tidepool::pool::{Pool, PoolConfig};
use tidepool_vhost_user_blk::protocol::blk;
use tidepool_vhost_user_blk::*;

const MIB: u64 = 1 << 20;

/// A test that takes longer than this hung.
const GUARD: Duration = Duration::from_secs(20);

/// Runs `f`, failing the test if it takes longer than [`GUARD`].
async fn guarded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .expect("the test hung (guard timeout)")
}

/// 2 MiB chunks, one prefilled, capped at 8 MiB.
fn pool_cfg() -> PoolConfig {
    pool_config(2 << 20, 2 << 20, 8 << 20)
}

/// Drops the device, then checks the pool has nothing in use and the backend saw the
/// connection close; returns the backend's log.
async fn finish(dev: Option<BlockDevice>, pool: Pool, backend: Backend) -> Log {
    if let Some(d) = dev {
        d.shutdown().await;
    }
    assert_eq!(
        pool.stats().in_use_bytes,
        0,
        "the pool ends with nothing in use"
    );
    drop(pool);
    tokio::task::spawn_blocking(move || backend.finish())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_scripted_backend_serves_every_command() {
    guarded(async {
        let b = Backend::start("honest", Script::honest(4 * MIB));
        let (dev, pool) = try_open(&b.socket, pool_cfg(), DeviceOptions::default()).await;
        let dev = dev.expect("start");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 13 + 1) as u8).collect();
        let data = &data[..(data.len() / 512) * 512];
        dev.write_at(8192, data).await.unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read_at(8192, &mut back).await.unwrap();
        assert_eq!(back, data);
        dev.flush().await.unwrap();
        dev.write_zeroes(8192, 4096, true).await.unwrap();
        dev.discard(16384, 4096).await.unwrap();
        dev.read_at(8192, &mut back).await.unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0), "zeroed");
        assert_eq!(&back[4096..8192], &data[4096..8192]);
        assert_eq!(&back[12288..], &data[12288..]);
        let log = finish(Some(dev), pool, b).await;
        assert!(log.problems.is_empty(), "{:?}", log.problems);
        // 64 KiB segments (size_max), at most 126 of them: one request per write/read.
        let ops: Vec<u32> = log.requests.iter().map(|r| r.op).collect();
        assert_eq!(
            ops,
            [
                blk::T_OUT,
                blk::T_IN,
                blk::T_FLUSH,
                blk::T_WRITE_ZEROES,
                blk::T_DISCARD,
                blk::T_IN
            ]
        );
        assert_eq!(
            (log.requests[3].sector, log.requests[3].range_sectors),
            (16, 8)
        );
        assert_eq!(
            (log.requests[4].sector, log.requests[4].range_sectors),
            (32, 8)
        );
        assert!(log.requests[0].data.iter().all(|&l| l <= 64 << 10));
        assert_eq!(
            log.requests[0].data.iter().sum::<u32>() as usize,
            data.len()
        );
    })
    .await
}
