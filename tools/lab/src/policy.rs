//! The four policies under test, each a [`PoolConfig`] of the same `tidepool::pool::Pool`.
//!
//! Nothing is re-implemented: the lab only chooses knobs.
//!
//! | policy | prefill | growth | shrink | awaitable maps | rule |
//! |--------|---------|--------|--------|----------------|------|
//! | `static` | the size found by search | none (`max = prefill`) | none | fail when full (`waiting: false`) | classic swiotlb |
//! | `dynamic` | 4 MiB | background + transient chunks | never (`shrink_delay` 1 day) | fail when full (`waiting: false`) | Linux SWIOTLB_DYNAMIC |
//! | `throttle` | tidepool's peak | none | none | wait above 70 % until below 65 % | the 2024 throttling RFC |
//! | `tidepool` | 2 MiB | background (batches) + transient chunks | after 10 ms idle, keeping 3 MiB + a chunk free | wait (FIFO), 1 MiB reserve for immediate maps | Tidepool |
//!
//! Shared by all: 2 MiB chunks (one hugepage; one IOMMU mapping each), 4 KiB pages unless
//! hugepages are asked for, `max_buffer` the trace's largest request rounded up to a power of
//! two (at least 128 KiB: so a transient chunk is not a whole 2 MiB for a small request), and
//! a 512 MiB cap for the growing policies.
//!
//! Tidepool's lab defaults were **chosen from the frontier** (`tplab sweep`, then `tplab tune`
//! to rank its best points over repeated runs; see [`crate::sweep`] and BENCHMARKS.md,
//! "Policy lab: the thesis"): prefill 2 MiB, `low_watermark` 3 MiB (`high_watermark` = low +
//! one chunk), `shrink_delay` 10 ms, no peak floor (`peak_half_life` 0), `reserve_bytes`
//! 1 MiB, with the pool's batch growth (an attempt sized by the rate demand rises at, its
//! chunks made on one thread per CPU). With the host quiet (load average 0.6–1.8), on `bursty`
//! with 2 MiB hugepages it averaged 4.70 MiB in three of three runs against the search-sized
//! static pool's 26 (1/5.5), p99 map latency 1.3x static's, no wait and no failure; the
//! lowest-memory point within the bound (2x static's p99). On a loaded host (load
//! 7–10) the same point waited in most runs (p99 up to 21 ms): its 3 MiB of slack must carry
//! a burst until the grower runs. The earlier default (low 8 MiB, shrink after 100 ms, peak
//! half-life 1 s) averaged ~12 MiB (1/2.1). What the choice costs: free space is kept between
//! 3 and 7 MiB while anything is in flight, so the pool rests at 4 MiB on a light load
//! (static's oracle size is 2 MiB on `network` and `steady`).
//!
//! Why the throttle pool is sized at tidepool's peak: the RFC keeps swiotlb fixed and makes
//! may-block requests wait instead of failing, so its pitch is "a smaller fixed pool". Giving it
//! exactly the peak that tidepool needed compares the two ways of living in the same peak
//! memory: throttling pays with waits all the time, tidepool pays with growth and a
//! time-varying footprint. (Sizing it at the static pool's size would make it static.)

use std::time::Duration;

use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{PoolConfig, Throttle};

/// One of the policies compared.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Classic swiotlb: one fixed pool, maps fail when it is full.
    Static,
    /// SWIOTLB_DYNAMIC: grows in the background and with transient chunks, never shrinks,
    /// maps fail when nothing can be had at once.
    Dynamic,
    /// The 2024 throttling RFC: fixed pool, may-block maps wait above a high-water mark.
    Throttle,
    /// Tidepool: awaiting maps, immediate reserve, background growth and shrinking.
    Tidepool,
}

impl Policy {
    /// All policies, in report order.
    pub const ALL: [Policy; 4] = [
        Policy::Static,
        Policy::Dynamic,
        Policy::Throttle,
        Policy::Tidepool,
    ];

    /// The policy's name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Static => "static",
            Policy::Dynamic => "dynamic",
            Policy::Throttle => "throttle",
            Policy::Tidepool => "tidepool",
        }
    }

    /// Parses a policy name.
    pub fn parse(s: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// What all policies share for one trace.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Base {
    /// Bytes per chunk (the growth step and the static search's step).
    pub chunk_bytes: usize,
    /// Largest buffer (power of two).
    pub max_buffer: usize,
    /// Hard cap for growing policies.
    pub cap_bytes: usize,
    /// Use 2 MiB hugepages (falling back to 4 KiB pages when none are free).
    pub hugepages: bool,
}

