//! The tokio AsyncQueue over the emulated controller's MSI-X eventfds: I/O, cancellation.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tidepool::data::{DmaData, PageBuf};
use tidepool::pool::Direction;
use tidepool_nvme::{AsyncConfig, AsyncQueue, ControllerConfig, NvmeError};

fn async_config() -> ControllerConfig {
    ControllerConfig {
        interrupts: true,
        ..ctrl_config()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn async_read_and_write_are_driven_by_interrupts() {
    let rig = Rig::with(emu_config(), async_config());
    let rt = runtime();
    let q = rt.block_on(async {
        let cfg = AsyncConfig {
            spin: Duration::ZERO,
            tick: Duration::from_secs(5),
        };
        let q = AsyncQueue::new(&rig.ctrl, 16, cfg).unwrap();
        let data = pattern(300 << 10, 2);
        q.write(&rig.ns, 8, &data).await.unwrap();
        let mut back = vec![0u8; data.len()];
        q.read(&rig.ns, 8, &mut back).await.unwrap();
        assert_eq!(back, data);
        q.flush(&rig.ns).await.unwrap();
        q
    });
    assert_eq!(rig.ns_bytes(8 * 512, 300 << 10), pattern(300 << 10, 2));
    let w = q.wake_counts();
    assert!(
        w.interrupt_wakes > 0 && w.completions_after_interrupt >= 7,
        "{w:?}"
    );
    assert!(rig.nvme.stats().interrupts > 0);
    drop(q);
    drop(rt);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn async_read_data_and_write_data_with_bounce_and_owned() {
    let rig = Rig::with(emu_config(), async_config());
    let rt = runtime();
    rt.block_on(async {
        let q = AsyncQueue::new(&rig.ctrl, 8, AsyncConfig::default()).unwrap();
        let data = pattern(8192, 4);
        let w = DmaData::try_bounce(&rig.pool, data.clone(), Direction::ToDevice).unwrap();
        let (r, w) = q.write_data(&rig.ns, 0, w).await;
        r.unwrap();
        drop(w.unwrap().complete());
        let r = DmaData::try_bounce(&rig.pool, vec![0u8; 8192], Direction::FromDevice).unwrap();
        let (res, r) = q.read_data(&rig.ns, 0, r).await;
        res.unwrap();
        let got = r
            .unwrap()
            .complete()
            .into_memory()
            .unwrap()
            .into_vec()
            .unwrap();
        assert_eq!(got, data);
        let buf = q
            .read_buf(&rig.ns, 0, rig.pool.try_alloc(8192).unwrap())
            .await
            .unwrap();
        let mut b = vec![0u8; 8192];
        buf.read_at(0, &mut b).unwrap();
        assert_eq!(b, data);
        // Refusals give the data back.
        let big = DmaData::try_bounce(&rig.pool, vec![0u8; 4096], Direction::FromDevice).unwrap();
        let (res, back) = q.read_data(&rig.ns, rig.ns.blocks(), big).await;
        assert!(matches!(res, Err(NvmeError::LbaOutOfRange { .. })));
        assert!(back.is_some());
        let page =
            DmaData::try_bounce(&rig.pool, PageBuf::zeroed(4096), Direction::FromDevice).unwrap();
        drop(q.read_data(&rig.ns, 0, page).await);
    });
    drop(rt);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn a_dropped_future_leaves_the_buffer_with_the_device_until_it_completes() {
    let rig = Rig::with(emu_config(), async_config());
    let rt = runtime();
    let q = rt.block_on(async { AsyncQueue::new(&rig.ctrl, 8, AsyncConfig::default()).unwrap() });
    let base = rig.in_use();
    rig.nvme
        .faults()
        .delay_completions(Duration::from_millis(100));
    let data = rig.pool.try_alloc(64 << 10).unwrap();
    let size = rig.in_use() - base;
    let fut = {
        let q = q.clone();
        let ns = rig.ns;
        async move { q.read_data(&ns, 0, data.into()).await }
    };
    // Start the read, then drop the future mid-I/O.
    rt.block_on(async {
        tokio::select! {
            _ = fut => panic!("the read cannot complete within 20 ms"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    });
    assert_eq!(q.outstanding(), 1, "the command is still on the device");
    assert_eq!(rig.in_use() - base, size, "its buffer is still held");
    wait_for(|| q.outstanding() == 0, "the device completes the read");
    wait_for(|| rig.in_use() == base, "the reaper frees the buffer");
    rig.nvme.faults().clear();
    drop(q);
    drop(rt);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn async_queues_need_interrupts() {
    let rig = Rig::new();
    let rt = runtime();
    let err = rt
        .block_on(async { AsyncQueue::new(&rig.ctrl, 8, AsyncConfig::default()) })
        .unwrap_err();
    assert!(matches!(err, NvmeError::Unsupported(_)), "{err}");
    // The polled queue IDs are all still free.
    let qs: Vec<_> = (0..4).map(|_| rig.queue(4)).collect();
    drop(qs);
    drop(rt);
    rig.finish();
}

#[test]
fn async_timeout_is_noticed_by_the_tick_and_recovered() {
    let rig = Rig::with(emu_config(), async_config());
    let rt = runtime();
    rt.block_on(async {
        let cfg = AsyncConfig {
            spin: Duration::ZERO,
            tick: Duration::from_millis(10),
        };
        let q = AsyncQueue::new(&rig.ctrl, 4, cfg).unwrap();
        rig.nvme.faults().drop_completions(1);
        let mut b = vec![0u8; 512];
        let err = q.read(&rig.ns, 0, &mut b).await.unwrap_err();
        assert!(matches!(err, NvmeError::ControllerReset { .. }), "{err}");
    });
    rig.ctrl.recover().unwrap();
    rt.block_on(async {
        let q = AsyncQueue::new(&rig.ctrl, 4, AsyncConfig::default()).unwrap();
        q.write(&rig.ns, 0, &[7u8; 512]).await.unwrap();
    });
    assert_eq!(rig.ns_bytes(0, 512), vec![7u8; 512]);
    drop(rt);
    rig.finish();
}

#[test]
fn runtime_shutdown_with_io_in_flight_frees_nothing_the_device_can_reach() {
    let rig = Rig::with(emu_config(), async_config());
    let rt = runtime();
    let q = rt.block_on(async { AsyncQueue::new(&rig.ctrl, 8, AsyncConfig::default()).unwrap() });
    rig.nvme.faults().hold_next_command();
    let data = rig.pool.try_alloc(8192).unwrap();
    {
        let q = q.clone();
        let ns = rig.ns;
        rt.spawn(async move { q.read_data(&ns, 0, data.into()).await });
    }
    wait_for(
        || rig.nvme.stats().held_dma_writes > 0,
        "the held command's DMA",
    );
    // The runtime goes away with the reaper and the waiting task; then the last handle.
    drop(rt);
    drop(q);
    // Whatever went back to the pool, the device no longer reaches it.
    let writes = rig.nvme.stats().held_dma_writes;
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        rig.nvme.stats().held_dma_writes,
        writes,
        "the device still DMAs after the queue's memory was freed"
    );
    assert_eq!(rig.nvme.stats().dma_after_bus_master_off, 0);
    assert_eq!(
        rig.in_use(),
        rig.baseline,
        "the rings and the buffer are back"
    );
    // The controller comes back and queue 1 is usable again.
    rig.ctrl.recover().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let q = AsyncQueue::new(&rig.ctrl, 8, AsyncConfig::default()).unwrap();
        q.write(&rig.ns, 0, &[3u8; 512]).await.unwrap();
    });
    drop(rt);
    assert_eq!(rig.ns_bytes(0, 512), vec![3u8; 512]);
    rig.finish();
}

#[test]
fn a_failed_eventfd_registration_deletes_the_queue_and_frees_its_id() {
    let cfg = ControllerConfig {
        io_queues: 1,
        ..async_config()
    };
    let rig = Rig::with(emu_config(), cfg);
    // A handle of a runtime that has shut down: registering with its reactor fails.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = rt.handle().clone();
    drop(rt);
    let err = {
        let _in = handle.enter();
        AsyncQueue::new(&rig.ctrl, 8, AsyncConfig::default()).unwrap_err()
    };
    assert!(matches!(err, NvmeError::Os { .. }), "{err}");
    assert_eq!(rig.nvme.admin_commands(0x00), 1, "the queue was deleted");
    assert_eq!(rig.in_use(), rig.baseline);
    // The one queue ID (and its vector) can be used again.
    let q = rig.queue(4);
    assert_eq!(q.qid(), 1);
    drop(q);
    let rt = runtime();
    rt.block_on(async {
        let q = AsyncQueue::new(&rig.ctrl, 8, AsyncConfig::default()).unwrap();
        q.write(&rig.ns, 0, &[5u8; 512]).await.unwrap();
    });
    drop(rt);
    rig.finish();
}

/// A read waiting behind a full queue holds no pool memory: each command takes its queue slot
/// before its bounce buffer, so while eight 64 KiB reads share a queue of depth 2 (the device
/// slowed down so that they pile up) only reads in flight or just completed hold one. Before,
/// every waiting read held its buffer: the pool had to hold the backlog.
#[test]
fn reads_behind_a_full_queue_hold_no_pool_memory() {
    const LEN: usize = 64 << 10;
    let rig = Rig::with(emu_config(), async_config());
    let rt = runtime();
    let q = rt.block_on(async { AsyncQueue::new(&rig.ctrl, 2, AsyncConfig::default()).unwrap() });
    let with_queue = rig.in_use();
    rig.nvme
        .faults()
        .delay_completions(Duration::from_millis(30));
    let peak = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..8u64 {
            let (q, ns) = (q.clone(), rig.ns);
            tasks.spawn(async move {
                let mut buf = vec![0u8; LEN];
                q.read(&ns, i * 128, &mut buf).await
            });
        }
        let mut peak = 0;
        while !tasks.is_empty() {
            peak = peak.max(rig.in_use() - with_queue);
            tokio::select! {
                done = tasks.join_next() => done.unwrap().unwrap().unwrap(),
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
        }
        peak
    });
    rig.nvme.faults().delay_completions(Duration::ZERO);
    assert!(peak > 0, "the reads were sampled while in flight");
    // At most the queue's depth in flight, plus as many completed reads whose tasks have not
    // yet run to copy out and free their buffers (each completion frees a slot at once): 4 of
    // the 8 reads' buffers. Had waiting reads taken theirs before a slot, all 8 would be held.
    assert!(
        peak <= 2 * 2 * LEN as u64,
        "{peak} B of buffers at once for a queue of depth 2"
    );
    drop(q);
    drop(rt);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

/// `close` returns only once every handle is gone and the reaper has deleted the queue and
/// dropped its controller handle: the caller's controller is then the last one, and dropping
/// it releases the device at once (what reopening a VFIO cdev needs: it binds once at a time).
#[test]
fn close_waits_for_every_handle_and_the_reaper() {
    let Rig {
        nvme,
        ctrl,
        ns,
        pool,
        baseline,
    } = Rig::with(emu_config(), async_config());
    let rt = runtime();
    let held_for = Duration::from_millis(100);
    let waited = rt.block_on(async {
        let q = AsyncQueue::new(&ctrl, 8, AsyncConfig::default()).unwrap();
        let mut buf = vec![0u8; 4096];
        q.read(&ns, 0, &mut buf).await.unwrap();
        let other = q.clone();
        tokio::spawn(async move {
            tokio::time::sleep(held_for).await;
            drop(other);
        });
        let start = std::time::Instant::now();
        q.close().await;
        start.elapsed()
    });
    assert!(
        waited >= held_for,
        "close returned after {waited:?}, while a handle was alive"
    );
    // The queue is deleted and its rings are back.
    assert_eq!(pool.stats().in_use_bytes, baseline);
    assert_eq!(nvme.admin_commands(0x00), 1, "one Delete I/O SQ");
    // The reaper's controller handle is gone: this drop is the controller's last, so the
    // device handle the controller held goes with it.
    let with_controller = Arc::strong_count(&nvme);
    drop(ctrl);
    assert_eq!(Arc::strong_count(&nvme), with_controller - 1);
    drop(rt);
    drop(pool);
}
