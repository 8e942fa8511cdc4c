//! Which VFIO backend opens a device: the legacy **type1** container (`/dev/vfio/vfio` and the
//! IOMMU group, [`super::vfio`]) or **iommufd** with the device's cdev (`/dev/iommu` and
//! `/dev/vfio/devices/vfioN`, [`super::iommufd`]).
//!
//! - [`BackendChoice::Auto`] (the default) takes iommufd when the kernel has it for this device
//!   (`/dev/iommu` exists and the device has a cdev), type1 otherwise. Modern distributions'
//!   VFIO is iommufd; type1 remains for older kernels and those built without
//!   `CONFIG_IOMMUFD`/`CONFIG_VFIO_DEVICE_CDEV` (Debian bookworm's).
//! - A program picks one in the API ([`open_vfio`], [`VfioDomain::new`]), and a user with the
//!   environment variable [`BACKEND_ENV`] (`TIDEPOOL_VFIO_BACKEND=auto|type1|iommufd`), which
//!   [`BackendChoice::from_env`] reads (the NVMe driver's `Controller::open` does).
//!   Asking for iommufd where the kernel lacks it is an error that names what is missing,
//!   never a silent fall-back.
//!
//! Both backends give the same [`PciDevice`] and a [`DeviceView`] whose domain is its IOMMU
//! domain (a type1 container or an IOAS): a buffer of one domain given to a device of another is
//! refused by drivers, whichever backends the two use.

use std::path::Path;
use std::sync::Arc;

use super::iommufd::{cdev_path, CdevDevice};
use super::vfio::{current_driver, Bdf, VfioDevice};
use super::{DeviceError, PciDevice};
use crate::share::iommufd::Ioas;
use crate::share::vfio::VfioContainer;
use crate::share::DeviceView;

/// The environment variable that picks the backend: `auto` (or unset), `type1`, `iommufd`.
pub const BACKEND_ENV: &str = "TIDEPOOL_VFIO_BACKEND";

/// A VFIO backend.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum VfioBackend {
    /// The legacy container: `/dev/vfio/vfio`, the IOMMU group, `VFIO_IOMMU_MAP_DMA`.
    Type1,
    /// iommufd: `/dev/iommu`, an IOAS, the device's cdev, `IOMMU_IOAS_MAP`.
    Iommufd,
}

impl VfioBackend {
    /// "type1" or "iommufd".
    pub fn as_str(self) -> &'static str {
        match self {
            VfioBackend::Type1 => "type1",
            VfioBackend::Iommufd => "iommufd",
        }
    }
}

impl std::fmt::Display for VfioBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the caller asks for: a backend, or the best the kernel has.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum BackendChoice {
    /// iommufd when the kernel has it for the device, type1 otherwise.
    #[default]
    Auto,
    /// This backend or an error.
    Only(VfioBackend),
}

impl BackendChoice {
    /// Parses `auto`, `type1` or `iommufd` (case-insensitive, surrounding blanks ignored).
    pub fn parse(text: &str) -> Result<BackendChoice, DeviceError> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(BackendChoice::Auto),
            "type1" => Ok(BackendChoice::Only(VfioBackend::Type1)),
            "iommufd" => Ok(BackendChoice::Only(VfioBackend::Iommufd)),
            _ => Err(DeviceError::Unsupported(format!(
                "unknown VFIO backend {text:?}: use auto, type1 or iommufd"
            ))),
        }
    }

    /// The choice [`BACKEND_ENV`] makes: `Auto` when it is unset or empty; an error naming the
    /// variable when it holds anything but `auto`, `type1` or `iommufd`.
    pub fn from_env() -> Result<BackendChoice, DeviceError> {
        match std::env::var(BACKEND_ENV) {
            Ok(v) => BackendChoice::parse(&v)
                .map_err(|e| DeviceError::Unsupported(format!("{BACKEND_ENV}={v:?}: {e}"))),
            Err(std::env::VarError::NotPresent) => Ok(BackendChoice::Auto),
            Err(std::env::VarError::NotUnicode(_)) => Err(DeviceError::Unsupported(format!(
                "{BACKEND_ENV} is not valid UTF-8: use auto, type1 or iommufd"
            ))),
        }
    }
}

/// What the kernel offers for one device: the facts [`choose`] decides on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct KernelSupport {
    /// `/dev/iommu` exists (`CONFIG_IOMMUFD`).
    pub iommufd: bool,
    /// The device has a VFIO cdev (`<sysfs>/vfio-dev/vfioN`, `CONFIG_VFIO_DEVICE_CDEV`).
    pub cdev: bool,
    /// The device is bound to `vfio-pci` (without it there is no cdev whatever the kernel has).
    pub vfio_pci: bool,
}

