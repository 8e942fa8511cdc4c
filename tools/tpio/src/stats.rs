//! Per-job statistics: exact min/max/mean/stddev and an HDR histogram for percentiles.
//!
//! Mean and standard deviation come from exact integer sums of the samples and of their squares
//! (no floating-point work per sample; `u128` holds the squares of 10^13 samples of an hour
//! each), not from the histogram, so they are exact; percentiles come from `hdrhistogram` at 3 significant
//! digits (relative error <= 0.1%), the resolution fio's own histogram roughly has. Both the
//! human and the JSON report are rendered from the same [`LatencySummary`] values.

use hdrhistogram::Histogram;

/// The percentiles fio prints by default, in fio's order.
pub const PERCENTILES: [f64; 17] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95,
    99.99,
];

/// Largest latency the histogram tracks exactly (1 hour in ns); larger values are clamped.
const HISTOGRAM_MAX_NS: u64 = 3_600_000_000_000;

/// A latency distribution in nanoseconds.
#[derive(Debug, Clone)]
pub struct LatencyStats {
    histogram: Option<Histogram<u64>>,
    count: u64,
    min: u64,
    max: u64,
    /// Sum of the samples.
    sum: u128,
    /// Sum of the samples' squares (saturating: only absurd inputs reach it).
    sum_squares: u128,
}

impl LatencyStats {
    /// An empty distribution; `with_percentiles` false keeps only min/max/mean/stddev (slat).
    pub fn new(with_percentiles: bool) -> Self {
        let histogram = with_percentiles
            .then(|| Histogram::new_with_bounds(1, HISTOGRAM_MAX_NS, 3).ok())
            .flatten();
        LatencyStats {
            histogram,
            count: 0,
            min: u64::MAX,
            max: 0,
            sum: 0,
            sum_squares: 0,
        }
    }

    /// Adds one sample.
    pub fn record(&mut self, nanos: u64) {
        self.count += 1;
        self.min = self.min.min(nanos);
        self.max = self.max.max(nanos);
        let value = u128::from(nanos);
        self.sum += value;
        self.sum_squares = self.sum_squares.saturating_add(value * value);
        if let Some(histogram) = &mut self.histogram {
            histogram.saturating_record(nanos.clamp(1, HISTOGRAM_MAX_NS));
        }
    }

