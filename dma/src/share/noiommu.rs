//! No IOMMU: the device address is the physical address.
//!
//! For VFIO's no-IOMMU mode, uio drivers, and confidential or plain VMs without a vIOMMU, a
//! device reaches host memory by physical address. This backend learns physical addresses from
//! `/proc/self/pagemap`: one 64-bit entry per 4 KiB virtual page, bit 63 = present, bits 0-54 =
//! page frame number (PFN). Since Linux 4.2 the PFN reads as 0 without `CAP_SYS_ADMIN`; that is
//! reported as [`ShareError::Permission`] rather than silently giving the device address 0.
//!
//! ## The contiguity rule, and why it is checked frame by frame
//! [`DeviceView::share`] promises one contiguous device-address range for the whole region.
//! Without an IOMMU that is only true if the region is *physically* contiguous, so
//! [`NoIommu::share`] reads the PFN of every 4 KiB frame in the region and requires
//! `pfn[i] == pfn[0] + i` for all `i`. That covers both conditions:
//! - each hugepage is contiguous inside (true for hugetlb pages, but checked, not assumed);
//! - consecutive pages of the region are adjacent in physical memory — almost never true for
//!   a multi-hugepage chunk, so **use chunks of exactly one hugepage** with this backend
//!   (e.g. 2 MiB chunks of [`crate::memory::PageSize::Huge2M`]); the error says so.
//!
//! The physical range must also lie at or below the device's DMA mask.
//!
//! Drivers that build scatter lists page by page (NVMe PRP lists) and do not need one
//! contiguous range can use [`physical_pages`] / [`NoIommu::physical_pages`] instead.
//!
//! ## Pinning
//! Without an IOMMU nothing stops the kernel from moving a page under the device. Hugetlb pages
//! are never migrated or swapped, so hugepage chunks are safe. Locked 4 KiB pages are not
//! swapped but *can* be migrated by compaction (unless `vm.compact_unevictable_allowed = 0`):
//! share 4 KiB memory with this backend only for short-lived I/O or on systems set up that way.
//!
//! ## VFIO no-IOMMU mode
//! `vfio-ioctls` only drives the type1 IOMMU. Opening a device in VFIO's no-IOMMU mode needs
//! raw ioctls (`VFIO_CHECK_EXTENSION(VFIO_NOIOMMU_IOMMU)`, `/dev/vfio/noiommu-<group>`,
//! `VFIO_SET_IOMMU(VFIO_NOIOMMU_IOMMU)`) and a kernel built with `CONFIG_VFIO_NOIOMMU` plus
//! `vfio.enable_unsafe_noiommu_mode=1`. Debian's 6.1 and 6.12 kernels lack that option, so this
//! module provides only the address translation; a no-IOMMU device opener is not written yet.
//!
//! ## Locking
//! The pagemap file is read with positioned reads (`pread`), which need no lock; the table of
//! live regions is behind one `Mutex`, held only for bookkeeping.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use super::{DeviceView, ShareError, ShareUsage};
use crate::memory::HostRegion;
use crate::DeviceAddr;

/// The granule of `/proc/self/pagemap`: one entry per 4 KiB page.
const FRAME: usize = 4096;
/// Entries read per `pread` (4 KiB of pagemap = 2 MiB of address space).
const BATCH: usize = 512;
const PAGEMAP: &str = "/proc/self/pagemap";
const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;
const HINT_ROOT: &str = "physical addresses need CAP_SYS_ADMIN: run as root (or use an IOMMU \
                         and the VFIO type1 backend)";