impl KernelSupport {
    /// Looks at this machine for the device at `sysfs`.
    pub fn probe(sysfs: &Path) -> KernelSupport {
        KernelSupport {
            iommufd: Path::new("/dev/iommu").exists(),
            cdev: cdev_path(sysfs).is_some_and(|p| p.exists()),
            vfio_pci: current_driver(sysfs).as_deref() == Some("vfio-pci"),
        }
    }
}

/// Picks the backend for `choice` given what the kernel offers. Pure (tests give it facts).
pub fn choose(
    choice: BackendChoice,
    support: KernelSupport,
    bdf: &str,
) -> Result<VfioBackend, DeviceError> {
    let iommufd_ok = support.iommufd && support.cdev;
    match choice {
        BackendChoice::Auto if iommufd_ok => Ok(VfioBackend::Iommufd),
        BackendChoice::Auto => Ok(VfioBackend::Type1),
        BackendChoice::Only(VfioBackend::Type1) => Ok(VfioBackend::Type1),
        BackendChoice::Only(VfioBackend::Iommufd) if iommufd_ok => Ok(VfioBackend::Iommufd),
        // No cdev because the device is not vfio-pci's: say that, not "the kernel lacks it".
        BackendChoice::Only(VfioBackend::Iommufd) if !support.vfio_pci => Err(DeviceError::Pci {
            bdf: bdf.to_string(),
            problem: format!(
                "not bound to vfio-pci, so it has no VFIO cdev for the iommufd backend; bind \
                 it with `tpsetup bind {bdf}` (as root)"
            ),
        }),
        BackendChoice::Only(VfioBackend::Iommufd) => {
            let missing = match (support.iommufd, support.cdev) {
                (false, false) => "/dev/iommu and the device's VFIO cdev are missing",
                (false, true) => "/dev/iommu is missing",
                _ => "the device has no VFIO cdev (vfio-dev/vfioN in sysfs)",
            };
            Err(DeviceError::Pci {
                bdf: bdf.to_string(),
                problem: format!(
                    "the iommufd backend was asked for, but {missing}: the kernel needs \
                     CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV (Linux ≥ 6.6), and the device \
                     must be bound to vfio-pci; or use {BACKEND_ENV}=type1"
                ),
            })
        }
    }
}

/// One IOMMU domain of either backend: a type1 container or an iommufd IOAS. Devices opened in
/// one domain share its mappings and its one view.
#[derive(Clone, Debug)]
pub enum VfioDomain {
    /// A VFIO type1 container.
    Type1(Arc<VfioContainer>),
    /// An iommufd IOAS.
    Iommufd(Arc<Ioas>),
}

impl VfioDomain {
    /// A new, empty domain of `backend`.
    pub fn new(backend: VfioBackend) -> Result<VfioDomain, DeviceError> {
        Ok(match backend {
            VfioBackend::Type1 => VfioDomain::Type1(VfioContainer::new()?),
            VfioBackend::Iommufd => VfioDomain::Iommufd(Ioas::new()?),
        })
    }

    /// A new domain of the backend `choice` gives for the device `bdf` (which is not opened).
    pub fn for_device(choice: BackendChoice, bdf: &str) -> Result<VfioDomain, DeviceError> {
        let parsed = Bdf::parse(bdf)?;
        let backend = choose(choice, KernelSupport::probe(&parsed.sysfs_path()), bdf)?;
        tracing::info!(bdf = %parsed, backend = %backend, ?choice, "VFIO backend chosen");
        VfioDomain::new(backend)
    }

    /// The domain's backend.
    pub fn backend(&self) -> VfioBackend {
        match self {
            VfioDomain::Type1(_) => VfioBackend::Type1,
            VfioDomain::Iommufd(_) => VfioBackend::Iommufd,
        }
    }

    /// Opens `bdf` into this domain ([`VfioDevice::open_in`] or [`CdevDevice::open_in`]).
    pub fn open(&self, bdf: &str) -> Result<Arc<dyn PciDevice>, DeviceError> {
        Ok(match self {
            VfioDomain::Type1(c) => Arc::new(VfioDevice::open_in(c, bdf)?),
            VfioDomain::Iommufd(i) => Arc::new(CdevDevice::open_in(i, bdf)?),
        })
    }

    /// The domain's one view, made with `dma_mask` on first use (open the devices first).
    pub fn view(&self, dma_mask: u64) -> Result<Arc<dyn DeviceView>, DeviceError> {
        Ok(match self {
            VfioDomain::Type1(c) => c.view(dma_mask)?,
            VfioDomain::Iommufd(i) => i.view(dma_mask)?,
        })
    }
}

/// A device opened by [`open_vfio`], with its domain's view.
#[derive(Clone, Debug)]
pub struct OpenedVfio {
    /// The device.
    pub device: Arc<dyn PciDevice>,
    /// Its domain's view.
    pub view: Arc<dyn DeviceView>,
    /// Its domain (open more devices into it with [`VfioDomain::open`]).
    pub domain: VfioDomain,
}

