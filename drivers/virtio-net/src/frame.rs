//! Frames for testing and benchmarking: a sequenced, checksummed test frame, and a minimal
//! ARP + ICMP echo responder (enough for the kernel's `ping` to reach the driver).
//!
//! ## Test frame ([`build_test_frame`], [`stamp_test_frame`], [`parse_test_frame`])
//! ```text
//! 0   dst MAC (6) | src MAC (6) | ethertype 0x88b5 (IEEE local experimental)
//! 14  magic "TPNT" | seq u64 LE | timestamp ns u64 LE | frame length u16 LE
//! 36  header check: FNV-1a 32 over bytes 0..36, LE
//! 40  payload: byte i = (len + i) * 31 mod 256 ... up to len - 4
//! len-4  payload check: FNV-1a 32 over bytes 40..len-4, LE
//! ```
//! Minimum length 60 (the Ethernet minimum without FCS). Two checks instead of one so that a
//! sender can restamp a prepared frame with a new sequence number and time by rewriting 26
//! bytes ([`stamp_test_frame`]) instead of checksumming the whole frame again: generation must
//! not be what a benchmark measures. A frame whose checks, magic or recorded length do not
//! match is reported as corrupt, which is how the long VM runs detect corruption end to end.

/// Ethertype of test frames (IEEE 802 local experimental 1).
pub const TEST_ETHERTYPE: u16 = 0x88b5;
/// Smallest test frame.
pub const MIN_TEST_FRAME: usize = 60;
const MAGIC: &[u8; 4] = b"TPNT";
const HDR_END: usize = 36;
const PAYLOAD: usize = 40;

/// A parsed, verified test frame.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TestFrame {
    /// Sequence number.
    pub seq: u64,
    /// Sender's timestamp (CLOCK_MONOTONIC ns).
    pub timestamp_ns: u64,
    /// Frame length.
    pub len: usize,
    /// Source MAC.
    pub src: [u8; 6],
}

/// Why a frame is not a valid test frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not a test frame at all (other ethertype or magic): ignore it.
    #[error("not a test frame")]
    NotTestFrame,
    /// A test frame whose contents are damaged.
    #[error("corrupt test frame: {0}")]
    Corrupt(&'static str),
}

/// FNV-1a, 32 bits.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Writes a test frame of `buf.len()` bytes (≥ [`MIN_TEST_FRAME`], else nothing is written and
/// false is returned).
pub fn build_test_frame(buf: &mut [u8], dst: [u8; 6], src: [u8; 6], seq: u64, ts: u64) -> bool {
    let len = buf.len();
    if !(MIN_TEST_FRAME..=u16::MAX as usize).contains(&len) {
        return false;
    }
    buf[0..6].copy_from_slice(&dst);
    buf[6..12].copy_from_slice(&src);
    buf[12..14].copy_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    buf[14..18].copy_from_slice(MAGIC);
    buf[34..36].copy_from_slice(&(len as u16).to_le_bytes());
    for (i, b) in buf[PAYLOAD..len - 4].iter_mut().enumerate() {
        *b = (len as u8).wrapping_add(i as u8).wrapping_mul(31);
    }
    let sum = fnv1a(&buf[PAYLOAD..len - 4]);
    buf[len - 4..].copy_from_slice(&sum.to_le_bytes());
    stamp_test_frame(buf, seq, ts)
}

/// Rewrites the sequence number and timestamp of a frame made by [`build_test_frame`] and its
/// header check (26 bytes written, 36 hashed). Only the first 40 bytes are touched, so `buf`
/// may be just a frame's head. False (nothing written) if `buf` is shorter than 40 bytes.
pub fn stamp_test_frame(buf: &mut [u8], seq: u64, ts: u64) -> bool {
    if buf.len() < PAYLOAD {
        return false;
    }
    buf[18..26].copy_from_slice(&seq.to_le_bytes());
    buf[26..34].copy_from_slice(&ts.to_le_bytes());
    let h = fnv1a(&buf[0..HDR_END]);
    buf[HDR_END..PAYLOAD].copy_from_slice(&h.to_le_bytes());
    true
}

