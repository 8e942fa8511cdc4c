//! The device seam: how a driver reaches a PCI function, whatever backs it.
//!
//! A userspace driver needs six things from "the device": its registers (BARs), its PCI
//! configuration space (class code, the capability list, the COMMAND register), interrupt
//! vectors delivered as eventfds, a function reset, bus mastering on and off, and the DMA view
//! (the IOMMU domain its DMA goes through, [`crate::share::DeviceView`]). [`PciDevice`] is that
//! list as a trait; drivers take an `Arc<dyn PciDevice>` and nothing else.
//!
//! Implementations:
//! - [`vfio::VfioDevice`]: a PCI function bound to `vfio-pci` (real hardware, or QEMU's devices in
//!   the test VM), in a [`crate::share::vfio::VfioContainer`] whose view is its DMA view.
//! - [`iommufd::CdevDevice`]: the same function opened through its VFIO cdev and attached to an
//!   iommufd IOAS ([`crate::share::iommufd::Ioas`]) whose view is its DMA view.
//!   [`backend`] picks one of the two (automatically, or as asked: `TIDEPOOL_VFIO_BACKEND`).
//! - The emulated devices of the dev-only `tidepool-emu` crate: an NVMe controller and a
//!   virtio-net device on their own threads, reaching memory only through their DMA view as
//!   hardware would, with faults injectable on every path (`cargo test`, no VM).
//!
//! The anchor is OpenVMM's `user_driver::DeviceBacking`; libvfn keeps the same split
//! (iommu, vfio/pci, nvme). This layer sits between the drivers and [`crate::share`]: `share`
//! only makes memory device-visible; this module knows what a PCI function is.
//!
//! # Registers
//! [`Mmio`] is one mapped BAR: naturally aligned 32- and 64-bit accesses, each a single access
//! the device sees (a volatile load or store for VFIO, a call into the model for an emulated
//! device). Accesses outside the BAR or misaligned are [`DeviceError::BadAccess`], never UB.
//!
//! # Bus mastering and reset
//! [`PciDevice::set_bus_master`] (provided) is a read-modify-write of the COMMAND register
//! through config space; [`PciDevice::function_reset`] is a function-level reset. Both can fail,
//! and a driver that could not stop a device's DMA must not reuse memory the device might still
//! write: it quarantines that memory instead (see the NVMe driver's reset).

pub mod backend;
pub mod iommufd;
pub mod vfio;
mod vfio_fd;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::share::{DeviceView, ShareError};

/// PCI config space offsets and bits the drivers use.
pub mod config {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: u16 = 0x02;
    /// COMMAND register (16 bits).
    pub const COMMAND: u16 = 0x04;
    /// STATUS register (16 bits); bit 4 says a capability list exists.
    pub const STATUS: u16 = 0x06;
    /// Revision ID (8 bits) and class code (24 bits) as one dword.
    pub const CLASS_REVISION: u16 = 0x08;
    /// Capability list pointer (8 bits).
    pub const CAPABILITIES_POINTER: u16 = 0x34;
    /// COMMAND bit 1: respond to memory-space (BAR) accesses.
    pub const COMMAND_MEMORY: u16 = 1 << 1;
    /// COMMAND bit 2: the function may master the bus, i.e. do DMA.
    pub const COMMAND_MASTER: u16 = 1 << 2;
    /// STATUS bit 4: the capability list is valid.
    pub const STATUS_CAPABILITIES: u16 = 1 << 4;
    /// Capability ID of vendor-specific capabilities (virtio's are these).
    pub const CAP_VENDOR: u8 = 0x09;
    /// Capability ID of MSI-X.
    pub const CAP_MSIX: u8 = 0x11;
    /// Size of the standard config space header plus capabilities (legacy PCI).
    pub const SPACE_BYTES: u16 = 256;
}

