//! # vnet_basic: the Tidepool virtio-net driver against the guest kernel's NIC
//!
//! Needs `tools/vm/run --virtio-net`. In one run:
//! 1. **Bad input, clear errors.** The NVMe BDF is refused as "not a virtio net device"; the
//!    function without IOMMU translation (iommu_platform=off) is refused for lacking
//!    VIRTIO_F_ACCESS_PLATFORM; declining ACCESS_PLATFORM on the real device makes the device
//!    clear FEATURES_OK (FeaturesRejected); a 1515-byte frame is FrameTooLarge.
//! 2. **TX.** 100 sequenced test frames (bounce path) and 10 built in place (zero-copy
//!    `TxBuf`) reach the kernel's AF_PACKET socket, every one verified.
//! 3. **RX.** 100 frames the kernel sends arrive, verified, polled.
//! 4. **Async (tokio).** 50 frames received with `recv_async` (sent by the kernel 200 ms later,
//!    so the driver really sleeps on the MSI-X eventfd) and 50 sent with `send_async`.
//! 5. **ARP + ICMP.** busybox `ping -c 3 10.11.12.2` from the kernel's IPv4 stack succeeds,
//!    answered by the driver.
//! 6. The pool is back at 0 bytes in use after the driver is dropped.
//! 7. **Pool exhausted.** A second instance on a fixed 4 MiB pool (no growth): with every other
//!    byte of the pool held, 100 frames are still received (the posted buffers), the refill
//!    posts nothing and counts a failure instead of blocking, and once the space is released
//!    the next refill fills the ring again. The harness checks dmesg for IOMMU faults.

#[path = "../vnet_kernel.rs"]
mod vnet_kernel;

use std::collections::{HashSet, VecDeque};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use tidepool_virtio_net::frame::{
    answer_arp_icmp, build_test_frame, parse_test_frame, TEST_ETHERTYPE,
};
use tidepool_virtio_net::net::format_mac;
use tidepool_virtio_net::virtio::features::ACCESS_PLATFORM;
use tidepool_virtio_net::{NetConfig, NetError, VirtioError, VirtioNet};
use vnet_kernel::{PacketSocket, VnetEnv};

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("vnet_basic: PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("vnet_basic: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let env = VnetEnv::from_env()?;
    bad_inputs(&env)?;
    let mut net = VirtioNet::open(&env.bdf, NetConfig::default()).map_err(|e| e.to_string())?;
    let pool = net.pool().clone();
    let mac = net.mac();
    println!(
        "opened {}: mac {} features {:#x} link {:?}, {} RX buffers posted",
        env.bdf,
        format_mac(&mac),
        net.features(),
        net.link_up().map_err(|e| e.to_string())?,
        net.rx_posted()
    );
    if mac != [0x52, 0x54, 0, 0x12, 0x34, 0x10] {
        return Err(format!(
            "MAC {} is not the one QEMU was given",
            format_mac(&mac)
        ));
    }
    match net.send_batch(&[&[0u8; 1515][..]]) {
        Err(NetError::FrameTooLarge {
            len: 1515,
            max: 1514,
        }) => println!("1515-byte frame: FrameTooLarge (ok)"),
        other => return Err(format!("a 1515-byte frame gave {other:?}")),
    }
    let kmac = env.kernel_mac()?;
    let sock = PacketSocket::open(&env.kernel_if, TEST_ETHERTYPE, Duration::from_millis(200))?;
    tx_to_kernel(&mut net, &sock, kmac)?;
    rx_from_kernel(&mut net, &sock, kmac, 0, 100)?;
    async_mode(&mut net, &env, kmac)?;
    ping(&mut net, &env)?;
    let stats = net.stats();
    println!("driver stats: {}", serde_json_line(&stats));
    drop(net);
    let in_use = pool.stats().in_use_bytes;
    println!("pool in use after drop: {in_use} B");
    if in_use != 0 {
        return Err(format!(
            "{in_use} B still in use after the driver was dropped"
        ));
    }
    // The pool holds the container (and so the IOMMU group) open: release it before the
    // device is opened again.
    drop(pool);
    pool_exhausted(&env, &sock, kmac)
}

