//! The pool's errors.

use std::time::Duration;

use crate::memory::MemoryError;
use crate::share::ShareError;

use super::stats::PoolStats;

/// What went wrong in the pool, each variant saying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A zero-length buffer was asked for.
    #[error("zero-length buffer requested")]
    ZeroLength,
    /// The request is larger than the biggest buffer the pool makes.
    #[error(
        "{len} B is larger than the pool's largest buffer ({max} B); split the transfer \
         (scatter-gather: `Pool::map_sg`) or raise `max_buffer`"
    )]
    TooLarge {
        /// Bytes asked for.
        len: usize,
        /// The configured `max_buffer`.
        max: usize,
    },
    /// Memory given to the pool was not aligned as required.
    #[error("buffer at {addr:#x} is not aligned to {align} B as required")]
    Misaligned {
        /// The address.
        addr: usize,
        /// The required alignment.
        align: usize,
    },
    /// The immediate path found nothing: pool, reserve and transient allocation all failed.
    #[error(
        "pool exhausted for an immediate {len} B request ({why}); in use {} of {} B, \
         {} waiters: use the awaitable path, raise reserve_bytes, or enable transient chunks",
        .stats.in_use_bytes, .stats.capacity_bytes, .stats.waiters
    )]
    Exhausted {
        /// Bytes asked for.
        len: usize,
        /// Why the last resort failed.
        why: String,
        /// The pool's state at the time.
        stats: Box<PoolStats>,
    },
    /// The wait ran out ([`super::Pool::alloc_timeout`] and friends).
    #[error("no {len} B buffer became free within {waited:?}")]
    Timeout {
        /// Bytes asked for.
        len: usize,
        /// How long it waited.
        waited: Duration,
    },
    /// At the hard cap with nothing free, and the configuration says fail rather than wait.
    #[error("pool at its hard cap of {cap} B with nothing free for {len} B; raise max_bytes or set at_cap = Wait")]
    AtCap {
        /// Bytes asked for.
        len: usize,
        /// The cap.
        cap: usize,
    },
    /// A device address fell above the device's DMA mask.
    #[error("device address {addr:#x} (+{len} B) is above the DMA mask {mask:#x}; use a view that allocates below the mask")]
    AboveDmaMask {
        /// The address.
        addr: u64,
        /// Length.
        len: usize,
        /// The mask.
        mask: u64,
    },
    /// The pool's configuration is inconsistent.
    #[error("bad pool configuration: {field}: {why}")]
    Config {
        /// The field at fault.
        field: &'static str,
        /// Why.
        why: String,
    },
    /// The user buffer and the mapping direction do not match (e.g. `FromDevice` of a
    /// read-only buffer).
    #[error("direction {0:?} needs a writable buffer")]
    Direction(super::Direction),
    /// A broken internal invariant (a bug in Tidepool): please report it.
    #[error("internal error (a Tidepool bug, please report): {0}")]
    Internal(String),
    /// Making memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Sharing memory with the device failed.
    #[error(transparent)]
    Share(#[from] ShareError),
    /// An offset and length fall outside a buffer.
    #[error("{len} B at offset {offset} is outside the buffer's {capacity} B")]
    OutOfBounds {
        /// The offset.
        offset: usize,
        /// The length.
        len: usize,
        /// The buffer's capacity.
        capacity: usize,
    },
}
