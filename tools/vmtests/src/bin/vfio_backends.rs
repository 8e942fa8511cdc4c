//! # vfio_backends: the VFIO type1 and iommufd backends side by side, in one boot
//!
//! Needs a kernel with iommufd and VFIO cdevs (`tools/vm/run --kernel iommufd`); phase 4 needs
//! two controllers (`--vfio-nvme 2`). Every choice here is explicit, so `TIDEPOOL_VFIO_BACKEND`
//! does not matter.
//! 1. **Support and the automatic choice**: `/dev/iommu` and the function's cdev exist, and
//!    `auto` picks iommufd.
//! 2. **What iommufd reports**: the IOAS's allowed ranges after the attach
//!    (`IOMMU_IOAS_IOVA_RANGES`), the reserved ranges between them (under the Intel IOMMU the
//!    MSI window 0xfee00000 must be reserved), the IOVA alignment, and `IOMMU_GET_HW_INFO`
//!    (`intel-vt-d` under the Intel IOMMU). An unmap-all of the IOAS reports the 2 MiB just
//!    shared, and the view's later unshare of it fails and keeps the record (IOVA reserved).
//! 3. **The NVMe driver on each backend**: `Controller::open_with_backend` with type1, then
//!    iommufd: the pool's view is `vfio-type1` / `iommufd`, and 8 KiB written and read back
//!    match byte for byte.
//! 4. **Domains across backends**: controller A on type1, controller B on iommufd: a buffer of
//!    either pool submitted on the other controller is refused with `ForeignBuffer`.
//! 5. **Map+unmap cost**: one 4 KiB chunk and one 2 MiB hugepage chunk shared and unshared
//!    `PAIRS` times through each backend's view, in rounds ordered type1, iommufd, iommufd,
//!    type1 (ABBA); every round's median is printed, then the median of each backend's rounds.
//!    Measured under TCG on a shared host: the ratio is the number to read, not the µs.
//!
//! Exit 0 = pass; the harness also fails the test on any IOMMU fault.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use tidepool::data::DmaData;
use tidepool::device::backend::{choose, BackendChoice, KernelSupport, VfioBackend, VfioDomain};
use tidepool::device::iommufd::CdevDevice;
use tidepool::device::vfio::Bdf;
use tidepool::memory::{Chunk, PageSize};
use tidepool::pool::{DmaBuf, Pool};
use tidepool::share::iommufd::Ioas;
use tidepool::share::DeviceView;
use tidepool_nvme::{Controller, ControllerConfig, IoQueue, NvmeError};
use tidepool_vmtests::HarnessEnv;

type Res<T> = Result<T, String>;

