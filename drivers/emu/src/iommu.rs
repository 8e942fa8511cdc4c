//! An emulated IOMMU domain: the [`DeviceView`] of the emulated devices.
//!
//! [`EmuIommu::share`] gives each region an IOVA from a first-fit allocator that starts at the
//! fixed [`IOVA_BASE`], aligned to the region's page size. The allocator is deterministic, so two
//! separate domains hand out the *same* addresses for the same sequence of shares: a buffer of
//! one domain given to a device of another then names whatever that other domain maps there,
//! exactly the cross-domain corruption a second VFIO container would cause on real hardware.
//! The domain identity is the object ([`DeviceView::domain`]'s default), so drivers can tell the
//! two apart and must refuse the foreign buffer.
//!
//! A device model reaches memory only through [`EmuIommu::translate`] (or the crate's DMA
//! helper, which holds the mapping table across the copy so a concurrent unshare cannot free the
//! memory mid-copy). Every translation of an IOVA range that is not wholly inside one live
//! mapping counts as an IOMMU fault ([`EmuIommu::faults`]), as the DMA remapping hardware would
//! record it.

use std::ptr::NonNull;
use std::sync::Mutex;

use tidepool::memory::HostRegion;
use tidepool::share::{DeviceView, ShareError, ShareUsage};
use tidepool::DeviceAddr;

/// The first IOVA every [`EmuIommu`] hands out (4 GiB: above the 32-bit range, like a real
/// IOVA allocator that keeps clear of low MMIO windows).
pub const IOVA_BASE: u64 = 0x1_0000_0000;

/// The IOMMU's fault record: how many DMAs hit an unmapped IOVA, and the last one.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct IommuFaults {
    /// Faulting translations since the domain was made.
    pub count: u64,
    /// The first IOVA of the last faulting access.
    pub last_iova: Option<u64>,
}

/// One live mapping.
#[derive(Copy, Clone, Debug)]
struct Mapping {
    iova: u64,
    host: usize,
    len: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Live mappings, sorted by IOVA.
    maps: Vec<Mapping>,
    limit: Option<u64>,
    fail_next: Option<ShareError>,
    faults: IommuFaults,
}

/// An emulated IOMMU domain. See the module docs.
///
/// ```
/// use tidepool::share::DeviceView;
/// use tidepool_emu::EmuIommu;
/// let iommu = EmuIommu::new();
/// assert_eq!(iommu.usage().mappings, 0);
/// assert!(iommu.translate(0x1_0000_0000, 8).is_none());
/// assert_eq!(iommu.faults().count, 1);
/// ```
#[derive(Debug, Default)]
pub struct EmuIommu {
    state: Mutex<State>,
}

impl EmuIommu {
    /// An empty domain without a mapping limit.
    pub fn new() -> EmuIommu {
        EmuIommu::default()
    }

    /// Refuses shares beyond `limit` live mappings with [`ShareError::MappingLimit`]
    /// (`None`: no limit).
    pub fn set_mapping_limit(&self, limit: Option<u64>) {
        self.lock().limit = limit;
    }

    /// Makes the next [`DeviceView::share`] fail with `error` (one shot).
    pub fn fail_next_share(&self, error: ShareError) {
        self.lock().fail_next = Some(error);
    }

    /// The fault record.
    pub fn faults(&self) -> IommuFaults {
        self.lock().faults
    }

    /// Translates `len` bytes at `iova` to a host pointer, if the whole range lies inside one
    /// live mapping; otherwise records an IOMMU fault and returns `None`.
    ///
    /// The pointer is valid only while the mapping lives; the owner of the memory may unshare
    /// and free it at any time after this returns. Device models use the DMA helper
    /// ([`crate::pci::PciCore::dma_read`]), which holds the table across the copy.
    pub fn translate(&self, iova: u64, len: usize) -> Option<NonNull<u8>> {
        let mut state = self.lock();
        let found = lookup(&state.maps, iova, len);
        if found.is_none() {
            record_fault(&mut state, iova);
        }
        found
    }

