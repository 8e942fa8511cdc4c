//! # nvme_bench: polled NVMe throughput of tidepool-nvme against a minimal reference loop
//!
//! One boot measures, on the harness's first vfio NVMe controller, one queue pair, QD32:
//!
//! 1. **reference**: a minimal polled loop written straight against the registers and rings
//!    (its own bring-up, pre-built commands and PRP lists, pre-allocated buffers, one SQ tail
//!    and one CQ head doorbell per batch). It is the best this emulated device allows, so the
//!    driver's numbers are reported as a percentage of it, measured in the same boot.
//! 2. **driver, zero copy**: `IoQueue::submit_read` of pool buffers, `poll`, resubmit.
//! 3. **driver, bounce**: per I/O, a fresh pool buffer (`try_alloc`), and after completion a
//!    copy into private memory (what `read` into caller memory costs).
//!
//! Each for 4 KiB random reads and 128 KiB sequential reads, `TIDEPOOL_NVME_BENCH_SECS` seconds
//! each (default 2), zero copy with register doorbells and with shadow doorbells
//! ([`ControllerConfig::shadow_doorbells`]), bounce with register doorbells. The variants run
//! interleaved, `TIDEPOOL_NVME_BENCH_ROUNDS` rounds (default 3), and each reports its median:
//! the shared host's load drifts by 2x within minutes. It also prints where the driver's CPU
//! time goes (TSC ticks per I/O inside `submit` and `poll`) and doorbell writes per I/O.
//!
//! Output lines `RESULT <name> <iops> <GB/s> <percent of reference>` are for scripts.
//! Exit 0 = every run completed without an I/O error (the numbers are reported, not judged:
//! a timed run in a shared TCG guest is no pass/fail criterion).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool::device::backend::{BackendChoice, VfioDomain};
use tidepool::device::iommufd::CdevDevice;
use tidepool::device::vfio::{Bar, VfioDevice};
use tidepool::device::{Mmio, PciDevice};
use tidepool::pool::{DmaBuf, Pool, PoolConfig};
use tidepool_nvme::regs::{offset, Cap, Cc};
use tidepool_nvme::spec::{Command, IoOpcode};
use tidepool_nvme::{Controller, ControllerConfig, Done, Namespace};
use tidepool_vmtests::{env_u64, HarnessEnv, Rng};

/// Queue depth of every run.
const QD: usize = 32;

type Res<T> = Result<T, String>;

/// Where the next read goes: random aligned offsets, or sequential with wrap-around.
struct Lbas {
    rng: Rng,
    random: bool,
    blocks_per_io: u64,
    span: u64,
    seq: u64,
}

impl Lbas {
    fn new(ns_blocks: u64, block_bytes: u64, size: usize, random: bool) -> Lbas {
        let blocks_per_io = size as u64 / block_bytes;
        Lbas {
            rng: Rng(0x1234_5678_9abc_def1),
            random,
            blocks_per_io,
            span: ns_blocks / blocks_per_io,
            seq: 0,
        }
    }

    fn next(&mut self) -> u64 {
        let slot = if self.random {
            self.rng.next() % self.span
        } else {
            self.seq = (self.seq + 1) % self.span;
            self.seq
        };
        slot * self.blocks_per_io
    }
}

/// One measured run.
#[derive(Clone, Copy)]
struct Measured {
    ios: u64,
    secs: f64,
    size: usize,
}

impl Measured {
    fn iops(&self) -> f64 {
        self.ios as f64 / self.secs
    }

    fn gbps(&self) -> f64 {
        self.iops() * self.size as f64 / 1e9
    }
}

