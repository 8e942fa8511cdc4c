//! VFIO type1: IOMMU mappings made with `VFIO_IOMMU_MAP_DMA` in a VFIO container.
//!
//! ## Objects and their lifetimes
//! - [`VfioContainer`]: one `/dev/vfio/vfio` container = one IOMMU domain = one IOVA space.
//!   Several devices (from one or more IOMMU groups) can be opened into the same container with
//!   [`crate::device::vfio::VfioDevice::open_in`]; they then see the same mappings. The PCI
//!   side (config space, BARs, MSI-X, reset) is the device layer's, [`crate::device::vfio`].
//! - [`VfioType1`]: the [`DeviceView`] of a container. There is exactly **one view per
//!   container** ([`VfioContainer::view`] returns the same one every time) because the view owns
//!   the container's IOVA allocator: two allocators over one IOVA space would hand out the same
//!   addresses twice. When devices with different DMA masks share a container, create the view
//!   with the narrowest mask (asking later for a narrower mask than the view has is an error).
//!
//! The shortcut [`crate::device::vfio::VfioDevice::open`] makes a container, opens one device in it and returns the
//! device together with the container's view.
//!
//! ## How `share` works (and why it is correct)
//! 1. The region is checked: non-empty, page-aligned start and length for its page size.
//! 2. Under the view's lock, an IOVA extent of exactly `region.len` bytes, aligned to the
//!    region's page size, is taken from the allocator, which only hands out addresses inside the
//!    IOMMU's valid ranges (the `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE` capability of
//!    `VFIO_IOMMU_GET_INFO`, read once when the view is made) and at or below the DMA mask.
//!    Aligning the IOVA to the page size lets the IOMMU use large pages for hugepage chunks.
//! 3. The lock is dropped and the whole region is mapped with **one** `VFIO_IOMMU_MAP_DMA`
//!    (read + write), so a chunk of many hugepages costs one of the container's `dma_avail`
//!    mappings (65,535 by default, the `dma_entry_limit` module parameter).
//! 4. On success the mapping is recorded; on failure the IOVA is given back, and `ENOSPC`
//!    becomes [`ShareError::MappingLimit`].
//!
//! `unshare` removes the record (checking that the region and address match what was shared),
//! unmaps with `VFIO_IOMMU_UNMAP_DMA`, and only after the kernel confirms the unmap of exactly
//! that many bytes frees the IOVA extent. If the unmap fails the record is put back and the IOVA
//! stays reserved, so an address the device may still reach is never handed out again.
//!
//! ## Locking
//! [`VfioType1`] holds one `Mutex` around the allocator and the table of live mappings. The
//! ioctls themselves run outside the lock: the kernel serialises changes to one container, and
//! our bookkeeping guarantees no two calls ever work on the same IOVA extent.
//!
//! ## Memory safety
//! `VFIO_IOMMU_MAP_DMA` gives the device read/write access to the mapped memory until it is
//! unmapped. [`DeviceView::share`] is a safe trait method, so the rule is carried by the
//! [`HostRegion`] contract: a region passed to `share` must stay mapped in this process until it
//! is unshared, and must only be accessed through raw pointers while shared (the pool's chunks
//! and [`super::direct`]'s unsafe constructors guarantee this).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex};

use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer as RawContainer, VfioError};

use super::mappings::{one_view, Mappings};
use super::{error_chain, DeviceView, ShareError, ShareUsage};
pub use crate::iova::IovaRange;
use crate::memory::HostRegion;
use crate::DeviceAddr;

/// `VFIO_IOMMU_GET_INFO` = `_IO(VFIO_TYPE, VFIO_BASE + 12)` (linux/vfio.h); VFIO ioctls encode
/// no size or direction.
const VFIO_IOMMU_GET_INFO: u64 = ((VFIO_TYPE as u64) << 8) | (VFIO_BASE as u64 + 12);

