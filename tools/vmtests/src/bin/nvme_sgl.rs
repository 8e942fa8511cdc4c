//! # nvme_sgl: SGL data pointers against PRPs on the harness's NVMe controller
//!
//! 1. **What the controller advertises**: Identify Controller SGLS, decoded, and what
//!    `DataPointer::Auto` resolves to.
//! 2. **Single Data Block descriptor** (zero-copy `submit_write`/`submit_read` on a queue set
//!    to SGLs): sizes from one block to the largest transfer (MDTS). Every write through the
//!    SGL queue is read back through a PRP queue and vice versa, so both paths see the same
//!    bytes on the medium.
//! 3. **Byte-granular buffers** (SGLs allow any alignment when SGLS bits 1:0 = 01b): data at
//!    odd offsets of pool buffers (1, 3, 511, 4095, ...), written and read back at other odd
//!    offsets, cross-checked through the PRP queue. A PRP queue refuses such an offset.
//! 4. **Segment lists**: one command's data scattered over 2..1024 byte-granular ranges of one
//!    buffer, with gaps: one segment page (≤ 256 descriptors) and chained pages (Segment then
//!    Last Segment descriptors). Written gathered, read back contiguously through PRPs and
//!    scattered through SGLs with other ranges; bytes in the gaps must stay untouched. A PRP
//!    queue refuses non-adjacent ranges and accepts adjacent ones (merged).
//! 5. **Blocking and async helpers** on SGL queues (split at MDTS; MSI-X `AsyncQueue`).
//! 6. **Throughput**, polled, zero copy, QD32: 4 KiB random reads and 128 KiB sequential
//!    reads, SGL queue and PRP queue interleaved (order alternating per round),
//!    `TIDEPOOL_NVME_BENCH_SECS` seconds each (default 2), `TIDEPOOL_SGL_ROUNDS` rounds
//!    (default 3); medians reported.
//! 7. `DataPointer::Sgl` at bring-up: accepted when SGLs are advertised, the typed error
//!    otherwise.
//!
//! Exit 0 = every check passed. The harness also fails the test on any IOMMU fault.

// One-range slices are exactly what the scatter API takes (one range at an odd offset).
#![allow(clippy::single_range_in_vec_init)]

use std::collections::BTreeSet;
use std::ops::Range;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tidepool::pool::DmaBuf;
use tidepool_nvme::prp::PrpError;
use tidepool_nvme::sgl::SglError;
use tidepool_nvme::{
    AsyncConfig, AsyncQueue, Controller, ControllerConfig, DataPointer, Done, IoQueue, Namespace,
    NvmeError, SubmitError,
};
use tidepool_vmtests::{env_u64, HarnessEnv, Rng};

type Res<T> = Result<T, String>;

