//! Growth in batches: an attempt of several chunks makes them on several threads at once,
//! within the cap and the view's mapping slots, and a failure part-way leaves the pool
//! consistent (what was made is kept and used, the rest is no longer counted as coming, one
//! failure is recorded, growth resumes after the backoff).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering as O};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use super::tests::small_config;
use super::*;
use crate::share::identity::Identity;
use crate::share::{ShareError, ShareUsage};

type Waiting<'p> = Pin<Box<Alloc<'p>>>;

/// Takes the whole prefill, then queues `n` waiters of 64 KiB. Returns both.
fn fill_and_queue(p: &Pool, n: usize) -> (Vec<DmaBuf>, Vec<Waiting<'_>>) {
    let prefill = p.stats().capacity_bytes as usize / (64 << 10);
    let held: Vec<_> = (0..prefill)
        .map(|_| p.try_alloc(64 << 10).unwrap())
        .collect();
    let mut cx = Context::from_waker(Waker::noop());
    let waiting: Vec<_> = (0..n)
        .map(|_| {
            let mut f = Box::pin(p.alloc(64 << 10));
            assert!(f.as_mut().poll(&mut cx).is_pending(), "the pool is full");
            f
        })
        .collect();
    // Past grow_after: the grower's next step is a forced growth.
    std::thread::sleep(Duration::from_millis(2));
    (held, waiting)
}

/// Polls every waiter once; returns the buffers of those served (removed from `waiting`).
fn take_served(waiting: &mut Vec<Waiting<'_>>) -> Vec<DmaBuf> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut served = Vec::new();
    waiting.retain_mut(|f| match f.as_mut().poll(&mut cx) {
        Poll::Ready(r) => {
            served.push(r.expect("a waiter is served, not failed"));
            false
        }
        Poll::Pending => true,
    });
    served
}

fn growing_bytes(p: &Pool) -> u64 {
    p.shared.global.lock().unwrap().growing_bytes
}

