//! # A vhost-user-blk frontend whose only shared memory is a Tidepool pool
//!
//! In a confidential VM the host sees only memory the guest explicitly shared, so every I/O
//! buffer is bounced from private memory into a shared pool. vhost-user reproduces that with a
//! real, unmodified peer (`qemu-storage-daemon`): it can touch only the memfd regions this
//! frontend hands it, and this frontend hands it nothing but the pool's chunks.
//!
//! ## Pieces
//! - [`Connection`] ([`connection`]): the handshake (features, protocol features, queues,
//!   memory slots, config space) over a [`control`] channel in which **every reply has a
//!   deadline**.
//! - [`VhostUserView`] ([`view`]): the pool's [`tidepool::share::DeviceView`]: a chunk becomes
//!   one memory region (SET_MEM_TABLE, then ADD_MEM_REG / REM_MEM_REG) at an address we make
//!   up; `usage()` reports the backend's slot limit so that the pool's growth keeps its cap
//!   reachable.
//! - [`BlockDevice`] ([`device`]): split virtqueues ([`ring`]) in pool memory, async
//!   `read_at` / `write_at` / `flush` / `discard` / `write_zeroes` on tokio, interrupt or
//!   polling completion, several queues.
//!
//! ## Confidential-computing rules kept
//! - Caller memory is private: data is copied into pool buffers (writes) or out of them
//!   (reads, exactly once, after completion); read buffers are zeroed before the backend sees
//!   them.
//! - Everything the backend can write (used ring, status bytes, descriptors) is read by value,
//!   once, and validated ([`RingError`]); nothing holds a Rust reference into shared memory.
//! - A request's buffers belong to its queue until the backend completes it or is gone, so
//!   cancellation and timeouts never hand the backend's memory to someone else.
//!
//! ## Usage
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use tidepool::pool::{Pool, PoolConfig};
//! use tidepool_vhost_user_blk::*;
//!
//! let conn = tokio::task::spawn_blocking(|| {
//!     Connection::connect("/tmp/vhost.sock".as_ref(), &ConnectOptions::default())
//! }).await??;
//! let view = Arc::new(VhostUserView::new(conn.clone(), ViewOptions::new()));
//! let pool = Pool::new(view, PoolConfig::default())?;
//! let dev = BlockDevice::start(conn, pool, DeviceOptions::default()).await?;
//! let mut sector = vec![0u8; 512];
//! dev.read_at(0, &mut sector).await?;
//! dev.shutdown().await;
//! # Ok(()) }
//! ```

pub mod connection;
pub mod control;
pub mod device;
pub mod protocol;
pub mod ring;
pub mod view;

use std::time::Duration;

pub use connection::{ConnectOptions, Connection};
pub use device::{BlockDevice, CompletionMode, DeviceOptions};
pub use ring::RingError;
pub use view::{VhostUserView, ViewOptions};

/// Everything that can go wrong, each message saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend's socket could not be reached.
    #[error("cannot connect to the vhost-user socket {path}: {source}; is the backend (qemu-storage-daemon --export type=vhost-user-blk) running?")]
    Connect {
        /// The socket path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A local system call failed.
    #[error("{what} failed: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The backend did not answer a control message in time; the connection is closed.
    #[error("no reply to {request} within {timeout:?}: the backend is hung or dead; restart it and reconnect")]
    ControlTimeout {
        /// The message.
        request: &'static str,
        /// The timeout.
        timeout: Duration,
    },
    /// The backend sent something the protocol does not allow; the connection is closed.
    #[error("vhost-user protocol violation: {0}")]
    Protocol(String),
    /// The backend refused a message (non-zero REPLY_ACK).
    #[error("the backend refused {request} (code {code}); see its log")]
    Rejected {
        /// The message.
        request: &'static str,
        /// The code it returned.
        code: u64,
    },
    /// The backend lacks a feature this frontend needs.
    #[error("the backend does not offer {name} (it offers {offered:#x}); use a newer backend")]
    MissingFeature {
        /// The feature.
        name: &'static str,
        /// What it offers.
        offered: u64,
    },
    /// The connection is gone (backend exited, or we closed it); the device is unusable.
    #[error("the vhost-user backend is disconnected: {0}; reconnect to continue")]
    Disconnected(String),
    /// The backend broke the virtqueue protocol; the device was failed and disconnected.
    #[error("the backend misbehaved: {0}")]
    Backend(#[from] RingError),
    /// A request did not complete in time (waiting for pool space, for free descriptors, or
    /// for the backend). If it had been published, its buffers stay reserved until the
    /// backend completes it or disconnects.
    #[error("I/O not completed within {timeout:?}: the backend is slow or stuck")]
    IoTimeout {
        /// The timeout.
        timeout: Duration,
    },
    /// The device reported an I/O error for the request.
    #[error("the device failed the request (virtio-blk status {status})")]
    Device {
        /// The status byte.
        status: u8,
    },
    /// The operation needs a feature the device did not negotiate.
    #[error("not supported by this device: {0}")]
    Unsupported(&'static str),
    /// Offset or length is not a multiple of 512 bytes.
    #[error("offset {offset} / length {len} are not multiples of 512 B sectors")]
    Unaligned {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// The range passes the end of the device.
    #[error("range {offset}+{len} passes the device's end at {capacity} B")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Capacity.
        capacity: u64,
    },
    /// Bad options, or options under which the backend's config space leaves no request
    /// that could be built (segments too small for one block, a chain that cannot fit the
    /// queue, a malformed block size): [`BlockDevice::start`] refuses those before any ring
    /// is set up, saying so ("the backend's configuration makes I/O impossible: ..."), and
    /// the connection stays usable (e.g. to retry with a larger `queue_size`).
    #[error("bad configuration: {0}")]
    Config(String),
    /// The pool failed the allocation.
    #[error(transparent)]
    Pool(#[from] tidepool::pool::PoolError),
}
