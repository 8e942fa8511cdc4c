//! Fuzz target: `tidepool::share::vfio::parse_iommu_info`, the parser of the kernel's
//! `VFIO_IOMMU_GET_INFO` reply (a fixed header and a chain of capabilities), and the IOVA
//! allocator that trusts what it returns.
//!
//! The input's first byte picks how the reply is made:
//! - even: the rest of the input is the reply, byte for byte;
//! - odd: a reply is built from the input (a header, then capabilities of the three kinds the
//!   parser knows about or any other ID, chained forwards with the occasional bad link, range
//!   counts and range ends sometimes wrong, the buffer sometimes cut short), so that the fuzzer
//!   reaches deep chains quickly.
//!
//! Beyond "no panic", the verdict is checked against an independent walk of the chain
//! (`reference`), which states the rules the parser documents:
//! - the header (flags, page sizes, and the first capability offset when flags say there are
//!   capabilities) lies inside the buffer;
//! - every capability starts after the header, and every byte read from it (the 8-byte header;
//!   the range count and every 16-byte range of IOVA_RANGE; the count of DMA_AVAIL) lies inside
//!   the buffer;
//! - the chain moves strictly forward (so it ends), and every IOVA range has `start <= end`.
//!
//! `Ok` must carry exactly the values at those offsets (the ranges of every IOVA_RANGE
//! capability in chain order, or the whole 64-bit space when there is none; the last DMA_AVAIL
//! count), and `Err` must come exactly when a rule is broken. The parsed ranges then go to
//! `IovaAllocator::new` under a few DMA masks, as `VfioType1` does, and every address it
//! hands out must lie inside a parsed range, at or below the mask, and off page 0.

#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tidepool::iova::{IovaAllocator, IovaRange};
use tidepool::share::vfio::{parse_iommu_info, IommuInfo};
use tidepool::share::ShareError;

/// `struct vfio_iommu_type1_info`: argsz, flags, iova_pgsizes, cap_offset, pad.
const HEADER: usize = 24;
/// `VFIO_IOMMU_INFO_CAPS`: the reply has a capability chain.
const INFO_CAPS: u32 = 2;
const CAP_IOVA_RANGE: u16 = 1;
const CAP_MIGRATION: u16 = 2;
const CAP_DMA_AVAIL: u16 = 3;
/// Largest reply built in the structured mode.
const MAX_BUILT: usize = 64 << 10;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// What a correct parser returns: `None` exactly when a documented rule is broken.
fn reference(b: &[u8]) -> Option<IommuInfo> {
    let flags = u32_at(b, 4)?;
    let iova_pgsizes = u64_at(b, 8)?;
    let mut off = if flags & INFO_CAPS != 0 {
        u32_at(b, 16)? as usize
    } else {
        0
    };
    let mut ranges: Option<Vec<IovaRange>> = None;
    let mut dma_avail = None;
    let mut steps = 0usize;
    while off != 0 {
        steps += 1;
        assert!(steps <= b.len(), "the reference walk itself must end");
        if off < HEADER || off + 8 > b.len() {
            return None;
        }
        let id = u16_at(b, off)?;
        let next = u32_at(b, off + 4)? as usize;
        // Where this capability's body ends: the next one may not start inside it.
        let mut end = off + 8;
        match id {
            CAP_IOVA_RANGE => {
                // Header, nr_iovas and a reserved word come before the first range.
                if off + 16 > b.len() {
                    return None;
                }
                let n = u32_at(b, off + 8)? as usize;
                let list = ranges.get_or_insert_with(Vec::new);
                for i in 0..n {
                    // Bounded by the buffer: a count too large fails at the first range
                    // past the end.
                    let at = off + 16 + 16 * i;
                    let (start, end) = (u64_at(b, at)?, u64_at(b, at + 8)?);
                    if start > end {
                        return None;
                    }
                    list.push(IovaRange { start, end });
                }
                end = off + 16 + 16 * n;
            }
            CAP_DMA_AVAIL => {
                dma_avail = Some(u32_at(b, off + 8)?);
                end = off + 12;
            }
            _ => {}
        }
        if next != 0 && (next <= off || next < end) {
            return None;
        }
        off = next;
    }
    Some(IommuInfo {
        iova_pgsizes,
        iova_ranges: ranges.unwrap_or_else(|| vec![IovaRange::new(0, u64::MAX).unwrap()]),
        dma_avail,
    })
}

