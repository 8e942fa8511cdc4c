//! Fuzz target: the driver side of the split virtqueue (`SplitRing`, shared with virtio-net in
//! `tidepool_virtqueue` and re-exported as `tidepool_vhost_user_blk::ring`) against a backend
//! that writes anything anywhere in the ring memory.
//!
//! The input is a script. Its first byte picks the queue size (a power of two, 1 to 256); the
//! rest is a sequence of operations: the driver adds a chain (sometimes an invalid one),
//! publishes, pops a completion, asks whether to kick, validates an entry directly or abandons
//! everything; the
//! backend writes a used entry, sets `used.idx`, completes a request plausibly, or scribbles
//! arbitrary bytes over any part of the ring (descriptor table and avail ring included).
//!
//! A private model of the outstanding chains (head, descriptor count, writable bytes) and of the
//! consumed used index is kept alongside, and each step asserts the ring's contract:
//! - `pop_used` returns exactly what the rules make of the used ring's current bytes:
//!   nothing when `used.idx` has not moved, `IndexAhead` when it moved past the outstanding
//!   requests, `IdOutOfRange` / `NotOutstanding` / `LenTooLong` for a bad entry, else the
//!   entry, which completes an outstanding request at most once, with `len` within what that
//!   request let the backend write;
//! - any error leaves the ring unchanged (outstanding count, free descriptors, next head) but
//!   broken: every later `pop_used` and `add` says `Broken`;
//! - `add` writes a well-formed chain and avail entry the backend can follow, returns the head
//!   `next_head` predicted, and refuses invalid chains with a typed error and no change;
//!   `publish` stores `avail.idx` once for everything added since the last publish;
//! - `needs_kick` reflects `used.flags`; `abandon_all` returns every outstanding head once and
//!   frees every descriptor.

#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tidepool_vhost_user_blk::ring::{
    Desc, Layout, RingError, SplitRing, Used, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY,
};

/// Operations per input.
const MAX_OPS: usize = 512;
/// The queue number the ring is given (named in its errors).
const QUEUE: u16 = 3;

/// Ring memory the fuzzer plays the backend in: 16-aligned, zeroed. All access, ours and the
/// ring's, goes through the one raw pointer with volatile loads and stores.
struct Mem {
    words: Vec<u128>,
    len: usize,
}

impl Mem {
    fn new(len: usize) -> Mem {
        Mem {
            words: vec![0u128; len.div_ceil(16)],
            len,
        }
    }

    fn base(&mut self) -> *mut u8 {
        self.words.as_mut_ptr().cast()
    }

    fn read(&mut self, off: usize, n: usize) -> u64 {
        assert!(off + n <= self.len);
        let base = self.base();
        (0..n).rev().fold(0u64, |acc, i| {
            // SAFETY: `off + n <= len` bytes of our own allocation; a byte load by value.
            (acc << 8) | u64::from(unsafe { base.add(off + i).read_volatile() })
        })
    }

    fn write(&mut self, off: usize, n: usize, v: u64) {
        assert!(off + n <= self.len);
        let base = self.base();
        for i in 0..n {
            // SAFETY: as in `read`; a byte store forms no reference.
            unsafe { base.add(off + i).write_volatile((v >> (8 * i)) as u8) };
        }
    }
}

/// What the driver should believe, kept apart from `SplitRing`.
struct Model {
    size: u16,
    /// Per head: (descriptors in the chain, bytes a used entry may claim).
    chains: Vec<Option<(usize, u32)>>,
    outstanding: usize,
    free: usize,
    last_used: u16,
    next_avail: u16,
    published: u16,
    broken: bool,
}

/// The verdict the rules give for one used entry (`id`, `len`).
fn entry_verdict(m: &Model, id: u32, len: u32) -> std::result::Result<Used<()>, RingError> {
    if id >= u32::from(m.size) {
        return Err(RingError::IdOutOfRange {
            queue: QUEUE,
            id,
            size: m.size,
        });
    }
    let Some((_, writable)) = m.chains[id as usize] else {
        return Err(RingError::NotOutstanding { queue: QUEUE, id });
    };
    if len > writable {
        return Err(RingError::LenTooLong {
            queue: QUEUE,
            id,
            len,
            allowed: writable,
        });
    }
    Ok(Used {
        head: id as u16,
        len,
        token: (),
    })
}

/// The ring's externally visible state, which an error must leave as it was.
fn snapshot(r: &SplitRing<()>) -> (usize, usize, Option<u16>) {
    (r.outstanding(), r.free_descriptors(), r.next_head())
}

