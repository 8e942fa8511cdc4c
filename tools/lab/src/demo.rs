//! The demo's story in ~25 s: one bursty load on two pools that both start at 2 MiB.
//!
//! - **tidepool**: 2 MiB prefill in 1 MiB chunks, awaiting maps, growth, and shrinking after
//!   100 ms idle (peak half-life 500 ms, so it visibly gives memory back between bursts);
//! - **fixed 2 MiB**: the same pool with no growth and no waiting: a map that does not fit
//!   fails at once, as SPDK's `spdk_dma_malloc` / a full swiotlb return -ENOMEM.
//!
//! The load ([`demo_trace`]): 11 s of a disk FIFO at 200 MB/s, 100 req/s at rest and three
//! 300 ms bursts of 8 000 req/s (4–128 KiB) at 1, 4 and 7 s: each burst offers more than the
//! disk serves, so mapped bytes pile up to ~15 MiB and drain.
//!
//! [`run_demo`] prints a compact timeline (one line per 250 ms) and a verdict, and saves
//! `demo_timeline.png` and `demo.json` into the output directory.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;
use tidepool::pool::{Direction, PoolConfig};

use crate::metrics::{compute, Metrics};
use crate::plot;
use crate::policy::{Base, Policy};
use crate::rng::Rng;
use crate::run::{run, MapResult, RunOptions, RunResult};
use crate::trace::{DeviceSpec, Request, Trace};

const MIB: f64 = (1 << 20) as f64;
const BIN_US: u64 = 250_000;

/// The demo's load (see the module doc), fixed by `seed`.
pub fn demo_trace(seed: u64) -> Trace {
    const BANDWIDTH: f64 = 200e6;
    let mut rng = Rng::new(seed ^ 0xde30);
    // A quiet second after the last burst's shrink-back (~2 s), so a loaded host still ends
    // with the pool back at its start.
    let end = 11e6;
    let bursts = [1e6, 4e6, 7e6];
    let rate = |t: f64| {
        if bursts.iter().any(|b| (*b..b + 300e3).contains(&t)) {
            8000.0
        } else {
            100.0
        }
    };
    let mut reqs = Vec::new();
    let (mut t, mut disk_free_at) = (0.0f64, 0.0f64);
    loop {
        t += rng.exponential(1e6 / 8000.0);
        if t >= end {
            break;
        }
        if !rng.chance(rate(t) / 8000.0) {
            continue;
        }
        let size =
            [4usize, 8, 16, 32, 64, 128][rng.weighted(&[0.3, 0.15, 0.15, 0.15, 0.15, 0.1])] << 10;
        let start = disk_free_at.max(t);
        disk_free_at = start + size as f64 / BANDWIDTH * 1e6;
        let done = disk_free_at + rng.lognormal(100.0, 0.5);
        reqs.push(Request {
            time_us: t as u64,
            size,
            direction: if rng.chance(0.6) {
                Direction::FromDevice
            } else {
                Direction::ToDevice
            },
            hold_us: (done - t).max(1.0) as u64,
            may_wait: true,
            device: 0,
        });
    }
    Trace::new(
        vec![DeviceSpec {
            name: "disk".into(),
            queue_depth: None,
        }],
        reqs,
    )
}

/// The two pools of the module doc.
pub fn demo_configs(trace: &Trace) -> (PoolConfig, PoolConfig) {
    let base = Base::for_trace(trace.max_size(), false);
    let chunk = 1 << 20;
    let tidepool = PoolConfig {
        chunk_bytes: chunk,
        prefill_bytes: 2 * chunk,
        low_watermark: 256 << 10,
        high_watermark: (256 << 10) + chunk,
        shrink_delay: Duration::from_millis(100),
        peak_half_life: Duration::from_millis(500),
        reserve_bytes: 256 << 10,
        ..base.config(Policy::Tidepool, 0)
    };
    let fixed = PoolConfig {
        chunk_bytes: chunk,
        ..base.config(Policy::Static, 2 * chunk)
    };
    (tidepool, fixed)
}

/// One 250 ms bin of a run's timeline.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Bin {
    /// Bin start, s.
    pub t_s: f64,
    /// Requests arriving in the bin.
    pub arrivals: u64,
    /// Largest pool capacity sampled in the bin, MiB.
    pub capacity_mib: f64,
    /// Largest bytes mapped sampled in the bin, MiB.
    pub in_use_mib: f64,
    /// Most requests waiting at once in the bin.
    pub waiting: u64,
    /// Maps that failed among the bin's arrivals.
    pub failed: u64,
}

