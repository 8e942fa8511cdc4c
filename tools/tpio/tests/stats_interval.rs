//! `--stats-interval`: periodic snapshots on stderr (Prometheus text or JSON lines) and in a
//! file, and one clear error line for an unusable stats file. The null engine has no pool, so
//! these check tpio's own counters; tests/vhost.rs checks a pool's.

mod common;

use common::tpio;

const JOB: [&str; 6] = [
    "--ioengine=null",
    "--size=1m",
    "--rw=randread",
    "--time_based",
    "--runtime=350ms",
    "--output-format=json",
];

#[test]
fn prometheus_snapshots_go_to_stderr_and_parse() {
    let mut args = JOB.to_vec();
    args.push("--stats-interval=100ms");
    let output = tpio(&args);
    assert_eq!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let snapshots: Vec<&str> = stderr.split("# tpio stats at ").skip(1).collect();
    assert!(
        (3..=6).contains(&snapshots.len()),
        "about one snapshot per 100 ms plus the last: {stderr}"
    );
    let last = snapshots.last().unwrap();
    let body = last.split_once('\n').unwrap().1;
    let scrape =
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parses");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("the report");
    let reads = scrape
        .samples
        .iter()
        .find(|s| s.metric == "tpio_read_ios_total")
        .expect("tpio_read_ios_total");
    assert_eq!(
        reads.value,
        prometheus_parse::Value::Counter(report["jobs"][0]["read"]["total_ios"].as_f64().unwrap()),
        "the last snapshot counts every I/O the report does"
    );
    assert!(
        scrape.docs.contains_key("tpio_read_ios_total"),
        "HELP lines"
    );
}

#[test]
fn json_snapshots_are_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stats.json");
    let file_arg = format!("--stats-file={}", file.display());
    let mut args = JOB.to_vec();
    args.extend(["--stats-interval=100ms", "--stats-format=json", &file_arg]);
    let output = tpio(&args);
    assert_eq!(output.status.code(), Some(0));
    assert!(
        output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        text.lines().count(),
        1,
        "the file holds the latest snapshot only"
    );
    let document: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(document["elapsed_seconds"].as_f64().unwrap() >= 0.35);
    assert!(document["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .any(|family| family["name"] == "tpio_jobs_running"));
}

#[test]
fn an_unwritable_stats_file_is_one_error_line_before_any_io() {
    let mut args = JOB.to_vec();
    args.extend([
        "--stats-interval=1",
        "--stats-file=/nonexistent-dir/stats.prom",
    ]);
    let output = tpio(&args);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("tpio: --stats-file /nonexistent-dir/stats.prom: "),
        "{stderr}"
    );
}
