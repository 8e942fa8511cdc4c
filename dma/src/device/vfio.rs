//! PCI functions bound to `vfio-pci`: the VFIO implementation of the [`PciDevice`] seam.
//!
//! A [`VfioDevice`] is one PCI function opened in a [`VfioContainer`] (one IOMMU domain): config
//! space through the VFIO config region, BARs mapped with `mmap` ([`Bar`], accessed only with
//! volatile loads and stores), MSI-X vectors routed to eventfds, `VFIO_DEVICE_RESET`. Its DMA
//! view is its container's [`VfioType1`] view, so every device opened in one container shares
//! one pool (the SPDK model), and a device opened into a container later sees the mappings
//! already there: the kernel replays a container's mappings into a group attached later.
//!
//! Opening checks each way a PCI function can be unusable and names the fix ([`Bdf::parse`],
//! [`VfioDevice::open_in`]).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR5_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioDevice as RawDevice, VfioError, VfioOps};
use vmm_sys_util::eventfd::EventFd;

use super::vfio_fd::{self, Region};
use super::{check_access, config, DeviceError, Mmio, PciDevice};
use crate::share::vfio::{borrow_fd, vfio_error, VfioContainer, VfioType1, HINT_NO_VFIO};
use crate::share::{DeviceView, ShareError};

/// A PCI address `domain:bus:device.function`, e.g. `0000:00:04.0`, validated.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Bdf(String);

impl Bdf {
    /// Parses `DDDD:BB:DD.F` (hex domain, bus and device, function 0-7) or the short
    /// `BB:DD.F`, which means domain 0. The result is always in the long, lower-case form that
    /// sysfs uses.
    ///
    /// ```
    /// use tidepool::device::vfio::Bdf;
    /// assert_eq!(Bdf::parse("00:04.0").unwrap().as_str(), "0000:00:04.0");
    /// assert!(Bdf::parse("0000:00:04.8").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Bdf, DeviceError> {
        let bad = || DeviceError::Pci {
            bdf: text.to_string(),
            problem: "not a PCI address: expected domain:bus:device.function in hex, like \
                      0000:00:04.0 (see `lspci -D`)"
                .into(),
        };
        let parts: Vec<&str> = text.trim().split(':').collect();
        let (domain, bus, devfn) = match parts.as_slice() {
            [d, b, df] => (*d, *b, *df),
            [b, df] => ("0000", *b, *df),
            _ => return Err(bad()),
        };
        let (dev, func) = devfn.split_once('.').ok_or_else(bad)?;
        let hex = |s: &str, digits: usize, max: u32| -> Option<u32> {
            if s.len() != digits || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            u32::from_str_radix(s, 16).ok().filter(|&v| v <= max)
        };
        let domain = hex(domain, 4, 0xffff).ok_or_else(bad)?;
        let bus = hex(bus, 2, 0xff).ok_or_else(bad)?;
        let dev = hex(dev, 2, 0x1f).ok_or_else(bad)?;
        let func = hex(func, 1, 7).ok_or_else(bad)?;
        Ok(Bdf(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}")))
    }

    /// The address as text, `0000:00:04.0`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `/sys/bus/pci/devices/<bdf>`.
    pub fn sysfs_path(&self) -> PathBuf {
        Path::new("/sys/bus/pci/devices").join(&self.0)
    }
}

