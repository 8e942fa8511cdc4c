//! Drives the emulated controller by hand through `PciDevice`/`Mmio` and a pool over its DMA
//! view: hand-written submission entries, completion polling by phase tag.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool::device::{Mmio, PciDevice};
use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{DmaBuf, Pool, PoolConfig};

use super::*;

fn pool_config() -> PoolConfig {
    PoolConfig {
        memory: MemoryConfig {
            page_size: PageSize::Small4K,
            allow_small_pages: true,
        },
        chunk_bytes: 512 << 10,
        prefill_bytes: 512 << 10,
        max_bytes: 512 << 10,
        max_buffer: 64 << 10,
        low_watermark: 0,
        high_watermark: 512 << 10,
        reserve_bytes: 0,
        transient: false,
        background: false,
        ..PoolConfig::default()
    }
}

/// One submission/completion queue pair in pool memory.
struct Queue {
    qid: u16,
    entries: u16,
    sq: DmaBuf,
    cq: DmaBuf,
    tail: u16,
    head: u16,
    phase: bool,
    cid: u16,
}

impl Queue {
    fn new(pool: &Pool, qid: u16, entries: u16) -> Queue {
        Queue {
            qid,
            entries,
            // Rings must be page aligned: pool buffers of 4 KiB or more are.
            sq: pool
                .try_alloc((usize::from(entries) * 64).max(4096))
                .unwrap(),
            cq: pool
                .try_alloc((usize::from(entries) * 16).max(4096))
                .unwrap(),
            tail: 0,
            head: 0,
            phase: true,
            cid: 0,
        }
    }

    /// Writes `cmd` (with a fresh CID) at the tail and rings the doorbell; returns the CID.
    fn submit(&mut self, bar: &dyn Mmio, mut cmd: [u8; 64]) -> u16 {
        self.cid = self.cid.wrapping_add(1);
        cmd[2..4].copy_from_slice(&self.cid.to_le_bytes());
        self.sq.write_at(usize::from(self.tail) * 64, &cmd).unwrap();
        self.tail = (self.tail + 1) % self.entries;
        bar.write32(0x1000 + 8 * usize::from(self.qid), u32::from(self.tail))
            .unwrap();
        self.cid
    }

    /// Waits up to `timeout` for the next completion: (cid, sct, sc, result).
    fn poll(&mut self, bar: &dyn Mmio, timeout: Duration) -> Option<(u16, u8, u8, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut e = [0u8; 16];
            self.cq
                .read_at(usize::from(self.head) * 16, &mut e)
                .unwrap();
            let field = u16::from_le_bytes([e[14], e[15]]);
            if (field & 1 != 0) == self.phase {
                self.head = (self.head + 1) % self.entries;
                if self.head == 0 {
                    self.phase = !self.phase;
                }
                bar.write32(0x1000 + 8 * usize::from(self.qid) + 4, u32::from(self.head))
                    .unwrap();
                let status = field >> 1;
                return Some((
                    u16::from_le_bytes([e[12], e[13]]),
                    ((status >> 8) & 7) as u8,
                    status as u8,
                    u32::from_le_bytes(e[0..4].try_into().unwrap()),
                ));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::yield_now();
        }
    }

    /// Submits and waits for the command's completion: (sct, sc, result).
    fn run(&mut self, bar: &dyn Mmio, cmd: [u8; 64]) -> (u8, u8, u32) {
        let cid = self.submit(bar, cmd);
        let (got, sct, sc, result) = self
            .poll(bar, Duration::from_secs(5))
            .expect("completion within 5 s");
        assert_eq!(got, cid);
        (sct, sc, result)
    }
}

/// A submission entry: opcode, flags (PSDT), nsid, PRP1/PRP2 (or SGL1), CDW10-12.
fn sqe(opcode: u8, flags: u8, nsid: u32, dptr: [u64; 2], cdw: [u32; 3]) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[0] = opcode;
    b[1] = flags;
    b[4..8].copy_from_slice(&nsid.to_le_bytes());
    b[24..32].copy_from_slice(&dptr[0].to_le_bytes());
    b[32..40].copy_from_slice(&dptr[1].to_le_bytes());
    for (i, dw) in cdw.iter().enumerate() {
        b[40 + 4 * i..44 + 4 * i].copy_from_slice(&dw.to_le_bytes());
    }
    b
}

