//! The bookkeeping of the two IOMMU views, type1 ([`super::vfio::VfioType1`]) and iommufd
//! ([`super::iommufd::IommufdView`]): which IOVA extents are handed out and which mappings are
//! live, behind the view's one lock; and [`one_view`], the rule that keeps it to one view (one
//! allocator) per IOVA space, since two allocators over one space would hand out the same
//! addresses twice.
//!
//! Both views follow the same protocol around their own map and unmap ioctls, which run
//! unlocked (the kernel serialises changes to one IOVA space, and this bookkeeping guarantees no
//! two calls ever work on the same extent):
//! - share: [`Mappings::reserve`] an extent, map it, then [`Mappings::mapped`] on success or
//!   [`Mappings::map_failed`] (the extent is given back) on failure;
//! - unshare: [`Mappings::take`] the record (it must match what was shared), unmap it, then
//!   [`Mappings::unmapped`] (the extent is freed) once the kernel confirmed the unmap, or
//!   [`Mappings::unmap_failed`]: the record is put back and the extent stays reserved, so an
//!   address the device may still reach is never handed out again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{ShareError, ShareUsage};
use crate::iova::IovaRange;
use crate::memory::HostRegion;
use crate::DeviceAddr;

/// One live IOMMU mapping made by a view's `share`.
#[derive(Copy, Clone, Debug)]
pub(super) struct Mapping {
    pub(super) vaddr: usize,
    pub(super) len: usize,
}

/// The one view of an IOVA space (`space`: "container", "IOAS"), kept in `slot`: made by `make`
/// on the first call, the same one after that if its DMA mask (`mask_of`) is no wider than
/// `dma_mask`. Asking for a narrower mask than the view was made with is an error, because
/// addresses already handed out might be unreachable. Holds the slot's lock while making.
pub(super) fn one_view<V>(
    slot: &Mutex<Option<Arc<V>>>,
    dma_mask: u64,
    space: &str,
    mask_of: impl Fn(&V) -> u64,
    make: impl FnOnce() -> Result<V, ShareError>,
) -> Result<Arc<V>, ShareError> {
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(view) = slot.as_ref() {
        if mask_of(view) <= dma_mask {
            return Ok(Arc::clone(view));
        }
        return Err(ShareError::Unsuitable(format!(
            "this {space}'s view was made with DMA mask {:#x}, wider than {dma_mask:#x}; \
             create the view with the narrowest mask of all devices first",
            mask_of(view)
        )));
    }
    let view = Arc::new(make()?);
    *slot = Some(Arc::clone(&view));
    Ok(view)
}

/// A view's IOVA extents and live mappings, behind one lock taken briefly by each method.
#[derive(Debug)]
pub(super) struct Mappings {
    state: Mutex<State>,
}

/// What [`Mappings`] guards.
#[derive(Debug)]
struct State {
    iova: IovaSpace,
    /// Live mappings by IOVA.
    live: BTreeMap<u64, Mapping>,
    bytes: u64,
}

