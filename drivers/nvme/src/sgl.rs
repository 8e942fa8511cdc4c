//! Scatter Gather Lists (SGLs): the other way an NVMe command tells the controller where its
//! data is (Base spec 1.4, 4.4), used for NVM I/O commands when the controller supports them.
//!
//! # Wire format
//! An **SGL descriptor** is 16 bytes: an address (bytes 0..8), a length (bytes 8..12) and the
//! SGL identifier in byte 15 — the descriptor type in bits 7:4 and the sub type in bits 3:0
//! (always 0h, "Address", here: the address is a device address). The types used here:
//! - **Data Block** (0h): `len` bytes of data at `addr`, any byte alignment unless the
//!   controller asks for dword alignment and granularity (SGLS bits 1:0 = 10b);
//! - **Segment** (2h): the next SGL segment — a list of descriptors — is `len` bytes at `addr`;
//! - **Last Segment** (3h): the same, and that segment is the last one (it holds no pointer to
//!   another segment);
//! - **Bit Bucket** (1h): reads discard `len` bytes (parsed and built, not used by the queue).
//!
//! A command carries one descriptor, **SGL1**, in its data pointer (bytes 24..40), with
//! PSDT = 01b in CDW0 bits 15:14 ([`crate::spec::Command::set_sgl1`]).
//!
//! # Layout this module builds
//! - One contiguous range (every pool buffer is contiguous in device address space): SGL1 is
//!   one Data Block descriptor. No list, no extra memory, no extra DMA for the controller —
//!   unlike PRPs, which need a list page for any transfer over two pages.
//! - `n > 1` ranges (a caller's scatter list, [`data_blocks`]): the `n` Data Block descriptors
//!   go, in order, in **one segment** — a pool buffer of `16 n` bytes (one 4 KiB page holds
//!   256) — and SGL1 is a **Last Segment** descriptor pointing at it with length `16 n`.
//!   This is what SPDK builds too.
//!
//! ## Why one segment and not a chain of page-sized segments
//! The spec allows a segment to be any qword-aligned, contiguous run of descriptors (pool
//! buffers are contiguous in device address space), so one segment is always possible and the
//! controller fetches each descriptor once. A chain (the last slot of each full page a
//! Segment descriptor to the next page, like a chained PRP list) is also legal, but QEMU 7.2's
//! controller rejects chains of three or more segments with "invalid SGL segment descriptor":
//! `nvme_map_sgl` keeps a pointer to the previous segment's last descriptor inside the buffer
//! it then overwrites with the next segment, and so checks the wrong descriptor's type. The
//! VM test `nvme_sgl` found this with a 600-descriptor list.
//!
//! # Why the layout is correct
//! The spec requires: a Last Segment points at a segment holding no segment descriptors; its
//! length is a non-zero multiple of 16; the data descriptors, walked in order, describe the
//! transfer (exactly, unless the controller allows excess length). [`layout`] stores only the
//! Data Block descriptors, in their original order, and sets the Last Segment's length to
//! `16 n`, so a controller's walk (modelled by the tests' `walk`, checked by proptest) visits
//! exactly the given ranges, in order, and their lengths add up to the transfer.
//!
//! [`layout`] is the pure layout; [`Sgl::build`] and [`write_one_page_segment`] put it in pool
//! memory (the queue keeps one page per command slot, like its PRP list pages).

use std::ops::Range;

use tidepool::pool::{DmaBuf, PoolError};

use crate::spec::PAGE_BYTES;

/// Bytes per SGL descriptor.
pub const DESCRIPTOR_BYTES: usize = 16;

/// Descriptors per 4 KiB segment page (the queue keeps one such page per command slot).
pub const DESCRIPTORS_PER_SEGMENT_PAGE: usize = PAGE_BYTES / DESCRIPTOR_BYTES;

/// The most descriptors one segment can hold: its length (16 bytes each) is a 32-bit field.
pub const MAX_SEGMENT_DESCRIPTORS: usize = (u32::MAX as usize) / DESCRIPTOR_BYTES;

/// The most bytes one Data Block descriptor is made to describe: the length field has 32 bits;
/// a longer range is split at this power of two, so the pieces keep the range's alignment.
pub const MAX_DATA_BLOCK_BYTES: usize = 1 << 31;

/// SGL descriptor types (the SGL identifier's bits 7:4) this driver knows.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DescriptorType {
    /// Data at an address.
    DataBlock = 0x0,
    /// Data a read discards (no address).
    BitBucket = 0x1,
    /// The next segment, not the last.
    Segment = 0x2,
    /// The next segment, which is the last.
    LastSegment = 0x3,
}

