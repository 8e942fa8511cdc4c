//! iommufd: IOMMU mappings in an I/O address space (IOAS) of `/dev/iommu` (Linux ≥ 6.6 with
//! `CONFIG_IOMMUFD`; the devices are opened through their VFIO cdevs, [`crate::device::iommufd`]).
//!
//! ## Objects and their lifetimes
//! - [`Ioas`]: one `/dev/iommu` file and one IOAS in it = one IOVA space. Devices attached to it
//!   ([`crate::device::iommufd::CdevDevice::open_in`]) see the same mappings. Unlike a type1
//!   container, the IOAS and its mappings belong to the `/dev/iommu` file, not to the devices:
//!   closing the last device does not drop them, so unsharing after the devices are gone works.
//! - [`IommufdView`]: the [`DeviceView`] of an IOAS. Exactly **one view per IOAS**
//!   ([`Ioas::view`] returns the same one), because the view owns the IOAS's IOVA allocator
//!   (the reason is the type1 one: two allocators over one space would hand out an address twice).
//!   Its [`DeviceView::domain`] is the view object, so a buffer of another IOAS (or a type1
//!   container) is refused by drivers as foreign.
//!
//! ## How `share` works
//! As for type1 ([`super::vfio`]): an IOVA extent of exactly the region's length, aligned to its
//! page size, is taken from the allocator, which hands out only addresses inside the IOAS's
//! **allowed ranges** (`IOMMU_IOAS_IOVA_RANGES`, read when the view is made, after the devices
//! are attached: each attached device narrows them, e.g. by the MSI window) and at or below the
//! DMA mask; then the whole region is mapped with one `IOMMU_IOAS_MAP` at that fixed IOVA
//! (readable and writeable). `unshare` unmaps with `IOMMU_IOAS_UNMAP` and frees the extent only
//! when the kernel reports that exactly that many bytes were unmapped; otherwise the record and
//! the IOVA stay, so an address the device may still reach is never handed out again.
//!
//! iommufd has no per-IOAS mapping count limit like type1's `dma_avail`: [`ShareUsage`] reports
//! no limit. Pinned pages are charged to the user's `RLIMIT_MEMLOCK` (root is exempt).
//!
//! ## Crates
//! `iommufd-ioctls` (rust-vmm / Cloud Hypervisor) opens `/dev/iommu`, allocates and destroys the
//! IOAS, and issues MAP, UNMAP and GET_HW_INFO; `iommufd-bindings` gives the uAPI structs. The
//! crate has no wrapper for `IOMMU_IOAS_IOVA_RANGES` (it is a VMM crate: the guest chooses IOVAs
//! there), so that one ioctl is issued here with the bindings' struct, and its reply is checked
//! by [`IoasRanges::from_reply`].
//!
//! ## Memory safety
//! The [`HostRegion`] contract of [`super::vfio`] holds here too: a shared region stays mapped
//! in this process until it is unshared and is touched only through raw pointers meanwhile.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use iommufd_bindings::iommufd::{
    iommu_hw_info, iommu_hw_info_type_IOMMU_HW_INFO_TYPE_AMD,
    iommu_hw_info_type_IOMMU_HW_INFO_TYPE_ARM_SMMUV3,
    iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD, iommu_hw_info_type_IOMMU_HW_INFO_TYPE_NONE,
    iommu_hw_info_vtd, iommu_ioas_iova_ranges, iommu_ioas_map, iommu_ioas_unmap, iommu_iova_range,
    iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE, IOMMUFD_CMD_IOAS_IOVA_RANGES, IOMMUFD_TYPE,
};
use iommufd_ioctls::{IommuFd, IommufdError, IommufdIoas};

use super::mappings::{one_view, Mappings};
use super::vfio::check_region;
use super::{error_chain, DeviceView, ShareError, ShareUsage};
pub use crate::iova::IovaRange;
use crate::memory::HostRegion;
use crate::DeviceAddr;