/// An SGL descriptor's two words.
fn sgl_desc(addr: u64, len: u32, kind: u8) -> [u64; 2] {
    [addr, u64::from(len) | (u64::from(kind) << 60)]
}

struct Rig {
    nvme: Arc<EmuNvme>,
    bar: Arc<dyn Mmio>,
    pool: Pool,
    admin: Queue,
}

impl Rig {
    /// Bus mastering on, admin queues programmed, CC.EN = 1, waits for CSTS.RDY.
    fn up(cfg: EmuNvmeConfig) -> Rig {
        let nvme = Arc::new(EmuNvme::new(cfg).unwrap());
        let pool = Pool::new(nvme.dma_view().unwrap(), pool_config()).unwrap();
        let bar = nvme.map_bar(0).unwrap();
        nvme.set_bus_master(true).unwrap();
        let admin = Queue::new(&pool, 0, 16);
        bar.write32(0x24, (15 << 16) | 15).unwrap();
        bar.write64(0x28, admin.sq.device_addr().0).unwrap();
        bar.write64(0x30, admin.cq.device_addr().0).unwrap();
        bar.write32(0x14, 0x0046_0001).unwrap();
        wait_for(|| bar.read32(0x1c).unwrap() & 1 == 1, "CSTS.RDY");
        Rig {
            nvme,
            bar,
            pool,
            admin,
        }
    }

    fn admin(&mut self, cmd: [u8; 64]) -> (u8, u8, u32) {
        self.admin.run(&*self.bar, cmd)
    }

    /// Creates I/O queue pair `qid` (CQ interrupts on `vector` if given).
    fn io_queue(&mut self, qid: u16, vector: Option<u16>) -> Queue {
        let q = Queue::new(&self.pool, qid, 32);
        let ien = vector.map_or(0, |v| 2 | (u32::from(v) << 16));
        let cq = sqe(
            0x05,
            0,
            0,
            [q.cq.device_addr().0, 0],
            [u32::from(qid) | (31 << 16), 1 | ien, 0],
        );
        assert_eq!(self.admin(cq), (0, 0, 0));
        let sq = sqe(
            0x01,
            0,
            0,
            [q.sq.device_addr().0, 0],
            [u32::from(qid) | (31 << 16), 1 | (u32::from(qid) << 16), 0],
        );
        assert_eq!(self.admin(sq), (0, 0, 0));
        q
    }
}

fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn bring_up_identify_and_shutdown() {
    let mut rig = Rig::up(EmuNvmeConfig::default());
    let cap = rig.bar.read64(0).unwrap();
    assert_eq!(cap & 0xffff, 255);
    assert_eq!((cap >> 24) & 0xff, 1, "TO = 500 ms");
    assert_eq!(rig.bar.read32(0x08).unwrap(), 0x0001_0400);

    let page = rig.pool.try_alloc(4096).unwrap();
    let (sct, sc, _) = rig.admin(sqe(0x06, 0, 0, [page.device_addr().0, 0], [1, 0, 0]));
    assert_eq!((sct, sc), (0, 0));
    let mut id = vec![0u8; 4096];
    page.read_at(0, &mut id).unwrap();
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), VENDOR_ID);
    assert_eq!(id[77], 5, "MDTS");
    assert_eq!(
        u32::from_le_bytes(id[536..540].try_into().unwrap()) & 3,
        1,
        "SGLs"
    );

    let (sct, sc, _) = rig.admin(sqe(0x06, 0, 1, [page.device_addr().0, 0], [0, 0, 0]));
    assert_eq!((sct, sc), (0, 0));
    page.read_at(0, &mut id).unwrap();
    assert_eq!(
        u64::from_le_bytes(id[0..8].try_into().unwrap()),
        (8 << 20) / 512
    );
    assert_eq!(id[130], 9, "LBADS = 512 B");
    // Namespace 2 does not exist; Doorbell Buffer Config is not offered.
    assert_eq!(
        rig.admin(sqe(0x06, 0, 2, [page.device_addr().0, 0], [0, 0, 0]))
            .1,
        0x0b
    );
    assert_eq!(rig.admin(sqe(0x7c, 0, 0, [0, 0], [0, 0, 0])).1, 0x01);
    // Number of Queues: 4 asked, 4 granted (0's based).
    assert_eq!(
        rig.admin(sqe(0x09, 0, 0, [0, 0], [7, 3 | (3 << 16), 0])),
        (0, 0, 0x0003_0003)
    );
    // Queue creation checks: qid 5 > granted, size beyond MQES, SQ onto a missing CQ.
    let a = page.device_addr().0;
    assert_eq!(
        rig.admin(sqe(0x05, 0, 0, [a, 0], [5 | (3 << 16), 1, 0])),
        (1, 0x01, 0)
    );
    assert_eq!(
        rig.admin(sqe(0x05, 0, 0, [a, 0], [1 | (4096 << 16), 1, 0])),
        (1, 0x02, 0)
    );
    assert_eq!(
        rig.admin(sqe(0x01, 0, 0, [a, 0], [1 | (3 << 16), 1 | (1 << 16), 0])),
        (1, 0x00, 0)
    );
    assert_eq!(rig.nvme.admin_commands(0x06), 3);
    assert!(rig.nvme.stats().doorbell_writes >= 2 * 8);

    // Normal shutdown, then disable.
    rig.bar.write32(0x14, 0x0046_4001).unwrap();
    wait_for(
        || (rig.bar.read32(0x1c).unwrap() >> 2) & 3 == 2,
        "CSTS.SHST complete",
    );
    rig.bar.write32(0x14, 0).unwrap();
    wait_for(|| rig.bar.read32(0x1c).unwrap() & 1 == 0, "CSTS.RDY = 0");
}

