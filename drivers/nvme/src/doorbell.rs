//! Doorbells: a plain MMIO register write, or a **shadow doorbell** in memory with an event
//! index (Base spec 1.4, 5.8 Doorbell Buffer Config; the scheme virtio calls event suppression).
//!
//! # Shadow doorbells
//! The Doorbell Buffer Config admin command gives the controller two pages of host memory:
//! - the **shadow doorbell** page, laid out exactly like the doorbell registers (entry
//!   `2 * qid` = SQ tail, `2 * qid + 1` = CQ head, `4 << CAP.DSTRD` bytes apart): the driver
//!   writes every new tail/head value there;
//! - the **EventIdx** page, same layout, written by the controller: "I have looked at the
//!   shadow value up to this index; ring the register if you move beyond it".
//!
//! Ringing a doorbell then means (as Linux's `nvme_dbbuf_update_and_check_event` does):
//! store the new value in the shadow entry, full fence, load the event index, and write the
//! MMIO register only if the update crossed the event index
//! (`new - event - 1 < new - old`, modulo 2^16, [`need_event`]). An emulated controller that
//! is still working through a queue reads the shadow entry itself and needs no register write;
//! every register write avoided is one trap into the device model.
//!
//! The admin queue always writes the register too (Linux does not use shadow doorbells for
//! it, and controllers have differed on whether they read its shadow entry), while keeping its
//! shadow entry current, so either reading is right.
//!
//! # Ordering
//! The SQ entries must be visible before the shadow tail (the controller may read the shadow
//! entry at any time, not only after an MMIO write): the caller's full fence before
//! [`Doorbell::ring`] orders them. Between the shadow store and the event-index load a full
//! fence keeps the load from passing the store (store→load ordering needs `mfence` on x86); the
//! controller orders its event-index store before its shadow load likewise.
//!
//! # Locking
//! None: a [`Doorbell`] belongs to one queue (`&mut self`); distinct queues use distinct
//! entries of the shared pages.

use std::sync::atomic::{fence, Ordering};

use tidepool::device::DeviceError;
use tidepool::pool::{DmaBuf, Pool, PoolError};

use crate::regs::Registers;
use crate::spec::PAGE_BYTES;

/// Does moving a doorbell from `old` to `new` cross the controller's event index `event`?
/// (All modulo 2^16, like the 16-bit queue indexes.)
///
/// ```
/// use tidepool_nvme::doorbell::need_event;
/// assert!(need_event(5, 6, 5));   // the controller waits for entry 5: ring
/// assert!(!need_event(9, 6, 5));  // it will look again at 9 on its own: no need
/// assert!(need_event(65535, 1, 65534)); // wrap-around
/// ```
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The two pages given to the controller with Doorbell Buffer Config: shadow doorbells at
/// offset 0, event indexes at offset 4096. Owned by the controller's hardware handle; queues
/// address entries in it by byte offset.
#[derive(Debug)]
pub struct ShadowBuffer {
    buf: DmaBuf,
}

impl ShadowBuffer {
    /// Takes two zeroed pages from the pool's immediate path.
    pub fn new(pool: &Pool) -> Result<ShadowBuffer, PoolError> {
        Ok(ShadowBuffer {
            buf: pool.try_alloc(2 * PAGE_BYTES)?,
        })
    }

    /// Device address of the shadow doorbell page (PRP1 of Doorbell Buffer Config).
    pub fn doorbells_addr(&self) -> u64 {
        self.buf.device_addr().0
    }

    /// Device address of the EventIdx page (PRP2).
    pub fn event_indexes_addr(&self) -> u64 {
        self.buf.device_addr().0 + PAGE_BYTES as u64
    }

    /// Sets a queue's four entries (shadow SQ tail, CQ head and their event indexes) to 0, as
    /// a newly created queue's indexes are. Only while the queue does not exist on the
    /// controller (before Create I/O SQ/CQ).
    pub fn reset_entries(&self, sq_entry: usize, cq_entry: usize) {
        for off in [sq_entry, cq_entry] {
            self.store(off, 0);
            self.store(PAGE_BYTES + off, 0);
        }
    }

    /// One volatile 32-bit store at byte `off` (< 8 KiB, 4-aligned; out-of-range offsets are
    /// ignored: a queue ID beyond one page of entries never gets a shadow doorbell).
    fn store(&self, off: usize, value: u32) {
        if off % 4 != 0 || off + 4 > self.buf.capacity() {
            return;
        }
        let p = self.buf.as_ptr().wrapping_add(off).cast::<u32>();
        // SAFETY: checked in bounds and 4-byte aligned (the buffer is page aligned); a raw
        // volatile store forms no reference to memory the controller reads.
        unsafe { p.write_volatile(value.to_le()) }
    }

    /// One volatile 32-bit load at byte `off` (see [`ShadowBuffer::store`]); 0 if out of range.
    fn load(&self, off: usize) -> u32 {
        if off % 4 != 0 || off + 4 > self.buf.capacity() {
            return 0;
        }
        let p = self.buf.as_ptr().wrapping_add(off).cast::<u32>();
        // SAFETY: as in `store`; a volatile load of plain bytes the controller may be writing
        // reads some valid u32.
        u32::from_le(unsafe { p.read_volatile() })
    }
}

