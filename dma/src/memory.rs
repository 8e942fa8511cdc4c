//! Chunks of DMA memory: where device-reachable bytes come from.
//!
//! A [`Chunk`] is one `memfd`, mapped once into our address space, made of whole pages of one
//! size. It is the unit the pool grows and shrinks by and the unit a [`crate::share::DeviceView`]
//! makes device-visible *in one call* (one IOMMU mapping, one vhost-user region): a chunk of
//! `n` hugepages therefore costs one of VFIO's 65,535 mappings, not `n`.
//!
//! Memory comes from `memfd_create(MFD_HUGETLB)` by default, so that
//! - it is physically contiguous per hugepage and never swapped or migrated (what a device needs);
//! - it can be handed to another process by file descriptor (vhost-user backends map it).
//!
//! Machines without hugepages may opt in to locked 4 KiB pages ([`PageSize::Small4K`]); that is
//! off by default because `mlock` needs a large `RLIMIT_MEMLOCK` and the IOMMU then needs many
//! more page-table entries.
//!
//! Fresh chunks are zero-filled by the kernel, so a new chunk never shows a device stale data.
//!
//! Creating a chunk blocks (page faults, reservation): call it from setup or the grower thread,
//! never from the hot path.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use nix::sys::memfd::{memfd_create, MFdFlags};

/// The size of the pages backing a chunk.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub enum PageSize {
    /// 2 MiB hugepages (the default).
    #[default]
    Huge2M,
    /// 1 GiB hugepages (must be reserved at boot on most machines).
    Huge1G,
    /// Ordinary 4 KiB pages, locked with `mlock`. Only for machines without hugepages.
    Small4K,
}

impl PageSize {
    /// The page size in bytes.
    pub const fn bytes(self) -> usize {
        match self {
            PageSize::Huge2M => 2 << 20,
            PageSize::Huge1G => 1 << 30,
            PageSize::Small4K => 4 << 10,
        }
    }

    /// The page size in kiB, as `/sys/kernel/mm/hugepages/hugepages-<N>kB` names it.
    pub const fn kib(self) -> usize {
        self.bytes() >> 10
    }

    fn memfd_flags(self) -> MFdFlags {
        match self {
            PageSize::Huge2M => {
                MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_HUGETLB | MFdFlags::MFD_HUGE_2MB
            }
            PageSize::Huge1G => {
                MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_HUGETLB | MFdFlags::MFD_HUGE_1GB
            }
            PageSize::Small4K => MFdFlags::MFD_CLOEXEC,
        }
    }
}

/// Where chunk memory comes from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemoryConfig {
    /// The preferred page size.
    pub page_size: PageSize,
    /// Fall back to locked 4 KiB pages when no hugepages are available. Off by default.
    pub allow_small_pages: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            page_size: PageSize::Huge2M,
            allow_small_pages: false,
        }
    }
}