#[test]
fn write_with_prps_read_back_with_sgls_and_interrupts() {
    let mut rig = Rig::up(EmuNvmeConfig::default());
    let fds = rig.nvme.enable_msix_eventfds(2).unwrap();
    let mut q = rig.io_queue(1, Some(1));
    let bar = rig.bar.clone();

    // 16 KiB starting 512 B into a buffer: PRP1 with an offset, then 4 pages through a PRP
    // list that starts in the last slot of one page and chains to a second page.
    let data = pattern(16 << 10, 7);
    let mut buf = rig.pool.try_alloc(32 << 10).unwrap();
    buf.write_at(512, &data).unwrap();
    let base = buf.device_addr().0;
    let mut list1 = rig.pool.try_alloc(4096).unwrap();
    let mut list2 = rig.pool.try_alloc(4096).unwrap();
    list1
        .write_at(4088, &list2.device_addr().0.to_le_bytes())
        .unwrap();
    for i in 0..4u64 {
        list2
            .write_at(8 * i as usize, &(base + 4096 * (i + 1)).to_le_bytes())
            .unwrap();
    }
    let prp2 = list1.device_addr().0 + 4088;
    let write = sqe(0x01, 0, 1, [base + 512, prp2], [8, 0, 31]);
    assert_eq!(q.run(&*bar, write), (0, 0, 0));
    let mut ns = vec![0u8; 16 << 10];
    rig.nvme.read_namespace(8 * 512, &mut ns).unwrap();
    assert_eq!(ns, data);
    assert!(fds[1].read().unwrap() >= 1, "the I/O CQ raised vector 1");

    // Read it back with an SGL: a Last Segment of two Data Blocks into two buffers.
    let mut seg = rig.pool.try_alloc(4096).unwrap();
    let a = rig.pool.try_alloc(8 << 10).unwrap();
    let b = rig.pool.try_alloc(8 << 10).unwrap();
    let descs: Vec<u8> = [
        sgl_desc(a.device_addr().0, 8 << 10, 0),
        sgl_desc(b.device_addr().0, 8 << 10, 0),
    ]
    .iter()
    .flat_map(|d| d.iter().flat_map(|w| w.to_le_bytes()))
    .collect();
    seg.write_at(0, &descs).unwrap();
    let read = sqe(
        0x02,
        0x40,
        1,
        sgl_desc(seg.device_addr().0, 32, 3),
        [8, 0, 31],
    );
    assert_eq!(q.run(&*bar, read), (0, 0, 0));
    let mut back = vec![0u8; 8 << 10];
    a.read_at(0, &mut back).unwrap();
    assert_eq!(back, data[..8 << 10]);
    b.read_at(0, &mut back).unwrap();
    assert_eq!(back, data[8 << 10..]);

    // One Data Block whose length does not match the transfer: Data SGL Length Invalid.
    let short = sqe(
        0x02,
        0x40,
        1,
        sgl_desc(a.device_addr().0, 4096, 0),
        [8, 0, 31],
    );
    assert_eq!(q.run(&*bar, short), (0, 0x0f, 0));
    // Beyond the namespace: LBA Out of Range.
    let far = sqe(0x02, 0, 1, [a.device_addr().0, 0], [16383, 0, 1]);
    assert_eq!(q.run(&*bar, far), (0, 0x80, 0));
    // Write Zeroes, then a deallocate, read as zeros.
    assert_eq!(q.run(&*bar, sqe(0x08, 0, 1, [0, 0], [8, 0, 3])), (0, 0, 0));
    let mut range = rig.pool.try_alloc(16).unwrap();
    let mut r = [0u8; 16];
    r[4..8].copy_from_slice(&4u32.to_le_bytes());
    r[8..16].copy_from_slice(&12u64.to_le_bytes());
    range.write_at(0, &r).unwrap();
    let dsm = sqe(0x09, 0, 1, [range.device_addr().0, 0], [0, 1 << 2, 0]);
    assert_eq!(q.run(&*bar, dsm), (0, 0, 0));
    rig.nvme.read_namespace(8 * 512, &mut ns).unwrap();
    assert!(ns[..8 * 512].iter().all(|&x| x == 0));
    assert_eq!(ns[8 * 512..], data[8 * 512..]);
    assert_eq!(rig.nvme.io_commands(0x01), 1);
    assert_eq!(rig.nvme.io_commands(0x02), 3);

    // Deleting the CQ before its SQ is refused.
    assert_eq!(rig.admin(sqe(0x04, 0, 0, [0, 0], [1, 0, 0])), (1, 0x0c, 0));
    assert_eq!(rig.admin(sqe(0x00, 0, 0, [0, 0], [1, 0, 0])), (0, 0, 0));
    assert_eq!(rig.admin(sqe(0x04, 0, 0, [0, 0], [1, 0, 0])), (0, 0, 0));
    drop(list1);
}

#[test]
fn dma_to_an_unmapped_iova_is_an_iommu_fault_and_a_data_transfer_error() {
    let mut rig = Rig::up(EmuNvmeConfig::default());
    let mut q = rig.io_queue(1, None);
    let bogus = 0x7_0000_0000u64;
    let read = sqe(0x02, 0, 1, [bogus, 0], [0, 0, 0]);
    assert_eq!(q.run(&*rig.bar, read), (0, 0x04, 0));
    let stats = rig.nvme.stats();
    assert_eq!(stats.iommu_faults, 1);
    assert_eq!(stats.last_fault_iova, Some(bogus));
}

