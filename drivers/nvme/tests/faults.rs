//! Timeouts, corrupted completions, CSTS.CFS: the controller is reset, every command comes back
//! failed with its data, and `Controller::recover` brings I/O back.

mod common;

use std::time::Duration;

use common::*;
use tidepool_emu::Corruption;
use tidepool_nvme::completion::CompletionError;
use tidepool_nvme::{Done, NvmeError};

/// Every command of `done` failed with `ControllerReset` and brought its data back.
fn all_failed_with_data(done: &[Done<u64>], n: usize) {
    assert_eq!(done.len(), n, "every outstanding command came back");
    for d in done {
        assert!(
            matches!(d.result, Err(NvmeError::ControllerReset { .. })),
            "{:?}",
            d.result
        );
        assert!(d.data.is_some(), "the data comes back with the failure");
    }
}

/// Recovers the controller and checks a write/read round trip on a new queue.
fn recover_and_check_io(rig: &Rig) {
    rig.ctrl.recover().expect("recover");
    let mut q = rig.queue(4);
    let data = pattern(4096, 0x33);
    q.write(&rig.ns, 40, &data).unwrap();
    let mut back = vec![0u8; 4096];
    q.read(&rig.ns, 40, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn a_dropped_completion_times_out_resets_and_recovers() {
    let rig = Rig::new();
    let mut q = rig.queue(4);
    rig.nvme.faults().drop_completions(1);
    let buf = rig.pool.try_alloc(4096).unwrap();
    q.submit_read(&rig.ns, 0, buf, 1).unwrap();
    q.submit_flush(&rig.ns, 2).unwrap();
    let (err, mut done) = poll_until_error(&mut q, Duration::from_secs(3));
    assert!(
        matches!(err, NvmeError::CommandTimeout { opcode: 0x02, .. }),
        "{err}"
    );
    // The flush completed normally; the read was failed by the reset, its buffer back.
    done.sort_by_key(|d| d.user);
    assert_eq!(done.len(), 2);
    assert!(done[1].result.is_ok());
    all_failed_with_data(&done[..1], 1);
    assert_eq!(rig.nvme.stats().completions_dropped, 1);
    drop(done);
    // The queue is dead now.
    let e = q.submit_flush(&rig.ns, 3).unwrap_err();
    assert!(matches!(
        e.error,
        NvmeError::QueueGone { .. } | NvmeError::ControllerReset { .. }
    ));
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline, "nothing is kept after a reset");
    recover_and_check_io(&rig);
    rig.finish();
}

#[test]
fn a_reset_fails_the_commands_of_every_queue() {
    let rig = Rig::new();
    let mut a = rig.queue(4);
    let mut b = rig.queue(4);
    rig.nvme.faults().drop_completions(2);
    a.submit_read(&rig.ns, 0, rig.pool.try_alloc(512).unwrap(), 1)
        .unwrap();
    b.submit_read(&rig.ns, 0, rig.pool.try_alloc(512).unwrap(), 2)
        .unwrap();
    let (err, done) = poll_until_error(&mut a, Duration::from_secs(3));
    assert!(matches!(err, NvmeError::CommandTimeout { .. }), "{err}");
    all_failed_with_data(&done, 1);
    // Queue b learns of the reset on its next poll.
    let mut out = Vec::new();
    let err = b.poll(&mut out).unwrap_err();
    assert!(matches!(err, NvmeError::ControllerReset { .. }), "{err}");
    all_failed_with_data(&out, 1);
    drop((done, out, a, b));
    assert_eq!(rig.in_use(), rig.baseline);
    recover_and_check_io(&rig);
    rig.finish();
}

#[test]
fn an_explicit_reset_and_recover_keep_the_namespace() {
    let rig = Rig::new();
    let mut q = rig.queue(4);
    q.write(&rig.ns, 0, &pattern(8192, 1)).unwrap();
    rig.ctrl.reset("test");
    let e = q.submit_flush(&rig.ns, 1).unwrap_err();
    assert!(
        matches!(&e.error, NvmeError::ControllerReset { reason } if reason.contains("test")),
        "{}",
        e.error
    );
    drop(q);
    rig.ctrl.recover().unwrap();
    let mut q = rig.queue(4);
    let mut back = vec![0u8; 8192];
    q.read(&rig.ns, 0, &mut back).unwrap();
    assert_eq!(back, pattern(8192, 1));
    drop(q);
    rig.finish();
}

#[test]
fn an_admin_command_that_never_completes_times_out() {
    let rig = Rig::new();
    rig.nvme.faults().drop_completions(1);
    let err = rig.ctrl.smart_log().unwrap_err();
    assert!(
        matches!(err, NvmeError::CommandTimeout { opcode: 0x02, .. }),
        "{err}"
    );
    assert_eq!(rig.in_use(), rig.baseline, "the log buffer came back");
    recover_and_check_io(&rig);
    rig.finish();
}

/// Submits three reads, corrupts the completion of the first as `how`, and checks the
/// outcome: a protocol error (or, for a stale phase, a timeout), a reset, nothing lost.
fn corruption(how: Corruption) {
    let rig = Rig::new();
    let mut q = rig.queue(8);
    rig.nvme
        .faults()
        .delay_completions(Duration::from_millis(2));
    rig.nvme.faults().corrupt_next_completion(how);
    for i in 0..3u64 {
        q.submit_read(&rig.ns, i, rig.pool.try_alloc(512).unwrap(), i)
            .unwrap();
    }
    let (err, done) = poll_until_error(&mut q, Duration::from_secs(3));
    rig.nvme.faults().clear();
    match how {
        Corruption::StalePhase => {
            assert!(matches!(err, NvmeError::CommandTimeout { .. }), "{err}")
        }
        Corruption::BadCid => assert!(
            matches!(
                err,
                NvmeError::BadCompletion(CompletionError::CidOutOfRange { cid: 0xffff, .. })
            ),
            "{err}"
        ),
        Corruption::DuplicateCid => assert!(
            matches!(
                err,
                NvmeError::BadCompletion(CompletionError::NotOutstanding { .. })
            ),
            "{err}"
        ),
        Corruption::SqHeadOutOfRange => assert!(
            matches!(
                err,
                NvmeError::BadCompletion(CompletionError::BadSqHead { .. })
            ),
            "{err}"
        ),
        Corruption::WrongSqId => assert!(
            matches!(
                err,
                NvmeError::BadCompletion(CompletionError::WrongQueue { .. })
            ),
            "{err}"
        ),
    }
    // Nothing lost: each command came back exactly once, with its buffer.
    let mut users: Vec<u64> = done.iter().map(|d| d.user).collect();
    users.sort_unstable();
    assert_eq!(users, vec![0, 1, 2], "{how:?}");
    assert!(done.iter().all(|d| d.data.is_some()));
    if how != Corruption::DuplicateCid {
        // The corrupted entry's command never completes validly: the reset fails it.
        assert!(
            done.iter().any(|d| d.result.is_err()),
            "{how:?}: the reset failed what was outstanding"
        );
    }
    drop(done);
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline, "{how:?}");
    recover_and_check_io(&rig);
    rig.finish();
}