/// Queue depth of the throughput runs.
const QD: usize = 32;

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("nvme_sgl: PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("nvme_sgl: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Hands out disjoint LBA extents, so every check reads back only what it wrote.
struct Extents {
    next: u64,
    end: u64,
}

impl Extents {
    /// The first LBA of a fresh extent of `bytes` (whole blocks, rounded up).
    fn take(&mut self, ns: &Namespace, bytes: usize) -> Res<u64> {
        let blocks = (bytes as u64).div_ceil(u64::from(ns.block_bytes()));
        let lba = self.next;
        if lba + blocks > self.end {
            return Err("test region of the namespace exhausted".into());
        }
        self.next += blocks;
        Ok(lba)
    }
}

fn run() -> Res<()> {
    let env = HarnessEnv::from_env().map_err(|e| e.to_string())?;
    let bdf = env.nvme_bdf().to_string();
    let cfg = ControllerConfig {
        io_queues: 4,
        data_pointer: DataPointer::Auto,
        ..ControllerConfig::default()
    };
    let ctrl = Controller::open(&bdf, cfg).map_err(|e| format!("open {bdf}: {e}"))?;
    let id = ctrl.identify();
    let support = ctrl.sgl_support();
    println!(
        "controller: {:?} firmware {:?}, MDTS {} ({:?} B); {}; DataPointer::Auto resolves to {:?}",
        id.model,
        id.firmware,
        id.mdts,
        id.max_transfer_bytes(ctrl.cap().min_page_bytes()),
        support,
        ctrl.data_pointer()
    );
    if !support.supported() {
        // Nothing SGL-specific to exercise: check the typed error and stop.
        drop(ctrl);
        let sgl_cfg = ControllerConfig {
            data_pointer: DataPointer::Sgl,
            ..ControllerConfig::default()
        };
        return match Controller::open(&bdf, sgl_cfg) {
            Err(NvmeError::Sgl(e)) => match *e {
                SglError::Unsupported { sgls } => {
                    println!("DataPointer::Sgl refused as expected (SGLS {sgls:#x})");
                    Ok(())
                }
                other => Err(format!(
                    "DataPointer::Sgl without SGLs: wrong error {other}"
                )),
            },
            Err(e) => Err(format!("DataPointer::Sgl without SGLs: wrong error {e}")),
            Ok(_) => Err("DataPointer::Sgl accepted by a controller without SGLs".into()),
        };
    }
    if ctrl.data_pointer() != DataPointer::Sgl {
        return Err("Auto did not pick SGLs on a controller that supports them".into());
    }
    let ns = ctrl.namespace(1).map_err(|e| e.to_string())?;
    let mut sgl_q = ctrl
        .create_io_queue::<u64>(QD as u32)
        .map_err(|e| e.to_string())?;
    let mut prp_q = ctrl
        .create_io_queue::<u64>(QD as u32)
        .map_err(|e| e.to_string())?;
    let got = prp_q
        .set_data_pointer(DataPointer::Prp)
        .map_err(|e| e.to_string())?;
    if (sgl_q.data_pointer(), got) != (DataPointer::Sgl, DataPointer::Prp) {
        return Err(format!("queues use {:?} and {got:?}", sgl_q.data_pointer()));
    }
    // Checks use the first quarter of the namespace; the benchmark reads the first 256 MiB.
    let mut extents = Extents {
        next: 0,
        end: ns.blocks() / 4,
    };
    let mut rng = Rng(0x5eed_0f51);
    let t = Instant::now();
    let mut checks = Checks {
        ctrl: &ctrl,
        ns: &ns,
        sgl: &mut sgl_q,
        prp: &mut prp_q,
        rng: &mut rng,
        extents: &mut extents,
    };
    let n1 = checks.single_descriptor()?;
    let n2 = checks.byte_granular(support.dword_aligned())?;
    let n3 = checks.segment_lists(support.dword_aligned())?;
    checks.prp_refusals()?;
    checks.blocking_helpers()?;
    println!(
        "verified: {n1} single-descriptor, {n2} byte-granular, {n3} segment-list transfers in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    async_check(&ctrl, &ns, &mut extents, &mut prp_q)?;
    throughput(&ctrl, &ns, &mut sgl_q, &mut prp_q)?;
    drop(sgl_q);
    drop(prp_q);
    drop(ctrl);
    let sgl_cfg = ControllerConfig {
        data_pointer: DataPointer::Sgl,
        ..ControllerConfig::default()
    };
    let ctrl = Controller::open(&bdf, sgl_cfg).map_err(|e| format!("reopen with Sgl: {e}"))?;
    if ctrl.data_pointer() != DataPointer::Sgl {
        return Err("DataPointer::Sgl did not give SGL queues".into());
    }
    println!("DataPointer::Sgl at bring-up: accepted");
    Ok(())
}

/// Submits one command with `submit` and polls `q` until it completes; returns its buffer.
fn complete(
    q: &mut IoQueue<u64>,
    what: &str,
    submitted: Result<u16, SubmitError<u64>>,
) -> Res<DmaBuf> {
    let cid = submitted.map_err(|e| format!("{what}: submit: {}", e.error))?;
    let mut out: Vec<Done<u64>> = Vec::new();
    let start = Instant::now();
    loop {
        q.poll(&mut out).map_err(|e| format!("{what}: poll: {e}"))?;
        if let Some(d) = out.pop() {
            if d.cid != cid {
                return Err(format!("{what}: completion for CID {} not {cid}", d.cid));
            }
            d.result.map_err(|e| format!("{what}: {e}"))?;
            return d
                .data
                .and_then(tidepool::data::DmaData::into_buf)
                .ok_or_else(|| format!("{what}: buffer not returned"));
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(format!("{what}: no completion in 30 s"));
        }
    }
}

/// The first differing byte of two equally long slices.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Byte value the read buffers are prefilled with, to see what the device did not write.
const POISON: u8 = 0xa5;

/// The correctness checks, sharing the controller, two queues and the LBA allocator.
struct Checks<'a> {
    ctrl: &'a Controller,
    ns: &'a Namespace,
    sgl: &'a mut IoQueue<u64>,
    prp: &'a mut IoQueue<u64>,
    rng: &'a mut Rng,
    extents: &'a mut Extents,
}

impl Checks<'_> {
    fn alloc(&self, len: usize) -> Res<DmaBuf> {
        self.ctrl.pool().try_alloc(len).map_err(|e| e.to_string())
    }

    /// Writes `data` at `lba` through `q` from a fresh buffer holding it at `ranges` (gather;
    /// `None`: contiguous at offset 0, through plain `submit_write`).
    fn write(
        &mut self,
        use_sgl: bool,
        lba: u64,
        data: &[u8],
        ranges: Option<&[Range<usize>]>,
    ) -> Res<()> {
        let cap = ranges
            .and_then(|r| r.iter().map(|r| r.end).max())
            .unwrap_or(data.len());
        let mut buf = self.alloc(cap)?;
        let ns = *self.ns;
        let q = if use_sgl {
            &mut *self.sgl
        } else {
            &mut *self.prp
        };
        let what = format!(
            "write {} B at LBA {lba} via {}",
            data.len(),
            if use_sgl { "SGL" } else { "PRP" }
        );
        let submitted = match ranges {
            None => {
                buf.write_at(0, data).map_err(|e| e.to_string())?;
                q.submit_write(&ns, lba, buf, 0)
            }
            Some(ranges) => {
                let mut at = 0;
                for r in ranges {
                    buf.write_at(r.start, &data[at..at + r.len()])
                        .map_err(|e| e.to_string())?;
                    at += r.len();
                }
                q.submit_write_ranges(&ns, lba, buf, ranges, 0)
            }
        };
        complete(q, &what, submitted).map(drop)
    }

    /// Reads `len` bytes at `lba` through `q` into a fresh poisoned buffer at `ranges`
    /// (scatter; `None`: contiguous, plain `submit_read`), gathers them, and checks that the
    /// device wrote nothing outside the ranges (which must be in ascending order).
    fn read(
        &mut self,
        use_sgl: bool,
        lba: u64,
        len: usize,
        ranges: Option<&[Range<usize>]>,
    ) -> Res<Vec<u8>> {
        let ns = *self.ns;
        let what = format!(
            "read {len} B at LBA {lba} via {}",
            if use_sgl { "SGL" } else { "PRP" }
        );
        let Some(ranges) = ranges else {
            let buf = self.alloc(len)?;
            let q = if use_sgl {
                &mut *self.sgl
            } else {
                &mut *self.prp
            };
            let submitted = q.submit_read(&ns, lba, buf, 0);
            let buf = complete(q, &what, submitted)?;
            let mut out = vec![0u8; len];
            buf.read_at(0, &mut out).map_err(|e| e.to_string())?;
            return Ok(out);
        };
        let cap = ranges.last().map_or(len, |r| r.end);
        let mut buf = self.alloc(cap)?;
        buf.write_at(0, &vec![POISON; buf.capacity()])
            .map_err(|e| e.to_string())?;
        let q = if use_sgl {
            &mut *self.sgl
        } else {
            &mut *self.prp
        };
        let submitted = q.submit_read_ranges(&ns, lba, buf, ranges, 0);
        let buf = complete(q, &what, submitted)?;
        let mut all = vec![0u8; buf.capacity()];
        buf.read_at(0, &mut all).map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(len);
        let mut prev_end = 0;
        for r in ranges {
            if let Some(i) = all[prev_end..r.start].iter().position(|&b| b != POISON) {
                return Err(format!(
                    "{what}: the device wrote byte {} outside the ranges",
                    prev_end + i
                ));
            }
            out.extend_from_slice(&all[r.clone()]);
            prev_end = r.end;
        }
        if all[prev_end..].iter().any(|&b| b != POISON) {
            return Err(format!("{what}: the device wrote past the last range"));
        }
        Ok(out)
    }

    /// Compares what was read with what was written.
    fn same(what: &str, want: &[u8], got: &[u8]) -> Res<()> {
        match first_difference(want, got) {
            None if want.len() == got.len() => Ok(()),
            None => Err(format!(
                "{what}: {} B read, {} B written",
                got.len(),
                want.len()
            )),
            Some(i) => Err(format!(
                "{what}: byte {i} differs (wrote {:#04x}, read {:#04x})",
                want[i], got[i]
            )),
        }
    }

    /// Step 2: one Data Block descriptor, sizes up to MDTS, crossed with PRPs.
    fn single_descriptor(&mut self) -> Res<usize> {
        let max = self.ns.max_transfer();
        let sizes = [
            512,
            1024,
            4096,
            4608,
            8192,
            12800,
            65536,
            131072,
            266240,
            max - 512,
            max,
        ];
        let mut n = 0;
        for size in sizes {
            for (w_sgl, r_sgl) in [(true, false), (false, true), (true, true)] {
                let lba = self.extents.take(self.ns, size)?;
                let data = self.rng.bytes(size);
                self.write(w_sgl, lba, &data, None)?;
                let back = self.read(r_sgl, lba, size, None)?;
                let what = format!("{size} B written via SGL={w_sgl}, read via SGL={r_sgl}");
                Self::same(&what, &data, &back)?;
                n += 1;
            }
        }
        println!(
            "single Data Block descriptor: {n} transfers of {:?} B verified against PRPs",
            sizes
        );
        Ok(n)
    }

    /// Step 3: data at odd byte offsets of pool buffers.
    fn byte_granular(&mut self, dword_only: bool) -> Res<usize> {
        let offsets: &[usize] = if dword_only {
            &[4, 8, 508, 4092]
        } else {
            &[1, 3, 4, 511, 2049, 4095]
        };
        let max = self.ns.max_transfer();
        let mut n = 0;
        for &size in &[512usize, 4096, 8704, 131072, max] {
            for (i, &off) in offsets.iter().enumerate() {
                let read_off = offsets[(i + 1) % offsets.len()] + 7 * usize::from(!dword_only);
                let lba = self.extents.take(self.ns, size)?;
                let data = self.rng.bytes(size);
                let w = [off..off + size];
                self.write(true, lba, &data, Some(&w))?;
                let back = self.read(false, lba, size, None)?;
                Self::same(
                    &format!("{size} B from offset {off}, read via PRP"),
                    &data,
                    &back,
                )?;
                let r = [read_off..read_off + size];
                let back = self.read(true, lba, size, Some(&r))?;
                Self::same(
                    &format!("{size} B from offset {off}, read via SGL to offset {read_off}"),
                    &data,
                    &back,
                )?;
                n += 1;
            }
        }
        println!("byte-granular buffers: {n} transfers at offsets {offsets:?} verified");
        Ok(n)
    }

    /// `pieces` byte-granular (or dword-granular) ranges of random sizes adding up to `size`,
    /// with random gaps (some zero, so adjacent ranges occur too), from a random start.
    fn scatter(&mut self, size: usize, pieces: usize, dword_only: bool) -> Vec<Range<usize>> {
        let unit = if dword_only { 4 } else { 1 };
        let units = size / unit;
        let mut cuts = BTreeSet::new();
        while cuts.len() < pieces - 1 {
            cuts.insert(1 + self.rng.below(units as u64 - 1) as usize);
        }
        let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c * unit).collect();
        bounds.push(size);
        let mut at = unit * self.rng.below(4096 / unit as u64) as usize;
        let mut prev = 0;
        let mut out = Vec::with_capacity(pieces);
        for b in bounds {
            let len = b - prev;
            out.push(at..at + len);
            let gap = if self.rng.below(4) == 0 {
                0
            } else {
                unit * self.rng.below(64) as usize
            };
            at += len + gap;
            prev = b;
        }
        out
    }

    /// Step 4: segment lists of 2..1024 descriptors.
    fn segment_lists(&mut self, dword_only: bool) -> Res<usize> {
        let max = self.ns.max_transfer();
        let cases = [
            (1024usize, 2usize),
            (4096, 3),
            (8192, 16),
            (65536, 100),
            (131072, 255),
            (131072, 256),
            (131072, 257),
            (262144, 600),
            (max, 1024),
        ];
        let mut n = 0;
        for (size, pieces) in cases {
            let lba = self.extents.take(self.ns, size)?;
            let data = self.rng.bytes(size);
            let w = self.scatter(size, pieces, dword_only);
            self.write(true, lba, &data, Some(&w))?;
            let back = self.read(false, lba, size, None)?;
            Self::same(
                &format!("{size} B gathered from {pieces} ranges, read via PRP"),
                &data,
                &back,
            )?;
            let r = self.scatter(size, pieces, dword_only);
            let back = self.read(true, lba, size, Some(&r))?;
            Self::same(
                &format!("{size} B gathered from {pieces} ranges, scattered to {pieces}"),
                &data,
                &back,
            )?;
            n += 1;
        }
        println!(
            "segment lists: {n} transfers verified, (bytes, descriptors) = {:?}",
            cases
        );
        Ok(n)
    }

    /// PRP queues refuse what PRPs cannot describe and merge adjacent ranges.
    fn prp_refusals(&mut self) -> Res<()> {
        let ns = *self.ns;
        let lba = self.extents.take(self.ns, 8192)?;
        let buf = self.alloc(16384)?;
        match self
            .prp
            .submit_write_ranges(&ns, lba, buf, &[0..4096, 8192..12288], 0)
        {
            Err(SubmitError {
                error: NvmeError::Sgl(e),
                ..
            }) if matches!(*e, SglError::NeedsSgl { ranges: 2 }) => {}
            Err(e) => return Err(format!("PRP + scattered ranges: wrong error {}", e.error)),
            Ok(_) => return Err("PRP queue accepted scattered ranges".into()),
        }
        let buf = self.alloc(8192)?;
        match self.prp.submit_write_ranges(&ns, lba, buf, &[1..4097], 0) {
            Err(SubmitError {
                error: NvmeError::Prp(e),
                ..
            }) if matches!(*e, PrpError::Unaligned { .. }) => {}
            Err(e) => return Err(format!("PRP + odd offset: wrong error {}", e.error)),
            Ok(_) => return Err("PRP queue accepted an odd offset".into()),
        }
        let data = self.rng.bytes(8192);
        let adjacent = [100..3000, 3000..5000, 5000..8292];
        self.write(false, lba, &data, Some(&adjacent))?;
        let back = self.read(true, lba, 8192, None)?;
        Self::same("adjacent ranges merged for PRPs", &data, &back)?;
        println!("PRP queue: scattered ranges and odd offsets refused, adjacent ranges merged");
        Ok(())
    }

    /// Step 5a: the splitting blocking helpers on the SGL queue (beyond MDTS).
    fn blocking_helpers(&mut self) -> Res<()> {
        let size = 3 * self.ns.max_transfer() + 4096;
        let lba = self.extents.take(self.ns, size)?;
        let data = self.rng.bytes(size);
        self.sgl
            .write(self.ns, lba, &data)
            .map_err(|e| format!("blocking write via SGL: {e}"))?;
        let mut back = vec![0u8; size];
        self.prp
            .read(self.ns, lba, &mut back)
            .map_err(|e| format!("blocking read via PRP: {e}"))?;
        Self::same("blocking write via SGL", &data, &back)?;
        let mut again = vec![0u8; size];
        self.sgl
            .read(self.ns, lba, &mut again)
            .map_err(|e| format!("blocking read via SGL: {e}"))?;
        Self::same("blocking read via SGL", &data, &again)?;
        println!("blocking helpers: {size} B split at MDTS, via SGL, verified");
        Ok(())
    }
}