/// Verifies a frame built by [`build_test_frame`].
pub fn parse_test_frame(f: &[u8]) -> Result<TestFrame, FrameError> {
    if f.len() < 14 || f[12..14] != TEST_ETHERTYPE.to_be_bytes() {
        return Err(FrameError::NotTestFrame);
    }
    if f.len() < MIN_TEST_FRAME {
        return Err(FrameError::Corrupt("shorter than 60 bytes"));
    }
    if &f[14..18] != MAGIC {
        return Err(FrameError::Corrupt("bad magic"));
    }
    let u32_at = |o: usize| u32::from_le_bytes([f[o], f[o + 1], f[o + 2], f[o + 3]]);
    if fnv1a(&f[0..HDR_END]) != u32_at(HDR_END) {
        return Err(FrameError::Corrupt("header check mismatch"));
    }
    let len = usize::from(u16::from_le_bytes([f[34], f[35]]));
    if len != f.len() {
        return Err(FrameError::Corrupt(
            "length differs from the recorded length",
        ));
    }
    if fnv1a(&f[PAYLOAD..len - 4]) != u32_at(len - 4) {
        return Err(FrameError::Corrupt("payload check mismatch"));
    }
    let mut src = [0u8; 6];
    src.copy_from_slice(&f[6..12]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&f[o..o + 8]);
        u64::from_le_bytes(b)
    };
    Ok(TestFrame {
        seq: u64_at(18),
        timestamp_ns: u64_at(26),
        len,
        src,
    })
}

