//! Fuzz target: the NVMe completion path, `CompletionRing::take_posted` + `validate`, driven
//! the way `QueuePair::poll` drives it, against a device that writes arbitrary bytes.
//!
//! The input is a script. Its first bytes choose the ring size and queue ID; the rest is a
//! sequence of operations:
//! - **submit**: the driver takes a free command ID, marks it outstanding, advances the SQ tail;
//! - **device write**: the device writes 16 arbitrary bytes into any slot of the CQ ring (through
//!   the buffer's raw pointer, as DMA would);
//! - **device post**: the device writes a plausible entry (some fields drawn near the valid
//!   values, so the fuzzer reaches the accept path quickly) at the slot the driver reads next;
//! - **drain**: the driver takes every posted entry and validates it, as `poll` does;
//! - **validate**: `validate` alone on an arbitrary entry and arbitrary (consistent) queue state.
//!
//! A model of the ring (a private copy of what the device wrote, the expected head and phase)
//! and of the queue (outstanding command IDs, SQ head and tail) is kept alongside, and every
//! step asserts the contract rather than just "no panic":
//! - `take_posted` returns an entry exactly when the head slot's phase tag matches the phase
//!   expected there, and the entry is a faithful copy of that slot; it never yields more than
//!   one lap of the ring without a device write;
//! - `validate` gives exactly the verdict of an independent statement of the rules (phase,
//!   CID range, outstanding, SQ ID, SQ head within the submitted span), typed;
//! - an accepted completion names a command that was outstanding, and completes it at most
//!   once (it is retired in the model and a second completion for it must be rejected);
//! - a rejected entry leaves the queue state unchanged, and any command the error names really
//!   was outstanding.

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Pool, PoolConfig};
use tidepool::share::identity::Identity;
use tidepool_nvme::completion::{
    validate, CompletionError, CompletionRing, Expected, RawCompletion,
};
use tidepool_nvme::spec::{Status, CQ_ENTRY_BYTES};

/// Largest ring tried: 256 entries fill one 4 KiB page.
const MAX_ENTRIES: u16 = 256;
/// Operations per input, so one input cannot run for long.
const MAX_OPS: usize = 512;

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

/// The queue as `QueuePair` keeps it, minus the hardware.
struct QueueModel {
    qid: u16,
    sq_entries: u16,
    sq_head: u16,
    sq_tail: u16,
    /// `outstanding[cid]`: command `cid` is in flight. `depth = entries - 1` IDs.
    outstanding: Vec<bool>,
    free: Vec<u16>,
}

impl QueueModel {
    fn depth(&self) -> u16 {
        self.outstanding.len() as u16
    }
}

/// What the driver's ring should do, kept independently of `CompletionRing`.
struct RingModel {
    /// A private copy of every slot, written only when the fake device writes the ring.
    slots: Vec<[u8; CQ_ENTRY_BYTES]>,
    head: u16,
    phase: bool,
}

/// The rules `validate` must implement, stated independently: `Ok(())` or the exact error.
fn expected_verdict(
    raw: &RawCompletion,
    e: &Expected,
    outstanding: impl Fn(u16) -> bool,
) -> std::result::Result<(), CompletionError> {
    if (raw.status_field & 1 == 1) != e.phase {
        return Err(CompletionError::Torn { slot: e.slot });
    }
    if raw.cid >= e.depth {
        return Err(CompletionError::CidOutOfRange {
            cid: raw.cid,
            depth: e.depth,
        });
    }
    if !outstanding(raw.cid) {
        return Err(CompletionError::NotOutstanding { cid: raw.cid });
    }
    if raw.sq_id != e.sq_id {
        return Err(CompletionError::WrongQueue {
            sq_id: raw.sq_id,
            expected: e.sq_id,
            cid: Some(raw.cid),
        });
    }
    // The new head may be anywhere from the old head up to the tail, going round the ring.
    let n = i64::from(e.sq_entries);
    let forward = |a: u16, b: u16| (i64::from(b) - i64::from(a)).rem_euclid(n);
    let in_span = i64::from(raw.sq_head) < n
        && forward(e.sq_head, raw.sq_head) <= forward(e.sq_head, e.sq_tail);
    if !in_span {
        return Err(CompletionError::BadSqHead {
            sq_head: raw.sq_head,
            old_head: e.sq_head,
            tail: e.sq_tail,
            entries: e.sq_entries,
            cid: Some(raw.cid),
        });
    }
    Ok(())
}

