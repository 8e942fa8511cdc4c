//! The NVMe controller registers in BAR0 (Base spec 1.4, section 3.1), with typed values.
//!
//! Register *values* ([`Cap`], [`Version`], [`Cc`], [`Csts`]) are plain data with pure decoders
//! and encoders, unit-tested here. [`Registers`] does the accesses: every one is a single
//! access through the device seam's BAR ([`tidepool::device::Mmio`]: a volatile load or store
//! on a VFIO BAR mapping, or a call into an emulated controller), which checks bounds and
//! alignment. 64-bit registers (CAP, ASQ, ACQ) are accessed as one 8-byte
//! access, which the spec allows and QEMU and real controllers accept.
//!
//! Doorbells sit at `0x1000 + (2 * qid + is_cq) * (4 << CAP.DSTRD)`.

use std::time::Duration;

use std::sync::Arc;

use tidepool::device::{DeviceError, Mmio};

/// Register offsets in BAR0.
pub mod offset {
    /// Controller Capabilities (64-bit).
    pub const CAP: usize = 0x00;
    /// Version.
    pub const VS: usize = 0x08;
    /// Interrupt Mask Set.
    pub const INTMS: usize = 0x0c;
    /// Interrupt Mask Clear.
    pub const INTMC: usize = 0x10;
    /// Controller Configuration.
    pub const CC: usize = 0x14;
    /// Controller Status.
    pub const CSTS: usize = 0x1c;
    /// Admin Queue Attributes.
    pub const AQA: usize = 0x24;
    /// Admin Submission Queue base address (64-bit).
    pub const ASQ: usize = 0x28;
    /// Admin Completion Queue base address (64-bit).
    pub const ACQ: usize = 0x30;
    /// First doorbell (admin SQ tail).
    pub const DOORBELLS: usize = 0x1000;
}

/// Controller Capabilities (CAP), decoded.
///
/// ```
/// use tidepool_nvme::regs::Cap;
/// // QEMU 7.2: MQES 2047 (0's based), CQR, TO 15 (7.5 s), DSTRD 0, CSS NVM, MPSMIN 0, MPSMAX 4.
/// let cap = Cap::from_raw(0x0040_0020_0f01_07ff);
/// assert_eq!(cap.max_queue_entries(), 2048);
/// assert_eq!(cap.ready_timeout(), std::time::Duration::from_millis(7500));
/// assert!(cap.supports_nvm_command_set());
/// ```
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Wraps a raw CAP value.
    pub fn from_raw(raw: u64) -> Cap {
        Cap(raw)
    }

    /// Maximum entries per I/O queue (MQES + 1; MQES is 0's based). The spec requires at
    /// least 2; a device that reports MQES = 0 gives 1 here, which leaves no usable depth
    /// (`Controller::max_queue_depth` is 0 and every queue creation is refused).
    pub fn max_queue_entries(self) -> u32 {
        (self.0 & 0xffff) as u32 + 1
    }

    /// Contiguous Queues Required.
    pub fn contiguous_queues_required(self) -> bool {
        self.0 & (1 << 16) != 0
    }

    /// The worst-case time for CSTS.RDY to follow CC.EN (TO, in 500 ms units). A controller
    /// reporting 0 gets 500 ms.
    pub fn ready_timeout(self) -> Duration {
        let units = ((self.0 >> 24) & 0xff).max(1);
        Duration::from_millis(500 * units)
    }

    /// Doorbell stride in bytes (4 << DSTRD).
    pub fn doorbell_stride(self) -> usize {
        4 << ((self.0 >> 32) & 0xf)
    }

    /// NVM command set supported (CSS bit 0).
    pub fn supports_nvm_command_set(self) -> bool {
        (self.0 >> 37) & 1 != 0
    }

    /// Minimum memory page size in bytes (4 KiB << MPSMIN).
    pub fn min_page_bytes(self) -> usize {
        4096usize << ((self.0 >> 48) & 0xf)
    }

    /// Maximum memory page size in bytes (4 KiB << MPSMAX).
    pub fn max_page_bytes(self) -> usize {
        4096usize << ((self.0 >> 52) & 0xf)
    }
}

/// The Version register (VS): major, minor, tertiary.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u8,
    /// Tertiary version.
    pub tertiary: u8,
}

impl Version {
    /// Decodes VS.
    pub fn from_raw(raw: u32) -> Version {
        Version {
            major: (raw >> 16) as u16,
            minor: (raw >> 8) as u8,
            tertiary: raw as u8,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.tertiary)
    }
}

/// Controller Configuration (CC) as this driver writes it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Cc(pub u32);

impl Cc {
    /// EN, bit 0.
    const EN: u32 = 1;

    /// The configuration this driver runs with: NVM command set (CSS 0), 4 KiB pages
    /// (MPS 0), round-robin arbitration, 64 B SQ entries (IOSQES 6), 16 B CQ entries (IOCQES 4),
    /// enabled or not.
    pub fn driver_default(enable: bool) -> Cc {
        Cc((6 << 16) | (4 << 20) | (u32::from(enable) * Cc::EN))
    }

    /// EN.
    pub fn enabled(self) -> bool {
        self.0 & Cc::EN != 0
    }

    /// The same value with shutdown notification SHN = 01 (normal shutdown).
    pub fn with_normal_shutdown(self) -> Cc {
        Cc((self.0 & !(0b11 << 14)) | (0b01 << 14))
    }
}

/// Controller Status (CSTS), decoded.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Csts(pub u32);

impl Csts {
    /// Ready.
    pub fn ready(self) -> bool {
        self.0 & 1 != 0
    }

    /// Controller Fatal Status: the controller hit an error it cannot recover from without a
    /// reset. All ones (a surprise-removed device reads as `0xffff_ffff`) also counts.
    pub fn fatal(self) -> bool {
        self.0 & 2 != 0
    }