/// The TSC, for attributing CPU time to `submit` and `poll`.
fn ticks() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("nvme_bench: PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("nvme_bench: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Res<()> {
    let env = HarnessEnv::from_env().map_err(|e| e.to_string())?;
    let bdf = env.nvme_bdf().to_string();
    let secs = Duration::from_secs(env_u64("TIDEPOOL_NVME_BENCH_SECS", 2));
    let rounds = env_u64("TIDEPOOL_NVME_BENCH_ROUNDS", 3) as usize;
    // TIDEPOOL_NVME_BENCH_ONLY=4k|128k runs one case; TIDEPOOL_NVME_BENCH_VARIANTS=reference
    // (comma-separated names) runs only those variants: how tpio_vs_loop.sh interleaves the
    // reference loop and the driver's own loop with tpio runs.
    let only = std::env::var("TIDEPOOL_NVME_BENCH_ONLY").unwrap_or_default();
    let cases: Vec<(usize, bool)> = [(4096usize, true), (128 << 10, false)]
        .into_iter()
        .filter(|&(size, _)| only.is_empty() || only == format!("{}k", size >> 10))
        .collect();
    // The host is shared and TCG speed drifts, so every variant runs once per round, rounds
    // interleave the variants, and the report gives each variant's median.
    let wanted = std::env::var("TIDEPOOL_NVME_BENCH_VARIANTS").unwrap_or_default();
    let variants: Vec<&Variant> = VARIANTS
        .iter()
        .filter(|v| {
            if wanted.is_empty() {
                v.by_default
            } else {
                wanted.split(',').any(|w| w == v.name)
            }
        })
        .collect();
    if variants.is_empty() || cases.is_empty() {
        let names: Vec<&str> = VARIANTS.iter().map(|v| v.name).collect();
        return Err(format!(
            "TIDEPOOL_NVME_BENCH_VARIANTS must name at least one of {} (comma-separated), and \
             TIDEPOOL_NVME_BENCH_ONLY must be 4k or 128k",
            names.join(", ")
        ));
    }
    let mut results: Vec<Vec<Vec<Measured>>> = vec![vec![Vec::new(); variants.len()]; cases.len()];
    for round in 0..rounds {
        for (c, &(size, random)) in cases.iter().enumerate() {
            // Odd rounds run the variants in reverse: ABBA over pairs of rounds.
            let mut order: Vec<usize> = (0..variants.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for v in order {
                let variant = variants[v];
                let m = match variant.driver {
                    None => reference_loop(&bdf, size, random, secs)?,
                    Some(setup) => with_driver(&bdf, setup, |ctrl, ns| {
                        driver_loop(ctrl, ns, size, random, secs, setup.bounce)
                    })?,
                };
                println!(
                    "round {round} {} {}: {:.0} IOPS {:.3} GB/s",
                    variant.name,
                    case_name(size, random),
                    m.iops(),
                    m.gbps()
                );
                results[c][v].push(m);
            }
        }
    }
    for (c, &(size, random)) in cases.iter().enumerate() {
        // Percentages against the reference loop when it ran (it is listed first).
        let reference = variants[0].driver.is_none().then(|| median(&results[c][0]));
        for (v, variant) in variants.iter().enumerate() {
            let name = format!("{} {}", variant.name, case_name(size, random));
            report(&name, median(&results[c][v]), reference);
        }
    }
    Ok(())
}

/// The run with the median IOPS.
fn median(runs: &[Measured]) -> Measured {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.iops().total_cmp(&b.iops()));
    sorted[sorted.len() / 2]
}

/// One benchmarked loop: the reference loop (`driver: None`) or the driver's own loop on a
/// controller set up as `driver` says.
struct Variant {
    /// Its name in `TIDEPOOL_NVME_BENCH_VARIANTS` and in the report.
    name: &'static str,
    /// Run when `TIDEPOOL_NVME_BENCH_VARIANTS` is empty.
    by_default: bool,
    driver: Option<DriverSetup>,
}

/// How [`with_driver`] opens the controller, and whether the loop bounces.
#[derive(Clone, Copy)]
struct DriverSetup {
    /// Shadow doorbells (Doorbell Buffer Config) on.
    shadow: bool,
    /// Reads bounce through a private buffer (zero-copy otherwise).
    bounce: bool,
    /// Opened as tpio's tidepool engine opens it: MSI-X enabled, 64 I/O queues asked for.
    as_tpio: bool,
    /// The pool's background pre-zeroing on (the default).
    prezero: bool,
}

impl DriverSetup {
    const MMIO: DriverSetup = DriverSetup {
        shadow: false,
        bounce: false,
        as_tpio: false,
        prezero: true,
    };
}

/// Every variant, the reference loop first (the report's percentages are against it).
const VARIANTS: &[Variant] = &[
    Variant {
        name: "reference",
        by_default: true,
        driver: None,
    },
    Variant {
        name: "mmio zero-copy",
        by_default: true,
        driver: Some(DriverSetup::MMIO),
    },
    Variant {
        name: "shadow zero-copy",
        by_default: true,
        driver: Some(DriverSetup {
            shadow: true,
            ..DriverSetup::MMIO
        }),
    },
    Variant {
        name: "mmio bounce",
        by_default: true,
        driver: Some(DriverSetup {
            bounce: true,
            ..DriverSetup::MMIO
        }),
    },
    // The zero-copy loop on a controller opened as tpio's tidepool engine opens it, to tell
    // the controller's setup from the engine in tpio's cost.
    Variant {
        name: "tpio-config zero-copy",
        by_default: false,
        driver: Some(DriverSetup {
            as_tpio: true,
            ..DriverSetup::MMIO
        }),
    },
    // The bounce loop with the pool's background pre-zeroing off, to tell the grower's zeroing
    // (on the other vCPU, sharing the host's cores with the emulated device) from the bounce
    // path's own cost.
    Variant {
        name: "mmio bounce no-prezero",
        by_default: false,
        driver: Some(DriverSetup {
            bounce: true,
            prezero: false,
            ..DriverSetup::MMIO
        }),
    },
];

/// Opens the controller as `setup` says (polling only), runs `f`, closes it.
fn with_driver(
    bdf: &str,
    setup: DriverSetup,
    f: impl FnOnce(&Controller, &Namespace) -> Res<Measured>,
) -> Res<Measured> {
    let defaults = ControllerConfig::default();
    let mut pool = defaults.pool.clone();
    if !setup.prezero {
        pool.prezero_bytes_per_pass = 0;
    }
    let cfg = ControllerConfig {
        pool,
        shadow_doorbells: setup.shadow,
        interrupts: setup.as_tpio,
        io_queues: if setup.as_tpio {
            64
        } else {
            defaults.io_queues
        },
        ..defaults
    };
    let shadow = setup.shadow;
    let ctrl = Controller::open(bdf, cfg).map_err(|e| format!("open {bdf}: {e}"))?;
    if ctrl.shadow_doorbells() != shadow {
        return Err(format!(
            "shadow doorbells asked {shadow}, in use {}",
            ctrl.shadow_doorbells()
        ));
    }
    let ns = ctrl.namespace(1).map_err(|e| e.to_string())?;
    let m = f(&ctrl, &ns)?;
    let in_use = ctrl.pool_stats().in_use_bytes;
    // Rings, PRP pages and the admin queue are freed with the queues; the pool must not leak.
    if in_use > 64 << 10 {
        return Err(format!(
            "{in_use} B of pool memory still in use after the run"
        ));
    }
    Ok(m)
}

fn case_name(size: usize, random: bool) -> String {
    format!(
        "{}-{}k",
        if random { "randread" } else { "seqread" },
        size >> 10
    )
}

fn report(name: &str, m: Measured, reference: Option<Measured>) {
    let pct = reference.map_or(100.0, |r| 100.0 * m.iops() / r.iops());
    println!(
        "RESULT {name} {:.0} {:.3} {pct:.1}  ({} I/Os in {:.2} s)",
        m.iops(),
        m.gbps(),
        m.ios,
        m.secs
    );
}

/// The driver's polled loop at QD32: zero copy (the buffers circulate), or bounce (a fresh
/// buffer per I/O and a copy out of it after completion).
fn driver_loop(
    ctrl: &Controller,
    ns: &Namespace,
    size: usize,
    random: bool,
    limit: Duration,
    bounce: bool,
) -> Res<Measured> {
    let mut q = ctrl
        .create_io_queue::<u64>(QD as u32)
        .map_err(|e| e.to_string())?;
    q.defer_doorbells(true);
    let mut lbas = Lbas::new(ns.blocks(), u64::from(ns.block_bytes()), size, random);
    let mut private = vec![0u8; size];
    for _ in 0..QD {
        let buf = ctrl.pool().try_alloc(size).map_err(|e| e.to_string())?;
        let lba = lbas.next();
        q.submit_read(ns, lba, buf, lba)
            .map_err(|e| e.error.to_string())?;
    }
    let mut out: Vec<Done<u64>> = Vec::with_capacity(QD);
    let (mut submit_ticks, mut poll_ticks, mut polls, mut empty) = (0u64, 0u64, 0u64, 0u64);
    let start = Instant::now();
    let mut ios = 0u64;
    while polls % 256 != 0 || start.elapsed() < limit {
        polls += 1;
        let t0 = ticks();
        let n = q.poll(&mut out).map_err(|e| e.to_string())?;
        poll_ticks += ticks() - t0;
        if n == 0 {
            empty += 1;
        }
        for d in out.drain(..) {
            d.result.map_err(|e| format!("read at {}: {e}", d.user))?;
            ios += 1;
            let mut buf = d
                .data
                .and_then(tidepool::data::DmaData::into_buf)
                .ok_or("buffer not returned")?;
            if bounce {
                buf.read_at(0, &mut private).map_err(|e| e.to_string())?;
                drop(buf);
                buf = ctrl.pool().try_alloc(size).map_err(|e| e.to_string())?;
            }
            let lba = lbas.next();
            let t0 = ticks();
            q.submit_read(ns, lba, buf, lba)
                .map_err(|e| e.error.to_string())?;
            submit_ticks += ticks() - t0;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    while q.outstanding() > 0 {
        q.poll(&mut out).map_err(|e| e.to_string())?;
        for d in out.drain(..) {
            d.result.map_err(|e| e.to_string())?;
        }
    }
    let per = |t: u64| t as f64 / ios.max(1) as f64;
    let c = q.counters();
    println!(
        "  profile: {:.0} ticks/I/O in submit, {:.0} ticks/I/O in all polls, {:.2} polls/I/O, {:.1} I/Os per non-empty poll; doorbell writes per I/O: SQ {:.3} (avoided {:.3}), CQ {:.3} (avoided {:.3})",
        per(submit_ticks),
        per(poll_ticks),
        polls as f64 / ios.max(1) as f64,
        ios as f64 / (polls - empty).max(1) as f64,
        per(c.sq_doorbell_writes),
        per(c.sq_doorbells_avoided),
        per(c.cq_doorbell_writes),
        per(c.cq_doorbells_avoided),
    );
    Ok(Measured { ios, secs, size })
}

// ---- the reference loop ----------------------------------------------------------------------

/// Stores a command into SQ slot `slot` of the ring at `sq` (8 volatile 64-bit stores).
fn store_sqe(sq: &DmaBuf, slot: usize, cmd: &Command) {
    let b = cmd.to_bytes();
    let p = sq.as_ptr().wrapping_add(slot * 64).cast::<u64>();
    for i in 0..8 {
        let w = u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]));
        // SAFETY: callers pass `slot` < ring entries and the ring buffer holds them all; the
        // buffer is 4 KiB aligned, so `p` is 8-byte aligned; raw volatile stores form no
        // reference to device-visible memory.
        unsafe { p.add(i).write_volatile(w) };
    }
}

