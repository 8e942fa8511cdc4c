//! Direct mapping of caller memory: the "map per I/O" policy.
//!
//! Instead of copying through the pool's pre-mapped (bounce) buffers, a driver can make the
//! caller's own buffer device-visible for the duration of one I/O: [`DirectMapper`] shares it
//! through any [`DeviceView`] (one `VFIO_IOMMU_MAP_DMA` for VFIO) and unshares it when the
//! returned [`DirectMapping`] is dropped. This is what the benchmarks compare against bounce
//! buffers; which wins depends on the I/O size and the machine (measured, not guessed:
//! [`crate::policy::DmaPolicy::calibrate`]; BENCHMARKS.md has the figures from the test VM).
//!
//! ## Pages, not bytes
//! IOMMUs map whole 4 KiB pages. A buffer must therefore start on a page boundary
//! ([`DirectError::Misaligned`] otherwise), and its length is rounded up to whole pages: the
//! device can reach the rest of the last page too, and the caller's promise (below) covers it.
//!
//! ## The cache, and why it cannot outlive the caller's memory
//! Mapping costs one or two system calls (tens of microseconds inside a VM). Repeated I/O to the
//! same buffer can skip them with a small LRU cache of live mappings keyed by
//! `(address, rounded length)`. A cached mapping keeps memory device-visible after the I/O is
//! done, so it is only allowed for memory whose owner has promised it stays valid: the cache is
//! used only for **registered buffers** (like io_uring's registered buffers).
//! - [`DirectMapper::register`] is `unsafe`: the caller promises the pages stay mapped, are not
//!   freed or remapped, and are accessed only through raw pointers while the device may touch
//!   them, for as long as the [`RegisteredBuffer`] lives.
//! - [`RegisteredBuffer::map`] uses the cache. Each [`DirectMapping`] it returns borrows the
//!   registered buffer, so the borrow checker guarantees no mapping outlives the registration.
//! - Dropping the [`RegisteredBuffer`] evicts (and unshares) every cached mapping of it. So at no
//!   time does the cache hold a mapping of memory that is not registered.
//! - [`DirectMapper::map`] (unregistered memory) never caches: the mapping lives exactly as long
//!   as the returned [`DirectMapping`].
//!
//! A cached mapping is reference counted: eviction drops the cache's reference, and the
//! unshare happens when the last [`DirectMapping`] using it is dropped, so an eviction never
//! pulls memory from under I/O in flight. Capacity 0 disables caching entirely.
//!
//! ## Locking
//! One `Mutex` around the LRU list, held only to look up, insert or remove entries (a linear
//! scan of at most `capacity` entries). `share`/`unshare` (the system calls) always run with
//! no lock held; a mapping evicted under the lock is unshared after the lock is dropped.
//! Statistics are relaxed atomics.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{DeviceView, ShareError};
use crate::memory::HostRegion;
use crate::DeviceAddr;

/// The granule of direct mapping.
const PAGE: usize = 4096;

/// What went wrong mapping caller memory directly, each variant saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    /// The buffer (or the offset into a registered buffer) does not start on a page.
    #[error(
        "buffer at {addr:#x} is not 4096-byte aligned: direct mapping works on whole pages; \
         allocate I/O buffers page-aligned, or use the pool's bounce buffers"
    )]
    Misaligned {
        /// The first byte's address.
        addr: usize,
    },
    /// A zero length, or one that runs past the end of the address space.
    #[error("buffer length {len} at {addr:#x} is zero or wraps the address space")]
    BadLength {
        /// The address.
        addr: usize,
        /// The length.
        len: usize,
    },
    /// A range outside the registered buffer.
    #[error(
        "range at offset {offset} (+{len} B, rounded to pages) is outside the registered \
         {size} B buffer; register the whole buffer you do I/O on"
    )]
    OutOfBuffer {
        /// Offset into the buffer.
        offset: usize,
        /// Requested length.
        len: usize,
        /// The registered (page-rounded) size.
        size: usize,
    },
    /// The device view refused or failed.
    #[error(transparent)]
    Share(#[from] ShareError),
}