impl std::fmt::Display for Bdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of the driver bound to the device at `sysfs`, if any.
pub(super) fn current_driver(sysfs: &Path) -> Option<String> {
    let link = std::fs::read_link(sysfs.join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// The first checks of both VFIO backends' open: that the PCI function `bdf` exists and is bound
/// to `vfio-pci`. Returns its sysfs folder; `bind_hint` (given that folder) says how to bind it.
pub(super) fn check_bound_to_vfio_pci(
    bdf: &Bdf,
    bind_hint: impl FnOnce(&Path) -> String,
) -> Result<PathBuf, DeviceError> {
    let sysfs = bdf.sysfs_path();
    let device_err = |problem: String| DeviceError::Pci {
        bdf: bdf.to_string(),
        problem,
    };
    if !sysfs.exists() {
        return Err(device_err(format!(
            "no such PCI device ({} does not exist); list devices with `lspci -D`",
            sysfs.display()
        )));
    }
    match current_driver(&sysfs).as_deref() {
        Some("vfio-pci") => Ok(sysfs),
        other => {
            let now = other.map_or("no driver".to_string(), |d| format!("driver {d}"));
            let hint = bind_hint(&sysfs);
            Err(device_err(format!("bound to {now}, not vfio-pci; {hint}")))
        }
    }
}

/// The IOMMU group number of the device at `sysfs`, if it has one.
pub(super) fn iommu_group(sysfs: &Path) -> Option<u32> {
    let link = std::fs::read_link(sysfs.join("iommu_group")).ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// "0000:00:04.0 (vfio-pci), 0000:00:04.1 (nvme)" for the devices in an IOMMU group.
pub(super) fn group_members(group: u32) -> String {
    let dir = format!("/sys/kernel/iommu_groups/{group}/devices");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return format!("(cannot list {dir})");
    };
    let mut members: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let driver = current_driver(&e.path()).unwrap_or_else(|| "no driver".into());
            format!("{name} ({driver})")
        })
        .collect();
    members.sort();
    members.join(", ")
}

/// One PCI function bound to `vfio-pci`, opened in a [`VfioContainer`].
///
/// Dropping it closes the device; the container lives on while other devices or its view hold
/// it. All methods take `&self` and are safe to call from several threads (each is one
/// `pread`/`pwrite`/ioctl on the device fd); read-modify-write sequences such as
/// [`VfioDevice::enable_bus_master`] are not atomic against other writers of the same register.
pub struct VfioDevice {
    bdf: Bdf,
    raw: RawDevice,
    container: Arc<VfioContainer>,
    vendor_id: u16,
    device_id: u16,
}

impl std::fmt::Debug for VfioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioDevice")
            .field("bdf", &self.bdf)
            .field("vendor_id", &format_args!("{:#06x}", self.vendor_id))
            .field("device_id", &format_args!("{:#06x}", self.device_id))
            .finish_non_exhaustive()
    }
}

impl VfioDevice {
    /// Opens `bdf` in a new container and returns it with the container's view (made with
    /// `dma_mask`). Use [`VfioContainer`] directly to put several devices in one container.
    ///
    /// ```no_run
    /// use tidepool::device::vfio::VfioDevice;
    /// use tidepool::share::DeviceView;
    /// let (nvme, view) = VfioDevice::open("0000:00:04.0", u64::MAX)?;
    /// println!("{:04x}:{:04x}, {} mappings left", nvme.vendor_id(), nvme.device_id(),
    ///          view.usage().mapping_limit.unwrap_or(0));
    /// # Ok::<(), tidepool::device::DeviceError>(())
    /// ```
    pub fn open(bdf: &str, dma_mask: u64) -> Result<(VfioDevice, Arc<VfioType1>), DeviceError> {
        let container = VfioContainer::new()?;
        let device = VfioDevice::open_in(&container, bdf)?;
        let view = container.view(dma_mask)?;
        Ok((device, view))
    }

