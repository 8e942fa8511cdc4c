//! Fuzz target: the shadow-doorbell path of `doorbell::Doorbell::ring` ("do I need to write the
//! register?"), driven as `QueuePair` drives it, against a controller that writes arbitrary
//! EventIdx values.
//!
//! The input picks CAP.DSTRD (the doorbell stride, device-set too) and a queue ID; the queue's
//! SQ-tail and CQ-head doorbells are made and switched to shadow mode as `QueuePair::new`
//! does (the admin queue, qid 0, as "shadow and register"). The rest of the input is a script:
//! - the device writes an EventIdx for one of the two doorbells (any 32-bit value, or one
//!   near the last value rung, so that crossings are frequent), or any word of the EventIdx
//!   page;
//! - the driver rings one of the doorbells with a new value (any, or a small step forward).
//!
//! The device's view of memory is one page of shadow doorbells and one page of EventIdx
//! entries (Doorbell Buffer Config gives each as one memory page), read and written through
//! the addresses the driver gives the controller (the identity view: device address = host
//! address), as DMA would. After every ring:
//! - the register is written, exactly once and with the new value, exactly when
//!   * the doorbell is the admin queue's (always written), or
//!   * its entry does not fit in the one-page shadow buffer (the controller cannot see a shadow
//!     value there, so only the register tells it), or
//!   * the oracle says the update crossed the event index. The oracle is the NVMe formula
//!     (the same as virtio's `vring_need_event`): `(u16)(new - event - 1) < (u16)(new - old)`,
//!     with `event` the low 16 bits of the entry, cross-checked against "event lies in
//!     [old, new) walked forwards modulo 2^16";
//! - the shadow page holds the new value in the doorbell's entry (when it fits) and nothing
//!   else the driver did not write; the EventIdx page holds exactly what the device wrote (the
//!   driver only zeroes its queue's entries before the queue exists);
//! - the counters: writes + avoided = rings, and writes = register writes seen.

#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tidepool::device::{DeviceError, Mmio};
use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Pool, PoolConfig};
use tidepool::share::identity::Identity;
use tidepool_nvme::doorbell::{Doorbell, ShadowBuffer};
use tidepool_nvme::regs::{offset, Registers};

/// One memory page (CC.MPS = 0): the size of each of the two shadow pages.
const PAGE: usize = 4096;
const WORDS: usize = PAGE / 4;
/// Steps per input, so one input cannot run for long.
const MAX_OPS: usize = 256;

/// One pool over ordinary 4 KiB pages, shared by all runs in the process.
fn pool() -> Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let cfg = PoolConfig {
            memory: MemoryConfig {
                page_size: PageSize::Small4K,
                allow_small_pages: true,
            },
            chunk_bytes: 1 << 20,
            prefill_bytes: 1 << 20,
            max_bytes: 4 << 20,
            max_buffer: 64 << 10,
            low_watermark: 0,
            high_watermark: 1 << 20,
            shrink_delay: Duration::from_secs(60),
            reserve_bytes: 0,
            ..PoolConfig::default()
        };
        Pool::new(Arc::new(Identity::new()), cfg).expect("fuzz pool")
    })
    .clone()
}

/// BAR0: CAP with the chosen DSTRD, and a log of the driver's register writes.
#[derive(Debug)]
struct FakeBar {
    cap: u64,
    writes: Mutex<Vec<(usize, u32)>>,
}

impl Mmio for FakeBar {
    fn len(&self) -> usize {
        usize::MAX
    }
    fn read32(&self, _: usize) -> std::result::Result<u32, DeviceError> {
        Ok(0)
    }
    fn write32(&self, off: usize, value: u32) -> std::result::Result<(), DeviceError> {
        self.writes.lock().unwrap().push((off, value));
        Ok(())
    }
    fn read64(&self, off: usize) -> std::result::Result<u64, DeviceError> {
        Ok(if off == offset::CAP { self.cap } else { 0 })
    }
    fn write64(&self, _: usize, _: u64) -> std::result::Result<(), DeviceError> {
        Ok(())
    }
    fn read16(&self, _: usize) -> std::result::Result<u16, DeviceError> {
        Ok(0)
    }
    fn write16(&self, _: usize, _: u16) -> std::result::Result<(), DeviceError> {
        Ok(())
    }
    fn read8(&self, _: usize) -> std::result::Result<u8, DeviceError> {
        Ok(0)
    }
    fn write8(&self, _: usize, _: u8) -> std::result::Result<(), DeviceError> {
        Ok(())
    }
}

/// The NVMe / virtio rule, as the specifications write it.
fn oracle(event: u16, new: u16, old: u16) -> bool {
    let m = |x: u32| x & 0xffff;
    let need = m(u32::from(new)
        .wrapping_sub(u32::from(event))
        .wrapping_sub(1))
        < m(u32::from(new).wrapping_sub(u32::from(old)));
    // The same rule read as span membership: the device asked to hear about entry `event`,
    // and this update moved past it.
    let span = m(u32::from(new).wrapping_sub(u32::from(old)));
    let at = m(u32::from(event).wrapping_sub(u32::from(old)));
    assert_eq!(need, at < span, "the two statements of the rule disagree");
    need
}

/// One of the queue's two doorbells and what the test knows about it.
struct Bell {
    db: Doorbell,
    /// Its register offset in BAR0.
    reg: usize,
    /// Its entry's byte offset in each shadow page, as the specification lays them out.
    entry: u128,
    /// The last value rung.
    last: u16,
    rings: u64,
    register_writes: u64,
}

impl Bell {
    /// The word index of its entry in a page, if the entry fits in one page.
    fn word(&self) -> Option<usize> {
        (self.entry + 4 <= PAGE as u128).then_some((self.entry / 4) as usize)
    }
}