/// `IOMMU_IOAS_IOVA_RANGES` = `_IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES)`
/// (linux/iommufd.h); iommufd ioctls encode no size or direction.
const IOMMU_IOAS_IOVA_RANGES: u64 =
    ((IOMMUFD_TYPE as u64) << 8) | IOMMUFD_CMD_IOAS_IOVA_RANGES as u64;

/// What to do when `/dev/iommu` is missing or not accessible.
pub(crate) const HINT_NO_IOMMUFD: &str = "this kernel has no iommufd (CONFIG_IOMMUFD, Linux \
     ≥ 6.6) or /dev/iommu is not accessible: run as root, or use the VFIO type1 backend \
     (TIDEPOOL_VFIO_BACKEND=type1)";

/// Turns an iommufd-ioctls error into ours: the operation and the kernel's errno text.
pub(crate) fn iommufd_error(what: &'static str, e: IommufdError) -> ShareError {
    ShareError::Backend {
        what,
        detail: error_chain(&e),
    }
}

/// The errno inside an iommufd-ioctls error, if it carries one.
fn errno_of(e: &IommufdError) -> Option<i32> {
    match e {
        IommufdError::OpenIommufd(io) => io.raw_os_error(),
        IommufdError::IommuIoasMap(s)
        | IommufdError::IommuIoasUnmap(s)
        | IommufdError::IommuIoasAlloc(s)
        | IommufdError::IommuGetHwInfo(s)
        | IommufdError::IommuDestroy(s) => Some(s.errno()),
        _ => None,
    }
}

/// The IOVA layout of an IOAS, from `IOMMU_IOAS_IOVA_RANGES`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoasRanges {
    /// Where mappings may go (inclusive ends), ascending and disjoint.
    pub allowed: Vec<IovaRange>,
    /// The minimum IOVA alignment of a mapping's start and end (`out_iova_alignment`).
    pub alignment: u64,
}

impl IoasRanges {
    /// Checks the kernel's reply: `total` ranges reported, `ranges` the ones filled in, and the
    /// alignment. Pure, so a malformed reply is an error here, never a panic or a bad mapping:
    /// every range must end at or after its start, the ranges must ascend without overlapping,
    /// all of them must have been filled in, and the alignment must be a power of two.
    pub fn from_reply(
        total: u32,
        ranges: &[iommu_iova_range],
        alignment: u64,
    ) -> Result<IoasRanges, ShareError> {
        let corrupt = |why: String| ShareError::Backend {
            what: "IOMMU_IOAS_IOVA_RANGES",
            detail: format!(
                "malformed reply ({why}); this is a kernel/ABI mismatch, please report it"
            ),
        };
        if total as usize != ranges.len() {
            return Err(corrupt(format!(
                "{total} ranges reported, {} filled in",
                ranges.len()
            )));
        }
        if !alignment.is_power_of_two() {
            return Err(corrupt(format!(
                "IOVA alignment {alignment} is not a power of two"
            )));
        }
        let mut allowed = Vec::with_capacity(ranges.len());
        for r in ranges {
            if r.last < r.start {
                return Err(corrupt(format!(
                    "range {:#x}..={:#x} ends before it starts",
                    r.start, r.last
                )));
            }
            if let Some(prev) = allowed.last().copied() {
                let prev: IovaRange = prev;
                if r.start <= prev.end {
                    return Err(corrupt(format!(
                        "range {:#x}..={:#x} overlaps or precedes {:#x}..={:#x}",
                        r.start, r.last, prev.start, prev.end
                    )));
                }
            }
            allowed.push(IovaRange {
                start: r.start,
                end: r.last,
            });
        }
        Ok(IoasRanges { allowed, alignment })
    }

