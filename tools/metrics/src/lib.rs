//! Tidepool's statistics for monitoring systems: Prometheus text exposition (format 0.0.4) and JSON.
//!
//! An [`Exposition`] is a set of metric families built from public statistics snapshots
//! ([`tidepool::pool::PoolStats`], [`tidepool::share::direct::DirectStats`], the NVMe driver's
//! [`tidepool_nvme::QueueCounters`], the virtio-net driver's [`tidepool_virtio_net::NetStats`], see
//! [`sources`]) or added directly by an application ([`Exposition::counter`], [`Exposition::gauge`],
//! [`Exposition::histogram`], ...). It only reads snapshots: nothing here touches a pool or a
//! driver, so rendering never slows the data path.
//!
//! Names follow Prometheus conventions and are checked when added: `tidepool_` prefix for library
//! metrics, base units as suffixes (`_bytes`, `_seconds`), counters end in `_total`, other types do
//! not; label names and values are validated and escaped. Families render in name order, each with
//! its `# HELP` and `# TYPE` line, series in the order they were added. The same families render
//! as JSON ([`Exposition::to_json`]) for consumers that do not speak Prometheus.
//!
//! ```
//! use tidepool_metrics::Exposition;
//! let mut metrics = Exposition::new();
//! metrics.gauge("tidepool_pool_capacity_bytes", "Bytes shared with the device.",
//!               &[("pool", "nvme0")], 4194304.0).unwrap();
//! let text = metrics.to_prometheus();
//! assert!(text.contains("# TYPE tidepool_pool_capacity_bytes gauge\n"));
//! assert!(text.contains("tidepool_pool_capacity_bytes{pool=\"nvme0\"} 4194304\n"));
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;

pub mod sources;

/// A metric that cannot be added as asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    /// The name is not `[a-zA-Z_:][a-zA-Z0-9_:]*`.
    #[error("invalid metric name {0:?}")]
    InvalidName(String),
    /// A label name is not `[a-zA-Z_][a-zA-Z0-9_]*`, starts with `__` (reserved), or is one the
    /// type uses itself (`le` for histograms, `quantile` for summaries).
    #[error("invalid label name {label:?} on {metric}")]
    InvalidLabel {
        /// The metric.
        metric: String,
        /// The label.
        label: String,
    },
    /// Counters must end in `_total`; other types must not (Prometheus naming conventions), and
    /// histogram/summary names must not end in a suffix their series use (`_bucket`, `_sum`,
    /// `_count`).
    #[error("{name}: a {kind} {rule}")]
    Naming {
        /// The metric.
        name: String,
        /// Its type.
        kind: &'static str,
        /// The convention it breaks.
        rule: &'static str,
    },
    /// The family exists with another type or help text.
    #[error("{0} was already added with another type or help text")]
    Conflict(String),
    /// A series with these labels is already in the family.
    #[error("{name} already has a series with labels {labels}")]
    DuplicateSeries {
        /// The metric.
        name: String,
        /// The labels, rendered.
        labels: String,
    },
    /// Histogram buckets must have increasing bounds and non-decreasing cumulative counts that
    /// do not exceed the total count.
    #[error("{0}: histogram buckets must have increasing bounds and cumulative counts <= count")]
    Buckets(String),
}

/// A metric family's type, as `# TYPE` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A monotonic count (name ends in `_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Precomputed quantiles plus count (and sum when known).
    Summary,
    /// Cumulative bucket counts plus count and sum.
    Histogram,
}

impl Kind {
    /// The name `# TYPE` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Summary => "summary",
            Kind::Histogram => "histogram",
        }
    }
}

/// One number: integers stay exact (counters can pass 2^53), others are floating point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    /// An exact count.
    Int(u64),
    /// Anything else.
    Float(f64),
}

impl Number {
    /// Prometheus's rendering: Go's float syntax (`+Inf`, `-Inf`, `NaN`), integers without `.0`.
    fn render(self, out: &mut String) {
        match self {
            Number::Int(value) => {
                let _ = write!(out, "{value}");
            }
            Number::Float(value) => render_float(value, out),
        }
    }

    fn to_json(self) -> serde_json::Value {
        match self {
            Number::Int(value) => value.into(),
            Number::Float(value) => float_json(value),
        }
    }
}

