//! # tidepool-nvme: a userspace NVMe driver over VFIO
//!
//! Placeholder crate doc; the full tour is written with the controller.

pub mod completion;
pub mod prp;
pub mod regs;
pub mod spec;

#[cfg(test)]
pub(crate) mod test_pool {
    //! A small pool over the identity view in ordinary 4 KiB pages, for host tests.
    use std::sync::{Arc, OnceLock};
    use std::time::Duration;

    use tidepool::memory::{MemoryConfig, PageSize};
    use tidepool::pool::{Pool, PoolConfig};
    use tidepool::share::identity::Identity;

    /// One shared pool for all tests in this process.
    pub fn pool() -> Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let cfg = PoolConfig {
                memory: MemoryConfig {
                    page_size: PageSize::Small4K,
                    allow_small_pages: true,
                },
                chunk_bytes: 4 << 20,
                prefill_bytes: 4 << 20,
                max_bytes: 32 << 20,
                max_buffer: 1 << 20,
                low_watermark: 0,
                high_watermark: 4 << 20,
                shrink_delay: Duration::from_secs(60),
                reserve_bytes: 0,
                ..PoolConfig::default()
            };
            Pool::new(Arc::new(Identity::new()), cfg).expect("test pool")
        })
        .clone()
    }
}