fn check_consistent(r: &SplitRing<()>, m: &Model) {
    assert_eq!(r.is_broken(), m.broken);
    assert_eq!(r.outstanding(), m.outstanding);
    assert_eq!(r.free_descriptors(), m.free);
    assert_eq!(r.next_head().is_some(), m.free > 0);
}

/// Follows the chain the driver just published from `head` and checks it is `chain`.
fn check_added(mem: &mut Mem, l: Layout, size: u16, head: u16, chain: &[Desc], avail_idx: u16) {
    let slot = usize::from(avail_idx.wrapping_sub(1) % size);
    assert_eq!(mem.read(l.avail + 4 + 2 * slot, 2), u64::from(head));
    let mut at = head;
    let mut seen = vec![false; usize::from(size)];
    for (i, d) in chain.iter().enumerate() {
        assert!(
            at < size && !seen[usize::from(at)],
            "chain loops or leaves the table"
        );
        seen[usize::from(at)] = true;
        let off = l.desc + 16 * usize::from(at);
        let flags = mem.read(off + 12, 2) as u16;
        assert_eq!(mem.read(off, 8), d.addr);
        assert_eq!(mem.read(off + 8, 4), u64::from(d.len));
        assert_eq!(flags & DESC_F_WRITE != 0, d.device_writes);
        assert_eq!(flags & DESC_F_NEXT != 0, i + 1 < chain.len());
        at = mem.read(off + 14, 2) as u16;
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let size: u16 = 1 << u.int_in_range(0u8..=8)?;
    let l = Layout::new(size);
    let mut mem = Mem::new(l.total);
    // SAFETY: `mem` is 16-aligned (u128 words), `l.total` bytes, zeroed, and outlives `ring`
    // (declared before it, dropped after it); only this thread touches it.
    let mut ring: SplitRing<()> =
        unsafe { SplitRing::new(mem.base(), QUEUE, size) }.expect("power-of-two size");
    assert_eq!((ring.size(), ring.layout()), (size, l));
    let mut m = Model {
        size,
        chains: vec![None; usize::from(size)],
        outstanding: 0,
        free: usize::from(size),
        last_used: 0,
        next_avail: 0,
        published: 0,
        broken: false,
    };

    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0u8..=9)? {
            0 => {
                // Driver adds a chain of 0..=size+1 descriptors (0 and size+1 are invalid).
                let n = u.int_in_range(0..=usize::from(size).min(4) + 1)?;
                let n = if n == usize::from(size).min(4) + 1 {
                    usize::from(size) + 1
                } else {
                    n
                };
                let mut chain = Vec::with_capacity(n);
                for _ in 0..n {
                    chain.push(Desc {
                        addr: u.arbitrary()?,
                        len: u.arbitrary()?,
                        device_writes: u.arbitrary()?,
                    });
                }
                let before = snapshot(&ring);
                let predicted = ring.next_head();
                match ring.add(&chain, ()) {
                    Ok(head) => {
                        assert!(!m.broken && n >= 1 && n <= usize::from(size) && n <= m.free);
                        assert_eq!(Some(head), predicted);
                        assert!(
                            m.chains[usize::from(head)].is_none(),
                            "head reused while outstanding"
                        );
                        // The bytes of its device-writable descriptors; a chain the device
                        // only reads allows its posted bytes (the shared ring's rule, for
                        // virtio-net's TX; this crate's requests always end in a writable
                        // status byte).
                        let sum = |w: bool| {
                            chain
                                .iter()
                                .filter(|d| d.device_writes == w)
                                .fold(0u32, |a, d| a.saturating_add(d.len))
                        };
                        let allowed = if chain.iter().any(|d| d.device_writes) {
                            sum(true)
                        } else {
                            sum(false)
                        };
                        m.chains[usize::from(head)] = Some((n, allowed));
                        m.outstanding += 1;
                        m.free -= n;
                        m.next_avail = m.next_avail.wrapping_add(1);
                        check_added(&mut mem, l, size, head, &chain, m.next_avail);
                    }
                    Err((e, ())) => {
                        let want = if m.broken {
                            RingError::Broken(QUEUE)
                        } else if n == 0 || n > usize::from(size) {
                            RingError::BadChain(n)
                        } else {
                            RingError::Full {
                                wanted: n,
                                free: m.free,
                            }
                        };
                        assert_eq!(e, want);
                        assert_eq!(snapshot(&ring), before);
                    }
                }
            }
            1 => {
                let slot = usize::from(u.int_in_range(0..=size - 1)?);
                mem.write(l.used + 4 + 8 * slot, 4, u.arbitrary::<u32>()?.into());
                mem.write(l.used + 8 + 8 * slot, 4, u.arbitrary::<u32>()?.into());
            }
            2 => {
                let idx: u16 = if u.arbitrary()? {
                    m.last_used.wrapping_add(u.int_in_range(0..=size)?)
                } else {
                    u.arbitrary()?
                };
                mem.write(l.used + 2, 2, idx.into());
            }
            3 => {
                // Backend completes a request plausibly: next used slot, bump used.idx.
                let idx = mem.read(l.used + 2, 2) as u16;
                let heads: Vec<u16> = (0..size)
                    .filter(|&h| m.chains[usize::from(h)].is_some())
                    .collect();
                let (id, len) = match heads.len() {
                    0 => (u.arbitrary()?, u.arbitrary()?),
                    k => {
                        let h = heads[u.choose_index(k)?];
                        let writable = m.chains[usize::from(h)].map_or(0, |c| c.1);
                        let len = if u.ratio(7u8, 8)? {
                            u.int_in_range(0..=writable)?
                        } else {
                            u.arbitrary()?
                        };
                        (u32::from(h), len)
                    }
                };
                let slot = usize::from(idx % size);
                mem.write(l.used + 4 + 8 * slot, 4, id.into());
                mem.write(l.used + 8 + 8 * slot, 4, len.into());
                mem.write(l.used + 2, 2, idx.wrapping_add(1).into());
            }
            4 => {
                // Backend scribbles anywhere in the ring.
                let off = u.int_in_range(0..=l.total - 1)?;
                let n = u.int_in_range(1..=8usize.min(l.total - off))?;
                mem.write(off, n, u.arbitrary()?);
            }
            5 => {
                let published = mem.read(l.used + 2, 2) as u16;
                let pending = published.wrapping_sub(m.last_used);
                let slot = usize::from(m.last_used % size);
                let id = mem.read(l.used + 4 + 8 * slot, 4) as u32;
                let len = mem.read(l.used + 8 + 8 * slot, 4) as u32;
                let want = if m.broken {
                    Err(RingError::Broken(QUEUE))
                } else if pending == 0 {
                    Ok(None)
                } else if usize::from(pending) > m.outstanding {
                    Err(RingError::IndexAhead {
                        queue: QUEUE,
                        used_idx: published,
                        last_used: m.last_used,
                        ahead: pending,
                        outstanding: m.outstanding,
                    })
                } else {
                    entry_verdict(&m, id, len).map(Some)
                };
                let before = snapshot(&ring);
                let got = ring.pop_used();
                assert_eq!(got, want, "pop_used disagrees with the rules");
                match got {
                    Ok(Some(used)) => {
                        let (n, _) = m.chains[usize::from(used.head)].take().expect("checked");
                        m.outstanding -= 1;
                        m.free += n;
                        m.last_used = m.last_used.wrapping_add(1);
                    }
                    Ok(None) => assert_eq!(snapshot(&ring), before),
                    Err(e) => {
                        assert!(!e.to_string().is_empty());
                        assert_eq!(snapshot(&ring), before, "an error consumed something");
                        m.broken = true;
                    }
                }
            }
            6 => {
                let flags = mem.read(l.used, 2) as u16;
                assert_eq!(ring.needs_kick(), flags & USED_F_NO_NOTIFY == 0);
                ring.set_no_interrupt(u.arbitrary()?);
            }
            7 => {
                let id: u32 = if u.arbitrary()? {
                    u.int_in_range(0..=u32::from(size))?
                } else {
                    u.arbitrary()?
                };
                let len: u32 = u.arbitrary()?;
                let before = snapshot(&ring);
                assert_eq!(
                    ring.validate(id, len),
                    entry_verdict(&m, id, len).map(|u| u.head)
                );
                assert_eq!(snapshot(&ring), before);
            }
            8 => {
                // Publish everything added since the last publish, with one store.
                let fresh = m.next_avail != m.published;
                assert_eq!(ring.publish(), fresh);
                if fresh {
                    assert_eq!(mem.read(l.avail + 2, 2), u64::from(m.next_avail));
                    m.published = m.next_avail;
                }
            }
            _ => {
                // Backend gone: every outstanding head comes back exactly once.
                let mut heads: Vec<u16> = ring.abandon_all().into_iter().map(|(h, ())| h).collect();
                heads.sort_unstable();
                let want: Vec<u16> = (0..size)
                    .filter(|&h| m.chains[usize::from(h)].is_some())
                    .collect();
                assert_eq!(heads, want);
                m.chains.iter_mut().for_each(|c| *c = None);
                m.outstanding = 0;
                m.free = usize::from(size);
                // The model's consumed index does not move: the ring keeps its own too; a broken
                // ring stays broken.
            }
        }
        check_consistent(&ring, &m);
    }
    drop(ring);
    drop(mem);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
