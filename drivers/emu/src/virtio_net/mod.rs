//! [`EmuVirtioNet`]: an in-process modern virtio-net PCI function (virtio 1.x, vendor 0x1af4,
//! device 0x1041) behind the [`PciDevice`] seam.
//!
//! # PCI function
//! Config space is the [`PciCore`]'s (IDs, class 0x020000, COMMAND, MSI-X capability at 0x40)
//! with four virtio vendor capabilities chained after MSI-X (§4.1.4), all naming BAR0:
//!
//! | cap at | `cfg_type`        | BAR0 offset | length |
//! |--------|-------------------|-------------|--------|
//! | 0x50   | 1 common config   | 0x0000      | 0x38   |
//! | 0x60   | 3 ISR             | 0x1000      | 4      |
//! | 0x70   | 4 device config   | 0x2000      | 0x10   |
//! | 0x80   | 2 notify (×4)     | 0x3000      | 8      |
//!
//! The MSI-X table and PBA sit at 0x4000 and 0x5000 (they read as zeros: vectors are routed
//! to eventfds through [`PciDevice::enable_msix`]). [`VnetFaults::corrupt_capabilities`] breaks
//! the list in the ways of [`CapCorruption`].
//!
//! # Device
//! - Features offered: the configured subset of VERSION_1, ACCESS_PLATFORM, MAC and STATUS;
//!   nothing else. Setting FEATURES_OK with a feature that was not offered, without
//!   VERSION_1, or (as QEMU with `iommu_platform=on`) without ACCESS_PLATFORM when it was
//!   offered, leaves FEATURES_OK clear (§3.1.1: the device refuses).
//! - Status and reset: writing 0 asks the device thread to reset (queues, features, status,
//!   pending RX frames); until it has, the status reads DEVICE_NEEDS_RESET (not 0), so a
//!   driver waiting for 0 waits. [`VnetFaults::delay_reset`] and
//!   [`VnetFaults::stall_reset`] make that take longer, or forever.
//! - Queues 0 (RX) and 1 (TX), split layout (§2.7), up to the configured size. Descriptors,
//!   the available ring and the used ring are read and written only by DMA through
//!   [`PciCore::dma_read`] / [`PciCore::dma_write`] (bus mastering and the IOMMU apply to every
//!   byte). Chains are followed (bounded by the queue size); indirect descriptors are not
//!   negotiated and, like a loop, a bad `next` or an avail index running ahead by more than
//!   the queue size, are a device error: DEVICE_NEEDS_RESET is set and the queues stop. So is
//!   an IOMMU fault on ring or buffer memory.
//! - Notifications: 16-bit writes of the queue index at `0x3000 + 4 × queue` (notify offset =
//!   queue index, multiplier 4) wake the thread.
//! - Interrupts: after adding used entries to a queue the device signals its MSI-X vector
//!   (through [`PciCore::signal`]) unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT; with no
//!   vector it sets ISR bit 0 instead.
//! - Loopback: every frame sent on TX (the bytes after the 12-byte virtio-net header) is queued
//!   for RX (unless [`EmuVirtioNet::set_loopback`] turned it off); [`EmuVirtioNet::inject_rx`]
//!   queues any frame. Queued frames are written, behind a virtio-net header with
//!   `num_buffers = 1`, into the next posted RX buffer (chain) that can hold them; at most
//!   [`RX_BACKLOG`] wait, more are dropped and counted. With capture on, sent frames are also
//!   kept for [`EmuVirtioNet::take_sent`].
//!
//! # Faults ([`VnetFaults`])
//! Corrupt the next used entry of a queue ([`UsedCorruption`]: an id outside the table, a
//! length longer than the buffer); stall a queue (the device never completes what is posted
//! there); delay or stall resets; corrupt the capability list; plus the PCI core's bus-master
//! and function-reset faults. [`EmuVirtioNetStats::dma_after_bus_master_off`] must stay 0.

mod bar;
mod device;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use tidepool::device::{config, DeviceError, Mmio, PciDevice};
use tidepool::share::DeviceView;
use vmm_sys_util::eventfd::EventFd;

use crate::iommu::EmuIommu;
use crate::pci::{PciCore, PciIdentity, MSIX_CAP_OFFSET};