impl Base {
    /// The shared settings for a trace whose largest request is `max_request` bytes.
    pub fn for_trace(max_request: usize, hugepages: bool) -> Base {
        Base {
            chunk_bytes: 2 << 20,
            max_buffer: max_request.next_power_of_two().clamp(128 << 10, 2 << 20),
            cap_bytes: 512 << 20,
            hugepages,
        }
    }

    fn common(&self) -> PoolConfig {
        PoolConfig {
            memory: MemoryConfig {
                page_size: if self.hugepages {
                    PageSize::Huge2M
                } else {
                    PageSize::Small4K
                },
                allow_small_pages: true,
            },
            chunk_bytes: self.chunk_bytes,
            max_buffer: self.max_buffer,
            max_bytes: self.cap_bytes,
            ..PoolConfig::default()
        }
    }

    /// The pool configuration of `policy`. `fixed_bytes` is the size of a fixed pool
    /// (`static`, `throttle`), rounded up to whole chunks; ignored by the others.
    pub fn config(&self, policy: Policy, fixed_bytes: usize) -> PoolConfig {
        let chunk = self.chunk_bytes;
        let fixed = fixed_bytes.div_ceil(chunk).max(1) * chunk;
        let c = self.common();
        match policy {
            Policy::Static => PoolConfig {
                prefill_bytes: fixed,
                max_bytes: fixed,
                low_watermark: 0,
                high_watermark: chunk,
                reserve_bytes: 0,
                transient: false,
                waiting: false,
                background: false,
                ..c
            },
            Policy::Dynamic => PoolConfig {
                prefill_bytes: 2 * chunk,
                low_watermark: chunk,
                high_watermark: 2 * chunk,
                shrink_delay: Duration::from_secs(86_400),
                reserve_bytes: 0,
                transient: true,
                waiting: false,
                ..c
            },
            Policy::Throttle => PoolConfig {
                prefill_bytes: fixed,
                max_bytes: fixed,
                low_watermark: 0,
                high_watermark: chunk,
                reserve_bytes: 0,
                transient: false,
                waiting: true,
                throttle: Some(Throttle {
                    high_percent: 70.0,
                    low_percent: 65.0,
                }),
                background: true,
                ..c
            },
            Policy::Tidepool => PoolConfig {
                prefill_bytes: (2usize << 20).div_ceil(chunk) * chunk,
                low_watermark: 3 << 20,
                high_watermark: (3 << 20) + chunk,
                shrink_delay: Duration::from_millis(10),
                peak_half_life: Duration::ZERO,
                reserve_bytes: 1 << 20,
                transient: true,
                waiting: true,
                ..c
            },
        }
    }
}

/// Overrides of one policy's knobs, for the frontier sweep ([`crate::sweep`]). `None` keeps
/// the policy's default (the table in the module doc). Only the knobs that policy has are
/// meaningful: static has its size; dynamic its growth step (`chunk_bytes`); throttle its size
/// and thresholds; tidepool its prefill, watermarks, shrink delay, peak half-life and reserve.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Knobs {
    /// Bytes per chunk: the growth step (must stay a multiple of `max_buffer`).
    pub chunk_bytes: Option<usize>,
    /// Bytes made at creation (whole chunks).
    pub prefill_bytes: Option<usize>,
    /// Grow when free bytes fall below this.
    pub low_watermark: Option<usize>,
    /// Keep this much free when shrinking (at least `low`; unset: `low` + one chunk).
    pub high_watermark: Option<usize>,
    /// Idle time before a chunk is given back, ms.
    pub shrink_delay_ms: Option<u64>,
    /// Half-life of the recent-peak floor, ms (0 disables it).
    pub peak_half_life_ms: Option<u64>,
    /// Immediate-path reserve, bytes.
    pub reserve_bytes: Option<usize>,
    /// Throttle thresholds, percent of the pool in use: (wait above, resume below).
    pub throttle_percent: Option<(f64, f64)>,
    /// Threads one growth attempt uses (`PoolConfig::growth_threads`; 0 = one per CPU).
    #[serde(default)]
    pub growth_threads: Option<usize>,
}

