//! [`EmuNvme`]: an in-process NVMe controller (Base spec 1.4, NVM command set) behind the
//! [`PciDevice`] seam.
//!
//! The controller runs on its own thread. BAR0 accesses ([`Mmio`]) store register and doorbell
//! values and wake it; the thread fetches submission entries, PRP lists and SGL segments, moves
//! data and posts completion entries (with phase tags) only by DMA through the PCI core
//! ([`crate::pci::PciCore::dma_read`]), so bus mastering and the IOMMU domain apply to every
//! byte, and raises MSI-X for completion queues created with interrupts enabled. Idle, it spins
//! for a few microseconds and then parks until the next register write.
//!
//! With [`EmuNvmeConfig::inline_doorbells`] a doorbell write runs the controller's passes on the
//! writing thread instead, so the commands it announced are complete when the write returns:
//! benchmarks then measure a driver's own CPU cost without a second core, its preemption or
//! cross-core cache transfers in the loop, and subtract the model's time
//! ([`EmuNvmeStats::inline_ticks`]).
//!
//! Registers: CAP (MQES from the config, CQR, TO = 1 (500 ms), DSTRD 0, CSS NVM, MPSMIN =
//! MPSMAX = 0: 4 KiB pages), VS 1.4, INTMS/INTMC, CC/CSTS (EN → RDY; EN cleared → queues
//! dropped, RDY = 0; SHN → SHST complete), AQA/ASQ/ACQ, doorbells at 0x1000 (stride 4).
//! Invalid admin queue settings at enable set CSTS.CFS.
//!
//! Admin commands: Identify (controller, namespace, active namespace list), Get Log Page
//! (error, SMART, firmware slot: zeros), Set/Get Features Number of Queues, Create/Delete I/O
//! CQ/SQ (with the spec's status codes), Abort (never aborts), Asynchronous Event Request
//! (kept outstanding). Doorbell Buffer Config and the rest answer Invalid Opcode. I/O: Read,
//! Write, Flush, Write Zeroes, Dataset Management (deallocate: reads return zeros) on one
//! memory-backed namespace (NSID 1). Data pointers: PRPs (lists chained across pages) and SGL
//! Data Block / Bit Bucket (reads) / Segment / Last Segment descriptors when enabled.
//!
//! A function reset (or CC.EN = 0) drops all queues. Commands held by
//! [`Faults::hold_next_command`] survive CC.EN = 0 (a wedged DMA engine) and end only at a
//! function reset; while held they keep writing their data buffer, which bus mastering off
//! stops.
//! A Delete I/O SQ of a queue with a held command never completes: the spec posts its
//! completion only once every command of the queue completed or was aborted, and a held command
//! is neither.

mod bar;
mod controller;
mod data;
mod status;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use tidepool::device::{DeviceError, Mmio, PciDevice};
use tidepool::share::DeviceView;
use vmm_sys_util::eventfd::EventFd;

use crate::iommu::EmuIommu;
use crate::pci::{PciCore, PciIdentity};

/// The class code of an NVMe controller (mass storage, non-volatile memory, NVMe).
pub const NVME_CLASS_CODE: u32 = 0x01_08_02;
/// The PCI vendor ID the emulated controller reports (Microsoft's, as OpenVMM's emulated NVMe
/// controller, the model this one follows, reports).
pub const VENDOR_ID: u16 = 0x1414;
/// The PCI device ID the emulated controller reports.
pub const DEVICE_ID: u16 = 0xb111;

/// How the emulated controller is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmuNvmeConfig {
    /// Namespace 1's size in bytes (a non-zero multiple of `block_bytes`).
    pub namespace_bytes: u64,
    /// Logical block size: 512 or 4096.
    pub block_bytes: u32,
    /// I/O queue pairs the controller offers (1-511).
    pub max_queues: u16,
    /// CAP.MQES: the largest I/O queue, 0's based (1-65534).
    pub mqes: u16,
    /// Support SGLs for I/O commands (Identify Controller SGLS).
    pub sgl: bool,
    /// MSI-X vectors (1-256).
    pub msix_vectors: u16,
    /// MDTS: the largest transfer is 4 KiB << `mdts` (1-8).
    pub mdts: u8,
    /// Doorbell writes run the controller on the writing thread until it has nothing left to
    /// do (see the module doc); the controller thread then serves only register changes and
    /// timed events, and does not spin. For benchmarks; off by default.
    pub inline_doorbells: bool,
}

