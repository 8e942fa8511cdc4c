//! # vfio_smoke: the first end-to-end check of real VFIO in the test VM
//!
//! Proves, on QEMU's emulated NVMe controller behind an emulated IOMMU, the steps every Tidepool
//! VFIO driver depends on, each with raw `vfio-ioctls`/`vfio-bindings` calls so that this test
//! stays independent of Tidepool's own VFIO layer:
//!
//! 1. open the VFIO container and the device's group, set the type1v2 IOMMU, get the device fd
//!    (`VfioContainer::new(None)` + `VfioDevice::new`, which does all four);
//! 2. read the container's IOMMU facts with `VFIO_IOMMU_GET_INFO`: IOVA page sizes, the valid
//!    IOVA ranges and the number of mappings still available (`dma_avail`);
//! 3. read the PCI identity from config space (VFIO region 7) and check it is QEMU's NVMe;
//! 4. mmap BAR0 (the NVMe register file) and read CAP and VS with volatile 32-bit loads;
//! 5. allocate one 2 MiB hugepage, map it at an IOVA inside a valid range with
//!    `VFIO_IOMMU_MAP_DMA`, check that `dma_avail` dropped by one and that mapping the same IOVA
//!    again is refused, unmap it and check `dma_avail` is back.
//!
//! Everything found is printed before it is checked, and every mismatch is listed, so a failure
//! says what the device or kernel actually reported. Expected values are QEMU 7.2's (`hw/nvme`):
//! NVMe 1.4.0, MQES 0x7ff (2048 entries), CQR 1, DSTRD 0, TO 15, NVM command set, 4 KiB MPSMIN.
//!
//! No DMA is issued: the buffer is mapped, never handed to the device, so the harness must see
//! no IOMMU fault.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::process::ExitCode;
use std::ptr::NonNull;
use std::sync::Arc;

use tidepool_vmtests::{EnvError, HarnessEnv};
use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioOps};

/// The BAR that holds the NVMe controller registers (NVMe spec: MLBAR/MUBAR, a 64-bit BAR0).
const NVME_REGISTER_BAR: u32 = VFIO_PCI_BAR0_REGION_INDEX;

/// `VFIO_IOMMU_GET_INFO` = `_IO(VFIO_TYPE, VFIO_BASE + 12)` (linux/vfio.h); vfio-bindings has the
/// structures but not the request numbers.
const VFIO_IOMMU_GET_INFO: libc::c_ulong =
    ((VFIO_TYPE as libc::c_ulong) << 8) | (VFIO_BASE as libc::c_ulong + 12);

/// One 2 MiB hugepage.
const HUGEPAGE_SIZE: usize = 2 << 20;

/// QEMU's PCI identity for its NVMe controller: Red Hat vendor 0x1b36, device 0x0010, and the
/// NVMe (NVM Express I/O controller) class code 01:08:02.
const QEMU_NVME_VENDOR: u16 = 0x1b36;
const QEMU_NVME_DEVICE: u16 = 0x0010;
const NVME_CLASS_CODE: u32 = 0x01_08_02;

/// Register offsets in BAR0 (NVMe base specification, "Controller Registers").
const REG_CAP: usize = 0x00;
const REG_VS: usize = 0x08;
const REG_CC: usize = 0x14;
const REG_CSTS: usize = 0x1c;