/// Reads CQ slot `slot`'s (status with phase, command ID) with volatile loads.
fn load_cqe(cq: &DmaBuf, slot: usize) -> (u16, u16) {
    let p = cq.as_ptr().wrapping_add(slot * 16 + 12).cast::<u32>();
    // SAFETY: `slot` < ring entries, inside the buffer; 4-byte aligned; volatile load.
    let dw3 = unsafe { p.read_volatile() };
    ((dw3 >> 16) as u16, dw3 as u16)
}

/// A bare queue pair for the reference loop.
struct RawQueue {
    sq: DmaBuf,
    cq: DmaBuf,
    entries: usize,
    tail: usize,
    head: usize,
    phase: bool,
    sq_db: usize,
    cq_db: usize,
}

impl RawQueue {
    fn new(pool: &Pool, qid: usize, entries: usize, stride: usize) -> Res<RawQueue> {
        Ok(RawQueue {
            sq: pool
                .try_alloc((entries * 64).max(4096))
                .map_err(|e| e.to_string())?,
            cq: pool
                .try_alloc((entries * 16).max(4096))
                .map_err(|e| e.to_string())?,
            entries,
            tail: 0,
            head: 0,
            phase: true,
            sq_db: offset::DOORBELLS + 2 * qid * stride,
            cq_db: offset::DOORBELLS + (2 * qid + 1) * stride,
        })
    }