/// Counters of a [`DirectMapper`], since it was made.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DirectStats {
    /// Registered-buffer maps served from the cache (no system call).
    pub hits: u64,
    /// Registered-buffer maps that had to share (including all of them with capacity 0).
    pub misses: u64,
    /// Successful `share` calls.
    pub maps: u64,
    /// Successful `unshare` calls.
    pub unmaps: u64,
    /// Failed `unshare` calls (the memory stays device-visible; see the view's error).
    pub unmap_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    maps: AtomicU64,
    unmaps: AtomicU64,
    unmap_errors: AtomicU64,
}

/// One live share of `[addr, addr + len)`; unshared when the last reference goes away.
#[derive(Debug)]
struct Shared {
    view: Arc<dyn DeviceView>,
    counters: Arc<Counters>,
    /// Host address as an integer (never 0): a token for the view, never dereferenced here.
    addr: usize,
    /// Page-rounded length.
    len: usize,
    device_addr: DeviceAddr,
    /// Set once unshared, so `Drop` does not unshare twice.
    unshared: bool,
}

impl Shared {
    fn region(&self) -> HostRegion<'static> {
        HostRegion {
            addr: NonNull::new(self.addr as *mut u8).unwrap_or(NonNull::dangling()),
            len: self.len,
            page_size: PAGE,
            fd: None,
        }
    }

    /// Unshares now (once) and counts the outcome.
    fn unshare_now(&mut self) -> Result<(), ShareError> {
        if self.unshared {
            return Ok(());
        }
        self.unshared = true;
        let r = self.view.unshare(&self.region(), self.device_addr);
        let counter = if r.is_ok() {
            &self.counters.unmaps
        } else {
            &self.counters.unmap_errors
        };
        counter.fetch_add(1, Relaxed);
        r
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Errors are counted in `unmap_errors`; use `DirectMapping::unmap` to see them.
        let _ = self.unshare_now();
    }
}

