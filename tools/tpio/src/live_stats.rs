//! `--stats-interval`: live statistics while the jobs run, for monitoring systems.
//!
//! Every interval, and once more when the jobs have ended, a snapshot is rendered with
//! `tidepool-metrics` (the same names a library user's exporter has) and written:
//! - to `--stats-file FILE`: written to `FILE.tmp` and renamed over `FILE`, so a reader (a
//!   node_exporter textfile collector, `watch cat`) never sees half a snapshot;
//! - to stderr otherwise: Prometheus text preceded by a `# tpio stats at T s` comment line, or
//!   JSON as one line per snapshot.
//!
//! A snapshot holds tpio's own counters (`tpio_read_ios_total`, `tpio_write_ios_total`,
//! `tpio_read_bytes_total`, `tpio_write_bytes_total`: completed so far, all jobs; `tpio_jobs_running`;
//! `tpio_elapsed_seconds`) and, for every clone whose engine has a DMA pool (see
//! [`crate::engine::Engine::pool`]), that pool's `tidepool_pool_*` families labelled
//! `job="NAME",clone="N"`. Clones that share one pool (vhost-user-blk clones on one socket) show
//! it once each. Stats are read from the pools' public snapshots and tpio's progress counters,
//! never from the job threads, so writing them costs the I/O loop nothing.
//!
//! A stats file that cannot be written is a bad input: checked before any I/O (one error line).
//! Should a write fail later (disk full), one line says so on stderr and the writer stops; the
//! run goes on.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tidepool::pool::Pool;
use tidepool_metrics::{sources, Exposition, MetricsError};

use crate::options::StatsFormat;
use crate::runner::{PreparedClone, Progress};

/// How often the writer checks whether the jobs have ended while it waits for the next interval.
const POLL: Duration = Duration::from_millis(50);

/// Where and how often to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsSettings {
    /// Time between snapshots (> 0).
    pub interval: Duration,
    /// The file replaced at each snapshot; stderr when `None`.
    pub file: Option<PathBuf>,
    /// The format.
    pub format: StatsFormat,
}

/// A `--stats-file` that cannot be written, or a snapshot that could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The file (or its temporary sibling) cannot be created or renamed.
    #[error("--stats-file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// `--stats-interval 0`.
    #[error("--stats-interval must be longer than 0")]
    ZeroInterval,
    /// A metric name or label broke the exposition rules (a bug: names are fixed here).
    #[error("rendering the statistics: {0}")]
    Render(#[from] MetricsError),
}

/// One pool to report, with its labels.
#[derive(Debug, Clone)]
pub struct PoolSource {
    /// The job's name.
    pub job: String,
    /// The clone index.
    pub clone: u32,
    /// The pool (a cheap shared handle).
    pub pool: Pool,
}

/// The writer: settings plus the pools found in the prepared jobs.
#[derive(Debug)]
pub struct StatsWriter {
    settings: StatsSettings,
    pools: Vec<PoolSource>,
}

impl StatsWriter {
    /// Checks the settings (a zero interval, an unwritable file) and collects the pools of the
    /// prepared clones.
    pub fn new(
        settings: StatsSettings,
        jobs: &[Vec<PreparedClone>],
    ) -> Result<StatsWriter, StatsError> {
        if settings.interval.is_zero() {
            return Err(StatsError::ZeroInterval);
        }
        if let Some(path) = &settings.file {
            replace_file(path, b"")?;
        }
        let pools = jobs
            .iter()
            .flatten()
            .filter_map(|clone| {
                clone.engine.pool().map(|pool| PoolSource {
                    job: clone.spec.name.clone(),
                    clone: clone.clone,
                    pool,
                })
            })
            .collect();
        Ok(StatsWriter { settings, pools })
    }

    /// The pools reported.
    pub fn pools(&self) -> &[PoolSource] {
        &self.pools
    }

    /// Writes a snapshot every interval until `done` is set, then a last one.
    pub fn run(&self, progress: &Progress, started: Instant, done: &AtomicBool) {
        let mut next = started + self.settings.interval;
        loop {
            let finished = done.load(Ordering::Relaxed);
            if finished || Instant::now() >= next {
                if let Err(error) = self.write(progress, started.elapsed()) {
                    eprintln!("tpio: live statistics stopped: {error}");
                    return;
                }
                if finished {
                    return;
                }
                next += self.settings.interval;
            }
            std::thread::sleep(POLL.min(next.saturating_duration_since(Instant::now())));
        }
    }

