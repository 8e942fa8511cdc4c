//! Against the scripted backend of `common::backend` (the real vhost-user protocol over a Unix
//! socket, the frontend's memory mapped from its memfds): configurations that lie or make I/O
//! impossible, and a backend that corrupts the used ring, completes out of order, never
//! completes, or dies with requests in flight.
//!
//! Every test is bounded by [`GUARD`] (a hang fails it), checks the error's type and text, and
//! ends by checking that the pool has nothing in use once the device is gone.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::backend::{Backend, Behaviour, Forge, Log, Script};
use common::*;
use tidepool::pool::{Pool, PoolConfig};
use tidepool_vhost_user_blk::protocol::{blk, features};
use tidepool_vhost_user_blk::*;

const MIB: u64 = 1 << 20;

/// A test that takes longer than this hung.
const GUARD: Duration = Duration::from_secs(20);

/// Runs `f`, failing the test if it takes longer than [`GUARD`].
async fn guarded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .expect("the test hung (guard timeout)")
}

/// How a test lets go of its device.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum End {
    Shutdown,
    Drop,
}

/// 2 MiB chunks, one prefilled, capped at 8 MiB.
fn pool_cfg() -> PoolConfig {
    pool_config(2 << 20, 2 << 20, 8 << 20)
}

/// Shuts the device down (or, with `Drop`, drops it), then checks that the pool comes back to
/// nothing in use (at once after `shutdown`; after a plain drop the aborted reapers release
/// the rings when the runtime drops them, so within a second) and that the backend saw the
/// connection close; returns the backend's log.
async fn finish(dev: Option<BlockDevice>, how: End, pool: Pool, backend: Backend) -> Log {
    match (dev, how) {
        (Some(d), End::Shutdown) => d.shutdown().await,
        (d, _) => drop(d),
    }
    let t = Instant::now();
    while pool.stats().in_use_bytes != 0 && how == End::Drop {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{} B still in use a second after the drop",
            pool.stats().in_use_bytes
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        pool.stats().in_use_bytes,
        0,
        "the pool ends with nothing in use"
    );
    drop(pool);
    tokio::task::spawn_blocking(move || backend.finish())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_scripted_backend_serves_every_command() {
    guarded(async {
        let b = Backend::start("honest", Script::honest(4 * MIB));
        let (dev, pool) = try_open(&b.socket, pool_cfg(), DeviceOptions::default()).await;
        let dev = dev.expect("start");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 13 + 1) as u8).collect();
        let data = &data[..(data.len() / 512) * 512];
        dev.write_at(8192, data).await.unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read_at(8192, &mut back).await.unwrap();
        assert_eq!(back, data);
        dev.flush().await.unwrap();
        dev.write_zeroes(8192, 4096, true).await.unwrap();
        dev.discard(16384, 4096).await.unwrap();
        dev.read_at(8192, &mut back).await.unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0), "zeroed");
        assert_eq!(&back[4096..8192], &data[4096..8192]);
        assert_eq!(&back[12288..], &data[12288..]);
        let log = finish(Some(dev), End::Shutdown, pool, b).await;
        assert!(log.problems.is_empty(), "{:?}", log.problems);
        // size_max 0 (no limit): one segment per write/read.
        let ops: Vec<u32> = log.requests.iter().map(|r| r.op).collect();
        assert_eq!(
            ops,
            [
                blk::T_OUT,
                blk::T_IN,
                blk::T_FLUSH,
                blk::T_WRITE_ZEROES,
                blk::T_DISCARD,
                blk::T_IN
            ]
        );
        assert_eq!(
            (log.requests[3].sector, log.requests[3].range_sectors),
            (16, 8)
        );
        assert_eq!(
            (log.requests[4].sector, log.requests[4].range_sectors),
            (32, 8)
        );
        assert_eq!(log.requests[0].data, [data.len() as u32]);
        assert_eq!(log.requests[1].data, [data.len() as u32]);
    })
    .await
}