/// What to do when VFIO is missing or not accessible.
pub(crate) const HINT_NO_VFIO: &str = "load the VFIO driver (`modprobe vfio-pci`), bind the \
     device to vfio-pci, boot with the IOMMU on (intel_iommu=on / amd_iommu=on) and run as root \
     or give this user access to /dev/vfio/*";

/// Size of `struct vfio_iommu_type1_info` (argsz, flags, iova_pgsizes, cap_offset, pad).
const IOMMU_INFO_LEN: usize = 24;

/// What `VFIO_IOMMU_GET_INFO` says about a container's IOMMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuInfo {
    /// Bitmap of the IOMMU page sizes (bit n set: 2^n-byte pages supported).
    pub iova_pgsizes: u64,
    /// Valid IOVA ranges, from the `IOVA_RANGE` capability. Kernels older than 5.4 do not report
    /// it; then this is the whole 64-bit space and only the DMA mask limits addresses.
    pub iova_ranges: Vec<IovaRange>,
    /// Mappings the container can still make (`DMA_AVAIL` capability, kernel ≥ 5.10).
    pub dma_avail: Option<u32>,
}

/// Parses the buffer `VFIO_IOMMU_GET_INFO` filled: the fixed header and its capability chain.
///
/// Pure and bounds-checked: every capability must lie inside `buf`, and the chain must move
/// strictly forward (so a corrupt chain cannot loop).
pub fn parse_iommu_info(buf: &[u8]) -> Result<IommuInfo, ShareError> {
    let corrupt = |why: &str| ShareError::Vfio {
        what: "VFIO_IOMMU_GET_INFO",
        detail: format!("malformed reply ({why}); this is a kernel/ABI mismatch, please report it"),
    };
    let u16_at = |off: usize| -> Option<u16> {
        Some(u16::from_ne_bytes(buf.get(off..off + 2)?.try_into().ok()?))
    };
    let u32_at = |off: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(buf.get(off..off + 4)?.try_into().ok()?))
    };
    let u64_at = |off: usize| -> Option<u64> {
        Some(u64::from_ne_bytes(buf.get(off..off + 8)?.try_into().ok()?))
    };
    let flags = u32_at(4).ok_or_else(|| corrupt("short header"))?;
    let iova_pgsizes = u64_at(8).ok_or_else(|| corrupt("short header"))?;
    let mut info = IommuInfo {
        iova_pgsizes,
        iova_ranges: Vec::new(),
        dma_avail: None,
    };
    let mut saw_ranges = false;
    let mut off = if flags & VFIO_IOMMU_INFO_CAPS != 0 {
        u32_at(16).ok_or_else(|| corrupt("short header"))? as usize
    } else {
        0
    };
    while off != 0 {
        if off < IOMMU_INFO_LEN {
            return Err(corrupt("capability inside the header"));
        }
        let id = u16_at(off).ok_or_else(|| corrupt("capability header out of bounds"))?;
        let next = u32_at(off + 4).ok_or_else(|| corrupt("capability header out of bounds"))?;
        // Where this capability's body ends: the next one may not start inside it.
        let mut end = off + 8;
        match u32::from(id) {
            VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                // Header, nr_iovas and a reserved word: 16 bytes before the first range.
                if buf.len() < off + 16 {
                    return Err(corrupt("IOVA range cap truncated"));
                }
                let n = u32_at(off + 8).ok_or_else(|| corrupt("IOVA range cap truncated"))?;
                for i in 0..n as usize {
                    let at = off + 16 + i * 16;
                    let start = u64_at(at).ok_or_else(|| corrupt("IOVA range out of bounds"))?;
                    let end = u64_at(at + 8).ok_or_else(|| corrupt("IOVA range out of bounds"))?;
                    if end < start {
                        return Err(corrupt("IOVA range ends before it starts"));
                    }
                    info.iova_ranges.push(IovaRange { start, end });
                }
                end = off + 16 + 16 * n as usize;
                saw_ranges = true;
            }
            VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL => {
                info.dma_avail =
                    Some(u32_at(off + 8).ok_or_else(|| corrupt("DMA avail cap truncated"))?);
                end = off + 12;
            }
            _ => {} // migration and future capabilities: not ours
        }
        if next != 0 && (next as usize) <= off {
            return Err(corrupt("capability chain goes backwards"));
        }
        if next != 0 && (next as usize) < end {
            return Err(corrupt("capabilities overlap"));
        }
        off = next as usize;
    }
    if !saw_ranges {
        info.iova_ranges.push(IovaRange {
            start: 0,
            end: u64::MAX,
        });
    }
    Ok(info)
}

