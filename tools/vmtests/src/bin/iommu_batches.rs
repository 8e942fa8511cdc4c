//! # iommu_batches: Tidepool's VFIO type1 view against a real (emulated) IOMMU
//!
//! Through `tidepool::share::vfio` only (no raw ioctls), on the harness's NVMe function:
//! 1. **Full DMA mask.** Map 300 one-hugepage chunks and 8 chunks of 8 hugepages each. After
//!    every map, `VFIO_IOMMU_GET_INFO`'s `dma_avail` must have dropped by exactly one (a
//!    multi-hugepage chunk is one mapping), and every IOVA must be aligned to 2 MiB, lie inside
//!    one valid IOVA range and not overlap any other. With all of them mapped, the NVMe
//!    controller runs Identify Controller with its admin queues and the data buffer in the
//!    last chunk (the harness checks dmesg for IOMMU faults: there must be none), after a
//!    function reset, with MSI-X vector 0 routed to an eventfd that must count the completion's
//!    interrupt. Then every
//!    chunk is unmapped, `dma_avail` climbing back by one each time to where it started.
//! 2. **32-bit DMA mask.** A fresh container whose view has mask `0xffff_ffff`: 64 chunks, all
//!    ending at or below 4 GiB, and Identify again through one of them. Then the whole 32-bit
//!    space is filled by mapping one 128 MiB chunk at many IOVAs: exactly as many maps as the
//!    valid ranges below 4 GiB hold (the MSI window excluded) succeed, then `AddressSpace`.
//! 3. **A 4 MiB mask.** Room for one 2 MiB chunk above the reserved null page: the second map
//!    must fail with `ShareError::AddressSpace` and must not use up a mapping.
//!
//! 4. **Two controllers, one container** (only with `--vfio-nvme 2`): one view, one mapping,
//!    Identify through it from both.
//!
//! Prints every number it checks; exit 0 = pass.

#[path = "../admin_identify.rs"]
mod admin_identify;

use std::process::ExitCode;
use std::sync::Arc;

use tidepool::device::vfio::VfioDevice;
use tidepool::device::PciDevice;
use tidepool::memory::{Chunk, PageSize};
use tidepool::share::vfio::{IovaRange, VfioContainer, VfioType1};
use tidepool::share::{DeviceView, ShareError};
use tidepool::DeviceAddr;
use tidepool_vmtests::HarnessEnv;

const HUGE: usize = 2 << 20;
const SINGLE_CHUNKS: usize = 300;
const MULTI_CHUNKS: usize = 8;
const PAGES_PER_MULTI: usize = 8;

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("iommu_batches: PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("iommu_batches: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let env = HarnessEnv::from_env().map_err(|e| e.to_string())?;
    let bdf = env.nvme_bdf();
    full_mask(bdf)?;
    mask_32bit(bdf)?;
    tiny_mask(bdf)?;
    if env.vfio_nvme_bdfs.len() >= 2 {
        shared_container(&env.vfio_nvme_bdfs[..2])?;
    } else {
        println!("phase 4 skipped: one vfio NVMe function (run with --vfio-nvme 2)");
    }
    Ok(())
}

/// Two controllers in one container share one view: one mapping serves both.
fn shared_container(bdfs: &[String]) -> Result<(), String> {
    println!("phase 4: {} and {} in one container", bdfs[0], bdfs[1]);
    let container = VfioContainer::new().map_err(|e| e.to_string())?;
    let a = VfioDevice::open_in(&container, &bdfs[0]).map_err(|e| e.to_string())?;
    let b = VfioDevice::open_in(&container, &bdfs[1]).map_err(|e| e.to_string())?;
    let view = container.view(u64::MAX).map_err(|e| e.to_string())?;
    let again = container.view(u64::MAX).map_err(|e| e.to_string())?;
    if !Arc::ptr_eq(&view, &again) {
        return Err("a container must have exactly one view".into());
    }
    match container.view(0xffff_ffff) {
        Err(ShareError::Unsuitable(_)) => {}
        other => return Err(format!("a narrower mask than the view's gave {other:?}")),
    }
    let avail0 = dma_avail(&view)?;
    let chunk = hugepage_chunk(1)?;
    let iova = map_checked(&view, &chunk, avail0)?;
    identify_through(&a, &chunk, iova)?;
    identify_through(&b, &chunk, iova)?;
    view.unshare(&chunk.region(), iova)
        .map_err(|e| e.to_string())?;
    println!("  one mapping at {:#x} served both controllers", iova.0);
    Ok(())
}

