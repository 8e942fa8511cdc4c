//! BAR0 of the emulated virtio-net function: the common configuration (§4.1.4.3), ISR
//! (§4.1.4.5), device configuration (§5.1.4), notify (§4.1.4.4) regions and the MSI-X table.
//!
//! Register accesses are served under the common-configuration lock; the device thread acts
//! on what they leave (status, queue setup, doorbells) asynchronously, as hardware does. With
//! COMMAND's memory-decode bit clear, reads return all ones and writes are dropped. Accesses
//! of the wrong width for a register read 0 and are ignored when written (logged).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tidepool::device::{check_access, DeviceError, Mmio};

use super::{status, Shared, NO_VECTOR, NUM_QUEUES};

/// BAR0 size.
pub(crate) const BAR_BYTES: usize = 0x8000;
/// The common configuration.
pub(crate) const COMMON: usize = 0x0000;
pub(crate) const COMMON_LEN: usize = 0x38;
/// The ISR status byte.
pub(crate) const ISR: usize = 0x1000;
pub(crate) const ISR_LEN: usize = 4;
/// The device-specific configuration (MAC, status, max_virtqueue_pairs).
pub(crate) const DEVICE_CFG: usize = 0x2000;
pub(crate) const DEVICE_CFG_LEN: usize = 0x10;
/// The notify region: queue q's doorbell at `NOTIFY + NOTIFY_MULTIPLIER * q`.
pub(crate) const NOTIFY: usize = 0x3000;
pub(crate) const NOTIFY_MULTIPLIER: u32 = 4;
pub(crate) const NOTIFY_LEN: usize = NOTIFY_MULTIPLIER as usize * NUM_QUEUES as usize;
/// The MSI-X table and PBA.
pub(crate) const MSIX_TABLE: usize = 0x4000;
pub(crate) const MSIX_PBA: usize = 0x5000;

mod reg {
    pub const DEVICE_FEATURE_SELECT: usize = 0x00;
    pub const DEVICE_FEATURE: usize = 0x04;
    pub const DRIVER_FEATURE_SELECT: usize = 0x08;
    pub const DRIVER_FEATURE: usize = 0x0c;
    pub const MSIX_CONFIG: usize = 0x10;
    pub const NUM_QUEUES: usize = 0x12;
    pub const DEVICE_STATUS: usize = 0x14;
    pub const CONFIG_GENERATION: usize = 0x15;
    pub const QUEUE_SELECT: usize = 0x16;
    pub const QUEUE_SIZE: usize = 0x18;
    pub const QUEUE_MSIX_VECTOR: usize = 0x1a;
    pub const QUEUE_ENABLE: usize = 0x1c;
    pub const QUEUE_NOTIFY_OFF: usize = 0x1e;
    pub const QUEUE_DESC: usize = 0x20;
    pub const QUEUE_DRIVER: usize = 0x28;
    pub const QUEUE_DEVICE: usize = 0x30;
}

/// The mapped BAR0 a driver gets from `map_bar(0)`.
#[derive(Debug)]
pub(crate) struct VnetBar {
    pub(crate) shared: Arc<Shared>,
}

impl VnetBar {
    /// Bounds and alignment; Ok(false) when memory decoding is off.
    fn check(&self, offset: usize, width: usize) -> Result<bool, DeviceError> {
        check_access("BAR", offset as u64, width as u64, BAR_BYTES as u64)?;
        Ok(self.shared.pci.memory_enabled())
    }

    fn read(&self, offset: usize, width: usize) -> Result<u64, DeviceError> {
        if !self.check(offset, width)? {
            return Ok(u64::MAX >> (64 - 8 * width));
        }
        let s = &self.shared;
        Ok(match offset {
            o if o < COMMON + COMMON_LEN => s.read_common(o - COMMON, width),
            // Reading the ISR clears it (§4.1.4.5).
            ISR => u64::from(s.isr.swap(0, Ordering::AcqRel)),
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                let bytes = s.device_config();
                let at = o - DEVICE_CFG;
                (0..width).fold(0u64, |acc, i| {
                    acc | u64::from(bytes.get(at + i).copied().unwrap_or(0)) << (8 * i)
                })
            }
            _ => 0, // notify (write-only), MSI-X table and PBA, gaps
        })
    }

    fn write(&self, offset: usize, width: usize, value: u64) -> Result<(), DeviceError> {
        if !self.check(offset, width)? {
            return Ok(());
        }
        let s = &self.shared;
        match offset {
            o if o < COMMON + COMMON_LEN => s.write_common(o - COMMON, width, value),
            o if (NOTIFY..NOTIFY + NOTIFY_LEN).contains(&o) && width >= 2 => {
                s.stats.notifications.fetch_add(1, Ordering::Relaxed);
                s.wake();
            }
            o => tracing::trace!(
                offset = o,
                width,
                value,
                "write to a read-only or unused BAR0 location ignored"
            ),
        }
        Ok(())
    }
}

