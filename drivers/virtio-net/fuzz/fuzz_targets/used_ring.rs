//! Fuzz target: the virtio-net driver's split virtqueue (`SplitQueue`, the owner of its buffers
//! over the shared `tidepool_virtqueue::SplitRing`, whose used-ring reader this drives) against a
//! device that writes anything into the used ring.
//!
//! The queue is the real one, its rings in a buffer of a real pool over the identity view (the
//! device address is the virtual address, so this target plays the device by writing ring
//! memory through it, as DMA would). The input is a script: its first byte picks the size (a
//! power of two, 1 to 256); then operations:
//! - **post**: the driver pushes a pool buffer (arbitrary length up to its capacity, arbitrary
//!   direction) and sometimes publishes;
//! - **device complete**: the device writes a plausible used entry (an outstanding id, a length
//!   mostly within what was posted) at its next slot and bumps `used.idx`;
//! - **device write**: arbitrary id/len into any used slot, or an arbitrary `used.idx`, or
//!   arbitrary bytes anywhere in the used ring;
//! - **pop**: the driver pops one completion.
//!
//! A model (what was posted under which id, the consumed index, whether the queue is broken)
//! is kept alongside, and each step asserts the contract of `pop_used`, not just "no panic":
//! nothing when `used.idx` has not moved; `IndexAhead` when it ran past the posted buffers;
//! `IdOutOfRange` / `NotOutstanding` / `LenTooLong` for a bad entry; else exactly the buffer
//! posted under that id with the device's length; after any error only `Broken`, and pushes
//! are refused. Posting writes a descriptor and avail slot the device can follow. At the end
//! `take_all_after_reset` returns every outstanding buffer and the pool has nothing in use.

#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Pool, PoolConfig};
use tidepool::share::identity::Identity;
use tidepool_virtio_net::virtio::queue::{Layout, RingError, SplitQueue};

const MAX_OPS: usize = 512;
const DESC_F_WRITE: u16 = 2;

/// One pool over ordinary 4 KiB pages, shared by all runs in the process.
fn pool() -> Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let cfg = PoolConfig {
            memory: MemoryConfig {
                page_size: PageSize::Small4K,
                allow_small_pages: true,
            },
            chunk_bytes: 2 << 20,
            prefill_bytes: 2 << 20,
            max_bytes: 2 << 20,
            max_buffer: 64 << 10,
            low_watermark: 0,
            high_watermark: 2 << 20,
            shrink_delay: Duration::from_secs(60),
            reserve_bytes: 0,
            transient: false,
            background: false,
            ..PoolConfig::default()
        };
        Pool::new(Arc::new(Identity::new()), cfg).expect("fuzz pool")
    })
    .clone()
}

/// The ring memory as the device sees it (identity view: device address = virtual address).
struct DeviceSide {
    base: usize,
    len: usize,
}

impl DeviceSide {
    fn write(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= self.len);
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: `off + i < len`: inside the queue's ring buffer, which lives as long as
            // the queue (dropped after this struct's last use); a byte store forms no reference.
            unsafe { ((self.base + off + i) as *mut u8).write_volatile(*b) };
        }
    }

    fn read(&self, off: usize, n: usize) -> u64 {
        assert!(off + n <= self.len);
        (0..n).rev().fold(0u64, |acc, i| {
            // SAFETY: as in `write`; a byte load by value.
            (acc << 8) | u64::from(unsafe { ((self.base + off + i) as *const u8).read_volatile() })
        })
    }
}

struct Model {
    size: u16,
    /// id → (device address of the buffer, posted length).
    posted: HashMap<u32, (u64, u32)>,
    /// Pushed entries (avail.idx as written).
    pushed: u16,
    last_used: u16,
    broken: bool,
}

/// The verdict the rules give for the next used entry.
fn expected(
    m: &Model,
    used_idx: u16,
    id: u32,
    len: u32,
    queue: u16,
) -> std::result::Result<Option<(u32, u32)>, RingError> {
    if m.broken {
        return Err(RingError::Broken(queue));
    }
    if used_idx == m.last_used {
        return Ok(None);
    }
    let ahead = used_idx.wrapping_sub(m.last_used);
    if usize::from(ahead) > m.posted.len() {
        return Err(RingError::IndexAhead {
            queue,
            used_idx,
            last_used: m.last_used,
            ahead,
            outstanding: m.posted.len(),
        });
    }
    if id >= u32::from(m.size) {
        return Err(RingError::IdOutOfRange {
            queue,
            id,
            size: m.size,
        });
    }
    let Some(&(_, posted)) = m.posted.get(&id) else {
        return Err(RingError::NotOutstanding { queue, id });
    };
    if len > posted {
        return Err(RingError::LenTooLong {
            queue,
            id,
            len,
            allowed: posted,
        });
    }
    Ok(Some((id, len)))
}