/// `dma_avail` now, from the kernel.
fn dma_avail(view: &VfioType1) -> Result<u64, String> {
    let info = view.iommu_info().map_err(|e| e.to_string())?;
    info.dma_avail
        .map(u64::from)
        .ok_or_else(|| "kernel does not report dma_avail (needs Linux >= 5.10)".to_string())
}

/// Checks an extent is aligned, below the mask and inside one valid range.
fn check_extent(view: &VfioType1, iova: DeviceAddr, len: usize) -> Result<(), String> {
    let last = iova.0 + len as u64 - 1;
    if iova.0 % HUGE as u64 != 0 {
        return Err(format!("IOVA {:#x} is not 2 MiB aligned", iova.0));
    }
    if last > view.dma_mask() {
        return Err(format!(
            "IOVA {:#x}..={last:#x} exceeds the DMA mask {:#x}",
            iova.0,
            view.dma_mask()
        ));
    }
    let inside = |r: &IovaRange| r.start <= iova.0 && last <= r.end;
    if !view.iova_ranges().iter().any(inside) {
        return Err(format!(
            "IOVA {:#x}..={last:#x} is not inside one valid range {:?}",
            iova.0,
            view.iova_ranges()
        ));
    }
    Ok(())
}

/// Maps `chunk`, checking `dma_avail` drops by exactly one and the extent is valid.
fn map_checked(view: &VfioType1, chunk: &Chunk, avail_before: u64) -> Result<DeviceAddr, String> {
    let iova = view
        .share(&chunk.region())
        .map_err(|e| format!("share of a {} B chunk: {e}", chunk.len()))?;
    check_extent(view, iova, chunk.len())?;
    let after = dma_avail(view)?;
    if after != avail_before - 1 {
        return Err(format!(
            "dma_avail went {avail_before} -> {after} for one map of {} B (expected -1)",
            chunk.len()
        ));
    }
    Ok(iova)
}

/// Checks no two live extents overlap.
fn check_disjoint(extents: &[(DeviceAddr, usize)]) -> Result<(), String> {
    let mut sorted: Vec<_> = extents.to_vec();
    sorted.sort();
    for w in sorted.windows(2) {
        if w[0].0 .0 + w[0].1 as u64 > w[1].0 .0 {
            return Err(format!("IOVA extents overlap: {:x?} and {:x?}", w[0], w[1]));
        }
    }
    Ok(())
}

/// Identify Controller with queues and data in `chunk` (mapped at `iova`); checks the answer.
fn identify_through(dev: &VfioDevice, chunk: &Chunk, iova: DeviceAddr) -> Result<(), String> {
    let bar = dev.bar(0).map_err(|e| e.to_string())?;
    let data_off = admin_identify::QUEUE_BYTES;
    let data_iova = iova.0 + data_off as u64;
    let c = admin_identify::identify_controller(dev, &bar, chunk.as_ptr(), iova.0, data_iova)?;
    let data = admin_identify::read_device_bytes(chunk.as_ptr().wrapping_add(data_off), 4096);
    let vid = u16::from_le_bytes([data[0], data[1]]);
    let serial = admin_identify::ascii_field(&data, 4..24);
    let model = admin_identify::ascii_field(&data, 24..64);
    let firmware = admin_identify::ascii_field(&data, 64..72);
    println!(
        "  identify via IOVA {data_iova:#x}: status={:#x} cid={:#x} vid={vid:#06x} model={model:?} \
         serial={serial:?} firmware={firmware:?}",
        c.status, c.cid
    );
    if c.status != 0 || c.cid != 0x1d {
        return Err(format!(
            "Identify failed: status {:#x}, cid {:#x}",
            c.status, c.cid
        ));
    }
    if model.is_empty() || vid != dev.vendor_id() {
        return Err(format!(
            "Identify data not written: model {model:?}, vid {vid:#x} (PCI says {:#x})",
            dev.vendor_id()
        ));
    }
    Ok(())
}

