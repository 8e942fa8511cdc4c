//! Command-line options in fio's words, and the validated job description they resolve to.
//!
//! [`CliArgs`] is what clap parses from the command line; its [`JobArgs`] part is also what each
//! section of a job file is parsed into (see [`crate::jobfile`]): a job file's `key=value` becomes
//! `--key=value`, so both inputs share one set of names, defaults and error messages.
//! Every option that later occurrences may override is declared with clap's `args_override_self`,
//! which is how `[global]` values are inherited and overridden by a job section and by the command line.
//!
//! [`JobArgs::resolve`] turns the loose options into a [`JobSpec`] with every default applied and
//! every check that does not need the device done (block sizes multiple of 512, rwmix in 0..=100,
//! verify only with a pure write or read workload, ...). Checks that need the device (capacity,
//! logical block size) happen in [`crate::runner`] once the engine is open.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, ValueEnum};

use crate::units::{
    parse_bool, parse_bssplit, parse_duration, parse_rate, parse_size, parse_size_or_percent,
    parse_size_range, SizeOrPercent, SizeRange, SizeSplit,
};

/// The smallest alignment any block size, offset or size must have (one 512-byte sector).
pub const SECTOR: u64 = 512;

/// A job description could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum OptionError {
    /// A value is outside what tpio accepts; the message says which and why.
    #[error("{0}")]
    Invalid(String),
    /// A fio option or value tpio does not implement; the text names it.
    #[error("not supported: {0}")]
    NotSupported(String),
}

/// `tpio [OPTIONS] [JOBFILE...]`: the whole command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "tpio",
    version,
    about = "A fio-like block I/O benchmark (engines: io_uring, null, tidepool: the userspace NVMe driver over VFIO, vhost-user-blk: the confidential data plane)",
    args_override_self = true,
    after_help = "Job files use fio's ini format: [global] plus one [section] per job, key=value \
                  lines with the same names as the options above (bare keys such as time_based are flags). \
                  Jobs of a file run together unless stonewall or wait_for orders them; numjobs clones of \
                  one job run together, one thread each. Options given on the command line override the \
                  file. fio options tpio does not implement are refused with `not supported: NAME`.\n\n\
                  `tpio plot A.json B.json -o out.png` plots IOPS and latency percentiles of JSON results."
)]
pub struct CliArgs {
    /// Job files in fio's ini format; without one, the command line describes a single job.
    #[arg(value_name = "JOBFILE")]
    pub job_files: Vec<PathBuf>,

    /// The job's options (also the keys of a job file).
    #[command(flatten)]
    pub job: JobArgs,

    /// Output formats, comma separated: normal, json (both: normal first, as fio does).
    #[arg(long = "output-format", alias = "output_format", value_enum, value_delimiter = ',',
          num_args = 1.., default_value = "normal", action = ArgAction::Set)]
    pub output_format: Vec<OutputFormat>,

    /// Write the report to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Run only the job-file sections of this name (repeatable; `[global]` always applies).
    #[arg(long, value_name = "NAME", action = ArgAction::Append)]
    pub section: Vec<String>,

    /// Parse the options and job files, print nothing and run nothing (fio's --parse-only).
    #[arg(long = "parse-only", alias = "parse_only")]
    pub parse_only: bool,

    /// Every TIME (seconds; ms/s/m suffixes), and once at the end, write live statistics: the
    /// I/Os and bytes completed so far and the DMA pool of each job that has one, as Prometheus
    /// text or JSON (--stats-format), to --stats-file or stderr.
    #[arg(long = "stats-interval", alias = "stats_interval", value_parser = parse_duration,
          value_name = "TIME")]
    pub stats_interval: Option<Duration>,

    /// Where --stats-interval writes: this file, replaced atomically at each interval (a
    /// node_exporter textfile-collector `.prom` file works); stderr without it.
    #[arg(long = "stats-file", alias = "stats_file", value_name = "FILE")]
    pub stats_file: Option<PathBuf>,

    /// How --stats-interval writes: prometheus (text exposition 0.0.4) or json (one document
    /// per snapshot, one line each on stderr).
    #[arg(
        long = "stats-format",
        alias = "stats_format",
        value_enum,
        default_value = "prometheus"
    )]
    pub stats_format: StatsFormat,
}

