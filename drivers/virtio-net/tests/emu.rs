//! Host tests of the virtio-net driver against the emulated device (`tidepool_emu::EmuVirtioNet`):
//! bring-up, the copy and zero-copy data paths through the device's TX → RX loopback, the async
//! mode, the ARP/ICMP responder, device faults (bad used entries, stalled queues, reset
//! timeouts, a corrupt capability list) and the refusal of another DMA domain's buffers.
//!
//! Pools are small and of locked 4 KiB pages (no hugepages, RLIMIT_MEMLOCK 8 MiB here).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool::device::PciDevice;
use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Pool, PoolConfig};
use tidepool_emu::{
    CapCorruption, EmuNvme, EmuNvmeConfig, EmuVirtioNet, EmuVirtioNetConfig, UsedCorruption,
};
use tidepool_virtio_net::frame::{answer_arp_icmp, build_test_frame, inet_checksum};
use tidepool_virtio_net::net::{F_MAC, F_STATUS, NET_HDR_LEN, RX_BUFFER};
use tidepool_virtio_net::virtio::features::{ACCESS_PLATFORM, VERSION_1};
use tidepool_virtio_net::{NetConfig, NetError, RingError, RxFrame, VirtioError, VirtioNet};

const RX: u16 = 0;
const TX: u16 = 1;
const WAIT: Duration = Duration::from_secs(5);
const PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x20];

fn pool_config() -> PoolConfig {
    PoolConfig {
        memory: MemoryConfig {
            page_size: PageSize::Small4K,
            allow_small_pages: true,
        },
        chunk_bytes: 1 << 20,
        prefill_bytes: 1 << 20,
        max_bytes: 1 << 20,
        max_buffer: 64 << 10,
        low_watermark: 0,
        high_watermark: 1 << 20,
        reserve_bytes: 0,
        transient: false,
        background: false,
        ..PoolConfig::default()
    }
}

fn net_config(queue_size: u16) -> NetConfig {
    NetConfig {
        queue_size,
        interrupts: true,
        refuse_features: 0,
        reset_timeout: Duration::from_secs(1),
        pool: pool_config(),
    }
}

fn emu(cfg: EmuVirtioNetConfig) -> Arc<EmuVirtioNet> {
    Arc::new(EmuVirtioNet::new(cfg).expect("emulated virtio-net"))
}

fn dev(e: &Arc<EmuVirtioNet>) -> Arc<dyn PciDevice> {
    e.clone()
}

/// A device (default config) and the driver brought up on it with `queue_size` entries.
fn up(queue_size: u16) -> (Arc<EmuVirtioNet>, VirtioNet) {
    let e = emu(EmuVirtioNetConfig::default());
    let net = VirtioNet::with_device(dev(&e), net_config(queue_size)).expect("bring-up");
    (e, net)
}

/// Drops the driver (which resets the device before releasing buffers) and checks that every
/// pool byte came back and the device never did DMA without bus mastering.
fn teardown(e: &EmuVirtioNet, net: VirtioNet) {
    let pool = net.pool().clone();
    drop(net);
    assert_eq!(
        pool.stats().in_use_bytes,
        0,
        "every buffer back in the pool"
    );
    assert_eq!(e.stats().dma_after_bus_master_off, 0);
    assert_eq!(e.stats().iommu_faults, 0);
}

/// A sequenced, checksummed test frame of `len` bytes (≥ 60) from PEER.
fn test_frame(mac: [u8; 6], len: usize, seq: u64) -> Vec<u8> {
    let mut f = vec![0u8; len];
    assert!(build_test_frame(&mut f, mac, PEER, seq, 0));
    f
}

/// Polls `recv_batch` until `n` frames arrived (or WAIT passes).
fn recv_n(net: &mut VirtioNet, n: usize) -> Vec<RxFrame> {
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    while out.len() < n {
        let want = n - out.len();
        net.recv_batch(&mut out, want).expect("recv_batch");
        assert!(
            Instant::now() < deadline,
            "only {} of {n} frames arrived",
            out.len()
        );
        std::thread::yield_now();
    }
    out
}

/// Polls `f` until it returns Some (or WAIT passes).
fn poll<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_micros(200));
    }
}

