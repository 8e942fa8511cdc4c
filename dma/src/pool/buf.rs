//! [`DmaBuf`]: an owned device-visible buffer.

use std::fmt;
use std::mem::ManuallyDrop;

use crate::copy;
use crate::DeviceAddr;

use super::arena::Block;
use super::{Claim, PoolError, Shared};

/// The size of the pages a device addresses in PRP lists and the like.
pub const DEVICE_PAGE: usize = 4096;

/// An owned buffer in a pool chunk: a CPU address, a device address and a length. Dropping it
/// returns the space to the pool (or to the oldest waiter it fits).
///
/// The device may read or write the buffer whenever its address is in a command, so the buffer
/// offers no safe `&[u8]` view of itself: bytes go in and out by copy ([`DmaBuf::write_at`],
/// [`DmaBuf::read_at`]), through [`crate::copy`]. Code that knows no device is using the buffer
/// may borrow it with the unsafe [`DmaBuf::as_mut_slice`].
///
/// A fresh buffer is zeroed: a device never sees another user's bytes.
pub struct DmaBuf {
    block: Block,
    len: usize,
    /// This buffer's reference to the pool; taken only by `drop`.
    pool: ManuallyDrop<crate::sync::Arc<Shared>>,
}

impl DmaBuf {
    /// Wraps a block just taken from the pool, zeroing the whole block (the rounded-up tail
    /// too: the device may see it) unless it carries the pre-zeroed mark.
    #[inline(always)]
    pub(crate) fn new_zeroed(claim: Claim, len: usize) -> DmaBuf {
        let block = &claim.block;
        if !block.zeroed() {
            // SAFETY: we own the block exclusively and no device has its address yet.
            unsafe { copy::zero_device(block.ptr.as_ptr(), block.size()) };
        }
        DmaBuf::new_unzeroed(claim, len)
    }

    /// Wraps a block holding a copy of `src`, the rest of the block zeroed (the device may see
    /// the whole block).
    #[inline(always)]
    pub(crate) fn new_filled(claim: Claim, src: &[u8]) -> DmaBuf {
        let block = &claim.block;
        debug_assert!(src.len() <= block.size());
        // SAFETY: we own the block exclusively, no device has its address yet, and `src` (at
        // most the block's size, checked by the pool) is private memory.
        unsafe {
            copy::copy_to_device(src, block.ptr.as_ptr());
            if !block.zeroed() {
                copy::zero_device(block.ptr.as_ptr().add(src.len()), block.size() - src.len());
            }
        }
        DmaBuf::new_unzeroed(claim, src.len())
    }

    /// Wraps a block without zeroing. The caller must overwrite all of it before a device
    /// can see it (the bounce paths copy the caller's data in and zero the tail), except what
    /// the pre-zeroed mark, read before this call, says is zero. Clears the mark: from here on
    /// the caller and the device may write the block.
    #[inline(always)]
    pub(crate) fn new_unzeroed(claim: Claim, len: usize) -> DmaBuf {
        let mut block = claim.block;
        block.take_zeroed();
        DmaBuf {
            block,
            len,
            pool: ManuallyDrop::new(claim.pool),
        }
    }

    #[inline]
    fn block(&self) -> &Block {
        &self.block
    }

    /// Whether this buffer came from `pool` (or a clone of it). A driver that takes buffers
    /// back for reuse checks this: another pool's buffer has another device's addresses.
    pub fn is_from(&self, pool: &super::Pool) -> bool {
        crate::sync::Arc::ptr_eq(&self.pool, &pool.shared)
    }

    /// The DMA address space this buffer's device address belongs to: a driver refuses a
    /// buffer whose domain is not its device's ([`crate::share::DeviceView::domain`]).
    #[inline]
    pub fn domain(&self) -> crate::share::DomainId {
        self.pool.view.domain()
    }

    /// Length asked for, in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: the pool never makes empty buffers.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the length (the bytes a transfer of this buffer moves) to `len`, at most
    /// [`DmaBuf::capacity`]: a buffer reused for transfers of different sizes. The bytes past
    /// the length stay as they are (device-visible, never another user's).
    pub fn set_len(&mut self, len: usize) -> Result<(), PoolError> {
        self.check(0, len)?;
        self.len = len;
        Ok(())
    }

    /// Bytes actually reserved (the length rounded up to the size class). Also usable.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.block().size()
    }

    /// The buffer's first byte as the device addresses it.
    #[inline]
    pub fn device_addr(&self) -> DeviceAddr {
        self.block().dev
    }

    /// The buffer's first byte in this process. Accesses must not form references while a
    /// device may use the buffer.
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.block().ptr.as_ptr()
    }

    /// The device addresses of the 4 KiB pages covering the first `len` bytes, in order (the
    /// first may be the buffer's start if it is not page aligned). What an NVMe PRP list holds.
    pub fn device_pages(&self) -> impl Iterator<Item = DeviceAddr> + '_ {
        let start = self.device_addr().0;
        let first = start & !(DEVICE_PAGE as u64 - 1);
        let end = start + self.len as u64;
        std::iter::once(DeviceAddr(start)).chain(
            (first + DEVICE_PAGE as u64..end)
                .step_by(DEVICE_PAGE)
                .map(DeviceAddr),
        )
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), PoolError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity() => Ok(()),
            _ => Err(PoolError::OutOfBounds {
                offset,
                len,
                capacity: self.capacity(),
            }),
        }
    }

    /// Copies `src` into the buffer at `offset`.
    pub fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), PoolError> {
        self.check(offset, src.len())?;
        // SAFETY: bounds checked above; the block is ours; src is private memory.
        unsafe { copy::copy_to_device(src, self.as_ptr().add(offset)) };
        Ok(())
    }

    /// Copies bytes from the buffer at `offset` into `dst`, reading each once.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), PoolError> {
        self.check(offset, dst.len())?;
        // SAFETY: bounds checked above; the block is ours; dst is private memory.
        unsafe { copy::copy_from_device(self.as_ptr().add(offset), dst) };
        Ok(())
    }

    /// Zeroes the whole block.
    pub fn zero(&mut self) {
        // SAFETY: the block is ours, `capacity()` bytes long.
        unsafe { copy::zero_device(self.as_ptr(), self.capacity()) };
    }

    /// Borrows the buffer as ordinary memory.
    ///
    /// # Safety
    /// No device may access the buffer while the borrow lives (no command using its address is
    /// in flight), and the buffer must not be shared with an untrusted party that can write it
    /// (a confidential VM's host).
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the caller guarantees exclusive CPU access; the range is our block.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuf {
    #[inline(always)]
    fn drop(&mut self) {
        // SAFETY: `pool` is taken exactly once, here, and never used again.
        let pool = unsafe { ManuallyDrop::take(&mut self.pool) };
        // SAFETY: `release` moves the block out of `self.block` exactly once, and `self` is
        // not used again; `Block` has no destructor, so the field left behind is never dropped
        // twice.
        unsafe { Shared::release(&raw const self.block, pool) };
    }
}

impl fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .field("device_addr", &format_args!("{:#x}", self.device_addr().0))
            .finish()
    }
}
