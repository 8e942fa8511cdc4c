//! tpio's JSON against a real fio 3.33 report (tests/data/fio-3.33.json): every key fio writes
//! is there with the same JSON type, recursively, less the omissions listed here.

mod common;

use common::{json_of, tpio};
use serde_json::Value;

/// Paths (`/`-joined keys) fio has and tpio leaves out on purpose.
const OMISSIONS: &[&str] = &[
    // tpio does not read /sys/block statistics: `disk_util` is an empty array.
    "disk_util/0",
];

/// JSON type names, integers apart from floats (fio writes both, and scripts see the difference).
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Collects differences of `ours` from `fio` under `path`.
fn compare(path: &str, fio: &Value, ours: &Value, problems: &mut Vec<String>) {
    if OMISSIONS.contains(&path) {
        return;
    }
    if path.ends_with("options") {
        // Options are whatever the user gave; fio writes every value as a string.
        let all_strings = ours
            .as_object()
            .is_some_and(|map| map.values().all(Value::is_string));
        if !all_strings {
            problems.push(format!("{path}: values must all be strings: {ours}"));
        }
        return;
    }
    if kind(fio) != kind(ours) {
        problems.push(format!(
            "{path}: fio has {}, tpio {}",
            kind(fio),
            kind(ours)
        ));
        return;
    }
    match (fio, ours) {
        (Value::Object(fio), Value::Object(ours)) => {
            for (key, value) in fio {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}/{key}")
                };
                match ours.get(key) {
                    Some(mine) => compare(&child, value, mine, problems),
                    None if OMISSIONS.contains(&child.as_str()) => {}
                    None => problems.push(format!("{child}: missing")),
                }
            }
        }
        (Value::Array(fio), Value::Array(ours)) => {
            for (index, value) in fio.iter().enumerate() {
                let child = format!("{path}/{index}");
                match ours.get(index) {
                    Some(mine) => compare(&child, value, mine, problems),
                    None if OMISSIONS.contains(&child.as_str()) => {}
                    None => problems.push(format!("{child}: missing")),
                }
            }
        }
        _ => {}
    }
}

#[test]
fn json_has_fio_keys_and_types() {
    let fio: Value =
        serde_json::from_str(include_str!("data/fio-3.33.json")).expect("reference parses");
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("w.fio");
    std::fs::write(
        &job,
        "[global]\nbs=4k\nioengine=null\niodepth=32\nsize=16m\n[task_0]\nrw=write\nnumjobs=1\n",
    )
    .expect("write");
    for format in ["json", "json+"] {
        let output = tpio(&[
            job.to_str().expect("utf8"),
            &format!("--output-format={format}"),
        ]);
        let ours = json_of(&output);
        let mut problems = Vec::new();
        compare("", &fio, &ours, &mut problems);
        assert!(problems.is_empty(), "{format}:\n{}", problems.join("\n"));
        let job = &ours["jobs"][0];
        assert_eq!(job["job options"]["rw"], "write");
        assert_eq!(job["job options"]["numjobs"], "1");
        assert_eq!(ours["global options"]["bs"], "4k", "echoed as written");
        let bins = &job["write"]["clat_ns"]["bins"];
        if format == "json+" {
            let total: u64 = bins
                .as_object()
                .expect("bins")
                .values()
                .map(|count| count.as_u64().expect("count"))
                .sum();
            assert_eq!(total, 4096, "every completion is in a bin");
        } else {
            assert!(bins.is_null(), "bins only with json+");
        }
    }
}