// ---------------------------------------------------------------------------------------------
// Bring-up

#[test]
fn brings_up_with_features_mac_and_link_status() {
    let mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
    let e = emu(EmuVirtioNetConfig {
        mac,
        ..EmuVirtioNetConfig::default()
    });
    let net = VirtioNet::with_device(dev(&e), net_config(64)).unwrap();
    assert_eq!(
        net.features(),
        VERSION_1 | ACCESS_PLATFORM | F_MAC | F_STATUS
    );
    assert_eq!(e.driver_features(), net.features());
    assert_eq!(net.mac(), mac);
    assert_eq!(
        e.device_status(),
        1 | 2 | 4 | 8,
        "ACK|DRIVER|DRIVER_OK|FEATURES_OK"
    );
    assert_eq!(net.rx_posted(), 64, "the RX ring is filled at bring-up");
    assert_eq!(net.tx_free_slots(), 64);
    assert!(net.link_up().unwrap());
    e.set_link(false);
    assert!(!net.link_up().unwrap());
    teardown(&e, net);
    assert_eq!(e.device_status(), 0, "dropping the driver reset the device");
}

#[test]
fn queue_size_is_clamped_to_the_device() {
    let e = emu(EmuVirtioNetConfig {
        queue_size: 32,
        ..EmuVirtioNetConfig::default()
    });
    let net = VirtioNet::with_device(dev(&e), net_config(256)).unwrap();
    assert_eq!(net.rx_posted(), 32);
    assert_eq!(net.tx_free_slots(), 32);
    teardown(&e, net);
}

#[test]
fn without_mac_feature_the_default_mac_is_used() {
    let e = emu(EmuVirtioNetConfig {
        features: VERSION_1 | ACCESS_PLATFORM,
        ..EmuVirtioNetConfig::default()
    });
    let net = VirtioNet::with_device(dev(&e), net_config(16)).unwrap();
    assert_eq!(net.mac(), [0x02, 0, 0, 0, 0, 1]);
    assert_eq!(net.features(), VERSION_1 | ACCESS_PLATFORM);
    assert!(net.link_up().unwrap(), "no STATUS feature: reported up");
    teardown(&e, net);
}

#[test]
fn a_device_without_access_platform_is_refused() {
    let e = emu(EmuVirtioNetConfig {
        features: VERSION_1 | F_MAC,
        ..EmuVirtioNetConfig::default()
    });
    let err = VirtioNet::with_device(dev(&e), net_config(16)).unwrap_err();
    assert!(
        matches!(err, NetError::Virtio(VirtioError::AccessPlatformMissing)),
        "{err}"
    );
    assert_eq!(e.device_status() & 128, 128, "the driver set FAILED");
}

#[test]
fn the_device_rejects_features_without_access_platform() {
    let e = emu(EmuVirtioNetConfig::default());
    let cfg = NetConfig {
        refuse_features: ACCESS_PLATFORM,
        ..net_config(16)
    };
    let err = VirtioNet::with_device(dev(&e), cfg).unwrap_err();
    match err {
        NetError::Virtio(VirtioError::FeaturesRejected { offered, accepted }) => {
            assert_eq!(offered, VERSION_1 | ACCESS_PLATFORM | F_MAC | F_STATUS);
            assert_eq!(accepted & ACCESS_PLATFORM, 0);
        }
        other => panic!("expected FeaturesRejected, got {other}"),
    }
}