    /// All ones: what a removed (or dead) device's registers read as. Its RDY bit means
    /// nothing then.
    pub fn removed(self) -> bool {
        self.0 == u32::MAX
    }

    /// Shutdown Status is "shutdown processing complete" (SHST = 10b).
    pub fn shutdown_complete(self) -> bool {
        (self.0 >> 2) & 0b11 == 0b10
    }
}

/// The controller's registers, accessed through a mapped BAR0.
///
/// Every method is one volatile register access; `&self` methods may be called from any
/// thread (doorbells of different queues are different registers). Sequencing rules (e.g.
/// set ASQ/ACQ before CC.EN) are the controller module's job.
#[derive(Debug)]
pub struct Registers {
    bar: Arc<dyn Mmio>,
    stride: usize,
}

impl Registers {
    /// Wraps BAR0, reading CAP.DSTRD for the doorbell stride.
    pub fn new(bar: Arc<dyn Mmio>) -> Result<Registers, DeviceError> {
        let cap = Cap(bar.read64(offset::CAP)?);
        Ok(Registers {
            bar,
            stride: cap.doorbell_stride(),
        })
    }

    /// CAP.
    pub fn cap(&self) -> Result<Cap, DeviceError> {
        Ok(Cap(self.bar.read64(offset::CAP)?))
    }

    /// VS.
    pub fn version(&self) -> Result<Version, DeviceError> {
        Ok(Version::from_raw(self.bar.read32(offset::VS)?))
    }

    /// CC.
    pub fn cc(&self) -> Result<Cc, DeviceError> {
        Ok(Cc(self.bar.read32(offset::CC)?))
    }

    /// Writes CC.
    pub fn set_cc(&self, cc: Cc) -> Result<(), DeviceError> {
        self.bar.write32(offset::CC, cc.0)
    }

    /// CSTS.
    pub fn csts(&self) -> Result<Csts, DeviceError> {
        Ok(Csts(self.bar.read32(offset::CSTS)?))
    }

    /// Programs the admin queues: AQA sizes (1-based entry counts) and the ring addresses.
    /// Only valid while the controller is disabled.
    pub fn set_admin_queues(
        &self,
        sq_entries: u16,
        cq_entries: u16,
        asq: u64,
        acq: u64,
    ) -> Result<(), DeviceError> {
        let aqa = u32::from(sq_entries - 1) | (u32::from(cq_entries - 1) << 16);
        self.bar.write32(offset::AQA, aqa)?;
        self.bar.write64(offset::ASQ, asq)?;
        self.bar.write64(offset::ACQ, acq)
    }

    /// Masks (or unmasks) all pin/MSI interrupts. Has no effect on MSI-X (spec 3.1.3, 3.1.4).
    pub fn mask_interrupts(&self, mask: bool) -> Result<(), DeviceError> {
        let reg = if mask { offset::INTMS } else { offset::INTMC };
        self.bar.write32(reg, u32::MAX)
    }

    /// Byte offset of queue `qid`'s SQ tail (`cq = false`) or CQ head (`cq = true`) doorbell.
    pub fn doorbell_offset(&self, qid: u16, cq: bool) -> usize {
        offset::DOORBELLS + (2 * usize::from(qid) + usize::from(cq)) * self.stride
    }

    /// Rings a doorbell at an offset from [`Registers::doorbell_offset`].
    pub fn ring(&self, doorbell: usize, value: u16) -> Result<(), DeviceError> {
        self.bar.write32(doorbell, u32::from(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqes_zero_gives_one_entry_and_no_depth() {
        // A device breaking the spec's MQES >= 1: one entry, which holds no command.
        assert_eq!(Cap::from_raw(0).max_queue_entries(), 1);
        assert_eq!(Cap::from_raw(0xffff).max_queue_entries(), 65536);
    }

    #[test]
    fn cap_fields_decode() {
        // MQES 63, CQR, TO 2 (1 s), DSTRD 1 (8 B), CSS NVM, MPSMIN 1 (8 KiB), MPSMAX 2.
        let raw = 63 | (1 << 16) | (2 << 24) | (1u64 << 32) | (1 << 37) | (1 << 48) | (2 << 52);
        let cap = Cap::from_raw(raw);
        assert_eq!(cap.max_queue_entries(), 64);
        assert!(cap.contiguous_queues_required());
        assert_eq!(cap.ready_timeout(), Duration::from_secs(1));
        assert_eq!(cap.doorbell_stride(), 8);
        assert!(cap.supports_nvm_command_set());
        assert_eq!(cap.min_page_bytes(), 8192);
        assert_eq!(cap.max_page_bytes(), 16384);
        assert_eq!(Cap::from_raw(0).ready_timeout(), Duration::from_millis(500));
    }

    #[test]
    fn cc_encodes_entry_sizes_and_shutdown() {
        let cc = Cc::driver_default(true);
        assert_eq!(cc.0, 0x0046_0001);
        assert!(cc.enabled());
        assert_eq!(cc.with_normal_shutdown().0, 0x0046_4001);
        assert!(!Cc::driver_default(false).enabled());
    }

    #[test]
    fn csts_and_version_decode() {
        assert!(Csts(1).ready() && !Csts(1).fatal());
        assert!(Csts(u32::MAX).removed() && !Csts(3).removed());
        assert!(Csts(3).fatal());
        assert!(Csts(0b1001).shutdown_complete());
        assert!(!Csts(0b0101).shutdown_complete());
        let v = Version::from_raw(0x0001_0400);
        assert_eq!(v.to_string(), "1.4.0");
        assert!(v >= Version::from_raw(0x0001_0000));
    }
}
