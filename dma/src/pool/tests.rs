//! Unit tests of the pool against the identity view (no device), on locked 4 KiB pages so
//! they run on machines without hugepages.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use super::*;
use crate::memory::{MemoryConfig, PageSize};
use crate::share::identity::Identity;

/// A small pool: 256 KiB chunks of 4 KiB pages, buffers up to 64 KiB, no background thread
/// unless asked, no reserve unless asked.
pub(crate) fn small_config() -> PoolConfig {
    PoolConfig {
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
        shrink_delay: Duration::from_millis(50),
        peak_half_life: Duration::ZERO,
        reserve_bytes: 0,
        transient: false,
        grow_after: Duration::from_millis(1),
        cache_bytes_per_class: 16 << 10,
        background: false,
        ..PoolConfig::default()
    }
}

fn pool(cfg: PoolConfig) -> Pool {
    Pool::new(Arc::new(Identity::new()), cfg).unwrap()
}

/// A waker that counts its wakes.
#[derive(Default)]
struct CountingWaker(std::sync::atomic::AtomicUsize);
impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}
impl CountingWaker {
    fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn poll_once<F: Future>(f: std::pin::Pin<&mut F>, w: &Arc<CountingWaker>) -> Poll<F::Output> {
    let waker = Waker::from(w.clone());
    f.poll(&mut Context::from_waker(&waker))
}

/// Reads a buffer's bytes (no device involved in these tests).
fn bytes(b: &DmaBuf) -> Vec<u8> {
    let mut v = vec![0; b.capacity()];
    b.read_at(0, &mut v).unwrap();
    v
}

#[test]
fn bad_input_gets_typed_errors() {
    let p = pool(small_config());
    assert!(matches!(p.try_alloc(0), Err(PoolError::ZeroLength)));
    assert!(matches!(
        p.try_alloc((64 << 10) + 1),
        Err(PoolError::TooLarge { max: 65536, .. })
    ));
    let data = [1u8; 16];
    assert!(matches!(
        p.try_map(&data[..], Direction::FromDevice),
        Err(PoolError::Direction(Direction::FromDevice))
    ));
    let mut buf = p.try_alloc(100).unwrap();
    assert!(matches!(
        buf.write_at(500, &[0; 100]),
        Err(PoolError::OutOfBounds { capacity: 512, .. })
    ));
    let bad = PoolConfig {
        max_buffer: 3000,
        ..small_config()
    };
    assert!(matches!(
        Pool::new(Arc::new(Identity::new()), bad),
        Err(PoolError::Config {
            field: "max_buffer",
            ..
        })
    ));
}

#[test]
fn buffers_are_zeroed_aligned_and_return_to_zero_in_use() {
    let p = pool(small_config());
    let mut live = Vec::new();
    for len in [1, 511, 512, 513, 4096, 5000, 65536] {
        let mut b = p.try_alloc(len).unwrap();
        assert!(bytes(&b).iter().all(|&x| x == 0), "fresh buffer zeroed");
        let align = b.capacity().min(4096) as u64;
        assert_eq!(b.device_addr().0 % align, 0, "len {len} aligned to {align}");
        b.write_at(0, &vec![0xAB; len]).unwrap();
        live.push(b);
    }
    assert!(p.stats().in_use_bytes > 0);
    drop(live);
    assert_eq!(p.stats().in_use_bytes, 0);
    // Reused memory is zeroed again for the next user.
    for _ in 0..64 {
        let b = p.try_alloc(4096).unwrap();
        assert!(bytes(&b).iter().all(|&x| x == 0));
    }
}

#[test]
fn map_directions_copy_in_zero_and_copy_out_once() {
    let p = pool(small_config());
    let src: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let m = p.try_map(&src, Direction::ToDevice).unwrap();
    let got = bytes(m.buffer());
    assert_eq!(&got[..3000], &src[..]);
    assert!(
        got[3000..].iter().all(|&x| x == 0),
        "tail beyond the data is zeroed"
    );
    m.unmap();

    let mut dst = vec![0x55u8; 3000];
    let m = p.try_map(&mut dst, Direction::FromDevice).unwrap();
    assert!(
        bytes(m.buffer()).iter().all(|&x| x == 0),
        "FromDevice hands the device zeroes"
    );
    // The "device" writes.
    // SAFETY: the identity view has no device; this test plays its part.
    unsafe { std::ptr::write_bytes(m.buffer().as_ptr(), 0xEE, 3000) };
    m.unmap();
    assert!(dst.iter().all(|&x| x == 0xEE));

    // Dropping without unmap abandons: no copy out.
    let mut dst = vec![1u8; 64];
    let m = p.try_map(&mut dst, Direction::Bidirectional).unwrap();
    // SAFETY: as above.
    unsafe { std::ptr::write_bytes(m.buffer().as_ptr(), 9, 64) };
    drop(m);
    assert!(dst.iter().all(|&x| x == 1));

    // Scatter-gather: segments gathered in order, scattered back in order.
    let (mut a, mut b) = (vec![1u8; 1000], vec![2u8; 3000]);
    let m = p
        .try_map_sg(
            vec![(&mut a).into(), (&mut b).into()],
            Direction::Bidirectional,
        )
        .unwrap();
    assert_eq!(m.len(), 4000);
    let got = bytes(m.buffer());
    assert!(got[..1000].iter().all(|&x| x == 1) && got[1000..4000].iter().all(|&x| x == 2));
    // SAFETY: as above.
    unsafe { std::ptr::write_bytes(m.buffer().as_ptr().add(999), 7, 2) };
    m.unmap();
    assert_eq!((a[999], b[0], b[1]), (7, 7, 2));
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn awaiting_alloc_waits_for_release_and_wakes() {
    let p = pool(small_config());
    let all: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    assert!(matches!(
        p.try_alloc(4096),
        Err(PoolError::Exhausted { .. })
    ));
    let w = Arc::new(CountingWaker::default());
    let mut fut = pin!(p.alloc(64 << 10));
    assert!(poll_once(fut.as_mut(), &w).is_pending());
    assert_eq!(p.stats().waiters, 1);
    drop(all);
    assert_eq!(w.count(), 1, "the release woke the waiter");
    let Poll::Ready(Ok(b)) = poll_once(fut.as_mut(), &w) else {
        panic!("granted")
    };
    assert_eq!(b.capacity(), 64 << 10);
    assert_eq!(p.stats().waits, 1);
    drop(b);
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn cancelled_waiters_lose_nothing() {
    let p = pool(small_config());
    let all: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    let (w1, w2) = (
        Arc::new(CountingWaker::default()),
        Arc::new(CountingWaker::default()),
    );
    let mut f1 = Box::pin(p.alloc(64 << 10));
    let mut f2 = Box::pin(p.alloc(64 << 10));
    assert!(poll_once(f1.as_mut(), &w1).is_pending());
    assert!(poll_once(f2.as_mut(), &w2).is_pending());
    // Space is granted to f1 (FIFO), which is dropped before it polls: f2 must get it.
    let mut all = all;
    all.pop();
    assert_eq!((w1.count(), w2.count()), (1, 0));
    drop(f1);
    assert_eq!(w2.count(), 1, "the dropped grant went to the next waiter");
    let Poll::Ready(Ok(b)) = poll_once(f2.as_mut(), &w2) else {
        panic!("f2 granted")
    };
    // A queued (not granted) future dropped leaves nothing behind.
    let w3 = Arc::new(CountingWaker::default());
    let mut f3 = Box::pin(p.alloc(4096));
    assert!(poll_once(f3.as_mut(), &w3).is_pending());
    drop(f3);
    assert_eq!(p.stats().waiters, 0);
    drop((all, b));
    assert_eq!(p.stats().in_use_bytes, 0);
    assert_eq!(
        p.try_alloc(64 << 10).map(|b| b.capacity()).unwrap(),
        64 << 10
    );
}

#[test]
fn small_waiters_pass_a_large_one_but_not_forever() {
    let cfg = PoolConfig {
        fairness: crate::wait::FairnessConfig {
            max_bypass: 2,
            aging: Duration::from_secs(60),
        },
        ..small_config()
    };
    let p = pool(cfg);
    let mut held: Vec<_> = (0..64).map(|_| p.try_alloc(4096).unwrap()).collect();
    let w = Arc::new(CountingWaker::default());
    let mut big = Box::pin(p.alloc(64 << 10));
    assert!(poll_once(big.as_mut(), &w).is_pending());
    let mut smalls: Vec<_> = (0..4).map(|_| Box::pin(p.alloc(4096))).collect();
    for s in &mut smalls {
        assert!(poll_once(s.as_mut(), &w).is_pending());
    }
    // Each 4 KiB release fits a small waiter, not the big one: two may pass it...
    held.pop();
    held.pop();
    let w2 = Arc::new(CountingWaker::default());
    let mut got = Vec::new();
    let mut ready = |smalls: &mut Vec<std::pin::Pin<Box<Alloc<'_>>>>| {
        let mut still = Vec::new();
        for mut s in smalls.drain(..) {
            match poll_once(s.as_mut(), &w2) {
                Poll::Ready(r) => got.push(r.unwrap()),
                Poll::Pending => still.push(s),
            }
        }
        *smalls = still;
        got.len()
    };
    assert_eq!(
        ready(&mut smalls),
        2,
        "two small waiters passed the big one"
    );
    // ...then space is kept for the big one: further releases go to it, not to the two
    // small waiters still queued. Free the chunk's first 64 KiB (a whole buddy block).
    held.sort_by_key(|b| b.device_addr());
    let first: Vec<_> = held.drain(..16).collect();
    drop(first);
    assert_eq!(
        ready(&mut smalls),
        2,
        "no small waiter passed the starving big one"
    );
    assert!(
        poll_once(big.as_mut(), &w).is_ready(),
        "big waiter served once 64 KiB freed"
    );
    drop(held);
}

#[test]
fn immediate_path_uses_reserve_then_transient_then_fails_clearly() {
    let cfg = PoolConfig {
        reserve_bytes: 64 << 10,
        transient: true,
        max_bytes: 320 << 10,
        ..small_config()
    };
    let p = pool(cfg);
    // Awaitable allocations stop at the reserve: 3 of the 4 64 KiB blocks.
    let w = Arc::new(CountingWaker::default());
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut f = Box::pin(p.alloc(64 << 10));
        let Poll::Ready(Ok(b)) = poll_once(f.as_mut(), &w) else {
            panic!()
        };
        held.push(b);
    }
    let mut f = Box::pin(p.alloc(64 << 10));
    assert!(
        poll_once(f.as_mut(), &w).is_pending(),
        "the reserve is not for waiters"
    );
    drop(f);
    // The immediate path takes the reserve...
    held.push(p.try_alloc(64 << 10).unwrap());
    assert_eq!(p.stats().reserve_allocs, 1);
    // ...then a transient chunk...
    held.push(p.try_alloc(64 << 10).unwrap());
    let s = p.stats();
    // (a 64 KiB request makes a 64 KiB transient chunk: its block, in whole 4 KiB pages)
    assert_eq!((s.transient_allocs, s.capacity_bytes), (1, 320 << 10));
    // ...then the cap stops the next one with a clear error.
    let err = p.try_alloc(64 << 10).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PoolError::Exhausted { .. }), "{msg}");
    assert!(msg.contains("cap"), "{msg}");
    assert_eq!(p.stats().immediate_failures, 1);
    // The transient chunk goes back as soon as it is idle.
    held.pop();
    p.maintain();
    assert_eq!(p.stats().capacity_bytes, 256 << 10);
    drop(held);
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn waiters_make_the_grower_grow_and_idle_chunks_shrink_back() {
    let p = pool(small_config());
    let held: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    let w = Arc::new(CountingWaker::default());
    let mut f = Box::pin(p.alloc(64 << 10));
    assert!(poll_once(f.as_mut(), &w).is_pending());
    std::thread::sleep(Duration::from_millis(2));
    let r = p.maintain();
    assert_eq!(r.grew, 1, "{r:?}");
    assert!(r.forced, "the waiter passed grow_after");
    assert_eq!(w.count(), 1);
    let Poll::Ready(Ok(b)) = poll_once(f.as_mut(), &w) else {
        panic!()
    };
    let s = p.stats();
    assert_eq!(
        (s.capacity_bytes, s.grows, s.sync_grows, s.mappings.mappings),
        (512 << 10, 1, 1, 2)
    );
    drop((held, b));
    // Idle, but not for shrink_delay yet.
    assert_eq!(p.maintain().shrank, 0);
    std::thread::sleep(Duration::from_millis(60));
    let r = p.maintain();
    assert_eq!(r.shrank, 1, "{r:?}");
    let s = p.stats();
    assert_eq!(
        (s.capacity_bytes, s.shrinks, s.mappings.mappings),
        (256 << 10, 1, 1)
    );
    // Never below the prefill.
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(p.maintain().shrank, 0);
}