#[test]
fn corrupt_completion_bad_cid() {
    corruption(Corruption::BadCid);
}

#[test]
fn corrupt_completion_duplicate_cid() {
    corruption(Corruption::DuplicateCid);
}

#[test]
fn corrupt_completion_stale_phase() {
    corruption(Corruption::StalePhase);
}

#[test]
fn corrupt_completion_sq_head_out_of_range() {
    corruption(Corruption::SqHeadOutOfRange);
}

#[test]
fn corrupt_completion_wrong_sq_id() {
    corruption(Corruption::WrongSqId);
}

#[test]
fn controller_fatal_status_resets_and_recovers() {
    let rig = Rig::new();
    let mut q = rig.queue(4);
    rig.nvme.faults().set_fatal();
    let bar = {
        use tidepool::device::PciDevice;
        rig.nvme.map_bar(0).unwrap()
    };
    wait_for(|| bar.read32(0x1c).unwrap() & 2 != 0, "CSTS.CFS");
    q.submit_read(&rig.ns, 0, rig.pool.try_alloc(4096).unwrap(), 1)
        .unwrap();
    let (err, done) = poll_until_error(&mut q, Duration::from_secs(3));
    assert!(matches!(err, NvmeError::ControllerFatal { .. }), "{err}");
    all_failed_with_data(&done, 1);
    drop((done, q));
    assert_eq!(rig.in_use(), rig.baseline);
    recover_and_check_io(&rig);
    rig.finish();
}

#[test]
fn a_flooded_completion_queue_is_a_protocol_error_not_a_hang() {
    let rig = Rig::new();
    let mut q = rig.queue(16);
    // A completion for command 0, which is not outstanding, in every free CQ slot, refilled
    // as fast as the driver frees them.
    rig.nvme.faults().flood_cq(q.qid());
    wait_for(
        || rig.nvme.stats().completions_posted >= 16,
        "the flood fills the ring",
    );
    let (q, result, counters) = within(Duration::from_secs(10), move || {
        let mut out = Vec::new();
        let r = q.poll(&mut out);
        let c = q.counters();
        (q, r.map(|_| out.len()), c)
    });
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            NvmeError::BadCompletion(CompletionError::NotOutstanding { cid: 0 })
        ),
        "{err}"
    );
    assert_eq!(
        counters.entries_consumed, 1,
        "the poll stops at the first bad entry"
    );
    rig.nvme.faults().stop_flood();
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    recover_and_check_io(&rig);
    rig.finish();
}

#[test]
fn a_flooded_admin_queue_does_not_pin_the_admin_lock() {
    let rig = Rig::new();
    rig.nvme.faults().flood_cq(0);
    wait_for(
        || rig.nvme.stats().completions_posted >= 15,
        "the flood fills the admin ring",
    );
    let ctrl = rig.ctrl.clone();
    let err = within(Duration::from_secs(10), move || {
        ctrl.smart_log().unwrap_err()
    });
    assert!(matches!(err, NvmeError::BadCompletion(_)), "{err}");
    rig.nvme.faults().stop_flood();
    assert_eq!(rig.in_use(), rig.baseline);
    recover_and_check_io(&rig);
    rig.finish();
}
