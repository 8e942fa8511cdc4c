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
//! more page-table entries. The limit is checked against the total: this process's locked
//! chunks are counted ([`locked_bytes`]), a chunk that would pass the limit in total fails
//! with [`MemoryError::MemlockLimit`] before any system call, and a kernel refusal to lock
//! (EAGAIN/ENOMEM: other code may hold locked memory too) becomes the same error. A thread
//! with `CAP_IPC_LOCK` is exempt, as the kernel exempts it. Hugetlb memory is not charged to
//! the limit and not counted.
//!
//! Fresh chunks are zero-filled by the kernel, so a new chunk never shows a device stale data.
//!
//! Creating a chunk blocks (page faults, reservation): call it from setup or the grower thread,
//! never from the hot path.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// `RLIMIT_MEMLOCK` is too small to lock 4 KiB pages: this chunk on top of what this
    /// process's chunks already hold locked would pass it (or the kernel refused to lock
    /// with EAGAIN/ENOMEM, which is how it reports the limit).
    #[error(
        "memlock limit too low: locking {needed} B more on top of {locked} B already locked \
         by tidepool chunks, limit is {}; raise it (`ulimit -l unlimited` as root, or \
         LimitMEMLOCK= in systemd) or use hugepages", show_limit(*.limit)
    )]
    MemlockLimit {
        /// Bytes this chunk needs locked.
        needed: usize,
        /// Bytes this process's 4 KiB-page chunks held locked already ([`locked_bytes`]).
        locked: u64,
        /// The soft limit in bytes (`RLIM_INFINITY` if unlimited).
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
        // Only 4 KiB pages are locked against RLIMIT_MEMLOCK: hugetlb memory is not charged
        // to it.
        let lock = match page_size {
            PageSize::Small4K => Some(MemlockReservation::take(len)?),
            PageSize::Huge2M | PageSize::Huge1G => None,
        };
        let fd = memfd_create(c"tidepool-chunk", page_size.memfd_flags())
            .map_err(|e| os_or_hugepages("memfd_create", e.into(), page_size, len))?;
        nix::unistd::ftruncate(&fd, len as libc::off_t)
            .map_err(|e| os_or_hugepages("ftruncate", e.into(), page_size, len))?;
        let ptr = map_shared(&fd, len, page_size, lock.as_ref())?;
        // The chunk's drop gives the bytes back from now on.
        if let Some(lock) = lock {
            lock.keep();
        }
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
        if self.page_size == PageSize::Small4K {
            LOCKED_BYTES.fetch_sub(self.len as u64, Ordering::AcqRel);
        }
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

/// Maps `len` bytes of `fd` shared, read-write, and faults every page in; 4 KiB pages are
/// locked too, under `lock` (the reservation made for them).
fn map_shared(
    fd: &OwnedFd,
    len: usize,
    page_size: PageSize,
    lock: Option<&MemlockReservation>,
) -> Result<NonNull<u8>, MemoryError> {
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
        return Err(match lock {
            // MAP_LOCKED over the limit fails with EAGAIN.
            Some(lock) => lock.failure("mmap", e),
            None => os_or_hugepages("mmap", e, page_size, len),
        });
    }
    let ptr = NonNull::new(p.cast::<u8>()).expect("mmap returned NULL without MAP_FIXED");
    if let Some(lock) = lock {
        // SAFETY: locks the range we just mapped; no memory is changed.
        if unsafe { libc::mlock(p, len) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: undoes the mapping just made; nothing else refers to it yet.
            unsafe { libc::munmap(p, len) };
            return Err(lock.failure("mlock", e));
        }
    }
    Ok(ptr)
}

