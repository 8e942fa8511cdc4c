//! `tpnet`: generate or receive Ethernet frames with the Tidepool virtio-net driver and print
//! frames per second, bandwidth and latency percentiles (text or JSON).
//!
//! ```text
//! tpnet tx --bdf 0000:00:10.0 --dst 52:54:00:12:34:20 --size 64 --batch 32 --rate 0 --duration 5
//! tpnet tx --bdf 0000:00:10.0 --dst 52:54:00:12:34:20 --size 1500 --zero-copy --json
//! tpnet rx --bdf 0000:00:10.0 --duration 10 --count 100000 --json
//! ```
//! `tx` sends sequenced, checksummed test frames (see `tidepool_virtio_net::frame`) and measures
//! device-completed pps and submit → completion latency; `rx` counts received frames, verifies
//! test frames (corrupt / out-of-order counts) and, for same-host senders, one-way latency.
//! Exit status: 0 success, 1 a run error, 2 bad arguments.

use std::process::ExitCode;
use std::time::Duration;

use tidepool_virtio_net::bench::{run_rx, run_tx, RxOptions, TxOptions};
use tidepool_virtio_net::{NetConfig, VirtioNet};

const USAGE: &str = "usage: tpnet tx|rx --bdf BDF [--dst MAC] [--size BYTES] [--batch N] \
[--rate PPS] [--duration SECS] [--count N] [--zero-copy] [--json]";

/// Parsed command line.
#[derive(Debug)]
struct Args {
    mode: String,
    bdf: String,
    dst: [u8; 6],
    size: usize,
    batch: usize,
    rate: u64,
    duration: f64,
    count: u64,
    json: bool,
    zero_copy: bool,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// Parses the command line; Err is a message for the user.
fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut a = Args {
        mode: argv.first().cloned().ok_or(USAGE)?,
        bdf: String::new(),
        dst: [0xff; 6],
        size: 64,
        batch: 32,
        rate: 0,
        duration: 5.0,
        count: 0,
        json: false,
        zero_copy: false,
    };
    if a.mode != "tx" && a.mode != "rx" {
        return Err(format!("unknown mode {:?}; {USAGE}", a.mode));
    }
    let mut it = argv[1..].iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        let num = |name: &str, v: String| {
            v.parse::<f64>()
                .map_err(|_| format!("{name}: not a number: {v}"))
        };
        match flag.as_str() {
            "--bdf" => a.bdf = value("--bdf")?,
            "--dst" => {
                let v = value("--dst")?;
                a.dst = parse_mac(&v).ok_or(format!("--dst: not a MAC address: {v}"))?;
            }
            "--size" => a.size = num("--size", value("--size")?)? as usize,
            "--batch" => a.batch = num("--batch", value("--batch")?)? as usize,
            "--rate" => a.rate = num("--rate", value("--rate")?)? as u64,
            "--duration" => a.duration = num("--duration", value("--duration")?)?,
            "--count" => a.count = num("--count", value("--count")?)? as u64,
            "--json" => a.json = true,
            "--zero-copy" => a.zero_copy = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown option {other}; {USAGE}")),
        }
    }
    if a.bdf.is_empty() {
        return Err(format!("--bdf is required; {USAGE}"));
    }
    if !(60..=1514).contains(&a.size) {
        return Err(format!("--size {} must be 60..=1514 (MTU 1500)", a.size));
    }
    if !(a.duration > 0.0 && a.duration < 86_400.0) {
        return Err("--duration must be between 0 and 86400 seconds".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("tpnet: {msg}");
            return ExitCode::from(2);
        }
    };
    let cfg = NetConfig {
        interrupts: false,
        ..NetConfig::default()
    };
    let mut net = match VirtioNet::open(&args.bdf, cfg) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("tpnet: cannot open {}: {e}", args.bdf);
            return ExitCode::FAILURE;
        }
    };
    let duration = Duration::from_secs_f64(args.duration);
    let result =
        if args.mode == "tx" {
            let opts = TxOptions {
                dst: args.dst,
                size: args.size,
                batch: args.batch,
                rate_pps: args.rate,
                duration,
                count: args.count,
                first_seq: 0,
                zero_copy: args.zero_copy,
            };
            run_tx(&mut net, &opts).map(|r| {
                if args.json {
                    r.to_json()
                } else {
                    format!(
                    "tx {} B x{}: {} completed of {} queued in {:.2} s: {:.0} pps, {:.1} Mbit/s; \
                     latency p50 {} ns p99 {} ns p99.9 {} ns max {} ns",
                    r.size, r.batch, r.completed, r.queued, r.seconds, r.pps,
                    r.bits_per_second / 1e6, r.latency.p50_ns, r.latency.p99_ns,
                    r.latency.p999_ns, r.latency.max_ns
                )
                }
            })
        } else {
            let opts = RxOptions {
                duration,
                count: args.count,
                idle: duration,
                batch: args.batch,
            };
            run_rx(&mut net, &opts, |_| {}).map(|r| {
                if args.json {
                    r.to_json()
                } else {
                    format!(
                    "rx: {} frames ({} test, {} corrupt, {} out of order) in {:.2} s: {:.0} pps, \
                     {:.1} Mbit/s; latency p50 {} ns p99 {} ns",
                    r.frames, r.test_frames, r.corrupt, r.out_of_order, r.seconds, r.pps,
                    r.bits_per_second / 1e6, r.latency.p50_ns, r.latency.p99_ns
                )
                }
            })
        };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tpnet: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_and_rejects() {
        let a = parse_args(&args(
            "tx --bdf 0000:00:10.0 --dst 52:54:00:12:34:20 --size 1500 --json",
        ))
        .unwrap();
        assert_eq!(
            (a.size, a.json, a.dst),
            (1500, true, [0x52, 0x54, 0, 0x12, 0x34, 0x20])
        );
        assert!(parse_args(&args("tx --bdf x --size 1515"))
            .unwrap_err()
            .contains("MTU"));
        assert!(parse_args(&args("tx --size 64"))
            .unwrap_err()
            .contains("--bdf"));
        assert!(parse_args(&args("fly --bdf x")).is_err());
        assert!(parse_args(&args("rx --bdf x --dst 1:2:3")).is_err());
    }
}
