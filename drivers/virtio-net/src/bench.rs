//! Traffic generation and measurement over a [`VirtioNet`]: what the `tpnet` tool and the VM
//! benchmark run.
//!
//! - [`run_tx`] sends sequenced test frames ([`crate::frame`]) of one size in batches, at a
//!   target rate or as fast as the ring allows, through the driver's bounce path
//!   ([`VirtioNet::send_batch`]) and measures device-completed frames per second and the
//!   submit → completion latency of every frame. The latency pairing assumes the device
//!   completes TX buffers in order (QEMU's virtio-net does); it is reported as such.
//! - [`run_rx`] receives for a duration (or a frame count) and counts frames, bytes, test
//!   frames, corrupt test frames, sequence gaps and duplicates, and the one-way latency from
//!   the sender's timestamp when sender and receiver share `CLOCK_MONOTONIC` (same machine).
//!
//! Rates are measured between the first and the last completion/reception, so start-up does not
//! dilute them. Percentiles come from an HDR histogram (3 significant digits).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::frame::{
    build_test_frame, parse_test_frame, stamp_test_frame, FrameError, TEST_ETHERTYPE,
};
use crate::net::{NetError, RxFrame, TxBuf, VirtioNet, MAX_FRAME};

/// `CLOCK_MONOTONIC` in nanoseconds (what test frames carry).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid local `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Latency percentiles in nanoseconds.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Percentiles {
    /// Samples.
    pub samples: u64,
    /// Median.
    pub p50_ns: u64,
    /// 90th.
    pub p90_ns: u64,
    /// 99th.
    pub p99_ns: u64,
    /// 99.9th.
    pub p999_ns: u64,
    /// Maximum.
    pub max_ns: u64,
}

impl Percentiles {
    fn from(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            samples: h.len(),
            p50_ns: h.value_at_quantile(0.5),
            p90_ns: h.value_at_quantile(0.9),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
        }
    }
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 60 s, 3 digits: valid bounds, cannot fail.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant bounds are valid")
}

/// What to send.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TxOptions {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Frame size in bytes (60..=1514).
    pub size: usize,
    /// Frames per batch (one publication, one doorbell at most).
    pub batch: usize,
    /// Target frames per second; 0 = as fast as possible.
    pub rate_pps: u64,
    /// Stop after this long...
    pub duration: Duration,
    /// ...or after this many frames, whichever first (0 = no count limit).
    pub count: u64,
    /// First sequence number.
    pub first_seq: u64,
    /// Send through the zero-copy path ([`VirtioNet::tx_buffer_reused`] +
    /// [`VirtioNet::send_buffers`]): frames are built in pool buffers, and a recycled buffer
    /// that already holds a test frame of this size is only restamped (26 bytes), not
    /// rewritten. Otherwise every frame is bounced by [`VirtioNet::send_batch`].
    pub zero_copy: bool,
}

/// What a TX run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TxReport {
    /// Frame size.
    pub size: usize,
    /// Batch size.
    pub batch: usize,
    /// Whether the zero-copy path was used.
    pub zero_copy: bool,
    /// Zero-copy only: frames restamped in a recycled buffer (the rest were written whole).
    pub restamped: u64,
    /// Frames queued.
    pub queued: u64,
    /// Frames the device completed.
    pub completed: u64,
    /// Seconds between the first submission and the last completion.
    pub seconds: f64,
    /// Completed frames per second.
    pub pps: f64,
    /// Completed payload bits per second (frame bytes × 8).
    pub bits_per_second: f64,
    /// Submit → completion latency.
    pub latency: Percentiles,
    /// Send attempts that found the ring full or the pool empty (the loop then reaps and
    /// retries: a measure of how often the device, not the driver, was the limit).
    pub stalls: u64,
}

