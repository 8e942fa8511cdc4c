//! Fuzz target: the frontend's data path after a real handshake, against a backend whose
//! answers the fuzzer writes.
//!
//! The backend is the crate's scripted test backend (`tests/common/backend.rs`, included
//! below): it speaks vhost-user over a Unix socket, maps the pool's memfds, follows the
//! frontend's descriptor chains and executes them against an in-memory disk, then answers
//! each request as the next fuzzer-made [`Forge`] says: any used-entry id and length, any
//! status byte or none, `used.idx` advanced by 0 to 3, with or without a signal, held for
//! later (out of order), or the connection dropped. The frontend is the real one, unmodified:
//! `Connection::connect`, a `VhostUserView` pool and a `BlockDevice` with 4 to 16 descriptors
//! in interrupt or polling mode, so the whole path that reads backend-written memory runs:
//! `SplitRing::pop_used`, the queue's reaper and in-flight table, the status byte, the
//! failure and timeout paths.
//!
//! Contract checked on every input, beyond "no panic":
//! - every call ends (a 30 s guard; `io_timeout` is 100 ms) with `Ok` or a typed error
//!   (`Device`, `Unsupported`, `Backend`, `Disconnected`, `IoTimeout`);
//! - a read that succeeds returns exactly what the disk holds, as long as no write or range
//!   command has failed (after one, what landed is unknown);
//! - once a call failed with `Backend` or `Disconnected`, every later call fails with one of
//!   them (a failed device stays failed);
//! - after shutdown the pool has nothing in use, and the backend saw the connection close;
//! - the frontend never broke its side of the protocol (the backend's log of problems is
//!   empty: chains within the queue, addresses within the regions, well-formed requests).

#![no_main]

#[allow(dead_code, clippy::all)]
#[path = "../../tests/common/backend.rs"]
mod backend;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use backend::{Backend, Behaviour, Forge, Script};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Pool, PoolConfig};
use tidepool_vhost_user_blk::{
    BlockDevice, CompletionMode, ConnectOptions, Connection, DeviceOptions, Error, VhostUserView,
    ViewOptions,
};

/// Disk size: 512 sectors.
const DISK: u64 = 256 << 10;
/// Largest request the fuzzer makes, in sectors.
const MAX_SECTORS: u64 = 64;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// One call the frontend makes.
#[derive(Debug)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        seed: u8,
    },
    Read {
        sector: u64,
        sectors: u64,
    },
    /// Reads issued together (several requests outstanding: room for out-of-order answers).
    Reads(Vec<(u64, u64)>),
    Flush,
    Discard {
        sector: u64,
        sectors: u64,
    },
    WriteZeroes {
        sector: u64,
        sectors: u64,
    },
}

fn range(u: &mut Unstructured<'_>) -> Result<(u64, u64)> {
    let sectors = u.int_in_range(1..=MAX_SECTORS)?;
    let sector = u.int_in_range(0..=DISK / 512 - sectors)?;
    Ok((sector, sectors))
}

fn op(u: &mut Unstructured<'_>) -> Result<Op> {
    Ok(match u.int_in_range(0u8..=6)? {
        0 | 1 => {
            let (sector, sectors) = range(u)?;
            Op::Write {
                sector,
                sectors,
                seed: u.arbitrary()?,
            }
        }
        2 => {
            let (sector, sectors) = range(u)?;
            Op::Read { sector, sectors }
        }
        3 => Op::Reads(
            (0..u.int_in_range(2..=4)?)
                .map(|_| range(u))
                .collect::<Result<_>>()?,
        ),
        4 => Op::Flush,
        5 => {
            let (sector, sectors) = range(u)?;
            Op::Discard { sector, sectors }
        }
        _ => {
            let (sector, sectors) = range(u)?;
            Op::WriteZeroes { sector, sectors }
        }
    })
}

fn forge(u: &mut Unstructured<'_>) -> Result<Forge> {
    if u.ratio(1u8, 2)? {
        return Ok(Forge::honest());
    }
    let maybe = |u: &mut Unstructured<'_>, num: u8| -> Result<bool> { u.ratio(num, 8) };
    Ok(Forge {
        id: if maybe(u, 2)? {
            Some(if u.arbitrary()? {
                u.int_in_range(0..=40)?
            } else {
                u.arbitrary()?
            })
        } else {
            None
        },
        len: if maybe(u, 2)? {
            Some(u.arbitrary()?)
        } else {
            None
        },
        status: if maybe(u, 3)? {
            Some(u.arbitrary()?)
        } else {
            None
        },
        skip_status: maybe(u, 1)?,
        advance: if maybe(u, 7)? {
            1
        } else {
            u.int_in_range(0..=3)?
        },
        signal: maybe(u, 7)?,
        hold: maybe(u, 1)?,
        die: u.ratio(1u8, 32)?,
    })
}

/// The pattern a write of `seed` puts at byte `i` of its range.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A call's outcome, checked to be `Ok` or a typed error. Returns whether it failed the
/// device for good (`Backend` / `Disconnected`).
fn typed(r: &std::result::Result<(), Error>) -> bool {
    match r {
        Ok(()) | Err(Error::Device { .. } | Error::Unsupported(_) | Error::IoTimeout { .. }) => {
            false
        }
        Err(Error::Backend(_) | Error::Disconnected(_)) => true,
        Err(e) => panic!("an untyped or unexpected error: {e:?}"),
    }
}

