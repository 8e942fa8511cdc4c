//! Binding PCI functions to vfio-pci and giving them back.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{link_name, read_trim, Bdf, Error, Host, VFIO_PCI};

/// Options of [`Host::bind`] and [`Host::unbind`].
#[derive(Debug, Clone, Copy, Default)]
pub struct BindOptions {
    /// Bind a device the system uses (mounted, swap, root), or unbind one a process holds.
    pub force: bool,
}

/// What [`Host::bind`] or [`Host::unbind`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Now bound to vfio-pci.
    Bound,
    /// Was bound to vfio-pci already; nothing changed.
    AlreadyBound,
    /// Given back to a kernel driver.
    Returned,
    /// Taken from vfio-pci, but no kernel driver claimed it.
    Unbound,
    /// Was not bound to vfio-pci; nothing to give back.
    NotVfio,
}

/// The result for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BindOutcome {
    /// The device.
    pub bdf: String,
    /// What happened.
    pub action: Action,
    /// The driver before.
    pub from: Option<String>,
    /// The driver after.
    pub to: Option<String>,
    /// Its IOMMU group.
    pub iommu_group: Option<String>,
    /// Warnings: a group that is not viable, uses overridden with `--force`, ...
    pub notes: Vec<String>,
}

impl std::fmt::Display for BindOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let drv = |d: &Option<String>| d.clone().unwrap_or_else(|| "no driver".into());
        match self.action {
            Action::Bound => write!(
                f,
                "{}: bound to vfio-pci (was {})",
                self.bdf,
                drv(&self.from)
            )?,
            Action::AlreadyBound => {
                write!(f, "{}: already bound to vfio-pci, nothing to do", self.bdf)?
            }
            Action::Returned => write!(
                f,
                "{}: returned to {} (was vfio-pci)",
                self.bdf,
                drv(&self.to)
            )?,
            Action::Unbound => write!(
                f,
                "{}: unbound from vfio-pci; no kernel driver claimed it",
                self.bdf
            )?,
            Action::NotVfio => write!(
                f,
                "{}: not bound to vfio-pci ({}), nothing to do",
                self.bdf,
                drv(&self.from)
            )?,
        }
        if let Some(g) = &self.iommu_group {
            if matches!(self.action, Action::Bound | Action::AlreadyBound) {
                write!(f, ", IOMMU group {g} (/dev/vfio/{g})")?;
            }
        }
        Ok(())
    }
}

/// Drivers that do not stop VFIO from using the rest of an IOMMU group: the kernel's rule
/// (vfio-pci, pci-stub, a driver with `driver_managed_dma` such as pcieport, or none).
pub(crate) fn driver_keeps_group_viable(driver: Option<&str>) -> bool {
    matches!(driver, None | Some("vfio-pci" | "pci-stub" | "pcieport"))
}