    /// Opens the PCI function `bdf` into `container` (one IOMMU domain; several devices may share
    /// it, and then see the same mappings).
    ///
    /// Checks, each with an error that says what to do: the address format, that the device
    /// exists, that it is bound to `vfio-pci`, that it has an IOMMU group, that
    /// `/dev/vfio/<group>` can be opened and that the group is viable (every device in it bound
    /// to vfio-pci or to no driver). The first device opened sets the container's IOMMU type
    /// (type1v2). Devices of a group already in this container reuse it. Blocking; setup only.
    pub fn open_in(container: &Arc<VfioContainer>, bdf: &str) -> Result<VfioDevice, DeviceError> {
        let bdf = Bdf::parse(bdf)?;
        let sysfs = check_bound_to_vfio_pci(&bdf, |sysfs| {
            format!(
                "bind it as root: `modprobe vfio-pci; \
                 echo vfio-pci > {p}/driver_override; \
                 echo {bdf} > {p}/driver/unbind; echo {bdf} > /sys/bus/pci/drivers_probe`",
                p = sysfs.display()
            )
        })?;
        let device_err = |problem: String| DeviceError::Pci {
            bdf: bdf.to_string(),
            problem,
        };
        let group = iommu_group(&sysfs).ok_or_else(|| {
            device_err(
                "has no IOMMU group: the IOMMU is off or absent; boot with intel_iommu=on \
                 (or amd_iommu=on), or use the no-IOMMU backend"
                    .into(),
            )
        })?;
        let ops: Arc<dyn VfioOps> = container.raw_container().clone();
        let raw = RawDevice::new(&sysfs, ops, false).map_err(|e| match e {
            VfioError::GroupViable => device_err(format!(
                "IOMMU group {group} is not viable: every device in it must be bound to \
                 vfio-pci or to no driver; now: {}",
                group_members(group)
            )),
            // The group file opens once per process: vfio-ioctls reuses it for a second
            // device of the same group, so EBUSY means another process or container has it.
            VfioError::OpenGroup(e, _) => match e.kind() {
                io::ErrorKind::PermissionDenied | io::ErrorKind::NotFound => {
                    DeviceError::Share(ShareError::Permission {
                        path: format!("/dev/vfio/{group}"),
                        hint: HINT_NO_VFIO,
                    })
                }
                _ => device_err(format!(
                    "cannot open /dev/vfio/{group}: {e}; is another process or container \
                     using this IOMMU group?"
                )),
            },
            e => vfio_device_error("open device", e),
        })?;
        let mut device = VfioDevice {
            bdf,
            raw,
            container: Arc::clone(container),
            vendor_id: 0,
            device_id: 0,
        };
        device.vendor_id = device.read_config_u16(config::VENDOR_ID)?;
        device.device_id = device.read_config_u16(config::DEVICE_ID)?;
        Ok(device)
    }

    /// The device's PCI address.
    pub fn bdf(&self) -> &Bdf {
        &self.bdf
    }

    /// PCI vendor id (config offset 0).
    pub fn vendor_id(&self) -> u16 {
        self.vendor_id
    }

    /// PCI device id (config offset 2).
    pub fn device_id(&self) -> u16 {
        self.device_id
    }

    /// The container the device is in.
    pub fn container(&self) -> &Arc<VfioContainer> {
        &self.container
    }

    /// Maps BAR `index` (0-5) into this process. The BAR must be memory (not I/O ports) and
    /// mmappable; the mapping stays valid after the device is dropped, until the [`Bar`] is.
    pub fn bar(&self, index: u32) -> Result<Bar, DeviceError> {
        vfio_fd::map_bar(self.device_fd(), &self.bdf, index, |i| self.region(i))
    }

    /// The underlying vfio-ioctls device, for what this wrapper does not cover.
    pub fn raw(&self) -> &RawDevice {
        &self.raw
    }

    fn device_fd(&self) -> BorrowedFd<'_> {
        borrow_fd(self.raw.as_raw_fd(), self)
    }

    /// Region `index` of the device fd, as vfio-ioctls read it at open.
    fn region(&self, index: u32) -> Region {
        Region {
            size: self.raw.get_region_size(index),
            offset: self.raw.get_region_offset(index),
            flags: self.raw.get_region_flags(index),
        }
    }
}

impl PciDevice for VfioDevice {
    fn name(&self) -> &str {
        self.bdf.as_str()
    }

    /// Reads `buf.len()` bytes of PCI config space at `offset` (VFIO region 7).
    fn read_config(&self, offset: u16, buf: &mut [u8]) -> Result<(), DeviceError> {
        let config = self.region(VFIO_PCI_CONFIG_REGION_INDEX);
        vfio_fd::read_config(self.device_fd(), config, offset, buf)
    }

    /// Writes `buf` to PCI config space at `offset`. VFIO filters what may be written
    /// (it virtualises BARs and the MSI/MSI-X capabilities).
    fn write_config(&self, offset: u16, buf: &[u8]) -> Result<(), DeviceError> {
        let config = self.region(VFIO_PCI_CONFIG_REGION_INDEX);
        vfio_fd::write_config(self.device_fd(), config, offset, buf)
    }

    fn map_bar(&self, index: u8) -> Result<Arc<dyn Mmio>, DeviceError> {
        Ok(Arc::new(self.bar(u32::from(index))?))
    }