    fn push(&mut self, cmd: &Command) {
        store_sqe(&self.sq, self.tail, cmd);
        self.tail = (self.tail + 1) % self.entries;
    }

    /// The command ID of the next completion, if one was posted (and consumes it).
    fn pop(&mut self) -> Option<(u16, u16)> {
        let (status, cid) = load_cqe(&self.cq, self.head);
        if (status & 1 != 0) != self.phase {
            return None;
        }
        self.head += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase = !self.phase;
        }
        Some((cid, status >> 1))
    }

    fn ring_sq(&self, bar: &Bar) -> Res<()> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        bar.write32(self.sq_db, self.tail as u32)
            .map_err(|e| e.to_string())
    }

    fn ring_cq(&self, bar: &Bar) -> Res<()> {
        bar.write32(self.cq_db, self.head as u32)
            .map_err(|e| e.to_string())
    }

    /// Runs one admin command to completion (spinning).
    fn admin(&mut self, bar: &Bar, cmd: Command) -> Res<()> {
        self.push(&cmd);
        self.ring_sq(bar)?;
        let start = Instant::now();
        loop {
            if let Some((_, status)) = self.pop() {
                self.ring_cq(bar)?;
                return if status == 0 {
                    Ok(())
                } else {
                    Err(format!(
                        "admin opcode {:#x}: status {status:#x}",
                        cmd.opcode
                    ))
                };
            }
            if start.elapsed() > Duration::from_secs(5) {
                return Err(format!("admin opcode {:#x} timed out", cmd.opcode));
            }
        }
    }
}