#[test]
fn another_kind_of_device_is_refused() {
    let nvme: Arc<dyn PciDevice> = Arc::new(EmuNvme::new(EmuNvmeConfig::default()).unwrap());
    let err = VirtioNet::with_device(nvme, net_config(16)).unwrap_err();
    assert!(
        matches!(
            err,
            NetError::Virtio(VirtioError::WrongDevice {
                want_id: 0x1041,
                ..
            })
        ),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Data path through the loopback

#[test]
fn copy_path_loopback_delivers_the_same_bytes() {
    let (e, mut net) = up(64);
    let mac = net.mac();
    let frames: Vec<Vec<u8>> = [60usize, 64, 333, 1000, 1514]
        .iter()
        .enumerate()
        .map(|(i, &len)| test_frame(mac, len, i as u64))
        .collect();
    let mut short = vec![0u8; 14]; // the smallest frame the driver sends: an Ethernet header
    short[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let mut all: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
    all.push(&short);
    assert_eq!(net.send_batch(&all).unwrap(), all.len());
    let got = recv_n(&mut net, all.len());
    for (rx, want) in got.iter().zip(&all) {
        assert_eq!(rx.len(), want.len());
        assert_eq!(&rx.to_vec(), want);
        let mut head = [0u8; 14];
        rx.read_at(0, &mut head).unwrap();
        assert_eq!(&head, &want[..14]);
    }
    // Reading past the frame is refused.
    assert!(got[0].read_at(got[0].len(), &mut [0u8; 1]).is_err());
    let s = net.stats();
    assert_eq!((s.tx_frames, s.rx_frames), (6, 6));
    assert_eq!(s.rx_bytes, all.iter().map(|f| f.len() as u64).sum::<u64>());
    // Bad lengths fail the whole call and queue nothing.
    let big = vec![0u8; 1515];
    let err = net.send_batch(&[&frames[0], &big]).unwrap_err();
    assert!(matches!(err, NetError::FrameTooLarge { len: 1515, .. }));
    assert!(matches!(
        net.send_batch(&[&[0u8; 13][..]]),
        Err(NetError::FrameTooShort { len: 13, .. })
    ));
    assert_eq!(net.stats().tx_frames, 6);
    assert!(net.reap_tx().is_ok());
    assert_eq!(e.stats().tx_frames, 6);
    assert_eq!(net.tx_in_flight(), 0);
    drop(got);
    teardown(&e, net);
}

#[test]
fn zero_copy_send_buffers_and_recycled_rx_buffers() {
    let (e, mut net) = up(32);
    let mac = net.mac();
    let mut q = VecDeque::new();
    let mut want = Vec::new();
    for i in 0..8u64 {
        let len = 60 + 100 * i as usize;
        let f = test_frame(mac, len, 100 + i);
        let mut b = net.tx_buffer(len).unwrap();
        assert_eq!(b.len(), len);
        b.write_at(0, &f).unwrap();
        let mut back = vec![0u8; len];
        b.read_at(0, &mut back).unwrap();
        assert_eq!(back, f);
        assert!(b.write_at(len - 1, &[0, 0]).is_err(), "past the frame");
        q.push_back(b);
        want.push(f);
    }
    assert_eq!(net.send_buffers(&mut q).unwrap(), 8);
    assert!(q.is_empty());
    let got = recv_n(&mut net, 8);
    for (rx, f) in got.iter().zip(&want) {
        // SAFETY: the device completed this buffer and no longer touches it (the emulated
        // device writes RX buffers only while they are posted).
        let bytes = unsafe { rx.as_slice() };
        assert_eq!(bytes, f.as_slice());
    }
    for rx in got {
        net.recycle_rx(rx);
    }
    // Every refill (after each receive) posts the recycled buffers first, without zeroing;
    // the frames received into them are the new bytes.
    assert_eq!(net.stats().rx_recycled, 0);
    let more: Vec<Vec<u8>> = (0..9u64).map(|i| test_frame(mac, 200, 900 + i)).collect();
    let refs: Vec<&[u8]> = more.iter().map(|f| f.as_slice()).collect();
    assert_eq!(net.send_batch(&refs).unwrap(), 9);
    let got = recv_n(&mut net, 9);
    let bytes: Vec<Vec<u8>> = got.iter().map(|g| g.to_vec()).collect();
    assert_eq!(bytes, more);
    assert_eq!(net.stats().rx_recycled, 8, "{:?}", net.stats());
    // A frame's buffer can be taken out whole: header at 0, frame after it.
    let buf = got.into_iter().next().unwrap().into_buf();
    let mut hdr = [0u8; NET_HDR_LEN];
    buf.read_at(0, &mut hdr).unwrap();
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers = 1");
    assert_eq!(buf.capacity(), RX_BUFFER);
    drop(buf);
    net.release_rx_spares();
    teardown(&e, net);
}

#[test]
fn batches_larger_than_the_ring_arrive_whole_and_in_order() {
    let (e, mut net) = up(16);
    let mac = net.mac();
    let frames: Vec<Vec<u8>> = (0..200u64)
        .map(|i| test_frame(mac, 60 + (i as usize * 7) % 1400, i))
        .collect();
    let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
    let mut sent = 0;
    let mut received: Vec<Vec<u8>> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while received.len() < frames.len() {
        assert!(Instant::now() < deadline, "stuck at {}", received.len());
        if sent < refs.len() {
            let n = net.send_batch(&refs[sent..]).unwrap();
            assert!(n <= 16, "never more than the ring holds: {n}");
            sent += n;
        }
        let mut out = Vec::new();
        net.recv_batch(&mut out, 64).unwrap();
        for f in out {
            received.push(f.to_vec());
            net.recycle_rx(f);
        }
    }
    assert_eq!(received, frames);
    poll(|| {
        net.reap_tx().unwrap();
        (net.tx_in_flight() == 0).then_some(())
    });
    assert_eq!(net.stats().tx_completed, 200);
    assert!(net.stats().notifications > 0);
    assert_eq!(e.stats().rx_dropped, 0);
    teardown(&e, net);
}

#[test]
fn zero_copy_batches_larger_than_the_ring_leave_the_rest_queued() {
    let (e, mut net) = up(8);
    let mac = net.mac();
    let mut q: VecDeque<_> = (0..20u64)
        .map(|i| {
            let f = test_frame(mac, 60, i);
            let mut b = net.tx_buffer(60).unwrap();
            b.write_at(0, &f).unwrap();
            b
        })
        .collect();
    assert_eq!(net.send_buffers(&mut q).unwrap(), 8);
    assert_eq!(q.len(), 12, "the rest stay with the caller");
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < 20 {
        assert!(Instant::now() < deadline);
        net.send_buffers(&mut q).unwrap();
        net.recv_batch(&mut got, 20).unwrap();
    }
    let seqs: Vec<u64> = got
        .iter()
        .map(|f| u64::from_le_bytes(f.to_vec()[18..26].try_into().unwrap()))
        .collect();
    assert_eq!(seqs, (0..20).collect::<Vec<_>>());
    drop(got);
    teardown(&e, net);
}

#[test]
fn injected_frames_are_received_and_oversized_ones_dropped() {
    let (e, mut net) = up(16);
    let f = test_frame(net.mac(), 128, 5);
    assert!(e.inject_rx(&f));
    // Larger than a posted RX buffer (2048 B with the header): the device drops it.
    assert!(e.inject_rx(&vec![0xab; RX_BUFFER]));
    let g = test_frame(net.mac(), 64, 6);
    assert!(e.inject_rx(&g));
    let got = recv_n(&mut net, 2);
    assert_eq!(got[0].to_vec(), f);
    assert_eq!(got[1].to_vec(), g);
    assert_eq!(e.stats().rx_dropped, 1);
    drop(got);
    teardown(&e, net);
}

// ---------------------------------------------------------------------------------------------
// Async mode (tokio)

#[tokio::test]
async fn async_send_and_receive_through_msix() {
    let (e, mut net) = up(16);
    let mac = net.mac();
    let frames: Vec<Vec<u8>> = (0..40u64).map(|i| test_frame(mac, 100, i)).collect();
    let mut sent = 0;
    let mut got = Vec::new();
    while got.len() < frames.len() {
        if sent < frames.len() {
            let refs: Vec<&[u8]> = frames[sent..].iter().map(|f| f.as_slice()).collect();
            sent += tokio::time::timeout(WAIT, net.send_async(&refs))
                .await
                .expect("send_async made progress")
                .unwrap();
        }
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, net.recv_async(&mut out, 64))
            .await
            .expect("recv_async woke")
            .unwrap();
        got.extend(out.iter().map(|f| f.to_vec()));
    }
    assert_eq!(got, frames);
    teardown(&e, net);
}

#[tokio::test]
async fn async_receive_sleeps_until_the_interrupt_and_is_cancel_safe() {
    let (e, mut net) = up(16);
    let mut out = Vec::new();
    // Nothing to receive: the future sleeps; dropping it loses nothing.
    let r = tokio::time::timeout(Duration::from_millis(50), net.recv_async(&mut out, 8)).await;
    assert!(r.is_err(), "nothing arrived, so it must still be waiting");
    assert!(out.is_empty());
    let f = test_frame(net.mac(), 90, 1);
    // Inject only once the receiver is asleep on its eventfd (a frame already there when it
    // first looks is taken without any interrupt, which a loaded host makes likely).
    let (n, interrupts) = {
        let mut receive = std::pin::pin!(net.recv_async(&mut out, 8));
        let asleep = tokio::time::timeout(Duration::from_millis(50), &mut receive).await;
        assert!(
            asleep.is_err(),
            "nothing arrived yet, so it must be waiting"
        );
        let interrupts = e.stats().interrupts;
        assert!(e.inject_rx(&f));
        let n = tokio::time::timeout(WAIT, receive)
            .await
            .expect("the RX interrupt woke the receiver")
            .unwrap();
        (n, interrupts)
    };
    assert_eq!(n, 1);
    assert_eq!(out[0].to_vec(), f);
    assert!(e.stats().interrupts > interrupts, "woken by MSI-X");
    drop(out);
    teardown(&e, net);
}

#[tokio::test]
async fn async_mode_needs_interrupts() {
    let e = emu(EmuVirtioNetConfig::default());
    let cfg = NetConfig {
        interrupts: false,
        ..net_config(16)
    };
    let mut net = VirtioNet::with_device(dev(&e), cfg).unwrap();
    let mut out = Vec::new();
    assert!(matches!(
        net.recv_async(&mut out, 1).await,
        Err(NetError::NoInterrupts)
    ));
    teardown(&e, net);
}

// ---------------------------------------------------------------------------------------------
// ARP / ICMP responder through the device

const MY_IP: [u8; 4] = [10, 11, 12, 2];
const PEER_IP: [u8; 4] = [10, 11, 12, 1];

fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&PEER);
    f[12..14].copy_from_slice(&[8, 6]);
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&PEER);
    f[28..32].copy_from_slice(&PEER_IP);
    f[38..42].copy_from_slice(&target);
    f
}

