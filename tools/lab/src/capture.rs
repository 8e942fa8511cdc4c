//! Converting a captured block I/O trace into a lab [`Trace`].
//!
//! Three text formats are read, detected line by line:
//! - **ftrace** (`/sys/kernel/tracing/trace_pipe` with `events/block/block_rq_issue` and
//!   `block_rq_complete` enabled):
//!   `kworker/0:0H-10 [000] ..... 35991.139855: block_rq_issue: 254,0 DS 4096 () 198985904 + 8 be,0,4 [kworker/0:0H]`
//! - **perf script** (`perf record -e block:block_rq_issue -e block:block_rq_complete -a`):
//!   the same after a `block:block_rq_issue:` token;
//! - **blkparse** (blktrace's default output): `254,0 1 7 0.000123 412 D W 2048 + 8 [jbd2]`,
//!   with action `D` (issued to the driver) and `C` (completed).
//!
//! An issue is paired with the next completion of the same device and start sector. Each pair
//! becomes one request: arrival = the issue time (from the first issue), `hold_us` = completion
//! − issue (the device's service time: how long a bounce buffer would stay mapped), size = the
//! request's bytes (its sectors × 512 when the format has no byte count), direction = from the
//! device for reads, to it for writes; `may_wait` is true (the block layer maps from process
//! or kworker context). Requests that move no data (flush, discard, write-zeroes: `F`, `D`,
//! `N`, or 0 bytes) are skipped; requests above 2 MiB are split into 2 MiB pieces with the same
//! timing; each block device becomes one trace device. Unparsable lines, issues never
//! completed and completions never issued are counted, not fatal.

use std::collections::{BTreeMap, HashMap, VecDeque};

use tidepool::pool::Direction;

use crate::trace::{DeviceSpec, Request, Trace};

/// The largest request the trace format takes.
const MAX_REQUEST: usize = 2 << 20;

/// What the conversion found besides the trace.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConvertStats {
    /// Lines read.
    pub lines: u64,
    /// Issue events.
    pub issues: u64,
    /// Completion events.
    pub completions: u64,
    /// Issue/completion pairs that moved data (before splitting).
    pub paired: u64,
    /// Pairs skipped because they move no data (flush, discard, write-zeroes).
    pub no_data: u64,
    /// Issues with no completion in the capture (the capture ended, or lost events).
    pub unmatched_issues: u64,
    /// Completions with no issue in the capture (issued before it started).
    pub unmatched_completions: u64,
    /// Lines that were neither an event nor blank/comment.
    pub skipped_lines: u64,
}

/// Why a capture could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// No issue/completion pair that moves data was found.
    #[error(
        "no block request with data was found ({0:?}); capture block_rq_issue and \
         block_rq_complete (ftrace or perf script) or blkparse D and C actions"
    )]
    Empty(ConvertStats),
}

/// One parsed event.
#[derive(Debug, PartialEq)]
struct Event {
    issue: bool,
    time_us: u64,
    dev: String,
    rwbs: String,
    sector: u64,
    bytes: u64,
}

/// Seconds with a fractional part ("35991.139855" or "35991.139855:") to µs.
fn seconds_to_us(s: &str) -> Option<u64> {
    let s = s.trim_end_matches(':');
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let whole: u64 = whole.parse().ok()?;
    let mut frac6 = String::from(frac);
    if !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    frac6.truncate(6);
    while frac6.len() < 6 {
        frac6.push('0');
    }
    Some(whole * 1_000_000 + frac6.parse::<u64>().ok()?)
}

