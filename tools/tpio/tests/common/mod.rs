//! Helpers shared by tpio's integration tests: each test file has `mod common;`.

// Each test file is its own crate and uses only some of these.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// Runs tpio with `args`.
pub fn tpio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tpio"))
        .args(args)
        .output()
        .expect("tpio runs")
}

/// A file `name` of `bytes` zero bytes in `dir`.
pub fn target(dir: &Path, name: &str, bytes: u64) -> String {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).expect("create");
    file.set_len(bytes).expect("size");
    path.display().to_string()
}

/// Asserts exit status 0, showing stderr otherwise.
pub fn assert_success(output: &Output) {
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Parses a successful run's JSON output, asserting exit status 0 and no job error.
pub fn json_of(output: &Output) -> Value {
    assert_success(output);
    let json: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "JSON does not parse ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    for job in json["jobs"].as_array().expect("jobs") {
        assert_eq!(job["error"], 0, "job failed: {job}");
    }
    json
}

/// Asserts a bad-input failure: status 1, a message on stderr containing `needle`, empty stdout.
pub fn assert_bad_input(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        output.stdout.is_empty(),
        "stdout must stay empty, got {:?}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        stderr.contains(needle),
        "stderr {stderr:?} lacks {needle:?}"
    );
}