impl DescriptorType {
    /// The type for the 4-bit type code, if it is one of the above.
    pub fn from_code(code: u8) -> Option<DescriptorType> {
        match code {
            0x0 => Some(DescriptorType::DataBlock),
            0x1 => Some(DescriptorType::BitBucket),
            0x2 => Some(DescriptorType::Segment),
            0x3 => Some(DescriptorType::LastSegment),
            _ => None,
        }
    }
}

/// One SGL descriptor with sub type "Address" (0h).
///
/// ```
/// use tidepool_nvme::sgl::{Descriptor, DescriptorType};
/// let d = Descriptor::last_segment(0x9000, 3 * 16);
/// let b = d.to_bytes();
/// assert_eq!(&b[0..8], &0x9000u64.to_le_bytes());
/// assert_eq!(&b[8..12], &48u32.to_le_bytes());
/// assert_eq!(b[15], 0x30); // type 3h in bits 7:4, sub type 0h
/// assert_eq!(Descriptor::parse(&b), Some(d));
/// ```
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Descriptor {
    /// The descriptor type.
    pub kind: DescriptorType,
    /// Device address (data, or the next segment); 0 for a bit bucket.
    pub addr: u64,
    /// Length in bytes (data, or the next segment's descriptors times 16).
    pub len: u32,
}

impl Descriptor {
    /// A Data Block descriptor: `len` bytes at device address `addr`.
    pub const fn data_block(addr: u64, len: u32) -> Descriptor {
        Descriptor {
            kind: DescriptorType::DataBlock,
            addr,
            len,
        }
    }

    /// A Bit Bucket descriptor: a read discards `len` bytes.
    pub const fn bit_bucket(len: u32) -> Descriptor {
        Descriptor {
            kind: DescriptorType::BitBucket,
            addr: 0,
            len,
        }
    }

    /// A Segment descriptor: the next segment, `len` bytes (16 per descriptor) at `addr`,
    /// is followed by more segments.
    pub const fn segment(addr: u64, len: u32) -> Descriptor {
        Descriptor {
            kind: DescriptorType::Segment,
            addr,
            len,
        }
    }

    /// A Last Segment descriptor: the next segment, `len` bytes at `addr`, is the last.
    pub const fn last_segment(addr: u64, len: u32) -> Descriptor {
        Descriptor {
            kind: DescriptorType::LastSegment,
            addr,
            len,
        }
    }

    /// The SGL identifier byte: type in bits 7:4, sub type 0h (Address) in bits 3:0.
    pub const fn identifier(&self) -> u8 {
        (self.kind as u8) << 4
    }

    /// The descriptor as two little-endian 64-bit words: the address, then the length with
    /// the identifier in the top byte (bytes 12..15 are reserved, zero).
    pub const fn to_words(&self) -> [u64; 2] {
        [
            self.addr,
            self.len as u64 | ((self.identifier() as u64) << 56),
        ]
    }

    /// The 16 wire bytes.
    pub fn to_bytes(&self) -> [u8; DESCRIPTOR_BYTES] {
        let [a, b] = self.to_words();
        let mut out = [0u8; DESCRIPTOR_BYTES];
        out[..8].copy_from_slice(&a.to_le_bytes());
        out[8..].copy_from_slice(&b.to_le_bytes());
        out
    }

    /// Parses 16 wire bytes; `None` if `b` is shorter, the type is not one of
    /// [`DescriptorType`] or the sub type is not Address. Never panics.
    pub fn parse(b: &[u8]) -> Option<Descriptor> {
        let b = b.get(..DESCRIPTOR_BYTES)?;
        let id = b[15];
        if id & 0xf != 0 {
            return None;
        }
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&b[..8]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&b[8..12]);
        Some(Descriptor {
            kind: DescriptorType::from_code(id >> 4)?,
            addr: u64::from_le_bytes(addr),
            len: u32::from_le_bytes(len),
        })
    }
}

/// What a controller supports of SGLs: Identify Controller SGLS (bytes 536..540), decoded.
///
/// ```
/// use tidepool_nvme::sgl::SglSupport;
/// let qemu = SglSupport::from_sgls(0x0001_0001);
/// assert!(qemu.supported() && !qemu.dword_aligned() && qemu.bit_bucket());
/// assert!(!SglSupport::from_sgls(0).supported());
/// ```
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SglSupport(u32);