fn echo_request(dst_mac: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut f = vec![0u8; 14 + total];
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&PEER);
    f[12..14].copy_from_slice(&[8, 0]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&(total as u16).to_be_bytes());
    f[22] = 64;
    f[23] = 1;
    f[26..30].copy_from_slice(&PEER_IP);
    f[30..34].copy_from_slice(&MY_IP);
    let c = inet_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f[34] = 8;
    f[38..42].copy_from_slice(&[0, 7, 0, 1]);
    f[42..].copy_from_slice(payload);
    let c = inet_checksum(&f[34..]);
    f[36..38].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn answers_arp_and_icmp_echo_through_the_device() {
    let e = emu(EmuVirtioNetConfig {
        loopback: false,
        capture_tx: true,
        ..EmuVirtioNetConfig::default()
    });
    let mut net = VirtioNet::with_device(dev(&e), net_config(16)).unwrap();
    let mac = net.mac();
    // A request for someone else, one for us, an echo request, and unrelated traffic.
    for f in [
        arp_request([10, 11, 12, 9]),
        arp_request(MY_IP),
        echo_request(mac, b"ping payload"),
        test_frame(mac, 60, 1),
    ] {
        assert!(e.inject_rx(&f));
    }
    let got = recv_n(&mut net, 4);
    let mut replies = Vec::new();
    for f in &got {
        if let Some(r) = answer_arp_icmp(&f.to_vec(), mac, MY_IP) {
            replies.push(r);
        }
    }
    assert_eq!(replies.len(), 2, "only the ARP request for us and the echo");
    let refs: Vec<&[u8]> = replies.iter().map(|r| r.as_slice()).collect();
    assert_eq!(net.send_batch(&refs).unwrap(), 2);
    let sent = poll(|| {
        let s = e.take_sent();
        (!s.is_empty()).then_some(s)
    });
    let mut sent = sent;
    if sent.len() < 2 {
        sent.extend(poll(|| {
            let s = e.take_sent();
            (!s.is_empty()).then_some(s)
        }));
    }
    assert_eq!(
        sent, replies,
        "the device put the replies on the wire as sent"
    );
    let arp = &sent[0];
    assert_eq!(&arp[0..6], &PEER);
    assert_eq!(&arp[20..22], &[0, 2], "ARP reply");
    assert_eq!(&arp[22..28], &mac);
    assert_eq!(&arp[28..32], &MY_IP);
    let echo = &sent[1];
    assert_eq!(echo[34], 0, "ICMP echo reply");
    assert_eq!(inet_checksum(&echo[14..34]), 0);
    assert_eq!(&echo[26..30], &MY_IP);
    assert_eq!(&echo[30..34], &PEER_IP);
    assert_eq!(&echo[42..54], b"ping payload");
    assert_eq!(e.stats().rx_frames, 4, "loopback off: nothing came back");
    drop(got);
    teardown(&e, net);
}

