//! The pool's errors.

use std::sync::Arc;
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
    ///
    /// Drivers treat this as "no buffer right now" and retry later. When it happened because
    /// the pool could not grow (its transient chunk failed, or the grower's latest attempt
    /// did), `cause` holds that failure, typed, and `why` says so.
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
        /// Why the pool could not grow, when that is why nothing was free.
        #[source]
        cause: Option<Arc<PoolError>>,
    },
    /// An awaitable request gave up because the pool could not grow: growth attempted on its
    /// behalf failed, or growth kept failing for the whole of its bounded wait (see the
    /// growth-failure rule in [`crate::pool`]). The pool keeps retrying with backoff and
    /// recovers by itself once the cause is fixed.
    #[error(
        "no {len} B buffer after {waited:?}: the pool could not grow ({failures} growth \
         attempt(s) failed in a row; it retries with backoff): {cause}"
    )]
    GrowthFailed {
        /// Bytes asked for.
        len: usize,
        /// How long the request waited.
        waited: Duration,
        /// Growth attempts that failed in a row, this one included.
        failures: u64,
        /// The failure of the last attempt: [`PoolError::Memory`] (no hugepages, memlock),
        /// [`PoolError::Share`] (mapping limit, ENOMEM from the IOMMU), or a device-address
        /// check. Shared by every request the same failure ended.
        #[source]
        cause: Arc<PoolError>,
    },
    /// The pool's grower thread could not be started (thread limit, memory): the pool was
    /// not created, and everything it had made was given back.
    #[error("starting the pool's grower thread failed: {0}; raise the thread limit (ulimit -u, pids.max) or free memory")]
    GrowerSpawn(#[source] std::io::Error),
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

impl PoolError {
    /// Why the pool could not grow, if that is what this error reports
    /// ([`PoolError::GrowthFailed`], or [`PoolError::Exhausted`] with a cause).
    pub fn growth_cause(&self) -> Option<&PoolError> {
        match self {
            PoolError::GrowthFailed { cause, .. } => Some(cause),
            PoolError::Exhausted { cause, .. } => cause.as_deref(),
            _ => None,
        }
    }
}
