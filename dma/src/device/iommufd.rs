//! PCI functions bound to `vfio-pci`, opened through their VFIO **cdev**
//! (`/dev/vfio/devices/vfioN`) and attached to an iommufd IOAS: the iommufd implementation of
//! the [`PciDevice`] seam.
//!
//! Opening, in the kernel's required order: find the cdev (`/sys/bus/pci/devices/<bdf>/vfio-dev/
//! vfioN`), open it, `VFIO_DEVICE_BIND_IOMMUFD` to the IOAS's `/dev/iommu` file (the first ioctl
//! on a cdev must be this one), `VFIO_DEVICE_ATTACH_IOMMUFD_PT` to the IOAS. From then on the
//! device fd answers the same region, IRQ and reset ioctls as a type1 device fd, so config
//! space, BARs ([`Bar`]), MSI-X and reset behave exactly as in [`super::vfio::VfioDevice`].
//! Closing the fd unbinds the device; the IOAS and its mappings stay (they belong to
//! `/dev/iommu`, see [`crate::share::iommufd`]).
//!
//! ## Bindings
//! The cdev ioctls' structs come from `vfio-bindings`. `vfio-ioctls`' own cdev support (its
//! `vfio_cdev` feature) turns on its `kvm` feature and would pull KVM into this crate, so the
//! handful of device ioctls (bind, attach, region and IRQ info, SET_IRQS) are issued here; the
//! numbers are `_IO(VFIO_TYPE, VFIO_BASE + n)` from linux/vfio.h.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd, vfio_irq_info, vfio_irq_set,
    vfio_region_info, VFIO_BASE, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_TYPE,
};
use vmm_sys_util::eventfd::EventFd;