impl SglSupport {
    /// Decodes the raw SGLS field.
    pub const fn from_sgls(sgls: u32) -> SglSupport {
        SglSupport(sgls)
    }

    /// The raw SGLS field.
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// SGLs are supported for NVM commands (bits 1:0 = 01b or 10b; 11b is reserved and read
    /// as unsupported).
    pub const fn supported(self) -> bool {
        matches!(self.0 & 0b11, 0b01 | 0b10)
    }

    /// Data Block addresses and lengths must be dword (4-byte) aligned and granular
    /// (bits 1:0 = 10b). With 01b any byte alignment works.
    pub const fn dword_aligned(self) -> bool {
        self.0 & 0b11 == 0b10
    }

    /// Keyed SGL Data Block descriptors (bit 2; fabrics).
    pub const fn keyed(self) -> bool {
        self.0 & (1 << 2) != 0
    }

    /// SGL Bit Bucket descriptors (bit 16).
    pub const fn bit_bucket(self) -> bool {
        self.0 & (1 << 16) != 0
    }

    /// Byte-aligned contiguous metadata buffers (bit 17).
    pub const fn byte_aligned_metadata(self) -> bool {
        self.0 & (1 << 17) != 0
    }

    /// An SGL may describe more data than the command moves (bit 18); without it the
    /// descriptors must add up to exactly the transfer, which is what this driver builds.
    pub const fn excess_length(self) -> bool {
        self.0 & (1 << 18) != 0
    }

    /// MPTR may hold a single SGL descriptor (PSDT = 10b, bit 19).
    pub const fn mptr_sgl(self) -> bool {
        self.0 & (1 << 19) != 0
    }

    /// Data Block addresses may be offsets (bit 20; fabrics).
    pub const fn address_as_offset(self) -> bool {
        self.0 & (1 << 20) != 0
    }

    /// Transport SGL Data Block descriptors (bit 21; fabrics).
    pub const fn transport_data_block(self) -> bool {
        self.0 & (1 << 21) != 0
    }
}

impl std::fmt::Display for SglSupport {
    /// E.g. `SGLS 0x10001: SGLs (byte aligned), bit bucket`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SGLS {:#x}: ", self.0)?;
        if !self.supported() {
            return write!(f, "no SGLs");
        }
        let align = if self.dword_aligned() {
            "dword aligned"
        } else {
            "byte aligned"
        };
        write!(f, "SGLs ({align})")?;
        let extras = [
            (self.keyed(), "keyed data block"),
            (self.bit_bucket(), "bit bucket"),
            (self.byte_aligned_metadata(), "byte-aligned metadata"),
            (self.excess_length(), "excess length"),
            (self.mptr_sgl(), "MPTR SGL"),
            (self.address_as_offset(), "address as offset"),
            (self.transport_data_block(), "transport data block"),
        ];
        for (_, name) in extras.iter().filter(|(on, _)| *on) {
            write!(f, ", {name}")?;
        }
        Ok(())
    }
}

/// Why an SGL could not be built (or SGLs cannot be used).
#[derive(Debug, thiserror::Error)]
pub enum SglError {
    /// SGLs were asked for, but the controller does not support them.
    #[error("the controller does not support SGLs (Identify Controller SGLS = {sgls:#x}): use DataPointer::Auto or DataPointer::Prp")]
    Unsupported {
        /// The raw SGLS field.
        sgls: u32,
    },
    /// Zero bytes to describe.
    #[error("a transfer of 0 bytes has no SGL; NVMe commands move at least one block")]
    Empty,
    /// A range is empty, reversed, or reaches past the buffer.
    #[error("range {index} ({start}..{end}) is empty or reaches past the buffer's {capacity} B: give non-empty ranges inside the buffer")]
    BadRange {
        /// Which range.
        index: usize,
        /// Its start.
        start: usize,
        /// Its end.
        end: usize,
        /// The buffer's capacity.
        capacity: usize,
    },
    /// The controller wants dword-aligned Data Blocks (SGLS bits 1:0 = 10b).
    #[error("{len} B at device address {addr:#x}: this controller's SGLs need 4-byte aligned addresses and lengths (SGLS = 10b); align the ranges")]
    Unaligned {
        /// The address.
        addr: u64,
        /// The length.
        len: usize,
    },
    /// The segment list buffer is not page aligned.
    #[error("SGL segment buffer at {addr:#x} is not 4 KiB aligned (pool buffers of 4 KiB or more are): a pool configuration bug")]
    SegmentUnaligned {
        /// Its address.
        addr: u64,
    },
    /// More descriptors than the one page given for them holds.
    #[error("{descriptors} SGL descriptors do not fit one 4 KiB segment page (256): use Sgl::build, which takes a list as long as needed")]
    TooManyForPage {
        /// Descriptors needed.
        descriptors: usize,
    },
    /// More descriptors than one segment's 32-bit length can describe.
    #[error("{descriptors} SGL descriptors exceed one segment's limit of {MAX_SEGMENT_DESCRIPTORS}: split the transfer")]
    TooManyDescriptors {
        /// Descriptors needed.
        descriptors: usize,
    },
    /// No pool memory for the segment list.
    #[error("no pool memory for a {bytes} B SGL segment list: {source}")]
    NoSegmentMemory {
        /// Bytes wanted.
        bytes: usize,
        /// The pool's error.
        source: PoolError,
    },
    /// Scattered ranges on a queue that uses PRPs.
    #[error("{ranges} non-adjacent ranges cannot be described with PRPs: use a queue with DataPointer::Sgl (or Auto on a controller with SGLs), or one contiguous range")]
    NeedsSgl {
        /// How many ranges remained after merging adjacent ones.
        ranges: usize,
    },
}