impl Host {
    /// Gives `bdf` to vfio-pci: loads vfio-pci if needed, refuses (unless `force`) a device
    /// with a mounted filesystem, active swap or the root filesystem, remembers its driver in
    /// `/run/tpsetup/<bdf>`, then `driver_override`, unbind and `drivers_probe`, and checks that
    /// vfio-pci took it. Binding a device already bound to vfio-pci changes nothing.
    pub fn bind(&self, bdf: &Bdf, opts: BindOptions) -> Result<BindOutcome, Error> {
        let dir = self.pci_dir(bdf);
        if !dir.exists() {
            return Err(Error::NoDevice(bdf.to_string(), dir));
        }
        let driver = link_name(&dir.join("driver"));
        let group = link_name(&dir.join("iommu_group"));
        let mut outcome = BindOutcome {
            bdf: bdf.to_string(),
            action: Action::AlreadyBound,
            from: driver.clone(),
            to: Some(VFIO_PCI.into()),
            iommu_group: group.clone(),
            notes: Vec::new(),
        };
        if driver.as_deref() == Some(VFIO_PCI) {
            // Keep it there across a later drivers_probe.
            if read_trim(&dir.join("driver_override")).as_deref() != Some(VFIO_PCI) {
                self.write(&dir.join("driver_override"), VFIO_PCI)?;
            }
            outcome.notes = self.group_notes(bdf, group.as_deref());
            return Ok(outcome);
        }
        let uses = self.active_uses(bdf);
        if !uses.is_empty() {
            let reason = uses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            if !opts.force {
                return Err(Error::InUse {
                    bdf: bdf.to_string(),
                    reason,
                });
            }
            tracing::warn!(%bdf, %reason, "binding a device in use (--force)");
            outcome.notes.push(format!("forced although {reason}"));
        }
        let Some(group) = group else {
            return Err(Error::NotBound {
                bdf: bdf.to_string(),
                what: "has no IOMMU group, so vfio-pci cannot take it: the IOMMU is off; \
                       add intel_iommu=on (Intel) or amd_iommu=on (AMD) to the kernel command \
                       line and reboot (`tpsetup status` shows the IOMMU state)"
                    .into(),
            });
        };
        self.ensure_driver(VFIO_PCI)?;
        if let Some(d) = &driver {
            let state = self.state_dir();
            std::fs::create_dir_all(&state).map_err(|e| Error::io("creating", &state, e))?;
            let file = state.join(bdf.as_str());
            std::fs::write(&file, format!("{d}\n")).map_err(|e| Error::io("writing", &file, e))?;
        }
        self.write(&dir.join("driver_override"), VFIO_PCI)?;
        if driver.is_some() {
            self.write(&dir.join("driver/unbind"), bdf.as_str())?;
        }
        self.write(&self.path("sys/bus/pci/drivers_probe"), bdf.as_str())?;
        let now = self.wait_driver(&dir, |d| d == Some(VFIO_PCI));
        if now.as_deref() != Some(VFIO_PCI) {
            return Err(Error::NotBound {
                bdf: bdf.to_string(),
                what: format!(
                    "after drivers_probe it is bound to {}, not vfio-pci (see dmesg)",
                    now.unwrap_or_else(|| "no driver".into())
                ),
            });
        }
        outcome.action = Action::Bound;
        outcome.notes.extend(self.group_notes(bdf, Some(&group)));
        Ok(outcome)
    }

