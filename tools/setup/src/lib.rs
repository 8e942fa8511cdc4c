//! # tpsetup: prepare a host for Tidepool
//!
//! What SPDK's `scripts/setup.sh` and DPDK's `dpdk-devbind.py` do for their users, for ours:
//!
//! - [`Host::status`]: is the IOMMU on and in which mode, the IOMMU groups, every NVMe (class
//!   `0x0108xx`) and virtio PCI function with its driver and group, hugepages per size and NUMA
//!   node, `RLIMIT_MEMLOCK`, `/dev/vfio` and `/dev/iommu`, and what is missing with the command
//!   that fixes it ([`Status::problems`]).
//! - [`Host::bind`]: gives a PCI function to vfio-pci (`driver_override`, unbind,
//!   `drivers_probe`), refusing one that holds a mounted filesystem, an active swap area or the
//!   root filesystem unless forced; remembers the driver it had under `/run/tpsetup/`.
//! - [`Host::unbind`]: gives it back to that driver (or to the kernel's choice).
//! - [`Host::set_hugepages`]: reserves hugepages of a size, globally or on one NUMA node.
//!
//! Every path is read below a root directory (`/` on a real host): tests build a fake sysfs,
//! procfs and `/dev` in a temporary directory ([`fake::FakeHost`]) and a [`Kernel`] that plays
//! the kernel's part when sysfs files are written.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod bind;
pub mod fake;
pub mod hugepages;
pub mod status;
pub mod usage;

pub use bind::{BindOptions, BindOutcome};
pub use hugepages::{HugepageOutcome, HugepageSize};
pub use status::Status;

/// The driver Tidepool's VFIO devices are bound to.
pub const VFIO_PCI: &str = "vfio-pci";

/// What went wrong. Every variant displays as one line that names the reason and, where there
/// is one, the override or the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Text that is not a PCI address.
    #[error("bad PCI address '{0}': expected domain:bus:device.function in hex, like 0000:01:00.0 (see `lspci -D`)")]
    BadBdf(String),
    /// No such PCI function.
    #[error("no PCI device {0}: {1} does not exist (see `lspci -D` or `tpsetup status`)")]
    NoDevice(String, PathBuf),
    /// The system uses the device: binding it would pull a disk from under it.
    #[error(
        "refusing to bind {bdf}: {reason}; stop using it first, or pass --force to bind it anyway"
    )]
    InUse {
        /// The device.
        bdf: String,
        /// What uses it, e.g. "nvme1n1p1 is mounted on /data".
        reason: String,
    },
    /// A process holds the device's VFIO group open: unbinding would block until it lets go.
    #[error("refusing to unbind {bdf}: {reason}; stop that process first, or pass --force (the unbind then waits until it lets go)")]
    Busy {
        /// The device.
        bdf: String,
        /// Which process holds which file.
        reason: String,
    },
    /// The driver could not be loaded.
    #[error("cannot load {module}: {reason}; load it by hand (`modprobe {module}`) and retry")]
    Modprobe {
        /// The module.
        module: String,
        /// What modprobe said.
        reason: String,
    },
    /// The kernel did not end up where we asked.
    #[error("{bdf}: {what}")]
    NotBound {
        /// The device.
        bdf: String,
        /// What happened instead.
        what: String,
    },
    /// A sysfs or state file could not be read or written.
    #[error("{action} {path}: {source}{hint}")]
    Io {
        /// "writing", "reading", ...
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
        /// A hint such as " (run as root)".
        hint: &'static str,
    },
    /// A hugepage request that cannot be honoured.
    #[error("{0}")]
    Hugepages(String),
}

impl Error {
    fn io(action: &'static str, path: &Path, source: io::Error) -> Error {
        let hint = match source.kind() {
            io::ErrorKind::PermissionDenied => " (run tpsetup as root)",
            _ => "",
        };
        Error::Io {
            action,
            path: path.to_path_buf(),
            source,
            hint,
        }
    }
}

/// A validated PCI address in sysfs's long, lower-case form, `0000:01:00.0`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf(String);