// ---------------------------------------------------------------------------------------------
// A misbehaving device

#[test]
fn bad_used_ids_and_lengths_are_typed_ring_errors_that_break_the_queue() {
    for (queue, how) in [
        (RX, UsedCorruption::IdOutOfRange),
        (RX, UsedCorruption::LenTooLong),
        (TX, UsedCorruption::IdOutOfRange),
        (TX, UsedCorruption::LenTooLong),
    ] {
        let (e, mut net) = up(16);
        let f = test_frame(net.mac(), 100, 1);
        e.faults().corrupt_next_used(queue, how);
        if queue == RX {
            assert!(e.inject_rx(&f));
        } else {
            e.set_loopback(false);
            assert_eq!(net.send_batch(&[&f]).unwrap(), 1);
        }
        let err = poll(|| {
            let r = if queue == RX {
                net.recv_batch(&mut Vec::new(), 8).map(|_| ())
            } else {
                net.reap_tx().map(|_| ())
            };
            r.err()
        });
        match (how, &err) {
            (
                UsedCorruption::IdOutOfRange,
                NetError::Ring(RingError::IdOutOfRange { queue: q, id, size }),
            ) => assert_eq!((*q, *id, *size), (queue, 16, 16)),
            (
                UsedCorruption::LenTooLong,
                NetError::Ring(RingError::LenTooLong {
                    queue: q,
                    len,
                    allowed: posted,
                    ..
                }),
            ) => {
                assert_eq!(*q, queue);
                assert_eq!(*len, posted + 1);
                let want = if queue == RX {
                    RX_BUFFER
                } else {
                    NET_HDR_LEN + 100
                };
                assert_eq!(*posted as usize, want);
            }
            _ => panic!("queue {queue} {how:?}: unexpected {err}"),
        }
        assert_eq!(e.stats().used_corrupted, 1);
        // The queue stays broken: every later call says so, none panics.
        let again = if queue == RX {
            net.recv_batch(&mut Vec::new(), 8).unwrap_err()
        } else {
            net.send_batch(&[&f]).unwrap_err()
        };
        assert!(
            matches!(again, NetError::Ring(RingError::Broken(q)) if q == queue),
            "{again}"
        );
        // The reset on drop lets the broken queue give its buffers back.
        teardown(&e, net);
    }
}