    fn msix_vectors(&self) -> u32 {
        self.raw
            .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
            .map_or(0, |irq| irq.count)
    }

    fn enable_msix(&self, fds: &[EventFd]) -> Result<(), DeviceError> {
        vfio_fd::check_msix_request(&self.bdf, fds.len(), self.msix_vectors())?;
        self.raw
            .enable_msix(fds.iter().collect())
            .map_err(|e| vfio_device_error("enable MSI-X", e))
    }

    fn disable_msix(&self) -> Result<(), DeviceError> {
        self.raw
            .disable_msix()
            .map_err(|e| vfio_device_error("disable MSI-X", e))
    }

    /// `VFIO_DEVICE_RESET`: FLR, PM or bus reset, whichever the kernel has for the function.
    /// Blocking (up to ~100 ms for an FLR).
    fn function_reset(&self) -> Result<(), DeviceError> {
        vfio_fd::function_reset(self.device_fd())
    }

    /// The container's view ([`VfioContainer::view`]; made with the full 64-bit mask if no
    /// one made it before).
    fn dma_view(&self) -> Result<Arc<dyn DeviceView>, DeviceError> {
        Ok(self.container.view(u64::MAX)?)
    }
}

/// Turns a vfio-ioctls device error into ours, with its whole source chain.
fn vfio_device_error(what: &'static str, e: VfioError) -> DeviceError {
    match vfio_error(what, e) {
        ShareError::Vfio { what, detail } => DeviceError::Vfio { what, detail },
        other => DeviceError::Share(other),
    }
}

/// Maps `len` bytes of a device-fd region at file offset `offset`, shared, read-write.
pub(super) fn mmap_region(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<NonNull<u8>> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: a fresh mapping (addr NULL) of a device region; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))
}

/// A mapped PCI BAR: device registers, accessed only with volatile loads and stores.
///
/// Every accessor checks that the access lies inside the BAR and is naturally aligned, and
/// returns [`DeviceError::BadAccess`] otherwise. [`Bar::as_ptr`] gives the base for drivers that
/// precompute doorbell addresses; they take on those checks themselves.
#[derive(Debug)]
pub struct Bar {
    ptr: NonNull<u8>,
    len: usize,
    index: u32,
}

// SAFETY: the Bar owns an MMIO mapping, not Rust data; volatile accesses from any thread are
// what the hardware sees, and nothing in it is tied to a thread.
unsafe impl Send for Bar {}
// SAFETY: every access through `&Bar` is a single volatile load or store to device registers;
// the device, not Rust, defines what concurrent accesses mean.
unsafe impl Sync for Bar {}

impl Bar {
    /// Maps region `index` of a VFIO device fd (size, flags and file offset from
    /// `VFIO_DEVICE_GET_REGION_INFO`) as a BAR; `name` is the device for errors. Both VFIO
    /// backends map BARs this way.
    pub(super) fn map(
        fd: BorrowedFd<'_>,
        name: &str,
        index: u32,
        size: u64,
        flags: u32,
        offset: u64,
    ) -> Result<Bar, DeviceError> {
        let bad = |why: &str| DeviceError::Unsupported(format!("BAR{index} of {name}: {why}"));
        if index > VFIO_PCI_BAR5_REGION_INDEX {
            return Err(bad("BAR index must be 0-5"));
        }
        if size == 0 {
            return Err(bad("not implemented by the device"));
        }
        if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(bad("VFIO does not allow mmap of it (I/O port BAR?)"));
        }
        let len = usize::try_from(size).map_err(|_| bad("too large to map"))?;
        let ptr = mmap_region(fd, len, offset).map_err(|e| DeviceError::Os {
            what: "mmap of a BAR",
            source: e,
        })?;
        Ok(Bar { ptr, len, index })
    }

    /// The BAR's index (0-5).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The base of the mapping. Accesses through it must be volatile, aligned and in bounds.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// A pointer to a `T` at `offset`, if it lies inside the BAR and is aligned.
    fn at<T>(&self, offset: usize) -> Result<*mut T, DeviceError> {
        let width = std::mem::size_of::<T>() as u64;
        check_access("BAR", offset as u64, width, self.len as u64)?;
        Ok(self.ptr.as_ptr().wrapping_add(offset).cast())
    }
}

