//! The block-trace converter on a real capture: `samples/cargo-build-vda.ftrace.txt` is the
//! first 300 lines of an ftrace capture (block_rq_issue + block_rq_complete) of the dev box's
//! virtio disk while cargo built this workspace; the whole capture converted is
//! `traces/cargo-build-vda.csv` (see BENCHMARKS.md, "Policy lab: the thesis").
//!
//! The replay makes a real (small) pool of locked 4 KiB pages: it needs `RLIMIT_MEMLOCK`
//! ≥ 8 MiB or root.

use std::path::Path;

use tidepool_lab::capture::convert;
use tidepool_lab::policy::{Base, Policy};
use tidepool_lab::report::run_policy;
use tidepool_lab::run::RunOptions;
use tidepool_lab::trace::Trace;

fn sample() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/cargo-build-vda.ftrace.txt");
    std::fs::read_to_string(p).expect("the checked-in sample")
}

#[test]
fn the_captured_sample_converts_to_the_requests_it_holds() {
    let (t, s) = convert(&sample()).unwrap();
    // Counted by hand from the sample with grep: 170 issues, 130 completions; 30 of the pairs
    // are discards/flushes (no data); 40 issues complete after the sample ends.
    assert_eq!((s.lines, s.issues, s.completions), (300, 170, 130));
    assert_eq!((s.paired, s.no_data, s.unmatched_issues), (100, 30, 40));
    assert_eq!((s.unmatched_completions, s.skipped_lines), (0, 0));
    assert_eq!(t.devices.len(), 1);
    assert_eq!(t.devices[0].name, "blk254:0");
    // Four of the completed writes are 4 MiB (or just under): each became two pieces.
    assert_eq!(t.requests.len(), 104);
    assert_eq!(t.requests.iter().filter(|r| r.size == 2 << 20).count(), 7);
    assert!(t
        .requests
        .iter()
        .all(|r| r.size % 512 == 0 && r.hold_us > 0));
    assert!(t.requests.windows(2).all(|w| w[0].time_us <= w[1].time_us));
    // The CSV form is what `tplab replay` reads back.
    assert_eq!(Trace::from_csv(&t.to_csv()).unwrap(), t);
}

#[test]
fn the_converted_sample_replays_without_failures_under_tidepool() {
    let (t, _) = convert(&sample()).unwrap();
    let base = Base::for_trace(t.max_size(), false);
    let (r, m) = run_policy(&t, &base, Policy::Tidepool, 0, &RunOptions::default()).unwrap();
    assert_eq!(r.outcomes.len(), t.requests.len());
    assert_eq!(m.failed_awaitable + m.failed_immediate, 0);
    assert_eq!(r.stats.in_use_bytes, 0, "every mapping was given back");
}
