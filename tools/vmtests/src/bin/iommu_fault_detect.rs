//! # iommu_fault_detect: proves the harness sees an IOMMU fault
//!
//! A test that asserts "no IOMMU fault" is only worth something if a fault, when it happens, is
//! seen. QEMU's devices complete I/O "successfully" even when the IOMMU blocked their DMA; the
//! only evidence is a line in the guest's dmesg, which the harness scans after every test. This
//! test causes exactly such a DMA on purpose and declares it with
//! [`tidepool_vmtests::expect_iommu_fault`], so the harness passes it only if it finds at least
//! one fault line in this test's dmesg:
//!
//! 1. open the vfio NVMe function (fresh container: nothing is mapped in its IOMMU domain);
//! 2. enable PCI bus mastering, disable the controller, point the admin submission and
//!    completion queues (ASQ/ACQ) at IOVAs that are valid but never mapped, enable it;
//! 3. ring the admin submission doorbell: the controller fetches a command from ASQ, the IOMMU
//!    blocks the read, the guest logs `DMAR: [DMA Read ...] fault addr` (or a virtio-iommu fault);
//! 4. check the controller reports the failed fetch (CSTS.CFS, Controller Fatal Status), then
//!    disable it again.
//!
//! With `--undeclared` it skips the declaration: the harness must then fail it for an unexpected
//! fault. That is how the fault check itself is tested (`tools/vm/run iommu_fault_detect:--undeclared`
//! must exit 1).

use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool_vmtests::mmio::{ConfigSpace, MmioError, MmioRegion};
use tidepool_vmtests::{EnvError, HarnessEnv};
use vfio_bindings::bindings::vfio::VFIO_PCI_BAR0_REGION_INDEX;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioOps};

const REG_CAP: usize = 0x00;
const REG_CC: usize = 0x14;
const REG_CSTS: usize = 0x1c;
const REG_AQA: usize = 0x24;
const REG_ASQ: usize = 0x28;
const REG_ACQ: usize = 0x30;
/// Submission queue 0 tail doorbell (offset 0x1000 for any doorbell stride).
const REG_SQ0TDBL: usize = 0x1000;

const CSTS_RDY: u32 = 1 << 0;
const CSTS_CFS: u32 = 1 << 1;
/// CC: EN, I/O submission entry 2^6 = 64 bytes, I/O completion entry 2^4 = 16 bytes, NVM set,
/// 4 KiB pages.
const CC_ENABLE: u32 = 1 | 6 << 16 | 4 << 20;

/// Valid (inside the Intel and virtio IOMMU ranges) and 4 KiB aligned, but never mapped in this
/// test's fresh container.
const UNMAPPED_ASQ: u64 = 0x4000_0000;
const UNMAPPED_ACQ: u64 = 0x4000_1000;

#[derive(Debug, thiserror::Error)]
enum FaultTestError {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error("opening the VFIO container failed: {0}")]
    Container(#[source] VfioError),
    #[error("opening {bdf} through VFIO failed: {source}")]
    Device {
        bdf: String,
        #[source]
        source: VfioError,
    },
    #[error("NVMe register BAR: {0}")]
    Bar(#[from] MmioError),
    #[error("enabling bus mastering in config space failed: {0}")]
    BusMaster(#[source] std::io::Error),
    #[error("CSTS.RDY did not become {want} within {ms} ms (CSTS={csts:#x})")]
    NotReady { want: bool, ms: u64, csts: u32 },
    #[error("the controller did not report the blocked fetch (CSTS={csts:#x}, no CFS within 2 s): did its DMA get through?")]
    NoFetchFailure { csts: u32 },
}

fn main() -> ExitCode {
    let declare = !std::env::args().any(|a| a == "--undeclared");
    match run(declare) {
        Ok(()) => {
            println!("iommu_fault_detect: PASS (the harness must find the fault in dmesg)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("iommu_fault_detect: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sets up the controller with unmapped admin queues, rings the doorbell, and checks that the
/// controller saw its command fetch fail.
fn run(declare: bool) -> Result<(), FaultTestError> {
    let env = HarnessEnv::from_env()?;
    let bdf = env.nvme_bdf().to_owned();
    let container = Arc::new(VfioContainer::new(None).map_err(FaultTestError::Container)?);
    let device = VfioDevice::new(
        &env.nvme_sysfs_path(),
        container.clone() as Arc<dyn VfioOps>,
        false,
    )
    .map_err(|source| FaultTestError::Device {
        bdf: bdf.clone(),
        source,
    })?;
    ConfigSpace::new(&device)
        .enable_bus_master()
        .map_err(FaultTestError::BusMaster)?;
    let bar = MmioRegion::map_bar(&device, VFIO_PCI_BAR0_REGION_INDEX, 0x2000)?;
    // CAP.TO: worst-case time for CSTS.RDY to change, in 500 ms units.
    let ready_timeout = Duration::from_millis(((bar.read64(REG_CAP) >> 24) & 0xff).max(1) * 500);

    bar.write32(REG_CC, 0);
    wait_csts(&bar, CSTS_RDY, 0, ready_timeout).map_err(|csts| FaultTestError::NotReady {
        want: false,
        ms: ready_timeout.as_millis() as u64,
        csts,
    })?;
    bar.write32(REG_AQA, 1 << 16 | 1); // two entries in each admin queue (0-based sizes)
    bar.write64(REG_ASQ, UNMAPPED_ASQ);
    bar.write64(REG_ACQ, UNMAPPED_ACQ);
    bar.write32(REG_CC, CC_ENABLE);
    wait_csts(&bar, CSTS_RDY, CSTS_RDY, ready_timeout).map_err(|csts| {
        FaultTestError::NotReady {
            want: true,
            ms: ready_timeout.as_millis() as u64,
            csts,
        }
    })?;
    println!(
        "iommu_fault_detect: {bdf} (device fd {}) enabled with ASQ={UNMAPPED_ASQ:#x} ACQ={UNMAPPED_ACQ:#x}, neither mapped",
        device.as_raw_fd()
    );

    if declare {
        tidepool_vmtests::expect_iommu_fault();
    } else {
        println!("iommu_fault_detect: NOT declaring the fault (--undeclared): the harness must fail this test");
    }
    bar.write32(REG_SQ0TDBL, 1);
    let fetch = wait_csts(&bar, CSTS_CFS, CSTS_CFS, Duration::from_secs(2));
    let csts = bar.read32(REG_CSTS);
    bar.write32(REG_CC, 0);
    let _ = wait_csts(&bar, CSTS_RDY, 0, ready_timeout);
    println!(
        "iommu_fault_detect: doorbell rung; CSTS={csts:#x} (CFS={})",
        (csts & CSTS_CFS) >> 1
    );
    fetch.map_err(|csts| FaultTestError::NoFetchFailure { csts })
}

/// Polls CSTS until `csts & mask == want`, for at most `limit`; on timeout returns the last CSTS.
fn wait_csts(bar: &MmioRegion, mask: u32, want: u32, limit: Duration) -> Result<(), u32> {
    let start = Instant::now();
    loop {
        let csts = bar.read32(REG_CSTS);
        if csts & mask == want {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(csts);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
