//! Is the system using a PCI function? Its block devices (disks, partitions and the
//! device-mapper/md devices that hold them) against the mounted filesystems, the active swap
//! areas and the root filesystem; and, for a vfio-pci function, processes holding its group open.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Serialize;

use crate::{list_dir, read_trim, Bdf, Host};

/// A block device that lives on a PCI function, directly or through a holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDev {
    /// Kernel name: `nvme1n1`, `nvme1n1p2`, `dm-0`.
    pub name: String,
    /// `major:minor`, from sysfs `dev`.
    pub dev: Option<String>,
    /// The device-mapper name (`/dev/mapper/<name>`), for `dm-*`.
    pub dm_name: Option<String>,
    /// For a holder (device-mapper, md): the device of this PCI function it sits on.
    pub holder_of: Option<String>,
}

/// One way the system uses a device; displays as "nvme1n1p1 is mounted on /data (ext4)".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Use {
    /// The root filesystem lives on it.
    Root {
        /// The block device.
        device: String,
    },
    /// A filesystem on it is mounted.
    Mounted {
        /// The block device.
        device: String,
        /// Where.
        mountpoint: String,
        /// Filesystem type.
        fstype: String,
    },
    /// It is an active swap area.
    Swap {
        /// The block device.
        device: String,
    },
}

impl std::fmt::Display for Use {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Use::Root { device } => write!(f, "{device} holds the root filesystem (/)"),
            Use::Mounted {
                device,
                mountpoint,
                fstype,
            } => write!(f, "{device} is mounted on {mountpoint} ({fstype})"),
            Use::Swap { device } => write!(f, "{device} is an active swap area"),
        }
    }
}

impl Host {
    /// Every block device below the PCI function in sysfs (`/sys/class/block/*` whose real path
    /// lies under the function's), partitions included, plus the devices that hold them
    /// (`holders/`, e.g. device-mapper), transitively.
    pub fn block_devices(&self, bdf: &Bdf) -> Vec<BlockDev> {
        let Ok(pci) = std::fs::canonicalize(self.pci_dir(bdf)) else {
            return Vec::new();
        };
        let class = self.path("sys/class/block");
        let mut found: Vec<BlockDev> = Vec::new();
        let mut seen = BTreeSet::new();
        for name in list_dir(&class) {
            let Ok(real) = std::fs::canonicalize(class.join(&name)) else {
                continue;
            };
            if real.starts_with(&pci) && seen.insert(name.clone()) {
                found.push(self.block_dev(&name, None));
            }
        }
        // Holders (dm, md) of those, and theirs.
        let mut i = 0;
        while i < found.len() {
            let base = found[i].holder_of.clone().unwrap_or(found[i].name.clone());
            let holders = self.holders(&found[i].name);
            for h in holders {
                if seen.insert(h.clone()) {
                    found.push(self.block_dev(&h, Some(base.clone())));
                }
            }
            i += 1;
        }
        found
    }

    fn holders(&self, name: &str) -> Vec<String> {
        list_dir(&self.path("sys/class/block").join(name).join("holders"))
    }

    fn block_dev(&self, name: &str, holder_of: Option<String>) -> BlockDev {
        let dir = self.path("sys/class/block").join(name);
        BlockDev {
            name: name.to_string(),
            dev: read_trim(&dir.join("dev")),
            dm_name: read_trim(&dir.join("dm/name")),
            holder_of,
        }
    }

