//! The built-in workloads: seeded generators of [`Trace`]s.
//!
//! Every workload is fixed by its seed; its numbers were chosen from the sources cited below
//! before any policy was run, and are the same for every policy.
//!
//! | name | what it models |
//! |------|----------------|
//! | `steady` | a storage mix at a constant Poisson rate: 4 000 req/s, 4–128 KiB, holds ≈ 300 µs |
//! | `bursty` | on/off storage: 500 req/s, with bursts of 10–50x that rate lasting 50–150 ms about once a second, 4–128 KiB, held by a FIFO device of 400 MB/s (bursts queue up behind it) |
//! | `network` | a NIC: 8 000 pkt/s, 57.7 % ≤ 2 KiB and 91.3 % ≤ 4 KiB (cc-swiotlb's measurements, LKML 2023), TX may wait, RX refill may not |
//! | `multi` | head of line: a slow device (128 KiB, ≈ 40 ms, queue depth 64) and a fast one (16 KiB, ≈ 1 ms, queue depth 8) share one pool; both are offered more than they can serve |
//!
//! Production-like workloads ([`PRODUCTION`]: minutes long, so not in the default report):
//!
//! | name | what it models |
//! |------|----------------|
//! | `onoff` | 90 s of a service that works 10 s and idles 20 s: 2 000 req/s with 5x bursts of 50–150 ms while on, 20 req/s while off; the `bursty` disk |
//! | `diurnal` | a day compressed into 120 s: the rate follows a raised cosine from 50 to 3 000 req/s and back, with 4x bursts about every 2 s; the `bursty` disk |
//! | `shared` | 60 s of a NIC and a disk on one pool: the `network` mix at 4 000 pkt/s with 4x surges of 2 s every ~10 s, and the `bursty` disk at 300 req/s with 20x bursts |
//! | `coco` | a confidential VM's devices on one pool for 20 s: four `bursty`-like disks (300 req/s, 20x bursts, each its own FIFO 400 MB/s) and two NICs (4 000 pkt/s each) |
//! | `coco-cloud` | the same VM on slow cloud volumes: eight disks of 50 MB/s each (150 req/s, 20x bursts: each burst queues ~10–30 MB behind its disk) and two NICs |
//!
//! Holds (`hold_us`) are the device's service time for that request: how long the bounce
//! buffer stays mapped. For `bursty` they come from a single-server FIFO model of the disk
//! (each request completes `latency + size / bandwidth` after the later of its arrival and the
//! previous completion), so a burst above the disk's bandwidth builds a backlog of mapped
//! buffers: this is where a static swiotlb needs its large size.

use crate::rng::Rng;
use crate::trace::{DeviceSpec, Request, Trace};
use tidepool::pool::Direction;

const KIB: usize = 1024;

/// Names of the built-in workloads, in report order.
pub const WORKLOADS: [&str; 4] = ["steady", "bursty", "network", "multi"];

/// The production-like workloads (minutes long; see the module doc).
pub const PRODUCTION: [&str; 5] = ["onoff", "diurnal", "shared", "coco", "coco-cloud"];

/// Every built-in workload.
pub const ALL_WORKLOADS: [&str; 9] = [
    "steady",
    "bursty",
    "network",
    "multi",
    "onoff",
    "diurnal",
    "shared",
    "coco",
    "coco-cloud",
];

/// A one-line description of a built-in workload, for reports.
pub fn describe(name: &str) -> &'static str {
    match name {
        "steady" => "storage mix, Poisson 4000 req/s, 4-128 KiB, holds ~300 us",
        "bursty" => "on/off storage: 500 req/s with 10-50x bursts of 50-150 ms ~1/s, 4-128 KiB, FIFO disk 400 MB/s",
        "network" => "NIC mix 8000 pkt/s: 57.7% <= 2 KiB, 91.3% <= 4 KiB; TX may wait, RX may not",
        "multi" => "slow dev (128 KiB, ~40 ms, QD 64) + fast dev (16 KiB, ~1 ms, QD 8) share a pool",
        "onoff" => "90 s: 10 s on (2000 req/s, 5x bursts) / 20 s off (20 req/s), FIFO disk 400 MB/s",
        "diurnal" => "120 s day: raised cosine 50..3000..50 req/s with 4x bursts ~every 2 s, FIFO disk 400 MB/s",
        "shared" => "60 s: NIC 4000 pkt/s with 4x 2 s surges + bursty disk 300 req/s (20x bursts), one pool",
        "coco" => "20 s confidential VM: 4 bursty disks (300 req/s, 20x bursts, 400 MB/s each) + 2 NICs 4000 pkt/s",
        "coco-cloud" => "20 s confidential VM: 8 cloud volumes (150 req/s, 20x bursts, 50 MB/s each) + 2 NICs 4000 pkt/s",
        _ => "user trace",
    }
}

