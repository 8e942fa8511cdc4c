//! Reserving hugepages: `/sys/kernel/mm/hugepages/hugepages-<kB>kB/nr_hugepages`, or the same
//! file under `/sys/devices/system/node/node<N>/hugepages/` for one NUMA node.

use serde::Serialize;

use crate::{Error, Host};

/// A hugepage size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HugepageSize {
    /// In KiB, as sysfs names it (2048, 1048576).
    pub kib: u64,
}

impl HugepageSize {
    /// 2 MiB.
    pub const TWO_MIB: HugepageSize = HugepageSize { kib: 2048 };

    /// Parses `2M`, `2MB`, `2048k`, `1G`, `1GiB` (case-insensitive).
    pub fn parse(text: &str) -> Result<HugepageSize, String> {
        let t = text.trim().to_ascii_lowercase();
        let t = t
            .strip_suffix("ib")
            .or_else(|| t.strip_suffix('b'))
            .unwrap_or(&t);
        let (num, mult) = match t.chars().last() {
            Some('k') => (&t[..t.len() - 1], 1),
            Some('m') => (&t[..t.len() - 1], 1024),
            Some('g') => (&t[..t.len() - 1], 1024 * 1024),
            _ => (t, 0),
        };
        let bad = || format!("bad hugepage size '{text}': expected 2M or 1G");
        if mult == 0 {
            return Err(bad());
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        if n == 0 {
            return Err(bad());
        }
        Ok(HugepageSize { kib: n * mult })
    }
}

impl std::fmt::Display for HugepageSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kib % (1024 * 1024) == 0 {
            write!(f, "{} GiB", self.kib / (1024 * 1024))
        } else if self.kib % 1024 == 0 {
            write!(f, "{} MiB", self.kib / 1024)
        } else {
            write!(f, "{} KiB", self.kib)
        }
    }
}

/// What [`Host::set_hugepages`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HugepageOutcome {
    /// Page size in KiB.
    pub size_kib: u64,
    /// The NUMA node, or `None` for the system-wide pool.
    pub node: Option<u32>,
    /// Pages reserved before.
    pub before: u64,
    /// Pages asked for.
    pub requested: u64,
    /// Pages reserved now.
    pub after: u64,
}

impl std::fmt::Display for HugepageOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let size = HugepageSize { kib: self.size_kib };
        let place = match self.node {
            Some(n) => format!(" on node {n}"),
            None => String::new(),
        };
        if self.before == self.after {
            write!(
                f,
                "{} x {size} hugepages reserved{place} (unchanged)",
                self.after
            )
        } else {
            write!(
                f,
                "{} x {size} hugepages reserved{place} (was {})",
                self.after, self.before
            )
        }
    }
}

impl Host {
    /// Sets the number of `size` hugepages reserved (system-wide, or on NUMA `node`) to
    /// `count`, and checks that the kernel reserved them all: it reserves what it can, so a
    /// short count is an error that says how many it got.
    pub fn set_hugepages(
        &self,
        count: u64,
        size: HugepageSize,
        node: Option<u32>,
    ) -> Result<HugepageOutcome, Error> {
        let pool = format!("hugepages/hugepages-{}kB", size.kib);
        let dir = match node {
            Some(n) => {
                let node_dir = self.path(&format!("sys/devices/system/node/node{n}"));
                if !node_dir.exists() {
                    let nodes = crate::list_dir(&self.path("sys/devices/system/node"))
                        .into_iter()
                        .filter(|d| d.starts_with("node"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(Error::Hugepages(format!(
                        "no NUMA node {n} (this machine has: {})",
                        if nodes.is_empty() {
                            "none listed"
                        } else {
                            &nodes
                        }
                    )));
                }
                node_dir.join(&pool)
            }
            None => self.path("sys/kernel/mm").join(&pool),
        };
        if !dir.exists() {
            let sizes = crate::list_dir(&self.path("sys/kernel/mm/hugepages"))
                .into_iter()
                .filter_map(|d| {
                    let kib = d
                        .strip_prefix("hugepages-")?
                        .strip_suffix("kB")?
                        .parse()
                        .ok()?;
                    Some(HugepageSize { kib }.to_string())
                })
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Error::Hugepages(format!(
                "this kernel has no {size} hugepages ({} is missing); sizes it has: {}",
                dir.display(),
                if sizes.is_empty() { "none" } else { &sizes }
            )));
        }
        let file = dir.join("nr_hugepages");
        let read = || -> Result<u64, Error> {
            let text =
                std::fs::read_to_string(&file).map_err(|e| Error::io("reading", &file, e))?;
            text.trim().parse().map_err(|_| {
                Error::Hugepages(format!(
                    "{} holds '{}', not a number",
                    file.display(),
                    text.trim()
                ))
            })
        };
        let before = read()?;
        if before != count {
            self.write(&file, &count.to_string())?;
        }
        let after = read()?;
        if after < count {
            let boot = if size.kib >= 1024 * 1024 {
                format!("reserve them at boot (kernel command line: default_hugepagesz=1G hugepagesz=1G hugepages={count})")
            } else {
                "free memory (drop caches: echo 3 > /proc/sys/vm/drop_caches) and retry, or ask for fewer".into()
            };
            return Err(Error::Hugepages(format!(
                "asked for {count} x {size} hugepages, the kernel reserved only {after} (not enough free contiguous memory); {boot}"
            )));
        }
        Ok(HugepageOutcome {
            size_kib: size.kib,
            node,
            before,
            requested: count,
            after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::HugepageSize;

    #[test]
    fn sizes() {
        for (t, kib) in [
            ("2M", 2048),
            ("2mb", 2048),
            ("2MiB", 2048),
            ("1G", 1 << 20),
            ("2048k", 2048),
        ] {
            assert_eq!(HugepageSize::parse(t).unwrap().kib, kib, "{t}");
        }
        for t in ["", "2", "0M", "xM", "-1G", "2T"] {
            assert_eq!(
                HugepageSize::parse(t).unwrap_err(),
                format!("bad hugepage size '{t}': expected 2M or 1G")
            );
        }
        assert_eq!(HugepageSize { kib: 1 << 20 }.to_string(), "1 GiB");
        assert_eq!(HugepageSize::TWO_MIB.to_string(), "2 MiB");
    }
}
