//! A reusable emulated PCI function: config space, COMMAND (memory decode and bus mastering),
//! an MSI-X capability whose vectors signal eventfds, fault hooks, and the DMA helper every
//! device model uses to reach memory.
//!
//! # Config space
//! 256 bytes: vendor and device ID, class code, COMMAND, STATUS (capability list bit), the
//! capability pointer at 0x34 and one MSI-X capability at [`MSIX_CAP_OFFSET`] (table size =
//! the model's vector count; table and PBA placed where the model says in its BAR). Writes
//! change only COMMAND's memory, bus-master and INTx-disable bits and MSI-X's enable and
//! function-mask bits; everything else is read-only, as on hardware.
//!
//! # Bus mastering and DMA
//! [`PciCore::dma_read`] / [`PciCore::dma_write`] check COMMAND's bus-master bit, translate
//! through the [`EmuIommu`] and copy with [`tidepool::copy`]. The check and the copy happen
//! under a read lock that a COMMAND write takes for writing, so once the config write that
//! clears bus mastering has returned no DMA is in progress and none will start: a refused DMA
//! counts in [`PciStats::dma_refused`]. [`PciStats::dma_after_bus_master_off`] counts DMAs that
//! completed while the bit was clear, an internal-consistency check that must stay 0.
//!
//! Like VFIO, the function starts with memory decoding on and bus mastering off, and a
//! function reset keeps config space (VFIO saves and restores it around the reset).
//!
//! # Faults
//! [`PciCore::fail_next_bus_master_clear`]: the next COMMAND write that clears bus mastering
//! leaves the bit set (the driver's read-back sees it). [`PciCore::set_fail_function_reset`]:
//! function resets fail until turned off.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tidepool::copy;
use tidepool::device::{config, DeviceError};
use vmm_sys_util::eventfd::EventFd;

use crate::iommu::EmuIommu;

/// Where the MSI-X capability sits in config space.
pub const MSIX_CAP_OFFSET: u16 = 0x40;

/// What identifies the emulated function and where its MSI-X structures live.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PciIdentity {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// 24-bit class code (base class, subclass, programming interface).
    pub class_code: u32,
    /// MSI-X vectors (table size); 0 for none (then there is no capability list).
    pub msix_vectors: u16,
    /// BAR holding the MSI-X table and PBA.
    pub msix_bar: u8,
    /// Offset of the MSI-X table in that BAR (8-byte aligned).
    pub msix_table_offset: u32,
    /// Offset of the MSI-X PBA in that BAR (8-byte aligned).
    pub msix_pba_offset: u32,
}

/// Why a DMA did not happen; device models turn it into their protocol's error status.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// COMMAND's bus-master bit is clear: the function may not touch memory.
    #[error("DMA refused: bus mastering is off")]
    BusMasterOff,
    /// The IOVA range is not mapped in the function's IOMMU domain.
    #[error("IOMMU fault at IOVA {iova:#x}")]
    IommuFault {
        /// First IOVA of the access.
        iova: u64,
    },
}

/// Counters of the PCI core.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PciStats {
    /// DMAs refused because bus mastering was off.
    pub dma_refused: u64,
    /// DMAs that completed while bus mastering was off. Must be 0.
    pub dma_after_bus_master_off: u64,
    /// MSI-X messages delivered (eventfd writes).
    pub interrupts: u64,
}

/// The emulated PCI function core shared by the device models. See the module docs.
#[derive(Debug)]
pub struct PciCore {
    space: Mutex<[u8; config::SPACE_BYTES as usize]>,
    /// COMMAND as the DMA path sees it; changed only with `bus` held for writing.
    command: AtomicU16,
    /// DMA holds it for reading across check and copy; COMMAND writes hold it for writing.
    bus: RwLock<()>,
    iommu: Arc<EmuIommu>,
    identity: PciIdentity,
    msix: Mutex<Vec<EventFd>>,
    fail_bus_master_clear: AtomicBool,
    fail_reset: AtomicBool,
    dma_refused: AtomicU64,
    violations: AtomicU64,
    interrupts: AtomicU64,
}

const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// COMMAND bit 10: INTx disable.
const COMMAND_INTX_DISABLE: u16 = 1 << 10;

