//! The one DMA data type every driver accepts: [`DmaData`].
//!
//! A transfer's data reaches a device in one of three ways, and drivers should not care which:
//! - **Owned**: a pool buffer ([`DmaBuf`]) the caller filled in place (zero-copy);
//! - **Bounce**: the caller's own memory, copied into a pool buffer (`ToDevice`) or copied out
//!   of one when the transfer completes (`FromDevice`): the pool's `map`, but owning the
//!   caller's memory instead of borrowing it;
//! - **Direct**: the caller's own page-aligned memory made device-visible for the transfer
//!   ([`DirectMapper`]) and unshared when it completes.
//!
//! [`DmaPolicy`] decides bounce or direct for caller memory; [`DmaPolicy::prepare`] (immediate)
//! and [`DmaPolicy::prepare_wait`] (awaits pool capacity) are the one place every driver and
//! engine takes that decision.
//!
//! # Ownership, and why completion happens exactly once
//! The model is tokio-uring's owned buffers: a driver takes a `DmaData` **by value** into the
//! in-flight command and gives it back only when the device is done with it (the command
//! completed, or the device was stopped so it can no longer DMA). [`DmaData::complete`] then
//! copies a bounce read out into the caller's memory, ends a direct mapping, and returns the
//! memory ([`Completed`]). Dropping a `DmaData` instead abandons it: no copy-out, the pool
//! buffer goes back, the direct mapping is unshared. Both consume the value, so neither can
//! happen twice, and neither can happen while a command still holds it. When an I/O future is
//! dropped, the data stays in the driver's in-flight slot until the device is done, and is
//! dropped there.
//!
//! # Domains
//! Every `DmaData` knows the DMA address space ([`DomainId`]) its device address belongs to:
//! its pool's or its mapper's view. A driver must refuse data of another domain: the address
//! would mean other memory to its device.
//!
//! # The caller's memory
//! [`HostMemory`] is memory the caller gives up for the transfer: a `Vec<u8>`, a page-aligned
//! [`PageBuf`] (what direct mapping needs), or any [`IoMemory`] (boxed). While a transfer owns
//! it, nobody else can touch it; a direct mapping's device may write it, which is why the data
//! type never lends out references to it until [`DmaData::complete`] gives it back.
//!
//! # Reuse for the same device
//! [`Recycler`] keeps pool buffers that only ever held one device's bytes, for that device to
//! be given again without the pool's zeroing (received frames posted again, sent frames'
//! buffers refilled): the one place the zeroing rule is relaxed, and why it is safe.

use std::alloc::Layout;
use std::future::Future;
use std::ptr::NonNull;

use crate::copy;
use crate::pool::{Direction, DmaBuf, Pool, PoolError};
use crate::share::direct::{DirectError, DirectMapper, DirectMapping};
use crate::share::DomainId;
use crate::DeviceAddr;

pub use crate::policy::{Calibration, CalibrationPoint, DmaPolicy, Path};
pub use recycle::{RecycleStats, Recycler};

mod recycle;

/// The 4 KiB page direct mapping works in.
const PAGE: usize = 4096;

/// Caller memory a transfer can own: heap memory whose address does not change when the owning
/// value moves.
///
/// # Safety
/// Implementors guarantee that [`IoMemory::as_mut_ptr`] returns the same pointer for the life
/// of the value (including across moves), that it points to [`IoMemory::len`] bytes of
/// memory owned by the value (valid to read and write, and to be written by a device behind a
/// direct mapping), and that no one else accesses that memory while the value lives.
pub unsafe trait IoMemory: Send + 'static {
    /// The first byte.
    fn as_mut_ptr(&mut self) -> *mut u8;
    /// The length in bytes.
    fn len(&self) -> usize;
    /// Whether the memory is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// SAFETY: a Vec's heap buffer stays put when the Vec moves; the Vec owns it exclusively.
unsafe impl IoMemory for Vec<u8> {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_slice().as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.as_slice().len()
    }
}

// SAFETY: as for Vec: a boxed slice is heap memory owned by the box.
unsafe impl IoMemory for Box<[u8]> {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        (**self).as_mut_ptr()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}