/// A run's timeline in [`BIN_US`] bins.
pub fn timeline(trace: &Trace, r: &RunResult) -> Vec<Bin> {
    let n = (trace.span_us().max(r.elapsed_us) / BIN_US + 1) as usize;
    let mut bins: Vec<Bin> = (0..n)
        .map(|i| Bin {
            t_s: (i as u64 * BIN_US) as f64 / 1e6,
            ..Bin::default()
        })
        .collect();
    for s in &r.samples {
        if let Some(b) = bins.get_mut((s.t_us / BIN_US) as usize) {
            b.capacity_mib = b.capacity_mib.max(s.capacity_bytes as f64 / MIB);
            b.in_use_mib = b.in_use_mib.max(s.in_use_bytes as f64 / MIB);
            b.waiting = b.waiting.max(s.waiters);
        }
    }
    for req in &trace.requests {
        bins[(req.time_us / BIN_US) as usize].arrivals += 1;
    }
    for o in &r.outcomes {
        if o.result == MapResult::Failed {
            bins[(trace.requests[o.index].time_us / BIN_US) as usize].failed += 1;
        }
    }
    bins
}

/// What the demo found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoResult {
    /// Requests in the load.
    pub requests: u64,
    /// Tidepool's numbers.
    pub tidepool: Metrics,
    /// The fixed pool's numbers.
    pub fixed: Metrics,
    /// Tidepool's timeline.
    pub tidepool_timeline: Vec<Bin>,
    /// The fixed pool's timeline.
    pub fixed_timeline: Vec<Bin>,
    /// Tidepool's capacity when the run ended, MiB.
    pub tidepool_final_mib: f64,
    /// The story held: tidepool grew, some maps waited, none failed, it shrank back to its
    /// start, and the fixed pool failed maps.
    pub story_holds: bool,
}

/// Runs both pools on the demo load, prints the timeline and verdict to stdout, and saves
/// `demo_timeline.png` and `demo.json` in `out`.
pub fn run_demo(out: &Path, seed: u64) -> Result<DemoResult, String> {
    std::fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let trace = demo_trace(seed);
    let (tp_cfg, fixed_cfg) = demo_configs(&trace);
    let opts = RunOptions::default();
    let tp = run(&trace, tp_cfg, &opts).map_err(|e| e.to_string())?;
    let fx = run(&trace, fixed_cfg, &opts).map_err(|e| e.to_string())?;
    let (tm, fm) = (compute(&trace, &tp), compute(&trace, &fx));
    let (tt, ft) = (timeline(&trace, &tp), timeline(&trace, &fx));
    let final_mib = tp
        .samples
        .last()
        .map_or(0.0, |s| s.capacity_bytes as f64 / MIB);
    let start_mib = tp
        .samples
        .first()
        .map_or(0.0, |s| s.capacity_bytes as f64 / MIB);
    let story_holds = tm.peak_bytes as f64 / MIB > start_mib
        && tm.pool_wait.count > 0
        && tm.failed_awaitable + tm.failed_immediate == 0
        && final_mib <= start_mib
        && fm.failed_awaitable + fm.failed_immediate > 0;
    print!(
        "{}",
        render(&trace, &tt, &ft, &tm, &fm, start_mib, final_mib)
    );
    let text = crate::plot::load_font();
    plot_timeline(&out.join("demo_timeline.png"), &tt, &ft, text)?;
    let result = DemoResult {
        requests: trace.requests.len() as u64,
        tidepool: tm,
        fixed: fm,
        tidepool_timeline: tt,
        fixed_timeline: ft,
        tidepool_final_mib: final_mib,
        story_holds,
    };
    let json = serde_json::to_string_pretty(&result).map_err(|e| e.to_string())?;
    std::fs::write(out.join("demo.json"), json).map_err(|e| e.to_string())?;
    Ok(result)
}

/// A bar of `v` MiB, one `#` per MiB (at most 40).
fn bar(v: f64) -> String {
    "#".repeat((v.round() as usize).min(40))
}