/// How live statistics are written (`--stats-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatsFormat {
    /// Prometheus text exposition format 0.0.4.
    Prometheus,
    /// JSON: `{"elapsed_seconds", "metrics": [...]}` (see `tidepool_metrics::Exposition::to_json`).
    Json,
}

/// How the report is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// fio's human-readable summary.
    Normal,
    /// fio's JSON layout (`--output-format=json`).
    Json,
    /// fio's JSON layout plus completion-latency histogram bins (`clat_ns.bins`).
    #[value(name = "json+")]
    JsonPlus,
}

/// fio's `rw=`: the direction and order of the I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RwMode {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential mixed reads and writes (fio's `rw`/`readwrite`).
    #[value(alias = "readwrite")]
    Rw,
    /// Random mixed reads and writes.
    Randrw,
}

impl RwMode {
    /// Whether offsets are visited in a random permutation rather than in order.
    pub fn is_random(self) -> bool {
        matches!(self, RwMode::Randread | RwMode::Randwrite | RwMode::Randrw)
    }

    /// The percentage of I/Os that are reads: 100, 0, or `rwmixread` for the mixed modes.
    pub fn read_percent(self, rwmixread: u8) -> u8 {
        match self {
            RwMode::Read | RwMode::Randread => 100,
            RwMode::Write | RwMode::Randwrite => 0,
            RwMode::Rw | RwMode::Randrw => rwmixread,
        }
    }
}

/// fio's `ioengine=`: which engine moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// Linux io_uring, set up and batched as fio's io_uring engine (`--fixedbufs`, `--registerfiles`).
    #[value(name = "io_uring")]
    IoUring,
    /// No I/O at all: completes every request at once (tests the harness).
    Null,
    /// The Tidepool userspace NVMe driver (drivers/nvme).
    Tidepool,
    /// Tidepool's vhost-user-blk frontend (drivers/vhost-user-blk): `--filename` is the
    /// backend's unix socket; every byte is bounced through a pool shared with the backend.
    #[value(name = "vhost-user-blk")]
    VhostUserBlk,
}

/// fio's `verify=`: how a written block proves it came back intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerifyKind {
    /// No verification.
    #[value(alias = "0")]
    None,
    /// A CRC32C over the header and payload.
    Crc32c,
    /// The payload compared byte for byte with the pattern regenerated from the header.
    Pattern,
}

/// `--dma`: where the tidepool engine's buffers live and how they reach the device. The
/// caller-memory choices map onto the library's one policy, `tidepool::data::DmaPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DmaMode {
    /// Copy through pre-mapped bounce buffers.
    Bounce,
    /// Map and unmap the caller's buffer around every I/O.
    MapPerIo,
    /// The caller's buffers are pool memory already visible to the device.
    ZeroCopy,
    /// Let the pool choose by size.
    Auto,
}

/// `--nvme-data-pointer`: how the tidepool engine's NVMe commands describe their data
/// (`tidepool_nvme::DataPointer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NvmeDataPointer {
    /// SGLs if the controller supports them, PRPs otherwise (the driver's default).
    Auto,
    /// Always PRPs.
    Prp,
    /// Always SGLs (opening fails on a controller without them).
    Sgl,
}

/// How the NVMe engine learns about completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionMode {
    /// Spin on the completion queue.
    Poll,
    /// Sleep until MSI-X signals an eventfd.
    Interrupt,
}

