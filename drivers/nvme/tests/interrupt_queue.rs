//! Synchronous interrupt-driven queues (`create_interrupt_io_queue`, `wait_interrupt`) over the
//! emulated controller's MSI-X eventfds: the wait, its timeout, per-queue vectors, and the
//! health check after a wait that timed out.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tidepool::data::DmaData;
use tidepool::pool::Direction;
use tidepool_nvme::{ControllerConfig, Done, IoQueue, NvmeError};

fn interrupt_config() -> ControllerConfig {
    ControllerConfig {
        interrupts: true,
        ..ctrl_config()
    }
}

/// Polls `q` until `n` completions arrived, sleeping on its interrupt whenever a poll finds
/// nothing (what tpio's `--completion=interrupt` does); fails after 5 s.
fn reap_sleeping(q: &mut IoQueue<u64>, n: usize) -> Vec<Done<u64>> {
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while done.len() < n {
        if q.poll(&mut done).unwrap() == 0 {
            q.wait_interrupt(Duration::from_millis(100)).unwrap();
        }
        assert!(Instant::now() < deadline, "{n} completions within 5 s");
    }
    done
}

/// The synchronous interrupt-driven queue: poll, sleep on the MSI-X eventfd when there is
/// nothing, poll again. Every completion is found, the device interrupted, and a wait with
/// nothing outstanding times out.
#[test]
fn interrupt_io_queue_sleeps_on_msix_between_polls() {
    let rig = Rig::with(emu_config(), interrupt_config());
    let mut q = rig.ctrl.create_interrupt_io_queue::<u64>(8).unwrap();
    assert!(q.has_interrupt());
    q.defer_doorbells(true);
    let data = pattern(4096, 9);
    let w = DmaData::try_bounce(&rig.pool, data.clone(), Direction::ToDevice).unwrap();
    q.submit_write(&rig.ns, 16, w, 1)
        .map_err(|e| e.error)
        .unwrap();
    let mut done = Vec::new();
    for _ in 0..7 {
        let r = DmaData::try_bounce(&rig.pool, vec![0u8; 4096], Direction::FromDevice).unwrap();
        // Reads of the block being written may pass the write: read elsewhere.
        q.submit_read(&rig.ns, 64, r, 2)
            .map_err(|e| e.error)
            .unwrap();
    }
    // Wait first: the interrupt for the batch is counted whether it fired before the wait
    // began or during it.
    assert!(
        q.wait_interrupt(Duration::from_secs(5)).unwrap(),
        "the device interrupted"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while done.len() < 8 {
        if q.poll(&mut done).unwrap() == 0 {
            // Nothing more posted yet: sleep until the device interrupts again.
            q.wait_interrupt(Duration::from_millis(100)).unwrap();
        }
        assert!(Instant::now() < deadline, "completions within 5 s");
    }
    assert!(done.iter().all(|d| d.result.is_ok()));
    assert!(rig.nvme.stats().interrupts > 0);
    assert_eq!(rig.ns_bytes(16 * 512, 4096), data);
    // Nothing outstanding: the wait times out.
    let t = Instant::now();
    while q.wait_interrupt(Duration::from_millis(1)).unwrap() {} // stale counts, if any
    assert!(!q.wait_interrupt(Duration::from_millis(50)).unwrap());
    assert!(t.elapsed() >= Duration::from_millis(50));
    for d in done {
        drop(d.data.map(DmaData::complete));
    }
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn wait_interrupt_on_a_polled_queue_is_refused() {
    let rig = Rig::with(emu_config(), interrupt_config());
    let mut q = rig.queue(4);
    assert!(!q.has_interrupt());
    let err = q.wait_interrupt(Duration::from_millis(1)).unwrap_err();
    assert!(matches!(err, NvmeError::Unsupported(_)), "{err}");
    drop(q);
    rig.finish();
}

#[test]
fn interrupt_io_queue_needs_interrupts_configured() {
    let rig = Rig::new();
    let err = rig.ctrl.create_interrupt_io_queue::<u64>(4).unwrap_err();
    assert!(matches!(err, NvmeError::Unsupported(_)), "{err}");
    rig.finish();
}

#[test]
fn each_interrupt_queue_wakes_on_its_own_vector() {
    let rig = Rig::with(emu_config(), interrupt_config());
    let mut a = rig.ctrl.create_interrupt_io_queue::<u64>(4).unwrap();
    let mut b = rig.ctrl.create_interrupt_io_queue::<u64>(4).unwrap();
    assert_ne!(a.qid(), b.qid());
    let r = DmaData::owned(rig.pool.try_alloc(4096).unwrap());
    a.submit_read(&rig.ns, 0, r, 1)
        .map_err(|e| e.error)
        .unwrap();
    assert!(
        a.wait_interrupt(Duration::from_secs(5)).unwrap(),
        "a's vector fired"
    );
    assert!(
        !b.wait_interrupt(Duration::from_millis(50)).unwrap(),
        "b has nothing outstanding: its vector stays quiet"
    );
    let done = reap_sleeping(&mut a, 1);
    assert!(done[0].result.is_ok());
    drop(done);
    drop((a, b));
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

/// The doc's promise: a device that never interrupts (here: a completion it never posts) is
/// still caught, because a wait that timed out is followed by `poll_checked`.
#[test]
fn a_lost_completion_is_caught_by_poll_checked_after_a_timed_out_wait() {
    let rig = Rig::with(emu_config(), interrupt_config());
    let mut q = rig.ctrl.create_interrupt_io_queue::<u64>(4).unwrap();
    rig.nvme.faults().drop_completions(1);
    let r = DmaData::owned(rig.pool.try_alloc(4096).unwrap());
    q.submit_read(&rig.ns, 0, r, 9)
        .map_err(|e| e.error)
        .unwrap();
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let error = loop {
        assert!(Instant::now() < deadline, "the timeout within 5 s");
        if q.wait_interrupt(Duration::from_millis(20)).unwrap() {
            continue;
        }
        if let Err(e) = q.poll_checked(&mut done) {
            break e;
        }
    };
    assert!(matches!(error, NvmeError::CommandTimeout { .. }), "{error}");
    assert_eq!(done.len(), 1);
    assert!(matches!(
        done[0].result,
        Err(NvmeError::ControllerReset { .. })
    ));
    assert!(
        done[0].data.is_some(),
        "the buffer comes back with the failure"
    );
    drop(done);
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.ctrl.recover().unwrap();
    rig.finish();
}

#[test]
fn an_interrupt_queue_moves_many_batches_intact() {
    let rig = Rig::with(emu_config(), interrupt_config());
    let mut q = rig.ctrl.create_interrupt_io_queue::<u64>(16).unwrap();
    q.defer_doorbells(true);
    // 64 distinct 4 KiB blocks written in batches of 16, then read back the same way.
    for batch in 0..4u64 {
        for i in 0..16u64 {
            let block = batch * 16 + i;
            let w = DmaData::try_bounce(&rig.pool, pattern(4096, block as u8), Direction::ToDevice)
                .unwrap();
            q.submit_write(&rig.ns, block * 8, w, block)
                .map_err(|e| e.error)
                .unwrap();
        }
        let done = reap_sleeping(&mut q, 16);
        assert!(done.iter().all(|d| d.result.is_ok()));
    }
    for batch in 0..4u64 {
        for i in 0..16u64 {
            let block = batch * 16 + i;
            let r = DmaData::try_bounce(&rig.pool, vec![0u8; 4096], Direction::FromDevice).unwrap();
            q.submit_read(&rig.ns, block * 8, r, block)
                .map_err(|e| e.error)
                .unwrap();
        }
        for d in reap_sleeping(&mut q, 16) {
            assert!(d.result.is_ok());
            let memory = d.data.unwrap().complete().into_memory().unwrap();
            assert_eq!(memory.into_vec().unwrap(), pattern(4096, d.user as u8));
        }
    }
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn a_reset_ends_an_interrupt_queue_with_a_typed_error() {
    let rig = Rig::with(emu_config(), interrupt_config());
    let mut q = rig.ctrl.create_interrupt_io_queue::<u64>(4).unwrap();
    rig.ctrl.reset("test");
    let mut done = Vec::new();
    let error = q.poll(&mut done).unwrap_err();
    assert!(
        matches!(error, NvmeError::ControllerReset { .. }),
        "{error}"
    );
    let r = DmaData::owned(rig.pool.try_alloc(512).unwrap());
    let refused = q.submit_read(&rig.ns, 0, r, 1).unwrap_err();
    assert!(refused.data.is_some(), "the buffer comes back");
    drop(refused);
    drop(q);
    rig.ctrl.recover().unwrap();
    let mut q = rig.ctrl.create_interrupt_io_queue::<u64>(4).unwrap();
    let r = DmaData::owned(rig.pool.try_alloc(512).unwrap());
    q.submit_read(&rig.ns, 0, r, 2)
        .map_err(|e| e.error)
        .unwrap();
    assert!(reap_sleeping(&mut q, 1)[0].result.is_ok());
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}
