//! Option parsing: fio's names, suffixes, flags and defaults; workload bounds and rwmix.

use std::ffi::OsString;
use std::time::Duration;

use tpio::cli;
use tpio::engine::IoDirection;
use tpio::options::{BlockSizes, EngineKind, OutputFormat, RwMode, VerifyKind};
use tpio::workload::{Layout, Workload};

/// Parses a command line given as words.
fn parse(
    words: &[&str],
) -> Result<(Vec<tpio::options::JobSpec>, cli::OutputSettings), cli::CliError> {
    let argv: Vec<OsString> = std::iter::once("tpio")
        .chain(words.iter().copied())
        .map(OsString::from)
        .collect();
    cli::parse(&argv)
}

#[test]
fn fio_style_options_resolve() {
    let (jobs, output) = parse(&[
        "--name=t",
        "--rw=randrw",
        "--rwmixread=30",
        "--bs=128k",
        "--iodepth=32",
        "--numjobs=2",
        "--runtime=2m",
        "--time_based",
        "--size=1g",
        "--offset=4k",
        "--ramp_time=5s",
        "--ioengine=null",
        "--direct=1",
        "--output-format=json,normal",
        "--dma=zero-copy",
        "--pool-max=1g",
        "--completion=interrupt",
    ])
    .expect("valid");
    let job = &jobs[0];
    assert_eq!(job.name, "t");
    assert_eq!(job.rw, RwMode::Randrw);
    assert_eq!(job.rwmixread, 30);
    assert_eq!(job.block_sizes, BlockSizes::Fixed(131072));
    assert_eq!(job.iodepth, 32);
    assert_eq!(job.numjobs, 2);
    assert_eq!(job.runtime, Some(Duration::from_secs(120)));
    assert!(job.time_based);
    assert_eq!(job.size, Some(1 << 30));
    assert_eq!(job.offset, 4096);
    assert_eq!(job.ramp_time, Duration::from_secs(5));
    assert_eq!(job.ioengine, EngineKind::Null);
    assert!(job.direct);
    assert_eq!(job.pool.max, Some(1 << 30));
    assert_eq!(
        output.formats,
        vec![OutputFormat::Json, OutputFormat::Normal]
    );

    let (jobs, _) = parse(&[
        "--filename=/dev/null",
        "--bsrange=4k-128k",
        "--verify=crc32c",
        "--rw=write",
    ])
    .expect("valid");
    assert_eq!(
        jobs[0].block_sizes,
        BlockSizes::Range {
            min: 4096,
            max: 131072
        }
    );
    assert_eq!(jobs[0].verify, VerifyKind::Crc32c);
    assert!(jobs[0].has_verify_phase());
    assert_eq!(
        jobs[0].ioengine,
        EngineKind::IoUring,
        "io_uring is the default engine"
    );
    assert!(!jobs[0].time_based && !jobs[0].direct, "fio's defaults");
}

#[test]
fn invalid_values_are_rejected() {
    for words in [
        &["--ioengine=null", "--size=1m", "--bs=1000"][..],
        &["--ioengine=null", "--size=1m", "--rwmixread=101"],
        &["--ioengine=null", "--size=1m", "--rw=trim"],
        &["--ioengine=null", "--size=1m", "--bsrange=8k-4k"],
        &["--ioengine=null", "--size=1m", "--runtime=ten"],
        &[
            "--ioengine=null",
            "--size=1m",
            "--rw=randrw",
            "--verify=crc32c",
        ],
        &["--ioengine=null", "--size=1m", "--offset=100"],
        &["--ioengine=null"],
        &["--rw=read"],
    ] {
        assert!(parse(words).is_err(), "{words:?} should be rejected");
    }
}

#[test]
fn offsets_stay_in_bounds_and_aligned() {
    let base = 1 << 20;
    let size = 8 << 20;
    for random in [false, true] {
        let layout = Layout::fixed(base, size, 16384).expect("layout");
        let ios: Vec<_> = Workload::new(layout, random, 50, false, 3).collect();
        assert_eq!(ios.len() as u64, size / 16384, "one pass");
        let mut offsets: Vec<u64> = ios.iter().map(|io| io.offset).collect();
        assert!(offsets
            .iter()
            .all(|o| *o >= base && o + 16384 <= base + size && (o - base) % 16384 == 0));
        if random {
            assert!(
                offsets.windows(2).any(|w| w[1] != w[0] + 16384),
                "random order"
            );
        } else {
            assert!(
                offsets.windows(2).all(|w| w[1] == w[0] + 16384),
                "sequential order"
            );
        }
        offsets.sort_unstable();
        offsets.dedup();
        assert_eq!(
            offsets.len() as u64,
            size / 16384,
            "every block exactly once per pass"
        );
    }
}