/// Issues `VFIO_IOMMU_GET_INFO` on a container whose IOMMU type is set, growing the buffer
/// until the capability chain fits, and parses it.
fn query_iommu_info(container: BorrowedFd<'_>) -> Result<IommuInfo, ShareError> {
    let mut buf = vec![0u8; IOMMU_INFO_LEN];
    // The kernel answers a short buffer with the size it needs; it can only grow once, but a
    // few rounds guard against a racing change without looping forever.
    for _ in 0..4 {
        let argsz = buf.len() as u32;
        buf.fill(0);
        buf[..4].copy_from_slice(&argsz.to_ne_bytes());
        ioctl_iommu_get_info(container, &mut buf).map_err(|e| ShareError::Vfio {
            what: "VFIO_IOMMU_GET_INFO",
            detail: format!("{e}; open a device in the container before asking for its view"),
        })?;
        let needed = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if needed <= buf.len() {
            return parse_iommu_info(&buf);
        }
        buf = vec![0u8; needed.min(1 << 20)];
    }
    Err(ShareError::Vfio {
        what: "VFIO_IOMMU_GET_INFO",
        detail: "the reply kept growing; retry".into(),
    })
}

/// A `VFIO_IOMMU_GET_INFO` buffer of just the fixed header, `argsz` filled in.
fn iommu_info_header() -> [u8; IOMMU_INFO_LEN] {
    let mut buf = [0u8; IOMMU_INFO_LEN];
    buf[..4].copy_from_slice(&(IOMMU_INFO_LEN as u32).to_ne_bytes());
    buf
}

/// Whether a `VFIO_IOMMU_GET_INFO` probe says the container has no IOMMU any more (its last
/// group was closed, so the kernel dropped the domain and every mapping in it). Only `EINVAL`
/// means that: the container answers commands it has no IOMMU driver for with `EINVAL`. Any
/// other failure (`EFAULT`, `ENOMEM`, `EBADF`, ...) says nothing about the domain, so a failed
/// unmap must then be treated as a mapping the device may still reach.
fn domain_gone(probe: &io::Result<()>) -> bool {
    matches!(probe, Err(e) if e.raw_os_error() == Some(libc::EINVAL))
}

