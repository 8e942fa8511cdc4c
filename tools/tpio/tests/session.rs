//! The jobs run in a session of their own, as fio's job processes do (see `tpio::session`): the
//! job process leads a new session, the parent forwards Ctrl-C to it, and `--thread` keeps
//! everything in the caller's session. Needs autogroups on (skips, saying so, when they are off).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `(pid, parent pid, session id)` of every process, from /proc/PID/stat.
fn processes() -> Vec<(i32, i32, i32)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command name (which may hold spaces) start after the last ')'.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split(' ').collect();
            Some((pid, fields[1].parse().ok()?, fields[3].parse().ok()?))
        })
        .collect()
}

/// The children of `parent`, waiting up to 5 s for the first to appear.
fn children_of(parent: i32) -> Vec<(i32, i32, i32)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let children: Vec<_> = processes()
            .into_iter()
            .filter(|(_, ppid, _)| *ppid == parent)
            .collect();
        if !children.is_empty() || Instant::now() > deadline {
            return children;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `pid`'s session id once it leads its own session, or its last one seen (`None` if it is
/// gone) after `wait`.
fn session_of(pid: i32, wait: Duration) -> Option<i32> {
    let deadline = Instant::now() + wait;
    loop {
        let session = processes()
            .into_iter()
            .find(|(p, _, _)| *p == pid)
            .map(|(_, _, session)| session);
        if session == Some(pid) || session.is_none() || Instant::now() > deadline {
            return session;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A 30 s null job, started as a terminal's foreground command is: with the default action for
/// SIGINT. (A shell without job control starts its background commands with SIGINT ignored, and
/// that is inherited: `./tools/test &` would otherwise run this with Ctrl-C ignored by both tpio
/// processes, as the caller asked.)
fn long_null_job(extra: &[&str]) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(env!("CARGO_BIN_EXE_tpio"));
    // SAFETY: runs in the forked child before exec; `signal` is async-signal-safe and takes no
    // pointers.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    command
        .args([
            "--ioengine=null",
            "--size=1m",
            "--rw=randread",
            "--time_based",
            "--runtime=30",
            "--output-format=json",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tpio starts")
}

fn autogroups() -> bool {
    let on = tpio::session::autogroups_enabled();
    if !on {
        eprintln!("skipping: kernel.sched_autogroup_enabled is off, tpio forks no job process");
    }
    on
}

#[test]
fn the_jobs_lead_their_own_session_and_ctrl_c_reaches_them() {
    if !autogroups() {
        return;
    }
    let started = Instant::now();
    let parent = long_null_job(&[]);
    let parent_pid = parent.id() as i32;
    let children = children_of(parent_pid);
    assert_eq!(children.len(), 1, "one job process: {children:?}");
    let child = children[0].0;
    // The child shows in /proc as soon as it is forked, a moment before its `setsid()`.
    let session = session_of(child, Duration::from_secs(5));
    assert_eq!(
        session,
        Some(child),
        "the job process leads its own session"
    );
    // SAFETY: kill takes no pointers; the pid is our own child.
    assert_eq!(unsafe { libc::kill(parent_pid, libc::SIGINT) }, 0);
    let output = parent.wait_with_output().expect("tpio ends");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGINT),
        "the parent dies as its job process did: {:?}",
        output.status
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the job process got the SIGINT (its 30 s job did not run out)"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{child}")).exists(),
        "the job process is gone"
    );
}

#[test]
fn a_finished_job_process_passes_its_report_and_status_on() {
    let output = Command::new(env!("CARGO_BIN_EXE_tpio"))
        .args([
            "--ioengine=null",
            "--size=1m",
            "--bs=4k",
            "--output-format=json",
        ])
        .output()
        .expect("tpio runs");
    assert_eq!(output.status.code(), Some(0));
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON report");
    assert_eq!(report["jobs"][0]["read"]["total_ios"], 256);
}

#[test]
fn thread_keeps_the_jobs_in_the_callers_session() {
    if !autogroups() {
        return;
    }
    let mut parent = long_null_job(&["--thread"]);
    std::thread::sleep(Duration::from_millis(300));
    let children: Vec<_> = processes()
        .into_iter()
        .filter(|(_, ppid, _)| *ppid == parent.id() as i32)
        .collect();
    parent.kill().expect("kill");
    let _ = parent.wait();
    assert!(
        children.is_empty(),
        "no job process with --thread: {children:?}"
    );
}

#[test]
fn killing_the_parent_outright_ends_the_job_process_too() {
    if !autogroups() {
        return;
    }
    let mut parent = long_null_job(&[]);
    let children = children_of(parent.id() as i32);
    assert_eq!(children.len(), 1, "one job process: {children:?}");
    let child = children[0].0;
    parent.kill().expect("SIGKILL the parent");
    let _ = parent.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{child}")).exists() {
        // The orphan is reparented and reaped by init (or a subreaper) once it has exited;
        // a zombie counts as gone.
        let state = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        if state
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the job process outlived its parent by 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
