//! # setup_vm: tpsetup on a real kernel
//!
//! Runs tpsetup's library (the code behind `tpsetup status|bind|unbind`) against the guest's
//! real sysfs:
//!
//! 1. `status` reports the IOMMU on, its groups, the vfio NVMe (00:04.0) on vfio-pci in a
//!    group with `/dev/vfio/<group>` present;
//! 2. `bind` of that device again is a no-op ("already bound");
//! 3. `unbind` gives it back to the kernel's nvme driver (the harness bound it, so tpsetup
//!    remembers nothing and lets the kernel choose), whose namespace then appears under it;
//! 4. `bind` takes it from nvme to vfio-pci again, and Tidepool's NVMe driver opens it and
//!    identifies it (serial `tidepool-nvme0`): the device works after the round trip;
//! 5. with `--kernel-nvme`: an ext2 filesystem made with busybox `mke2fs` on the kernel-owned
//!    controller (00:0a.0) and mounted; `bind` must refuse it naming the mount and `--force`,
//!    and leave it with nvme. Without a kernel NVMe this step is skipped and says so.
//!
//! Whatever fails, 00:04.0 is given back to vfio-pci before the test exits: later tests need it.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use tidepool_nvme::{Controller, ControllerConfig};
use tidepool_setup::bind::Action;
use tidepool_setup::{Bdf, BindOptions, Error, Host};
use tidepool_vmtests::HarnessEnv;

type Res<T> = Result<T, String>;

const SAFE: BindOptions = BindOptions { force: false };

