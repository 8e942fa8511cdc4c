//! `tplab tune` on a short slice of `bursty`: every configuration runs every round, static
//! first in the rows, the knobs' labels round-trip into the table, each run's memory series
//! is written, and tidepool fails no map.

use tidepool_lab::policy::Knobs;
use tidepool_lab::run::RunOptions;
use tidepool_lab::tune::{markdown, tune};
use tidepool_lab::workload::generate;

#[test]
fn every_configuration_runs_every_round_and_tidepool_fails_nothing() {
    let trace = generate("bursty", 1, 0.05).expect("built-in workload");
    let knobs = [
        Knobs::parse("default").unwrap(),
        Knobs::parse("low=2M,halflife=0ms,delay=20ms,threads=1").unwrap(),
    ];
    let dir = std::env::temp_dir().join(format!("tplab-tune-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rows = tune(
        &trace,
        false,
        &knobs,
        Some(32 << 20),
        2,
        &RunOptions::default(),
        Some(&dir),
    )
    .unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].label, "static size=32M");
    assert_eq!(rows[2].label, "low=2M,delay=20ms,halflife=0ms,threads=1");
    for r in &rows {
        assert_eq!(r.runs.len(), 2, "{}", r.label);
        assert!(r.runs.iter().all(|x| x.avg_mib > 0.0), "{r:?}");
    }
    for r in &rows[1..] {
        assert!(r.runs.iter().all(|x| x.failed == 0), "{r:?}");
    }
    // A fixed pool of 32 MiB never changes size.
    assert!(
        rows[0].runs.iter().all(|x| x.avg_mib == 32.0),
        "{:?}",
        rows[0]
    );
    let md = markdown(&rows, "tplab tune …", "bursty");
    assert!(
        md.contains("| low=2M,delay=20ms,halflife=0ms,threads=1 |"),
        "{md}"
    );
    // One memory series per run.
    let series = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(series, 6);
    std::fs::remove_dir_all(&dir).unwrap();
}
