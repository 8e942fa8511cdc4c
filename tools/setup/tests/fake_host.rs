//! tpsetup against fake hosts: status, bind refusals (mounted, swap, root, device-mapper),
//! bind/unbind round trips, idempotency, hugepages, and the command line.

use std::process::Command;

use tidepool_setup::bind::Action;
use tidepool_setup::fake::FakeHost;
use tidepool_setup::{Bdf, BindOptions, HugepageSize};

const NVME: u32 = 0x010802;
const FORCE: BindOptions = BindOptions { force: true };
const SAFE: BindOptions = BindOptions { force: false };

fn bdf(s: &str) -> Bdf {
    Bdf::parse(s).unwrap()
}

/// A workstation: IOMMU on; 01:00.0 is the boot NVMe (root on nvme0n1p2, given by number only,
/// /boot on nvme0n1p1); 02:00.0 a spare NVMe; 03:00.0 an NVMe whose namespace is mounted on
/// /data; 04:00.0 an NVMe with swap on a partition; 05:00.0 an NVMe under LVM (dm-0 mounted);
/// 00:03.0 a virtio-net NIC; 2 MiB and 1 GiB pools, none reserved; memlock 8 MiB; vfio-pci not
/// loaded.
fn workstation(dir: &std::path::Path) -> FakeHost {
    let h = FakeHost::new(dir);
    h.file(
        "proc/cmdline",
        "BOOT_IMAGE=/vmlinuz root=259:2 ro intel_iommu=on iommu.strict=0\n",
    );
    h.file("proc/cpuinfo", "vendor_id\t: GenuineIntel\n");
    h.file("sys/class/iommu/dmar0/.keep", "");
    h.pci("0000:01:00.0", NVME, 0x144d, 0xa808, Some("nvme"), Some(11));
    h.nvme_disk(
        "0000:01:00.0",
        "nvme0",
        "nvme0n1",
        "259:0",
        &[("nvme0n1p1", "259:1"), ("nvme0n1p2", "259:2")],
    );
    h.mount("/dev/nvme0n1p1", "/boot", "vfat");
    h.mountinfo("259:2", "/", "ext4");
    h.mount("/dev/root", "/", "ext4");
    h.pci("0000:02:00.0", NVME, 0x8086, 0x0953, Some("nvme"), Some(12));
    h.nvme_disk("0000:02:00.0", "nvme1", "nvme1n1", "259:3", &[]);
    h.pci("0000:03:00.0", NVME, 0x1b36, 0x0010, Some("nvme"), Some(13));
    h.nvme_disk("0000:03:00.0", "nvme2", "nvme2n1", "259:4", &[]);
    h.mount("/dev/nvme2n1", "/my\\040data", "ext2");
    h.pci("0000:04:00.0", NVME, 0x1b36, 0x0010, Some("nvme"), Some(14));
    h.nvme_disk(
        "0000:04:00.0",
        "nvme3",
        "nvme3n1",
        "259:5",
        &[("nvme3n1p1", "259:6")],
    );
    h.swap("/dev/nvme3n1p1");
    h.pci("0000:05:00.0", NVME, 0x1b36, 0x0010, Some("nvme"), Some(15));
    h.nvme_disk(
        "0000:05:00.0",
        "nvme4",
        "nvme4n1",
        "259:7",
        &[("nvme4n1p1", "259:8")],
    );
    h.dm("dm-0", "vg-data", "253:0", "nvme4n1p1");
    h.mount("/dev/mapper/vg-data", "/srv", "xfs");
    h.pci(
        "0000:00:03.0",
        0x020000,
        0x1af4,
        0x1041,
        Some("virtio-pci"),
        Some(3),
    );
    h.pci(
        "0000:00:1f.0",
        0x060100,
        0x8086,
        0x2918,
        Some("lpc_ich"),
        Some(3),
    );
    for (kib, node) in [
        (2048, ""),
        (1048576, ""),
        (2048, "devices/system/node/node0/"),
        (2048, "devices/system/node/node1/"),
    ] {
        let base = if node.is_empty() {
            "sys/kernel/mm/".to_string()
        } else {
            format!("sys/{node}")
        };
        h.file(
            &format!("{base}hugepages/hugepages-{kib}kB/nr_hugepages"),
            "0\n",
        );
        h.file(
            &format!("{base}hugepages/hugepages-{kib}kB/free_hugepages"),
            "0\n",
        );
    }
    h.file(
        "proc/self/limits",
        "Limit                     Soft Limit           Hard Limit           Units     \n\
         Max open files            1024                 524288               files     \n\
         Max locked memory         8388608              8388608              bytes     \n",
    );
    h.file(
        "proc/self/status",
        "Name:\ttpsetup\nCapEff:\t0000000000000000\n",
    );
    h
}

