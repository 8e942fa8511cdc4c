//! Copies a range of blocks to another place on the same namespace, zero copy: each chunk is
//! read into a pool buffer and the same buffer is written back out.
//!
//! ```text
//! cargo run -p tidepool-examples --example nvme_copy -- 0000:00:04.0 SRC_LBA DST_LBA BLOCKS
//! ```

use tidepool_nvme::{Controller, ControllerConfig, NvmeError};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    run(&args)
}

/// The example with its command-line arguments (`BDF SRC_LBA DST_LBA BLOCKS`); also run by
/// the VM test `nvme_examples`.
pub fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let [bdf, src, dst, blocks] = args else {
        return Err("usage: nvme_copy BDF SRC_LBA DST_LBA BLOCKS".into());
    };
    let (src, dst, blocks): (u64, u64, u64) = (src.parse()?, dst.parse()?, blocks.parse()?);

    let ctrl = Controller::open(
        bdf,
        ControllerConfig {
            interrupts: false,
            ..Default::default()
        },
    )?;
    let ns = ctrl.namespace(1)?;
    ns.check_blocks(src, blocks)?;
    ns.check_blocks(dst, blocks)?;
    let mut queue = ctrl.create_io_queue::<()>(2)?;

    let per_command = ns.max_transfer() as u64 / u64::from(ns.block_bytes());
    let mut done = 0;
    let mut finished = Vec::new();
    while done < blocks {
        let n = per_command.min(blocks - done);
        let buf = ctrl
            .pool()
            .try_alloc((n * u64::from(ns.block_bytes())) as usize)?;

        // Read the chunk into the pool buffer...
        queue
            .submit_read(&ns, src + done, buf, ())
            .map_err(|e| e.error)?;
        let buf = wait(&mut queue, &mut finished)?;
        // ...and write the very same buffer out.
        queue
            .submit_write(&ns, dst + done, buf, ())
            .map_err(|e| e.error)?;
        wait(&mut queue, &mut finished)?;

        done += n;
    }
    queue.flush(&ns)?;
    println!("copied {blocks} blocks from LBA {src} to LBA {dst}");
    Ok(())
}

/// Polls until the one outstanding command finishes; returns its buffer.
fn wait(
    queue: &mut tidepool_nvme::IoQueue<()>,
    finished: &mut Vec<tidepool_nvme::Done<()>>,
) -> Result<tidepool::pool::DmaBuf, NvmeError> {
    while finished.is_empty() {
        queue.poll(finished)?;
    }
    let done = finished.remove(0);
    done.result?;
    done.data
        .and_then(tidepool::data::DmaData::into_buf)
        .ok_or(NvmeError::Unsupported("the queue kept the buffer".into()))
}