impl Default for EmuNvmeConfig {
    fn default() -> Self {
        EmuNvmeConfig {
            namespace_bytes: 8 << 20,
            block_bytes: 512,
            max_queues: 8,
            mqes: 255,
            sgl: true,
            msix_vectors: 9,
            mdts: 5,
            inline_doorbells: false,
        }
    }
}

impl EmuNvmeConfig {
    fn validate(&self) -> Result<(), DeviceError> {
        let bad = |what: String| Err(DeviceError::Unsupported(format!("EmuNvmeConfig: {what}")));
        if self.block_bytes != 512 && self.block_bytes != 4096 {
            return bad(format!(
                "block_bytes {} is not 512 or 4096",
                self.block_bytes
            ));
        }
        if self.namespace_bytes == 0 || self.namespace_bytes % u64::from(self.block_bytes) != 0 {
            return bad(format!(
                "namespace_bytes {} is not a non-zero multiple of the block size",
                self.namespace_bytes
            ));
        }
        if !(1..=511).contains(&self.max_queues) {
            return bad(format!("max_queues {} is not in 1..=511", self.max_queues));
        }
        if !(1..=65534).contains(&self.mqes) {
            return bad(format!("mqes {} is not in 1..=65534", self.mqes));
        }
        if !(1..=256).contains(&self.msix_vectors) {
            return bad(format!(
                "msix_vectors {} is not in 1..=256",
                self.msix_vectors
            ));
        }
        if !(1..=8).contains(&self.mdts) {
            return bad(format!("mdts {} is not in 1..=8", self.mdts));
        }
        Ok(())
    }
}

/// How [`Faults::corrupt_next_completion`] breaks a completion entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// The entry names command ID 0xffff, which no command of a real queue has.
    BadCid,
    /// The entry is posted twice (the second one completes an already completed command).
    DuplicateCid,
    /// The entry is written with the previous pass's phase tag, so the host never sees it
    /// (the controller still moves on to the next slot).
    StalePhase,
    /// The SQ head field is the SQ's size: outside the ring.
    SqHeadOutOfRange,
    /// The SQ ID field names another queue (the real one + 1).
    WrongSqId,
}

/// What the fault handle armed; consumed by the controller thread.
#[derive(Debug, Default)]
struct FaultState {
    drop_completions: u32,
    corruptions: VecDeque<Corruption>,
    flood_cq: Option<u16>,
    fatal: bool,
    hold_next: u32,
    fail_creations: u32,
    fail_sq_creations: u32,
    fail_deletions: u32,
    delay: Duration,
}

impl FaultState {
    fn is_idle(&self) -> bool {
        self.drop_completions == 0
            && self.corruptions.is_empty()
            && self.flood_cq.is_none()
            && !self.fatal
            && self.hold_next == 0
            && self.fail_creations == 0
            && self.fail_sq_creations == 0
            && self.fail_deletions == 0
            && self.delay.is_zero()
    }
}

/// Counters a test reads back ([`EmuNvme::stats`]).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct EmuNvmeStats {
    /// DMAs to an IOVA the domain has not mapped.
    pub iommu_faults: u64,
    /// The last faulting IOVA.
    pub last_fault_iova: Option<u64>,
    /// DMAs refused because bus mastering was off.
    pub dma_refused: u64,
    /// DMAs that happened after bus mastering was turned off. Must be 0.
    pub dma_after_bus_master_off: u64,
    /// Periodic DMA writes made into held commands' buffers.
    pub held_dma_writes: u64,
    /// Doorbell register writes.
    pub doorbell_writes: u64,
    /// Time the writers of doorbells spent in the controller ([`EmuNvmeConfig::inline_doorbells`];
    /// 0 otherwise), from the doorbell's hand-off to the model to its return: the model's passes
    /// and its own bookkeeping (finding the model, its lock, this count). In TSC ticks on
    /// x86_64 (read without serialising, so a caller timing itself with the TSC subtracts all
    /// but a few cycles of the model's time), in nanoseconds elsewhere.
    pub inline_ticks: u64,
    /// MSI-X messages delivered.
    pub interrupts: u64,
    /// Completion entries written to completion queues (flood entries included).
    pub completions_posted: u64,
    /// Completions dropped by [`Faults::drop_completions`].
    pub completions_dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    doorbell_writes: AtomicU64,
    /// Time spent in inline passes ([`EmuNvmeStats::inline_ticks`]).
    inline_ticks: AtomicU64,
    held_dma_writes: AtomicU64,
    completions_posted: AtomicU64,
    completions_dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct Regs {
    cc: AtomicU32,
    csts: AtomicU32,
    aqa: AtomicU32,
    asq: AtomicU64,
    acq: AtomicU64,
    intms: AtomicU32,
}

