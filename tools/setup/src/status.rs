//! `tpsetup status`: what the host offers Tidepool and what is missing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde::Serialize;

use crate::bind::driver_keeps_group_viable;
use crate::hugepages::HugepageSize;
use crate::{link_name, list_dir, read_trim, Bdf, Host, VFIO_PCI};

/// Everything `tpsetup status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The IOMMU.
    pub iommu: Iommu,
    /// IOMMU groups with their devices.
    pub groups: Vec<Group>,
    /// NVMe and virtio PCI functions.
    pub devices: Vec<PciFunction>,
    /// Hugepage pools: system-wide (`node` null) and per NUMA node.
    pub hugepages: Vec<HugepagePool>,
    /// `RLIMIT_MEMLOCK` of this process, from `/proc/self/limits` (null: unknown).
    pub memlock: Option<Memlock>,
    /// Whether this process may pin memory beyond the limit (root's `CAP_IPC_LOCK`).
    pub cap_ipc_lock: bool,
    /// `/sys/bus/pci/drivers/vfio-pci` exists.
    pub vfio_pci_loaded: bool,
    /// `/dev/vfio/vfio`, `/dev/vfio/<group>` of vfio-bound devices, `/dev/iommu`.
    pub dev_nodes: Vec<DevNode>,
    /// What is missing, each with the command that fixes it.
    pub problems: Vec<Problem>,
}

/// The IOMMU's state.
#[derive(Debug, Clone, Serialize)]
pub struct Iommu {
    /// Groups exist: the kernel translates device DMA.
    pub enabled: bool,
    /// `/sys/class/iommu/*` (`dmar0`, `ivhd0`, ...).
    pub units: Vec<String>,
    /// IOMMU options on the kernel command line (`intel_iommu=on`, `iommu=pt`, ...).
    pub cmdline: Vec<String>,
    /// Number of IOMMU groups.
    pub groups: usize,
    /// Default domain types of the groups and how many have each (`DMA-FQ`, `identity`, ...).
    pub domain_types: BTreeMap<String, usize>,
    /// In words: "off", "translated (DMA-FQ)", "passthrough (identity)", ...
    pub mode: String,
}

/// One IOMMU group.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    /// The number, as `/dev/vfio/<id>` names it.
    pub id: String,
    /// `type`: the default domain (`DMA`, `DMA-FQ`, `identity`, `unmanaged` while VFIO owns it).
    pub domain_type: Option<String>,
    /// Members with their drivers.
    pub devices: Vec<GroupMember>,
    /// Every member is bound to a driver that lets VFIO use the group.
    pub viable: bool,
}

/// A device in a group.
#[derive(Debug, Clone, Serialize)]
pub struct GroupMember {
    /// PCI address.
    pub bdf: String,
    /// Its driver.
    pub driver: Option<String>,
}

/// An NVMe or virtio PCI function.
#[derive(Debug, Clone, Serialize)]
pub struct PciFunction {
    /// PCI address.
    pub bdf: String,
    /// `nvme`, `virtio-net`, `virtio-blk`, `virtio`.
    pub kind: String,
    /// Class code, `0x010802`.
    pub class: String,
    /// `vendor:device`, `1b36:0010`.
    pub id: String,
    /// The driver bound now.
    pub driver: Option<String>,
    /// `driver_override`, when set.
    pub driver_override: Option<String>,
    /// The driver tpsetup remembers from before it bound the device.
    pub remembered_driver: Option<String>,
    /// IOMMU group.
    pub iommu_group: Option<String>,
    /// NUMA node (null: none or unknown).
    pub numa_node: Option<i32>,
    /// Its block devices (and their holders).
    pub block_devices: Vec<String>,
    /// How the system uses it ("nvme0n1p2 holds the root filesystem (/)"); `bind` refuses these.
    pub in_use: Vec<String>,
}

/// One hugepage pool.
#[derive(Debug, Clone, Serialize)]
pub struct HugepagePool {
    /// Page size in KiB.
    pub size_kib: u64,
    /// NUMA node, or null for the system-wide pool.
    pub node: Option<u32>,
    /// Pages reserved.
    pub total: u64,
    /// Pages free.
    pub free: u64,
}

/// `RLIMIT_MEMLOCK` in bytes; null means unlimited.
#[derive(Debug, Clone, Serialize)]
pub struct Memlock {
    /// Soft limit.
    pub soft: Option<u64>,
    /// Hard limit.
    pub hard: Option<u64>,
}