#[test]
fn status_reports_iommu_devices_hugepages_memlock_and_fixes() {
    let dir = tempfile::tempdir().unwrap();
    let fake = workstation(dir.path());
    let s = fake.host().status();
    assert!(s.iommu.enabled);
    assert_eq!(s.iommu.units, ["dmar0"]);
    assert_eq!(s.iommu.cmdline, ["intel_iommu=on", "iommu.strict=0"]);
    assert_eq!(s.iommu.groups, 6);
    assert_eq!(s.iommu.mode, "translated (DMA-FQ)");
    let ids: Vec<&str> = s.groups.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(
        ids,
        ["3", "11", "12", "13", "14", "15"],
        "groups sorted numerically"
    );
    let g3 = &s.groups[0];
    assert_eq!(g3.devices.len(), 2);
    assert!(!g3.viable, "virtio-pci and lpc_ich hold group 3");
    // NVMe and virtio only: the LPC bridge is not listed.
    let kinds: Vec<(&str, &str)> = s
        .devices
        .iter()
        .map(|d| (d.bdf.as_str(), d.kind.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("0000:00:03.0", "virtio-net"),
            ("0000:01:00.0", "nvme"),
            ("0000:02:00.0", "nvme"),
            ("0000:03:00.0", "nvme"),
            ("0000:04:00.0", "nvme"),
            ("0000:05:00.0", "nvme")
        ]
    );
    let boot = &s.devices[1];
    assert_eq!(boot.driver.as_deref(), Some("nvme"));
    assert_eq!(boot.iommu_group.as_deref(), Some("11"));
    assert_eq!(boot.block_devices, ["nvme0n1", "nvme0n1p1", "nvme0n1p2"]);
    assert_eq!(
        boot.in_use,
        [
            "nvme0n1p2 holds the root filesystem (/)",
            "nvme0n1p1 is mounted on /boot (vfat)"
        ]
    );
    assert_eq!(
        s.devices[3].in_use,
        ["nvme2n1 is mounted on /my data (ext2)"]
    );
    assert!(s.devices[2].in_use.is_empty());
    assert_eq!(s.hugepages.len(), 4);
    assert_eq!((s.hugepages[0].size_kib, s.hugepages[0].node), (2048, None));
    assert_eq!(
        (s.hugepages[2].size_kib, s.hugepages[2].node),
        (2048, Some(0))
    );
    let m = s.memlock.as_ref().unwrap();
    assert_eq!((m.soft, m.hard), (Some(8 << 20), Some(8 << 20)));
    assert!(!s.vfio_pci_loaded);
    let fixes: Vec<&str> = s.problems.iter().map(|p| p.fix.as_str()).collect();
    assert_eq!(fixes.len(), 4, "{fixes:?}");
    assert!(fixes[0].starts_with("modprobe vfio-pci"), "{fixes:?}");
    assert_eq!(
        fixes[1], "tpsetup bind 0000:02:00.0",
        "the first NVMe not in use"
    );
    assert!(fixes[2].starts_with("tpsetup hugepages 512"));
    assert!(fixes[3].starts_with("ulimit -l unlimited"));

    let text = s.to_string();
    assert!(text.starts_with("IOMMU: on, translated (DMA-FQ) (6 groups; units: dmar0; kernel command line: intel_iommu=on iommu.strict=0)"), "{text}");
    assert!(text.contains("   3 DMA-FQ    0000:00:03.0 (virtio-pci), 0000:00:1f.0 (lpc_ich)  [not viable for VFIO]"), "{text}");
    assert!(text.contains("  0000:01:00.0 nvme       144d:a808 driver nvme      group 11   (block: nvme0n1 nvme0n1p1 nvme0n1p2)\n      in use: nvme0n1p2 holds the root filesystem (/)\n"), "{text}");
    assert!(
        text.contains("  2 MiB    node 1  0 reserved, 0 free"),
        "{text}"
    );
    assert!(
        text.contains("RLIMIT_MEMLOCK: soft 8388608 bytes, hard 8388608 bytes\n"),
        "{text}"
    );
    assert!(text.contains("/dev/vfio/vfio: missing"), "{text}");
    assert!(
        text.contains(
            "\nMissing:\n  - the vfio-pci driver is not loaded\n    fix: modprobe vfio-pci"
        ),
        "{text}"
    );

    let v: serde_json::Value = serde_json::to_value(&s).unwrap();
    assert_eq!(v["iommu"]["enabled"], true);
    assert_eq!(
        v["devices"][1]["in_use"][0],
        "nvme0n1p2 holds the root filesystem (/)"
    );
    assert_eq!(v["memlock"]["soft"], 8388608);
    assert_eq!(v["hugepages"][0]["node"], serde_json::Value::Null);
}