    /// How the system uses the function's block devices: mounts (matched by `major:minor`
    /// in `/proc/self/mountinfo` and by device name in `/proc/mounts`), the root filesystem and
    /// active swap (`/proc/swaps`). Empty when the function has no block device or none is used.
    pub fn active_uses(&self, bdf: &Bdf) -> Vec<Use> {
        let devs = self.block_devices(bdf);
        if devs.is_empty() {
            return Vec::new();
        }
        let label = |d: &BlockDev| match (&d.dm_name, &d.holder_of) {
            (Some(dm), Some(on)) => format!("{} (/dev/mapper/{dm}, on {on})", d.name),
            (None, Some(on)) => format!("{} (on {on})", d.name),
            (Some(dm), None) => format!("{} (/dev/mapper/{dm})", d.name),
            (None, None) => d.name.clone(),
        };
        let by_source = |source: &str| -> Option<&BlockDev> {
            let base = source.strip_prefix("/dev/")?;
            devs.iter().find(|d| {
                d.name == base
                    || d.dm_name.as_deref().is_some_and(|n| {
                        base.strip_prefix("mapper/") == Some(n) || base == format!("dm/{n}")
                    })
            })
        };
        let mut uses = BTreeSet::new();
        let mut mount = |d: &BlockDev, mountpoint: String, fstype: String| {
            if mountpoint == "/" {
                uses.insert(Use::Root { device: label(d) });
            } else {
                uses.insert(Use::Mounted {
                    device: label(d),
                    mountpoint,
                    fstype,
                });
            }
        };
        // mountinfo: "36 35 98:0 /root /mnt rw,... shared:1 - ext4 /dev/sda1 rw"
        if let Ok(text) = std::fs::read_to_string(self.path("proc/self/mountinfo")) {
            for line in text.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let Some(sep) = fields.iter().position(|f| *f == "-") else {
                    continue;
                };
                if fields.len() < 5 || fields.len() < sep + 3 {
                    continue;
                }
                let devno = fields[2];
                let by_dev = devs.iter().find(|d| d.dev.as_deref() == Some(devno));
                if let Some(d) = by_dev.or_else(|| by_source(fields[sep + 2])) {
                    mount(d, unescape(fields[4]), fields[sep + 1].to_string());
                }
            }
        }
        // /proc/mounts: "/dev/nvme0n1p1 /boot ext4 rw 0 0"
        if let Ok(text) = std::fs::read_to_string(self.path("proc/mounts")) {
            for line in text.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 3 {
                    continue;
                }
                if let Some(d) = by_source(fields[0]) {
                    mount(d, unescape(fields[1]), fields[2].to_string());
                }
            }
        }
        // /proc/swaps: "Filename Type Size Used Priority" then "/dev/nvme0n1p3 partition ..."
        if let Ok(text) = std::fs::read_to_string(self.path("proc/swaps")) {
            for line in text.lines().skip(1) {
                if let Some(d) = line.split_whitespace().next().and_then(&by_source) {
                    uses.insert(Use::Swap { device: label(d) });
                }
            }
        }
        // The same mount seen in both files, once by number and once by name, is one entry;
        // a Root entry makes a Mounted one for "/" redundant (there is none: "/" goes to Root).
        uses.into_iter().collect()
    }

    /// Processes that hold `/dev/vfio/<group>` open: `(pid, command name)`.
    pub fn group_holders(&self, group: &str) -> Vec<(u32, String)> {
        let target = Path::new("/dev/vfio").join(group);
        let proc_dir = self.path("proc");
        let mut holders = Vec::new();
        for pid in list_dir(&proc_dir) {
            let Ok(n) = pid.parse::<u32>() else { continue };
            let fd_dir = proc_dir.join(&pid).join("fd");
            let holds = list_dir(&fd_dir)
                .iter()
                .any(|fd| std::fs::read_link(fd_dir.join(fd)).is_ok_and(|t| t == target));
            if holds {
                let comm = read_trim(&proc_dir.join(&pid).join("comm")).unwrap_or_default();
                holders.push((n, comm));
            }
        }
        holders
    }
}

/// Undoes the octal escapes of /proc/mounts and mountinfo (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn mount_escapes() {
        assert_eq!(unescape(r"/mnt/my\040disk"), "/mnt/my disk");
        assert_eq!(unescape(r"/a\134b"), r"/a\b");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