/// Waits for CSTS.RDY == `ready`.
fn wait_ready(bar: &Bar, ready: bool) -> Res<()> {
    let start = Instant::now();
    while (bar.read32(offset::CSTS).map_err(|e| e.to_string())? & 1 != 0) != ready {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("CSTS.RDY did not become {ready}"));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

/// The minimal polled loop: its own bring-up, one I/O queue of 64 entries, QD32, fixed buffers.
fn reference_loop(bdf: &str, size: usize, random: bool, limit: Duration) -> Res<Measured> {
    // The backend TIDEPOOL_VFIO_BACKEND asks for; the concrete device for its `Bar`.
    let choice = BackendChoice::from_env().map_err(|e| e.to_string())?;
    let domain = VfioDomain::for_device(choice, bdf).map_err(|e| e.to_string())?;
    let (device, bar): (Arc<dyn PciDevice>, Bar) = match &domain {
        VfioDomain::Type1(c) => {
            let d = VfioDevice::open_in(c, bdf).map_err(|e| e.to_string())?;
            let bar = d.bar(0).map_err(|e| e.to_string())?;
            (Arc::new(d), bar)
        }
        VfioDomain::Iommufd(i) => {
            let d = CdevDevice::open_in(i, bdf).map_err(|e| e.to_string())?;
            let bar = d.bar(0).map_err(|e| e.to_string())?;
            (Arc::new(d), bar)
        }
    };
    let view = domain.view(u64::MAX).map_err(|e| e.to_string())?;
    device.set_bus_master(true).map_err(|e| e.to_string())?;
    let pool = Pool::new(view, PoolConfig::default()).map_err(|e| e.to_string())?;
    let cap = Cap::from_raw(bar.read64(offset::CAP).map_err(|e| e.to_string())?);
    let stride = cap.doorbell_stride();
    bar.write32(offset::CC, 0).map_err(|e| e.to_string())?;
    wait_ready(&bar, false)?;
    let mut admin = RawQueue::new(&pool, 0, 16, stride)?;
    let aqa = 15 | (15 << 16);
    bar.write32(offset::AQA, aqa).map_err(|e| e.to_string())?;
    bar.write64(offset::ASQ, admin.sq.device_addr().0)
        .map_err(|e| e.to_string())?;
    bar.write64(offset::ACQ, admin.cq.device_addr().0)
        .map_err(|e| e.to_string())?;
    bar.write32(offset::CC, Cc::driver_default(true).0)
        .map_err(|e| e.to_string())?;
    wait_ready(&bar, true)?;
    admin.admin(&bar, Command::set_number_of_queues(1, 1))?;
    let entries = 64usize;
    let mut io = RawQueue::new(&pool, 1, entries, stride)?;
    admin.admin(
        &bar,
        Command::create_io_cq(1, entries as u16, io.cq.device_addr().0, 0, false),
    )?;
    admin.admin(
        &bar,
        Command::create_io_sq(1, entries as u16, io.sq.device_addr().0, 1),
    )?;
    // The namespace geometry the driver would read: 512 B blocks in QEMU's default format,
    // size from the harness's image size.
    let block = 512u64;
    let ns_blocks = env_u64("TIDEPOOL_NVME_BYTES", 256 << 20) / block;
    let mut lbas = Lbas::new(ns_blocks, block, size, random);
    let nlb = (size as u64 / block - 1) as u32;
    // Per command: its data buffer and (beyond two pages) a PRP list built once.
    let mut cmds = Vec::with_capacity(QD);
    let mut keep = Vec::new();
    for cid in 0..QD {
        let data = pool.try_alloc(size).map_err(|e| e.to_string())?;
        let addr = data.device_addr().0;
        let pages = size.div_ceil(4096);
        let mut cmd = Command::io(IoOpcode::Read, 1);
        cmd.cid = cid as u16;
        cmd.prp1 = addr;
        cmd.cdw12 = nlb;
        if pages == 2 {
            cmd.prp2 = addr + 4096;
        } else if pages > 2 {
            let mut list = pool.try_alloc(4096).map_err(|e| e.to_string())?;
            let words: Vec<u8> = (1..pages as u64)
                .flat_map(|k| (addr + k * 4096).to_le_bytes())
                .collect();
            list.write_at(0, &words).map_err(|e| e.to_string())?;
            cmd.prp2 = list.device_addr().0;
            keep.push(list);
        }
        keep.push(data);
        cmds.push(cmd);
    }
    let submit = |io: &mut RawQueue, cmds: &mut [Command], cid: usize, lba: u64| {
        cmds[cid].cdw10 = lba as u32;
        cmds[cid].cdw11 = (lba >> 32) as u32;
        io.push(&cmds[cid]);
    };
    for cid in 0..QD {
        submit(&mut io, &mut cmds, cid, lbas.next());
    }
    io.ring_sq(&bar)?;
    let start = Instant::now();
    let mut ios = 0u64;
    let mut polls = 0u64;
    let mut outstanding = QD;
    // TIDEPOOL_NVME_BENCH_RING_EVERY=N rings the SQ doorbell after every N resubmitted commands
    // (the device may start on them while the rest are written); 0 (default): once per pass.
    let ring_every = env_u64("TIDEPOOL_NVME_BENCH_RING_EVERY", 0) as usize;
    let mut reaped_cids: Vec<u16> = Vec::with_capacity(QD);
    loop {
        polls += 1;
        let stop = polls % 256 == 0 && start.elapsed() >= limit;
        reaped_cids.clear();
        while let Some((cid, status)) = io.pop() {
            if status != 0 {
                return Err(format!("reference read failed: status {status:#x}"));
            }
            reaped_cids.push(cid);
        }
        if !reaped_cids.is_empty() {
            ios += reaped_cids.len() as u64;
            outstanding -= reaped_cids.len();
            io.ring_cq(&bar)?;
            if !stop {
                for (n, &cid) in reaped_cids.iter().enumerate() {
                    submit(&mut io, &mut cmds, usize::from(cid), lbas.next());
                    outstanding += 1;
                    if ring_every > 0 && (n + 1) % ring_every == 0 {
                        io.ring_sq(&bar)?;
                    }
                }
                if ring_every == 0 || reaped_cids.len() % ring_every != 0 {
                    io.ring_sq(&bar)?;
                }
            }
        }
        if stop {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let drain_start = Instant::now();
    while outstanding > 0 && drain_start.elapsed() < Duration::from_secs(5) {
        if io.pop().is_some() {
            outstanding -= 1;
            io.ring_cq(&bar)?;
        }
    }
    // Delete the queues and disable, so the driver starts from a clean controller.
    admin.admin(&bar, Command::delete_io_sq(1))?;
    admin.admin(&bar, Command::delete_io_cq(1))?;
    bar.write32(offset::CC, 0).map_err(|e| e.to_string())?;
    wait_ready(&bar, false)?;
    drop(keep);
    drop(io);
    drop(admin);
    Ok(Measured { ios, secs, size })
}