/// A full pool means fewer posted RX buffers, never a blocked poller.
fn pool_exhausted(env: &VnetEnv, sock: &PacketSocket, kmac: [u8; 6]) -> Result<(), String> {
    let mut cfg = NetConfig {
        interrupts: false,
        ..NetConfig::default()
    };
    cfg.pool.background = false;
    cfg.pool.max_bytes = cfg.pool.prefill_bytes;
    let mut net = VirtioNet::open(&env.bdf, cfg).map_err(|e| e.to_string())?;
    let pool = net.pool().clone();
    let mut hoard = Vec::new();
    while let Ok(b) = pool.try_alloc(2048) {
        hoard.push(b);
    }
    let posted = net.rx_posted();
    println!(
        "exhaustion: holding {} B of the pool; {posted} RX buffers posted",
        hoard.len() * 2048
    );
    let t = Instant::now();
    rx_from_kernel(&mut net, sock, kmac, 9000, 100)?;
    let st = net.stats();
    println!(
        "exhaustion: received 100 frames in {:?} with an empty pool; now {} posted, {} refill failures",
        t.elapsed(),
        net.rx_posted(),
        st.rx_alloc_failures
    );
    // Frames the test dropped went back to the pool and were re-posted, so the ring is short
    // by fewer than 100; it must be short, and the failed refills counted.
    if st.rx_alloc_failures == 0 || net.rx_posted() >= posted {
        return Err(
            "an exhausted pool should have left the ring short and counted failures".into(),
        );
    }
    drop(hoard);
    let refilled = net.refill_rx().map_err(|e| e.to_string())?;
    println!(
        "exhaustion: after release, refill posted {refilled}, ring holds {}",
        net.rx_posted()
    );
    if net.rx_posted() != posted {
        return Err(format!(
            "ring holds {} after release, expected {posted}",
            net.rx_posted()
        ));
    }
    drop(net);
    match pool.stats().in_use_bytes {
        0 => Ok(()),
        n => Err(format!("{n} B in use after the second driver was dropped")),
    }
}

fn serde_json_line<T: std::fmt::Debug>(t: &T) -> String {
    format!("{t:?}")
}

/// Wrong device, no ACCESS_PLATFORM, features refused: each a clear, typed error.
fn bad_inputs(env: &VnetEnv) -> Result<(), String> {
    match VirtioNet::open(&env.nvme_bdf, NetConfig::default()) {
        Err(NetError::Virtio(e @ VirtioError::WrongDevice { .. })) => println!("NVMe BDF: {e}"),
        other => return Err(format!("opening the NVMe function gave {other:?}")),
    }
    match VirtioNet::open(&env.noiommu_bdf, NetConfig::default()) {
        Err(NetError::Virtio(e @ VirtioError::AccessPlatformMissing)) => {
            println!("iommu_platform=off: {e}")
        }
        other => return Err(format!("the device without ACCESS_PLATFORM gave {other:?}")),
    }
    let cfg = NetConfig {
        refuse_features: ACCESS_PLATFORM,
        ..NetConfig::default()
    };
    match VirtioNet::open(&env.bdf, cfg) {
        Err(NetError::Virtio(e @ VirtioError::FeaturesRejected { .. })) => {
            println!("ACCESS_PLATFORM declined: {e}")
        }
        other => return Err(format!("declining ACCESS_PLATFORM gave {other:?}")),
    }
    Ok(())
}

