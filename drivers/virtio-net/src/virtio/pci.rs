//! The virtio 1.x PCI transport (§4.1) over a PCI function reached through the device seam
//! ([`tidepool::device::PciDevice`]: VFIO, or an emulated device in tests).
//!
//! ## Capability walk (§4.1.4)
//! PCI config space holds a linked list of capabilities from the pointer at 0x34. Virtio's are
//! vendor-specific (id 0x09) and name a structure: `cfg_type` (1 common, 2 notify, 3 ISR,
//! 4 device, 5 PCI-cfg access), the BAR it lives in, its offset and length. The walk is
//! bounded (at most 48 entries, pointers inside 0x40..0x100, dword aligned), so a malformed or
//! looping list ends in [`VirtioError::BadCapability`], never a hang. The first capability of
//! each type wins (§4.1.4.1: the driver SHOULD use the first it can). Each BAR is mapped once
//! and shared by the [`MmioWindow`]s over it.
//!
//! ## Locking
//! None: [`VirtioPci`] is owned by one driver; register accesses are single volatile
//! loads/stores. Methods that select a queue (`queue_select` then queue registers) take
//! `&mut self` so two of them cannot interleave.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool::device::{Mmio, PciDevice};
use tidepool::DeviceAddr;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioWindow;
use super::{features, status, VirtioError};

/// PCI vendor id of virtio devices.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern device ids are 0x1040 + the virtio device type.
pub const MODERN_ID_BASE: u16 = 0x1040;
/// "No MSI-X vector" in `msix_config` / `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;

// Common configuration structure offsets (§4.1.4.3).
const DEVICE_FEATURE_SELECT: usize = 0x00;
const DEVICE_FEATURE: usize = 0x04;
const DRIVER_FEATURE_SELECT: usize = 0x08;
const DRIVER_FEATURE: usize = 0x0c;
const MSIX_CONFIG: usize = 0x10;
const NUM_QUEUES: usize = 0x12;
const DEVICE_STATUS: usize = 0x14;
const CONFIG_GENERATION: usize = 0x15;
const QUEUE_SELECT: usize = 0x16;
const QUEUE_SIZE: usize = 0x18;
const QUEUE_MSIX_VECTOR: usize = 0x1a;
const QUEUE_ENABLE: usize = 0x1c;
const QUEUE_NOTIFY_OFF: usize = 0x1e;
const QUEUE_DESC: usize = 0x20;
const QUEUE_DRIVER: usize = 0x28;
const QUEUE_DEVICE: usize = 0x30;
const COMMON_CFG_LEN: usize = 0x38;

const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

/// One virtio structure found by the capability walk.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CapInfo {
    /// `cfg_type`: 1 common, 2 notify, 3 ISR, 4 device.
    pub cfg_type: u8,
    /// BAR index.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u32,
    /// Length in bytes.
    pub length: u32,
    /// Notify capability only: `notify_off_multiplier`.
    pub notify_multiplier: u32,
}

/// Walks the capability list of a 256-byte config-space image and returns the virtio
/// structures (first of each type). Pure and bounded: a malformed list is an error.
pub fn parse_virtio_caps(config: &[u8]) -> Result<Vec<CapInfo>, VirtioError> {
    let bad = |why: String| VirtioError::BadCapability(why);
    let byte = |off: usize| config.get(off).copied();
    let dword = |off: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            config.get(off..off + 4)?.try_into().ok()?,
        ))
    };
    let status_reg = config
        .get(0x06..0x08)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or_else(|| bad("config space shorter than its header".into()))?;
    if status_reg & (1 << 4) == 0 {
        return Err(bad("the function has no PCI capability list".into()));
    }
    let mut ptr = byte(0x34).ok_or_else(|| bad("no capability pointer".into()))? as usize & !3;
    let mut found: Vec<CapInfo> = Vec::new();
    let mut steps = 0;
    while ptr != 0 {
        steps += 1;
        if steps > 48 || !(0x40..0x100).contains(&ptr) {
            return Err(bad(format!(
                "capability list is malformed (pointer {ptr:#x} after {steps} entries)"
            )));
        }
        let id = byte(ptr).ok_or_else(|| bad("capability out of bounds".into()))?;
        let next = byte(ptr + 1).ok_or_else(|| bad("capability out of bounds".into()))? as usize;
        if id == 0x09 {
            let cap_len = byte(ptr + 2).unwrap_or(0) as usize;
            let cfg_type = byte(ptr + 3).unwrap_or(0);
            if cap_len >= 16 && (CAP_COMMON..=CAP_DEVICE).contains(&cfg_type) {
                let bar = byte(ptr + 4).unwrap_or(0xff);
                let offset = dword(ptr + 8).ok_or_else(|| bad("virtio cap truncated".into()))?;
                let length = dword(ptr + 12).ok_or_else(|| bad("virtio cap truncated".into()))?;
                let notify_multiplier = if cfg_type == CAP_NOTIFY {
                    if cap_len < 20 {
                        return Err(bad("notify capability shorter than 20 bytes".into()));
                    }
                    dword(ptr + 16).ok_or_else(|| bad("notify cap truncated".into()))?
                } else {
                    0
                };
                if bar <= 5 && !found.iter().any(|c| c.cfg_type == cfg_type) {
                    found.push(CapInfo {
                        cfg_type,
                        bar,
                        offset,
                        length,
                        notify_multiplier,
                    });
                }
            }
        }
        ptr = next & !3;
    }
    Ok(found)
}

