//! End-to-end tests of the `tpio` binary: parsing, verify with a corrupted block, JSON vs human
//! numbers, and exit codes for bad input.

mod common;

use std::path::Path;

use common::{assert_bad_input, assert_success, json_of, tpio};
use serde_json::Value;

/// A file of `bytes` zero bytes in `dir`.
fn target(dir: &Path, bytes: u64) -> String {
    common::target(dir, "target.img", bytes)
}

#[test]
fn bad_input_exits_1_with_a_message_and_no_stdout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = target(dir.path(), 1 << 20);
    assert_bad_input(
        &tpio(&["--bogus-option", "--output-format=json"]),
        "--bogus-option",
    );
    assert_bad_input(
        &tpio(&["--ioengine=libaio", "--filename", &small]),
        "libaio",
    );
    assert_bad_input(
        &tpio(&["--bs=1000", "--filename", &small, "--output-format=json"]),
        "not a multiple of 512",
    );
    assert_bad_input(
        &tpio(&["--size=2m", "--filename", &small, "--output-format=json"]),
        "smaller than the region",
    );
    let missing = dir.path().join("missing.img").display().to_string();
    assert_bad_input(
        &tpio(&["--filename", &missing, "--output-format=json"]),
        "No such file",
    );
    assert_bad_input(
        &tpio(&["--ioengine=tidepool", "--filename=/dev/null"]),
        "PCI address of an NVMe controller",
    );
    assert_bad_input(
        &tpio(&["--ioengine=null", "--size=1m", "--completion=sometimes"]),
        "not supported: completion=sometimes (tpio has: poll, interrupt)",
    );
    assert_bad_input(
        &tpio(&["--time_based", "--ioengine=null", "--size=1m"]),
        "needs --runtime",
    );
    let job_file = dir.path().join("bad.fio");
    std::fs::write(&job_file, "[global]\nioengine=null\nsize=1m\n[j]\nbs=4q\n").expect("write");
    assert_bad_input(&tpio(&[job_file.to_str().expect("utf8")]), "job j");
}

#[test]
fn verify_reports_exactly_the_corrupted_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = target(dir.path(), 4 << 20);
    // Write 4 MiB of verifiable 4 KiB blocks in random order, read back: all good.
    let write = tpio(&[
        "--name=fill",
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--size=4m",
        "--verify=crc32c",
        "--output-format=json",
        "--filename",
        &path,
    ]);
    let report = json_of(&write);
    assert_eq!(report["jobs"][0]["verify"]["checked"], 1024);
    assert_eq!(report["jobs"][0]["verify"]["mismatches"], 0);
    assert_eq!(report["jobs"][0]["write"]["total_ios"], 1024);

    // Corrupt one byte in the block at 1 MiB + 12 KiB.
    let bad_offset: u64 = (1 << 20) + 12 * 1024;
    let mut bytes = std::fs::read(&path).expect("read image");
    bytes[bad_offset as usize + 100] ^= 0xff;
    std::fs::write(&path, &bytes).expect("write image");

    for format in ["json", "normal"] {
        let check = tpio(&[
            "--name=check",
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=read",
            "--bs=4k",
            "--iodepth=4",
            "--size=4m",
            "--verify=crc32c",
            "--filename",
            &path,
            &format!("--output-format={format}"),
        ]);
        assert_eq!(
            check.status.code(),
            Some(1),
            "verify failure must fail the run"
        );
        let stdout = String::from_utf8_lossy(&check.stdout);
        if format == "json" {
            let report: Value = serde_json::from_str(&stdout).expect("json");
            let job = &report["jobs"][0];
            assert_eq!(job["verify"]["checked"], 1024);
            assert_eq!(job["verify"]["mismatches"], 1);
            assert_eq!(job["verify"]["bad_blocks"][0]["offset"], bad_offset);
            assert_eq!(job["verify"]["bad_blocks"][0]["reason"], "crc");
            assert_eq!(job["error"], 84, "EILSEQ like fio");
        } else {
            assert!(
                stdout.contains("1024 blocks checked, 1 mismatches"),
                "{stdout}"
            );
            assert!(
                stdout.contains(&format!("block at offset {bad_offset} ")),
                "{stdout}"
            );
        }
    }
}

#[test]
fn pattern_verify_finds_a_zeroed_block_in_a_bsrange_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = target(dir.path(), 2 << 20);
    let write = tpio(&[
        "--ioengine=io_uring",
        "--rw=write",
        "--bsrange=4k-64k",
        "--iodepth=4",
        "--size=2m",
        "--verify=pattern",
        "--do_verify=0",
        "--output-format=json",
        "--filename",
        &path,
    ]);
    let report = json_of(&write);
    assert_eq!(
        report["jobs"][0]["verify"]["checked"], 0,
        "do_verify=0 skips the read-back"
    );
    assert_eq!(report["jobs"][0]["write"]["io_bytes"], 2 << 20);
}