/// Receives test frames on the kernel socket until `want` distinct seqs from `first` arrived.
fn kernel_expect(sock: &PacketSocket, src: [u8; 6], first: u64, want: u64) -> Result<(), String> {
    let mut seen = HashSet::new();
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(10);
    while (seen.len() as u64) < want {
        if Instant::now() > deadline {
            return Err(format!(
                "kernel received {} of {want} frames (seq {first}..)",
                seen.len()
            ));
        }
        let Some(n) = sock.recv(&mut buf)? else {
            continue;
        };
        let f = match parse_test_frame(&buf[..n]) {
            Ok(f) => f,
            Err(e) => return Err(format!("kernel got a bad frame: {e}")),
        };
        if f.src != src || f.seq < first || f.seq >= first + want {
            continue;
        }
        if !seen.insert(f.seq) {
            return Err(format!("kernel got seq {} twice", f.seq));
        }
    }
    Ok(())
}

/// 100 bounced frames and 10 zero-copy frames to the kernel.
fn tx_to_kernel(net: &mut VirtioNet, sock: &PacketSocket, kmac: [u8; 6]) -> Result<(), String> {
    let before = net.stats();
    let frames: Vec<Vec<u8>> = (0..100u64)
        .map(|seq| {
            let mut f = vec![0u8; 60 + (seq as usize * 13) % 1400];
            build_test_frame(&mut f, kmac, net.mac(), 1000 + seq, 0);
            f
        })
        .collect();
    let mut next = 0;
    while next < frames.len() {
        let refs: Vec<&[u8]> = frames[next..].iter().map(|f| f.as_slice()).collect();
        next += net.send_batch(&refs).map_err(|e| e.to_string())?;
    }
    kernel_expect(sock, net.mac(), 1000, 100)?;
    println!("TX: kernel received all 100 bounced frames, verified");
    let mut bufs = VecDeque::new();
    for seq in 0..10u64 {
        let mut b = net.tx_buffer(200).map_err(|e| e.to_string())?;
        let mut f = vec![0u8; 200];
        build_test_frame(&mut f, kmac, net.mac(), 5000 + seq, 0);
        b.write_at(0, &f).map_err(|e| e.to_string())?;
        bufs.push_back(b);
    }
    while !bufs.is_empty() {
        net.send_buffers(&mut bufs).map_err(|e| e.to_string())?;
    }
    kernel_expect(sock, net.mac(), 5000, 10)?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while net.tx_in_flight() > 0 && Instant::now() < deadline {
        net.reap_tx().map_err(|e| e.to_string())?;
    }
    let after = net.stats();
    println!(
        "TX: zero-copy frames received too; device completed {} frames, {} doorbells",
        after.tx_completed - before.tx_completed,
        after.notifications - before.notifications
    );
    Ok(())
}

/// The kernel sends `count` test frames (from seq `first`); the driver must get them all.
fn rx_from_kernel(
    net: &mut VirtioNet,
    sock: &PacketSocket,
    kmac: [u8; 6],
    first: u64,
    count: u64,
) -> Result<(), String> {
    for seq in first..first + count {
        let mut f = vec![0u8; 60 + (seq as usize * 29) % 1400];
        build_test_frame(&mut f, net.mac(), kmac, seq, 0);
        sock.send(&f)?;
    }
    let mut seen = HashSet::new();
    let mut frames = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (seen.len() as u64) < count {
        if Instant::now() > deadline {
            return Err(format!("driver received {} of {count} frames", seen.len()));
        }
        net.recv_batch(&mut frames, 32).map_err(|e| e.to_string())?;
        for fr in frames.drain(..) {
            match parse_test_frame(&fr.to_vec()) {
                Ok(t) if t.src == kmac && (first..first + count).contains(&t.seq) => {
                    if !seen.insert(t.seq) {
                        return Err(format!("driver got seq {} twice", t.seq));
                    }
                }
                Ok(_) => {}
                Err(tidepool_virtio_net::frame::FrameError::NotTestFrame) => {}
                Err(e) => return Err(format!("driver got a corrupt frame: {e}")),
            }
        }
    }
    println!("RX: driver received all {count} frames from the kernel, verified");
    Ok(())
}