/// PCI vendor ID of virtio devices.
pub const VENDOR_ID: u16 = 0x1af4;
/// PCI device ID of a modern virtio-net function (0x1040 + device type 1).
pub const DEVICE_ID: u16 = 0x1041;
/// Class code: network controller, Ethernet.
pub const NET_CLASS_CODE: u32 = 0x02_00_00;

/// Feature: VIRTIO_NET_F_MAC (bit 5).
pub const F_MAC: u64 = 1 << 5;
/// Feature: VIRTIO_NET_F_STATUS (bit 16).
pub const F_STATUS: u64 = 1 << 16;
/// Feature: VIRTIO_F_VERSION_1 (bit 32).
pub const F_VERSION_1: u64 = 1 << 32;
/// Feature: VIRTIO_F_ACCESS_PLATFORM (bit 33).
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
/// Every feature the model can offer.
pub const SUPPORTED_FEATURES: u64 = F_MAC | F_STATUS | F_VERSION_1 | F_ACCESS_PLATFORM;

/// Device status bits (§2.1).
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u8 = 1;
    /// DRIVER.
    pub const DRIVER: u8 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u8 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u8 = 8;
    /// DEVICE_NEEDS_RESET.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// FAILED.
    pub const FAILED: u8 = 128;
}

/// The virtio-net header the device writes in front of every received frame (VERSION_1: 12
/// bytes).
pub const NET_HDR_LEN: usize = 12;
/// Frames waiting for RX buffers; more are dropped.
pub const RX_BACKLOG: usize = 1024;
/// Sent frames kept for [`EmuVirtioNet::take_sent`]; older ones are dropped.
pub const SENT_LOG: usize = 4096;
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;
/// The receive queue.
pub const RX_QUEUE: u16 = 0;
/// The transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Queues the device has.
pub const NUM_QUEUES: u16 = 2;

/// How the emulated function is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmuVirtioNetConfig {
    /// The MAC address in the device configuration.
    pub mac: [u8; 6],
    /// The largest queue size (a power of two, 1-32768); also the size after reset.
    pub queue_size: u16,
    /// MSI-X vectors (1-64).
    pub msix_vectors: u16,
    /// Features offered: a subset of [`SUPPORTED_FEATURES`].
    pub features: u64,
    /// Start with the TX → RX loopback on.
    pub loopback: bool,
    /// Start with capture of sent frames on ([`EmuVirtioNet::take_sent`]).
    pub capture_tx: bool,
}

impl Default for EmuVirtioNetConfig {
    fn default() -> Self {
        EmuVirtioNetConfig {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            queue_size: 256,
            msix_vectors: 3,
            features: SUPPORTED_FEATURES,
            loopback: true,
            capture_tx: false,
        }
    }
}

impl EmuVirtioNetConfig {
    fn validate(&self) -> Result<(), DeviceError> {
        let bad = |what: String| {
            Err(DeviceError::Unsupported(format!(
                "EmuVirtioNetConfig: {what}"
            )))
        };
        if self.queue_size == 0 || !self.queue_size.is_power_of_two() || self.queue_size > 32768 {
            return bad(format!(
                "queue_size {} is not a power of two in 1..=32768",
                self.queue_size
            ));
        }
        if !(1..=64).contains(&self.msix_vectors) {
            return bad(format!(
                "msix_vectors {} is not in 1..=64",
                self.msix_vectors
            ));
        }
        if self.features & !SUPPORTED_FEATURES != 0 {
            return bad(format!(
                "features {:#x} include bits the model does not implement",
                self.features & !SUPPORTED_FEATURES
            ));
        }
        Ok(())
    }
}

/// How [`VnetFaults::corrupt_next_used`] breaks a used-ring entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum UsedCorruption {
    /// The entry's id is the queue size: outside the descriptor table.
    IdOutOfRange,
    /// The entry's length is one more than the buffer (chain) the driver posted.
    LenTooLong,
}

/// How [`VnetFaults::corrupt_capabilities`] breaks the capability list.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CapCorruption {
    /// The last capability points back at the first virtio one: the list loops.
    Loop,
    /// The MSI-X capability's next pointer points into the config header (0x10).
    IntoHeader,
    /// The common-configuration capability has type 0x0f: there is no common configuration.
    NoCommon,
    /// The common configuration's offset lies past the end of BAR0.
    CommonOutsideBar,
}