fn render_float(value: f64, out: &mut String) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value == f64::INFINITY {
        out.push_str("+Inf");
    } else if value == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        // Rust's shortest round-trip form ("0.001", "4194304", "1e-7") is valid for Prometheus.
        let _ = write!(out, "{value}");
    }
}

/// JSON has no infinities or NaN: those become the strings Prometheus uses.
fn float_json(value: f64) -> serde_json::Value {
    if value.is_finite() {
        value.into()
    } else {
        let mut text = String::new();
        render_float(value, &mut text);
        text.into()
    }
}

/// One series' data.
#[derive(Debug, Clone, PartialEq)]
pub enum SeriesValue {
    /// A counter's or a gauge's value.
    Scalar(Number),
    /// `(quantile, value)` pairs, the number of observations, and their sum when known.
    Summary {
        /// `(quantile in [0, 1], value)`.
        quantiles: Vec<(f64, f64)>,
        /// Observations.
        count: u64,
        /// Their sum; `None` when the source does not keep it (the `_sum` line is then left out).
        sum: Option<f64>,
    },
    /// Cumulative counts per upper bound (without `+Inf`, which is `count`), count and sum.
    Histogram {
        /// `(upper bound, observations <= bound)`, bounds increasing.
        buckets: Vec<(f64, u64)>,
        /// Observations.
        count: u64,
        /// Their sum.
        sum: f64,
    },
}

/// One labelled series of a family.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// `(name, value)` pairs, in the order given.
    pub labels: Vec<(String, String)>,
    /// The data.
    pub value: SeriesValue,
}

/// A metric family: name, help, type and its series.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// One line of help.
    pub help: String,
    /// The type.
    pub kind: Kind,
    /// Series in the order added.
    pub series: Vec<Series>,
}

