//! Traces: the requests a workload offers, and their CSV form for replaying your own.
//!
//! # CSV format
//! One request per line, comma separated, with a header line:
//!
//! ```text
//! time_us,size,direction,hold_us,may_wait[,device]
//! 0,4096,from_device,250,1
//! 130,65536,to_device,1800,1,0
//! ```
//!
//! - `time_us`: arrival time in microseconds from the start of the trace (any order; sorted on
//!   load).
//! - `size`: bytes to map (1 ..= 2 MiB).
//! - `direction`: `to_device`, `from_device` or `bidirectional` (`to`, `from`, `bidi` too).
//! - `hold_us`: how long the device holds the mapping once it is mapped (its service time).
//! - `may_wait`: `1`/`true` if the caller may sleep (`pool.map(..).await`), `0`/`false` if it
//!   must not (`pool.try_map(..)`: interrupt-like contexts, completion reapers).
//! - `device` (optional, default 0): which device the request is for.
//!
//! Lines starting with `#` are comments, except `#! device ID NAME QUEUE_DEPTH` lines, which
//! name a device and give its queue depth (`unlimited` or a number): requests beyond it wait
//! for a device slot before they map, as a block layer waits for a tag. The generator writes
//! these lines; a trace without them has devices of unlimited depth.

use std::fmt::Write as _;
use std::path::Path;

use tidepool::pool::Direction;

/// One request of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Arrival time, µs from the start of the trace.
    pub time_us: u64,
    /// Bytes to map.
    pub size: usize,
    /// Which way the data moves.
    pub direction: Direction,
    /// How long the device holds the mapping, µs.
    pub hold_us: u64,
    /// Whether the caller may wait for pool capacity.
    pub may_wait: bool,
    /// Index into [`Trace::devices`].
    pub device: usize,
}

/// A device of the model: a name and how many requests it holds at once.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceSpec {
    /// A short name for reports.
    pub name: String,
    /// Requests the device accepts at once; `None` for unlimited.
    pub queue_depth: Option<usize>,
}

/// A workload as a list of requests, sorted by arrival time, and the devices they go to.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    /// The devices; every request's `device` indexes this.
    pub devices: Vec<DeviceSpec>,
    /// The requests, by arrival time.
    pub requests: Vec<Request>,
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read or written.
    #[error("trace file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error(
        "trace line {line}: {why} (expected time_us,size,direction,hold_us,may_wait[,device])"
    )]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// The trace has no requests.
    #[error("the trace has no requests: add at least one line after the header")]
    Empty,
}

impl Trace {
    /// Makes a trace, sorting requests by arrival (stable: equal times keep their order) and
    /// adding unlimited devices for any index the requests use but `devices` lacks.
    pub fn new(mut devices: Vec<DeviceSpec>, mut requests: Vec<Request>) -> Trace {
        requests.sort_by_key(|r| r.time_us);
        let needed = requests.iter().map(|r| r.device + 1).max().unwrap_or(0);
        while devices.len() < needed {
            devices.push(DeviceSpec {
                name: format!("dev{}", devices.len()),
                queue_depth: None,
            });
        }
        Trace { devices, requests }
    }

    /// Arrival time of the last request, µs.
    pub fn span_us(&self) -> u64 {
        self.requests.last().map_or(0, |r| r.time_us)
    }

    /// Sum of request sizes, bytes.
    pub fn total_bytes(&self) -> u64 {
        self.requests.iter().map(|r| r.size as u64).sum()
    }

    /// The largest request, bytes.
    pub fn max_size(&self) -> usize {
        self.requests.iter().map(|r| r.size).max().unwrap_or(0)
    }

    /// The same trace with only `device`'s requests (its index kept), for "alone" runs.
    pub fn only_device(&self, device: usize) -> Trace {
        Trace {
            devices: self.devices.clone(),
            requests: self
                .requests
                .iter()
                .filter(|r| r.device == device)
                .cloned()
                .collect(),
        }
    }

    /// The trace in the CSV format of the module doc.
    pub fn to_csv(&self) -> String {
        let mut s = String::new();
        for (i, d) in self.devices.iter().enumerate() {
            let depth = d
                .queue_depth
                .map_or_else(|| "unlimited".to_string(), |q| q.to_string());
            let _ = writeln!(s, "#! device {i} {} {depth}", d.name);
        }
        s.push_str("time_us,size,direction,hold_us,may_wait,device\n");
        for r in &self.requests {
            let dir = match r.direction {
                Direction::ToDevice => "to_device",
                Direction::FromDevice => "from_device",
                Direction::Bidirectional => "bidirectional",
            };
            let _ = writeln!(
                s,
                "{},{},{dir},{},{},{}",
                r.time_us, r.size, r.hold_us, r.may_wait as u8, r.device
            );
        }
        s
    }