/// One job's options, by fio's names. Job-file keys are the same names without the dashes.
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// Job name (a job file's section name is the default).
    #[arg(long)]
    pub name: Option<String>,
    /// I/O pattern.
    #[arg(long, value_enum, default_value = "read", alias = "readwrite")]
    pub rw: RwMode,
    /// Percentage of reads in rw/randrw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmixread: u8,
    /// Percentage of writes in rw/randrw (fio's rwmixwrite: sets rwmixread to 100 minus it).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmixwrite: Option<u8>,
    /// Use the page cache: `buffered=0` is `direct=1` (fio's inverse of direct).
    #[arg(long, num_args = 0..=1, default_missing_value = "1", value_parser = parse_bool,
          action = ArgAction::Set)]
    pub buffered: Option<bool>,
    /// Block size (multiple of 512; k/m suffixes).
    #[arg(long, value_parser = parse_size, value_name = "SIZE", alias = "blocksize")]
    pub bs: Option<u64>,
    /// Random block sizes in MIN-MAX (multiples of 512), instead of --bs.
    #[arg(long, value_parser = parse_size_range, value_name = "MIN-MAX", alias = "blocksize_range")]
    pub bsrange: Option<SizeRange>,
    /// I/Os kept in flight per job.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16384))]
    pub iodepth: u32,
    /// Commit queued I/Os to the engine every N (fio's `iodepth_batch_submit`, alias
    /// `iodepth_batch`); default: the engine's own choice (io_uring 1, as fio; the tidepool
    /// and vhost-user-blk engines one commit per refill round).
    #[arg(long = "iodepth_batch_submit", visible_alias = "iodepth_batch",
          alias = "iodepth-batch-submit", alias = "iodepth-batch",
          value_parser = clap::value_parser!(u32).range(1..=16384), value_name = "N")]
    pub iodepth_batch_submit: Option<u32>,
    /// Take at most N completions before refilling their slots (fio's
    /// `iodepth_batch_complete_max`); default: the engine's own choice (io_uring 1, as fio).
    #[arg(long = "iodepth_batch_complete_max", alias = "iodepth-batch-complete-max",
          value_parser = clap::value_parser!(u32).range(1..=16384), value_name = "N")]
    pub iodepth_batch_complete_max: Option<u32>,
    /// Clones of this job, run together, one thread each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub numjobs: u32,
    /// Block sizes with weights, fio's `bssplit=4k/10:64k/50:32k/` (an empty weight shares what
    /// is left); one list for reads and writes.
    #[arg(long, value_parser = parse_bssplit, value_name = "BS/PCT:...")]
    pub bssplit: Option<SizeSplit>,
    /// Stop after this long (seconds; s/m/h suffixes).
    #[arg(long, value_parser = parse_duration, value_name = "TIME", alias = "timeout")]
    pub runtime: Option<Duration>,
    /// Report the jobs of a group (numjobs clones included) as one summed job.
    #[arg(long = "group_reporting", alias = "group-reporting", num_args = 0..=1,
          default_missing_value = "1", default_value = "0", value_parser = parse_bool,
          action = ArgAction::Set)]
    pub group_reporting: bool,
    /// Wait for every job above this one to finish before starting (starts a new group).
    #[arg(long, num_args = 0..=1, default_missing_value = "1", default_value = "0",
          value_parser = parse_bool, action = ArgAction::Set, alias = "wait_for_previous")]
    pub stonewall: bool,
    /// Start a new reporting group with this job (without waiting for the jobs above).
    #[arg(long = "new_group", alias = "new-group", num_args = 0..=1, default_missing_value = "1",
          default_value = "0", value_parser = parse_bool, action = ArgAction::Set)]
    pub new_group: bool,
    /// Start this job only once the job named here has finished.
    #[arg(long = "wait_for", alias = "wait-for", value_name = "JOB")]
    pub wait_for: Option<String>,
    /// fio's `thread`: keep this job in the caller's session (tpio's clones are threads either
    /// way; without it, as fio's job processes, the jobs run in a session of their own, see
    /// `tpio::session`).
    #[arg(long, num_args = 0..=1, default_missing_value = "1", default_value = "0",
          value_parser = parse_bool, action = ArgAction::Set)]
    pub thread: bool,
    /// CPUs the job's clones run on, fio's list syntax (`0-3,6`).
    #[arg(long = "cpus_allowed", alias = "cpus-allowed", value_parser = crate::affinity::parse_cpu_list,
          value_name = "LIST")]
    pub cpus_allowed: Option<crate::affinity::CpuList>,
    /// `shared`: every clone may use every CPU of `cpus_allowed`; `split`: clone k gets the
    /// k-th CPU alone.
    #[arg(
        long = "cpus_allowed_policy",
        alias = "cpus-allowed-policy",
        value_enum,
        default_value = "shared"
    )]
    pub cpus_allowed_policy: crate::affinity::CpuPolicy,
    /// Random offsets drawn with replacement instead of a permutation (blocks may repeat or be
    /// skipped within a pass).
    #[arg(long, num_args = 0..=1, default_missing_value = "1", default_value = "0",
          value_parser = parse_bool, action = ArgAction::Set)]
    pub norandommap: bool,
    /// ioengine=io_uring: register the slot buffers once (READ_FIXED/WRITE_FIXED) instead of
    /// letting the kernel pin a buffer per request (fio's `fixedbufs`, off by default there too).
    #[arg(long, num_args = 0..=1, default_missing_value = "1", default_value = "0",
          value_parser = parse_bool, action = ArgAction::Set)]
    pub fixedbufs: bool,
    /// ioengine=io_uring: register the file once, requests name it by index (fio's
    /// `registerfiles`, off by default there too).
    #[arg(long, num_args = 0..=1, default_missing_value = "1", default_value = "0",
          value_parser = parse_bool, action = ArgAction::Set)]
    pub registerfiles: bool,
    /// Seed the generators the same way every run (0: from the clock, unless --randseed is given).
    #[arg(long, num_args = 0..=1, default_missing_value = "1", default_value = "1",
          value_parser = parse_bool, action = ArgAction::Set)]
    pub randrepeat: bool,
    /// Bandwidth cap per clone in bytes/s: `R` for both directions or `R,W`.
    #[arg(long, value_parser = parse_rate, value_name = "BW[,BW]")]
    pub rate: Option<[Option<u64>; 2]>,
    /// I/O rate cap per clone in IOPS: `N` for both directions or `R,W`.
    #[arg(long = "rate_iops", alias = "rate-iops", value_parser = parse_rate, value_name = "N[,N]")]
    pub rate_iops: Option<[Option<u64>; 2]>,
    /// Run the workload this many times (passes over the region).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub loops: u32,
    /// Wait this long after the run starts before starting this job.
    #[arg(long, value_parser = parse_duration, value_name = "TIME")]
    pub startdelay: Option<Duration>,
    /// Clone N works at offset + N * this.
    #[arg(long = "offset_increment", alias = "offset-increment", value_parser = parse_size,
          default_value = "0", value_name = "SIZE")]
    pub offset_increment: u64,
    /// With verify on writes: check the last N written blocks every N writes instead of at the end.
    #[arg(long = "verify_backlog", alias = "verify-backlog", value_parser = clap::value_parser!(u64).range(1..),
          value_name = "N")]
    pub verify_backlog: Option<u64>,
    /// Replay the I/Os of this fio iolog (version 2 or 3) instead of generating a workload.
    #[arg(long = "read_iolog", alias = "read-iolog", value_name = "FILE")]
    pub read_iolog: Option<PathBuf>,
    /// Write every I/O issued to this file in fio's iolog version 2 format (clone N > 0 appends `.N`).
    #[arg(long = "write_iolog", alias = "write-iolog", value_name = "FILE")]
    pub write_iolog: Option<PathBuf>,
    /// Free text describing the job (echoed in the JSON).
    #[arg(long)]
    pub description: Option<String>,
    /// Keep going over the region until --runtime has passed.
    #[arg(long = "time_based", alias = "time-based", num_args = 0..=1, default_missing_value = "1",
          default_value = "0", value_parser = parse_bool, action = ArgAction::Set)]
    pub time_based: bool,
    /// Bytes of the region to work on, from --offset (default: the rest of the file or device);
    /// `N%` is that share of the target's capacity.
    #[arg(long, value_parser = parse_size_or_percent, value_name = "SIZE|N%")]
    pub size: Option<SizeOrPercent>,
    /// Start of the region in bytes.
    #[arg(long, value_parser = parse_size, default_value = "0", value_name = "SIZE")]
    pub offset: u64,
    /// Run this long before counting statistics.
    #[arg(long = "ramp_time", alias = "ramp-time", value_parser = parse_duration, value_name = "TIME")]
    pub ramp_time: Option<Duration>,
    /// Write verifiable blocks and check them on read.
    #[arg(long, value_enum, default_value = "none")]
    pub verify: VerifyKind,
    /// With --verify on a write workload: read back and check after the write phase.
    #[arg(long = "do_verify", alias = "do-verify", num_args = 0..=1, default_missing_value = "1",
          default_value = "1", value_parser = parse_bool, action = ArgAction::Set)]
    pub do_verify: bool,
    /// Seed of the offset and data generators.
    #[arg(long)]
    pub randseed: Option<u64>,
    /// I/O engine.
    #[arg(long, value_enum, default_value = "io_uring")]
    pub ioengine: EngineKind,
    /// File or block device to work on (tidepool: a PCI address; vhost-user-blk: a unix socket).
    /// fio's `a:b` lists of several files are refused.
    #[arg(long, value_name = "PATH")]
    pub filename: Option<String>,
    /// Bypass the page cache (O_DIRECT).
    #[arg(long, num_args = 0..=1, default_missing_value = "1", default_value = "0",
          value_parser = parse_bool, action = ArgAction::Set)]
    pub direct: bool,
    /// tidepool engine: how slot memory reaches the device (bounce: copy through pre-mapped
    /// pool buffers; map-per-io: IOMMU map/unmap around every I/O; zero-copy: slots are pool
    /// buffers; auto: bounce below a size threshold, map from it on).
    #[arg(long, value_enum, default_value = "bounce")]
    pub dma: DmaMode,
    /// tidepool engine, --dma=auto: the first I/O size that is mapped instead of bounced
    /// (default: measured at start with the pool's calibration).
    #[arg(long = "dma-threshold", alias = "dma_threshold", value_parser = parse_size, value_name = "SIZE")]
    pub dma_threshold: Option<u64>,
    /// tidepool and vhost-user-blk engines: pool memory reserved at start.
    #[arg(long = "pool-min", alias = "pool_min", value_parser = parse_size, value_name = "SIZE")]
    pub pool_min: Option<u64>,
    /// tidepool and vhost-user-blk engines: most pool memory it may grow to.
    #[arg(long = "pool-max", alias = "pool_max", value_parser = parse_size, value_name = "SIZE")]
    pub pool_max: Option<u64>,
    /// tidepool and vhost-user-blk engines: size of each chunk the pool grows by.
    #[arg(long = "pool-chunk", alias = "pool_chunk", value_parser = parse_size, value_name = "SIZE")]
    pub pool_chunk: Option<u64>,
    /// tidepool engine: `poll` spins on the completion queue, `interrupt` sleeps on the
    /// queue's MSI-X vector when it is empty. vhost-user-blk engine: `poll` busy-polls the used ring, `interrupt` sleeps on the call
    /// eventfd.
    #[arg(long, value_enum, default_value = "poll")]
    pub completion: CompletionMode,
    /// tidepool engine: PRPs or SGLs for the commands' data.
    #[arg(
        long = "nvme-data-pointer",
        alias = "nvme_data_pointer",
        value_enum,
        default_value = "auto"
    )]
    pub nvme_data_pointer: NvmeDataPointer,
}