/// The raw `VFIO_IOMMU_GET_INFO` ioctl. `buf` must start with its own length as `argsz`.
fn ioctl_iommu_get_info(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
    if buf.len() < IOMMU_INFO_LEN
        || u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize != buf.len()
    {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: the kernel reads `argsz` from the start of `buf` and writes at most `argsz` bytes,
    // which we checked equals `buf.len()`; `buf` is valid, writable and not aliased for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), VFIO_IOMMU_GET_INFO as _, buf.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Turns a vfio-ioctls error into ours.
pub(crate) fn vfio_error(what: &'static str, e: VfioError) -> ShareError {
    ShareError::Vfio {
        what,
        detail: error_chain(&e),
    }
}

/// One VFIO container (one IOMMU domain, one IOVA space) using the type1v2 IOMMU driver.
///
/// Open devices into it with [`crate::device::vfio::VfioDevice::open_in`], then get its one
/// [`VfioType1`] view with [`VfioContainer::view`]. The container stays open while any device
/// or the view holds it; when the last device is closed the kernel drops the IOMMU domain and
/// every mapping in it, so unshare (drop the pool) before closing the last device.
///
/// ```no_run
/// use tidepool::device::vfio::VfioDevice;
/// use tidepool::share::vfio::VfioContainer;
/// let container = VfioContainer::new()?;
/// let nvme0 = VfioDevice::open_in(&container, "0000:00:04.0")?;
/// let nvme1 = VfioDevice::open_in(&container, "0000:00:05.0")?; // same IOVA space
/// let view = container.view(u64::MAX)?; // one view for both
/// # Ok::<(), tidepool::device::DeviceError>(())
/// ```
pub struct VfioContainer {
    raw: Arc<RawContainer>,
    /// The one view; created on first [`VfioContainer::view`]. Lock order: this lock, then the
    /// view's own state lock (never the other way round).
    view: Mutex<Option<Arc<VfioType1>>>,
}

impl std::fmt::Debug for VfioContainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioContainer")
            .field("fd", &self.raw.as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl VfioContainer {
    /// Opens `/dev/vfio/vfio` and checks the API version and type1v2 support.
    ///
    /// Errors: [`ShareError::Permission`] with a hint when `/dev/vfio/vfio` is missing or not
    /// accessible (VFIO not loaded, not root).
    pub fn new() -> Result<Arc<VfioContainer>, ShareError> {
        let raw = RawContainer::new(None).map_err(|e| match e {
            VfioError::OpenContainer(_) => ShareError::Permission {
                path: "/dev/vfio/vfio".into(),
                hint: HINT_NO_VFIO,
            },
            e => vfio_error("open container", e),
        })?;
        Ok(Arc::new(VfioContainer {
            raw: Arc::new(raw),
            view: Mutex::new(None),
        }))
    }

    /// What the IOMMU says now (valid IOVA ranges, mappings still available). Needs at least
    /// one device opened in the container. Blocking ioctl; cheap.
    pub fn iommu_info(&self) -> Result<IommuInfo, ShareError> {
        query_iommu_info(self.container_fd())
    }

    /// The container's one [`VfioType1`] view, made on the first call with `dma_mask` (the
    /// highest address the devices can generate, e.g. `u32::MAX as u64` for 32-bit DMA).
    ///
    /// Later calls return the same view if its mask is no wider than `dma_mask`; asking for a
    /// narrower mask than the view was made with is an error, because addresses already handed
    /// out might be unreachable: make the view with the narrowest mask of all devices first.
    /// Needs at least one device opened. Takes the container's view lock.
    pub fn view(&self, dma_mask: u64) -> Result<Arc<VfioType1>, ShareError> {
        one_view(
            &self.view,
            dma_mask,
            "container",
            |v| v.dma_mask,
            || {
                let info = self.iommu_info()?;
                VfioType1::new(Arc::clone(&self.raw), info, dma_mask)
            },
        )
    }

    /// The vfio-ioctls container, for the device layer to open devices into.
    pub(crate) fn raw_container(&self) -> &Arc<RawContainer> {
        &self.raw
    }

    fn container_fd(&self) -> BorrowedFd<'_> {
        borrow_fd(self.raw.as_raw_fd(), self)
    }
}

/// Borrows a raw fd for as long as `_owner` is borrowed.
pub(crate) fn borrow_fd<T: ?Sized>(fd: RawFd, _owner: &T) -> BorrowedFd<'_> {
    // SAFETY: every caller passes the fd of a file owned by `_owner` (a container or device
    // that closes it only on drop), so the fd stays open for the borrow's lifetime.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// The [`DeviceView`] of a VFIO type1 container: device address = an IOVA we allocate.
///
/// Get it from [`VfioContainer::view`] or [`crate::device::vfio::VfioDevice::open`]. See the module docs for the
/// algorithm and locking.
pub struct VfioType1 {
    container: Arc<RawContainer>,
    dma_mask: u64,
    ranges: Vec<IovaRange>,
    /// `dma_avail` when the view was made (no mapping existed then): the container's limit.
    limit: Option<u64>,
    mappings: Mappings,
}

impl std::fmt::Debug for VfioType1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioType1")
            .field("dma_mask", &format_args!("{:#x}", self.dma_mask))
            .field("ranges", &self.ranges)
            .field("usage", &self.usage())
            .finish()
    }
}

