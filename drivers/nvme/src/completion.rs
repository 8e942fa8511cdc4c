//! Reading and validating completion entries from device-written memory.
//!
//! A completion queue is a ring of 16-byte entries in a pool buffer that the **device** writes.
//! It is not ordinary Rust memory: the device may write any slot at any time (a buggy or
//! malicious device may write anything, anywhere in the ring). So:
//!
//! 1. The driver never forms a reference (`&`/`&[u8]`) over the ring. [`CompletionRing::take_posted`]
//!    first reads only the status halfword of the head slot with one volatile load and compares
//!    its phase bit with the phase it expects. A mismatch means "nothing new".
//! 2. On a match it issues an acquire fence (the device wrote the entry's other fields before
//!    flipping the phase; the fence keeps our later loads from being satisfied earlier), then
//!    copies the whole entry **once** into a local [`RawCompletion`]. Every later decision uses
//!    that copy, so the device cannot change a field between the check and the use
//!    (no double fetch).
//! 3. [`validate`] checks the copy against what the driver knows: the phase again (a torn or
//!    rewritten entry), the submission queue ID, the SQ head pointer (inside the ring *and*
//!    inside the span of entries the device may have consumed), and the command ID (in range
//!    and outstanding). A bad entry becomes a [`CompletionError`] for that queue; nothing here
//!    panics, whatever the ring holds. The property test at the bottom feeds arbitrary ring
//!    memory through the whole path to hold us to that.
//!
//! The consumed slot is released to the device by the CQ head doorbell, which the queue rings
//! after a batch ([`crate::queue`]).

use std::sync::atomic::{fence, Ordering};

use tidepool::pool::DmaBuf;

use crate::spec::{Status, CQ_ENTRY_BYTES};

/// A completion entry exactly as copied out of the ring, not yet trusted.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RawCompletion {
    /// DW0: command-specific result.
    pub result: u32,
    /// DW1: reserved.
    pub dw1: u32,
    /// The SQ head pointer: the slot after the last SQ entry the controller consumed.
    pub sq_head: u16,
    /// The submission queue the command came from.
    pub sq_id: u16,
    /// The command identifier.
    pub cid: u16,
    /// Status field: bit 0 is the phase tag, bits 15:1 the status.
    pub status_field: u16,
}

impl RawCompletion {
    /// Decodes the 16 wire bytes (little-endian).
    pub fn from_bytes(b: [u8; CQ_ENTRY_BYTES]) -> RawCompletion {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        RawCompletion {
            result: u32_at(0),
            dw1: u32_at(4),
            sq_head: u16_at(8),
            sq_id: u16_at(10),
            cid: u16_at(12),
            status_field: u16_at(14),
        }
    }

    /// Decodes the entry from its two little-endian 64-bit words (bytes 0..8 and 8..16),
    /// as [`RawCompletion::from_bytes`] would.
    #[inline]
    pub fn from_words(lo: u64, hi: u64) -> RawCompletion {
        RawCompletion {
            result: lo as u32,
            dw1: (lo >> 32) as u32,
            sq_head: hi as u16,
            sq_id: (hi >> 16) as u16,
            cid: (hi >> 32) as u16,
            status_field: (hi >> 48) as u16,
        }
    }