use super::vfio::{check_bound_to_vfio_pci, Bar, Bdf};
use super::vfio_fd::{self, Region};
use super::{config, DeviceError, Mmio, PciDevice};
use crate::share::iommufd::{Ioas, IommuHwInfo, IommufdView};
use crate::share::{DeviceView, ShareError};

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`: VFIO ioctls encode no size or direction.
const fn vfio_io(n: u32) -> u64 {
    ((VFIO_TYPE as u64) << 8) | (VFIO_BASE as u64 + n as u64)
}
const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
const VFIO_DEVICE_GET_IRQ_INFO: u64 = vfio_io(9);
const VFIO_DEVICE_SET_IRQS: u64 = vfio_io(10);
const VFIO_DEVICE_BIND_IOMMUFD: u64 = vfio_io(18);
const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u64 = vfio_io(19);

/// What to do when a device has no VFIO cdev.
const HINT_NO_CDEV: &str = "this kernel has no VFIO device cdevs (CONFIG_VFIO_DEVICE_CDEV, Linux \
     ≥ 6.6); use the VFIO type1 backend (TIDEPOOL_VFIO_BACKEND=type1)";

/// What a failed `VFIO_DEVICE_BIND_IOMMUFD` most likely means, by its errno.
fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        // vfio_df_open: a cdev is bound through one open file at a time.
        Some(libc::EINVAL) => {
            "the device is already open through another file (a VFIO cdev is bound once at a \
             time): another process, or a handle of this one still alive (a driver's background \
             task, such as an NVMe AsyncQueue's reaper until `close` returns)"
        }
        // vfio_device_block_group: the group is open through /dev/vfio/<group>.
        Some(libc::EBUSY) => {
            "its IOMMU group is open through /dev/vfio/<group> (the type1 backend), in this or \
             another process"
        }
        _ => "is every device of its IOMMU group bound to vfio-pci or to no driver?",
    }
}

/// The cdev of the VFIO device at `sysfs` (`<sysfs>/vfio-dev/vfioN` → `/dev/vfio/devices/vfioN`),
/// if the kernel made one.
pub fn cdev_path(sysfs: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sysfs.join("vfio-dev")).ok()?;
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| {
            name.strip_prefix("vfio")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
        })
        .map(|name| Path::new("/dev/vfio/devices").join(name))
}

/// One PCI function bound to `vfio-pci`, opened through its cdev and attached to an [`Ioas`].
///
/// Same behaviour as [`super::vfio::VfioDevice`]: all methods take `&self`, each is one
/// `pread`/`pwrite`/ioctl on the device fd. Dropping it closes the fd (the kernel unbinds it).
pub struct CdevDevice {
    bdf: Bdf,
    file: File,
    ioas: Arc<Ioas>,
    /// The iommufd device id `VFIO_DEVICE_BIND_IOMMUFD` returned.
    dev_id: u32,
    /// BAR0-5, ROM, config space (indices 0..=7), read once at open.
    regions: [Region; 8],
    msix_count: u32,
    vendor_id: u16,
    device_id: u16,
}

impl std::fmt::Debug for CdevDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CdevDevice")
            .field("bdf", &self.bdf)
            .field("dev_id", &self.dev_id)
            .field("ioas", &self.ioas.id())
            .field("vendor_id", &format_args!("{:#06x}", self.vendor_id))
            .field("device_id", &format_args!("{:#06x}", self.device_id))
            .finish_non_exhaustive()
    }
}

impl CdevDevice {
    /// Opens `bdf` in a new IOAS and returns it with the IOAS's view (made with `dma_mask`).
    /// Use [`Ioas`] directly to put several devices in one IOAS.
    pub fn open(bdf: &str, dma_mask: u64) -> Result<(CdevDevice, Arc<IommufdView>), DeviceError> {
        let ioas = Ioas::new()?;
        let device = CdevDevice::open_in(&ioas, bdf)?;
        let view = ioas.view(dma_mask)?;
        Ok((device, view))
    }

    /// Opens the PCI function `bdf` through its VFIO cdev, binds it to `ioas`'s `/dev/iommu`
    /// and attaches it to the IOAS. Checks, each with an error that says what to do: the address,
    /// that the device exists, that it is bound to `vfio-pci`, that it has a cdev, that the cdev
    /// opens (`EBUSY`: another process, or this one through the type1 group), and the bind and
    /// attach. Blocking; setup only.
    pub fn open_in(ioas: &Arc<Ioas>, bdf: &str) -> Result<CdevDevice, DeviceError> {
        let bdf = Bdf::parse(bdf)?;
        let sysfs = check_bound_to_vfio_pci(&bdf, |_| {
            format!("bind it with `tpsetup bind {bdf}` (as root)")
        })?;
        let device_err = |problem: String| DeviceError::Pci {
            bdf: bdf.to_string(),
            problem,
        };
        let cdev = cdev_path(&sysfs).ok_or_else(|| {
            device_err(format!(
                "has no VFIO cdev ({}/vfio-dev/vfioN is missing): {HINT_NO_CDEV}",
                sysfs.display()
            ))
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cdev)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EACCES | libc::EPERM | libc::ENOENT) => {
                    DeviceError::Share(ShareError::Permission {
                        path: cdev.display().to_string(),
                        hint: "run as root or give this user access to /dev/vfio/devices/*",
                    })
                }
                Some(libc::EBUSY) => device_err(format!(
                    "cannot open {}: busy; another process (or this one, through the type1 \
                     group /dev/vfio/<group>) has the device open",
                    cdev.display()
                )),
                _ => device_err(format!("cannot open {}: {e}", cdev.display())),
            })?;
        let dev_id = bind_iommufd(file.as_fd(), ioas.iommufd().as_raw_fd()).map_err(|e| {
            DeviceError::Vfio {
                what: "VFIO_DEVICE_BIND_IOMMUFD",
                detail: format!("{e}; {}", bind_hint(&e)),
            }
        })?;
        attach_pt(file.as_fd(), ioas.id()).map_err(|e| DeviceError::Vfio {
            what: "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
            detail: format!("{e} (IOAS {})", ioas.id()),
        })?;
        let mut regions = [Region::default(); 8];
        for (index, region) in regions.iter_mut().enumerate() {
            *region = region_info(file.as_fd(), index as u32).map_err(|e| DeviceError::Vfio {
                what: "VFIO_DEVICE_GET_REGION_INFO",
                detail: format!("region {index}: {e}"),
            })?;
        }
        let msix_count = irq_count(file.as_fd(), VFIO_PCI_MSIX_IRQ_INDEX).unwrap_or(0);
        let mut device = CdevDevice {
            bdf,
            file,
            ioas: Arc::clone(ioas),
            dev_id,
            regions,
            msix_count,
            vendor_id: 0,
            device_id: 0,
        };
        device.vendor_id = device.read_config_u16(config::VENDOR_ID)?;
        device.device_id = device.read_config_u16(config::DEVICE_ID)?;
        tracing::debug!(bdf = %device.bdf, dev_id, ioas = ioas.id(), "opened through the VFIO cdev");
        Ok(device)
    }

    /// The device's PCI address.
    pub fn bdf(&self) -> &Bdf {
        &self.bdf
    }

    /// PCI vendor id.
    pub fn vendor_id(&self) -> u16 {
        self.vendor_id
    }

    /// PCI device id.
    pub fn device_id(&self) -> u16 {
        self.device_id
    }

    /// The iommufd device id of the bind.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// The IOAS the device is attached to.
    pub fn ioas(&self) -> &Arc<Ioas> {
        &self.ioas
    }

    /// What the IOMMU in front of this device reports (`IOMMU_GET_HW_INFO`).
    pub fn iommu_hw_info(&self) -> Result<IommuHwInfo, DeviceError> {
        Ok(self.ioas.hw_info(self.dev_id)?)
    }

    /// Maps BAR `index` (0-5), as [`super::vfio::VfioDevice::bar`] does.
    pub fn bar(&self, index: u32) -> Result<Bar, DeviceError> {
        vfio_fd::map_bar(self.file.as_fd(), &self.bdf, index, |i| {
            self.regions[i as usize]
        })
    }
}

impl PciDevice for CdevDevice {
    fn name(&self) -> &str {
        self.bdf.as_str()
    }

    fn read_config(&self, offset: u16, buf: &mut [u8]) -> Result<(), DeviceError> {
        let config = self.regions[VFIO_PCI_CONFIG_REGION_INDEX as usize];
        vfio_fd::read_config(self.file.as_fd(), config, offset, buf)
    }

    fn write_config(&self, offset: u16, buf: &[u8]) -> Result<(), DeviceError> {
        let config = self.regions[VFIO_PCI_CONFIG_REGION_INDEX as usize];
        vfio_fd::write_config(self.file.as_fd(), config, offset, buf)
    }

    fn map_bar(&self, index: u8) -> Result<Arc<dyn Mmio>, DeviceError> {
        Ok(Arc::new(self.bar(u32::from(index))?))
    }

    fn msix_vectors(&self) -> u32 {
        self.msix_count
    }

    fn enable_msix(&self, fds: &[EventFd]) -> Result<(), DeviceError> {
        vfio_fd::check_msix_request(&self.bdf, fds.len(), self.msix_count)?;
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        set_irqs(
            self.file.as_fd(),
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            VFIO_PCI_MSIX_IRQ_INDEX,
            &raw,
        )
        .map_err(|e| DeviceError::Vfio {
            what: "enable MSI-X (VFIO_DEVICE_SET_IRQS)",
            detail: e.to_string(),
        })
    }

    fn disable_msix(&self) -> Result<(), DeviceError> {
        set_irqs(
            self.file.as_fd(),
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            VFIO_PCI_MSIX_IRQ_INDEX,
            &[],
        )
        .map_err(|e| DeviceError::Vfio {
            what: "disable MSI-X (VFIO_DEVICE_SET_IRQS)",
            detail: e.to_string(),
        })
    }

    /// `VFIO_DEVICE_RESET`, as for type1.
    fn function_reset(&self) -> Result<(), DeviceError> {
        vfio_fd::function_reset(self.file.as_fd())
    }

    /// The IOAS's view ([`Ioas::view`]; made with the full 64-bit mask if no one made it before).
    fn dma_view(&self) -> Result<Arc<dyn DeviceView>, DeviceError> {
        Ok(self.ioas.view(u64::MAX)?)
    }
}

/// Fails with the last OS error when an ioctl returned a negative value.
fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `VFIO_DEVICE_BIND_IOMMUFD`: returns the iommufd device id.
fn bind_iommufd(fd: BorrowedFd<'_>, iommufd: i32) -> io::Result<u32> {
    let mut bind = vfio_device_bind_iommufd {
        argsz: std::mem::size_of::<vfio_device_bind_iommufd>() as u32,
        flags: 0,
        iommufd,
        out_devid: 0,
        token_uuid_ptr: 0,
    };
    // SAFETY: `bind` is a valid vfio_device_bind_iommufd with its own size as argsz; the kernel
    // reads it and writes out_devid, nothing else of ours.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            VFIO_DEVICE_BIND_IOMMUFD as _,
            std::ptr::addr_of_mut!(bind),
        )
    })?;
    Ok(bind.out_devid)
}

/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` to the page table (IOAS) `pt_id`.
fn attach_pt(fd: BorrowedFd<'_>, pt_id: u32) -> io::Result<()> {
    let mut attach = vfio_device_attach_iommufd_pt {
        argsz: std::mem::size_of::<vfio_device_attach_iommufd_pt>() as u32,
        flags: 0,
        pt_id,
        pasid: 0,
    };
    // SAFETY: a valid struct with its own size as argsz; the kernel may write pt_id back.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            VFIO_DEVICE_ATTACH_IOMMUFD_PT as _,
            std::ptr::addr_of_mut!(attach),
        )
    })
}

