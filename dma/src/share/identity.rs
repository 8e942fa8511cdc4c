//! The identity view, for tests: the device address *is* the virtual address.
//!
//! It lets unit tests, property tests, loom models and the policy lab drive the real pool on a
//! machine without any device. Never use it with real hardware: nothing is pinned or mapped.

use std::sync::Mutex;

use super::{DeviceView, ShareError, ShareUsage};
use crate::memory::HostRegion;
use crate::DeviceAddr;

/// A [`DeviceView`] whose device addresses are virtual addresses. Tests only.
///
/// It keeps the live regions so that a wrong `unshare` is caught, and can be given a mapping
/// limit to exercise the pool's handling of a full backend.
///
/// ```
/// use tidepool::share::{identity::Identity, DeviceView};
/// let view = Identity::new();
/// assert_eq!(view.usage().mappings, 0);
/// ```
#[derive(Debug, Default)]
pub struct Identity {
    /// Guarded by its own lock; `share`/`unshare` hold it only for the bookkeeping.
    live: Mutex<Vec<(usize, usize)>>,
    limit: Option<u64>,
}

impl Identity {
    /// An identity view without a mapping limit.
    pub fn new() -> Identity {
        Identity::default()
    }

    /// An identity view that refuses more than `limit` live mappings.
    pub fn with_limit(limit: u64) -> Identity {
        Identity {
            live: Mutex::default(),
            limit: Some(limit),
        }
    }
}

impl DeviceView for Identity {
    fn share(&self, region: &HostRegion<'_>) -> Result<DeviceAddr, ShareError> {
        let mut live = self.live.lock().unwrap();
        if let Some(limit) = self.limit {
            if live.len() as u64 >= limit {
                return Err(ShareError::MappingLimit {
                    used: live.len() as u64,
                    limit,
                });
            }
        }
        live.push((region.start(), region.len));
        Ok(DeviceAddr(region.start() as u64))
    }

    fn unshare(&self, region: &HostRegion<'_>, addr: DeviceAddr) -> Result<(), ShareError> {
        let mut live = self.live.lock().unwrap();
        let key = (region.start(), region.len);
        match live.iter().position(|&r| r == key) {
            Some(i) if addr.0 == region.start() as u64 => {
                live.swap_remove(i);
                Ok(())
            }
            _ => Err(ShareError::NotShared {
                addr: region.start(),
                len: region.len,
                iova: addr.0,
            }),
        }
    }

    fn usage(&self) -> ShareUsage {
        let live = self.live.lock().unwrap();
        ShareUsage {
            mappings: live.len() as u64,
            mapping_limit: self.limit,
            bytes: live.iter().map(|r| r.1 as u64).sum(),
        }
    }

    fn kind(&self) -> &'static str {
        "identity"
    }

    /// Device addresses here are this process's virtual addresses: one space shared by every such view.
    fn domain(&self) -> super::DomainId {
        super::DomainId::PROCESS_VIRTUAL
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Chunk, PageSize};

    #[test]
    fn share_unshare_and_limit() {
        let v = Identity::with_limit(1);
        let a = Chunk::with_page_size(8192, PageSize::Small4K).unwrap();
        let b = Chunk::with_page_size(8192, PageSize::Small4K).unwrap();
        let da = v.share(&a.region()).unwrap();
        assert_eq!(da.0, a.as_ptr() as u64);
        assert!(matches!(
            v.share(&b.region()),
            Err(ShareError::MappingLimit { used: 1, limit: 1 })
        ));
        assert_eq!(v.usage().bytes, 8192);
        assert!(matches!(
            v.unshare(&b.region(), DeviceAddr(b.as_ptr() as u64)),
            Err(ShareError::NotShared { .. })
        ));
        v.unshare(&a.region(), da).unwrap();
        assert_eq!(
            v.usage(),
            ShareUsage {
                mappings: 0,
                mapping_limit: Some(1),
                bytes: 0
            }
        );
    }
}