/// What went wrong making DMA memory, each variant saying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The chunk length was zero or not a whole number of pages.
    #[error("chunk length {len} is not a non-zero multiple of the {page} B page size")]
    BadLength {
        /// The requested length.
        len: usize,
        /// The page size.
        page: usize,
    },
    /// Not enough free hugepages of the wanted size.
    #[error(
        "not enough free {kib} kB hugepages: need {needed}, {free} free of {total} reserved; \
         reserve more as root with `echo {suggest} > /sys/kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages` \
         (or allow the 4 KiB fallback)"
    )]
    NoHugepages {
        /// Page size in kiB.
        kib: usize,
        /// Pages this chunk needs.
        needed: usize,
        /// Pages free now.
        free: usize,
        /// Pages reserved in total.
        total: usize,
        /// A total that would satisfy this request.
        suggest: usize,
    },
    /// `RLIMIT_MEMLOCK` is too small to lock 4 KiB pages.
    #[error(
        "memlock limit too low: locking {needed} B more, limit is {limit} B; raise it \
         (`ulimit -l unlimited` as root, or LimitMEMLOCK= in systemd) or use hugepages"
    )]
    MemlockLimit {
        /// Bytes this chunk needs locked.
        needed: usize,
        /// The soft limit in bytes.
        limit: u64,
    },
    /// Any other system call failure.
    #[error("{what} failed: {source}")]
    Os {
        /// The call that failed.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// One `memfd` of DMA memory, mapped shared into this process, `len` bytes of pages of one size.
///
/// The chunk owns its mapping and file descriptor; dropping it unmaps and closes them. It must be
/// unshared from every device first (the pool guarantees this order).
///
/// The chunk hands out only raw pointers: the device may write this memory at any time it is
/// shared, so Rust references over it would be unsound. Bytes move in and out through
/// [`crate::copy`].
#[derive(Debug)]
pub struct Chunk {
    ptr: NonNull<u8>,
    len: usize,
    page_size: PageSize,
    fd: OwnedFd,
}

// SAFETY: a Chunk is a raw mapping owned by this value; nothing in it is tied to a thread.
unsafe impl Send for Chunk {}
// SAFETY: shared access only hands out the base pointer and metadata; every access to the bytes
// goes through raw-pointer copies whose callers own the disjoint ranges they touch.
unsafe impl Sync for Chunk {}

impl Chunk {
    /// Makes a chunk of `len` bytes with the configured page size, falling back to locked 4 KiB
    /// pages if hugepages are short and the configuration allows it.
    ///
    /// Blocks while the kernel reserves and faults the pages in: call from setup or a grower
    /// thread.
    pub fn new(len: usize, config: &MemoryConfig) -> Result<Chunk, MemoryError> {
        match Chunk::with_page_size(len, config.page_size) {
            Err(MemoryError::NoHugepages { .. })
                if config.allow_small_pages && config.page_size != PageSize::Small4K =>
            {
                Chunk::with_page_size(len, PageSize::Small4K)
            }
            r => r,
        }
    }

    /// Makes a chunk of exactly this page size (no fallback).
    pub fn with_page_size(len: usize, page_size: PageSize) -> Result<Chunk, MemoryError> {
        let page = page_size.bytes();
        if len == 0 || len % page != 0 {
            return Err(MemoryError::BadLength { len, page });
        }
        if page_size == PageSize::Small4K {
            check_memlock(len)?;
        }
        let fd = memfd_create(c"tidepool-chunk", page_size.memfd_flags())
            .map_err(|e| os_or_hugepages("memfd_create", e.into(), page_size, len))?;
        nix::unistd::ftruncate(&fd, len as libc::off_t)
            .map_err(|e| os_or_hugepages("ftruncate", e.into(), page_size, len))?;
        let ptr = map_shared(&fd, len, page_size)?;
        Ok(Chunk {
            ptr,
            len,
            page_size,
            fd,
        })
    }

    /// The first byte of the chunk in this process.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The chunk's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: chunks are never empty. (For clippy's `len_without_is_empty`.)
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The page size backing the chunk.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// The memfd, for backends that share memory with another process (vhost-user).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The chunk as a [`HostRegion`] for [`crate::share::DeviceView::share`].
    pub fn region(&self) -> HostRegion<'_> {
        HostRegion {
            addr: self.ptr,
            len: self.len,
            page_size: self.page_size.bytes(),
            fd: Some(self.fd.as_fd()),
        }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: ptr/len is exactly the mapping made in `map_shared`, owned by this chunk; no
        // pointer into it outlives the chunk (the pool drops chunks only when fully idle).
        let r = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        debug_assert_eq!(r, 0, "munmap of a chunk failed");
    }
}

/// A range of this process's memory to make device-visible: a chunk, or caller memory for
/// direct mapping.
#[derive(Copy, Clone, Debug)]
pub struct HostRegion<'a> {
    /// First byte.
    pub addr: NonNull<u8>,
    /// Length in bytes.
    pub len: usize,
    /// Size of the pages backing it (4 KiB for ordinary memory).
    pub page_size: usize,
    /// The memfd behind it, where there is one (chunks); offset 0 is `addr`.
    pub fd: Option<BorrowedFd<'a>>,
}

impl HostRegion<'_> {
    /// The first address as an integer.
    pub fn start(&self) -> usize {
        self.addr.as_ptr() as usize
    }
}