impl PciCore {
    /// A function with this identity whose DMA goes through `iommu`.
    pub fn new(identity: PciIdentity, iommu: Arc<EmuIommu>) -> PciCore {
        let mut s = [0u8; config::SPACE_BYTES as usize];
        let put16 = |s: &mut [u8], at: u16, v: u16| {
            s[usize::from(at)..usize::from(at) + 2].copy_from_slice(&v.to_le_bytes())
        };
        let put32 = |s: &mut [u8], at: u16, v: u32| {
            s[usize::from(at)..usize::from(at) + 4].copy_from_slice(&v.to_le_bytes())
        };
        put16(&mut s, config::VENDOR_ID, identity.vendor_id);
        put16(&mut s, config::DEVICE_ID, identity.device_id);
        put16(&mut s, config::COMMAND, config::COMMAND_MEMORY);
        put32(&mut s, config::CLASS_REVISION, identity.class_code << 8);
        // BAR0: 64-bit memory BAR (type 10b in bits 2:1); the address is the host's business.
        put32(&mut s, 0x10, 0b100);
        if identity.msix_vectors > 0 {
            put16(&mut s, config::STATUS, config::STATUS_CAPABILITIES);
            s[usize::from(config::CAPABILITIES_POINTER)] = MSIX_CAP_OFFSET as u8;
            let at = MSIX_CAP_OFFSET;
            s[usize::from(at)] = config::CAP_MSIX;
            s[usize::from(at) + 1] = 0; // end of list
            put16(&mut s, at + 2, identity.msix_vectors - 1);
            let bir = u32::from(identity.msix_bar & 7);
            put32(&mut s, at + 4, (identity.msix_table_offset & !7) | bir);
            put32(&mut s, at + 8, (identity.msix_pba_offset & !7) | bir);
        }
        PciCore {
            space: Mutex::new(s),
            command: AtomicU16::new(config::COMMAND_MEMORY),
            bus: RwLock::new(()),
            iommu,
            identity,
            msix: Mutex::new(Vec::new()),
            fail_bus_master_clear: AtomicBool::new(false),
            fail_reset: AtomicBool::new(false),
            dma_refused: AtomicU64::new(0),
            violations: AtomicU64::new(0),
            interrupts: AtomicU64::new(0),
        }
    }

    /// The function's IOMMU domain.
    pub fn iommu(&self) -> &Arc<EmuIommu> {
        &self.iommu
    }

    /// MSI-X vectors (the table size).
    pub fn msix_vectors(&self) -> u16 {
        self.identity.msix_vectors
    }

    /// Is COMMAND's memory-decode bit set? (BAR accesses are ignored and read all ones
    /// otherwise, as a master abort would.)
    pub fn memory_enabled(&self) -> bool {
        self.command.load(Ordering::Acquire) & config::COMMAND_MEMORY != 0
    }

    /// Is COMMAND's bus-master bit set?
    pub fn bus_master(&self) -> bool {
        self.command.load(Ordering::Acquire) & config::COMMAND_MASTER != 0
    }

    /// The counters.
    pub fn stats(&self) -> PciStats {
        PciStats {
            dma_refused: self.dma_refused.load(Ordering::Relaxed),
            dma_after_bus_master_off: self.violations.load(Ordering::Relaxed),
            interrupts: self.interrupts.load(Ordering::Relaxed),
        }
    }

    /// Fault: the next COMMAND write that clears bus mastering is ignored for that bit.
    pub fn fail_next_bus_master_clear(&self) {
        self.fail_bus_master_clear.store(true, Ordering::Release);
    }

    /// Fault: function resets fail while `fail` is set.
    pub fn set_fail_function_reset(&self, fail: bool) {
        self.fail_reset.store(fail, Ordering::Release);
    }

    /// The reset hook for models: fails if the fault is armed, else succeeds (config space is
    /// kept, as VFIO restores it). The model resets its own state after this succeeds.
    pub fn check_function_reset(&self) -> Result<(), DeviceError> {
        if self.fail_reset.load(Ordering::Acquire) {
            return Err(DeviceError::Failed {
                what: "function reset",
                detail: "injected fault: the emulated function did not reset".into(),
            });
        }
        Ok(())
    }

    /// Reads config space (any length inside the 256 bytes).
    pub fn read_config(&self, offset: u16, buf: &mut [u8]) -> Result<(), DeviceError> {
        let start = check_config(offset, buf.len())?;
        let space = lock(&self.space);
        buf.copy_from_slice(&space[start..start + buf.len()]);
        Ok(())
    }

