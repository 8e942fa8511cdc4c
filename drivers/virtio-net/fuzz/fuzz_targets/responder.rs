//! Fuzz target: the ARP / ICMP echo responder (`answer_arp_icmp`) and the test-frame parser on
//! arbitrary received frames.
//!
//! The first 10 input bytes are our MAC and IPv4 address; the rest is the frame. Beyond "no
//! panic", every reply must be one the rules allow:
//! - nothing for a frame that is neither ARP (0x0806) nor IPv4 (0x0800);
//! - an ARP reply only to an Ethernet/IPv4 request whose target is our address: addressed to
//!   the requester, from us, opcode 2, our MAC and IP as sender, the requester as target;
//! - an ICMP echo reply only to an IPv4 ICMP echo request to our address: addressed to the
//!   sender, from us, addresses swapped, type 0, and both the IP header checksum and the ICMP
//!   checksum verify; the payload is the request's;
//! - every reply is at least 60 bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tidepool_virtio_net::frame::{answer_arp_icmp, inet_checksum, parse_test_frame};

fuzz_target!(|data: &[u8]| {
    if data.len() < 10 {
        return;
    }
    let mac: [u8; 6] = data[0..6].try_into().unwrap();
    let ip: [u8; 4] = data[6..10].try_into().unwrap();
    let frame = &data[10..];
    let _ = parse_test_frame(frame);
    let Some(r) = answer_arp_icmp(frame, mac, ip) else {
        return;
    };
    assert!(r.len() >= 60);
    assert_eq!(&r[0..6], &frame[6..12], "reply goes to the sender");
    assert_eq!(&r[6..12], &mac, "reply comes from us");
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0806 => {
            assert_eq!(&frame[14..22], &[0, 1, 8, 0, 6, 4, 0, 1], "only requests");
            assert_eq!(&frame[38..42], &ip, "only for our address");
            assert_eq!(&r[12..14], &[8, 6]);
            assert_eq!(&r[20..22], &[0, 2]);
            assert_eq!(&r[22..28], &mac);
            assert_eq!(&r[28..32], &ip);
            assert_eq!(&r[32..38], &frame[22..28]);
            assert_eq!(&r[38..42], &frame[28..32]);
        }
        0x0800 => {
            let ihl = usize::from(frame[14] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
            assert_eq!(frame[14] >> 4, 4);
            assert_eq!(frame[23], 1, "only ICMP");
            assert_eq!(&frame[30..34], &ip, "only to our address");
            assert!(ihl >= 20 && total >= ihl + 8 && 14 + total <= frame.len());
            let icmp = 14 + ihl;
            assert_eq!(frame[icmp], 8, "only echo requests");
            assert_eq!(r[icmp], 0, "echo reply");
            assert_eq!(inet_checksum(&r[14..14 + ihl]), 0, "IP header checksum");
            assert_eq!(inet_checksum(&r[icmp..14 + total]), 0, "ICMP checksum");
            assert_eq!(&r[26..30], &ip);
            assert_eq!(&r[30..34], &frame[26..30]);
            assert_eq!(&r[icmp + 4..14 + total], &frame[icmp + 4..14 + total]);
        }
        other => panic!("answered ethertype {other:#06x}"),
    }
});