/// A device node.
#[derive(Debug, Clone, Serialize)]
pub struct DevNode {
    /// `/dev/vfio/vfio`.
    pub path: String,
    /// It exists.
    pub present: bool,
    /// `crw-rw-rw-`.
    pub mode: Option<String>,
    /// `uid:gid`.
    pub owner: Option<String>,
}

/// Something missing and the command that fixes it.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// What is missing.
    pub what: String,
    /// The command or step that fixes it.
    pub fix: String,
}

/// VFIO locks this much for a useful pool: warn below it.
const MEMLOCK_WANTED: u64 = 1 << 30;

impl Host {
    /// Reads the host's state; never fails (what cannot be read is reported as absent).
    pub fn status(&self) -> Status {
        let iommu = self.iommu();
        let groups = self.groups();
        let devices = self.pci_functions();
        let hugepages = self.hugepage_pools();
        let memlock = self.memlock();
        let cap_ipc_lock = self.cap_ipc_lock();
        let vfio_pci_loaded = self.path("sys/bus/pci/drivers").join(VFIO_PCI).exists();
        let mut dev_nodes = vec![self.dev_node("dev/vfio/vfio")];
        for d in &devices {
            if d.driver.as_deref() == Some(VFIO_PCI) {
                if let Some(g) = &d.iommu_group {
                    dev_nodes.push(self.dev_node(&format!("dev/vfio/{g}")));
                }
            }
        }
        dev_nodes.push(self.dev_node("dev/iommu"));
        let mut status = Status {
            iommu,
            groups,
            devices,
            hugepages,
            memlock,
            cap_ipc_lock,
            vfio_pci_loaded,
            dev_nodes,
            problems: Vec::new(),
        };
        status.problems = self.problems(&status);
        status
    }

    fn iommu(&self) -> Iommu {
        let units = list_dir(&self.path("sys/class/iommu"));
        let cmdline: Vec<String> = read_trim(&self.path("proc/cmdline"))
            .unwrap_or_default()
            .split_whitespace()
            .filter(|t| {
                t.starts_with("intel_iommu=")
                    || t.starts_with("amd_iommu=")
                    || t.starts_with("iommu=")
                    || t.starts_with("iommu.")
                    || t.starts_with("vfio")
            })
            .map(str::to_string)
            .collect();
        let group_ids = list_dir(&self.path("sys/kernel/iommu_groups"));
        let mut domain_types = BTreeMap::new();
        for g in &group_ids {
            if let Some(t) = read_trim(&self.path("sys/kernel/iommu_groups").join(g).join("type")) {
                *domain_types.entry(t).or_insert(0) += 1;
            }
        }
        let enabled = !group_ids.is_empty();
        let mode = if !enabled {
            "off".to_string()
        } else if domain_types.is_empty() {
            "on (domain type not reported by this kernel)".to_string()
        } else {
            // Name the mode by the most common kernel-owned default domain.
            let kernel_types: Vec<(&String, &usize)> = domain_types
                .iter()
                .filter(|(t, _)| t.as_str() != "unmanaged" && t.as_str() != "blocked")
                .collect();
            match kernel_types.iter().max_by_key(|(_, n)| **n) {
                Some((t, _)) if t.as_str() == "identity" => "passthrough (identity)".to_string(),
                Some((t, _)) => format!("translated ({t})"),
                None => "on (every group owned by userspace)".to_string(),
            }
        };
        Iommu {
            enabled,
            units,
            cmdline,
            groups: group_ids.len(),
            domain_types,
            mode,
        }
    }

    fn groups(&self) -> Vec<Group> {
        let mut ids = list_dir(&self.path("sys/kernel/iommu_groups"));
        ids.sort_by_key(|g| g.parse::<u64>().unwrap_or(u64::MAX));
        ids.into_iter()
            .map(|id| {
                let devices: Vec<GroupMember> = self
                    .group_members(&id)
                    .into_iter()
                    .map(|(bdf, driver)| GroupMember { bdf, driver })
                    .collect();
                let viable = devices
                    .iter()
                    .all(|m| driver_keeps_group_viable(m.driver.as_deref()));
                Group {
                    domain_type: read_trim(
                        &self.path("sys/kernel/iommu_groups").join(&id).join("type"),
                    ),
                    id,
                    devices,
                    viable,
                }
            })
            .collect()
    }

