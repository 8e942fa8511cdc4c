//! The growth-speed measurement on the identity view with locked 4 KiB pages (needs
//! `RLIMIT_MEMLOCK` ≥ 16 MiB or root): every measurement produces a time for each growth
//! threads setting, and the burst's and the batch's new capacity covers what was asked for.

use tidepool::memory::PageSize;
use tidepool_lab::growth::{identity_view, measure, median};

#[test]
fn crossing_and_burst_are_measured_on_a_real_pool() {
    let rows = measure(
        "identity",
        &mut identity_view,
        PageSize::Small4K,
        2 << 20,
        4 << 20,
        2,
        &[1, 2],
    );
    assert_eq!(rows.len(), 2);
    for (r, threads) in rows.iter().zip([1, 2]) {
        assert_eq!(r.error, None);
        assert_eq!((r.growth_threads, r.threads_used), (threads, threads));
        assert_eq!(
            (r.crossing_ms.len(), r.burst_ms.len(), r.batch_gbps.len()),
            (2, 2, 2)
        );
        assert!(r
            .crossing_ms
            .iter()
            .all(|&ms| (0.0..20_000.0).contains(&ms)));
        // At least the 4 MiB burst was grown, within the burst's time: a rate above 0.
        assert!(r.burst_gbps.iter().all(|&g| g > 0.0), "{r:?}");
        assert!(median(&r.burst_ms) > 0.0);
        // The batch step made the whole 4 MiB (two 2 MiB chunks) in one attempt.
        assert_eq!(r.batch_chunks, vec![2, 2], "{r:?}");
        assert!(r.batch_gbps.iter().all(|&g| g > 0.0), "{r:?}");
    }
}

#[test]
fn one_gib_pages_that_cannot_be_had_are_reported_not_fatal() {
    // Only meaningful where no 1 GiB page is reserved (as on the dev box).
    let reserved =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
    if reserved > 0 {
        return;
    }
    let r = measure(
        "identity",
        &mut identity_view,
        PageSize::Huge1G,
        1 << 30,
        1 << 30,
        1,
        &[1],
    );
    let e = r[0].error.clone().expect("no 1 GiB page: an error row");
    assert!(e.contains("hugepages"), "{e}");
}
