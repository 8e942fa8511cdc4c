//! # nvme_domains: buffers know their IOMMU domain, on two real controllers
//!
//! The device-seam issue's VM check, on two QEMU NVMe controllers behind the emulated Intel
//! IOMMU (`tools/vm/run --vfio-nvme 2`):
//! 1. **Separate containers**: each controller opened on its own gets its own container, so
//!    their IOVA allocators hand out the same low addresses. A buffer of controller B's pool
//!    submitted on controller A is refused with `NvmeError::ForeignBuffer` and given back
//!    unchanged (before the fix the device DMAed into whatever A had at that address). The
//!    same buffer then works on B, and A's own buffers work on A.
//! 2. **One container (or IOAS), one pool, a device attached later** (the SPDK model): controller
//!    A is opened into a container (an IOAS with `TIDEPOOL_VFIO_BACKEND=iommufd`) and a pool over its view prefills a chunk; only then is
//!    controller B opened into the same container. B is brought up on the same pool, and a
//!    buffer from the chunk mapped before B existed is written and read back through B: the
//!    kernel replays the container's mappings into the group attached later.
//!
//! Every transfer is verified byte for byte; the harness fails the test on any IOMMU fault.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use tidepool::data::DmaData;
use tidepool::device::backend::{BackendChoice, VfioDomain};
use tidepool::pool::{DmaBuf, Pool, PoolConfig};
use tidepool_nvme::{Controller, ControllerConfig, IoQueue, Namespace, NvmeError};
use tidepool_vmtests::HarnessEnv;

type Res<T> = Result<T, String>;

