//! The device thread: resets, the TX and RX virtqueues (split layout, §2.7), the loopback,
//! interrupts and the used-ring faults.
//!
//! Everything here runs on the one device thread. Ring memory is reached only by DMA through
//! the PCI core; each device-written field (used entry, then used.idx) is written as the
//! device's own DMA, one entry at a time, so a driver never sees an index ahead of its entry.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::{status, QueueRegs, Shared, UsedCorruption, NET_HDR_LEN, NO_VECTOR, SENT_LOG};
use super::{NUM_QUEUES, RX_QUEUE, TX_QUEUE};
use crate::pci::{DmaError, PciCore};

/// Buffers taken from one queue before looking at the other and at resets.
const BURST: usize = 64;
/// The largest TX chain accepted: a 64 KiB frame and its header.
const MAX_TX_BYTES: usize = 65536 + NET_HDR_LEN;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// One descriptor, as read.
#[derive(Copy, Clone, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
}

/// A live queue: its registers as programmed and the device's cursors.
#[derive(Copy, Clone, Debug)]
struct Queue {
    regs: QueueRegs,
    last_avail: u16,
    used_idx: u16,
}

/// Why processing a queue stopped.
#[derive(Debug)]
enum Fail {
    /// A DMA was refused or faulted.
    Dma(DmaError),
    /// The driver broke the ring rules: a device error.
    Malformed(String),
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Dma(e) => write!(f, "{e}"),
            Fail::Malformed(why) => write!(f, "malformed ring: {why}"),
        }
    }
}

impl From<DmaError> for Fail {
    fn from(e: DmaError) -> Fail {
        Fail::Dma(e)
    }
}

