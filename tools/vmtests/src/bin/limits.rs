//! # limits: bad input and exhausted limits on real VFIO, one clear typed error each
//!
//! 1. **A PCI address that does not exist** (`0000:00:1f.7`): `DeviceError::Pci`, "no such PCI
//!    device".
//! 2. **Not a PCI address** (`04.0`, `/dev/nvme0`): `DeviceError::Pci`, "not a PCI address".
//! 3. **A device bound to another driver** (the kernel-owned NVMe at 00:0a.0, `--kernel-nvme`):
//!    `DeviceError::Pci` naming the driver and the commands that rebind it.
//! 4. **1 GiB pages** where none are reserved: `MemoryError::NoHugepages`, naming the page size
//!    and how to reserve them; a pool whose chunks are smaller than its page size is refused
//!    up front. (The 4 KiB fallback of `MemoryConfig::allow_small_pages` is covered by the
//!    host tests: a 1 GiB chunk of locked 4 KiB pages does not fit this 2 GiB guest.)
//! 5. **The VFIO mapping limit reached during growth**: the container's `dma_avail` is used up
//!    with single-page mappings, then a pool over the same view must grow. An awaiting request
//!    ends within its bound with `PoolError::GrowthFailed` whose cause is
//!    `ShareError::MappingLimit`; the immediate path reports the same cause; after the filler
//!    mappings are removed, the pool grows again (growth retries with backoff) and the request
//!    succeeds. Nothing is left mapped or in use.
//!
//! Not covered here: an IOMMU group that is not viable (QEMU puts each emulated function in
//! a group of its own, so no such group exists in this VM); the unit tests check the message.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use tidepool::device::vfio::VfioDevice;
use tidepool::device::DeviceError;
use tidepool::memory::{Chunk, MemoryConfig, MemoryError, PageSize};
use tidepool::pool::{Pool, PoolConfig, PoolError};
use tidepool::share::{DeviceView, ShareError};
use tidepool_vmtests::HarnessEnv;

type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("limits: PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("limits: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Res<()> {
    let env = HarnessEnv::from_env().map_err(|e| e.to_string())?;
    bad_addresses()?;
    if env.kernel_nvme_dev.is_some() {
        other_driver("0000:00:0a.0")?;
    } else {
        println!("3. skipped: no kernel-owned NVMe (run with --kernel-nvme)");
    }
    gigantic_pages(env.nvme_bdf())?;
    mapping_limit_during_growth(env.nvme_bdf())?;
    Ok(())
}

fn expect_pci(bdf: &str, needle: &str) -> Res<String> {
    match VfioDevice::open(bdf, u64::MAX) {
        Err(DeviceError::Pci { problem, .. }) if problem.contains(needle) => Ok(problem),
        Err(e) => Err(format!(
            "{bdf}: expected a PCI error saying {needle:?}, got: {e}"
        )),
        Ok(_) => Err(format!("{bdf}: opened")),
    }
}

fn bad_addresses() -> Res<()> {
    let missing = expect_pci("0000:00:1f.7", "no such PCI device")?;
    println!("1. 0000:00:1f.7: {missing}");
    for bad in ["04.0", "/dev/nvme0", "0000:00:04.0x"] {
        let why = expect_pci(bad, "not a PCI address")?;
        println!("2. {bad:?}: {why}");
    }
    Ok(())
}

fn other_driver(bdf: &str) -> Res<()> {
    let why = expect_pci(bdf, "bound to driver nvme, not vfio-pci")?;
    if !why.contains("driver_override") {
        return Err(format!(
            "{bdf}: the message does not say how to rebind: {why}"
        ));
    }
    println!("3. {bdf}: {why}");
    Ok(())
}

fn gigantic_pages(bdf: &str) -> Res<()> {
    let reserved =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "0 (no 1 GiB page support)".into());
    if reserved != "0" && !reserved.starts_with("0 ") {
        println!("4. skipped: {reserved} 1 GiB pages are reserved here");
        return Ok(());
    }
    match Chunk::with_page_size(1 << 30, PageSize::Huge1G) {
        Err(e @ MemoryError::NoHugepages { .. }) => {
            let text = e.to_string();
            if !text.contains("hugepages") {
                return Err(format!("the 1 GiB error does not say what to do: {text}"));
            }
            println!("4. 1 GiB chunk with none reserved: {text}");
        }
        Err(e) => return Err(format!("1 GiB chunk: expected NoHugepages, got {e}")),
        Ok(_) => return Err("a 1 GiB chunk was made with no 1 GiB pages reserved".into()),
    }
    // A pool asking for 1 GiB pages with chunks smaller than a page is refused up front, with
    // the page size named (not an mmap error later).
    let (_dev, view) = VfioDevice::open(bdf, u64::MAX).map_err(|e| e.to_string())?;
    let cfg = PoolConfig {
        memory: MemoryConfig {
            page_size: PageSize::Huge1G,
            allow_small_pages: true,
        },
        chunk_bytes: 2 << 20,
        prefill_bytes: 2 << 20,
        ..PoolConfig::default()
    };
    match Pool::new(view, cfg) {
        Err(e) if e.to_string().contains("1073741824 B page") => {
            println!("   a pool of 2 MiB chunks on 1 GiB pages: {e}")
        }
        Err(e) => return Err(format!("2 MiB chunks on 1 GiB pages: unclear error: {e}")),
        Ok(_) => return Err("a pool of 2 MiB chunks on 1 GiB pages was accepted".into()),
    }
    Ok(())
}