/// An open `/proc/self/pagemap`: virtual-to-physical translation for this process.
///
/// Reads are positioned (`pread`), so one `Pagemap` can be shared by threads without a lock.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap` and checks that it reveals physical addresses (root /
    /// `CAP_SYS_ADMIN`), translating a page of our own stack as a probe.
    pub fn open() -> Result<Pagemap, ShareError> {
        let file = File::open(PAGEMAP).map_err(|_| ShareError::Permission {
            path: PAGEMAP.into(),
            hint: HINT_ROOT,
        })?;
        let map = Pagemap { file };
        let probe = std::hint::black_box([1u8; 8]);
        map.translate(probe.as_ptr() as usize)?;
        Ok(map)
    }

    /// The physical address of the byte at virtual address `addr` in this process.
    ///
    /// Errors: the page is not resident ([`ShareError::Unsuitable`]: fault it in first), or
    /// PFNs are hidden ([`ShareError::Permission`]).
    pub fn translate(&self, addr: usize) -> Result<u64, ShareError> {
        let page = addr - addr % FRAME;
        let mut pfn = 0;
        self.for_each_frame(page, 1, |_, p| {
            pfn = p;
            Ok(())
        })?;
        Ok(pfn * FRAME as u64 + (addr % FRAME) as u64)
    }

    /// The physical address of each `page_size` page of `[addr, addr + len)`.
    ///
    /// `addr` and `len` must be multiples of `page_size` (a power of two ≥ 4 KiB). Every 4 KiB
    /// frame inside each page is read and must follow the previous one physically, so each
    /// returned address starts a physically contiguous page. Reads `len / 4096` pagemap
    /// entries in batches.
    pub fn physical_pages(
        &self,
        addr: usize,
        len: usize,
        page_size: usize,
    ) -> Result<Vec<u64>, ShareError> {
        check_aligned(addr, len, page_size)?;
        let frames_per_page = page_size / FRAME;
        let mut pages = Vec::with_capacity(len / page_size);
        let mut expected = 0;
        self.for_each_frame(addr, len / FRAME, |i, pfn| {
            if i % frames_per_page == 0 {
                pages.push(pfn * FRAME as u64);
            } else if pfn != expected {
                return Err(hugepage_split(addr, i, page_size));
            }
            expected = pfn + 1;
            Ok(())
        })?;
        Ok(pages)
    }

    /// Calls `f(i, pfn)` for the `n` frames starting at the frame-aligned `addr`, in order,
    /// checking each is present and has a visible PFN. Stops at the first error.
    fn for_each_frame(
        &self,
        addr: usize,
        n: usize,
        mut f: impl FnMut(usize, u64) -> Result<(), ShareError>,
    ) -> Result<(), ShareError> {
        let mut raw = [0u8; BATCH * 8];
        let mut done = 0;
        while done < n {
            let count = (n - done).min(BATCH);
            let first = addr / FRAME + done;
            let buf = &mut raw[..count * 8];
            self.file
                .read_exact_at(buf, first as u64 * 8)
                .map_err(|e| ShareError::Os {
                    what: "read of /proc/self/pagemap",
                    source: e,
                })?;
            for (k, entry) in buf.chunks_exact(8).enumerate() {
                let entry = u64::from_ne_bytes(entry.try_into().unwrap_or_default());
                let vaddr = (first + k) * FRAME;
                if entry & PRESENT == 0 {
                    return Err(ShareError::Unsuitable(format!(
                        "page at {vaddr:#x} is not resident: fault it in (MAP_POPULATE or a \
                         write) and lock it before sharing it without an IOMMU"
                    )));
                }
                let pfn = entry & PFN_MASK;
                if pfn == 0 {
                    return Err(ShareError::Permission {
                        path: PAGEMAP.into(),
                        hint: HINT_ROOT,
                    });
                }
                f(done + k, pfn)?;
            }
            done += count;
        }
        Ok(())
    }
}

/// Checks `addr`/`len` are a non-empty whole number of `page_size` pages.
fn check_aligned(addr: usize, len: usize, page_size: usize) -> Result<(), ShareError> {
    if len == 0
        || !page_size.is_power_of_two()
        || page_size < FRAME
        || addr % page_size != 0
        || len % page_size != 0
    {
        return Err(ShareError::Unsuitable(format!(
            "region at {addr:#x} (+{len} B) is not a non-empty whole number of its \
             {page_size} B pages"
        )));
    }
    Ok(())
}

/// The error for a hugepage whose frame `i` (counted from `addr`) does not follow the last.
fn hugepage_split(addr: usize, i: usize, page_size: usize) -> ShareError {
    let page = addr + (i * FRAME) / page_size * page_size;
    ShareError::Unsuitable(format!(
        "the {page_size} B page at {page:#x} is not physically contiguous (frame {} of it \
         breaks the run); it is not a real hugepage: use hugetlb memory",
        (i * FRAME % page_size) / FRAME
    ))
}