fn main() -> ExitCode {
    let env = match HarnessEnv::from_env() {
        Ok(env) => env,
        Err(e) => {
            eprintln!("setup_vm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let host = Host::system().with_settle(Duration::from_secs(20));
    let bdf = match Bdf::parse(env.nvme_bdf()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("setup_vm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = run(&host, &env, &bdf);
    // Leave the vfio NVMe where the harness put it, whatever happened.
    let restore = host.bind(&bdf, BindOptions { force: true });
    match (&result, restore) {
        (Ok(()), Ok(_)) => {
            println!("setup_vm: PASS");
            ExitCode::SUCCESS
        }
        (_, Err(e)) => {
            if let Err(msg) = &result {
                eprintln!("setup_vm: FAIL: {msg}");
            }
            eprintln!("setup_vm: FAIL: could not give {bdf} back to vfio-pci: {e}");
            ExitCode::FAILURE
        }
        (Err(msg), Ok(_)) => {
            eprintln!("setup_vm: FAIL: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(host: &Host, env: &HarnessEnv, bdf: &Bdf) -> Res<()> {
    // 1. status
    let status = host.status();
    print!("{status}");
    if !status.iommu.enabled || status.groups.is_empty() {
        return Err(format!(
            "status says the IOMMU is off ({} groups), but the VM has one",
            status.groups.len()
        ));
    }
    let dev = status
        .devices
        .iter()
        .find(|d| d.bdf == bdf.as_str())
        .ok_or(format!("status does not list {bdf} among the NVMe devices"))?;
    if dev.kind != "nvme" || dev.driver.as_deref() != Some("vfio-pci") {
        return Err(format!(
            "status lists {bdf} as {} with driver {:?}, expected nvme on vfio-pci",
            dev.kind, dev.driver
        ));
    }
    let group = dev
        .iommu_group
        .clone()
        .ok_or(format!("status gives {bdf} no IOMMU group"))?;
    if !status
        .groups
        .iter()
        .any(|g| g.id == group && g.devices.iter().any(|m| m.bdf == bdf.as_str()))
    {
        return Err(format!("group {group} does not list {bdf}"));
    }
    let node = format!("/dev/vfio/{group}");
    if !status.dev_nodes.iter().any(|n| n.path == node && n.present) {
        return Err(format!("status does not show {node} present"));
    }
    println!(
        "check: status: IOMMU {} with {} groups, {bdf} on vfio-pci in group {group}, {node} present",
        status.iommu.mode, status.iommu.groups
    );

    // 2. idempotent bind
    let again = host.bind(bdf, SAFE).map_err(|e| e.to_string())?;
    println!("{again}");
    if again.action != Action::AlreadyBound {
        return Err(format!("binding a bound device did {:?}", again.action));
    }

    // 3. back to the kernel's nvme driver
    let back = host.unbind(bdf, SAFE).map_err(|e| e.to_string())?;
    println!("{back}");
    for n in &back.notes {
        println!("  note: {n}");
    }
    if back.action != Action::Returned || back.to.as_deref() != Some("nvme") {
        return Err(format!(
            "unbind left {bdf} with {:?} ({:?}), expected the kernel's nvme driver",
            back.to, back.action
        ));
    }
    let disks = wait_for(Duration::from_secs(30), || {
        let d = host.block_devices(bdf);
        (!d.is_empty()).then_some(d)
    })
    .ok_or(format!(
        "the kernel's nvme driver took {bdf} but made no namespace within 30 s"
    ))?;
    let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
    println!("check: unbind: {bdf} is with nvme, namespace {names:?}");

    // 4. and to vfio-pci again, and it works
    let bound = host.bind(bdf, SAFE).map_err(|e| e.to_string())?;
    println!("{bound}");
    for n in &bound.notes {
        println!("  note: {n}");
    }
    if bound.action != Action::Bound || bound.from.as_deref() != Some("nvme") {
        return Err(format!(
            "bind did {:?} from {:?}, expected bound from nvme",
            bound.action, bound.from
        ));
    }
    {
        let ctrl = Controller::open(bdf.as_str(), ControllerConfig::default())
            .map_err(|e| format!("after rebinding, Controller::open({bdf}) failed: {e}"))?;
        let serial = ctrl.identify().serial.clone();
        if serial != "tidepool-nvme0" {
            return Err(format!(
                "after rebinding, {bdf} identifies as serial {serial:?}, expected tidepool-nvme0"
            ));
        }
        println!(
            "check: rebind: Tidepool's NVMe driver opened {bdf} and identified serial {serial:?}"
        );
    }

    // 5. a mounted filesystem on the kernel's NVMe is refused
    let kbdf = std::env::var("TIDEPOOL_KERNEL_NVME_BDF").unwrap_or_default();
    let Some(kdev) = env.kernel_nvme_dev.as_deref().filter(|_| !kbdf.is_empty()) else {
        println!("skip: mounted-filesystem refusal: no kernel-owned NVMe (run with --kernel-nvme)");
        return Ok(());
    };
    let kbdf = Bdf::parse(&kbdf).map_err(|e| e.to_string())?;
    refuse_mounted(host, &kbdf, kdev)
}

fn refuse_mounted(host: &Host, kbdf: &Bdf, kdev: &Path) -> Res<()> {
    let mnt = Path::new("/tmp/setup_vm_mnt");
    std::fs::create_dir_all(mnt).map_err(|e| format!("mkdir {}: {e}", mnt.display()))?;
    sh(&["mke2fs", "-F", &kdev.to_string_lossy()])?;
    sh(&[
        "mount",
        "-t",
        "ext2",
        &kdev.to_string_lossy(),
        &mnt.to_string_lossy(),
    ])?;
    let verdict = host.bind(kbdf, SAFE);
    let in_use = host
        .status()
        .devices
        .into_iter()
        .find(|d| d.bdf == kbdf.as_str())
        .map(|d| d.in_use)
        .unwrap_or_default();
    let driver_after = std::fs::read_link(format!("/sys/bus/pci/devices/{kbdf}/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let umount = sh(&["umount", &mnt.to_string_lossy()]);
    match verdict {
        Err(e @ Error::InUse { .. }) => {
            let msg = e.to_string();
            println!("tpsetup: {msg}");
            let name = kdev.file_name().unwrap_or_default().to_string_lossy();
            let want = format!("{name} is mounted on {} (ext2)", mnt.display());
            if !msg.contains(&want) || !msg.contains("--force") {
                return Err(format!(
                    "the refusal does not say '{want}' and name --force: {msg}"
                ));
            }
        }
        Err(e) => {
            return Err(format!(
                "bind of the mounted {kbdf} failed, but not as a refusal: {e}"
            ))
        }
        Ok(out) => {
            return Err(format!(
                "bind of {kbdf} with a mounted filesystem was not refused: {out}"
            ))
        }
    }
    if driver_after.as_deref() != Some("nvme") {
        return Err(format!(
            "after the refusal {kbdf} is with {driver_after:?}, not nvme"
        ));
    }
    if in_use.is_empty() {
        return Err(format!("status shows {kbdf} not in use while mounted"));
    }
    umount?;
    println!("check: refusal: {kbdf} ({}) mounted on {} was refused and stayed with nvme; status said: {in_use:?}", kdev.display(), mnt.display());
    Ok(())
}

fn sh(args: &[&str]) -> Res<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("running {}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
