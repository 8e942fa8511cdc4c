//! Raw device access for VM tests: a BAR mmapped from a VFIO device fd ([`MmioRegion`]) and PCI
//! config space read/write through the VFIO config region ([`ConfigSpace`]).
//!
//! `vfio-ioctls` describes regions but does not mmap them, and its `region_read/write` swallow
//! errors; these small types do both with checked errors. Register accesses are single, aligned,
//! volatile 32-bit loads and stores (NVMe and virtio registers must not be split or merged), and
//! every access is bounds-checked against the region, so a wrong offset cannot touch memory
//! outside the mapping. Tidepool's own VFIO layer (`dma/src/share/vfio.rs`) will replace this for
//! drivers; tests keep it so that they check the hardware independently of that layer.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;

use vfio_bindings::bindings::vfio::{VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP};
use vfio_ioctls::VfioDevice;

/// Why a BAR could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The region is empty, too small, or not mmappable.
    #[error("BAR{index} cannot be mmapped for registers: size {size:#x}, flags {flags:#x} (want an mmappable region of at least {min:#x} bytes; is {index} the right BAR?)")]
    UnusableBar {
        /// The VFIO region index.
        index: u32,
        /// Its size.
        size: u64,
        /// Its VFIO_REGION_INFO_FLAG_* flags.
        flags: u32,
        /// The size the caller asked for at least.
        min: u64,
    },
    /// mmap itself failed.
    #[error(
        "mmap of BAR{index} ({size:#x} bytes at device-fd offset {offset:#x}) failed: {source}"
    )]
    Mmap {
        /// The VFIO region index.
        index: u32,
        /// Its size.
        size: u64,
        /// Its offset in the device fd.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A device register region (a BAR) mmapped from a VFIO device fd. Offers only volatile, aligned
/// 32-bit accesses inside its bounds.
#[derive(Debug)]
pub struct MmioRegion {
    ptr: NonNull<u8>,
    len: usize,
}

impl MmioRegion {
    /// Mmaps VFIO region `index` of `device` (a BAR) read/write and shared; fails unless the
    /// region is mmappable and at least `min_size` bytes long.
    pub fn map_bar(
        device: &VfioDevice,
        index: u32,
        min_size: u64,
    ) -> Result<MmioRegion, MmioError> {
        let size = device.get_region_size(index);
        let flags = device.get_region_flags(index);
        let offset = device.get_region_offset(index);
        if size == 0 || size < min_size || flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(MmioError::UnusableBar {
                index,
                size,
                flags,
                min: min_size,
            });
        }
        let mmap_err = |source| MmioError::Mmap {
            index,
            size,
            offset,
            source,
        };
        let len = usize::try_from(size)
            .map_err(|_| mmap_err(io::Error::other("size exceeds the address space")))?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| mmap_err(io::Error::other("offset too large")))?;
        let ptr = mmap_shared(device.as_raw_fd(), len, off).map_err(mmap_err)?;
        Ok(MmioRegion { ptr, len })
    }

    /// The length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never true for a mapped BAR).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether a 4-byte access at `offset` is aligned and inside the region.
    fn fits32(&self, offset: usize) -> bool {
        offset & 3 == 0 && matches!(offset.checked_add(4), Some(end) if end <= self.len)
    }

    /// Reads the 32-bit register at byte `offset`. An unaligned or out-of-bounds offset reads
    /// all ones, like a PCI read of nothing.
    pub fn read32(&self, offset: usize) -> u32 {
        if !self.fits32(offset) {
            return u32::MAX;
        }
        // SAFETY: `offset + 4 <= len`, the offset is 4-byte aligned and the base page aligned, and
        // the mapping is live while `self` is. Device registers take one volatile access.
        unsafe { self.ptr.as_ptr().add(offset).cast::<u32>().read_volatile() }
    }

    /// Writes the 32-bit register at byte `offset`. An unaligned or out-of-bounds offset is
    /// ignored and returns false.
    pub fn write32(&self, offset: usize, value: u32) -> bool {
        if !self.fits32(offset) {
            return false;
        }
        // SAFETY: as in `read32`; the mapping is writable (PROT_WRITE, MAP_SHARED).
        unsafe {
            self.ptr
                .as_ptr()
                .add(offset)
                .cast::<u32>()
                .write_volatile(value)
        };
        true
    }

    /// Reads a 64-bit register as two 32-bit reads, low half first (the order NVMe requires of
    /// hosts that split 64-bit accesses).
    pub fn read64(&self, offset: usize) -> u64 {
        u64::from(self.read32(offset)) | u64::from(self.read32(offset + 4)) << 32
    }

    /// Writes a 64-bit register as two 32-bit writes, low half first.
    pub fn write64(&self, offset: usize, value: u64) -> bool {
        self.write32(offset, value as u32) && self.write32(offset + 4, (value >> 32) as u32)
    }
}