/// The block sizes a job uses: one size, a range to draw from, or a weighted split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockSizes {
    /// Every I/O is this many bytes.
    Fixed(u64),
    /// Each block is a random multiple of `align` in `[min, max]`.
    Range {
        /// Smallest block.
        min: u64,
        /// Largest block.
        max: u64,
    },
    /// fio's `bssplit`: (size, percent) pairs whose percents add up to 100.
    Split(Vec<(u64, u32)>),
}

impl BlockSizes {
    /// The largest I/O this job issues, which sizes each buffer slot.
    pub fn max(&self) -> u64 {
        match self {
            BlockSizes::Fixed(size) => *size,
            BlockSizes::Range { max, .. } => *max,
            BlockSizes::Split(split) => split.iter().map(|(size, _)| *size).max().unwrap_or(0),
        }
    }

    /// The smallest I/O this job issues.
    pub fn min(&self) -> u64 {
        match self {
            BlockSizes::Fixed(size) => *size,
            BlockSizes::Range { min, .. } => *min,
            BlockSizes::Split(split) => split.iter().map(|(size, _)| *size).min().unwrap_or(0),
        }
    }
}

/// Tidepool-specific settings, passed through to the tidepool engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// DMA policy.
    pub dma: DmaMode,
    /// `--dma=auto` threshold in bytes (`None`: calibrate).
    pub dma_threshold: Option<u64>,
    /// Reserved pool bytes at start.
    pub min: Option<u64>,
    /// Most pool bytes.
    pub max: Option<u64>,
    /// Chunk size.
    pub chunk: Option<u64>,
    /// Completion mode.
    pub completion: CompletionMode,
    /// PRPs or SGLs.
    pub data_pointer: NvmeDataPointer,
}

