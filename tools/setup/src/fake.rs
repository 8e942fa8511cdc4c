//! A fake host for tests: sysfs, procfs, `/dev` and `/run` in a directory, laid out as Linux
//! lays them out (`/sys/bus/pci/devices/<bdf>` links into `/sys/devices/pci0000:00/`,
//! `driver` and `iommu_group` links, NVMe namespaces under `nvme/nvmeX/`, `/sys/class/block`
//! links, `holders/`), and a [`FakeKernel`] that answers writes to `driver_override`,
//! `unbind`, `bind` and `drivers_probe` as the kernel does.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::Kernel;

/// Builds a fake tree under `root`.
#[derive(Debug)]
pub struct FakeHost {
    root: PathBuf,
    state: Arc<Mutex<KernelState>>,
}

#[derive(Debug, Default)]
struct KernelState {
    /// Writes seen, `(path below root, value)`.
    writes: Vec<(String, String)>,
    /// Modules loaded through modprobe.
    modprobed: Vec<String>,
    /// The driver the kernel picks for a device without override: bdf -> driver.
    default_driver: BTreeMap<String, String>,
}

impl FakeHost {
    /// An empty tree with the files every host has: `/sys/bus/pci/drivers_probe`,
    /// `/proc/mounts` (empty), `/proc/swaps` (header only), `/proc/cmdline`.
    pub fn new(root: &Path) -> FakeHost {
        let h = FakeHost {
            root: root.to_path_buf(),
            state: Arc::default(),
        };
        h.file("sys/bus/pci/drivers_probe", "");
        h.file("proc/mounts", "");
        h.file("proc/self/mountinfo", "");
        h.file(
            "proc/swaps",
            "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n",
        );
        h.file(
            "proc/cmdline",
            "BOOT_IMAGE=/vmlinuz root=/dev/nvme0n1p2 ro\n",
        );
        std::fs::create_dir_all(root.join("sys/class/block")).unwrap();
        std::fs::create_dir_all(root.join("sys/kernel/iommu_groups")).unwrap();
        h
    }

    /// The kernel to give [`crate::Host::new`].
    pub fn kernel(&self) -> Box<dyn Kernel> {
        Box::new(FakeKernel {
            root: self.root.clone(),
            state: self.state.clone(),
        })
    }

    /// A host over this tree with the fake kernel and no settle wait.
    pub fn host(&self) -> crate::Host {
        crate::Host::new(&self.root, self.kernel()).with_settle(std::time::Duration::ZERO)
    }

    /// Writes seen so far, `(path below the root, value)`.
    pub fn writes(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().writes.clone()
    }

    /// Modules loaded so far.
    pub fn modprobed(&self) -> Vec<String> {
        self.state.lock().unwrap().modprobed.clone()
    }

    /// Creates (or replaces) a file with `content`, parents included.
    pub fn file(&self, rel: &str, content: &str) {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn link(&self, rel: &str, target: &str) {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&p);
        symlink(target, p).unwrap();
    }

    /// A PCI driver directory with `bind` and `unbind`.
    pub fn driver(&self, name: &str) {
        self.file(&format!("sys/bus/pci/drivers/{name}/bind"), "");
        self.file(&format!("sys/bus/pci/drivers/{name}/unbind"), "");
    }

    /// A PCI function: class (e.g. 0x010802), vendor, device, bound to `driver` (the driver is
    /// also what the kernel picks for it by default), in IOMMU `group`.
    pub fn pci(
        &self,
        bdf: &str,
        class: u32,
        vendor: u16,
        device: u16,
        driver: Option<&str>,
        group: Option<u32>,
    ) {
        let dev = format!("sys/devices/pci0000:00/{bdf}");
        self.file(&format!("{dev}/class"), &format!("0x{class:06x}\n"));
        self.file(&format!("{dev}/vendor"), &format!("0x{vendor:04x}\n"));
        self.file(&format!("{dev}/device"), &format!("0x{device:04x}\n"));
        self.file(&format!("{dev}/driver_override"), "(null)\n");
        self.file(&format!("{dev}/numa_node"), "-1\n");
        self.link(
            &format!("sys/bus/pci/devices/{bdf}"),
            &format!("../../../devices/pci0000:00/{bdf}"),
        );
        if let Some(d) = driver {
            self.driver(d);
            self.link(
                &format!("{dev}/driver"),
                &format!("../../../bus/pci/drivers/{d}"),
            );
            self.state
                .lock()
                .unwrap()
                .default_driver
                .insert(bdf.into(), d.into());
        }
        if let Some(g) = group {
            self.file(&format!("sys/kernel/iommu_groups/{g}/type"), "DMA-FQ\n");
            self.link(
                &format!("{dev}/iommu_group"),
                &format!("../../../kernel/iommu_groups/{g}"),
            );
            self.link(
                &format!("sys/kernel/iommu_groups/{g}/devices/{bdf}"),
                &format!("../../../../devices/pci0000:00/{bdf}"),
            );
        }
    }