impl Drop for MmioRegion {
    /// Unmaps the BAR.
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map_bar`; no reference into it exists
        // (accesses go through `&self` methods that copy values out).
        unsafe { libc::munmap(self.ptr.as_ptr().cast::<c_void>(), self.len) };
    }
}

/// Maps `len` bytes of `fd` at `offset`, shared, read/write.
fn mmap_shared(fd: RawFd, len: usize, offset: libc::off_t) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh mapping at an address the kernel chooses, so no existing memory is
    // replaced; the result is checked before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))
}

/// PCI config space of a VFIO device, read and written with pread/pwrite on the device fd at the
/// config region's offset (VFIO region 7).
pub struct ConfigSpace<'a> {
    device: &'a VfioDevice,
    base: u64,
}

/// The PCI Command register offset and its Bus Master Enable bit.
pub const PCI_COMMAND: u64 = 0x04;
/// Bus Master Enable: without it the device's DMA is blocked before it reaches the IOMMU.
pub const PCI_COMMAND_MASTER: u16 = 0x4;

impl<'a> ConfigSpace<'a> {
    /// The config space of `device`.
    pub fn new(device: &'a VfioDevice) -> Self {
        ConfigSpace {
            device,
            base: device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX),
        }
    }

    /// Reads `buf.len()` bytes at config offset `at`.
    pub fn read(&self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        pread_exact(self.device.as_raw_fd(), buf, self.base + at)
    }

    /// Writes `buf` at config offset `at`.
    pub fn write(&self, at: u64, buf: &[u8]) -> io::Result<()> {
        pwrite_all(self.device.as_raw_fd(), buf, self.base + at)
    }

    /// Reads the 16-bit little-endian config register at `at`.
    pub fn read16(&self, at: u64) -> io::Result<u16> {
        let mut b = [0u8; 2];
        self.read(at, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Sets Bus Master Enable in the Command register, so the device may issue DMA.
    pub fn enable_bus_master(&self) -> io::Result<()> {
        let cmd = self.read16(PCI_COMMAND)?;
        self.write(PCI_COMMAND, &(cmd | PCI_COMMAND_MASTER).to_le_bytes())
    }
}

fn file_offset(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

/// Reads exactly `buf.len()` bytes at `offset` of the file descriptor `fd`.
pub fn pread_exact(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let offset = file_offset(offset)?;
    // SAFETY: `buf` is valid and writable for `buf.len()` bytes for the whole call.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast::<c_void>(), buf.len(), offset) };
    complete(n, buf.len())
}

/// Writes all of `buf` at `offset` of the file descriptor `fd`.
pub fn pwrite_all(fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
    let offset = file_offset(offset)?;
    // SAFETY: `buf` is valid and readable for `buf.len()` bytes for the whole call.
    let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast::<c_void>(), buf.len(), offset) };
    complete(n, buf.len())
}

/// Turns a pread/pwrite return value into a result: an error, a short transfer, or success.
fn complete(n: isize, want: usize) -> io::Result<()> {
    match usize::try_from(n) {
        Err(_) => Err(io::Error::last_os_error()),
        Ok(n) if n == want => Ok(()),
        Ok(n) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("short transfer: {n} of {want} bytes"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn pread_pwrite_round_trip_and_short_reads() {
        let path = std::env::temp_dir().join(format!("tp-mmio-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(&[0u8; 16]).unwrap();
        pwrite_all(f.as_raw_fd(), &[1, 2, 3, 4], 6).unwrap();
        let mut b = [0u8; 4];
        pread_exact(f.as_raw_fd(), &mut b, 6).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        let mut big = [0u8; 8];
        let err = pread_exact(f.as_raw_fd(), &mut big, 12).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(pread_exact(-1, &mut b, 0).is_err());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn mmio_bounds_and_alignment() {
        // An anonymous page stands in for a BAR: the bounds logic is what is under test.
        let len = 4096;
        // SAFETY: a fresh anonymous mapping; checked below and unmapped by MmioRegion's Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let r = MmioRegion {
            ptr: NonNull::new(p.cast()).unwrap(),
            len,
        };
        assert!(r.write64(8, 0x1122_3344_5566_7788));
        assert_eq!(r.read32(8), 0x5566_7788);
        assert_eq!(r.read64(8), 0x1122_3344_5566_7788);
        assert_eq!(r.read32(4094), u32::MAX);
        assert_eq!(r.read32(4096), u32::MAX);
        assert_eq!(r.read32(usize::MAX - 1), u32::MAX);
        assert!(!r.write32(2, 1));
        assert!(r.write32(4092, 7));
        assert_eq!(r.read32(4092), 7);
    }
}