/// What can stop the smoke test before it gets to compare values.
#[derive(Debug, thiserror::Error)]
enum SmokeError {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error("{bdf} is bound to {driver}, not vfio-pci: the harness's /init should have bound it (driver_override)")]
    NotVfioPci { bdf: String, driver: String },
    #[error("opening the VFIO container /dev/vfio/vfio failed: {0} (is the vfio module loaded?)")]
    Container(#[source] VfioError),
    #[error("opening {bdf} through VFIO (group, type1v2 IOMMU, device fd) failed: {source}; an EPERM from SET_IOMMU means no interrupt remapping (intel-iommu,intremap=on or allow_unsafe_interrupts=1)")]
    Device {
        bdf: String,
        #[source]
        source: VfioError,
    },
    #[error("VFIO_IOMMU_GET_INFO on the container failed: {0}")]
    IommuInfo(#[source] io::Error),
    #[error("VFIO_IOMMU_GET_INFO returned a malformed capability chain: {0}")]
    IommuInfoMalformed(&'static str),
    #[error("reading PCI config space (VFIO region {VFIO_PCI_CONFIG_REGION_INDEX}) failed: {0}")]
    ConfigRead(#[source] io::Error),
    #[error("BAR{index} cannot hold the NVMe registers: size {size:#x}, flags {flags:#x} (want an mmappable region of at least 8 KiB; is {index} the register BAR?)")]
    UnusableBar { index: u32, size: u64, flags: u32 },
    #[error(
        "mmap of BAR{index} ({size:#x} bytes at device-fd offset {offset:#x}) failed: {source}"
    )]
    BarMmap {
        index: u32,
        size: u64,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("allocating one 2 MiB hugepage failed: {0} (are hugepages reserved? see /proc/sys/vm/nr_hugepages)")]
    Hugepage(#[source] io::Error),
    #[error("no valid IOVA range can hold a 2 MiB mapping at a 2 MiB aligned address above 0")]
    NoIovaRoom,
    #[error("VFIO_IOMMU_MAP_DMA of 2 MiB at IOVA {iova:#x} failed: {source}")]
    Map {
        iova: u64,
        #[source]
        source: VfioError,
    },
    #[error("VFIO_IOMMU_UNMAP_DMA of 2 MiB at IOVA {iova:#x} failed: {source}")]
    Unmap {
        iova: u64,
        #[source]
        source: VfioError,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(mismatches) if mismatches.is_empty() => {
            println!("vfio_smoke: PASS");
            ExitCode::SUCCESS
        }
        Ok(mismatches) => {
            for m in &mismatches {
                println!("vfio_smoke: MISMATCH: {m}");
            }
            println!("vfio_smoke: FAIL ({} mismatch(es))", mismatches.len());
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("vfio_smoke: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every step, prints what it found, and returns the list of values that differ from what
/// QEMU 7.2's NVMe behind a working IOMMU must report (empty: pass).
fn run() -> Result<Vec<String>, SmokeError> {
    let env = HarnessEnv::from_env()?;
    let bdf = env.nvme_bdf().to_owned();
    let sysfs = env.nvme_sysfs_path();
    let driver = bound_driver(&sysfs);
    if driver != "vfio-pci" {
        return Err(SmokeError::NotVfioPci { bdf, driver });
    }
    let mut mismatches = Vec::new();

    // 1. Container, group, type1v2 IOMMU, device.
    let container = Arc::new(VfioContainer::new(None).map_err(SmokeError::Container)?);
    let device = VfioDevice::new(&sysfs, container.clone() as Arc<dyn VfioOps>, false).map_err(
        |source| SmokeError::Device {
            bdf: bdf.clone(),
            source,
        },
    )?;
    println!(
        "vfio_smoke: {bdf}: container open, group {}, type1v2 IOMMU set, device fd {} ({} IOMMU)",
        iommu_group(&sysfs),
        device.as_raw_fd(),
        env.iommu
    );

    // 2. IOMMU facts.
    let info = IommuInfo::query(container.as_raw_fd())?;
    let ranges: Vec<String> = info
        .iova_ranges
        .iter()
        .map(|(s, e)| format!("[{s:#x}, {e:#x}]"))
        .collect();
    println!(
        "vfio_smoke: IOMMU: page sizes {:#x}, dma_avail {}, IOVA ranges {}",
        info.iova_pgsizes,
        info.dma_avail
            .map_or_else(|| "not reported".to_owned(), |n| n.to_string()),
        ranges.join(" ")
    );
    if info.iova_pgsizes & 0x1000 == 0 {
        mismatches.push(format!(
            "IOMMU page sizes {:#x} lack 4 KiB",
            info.iova_pgsizes
        ));
    }
    if info.iova_ranges.is_empty() {
        mismatches.push("the IOMMU reported no valid IOVA range".to_owned());
    }
    if info.dma_avail.is_none() {
        mismatches.push("the IOMMU did not report dma_avail".to_owned());
    }

    // 3. PCI identity from config space.
    let config_offset = device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX);
    let mut id = [0u8; 12];
    pread_exact(device.as_raw_fd(), &mut id, config_offset).map_err(SmokeError::ConfigRead)?;
    let vendor = u16::from_le_bytes([id[0], id[1]]);
    let device_id = u16::from_le_bytes([id[2], id[3]]);
    let class = u32::from_le_bytes([id[9], id[10], id[11], 0]);
    println!("vfio_smoke: PCI {vendor:04x}:{device_id:04x} class {class:06x}");
    if (vendor, device_id) != (QEMU_NVME_VENDOR, QEMU_NVME_DEVICE) {
        mismatches.push(format!(
            "PCI id {vendor:04x}:{device_id:04x}, expected QEMU NVMe {QEMU_NVME_VENDOR:04x}:{QEMU_NVME_DEVICE:04x}"
        ));
    }
    if class != NVME_CLASS_CODE {
        mismatches.push(format!(
            "class code {class:06x}, expected NVMe {NVME_CLASS_CODE:06x}"
        ));
    }

    // 4. Registers through the mmapped BAR.
    let bar = MmioRegion::map_bar(&device, NVME_REGISTER_BAR)?;
    let cap = NvmeCap(u64::from(bar.read32(REG_CAP)) | u64::from(bar.read32(REG_CAP + 4)) << 32);
    let vs = bar.read32(REG_VS);
    let (cc, csts) = (bar.read32(REG_CC), bar.read32(REG_CSTS));
    println!(
        "vfio_smoke: BAR{NVME_REGISTER_BAR}: {} KiB mmapped; CAP={:#018x} VS={vs:#010x} (NVMe {}.{}.{}) CC={cc:#x} CSTS={csts:#x}",
        bar.len / 1024,
        cap.0,
        vs >> 16,
        (vs >> 8) & 0xff,
        vs & 0xff
    );
    println!(
        "vfio_smoke: CAP: MQES={:#x} ({} entries per queue) CQR={} DSTRD={} (doorbell stride {} bytes) TO={} ({} ms) CSS={:#x} MPSMIN={} KiB MPSMAX={} KiB",
        cap.mqes(),
        cap.mqes() + 1,
        cap.cqr(),
        cap.dstrd(),
        4u64 << cap.dstrd(),
        cap.to(),
        u64::from(cap.to()) * 500,
        cap.css(),
        4u64 << cap.mpsmin(),
        4u64 << cap.mpsmax()
    );
    let mut expect = |what: &str, found: u64, want: u64| {
        if found != want {
            mismatches.push(format!("{what} = {found:#x}, expected {want:#x}"));
        }
    };
    expect("VS", u64::from(vs), 0x0001_0400);
    expect("CAP.MQES", u64::from(cap.mqes()), 0x7ff);
    expect("CAP.CQR", u64::from(cap.cqr()), 1);
    expect("CAP.DSTRD", u64::from(cap.dstrd()), 0);
    expect("CAP.TO", u64::from(cap.to()), 0xf);
    expect("CAP.CSS bit 0 (NVM command set)", cap.css() & 1, 1);
    expect("CAP.MPSMIN", u64::from(cap.mpsmin()), 0);

    // 5. Map a hugepage for DMA and watch the IOMMU account for it.
    let page = HugePage::allocate()?;
    let iova = pick_iova(&info.iova_ranges).ok_or(SmokeError::NoIovaRoom)?;
    // SAFETY: `page` is a live private mapping of HUGEPAGE_SIZE bytes owned by this function; no
    // Rust reference to it exists, and it stays mapped until after the unmap below (it is
    // dropped at the end of this function, after `vfio_dma_unmap`).
    unsafe { dma_map(&container, iova, &page) }
        .map_err(|source| SmokeError::Map { iova, source })?;
    let after_map = IommuInfo::query(container.as_raw_fd())?.dma_avail;
    // A second mapping of the same IOVA must be refused: the IOMMU tracks what is mapped.
    // SAFETY: as above; if the kernel accepted it, the unmap below removes both.
    let remap = unsafe { dma_map(&container, iova, &page) };
    container
        .vfio_dma_unmap(iova, HUGEPAGE_SIZE)
        .map_err(|source| SmokeError::Unmap { iova, source })?;
    let after_unmap = IommuInfo::query(container.as_raw_fd())?.dma_avail;
    println!(
        "vfio_smoke: DMA: 2 MiB hugepage (vaddr {:p}) mapped at IOVA {iova:#x}; dma_avail {} -> {} -> {} after unmap; remapping the same IOVA: {}",
        page.ptr,
        fmt_opt(info.dma_avail),
        fmt_opt(after_map),
        fmt_opt(after_unmap),
        match &remap {
            Ok(()) => "accepted (wrong)".to_owned(),
            Err(e) => format!("refused ({e})"),
        }
    );
    if let Some(before) = info.dma_avail {
        if after_map != Some(before.wrapping_sub(1)) {
            mismatches.push(format!(
                "dma_avail after one map is {}, expected {}",
                fmt_opt(after_map),
                before - 1
            ));
        }
        if after_unmap != Some(before) {
            mismatches.push(format!(
                "dma_avail after unmap is {}, expected {before}",
                fmt_opt(after_unmap)
            ));
        }
    }
    if remap.is_ok() {
        mismatches.push(format!(
            "mapping IOVA {iova:#x} twice was accepted: the IOMMU does not track mappings"
        ));
    }
    drop(page);
    Ok(mismatches)
}

fn fmt_opt(v: Option<u32>) -> String {
    v.map_or_else(|| "?".to_owned(), |n| n.to_string())
}

/// The name of the driver bound to the PCI function at `sysfs`, or `nothing`.
fn bound_driver(sysfs: &Path) -> String {
    std::fs::read_link(sysfs.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "nothing".to_owned())
}

/// The IOMMU group number of the PCI function at `sysfs`, or `?`.
fn iommu_group(sysfs: &Path) -> String {
    std::fs::read_link(sysfs.join("iommu_group"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "?".to_owned())
}

/// The lowest 2 MiB aligned, non-zero IOVA at which a 2 MiB mapping fits inside one of the
/// valid `ranges` (inclusive `(start, end)` pairs).
fn pick_iova(ranges: &[(u64, u64)]) -> Option<u64> {
    let size = HUGEPAGE_SIZE as u64;
    ranges
        .iter()
        .filter_map(|&(start, end)| {
            let aligned = start.max(size).checked_next_multiple_of(size)?;
            let last = aligned.checked_add(size - 1)?;
            (last <= end).then_some(aligned)
        })
        .min()
}

/// Maps `page` at `iova` for device reads and writes.
///
/// # Safety
/// `page` must stay mapped, with no Rust reference to its bytes, until the IOVA range is
/// unmapped again (the device may read or write it at any time meanwhile).
unsafe fn dma_map(container: &VfioContainer, iova: u64, page: &HugePage) -> Result<(), VfioError> {
    // SAFETY: forwarded to the caller (see this function's contract).
    unsafe { container.vfio_dma_map(iova, HUGEPAGE_SIZE, page.ptr.as_ptr()) }
}

/// Reads exactly `buf.len()` bytes at `offset` of the file descriptor `fd`.
fn pread_exact(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes for the whole call.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast::<c_void>(), buf.len(), offset) };
    match usize::try_from(n) {
        Err(_) => Err(io::Error::last_os_error()),
        Ok(n) if n == buf.len() => Ok(()),
        Ok(n) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("short read: {n} of {} bytes", buf.len()),
        )),
    }
}

/// The NVMe CAP register (Controller Capabilities), decoded.
#[derive(Copy, Clone)]
struct NvmeCap(u64);

impl NvmeCap {
    fn field(self, low: u32, bits: u32) -> u64 {
        (self.0 >> low) & ((1 << bits) - 1)
    }
    /// Maximum Queue Entries Supported, 0-based.
    fn mqes(self) -> u16 {
        self.field(0, 16) as u16
    }
    /// Contiguous Queues Required.
    fn cqr(self) -> u8 {
        self.field(16, 1) as u8
    }
    /// Timeout, in 500 ms units.
    fn to(self) -> u8 {
        self.field(24, 8) as u8
    }
    /// Doorbell Stride: doorbells are `4 << DSTRD` bytes apart.
    fn dstrd(self) -> u8 {
        self.field(32, 4) as u8
    }
    /// Command Sets Supported (bit 0: NVM).
    fn css(self) -> u64 {
        self.field(37, 8)
    }
    /// Memory Page Size Minimum: `4 KiB << MPSMIN`.
    fn mpsmin(self) -> u8 {
        self.field(48, 4) as u8
    }
    /// Memory Page Size Maximum: `4 KiB << MPSMAX`.
    fn mpsmax(self) -> u8 {
        self.field(52, 4) as u8
    }
}

/// What `VFIO_IOMMU_GET_INFO` says about a type1 container.
struct IommuInfo {
    iova_pgsizes: u64,
    /// Inclusive `(start, end)` pairs.
    iova_ranges: Vec<(u64, u64)>,
    dma_avail: Option<u32>,
}

impl IommuInfo {
    /// Asks the container `fd` for its IOMMU info with capabilities: once to learn the size the
    /// capability chain needs, once with a buffer that large, then walks the chain.
    fn query(fd: RawFd) -> Result<IommuInfo, SmokeError> {
        const HEADER: usize = 24; // struct vfio_iommu_type1_info
        let mut buf = vec![0u8; HEADER];
        loop {
            let argsz = u32::try_from(buf.len())
                .map_err(|_| SmokeError::IommuInfoMalformed("argsz overflow"))?;
            buf[0..4].copy_from_slice(&argsz.to_ne_bytes());
            get_info_ioctl(fd, &mut buf).map_err(SmokeError::IommuInfo)?;
            let wanted = read_u32(&buf, 0).ok_or(SmokeError::IommuInfoMalformed("short"))? as usize;
            if wanted <= buf.len() {
                break;
            }
            if wanted > 1 << 20 {
                return Err(SmokeError::IommuInfoMalformed("argsz above 1 MiB"));
            }
            buf = vec![0u8; wanted];
        }
        let bad = SmokeError::IommuInfoMalformed;
        let flags = read_u32(&buf, 4).ok_or(bad("short"))?;
        let mut info = IommuInfo {
            iova_pgsizes: read_u64(&buf, 8).ok_or(bad("short"))?,
            iova_ranges: Vec::new(),
            dma_avail: None,
        };
        if flags & VFIO_IOMMU_INFO_CAPS == 0 {
            return Ok(info);
        }
        let mut offset = read_u32(&buf, 16).ok_or(bad("short"))? as usize;
        // Each capability header: u16 id, u16 version, u32 offset of the next one (0 ends).
        for _ in 0..64 {
            if offset == 0 {
                return Ok(info);
            }
            let id = read_u16(&buf, offset).ok_or(bad("capability past the end"))?;
            let next = read_u32(&buf, offset + 4).ok_or(bad("capability past the end"))?;
            match u32::from(id) {
                VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                    let n = read_u32(&buf, offset + 8).ok_or(bad("IOVA range cap past the end"))?;
                    for i in 0..n as usize {
                        let at = offset + 16 + i * 16;
                        let start = read_u64(&buf, at).ok_or(bad("IOVA range past the end"))?;
                        let end = read_u64(&buf, at + 8).ok_or(bad("IOVA range past the end"))?;
                        info.iova_ranges.push((start, end));
                    }
                }
                VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL => {
                    info.dma_avail =
                        Some(read_u32(&buf, offset + 8).ok_or(bad("dma_avail past the end"))?);
                }
                _ => {}
            }
            offset = next as usize;
        }
        Err(bad("capability chain longer than 64 entries"))
    }
}

/// Issues `VFIO_IOMMU_GET_INFO` on the container `fd` with `buf` (whose first four bytes are
/// `argsz`) as the argument.
fn get_info_ioctl(fd: RawFd, buf: &mut [u8]) -> io::Result<()> {
    debug_assert!(buf.len() >= 24);
    // SAFETY: the kernel writes at most `argsz` bytes, and `argsz` (first four bytes) is at most
    // `buf.len()`; `buf` is valid and writable for that long during the call.
    let rc = unsafe { libc::ioctl(fd, VFIO_IOMMU_GET_INFO, buf.as_mut_ptr()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}
fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}
fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

/// A device register region (a BAR) mmapped from the VFIO device fd. Only volatile, aligned
/// 32-bit accesses inside its bounds are offered.
struct MmioRegion {
    ptr: NonNull<u8>,
    len: usize,
}

impl MmioRegion {
    /// Mmaps BAR `index` of `device` read/write, shared.
    fn map_bar(device: &VfioDevice, index: u32) -> Result<MmioRegion, SmokeError> {
        let size = device.get_region_size(index);
        let flags = device.get_region_flags(index);
        let offset = device.get_region_offset(index);
        if size < 0x2000 || flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(SmokeError::UnusableBar { index, size, flags });
        }
        let mmap_err = |source| SmokeError::BarMmap {
            index,
            size,
            offset,
            source,
        };
        let len = usize::try_from(size)
            .map_err(|_| mmap_err(io::Error::other("size exceeds the address space")))?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| mmap_err(io::Error::other("offset too large")))?;
        // SAFETY: a fresh shared mapping chosen by the kernel (no fixed address), so no existing
        // memory is replaced; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(mmap_err(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| mmap_err(io::Error::other("null")))?;
        Ok(MmioRegion { ptr, len })
    }

    /// Reads the 32-bit register at byte `offset` (must be 4-byte aligned and inside the region;
    /// otherwise returns all ones, like a PCI read of nothing).
    fn read32(&self, offset: usize) -> u32 {
        let in_bounds = matches!(offset.checked_add(4), Some(end) if end <= self.len);
        if offset & 3 != 0 || !in_bounds {
            return u32::MAX;
        }
        // SAFETY: `offset + 4 <= len` and the mapping is live while `self` is; device registers
        // must be read with one volatile, aligned access, and the base is page aligned.
        unsafe { self.ptr.as_ptr().add(offset).cast::<u32>().read_volatile() }
    }
}