    /// The reserved ranges: the gaps of the 64-bit space between the allowed ones (the MSI
    /// window, addresses beyond the IOMMU's width, the platform's reserved regions).
    pub fn reserved(&self) -> Vec<IovaRange> {
        let mut out = Vec::new();
        let mut next: Option<u64> = Some(0); // first address not yet covered; None past 2^64-1
        for r in &self.allowed {
            if let Some(n) = next {
                if r.start > n {
                    out.push(IovaRange {
                        start: n,
                        end: r.start - 1,
                    });
                }
            }
            next = r.end.checked_add(1);
        }
        if let Some(n) = next {
            out.push(IovaRange {
                start: n,
                end: u64::MAX,
            });
        }
        out
    }
}

/// What `IOMMU_GET_HW_INFO` says about the IOMMU behind one bound device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct IommuHwInfo {
    /// The IOMMU driver's kind: "intel-vt-d", "arm-smmuv3", "amd", "none" or "type N".
    pub kind: String,
    /// `out_capabilities` (bit 0: dirty tracking).
    pub capabilities: u64,
    /// Whether the IOMMU can track dirty pages (`IOMMU_HW_CAP_DIRTY_TRACKING`).
    pub dirty_tracking: bool,
    /// Intel VT-d's capability and extended capability registers, when it is VT-d.
    pub vtd_cap_ecap: Option<(u64, u64)>,
}

impl IommuHwInfo {
    /// Interprets the reply: the data type, capabilities and (for VT-d) the data buffer.
    pub fn from_reply(data_type: u32, capabilities: u64, vtd: Option<iommu_hw_info_vtd>) -> Self {
        #[allow(non_upper_case_globals)]
        let kind = match data_type {
            iommu_hw_info_type_IOMMU_HW_INFO_TYPE_NONE => "none".to_string(),
            iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD => "intel-vt-d".to_string(),
            iommu_hw_info_type_IOMMU_HW_INFO_TYPE_ARM_SMMUV3 => "arm-smmuv3".to_string(),
            iommu_hw_info_type_IOMMU_HW_INFO_TYPE_AMD => "amd".to_string(),
            other => format!("type {other}"),
        };
        IommuHwInfo {
            kind,
            capabilities,
            dirty_tracking: capabilities
                & u64::from(iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING)
                != 0,
            vtd_cap_ecap: vtd
                .filter(|_| data_type == iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD)
                .map(|v| (v.cap_reg, v.ecap_reg)),
        }
    }
}

/// One `/dev/iommu` file with one IOAS: an IOVA space devices attach to.
///
/// ```no_run
/// use tidepool::device::iommufd::CdevDevice;
/// use tidepool::share::iommufd::Ioas;
/// let ioas = Ioas::new()?;
/// let nvme0 = CdevDevice::open_in(&ioas, "0000:00:04.0")?;
/// let nvme1 = CdevDevice::open_in(&ioas, "0000:00:05.0")?; // same IOVA space
/// let view = ioas.view(u64::MAX)?; // one view for both
/// # Ok::<(), tidepool::device::DeviceError>(())
/// ```
pub struct Ioas {
    iommufd: Arc<IommuFd>,
    ioas: Arc<IommufdIoas>,
    /// The one view, made on first [`Ioas::view`]. Lock order: this lock, then the view's.
    view: Mutex<Option<Arc<IommufdView>>>,
}

impl std::fmt::Debug for Ioas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ioas")
            .field("fd", &self.iommufd.as_raw_fd())
            .field("ioas_id", &self.ioas.id())
            .finish_non_exhaustive()
    }
}

impl Ioas {
    /// Opens `/dev/iommu` and allocates an IOAS in it.
    ///
    /// Errors: [`ShareError::Permission`] with a hint when `/dev/iommu` is missing or not
    /// accessible.
    pub fn new() -> Result<Arc<Ioas>, ShareError> {
        let iommufd = IommuFd::new().map_err(|e| match errno_of(&e) {
            Some(libc::ENOENT | libc::EACCES | libc::EPERM | libc::ENODEV) => {
                ShareError::Permission {
                    path: "/dev/iommu".into(),
                    hint: HINT_NO_IOMMUFD,
                }
            }
            _ => iommufd_error("open /dev/iommu", e),
        })?;
        let iommufd = Arc::new(iommufd);
        let ioas = IommufdIoas::new(Arc::clone(&iommufd))
            .map_err(|e| iommufd_error("IOMMU_IOAS_ALLOC", e))?;
        Ok(Arc::new(Ioas {
            iommufd,
            ioas: Arc::new(ioas),
            view: Mutex::new(None),
        }))
    }