    /// Writes config space: only the writable bits of COMMAND and MSI-X message control
    /// change; the rest is read-only and ignored.
    pub fn write_config(&self, offset: u16, buf: &[u8]) -> Result<(), DeviceError> {
        let start = check_config(offset, buf.len())?;
        // COMMAND changes are ordered against DMA: take the bus lock first.
        let _bus = self.bus.write().unwrap_or_else(|e| e.into_inner());
        let mut space = lock(&self.space);
        let cmd_at = usize::from(config::COMMAND);
        let old_cmd = u16::from_le_bytes([space[cmd_at], space[cmd_at + 1]]);
        for (i, &b) in buf.iter().enumerate() {
            let at = start + i;
            let mask = writable_mask(at, self.identity.msix_vectors > 0);
            space[at] = (space[at] & !mask) | (b & mask);
        }
        let mut new_cmd = u16::from_le_bytes([space[cmd_at], space[cmd_at + 1]]);
        let clears_master =
            old_cmd & config::COMMAND_MASTER != 0 && new_cmd & config::COMMAND_MASTER == 0;
        if clears_master && self.fail_bus_master_clear.swap(false, Ordering::AcqRel) {
            tracing::debug!("injected fault: ignoring the clearing of bus mastering");
            new_cmd |= config::COMMAND_MASTER;
            space[cmd_at..cmd_at + 2].copy_from_slice(&new_cmd.to_le_bytes());
        }
        self.command.store(new_cmd, Ordering::Release);
        Ok(())
    }

