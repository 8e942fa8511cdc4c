//! Prints what an NVMe controller says about itself.
//!
//! ```text
//! cargo run -p tidepool-examples --example nvme_identify -- 0000:00:04.0
//! ```
//! The controller must be bound to `vfio-pci` (see tools/vm/README.md for a VM that has one).

use tidepool_nvme::{Controller, ControllerConfig, NvmeError};

fn main() -> Result<(), NvmeError> {
    let bdf = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "0000:00:04.0".into());
    run(&bdf)
}

/// The example for the controller at `bdf`; also run by the VM test `nvme_examples`.
pub fn run(bdf: &str) -> Result<(), NvmeError> {
    let ctrl = Controller::open(
        bdf,
        ControllerConfig {
            interrupts: false,
            ..Default::default()
        },
    )?;

    let id = ctrl.identify();
    println!(
        "{bdf}: {} (serial {}, firmware {})",
        id.model, id.serial, id.firmware
    );
    println!(
        "NVMe {}, up to {} commands per queue",
        ctrl.version(),
        ctrl.max_queue_depth()
    );

    for ns in ctrl.namespaces() {
        println!(
            "namespace {}: {} blocks of {} B ({} MiB), at most {} KiB per command",
            ns.nsid(),
            ns.blocks(),
            ns.block_bytes(),
            ns.bytes() >> 20,
            ns.max_transfer() >> 10
        );
    }

    let smart = ctrl.smart_log()?;
    println!(
        "health: {} K, {}% spare, {} power-on hours, critical warning {:#x}",
        smart.temperature_kelvin,
        smart.available_spare,
        smart.power_on_hours,
        smart.critical_warning
    );
    Ok(())
}