#[test]
fn timeouts_and_at_cap_failure() {
    let cfg = PoolConfig {
        max_bytes: 256 << 10,
        at_cap: AtCap::Fail,
        ..small_config()
    };
    let p = pool(cfg);
    let held: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    let w = Arc::new(CountingWaker::default());
    let mut f = Box::pin(p.alloc_timeout(4096, Duration::from_secs(30)));
    assert!(poll_once(f.as_mut(), &w).is_pending());
    std::thread::sleep(Duration::from_millis(3));
    let r = p.maintain();
    assert_eq!(
        r.expired, 1,
        "the grow_after deadline of AtCap::Fail passed"
    );
    let r = poll_once(f.as_mut(), &w);
    assert!(
        matches!(r, Poll::Ready(Err(PoolError::AtCap { .. }))),
        "{r:?}"
    );
    drop(f);

    let p2 = pool(PoolConfig {
        max_bytes: 256 << 10,
        ..small_config()
    });
    let held2: Vec<_> = (0..4).map(|_| p2.try_alloc(64 << 10).unwrap()).collect();
    let mut f = Box::pin(p2.alloc_timeout(4096, Duration::from_millis(10)));
    assert!(poll_once(f.as_mut(), &w).is_pending());
    std::thread::sleep(Duration::from_millis(12));
    p2.maintain();
    assert!(matches!(
        poll_once(f.as_mut(), &w),
        Poll::Ready(Err(PoolError::Timeout { .. }))
    ));
    assert_eq!((p2.stats().timeouts, p2.stats().waiters), (1, 0));
    drop((held, held2));
}