    /// An NVMe namespace `disk` (e.g. `nvme1n1`, `major:minor` `dev`) of controller `ctrl` on
    /// `bdf`, with partitions `(name, major:minor)`.
    pub fn nvme_disk(&self, bdf: &str, ctrl: &str, disk: &str, dev: &str, parts: &[(&str, &str)]) {
        let base = format!("devices/pci0000:00/{bdf}/nvme/{ctrl}/{disk}");
        self.file(&format!("sys/{base}/dev"), &format!("{dev}\n"));
        std::fs::create_dir_all(self.root.join(format!("sys/{base}/holders"))).unwrap();
        self.link(&format!("sys/class/block/{disk}"), &format!("../../{base}"));
        for (p, pdev) in parts {
            self.file(&format!("sys/{base}/{p}/dev"), &format!("{pdev}\n"));
            self.file(&format!("sys/{base}/{p}/partition"), "1\n");
            std::fs::create_dir_all(self.root.join(format!("sys/{base}/{p}/holders"))).unwrap();
            self.link(
                &format!("sys/class/block/{p}"),
                &format!("../../{base}/{p}"),
            );
        }
    }

    /// A device-mapper device `dm` (`/dev/mapper/<name>`) on top of block device `lower`.
    pub fn dm(&self, dm: &str, name: &str, dev: &str, lower: &str) {
        let base = format!("devices/virtual/block/{dm}");
        self.file(&format!("sys/{base}/dev"), &format!("{dev}\n"));
        self.file(&format!("sys/{base}/dm/name"), &format!("{name}\n"));
        self.link(&format!("sys/class/block/{dm}"), &format!("../../{base}"));
        let lower_dir =
            std::fs::canonicalize(self.root.join("sys/class/block").join(lower)).unwrap();
        symlink(
            self.root.join("sys").join(&base),
            lower_dir.join("holders").join(dm),
        )
        .unwrap();
    }

    /// Appends a line to `/proc/mounts`.
    pub fn mount(&self, source: &str, mountpoint: &str, fstype: &str) {
        self.append(
            "proc/mounts",
            &format!("{source} {mountpoint} {fstype} rw,relatime 0 0\n"),
        );
    }

    /// Appends a line to `/proc/self/mountinfo` (the source name is `/dev/root`, as for a root
    /// given by number on the kernel command line: only `major:minor` identifies it).
    pub fn mountinfo(&self, devno: &str, mountpoint: &str, fstype: &str) {
        self.append(
            "proc/self/mountinfo",
            &format!("22 1 {devno} / {mountpoint} rw,relatime shared:1 - {fstype} /dev/root rw\n"),
        );
    }

    /// Appends an active swap area to `/proc/swaps`.
    pub fn swap(&self, source: &str) {
        self.append(
            "proc/swaps",
            &format!("{source}   partition\t1048572\t\t0\t\t-2\n"),
        );
    }

    /// A process `pid` named `comm` holding `target` open as fd 3.
    pub fn process_holding(&self, pid: u32, comm: &str, target: &str) {
        self.file(&format!("proc/{pid}/comm"), &format!("{comm}\n"));
        self.link(&format!("proc/{pid}/fd/3"), target);
    }

    fn append(&self, rel: &str, line: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.root.join(rel))
            .unwrap();
        f.write_all(line.as_bytes()).unwrap();
    }
}

/// The kernel's part for a [`FakeHost`]: `driver_override` stores the value (a newline clears
/// it), `<dev>/driver/unbind` and `drivers/<d>/unbind` drop the `driver` link,
/// `drivers/<d>/bind` links the driver when the override allows it (else ENODEV, as the kernel's
/// match fails), and `drivers_probe` binds an unbound device to its override, or to its default
/// driver when there is none; vfio-pci also creates `/dev/vfio/<group>`.
#[derive(Debug)]
pub struct FakeKernel {
    root: PathBuf,
    state: Arc<Mutex<KernelState>>,
}

