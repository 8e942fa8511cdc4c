//! fio's `cpus_allowed` and `cpus_allowed_policy`: which CPUs a job's clones run on.
//!
//! The list is fio's syntax: CPU numbers and inclusive ranges, comma-separated (`0-3,6`). With
//! the `shared` policy (fio's default) every clone of the job may run on any CPU of the list;
//! with `split` clone *k* runs on the *k*-th CPU of the list alone (wrapping around), which is
//! how one NVMe queue per clone gets a core of its own.

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// How a job's clones share its CPU list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CpuPolicy {
    /// Every clone may run on every CPU of the list.
    #[default]
    Shared,
    /// Clone k runs on the k-th CPU of the list alone (round robin).
    Split,
}

/// A parsed `cpus_allowed` list: sorted, without duplicates, non-empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

impl CpuList {
    /// The CPUs, ascending.
    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    /// The CPUs clone `clone` may run on under `policy`.
    pub fn for_clone(&self, policy: CpuPolicy, clone: u32) -> Vec<usize> {
        match policy {
            CpuPolicy::Shared => self.0.clone(),
            CpuPolicy::Split => vec![self.0[clone as usize % self.0.len()]],
        }
    }
}

/// Parses fio's CPU list syntax (`0-3,6`); the error names what is wrong.
pub fn parse_cpu_list(text: &str) -> Result<CpuList, String> {
    let mut cpus = Vec::new();
    for part in text.split(',').map(str::trim) {
        let number = |s: &str| {
            s.trim().parse::<usize>().map_err(|_| {
                format!("cpus_allowed: `{s}` in `{text}` is not a CPU number (e.g. 0-3,6)")
            })
        };
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (number(first)?, number(last)?);
                if first > last {
                    return Err(format!("cpus_allowed: the range `{part}` runs backwards"));
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(number(part)?),
        }
    }
    let limit = CpuSet::count();
    if let Some(&cpu) = cpus.iter().find(|&&cpu| cpu >= limit) {
        return Err(format!(
            "cpus_allowed: CPU {cpu} is beyond the {limit} CPUs an affinity mask can name"
        ));
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(CpuList(cpus))
}

/// Restricts the calling thread to `cpus`. The error names a CPU the machine does not offer
/// (the kernel refuses a mask of only such CPUs with EINVAL).
pub fn pin_current_thread(cpus: &[usize]) -> Result<(), String> {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu)
            .map_err(|e| format!("cpus_allowed: CPU {cpu}: {e}"))?;
    }
    sched_setaffinity(Pid::from_raw(0), &set).map_err(|e| {
        let online = std::thread::available_parallelism().map_or(1, |n| n.get());
        format!(
            "cpus_allowed: cannot run on CPUs {cpus:?} ({e}); this machine offers {online} CPU(s)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sched::sched_getaffinity;

    #[test]
    fn lists_and_ranges_parse_as_fio_does() {
        assert_eq!(parse_cpu_list("0-3,6").unwrap().cpus(), &[0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("2, 1,2").unwrap().cpus(), &[1, 2]);
        assert_eq!(parse_cpu_list("5").unwrap().cpus(), &[5]);
        for bad in ["", "a", "3-1", "1-", "0,,1", "99999"] {
            let error = parse_cpu_list(bad).unwrap_err();
            assert!(error.starts_with("cpus_allowed: "), "{bad}: {error}");
        }
    }

    #[test]
    fn split_gives_each_clone_one_cpu_round_robin() {
        let list = parse_cpu_list("1,4,7").unwrap();
        assert_eq!(list.for_clone(CpuPolicy::Split, 0), vec![1]);
        assert_eq!(list.for_clone(CpuPolicy::Split, 4), vec![4]);
        assert_eq!(list.for_clone(CpuPolicy::Shared, 4), vec![1, 4, 7]);
    }

    #[test]
    fn pinning_restricts_the_thread_and_a_missing_cpu_is_named() {
        std::thread::spawn(|| {
            pin_current_thread(&[0]).unwrap();
            let set = sched_getaffinity(Pid::from_raw(0)).unwrap();
            assert!(set.is_set(0).unwrap());
            assert!(!set.is_set(1).unwrap());
            let error = pin_current_thread(&[1000]).unwrap_err();
            assert!(error.contains("cannot run on CPUs [1000]"), "{error}");
        })
        .join()
        .unwrap();
    }
}