/// The timeline and verdict as text.
fn render(
    trace: &Trace,
    tt: &[Bin],
    ft: &[Bin],
    tm: &Metrics,
    fm: &Metrics,
    start_mib: f64,
    final_mib: f64,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Same bursty load ({} maps, three 300 ms bursts above the disk's 200 MB/s) on two pools that start at 2 MiB:",
        trace.requests.len()
    );
    let _ = writeln!(
        s,
        "   t s  arrivals | tidepool: pool MiB (in use)                  waiting failed | fixed 2 MiB: failed"
    );
    for (a, b) in tt.iter().zip(ft) {
        let _ = writeln!(
            s,
            "  {:4.2} {:9} | {:5.1} ({:5.1}) {:32} {:7} {:6} | {:6}",
            a.t_s,
            a.arrivals,
            a.capacity_mib,
            a.in_use_mib,
            bar(a.capacity_mib),
            a.waiting,
            a.failed,
            b.failed
        );
    }
    let _ = writeln!(
        s,
        "tidepool:    started at {start_mib:.0} MiB, grew to {:.0} MiB ({} grows), {} maps waited \
         (wait p99 {:.1} ms), {} failed; back to {final_mib:.0} MiB at the end ({} shrinks); \
         time-averaged {:.1} MiB",
        tm.peak_bytes as f64 / MIB,
        tm.grows,
        tm.pool_wait.count,
        tm.pool_wait.p99_ns as f64 / 1e6,
        tm.failed_awaitable + tm.failed_immediate,
        tm.shrinks,
        tm.avg_bytes / MIB
    );
    let failed = fm.failed_awaitable + fm.failed_immediate;
    let _ = writeln!(
        s,
        "fixed 2 MiB: {failed} of {} maps failed ({:.1} %), as SPDK's allocator or a full swiotlb \
         returns -ENOMEM; the caller must retry or drop the I/O",
        fm.requests,
        100.0 * failed as f64 / fm.requests.max(1) as f64
    );
    s
}

/// Three panels over time: pool capacity and bytes in use of both pools; tidepool's waiting
/// requests; the fixed pool's failed maps per 250 ms.
fn plot_timeline(path: &Path, tt: &[Bin], ft: &[Bin], text: bool) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", path.display());
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let panels = root.split_evenly((3, 1));
    let tmax = tt.last().map_or(1.0, |b| b.t_s + 0.25);
    let green = RGBColor(0, 150, 60);
    let red = RGBColor(200, 30, 30);
    type Series<'a> = Vec<(&'a str, RGBColor, Vec<(f64, f64)>)>;
    let mem: Series<'_> = vec![
        (
            "tidepool pool MiB",
            green,
            tt.iter().map(|b| (b.t_s, b.capacity_mib)).collect(),
        ),
        (
            "tidepool in use MiB",
            RGBColor(120, 200, 140),
            tt.iter().map(|b| (b.t_s, b.in_use_mib)).collect(),
        ),
        (
            "fixed pool MiB",
            red,
            ft.iter().map(|b| (b.t_s, b.capacity_mib)).collect(),
        ),
    ];
    let waiting: Series<'_> = vec![(
        "tidepool: requests waiting (max per 250 ms)",
        green,
        tt.iter().map(|b| (b.t_s, b.waiting as f64)).collect(),
    )];
    let failed: Series<'_> = vec![
        (
            "fixed 2 MiB: failed maps per 250 ms",
            red,
            ft.iter().map(|b| (b.t_s, b.failed as f64)).collect(),
        ),
        (
            "tidepool: failed maps per 250 ms",
            green,
            tt.iter().map(|b| (b.t_s, b.failed as f64)).collect(),
        ),
    ];
    for (area, (title, series)) in panels.iter().zip([
        ("pool memory", mem),
        ("waiting instead of failing", waiting),
        ("failed maps", failed),
    ]) {
        let ymax = series
            .iter()
            .flat_map(|s| s.2.iter().map(|p| p.1))
            .fold(1.0, f64::max)
            * 1.15;
        let mut b = ChartBuilder::on(area);
        b.margin(8);
        if text {
            b.caption(title, ("sans-serif", 18))
                .x_label_area_size(30)
                .y_label_area_size(50);
        }
        let mut c = b
            .build_cartesian_2d(0f64..tmax, 0f64..ymax)
            .map_err(|x| e(&x))?;
        let mut mesh = c.configure_mesh();
        if text {
            mesh.x_desc("time (s)");
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|x| e(&x))?;
        for (name, col, pts) in series {
            plot::labelled_line(&mut c, pts, col, name, text).map_err(|x| e(&x))?;
        }
        plot::legend(&mut c, Some(SeriesLabelPosition::UpperRight), text).map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_load_bursts_above_two_mib_and_the_configs_are_valid() {
        let t = demo_trace(1);
        assert_eq!(t, demo_trace(1));
        let peak = crate::workload::ideal_peak_bytes(&t);
        assert!(peak > 6 << 20, "peak {peak} must overflow the 2 MiB pool");
        let (a, b) = demo_configs(&t);
        a.validate().unwrap();
        b.validate().unwrap();
        assert_eq!((a.prefill_bytes, b.max_bytes), (2 << 20, 2 << 20));
        assert!(a.waiting && !b.waiting);
        // The idle floor of tidepool's config is its prefill: high watermark ≤ two chunks.
        assert!(a.high_watermark <= a.prefill_bytes);
    }
}
