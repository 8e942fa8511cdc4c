//! Copies a file onto a vhost-user-blk device and reads it back, every byte bounced through a
//! Tidepool pool: the backend sees only the pool's memory, never this process's buffers.
//!
//! ```text
//! truncate -s 64M /tmp/disk.img
//! qemu-storage-daemon \
//!   --blockdev driver=file,node-name=file0,filename=/tmp/disk.img,aio=io_uring \
//!   --blockdev driver=raw,node-name=disk0,file=file0 \
//!   --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=/tmp/vhost.sock,writable=on &
//! cargo run -p tidepool-examples --example vhost_blk_copy -- /tmp/vhost.sock SOME_FILE
//! ```

use std::sync::Arc;

use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Pool, PoolConfig};
use tidepool_vhost_user_blk::{
    BlockDevice, ConnectOptions, Connection, DeviceOptions, VhostUserView, ViewOptions,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(socket), Some(file)) = (args.next(), args.next()) else {
        return Err("usage: vhost_blk_copy SOCKET FILE".into());
    };

    // 1. Handshake (blocking, bounded by timeouts): off the async workers.
    let conn = tokio::task::spawn_blocking(move || {
        Connection::connect(socket.as_ref(), &ConnectOptions::default())
    })
    .await??;

    // 2. The pool's chunks are the only memory the backend will ever see.
    let view = Arc::new(VhostUserView::new(conn.clone(), ViewOptions::new()));
    let cfg = PoolConfig {
        memory: MemoryConfig {
            page_size: PageSize::Huge2M,
            allow_small_pages: true,
        },
        chunk_bytes: 2 << 20,
        prefill_bytes: 2 << 20,
        max_bytes: 16 << 20,
        low_watermark: 512 << 10,
        high_watermark: 3 << 20,
        reserve_bytes: 64 << 10,
        ..PoolConfig::default()
    };
    let pool = Pool::new(view, cfg)?;
    let dev = BlockDevice::start(conn, pool, DeviceOptions::default()).await?;

    // 3. Copy the file in whole sectors (padded with zeroes), then read it back and compare.
    let mut data = std::fs::read(&file)?;
    data.resize(data.len().next_multiple_of(512), 0);
    if data.len() as u64 > dev.capacity() {
        return Err(format!("{file} is larger than the device ({} B)", dev.capacity()).into());
    }
    dev.write_at(0, &data).await?;
    dev.flush().await?;
    let mut back = vec![0u8; data.len()];
    dev.read_at(0, &mut back).await?;
    assert!(back == data, "read-back differs");

    let s = dev.pool().stats();
    println!(
        "copied {} B to the device and verified it; pool: {} KiB in {} regions, grew {} times",
        data.len(),
        s.capacity_bytes >> 10,
        s.mappings.mappings,
        s.grows
    );
    dev.shutdown().await;
    Ok(())
}
