//! VM test `tpio_verify`: tpio's `--verify=crc32c` end to end on real (emulated) NVMe.
//!
//! Runs `/bin/tpio` (put into the guest by `tools/vm/run`, automatically for tests named
//! `tpio*`) and checks its JSON report (which must parse):
//!
//! 1. **Every DMA mode, write then read back** on the vfio-pci controller with
//!    `--ioengine=tidepool`: `bounce`, `map-per-io`, `zero-copy` and `auto` (threshold 64 KiB),
//!    random writes of 4-128 KiB blocks over a region of its own each, then the read-back
//!    verify: no error, every block checked, **0 mismatches**, and the paths the engine reports
//!    match the mode (bounce only bounces, map-per-io only maps, `auto` does both).
//! 2. **One corrupted block on the vfio controller**: write 256 verifiable 4 KiB blocks, then
//!    overwrite the block at a known offset with plain (unverifiable) data through a second
//!    tidepool run, then read-verify the region: **exactly 1 mismatch, at that offset**.
//! 4. **One queue per clone, interrupt completions, pinned clones**: `--numjobs=2
//!    --completion=interrupt --cpus_allowed=0-1 --cpus_allowed_policy=split`, each clone writing
//!    and verifying a region of its own: 0 mismatches, two jobs on two different NVMe I/O
//!    queues, each woken by its MSI-X vector.
//! 3. **One corrupted block through the kernel path** (only when the VM has a kernel-owned
//!    controller, `tools/vm/run --kernel-nvme`): the same with `--ioengine=io_uring --direct=1`
//!    on its block device, corrupting the block with `dd` between the runs.
//!
//! Exit 0 when every check holds; otherwise the first failed check is printed and the exit
//! status is 1.

use std::process::{Command, ExitCode};

use serde_json::Value;
use tidepool_vmtests::HarnessEnv;

/// Where the harness installs tpio in the guest.
const TPIO: &str = "/bin/tpio";
/// The block the corruption checks damage, as an offset inside their region.
const BAD_BLOCK_IN_REGION: u64 = 37 * 4096;

type Res<T> = Result<T, String>;

