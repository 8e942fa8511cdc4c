//! The device model: an in-process stand-in for real devices (no hardware is touched).
//!
//! One thread, the **clock**, keeps the trace's time. It does two things:
//! 1. releases each request at its arrival time by handing it to a callback (the runner
//!    spawns the request's task on the tokio runtime);
//! 2. completes "device service": a task that has mapped its buffer sends a [`Hold`] (until
//!    when, and a oneshot to fire) and awaits it; the clock fires it at that time, as a device
//!    raises its completion interrupt.
//!
//! Why a thread and not `tokio::time::sleep`: tokio's timer wheel has 1 ms granularity, so
//! every hold would be rounded up to at least 1 ms and the sub-millisecond holds of the
//! network workload would be inflated several times. The clock sleeps in a futex-based
//! `recv_timeout` with its timer slack set to 1 µs, which wakes within tens of microseconds.
//! How late it released arrivals is measured ([`ClockReport::arrival_lag_us`]) and reported,
//! so an overloaded machine shows up in the results rather than silently skewing them.
//!
//! The clock exits when every arrival was released (or the run was stopped) and every hold
//! sender is gone (all request tasks have finished).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A request for the device to hold a buffer until `until`, then fire `done`.
#[derive(Debug)]
pub struct Hold {
    /// When the device completes the request.
    pub until: Instant,
    /// Fired at `until`.
    pub done: tokio::sync::oneshot::Sender<()>,
}

/// What the clock measured about itself.
#[derive(Debug, Default, Clone)]
pub struct ClockReport {
    /// How late each arrival was released, µs (sorted ascending).
    pub arrival_lag_us: Vec<u64>,
    /// Arrivals released.
    pub released: usize,
}

/// Runs the clock on the calling thread until done (see the module doc).
///
/// `arrivals` are offsets from `start` (µs, ascending); `release(i)` is called for the i-th
/// once its time has come. `stop` set means: release no more arrivals. Holds arrive on
/// `holds`. Takes no lock; `release` runs on this thread.
pub fn run_clock(
    start: Instant,
    arrivals: &[u64],
    release: impl FnMut(usize),
    holds: Receiver<Hold>,
    stop: Arc<AtomicBool>,
) -> ClockReport {
    set_fine_timer_slack();
    // Dropped once every arrival is out: it may own a hold sender, which must go for the
    // channel to disconnect when the last task ends.
    let mut release = Some(release);
    let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut pending: std::collections::HashMap<u64, tokio::sync::oneshot::Sender<()>> =
        Default::default();
    let mut next_id = 0u64;
    let mut next_arrival = 0usize;
    let mut report = ClockReport::default();
    let mut connected = true;
    loop {
        let now = Instant::now();
        // Fire every due completion.
        while let Some(Reverse((at, id))) = heap.peek().copied() {
            if at > now {
                break;
            }
            heap.pop();
            if let Some(tx) = pending.remove(&id) {
                // The task may have been cancelled; nothing to do then.
                let _ = tx.send(());
            }
        }
        // Release every due arrival.
        if stop.load(Ordering::Relaxed) {
            next_arrival = arrivals.len();
        }
        while next_arrival < arrivals.len() {
            let due = start + Duration::from_micros(arrivals[next_arrival]);
            if due > now {
                break;
            }
            report
                .arrival_lag_us
                .push(now.duration_since(due).as_micros() as u64);
            if let Some(r) = release.as_mut() {
                r(next_arrival);
                report.released += 1;
            }
            next_arrival += 1;
        }
        let arrivals_done = next_arrival >= arrivals.len();
        if arrivals_done {
            release = None;
        }
        if arrivals_done && !connected && heap.is_empty() {
            break;
        }
        let next_due = [
            heap.peek().map(|Reverse((t, _))| *t),
            (!arrivals_done).then(|| start + Duration::from_micros(arrivals[next_arrival])),
        ]
        .into_iter()
        .flatten()
        .min();
        let wait = next_due.map_or(Duration::from_millis(50), |t| {
            t.saturating_duration_since(Instant::now())
        });
        if !connected {
            std::thread::sleep(wait);
            continue;
        }
        match holds.recv_timeout(wait) {
            Ok(h) => {
                heap.push(Reverse((h.until, next_id)));
                pending.insert(next_id, h.done);
                next_id += 1;
                // Drain whatever else is queued without sleeping.
                while let Ok(h) = holds.try_recv() {
                    heap.push(Reverse((h.until, next_id)));
                    pending.insert(next_id, h.done);
                    next_id += 1;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => connected = false,
        }
    }
    report.arrival_lag_us.sort_unstable();
    report
}

/// Asks the kernel to wake this thread's timed sleeps within 1 µs of their deadline (the
/// default slack is 50 µs). Best effort: a failure only makes the clock coarser.
fn set_fine_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and changes only this thread's
    // timer slack; no memory is passed to the kernel.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
}