/// The one Data Block descriptor for `len` bytes at `addr` (a contiguous buffer), checking the
/// controller's alignment requirement (`dword_aligned`) and the 32-bit length field.
#[inline]
pub fn contiguous(addr: u64, len: usize, dword_aligned: bool) -> Result<Descriptor, SglError> {
    if len == 0 {
        return Err(SglError::Empty);
    }
    if dword_aligned && (addr % 4 != 0 || len % 4 != 0) {
        return Err(SglError::Unaligned { addr, len });
    }
    match u32::try_from(len) {
        Ok(len) => Ok(Descriptor::data_block(addr, len)),
        Err(_) => Err(SglError::BadRange {
            index: 0,
            start: 0,
            end: len,
            capacity: u32::MAX as usize,
        }),
    }
}

/// Checks `ranges` of a buffer of `capacity` bytes: each non-empty and inside the buffer.
/// Returns the total bytes (saturating; a total beyond `usize` cannot be a transfer).
pub fn check_ranges(ranges: &[Range<usize>], capacity: usize) -> Result<usize, SglError> {
    if ranges.is_empty() {
        return Err(SglError::Empty);
    }
    let mut total = 0usize;
    for (index, r) in ranges.iter().enumerate() {
        if r.start >= r.end || r.end > capacity {
            return Err(SglError::BadRange {
                index,
                start: r.start,
                end: r.end,
                capacity,
            });
        }
        total = total.saturating_add(r.end - r.start);
    }
    Ok(total)
}

/// Merges adjacent ranges (`a.end == b.start`) into runs: what PRPs can describe is one run.
/// Expects checked ranges ([`check_ranges`]).
///
/// ```
/// use tidepool_nvme::sgl::merge_adjacent;
/// assert_eq!(merge_adjacent(&[0..4, 4..9, 12..16]), vec![0..9, 12..16]);
/// ```
pub fn merge_adjacent(ranges: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r.clone()),
        }
    }
    out
}

/// The Data Block descriptors for `ranges` of a buffer at device address `base` of `capacity`
/// bytes, in order (ranges longer than [`MAX_DATA_BLOCK_BYTES`] become several descriptors).
/// Checks the ranges and, with `dword_aligned`, the controller's alignment requirement.
///
/// ```
/// use tidepool_nvme::sgl::{data_blocks, Descriptor};
/// let d = data_blocks(0x10_0000, 8192, &[1..513, 4096..4608], false).unwrap();
/// assert_eq!(d, vec![Descriptor::data_block(0x10_0001, 512), Descriptor::data_block(0x10_1000, 512)]);
/// ```
pub fn data_blocks(
    base: u64,
    capacity: usize,
    ranges: &[Range<usize>],
    dword_aligned: bool,
) -> Result<Vec<Descriptor>, SglError> {
    check_ranges(ranges, capacity)?;
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let addr = base + r.start as u64;
        let len = r.end - r.start;
        if dword_aligned && (addr % 4 != 0 || len % 4 != 0) {
            return Err(SglError::Unaligned { addr, len });
        }
        let mut at = 0usize;
        while at < len {
            let piece = (len - at).min(MAX_DATA_BLOCK_BYTES);
            // `piece` ≤ 2^31 fits the 32-bit length field.
            out.push(Descriptor::data_block(addr + at as u64, piece as u32));
            at += piece;
        }
    }
    Ok(out)
}