    fn pci_functions(&self) -> Vec<PciFunction> {
        let devs = self.path("sys/bus/pci/devices");
        let mut out = Vec::new();
        for name in list_dir(&devs) {
            let Ok(bdf) = Bdf::parse(&name) else { continue };
            let dir = devs.join(&name);
            let hex = |f: &str| {
                read_trim(&dir.join(f))
                    .and_then(|s| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            };
            let (Some(class), Some(vendor), Some(device)) =
                (hex("class"), hex("vendor"), hex("device"))
            else {
                continue;
            };
            let kind = if class >> 8 == 0x0108 {
                "nvme"
            } else if vendor == 0x1af4 && (0x1000..=0x107f).contains(&device) {
                match device {
                    0x1000 | 0x1041 => "virtio-net",
                    0x1001 | 0x1042 => "virtio-blk",
                    _ => "virtio",
                }
            } else {
                continue;
            };
            let block = self.block_devices(&bdf);
            out.push(PciFunction {
                bdf: name.clone(),
                kind: kind.into(),
                class: format!("0x{class:06x}"),
                id: format!("{vendor:04x}:{device:04x}"),
                driver: link_name(&dir.join("driver")),
                driver_override: read_trim(&dir.join("driver_override"))
                    .filter(|s| !s.is_empty() && s != "(null)"),
                remembered_driver: self.remembered_driver(&bdf),
                iommu_group: link_name(&dir.join("iommu_group")),
                numa_node: read_trim(&dir.join("numa_node"))
                    .and_then(|s| s.parse().ok())
                    .filter(|n: &i32| *n >= 0),
                block_devices: block.iter().map(|b| b.name.clone()).collect(),
                in_use: self
                    .active_uses(&bdf)
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            });
        }
        out
    }

    fn hugepage_pools(&self) -> Vec<HugepagePool> {
        let mut pools = Vec::new();
        let mut read_pools = |dir: &Path, node: Option<u32>| {
            for d in list_dir(dir) {
                let Some(kib) = d
                    .strip_prefix("hugepages-")
                    .and_then(|s| s.strip_suffix("kB"))
                    .and_then(|s| s.parse().ok())
                else {
                    continue;
                };
                let num = |f: &str| {
                    read_trim(&dir.join(&d).join(f))
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0)
                };
                pools.push(HugepagePool {
                    size_kib: kib,
                    node,
                    total: num("nr_hugepages"),
                    free: num("free_hugepages"),
                });
            }
        };
        read_pools(&self.path("sys/kernel/mm/hugepages"), None);
        let nodes = self.path("sys/devices/system/node");
        let mut node_ids: Vec<u32> = list_dir(&nodes)
            .iter()
            .filter_map(|n| n.strip_prefix("node")?.parse().ok())
            .collect();
        node_ids.sort_unstable();
        for n in node_ids {
            read_pools(&nodes.join(format!("node{n}/hugepages")), Some(n));
        }
        pools.sort_by_key(|p| (p.node.map_or(0, |n| n + 1), p.size_kib));
        pools
    }

    fn memlock(&self) -> Option<Memlock> {
        let text = std::fs::read_to_string(self.path("proc/self/limits")).ok()?;
        let line = text.lines().find(|l| l.starts_with("Max locked memory"))?;
        let rest: Vec<&str> = line["Max locked memory".len()..]
            .split_whitespace()
            .collect();
        let val = |s: &str| -> Option<Option<u64>> {
            if s == "unlimited" {
                Some(None)
            } else {
                s.parse().ok().map(Some)
            }
        };
        Some(Memlock {
            soft: val(rest.first()?)?,
            hard: val(rest.get(1)?)?,
        })
    }