/// State shared by the handle, the BAR, the fault handle and the controller thread.
#[derive(Debug)]
pub(crate) struct Shared {
    cfg: EmuNvmeConfig,
    pci: PciCore,
    regs: Regs,
    /// SQ tail / CQ head doorbells: `2 * qid` and `2 * qid + 1`.
    doorbells: Box<[AtomicU32]>,
    thread: OnceLock<Thread>,
    /// The controller model, for inline passes; the strong references are the handle's and the
    /// thread's (a strong one here would be a cycle through the model's own `Arc<Shared>`).
    model: OnceLock<Weak<Mutex<controller::Controller>>>,
    stop: AtomicBool,
    /// Function resets asked for and done (the controller thread performs them).
    flr: crate::pci::ResetHandshake,
    faults: Mutex<FaultState>,
    faults_armed: AtomicBool,
    namespace: Mutex<Vec<u8>>,
    admin_ops: Box<[AtomicU64]>,
    io_ops: Box<[AtomicU64]>,
    stats: Counters,
}

impl Shared {
    /// The CAP register.
    fn cap(&self) -> u64 {
        let mqes = u64::from(self.cfg.mqes);
        let cqr = 1u64 << 16;
        let to = 1u64 << 24; // 500 ms
        let css_nvm = 1u64 << 37;
        mqes | cqr | to | css_nvm // DSTRD 0, MPSMIN 0, MPSMAX 0
    }