/// One transfer: 8 KiB (two pages: a PRP pair or one SGL descriptor).
const LEN: usize = 8192;

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("nvme_domains: PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("nvme_domains: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Res<()> {
    let env = HarnessEnv::from_env().map_err(|e| e.to_string())?;
    if env.vfio_nvme_bdfs.len() < 2 {
        return Err("needs two vfio NVMe controllers: run with --vfio-nvme 2".into());
    }
    let (a, b) = (&env.vfio_nvme_bdfs[0], &env.vfio_nvme_bdfs[1]);
    separate_containers(a, b)?;
    shared_container_attached_later(a, b)?;
    Ok(())
}

fn cfg() -> ControllerConfig {
    ControllerConfig {
        interrupts: false,
        ..ControllerConfig::default()
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..LEN)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Polls `q` until one command completes, returning its data.
fn wait_one(q: &mut IoQueue<()>) -> Res<Option<DmaData>> {
    let mut out = Vec::new();
    let start = Instant::now();
    loop {
        q.poll(&mut out).map_err(|e| format!("poll: {e}"))?;
        if let Some(d) = out.pop() {
            d.result.map_err(|e| format!("command: {e}"))?;
            return Ok(d.data);
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err("no completion in 30 s".into());
        }
    }
}

/// Writes `buf` (already filled) at `lba`, reads it back into a fresh buffer of `pool` and
/// compares with `expect`.
fn write_read_verify(
    q: &mut IoQueue<()>,
    ns: &Namespace,
    pool: &Pool,
    lba: u64,
    buf: DmaBuf,
    expect: &[u8],
) -> Res<()> {
    q.submit_write(ns, lba, buf, ())
        .map_err(|e| format!("submit write: {}", e.error))?;
    wait_one(q)?;
    let back = pool.try_alloc(LEN).map_err(|e| e.to_string())?;
    q.submit_read(ns, lba, back, ())
        .map_err(|e| format!("submit read: {}", e.error))?;
    let back = wait_one(q)?
        .and_then(DmaData::into_buf)
        .ok_or("the read gave no buffer back")?;
    let mut got = vec![0u8; LEN];
    back.read_at(0, &mut got).map_err(|e| e.to_string())?;
    if got != expect {
        let at = (0..LEN).find(|&i| got[i] != expect[i]).unwrap_or(0);
        return Err(format!("read back differs at byte {at}"));
    }
    Ok(())
}

fn filled(pool: &Pool, bytes: &[u8]) -> Res<DmaBuf> {
    let mut buf = pool.try_alloc(bytes.len()).map_err(|e| e.to_string())?;
    buf.write_at(0, bytes).map_err(|e| e.to_string())?;
    Ok(buf)
}

fn separate_containers(a: &str, b: &str) -> Res<()> {
    println!("phase 1: {a} and {b} in separate containers");
    let ctrl_a = Controller::open(a, cfg()).map_err(|e| format!("open {a}: {e}"))?;
    let ctrl_b = Controller::open(b, cfg()).map_err(|e| format!("open {b}: {e}"))?;
    let (pool_a, pool_b) = (ctrl_a.pool().clone(), ctrl_b.pool().clone());
    if pool_a.domain() == pool_b.domain() {
        return Err("two containers reported the same domain".into());
    }
    let ns_a = ctrl_a.namespace(1).map_err(|e| e.to_string())?;
    let ns_b = ctrl_b.namespace(1).map_err(|e| e.to_string())?;
    let mut qa = ctrl_a.create_io_queue::<()>(8).map_err(|e| e.to_string())?;
    let mut qb = ctrl_b.create_io_queue::<()>(8).map_err(|e| e.to_string())?;

    let data = pattern(0xb0);
    let foreign = filled(&pool_b, &data)?;
    let foreign_addr = foreign.device_addr();
    let own = pool_a.try_alloc(LEN).map_err(|e| e.to_string())?;
    println!(
        "  A's buffer at IOVA {:#x}, B's at {:#x} (each container allocates from its own space)",
        own.device_addr().0,
        foreign_addr.0
    );
    drop(own);
    let refused = match qa.submit_read(&ns_a, 0, foreign, ()) {
        Ok(_) => return Err("controller A accepted a buffer of B's domain".into()),
        Err(e) => e,
    };
    match refused.error {
        NvmeError::ForeignBuffer { buffer, device } => {
            println!("  refused: {}", refused.error);
            if buffer != pool_b.domain() || device != pool_a.domain() {
                return Err(format!(
                    "ForeignBuffer named {buffer} / {device}, not B's and A's domains"
                ));
            }
        }
        other => return Err(format!("expected ForeignBuffer, got {other}")),
    }
    let back = refused
        .data
        .and_then(DmaData::into_buf)
        .ok_or("the refused buffer was not given back")?;
    let mut got = vec![0u8; LEN];
    back.read_at(0, &mut got).map_err(|e| e.to_string())?;
    if got != data || back.device_addr() != foreign_addr {
        return Err("the refused buffer came back changed".into());
    }
    // The same buffer is right for B; A's own buffers are right for A.
    write_read_verify(&mut qb, &ns_b, &pool_b, 16, back, &data)?;
    let own_data = pattern(0xa0);
    write_read_verify(
        &mut qa,
        &ns_a,
        &pool_a,
        16,
        filled(&pool_a, &own_data)?,
        &own_data,
    )?;
    println!("  B's buffer works on B, A's on A; each read back verified");
    drop((qa, qb));
    Ok(())
}

fn shared_container_attached_later(a: &str, b: &str) -> Res<()> {
    println!("phase 2: {a} first, a pool over its container, then {b} attached later");
    // The backend TIDEPOOL_VFIO_BACKEND asks for (a type1 container or an iommufd IOAS).
    let choice = BackendChoice::from_env().map_err(|e| e.to_string())?;
    let domain = VfioDomain::for_device(choice, a).map_err(|e| e.to_string())?;
    println!("  backend: {}", domain.backend());
    let dev_a = domain.open(a).map_err(|e| e.to_string())?;
    let view = domain.view(u64::MAX).map_err(|e| e.to_string())?;
    let pool = Pool::new(view, PoolConfig::default()).map_err(|e| e.to_string())?;
    // A buffer carved from the prefilled chunk, mapped while only A is in the container.
    let early_data = pattern(0xe0);
    let early = filled(&pool, &early_data)?;
    let ctrl_a = Controller::new(dev_a, pool.clone(), cfg()).map_err(|e| e.to_string())?;
    let dev_b = domain.open(b).map_err(|e| e.to_string())?;
    let ctrl_b = Controller::new(dev_b, pool.clone(), cfg()).map_err(|e| e.to_string())?;
    let ns_a = ctrl_a.namespace(1).map_err(|e| e.to_string())?;
    let ns_b = ctrl_b.namespace(1).map_err(|e| e.to_string())?;
    let mut qa = ctrl_a.create_io_queue::<()>(8).map_err(|e| e.to_string())?;
    let mut qb = ctrl_b.create_io_queue::<()>(8).map_err(|e| e.to_string())?;
    write_read_verify(&mut qb, &ns_b, &pool, 32, early, &early_data)?;
    let a_data = pattern(0xa1);
    write_read_verify(&mut qa, &ns_a, &pool, 32, filled(&pool, &a_data)?, &a_data)?;
    println!(
        "  one pool serves both; a chunk mapped before {b} was attached is reachable by it \
         ({} mapping(s) in the container)",
        pool.stats().chunks
    );
    // The pool's last handle must go while a device still holds the container open (its
    // chunks are unmapped then): ctrl_b's, after ours and ctrl_a's.
    drop((qa, qb, ctrl_a, pool));
    drop(ctrl_b);
    Ok(())
}