impl VfioType1 {
    fn new(
        container: Arc<RawContainer>,
        info: IommuInfo,
        dma_mask: u64,
    ) -> Result<VfioType1, ShareError> {
        let mappings = Mappings::new(&info.iova_ranges, dma_mask)?;
        Ok(VfioType1 {
            container,
            dma_mask,
            ranges: info.iova_ranges,
            limit: info.dma_avail.map(u64::from),
            mappings,
        })
    }

    /// The highest device address this view hands out.
    pub fn dma_mask(&self) -> u64 {
        self.dma_mask
    }

    /// The IOMMU's valid IOVA ranges, as read when the view was made.
    pub fn iova_ranges(&self) -> &[IovaRange] {
        &self.ranges
    }

    /// Asks the kernel again (`VFIO_IOMMU_GET_INFO`): the container's current state, e.g. its
    /// remaining `dma_avail`. Blocking ioctl; for diagnostics and tests.
    pub fn iommu_info(&self) -> Result<IommuInfo, ShareError> {
        query_iommu_info(borrow_fd(self.container.as_raw_fd(), self))
    }
}

/// Checks a region can be mapped as one IOMMU mapping.
pub(super) fn check_region(region: &HostRegion<'_>) -> Result<(), ShareError> {
    let page = region.page_size;
    if region.len == 0
        || !page.is_power_of_two()
        || page < 4096
        || region.start() % page != 0
        || region.len % page != 0
    {
        return Err(ShareError::Unsuitable(format!(
            "region at {:#x} (+{} B) is not a non-empty whole number of its {} B pages",
            region.start(),
            region.len,
            page
        )));
    }
    Ok(())
}

impl DeviceView for VfioType1 {
    /// Allocates an IOVA extent (page-size aligned, inside the valid ranges, below the mask) and
    /// maps the whole region with one `VFIO_IOMMU_MAP_DMA`. Takes the state lock twice, briefly;
    /// the ioctl runs unlocked. Blocks (page pinning).
    fn share(&self, region: &HostRegion<'_>) -> Result<DeviceAddr, ShareError> {
        check_region(region)?;
        let len = region.len as u64;
        let iova = self.mappings.reserve(len, region.page_size as u64)?;
        // SAFETY: the HostRegion contract (module docs): the region stays mapped in this process
        // until it is unshared, and while shared it is touched only through raw pointers, never
        // Rust references — the requirements of vfio_dma_map.
        let mapped = unsafe {
            self.container
                .vfio_dma_map(iova, region.len, region.addr.as_ptr())
        };
        match mapped {
            Ok(()) => {
                self.mappings.mapped(iova, region);
                Ok(DeviceAddr(iova))
            }
            Err(e) => {
                let used = self.mappings.map_failed(iova, len);
                match e {
                    VfioError::IommuDmaMap(errno) if errno.errno() == libc::ENOSPC => {
                        Err(ShareError::MappingLimit {
                            used,
                            limit: self.limit.unwrap_or(used),
                        })
                    }
                    VfioError::IommuDmaMap(errno) if errno.errno() == libc::ENOMEM => {
                        Err(ShareError::Vfio {
                            what: "VFIO_IOMMU_MAP_DMA",
                            detail: format!(
                                "{errno}: pinning failed; raise RLIMIT_MEMLOCK \
                                 (`ulimit -l unlimited`) or run as root"
                            ),
                        })
                    }
                    e => Err(vfio_error("VFIO_IOMMU_MAP_DMA", e)),
                }
            }
        }
    }

