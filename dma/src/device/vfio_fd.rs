//! What both VFIO backends do the same way over an open VFIO device fd.
//!
//! A type1 device fd ([`super::vfio::VfioDevice`]) and a cdev device fd
//! ([`super::iommufd::CdevDevice`]) answer the same region, IRQ and reset ABI once opened; they
//! differ in how they are opened and where their region table comes from (vfio-ioctls for
//! type1, our own `VFIO_DEVICE_GET_REGION_INFO` for the cdev). Given the fd and a [`Region`],
//! the PCI plumbing is one piece of code, here: config space through the config region, BAR
//! mapping, the MSI-X request check and `VFIO_DEVICE_RESET`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_PCI_BAR5_REGION_INDEX, VFIO_TYPE};

use super::vfio::{Bar, Bdf};
use super::DeviceError;

/// `VFIO_DEVICE_RESET` = `_IO(VFIO_TYPE, VFIO_BASE + 11)`.
const VFIO_DEVICE_RESET: u64 = ((VFIO_TYPE as u64) << 8) | (VFIO_BASE as u64 + 11);

/// One region of a VFIO device fd, as `VFIO_DEVICE_GET_REGION_INFO` describes it.
#[derive(Copy, Clone, Debug, Default)]
pub(super) struct Region {
    /// Bytes in the region (0: not implemented by the device).
    pub(super) size: u64,
    /// Where the region starts in the device fd's file offsets.
    pub(super) offset: u64,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub(super) flags: u32,
}

/// The device-fd file offset of config-space `offset`, checked against the config region.
fn config_offset(config: Region, offset: u16, len: usize) -> Result<u64, DeviceError> {
    let offset = u64::from(offset);
    if offset
        .checked_add(len as u64)
        .is_none_or(|end| end > config.size)
    {
        return Err(DeviceError::BadAccess {
            what: "PCI config space",
            offset,
            width: len as u64,
            size: config.size,
        });
    }
    Ok(config.offset + offset)
}

/// Reads `buf.len()` bytes of PCI config space at `offset` through the config region `config`
/// of the device fd `fd`.
pub(super) fn read_config(
    fd: BorrowedFd<'_>,
    config: Region,
    offset: u16,
    buf: &mut [u8],
) -> Result<(), DeviceError> {
    let len = buf.len();
    config_io(config, offset, len, "pread of PCI config space", |at| {
        nix::sys::uio::pread(fd, buf, at)
    })
}

/// Writes `buf` to PCI config space at `offset` through the config region `config` of the
/// device fd `fd`. VFIO filters what may be written (it virtualises BARs and the MSI/MSI-X
/// capabilities).
pub(super) fn write_config(
    fd: BorrowedFd<'_>,
    config: Region,
    offset: u16,
    buf: &[u8],
) -> Result<(), DeviceError> {
    config_io(
        config,
        offset,
        buf.len(),
        "pwrite of PCI config space",
        |at| nix::sys::uio::pwrite(fd, buf, at),
    )
}

/// One `len`-byte config-space access at `offset`: checked against the region, then `io` (a
/// `pread` or `pwrite`, `what`) at the file offset, which must move every byte.
fn config_io(
    config: Region,
    offset: u16,
    len: usize,
    what: &'static str,
    io: impl FnOnce(libc::off_t) -> nix::Result<usize>,
) -> Result<(), DeviceError> {
    let at = config_offset(config, offset, len)?;
    let n = io(at as libc::off_t).map_err(|e| DeviceError::Os {
        what,
        source: e.into(),
    })?;
    short_io(n, len, what)
}

/// Checks a `pread`/`pwrite` moved every byte.
fn short_io(done: usize, wanted: usize, what: &'static str) -> Result<(), DeviceError> {
    if done == wanted {
        return Ok(());
    }
    Err(DeviceError::Os {
        what,
        source: io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("moved {done} of {wanted} bytes"),
        ),
    })
}

/// Maps BAR `index` (0-5) of `bdf`'s device fd; `region` looks up a valid index's region.
pub(super) fn map_bar(
    fd: BorrowedFd<'_>,
    bdf: &Bdf,
    index: u32,
    region: impl FnOnce(u32) -> Region,
) -> Result<Bar, DeviceError> {
    if index > VFIO_PCI_BAR5_REGION_INDEX {
        return Err(DeviceError::Unsupported(format!(
            "BAR{index} of {bdf}: BAR index must be 0-5"
        )));
    }
    let r = region(index);
    Bar::map(fd, bdf.as_str(), index, r.size, r.flags, r.offset)
}