impl Drop for MmioRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map_bar`; nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast::<c_void>(), self.len) };
    }
}

/// One anonymous, populated 2 MiB hugepage. Its bytes are only ever touched through raw
/// pointers (a device may own them while mapped).
struct HugePage {
    ptr: NonNull<u8>,
}

impl HugePage {
    fn allocate() -> Result<HugePage, SmokeError> {
        // SAFETY: a fresh private anonymous mapping chosen by the kernel; checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                HUGEPAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_HUGETLB
                    | libc::MAP_HUGE_2MB
                    | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(SmokeError::Hugepage(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| SmokeError::Hugepage(io::Error::other("null mapping")))?;
        Ok(HugePage { ptr })
    }
}

impl Drop for HugePage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `allocate`; callers unmap it from the IOMMU
        // first (see `dma_map`'s contract).
        unsafe { libc::munmap(self.ptr.as_ptr().cast::<c_void>(), HUGEPAGE_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iova_pick_honours_ranges() {
        // Intel IOMMU under QEMU: everything but the interrupt window.
        let r = [(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)];
        assert_eq!(pick_iova(&r), Some(0x20_0000));
        // A range too small is skipped; an unaligned start is rounded up.
        let r = [(0x1000, 0x1f_ffff), (0x30_1000, 0x80_0000)];
        assert_eq!(pick_iova(&r), Some(0x40_0000));
        assert_eq!(pick_iova(&[(0x1000, 0x2000)]), None);
        assert_eq!(pick_iova(&[(u64::MAX - 0x1000, u64::MAX)]), None);
    }

    #[test]
    fn cap_fields_decode() {
        // QEMU 7.2's CAP: MQES 0x7ff, CQR, TO 15, CSS NVM + CSI + admin-only, MPSMAX 4.
        let cap = NvmeCap(0x7ff | 1 << 16 | 0xf << 24 | 0xc1 << 37 | 4 << 52);
        assert_eq!(cap.mqes(), 0x7ff);
        assert_eq!(cap.cqr(), 1);
        assert_eq!(cap.to(), 0x0f);
        assert_eq!(cap.dstrd(), 0);
        assert_eq!(cap.css(), 0xc1);
        assert_eq!(cap.mpsmin(), 0);
        assert_eq!(cap.mpsmax(), 4);
    }

    #[test]
    fn get_info_request_number() {
        // _IO(';', 100 + 12) from linux/vfio.h.
        assert_eq!(VFIO_IOMMU_GET_INFO, 0x3b70);
    }
}