fn run(u: &mut Unstructured<'_>, pool: &Pool) -> Result<()> {
    let size: u16 = 1 << u.int_in_range(0u8..=8)?;
    let queue: u16 = u.int_in_range(0..=1)?;
    let mut q = SplitQueue::new(pool, queue, size, None).expect("valid size");
    let Layout {
        total,
        avail: avail_off,
        used: used_off,
        ..
    } = Layout::new(size);
    let (desc_addr, avail_addr, used_addr) = q.addresses();
    assert_eq!(avail_addr.0 - desc_addr.0, avail_off as u64);
    assert_eq!(used_addr.0 - desc_addr.0, used_off as u64);
    let dev = DeviceSide {
        base: desc_addr.0 as usize,
        len: total,
    };
    let mut m = Model {
        size,
        posted: HashMap::new(),
        pushed: 0,
        last_used: 0,
        broken: false,
    };
    let mut completions = Vec::new();

    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0u8..=5)? {
            0 => {
                let cap = 1usize << u.int_in_range(9u8..=12)?;
                let Ok(buf) = pool.try_alloc(cap) else {
                    continue;
                };
                let addr = buf.device_addr().0;
                let len = u.int_in_range(0..=buf.capacity() as u32)?;
                let writes: bool = u.arbitrary()?;
                let free_before = q.free_slots();
                match q.push(buf, len, writes) {
                    Ok(()) => {
                        assert!(!m.broken && free_before > 0);
                        let slot = usize::from(m.pushed % size);
                        let id = dev.read(avail_off + 4 + 2 * slot, 2) as u32;
                        assert!(
                            id < u32::from(size),
                            "avail names a descriptor outside the table"
                        );
                        let d = 16 * id as usize;
                        assert_eq!(dev.read(d, 8), addr);
                        assert_eq!(dev.read(d + 8, 4), u64::from(len));
                        assert_eq!(dev.read(d + 12, 2) as u16 & DESC_F_WRITE != 0, writes);
                        assert!(
                            m.posted.insert(id, (addr, len)).is_none(),
                            "id reused while posted"
                        );
                        m.pushed = m.pushed.wrapping_add(1);
                    }
                    Err(back) => {
                        assert!(m.broken || free_before == 0);
                        assert_eq!(back.device_addr().0, addr);
                    }
                }
                if u.arbitrary()? {
                    q.publish();
                    if !m.broken {
                        assert_eq!(dev.read(avail_off + 2, 2) as u16, m.pushed);
                    }
                }
            }
            1 => {
                // Plausible completion at the device's next slot.
                let idx = dev.read(used_off + 2, 2) as u16;
                let ids: Vec<u32> = m.posted.keys().copied().collect();
                let (id, len) = if ids.is_empty() {
                    (u.arbitrary()?, u.arbitrary()?)
                } else {
                    let id = ids[u.choose_index(ids.len())?];
                    let posted = m.posted[&id].1;
                    let len = if u.ratio(7u8, 8)? {
                        u.int_in_range(0..=posted)?
                    } else {
                        u.arbitrary()?
                    };
                    (id, len)
                };
                let slot = usize::from(idx % size);
                dev.write(used_off + 4 + 8 * slot, &id.to_le_bytes());
                dev.write(used_off + 8 + 8 * slot, &len.to_le_bytes());
                dev.write(used_off + 2, &idx.wrapping_add(1).to_le_bytes());
            }
            2 => {
                let slot = usize::from(u.int_in_range(0..=size - 1)?);
                let id: u32 = u.arbitrary()?;
                let len: u32 = u.arbitrary()?;
                dev.write(used_off + 4 + 8 * slot, &id.to_le_bytes());
                dev.write(used_off + 8 + 8 * slot, &len.to_le_bytes());
            }
            3 => {
                let idx: u16 = if u.arbitrary()? {
                    m.last_used.wrapping_add(u.int_in_range(0..=size)?)
                } else {
                    u.arbitrary()?
                };
                dev.write(used_off + 2, &idx.to_le_bytes());
            }
            4 => {
                let used_len = total - used_off;
                let off = u.int_in_range(0..=used_len - 1)?;
                let n = u.int_in_range(1..=8usize.min(used_len - off))?;
                let bytes: Vec<u8> = (0..n).map(|_| u.arbitrary()).collect::<Result<_>>()?;
                dev.write(used_off + off, &bytes);
            }
            _ => {
                let used_idx = dev.read(used_off + 2, 2) as u16;
                let slot = usize::from(m.last_used % size);
                let id = dev.read(used_off + 4 + 8 * slot, 4) as u32;
                let len = dev.read(used_off + 8 + 8 * slot, 4) as u32;
                let want = expected(&m, used_idx, id, len, queue);
                let outstanding = q.outstanding();
                match q.pop_used() {
                    Ok(Some(c)) => {
                        let Ok(Some((id, len))) = want else {
                            panic!("accepted an entry the rules reject: {want:?}");
                        };
                        let (addr, _) = m.posted.remove(&id).expect("checked");
                        assert_eq!(c.buf.device_addr().0, addr, "the wrong buffer came back");
                        assert_eq!(c.len, len);
                        m.last_used = m.last_used.wrapping_add(1);
                        assert_eq!(q.outstanding(), outstanding - 1);
                        completions.push(c);
                    }
                    Ok(None) => assert_eq!(want, Ok(None)),
                    Err(e) => {
                        assert_eq!(Err(e.clone()), want, "pop_used disagrees with the rules");
                        assert!(!e.to_string().is_empty());
                        assert!(q.is_broken());
                        assert_eq!(q.outstanding(), outstanding, "an error consumed something");
                        m.broken = true;
                    }
                }
            }
        }
        assert_eq!(q.outstanding(), m.posted.len());
        assert_eq!(q.free_slots(), usize::from(size) - m.posted.len());
    }
    let back = q.take_all_after_reset();
    assert_eq!(back.len(), m.posted.len());
    let mut addrs: Vec<u64> = back.iter().map(|b| b.device_addr().0).collect();
    let mut want: Vec<u64> = m.posted.values().map(|p| p.0).collect();
    addrs.sort_unstable();
    want.sort_unstable();
    assert_eq!(addrs, want);
    assert_eq!(q.outstanding(), 0);
    drop((back, completions, q));
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let pool = pool();
    let mut u = Unstructured::new(data);
    let _ = run(&mut u, &pool);
    assert_eq!(pool.stats().in_use_bytes, 0, "a buffer was lost");
});