    /// The IOAS's id (what devices attach to).
    pub fn id(&self) -> u32 {
        self.ioas.id()
    }

    /// The `/dev/iommu` file, for the device layer's `VFIO_DEVICE_BIND_IOMMUFD`.
    pub(crate) fn iommufd(&self) -> &Arc<IommuFd> {
        &self.iommufd
    }

    /// The allowed IOVA ranges now (`IOMMU_IOAS_IOVA_RANGES`). They narrow as devices attach:
    /// ask after attaching. Blocking ioctl; cheap.
    pub fn iova_ranges(&self) -> Result<IoasRanges, ShareError> {
        query_iova_ranges(&self.iommufd, self.ioas.id())
    }

    /// Unmaps **everything** in the IOAS (`IOMMU_IOAS_UNMAP` of iova 0, length `u64::MAX`: the
    /// kernel's "all" form; iova 0 with length 0 is EINVAL) and returns
    /// the bytes the kernel unmapped. For teardown checks and leak hunting: after every view
    /// user is gone it must return 0. Calling it while the view has live mappings takes them
    /// away from the devices; the view's records stay, and their later unshare fails (the
    /// IOVA then stays reserved), so only use it when nothing is shared.
    pub fn unmap_all(&self) -> Result<u64, ShareError> {
        let mut unmap = iommu_ioas_unmap {
            size: std::mem::size_of::<iommu_ioas_unmap>() as u32,
            ioas_id: self.ioas.id(),
            iova: 0,
            length: u64::MAX,
        };
        match self.iommufd.unmap_iommu_ioas(&mut unmap) {
            Ok(()) => Ok(unmap.length),
            // Nothing mapped at all.
            Err(e) if errno_of(&e) == Some(libc::ENOENT) => Ok(0),
            Err(e) => Err(iommufd_error("IOMMU_IOAS_UNMAP (all)", e)),
        }
    }

    /// What the IOMMU behind the device bound as `dev_id` reports (`IOMMU_GET_HW_INFO`).
    pub fn hw_info(&self, dev_id: u32) -> Result<IommuHwInfo, ShareError> {
        let mut vtd = iommu_hw_info_vtd::default();
        let mut info = iommu_hw_info {
            size: std::mem::size_of::<iommu_hw_info>() as u32,
            dev_id,
            data_len: std::mem::size_of::<iommu_hw_info_vtd>() as u32,
            data_uptr: std::ptr::addr_of_mut!(vtd) as u64,
            ..Default::default()
        };
        // The kernel writes at most data_len bytes to data_uptr (our `vtd`, alive and not
        // otherwise borrowed for the call) and fills `info`.
        self.iommufd
            .get_hw_info(&mut info)
            .map_err(|e| iommufd_error("IOMMU_GET_HW_INFO", e))?;
        // SAFETY: both fields of the union are u32; the kernel wrote out_data_type.
        let data_type = unsafe { info.__bindgen_anon_1.out_data_type };
        Ok(IommuHwInfo::from_reply(
            data_type,
            info.out_capabilities,
            Some(vtd),
        ))
    }

