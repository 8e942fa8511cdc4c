//! Controller bring-up, the admin queue, I/O queue creation, reset and shutdown.
//!
//! # Bring-up (Base spec 1.4, 7.6.1), as [`Controller::new`] does it
//! 1. Check the PCI class code (NVMe = 0x010802), enable bus mastering, map BAR0.
//! 2. Read CAP and VS. We need the NVM command set and 4 KiB pages (CAP.MPSMIN = 0).
//! 3. Disable: clear CC.EN and wait for CSTS.RDY = 0, at most CAP.TO.
//! 4. Admin queues: two zeroed rings from the pool; AQA, ASQ, ACQ.
//! 5. Enable with CC = NVM command set, MPS 4 KiB, round robin, IOSQES 6, IOCQES 4; wait for
//!    CSTS.RDY = 1 (or CSTS.CFS: fail), at most CAP.TO.
//! 6. Identify Controller, the active namespace list and each namespace; Set Features
//!    Number of Queues; read the error and SMART logs on request.
//!
//! # Objects
//! - [`Hw`]: what every queue needs (registers, pool, the VFIO device, the reset
//!   generation). Shared by `Arc`; queues hold it, so registers stay mapped while any queue
//!   lives.
//! - [`Controller`]: the handle; cheap to clone. Its last reference shuts the controller down
//!   (CC.SHN = normal, wait for CSTS.SHST = complete) — after every I/O queue is gone, since
//!   queues hold the controller.
//!
//! # Reset
//! [`Hw::reset`] first clears PCI bus mastering, so from that instant the device cannot read
//! or write memory, then clears CC.EN; it bumps the generation, which every queue compares on
//! `poll`/`submit`: a queue of an older generation fails its outstanding commands (their
//! buffers are safe to reuse: no DMA can happen) and refuses new ones.
//! [`Controller::recover`] brings the controller back up with a fresh admin queue; I/O queues
//! must then be created again.
//!
//! If bus mastering cannot be cleared, a function reset stops the device instead; if that
//! fails too, nothing is known to stop the device's DMA, so the controller is
//! **quarantined**: the in-flight data, the rings and the lists are leaked (never reused),
//! commands fail with [`NvmeError::DmaQuarantined`], and the controller refuses recovery and
//! new queues. Leaking is the only safe answer: the pool would hand that memory to someone
//! else while the device still writes it.
//!
//! # Locking
//! `admin` (a mutex) serialises admin commands, which are polled to completion by the caller's
//! thread (setup paths only: they may block up to the admin timeout). `Hw::reset_state`
//! serialises resets. `qids` guards the I/O queue ID allocation. No lock is taken on the I/O
//! path except by the async queue (its own mutex).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tidepool::data::DmaData;
use tidepool::device::backend::{open_vfio, BackendChoice};
use tidepool::device::PciDevice;
use tidepool::pool::{Pool, PoolConfig, PoolStats};
use tidepool::share::DomainId;
use vmm_sys_util::eventfd::EventFd;

use crate::doorbell::ShadowBuffer;
use crate::error::NvmeError;
use crate::io::{IoQueue, Namespace};
use crate::queue::QueuePair;
use crate::regs::{Cap, Cc, Csts, Registers, Version};
use crate::sgl::{SglError, SglSupport};
use crate::spec::{
    parse_namespace_list, Cns, Command, ErrorLogEntry, IdentifyController, IdentifyNamespace,
    LogPageId, SmartLog, IDENTIFY_BYTES,
};

/// PCI class code of an NVM Express controller (mass storage, NVM, NVMe).
const NVME_CLASS: u32 = 0x01_08_02;

/// How I/O commands describe where their data is: PRPs or SGLs (see [`crate::prp`] and
/// [`crate::sgl`]). Admin commands always use PRPs (the spec requires it over PCIe).
///
/// ```
/// use tidepool_nvme::DataPointer;
/// use tidepool_nvme::sgl::SglSupport;
/// let qemu = SglSupport::from_sgls(0x1_0001);
/// assert_eq!(DataPointer::Auto.resolve(qemu).unwrap(), DataPointer::Sgl);
/// assert_eq!(DataPointer::Auto.resolve(SglSupport::from_sgls(0)).unwrap(), DataPointer::Prp);
/// assert!(DataPointer::Sgl.resolve(SglSupport::from_sgls(0)).is_err());
/// ```
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum DataPointer {
    /// SGLs if the controller supports them (Identify Controller SGLS), PRPs otherwise. The
    /// default: see [`ControllerConfig::data_pointer`].
    #[default]
    Auto,
    /// Always PRPs.
    Prp,
    /// Always SGLs; bring-up fails with [`SglError::Unsupported`] if the controller has none.
    Sgl,
}

