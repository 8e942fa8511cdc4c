//! The controller thread: register state machine, queues, admin and NVM commands, faults.
//!
//! Everything here runs on the one controller thread and owns its state without locks; it
//! talks to the outside through [`Shared`]'s atomics (registers, doorbells), the fault state,
//! the namespace and the PCI core's DMA helper.

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::data::{self, Seg, PAGE};
use super::status::{self, Status};
use super::{Corruption, FaultState, Shared};
use crate::pci::lock;
use crate::pci::{DmaError, PciCore};

/// How often held commands write their data buffer.
const HOLD_PERIOD: Duration = Duration::from_millis(1);
/// What held commands write.
const HOLD_PATTERN: u8 = 0xee;
/// Commands taken from one SQ before looking at the others.
const BURST: usize = 32;
/// Outstanding Asynchronous Event Requests allowed (AERL + 1).
const MAX_AERS: u32 = 4;

const CSTS_RDY: u32 = 1;
const CSTS_CFS: u32 = 1 << 1;
const CSTS_SHST_MASK: u32 = 0b11 << 2;
const CSTS_SHST_COMPLETE: u32 = 0b10 << 2;

#[derive(Copy, Clone, Debug)]
struct Sq {
    base: u64,
    entries: u32,
    head: u32,
    cqid: u16,
}

#[derive(Debug)]
struct Cq {
    base: u64,
    entries: u32,
    tail: u32,
    head: u32,
    phase: bool,
    ien: bool,
    iv: u16,
    backlog: VecDeque<Entry>,
    irq: bool,
}

impl Cq {
    fn room(&self) -> u32 {
        let used = (self.tail + self.entries - self.head) % self.entries;
        self.entries - 1 - used
    }
}

/// A completion entry to post.
#[derive(Copy, Clone, Debug)]
struct Entry {
    result: u32,
    sq_head: u16,
    sq_id: u16,
    cid: u16,
    status: Status,
    /// Post with the wrong phase tag (fault).
    stale: bool,
}

/// A submission entry, decoded.
#[derive(Copy, Clone, Debug)]
struct Cmd {
    opcode: u8,
    psdt: u8,
    cid: u16,
    nsid: u32,
    prp1: u64,
    prp2: u64,
    sgl1: [u8; 16],
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
}

impl Cmd {
    fn parse(b: &[u8; 64]) -> Cmd {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        Cmd {
            opcode: b[0],
            psdt: b[1] >> 6,
            cid: u16::from_le_bytes([b[2], b[3]]),
            nsid: u32_at(4),
            prp1: u64_at(24),
            prp2: u64_at(32),
            sgl1: b[24..40].try_into().unwrap(),
            cdw10: u32_at(40),
            cdw11: u32_at(44),
            cdw12: u32_at(48),
        }
    }

    /// Starting LBA and block count of a Read/Write/Write Zeroes.
    fn lba_range(&self) -> (u64, u64) {
        let slba = u64::from(self.cdw10) | (u64::from(self.cdw11) << 32);
        (slba, u64::from(self.cdw12 & 0xffff) + 1)
    }
}

enum Outcome {
    Done(Status, u32),
    /// Completes later or never (Asynchronous Event Request).
    Pending,
}

fn done(status: Status) -> Outcome {
    Outcome::Done(status, 0)
}

pub(super) struct Controller {
    sh: Arc<Shared>,
    enabled: bool,
    fatal: bool,
    last_cc: u32,
    reset_seen: u64,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    granted_sqs: u16,
    granted_cqs: u16,
    /// Held commands: their SQ and data segments.
    held: Vec<(usize, Vec<Seg>)>,
    next_hold_write: Option<Instant>,
    delayed: VecDeque<(Instant, u16, Entry)>,
    aers: u32,
    segs: Vec<Seg>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("enabled", &self.enabled)
            .field("fatal", &self.fatal)
            .finish_non_exhaustive()
    }
}

impl Controller {
    pub(super) fn new(sh: Arc<Shared>) -> Controller {
        let n = usize::from(sh.cfg.max_queues) + 1;
        Controller {
            enabled: false,
            fatal: false,
            last_cc: 0,
            reset_seen: 0,
            sqs: vec![None; n],
            cqs: (0..n).map(|_| None).collect(),
            granted_sqs: sh.cfg.max_queues,
            granted_cqs: sh.cfg.max_queues,
            held: Vec::new(),
            next_hold_write: None,
            delayed: VecDeque::new(),
            aers: 0,
            segs: Vec::new(),
            buf: Vec::new(),
            sh,
        }
    }