    /// The IOAS's one [`IommufdView`], made on the first call with `dma_mask` and the allowed
    /// ranges at that moment (attach the devices first). Later calls return the same view if
    /// its mask is no wider than `dma_mask`, as [`super::vfio::VfioContainer::view`] does.
    pub fn view(&self, dma_mask: u64) -> Result<Arc<IommufdView>, ShareError> {
        one_view(
            &self.view,
            dma_mask,
            "IOAS",
            |v| v.dma_mask,
            || {
                let ranges = self.iova_ranges()?;
                let mappings = Mappings::new(&ranges.allowed, dma_mask)?;
                Ok(IommufdView {
                    iommufd: Arc::clone(&self.iommufd),
                    ioas: Arc::clone(&self.ioas),
                    dma_mask,
                    ranges,
                    mappings,
                })
            },
        )
    }
}

/// Issues `IOMMU_IOAS_IOVA_RANGES`, growing the array until every range fits, and checks it.
fn query_iova_ranges(iommufd: &IommuFd, ioas_id: u32) -> Result<IoasRanges, ShareError> {
    let mut ranges = vec![iommu_iova_range::default(); 8];
    // The kernel answers a short array with EMSGSIZE and the count it needs; the ranges only
    // change when devices attach or detach, so a few rounds suffice.
    for _ in 0..4 {
        let mut cmd = iommu_ioas_iova_ranges {
            size: std::mem::size_of::<iommu_ioas_iova_ranges>() as u32,
            ioas_id,
            num_iovas: ranges.len() as u32,
            __reserved: 0,
            allowed_iovas: ranges.as_mut_ptr() as u64,
            out_iova_alignment: 0,
        };
        // SAFETY: `cmd` is a valid iommu_ioas_iova_ranges whose `size` is its own size; the
        // kernel writes `cmd` and at most `num_iovas` entries to `allowed_iovas`, which points
        // at `ranges` (that many entries, alive and not otherwise borrowed for the call).
        let r = unsafe {
            libc::ioctl(
                iommufd.as_raw_fd(),
                IOMMU_IOAS_IOVA_RANGES as _,
                std::ptr::addr_of_mut!(cmd),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EMSGSIZE) && cmd.num_iovas as usize > ranges.len() {
                ranges = vec![iommu_iova_range::default(); (cmd.num_iovas as usize).min(1 << 16)];
                continue;
            }
            return Err(ShareError::Backend {
                what: "IOMMU_IOAS_IOVA_RANGES",
                detail: e.to_string(),
            });
        }
        let n = (cmd.num_iovas as usize).min(ranges.len());
        return IoasRanges::from_reply(cmd.num_iovas, &ranges[..n], cmd.out_iova_alignment);
    }
    Err(ShareError::Backend {
        what: "IOMMU_IOAS_IOVA_RANGES",
        detail: "the reply kept growing; retry".into(),
    })
}

/// The [`DeviceView`] of an IOAS: device address = an IOVA we allocate inside the allowed
/// ranges. Get it from [`Ioas::view`] or [`crate::device::iommufd::CdevDevice::open`].
pub struct IommufdView {
    iommufd: Arc<IommuFd>,
    ioas: Arc<IommufdIoas>,
    dma_mask: u64,
    ranges: IoasRanges,
    mappings: Mappings,
}

impl std::fmt::Debug for IommufdView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommufdView")
            .field("ioas_id", &self.ioas.id())
            .field("dma_mask", &format_args!("{:#x}", self.dma_mask))
            .field("ranges", &self.ranges)
            .field("usage", &self.usage())
            .finish()
    }
}

impl IommufdView {
    /// The highest device address this view hands out.
    pub fn dma_mask(&self) -> u64 {
        self.dma_mask
    }

    /// The IOAS's allowed ranges and alignment, as read when the view was made.
    pub fn iova_ranges(&self) -> &IoasRanges {
        &self.ranges
    }

    /// The IOAS id.
    pub fn ioas_id(&self) -> u32 {
        self.ioas.id()
    }