/// A trace file's name without its extension, for reports.
pub fn trace_name(path: &std::path::Path) -> String {
    path.file_stem()
        .map_or("trace".into(), |s| s.to_string_lossy().into_owned())
}

/// The built-in workloads `names` (generated from `seed` at `scale`) and the CSV traces at
/// `paths`, each with its report name; an unknown workload name or an unreadable trace is one
/// error line.
pub fn named_traces(
    names: &[String],
    paths: &[std::path::PathBuf],
    seed: u64,
    scale: f64,
) -> Result<Vec<(String, Trace)>, String> {
    let mut named = Vec::with_capacity(names.len() + paths.len());
    for name in names {
        let t = generate(name, seed, scale)
            .ok_or_else(|| format!("unknown workload {name:?}; built-in: {ALL_WORKLOADS:?}"))?;
        named.push((name.clone(), t));
    }
    for path in paths {
        let t = Trace::load(path).map_err(|e| e.to_string())?;
        named.push((trace_name(path), t));
    }
    Ok(named)
}

/// Generates the built-in workload `name` from `seed`, `scale` times its normal length
/// (1.0 for reports; tests use less). Returns `None` for an unknown name.
pub fn generate(name: &str, seed: u64, scale: f64) -> Option<Trace> {
    let mut rng = Rng::new(seed ^ fnv(name));
    let t = match name {
        "steady" => steady(&mut rng, 3.0 * scale),
        "bursty" => bursty(&mut rng, 8.0 * scale),
        "network" => network(&mut rng, 3.0 * scale),
        "multi" => multi(&mut rng, 3.0 * scale),
        "onoff" => onoff(&mut rng, 90.0 * scale),
        "diurnal" => diurnal(&mut rng, 120.0 * scale),
        "shared" => shared(&mut rng, 60.0 * scale),
        "coco" => coco(&mut rng, 20.0 * scale),
        "coco-cloud" => coco_cloud(&mut rng, 20.0 * scale),
        _ => return None,
    };
    Some(t)
}

/// FNV-1a of a name: gives each workload its own stream for one user seed.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Storage sizes 4–128 KiB (powers of two), weighted toward small blocks.
fn storage_size(rng: &mut Rng, weights: &[f64; 6]) -> usize {
    [4, 8, 16, 32, 64, 128][rng.weighted(weights)] * KIB
}

fn disk() -> Vec<DeviceSpec> {
    vec![DeviceSpec {
        name: "disk".into(),
        queue_depth: None,
    }]
}

/// Reads are 60 % of storage requests.
fn storage_direction(rng: &mut Rng) -> Direction {
    if rng.chance(0.6) {
        Direction::FromDevice
    } else {
        Direction::ToDevice
    }
}

fn steady(rng: &mut Rng, secs: f64) -> Trace {
    let mut reqs = Vec::new();
    let mut t = 0.0;
    let end = secs * 1e6;
    loop {
        t += rng.exponential(1e6 / 4000.0);
        if t >= end {
            break;
        }
        reqs.push(Request {
            time_us: t as u64,
            size: storage_size(rng, &[0.4, 0.2, 0.15, 0.1, 0.1, 0.05]),
            direction: storage_direction(rng),
            hold_us: rng.lognormal(300.0, 0.5).max(1.0) as u64,
            may_wait: rng.chance(0.9),
            device: 0,
        });
    }
    Trace::new(disk(), reqs)
}