/// The physical address of the byte at `addr` in this process (opens the pagemap each call;
/// keep a [`Pagemap`] or [`NoIommu`] for repeated use). Needs root.
///
/// ```no_run
/// let x = Box::new(7u64);
/// let pa = tidepool::share::noiommu::translate(&*x as *const u64 as *const u8)?;
/// # Ok::<(), tidepool::share::ShareError>(())
/// ```
pub fn translate(addr: *const u8) -> Result<u64, ShareError> {
    Pagemap::open()?.translate(addr as usize)
}

/// The physical address of each `page_size` page of `[addr, addr + len)`, each checked
/// physically contiguous inside (see [`Pagemap::physical_pages`]). Needs root.
pub fn physical_pages(
    addr: *const u8,
    len: usize,
    page_size: usize,
) -> Result<Vec<u64>, ShareError> {
    Pagemap::open()?.physical_pages(addr as usize, len, page_size)
}

/// One region shared through [`NoIommu`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Shared {
    vaddr: usize,
    len: usize,
    phys: u64,
}

/// The [`DeviceView`] without an IOMMU: device address = physical address.
///
/// `share` accepts only physically contiguous regions at or below the DMA mask (see the module
/// docs); nothing is mapped or pinned by it, so `unshare` only forgets the region. There is no
/// mapping limit.
///
/// ```no_run
/// use tidepool::memory::{Chunk, PageSize};
/// use tidepool::share::{noiommu::NoIommu, DeviceView};
/// let view = NoIommu::new(u64::MAX)?;
/// let chunk = Chunk::with_page_size(2 << 20, PageSize::Huge2M).unwrap();
/// let pa = view.share(&chunk.region())?; // one 2 MiB hugepage: always contiguous
/// # Ok::<(), tidepool::share::ShareError>(())
/// ```
#[derive(Debug)]
pub struct NoIommu {
    pagemap: Pagemap,
    dma_mask: u64,
    /// Live regions; its lock is held only for bookkeeping.
    live: Mutex<Vec<Shared>>,
}

impl NoIommu {
    /// A view for a device that can address physical memory up to `dma_mask` (inclusive).
    /// Fails with [`ShareError::Permission`] unless this process can read PFNs (root).
    pub fn new(dma_mask: u64) -> Result<NoIommu, ShareError> {
        Ok(NoIommu {
            pagemap: Pagemap::open()?,
            dma_mask,
            live: Mutex::new(Vec::new()),
        })
    }

    /// The highest physical address the device can reach.
    pub fn dma_mask(&self) -> u64 {
        self.dma_mask
    }

    /// The physical address of the byte at `addr`, checked against the DMA mask.
    pub fn translate(&self, addr: *const u8) -> Result<u64, ShareError> {
        let pa = self.pagemap.translate(addr as usize)?;
        self.check_mask(pa, 1)?;
        Ok(pa)
    }

    /// The physical address of each page of `region` (each page contiguous inside and at or
    /// below the DMA mask), for drivers that build PRP or scatter lists page by page.
    pub fn physical_pages(&self, region: &HostRegion<'_>) -> Result<Vec<u64>, ShareError> {
        let pages = self
            .pagemap
            .physical_pages(region.start(), region.len, region.page_size)?;
        for &pa in &pages {
            self.check_mask(pa, region.page_size as u64)?;
        }
        Ok(pages)
    }

