//! Against a real `qemu-storage-daemon`: data integrity from many tasks, growth and shrinking
//! under load, the backend dying mid-run, and the less common commands.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
    assert!(matches!(dev.read_at(1, &mut back[..512]).await, Err(Error::Unaligned { .. })));
    assert!(matches!(
        dev.read_at(16 * MIB, &mut back[..512]).await,
        Err(Error::OutOfRange { .. })
    ));
    let pool = dev.pool().clone();
    dev.shutdown().await;
    assert_eq!(pool.stats().in_use_bytes, 0);
    d.assert_quiet_log();
}
