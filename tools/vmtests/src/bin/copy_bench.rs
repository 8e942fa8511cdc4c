//! # copy_bench: the bounce-copy routine against glibc `memcpy`, inside the test VM
//!
//! A benchmark program (not a test: it asserts nothing about speed), run with
//! `tools/vm/run copy_bench`. Under QEMU's TCG, glibc's `memcpy` switches to `rep movsb` above
//! 8 KiB, which TCG emulates a byte at a time (~24 MB/s; shared/notes/vm.md), and on the host
//! `memcpy` collapses when `(dst - src) mod 4096` is small (4K aliasing). Tidepool's
//! [`tidepool::copy`] must avoid both; this prints the numbers that show whether it does in
//! the guest, side by side in one run: for each size and source/destination distance, the
//! median time of `copy_from_slice` and of each of our implementations available here.
//!
//! Buffers live in one page-aligned allocation, 1 MiB apart plus the distance, so every routine
//! sees exactly the same addresses.

use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

use tidepool::copy::{Copier, Implementation};

const SIZES: [usize; 6] = [512, 4 << 10, 16 << 10, 64 << 10, 128 << 10, 256 << 10];
const DELTAS: [usize; 4] = [0, 4, 16, 1024];
const SPAN: usize = 1 << 20;

/// Median nanoseconds of `rounds` runs of `f`, each repeated so a run lasts ~20 µs or more.
fn median_ns(size: usize, mut f: impl FnMut()) -> f64 {
    let reps = (64 << 10) / size.max(1) + 1;
    let rounds = 15;
    let mut v: Vec<f64> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_nanos() as f64 / reps as f64
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[rounds / 2]
}

fn main() -> ExitCode {
    let mut backing = vec![0x5au8; 2 * SPAN + 2 * 4096];
    let base = backing.as_mut_ptr().align_offset(4096);
    let impls: Vec<Implementation> = Implementation::available().collect();
    println!(
        "copy_bench: features say {:?}; start-up calibration chose {}; available {:?}",
        Implementation::detect(),
        tidepool::copy::implementation(),
        impls
    );
    let mut header = format!("{:>8} {:>6} {:>12}", "size", "delta", "memcpy ns");
    for i in &impls {
        header += &format!(" {:>12}", format!("{} ns", i.name()));
    }
    println!("copy_bench: {header}   (best of ours vs memcpy)");
    for &size in &SIZES {
        for &delta in &DELTAS {
            let src_off = base;
            let dst_off = base + SPAN + delta;
            let (lo, hi) = backing.split_at_mut(dst_off);
            let src = &lo[src_off..src_off + size];
            let dst = &mut hi[..size];
            let memcpy = median_ns(size, || {
                dst.copy_from_slice(black_box(src));
                black_box(&dst);
            });
            let mut row = format!("{size:>8} {delta:>6} {memcpy:>12.0}");
            let mut best = f64::MAX;
            for &i in &impls {
                let copier = Copier::new(i).expect("listed as available");
                let ns = median_ns(size, || {
                    // SAFETY: src and dst are disjoint live ranges of `size` bytes of one
                    // private allocation (split_at_mut), not shared with any device.
                    unsafe { copier.copy_raw(src.as_ptr(), dst.as_mut_ptr(), size) };
                    black_box(&dst);
                });
                best = best.min(ns);
                row += &format!(" {ns:>12.0}");
            }
            println!("copy_bench: {row}   {:.2}x", memcpy / best);
        }
    }
    ExitCode::SUCCESS
}