/// Generates the [`Mmio`] accessors of [`Bar`]: one volatile access of the type's width each.
macro_rules! bar_access {
    ($($read:ident, $write:ident, $t:ty);*) => {$(
        fn $read(&self, offset: usize) -> Result<$t, DeviceError> {
            let p = self.at::<$t>(offset)?;
            // SAFETY: `at` checked that p is inside the mapping and naturally aligned.
            Ok(unsafe { p.read_volatile() })
        }
        fn $write(&self, offset: usize, value: $t) -> Result<(), DeviceError> {
            let p = self.at::<$t>(offset)?;
            // SAFETY: `at` checked that p is inside the mapping and naturally aligned.
            unsafe { p.write_volatile(value) };
            Ok(())
        }
    )*};
}

impl Mmio for Bar {
    fn len(&self) -> usize {
        self.len
    }
    bar_access!(read8, write8, u8; read16, write16, u16; read32, write32, u32; read64, write64, u64);
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: ptr/len is exactly the mapping made in `mmap_region`, owned by this Bar; no
        // access through it can happen after drop (as_ptr users must not outlive the Bar).
        let r = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        debug_assert_eq!(r, 0, "munmap of a BAR failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_parsing() {
        assert_eq!(Bdf::parse("0000:00:04.0").unwrap().as_str(), "0000:00:04.0");
        assert_eq!(Bdf::parse("0000:AF:1f.7").unwrap().as_str(), "0000:af:1f.7");
        assert_eq!(Bdf::parse("3b:00.1").unwrap().as_str(), "0000:3b:00.1");
        for bad in [
            "",
            "0000:00:04",
            "0000:00:20.0", // device > 0x1f
            "0000:00:04.8", // function > 7
            "000:00:04.0",
            "0000:000:04.0",
            "0000:00:04.0.1",
            "zzzz:00:04.0",
            "0:0:0:0.0",
            "/dev/../0000:00:04.0",
        ] {
            assert!(
                matches!(Bdf::parse(bad), Err(DeviceError::Pci { .. })),
                "{bad:?} accepted"
            );
        }
        assert_eq!(
            Bdf::parse("0000:00:04.0").unwrap().sysfs_path(),
            Path::new("/sys/bus/pci/devices/0000:00:04.0")
        );
    }

    #[test]
    fn a_missing_function_is_named_before_the_bind_hint_is_made() {
        let bdf = Bdf::parse("ffff:ff:1f.7").unwrap();
        match check_bound_to_vfio_pci(&bdf, |_| panic!("asked for a bind hint")) {
            Err(DeviceError::Pci { bdf, problem }) => {
                assert_eq!(bdf, "ffff:ff:1f.7");
                assert!(problem.contains("no such PCI device"), "{problem}");
            }
            other => panic!("expected a missing-device error, got {other:?}"),
        }
    }

    #[test]
    fn missing_vfio_is_a_permission_error_with_a_hint() {
        // These machines have no /dev/vfio; inside the VM this test is not run.
        if Path::new("/dev/vfio/vfio").exists() {
            eprintln!("skipping: /dev/vfio/vfio exists here");
            return;
        }
        match VfioContainer::new() {
            Err(ShareError::Permission { path, hint }) => {
                assert_eq!(path, "/dev/vfio/vfio");
                assert!(hint.contains("vfio-pci"), "{hint}");
            }
            other => panic!("expected a permission error, got {other:?}"),
        }
    }

    #[test]
    fn missing_device_and_wrong_driver_are_named() {
        let Ok(container) = VfioContainer::new() else {
            // Without /dev/vfio we cannot get a container; check the sysfs helpers directly.
            assert_eq!(current_driver(Path::new("/nonexistent")), None);
            assert_eq!(iommu_group(Path::new("/nonexistent")), None);
            return;
        };
        match VfioDevice::open_in(&container, "ffff:ff:1f.7") {
            Err(DeviceError::Pci { problem, .. }) => {
                assert!(problem.contains("no such PCI device"), "{problem}")
            }
            other => panic!("expected a missing-device error, got {other:?}"),
        }
    }
}
