//! # Tidepool: userspace DMA memory whose maps await capacity
//!
//! Userspace drivers (VFIO, vhost-user, SPDK-style) need memory a device can reach: pinned,
//! mapped in the IOMMU (or shared with an untrusted host in a confidential VM). Tidepool keeps
//! such memory in a pool of prefilled hugepage chunks, grows it in the background, gives idle
//! memory back, and — the point of the crate — lets a map that finds the pool empty *wait* for
//! capacity (fairly, cancel-safely, with a bounded wait) instead of failing the I/O.
//!
//! ## Layers (bottom up)
//! - [`memory`]: [`memory::Chunk`], hugetlb `memfd` memory (2 MiB or 1 GiB pages), or locked
//!   4 KiB pages when explicitly allowed.
//! - [`share`]: the [`share::DeviceView`] trait — make a chunk reachable by one device and learn
//!   its device address — with the VFIO type1, no-IOMMU and identity (tests) backends.
//! - [`device`]: the device seam drivers reach hardware through, [`device::PciDevice`]
//!   (registers, config space and capabilities, MSI-X eventfds, reset, bus mastering, the DMA
//!   view), with VFIO as one implementation and emulated devices (crate `tidepool-emu`) as
//!   another.
//! - [`iova`]: the IOVA space allocator that honours the IOMMU's valid ranges and a DMA mask.
//! - [`copy`]: the one audited routine that moves bytes between CPU memory and device-visible
//!   memory.
//! - [`wait`]: the FIFO, size-aware, cancel-safe waiter queue.
//! - [`pool`]: the pool itself: allocation, waiting maps, the immediate path, growth and
//!   shrinking, stats.
//! - [`data`]: [`data::DmaData`], the one DMA data type every driver accepts (an owned pool
//!   buffer, a bounce of caller memory, or a direct mapping), which knows its domain and
//!   completes exactly once.
//! - [`policy`]: how a driver chooses between bouncing through the pool and mapping caller
//!   memory directly (bounce / direct / auto with a measured crossover).
//!
//! The word for "device-visible" is the same everywhere: an IOMMU mapping, a physical address
//! and a vhost-user region are three implementations of one idea ([`share::DeviceView`]); the
//! pool never knows which one it has.

pub mod copy;
pub mod data;
pub mod device;
pub mod iova;
pub mod memory;
pub mod policy;
pub mod pool;
pub mod share;
pub(crate) mod sync;
pub mod wait;

/// An address as a device sees it: an IOVA behind an IOMMU, a physical address without one,
/// or an address the frontend chose for a vhost-user backend.
///
/// ```
/// let a = tidepool::DeviceAddr(0x1000);
/// assert_eq!(a.offset(0x200), tidepool::DeviceAddr(0x1200));
/// ```
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
pub struct DeviceAddr(pub u64);

impl DeviceAddr {
    /// The address `bytes` further on.
    pub fn offset(self, bytes: u64) -> DeviceAddr {
        DeviceAddr(self.0 + bytes)
    }
}

impl std::fmt::LowerHex for DeviceAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}
