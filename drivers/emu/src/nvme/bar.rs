//! BAR0 of the emulated controller: the registers (Base spec 1.4, 3.1) and the doorbells.
//!
//! Register writes only store values (atomics) and wake the controller thread; the thread
//! acts on them (CC.EN → CSTS.RDY, doorbells → command fetch), as hardware does
//! asynchronously. With COMMAND's memory-decode bit clear, reads return all ones and writes
//! are dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tidepool::device::{check_access, DeviceError, Mmio};

use super::Shared;

/// BAR0 size: registers (4 KiB), doorbells (4 KiB), MSI-X table (4 KiB), PBA (4 KiB).
pub(crate) const BAR_BYTES: usize = 0x4000;
/// The first doorbell.
pub(crate) const DOORBELLS: usize = 0x1000;
/// The MSI-X table's offset in BAR0.
pub(crate) const MSIX_TABLE: u32 = 0x2000;
/// The MSI-X PBA's offset in BAR0.
pub(crate) const MSIX_PBA: u32 = 0x3000;

pub(crate) mod reg {
    pub const CAP: usize = 0x00;
    pub const VS: usize = 0x08;
    pub const INTMS: usize = 0x0c;
    pub const INTMC: usize = 0x10;
    pub const CC: usize = 0x14;
    pub const CSTS: usize = 0x1c;
    pub const AQA: usize = 0x24;
    pub const ASQ: usize = 0x28;
    pub const ACQ: usize = 0x30;
}

/// The mapped BAR0 a driver gets from `map_bar(0)`.
#[derive(Debug)]
pub(crate) struct NvmeBar {
    pub(crate) shared: Arc<Shared>,
}

impl NvmeBar {
    fn check(&self, offset: usize, width: u64) -> Result<bool, DeviceError> {
        check_access("BAR", offset as u64, width, BAR_BYTES as u64)?;
        Ok(self.shared.pci.memory_enabled())
    }
}

impl Shared {
    fn read_reg32(&self, off: usize) -> u32 {
        let cap = self.cap();
        match off {
            reg::CAP => cap as u32,
            0x04 => (cap >> 32) as u32,
            reg::VS => 0x0001_0400,
            reg::INTMS | reg::INTMC => self.regs.intms.load(Ordering::Acquire),
            reg::CC => self.regs.cc.load(Ordering::Acquire),
            reg::CSTS => self.regs.csts.load(Ordering::Acquire),
            reg::AQA => self.regs.aqa.load(Ordering::Acquire),
            reg::ASQ => self.regs.asq.load(Ordering::Acquire) as u32,
            0x2c => (self.regs.asq.load(Ordering::Acquire) >> 32) as u32,
            reg::ACQ => self.regs.acq.load(Ordering::Acquire) as u32,
            0x34 => (self.regs.acq.load(Ordering::Acquire) >> 32) as u32,
            _ => 0,
        }
    }

    fn write_reg32(&self, off: usize, v: u32) {
        let set_half = |r: &std::sync::atomic::AtomicU64, high: bool| {
            let old = r.load(Ordering::Acquire);
            let new = if high {
                (old & 0xffff_ffff) | (u64::from(v) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(v)
            };
            r.store(new, Ordering::Release);
        };
        match off {
            reg::INTMS => {
                self.regs.intms.fetch_or(v, Ordering::AcqRel);
            }
            reg::INTMC => {
                self.regs.intms.fetch_and(!v, Ordering::AcqRel);
            }
            reg::CC => {
                self.regs.cc.store(v, Ordering::Release);
                self.wake();
            }
            reg::AQA => self.regs.aqa.store(v, Ordering::Release),
            reg::ASQ => set_half(&self.regs.asq, false),
            0x2c => set_half(&self.regs.asq, true),
            reg::ACQ => set_half(&self.regs.acq, false),
            0x34 => set_half(&self.regs.acq, true),
            o if (DOORBELLS..DOORBELLS + 4 * self.doorbells.len()).contains(&o) => {
                // Doorbell values are 16 bits; the upper half is reserved.
                self.doorbells[(o - DOORBELLS) / 4].store(v & 0xffff, Ordering::Release);
                self.stats.doorbell_writes.fetch_add(1, Ordering::Relaxed);
                self.doorbell_rung();
            }
            _ => tracing::trace!(
                offset = off,
                value = v,
                "write to a read-only or unused register"
            ),
        }
    }
}

impl Mmio for NvmeBar {
    fn len(&self) -> usize {
        BAR_BYTES
    }

    fn read32(&self, offset: usize) -> Result<u32, DeviceError> {
        if !self.check(offset, 4)? {
            return Ok(u32::MAX);
        }
        Ok(self.shared.read_reg32(offset))
    }

    fn write32(&self, offset: usize, value: u32) -> Result<(), DeviceError> {
        if self.check(offset, 4)? {
            self.shared.write_reg32(offset, value);
        }
        Ok(())
    }

    fn read64(&self, offset: usize) -> Result<u64, DeviceError> {
        if !self.check(offset, 8)? {
            return Ok(u64::MAX);
        }
        let s = &self.shared;
        Ok(match offset {
            reg::CAP => s.cap(),
            reg::ASQ => s.regs.asq.load(Ordering::Acquire),
            reg::ACQ => s.regs.acq.load(Ordering::Acquire),
            o => u64::from(s.read_reg32(o)) | (u64::from(s.read_reg32(o + 4)) << 32),
        })
    }

    fn write64(&self, offset: usize, value: u64) -> Result<(), DeviceError> {
        if !self.check(offset, 8)? {
            return Ok(());
        }
        let s = &self.shared;
        match offset {
            reg::ASQ => s.regs.asq.store(value, Ordering::Release),
            reg::ACQ => s.regs.acq.store(value, Ordering::Release),
            o => {
                s.write_reg32(o, value as u32);
                s.write_reg32(o + 4, (value >> 32) as u32);
            }
        }
        Ok(())
    }

    fn read16(&self, offset: usize) -> Result<u16, DeviceError> {
        if !self.check(offset, 2)? {
            return Ok(u16::MAX);
        }
        Ok((self.shared.read_reg32(offset & !3) >> (8 * (offset & 3))) as u16)
    }

    fn write16(&self, offset: usize, value: u16) -> Result<(), DeviceError> {
        self.check(offset, 2)?;
        tracing::debug!(offset, value, "16-bit NVMe register write ignored");
        Ok(())
    }

    fn read8(&self, offset: usize) -> Result<u8, DeviceError> {
        if !self.check(offset, 1)? {
            return Ok(u8::MAX);
        }
        Ok((self.shared.read_reg32(offset & !3) >> (8 * (offset & 3))) as u8)
    }

    fn write8(&self, offset: usize, value: u8) -> Result<(), DeviceError> {
        self.check(offset, 1)?;
        tracing::debug!(offset, value, "8-bit NVMe register write ignored");
        Ok(())
    }
}