/// A backend that puts values in `size_max`, `seg_max` and `blk_size` without offering their
/// feature bits: the fields mean nothing (virtio 1.x §5.2.4) and must not shape requests.
/// (They once gave a maximum request size of 0 and a panic in `chunks(0)`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_fields_without_their_feature_bits_are_ignored() {
    guarded(async {
        let mut script = Script::honest(4 * MIB);
        script.features &=
            !(features::BLK_SIZE_MAX | features::BLK_SEG_MAX | features::BLK_BLK_SIZE);
        script.config.size_max = 1;
        script.config.seg_max = 1;
        script.config.blk_size = 4096;
        let b = Backend::start("nobits", script);
        let (dev, pool) = try_open(&b.socket, pool_cfg(), DeviceOptions::default()).await;
        let dev = dev.expect("start");
        assert_eq!(
            dev.block_size(),
            512,
            "blk_size without VIRTIO_BLK_F_BLK_SIZE"
        );
        assert_eq!(
            dev.max_io_bytes(),
            2 << 20,
            "only the pool's largest buffer limits"
        );
        let data = vec![0x3Cu8; 64 << 10];
        dev.write_at(512, &data).await.unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read_at(512, &mut back).await.unwrap();
        assert_eq!(back, data);
        let log = finish(Some(dev), End::Shutdown, pool, b).await;
        assert!(log.problems.is_empty(), "{:?}", log.problems);
        assert_eq!(log.requests.len(), 2);
        for r in &log.requests {
            assert_eq!(r.data, [64 << 10], "one segment: no size_max applies");
        }
    })
    .await
}

/// A backend config (and queue size) under which no request can be built, and words its
/// error must contain.
struct Unusable {
    name: &'static str,
    queue_size: u16,
    size_max: u32,
    seg_max: u32,
    blk_size: u32,
    words: &'static [&'static str],
}

/// Configurations under which no request can be built are refused by `start` with
/// `Error::Config` saying so, before any ring is set up; nothing stays allocated. (They once
/// started, then panicked in `read_at`, or hung in `discard` waiting for more descriptors
/// than the queue has.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configs_that_make_io_impossible_are_refused_at_start() {
    guarded(async {
        let case = |name, queue_size, size_max, seg_max, blk_size, words| Unusable {
            name,
            queue_size,
            size_max,
            seg_max,
            blk_size,
            words,
        };
        let cases = [
            case(
                "one-byte-segments",
                256,
                1,
                126,
                512,
                &["size_max 1;", "126 B", "allow no block"],
            ),
            case(
                "tiny-segments",
                256,
                100,
                4,
                512,
                &["size_max 100", "seg_max 4", "400 B"],
            ),
            // 16-byte discard segments in 4-byte descriptors: 6 descriptors, queue of 4.
            case(
                "discard-chain",
                4,
                4,
                200,
                512,
                &[
                    "size_max 4",
                    "queue_size 4",
                    "8 B",
                    "queue_size of at least 256",
                ],
            ),
            case(
                "big-blocks",
                256,
                1024,
                2,
                4096,
                &["2048 B", "4096 B block", "allow no block"],
            ),
            case("odd-blocks", 256, 64 << 10, 126, 1000, &["blk_size 1000"]),
            case("zero-blocks", 256, 0, 126, 0, &["blk_size 0"]),
        ];
        for Unusable {
            name,
            queue_size,
            size_max,
            seg_max,
            blk_size,
            words,
        } in cases
        {
            let mut script = Script::honest(4 * MIB);
            script.config.size_max = size_max;
            script.config.seg_max = seg_max;
            script.config.blk_size = blk_size;
            let b = Backend::start(name, script);
            let opts = DeviceOptions {
                queue_size,
                io_timeout: Duration::from_millis(500),
                ..DeviceOptions::default()
            };
            let (dev, pool) = try_open(&b.socket, pool_cfg(), opts).await;
            let e = match dev {
                Ok(dev) => {
                    // What used to happen: try I/O, bounded, so a hang fails the test too.
                    let mut s = [0u8; 512];
                    let r = tokio::time::timeout(Duration::from_secs(2), async {
                        (dev.read_at(0, &mut s).await, dev.discard(0, 512).await)
                    })
                    .await;
                    panic!("{name}: start accepted an unusable config; I/O then gave {r:?}");
                }
                Err(e) => e,
            };
            assert!(matches!(e, Error::Config(_)), "{name}: {e:?}");
            let text = e.to_string();
            assert!(
                text.starts_with(
                    "bad configuration: the backend's configuration makes I/O impossible: "
                ),
                "{text}"
            );
            for w in words {
                assert!(text.contains(w), "{name}: {text:?} lacks {w:?}");
            }
            eprintln!("{name}: {text}");
            let log = finish(None, End::Drop, pool, b).await;
            assert!(
                !log.messages.contains(&protocol::Request::SetVringNum),
                "{name}: refused before any ring was set up"
            );
        }
    })
    .await
}