    /// The 16 wire bytes (for tests and fakes).
    pub fn to_bytes(&self) -> [u8; CQ_ENTRY_BYTES] {
        let mut b = [0u8; CQ_ENTRY_BYTES];
        b[0..4].copy_from_slice(&self.result.to_le_bytes());
        b[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        b[8..10].copy_from_slice(&self.sq_head.to_le_bytes());
        b[10..12].copy_from_slice(&self.sq_id.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        b[14..16].copy_from_slice(&self.status_field.to_le_bytes());
        b
    }

    /// The phase tag.
    pub fn phase(&self) -> bool {
        self.status_field & 1 != 0
    }
}

/// A validated completion: the command it names was outstanding on this queue.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The command identifier (an outstanding slot of this queue).
    pub cid: u16,
    /// The status (success or the device's error).
    pub status: Status,
    /// DW0, the command-specific result (e.g. queues granted by Set Features).
    pub result: u32,
    /// The new SQ head: the device has consumed every entry before it.
    pub sq_head: u16,
}

/// A completion entry that breaks the protocol. The entry is consumed and reported; if it named
/// an outstanding command (`cid: Some`), that command is failed with this error rather than left
/// to time out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompletionError {
    /// The phase tag in the copied entry differs from the one seen an instant earlier: the
    /// device rewrote the slot while we read it.
    #[error("completion entry at CQ slot {slot} changed while being read (torn write): the device is misbehaving; reset the controller")]
    Torn {
        /// The slot.
        slot: u16,
    },
    /// The entry names another submission queue than the one paired with this CQ.
    #[error("completion names SQ {sq_id} but this CQ serves only SQ {expected}: the device is misbehaving; reset the controller")]
    WrongQueue {
        /// The SQ ID in the entry.
        sq_id: u16,
        /// The one expected.
        expected: u16,
        /// The command ID, if it was outstanding.
        cid: Option<u16>,
    },
    /// The SQ head is outside the ring, or moves past entries that were never submitted.
    #[error("completion reports SQ head {sq_head}, but only slots {old_head}..{tail} (of {entries}) were submitted: the device is misbehaving; reset the controller")]
    BadSqHead {
        /// The reported head.
        sq_head: u16,
        /// The head before this entry.
        old_head: u16,
        /// The SQ tail.
        tail: u16,
        /// SQ entries.
        entries: u16,
        /// The command ID, if it was outstanding.
        cid: Option<u16>,
    },
    /// The command ID is beyond the queue's depth: no command could have it.
    #[error("completion for command ID {cid}, but this queue only issues IDs below {depth}: the device is misbehaving; reset the controller")]
    CidOutOfRange {
        /// The command ID.
        cid: u16,
        /// The queue depth.
        depth: u16,
    },
    /// The command ID is in range but not outstanding (completed twice, or never submitted).
    #[error("completion for command ID {cid}, which is not outstanding (duplicate or spurious completion): the device is misbehaving; reset the controller")]
    NotOutstanding {
        /// The command ID.
        cid: u16,
    },
}

impl CompletionError {
    /// The outstanding command this bad entry named, if any (so the queue can fail it).
    pub fn outstanding_cid(&self) -> Option<u16> {
        match self {
            CompletionError::WrongQueue { cid, .. } | CompletionError::BadSqHead { cid, .. } => {
                *cid
            }
            _ => None,
        }
    }
}

/// What the queue knows when it validates an entry.
#[derive(Copy, Clone, Debug)]
pub struct Expected {
    /// The phase the slot was expected to carry.
    pub phase: bool,
    /// The slot (for error messages).
    pub slot: u16,
    /// The paired SQ's ID.
    pub sq_id: u16,
    /// The SQ's entry count.
    pub sq_entries: u16,
    /// The SQ head before this entry.
    pub sq_head: u16,
    /// The SQ tail (next slot the driver will write).
    pub sq_tail: u16,
    /// Command IDs are `0..depth`.
    pub depth: u16,
}

/// Is `x` in the circular span from `from` to `to` inclusive, on a ring of `n` slots?
fn in_circular_span(from: u16, to: u16, x: u16, n: u16) -> bool {
    let n = u32::from(n);
    let dist = |a: u16, b: u16| (u32::from(b) + n - u32::from(a)) % n;
    u32::from(x) < n && dist(from, x) <= dist(from, to)
}