    /// Unmaps a region shared at `addr` and frees its IOVA once the kernel confirmed the unmap.
    /// Takes the state lock twice, briefly; the ioctl runs unlocked.
    fn unshare(&self, region: &HostRegion<'_>, addr: DeviceAddr) -> Result<(), ShareError> {
        let mapping = self.mappings.take(region, addr)?;
        let unmapped = self.container.vfio_dma_unmap(addr.0, mapping.len);
        // A container whose last device (group) was closed has lost its IOMMU domain, and the
        // kernel dropped every mapping with it: the unmap then fails (EINVAL), but nothing is
        // device-visible any more. That happens when a driver closes its device before the
        // pool that lives on its container is gone (a pool outlives its driver through
        // buffers still held, or frees on its grower thread). The container answers
        // VFIO_IOMMU_GET_INFO only while an IOMMU is set, which tells the two cases apart.
        let unmapped = unmapped.or_else(|e| {
            let probe = ioctl_iommu_get_info(
                borrow_fd(self.container.as_raw_fd(), self),
                &mut iommu_info_header(),
            );
            if domain_gone(&probe) {
                Ok(())
            } else {
                Err(e)
            }
        });
        match unmapped {
            Ok(()) => {
                self.mappings.unmapped(addr.0, mapping);
                Ok(())
            }
            Err(e) => {
                // The device may still reach it: keep the IOVA reserved and the record.
                self.mappings.unmap_failed(addr.0, mapping);
                Err(vfio_error("VFIO_IOMMU_UNMAP_DMA", e))
            }
        }
    }

    fn usage(&self) -> ShareUsage {
        self.mappings.usage(self.limit)
    }

    fn kind(&self) -> &'static str {
        "vfio-type1"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr::NonNull;

    /// Builds a GET_INFO reply with the given capabilities (each: id, body bytes).
    fn reply(pgsizes: u64, caps: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut buf = vec![0u8; IOMMU_INFO_LEN];
        let flags = if caps.is_empty() {
            1
        } else {
            1 | VFIO_IOMMU_INFO_CAPS
        };
        buf[4..8].copy_from_slice(&flags.to_ne_bytes());
        buf[8..16].copy_from_slice(&pgsizes.to_ne_bytes());
        let mut offsets = Vec::new();
        for (id, body) in caps {
            let off = buf.len();
            offsets.push(off);
            buf.extend_from_slice(&id.to_ne_bytes());
            buf.extend_from_slice(&1u16.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes()); // next, patched below
            buf.extend_from_slice(body);
        }
        for (i, &off) in offsets.iter().enumerate() {
            let next = offsets.get(i + 1).copied().unwrap_or(0) as u32;
            buf[off + 4..off + 8].copy_from_slice(&next.to_ne_bytes());
        }
        if let Some(&first) = offsets.first() {
            buf[16..20].copy_from_slice(&(first as u32).to_ne_bytes());
        }
        let argsz = buf.len() as u32;
        buf[..4].copy_from_slice(&argsz.to_ne_bytes());
        buf
    }

    fn ranges_body(ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(ranges.len() as u32).to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        for &(s, e) in ranges {
            b.extend_from_slice(&s.to_ne_bytes());
            b.extend_from_slice(&e.to_ne_bytes());
        }
        b
    }

    #[test]
    fn parses_intel_iommu_reply() {
        // What QEMU's intel-iommu reports (vm.md): two ranges around the MSI window, 65535.
        let buf = reply(
            0x4020_1000,
            &[
                (
                    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16,
                    ranges_body(&[(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)]),
                ),
                (2, vec![0u8; 24]), // migration cap: skipped
                (
                    VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL as u16,
                    65535u32.to_ne_bytes().to_vec(),
                ),
            ],
        );
        let info = parse_iommu_info(&buf).unwrap();
        assert_eq!(info.iova_pgsizes, 0x4020_1000);
        assert_eq!(
            info.iova_ranges,
            vec![
                IovaRange {
                    start: 0,
                    end: 0xfedf_ffff
                },
                IovaRange {
                    start: 0xfef0_0000,
                    end: 0x7f_ffff_ffff
                }
            ]
        );
        assert_eq!(info.dma_avail, Some(65535));
    }

