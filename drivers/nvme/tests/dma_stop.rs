//! When the driver cannot stop the device's DMA, memory the device may still write is
//! quarantined (leaked, never reused), never handed back to the pool.

mod common;

use std::time::Duration;

use common::*;
use tidepool_nvme::NvmeError;

#[test]
fn dma_that_cannot_be_stopped_quarantines_the_memory() {
    let rig = Rig::new();
    let mut q = rig.queue(4);
    let faults = rig.nvme.faults();
    faults.hold_next_command();
    let before_buf = rig.in_use();
    let buf = rig.pool.try_alloc(8192).unwrap();
    let buf_bytes = rig.in_use() - before_buf;
    q.submit_read(&rig.ns, 0, buf, 1).unwrap();
    wait_for(
        || rig.nvme.stats().held_dma_writes > 0,
        "the held command's DMA",
    );
    let in_flight = rig.in_use();
    faults.fail_next_bus_master_clear();
    faults.fail_function_reset(true);

    // The held command times out; the reset cannot stop the device.
    let (err, done) = poll_until_error(&mut q, Duration::from_secs(3));
    assert!(matches!(err, NvmeError::CommandTimeout { .. }), "{err}");
    assert_eq!(done.len(), 1);
    assert!(
        matches!(&done[0].result, Err(NvmeError::DmaQuarantined { .. })),
        "{:?}",
        done[0].result
    );
    assert!(
        done[0].data.is_none(),
        "quarantined data is never handed back"
    );
    drop(done);
    assert_eq!(rig.in_use(), in_flight, "nothing went back to the pool");

    // The device keeps writing the buffer: it was right not to reuse it.
    let writes = rig.nvme.stats().held_dma_writes;
    wait_for(
        || rig.nvme.stats().held_dma_writes > writes,
        "the wedged device keeps DMAing",
    );

    // The controller is unusable.
    assert!(matches!(
        rig.ctrl.recover(),
        Err(NvmeError::DmaQuarantined { .. })
    ));
    assert!(matches!(
        rig.ctrl.create_io_queue::<u64>(4),
        Err(NvmeError::DmaQuarantined { .. })
    ));
    let e = q.submit_flush(&rig.ns, 2).unwrap_err();
    assert!(
        matches!(e.error, NvmeError::DmaQuarantined { .. }),
        "{}",
        e.error
    );

    // Dropping everything gives back nothing the device could reach: the rings and the data
    // stay quarantined, exactly the bytes that were device-visible at the reset.
    drop(q);
    let Rig {
        nvme, ctrl, pool, ..
    } = rig;
    drop(ctrl);
    assert_eq!(pool.stats().in_use_bytes, in_flight);
    assert!(in_flight >= buf_bytes && buf_bytes >= 8192);
    assert_eq!(nvme.stats().dma_after_bus_master_off, 0);
    drop(nvme);
    assert_eq!(pool.stats().in_use_bytes, in_flight, "leaked for good");
}

#[test]
fn a_failed_bus_master_clear_falls_back_to_a_function_reset_before_freeing() {
    let rig = Rig::new();
    let mut q = rig.queue(4);
    let faults = rig.nvme.faults();
    faults.hold_next_command();
    q.submit_read(&rig.ns, 0, rig.pool.try_alloc(8192).unwrap(), 1)
        .unwrap();
    wait_for(
        || rig.nvme.stats().held_dma_writes > 0,
        "the held command's DMA",
    );
    faults.fail_next_bus_master_clear();

    let (err, done) = poll_until_error(&mut q, Duration::from_secs(3));
    assert!(matches!(err, NvmeError::CommandTimeout { .. }), "{err}");
    assert_eq!(done.len(), 1);
    match &done[0].result {
        Err(NvmeError::ControllerReset { reason }) => {
            assert!(reason.contains("function reset"), "{reason}")
        }
        r => panic!("{r:?}"),
    }
    // The buffer came back only after the function reset ended the held DMA: no write
    // lands in it any more.
    let buf = done
        .into_iter()
        .next()
        .unwrap()
        .data
        .unwrap()
        .into_buf()
        .unwrap();
    let writes = rig.nvme.stats().held_dma_writes;
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(rig.nvme.stats().held_dma_writes, writes);
    drop(buf);
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.ctrl.recover().unwrap();
    let mut q = rig.queue(4);
    q.write(&rig.ns, 0, &[1u8; 512]).unwrap();
    drop(q);
    rig.finish();
}