    /// Runs `f` with the host pointer for `len` bytes at `iova` while the mapping table is
    /// locked, so the mapping cannot be unshared (and its memory freed) until `f` returns.
    /// Records a fault and returns `None` when the range is not mapped.
    pub(crate) fn with_translation<R>(
        &self,
        iova: u64,
        len: usize,
        f: impl FnOnce(NonNull<u8>) -> R,
    ) -> Option<R> {
        let mut state = self.lock();
        match lookup(&state.maps, iova, len) {
            Some(ptr) => Some(f(ptr)),
            None => {
                record_fault(&mut state, iova);
                None
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves only bookkeeping behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn lookup(maps: &[Mapping], iova: u64, len: usize) -> Option<NonNull<u8>> {
    let end = iova.checked_add(len as u64)?;
    // Mappings are sorted and disjoint: the candidate is the last one starting at or before
    // `iova`.
    let i = maps.partition_point(|m| m.iova <= iova).checked_sub(1)?;
    let m = maps[i];
    if end > m.iova + m.len {
        return None;
    }
    let host = m.host + (iova - m.iova) as usize;
    NonNull::new(host as *mut u8)
}

fn record_fault(state: &mut State, iova: u64) {
    state.faults.count += 1;
    state.faults.last_iova = Some(iova);
    tracing::debug!(iova = format_args!("{iova:#x}"), "emulated IOMMU fault");
}

fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

impl DeviceView for EmuIommu {
    fn share(&self, region: &HostRegion<'_>) -> Result<DeviceAddr, ShareError> {
        let mut state = self.lock();
        if let Some(e) = state.fail_next.take() {
            return Err(e);
        }
        let used = state.maps.len() as u64;
        if let Some(limit) = state.limit {
            if used >= limit {
                return Err(ShareError::MappingLimit { used, limit });
            }
        }
        let align = region.page_size.max(4096).next_power_of_two() as u64;
        let len = region.len as u64;
        let no_space = || ShareError::AddressSpace {
            len,
            mask: u64::MAX,
            detail: "the emulated IOMMU's IOVA space is exhausted".into(),
        };
        // First fit from IOVA_BASE: the lowest aligned gap that holds `len`.
        let mut candidate = align_up(IOVA_BASE, align).ok_or_else(no_space)?;
        let mut at = state.maps.len();
        for (i, m) in state.maps.iter().enumerate() {
            let end = candidate.checked_add(len).ok_or_else(no_space)?;
            if end <= m.iova {
                at = i;
                break;
            }
            candidate = align_up(m.iova + m.len, align).ok_or_else(no_space)?;
        }
        candidate.checked_add(len).ok_or_else(no_space)?;
        state.maps.insert(
            at,
            Mapping {
                iova: candidate,
                host: region.start(),
                len,
            },
        );
        Ok(DeviceAddr(candidate))
    }

    fn unshare(&self, region: &HostRegion<'_>, addr: DeviceAddr) -> Result<(), ShareError> {
        let mut state = self.lock();
        let pos = state.maps.iter().position(|m| {
            m.iova == addr.0 && m.host == region.start() && m.len == region.len as u64
        });
        match pos {
            Some(i) => {
                state.maps.remove(i);
                Ok(())
            }
            None => Err(ShareError::NotShared {
                addr: region.start(),
                len: region.len,
                iova: addr.0,
            }),
        }
    }

    fn usage(&self) -> ShareUsage {
        let state = self.lock();
        ShareUsage {
            mappings: state.maps.len() as u64,
            mapping_limit: state.limit,
            bytes: state.maps.iter().map(|m| m.len).sum(),
        }
    }

    fn kind(&self) -> &'static str {
        "emu-iommu"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool::memory::{Chunk, PageSize};

    #[test]
    fn two_domains_hand_out_the_same_iovas_and_translate_their_own_memory() {
        let a = EmuIommu::new();
        let b = EmuIommu::new();
        assert_ne!(a.domain(), b.domain());
        let ca = Chunk::with_page_size(16 << 10, PageSize::Small4K).unwrap();
        let cb = Chunk::with_page_size(16 << 10, PageSize::Small4K).unwrap();
        let da = a.share(&ca.region()).unwrap();
        let db = b.share(&cb.region()).unwrap();
        assert_eq!(da, db);
        assert_eq!(da.0, IOVA_BASE);
        assert_eq!(
            a.translate(da.0 + 100, 28).unwrap().as_ptr() as usize,
            ca.as_ptr() as usize + 100
        );
        assert_eq!(
            b.translate(db.0 + 100, 28).unwrap().as_ptr() as usize,
            cb.as_ptr() as usize + 100
        );
        // A range crossing the end of the mapping faults.
        assert!(a.translate(da.0 + (16 << 10) - 4, 8).is_none());
        assert_eq!(
            a.faults(),
            IommuFaults {
                count: 1,
                last_iova: Some(da.0 + (16 << 10) - 4)
            }
        );
        // Freed space is reused first-fit.
        let c2 = Chunk::with_page_size(16 << 10, PageSize::Small4K).unwrap();
        let d2 = a.share(&c2.region()).unwrap();
        assert_eq!(d2.0, IOVA_BASE + (16 << 10));
        a.unshare(&ca.region(), da).unwrap();
        assert!(a.translate(da.0, 1).is_none());
        assert!(matches!(
            a.unshare(&ca.region(), da),
            Err(ShareError::NotShared { .. })
        ));
        let d3 = a.share(&ca.region()).unwrap();
        assert_eq!(d3, da);
    }

    #[test]
    fn limit_and_injected_failures() {
        let a = EmuIommu::new();
        let c1 = Chunk::with_page_size(4096, PageSize::Small4K).unwrap();
        let c2 = Chunk::with_page_size(4096, PageSize::Small4K).unwrap();
        a.set_mapping_limit(Some(1));
        a.fail_next_share(ShareError::Unsuitable("injected".into()));
        assert!(matches!(
            a.share(&c1.region()),
            Err(ShareError::Unsuitable(_))
        ));
        a.share(&c1.region()).unwrap();
        assert!(matches!(
            a.share(&c2.region()),
            Err(ShareError::MappingLimit { used: 1, limit: 1 })
        ));
        assert_eq!(a.usage().bytes, 4096);
        assert_eq!(a.usage().mapping_limit, Some(1));
    }
}
