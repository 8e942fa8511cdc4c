//! Streaming bounce mappings: `dma_map_single` over a pool, as Linux's swiotlb does it.
//!
//! [`super::Pool::map`] takes the caller's (private) memory and a [`Direction`], and returns a
//! [`Mapping`] whose device address points at a pool buffer:
//! - `ToDevice` / `Bidirectional`: the caller's bytes are copied in at map time;
//! - `FromDevice`: the device gets a zeroed buffer (it never sees stale data);
//! - [`Mapping::sync_for_device`] / [`Mapping::sync_for_cpu`] copy in / out while mapped;
//! - [`Mapping::unmap`] copies out, exactly once, for `FromDevice` / `Bidirectional`: the
//!   device cannot change what the CPU already read (single fetch).
//!
//! The mapping borrows the caller's buffer for its lifetime and `unmap` consumes it, so
//! use-after-unmap and double unmap do not compile. Dropping a mapping without `unmap` abandons
//! it: no copy out (the I/O was cancelled or failed), and the space returns to the pool. Only
//! drop or unmap once the device is done with the address.
//!
//! Scatter-gather ([`super::Pool::map_sg`]): several caller segments gathered into one
//! contiguous pool buffer (≤ `max_buffer`), so a driver builds one PRP list or SGL over it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::copy;
use crate::DeviceAddr;

use super::{Alloc, DmaBuf, Pool, PoolError, Shared};

/// Which way data moves between the CPU and the device.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Direction {
    /// The device reads: copied in at map time.
    ToDevice,
    /// The device writes: a zeroed buffer, copied out at unmap.
    FromDevice,
    /// Both: copied in at map, out at unmap.
    Bidirectional,
}

impl Direction {
    #[inline]
    fn copies_in(self) -> bool {
        matches!(self, Direction::ToDevice | Direction::Bidirectional)
    }
    #[inline]
    fn copies_out(self) -> bool {
        matches!(self, Direction::FromDevice | Direction::Bidirectional)
    }
}

/// Caller memory to map: shared for `ToDevice`, exclusive for directions that copy out.
#[derive(Debug)]
pub enum UserBuf<'a> {
    /// Read-only caller memory (only `ToDevice`).
    Shared(&'a [u8]),
    /// Writable caller memory (any direction).
    Exclusive(&'a mut [u8]),
}

impl UserBuf<'_> {
    #[inline]
    fn len(&self) -> usize {
        match self {
            UserBuf::Shared(b) => b.len(),
            UserBuf::Exclusive(b) => b.len(),
        }
    }
    #[inline]
    fn bytes(&self) -> &[u8] {
        match self {
            UserBuf::Shared(b) => b,
            UserBuf::Exclusive(b) => b,
        }
    }
}

impl<'a> From<&'a [u8]> for UserBuf<'a> {
    #[inline]
    fn from(b: &'a [u8]) -> Self {
        UserBuf::Shared(b)
    }
}

impl<'a> From<&'a mut [u8]> for UserBuf<'a> {
    #[inline]
    fn from(b: &'a mut [u8]) -> Self {
        UserBuf::Exclusive(b)
    }
}

impl<'a> From<&'a Vec<u8>> for UserBuf<'a> {
    fn from(b: &'a Vec<u8>) -> Self {
        UserBuf::Shared(b)
    }
}

impl<'a> From<&'a mut Vec<u8>> for UserBuf<'a> {
    fn from(b: &'a mut Vec<u8>) -> Self {
        UserBuf::Exclusive(b)
    }
}

/// The caller's segments of one mapping: one inline (the common case: no heap allocation on
/// the hot path), or several.
#[derive(Debug)]
enum Segments<'a> {
    One([UserBuf<'a>; 1]),
    Many(Vec<UserBuf<'a>>),
}

impl Default for Segments<'_> {
    fn default() -> Self {
        Segments::Many(Vec::new())
    }
}

impl<'a> Segments<'a> {
    #[inline]
    fn as_slice(&self) -> &[UserBuf<'a>] {
        match self {
            Segments::One(one) => one,
            Segments::Many(v) => v,
        }
    }

    #[inline]
    fn as_mut_slice(&mut self) -> &mut [UserBuf<'a>] {
        match self {
            Segments::One(one) => one,
            Segments::Many(v) => v,
        }
    }
}

/// A live bounce mapping of caller memory (one or more segments) into one pool buffer.
#[derive(Debug)]
pub struct Mapping<'a> {
    buf: DmaBuf,
    segments: Segments<'a>,
    dir: Direction,
}