impl FakeKernel {
    fn pci_dir(&self, bdf: &str) -> PathBuf {
        self.root.join("sys/bus/pci/devices").join(bdf)
    }

    fn attach(&self, bdf: &str, driver: &str) -> io::Result<()> {
        let dir = self.pci_dir(bdf);
        if !self.root.join("sys/bus/pci/drivers").join(driver).exists() {
            return Err(io::Error::from_raw_os_error(libc::ENODEV));
        }
        symlink(
            format!("../../../bus/pci/drivers/{driver}"),
            dir.join("driver"),
        )?;
        if driver == "vfio-pci" {
            if let Some(g) = crate::link_name(&dir.join("iommu_group")) {
                std::fs::create_dir_all(self.root.join("dev/vfio"))?;
                std::fs::write(self.root.join("dev/vfio").join(g), "")?;
            }
        }
        Ok(())
    }

    fn detach(&self, bdf: &str) -> io::Result<()> {
        let dir = self.pci_dir(bdf);
        if crate::link_name(&dir.join("driver")).as_deref() == Some("vfio-pci") {
            if let Some(g) = crate::link_name(&dir.join("iommu_group")) {
                let _ = std::fs::remove_file(self.root.join("dev/vfio").join(g));
            }
        }
        std::fs::remove_file(dir.join("driver"))
            .map_err(|_| io::Error::from_raw_os_error(libc::ENODEV))
    }

    fn override_of(&self, bdf: &str) -> Option<String> {
        crate::read_trim(&self.pci_dir(bdf).join("driver_override"))
            .filter(|s| s != "(null)" && !s.is_empty())
    }
}

impl Kernel for FakeKernel {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let rel = path
            .strip_prefix(&self.root)
            .map_err(|_| {
                io::Error::other(format!("write outside the fake root: {}", path.display()))
            })?
            .to_string_lossy()
            .into_owned();
        self.state
            .lock()
            .unwrap()
            .writes
            .push((rel.clone(), value.to_string()));
        if !path.exists() {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let parts: Vec<&str> = rel.split('/').collect();
        match parts.as_slice() {
            ["sys", "bus", "pci", "devices", _, "driver_override"] => {
                let v = value.trim();
                std::fs::write(
                    path,
                    if v.is_empty() {
                        "(null)\n".into()
                    } else {
                        format!("{v}\n")
                    },
                )
            }
            ["sys", "bus", "pci", "devices", bdf, "driver", "unbind"] if value == *bdf => {
                self.detach(bdf)
            }
            ["sys", "bus", "pci", "drivers", _, "unbind"] => self.detach(value),
            ["sys", "bus", "pci", "drivers", drv, "bind"] => {
                if crate::link_name(&self.pci_dir(value).join("driver")).is_some() {
                    return Err(io::Error::from_raw_os_error(libc::EBUSY));
                }
                match self.override_of(value) {
                    Some(o) if o != *drv => Err(io::Error::from_raw_os_error(libc::ENODEV)),
                    _ => self.attach(value, drv),
                }
            }
            ["sys", "bus", "pci", "drivers_probe"] => {
                if crate::link_name(&self.pci_dir(value).join("driver")).is_some() {
                    return Ok(());
                }
                let pick = self.override_of(value).or_else(|| {
                    self.state
                        .lock()
                        .unwrap()
                        .default_driver
                        .get(value)
                        .cloned()
                });
                match pick {
                    // The kernel's probe finds no driver: the write succeeds, nothing binds.
                    Some(d) => self.attach(value, &d).or(Ok(())),
                    None => Ok(()),
                }
            }
            _ => std::fs::write(path, value),
        }
    }

    fn modprobe(&self, module: &str) -> Result<(), String> {
        self.state.lock().unwrap().modprobed.push(module.into());
        let dir = self.root.join("sys/bus/pci/drivers").join(module);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        for f in ["bind", "unbind"] {
            std::fs::write(dir.join(f), "").map_err(|e| e.to_string())?;
        }
        if module == "vfio-pci" {
            std::fs::create_dir_all(self.root.join("dev/vfio")).map_err(|e| e.to_string())?;
            std::fs::write(self.root.join("dev/vfio/vfio"), "").map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
