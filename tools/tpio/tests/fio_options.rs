//! fio job-file options: each is parsed and does what fio's does (null engine or a temp file
//! through io_uring), or is refused with one `not supported:` line.

mod common;

use std::path::Path;
use std::process::Command;

use common::{assert_success, json_of, target, tpio};
use serde_json::Value;

/// Writes `text` as a job file in `dir` and runs it with JSON output; panics unless it succeeds.
fn run_file(dir: &Path, text: &str, extra: &[&str]) -> Value {
    let path = dir.join("job.fio");
    std::fs::write(&path, text).expect("write job file");
    let mut args = vec![path.to_str().expect("utf8"), "--output-format=json"];
    args.extend_from_slice(extra);
    json_of(&tpio(&args))
}

/// The (action, offset, len) lines of an iolog.
fn iolog_ios(path: &Path) -> Vec<(String, u64, u64)> {
    let text = std::fs::read_to_string(path).expect("iolog");
    assert_eq!(text.lines().next(), Some("fio version 2 iolog"));
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [_, action @ ("read" | "write"), offset, len] => Some((
                    action.to_string(),
                    offset.parse().expect("offset"),
                    len.parse().expect("len"),
                )),
                _ => None,
            }
        })
        .collect()
}

fn u(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a u64: {value}"))
}

#[test]
fn group_reporting_sums_clones_and_jobs_of_a_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = run_file(
        dir.path(),
        "[global]\nioengine=null\nsize=4m\nbs=4k\ngroup_reporting\n[a]\nrw=read\nnumjobs=3\n[b]\nrw=read\n",
        &[],
    );
    let jobs = report["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 1, "one summed job for the group");
    assert_eq!(jobs[0]["jobname"], "a");
    assert_eq!(
        u(&jobs[0]["read"]["total_ios"]),
        4 * 1024,
        "3 clones of a + b"
    );
    assert_eq!(u(&jobs[0]["read"]["clat_ns"]["N"]), 4 * 1024);
    assert_eq!(report["global options"]["group_reporting"], "");
    // Without group_reporting each clone is its own job.
    let report = run_file(
        dir.path(),
        "[global]\nioengine=null\nsize=4m\n[a]\nnumjobs=3\n",
        &[],
    );
    let jobs = report["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 3);
    assert!(jobs.iter().all(|job| u(&job["read"]["total_ios"]) == 1024));
    assert_eq!(jobs[0]["job options"]["numjobs"], "3");
}

/// (start ms, end ms) of each reported job.
fn spans(report: &Value) -> Vec<(u64, u64)> {
    report["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|job| {
            let start = u(&job["job_start"]);
            (start, start + u(&job["job_runtime"]))
        })
        .collect()
}

#[test]
fn stonewall_serialises_and_jobs_otherwise_overlap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let body = "[global]\nioengine=null\nsize=1m\ntime_based\nruntime=300ms\n[a]\n[b]\n";
    let together = spans(&run_file(dir.path(), body, &[]));
    assert!(
        together[1].0 < together[0].1,
        "without stonewall b starts before a ends: {together:?}"
    );
    let walled = run_file(dir.path(), &body.replace("[b]\n", "[b]\nstonewall\n"), &[]);
    let walled_spans = spans(&walled);
    assert!(
        walled_spans[1].0 + 5 >= walled_spans[0].1,
        "stonewall: b starts after a ends: {walled_spans:?}"
    );
    assert_eq!(walled["jobs"][0]["groupid"], 0);
    assert_eq!(
        walled["jobs"][1]["groupid"], 1,
        "stonewall starts a new group"
    );
}

#[test]
fn wait_for_new_group_and_startdelay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = run_file(
        dir.path(),
        "[global]\nioengine=null\nsize=1m\ntime_based\nruntime=200ms\n\
         [first]\n[second]\nnew_group\n[third]\nwait_for=first\nstartdelay=100ms\n",
        &[],
    );
    let spans = spans(&report);
    assert!(
        spans[1].0 < spans[0].1,
        "new_group does not wait: {spans:?}"
    );
    assert!(spans[2].0 + 5 >= spans[0].1, "wait_for waits: {spans:?}");
    let groups: Vec<u64> = report["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|job| u(&job["groupid"]))
        .collect();
    assert_eq!(groups, [0, 1, 1]);
    // startdelay alone delays the start.
    let report = run_file(
        dir.path(),
        "[global]\nioengine=null\nsize=1m\ntime_based\nruntime=100ms\n[a]\n[b]\nstartdelay=300ms\n",
        &[],
    );
    let spans = self::spans(&report);
    assert!(spans[1].0 >= spans[0].0 + 250, "{spans:?}");
}