/// Extracts `IOPS=...` from the `  read:` line of the human report.
fn human_iops(text: &str, direction: &str) -> f64 {
    let line = text
        .lines()
        .find(|line| {
            line.trim_start()
                .starts_with(&format!("{direction}: IOPS="))
        })
        .expect("iops line");
    let value = line
        .split("IOPS=")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .expect("value");
    let (number, scale) = match value.strip_suffix('k') {
        Some(number) => (number, 1e3),
        None => match value.strip_suffix('M') {
            Some(number) => (number, 1e6),
            None => (value, 1.0),
        },
    };
    number.parse::<f64>().expect("number") * scale
}

#[test]
fn json_and_human_reports_carry_the_same_numbers() {
    let output = tpio(&[
        "--name=same",
        "--ioengine=null",
        "--rw=randrw",
        "--rwmixread=70",
        "--bs=4k",
        "--iodepth=16",
        "--size=64m",
        "--output-format=normal,json",
    ]);
    assert_success(&output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json_start = stdout.find("\n{").expect("json after the human text") + 1;
    let (human, json) = stdout.split_at(json_start);
    let report: Value = serde_json::from_str(json).expect("json");
    let job = &report["jobs"][0];
    assert_eq!(
        report["fio version"]
            .as_str()
            .map(|v| v.starts_with("tpio-")),
        Some(true)
    );
    assert_eq!(job["jobname"], "same");
    assert_eq!(job["error"], 0);
    let reads = job["read"]["total_ios"].as_u64().expect("reads");
    let writes = job["write"]["total_ios"].as_u64().expect("writes");
    assert_eq!(
        reads + writes,
        16384,
        "one pass over 64 MiB of 4 KiB blocks"
    );
    let read_share = reads as f64 / 16384.0;
    assert!(
        (0.67..0.73).contains(&read_share),
        "rwmixread=70 gave {read_share}"
    );
    assert_eq!(job["read"]["io_bytes"].as_u64(), Some(reads * 4096));
    assert_eq!(job["read"]["io_kbytes"].as_u64(), Some(reads * 4));

    for direction in ["read", "write"] {
        let json_iops = job[direction]["iops"].as_f64().expect("iops");
        let shown = human_iops(human, direction);
        assert!(
            (shown - json_iops).abs()
                // Half the last shown digit: 1 below 10k, 100 as "12.3k", 1000 as "237k".
                <= 0.5 + if json_iops >= 1e5 {
                    500.0
                } else if json_iops >= 1e4 {
                    50.0
                } else {
                    0.0
                },
            "{direction}: human {shown} vs json {json_iops}"
        );
        assert_eq!(
            job[direction]["clat_ns"]["N"].as_u64(),
            job[direction]["total_ios"].as_u64()
        );
    }
    // The read percentile block shows the JSON percentiles in fio's unit, truncated.
    let read = &job["read"]["clat_ns"]["percentile"];
    let values: Vec<u64> = tpio::stats::PERCENTILES
        .iter()
        .map(|p| {
            read[tpio::report::percentile_key(*p)]
                .as_u64()
                .expect("percentile")
        })
        .collect();
    let (unit, per) = tpio::report::percentile_unit(values[0], values[values.len() - 1]);
    let block_start = human
        .find(&format!("clat percentiles ({unit}):"))
        .expect("read percentile block");
    let block: String = human[block_start..]
        .lines()
        .skip(1)
        .take(5)
        .collect::<Vec<_>>()
        .join("\n");
    let shown: Vec<u64> = block
        .split("=[")
        .skip(1)
        .map(|cell| {
            cell.split(']')
                .next()
                .expect("cell")
                .trim()
                .parse()
                .expect("integer")
        })
        .collect();
    let expected: Vec<u64> = values.iter().map(|v| v / per).collect();
    assert_eq!(shown, expected);
}

#[test]
fn job_file_jobs_inherit_globals_and_echo_options_as_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job_file = dir.path().join("two.fio");
    std::fs::write(
        &job_file,
        "[global]\nioengine=null\nsize=8m\niodepth=4\n\n[seq]\nrw=read\nbs=128k\n\n[rand]\nrw=randwrite\n",
    )
    .expect("write job file");
    let output = tpio(&[job_file.to_str().expect("utf8"), "--output-format=json"]);
    let report = json_of(&output);
    let jobs = report["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0]["jobname"], "seq");
    assert_eq!(jobs[0]["read"]["total_ios"], 64);
    assert_eq!(
        jobs[0]["job options"]["bs"], "128k",
        "echoed as written, like fio"
    );
    assert_eq!(jobs[1]["jobname"], "rand");
    assert_eq!(jobs[1]["write"]["total_ios"], 2048, "default bs 4k");
    assert_eq!(
        jobs[1]["latency_depth"], 4,
        "iodepth inherited from [global]"
    );
    assert_eq!(report["global options"]["iodepth"], "4");
    assert_eq!(report["global options"]["size"], "8m");
    assert!(jobs[1]["job options"].get("iodepth").is_none());

    // The command line overrides the file.
    let output = tpio(&[
        job_file.to_str().expect("utf8"),
        "--size=4m",
        "--output-format=json",
    ]);
    let report = json_of(&output);
    assert_eq!(report["jobs"][0]["read"]["total_ios"], 32);
}

#[test]
fn numjobs_clones_each_report_and_plot_draws_a_png() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json_path = dir.path().join("clones.json");
    let output = tpio(&[
        "--name=c",
        "--ioengine=null",
        "--size=4m",
        "--numjobs=3",
        "--rw=randread",
        "--output-format=json",
        "--output",
        json_path.to_str().expect("utf8"),
    ]);
    assert_success(&output);
    assert!(
        output.stdout.is_empty(),
        "--output sends the report to the file"
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("read")).expect("json");
    assert_eq!(report["jobs"].as_array().map(Vec::len), Some(3));

    let png = dir.path().join("out.png");
    let plot = tpio(&[
        "plot",
        json_path.to_str().expect("utf8"),
        "-o",
        png.to_str().expect("utf8"),
    ]);
    assert_success(&plot);
    let bytes = std::fs::read(&png).expect("png written");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let bad = tpio(&[
        "plot",
        "/nonexistent.json",
        "-o",
        png.to_str().expect("utf8"),
    ]);
    assert_bad_input(&bad, "cannot read");
}

