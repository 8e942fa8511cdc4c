//! Running the jobs in a session of their own, as fio does.
//!
//! fio runs each job in a forked process that calls `setsid()` (unless the job says `thread`).
//! With the scheduler's autogroups (`kernel.sched_autogroup_enabled=1`, the default of most
//! distributions and of this project's hosts), CPU time is shared fairly between *sessions* first
//! and only then between the threads of a session. A fio job therefore gets a whole session's
//! share however busy the session that started it is, while tpio's jobs, threads of the tpio
//! process, shared the caller's session with everything else it ran. When the target is CPU-bound
//! (a loop device with direct I/O over tmpfs: every I/O costs a kernel worker's copy) and the host
//! is busy, that alone decides the result: with two CPU hogs in the caller's session on the 2-CPU
//! development host, 4 KiB random reads at QD 32 (5 rounds) gave fio a median of 93k IOPS,
//! `fio --thread` 11k, tpio 16k and `setsid tpio` 118k. That is the "fewer IOPS than fio on a
//! CPU-bound device" of issue #14 (BENCHMARKS.md, "tpio vs fio").
//!
//! So, unless every job says `thread=1` (fio's opt-out, which keeps fio's jobs in the caller's
//! session too), tpio forks once, before anything is opened or any thread started: the child calls
//! `setsid()` and runs the jobs; the parent waits for it, forwards SIGINT, SIGTERM, SIGHUP and
//! SIGQUIT (a terminal's Ctrl-C reaches only the terminal's foreground process group, which the
//! child has left), and exits as the child did (with its status, or by the same signal); if the
//! parent is killed outright, the child gets SIGTERM (`PR_SET_PDEATHSIG`). Nothing is
//! forked when tpio already leads its session, when autogroups are off, or when the process is not
//! single-threaded (forking a multi-threaded process is unsound).

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::options::JobSpec;

/// The job process's pid, for the parent's signal handler (0 until forked).
static CHILD: AtomicI32 = AtomicI32::new(0);

/// The signals the parent passes on to the job process.
const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Which side of the fork this process is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Run the jobs here (the job process, or no fork was needed).
    RunJobs,
    /// The job process ended; exit with this status (the parent).
    Exit(i32),
}

/// Forking or waiting failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// `fork` failed (no processes or memory left).
    #[error("cannot fork the job process: {0}")]
    Fork(io::Error),
    /// `waitpid` failed.
    #[error("waiting for the job process failed: {0}")]
    Wait(io::Error),
}

/// Whether the jobs should get a session of their own: not when every job asks for `thread`,
/// not when autogroups are off (nothing to gain), not when this process already leads a session.
pub fn wanted(specs: &[JobSpec]) -> bool {
    !specs.iter().all(|spec| spec.thread) && autogroups_enabled() && !leads_session()
}

/// Whether the scheduler groups CPU time by session.
pub fn autogroups_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled")
        .is_ok_and(|text| text.trim() == "1")
}

/// Whether this process leads its session.
fn leads_session() -> bool {
    // SAFETY: getsid and getpid take no pointers and cannot fail for the calling process.
    unsafe { libc::getsid(0) == libc::getpid() }
}

/// Threads of this process, from /proc (`None` if unreadable).
fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|count| count.trim().parse().ok())
}

/// Forks the job process into a new session (see the module doc). Returns [`Role::RunJobs`] in
/// the child, and in this process when it is not single-threaded (then nothing is forked);
/// [`Role::Exit`] in the parent once the child has ended.
pub fn enter_own_session() -> Result<Role, SessionError> {
    if thread_count() != Some(1) {
        return Ok(Role::RunJobs);
    }
    // SAFETY: getpid takes no pointers.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the process has exactly one thread (checked above), so the child is a complete
    // copy of it and may go on running ordinary Rust code.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(SessionError::Fork(io::Error::last_os_error())),
        0 => {
            // SAFETY: no pointers. A fresh child is never a process-group leader, so setsid
            // cannot fail; if it somehow did, the jobs would just run in the caller's session.
            // PR_SET_PDEATHSIG: should the parent be killed outright (SIGKILL, which it cannot
            // forward), the job process gets SIGTERM instead of running on unseen; the getppid
            // check covers a parent that died before prctl.
            unsafe {
                libc::setsid();
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                if libc::getppid() != parent {
                    libc::raise(libc::SIGTERM);
                }
            }
            Ok(Role::RunJobs)
        }
        child => {
            CHILD.store(child, Ordering::SeqCst);
            forward_signals();
            wait_for(child).map(Role::Exit)
        }
    }
}

/// The parent's handler: pass the signal on to the job process.
extern "C" fn forward(signal: libc::c_int) {
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill is async-signal-safe and takes no pointers.
        unsafe { libc::kill(child, signal) };
    }
}

/// Installs [`forward`] for every signal in [`FORWARDED`].
fn forward_signals() {
    for signal in FORWARDED {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler only
        // reads an atomic and calls kill, both async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = forward as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// How often the waiting side looks at its jobs while they run: fio's main process wakes every
/// 10 ms while its jobs run (its status loop), and tpio's waiting side does the same rather than
/// block. That is not only fidelity: on the 2-vCPU VM hosts this project measures on, a process
/// that wakes every 10 ms beside a QD 1 job changes where the kernel runs the block device's
/// worker relative to the job (fewer cross-CPU wake-ups per I/O): with it, QD 1 4 KiB reads on a
/// loop device went from 0.60 and 0.83 of fio's IOPS to 0.82 and 0.89 (ABBA; BENCHMARKS.md,
/// session 7). 100 wake-ups a second cost nothing measurable.
pub const JOB_WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Waits for `child` (looking every [`JOB_WAIT_POLL`]) and turns its end into an exit status:
/// its own, or, if a signal killed it, death by the same signal here (128 + signal should that
/// not end this process).
fn wait_for(child: libc::pid_t) -> Result<i32, SessionError> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: status is a valid c_int to write to.
        let rc = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if rc == child {
            break;
        }
        if rc == 0 {
            std::thread::sleep(JOB_WAIT_POLL);
            continue;
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINTR) {
            return Err(SessionError::Wait(error));
        }
    }
    Ok(exit_status(status))
}

/// The exit status for a `waitpid` status; dies by the child's signal if it died by one.
fn exit_status(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        return libc::WEXITSTATUS(status);
    }
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        // SAFETY: restoring the default action and raising a signal take no pointers.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
        return 128 + signal;
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_threaded_process_is_never_forked() {
        // The test harness runs tests on threads of their own: more than one thread.
        let helper =
            std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(200)));
        assert!(thread_count().unwrap() > 1);
        assert_eq!(enter_own_session().unwrap(), Role::RunJobs);
        helper.join().unwrap();
    }

    #[test]
    fn a_normal_exit_keeps_its_status() {
        // WIFEXITED with status 3: (3 << 8).
        assert_eq!(exit_status(3 << 8), 3);
        assert_eq!(exit_status(0), 0);
    }
}
