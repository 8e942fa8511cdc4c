//! Turning a run into numbers: memory integrated over time, failures, map latencies,
//! throughput.
//!
//! **Memory.** The sampler's series is read as a step function: each sample's capacity holds
//! until the next sample. The time average is the integral of that step function over
//! [first sample, last sample] divided by its length; the peak is the largest sample. A
//! capacity change shorter than one sampling period (1 ms) can be missed by the peak; the
//! pool's own counters (growths, transient chunks) are reported beside it to show that.
//!
//! **Latency.** Each map call is timed in the lab, from the call to its result (waits
//! included; the time waiting for a *device* slot is not included: that is the device's
//! queue, the same for every policy). The pool's own wait histogram is reported too.
//!
//! **Throughput.** Offered: the bytes a device's requests ask for over the span of their
//! arrivals. Achieved: the bytes completed over [first arrival, last completion].

use hdrhistogram::Histogram;
use tidepool::pool::WaitPercentiles;

use crate::run::{MapResult, RunResult, Sample};
use crate::trace::Trace;

/// Latency percentiles, µs.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Largest, µs.
    pub max_us: f64,
}

impl Latency {
    /// Percentiles of `values_ns` (nanoseconds).
    pub fn of(values_ns: impl IntoIterator<Item = u64>) -> Latency {
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)
            .expect("static histogram bounds are valid");
        for v in values_ns {
            h.saturating_record(v.max(1));
        }
        if h.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.5)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// One device's throughput.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct DeviceThroughput {
    /// The device's name.
    pub name: String,
    /// Requests offered.
    pub requests: u64,
    /// Requests completed.
    pub completed: u64,
    /// Offered MB/s (10^6 B/s).
    pub offered_mbps: f64,
    /// Achieved MB/s.
    pub achieved_mbps: f64,
}

/// Everything reported for one policy on one workload.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Metrics {
    /// Peak sampled pool memory, bytes.
    pub peak_bytes: u64,
    /// Time-averaged pool memory, bytes.
    pub avg_bytes: f64,
    /// Peak sampled bytes mapped.
    pub peak_in_use_bytes: u64,
    /// Requests in the trace.
    pub requests: u64,
    /// Requests released (fewer than `requests` only for a stopped search probe).
    pub released: u64,
    /// Failed awaitable (may-wait) maps.
    pub failed_awaitable: u64,
    /// Failed immediate maps.
    pub failed_immediate: u64,
    /// Lab-measured latency of every map call that succeeded.
    pub map_latency: Latency,
    /// Of those, may-wait maps only.
    pub map_latency_awaitable: Latency,
    /// The pool's own wait histogram (only maps that queued), ns.
    pub pool_wait: WaitPercentiles,
    /// Chunks grown (background and forced).
    pub grows: u64,
    /// Chunks given back.
    pub shrinks: u64,
    /// Transient chunks made.
    pub transient_chunks: u64,
    /// Immediate maps served from the reserve.
    pub reserve_allocs: u64,
    /// Offered MB/s, all devices.
    pub offered_mbps: f64,
    /// Achieved MB/s, all devices.
    pub achieved_mbps: f64,
    /// Per device.
    pub devices: Vec<DeviceThroughput>,
    /// p99 of how late the device model released arrivals, µs (machine overload shows here).
    pub arrival_lag_p99_us: u64,
    /// Run length, s.
    pub elapsed_s: f64,
}

/// The time average of a step function given by `samples` (each value holds until the next
/// sample), over [first, last] sample time. A single sample averages to its value.
pub fn time_average(samples: &[Sample]) -> f64 {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return 0.0;
    };
    let span = last.t_us.saturating_sub(first.t_us);
    if span == 0 {
        return first.capacity_bytes as f64;
    }
    let area: f64 = samples
        .windows(2)
        .map(|w| w[0].capacity_bytes as f64 * (w[1].t_us - w[0].t_us) as f64)
        .sum();
    area / span as f64
}

