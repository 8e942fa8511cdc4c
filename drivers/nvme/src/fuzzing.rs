//! Fuzzing entry points (feature `fuzzing`; not an API): the real [`QueuePair::poll`] over a
//! minimal fake NVMe function whose completion ring the input writes.
//!
//! [`poll_ring`] makes a queue pair of 2..=64 entries on a fresh [`Hw`] over [`FakeNvme`] (no
//! bring-up: registers only, CSTS.RDY follows CC.EN, bus mastering and resets always work),
//! submits some Flush commands, then alternates "the device writes arbitrary bytes into the CQ
//! ring" and `poll`, checking after every poll that it returned, took at most entries − 1
//! entries, delivered only commands that were outstanding (each once), and that after an error
//! every outstanding command came back failed.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tidepool::device::{check_access, config, DeviceError, Mmio, PciDevice};
use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Pool, PoolConfig};
use tidepool::share::identity::Identity;
use tidepool::share::DeviceView;
use vmm_sys_util::eventfd::EventFd;

use crate::controller::Hw;
use crate::queue::QueuePair;
use crate::spec::{Command, IoOpcode, CQ_ENTRY_BYTES};

/// A PCI function with NVMe's class code and a BAR0 of plain registers: CAP (MQES 4095,
/// TO 500 ms, NVM), CC, and CSTS whose RDY mirrors CC.EN. DMA goes through the identity view
/// of the pool it is made with.
#[derive(Debug)]
pub struct FakeNvme {
    config: Mutex<[u8; 256]>,
    bar: Arc<FakeBar>,
    view: Arc<dyn DeviceView>,
}

#[derive(Debug)]
struct FakeBar {
    regs: Mutex<Vec<u8>>,
}

const BAR_BYTES: usize = 0x2000;

