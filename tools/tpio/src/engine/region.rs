//! Page-aligned anonymous memory for buffer slots.
//!
//! O_DIRECT needs buffers aligned to the logical block size; a private anonymous mapping
//! (`memmap2`) is page aligned, zero filled and returned to the kernel on drop. Slots are laid
//! out back to back with a stride rounded up to 4 KiB so every slot starts page aligned.
//!
//! The region hands out copies in and out of a slot ([`SlotRegion::fill`], [`SlotRegion::read`])
//! and, for io_uring's registration, the slots' addresses ([`SlotRegion::iovecs`]). Which slots
//! a kernel may be using is the engine's bookkeeping: it refuses copies of a slot in flight.

use memmap2::MmapMut;

use super::EngineError;

/// The alignment of each slot.
const SLOT_ALIGN: usize = 4096;

/// `slots` buffers of `slot_bytes` each in one anonymous mapping.
#[derive(Debug)]
pub struct SlotRegion {
    map: MmapMut,
    stride: usize,
    slot_bytes: usize,
    slots: u32,
}

impl SlotRegion {
    /// Maps `slots * round_up(slot_bytes, 4096)` bytes of zeroed anonymous memory.
    pub fn new(slots: u32, slot_bytes: u32) -> Result<Self, EngineError> {
        let slot_bytes = slot_bytes as usize;
        let stride = slot_bytes.div_ceil(SLOT_ALIGN).max(1) * SLOT_ALIGN;
        let mapped_bytes = stride.checked_mul(slots as usize).ok_or_else(|| {
            EngineError::Misuse(format!("{slots} slots of {slot_bytes} bytes overflow"))
        })?;
        let map = MmapMut::map_anon(mapped_bytes.max(1)).map_err(|source| EngineError::Setup {
            what: "mmap of the I/O buffers",
            source,
        })?;
        Ok(SlotRegion {
            map,
            stride,
            slot_bytes,
            slots,
        })
    }

    /// The number of slots.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Bytes per slot.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// The byte range of `slot` in the mapping, or a misuse error when it is out of range or
    /// `len` exceeds a slot.
    fn range(&self, slot: u32, len: usize) -> Result<std::ops::Range<usize>, EngineError> {
        if slot >= self.slots || len > self.slot_bytes {
            return Err(EngineError::Misuse(format!(
                "slot {slot} ({len} bytes) is out of range (have {} slots of {} bytes)",
                self.slots, self.slot_bytes
            )));
        }
        let start = self.stride * slot as usize;
        Ok(start..start + len)
    }

    /// Copies `data` into the start of `slot`.
    pub fn fill(&mut self, slot: u32, data: &[u8]) -> Result<(), EngineError> {
        let range = self.range(slot, data.len())?;
        self.map[range].copy_from_slice(data);
        Ok(())
    }

    /// Copies the start of `slot` into `out`.
    pub fn read(&self, slot: u32, out: &mut [u8]) -> Result<(), EngineError> {
        let range = self.range(slot, out.len())?;
        out.copy_from_slice(&self.map[range]);
        Ok(())
    }

    /// Each slot's address and length, in slot order: what io_uring registers as fixed
    /// buffers. The addresses stay valid as long as the region lives.
    pub fn iovecs(&mut self) -> Vec<libc::iovec> {
        let base = self.map.as_mut_ptr();
        (0..self.slots as usize)
            .map(|slot| libc::iovec {
                iov_base: base.wrapping_add(slot * self.stride).cast(),
                iov_len: self.slot_bytes,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_page_aligned_zeroed_and_separate() {
        let mut region = SlotRegion::new(3, 5000).unwrap();
        let iovecs = region.iovecs();
        assert_eq!(iovecs.len(), 3);
        for iovec in &iovecs {
            assert_eq!(iovec.iov_base as usize % SLOT_ALIGN, 0);
            assert_eq!(iovec.iov_len, 5000);
        }
        region.fill(1, &[7u8; 5000]).unwrap();
        let mut out = vec![1u8; 5000];
        region.read(0, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
        region.read(1, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 7));
        assert!(region.fill(3, &[0]).is_err());
        assert!(region.read(0, &mut vec![0u8; 5001]).is_err());
    }
}