#[test]
fn a_tx_queue_the_device_never_completes_fills_and_send_returns_zero() {
    let (e, mut net) = up(8);
    e.faults().stall_queue(TX, true);
    let f = test_frame(net.mac(), 60, 0);
    let mut queued = 0;
    for _ in 0..4 {
        queued += net.send_batch(&[&f, &f, &f]).unwrap();
    }
    assert_eq!(queued, 8, "the ring takes 8, then nothing");
    assert_eq!(
        net.send_batch(&[&f]).unwrap(),
        0,
        "documented: queue nothing, no error"
    );
    assert_eq!(net.tx_in_flight(), 8);
    assert_eq!(net.tx_free_slots(), 0);
    let mut q = VecDeque::from([net.tx_buffer(60).unwrap()]);
    assert_eq!(net.send_buffers(&mut q).unwrap(), 0);
    assert_eq!(q.len(), 1, "the buffer stays with the caller");
    assert_eq!(e.stats().tx_frames, 0);
    // The device comes back: everything is sent and looped back.
    e.faults().stall_queue(TX, false);
    let got = recv_n(&mut net, 8);
    assert!(got.iter().all(|g| g.to_vec() == f));
    poll(|| {
        net.reap_tx().unwrap();
        (net.tx_in_flight() == 0).then_some(())
    });
    drop((got, q));
    teardown(&e, net);
}