#[test]
fn growth_workers_follow_the_setting_the_cpus_and_the_chunks() {
    let cfg = |growth_threads| PoolConfig {
        growth_threads,
        ..PoolConfig::default()
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(cfg(0).growth_workers(64), cpus.min(MAX_GROWTH_THREADS));
    assert_eq!(cfg(3).growth_workers(64), 3);
    assert_eq!(cfg(3).growth_workers(2), 2, "no more threads than chunks");
    assert_eq!(cfg(3).growth_workers(0), 1);
    assert_eq!(cfg(100).growth_workers(64), MAX_GROWTH_THREADS);
}

#[test]
fn the_high_watermark_may_be_as_low_as_the_low_one() {
    let cfg = PoolConfig {
        low_watermark: 4 << 20,
        high_watermark: 4 << 20,
        ..PoolConfig::default()
    };
    cfg.validate().unwrap();
    let e = PoolConfig {
        high_watermark: (4 << 20) - 1,
        ..cfg
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("high_watermark"), "{e}");
}

#[test]
fn a_batch_grows_several_chunks_at_once_up_to_the_cap() {
    let view = Arc::new(Identity::new());
    let p = Pool::new(
        view.clone(),
        PoolConfig {
            growth_threads: 2,
            ..small_config()
        },
    )
    .unwrap();
    // 20 waiters of 64 KiB = 1.25 MiB; the cap leaves room for 3 chunks of 256 KiB.
    let (held, mut waiting) = fill_and_queue(&p, 20);
    let r = p.maintain();
    assert_eq!((r.grew, r.failed), (3, 0), "{r:?}");
    assert!(r.forced);
    let s = p.stats();
    assert_eq!(
        (s.capacity_bytes, s.chunks, s.grows, s.mappings.mappings),
        (1 << 20, 4, 3, 4)
    );
    assert_eq!(view.usage().mappings, 4, "one mapping per chunk");
    assert_eq!(growing_bytes(&p), 0);
    let served = take_served(&mut waiting);
    assert_eq!((served.len(), waiting.len()), (12, 8));
    // At the cap: nothing more is attempted.
    let r = p.maintain();
    assert_eq!((r.grew, r.failed), (0, 0), "{r:?}");
    drop((held, served, waiting));
    assert_eq!(p.stats().in_use_bytes, 0);
    drop(p);
    assert_eq!(view.usage().mappings, 0, "every chunk unshared");
}

#[test]
fn a_batch_stays_within_the_mapping_slots() {
    // Three slots, the prefill takes one: a 4 MiB cap must be reached in two chunks.
    let view = Arc::new(Identity::with_limit(3));
    let p = Pool::new(
        view.clone(),
        PoolConfig {
            growth_threads: 4,
            max_bytes: 4 << 20,
            ..small_config()
        },
    )
    .unwrap();
    let (held, mut waiting) = fill_and_queue(&p, 64);
    let r = p.maintain();
    assert_eq!((r.grew, r.failed), (2, 0), "{r:?}");
    let s = p.stats();
    assert_eq!((s.capacity_bytes, s.mappings.mappings), (4 << 20, 3));
    assert_eq!(s.growth_failures, 0);
    assert_eq!(growing_bytes(&p), 0);
    let served = take_served(&mut waiting);
    assert_eq!(served.len(), 60, "3.75 MiB grown: 60 of 64 waiters");
    drop((held, served, waiting));
}

/// An identity view that shares only while its allowance lasts, then refuses with ENOMEM
/// (an IOMMU out of memory part-way through a batch).
#[derive(Debug)]
struct Allowance {
    inner: Identity,
    left: AtomicI64,
}

impl crate::share::DeviceView for Allowance {
    fn share(
        &self,
        region: &crate::memory::HostRegion<'_>,
    ) -> Result<crate::DeviceAddr, ShareError> {
        if self.left.fetch_sub(1, O::SeqCst) <= 0 {
            return Err(ShareError::Os {
                what: "VFIO_IOMMU_MAP_DMA",
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        self.inner.share(region)
    }

    fn unshare(
        &self,
        region: &crate::memory::HostRegion<'_>,
        addr: crate::DeviceAddr,
    ) -> Result<(), ShareError> {
        self.inner.unshare(region, addr)
    }

    fn usage(&self) -> ShareUsage {
        self.inner.usage()
    }

    fn kind(&self) -> &'static str {
        "allowance-identity"
    }
}

#[test]
fn a_failed_batch_keeps_what_it_made_and_leaves_the_pool_consistent() {
    let view = Arc::new(Allowance {
        inner: Identity::new(),
        left: AtomicI64::new(1),
    });
    let p = Pool::new(
        view.clone(),
        PoolConfig {
            growth_threads: 2,
            ..small_config()
        },
    )
    .unwrap();
    // The prefill took the allowance; one more chunk may be shared, then the IOMMU refuses.
    view.left.store(1, O::SeqCst);
    let (held, mut waiting) = fill_and_queue(&p, 12);
    let r = p.maintain();
    assert_eq!(
        (r.grew, r.failed),
        (1, 1),
        "{r:?} {:?}",
        p.stats().last_growth_error
    );
    let s = p.stats();
    assert_eq!(
        (
            s.capacity_bytes,
            s.mappings.mappings,
            s.grows,
            s.growth_failures
        ),
        (512 << 10, 2, 1, 1)
    );
    assert!(
        s.last_growth_error
            .as_deref()
            .is_some_and(|e| e.contains("VFIO_IOMMU_MAP_DMA")),
        "{s:?}"
    );
    // The chunks that were not made are no longer counted as coming.
    assert_eq!(growing_bytes(&p), 0);
    // The chunk that was made serves 4 waiters; the rest keep waiting (AtCap::Wait, within
    // growth_failure_wait).
    let mut served = take_served(&mut waiting);
    assert_eq!((served.len(), waiting.len()), (4, 8));
    // In the backoff nothing is attempted.
    let r = p.maintain();
    assert_eq!((r.grew, r.failed), (0, 0), "{r:?}");
    // Growth works again after the backoff: the cap is reached exactly (nothing of the failed
    // attempt is still counted against it) and every waiter is served.
    view.left.store(i64::MAX / 2, O::SeqCst);
    std::thread::sleep(Duration::from_millis(10));
    let r = p.maintain();
    assert_eq!((r.grew, r.failed), (2, 0), "{r:?}");
    assert_eq!(p.stats().capacity_bytes, 1 << 20);
    served.extend(take_served(&mut waiting));
    assert_eq!((served.len(), waiting.len()), (12, 0));
    drop((held, served, waiting));
    assert_eq!(p.stats().in_use_bytes, 0);
    drop(p);
    assert_eq!(view.usage().mappings, 0, "every chunk unshared");
}

#[test]
fn a_watermark_crossing_grows_by_the_rate_of_rising_demand() {
    let p = Pool::new(
        Arc::new(Identity::new()),
        PoolConfig {
            prefill_bytes: 512 << 10,
            max_bytes: 4 << 20,
            low_watermark: 128 << 10,
            high_watermark: 384 << 10,
            growth_threads: 2,
            cache_bytes_per_class: 0,
            ..small_config()
        },
    )
    .unwrap();
    // The first crossing (7 of 8 blocks taken), with nothing known yet about how long growth
    // takes: the deficit alone, one chunk.
    let mut held: Vec<_> = (0..7).map(|_| p.try_alloc(64 << 10).unwrap()).collect();
    let r = p.maintain();
    assert_eq!(r.grew, 1, "{r:?}");
    // Demand rises by 256 KiB before the next look, and the latest attempt took as long as
    // the time since that look (a grower busy growing back to back, as in a burst): the
    // crossing grows by the 64 KiB deficit plus the rise, two chunks, not one.
    p.shared.global.lock().unwrap().last_growth_took = Duration::from_secs(3600);
    held.extend((0..4).map(|_| p.try_alloc(64 << 10).unwrap()));
    let s = p.stats();
    assert_eq!(
        s.capacity_bytes - s.in_use_bytes,
        64 << 10,
        "below the watermark"
    );
    let r = p.maintain();
    assert_eq!(r.grew, 2, "{r:?}");
    // The same crossing after a rise that was slow next to how fast growth is: the deficit
    // alone again.
    p.shared.global.lock().unwrap().last_growth_took = Duration::ZERO;
    held.extend((0..8).map(|_| p.try_alloc(64 << 10).unwrap()));
    let s = p.stats();
    assert_eq!(
        s.capacity_bytes - s.in_use_bytes,
        64 << 10,
        "below the watermark"
    );
    let r = p.maintain();
    assert_eq!(r.grew, 1, "{r:?}");
    drop(held);
}

/// An identity view that notes which thread shared each chunk, and takes 20 ms to share (an
/// IOMMU map of a large chunk), so that a batch's threads overlap.
#[derive(Debug, Default)]
struct SlowRecorder {
    inner: Identity,
    threads: std::sync::Mutex<Vec<String>>,
}

impl crate::share::DeviceView for SlowRecorder {
    fn share(
        &self,
        region: &crate::memory::HostRegion<'_>,
    ) -> Result<crate::DeviceAddr, ShareError> {
        let t = std::thread::current();
        self.threads
            .lock()
            .unwrap()
            .push(t.name().unwrap_or("?").to_owned());
        std::thread::sleep(Duration::from_millis(20));
        self.inner.share(region)
    }

    fn unshare(
        &self,
        region: &crate::memory::HostRegion<'_>,
        addr: crate::DeviceAddr,
    ) -> Result<(), ShareError> {
        self.inner.unshare(region, addr)
    }

    fn usage(&self) -> ShareUsage {
        self.inner.usage()
    }

    fn kind(&self) -> &'static str {
        "slow-identity"
    }
}

#[test]
fn a_batch_makes_its_chunks_on_several_threads_and_one_alone_on_the_grower() {
    for (threads, want) in [(2, 2), (1, 1)] {
        let view = Arc::new(SlowRecorder::default());
        let p = Pool::new(
            view.clone(),
            PoolConfig {
                growth_threads: threads,
                ..small_config()
            },
        )
        .unwrap();
        view.threads.lock().unwrap().clear();
        let (held, mut waiting) = fill_and_queue(&p, 12);
        let t0 = std::time::Instant::now();
        let r = p.maintain();
        let took = t0.elapsed();
        assert_eq!(r.grew, 3, "{r:?}");
        let names = view.threads.lock().unwrap().clone();
        let mut distinct = names.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), want, "threads {threads}: {names:?}");
        if threads == 2 {
            assert!(
                names.iter().any(|n| n.starts_with("tidepool-grow")),
                "{names:?}"
            );
        } else {
            // Three 20 ms shares one after the other.
            assert!(took >= Duration::from_millis(60), "{took:?}");
        }
        let served = take_served(&mut waiting);
        assert_eq!(served.len(), 12);
        drop((held, served, waiting));
    }
}