/// A job with every default applied and every device-independent check passed.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// Job name as reported.
    pub name: String,
    /// I/O pattern.
    pub rw: RwMode,
    /// Read percentage for mixed modes.
    pub rwmixread: u8,
    /// Block sizes.
    pub block_sizes: BlockSizes,
    /// Queue depth.
    pub iodepth: u32,
    /// `iodepth_batch_submit`, if given (else the engine's batching).
    pub iodepth_batch_submit: Option<u32>,
    /// `iodepth_batch_complete_max`, if given (else the engine's batching).
    pub iodepth_batch_complete_max: Option<u32>,
    /// Clones.
    pub numjobs: u32,
    /// Run-time limit (after ramp).
    pub runtime: Option<Duration>,
    /// Loop until the run time has passed.
    pub time_based: bool,
    /// Region size in bytes, `None` = to the end of the target (or `size_percent` of it).
    pub size: Option<u64>,
    /// `size=N%`: the region is this share (0..=100) of the target's capacity past `offset`.
    pub size_percent: Option<f64>,
    /// Region start in bytes.
    pub offset: u64,
    /// Warm-up time without statistics.
    pub ramp_time: Duration,
    /// Verification kind.
    pub verify: VerifyKind,
    /// Read back after the write phase.
    pub do_verify: bool,
    /// Generator seed.
    pub randseed: u64,
    /// Engine.
    pub ioengine: EngineKind,
    /// Target path (not needed by the null engine).
    pub filename: Option<PathBuf>,
    /// O_DIRECT.
    pub direct: bool,
    /// tidepool engine settings.
    pub pool: PoolSettings,
    /// Report this job's group as one summed job.
    pub group_reporting: bool,
    /// Wait for every earlier job before starting.
    pub stonewall: bool,
    /// Start a new reporting group.
    pub new_group: bool,
    /// Start after the named job has finished.
    pub wait_for: Option<String>,
    /// Random offsets with replacement (fio's norandommap).
    pub norandommap: bool,
    /// io_uring: registered buffers (fio's `fixedbufs`).
    pub fixedbufs: bool,
    /// io_uring: registered file (fio's `registerfiles`).
    pub registerfiles: bool,
    /// CPUs the clones run on (`cpus_allowed`), if restricted.
    pub cpus_allowed: Option<crate::affinity::CpuList>,
    /// How clones share `cpus_allowed`.
    pub cpus_allowed_policy: crate::affinity::CpuPolicy,
    /// fio's `thread`: stay in the caller's session (see [`crate::session`]).
    pub thread: bool,
    /// Bytes/s cap per clone: (read, write).
    pub rate: [Option<u64>; 2],
    /// IOPS cap per clone: (read, write).
    pub rate_iops: [Option<u64>; 2],
    /// Passes over the workload.
    pub loops: u32,
    /// Delay before the job starts.
    pub startdelay: Duration,
    /// Per-clone offset step.
    pub offset_increment: u64,
    /// Verify every N writes.
    pub verify_backlog: Option<u64>,
    /// Replay this iolog.
    pub read_iolog: Option<PathBuf>,
    /// Record the I/Os to this iolog.
    pub write_iolog: Option<PathBuf>,
    /// The job's options as the user wrote them (key, value; `""` for a bare flag), in order:
    /// fio's `job options`.
    pub given_options: Vec<(String, String)>,
    /// The `[global]` options that applied to this job, as written: fio's `global options`.
    pub global_options: Vec<(String, String)>,
}