/// One cache entry: a mapping of a registered buffer.
#[derive(Debug)]
struct Entry {
    buffer: u64,
    key: (usize, usize),
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Inner {
    view: Arc<dyn DeviceView>,
    capacity: usize,
    counters: Arc<Counters>,
    /// Least recently used at the front.
    lru: Mutex<VecDeque<Entry>>,
    next_buffer: AtomicU64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Entry>> {
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Shares `[addr, addr + len)` (page-aligned, page-rounded) through the view. No lock held.
    fn share(&self, addr: usize, len: usize) -> Result<Arc<Shared>, ShareError> {
        let mut shared = Shared {
            view: Arc::clone(&self.view),
            counters: Arc::clone(&self.counters),
            addr,
            len,
            device_addr: DeviceAddr(0),
            unshared: true, // nothing to undo until the share succeeds
        };
        shared.device_addr = self.view.share(&shared.region())?;
        shared.unshared = false;
        self.counters.maps.fetch_add(1, Relaxed);
        Ok(Arc::new(shared))
    }
}

/// Maps caller memory for a device, one I/O at a time, with an optional cache for registered
/// buffers. Thread-safe; cheap to share by reference.
///
/// ```
/// use std::sync::Arc;
/// use tidepool::share::{direct::DirectMapper, identity::Identity};
/// let mapper = DirectMapper::new(Arc::new(Identity::new()), 16);
/// let mut buf = memmap2::MmapMut::map_anon(8192).unwrap();
/// // SAFETY: `buf` outlives the registration and is not touched while the device may be.
/// let reg = unsafe { mapper.register(buf.as_mut_ptr(), buf.len()) }.unwrap();
/// let a = reg.map(0, 4096).unwrap(); // miss: one share
/// drop(a);
/// let b = reg.map(0, 4096).unwrap(); // hit: no system call
/// assert_eq!(mapper.stats().hits, 1);
/// # drop(b); drop(reg);
/// ```
#[derive(Debug)]
pub struct DirectMapper {
    inner: Arc<Inner>,
}

impl DirectMapper {
    /// A mapper over `view` whose cache keeps up to `cache_entries` mappings of registered
    /// buffers (0: no cache, every map shares and every drop unshares).
    pub fn new(view: Arc<dyn DeviceView>, cache_entries: usize) -> DirectMapper {
        DirectMapper {
            inner: Arc::new(Inner {
                view,
                capacity: cache_entries,
                counters: Arc::default(),
                lru: Mutex::new(VecDeque::with_capacity(cache_entries)),
                next_buffer: AtomicU64::new(0),
            }),
        }
    }

    /// Makes `[ptr, ptr + len)`, rounded up to whole pages, device-visible until the returned
    /// mapping is dropped or [`DirectMapping::unmap`]ped. Never cached. Blocks in the view's
    /// `share` (an ioctl for VFIO); takes no lock of ours.
    ///
    /// # Safety
    /// Until the mapping is dropped, the pages `[ptr, round_up(ptr + len, 4096))` must stay
    /// mapped and allocated to the caller (not freed, unmapped or remapped), and must not be
    /// accessed through Rust references while the device may access them (use raw pointers and
    /// [`crate::copy`]).
    pub unsafe fn map(
        &self,
        ptr: *mut u8,
        len: usize,
    ) -> Result<DirectMapping<'static>, DirectError> {
        let (addr, rounded) = page_range(ptr as usize, len)?;
        let shared = self.inner.share(addr, rounded)?;
        Ok(DirectMapping {
            shared,
            len,
            _buffer: PhantomData,
        })
    }

    /// Registers `[ptr, ptr + len)` (rounded up to whole pages) for cached mapping.
    ///
    /// # Safety
    /// For as long as the returned [`RegisteredBuffer`] lives, the pages
    /// `[ptr, round_up(ptr + len, 4096))` must stay mapped and allocated to the caller, and must
    /// not be accessed through Rust references while the device may access them. (Cached
    /// mappings keep the memory device-visible between I/Os; they are all removed when the
    /// registration is dropped.)
    pub unsafe fn register(
        &self,
        ptr: *mut u8,
        len: usize,
    ) -> Result<RegisteredBuffer, DirectError> {
        let (addr, size) = page_range(ptr as usize, len)?;
        Ok(RegisteredBuffer {
            mapper: Arc::clone(&self.inner),
            id: self.inner.next_buffer.fetch_add(1, Relaxed),
            addr,
            size,
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> DirectStats {
        let c = &self.inner.counters;
        DirectStats {
            hits: c.hits.load(Relaxed),
            misses: c.misses.load(Relaxed),
            maps: c.maps.load(Relaxed),
            unmaps: c.unmaps.load(Relaxed),
            unmap_errors: c.unmap_errors.load(Relaxed),
        }
    }

    /// Mappings the cache holds now. Takes the cache lock.
    pub fn cached(&self) -> usize {
        self.inner.lock().len()
    }

    /// The cache's capacity.
    pub fn cache_capacity(&self) -> usize {
        self.inner.capacity
    }

    /// The device view mappings are made through.
    pub fn view(&self) -> &Arc<dyn DeviceView> {
        &self.inner.view
    }
}

/// Checks `addr` is page-aligned and `len` non-zero, and rounds `len` up to pages.
fn page_range(addr: usize, len: usize) -> Result<(usize, usize), DirectError> {
    if addr % PAGE != 0 || addr == 0 {
        return Err(DirectError::Misaligned { addr });
    }
    let rounded = len
        .checked_next_multiple_of(PAGE)
        .filter(|&r| r != 0 && addr.checked_add(r).is_some())
        .ok_or(DirectError::BadLength { addr, len })?;
    Ok((addr, rounded))
}

/// Caller memory registered with a [`DirectMapper`] for cached mapping (see the module docs
/// for the promise [`DirectMapper::register`] asks for). Dropping it unshares every cached
/// mapping of it; the borrow checker ensures no [`DirectMapping`] of it is alive by then.
#[derive(Debug)]
pub struct RegisteredBuffer {
    mapper: Arc<Inner>,
    id: u64,
    addr: usize,
    /// Page-rounded size.
    size: usize,
}

impl RegisteredBuffer {
    /// Maps `[offset, offset + len)` of the buffer (offset page-aligned, length rounded up to
    /// pages), from the cache if that exact range is cached, else by sharing it and caching
    /// the mapping (evicting the least recently used one if the cache is full).
    ///
    /// Locking: takes the mapper's cache lock to look up and again to insert; the `share` and
    /// any unshare of an evicted mapping run without it.
    pub fn map(&self, offset: usize, len: usize) -> Result<DirectMapping<'_>, DirectError> {
        let out = || DirectError::OutOfBuffer {
            offset,
            len,
            size: self.size,
        };
        let start = self.addr.checked_add(offset).ok_or_else(out)?;
        let (start, rounded) = page_range(start, len)?;
        match offset.checked_add(rounded) {
            Some(end) if end <= self.size => {}
            _ => return Err(out()),
        }
        let inner = &self.mapper;
        let key = (start, rounded);
        let mapping = |shared| DirectMapping {
            shared,
            len,
            _buffer: PhantomData,
        };
        if inner.capacity == 0 {
            inner.counters.misses.fetch_add(1, Relaxed);
            return Ok(mapping(inner.share(start, rounded)?));
        }
        {
            let mut lru = inner.lock();
            if let Some(i) = lru.iter().position(|e| e.key == key) {
                let entry = lru
                    .remove(i)
                    .unwrap_or_else(|| unreachable!("index from position"));
                let shared = Arc::clone(&entry.shared);
                lru.push_back(entry);
                inner.counters.hits.fetch_add(1, Relaxed);
                return Ok(mapping(shared));
            }
        }
        inner.counters.misses.fetch_add(1, Relaxed);
        let shared = inner.share(start, rounded)?;
        let evicted = {
            let mut lru = inner.lock();
            if lru.iter().any(|e| e.key == key) {
                // Another thread cached the same range meanwhile; keep theirs, ours is used
                // for this I/O only and unshared when it is dropped.
                None
            } else {
                lru.push_back(Entry {
                    buffer: self.id,
                    key,
                    shared: Arc::clone(&shared),
                });
                (lru.len() > inner.capacity).then(|| lru.pop_front())
            }
        };
        drop(evicted); // unshares outside the lock unless still in use
        Ok(mapping(shared))
    }

    /// The first byte of the buffer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// The registered size, rounded up to whole pages.
    pub fn len(&self) -> usize {
        self.size
    }

    /// Always false: empty buffers cannot be registered.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Drop for RegisteredBuffer {
    /// Evicts every cached mapping of this buffer and unshares them (after dropping the lock).
    fn drop(&mut self) {
        let mine: Vec<Entry> = {
            let mut lru = self.mapper.lock();
            let (mine, others): (Vec<Entry>, Vec<Entry>) =
                lru.drain(..).partition(|e| e.buffer == self.id);
            lru.extend(others);
            mine
        };
        drop(mine);
    }
}

/// Caller memory made device-visible by a [`DirectMapper`]. `'b` is the registered buffer it
/// came from (`'static` for [`DirectMapper::map`], whose safety contract covers its lifetime).
///
/// Dropping it ends this I/O's use of the mapping: an uncached mapping is unshared at once, a
/// cached one when it is evicted and no other I/O uses it.
#[derive(Debug)]
pub struct DirectMapping<'b> {
    shared: Arc<Shared>,
    len: usize,
    _buffer: PhantomData<&'b RegisteredBuffer>,
}

impl DirectMapping<'_> {
    /// The device address of the buffer's first byte.
    pub fn device_addr(&self) -> DeviceAddr {
        self.shared.device_addr
    }

    /// The host address of the buffer's first byte.
    pub fn host_ptr(&self) -> *mut u8 {
        self.shared.addr as *mut u8
    }

    /// The length asked for.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty buffers cannot be mapped.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The bytes the device can reach: the length rounded up to whole pages.
    pub fn mapped_len(&self) -> usize {
        self.shared.len
    }

    /// Ends this mapping now and reports an unshare failure, if this was the last user of it
    /// (an uncached mapping); for a cached one this is the same as dropping it.
    pub fn unmap(self) -> Result<(), DirectError> {
        match Arc::try_unwrap(self.shared) {
            Ok(mut shared) => Ok(shared.unshare_now()?),
            Err(_still_used) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::share::identity::Identity;

    fn setup(cache: usize) -> (Arc<Identity>, DirectMapper, memmap2::MmapMut) {
        let view = Arc::new(Identity::new());
        let mapper = DirectMapper::new(view.clone(), cache);
        let buf = memmap2::MmapMut::map_anon(64 << 10).unwrap();
        (view, mapper, buf)
    }

    #[test]
    fn uncached_map_shares_and_unshares_on_drop() {
        let (view, mapper, mut buf) = setup(4);
        let p = buf.as_mut_ptr();
        // SAFETY: buf outlives the mapping; nothing touches it meanwhile.
        let m = unsafe { mapper.map(p, 5000) }.unwrap();
        assert_eq!(m.device_addr().0, p as u64, "identity view");
        assert_eq!((m.len(), m.mapped_len()), (5000, 8192));
        assert_eq!(view.usage().mappings, 1);
        assert_eq!(view.usage().bytes, 8192);
        drop(m);
        assert_eq!(view.usage().mappings, 0);
        // SAFETY: as above.
        let m = unsafe { mapper.map(p, 4096) }.unwrap();
        m.unmap().unwrap();
        assert_eq!(view.usage().mappings, 0);
        let s = mapper.stats();
        assert_eq!((s.maps, s.unmaps, s.hits, s.misses), (2, 2, 0, 0));
        assert_eq!(mapper.cached(), 0, "unregistered memory is never cached");
    }

    #[test]
    fn bad_buffers_are_typed_errors() {
        let (view, mapper, mut buf) = setup(4);
        let p = buf.as_mut_ptr();
        // SAFETY (all below): refused before anything is shared.
        let r = unsafe { mapper.map(p.wrapping_add(8), 4096) };
        assert!(matches!(r, Err(DirectError::Misaligned { .. })));
        let r = unsafe { mapper.map(p, 0) };
        assert!(matches!(r, Err(DirectError::BadLength { .. })));
        let r = unsafe { mapper.map(usize::MAX as *mut u8, 1) };
        assert!(matches!(r, Err(DirectError::Misaligned { .. })));
        let r = unsafe { mapper.map((usize::MAX - 4095) as *mut u8, 8192) };
        assert!(matches!(r, Err(DirectError::BadLength { .. })));
        // SAFETY: buf outlives reg.
        let reg = unsafe { mapper.register(p, 16384) }.unwrap();
        assert!(matches!(
            reg.map(12288, 8192),
            Err(DirectError::OutOfBuffer { size: 16384, .. })
        ));
        assert!(matches!(
            reg.map(100, 8),
            Err(DirectError::Misaligned { .. })
        ));
        assert!(matches!(
            reg.map(usize::MAX - 10, 8),
            Err(DirectError::OutOfBuffer { .. })
        ));
        assert_eq!(view.usage().mappings, 0);
        assert_eq!(mapper.stats(), DirectStats::default());
    }

    #[test]
    fn registered_buffers_hit_the_cache_and_are_evicted_lru() {
        let (view, mapper, mut buf) = setup(2);
        // SAFETY: buf outlives reg and is not touched.
        let reg = unsafe { mapper.register(buf.as_mut_ptr(), 64 << 10) }.unwrap();
        let a = reg.map(0, 4096).unwrap();
        drop(a);
        assert_eq!(view.usage().mappings, 1, "kept in the cache after the I/O");
        let a = reg.map(0, 4096).unwrap();
        assert_eq!(a.device_addr().0, reg.as_ptr() as u64);
        drop(a);
        let s = mapper.stats();
        assert_eq!((s.hits, s.misses, s.maps, s.unmaps), (1, 1, 1, 0));
        // Same address, different length: a different key.
        drop(reg.map(0, 8192).unwrap());
        assert_eq!((mapper.cached(), view.usage().mappings), (2, 2));
        // Touch (0, 4096) so (0, 8192) is the LRU, then add a third: (0, 8192) goes.
        drop(reg.map(0, 4096).unwrap());
        drop(reg.map(16384, 4096).unwrap());
        let s = mapper.stats();
        assert_eq!((s.hits, s.misses, s.maps, s.unmaps), (2, 3, 3, 1));
        assert_eq!((mapper.cached(), view.usage().mappings), (2, 2));
        drop(reg.map(0, 4096).unwrap());
        assert_eq!(mapper.stats().hits, 3, "(0, 4096) survived the eviction");
        drop(reg);
        assert_eq!(mapper.cached(), 0);
        assert_eq!(
            view.usage().mappings,
            0,
            "dropping the registration unshares"
        );
        assert_eq!(mapper.stats().unmaps, 3);
    }

    #[test]
    fn eviction_never_pulls_memory_from_under_io() {
        let (view, mapper, mut buf) = setup(1);
        // SAFETY: buf outlives reg and is not touched.
        let reg = unsafe { mapper.register(buf.as_mut_ptr(), 64 << 10) }.unwrap();
        let in_flight = reg.map(0, 4096).unwrap();
        let other = reg.map(4096, 4096).unwrap(); // evicts (0, 4096) from the cache
        assert_eq!(mapper.cached(), 1);
        assert_eq!(
            view.usage().mappings,
            2,
            "evicted but still in use: still shared"
        );
        assert_eq!(mapper.stats().unmaps, 0);
        drop(in_flight);
        assert_eq!(view.usage().mappings, 1);
        assert_eq!(mapper.stats().unmaps, 1);
        drop(other);
        drop(reg);
        assert_eq!(view.usage().mappings, 0);
    }

    #[test]
    fn capacity_zero_maps_every_time() {
        let (view, mapper, mut buf) = setup(0);
        // SAFETY: buf outlives reg and is not touched.
        let reg = unsafe { mapper.register(buf.as_mut_ptr(), 8192) }.unwrap();
        for _ in 0..3 {
            let m = reg.map(0, 8192).unwrap();
            assert_eq!(view.usage().mappings, 1);
            drop(m);
            assert_eq!(view.usage().mappings, 0);
        }
        let s = mapper.stats();
        assert_eq!((s.hits, s.misses, s.maps, s.unmaps), (0, 3, 3, 3));
    }

    #[test]
    fn two_registrations_evict_only_their_own() {
        let (view, mapper, mut buf) = setup(8);
        let p = buf.as_mut_ptr();
        // SAFETY: buf outlives both registrations; they cover disjoint halves.
        let (r1, r2) = unsafe {
            (
                mapper.register(p, 32 << 10).unwrap(),
                mapper.register(p.wrapping_add(32 << 10), 32 << 10).unwrap(),
            )
        };
        drop(r1.map(0, 4096).unwrap());
        drop(r2.map(0, 4096).unwrap());
        drop(r2.map(4096, 4096).unwrap());
        drop(r1);
        assert_eq!((mapper.cached(), view.usage().mappings), (2, 2));
        drop(r2.map(0, 4096).unwrap());
        assert_eq!(mapper.stats().hits, 1);
        drop(r2);
        assert_eq!(view.usage().mappings, 0);
    }

    #[test]
    fn share_errors_pass_through_and_leave_nothing_behind() {
        let view = Arc::new(Identity::with_limit(1));
        let mapper = DirectMapper::new(view.clone(), 4);
        let mut buf = memmap2::MmapMut::map_anon(16384).unwrap();
        // SAFETY: buf outlives reg and is not touched.
        let reg = unsafe { mapper.register(buf.as_mut_ptr(), 16384) }.unwrap();
        let a = reg.map(0, 4096).unwrap();
        assert!(matches!(
            reg.map(4096, 4096),
            Err(DirectError::Share(ShareError::MappingLimit { .. }))
        ));
        assert_eq!(mapper.cached(), 1);
        let s = mapper.stats();
        assert_eq!((s.misses, s.maps, s.unmaps, s.unmap_errors), (2, 1, 0, 0));
        drop(a);
        drop(reg);
        assert_eq!(view.usage().mappings, 0);
    }

    #[test]
    fn concurrent_maps_keep_counts_consistent() {
        let (view, mapper, mut buf) = setup(3);
        // SAFETY: buf outlives reg (the scope below joins all threads first) and is untouched.
        let reg = unsafe { mapper.register(buf.as_mut_ptr(), 64 << 10) }.unwrap();
        const THREADS: usize = 4;
        const ROUNDS: usize = 500;
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let reg = &reg;
                s.spawn(move || {
                    for i in 0..ROUNDS {
                        let page = (t + i) % 5;
                        let m = reg.map(page * 4096, 4096).unwrap();
                        assert_eq!(m.device_addr().0, reg.as_ptr() as u64 + page as u64 * 4096);
                    }
                });
            }
        });
        let s = mapper.stats();
        assert_eq!(s.hits + s.misses, (THREADS * ROUNDS) as u64);
        assert_eq!(s.maps, s.misses);
        assert_eq!(s.maps - s.unmaps, view.usage().mappings);
        assert!(mapper.cached() <= 3);
        drop(reg);
        assert_eq!(view.usage().mappings, 0);
        assert_eq!(mapper.stats().unmaps, mapper.stats().maps);
    }
}