/// A set of metric families, ready to render. See the crate doc.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    families: BTreeMap<String, Family>,
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.starts_with("__")
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Escapes a label value: backslash, double quote and newline.
fn escape_label_value(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Escapes help text: backslash and newline.
fn escape_help(help: &str, out: &mut String) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `{a="x",b="y"}` with `extra` (le/quantile) last; nothing when there are no labels at all.
fn render_labels(labels: &[(String, String)], extra: Option<(&str, &str)>, out: &mut String) {
    if labels.is_empty() && extra.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    let all = labels
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .chain(extra);
    for (name, value) in all {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(name);
        out.push_str("=\"");
        escape_label_value(value, out);
        out.push('"');
    }
    out.push('}');
}

fn float_text(value: f64) -> String {
    let mut text = String::new();
    render_float(value, &mut text);
    text
}

impl Exposition {
    /// No families.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.families.is_empty()
    }

    /// The families by name.
    pub fn families(&self) -> &BTreeMap<String, Family> {
        &self.families
    }

    /// Adds a counter series (`name` must end in `_total`).
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: u64,
    ) -> Result<(), MetricsError> {
        self.add(
            name,
            help,
            Kind::Counter,
            labels,
            SeriesValue::Scalar(Number::Int(value)),
        )
    }

    /// Adds a gauge series.
    pub fn gauge(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: f64,
    ) -> Result<(), MetricsError> {
        self.add(
            name,
            help,
            Kind::Gauge,
            labels,
            SeriesValue::Scalar(Number::Float(value)),
        )
    }

    /// Adds a gauge series holding an exact integer (bytes, counts of things held now).
    pub fn gauge_int(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: u64,
    ) -> Result<(), MetricsError> {
        self.add(
            name,
            help,
            Kind::Gauge,
            labels,
            SeriesValue::Scalar(Number::Int(value)),
        )
    }

    /// Adds a summary series: `(quantile, value)` pairs, count, and sum if the source keeps one.
    pub fn summary(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        quantiles: &[(f64, f64)],
        count: u64,
        sum: Option<f64>,
    ) -> Result<(), MetricsError> {
        self.add(
            name,
            help,
            Kind::Summary,
            labels,
            SeriesValue::Summary {
                quantiles: quantiles.to_vec(),
                count,
                sum,
            },
        )
    }

    /// Adds a histogram series: cumulative `(upper bound, count <= bound)` buckets with
    /// increasing bounds (the `+Inf` bucket is `count` and is added on rendering), count and sum.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        buckets: &[(f64, u64)],
        count: u64,
        sum: f64,
    ) -> Result<(), MetricsError> {
        let increasing = buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
        let finite = buckets.iter().all(|(bound, _)| bound.is_finite());
        if !increasing || !finite || buckets.last().is_some_and(|(_, c)| *c > count) {
            return Err(MetricsError::Buckets(name.to_string()));
        }
        self.add(
            name,
            help,
            Kind::Histogram,
            labels,
            SeriesValue::Histogram {
                buckets: buckets.to_vec(),
                count,
                sum,
            },
        )
    }

    /// Adds every family and series of `other` (same rules as adding them one by one).
    pub fn merge(&mut self, other: &Exposition) -> Result<(), MetricsError> {
        for (name, family) in &other.families {
            for series in &family.series {
                let labels: Vec<(&str, &str)> = series
                    .labels
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                self.add(
                    name,
                    &family.help,
                    family.kind,
                    &labels,
                    series.value.clone(),
                )?;
            }
        }
        Ok(())
    }

    fn add(
        &mut self,
        name: &str,
        help: &str,
        kind: Kind,
        labels: &[(&str, &str)],
        value: SeriesValue,
    ) -> Result<(), MetricsError> {
        if !valid_metric_name(name) {
            return Err(MetricsError::InvalidName(name.to_string()));
        }
        let naming = |rule| MetricsError::Naming {
            name: name.to_string(),
            kind: kind.as_str(),
            rule,
        };
        match kind {
            Kind::Counter if !name.ends_with("_total") => return Err(naming("must end in _total")),
            Kind::Counter => {}
            _ if name.ends_with("_total") => return Err(naming("must not end in _total")),
            Kind::Histogram | Kind::Summary
                if ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name.ends_with(suffix)) =>
            {
                return Err(naming("must not end in _bucket, _sum or _count"))
            }
            _ => {}
        }
        let reserved = match kind {
            Kind::Histogram => Some("le"),
            Kind::Summary => Some("quantile"),
            _ => None,
        };
        for (label, _) in labels {
            if !valid_label_name(label) || Some(*label) == reserved {
                return Err(MetricsError::InvalidLabel {
                    metric: name.to_string(),
                    label: label.to_string(),
                });
            }
        }
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let family = self
            .families
            .entry(name.to_string())
            .or_insert_with(|| Family {
                help: help.to_string(),
                kind,
                series: Vec::new(),
            });
        if family.kind != kind || family.help != help {
            return Err(MetricsError::Conflict(name.to_string()));
        }
        let mut sorted = labels.clone();
        sorted.sort();
        if family.series.iter().any(|series| {
            let mut theirs = series.labels.clone();
            theirs.sort();
            theirs == sorted
        }) {
            let mut rendered = String::new();
            render_labels(&labels, None, &mut rendered);
            return Err(MetricsError::DuplicateSeries {
                name: name.to_string(),
                labels: rendered,
            });
        }
        family.series.push(Series { labels, value });
        Ok(())
    }

    /// The Prometheus text exposition (format 0.0.4; serve it as
    /// `text/plain; version=0.0.4; charset=utf-8`).
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        for (name, family) in &self.families {
            out.push_str("# HELP ");
            out.push_str(name);
            out.push(' ');
            escape_help(&family.help, &mut out);
            out.push('\n');
            let _ = writeln!(out, "# TYPE {name} {}", family.kind.as_str());
            for series in &family.series {
                render_series(name, series, &mut out);
            }
        }
        out
    }

    /// The same families as JSON:
    /// `{"metrics": [{"name", "type", "help", "series": [{"labels": {..}, "value" | "quantiles",
    /// "count", "sum" | "buckets", "count", "sum"}]}]}`, families in name order. Bucket bounds
    /// and quantiles are numbers, the `+Inf` bucket is left out (it is `count`).
    pub fn to_json(&self) -> serde_json::Value {
        let metrics: Vec<serde_json::Value> = self
            .families
            .iter()
            .map(|(name, family)| {
                let series: Vec<serde_json::Value> = family
                    .series
                    .iter()
                    .map(|series| {
                        let labels: serde_json::Map<String, serde_json::Value> = series
                            .labels
                            .iter()
                            .map(|(n, v)| (n.clone(), v.clone().into()))
                            .collect();
                        let mut object = serde_json::json!({ "labels": labels });
                        match &series.value {
                            SeriesValue::Scalar(number) => object["value"] = number.to_json(),
                            SeriesValue::Summary {
                                quantiles,
                                count,
                                sum,
                            } => {
                                object["quantiles"] = quantiles
                                    .iter()
                                    .map(|(q, v)| {
                                        serde_json::json!({"quantile": q, "value": float_json(*v)})
                                    })
                                    .collect();
                                object["count"] = (*count).into();
                                if let Some(sum) = sum {
                                    object["sum"] = float_json(*sum);
                                }
                            }
                            SeriesValue::Histogram {
                                buckets,
                                count,
                                sum,
                            } => {
                                object["buckets"] = buckets
                                    .iter()
                                    .map(|(le, c)| serde_json::json!({"le": le, "count": c}))
                                    .collect();
                                object["count"] = (*count).into();
                                object["sum"] = float_json(*sum);
                            }
                        }
                        object
                    })
                    .collect();
                serde_json::json!({
                    "name": name,
                    "type": family.kind.as_str(),
                    "help": family.help,
                    "series": series,
                })
            })
            .collect();
        serde_json::json!({ "metrics": metrics })
    }
}