/// Maps `len` bytes of `fd` shared, read-write, and faults every page in.
fn map_shared(fd: &OwnedFd, len: usize, page_size: PageSize) -> Result<NonNull<u8>, MemoryError> {
    let mut flags = libc::MAP_SHARED | libc::MAP_POPULATE;
    if page_size == PageSize::Small4K {
        flags |= libc::MAP_LOCKED;
    }
    // SAFETY: a fresh mapping (addr NULL) of our own memfd; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        return Err(os_or_hugepages("mmap", e, page_size, len));
    }
    let ptr = NonNull::new(p.cast::<u8>()).expect("mmap returned NULL without MAP_FIXED");
    if page_size == PageSize::Small4K {
        // SAFETY: locks the range we just mapped; no memory is changed.
        if unsafe { libc::mlock(p, len) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: undoes the mapping just made; nothing else refers to it yet.
            unsafe { libc::munmap(p, len) };
            return Err(match check_memlock(len) {
                Err(m) => m,
                Ok(()) => MemoryError::Os {
                    what: "mlock",
                    source: e,
                },
            });
        }
    }
    Ok(ptr)
}

/// Turns ENOMEM/EINVAL on hugetlb memory into [`MemoryError::NoHugepages`] with numbers.
fn os_or_hugepages(
    what: &'static str,
    e: std::io::Error,
    page_size: PageSize,
    len: usize,
) -> MemoryError {
    let starved = matches!(e.raw_os_error(), Some(libc::ENOMEM) | Some(libc::EINVAL));
    if page_size != PageSize::Small4K && starved {
        let (total, free) = hugepage_counts(page_size).unwrap_or((0, 0));
        let needed = len / page_size.bytes();
        return MemoryError::NoHugepages {
            kib: page_size.kib(),
            needed,
            free,
            total,
            suggest: total + needed.saturating_sub(free),
        };
    }
    MemoryError::Os { what, source: e }
}

/// `(reserved, free)` hugepages of this size, from sysfs.
pub fn hugepage_counts(page_size: PageSize) -> Option<(usize, usize)> {
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page_size.kib());
    let read = |f: &str| -> Option<usize> {
        std::fs::read_to_string(format!("{dir}/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some((read("nr_hugepages")?, read("free_hugepages")?))
}

/// Checks that `RLIMIT_MEMLOCK` leaves room to lock `len` more bytes (root with
/// `CAP_IPC_LOCK` is exempt).
fn check_memlock(len: usize) -> Result<(), MemoryError> {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK)
        .map_err(|e| MemoryError::Os {
            what: "getrlimit",
            source: e.into(),
        })?;
    let privileged = nix::unistd::geteuid().is_root();
    if !privileged && soft != libc::RLIM_INFINITY && (len as u64) > soft {
        return Err(MemoryError::MemlockLimit {
            needed: len,
            limit: soft,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lengths_are_rejected() {
        assert!(matches!(
            Chunk::with_page_size(0, PageSize::Small4K),
            Err(MemoryError::BadLength { .. })
        ));
        assert!(matches!(
            Chunk::with_page_size(4096 + 1, PageSize::Small4K),
            Err(MemoryError::BadLength { .. })
        ));
        assert!(matches!(
            Chunk::with_page_size(4096, PageSize::Huge2M),
            Err(MemoryError::BadLength { .. })
        ));
    }

    #[test]
    fn small_page_chunk_is_zeroed_and_writable() {
        let c = Chunk::with_page_size(64 << 10, PageSize::Small4K).unwrap();
        assert_eq!(c.len(), 64 << 10);
        // SAFETY: the chunk is not shared with any device; we own all of it here.
        let bytes = unsafe { std::slice::from_raw_parts_mut(c.as_ptr(), c.len()) };
        assert!(bytes.iter().all(|&b| b == 0));
        bytes[100] = 7;
        assert_eq!(bytes[100], 7);
        assert_eq!(c.region().len, 64 << 10);
        assert!(c.region().fd.is_some());
    }

    #[test]
    fn hugepage_chunk_or_a_clear_error() {
        // Either this machine has a free 2 MiB page, or the error names the fix.
        match Chunk::with_page_size(2 << 20, PageSize::Huge2M) {
            Ok(c) => {
                assert_eq!(c.page_size(), PageSize::Huge2M);
                assert_eq!(
                    c.as_ptr() as usize % (2 << 20),
                    0,
                    "hugepage mapping is 2 MiB aligned"
                );
            }
            Err(e @ MemoryError::NoHugepages { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("nr_hugepages"), "{msg}");
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
