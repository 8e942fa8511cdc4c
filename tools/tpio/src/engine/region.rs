//! Page-aligned anonymous memory for buffer slots.
//!
//! O_DIRECT needs buffers aligned to the logical block size; a private anonymous mapping is page
//! aligned, zero filled and returned to the kernel on drop. Slots are laid out back to back with a
//! stride rounded up to 4 KiB so every slot starts page aligned.

use std::ptr::NonNull;

use super::{EngineError, SlotBuffer};

/// The alignment of each slot.
const SLOT_ALIGN: usize = 4096;

/// `slots` buffers of `slot_bytes` each in one anonymous mapping.
#[derive(Debug)]
pub struct SlotRegion {
    base: NonNull<u8>,
    mapped_bytes: usize,
    stride: usize,
    slot_bytes: usize,
    slots: u32,
}

// SAFETY: the region is plain memory owned by this value; moving it to another thread moves the
// ownership, and nothing else holds the pointer except engines that live in the same value.
unsafe impl Send for SlotRegion {}

impl SlotRegion {
    /// Maps `slots * round_up(slot_bytes, 4096)` bytes of zeroed anonymous memory.
    pub fn new(slots: u32, slot_bytes: u32) -> Result<Self, EngineError> {
        let slot_bytes = slot_bytes as usize;
        let stride = slot_bytes.div_ceil(SLOT_ALIGN).max(1) * SLOT_ALIGN;
        let mapped_bytes = stride.checked_mul(slots as usize).ok_or_else(|| {
            EngineError::Misuse(format!("{slots} slots of {slot_bytes} bytes overflow"))
        })?;
        let base = map_anonymous(mapped_bytes)?;
        Ok(SlotRegion {
            base,
            mapped_bytes,
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

    /// The buffer of `slot`, or a misuse error when it is out of range.
    pub fn slot(&self, slot: u32) -> Result<SlotBuffer, EngineError> {
        if slot >= self.slots {
            return Err(EngineError::Misuse(format!(
                "slot {slot} out of range (have {})",
                self.slots
            )));
        }
        let offset = self.stride * slot as usize;
        // `wrapping_add` keeps this safe code; the offset is inside the mapping by the check above.
        let ptr = self.base.as_ptr().wrapping_add(offset);
        let ptr = NonNull::new(ptr).ok_or_else(|| EngineError::Misuse("null slot".into()))?;
        Ok(SlotBuffer {
            ptr,
            len: self.slot_bytes,
        })
    }
}

/// Maps `bytes` of private anonymous read/write memory.
fn map_anonymous(bytes: usize) -> Result<NonNull<u8>, EngineError> {
    // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes.max(1),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(EngineError::Setup {
            what: "mmap of the I/O buffers",
            source: std::io::Error::last_os_error(),
        });
    }
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| EngineError::Setup {
        what: "mmap of the I/O buffers",
        source: std::io::Error::other("mmap returned null"),
    })
}

impl Drop for SlotRegion {
    /// Unmaps the region. Engines drop it only after every I/O using it has completed.
    fn drop(&mut self) {
        // SAFETY: `base`/`mapped_bytes` are exactly what `map_anonymous` returned, unmapped once.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.mapped_bytes.max(1));
        }
    }
}