    /// Wakes the controller thread (cheap when it is not parked).
    fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// After a doorbell write: runs the controller here until it makes no progress
    /// ([`EmuNvmeConfig::inline_doorbells`]), or wakes its thread.
    fn doorbell_rung(&self) {
        if !self.cfg.inline_doorbells {
            self.wake();
            return;
        }
        let start = inline_clock();
        if let Some(model) = self.model.get().and_then(Weak::upgrade) {
            let mut model = crate::pci::lock(&model);
            while model.pass() {}
        }
        // The count's own atomic add falls outside the window: a few ns, left to the caller.
        let spent = inline_clock().wrapping_sub(start);
        self.stats.inline_ticks.fetch_add(spent, Ordering::Relaxed);
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arms a fault: `f` changes the state under the lock and the armed flag is raised.
    fn arm(&self, f: impl FnOnce(&mut FaultState)) {
        let mut state = self.faults();
        f(&mut state);
        self.faults_armed.store(true, Ordering::Release);
        drop(state);
        self.wake();
    }

    fn namespace(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.namespace.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An emulated NVMe controller. See the module docs. Dropping it stops its thread.
///
/// ```
/// use std::sync::Arc;
/// use tidepool::device::PciDevice;
/// use tidepool_emu::{EmuNvme, EmuNvmeConfig};
/// let nvme = Arc::new(EmuNvme::new(EmuNvmeConfig::default()).unwrap());
/// assert_eq!(nvme.class_code().unwrap(), 0x010802);
/// let bar = nvme.map_bar(0).unwrap();
/// assert_eq!(bar.read32(0x08).unwrap(), 0x0001_0400); // VS 1.4
/// ```
#[derive(Debug)]
pub struct EmuNvme {
    shared: Arc<Shared>,
    /// Keeps the model alive for inline passes while the handle lives.
    _model: Arc<Mutex<controller::Controller>>,
    thread: Option<JoinHandle<()>>,
}

impl EmuNvme {
    /// A controller in its own new IOMMU domain.
    pub fn new(cfg: EmuNvmeConfig) -> Result<EmuNvme, DeviceError> {
        EmuNvme::with_iommu(cfg, Arc::new(EmuIommu::new()))
    }

    /// A controller whose DMA goes through `iommu` (several devices may share a domain).
    pub fn with_iommu(cfg: EmuNvmeConfig, iommu: Arc<EmuIommu>) -> Result<EmuNvme, DeviceError> {
        cfg.validate()?;
        let identity = PciIdentity {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID,
            class_code: NVME_CLASS_CODE,
            msix_vectors: cfg.msix_vectors,
            msix_bar: 0,
            msix_table_offset: bar::MSIX_TABLE,
            msix_pba_offset: bar::MSIX_PBA,
        };
        let counters = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect();
        let shared = Arc::new(Shared {
            pci: PciCore::new(identity, iommu),
            regs: Regs::default(),
            doorbells: (0..2 * (usize::from(cfg.max_queues) + 1))
                .map(|_| AtomicU32::new(0))
                .collect(),
            thread: OnceLock::new(),
            model: OnceLock::new(),
            stop: AtomicBool::new(false),
            flr: crate::pci::ResetHandshake::default(),
            faults: Mutex::default(),
            faults_armed: AtomicBool::new(false),
            namespace: Mutex::new(vec![0; cfg.namespace_bytes as usize]),
            admin_ops: counters(256),
            io_ops: counters(256),
            stats: Counters::default(),
            cfg,
        });
        let model = Arc::new(Mutex::new(controller::Controller::new(shared.clone())));
        let _ = shared.model.set(Arc::downgrade(&model));
        let thread_model = model.clone();
        let thread = std::thread::Builder::new()
            .name("emu-nvme".into())
            .spawn(move || controller::run(thread_model))
            .map_err(|e| DeviceError::Os {
                what: "spawning the emulated NVMe controller thread",
                source: e,
            })?;
        let _ = shared.thread.set(thread.thread().clone());
        Ok(EmuNvme {
            shared,
            _model: model,
            thread: Some(thread),
        })
    }

    /// The fault-injection handle.
    pub fn faults(&self) -> Faults {
        Faults {
            shared: self.shared.clone(),
        }
    }

    /// The IOMMU domain the controller's DMA goes through.
    pub fn iommu(&self) -> &Arc<EmuIommu> {
        self.shared.pci.iommu()
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &EmuNvmeConfig {
        &self.shared.cfg
    }

    /// The counters.
    pub fn stats(&self) -> EmuNvmeStats {
        let s = &self.shared;
        let faults = s.pci.iommu().faults();
        let pci = s.pci.stats();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EmuNvmeStats {
            iommu_faults: faults.count,
            last_fault_iova: faults.last_iova,
            dma_refused: pci.dma_refused,
            dma_after_bus_master_off: pci.dma_after_bus_master_off,
            held_dma_writes: get(&s.stats.held_dma_writes),
            doorbell_writes: get(&s.stats.doorbell_writes),
            inline_ticks: get(&s.stats.inline_ticks),
            interrupts: pci.interrupts,
            completions_posted: get(&s.stats.completions_posted),
            completions_dropped: get(&s.stats.completions_dropped),
        }
    }

    /// Admin commands fetched with this opcode.
    pub fn admin_commands(&self, opcode: u8) -> u64 {
        self.shared.admin_ops[usize::from(opcode)].load(Ordering::Relaxed)
    }

    /// I/O commands fetched with this opcode.
    pub fn io_commands(&self, opcode: u8) -> u64 {
        self.shared.io_ops[usize::from(opcode)].load(Ordering::Relaxed)
    }

    /// Copies namespace bytes at `offset` into `buf` (for verifying written data).
    pub fn read_namespace(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let ns = self.shared.namespace();
        let range = ns_range(ns.len(), offset, buf.len())?;
        buf.copy_from_slice(&ns[range]);
        Ok(())
    }

    /// Overwrites namespace bytes at `offset` with `data` (for preparing reads).
    pub fn write_namespace(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let mut ns = self.shared.namespace();
        let range = ns_range(ns.len(), offset, data.len())?;
        ns[range].copy_from_slice(data);
        Ok(())
    }
}

/// The clock of [`EmuNvmeStats::inline_ticks`]: the TSC on x86_64 (a plain `RDTSC`, a few
/// cycles, so timing the model costs its caller almost nothing), nanoseconds since the first
/// call elsewhere.
#[inline(always)]
fn inline_clock() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
        EPOCH
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_nanos() as u64
    }
}

fn ns_range(size: usize, offset: u64, len: usize) -> Result<std::ops::Range<usize>, DeviceError> {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    match start.checked_add(len) {
        Some(end) if end <= size => Ok(start..end),
        _ => Err(DeviceError::BadAccess {
            what: "namespace",
            offset,
            width: len as u64,
            size: size as u64,
        }),
    }
}

impl Drop for EmuNvme {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the emulated NVMe controller thread panicked");
            }
        }
    }
}

impl PciDevice for EmuNvme {
    fn name(&self) -> &str {
        "emulated NVMe controller"
    }

    fn read_config(&self, offset: u16, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.shared.pci.read_config(offset, buf)
    }

    fn write_config(&self, offset: u16, buf: &[u8]) -> Result<(), DeviceError> {
        self.shared.pci.write_config(offset, buf)
    }