/// How many 4 KiB pages the segment for `descriptors` data descriptors takes (0 when SGL1
/// itself can be the one descriptor).
pub fn segment_pages_for(descriptors: usize) -> usize {
    match descriptors {
        0 | 1 => 0,
        n => (n * DESCRIPTOR_BYTES).div_ceil(PAGE_BYTES),
    }
}

/// The SGL for the data descriptors `data` (in transfer order), given the device address
/// `list_addr` of the segment (contiguous from there): SGL1 for the command, and the
/// descriptors of the segment (descriptor `i` goes at byte `16 * i`; empty when SGL1 is the
/// only descriptor). See the module doc for the layout.
///
/// ```
/// use tidepool_nvme::sgl::{layout, Descriptor};
/// let data = [Descriptor::data_block(0x1000, 512), Descriptor::data_block(0x3000, 512)];
/// let (sgl1, list) = layout(&data, 0x9000).unwrap();
/// assert_eq!(sgl1, Descriptor::last_segment(0x9000, 32));
/// assert_eq!(list, data.to_vec());
/// ```
pub fn layout(
    data: &[Descriptor],
    list_addr: u64,
) -> Result<(Descriptor, Vec<Descriptor>), SglError> {
    match data {
        [] => Err(SglError::Empty),
        [one] => Ok((*one, Vec::new())),
        _ => Ok((last_segment_for(list_addr, data.len())?, data.to_vec())),
    }
}

/// The Last Segment descriptor for a segment of `descriptors` descriptors at `list_addr`.
fn last_segment_for(list_addr: u64, descriptors: usize) -> Result<Descriptor, SglError> {
    match u32::try_from(descriptors * DESCRIPTOR_BYTES) {
        Ok(len) if descriptors <= MAX_SEGMENT_DESCRIPTORS => {
            Ok(Descriptor::last_segment(list_addr, len))
        }
        _ => Err(SglError::TooManyDescriptors { descriptors }),
    }
}

/// An SGL in pool memory: SGL1 for the command and the segment list that must outlive it.
#[derive(Debug)]
pub struct Sgl {
    /// The descriptor for the command's data pointer.
    pub sgl1: Descriptor,
    /// The segment list, if one was needed. Keep it until the command completes.
    pub list: Option<DmaBuf>,
}

impl Sgl {
    /// Describes the data descriptors `data`, taking the segment from `alloc_list` (called with
    /// the bytes needed, a multiple of 4 KiB) only when there is more than one.
    pub fn build(
        data: &[Descriptor],
        alloc_list: impl FnOnce(usize) -> Result<DmaBuf, PoolError>,
    ) -> Result<Sgl, SglError> {
        if let [one] = data {
            return Ok(Sgl {
                sgl1: *one,
                list: None,
            });
        }
        if data.is_empty() {
            return Err(SglError::Empty);
        }
        if data.len() > MAX_SEGMENT_DESCRIPTORS {
            return Err(SglError::TooManyDescriptors {
                descriptors: data.len(),
            });
        }
        let bytes = segment_pages_for(data.len()) * PAGE_BYTES;
        let mut list =
            alloc_list(bytes).map_err(|source| SglError::NoSegmentMemory { bytes, source })?;
        let list_addr = list.device_addr().0;
        if list_addr % PAGE_BYTES as u64 != 0 {
            return Err(SglError::SegmentUnaligned { addr: list_addr });
        }
        let (sgl1, descriptors) = layout(data, list_addr)?;
        let bytes: Vec<u8> = descriptors.iter().flat_map(|d| d.to_bytes()).collect();
        list.write_at(0, &bytes)
            .map_err(|source| SglError::NoSegmentMemory {
                bytes: bytes.len(),
                source,
            })?;
        Ok(Sgl {
            sgl1,
            list: Some(list),
        })
    }
}

