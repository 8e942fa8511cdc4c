//! Fuzz target: the decoders of the controller registers the device sets (`regs::Cap`,
//! `Version`, `Csts`, and `Cc` as read back before a shutdown) and the values the driver derives
//! from them, read through the real `Registers` accessors over a fake BAR0 whose CAP, VS, CC
//! and CSTS hold arbitrary values.
//!
//! Every derived value is checked against the field layout of NVMe Base 1.4, section 3.1,
//! computed independently in `u128` (so that an overflow in the driver's arithmetic shows as
//! a mismatch, and a debug-assertion build panics on it first):
//! - max queue entries = MQES + 1 (1..=65536; MQES 0 is invalid in the spec and gives 1, which
//!   the driver's `max_queue_depth` turns into 0: every queue creation is then refused);
//! - ready timeout = 500 ms × TO, at least 500 ms (TO 0), at most 127.5 s;
//! - doorbell stride = 4 << DSTRD (4 B..=128 KiB), and every doorbell offset,
//!   `0x1000 + (2 qid + cq) × stride` for any 16-bit queue ID, is 4-aligned and fits a `usize`;
//!   `ring` writes exactly that register with exactly the value;
//! - page sizes = 4 KiB << MPSMIN / MPSMAX (4 KiB..=128 MiB);
//! - VS fields and their `Display`; CSTS bits (all ones, a surprise-removed device, is fatal);
//! - a CC read back gets SHN = 01 and nothing else changed from `with_normal_shutdown`.

#![no_main]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tidepool::device::{DeviceError, Mmio};
use tidepool_nvme::regs::{offset, Cap, Cc, Csts, Registers, Version};

/// BAR0 as the device sets it: fixed register values, and a log of the driver's writes.
#[derive(Debug)]
struct FakeBar {
    cap: u64,
    vs: u32,
    cc: u32,
    csts: u32,
    writes: Mutex<Vec<(usize, u32)>>,
}

impl Mmio for FakeBar {
    fn len(&self) -> usize {
        usize::MAX
    }
    fn read32(&self, off: usize) -> std::result::Result<u32, DeviceError> {
        Ok(match off {
            offset::VS => self.vs,
            offset::CC => self.cc,
            offset::CSTS => self.csts,
            _ => 0,
        })
    }
    fn write32(&self, off: usize, value: u32) -> std::result::Result<(), DeviceError> {
        self.writes.lock().unwrap().push((off, value));
        Ok(())
    }
    fn read64(&self, off: usize) -> std::result::Result<u64, DeviceError> {
        Ok(if off == offset::CAP { self.cap } else { 0 })
    }
    fn write64(&self, _: usize, _: u64) -> std::result::Result<(), DeviceError> {
        Ok(())
    }
    fn read16(&self, _: usize) -> std::result::Result<u16, DeviceError> {
        Ok(0)
    }
    fn write16(&self, _: usize, _: u16) -> std::result::Result<(), DeviceError> {
        Ok(())
    }
    fn read8(&self, _: usize) -> std::result::Result<u8, DeviceError> {
        Ok(0)
    }
    fn write8(&self, _: usize, _: u8) -> std::result::Result<(), DeviceError> {
        Ok(())
    }
}

#[derive(Debug)]
struct Input {
    cap: u64,
    vs: u32,
    cc: u32,
    csts: u32,
    /// Queue IDs whose doorbells are computed and rung.
    qids: Vec<(u16, bool, u16)>,
}

impl Input {
    fn take(u: &mut Unstructured<'_>) -> Result<Input> {
        Ok(Input {
            cap: u.arbitrary()?,
            vs: u.arbitrary()?,
            cc: u.arbitrary()?,
            csts: u.arbitrary()?,
            qids: u.arbitrary_iter()?.collect::<Result<_>>()?,
        })
    }
}

fn bits(v: u64, lo: u32, width: u32) -> u128 {
    u128::from((v >> lo) & ((1u64 << width) - 1))
}

