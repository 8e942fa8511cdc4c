//! Families for the library's public statistics snapshots.
//!
//! Each function adds one snapshot's series under the given labels (say `pool="nvme0"` or
//! `controller="0000:00:04.0",queue="1"`), so several pools or queues share one family each.
//! Names: `tidepool_pool_*` ([`PoolStats`]), `tidepool_direct_*` ([`DirectStats`]),
//! `tidepool_nvme_queue_*` ([`QueueCounters`]), `tidepool_net_*` ([`NetStats`]).
//!
//! The pool's wait times are a Prometheus *histogram* (`tidepool_pool_wait_seconds`: the pool's
//! cumulative buckets, 1 µs to 10 s by decades, with `_sum` and `_count`) plus
//! `tidepool_pool_wait_max_seconds`.

use tidepool::pool::PoolStats;
use tidepool::share::direct::DirectStats;
use tidepool_nvme::QueueCounters;
use tidepool_virtio_net::NetStats;

use crate::{Exposition, MetricsError};

const NS_PER_SECOND: f64 = 1e9;

/// Adds a pool snapshot: capacity and use gauges, slow-path counters, the wait summary, the
/// device view's mapping use, and the last growth error as an info series.
pub fn pool(
    metrics: &mut Exposition,
    labels: &[(&str, &str)],
    stats: &PoolStats,
) -> Result<(), MetricsError> {
    let gauges: [(&str, &str, u64); 8] = [
        (
            "tidepool_pool_capacity_bytes",
            "Bytes shared with the device: prefill, growth and transient chunks.",
            stats.capacity_bytes,
        ),
        (
            "tidepool_pool_in_use_bytes",
            "Bytes of buffers handed out and not yet released (block sizes, after rounding).",
            stats.in_use_bytes,
        ),
        (
            "tidepool_pool_peak_allocated_bytes",
            "Highest bytes taken out of the chunks' allocators (in use plus per-core cached).",
            stats.peak_allocated_bytes,
        ),
        (
            "tidepool_pool_chunks",
            "Chunks (device mappings) the pool holds.",
            stats.chunks,
        ),
        (
            "tidepool_pool_waiters",
            "Awaitable requests waiting for capacity now.",
            stats.waiters,
        ),
        (
            "tidepool_pool_waiting_bytes",
            "Bytes the waiting requests want.",
            stats.waiting_bytes,
        ),
        (
            "tidepool_pool_device_mappings",
            "Live mappings made through the pool's device view.",
            stats.mappings.mappings,
        ),
        (
            "tidepool_pool_device_shared_bytes",
            "Bytes the pool's device view has shared.",
            stats.mappings.bytes,
        ),
    ];
    for (name, help, value) in gauges {
        metrics.gauge_int(name, help, labels, value)?;
    }
    if let Some(limit) = stats.mappings.mapping_limit {
        metrics.gauge_int(
            "tidepool_pool_device_mapping_limit",
            "The device view's limit on live mappings (VFIO's dma_avail, vhost-user's memory slots).",
            labels,
            limit,
        )?;
    }
    let counters: [(&str, &str, u64); 10] = [
        (
            "tidepool_pool_waits_total",
            "Awaitable requests that waited for capacity and got it (timeouts: tidepool_pool_wait_timeouts_total).",
            stats.waits,
        ),
        (
            "tidepool_pool_wait_timeouts_total",
            "Waits that ended in a timeout.",
            stats.timeouts,
        ),
        (
            "tidepool_pool_grows_total",
            "Chunks added after creation.",
            stats.grows,
        ),
        (
            "tidepool_pool_sync_grows_total",
            "Growths forced by a waiter that waited past grow_after.",
            stats.sync_grows,
        ),
        (
            "tidepool_pool_shrinks_total",
            "Chunks given back to the kernel.",
            stats.shrinks,
        ),
        (
            "tidepool_pool_growth_failures_total",
            "Failed growth attempts (see tidepool_pool_last_growth_error_info).",
            stats.growth_failures,
        ),
        (
            "tidepool_pool_transient_allocs_total",
            "One-off chunks made for the immediate path.",
            stats.transient_allocs,
        ),
        (
            "tidepool_pool_reserve_allocs_total",
            "Immediate requests served from the reserve.",
            stats.reserve_allocs,
        ),
        (
            "tidepool_pool_immediate_failures_total",
            "Immediate requests that failed.",
            stats.immediate_failures,
        ),
        (
            "tidepool_pool_cache_refills_total",
            "Per-core cache refills from the shared allocator.",
            stats.cache_refills,
        ),
    ];
    for (name, help, value) in counters {
        metrics.counter(name, help, labels, value)?;
    }
    let seconds = |ns: u64| ns as f64 / NS_PER_SECOND;
    // Every bound always, so the series are the same whether or not anything waited yet.
    let buckets: Vec<(f64, u64)> = tidepool::pool::WAIT_BUCKET_BOUNDS_NS
        .iter()
        .map(|&le_ns| {
            let count = stats
                .wait
                .buckets
                .iter()
                .find(|b| b.le_ns == le_ns)
                .map_or(0, |b| b.count);
            (seconds(le_ns), count)
        })
        .collect();
    metrics.histogram(
        "tidepool_pool_wait_seconds",
        "How long awaitable requests that got capacity waited for it (since the pool was made).",
        labels,
        &buckets,
        stats.wait.count,
        seconds(stats.wait.sum_ns),
    )?;
    metrics.gauge(
        "tidepool_pool_wait_max_seconds",
        "The longest wait for capacity since the pool was made.",
        labels,
        seconds(stats.wait.max_ns),
    )?;
    if let Some(error) = &stats.last_growth_error {
        let mut with_error: Vec<(&str, &str)> = labels.to_vec();
        with_error.push(("error", error));
        metrics.gauge_int(
            "tidepool_pool_last_growth_error_info",
            "Why the last growth failed (the error label); absent while growth never failed.",
            &with_error,
            1,
        )?;
    }
    Ok(())
}

