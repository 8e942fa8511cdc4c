//! The NVMe driver's CPU cost per I/O, on the host, against the emulated controller
//! (`tidepool-emu`), next to a minimal loop against the same emulated controller in the same
//! run.
//!
//! `cargo bench -p tidepool-benches --bench nvme_emu` (env `NVME_EMU_IOS` = I/Os per run,
//! default 100000; `NVME_EMU_ROUNDS` = A/B pairs, default 2, run in ABBA order;
//! `NVME_EMU_ONLY=inline|threaded`, `NVME_EMU_QD=N` and `NVME_EMU_PATH=zero-copy|bounce` run one
//! regime, queue depth or path).
//!
//! What is measured: 4 KiB reads on one polled queue at QD 1, 8, 32 and 128, each I/O resubmitted
//! as soon as it completes (one SQ doorbell per batch of resubmissions). The figure is the
//! **driver thread's** CPU time per I/O spent in the I/O path: TSC ticks inside submissions and
//! inside polls that reaped something (a poll that finds the ring empty is waiting for the
//! device, not work), converted to ns with the TSC rate measured over the run. Two regimes:
//! - `inline`: the controller runs on the driver's thread inside each doorbell write
//!   ([`EmuNvmeConfig::inline_doorbells`]) and its own time (TSC ticks from the doorbell's
//!   hand-off to the model to its return) is subtracted, so the figure is the driver's work
//!   alone: no second core, no cross-core cache transfers, no preemption of a device thread.
//!   This is the regime of the ≤ 150 ns goal.
//! - `threaded`: the controller on its own thread, as in the tests; every completion and doorbell
//!   crosses cores, which on this 2-core host costs more than the driver's work.
//!
//! Three loops:
//! - `minimal`: written straight against BAR0 and the rings: pre-built commands, pre-allocated
//!   buffers, phase-tag polling, one doorbell per batch. No validation, no bookkeeping: the floor.
//! - `zero-copy`: `IoQueue::submit_read` of pool buffers (`DmaData::owned`), `poll`, resubmit.
//! - `bounce`: per I/O `DmaData::try_bounce` of a private 4 KiB `Vec` (`FromDevice`: a zeroed
//!   pool buffer), and on completion `DmaData::complete` (the copy-out) before resubmitting.
//!
//! Rounds alternate A (driver) and B (minimal) as ABBA; the table gives medians and every round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool::data::DmaData;
use tidepool::device::{Mmio, PciDevice};
use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Direction, DmaBuf, Pool, PoolConfig};
use tidepool_emu::{EmuNvme, EmuNvmeConfig};
use tidepool_nvme::spec::{Command, IoOpcode};
use tidepool_nvme::{Controller, ControllerConfig, Done, IoQueue};

const IO: usize = 4096;
const QDS: [usize; 4] = [1, 8, 32, 128];
/// The namespace: 1 MiB, small enough that the model's reads of it stay in the cache and
/// disturb the driver's working set as little as a DMA engine would.
const NAMESPACE_BYTES: u64 = 1 << 20;

/// The TSC, for attributing the driver thread's time to the I/O path.
#[inline(always)]
fn ticks() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn emu_config(inline: bool) -> EmuNvmeConfig {
    EmuNvmeConfig {
        namespace_bytes: NAMESPACE_BYTES,
        block_bytes: 4096,
        inline_doorbells: inline,
        ..EmuNvmeConfig::default()
    }
}

fn pool_config() -> PoolConfig {
    PoolConfig {
        memory: MemoryConfig {
            page_size: PageSize::Small4K,
            allow_small_pages: true,
        },
        chunk_bytes: 2 << 20,
        prefill_bytes: 2 << 20,
        max_bytes: 4 << 20,
        max_buffer: 64 << 10,
        low_watermark: 0,
        high_watermark: 2 << 20,
        reserve_bytes: 0,
        shrink_delay: Duration::from_secs(600),
        ..PoolConfig::default()
    }
}

/// One run's result: ns of driver-thread work per I/O, and I/Os per second (wall).
#[derive(Copy, Clone, Debug)]
struct Run {
    ns_per_io: f64,
    iops: f64,
}