#[test]
fn rate_iops_and_rate_limit_and_ramp_time_is_not_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = run_file(
        dir.path(),
        "[j]\nioengine=null\nsize=64m\nrw=randread\ntime_based\nruntime=1s\nrate_iops=200\n",
        &[],
    );
    let ios = u(&report["jobs"][0]["read"]["total_ios"]);
    assert!(
        (180..=220).contains(&ios),
        "rate_iops=200 for 1s gave {ios}"
    );
    let report = run_file(
        dir.path(),
        "[j]\nioengine=null\nsize=64m\nrw=write\nbs=4k\ntime_based\nruntime=1s\nrate=400k\n",
        &[],
    );
    let bytes = u(&report["jobs"][0]["write"]["io_bytes"]);
    assert!(
        (360 << 10..=440 << 10).contains(&bytes),
        "rate=400k for 1s gave {bytes}"
    );
    let report = run_file(
        dir.path(),
        "[j]\nioengine=null\nsize=64m\ntime_based\nruntime=500ms\nramp_time=500ms\nrate_iops=200\n",
        &[],
    );
    let ios = u(&report["jobs"][0]["read"]["total_ios"]);
    assert!(
        (80..=120).contains(&ios),
        "only the 500 ms after the ramp count: {ios}"
    );
}

#[test]
fn loops_repeat_the_workload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = run_file(dir.path(), "[j]\nioengine=null\nsize=1m\nloops=3\n", &[]);
    assert_eq!(u(&report["jobs"][0]["read"]["total_ios"]), 3 * 256);
}

#[test]
fn iolog_write_then_read_replays_the_same_ios() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("ios.log");
    let file = target(dir.path(), "disk.img", 2 << 20);
    run_file(
        dir.path(),
        &format!(
            "[rec]\nioengine=io_uring\nfilename={file}\nrw=randrw\nbsrange=4k-16k\nsize=1m\nwrite_iolog={}\n",
            log.display()
        ),
        &[],
    );
    let recorded = iolog_ios(&log);
    assert!(recorded.len() > 60, "{} ios", recorded.len());
    assert!(recorded.iter().any(|io| io.0 == "read") && recorded.iter().any(|io| io.0 == "write"));
    let replay_log = dir.path().join("replay.log");
    let report = run_file(
        dir.path(),
        &format!(
            "[play]\nioengine=io_uring\nfilename={file}\nrw=read\nread_iolog={}\nwrite_iolog={}\n",
            log.display(),
            replay_log.display()
        ),
        &[],
    );
    assert_eq!(
        iolog_ios(&replay_log),
        recorded,
        "the replay issues the logged I/Os in order"
    );
    let job = &report["jobs"][0];
    assert_eq!(
        u(&job["read"]["total_ios"]) + u(&job["write"]["total_ios"]),
        recorded.len() as u64
    );
    // fio's version 3 format (timestamps first) replays too.
    let v3 = dir.path().join("v3.log");
    std::fs::write(
        &v3,
        "fio version 3 iolog\n0 f add\n0 f open\n5 f write 4096 4096\n9 f read 0 512\n10 f close\n",
    )
    .expect("write");
    let report = run_file(
        dir.path(),
        &format!(
            "[v3]\nioengine=io_uring\nfilename={file}\nread_iolog={}\n",
            v3.display()
        ),
        &[],
    );
    assert_eq!(report["jobs"][0]["write"]["io_bytes"], 4096);
    assert_eq!(report["jobs"][0]["read"]["io_bytes"], 512);
}

#[test]
fn norandommap_repeats_offsets_and_randrepeat_seeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run_log = |extra: &str, name: &str| {
        let log = dir.path().join(name);
        run_file(
            dir.path(),
            &format!(
                "[j]\nioengine=null\nsize=1m\nrw=randread\n{extra}\nwrite_iolog={}\n",
                log.display()
            ),
            &[],
        );
        iolog_ios(&log)
            .into_iter()
            .map(|io| io.1)
            .collect::<Vec<u64>>()
    };
    let mapped = run_log("", "a.log");
    let distinct = |offsets: &[u64]| {
        offsets
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    assert_eq!(
        distinct(&mapped),
        256,
        "the random map visits each block once"
    );
    let unmapped = run_log("norandommap", "b.log");
    assert_eq!(unmapped.len(), 256);
    assert!(
        distinct(&unmapped) < 230,
        "norandommap draws with replacement"
    );
    assert_eq!(
        run_log("", "c.log"),
        mapped,
        "randrepeat=1 (default): same sequence"
    );
    assert_ne!(
        run_log("randrepeat=0", "d.log"),
        mapped,
        "randrepeat=0: a fresh seed"
    );
    assert_ne!(run_log("randseed=99", "e.log"), mapped);
    assert_eq!(
        run_log("randseed=99", "f.log"),
        run_log("randseed=99", "g.log")
    );
}

