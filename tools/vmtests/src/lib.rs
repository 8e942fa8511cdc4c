//! # Tidepool VM tests: the guest side of the harness protocol
//!
//! The programs in `src/bin/` are built as static binaries and run, one after another, inside the
//! QEMU guest that `tools/vm/run` boots (see `tools/vm/README.md`). This library holds what
//! every such program shares with the harness:
//!
//! - [`HarnessEnv`]: the environment the guest's `/init` exports (which PCI function is ours,
//!   where hugetlbfs is mounted, which block device the kernel-owned NVMe controller has);
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
use std::path::PathBuf;

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

/// What went wrong reading the harness environment.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// A variable the harness always sets is missing: the program runs outside the VM.
    #[error("{0} is not set: run this program through tools/vm/run, which boots the test VM and sets it")]
    Missing(&'static str),
    /// A variable has a value of the wrong form.
    #[error("{name}={value:?} is malformed: expected {expected}")]
    Malformed {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What form was expected.
        expected: &'static str,
    },
}

/// The environment the guest's `/init` gives every test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HarnessEnv {
    /// PCI addresses (`0000:00:04.0`) of the NVMe functions bound to vfio-pci, first one first
    /// (`TIDEPOOL_NVME_BDFS`; the first is also `TIDEPOOL_NVME_BDF`).
    pub vfio_nvme_bdfs: Vec<String>,
    /// The block device of the NVMe controller left to the kernel's nvme driver
    /// (`TIDEPOOL_KERNEL_NVME_DEV`, e.g. `/dev/nvme1n1`), when the VM has one.
    pub kernel_nvme_dev: Option<PathBuf>,
    /// Where hugetlbfs (2 MiB pages) is mounted (`TIDEPOOL_HUGETLBFS`).
    pub hugetlbfs: PathBuf,
    /// The emulated IOMMU: `intel` or `virtio` (`TIDEPOOL_IOMMU`).
    pub iommu: String,
}

impl HarnessEnv {
    /// Reads the harness environment of this process.
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the harness environment through `lookup` (a test seam for [`HarnessEnv::from_env`]).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let required = |name: &'static str| lookup(name).ok_or(EnvError::Missing(name));
        let bdfs_raw = required("TIDEPOOL_NVME_BDFS")?;
        let vfio_nvme_bdfs: Vec<String> = bdfs_raw
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if vfio_nvme_bdfs.is_empty() || !vfio_nvme_bdfs.iter().all(|b| is_pci_address(b)) {
            return Err(EnvError::Malformed {
                name: "TIDEPOOL_NVME_BDFS",
                value: bdfs_raw,
                expected: "a comma-separated list of PCI addresses like 0000:00:04.0",
            });
        }
        let kernel_nvme_dev = lookup("TIDEPOOL_KERNEL_NVME_DEV")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        Ok(HarnessEnv {
            vfio_nvme_bdfs,
            kernel_nvme_dev,
            hugetlbfs: PathBuf::from(required("TIDEPOOL_HUGETLBFS")?),
            iommu: required("TIDEPOOL_IOMMU")?,
        })
    }

    /// The first NVMe function bound to vfio-pci.
    pub fn nvme_bdf(&self) -> &str {
        // from_lookup guarantees at least one entry.
        &self.vfio_nvme_bdfs[0]
    }

    /// The sysfs directory of the first vfio NVMe function.
    pub fn nvme_sysfs_path(&self) -> PathBuf {
        PathBuf::from("/sys/bus/pci/devices").join(self.nvme_bdf())
    }
}

/// Whether `s` has the form `DDDD:BB:SS.F` (hex domain, bus, slot; function 0-7).
pub fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_hexdigit);
    b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn reads_what_init_exports() {
        let e = HarnessEnv::from_lookup(env(&[
            ("TIDEPOOL_NVME_BDFS", "0000:00:04.0,0000:00:05.0"),
            ("TIDEPOOL_KERNEL_NVME_DEV", "/dev/nvme1n1"),
            ("TIDEPOOL_HUGETLBFS", "/dev/hugepages"),
            ("TIDEPOOL_IOMMU", "intel"),
        ]))
        .unwrap();
        assert_eq!(e.nvme_bdf(), "0000:00:04.0");
        assert_eq!(e.vfio_nvme_bdfs.len(), 2);
        assert_eq!(e.kernel_nvme_dev, Some(PathBuf::from("/dev/nvme1n1")));
        assert_eq!(
            e.nvme_sysfs_path(),
            PathBuf::from("/sys/bus/pci/devices/0000:00:04.0")
        );
    }

    #[test]
    fn empty_kernel_device_means_none() {
        let e = HarnessEnv::from_lookup(env(&[
            ("TIDEPOOL_NVME_BDFS", "0000:00:04.0"),
            ("TIDEPOOL_KERNEL_NVME_DEV", ""),
            ("TIDEPOOL_HUGETLBFS", "/dev/hugepages"),
            ("TIDEPOOL_IOMMU", "virtio"),
        ]))
        .unwrap();
        assert_eq!(e.kernel_nvme_dev, None);
    }

    #[test]
    fn outside_the_vm_says_how_to_run() {
        let err = HarnessEnv::from_lookup(env(&[])).unwrap_err();
        assert!(matches!(err, EnvError::Missing("TIDEPOOL_NVME_BDFS")));
        assert!(err.to_string().contains("tools/vm/run"));
    }

    #[test]
    fn rejects_malformed_addresses() {
        for bad in [
            "",
            "00:04.0",
            "0000:00:04.8",
            "0000:00:04.0,x",
            "0000-00:04.0",
        ] {
            let r = HarnessEnv::from_lookup(env(&[
                ("TIDEPOOL_NVME_BDFS", bad),
                ("TIDEPOOL_HUGETLBFS", "/dev/hugepages"),
                ("TIDEPOOL_IOMMU", "intel"),
            ]));
            assert!(
                matches!(r, Err(EnvError::Malformed { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn pci_address_shape() {
        assert!(is_pci_address("0000:00:04.0"));
        assert!(is_pci_address("abcd:ef:1f.7"));
        assert!(!is_pci_address("0000:00:04"));
        assert!(!is_pci_address("0000:00:0g.0"));
    }
}
