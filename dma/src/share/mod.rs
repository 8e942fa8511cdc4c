//! Making memory device-visible: the [`DeviceView`] seam and its backends.
//!
//! "Device-visible" means different things on different machines, and the pool must not care:
//! - [`vfio::VfioType1`]: an IOMMU mapping made with `VFIO_IOMMU_MAP_DMA`; the device address is
//!   an IOVA we allocate ([`crate::iova`]).
//! - [`noiommu::NoIommu`]: no IOMMU at all (VFIO no-IOMMU mode, uio, confidential VMs without a
//!   vIOMMU); the device address is the physical address, read from `/proc/self/pagemap`.
//! - [`identity::Identity`]: tests only; the device address is the virtual address.
//! - vhost-user regions (`SET_MEM_TABLE` / `ADD_MEM_REG`) live in `drivers/vhost-user-blk`, which
//!   implements this same trait.
//!
//! - [`iommufd::IommufdView`]: an IOMMU mapping in an iommufd IOAS (`/dev/iommu`, kernel ≥ 6.6,
//!   devices opened through their VFIO cdevs); `IOMMU_IOAS_MAP` at an IOVA we allocate inside
//!   the IOAS's allowed ranges. Which of the two VFIO backends a device gets is chosen in
//!   [`crate::device::backend`].
//!
//! ## Contract
//! - [`DeviceView::share`] is called once per chunk (one IOMMU mapping, one region); it may block
//!   (ioctls, page pinning): only setup and the grower thread call it.
//! - The returned [`DeviceAddr`] covers the whole region contiguously.
//! - [`DeviceView::unshare`] is called with exactly what `share` was given and returned, after the
//!   device can no longer have any I/O in flight to that region.

pub mod direct;
pub mod identity;
pub mod iommufd;
mod mappings;
pub mod noiommu;
pub mod vfio;

use crate::memory::HostRegion;
use crate::DeviceAddr;

/// How much of a backend's mapping budget is in use.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShareUsage {
    /// Live mappings (IOMMU mappings, regions) made through this view.
    pub mappings: u64,
    /// The backend's limit on live mappings, if it has one (VFIO's `dma_avail` at open time,
    /// 65,535 by default; 32 vhost-user memory slots).
    pub mapping_limit: Option<u64>,
    /// Bytes currently shared.
    pub bytes: u64,
}

/// Makes host memory reachable by one device and says at which device address.
///
/// Implementations must be thread-safe; the pool calls `share`/`unshare` only from setup and its
/// grower thread (and the threads the grower starts to make one growth attempt's chunks at
/// once: `share` may be called concurrently), and [`crate::pool`]'s direct-mapping path from
/// the caller's thread.
pub trait DeviceView: Send + Sync + std::fmt::Debug {
    /// Makes `region` device-visible as one contiguous range of device addresses and returns the
    /// address of its first byte. May block.
    fn share(&self, region: &HostRegion<'_>) -> Result<DeviceAddr, ShareError>;

    /// Undoes a [`DeviceView::share`] of exactly this region at exactly this address.
    fn unshare(&self, region: &HostRegion<'_>, addr: DeviceAddr) -> Result<(), ShareError>;

    /// Mappings in use and the limit. May be called from async code and the hot path's
    /// error reporting: keep it cheap and free of locks held across system calls.
    fn usage(&self) -> ShareUsage;

    /// A short name for logs and stats ("vfio-type1", "iommufd", "no-iommu", "identity",
    /// "vhost-user").
    fn kind(&self) -> &'static str;

    /// The address space this view's device addresses belong to. Two views with the same
    /// domain hand out addresses that mean the same memory to every device behind either; a
    /// buffer of one domain given to a device of another would make it DMA into whatever that
    /// domain has at the address, so drivers refuse it.
    ///
    /// The default is the view object itself (views live behind an `Arc` and are never moved,
    /// and a buffer keeps its pool's view alive, so no two live views share an identity): right
    /// for IOMMU domains, where each view owns one. Views whose addresses are global (physical
    /// addresses, this process's virtual addresses) override it with a fixed domain.
    fn domain(&self) -> DomainId {
        DomainId((self as *const Self).cast::<u8>() as usize as u64)
    }
}

/// Identifies a DMA address space (an IOMMU domain, or a global one). See
/// [`DeviceView::domain`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct DomainId(pub u64);

impl DomainId {
    /// Physical addresses (no IOMMU): one space for every device of the machine.
    pub const PHYSICAL: DomainId = DomainId(1);
    /// This process's virtual addresses (the identity view of tests).
    pub const PROCESS_VIRTUAL: DomainId = DomainId(2);
}

impl std::fmt::Display for DomainId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            DomainId::PHYSICAL => f.write_str("physical"),
            DomainId::PROCESS_VIRTUAL => f.write_str("process-virtual"),
            DomainId(id) => write!(f, "domain {id:#x}"),
        }
    }
}

/// What went wrong making memory device-visible, each variant saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The backend's mapping limit is reached.
    #[error(
        "device mapping limit reached: {used} of {limit} mappings in use; use larger chunks \
         (fewer mappings) or a lower cap, or raise the limit (VFIO: vfio_iommu_type1's \
         dma_entry_limit module parameter; vhost-user: the backend's memory slots)"
    )]
    MappingLimit {
        /// Mappings in use.
        used: u64,
        /// The limit.
        limit: u64,
    },
    /// No device address space left that satisfies the IOMMU's ranges and the DMA mask.
    #[error("no {len} B of device address space left below the DMA mask {mask:#x}: {detail}")]
    AddressSpace {
        /// Bytes wanted.
        len: u64,
        /// The device's DMA mask.
        mask: u64,
        /// What the allocator says.
        detail: String,
    },
    /// The region cannot be shared this way (e.g. not physically contiguous without an IOMMU,
    /// not page-aligned, no memfd for a backend that needs one).
    #[error("cannot share this memory: {0}")]
    Unsuitable(String),
    /// The region was not shared (or not at that address) when unsharing.
    #[error("region at {addr:#x} (+{len} B) is not shared at device address {iova:#x}")]
    NotShared {
        /// Host address.
        addr: usize,
        /// Length.
        len: usize,
        /// Device address given.
        iova: u64,
    },
    /// A VFIO operation failed.
    #[error("VFIO: {what}: {detail}")]
    Vfio {
        /// The operation.
        what: &'static str,
        /// The error text from vfio-ioctls or the kernel.
        detail: String,
    },
    /// No permission: not root, or no access to /dev/vfio or /proc/self/pagemap.
    #[error("permission denied opening {path}: {hint}")]
    Permission {
        /// The file.
        path: String,
        /// What to do.
        hint: &'static str,
    },
    /// The backend that owns the device side refused or broke (e.g. a vhost-user backend's
    /// protocol error).
    #[error("{what}: {detail}")]
    Backend {
        /// The operation.
        what: &'static str,
        /// What went wrong.
        detail: String,
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

/// `e`'s text followed by each of its sources', joined with ": ", for an error's `detail`
/// (the backends' crates wrap the kernel's errno as a source).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut detail = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    detail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_names_every_source() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
        assert_eq!(error_chain(&std::io::Error::other("alone")), "alone");
    }
}