    /// `IOMMU_IOAS_MAP` of `len` bytes at `vaddr` to the fixed `iova`, readable and writeable.
    ///
    /// # Safety
    /// `vaddr..vaddr+len` must stay mapped in this process until unmapped from the IOAS, and
    /// must be accessed only through raw pointers meanwhile (the device writes it).
    unsafe fn map(&self, iova: u64, vaddr: usize, len: usize) -> Result<(), IommufdError> {
        let map = iommu_ioas_map {
            size: std::mem::size_of::<iommu_ioas_map>() as u32,
            flags: iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
                | iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE
                | iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id: self.ioas.id(),
            __reserved: 0,
            user_va: vaddr as u64,
            length: len as u64,
            iova,
        };
        self.iommufd.map_iommu_ioas(&map)
    }

    /// `IOMMU_IOAS_UNMAP` of `[iova, iova+len)`; returns the bytes the kernel unmapped.
    fn unmap(&self, iova: u64, len: u64) -> Result<u64, IommufdError> {
        let mut unmap = iommu_ioas_unmap {
            size: std::mem::size_of::<iommu_ioas_unmap>() as u32,
            ioas_id: self.ioas.id(),
            iova,
            length: len,
        };
        self.iommufd.unmap_iommu_ioas(&mut unmap)?;
        Ok(unmap.length)
    }
}

impl DeviceView for IommufdView {
    /// Allocates an IOVA extent (page-size aligned, inside the allowed ranges, below the mask)
    /// and maps the whole region with one `IOMMU_IOAS_MAP`. The ioctl runs unlocked. Blocks.
    fn share(&self, region: &HostRegion<'_>) -> Result<DeviceAddr, ShareError> {
        check_region(region)?;
        let len = region.len as u64;
        let align = (region.page_size as u64).max(self.ranges.alignment);
        let iova = self.mappings.reserve(len, align)?;
        // SAFETY: the HostRegion contract (module docs): the region stays mapped until it is
        // unshared and is touched only through raw pointers while shared.
        let mapped = unsafe { self.map(iova, region.start(), region.len) };
        match mapped {
            Ok(()) => {
                self.mappings.mapped(iova, region);
                Ok(DeviceAddr(iova))
            }
            Err(e) => {
                self.mappings.map_failed(iova, len);
                if errno_of(&e) == Some(libc::ENOMEM) {
                    return Err(ShareError::Backend {
                        what: "IOMMU_IOAS_MAP",
                        detail: format!(
                            "{e}: pinning failed; raise RLIMIT_MEMLOCK (`ulimit -l unlimited`) \
                             or run as root"
                        ),
                    });
                }
                Err(iommufd_error("IOMMU_IOAS_MAP", e))
            }
        }
    }

    /// Unmaps a region shared at `addr`; frees its IOVA once the kernel reports exactly its
    /// length unmapped. The ioctl runs unlocked.
    fn unshare(&self, region: &HostRegion<'_>, addr: DeviceAddr) -> Result<(), ShareError> {
        let mapping = self.mappings.take(region, addr)?;
        let unmapped = self.unmap(addr.0, mapping.len as u64);
        match unmapped {
            Ok(n) if n == mapping.len as u64 => {
                self.mappings.unmapped(addr.0, mapping);
                Ok(())
            }
            other => {
                // The device may still reach it: keep the IOVA reserved and the record.
                self.mappings.unmap_failed(addr.0, mapping);
                Err(match other {
                    Ok(n) => ShareError::Backend {
                        what: "IOMMU_IOAS_UNMAP",
                        detail: format!(
                            "the kernel unmapped {n} B at {:#x}, not {} B; the range stays reserved",
                            addr.0, mapping.len
                        ),
                    },
                    Err(e) => iommufd_error("IOMMU_IOAS_UNMAP", e),
                })
            }
        }
    }

    fn usage(&self) -> ShareUsage {
        self.mappings.usage(None)
    }

