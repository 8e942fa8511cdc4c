//! # iommu_fault: DMA to an unmapped IOVA is blocked by the IOMMU
//!
//! Maps a chunk for the NVMe admin queues and a second chunk for Identify data through
//! the device's view (VFIO type1, or iommufd with `TIDEPOOL_VFIO_BACKEND=iommufd`), **unmaps the
//! data chunk**, declares the expected fault to
//! the harness (`TIDEPOOL-EXPECT-IOMMU-FAULT`), then submits Identify Controller with its data
//! pointer at the unmapped IOVA. The harness then requires a DMAR fault in the guest's dmesg.
//! This test checks its side: the command completes (QEMU reports success even when the IOMMU
//! blocked the write) and not one byte of the unmapped chunk changed.

#[path = "../admin_identify.rs"]
mod admin_identify;

use std::process::ExitCode;

use std::sync::Arc;

use tidepool::device::backend::{BackendChoice, VfioDomain};
use tidepool::device::iommufd::CdevDevice;
use tidepool::device::vfio::{Bar, VfioDevice};
use tidepool::device::PciDevice;
use tidepool::memory::{Chunk, PageSize};
use tidepool_vmtests::HarnessEnv;

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("iommu_fault: PASS (the harness checks the fault in dmesg)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("iommu_fault: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let env = HarnessEnv::from_env().map_err(|e| e.to_string())?;
    let bdf = env.nvme_bdf();
    let choice = BackendChoice::from_env().map_err(|e| e.to_string())?;
    let domain = VfioDomain::for_device(choice, bdf).map_err(|e| e.to_string())?;
    let (dev, bar): (Arc<dyn PciDevice>, Bar) = match &domain {
        VfioDomain::Type1(c) => {
            let d = VfioDevice::open_in(c, bdf).map_err(|e| e.to_string())?;
            let bar = d.bar(0).map_err(|e| e.to_string())?;
            (Arc::new(d), bar)
        }
        VfioDomain::Iommufd(i) => {
            let d = CdevDevice::open_in(i, bdf).map_err(|e| e.to_string())?;
            let bar = d.bar(0).map_err(|e| e.to_string())?;
            (Arc::new(d), bar)
        }
    };
    let view = domain.view(u64::MAX).map_err(|e| e.to_string())?;
    println!("backend {} ({})", domain.backend(), view.kind());
    let chunk = || Chunk::with_page_size(2 << 20, PageSize::Huge2M).map_err(|e| e.to_string());
    let queues = chunk()?;
    let data = chunk()?;
    let q_iova = view.share(&queues.region()).map_err(|e| e.to_string())?;
    let d_iova = view.share(&data.region()).map_err(|e| e.to_string())?;
    view.unshare(&data.region(), d_iova)
        .map_err(|e| e.to_string())?;
    let usage = view.usage();
    println!(
        "queues at IOVA {:#x}; data chunk was at {:#x}, now unmapped; usage {usage:?}",
        q_iova.0, d_iova.0
    );
    if usage.mappings != 1 {
        return Err(format!("expected 1 live mapping, have {}", usage.mappings));
    }

    tidepool_vmtests::expect_iommu_fault();
    let c = admin_identify::identify_controller(
        dev.as_ref(),
        &bar,
        queues.as_ptr(),
        q_iova.0,
        d_iova.0,
    )?;
    let written = admin_identify::read_device_bytes(data.as_ptr(), 4096);
    let changed = written.iter().filter(|&&b| b != 0).count();
    println!(
        "Identify into unmapped IOVA {:#x}: status={:#x} cid={:#x}; {changed} of 4096 bytes of \
         the unmapped chunk changed",
        d_iova.0, c.status, c.cid
    );
    if c.cid != 0x1d {
        return Err(format!(
            "completion for the wrong command: cid {:#x}",
            c.cid
        ));
    }
    if changed != 0 {
        return Err("the device wrote memory that was unmapped from the IOMMU".into());
    }
    view.unshare(&queues.region(), q_iova)
        .map_err(|e| e.to_string())?;
    Ok(())
}