impl Shared {
    /// The device configuration bytes: mac, status (LINK_UP), max_virtqueue_pairs = 1.
    fn device_config(&self) -> [u8; DEVICE_CFG_LEN] {
        let link = u16::from(self.common().link_up);
        let mut b = [0u8; DEVICE_CFG_LEN];
        b[0..6].copy_from_slice(&self.cfg.mac);
        b[6..8].copy_from_slice(&link.to_le_bytes());
        b[8..10].copy_from_slice(&1u16.to_le_bytes());
        b
    }

    fn read_common(&self, off: usize, width: usize) -> u64 {
        let c = self.common();
        let q = c.queues.get(usize::from(c.queue_select)).copied();
        let half = |v: u64, high: bool| if high { v >> 32 } else { v & 0xffff_ffff };
        let addr = |base: usize, get: fn(&super::QueueRegs) -> u64| -> Option<u64> {
            let v = q.as_ref().map_or(0, get);
            match (off - base, width) {
                (0, 8) => Some(v),
                (0, 4) => Some(half(v, false)),
                (4, 4) => Some(half(v, true)),
                _ => None,
            }
        };
        let v = match (off, width) {
            (reg::DEVICE_FEATURE_SELECT, 4) => Some(u64::from(c.device_feature_select)),
            (reg::DEVICE_FEATURE, 4) => Some(match c.device_feature_select {
                0 => half(self.cfg.features, false),
                1 => half(self.cfg.features, true),
                _ => 0,
            }),
            (reg::DRIVER_FEATURE_SELECT, 4) => Some(u64::from(c.driver_feature_select)),
            (reg::DRIVER_FEATURE, 4) => Some(match c.driver_feature_select {
                0 => half(c.driver_features, false),
                1 => half(c.driver_features, true),
                _ => 0,
            }),
            (reg::MSIX_CONFIG, 2) => Some(u64::from(c.msix_config)),
            (reg::NUM_QUEUES, 2) => Some(u64::from(NUM_QUEUES)),
            (reg::DEVICE_STATUS, 1) => Some(if self.resetting() {
                u64::from(status::DEVICE_NEEDS_RESET)
            } else {
                u64::from(c.status)
            }),
            (reg::CONFIG_GENERATION, 1) => Some(u64::from(c.config_generation)),
            (reg::QUEUE_SELECT, 2) => Some(u64::from(c.queue_select)),
            (reg::QUEUE_SIZE, 2) => Some(q.map_or(0, |q| u64::from(q.size))),
            (reg::QUEUE_MSIX_VECTOR, 2) => {
                Some(q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.msix_vector)))
            }
            (reg::QUEUE_ENABLE, 2) => Some(q.map_or(0, |q| u64::from(q.enable))),
            (reg::QUEUE_NOTIFY_OFF, 2) => Some(u64::from(c.queue_select)),
            (o, _) if (reg::QUEUE_DESC..reg::QUEUE_DRIVER).contains(&o) => {
                addr(reg::QUEUE_DESC, |q| q.desc)
            }
            (o, _) if (reg::QUEUE_DRIVER..reg::QUEUE_DEVICE).contains(&o) => {
                addr(reg::QUEUE_DRIVER, |q| q.driver)
            }
            (o, _) if o >= reg::QUEUE_DEVICE => addr(reg::QUEUE_DEVICE, |q| q.device),
            _ => None,
        };
        v.unwrap_or_else(|| {
            tracing::debug!(
                offset = off,
                width,
                "common configuration read of the wrong width"
            );
            0
        })
    }

    fn write_common(&self, off: usize, width: usize, value: u64) {
        let mut c = self.common();
        if self.resetting() && !(off == reg::DEVICE_STATUS && value == 0) {
            tracing::debug!(
                offset = off,
                "common configuration write while a reset is in progress ignored"
            );
            return;
        }
        let vectors = self.pci.msix_vectors();
        let vector = |v: u64| {
            let v = v as u16;
            if v < vectors {
                v
            } else {
                NO_VECTOR
            }
        };
        let sel = usize::from(c.queue_select);
        let set_half = |old: u64, high: bool, v: u64| {
            if high {
                (old & 0xffff_ffff) | (v << 32)
            } else {
                (old & !0xffff_ffff) | (v & 0xffff_ffff)
            }
        };
        match (off, width) {
            (reg::DEVICE_FEATURE_SELECT, 4) => c.device_feature_select = value as u32,
            (reg::DRIVER_FEATURE_SELECT, 4) => c.driver_feature_select = value as u32,
            (reg::DRIVER_FEATURE, 4) => {
                if c.status & status::FEATURES_OK != 0 {
                    tracing::debug!("driver features written after FEATURES_OK ignored");
                } else if c.driver_feature_select < 2 {
                    let high = c.driver_feature_select == 1;
                    c.driver_features = set_half(c.driver_features, high, value);
                }
            }
            (reg::MSIX_CONFIG, 2) => c.msix_config = vector(value),
            (reg::DEVICE_STATUS, 1) => {
                let v = value as u8;
                if v == 0 {
                    self.reset_requested.fetch_add(1, Ordering::AcqRel);
                    drop(c);
                    self.wake();
                    return;
                }
                let old = c.status;
                let mut new = v | (old & status::DEVICE_NEEDS_RESET);
                if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
                    if let Err(why) = self.check_features(c.driver_features) {
                        tracing::debug!(
                            features = format_args!("{:#x}", c.driver_features),
                            why,
                            "refusing FEATURES_OK"
                        );
                        new &= !status::FEATURES_OK;
                    }
                }
                c.status = new;
                if new & status::DRIVER_OK != 0 {
                    drop(c);
                    self.wake();
                }
            }
            (reg::QUEUE_SELECT, 2) => c.queue_select = value as u16,
            (reg::QUEUE_SIZE, 2) => {
                let max = self.cfg.queue_size;
                let size = value as u16;
                match c.queues.get_mut(sel) {
                    Some(q) if !q.enable && size.is_power_of_two() && size <= max => q.size = size,
                    _ => tracing::debug!(size, queue = sel, "queue size write refused"),
                }
            }
            (reg::QUEUE_MSIX_VECTOR, 2) => {
                if let Some(q) = c.queues.get_mut(sel) {
                    q.msix_vector = vector(value);
                }
            }
            (reg::QUEUE_ENABLE, 2) => {
                if let Some(q) = c.queues.get_mut(sel) {
                    if value == 1 {
                        q.enable = true;
                    } else {
                        tracing::debug!(queue = sel, value, "queue_enable write of non-1 ignored");
                    }
                }
                drop(c);
                self.wake();
            }
            (o, 4 | 8) if (reg::QUEUE_DESC..reg::QUEUE_DEVICE + 8).contains(&o) => {
                let base = o & !7;
                let high = o % 8 == 4;
                if let Some(q) = c.queues.get_mut(sel) {
                    if q.enable {
                        tracing::debug!(queue = sel, "ring address write to an enabled queue");
                        return;
                    }
                    let field = match base {
                        reg::QUEUE_DESC => &mut q.desc,
                        reg::QUEUE_DRIVER => &mut q.driver,
                        _ => &mut q.device,
                    };
                    *field = if width == 8 {
                        value
                    } else {
                        set_half(*field, high, value)
                    };
                }
            }
            _ => tracing::debug!(
                offset = off,
                width,
                value,
                "common configuration write to a read-only register or of the wrong width"
            ),
        }
    }

    /// Whether the device accepts `features` at FEATURES_OK.
    fn check_features(&self, features: u64) -> Result<(), &'static str> {
        if features & !self.cfg.features != 0 {
            return Err("a feature that was not offered");
        }
        if features & super::F_VERSION_1 == 0 {
            return Err("no VIRTIO_F_VERSION_1 (this device is modern only)");
        }
        if self.cfg.features & super::F_ACCESS_PLATFORM != 0
            && features & super::F_ACCESS_PLATFORM == 0
        {
            return Err("no VIRTIO_F_ACCESS_PLATFORM, which this device behind an IOMMU needs");
        }
        Ok(())
    }
}

impl Mmio for VnetBar {
    fn len(&self) -> usize {
        BAR_BYTES
    }

    fn read32(&self, offset: usize) -> Result<u32, DeviceError> {
        Ok(self.read(offset, 4)? as u32)
    }

    fn write32(&self, offset: usize, value: u32) -> Result<(), DeviceError> {
        self.write(offset, 4, u64::from(value))
    }

    fn read64(&self, offset: usize) -> Result<u64, DeviceError> {
        self.read(offset, 8)
    }

    fn write64(&self, offset: usize, value: u64) -> Result<(), DeviceError> {
        self.write(offset, 8, value)
    }

    fn read16(&self, offset: usize) -> Result<u16, DeviceError> {
        Ok(self.read(offset, 2)? as u16)
    }

    fn write16(&self, offset: usize, value: u16) -> Result<(), DeviceError> {
        self.write(offset, 2, u64::from(value))
    }

    fn read8(&self, offset: usize) -> Result<u8, DeviceError> {
        Ok(self.read(offset, 1)? as u8)
    }

    fn write8(&self, offset: usize, value: u8) -> Result<(), DeviceError> {
        self.write(offset, 1, u64::from(value))
    }
}