    fn map_bar(&self, index: u8) -> Result<Arc<dyn Mmio>, DeviceError> {
        if index != 0 {
            return Err(DeviceError::Unsupported(format!(
                "the emulated NVMe controller has only BAR0, not BAR{index}"
            )));
        }
        Ok(Arc::new(bar::NvmeBar {
            shared: self.shared.clone(),
        }))
    }

    fn msix_vectors(&self) -> u32 {
        u32::from(self.shared.pci.msix_vectors())
    }

    fn enable_msix(&self, fds: &[EventFd]) -> Result<(), DeviceError> {
        self.shared.pci.enable_msix(fds)
    }

    fn disable_msix(&self) -> Result<(), DeviceError> {
        self.shared.pci.disable_msix();
        Ok(())
    }

    /// Resets the controller (registers, queues, held commands) on its thread and waits for
    /// it: when this returns the controller does no DMA until it is enabled again.
    fn function_reset(&self) -> Result<(), DeviceError> {
        self.shared.pci.check_function_reset()?;
        let s = &self.shared;
        s.flr.request_and_wait(|| s.wake(), "emulated controller")
    }

    fn dma_view(&self) -> Result<Arc<dyn DeviceView>, DeviceError> {
        Ok(self.shared.pci.iommu().clone())
    }
}

/// Fault injection for one [`EmuNvme`]; each fault is applied by the controller thread through
/// the real protocol. Completion faults apply to the next completions of any queue, in order.
#[derive(Clone, Debug)]
pub struct Faults {
    shared: Arc<Shared>,
}

impl Faults {
    /// Never posts the next `n` completions (the commands stay outstanding for the host).
    pub fn drop_completions(&self, n: u32) {
        self.shared.arm(|f| f.drop_completions += n);
    }

    /// Breaks the next completion (queued after earlier corruptions) as `how` says.
    pub fn corrupt_next_completion(&self, how: Corruption) {
        self.shared.arm(|f| f.corruptions.push_back(how));
    }

    /// Keeps completion queue `qid` full of entries with the expected phase (command ID 0) as
    /// fast as the host consumes them, until [`Faults::stop_flood`].
    pub fn flood_cq(&self, qid: u16) {
        self.shared.arm(|f| f.flood_cq = Some(qid));
    }

    /// Ends a [`Faults::flood_cq`].
    pub fn stop_flood(&self) {
        self.shared.arm(|f| f.flood_cq = None);
    }

    /// Sets CSTS.CFS (controller fatal status); the controller stops processing commands until
    /// it is disabled (CC.EN = 0) or reset.
    pub fn set_fatal(&self) {
        self.shared.arm(|f| f.fatal = true);
    }

    /// Holds the next I/O command: never completes it, and while held (until a function reset)
    /// DMA-writes 0xEE over its data buffer every millisecond, which bus mastering off stops.
    pub fn hold_next_command(&self) {
        self.shared.arm(|f| f.hold_next += 1);
    }

    /// The next COMMAND write that clears bus mastering leaves it set.
    pub fn fail_next_bus_master_clear(&self) {
        self.shared.pci.fail_next_bus_master_clear();
    }

    /// Makes [`PciDevice::function_reset`] fail while `fail` is set.
    pub fn fail_function_reset(&self, fail: bool) {
        self.shared.pci.set_fail_function_reset(fail);
    }

    /// The next `n` Delete I/O SQ/CQ commands fail with Internal Error (the queue stays).
    pub fn fail_queue_deletions(&self, n: u32) {
        self.shared.arm(|f| f.fail_deletions += n);
    }

    /// The next `n` Create I/O SQ/CQ commands fail with Internal Error.
    pub fn fail_queue_creations(&self, n: u32) {
        self.shared.arm(|f| f.fail_creations += n);
    }

    /// The next `n` Create I/O SQ commands fail with Internal Error (Create I/O CQ is not
    /// affected): the failure after a CQ was already made for the pair.
    pub fn fail_sq_creations(&self, n: u32) {
        self.shared.arm(|f| f.fail_sq_creations += n);
    }

    /// Posts every completion `delay` after the command was executed (`Duration::ZERO`: off).
    pub fn delay_completions(&self, delay: Duration) {
        self.shared.arm(|f| f.delay = delay);
    }

    /// Disarms every fault armed here (held commands stay held; bus-master and reset faults
    /// are left as they are).
    pub fn clear(&self) {
        self.shared.arm(|f| *f = FaultState::default());
    }
}
