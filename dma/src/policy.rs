//! How a driver gets caller memory to a device: bounce through the pool, map it directly, or
//! choose by size.
//!
//! - **Bounce** ([`crate::pool::Pool::map`]): copy into a pre-mapped pool buffer. The hot path is a
//!   copy plus an allocator operation; no system call. Wins for small I/O.
//! - **Direct** ([`crate::share::direct::DirectMapper`]): make the caller's own pages
//!   device-visible for the I/O (one `VFIO_IOMMU_MAP_DMA` and one unmap). No copy, but two
//!   system calls and IOMMU invalidations. Wins for large I/O on machines where copying is slow.
//! - **Auto**: bounce below a threshold, direct from it on.
//!
//! The crossover is machine-specific (in the QEMU guest used for tests: copying wins up to at
//! least 16 KiB, mapping from 64 KiB; on bare metal with a fast `rep movsb` the crossover moves
//! up), so [`DmaPolicy::calibrate`] measures it instead of hard-coding one.
//!
//! Direct mapping needs the caller's buffer page-aligned and is not available for memory
//! shared with an untrusted host (confidential VMs must always bounce): [`DmaPolicy::choose`]
//! falls back to bouncing where direct mapping cannot apply.

use std::time::{Duration, Instant};

use crate::pool::{Direction, Pool};
use crate::share::direct::DirectMapper;

/// Which path one transfer takes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Path {
    /// Copy through a pool buffer.
    Bounce,
    /// Map the caller's memory for the device.
    Direct,
}

/// A driver's rule for choosing between bouncing and direct mapping.
///
/// ```
/// use tidepool::policy::{DmaPolicy, Path};
/// let p = DmaPolicy::Auto { threshold: 64 << 10 };
/// assert_eq!(p.choose(4096, 0x1000), Path::Bounce);
/// assert_eq!(p.choose(128 << 10, 0x1000), Path::Direct);
/// assert_eq!(p.choose(128 << 10, 0x1001), Path::Bounce, "unaligned memory cannot be mapped");
/// ```
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum DmaPolicy {
    /// Always bounce (the default; the only choice for confidential computing).
    #[default]
    Bounce,
    /// Always map directly (where the buffer allows).
    Direct,
    /// Bounce below `threshold` bytes, map directly from it on.
    Auto {
        /// The first size that is mapped directly.
        threshold: usize,
    },
}

impl DmaPolicy {
    /// The path for a transfer of `len` bytes of caller memory starting at `addr`.
    pub fn choose(&self, len: usize, addr: usize) -> Path {
        let mappable = addr % 4096 == 0;
        let direct = match *self {
            DmaPolicy::Bounce => false,
            DmaPolicy::Direct => true,
            DmaPolicy::Auto { threshold } => len >= threshold,
        };
        if direct && mappable {
            Path::Direct
        } else {
            Path::Bounce
        }
    }