fn bursty(rng: &mut Rng, secs: f64) -> Trace {
    const BASE_RATE: f64 = 500.0; // req/s
    let end = secs * 1e6;
    // Burst windows: gaps ~ exp(mean 1 s), lengths U[50, 150] ms, multiplier U[10, 50].
    let bursts = burst_windows(rng, end, 1e6, 10.0, 50.0);
    let rate_at = |t: f64| BASE_RATE * burst_factor(&bursts, t);
    // One FIFO disk of 400 MB/s, thinned from the peak rate.
    Trace::new(disk(), fifo_disk(rng, end, BASE_RATE * 50.0, rate_at, 0))
}

/// Burst windows over `[0, end)` µs: gaps ~ exp(mean `gap_us`), lengths U[50, 150] ms,
/// multipliers U[lo, hi].
fn burst_windows(rng: &mut Rng, end: f64, gap_us: f64, lo: f64, hi: f64) -> Vec<(f64, f64, f64)> {
    let mut bursts = Vec::new();
    let mut at = rng.exponential(gap_us);
    while at < end {
        let len = rng.uniform(50e3, 150e3);
        let mult = rng.uniform(lo, hi);
        bursts.push((at, at + len, mult));
        at += len + rng.exponential(gap_us);
    }
    bursts
}

/// The multiplier of the burst covering `t`, 1 outside bursts.
fn burst_factor(bursts: &[(f64, f64, f64)], t: f64) -> f64 {
    bursts
        .iter()
        .find(|(s, e, _)| *s <= t && t < *e)
        .map_or(1.0, |(_, _, m)| *m)
}

/// Storage requests to one FIFO disk of 400 MB/s arriving at `rate_at(t)` req/s (never above
/// `peak`), by thinning (Lewis–Shedler: candidates at the peak rate, kept with probability
/// rate/peak); for `device`.
fn fifo_disk(
    rng: &mut Rng,
    end: f64,
    peak: f64,
    rate_at: impl Fn(f64) -> f64,
    device: usize,
) -> Vec<Request> {
    fifo_disk_at(rng, end, peak, rate_at, device, 400e6)
}

/// [`fifo_disk`] with the disk's bandwidth in B/s.
fn fifo_disk_at(
    rng: &mut Rng,
    end: f64,
    peak: f64,
    rate_at: impl Fn(f64) -> f64,
    device: usize,
    bandwidth: f64,
) -> Vec<Request> {
    let mut reqs = Vec::new();
    let mut t = 0.0;
    let mut disk_free_at = 0.0f64;
    loop {
        t += rng.exponential(1e6 / peak);
        if t >= end {
            break;
        }
        if !rng.chance((rate_at(t) / peak).min(1.0)) {
            continue;
        }
        let size = storage_size(rng, &[0.3, 0.15, 0.15, 0.15, 0.15, 0.1]);
        let latency = rng.lognormal(100.0, 0.5);
        let start = disk_free_at.max(t);
        disk_free_at = start + size as f64 / bandwidth * 1e6;
        let done = disk_free_at + latency;
        reqs.push(Request {
            time_us: t as u64,
            size,
            direction: storage_direction(rng),
            hold_us: (done - t).max(1.0) as u64,
            may_wait: rng.chance(0.95),
            device,
        });
    }
    reqs
}

/// One packet of the `network` mix at `t` µs on `device`: 30 % ≤ 512 B, 27.7 % ≤ 2 KiB,
/// 33.6 % ≤ 4 KiB, 8.7 % up to 64 KiB (TSO/GRO); half sent (may wait), half received.
fn packet(rng: &mut Rng, t: f64, device: usize) -> Request {
    let size = match rng.weighted(&[30.0, 27.7, 33.6, 8.7]) {
        0 => rng.range(64, 512),
        1 => rng.range(513, 2048),
        2 => rng.range(2049, 4096),
        _ => rng.range(4097, 65536),
    } as usize;
    let tx = rng.chance(0.5);
    Request {
        time_us: t as u64,
        size,
        direction: if tx {
            Direction::ToDevice
        } else {
            Direction::FromDevice
        },
        hold_us: rng.lognormal(100.0, 0.8).max(1.0) as u64,
        may_wait: tx,
        device,
    }
}

