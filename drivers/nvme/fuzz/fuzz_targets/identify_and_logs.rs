//! Fuzz target: the parsers of device-written admin data in `tidepool_nvme::spec`: Identify
//! Controller, Identify Namespace, the active namespace list, the SMART log and the Error
//! Information log, plus the completion status decoder.
//!
//! The input is the page as the device wrote it, of any length (the driver always passes a full
//! page; shorter input checks the parsers' "never panic, read zeros past the end" promise).
//! Beyond "no panic", each parser's output is checked against the page:
//! - every field lying wholly inside the input equals the little-endian bytes at its
//!   specification offset, and every field wholly outside it is zero (a field straddling the
//!   end is only required not to panic: the parsers read a straddling 2- or 4-byte unit as
//!   zero and a 8- or 16-byte one by its 4-byte halves; the driver always passes whole pages).
//!   An LBA format is a 4-byte unit, so its 2-byte MS is zero when the dword straddles the end.
//! - strings are the field's bytes with non-printable bytes replaced by `?`, trimmed;
//! - the namespace's LBA formats number `min(NLBAF, 63) + 1`, its format index is below 64,
//!   and `block_bytes` is either `None` or a power of two from 512 B to 64 KiB that matches
//!   the format in use;
//! - the namespace list is the non-zero prefix of the page's IDs, at most 1024;
//! - the error log holds exactly the non-empty 64-byte entries, in order.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tidepool_nvme::spec::{
    parse_namespace_list, ErrorLogEntry, IdentifyController, IdentifyNamespace, SmartLog, Status,
};

/// The little-endian value of `n` bytes at `at`: `Some` if wholly inside `b`, `Some(0)` if
/// wholly outside, `None` if it straddles the end (unconstrained).
fn field(b: &[u8], at: usize, n: usize) -> Option<u128> {
    if at + n <= b.len() {
        Some(
            b[at..at + n]
                .iter()
                .rev()
                .fold(0u128, |acc, &x| (acc << 8) | u128::from(x)),
        )
    } else if at >= b.len() {
        Some(0)
    } else {
        None
    }
}

/// Asserts that a parsed value `got` matches `field(b, at, n)` when that is constrained.
fn check_field(name: &str, b: &[u8], at: usize, n: usize, got: u128) {
    if let Some(want) = field(b, at, n) {
        assert_eq!(
            got,
            want,
            "{name} at offset {at} ({n} bytes), input of {} bytes",
            b.len()
        );
    }
}

/// The documented string rule: the field's bytes, non-printable ones as `?`, trimmed; empty
/// when the field is not wholly inside the input.
fn ascii_field(b: &[u8], at: usize, n: usize) -> String {
    let Some(raw) = b.get(at..at + n) else {
        return String::new();
    };
    let s: String = raw
        .iter()
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                c as char
            } else {
                '?'
            }
        })
        .collect();
    s.trim().to_string()
}

fn check_controller(b: &[u8]) {
    let id = IdentifyController::parse(b);
    check_field("vid", b, 0, 2, id.vid.into());
    assert_eq!(id.serial, ascii_field(b, 4, 20));
    assert_eq!(id.model, ascii_field(b, 24, 40));
    assert_eq!(id.firmware, ascii_field(b, 64, 8));
    for s in [&id.serial, &id.model, &id.firmware] {
        assert!(s.bytes().all(|c| (0x20..0x7f).contains(&c)));
        assert_eq!(s.trim(), s.as_str());
    }
    check_field("mdts", b, 77, 1, id.mdts.into());
    check_field("cntlid", b, 78, 2, id.cntlid.into());
    check_field("version", b, 80, 4, id.version.into());
    check_field("oacs", b, 256, 2, id.oacs.into());
    check_field("elpe", b, 262, 1, id.elpe.into());
    check_field("sqes", b, 512, 1, id.sqes.into());
    check_field("cqes", b, 513, 1, id.cqes.into());
    check_field("nn", b, 516, 4, id.nn.into());
    check_field("oncs", b, 520, 2, id.oncs.into());
    check_field("vwc", b, 525, 1, id.vwc.into());
    assert_eq!(id.supports_dsm(), id.oncs & 4 != 0);
    assert_eq!(id.supports_write_zeroes(), id.oncs & 8 != 0);
    assert_eq!(id.supports_doorbell_buffer_config(), id.oacs & 0x100 != 0);
    for page in [4096usize, 1 << 16] {
        match id.max_transfer_bytes(page) {
            None => assert_eq!(id.mdts, 0),
            Some(max) => {
                assert_ne!(id.mdts, 0);
                assert_eq!(max, page << id.mdts.min(31));
            }
        }
    }
}