    /// Adds every sample of `other` (sums added, so the moments stay exact; histograms summed).
    pub fn merge(&mut self, other: &LatencyStats) {
        if other.count == 0 {
            return;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.sum_squares = self.sum_squares.saturating_add(other.sum_squares);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if let (Some(mine), Some(theirs)) = (&mut self.histogram, &other.histogram) {
            let _ = mine.add(theirs);
        }
    }

    /// Completion-latency bins as fio's json+ writes them: (bin value in ns, count) for every
    /// non-empty bucket of the histogram.
    pub fn bins(&self) -> Vec<(u64, u64)> {
        self.histogram
            .as_ref()
            .map(|histogram| {
                histogram
                    .iter_recorded()
                    .map(|value| (value.value_iterated_to(), value.count_at_value()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Samples in `[low, high]` ns (histogram resolution; 0 without a histogram).
    pub fn count_between(&self, low: u64, high: u64) -> u64 {
        self.histogram.as_ref().map_or(0, |histogram| {
            let high = high.min(HISTOGRAM_MAX_NS);
            if low > high {
                return 0;
            }
            histogram
                .iter_recorded()
                .filter(|value| {
                    let at = value.value_iterated_to();
                    at >= low && at <= high
                })
                .map(|value| value.count_at_value())
                .sum()
        })
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The summary both reports print.
    pub fn summary(&self) -> LatencySummary {
        if self.count == 0 {
            return LatencySummary {
                min: 0,
                max: 0,
                mean: 0.0,
                stddev: 0.0,
                count: 0,
                percentiles: self
                    .histogram
                    .as_ref()
                    .map(|_| PERCENTILES.iter().map(|p| (*p, 0)).collect()),
            };
        }
        let stddev = if self.count > 1 {
            let n = u128::from(self.count);
            // n * sum(x^2) - sum(x)^2 = n^2 * variance * (n-1)/n, exact while it fits.
            let variance = match n
                .checked_mul(self.sum_squares)
                .zip(self.sum.checked_mul(self.sum))
            {
                Some((scaled, square)) => {
                    scaled.saturating_sub(square) as f64 / (n * (n - 1)) as f64
                }
                None => {
                    let mean = self.sum as f64 / n as f64;
                    (self.sum_squares as f64 - mean * self.sum as f64).max(0.0) / (n - 1) as f64
                }
            };
            variance.sqrt()
        } else {
            0.0
        };
        LatencySummary {
            min: self.min,
            max: self.max,
            mean: self.sum as f64 / self.count as f64,
            stddev,
            count: self.count,
            percentiles: self.histogram.as_ref().map(|histogram| {
                PERCENTILES
                    .iter()
                    .map(|p| {
                        (
                            *p,
                            histogram
                                .value_at_percentile(*p)
                                .min(self.max)
                                .max(self.min),
                        )
                    })
                    .collect()
            }),
        }
    }
}

/// A finished latency distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencySummary {
    /// Smallest sample (ns).
    pub min: u64,
    /// Largest sample (ns).
    pub max: u64,
    /// Mean (ns).
    pub mean: f64,
    /// Sample standard deviation (ns), as fio computes it.
    pub stddev: f64,
    /// Number of samples.
    pub count: u64,
    /// (percentile, ns) pairs, when tracked.
    pub percentiles: Option<Vec<(f64, u64)>>,
}

/// One direction's counters.
#[derive(Debug, Clone)]
pub struct DirectionStats {
    /// Bytes completed.
    pub io_bytes: u64,
    /// I/Os completed.
    pub total_ios: u64,
    /// Queue to submitted (time spent before the device saw it).
    pub slat: LatencyStats,
    /// Submitted to completed.
    pub clat: LatencyStats,
    /// Queue to completed.
    pub lat: LatencyStats,
}

impl Default for DirectionStats {
    fn default() -> Self {
        DirectionStats {
            io_bytes: 0,
            total_ios: 0,
            slat: LatencyStats::new(false),
            clat: LatencyStats::new(true),
            lat: LatencyStats::new(true),
        }
    }
}

impl DirectionStats {
    /// Adds `other`'s I/Os and samples to these.
    pub fn merge(&mut self, other: &DirectionStats) {
        self.io_bytes += other.io_bytes;
        self.total_ios += other.total_ios;
        self.slat.merge(&other.slat);
        self.clat.merge(&other.clat);
        self.lat.merge(&other.lat);
    }

    /// Records one completed I/O of `bytes` with its three latencies in ns.
    pub fn record(&mut self, bytes: u64, slat: u64, clat: u64) {
        self.io_bytes += bytes;
        self.total_ios += 1;
        self.slat.record(slat);
        self.clat.record(clat);
        self.lat.record(slat + clat);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_moments_and_percentiles() {
        let mut stats = LatencyStats::new(true);
        for value in 1..=1000u64 {
            stats.record(value * 1000);
        }
        let summary = stats.summary();
        assert_eq!(summary.min, 1000);
        assert_eq!(summary.max, 1_000_000);
        assert!((summary.mean - 500_500.0).abs() < 1e-6);
        // Sample stddev of 1000..=1_000_000 step 1000.
        let exact = {
            let n = 1000.0f64;
            let values: Vec<f64> = (1..=1000).map(|v| v as f64 * 1000.0).collect();
            let mean = values.iter().sum::<f64>() / n;
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        };
        assert!((summary.stddev - exact).abs() < 1e-3 * exact);
        let percentiles = summary.percentiles.clone().expect("tracked");
        let p50 = percentiles.iter().find(|(p, _)| *p == 50.0).expect("p50").1;
        assert!((499_000..=501_000).contains(&p50), "p50 {p50}");
        // Merging two halves gives the same moments as recording everything in one.
        let (mut low, mut high) = (LatencyStats::new(true), LatencyStats::new(true));
        for value in 1..=1000u64 {
            if value <= 300 { &mut low } else { &mut high }.record(value * 1000);
        }
        low.merge(&high);
        let merged = low.summary();
        assert_eq!(
            (merged.min, merged.max, merged.count),
            (1000, 1_000_000, 1000)
        );
        assert!((merged.mean - summary.mean).abs() < 1e-6);
        assert!((merged.stddev - summary.stddev).abs() < 1e-6 * summary.stddev);
        assert_eq!(merged.percentiles, summary.percentiles);
        let p99 = percentiles.iter().find(|(p, _)| *p == 99.0).expect("p99").1;
        assert!((989_000..=991_000).contains(&p99), "p99 {p99}");
    }

    #[test]
    fn equal_samples_have_no_spread_and_huge_sums_still_give_a_stddev() {
        let mut stats = LatencyStats::new(false);
        for _ in 0..10_000 {
            stats.record(123_456_789);
        }
        let summary = stats.summary();
        assert_eq!(summary.mean, 123_456_789.0);
        assert_eq!(summary.stddev, 0.0, "exact sums: no rounding residue");
        // Sums too large for n * sum(x^2) in u128 take the floating-point path.
        let mut huge = LatencyStats::new(false);
        huge.record(1);
        huge.record(3);
        huge.count = 1 << 40;
        huge.sum = 2u128 << 39; // mean 2
        huge.sum_squares = u128::MAX / 2; // n * sum_squares overflows
        let spread = huge.summary().stddev;
        assert!(spread.is_finite() && spread > 0.0, "{spread}");
    }
}