/// NIC requests (the `network` mix) at `rate_at(t)` packets/s (never above `peak`).
fn nic(
    rng: &mut Rng,
    end: f64,
    peak: f64,
    rate_at: impl Fn(f64) -> f64,
    device: usize,
) -> Vec<Request> {
    let mut reqs = Vec::new();
    let mut t = 0.0;
    loop {
        t += rng.exponential(1e6 / peak);
        if t >= end {
            break;
        }
        if !rng.chance((rate_at(t) / peak).min(1.0)) {
            continue;
        }
        reqs.push(packet(rng, t, device));
    }
    reqs
}

fn onoff(rng: &mut Rng, secs: f64) -> Trace {
    let end = secs * 1e6;
    let bursts = burst_windows(rng, end, 1e6, 5.0, 5.0);
    let rate = |t: f64| {
        let on = (t / 1e6) % 30.0 < 10.0;
        if on {
            2000.0 * burst_factor(&bursts, t)
        } else {
            20.0
        }
    };
    Trace::new(disk(), fifo_disk(rng, end, 10_000.0, rate, 0))
}

fn diurnal(rng: &mut Rng, secs: f64) -> Trace {
    let end = secs * 1e6;
    let bursts = burst_windows(rng, end, 2e6, 4.0, 4.0);
    let rate = |t: f64| {
        let phase = t / end * std::f64::consts::TAU;
        (50.0 + 2950.0 * (1.0 - phase.cos()) / 2.0) * burst_factor(&bursts, t)
    };
    Trace::new(disk(), fifo_disk(rng, end, 12_000.0, rate, 0))
}

fn shared(rng: &mut Rng, secs: f64) -> Trace {
    let end = secs * 1e6;
    // NIC surges: 2 s long, gaps ~ exp(10 s).
    let mut surges = Vec::new();
    let mut at = rng.exponential(10e6);
    while at < end {
        surges.push((at, at + 2e6, 4.0));
        at += 2e6 + rng.exponential(10e6);
    }
    let bursts = burst_windows(rng, end, 1e6, 20.0, 20.0);
    let mut reqs = nic(rng, end, 16_000.0, |t| 4000.0 * burst_factor(&surges, t), 0);
    reqs.extend(fifo_disk(
        rng,
        end,
        6000.0,
        |t| 300.0 * burst_factor(&bursts, t),
        1,
    ));
    let devices = vec![
        DeviceSpec {
            name: "nic".into(),
            queue_depth: None,
        },
        DeviceSpec {
            name: "disk".into(),
            queue_depth: None,
        },
    ];
    Trace::new(devices, reqs)
}

fn coco(rng: &mut Rng, secs: f64) -> Trace {
    disks_and_nics(rng, secs, 4, "disk", 300.0, 400e6)
}

fn coco_cloud(rng: &mut Rng, secs: f64) -> Trace {
    disks_and_nics(rng, secs, 8, "vol", 150.0, 50e6)
}

/// A confidential VM's devices: `disks` FIFO disks (`{disk_name}N`) of `bandwidth` B/s, each at
/// `base` req/s with its own bursts of 20×, then two NICs (`nicN`) at 4000 packets/s.
fn disks_and_nics(
    rng: &mut Rng,
    secs: f64,
    disks: usize,
    disk_name: &str,
    base: f64,
    bandwidth: f64,
) -> Trace {
    let end = secs * 1e6;
    let mut reqs = Vec::new();
    let mut devices = Vec::new();
    for d in 0..disks {
        let bursts = burst_windows(rng, end, 1e6, 20.0, 20.0);
        reqs.extend(fifo_disk_at(
            rng,
            end,
            base * 20.0,
            |t| base * burst_factor(&bursts, t),
            d,
            bandwidth,
        ));
        devices.push(DeviceSpec {
            name: format!("{disk_name}{d}"),
            queue_depth: None,
        });
    }
    for n in 0..2 {
        reqs.extend(nic(rng, end, 4000.0, |_| 4000.0, disks + n));
        devices.push(DeviceSpec {
            name: format!("nic{n}"),
            queue_depth: None,
        });
    }
    Trace::new(devices, reqs)
}