/// Converts ticks to ns with the TSC rate over `(t0, w0)..now`, less `device_ticks` (the
/// controller's inline time in TSC ticks, [`tidepool_emu::EmuNvmeStats::inline_ticks`], which
/// the work ticks include).
fn finish(work_ticks: u64, device_ticks: u64, ios: usize, t0: u64, w0: Instant) -> Run {
    let wall = w0.elapsed();
    let rate = (ticks() - t0) as f64 / wall.as_nanos() as f64;
    let work_ns = (work_ticks.saturating_sub(device_ticks)) as f64 / rate;
    Run {
        ns_per_io: work_ns / ios as f64,
        iops: ios as f64 / wall.as_secs_f64(),
    }
}

/// The driver loop: zero copy (`bounce = false`) or bounce through caller memory.
fn driver_run(qd: usize, ios: usize, bounce: bool, inline: bool) -> Run {
    let nvme = Arc::new(EmuNvme::new(emu_config(inline)).expect("emulated controller"));
    let device = nvme.clone();
    let cfg = ControllerConfig {
        interrupts: false,
        pool: pool_config(),
        ..ControllerConfig::default()
    };
    let ctrl = Controller::with_device(nvme, cfg).expect("bring-up");
    let ns = ctrl.namespace(1).expect("namespace 1");
    let pool = ctrl.pool().clone();
    let mut q: IoQueue<u64> = ctrl.create_io_queue(qd as u32).expect("I/O queue");
    q.defer_doorbells(true);
    let blocks = ns.blocks();
    let mut next_lba = 0u64;
    let mut lba = || {
        next_lba = (next_lba + 7) % blocks;
        next_lba
    };
    let data = |pool: &Pool, spare: &mut Vec<Vec<u8>>, buf: Option<DmaBuf>| -> DmaData {
        if bounce {
            let mem = spare.pop().unwrap_or_else(|| vec![0u8; IO]);
            DmaData::try_bounce(pool, mem, Direction::FromDevice).expect("bounce buffer")
        } else {
            DmaData::owned(buf.unwrap_or_else(|| pool.try_alloc(IO).expect("buffer")))
        }
    };
    let mut spare: Vec<Vec<u8>> = Vec::new();
    for _ in 0..qd {
        let d = data(&pool, &mut spare, None);
        q.submit_read(&ns, lba(), d, 0).expect("submit");
    }
    q.ring_doorbell().expect("doorbell");
    let mut out: Vec<Done<u64>> = Vec::with_capacity(qd);
    let (mut done, mut submitted) = (0usize, qd);
    let mut work = 0u64;
    let device0 = device.stats().inline_ticks;
    let (t0, w0) = (ticks(), Instant::now());
    while done < ios {
        let a = ticks();
        let n = q.poll(&mut out).expect("poll");
        if n == 0 {
            continue;
        }
        for d in out.drain(..) {
            d.result.expect("read");
            done += 1;
            let back = d.data.expect("data back").complete();
            let buf = if bounce {
                spare.push(
                    back.into_memory()
                        .and_then(|m| m.into_vec())
                        .expect("memory"),
                );
                None
            } else {
                back.into_buf()
            };
            if submitted < ios {
                let d = data(&pool, &mut spare, buf);
                q.submit_read(&ns, lba(), d, 0).expect("submit");
                submitted += 1;
            }
        }
        q.ring_doorbell().expect("doorbell");
        work += ticks() - a;
    }
    let run = finish(work, device.stats().inline_ticks - device0, ios, t0, w0);
    drop(q);
    assert_eq!(pool.stats().in_use_bytes, ctrl.pool_stats().in_use_bytes);
    run
}