/// Counters a test reads back ([`EmuVirtioNet::stats`]).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct EmuVirtioNetStats {
    /// DMAs to an IOVA the domain has not mapped.
    pub iommu_faults: u64,
    /// The last faulting IOVA.
    pub last_fault_iova: Option<u64>,
    /// DMAs refused because bus mastering was off.
    pub dma_refused: u64,
    /// DMAs that happened after bus mastering was turned off. Must be 0.
    pub dma_after_bus_master_off: u64,
    /// MSI-X messages delivered.
    pub interrupts: u64,
    /// Doorbell (notify) writes.
    pub notifications: u64,
    /// Frames taken off the TX queue.
    pub tx_frames: u64,
    /// TX buffers shorter than the virtio-net header (completed, nothing sent).
    pub tx_runts: u64,
    /// Frames written into RX buffers.
    pub rx_frames: u64,
    /// Frames dropped: backlog full, or larger than the posted RX buffer.
    pub rx_dropped: u64,
    /// Used entries corrupted by a fault.
    pub used_corrupted: u64,
    /// Resets completed (status 0 written, or function reset).
    pub resets: u64,
    /// Times the device set DEVICE_NEEDS_RESET (malformed ring, IOMMU fault).
    pub device_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    notifications: AtomicU64,
    tx_frames: AtomicU64,
    tx_runts: AtomicU64,
    rx_frames: AtomicU64,
    rx_dropped: AtomicU64,
    used_corrupted: AtomicU64,
    resets: AtomicU64,
    device_errors: AtomicU64,
}

/// One queue's registers in the common configuration.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct QueueRegs {
    size: u16,
    msix_vector: u16,
    enable: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// The common configuration structure's state (§4.1.4.3).
#[derive(Debug)]
struct Common {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    msix_config: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: [QueueRegs; NUM_QUEUES as usize],
    link_up: bool,
}

impl Common {
    fn new(queue_size: u16) -> Common {
        Common {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            msix_config: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: [QueueRegs {
                size: queue_size,
                msix_vector: NO_VECTOR,
                enable: false,
                desc: 0,
                driver: 0,
                device: 0,
            }; NUM_QUEUES as usize],
            link_up: true,
        }
    }

    /// Back to the state after power-on, keeping the link state.
    fn reset(&mut self, queue_size: u16) {
        let link_up = self.link_up;
        let generation = self.config_generation;
        *self = Common::new(queue_size);
        self.link_up = link_up;
        self.config_generation = generation;
    }
}

/// What the fault handle armed; read by the device thread.
#[derive(Debug, Default)]
struct FaultState {
    corrupt: [VecDeque<UsedCorruption>; NUM_QUEUES as usize],
    stalled: [bool; NUM_QUEUES as usize],
    reset_delay: Duration,
    reset_stalled: bool,
    caps: Option<CapCorruption>,
}

/// State shared by the handle, the BAR, the fault handle and the device thread.
#[derive(Debug)]
pub(crate) struct Shared {
    cfg: EmuVirtioNetConfig,
    pci: PciCore,
    common: Mutex<Common>,
    isr: AtomicU8,
    /// Status resets asked for (writes of 0) and done by the thread.
    reset_requested: AtomicU64,
    reset_done: AtomicU64,
    /// Function resets asked for and done (these ignore the reset faults).
    /// Function resets asked for and done (the device thread performs them).
    flr: crate::pci::ResetHandshake,
    thread: OnceLock<Thread>,
    stop: AtomicBool,
    faults: Mutex<FaultState>,
    loopback: AtomicBool,
    capture: AtomicBool,
    rx_backlog: Mutex<VecDeque<Vec<u8>>>,
    sent: Mutex<VecDeque<Vec<u8>>>,
    stats: Counters,
}

impl Shared {
    fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    fn common(&self) -> MutexGuard<'_, Common> {
        lock(&self.common)
    }

    fn faults(&self) -> MutexGuard<'_, FaultState> {
        lock(&self.faults)
    }

    fn resetting(&self) -> bool {
        self.reset_done.load(Ordering::Acquire) < self.reset_requested.load(Ordering::Acquire)
    }

    /// Queues a frame for RX; false if the backlog is full (the frame is dropped).
    fn queue_rx(&self, frame: Vec<u8>) -> bool {
        let mut backlog = lock(&self.rx_backlog);
        if backlog.len() >= RX_BACKLOG {
            self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        backlog.push_back(frame);
        true
    }

    /// The config-space image the driver sees: the PCI core's plus the virtio capabilities.
    fn config_image(&self) -> Result<[u8; 256], DeviceError> {
        let mut s = [0u8; 256];
        self.pci.read_config(0, &mut s)?;
        let caps = self.faults().caps;
        write_virtio_caps(&mut s, caps);
        Ok(s)
    }
}