impl Mappings {
    /// No mappings, and an IOVA space over `ranges` (inclusive ends) clipped to `mask`.
    pub(super) fn new(ranges: &[IovaRange], mask: u64) -> Result<Mappings, ShareError> {
        Ok(Mappings {
            state: Mutex::new(State {
                iova: IovaSpace::new(ranges, mask)?,
                live: BTreeMap::new(),
                bytes: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the allocator and table half-updated in a
        // way that matters more than refusing all further DMA, so keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes an IOVA extent of `len` bytes aligned to `align`, at or below the mask.
    pub(super) fn reserve(&self, len: u64, align: u64) -> Result<u64, ShareError> {
        self.lock().iova.alloc(len, align)
    }

    /// `region` is now mapped at `iova` (an extent from [`Mappings::reserve`]): records it.
    pub(super) fn mapped(&self, iova: u64, region: &HostRegion<'_>) {
        let mut state = self.lock();
        state.live.insert(
            iova,
            Mapping {
                vaddr: region.start(),
                len: region.len,
            },
        );
        state.bytes += region.len as u64;
    }

    /// Mapping the extent at `iova` failed: gives it back. Returns the live mappings left.
    pub(super) fn map_failed(&self, iova: u64, len: u64) -> u64 {
        let mut state = self.lock();
        state.iova.free(iova, len);
        state.live.len() as u64
    }

    /// Removes the record of `region` shared at `addr`, for unmapping; the extent stays
    /// reserved. [`ShareError::NotShared`] unless exactly that region is live there.
    pub(super) fn take(
        &self,
        region: &HostRegion<'_>,
        addr: DeviceAddr,
    ) -> Result<Mapping, ShareError> {
        let not_shared = || ShareError::NotShared {
            addr: region.start(),
            len: region.len,
            iova: addr.0,
        };
        let mut state = self.lock();
        match state.live.get(&addr.0) {
            Some(m) if m.vaddr == region.start() && m.len == region.len => {}
            _ => return Err(not_shared()),
        }
        let m = state.live.remove(&addr.0).ok_or_else(not_shared)?;
        state.bytes -= m.len as u64;
        Ok(m)
    }

    /// The kernel confirmed the unmap of `mapping` at `iova`: frees its extent.
    pub(super) fn unmapped(&self, iova: u64, mapping: Mapping) {
        self.lock().iova.free(iova, mapping.len as u64);
    }

    /// Unmapping `mapping` at `iova` failed, so the device may still reach it: puts the record
    /// back and keeps the extent reserved.
    pub(super) fn unmap_failed(&self, iova: u64, mapping: Mapping) {
        let mut state = self.lock();
        state.live.insert(iova, mapping);
        state.bytes += mapping.len as u64;
    }

    /// Live mappings and bytes, with the view's `mapping_limit`.
    pub(super) fn usage(&self, mapping_limit: Option<u64>) -> ShareUsage {
        let state = self.lock();
        ShareUsage {
            mappings: state.live.len() as u64,
            mapping_limit,
            bytes: state.bytes,
        }
    }
}

/// The seam between the IOMMU views and [`crate::iova`]: keeps the allocator's API in one place.
#[derive(Debug)]
struct IovaSpace {
    mask: u64,
    inner: crate::iova::IovaAllocator,
}

impl IovaSpace {
    /// An allocator over `ranges` (inclusive ends) clipped to `mask`.
    fn new(ranges: &[IovaRange], mask: u64) -> Result<IovaSpace, ShareError> {
        let inner = crate::iova::IovaAllocator::new(ranges, mask).map_err(|e| {
            ShareError::AddressSpace {
                len: 0,
                mask,
                detail: e.to_string(),
            }
        })?;
        Ok(IovaSpace { mask, inner })
    }

    /// `len` bytes aligned to `align`, all at or below the mask.
    fn alloc(&mut self, len: u64, align: u64) -> Result<u64, ShareError> {
        self.inner
            .alloc(len, align)
            .map_err(|e| ShareError::AddressSpace {
                len,
                mask: self.mask,
                detail: e.to_string(),
            })
    }

    /// Gives back an extent from [`IovaSpace::alloc`].
    fn free(&mut self, iova: u64, len: u64) {
        // A failed free means our own bookkeeping is wrong; the address stays reserved,
        // which is the safe outcome.
        let _ = self.inner.free(iova, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr::NonNull;

    fn region(addr: usize, len: usize) -> HostRegion<'static> {
        HostRegion {
            addr: NonNull::new(addr as *mut u8).unwrap(),
            len,
            page_size: 4096,
            fd: None,
        }
    }

    #[test]
    fn share_and_unshare_bookkeeping() {
        let m = Mappings::new(
            &[IovaRange {
                start: 0x10_0000,
                end: 0x1f_ffff,
            }],
            u64::MAX,
        )
        .unwrap();
        let a = region(0x20_0000, 0x2000);
        let iova = m.reserve(0x2000, 4096).unwrap();
        m.mapped(iova, &a);
        assert_eq!(m.usage(Some(7)).mappings, 1);
        assert_eq!(m.usage(Some(7)).bytes, 0x2000);
        assert_eq!(m.usage(Some(7)).mapping_limit, Some(7));

        // Only exactly what was shared can be taken.
        let wrong = region(0x20_0000, 0x1000);
        assert!(matches!(
            m.take(&wrong, DeviceAddr(iova)),
            Err(ShareError::NotShared { .. })
        ));
        assert!(m.take(&a, DeviceAddr(iova + 4096)).is_err());

        // A failed unmap puts the record back and keeps the extent.
        let taken = m.take(&a, DeviceAddr(iova)).unwrap();
        assert_eq!(m.usage(None).mappings, 0);
        m.unmap_failed(iova, taken);
        assert_eq!(m.usage(None).bytes, 0x2000);
        let taken = m.take(&a, DeviceAddr(iova)).unwrap();
        m.unmapped(iova, taken);
        assert_eq!(m.usage(None), ShareUsage::default());

        // A failed map gives the extent back.
        let again = m.reserve(0x2000, 4096).unwrap();
        assert_eq!(m.map_failed(again, 0x2000), 0);
    }

    #[test]
    fn one_view_per_space_and_no_narrower_mask_later() {
        let slot = Mutex::new(None);
        let make = |mask: u64| move || Ok::<u64, ShareError>(mask);
        let first = one_view(&slot, 0xffff_ffff, "IOAS", |v| *v, make(0xffff_ffff)).unwrap();
        let wider = one_view(&slot, u64::MAX, "IOAS", |v| *v, || panic!("made twice")).unwrap();
        assert!(Arc::ptr_eq(&first, &wider));
        match one_view(&slot, 0xffff, "IOAS", |v| *v, || panic!("made twice")) {
            Err(ShareError::Unsuitable(why)) => assert!(
                why.starts_with(
                    "this IOAS's view was made with DMA mask 0xffffffff, wider than 0xffff"
                ),
                "{why}"
            ),
            other => panic!("expected Unsuitable, got {other:?}"),
        }
        // A failed make leaves the slot empty for the next try.
        let empty = Mutex::new(None::<Arc<u64>>);
        let fail = || Err(ShareError::Unsuitable("no".into()));
        assert!(one_view(&empty, 1, "container", |v: &u64| *v, fail).is_err());
        assert!(empty.lock().unwrap().is_none());
    }
}