/// Checks `validate` on one entry against `expected_verdict` and the completion it builds.
fn check_validate(
    raw: &RawCompletion,
    e: &Expected,
    outstanding: &[bool],
) -> std::result::Result<tidepool_nvme::completion::Completion, CompletionError> {
    let is_out = |cid: u16| outstanding[usize::from(cid)];
    let got = validate(raw, e, is_out);
    let want = expected_verdict(raw, e, is_out);
    match (&got, want) {
        (Ok(c), Ok(())) => {
            assert_eq!(c.cid, raw.cid);
            assert_eq!(c.result, raw.result);
            assert_eq!(c.sq_head, raw.sq_head);
            assert_eq!(c.status, Status::from_field(raw.status_field));
            assert!(c.cid < e.depth && outstanding[usize::from(c.cid)]);
        }
        (Err(g), Err(w)) => {
            assert_eq!(g, &w, "wrong error for {raw:?} under {e:?}");
            assert!(!g.to_string().is_empty());
            if let Some(cid) = g.outstanding_cid() {
                assert!(cid < e.depth && outstanding[usize::from(cid)]);
            }
        }
        (g, w) => panic!("validate({raw:?}, {e:?}) = {g:?}, the rules say {w:?}"),
    }
    got
}

/// Writes one slot as the device would: volatile stores through the raw pointer.
fn device_write(base: *mut u8, ring: &mut RingModel, slot: u16, bytes: [u8; CQ_ENTRY_BYTES]) {
    let at = usize::from(slot) * CQ_ENTRY_BYTES;
    for (i, b) in bytes.iter().enumerate() {
        // SAFETY: `slot < entries` and the buffer holds `entries * 16` bytes (checked by
        // `CompletionRing::new`); the buffer lives until the end of `run`. Byte stores form no
        // reference and the ring only reads with volatile loads.
        unsafe { base.add(at + i).write_volatile(*b) };
    }
    ring.slots[usize::from(slot)] = bytes;
}