impl JobSpec {
    /// Whether this job writes anything (decides read-only vs read-write opening).
    pub fn writes(&self) -> bool {
        self.rw.read_percent(self.rwmixread) < 100
    }

    /// Whether the job ends with a read-back-and-verify phase.
    pub fn has_verify_phase(&self) -> bool {
        self.verify != VerifyKind::None && self.do_verify && self.writes()
    }
}

/// Returns an error unless `value` is a non-zero multiple of `align`.
fn check_multiple(what: &str, value: u64, align: u64) -> Result<(), OptionError> {
    if value == 0 || value % align != 0 {
        return Err(OptionError::Invalid(format!(
            "{what}={value} is not a multiple of {align} bytes: use a size such as 4k"
        )));
    }
    Ok(())
}

impl JobArgs {
    /// Applies defaults and device-independent checks; `fallback_name` names unnamed jobs.
    pub fn resolve(&self, fallback_name: &str) -> Result<JobSpec, OptionError> {
        let mut args = self.clone();
        if let Some(write) = self.rwmixwrite {
            args.rwmixread = 100 - write;
        }
        if let Some(buffered) = self.buffered {
            args.direct = !buffered;
        }
        args.resolve_inner(fallback_name)
    }

    /// [`JobArgs::resolve`] once fio's inverse options are folded in.
    fn resolve_inner(&self, fallback_name: &str) -> Result<JobSpec, OptionError> {
        let block_sizes = match (self.bs, self.bsrange, &self.bssplit) {
            (_, _, Some(split)) => {
                for (size, _) in &split.0 {
                    check_multiple("bssplit size", *size, SECTOR)?;
                }
                BlockSizes::Split(split.0.clone())
            }
            (_, Some(range), None) => {
                check_multiple("bsrange minimum", range.min, SECTOR)?;
                check_multiple("bsrange maximum", range.max, SECTOR)?;
                if range.min == range.max {
                    BlockSizes::Fixed(range.min)
                } else {
                    BlockSizes::Range {
                        min: range.min,
                        max: range.max,
                    }
                }
            }
            (Some(bs), None, None) => {
                check_multiple("bs", bs, SECTOR)?;
                BlockSizes::Fixed(bs)
            }
            (None, None, None) => BlockSizes::Fixed(4096),
        };
        if block_sizes.max() > u64::from(u32::MAX) {
            return Err(OptionError::Invalid(format!(
                "block size {} is too large: the most one I/O can move is 4 GiB - 1",
                block_sizes.max()
            )));
        }
        if self.offset % SECTOR != 0 {
            return Err(OptionError::Invalid(format!(
                "offset={} is not a multiple of {SECTOR} bytes",
                self.offset
            )));
        }
        let (size, size_percent) = match self.size {
            Some(SizeOrPercent::Bytes(bytes)) => (Some(bytes), None),
            Some(SizeOrPercent::Percent(percent)) => (None, Some(percent)),
            None => (None, None),
        };
        if let Some(size) = size {
            if size < block_sizes.max() {
                return Err(OptionError::Invalid(format!(
                    "size={size} is smaller than one block ({} bytes): raise --size or lower --bs",
                    block_sizes.max()
                )));
            }
        }
        if self.time_based && self.runtime.is_none() {
            return Err(OptionError::Invalid(
                "time_based needs --runtime: say how long to run, e.g. --runtime=10s".into(),
            ));
        }
        let mixed = matches!(self.rw, RwMode::Rw | RwMode::Randrw);
        if self.verify != VerifyKind::None {
            if mixed {
                return Err(OptionError::Invalid(
                    "verify works with rw=write/randwrite (write, then read back) or rw=read/randread \
                     (check data an earlier verify job wrote); not with mixed rw/randrw"
                        .into(),
                ));
            }
            if self.time_based && self.do_verify && self.rw.read_percent(self.rwmixread) == 0 {
                return Err(OptionError::Invalid(
                    "verify with do_verify=1 writes each block once and reads it back: drop --time_based \
                     or set --do_verify=0"
                        .into(),
                ));
            }
        }
        // Clones write regions of their own only when each starts past the previous one's end.
        let disjoint_clones = matches!(self.size, Some(SizeOrPercent::Bytes(size))
            if size > 0 && self.offset_increment >= size);
        if self.verify != VerifyKind::None
            && self.numjobs > 1
            && self.rw.read_percent(self.rwmixread) == 0
            && !disjoint_clones
        {
            return Err(OptionError::Invalid(
                "verify with numjobs>1: the clones would overwrite each other's blocks; give \
                 --offset_increment of at least --size, or use separate jobs with distinct \
                 --offset"
                    .into(),
            ));
        }
        if self.verify != VerifyKind::None
            && self.loops > 1
            && self.rw.read_percent(self.rwmixread) == 0
        {
            return Err(OptionError::Invalid(
                "verify with loops>1: later loops overwrite what the first wrote; use loops=1"
                    .into(),
            ));
        }
        if self.verify_backlog.is_some() && self.verify == VerifyKind::None {
            return Err(OptionError::Invalid(
                "verify_backlog needs --verify (crc32c or pattern)".into(),
            ));
        }
        if self.read_iolog.is_some() && self.ioengine != EngineKind::Null && self.filename.is_none()
        {
            return Err(OptionError::Invalid(
                "read_iolog replays onto --filename: name the target".into(),
            ));
        }
        let filename = match &self.filename {
            Some(name) => Some(single_filename(name, self.ioengine)?),
            None => None,
        };
        if self.ioengine != EngineKind::Null && self.filename.is_none() {
            return Err(OptionError::NotSupported(
                "a job without filename (fio would create a file named after the job; tpio never \
                 creates targets): name the file or block device to test with --filename"
                    .into(),
            ));
        }
        if self.ioengine == EngineKind::Null && size.is_none() {
            return Err(OptionError::Invalid(
                "ioengine=null has no device: give --size".into(),
            ));
        }
        Ok(JobSpec {
            name: self
                .name
                .clone()
                .unwrap_or_else(|| fallback_name.to_string()),
            rw: self.rw,
            rwmixread: self.rwmixread,
            block_sizes,
            iodepth: self.iodepth,
            iodepth_batch_submit: self.iodepth_batch_submit,
            iodepth_batch_complete_max: self.iodepth_batch_complete_max,
            numjobs: self.numjobs,
            runtime: self.runtime,
            time_based: self.time_based,
            size,
            size_percent,
            offset: self.offset,
            ramp_time: self.ramp_time.unwrap_or(Duration::ZERO),
            verify: self.verify,
            do_verify: self.do_verify,
            randseed: self.randseed.unwrap_or_else(|| {
                if self.randrepeat {
                    DEFAULT_SEED
                } else {
                    clock_seed()
                }
            }),
            ioengine: self.ioengine,
            filename,
            direct: self.direct,
            pool: PoolSettings {
                dma: self.dma,
                dma_threshold: self.dma_threshold,
                min: self.pool_min,
                max: self.pool_max,
                chunk: self.pool_chunk,
                completion: self.completion,
                data_pointer: self.nvme_data_pointer,
            },
            group_reporting: self.group_reporting,
            stonewall: self.stonewall,
            new_group: self.new_group,
            wait_for: self.wait_for.clone(),
            norandommap: self.norandommap,
            fixedbufs: self.fixedbufs,
            registerfiles: self.registerfiles,
            cpus_allowed: self.cpus_allowed.clone(),
            cpus_allowed_policy: self.cpus_allowed_policy,
            thread: self.thread,
            rate: self.rate.unwrap_or([None, None]),
            rate_iops: self.rate_iops.unwrap_or([None, None]),
            loops: self.loops,
            startdelay: self.startdelay.unwrap_or(Duration::ZERO),
            offset_increment: self.offset_increment,
            verify_backlog: self.verify_backlog,
            read_iolog: self.read_iolog.clone(),
            write_iolog: self.write_iolog.clone(),
            given_options: Vec::new(),
            global_options: Vec::new(),
        })
    }
}

