//! Bring-up, Identify, namespaces, logs, and DMA-domain checks against the emulated controller.

mod common;

use std::sync::Arc;

use common::*;
use tidepool::pool::Pool;
use tidepool_emu::{EmuIommu, EmuNvme, EmuNvmeConfig};
use tidepool_nvme::{Controller, DataPointer, NvmeError};

#[test]
fn brings_up_and_identifies_the_controller() {
    let rig = Rig::new();
    let id = rig.ctrl.identify();
    assert_eq!(id.vid, tidepool_emu::nvme::VENDOR_ID);
    assert_eq!(id.model, "Tidepool emulated NVMe controller");
    assert_eq!(id.serial, "TIDEPOOL-EMU-0001");
    assert_eq!(id.mdts, 5);
    assert_eq!(id.nn, 1);
    assert!(id.supports_dsm() && id.supports_write_zeroes());
    let v = rig.ctrl.version();
    assert_eq!((v.major, v.minor), (1, 4));
    assert_eq!(rig.ctrl.cap().max_queue_entries(), 256);
    assert_eq!(rig.ctrl.max_queue_depth(), 255);
    assert!(rig.baseline > 0, "the admin rings come from the pool");
    // Identify Controller, the namespace list, namespace 1; Set Features Number of Queues.
    assert_eq!(rig.nvme.admin_commands(0x06), 3);
    assert_eq!(rig.nvme.admin_commands(0x09), 1);
    rig.finish();
}

#[test]
fn finds_namespace_one_with_its_geometry() {
    let rig = Rig::with(
        EmuNvmeConfig {
            namespace_bytes: 4 << 20,
            block_bytes: 4096,
            ..emu_config()
        },
        ctrl_config(),
    );
    assert_eq!(rig.ctrl.namespaces().len(), 1);
    let ns = rig.ns;
    assert_eq!(ns.nsid(), 1);
    assert_eq!(ns.block_bytes(), 4096);
    assert_eq!(ns.blocks(), 1024);
    assert_eq!(ns.bytes(), 4 << 20);
    // MDTS 5 = 128 KiB, below the pool's 256 KiB buffers.
    assert_eq!(ns.max_transfer(), 128 << 10);
    assert!(matches!(
        rig.ctrl.namespace(2),
        Err(NvmeError::NoSuchNamespace(2))
    ));
    rig.finish();
}

#[test]
fn max_transfer_is_the_smaller_of_mdts_and_the_pools_largest_buffer() {
    let mut cfg = ctrl_config();
    cfg.pool = pool_config_sized(1 << 20, 64 << 10);
    let rig = Rig::with(
        EmuNvmeConfig {
            mdts: 8,
            ..emu_config()
        },
        cfg,
    );
    assert_eq!(rig.ns.max_transfer(), 64 << 10);
    rig.finish();
}

#[test]
fn reads_the_smart_and_error_logs() {
    let rig = Rig::new();
    let smart = rig.ctrl.smart_log().unwrap();
    assert_eq!(smart.critical_warning, 0);
    assert!(rig.ctrl.error_log().unwrap().is_empty());
    assert_eq!(rig.nvme.admin_commands(0x02), 2);
    assert_eq!(rig.in_use(), rig.baseline, "log buffers went back");
    rig.finish();
}

#[test]
fn data_pointer_follows_the_controllers_sgl_support() {
    let rig = Rig::new();
    assert!(rig.ctrl.sgl_support().supported());
    assert_eq!(rig.ctrl.data_pointer(), DataPointer::Sgl);
    rig.finish();

    let no_sgl = EmuNvmeConfig {
        sgl: false,
        ..emu_config()
    };
    let rig = Rig::with(no_sgl.clone(), ctrl_config());
    assert_eq!(rig.ctrl.data_pointer(), DataPointer::Prp);
    rig.finish();

    let mut cfg = ctrl_config();
    cfg.data_pointer = DataPointer::Sgl;
    let nvme = Arc::new(EmuNvme::new(no_sgl).unwrap());
    let err = Controller::with_device(nvme, cfg).unwrap_err();
    assert!(matches!(err, NvmeError::Sgl(_)), "{err}");
}

#[test]
fn shutdown_on_drop_completes_and_turns_bus_mastering_off() {
    let rig = Rig::new();
    let nvme = rig.nvme.clone();
    let pool = rig.pool.clone();
    drop(rig);
    use tidepool::device::PciDevice;
    let cmd = nvme
        .read_config_u16(tidepool::device::config::COMMAND)
        .unwrap();
    assert_eq!(cmd & tidepool::device::config::COMMAND_MASTER, 0);
    let bar = nvme.map_bar(0).unwrap();
    assert_eq!(
        (bar.read32(0x1c).unwrap() >> 2) & 3,
        2,
        "CSTS.SHST = complete"
    );
    assert_eq!(pool.stats().in_use_bytes, 0);
}

