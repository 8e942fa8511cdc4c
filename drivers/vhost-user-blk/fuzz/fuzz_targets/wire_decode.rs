//! Fuzz target: the pure decoders of backend-written vhost-user bytes in
//! `tidepool_vhost_user_blk::protocol`: the message [`Header`], the payload [`Reader`], and the
//! virtio-blk config space ([`BlkConfig::decode`], GET_CONFIG's payload).
//!
//! Contract checked, beyond "no panic":
//! - a header decodes to the three little-endian words and encodes back to the same bytes;
//! - a [`Reader`] returns exactly the next bytes, fails with `Error::Protocol` precisely when
//!   too few bytes are left, and a failed read consumes nothing;
//! - `BlkConfig::decode` fails with `Error::Protocol` precisely for inputs shorter than the
//!   60-byte config space, and otherwise returns the fields at their virtio-blk offsets.

#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tidepool_vhost_user_blk::protocol::{blk, BlkConfig, Header, Reader, HEADER_LEN};
use tidepool_vhost_user_blk::Error;

/// The little-endian value of `n` bytes of `b` at `at` (caller checks bounds).
fn le(b: &[u8], at: usize, n: usize) -> u64 {
    b[at..at + n]
        .iter()
        .rev()
        .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
}

fn check_header(b: &[u8]) {
    let Some(h) = b.get(..HEADER_LEN) else {
        return;
    };
    let arr: [u8; HEADER_LEN] = h.try_into().expect("12 bytes");
    let hd = Header::decode(&arr);
    assert_eq!(u64::from(hd.request), le(h, 0, 4));
    assert_eq!(u64::from(hd.flags), le(h, 4, 4));
    assert_eq!(u64::from(hd.size), le(h, 8, 4));
    assert_eq!(hd.encode(), arr);
}

fn check_config(b: &[u8]) {
    match BlkConfig::decode(b) {
        Ok(c) => {
            assert!(b.len() >= blk::CONFIG_LEN);
            assert_eq!(c.capacity_sectors, le(b, 0, 8));
            assert_eq!(u64::from(c.size_max), le(b, 8, 4));
            assert_eq!(u64::from(c.seg_max), le(b, 12, 4));
            assert_eq!(u64::from(c.blk_size), le(b, 20, 4));
            assert_eq!(u64::from(c.num_queues), le(b, 34, 2));
            assert_eq!(u64::from(c.max_discard_sectors), le(b, 36, 4));
            assert_eq!(u64::from(c.max_write_zeroes_sectors), le(b, 48, 4));
        }
        Err(Error::Protocol(msg)) => {
            assert!(
                b.len() < blk::CONFIG_LEN,
                "rejected a full config space: {msg}"
            );
            assert!(!msg.is_empty());
        }
        Err(e) => panic!("untyped rejection of config bytes: {e:?}"),
    }
}

/// Reads a script of integer reads over the payload that follows it.
fn check_reader(mut u: Unstructured<'_>) -> Result<()> {
    let ops: Vec<(u8, u8)> = (0..u.int_in_range(0..=32)?)
        .map(|_| Ok((u.int_in_range(0..=4)?, u.arbitrary()?)))
        .collect::<Result<_>>()?;
    let payload = u.take_rest();
    let mut r = Reader::new(payload, "fuzz payload");
    let mut pos = 0usize;
    for (kind, skip) in ops {
        let n = match kind {
            0 => 1,
            1 => 2,
            2 => 4,
            3 => 8,
            _ => usize::from(skip),
        };
        let left = payload.len() - pos;
        let got: std::result::Result<Option<u64>, Error> = match kind {
            0 => r.u8().map(|v| Some(v.into())),
            1 => r.u16().map(|v| Some(v.into())),
            2 => r.u32().map(|v| Some(v.into())),
            3 => r.u64().map(Some),
            _ => r.skip(n).map(|()| None),
        };
        match got {
            Ok(v) => {
                assert!(left >= n);
                if let Some(v) = v {
                    assert_eq!(v, le(payload, pos, n));
                }
                pos += n;
            }
            Err(Error::Protocol(msg)) => {
                assert!(left < n, "read of {n} failed with {left} bytes left: {msg}");
                assert!(msg.contains("fuzz payload"));
            }
            Err(e) => panic!("untyped reader error: {e:?}"),
        }
    }
    // Nothing was consumed by the failures: the next read sees the bytes at `pos`.
    if pos < payload.len() {
        assert_eq!(r.u8().expect("bytes left"), payload[pos]);
    } else {
        assert!(r.u8().is_err());
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    check_header(data);
    check_config(data);
    // GET_CONFIG's reply is a 12-byte header (offset, size, flags) and then the config.
    if let Some(cfg) = data.get(12..) {
        check_config(cfg);
    }
    let _ = check_reader(Unstructured::new(data));
});