impl FakeNvme {
    /// A fake controller whose DMA view is `view`.
    pub fn new(view: Arc<dyn DeviceView>) -> FakeNvme {
        let mut cfg = [0u8; 256];
        cfg[0x08..0x0c].copy_from_slice(&(0x01_08_02u32 << 8).to_le_bytes());
        let mut regs = vec![0u8; BAR_BYTES];
        let cap: u64 = 4095 | (1 << 16) | (1 << 24) | (1 << 37);
        regs[0..8].copy_from_slice(&cap.to_le_bytes());
        regs[8..12].copy_from_slice(&0x0001_0400u32.to_le_bytes());
        FakeNvme {
            config: Mutex::new(cfg),
            bar: Arc::new(FakeBar {
                regs: Mutex::new(regs),
            }),
            view,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeBar {
    fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), DeviceError> {
        check_access("BAR", offset as u64, out.len() as u64, BAR_BYTES as u64)?;
        let r = lock(&self.regs);
        out.copy_from_slice(&r[offset..offset + out.len()]);
        if offset <= 0x1c && offset + out.len() > 0x1c {
            // CSTS.RDY follows CC.EN.
            let en = r[0x14] & 1;
            out[0x1c - offset] = (out[0x1c - offset] & !1) | en;
        }
        Ok(())
    }

    fn write(&self, offset: usize, src: &[u8]) -> Result<(), DeviceError> {
        check_access("BAR", offset as u64, src.len() as u64, BAR_BYTES as u64)?;
        lock(&self.regs)[offset..offset + src.len()].copy_from_slice(src);
        Ok(())
    }
}

impl Mmio for FakeBar {
    fn len(&self) -> usize {
        BAR_BYTES
    }
    fn read32(&self, offset: usize) -> Result<u32, DeviceError> {
        let mut b = [0u8; 4];
        self.read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn write32(&self, offset: usize, value: u32) -> Result<(), DeviceError> {
        self.write(offset, &value.to_le_bytes())
    }
    fn read64(&self, offset: usize) -> Result<u64, DeviceError> {
        let mut b = [0u8; 8];
        self.read(offset, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn write64(&self, offset: usize, value: u64) -> Result<(), DeviceError> {
        self.write(offset, &value.to_le_bytes())
    }
    fn read16(&self, offset: usize) -> Result<u16, DeviceError> {
        let mut b = [0u8; 2];
        self.read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    fn write16(&self, offset: usize, value: u16) -> Result<(), DeviceError> {
        self.write(offset, &value.to_le_bytes())
    }
    fn read8(&self, offset: usize) -> Result<u8, DeviceError> {
        let mut b = [0u8; 1];
        self.read(offset, &mut b)?;
        Ok(b[0])
    }
    fn write8(&self, offset: usize, value: u8) -> Result<(), DeviceError> {
        self.write(offset, &[value])
    }
}

impl PciDevice for FakeNvme {
    fn name(&self) -> &str {
        "fake NVMe function (fuzzing)"
    }
    fn read_config(&self, offset: u16, buf: &mut [u8]) -> Result<(), DeviceError> {
        check_access("PCI config space", u64::from(offset), 1, 256)?;
        let at = usize::from(offset);
        let c = lock(&self.config);
        let end = (at + buf.len()).min(256);
        buf[..end - at].copy_from_slice(&c[at..end]);
        Ok(())
    }
    fn write_config(&self, offset: u16, buf: &[u8]) -> Result<(), DeviceError> {
        if offset == config::COMMAND && buf.len() == 2 {
            lock(&self.config)[4..6].copy_from_slice(buf);
        }
        Ok(())
    }
    fn map_bar(&self, index: u8) -> Result<Arc<dyn Mmio>, DeviceError> {
        match index {
            0 => Ok(self.bar.clone()),
            _ => Err(DeviceError::Unsupported(format!("no BAR{index}"))),
        }
    }
    fn msix_vectors(&self) -> u32 {
        0
    }
    fn enable_msix(&self, _fds: &[EventFd]) -> Result<(), DeviceError> {
        Ok(())
    }
    fn disable_msix(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn function_reset(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn dma_view(&self) -> Result<Arc<dyn DeviceView>, DeviceError> {
        Ok(self.view.clone())
    }
}

/// One pool of ordinary 4 KiB pages over the identity view, shared by every run.
fn pool() -> Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let cfg = PoolConfig {
            memory: MemoryConfig {
                page_size: PageSize::Small4K,
                allow_small_pages: true,
            },
            chunk_bytes: 1 << 20,
            prefill_bytes: 1 << 20,
            max_bytes: 1 << 20,
            max_buffer: 64 << 10,
            low_watermark: 0,
            high_watermark: 1 << 20,
            shrink_delay: Duration::from_secs(60),
            reserve_bytes: 0,
            transient: false,
            background: false,
            ..PoolConfig::default()
        };
        Pool::new(Arc::new(Identity::new()), cfg).expect("fuzzing pool")
    })
    .clone()
}

/// What one [`poll_ring`] run saw.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Ring entries.
    pub entries: u16,
    /// Commands submitted.
    pub submitted: usize,
    /// Completions delivered successfully or with a device status.
    pub completed: usize,
    /// Commands failed by a reset.
    pub failed: usize,
    /// Whether a poll reported an error (and the queue was reset).
    pub reset: bool,
    /// Entries taken from the ring in all.
    pub consumed: u64,
}

/// Runs one input through a real queue pair's `poll` (see the module docs). Panics if a
/// property fails; never loops (every step is bounded by the input length).
pub fn poll_ring(input: &[u8]) -> PollReport {
    let Some((&[size, subs], rest)) = input.split_first_chunk::<2>() else {
        return PollReport::default();
    };
    let entries = 2 + u16::from(size) % 63;
    let pool = pool();
    let device = Arc::new(FakeNvme::new(pool.view().clone()));
    let hw = Hw::bare(device, pool.clone()).expect("fake hardware");
    let mut qp: QueuePair<u16> =
        QueuePair::new(hw, 1, entries, Duration::from_secs(60)).expect("queue pair rings");
    let depth = usize::from(entries - 1);
    let submitted = usize::from(subs) % (depth + 1);
    let mut outstanding = vec![false; depth];
    for i in 0..submitted {
        let cid = qp
            .submit(Command::io(IoOpcode::Flush, 1), None, 0, i as u16)
            .expect("a free slot");
        outstanding[usize::from(cid)] = true;
    }
    let ring = usize::from(entries) * CQ_ENTRY_BYTES;
    let mut report = PollReport {
        entries,
        submitted,
        ..PollReport::default()
    };
    let mut out = Vec::new();
    // Rounds: [offset byte][length byte][that many bytes], each followed by a poll.
    let mut rest = rest;
    for _ in 0..16 {
        let Some((&[at, len], tail)) = rest.split_first_chunk::<2>() else {
            break;
        };
        let n = usize::from(len).min(tail.len());
        let (bytes, tail) = tail.split_at(n);
        rest = tail;
        qp.device_write_cq(usize::from(at) * ring / 256, bytes);
        let before = qp.counters().entries_consumed;
        out.clear();
        let r = qp.poll(&mut out);
        let taken = qp.counters().entries_consumed - before;
        assert!(
            taken < u64::from(entries),
            "one poll took {taken} entries from a ring of {entries}"
        );
        report.consumed += taken;
        for d in &out {
            let slot = &mut outstanding[usize::from(d.cid)];
            assert!(*slot, "command {} delivered but not outstanding", d.cid);
            *slot = false;
            match &d.result {
                Err(crate::NvmeError::ControllerReset { .. }) => report.failed += 1,
                _ => report.completed += 1,
            }
        }
        if r.is_err() {
            report.reset = true;
            assert!(
                outstanding.iter().all(|o| !o),
                "a reset must fail every outstanding command"
            );
            assert_eq!(qp.outstanding(), 0);
            break;
        }
        assert_eq!(qp.outstanding(), outstanding.iter().filter(|&&o| o).count());
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::completion::RawCompletion;

    fn entry(cid: u16, sq_head: u16, phase: bool) -> [u8; 16] {
        RawCompletion {
            result: 0,
            dw1: 0,
            sq_head,
            sq_id: 1,
            cid,
            status_field: u16::from(phase),
        }
        .to_bytes()
    }

    #[test]
    fn one_poll_takes_at_most_one_ring_of_entries() {
        // 8 entries, 7 commands: the "device" writes all 8 slots with the expected phase
        // (one more than a well-behaved device can). One poll takes 7, not the 8th.
        let mut input = vec![6u8, 7, 0, 128];
        for slot in 0..8u16 {
            input.extend_from_slice(&entry(slot % 7, (slot + 1).min(7), true));
        }
        let r = poll_ring(&input);
        assert_eq!((r.entries, r.submitted), (8, 7));
        assert_eq!(r.consumed, 7);
        assert_eq!(r.completed, 7);
        assert!(!r.reset);
    }

    #[test]
    fn a_bad_entry_resets_and_fails_the_rest() {
        // 4 entries, 3 commands; slot 0 completes command 0, slot 1 names command 0 again.
        let mut input = vec![2u8, 3, 0, 32];
        input.extend_from_slice(&entry(0, 1, true));
        input.extend_from_slice(&entry(0, 1, true));
        let r = poll_ring(&input);
        assert_eq!(r.consumed, 2, "stops at the first bad entry");
        assert_eq!(r.completed, 1);
        assert_eq!(r.failed, 2);
        assert!(r.reset);
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x1234_5678u32;
        for _ in 0..200 {
            let input: Vec<u8> = (0..300)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            let r = poll_ring(&input);
            assert!(r.completed + r.failed <= r.submitted);
        }
    }
}