/// Writes the segment for `data` (2..=256 data descriptors) into the page `page`, returning
/// SGL1 (a Last Segment descriptor pointing at it). Lets a queue keep one segment page per
/// command slot and rewrite it per command instead of allocating.
///
/// Only the descriptors the controller reads are written, each with two volatile 64-bit
/// stores (the page is device-visible; no reference to it is formed). The caller must own the
/// page exclusively (no command using it in flight).
pub fn write_one_page_segment(
    page: &mut DmaBuf,
    data: &[Descriptor],
) -> Result<Descriptor, SglError> {
    let list_addr = page.device_addr().0;
    if list_addr % PAGE_BYTES as u64 != 0 {
        return Err(SglError::SegmentUnaligned { addr: list_addr });
    }
    if data.len() > DESCRIPTORS_PER_SEGMENT_PAGE || data.len() * DESCRIPTOR_BYTES > page.capacity()
    {
        return Err(SglError::TooManyForPage {
            descriptors: data.len(),
        });
    }
    if data.len() < 2 {
        return match data.first() {
            Some(one) => Ok(*one),
            None => Err(SglError::Empty),
        };
    }
    let base = page.as_ptr().cast::<u64>();
    for (i, d) in data.iter().enumerate() {
        let [a, b] = d.to_words();
        // SAFETY: `16 i + 16 <= 16 data.len() <= capacity` (checked above); the page is page
        // aligned so the pointers are 8-byte aligned; the caller owns the page; raw volatile
        // stores form no reference to device-visible memory.
        unsafe {
            base.add(2 * i).write_volatile(a.to_le());
            base.add(2 * i + 1).write_volatile(b.to_le());
        }
    }
    last_segment_for(list_addr, data.len())
}