#[test]
fn bssplit_and_bsrange_sizes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("split.log");
    run_file(
        dir.path(),
        &format!(
            "[j]\nioengine=null\nsize=16m\nrw=randwrite\nbssplit=4k/75:64k/25\nwrite_iolog={}\n",
            log.display()
        ),
        &[],
    );
    let ios = iolog_ios(&log);
    let small = ios.iter().filter(|io| io.2 == 4096).count() as f64;
    let large = ios.iter().filter(|io| io.2 == 65536).count() as f64;
    assert!(ios
        .iter()
        .all(|io| io.2 == 4096 || io.2 == 65536 || io.1 + io.2 == 16 << 20));
    let share = small / (small + large);
    assert!((0.70..0.80).contains(&share), "4k share {share}");
    let log = dir.path().join("range.log");
    run_file(
        dir.path(),
        &format!(
            "[j]\nioengine=null\nsize=4m\nbsrange=8k-32k\nwrite_iolog={}\n",
            log.display()
        ),
        &[],
    );
    let ios = iolog_ios(&log);
    assert!(ios
        .iter()
        .all(|io| (8192..=32768).contains(&io.2) && io.2 % 512 == 0));
    assert!(ios.iter().any(|io| io.2 != ios[0].2), "sizes vary");
}

#[test]
fn offset_increment_and_size_percent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = target(dir.path(), "disk.img", 4 << 20);
    run_file(
        dir.path(),
        &format!("[j]\nioengine=io_uring\nfilename={file}\nrw=write\nsize=1m\nnumjobs=2\noffset_increment=2m\n"),
        &[],
    );
    let bytes = std::fs::read(&file).expect("read");
    let mib = 1 << 20;
    let touched = |range: std::ops::Range<usize>| bytes[range].iter().any(|b| *b != 0);
    assert!(touched(0..mib), "clone 0 at 0");
    assert!(!touched(mib..2 * mib), "nothing between the clones");
    assert!(touched(2 * mib..3 * mib), "clone 1 at 2 MiB");
    assert!(!touched(3 * mib..4 * mib));
    let report = run_file(
        dir.path(),
        &format!("[j]\nioengine=io_uring\nfilename={file}\nsize=25%\n"),
        &[],
    );
    assert_eq!(
        report["jobs"][0]["read"]["io_bytes"],
        1 << 20,
        "25% of 4 MiB"
    );
    assert_eq!(report["jobs"][0]["job options"]["size"], "25%");
}

#[test]
fn include_variables_section_and_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("common.fio"),
        "[global]\nioengine=null\nthread\n",
    )
    .expect("write");
    let path = dir.path().join("main.fio");
    std::fs::write(
        &path,
        "include common.fio\n[small]\nsize=${TPIO_TEST_SIZE}\n[big]\nsize=2m\n",
    )
    .expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_tpio"))
        .args([
            path.to_str().expect("utf8"),
            "--output-format=json",
            "--section=small",
        ])
        .env("TPIO_TEST_SIZE", "1m")
        .output()
        .expect("runs");
    let report = json_of(&output);
    let jobs = report["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 1, "--section=small runs only [small]");
    assert_eq!(
        jobs[0]["read"]["io_bytes"],
        1 << 20,
        "${{TPIO_TEST_SIZE}} = 1m"
    );
    assert_eq!(report["global options"]["thread"], "");
}

#[test]
fn verify_backlog_interleaves_checks_with_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = target(dir.path(), "disk.img", 1 << 20);
    let log = dir.path().join("v.log");
    let report = run_file(
        dir.path(),
        &format!(
            "[j]\nioengine=io_uring\nfilename={file}\nrw=randwrite\nsize=256k\nverify=crc32c\nverify_backlog=16\niodepth=4\nwrite_iolog={}\n",
            log.display()
        ),
        &[],
    );
    let job = &report["jobs"][0];
    assert_eq!(job["verify"]["checked"], 64);
    assert_eq!(job["verify"]["mismatches"], 0);
    let actions: Vec<String> = iolog_ios(&log).into_iter().map(|io| io.0).collect();
    let expected: Vec<String> = (0..4)
        .flat_map(|_| {
            std::iter::repeat_n("write".to_string(), 16)
                .chain(std::iter::repeat_n("read".to_string(), 16))
        })
        .collect();
    assert_eq!(actions, expected, "16 writes, their 16 checks, and so on");
}

#[test]
fn unsupported_options_are_one_line_naming_the_option() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (body, needle) in [
        (
            "[j]\nioengine=null\nsize=1m\ngtod_reduce=1\n",
            "not supported: gtod_reduce",
        ),
        (
            "[j]\nioengine=libaio\nsize=1m\n",
            "not supported: ioengine=libaio",
        ),
        (
            "[j]\nioengine=null\nsize=1m\nfilename=a:b\n",
            "not supported: filename=a:b",
        ),
        (
            "[j]\nioengine=null\nsize=1m\nbssplit=4k/50,8k/100\n",
            "bssplit",
        ),
    ] {
        let path = dir.path().join("bad.fio");
        std::fs::write(&path, body).expect("write");
        let output = tpio(&[path.to_str().expect("utf8"), "--parse-only"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{body}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
        assert!(!stderr.contains("Usage"), "no usage dump: {stderr}");
    }
    // The command line: group_reporting and stonewall are options, not usage errors.
    let output = tpio(&[
        "--ioengine=null",
        "--size=1m",
        "--group_reporting",
        "--stonewall",
        "--parse-only",
    ]);
    assert_success(&output);
    let output = tpio(&["--ioengine=null", "--size=1m", "--zonemode=strided"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim(), "tpio: not supported: --zonemode");
}