    /// Measures bounce (pool `try_map` + unmap, `FromDevice`: zero, then copy out) against
    /// direct (map + unmap of page-aligned private memory) at power-of-two sizes from 4 KiB to
    /// `max` and returns `Auto` with the smallest size from which direct mapping is faster at
    /// every larger measured size (or `Bounce` if it never is). Median of `rounds` runs each.
    ///
    /// Each run maps `in_flight` distinct caller buffers (the caller's I/O depth), then unmaps
    /// them in order, and counts the time per buffer: as in an I/O loop, a bounce buffer is
    /// copied out after `in_flight - 1` others were zeroed, and the caller's memory cycles
    /// through `in_flight × size` bytes. One warm buffer mapped and unmapped back to back
    /// flatters bouncing at large sizes (everything stays in the CPU's caches), which made
    /// `auto` keep bouncing at 128 KiB where mapping won in the loop.
    ///
    /// The pool must have room for `in_flight` buffers of `max` (or the run fails with the
    /// pool's `Exhausted`). Blocks (direct mapping makes system calls); run at setup, not on
    /// the hot path.
    pub fn calibrate(
        pool: &Pool,
        mapper: &DirectMapper,
        max: usize,
        rounds: usize,
        in_flight: usize,
    ) -> Result<Calibration, crate::pool::PoolError> {
        let max = max.min(pool.config().max_buffer).max(4096);
        let in_flight = in_flight.max(1);
        let mut scratch = AlignedScratch::new(max * in_flight);
        let mut points = Vec::new();
        let mut size = 4096;
        while size <= max {
            let bounce = median(rounds, || {
                let t = Instant::now();
                let maps = scratch
                    .slice(size * in_flight)
                    .chunks_mut(size)
                    .map(|s| pool.try_map(s, Direction::FromDevice))
                    .collect::<Result<Vec<_>, _>>()?;
                for m in maps {
                    m.unmap();
                }
                Ok(t.elapsed() / in_flight as u32)
            })?;
            let direct = median(rounds, || {
                let base = scratch.ptr();
                let t = Instant::now();
                let maps = (0..in_flight)
                    .map(|k| {
                        // SAFETY: each slot lies inside `scratch`, which stays allocated and
                        // untouched while the mappings live; no device uses the addresses
                        // (nothing is submitted).
                        unsafe { mapper.map(base.add(k * size), size) }.map_err(|e| {
                            crate::pool::PoolError::Internal(format!(
                                "direct map during calibration: {e}"
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                drop(maps);
                Ok(t.elapsed() / in_flight as u32)
            })?;
            points.push(CalibrationPoint {
                size,
                bounce,
                direct,
            });
            size *= 2;
        }
        let threshold = points
            .iter()
            .rposition(|p| p.direct >= p.bounce)
            .map_or(Some(4096), |i| points.get(i + 1).map(|p| p.size));
        let policy = match threshold {
            Some(threshold) => DmaPolicy::Auto { threshold },
            None => DmaPolicy::Bounce,
        };
        Ok(Calibration { policy, points })
    }
}

/// One size measured by [`DmaPolicy::calibrate`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CalibrationPoint {
    /// Transfer size in bytes.
    pub size: usize,
    /// Median bounce map + unmap time.
    pub bounce: Duration,
    /// Median direct map + unmap time.
    pub direct: Duration,
}

/// What [`DmaPolicy::calibrate`] found.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Calibration {
    /// The policy it recommends.
    pub policy: DmaPolicy,
    /// The measurements behind it.
    pub points: Vec<CalibrationPoint>,
}

fn median(
    rounds: usize,
    mut f: impl FnMut() -> Result<Duration, crate::pool::PoolError>,
) -> Result<Duration, crate::pool::PoolError> {
    let mut v = (0..rounds.max(1))
        .map(|_| f())
        .collect::<Result<Vec<_>, _>>()?;
    v.sort();
    Ok(v[v.len() / 2])
}

/// Page-aligned private memory for calibration.
struct AlignedScratch {
    buf: Vec<u8>,
    offset: usize,
}

impl AlignedScratch {
    fn new(len: usize) -> AlignedScratch {
        let buf = vec![0u8; len + 4096];
        let offset = buf.as_ptr().align_offset(4096);
        AlignedScratch { buf, offset }
    }
    fn slice(&mut self, len: usize) -> &mut [u8] {
        &mut self.buf[self.offset..self.offset + len]
    }
    fn ptr(&mut self) -> *mut u8 {
        self.slice(0).as_mut_ptr()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::pool::tests::small_config;
    use crate::share::identity::Identity;
    use std::sync::Arc;

    #[test]
    fn calibration_threshold_matches_its_measurements() {
        let view = Arc::new(Identity::new());
        let pool = Pool::new(view.clone(), small_config()).unwrap();
        let mapper = DirectMapper::new(view, 0);
        let cal = DmaPolicy::calibrate(&pool, &mapper, 64 << 10, 5, 4).unwrap();
        assert_eq!(cal.points.len(), 5, "4 KiB .. 64 KiB");
        match cal.policy {
            DmaPolicy::Auto { threshold } => {
                for p in &cal.points {
                    if p.size >= threshold {
                        assert!(p.direct < p.bounce, "{p:?} at or above {threshold}");
                    }
                }
                let below = cal.points.iter().rfind(|p| p.size < threshold);
                if let Some(p) = below {
                    assert!(p.direct >= p.bounce, "{p:?} just below {threshold}");
                }
            }
            DmaPolicy::Bounce => {
                assert!(cal.points.last().unwrap().direct >= cal.points.last().unwrap().bounce)
            }
            DmaPolicy::Direct => panic!("calibrate never answers Direct"),
        }
        assert_eq!(pool.stats().in_use_bytes, 0);
    }
}