fn check_namespace(b: &[u8]) {
    let ns = IdentifyNamespace::parse(b);
    check_field("nsze", b, 0, 8, ns.nsze.into());
    check_field("ncap", b, 8, 8, ns.ncap.into());
    check_field("nuse", b, 16, 8, ns.nuse.into());
    let nlbaf = b.get(25).copied().unwrap_or(0);
    let flbas = b.get(26).copied().unwrap_or(0);
    assert_eq!(ns.formats.len(), usize::from(nlbaf.min(63)) + 1);
    assert_eq!(ns.format_index, (flbas & 0xf) | ((flbas >> 1) & 0x30));
    assert!(ns.format_index < 64);
    for (i, f) in ns.formats.iter().enumerate() {
        // An LBA format is one dword (MS 15:0, LBADS 23:16, RP 25:24), read as a unit.
        if let Some(dw) = field(b, 128 + 4 * i, 4) {
            assert_eq!(u128::from(f.metadata_bytes), dw & 0xffff);
            assert_eq!(u128::from(f.data_shift), (dw >> 16) & 0xff);
            assert_eq!(u128::from(f.relative_performance), (dw >> 24) & 3);
        }
    }
    assert_eq!(
        ns.format(),
        ns.formats.get(usize::from(ns.format_index)).copied()
    );
    match ns.block_bytes() {
        Some(bytes) => {
            assert!(bytes.is_power_of_two() && (512..=65536).contains(&bytes));
            assert_eq!(Some(bytes), ns.format().map(|f| 1u32 << f.data_shift));
        }
        None => assert!(ns
            .format()
            .is_none_or(|f| !(9..=16).contains(&f.data_shift))),
    }
}

fn check_namespace_list(b: &[u8]) {
    let ids = parse_namespace_list(b);
    assert!(ids.len() <= 1024 && ids.len() <= b.len() / 4);
    for (i, &id) in ids.iter().enumerate() {
        assert_ne!(id, 0);
        check_field("nsid", b, 4 * i, 4, id.into());
    }
    if ids.len() < 1024 {
        // The list stopped at a zero ID or at the end of the input.
        assert!(matches!(field(b, 4 * ids.len(), 4), Some(0) | None));
    }
}

fn check_smart(b: &[u8]) {
    let s = SmartLog::parse(b);
    check_field("critical_warning", b, 0, 1, s.critical_warning.into());
    check_field("temperature", b, 1, 2, s.temperature_kelvin.into());
    check_field("available_spare", b, 3, 1, s.available_spare.into());
    check_field("percent_used", b, 5, 1, s.percent_used.into());
    for (name, at, v) in [
        ("data_units_read", 32, s.data_units_read),
        ("data_units_written", 48, s.data_units_written),
        ("host_reads", 64, s.host_reads),
        ("host_writes", 80, s.host_writes),
        ("power_on_hours", 128, s.power_on_hours),
        ("unsafe_shutdowns", 144, s.unsafe_shutdowns),
        ("media_errors", 160, s.media_errors),
        ("error_log_entries", 176, s.error_log_entries),
    ] {
        check_field(name, b, at, 16, v);
    }
}

fn check_error_log(b: &[u8]) {
    let got = ErrorLogEntry::parse_all(b);
    let want: Vec<&[u8]> = b
        .chunks_exact(ErrorLogEntry::BYTES)
        .filter(|e| e[..8].iter().any(|&x| x != 0))
        .collect();
    assert_eq!(got.len(), want.len());
    for (g, e) in got.iter().zip(want) {
        check_field("error_count", e, 0, 8, g.error_count.into());
        check_field("sqid", e, 8, 2, g.sqid.into());
        check_field("cid", e, 10, 2, g.cid.into());
        let status_field = u16::from_le_bytes([e[12], e[13]]);
        assert_eq!(g.status, Status::from_field(status_field));
        check_field("lba", e, 16, 8, g.lba.into());
        check_field("nsid", e, 24, 4, g.nsid.into());
    }
}

fn check_status(b: &[u8]) {
    for pair in b.chunks_exact(2).take(64) {
        let raw = u16::from_le_bytes([pair[0], pair[1]]);
        let s = Status::from_field(raw);
        assert_eq!(s.0, raw >> 1);
        assert_eq!(s.code(), (raw >> 1) as u8);
        assert_eq!(s.code_type(), ((raw >> 9) & 7) as u8);
        assert_eq!(s.do_not_retry(), raw & 0x8000 != 0);
        assert_eq!(s.is_success(), s.code() == 0 && s.code_type() == 0);
        assert!(!s.to_string().is_empty() && !s.name().is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    check_controller(data);
    check_namespace(data);
    check_namespace_list(data);
    check_smart(data);
    check_error_log(data);
    check_status(data);
});