/// Checks one copied entry. `outstanding(cid)` says whether `cid` (already known `< depth`)
/// names a command in flight on this queue.
///
/// Order of checks: phase (else the rest is meaningless), CID range and outstanding-ness (so
/// later errors can say which command to fail), SQ ID, SQ head.
#[inline]
pub fn validate(
    raw: &RawCompletion,
    expected: &Expected,
    outstanding: impl Fn(u16) -> bool,
) -> Result<Completion, CompletionError> {
    if raw.phase() != expected.phase {
        return Err(CompletionError::Torn {
            slot: expected.slot,
        });
    }
    if raw.cid >= expected.depth {
        return Err(CompletionError::CidOutOfRange {
            cid: raw.cid,
            depth: expected.depth,
        });
    }
    if !outstanding(raw.cid) {
        return Err(CompletionError::NotOutstanding { cid: raw.cid });
    }
    if raw.sq_id != expected.sq_id {
        return Err(CompletionError::WrongQueue {
            sq_id: raw.sq_id,
            expected: expected.sq_id,
            cid: Some(raw.cid),
        });
    }
    if !in_circular_span(
        expected.sq_head,
        expected.sq_tail,
        raw.sq_head,
        expected.sq_entries,
    ) {
        return Err(CompletionError::BadSqHead {
            sq_head: raw.sq_head,
            old_head: expected.sq_head,
            tail: expected.sq_tail,
            entries: expected.sq_entries,
            cid: Some(raw.cid),
        });
    }
    Ok(Completion {
        cid: raw.cid,
        status: Status::from_field(raw.status_field),
        result: raw.result,
        sq_head: raw.sq_head,
    })
}

/// An entry taken from the ring: the one copy, and what the ring expected of it.
#[derive(Copy, Clone, Debug)]
pub struct Posted {
    /// The copied entry.
    pub raw: RawCompletion,
    /// The phase the ring expected at that slot.
    pub phase: bool,
    /// The slot it was read from.
    pub slot: u16,
}

/// The consumer side of a completion queue ring in a pool buffer.
///
/// Owned by one queue; `&mut self` methods, no locking of its own.
#[derive(Debug)]
pub struct CompletionRing {
    buf: DmaBuf,
    entries: u16,
    head: u16,
    phase: bool,
}

impl CompletionRing {
    /// Takes a zeroed buffer of at least `entries * 16` bytes (the device starts writing with
    /// phase 1, so zeroed slots read as "not new").
    ///
    /// Returns `None` if the buffer is too small or `entries < 2`.
    pub fn new(buf: DmaBuf, entries: u16) -> Option<CompletionRing> {
        if entries < 2 || buf.capacity() < usize::from(entries) * CQ_ENTRY_BYTES {
            return None;
        }
        Some(CompletionRing {
            buf,
            entries,
            head: 0,
            phase: true,
        })
    }

    /// The ring's device address (for Create I/O CQ / ACQ).
    pub fn device_addr(&self) -> u64 {
        self.buf.device_addr().0
    }