fn rd16(pci: &PciCore, iova: u64) -> Result<u16, Fail> {
    let mut b = [0u8; 2];
    pci.dma_read(iova, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

pub(super) struct Device {
    sh: Arc<Shared>,
    reset_seen: u64,
    flr_seen: u64,
    reset_deadline: Option<Instant>,
    queues: [Option<Queue>; NUM_QUEUES as usize],
}

impl Device {
    pub(super) fn new(sh: Arc<Shared>) -> Device {
        Device {
            sh,
            reset_seen: 0,
            flr_seen: 0,
            reset_deadline: None,
            queues: [None; NUM_QUEUES as usize],
        }
    }

    /// The thread body ([`crate::pci::run_device_loop`]).
    pub(super) fn run(mut self) {
        let sh = self.sh.clone();
        crate::pci::run_device_loop(
            &mut self,
            &sh.stop,
            crate::pci::SPIN,
            "emulated virtio-net device",
        );
    }

    /// Back to the power-on state: registers, queues, pending frames.
    fn reset(&mut self) {
        self.sh.common().reset(self.sh.cfg.queue_size);
        self.sh.isr.store(0, Ordering::Release);
        self.queues = [None; NUM_QUEUES as usize];
        super::lock(&self.sh.rx_backlog).clear();
        self.sh.stats.resets.fetch_add(1, Ordering::Relaxed);
    }

    /// One pass over everything; true if it made progress.
    fn pass(&mut self) -> bool {
        let sh = self.sh.clone();
        if let Some(flr) = sh.flr.pending(self.flr_seen) {
            // A function reset ignores the reset faults and completes pending status resets.
            self.reset();
            self.reset_deadline = None;
            self.reset_seen = sh.reset_requested.load(Ordering::Acquire);
            sh.reset_done.store(self.reset_seen, Ordering::Release);
            self.flr_seen = flr;
            sh.flr.acknowledge(flr);
            return true;
        }
        let requested = sh.reset_requested.load(Ordering::Acquire);
        if requested > self.reset_seen {
            let (delay, stalled) = {
                let f = sh.faults();
                (f.reset_delay, f.reset_stalled)
            };
            if stalled {
                self.reset_deadline = None;
                return false;
            }
            if !delay.is_zero() {
                let at = *self
                    .reset_deadline
                    .get_or_insert_with(|| Instant::now() + delay);
                if Instant::now() < at {
                    return false;
                }
            }
            self.reset_deadline = None;
            self.reset();
            self.reset_seen = requested;
            sh.reset_done.store(requested, Ordering::Release);
            return true;
        }
        let (st, regs) = {
            let c = sh.common();
            (c.status, c.queues)
        };
        let live = status::DRIVER_OK;
        let dead = status::DEVICE_NEEDS_RESET | status::FAILED;
        if st & live == 0 || st & dead != 0 {
            return false;
        }
        for (q, r) in self.queues.iter_mut().zip(regs) {
            if q.is_none() && r.enable {
                *q = Some(Queue {
                    regs: r,
                    last_avail: 0,
                    used_idx: 0,
                });
            }
        }
        let stalled = sh.faults().stalled;
        let mut progress = false;
        for qi in [TX_QUEUE, RX_QUEUE] {
            if stalled[usize::from(qi)] {
                continue;
            }
            let done = if qi == TX_QUEUE {
                self.process_tx()
            } else {
                self.process_rx()
            };
            match done {
                Ok(n) => progress |= n > 0,
                Err(Fail::Dma(DmaError::BusMasterOff)) => {}
                Err(e) => self.device_error(qi, e),
            }
        }
        progress
    }

    /// The driver broke the rules or the IOMMU faulted: set DEVICE_NEEDS_RESET, tell the
    /// driver through the configuration vector, stop the queues.
    fn device_error(&mut self, queue: u16, e: Fail) {
        tracing::warn!(queue, error = %e, "emulated virtio-net device error: needs reset");
        let vector = {
            let mut c = self.sh.common();
            c.status |= status::DEVICE_NEEDS_RESET;
            c.msix_config
        };
        self.sh.stats.device_errors.fetch_add(1, Ordering::Relaxed);
        if vector != NO_VECTOR {
            self.sh.pci.signal(vector);
        } else {
            self.sh.isr.fetch_or(2, Ordering::AcqRel);
        }
    }

    /// Takes frames off the TX queue, loops them back / captures them, completes them.
    fn process_tx(&mut self) -> Result<usize, Fail> {
        let sh = self.sh.clone();
        let Some(q) = self.queues[usize::from(TX_QUEUE)].as_mut() else {
            return Ok(0);
        };
        let avail_idx = avail_index(&sh.pci, q)?;
        let mut done = 0;
        while q.last_avail != avail_idx && done < BURST {
            let head = avail_entry(&sh.pci, q)?;
            let chain = walk_chain(&sh.pci, q, head)?;
            let mut bytes = Vec::new();
            for d in &chain {
                if d.flags & DESC_F_WRITE != 0 {
                    return Err(Fail::Malformed(format!(
                        "TX chain {head} has a device-writable descriptor"
                    )));
                }
                let at = bytes.len();
                if at + d.len as usize > MAX_TX_BYTES {
                    return Err(Fail::Malformed(format!(
                        "TX chain {head} is longer than {MAX_TX_BYTES} B"
                    )));
                }
                bytes.resize(at + d.len as usize, 0);
                sh.pci.dma_read(d.addr, &mut bytes[at..])?;
            }
            if bytes.len() < NET_HDR_LEN {
                sh.stats.tx_runts.fetch_add(1, Ordering::Relaxed);
            } else {
                sh.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                let frame = bytes.split_off(NET_HDR_LEN);
                if sh.capture.load(Ordering::Acquire) {
                    let mut sent = super::lock(&sh.sent);
                    if sent.len() >= SENT_LOG {
                        sent.pop_front();
                    }
                    sent.push_back(frame.clone());
                }
                if sh.loopback.load(Ordering::Acquire) {
                    sh.queue_rx(frame);
                }
            }
            let capacity = chain.iter().fold(0u32, |a, d| a.saturating_add(d.len));
            push_used(&sh, q, TX_QUEUE, head, 0, capacity)?;
            q.last_avail = q.last_avail.wrapping_add(1);
            done += 1;
        }
        if done > 0 {
            interrupt(&sh, q)?;
        }
        Ok(done)
    }

    /// Writes waiting frames into posted RX buffers and completes them.
    fn process_rx(&mut self) -> Result<usize, Fail> {
        let sh = self.sh.clone();
        let Some(q) = self.queues[usize::from(RX_QUEUE)].as_mut() else {
            return Ok(0);
        };
        if super::lock(&sh.rx_backlog).is_empty() {
            return Ok(0);
        }
        let avail_idx = avail_index(&sh.pci, q)?;
        let mut done = 0;
        while q.last_avail != avail_idx && done < BURST {
            let head = avail_entry(&sh.pci, q)?;
            let chain = walk_chain(&sh.pci, q, head)?;
            if chain.iter().any(|d| d.flags & DESC_F_WRITE == 0) {
                return Err(Fail::Malformed(format!(
                    "RX chain {head} has a device-readable descriptor"
                )));
            }
            let Some(frame) = super::lock(&sh.rx_backlog).pop_front() else {
                break;
            };
            let capacity = chain.iter().fold(0u32, |a, d| a.saturating_add(d.len));
            let total = NET_HDR_LEN + frame.len();
            if total > capacity as usize {
                // Too big for the buffer: dropped, the buffer stays for the next frame.
                tracing::debug!(len = frame.len(), capacity, "RX frame dropped: too big");
                sh.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
            let mut data = hdr.to_vec();
            data.extend_from_slice(&frame);
            let mut at = 0;
            for d in &chain {
                if at == data.len() {
                    break;
                }
                let n = (d.len as usize).min(data.len() - at);
                sh.pci.dma_write(d.addr, &data[at..at + n])?;
                at += n;
            }
            push_used(&sh, q, RX_QUEUE, head, total as u32, capacity)?;
            sh.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
            q.last_avail = q.last_avail.wrapping_add(1);
            done += 1;
        }
        if done > 0 {
            interrupt(&sh, q)?;
        }
        Ok(done)
    }
}

/// The driver's avail.idx, checked not to run more than a ring ahead of the device.
fn avail_index(pci: &PciCore, q: &Queue) -> Result<u16, Fail> {
    let idx = rd16(pci, q.regs.driver + 2)?;
    let ahead = idx.wrapping_sub(q.last_avail);
    if ahead > q.regs.size {
        return Err(Fail::Malformed(format!(
            "avail.idx {idx} is {ahead} entries ahead of the device's {} in a ring of {}",
            q.last_avail, q.regs.size
        )));
    }
    Ok(idx)
}

/// The head id in the next available slot.
fn avail_entry(pci: &PciCore, q: &Queue) -> Result<u16, Fail> {
    let slot = u64::from(q.last_avail % q.regs.size);
    rd16(pci, q.regs.driver + 4 + 2 * slot)
}

/// Follows a descriptor chain from `head`, bounded by the queue size.
fn walk_chain(pci: &PciCore, q: &Queue, head: u16) -> Result<Vec<Desc>, Fail> {
    let size = q.regs.size;
    let mut out = Vec::new();
    let mut id = head;
    loop {
        if id >= size {
            return Err(Fail::Malformed(format!(
                "descriptor {id} is outside the table of {size}"
            )));
        }
        if out.len() >= usize::from(size) {
            return Err(Fail::Malformed(format!("chain from {head} loops")));
        }
        let mut b = [0u8; 16];
        pci.dma_read(q.regs.desc + 16 * u64::from(id), &mut b)?;
        let d = Desc {
            addr: u64::from_le_bytes(b[0..8].try_into().unwrap_or_default()),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()),
            flags: u16::from_le_bytes([b[12], b[13]]),
        };
        let next = u16::from_le_bytes([b[14], b[15]]);
        if d.flags & DESC_F_INDIRECT != 0 {
            return Err(Fail::Malformed(format!(
                "descriptor {id} is indirect, which was not negotiated"
            )));
        }
        out.push(d);
        if d.flags & DESC_F_NEXT == 0 {
            return Ok(out);
        }
        id = next;
    }
}

/// Writes a used entry (corrupted if a fault is armed for this queue) and then used.idx.
fn push_used(
    sh: &Shared,
    q: &mut Queue,
    queue: u16,
    head: u16,
    len: u32,
    capacity: u32,
) -> Result<(), Fail> {
    let (mut id, mut len) = (u32::from(head), len);
    let corruption = sh
        .faults()
        .corrupt
        .get_mut(usize::from(queue))
        .and_then(|c| c.pop_front());
    match corruption {
        None => {}
        Some(UsedCorruption::IdOutOfRange) => id = u32::from(q.regs.size),
        Some(UsedCorruption::LenTooLong) => len = capacity.saturating_add(1),
    }
    if corruption.is_some() {
        tracing::debug!(
            queue,
            id,
            len,
            ?corruption,
            "injected fault: corrupt used entry"
        );
        sh.stats.used_corrupted.fetch_add(1, Ordering::Relaxed);
    }
    let slot = u64::from(q.used_idx % q.regs.size);
    let mut e = [0u8; 8];
    e[0..4].copy_from_slice(&id.to_le_bytes());
    e[4..8].copy_from_slice(&len.to_le_bytes());
    sh.pci.dma_write(q.regs.device + 4 + 8 * slot, &e)?;
    q.used_idx = q.used_idx.wrapping_add(1);
    // The entry before the index that covers it.
    fence(Ordering::Release);
    sh.pci
        .dma_write(q.regs.device + 2, &q.used_idx.to_le_bytes())?;
    Ok(())
}

/// Signals the queue's vector (or sets ISR bit 0) unless the driver suppressed interrupts.
fn interrupt(sh: &Shared, q: &Queue) -> Result<(), Fail> {
    fence(Ordering::SeqCst);
    let flags = rd16(&sh.pci, q.regs.driver)?;
    if flags & AVAIL_F_NO_INTERRUPT != 0 {
        return Ok(());
    }
    if q.regs.msix_vector != NO_VECTOR {
        sh.pci.signal(q.regs.msix_vector);
    } else {
        sh.isr.fetch_or(1, Ordering::AcqRel);
    }
    Ok(())
}

impl crate::pci::DeviceLoop for Device {
    fn step(&mut self) -> bool {
        self.pass()
    }
    fn next_deadline(&self) -> Option<Instant> {
        self.reset_deadline
    }
}