/// Unmaps every chunk, checking `dma_avail` climbs back by one each time.
fn unmap_all(view: &VfioType1, mapped: &[(Chunk, DeviceAddr)]) -> Result<(), String> {
    let mut avail = dma_avail(view)?;
    for (chunk, iova) in mapped {
        view.unshare(&chunk.region(), *iova)
            .map_err(|e| format!("unshare at {:#x}: {e}", iova.0))?;
        let after = dma_avail(view)?;
        if after != avail + 1 {
            return Err(format!("dma_avail went {avail} -> {after} for one unmap"));
        }
        avail = after;
    }
    Ok(())
}

fn hugepage_chunk(pages: usize) -> Result<Chunk, String> {
    Chunk::with_page_size(pages * HUGE, PageSize::Huge2M).map_err(|e| e.to_string())
}

fn full_mask(bdf: &str) -> Result<(), String> {
    println!(
        "phase 1: full DMA mask, {SINGLE_CHUNKS} x 2 MiB + {MULTI_CHUNKS} x {} MiB",
        PAGES_PER_MULTI * 2
    );
    let (dev, view) = VfioDevice::open(bdf, u64::MAX).map_err(|e| e.to_string())?;
    println!(
        "  device {} {:04x}:{:04x}, {} MSI-X vectors; IOVA ranges {:?}",
        dev.bdf(),
        dev.vendor_id(),
        dev.device_id(),
        dev.msix_vectors(),
        view.iova_ranges()
    );
    let avail0 = dma_avail(&view)?;
    let usage0 = view.usage();
    println!("  dma_avail at start: {avail0}; usage {usage0:?}");
    if usage0.mapping_limit != Some(avail0) || usage0.mappings != 0 {
        return Err(format!(
            "usage {usage0:?} does not match dma_avail {avail0}"
        ));
    }

    let mut mapped: Vec<(Chunk, DeviceAddr)> = Vec::new();
    let mut avail = avail0;
    for _ in 0..SINGLE_CHUNKS {
        let chunk = hugepage_chunk(1)?;
        let iova = map_checked(&view, &chunk, avail)?;
        avail -= 1;
        mapped.push((chunk, iova));
    }
    for _ in 0..MULTI_CHUNKS {
        let chunk = hugepage_chunk(PAGES_PER_MULTI)?;
        let iova = map_checked(&view, &chunk, avail)?;
        avail -= 1;
        mapped.push((chunk, iova));
    }
    let extents: Vec<(DeviceAddr, usize)> = mapped.iter().map(|(c, i)| (*i, c.len())).collect();
    check_disjoint(&extents)?;
    let usage = view.usage();
    let bytes = (SINGLE_CHUNKS + MULTI_CHUNKS * PAGES_PER_MULTI) * HUGE;
    let lowest = extents.iter().map(|e| e.0 .0).min().unwrap_or(0);
    let highest = extents
        .iter()
        .map(|e| e.0 .0 + e.1 as u64 - 1)
        .max()
        .unwrap_or(0);
    println!(
        "  mapped {} chunks ({} MiB): dma_avail {avail0} -> {} ; usage {usage:?}; IOVAs \
         {lowest:#x}..={highest:#x}",
        mapped.len(),
        bytes >> 20,
        dma_avail(&view)?
    );
    if usage.mappings != mapped.len() as u64 || usage.bytes != bytes as u64 {
        return Err(format!(
            "usage {usage:?} disagrees with {} mappings",
            mapped.len()
        ));
    }

    // Reset the function, route MSI-X vector 0 (the admin CQ's) to an eventfd, and check the
    // Identify completion interrupt arrives there.
    dev.function_reset().map_err(|e| e.to_string())?;
    let fds = dev.enable_msix_eventfds(1).map_err(|e| e.to_string())?;
    let (last_chunk, last_iova) = mapped.last().ok_or("nothing mapped")?;
    identify_through(&dev, last_chunk, *last_iova)?;
    let mut interrupts = 0;
    for _ in 0..1000 {
        if let Ok(n) = fds[0].read() {
            interrupts = n;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    dev.disable_msix().map_err(|e| e.to_string())?;
    println!("  after reset: MSI-X vector 0 eventfd counted {interrupts} interrupt(s)");
    if interrupts == 0 {
        return Err("no MSI-X interrupt for the Identify completion".into());
    }

    // A wrong unshare is refused and changes nothing.
    let (c0, i0) = &mapped[0];
    match view.unshare(&c0.region(), i0.offset(HUGE as u64)) {
        Err(ShareError::NotShared { .. }) => {}
        other => return Err(format!("unshare at a wrong IOVA gave {other:?}")),
    }
    unmap_all(&view, &mapped)?;
    let end = dma_avail(&view)?;
    println!(
        "  unmapped all: dma_avail back to {end}; usage {:?}",
        view.usage()
    );
    if end != avail0 || view.usage().mappings != 0 || view.usage().bytes != 0 {
        return Err(format!(
            "dma_avail {end} (started {avail0}) or usage not back to zero"
        ));
    }
    match view.unshare(&c0.region(), *i0) {
        Err(ShareError::NotShared { .. }) => {}
        other => return Err(format!("double unshare gave {other:?}")),
    }
    Ok(())
}

fn mask_32bit(bdf: &str) -> Result<(), String> {
    const MASK: u64 = 0xffff_ffff;
    const CHUNKS: usize = 64;
    println!("phase 2: DMA mask {MASK:#x}, {CHUNKS} x 2 MiB");
    let (dev, view) = VfioDevice::open(bdf, MASK).map_err(|e| e.to_string())?;
    let view: Arc<VfioType1> = view;
    let avail0 = dma_avail(&view)?;
    let mut mapped = Vec::new();
    let mut avail = avail0;
    for _ in 0..CHUNKS {
        let chunk = hugepage_chunk(1)?;
        let iova = map_checked(&view, &chunk, avail)?;
        avail -= 1;
        mapped.push((chunk, iova));
    }
    let highest = mapped
        .iter()
        .map(|(c, i)| i.0 + c.len() as u64 - 1)
        .max()
        .unwrap_or(0);
    println!("  {CHUNKS} chunks mapped, highest IOVA byte {highest:#x} (mask {MASK:#x})");
    if highest > MASK {
        return Err(format!("IOVA {highest:#x} above the 32-bit mask"));
    }
    let extents: Vec<(DeviceAddr, usize)> = mapped.iter().map(|(c, i)| (*i, c.len())).collect();
    check_disjoint(&extents)?;
    let (chunk, iova) = &mapped[CHUNKS / 2];
    identify_through(&dev, chunk, *iova)?;
    unmap_all(&view, &mapped)?;
    let end = dma_avail(&view)?;
    println!(
        "  dma_avail {avail0} -> {} (mapped) -> {end} (unmapped)",
        avail0 - CHUNKS as u64
    );
    if end != avail0 {
        return Err(format!("dma_avail {end}, started at {avail0}"));
    }
    fill_32bit_space(&view)
}

/// Maps one 128 MiB chunk again and again (VFIO allows several IOVAs for the same memory) until
/// the 4 GiB below the mask is used up: the number of maps must be exactly what the valid
/// ranges below the mask hold, every extent must be valid, and the refusal must be
/// `AddressSpace` without using up a mapping.
fn fill_32bit_space(view: &VfioType1) -> Result<(), String> {
    const LEN: usize = 128 << 20;
    let chunk = hugepage_chunk(LEN / HUGE)?;
    let mask = view.dma_mask();
    // What a packing allocator fits: per valid range clipped to the mask, 2 MiB-aligned, above
    // the reserved null page.
    let expected: u64 = view
        .iova_ranges()
        .iter()
        .filter(|r| r.start <= mask)
        .map(|r| {
            let start = r.start.max(1).next_multiple_of(HUGE as u64);
            let end = r.end.min(mask).saturating_add(1);
            end.saturating_sub(start) / LEN as u64
        })
        .sum();
    let avail0 = dma_avail(view)?;
    let mut avail = avail0;
    let mut iovas = Vec::new();
    let refusal = loop {
        match view.share(&chunk.region()) {
            Ok(iova) => {
                check_extent(view, iova, LEN)?;
                avail -= 1;
                iovas.push(iova);
                if iovas.len() as u64 > expected {
                    break None;
                }
            }
            Err(e) => break Some(e),
        }
    };
    let after = dma_avail(view)?;
    let extents: Vec<(DeviceAddr, usize)> = iovas.iter().map(|i| (*i, LEN)).collect();
    check_disjoint(&extents)?;
    let highest = iovas
        .iter()
        .map(|i| i.0 + LEN as u64 - 1)
        .max()
        .unwrap_or(0);
    println!(
        "  fill: {} maps of the same 128 MiB chunk (expected {expected}), highest IOVA byte \
         {highest:#x}; dma_avail {avail0} -> {after}; then: {}",
        iovas.len(),
        refusal
            .as_ref()
            .map_or("no refusal".into(), |e| e.to_string())
    );
    for iova in &iovas {
        view.unshare(&chunk.region(), *iova)
            .map_err(|e| e.to_string())?;
    }
    if iovas.len() as u64 != expected || after != avail {
        return Err(format!(
            "{} maps (expected {expected}); dma_avail {after} (expected {avail})",
            iovas.len()
        ));
    }
    match refusal {
        Some(ShareError::AddressSpace { .. }) => {}
        other => {
            return Err(format!(
                "expected AddressSpace once the space is full, got {other:?}"
            ))
        }
    }
    if dma_avail(view)? != avail0 {
        return Err("dma_avail not back after unmapping the fill".into());
    }
    Ok(())
}

fn tiny_mask(bdf: &str) -> Result<(), String> {
    const MASK: u64 = (4 << 20) - 1;
    println!("phase 3: DMA mask {MASK:#x}: room for one 2 MiB chunk");
    let (_dev, view) = VfioDevice::open(bdf, MASK).map_err(|e| e.to_string())?;
    let avail0 = dma_avail(&view)?;
    let a = hugepage_chunk(1)?;
    let b = hugepage_chunk(1)?;
    let ia = map_checked(&view, &a, avail0)?;
    let second = view.share(&b.region());
    let avail = dma_avail(&view)?;
    println!(
        "  first at {:#x}; second: {}; dma_avail {avail0} -> {avail}",
        ia.0,
        match &second {
            Ok(i) => format!("mapped at {:#x}", i.0),
            Err(e) => e.to_string(),
        }
    );
    match second {
        Err(ShareError::AddressSpace { .. }) => {}
        other => {
            return Err(format!(
                "expected AddressSpace for the second chunk, got {other:?}"
            ))
        }
    }
    if avail != avail0 - 1 {
        return Err("the refused map used up a mapping".into());
    }
    view.unshare(&a.region(), ia).map_err(|e| e.to_string())?;
    Ok(())
}