const LEN: usize = 8192;
/// share+unshare pairs timed per size and round.
const PAIRS: usize = 1000;
/// Pairs run before timing (page-table allocation, caches).
const WARMUP: usize = 50;
/// Round order: A B B A.
const ROUNDS: [VfioBackend; 4] = [
    VfioBackend::Type1,
    VfioBackend::Iommufd,
    VfioBackend::Iommufd,
    VfioBackend::Type1,
];

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("vfio_backends: PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("vfio_backends: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Res<()> {
    let env = HarnessEnv::from_env().map_err(|e| e.to_string())?;
    let bdf = env.nvme_bdf().to_string();
    support_and_choice(&bdf)?;
    iommufd_facts(&bdf, &env.iommu)?;
    for backend in [VfioBackend::Type1, VfioBackend::Iommufd] {
        io_on(&bdf, backend)?;
    }
    if env.vfio_nvme_bdfs.len() >= 2 {
        cross_backend_domains(&env.vfio_nvme_bdfs[0], &env.vfio_nvme_bdfs[1])?;
    } else {
        println!("phase 4 skipped: one vfio NVMe function (run with --vfio-nvme 2)");
    }
    map_cost(&bdf)
}

fn support_and_choice(bdf: &str) -> Res<()> {
    let sysfs = Bdf::parse(bdf).map_err(|e| e.to_string())?.sysfs_path();
    let support = KernelSupport::probe(&sysfs);
    println!("phase 1: {bdf}: {support:?}");
    if !support.iommufd || !support.cdev {
        return Err(format!(
            "this kernel lacks iommufd or VFIO cdevs ({support:?}): run with --kernel iommufd"
        ));
    }
    let auto = choose(BackendChoice::Auto, support, bdf).map_err(|e| e.to_string())?;
    if auto != VfioBackend::Iommufd {
        return Err(format!("auto chose {auto} although iommufd is there"));
    }
    println!("  auto chooses {auto}");
    Ok(())
}

fn iommufd_facts(bdf: &str, iommu: &str) -> Res<()> {
    println!("phase 2: what iommufd reports for {bdf} ({iommu} IOMMU)");
    let ioas = Ioas::new().map_err(|e| e.to_string())?;
    let before = ioas.iova_ranges().map_err(|e| e.to_string())?;
    let dev = CdevDevice::open_in(&ioas, bdf).map_err(|e| e.to_string())?;
    let ranges = ioas.iova_ranges().map_err(|e| e.to_string())?;
    let hex = |rs: &[tidepool::share::iommufd::IovaRange]| {
        rs.iter()
            .map(|r| format!("[{:#x}, {:#x}]", r.start, r.end))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "  IOAS {} before attach: allowed {}",
        ioas.id(),
        hex(&before.allowed)
    );
    println!(
        "  after attaching {} (dev_id {}): allowed {}; reserved {}; alignment {} B",
        dev.bdf(),
        dev.dev_id(),
        hex(&ranges.allowed),
        hex(&ranges.reserved()),
        ranges.alignment
    );
    if ranges.allowed.is_empty() {
        return Err("no allowed IOVA range after the attach".into());
    }
    let hw = dev.iommu_hw_info().map_err(|e| e.to_string())?;
    println!("  IOMMU_GET_HW_INFO: {hw:?}");
    // The teardown check pool_vfio relies on is not vacuous: unmap-all reports what is
    // mapped, and an unshare the kernel can no longer do fails and keeps the IOVA reserved.
    let view = ioas.view(u64::MAX).map_err(|e| e.to_string())?;
    let chunk = Chunk::with_page_size(2 << 20, PageSize::Huge2M).map_err(|e| e.to_string())?;
    let iova = view.share(&chunk.region()).map_err(|e| e.to_string())?;
    let all = ioas.unmap_all().map_err(|e| e.to_string())?;
    if all != chunk.len() as u64 {
        return Err(format!(
            "unmap-all found {all} B mapped, not the {} B chunk",
            chunk.len()
        ));
    }
    match view.unshare(&chunk.region(), iova) {
        Ok(()) => return Err("unshare of an already unmapped range succeeded".into()),
        Err(e) => println!("  unmap-all took {all} B; the stale unshare then fails: {e}"),
    }
    if view.usage().mappings != 1 {
        return Err("the failed unshare did not keep its record (IOVA reserved)".into());
    }
    if iommu == "intel" {
        let msi = 0xfee0_0000u64;
        if !ranges
            .reserved()
            .iter()
            .any(|r| r.start <= msi && msi <= r.end)
        {
            return Err(format!(
                "the MSI window {msi:#x} is not reserved under the Intel IOMMU"
            ));
        }
        if hw.kind != "intel-vt-d" {
            return Err(format!("hardware info says {:?}, not intel-vt-d", hw.kind));
        }
    }
    Ok(())
}

fn cfg() -> ControllerConfig {
    ControllerConfig {
        interrupts: false,
        ..ControllerConfig::default()
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..LEN)
        .map(|i| (i as u8).wrapping_mul(37) ^ seed)
        .collect()
}

fn filled(pool: &Pool, bytes: &[u8]) -> Res<DmaBuf> {
    let mut buf = pool.try_alloc(bytes.len()).map_err(|e| e.to_string())?;
    buf.write_at(0, bytes).map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Polls `q` until one command completes, returning its data.
fn wait_one(q: &mut IoQueue<()>) -> Res<Option<DmaData>> {
    let mut out = Vec::new();
    let start = Instant::now();
    loop {
        q.poll(&mut out).map_err(|e| format!("poll: {e}"))?;
        if let Some(d) = out.pop() {
            d.result.map_err(|e| format!("command: {e}"))?;
            return Ok(d.data);
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err("no completion in 30 s".into());
        }
    }
}

fn io_on(bdf: &str, backend: VfioBackend) -> Res<()> {
    println!("phase 3: the NVMe driver on {backend}");
    let ctrl = Controller::open_with_backend(bdf, BackendChoice::Only(backend), cfg())
        .map_err(|e| format!("open {bdf} on {backend}: {e}"))?;
    let kind = ctrl.pool().view().kind();
    let want = match backend {
        VfioBackend::Type1 => "vfio-type1",
        VfioBackend::Iommufd => "iommufd",
    };
    if kind != want {
        return Err(format!("the pool's view is {kind}, not {want}"));
    }
    let ns = ctrl.namespace(1).map_err(|e| e.to_string())?;
    let mut q = ctrl.create_io_queue::<()>(8).map_err(|e| e.to_string())?;
    let data = pattern(backend as u8 + 1);
    let pool = ctrl.pool().clone();
    let lba = 64 + 16 * backend as u64;
    q.submit_write(&ns, lba, filled(&pool, &data)?, ())
        .map_err(|e| format!("submit write: {}", e.error))?;
    wait_one(&mut q)?;
    let back = pool.try_alloc(LEN).map_err(|e| e.to_string())?;
    q.submit_read(&ns, lba, back, ())
        .map_err(|e| format!("submit read: {}", e.error))?;
    let back = wait_one(&mut q)?
        .and_then(DmaData::into_buf)
        .ok_or("the read gave no buffer back")?;
    let mut got = vec![0u8; LEN];
    back.read_at(0, &mut got).map_err(|e| e.to_string())?;
    if got != data {
        return Err(format!("{backend}: the block read back differs"));
    }
    println!(
        "  {kind}: wrote and read back {LEN} B at LBA {lba} (buffer IOVA {:#x})",
        back.device_addr().0
    );
    Ok(())
}

/// Submits a buffer of `other`'s pool on `q` and expects `ForeignBuffer`.
fn expect_foreign(
    q: &mut IoQueue<()>,
    ns: &tidepool_nvme::Namespace,
    other: &Pool,
    what: &str,
) -> Res<()> {
    let buf = filled(other, &pattern(0x5a))?;
    match q.submit_read(ns, 0, buf, ()) {
        Ok(_) => Err(format!("{what}: a buffer of another domain was accepted")),
        Err(e) => match e.error {
            NvmeError::ForeignBuffer { .. } => {
                println!("  {what}: refused: {}", e.error);
                Ok(())
            }
            other => Err(format!("{what}: expected ForeignBuffer, got {other}")),
        },
    }
}

fn cross_backend_domains(a: &str, b: &str) -> Res<()> {
    println!("phase 4: {a} on type1, {b} on iommufd");
    let ctrl_a = Controller::open_with_backend(a, BackendChoice::Only(VfioBackend::Type1), cfg())
        .map_err(|e| format!("open {a}: {e}"))?;
    let ctrl_b = Controller::open_with_backend(b, BackendChoice::Only(VfioBackend::Iommufd), cfg())
        .map_err(|e| format!("open {b}: {e}"))?;
    let (pool_a, pool_b) = (ctrl_a.pool().clone(), ctrl_b.pool().clone());
    if pool_a.domain() == pool_b.domain() {
        return Err("a type1 container and an IOAS reported the same domain".into());
    }
    let ns_a = ctrl_a.namespace(1).map_err(|e| e.to_string())?;
    let ns_b = ctrl_b.namespace(1).map_err(|e| e.to_string())?;
    let mut qa = ctrl_a.create_io_queue::<()>(8).map_err(|e| e.to_string())?;
    let mut qb = ctrl_b.create_io_queue::<()>(8).map_err(|e| e.to_string())?;
    expect_foreign(
        &mut qa,
        &ns_a,
        &pool_b,
        "iommufd buffer on the type1 controller",
    )?;
    expect_foreign(
        &mut qb,
        &ns_b,
        &pool_a,
        "type1 buffer on the iommufd controller",
    )?;
    Ok(())
}

/// Median of `v` (sorted in place), in µs.
fn median_us(v: &mut [Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6
}

/// Times `PAIRS` share+unshare pairs of `chunk` through `view`; returns the median in µs.
fn time_pairs(view: &dyn DeviceView, chunk: &Chunk) -> Res<f64> {
    let region = chunk.region();
    let one = || -> Res<Duration> {
        let t = Instant::now();
        let addr = view.share(&region).map_err(|e| format!("share: {e}"))?;
        view.unshare(&region, addr)
            .map_err(|e| format!("unshare: {e}"))?;
        Ok(t.elapsed())
    };
    for _ in 0..WARMUP {
        one()?;
    }
    let mut times = Vec::with_capacity(PAIRS);
    for _ in 0..PAIRS {
        times.push(one()?);
    }
    Ok(median_us(&mut times))
}

fn map_cost(bdf: &str) -> Res<()> {
    println!(
        "phase 5: map+unmap cost, {PAIRS} pairs per size per round, rounds {}",
        ROUNDS.map(|b| b.as_str()).join(", ")
    );
    let small = Chunk::with_page_size(4096, PageSize::Small4K).map_err(|e| e.to_string())?;
    let huge = Chunk::with_page_size(2 << 20, PageSize::Huge2M).map_err(|e| e.to_string())?;
    // (backend, 4 KiB median, 2 MiB median) per round
    let mut rounds = Vec::new();
    for (i, &backend) in ROUNDS.iter().enumerate() {
        let domain = VfioDomain::new(backend).map_err(|e| e.to_string())?;
        let _device = domain.open(bdf).map_err(|e| e.to_string())?;
        let view = domain.view(u64::MAX).map_err(|e| e.to_string())?;
        let s = time_pairs(view.as_ref(), &small)?;
        let h = time_pairs(view.as_ref(), &huge)?;
        println!(
            "  round {}: {backend:>7}: 4 KiB {s:8.2} µs   2 MiB {h:8.2} µs",
            i + 1
        );
        rounds.push((backend, s, h));
    }
    let summary = |backend: VfioBackend| {
        let mut s: Vec<f64> = rounds
            .iter()
            .filter(|r| r.0 == backend)
            .map(|r| r.1)
            .collect();
        let mut h: Vec<f64> = rounds
            .iter()
            .filter(|r| r.0 == backend)
            .map(|r| r.2)
            .collect();
        s.sort_by(f64::total_cmp);
        h.sort_by(f64::total_cmp);
        // Two rounds each: the mean of the two round medians.
        (
            s.iter().sum::<f64>() / s.len() as f64,
            h.iter().sum::<f64>() / h.len() as f64,
        )
    };
    let (t1s, t1h) = summary(VfioBackend::Type1);
    let (fds, fdh) = summary(VfioBackend::Iommufd);
    println!("  MAP-COST type1   4KiB {t1s:.2} us  2MiB {t1h:.2} us (mean of its 2 round medians)");
    println!("  MAP-COST iommufd 4KiB {fds:.2} us  2MiB {fdh:.2} us (mean of its 2 round medians)");
    println!(
        "  MAP-COST ratio iommufd/type1: 4KiB {:.2}  2MiB {:.2}",
        fds / t1s,
        fdh / t1h
    );
    Ok(())
}