/// The minimal loop: hand bring-up, raw rings, pre-built commands.
fn minimal_run(qd: usize, ios: usize, inline: bool) -> Run {
    let nvme = Arc::new(EmuNvme::new(emu_config(inline)).expect("emulated controller"));
    let pool = Pool::new(nvme.dma_view().expect("view"), pool_config()).expect("pool");
    let bar = nvme.map_bar(0).expect("BAR0");
    nvme.set_bus_master(true).expect("bus master");
    let mut admin = Rings::new(&pool, 0, 16);
    bar.write32(0x24, (15 << 16) | 15).unwrap();
    bar.write64(0x28, admin.sq.device_addr().0).unwrap();
    bar.write64(0x30, admin.cq.device_addr().0).unwrap();
    bar.write32(0x14, 0x0046_0001).unwrap();
    let start = Instant::now();
    while bar.read32(0x1c).unwrap() & 1 == 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "CSTS.RDY");
        std::thread::sleep(Duration::from_micros(100));
    }
    let entries = (qd + 1) as u16;
    let mut io = Rings::new(&pool, 1, entries);
    let mut cq = Command::create_io_cq(1, entries, io.cq.device_addr().0, 0, false);
    admin.run(&*bar, &mut cq);
    let mut sq = Command::create_io_sq(1, entries, io.sq.device_addr().0, 1);
    admin.run(&*bar, &mut sq);
    // Pre-built commands, one buffer each, CID = slot.
    let bufs: Vec<DmaBuf> = (0..qd).map(|_| pool.try_alloc(IO).unwrap()).collect();
    let blocks = NAMESPACE_BYTES / IO as u64;
    let mut cmds: Vec<Command> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut c = Command::read_write(IoOpcode::Read, 1, 0, 1);
            c.prp1 = b.device_addr().0;
            c.cid = i as u16;
            c
        })
        .collect();
    let mut next_lba = 0u64;
    for c in cmds.iter_mut() {
        next_lba = (next_lba + 7) % blocks;
        c.cdw10 = next_lba as u32;
        io.push(c);
    }
    io.ring_sq(&*bar);
    let (mut done, mut submitted) = (0usize, qd);
    let mut work = 0u64;
    let device0 = nvme.stats().inline_ticks;
    let (t0, w0) = (ticks(), Instant::now());
    while done < ios {
        let a = ticks();
        let mut reaped = false;
        while let Some((cid, status)) = io.take(&*bar) {
            assert_eq!(status, 0, "read failed");
            reaped = true;
            done += 1;
            if submitted < ios {
                next_lba = (next_lba + 7) % blocks;
                let c = &mut cmds[usize::from(cid)];
                c.cdw10 = next_lba as u32;
                io.push(c);
                submitted += 1;
            }
        }
        if reaped {
            io.ring_cq(&*bar);
            io.ring_sq(&*bar);
            work += ticks() - a;
        }
    }
    finish(work, nvme.stats().inline_ticks - device0, ios, t0, w0)
}

/// A queue pair driven by hand.
struct Rings {
    qid: u16,
    entries: u16,
    sq: DmaBuf,
    cq: DmaBuf,
    tail: u16,
    head: u16,
    phase: u16,
}

impl Rings {
    fn new(pool: &Pool, qid: u16, entries: u16) -> Rings {
        Rings {
            qid,
            entries,
            sq: pool
                .try_alloc((usize::from(entries) * 64).max(4096))
                .unwrap(),
            cq: pool
                .try_alloc((usize::from(entries) * 16).max(4096))
                .unwrap(),
            tail: 0,
            head: 0,
            phase: 1,
        }
    }

    #[inline(always)]
    fn push(&mut self, c: &Command) {
        let base = self
            .sq
            .as_ptr()
            .wrapping_add(usize::from(self.tail) * 64)
            .cast::<u64>();
        for (i, w) in c.to_words().iter().enumerate() {
            // SAFETY: `tail < entries` and the ring holds `entries` 64-byte slots; the pool
            // buffer is page aligned; the slot is free (at most entries - 1 outstanding).
            unsafe { base.add(i).write_volatile(w.to_le()) };
        }
        self.tail = (self.tail + 1) % self.entries;
    }