#[test]
fn a_pool_of_another_domain_is_refused_at_bring_up() {
    let nvme = Arc::new(EmuNvme::new(emu_config()).unwrap());
    let other = EmuIommu::new();
    let pool = Pool::new(Arc::new(other), pool_config()).unwrap();
    let err = Controller::new(nvme, pool.clone(), ctrl_config()).unwrap_err();
    assert!(matches!(err, NvmeError::ForeignBuffer { .. }), "{err}");
    assert_eq!(pool.stats().in_use_bytes, 0);
}

#[test]
fn a_buffer_of_another_domain_is_refused_and_given_back() {
    let a = Rig::new();
    let b = Rig::new();
    assert_ne!(a.pool.domain(), b.pool.domain());
    let mut q = a.queue(4);
    let mut foreign = b.pool.try_alloc(4096).unwrap();
    foreign.write_at(0, &[0x5a; 4096]).unwrap();
    let err = q.submit_write(&a.ns, 0, foreign, 7).unwrap_err();
    match err.error {
        NvmeError::ForeignBuffer { buffer, device } => {
            assert_eq!(buffer, b.pool.domain());
            assert_eq!(device, a.pool.domain());
        }
        e => panic!("expected ForeignBuffer, got {e}"),
    }
    assert_eq!(err.user, 7);
    let back = err
        .data
        .unwrap()
        .into_buf()
        .expect("the same pool buffer back");
    let mut bytes = vec![0u8; 4096];
    back.read_at(0, &mut bytes).unwrap();
    assert_eq!(bytes, vec![0x5a; 4096]);
    assert_eq!(a.nvme.io_commands(0x01), 0, "nothing reached the device");
    assert!(a.ns_bytes(0, 4096).iter().all(|&x| x == 0));
    // A read into a foreign buffer is refused the same way.
    let err = q.submit_read(&a.ns, 0, back, 8).unwrap_err();
    assert!(matches!(err.error, NvmeError::ForeignBuffer { .. }));
    drop(err);
    drop(q);
    a.finish();
    b.finish();
}

#[test]
fn two_controllers_in_one_domain_share_a_pool_and_its_buffers() {
    let iommu = Arc::new(EmuIommu::new());
    let n1 = Arc::new(EmuNvme::with_iommu(emu_config(), iommu.clone()).unwrap());
    let n2 = Arc::new(EmuNvme::with_iommu(emu_config(), iommu.clone()).unwrap());
    let pool = Pool::new(iommu.clone(), pool_config_sized(2 << 20, 256 << 10)).unwrap();
    let c1 = Controller::new(n1.clone(), pool.clone(), ctrl_config()).unwrap();
    let c2 = Controller::new(n2.clone(), pool.clone(), ctrl_config()).unwrap();
    let ns = c1.namespace(1).unwrap();
    let mut q1 = c1.create_io_queue::<u8>(4).unwrap();
    let mut q2 = c2.create_io_queue::<u8>(4).unwrap();
    // One buffer written through controller 1, then read back through controller 2.
    let mut buf = pool.try_alloc(8192).unwrap();
    let data = pattern(8192, 3);
    buf.write_at(0, &data).unwrap();
    q1.submit_write(&ns, 8, buf, 1).unwrap();
    let mut out = Vec::new();
    common::wait_for(
        || q1.poll(&mut out).unwrap() > 0 || !out.is_empty(),
        "write",
    );
    let buf = out.pop().unwrap().data.unwrap().into_buf().unwrap();
    let mut got = vec![0u8; 8192];
    n1.read_namespace(8 * 512, &mut got).unwrap();
    assert_eq!(got, data);
    n2.write_namespace(8 * 512, &data).unwrap();
    q2.submit_read(&ns, 8, buf, 2).unwrap();
    let mut out = Vec::new();
    common::wait_for(|| q2.poll(&mut out).unwrap() > 0 || !out.is_empty(), "read");
    let d = out.pop().unwrap();
    assert!(d.result.is_ok());
    let buf = d.data.unwrap().into_buf().unwrap();
    let mut back = vec![0u8; 8192];
    buf.read_at(0, &mut back).unwrap();
    assert_eq!(back, data);
    drop((buf, q1, q2, c1, c2, n1, n2));
    assert_eq!(pool.stats().in_use_bytes, 0);
}
