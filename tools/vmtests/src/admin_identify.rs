//! The smallest NVMe admin path the IOMMU VM tests need: enable the controller with an admin
//! queue pair placed in caller-provided DMA memory, submit one Identify Controller, poll its
//! completion, and disable the controller again (so no DMA is in flight when the caller unmaps).
//!
//! Included by the test binaries with `#[path]`; it is not Tidepool's NVMe driver.

use std::time::{Duration, Instant};

use tidepool::device::vfio::Bar;
use tidepool::device::{Mmio, PciDevice};

/// Controller registers (NVMe base specification, "Controller Registers").
const REG_CAP: usize = 0x00;
const REG_CC: usize = 0x14;
const REG_CSTS: usize = 0x1c;
const REG_AQA: usize = 0x24;
const REG_ASQ: usize = 0x28;
const REG_ACQ: usize = 0x30;
const DOORBELLS: usize = 0x1000;

/// Admin queue depth used here.
const QUEUE_ENTRIES: u32 = 16;
/// Bytes of queue memory [`identify_controller`] needs: the SQ page, then the CQ page.
pub const QUEUE_BYTES: usize = 8192;

/// What the controller answered.
pub struct Completion {
    /// Status field (bits 31:17 of completion dword 3): 0 = success.
    pub status: u16,
    /// Command identifier echoed back.
    pub cid: u16,
}

/// Enables the controller with its admin SQ at `queues` (IOVA `queues_iova`) and CQ one page
/// later, submits Identify Controller (CNS 1) writing 4 KiB to `data_iova`, waits for the
/// completion and disables the controller.
///
/// `queues` must point at `QUEUE_BYTES` of memory mapped for the device at `queues_iova`, owned
/// by the caller and touched by nothing else meanwhile.
pub fn identify_controller(
    dev: &dyn PciDevice,
    bar: &Bar,
    queues: *mut u8,
    queues_iova: u64,
    data_iova: u64,
) -> Result<Completion, String> {
    let e = |what: &str, err: tidepool::device::DeviceError| format!("{what}: {err}");
    dev.set_bus_master(true)
        .map_err(|err| e("enable bus master", err))?;
    let cap = bar.read64(REG_CAP).map_err(|err| e("read CAP", err))?;
    let timeout = Duration::from_millis(500 * ((cap >> 24) & 0xff).max(1));
    let stride = 4usize << ((cap >> 32) & 0xf);

    disable(bar, timeout)?;
    for i in 0..QUEUE_BYTES / 4 {
        // SAFETY: in bounds of the caller's QUEUE_BYTES; the controller is disabled, so nothing
        // else accesses this memory now.
        unsafe { queues.cast::<u32>().add(i).write_volatile(0) };
    }
    let q = QUEUE_ENTRIES - 1;
    bar.write32(REG_AQA, (q << 16) | q)
        .map_err(|err| e("AQA", err))?;
    bar.write64(REG_ASQ, queues_iova)
        .map_err(|err| e("ASQ", err))?;
    bar.write64(REG_ACQ, queues_iova + 4096)
        .map_err(|err| e("ACQ", err))?;
    // EN, NVM command set, 4 KiB pages, SQE 2^6 = 64 B, CQE 2^4 = 16 B.
    bar.write32(REG_CC, 1 | (6 << 16) | (4 << 20))
        .map_err(|err| e("CC", err))?;
    wait_ready(bar, true, timeout)?;

    let cid: u16 = 0x1d;
    let mut sqe = [0u32; 16];
    sqe[0] = 0x06 | (u32::from(cid) << 16); // Identify
    sqe[6] = data_iova as u32; // PRP1
    sqe[7] = (data_iova >> 32) as u32;
    sqe[10] = 1; // CNS 1: controller
    for (i, dw) in sqe.iter().enumerate() {
        // SAFETY: slot 0 of the SQ, inside the caller's memory; the controller reads it only
        // after the doorbell below.
        unsafe { queues.cast::<u32>().add(i).write_volatile(*dw) };
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    bar.write32(DOORBELLS, 1)
        .map_err(|err| e("SQ0 tail doorbell", err))?;

    let cqe = queues.wrapping_add(4096).cast::<u32>();
    let start = Instant::now();
    let dw3 = loop {
        // SAFETY: CQ slot 0, inside the caller's memory; written by the device, read volatile.
        let dw3 = unsafe { cqe.add(3).read_volatile() };
        if dw3 & (1 << 16) != 0 {
            break dw3;
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err("no completion for Identify within 10 s".into());
        }
        std::thread::sleep(Duration::from_micros(50));
    };
    bar.write32(DOORBELLS + stride, 1)
        .map_err(|err| e("CQ0 head doorbell", err))?;
    disable(bar, timeout)?;
    Ok(Completion {
        status: (dw3 >> 17) as u16,
        cid: dw3 as u16,
    })
}

/// Clears CC.EN and waits for CSTS.RDY to drop.
fn disable(bar: &Bar, timeout: Duration) -> Result<(), String> {
    let cc = bar.read32(REG_CC).map_err(|e| e.to_string())?;
    bar.write32(REG_CC, cc & !1).map_err(|e| e.to_string())?;
    wait_ready(bar, false, timeout)
}

/// Waits until CSTS.RDY equals `ready`, failing on CSTS.CFS or after `timeout`.
fn wait_ready(bar: &Bar, ready: bool, timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let csts = bar.read32(REG_CSTS).map_err(|e| e.to_string())?;
        if csts & 2 != 0 {
            return Err(format!("controller fatal status (CSTS={csts:#x})"));
        }
        if (csts & 1 != 0) == ready {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "CSTS.RDY did not become {ready} within {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Copies `len` bytes the device wrote at `p` out with volatile loads.
pub fn read_device_bytes(p: *const u8, len: usize) -> Vec<u8> {
    (0..len)
        // SAFETY: the caller passes memory it owns of at least `len` bytes; the device has
        // finished writing it (its completion was seen and the controller is disabled).
        .map(|i| unsafe { p.add(i).read_volatile() })
        .collect()
}

/// An ASCII field of the Identify data, trimmed.
#[allow(dead_code)] // not every test that includes this file prints Identify strings
pub fn ascii_field(data: &[u8], range: std::ops::Range<usize>) -> String {
    String::from_utf8_lossy(&data[range])
        .trim_matches(|c: char| c == ' ' || c == '\0')
        .to_string()
}