    #[inline(always)]
    fn ring_sq(&self, bar: &dyn Mmio) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        bar.write32(0x1000 + 8 * usize::from(self.qid), u32::from(self.tail))
            .unwrap();
    }

    #[inline(always)]
    fn ring_cq(&self, bar: &dyn Mmio) {
        bar.write32(0x1004 + 8 * usize::from(self.qid), u32::from(self.head))
            .unwrap();
    }

    /// The next completion (CID, status without phase), if posted.
    #[inline(always)]
    fn take(&mut self, _bar: &dyn Mmio) -> Option<(u16, u16)> {
        let at = self.cq.as_ptr().wrapping_add(usize::from(self.head) * 16);
        // SAFETY: `head < entries`, inside the CQ ring; 16-byte slots, 4-byte aligned.
        let dw3 = unsafe { at.add(12).cast::<u32>().read_volatile() };
        let field = (dw3 >> 16) as u16;
        if field & 1 != self.phase {
            return None;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        self.head += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase ^= 1;
        }
        Some((dw3 as u16, field >> 1))
    }

    /// Submits `c` and polls until it completes (admin setup).
    fn run(&mut self, bar: &dyn Mmio, c: &mut Command) {
        c.cid = self.tail;
        self.push(c);
        self.ring_sq(bar);
        let start = Instant::now();
        loop {
            if let Some((_, status)) = self.take(bar) {
                self.ring_cq(bar);
                assert_eq!(status, 0, "admin command {:#x} failed", c.opcode);
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "admin timeout");
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing and wants a quick run.
    let quick = !std::env::args().any(|a| a == "--bench");
    let ios = env_usize("NVME_EMU_IOS", if quick { 2000 } else { 100_000 });
    let rounds = env_usize("NVME_EMU_ROUNDS", if quick { 1 } else { 2 });
    println!(
        "nvme_emu: driver CPU ns per 4 KiB read against the emulated controller, {ios} I/Os per \
         run, {rounds} ABBA round pair(s)"
    );
    println!(
        "{:<10} {:<9} {:>4} {:>10} {:>10} {:>7} {:>10}  rounds (driver/minimal ns)",
        "path", "regime", "QD", "driver ns", "minimal ns", "ratio", "kIOPS"
    );
    let mut verdicts = Vec::new();
    // NVME_EMU_ONLY, NVME_EMU_QD and NVME_EMU_PATH narrow the run (for profiling).
    let only = std::env::var("NVME_EMU_ONLY").unwrap_or_default();
    let only_qd = env_usize("NVME_EMU_QD", 0);
    let only_path = std::env::var("NVME_EMU_PATH").unwrap_or_default();
    for inline in [true, false] {
        if !only.is_empty() && only != if inline { "inline" } else { "threaded" } {
            continue;
        }
        for bounce in [false, true] {
            let path = if bounce { "bounce" } else { "zero-copy" };
            if !only_path.is_empty() && only_path != path {
                continue;
            }
            for qd in QDS.into_iter().filter(|&q| only_qd == 0 || q == only_qd) {
                let (mut a, mut b, mut iops) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..rounds {
                    // ABBA: driver, minimal, minimal, driver.
                    let d1 = driver_run(qd, ios, bounce, inline);
                    let m1 = minimal_run(qd, ios, inline);
                    let m2 = minimal_run(qd, ios, inline);
                    let d2 = driver_run(qd, ios, bounce, inline);
                    a.extend([d1.ns_per_io, d2.ns_per_io]);
                    b.extend([m1.ns_per_io, m2.ns_per_io]);
                    iops.extend([d1.iops, d2.iops]);
                }
                let every: Vec<String> = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| format!("{x:.0}/{y:.0}"))
                    .collect();
                let (ma, mb) = (median(&mut a.clone()), median(&mut b.clone()));
                let regime = if inline { "inline" } else { "threaded" };
                println!(
                    "{:<10} {:<9} {:>4} {:>10.0} {:>10.0} {:>7.2} {:>10.1}  {}",
                    path,
                    regime,
                    qd,
                    ma,
                    mb,
                    ma / mb,
                    median(&mut iops) / 1000.0,
                    every.join(" ")
                );
                if inline && !bounce {
                    verdicts.push((qd, ma, ma / mb));
                }
            }
        }
    }
    // The goals, for zero-copy in the inline regime (the driver's work alone).
    let verdict = |met: bool| if met { "MET" } else { "MISSED" };
    for (qd, ns, ratio) in verdicts {
        println!(
            "target QD {qd:>3}: zero-copy <= 150 ns per I/O: {:.0} ns {} | within 1.3x of minimal: {ratio:.2}x {}",
            ns,
            verdict(ns <= 150.0),
            verdict(ratio <= 1.3)
        );
    }
}