#[test]
fn background_grower_serves_waiters_on_tokio() {
    let cfg = PoolConfig {
        background: true,
        ..small_config()
    };
    let p = pool(cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let held: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
        // Nothing is free: the grower must add a chunk for this to complete.
        let b = tokio::time::timeout(Duration::from_secs(5), p.alloc(64 << 10))
            .await
            .expect("grower served the waiter")
            .unwrap();
        assert!(p.stats().grows >= 1);
        drop((held, b));
    });
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn stats_serialize_to_json() {
    let p = pool(small_config());
    let _b = p.try_alloc(1000).unwrap();
    let json = p.stats().to_json();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["in_use_bytes"], 1024);
    assert_eq!(v["capacity_bytes"], 256 << 10);
    assert_eq!(v["mappings"]["mappings"], 1);
}

#[test]
fn dma_mask_is_enforced_on_new_chunks() {
    // Identity addresses are user-space virtual addresses, far above 4 GiB on x86_64.
    let cfg = PoolConfig {
        dma_mask: u32::MAX as u64,
        ..small_config()
    };
    let view = Arc::new(Identity::new());
    let err = Pool::new(view.clone(), cfg).unwrap_err();
    assert!(
        matches!(
            err,
            PoolError::AboveDmaMask {
                mask: 0xffff_ffff,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(view.usage().mappings, 0, "the refused chunk was unshared");
}

#[test]
fn teardown_unshares_every_chunk() {
    let view = Arc::new(Identity::new());
    {
        let p = Pool::new(
            view.clone(),
            PoolConfig {
                background: true,
                ..small_config()
            },
        )
        .unwrap();
        let b = p.try_alloc(4096).unwrap();
        drop(p);
        // The buffer keeps the pool alive.
        assert_eq!(view.usage().mappings, 1);
        drop(b);
    }
    assert_eq!(view.usage().mappings, 0);
}

/// Buffers own pool references taken from the per-CPU caches' credits: the pool must live
/// exactly as long as its last handle or buffer, whichever order they go in and whichever
/// thread releases them, with credits both topped up and overflowing on the way.
#[test]
fn the_pool_lives_until_its_last_handle_and_buffer() {
    let view = Arc::new(Identity::new());
    let p = Pool::new(
        view.clone(),
        PoolConfig {
            max_buffer: 4096,
            cache_bytes_per_class: 256 << 10,
            ..small_config()
        },
    )
    .unwrap();
    let p2 = p.clone();
    // Many allocations and releases on this thread: credits are taken in batches and, as
    // releases outnumber what a cache keeps (CREDITS_MAX), given back one by one.
    for _ in 0..3 {
        let bufs: Vec<_> = (0..300).map(|_| p.try_alloc(512).unwrap()).collect();
        drop(bufs);
    }
    // Buffers allocated here, released on other threads after every handle is gone.
    let bufs: Vec<_> = (0..40).map(|_| p2.try_alloc(512).unwrap()).collect();
    drop(p);
    assert_eq!(view.usage().mappings, 1, "a handle is left");
    drop(p2);
    assert_eq!(view.usage().mappings, 1, "buffers keep the pool alive");
    let mut bufs = bufs.into_iter();
    let first: Vec<_> = bufs.by_ref().take(20).collect();
    std::thread::spawn(move || drop(first)).join().unwrap();
    assert_eq!(view.usage().mappings, 1, "20 buffers keep the pool alive");
    let rest: Vec<_> = bufs.collect();
    std::thread::spawn(move || drop(rest)).join().unwrap();
    assert_eq!(view.usage().mappings, 0, "the last buffer freed the pool");
}

#[test]
fn throttle_holds_awaitable_requests_between_the_thresholds() {
    let p = pool(PoolConfig {
        throttle: Some(Throttle {
            high_percent: 70.0,
            low_percent: 65.0,
        }),
        ..small_config()
    });
    let w = Arc::new(CountingWaker::default());
    let mut held = Vec::new();
    // 256 KiB of 16 KiB blocks: 16 blocks; above 70% (11.2 blocks) the 12th allocation throttles.
    loop {
        let mut f = Box::pin(p.alloc(16 << 10));
        match poll_once(f.as_mut(), &w) {
            Poll::Ready(r) => held.push(r.unwrap()),
            Poll::Pending => {
                drop(f);
                break;
            }
        }
    }
    assert_eq!(held.len(), 12, "allocations stop once above 70%");
    // The immediate path is not throttled.
    held.push(p.try_alloc(16 << 10).unwrap());
    // Releasing down to 12/16 = 75% and 11/16 = 68.75% keeps the throttle; 10/16 = 62.5% lifts it.
    let mut f = Box::pin(p.alloc(16 << 10));
    assert!(poll_once(f.as_mut(), &w).is_pending());
    held.pop();
    held.pop();
    assert_eq!(w.count(), 0, "still above the low threshold");
    held.pop();
    assert_eq!(w.count(), 1, "below 65%: the waiter is served");
    assert!(matches!(poll_once(f.as_mut(), &w), Poll::Ready(Ok(_))));
}

#[test]
fn without_waiting_awaitable_requests_fail_like_swiotlb() {
    let p = pool(PoolConfig {
        waiting: false,
        ..small_config()
    });
    let w = Arc::new(CountingWaker::default());
    let held: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    let mut f = Box::pin(p.alloc(4096));
    assert!(matches!(
        poll_once(f.as_mut(), &w),
        Poll::Ready(Err(PoolError::Exhausted { .. }))
    ));
    drop(held);
}

#[test]
fn few_mapping_slots_make_growth_chunks_larger() {
    // A view with 3 slots: prefill takes one; 768 KiB of room over 2 slots: 384 KiB chunks.
    let view = Arc::new(Identity::with_limit(3));
    let p = Pool::new(view, small_config()).unwrap();
    let held: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    let w = Arc::new(CountingWaker::default());
    let mut f = Box::pin(p.alloc(64 << 10));
    assert!(poll_once(f.as_mut(), &w).is_pending());
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(p.maintain().grew, 1);
    assert_eq!(p.stats().capacity_bytes, (256 + 384) << 10);
    let Poll::Ready(Ok(b)) = poll_once(f.as_mut(), &w) else {
        panic!()
    };
    // Fill it, grow into the last slot, and reach the cap exactly.
    let more: Vec<_> = (0..5).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    let mut f = Box::pin(p.alloc(64 << 10));
    assert!(poll_once(f.as_mut(), &w).is_pending());
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(p.maintain().grew, 1);
    let s = p.stats();
    assert_eq!((s.capacity_bytes, s.mappings.mappings), (1 << 20, 3));
    drop((held, b, more, f));
}

#[test]
fn shrinking_keeps_the_decaying_recent_peak() {
    let p = pool(PoolConfig {
        peak_half_life: Duration::from_millis(100),
        ..small_config()
    });
    let held: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    let w = Arc::new(CountingWaker::default());
    let mut f = Box::pin(p.alloc(64 << 10));
    assert!(poll_once(f.as_mut(), &w).is_pending());
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(p.maintain().grew, 1);
    let Poll::Ready(Ok(b)) = poll_once(f.as_mut(), &w) else {
        panic!()
    };
    drop((held, b));
    // Idle past shrink_delay, but the peak (320 KiB allocated, folded in at this look) is
    // above the 256 KiB that would remain.
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(p.maintain().shrank, 0, "kept for the recent peak");
    // After 3.5 half-lives the peak is ~28 KiB: the chunk goes.
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(p.maintain().shrank, 1);
}

#[test]
fn alloc_from_copies_in_and_zeroes_the_rest() {
    let p = pool(small_config());
    let src: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8 + 1).collect();
    let b = p.try_alloc_from(&src).unwrap();
    let got = bytes(&b);
    assert_eq!(b.len(), 3000);
    assert_eq!(&got[..3000], &src[..]);
    assert!(got[3000..].iter().all(|&x| x == 0));
    let w = Arc::new(CountingWaker::default());
    let mut f = Box::pin(p.alloc_from(&src[..100]));
    let Poll::Ready(Ok(b2)) = poll_once(f.as_mut(), &w) else {
        panic!()
    };
    let got = bytes(&b2);
    assert_eq!(&got[..100], &src[..100]);
    assert!(got[100..].iter().all(|&x| x == 0));
    assert!(matches!(p.try_alloc_from(&[]), Err(PoolError::ZeroLength)));
    drop((b, b2));
    assert_eq!(p.stats().in_use_bytes, 0);
}

/// How [`FlakyView::share`] fails, when told to.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Refuse {
    /// Shares as the identity view does.
    Nothing,
    /// The IOMMU is out of memory: `ShareError::Os` with ENOMEM.
    Enomem,
    /// The backend's mapping limit: `ShareError::MappingLimit`.
    MappingLimit,
    /// Pinning the pages would pass RLIMIT_MEMLOCK (VFIO type1 accounts pinned pages
    /// against it): `ShareError::Os` with EAGAIN.
    Memlock,
}

/// An identity view whose `share` fails on demand, counting the refusals.
#[derive(Debug)]
struct FlakyView {
    inner: Identity,
    refuse: std::sync::Mutex<Refuse>,
    refused: std::sync::atomic::AtomicUsize,
}

impl FlakyView {
    fn new() -> Arc<FlakyView> {
        Arc::new(FlakyView {
            inner: Identity::new(),
            refuse: std::sync::Mutex::new(Refuse::Nothing),
            refused: Default::default(),
        })
    }

    fn refuse(&self, how: Refuse) {
        *self.refuse.lock().unwrap() = how;
    }

    fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl crate::share::DeviceView for FlakyView {
    fn share(
        &self,
        region: &crate::memory::HostRegion<'_>,
    ) -> Result<crate::DeviceAddr, crate::share::ShareError> {
        use crate::share::ShareError;
        let how = *self.refuse.lock().unwrap();
        let err = match how {
            Refuse::Nothing => return self.inner.share(region),
            Refuse::Enomem => ShareError::Os {
                what: "VFIO_IOMMU_MAP_DMA",
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            },
            Refuse::MappingLimit => ShareError::MappingLimit {
                used: self.inner.usage().mappings,
                limit: self.inner.usage().mappings,
            },
            Refuse::Memlock => ShareError::Os {
                what: "pinning pages (RLIMIT_MEMLOCK)",
                source: std::io::Error::from_raw_os_error(libc::EAGAIN),
            },
        };
        self.refused
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Err(err)
    }

    fn unshare(
        &self,
        region: &crate::memory::HostRegion<'_>,
        addr: crate::DeviceAddr,
    ) -> Result<(), crate::share::ShareError> {
        self.inner.unshare(region, addr)
    }

    fn usage(&self) -> crate::share::ShareUsage {
        self.inner.usage()
    }

    fn kind(&self) -> &'static str {
        "flaky-identity"
    }
}

/// The typed cause behind an error the pool reports for failed growth.
fn growth_cause(e: &PoolError) -> &crate::share::ShareError {
    match e.growth_cause() {
        Some(PoolError::Share(s)) => s,
        other => panic!("expected a share failure as the growth cause of {e}, got {other:?}"),
    }
}

/// A multi-threaded runtime for the tests that use the background grower.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// (a) `AtCap::Fail`, below the cap, every growth refused with the mapping limit: the waiter
/// ends on its own, promptly, with `GrowthFailed` carrying the typed `MappingLimit`.
#[test]
fn at_cap_fail_waiter_ends_with_the_growth_failure() {
    let view = FlakyView::new();
    let p = Pool::new(
        view.clone(),
        PoolConfig {
            background: true,
            at_cap: AtCap::Fail,
            ..small_config()
        },
    )
    .unwrap();
    let held: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    view.refuse(Refuse::MappingLimit);
    runtime().block_on(async {
        let start = std::time::Instant::now();
        let data = vec![1u8; 4096];
        let r = tokio::time::timeout(Duration::from_secs(10), p.map(&data, Direction::ToDevice))
            .await
            .expect("the pool ended the wait itself (no hang)");
        let e = r.expect_err("nothing could be granted");
        assert!(
            matches!(e, PoolError::GrowthFailed { len: 4096, .. }),
            "{e}"
        );
        assert!(
            matches!(
                growth_cause(&e),
                crate::share::ShareError::MappingLimit { .. }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("mapping limit"), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "ended when growth on its behalf failed, not much later: {:?}",
            start.elapsed()
        );
    });
    let s = p.stats();
    assert!(s.growth_failures >= 1 && view.refused() >= 1, "{s:?}");
    assert_eq!((s.waiters, s.capacity_bytes), (0, 256 << 10));
    drop(held);
    assert_eq!(p.stats().in_use_bytes, 0);
}

/// (b) `AtCap::Wait`: the same refusal (ENOMEM from the IOMMU) ends the waiter too, after its
/// `growth_failure_wait`, instead of waiting forever; the guard timeout is far longer.
#[test]
fn at_cap_wait_waiter_ends_after_its_growth_failure_wait() {
    let view = FlakyView::new();
    let p = Pool::new(
        view.clone(),
        PoolConfig {
            background: true,
            growth_failure_wait: Duration::from_millis(100),
            ..small_config()
        },
    )
    .unwrap();
    let held: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    view.refuse(Refuse::Enomem);
    runtime().block_on(async {
        let start = std::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), p.alloc(64 << 10))
            .await
            .expect("the pool's own growth-failure rule ended the wait first");
        let e = r.expect_err("nothing could be granted");
        let waited = start.elapsed();
        let PoolError::GrowthFailed {
            waited: reported,
            failures,
            ..
        } = &e
        else {
            panic!("expected GrowthFailed, got {e}")
        };
        assert!(*failures >= 1, "{e}");
        assert!(
            *reported >= Duration::from_millis(100),
            "kept waiting for released space for growth_failure_wait: {e}"
        );
        assert!(waited < Duration::from_secs(3), "bounded: {waited:?}");
        match growth_cause(&e) {
            crate::share::ShareError::Os { source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOMEM), "{e}")
            }
            other => panic!("unexpected cause {other}"),
        }
    });
    assert!(
        view.refused() >= 2,
        "growth was retried: {}",
        view.refused()
    );
    drop(held);
    assert_eq!(p.stats().in_use_bytes, 0);
}