#[test]
fn rwmix_ratio_holds() {
    let layout = Layout::fixed(0, 1 << 30, 4096).expect("layout");
    let ios: Vec<_> = Workload::new(layout, true, 25, false, 11)
        .take(100_000)
        .collect();
    let reads = ios
        .iter()
        .filter(|io| io.direction == IoDirection::Read)
        .count();
    let share = reads as f64 / ios.len() as f64;
    assert!((0.24..0.26).contains(&share), "rwmixread=25 gave {share}");
}

#[test]
fn time_based_workloads_repeat_passes() {
    let layout = Layout::fixed(0, 64 * 4096, 4096).expect("layout");
    let ios: Vec<_> = Workload::new(layout, true, 100, true, 5)
        .take(64 * 3 + 1)
        .collect();
    assert_eq!(ios[64].pass, 1);
    assert_eq!(ios[64 * 3].pass, 3);
}

#[test]
fn bsrange_sizes_are_aligned_and_bounded() {
    let layout = Layout::ranged(0, 64 << 20, 4096, 131072, 4096, 1).expect("layout");
    let ios: Vec<_> = Workload::new(layout, true, 0, false, 1).collect();
    let mut lengths = std::collections::HashSet::new();
    for io in &ios {
        assert!(io.len % 4096 == 0 && (4096..=131072).contains(&io.len));
        assert_eq!(io.offset % 4096, 0);
        lengths.insert(io.len);
    }
    assert!(lengths.len() > 10, "sizes vary: {}", lengths.len());
    let total: u64 = ios.iter().map(|io| u64::from(io.len)).sum();
    assert!(total <= 64 << 20 && total > (64 << 20) - 4096);
}

#[test]
fn verify_with_clones_needs_disjoint_regions() {
    let base = [
        "--name=v",
        "--ioengine=null",
        "--rw=randwrite",
        "--verify=crc32c",
        "--numjobs=2",
        "--size=8m",
    ];
    let err = parse(&base).expect_err("clones would overlap");
    assert!(err.to_string().contains("offset_increment"), "{err}");
    let overlapping = [&base[..], &["--offset_increment=4m"]].concat();
    assert!(parse(&overlapping).is_err(), "regions 4 MiB apart overlap");
    let disjoint = [&base[..], &["--offset_increment=8m"]].concat();
    parse(&disjoint).expect("regions of their own");
}

#[test]
fn cpus_allowed_parses_fio_lists_and_refuses_bad_ones() {
    let (jobs, _) = parse(&[
        "--name=c",
        "--ioengine=null",
        "--size=1m",
        "--cpus_allowed=0-2,5",
        "--cpus_allowed_policy=split",
    ])
    .expect("valid");
    let cpus = jobs[0].cpus_allowed.as_ref().expect("restricted");
    assert_eq!(cpus.cpus(), &[0, 1, 2, 5]);
    assert_eq!(
        jobs[0].cpus_allowed_policy,
        tpio::affinity::CpuPolicy::Split
    );
    let err = parse(&[
        "--name=c",
        "--ioengine=null",
        "--size=1m",
        "--cpus_allowed=3-1",
    ])
    .expect_err("backwards range");
    assert!(err.to_string().contains("runs backwards"), "{err}");
}

#[test]
fn nvme_data_pointer_takes_auto_prp_or_sgl() {
    use tpio::options::NvmeDataPointer;
    let (jobs, _) = parse(&["--name=t", "--ioengine=null", "--size=1m"]).expect("valid");
    assert_eq!(jobs[0].pool.data_pointer, NvmeDataPointer::Auto);
    let (jobs, _) = parse(&[
        "--name=t",
        "--ioengine=null",
        "--size=1m",
        "--nvme_data_pointer=prp",
    ])
    .expect("valid");
    assert_eq!(jobs[0].pool.data_pointer, NvmeDataPointer::Prp);
    let (jobs, _) = parse(&[
        "--name=t",
        "--ioengine=null",
        "--size=1m",
        "--nvme-data-pointer=sgl",
    ])
    .expect("valid");
    assert_eq!(jobs[0].pool.data_pointer, NvmeDataPointer::Sgl);
    let e = parse(&[
        "--name=t",
        "--ioengine=null",
        "--size=1m",
        "--nvme-data-pointer=bogus",
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("auto, prp, sgl"), "{e}");
}