/// A reply built from the input: mostly well formed, with the faults the parser must catch.
fn build(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let mut b = vec![0u8; HEADER];
    let flags: u32 = if u.ratio(7u8, 8)? {
        INFO_CAPS
    } else {
        u.arbitrary()?
    };
    b[4..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..16].copy_from_slice(&u.arbitrary::<u64>()?.to_ne_bytes());
    let ncaps = u.int_in_range(0..=6)?;
    let mut offsets = Vec::new();
    for _ in 0..ncaps {
        // Some padding between capabilities (the kernel aligns them to 8 bytes).
        let pad = 8 * usize::from(u.int_in_range(0u8..=2)?);
        b.resize(b.len() + pad, 0);
        let off = b.len();
        offsets.push(off);
        let id: u16 = match u.int_in_range(0u8..=4)? {
            0 | 1 => CAP_IOVA_RANGE,
            2 => CAP_DMA_AVAIL,
            3 => CAP_MIGRATION,
            _ => u.arbitrary()?,
        };
        b.extend_from_slice(&id.to_ne_bytes());
        b.extend_from_slice(&1u16.to_ne_bytes()); // version
        b.extend_from_slice(&[0; 4]); // next, linked below
        match id {
            CAP_IOVA_RANGE => {
                let n = u.int_in_range(0u32..=8)?;
                let claimed = if u.ratio(15u8, 16)? {
                    n
                } else {
                    u.arbitrary()?
                };
                b.extend_from_slice(&claimed.to_ne_bytes());
                b.extend_from_slice(&[0; 4]);
                for _ in 0..n {
                    let start: u64 = u.arbitrary()?;
                    let end = if u.ratio(15u8, 16)? {
                        start.saturating_add(u.arbitrary::<u32>()?.into())
                    } else {
                        u.arbitrary()?
                    };
                    b.extend_from_slice(&start.to_ne_bytes());
                    b.extend_from_slice(&end.to_ne_bytes());
                }
            }
            CAP_DMA_AVAIL => b.extend_from_slice(&u.arbitrary::<u32>()?.to_ne_bytes()),
            _ => {
                let len = 4 * usize::from(u.int_in_range(0u8..=8)?);
                b.resize(b.len() + len, 0xa5);
            }
        }
    }
    for (i, &off) in offsets.iter().enumerate() {
        let mut next = offsets.get(i + 1).copied().unwrap_or(0) as u32;
        if u.ratio(1u8, 16)? {
            next = u.arbitrary()?; // a bad link: backwards, into the header, past the end
        }
        b[off + 4..off + 8].copy_from_slice(&next.to_ne_bytes());
    }
    let first = offsets.first().copied().unwrap_or(0) as u32;
    b[16..20].copy_from_slice(&first.to_ne_bytes());
    // Arbitrary byte patches, then maybe a short buffer.
    for _ in 0..u.int_in_range(0u8..=3)? {
        if b.is_empty() {
            break;
        }
        let at = u.choose_index(b.len())?;
        b[at] = u.arbitrary()?;
    }
    if u.ratio(1u8, 8)? {
        let keep = u.int_in_range(0..=b.len())?;
        b.truncate(keep);
    }
    let argsz = b.len() as u32;
    if b.len() >= 4 {
        b[..4].copy_from_slice(&argsz.to_ne_bytes());
    }
    b.truncate(MAX_BUILT);
    Ok(b)
}

/// The union of `ranges` as sorted, disjoint, non-adjacent `[start, end]` pairs (the
/// allocator accepts ranges in any order, overlapping, and merges them).
fn union(ranges: &[IovaRange]) -> Vec<(u128, u128)> {
    let mut v: Vec<(u128, u128)> = ranges
        .iter()
        .map(|r| (u128::from(r.start), u128::from(r.end)))
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 + 1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The allocator trusts the parsed ranges: whatever they are, it must only hand out addresses
/// inside their union, at or below the mask, never page 0.
fn check_allocator(ranges: &[IovaRange]) {
    let covered = union(ranges);
    for mask in [u64::from(u32::MAX), (1 << 39) - 1, u64::MAX] {
        let Ok(mut a) = IovaAllocator::new(ranges, mask) else {
            continue;
        };
        for (len, align) in [(4096u64, 4096u64), (2 << 20, 2 << 20), (1 << 30, 1 << 30)] {
            let Ok(iova) = a.alloc(len, align) else {
                continue;
            };
            let last = iova + (len - 1);
            assert_eq!(iova % align, 0);
            assert!(iova >= 4096, "page 0 handed out");
            assert!(last <= mask, "{iova:#x}+{len:#x} past mask {mask:#x}");
            assert!(
                covered
                    .iter()
                    .any(|&(s, e)| s <= u128::from(iova) && u128::from(last) <= e),
                "{iova:#x}+{len:#x} outside the parsed ranges {ranges:?}"
            );
        }
    }
}

fn check(buf: &[u8]) {
    let got = parse_iommu_info(buf);
    let want = reference(buf);
    match (&got, want) {
        (Ok(info), Some(want)) => {
            assert_eq!(info, &want, "parsed values differ from the reply's bytes");
            check_allocator(&info.iova_ranges);
        }
        (Err(e @ ShareError::Vfio { what, .. }), None) => {
            assert_eq!(*what, "VFIO_IOMMU_GET_INFO");
            assert!(!e.to_string().is_empty());
        }
        (got, want) => panic!(
            "parse_iommu_info = {got:?}, the rules say {want:?} for {} bytes",
            buf.len()
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check(rest);
    } else if let Ok(built) = build(&mut Unstructured::new(rest)) {
        check(&built);
    }
});