    /// Checks `[pa, pa + len)` lies at or below the mask.
    fn check_mask(&self, pa: u64, len: u64) -> Result<(), ShareError> {
        let last = pa.saturating_add(len - 1);
        if last > self.dma_mask {
            return Err(ShareError::AddressSpace {
                len,
                mask: self.dma_mask,
                detail: format!(
                    "the memory is at physical {pa:#x}..={last:#x}, above what the device can \
                     reach, and without an IOMMU it cannot be remapped; use an IOMMU, or \
                     memory from low physical addresses"
                ),
            });
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Shared>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DeviceView for NoIommu {
    /// Translates every 4 KiB frame of the region, requires the whole region to be one
    /// physically contiguous run at or below the DMA mask, records it and returns its physical
    /// address. Reads `len / 4096` pagemap entries; takes the table lock briefly.
    fn share(&self, region: &HostRegion<'_>) -> Result<DeviceAddr, ShareError> {
        let (addr, len, page_size) = (region.start(), region.len, region.page_size);
        check_aligned(addr, len, page_size)?;
        let mut first = 0;
        self.pagemap.for_each_frame(addr, len / FRAME, |i, pfn| {
            if i == 0 {
                first = pfn;
                return Ok(());
            }
            if pfn == first + i as u64 {
                return Ok(());
            }
            if (i * FRAME) % page_size != 0 {
                return Err(hugepage_split(addr, i, page_size));
            }
            Err(ShareError::Unsuitable(format!(
                "the region at {addr:#x} (+{len} B) is not physically contiguous: its page at \
                 {:#x} is at physical {:#x}, not {:#x}; without an IOMMU a region must be one \
                 physical range, so use chunks of exactly one hugepage (e.g. 2 MiB chunks of \
                 2 MiB pages), or build per-page lists with physical_pages()",
                addr + i * FRAME,
                pfn * FRAME as u64,
                (first + i as u64) * FRAME as u64
            )))
        })?;
        let phys = first * FRAME as u64;
        self.check_mask(phys, len as u64)?;
        self.lock().push(Shared {
            vaddr: addr,
            len,
            phys,
        });
        Ok(DeviceAddr(phys))
    }

    /// Forgets a region shared at `addr`. Nothing to undo in hardware. Takes the table lock.
    fn unshare(&self, region: &HostRegion<'_>, addr: DeviceAddr) -> Result<(), ShareError> {
        let key = Shared {
            vaddr: region.start(),
            len: region.len,
            phys: addr.0,
        };
        let mut live = self.lock();
        match live.iter().position(|s| *s == key) {
            Some(i) => {
                live.swap_remove(i);
                Ok(())
            }
            None => Err(ShareError::NotShared {
                addr: region.start(),
                len: region.len,
                iova: addr.0,
            }),
        }
    }

    fn usage(&self) -> ShareUsage {
        let live = self.lock();
        ShareUsage {
            mappings: live.len() as u64,
            mapping_limit: None,
            bytes: live.iter().map(|s| s.len as u64).sum(),
        }
    }

    fn kind(&self) -> &'static str {
        "no-iommu"
    }

    /// Device addresses here are physical addresses: one space shared by every such view.
    fn domain(&self) -> super::DomainId {
        super::DomainId::PHYSICAL
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{hugepage_counts, Chunk, PageSize};

    fn view_or_skip() -> Option<NoIommu> {
        match NoIommu::new(u64::MAX) {
            Ok(v) => Some(v),
            Err(ShareError::Permission { .. }) if !nix::unistd::geteuid().is_root() => {
                eprintln!("skipping: not root, pagemap hides physical addresses");
                None
            }
            Err(e) => panic!("pagemap unusable as root: {e}"),
        }
    }

    #[test]
    fn hugepage_is_contiguous_aligned_and_shared_once() {
        let Some(view) = view_or_skip() else { return };
        let free = hugepage_counts(PageSize::Huge2M).map_or(0, |(_, free)| free);
        if free < 1 {
            eprintln!("skipping: no free 2 MiB hugepages (tools/test reserves them)");
            return;
        }
        let chunk = Chunk::with_page_size(2 << 20, PageSize::Huge2M).unwrap();
        let region = chunk.region();
        let pa = view.share(&region).unwrap();
        assert_eq!(
            pa.0 % (2 << 20),
            0,
            "a 2 MiB hugepage is 2 MiB aligned physically"
        );
        assert_eq!(view.translate(chunk.as_ptr()).unwrap(), pa.0);
        // Every byte offset maps linearly.
        let mid = chunk.as_ptr().wrapping_add((1 << 20) + 123);
        assert_eq!(view.translate(mid).unwrap(), pa.0 + (1 << 20) + 123);
        assert_eq!(view.physical_pages(&region).unwrap(), vec![pa.0]);
        assert_eq!(translate(chunk.as_ptr()).unwrap(), pa.0);
        assert_eq!(
            view.usage(),
            ShareUsage {
                mappings: 1,
                mapping_limit: None,
                bytes: 2 << 20
            }
        );
        // A mask below the page refuses it.
        let low = NoIommu::new(pa.0 + 4095).unwrap();
        assert!(matches!(
            low.share(&region),
            Err(ShareError::AddressSpace { .. })
        ));
        assert!(matches!(
            view.unshare(&region, pa.offset(4096)),
            Err(ShareError::NotShared { .. })
        ));
        view.unshare(&region, pa).unwrap();
        assert_eq!(view.usage().mappings, 0);
        drop(chunk);

        // Two hugepages: each is contiguous and aligned; together they are one range only if
        // the kernel happened to place them adjacently, and share must agree with that.
        if free < 2 {
            eprintln!("skipping the two-hugepage part: fewer than 2 free hugepages");
            return;
        }
        let chunk = Chunk::with_page_size(4 << 20, PageSize::Huge2M).unwrap();
        let region = chunk.region();
        let pages = view.physical_pages(&region).unwrap();
        assert_eq!(pages.len(), 2);
        assert!(pages.iter().all(|pa| pa % (2 << 20) == 0));
        match view.share(&region) {
            Ok(pa) => {
                assert_eq!(pages[1], pages[0] + (2 << 20));
                view.unshare(&region, pa).unwrap();
            }
            Err(ShareError::Unsuitable(msg)) => {
                assert_ne!(pages[1], pages[0] + (2 << 20), "{msg}");
                assert!(msg.contains("one hugepage"), "{msg}");
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    #[test]
    fn small_pages_are_judged_by_their_real_frames() {
        let Some(view) = view_or_skip() else { return };
        let chunk = Chunk::with_page_size(64 << 10, PageSize::Small4K).unwrap();
        let region = chunk.region();
        let pages = view.physical_pages(&region).unwrap();
        assert_eq!(pages.len(), 16);
        assert!(pages.iter().all(|pa| pa % 4096 == 0 && *pa != 0));
        for (i, &pa) in pages.iter().enumerate() {
            let p = chunk.as_ptr().wrapping_add(i * 4096 + 8);
            assert_eq!(view.translate(p).unwrap(), pa + 8);
        }
        let contiguous = pages.windows(2).all(|w| w[1] == w[0] + 4096);
        match view.share(&region) {
            Ok(pa) => {
                assert!(contiguous, "share accepted a non-contiguous region");
                assert_eq!(pa.0, pages[0]);
                view.unshare(&region, pa).unwrap();
            }
            Err(ShareError::Unsuitable(msg)) => {
                assert!(!contiguous, "share refused a contiguous region: {msg}");
                assert!(msg.contains("not physically contiguous"), "{msg}");
                assert!(msg.contains("one hugepage"), "{msg}");
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
        // A single 4 KiB page is always one physical range.
        let one = HostRegion {
            len: 4096,
            ..region
        };
        let pa = view.share(&one).unwrap();
        assert_eq!(pa.0, pages[0]);
        view.unshare(&one, pa).unwrap();
    }

    #[test]
    fn unaligned_and_unresident_regions_are_refused() {
        let Some(view) = view_or_skip() else { return };
        let chunk = Chunk::with_page_size(8192, PageSize::Small4K).unwrap();
        let mut r = chunk.region();
        r.len = 100;
        assert!(matches!(view.share(&r), Err(ShareError::Unsuitable(_))));
        // Reserved but never touched: not resident.
        let untouched = memmap2::MmapMut::map_anon(8192).unwrap();
        let region = HostRegion {
            addr: std::ptr::NonNull::new(untouched.as_ptr().cast_mut()).unwrap(),
            len: 8192,
            page_size: 4096,
            fd: None,
        };
        let r = view.share(&region);
        match r {
            Err(ShareError::Unsuitable(msg)) => assert!(msg.contains("not resident"), "{msg}"),
            other => panic!("expected a not-resident error, got {other:?}"),
        }
    }
}
