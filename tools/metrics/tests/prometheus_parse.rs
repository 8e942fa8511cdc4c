//! The exposition of a real pool (on the identity view, no device), an NVMe queue's and a
//! virtio-net device's counters, read back by a Prometheus text parser (`prometheus-parse`) and
//! checked line by line against the text format's grammar and naming conventions.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Pool, PoolConfig};
use tidepool::share::direct::DirectStats;
use tidepool::share::identity::Identity;
use tidepool_metrics::{sources, Exposition};
use tidepool_nvme::QueueCounters;
use tidepool_virtio_net::NetStats;

/// One 256 KiB chunk of 4 KiB pages, no growth: a second request must wait, and times out.
fn full_pool() -> Pool {
    let config = PoolConfig {
        memory: MemoryConfig {
            page_size: PageSize::Small4K,
            allow_small_pages: true,
        },
        chunk_bytes: 256 << 10,
        prefill_bytes: 256 << 10,
        max_bytes: 256 << 10,
        max_buffer: 64 << 10,
        low_watermark: 0,
        high_watermark: 256 << 10,
        reserve_bytes: 0,
        transient: false,
        cache_bytes_per_class: 0,
        ..PoolConfig::default()
    };
    Pool::new(Arc::new(Identity::new()), config).expect("identity pool")
}

/// Blocks on a future with a throwaway current-thread runtime.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

fn scrape(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|line| Ok(line.to_string()))).expect("prometheus-parse")
}

/// The text format's line grammar (format 0.0.4), stricter than the parser: every line is HELP,
/// TYPE or a sample; each family's HELP and TYPE come once, before its samples, and its samples
/// are contiguous; sample names are the family's (plus `_bucket`/`_sum`/`_count` for histograms
/// and summaries); values parse as Go floats; counters end in `_total`.
fn check_grammar(text: &str) -> HashMap<String, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helped = HashSet::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let name_ok = |name: &str| {
        name.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(name_ok(name), "bad name in {line:?}");
            assert!(helped.insert(name.to_string()), "second HELP: {line:?}");
            assert!(!finished.contains(name), "family split: {line:?}");
            if let Some(previous) = current.replace(name.to_string()) {
                finished.insert(previous);
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split(' ');
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            assert_eq!(
                current.as_deref(),
                Some(name),
                "TYPE without its HELP first"
            );
            assert!(
                ["counter", "gauge", "summary", "histogram"].contains(&kind),
                "{line:?}"
            );
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line:?}");
            assert!(types.insert(name.to_string(), kind.to_string()).is_none());
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let name = series.split('{').next().unwrap();
        let family = current.as_deref().expect("sample before any HELP");
        let kind = types.get(family).expect("sample before its TYPE");
        let allowed: Vec<String> = match kind.as_str() {
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{family}{s}"))
                .collect(),
            "summary" => vec![
                family.to_string(),
                format!("{family}_sum"),
                format!("{family}_count"),
            ],
            _ => vec![family.to_string()],
        };
        assert!(
            allowed.iter().any(|a| a == name),
            "{name} in family {family}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line:?}");
            }
        }
        let parsed = match value {
            "+Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            "NaN" => Some(f64::NAN),
            v => v.parse::<f64>().ok(),
        };
        assert!(parsed.is_some(), "value of {line:?}");
    }
    types
}

fn value_of<'a>(scrape: &'a Scrape, metric: &str, label: (&str, &str)) -> &'a Value {
    &scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && s.labels.get(label.0) == Some(label.1))
        .unwrap_or_else(|| panic!("no {metric}{{{}={}}}", label.0, label.1))
        .value
}