    fn cap_ipc_lock(&self) -> bool {
        const CAP_IPC_LOCK: u32 = 14;
        read_trim(&self.path("proc/self/status"))
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            })
            .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
    }

    fn dev_node(&self, rel: &str) -> DevNode {
        let meta = std::fs::metadata(self.path(rel)).ok();
        DevNode {
            path: format!("/{rel}"),
            present: meta.is_some(),
            mode: meta
                .as_ref()
                .map(|m| mode_string(m.permissions().mode(), m)),
            owner: meta.as_ref().map(|m| format!("{}:{}", m.uid(), m.gid())),
        }
    }

    fn problems(&self, s: &Status) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut add = |what: String, fix: String| p.push(Problem { what, fix });
        if !s.iommu.enabled {
            let cpu = read_trim(&self.path("proc/cpuinfo")).unwrap_or_default();
            let opt = if cpu.contains("AuthenticAMD") {
                "amd_iommu=on"
            } else {
                "intel_iommu=on"
            };
            if s.iommu.cmdline.iter().any(|t| t == opt) {
                add(
                    format!("the IOMMU is off although the kernel command line has {opt}"),
                    "enable VT-d / AMD-Vi (IOMMU) in the firmware setup and reboot".into(),
                );
            } else {
                add(
                    "the IOMMU is off: /sys/kernel/iommu_groups is empty".into(),
                    format!("add {opt} to the kernel command line (GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub) and reboot"),
                );
            }
        }
        if !s.vfio_pci_loaded {
            add(
                "the vfio-pci driver is not loaded".into(),
                "modprobe vfio-pci (tpsetup bind loads it)".into(),
            );
        } else if !s
            .dev_nodes
            .iter()
            .any(|d| d.path == "/dev/vfio/vfio" && d.present)
        {
            add(
                "/dev/vfio/vfio is missing".into(),
                "modprobe vfio (and check devtmpfs is mounted on /dev)".into(),
            );
        }
        let on_vfio: Vec<&PciFunction> = s
            .devices
            .iter()
            .filter(|d| d.driver.as_deref() == Some(VFIO_PCI))
            .collect();
        if s.devices.is_empty() {
            add(
                "no NVMe or virtio PCI function found".into(),
                "none in software: Tidepool's drivers need one (lspci -D lists what there is)"
                    .into(),
            );
        } else if on_vfio.is_empty() {
            // Suggest an NVMe first, then a virtio-net function, then anything else.
            let rank = |k: &str| match k {
                "nvme" => 0,
                "virtio-net" => 1,
                _ => 2,
            };
            let mut candidates: Vec<&PciFunction> =
                s.devices.iter().filter(|d| d.in_use.is_empty()).collect();
            candidates.sort_by_key(|d| rank(&d.kind));
            let free: Vec<&str> = candidates.iter().map(|d| d.bdf.as_str()).collect();
            if free.is_empty() {
                add(
                    "no NVMe or virtio function is bound to vfio-pci, and every one is in use by the system".into(),
                    "free one (umount, swapoff) and run tpsetup bind BDF".into(),
                );
            } else {
                add(
                    "no NVMe or virtio function is bound to vfio-pci".into(),
                    format!("tpsetup bind {}", free[0]),
                );
            }
        }
        for d in &on_vfio {
            let Some(g) = &d.iommu_group else { continue };
            if let Some(group) = s.groups.iter().find(|x| &x.id == g) {
                let blockers: Vec<&str> = group
                    .devices
                    .iter()
                    .filter(|m| !driver_keeps_group_viable(m.driver.as_deref()))
                    .map(|m| m.bdf.as_str())
                    .collect();
                if !blockers.is_empty() {
                    add(
                        format!(
                            "IOMMU group {g} of {} is not viable: {} in it use other drivers",
                            d.bdf,
                            blockers.join(", ")
                        ),
                        format!("tpsetup bind {}", blockers.join(" ")),
                    );
                }
            }
            let node = format!("dev/vfio/{g}");
            let path = self.path(&node);
            if !path.exists() {
                add(
                    format!("/{node} is missing for {}", d.bdf),
                    format!("tpsetup unbind {0} && tpsetup bind {0}", d.bdf),
                );
            } else if !writable(&path) {
                add(
                    format!("/{node} ({}) is not writable by this user", d.bdf),
                    format!("run as root, or chown $USER /{node} (udev: SUBSYSTEM==\"vfio\", OWNER=\"$USER\")"),
                );
            }
        }
        let default_2m = s
            .hugepages
            .iter()
            .find(|h| h.node.is_none() && h.size_kib == HugepageSize::TWO_MIB.kib);
        match default_2m {
            None if s.hugepages.is_empty() => add(
                "this kernel has no hugepages (/sys/kernel/mm/hugepages is empty)".into(),
                "use a kernel with CONFIG_HUGETLBFS, or allow Tidepool's 4 KiB fallback".into(),
            ),
            Some(h)
                if h.total == 0 && !s.hugepages.iter().any(|x| x.node.is_none() && x.total > 0) =>
            {
                add(
                    "no hugepages are reserved".into(),
                    "tpsetup hugepages 512 (512 x 2 MiB = 1 GiB)".into(),
                )
            }
            Some(h) if h.total > 0 && h.free == 0 => add(
                format!("all {} 2 MiB hugepages are in use", h.total),
                format!("tpsetup hugepages {}", h.total * 2),
            ),
            _ => {}
        }
        if let Some(m) = &s.memlock {
            if m.soft.is_some_and(|v| v < MEMLOCK_WANTED) && !s.cap_ipc_lock {
                add(
                    format!(
                        "RLIMIT_MEMLOCK is {} bytes: VFIO pins every DMA buffer against it",
                        m.soft.unwrap_or(0)
                    ),
                    "ulimit -l unlimited (as root), LimitMEMLOCK=infinity for a systemd service, or a memlock line in /etc/security/limits.conf".into(),
                );
            }
        }
        p
    }
}

fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

fn mode_string(mode: u32, meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    let kind = if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_dir() {
        'd'
    } else {
        '-'
    };
    let mut s = String::from(kind);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut o = String::new();
        let i = &self.iommu;
        let _ = writeln!(
            o,
            "IOMMU: {} ({} groups; units: {}; kernel command line: {})",
            if i.enabled {
                format!("on, {}", i.mode)
            } else {
                "off".into()
            },
            i.groups,
            if i.units.is_empty() {
                "none".into()
            } else {
                i.units.join(" ")
            },
            if i.cmdline.is_empty() {
                "no IOMMU options".into()
            } else {
                i.cmdline.join(" ")
            }
        );
        let _ = writeln!(o, "\nIOMMU groups:");
        if self.groups.is_empty() {
            let _ = writeln!(o, "  none");
        }
        for g in &self.groups {
            let members: Vec<String> = g
                .devices
                .iter()
                .map(|m| format!("{} ({})", m.bdf, m.driver.as_deref().unwrap_or("no driver")))
                .collect();
            let _ = writeln!(
                o,
                "  {:>3} {:<9} {}{}",
                g.id,
                g.domain_type.as_deref().unwrap_or("-"),
                members.join(", "),
                if g.viable {
                    ""
                } else {
                    "  [not viable for VFIO]"
                }
            );
        }
        let _ = writeln!(o, "\nNVMe and virtio devices:");
        if self.devices.is_empty() {
            let _ = writeln!(o, "  none");
        }
        for d in &self.devices {
            let mut extra = Vec::new();
            if let Some(ov) = &d.driver_override {
                extra.push(format!("override {ov}"));
            }
            if let Some(r) = &d.remembered_driver {
                extra.push(format!("was {r}"));
            }
            if let Some(n) = d.numa_node {
                extra.push(format!("node {n}"));
            }
            if !d.block_devices.is_empty() {
                extra.push(format!("block: {}", d.block_devices.join(" ")));
            }
            let _ = writeln!(
                o,
                "  {} {:<10} {} driver {:<9} group {:<4}{}",
                d.bdf,
                d.kind,
                d.id,
                d.driver.as_deref().unwrap_or("none"),
                d.iommu_group.as_deref().unwrap_or("none"),
                if extra.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", extra.join(", "))
                }
            );
            for u in &d.in_use {
                let _ = writeln!(o, "      in use: {u}");
            }
        }
        let _ = writeln!(o, "\nHugepages:");
        if self.hugepages.is_empty() {
            let _ = writeln!(o, "  none (no /sys/kernel/mm/hugepages)");
        }
        for h in &self.hugepages {
            let _ = writeln!(
                o,
                "  {:<8} {:<7} {} reserved, {} free",
                HugepageSize { kib: h.size_kib }.to_string(),
                h.node.map_or("all".to_string(), |n| format!("node {n}")),
                h.total,
                h.free
            );
        }
        let lim = |v: Option<u64>| v.map_or("unlimited".to_string(), |b| format!("{b} bytes"));
        let _ = writeln!(
            o,
            "\nRLIMIT_MEMLOCK: {}{}",
            self.memlock
                .as_ref()
                .map_or("unknown".to_string(), |m| format!(
                    "soft {}, hard {}",
                    lim(m.soft),
                    lim(m.hard)
                )),
            if self.cap_ipc_lock {
                " (CAP_IPC_LOCK: not enforced)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            o,
            "vfio-pci driver: {}",
            if self.vfio_pci_loaded {
                "loaded"
            } else {
                "not loaded"
            }
        );
        for d in &self.dev_nodes {
            match (&d.mode, &d.owner) {
                (Some(m), Some(own)) => {
                    let _ = writeln!(o, "{}: {m} owner {own}", d.path);
                }
                _ => {
                    let _ = writeln!(o, "{}: missing", d.path);
                }
            }
        }
        if self.problems.is_empty() {
            let _ = writeln!(o, "\nReady: nothing missing.");
        } else {
            let _ = writeln!(o, "\nMissing:");
            for p in &self.problems {
                let _ = writeln!(o, "  - {}\n    fix: {}", p.what, p.fix);
            }
        }
        f.write_str(&o)
    }
}
