//! # Virtio 1.x over PCI through VFIO: the transport and split virtqueues
//!
//! Device-type independent: a virtio-blk driver can use this module as it is. The net driver
//! ([`crate::net`]) is its first user.
//!
//! - [`pci`]: [`pci::VirtioPci`], the modern PCI transport (virtio 1.x §4.1): the vendor
//!   capability walk over config space, the common/notify/ISR/device-config structures in the
//!   BARs they name, reset by writing status 0, feature negotiation, queue setup, MSI-X.
//! - [`queue`]: [`queue::SplitQueue`], a split virtqueue (§2.7) whose descriptor table and rings
//!   live in one buffer of a Tidepool pool: the owner of the posted buffers over the shared
//!   [`tidepool_virtqueue::SplitRing`], which checks every used-ring entry before it is
//!   believed (the device is untrusted).
//! - [`mmio`]: bounds-checked volatile register access.
//!
//! ## Driver initialisation (§3.1.1), as [`pci::VirtioPci`] implements it
//! reset → ACKNOWLEDGE → DRIVER → read device features → write the accepted subset →
//! FEATURES_OK → re-read status (the device clears FEATURES_OK if it refuses the subset) →
//! bus mastering, queues, MSI-X vectors → DRIVER_OK. On any failure the driver writes FAILED.
//!
//! Behind an IOMMU the device must translate its DMA through it: VIRTIO_F_ACCESS_PLATFORM
//! (bit 33) must be offered and accepted, otherwise the device would read guest-physical
//! addresses where we put IOVAs. A device that does not offer it is refused
//! ([`VirtioError::AccessPlatformMissing`]).

pub mod mmio;
pub mod pci;
pub mod queue;

pub use pci::VirtioPci;
pub use queue::{Completion, RingError, SplitQueue};

/// Feature bits (virtio 1.x §6 and the device sections).
pub mod features {
    /// The device complies with virtio 1.x (modern). Required.
    pub const VERSION_1: u64 = 1 << 32;
    /// The device's DMA goes through the platform IOMMU. Required behind VFIO.
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
    /// Indirect descriptors (not used).
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event`/`avail_event` notification suppression (not used).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Packed virtqueues (not used: split only).
    pub const RING_PACKED: u64 = 1 << 34;
}

/// Device status bits (§2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 128;
}

/// What went wrong talking to a virtio device, each variant saying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The PCI function is not the virtio device this driver wants.
    #[error(
        "{bdf} is {vendor:04x}:{device:04x}, not a modern virtio {want} device \
         (1af4:{want_id:04x}); pass the BDF of a virtio-{want} function (`lspci -D -nn`)"
    )]
    WrongDevice {
        /// PCI address.
        bdf: String,
        /// Its vendor id.
        vendor: u16,
        /// Its device id.
        device: u16,
        /// What we wanted ("net", "blk").
        want: &'static str,
        /// The modern device id we wanted.
        want_id: u16,
    },
    /// A virtio capability is missing or malformed.
    #[error(
        "virtio PCI capability problem: {0}; the device is not a virtio 1.x PCI device (start \
         QEMU with disable-legacy=on or a modern device)"
    )]
    BadCapability(String),
    /// A register access fell outside its structure (a driver bug or a bogus capability).
    #[error("register access {offset:#x}+{width} outside the {len:#x}-byte {what} structure")]
    BadRegister {
        /// Which structure.
        what: &'static str,
        /// Offset inside it.
        offset: usize,
        /// Access width.
        width: usize,
        /// Structure length.
        len: usize,
    },
    /// The device did not report status 0 after a reset.
    #[error("device did not finish reset within {0:?} (status still {1:#04x}); the device is wedged: reset the VM/host function")]
    ResetTimeout(std::time::Duration, u8),
    /// The device does not offer a feature this driver requires.
    #[error("device does not offer {name} (feature bit {bit}); {hint}")]
    MissingFeature {
        /// Feature name.
        name: &'static str,
        /// Bit number.
        bit: u32,
        /// What to do.
        hint: &'static str,
    },
    /// The device does not translate DMA through the IOMMU (no VIRTIO_F_ACCESS_PLATFORM).
    #[error(
        "device does not offer VIRTIO_F_ACCESS_PLATFORM: it would DMA to guest-physical \
         addresses, bypassing the IOMMU mappings this driver makes; enable it on the device \
         (QEMU: iommu_platform=on) — refusing to drive it"
    )]
    AccessPlatformMissing,
    /// The device cleared FEATURES_OK: it refuses the feature subset we accepted.
    #[error(
        "device refused the accepted features {accepted:#x} (offered {offered:#x}): it cleared \
         FEATURES_OK; a device behind an IOMMU requires VIRTIO_F_ACCESS_PLATFORM (bit 33) to be \
         accepted"
    )]
    FeaturesRejected {
        /// What the device offered.
        offered: u64,
        /// What the driver accepted.
        accepted: u64,
    },
    /// A queue the driver needs does not exist or cannot be set up.
    #[error("queue {queue}: {problem}")]
    Queue {
        /// Queue index.
        queue: u16,
        /// What is wrong.
        problem: String,
    },
    /// The device set DEVICE_NEEDS_RESET.
    #[error("device reports DEVICE_NEEDS_RESET (status {0:#04x}); drop and reopen the driver")]
    NeedsReset(u8),
    /// The device (config space, BAR mapping, MSI-X, reset) failed.
    #[error(transparent)]
    Device(#[from] tidepool::device::DeviceError),
    /// Making memory device-visible failed.
    #[error(transparent)]
    Share(#[from] tidepool::share::ShareError),
    /// The pool could not provide ring memory.
    #[error("ring memory: {0}")]
    Pool(#[from] tidepool::pool::PoolError),
}