impl TxReport {
    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl RxReport {
    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Sends test frames per `opts` (see the module docs), then waits up to 2 s for the ring to
/// drain. Polls; never sleeps except to pace a target rate.
pub fn run_tx(net: &mut VirtioNet, opts: &TxOptions) -> Result<TxReport, NetError> {
    let size = opts.size.clamp(crate::frame::MIN_TEST_FRAME, MAX_FRAME);
    let batch = opts.batch.max(1);
    let src = net.mac();
    let mut frames: Vec<Vec<u8>> = (0..batch)
        .map(|_| {
            let mut f = vec![0u8; size];
            build_test_frame(&mut f, opts.dst, src, 0, 0);
            f
        })
        .collect();
    let start = Instant::now();
    let mut tally = TxTally::new(net, start);
    let until = start + opts.duration;
    let mut seq = opts.first_seq;
    let (mut queued, mut completed, mut stalls) = (0u64, 0u64, 0u64);
    let mut zc: VecDeque<TxBuf> = VecDeque::new();
    let mut restamped = 0u64;
    let limit = if opts.count == 0 {
        u64::MAX
    } else {
        opts.count
    };
    while queued < limit && Instant::now() < until {
        if opts.rate_pps > 0 {
            let due = start + Duration::from_secs_f64(queued as f64 / opts.rate_pps as f64);
            let now = Instant::now();
            if due > now {
                // Reap while waiting so completions keep flowing.
                completed += tally.reap(net)?;
                if due - now > Duration::from_micros(50) {
                    std::thread::sleep(Duration::from_micros(20));
                }
                continue;
            }
        }
        completed += tally.reap(net)?;
        let room = net.tx_free_slots();
        if room == 0 {
            stalls += 1;
            continue;
        }
        let n = (batch as u64).min(limit - queued).min(room as u64) as usize;
        let now_ns = monotonic_ns();
        for (i, f) in frames.iter_mut().take(n).enumerate() {
            stamp_test_frame(f, seq + i as u64, now_ns);
        }
        let sent = if opts.zero_copy {
            zc.clear();
            for (i, f) in frames.iter().take(n).enumerate() {
                let mut b = match net.tx_buffer_reused(size) {
                    Ok(b) => b,
                    Err(NetError::Pool(tidepool::pool::PoolError::Exhausted { .. })) => break,
                    Err(e) => return Err(e),
                };
                if restamp(&mut b, f, seq + i as u64, now_ns)? {
                    restamped += 1;
                } else {
                    b.write_at(0, f)?;
                }
                zc.push_back(b);
            }
            let queued = net.send_buffers(&mut zc)?;
            zc.clear(); // unsent buffers go back to the pool
            queued
        } else {
            let refs: Vec<&[u8]> = frames.iter().take(n).map(|f| f.as_slice()).collect();
            net.send_batch(&refs)?
        };
        if sent < n {
            stalls += 1;
        }
        // Completions the send reaped belong to earlier submissions: pair them first.
        completed += tally.account(net);
        for _ in 0..sent {
            tally.pending.push_back(now_ns);
        }
        queued += sent as u64;
        seq += sent as u64;
    }
    let drain_until = Instant::now() + Duration::from_secs(2);
    while !tally.pending.is_empty() && Instant::now() < drain_until {
        completed += tally.reap(net)?;
    }
    let seconds = tally.last.duration_since(start).as_secs_f64().max(1e-9);
    Ok(TxReport {
        size,
        batch,
        zero_copy: opts.zero_copy,
        restamped,
        queued,
        completed,
        seconds,
        pps: completed as f64 / seconds,
        bits_per_second: completed as f64 * size as f64 * 8.0 / seconds,
        latency: Percentiles::from(&tally.hist),
        stalls,
    })
}

/// If `b` already holds a test frame with `template`'s addresses and length, rewrites only its
/// sequence number, timestamp and header check (what [`stamp_test_frame`] changes) and
/// returns true; otherwise leaves it alone and returns false.
fn restamp(b: &mut TxBuf, template: &[u8], seq: u64, ts: u64) -> Result<bool, NetError> {
    let mut head = [0u8; 40];
    b.read_at(0, &mut head)?;
    // Same addresses, ethertype, magic and length: the payload is the same pattern too,
    // because the pattern depends only on the length.
    if head[0..18] != template[0..18] || head[34..36] != template[34..36] {
        return Ok(false);
    }
    stamp_test_frame(&mut head, seq, ts);
    b.write_at(18, &head[18..40])?;
    Ok(true)
}

/// TX completions as `run_tx` counts them: submission times waiting for their completion,
/// the latency histogram, when the last completion was seen, and the driver's completion count
/// at the last look. Counted from the driver's own `tx_completed`: `send_batch` and
/// `send_buffers` reap too, so counting only what our `reap_tx` calls return would miss theirs
/// (and pair later completions with the wrong submissions).
struct TxTally {
    pending: VecDeque<u64>,
    hist: Histogram<u64>,
    last: Instant,
    seen: u64,
}

impl TxTally {
    fn new(net: &VirtioNet, start: Instant) -> TxTally {
        TxTally {
            pending: VecDeque::new(),
            hist: histogram(),
            last: start,
            seen: net.stats().tx_completed,
        }
    }

    /// Reaps TX completions, then accounts for every completion since the last look.
    fn reap(&mut self, net: &mut VirtioNet) -> Result<u64, NetError> {
        net.reap_tx()?;
        Ok(self.account(net))
    }

    /// Counts the completions the driver reaped since the last look (whoever reaped them),
    /// pairing each with the oldest submission time. Returns how many.
    fn account(&mut self, net: &VirtioNet) -> u64 {
        let total = net.stats().tx_completed;
        let n = total - self.seen;
        self.seen = total;
        if n > 0 {
            let now = monotonic_ns();
            self.last = Instant::now();
            for _ in 0..n {
                if let Some(t) = self.pending.pop_front() {
                    let _ = self.hist.record(now.saturating_sub(t).max(1));
                }
            }
        }
        n
    }
}

/// What to receive.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RxOptions {
    /// Give up this long after the start...
    pub duration: Duration,
    /// ...or stop after this many test frames (0 = no count limit).
    pub count: u64,
    /// Stop early after this long without any frame once at least one arrived.
    pub idle: Duration,
    /// Frames to take per poll.
    pub batch: usize,
}

/// What an RX run measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RxReport {
    /// All frames received.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Valid test frames.
    pub test_frames: u64,
    /// Test frames that failed verification.
    pub corrupt: u64,
    /// Test frames whose sequence number was lower than one seen before (reordered/duplicate).
    pub out_of_order: u64,
    /// Seconds between the first and the last frame.
    pub seconds: f64,
    /// Frames per second over that span.
    pub pps: f64,
    /// Bits per second over that span.
    pub bits_per_second: f64,
    /// One-way latency from test-frame timestamps (same-clock senders only).
    pub latency: Percentiles,
}

