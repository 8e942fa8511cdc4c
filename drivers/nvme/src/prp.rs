//! Physical Region Page (PRP) entries: how a command tells the controller where its data is.
//!
//! A transfer of `len` bytes starting at device address `addr` touches `n` memory pages
//! (4 KiB, `CC.MPS = 0`). NVMe describes them as (Base spec 1.4, 4.3):
//! - `n == 1`: PRP1 = `addr` (it may carry an offset into the page), PRP2 unused;
//! - `n == 2`: PRP1 = `addr`, PRP2 = the second page;
//! - `n > 2`:  PRP1 = `addr`, PRP2 = the address of a **PRP list**: the remaining `n - 1` page
//!   addresses, 512 to a 4 KiB list page. If they do not fit in one list page, the last entry
//!   of each full list page points at the next list page instead (a chain).
//!
//! Pool buffers are contiguous in device address space, so the data pages are simply
//! `page_of(addr) + k * 4 KiB`. The list itself must be in device-visible memory: it is one
//! pool buffer of as many list pages as needed, taken with the caller's allocator (the
//! immediate `try_alloc` on the polling path, so a poller never waits), and it must live until
//! the command completes (the queue keeps it in the command's slot).
//!
//! [`list_words`] is the pure layout (unit-tested, including the chain); [`Prp::build`] puts it
//! in a buffer.

use tidepool::pool::{DmaBuf, PoolError};

use crate::spec::PAGE_BYTES;

/// Entries per PRP list page.
pub const ENTRIES_PER_LIST_PAGE: usize = PAGE_BYTES / 8;

/// Why a PRP description could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PrpError {
    /// The data address is not dword aligned (PRP1 bits 1:0 must be zero).
    #[error("data at device address {addr:#x} is not 4-byte aligned, which NVMe PRPs require; use a pool buffer")]
    Unaligned {
        /// The address.
        addr: u64,
    },
    /// Zero-length transfer.
    #[error("a transfer of 0 bytes has no PRPs; NVMe commands move at least one block")]
    Empty,
    /// The list buffer the allocator returned is not page aligned.
    #[error("PRP list buffer at {addr:#x} is not 4 KiB aligned (pool buffers of 4 KiB or more are): a pool configuration bug")]
    ListUnaligned {
        /// Its address.
        addr: u64,
    },
    /// The list does not fit in the one page given for it (more than 512 entries).
    #[error("a PRP list of {entries} entries does not fit one 4 KiB list page: use Prp::build, which chains list pages")]
    ListTooLong {
        /// Entries needed.
        entries: usize,
    },
    /// No memory for the PRP list.
    #[error("no pool memory for a {bytes} B PRP list: {source}")]
    NoListMemory {
        /// Bytes wanted.
        bytes: usize,
        /// The pool's error.
        source: PoolError,
    },
}

/// How many memory pages `len` bytes at `addr` touch.
pub fn pages_touched(addr: u64, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let first = addr / PAGE_BYTES as u64;
    let last = (addr + len as u64 - 1) / PAGE_BYTES as u64;
    (last - first + 1) as usize
}

/// How many list pages hold `entries` PRP entries (0 when no list is needed, i.e. ≤ 1 entry).
pub fn list_pages_for(entries: usize) -> usize {
    match entries {
        0 | 1 => 0,
        m if m <= ENTRIES_PER_LIST_PAGE => 1,
        // p pages hold 511 * (p - 1) + 512 = 511 p + 1 entries.
        m => (m - 1).div_ceil(ENTRIES_PER_LIST_PAGE - 1),
    }
}

/// The 64-bit words of a PRP list for the pages after the first, given the list's device
/// address `list_addr` (its pages contiguous from there). Word `i` goes at byte `8 * i`.
///
/// ```
/// use tidepool_nvme::prp::list_words;
/// // 3 pages of data at 0x10000: the list holds pages 2 and 3.
/// assert_eq!(list_words(0x10000, 3 * 4096, 0x9000), vec![0x11000, 0x12000]);
/// ```
pub fn list_words(addr: u64, len: usize, list_addr: u64) -> Vec<u64> {
    let page = PAGE_BYTES as u64;
    let first_page = addr & !(page - 1);
    let rest = pages_touched(addr, len).saturating_sub(1);
    let list_pages = list_pages_for(rest);
    let mut words = Vec::with_capacity(rest + list_pages);
    let mut data = (1..=rest as u64).map(|k| first_page + k * page);
    for p in 0..list_pages {
        let last_page = p + 1 == list_pages;
        let take = if last_page {
            ENTRIES_PER_LIST_PAGE
        } else {
            ENTRIES_PER_LIST_PAGE - 1
        };
        words.extend(data.by_ref().take(take));
        if !last_page {
            words.push(list_addr + (p as u64 + 1) * page);
        }
    }
    words
}