/// (c) The immediate path says why it has nothing: its own transient chunk was refused
/// (memlock-like EAGAIN), or, with transient chunks off, the grower's last attempt was.
#[test]
fn immediate_path_reports_why_growth_failed() {
    let view = FlakyView::new();
    let p = Pool::new(
        view.clone(),
        PoolConfig {
            transient: true,
            ..small_config()
        },
    )
    .unwrap();
    let held: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    view.refuse(Refuse::Memlock);
    let e = p.try_alloc(4096).unwrap_err();
    assert!(matches!(e, PoolError::Exhausted { .. }), "{e}");
    match growth_cause(&e) {
        crate::share::ShareError::Os { source, .. } => {
            assert_eq!(source.raw_os_error(), Some(libc::EAGAIN), "{e}")
        }
        other => panic!("unexpected cause {other}"),
    }
    assert!(e.to_string().contains("MEMLOCK"), "{e}");
    drop(held);

    // Transient chunks off: the grower's failure is the reason.
    let view = FlakyView::new();
    let p = Pool::new(view.clone(), small_config()).unwrap();
    let held: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    let w = Arc::new(CountingWaker::default());
    let mut f = Box::pin(p.alloc(64 << 10));
    assert!(poll_once(f.as_mut(), &w).is_pending());
    view.refuse(Refuse::MappingLimit);
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(p.maintain().failed, 1);
    let data = [0u8; 512];
    let e = p.try_map(&data[..], Direction::ToDevice).unwrap_err();
    assert!(matches!(e, PoolError::Exhausted { .. }), "{e}");
    assert!(
        matches!(
            growth_cause(&e),
            crate::share::ShareError::MappingLimit { .. }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("mapping limit"), "{e}");
    drop((f, held));
    assert_eq!(p.stats().in_use_bytes, 0);
}

/// The rule, step by step (no background thread): a failed attempt ends every waiter it was
/// made for (two here, both woken); a waiter that arrives during the backoff is not failed
/// by the old failure until its bounded wait passes; an `AtCap::Wait` waiter survives a
/// failure within its `growth_failure_wait` and is served once growth works again.
#[test]
fn a_waiter_fails_only_after_growth_on_its_behalf_failed() {
    let view = FlakyView::new();
    let p = Pool::new(
        view.clone(),
        PoolConfig {
            at_cap: AtCap::Fail,
            grow_after: Duration::from_millis(20),
            ..small_config()
        },
    )
    .unwrap();
    let held: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    view.refuse(Refuse::MappingLimit);
    let (w1, w2) = (
        Arc::new(CountingWaker::default()),
        Arc::new(CountingWaker::default()),
    );
    let mut f1 = Box::pin(p.alloc(64 << 10));
    let mut f2 = Box::pin(p.alloc(4096));
    assert!(poll_once(f1.as_mut(), &w1).is_pending());
    assert!(poll_once(f2.as_mut(), &w2).is_pending());
    // Woken at enqueue: the grower tries at once, for both (not forced: no backoff yet).
    let r = p.maintain();
    assert_eq!((r.grew, r.failed), (0, 1), "{r:?}");
    assert_eq!((w1.count(), w2.count()), (1, 1), "both told of the failure");
    for f in [f1.as_mut(), f2.as_mut()] {
        match poll_once(f, &w1) {
            Poll::Ready(Err(e @ PoolError::GrowthFailed { failures: 1, .. })) => {
                assert!(matches!(
                    growth_cause(&e),
                    crate::share::ShareError::MappingLimit { .. }
                ))
            }
            other => panic!("{other:?}"),
        }
    }
    // A newcomer after that failure: not failed by it at once...
    let w3 = Arc::new(CountingWaker::default());
    let mut f3 = Box::pin(p.alloc(4096));
    assert!(poll_once(f3.as_mut(), &w3).is_pending());
    assert!(
        poll_once(f3.as_mut(), &w3).is_pending(),
        "not failed on sight"
    );
    // ...but by the next attempt, made for it, once the backoff is over.
    std::thread::sleep(Duration::from_millis(5));
    let r = p.maintain();
    assert_eq!(r.failed, 1, "{r:?}");
    assert!(matches!(
        poll_once(f3.as_mut(), &w3),
        Poll::Ready(Err(PoolError::GrowthFailed { failures: 2, .. }))
    ));
    assert_eq!(p.stats().waiters, 0);
    drop((f1, f2, f3));

    // AtCap::Wait with a long growth_failure_wait: a failure does not end the waiter, and
    // once the view works again growth serves it.
    let p = Pool::new(
        view.clone(),
        PoolConfig {
            growth_failure_wait: Duration::from_secs(60),
            ..small_config()
        },
    )
    .unwrap_err();
    assert!(matches!(p, PoolError::Share(_)), "prefill refused: {p}");
    view.refuse(Refuse::Nothing);
    let p = Pool::new(
        view.clone(),
        PoolConfig {
            growth_failure_wait: Duration::from_secs(60),
            ..small_config()
        },
    )
    .unwrap();
    let held2: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    view.refuse(Refuse::Enomem);
    let w4 = Arc::new(CountingWaker::default());
    let mut f4 = Box::pin(p.alloc(64 << 10));
    assert!(poll_once(f4.as_mut(), &w4).is_pending());
    assert_eq!(p.maintain().failed, 1);
    assert!(poll_once(f4.as_mut(), &w4).is_pending(), "within its wait");
    view.refuse(Refuse::Nothing);
    std::thread::sleep(Duration::from_millis(5));
    let r = p.maintain();
    assert_eq!((r.grew, r.failed), (1, 0), "{r:?}");
    let Poll::Ready(Ok(b)) = poll_once(f4.as_mut(), &w4) else {
        panic!("served by the recovered growth")
    };
    drop((held, held2, b));
    assert_eq!(p.stats().in_use_bytes, 0);
}

/// (d, e) After growth failed, the pool recovers by itself once the cause is gone: a new map
/// succeeds through growth, and when every handle is dropped nothing is in use.
#[test]
fn pool_recovers_when_growth_works_again() {
    let view = FlakyView::new();
    let p = Pool::new(
        view.clone(),
        PoolConfig {
            background: true,
            at_cap: AtCap::Fail,
            ..small_config()
        },
    )
    .unwrap();
    let held: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    view.refuse(Refuse::MappingLimit);
    runtime().block_on(async {
        // A few failed rounds, cancelled and failed waiters among them.
        for _ in 0..3 {
            let r = tokio::time::timeout(Duration::from_secs(10), p.alloc(64 << 10))
                .await
                .expect("no hang");
            assert!(matches!(r, Err(PoolError::GrowthFailed { .. })), "{r:?}");
            let cancelled = tokio::time::timeout(Duration::from_micros(50), p.alloc(4096)).await;
            drop(cancelled);
        }
        assert_eq!(p.stats().grows, 0);
        view.refuse(Refuse::Nothing);
        // Within the longest backoff (1 s) growth is tried again and works.
        let data = vec![9u8; 60 << 10];
        let mut served = None;
        for _ in 0..40 {
            let r =
                tokio::time::timeout(Duration::from_secs(10), p.map(&data, Direction::ToDevice))
                    .await
                    .expect("no hang");
            match r {
                Ok(m) => {
                    served = Some(m);
                    break;
                }
                Err(PoolError::GrowthFailed { .. }) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        let m = served.expect("a map succeeded once growth worked again");
        let s = p.stats();
        assert!(s.grows >= 1 && s.capacity_bytes > 256 << 10, "{s:?}");
        // Later waits succeed too.
        let more = tokio::time::timeout(Duration::from_secs(10), p.alloc(64 << 10))
            .await
            .expect("no hang")
            .expect("growth works");
        drop((m, more));
    });
    drop(held);
    let s = p.stats();
    assert_eq!((s.in_use_bytes, s.waiters), (0, 0), "{s:?}");
}

/// After growth failed and nobody needs growth any more, the expired backoff must not make
/// the grower step again at once, over and over (a busy loop on the grower thread).
#[test]
fn an_expired_backoff_does_not_keep_the_grower_busy() {
    let view = FlakyView::new();
    let p = Pool::new(view.clone(), small_config()).unwrap();
    let held: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    view.refuse(Refuse::Enomem);
    let w = Arc::new(CountingWaker::default());
    let mut f = Box::pin(p.alloc(64 << 10));
    assert!(poll_once(f.as_mut(), &w).is_pending());
    assert_eq!(p.maintain().failed, 1);
    drop((f, held));
    std::thread::sleep(Duration::from_millis(5));
    let r = p.maintain();
    assert_eq!((r.grew, r.failed), (0, 0), "nobody needs growth: {r:?}");
    assert!(
        r.next_wake.is_none_or(|d| d >= Duration::from_millis(5)),
        "the grower sleeps: {r:?}"
    );
}

/// `Pool::new` whose grower thread cannot be started (EAGAIN: the thread limit) returns
/// `GrowerSpawn` instead of panicking, and gives back everything it made: the prefilled
/// chunks are unshared and the pool's state (arena, chunks) is freed.
#[test]
fn a_grower_that_cannot_start_fails_pool_new_and_leaks_nothing() {
    let view = Arc::new(Identity::new());
    let cfg = PoolConfig {
        background: true,
        prefill_bytes: 512 << 10,
        ..small_config()
    };
    let mut body = None;
    let r = Pool::build(view.clone(), cfg, |shared| {
        assert_eq!(
            view.usage().mappings,
            2,
            "prefilled before the grower starts"
        );
        grower::spawn(shared, &mut |_builder, grower| {
            body = Some(grower.pool());
            Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
        })
    });
    let e = r.unwrap_err();
    assert!(
        matches!(&e, PoolError::GrowerSpawn(io) if io.raw_os_error() == Some(libc::EAGAIN)),
        "{e}"
    );
    assert!(e.to_string().contains("grower thread"), "{e}");
    let pool = body.expect("the real spawn path ran");
    assert!(pool.upgrade().is_none(), "the pool's state was freed");
    assert_eq!(
        view.usage(),
        crate::share::ShareUsage {
            mappings: 0,
            mapping_limit: None,
            bytes: 0
        },
        "every prefilled chunk unshared"
    );
    // The real spawner still works.
    let p = Pool::new(
        view.clone(),
        PoolConfig {
            background: true,
            ..small_config()
        },
    )
    .unwrap();
    assert_eq!(view.usage().mappings, 1);
    drop(p);
    assert_eq!(view.usage().mappings, 0);
}

/// Pins the calling thread to the CPU it runs on, so that a test's releases and allocations
/// meet the same per-CPU cache (unpinned when dropped).
struct Pinned(nix::sched::CpuSet);

impl Pinned {
    fn here() -> Pinned {
        use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
        use nix::unistd::Pid;
        let before = sched_getaffinity(Pid::from_raw(0)).unwrap();
        let mut one = CpuSet::new();
        // SAFETY: sched_getcpu has no memory effects.
        one.set(unsafe { libc::sched_getcpu() }.max(0) as usize)
            .unwrap();
        sched_setaffinity(Pid::from_raw(0), &one).unwrap();
        Pinned(before)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &self.0);
    }
}

/// Every block on a cache's zeroed list carries the mark and is all zero; no released block
/// carries the mark.
fn assert_zeroed_lists_hold_zero_blocks(p: &Pool) -> usize {
    let mut marked = 0;
    for c in p.shared.caches.each() {
        let c = c.lock();
        for b in c.zeroed.iter().flatten() {
            assert!(b.zeroed(), "unmarked block on a zeroed list");
            let mut v = vec![0xEEu8; b.size()];
            // SAFETY: a free block in the cache whose lock we hold: nobody writes it.
            unsafe { crate::copy::copy_from_device(b.ptr.as_ptr(), &mut v) };
            assert!(v.iter().all(|&x| x == 0), "a block marked zero is not zero");
            marked += 1;
        }
        for b in c.classes.iter().flatten() {
            assert!(!b.zeroed(), "a released block carries the pre-zeroed mark");
        }
    }
    marked
}

#[test]
fn prezeroed_blocks_serve_from_device_maps_and_allocs_without_zeroing() {
    let _pin = Pinned::here();
    let p = pool(PoolConfig {
        prezero_bytes_per_pass: 1 << 20,
        cache_bytes_per_class: 64 << 10,
        ..small_config()
    });
    // Four written 4 KiB buffers released into this CPU's cache (its limit: 64 KiB).
    let bufs: Vec<_> = (0..4)
        .map(|i| {
            let mut b = p.try_alloc(4096).unwrap();
            b.write_at(0, &[0x11 * (i + 1); 4096]).unwrap();
            b
        })
        .collect();
    drop(bufs);
    assert_eq!(assert_zeroed_lists_hold_zero_blocks(&p), 0);
    let report = p.maintain();
    // The four released ones and the rest of the cache's refill, all of this CPU's cache.
    let n = report.prezeroed / 4096;
    assert!(n >= 4 && report.prezeroed % 4096 == 0, "{report:?}");
    assert_eq!(assert_zeroed_lists_hold_zero_blocks(&p), n);
    assert!(report.next_wake.is_some(), "looks again for more soon");
    assert_eq!(p.maintain().prezeroed, 0, "nothing left to zero");

    let mut dst = vec![0xFFu8; 4096];
    let m = p.try_map(&mut dst[..], Direction::FromDevice).unwrap();
    assert!(bytes(m.buffer()).iter().all(|&x| x == 0));
    // SAFETY: the mapping's block is ours; the "device" writes it.
    unsafe { crate::copy::copy_to_device(&[7u8; 100], m.buffer().as_ptr()) };
    m.unmap();
    assert_eq!(&dst[..100], &[7u8; 100][..]);
    assert!(dst[100..].iter().all(|&x| x == 0));
    let b = p.try_alloc(4000).unwrap();
    assert!(bytes(&b).iter().all(|&x| x == 0));
    drop(b);
    // A ToDevice map prefers a released block and leaves the zeroed ones alone.
    let src = vec![3u8; 4096];
    p.try_map(&src[..], Direction::ToDevice).unwrap().unmap();
    let s = p.stats();
    assert_eq!((s.prezero_hits, s.prezero_misses), (2, 4), "{s:?}");
    assert_eq!(s.prezeroed_bytes, n as u64 * 4096);
    // The two buffers released after use went to the released list (one of them then
    // served the ToDevice map).
    assert_eq!(assert_zeroed_lists_hold_zero_blocks(&p), n - 2);
    // Zeroed blocks are free space: a drain takes them back like any other.
    assert_eq!(p.shared.drain_caches(), n);
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn prezeroing_waits_for_an_idle_pool() {
    let _pin = Pinned::here();
    // The low watermark is the whole pool: the arena never has room beyond it.
    let p = pool(PoolConfig {
        prezero_bytes_per_pass: 1 << 20,
        low_watermark: 256 << 10,
        high_watermark: (256 << 10) * 2,
        ..small_config()
    });
    drop(p.try_alloc(4096).unwrap());
    assert_eq!(p.shared.prezero(1 << 20), 0);
    // Nor with a budget of nothing.
    let p = pool(PoolConfig {
        prezero_bytes_per_pass: 0,
        ..small_config()
    });
    drop(p.try_alloc(4096).unwrap());
    assert_eq!(p.maintain().prezeroed, 0);
    assert_eq!(assert_zeroed_lists_hold_zero_blocks(&p), 0);
}

#[test]
fn prezeroing_with_no_interval_is_a_config_error() {
    let cfg = PoolConfig {
        prezero_interval: Duration::ZERO,
        ..small_config()
    };
    match Pool::new(Arc::new(Identity::new()), cfg) {
        Err(PoolError::Config { field, .. }) => assert_eq!(field, "prezero_interval"),
        other => panic!("{other:?}"),
    }
}

mod prezero_props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// `alloc` a buffer of this size, check it is zero, let the caller write it.
        Alloc(usize),
        /// `FromDevice` map of this length: check zero, the device writes it, unmap.
        FromDevice(usize),
        /// `ToDevice` map of this length: caller bytes then a zero tail.
        ToDevice(usize),
        /// Release the held buffer at this index.
        Release(usize),
        /// A pre-zeroing pass of this many KiB.
        Prezero(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let len = prop_oneof![1usize..=512, 513usize..=4096, 4097usize..=(16 << 10)];
        prop_oneof![
            3 => len.clone().prop_map(Op::Alloc),
            3 => len.clone().prop_map(Op::FromDevice),
            2 => len.prop_map(Op::ToDevice),
            3 => any::<usize>().prop_map(Op::Release),
            2 => (0usize..64).prop_map(Op::Prezero),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// A block marked zero is all zero when handed out (every zero-wanting request sees
        /// zeroes; every marked block in a cache is zero), and a block a caller or device
        /// wrote is never marked (each is scribbled over before release, so a marked one
        /// would fail the all-zero check).
        #[test]
        fn marked_blocks_are_zero_and_written_blocks_are_never_marked(
            ops in prop::collection::vec(op(), 1..80),
        ) {
            let p = pool(PoolConfig {
                prezero_bytes_per_pass: 1 << 20,
                ..small_config()
            });
            let mut held: Vec<DmaBuf> = Vec::new();
            let mut requests = 0u64;
            for op in ops {
                match op {
                    Op::Alloc(len) => {
                        let mut b = p.try_alloc(len).unwrap();
                        requests += 1;
                        prop_assert!(bytes(&b).iter().all(|&x| x == 0), "alloc not zero");
                        let cap = b.capacity();
                        b.write_at(0, &vec![0xA5; cap]).unwrap();
                        held.push(b);
                    }
                    Op::FromDevice(len) => {
                        let mut dst = vec![0x5Au8; len];
                        let m = p.try_map(&mut dst[..], Direction::FromDevice).unwrap();
                        requests += 1;
                        prop_assert!(bytes(m.buffer()).iter().all(|&x| x == 0), "stale data");
                        let cap = m.buffer().capacity();
                        // SAFETY: our mapping's block; the "device" writes all of it.
                        unsafe { crate::copy::copy_to_device(&vec![0xC3; cap], m.buffer().as_ptr()) };
                        m.unmap();
                        prop_assert!(dst.iter().all(|&x| x == 0xC3));
                    }
                    Op::ToDevice(len) => {
                        let src = vec![0x77u8; len];
                        let m = p.try_map(&src[..], Direction::ToDevice).unwrap();
                        let seen = bytes(m.buffer());
                        prop_assert!(seen[..len].iter().all(|&x| x == 0x77));
                        prop_assert!(seen[len..].iter().all(|&x| x == 0), "stale tail");
                        m.unmap();
                    }
                    Op::Release(i) if !held.is_empty() => {
                        let i = i % held.len();
                        drop(held.swap_remove(i));
                    }
                    Op::Prezero(kib) => {
                        p.shared.prezero(kib << 10);
                    }
                    Op::Release(_) => {}
                }
                assert_zeroed_lists_hold_zero_blocks(&p);
            }
            drop(held);
            let s = p.stats();
            prop_assert_eq!(s.prezero_hits + s.prezero_misses, requests);
            prop_assert_eq!(s.in_use_bytes, 0);
        }
    }
}

#[test]
fn prezeroing_reaches_the_largest_and_smallest_classes() {
    let _pin = Pinned::here();
    let p = pool(PoolConfig {
        prezero_bytes_per_pass: 1 << 20,
        cache_bytes_per_class: 64 << 10,
        ..small_config()
    });
    // A 64 KiB block (a whole batch by itself) and a 512 B one, written and released.
    for len in [64 << 10, 512] {
        let mut b = p.try_alloc(len).unwrap();
        b.write_at(0, &vec![0x99; len]).unwrap();
        drop(b);
    }
    let before = assert_zeroed_lists_hold_zero_blocks(&p);
    assert_eq!(before, 0);
    let zeroed = p.maintain().prezeroed;
    assert!(zeroed >= (64 << 10) + 512, "{zeroed}");
    let mut big = vec![1u8; 64 << 10];
    let m = p.try_map(&mut big[..], Direction::FromDevice).unwrap();
    assert!(bytes(m.buffer()).iter().all(|&x| x == 0));
    m.unmap();
    let s = p.stats();
    assert_eq!(s.prezero_hits, 1, "{s:?}");
    assert_zeroed_lists_hold_zero_blocks(&p);
}

/// The idle floor: watermarks apply while something is allocated. A fresh pool does not grow
/// for nobody, a used one grows to its low watermark, and once wholly idle it shrinks back to
/// its prefill although that leaves less than `high_watermark` free.
#[test]
fn a_wholly_idle_pool_rests_at_its_prefill() {
    let p = pool(PoolConfig {
        low_watermark: 512 << 10,
        high_watermark: 768 << 10,
        max_bytes: 2 << 20,
        shrink_delay: Duration::from_millis(20),
        ..small_config()
    });
    assert_eq!(
        p.maintain().grew,
        0,
        "nothing allocated: no watermark growth"
    );
    assert_eq!(p.stats().capacity_bytes, 256 << 10);
    let b = p.try_alloc(64 << 10).unwrap();
    let grew: usize = (0..4).map(|_| p.maintain().grew).sum();
    assert_eq!(grew, 2, "in use: grown until the low watermark is free");
    assert_eq!(p.stats().capacity_bytes, 768 << 10);
    drop(b);
    std::thread::sleep(Duration::from_millis(30));
    let shrank: usize = (0..4).map(|_| p.maintain().shrank).sum();
    assert_eq!(shrank, 2);
    assert_eq!(p.stats().capacity_bytes, 256 << 10, "back to the prefill");
    assert_eq!(p.maintain().grew, 0, "and it stays there while idle");
}

/// A transient chunk is sized to its request (its block in whole pages), not to `max_buffer`.
#[test]
fn a_transient_chunk_is_sized_to_its_request() {
    let p = pool(PoolConfig {
        transient: true,
        max_bytes: 512 << 10,
        ..small_config()
    });
    let held: Vec<_> = (0..4).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    let small = p.try_alloc(4096).unwrap();
    let s = p.stats();
    assert_eq!(s.transient_allocs, 1);
    assert_eq!(
        s.capacity_bytes,
        (256 << 10) + 4096,
        "one 4 KiB page, not 64 KiB"
    );
    let odd = p.try_alloc(12 << 10).unwrap();
    assert_eq!(
        p.stats().capacity_bytes,
        (256 << 10) + 4096 + (16 << 10),
        "its 16 KiB block"
    );
    drop((small, odd));
    p.maintain();
    assert_eq!(
        p.stats().capacity_bytes,
        256 << 10,
        "idle transient chunks go back"
    );
    drop(held);
}