/// The seed used when neither `randseed` nor `randrepeat=0` says otherwise.
pub const DEFAULT_SEED: u64 = 0x7469_6465;

/// A seed that differs from run to run (`randrepeat=0`).
fn clock_seed() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    crate::workload::mix64(now.as_nanos() as u64 ^ u64::from(std::process::id()))
}

/// The one target of `filename`: fio's `a:b` lists (with `\:` escaping a colon) are refused for
/// file engines; tidepool's PCI addresses and vhost-user sockets are taken as written.
fn single_filename(name: &str, engine: EngineKind) -> Result<PathBuf, OptionError> {
    if matches!(engine, EngineKind::Tidepool | EngineKind::VhostUserBlk) {
        return Ok(PathBuf::from(name));
    }
    let mut files = vec![String::new()];
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&':') => {
                chars.next();
                if let Some(last) = files.last_mut() {
                    last.push(':');
                }
            }
            ':' => files.push(String::new()),
            other => {
                if let Some(last) = files.last_mut() {
                    last.push(other);
                }
            }
        }
    }
    files.retain(|file| !file.is_empty());
    match files.as_slice() {
        [one] => Ok(PathBuf::from(one)),
        _ => Err(OptionError::NotSupported(format!(
            "filename={name} (a list of {} files; give one file per job)",
            files.len()
        ))),
    }
}