    #[test]
    fn no_caps_means_whole_space_and_unknown_limit() {
        let info = parse_iommu_info(&reply(0x1000, &[])).unwrap();
        assert_eq!(
            info.iova_ranges,
            vec![IovaRange {
                start: 0,
                end: u64::MAX
            }]
        );
        assert_eq!(info.dma_avail, None);
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        // Range count larger than the buffer.
        let mut buf = reply(
            0x1000,
            &[(
                VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16,
                ranges_body(&[(0, 0xffff)]),
            )],
        );
        buf[IOMMU_INFO_LEN + 8..IOMMU_INFO_LEN + 12].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(matches!(
            parse_iommu_info(&buf),
            Err(ShareError::Vfio { .. })
        ));
        // A chain pointing at itself.
        let mut buf = reply(0x1000, &[(3, 7u32.to_ne_bytes().to_vec())]);
        let me = (IOMMU_INFO_LEN as u32).to_ne_bytes();
        buf[IOMMU_INFO_LEN + 4..IOMMU_INFO_LEN + 8].copy_from_slice(&me);
        assert!(parse_iommu_info(&buf).is_err());
        // Capability offset pointing into the header, or past the end.
        let mut buf = reply(0x1000, &[(3, 7u32.to_ne_bytes().to_vec())]);
        buf[16..20].copy_from_slice(&4u32.to_ne_bytes());
        assert!(parse_iommu_info(&buf).is_err());
        buf[16..20].copy_from_slice(&4096u32.to_ne_bytes());
        assert!(parse_iommu_info(&buf).is_err());
        // Truncated header.
        assert!(parse_iommu_info(&[0u8; 10]).is_err());
        // An IOVA range cap with no ranges whose fixed part (16 B) is cut short at 12 B.
        let buf = reply(
            0x1000,
            &[(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16, vec![0u8; 4])],
        );
        assert_eq!(buf.len(), IOMMU_INFO_LEN + 12);
        assert!(
            parse_iommu_info(&buf).is_err(),
            "a 12-byte IOVA range cap was accepted"
        );
        // A second capability that starts inside the first one's ranges.
        let mut buf = reply(
            0x1000,
            &[
                (
                    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16,
                    ranges_body(&[(0, 0xffff), (0x10000, 0x1ffff)]),
                ),
                (
                    VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL as u16,
                    7u32.to_ne_bytes().to_vec(),
                ),
            ],
        );
        let inside = (IOMMU_INFO_LEN as u32 + 24).to_ne_bytes();
        buf[IOMMU_INFO_LEN + 4..IOMMU_INFO_LEN + 8].copy_from_slice(&inside);
        assert!(
            parse_iommu_info(&buf).is_err(),
            "overlapping capabilities were accepted"
        );
    }

    #[test]
    fn only_einval_from_get_info_means_the_domain_is_gone() {
        let errno = |n| Err(io::Error::from_raw_os_error(n));
        assert!(domain_gone(&errno(libc::EINVAL)));
        for other in [
            libc::EFAULT,
            libc::ENOMEM,
            libc::EBADF,
            libc::EPERM,
            libc::ENOTTY,
        ] {
            assert!(
                !domain_gone(&errno(other)),
                "errno {other} taken as domain gone"
            );
        }
        assert!(
            !domain_gone(&Ok(())),
            "an answering container still has its domain"
        );
        let header = iommu_info_header();
        assert_eq!(u32::from_ne_bytes(header[..4].try_into().unwrap()), 24);
    }

    #[test]
    fn region_checks() {
        let p = NonNull::new(0x20_0000 as *mut u8).unwrap();
        let r = |addr: NonNull<u8>, len, page_size| HostRegion {
            addr,
            len,
            page_size,
            fd: None,
        };
        assert!(check_region(&r(p, 2 << 20, 2 << 20)).is_ok());
        assert!(check_region(&r(p, 4096, 4096)).is_ok());
        assert!(check_region(&r(p, 0, 4096)).is_err());
        assert!(check_region(&r(p, 4096, 2 << 20)).is_err());
        assert!(check_region(&r(p, 4096, 3000)).is_err());
        let odd = NonNull::new(0x20_1000 as *mut u8).unwrap();
        assert!(matches!(
            check_region(&r(odd, 2 << 20, 2 << 20)),
            Err(ShareError::Unsuitable(_))
        ));
    }
}