    fn next_timed_event(&self) -> Option<Instant> {
        let delayed = self.delayed.front().map(|d| d.0);
        match (delayed, self.next_hold_write) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// One pass over everything; true if it made progress.
    pub(super) fn pass(&mut self) -> bool {
        let mut busy = false;
        if let Some(req) = self.sh.flr.pending(self.reset_seen) {
            self.function_reset();
            self.reset_seen = req;
            self.sh.flr.acknowledge(req);
            busy = true;
        }
        let cc = self.sh.regs.cc.load(Ordering::Acquire);
        if cc != self.last_cc {
            self.cc_changed(cc);
            busy = true;
        }
        if self.sh.faults_armed.load(Ordering::Acquire) {
            let fatal = {
                let mut f = self.sh.faults();
                let fatal = std::mem::take(&mut f.fatal);
                if f.is_idle() {
                    self.sh.faults_armed.store(false, Ordering::Release);
                }
                fatal
            };
            if fatal {
                tracing::debug!("injected fault: CSTS.CFS");
                self.set_fatal();
            }
        }
        if self.enabled && !self.fatal {
            busy |= self.process_queues();
        }
        self.write_held();
        busy
    }

    fn csts_set(&self, bits: u32) {
        self.sh.regs.csts.fetch_or(bits, Ordering::AcqRel);
    }

    fn csts_clear(&self, bits: u32) {
        self.sh.regs.csts.fetch_and(!bits, Ordering::AcqRel);
    }

    fn set_fatal(&mut self) {
        self.fatal = true;
        self.csts_set(CSTS_CFS);
    }

    fn cc_changed(&mut self, cc: u32) {
        self.last_cc = cc;
        let en = cc & 1 != 0;
        if en && !self.enabled && !self.fatal {
            self.enable(cc);
        } else if !en && (self.enabled || self.fatal) {
            self.controller_reset();
        }
        let shn = (cc >> 14) & 0b11;
        if shn != 0 && self.enabled {
            self.sh.regs.csts.store(
                (self.sh.regs.csts.load(Ordering::Acquire) & !CSTS_SHST_MASK) | CSTS_SHST_COMPLETE,
                Ordering::Release,
            );
        } else if shn == 0 {
            self.csts_clear(CSTS_SHST_MASK);
        }
    }

    fn enable(&mut self, cc: u32) {
        let r = &self.sh.regs;
        let aqa = r.aqa.load(Ordering::Acquire);
        let (asq, acq) = (r.asq.load(Ordering::Acquire), r.acq.load(Ordering::Acquire));
        let sq_entries = (aqa & 0xfff) + 1;
        let cq_entries = ((aqa >> 16) & 0xfff) + 1;
        let css = (cc >> 4) & 0b111;
        let mps = (cc >> 7) & 0xf;
        let aligned = |a: u64| a != 0 && a % PAGE == 0;
        if sq_entries < 2
            || cq_entries < 2
            || !aligned(asq)
            || !aligned(acq)
            || css != 0
            || mps != 0
        {
            tracing::warn!(
                aqa,
                asq,
                acq,
                cc,
                "invalid admin queue or CC settings at enable: setting CSTS.CFS"
            );
            self.set_fatal();
            return;
        }
        self.sqs[0] = Some(Sq {
            base: asq,
            entries: sq_entries,
            head: 0,
            cqid: 0,
        });
        self.cqs[0] = Some(new_cq(acq, cq_entries, true, 0));
        self.granted_sqs = self.sh.cfg.max_queues;
        self.granted_cqs = self.sh.cfg.max_queues;
        self.enabled = true;
        self.csts_set(CSTS_RDY);
    }

    /// CC.EN = 0: queues gone, CSTS cleared. Held commands stay (see the module docs).
    fn controller_reset(&mut self) {
        self.sqs.iter_mut().for_each(|q| *q = None);
        self.cqs.iter_mut().for_each(|q| *q = None);
        self.delayed.clear();
        self.aers = 0;
        self.enabled = false;
        self.fatal = false;
        for d in self.sh.doorbells.iter() {
            d.store(0, Ordering::Release);
        }
        self.sh.regs.csts.store(0, Ordering::Release);
    }

    fn function_reset(&mut self) {
        self.controller_reset();
        self.held.clear();
        self.next_hold_write = None;
        let r = &self.sh.regs;
        r.cc.store(0, Ordering::Release);
        r.aqa.store(0, Ordering::Release);
        r.asq.store(0, Ordering::Release);
        r.acq.store(0, Ordering::Release);
        r.intms.store(0, Ordering::Release);
        self.last_cc = 0;
    }

    fn doorbell(&self, index: usize) -> u32 {
        self.sh.doorbells[index].load(Ordering::Acquire)
    }

    fn process_queues(&mut self) -> bool {
        let mut busy = false;
        for qid in 0..self.cqs.len() {
            let head = self.doorbell(2 * qid + 1);
            if let Some(cq) = self.cqs[qid].as_mut() {
                // An out-of-range head is a host error; the controller ignores it.
                if head < cq.entries {
                    cq.head = head;
                }
            }
        }
        if !self.delayed.is_empty() {
            let now = Instant::now();
            while self.delayed.front().is_some_and(|d| d.0 <= now) {
                let (_, cqid, e) = self.delayed.pop_front().unwrap();
                if let Some(cq) = self.cqs[usize::from(cqid)].as_mut() {
                    cq.backlog.push_back(e);
                }
            }
        }
        for qid in 0..self.cqs.len() {
            busy |= self.flush_cq(qid);
        }
        if self.sh.faults_armed.load(Ordering::Acquire) {
            let flood = self.sh.faults().flood_cq;
            if let Some(qid) = flood {
                busy |= self.flood(usize::from(qid));
            }
        }
        for qid in 0..self.sqs.len() {
            busy |= self.process_sq(qid);
        }
        for cq in self.cqs.iter_mut().flatten() {
            if std::mem::take(&mut cq.irq) && cq.ien {
                self.sh.pci.signal(cq.iv);
            }
        }
        busy
    }

    /// Posts what fits of a CQ's backlog.
    fn flush_cq(&mut self, qid: usize) -> bool {
        let Some(cq) = self.cqs.get_mut(qid).and_then(|c| c.as_mut()) else {
            return false;
        };
        let mut posted = false;
        while let Some(&e) = cq.backlog.front() {
            if cq.room() == 0 {
                break;
            }
            match post(&self.sh.pci, cq, e) {
                Ok(()) => {
                    cq.backlog.pop_front();
                    posted = true;
                    self.sh
                        .stats
                        .completions_posted
                        .fetch_add(1, Ordering::Relaxed);
                }
                // Retried when bus mastering is back.
                Err(DmaError::BusMasterOff) => break,
                Err(e) => {
                    tracing::warn!(qid, error = %e, "completion entry lost to an IOMMU fault");
                    cq.backlog.pop_front();
                }
            }
        }
        posted
    }

    fn flood(&mut self, qid: usize) -> bool {
        let (sq_id, sq_head) = self
            .sqs
            .iter()
            .enumerate()
            .find_map(|(i, s)| {
                s.filter(|s| usize::from(s.cqid) == qid)
                    .map(|s| (i, s.head))
            })
            .unwrap_or((qid, 0));
        let Some(cq) = self.cqs.get_mut(qid).and_then(|c| c.as_mut()) else {
            return false;
        };
        let mut busy = false;
        while cq.backlog.is_empty() && cq.room() > 0 {
            let e = Entry {
                result: 0,
                sq_head: sq_head as u16,
                sq_id: sq_id as u16,
                cid: 0,
                status: status::SUCCESS,
                stale: false,
            };
            if post(&self.sh.pci, cq, e).is_err() {
                break;
            }
            self.sh
                .stats
                .completions_posted
                .fetch_add(1, Ordering::Relaxed);
            busy = true;
        }
        busy
    }

    fn process_sq(&mut self, qid: usize) -> bool {
        let mut n = 0;
        while n < BURST {
            let Some(sq) = self.sqs[qid] else { break };
            let tail = self.doorbell(2 * qid);
            // An out-of-range tail is a host error; the controller ignores it.
            if tail >= sq.entries || tail == sq.head {
                break;
            }
            let Some(cq) = self.cqs[usize::from(sq.cqid)].as_ref() else {
                break;
            };
            if !cq.backlog.is_empty() || cq.room() == 0 {
                break;
            }
            let mut raw = [0u8; 64];
            match self
                .sh
                .pci
                .dma_read(sq.base + u64::from(sq.head) * 64, &mut raw)
            {
                Ok(()) => {}
                Err(DmaError::BusMasterOff) => break,
                Err(e) => {
                    tracing::warn!(qid, error = %e, "SQ entry fetch faulted: setting CSTS.CFS");
                    self.set_fatal();
                    break;
                }
            }
            if let Some(s) = self.sqs[qid].as_mut() {
                s.head = (s.head + 1) % s.entries;
            }
            n += 1;
            self.execute(qid, &raw);
            self.flush_cq(usize::from(sq.cqid));
        }
        n > 0
    }

    fn execute(&mut self, sqid: usize, raw: &[u8; 64]) {
        let c = Cmd::parse(raw);
        let admin = sqid == 0;
        let ops = if admin {
            &self.sh.admin_ops
        } else {
            &self.sh.io_ops
        };
        ops[usize::from(c.opcode)].fetch_add(1, Ordering::Relaxed);
        if !admin && self.take_fault(|f| take_one(&mut f.hold_next)) {
            self.hold(sqid, &c);
            return;
        }
        let outcome = if admin { self.admin(&c) } else { self.io(&c) };
        if let Outcome::Done(status, result) = outcome {
            self.complete(sqid, c.cid, status, result);
        }
    }

    /// Runs `f` on the fault state if any fault is armed.
    fn take_fault(&self, f: impl FnOnce(&mut FaultState) -> bool) -> bool {
        self.sh.faults_armed.load(Ordering::Acquire) && f(&mut self.sh.faults())
    }

    fn complete(&mut self, sqid: usize, cid: u16, status: Status, result: u32) {
        let Some(sq) = self.sqs[sqid] else { return };
        let mut e = Entry {
            result,
            sq_head: sq.head as u16,
            sq_id: sqid as u16,
            cid,
            status,
            stale: false,
        };
        let mut copies = 1;
        let mut delay = Duration::ZERO;
        if self.sh.faults_armed.load(Ordering::Acquire) {
            let mut f = self.sh.faults();
            if take_one(&mut f.drop_completions) {
                self.sh
                    .stats
                    .completions_dropped
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            match f.corruptions.pop_front() {
                Some(Corruption::BadCid) => e.cid = 0xffff,
                Some(Corruption::DuplicateCid) => copies = 2,
                Some(Corruption::StalePhase) => e.stale = true,
                Some(Corruption::SqHeadOutOfRange) => e.sq_head = sq.entries as u16,
                Some(Corruption::WrongSqId) => e.sq_id = e.sq_id.wrapping_add(1),
                None => {}
            }
            delay = f.delay;
        }
        for _ in 0..copies {
            if delay.is_zero() {
                if let Some(cq) = self.cqs[usize::from(sq.cqid)].as_mut() {
                    cq.backlog.push_back(e);
                }
            } else {
                self.delayed.push_back((Instant::now() + delay, sq.cqid, e));
            }
        }
    }

    fn hold(&mut self, sqid: usize, c: &Cmd) {
        let mut segs = Vec::new();
        if matches!(c.opcode, 0x01 | 0x02) {
            let (_, blocks) = c.lba_range();
            let len = blocks * u64::from(self.sh.cfg.block_bytes);
            if walk(&self.sh, c, false, len, c.opcode == 0x02, &mut segs).is_err() {
                segs.clear();
            }
        }
        tracing::debug!(cid = c.cid, "injected fault: holding a command");
        self.held.push((sqid, segs));
        self.next_hold_write = Some(Instant::now());
    }

    /// Held commands' periodic DMA into their buffers.
    fn write_held(&mut self) {
        let Some(at) = self.next_hold_write else {
            return;
        };
        let now = Instant::now();
        if now < at {
            return;
        }
        for (_, segs) in &self.held {
            for seg in segs {
                if let Seg::Data { iova, len } = *seg {
                    self.buf.clear();
                    self.buf.resize(len as usize, HOLD_PATTERN);
                    if self.sh.pci.dma_write(iova, &self.buf).is_ok() {
                        self.sh
                            .stats
                            .held_dma_writes
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        self.next_hold_write = (!self.held.is_empty()).then(|| now + HOLD_PERIOD);
    }

    // ---- data movement ----

    /// Device → host: `self.buf[..len]` to the command's data pointer.
    fn dma_out(&mut self, c: &Cmd, admin: bool, len: usize) -> Status {
        self.transfer(c, admin, len, true)
    }

    /// Host → device: the command's data into `self.buf[..len]`.
    fn dma_in(&mut self, c: &Cmd, admin: bool, len: usize) -> Status {
        self.buf.clear();
        self.buf.resize(len, 0);
        self.transfer(c, admin, len, false)
    }

    /// Walks the command's data pointer and moves `self.buf[..len]` segment by segment, to
    /// the host (`to_host`) or from it; a DMA failure is a Data Transfer Error.
    fn transfer(&mut self, c: &Cmd, admin: bool, len: usize, to_host: bool) -> Status {
        let mut segs = std::mem::take(&mut self.segs);
        let st = match walk(&self.sh, c, admin, len as u64, to_host, &mut segs) {
            Err(s) => s,
            Ok(()) => {
                let mut off = 0usize;
                let mut st = status::SUCCESS;
                for seg in &segs {
                    let n = seg.len() as usize;
                    if let Seg::Data { iova, .. } = *seg {
                        let bytes = &mut self.buf[off..off + n];
                        let moved = if to_host {
                            self.sh.pci.dma_write(iova, bytes)
                        } else {
                            self.sh.pci.dma_read(iova, bytes)
                        };
                        if moved.is_err() {
                            st = status::DATA_TRANSFER_ERROR;
                            break;
                        }
                    }
                    off += n;
                }
                st
            }
        };
        self.segs = segs;
        st
    }

    /// Sends `page` (Identify, log data) to the host.
    fn send(&mut self, c: &Cmd, page: &[u8]) -> Outcome {
        self.buf.clear();
        self.buf.extend_from_slice(page);
        done(self.dma_out(c, true, page.len()))
    }

    // ---- admin commands ----

    fn admin(&mut self, c: &Cmd) -> Outcome {
        if c.psdt != 0 {
            // Admin commands over PCIe use PRPs only.
            return done(status::INVALID_FIELD);
        }
        match c.opcode {
            0x00 => self.delete_sq(c),
            0x01 => self.create_sq(c),
            0x02 => self.get_log_page(c),
            0x04 => self.delete_cq(c),
            0x05 => self.create_cq(c),
            0x06 => self.identify(c),
            // Abort: "command not aborted" (result bit 0).
            0x08 => Outcome::Done(status::SUCCESS, 1),
            0x09 => self.set_features(c),
            0x0a => self.get_features(c),
            0x0c if self.aers >= MAX_AERS => done(status::AER_LIMIT_EXCEEDED),
            0x0c => {
                self.aers += 1;
                Outcome::Pending
            }
            // Doorbell Buffer Config (0x7c) and everything else.
            _ => done(status::INVALID_OPCODE),
        }
    }

    fn identify(&mut self, c: &Cmd) -> Outcome {
        let mut page = [0u8; 4096];
        match c.cdw10 & 0xff {
            0x00 if c.nsid == 1 => self.identify_namespace(&mut page),
            0x00 => return done(status::INVALID_NAMESPACE),
            0x01 => self.identify_controller(&mut page),
            0x02 if c.nsid >= 0xffff_fffe => return done(status::INVALID_NAMESPACE),
            0x02 => {
                if c.nsid < 1 {
                    page[0..4].copy_from_slice(&1u32.to_le_bytes());
                }
            }
            _ => return done(status::INVALID_FIELD),
        }
        self.send(c, &page)
    }

    fn identify_controller(&self, p: &mut [u8; 4096]) {
        let cfg = &self.sh.cfg;
        let text = |p: &mut [u8; 4096], at: usize, len: usize, s: &str| {
            p[at..at + len].fill(b' ');
            p[at..at + s.len()].copy_from_slice(s.as_bytes());
        };
        p[0..2].copy_from_slice(&super::VENDOR_ID.to_le_bytes());
        p[2..4].copy_from_slice(&super::VENDOR_ID.to_le_bytes());
        text(p, 4, 20, "TIDEPOOL-EMU-0001");
        text(p, 24, 40, "Tidepool emulated NVMe controller");
        text(p, 64, 8, "0.1");
        p[77] = cfg.mdts;
        p[78..80].copy_from_slice(&1u16.to_le_bytes()); // CNTLID
        p[80..84].copy_from_slice(&0x0001_0400u32.to_le_bytes()); // VER
        p[256..258].copy_from_slice(&0u16.to_le_bytes()); // OACS: no optional admin commands
        p[258] = 3; // ACL
        p[259] = (MAX_AERS - 1) as u8; // AERL
        p[260] = 0b10; // FRMW: one firmware slot
        p[262] = 0; // ELPE: one error log entry
        p[512] = 0x66; // SQES
        p[513] = 0x44; // CQES
        p[516..520].copy_from_slice(&1u32.to_le_bytes()); // NN
        p[520..522].copy_from_slice(&((1u16 << 2) | (1 << 3)).to_le_bytes()); // ONCS: DSM, WZ
        p[525] = 1; // VWC present
        let sgls: u32 = if cfg.sgl { 1 | (1 << 16) } else { 0 }; // supported, bit bucket
        p[536..540].copy_from_slice(&sgls.to_le_bytes());
        let nqn = b"nqn.2024-01.invalid.tidepool:emu-nvme";
        p[768..768 + nqn.len()].copy_from_slice(nqn);
    }

    fn identify_namespace(&self, p: &mut [u8; 4096]) {
        let cfg = &self.sh.cfg;
        let blocks = cfg.namespace_bytes / u64::from(cfg.block_bytes);
        for at in [0, 8, 16] {
            p[at..at + 8].copy_from_slice(&blocks.to_le_bytes()); // NSZE, NCAP, NUSE
        }
        p[25] = 0; // NLBAF: one format
        p[26] = 0; // FLBAS: format 0
        p[33] = 0b001; // DLFEAT: deallocated blocks read as zeros
        let lbads = cfg.block_bytes.trailing_zeros();
        p[128..132].copy_from_slice(&(lbads << 16).to_le_bytes());
    }

    fn get_log_page(&mut self, c: &Cmd) -> Outcome {
        let lid = c.cdw10 & 0xff;
        let dwords = ((c.cdw11 & 0xffff) << 16 | (c.cdw10 >> 16)) as usize + 1;
        if !matches!(lid, 0x01..=0x03) {
            return done(status::INVALID_LOG_PAGE);
        }
        if dwords * 4 > self.max_transfer() {
            return done(status::INVALID_FIELD);
        }
        // Error information, SMART / health, firmware slot: all zeros.
        self.buf.clear();
        self.buf.resize(dwords * 4, 0);
        done(self.dma_out(c, true, dwords * 4))
    }

    fn set_features(&mut self, c: &Cmd) -> Outcome {
        match c.cdw10 & 0xff {
            0x07 => {
                let nsqr = c.cdw11 & 0xffff;
                let ncqr = c.cdw11 >> 16;
                if nsqr == 0xffff || ncqr == 0xffff {
                    return done(status::INVALID_FIELD);
                }
                let max = u32::from(self.sh.cfg.max_queues);
                self.granted_sqs = (nsqr + 1).min(max) as u16;
                self.granted_cqs = (ncqr + 1).min(max) as u16;
                Outcome::Done(status::SUCCESS, self.queues_result())
            }
            // Volatile write cache, interrupt coalescing, async event configuration: accepted.
            0x06 | 0x08 | 0x0b => done(status::SUCCESS),
            _ => done(status::INVALID_FIELD),
        }
    }

    fn get_features(&mut self, c: &Cmd) -> Outcome {
        match c.cdw10 & 0xff {
            0x07 => Outcome::Done(status::SUCCESS, self.queues_result()),
            _ => done(status::INVALID_FIELD),
        }
    }

    fn queues_result(&self) -> u32 {
        u32::from(self.granted_sqs - 1) | (u32::from(self.granted_cqs - 1) << 16)
    }

    fn queue_size_ok(&self, entries: u32) -> bool {
        (2..=u32::from(self.sh.cfg.mqes) + 1).contains(&entries)
    }

    fn create_cq(&mut self, c: &Cmd) -> Outcome {
        if self.take_fault(|f| take_one(&mut f.fail_creations)) {
            return done(status::INTERNAL_ERROR);
        }
        let qid = (c.cdw10 & 0xffff) as usize;
        let entries = (c.cdw10 >> 16) + 1;
        let ien = c.cdw11 & 2 != 0;
        let iv = (c.cdw11 >> 16) as u16;
        if qid == 0 || qid > usize::from(self.granted_cqs) || self.cqs[qid].is_some() {
            return done(status::INVALID_QUEUE_ID);
        }
        if !self.queue_size_ok(entries) {
            return done(status::INVALID_QUEUE_SIZE);
        }
        if c.cdw11 & 1 == 0 || c.prp1 == 0 || c.prp1 % PAGE != 0 {
            return done(status::INVALID_FIELD);
        }
        if ien && iv >= self.sh.pci.msix_vectors() {
            return done(status::INVALID_INTERRUPT_VECTOR);
        }
        self.sh.doorbells[2 * qid + 1].store(0, Ordering::Release);
        self.cqs[qid] = Some(new_cq(c.prp1, entries, ien, iv));
        done(status::SUCCESS)
    }

    fn create_sq(&mut self, c: &Cmd) -> Outcome {
        if self
            .take_fault(|f| take_one(&mut f.fail_creations) || take_one(&mut f.fail_sq_creations))
        {
            return done(status::INTERNAL_ERROR);
        }
        let qid = (c.cdw10 & 0xffff) as usize;
        let entries = (c.cdw10 >> 16) + 1;
        let cqid = (c.cdw11 >> 16) as u16;
        if qid == 0 || qid > usize::from(self.granted_sqs) || self.sqs[qid].is_some() {
            return done(status::INVALID_QUEUE_ID);
        }
        let cq_ok = cqid != 0 && self.cqs.get(usize::from(cqid)).is_some_and(|q| q.is_some());
        if !cq_ok {
            return done(status::COMPLETION_QUEUE_INVALID);
        }
        if !self.queue_size_ok(entries) {
            return done(status::INVALID_QUEUE_SIZE);
        }
        if c.cdw11 & 1 == 0 || c.prp1 == 0 || c.prp1 % PAGE != 0 {
            return done(status::INVALID_FIELD);
        }
        self.sh.doorbells[2 * qid].store(0, Ordering::Release);
        self.sqs[qid] = Some(Sq {
            base: c.prp1,
            entries,
            head: 0,
            cqid,
        });
        done(status::SUCCESS)
    }

    fn delete_sq(&mut self, c: &Cmd) -> Outcome {
        if self.take_fault(|f| take_one(&mut f.fail_deletions)) {
            return done(status::INTERNAL_ERROR);
        }
        let qid = (c.cdw10 & 0xffff) as usize;
        if qid == 0 || self.sqs.get(qid).is_none_or(|q| q.is_none()) {
            return done(status::INVALID_QUEUE_ID);
        }
        if self.held.iter().any(|(sq, _)| *sq == qid) {
            // The spec (Base 1.4, 5.6) posts this command's completion only after every
            // command of the SQ completed or was aborted; a held (wedged) command is neither,
            // so the deletion never completes and the queue stays.
            tracing::debug!(
                qid,
                "Delete I/O SQ waits for a held command: never completes"
            );
            return Outcome::Pending;
        }
        self.sqs[qid] = None;
        done(status::SUCCESS)
    }

    fn delete_cq(&mut self, c: &Cmd) -> Outcome {
        if self.take_fault(|f| take_one(&mut f.fail_deletions)) {
            return done(status::INTERNAL_ERROR);
        }
        let qid = (c.cdw10 & 0xffff) as usize;
        if qid == 0 || self.cqs.get(qid).is_none_or(|q| q.is_none()) {
            return done(status::INVALID_QUEUE_ID);
        }
        if self
            .sqs
            .iter()
            .flatten()
            .any(|s| usize::from(s.cqid) == qid)
        {
            return done(status::INVALID_QUEUE_DELETION);
        }
        self.cqs[qid] = None;
        self.delayed.retain(|d| usize::from(d.1) != qid);
        done(status::SUCCESS)
    }

    // ---- NVM commands ----

    fn max_transfer(&self) -> usize {
        (PAGE as usize) << self.sh.cfg.mdts
    }

    /// The byte range of `blocks` at `slba`, if inside the namespace.
    fn byte_range(&self, slba: u64, blocks: u64) -> Option<std::ops::Range<usize>> {
        let bs = u64::from(self.sh.cfg.block_bytes);
        let end = slba.checked_add(blocks)?;
        if end > self.sh.cfg.namespace_bytes / bs {
            return None;
        }
        Some((slba * bs) as usize..(end * bs) as usize)
    }

    fn io(&mut self, c: &Cmd) -> Outcome {
        let ns_ok = c.nsid == 1 || (c.opcode == 0x00 && c.nsid == 0xffff_ffff);
        if matches!(c.opcode, 0x00 | 0x01 | 0x02 | 0x08 | 0x09) && !ns_ok {
            return done(status::INVALID_NAMESPACE);
        }
        match c.opcode {
            0x00 => done(status::SUCCESS), // Flush: the namespace is memory
            0x01 | 0x02 => {
                let (slba, blocks) = c.lba_range();
                let Some(range) = self.byte_range(slba, blocks) else {
                    return done(status::LBA_OUT_OF_RANGE);
                };
                if range.len() > self.max_transfer() {
                    return done(status::INVALID_FIELD);
                }
                if c.opcode == 0x02 {
                    self.buf.clear();
                    self.buf
                        .extend_from_slice(&self.sh.namespace()[range.clone()]);
                    done(self.dma_out(c, false, range.len()))
                } else {
                    let st = self.dma_in(c, false, range.len());
                    if st == status::SUCCESS {
                        self.sh.namespace()[range].copy_from_slice(&self.buf);
                    }
                    done(st)
                }
            }
            0x08 => {
                let (slba, blocks) = c.lba_range();
                match self.byte_range(slba, blocks) {
                    Some(range) => {
                        self.sh.namespace()[range].fill(0);
                        done(status::SUCCESS)
                    }
                    None => done(status::LBA_OUT_OF_RANGE),
                }
            }
            0x09 => self.dataset_management(c),
            _ => done(status::INVALID_OPCODE),
        }
    }

    fn dataset_management(&mut self, c: &Cmd) -> Outcome {
        let ranges = (c.cdw10 & 0xff) as usize + 1;
        if c.cdw11 & (1 << 2) == 0 {
            return done(status::SUCCESS); // only attributes, no deallocate: nothing to do
        }
        let st = self.dma_in(c, false, ranges * 16);
        if st != status::SUCCESS {
            return done(st);
        }
        let mut byte_ranges = Vec::with_capacity(ranges);
        for r in self.buf.chunks_exact(16) {
            let blocks = u64::from(u32::from_le_bytes(r[4..8].try_into().unwrap()));
            let slba = u64::from_le_bytes(r[8..16].try_into().unwrap());
            match self.byte_range(slba, blocks) {
                Some(range) => byte_ranges.push(range),
                None => return done(status::LBA_OUT_OF_RANGE),
            }
        }
        let mut ns = self.sh.namespace();
        for range in byte_ranges {
            ns[range].fill(0); // deallocated blocks read as zeros (DLFEAT)
        }
        done(status::SUCCESS)
    }
}

fn new_cq(base: u64, entries: u32, ien: bool, iv: u16) -> Cq {
    Cq {
        base,
        entries,
        tail: 0,
        head: 0,
        phase: true,
        ien,
        iv,
        backlog: VecDeque::new(),
        irq: false,
    }
}

fn take_one(n: &mut u32) -> bool {
    if *n > 0 {
        *n -= 1;
        true
    } else {
        false
    }
}

/// The command's data pointer as segments of exactly `len` bytes.
fn walk(
    sh: &Shared,
    c: &Cmd,
    admin: bool,
    len: u64,
    device_to_host: bool,
    segs: &mut Vec<Seg>,
) -> Result<(), Status> {
    segs.clear();
    if len == 0 {
        return Ok(());
    }
    match c.psdt {
        0 => data::prp(&sh.pci, c.prp1, c.prp2, len, segs),
        1 | 2 if sh.cfg.sgl && !admin => data::sgl(&sh.pci, &c.sgl1, len, device_to_host, segs),
        _ => Err(status::INVALID_FIELD),
    }
}

/// Writes one completion entry at the CQ's tail: the first 14 bytes, then (ordered after
/// them) the status halfword with the phase tag, as hardware makes the entry visible last.
fn post(pci: &PciCore, cq: &mut Cq, e: Entry) -> Result<(), DmaError> {
    let phase = cq.phase ^ e.stale;
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&e.result.to_le_bytes());
    b[8..10].copy_from_slice(&e.sq_head.to_le_bytes());
    b[10..12].copy_from_slice(&e.sq_id.to_le_bytes());
    b[12..14].copy_from_slice(&e.cid.to_le_bytes());
    b[14..16].copy_from_slice(&(u16::from(phase) | (e.status << 1)).to_le_bytes());
    let at = cq.base + u64::from(cq.tail) * 16;
    pci.dma_write(at, &b[..14])?;
    fence(Ordering::Release);
    pci.dma_write(at + 14, &b[14..])?;
    cq.tail += 1;
    if cq.tail == cq.entries {
        cq.tail = 0;
        cq.phase = !cq.phase;
    }
    cq.irq = true;
    Ok(())
}

/// The controller thread's body ([`crate::pci::run_device_loop`]). The model is shared with
/// inline passes ([`super::EmuNvmeConfig::inline_doorbells`]); the lock is held for one pass.
pub(super) fn run(model: Arc<Mutex<Controller>>) {
    let sh = lock(&model).sh.clone();
    let spin = if sh.cfg.inline_doorbells {
        std::time::Duration::ZERO
    } else {
        crate::pci::SPIN
    };
    crate::pci::run_device_loop(
        &mut Locked(model),
        &sh.stop,
        spin,
        "emulated NVMe controller",
    );
}

/// The model behind its lock, as the device loop steps it.
struct Locked(Arc<Mutex<Controller>>);

impl crate::pci::DeviceLoop for Locked {
    fn step(&mut self) -> bool {
        lock(&self.0).pass()
    }
    fn next_deadline(&self) -> Option<Instant> {
        lock(&self.0).next_timed_event()
    }
}