    /// The slot the next entry will be read from: the value for the CQ head doorbell.
    #[inline]
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Entries in the ring.
    #[inline]
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// Takes the entry at the head if the device has posted one: returns the copy with the
    /// phase that was expected there and its slot, and advances the head (flipping the expected phase on
    /// wrap). `None`: nothing new.
    ///
    /// The caller must validate the copy ([`validate`]) before acting on it, and ring the CQ
    /// head doorbell with [`CompletionRing::head`] to give the slots back.
    #[inline]
    pub fn take_posted(&mut self) -> Option<Posted> {
        let slot = self.head;
        let at = usize::from(slot) * CQ_ENTRY_BYTES;
        let status = self.read_status(at);
        if (status & 1 != 0) != self.phase {
            return None;
        }
        // The device wrote the entry before it flipped the phase: order our reads after it.
        fence(Ordering::Acquire);
        let (lo, hi) = self.read_entry(at);
        let posted = Posted {
            raw: RawCompletion::from_words(lo, hi),
            phase: self.phase,
            slot,
        };
        self.head += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase = !self.phase;
        }
        Some(posted)
    }

    /// Plays the device: writes `bytes` into the ring at byte `at` (clipped to the ring).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn device_write(&mut self, at: usize, bytes: &[u8]) {
        let ring = usize::from(self.entries) * CQ_ENTRY_BYTES;
        if at < ring {
            let n = bytes.len().min(ring - at);
            let _ = self.buf.write_at(at, &bytes[..n]);
        }
    }

    /// Copies the entry at byte `at` once: two volatile 64-bit loads (each byte read once).
    #[inline]
    fn read_entry(&self, at: usize) -> (u64, u64) {
        let p = self.buf.as_ptr().wrapping_add(at).cast::<u64>();
        // SAFETY: `at + 16 <= entries * 16 <= capacity` (checked in `new`, `head < entries`);
        // the buffer is 4 KiB aligned and `at` a multiple of 16, so `p` is 8-byte aligned;
        // volatile loads of plain bytes the device may be writing form no reference and read
        // some valid u64s.
        unsafe {
            (
                u64::from_le(p.read_volatile()),
                u64::from_le(p.add(1).read_volatile()),
            )
        }
    }

    /// One volatile load of the status halfword of the entry at byte `at`.
    #[inline]
    fn read_status(&self, at: usize) -> u16 {
        let p = self.buf.as_ptr().wrapping_add(at + 14).cast::<u16>();
        // SAFETY: `at + 16 <= entries * 16 <= capacity` (checked in `new`, `head < entries`);
        // the buffer is 4 KiB aligned so `p` is 2-byte aligned; a volatile load of plain bytes
        // the device may be writing creates no reference and reads some valid u16.
        u16::from_le(unsafe { p.read_volatile() })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::test_pool::pool;
    use proptest::prelude::*;

    fn expect(phase: bool) -> Expected {
        Expected {
            phase,
            slot: 0,
            sq_id: 1,
            sq_entries: 8,
            sq_head: 2,
            sq_tail: 5,
            depth: 8,
        }
    }

    fn entry(cid: u16, sq_head: u16, sq_id: u16, phase: bool) -> RawCompletion {
        RawCompletion {
            result: 0,
            dw1: 0,
            sq_head,
            sq_id,
            cid,
            status_field: u16::from(phase),
        }
    }

    proptest! {
        /// The word decoder the ring uses agrees with the byte decoder.
        #[test]
        fn words_and_bytes_decode_alike(b in proptest::array::uniform16(any::<u8>())) {
            let lo = u64::from_le_bytes(b[..8].try_into().unwrap());
            let hi = u64::from_le_bytes(b[8..].try_into().unwrap());
            prop_assert_eq!(RawCompletion::from_words(lo, hi), RawCompletion::from_bytes(b));
        }
    }

    #[test]
    fn valid_entry_passes() {
        let c = validate(&entry(3, 4, 1, true), &expect(true), |cid| cid == 3).unwrap();
        assert_eq!(c.cid, 3);
        assert_eq!(c.sq_head, 4);
        assert!(c.status.is_success());
    }

    #[test]
    fn each_bad_field_gets_its_own_error() {
        let e = expect(true);
        let all = |_| true;
        assert_eq!(
            validate(&entry(3, 4, 1, false), &e, all),
            Err(CompletionError::Torn { slot: 0 })
        );
        assert_eq!(
            validate(&entry(8, 4, 1, true), &e, all),
            Err(CompletionError::CidOutOfRange { cid: 8, depth: 8 })
        );
        assert_eq!(
            validate(&entry(3, 4, 1, true), &e, |_| false),
            Err(CompletionError::NotOutstanding { cid: 3 })
        );
        let wrong_q = validate(&entry(3, 4, 2, true), &e, all).unwrap_err();
        assert_eq!(wrong_q.outstanding_cid(), Some(3));
        // Head 6 is beyond the tail (5); head 1 is behind the old head (2); 9 is off the ring.
        for head in [6, 1, 9, u16::MAX] {
            let err = validate(&entry(3, head, 1, true), &e, all).unwrap_err();
            assert!(
                matches!(err, CompletionError::BadSqHead { .. }),
                "head {head}: {err}"
            );
        }
        // The span's ends are fine.
        assert!(validate(&entry(3, 2, 1, true), &e, all).is_ok());
        assert!(validate(&entry(3, 5, 1, true), &e, all).is_ok());
    }

    #[test]
    fn sq_head_span_wraps_around() {
        let e = Expected {
            sq_head: 6,
            sq_tail: 1,
            ..expect(true)
        };
        for ok in [6, 7, 0, 1] {
            assert!(
                validate(&entry(0, ok, 1, true), &e, |_| true).is_ok(),
                "{ok}"
            );
        }
        for bad in [2, 5] {
            assert!(
                validate(&entry(0, bad, 1, true), &e, |_| true).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn ring_reads_new_entries_and_flips_phase_on_wrap() {
        let p = pool();
        let mut buf = p.try_alloc(4096).unwrap();
        // Slots 0 and 1 posted with phase 1; slot 2 still zero.
        buf.write_at(0, &entry(5, 1, 1, true).to_bytes()).unwrap();
        buf.write_at(16, &entry(6, 2, 1, true).to_bytes()).unwrap();
        let mut ring = CompletionRing::new(buf, 3).unwrap();
        assert_eq!(ring.take_posted().map(|p| p.raw.cid), Some(5));
        assert_eq!(ring.take_posted().map(|p| p.raw.cid), Some(6));
        assert!(ring.take_posted().is_none());
        assert_eq!(ring.head(), 2);
        // Too small a buffer or ring is refused.
        assert!(CompletionRing::new(p.try_alloc(512).unwrap(), 64).is_none());
        assert!(CompletionRing::new(p.try_alloc(512).unwrap(), 1).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Fuzz: arbitrary bytes in the completion ring, an arbitrary set of outstanding
        /// commands and SQ state. Draining the ring through `next` + `validate` never panics,
        /// terminates, and accepts only entries that name an outstanding command exactly once,
        /// with an SQ head inside the submitted span.
        #[test]
        fn arbitrary_ring_memory_never_panics_and_accepts_only_sane_entries(
            ring_bytes in proptest::collection::vec(any::<u8>(), 16 * 16),
            outstanding_mask in any::<u16>(),
            sq_head in 0u16..16,
            in_flight in 0u16..16,
        ) {
            let p = pool();
            let mut buf = p.try_alloc(4096).unwrap();
            buf.write_at(0, &ring_bytes).unwrap();
            let mut ring = CompletionRing::new(buf, 16).unwrap();
            let mut outstanding = outstanding_mask;
            let sq_tail = (sq_head + in_flight) % 16;
            let mut head = sq_head;
            let mut taken = 0;
            while let Some(posted) = ring.take_posted() {
                taken += 1;
                prop_assert!(taken <= 16, "ring yielded more than one lap without the device writing");
                let e = Expected {
                    phase: posted.phase,
                    slot: posted.slot,
                    sq_id: 1,
                    sq_entries: 16,
                    sq_head: head,
                    sq_tail,
                    depth: 16,
                };
                match validate(&posted.raw, &e, |cid| outstanding & (1 << cid) != 0) {
                    Ok(c) => {
                        prop_assert!(c.cid < 16);
                        prop_assert!(outstanding & (1 << c.cid) != 0);
                        prop_assert!(in_circular_span(head, sq_tail, c.sq_head, 16));
                        outstanding &= !(1 << c.cid);
                        head = c.sq_head;
                    }
                    Err(err) => {
                        // Typed, printable, and any named command really was outstanding.
                        prop_assert!(!err.to_string().is_empty());
                        if let Some(cid) = err.outstanding_cid() {
                            prop_assert!(outstanding & (1 << cid) != 0);
                            outstanding &= !(1 << cid);
                        }
                    }
                }
            }
        }
    }
}