/// Small segments and a small queue that still allow one block are served by splitting:
/// every chain fits the queue and every segment the negotiated limits. A `seg_max` of 0 is
/// taken as one segment; a `size_max` of 0 (what `qemu-storage-daemon` serves) as no limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_segments_and_queues_are_served_by_splitting() {
    guarded(async {
        // (queue size, size_max, seg_max, expected bytes per request, data segments each)
        for (queue_size, size_max, seg_max, per_request, segs) in [
            (4u16, 256u32, 126u32, 512usize, 2usize),
            (256, 4096, 0, 4096, 1),
            (4, 0, 1, 2 << 20, 1),
        ] {
            let mut script = Script::honest(4 * MIB);
            script.config.size_max = size_max;
            script.config.seg_max = seg_max;
            let b = Backend::start(&format!("split-{queue_size}-{size_max}"), script);
            let opts = DeviceOptions {
                queue_size,
                ..DeviceOptions::default()
            };
            let (dev, pool) = try_open(&b.socket, pool_cfg(), opts).await;
            let dev = dev.expect("start");
            assert_eq!(dev.max_io_bytes(), per_request);
            let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
            dev.write_at(4096, &data).await.unwrap();
            let mut back = vec![0u8; data.len()];
            dev.read_at(4096, &mut back).await.unwrap();
            assert_eq!(back, data);
            dev.discard(0, 4096).await.unwrap();
            let log = finish(Some(dev), End::Shutdown, pool, b).await;
            assert!(log.problems.is_empty(), "{:?}", log.problems);
            let n = 2 * data.len().div_ceil(per_request) + 1;
            assert_eq!(log.requests.len(), n);
            for r in &log.requests[..n - 1] {
                assert_eq!(r.data.len(), segs);
                assert!(r.chain <= queue_size as usize);
                assert_eq!(
                    r.data.iter().sum::<u32>() as usize,
                    per_request.min(data.len())
                );
            }
            assert_eq!(log.requests[n - 1].range_sectors, 8);
        }
    })
    .await
}

/// A backend that never completes: the first request times out and keeps its descriptors;
/// the second cannot get descriptors from a queue of 4, and that wait is bounded by
/// `io_timeout` too (it once waited forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_wait_is_bounded_by_io_timeout() {
    guarded(async {
        let b = Backend::start("nodesc", Script::honest(4 * MIB).behaving(Behaviour::Mute));
        let io_timeout = Duration::from_millis(300);
        let opts = DeviceOptions {
            queue_size: 4,
            io_timeout,
            ..DeviceOptions::default()
        };
        let (dev, pool) = try_open(&b.socket, pool_cfg(), opts).await;
        let dev = dev.expect("start");
        let mut s = [0u8; 512];
        for i in 0..2 {
            let t = Instant::now();
            let e = dev.read_at(0, &mut s).await.unwrap_err();
            assert!(
                matches!(e, Error::IoTimeout { timeout } if timeout == io_timeout),
                "{i}: {e}"
            );
            assert!(e.to_string().contains("not completed within 300ms"), "{e}");
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "{i}: {:?}",
                t.elapsed()
            );
        }
        assert_eq!(
            dev.outstanding(),
            1,
            "only the first request reached the ring"
        );
        finish(Some(dev), End::Drop, pool, b).await;
    })
    .await
}