/// Where the first virtio capability sits.
const FIRST_VIRTIO_CAP: usize = 0x50;

/// Writes the four virtio capabilities after the MSI-X one, broken as `corruption` says.
fn write_virtio_caps(s: &mut [u8; 256], corruption: Option<CapCorruption>) {
    // (at, cfg_type, offset, length, notify multiplier)
    let caps: [(usize, u8, u32, u32, Option<u32>); 4] = [
        (0x50, 1, bar::COMMON as u32, bar::COMMON_LEN as u32, None),
        (0x60, 3, bar::ISR as u32, bar::ISR_LEN as u32, None),
        (
            0x70,
            4,
            bar::DEVICE_CFG as u32,
            bar::DEVICE_CFG_LEN as u32,
            None,
        ),
        (
            0x80,
            2,
            bar::NOTIFY as u32,
            bar::NOTIFY_LEN as u32,
            Some(bar::NOTIFY_MULTIPLIER),
        ),
    ];
    s[usize::from(MSIX_CAP_OFFSET) + 1] = FIRST_VIRTIO_CAP as u8;
    for (i, &(at, cfg_type, offset, length, mult)) in caps.iter().enumerate() {
        let next = caps.get(i + 1).map_or(0, |c| c.0 as u8);
        s[at] = config::CAP_VENDOR;
        s[at + 1] = next;
        s[at + 2] = if mult.is_some() { 20 } else { 16 };
        s[at + 3] = cfg_type;
        s[at + 4] = 0; // BAR0
        s[at + 5] = 0; // id
        s[at + 8..at + 12].copy_from_slice(&offset.to_le_bytes());
        s[at + 12..at + 16].copy_from_slice(&length.to_le_bytes());
        if let Some(m) = mult {
            s[at + 16..at + 20].copy_from_slice(&m.to_le_bytes());
        }
    }
    match corruption {
        None => {}
        Some(CapCorruption::Loop) => s[0x81] = FIRST_VIRTIO_CAP as u8,
        Some(CapCorruption::IntoHeader) => s[usize::from(MSIX_CAP_OFFSET) + 1] = 0x10,
        Some(CapCorruption::NoCommon) => s[0x53] = 0x0f,
        Some(CapCorruption::CommonOutsideBar) => {
            s[0x58..0x5c].copy_from_slice(&(bar::BAR_BYTES as u32).to_le_bytes())
        }
    }
}

/// An emulated virtio-net function. See the module docs. Dropping it stops its thread.
///
/// ```
/// use tidepool::device::PciDevice;
/// use tidepool_emu::{EmuVirtioNet, EmuVirtioNetConfig};
/// let nic = EmuVirtioNet::new(EmuVirtioNetConfig::default()).unwrap();
/// assert_eq!(nic.read_config_u16(0).unwrap(), 0x1af4);
/// assert_eq!(nic.read_config_u16(2).unwrap(), 0x1041);
/// // MSI-X, then the four virtio capabilities.
/// assert_eq!(nic.capabilities().unwrap().len(), 5);
/// ```
#[derive(Debug)]
pub struct EmuVirtioNet {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl EmuVirtioNet {
    /// A function in its own new IOMMU domain.
    pub fn new(cfg: EmuVirtioNetConfig) -> Result<EmuVirtioNet, DeviceError> {
        EmuVirtioNet::with_iommu(cfg, Arc::new(EmuIommu::new()))
    }