#[tokio::test]
async fn async_send_on_a_stalled_tx_queue_waits_and_can_be_cancelled() {
    let (e, mut net) = up(4);
    e.faults().stall_queue(TX, true);
    let f = test_frame(net.mac(), 60, 0);
    let refs = [f.as_slice(); 4];
    assert_eq!(net.send_async(&refs).await.unwrap(), 4);
    // The ring is full and never drains: send_async sleeps on the TX interrupt.
    let r = tokio::time::timeout(Duration::from_millis(50), net.send_async(&refs[..1])).await;
    assert!(r.is_err(), "documented: waits while the ring is full");
    assert_eq!(net.tx_in_flight(), 4);
    e.faults().stall_queue(TX, false);
    let n = tokio::time::timeout(WAIT, net.send_async(&refs[..1]))
        .await
        .expect("the TX interrupt woke the sender")
        .unwrap();
    assert_eq!(n, 1);
    let got = recv_n(&mut net, 5);
    drop(got);
    teardown(&e, net);
}

#[test]
fn an_rx_queue_the_device_never_completes_delivers_nothing_until_it_recovers() {
    let (e, mut net) = up(8);
    e.faults().stall_queue(RX, true);
    let f = test_frame(net.mac(), 70, 3);
    assert!(e.inject_rx(&f));
    let mut out = Vec::new();
    let until = Instant::now() + Duration::from_millis(50);
    while Instant::now() < until {
        assert_eq!(net.recv_batch(&mut out, 8).unwrap(), 0);
    }
    assert_eq!(e.rx_backlog(), 1);
    assert_eq!(net.rx_posted(), 8, "the buffers stay posted");
    e.faults().stall_queue(RX, false);
    let got = recv_n(&mut net, 1);
    assert_eq!(got[0].to_vec(), f);
    drop(got);
    teardown(&e, net);
}

#[test]
fn dropping_the_driver_while_the_device_holds_buffers_returns_them_after_the_reset() {
    let (e, mut net) = up(8);
    e.faults().stall_queue(TX, true);
    e.faults().stall_queue(RX, true);
    let f = test_frame(net.mac(), 60, 0);
    assert_eq!(net.send_batch(&[&f, &f]).unwrap(), 2);
    assert_eq!(net.tx_in_flight(), 2);
    teardown(&e, net); // in_use back to 0: the reset succeeded, then the queues let go
}