/// A backend that never completes keeps every buffer it was given: once they fill a fixed
/// pool, the next request waits for pool space, and that wait is bounded by `io_timeout`
/// (it once waited forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_wait_is_bounded_by_io_timeout() {
    use tidepool::memory::{MemoryConfig, PageSize};
    guarded(async {
        let b = Backend::start("nopool", Script::honest(4 * MIB).behaving(Behaviour::Mute));
        let cfg = PoolConfig {
            memory: MemoryConfig {
                page_size: PageSize::Small4K,
                allow_small_pages: true,
            },
            chunk_bytes: 64 << 10,
            prefill_bytes: 64 << 10,
            max_bytes: 64 << 10,
            max_buffer: 16 << 10,
            low_watermark: 0,
            high_watermark: 64 << 10,
            reserve_bytes: 0,
            transient: false,
            ..PoolConfig::default()
        };
        let io_timeout = Duration::from_millis(300);
        let opts = DeviceOptions {
            io_timeout,
            ..DeviceOptions::default()
        };
        let (dev, pool) = try_open(&b.socket, cfg, opts).await;
        let dev = dev.expect("start");
        let mut buf = vec![0u8; 16 << 10];
        // The ring takes one 16 KiB buffer; three requests take the rest.
        for i in 0..3 {
            let e = dev.read_at(0, &mut buf).await.unwrap_err();
            assert!(matches!(e, Error::IoTimeout { .. }), "{i}: {e}");
        }
        assert_eq!(dev.outstanding(), 3);
        // The fourth waits for the pool, then gives up.
        let dev = Arc::new(dev);
        let d2 = dev.clone();
        let t = Instant::now();
        let fourth = tokio::spawn(async move { d2.read_at(0, &mut [0u8; 16 << 10]).await });
        tokio::time::sleep(io_timeout / 3).await;
        assert_eq!(
            pool.stats().waiters,
            1,
            "the fourth request waits for the pool"
        );
        let e = fourth.await.unwrap().unwrap_err();
        assert!(matches!(e, Error::IoTimeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert_eq!(pool.stats().waiters, 0, "the timed-out wait left the queue");
        assert_eq!(dev.outstanding(), 3);
        let dev = Arc::try_unwrap(dev).unwrap();
        finish(Some(dev), End::Drop, pool, b).await;
    })
    .await
}

/// A `max_discard_sectors` / `max_write_zeroes_sectors` of 0 sets no limit (as in Linux): a
/// 1 MiB discard is one request, not 2048 one-sector ones. A limit given is obeyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_range_maxima_mean_no_limit() {
    guarded(async {
        let mut script = Script::honest(4 * MIB);
        script.config.max_discard_sectors = 0;
        script.config.max_write_zeroes_sectors = 512;
        let b = Backend::start("rangemax", script);
        let (dev, pool) = try_open(&b.socket, pool_cfg(), DeviceOptions::default()).await;
        let dev = dev.expect("start");
        dev.discard(MIB, MIB).await.unwrap();
        dev.write_zeroes(0, MIB, false).await.unwrap();
        let log = finish(Some(dev), End::Shutdown, pool, b).await;
        assert!(log.problems.is_empty(), "{:?}", log.problems);
        assert_eq!(
            log.requests.len(),
            5,
            "one discard and four write-zeroes requests"
        );
        let ranges: Vec<(u32, u64, u32)> = log
            .requests
            .iter()
            .map(|r| (r.op, r.sector, r.range_sectors))
            .collect();
        assert_eq!(
            ranges,
            [
                (blk::T_DISCARD, 2048, 2048),
                (blk::T_WRITE_ZEROES, 0, 512),
                (blk::T_WRITE_ZEROES, 512, 512),
                (blk::T_WRITE_ZEROES, 1024, 512),
                (blk::T_WRITE_ZEROES, 1536, 512),
            ]
        );
    })
    .await
}