/// What went wrong reaching a device, each variant saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A PCI function cannot be used from userspace as asked (bad address, missing, bound to
    /// another driver, no IOMMU group, group not viable); `problem` says how to fix it.
    #[error("PCI device {bdf}: {problem}")]
    Pci {
        /// The PCI address as given.
        bdf: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// A register or config-space access outside the region or not naturally aligned: a
    /// driver bug; check the offset against the device's specification.
    #[error(
        "{what} access of {width} B at offset {offset:#x} is outside the {size} B region or \
         not aligned to {width} B"
    )]
    BadAccess {
        /// Which region ("BAR", "PCI config space").
        what: &'static str,
        /// Offset of the access.
        offset: u64,
        /// Bytes accessed.
        width: u64,
        /// Size of the region.
        size: u64,
    },
    /// The device lacks something the caller asked for (a BAR, MSI-X vectors).
    #[error("{0}")]
    Unsupported(String),
    /// A VFIO device operation failed.
    #[error("VFIO: {what}: {detail}")]
    Vfio {
        /// The operation.
        what: &'static str,
        /// The error text from vfio-ioctls or the kernel.
        detail: String,
    },
    /// The device refused or failed an operation (an emulated device's injected fault, a
    /// failed function reset).
    #[error("{what} failed: {detail}")]
    Failed {
        /// The operation.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// A system call failed.
    #[error("{what} failed: {source}")]
    Os {
        /// The call.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// Opening the device's container or making its DMA view failed.
    #[error(transparent)]
    Share(#[from] ShareError),
}

/// One mapped BAR (device registers). Implementations must make each call exactly one access
/// of that width, as the device sees it.
pub trait Mmio: Send + Sync + std::fmt::Debug {
    /// The BAR's length in bytes.
    fn len(&self) -> usize;
    /// Always false: an empty BAR is never mapped.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads the 32-bit register at `offset`.
    fn read32(&self, offset: usize) -> Result<u32, DeviceError>;
    /// Writes the 32-bit register at `offset`.
    fn write32(&self, offset: usize, value: u32) -> Result<(), DeviceError>;
    /// Reads the 64-bit register at `offset` (one 8-byte access).
    fn read64(&self, offset: usize) -> Result<u64, DeviceError>;
    /// Writes the 64-bit register at `offset` (one 8-byte access).
    fn write64(&self, offset: usize, value: u64) -> Result<(), DeviceError>;
    /// Reads the 16-bit register at `offset` (virtio's common configuration has them).
    fn read16(&self, offset: usize) -> Result<u16, DeviceError>;
    /// Writes the 16-bit register at `offset`.
    fn write16(&self, offset: usize, value: u16) -> Result<(), DeviceError>;
    /// Reads the 8-bit register at `offset`.
    fn read8(&self, offset: usize) -> Result<u8, DeviceError>;
    /// Writes the 8-bit register at `offset`.
    fn write8(&self, offset: usize, value: u8) -> Result<(), DeviceError>;
}

/// Checks that an access of `width` bytes at `offset` lies inside a region of `size` bytes and
/// is naturally aligned; the one bounds rule every [`Mmio`] and config space shares.
pub fn check_access(
    what: &'static str,
    offset: u64,
    width: u64,
    size: u64,
) -> Result<(), DeviceError> {
    let fits = offset.checked_add(width).is_some_and(|end| end <= size);
    if !fits || offset % width != 0 {
        return Err(DeviceError::BadAccess {
            what,
            offset,
            width,
            size,
        });
    }
    Ok(())
}

/// One entry of a PCI capability list.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    /// The capability ID (e.g. [`config::CAP_MSIX`]).
    pub id: u8,
    /// Its offset in config space.
    pub offset: u16,
}

/// The seam: a PCI function as a driver sees it. See the module docs.
///
/// All methods take `&self` and may be called from several threads; read-modify-write
/// sequences ([`PciDevice::set_bus_master`]) are not atomic against other writers of the same
/// register (drivers serialise them).
pub trait PciDevice: Send + Sync + std::fmt::Debug {
    /// A name for errors and logs: the PCI address, or what the emulated device is.
    fn name(&self) -> &str;

    /// Reads `buf.len()` bytes of config space at `offset`.
    fn read_config(&self, offset: u16, buf: &mut [u8]) -> Result<(), DeviceError>;

    /// Writes `buf` to config space at `offset`.
    fn write_config(&self, offset: u16, buf: &[u8]) -> Result<(), DeviceError>;

    /// Maps BAR `index` (0-5) for register access.
    fn map_bar(&self, index: u8) -> Result<Arc<dyn Mmio>, DeviceError>;

    /// How many MSI-X vectors the device has (0 if none).
    fn msix_vectors(&self) -> u32;

    /// Routes MSI-X vectors `0..fds.len()` to these eventfds (vector i signals `fds[i]`).
    fn enable_msix(&self, fds: &[EventFd]) -> Result<(), DeviceError>;

    /// Stops MSI-X delivery (all vectors).
    fn disable_msix(&self) -> Result<(), DeviceError>;

    /// Resets the whole function (FLR or what the platform has). Stops any DMA. Blocking.
    fn function_reset(&self) -> Result<(), DeviceError>;

    /// The DMA view: the IOMMU domain (or host-shared space) this device's DMA goes through.
    /// A pool made over it hands out buffers this device can reach; buffers of another
    /// domain must be refused ([`crate::share::DeviceView::domain`]).
    fn dma_view(&self) -> Result<Arc<dyn DeviceView>, DeviceError>;

    /// Reads a little-endian `u8` from config space.
    fn read_config_u8(&self, offset: u16) -> Result<u8, DeviceError> {
        let mut b = [0u8; 1];
        self.read_config(offset, &mut b)?;
        Ok(b[0])
    }

    /// Reads a little-endian `u16` from config space.
    fn read_config_u16(&self, offset: u16) -> Result<u16, DeviceError> {
        let mut b = [0u8; 2];
        self.read_config(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Reads a little-endian `u32` from config space.
    fn read_config_u32(&self, offset: u16) -> Result<u32, DeviceError> {
        let mut b = [0u8; 4];
        self.read_config(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a little-endian `u16` to config space.
    fn write_config_u16(&self, offset: u16, value: u16) -> Result<(), DeviceError> {
        self.write_config(offset, &value.to_le_bytes())
    }

    /// The 24-bit class code (base class, subclass, programming interface).
    fn class_code(&self) -> Result<u32, DeviceError> {
        Ok(self.read_config_u32(config::CLASS_REVISION)? >> 8)
    }

    /// Sets (with memory decoding) or clears the COMMAND register's bus-master bit. With it
    /// clear the function cannot do DMA. Read-modify-write through config space.
    fn set_bus_master(&self, on: bool) -> Result<(), DeviceError> {
        let cmd = self.read_config_u16(config::COMMAND)?;
        let new = if on {
            cmd | config::COMMAND_MASTER | config::COMMAND_MEMORY
        } else {
            cmd & !config::COMMAND_MASTER
        };
        self.write_config_u16(config::COMMAND, new)?;
        if !on && self.read_config_u16(config::COMMAND)? & config::COMMAND_MASTER != 0 {
            return Err(DeviceError::Failed {
                what: "clearing bus mastering",
                detail: "the COMMAND register still has the bus-master bit set".into(),
            });
        }
        Ok(())
    }

    /// The capability list ([`walk_capabilities`] over this device's config space).
    fn capabilities(&self) -> Result<Vec<Capability>, DeviceError> {
        walk_capabilities(|offset, buf| self.read_config(offset, buf))
    }

    /// Makes `n` fresh non-blocking eventfds and routes MSI-X vectors `0..n` to them.
    fn enable_msix_eventfds(&self, n: usize) -> Result<Vec<EventFd>, DeviceError> {
        let fds = (0..n)
            .map(|_| {
                EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| DeviceError::Os {
                    what: "eventfd",
                    source: e,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.enable_msix(&fds)?;
        Ok(fds)
    }
}

/// Walks a PCI capability list through `read` (config-space reads), bounded and
/// loop-proof: a device-written list is untrusted. Pointers below 0x40, outside the 256-byte
/// space, or revisiting an offset end the walk with what was found so far (a corrupt list must
/// not hang or panic the driver); at most 48 entries (the most that fit).
pub fn walk_capabilities(
    mut read: impl FnMut(u16, &mut [u8]) -> Result<(), DeviceError>,
) -> Result<Vec<Capability>, DeviceError> {
    let mut b = [0u8; 2];
    read(config::STATUS, &mut b)?;
    if u16::from_le_bytes(b) & config::STATUS_CAPABILITIES == 0 {
        return Ok(Vec::new());
    }
    let mut p = [0u8; 1];
    read(config::CAPABILITIES_POINTER, &mut p)?;
    let mut next = u16::from(p[0] & !3);
    let mut seen = [false; 64];
    let mut out = Vec::new();
    while next >= 0x40 && next + 2 <= config::SPACE_BYTES && out.len() < 48 {
        let slot = usize::from(next / 4);
        if seen[slot] {
            break;
        }
        seen[slot] = true;
        read(next, &mut b)?;
        out.push(Capability {
            id: b[0],
            offset: next,
        });
        next = u16::from(b[1] & !3);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space_with(caps: &[(u16, u8, u8)]) -> [u8; 256] {
        let mut s = [0u8; 256];
        s[config::STATUS as usize] = config::STATUS_CAPABILITIES as u8;
        s[config::CAPABILITIES_POINTER as usize] = caps.first().map_or(0, |c| c.0 as u8);
        for &(at, id, next) in caps {
            s[at as usize] = id;
            s[at as usize + 1] = next;
        }
        s
    }

    fn reader(s: &[u8; 256]) -> impl FnMut(u16, &mut [u8]) -> Result<(), DeviceError> + '_ {
        move |off, buf| {
            let off = usize::from(off);
            buf.copy_from_slice(&s[off..off + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn walks_a_capability_list() {
        let s = space_with(&[(0x40, 0x11, 0x50), (0x50, 0x09, 0x60), (0x60, 0x09, 0)]);
        let caps = walk_capabilities(reader(&s)).unwrap();
        let ids: Vec<(u8, u16)> = caps.iter().map(|c| (c.id, c.offset)).collect();
        assert_eq!(ids, vec![(0x11, 0x40), (0x09, 0x50), (0x09, 0x60)]);
    }

    #[test]
    fn a_looping_or_wild_list_ends() {
        let s = space_with(&[(0x40, 0x11, 0x50), (0x50, 0x09, 0x40)]);
        assert_eq!(walk_capabilities(reader(&s)).unwrap().len(), 2);
        let s = space_with(&[(0x40, 0x11, 0x10)]); // points into the header
        assert_eq!(walk_capabilities(reader(&s)).unwrap().len(), 1);
        let s = space_with(&[(0xfc, 0x11, 0xff)]); // 0xff & !3 = 0xfc: revisits
        assert_eq!(walk_capabilities(reader(&s)).unwrap().len(), 1);
        let mut s = space_with(&[]);
        s[config::STATUS as usize] = 0;
        assert!(walk_capabilities(reader(&s)).unwrap().is_empty());
    }

    #[test]
    fn access_checks() {
        assert!(check_access("BAR", 0, 4, 16).is_ok());
        assert!(check_access("BAR", 12, 4, 16).is_ok());
        assert!(check_access("BAR", 14, 4, 16).is_err());
        assert!(check_access("BAR", 2, 4, 16).is_err());
        assert!(check_access("BAR", u64::MAX, 8, 16).is_err());
    }
}