/// `jobs[0][map][bucket]` as a number.
fn bucket(report: &Value, map: &str, key: &str) -> f64 {
    report["jobs"][0][map][key].as_f64().unwrap_or(0.0)
}

#[test]
fn io_uring_batches_as_fio_and_the_json_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = target(dir.path(), 4 << 20);
    for registered in [false, true] {
        let mut args = vec![
            "--name=batching",
            "--ioengine=io_uring",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=4m",
            "--verify=crc32c",
            "--output-format=json",
            "--filename",
            &path,
        ];
        if registered {
            args.extend(["--fixedbufs", "--registerfiles=1"]);
        }
        let run = tpio(&args);
        let report = json_of(&run);
        assert_eq!(report["jobs"][0]["verify"]["mismatches"], 0);
        assert_eq!(report["jobs"][0]["verify"]["checked"], 1024);
        // fio's defaults: one I/O per io_uring_enter, one completion taken per refill.
        assert_eq!(bucket(&report, "iodepth_submit", "4"), 100.0, "{report}");
        assert_eq!(bucket(&report, "iodepth_complete", "4"), 100.0, "{report}");
    }
    // The null engine keeps whole batches: 16 slots filled and committed at once first.
    let run = tpio(&[
        "--ioengine=null",
        "--rw=randread",
        "--bs=4k",
        "--iodepth=16",
        "--size=4m",
        "--output-format=json",
    ]);
    let report = json_of(&run);
    assert!(bucket(&report, "iodepth_submit", "16") > 90.0, "{report}");
    assert!(bucket(&report, "iodepth_complete", "16") > 90.0, "{report}");
}

/// fio's `iodepth_batch_submit` (alias `iodepth_batch`) and `iodepth_batch_complete_max`
/// override an engine's batching: the null engine, which keeps whole batches by default,
/// commits one I/O at a time and refills each slot as its completion is taken; and in a job
/// file under fio's alias. Zero is refused with one line.
#[test]
fn iodepth_batch_options_override_the_engines_batching() {
    let run = tpio(&[
        "--ioengine=null",
        "--rw=randread",
        "--bs=4k",
        "--iodepth=16",
        "--size=4m",
        "--iodepth_batch_submit=1",
        "--iodepth_batch_complete_max=1",
        "--output-format=json",
    ]);
    let report = json_of(&run);
    assert_eq!(bucket(&report, "iodepth_submit", "4"), 100.0, "{report}");
    assert_eq!(bucket(&report, "iodepth_complete", "4"), 100.0, "{report}");
    let opts = &report["jobs"][0]["job options"];
    assert_eq!(opts["iodepth_batch_submit"], "1", "{report}");

    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("batch.fio");
    std::fs::write(
        &job,
        "[global]\nioengine=null\nrw=randread\nbs=4k\nsize=4m\niodepth=16\n\n[one]\niodepth_batch=1\n",
    )
    .expect("job file");
    let run = tpio(&["--output-format=json", job.to_str().expect("path")]);
    let report = json_of(&run);
    assert_eq!(bucket(&report, "iodepth_submit", "4"), 100.0, "{report}");

    let run = tpio(&["--ioengine=null", "--size=1m", "--iodepth_batch_submit=0"]);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("iodepth_batch_submit"), "{err}");
}