fn network(rng: &mut Rng, secs: f64) -> Trace {
    let mut reqs = Vec::new();
    let mut t = 0.0;
    let end = secs * 1e6;
    loop {
        t += rng.exponential(1e6 / 8000.0);
        if t >= end {
            break;
        }
        reqs.push(packet(rng, t, 0));
    }
    Trace::new(
        vec![DeviceSpec {
            name: "nic".into(),
            queue_depth: None,
        }],
        reqs,
    )
}

fn multi(rng: &mut Rng, secs: f64) -> Trace {
    let devices = vec![
        DeviceSpec {
            name: "slow".into(),
            queue_depth: Some(64),
        },
        DeviceSpec {
            name: "fast".into(),
            queue_depth: Some(8),
        },
    ];
    let end = secs * 1e6;
    let mut reqs = Vec::new();
    // (device, rate req/s, size, hold median µs, sigma)
    for (device, rate, size, hold, sigma) in [
        (0usize, 2000.0, 128 * KIB, 40_000.0, 0.3),
        (1, 10_000.0, 16 * KIB, 1000.0, 0.2),
    ] {
        let mut t = 0.0;
        loop {
            t += rng.exponential(1e6 / rate);
            if t >= end {
                break;
            }
            reqs.push(Request {
                time_us: t as u64,
                size,
                direction: storage_direction(rng),
                hold_us: rng.lognormal(hold, sigma).max(1.0) as u64,
                may_wait: true,
                device,
            });
        }
    }
    Trace::new(devices, reqs)
}

