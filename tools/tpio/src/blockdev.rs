//! A block device's size and logical sector size, by the kernel's block ioctls (`nix`'s ioctl
//! macros: the requests are `_IOR(0x12, 114, u64)` and `_IO(0x12, 104)` writing an int).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);

/// The size in bytes and the logical sector size of the open block device `file`.
pub fn geometry(file: &File) -> io::Result<(u64, u32)> {
    let mut capacity: u64 = 0;
    let mut sector: libc::c_int = 0;
    // SAFETY: both requests write one value of the pointed-to type, into locals we own, on a
    // descriptor that `file` keeps open for the duration of the calls.
    unsafe {
        blkgetsize64(file.as_raw_fd(), &mut capacity)?;
        blksszget(file.as_raw_fd(), &mut sector)?;
    }
    let sector = u32::try_from(sector)
        .map_err(|_| io::Error::other(format!("the device reports a sector size of {sector}")))?;
    Ok((capacity, sector))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_regular_file_is_not_a_block_device() {
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(super::geometry(&file).is_err());
    }
}