/// Bytes of 4 KiB-page chunks this process holds locked: reserved before a chunk is made,
/// given back when it is dropped (or was never made). Hugetlb chunks are not counted: the
/// kernel does not charge hugetlb memory to `RLIMIT_MEMLOCK`.
static LOCKED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes this process's 4 KiB-page chunks hold locked now (what [`MemoryError::MemlockLimit`]
/// calls `locked`). Memory locked by other code in the process is not included; the kernel
/// counts it, and its refusal comes back as the same typed error.
pub fn locked_bytes() -> u64 {
    LOCKED_BYTES.load(Ordering::Acquire)
}

/// `len` bytes counted in [`LOCKED_BYTES`] for a chunk being made; given back on drop unless
/// [`MemlockReservation::keep`] hands them to the chunk.
#[derive(Debug)]
struct MemlockReservation {
    len: usize,
    /// What was locked before this reservation, and the soft limit, for error messages.
    locked_before: u64,
    limit: u64,
}

impl MemlockReservation {
    /// Reserves `len` bytes if `RLIMIT_MEMLOCK` leaves room for them on top of what our
    /// chunks already hold ([`memlock_verdict`]). Two threads cannot both take the last room:
    /// the count is raised first, then checked.
    fn take(len: usize) -> Result<MemlockReservation, MemoryError> {
        let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK)
            .map_err(|e| MemoryError::Os {
                what: "getrlimit",
                source: e.into(),
            })?;
        let locked_before = LOCKED_BYTES.fetch_add(len as u64, Ordering::AcqRel);
        let reservation = MemlockReservation {
            len,
            locked_before,
            limit: soft,
        };
        memlock_verdict(soft, ipc_lock_exempt(), locked_before, len as u64)?;
        Ok(reservation)
    }

    /// The chunk was made: its drop gives the bytes back.
    fn keep(self) {
        std::mem::forget(self);
    }

    /// The error for a failed `mmap(MAP_LOCKED)` or `mlock` of this reservation.
    fn failure(&self, what: &'static str, e: std::io::Error) -> MemoryError {
        lock_failure(what, e, self.len, self.locked_before, self.limit)
    }
}

impl Drop for MemlockReservation {
    fn drop(&mut self) {
        LOCKED_BYTES.fetch_sub(self.len as u64, Ordering::AcqRel);
    }
}

/// Whether locking `needed` more bytes on top of `locked` stays within the soft
/// `RLIMIT_MEMLOCK` `limit`. A thread with `CAP_IPC_LOCK` (`exempt`: root, usually) or an
/// unlimited limit is not limited: the kernel ignores the rlimit for it.
fn memlock_verdict(limit: u64, exempt: bool, locked: u64, needed: u64) -> Result<(), MemoryError> {
    if !exempt && limit != libc::RLIM_INFINITY && locked.saturating_add(needed) > limit {
        return Err(MemoryError::MemlockLimit {
            needed: needed as usize,
            locked,
            limit,
        });
    }
    Ok(())
}

/// The error for a failed lock: EAGAIN (`mmap(MAP_LOCKED)`) and ENOMEM (`mlock`) are how the
/// kernel says `RLIMIT_MEMLOCK` would be passed, whatever our own count said (other code in
/// the process may hold locked memory too), so they become [`MemoryError::MemlockLimit`].
fn lock_failure(
    what: &'static str,
    e: std::io::Error,
    needed: usize,
    locked: u64,
    limit: u64,
) -> MemoryError {
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::ENOMEM) => MemoryError::MemlockLimit {
            needed,
            locked,
            limit,
        },
        _ => MemoryError::Os { what, source: e },
    }
}

/// `CAP_IPC_LOCK`'s bit in the capability sets.
const CAP_IPC_LOCK: u32 = 14;

/// Whether the calling thread has `CAP_IPC_LOCK` in its effective set (capabilities are per
/// thread, and the kernel checks the thread that locks). Read from `/proc/thread-self/status`;
/// if that cannot be read, root is assumed to have it.
fn ipc_lock_exempt() -> bool {
    let eff = std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        });
    match eff {
        Some(caps) => caps & (1 << CAP_IPC_LOCK) != 0,
        None => nix::unistd::geteuid().is_root(),
    }
}