#[test]
fn status_without_iommu_says_how_to_turn_it_on() {
    let dir = tempfile::tempdir().unwrap();
    let h = FakeHost::new(dir.path());
    h.file("proc/cpuinfo", "vendor_id\t: AuthenticAMD\n");
    h.pci("0000:01:00.0", NVME, 0x144d, 0xa808, Some("nvme"), None);
    let s = h.host().status();
    assert!(!s.iommu.enabled);
    assert_eq!(s.iommu.mode, "off");
    assert_eq!(
        s.problems[0].what,
        "the IOMMU is off: /sys/kernel/iommu_groups is empty"
    );
    assert!(s.problems[0]
        .fix
        .starts_with("add amd_iommu=on to the kernel command line"));
    // And bind refuses before touching anything.
    let e = h
        .host()
        .bind(&bdf("01:00.0"), SAFE)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("has no IOMMU group") && e.contains("amd_iommu=on"),
        "{e}"
    );
    assert!(h.writes().is_empty());
}

#[test]
fn bind_refuses_root_mounted_swap_and_device_mapper_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let fake = workstation(dir.path());
    let host = fake.host();
    let cases = [
        (
            "0000:01:00.0",
            "nvme0n1p2 holds the root filesystem (/); nvme0n1p1 is mounted on /boot (vfat)",
        ),
        ("0000:03:00.0", "nvme2n1 is mounted on /my data (ext2)"),
        ("0000:04:00.0", "nvme3n1p1 is an active swap area"),
        (
            "0000:05:00.0",
            "dm-0 (/dev/mapper/vg-data, on nvme4n1p1) is mounted on /srv (xfs)",
        ),
    ];
    for (b, reason) in cases {
        let e = host.bind(&bdf(b), SAFE).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("refusing to bind {b}: {reason}; stop using it first, or pass --force to bind it anyway")
        );
    }
    assert!(fake.writes().is_empty(), "{:?}", fake.writes());
    assert!(fake.modprobed().is_empty());
}