    /// A function whose DMA goes through `iommu` (several devices may share a domain).
    pub fn with_iommu(
        cfg: EmuVirtioNetConfig,
        iommu: Arc<EmuIommu>,
    ) -> Result<EmuVirtioNet, DeviceError> {
        cfg.validate()?;
        let identity = PciIdentity {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID,
            class_code: NET_CLASS_CODE,
            msix_vectors: cfg.msix_vectors,
            msix_bar: 0,
            msix_table_offset: bar::MSIX_TABLE as u32,
            msix_pba_offset: bar::MSIX_PBA as u32,
        };
        let shared = Arc::new(Shared {
            pci: PciCore::new(identity, iommu),
            common: Mutex::new(Common::new(cfg.queue_size)),
            isr: AtomicU8::new(0),
            reset_requested: AtomicU64::new(0),
            reset_done: AtomicU64::new(0),
            flr: crate::pci::ResetHandshake::default(),
            thread: OnceLock::new(),
            stop: AtomicBool::new(false),
            faults: Mutex::default(),
            loopback: AtomicBool::new(cfg.loopback),
            capture: AtomicBool::new(cfg.capture_tx),
            rx_backlog: Mutex::default(),
            sent: Mutex::default(),
            stats: Counters::default(),
            cfg,
        });
        let dev = device::Device::new(shared.clone());
        let thread = std::thread::Builder::new()
            .name("emu-virtio-net".into())
            .spawn(move || dev.run())
            .map_err(|e| DeviceError::Os {
                what: "spawning the emulated virtio-net device thread",
                source: e,
            })?;
        let _ = shared.thread.set(thread.thread().clone());
        Ok(EmuVirtioNet {
            shared,
            thread: Some(thread),
        })
    }

    /// The fault-injection handle.
    pub fn faults(&self) -> VnetFaults {
        VnetFaults {
            shared: self.shared.clone(),
        }
    }

    /// The IOMMU domain the device's DMA goes through.
    pub fn iommu(&self) -> &Arc<EmuIommu> {
        self.shared.pci.iommu()
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &EmuVirtioNetConfig {
        &self.shared.cfg
    }

    /// Queues `frame` for delivery on RX (as if it arrived from the wire). False if the
    /// backlog is full and the frame was dropped. A reset drops queued frames.
    pub fn inject_rx(&self, frame: &[u8]) -> bool {
        let ok = self.shared.queue_rx(frame.to_vec());
        self.shared.wake();
        ok
    }

    /// Frames queued for RX and not yet written into a buffer.
    pub fn rx_backlog(&self) -> usize {
        lock(&self.shared.rx_backlog).len()
    }

    /// Turns the TX → RX loopback on or off.
    pub fn set_loopback(&self, on: bool) {
        self.shared.loopback.store(on, Ordering::Release);
    }

    /// Turns the capture of sent frames on or off.
    pub fn set_capture(&self, on: bool) {
        self.shared.capture.store(on, Ordering::Release);
    }

    /// Takes the captured sent frames (oldest first; at most [`SENT_LOG`] are kept).
    pub fn take_sent(&self) -> Vec<Vec<u8>> {
        lock(&self.shared.sent).drain(..).collect()
    }

    /// Sets the link state in the device configuration (VIRTIO_NET_S_LINK_UP), bumps the
    /// configuration generation and signals the configuration vector.
    pub fn set_link(&self, up: bool) {
        let vector = {
            let mut c = self.shared.common();
            c.link_up = up;
            c.config_generation = c.config_generation.wrapping_add(1);
            c.msix_config
        };
        if vector != NO_VECTOR {
            self.shared.pci.signal(vector);
        } else {
            self.shared.isr.fetch_or(2, Ordering::AcqRel);
        }
    }

    /// The device status register as the device holds it (not the in-reset value).
    pub fn device_status(&self) -> u8 {
        self.shared.common().status
    }

    /// The features the driver wrote (whether or not FEATURES_OK was accepted).
    pub fn driver_features(&self) -> u64 {
        self.shared.common().driver_features
    }

    /// The counters.
    pub fn stats(&self) -> EmuVirtioNetStats {
        let s = &self.shared;
        let faults = s.pci.iommu().faults();
        let pci = s.pci.stats();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EmuVirtioNetStats {
            iommu_faults: faults.count,
            last_fault_iova: faults.last_iova,
            dma_refused: pci.dma_refused,
            dma_after_bus_master_off: pci.dma_after_bus_master_off,
            interrupts: pci.interrupts,
            notifications: get(&s.stats.notifications),
            tx_frames: get(&s.stats.tx_frames),
            tx_runts: get(&s.stats.tx_runts),
            rx_frames: get(&s.stats.rx_frames),
            rx_dropped: get(&s.stats.rx_dropped),
            used_corrupted: get(&s.stats.used_corrupted),
            resets: get(&s.stats.resets),
            device_errors: get(&s.stats.device_errors),
        }
    }
}

impl Drop for EmuVirtioNet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the emulated virtio-net device thread panicked");
            }
        }
    }
}