impl DataPointer {
    /// The concrete choice ([`DataPointer::Prp`] or [`DataPointer::Sgl`]) for a controller
    /// with `support`; [`SglError::Unsupported`] when SGLs are demanded but not supported.
    pub fn resolve(self, support: SglSupport) -> Result<DataPointer, NvmeError> {
        match self {
            DataPointer::Prp => Ok(DataPointer::Prp),
            DataPointer::Auto if !support.supported() => Ok(DataPointer::Prp),
            DataPointer::Auto | DataPointer::Sgl if support.supported() => Ok(DataPointer::Sgl),
            DataPointer::Auto | DataPointer::Sgl => Err(SglError::Unsupported {
                sgls: support.raw(),
            }
            .into()),
        }
    }
}

/// How a [`Controller`] is set up.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// I/O queue pairs to ask the controller for (it may grant fewer).
    pub io_queues: u16,
    /// Admin queue entries.
    pub admin_entries: u16,
    /// A command outstanding longer than this resets the controller.
    pub command_timeout: Duration,
    /// Route MSI-X vectors to eventfds for async queues (vector `q` serves I/O queue `q`).
    pub interrupts: bool,
    /// The pool to create when opening by PCI address ([`Controller::open`]).
    pub pool: PoolConfig,
    /// Use shadow doorbells (Doorbell Buffer Config, see [`crate::doorbell`]) when the
    /// controller supports them: I/O queues then write a register only when the controller's
    /// event index asks for it. Off by default: in the QEMU 7.2 guest (`nvme_bench`) it avoided
    /// almost no register writes (the controller's event index follows the tail, so each new
    /// batch crosses it) and cost the emulated controller extra DMA, so it was not faster.
    pub shadow_doorbells: bool,
    /// PRPs or SGLs for I/O commands' data (queues may switch with
    /// [`IoQueue::set_data_pointer`]). Default [`DataPointer::Auto`], measured in the QEMU 7.2
    /// guest (`nvme_sgl`, polled QD32 reads, SGL and PRP queues interleaved, three boots on a
    /// loaded 2-core host): 128 KiB reads were faster with SGLs in 10 of 11 paired rounds
    /// (median ratios 1.49, 1.18, 1.35: one descriptor instead of a 32-entry PRP list for
    /// the emulated controller to fetch and map page by page); 4 KiB reads showed no reliable
    /// difference (single PRP vs single descriptor). Controllers without SGLs get PRPs.
    pub data_pointer: DataPointer,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            io_queues: 4,
            admin_entries: 32,
            command_timeout: Duration::from_secs(10),
            interrupts: true,
            pool: PoolConfig::default(),
            shadow_doorbells: false,
            data_pointer: DataPointer::default(),
        }
    }
}

/// What reset state the controller is in, behind [`Hw::reset_state`].
#[derive(Debug, Default)]
struct ResetState {
    reason: Option<String>,
}

/// The hardware handle every queue shares: registers, the pool, the device, the generation.
#[derive(Debug)]
pub struct Hw {
    pub(crate) regs: Registers,
    pub(crate) pool: Pool,
    pub(crate) device: Arc<dyn PciDevice>,
    /// The DMA address space the device reaches memory through; data of any other is refused.
    pub(crate) domain: DomainId,
    pub(crate) cap: Cap,
    generation: AtomicU64,
    reset_state: Mutex<ResetState>,
    /// The shadow doorbell pages, made on first use and kept (the same pages are given to the
    /// controller again after a recovery).
    shadow: OnceLock<ShadowBuffer>,
    /// The controller accepted Doorbell Buffer Config for the current generation.
    shadow_on: AtomicBool,
    /// Set (with the reason) when a reset could not stop the device's DMA: every buffer,
    /// ring and list the device was given is leaked from then on, and the controller is
    /// unusable. Never cleared.
    quarantine: OnceLock<String>,
}

impl Hw {
    /// The shadow doorbell pages, if the controller uses them now.
    #[inline]
    pub(crate) fn shadow(&self) -> Option<&ShadowBuffer> {
        if self.shadow_on.load(Ordering::Acquire) {
            self.shadow.get()
        } else {
            None
        }
    }

    /// Does the controller use shadow doorbells now (queues created now will)?
    pub(crate) fn shadow_doorbells_on(&self) -> bool {
        self.shadow().is_some()
    }

    /// The current generation (bumped by every reset).
    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// `Some(reason)` once a reset failed to stop the device's DMA (see [`Hw::reset`]): the
    /// memory the device was given must then never go back to the pool.
    pub(crate) fn quarantined(&self) -> Option<&str> {
        self.quarantine.get().map(String::as_str)
    }

