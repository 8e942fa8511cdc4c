//! [`MmioWindow`]: a bounds-checked slice of a BAR (the device seam's [`Mmio`]), accessed
//! with single loads and stores of 8, 16 and 32 bits.
//!
//! A virtio PCI capability names a BAR, an offset and a length; every register of that
//! structure must lie inside it. The window checks each access (inside the window, naturally
//! aligned) before touching the mapping, so a device that advertises a bogus capability, or a
//! driver bug, yields [`VirtioError::BadRegister`] instead of a wild access. The BAR is kept
//! alive by an `Arc` for as long as any window over it exists.

use std::sync::Arc;

use tidepool::device::Mmio;

use super::VirtioError;

/// `len` bytes at `offset` inside one mapped BAR.
#[derive(Clone, Debug)]
pub struct MmioWindow {
    bar: Arc<dyn Mmio>,
    offset: usize,
    len: usize,
    what: &'static str,
}

impl MmioWindow {
    /// A window over `bar[offset..offset + len]`, checked against the BAR's size. `what` names
    /// the structure in errors ("common config", "notify", ...).
    pub fn new(
        bar: Arc<dyn Mmio>,
        offset: usize,
        len: usize,
        what: &'static str,
    ) -> Result<MmioWindow, VirtioError> {
        let fits = offset.checked_add(len).is_some_and(|end| end <= bar.len());
        if !fits || len == 0 {
            return Err(VirtioError::BadCapability(format!(
                "{what} structure at offset {offset:#x} (+{len:#x}) does not fit its \
                 {:#x}-byte BAR",
                bar.len()
            )));
        }
        Ok(MmioWindow {
            bar,
            offset,
            len,
            what,
        })
    }

    /// The window's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty windows are refused at construction.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The BAR offset of a `width`-byte register at `offset`, if it lies inside the window
    /// and is naturally aligned.
    fn at(&self, offset: usize, width: usize) -> Result<usize, VirtioError> {
        let fits = offset.checked_add(width).is_some_and(|end| end <= self.len);
        if !fits || offset % width != 0 || (self.offset + offset) % width != 0 {
            return Err(VirtioError::BadRegister {
                what: self.what,
                offset,
                width,
                len: self.len,
            });
        }
        Ok(self.offset + offset)
    }

    /// Reads the 8-bit register at `offset`.
    pub fn read8(&self, offset: usize) -> Result<u8, VirtioError> {
        Ok(self.bar.read8(self.at(offset, 1)?)?)
    }

    /// Writes the 8-bit register at `offset`.
    pub fn write8(&self, offset: usize, value: u8) -> Result<(), VirtioError> {
        Ok(self.bar.write8(self.at(offset, 1)?, value)?)
    }

    /// Reads the little-endian 16-bit register at `offset`.
    pub fn read16(&self, offset: usize) -> Result<u16, VirtioError> {
        Ok(u16::from_le(self.bar.read16(self.at(offset, 2)?)?))
    }

    /// Writes the little-endian 16-bit register at `offset`.
    pub fn write16(&self, offset: usize, value: u16) -> Result<(), VirtioError> {
        Ok(self.bar.write16(self.at(offset, 2)?, value.to_le())?)
    }

    /// Reads the little-endian 32-bit register at `offset`.
    pub fn read32(&self, offset: usize) -> Result<u32, VirtioError> {
        Ok(u32::from_le(self.bar.read32(self.at(offset, 4)?)?))
    }

    /// Writes the little-endian 32-bit register at `offset`.
    pub fn write32(&self, offset: usize, value: u32) -> Result<(), VirtioError> {
        Ok(self.bar.write32(self.at(offset, 4)?, value.to_le())?)
    }

    /// Writes a 64-bit register as two 32-bit stores, low half first (virtio 1.x §4.1.3.1
    /// allows this for the common configuration's 64-bit fields).
    pub fn write64_split(&self, offset: usize, value: u64) -> Result<(), VirtioError> {
        self.write32(offset, value as u32)?;
        self.write32(offset + 4, (value >> 32) as u32)
    }
}