/// A memlock limit for messages: bytes, or "unlimited".
fn show_limit(limit: u64) -> String {
    if limit == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        format!("{limit} B")
    }
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
    fn memlock_decision_counts_bytes_already_locked() {
        const K: u64 = 1024;
        // Room for one more 256 KiB chunk under 384 KiB only while nothing else is locked.
        assert!(memlock_verdict(384 * K, false, 0, 256 * K).is_ok());
        assert!(
            memlock_verdict(512 * K, false, 256 * K, 256 * K).is_ok(),
            "exactly the limit"
        );
        match memlock_verdict(384 * K, false, 256 * K, 256 * K) {
            Err(MemoryError::MemlockLimit {
                needed,
                locked,
                limit,
            }) => assert_eq!((needed, locked, limit), (256 << 10, 256 << 10, 384 << 10)),
            other => panic!("{other:?}"),
        }
        // CAP_IPC_LOCK (root, usually) and an unlimited rlimit are exempt.
        assert!(memlock_verdict(384 * K, true, 256 * K, 256 * K).is_ok());
        assert!(memlock_verdict(libc::RLIM_INFINITY, false, u64::MAX / 2, 256 * K).is_ok());
        // The message names the total.
        let e = memlock_verdict(384 * K, false, 256 * K, 256 * K).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("262144 B already locked"), "{msg}");
        assert!(msg.contains("limit is 393216 B"), "{msg}");
    }

    #[test]
    fn eagain_and_enomem_from_locking_become_the_memlock_error() {
        for errno in [libc::EAGAIN, libc::ENOMEM] {
            let e = lock_failure(
                "mmap",
                std::io::Error::from_raw_os_error(errno),
                4096,
                8192,
                12288,
            );
            assert!(
                matches!(
                    e,
                    MemoryError::MemlockLimit {
                        needed: 4096,
                        locked: 8192,
                        limit: 12288
                    }
                ),
                "errno {errno}: {e}"
            );
        }
        let e = lock_failure(
            "mmap",
            std::io::Error::from_raw_os_error(libc::EBADF),
            4096,
            0,
            12288,
        );
        assert!(matches!(e, MemoryError::Os { what: "mmap", .. }), "{e}");
    }

    /// Runs [`memlock_child`] in a child process (its own RLIMIT_MEMLOCK, no CAP_IPC_LOCK,
    /// no other test's chunks) and checks that it passed.
    #[test]
    fn memlock_limit_is_enforced_across_chunks() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "memory::tests::memlock_child",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "child failed:\n{text}");
        assert!(text.contains("1 passed"), "the child test ran:\n{text}");
    }

    const CHILD_ENV: &str = "TIDEPOOL_MEMLOCK_CHILD";

    /// The child side of [`memlock_limit_is_enforced_across_chunks`]: gives up CAP_IPC_LOCK
    /// (so the kernel enforces the limit even for root), sets RLIMIT_MEMLOCK to 384 KiB, and
    /// checks that crossing it in total, by our chunks or by other locked memory, gives the
    /// typed error, and that dropping a chunk gives its bytes back.
    #[test]
    #[ignore = "runs in a child process of memlock_limit_is_enforced_across_chunks"]
    fn memlock_child() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        assert_eq!(
            std::env::var(CHILD_ENV).as_deref(),
            Ok("1"),
            "run only by memlock_limit_is_enforced_across_chunks"
        );
        drop_ipc_lock();
        assert!(!ipc_lock_exempt(), "CAP_IPC_LOCK dropped");
        let (_, hard) = getrlimit(Resource::RLIMIT_MEMLOCK).unwrap();
        let limit: u64 = 384 << 10;
        assert!(hard >= limit, "hard limit {hard} too low for this test");
        setrlimit(Resource::RLIMIT_MEMLOCK, limit, hard).unwrap();
        assert_eq!(locked_bytes(), 0);

        // 256 KiB fits; another 256 KiB would pass the limit in total (each fits alone).
        let a = Chunk::with_page_size(256 << 10, PageSize::Small4K).unwrap();
        assert_eq!(locked_bytes(), 256 << 10);
        match Chunk::with_page_size(256 << 10, PageSize::Small4K) {
            Err(MemoryError::MemlockLimit {
                needed,
                locked,
                limit: l,
            }) => assert_eq!((needed, locked, l), (256 << 10, 256 << 10, limit)),
            other => panic!("expected the memlock error, got {other:?}"),
        }
        assert_eq!(locked_bytes(), 256 << 10, "the refused chunk took nothing");
        // Dropping a chunk gives its bytes back.
        drop(a);
        assert_eq!(locked_bytes(), 0);
        let b = Chunk::with_page_size(256 << 10, PageSize::Small4K).unwrap();
        drop(b);

        // Memory locked by someone else in this process is not in our count: the kernel's
        // EAGAIN must still come back as the typed error.
        let other = 256 << 10;
        // SAFETY: a fresh private anonymous mapping (addr NULL), ours alone, locked and
        // unmapped below; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                other,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: locks the mapping just made.
        assert_eq!(unsafe { libc::mlock(p, other) }, 0);
        match Chunk::with_page_size(256 << 10, PageSize::Small4K) {
            Err(MemoryError::MemlockLimit { needed, locked, .. }) => {
                assert_eq!((needed, locked), (256 << 10, 0))
            }
            other => panic!("expected the memlock error, got {other:?}"),
        }
        assert_eq!(locked_bytes(), 0);
        // SAFETY: unmaps the mapping made above; nothing refers to it.
        assert_eq!(unsafe { libc::munmap(p, other) }, 0);
        let c = Chunk::with_page_size(256 << 10, PageSize::Small4K).unwrap();
        assert_eq!(locked_bytes(), 256 << 10);
        drop(c);
    }

    /// Removes CAP_IPC_LOCK from this thread's effective and permitted sets (capset v3;
    /// capabilities are per thread, and the kernel checks the thread that locks).
    fn drop_ipc_lock() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Copy, Clone, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const V3: u32 = 0x2008_0522;
        let mut h = Header {
            version: V3,
            pid: 0,
        };
        let mut d = [Data::default(); 2];
        // SAFETY: capget writes two v3 data structs, which `d` holds; `h` is a valid header.
        let r = unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) };
        assert_eq!(r, 0, "capget: {}", std::io::Error::last_os_error());
        let bit = 1u32 << CAP_IPC_LOCK;
        d[0].effective &= !bit;
        d[0].permitted &= !bit;
        // SAFETY: as above; capset only reads them, and dropping a capability is allowed.
        let r = unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) };
        assert_eq!(r, 0, "capset: {}", std::io::Error::last_os_error());
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

    #[test]
    fn no_hugepages_falls_back_to_4k_pages_only_when_allowed() {
        // 1 GiB pages are not reserved on the test hosts; 1 GiB of 4 KiB pages is too much to
        // lock in a test, so the fallback is checked on a 2 MiB chunk of "2 MiB pages" where
        // none are free, and otherwise on the decision alone.
        let free_2m =
            std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
        let strict = MemoryConfig {
            page_size: PageSize::Huge2M,
            allow_small_pages: false,
        };
        let lenient = MemoryConfig {
            allow_small_pages: true,
            ..strict
        };
        if free_2m == 0 {
            assert!(matches!(
                Chunk::new(2 << 20, &strict),
                Err(MemoryError::NoHugepages { .. })
            ));
            let c = Chunk::new(2 << 20, &lenient).expect("the 4 KiB fallback");
            assert_eq!(c.page_size(), PageSize::Small4K);
        } else {
            let c = Chunk::new(2 << 20, &lenient).expect("a hugepage chunk");
            assert_eq!(
                c.page_size(),
                PageSize::Huge2M,
                "no fallback while pages are free"
            );
        }
    }
}