    /// Renders one snapshot.
    pub fn snapshot(
        &self,
        progress: &Progress,
        elapsed: Duration,
    ) -> Result<Exposition, StatsError> {
        let mut metrics = Exposition::new();
        let counters = [
            (
                "tpio_read_ios_total",
                "Read I/Os completed so far, all jobs.",
                &progress.read_ios,
            ),
            (
                "tpio_write_ios_total",
                "Write I/Os completed so far, all jobs.",
                &progress.write_ios,
            ),
            (
                "tpio_read_bytes_total",
                "Bytes read so far, all jobs.",
                &progress.read_bytes,
            ),
            (
                "tpio_write_bytes_total",
                "Bytes written so far, all jobs.",
                &progress.write_bytes,
            ),
        ];
        for (name, help, value) in counters {
            metrics.counter(name, help, &[], value.load(Ordering::Relaxed))?;
        }
        metrics.gauge_int(
            "tpio_jobs_running",
            "Job clones running now.",
            &[],
            progress.running.load(Ordering::Relaxed),
        )?;
        metrics.gauge(
            "tpio_elapsed_seconds",
            "Time since the jobs started.",
            &[],
            elapsed.as_secs_f64(),
        )?;
        for source in &self.pools {
            let clone = source.clone.to_string();
            let labels = [("job", source.job.as_str()), ("clone", clone.as_str())];
            sources::pool(&mut metrics, &labels, &source.pool.stats())?;
        }
        Ok(metrics)
    }

    /// Renders and writes one snapshot.
    fn write(&self, progress: &Progress, elapsed: Duration) -> Result<(), StatsError> {
        let metrics = self.snapshot(progress, elapsed)?;
        let text = match self.settings.format {
            StatsFormat::Prometheus => metrics.to_prometheus(),
            StatsFormat::Json => {
                let mut document = metrics.to_json();
                document["elapsed_seconds"] = elapsed.as_secs_f64().into();
                let mut line = document.to_string();
                line.push('\n');
                line
            }
        };
        match &self.settings.file {
            Some(path) => replace_file(path, text.as_bytes()),
            None => {
                let mut stderr = std::io::stderr().lock();
                let header = match self.settings.format {
                    StatsFormat::Prometheus => {
                        format!("# tpio stats at {:.3} s\n", elapsed.as_secs_f64())
                    }
                    StatsFormat::Json => String::new(),
                };
                stderr
                    .write_all(header.as_bytes())
                    .and_then(|()| stderr.write_all(text.as_bytes()))
                    .map_err(|source| StatsError::File {
                        path: "stderr".into(),
                        source,
                    })
            }
        }
    }
}

/// Writes `bytes` to `PATH.tmp` and renames it over `path`.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), StatsError> {
    let error = |source| StatsError::File {
        path: path.display().to_string(),
        source,
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, bytes).map_err(error)?;
    std::fs::rename(&temporary, path).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(file: Option<PathBuf>, format: StatsFormat) -> StatsSettings {
        StatsSettings {
            interval: Duration::from_millis(20),
            file,
            format,
        }
    }

    #[test]
    fn a_zero_interval_and_an_unwritable_file_are_refused_up_front() {
        let zero = StatsSettings {
            interval: Duration::ZERO,
            ..settings(None, StatsFormat::Prometheus)
        };
        assert!(matches!(
            StatsWriter::new(zero, &[]),
            Err(StatsError::ZeroInterval)
        ));
        let missing_dir = settings(
            Some("/nonexistent-tpio-dir/stats.prom".into()),
            StatsFormat::Prometheus,
        );
        let error = StatsWriter::new(missing_dir, &[]).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("--stats-file /nonexistent-tpio-dir/stats.prom: "),
            "{error}"
        );
    }

    #[test]
    fn the_file_holds_the_latest_snapshot_and_the_last_one_after_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tpio.prom");
        let writer =
            StatsWriter::new(settings(Some(path.clone()), StatsFormat::Prometheus), &[]).unwrap();
        let progress = Progress::default();
        progress.read_ios.store(41, Ordering::Relaxed);
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let running = scope.spawn(|| writer.run(&progress, Instant::now(), &done));
            std::thread::sleep(Duration::from_millis(100));
            let early = std::fs::read_to_string(&path).unwrap();
            assert!(early.contains("tpio_read_ios_total 41\n"), "{early}");
            progress.read_ios.store(42, Ordering::Relaxed);
            done.store(true, Ordering::Relaxed);
            running.join().unwrap();
        });
        let last = std::fs::read_to_string(&path).unwrap();
        assert!(
            last.contains("# TYPE tpio_read_ios_total counter\n"),
            "{last}"
        );
        assert!(last.contains("tpio_read_ios_total 42\n"), "{last}");
        assert!(!dir.path().join("tpio.prom.tmp").exists());
    }

    #[test]
    fn json_snapshots_carry_the_elapsed_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tpio.json");
        let writer =
            StatsWriter::new(settings(Some(path.clone()), StatsFormat::Json), &[]).unwrap();
        let progress = Progress::default();
        progress.write_bytes.store(8192, Ordering::Relaxed);
        writer
            .write(&progress, Duration::from_millis(1500))
            .unwrap();
        let document: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(document["elapsed_seconds"], 1.5);
        let written = document["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|family| family["name"] == "tpio_write_bytes_total")
            .unwrap();
        assert_eq!(written["series"][0]["value"], 8192);
    }
}