/// Runs `ops` on a fresh device; returns the pool's bytes in use after shutdown.
async fn drive(
    socket: std::path::PathBuf,
    queue_size: u16,
    mode: CompletionMode,
    ops: &[Op],
) -> u64 {
    let conn = tokio::task::spawn_blocking(move || {
        Connection::connect(&socket, &ConnectOptions::default())
    })
    .await
    .expect("connect thread")
    .expect("the handshake with the scripted backend works");
    let view = Arc::new(VhostUserView::new(conn.clone(), ViewOptions::new()));
    let cfg = PoolConfig {
        memory: MemoryConfig {
            page_size: PageSize::Small4K,
            allow_small_pages: true,
        },
        chunk_bytes: 256 << 10,
        prefill_bytes: 256 << 10,
        max_bytes: 1 << 20,
        max_buffer: 64 << 10,
        low_watermark: 0,
        high_watermark: 256 << 10,
        reserve_bytes: 0,
        ..PoolConfig::default()
    };
    let pool = tokio::task::spawn_blocking(move || Pool::new(view, cfg))
        .await
        .expect("pool thread")
        .expect("pool");
    let opts = DeviceOptions {
        queue_size,
        completion: mode,
        io_timeout: Duration::from_millis(100),
        ..DeviceOptions::default()
    };
    let dev = Arc::new(
        BlockDevice::start(conn, pool.clone(), opts)
            .await
            .expect("start with an honest config"),
    );
    let mut disk = vec![0u8; DISK as usize];
    let mut trusted = true;
    let mut failed = false;
    let at =
        |sector: u64, sectors: u64| (sector * 512) as usize..((sector + sectors) * 512) as usize;
    for op in ops {
        let mut results = Vec::new();
        match *op {
            Op::Write {
                sector,
                sectors,
                seed,
            } => {
                let data = pattern(seed, (sectors * 512) as usize);
                let r = dev.write_at(sector * 512, &data).await;
                match r {
                    Ok(()) => disk[at(sector, sectors)].copy_from_slice(&data),
                    Err(_) => trusted = false,
                }
                results.push(r);
            }
            Op::Read { sector, sectors } => {
                let mut buf = vec![0xEEu8; (sectors * 512) as usize];
                let r = dev.read_at(sector * 512, &mut buf).await;
                if r.is_ok() && trusted {
                    assert!(
                        buf == disk[at(sector, sectors)],
                        "a read returned wrong data"
                    );
                }
                results.push(r);
            }
            Op::Reads(ref v) => {
                let hs: Vec<_> = v
                    .iter()
                    .map(|&(sector, sectors)| {
                        let dev = dev.clone();
                        tokio::spawn(async move {
                            let mut buf = vec![0xEEu8; (sectors * 512) as usize];
                            let r = dev.read_at(sector * 512, &mut buf).await;
                            (r, buf)
                        })
                    })
                    .collect();
                for (h, &(sector, sectors)) in hs.into_iter().zip(v) {
                    let (r, buf) = h.await.expect("a read task panicked");
                    if r.is_ok() && trusted {
                        assert!(
                            buf == disk[at(sector, sectors)],
                            "a concurrent read returned wrong data"
                        );
                    }
                    results.push(r);
                }
            }
            Op::Flush => results.push(dev.flush().await),
            Op::Discard { sector, sectors } | Op::WriteZeroes { sector, sectors } => {
                let r = if matches!(op, Op::Discard { .. }) {
                    dev.discard(sector * 512, sectors * 512).await
                } else {
                    dev.write_zeroes(sector * 512, sectors * 512, false).await
                };
                // The scripted backend zeroes both.
                match r {
                    Ok(()) => disk[at(sector, sectors)].fill(0),
                    Err(_) => trusted = false,
                }
                results.push(r);
            }
        }
        let was_failed = failed;
        for r in &results {
            failed |= typed(r);
            if was_failed {
                assert!(
                    matches!(r, Err(Error::Backend(_) | Error::Disconnected(_))),
                    "a failed device answered {r:?}"
                );
            }
        }
    }
    Arc::try_unwrap(dev)
        .expect("no task holds the device")
        .shutdown()
        .await;
    pool.stats().in_use_bytes
}

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let queue_size = 1u16 << u.int_in_range(2u8..=4)?;
    let mode = if u.arbitrary()? {
        CompletionMode::Poll
    } else {
        CompletionMode::Interrupt
    };
    let forged = (0..u.int_in_range(0..=12)?)
        .map(|_| forge(&mut u))
        .collect::<Result<Vec<_>>>()?;
    let ops = (0..u.int_in_range(1..=10)?)
        .map(|_| op(&mut u))
        .collect::<Result<Vec<_>>>()?;
    let mut script = Script::honest(DISK).behaving(Behaviour::Forged);
    script.forged = forged;
    static RUN: AtomicU64 = AtomicU64::new(0);
    let b = Backend::start(
        &format!("fuzz-{}", RUN.fetch_add(1, Ordering::Relaxed)),
        script,
    );
    let in_use = runtime()
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(30),
                drive(b.socket.clone(), queue_size, mode, &ops),
            )
            .await
        })
        .expect("the frontend hung");
    assert_eq!(in_use, 0, "the pool ends with bytes in use");
    let log = b.finish();
    assert!(
        log.problems.is_empty(),
        "the frontend broke the protocol: {:?}",
        log.problems
    );
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
