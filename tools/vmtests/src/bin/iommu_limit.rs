//! # iommu_limit: the container's mapping limit, and direct mapping through VFIO
//!
//! 1. Maps the same 4 KiB page at new IOVAs through `VfioType1` until the kernel refuses
//!    (`ENOSPC` from `VFIO_IOMMU_MAP_DMA` once `dma_avail` reaches 0). The refusal must come
//!    exactly at the view's `mapping_limit` live mappings and be `ShareError::MappingLimit`; after
//!    unmapping everything `dma_avail` must be back where it started.
//! 2. `DirectMapper` over the same view: a registered buffer mapped twice costs one VFIO mapping
//!    (one miss, one hit), and dropping the registration gives the mapping back.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use tidepool::device::vfio::VfioDevice;
use tidepool::memory::{Chunk, PageSize};
use tidepool::share::direct::DirectMapper;
use tidepool::share::vfio::VfioType1;
use tidepool::share::{DeviceView, ShareError};
use tidepool_vmtests::HarnessEnv;

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("iommu_limit: PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("iommu_limit: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dma_avail(view: &VfioType1) -> Result<u64, String> {
    let info = view.iommu_info().map_err(|e| e.to_string())?;
    info.dma_avail
        .map(u64::from)
        .ok_or_else(|| "kernel does not report dma_avail".to_string())
}

fn run() -> Result<(), String> {
    let env = HarnessEnv::from_env().map_err(|e| e.to_string())?;
    let (_dev, view) = VfioDevice::open(env.nvme_bdf(), u64::MAX).map_err(|e| e.to_string())?;
    mapping_limit(&view)?;
    direct_mapping(view)
}

fn mapping_limit(view: &VfioType1) -> Result<(), String> {
    let avail0 = dma_avail(view)?;
    let limit = view
        .usage()
        .mapping_limit
        .ok_or("no mapping limit reported")?;
    if limit != avail0 || limit > 1 << 20 {
        return Err(format!(
            "limit {limit}, dma_avail {avail0}: not a fresh container"
        ));
    }
    let page = Chunk::with_page_size(4096, PageSize::Small4K).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut iovas = Vec::with_capacity(limit as usize);
    let refusal = loop {
        match view.share(&page.region()) {
            Ok(iova) => iovas.push(iova),
            Err(e) => break e,
        }
        if iovas.len() as u64 > limit {
            return Err(format!(
                "mapped {} times, past the limit {limit}",
                iovas.len()
            ));
        }
    };
    let map_time = start.elapsed();
    let at_limit = dma_avail(view)?;
    println!(
        "mapped one 4 KiB page {} times in {map_time:?} ({:.1} us/map); dma_avail {avail0} -> \
         {at_limit}; then: {refusal}",
        iovas.len(),
        map_time.as_secs_f64() * 1e6 / iovas.len().max(1) as f64
    );
    match refusal {
        ShareError::MappingLimit { used, limit: l } if used == limit && l == limit => {}
        other => return Err(format!("expected MappingLimit at {limit}, got {other:?}")),
    }
    if iovas.len() as u64 != limit || at_limit != 0 {
        return Err(format!("{} mappings, dma_avail {at_limit}", iovas.len()));
    }
    let start = Instant::now();
    for iova in &iovas {
        view.unshare(&page.region(), *iova)
            .map_err(|e| e.to_string())?;
    }
    let end = dma_avail(view)?;
    println!(
        "unmapped all in {:?}; dma_avail back to {end}; usage {:?}",
        start.elapsed(),
        view.usage()
    );
    if end != avail0 || view.usage().mappings != 0 {
        return Err(format!(
            "dma_avail {end} (started {avail0}) or usage not back"
        ));
    }
    Ok(())
}

fn direct_mapping(view: Arc<VfioType1>) -> Result<(), String> {
    let avail0 = dma_avail(&view)?;
    let mapper = DirectMapper::new(view.clone(), 4);
    let buf = Chunk::with_page_size(64 << 10, PageSize::Small4K).map_err(|e| e.to_string())?;
    // SAFETY: `buf` outlives the registration (dropped at the end of this function, after
    // `reg`), and no device I/O touches it: only map bookkeeping is exercised.
    let reg = unsafe { mapper.register(buf.as_ptr(), buf.len()) }.map_err(|e| e.to_string())?;
    let a = reg.map(0, 8192).map_err(|e| e.to_string())?;
    let a_iova = a.device_addr();
    drop(a);
    let b = reg.map(0, 8192).map_err(|e| e.to_string())?;
    let same = b.device_addr() == a_iova;
    drop(b);
    let during = dma_avail(&view)?;
    let stats = mapper.stats();
    drop(reg);
    let after = dma_avail(&view)?;
    println!(
        "direct: registered buffer mapped twice at {:#x} (same: {same}); stats {stats:?}; \
         dma_avail {avail0} -> {during} -> {after}",
        a_iova.0
    );
    if !same || stats.hits != 1 || stats.misses != 1 || stats.maps != 1 {
        return Err("the second map did not hit the cache".into());
    }
    if during != avail0 - 1 || after != avail0 || mapper.stats().unmaps != 1 {
        return Err("the registered buffer's mapping was not given back".into());
    }
    drop(buf);
    Ok(())
}