/// Computes the [`Metrics`] of `run` over `trace`.
pub fn compute(trace: &Trace, run: &RunResult) -> Metrics {
    let reqs = &trace.requests;
    let mut failed_awaitable = 0;
    let mut failed_immediate = 0;
    let mut lat_all = Vec::new();
    let mut lat_wait = Vec::new();
    let n_dev = trace.devices.len();
    let mut dev_bytes_done = vec![0u64; n_dev];
    let mut dev_done = vec![0u64; n_dev];
    let mut dev_last_done = vec![0u64; n_dev];
    for o in &run.outcomes {
        let r = &reqs[o.index];
        match o.result {
            MapResult::Failed => {
                if r.may_wait {
                    failed_awaitable += 1;
                } else {
                    failed_immediate += 1;
                }
            }
            MapResult::Completed { done_us } => {
                lat_all.push(o.map_ns);
                if r.may_wait {
                    lat_wait.push(o.map_ns);
                }
                dev_bytes_done[r.device] += r.size as u64;
                dev_done[r.device] += 1;
                dev_last_done[r.device] = dev_last_done[r.device].max(done_us);
            }
        }
    }
    let mut devices = Vec::new();
    let (mut off_bytes, mut done_bytes) = (0u64, 0u64);
    let mut first_all = u64::MAX;
    let (mut last_arr_all, mut last_done_all) = (0u64, 0u64);
    for (d, spec) in trace.devices.iter().enumerate() {
        let mine: Vec<_> = reqs.iter().filter(|r| r.device == d).collect();
        let Some(first) = mine.first().map(|r| r.time_us) else {
            continue;
        };
        let last = mine.last().map_or(first, |r| r.time_us);
        let bytes: u64 = mine.iter().map(|r| r.size as u64).sum();
        first_all = first_all.min(first);
        last_arr_all = last_arr_all.max(last);
        last_done_all = last_done_all.max(dev_last_done[d]);
        off_bytes += bytes;
        done_bytes += dev_bytes_done[d];
        devices.push(DeviceThroughput {
            name: spec.name.clone(),
            requests: mine.len() as u64,
            completed: dev_done[d],
            offered_mbps: mbps(bytes, last.saturating_sub(first)),
            achieved_mbps: mbps(dev_bytes_done[d], dev_last_done[d].saturating_sub(first)),
        });
    }
    let s = &run.stats;
    Metrics {
        peak_bytes: run
            .samples
            .iter()
            .map(|s| s.capacity_bytes)
            .max()
            .unwrap_or(0),
        avg_bytes: time_average(&run.samples),
        peak_in_use_bytes: run
            .samples
            .iter()
            .map(|s| s.in_use_bytes)
            .max()
            .unwrap_or(0),
        requests: reqs.len() as u64,
        released: run.outcomes.len() as u64,
        failed_awaitable,
        failed_immediate,
        map_latency: Latency::of(lat_all),
        map_latency_awaitable: Latency::of(lat_wait),
        pool_wait: s.wait.clone(),
        grows: s.grows,
        shrinks: s.shrinks,
        transient_chunks: s.transient_allocs,
        reserve_allocs: s.reserve_allocs,
        offered_mbps: mbps(off_bytes, last_arr_all.saturating_sub(first_all)),
        achieved_mbps: mbps(done_bytes, last_done_all.saturating_sub(first_all)),
        devices,
        arrival_lag_p99_us: percentile_sorted(&run.clock.arrival_lag_us, 0.99),
        elapsed_s: run.elapsed_us as f64 / 1e6,
    }
}

/// MB/s (10^6 bytes per second) for `bytes` over `us` microseconds; 0 for an empty span.
fn mbps(bytes: u64, us: u64) -> f64 {
    if us == 0 {
        0.0
    } else {
        bytes as f64 / us as f64
    }
}

/// The `q` quantile of an ascending slice (0 when empty).
fn percentile_sorted(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t_us: u64, cap: u64) -> Sample {
        Sample {
            t_us,
            capacity_bytes: cap,
            in_use_bytes: 0,
            waiters: 0,
        }
    }

    #[test]
    fn time_average_integrates_a_step_function() {
        // 10 for 2 µs, 30 for 6 µs, then the closing sample: (20 + 180) / 8 = 25.
        assert_eq!(time_average(&[s(0, 10), s(2, 30), s(8, 0)]), 25.0);
        assert_eq!(time_average(&[s(5, 7)]), 7.0);
        assert_eq!(time_average(&[]), 0.0);
        // Uneven sampling does not bias it: the same signal sampled more often.
        let fine: Vec<_> = (0..=8).map(|t| s(t, if t < 2 { 10 } else { 30 })).collect();
        assert_eq!(time_average(&fine), 25.0);
    }

    #[test]
    fn latency_percentiles_and_lag_quantiles() {
        let l = Latency::of((1..=1000).map(|i| i * 1000));
        assert_eq!(l.count, 1000);
        assert!((l.p50_us - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99_us - 990.0).abs() < 1.0, "{l:?}");
        assert_eq!(percentile_sorted(&[1, 2, 3, 4], 0.5), 2);
        assert_eq!(percentile_sorted(&[1, 2, 3, 4], 0.99), 4);
        assert_eq!(mbps(2_000_000, 1_000_000), 2.0);
    }
}