/// Two good reads, then one whose used entry is `bad`: that read and every later call fail
/// with `Error::Backend(expected)`, the frontend closes the connection, and nothing leaks.
async fn bad_used_entry(name: &str, bad: Behaviour, expected: fn(&RingError) -> bool) -> String {
    let b = Backend::start(name, Script::honest(4 * MIB).behaving(bad));
    let (dev, pool) = try_open(&b.socket, pool_cfg(), DeviceOptions::default()).await;
    let dev = dev.expect("start");
    let data = vec![0xA5u8; 4096];
    dev.write_at(0, &data).await.unwrap();
    let mut back = vec![0u8; 4096];
    dev.read_at(0, &mut back).await.unwrap();
    assert_eq!(back, data);
    let e = dev.read_at(0, &mut back).await.unwrap_err();
    let text = e.to_string();
    match &e {
        Error::Backend(r) if expected(r) => {}
        e => panic!("{name}: unexpected error {e:?}"),
    }
    assert!(text.starts_with("the backend misbehaved: "), "{text}");
    assert!(
        dev.connection().is_closed(),
        "{name}: a lying backend is disconnected"
    );
    assert!(
        matches!(dev.write_at(0, &data).await, Err(Error::Backend(_))),
        "{name}: the device stays failed"
    );
    assert_eq!(dev.outstanding(), 0);
    let log = finish(Some(dev), End::Shutdown, pool, b).await;
    assert!(log.problems.is_empty(), "{:?}", log.problems);
    assert_eq!(log.requests.len(), 3, "the failed device sent nothing more");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_id_out_of_range_fails_the_device() {
    let text = guarded(bad_used_entry(
        "id-range",
        Behaviour::IdOutOfRange { after: 2 },
        |e| {
            matches!(
                e,
                RingError::IdOutOfRange {
                    queue: 0,
                    id: 263,
                    size: 256
                }
            )
        },
    ))
    .await;
    assert!(
        text.contains("descriptor 263, beyond the queue size 256"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_id_not_outstanding_fails_the_device() {
    let text = guarded(bad_used_entry(
        "id-stale",
        Behaviour::IdNotOutstanding { after: 2 },
        |e| matches!(e, RingError::NotOutstanding { .. }),
    ))
    .await;
    assert!(text.contains("heads no outstanding request"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_len_too_large_fails_the_device() {
    let text = guarded(bad_used_entry(
        "len",
        Behaviour::LenTooLarge { after: 2 },
        // A 4 KiB read lets the device write 4096 data bytes and the status byte.
        |e| {
            matches!(
                e,
                RingError::LenTooLong {
                    len: 8193,
                    allowed: 4097,
                    ..
                }
            )
        },
    ))
    .await;
    assert!(
        text.contains("claims 8193 bytes written; the request offered 4097"),
        "{text}"
    );
}

/// A completion whose status byte the backend never wrote is that request's failure (the
/// byte still holds the 0xFF preset), not a false success; the device stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_status_byte_is_a_device_error() {
    guarded(async {
        let script = Script::honest(4 * MIB).behaving(Behaviour::NoStatus { after: 1 });
        let b = Backend::start("nostatus", script);
        let (dev, pool) = try_open(&b.socket, pool_cfg(), DeviceOptions::default()).await;
        let dev = dev.expect("start");
        let data = vec![7u8; 512];
        dev.write_at(0, &data).await.unwrap();
        let e = dev.write_at(512, &data).await.unwrap_err();
        assert!(matches!(e, Error::Device { status: 0xFF }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "the device failed the request (virtio-blk status 255)"
        );
        let mut back = vec![0u8; 512];
        dev.read_at(0, &mut back).await.unwrap();
        assert_eq!(back, data, "later requests still work");
        let log = finish(Some(dev), End::Shutdown, pool, b).await;
        assert!(log.problems.is_empty(), "{:?}", log.problems);
    })
    .await
}

/// Eight writes, then eight reads, each batch completed last first: every call gets its own
/// completion and its own bytes back.
async fn out_of_order(mode: CompletionMode, name: &str) {
    let script = Script::honest(4 * MIB).behaving(Behaviour::Reverse { batch: 8 });
    let b = Backend::start(name, script);
    let opts = DeviceOptions {
        completion: mode,
        ..DeviceOptions::default()
    };
    let (dev, pool) = try_open(&b.socket, pool_cfg(), opts).await;
    let dev = Arc::new(dev.expect("start"));
    let pattern = |t: u64| -> Vec<u8> { (0..8192u64).map(|i| (i * 31 + t * 101) as u8).collect() };
    let mut hs = Vec::new();
    for t in 0..8u64 {
        let dev = dev.clone();
        hs.push(tokio::spawn(async move {
            dev.write_at(t * 65536, &pattern(t)).await
        }));
    }
    for h in hs {
        h.await.unwrap().unwrap();
    }
    let mut hs = Vec::new();
    for t in 0..8u64 {
        let dev = dev.clone();
        hs.push(tokio::spawn(async move {
            let mut back = vec![0u8; 8192];
            dev.read_at(t * 65536, &mut back).await.map(|()| back)
        }));
    }
    for (t, h) in hs.into_iter().enumerate() {
        assert_eq!(
            h.await.unwrap().unwrap(),
            pattern(t as u64),
            "{name}: task {t}"
        );
    }
    let dev = Arc::try_unwrap(dev).unwrap();
    let log = finish(Some(dev), End::Shutdown, pool, b).await;
    assert!(log.problems.is_empty(), "{:?}", log.problems);
    assert_eq!(log.requests.len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_completions_interrupt_mode() {
    guarded(out_of_order(CompletionMode::Interrupt, "reverse-irq")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_completions_poll_mode() {
    guarded(out_of_order(CompletionMode::Poll, "reverse-poll")).await
}

/// The backend completes three requests, then closes the connection with four in flight
/// (eight tasks keep reading and writing): every call ends with `Error::Disconnected`, soon
/// (the liveness watchdog, not the 5 s I/O timeout), and nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_dying_mid_io_fails_every_request() {
    guarded(async {
        let script = Script::honest(4 * MIB).behaving(Behaviour::DieWithInFlight {
            completed: 3,
            in_flight: 4,
            signal: true,
        });
        let b = Backend::start("die", script);
        let (dev, pool) = try_open(&b.socket, pool_cfg(), DeviceOptions::default()).await;
        let dev = Arc::new(dev.expect("start"));
        let t = Instant::now();
        let mut hs = Vec::new();
        for task in 0..8u64 {
            let dev = dev.clone();
            hs.push(tokio::spawn(async move {
                let mut buf = vec![task as u8; 4096];
                let mut ok = 0u32;
                loop {
                    let r = if ok % 2 == 0 {
                        dev.write_at(task * 4096, &buf).await
                    } else {
                        dev.read_at(task * 4096, &mut buf).await
                    };
                    match r {
                        Ok(()) => ok += 1,
                        Err(e) => return (ok, e),
                    }
                }
            }));
        }
        let mut succeeded = 0;
        for h in hs {
            let (ok, e) = h.await.unwrap();
            succeeded += ok;
            assert!(matches!(e, Error::Disconnected(_)), "{e:?}");
            assert!(
                e.to_string()
                    .starts_with("the vhost-user backend is disconnected"),
                "{e}"
            );
        }
        assert_eq!(
            succeeded, 3,
            "exactly the three completed requests succeeded"
        );
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert_eq!(dev.outstanding(), 0);
        let dev = Arc::try_unwrap(dev).unwrap();
        let log = finish(Some(dev), End::Shutdown, pool, b).await;
        // Several requests may arrive with one kick: at least four were in flight.
        let end = log.end.unwrap();
        let held: usize = end
            .strip_prefix("died with ")
            .and_then(|r| r.strip_suffix(" requests in flight"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("the backend ended otherwise: {end}"));
        assert!((4..=8).contains(&held), "{end}");
        assert!(log.problems.is_empty(), "{:?}", log.problems);
    })
    .await
}

/// The backend completes three of four concurrent writes without signalling the call
/// eventfd, then dies: the three completions it published are delivered as successes (the
/// watchdog reaps them before failing the rest), the fourth fails with `Disconnected`. (They
/// were all reported failed before.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_published_before_a_disconnect_are_delivered() {
    guarded(async {
        let script = Script::honest(4 * MIB).behaving(Behaviour::DieWithInFlight {
            completed: 3,
            in_flight: 1,
            signal: false,
        });
        let b = Backend::start("die-quiet", script);
        let (dev, pool) = try_open(&b.socket, pool_cfg(), DeviceOptions::default()).await;
        let dev = Arc::new(dev.expect("start"));
        let mut hs = Vec::new();
        for task in 0..4u64 {
            let dev = dev.clone();
            hs.push(tokio::spawn(async move {
                dev.write_at(task * 4096, &[task as u8; 4096]).await
            }));
        }
        let mut ok = 0;
        for h in hs {
            match h.await.unwrap() {
                Ok(()) => ok += 1,
                Err(e) => assert!(matches!(e, Error::Disconnected(_)), "{e:?}"),
            }
        }
        assert_eq!(ok, 3, "the three published completions count");
        let dev = Arc::try_unwrap(dev).unwrap();
        let log = finish(Some(dev), End::Shutdown, pool, b).await;
        assert_eq!(log.requests.len(), 4);
        assert_eq!(log.end.as_deref(), Some("died with 1 requests in flight"));
    })
    .await
}

/// Status bytes other than OK become the request's typed error (I/O error, unsupported, or
/// an unknown code), and only that request's: the device keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_status_bytes_are_typed_errors() {
    guarded(async {
        let status = |s| Forge {
            status: Some(s),
            ..Forge::honest()
        };
        let mut script = Script::honest(4 * MIB).behaving(Behaviour::Forged);
        script.forged = vec![status(blk::S_IOERR), status(blk::S_UNSUPP), status(7)];
        let b = Backend::start("status", script);
        let (dev, pool) = try_open(&b.socket, pool_cfg(), DeviceOptions::default()).await;
        let dev = dev.expect("start");
        let mut s = [0u8; 512];
        let e = dev.read_at(0, &mut s).await.unwrap_err();
        assert!(matches!(e, Error::Device { status: 1 }), "{e:?}");
        let e = dev.flush().await.unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "not supported by this device: the backend refused this request type"
        );
        let e = dev.write_at(0, &s).await.unwrap_err();
        assert!(matches!(e, Error::Device { status: 7 }), "{e:?}");
        dev.read_at(0, &mut s).await.unwrap();
        let log = finish(Some(dev), End::Shutdown, pool, b).await;
        assert!(log.problems.is_empty(), "{:?}", log.problems);
    })
    .await
}

/// A pool over another connection's view has addresses only that other backend knows: `start`
/// refuses it (by domain, not by the view's name), and a pool over plain process memory too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_another_address_space_is_refused() {
    guarded(async {
        let a = Backend::start("domain-a", Script::honest(4 * MIB));
        let b = Backend::start("domain-b", Script::honest(4 * MIB));
        let connect = |socket: std::path::PathBuf| {
            tokio::task::spawn_blocking(move || {
                Connection::connect(&socket, &ConnectOptions::default())
            })
        };
        let conn_a = connect(a.socket.clone()).await.unwrap().expect("connect a");
        let conn_b = connect(b.socket.clone()).await.unwrap().expect("connect b");
        assert_ne!(conn_a.domain(), conn_b.domain());
        let view_b = Arc::new(VhostUserView::new(conn_b.clone(), ViewOptions::new()));
        let pool_b = tokio::task::spawn_blocking(move || Pool::new(view_b, pool_cfg()))
            .await
            .unwrap()
            .expect("pool over b");
        assert_eq!(pool_b.domain(), conn_b.domain());
        match BlockDevice::start(conn_a.clone(), pool_b.clone(), DeviceOptions::default()).await {
            Err(Error::Config(why)) => assert!(why.contains("another address space"), "{why}"),
            Err(e) => panic!("expected a configuration error, got {e}"),
            Ok(_) => panic!("a pool of another connection was accepted"),
        }
        let identity = Pool::new(
            Arc::new(tidepool::share::identity::Identity::new()),
            pool_config(2 << 20, 2 << 20, 2 << 20),
        )
        .expect("identity pool");
        assert!(matches!(
            BlockDevice::start(conn_a.clone(), identity, DeviceOptions::default()).await,
            Err(Error::Config(_))
        ));
        assert_eq!(pool_b.stats().in_use_bytes, 0);
        drop(pool_b);
        conn_a.close();
        conn_b.close();
        for backend in [a, b] {
            tokio::task::spawn_blocking(move || backend.finish())
                .await
                .unwrap();
        }
    })
    .await
}