    /// [`NvmeError::DmaQuarantined`] if the controller is quarantined.
    pub(crate) fn check_usable(&self) -> Result<(), NvmeError> {
        match self.quarantined() {
            Some(reason) => Err(NvmeError::DmaQuarantined {
                reason: reason.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Why the controller was last reset.
    pub(crate) fn reset_reason(&self) -> String {
        lock(&self.reset_state)
            .reason
            .clone()
            .unwrap_or_else(|| "no reason recorded".into())
    }

    /// Stops the controller because of `reason`, unless generation `seen` was already reset.
    ///
    /// Bus mastering goes off first (no DMA from here on, whatever the controller does). If
    /// that fails, a function reset (which also stops DMA) is tried instead. If that fails too,
    /// the device may still DMA into everything it was given: the controller is
    /// **quarantined** ([`Hw::quarantined`]): queues failing their commands leak the data
    /// instead of handing it back ([`NvmeError::DmaQuarantined`]), dropped queues leak their
    /// rings and lists, and the controller refuses further use. Then CC.EN is cleared and
    /// CSTS.RDY = 0 awaited (best effort, at most CAP.TO), and the generation is bumped.
    /// Takes `reset_state`; blocks up to CAP.TO.
    pub(crate) fn reset(&self, seen: u64, reason: String) {
        let mut st = lock(&self.reset_state);
        if self.generation() != seen {
            return;
        }
        // The one event for every reset: command timeouts, invalid completion entries, a fatal
        // controller status and resets asked for by the caller all come through here.
        tracing::warn!(reason = %reason, generation = seen, "resetting the NVMe controller");
        match self.set_bus_master(false) {
            Ok(()) => st.reason = Some(reason),
            // Cannot switch DMA off: reset the whole function instead (FLR also stops DMA).
            Err(e) => match self.device.function_reset() {
                Ok(()) => {
                    tracing::warn!(error = %e, "clearing bus mastering failed; the function reset stopped the device");
                    st.reason = Some(format!(
                        "{reason}; clearing bus master failed ({e}), function reset"
                    ));
                }
                Err(fe) => {
                    let why = format!(
                        "{reason}; clearing bus master failed ({e}) and the function reset \
                         failed ({fe})"
                    );
                    tracing::error!(reason = %why, "cannot stop the device's DMA: quarantining every buffer and ring it was given");
                    let _ = self.quarantine.set(why.clone());
                    st.reason = Some(why);
                }
            },
        }
        let _ = self.disable();
        // A disabled controller forgets Doorbell Buffer Config; recovery sets it again.
        self.shadow_on.store(false, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Sets or clears the PCI bus-master bit (and keeps memory decoding on).
    fn set_bus_master(&self, on: bool) -> Result<(), NvmeError> {
        Ok(self.device.set_bus_master(on)?)
    }

    /// Clears CC.EN and waits for CSTS.RDY = 0.
    fn disable(&self) -> Result<(), NvmeError> {
        let cc = self.regs.cc()?;
        if cc.enabled() {
            self.regs.set_cc(Cc(cc.0 & !1))?;
        }
        self.wait_ready(false, "become disabled")
    }

    /// Waits for CSTS.RDY to equal `ready`, at most CAP.TO. While enabling, CSTS.CFS fails fast.
    fn wait_ready(&self, ready: bool, what: &'static str) -> Result<(), NvmeError> {
        let limit = self.cap.ready_timeout();
        let start = Instant::now();
        loop {
            let csts = self.regs.csts()?;
            if ready_reached(csts, ready)? {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(NvmeError::ControllerTimeout { what, after: limit });
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// Whether CSTS shows RDY = `ready`; a removed device (all ones, whose RDY bit means nothing)
/// is fatal either way, and so is CFS while enabling.
fn ready_reached(csts: Csts, ready: bool) -> Result<bool, NvmeError> {
    if csts.removed() || (ready && csts.fatal()) {
        return Err(NvmeError::ControllerFatal { csts: csts.0 });
    }
    Ok(csts.ready() == ready)
}

/// Locks a mutex, taking the data even if a panicking thread poisoned it (the state here is
/// always consistent between statements).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How an I/O queue's completions are noticed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Completions {
    /// Its owner polls the CQ; the CQ raises no interrupt.
    Polled,
    /// The CQ raises MSI-X vector `qid` (an async queue's reaper waits on its eventfd).
    Interrupt,
}

/// Everything behind a [`Controller`] handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) hw: Arc<Hw>,
    admin: Mutex<QueuePair<()>>,
    identify: IdentifyController,
    namespaces: Vec<Namespace>,
    /// Which I/O queue IDs (1..=granted) are taken; index 0 unused.
    qids: Mutex<Vec<bool>>,
    /// The MSI-X eventfds, vector `q` for I/O queue `q`; async queues get duplicates, so a
    /// queue ID's vector serves every queue that ever has that ID.
    vectors: Mutex<Vec<EventFd>>,
    cfg: ControllerConfig,
    version: Version,
    /// The resolved data pointer for new I/O queues (never `Auto`).
    data_pointer: DataPointer,
}

/// An NVMe controller brought up and ready to create I/O queues. Cheap to clone.
///
/// ```no_run
/// use tidepool_nvme::{Controller, ControllerConfig};
/// let ctrl = Controller::open("0000:00:04.0", ControllerConfig::default())?;
/// let id = ctrl.identify();
/// println!("{} (serial {}), firmware {}", id.model, id.serial, id.firmware);
/// let ns = ctrl.namespace(1)?;
/// let mut q = ctrl.create_io_queue::<()>(64)?;
/// let mut block = vec![0u8; ns.block_bytes() as usize];
/// q.read(&ns, 0, &mut block)?;
/// # Ok::<(), tidepool_nvme::NvmeError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Controller {
    shared: Arc<Shared>,
}

impl Controller {
    /// Opens the NVMe controller at PCI address `bdf` (bound to `vfio-pci`) in a new IOMMU
    /// domain, makes a pool over it with `cfg.pool`, and brings it up. The VFIO backend is
    /// the one `TIDEPOOL_VFIO_BACKEND` asks for (`auto` when unset: iommufd where the kernel
    /// has it, the type1 container otherwise; see [`tidepool::device::backend`]).
    pub fn open(bdf: &str, cfg: ControllerConfig) -> Result<Controller, NvmeError> {
        Controller::open_with_backend(bdf, BackendChoice::from_env()?, cfg)
    }

    /// [`Controller::open`] with the VFIO backend chosen by the caller.
    pub fn open_with_backend(
        bdf: &str,
        backend: BackendChoice,
        cfg: ControllerConfig,
    ) -> Result<Controller, NvmeError> {
        let opened = open_vfio(bdf, u64::MAX, backend)?;
        Controller::with_device(opened.device, cfg)
    }

    /// Brings up the controller behind `device` (any [`PciDevice`]: VFIO, or an emulated
    /// controller in tests) with a new pool over the device's DMA view, made with `cfg.pool`.
    pub fn with_device(
        device: Arc<dyn PciDevice>,
        cfg: ControllerConfig,
    ) -> Result<Controller, NvmeError> {
        check_class(device.as_ref())?;
        let pool = Pool::new(device.dma_view()?, cfg.pool.clone())?;
        Controller::new(device, pool, cfg)
    }

    /// Brings up the controller behind `device`, with queues and buffers from `pool`, which
    /// must be a pool over the device's DMA domain (several devices in one VFIO container may
    /// share one pool). A pool of another domain is refused with
    /// [`NvmeError::ForeignBuffer`].
    pub fn new(
        device: Arc<dyn PciDevice>,
        pool: Pool,
        cfg: ControllerConfig,
    ) -> Result<Controller, NvmeError> {
        check_class(device.as_ref())?;
        let domain = device.dma_view()?.domain();
        if pool.domain() != domain {
            return Err(NvmeError::ForeignBuffer {
                buffer: pool.domain(),
                device: domain,
            });
        }
        device.set_bus_master(true)?;
        let regs = Registers::new(device.map_bar(0)?)?;
        let cap = regs.cap()?;
        let version = regs.version()?;
        if !cap.supports_nvm_command_set() {
            return Err(NvmeError::Unsupported(
                "CAP.CSS lacks the NVM command set".into(),
            ));
        }
        if cap.min_page_bytes() > crate::spec::PAGE_BYTES {
            return Err(NvmeError::Unsupported(format!(
                "minimum memory page of {} B (this driver uses 4 KiB pages)",
                cap.min_page_bytes()
            )));
        }
        let hw = Arc::new(Hw {
            regs,
            pool,
            device,
            domain,
            cap,
            generation: AtomicU64::new(0),
            reset_state: Mutex::new(ResetState::default()),
            shadow: OnceLock::new(),
            shadow_on: AtomicBool::new(false),
            quarantine: OnceLock::new(),
        });
        let admin = enable_with_admin_queue(&hw, &cfg)?;
        let mut shared = Shared {
            hw,
            admin: Mutex::new(admin),
            identify: IdentifyController::parse(&[]),
            namespaces: Vec::new(),
            qids: Mutex::new(Vec::new()),
            vectors: Mutex::new(Vec::new()),
            data_pointer: cfg.data_pointer,
            cfg,
            version,
        };
        shared.identify = IdentifyController::parse(&shared.identify_page(Cns::Controller, 0)?);
        shared.data_pointer = shared
            .cfg
            .data_pointer
            .resolve(shared.identify.sgl_support())?;
        shared.namespaces = shared.read_namespaces()?;
        shared.configure_shadow_doorbells()?;
        let granted = shared.set_queue_count()?;
        *lock(&shared.qids) = vec![false; usize::from(granted) + 1];
        if shared.cfg.interrupts {
            let n = (usize::from(granted) + 1).min(shared.hw.device.msix_vectors() as usize);
            let fds = shared.hw.device.enable_msix_eventfds(n)?;
            *lock(&shared.vectors) = fds;
        }
        Ok(Controller {
            shared: Arc::new(shared),
        })
    }

    /// Identify Controller data (model, serial, firmware, MDTS, ...).
    pub fn identify(&self) -> &IdentifyController {
        &self.shared.identify
    }

    /// What the controller supports of SGLs (Identify Controller SGLS).
    pub fn sgl_support(&self) -> SglSupport {
        self.shared.identify.sgl_support()
    }

    /// How new I/O queues describe data: [`ControllerConfig::data_pointer`] resolved against
    /// the controller's SGL support ([`DataPointer::Prp`] or [`DataPointer::Sgl`]).
    pub fn data_pointer(&self) -> DataPointer {
        self.shared.data_pointer
    }

    /// Whether shadow doorbells are in use (asked for in [`ControllerConfig`], supported by
    /// the controller, accepted by it).
    pub fn shadow_doorbells(&self) -> bool {
        self.shared.hw.shadow_doorbells_on()
    }

    /// The NVMe version the controller reports (VS).
    pub fn version(&self) -> Version {
        self.shared.version
    }

    /// CAP.
    pub fn cap(&self) -> Cap {
        self.shared.hw.cap
    }

    /// The active namespaces found at bring-up.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.shared.namespaces
    }

    /// Active namespace `nsid`.
    pub fn namespace(&self, nsid: u32) -> Result<Namespace, NvmeError> {
        self.shared
            .namespaces
            .iter()
            .find(|n| n.nsid() == nsid)
            .copied()
            .ok_or(NvmeError::NoSuchNamespace(nsid))
    }

    /// The largest I/O queue depth this controller allows (MQES + 1 entries, one kept empty,
    /// and the SQ ring must fit one pool buffer).
    pub fn max_queue_depth(&self) -> u32 {
        let ring_limit =
            (self.shared.hw.pool.config().max_buffer / crate::spec::SQ_ENTRY_BYTES) as u32;
        self.shared
            .hw
            .cap
            .max_queue_entries()
            .min(ring_limit)
            .min(4096)
            - 1
    }

    /// The pool the driver takes its rings, PRP lists and bounce buffers from.
    pub fn pool(&self) -> &Pool {
        &self.shared.hw.pool
    }

    /// The pool's statistics.
    pub fn pool_stats(&self) -> PoolStats {
        self.shared.hw.pool.stats()
    }

    /// The SMART / health log (controller-wide).
    pub fn smart_log(&self) -> Result<SmartLog, NvmeError> {
        let page = self
            .shared
            .log_page(LogPageId::SmartHealth, SmartLog::BYTES)?;
        Ok(SmartLog::parse(&page))
    }

    /// The error information log's non-empty entries (up to ELPE + 1, at most one page).
    pub fn error_log(&self) -> Result<Vec<ErrorLogEntry>, NvmeError> {
        let entries =
            (usize::from(self.shared.identify.elpe) + 1).min(IDENTIFY_BYTES / ErrorLogEntry::BYTES);
        let page = self
            .shared
            .log_page(LogPageId::ErrorInformation, entries * ErrorLogEntry::BYTES)?;
        Ok(ErrorLogEntry::parse_all(&page))
    }

    /// Creates a polled I/O queue pair of `depth` outstanding commands (entries = depth + 1),
    /// without interrupts. `T` is the per-command user data of [`IoQueue::poll`].
    pub fn create_io_queue<T>(&self, depth: u32) -> Result<IoQueue<T>, NvmeError> {
        let qp = self.create_queue_pair(depth, Completions::Polled)?;
        Ok(IoQueue::new(self.clone(), qp))
    }

    /// Creates an I/O queue like [`Controller::create_io_queue`] whose CQ raises MSI-X vector
    /// `qid`: when [`IoQueue::poll`] finds nothing, [`IoQueue::wait_interrupt`] sleeps until the
    /// device posts a completion instead of spinning. Needs [`ControllerConfig::interrupts`].
    pub fn create_interrupt_io_queue<T>(&self, depth: u32) -> Result<IoQueue<T>, NvmeError> {
        let (qp, interrupt) = self.create_interrupt_queue(depth)?;
        Ok(IoQueue::with_interrupt(self.clone(), qp, interrupt))
    }

    /// Creates an I/O queue pair whose CQ raises MSI-X vector `qid`, returning the vector's
    /// eventfd with it (for [`crate::AsyncQueue`] and [`Controller::create_interrupt_io_queue`]).
    pub(crate) fn create_interrupt_queue<T>(
        &self,
        depth: u32,
    ) -> Result<(QueuePair<T>, EventFd), NvmeError> {
        if !self.shared.cfg.interrupts {
            return Err(NvmeError::Unsupported(
                "async queues need interrupts: set ControllerConfig::interrupts".into(),
            ));
        }
        let qp = self.create_queue_pair(depth, Completions::Interrupt)?;
        let qid = qp.qid();
        let fd = lock(&self.shared.vectors)
            .get(usize::from(qid))
            .map(EventFd::try_clone)
            .transpose()
            .map_err(|e| NvmeError::Os {
                what: "duplicating an MSI-X eventfd",
                source: e,
            });
        match fd {
            Ok(Some(fd)) => Ok((qp, fd)),
            Ok(None) => {
                drop(qp); // deletes it on the controller and frees the ID
                Err(NvmeError::Unsupported(format!(
                    "no MSI-X vector for queue {qid}"
                )))
            }
            Err(e) => {
                drop(qp);
                Err(e)
            }
        }
    }

    /// Allocates a queue ID, makes the rings and creates CQ then SQ on the controller.
    fn create_queue_pair<T>(
        &self,
        depth: u32,
        completions: Completions,
    ) -> Result<QueuePair<T>, NvmeError> {
        self.shared.hw.check_usable()?;
        let max = self.max_queue_depth();
        if depth == 0 || depth > max {
            return Err(NvmeError::QueueDepth { asked: depth, max });
        }
        let qid = {
            let mut qids = lock(&self.shared.qids);
            let granted = (qids.len().saturating_sub(1)) as u16;
            let free = (1..qids.len())
                .find(|&q| !qids[q])
                .ok_or(NvmeError::NoQueues { granted })?;
            qids[free] = true;
            free as u16
        };
        let entries = (depth + 1) as u16;
        let made = QueuePair::new(
            self.shared.hw.clone(),
            qid,
            entries,
            self.shared.cfg.command_timeout,
        )
        .and_then(|mut qp| {
            if self.shared.data_pointer == DataPointer::Sgl {
                qp.set_sgl(Some(self.sgl_support()));
            }
            let iv = completions == Completions::Interrupt;
            // A polled CQ names vector 0 with interrupts off: QEMU refuses any other vector
            // while MSI-X is disabled (ControllerConfig::interrupts = false).
            let vector = if iv { qid } else { 0 };
            let cq = Command::create_io_cq(qid, entries, qp.cq_addr(), vector, iv);
            self.shared.admin(cq)?;
            if let Err(e) =
                self.shared
                    .admin(Command::create_io_sq(qid, entries, qp.sq_addr(), qid))
            {
                if let Err(de) = self.shared.admin(Command::delete_io_cq(qid)) {
                    // The controller may still own the CQ ring (and post into it): stop it
                    // before the ring goes back to the pool with `qp`.
                    tracing::warn!(qid, error = %de, "deleting the CQ of a failed queue creation failed: resetting the controller");
                    self.shared.hw.reset(
                        qp.generation(),
                        format!("creating I/O queue {qid} failed ({e}) and deleting its CQ failed ({de})"),
                    );
                }
                return Err(e);
            }
            // From here the queue is on the controller: dropping it takes it off first.
            qp.attach(self.shared.clone());
            Ok(qp)
        });
        if made.is_err() {
            lock(&self.shared.qids)[usize::from(qid)] = false;
        }
        made
    }

    /// Deletes an I/O queue pair (SQ, then CQ) and frees its ID: what dropping it does (see
    /// [`Shared::release_queue`]). Blocks on admin commands.
    pub(crate) fn delete_queue_pair<T>(&self, qp: QueuePair<T>) {
        drop(qp);
    }

    /// Resets the controller now (bus mastering off, CC.EN = 0), failing every outstanding
    /// command on every queue with [`NvmeError::ControllerReset`].
    pub fn reset(&self, reason: &str) {
        let hw = &self.shared.hw;
        hw.reset(hw.generation(), reason.to_string());
    }

    /// Brings the controller back after a reset: bus mastering on, a fresh admin queue,
    /// enable, queue count. Existing I/O queues stay dead; create new ones.
    ///
    /// A function reset comes first when the device supports it: a reset that only cleared bus
    /// mastering leaves commands the device never finished (a wedged DMA engine) able to
    /// resume their DMA, into memory that went back to the pool, once bus mastering is back.
    pub fn recover(&self) -> Result<(), NvmeError> {
        let _span =
            tracing::info_span!("nvme_recover", device = self.shared.hw.device.name()).entered();
        let hw = &self.shared.hw;
        hw.check_usable()?;
        let mut admin = lock(&self.shared.admin);
        if let Err(e) = hw.device.function_reset() {
            tracing::warn!(error = %e, "function reset before recovery failed; recovering without it");
        }
        hw.disable()?;
        hw.set_bus_master(true)?;
        *admin = enable_with_admin_queue(hw, &self.shared.cfg)?;
        drop(admin);
        self.shared.configure_shadow_doorbells()?;
        self.shared.set_queue_count()?;
        tracing::info!(
            generation = hw.generation(),
            "NVMe controller recovered after a reset"
        );
        Ok(())
    }
}

impl Hw {
    /// A bare hardware handle over `device` and `pool` without bring-up: for the fuzzing
    /// harness, whose fake device has registers but runs no admin queue.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn bare(device: Arc<dyn PciDevice>, pool: Pool) -> Result<Arc<Hw>, NvmeError> {
        let regs = Registers::new(device.map_bar(0)?)?;
        let cap = regs.cap()?;
        Ok(Arc::new(Hw {
            regs,
            domain: pool.domain(),
            pool,
            device,
            cap,
            generation: AtomicU64::new(0),
            reset_state: Mutex::new(ResetState::default()),
            shadow: OnceLock::new(),
            shadow_on: AtomicBool::new(false),
            quarantine: OnceLock::new(),
        }))
    }
}

impl Drop for Hw {
    /// A quarantined controller's shadow doorbell pages stay leaked: the device may still
    /// write them.
    fn drop(&mut self) {
        if self.quarantined().is_some() {
            if let Some(sb) = self.shadow.take() {
                std::mem::forget(sb);
            }
        }
    }
}

/// Refuses a PCI function that is not an NVMe controller.
fn check_class(device: &dyn PciDevice) -> Result<(), NvmeError> {
    let class = device.class_code()?;
    if class != NVME_CLASS {
        return Err(NvmeError::NotNvme {
            bdf: device.name().to_string(),
            class,
        });
    }
    Ok(())
}

/// Disables the controller, programs a fresh admin queue pair and enables it (steps 3-5).
fn enable_with_admin_queue(
    hw: &Arc<Hw>,
    cfg: &ControllerConfig,
) -> Result<QueuePair<()>, NvmeError> {
    hw.disable()?;
    let entries = cfg.admin_entries.clamp(2, 4096);
    let admin_timeout = cfg.command_timeout.max(hw.cap.ready_timeout());
    let admin = QueuePair::new(hw.clone(), 0, entries, admin_timeout)?;
    hw.regs
        .set_admin_queues(entries, entries, admin.sq_addr(), admin.cq_addr())?;
    hw.regs.set_cc(Cc::driver_default(true))?;
    hw.wait_ready(true, "become ready")?;
    Ok(admin)
}

impl Shared {
    /// Takes I/O queue `qid` (created in controller generation `generation`) off the
    /// controller and frees its ID: what dropping an attached [`QueuePair`] does. If the queue
    /// is still `current` (not deleted, the controller not reset since), Delete I/O SQ then
    /// Delete I/O CQ; if the controller does not confirm both, it may still own the rings, so
    /// it is reset (bus mastering off first, see [`Hw::reset`]) before the caller frees them.
    /// Blocks on admin commands (up to the admin timeout).
    pub(crate) fn release_queue(&self, qid: u16, generation: u64, current: bool) {
        if current {
            let sq = self.admin(Command::delete_io_sq(qid));
            let cq = sq.and_then(|_| self.admin(Command::delete_io_cq(qid)));
            if let Err(e) = cq {
                // The controller would not let go of the queue: stop it before the rings and
                // in-flight buffers go back to the pool.
                tracing::warn!(qid, error = %e, "deleting an I/O queue failed: resetting the controller");
                self.hw
                    .reset(generation, format!("deleting I/O queue {qid} failed: {e}"));
            }
        }
        if let Some(taken) = lock(&self.qids).get_mut(usize::from(qid)) {
            *taken = false;
        }
    }

    /// Runs one admin command without data and returns DW0.
    fn admin(&self, cmd: Command) -> Result<u32, NvmeError> {
        Ok(lock(&self.admin).run(cmd, None, 0)?.0)
    }

    /// Runs an admin command that returns `len` bytes (≤ 4 KiB) and copies them out.
    fn admin_read(&self, cmd: Command, len: usize) -> Result<Vec<u8>, NvmeError> {
        let buf = self.hw.pool.try_alloc(IDENTIFY_BYTES)?;
        let (_, buf) = lock(&self.admin).run(cmd, Some(buf.into()), len)?;
        let mut out = vec![0u8; len];
        if let Some(buf) = buf.and_then(DmaData::into_buf) {
            buf.read_at(0, &mut out)?;
        }
        Ok(out)
    }

    /// An Identify page.
    fn identify_page(&self, cns: Cns, nsid: u32) -> Result<Vec<u8>, NvmeError> {
        self.admin_read(Command::identify(cns, nsid, 0), IDENTIFY_BYTES)
    }

    /// A log page of `len` bytes.
    fn log_page(&self, lid: LogPageId, len: usize) -> Result<Vec<u8>, NvmeError> {
        self.admin_read(Command::get_log_page(lid, 0xffff_ffff, len, 0), len)
    }

    /// The active namespaces with their geometry.
    fn read_namespaces(&self) -> Result<Vec<Namespace>, NvmeError> {
        let ids = parse_namespace_list(&self.identify_page(Cns::ActiveNamespaces, 0)?);
        let page = self.hw.cap.min_page_bytes();
        let mdts = self.identify.max_transfer_bytes(page).unwrap_or(usize::MAX);
        let max_transfer = mdts.min(self.hw.pool.config().max_buffer);
        let mut out = Vec::new();
        for nsid in ids {
            let id = IdentifyNamespace::parse(&self.identify_page(Cns::Namespace, nsid)?);
            // Namespaces with unusable formats (e.g. > 64 KiB blocks) or sizes whose byte count
            // overflows are skipped, not fatal.
            match Namespace::from_identify(nsid, &id, max_transfer) {
                Some(ns) => out.push(ns),
                None => tracing::warn!(
                    nsid,
                    nsze = id.nsze,
                    block_bytes = ?id.block_bytes(),
                    "skipping a namespace with an unusable LBA format or a size that overflows"
                ),
            }
        }
        Ok(out)
    }

    /// Gives the controller the shadow doorbell pages if the configuration asks for them and
    /// the controller supports Doorbell Buffer Config (OACS bit 8). A controller that refuses
    /// the command is driven with register doorbells (not an error). Takes the admin lock.
    fn configure_shadow_doorbells(&self) -> Result<(), NvmeError> {
        if !self.cfg.shadow_doorbells || !self.identify.supports_doorbell_buffer_config() {
            return Ok(());
        }
        if self.hw.shadow.get().is_none() {
            let _ = self.hw.shadow.set(ShadowBuffer::new(&self.hw.pool)?);
        }
        let Some(sb) = self.hw.shadow.get() else {
            return Ok(());
        };
        let cmd = Command::doorbell_buffer_config(sb.doorbells_addr(), sb.event_indexes_addr());
        let mut admin = lock(&self.admin);
        match admin.run(cmd, None, 0) {
            Ok(_) => {
                self.hw.shadow_on.store(true, Ordering::Release);
                admin.shadow_admin_doorbells();
                Ok(())
            }
            Err(NvmeError::Command { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Set Features Number of Queues; returns the I/O queue pairs granted.
    fn set_queue_count(&self) -> Result<u16, NvmeError> {
        let want = self.cfg.io_queues.clamp(1, 0xfffe);
        let dw0 = self.admin(Command::set_number_of_queues(want, want))?;
        let sq = (dw0 & 0xffff) as u16;
        let cq = (dw0 >> 16) as u16;
        Ok(sq.min(cq).saturating_add(1).min(want))
    }
}

impl Drop for Shared {
    /// Orderly shutdown: CC.SHN = normal, wait for CSTS.SHST = complete (at most CAP.TO).
    /// Every I/O queue is gone by now (each holds the controller).
    fn drop(&mut self) {
        let hw = &self.hw;
        if hw.generation() != 0
            && lock(&hw.reset_state).reason.is_some()
            && hw.regs.csts().is_ok_and(|c| !c.ready())
        {
            return; // Reset and never recovered: nothing to shut down.
        }
        let Ok(cc) = hw.regs.cc() else { return };
        if hw.regs.set_cc(cc.with_normal_shutdown()).is_err() {
            return;
        }
        let start = Instant::now();
        while start.elapsed() < hw.cap.ready_timeout() {
            if hw.regs.csts().map_or(true, |c| c.shutdown_complete()) {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = hw.device.disable_msix();
        let _ = hw.set_bus_master(false);
    }
}

#[cfg(test)]
mod ready_tests {
    use super::*;

    #[test]
    fn a_removed_device_is_never_ready_or_disabled() {
        assert!(
            ready_reached(Csts(u32::MAX), true).is_err(),
            "all ones is not ready"
        );
        assert!(
            ready_reached(Csts(u32::MAX), false).is_err(),
            "nor disabled"
        );
        assert!(ready_reached(Csts(1), true).unwrap());
        assert!(!ready_reached(Csts(0), true).unwrap());
        assert!(ready_reached(Csts(0), false).unwrap());
        assert!(ready_reached(Csts(3), true).is_err(), "CFS while enabling");
    }
}
