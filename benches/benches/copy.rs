//! The bounce-copy routine ([`tidepool::copy`]) against `copy_from_slice` (glibc `memcpy`).
//!
//! Run: `cargo bench -p tidepool-benches --bench copy` (a few minutes). Runs anywhere, guests
//! included; it measures every implementation the CPU can run, whatever the process-wide
//! choice is.
//!
//! Both buffers live in one page-aligned allocation, 1 MiB apart, so a case's source and
//! destination offsets fix `(dst - src) mod 4096` exactly — the quantity behind 4K aliasing —
//! for every routine alike. Case names: `copy_<size>/<routine>/d<delta>_s<src offset>`, where
//! `delta = (dst - src) mod 4096`; `zero_<size>/<routine>/o<offset>` for zeroing.
//! Throughput is reported in bytes/s (criterion's "thrpt").
//!
//! Routines: `memcpy` (`copy_from_slice`), each [`Implementation`] the CPU runs except
//! `portable` (which is `memcpy`), and `rep-movsb-raw`: a bare `rep movsb` on every offset pair,
//! to show the trap [`Implementation::RepMovsb`] steers around.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tidepool::copy::{Copier, Implementation};

/// Copy sizes measured.
const SIZES: [usize; 6] = [512, 4 << 10, 16 << 10, 64 << 10, 128 << 10, 256 << 10];

/// Distance between the source and destination regions: a multiple of 4096, larger than any
/// size plus offsets.
const REGION_DISTANCE: usize = 1 << 20;

/// `(src_offset, dst_offset)` pairs inside the page-aligned regions. `dst - src mod 4096`:
/// 0, 4, 16, 32, 63, 256, 1024 (dst a little after src: the aliasing window for forward
/// copies), 4092 (dst a little before src), and misaligned sources with deltas 0 and 4.
const OFFSETS: [(usize, usize); 10] = [
    (0, 0),
    (0, 4),
    (0, 16),
    (0, 32),
    (0, 63),
    (0, 256),
    (0, 1024),
    (4, 0),
    (7, 7),
    (7, 11),
];

/// Two disjoint regions of one allocation, both starting on a 4096-byte boundary.
struct Regions {
    bytes: Vec<u8>,
    start: usize,
}

impl Regions {
    fn new() -> Regions {
        let mut bytes = vec![0u8; 2 * REGION_DISTANCE + 4096];
        let start = (bytes.as_ptr() as usize).wrapping_neg() % 4096;
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = (i * 31 % 251) as u8;
        }
        Regions { bytes, start }
    }

    /// The source region (from `src_off`) and destination region (from `dst_off`).
    fn split(&mut self, src_off: usize, dst_off: usize, len: usize) -> (&[u8], &mut [u8]) {
        let (src, dst) = self.bytes[self.start..].split_at_mut(REGION_DISTANCE);
        (
            &src[src_off..src_off + len],
            &mut dst[dst_off..dst_off + len],
        )
    }
}

fn size_name(size: usize) -> String {
    if size >= 1024 {
        format!("{}KiB", size >> 10)
    } else {
        format!("{size}B")
    }
}

fn bench_copy(c: &mut Criterion) {
    let mut regions = Regions::new();
    let copiers: Vec<Copier> = Implementation::available()
        .filter(|implementation| *implementation != Implementation::Portable)
        .map(|implementation| Copier::new(implementation).expect("listed as available"))
        .collect();
    for size in SIZES {
        let mut group = c.benchmark_group(format!("copy_{}", size_name(size)));
        group.throughput(Throughput::Bytes(size as u64));
        for (src_off, dst_off) in OFFSETS {
            let delta = (REGION_DISTANCE + dst_off - src_off) % 4096;
            let case = format!("d{delta}_s{src_off}");
            let (src, dst) = regions.split(src_off, dst_off, size);
            group.bench_function(BenchmarkId::new("memcpy", &case), |b| {
                b.iter(|| {
                    dst.copy_from_slice(black_box(&*src));
                    black_box(&mut *dst);
                })
            });
            for copier in &copiers {
                let id = BenchmarkId::new(copier.implementation().name(), &case);
                group.bench_function(id, |b| {
                    b.iter(|| {
                        // SAFETY: `src` and `dst` are `size` bytes each, in disjoint halves
                        // of one allocation.
                        unsafe {
                            copier.copy_raw(
                                black_box(src.as_ptr()),
                                black_box(dst.as_mut_ptr()),
                                size,
                            )
                        };
                        black_box(&mut *dst);
                    })
                });
            }
        }
        group.finish();
    }
}

/// A bare `rep movsb` of `len` bytes (x86_64 with ERMS only), without the aliasing-window
/// fallback of [`Implementation::RepMovsb`].
///
/// # Safety
/// `src` valid for `len` reads, `dst` for `len` writes, disjoint.
#[cfg(target_arch = "x86_64")]
unsafe fn rep_movsb_raw(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: per the caller; `rep movsb` moves exactly `rcx` bytes upwards (the direction
    // flag is clear on entry to inline assembly).
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") len => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            options(nostack, preserves_flags),
        )
    }
}

/// Benchmarks [`rep_movsb_raw`] in the same cases as `bench_copy`.
fn bench_rep_movsb_raw(c: &mut Criterion) {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("ermsb") {
            return;
        }
        let mut regions = Regions::new();
        for size in SIZES {
            let mut group = c.benchmark_group(format!("copy_{}", size_name(size)));
            group.throughput(Throughput::Bytes(size as u64));
            for (src_off, dst_off) in OFFSETS {
                let delta = (REGION_DISTANCE + dst_off - src_off) % 4096;
                let (src, dst) = regions.split(src_off, dst_off, size);
                let id = BenchmarkId::new("rep-movsb-raw", format!("d{delta}_s{src_off}"));
                group.bench_function(id, |b| {
                    b.iter(|| {
                        // SAFETY: `src` and `dst` are `size` bytes each, disjoint.
                        unsafe {
                            rep_movsb_raw(
                                black_box(src.as_ptr()),
                                black_box(dst.as_mut_ptr()),
                                size,
                            )
                        };
                        black_box(&mut *dst);
                    })
                });
            }
            group.finish();
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = c;
}

fn bench_zero(c: &mut Criterion) {
    let mut regions = Regions::new();
    let copiers: Vec<Copier> = [Implementation::Avx, Implementation::Sse2]
        .into_iter()
        .filter_map(|implementation| Copier::new(implementation).ok())
        .collect();
    for size in SIZES {
        let mut group = c.benchmark_group(format!("zero_{}", size_name(size)));
        group.throughput(Throughput::Bytes(size as u64));
        for offset in [0, 7] {
            let case = format!("o{offset}");
            let (_, dst) = regions.split(0, offset, size);
            group.bench_function(BenchmarkId::new("memset", &case), |b| {
                b.iter(|| {
                    black_box(&mut *dst).fill(0);
                    black_box(&mut *dst);
                })
            });
            for copier in &copiers {
                let id = BenchmarkId::new(copier.implementation().name(), &case);
                group.bench_function(id, |b| {
                    // SAFETY: `dst` is `size` writable bytes.
                    b.iter(|| unsafe { copier.zero(black_box(dst.as_mut_ptr()), size) })
                });
            }
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(400))
        .sample_size(30)
        .without_plots();
    targets = bench_copy, bench_rep_movsb_raw, bench_zero
}
criterion_main!(benches);