impl PciDevice for EmuVirtioNet {
    fn name(&self) -> &str {
        "emulated virtio-net device"
    }

    fn read_config(&self, offset: u16, buf: &mut [u8]) -> Result<(), DeviceError> {
        let start = usize::from(offset);
        if start + buf.len() > usize::from(config::SPACE_BYTES) {
            return Err(DeviceError::BadAccess {
                what: "PCI config space",
                offset: u64::from(offset),
                width: buf.len() as u64,
                size: u64::from(config::SPACE_BYTES),
            });
        }
        let image = self.shared.config_image()?;
        buf.copy_from_slice(&image[start..start + buf.len()]);
        Ok(())
    }

    /// Writes go to the PCI core, which keeps only COMMAND's and MSI-X control's writable
    /// bits; the virtio capabilities are read-only.
    fn write_config(&self, offset: u16, buf: &[u8]) -> Result<(), DeviceError> {
        self.shared.pci.write_config(offset, buf)
    }

    fn map_bar(&self, index: u8) -> Result<Arc<dyn Mmio>, DeviceError> {
        if index != 0 {
            return Err(DeviceError::Unsupported(format!(
                "the emulated virtio-net device has only BAR0, not BAR{index}"
            )));
        }
        Ok(Arc::new(bar::VnetBar {
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

    /// Resets the device on its thread (ignoring the reset faults, as an FLR would) and waits
    /// for it: when this returns the device does no DMA until it is brought up again.
    fn function_reset(&self) -> Result<(), DeviceError> {
        self.shared.pci.check_function_reset()?;
        let s = &self.shared;
        s.flr
            .request_and_wait(|| s.wake(), "emulated virtio-net device")
    }

    fn dma_view(&self) -> Result<Arc<dyn DeviceView>, DeviceError> {
        Ok(self.shared.pci.iommu().clone())
    }
}

/// Fault injection for one [`EmuVirtioNet`]; each fault is applied by the device thread
/// through the real protocol.
#[derive(Clone, Debug)]
pub struct VnetFaults {
    shared: Arc<Shared>,
}

impl VnetFaults {
    fn arm(&self, f: impl FnOnce(&mut FaultState)) {
        f(&mut self.shared.faults());
        self.shared.wake();
    }

    /// Breaks the next used entry the device writes on `queue` (after earlier armed ones).
    pub fn corrupt_next_used(&self, queue: u16, how: UsedCorruption) {
        self.arm(|f| {
            if let Some(q) = f.corrupt.get_mut(usize::from(queue)) {
                q.push_back(how);
            }
        });
    }

    /// While `stall` is set the device takes nothing off `queue`: buffers posted there are
    /// never completed (TX frames never sent, RX buffers never filled).
    pub fn stall_queue(&self, queue: u16, stall: bool) {
        self.arm(|f| {
            if let Some(s) = f.stalled.get_mut(usize::from(queue)) {
                *s = stall;
            }
        });
    }

    /// Every reset (write of status 0) completes `delay` after it was asked for
    /// (`Duration::ZERO`: at once).
    pub fn delay_reset(&self, delay: Duration) {
        self.arm(|f| f.reset_delay = delay);
    }

    /// While set, resets asked for by writing status 0 never complete: status keeps reading
    /// DEVICE_NEEDS_RESET and the device does nothing. Clearing it lets them complete.
    pub fn stall_reset(&self, stall: bool) {
        self.arm(|f| f.reset_stalled = stall);
    }

    /// Breaks the capability list in config space (`None`: repairs it).
    pub fn corrupt_capabilities(&self, how: Option<CapCorruption>) {
        self.arm(|f| f.caps = how);
    }

    /// The next COMMAND write that clears bus mastering leaves it set.
    pub fn fail_next_bus_master_clear(&self) {
        self.shared.pci.fail_next_bus_master_clear();
    }

    /// Makes [`PciDevice::function_reset`] fail while `fail` is set.
    pub fn fail_function_reset(&self, fail: bool) {
        self.shared.pci.set_fail_function_reset(fail);
    }

    /// Disarms every fault armed here (bus-master and function-reset faults are left).
    pub fn clear(&self) {
        self.arm(|f| *f = FaultState::default());
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves only emulator state behind; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