/// The bytes a trace would hold mapped at its peak if every map succeeded at once (sizes
/// rounded up to the pool's power-of-two blocks, at least 512 B), honouring device queue
/// depths. A lower bound for any pool that serves the trace without waiting.
pub fn ideal_peak_bytes(trace: &Trace) -> u64 {
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, VecDeque};

    /// The simulation's state: bytes mapped now, the peak, busy slots, completions.
    struct Sim {
        now_bytes: u64,
        peak: u64,
        busy: Vec<usize>,
        completions: BinaryHeap<Reverse<(u64, usize, u64)>>,
    }
    impl Sim {
        fn start(&mut self, r: &Request, at: u64) {
            let block = r.size.max(512).next_power_of_two() as u64;
            self.busy[r.device] += 1;
            self.now_bytes += block;
            self.peak = self.peak.max(self.now_bytes);
            self.completions
                .push(Reverse((at + r.hold_us, r.device, block)));
        }
    }
    let mut sim = Sim {
        now_bytes: 0,
        peak: 0,
        busy: vec![0; trace.devices.len()],
        completions: BinaryHeap::new(),
    };
    let mut queued: Vec<VecDeque<&Request>> = vec![VecDeque::new(); trace.devices.len()];
    let mut arrivals = trace.requests.iter().peekable();
    loop {
        let next_arrival = arrivals.peek().map(|r| r.time_us);
        let next_done = sim.completions.peek().map(|Reverse((t, _, _))| *t);
        match (next_arrival, next_done) {
            (None, None) => break,
            // Completions first at equal times.
            (Some(a), d) if d.is_none_or(|d| a < d) => {
                let r = arrivals.next().expect("peeked");
                let depth = trace.devices[r.device].queue_depth.unwrap_or(usize::MAX);
                if sim.busy[r.device] < depth {
                    sim.start(r, a);
                } else {
                    queued[r.device].push_back(r);
                }
            }
            _ => {
                let Reverse((t, dev, bytes)) = sim.completions.pop().expect("peeked");
                sim.busy[dev] -= 1;
                sim.now_bytes -= bytes;
                if let Some(r) = queued[dev].pop_front() {
                    sim.start(r, t);
                }
            }
        }
    }
    sim.peak
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_reproducible_and_match_their_descriptions() {
        for name in WORKLOADS {
            let a = generate(name, 1, 0.2).unwrap();
            assert_eq!(a, generate(name, 1, 0.2).unwrap(), "{name} reproducible");
            assert_ne!(
                a,
                generate(name, 2, 0.2).unwrap(),
                "{name} depends on the seed"
            );
            assert!(!a.requests.is_empty());
        }
        let net = generate("network", 1, 1.0).unwrap();
        let n = net.requests.len() as f64;
        let le = |k: usize| net.requests.iter().filter(|r| r.size <= k).count() as f64 / n;
        assert!((le(2048) - 0.577).abs() < 0.01, "≤2 KiB share {}", le(2048));
        assert!((le(4096) - 0.913).abs() < 0.01, "≤4 KiB share {}", le(4096));
        let b = generate("bursty", 1, 1.0).unwrap();
        assert!(b.requests.iter().all(|r| (4096..=131072).contains(&r.size)));
        // Bursts: some 10 ms window holds far more than the mean rate.
        let mean_per_10ms = b.requests.len() as f64 / (b.span_us() as f64 / 10_000.0);
        let mut bins = vec![0u32; (b.span_us() / 10_000 + 1) as usize];
        for r in &b.requests {
            bins[(r.time_us / 10_000) as usize] += 1;
        }
        let max = *bins.iter().max().unwrap() as f64;
        assert!(
            max > 5.0 * mean_per_10ms,
            "max {max} vs mean {mean_per_10ms}"
        );
    }

    #[test]
    fn production_workloads_have_their_shape() {
        for name in PRODUCTION {
            let a = generate(name, 1, 0.05).unwrap();
            assert_eq!(a, generate(name, 1, 0.05).unwrap(), "{name} reproducible");
            assert!(!a.requests.is_empty(), "{name}");
            assert!(a.requests.iter().all(|r| r.device < a.devices.len()));
        }
        // onoff: the first 10 s (on) carry far more requests than the next 20 s (off).
        let t = generate("onoff", 1, 1.0).unwrap();
        let count = |lo: u64, hi: u64| {
            t.requests
                .iter()
                .filter(|r| (lo..hi).contains(&r.time_us))
                .count()
        };
        assert!(count(0, 10_000_000) > 50 * count(10_000_000, 30_000_000));
        assert!(t.span_us() > 80_000_000, "minutes, not seconds");
        // diurnal: the middle of the day is busier than its ends.
        let d = generate("diurnal", 1, 1.0).unwrap();
        let n = |lo: u64, hi: u64| {
            d.requests
                .iter()
                .filter(|r| (lo..hi).contains(&r.time_us))
                .count()
        };
        assert!(n(55_000_000, 65_000_000) > 10 * n(0, 10_000_000));
        // shared and coco: network and storage on one pool.
        let s = generate("shared", 1, 0.2).unwrap();
        assert_eq!(s.devices.len(), 2);
        assert!(
            s.requests.iter().any(|r| r.device == 0) && s.requests.iter().any(|r| r.device == 1)
        );
        assert_eq!(generate("coco", 1, 0.1).unwrap().devices.len(), 6);
    }

    #[test]
    fn ideal_peak_counts_overlap_and_queue_depth() {
        let r = |t, size, hold, device| Request {
            time_us: t,
            size,
            direction: Direction::ToDevice,
            hold_us: hold,
            may_wait: true,
            device,
        };
        // Two overlapping (4 KiB + 1000 B → 1 KiB block), then one after both ended.
        let t = Trace::new(
            disk(),
            vec![r(0, 4096, 10, 0), r(5, 1000, 10, 0), r(30, 65536, 1, 0)],
        );
        assert_eq!(ideal_peak_bytes(&t), 65536);
        let t = Trace::new(disk(), vec![r(0, 4096, 10, 0), r(5, 1000, 10, 0)]);
        assert_eq!(ideal_peak_bytes(&t), 4096 + 1024);
        // Queue depth 1: the second waits for the first, so they never overlap.
        let one = vec![DeviceSpec {
            name: "d".into(),
            queue_depth: Some(1),
        }];
        let t = Trace::new(one, vec![r(0, 4096, 10, 0), r(5, 4096, 10, 0)]);
        assert_eq!(ideal_peak_bytes(&t), 4096);
    }
}
