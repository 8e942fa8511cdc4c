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

use crate::units::{parse_bool, parse_duration, parse_size, parse_size_range, SizeRange};

/// The smallest alignment any block size, offset or size must have (one 512-byte sector).
pub const SECTOR: u64 = 512;

/// A job description could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum OptionError {
    /// A value is outside what tpio accepts; the message says which and why.
    #[error("{0}")]
    Invalid(String),
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
                  Jobs of a file run one after another (fio's stonewall); numjobs clones of one job run \
                  together, one thread each. Options given on the command line override the file.\n\n\
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
}

/// How the report is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// fio's human-readable summary.
    Normal,
    /// fio's JSON layout (`--output-format=json`).
    Json,
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
    /// Linux io_uring with registered buffers and files.
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
    /// Block size (multiple of 512; k/m suffixes).
    #[arg(long, value_parser = parse_size, value_name = "SIZE", alias = "blocksize")]
    pub bs: Option<u64>,
    /// Random block sizes in MIN-MAX (multiples of 512), instead of --bs.
    #[arg(long, value_parser = parse_size_range, value_name = "MIN-MAX", alias = "blocksize_range")]
    pub bsrange: Option<SizeRange>,
    /// I/Os kept in flight per job.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16384))]
    pub iodepth: u32,
    /// Clones of this job, run together, one thread each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub numjobs: u32,
    /// Stop after this long (seconds; s/m/h suffixes).
    #[arg(long, value_parser = parse_duration, value_name = "TIME")]
    pub runtime: Option<Duration>,
    /// Keep going over the region until --runtime has passed.
    #[arg(long = "time_based", alias = "time-based", num_args = 0..=1, default_missing_value = "1",
          default_value = "0", value_parser = parse_bool, action = ArgAction::Set)]
    pub time_based: bool,
    /// Bytes of the region to work on, from --offset (default: the rest of the file or device).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub size: Option<u64>,
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
    #[arg(long, default_value_t = 0x7469_6465)]
    pub randseed: u64,
    /// I/O engine.
    #[arg(long, value_enum, default_value = "io_uring")]
    pub ioengine: EngineKind,
    /// File or block device to work on (tidepool: a PCI address; vhost-user-blk: a unix socket).
    #[arg(long, value_name = "PATH")]
    pub filename: Option<PathBuf>,
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
    /// tidepool engine: how completions are noticed (only `poll` is implemented so far).
    /// vhost-user-blk engine: `poll` busy-polls the used ring, `interrupt` sleeps on the call
    /// eventfd.
    #[arg(long, value_enum, default_value = "poll")]
    pub completion: CompletionMode,
}

/// The block sizes a job uses: one size, or a range to draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

impl BlockSizes {
    /// The largest I/O this job issues, which sizes each buffer slot.
    pub fn max(self) -> u64 {
        match self {
            BlockSizes::Fixed(size) => size,
            BlockSizes::Range { max, .. } => max,
        }
    }

    /// The smallest I/O this job issues.
    pub fn min(self) -> u64 {
        match self {
            BlockSizes::Fixed(size) => size,
            BlockSizes::Range { min, .. } => min,
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
    /// Clones.
    pub numjobs: u32,
    /// Run-time limit (after ramp).
    pub runtime: Option<Duration>,
    /// Loop until the run time has passed.
    pub time_based: bool,
    /// Region size in bytes, `None` = to the end of the target.
    pub size: Option<u64>,
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
        let block_sizes = match (self.bs, self.bsrange) {
            (_, Some(range)) => {
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
            (Some(bs), None) => {
                check_multiple("bs", bs, SECTOR)?;
                BlockSizes::Fixed(bs)
            }
            (None, None) => BlockSizes::Fixed(4096),
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
        if let Some(size) = self.size {
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
        if self.verify != VerifyKind::None
            && self.numjobs > 1
            && self.rw.read_percent(self.rwmixread) == 0
        {
            return Err(OptionError::Invalid(
                "verify with numjobs>1: the clones would overwrite each other's blocks; use separate \
                 jobs with distinct --offset instead"
                    .into(),
            ));
        }
        if self.ioengine != EngineKind::Null && self.filename.is_none() {
            return Err(OptionError::Invalid(
                "no --filename: name the file or block device to test".into(),
            ));
        }
        if self.ioengine == EngineKind::Null && self.size.is_none() {
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
            numjobs: self.numjobs,
            runtime: self.runtime,
            time_based: self.time_based,
            size: self.size,
            offset: self.offset,
            ramp_time: self.ramp_time.unwrap_or(Duration::ZERO),
            verify: self.verify,
            do_verify: self.do_verify,
            randseed: self.randseed,
            ioengine: self.ioengine,
            filename: self.filename.clone(),
            direct: self.direct,
            pool: PoolSettings {
                dma: self.dma,
                dma_threshold: self.dma_threshold,
                min: self.pool_min,
                max: self.pool_max,
                chunk: self.pool_chunk,
                completion: self.completion,
            },
        })
    }
}