/// Parses one line in any of the module doc's formats; `None` for anything else.
fn parse_line(line: &str) -> Option<Event> {
    let t: Vec<&str> = line.split_whitespace().collect();
    // ftrace / perf script: find the event token.
    if let Some(at) = t.iter().position(|w| {
        matches!(
            w.trim_start_matches("block:"),
            "block_rq_issue:" | "block_rq_complete:"
        )
    }) {
        let issue = t[at].ends_with("block_rq_issue:");
        let time_us = seconds_to_us(t.get(at.checked_sub(1)?)?)?;
        let rest = &t[at + 1..];
        let plus = rest.iter().position(|w| *w == "+")?;
        let sector: u64 = rest.get(plus.checked_sub(1)?)?.parse().ok()?;
        let sectors: u64 = rest.get(plus + 1)?.parse().ok()?;
        let bytes = if issue {
            // dev rwbs bytes (cmd) sector + n
            rest.get(2)
                .and_then(|b| b.parse().ok())
                .unwrap_or(sectors * 512)
        } else {
            sectors * 512
        };
        return Some(Event {
            issue,
            time_us,
            dev: rest.first()?.to_string(),
            rwbs: rest.get(1)?.to_string(),
            sector,
            bytes,
        });
    }
    // blkparse: dev cpu seq time pid action rwbs sector + n [proc]
    if t.len() >= 10 && t[0].contains(',') && t[8] == "+" {
        let issue = match t[5] {
            "D" => true,
            "C" => false,
            _ => return None,
        };
        let sectors: u64 = t[9].parse().ok()?;
        return Some(Event {
            issue,
            time_us: seconds_to_us(t[3])?,
            dev: t[0].to_string(),
            rwbs: t[6].to_string(),
            sector: t[7].parse().ok()?,
            bytes: sectors * 512,
        });
    }
    None
}

/// An issue waiting for its completion: (time µs, rwbs, bytes), keyed by (device, sector).
type Issued = (u64, String, u64);

