//! Data through every kind of DMA data (owned, bounce, direct), PRPs and SGLs, and the NVM
//! commands without data; the namespace is checked directly in the emulator.

#![allow(clippy::single_range_in_vec_init)] // one-range scatter lists are the point

mod common;

use common::*;
use tidepool::data::{DataKind, DmaData, DmaPolicy, HostMemory, PageBuf};
use tidepool::pool::Direction;
use tidepool::share::direct::DirectMapper;
use tidepool_emu::EmuNvmeConfig;
use tidepool_nvme::{DataPointer, IoQueue, NvmeError};

/// Submits a write of `data` at `lba` and waits for it; returns the data back.
fn write_one(q: &mut IoQueue<u64>, rig: &Rig, lba: u64, data: DmaData) -> DmaData {
    q.submit_write(&rig.ns, lba, data, 1)
        .map_err(|e| e.error)
        .unwrap();
    let d = poll_n(q, 1).pop().unwrap();
    d.result.expect("write");
    d.data.unwrap()
}

fn read_one(q: &mut IoQueue<u64>, rig: &Rig, lba: u64, data: DmaData) -> DmaData {
    q.submit_read(&rig.ns, lba, data, 2)
        .map_err(|e| e.error)
        .unwrap();
    let d = poll_n(q, 1).pop().unwrap();
    d.result.expect("read");
    d.data.unwrap()
}

