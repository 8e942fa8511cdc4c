//! The pool's tracing span (growth) and events (growth, a long wait, shrink) and its wait histogram's buckets
//! and sum. In a test binary of its own: tracing caches each callsite's interest
//! process-wide, and a scoped subscriber can miss callsites other test threads registered.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Pool, PoolConfig, LONG_WAIT, WAIT_BUCKET_BOUNDS_NS};
use tidepool::share::identity::Identity;

/// Captures every event's level, message and fields on the thread it is set on.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for Capture {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::always()
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        self.0
            .lock()
            .unwrap()
            .push(format!("SPAN {}", span.metadata().name()));
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write as _;
                let _ = write!(self.0, " {}={:?}", field.name(), value);
            }
        }
        let mut fields = Fields(event.metadata().level().to_string());
        event.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn config() -> PoolConfig {
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
        shrink_delay: Duration::from_millis(30),
        peak_half_life: Duration::ZERO,
        reserve_bytes: 0,
        transient: false,
        grow_after: Duration::from_millis(1),
        cache_bytes_per_class: 16 << 10,
        background: false,
        ..PoolConfig::default()
    }
}

#[test]
fn growth_a_long_wait_and_shrink_are_logged_and_the_wait_is_in_its_bucket() {
    let capture = Capture::default();
    let events = capture.0.clone();
    tracing::subscriber::with_default(capture, || {
        let pool = Pool::new(Arc::new(Identity::new()), config()).unwrap();
        let held: Vec<_> = (0..4).map(|_| pool.try_alloc(64 << 10).unwrap()).collect();
        let mut waiting = Box::pin(pool.alloc(64 << 10));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            waiting.as_mut().poll(&mut cx).is_pending(),
            "the pool is full"
        );
        // Past LONG_WAIT before the growth serves the waiter.
        std::thread::sleep(LONG_WAIT + Duration::from_millis(5));
        assert_eq!(pool.maintain().grew, 1);
        let Poll::Ready(Ok(buf)) = waiting.as_mut().poll(&mut cx) else {
            panic!("the growth served the waiter");
        };
        let stats = pool.stats();
        assert_eq!(stats.wait.count, 1);
        assert!(
            stats.wait.sum_ns >= LONG_WAIT.as_nanos() as u64,
            "{:?}",
            stats.wait
        );
        // The wait took 15 ms or more: in the 100 ms bucket (and, if slow, later ones), not
        // in the 10 ms one.
        let by_bound: Vec<(u64, u64)> = stats
            .wait
            .buckets
            .iter()
            .map(|b| (b.le_ns, b.count))
            .collect();
        assert_eq!(by_bound.len(), WAIT_BUCKET_BOUNDS_NS.len());
        assert_eq!(by_bound[4], (10_000_000, 0));
        assert_eq!(by_bound[7], (10_000_000_000, 1));
        drop((held, buf, waiting));
        std::thread::sleep(Duration::from_millis(40));
        // The first pass still sees the held buffers' peak (it decays pass by pass).
        let shrank: usize = (0..3).map(|_| pool.maintain().shrank).sum();
        assert_eq!(shrank, 1);
    });
    let events = events.lock().unwrap();
    let has = |level: &str, message: &str| {
        events
            .iter()
            .any(|e| e.starts_with(level) && e.contains(message))
    };
    assert!(has("SPAN", "pool_growth"), "{events:?}");
    assert!(has("INFO", "pool grew by a chunk"), "{events:?}");
    assert!(
        has("INFO", "a request waited long for pool capacity"),
        "{events:?}"
    );
    assert!(has("INFO", "pool shrank"), "{events:?}");
}

/// An identity view that takes 20 ms per share (so a batch's threads overlap) and shares
/// only while its allowance lasts, then refuses with ENOMEM.
#[derive(Debug)]
struct SlowAllowance {
    inner: Identity,
    left: std::sync::atomic::AtomicI64,
}

impl tidepool::share::DeviceView for SlowAllowance {
    fn share(
        &self,
        region: &tidepool::memory::HostRegion<'_>,
    ) -> Result<tidepool::DeviceAddr, tidepool::share::ShareError> {
        std::thread::sleep(Duration::from_millis(20));
        if self.left.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) <= 0 {
            return Err(tidepool::share::ShareError::Os {
                what: "VFIO_IOMMU_MAP_DMA",
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        self.inner.share(region)
    }

    fn unshare(
        &self,
        region: &tidepool::memory::HostRegion<'_>,
        addr: tidepool::DeviceAddr,
    ) -> Result<(), tidepool::share::ShareError> {
        self.inner.unshare(region, addr)
    }

    fn usage(&self) -> tidepool::share::ShareUsage {
        self.inner.usage()
    }

    fn kind(&self) -> &'static str {
        "slow-allowance"
    }
}

#[test]
fn a_batch_logs_each_chunk_from_every_thread_and_its_failure_once() {
    let capture = Capture::default();
    let events = capture.0.clone();
    tracing::subscriber::with_default(capture, || {
        let view = Arc::new(SlowAllowance {
            inner: Identity::new(),
            left: std::sync::atomic::AtomicI64::new(i64::MAX / 2),
        });
        let pool = Pool::new(
            view.clone(),
            PoolConfig {
                growth_threads: 2,
                ..config()
            },
        )
        .unwrap();
        // Two more shares succeed (one on each thread: they overlap), the third is refused.
        view.left.store(2, std::sync::atomic::Ordering::SeqCst);
        let held: Vec<_> = (0..4).map(|_| pool.try_alloc(64 << 10).unwrap()).collect();
        let mut cx = Context::from_waker(Waker::noop());
        let mut waiting: Vec<_> = (0..12).map(|_| Box::pin(pool.alloc(64 << 10))).collect();
        for w in &mut waiting {
            assert!(w.as_mut().poll(&mut cx).is_pending());
        }
        std::thread::sleep(Duration::from_millis(2));
        let r = pool.maintain();
        assert_eq!((r.grew, r.failed), (2, 1), "{r:?}");
        drop((held, waiting));
    });
    let events = events.lock().unwrap();
    let count = |level: &str, message: &str| {
        events
            .iter()
            .filter(|e| e.starts_with(level) && e.contains(message))
            .count()
    };
    assert_eq!(count("INFO", "pool grew by a chunk"), 2, "{events:?}");
    assert_eq!(count("WARN", "pool growth failed"), 1, "{events:?}");
    let failed = events
        .iter()
        .find(|e| e.contains("pool growth failed"))
        .unwrap();
    assert!(
        failed.contains("chunks_made=2") && failed.contains("chunks_asked=3"),
        "{failed}"
    );
    assert!(failed.contains("VFIO_IOMMU_MAP_DMA"), "{failed}");
}