/// How a doorbell is rung.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Register write every time.
    Mmio,
    /// Shadow entry at this byte offset; the register only when the event index asks.
    Shadow(usize),
    /// Shadow entry kept current *and* the register written every time (the admin queue).
    ShadowAndMmio(usize),
}

/// One doorbell of one queue, with counters of register writes made and avoided.
///
/// Crate-internal; `pub` and hidden only so that the fuzz target `shadow_event_idx`
/// (drivers/nvme/fuzz) can drive the real ring path.
#[doc(hidden)]
#[derive(Debug)]
pub struct Doorbell {
    /// Byte offset of the register in BAR0 (and of the entry in the shadow pages).
    offset: usize,
    mode: Mode,
    /// The value last rung (the shadow entry's current value).
    last: u16,
    /// MMIO writes made.
    pub writes: u64,
    /// Rings that needed no MMIO write (shadow mode).
    pub avoided: u64,
}

impl Doorbell {
    /// A doorbell at register offset `offset` (from [`Registers::doorbell_offset`]).
    pub fn new(offset: usize) -> Doorbell {
        Doorbell {
            offset,
            mode: Mode::Mmio,
            last: 0,
            writes: 0,
            avoided: 0,
        }
    }

    /// Switches to shadow mode (`always_mmio`: keep writing the register too). The entry's
    /// offset in the shadow pages equals the register's offset from the first doorbell.
    ///
    /// Each shadow page is one page: a doorbell whose entry does not fit in it (a large
    /// CAP.DSTRD or queue ID) keeps plain register writes, since the controller can see neither
    /// a shadow value nor give an event index for it.
    pub fn use_shadow(&mut self, first_doorbell: usize, always_mmio: bool) {
        let entry = self.offset - first_doorbell;
        if entry + 4 > PAGE_BYTES {
            self.mode = Mode::Mmio;
            return;
        }
        self.mode = if always_mmio {
            Mode::ShadowAndMmio(entry)
        } else {
            Mode::Shadow(entry)
        };
    }

    /// The entry's byte offset in the shadow pages, if shadowed.
    pub fn shadow_entry(&self) -> Option<usize> {
        match self.mode {
            Mode::Mmio => None,
            Mode::Shadow(e) | Mode::ShadowAndMmio(e) => Some(e),
        }
    }

    /// Publishes `value`. The caller has fenced its ring writes (SQ entries) before.
    #[inline]
    pub fn ring(
        &mut self,
        regs: &Registers,
        shadow: Option<&ShadowBuffer>,
        value: u16,
    ) -> Result<(), DeviceError> {
        let old = std::mem::replace(&mut self.last, value);
        match (self.mode, shadow) {
            (Mode::Shadow(entry), Some(sb)) => {
                sb.store(entry, u32::from(value));
                fence(Ordering::SeqCst);
                let event = sb.load(PAGE_BYTES + entry) as u16;
                if !need_event(event, value, old) {
                    self.avoided += 1;
                    return Ok(());
                }
            }
            (Mode::ShadowAndMmio(entry), Some(sb)) => sb.store(entry, u32::from(value)),
            _ => {}
        }
        self.writes += 1;
        regs.ring(self.offset, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn event_index_rule_matches_linux() {
        // Controller waiting at 3, we move 2 -> 4: crossed.
        assert!(need_event(3, 4, 2));
        // Moving 2 -> 3 with event 3: the controller has already seen up to 3? It asked to be
        // told when entry 3 is *passed*: new - event - 1 = -1 (65535) is not < 1.
        assert!(!need_event(3, 3, 2));
        assert!(!need_event(10, 4, 2));
        // No movement never rings.
        assert!(!need_event(0, 7, 7));
    }

    #[test]
    fn entries_beyond_one_page_stay_register_doorbells() {
        // DSTRD 10 (4 KiB stride): queue 1's SQ entry is at 8 KiB, the admin CQ's at 4 KiB.
        let first = 0x1000;
        for (offset, shadowed) in [
            (first, true),
            (first + 4092, true),
            (first + 4096, false),
            (first + 8192, false),
        ] {
            for always_mmio in [false, true] {
                let mut db = Doorbell::new(offset);
                db.use_shadow(first, always_mmio);
                assert_eq!(db.shadow_entry().is_some(), shadowed, "offset {offset:#x}");
                if !shadowed {
                    assert_eq!(db.mode, Mode::Mmio);
                }
            }
        }
    }

    proptest! {
        /// `need_event` is true exactly when `event` lies in the half-open span [old, new)
        /// walked forwards modulo 2^16.
        #[test]
        fn need_event_is_span_membership(event: u16, old: u16, step in 0u16..4096) {
            let new = old.wrapping_add(step);
            let in_span = (0..step).any(|k| old.wrapping_add(k) == event);
            prop_assert_eq!(need_event(event, new, old), in_span);
        }
    }
}