/// The notification doorbell of one queue: a 16-bit register in the notify structure.
#[derive(Clone, Debug)]
pub struct Notifier {
    window: MmioWindow,
    offset: usize,
    queue: u16,
}

impl Notifier {
    /// Tells the device that queue `queue` has new available buffers (writes its index to the
    /// doorbell). One MMIO store; never fails after construction checked the address.
    pub fn notify(&self) {
        // The offset was checked in `VirtioPci::notifier`; an error here is impossible, and a
        // missed doorbell is recovered by the next one.
        let _ = self.window.write16(self.offset, self.queue);
    }
}

/// A virtio 1.x PCI device, its structures mapped.
pub struct VirtioPci {
    device: Arc<dyn PciDevice>,
    common: MmioWindow,
    notify: MmioWindow,
    notify_multiplier: u32,
    isr: Option<MmioWindow>,
    device_cfg: Option<MmioWindow>,
    device_type: u16,
    msix: Vec<EventFd>,
}

impl std::fmt::Debug for VirtioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPci")
            .field("device", &self.device)
            .field("device_type", &self.device_type)
            .finish_non_exhaustive()
    }
}

impl VirtioPci {
    /// Checks that `device` is a modern virtio device of type `want_type` (1 net, 2 blk, ...;
    /// a transitional device 1af4:1000-103f is accepted when its subsystem id says so and it
    /// has the modern capabilities), walks its capabilities and maps their BARs. Touches no
    /// device state (no reset): call [`VirtioPci::reset`] next. Blocking; setup only.
    pub fn open(
        device: Arc<dyn PciDevice>,
        want_type: u16,
        want_name: &'static str,
    ) -> Result<VirtioPci, VirtioError> {
        let vendor = device.read_config_u16(tidepool::device::config::VENDOR_ID)?;
        let id = device.read_config_u16(tidepool::device::config::DEVICE_ID)?;
        let device_type = if vendor != VIRTIO_VENDOR {
            None
        } else if id >= MODERN_ID_BASE {
            Some(id - MODERN_ID_BASE)
        } else if (0x1000..0x1040).contains(&id) {
            Some(device.read_config_u16(0x2e)?)
        } else {
            None
        };
        if device_type != Some(want_type) {
            return Err(VirtioError::WrongDevice {
                bdf: device.name().to_string(),
                vendor,
                device: id,
                want: want_name,
                want_id: MODERN_ID_BASE + want_type,
            });
        }
        let mut config = [0u8; 256];
        device.read_config(0, &mut config)?;
        let caps = parse_virtio_caps(&config)?;
        let find = |t: u8| caps.iter().find(|c| c.cfg_type == t).copied();
        let mut bars: HashMap<u8, Arc<dyn Mmio>> = HashMap::new();
        let mut window = |cap: CapInfo, what: &'static str| -> Result<MmioWindow, VirtioError> {
            let bar = match bars.get(&cap.bar) {
                Some(b) => Arc::clone(b),
                None => {
                    let b = device.map_bar(cap.bar)?;
                    bars.insert(cap.bar, Arc::clone(&b));
                    b
                }
            };
            MmioWindow::new(bar, cap.offset as usize, cap.length as usize, what)
        };
        let common_cap = find(CAP_COMMON)
            .ok_or_else(|| VirtioError::BadCapability("no common configuration".into()))?;
        if (common_cap.length as usize) < COMMON_CFG_LEN {
            return Err(VirtioError::BadCapability(format!(
                "common configuration is {} bytes, needs {COMMON_CFG_LEN}",
                common_cap.length
            )));
        }
        let notify_cap = find(CAP_NOTIFY)
            .ok_or_else(|| VirtioError::BadCapability("no notify structure".into()))?;
        let common = window(common_cap, "common config")?;
        let notify = window(notify_cap, "notify")?;
        let isr = find(CAP_ISR).map(|c| window(c, "ISR")).transpose()?;
        let device_cfg = find(CAP_DEVICE)
            .map(|c| window(c, "device config"))
            .transpose()?;
        Ok(VirtioPci {
            device,
            common,
            notify,
            notify_multiplier: notify_cap.notify_multiplier,
            isr,
            device_cfg,
            device_type: want_type,
            msix: Vec::new(),
        })
    }

    /// The PCI function underneath.
    pub fn device(&self) -> &Arc<dyn PciDevice> {
        &self.device
    }

    /// The virtio device type (1 net, 2 blk, ...).
    pub fn device_type(&self) -> u16 {
        self.device_type
    }

    /// The device status register.
    pub fn status(&self) -> Result<u8, VirtioError> {
        self.common.read8(DEVICE_STATUS)
    }

    /// Sets status bits (read-modify-write; status bits are only ever added until reset).
    pub fn add_status(&self, bits: u8) -> Result<(), VirtioError> {
        let now = self.status()?;
        self.common.write8(DEVICE_STATUS, now | bits)
    }

    /// Marks the device FAILED (best effort: used on error paths).
    pub fn fail(&self) {
        let _ = self.add_status(status::FAILED);
    }

    /// Resets the device by writing status 0 and waiting (polling every 50 µs) until it reads
    /// back 0 (§4.1.4.3.2), at most `timeout`. After it returns Ok the device does no more DMA
    /// and has forgotten every queue, so ring and buffer memory may be freed. Blocking.
    pub fn reset(&self, timeout: Duration) -> Result<(), VirtioError> {
        self.common.write8(DEVICE_STATUS, 0)?;
        let start = Instant::now();
        loop {
            let s = self.status()?;
            if s == 0 {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(VirtioError::ResetTimeout(timeout, s));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// The 64-bit feature set the device offers.
    pub fn device_features(&self) -> Result<u64, VirtioError> {
        self.common.write32(DEVICE_FEATURE_SELECT, 0)?;
        let lo = self.common.read32(DEVICE_FEATURE)?;
        self.common.write32(DEVICE_FEATURE_SELECT, 1)?;
        let hi = self.common.read32(DEVICE_FEATURE)?;
        Ok(u64::from(lo) | (u64::from(hi) << 32))
    }

    /// Feature negotiation after a reset: sets ACKNOWLEDGE and DRIVER, accepts
    /// `offered & (required | wanted) & !refused`, sets FEATURES_OK and checks the device kept
    /// it. `required` features the device does not offer are an error naming the feature
    /// (VIRTIO_F_ACCESS_PLATFORM gets its own, [`VirtioError::AccessPlatformMissing`]).
    /// `refused` lets a caller decline features it would otherwise accept (diagnostics: it is
    /// how the "device refuses our features" path is tested). Returns the accepted set.
    pub fn negotiate(&self, required: u64, wanted: u64, refused: u64) -> Result<u64, VirtioError> {
        self.add_status(status::ACKNOWLEDGE)?;
        self.add_status(status::DRIVER)?;
        let offered = self.device_features()?;
        let missing = required & !offered;
        if missing & features::ACCESS_PLATFORM != 0 {
            self.fail();
            return Err(VirtioError::AccessPlatformMissing);
        }
        if missing & features::VERSION_1 != 0 {
            self.fail();
            return Err(VirtioError::MissingFeature {
                name: "VIRTIO_F_VERSION_1",
                bit: 32,
                hint: "this driver speaks virtio 1.x only; use a modern device (QEMU: disable-legacy=on)",
            });
        }
        if missing != 0 {
            self.fail();
            return Err(VirtioError::MissingFeature {
                name: "a required feature",
                bit: missing.trailing_zeros(),
                hint: "use a device that offers it",
            });
        }
        let accepted = offered & (required | wanted) & !refused;
        self.common.write32(DRIVER_FEATURE_SELECT, 0)?;
        self.common.write32(DRIVER_FEATURE, accepted as u32)?;
        self.common.write32(DRIVER_FEATURE_SELECT, 1)?;
        self.common
            .write32(DRIVER_FEATURE, (accepted >> 32) as u32)?;
        self.add_status(status::FEATURES_OK)?;
        if self.status()? & status::FEATURES_OK == 0 {
            self.fail();
            return Err(VirtioError::FeaturesRejected { offered, accepted });
        }
        Ok(accepted)
    }

    /// Sets DRIVER_OK: the device may now use the queues. Checks DEVICE_NEEDS_RESET.
    pub fn driver_ok(&self) -> Result<(), VirtioError> {
        self.add_status(status::DRIVER_OK)?;
        let s = self.status()?;
        if s & (status::DEVICE_NEEDS_RESET | status::FAILED) != 0 {
            return Err(VirtioError::NeedsReset(s));
        }
        Ok(())
    }

    /// How many virtqueues the device has.
    pub fn num_queues(&self) -> Result<u16, VirtioError> {
        self.common.read16(NUM_QUEUES)
    }

    /// The largest size queue `queue` supports (0: the queue does not exist).
    pub fn max_queue_size(&mut self, queue: u16) -> Result<u16, VirtioError> {
        self.common.write16(QUEUE_SELECT, queue)?;
        self.common.read16(QUEUE_SIZE)
    }

    /// Programs queue `queue`: its size, the device addresses of its descriptor table, driver
    /// (available) and device (used) rings, and its MSI-X vector (or [`NO_VECTOR`]), then
    /// enables it. The device must have accepted the vector (it reads back as written).
    pub fn setup_queue(
        &mut self,
        queue: u16,
        size: u16,
        desc: DeviceAddr,
        driver: DeviceAddr,
        device: DeviceAddr,
        vector: u16,
    ) -> Result<(), VirtioError> {
        let max = self.max_queue_size(queue)?;
        let err = |problem: String| VirtioError::Queue { queue, problem };
        if max == 0 {
            return Err(err("does not exist on this device".into()));
        }
        if size == 0 || size > max || !size.is_power_of_two() {
            return Err(err(format!(
                "size {size} is not a power of two in 1..={max}"
            )));
        }
        self.common.write16(QUEUE_SIZE, size)?;
        self.common.write64_split(QUEUE_DESC, desc.0)?;
        self.common.write64_split(QUEUE_DRIVER, driver.0)?;
        self.common.write64_split(QUEUE_DEVICE, device.0)?;
        self.common.write16(QUEUE_MSIX_VECTOR, vector)?;
        if self.common.read16(QUEUE_MSIX_VECTOR)? != vector {
            return Err(err(format!(
                "the device refused MSI-X vector {vector} (out of vectors?)"
            )));
        }
        self.common.write16(QUEUE_ENABLE, 1)?;
        Ok(())
    }

    /// The doorbell of queue `queue` (select it and read its `queue_notify_off`), checked to
    /// lie inside the notify structure.
    pub fn notifier(&mut self, queue: u16) -> Result<Notifier, VirtioError> {
        self.common.write16(QUEUE_SELECT, queue)?;
        let off = self.common.read16(QUEUE_NOTIFY_OFF)?;
        let offset = usize::from(off) * self.notify_multiplier as usize;
        if offset
            .checked_add(2)
            .is_none_or(|end| end > self.notify.len())
            || offset % 2 != 0
        {
            return Err(VirtioError::Queue {
                queue,
                problem: format!(
                    "notify offset {off} x multiplier {} lies outside the {}-byte notify \
                     structure",
                    self.notify_multiplier,
                    self.notify.len()
                ),
            });
        }
        Ok(Notifier {
            window: self.notify.clone(),
            offset,
            queue,
        })
    }

    /// Routes MSI-X vectors `0..n` to fresh non-blocking eventfds and keeps them; sets the
    /// configuration-change vector to none. Call before [`VirtioPci::setup_queue`] with vectors.
    pub fn enable_msix(&mut self, n: usize) -> Result<(), VirtioError> {
        self.msix = self.device.enable_msix_eventfds(n)?;
        self.common.write16(MSIX_CONFIG, NO_VECTOR)?;
        Ok(())
    }

    /// The eventfd MSI-X vector `vector` signals, if MSI-X is enabled.
    pub fn msix_eventfd(&self, vector: usize) -> Option<&EventFd> {
        self.msix.get(vector)
    }

    /// Reads the ISR status (reading clears it). Only meaningful without MSI-X.
    pub fn read_isr(&self) -> Result<u8, VirtioError> {
        match &self.isr {
            Some(w) => w.read8(0),
            None => Ok(0),
        }
    }

    /// Reads `buf.len()` bytes of the device-specific configuration at `offset`, one byte at a
    /// time, retrying until `config_generation` is stable around the read (§4.1.4.3.1).
    pub fn read_device_config(&self, offset: usize, buf: &mut [u8]) -> Result<(), VirtioError> {
        let cfg = self.device_cfg.as_ref().ok_or_else(|| {
            VirtioError::BadCapability("the device has no device-specific configuration".into())
        })?;
        for _ in 0..100 {
            let before = self.common.read8(CONFIG_GENERATION)?;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = cfg.read8(offset + i)?;
            }
            if self.common.read8(CONFIG_GENERATION)? == before {
                return Ok(());
            }
        }
        Err(VirtioError::BadCapability(
            "device configuration kept changing while being read".into(),
        ))
    }

    /// Stops MSI-X delivery and forgets the eventfds (best effort, for teardown).
    pub fn disable_msix(&mut self) {
        if !self.msix.is_empty() {
            let _ = self.device.disable_msix();
            self.msix.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config space with a capability list built from (id, body) pairs.
    fn config_with(caps: &[(u8, Vec<u8>)]) -> [u8; 256] {
        let mut c = [0u8; 256];
        c[0x06] = 1 << 4;
        let mut at = 0x40;
        c[0x34] = at as u8;
        for (i, (id, body)) in caps.iter().enumerate() {
            c[at] = *id;
            let next = if i + 1 < caps.len() {
                at + 2 + body.len().div_ceil(4) * 4 + 2
            } else {
                0
            };
            let next = (next + 3) & !3;
            c[at + 1] = next as u8;
            c[at + 2..at + 2 + body.len()].copy_from_slice(body);
            at = next;
        }
        c
    }

    fn vcap(cfg_type: u8, bar: u8, offset: u32, length: u32, mult: Option<u32>) -> (u8, Vec<u8>) {
        let mut b = vec![if mult.is_some() { 20 } else { 16 }, cfg_type, bar, 0, 0, 0];
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&length.to_le_bytes());
        if let Some(m) = mult {
            b.extend_from_slice(&m.to_le_bytes());
        }
        (0x09, b)
    }

    #[test]
    fn walks_qemu_layout() {
        // What QEMU 7.2's virtio-net-pci has (notes/virtio-net.md): all in BAR4.
        let c = config_with(&[
            (0x11, vec![0; 10]), // MSI-X, skipped
            vcap(1, 4, 0x0, 0x1000, None),
            vcap(3, 4, 0x1000, 0x1000, None),
            vcap(4, 4, 0x2000, 0x1000, None),
            vcap(2, 4, 0x3000, 0x1000, Some(4)),
        ]);
        let caps = parse_virtio_caps(&c).unwrap();
        assert_eq!(caps.len(), 4);
        let notify = caps.iter().find(|c| c.cfg_type == 2).unwrap();
        assert_eq!(
            (notify.bar, notify.offset, notify.notify_multiplier),
            (4, 0x3000, 4)
        );
        let common = caps.iter().find(|c| c.cfg_type == 1).unwrap();
        assert_eq!((common.offset, common.length), (0, 0x1000));
    }

    #[test]
    fn malformed_lists_are_errors() {
        // A loop: the capability points at itself.
        let mut c = config_with(&[vcap(1, 4, 0, 0x1000, None)]);
        c[0x41] = 0x40;
        assert!(matches!(
            parse_virtio_caps(&c),
            Err(VirtioError::BadCapability(_))
        ));
        // Pointer into the header.
        let mut c = config_with(&[vcap(1, 4, 0, 0x1000, None)]);
        c[0x34] = 0x10;
        assert!(parse_virtio_caps(&c).is_err());
        // No capability list at all.
        let mut c = config_with(&[]);
        c[0x06] = 0;
        assert!(parse_virtio_caps(&c).is_err());
        // Short buffer.
        assert!(parse_virtio_caps(&[0u8; 4]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_config_space_never_panics(bytes in proptest::collection::vec(0u8..=255, 256)) {
            let _ = parse_virtio_caps(&bytes);
        }
    }
}