#[cfg(test)]
// One-range slices are exactly what the API takes (a scatter list of one range).
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::test_pool::pool;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// A controller's walk of an SGL (what QEMU's `nvme_map_sgl` does): from SGL1, follow
    /// Segment / Last Segment descriptors through `memory` (segment address → descriptors
    /// stored there), collecting Data Blocks. Checks the spec's rules on the way: a segment
    /// pointer is the last descriptor of its segment, its length is a non-zero multiple of 16,
    /// a Last Segment's segment holds no pointers.
    fn walk(sgl1: Descriptor, memory: &dyn Fn(u64, usize) -> Vec<Descriptor>) -> Vec<Descriptor> {
        let mut out = Vec::new();
        let mut current = sgl1;
        loop {
            match current.kind {
                DescriptorType::DataBlock | DescriptorType::BitBucket => {
                    out.push(current);
                    return out;
                }
                DescriptorType::Segment | DescriptorType::LastSegment => {
                    let len = current.len as usize;
                    assert!(
                        len > 0 && len % DESCRIPTOR_BYTES == 0,
                        "segment length {len}"
                    );
                    let seg = memory(current.addr, len / DESCRIPTOR_BYTES);
                    let (last, body) = seg.split_last().expect("non-empty segment");
                    for d in body {
                        assert_eq!(d.kind, DescriptorType::DataBlock, "pointer not last");
                        out.push(*d);
                    }
                    match last.kind {
                        DescriptorType::Segment | DescriptorType::LastSegment => {
                            assert_eq!(
                                current.kind,
                                DescriptorType::Segment,
                                "a Last Segment's segment points further"
                            );
                            current = *last;
                        }
                        _ => {
                            out.push(*last);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// `memory` for a list laid out from `list_addr`: the descriptors from every 16-byte
    /// address in it to its end (a walk reads the count its pointer gives).
    fn memory_of(list: &[Descriptor], list_addr: u64) -> HashMap<u64, Vec<Descriptor>> {
        (0..list.len())
            .map(|i| {
                (
                    list_addr + (i * DESCRIPTOR_BYTES) as u64,
                    list[i..].to_vec(),
                )
            })
            .collect()
    }

    fn read_descriptors(buf: &DmaBuf, n: usize) -> Vec<Descriptor> {
        let mut b = vec![0u8; n * DESCRIPTOR_BYTES];
        buf.read_at(0, &mut b).unwrap();
        b.chunks(DESCRIPTOR_BYTES)
            .map(|c| Descriptor::parse(c).expect("valid descriptor"))
            .collect()
    }

    #[test]
    fn descriptor_fields_sit_at_their_spec_offsets() {
        let d = Descriptor::data_block(0x0123_4567_89ab_cdef, 0xdead_beef);
        let b = d.to_bytes();
        assert_eq!(&b[0..8], &0x0123_4567_89ab_cdefu64.to_le_bytes());
        assert_eq!(&b[8..12], &0xdead_beefu32.to_le_bytes());
        assert_eq!(&b[12..16], &[0, 0, 0, 0x00]);
        assert_eq!(Descriptor::segment(0x1000, 4096).to_bytes()[15], 0x20);
        assert_eq!(Descriptor::last_segment(0x1000, 16).to_bytes()[15], 0x30);
        let bb = Descriptor::bit_bucket(512).to_bytes();
        assert_eq!((bb[15], &bb[0..8]), (0x10, &[0u8; 8][..]));
        // Unknown types, non-Address sub types and short input are refused.
        let mut odd = b;
        odd[15] = 0x01; // Data Block, sub type Offset
        assert_eq!(Descriptor::parse(&odd), None);
        odd[15] = 0x50;
        assert_eq!(Descriptor::parse(&odd), None);
        assert_eq!(Descriptor::parse(&b[..15]), None);
        assert_eq!(Descriptor::parse(&b), Some(d));
    }

    #[test]
    fn sgls_field_decodes() {
        let none = SglSupport::from_sgls(0);
        assert!(!none.supported());
        assert_eq!(none.to_string(), "SGLS 0x0: no SGLs");
        let reserved = SglSupport::from_sgls(0b11);
        assert!(!reserved.supported());
        let dword = SglSupport::from_sgls(0b10 | (1 << 18) | (1 << 19));
        assert!(dword.supported() && dword.dword_aligned());
        assert!(dword.excess_length() && dword.mptr_sgl() && !dword.bit_bucket());
        let all = SglSupport::from_sgls(0b01 | 0b100 | (0x3f << 16));
        assert!(all.keyed() && all.bit_bucket() && all.byte_aligned_metadata());
        assert!(all.address_as_offset() && all.transport_data_block());
        assert_eq!(
            SglSupport::from_sgls(0x1_0001).to_string(),
            "SGLS 0x10001: SGLs (byte aligned), bit bucket"
        );
    }

    #[test]
    fn ranges_are_checked() {
        assert!(matches!(check_ranges(&[], 10), Err(SglError::Empty)));
        assert!(matches!(
            check_ranges(&[0..4, 6..6], 10),
            Err(SglError::BadRange { index: 1, .. })
        ));
        assert!(matches!(
            check_ranges(&[8..11], 10),
            Err(SglError::BadRange { index: 0, .. })
        ));
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = [5..2];
        assert!(check_ranges(&reversed, 10).is_err());
        assert_eq!(check_ranges(&[0..4, 6..10], 10).unwrap(), 8);
        assert!(matches!(
            data_blocks(0x1000, 4096, &[1..513], true),
            Err(SglError::Unaligned { addr: 0x1001, .. })
        ));
        assert!(data_blocks(0x1000, 4096, &[4..516], true).is_ok());
        assert!(matches!(
            contiguous(0x1002, 512, true),
            Err(SglError::Unaligned { .. })
        ));
        assert_eq!(
            contiguous(0x1002, 512, false).unwrap(),
            Descriptor::data_block(0x1002, 512)
        );
        assert!(matches!(contiguous(0, 0, false), Err(SglError::Empty)));
    }

    #[test]
    fn huge_ranges_split_at_the_length_field() {
        let d = data_blocks(0, usize::MAX, &[0..(5 << 30)], false).unwrap();
        let lens: Vec<u32> = d.iter().map(|d| d.len).collect();
        assert_eq!(lens, vec![1 << 31, 1 << 31, 1 << 30]);
        assert_eq!(d[2].addr, 4 << 30);
    }

    #[test]
    fn single_descriptor_needs_no_list() {
        let one = [Descriptor::data_block(0x4003, 4096)];
        let s = Sgl::build(&one, |_| panic!("no list")).unwrap();
        assert_eq!((s.sgl1, s.list.is_none()), (one[0], true));
        assert_eq!(segment_pages_for(1), 0);
    }

    #[test]
    fn many_descriptors_make_one_last_segment() {
        // 257 data descriptors: one segment over two pages, no pointer inside it.
        let data: Vec<Descriptor> = (0..257)
            .map(|i| Descriptor::data_block(0x10_0000 + i * 0x1000, 512))
            .collect();
        assert_eq!(segment_pages_for(256), 1);
        assert_eq!(segment_pages_for(257), 2);
        let (sgl1, list) = layout(&data, 0x8000).unwrap();
        assert_eq!(sgl1, Descriptor::last_segment(0x8000, 257 * 16));
        assert_eq!(list, data);
        assert!(matches!(
            last_segment_for(0, MAX_SEGMENT_DESCRIPTORS + 1),
            Err(SglError::TooManyDescriptors { .. })
        ));
        assert!(last_segment_for(0, MAX_SEGMENT_DESCRIPTORS).is_ok());
    }

    /// The walk model follows chains too (legal, what other hosts build): a Segment ->
    /// Segment -> Last Segment chain visits its data in order.
    #[test]
    fn the_walk_model_follows_chains() {
        let d = |i: u64| Descriptor::data_block(i * 0x1000, 512);
        let mut mem: HashMap<u64, Vec<Descriptor>> = HashMap::new();
        mem.insert(0xa000, vec![d(1), Descriptor::segment(0xb000, 32)]);
        mem.insert(0xb000, vec![d(2), Descriptor::last_segment(0xc000, 16)]);
        mem.insert(0xc000, vec![d(3)]);
        let got = walk(Descriptor::segment(0xa000, 32), &|a, n| {
            mem[&a][..n].to_vec()
        });
        assert_eq!(got, vec![d(1), d(2), d(3)]);
    }

    #[test]
    fn segment_list_is_written_to_a_pool_buffer() {
        let pool = pool();
        let data: Vec<Descriptor> = (0..600)
            .map(|i| Descriptor::data_block(0x4000_0000 + i * 8192 + 3, 700))
            .collect();
        let s = Sgl::build(&data, |n| {
            assert_eq!(n, 3 * PAGE_BYTES);
            pool.try_alloc(n)
        })
        .unwrap();
        let list = s.list.as_ref().unwrap();
        let list_addr = list.device_addr().0;
        let (sgl1, expect) = layout(&data, list_addr).unwrap();
        assert_eq!(s.sgl1, sgl1);
        let stored = read_descriptors(list, expect.len());
        assert_eq!(stored, expect);
        let mem = memory_of(&stored, list_addr);
        assert_eq!(walk(s.sgl1, &|a, n| mem[&a][..n].to_vec()), data);
    }

    #[test]
    fn one_page_segment_matches_the_general_layout() {
        let pool = pool();
        let mut page = pool.try_alloc(PAGE_BYTES).unwrap();
        for n in [2usize, 3, 100, 256] {
            let data: Vec<Descriptor> = (0..n as u64)
                .map(|i| Descriptor::data_block(0x7000_0001 + i * 4099, 4099))
                .collect();
            let sgl1 = write_one_page_segment(&mut page, &data).unwrap();
            let (want, list) = layout(&data, page.device_addr().0).unwrap();
            assert_eq!(sgl1, want);
            assert_eq!(read_descriptors(&page, n), list);
        }
        let one = [Descriptor::data_block(5, 7)];
        assert_eq!(write_one_page_segment(&mut page, &one).unwrap(), one[0]);
        let too_many = vec![Descriptor::data_block(0, 512); 257];
        assert!(matches!(
            write_one_page_segment(&mut page, &too_many),
            Err(SglError::TooManyForPage { descriptors: 257 })
        ));
    }

    proptest! {
        /// Walking the SGL like a controller visits exactly the given ranges, in order; their
        /// lengths add up to the transfer.
        #[test]
        fn sgl_covers_exactly_the_transfer(
            base_off in 0u64..4096,
            pieces in proptest::collection::vec((0usize..5000, 1usize..9000), 1..1200),
        ) {
            let base = 0x4000_0000 + base_off;
            let mut ranges = Vec::new();
            let mut at = 0usize;
            for (gap, len) in &pieces {
                ranges.push(at + gap..at + gap + len);
                at += gap + len;
            }
            let data = data_blocks(base, at, &ranges, false).unwrap();
            prop_assert_eq!(data.len(), ranges.len());
            let list_addr = 0x9000_0000u64;
            let (sgl1, list) = layout(&data, list_addr).unwrap();
            prop_assert_eq!(list.len(), if data.len() == 1 { 0 } else { data.len() });
            let mem = memory_of(&list, list_addr);
            let visited = walk(sgl1, &|a, n| mem[&a][..n].to_vec());
            let want: Vec<(u64, usize)> =
                ranges.iter().map(|r| (base + r.start as u64, r.len())).collect();
            let got: Vec<(u64, usize)> =
                visited.iter().map(|d| (d.addr, d.len as usize)).collect();
            prop_assert_eq!(got, want);
            let total: usize = visited.iter().map(|d| d.len as usize).sum();
            prop_assert_eq!(total, pieces.iter().map(|p| p.1).sum::<usize>());
        }

        /// Parsing never panics and round-trips what it accepts.
        #[test]
        fn parse_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..20)) {
            if let Some(d) = Descriptor::parse(&bytes) {
                prop_assert_eq!(&d.to_bytes()[..12], &bytes[..12]);
                prop_assert_eq!(d.to_bytes()[15], bytes[15]);
            }
        }
    }
}