/// `VFIO_DEVICE_GET_REGION_INFO` for `index` (capabilities not read).
fn region_info(fd: BorrowedFd<'_>, index: u32) -> io::Result<Region> {
    let mut info = vfio_region_info {
        argsz: std::mem::size_of::<vfio_region_info>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: a valid vfio_region_info with its own size as argsz; the kernel writes at most
    // argsz bytes into it (a longer capability chain only raises argsz in the reply).
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            VFIO_DEVICE_GET_REGION_INFO as _,
            std::ptr::addr_of_mut!(info),
        )
    })?;
    Ok(Region {
        size: info.size,
        offset: info.offset,
        flags: info.flags,
    })
}

/// `VFIO_DEVICE_GET_IRQ_INFO` for `index`: the vector count.
fn irq_count(fd: BorrowedFd<'_>, index: u32) -> io::Result<u32> {
    let mut info = vfio_irq_info {
        argsz: std::mem::size_of::<vfio_irq_info>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: a valid vfio_irq_info with its own size as argsz; the kernel fills it.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            VFIO_DEVICE_GET_IRQ_INFO as _,
            std::ptr::addr_of_mut!(info),
        )
    })?;
    Ok(info.count)
}

/// `VFIO_DEVICE_SET_IRQS` on `index` for vectors `0..fds.len()` (eventfds for
/// `DATA_EVENTFD`; none with `DATA_NONE` and an empty slice, which disables them all).
fn set_irqs(fd: BorrowedFd<'_>, flags: u32, index: u32, fds: &[i32]) -> io::Result<()> {
    let header = std::mem::size_of::<vfio_irq_set>();
    let argsz = header + std::mem::size_of_val(fds);
    // u32 words: aligned for the header's fields and the i32 data.
    let mut buf = vec![0u32; argsz.div_ceil(4)];
    let words = [
        argsz as u32,
        flags,
        index,
        0, // start
        fds.len() as u32,
    ];
    buf[..5].copy_from_slice(&words);
    for (slot, fd) in buf[header / 4..].iter_mut().zip(fds) {
        *slot = *fd as u32;
    }
    // SAFETY: `buf` holds a vfio_irq_set header (argsz, flags, index, start, count) followed by
    // `count` i32 eventfds, `argsz` bytes in all; the kernel only reads it.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), VFIO_DEVICE_SET_IRQS as _, buf.as_mut_ptr()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_failures_say_what_their_errno_means() {
        let hint = |errno| bind_hint(&std::io::Error::from_raw_os_error(errno));
        assert!(hint(libc::EINVAL).contains("already open"));
        assert!(hint(libc::EBUSY).contains("/dev/vfio/<group>"));
        assert!(hint(libc::EPERM).contains("bound to vfio-pci"));
    }

    #[test]
    fn ioctl_numbers_match_linux_vfio_h() {
        // ';' = 0x3b, VFIO_BASE = 100: _IO(';', 100 + n).
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(VFIO_DEVICE_GET_IRQ_INFO, 0x3b6d);
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD, 0x3b76);
        assert_eq!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, 0x3b77);
        assert_eq!(std::mem::size_of::<vfio_irq_set>(), 20);
    }

    #[test]
    fn finds_the_cdev_in_sysfs() {
        let dir = std::env::temp_dir().join(format!("tidepool-cdev-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(cdev_path(&dir), None, "no vfio-dev folder");
        std::fs::create_dir_all(dir.join("vfio-dev/other")).unwrap();
        assert_eq!(cdev_path(&dir), None, "no vfioN entry");
        std::fs::create_dir_all(dir.join("vfio-dev/vfiox")).unwrap();
        assert_eq!(cdev_path(&dir), None, "vfio + non-digits is not a cdev");
        std::fs::create_dir_all(dir.join("vfio-dev/vfio12")).unwrap();
        assert_eq!(
            cdev_path(&dir),
            Some(PathBuf::from("/dev/vfio/devices/vfio12"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