#[test]
fn a_reset_that_never_completes_is_reset_timeout() {
    let e = emu(EmuVirtioNetConfig::default());
    e.faults().stall_reset(true);
    let cfg = NetConfig {
        reset_timeout: Duration::from_millis(50),
        ..net_config(16)
    };
    let start = Instant::now();
    let err = VirtioNet::with_device(dev(&e), cfg).unwrap_err();
    assert!(
        matches!(
            err,
            NetError::Virtio(VirtioError::ResetTimeout(t, 0x40)) if t == Duration::from_millis(50)
        ),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_slow_reset_within_the_timeout_succeeds_and_a_slower_one_times_out() {
    let e = emu(EmuVirtioNetConfig::default());
    e.faults().delay_reset(Duration::from_millis(20));
    let net = VirtioNet::with_device(dev(&e), net_config(16)).unwrap();
    teardown(&e, net);
    e.faults().delay_reset(Duration::from_millis(300));
    let cfg = NetConfig {
        reset_timeout: Duration::from_millis(50),
        ..net_config(16)
    };
    let err = VirtioNet::with_device(dev(&e), cfg).unwrap_err();
    assert!(
        matches!(err, NetError::Virtio(VirtioError::ResetTimeout(..))),
        "{err}"
    );
}

#[test]
fn a_reset_that_fails_at_drop_leaks_the_buffers_instead_of_reusing_them() {
    let e = emu(EmuVirtioNetConfig::default());
    let cfg = NetConfig {
        reset_timeout: Duration::from_millis(50),
        ..net_config(16)
    };
    let net = VirtioNet::with_device(dev(&e), cfg).unwrap();
    let pool = net.pool().clone();
    let posted = pool.stats().in_use_bytes;
    assert!(posted > 0);
    e.faults().stall_reset(true);
    drop(net);
    // The device might still DMA into them: they are never given back.
    assert_eq!(pool.stats().in_use_bytes, posted);
    assert_eq!(e.stats().dma_after_bus_master_off, 0);
}

#[test]
fn a_corrupt_capability_list_is_bad_capability_without_hanging() {
    for how in [
        CapCorruption::Loop,
        CapCorruption::IntoHeader,
        CapCorruption::NoCommon,
        CapCorruption::CommonOutsideBar,
    ] {
        let e = emu(EmuVirtioNetConfig::default());
        e.faults().corrupt_capabilities(Some(how));
        let start = Instant::now();
        let err = VirtioNet::with_device(dev(&e), net_config(16)).unwrap_err();
        assert!(
            matches!(err, NetError::Virtio(VirtioError::BadCapability(_))),
            "{how:?}: {err}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{how:?} took long"
        );
        assert_eq!(
            e.device_status(),
            0,
            "{how:?}: the device was never touched"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-domain refusal

#[test]
fn send_buffers_refuses_a_buffer_of_another_device() {
    let (ea, mut a) = up(16);
    let (eb, b) = up(16);
    assert_ne!(a.pool().domain(), b.pool().domain());
    let mac = a.mac();
    let fill = |net: &VirtioNet, len: usize, seq: u64| {
        let mut t = net.tx_buffer(len).unwrap();
        t.write_at(0, &test_frame(mac, len, seq)).unwrap();
        t
    };
    let mut q = VecDeque::from([fill(&a, 60, 1), fill(&b, 77, 2), fill(&a, 90, 3)]);
    let err = a.send_buffers(&mut q).unwrap_err();
    match err {
        NetError::ForeignBuffer { buffer, device } => {
            assert_eq!(buffer, b.pool().domain());
            assert_eq!(device, a.pool().domain());
        }
        other => panic!("expected ForeignBuffer, got {other}"),
    }
    assert_eq!(q.len(), 2);
    assert_eq!(q[0].len(), 77, "the foreign buffer stays at the front");
    // The one before it was sent (and came back); the foreign one never reached a device.
    let got = recv_n(&mut a, 1);
    assert_eq!(got[0].len(), 60);
    assert_eq!(eb.stats().tx_frames, 0);
    // Without it the rest goes.
    let foreign = q.pop_front().unwrap();
    assert_eq!(a.send_buffers(&mut q).unwrap(), 1);
    let got2 = recv_n(&mut a, 1);
    assert_eq!(got2[0].len(), 90);
    assert_eq!(ea.stats().tx_frames, 2);
    drop((got, got2, foreign));
    teardown(&ea, a);
    teardown(&eb, b);
}

#[test]
fn with_pool_refuses_a_pool_of_another_domain_and_takes_its_own() {
    let ea = emu(EmuVirtioNetConfig::default());
    let eb = emu(EmuVirtioNetConfig::default());
    let foreign = Pool::new(eb.dma_view().unwrap(), pool_config()).unwrap();
    let err = VirtioNet::with_pool(dev(&ea), foreign.clone(), net_config(16)).unwrap_err();
    match err {
        NetError::ForeignBuffer { buffer, device } => {
            assert_eq!(buffer, foreign.domain());
            assert_eq!(device, ea.dma_view().unwrap().domain());
        }
        other => panic!("expected ForeignBuffer, got {other}"),
    }
    assert_eq!(ea.device_status(), 0, "refused before touching the device");
    assert_eq!(foreign.stats().in_use_bytes, 0);
    drop(foreign);
    // A pool over the device's own domain works.
    let own = Pool::new(ea.dma_view().unwrap(), pool_config()).unwrap();
    let mut net = VirtioNet::with_pool(dev(&ea), own.clone(), net_config(16)).unwrap();
    let f = test_frame(net.mac(), 60, 1);
    net.send_batch(&[&f]).unwrap();
    assert_eq!(recv_n(&mut net, 1)[0].to_vec(), f);
    teardown(&ea, net);
    assert_eq!(own.stats().in_use_bytes, 0);
}