/// Opens `bdf` in a new domain of the backend `choice` gives, with the view made with
/// `dma_mask`. The one-call way for a driver to reach a VFIO device on either backend.
///
/// ```no_run
/// use tidepool::device::backend::{open_vfio, BackendChoice};
/// let opened = open_vfio("0000:00:04.0", u64::MAX, BackendChoice::from_env()?)?;
/// println!("{} through {}", opened.device.name(), opened.domain.backend());
/// # Ok::<(), tidepool::device::DeviceError>(())
/// ```
pub fn open_vfio(
    bdf: &str,
    dma_mask: u64,
    choice: BackendChoice,
) -> Result<OpenedVfio, DeviceError> {
    let domain = VfioDomain::for_device(choice, bdf)?;
    let device = domain.open(bdf)?;
    let view = domain.view(dma_mask)?;
    Ok(OpenedVfio {
        device,
        view,
        domain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: KernelSupport = KernelSupport {
        iommufd: true,
        cdev: true,
        vfio_pci: true,
    };

    #[test]
    fn parses_choices() {
        assert_eq!(BackendChoice::parse("auto").unwrap(), BackendChoice::Auto);
        assert_eq!(BackendChoice::parse("").unwrap(), BackendChoice::Auto);
        assert_eq!(
            BackendChoice::parse(" Type1 ").unwrap(),
            BackendChoice::Only(VfioBackend::Type1)
        );
        assert_eq!(
            BackendChoice::parse("IOMMUFD").unwrap(),
            BackendChoice::Only(VfioBackend::Iommufd)
        );
        match BackendChoice::parse("cdev") {
            Err(DeviceError::Unsupported(m)) => {
                assert!(m.contains("auto, type1 or iommufd"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn auto_takes_iommufd_only_when_both_parts_exist() {
        let s = |iommufd, cdev| KernelSupport {
            iommufd,
            cdev,
            vfio_pci: true,
        };
        assert_eq!(
            choose(BackendChoice::Auto, BOTH, "x").unwrap(),
            VfioBackend::Iommufd
        );
        for partial in [s(true, false), s(false, true), s(false, false)] {
            assert_eq!(
                choose(BackendChoice::Auto, partial, "x").unwrap(),
                VfioBackend::Type1,
                "{partial:?}"
            );
        }
    }

    #[test]
    fn an_explicit_choice_is_kept_or_refused_never_swapped() {
        let type1 = BackendChoice::Only(VfioBackend::Type1);
        let iommufd = BackendChoice::Only(VfioBackend::Iommufd);
        assert_eq!(choose(type1, BOTH, "x").unwrap(), VfioBackend::Type1);
        assert_eq!(choose(iommufd, BOTH, "x").unwrap(), VfioBackend::Iommufd);
        for (support, says) in [
            (
                KernelSupport {
                    iommufd: false,
                    cdev: false,
                    vfio_pci: true,
                },
                "/dev/iommu and the device's VFIO cdev are missing",
            ),
            (
                KernelSupport {
                    iommufd: false,
                    cdev: true,
                    vfio_pci: true,
                },
                "/dev/iommu is missing",
            ),
            (
                KernelSupport {
                    iommufd: true,
                    cdev: false,
                    vfio_pci: true,
                },
                "has no VFIO cdev",
            ),
        ] {
            match choose(iommufd, support, "0000:00:04.0") {
                Err(DeviceError::Pci { bdf, problem }) => {
                    assert_eq!(bdf, "0000:00:04.0");
                    assert!(problem.contains(says), "{problem}");
                    assert!(problem.contains("TIDEPOOL_VFIO_BACKEND=type1"), "{problem}");
                }
                other => panic!("{support:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_device_not_bound_to_vfio_pci_is_named_as_such() {
        let unbound = KernelSupport {
            iommufd: true,
            cdev: false,
            vfio_pci: false,
        };
        match choose(
            BackendChoice::Only(VfioBackend::Iommufd),
            unbound,
            "0000:00:00.0",
        ) {
            Err(DeviceError::Pci { problem, .. }) => {
                assert!(problem.contains("not bound to vfio-pci"), "{problem}");
                assert!(problem.contains("tpsetup bind 0000:00:00.0"), "{problem}");
            }
            other => panic!("{other:?}"),
        }
        // Auto goes to type1, whose open names the driver the device has.
        assert_eq!(
            choose(BackendChoice::Auto, unbound, "x").unwrap(),
            VfioBackend::Type1
        );
    }

    #[test]
    fn probing_a_missing_device_finds_no_cdev() {
        let s = KernelSupport::probe(Path::new("/nonexistent/0000:ff:1f.7"));
        assert!(!s.cdev);
        assert!(!s.vfio_pci);
    }
}