/// Reads one page as the device does (volatile loads at the device address).
fn read_page(addr: u64) -> Vec<u32> {
    (0..WORDS)
        .map(|i| {
            let p = (addr as usize + 4 * i) as *const u32;
            // SAFETY: the identity view's device address is the host address of the
            // ShadowBuffer's two pages, which live until the end of `run`; `i < WORDS` keeps
            // the load inside the page, 4-aligned (pages are page aligned). A volatile load of
            // plain bytes forms no reference.
            u32::from_le(unsafe { p.read_volatile() })
        })
        .collect()
}

/// Writes one EventIdx word as the device does.
fn device_write(event_page: u64, word: usize, value: u32, model: &mut [u32]) {
    let p = (event_page as usize + 4 * word) as *mut u32;
    // SAFETY: as in `read_page`; `word < WORDS`. The driver only reads this page with volatile
    // loads through a raw pointer.
    unsafe { p.write_volatile(value.to_le()) };
    model[word] = value;
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let dstrd: u64 = u.int_in_range(0..=15)?;
    let qid: u16 = if u.ratio(3u8, 4)? {
        u.int_in_range(0..=8)?
    } else {
        u.arbitrary()?
    };
    let bar = Arc::new(FakeBar {
        cap: dstrd << 32,
        writes: Mutex::new(Vec::new()),
    });
    let regs = Registers::new(bar.clone()).expect("the fake BAR never fails");
    let sb = ShadowBuffer::new(&pool()).expect("pool has room for two pages");
    let (shadow_page, event_page) = (sb.doorbells_addr(), sb.event_indexes_addr());
    assert_eq!(event_page, shadow_page + PAGE as u64);

    // As `QueuePair::new` (I/O queues) and `shadow_admin_doorbells` (qid 0) do.
    let admin = qid == 0;
    let first = regs.doorbell_offset(0, false);
    let stride = 4u128 << dstrd;
    let mut bells: Vec<Bell> = [false, true]
        .into_iter()
        .map(|cq| {
            let reg = regs.doorbell_offset(qid, cq);
            let mut db = Doorbell::new(reg);
            db.use_shadow(first, admin);
            Bell {
                db,
                reg,
                entry: (2 * u128::from(qid) + u128::from(cq)) * stride,
                last: 0,
                rings: 0,
                register_writes: 0,
            }
        })
        .collect();
    for b in &bells {
        if let Some(e) = b.db.shadow_entry() {
            assert_eq!(e as u128, b.entry, "shadow entry of qid {qid}");
        }
    }
    if !admin {
        if let (Some(s), Some(c)) = (bells[0].db.shadow_entry(), bells[1].db.shadow_entry()) {
            sb.reset_entries(s, c);
        }
    }
    // The device's view after the reset.
    let mut shadow_model = read_page(shadow_page);
    let mut event_model = read_page(event_page);
    for b in &bells {
        if let (Some(w), Some(_)) = (b.word(), b.db.shadow_entry()) {
            if !admin {
                assert_eq!((shadow_model[w], event_model[w]), (0, 0), "entry not reset");
            }
        }
    }

    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let which = usize::from(u.arbitrary::<bool>()?);
        match u.int_in_range(0u8..=3)? {
            0 | 1 => {
                // The device sets this doorbell's EventIdx.
                let Some(w) = bells[which].word() else {
                    continue;
                };
                let value = if u.ratio(3u8, 4)? {
                    let delta: i8 = u.arbitrary()?;
                    let low = bells[which].last.wrapping_add_signed(delta.into());
                    u32::from(low) | (u32::from(u.arbitrary::<u8>()? & 1) << 16)
                } else {
                    u.arbitrary()?
                };
                device_write(event_page, w, value, &mut event_model);
            }
            2 => {
                // The device writes some other word of its page.
                let w = u.choose_index(WORDS)?;
                let value = u.arbitrary()?;
                device_write(event_page, w, value, &mut event_model);
            }
            _ => {
                // The driver rings.
                let b = &mut bells[which];
                let new = if u.ratio(3u8, 4)? {
                    b.last.wrapping_add(u.int_in_range(0..=64)?)
                } else {
                    u.arbitrary()?
                };
                let old = b.last;
                let visible = b.word();
                let want_register = admin
                    || match visible {
                        None => true,
                        Some(w) => oracle(event_model[w] as u16, new, old),
                    };
                bar.writes.lock().unwrap().clear();
                b.db.ring(&regs, Some(&sb), new).expect("ring");
                b.last = new;
                b.rings += 1;
                let seen = std::mem::take(&mut *bar.writes.lock().unwrap());
                if want_register {
                    b.register_writes += 1;
                    assert_eq!(
                        seen,
                        vec![(b.reg, u32::from(new))],
                        "qid {qid} stride {stride}: {old} -> {new} must write the register"
                    );
                } else {
                    assert!(
                        seen.is_empty(),
                        "qid {qid} stride {stride}: {old} -> {new} wrote {seen:?}, the event index \
                         did not ask for it"
                    );
                }
                assert_eq!(b.db.writes, b.register_writes);
                assert_eq!(b.db.writes + b.db.avoided, b.rings);
                if let Some(w) = visible {
                    shadow_model[w] = u32::from(new);
                }
            }
        }
        assert_eq!(
            read_page(shadow_page),
            shadow_model,
            "qid {qid} stride {stride}: the shadow page holds something the driver should not \
             have written"
        );
        assert_eq!(
            read_page(event_page),
            event_model,
            "qid {qid} stride {stride}: the driver wrote into the controller's EventIdx page"
        );
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