fn render_series(name: &str, series: &Series, out: &mut String) {
    let line = |suffix: &str, extra: Option<(&str, &str)>, value: Number, out: &mut String| {
        out.push_str(name);
        out.push_str(suffix);
        render_labels(&series.labels, extra, out);
        out.push(' ');
        value.render(out);
        out.push('\n');
    };
    match &series.value {
        SeriesValue::Scalar(value) => line("", None, *value, out),
        SeriesValue::Summary {
            quantiles,
            count,
            sum,
        } => {
            for (quantile, value) in quantiles {
                let q = float_text(*quantile);
                line("", Some(("quantile", &q)), Number::Float(*value), out);
            }
            if let Some(sum) = sum {
                line("_sum", None, Number::Float(*sum), out);
            }
            line("_count", None, Number::Int(*count), out);
        }
        SeriesValue::Histogram {
            buckets,
            count,
            sum,
        } => {
            for (bound, cumulative) in buckets {
                let le = float_text(*bound);
                line("_bucket", Some(("le", &le)), Number::Int(*cumulative), out);
            }
            line("_bucket", Some(("le", "+Inf")), Number::Int(*count), out);
            line("_sum", None, Number::Float(*sum), out);
            line("_count", None, Number::Int(*count), out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_follow_the_conventions() {
        let mut m = Exposition::new();
        assert_eq!(
            m.counter("tidepool_waits", "x", &[], 1),
            Err(MetricsError::Naming {
                name: "tidepool_waits".into(),
                kind: "counter",
                rule: "must end in _total"
            })
        );
        assert!(matches!(
            m.gauge("tidepool_bytes_total", "x", &[], 1.0),
            Err(MetricsError::Naming { .. })
        ));
        assert!(matches!(
            m.summary("tidepool_wait_seconds_sum", "x", &[], &[], 0, None),
            Err(MetricsError::Naming { .. })
        ));
        assert_eq!(
            m.gauge("1tidepool", "x", &[], 1.0),
            Err(MetricsError::InvalidName("1tidepool".into()))
        );
        assert_eq!(
            m.gauge("tidepool-x", "x", &[], 1.0),
            Err(MetricsError::InvalidName("tidepool-x".into()))
        );
        for label in ["__reserved", "a-b", "", "9a"] {
            assert!(matches!(
                m.gauge("tidepool_x", "x", &[(label, "v")], 1.0),
                Err(MetricsError::InvalidLabel { .. })
            ));
        }
        assert!(matches!(
            m.histogram("tidepool_h_seconds", "x", &[("le", "1")], &[], 0, 0.0),
            Err(MetricsError::InvalidLabel { .. })
        ));
        assert!(matches!(
            m.summary(
                "tidepool_s_seconds",
                "x",
                &[("quantile", "1")],
                &[],
                0,
                None
            ),
            Err(MetricsError::InvalidLabel { .. })
        ));
        assert!(m.is_empty(), "nothing invalid was kept");
    }

    #[test]
    fn a_family_has_one_type_one_help_and_distinct_series() {
        let mut m = Exposition::new();
        m.gauge("tidepool_x", "help", &[("a", "1"), ("b", "2")], 1.0)
            .unwrap();
        assert_eq!(
            m.counter("tidepool_x", "help", &[], 1),
            Err(MetricsError::Naming {
                name: "tidepool_x".into(),
                kind: "counter",
                rule: "must end in _total"
            })
        );
        assert_eq!(
            m.gauge("tidepool_x", "other help", &[("a", "2")], 1.0),
            Err(MetricsError::Conflict("tidepool_x".into()))
        );
        m.gauge_int("tidepool_y_total_bytes", "h", &[], 1).unwrap();
        assert_eq!(
            m.gauge("tidepool_x", "help", &[("b", "2"), ("a", "1")], 2.0),
            Err(MetricsError::DuplicateSeries {
                name: "tidepool_x".into(),
                labels: "{b=\"2\",a=\"1\"}".into()
            })
        );
        m.gauge("tidepool_x", "help", &[("a", "2")], 3.0).unwrap();
        assert_eq!(m.families()["tidepool_x"].series.len(), 2);
    }

    #[test]
    fn histogram_buckets_are_checked() {
        let mut m = Exposition::new();
        let bad: [&[(f64, u64)]; 4] = [
            &[(2.0, 1), (1.0, 2)],
            &[(1.0, 2), (2.0, 1)],
            &[(1.0, 5)],
            &[(f64::INFINITY, 1)],
        ];
        for buckets in bad {
            assert_eq!(
                m.histogram("tidepool_h_seconds", "h", &[], buckets, 3, 1.0),
                Err(MetricsError::Buckets("tidepool_h_seconds".into()))
            );
        }
        m.histogram(
            "tidepool_h_seconds",
            "h",
            &[],
            &[(0.5, 1), (1.0, 3)],
            4,
            2.5,
        )
        .unwrap();
        assert_eq!(
            m.to_prometheus(),
            "# HELP tidepool_h_seconds h\n# TYPE tidepool_h_seconds histogram\n\
             tidepool_h_seconds_bucket{le=\"0.5\"} 1\ntidepool_h_seconds_bucket{le=\"1\"} 3\n\
             tidepool_h_seconds_bucket{le=\"+Inf\"} 4\ntidepool_h_seconds_sum 2.5\n\
             tidepool_h_seconds_count 4\n"
        );
    }

    #[test]
    fn text_is_escaped_and_numbers_rendered_as_prometheus_reads_them() {
        let mut m = Exposition::new();
        m.gauge(
            "tidepool_info",
            "back\\slash\nnewline",
            &[("error", "a \"quoted\"\\path\nnext")],
            f64::NAN,
        )
        .unwrap();
        m.gauge("tidepool_inf", "h", &[], f64::INFINITY).unwrap();
        m.gauge("tidepool_small_seconds", "h", &[], 0.000_001_5)
            .unwrap();
        m.counter("tidepool_big_total", "h", &[], u64::MAX).unwrap();
        let text = m.to_prometheus();
        assert!(text.contains("# HELP tidepool_info back\\\\slash\\nnewline\n"));
        assert!(text.contains("tidepool_info{error=\"a \\\"quoted\\\"\\\\path\\nnext\"} NaN\n"));
        assert!(text.contains("tidepool_inf +Inf\n"));
        assert!(text.contains("tidepool_small_seconds 0.0000015\n"));
        assert!(text.contains("tidepool_big_total 18446744073709551615\n"));
        let json = m.to_json();
        assert_eq!(json["metrics"][2]["series"][0]["value"], "NaN");
        assert_eq!(json["metrics"][0]["series"][0]["value"], u64::MAX);
    }

    #[test]
    fn merge_keeps_the_rules() {
        let mut a = Exposition::new();
        a.gauge("tidepool_x", "h", &[("pool", "a")], 1.0).unwrap();
        let mut b = Exposition::new();
        b.gauge("tidepool_x", "h", &[("pool", "b")], 2.0).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.families()["tidepool_x"].series.len(), 2);
        assert!(matches!(
            a.merge(&b),
            Err(MetricsError::DuplicateSeries { .. })
        ));
    }
}