impl<'a> Mapping<'a> {
    /// Fills a fresh pool buffer per `dir`: caller bytes in, the rest zeroed, unless `zeroed`
    /// (its block carried the pre-zeroed mark: already all zero).
    #[inline(always)]
    fn new(mut buf: DmaBuf, segments: Segments<'a>, dir: Direction, zeroed: bool) -> Mapping<'a> {
        let mut at = 0;
        if dir.copies_in() {
            for s in segments.as_slice() {
                // SAFETY: the segments' total is the buffer's len, ≤ its capacity; the block
                // is ours and no device has its address yet.
                unsafe { copy::copy_to_device(s.bytes(), buf.as_ptr().add(at)) };
                at += s.len();
            }
        }
        if at < buf.capacity() && !zeroed {
            // SAFETY: zeroes [at, capacity) of our own block.
            unsafe { copy::zero_device(buf.as_ptr().add(at), buf.capacity() - at) };
        }
        let _ = &mut buf;
        Mapping { buf, segments, dir }
    }

    /// The device address of the mapped bytes.
    #[inline]
    pub fn device_addr(&self) -> DeviceAddr {
        self.buf.device_addr()
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Always false (mappings are never empty).
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The direction it was mapped for.
    pub fn direction(&self) -> Direction {
        self.dir
    }

    /// The pool buffer behind the mapping (device pages for PRP lists, etc.).
    #[inline]
    pub fn buffer(&self) -> &DmaBuf {
        &self.buf
    }

    /// Copies the caller's bytes to the device buffer again (`ToDevice` / `Bidirectional`),
    /// after the CPU changed them. No effect for `FromDevice`.
    pub fn sync_for_device(&mut self) {
        if !self.dir.copies_in() {
            return;
        }
        let mut at = 0;
        for s in self.segments.as_slice() {
            // SAFETY: as in `new`.
            unsafe { copy::copy_to_device(s.bytes(), self.buf.as_ptr().add(at)) };
            at += s.len();
        }
    }

    /// Copies what the device wrote into the caller's memory (`FromDevice` /
    /// `Bidirectional`), while keeping the mapping.
    #[inline]
    pub fn sync_for_cpu(&mut self) {
        if !self.dir.copies_out() {
            return;
        }
        let mut at = 0;
        for s in self.segments.as_mut_slice() {
            if let UserBuf::Exclusive(b) = s {
                // SAFETY: reads `b.len()` bytes of our block at `at`, within its length.
                unsafe { copy::copy_from_device(self.buf.as_ptr().add(at), b) };
                at += b.len();
            }
        }
    }

    /// Ends the mapping: copies the device's bytes out once (`FromDevice` / `Bidirectional`)
    /// and returns the buffer to the pool.
    #[inline(always)]
    pub fn unmap(mut self) {
        self.sync_for_cpu();
    }
}

/// The future of [`Pool::map`] and [`Pool::map_sg`]. Cancel-safe like [`Alloc`].
#[must_use = "futures do nothing unless awaited"]
#[derive(Debug)]
pub struct MapFuture<'p, 'a> {
    inner: Result<(Alloc<'p>, Segments<'a>), Option<PoolError>>,
    dir: Direction,
}

impl<'a> Future for MapFuture<'_, 'a> {
    type Output = Result<Mapping<'a>, PoolError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let dir = self.dir;
        match &mut self.inner {
            Err(e) => Poll::Ready(Err(e.take().expect("MapFuture polled after completion"))),
            Ok((alloc, segs)) => match alloc.poll_block(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Ready(Ok(claim)) => {
                    let len = segs.as_slice().iter().map(UserBuf::len).sum();
                    let zeroed = claim.block.zeroed();
                    let buf = DmaBuf::new_unzeroed(claim, len);
                    Poll::Ready(Ok(Mapping::new(buf, std::mem::take(segs), dir, zeroed)))
                }
            },
        }
    }
}