#[test]
fn bind_then_unbind_round_trip_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let fake = workstation(dir.path());
    let host = fake.host();
    let dev = bdf("0000:02:00.0");
    let out = host.bind(&dev, SAFE).unwrap();
    assert_eq!(out.action, Action::Bound);
    assert_eq!(out.from.as_deref(), Some("nvme"));
    assert_eq!(out.to.as_deref(), Some("vfio-pci"));
    assert_eq!(
        out.to_string(),
        "0000:02:00.0: bound to vfio-pci (was nvme), IOMMU group 12 (/dev/vfio/12)"
    );
    assert!(out.notes.is_empty(), "{:?}", out.notes);
    assert_eq!(fake.modprobed(), ["vfio-pci"]);
    let w = |p: &str, v: &str| (p.to_string(), v.to_string());
    assert_eq!(
        fake.writes(),
        [
            w(
                "sys/bus/pci/devices/0000:02:00.0/driver_override",
                "vfio-pci"
            ),
            w(
                "sys/bus/pci/devices/0000:02:00.0/driver/unbind",
                "0000:02:00.0"
            ),
            w("sys/bus/pci/drivers_probe", "0000:02:00.0"),
        ]
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("run/tpsetup/0000:02:00.0")).unwrap(),
        "nvme\n"
    );
    assert!(dir.path().join("dev/vfio/12").exists());

    // Again: nothing to do, nothing written.
    let again = host.bind(&dev, SAFE).unwrap();
    assert_eq!(again.action, Action::AlreadyBound);
    assert_eq!(
        again.to_string(),
        "0000:02:00.0: already bound to vfio-pci, nothing to do, IOMMU group 12 (/dev/vfio/12)"
    );
    assert_eq!(fake.writes().len(), 3);

    let s = host.status();
    let d = s.devices.iter().find(|d| d.bdf == "0000:02:00.0").unwrap();
    assert_eq!(d.driver.as_deref(), Some("vfio-pci"));
    assert_eq!(d.remembered_driver.as_deref(), Some("nvme"));
    assert!(
        s.problems
            .iter()
            .all(|p| !p.fix.starts_with("tpsetup bind")),
        "{:?}",
        s.problems
    );
    assert!(s
        .dev_nodes
        .iter()
        .any(|n| n.path == "/dev/vfio/12" && n.present));

    let back = host.unbind(&dev, SAFE).unwrap();
    assert_eq!(back.action, Action::Returned);
    assert_eq!(
        back.to_string(),
        "0000:02:00.0: returned to nvme (was vfio-pci)"
    );
    assert_eq!(
        fake.writes()[3..],
        [
            w("sys/bus/pci/devices/0000:02:00.0/driver_override", "\n"),
            w(
                "sys/bus/pci/devices/0000:02:00.0/driver/unbind",
                "0000:02:00.0"
            ),
            w("sys/bus/pci/drivers/nvme/bind", "0000:02:00.0"),
        ]
    );
    assert!(!dir.path().join("run/tpsetup/0000:02:00.0").exists());
    assert!(!dir.path().join("dev/vfio/12").exists());
    let twice = host.unbind(&dev, SAFE).unwrap();
    assert_eq!(twice.action, Action::NotVfio);
    assert_eq!(
        twice.to_string(),
        "0000:02:00.0: not bound to vfio-pci (nvme), nothing to do"
    );
    assert_eq!(fake.writes().len(), 6);
}

#[test]
fn unbind_without_memory_falls_back_to_the_kernels_choice() {
    let dir = tempfile::tempdir().unwrap();
    let fake = workstation(dir.path());
    let host = fake.host();
    // Bound by someone else (an init script): no state file.
    let dev = bdf("0000:02:00.0");
    host.bind(&dev, SAFE).unwrap();
    std::fs::remove_file(dir.path().join("run/tpsetup/0000:02:00.0")).unwrap();
    assert!(host.remembered().is_empty());
    let out = host.unbind(&dev, SAFE).unwrap();
    assert_eq!(out.action, Action::Returned);
    assert_eq!(out.to.as_deref(), Some("nvme"));
    assert_eq!(
        fake.writes().last().unwrap(),
        &(
            "sys/bus/pci/drivers_probe".to_string(),
            "0000:02:00.0".to_string()
        )
    );
}

#[test]
fn unbind_refuses_while_a_process_holds_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let fake = workstation(dir.path());
    let host = fake.host();
    let dev = bdf("0000:02:00.0");
    host.bind(&dev, SAFE).unwrap();
    fake.process_holding(4242, "tpio", "/dev/vfio/12");
    let n = fake.writes().len();
    let e = host.unbind(&dev, SAFE).unwrap_err().to_string();
    assert_eq!(e, "refusing to unbind 0000:02:00.0: pid 4242 (tpio) holds /dev/vfio/12 open; stop that process first, or pass --force (the unbind then waits until it lets go)");
    assert_eq!(fake.writes().len(), n, "nothing written");
    let forced = host.unbind(&dev, FORCE).unwrap();
    assert_eq!(forced.action, Action::Returned);
    assert_eq!(
        forced.notes,
        ["forced although pid 4242 (tpio) holds /dev/vfio/12 open"]
    );
}

#[test]
fn force_binds_a_mounted_device_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let fake = workstation(dir.path());
    let out = fake.host().bind(&bdf("0000:03:00.0"), FORCE).unwrap();
    assert_eq!(out.action, Action::Bound);
    assert_eq!(
        out.notes,
        ["forced although nvme2n1 is mounted on /my data (ext2)"]
    );
}