#[test]
fn bus_master_off_stops_all_dma() {
    let mut rig = Rig::up(EmuNvmeConfig::default());
    let mut q = rig.io_queue(1, None);
    let bar = rig.bar.clone();
    let buf = rig.pool.try_alloc(4096).unwrap();
    let read = sqe(0x02, 0, 1, [buf.device_addr().0, 0], [0, 0, 7]);

    // A held command keeps writing its buffer until bus mastering goes off.
    rig.nvme.faults().hold_next_command();
    q.submit(&*bar, read);
    wait_for(|| rig.nvme.stats().held_dma_writes > 0, "held DMA");
    let mut b = [0u8; 8];
    buf.read_at(0, &mut b).unwrap();
    assert_eq!(b, [0xee; 8]);

    // The first clear is refused by the injected fault and the driver's read-back sees it.
    rig.nvme.faults().fail_next_bus_master_clear();
    assert!(rig.nvme.set_bus_master(false).is_err());
    rig.nvme.set_bus_master(false).unwrap();
    let writes = rig.nvme.stats().held_dma_writes;
    // A new command is not even fetched.
    let cid = q.submit(&*bar, read);
    assert!(q.poll(&*bar, Duration::from_millis(30)).is_none());
    let stats = rig.nvme.stats();
    assert_eq!(stats.held_dma_writes, writes, "no DMA after bus master off");
    assert!(stats.dma_refused > 0);
    assert_eq!(stats.dma_after_bus_master_off, 0);

    // Back on: the waiting command runs; a function reset ends the held one.
    rig.nvme.set_bus_master(true).unwrap();
    assert_eq!(
        q.poll(&*bar, Duration::from_secs(5)).map(|c| c.0),
        Some(cid)
    );
    rig.nvme.faults().fail_function_reset(true);
    assert!(rig.nvme.function_reset().is_err());
    rig.nvme.faults().fail_function_reset(false);
    rig.nvme.function_reset().unwrap();
    assert_eq!(bar.read32(0x1c).unwrap(), 0, "reset: not ready");
    let after = rig.nvme.stats().held_dma_writes;
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(rig.nvme.stats().held_dma_writes, after);
    assert_eq!(rig.nvme.stats().dma_after_bus_master_off, 0);
}

#[test]
fn dropped_and_corrupted_completions() {
    let mut rig = Rig::up(EmuNvmeConfig::default());
    let mut q = rig.io_queue(1, None);
    let bar = rig.bar.clone();
    let flush = sqe(0x00, 0, 1, [0, 0], [0, 0, 0]);
    rig.nvme.faults().drop_completions(1);
    rig.nvme
        .faults()
        .corrupt_next_completion(Corruption::BadCid);
    q.submit(&*bar, flush);
    q.submit(&*bar, flush);
    let (cid, ..) = q.poll(&*bar, Duration::from_secs(5)).unwrap();
    assert_eq!(cid, 0xffff);
    assert!(q.poll(&*bar, Duration::from_millis(20)).is_none());
    assert_eq!(rig.nvme.stats().completions_dropped, 1);
    // Queue creation fails once when told to.
    rig.nvme.faults().fail_queue_creations(1);
    let q2 = Queue::new(&rig.pool, 2, 8);
    let cq = sqe(
        0x05,
        0,
        0,
        [q2.cq.device_addr().0, 0],
        [2 | (7 << 16), 1, 0],
    );
    assert_eq!(rig.admin(cq), (0, 0x06, 0));
    assert_eq!(rig.admin(cq), (0, 0, 0));
}

#[test]
fn inline_doorbells_complete_commands_before_the_write_returns() {
    let mut rig = Rig::up(EmuNvmeConfig {
        inline_doorbells: true,
        ..EmuNvmeConfig::default()
    });
    let mut q = rig.io_queue(1, None);
    let bar = rig.bar.clone();
    let data = pattern(4096, 3);
    let mut buf = rig.pool.try_alloc(4096).unwrap();
    buf.write_at(0, &data).unwrap();
    let before = rig.nvme.stats().inline_ticks;
    for lba in [0u32, 8, 16] {
        let write = sqe(0x01, 0, 1, [buf.device_addr().0, 0], [lba, 0, 7]);
        let cid = q.submit(&*bar, write);
        // No waiting: the completion is in the ring as soon as the doorbell write returns.
        let (got, sct, sc, _) = q.poll(&*bar, Duration::ZERO).expect("completed inline");
        assert_eq!((got, sct, sc), (cid, 0, 0));
    }
    assert!(rig.nvme.stats().inline_ticks > before);
    let mut ns = vec![0u8; 4096];
    rig.nvme.read_namespace(16 * 512, &mut ns).unwrap();
    assert_eq!(ns, data);
}