/// Takes and validates every posted entry, as `QueuePair::poll` does, checking each step.
fn drain(cq: &mut CompletionRing, ring: &mut RingModel, q: &mut QueueModel) {
    let entries = ring.slots.len() as u16;
    let mut taken = 0u32;
    loop {
        let slot_bytes = ring.slots[usize::from(ring.head)];
        let posted_phase = RawCompletion::from_bytes(slot_bytes).phase();
        let Some(posted) = cq.take_posted() else {
            assert_ne!(posted_phase, ring.phase, "a posted entry was missed");
            assert_eq!(cq.head(), ring.head, "an empty take moved the head");
            return;
        };
        assert_eq!(
            posted_phase, ring.phase,
            "took an entry whose phase is stale"
        );
        assert_eq!(posted.slot, ring.head);
        assert_eq!(posted.phase, ring.phase);
        assert_eq!(
            posted.raw,
            RawCompletion::from_bytes(slot_bytes),
            "copy differs from the slot"
        );
        taken += 1;
        assert!(
            taken <= u32::from(entries),
            "more than one lap without a device write"
        );
        ring.head += 1;
        if ring.head == entries {
            ring.head = 0;
            ring.phase = !ring.phase;
        }
        assert_eq!(cq.head(), ring.head);

        let e = Expected {
            phase: posted.phase,
            slot: posted.slot,
            sq_id: q.qid,
            sq_entries: q.sq_entries,
            sq_head: q.sq_head,
            sq_tail: q.sq_tail,
            depth: q.depth(),
        };
        let before = (q.sq_head, q.outstanding.clone());
        match check_validate(&posted.raw, &e, &q.outstanding) {
            Ok(c) => {
                // Retire it: a second completion for this command must now be rejected.
                q.outstanding[usize::from(c.cid)] = false;
                q.free.push(c.cid);
                q.sq_head = c.sq_head;
            }
            Err(_) => {
                // Rejection changes nothing (the real queue then resets the controller; the
                // model keeps going to exercise more of the ring).
                assert_eq!((q.sq_head, q.outstanding.clone()), before);
            }
        }
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let entries: u16 = u.int_in_range(2..=MAX_ENTRIES)?;
    let qid: u16 = u.int_in_range(0..=3)?;
    let bytes = (usize::from(entries) * CQ_ENTRY_BYTES).max(4096);
    let buf = pool().try_alloc(bytes).expect("pool has room for one ring");
    let base = buf.as_ptr();
    let mut cq = CompletionRing::new(buf, entries).expect("ring size is valid");
    assert_eq!((cq.head(), cq.entries()), (0, entries));
    let mut ring = RingModel {
        slots: vec![[0; CQ_ENTRY_BYTES]; usize::from(entries)],
        head: 0,
        phase: true,
    };
    let depth = entries - 1;
    let mut q = QueueModel {
        qid,
        sq_entries: entries,
        sq_head: 0,
        sq_tail: 0,
        outstanding: vec![false; usize::from(depth)],
        free: (0..depth).rev().collect(),
    };

    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0u8..=4)? {
            0 => {
                let sq_full = (q.sq_tail + 1) % q.sq_entries == q.sq_head;
                if !sq_full {
                    if let Some(cid) = q.free.pop() {
                        q.outstanding[usize::from(cid)] = true;
                        q.sq_tail = (q.sq_tail + 1) % q.sq_entries;
                    }
                }
            }
            1 => {
                let slot = u.int_in_range(0..=entries - 1)?;
                let bytes: [u8; CQ_ENTRY_BYTES] = u.arbitrary()?;
                device_write(base, &mut ring, slot, bytes);
            }
            2 => {
                // A plausible entry at the slot the driver reads next, each field possibly off.
                let pick_cid = u.arbitrary::<u8>()?;
                let cid = if pick_cid < 200 {
                    let live: Vec<u16> = (0..depth)
                        .filter(|&c| q.outstanding[usize::from(c)])
                        .collect();
                    if live.is_empty() {
                        u.arbitrary()?
                    } else {
                        live[usize::from(pick_cid) % live.len()]
                    }
                } else {
                    u.arbitrary()?
                };
                let span = (q.sq_tail + q.sq_entries - q.sq_head) % q.sq_entries;
                let step: u16 = u.int_in_range(0..=span + 1)?;
                let sq_head = (q.sq_head + step) % (q.sq_entries + 1);
                let sq_id = if u.ratio(7u8, 8)? {
                    q.qid
                } else {
                    u.arbitrary()?
                };
                let phase = if u.ratio(15u8, 16)? {
                    ring.phase
                } else {
                    !ring.phase
                };
                let status_code: u16 = if u.ratio(3u8, 4)? { 0 } else { u.arbitrary()? };
                let raw = RawCompletion {
                    result: u.arbitrary()?,
                    dw1: u.arbitrary()?,
                    sq_head,
                    sq_id,
                    cid,
                    status_field: (status_code << 1) | u16::from(phase),
                };
                let slot = ring.head;
                device_write(base, &mut ring, slot, raw.to_bytes());
            }
            3 => drain(&mut cq, &mut ring, &mut q),
            _ => {
                // `validate` alone, with queue state consistent as the driver keeps it
                // (head and tail inside the ring), everything the device writes arbitrary.
                let sq_entries: u16 = u.int_in_range(1..=u16::MAX)?;
                let e = Expected {
                    phase: u.arbitrary()?,
                    slot: u.arbitrary()?,
                    sq_id: u.arbitrary()?,
                    sq_entries,
                    sq_head: u.int_in_range(0..=sq_entries - 1)?,
                    sq_tail: u.int_in_range(0..=sq_entries - 1)?,
                    depth: u.int_in_range(0..=64)?,
                };
                let raw = RawCompletion::from_bytes(u.arbitrary()?);
                let outstanding: u64 = u.arbitrary()?;
                let set: Vec<bool> = (0..64).map(|i| outstanding & (1 << i) != 0).collect();
                let _ = check_validate(&raw, &e, &set);
            }
        }
    }
    // The ring decodes its words as the byte decoder would, for every slot the device wrote.
    for s in &ring.slots {
        let lo = u64::from_le_bytes(s[..8].try_into().expect("8 bytes"));
        let hi = u64::from_le_bytes(s[8..].try_into().expect("8 bytes"));
        assert_eq!(
            RawCompletion::from_words(lo, hi),
            RawCompletion::from_bytes(*s)
        );
        assert_eq!(RawCompletion::from_bytes(*s).to_bytes(), *s);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