/// Step 5b: an MSI-X `AsyncQueue` (created with the controller's resolved data pointer, SGL)
/// writes, a PRP queue reads back.
fn async_check(
    ctrl: &Controller,
    ns: &Namespace,
    extents: &mut Extents,
    prp: &mut IoQueue<u64>,
) -> Res<()> {
    let mut rng = Rng(0xa5_1c);
    let sizes = [
        512usize,
        4096,
        65536,
        ns.max_transfer(),
        2 * ns.max_transfer(),
    ];
    let mut jobs = Vec::new();
    for size in sizes {
        jobs.push((extents.take(ns, size)?, rng.bytes(size)));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // The queue registers its eventfd with the runtime's reactor: create it inside.
    let entered = rt.enter();
    let q = AsyncQueue::new(ctrl, 16, AsyncConfig::default()).map_err(|e| e.to_string())?;
    drop(entered);
    let ns2 = *ns;
    let written: Res<()> = rt.block_on(async {
        for (lba, data) in &jobs {
            q.write(&ns2, *lba, data)
                .await
                .map_err(|e| format!("async write via SGL: {e}"))?;
        }
        let mut back = vec![0u8; jobs[1].1.len()];
        q.read(&ns2, jobs[1].0, &mut back)
            .await
            .map_err(|e| format!("async read via SGL: {e}"))?;
        Checks::same("async read via SGL", &jobs[1].1, &back)
    });
    written?;
    drop(q);
    for (lba, data) in &jobs {
        let mut back = vec![0u8; data.len()];
        prp.read(ns, *lba, &mut back)
            .map_err(|e| format!("read back async write: {e}"))?;
        Checks::same("async write via SGL, read via PRP", data, &back)?;
    }
    println!(
        "async queue (SGL): {} writes of {sizes:?} B verified via PRP",
        jobs.len()
    );
    Ok(())
}

/// One throughput run on `q`: QD32 zero-copy reads of `size` bytes, random or sequential,
/// over the first 256 MiB, for `limit`. Returns I/Os per second.
fn measure(
    ctrl: &Controller,
    ns: &Namespace,
    q: &mut IoQueue<u64>,
    size: usize,
    random: bool,
    limit: Duration,
) -> Res<f64> {
    let per_io = (size / ns.block_bytes() as usize) as u64;
    let span = ((256u64 << 20) / ns.block_bytes() as u64).min(ns.blocks()) / per_io;
    let mut rng = Rng(0x7e57);
    let mut seq = 0u64;
    let mut next_lba = || {
        let slot = if random {
            rng.below(span)
        } else {
            seq = (seq + 1) % span;
            seq
        };
        slot * per_io
    };
    q.defer_doorbells(true);
    for _ in 0..QD {
        let buf = ctrl.pool().try_alloc(size).map_err(|e| e.to_string())?;
        let lba = next_lba();
        q.submit_read(ns, lba, buf, lba)
            .map_err(|e| e.error.to_string())?;
    }
    let mut out: Vec<Done<u64>> = Vec::with_capacity(QD);
    let start = Instant::now();
    let mut ios = 0u64;
    let mut polls = 0u64;
    while polls % 256 != 0 || start.elapsed() < limit {
        polls += 1;
        q.poll(&mut out).map_err(|e| e.to_string())?;
        for d in out.drain(..) {
            d.result.map_err(|e| format!("read at {}: {e}", d.user))?;
            ios += 1;
            let buf = d.data.ok_or("buffer not returned")?;
            let lba = next_lba();
            q.submit_read(ns, lba, buf, lba)
                .map_err(|e| e.error.to_string())?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    while q.outstanding() > 0 {
        q.poll(&mut out).map_err(|e| e.to_string())?;
        for d in out.drain(..) {
            d.result.map_err(|e| e.to_string())?;
        }
    }
    q.defer_doorbells(false);
    Ok(ios as f64 / secs)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Step 6: SGL against PRP, interleaved.
fn throughput(
    ctrl: &Controller,
    ns: &Namespace,
    sgl: &mut IoQueue<u64>,
    prp: &mut IoQueue<u64>,
) -> Res<()> {
    let limit = Duration::from_secs(env_u64("TIDEPOOL_NVME_BENCH_SECS", 2));
    let rounds = env_u64("TIDEPOOL_SGL_ROUNDS", 3).max(1) as usize;
    for (size, random, name) in [
        (4096usize, true, "4k random read"),
        (128 << 10, false, "128k sequential read"),
    ] {
        let (mut s, mut p) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let sgl_first = round % 2 == 0;
            for use_sgl in [sgl_first, !sgl_first] {
                let q = if use_sgl { &mut *sgl } else { &mut *prp };
                let iops = measure(ctrl, ns, q, size, random, limit)?;
                println!(
                    "  round {round} {name} QD{QD} {}: {:.0} IOPS, {:.1} MB/s",
                    if use_sgl { "SGL" } else { "PRP" },
                    iops,
                    iops * size as f64 / 1e6
                );
                if use_sgl { &mut s } else { &mut p }.push(iops);
            }
        }
        let (ms, mp) = (median(&mut s), median(&mut p));
        println!(
            "THROUGHPUT {name} QD{QD}: SGL {ms:.0} IOPS ({:.1} MB/s), PRP {mp:.0} IOPS ({:.1} MB/s), SGL/PRP = {:.3} (medians of {rounds})",
            ms * size as f64 / 1e6,
            mp * size as f64 / 1e6,
            ms / mp
        );
    }
    Ok(())
}