fn mapping_limit_during_growth(bdf: &str) -> Res<()> {
    let (_dev, view) = VfioDevice::open(bdf, u64::MAX).map_err(|e| e.to_string())?;
    let cfg = PoolConfig {
        chunk_bytes: 2 << 20,
        prefill_bytes: 2 << 20,
        max_bytes: 16 << 20,
        high_watermark: 2 << 20,
        low_watermark: 0,
        max_buffer: 1 << 20,
        reserve_bytes: 0,
        transient: false,
        growth_failure_wait: Duration::from_millis(500),
        shrink_delay: Duration::from_secs(60),
        ..PoolConfig::default()
    };
    let pool = Pool::new(view.clone(), cfg).map_err(|e| e.to_string())?;
    // Use up the container's mappings with one 4 KiB page mapped again and again.
    let page = Chunk::with_page_size(4096, PageSize::Small4K).map_err(|e| e.to_string())?;
    let mut filler = Vec::new();
    let start = Instant::now();
    let full = loop {
        match view.share(&page.region()) {
            Ok(iova) => filler.push(iova),
            Err(e) => break e,
        }
        if filler.len() > 1 << 20 {
            return Err("the container never ran out of mappings".into());
        }
    };
    if !matches!(full, ShareError::MappingLimit { .. }) {
        return Err(format!("filling the container ended with {full}"));
    }
    println!(
        "5. {} filler mappings in {:?}, then: {full}",
        filler.len(),
        start.elapsed()
    );
    // Hold the prefilled chunk so the next request needs growth.
    let held: Vec<_> = (0..2)
        .map(|_| pool.try_alloc(1 << 20))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("taking the prefill: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    let waited = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), pool.alloc(1 << 20)).await
    });
    let err = match waited {
        Err(_) => return Err("the awaiting request hung with growth failing".into()),
        Ok(Ok(_)) => return Err("the pool grew past the mapping limit".into()),
        Ok(Err(e)) => e,
    };
    match (&err, err.growth_cause()) {
        (
            PoolError::GrowthFailed { .. },
            Some(PoolError::Share(ShareError::MappingLimit { .. })),
        ) => {
            println!("   awaiting request ended after {:?}: {err}", t.elapsed())
        }
        _ => {
            return Err(format!(
                "expected GrowthFailed caused by MappingLimit, got {err}"
            ))
        }
    }
    match pool.try_alloc(1 << 20) {
        Err(e)
            if matches!(
                e.growth_cause(),
                Some(PoolError::Share(ShareError::MappingLimit { .. }))
            ) =>
        {
            println!("   immediate path: {e}")
        }
        Err(e) => {
            return Err(format!(
                "immediate path: expected the MappingLimit cause, got {e}"
            ))
        }
        Ok(_) => return Err("immediate path got memory past the mapping limit".into()),
    }
    for iova in filler.drain(..) {
        view.unshare(&page.region(), iova)
            .map_err(|e| e.to_string())?;
    }
    let t = Instant::now();
    let got = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), pool.alloc(1 << 20)).await
    });
    match got {
        Ok(Ok(_grown)) => println!(
            "   filler removed: the pool grew again after {:?} ({} chunks, {} growth failures \
             counted)",
            t.elapsed(),
            pool.stats().chunks,
            pool.stats().growth_failures
        ),
        Ok(Err(e)) => return Err(format!("after the filler went, growth still failed: {e}")),
        Err(_) => return Err("after the filler went, the request hung".into()),
    }
    drop(held);
    if pool.stats().in_use_bytes != 0 {
        return Err(format!("{} B in use at the end", pool.stats().in_use_bytes));
    }
    drop(pool);
    if view.usage().mappings != 0 {
        return Err(format!("{} mappings left", view.usage().mappings));
    }
    Ok(())
}
