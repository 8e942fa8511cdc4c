//! `tpio --ioengine=vhost-user-blk` against a real `qemu-storage-daemon` exporting a temporary
//! image: write-then-verify through the vhost-user data plane (and the same blocks verified
//! again by io_uring straight from the image file, proving they landed where tpio said), a
//! randread job with two clones sharing the device, and bad sockets. Each test is skipped with
//! a printed reason when `qemu-storage-daemon` is not installed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_bad_input, json_of, tpio};

/// Whether `qemu-storage-daemon` is on the PATH; prints why a test is skipped when not.
fn have_daemon(test: &str) -> bool {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("qemu-storage-daemon").is_file())
    });
    if !found {
        eprintln!(
            "{test}: SKIPPED: qemu-storage-daemon is not installed (apt-get install qemu-system-common)"
        );
    }
    found
}

/// A `qemu-storage-daemon` exporting a sparse image over vhost-user-blk, as in the driver's own
/// tests (drivers/vhost-user-blk/tests/common). Killed on drop; the directory goes with it.
struct Daemon {
    _dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts the daemon on a fresh sparse image of `bytes` with two queues and io_uring AIO,
    /// and waits for its socket.
    fn start(bytes: u64) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(bytes))
            .expect("image");
        let socket = dir.path().join("vhost.sock");
        let log = dir.path().join("daemon.log");
        let logf = std::fs::File::create(&log).expect("log");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct=off,aio=io_uring",
                image.display()
            ))
            .arg("--blockdev")
            .arg("driver=raw,node-name=disk0,file=file0")
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},\
                 writable=on,num-queues=2",
                socket.display()
            ))
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon starts");
        let started = Instant::now();
        while !socket.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the daemon did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            _dir: dir,
            image,
            socket,
            log,
            child: Some(child),
        }
    }

    /// The socket path as an argument.
    fn socket(&self) -> String {
        self.socket.display().to_string()
    }

    /// Stops the daemon with SIGTERM and waits, so the image file is complete.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let started = Instant::now();
            while child.try_wait().expect("wait").is_none() {
                if started.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Asserts the daemon logged nothing alarming (the driver tests' list).
    fn assert_quiet_log(&self) {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        for bad in ["panic", "rror", "nvalid", "ailed", "not found"] {
            assert!(!log.contains(bad), "daemon log mentions {bad:?}:\n{log}");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The verify options both the vhost-user write and the io_uring read-back use.
const VERIFY_JOB: [&str; 5] = [
    "--bs=64k",
    "--size=16m",
    "--offset=1m",
    "--verify=crc32c",
    "--output-format=json",
];

#[test]
fn write_then_verify_through_vhost_user_and_in_the_image() {
    if !have_daemon("write_then_verify_through_vhost_user_and_in_the_image") {
        return;
    }
    let mut daemon = Daemon::start(64 << 20);
    let socket = daemon.socket();
    let mut args = vec![
        "--name=vhost-write",
        "--ioengine=vhost-user-blk",
        "--filename",
        &socket,
        "--rw=randwrite",
        "--iodepth=16",
        "--do_verify",
        "--pool-min=4m",
        "--pool-chunk=2m",
        "--pool-max=32m",
    ];
    args.extend(VERIFY_JOB);
    let json = json_of(&tpio(&args));
    let job = &json["jobs"][0];
    let blocks = 16 * 16; // 16 MiB of 64 KiB blocks
    assert_eq!(job["write"]["total_ios"], blocks);
    assert_eq!(job["verify"]["checked"], blocks);
    assert_eq!(job["verify"]["mismatches"], 0);
    let stats = &job["tidepool"];
    assert_eq!(stats["socket"].as_str(), Some(socket.as_str()));
    assert_eq!(stats["failed_requests"], 0);
    assert_eq!(
        stats["requests"],
        2 * blocks,
        "every write and read-back went through the device"
    );
    assert!(stats["pool"]["capacity_bytes"].as_u64() >= Some(4 << 20));
    assert!(
        stats["regions"].as_u64() >= Some(1),
        "the pool's chunks are the regions shared with the backend: {stats}"
    );

    // The same blocks, read straight from the image by the kernel: the data is where the
    // vhost-user device put it, headers (offsets, seeds) and checksums intact.
    daemon.stop();
    let image = daemon.image.display().to_string();
    let mut args = vec![
        "--name=image-check",
        "--ioengine=io_uring",
        "--filename",
        &image,
        "--rw=randread",
        "--iodepth=8",
    ];
    args.extend(VERIFY_JOB);
    let json = json_of(&tpio(&args));
    assert_eq!(json["jobs"][0]["verify"]["checked"], blocks);
    assert_eq!(json["jobs"][0]["verify"]["mismatches"], 0);
    daemon.assert_quiet_log();
}

#[test]
fn randread_with_two_clones_reports_parseable_json() {
    if !have_daemon("randread_with_two_clones_reports_parseable_json") {
        return;
    }
    let daemon = Daemon::start(32 << 20);
    let socket = daemon.socket();
    for completion in ["poll", "interrupt"] {
        let completion_arg = format!("--completion={completion}");
        let json = json_of(&tpio(&[
            "--name=vhost-randread",
            "--ioengine=vhost-user-blk",
            "--filename",
            &socket,
            "--rw=randread",
            "--bs=4k",
            "--iodepth=8",
            "--numjobs=2",
            "--runtime=300ms",
            "--time_based",
            &completion_arg,
            "--output-format=json",
        ]));
        let jobs = json["jobs"].as_array().expect("jobs");
        assert_eq!(jobs.len(), 2, "one entry per clone");
        for job in jobs {
            assert!(job["read"]["total_ios"].as_u64() > Some(0), "{job}");
            assert!(job["read"]["iops"].as_f64() > Some(0.0), "{job}");
            let stats = &job["tidepool"];
            assert_eq!(stats["completion"].as_str(), Some(completion));
            assert_eq!(stats["queues"], 2, "one queue per clone: {stats}");
            assert_eq!(stats["failed_requests"], 0);
            assert_eq!(
                stats["requests"], job["read"]["total_ios"],
                "each clone counts its own requests (ramp-free run)"
            );
        }
    }
    daemon.assert_quiet_log();
}

#[test]
fn stats_interval_exports_the_vhost_pool_as_prometheus_text() {
    if !have_daemon("stats_interval_exports_the_vhost_pool_as_prometheus_text") {
        return;
    }
    let daemon = Daemon::start(32 << 20);
    let socket = daemon.socket();
    let dir = tempfile::tempdir().expect("tempdir");
    let stats = dir.path().join("tpio.prom");
    let stats_arg = format!("--stats-file={}", stats.display());
    let json = json_of(&tpio(&[
        "--name=vhost-stats",
        "--ioengine=vhost-user-blk",
        "--filename",
        &socket,
        "--rw=randread",
        "--bs=4k",
        "--iodepth=8",
        "--runtime=400ms",
        "--time_based",
        "--stats-interval=100ms",
        &stats_arg,
        "--output-format=json",
    ]));
    let text = std::fs::read_to_string(&stats).expect("the last snapshot");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("prometheus text");
    let find = |metric: &str| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == metric
                    && s.labels.get("job") == Some("vhost-stats")
                    && s.labels.get("clone") == Some("0")
            })
            .unwrap_or_else(|| panic!("no {metric} for the job in:\n{text}"))
            .value
            .clone()
    };
    let pool = &json["jobs"][0]["tidepool"]["pool"];
    assert_eq!(
        find("tidepool_pool_capacity_bytes"),
        prometheus_parse::Value::Gauge(pool["capacity_bytes"].as_f64().unwrap()),
        "the last snapshot is taken after the job, as the report's"
    );
    assert_eq!(
        find("tidepool_pool_in_use_bytes"),
        prometheus_parse::Value::Gauge(0.0),
        "every buffer is back once the job is done"
    );
    let reads = scrape
        .samples
        .iter()
        .find(|s| s.metric == "tpio_read_ios_total")
        .expect("tpio's own counter");
    assert_eq!(
        reads.value,
        prometheus_parse::Value::Counter(json["jobs"][0]["read"]["total_ios"].as_f64().unwrap())
    );
    daemon.assert_quiet_log();
}

/// A unix socket at `path` whose peer accepts and answers nothing: not a vhost-user backend.
fn silent_listener(path: &Path) -> std::os::unix::net::UnixListener {
    std::os::unix::net::UnixListener::bind(path).expect("bind")
}

#[test]
fn bad_sockets_exit_1_with_a_message_and_no_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |target: &Path| {
        tpio(&[
            "--name=bad",
            "--ioengine=vhost-user-blk",
            "--filename",
            &target.display().to_string(),
            "--rw=randread",
            "--runtime=100ms",
            "--output-format=json",
        ])
    };
    let missing = dir.path().join("missing.sock");
    assert_bad_input(&run(&missing), "No such file");
    let file = dir.path().join("plain.img");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(1 << 20))
        .expect("file");
    assert_bad_input(&run(&file), "not a unix socket");
    // Accepted by the kernel's backlog, never answered: the handshake's deadline names it.
    let silent = dir.path().join("silent.sock");
    let _listener = silent_listener(&silent);
    assert_bad_input(&run(&silent), "no reply to GET_FEATURES");
    // A socket file with no listener behind it (a backend that exited).
    let stale = dir.path().join("stale.sock");
    drop(silent_listener(&stale));
    assert_bad_input(&run(&stale), "cannot connect to the vhost-user socket");
}
