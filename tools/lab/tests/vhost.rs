//! The real-device replay against `qemu-storage-daemon` (Debian: `qemu-system-common`), as the
//! vhost-user-blk driver's own tests need it: a clean tidepool replay gives every buffer back,
//! and a fixed pool too small for a burst fails maps (counted, not fatal) and still ends with
//! nothing in use.

use std::time::Duration;

use tidepool::pool::Direction;
use tidepool_lab::metrics::compute;
use tidepool_lab::policy::{Base, Policy};
use tidepool_lab::run::MapResult;
use tidepool_lab::trace::{DeviceSpec, Request, Trace};
use tidepool_lab::vhost::{replay, BackendOptions};

fn backend(name: &str, mbps: Option<u64>) -> BackendOptions {
    BackendOptions {
        dir: std::env::temp_dir().join(format!("tplab-vhost-test-{name}-{}", std::process::id())),
        image_bytes: 64 << 20,
        bps: mbps.map(|m| m * 1_000_000),
    }
}

fn trace(n: u64, gap_us: u64, size: usize) -> Trace {
    let reqs = (0..n)
        .map(|i| Request {
            time_us: i * gap_us,
            size,
            direction: if i % 2 == 0 {
                Direction::ToDevice
            } else {
                Direction::FromDevice
            },
            hold_us: 1,
            may_wait: true,
            device: 0,
        })
        .collect();
    Trace::new(
        vec![DeviceSpec {
            name: "disk".into(),
            queue_depth: None,
        }],
        reqs,
    )
}

#[test]
fn a_tidepool_replay_completes_every_request_and_gives_every_buffer_back() {
    let t = trace(200, 500, 64 << 10);
    let base = Base {
        chunk_bytes: 4 << 20,
        cap_bytes: 64 << 20,
        ..Base::for_trace(t.max_size(), false)
    };
    let o = backend("clean", None);
    let r = replay(&t, base.config(Policy::Tidepool, 0), &o, false).unwrap();
    let _ = std::fs::remove_dir_all(&o.dir);
    assert_eq!(r.outcomes.len(), 200);
    assert!(r
        .outcomes
        .iter()
        .all(|x| matches!(x.result, MapResult::Completed { .. })));
    assert_eq!(r.stats.in_use_bytes, 0, "{:?}", r.stats);
    let m = compute(&t, &r);
    assert_eq!(m.failed_awaitable + m.failed_immediate, 0);
    assert!(m.peak_bytes >= r.config.prefill_bytes as u64);
    assert!(r.samples.len() > 10, "sampled every ms over ≥ 100 ms");
}

#[test]
fn a_fixed_pool_too_small_for_a_burst_fails_maps_and_ends_with_nothing_in_use() {
    // 96 writes of 128 KiB at once (12 MiB) into a 4 MiB pool that does not wait, on a disk
    // throttled to 20 MB/s: most cannot be mapped while the first are in flight.
    let t = trace(96, 0, 128 << 10);
    let base = Base {
        chunk_bytes: 4 << 20,
        cap_bytes: 64 << 20,
        ..Base::for_trace(t.max_size(), false)
    };
    let o = backend("small", Some(20));
    let started = std::time::Instant::now();
    let r = replay(&t, base.config(Policy::Static, 4 << 20), &o, false).unwrap();
    let _ = std::fs::remove_dir_all(&o.dir);
    let m = compute(&t, &r);
    assert!(m.failed_awaitable > 0, "{m:?}");
    assert_eq!(r.outcomes.len(), 96, "every request accounted for");
    assert_eq!(r.stats.in_use_bytes, 0);
    assert!(started.elapsed() < Duration::from_secs(60));
}