/// Adds a direct mapper's counters (zero-copy registrations of caller memory).
pub fn direct(
    metrics: &mut Exposition,
    labels: &[(&str, &str)],
    stats: &DirectStats,
) -> Result<(), MetricsError> {
    let counters: [(&str, &str, u64); 5] = [
        (
            "tidepool_direct_cache_hits_total",
            "Registered-buffer maps served from the mapping cache (no system call).",
            stats.hits,
        ),
        (
            "tidepool_direct_cache_misses_total",
            "Registered-buffer maps that had to share memory with the device.",
            stats.misses,
        ),
        (
            "tidepool_direct_maps_total",
            "Successful shares of caller memory.",
            stats.maps,
        ),
        (
            "tidepool_direct_unmaps_total",
            "Successful unshares of caller memory.",
            stats.unmaps,
        ),
        (
            "tidepool_direct_unmap_errors_total",
            "Failed unshares (that memory stays device-visible and is never reused).",
            stats.unmap_errors,
        ),
    ];
    for (name, help, value) in counters {
        metrics.counter(name, help, labels, value)?;
    }
    Ok(())
}

/// Adds one NVMe queue's counters.
pub fn nvme_queue(
    metrics: &mut Exposition,
    labels: &[(&str, &str)],
    counters: &QueueCounters,
) -> Result<(), MetricsError> {
    let rows: [(&str, &str, u64); 6] = [
        (
            "tidepool_nvme_queue_sq_doorbell_writes_total",
            "Submission-queue tail doorbell register writes.",
            counters.sq_doorbell_writes,
        ),
        (
            "tidepool_nvme_queue_sq_doorbells_avoided_total",
            "Submission-queue tail updates that needed no register write (shadow doorbells).",
            counters.sq_doorbells_avoided,
        ),
        (
            "tidepool_nvme_queue_cq_doorbell_writes_total",
            "Completion-queue head doorbell register writes.",
            counters.cq_doorbell_writes,
        ),
        (
            "tidepool_nvme_queue_cq_doorbells_avoided_total",
            "Completion-queue head updates that needed no register write (shadow doorbells).",
            counters.cq_doorbells_avoided,
        ),
        (
            "tidepool_nvme_queue_completions_dropped_total",
            "Completions dropped by fault injection.",
            counters.completions_dropped,
        ),
        (
            "tidepool_nvme_queue_completion_entries_total",
            "Entries taken from the completion ring, valid or not.",
            counters.entries_consumed,
        ),
    ];
    for (name, help, value) in rows {
        metrics.counter(name, help, labels, value)?;
    }
    Ok(())
}

/// Adds one virtio-net device's counters.
pub fn net(
    metrics: &mut Exposition,
    labels: &[(&str, &str)],
    stats: &NetStats,
) -> Result<(), MetricsError> {
    let rows: [(&str, &str, u64); 9] = [
        (
            "tidepool_net_rx_frames_total",
            "Frames received and handed to the caller.",
            stats.rx_frames,
        ),
        (
            "tidepool_net_rx_bytes_total",
            "Bytes of the frames received (without the virtio header).",
            stats.rx_bytes,
        ),
        (
            "tidepool_net_rx_runts_total",
            "Receive completions shorter than the virtio header (dropped).",
            stats.rx_runts,
        ),
        (
            "tidepool_net_rx_alloc_failures_total",
            "Receive refills stopped because the pool's immediate path had nothing.",
            stats.rx_alloc_failures,
        ),
        (
            "tidepool_net_rx_recycled_total",
            "Receive buffers posted again without going through the pool.",
            stats.rx_recycled,
        ),
        (
            "tidepool_net_tx_frames_total",
            "Frames queued for sending.",
            stats.tx_frames,
        ),
        (
            "tidepool_net_tx_bytes_total",
            "Bytes of the frames queued for sending.",
            stats.tx_bytes,
        ),
        (
            "tidepool_net_tx_completed_total",
            "Transmit buffers the device completed.",
            stats.tx_completed,
        ),
        (
            "tidepool_net_notifications_total",
            "Doorbells rung (both queues).",
            stats.notifications,
        ),
    ];
    for (name, help, value) in rows {
        metrics.counter(name, help, labels, value)?;
    }
    Ok(())
}