impl Bdf {
    /// Parses `DDDD:BB:DD.F` or the short `BB:DD.F` (domain 0), hex, function 0-7: the
    /// grammar of the device layer's [`tidepool::device::vfio::Bdf`], with tpsetup's error.
    pub fn parse(text: &str) -> Result<Bdf, Error> {
        tidepool::device::vfio::Bdf::parse(text)
            .map(|b| Bdf(b.as_str().to_string()))
            .map_err(|_| Error::BadBdf(text.to_string()))
    }

    /// `0000:01:00.0`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Bdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Bdf {
    type Err = Error;
    fn from_str(s: &str) -> Result<Bdf, Error> {
        Bdf::parse(s)
    }
}

/// The kernel's side of the sysfs files tpsetup writes. [`RealKernel`] writes the files and
/// runs `modprobe`; tests use [`fake::FakeKernel`], which updates a fake tree the way the kernel
/// would (unbind removes the `driver` link, `drivers_probe` binds the override, ...).
pub trait Kernel: Send + Sync {
    /// Writes `value` to the (existing) file `path`.
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
    /// Loads a module, e.g. `vfio-pci`.
    fn modprobe(&self, module: &str) -> Result<(), String>;
}

/// The real kernel: plain writes to sysfs and `modprobe`.
#[derive(Debug, Default)]
pub struct RealKernel;

impl Kernel for RealKernel {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        use std::io::Write;
        // No O_CREAT: a sysfs attribute that is missing is an error, not a new file.
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(value.as_bytes())
    }

    fn modprobe(&self, module: &str) -> Result<(), String> {
        let out = std::process::Command::new("modprobe")
            .arg(module)
            .output()
            .map_err(|e| format!("running modprobe: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            let line = err.lines().next().unwrap_or("").trim();
            Err(format!("modprobe exited with {}: {line}", out.status))
        }
    }
}

/// A host to inspect and change: the root its sysfs, procfs, `/dev` and `/run` live under, and
/// the kernel that answers writes.
pub struct Host {
    root: PathBuf,
    kernel: Box<dyn Kernel>,
    settle: Duration,
}

impl Host {
    /// This machine: root `/`, real writes.
    pub fn system() -> Host {
        Host::new("/", Box::new(RealKernel))
    }

    /// A host whose files live below `root` (a fake tree in tests, or `--sysfs-root`).
    pub fn new(root: impl Into<PathBuf>, kernel: Box<dyn Kernel>) -> Host {
        Host {
            root: root.into(),
            kernel,
            settle: Duration::from_secs(2),
        }
    }

    /// How long to wait for a driver to appear after `drivers_probe` (default 2 s).
    pub fn with_settle(mut self, settle: Duration) -> Host {
        self.settle = settle;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `rel` (e.g. `sys/bus/pci/devices`) below the root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    /// The sysfs directory of a PCI function.
    pub fn pci_dir(&self, bdf: &Bdf) -> PathBuf {
        self.path("sys/bus/pci/devices").join(bdf.as_str())
    }

    /// Where tpsetup remembers the driver a device had before [`Host::bind`].
    pub fn state_dir(&self) -> PathBuf {
        self.path("run/tpsetup")
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), Error> {
        tracing::debug!(path = %path.display(), value, "sysfs write");
        self.kernel
            .write(path, value)
            .map_err(|e| Error::io("writing", path, e))
    }
}

/// The last path component of a symlink's target: the driver of `<dev>/driver`, the group of
/// `<dev>/iommu_group`.
pub(crate) fn link_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// A sysfs attribute, trimmed; `None` when missing or unreadable.
pub(crate) fn read_trim(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The directory entries' names, sorted; empty when the directory is missing.
pub(crate) fn list_dir(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(path)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_forms() {
        assert_eq!(Bdf::parse("01:00.0").unwrap().as_str(), "0000:01:00.0");
        assert_eq!(Bdf::parse("0000:AF:1f.7").unwrap().as_str(), "0000:af:1f.7");
        for bad in [
            "",
            "0000:00:04",
            "00:04.8",
            "0000:00:20.0",
            "x:00:04.0",
            "1:2:3:4.0",
        ] {
            let e = Bdf::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad PCI address '{bad}'")), "{e}");
        }
    }
}
