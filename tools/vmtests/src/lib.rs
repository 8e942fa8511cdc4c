//! # Tidepool VM tests: the guest side of the harness protocol
//!
//! The programs in `src/bin/` are built as static binaries and run, one after another, inside the
//! QEMU guest that `tools/vm/run` boots (see `tools/vm/README.md`). This library holds what
//! every such program shares with the harness:
//!
//! - [`HarnessEnv`]: the environment the guest's `/init` exports (which PCI function is ours,
//!   where hugetlbfs is mounted, which block device the kernel-owned NVMe controller has);
//! - [`mmio`]: a BAR mmapped from a VFIO device fd, and PCI config space access through VFIO,
//!   the two raw device accesses tests need before Tidepool's own VFIO layer replaces them;
//! - [`expect_iommu_fault`]: the one way a test declares that it *causes* an IOMMU fault on
//!   purpose. The harness reads the guest's dmesg after every test and fails a test that caused a
//!   fault without declaring it, and one that declared it but caused none.
//!
//! A test reports success with exit status 0 and failure with anything else; it prints what it
//! found on stdout (the harness streams it and keeps it in `target/vm/logs/<test>.out`).
//!
//! ```
//! // In a test that unmaps a buffer and then lets the device DMA into it:
//! tidepool_vmtests::expect_iommu_fault();
//! ```

use std::io::Write;

mod env;
pub mod mmio;
mod rng;

pub use env::{is_pci_address, EnvError, HarnessEnv};
pub use rng::{env_u64, Rng};

/// The line a test prints (alone on its line, on stdout) to tell the harness that it expects at
/// least one IOMMU fault in the guest's dmesg while it runs, instead of none.
pub const EXPECT_IOMMU_FAULT_MARKER: &str = "TIDEPOOL-EXPECT-IOMMU-FAULT";

/// Declares that this test deliberately causes an IOMMU fault: prints
/// [`EXPECT_IOMMU_FAULT_MARKER`] on its own line and flushes stdout, so the marker reaches the
/// harness even if the test is killed later. Call it before causing the fault.
pub fn expect_iommu_fault() {
    let mut out = std::io::stdout().lock();
    // A failed write to the serial console cannot be reported anywhere better; the harness then
    // sees no marker and fails the test, which is the safe outcome.
    let _ = writeln!(out, "{EXPECT_IOMMU_FAULT_MARKER}");
    let _ = out.flush();
}