fn check_cap(cap: Cap, raw: u64) {
    assert_eq!(cap, Cap::from_raw(raw));
    let mqes = bits(raw, 0, 16);
    assert_eq!(u128::from(cap.max_queue_entries()), mqes + 1);
    assert!((1..=65536).contains(&cap.max_queue_entries()));
    assert_eq!(cap.contiguous_queues_required(), bits(raw, 16, 1) == 1);

    let to = bits(raw, 24, 8);
    let timeout = cap.ready_timeout();
    assert_eq!(timeout.as_millis(), 500 * to.max(1));
    assert!(timeout >= Duration::from_millis(500) && timeout <= Duration::from_millis(127_500));
    // The driver waits for ready with `start.elapsed() > limit` and takes the larger of its
    // command timeout and this for the admin queue: both must stay far from overflow.
    assert!(timeout.checked_mul(1000).is_some());

    let stride = cap.doorbell_stride();
    assert_eq!(stride as u128, 4u128 << bits(raw, 32, 4));
    assert!(stride.is_power_of_two() && (4..=128 << 10).contains(&stride));

    assert_eq!(cap.supports_nvm_command_set(), bits(raw, 37, 1) == 1);
    let min = cap.min_page_bytes();
    let max = cap.max_page_bytes();
    assert_eq!(min as u128, 4096u128 << bits(raw, 48, 4));
    assert_eq!(max as u128, 4096u128 << bits(raw, 52, 4));
    for p in [min, max] {
        assert!(p.is_power_of_two() && (4096..=128 << 20).contains(&p));
    }
}

fn run(input: Input) {
    let bar = Arc::new(FakeBar {
        cap: input.cap,
        vs: input.vs,
        cc: input.cc,
        csts: input.csts,
        writes: Mutex::new(Vec::new()),
    });
    let regs = Registers::new(bar.clone()).expect("the fake BAR never fails");

    let cap = regs.cap().expect("read CAP");
    check_cap(cap, input.cap);

    let v = regs.version().expect("read VS");
    assert_eq!(v, Version::from_raw(input.vs));
    assert_eq!(u32::from(v.major), input.vs >> 16);
    assert_eq!(u32::from(v.minor), (input.vs >> 8) & 0xff);
    assert_eq!(u32::from(v.tertiary), input.vs & 0xff);
    assert_eq!(
        v.to_string(),
        format!("{}.{}.{}", v.major, v.minor, v.tertiary)
    );

    let csts = regs.csts().expect("read CSTS");
    assert_eq!(csts, Csts(input.csts));
    assert_eq!(csts.ready(), input.csts & 1 == 1);
    assert_eq!(csts.fatal(), input.csts & 2 == 2);
    assert_eq!(csts.shutdown_complete(), (input.csts >> 2) & 3 == 2);
    assert!(Csts(u32::MAX).fatal());

    let cc = regs.cc().expect("read CC");
    assert_eq!(cc, Cc(input.cc));
    assert_eq!(cc.enabled(), input.cc & 1 == 1);
    let shut = cc.with_normal_shutdown();
    assert_eq!((shut.0 >> 14) & 3, 1);
    assert_eq!(shut.0 & !(3 << 14), input.cc & !(3 << 14));

    // Doorbells: the stride comes from CAP, read once by `Registers::new`.
    let stride = 4u128 << bits(input.cap, 32, 4);
    let mut qids = input.qids;
    qids.truncate(64);
    qids.extend([(u16::MAX, true, 0), (0, false, 0)]);
    for (qid, cq, value) in qids {
        let off = regs.doorbell_offset(qid, cq);
        let want = 0x1000 + (2 * u128::from(qid) + u128::from(cq)) * stride;
        assert_eq!(off as u128, want, "doorbell of qid {qid} cq {cq}");
        assert_eq!(off % 4, 0);
        bar.writes.lock().unwrap().clear();
        regs.ring(off, value).expect("ring");
        assert_eq!(
            *bar.writes.lock().unwrap(),
            vec![(off, u32::from(value))],
            "one write of the value at the doorbell"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if let Ok(input) = Input::take(&mut u) {
        run(input);
    }
});