/// The internet checksum (RFC 1071) of `bytes`.
pub fn inet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in bytes.chunks(2) {
        let word = if pair.len() == 2 {
            u16::from_be_bytes([pair[0], pair[1]])
        } else {
            u16::from_be_bytes([pair[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The reply a host with `mac`/`ip` owes to `frame`: an ARP reply to an ARP request for
/// `ip`, or an ICMP echo reply to an echo request to `ip` (IPv4 without options handled,
/// options copied verbatim). None for anything else. Pure: never panics on any input.
pub fn answer_arp_icmp(frame: &[u8], mac: [u8; 6], ip: [u8; 4]) -> Option<Vec<u8>> {
    if frame.len() < 14 {
        return None;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let peer_mac: [u8; 6] = frame[6..12].try_into().ok()?;
    match ethertype {
        0x0806 => {
            let arp = frame.get(14..42)?;
            // Ethernet/IPv4, request, target = our IP.
            if arp[0..8] != [0, 1, 8, 0, 6, 4, 0, 1] || arp[24..28] != ip {
                return None;
            }
            let mut r = vec![0u8; 60];
            r[0..6].copy_from_slice(&peer_mac);
            r[6..12].copy_from_slice(&mac);
            r[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
            r[14..20].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
            r[20..22].copy_from_slice(&2u16.to_be_bytes());
            r[22..28].copy_from_slice(&mac);
            r[28..32].copy_from_slice(&ip);
            r[32..38].copy_from_slice(&arp[8..14]);
            r[38..42].copy_from_slice(&arp[14..18]);
            Some(r)
        }
        0x0800 => {
            let ip_hdr = frame.get(14..34)?;
            let ihl = usize::from(ip_hdr[0] & 0x0f) * 4;
            if ip_hdr[0] >> 4 != 4 || ihl < 20 || ip_hdr[9] != 1 || ip_hdr[16..20] != ip {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([ip_hdr[2], ip_hdr[3]]));
            if total < ihl + 8 || 14 + total > frame.len() {
                return None;
            }
            let icmp_at = 14 + ihl;
            if frame[icmp_at] != 8 {
                return None;
            }
            let mut r = frame[..14 + total].to_vec();
            r[0..6].copy_from_slice(&peer_mac);
            r[6..12].copy_from_slice(&mac);
            // Swap addresses, reset TTL, recompute the header checksum.
            let (src, dst) = (14 + 12, 14 + 16);
            let peer_ip: [u8; 4] = frame[src..src + 4].try_into().ok()?;
            r[src..src + 4].copy_from_slice(&ip);
            r[dst..dst + 4].copy_from_slice(&peer_ip);
            r[14 + 8] = 64;
            r[14 + 10] = 0;
            r[14 + 11] = 0;
            let c = inet_checksum(&r[14..14 + ihl]);
            r[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
            // ICMP: type 0, checksum over the ICMP message.
            r[icmp_at] = 0;
            r[icmp_at + 2] = 0;
            r[icmp_at + 3] = 0;
            let c = inet_checksum(&r[icmp_at..14 + total]);
            r[icmp_at + 2..icmp_at + 4].copy_from_slice(&c.to_be_bytes());
            if r.len() < 60 {
                r.resize(60, 0);
            }
            Some(r)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_frame_round_trip_and_corruption() {
        for len in [60usize, 64, 1000, 1514] {
            let mut f = vec![0u8; len];
            assert!(build_test_frame(&mut f, [1; 6], [2; 6], 77 + len as u64, 5));
            let t = parse_test_frame(&f).unwrap();
            assert_eq!(
                (t.seq, t.timestamp_ns, t.len, t.src),
                (77 + len as u64, 5, len, [2; 6])
            );
            let mut bad = f.clone();
            bad[20] ^= 1; // the sequence number
            assert!(matches!(
                parse_test_frame(&bad),
                Err(FrameError::Corrupt(_))
            ));
            let mut again = f.clone();
            assert!(stamp_test_frame(&mut again, 9, 10));
            assert_eq!(parse_test_frame(&again).unwrap().seq, 9);
            let mut bad = f.clone();
            bad[len / 2] ^= 1;
            assert!(matches!(
                parse_test_frame(&bad),
                Err(FrameError::Corrupt(_))
            ));
            assert!(matches!(
                parse_test_frame(&f[..len - 1]),
                Err(FrameError::Corrupt(_))
            ));
        }
        assert!(!build_test_frame(&mut [0u8; 59], [1; 6], [2; 6], 0, 0));
        assert_eq!(parse_test_frame(&[0u8; 60]), Err(FrameError::NotTestFrame));
    }

    #[test]
    fn answers_arp_request() {
        let mut req = vec![0u8; 42];
        req[0..6].copy_from_slice(&[0xff; 6]);
        req[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0x20]);
        req[12..14].copy_from_slice(&[8, 6]);
        req[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        req[22..28].copy_from_slice(&[2, 0, 0, 0, 0, 0x20]);
        req[28..32].copy_from_slice(&[10, 11, 12, 1]);
        req[38..42].copy_from_slice(&[10, 11, 12, 2]);
        let me = [2, 0, 0, 0, 0, 0x10];
        let r = answer_arp_icmp(&req, me, [10, 11, 12, 2]).unwrap();
        assert_eq!(&r[0..6], &[2, 0, 0, 0, 0, 0x20]);
        assert_eq!(&r[20..22], &[0, 2]);
        assert_eq!(&r[22..28], &me);
        assert_eq!(&r[28..32], &[10, 11, 12, 2]);
        assert_eq!(&r[38..42], &[10, 11, 12, 1]);
        // Someone else's address: no answer.
        assert!(answer_arp_icmp(&req, me, [10, 11, 12, 3]).is_none());
    }

    #[test]
    fn answers_icmp_echo_with_valid_checksums() {
        let mut f = vec![0u8; 14 + 20 + 8 + 4];
        f[12..14].copy_from_slice(&[8, 0]);
        f[14] = 0x45;
        let total = (20 + 8 + 4) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[22] = 64;
        f[23] = 1;
        f[26..30].copy_from_slice(&[10, 11, 12, 1]);
        f[30..34].copy_from_slice(&[10, 11, 12, 2]);
        let c = inet_checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f[34] = 8;
        f[38..42].copy_from_slice(&[0, 7, 0, 1]);
        f[42..46].copy_from_slice(b"ping");
        let c = inet_checksum(&f[34..46]);
        f[36..38].copy_from_slice(&c.to_be_bytes());
        let r = answer_arp_icmp(&f, [2; 6], [10, 11, 12, 2]).unwrap();
        assert_eq!(r[34], 0);
        assert_eq!(inet_checksum(&r[14..34]), 0, "IP header checksum verifies");
        assert_eq!(inet_checksum(&r[34..46]), 0, "ICMP checksum verifies");
        assert_eq!(&r[30..34], &[10, 11, 12, 1]);
        assert_eq!(&r[42..46], b"ping");
    }

    proptest! {
        #[test]
        fn responder_never_panics(bytes in proptest::collection::vec(0u8..=255, 0..200)) {
            let _ = answer_arp_icmp(&bytes, [2; 6], [10, 11, 12, 2]);
            let _ = parse_test_frame(&bytes);
        }
    }
}
