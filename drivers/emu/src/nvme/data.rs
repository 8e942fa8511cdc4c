//! Walking a command's data pointer (PRPs or an SGL) into device-address segments, reading PRP
//! lists and SGL segments only by DMA, bounded against hostile lists.

use crate::pci::PciCore;

use super::status::{self, Status};

/// The memory page size the controller supports (CAP.MPSMIN = CAP.MPSMAX = 0: 4 KiB).
pub(super) const PAGE: u64 = 4096;

/// One piece of a transfer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Seg {
    /// `len` bytes at device address `iova`.
    Data { iova: u64, len: u64 },
    /// `len` bytes a read discards (an SGL Bit Bucket).
    Skip { len: u64 },
}

impl Seg {
    pub(super) fn len(&self) -> u64 {
        match *self {
            Seg::Data { len, .. } | Seg::Skip { len } => len,
        }
    }
}

/// Appends a data range, merging it with the previous one when contiguous.
fn push(out: &mut Vec<Seg>, iova: u64, len: u64) {
    if let Some(Seg::Data {
        iova: last,
        len: last_len,
    }) = out.last_mut()
    {
        if last.checked_add(*last_len) == Some(iova) {
            *last_len += len;
            return;
        }
    }
    out.push(Seg::Data { iova, len });
}

/// PRP1/PRP2 (and PRP lists, chained across pages) for a transfer of `len` bytes (> 0).
pub(super) fn prp(
    pci: &PciCore,
    prp1: u64,
    prp2: u64,
    len: u64,
    out: &mut Vec<Seg>,
) -> Result<(), Status> {
    out.clear();
    if prp1 & 3 != 0 {
        return Err(status::INVALID_PRP_OFFSET);
    }
    let first = len.min(PAGE - prp1 % PAGE);
    push(out, prp1, first);
    let mut remaining = len - first;
    if remaining == 0 {
        return Ok(());
    }
    if remaining <= PAGE {
        if prp2 % PAGE != 0 {
            return Err(status::INVALID_PRP_OFFSET);
        }
        push(out, prp2, remaining);
        return Ok(());
    }
    if prp2 % 8 != 0 {
        return Err(status::INVALID_PRP_OFFSET);
    }
    let mut list = prp2;
    let mut entries = [0u8; PAGE as usize];
    // Every list page but a hostile one yields data; bound the hops anyway.
    let mut hops = remaining.div_ceil(PAGE) + 1;
    while remaining > 0 {
        if hops == 0 {
            return Err(status::INVALID_FIELD);
        }
        hops -= 1;
        let slots = (PAGE - list % PAGE) / 8;
        let pages_left = remaining.div_ceil(PAGE);
        let (data, chain) = if pages_left > slots {
            (slots - 1, true)
        } else {
            (pages_left, false)
        };
        let n = (data + u64::from(chain)) as usize;
        pci.dma_read(list, &mut entries[..n * 8])
            .map_err(|_| status::DATA_TRANSFER_ERROR)?;
        let entry = |i: usize| u64::from_le_bytes(entries[i * 8..i * 8 + 8].try_into().unwrap());
        for i in 0..data as usize {
            let page = entry(i);
            if page % PAGE != 0 {
                return Err(status::INVALID_PRP_OFFSET);
            }
            let piece = remaining.min(PAGE);
            push(out, page, piece);
            remaining -= piece;
        }
        if chain {
            list = entry(n - 1);
            if list % 8 != 0 {
                return Err(status::INVALID_PRP_OFFSET);
            }
        }
    }
    Ok(())
}

/// SGL descriptor types (the identifier's bits 7:4).
const DATA_BLOCK: u8 = 0x0;
const BIT_BUCKET: u8 = 0x1;
const SEGMENT: u8 = 0x2;
const LAST_SEGMENT: u8 = 0x3;

/// The most descriptors one command may use in all its segments.
const MAX_DESCRIPTORS: u64 = 1 << 16;

#[derive(Copy, Clone, Debug)]
struct Descriptor {
    addr: u64,
    len: u32,
    kind: u8,
    sub: u8,
}

impl Descriptor {
    fn parse(b: &[u8]) -> Descriptor {
        Descriptor {
            addr: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            kind: b[15] >> 4,
            sub: b[15] & 0xf,
        }
    }
}

/// SGL1 (`sgl1`, the command's bytes 24..40) for a transfer of exactly `len` bytes. Bit
/// buckets are allowed only when `device_to_host` (a read).
pub(super) fn sgl(
    pci: &PciCore,
    sgl1: &[u8],
    len: u64,
    device_to_host: bool,
    out: &mut Vec<Seg>,
) -> Result<(), Status> {
    out.clear();
    let mut total = 0u64;
    let mut count = 0u64;
    let mut next = Some(Descriptor::parse(sgl1));
    let mut list = Vec::new();
    // `next` is a descriptor outside any list (SGL1, or the segment pointer ending a list).
    while let Some(d) = next.take() {
        count += 1;
        if count > MAX_DESCRIPTORS {
            return Err(status::INVALID_SGL_COUNT);
        }
        if d.sub != 0 {
            return Err(status::SGL_TYPE_INVALID);
        }
        match d.kind {
            DATA_BLOCK | BIT_BUCKET => {
                data_descriptor(d, device_to_host, &mut total, out)?;
                continue;
            }
            SEGMENT | LAST_SEGMENT => {}
            _ => return Err(status::SGL_TYPE_INVALID),
        }
        if d.len == 0 || d.len % 16 != 0 {
            return Err(status::INVALID_SGL_SEGMENT);
        }
        let n = u64::from(d.len / 16);
        if count + n > MAX_DESCRIPTORS {
            return Err(status::INVALID_SGL_COUNT);
        }
        list.resize(d.len as usize, 0);
        pci.dma_read(d.addr, &mut list)
            .map_err(|_| status::DATA_TRANSFER_ERROR)?;
        for (i, raw) in list.chunks_exact(16).enumerate() {
            let e = Descriptor::parse(raw);
            let last_in_list = i as u64 == n - 1;
            if e.sub != 0 {
                return Err(status::SGL_TYPE_INVALID);
            }
            match e.kind {
                DATA_BLOCK | BIT_BUCKET => {
                    count += 1;
                    data_descriptor(e, device_to_host, &mut total, out)?;
                }
                // Only the last descriptor of a (non-last) Segment may point onwards.
                SEGMENT | LAST_SEGMENT if last_in_list && d.kind == SEGMENT => next = Some(e),
                SEGMENT | LAST_SEGMENT => return Err(status::INVALID_SGL_SEGMENT),
                _ => return Err(status::SGL_TYPE_INVALID),
            }
        }
        if d.kind == SEGMENT && next.is_none() {
            // A Segment that does not lead on must be a Last Segment.
            return Err(status::INVALID_SGL_SEGMENT);
        }
    }
    if total != len {
        return Err(status::DATA_SGL_LENGTH_INVALID);
    }
    Ok(())
}

fn data_descriptor(
    d: Descriptor,
    device_to_host: bool,
    total: &mut u64,
    out: &mut Vec<Seg>,
) -> Result<(), Status> {
    let len = u64::from(d.len);
    *total += len;
    if d.kind == BIT_BUCKET {
        if !device_to_host {
            return Err(status::SGL_TYPE_INVALID);
        }
        out.push(Seg::Skip { len });
    } else if len > 0 {
        push(out, d.addr, len);
    }
    Ok(())
}
