//! Drives the emulated virtio-net function by hand through `PciDevice`/`Mmio`: config space,
//! feature negotiation and the reset handshake. The data path is tested end to end by the
//! virtio-net driver's host tests (drivers/virtio-net/tests).

use std::time::{Duration, Instant};

use tidepool::device::{config, walk_capabilities, PciDevice};

use super::*;

const STATUS: usize = 0x14;

fn features(bar: &dyn Mmio) -> u64 {
    bar.write32(0x00, 0).unwrap();
    let lo = bar.read32(0x04).unwrap();
    bar.write32(0x00, 1).unwrap();
    let hi = bar.read32(0x04).unwrap();
    u64::from(lo) | (u64::from(hi) << 32)
}

fn write_features(bar: &dyn Mmio, f: u64) {
    bar.write32(0x08, 0).unwrap();
    bar.write32(0x0c, f as u32).unwrap();
    bar.write32(0x08, 1).unwrap();
    bar.write32(0x0c, (f >> 32) as u32).unwrap();
}

/// Polls the status register until it reads 0 or `timeout` passes; the last value read.
fn wait_reset(bar: &dyn Mmio, timeout: Duration) -> u8 {
    let deadline = Instant::now() + timeout;
    loop {
        let s = bar.read8(STATUS).unwrap();
        if s == 0 || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

#[test]
fn config_space_has_the_virtio_capabilities_and_corruptions_stay_walkable() {
    let nic = EmuVirtioNet::new(EmuVirtioNetConfig::default()).unwrap();
    assert_eq!(nic.read_config_u16(config::VENDOR_ID).unwrap(), 0x1af4);
    assert_eq!(nic.read_config_u16(config::DEVICE_ID).unwrap(), 0x1041);
    assert_eq!(nic.class_code().unwrap(), 0x020000);
    let caps = nic.capabilities().unwrap();
    let ids: Vec<(u8, u16)> = caps.iter().map(|c| (c.id, c.offset)).collect();
    assert_eq!(
        ids,
        vec![(0x11, 0x40), (9, 0x50), (9, 0x60), (9, 0x70), (9, 0x80)]
    );
    // cfg_type, BAR, offset of each virtio capability; the notify multiplier.
    let mut image = [0u8; 256];
    nic.read_config(0, &mut image).unwrap();
    let types: Vec<u8> = [0x50, 0x60, 0x70, 0x80]
        .iter()
        .map(|&a| image[a + 3])
        .collect();
    assert_eq!(types, vec![1, 3, 4, 2]);
    assert_eq!(image[0x84], 0);
    assert_eq!(u32::from_le_bytes(image[0x90..0x94].try_into().unwrap()), 4);
    // Config writes to the capabilities are ignored.
    nic.write_config(0x53, &[7]).unwrap();
    assert_eq!(nic.read_config_u8(0x53).unwrap(), 1);

    let faults = nic.faults();
    faults.corrupt_capabilities(Some(CapCorruption::Loop));
    let walked = walk_capabilities(|o, b| nic.read_config(o, b)).unwrap();
    assert_eq!(walked.len(), 5, "the loop is cut at the revisit");
    assert_eq!(nic.read_config_u8(0x81).unwrap(), 0x50);
    faults.corrupt_capabilities(Some(CapCorruption::IntoHeader));
    assert_eq!(nic.capabilities().unwrap().len(), 1);
    faults.corrupt_capabilities(Some(CapCorruption::NoCommon));
    assert_eq!(nic.read_config_u8(0x53).unwrap(), 0x0f);
    faults.corrupt_capabilities(Some(CapCorruption::CommonOutsideBar));
    assert_eq!(nic.read_config_u32(0x58).unwrap(), bar::BAR_BYTES as u32);
    faults.corrupt_capabilities(None);
    assert_eq!(nic.capabilities().unwrap().len(), 5);
    assert!(nic.map_bar(1).is_err());
}

#[test]
fn feature_negotiation_refuses_what_was_not_offered_or_lacks_access_platform() {
    let nic = EmuVirtioNet::new(EmuVirtioNetConfig::default()).unwrap();
    let bar = nic.map_bar(0).unwrap();
    assert_eq!(features(&*bar), SUPPORTED_FEATURES);
    assert_eq!(bar.read16(0x12).unwrap(), 2, "num_queues");
    // MAC and link status in the device configuration.
    let mac: Vec<u8> = (0..6)
        .map(|i| bar.read8(bar::DEVICE_CFG + i).unwrap())
        .collect();
    assert_eq!(mac, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    assert_eq!(bar.read16(bar::DEVICE_CFG + 6).unwrap(), 1);
    nic.set_link(false);
    assert_eq!(bar.read16(bar::DEVICE_CFG + 6).unwrap(), 0);
    assert_eq!(bar.read8(0x15).unwrap(), 1, "config generation moved");

    let try_features = |f: u64| -> u8 {
        bar.write8(STATUS, 0).unwrap();
        assert_eq!(wait_reset(&*bar, Duration::from_secs(5)), 0);
        bar.write8(STATUS, 3).unwrap();
        write_features(&*bar, f);
        bar.write8(STATUS, 3 | status::FEATURES_OK).unwrap();
        bar.read8(STATUS).unwrap()
    };
    let ok = F_VERSION_1 | F_ACCESS_PLATFORM | F_MAC;
    assert_eq!(try_features(ok), 3 | status::FEATURES_OK);
    assert_eq!(nic.driver_features(), ok);
    // Not offered (RING_EVENT_IDX), no VERSION_1, no ACCESS_PLATFORM: all refused.
    for bad in [ok | 1 << 29, ok & !F_VERSION_1, ok & !F_ACCESS_PLATFORM] {
        assert_eq!(try_features(bad), 3, "features {bad:#x} must be refused");
    }
    // A device offering no ACCESS_PLATFORM accepts a driver that does not take it.
    let plain = EmuVirtioNet::new(EmuVirtioNetConfig {
        features: F_VERSION_1,
        ..EmuVirtioNetConfig::default()
    })
    .unwrap();
    let pbar = plain.map_bar(0).unwrap();
    assert_eq!(features(&*pbar), F_VERSION_1);
    pbar.write8(STATUS, 3).unwrap();
    write_features(&*pbar, F_VERSION_1);
    pbar.write8(STATUS, 3 | status::FEATURES_OK).unwrap();
    assert_eq!(pbar.read8(STATUS).unwrap(), 3 | status::FEATURES_OK);
    assert!(EmuVirtioNet::new(EmuVirtioNetConfig {
        features: 1 << 29,
        ..EmuVirtioNetConfig::default()
    })
    .is_err());
}

#[test]
fn reset_delay_and_stall_and_function_reset() {
    let nic = EmuVirtioNet::new(EmuVirtioNetConfig::default()).unwrap();
    let bar = nic.map_bar(0).unwrap();
    let faults = nic.faults();
    bar.write8(STATUS, 1).unwrap();
    faults.delay_reset(Duration::from_millis(50));
    let start = Instant::now();
    bar.write8(STATUS, 0).unwrap();
    assert_eq!(bar.read8(STATUS).unwrap(), status::DEVICE_NEEDS_RESET);
    assert_eq!(wait_reset(&*bar, Duration::from_secs(5)), 0);
    assert!(start.elapsed() >= Duration::from_millis(50));
    faults.delay_reset(Duration::ZERO);

    bar.write8(STATUS, 1).unwrap();
    faults.stall_reset(true);
    bar.write8(STATUS, 0).unwrap();
    assert_eq!(
        wait_reset(&*bar, Duration::from_millis(100)),
        status::DEVICE_NEEDS_RESET
    );
    // Writes other than another reset are ignored while it is in progress.
    bar.write8(STATUS, 1).unwrap();
    assert_eq!(nic.device_status(), 1);
    // A function reset completes it regardless.
    nic.function_reset().unwrap();
    assert_eq!(bar.read8(STATUS).unwrap(), 0);
    assert_eq!(nic.device_status(), 0);
    faults.stall_reset(false);
    faults.fail_function_reset(true);
    assert!(nic.function_reset().is_err());
    faults.fail_function_reset(false);
    assert!(nic.stats().resets >= 2);
    assert_eq!(nic.stats().dma_after_bus_master_off, 0);
}

#[test]
fn bar_accesses_are_checked_and_decode_off_reads_ones() {
    let nic = EmuVirtioNet::new(EmuVirtioNetConfig::default()).unwrap();
    let bar = nic.map_bar(0).unwrap();
    assert!(bar.read32(bar::BAR_BYTES).is_err());
    assert!(bar.read32(2).is_err(), "misaligned");
    // Queue programming reads back; notify offset is the queue index.
    bar.write16(0x16, 1).unwrap();
    bar.write16(0x18, 64).unwrap();
    assert_eq!(bar.read16(0x18).unwrap(), 64);
    bar.write16(0x18, 300).unwrap(); // not a power of two: refused
    assert_eq!(bar.read16(0x18).unwrap(), 64);
    assert_eq!(bar.read16(0x1e).unwrap(), 1);
    bar.write64(0x20, 0x1234_5678_9abc).unwrap();
    assert_eq!(bar.read32(0x24).unwrap(), 0x1234);
    bar.write16(0x1a, 2).unwrap();
    assert_eq!(bar.read16(0x1a).unwrap(), 2);
    bar.write16(0x1a, 3).unwrap(); // only 3 vectors: 0..=2
    assert_eq!(bar.read16(0x1a).unwrap(), NO_VECTOR);
    bar.write16(0x16, 5).unwrap(); // no such queue
    assert_eq!(bar.read16(0x18).unwrap(), 0);
    nic.write_config(config::COMMAND, &0u16.to_le_bytes())
        .unwrap();
    assert_eq!(bar.read32(0).unwrap(), u32::MAX);
}

fn small_pool(nic: &EmuVirtioNet) -> tidepool::pool::Pool {
    use tidepool::memory::{MemoryConfig, PageSize};
    use tidepool::pool::{Pool, PoolConfig};
    let cfg = PoolConfig {
        memory: MemoryConfig {
            page_size: PageSize::Small4K,
            allow_small_pages: true,
        },
        chunk_bytes: 256 << 10,
        prefill_bytes: 256 << 10,
        max_bytes: 256 << 10,
        max_buffer: 64 << 10,
        low_watermark: 0,
        high_watermark: 256 << 10,
        reserve_bytes: 0,
        transient: false,
        background: false,
        ..PoolConfig::default()
    };
    Pool::new(nic.dma_view().unwrap(), cfg).unwrap()
}

/// Brings the device up by hand with TX (queue 1, 4 entries) in `ring`: desc at 0, avail at
/// 64, used at 128. Returns after DRIVER_OK.
fn hand_up(nic: &EmuVirtioNet, bar: &dyn Mmio, ring: u64) {
    bar.write8(STATUS, 0).unwrap();
    assert_eq!(wait_reset(bar, Duration::from_secs(5)), 0);
    bar.write8(STATUS, 3).unwrap();
    write_features(bar, F_VERSION_1 | F_ACCESS_PLATFORM);
    bar.write8(STATUS, 3 | status::FEATURES_OK).unwrap();
    nic.set_bus_master(true).unwrap();
    bar.write16(0x16, TX_QUEUE).unwrap();
    bar.write16(0x18, 4).unwrap();
    bar.write64(0x20, ring).unwrap();
    bar.write64(0x28, ring + 64).unwrap();
    bar.write64(0x30, ring + 128).unwrap();
    bar.write16(0x1c, 1).unwrap();
    bar.write8(STATUS, 3 | status::FEATURES_OK | status::DRIVER_OK)
        .unwrap();
}

/// Posts descriptor `id` (addr, len, flags) in avail slot `n` and publishes avail.idx n + 1.
fn post(bar: &dyn Mmio, ring: &mut tidepool::pool::DmaBuf, n: u16, desc: (u64, u32, u16)) {
    let id = n % 4;
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&desc.0.to_le_bytes());
    d[8..12].copy_from_slice(&desc.1.to_le_bytes());
    d[12..14].copy_from_slice(&desc.2.to_le_bytes());
    ring.write_at(16 * usize::from(id), &d).unwrap();
    ring.write_at(64 + 4 + 2 * usize::from(id), &id.to_le_bytes())
        .unwrap();
    ring.write_at(64 + 2, &(n + 1).to_le_bytes()).unwrap();
    bar.write16(bar::NOTIFY + 4 * usize::from(TX_QUEUE), TX_QUEUE)
        .unwrap();
}

fn used_idx(ring: &tidepool::pool::DmaBuf) -> u16 {
    let mut b = [0u8; 2];
    ring.read_at(128 + 2, &mut b).unwrap();
    u16::from_le_bytes(b)
}

fn wait_for(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn malformed_chains_and_iommu_faults_set_needs_reset_and_bus_master_off_stops_dma() {
    let nic = EmuVirtioNet::new(EmuVirtioNetConfig {
        loopback: false,
        capture_tx: true,
        ..EmuVirtioNetConfig::default()
    })
    .unwrap();
    let bar = nic.map_bar(0).unwrap();
    let pool = small_pool(&nic);
    let mut ring = pool.try_alloc(4096).unwrap();
    let mut frame = pool.try_alloc(4096).unwrap();
    let base = ring.device_addr().0;
    let mut payload = vec![0u8; NET_HDR_LEN];
    payload.extend((0..60u8).map(|i| i.wrapping_mul(7)));
    frame.write_at(0, &payload).unwrap();
    let fa = frame.device_addr().0;

    // A good frame goes out and completes with len 0.
    hand_up(&nic, &*bar, base);
    post(&*bar, &mut ring, 0, (fa, payload.len() as u32, 0));
    wait_for(|| used_idx(&ring) == 1);
    assert_eq!(nic.take_sent(), vec![payload[NET_HDR_LEN..].to_vec()]);

    // Bus mastering off: the device cannot fetch; nothing completes and nothing is counted
    // as DMA after the bit was cleared. Back on, the frame goes.
    nic.set_bus_master(false).unwrap();
    post(&*bar, &mut ring, 1, (fa, payload.len() as u32, 0));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(used_idx(&ring), 1);
    assert!(nic.stats().dma_refused > 0);
    nic.set_bus_master(true).unwrap();
    bar.write16(bar::NOTIFY + 4, TX_QUEUE).unwrap();
    wait_for(|| used_idx(&ring) == 2);

    // An indirect descriptor (not negotiated): device error.
    post(&*bar, &mut ring, 2, (fa, 16, 4));
    wait_for(|| bar.read8(STATUS).unwrap() & status::DEVICE_NEEDS_RESET != 0);
    assert_eq!(nic.stats().device_errors, 1);
    assert_eq!(used_idx(&ring), 2, "nothing completed");

    // After a reset, a descriptor pointing at an unmapped IOVA: an IOMMU fault, device error.
    ring.write_at(0, &[0u8; 256]).unwrap();
    hand_up(&nic, &*bar, base);
    assert_eq!(bar.read8(STATUS).unwrap() & status::DEVICE_NEEDS_RESET, 0);
    post(&*bar, &mut ring, 0, (0xdead_0000, 60, 0));
    wait_for(|| bar.read8(STATUS).unwrap() & status::DEVICE_NEEDS_RESET != 0);
    assert_eq!(nic.stats().device_errors, 2);
    assert_eq!(nic.stats().iommu_faults, 1);
    assert_eq!(nic.stats().last_fault_iova, Some(0xdead_0000));
    assert_eq!(nic.stats().dma_after_bus_master_off, 0);

    // Reset before the memory goes back.
    bar.write8(STATUS, 0).unwrap();
    assert_eq!(wait_reset(&*bar, Duration::from_secs(5)), 0);
    drop((ring, frame));
    assert_eq!(pool.stats().in_use_bytes, 0);
}

#[test]
fn the_rx_backlog_is_bounded_and_a_reset_empties_it() {
    let nic = EmuVirtioNet::new(EmuVirtioNetConfig::default()).unwrap();
    for i in 0..RX_BACKLOG {
        assert!(nic.inject_rx(&[i as u8; 60]));
    }
    assert!(!nic.inject_rx(&[0; 60]), "full: dropped");
    assert_eq!(nic.rx_backlog(), RX_BACKLOG);
    assert_eq!(nic.stats().rx_dropped, 1);
    let bar = nic.map_bar(0).unwrap();
    bar.write8(STATUS, 0).unwrap();
    assert_eq!(wait_reset(&*bar, Duration::from_secs(5)), 0);
    assert_eq!(nic.rx_backlog(), 0);
}