impl Knobs {
    /// A short label, `key=value` pairs of the knobs set (`default` when none is).
    pub fn label(&self) -> String {
        let mib = |b: usize| {
            if b % (1 << 20) == 0 {
                format!("{}M", b >> 20)
            } else {
                format!("{}K", b >> 10)
            }
        };
        let mut parts = Vec::new();
        if let Some(v) = self.chunk_bytes {
            parts.push(format!("step={}", mib(v)));
        }
        if let Some(v) = self.prefill_bytes {
            parts.push(format!("prefill={}", mib(v)));
        }
        if let Some(v) = self.low_watermark {
            parts.push(format!("low={}", mib(v)));
        }
        if let Some(v) = self.high_watermark {
            parts.push(format!("high={}", mib(v)));
        }
        if let Some(v) = self.shrink_delay_ms {
            parts.push(format!("delay={v}ms"));
        }
        if let Some(v) = self.peak_half_life_ms {
            parts.push(format!("halflife={v}ms"));
        }
        if let Some(v) = self.reserve_bytes {
            parts.push(format!("reserve={}", mib(v)));
        }
        if let Some((h, l)) = self.throttle_percent {
            parts.push(format!("throttle={h}/{l}%"));
        }
        if let Some(v) = self.growth_threads {
            parts.push(format!("threads={v}"));
        }
        if parts.is_empty() {
            "default".into()
        } else {
            parts.join(",")
        }
    }