/// Checks a request for `asked` MSI-X vectors against the `available` ones of `bdf`.
pub(super) fn check_msix_request(
    bdf: &Bdf,
    asked: usize,
    available: u32,
) -> Result<(), DeviceError> {
    if asked == 0 || asked as u64 > u64::from(available) {
        return Err(DeviceError::Unsupported(format!(
            "asked for {asked} MSI-X vectors, {bdf} has {available}"
        )));
    }
    Ok(())
}

/// `VFIO_DEVICE_RESET` of the device fd `fd`: FLR, PM or bus reset, whichever the kernel has
/// for the function. Blocking (up to ~100 ms for an FLR).
pub(super) fn function_reset(fd: BorrowedFd<'_>) -> Result<(), DeviceError> {
    ioctl_device_reset(fd).map_err(|e| DeviceError::Vfio {
        what: "VFIO_DEVICE_RESET",
        detail: format!("{e}; the device may not support function reset"),
    })
}

/// The raw `VFIO_DEVICE_RESET` ioctl.
fn ioctl_device_reset(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: VFIO_DEVICE_RESET takes no argument and touches no memory of ours.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), VFIO_DEVICE_RESET as _) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_offsets_are_checked_against_the_region() {
        let config = Region {
            size: 256,
            offset: 0x7000_0000_0000,
            flags: 0,
        };
        assert_eq!(config_offset(config, 0, 2).unwrap(), 0x7000_0000_0000);
        assert_eq!(config_offset(config, 252, 4).unwrap(), 0x7000_0000_00fc);
        assert!(matches!(
            config_offset(config, 254, 4),
            Err(DeviceError::BadAccess { size: 256, .. })
        ));
        assert!(config_offset(config, u16::MAX, usize::MAX).is_err());
    }

    #[test]
    fn config_reads_and_writes_go_through_the_region_and_must_be_whole() {
        // A plain file stands in for the device fd: the region starts at file offset 128.
        let path = std::env::temp_dir().join(format!("tidepool-vfio-fd-{}", std::process::id()));
        std::fs::write(&path, [0u8; 128 + 256]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let fd = std::os::fd::AsFd::as_fd(&file);
        let config = Region {
            size: 256,
            offset: 128,
            flags: 0,
        };
        write_config(fd, config, 4, &[0x06, 0x04]).unwrap();
        let mut got = [0u8; 2];
        read_config(fd, config, 4, &mut got).unwrap();
        assert_eq!(got, [0x06, 0x04]);
        assert_eq!(std::fs::read(&path).unwrap()[132..134], [0x06, 0x04]);
        assert!(matches!(
            read_config(fd, config, 255, &mut got),
            Err(DeviceError::BadAccess { .. })
        ));
        // A region that runs past the end of the file: the read comes back short.
        let past = Region {
            size: 4096,
            ..config
        };
        match read_config(fd, past, 300, &mut got) {
            Err(DeviceError::Os { what, source }) => {
                assert_eq!(what, "pread of PCI config space");
                assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
            }
            other => panic!("expected a short read, got {other:?}"),
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn msix_requests_must_fit() {
        let bdf = Bdf::parse("0000:00:04.0").unwrap();
        assert!(check_msix_request(&bdf, 1, 4).is_ok());
        assert!(check_msix_request(&bdf, 4, 4).is_ok());
        match check_msix_request(&bdf, 5, 4) {
            Err(DeviceError::Unsupported(why)) => {
                assert_eq!(why, "asked for 5 MSI-X vectors, 0000:00:04.0 has 4")
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
        assert!(check_msix_request(&bdf, 0, 4).is_err());
    }

    #[test]
    fn bar_indices_past_five_are_refused_before_the_lookup() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsFd::as_fd(&null);
        let bdf = Bdf::parse("0000:00:04.0").unwrap();
        let err = map_bar(fd, &bdf, 6, |_| panic!("looked up BAR6")).unwrap_err();
        assert!(err.to_string().contains("BAR index must be 0-5"), "{err}");
        let err = map_bar(fd, &bdf, 0, |_| Region::default()).unwrap_err();
        assert!(err.to_string().contains("not implemented"), "{err}");
    }
}