/// The data pointer of one command: PRP1, PRP2 and the list buffer that must outlive it.
#[derive(Debug)]
pub struct Prp {
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2 (0, the second page, or the list).
    pub prp2: u64,
    /// The PRP list, if one was needed. Keep it until the command completes.
    pub list: Option<DmaBuf>,
}

impl Prp {
    /// Describes `len` bytes at device address `addr`, taking a list buffer from `alloc_list`
    /// (called with the bytes needed, a multiple of 4 KiB) only when more than two pages are
    /// touched.
    pub fn build(
        addr: u64,
        len: usize,
        alloc_list: impl FnOnce(usize) -> Result<DmaBuf, PoolError>,
    ) -> Result<Prp, PrpError> {
        if len == 0 {
            return Err(PrpError::Empty);
        }
        if addr % 4 != 0 {
            return Err(PrpError::Unaligned { addr });
        }
        let page = PAGE_BYTES as u64;
        let pages = pages_touched(addr, len);
        let second = (addr & !(page - 1)) + page;
        match pages {
            1 => Ok(Prp {
                prp1: addr,
                prp2: 0,
                list: None,
            }),
            2 => Ok(Prp {
                prp1: addr,
                prp2: second,
                list: None,
            }),
            _ => {
                let bytes = list_pages_for(pages - 1) * PAGE_BYTES;
                let mut list =
                    alloc_list(bytes).map_err(|source| PrpError::NoListMemory { bytes, source })?;
                let list_addr = list.device_addr().0;
                if list_addr % page != 0 {
                    return Err(PrpError::ListUnaligned { addr: list_addr });
                }
                let words = list_words(addr, len, list_addr);
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                list.write_at(0, &bytes)
                    .map_err(|source| PrpError::NoListMemory {
                        bytes: bytes.len(),
                        source,
                    })?;
                Ok(Prp {
                    prp1: addr,
                    prp2: list_addr,
                    list: Some(list),
                })
            }
        }
    }
}

