//! # tidepool-nvme: a userspace NVMe driver over VFIO (or any device behind the seam)
//!
//! A driver a newcomer can read in an afternoon, in layers, bottom up:
//!
//! | module | what it is |
//! |---|---|
//! | [`spec`] | wire formats: 64 B commands, status codes, Identify and log pages (pure) |
//! | [`regs`] | BAR0 registers with typed values: CAP, VS, CC, CSTS, AQA/ASQ/ACQ, doorbells |
//! | [`completion`] | reading a completion entry **once** from device-written memory, and validating it |
//! | [`prp`] | PRP1/PRP2/PRP lists for a transfer (pure layout + a pool buffer for the list) |
//! | [`sgl`] | SGL descriptors and segment lists, and the controller's SGL support (SGLS) |
//! | [`doorbell`] | doorbell writes: MMIO registers, or shadow doorbells with event indexes |
//! | [`queue`] | an SQ/CQ pair: rings in pool memory, command slots, doorbells, timeouts, reset |
//! | [`controller`] | bring-up, admin commands, I/O queue creation, reset/recover, shutdown |
//! | [`io`] | namespaces and the polled [`IoQueue`]: zero-copy submit/poll and blocking helpers |
//! | [`async_io`] | the tokio [`AsyncQueue`]: `read(..).await` driven by MSI-X eventfds |
//!
//! I/O commands describe their data with SGLs when the controller supports them and PRPs
//! otherwise ([`DataPointer`], chosen per controller and changeable per queue); admin commands
//! always use PRPs, as the spec requires over PCIe.
//!
//! The controller is reached only through [`tidepool::device::PciDevice`]: a VFIO function
//! ([`Controller::open`]) or any other implementation ([`Controller::with_device`]), such as the
//! emulated controller of `tidepool-emu` that the host tests (`tests/`) run against, with
//! faults injected on every path.
//!
//! I/O data is one type, [`tidepool::data::DmaData`]: a pool buffer (zero copy), or caller
//! memory bounced or mapped directly as [`tidepool::data::DmaPolicy::prepare`] chooses. It
//! moves into the command and comes back in the completion ([`Done`]); data of another DMA
//! domain is refused with [`NvmeError::ForeignBuffer`].
//!
//! All memory the device sees — queue rings, PRP lists, SGL segments, data — comes from one
//! [`tidepool::pool::Pool`] over the device's DMA view (a VFIO container: devices sharing a
//! container may share the pool). The polling path uses only the
//! pool's immediate API (`try_alloc`), so a poller never waits; the async path awaits pool
//! capacity and queue slots, and its reaper never awaits anything but the interrupt.
//!
//! Device-written memory is never borrowed as Rust memory: rings and buffers are accessed
//! through raw pointers and `tidepool::copy`, and a buffer stays in its command's slot until
//! the device is done with it (or the controller has been stopped).
//!
//! ```no_run
//! use tidepool_nvme::{Controller, ControllerConfig};
//! let ctrl = Controller::open("0000:00:04.0", ControllerConfig::default())?;
//! let ns = ctrl.namespace(1)?;
//! let mut q = ctrl.create_io_queue::<u64>(32)?;
//! q.write(&ns, 0, &vec![0xab; 8192])?;
//! let mut back = vec![0; 8192];
//! q.read(&ns, 0, &mut back)?;
//! assert_eq!(back, vec![0xab; 8192]);
//! # Ok::<(), tidepool_nvme::NvmeError>(())
//! ```

pub mod async_io;
pub mod completion;
pub mod controller;
pub mod doorbell;
mod error;
pub mod io;
pub mod prp;
pub mod queue;
pub mod regs;
pub mod sgl;
pub mod spec;

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;

pub use async_io::{AsyncConfig, AsyncQueue, WakeCounts};
pub use controller::{Controller, ControllerConfig, DataPointer};
pub use error::NvmeError;
pub use io::{IoQueue, Namespace};
pub use queue::{Done, QueueCounters, SubmitError};

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