#[test]
fn a_live_pool_and_driver_counters_parse_as_prometheus_text() {
    let pool = full_pool();
    let held: Vec<_> = (0..4)
        .map(|_| pool.try_alloc(64 << 10).expect("a quarter of the chunk"))
        .collect();
    let waited = block_on(pool.alloc_timeout(4096, Duration::from_millis(20)));
    assert!(waited.is_err(), "the pool is full and cannot grow");
    let stats = pool.stats();
    assert!(stats.timeouts >= 1, "the wait timed out: {stats:?}");

    let mut metrics = Exposition::new();
    sources::pool(&mut metrics, &[("pool", "identity")], &stats).unwrap();
    sources::pool(&mut metrics, &[("pool", "second")], &Default::default()).unwrap();
    sources::direct(
        &mut metrics,
        &[("pool", "identity")],
        &DirectStats::default(),
    )
    .unwrap();
    let queue = QueueCounters {
        sq_doorbell_writes: 7,
        entries_consumed: 9,
        ..Default::default()
    };
    sources::nvme_queue(
        &mut metrics,
        &[("controller", "0000:00:04.0"), ("queue", "1")],
        &queue,
    )
    .unwrap();
    let net = NetStats {
        rx_frames: 3,
        ..Default::default()
    };
    sources::net(&mut metrics, &[("device", "0000:00:05.0")], &net).unwrap();
    metrics
        .histogram(
            "tpio_completion_latency_seconds",
            "A histogram, as tpio renders its latencies.",
            &[("job", "j")],
            &[(0.000_1, 2), (0.001, 5)],
            6,
            0.004,
        )
        .unwrap();
    let text = metrics.to_prometheus();

    let types = check_grammar(&text);
    assert_eq!(types["tidepool_pool_capacity_bytes"], "gauge");
    assert_eq!(types["tidepool_pool_wait_timeouts_total"], "counter");
    assert_eq!(types["tidepool_pool_wait_seconds"], "histogram");
    assert_eq!(types["tpio_completion_latency_seconds"], "histogram");

    let scrape = scrape(&text);
    assert_eq!(
        value_of(
            &scrape,
            "tidepool_pool_capacity_bytes",
            ("pool", "identity")
        ),
        &Value::Gauge((256 << 10) as f64)
    );
    assert_eq!(
        value_of(&scrape, "tidepool_pool_in_use_bytes", ("pool", "identity")),
        &Value::Gauge(stats.in_use_bytes as f64)
    );
    assert_eq!(
        value_of(
            &scrape,
            "tidepool_pool_wait_timeouts_total",
            ("pool", "identity")
        ),
        &Value::Counter(stats.timeouts as f64)
    );
    assert_eq!(
        value_of(&scrape, "tidepool_pool_capacity_bytes", ("pool", "second")),
        &Value::Gauge(0.0)
    );
    match value_of(&scrape, "tidepool_pool_wait_seconds", ("pool", "identity")) {
        Value::Histogram(buckets) => {
            let bounds: Vec<f64> = buckets.iter().map(|b| b.less_than).collect();
            assert_eq!(
                bounds,
                [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, f64::INFINITY]
            );
            // Cumulative, and the +Inf bucket is every completed wait.
            assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));
            assert_eq!(buckets[8].count, stats.wait.count as f64);
            let pool_buckets: Vec<f64> =
                stats.wait.buckets.iter().map(|b| b.count as f64).collect();
            let scraped: Vec<f64> = buckets[..8].iter().map(|b| b.count).collect();
            if stats.wait.count > 0 {
                assert_eq!(scraped, pool_buckets);
            }
        }
        other => panic!("wait is a histogram, got {other:?}"),
    }
    assert_eq!(
        value_of(
            &scrape,
            "tidepool_nvme_queue_sq_doorbell_writes_total",
            ("queue", "1")
        ),
        &Value::Counter(7.0)
    );
    assert_eq!(
        value_of(
            &scrape,
            "tidepool_net_rx_frames_total",
            ("device", "0000:00:05.0")
        ),
        &Value::Counter(3.0)
    );
    match value_of(&scrape, "tpio_completion_latency_seconds", ("job", "j")) {
        Value::Histogram(buckets) => {
            let pairs: Vec<(f64, f64)> = buckets.iter().map(|b| (b.less_than, b.count)).collect();
            assert_eq!(pairs, [(0.000_1, 2.0), (0.001, 5.0), (f64::INFINITY, 6.0)]);
        }
        other => panic!("a histogram, got {other:?}"),
    }
    // Every family has its HELP text.
    for name in types.keys() {
        assert!(scrape.docs.contains_key(name), "no HELP for {name}");
    }
    drop(held);
}

#[test]
fn json_carries_the_same_families_and_values() {
    let pool = full_pool();
    let _held = pool.try_alloc(64 << 10).expect("a buffer");
    let stats = pool.stats();
    let mut metrics = Exposition::new();
    sources::pool(&mut metrics, &[("pool", "p")], &stats).unwrap();
    let json = metrics.to_json();
    let families = json["metrics"].as_array().unwrap();
    assert_eq!(families.len(), metrics.families().len());
    let in_use = families
        .iter()
        .find(|f| f["name"] == "tidepool_pool_in_use_bytes")
        .unwrap();
    assert_eq!(in_use["type"], "gauge");
    assert_eq!(in_use["series"][0]["labels"]["pool"], "p");
    assert_eq!(in_use["series"][0]["value"], stats.in_use_bytes);
    let wait = families
        .iter()
        .find(|f| f["name"] == "tidepool_pool_wait_seconds")
        .unwrap();
    assert_eq!(wait["type"], "histogram");
    assert_eq!(wait["series"][0]["count"], stats.wait.count);
    assert!(
        wait["series"][0].get("sum").is_some(),
        "the pool keeps the sum"
    );
}

#[test]
fn a_growth_error_is_an_info_series_with_the_message_as_a_label() {
    let stats = tidepool::pool::PoolStats {
        growth_failures: 2,
        last_growth_error: Some("no free 2 MiB hugepages".into()),
        ..Default::default()
    };
    let mut metrics = Exposition::new();
    sources::pool(&mut metrics, &[("pool", "p")], &stats).unwrap();
    let scrape = scrape(&metrics.to_prometheus());
    let info = scrape
        .samples
        .iter()
        .find(|s| s.metric == "tidepool_pool_last_growth_error_info")
        .unwrap();
    assert_eq!(info.labels.get("error"), Some("no free 2 MiB hugepages"));
    assert_eq!(info.value, Value::Gauge(1.0));
}