    /// Gives `bdf` back from vfio-pci to the driver it had before [`Host::bind`] (from
    /// `/run/tpsetup/<bdf>`), or, when none is remembered, to the kernel's choice: clears
    /// `driver_override`, unbinds, binds the remembered driver or writes `drivers_probe`.
    /// Refuses (unless `force`) while a process holds the device's VFIO group open, because
    /// the kernel's unbind would wait for it. A device not bound to vfio-pci is left alone.
    pub fn unbind(&self, bdf: &Bdf, opts: BindOptions) -> Result<BindOutcome, Error> {
        let dir = self.pci_dir(bdf);
        if !dir.exists() {
            return Err(Error::NoDevice(bdf.to_string(), dir));
        }
        let driver = link_name(&dir.join("driver"));
        let group = link_name(&dir.join("iommu_group"));
        let state_file = self.state_dir().join(bdf.as_str());
        let remembered = read_trim(&state_file).filter(|d| !d.is_empty() && d != VFIO_PCI);
        let mut outcome = BindOutcome {
            bdf: bdf.to_string(),
            action: Action::NotVfio,
            from: driver.clone(),
            to: driver.clone(),
            iommu_group: group.clone(),
            notes: Vec::new(),
        };
        let override_vfio = read_trim(&dir.join("driver_override")).as_deref() == Some(VFIO_PCI);
        if driver.as_deref() != Some(VFIO_PCI) {
            if override_vfio {
                // Left half-way (vfio-pci was not loaded, or someone unbound it by hand).
                self.write(&dir.join("driver_override"), "\n")?;
                outcome
                    .notes
                    .push("cleared driver_override=vfio-pci".into());
                if driver.is_none() {
                    self.give_back(bdf, &dir, remembered.as_deref(), &mut outcome)?;
                }
            }
            let _ = std::fs::remove_file(&state_file);
            return Ok(outcome);
        }
        if let Some(g) = &group {
            let holders = self.group_holders(g);
            if !holders.is_empty() {
                let who = holders
                    .iter()
                    .map(|(pid, comm)| format!("pid {pid} ({comm})"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let reason = format!("{who} holds /dev/vfio/{g} open");
                if !opts.force {
                    return Err(Error::Busy {
                        bdf: bdf.to_string(),
                        reason,
                    });
                }
                outcome.notes.push(format!("forced although {reason}"));
            }
        }
        self.write(&dir.join("driver_override"), "\n")?;
        self.write(&dir.join("driver/unbind"), bdf.as_str())?;
        self.give_back(bdf, &dir, remembered.as_deref(), &mut outcome)?;
        let _ = std::fs::remove_file(&state_file);
        Ok(outcome)
    }

    /// Every device tpsetup bound and still remembers (`/run/tpsetup/*`).
    pub fn remembered(&self) -> Vec<Bdf> {
        crate::list_dir(&self.state_dir())
            .iter()
            .filter_map(|n| Bdf::parse(n).ok())
            .collect()
    }

    /// The driver tpsetup remembers for `bdf`, if any.
    pub fn remembered_driver(&self, bdf: &Bdf) -> Option<String> {
        read_trim(&self.state_dir().join(bdf.as_str())).filter(|d| !d.is_empty())
    }

    /// After the device has left vfio-pci: bind the remembered driver, or let the kernel
    /// choose (`drivers_probe`), and record where it went.
    fn give_back(
        &self,
        bdf: &Bdf,
        dir: &Path,
        remembered: Option<&str>,
        outcome: &mut BindOutcome,
    ) -> Result<(), Error> {
        let mut bound_explicitly = false;
        if let Some(d) = remembered {
            if let Err(e) = self.ensure_driver(d) {
                outcome
                    .notes
                    .push(format!("{e}; letting the kernel choose"));
            } else {
                let bind = self.path("sys/bus/pci/drivers").join(d).join("bind");
                match self.write(&bind, bdf.as_str()) {
                    Ok(()) => bound_explicitly = true,
                    Err(e) => outcome
                        .notes
                        .push(format!("{e}; letting the kernel choose")),
                }
            }
        }
        if !bound_explicitly {
            self.write(&self.path("sys/bus/pci/drivers_probe"), bdf.as_str())?;
        }
        let now = self.wait_driver(dir, |d| d.is_some());
        outcome.action = if now.is_some() {
            Action::Returned
        } else {
            Action::Unbound
        };
        if let (Some(want), Some(got)) = (remembered, now.as_deref()) {
            if want != got {
                outcome
                    .notes
                    .push(format!("it had {want} before tpsetup bound it"));
            }
        }
        outcome.to = now;
        Ok(())
    }

    /// Loads `driver`'s module when `/sys/bus/pci/drivers/<driver>` is missing.
    fn ensure_driver(&self, driver: &str) -> Result<(), Error> {
        let dir = self.path("sys/bus/pci/drivers").join(driver);
        if dir.exists() {
            return Ok(());
        }
        tracing::info!(driver, "loading module");
        self.kernel
            .modprobe(driver)
            .map_err(|reason| Error::Modprobe {
                module: driver.into(),
                reason,
            })?;
        if !dir.exists() {
            return Err(Error::Modprobe {
                module: driver.into(),
                reason: format!("{} is still missing after modprobe", dir.display()),
            });
        }
        Ok(())
    }

    /// Polls the device's driver until `done` holds or the settle time passes.
    fn wait_driver(&self, dir: &Path, done: impl Fn(Option<&str>) -> bool) -> Option<String> {
        let start = Instant::now();
        loop {
            let now = link_name(&dir.join("driver"));
            if done(now.as_deref()) || start.elapsed() >= self.settle {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Warnings about the group of a device bound to vfio-pci: other members that make it not
    /// viable, and a missing `/dev/vfio/<group>`.
    fn group_notes(&self, bdf: &Bdf, group: Option<&str>) -> Vec<String> {
        let Some(group) = group else {
            return Vec::new();
        };
        let mut notes = Vec::new();
        let blockers: Vec<String> = self
            .group_members(group)
            .into_iter()
            .filter(|(b, d)| b != bdf.as_str() && !driver_keeps_group_viable(d.as_deref()))
            .map(|(b, d)| format!("{b} ({})", d.unwrap_or_default()))
            .collect();
        if !blockers.is_empty() {
            notes.push(format!(
                "IOMMU group {group} is not viable: {} shares it; bind those too (tpsetup bind ...)",
                blockers.join(", ")
            ));
        }
        let node = self.path("dev/vfio").join(group);
        if !node.exists() {
            notes.push(format!("{} is missing", node.display()));
        }
        notes
    }

    /// `(bdf, driver)` of every device in IOMMU group `group`.
    pub fn group_members(&self, group: &str) -> Vec<(String, Option<String>)> {
        let dir = self
            .path("sys/kernel/iommu_groups")
            .join(group)
            .join("devices");
        crate::list_dir(&dir)
            .into_iter()
            .map(|b| {
                let d = link_name(&self.path("sys/bus/pci/devices").join(&b).join("driver"));
                (b, d)
            })
            .collect()
    }
}