    /// Parses the CSV format of the module doc.
    pub fn from_csv(text: &str) -> Result<Trace, TraceError> {
        let mut devices: Vec<DeviceSpec> = Vec::new();
        let mut requests = Vec::new();
        let mut seen_header = false;
        for (n, raw) in text.lines().enumerate() {
            let line_no = n + 1;
            let line = raw.trim();
            let bad = |why: String| TraceError::Parse { line: line_no, why };
            if let Some(rest) = line.strip_prefix("#!") {
                let f: Vec<&str> = rest.split_whitespace().collect();
                if f.len() != 4 || f[0] != "device" {
                    return Err(bad(
                        "a `#!` line must be `#! device ID NAME QUEUE_DEPTH`".into()
                    ));
                }
                let id: usize = f[1]
                    .parse()
                    .map_err(|_| bad(format!("device id {:?}", f[1])))?;
                let queue_depth = match f[3] {
                    "unlimited" => None,
                    q => Some(q.parse::<usize>().ok().filter(|&q| q > 0).ok_or_else(|| {
                        bad(format!("queue depth {q:?}: a number > 0 or `unlimited`"))
                    })?),
                };
                if id > 1024 {
                    return Err(bad(format!("device id {id} is above 1024")));
                }
                while devices.len() <= id {
                    devices.push(DeviceSpec {
                        name: format!("dev{}", devices.len()),
                        queue_depth: None,
                    });
                }
                devices[id] = DeviceSpec {
                    name: f[2].to_string(),
                    queue_depth,
                };
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if !seen_header && line.starts_with("time_us") {
                seen_header = true;
                continue;
            }
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() != 5 && f.len() != 6 {
                return Err(bad(format!("{} fields", f.len())));
            }
            let num = |i: usize, what: &str| -> Result<u64, TraceError> {
                f[i].parse::<u64>()
                    .map_err(|_| bad(format!("{what} {:?} is not a whole number", f[i])))
            };
            let size = num(1, "size")? as usize;
            if size == 0 || size > 2 << 20 {
                return Err(bad(format!("size {size} must be 1 ..= 2097152")));
            }
            let direction = match f[2] {
                "to_device" | "to" => Direction::ToDevice,
                "from_device" | "from" => Direction::FromDevice,
                "bidirectional" | "bidi" => Direction::Bidirectional,
                d => return Err(bad(format!("direction {d:?}"))),
            };
            let may_wait = match f[4] {
                "1" | "true" => true,
                "0" | "false" => false,
                m => return Err(bad(format!("may_wait {m:?}: use 1/0 or true/false"))),
            };
            let device = if f.len() == 6 {
                let d = num(5, "device")? as usize;
                if d > 1024 {
                    return Err(bad(format!("device {d} is above 1024")));
                }
                d
            } else {
                0
            };
            requests.push(Request {
                time_us: num(0, "time_us")?,
                size,
                direction,
                hold_us: num(3, "hold_us")?,
                may_wait,
                device,
            });
        }
        if requests.is_empty() {
            return Err(TraceError::Empty);
        }
        Ok(Trace::new(devices, requests))
    }

    /// Reads a CSV trace file.
    pub fn load(path: &Path) -> Result<Trace, TraceError> {
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Trace::from_csv(&text)
    }

    /// Writes the trace as CSV.
    pub fn save(&self, path: &Path) -> Result<(), TraceError> {
        std::fs::write(path, self.to_csv()).map_err(|source| TraceError::Io {
            path: path.display().to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trips_and_sorts() {
        let text = "#! device 0 disk 4\n#! device 1 nic unlimited\n\
                    time_us,size,direction,hold_us,may_wait,device\n\
                    10,4096,to,5,1,1\n0,512,from_device,7,false\n";
        let t = Trace::from_csv(text).unwrap();
        assert_eq!(t.devices[0].queue_depth, Some(4));
        assert_eq!(t.devices[1].name, "nic");
        assert_eq!(t.requests[0].time_us, 0, "sorted by arrival");
        assert_eq!(t.requests[0].direction, Direction::FromDevice);
        assert!(!t.requests[0].may_wait);
        assert_eq!(t.requests[1].device, 1);
        assert_eq!(Trace::from_csv(&t.to_csv()).unwrap(), t);
    }

    #[test]
    fn bad_lines_name_the_line() {
        let e =
            Trace::from_csv("time_us,size,direction,hold_us,may_wait\n0,0,to,1,1\n").unwrap_err();
        assert!(matches!(e, TraceError::Parse { line: 2, .. }), "{e}");
        let e = Trace::from_csv("0,10,sideways,1,1\n").unwrap_err();
        assert!(e.to_string().contains("sideways"));
        assert!(matches!(
            Trace::from_csv("# nothing\n"),
            Err(TraceError::Empty)
        ));
    }
}