/// Runs tpio with `args` plus `--output-format=json`; returns the exit status and the parsed
/// report (an error if stdout is not JSON).
fn tpio(args: &[&str]) -> Res<(i32, Value)> {
    let output = Command::new(TPIO)
        .args(args)
        .arg("--output-format=json")
        .output()
        .map_err(|e| format!("cannot run {TPIO}: {e} (run with tools/vm/run --tpio)"))?;
    let status = output.status.code().unwrap_or(-1);
    let report = serde_json::from_slice(&output.stdout).map_err(|e| {
        format!(
            "tpio {args:?} exited {status} without a JSON report ({e}); stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    Ok((status, report))
}

/// Asserts `cond`, or fails with `what`.
fn check(cond: bool, what: String) -> Res<()> {
    if cond {
        Ok(())
    } else {
        Err(what)
    }
}

/// The first job of a report.
fn job(report: &Value) -> &Value {
    &report["jobs"][0]
}

/// A number at `path` in `value` (0 when missing).
fn num(value: &Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(value, |v, key| &v[*key])
        .as_u64()
        .unwrap_or(0)
}

/// Part 1: write-then-verify in every DMA mode on the vfio controller, 0 mismatches.
fn every_dma_mode(bdf: &str) -> Res<()> {
    let modes = [
        ("bounce", None),
        ("map-per-io", None),
        ("zero-copy", None),
        ("auto", Some("--dma-threshold=64k")),
    ];
    for (index, (mode, extra)) in modes.iter().enumerate() {
        let offset = format!("--offset={}m", 16 * index);
        let dma = format!("--dma={mode}");
        let filename = format!("--filename={bdf}");
        let mut args = vec![
            "--name=verify",
            "--ioengine=tidepool",
            filename.as_str(),
            dma.as_str(),
            "--rw=randwrite",
            "--bsrange=4k-128k",
            "--iodepth=16",
            "--size=16m",
            offset.as_str(),
            "--verify=crc32c",
        ];
        args.extend(extra.iter().copied());
        let (status, report) = tpio(&args)?;
        let job = job(&report);
        let checked = num(job, &["verify", "checked"]);
        let mismatches = num(job, &["verify", "mismatches"]);
        let written = num(job, &["write", "total_ios"]);
        let paths = &job["tidepool"]["paths"];
        println!(
            "tpio_verify: dma={mode}: {written} blocks written, {checked} checked, {mismatches} \
             mismatches, paths {paths}, exit {status}"
        );
        check(
            status == 0 && job["error"] == 0,
            format!("dma={mode}: tpio failed: {}", job["error_message"]),
        )?;
        check(
            checked > 0 && checked == written && mismatches == 0,
            format!("dma={mode}: {checked} of {written} blocks checked, {mismatches} mismatches"),
        )?;
        let (bounced, mapped, zero) = (
            num(paths, &["bounced"]),
            num(paths, &["mapped"]),
            num(paths, &["zero_copy"]),
        );
        let total = 2 * written;
        let paths_ok = match *mode {
            "bounce" => bounced == total && mapped == 0 && zero == 0,
            "map-per-io" => mapped == total && bounced == 0 && zero == 0,
            "zero-copy" => zero == total && bounced == 0 && mapped == 0,
            _ => bounced > 0 && mapped > 0 && bounced + mapped == total,
        };
        check(
            paths_ok,
            format!("dma={mode}: paths {paths} do not match the mode ({total} I/Os)"),
        )?;
    }
    Ok(())
}

/// Part 4: `numjobs=2` gives each clone its own I/O queue; `--completion=interrupt` sleeps on
/// the queue's MSI-X vector; clones pinned one CPU each.
fn queues_per_clone_with_interrupts(bdf: &str) -> Res<()> {
    let filename = format!("--filename={bdf}");
    let args = [
        "--name=mq",
        "--ioengine=tidepool",
        filename.as_str(),
        "--dma=zero-copy",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--numjobs=2",
        "--size=8m",
        "--offset=128m",
        "--offset_increment=8m",
        "--verify=crc32c",
        "--completion=interrupt",
        "--cpus_allowed=0-1",
        "--cpus_allowed_policy=split",
    ];
    let (status, report) = tpio(&args)?;
    let jobs = report["jobs"].as_array().cloned().unwrap_or_default();
    check(
        jobs.len() == 2,
        format!("numjobs=2 gave {} job reports", jobs.len()),
    )?;
    let mut qids = Vec::new();
    for job in &jobs {
        let queue = &job["tidepool"]["queue"];
        let (checked, mismatches) = (
            num(job, &["verify", "checked"]),
            num(job, &["verify", "mismatches"]),
        );
        println!(
            "tpio_verify: numjobs=2 clone: queue {queue}, {checked} checked, {mismatches} mismatches, exit {status}"
        );
        check(
            status == 0 && job["error"] == 0,
            format!("numjobs=2: tpio failed: {}", job["error_message"]),
        )?;
        check(
            checked == 2048 && mismatches == 0,
            format!("numjobs=2: {checked} of 2048 blocks checked, {mismatches} mismatches"),
        )?;
        check(
            queue["completion"] == "interrupt" && num(queue, &["interrupt_wakes"]) > 0,
            format!("numjobs=2: the queue was not driven by its interrupt: {queue}"),
        )?;
        qids.push(num(queue, &["qid"]));
    }
    check(
        qids[0] != qids[1] && !qids.contains(&0),
        format!("numjobs=2: the clones did not get I/O queues of their own: {qids:?}"),
    )
}

/// Checks that a read-verify report names exactly one bad block, at `bad`.
fn exactly_one_bad_block(what: &str, status: i32, report: &Value, bad: u64) -> Res<()> {
    let job = job(report);
    let mismatches = num(job, &["verify", "mismatches"]);
    let reported = &job["verify"]["bad_blocks"];
    println!(
        "tpio_verify: {what}: {} blocks checked, {mismatches} mismatch(es): {reported}, exit {status}",
        num(job, &["verify", "checked"])
    );
    check(
        mismatches == 1 && reported[0]["offset"].as_u64() == Some(bad),
        format!("{what}: expected exactly the block at {bad}, got {mismatches}: {reported}"),
    )?;
    check(
        status != 0 && job["error"] == libc::EILSEQ,
        format!(
            "{what}: a verify failure must fail the run with EILSEQ (got exit {status}, error {})",
            job["error"]
        ),
    )
}

/// Part 2: corrupt one block on the vfio controller with a plain tidepool write.
fn corrupt_on_vfio(bdf: &str) -> Res<()> {
    let filename = format!("--filename={bdf}");
    let region = 96u64 << 20;
    let offset = format!("--offset={region}");
    let common = [
        "--ioengine=tidepool",
        filename.as_str(),
        "--bs=4k",
        "--size=1m",
        offset.as_str(),
    ];
    let mut write = common.to_vec();
    write.extend([
        "--name=fill",
        "--rw=write",
        "--iodepth=8",
        "--verify=crc32c",
    ]);
    let (status, report) = tpio(&write)?;
    check(
        status == 0 && num(job(&report), &["verify", "mismatches"]) == 0,
        format!("fill before corruption failed: {}", job(&report)),
    )?;
    let bad = region + BAD_BLOCK_IN_REGION;
    let bad_offset = format!("--offset={bad}");
    let (status, _) = tpio(&[
        "--name=corrupt",
        "--ioengine=tidepool",
        filename.as_str(),
        "--rw=write",
        "--bs=4k",
        "--size=4k",
        bad_offset.as_str(),
    ])?;
    check(status == 0, format!("corrupting write exited {status}"))?;
    let mut read = common.to_vec();
    read.extend([
        "--name=check",
        "--rw=read",
        "--iodepth=8",
        "--verify=crc32c",
    ]);
    let (status, report) = tpio(&read)?;
    exactly_one_bad_block("vfio corruption", status, &report, bad)
}

/// Part 3: write with io_uring on the kernel's block device, corrupt with dd, verify.
fn corrupt_on_kernel_path(dev: &str) -> Res<()> {
    let filename = format!("--filename={dev}");
    let common = [
        "--ioengine=io_uring",
        "--direct=1",
        filename.as_str(),
        "--bs=4k",
        "--size=1m",
    ];
    let mut write = common.to_vec();
    write.extend([
        "--name=fill",
        "--rw=write",
        "--iodepth=8",
        "--verify=crc32c",
    ]);
    let (status, report) = tpio(&write)?;
    check(
        status == 0 && num(job(&report), &["verify", "mismatches"]) == 0,
        format!("kernel-path fill failed: {}", job(&report)),
    )?;
    let seek = format!("seek={}", BAD_BLOCK_IN_REGION / 4096);
    let of = format!("of={dev}");
    let dd = Command::new("dd")
        .args([
            "if=/dev/urandom",
            of.as_str(),
            "bs=4096",
            "count=1",
            seek.as_str(),
            "conv=notrunc,fsync",
        ])
        .output()
        .map_err(|e| format!("cannot run dd: {e}"))?;
    check(
        dd.status.success(),
        format!("dd failed: {}", String::from_utf8_lossy(&dd.stderr)),
    )?;
    let mut read = common.to_vec();
    read.extend([
        "--name=check",
        "--rw=read",
        "--iodepth=8",
        "--verify=crc32c",
    ]);
    let (status, report) = tpio(&read)?;
    exactly_one_bad_block(
        "kernel-path corruption",
        status,
        &report,
        BAD_BLOCK_IN_REGION,
    )
}

fn run() -> Res<()> {
    let env = HarnessEnv::from_env().map_err(|e| e.to_string())?;
    let bdf = env.nvme_bdf().to_string();
    every_dma_mode(&bdf)?;
    corrupt_on_vfio(&bdf)?;
    queues_per_clone_with_interrupts(&bdf)?;
    match env.kernel_nvme_dev.as_ref().and_then(|p| p.to_str()) {
        Some(dev) if !dev.is_empty() => corrupt_on_kernel_path(dev)?,
        _ => println!(
            "tpio_verify: no kernel-owned NVMe in this VM (tools/vm/run --kernel-nvme): \
             kernel-path corruption check skipped"
        ),
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("tpio_verify: PASS");
            ExitCode::SUCCESS
        }
        Err(message) => {
            println!("tpio_verify: FAIL: {message}");
            ExitCode::FAILURE
        }
    }
}