impl Pool {
    #[inline(always)]
    fn check_segments(&self, segs: &[UserBuf<'_>], dir: Direction) -> Result<usize, PoolError> {
        if dir.copies_out() && segs.iter().any(|s| matches!(s, UserBuf::Shared(_))) {
            return Err(PoolError::Direction(dir));
        }
        let len: usize = segs.iter().map(UserBuf::len).sum();
        self.check_len(len)?;
        Ok(len)
    }

    fn map_future<'p, 'a>(
        &'p self,
        segs: Segments<'a>,
        dir: Direction,
        timeout: Option<Duration>,
    ) -> MapFuture<'p, 'a> {
        let inner = match self.check_segments(segs.as_slice(), dir) {
            Ok(len) => Ok((
                Alloc::new(self, len, timeout, dir == Direction::FromDevice),
                segs,
            )),
            Err(e) => Err(Some(e)),
        };
        MapFuture { inner, dir }
    }

    /// Maps caller memory for the device through a bounce buffer, waiting for pool capacity
    /// if there is none.
    ///
    /// ```no_run
    /// # async fn f(pool: tidepool::pool::Pool) -> Result<(), tidepool::pool::PoolError> {
    /// use tidepool::pool::Direction;
    /// let mut block = vec![0u8; 4096];
    /// let m = pool.map(&mut block, Direction::FromDevice).await?;
    /// // ... device writes to m.device_addr() ...
    /// m.unmap(); // `block` now holds what the device wrote
    /// # Ok(()) }
    /// ```
    pub fn map<'p, 'a>(&'p self, buf: impl Into<UserBuf<'a>>, dir: Direction) -> MapFuture<'p, 'a> {
        self.map_future(Segments::One([buf.into()]), dir, None)
    }

    /// As [`Pool::map`], failing with [`PoolError::Timeout`] after `timeout`.
    pub fn map_timeout<'p, 'a>(
        &'p self,
        buf: impl Into<UserBuf<'a>>,
        dir: Direction,
        timeout: Duration,
    ) -> MapFuture<'p, 'a> {
        self.map_future(Segments::One([buf.into()]), dir, Some(timeout))
    }

    /// Gathers several caller segments into one contiguous bounce buffer (total ≤
    /// `max_buffer`), waiting for capacity.
    pub fn map_sg<'p, 'a>(&'p self, segs: Vec<UserBuf<'a>>, dir: Direction) -> MapFuture<'p, 'a> {
        self.map_future(Segments::Many(segs), dir, None)
    }

    /// The immediate-path [`Pool::map`]: never waits (see [`Pool::try_alloc`]).
    #[inline(always)]
    pub fn try_map<'a>(
        &self,
        buf: impl Into<UserBuf<'a>>,
        dir: Direction,
    ) -> Result<Mapping<'a>, PoolError> {
        self.try_map_segments(Segments::One([buf.into()]), dir)
    }

    /// The immediate-path [`Pool::map_sg`].
    pub fn try_map_sg<'a>(
        &self,
        segs: Vec<UserBuf<'a>>,
        dir: Direction,
    ) -> Result<Mapping<'a>, PoolError> {
        self.try_map_segments(Segments::Many(segs), dir)
    }

    #[inline(always)]
    fn try_map_segments<'a>(
        &self,
        segs: Segments<'a>,
        dir: Direction,
    ) -> Result<Mapping<'a>, PoolError> {
        let len = self.check_segments(segs.as_slice(), dir)?;
        let order = self.check_len(len)?;
        let claim =
            Shared::alloc_immediate(&self.shared, order, len, dir == Direction::FromDevice)?;
        let zeroed = claim.block.zeroed();
        let buf = DmaBuf::new_unzeroed(claim, len);
        Ok(Mapping::new(buf, segs, dir, zeroed))
    }
}