#[test]
fn owned_buffers_write_and_read_zero_copy() {
    let rig = Rig::new();
    for dp in [DataPointer::Prp, DataPointer::Sgl] {
        let mut q = rig.queue(4);
        q.set_data_pointer(dp).unwrap();
        let data = pattern(16 << 10, dp as u8);
        let mut buf = rig.pool.try_alloc(16 << 10).unwrap();
        buf.write_at(0, &data).unwrap();
        let back = write_one(&mut q, &rig, 64, buf.into());
        assert_eq!(back.kind(), DataKind::Owned);
        assert_eq!(rig.ns_bytes(64 * 512, 16 << 10), data);
        let buf = read_one(
            &mut q,
            &rig,
            64,
            rig.pool.try_alloc(16 << 10).unwrap().into(),
        );
        let mut got = vec![0u8; 16 << 10];
        buf.into_buf().unwrap().read_at(0, &mut got).unwrap();
        assert_eq!(got, data);
        drop(back);
    }
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn bounced_caller_memory_writes_and_reads() {
    let rig = Rig::new();
    let mut q = rig.queue(4);
    let data = pattern(12 << 10, 9);
    let w = DmaData::try_bounce(&rig.pool, data.clone(), Direction::ToDevice).unwrap();
    assert_eq!(w.kind(), DataKind::Bounce);
    let w = write_one(&mut q, &rig, 8, w);
    assert_eq!(
        w.complete().into_memory().unwrap().into_vec().unwrap(),
        data,
        "the caller's memory comes back unchanged"
    );
    assert_eq!(rig.ns_bytes(8 * 512, 12 << 10), data);
    let r = DmaData::try_bounce(&rig.pool, vec![0u8; 12 << 10], Direction::FromDevice).unwrap();
    let r = read_one(&mut q, &rig, 8, r);
    let got = r.complete().into_memory().unwrap().into_vec().unwrap();
    assert_eq!(got, data, "copied out on complete");
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn directly_mapped_caller_memory_writes_and_reads() {
    let rig = Rig::new();
    let mapper = DirectMapper::new(rig.pool.view().clone(), 0);
    for dp in [DataPointer::Prp, DataPointer::Sgl] {
        let mut q = rig.queue(4);
        q.set_data_pointer(dp).unwrap();
        let data = pattern(16 << 10, 0x40 | dp as u8);
        let mut page = PageBuf::zeroed(16 << 10);
        page.as_mut_slice().copy_from_slice(&data);
        let w = DmaPolicy::Direct
            .prepare(&rig.pool, Some(&mapper), page, Direction::ToDevice)
            .unwrap();
        assert_eq!(w.kind(), DataKind::Direct);
        assert_eq!(w.domain(), rig.pool.domain());
        let before = rig.in_use();
        let w = write_one(&mut q, &rig, 100, w);
        // Direct data takes no pool memory; a PRP queue's slot keeps one list page.
        assert!(
            rig.in_use() - before <= 4096,
            "direct data takes no pool memory"
        );
        drop(w.complete());
        assert_eq!(rig.ns_bytes(100 * 512, 16 << 10), data);
        let r = DmaPolicy::Direct
            .prepare(
                &rig.pool,
                Some(&mapper),
                PageBuf::zeroed(16 << 10),
                Direction::FromDevice,
            )
            .unwrap();
        let r = read_one(&mut q, &rig, 100, r);
        let HostMemory::Page(p) = r.complete().into_memory().unwrap() else {
            panic!("the PageBuf comes back")
        };
        assert_eq!(p.as_slice(), &data[..]);
    }
    assert_eq!(mapper.stats().maps, mapper.stats().unmaps);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

/// PRP shapes: one page, two pages, a PRP list, unaligned starts, through owned buffers.
#[test]
fn prps_for_one_page_two_pages_a_list_and_unaligned_offsets() {
    let rig = Rig::with(
        EmuNvmeConfig {
            mdts: 8,
            namespace_bytes: 8 << 20,
            ..emu_config()
        },
        {
            let mut c = ctrl_config();
            c.pool = pool_config_sized(2 << 20, 1 << 20);
            c
        },
    );
    let mut q = rig.queue(4);
    q.set_data_pointer(DataPointer::Prp).unwrap();
    // (length, offset into the buffer): 1 page, 2 pages, 3 pages (list), 1 MiB (256-entry
    // list), 1 page starting mid-page (2 pages touched), 16 KiB at a 512 B offset (list).
    for (i, &(len, off)) in [
        (4096usize, 0usize),
        (8192, 0),
        (12288, 0),
        (1 << 20, 0),
        (4096, 2048),
        (16 << 10, 512),
    ]
    .iter()
    .enumerate()
    {
        let lba = (i as u64) * 2048;
        let data = pattern(len, i as u8);
        let mut buf = rig.pool.try_alloc(len + off).unwrap();
        buf.write_at(off, &data).unwrap();
        // The transfer is the byte range off..off+len of the buffer.
        q.submit_write_ranges(&rig.ns, lba, buf, &[off..off + len], i as u64)
            .map_err(|e| e.error)
            .unwrap();
        let d = poll_n(&mut q, 1).pop().unwrap();
        d.result
            .unwrap_or_else(|e| panic!("{len} B at +{off}: {e}"));
        drop(d.data);
        assert_eq!(
            rig.ns_bytes(lba * 512, len),
            data,
            "{len} B at offset {off}"
        );
        // Read it back into another buffer at the same offset.
        let buf = rig.pool.try_alloc(len + off).unwrap();
        q.submit_read_ranges(&rig.ns, lba, buf, &[off..off + len], 0)
            .map_err(|e| e.error)
            .unwrap();
        let d = poll_n(&mut q, 1).pop().unwrap();
        d.result.unwrap();
        let buf = d.data.unwrap().into_buf().unwrap();
        let mut got = vec![0u8; len];
        buf.read_at(off, &mut got).unwrap();
        assert_eq!(got, data);
        drop(buf);
    }
    assert!(rig.nvme.io_commands(0x01) == 6 && rig.nvme.io_commands(0x02) == 6);
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn prps_refuse_ranges_that_need_an_sgl() {
    let rig = Rig::new();
    let mut q = rig.queue(4);
    q.set_data_pointer(DataPointer::Prp).unwrap();
    let buf = rig.pool.try_alloc(8192).unwrap();
    let err = q
        .submit_read_ranges(&rig.ns, 0, buf, &[0..256, 4096..4352], 1)
        .unwrap_err();
    assert!(matches!(err.error, NvmeError::Sgl(_)), "{}", err.error);
    assert!(err.data.is_some());
    drop(err);
    drop(q);
    rig.finish();
}

#[test]
fn sgl_contiguous_and_scattered_ranges() {
    let rig = Rig::new();
    let mut q = rig.queue(4);
    assert_eq!(q.data_pointer(), DataPointer::Sgl);
    let data = pattern(4096, 77);
    rig.nvme.write_namespace(10 * 512, &data).unwrap();
    // One block of 4 KiB scattered over four odd ranges of one buffer.
    let ranges = [3..1027, 2000..3024, 5001..6025, 7000..8024];
    let buf = rig.pool.try_alloc(8192).unwrap();
    q.submit_read_ranges(&rig.ns, 10, buf, &ranges, 1)
        .map_err(|e| e.error)
        .unwrap();
    let d = poll_n(&mut q, 1).pop().unwrap();
    d.result.unwrap();
    let buf = d.data.unwrap().into_buf().unwrap();
    let mut at = 0;
    for r in &ranges {
        let mut got = vec![0u8; r.len()];
        buf.read_at(r.start, &mut got).unwrap();
        assert_eq!(got, data[at..at + r.len()], "range {r:?}");
        at += r.len();
    }
    // Gather them back out to another place.
    q.submit_write_ranges(&rig.ns, 20, buf, &ranges, 2)
        .map_err(|e| e.error)
        .unwrap();
    poll_n(&mut q, 1).pop().unwrap().result.unwrap();
    assert_eq!(rig.ns_bytes(20 * 512, 4096), data);
    // 257 ranges: more than one segment page holds (256 descriptors): a longer segment.
    let many: Vec<_> = (0..256)
        .map(|i| i * 16..i * 16 + 8)
        .chain([8192..8192 + 2048])
        .collect();
    assert_eq!(many.iter().map(|r| r.len()).sum::<usize>(), 4096);
    let buf = rig.pool.try_alloc(16384).unwrap();
    q.submit_read_ranges(&rig.ns, 10, buf, &many, 3)
        .map_err(|e| e.error)
        .unwrap();
    let d = poll_n(&mut q, 1).pop().unwrap();
    d.result.unwrap();
    let buf = d.data.unwrap().into_buf().unwrap();
    let mut got = vec![0u8; 8];
    buf.read_at(255 * 16, &mut got).unwrap();
    assert_eq!(got, data[255 * 8..256 * 8]);
    drop(buf);
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn flush_write_zeroes_and_deallocate() {
    let rig = Rig::new();
    let mut q = rig.queue(4);
    q.write(&rig.ns, 0, &vec![0xab; 64 << 10]).unwrap();
    q.flush(&rig.ns).unwrap();
    assert_eq!(rig.nvme.io_commands(0x00), 1);
    q.write_zeroes(&rig.ns, 8, 8).unwrap();
    let ns = rig.ns_bytes(0, 64 << 10);
    assert!(ns[..4096].iter().all(|&b| b == 0xab));
    assert!(ns[4096..8192].iter().all(|&b| b == 0));
    assert!(ns[8192..].iter().all(|&b| b == 0xab));
    q.deallocate(&rig.ns, 32, 16).unwrap();
    let ns = rig.ns_bytes(0, 64 << 10);
    assert!(ns[16384..24576].iter().all(|&b| b == 0));
    assert!(ns[24576..].iter().all(|&b| b == 0xab));
    // The same through the submit API.
    q.submit_flush(&rig.ns, 1).unwrap();
    q.submit_write_zeroes(&rig.ns, 0, 1, 2).unwrap();
    q.submit_deallocate(&rig.ns, 100, 4, 3).unwrap();
    let done = poll_n(&mut q, 3);
    assert!(done.iter().all(|d| d.result.is_ok()));
    assert!(rig.ns_bytes(0, 512).iter().all(|&b| b == 0));
    assert_eq!(rig.nvme.io_commands(0x08), 2);
    assert_eq!(rig.nvme.io_commands(0x09), 2);
    drop(done);
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn lba_out_of_range_too_large_and_not_block_multiple_are_refused_before_the_device() {
    let rig = Rig::new();
    let mut q = rig.queue(4);
    let blocks = rig.ns.blocks();
    {
        let err = q
            .submit_read(&rig.ns, blocks, rig.pool.try_alloc(512).unwrap(), 1)
            .unwrap_err();
        assert!(
            matches!(err.error, NvmeError::LbaOutOfRange { lba, .. } if lba == blocks),
            "{}",
            err.error
        );
        assert!(err.data.is_some());
    }
    {
        let err = q
            .submit_write(&rig.ns, 0, rig.pool.try_alloc(256 << 10).unwrap(), 2)
            .unwrap_err();
        assert!(
            matches!(err.error, NvmeError::TooLarge { .. }),
            "{}",
            err.error
        );
    }
    {
        let err = q
            .submit_write(&rig.ns, 0, rig.pool.try_alloc(100).unwrap(), 3)
            .unwrap_err();
        assert!(matches!(err.error, NvmeError::NotBlockMultiple { .. }));
    }
    assert!(q.write_zeroes(&rig.ns, blocks - 1, 2).is_err());
    assert!(q.deallocate(&rig.ns, blocks, 1).is_err());
    let mut big = vec![0u8; 1024];
    assert!(matches!(
        q.read(&rig.ns, blocks - 1, &mut big),
        Err(NvmeError::LbaOutOfRange { .. })
    ));
    assert_eq!(rig.nvme.io_commands(0x01) + rig.nvme.io_commands(0x02), 0);
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn blocking_read_and_write_split_large_transfers() {
    let rig = Rig::new();
    let mut q = rig.queue(4);
    let data = pattern(600 << 10, 5);
    q.write(&rig.ns, 16, &data).unwrap();
    assert_eq!(rig.nvme.io_commands(0x01), 5, "600 KiB in 128 KiB commands");
    assert_eq!(rig.ns_bytes(16 * 512, data.len()), data);
    let mut back = vec![0u8; data.len()];
    q.read(&rig.ns, 16, &mut back).unwrap();
    assert_eq!(back, data);
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

#[test]
fn bounce_at_queue_depth_with_mixed_kinds() {
    let rig = Rig::new();
    let mapper = DirectMapper::new(rig.pool.view().clone(), 0);
    let mut q = rig.queue(8);
    for i in 0..8u64 {
        let data = pattern(4096, i as u8);
        let d = match i % 3 {
            0 => {
                let mut b = rig.pool.try_alloc(4096).unwrap();
                b.write_at(0, &data).unwrap();
                DmaData::owned(b)
            }
            1 => DmaData::try_bounce(&rig.pool, data, Direction::ToDevice).unwrap(),
            _ => {
                let mut p = PageBuf::zeroed(4096);
                p.as_mut_slice().copy_from_slice(&data);
                DmaData::direct(&mapper, p, Direction::ToDevice).unwrap()
            }
        };
        q.submit_write(&rig.ns, i * 8, d, i)
            .map_err(|e| e.error)
            .unwrap();
    }
    for d in poll_n(&mut q, 8) {
        d.result.unwrap();
        drop(d.data.unwrap().complete());
    }
    for i in 0..8u64 {
        assert_eq!(rig.ns_bytes(i * 8 * 512, 4096), pattern(4096, i as u8));
    }
    drop(q);
    assert_eq!(rig.in_use(), rig.baseline);
    rig.finish();
}

/// A namespace of 4 KiB blocks: the last block reads and writes, one block further is refused
/// before the device with the data given back, and byte offsets map to blocks by `block_of`.
#[test]
fn a_4k_block_namespace_ends_where_it_says() {
    let rig = Rig::with(
        EmuNvmeConfig {
            block_bytes: 4096,
            namespace_bytes: 1 << 20,
            ..emu_config()
        },
        ctrl_config(),
    );
    assert_eq!((rig.ns.block_bytes(), rig.ns.blocks()), (4096, 256));
    assert_eq!(rig.ns.block_of(255 * 4096), (255, true));
    assert_eq!(rig.ns.block_of(255 * 4096 + 512), (255, false));
    let mut q = rig.queue(4);
    let data = pattern(4096, 0x44);
    q.write(&rig.ns, 255, &data).unwrap();
    let mut back = vec![0u8; 4096];
    q.read(&rig.ns, 255, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(rig.ns_bytes(255 * 4096, 4096), data);
    let buf = rig.pool.try_alloc(8192).unwrap();
    let refused = q.submit_read(&rig.ns, 255, buf, 1).unwrap_err();
    assert!(
        matches!(
            refused.error,
            NvmeError::LbaOutOfRange {
                lba: 255,
                end: 257,
                ..
            }
        ),
        "{}",
        refused.error
    );
    assert!(refused.data.is_some(), "the buffer comes back");
    drop(refused);
    drop(q);
    rig.finish();
}
