//! Fuzz target: the virtio PCI capability walk over an arbitrary 256-byte config space.
//!
//! Two layers:
//! - `parse_virtio_caps` on the image, compared with an independent statement of the rules
//!   (follow the list from 0x34, dword-aligned pointers in 0x40..0x100, at most 48 entries,
//!   the first vendor capability of each type 1-4 with `cap_len` ≥ 16 (≥ 20 for notify) and
//!   BAR ≤ 5 wins): both must agree on the structures found, or both fail;
//! - `VirtioPci::open` on a fake PCI function serving that config space (vendor and device ID
//!   forced to a modern virtio-net) with one 16 KiB BAR0: it returns a transport or a typed
//!   error, never panics, never hangs; a transport it returns has every window inside its BAR.
//!
//! The generic `walk_capabilities` of the device seam runs on the image too (no panic, at most
//! 48 entries).

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tidepool::device::{check_access, walk_capabilities, DeviceError, Mmio, PciDevice};
use tidepool::share::DeviceView;
use tidepool_virtio_net::virtio::pci::{parse_virtio_caps, CapInfo, VirtioPci};
use tidepool_virtio_net::VirtioError;
use vmm_sys_util::eventfd::EventFd;

const BAR_BYTES: usize = 0x4000;

/// The rules, stated independently: the list first, then the structures in it.
fn reference(c: &[u8; 256]) -> Option<Vec<CapInfo>> {
    if u16::from_le_bytes([c[6], c[7]]) & 0x10 == 0 {
        return None;
    }
    let mut chain = Vec::new();
    let mut p = usize::from(c[0x34]) & !3;
    while p != 0 {
        if chain.len() == 48 || p < 0x40 {
            return None;
        }
        chain.push(p);
        p = usize::from(c[p + 1]) & !3;
    }
    let dword = |o: usize| {
        c.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let mut out: Vec<CapInfo> = Vec::new();
    for p in chain {
        let (id, cap_len, cfg_type, bar) = (c[p], c.get(p + 2), c.get(p + 3), c.get(p + 4));
        if id != 9 {
            continue;
        }
        let cap_len = usize::from(*cap_len.unwrap_or(&0));
        let cfg_type = *cfg_type.unwrap_or(&0);
        if cap_len < 16 || !(1..=4).contains(&cfg_type) {
            continue;
        }
        let bar = *bar.unwrap_or(&0xff);
        let offset = dword(p + 8)?;
        let length = dword(p + 12)?;
        let notify_multiplier = if cfg_type == 2 {
            if cap_len < 20 {
                return None;
            }
            dword(p + 16)?
        } else {
            0
        };
        if bar <= 5 && !out.iter().any(|x| x.cfg_type == cfg_type) {
            out.push(CapInfo {
                cfg_type,
                bar,
                offset,
                length,
                notify_multiplier,
            });
        }
    }
    Some(out)
}

/// A zeroed BAR that accepts every in-bounds aligned access.
#[derive(Debug)]
struct ZeroBar;

impl Mmio for ZeroBar {
    fn len(&self) -> usize {
        BAR_BYTES
    }
    fn read32(&self, o: usize) -> Result<u32, DeviceError> {
        check_access("BAR", o as u64, 4, BAR_BYTES as u64).map(|_| 0)
    }
    fn write32(&self, o: usize, _: u32) -> Result<(), DeviceError> {
        check_access("BAR", o as u64, 4, BAR_BYTES as u64)
    }
    fn read64(&self, o: usize) -> Result<u64, DeviceError> {
        check_access("BAR", o as u64, 8, BAR_BYTES as u64).map(|_| 0)
    }
    fn write64(&self, o: usize, _: u64) -> Result<(), DeviceError> {
        check_access("BAR", o as u64, 8, BAR_BYTES as u64)
    }
    fn read16(&self, o: usize) -> Result<u16, DeviceError> {
        check_access("BAR", o as u64, 2, BAR_BYTES as u64).map(|_| 0)
    }
    fn write16(&self, o: usize, _: u16) -> Result<(), DeviceError> {
        check_access("BAR", o as u64, 2, BAR_BYTES as u64)
    }
    fn read8(&self, o: usize) -> Result<u8, DeviceError> {
        check_access("BAR", o as u64, 1, BAR_BYTES as u64).map(|_| 0)
    }
    fn write8(&self, o: usize, _: u8) -> Result<(), DeviceError> {
        check_access("BAR", o as u64, 1, BAR_BYTES as u64)
    }
}

/// A PCI function serving a fixed config space and one BAR0.
#[derive(Debug)]
struct FakeFunction {
    config: [u8; 256],
}

impl PciDevice for FakeFunction {
    fn name(&self) -> &str {
        "fuzzed config space"
    }
    fn read_config(&self, offset: u16, buf: &mut [u8]) -> Result<(), DeviceError> {
        let o = usize::from(offset);
        let src = self
            .config
            .get(o..o + buf.len())
            .ok_or(DeviceError::BadAccess {
                what: "PCI config space",
                offset: u64::from(offset),
                width: buf.len() as u64,
                size: 256,
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_config(&self, _: u16, _: &[u8]) -> Result<(), DeviceError> {
        Ok(())
    }
    fn map_bar(&self, index: u8) -> Result<Arc<dyn Mmio>, DeviceError> {
        if index == 0 {
            Ok(Arc::new(ZeroBar))
        } else {
            Err(DeviceError::Unsupported(format!("no BAR{index}")))
        }
    }
    fn msix_vectors(&self) -> u32 {
        0
    }
    fn enable_msix(&self, _: &[EventFd]) -> Result<(), DeviceError> {
        Err(DeviceError::Unsupported("no MSI-X".into()))
    }
    fn disable_msix(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn function_reset(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn dma_view(&self) -> Result<Arc<dyn DeviceView>, DeviceError> {
        Err(DeviceError::Unsupported("no DMA".into()))
    }
}

fuzz_target!(|data: &[u8]| {
    let mut config = [0u8; 256];
    let n = data.len().min(256);
    config[..n].copy_from_slice(&data[..n]);

    let got = parse_virtio_caps(&config);
    let want = reference(&config);
    match (&got, &want) {
        (Ok(g), Some(w)) => assert_eq!(g, w, "the walk disagrees with the rules"),
        (Err(VirtioError::BadCapability(why)), None) => assert!(!why.is_empty()),
        _ => panic!("parse_virtio_caps gave {got:?}, the rules {want:?}"),
    }
    // Short images are refused, not indexed past their end.
    let _ = parse_virtio_caps(&config[..n]);

    let walked = walk_capabilities(|o, b| {
        let o = usize::from(o);
        b.copy_from_slice(&config[o..o + b.len()]);
        Ok(())
    })
    .expect("reads never fail here");
    assert!(walked.len() <= 48);

    config[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
    config[2..4].copy_from_slice(&0x1041u16.to_le_bytes());
    let dev: Arc<dyn PciDevice> = Arc::new(FakeFunction { config });
    match VirtioPci::open(dev, 1, "net") {
        Ok(t) => {
            // Only possible with a common config (≥ 0x38 B) and a notify structure in BAR0.
            let caps = got.expect("open succeeded, so the walk did");
            let common = caps
                .iter()
                .find(|c| c.cfg_type == 1)
                .expect("common config");
            assert!(common.bar == 0 && common.length >= 0x38);
            assert!(common.offset as usize + common.length as usize <= BAR_BYTES);
            assert_eq!(t.status().expect("status inside its window"), 0);
        }
        Err(
            VirtioError::BadCapability(_)
            | VirtioError::Device(_)
            | VirtioError::BadRegister { .. },
        ) => {}
        Err(e) => panic!("unexpected error kind: {e}"),
    }
});