    /// Routes vectors `0..fds.len()` to (duplicates of) these eventfds and sets MSI-X enable.
    pub fn enable_msix(&self, fds: &[EventFd]) -> Result<(), DeviceError> {
        let n = usize::from(self.identity.msix_vectors);
        if fds.len() > n {
            return Err(DeviceError::Unsupported(format!(
                "{} MSI-X vectors asked for, the emulated function has {n}",
                fds.len()
            )));
        }
        let dup = fds
            .iter()
            .map(|fd| {
                fd.try_clone().map_err(|e| DeviceError::Os {
                    what: "dup of an MSI-X eventfd",
                    source: e,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        *lock(&self.msix) = dup;
        self.set_msix_control(true);
        Ok(())
    }

    /// Stops MSI-X delivery.
    pub fn disable_msix(&self) {
        lock(&self.msix).clear();
        self.set_msix_control(false);
    }

    fn set_msix_control(&self, enable: bool) {
        if self.identity.msix_vectors == 0 {
            return;
        }
        let mut space = lock(&self.space);
        let at = usize::from(MSIX_CAP_OFFSET) + 2;
        let mut ctl = u16::from_le_bytes([space[at], space[at + 1]]);
        ctl = if enable {
            ctl | MSIX_ENABLE
        } else {
            ctl & !MSIX_ENABLE
        };
        space[at..at + 2].copy_from_slice(&ctl.to_le_bytes());
    }

    /// Signals MSI-X `vector` if MSI-X is enabled, not masked, and the vector is routed.
    pub fn signal(&self, vector: u16) {
        let ctl = {
            let space = lock(&self.space);
            let at = usize::from(MSIX_CAP_OFFSET) + 2;
            u16::from_le_bytes([space[at], space[at + 1]])
        };
        if ctl & MSIX_ENABLE == 0 || ctl & MSIX_FUNCTION_MASK != 0 {
            return;
        }
        let fds = lock(&self.msix);
        if let Some(fd) = fds.get(usize::from(vector)) {
            // Counted before the eventfd is written: whoever the interrupt wakes must already
            // see it counted (a test that checks "woken by MSI-X" raced the count otherwise).
            self.interrupts.fetch_add(1, Ordering::SeqCst);
            if let Err(e) = fd.write(1) {
                self.interrupts.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(vector, error = %e, "MSI-X eventfd write failed");
            }
        }
    }

    /// DMA from memory: fills `buf` from `iova`. Refused without bus mastering; an IOMMU
    /// fault if the range is not mapped.
    pub fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len();
        self.dma(iova, len, |ptr| {
            // SAFETY: `with_translation` found `len` bytes at `ptr` inside one live mapping and
            // keeps the table locked (so the memory cannot be unshared and freed) until we
            // return; `buf` is this thread's private memory, not part of any mapping.
            unsafe { copy::copy_from_device(ptr, buf) }
        })
    }

    /// DMA to memory: writes `data` at `iova`. Refused without bus mastering; an IOMMU fault
    /// if the range is not mapped.
    pub fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        if data.is_empty() {
            return Ok(());
        }
        self.dma(iova, data.len(), |ptr| {
            // SAFETY: as in `dma_read`: `data.len()` bytes at `ptr` are mapped and stay so
            // while the table is locked; `data` is private memory that does not overlap them.
            unsafe { copy::copy_to_device(data, ptr) }
        })
    }

    fn dma(&self, iova: u64, len: usize, f: impl FnOnce(*mut u8)) -> Result<(), DmaError> {
        let _bus = self.bus.read().unwrap_or_else(|e| e.into_inner());
        if !self.bus_master() {
            self.dma_refused.fetch_add(1, Ordering::Relaxed);
            return Err(DmaError::BusMasterOff);
        }
        self.iommu
            .with_translation(iova, len, |ptr| f(ptr.as_ptr()))
            .ok_or(DmaError::IommuFault { iova })?;
        if !self.bus_master() {
            // Cannot happen while COMMAND writes take `bus` for writing; counted to prove it.
            self.violations.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Which bits of config byte `at` software may change.
fn writable_mask(at: usize, has_msix: bool) -> u8 {
    let cmd = usize::from(config::COMMAND);
    let writable_cmd = config::COMMAND_MEMORY | config::COMMAND_MASTER | COMMAND_INTX_DISABLE;
    let msix_ctl_hi = usize::from(MSIX_CAP_OFFSET) + 3;
    match at {
        a if a == cmd => writable_cmd as u8,
        a if a == cmd + 1 => (writable_cmd >> 8) as u8,
        a if a == msix_ctl_hi && has_msix => ((MSIX_ENABLE | MSIX_FUNCTION_MASK) >> 8) as u8,
        _ => 0,
    }
}

fn check_config(offset: u16, len: usize) -> Result<usize, DeviceError> {
    let start = usize::from(offset);
    if start + len > usize::from(config::SPACE_BYTES) {
        return Err(DeviceError::BadAccess {
            what: "PCI config space",
            offset: u64::from(offset),
            width: len as u64,
            size: u64::from(config::SPACE_BYTES),
        });
    }
    Ok(start)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long an idle device thread spins before it parks.
pub(crate) const SPIN: std::time::Duration = std::time::Duration::from_micros(20);
/// The longest a parked device thread sleeps without a register write or a timed event.
const IDLE_PARK: std::time::Duration = std::time::Duration::from_millis(100);

/// A device model's thread: one pass over its work, and when it must next wake on its own.
pub trait DeviceLoop {
    /// One pass over everything; true if it made progress.
    fn step(&mut self) -> bool;
    /// The next timed event (a delayed completion, a reset deadline), if any.
    fn next_deadline(&self) -> Option<std::time::Instant>;
}

/// Runs a model's thread until `stop`: step while there is work, spin for `spin` when idle
/// ([`SPIN`] for a model whose thread does the work: an I/O loop's next doorbell is usually that
/// close), then park until a register write unparks
/// the thread or the next timed event (at most [`IDLE_PARK`]), so an idle model burns no core.
pub fn run_device_loop(
    model: &mut impl DeviceLoop,
    stop: &AtomicBool,
    spin: std::time::Duration,
    name: &str,
) {
    let mut idle_since: Option<std::time::Instant> = None;
    while !stop.load(Ordering::Acquire) {
        if model.step() {
            idle_since = None;
            continue;
        }
        let now = std::time::Instant::now();
        let since = *idle_since.get_or_insert(now);
        if now.duration_since(since) < spin {
            std::hint::spin_loop();
            continue;
        }
        let mut wait = IDLE_PARK;
        if let Some(at) = model.next_deadline() {
            wait = wait.min(at.saturating_duration_since(now));
        }
        std::thread::park_timeout(wait);
        idle_since = None;
    }
    tracing::debug!("{name} thread stopped");
}

/// The function-reset handshake between a caller of [`PciDevice::function_reset`] and a device
/// model's thread: the caller asks for reset number `n` and waits until the thread says it
/// finished `n`. When the wait returns, the model has dropped everything in flight and does no
/// DMA until it is brought up again.
///
/// [`PciDevice::function_reset`]: tidepool::device::PciDevice::function_reset
#[derive(Debug, Default)]
pub struct ResetHandshake {
    requested: AtomicU64,
    done: AtomicU64,
}

impl ResetHandshake {
    /// Caller side: asks for a reset, wakes the model's thread with `wake`, and waits (up to
    /// 5 s, polling every 50 µs) for it to acknowledge. `device` names the model in the error.
    pub fn request_and_wait(&self, wake: impl Fn(), device: &str) -> Result<(), DeviceError> {
        let want = self.requested.fetch_add(1, Ordering::AcqRel) + 1;
        wake();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.done.load(Ordering::Acquire) < want {
            if std::time::Instant::now() > deadline {
                return Err(DeviceError::Failed {
                    what: "function reset",
                    detail: format!("the {device} thread did not acknowledge in 5 s"),
                });
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        Ok(())
    }

    /// Thread side: the number of a reset asked for since `seen`, if any.
    pub fn pending(&self, seen: u64) -> Option<u64> {
        let requested = self.requested.load(Ordering::Acquire);
        (requested != seen).then_some(requested)
    }

    /// Thread side: resets up to number `n` are done.
    pub fn acknowledge(&self, n: u64) {
        self.done.store(n, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool::device::walk_capabilities;

    fn core() -> PciCore {
        PciCore::new(
            PciIdentity {
                vendor_id: 0x1234,
                device_id: 0x5678,
                class_code: 0x010802,
                msix_vectors: 4,
                msix_bar: 0,
                msix_table_offset: 0x2000,
                msix_pba_offset: 0x3000,
            },
            Arc::new(EmuIommu::new()),
        )
    }

    #[test]
    fn config_space_has_ids_class_and_an_msix_capability() {
        let c = core();
        let mut b = [0u8; 4];
        c.read_config(0, &mut b).unwrap();
        assert_eq!(b, [0x34, 0x12, 0x78, 0x56]);
        c.read_config(config::CLASS_REVISION, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b) >> 8, 0x010802);
        let caps = walk_capabilities(|o, buf| c.read_config(o, buf)).unwrap();
        assert_eq!(caps.len(), 1);
        assert_eq!(caps[0].id, config::CAP_MSIX);
        let mut ctl = [0u8; 2];
        c.read_config(MSIX_CAP_OFFSET + 2, &mut ctl).unwrap();
        assert_eq!(u16::from_le_bytes(ctl) & 0x7ff, 3);
        // Read-only bytes ignore writes.
        c.write_config(0, &[0xff, 0xff]).unwrap();
        c.read_config(0, &mut b).unwrap();
        assert_eq!(b[0], 0x34);
        assert!(c.read_config(255, &mut b).is_err());
    }

    #[test]
    fn dma_needs_bus_mastering_and_a_failed_clear_keeps_it() {
        let c = core();
        let mut buf = [0u8; 4];
        assert_eq!(c.dma_read(0x1000, &mut buf), Err(DmaError::BusMasterOff));
        let cmd = config::COMMAND_MEMORY | config::COMMAND_MASTER;
        c.write_config(config::COMMAND, &cmd.to_le_bytes()).unwrap();
        assert_eq!(
            c.dma_read(0x1000, &mut buf),
            Err(DmaError::IommuFault { iova: 0x1000 })
        );
        assert_eq!(c.iommu().faults().count, 1);
        c.fail_next_bus_master_clear();
        c.write_config(config::COMMAND, &config::COMMAND_MEMORY.to_le_bytes())
            .unwrap();
        assert!(c.bus_master(), "the injected fault keeps the bit");
        c.write_config(config::COMMAND, &config::COMMAND_MEMORY.to_le_bytes())
            .unwrap();
        assert!(!c.bus_master());
        assert_eq!(c.stats().dma_refused, 1);
        assert_eq!(c.stats().dma_after_bus_master_off, 0);
    }

    #[test]
    fn msix_vectors_signal_their_eventfds() {
        let c = core();
        let fds: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        c.signal(0); // not enabled yet: dropped
        c.enable_msix(&fds).unwrap();
        c.signal(1);
        c.signal(3); // not routed
        assert!(fds[0].read().is_err());
        assert_eq!(fds[1].read().unwrap(), 1);
        assert_eq!(c.stats().interrupts, 1);
        let too_many: Vec<EventFd> = (0..5).map(|_| EventFd::new(0).unwrap()).collect();
        assert!(c.enable_msix(&too_many).is_err());
        c.set_fail_function_reset(true);
        assert!(c.check_function_reset().is_err());
    }
}