/// Receives per `opts`, calling `on_frame` for every frame (e.g. to answer ARP), and measures.
pub fn run_rx(
    net: &mut VirtioNet,
    opts: &RxOptions,
    mut on_frame: impl FnMut(&RxFrame),
) -> Result<RxReport, NetError> {
    let mut r = RxReport::default();
    let mut hist = histogram();
    let start = Instant::now();
    let (mut first, mut last) = (None::<Instant>, start);
    let mut highest: Option<u64> = None;
    let mut frames = Vec::with_capacity(opts.batch.max(1));
    let mut bytes = vec![0u8; MAX_FRAME];
    loop {
        let now = Instant::now();
        if now >= start + opts.duration
            || (opts.count > 0 && r.test_frames >= opts.count)
            || (first.is_some() && now - last > opts.idle)
        {
            break;
        }
        if net.recv_batch(&mut frames, opts.batch.max(1))? == 0 {
            continue;
        }
        let t = monotonic_ns();
        last = Instant::now();
        first.get_or_insert(last);
        for f in frames.drain(..) {
            r.frames += 1;
            r.bytes += f.len() as u64;
            on_frame(&f);
            let n = f.len();
            // The Ethernet header first: only test frames are read whole and verified.
            let head = n.min(14);
            let is_test = f.read_at(0, &mut bytes[..head]).is_ok()
                && head == 14
                && bytes[12..14] == TEST_ETHERTYPE.to_be_bytes();
            let read = if is_test {
                f.read_at(0, &mut bytes[..n])
            } else {
                Ok(())
            };
            // The driver posts the buffer again without re-zeroing it.
            net.recycle_rx(f);
            if !is_test || read.is_err() {
                continue;
            }
            match parse_test_frame(&bytes[..n]) {
                Ok(tf) => {
                    r.test_frames += 1;
                    if highest.is_some_and(|h| tf.seq <= h) {
                        r.out_of_order += 1;
                    }
                    highest = Some(highest.map_or(tf.seq, |h| h.max(tf.seq)));
                    if tf.timestamp_ns > 0 && tf.timestamp_ns <= t {
                        let _ = hist.record((t - tf.timestamp_ns).max(1));
                    }
                }
                Err(FrameError::Corrupt(_)) => r.corrupt += 1,
                Err(FrameError::NotTestFrame) => {}
            }
        }
    }
    let span = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    r.seconds = span;
    if span > 0.0 {
        r.pps = r.frames as f64 / span;
        r.bits_per_second = r.bytes as f64 * 8.0 / span;
    }
    r.latency = Percentiles::from(&hist);
    Ok(r)
}