/// Writes the PRP list for `len` bytes at `addr` into `list` when it fits in one list page
/// (the transfer touches at most 513 pages: 2 MiB with a page-aligned start), returning the
/// list's device address for PRP2. Lets a queue keep one list page per command slot and
/// rewrite it for every command instead of allocating (and zeroing) a list each time.
///
/// Only the `pages - 1` entries the controller reads are written, with one volatile 64-bit
/// store each (the page is device-visible; no reference to it is formed). The caller must own
/// the page exclusively (no command using it in flight).
pub fn write_one_page_list(list: &mut DmaBuf, addr: u64, len: usize) -> Result<u64, PrpError> {
    let list_addr = list.device_addr().0;
    if list_addr % PAGE_BYTES as u64 != 0 {
        return Err(PrpError::ListUnaligned { addr: list_addr });
    }
    let entries = pages_touched(addr, len).saturating_sub(1);
    if entries > ENTRIES_PER_LIST_PAGE || entries * 8 > list.capacity() {
        return Err(PrpError::ListTooLong { entries });
    }
    let first_page = addr & !(PAGE_BYTES as u64 - 1);
    let base = list.as_ptr().cast::<u64>();
    for k in 0..entries {
        let word = first_page + (k as u64 + 1) * PAGE_BYTES as u64;
        // SAFETY: `k * 8 + 8 <= entries * 8 <= capacity` (checked above); the list is page
        // aligned so the pointer is 8-byte aligned; the caller owns the page; a raw volatile
        // store forms no reference to device-visible memory.
        unsafe { base.add(k).write_volatile(word.to_le()) };
    }
    Ok(list_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pool::pool;
    use proptest::prelude::*;

    #[test]
    fn one_and_two_pages_need_no_list() {
        let p = Prp::build(0x4000, 4096, |_| panic!("no list")).unwrap();
        assert_eq!((p.prp1, p.prp2), (0x4000, 0));
        let p = Prp::build(0x4200, 4096, |_| panic!("no list")).unwrap();
        assert_eq!((p.prp1, p.prp2), (0x4200, 0x5000));
        let p = Prp::build(0x4000, 8192, |_| panic!("no list")).unwrap();
        assert_eq!((p.prp1, p.prp2), (0x4000, 0x5000));
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(matches!(
            Prp::build(0x4002, 512, |_| unreachable!()),
            Err(PrpError::Unaligned { .. })
        ));
        assert!(matches!(
            Prp::build(0x4000, 0, |_| unreachable!()),
            Err(PrpError::Empty)
        ));
    }

    #[test]
    fn list_is_written_to_a_pool_buffer() {
        let pool = pool();
        let p = Prp::build(0x10_0000, 5 * 4096, |n| pool.try_alloc(n)).unwrap();
        let list = p.list.as_ref().unwrap();
        assert_eq!(p.prp2, list.device_addr().0);
        let mut b = [0u8; 32];
        list.read_at(0, &mut b).unwrap();
        let words: Vec<u64> = b
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(words, vec![0x10_1000, 0x10_2000, 0x10_3000, 0x10_4000]);
    }

    #[test]
    fn one_page_list_matches_the_general_layout() {
        let pool = pool();
        let mut page = pool.try_alloc(4096).unwrap();
        for (addr, len) in [
            (0x10_0000u64, 3 * 4096),
            (0x10_0200, 128 << 10),
            (0, 2 << 20),
        ] {
            let prp2 = write_one_page_list(&mut page, addr, len).unwrap();
            assert_eq!(prp2, page.device_addr().0);
            let words = list_words(addr, len, prp2);
            let mut b = vec![0u8; words.len() * 8];
            page.read_at(0, &mut b).unwrap();
            let got: Vec<u64> = b
                .chunks(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(got, words, "addr {addr:#x} len {len}");
        }
        // 513 pages (512 entries) still fit; 514 pages would need a chained list: refused.
        assert!(write_one_page_list(&mut page, 0, (2 << 20) + 4096).is_ok());
        assert!(matches!(
            write_one_page_list(&mut page, 0, (2 << 20) + 8192),
            Err(PrpError::ListTooLong { entries: 513 })
        ));
    }

    #[test]
    fn long_lists_chain_to_the_next_list_page() {
        // 1 + 512 + 1 pages: the 513 list entries need two list pages.
        let len = (2 + ENTRIES_PER_LIST_PAGE) * PAGE_BYTES;
        let w = list_words(0, len, 0x8000_0000);
        assert_eq!(list_pages_for(ENTRIES_PER_LIST_PAGE + 1), 2);
        assert_eq!(w.len(), ENTRIES_PER_LIST_PAGE + 2);
        assert_eq!(w[510], 511 * 4096);
        assert_eq!(w[511], 0x8000_1000, "last slot of page 0 chains to page 1");
        assert_eq!(w[512], 512 * 4096);
        assert_eq!(w[513], 513 * 4096);
        // Exactly 512 entries fit in one page without a chain.
        assert_eq!(list_pages_for(ENTRIES_PER_LIST_PAGE), 1);
    }

    proptest! {
        /// Walking the PRPs like a controller visits every page of the transfer once, in order.
        #[test]
        fn prps_cover_exactly_the_transfer(offset in (0u64..1024).prop_map(|o| o * 4), len in 1usize..(3 << 20)) {
            let addr = 0x4000_0000 + offset;
            let list_addr = 0x9000_0000u64;
            let pages = pages_touched(addr, len);
            let words = list_words(addr, len, list_addr);
            // Controller's walk: PRP1, then PRP2 directly or through the list.
            let mut visited = vec![addr & !0xfff];
            if pages == 2 {
                visited.push((addr & !0xfff) + 4096);
            } else if pages > 2 {
                let mut i = 0;
                let mut list_page = 0u64;
                while visited.len() < pages {
                    let slot_in_page = i % ENTRIES_PER_LIST_PAGE;
                    let w = words[i];
                    let remaining = pages - visited.len();
                    if slot_in_page == ENTRIES_PER_LIST_PAGE - 1 && remaining > 1 {
                        list_page += 1;
                        prop_assert_eq!(w, list_addr + list_page * 4096);
                    } else {
                        visited.push(w);
                    }
                    i += 1;
                }
                prop_assert_eq!(i, words.len());
            }
            let expect: Vec<u64> = (0..pages as u64).map(|k| (addr & !0xfff) + k * 4096).collect();
            prop_assert_eq!(visited, expect);
        }
    }
}