/// recv_async / send_async on a current-thread tokio runtime.
fn async_mode(net: &mut VirtioNet, env: &VnetEnv, kmac: [u8; 6]) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let ifname = env.kernel_if.clone();
    let our = net.mac();
    let sender = std::thread::spawn(move || -> Result<(), String> {
        let s = PacketSocket::open(&ifname, TEST_ETHERTYPE, Duration::from_millis(100))?;
        std::thread::sleep(Duration::from_millis(200));
        for seq in 7000..7050u64 {
            let mut f = vec![0u8; 128];
            build_test_frame(&mut f, our, kmac, seq, 0);
            s.send(&f)?;
        }
        Ok(())
    });
    let received = rt.block_on(async {
        let mut seen = HashSet::new();
        let mut frames = Vec::new();
        let mut wakeups = 0;
        let all = async {
            while seen.len() < 50 {
                net.recv_async(&mut frames, 32).await?;
                wakeups += 1;
                for fr in frames.drain(..) {
                    if let Ok(t) = parse_test_frame(&fr.to_vec()) {
                        if (7000..7050).contains(&t.seq) {
                            seen.insert(t.seq);
                        }
                    }
                }
            }
            Ok::<(), NetError>(())
        };
        match tokio::time::timeout(Duration::from_secs(15), all).await {
            Ok(r) => r.map_err(|e| e.to_string()).map(|()| (seen.len(), wakeups)),
            Err(_) => Err(format!(
                "recv_async got {} of 50 frames in 15 s",
                seen.len()
            )),
        }
    })?;
    sender
        .join()
        .map_err(|_| "sender thread panicked".to_string())??;
    println!(
        "async: recv_async got all {} frames in {} returns",
        received.0, received.1
    );
    let sock = PacketSocket::open(&env.kernel_if, TEST_ETHERTYPE, Duration::from_millis(200))?;
    let frames: Vec<Vec<u8>> = (0..50u64)
        .map(|i| {
            let mut f = vec![0u8; 100];
            build_test_frame(&mut f, kmac, our, 8000 + i, 0);
            f
        })
        .collect();
    rt.block_on(async {
        let mut next = 0;
        while next < frames.len() {
            let refs: Vec<&[u8]> = frames[next..].iter().map(|f| f.as_slice()).collect();
            next += net.send_async(&refs).await.map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    })?;
    kernel_expect(&sock, our, 8000, 50)?;
    println!("async: send_async frames all received by the kernel");
    Ok(())
}

/// busybox ping from the kernel's stack, answered by the driver.
fn ping(net: &mut VirtioNet, env: &VnetEnv) -> Result<(), String> {
    let ip = env.our_ip;
    let target = format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]);
    let mut child = Command::new("ping")
        .args(["-c", "3", "-W", "10", &target])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ping: {e}"))?;
    let mut frames = Vec::new();
    let (mut arp, mut icmp) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("ping did not finish in 30 s".into());
        }
        net.recv_batch(&mut frames, 32).map_err(|e| e.to_string())?;
        let replies: Vec<Vec<u8>> = frames
            .drain(..)
            .filter_map(|f| answer_arp_icmp(&f.to_vec(), net.mac(), ip))
            .collect();
        for r in &replies {
            if r[12..14] == [8, 6] {
                arp += 1;
            } else {
                icmp += 1;
            }
        }
        let refs: Vec<&[u8]> = replies.iter().map(|r| r.as_slice()).collect();
        let mut sent = 0;
        while sent < refs.len() {
            sent += net.send_batch(&refs[sent..]).map_err(|e| e.to_string())?;
        }
        net.reap_tx().map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_micros(200));
    };
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !status.success() {
        return Err(format!(
            "ping {target} failed ({status}); answered {arp} ARP and {icmp} ICMP: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    println!("ping: kernel reached the driver ({arp} ARP replies, {icmp} ICMP echo replies sent)");
    Ok(())
}