    /// Parses a label as [`Knobs::label`] writes it (`default`, or `key=value` pairs joined by
    /// commas: `step`, `prefill`, `low`, `high`, `reserve` in `M` or `K` bytes, `delay` and
    /// `halflife` in `ms`, `throttle=H/L%`, `threads=N`). Errors name the bad part.
    pub fn parse(label: &str) -> Result<Knobs, String> {
        let mut k = Knobs::default();
        if label.trim() == "default" {
            return Ok(k);
        }
        let bytes = |key: &str, v: &str| -> Result<usize, String> {
            let (n, unit) = if let Some(n) = v.strip_suffix('M') {
                (n, 1usize << 20)
            } else if let Some(n) = v.strip_suffix('K') {
                (n, 1 << 10)
            } else {
                return Err(format!("{key}={v}: expected a size like 4M or 256K"));
            };
            n.parse::<usize>()
                .map(|n| n * unit)
                .map_err(|_| format!("{key}={v}: expected a size like 4M or 256K"))
        };
        let ms = |key: &str, v: &str| -> Result<u64, String> {
            v.strip_suffix("ms")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("{key}={v}: expected a time like 20ms"))
        };
        for part in label.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected key=value"))?;
            match key {
                "step" => k.chunk_bytes = Some(bytes(key, v)?),
                "prefill" => k.prefill_bytes = Some(bytes(key, v)?),
                "low" => k.low_watermark = Some(bytes(key, v)?),
                "high" => k.high_watermark = Some(bytes(key, v)?),
                "reserve" => k.reserve_bytes = Some(bytes(key, v)?),
                "delay" => k.shrink_delay_ms = Some(ms(key, v)?),
                "halflife" => k.peak_half_life_ms = Some(ms(key, v)?),
                "threads" => {
                    k.growth_threads = Some(
                        v.parse()
                            .map_err(|_| format!("threads={v}: expected a count"))?,
                    )
                }
                "throttle" => {
                    let pair = v
                        .strip_suffix('%')
                        .and_then(|p| p.split_once('/'))
                        .and_then(|(h, l)| Some((h.parse().ok()?, l.parse().ok()?)))
                        .ok_or_else(|| format!("throttle={v}: expected H/L% like 70/65%"))?;
                    k.throttle_percent = Some(pair);
                }
                _ => {
                    return Err(format!(
                        "unknown knob {key:?}: expected step, prefill, low, high, reserve, \
                         delay, halflife, throttle or threads"
                    ))
                }
            }
        }
        Ok(k)
    }

    /// `cfg` with these knobs applied; watermarks are kept valid (`high ≥ low + chunk`) and
    /// the prefill a whole number of chunks.
    pub fn apply(&self, mut cfg: PoolConfig) -> PoolConfig {
        if let Some(v) = self.chunk_bytes {
            let fixed = cfg.max_bytes == cfg.prefill_bytes;
            cfg.chunk_bytes = v.max(cfg.max_buffer);
            cfg.prefill_bytes = cfg.prefill_bytes.div_ceil(cfg.chunk_bytes) * cfg.chunk_bytes;
            if fixed {
                cfg.max_bytes = cfg.prefill_bytes;
            }
            cfg.max_bytes = cfg.max_bytes.max(cfg.prefill_bytes).max(cfg.chunk_bytes);
        }
        if let Some(v) = self.prefill_bytes {
            cfg.prefill_bytes = v.div_ceil(cfg.chunk_bytes) * cfg.chunk_bytes;
        }
        // `high` set: as set (at least `low`); not set: the policy's band above `low` (one
        // chunk) follows a new `low`.
        let band = cfg.high_watermark.saturating_sub(cfg.low_watermark);
        if let Some(v) = self.low_watermark {
            cfg.low_watermark = v;
        }
        cfg.high_watermark = match self.high_watermark {
            Some(v) => v.max(cfg.low_watermark),
            None => cfg.low_watermark + band.max(cfg.chunk_bytes),
        };
        if let Some(v) = self.shrink_delay_ms {
            cfg.shrink_delay = Duration::from_millis(v);
        }
        if let Some(v) = self.peak_half_life_ms {
            cfg.peak_half_life = Duration::from_millis(v);
        }
        if let Some(v) = self.reserve_bytes {
            cfg.reserve_bytes = v;
        }
        if let Some((high, low)) = self.throttle_percent {
            cfg.throttle = Some(Throttle {
                high_percent: high,
                low_percent: low,
            });
        }
        if let Some(v) = self.growth_threads {
            cfg.growth_threads = v;
        }
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_policy_config_is_valid_and_distinct() {
        let base = Base::for_trace(128 << 10, false);
        for p in Policy::ALL {
            let cfg = base.config(p, 10 << 20);
            cfg.validate()
                .unwrap_or_else(|e| panic!("{}: {e}", p.name()));
            assert_eq!(Policy::parse(p.name()), Some(p));
        }
        let s = base.config(Policy::Static, 5 << 20);
        assert_eq!(
            (s.prefill_bytes, s.max_bytes),
            (6 << 20, 6 << 20),
            "rounded to chunks"
        );
        assert!(!s.waiting && !base.config(Policy::Dynamic, 0).waiting);
        assert!(base.config(Policy::Throttle, 0).throttle.is_some());
        assert!(base.config(Policy::Tidepool, 0).waiting);
    }

    #[test]
    fn knobs_apply_and_keep_the_config_valid() {
        let base = Base::for_trace(128 << 10, false);
        assert_eq!(Knobs::default().label(), "default");
        let k = Knobs {
            low_watermark: Some(8 << 20),
            shrink_delay_ms: Some(500),
            ..Knobs::default()
        };
        let c = k.apply(base.config(Policy::Tidepool, 0));
        c.validate().unwrap();
        assert_eq!(c.low_watermark, 8 << 20);
        assert_eq!(c.high_watermark, 10 << 20, "unset: low + one chunk");
        let tight = Knobs {
            low_watermark: Some(4 << 20),
            high_watermark: Some(1 << 20),
            ..Knobs::default()
        }
        .apply(base.config(Policy::Tidepool, 0));
        tight.validate().unwrap();
        assert_eq!(tight.high_watermark, 4 << 20, "set: at least low");
        assert_eq!(c.shrink_delay, Duration::from_millis(500));
        assert_eq!(k.label(), "low=8M,delay=500ms");
        // A larger growth step keeps a fixed pool fixed and whole.
        let step = Knobs {
            chunk_bytes: Some(8 << 20),
            ..Knobs::default()
        };
        let s = step.apply(base.config(Policy::Static, 10 << 20));
        s.validate().unwrap();
        assert_eq!((s.prefill_bytes, s.max_bytes), (16 << 20, 16 << 20));
        let d = step.apply(base.config(Policy::Dynamic, 0));
        d.validate().unwrap();
        assert_eq!(d.chunk_bytes, 8 << 20);
        let t = Knobs {
            throttle_percent: Some((90.0, 85.0)),
            ..Knobs::default()
        }
        .apply(base.config(Policy::Throttle, 6 << 20));
        assert_eq!(t.throttle.unwrap().high_percent, 90.0);
    }

    #[test]
    fn labels_parse_back_to_their_knobs() {
        let k = Knobs {
            chunk_bytes: Some(4 << 20),
            prefill_bytes: Some(2 << 20),
            low_watermark: Some(512 << 10),
            high_watermark: Some(6 << 20),
            shrink_delay_ms: Some(20),
            peak_half_life_ms: Some(0),
            reserve_bytes: Some(256 << 10),
            throttle_percent: Some((90.0, 85.0)),
            growth_threads: Some(2),
        };
        assert_eq!(Knobs::parse(&k.label()), Ok(k));
        assert_eq!(Knobs::parse("default"), Ok(Knobs::default()));
        for bad in [
            "low",
            "low=4",
            "delay=20",
            "speed=1M",
            "threads=x",
            "throttle=90",
        ] {
            let e = Knobs::parse(bad).unwrap_err();
            assert!(!e.is_empty() && !e.contains('\n'), "{bad}: {e}");
        }
    }
}
