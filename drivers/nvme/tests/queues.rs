//! I/O queue creation and deletion, depth limits, queue IDs, submit/poll at every depth.

mod common;

use common::*;
use tidepool_emu::EmuNvmeConfig;
use tidepool_nvme::NvmeError;

#[test]
fn depth_zero_and_beyond_the_maximum_are_refused() {
    let rig = Rig::new();
    let max = rig.ctrl.max_queue_depth();
    assert!(matches!(
        rig.ctrl.create_io_queue::<u64>(0),
        Err(NvmeError::QueueDepth { asked: 0, .. })
    ));
    let err = rig.ctrl.create_io_queue::<u64>(max + 1).unwrap_err();
    assert!(
        matches!(err, NvmeError::QueueDepth { asked, max: m } if asked == max + 1 && m == max),
        "{err}"
    );
    let q = rig.queue(max);
    assert_eq!(u32::from(q.depth()), max);
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn queue_depth_is_limited_by_mqes() {
    let rig = Rig::with(
        EmuNvmeConfig {
            mqes: 15,
            ..emu_config()
        },
        ctrl_config(),
    );
    assert_eq!(rig.ctrl.max_queue_depth(), 15);
    let q = rig.queue(15);
    assert_eq!(q.depth(), 15);
    drop(q);
    assert!(rig.ctrl.create_io_queue::<u64>(16).is_err());
    rig.finish();
}

#[test]
fn running_out_of_queue_ids_and_reusing_them_after_deletion() {
    let rig = Rig::new();
    let mut qs: Vec<_> = (0..4).map(|_| rig.queue(8)).collect();
    let mut ids: Vec<u16> = qs.iter().map(|q| q.qid()).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    let err = rig.ctrl.create_io_queue::<u64>(8).unwrap_err();
    assert!(matches!(err, NvmeError::NoQueues { granted: 4 }), "{err}");
    // Delete queue 3: its ID comes back and is the one handed out next.
    let third = qs.iter().position(|q| q.qid() == 3).unwrap();
    drop(qs.remove(third));
    assert_eq!(rig.nvme.admin_commands(0x00), 1, "Delete I/O SQ");
    assert_eq!(rig.nvme.admin_commands(0x04), 1, "Delete I/O CQ");
    let q = rig.queue(8);
    assert_eq!(q.qid(), 3);
    // The reused queue works.
    let mut q = q;
    q.write(&rig.ns, 0, &[1u8; 512]).unwrap();
    drop(q);
    drop(qs);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn fewer_queues_granted_than_asked() {
    let mut cfg = ctrl_config();
    cfg.io_queues = 8;
    let rig = Rig::with(
        EmuNvmeConfig {
            max_queues: 2,
            msix_vectors: 3,
            ..emu_config()
        },
        cfg,
    );
    let a = rig.queue(4);
    let b = rig.queue(4);
    assert!(matches!(
        rig.ctrl.create_io_queue::<u64>(4),
        Err(NvmeError::NoQueues { granted: 2 })
    ));
    drop((a, b));
    rig.finish();
}

#[test]
fn submit_and_poll_at_every_queue_depth() {
    let rig = Rig::new();
    let depth = 16u32;
    let mut q = rig.queue(depth);
    for qd in 1..=depth as usize {
        for i in 0..qd {
            let buf = rig.pool.try_alloc(512).unwrap();
            q.submit_read(&rig.ns, i as u64, buf, i as u64)
                .map_err(|e| e.error)
                .unwrap();
        }
        assert_eq!(q.outstanding(), qd);
        let mut done = poll_n(&mut q, qd);
        assert_eq!(done.len(), qd);
        done.sort_by_key(|d| d.user);
        for (i, d) in done.into_iter().enumerate() {
            assert_eq!(d.user, i as u64);
            assert!(d.result.is_ok());
            assert!(d.data.is_some());
        }
        assert_eq!(q.outstanding(), 0);
    }
    assert_eq!(rig.nvme.io_commands(0x02), (1..=depth as u64).sum::<u64>());
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn a_full_queue_refuses_and_gives_everything_back() {
    let rig = Rig::new();
    let mut q = rig.queue(2);
    // Held commands never complete: the queue stays full.
    rig.nvme.faults().drop_completions(2);
    for i in 0..2 {
        q.submit_flush(&rig.ns, i).unwrap();
    }
    let buf = rig.pool.try_alloc(512).unwrap();
    let err = q.submit_read(&rig.ns, 0, buf, 9).unwrap_err();
    assert!(
        matches!(err.error, NvmeError::QueueFull { depth: 2, .. }),
        "{}",
        err.error
    );
    assert_eq!(err.user, 9);
    assert!(err.data.is_some());
    drop(err);
    // Dropping the queue deletes it on the controller; the dropped commands' slots go too.
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn deferred_doorbells_publish_a_batch_with_one_write() {
    let rig = Rig::new();
    let mut q = rig.queue(8);
    q.defer_doorbells(true);
    for i in 0..8 {
        q.submit_flush(&rig.ns, i).unwrap();
    }
    let before = q.counters().sq_doorbell_writes;
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(rig.nvme.io_commands(0x00), 0, "nothing published yet");
    q.ring_doorbell().unwrap();
    assert_eq!(q.counters().sq_doorbell_writes, before + 1);
    let done = poll_n(&mut q, 8);
    assert!(done.iter().all(|d| d.result.is_ok()));
    assert_eq!(rig.nvme.io_commands(0x00), 8);
    drop(q);
    rig.finish();
}

#[test]
fn failed_queue_creation_frees_the_id_and_the_rings() {
    let rig = Rig::new();
    rig.nvme.faults().fail_queue_creations(1);
    let err = rig.ctrl.create_io_queue::<u64>(8).unwrap_err();
    assert!(
        matches!(err, NvmeError::Command { opcode: 0x05, .. }),
        "{err}"
    );
    assert_eq!(rig.in_use(), rig.baseline);
    // Creating the SQ fails after the CQ was made: the CQ is deleted again.
    rig.nvme.faults().fail_queue_creations(0);
    let q = rig.queue(8);
    assert_eq!(q.qid(), 1, "the ID was freed");
    drop(q);
    rig.finish();
}

#[test]
fn failed_sq_creation_deletes_the_cq() {
    let rig = Rig::new();
    rig.nvme.faults().fail_sq_creations(1);
    let err = rig.ctrl.create_io_queue::<u64>(4).unwrap_err();
    assert!(
        matches!(err, NvmeError::Command { opcode: 0x01, .. }),
        "{err}"
    );
    assert_eq!(rig.nvme.admin_commands(0x05), 1, "the CQ was created");
    assert_eq!(rig.nvme.admin_commands(0x04), 1, "and deleted again");
    assert_eq!(rig.in_use(), rig.baseline, "its rings went back");
    let q = rig.queue(4);
    assert_eq!(q.qid(), 1, "the ID was freed");
    drop(q);
    rig.finish();
}

#[test]
fn a_cq_that_cannot_be_deleted_after_a_failed_creation_resets_before_freeing() {
    let rig = Rig::new();
    let mut other = rig.queue(4);
    // Create SQ fails after the CQ was made, and deleting the CQ fails too: the controller
    // still owns the CQ ring.
    rig.nvme.faults().fail_sq_creations(1);
    rig.nvme.faults().fail_queue_deletions(1);
    let err = rig.ctrl.create_io_queue::<u64>(4).unwrap_err();
    assert!(
        matches!(err, NvmeError::Command { opcode: 0x01, .. }),
        "{err}"
    );
    assert_eq!(
        rig.nvme.admin_commands(0x04),
        1,
        "the CQ deletion was tried"
    );
    // The controller was reset before the rings went back: every queue learns of it.
    let mut out = Vec::new();
    let e = other.poll(&mut out).unwrap_err();
    assert!(matches!(e, NvmeError::ControllerReset { .. }), "{e}");
    drop(other);
    assert_eq!(
        rig.in_use(),
        rig.baseline,
        "the rings went back after the reset"
    );
    rig.ctrl.recover().unwrap();
    // The controller holds no stale CQ: both IDs are created afresh.
    let (mut a, b) = (rig.queue(4), rig.queue(4));
    a.write(&rig.ns, 0, &[9u8; 512]).unwrap();
    drop((a, b));
    rig.finish();
}

/// One controller, one polled queue per thread (what tpio's `numjobs` does): every thread
/// writes and reads back a region of its own at the same time, and all data is intact.
#[test]
fn queues_on_several_threads_move_their_own_data_at_once() {
    let rig = Rig::new();
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let ctrl = rig.ctrl.clone();
            let ns = rig.ns;
            std::thread::spawn(move || {
                let mut q = ctrl.create_io_queue::<u64>(8).unwrap();
                for i in 0..16u64 {
                    let lba = t * 256 + i * 8;
                    let data = pattern(4096, (t * 16 + i) as u8);
                    q.write(&ns, lba, &data).unwrap();
                    let mut back = vec![0u8; 4096];
                    q.read(&ns, lba, &mut back).unwrap();
                    assert_eq!(back, data, "thread {t}, block {i}");
                }
                q.qid()
            })
        })
        .collect();
    let mut qids: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    qids.sort_unstable();
    qids.dedup();
    assert_eq!(qids.len(), 3, "each thread had a queue of its own");
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

/// Shadow doorbells asked of a controller that does not offer Doorbell Buffer Config: the
/// driver uses register doorbells and I/O works.
#[test]
fn shadow_doorbells_fall_back_to_registers_when_not_offered() {
    let rig = Rig::with(
        emu_config(),
        tidepool_nvme::ControllerConfig {
            shadow_doorbells: true,
            ..ctrl_config()
        },
    );
    assert!(!rig.ctrl.shadow_doorbells());
    let mut q = rig.queue(4);
    let data = pattern(4096, 5);
    q.write(&rig.ns, 0, &data).unwrap();
    let mut back = vec![0u8; 4096];
    q.read(&rig.ns, 0, &mut back).unwrap();
    assert_eq!(back, data);
    assert!(q.counters().sq_doorbell_writes > 0);
    assert_eq!(q.counters().sq_doorbells_avoided, 0);
    drop(q);
    rig.finish();
}