/// Zeroed, page-aligned heap memory whose length is a whole number of pages' worth of
/// allocation: what direct mapping needs (an IOMMU maps whole pages, so a device must never
/// reach a neighbour's bytes on the last page).
pub struct PageBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: PageBuf owns its allocation exclusively; nothing in it is tied to a thread.
unsafe impl Send for PageBuf {}
// SAFETY: shared access only reads through `as_slice`; mutation needs `&mut`.
unsafe impl Sync for PageBuf {}

impl PageBuf {
    /// `len` zeroed bytes (at least one page is allocated), page aligned.
    pub fn zeroed(len: usize) -> PageBuf {
        let size = len.max(1).next_multiple_of(PAGE);
        let layout = Layout::from_size_align(size, PAGE)
            .unwrap_or_else(|_| panic!("PageBuf of {len} B does not fit the address space"));
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        PageBuf { ptr, len, layout }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` ≤ the allocation; initialised (zeroed at allocation); no device holds
        // it (a PageBuf lent to a transfer is owned by it, so `&self` here means it is not).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes allocated: the length rounded up to whole pages (at least one).
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// Sets the length (what a transfer of this memory moves) to `len`, at most
    /// [`PageBuf::capacity`]; `false` (and no change) if it does not fit. The bytes keep their
    /// values.
    pub fn set_len(&mut self, len: usize) -> bool {
        if len > self.capacity() {
            return false;
        }
        self.len = len;
        true
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as `as_slice`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageBuf").field("len", &self.len).finish()
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

// SAFETY: the allocation never moves and is owned exclusively by the PageBuf.
unsafe impl IoMemory for PageBuf {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// The caller's memory, owned by a transfer while it runs.
#[derive(Debug)]
pub enum HostMemory {
    /// A vector.
    Vec(Vec<u8>),
    /// Page-aligned memory (can be mapped directly).
    Page(PageBuf),
    /// Anything else that is [`IoMemory`].
    Other(Box<dyn IoMemoryDebug>),
}

/// [`IoMemory`] that can be debug-printed (for [`HostMemory::Other`]).
pub trait IoMemoryDebug: IoMemory + std::fmt::Debug {}
impl<T: IoMemory + std::fmt::Debug> IoMemoryDebug for T {}

impl HostMemory {
    fn ptr_len(&mut self) -> (*mut u8, usize) {
        match self {
            HostMemory::Vec(v) => (IoMemory::as_mut_ptr(v), IoMemory::len(v)),
            HostMemory::Page(p) => (p.as_mut_ptr(), IoMemory::len(p)),
            HostMemory::Other(o) => (o.as_mut_ptr(), o.len()),
        }
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        match self {
            HostMemory::Vec(v) => v.len(),
            HostMemory::Page(p) => IoMemory::len(p),
            HostMemory::Other(o) => o.len(),
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The vector, if this is one.
    pub fn into_vec(self) -> Option<Vec<u8>> {
        match self {
            HostMemory::Vec(v) => Some(v),
            _ => None,
        }
    }

    /// Whether direct mapping can take it: the pages it covers (whole pages are mapped) must be
    /// this memory only: a [`PageBuf`] always (its allocation is whole pages), other memory
    /// when its start and length are page aligned.
    fn mappable(&mut self) -> bool {
        let page_buf = matches!(self, HostMemory::Page(_));
        let (p, len) = self.ptr_len();
        len > 0 && (p as usize) % PAGE == 0 && (page_buf || len % PAGE == 0)
    }
}

impl From<Vec<u8>> for HostMemory {
    fn from(v: Vec<u8>) -> Self {
        HostMemory::Vec(v)
    }
}

impl From<PageBuf> for HostMemory {
    fn from(p: PageBuf) -> Self {
        HostMemory::Page(p)
    }
}

/// Why data could not be prepared for a device, with the caller's memory given back.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The pool could not provide a bounce buffer.
    #[error("bounce buffer: {0}")]
    Pool(#[from] PoolError),
    /// Direct mapping failed.
    #[error("direct mapping: {0}")]
    Direct(#[from] DirectError),
    /// Direct mapping was asked for memory it cannot take.
    #[error("direct mapping needs page-aligned memory of whole pages ({len} B at {addr:#x}); use a PageBuf, or bounce")]
    NotMappable {
        /// The memory's address.
        addr: usize,
        /// Its length.
        len: usize,
    },
    /// The policy asked for direct mapping but no mapper was given.
    #[error("the DMA policy maps directly but no DirectMapper was given")]
    NoMapper,
}

/// A failed preparation: why, and the caller's memory back.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub error: DataError,
    /// The memory, untouched.
    pub memory: HostMemory,
}

/// What a transfer's data is, for statistics and tests.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum DataKind {
    /// A pool buffer filled in place.
    Owned,
    /// Caller memory copied through a pool buffer.
    Bounce,
    /// Caller memory mapped for the device.
    Direct,
}

/// The three kinds. Owned data (the zero-copy hot path) is stored inline; the other two are
/// boxed so that every [`DmaData`] (and every completion carrying one) stays as small as a pool
/// buffer: moving large values between functions costs store-forwarding stalls on the hot
/// path, while bounce and direct transfers already pay for a copy or a system call.
#[derive(Debug)]
enum Inner {
    Owned(DmaBuf),
    Bounce(Box<Bounced>),
    Direct(Box<Mapped>),
}

#[derive(Debug)]
struct Bounced {
    buf: DmaBuf,
    memory: HostMemory,
    dir: Direction,
}

#[derive(Debug)]
struct Mapped {
    mapping: DirectMapping<'static>,
    domain: DomainId,
    memory: HostMemory,
    dir: Direction,
}

/// Data for one DMA transfer. See the module docs.
#[derive(Debug)]
pub struct DmaData {
    inner: Inner,
}

/// What [`DmaData::complete`] gives back.
#[derive(Debug)]
pub enum Completed {
    /// The pool buffer of owned data (the device's bytes are in it for a read).
    Buf(DmaBuf),
    /// The caller's memory (a bounce read was copied into it).
    Memory(HostMemory),
}

impl Completed {
    /// The pool buffer, if the data was owned.
    #[inline]
    pub fn into_buf(self) -> Option<DmaBuf> {
        match self {
            Completed::Buf(b) => Some(b),
            Completed::Memory(_) => None,
        }
    }

    /// The caller's memory, if the data was bounced or mapped.
    pub fn into_memory(self) -> Option<HostMemory> {
        match self {
            Completed::Memory(m) => Some(m),
            Completed::Buf(_) => None,
        }
    }
}

impl From<DmaBuf> for DmaData {
    /// Owned data ([`DmaData::owned`]).
    fn from(buf: DmaBuf) -> Self {
        DmaData::owned(buf)
    }
}

impl DmaData {
    /// A pool buffer the caller filled (or will read) in place: zero-copy, in either
    /// direction. Its first `buf.len()` bytes are the transfer.
    #[inline]
    pub fn owned(buf: DmaBuf) -> DmaData {
        DmaData {
            inner: Inner::Owned(buf),
        }
    }

    /// Bounces `memory` through a pool buffer, from the pool's immediate path (reserve, then a
    /// transient chunk; never waits). `ToDevice`/`Bidirectional` copy the bytes in now; a
    /// `FromDevice` buffer is zeroed (the device never sees stale bytes) and copied out by
    /// [`DmaData::complete`].
    pub fn try_bounce(
        pool: &Pool,
        memory: impl Into<HostMemory>,
        dir: Direction,
    ) -> Result<DmaData, Refused> {
        let mut memory = memory.into();
        let got = match dir {
            Direction::FromDevice => pool.try_alloc(memory.len()),
            _ => pool.try_alloc_from(host_bytes(&mut memory)),
        };
        DmaData::bounced(got, memory, dir)
    }

    /// [`DmaData::try_bounce`], but waiting for pool capacity (fairly, with the pool's bounded
    /// wait). Cancel-safe: dropping the future drops the memory with it.
    pub fn bounce(
        pool: &Pool,
        memory: impl Into<HostMemory>,
        dir: Direction,
    ) -> impl Future<Output = Result<DmaData, Refused>> + '_ {
        let mut memory = memory.into();
        async move {
            let got = match dir {
                Direction::FromDevice => pool.alloc(memory.len()).await,
                _ => pool.alloc_from(host_bytes(&mut memory)).await,
            };
            DmaData::bounced(got, memory, dir)
        }
    }

    /// Bounce data from the pool's answer, or the memory back with the pool's error.
    fn bounced(
        got: Result<DmaBuf, PoolError>,
        memory: HostMemory,
        dir: Direction,
    ) -> Result<DmaData, Refused> {
        match got {
            Ok(buf) => Ok(DmaData {
                inner: Inner::Bounce(Box::new(Bounced { buf, memory, dir })),
            }),
            Err(e) => Err(Refused {
                error: e.into(),
                memory,
            }),
        }
    }

    /// Maps `memory` (page-aligned, whole pages: a [`PageBuf`]) for the device through
    /// `mapper` until the transfer completes. Blocks in the view's `share` (an ioctl for VFIO).
    pub fn direct(
        mapper: &DirectMapper,
        memory: impl Into<HostMemory>,
        dir: Direction,
    ) -> Result<DmaData, Refused> {
        let mut memory = memory.into();
        let (ptr, len) = memory.ptr_len();
        if !memory.mappable() {
            return Err(Refused {
                error: DataError::NotMappable {
                    addr: ptr as usize,
                    len,
                },
                memory,
            });
        }
        // SAFETY: `memory` is heap memory owned by this DmaData from here until the mapping is
        // dropped (Inner::Direct keeps both, and `complete`/drop end the mapping before giving
        // the memory back or freeing it); `IoMemory` guarantees the pointer is stable and the
        // memory exclusively ours; page-aligned start and length (checked above) mean the
        // mapped pages are exactly this memory; nothing forms a reference to it while mapped.
        match unsafe { mapper.map(ptr, len) } {
            Ok(mapping) => Ok(DmaData {
                inner: Inner::Direct(Box::new(Mapped {
                    mapping,
                    domain: mapper.view().domain(),
                    memory,
                    dir,
                })),
            }),
            Err(e) => Err(Refused {
                error: e.into(),
                memory,
            }),
        }
    }

    /// How the data reaches the device.
    pub fn kind(&self) -> DataKind {
        match self.inner {
            Inner::Owned(_) => DataKind::Owned,
            Inner::Bounce(_) => DataKind::Bounce,
            Inner::Direct(_) => DataKind::Direct,
        }
    }

    /// Which way caller memory moves (`None` for owned data, used in place either way).
    pub fn direction(&self) -> Option<Direction> {
        match &self.inner {
            Inner::Owned(_) => None,
            Inner::Bounce(b) => Some(b.dir),
            Inner::Direct(d) => Some(d.dir),
        }
    }

    /// The DMA address space of [`DmaData::device_addr`].
    #[inline]
    pub fn domain(&self) -> DomainId {
        match &self.inner {
            Inner::Owned(b) => b.domain(),
            Inner::Bounce(b) => b.buf.domain(),
            Inner::Direct(d) => d.domain,
        }
    }

    /// The device address of the transfer's first byte. The transfer is [`DmaData::len`]
    /// bytes, contiguous in device address space.
    #[inline]
    pub fn device_addr(&self) -> DeviceAddr {
        match &self.inner {
            Inner::Owned(b) => b.device_addr(),
            Inner::Bounce(b) => b.buf.device_addr(),
            Inner::Direct(d) => d.mapping.device_addr(),
        }
    }

    /// The transfer's length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        match &self.inner {
            Inner::Owned(b) => b.len(),
            Inner::Bounce(b) => b.buf.len(),
            Inner::Direct(d) => d.mapping.len(),
        }
    }

    /// Whether the transfer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes from [`DmaData::device_addr`] the device may reach (≥ `len`: a pool block's
    /// size class, or whole mapped pages). Descriptors may cover up to this.
    #[inline]
    pub fn capacity(&self) -> usize {
        match &self.inner {
            Inner::Owned(b) => b.capacity(),
            Inner::Bounce(b) => b.buf.capacity(),
            Inner::Direct(d) => d.mapping.mapped_len(),
        }
    }

    /// The owned pool buffer, if this is owned data (for drivers that build descriptors into
    /// it or read a device's reply from it).
    pub fn buf(&self) -> Option<&DmaBuf> {
        match &self.inner {
            Inner::Owned(b) => Some(b),
            _ => None,
        }
    }

    /// [`DmaData::complete`] for owned data: the pool buffer back (`None` for caller memory,
    /// which is then completed and dropped).
    #[inline]
    pub fn into_buf(self) -> Option<DmaBuf> {
        self.complete().into_buf()
    }

    /// Ends the transfer: the device is done with the data. A bounce `FromDevice` or
    /// `Bidirectional` transfer copies the device's bytes out into the caller's memory (each
    /// byte read once); a direct mapping is unshared; the memory or buffer is given back.
    ///
    /// Call it only once the device can no longer access the data: drivers do that, handing
    /// data back in their completions only after the command completed or the device was
    /// stopped.
    #[inline]
    pub fn complete(self) -> Completed {
        match self.inner {
            Inner::Owned(b) => Completed::Buf(b),
            other => Self::complete_caller_memory(other),
        }
    }

    /// [`DmaData::complete`] of bounced or directly mapped caller memory (out of line: the
    /// owned-buffer hot path stays small where it is inlined).
    fn complete_caller_memory(inner: Inner) -> Completed {
        match inner {
            Inner::Owned(b) => Completed::Buf(b),
            Inner::Bounce(b) => {
                let Bounced {
                    buf,
                    mut memory,
                    dir,
                } = *b;
                if matches!(dir, Direction::FromDevice | Direction::Bidirectional) {
                    let (ptr, len) = memory.ptr_len();
                    let n = len.min(buf.len());
                    // SAFETY: `buf` is ours and the device is done with it (this method's
                    // contract); `ptr` is the caller's memory, `n` ≤ its length, owned by us
                    // and not device-visible (it was bounced, never mapped).
                    unsafe {
                        copy::copy_from_device(buf.as_ptr(), std::slice::from_raw_parts_mut(ptr, n))
                    };
                }
                drop(buf);
                Completed::Memory(memory)
            }
            Inner::Direct(d) => {
                let Mapped {
                    mapping, memory, ..
                } = *d;
                if let Err(e) = mapping.unmap() {
                    // The view keeps an extent it could not unmap reserved (never reused), so
                    // the device cannot reach memory that is reused; the memory itself must
                    // not be freed while it might still be mapped: leak it.
                    tracing::error!(error = %e, "unsharing a direct mapping failed; its memory is leaked, never reused");
                    std::mem::forget(memory);
                    return Completed::Memory(HostMemory::Vec(Vec::new()));
                }
                Completed::Memory(memory)
            }
        }
    }
}

/// What [`DmaPolicy::plan`] decided.
enum Plan {
    /// Mapped directly already.
    Ready(DmaData),
    /// To bounce (immediately or awaiting capacity).
    Bounce(HostMemory),
}

/// The caller's bytes, for copying in.
fn host_bytes(memory: &mut HostMemory) -> &[u8] {
    let (ptr, len) = memory.ptr_len();
    // SAFETY: the memory is owned by `memory`, initialised (a Vec's len bytes, a zeroed
    // PageBuf, an IoMemory's promise), not device-visible (not mapped), and borrowed for no
    // longer than `memory`.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

impl DmaPolicy {
    /// Prepares caller `memory` for a transfer on the immediate path: bounce or direct as this
    /// policy chooses by length and alignment ([`DmaPolicy::choose`]); direct mapping needs
    /// `mapper`. Never waits (bounce uses the pool's immediate path); direct mapping blocks in
    /// the view's `share`.
    pub fn prepare(
        &self,
        pool: &Pool,
        mapper: Option<&DirectMapper>,
        memory: impl Into<HostMemory>,
        dir: Direction,
    ) -> Result<DmaData, Refused> {
        match self.plan(mapper, memory.into(), dir)? {
            Plan::Ready(data) => Ok(data),
            Plan::Bounce(memory) => DmaData::try_bounce(pool, memory, dir),
        }
    }

    /// [`DmaPolicy::prepare`], but a bounce waits for pool capacity.
    pub async fn prepare_wait(
        &self,
        pool: &Pool,
        mapper: Option<&DirectMapper>,
        memory: impl Into<HostMemory>,
        dir: Direction,
    ) -> Result<DmaData, Refused> {
        match self.plan(mapper, memory.into(), dir)? {
            Plan::Ready(data) => Ok(data),
            Plan::Bounce(memory) => DmaData::bounce(pool, memory, dir).await,
        }
    }

    /// The decision both `prepare`s share: a direct mapping made now, or memory to bounce.
    fn plan(
        &self,
        mapper: Option<&DirectMapper>,
        mut memory: HostMemory,
        dir: Direction,
    ) -> Result<Plan, Refused> {
        match (self.path_for(&mut memory, mapper), mapper) {
            (Ok(Path::Direct), Some(m)) => DmaData::direct(m, memory, dir).map(Plan::Ready),
            (Ok(Path::Direct), None) => Err(Refused {
                error: DataError::NoMapper,
                memory,
            }),
            (Ok(Path::Bounce), _) => Ok(Plan::Bounce(memory)),
            (Err(error), _) => Err(Refused { error, memory }),
        }
    }

    /// The path for `memory`: this policy's choice, falling back to bouncing for memory that
    /// cannot be mapped (not whole pages). [`DmaPolicy::Direct`] without a mapper is an error.
    fn path_for(
        &self,
        memory: &mut HostMemory,
        mapper: Option<&DirectMapper>,
    ) -> Result<Path, DataError> {
        let (ptr, len) = memory.ptr_len();
        let path = if memory.mappable() {
            self.choose(len, ptr as usize)
        } else {
            Path::Bounce
        };
        if path == Path::Direct && mapper.is_none() {
            return Err(DataError::NoMapper);
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::memory::{MemoryConfig, PageSize};
    use crate::pool::PoolConfig;
    use crate::share::identity::Identity;

    fn pool() -> Pool {
        let cfg = PoolConfig {
            memory: MemoryConfig {
                page_size: PageSize::Small4K,
                allow_small_pages: true,
            },
            chunk_bytes: 1 << 20,
            prefill_bytes: 1 << 20,
            max_bytes: 4 << 20,
            max_buffer: 256 << 10,
            low_watermark: 0,
            high_watermark: 1 << 20,
            shrink_delay: Duration::from_secs(60),
            reserve_bytes: 0,
            ..PoolConfig::default()
        };
        Pool::new(Arc::new(Identity::new()), cfg).unwrap()
    }

    /// Writes `bytes` at the data's device address as a device would (identity view: the
    /// device address is the host address).
    fn device_writes(d: &DmaData, bytes: &[u8]) {
        assert!(bytes.len() <= d.capacity());
        // SAFETY: identity view: the device address is a live host address of `capacity`
        // bytes owned by the data; we play the device.
        unsafe { copy::copy_to_device(bytes, d.device_addr().0 as *mut u8) };
    }

    fn device_reads(d: &DmaData) -> Vec<u8> {
        let mut out = vec![0u8; d.len()];
        // SAFETY: as in `device_writes`.
        unsafe { copy::copy_from_device(d.device_addr().0 as *const u8, &mut out) };
        out
    }

    #[test]
    fn bounce_write_copies_in_and_read_copies_out_once_on_complete() {
        let pool = pool();
        let w = DmaData::try_bounce(&pool, vec![7u8; 5000], Direction::ToDevice).unwrap();
        assert_eq!(w.kind(), DataKind::Bounce);
        assert_eq!(device_reads(&w), vec![7u8; 5000]);
        let back = w.complete().into_memory().unwrap().into_vec().unwrap();
        assert_eq!(back, vec![7u8; 5000]);

        let r = DmaData::try_bounce(&pool, vec![1u8; 4096], Direction::FromDevice).unwrap();
        assert_eq!(
            device_reads(&r),
            vec![0u8; 4096],
            "the device sees zeroes, not stale data"
        );
        device_writes(&r, &[9u8; 4096]);
        let back = r.complete().into_memory().unwrap().into_vec().unwrap();
        assert_eq!(back, vec![9u8; 4096]);
        assert_eq!(pool.stats().in_use_bytes, 0);
    }

    #[test]
    fn dropped_data_gives_everything_back_without_copy_out() {
        let pool = pool();
        let r = DmaData::try_bounce(&pool, vec![1u8; 4096], Direction::FromDevice).unwrap();
        assert!(pool.stats().in_use_bytes > 0);
        drop(r);
        assert_eq!(pool.stats().in_use_bytes, 0);
    }

    #[test]
    fn direct_maps_page_memory_and_unmaps_on_complete() {
        let pool = pool();
        let view: Arc<dyn crate::share::DeviceView> = Arc::new(Identity::new());
        let mapper = DirectMapper::new(view, 0);
        let mut mem = PageBuf::zeroed(8192);
        mem.as_mut_slice().fill(3);
        let d = DmaData::direct(&mapper, mem, Direction::Bidirectional).unwrap();
        assert_eq!(d.kind(), DataKind::Direct);
        assert_eq!(d.domain(), DomainId::PROCESS_VIRTUAL);
        assert_eq!(device_reads(&d), vec![3u8; 8192]);
        device_writes(&d, &[5u8; 100]);
        assert_eq!(mapper.stats().maps, 1);
        let back = d.complete().into_memory().unwrap();
        assert_eq!(mapper.stats().unmaps, 1);
        let HostMemory::Page(p) = back else {
            panic!("a PageBuf comes back")
        };
        assert_eq!(&p.as_slice()[..100], &[5u8; 100][..]);
        assert_eq!(p.as_slice()[100], 3);
        drop(pool);
    }

    #[test]
    fn direct_refuses_unmappable_memory_and_gives_it_back() {
        let view: Arc<dyn crate::share::DeviceView> = Arc::new(Identity::new());
        let mapper = DirectMapper::new(view, 0);
        let r = DmaData::direct(&mapper, vec![1u8; 100], Direction::ToDevice).unwrap_err();
        assert!(matches!(r.error, DataError::NotMappable { len: 100, .. }));
        assert_eq!(r.memory.into_vec().unwrap(), vec![1u8; 100]);
    }

    #[test]
    fn policy_prepares_by_size_and_falls_back_to_bounce() {
        let pool = pool();
        let view: Arc<dyn crate::share::DeviceView> = Arc::new(Identity::new());
        let mapper = DirectMapper::new(view, 0);
        let auto = DmaPolicy::Auto { threshold: 16384 };
        let small = auto
            .prepare(
                &pool,
                Some(&mapper),
                PageBuf::zeroed(4096),
                Direction::ToDevice,
            )
            .unwrap();
        assert_eq!(small.kind(), DataKind::Bounce);
        let big = auto
            .prepare(
                &pool,
                Some(&mapper),
                PageBuf::zeroed(65536),
                Direction::ToDevice,
            )
            .unwrap();
        assert_eq!(big.kind(), DataKind::Direct);
        let vec_big = auto
            .prepare(&pool, Some(&mapper), vec![0u8; 65537], Direction::ToDevice)
            .unwrap();
        assert_eq!(vec_big.kind(), DataKind::Bounce, "not whole pages: bounced");
        let no_mapper = DmaPolicy::Direct
            .prepare(&pool, None, PageBuf::zeroed(4096), Direction::ToDevice)
            .unwrap_err();
        assert!(matches!(no_mapper.error, DataError::NoMapper));
    }

    #[test]
    fn bounce_reports_an_exhausted_pool_and_returns_the_memory() {
        let pool = pool();
        let r = DmaData::try_bounce(&pool, vec![0u8; 8 << 20], Direction::ToDevice).unwrap_err();
        assert!(matches!(r.error, DataError::Pool(_)), "{:?}", r.error);
        assert_eq!(r.memory.len(), 8 << 20);
    }

    #[test]
    fn awaiting_bounce_gets_capacity() {
        let pool = pool();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let d = rt
            .block_on(DmaData::bounce(&pool, vec![4u8; 4096], Direction::ToDevice))
            .unwrap();
        assert_eq!(device_reads(&d), vec![4u8; 4096]);
    }
}
