//! The driver side of the virtio split virtqueue, shared with Tidepool's virtio-net driver:
//! [`tidepool_virtqueue`], re-exported here so the crate's users (and its test backend and
//! fuzz targets) keep one path. Layout, chains, publishing, the untrusting used-ring reader and
//! [`RingError`] are documented there.
//!
//! What this crate adds on top lives in [`crate::device`]: each chain's token is the request
//! it carries (reply channel, data buffer, descriptor count), the request header and status
//! byte live in a table after the ring in the same pool buffer, and every request is
//! published (and the backend kicked, unless it set NO_NOTIFY) as soon as it is added. A ring
//! error fails the whole device: its requests are abandoned with the error and their buffers
//! go back to the pool once the backend is disconnected.

pub use tidepool_virtqueue::{
    Desc, Layout, RingError, SplitRing, Used, AVAIL_F_NO_INTERRUPT, DESC_F_NEXT, DESC_F_WRITE,
    MAX_QUEUE_SIZE, USED_F_NO_NOTIFY,
};