#[test]
fn group_shared_with_another_driver_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let fake = workstation(dir.path());
    let out = fake.host().bind(&bdf("0000:00:03.0"), SAFE).unwrap();
    assert_eq!(out.action, Action::Bound);
    assert_eq!(
        out.notes,
        ["IOMMU group 3 is not viable: 0000:00:1f.0 (lpc_ich) shares it; bind those too (tpsetup bind ...)"]
    );
    let s = fake.host().status();
    assert!(
        s.problems
            .iter()
            .any(|p| p.fix == "tpsetup bind 0000:00:1f.0"),
        "{:?}",
        s.problems
    );
}

#[test]
fn missing_device_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let fake = workstation(dir.path());
    let e = fake
        .host()
        .bind(&bdf("0000:09:00.0"), SAFE)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("no PCI device 0000:09:00.0: "), "{e}");
}

#[test]
fn hugepages_global_and_per_node() {
    let dir = tempfile::tempdir().unwrap();
    let fake = workstation(dir.path());
    let host = fake.host();
    let out = host
        .set_hugepages(512, HugepageSize::TWO_MIB, None)
        .unwrap();
    assert_eq!((out.before, out.after), (0, 512));
    assert_eq!(out.to_string(), "512 x 2 MiB hugepages reserved (was 0)");
    assert_eq!(
        host.set_hugepages(512, HugepageSize::TWO_MIB, None)
            .unwrap()
            .to_string(),
        "512 x 2 MiB hugepages reserved (unchanged)"
    );
    let n1 = host
        .set_hugepages(64, HugepageSize::TWO_MIB, Some(1))
        .unwrap();
    assert_eq!(
        n1.to_string(),
        "64 x 2 MiB hugepages reserved on node 1 (was 0)"
    );
    assert_eq!(
        std::fs::read_to_string(
            dir.path()
                .join("sys/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages")
        )
        .unwrap(),
        "64"
    );
    let e = host
        .set_hugepages(1, HugepageSize::TWO_MIB, Some(7))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "no NUMA node 7 (this machine has: node0, node1)");
    let e = host
        .set_hugepages(1, HugepageSize { kib: 16384 }, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("this kernel has no 16 MiB hugepages")
            && e.ends_with("sizes it has: 1 GiB, 2 MiB"),
        "{e}"
    );
}

// ---- the command line ------------------------------------------------------------------------

fn tpsetup(root: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tpsetup"))
        .args(args)
        .env("TPSETUP_SYSFS_ROOT", root)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn cli_bad_inputs_get_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    workstation(dir.path());
    let cases: [(&[&str], &str); 6] = [
        (&["bind", "zz:00.0"], "tpsetup: bad PCI address 'zz:00.0': expected domain:bus:device.function in hex, like 0000:01:00.0 (see `lspci -D`)"),
        (&["hugepages", "lots"], "tpsetup: bad hugepage count 'lots': expected a whole number like 512"),
        (&["hugepages", "8", "--size", "3X"], "tpsetup: bad hugepage size '3X': expected 2M or 1G"),
        (&["hugepages", "8", "--node", "first"], "tpsetup: bad NUMA node 'first': expected a number like 0"),
        (&["status", "--frobnicate"], "tpsetup: unexpected argument '--frobnicate' found (see tpsetup --help)"),
        (&["bind"], "tpsetup: the following required arguments were not provided: <BDF>... (see tpsetup --help)"),
    ];
    for (args, want) in cases {
        let (code, out, err) = tpsetup(dir.path(), args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert_eq!(err.trim_end(), want, "{args:?}");
    }
}

#[test]
fn cli_status_json_and_refusal() {
    let dir = tempfile::tempdir().unwrap();
    workstation(dir.path());
    let (code, out, err) = tpsetup(dir.path(), &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["iommu"]["groups"], 6);
    assert_eq!(v["devices"].as_array().unwrap().len(), 6);
    assert_eq!(
        v["problems"][0]["what"],
        "the vfio-pci driver is not loaded"
    );

    let (code, out, err) = tpsetup(dir.path(), &["--json", "bind", "0000:03:00.0"]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(
            "tpsetup: refusing to bind 0000:03:00.0: nvme2n1 is mounted on /my data (ext2)"
        ),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["results"][0]["ok"], false);
    assert_eq!(v["results"][0]["bdf"], "0000:03:00.0");

    let (code, out, _) = tpsetup(dir.path(), &["reset"]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "nothing to reset: tpsetup remembers no device it bound (/run/tpsetup is empty)\n"
    );
}