    fn kind(&self) -> &'static str {
        "iommufd"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, last: u64) -> iommu_iova_range {
        iommu_iova_range { start, last }
    }

    #[test]
    fn parses_the_intel_iommu_ranges_and_their_gaps() {
        // What QEMU's intel-iommu gives type1 (vm.md): the MSI window is reserved.
        let got = IoasRanges::from_reply(
            2,
            &[r(0, 0xfedf_ffff), r(0xfef0_0000, 0x7f_ffff_ffff)],
            4096,
        )
        .unwrap();
        assert_eq!(
            got.allowed,
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
        assert_eq!(got.alignment, 4096);
        assert_eq!(
            got.reserved(),
            vec![
                IovaRange {
                    start: 0xfee0_0000,
                    end: 0xfeef_ffff
                },
                IovaRange {
                    start: 0x80_0000_0000,
                    end: u64::MAX
                }
            ]
        );
    }

    #[test]
    fn reserved_is_empty_for_the_whole_space_and_leading_gaps_count() {
        let all = IoasRanges::from_reply(1, &[r(0, u64::MAX)], 1).unwrap();
        assert!(all.reserved().is_empty());
        let high = IoasRanges::from_reply(1, &[r(0x1000, u64::MAX)], 1).unwrap();
        assert_eq!(
            high.reserved(),
            vec![IovaRange {
                start: 0,
                end: 0xfff
            }]
        );
        let none = IoasRanges::from_reply(0, &[], 4096).unwrap();
        assert_eq!(
            none.reserved(),
            vec![IovaRange {
                start: 0,
                end: u64::MAX
            }]
        );
    }

    #[test]
    fn malformed_replies_are_errors() {
        let bad = |total, ranges: &[iommu_iova_range], align| {
            matches!(
                IoasRanges::from_reply(total, ranges, align),
                Err(ShareError::Backend {
                    what: "IOMMU_IOAS_IOVA_RANGES",
                    ..
                })
            )
        };
        assert!(bad(1, &[r(0x2000, 0x1000)], 4096), "end before start");
        assert!(
            bad(2, &[r(0, 0x1fff), r(0x1000, 0x2fff)], 4096),
            "overlapping"
        );
        assert!(
            bad(2, &[r(0x10000, 0x1ffff), r(0, 0xfff)], 4096),
            "descending"
        );
        assert!(bad(3, &[r(0, 0xfff)], 4096), "fewer filled than reported");
        assert!(bad(1, &[r(0, 0xfff)], 0), "alignment 0");
        assert!(bad(1, &[r(0, 0xfff)], 3000), "alignment not a power of two");
    }

    #[test]
    fn hw_info_kinds_and_capabilities() {
        let vtd = iommu_hw_info_vtd {
            flags: 0,
            __reserved: 0,
            cap_reg: 0xd2008c22260206,
            ecap_reg: 0xf00f5e,
        };
        let i = IommuHwInfo::from_reply(
            iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD,
            1,
            Some(vtd),
        );
        assert_eq!(i.kind, "intel-vt-d");
        assert!(i.dirty_tracking);
        assert_eq!(i.vtd_cap_ecap, Some((0xd2008c22260206, 0xf00f5e)));
        // The VT-d buffer means nothing for another IOMMU.
        let i = IommuHwInfo::from_reply(iommu_hw_info_type_IOMMU_HW_INFO_TYPE_NONE, 0, Some(vtd));
        assert_eq!(i.kind, "none");
        assert!(!i.dirty_tracking);
        assert_eq!(i.vtd_cap_ecap, None);
        assert_eq!(IommuHwInfo::from_reply(77, 0, None).kind, "type 77");
    }

    #[test]
    fn missing_dev_iommu_is_a_permission_error_with_a_hint() {
        if std::path::Path::new("/dev/iommu").exists() {
            eprintln!("skipping: /dev/iommu exists here");
            return;
        }
        match Ioas::new() {
            Err(ShareError::Permission { path, hint }) => {
                assert_eq!(path, "/dev/iommu");
                assert!(hint.contains("TIDEPOOL_VFIO_BACKEND=type1"), "{hint}");
            }
            other => panic!("expected a permission error, got {other:?}"),
        }
    }
}