/// Converts a capture (see the module doc) into a trace, and what was found.
pub fn convert(text: &str) -> Result<(Trace, ConvertStats), ConvertError> {
    let mut stats = ConvertStats::default();
    let mut open: HashMap<(String, u64), VecDeque<Issued>> = HashMap::new();
    // (issue time, dev, rwbs, bytes, hold)
    let mut pairs: Vec<(u64, String, String, u64, u64)> = Vec::new();
    for line in text.lines() {
        stats.lines += 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let Some(ev) = parse_line(trimmed) else {
            stats.skipped_lines += 1;
            continue;
        };
        let key = (ev.dev.clone(), ev.sector);
        if ev.issue {
            stats.issues += 1;
            open.entry(key)
                .or_default()
                .push_back((ev.time_us, ev.rwbs, ev.bytes));
        } else {
            stats.completions += 1;
            match open.get_mut(&key).and_then(VecDeque::pop_front) {
                Some((at, rwbs, bytes)) => {
                    pairs.push((at, ev.dev, rwbs, bytes, ev.time_us.saturating_sub(at)))
                }
                None => stats.unmatched_completions += 1,
            }
        }
    }
    stats.unmatched_issues = open.values().map(|q| q.len() as u64).sum();
    pairs.sort_by_key(|p| p.0);
    let mut devices: BTreeMap<String, usize> = BTreeMap::new();
    for p in &pairs {
        let n = devices.len();
        devices.entry(p.1.clone()).or_insert(n);
    }
    let t0 = pairs.first().map_or(0, |p| p.0);
    let mut requests = Vec::new();
    for (at, dev, rwbs, bytes, hold) in pairs {
        let direction = match rwbs.chars().next() {
            Some('R') => Direction::FromDevice,
            Some('W') => Direction::ToDevice,
            _ => Direction::Bidirectional,
        };
        let moves_data = matches!(rwbs.chars().next(), Some('R' | 'W')) && bytes > 0;
        if !moves_data {
            stats.no_data += 1;
            continue;
        }
        stats.paired += 1;
        let mut left = bytes as usize;
        while left > 0 {
            let size = left.min(MAX_REQUEST);
            requests.push(Request {
                time_us: at - t0,
                size,
                direction,
                hold_us: hold.max(1),
                may_wait: true,
                device: devices[&dev],
            });
            left -= size;
        }
    }
    if requests.is_empty() {
        return Err(ConvertError::Empty(stats));
    }
    let mut specs: Vec<(usize, String)> = devices.into_iter().map(|(d, i)| (i, d)).collect();
    specs.sort();
    let specs = specs
        .into_iter()
        .map(|(_, d)| DeviceSpec {
            name: format!("blk{}", d.replace(',', ":")),
            queue_depth: None,
        })
        .collect();
    Ok((Trace::new(specs, requests), stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ftrace_perf_and_blkparse_lines_parse() {
        let f = parse_line("kworker/0:0H-10 [000] ..... 35991.139855: block_rq_issue: 254,0 W 8192 () 198985904 + 16 be,0,4 [kworker/0:0H]").unwrap();
        assert_eq!(
            f,
            Event {
                issue: true,
                time_us: 35_991_139_855,
                dev: "254,0".into(),
                rwbs: "W".into(),
                sector: 198_985_904,
                bytes: 8192
            }
        );
        let c = parse_line("<idle>-0 [001] ..s.. 35991.141993: block_rq_complete: 254,0 W () 198985904 + 16 be,0,4 [0]").unwrap();
        assert!(!c.issue && c.bytes == 8192 && c.time_us == 35_991_141_993);
        let p = parse_line("rustc 27533 [001] 35991.141993: block:block_rq_issue: 8,0 RA 4096 () 10 + 8 none,0,0 [rustc]").unwrap();
        assert!(p.issue && p.dev == "8,0" && p.rwbs == "RA");
        let b =
            parse_line("  8,0    3        1     0.000000000   697  D  WS 223490 + 8 [kjournald]")
                .unwrap();
        assert!(b.issue && b.sector == 223_490 && b.bytes == 4096 && b.time_us == 0);
        assert!(parse_line("CPU0 (sda): Reads Queued: 0").is_none());
        assert!(parse_line("8,0 3 2 0.1 697 Q WS 223490 + 8 [kjournald]").is_none());
        assert_eq!(seconds_to_us("1.5"), Some(1_500_000));
        assert_eq!(seconds_to_us("2.000000123"), Some(2_000_000));
    }

    #[test]
    fn pairs_issues_with_completions_and_skips_what_moves_no_data() {
        let text = "\
# tracer: nop
a-1 [000] ..... 10.000000: block_rq_issue: 254,0 W 4096 () 100 + 8 be,0,4 [a]
a-1 [000] ..... 10.000010: block_rq_issue: 254,0 R 4194304 () 200 + 8192 be,0,4 [a]
a-1 [000] ..... 10.000020: block_rq_issue: 254,0 FF 0 () 0 + 0 be,0,4 [a]
b-2 [001] ..... 10.000500: block_rq_complete: 254,0 W () 100 + 8 be,0,4 [0]
b-2 [001] ..... 10.000600: block_rq_complete: 254,0 FF () 0 + 0 be,0,4 [0]
b-2 [001] ..... 10.002010: block_rq_complete: 254,0 R () 200 + 8192 be,0,4 [0]
b-2 [001] ..... 10.003000: block_rq_complete: 254,0 R () 999 + 8 be,0,4 [0]
a-1 [000] ..... 10.004000: block_rq_issue: 254,0 W 4096 () 300 + 8 be,0,4 [a]
garbage
";
        let (t, s) = convert(text).unwrap();
        assert_eq!((s.issues, s.completions, s.paired, s.no_data), (4, 4, 2, 1));
        assert_eq!(
            (s.unmatched_issues, s.unmatched_completions, s.skipped_lines),
            (1, 1, 1)
        );
        // The 4 MiB read is split into two 2 MiB pieces with the same timing.
        assert_eq!(t.requests.len(), 3);
        assert_eq!(t.requests[0].direction, Direction::ToDevice);
        assert_eq!((t.requests[0].time_us, t.requests[0].hold_us), (0, 500));
        assert!(t.requests[1..]
            .iter()
            .all(|r| r.size == 2 << 20 && r.hold_us == 2000 && r.time_us == 10));
        assert_eq!(t.devices[0].name, "blk254:0");
        assert!(matches!(convert("nothing\n"), Err(ConvertError::Empty(_))));
    }
}
