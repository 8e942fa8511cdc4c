//! # nvme_examples: runs `examples/nvme_identify.rs` and `examples/nvme_copy.rs` in the VM
//!
//! The examples are compiled into this test (their files included as modules), so they run
//! exactly as written, on the harness's controller:
//! 1. `nvme_identify` prints the controller, its namespaces and health;
//! 2. `nvme_copy` copies 3000 blocks (beyond one command, so it loops) that this test filled
//!    with a pattern first; the test then reads the destination back and compares.

use std::process::ExitCode;

use tidepool_nvme::{Controller, ControllerConfig};
use tidepool_vmtests::HarnessEnv;

#[allow(dead_code)]
#[path = "../../../../examples/nvme_identify.rs"]
mod nvme_identify;

#[allow(dead_code)]
#[path = "../../../../examples/nvme_copy.rs"]
mod nvme_copy;

type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("nvme_examples: PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("nvme_examples: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

fn with_queue<R>(
    bdf: &str,
    f: impl FnOnce(&Controller, &mut tidepool_nvme::IoQueue<()>) -> Res<R>,
) -> Res<R> {
    let cfg = ControllerConfig {
        interrupts: false,
        ..ControllerConfig::default()
    };
    let ctrl = Controller::open(bdf, cfg).map_err(|e| e.to_string())?;
    let mut q = ctrl.create_io_queue::<()>(8).map_err(|e| e.to_string())?;
    f(&ctrl, &mut q)
}

fn run() -> Res<()> {
    let env = HarnessEnv::from_env().map_err(|e| e.to_string())?;
    let bdf = env.nvme_bdf().to_string();
    println!("--- examples/nvme_identify.rs {bdf}");
    nvme_identify::run(&bdf).map_err(|e| format!("nvme_identify: {e}"))?;

    let (src, dst, blocks) = (200_000u64, 300_000u64, 3000u64);
    let data: Vec<u8> = (0..blocks * 512).map(|i| (i % 253) as u8 ^ 0x5a).collect();
    with_queue(&bdf, |ctrl, q| {
        let ns = ctrl.namespace(1).map_err(|e| e.to_string())?;
        q.write(&ns, src, &data).map_err(|e| e.to_string())?;
        q.write(&ns, dst, &vec![0u8; data.len()])
            .map_err(|e| e.to_string())
    })?;
    let args: Vec<String> = [
        bdf.clone(),
        src.to_string(),
        dst.to_string(),
        blocks.to_string(),
    ]
    .into();
    println!("--- examples/nvme_copy.rs {}", args.join(" "));
    nvme_copy::run(&args).map_err(|e| format!("nvme_copy: {e}"))?;
    let back = with_queue(&bdf, |ctrl, q| {
        let ns = ctrl.namespace(1).map_err(|e| e.to_string())?;
        let mut back = vec![0u8; data.len()];
        q.read(&ns, dst, &mut back).map_err(|e| e.to_string())?;
        Ok(back)
    })?;
    if back != data {
        return Err("nvme_copy: destination differs from the source".into());
    }
    println!("nvme_copy: destination verified ({} bytes)", data.len());
    Ok(())
}
