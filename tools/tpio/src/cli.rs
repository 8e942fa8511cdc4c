//! From the command line to a list of jobs and output settings, and the whole run.
//!
//! With no job file, the command line is one job. With job files, each file section becomes a job
//! whose arguments are the file's lines followed by the command line's (minus the job-file paths),
//! so command-line options override the file (see [`crate::jobfile`]).
//!
//! Every error is returned as a [`CliError`] before anything is written to stdout; `main` prints it
//! on stderr and exits with status 1.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::io::Write;
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches};

use crate::jobfile::{self, JobFileError};
use crate::options::{CliArgs, JobSpec, OptionError, OutputFormat};
use crate::runner::{self, PrepareError};

/// Anything that stops tpio before or after the run (never a failed I/O: that is in the report).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// clap rejected the arguments; the text is clap's message.
    #[error("{0}")]
    Usage(String),
    /// `--help` or `--version`: print the text on stdout and exit 0.
    #[error("{0}")]
    Info(String),
    /// A job file is wrong.
    #[error(transparent)]
    JobFile(#[from] JobFileError),
    /// A job section's options are wrong.
    #[error("job {job}: {message}")]
    JobOptions {
        /// Section name.
        job: String,
        /// clap's or tpio's message.
        message: String,
    },
    /// An option value is out of range.
    #[error(transparent)]
    Option(#[from] OptionError),
    /// A job could not be prepared (missing file, too small, wrong alignment).
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    /// The job process could not be started or waited for.
    #[error(transparent)]
    Session(#[from] crate::session::SessionError),
    /// `--stats-interval`'s settings are unusable.
    #[error(transparent)]
    Stats(#[from] crate::live_stats::StatsError),
    /// `tpio plot` failed.
    #[error("plot: {0}")]
    Plot(String),
    /// The report could not be written.
    #[error("cannot write the report to {path}: {source}")]
    Output {
        /// Where.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Output settings that apply to the whole run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSettings {
    /// Formats in order.
    pub formats: Vec<OutputFormat>,
    /// Report file, stdout when `None`.
    pub path: Option<PathBuf>,
    /// `--parse-only`: stop after parsing.
    pub parse_only: bool,
    /// `--stats-interval` and its file and format.
    pub stats: Option<crate::live_stats::StatsSettings>,
}

/// Turns a clap error into a [`CliError`] (help/version are not errors) of one line: an unknown
/// option or an unimplemented choice of a fixed set (`ioengine=libaio`) is `not supported: ...`,
/// anything else clap's first line, never a usage dump.
fn clap_error(error: clap::Error) -> CliError {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let context = |kind| match error.get(kind) {
        Some(ContextValue::String(text)) => Some(text.clone()),
        Some(ContextValue::Strings(texts)) => Some(texts.join(", ")),
        _ => None,
    };
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => CliError::Info(error.to_string()),
        ErrorKind::UnknownArgument => {
            let arg = context(ContextKind::InvalidArg).unwrap_or_default();
            CliError::Option(OptionError::NotSupported(arg))
        }
        ErrorKind::InvalidValue if context(ContextKind::ValidValue).is_some() => {
            let arg = context(ContextKind::InvalidArg).unwrap_or_default();
            let name = arg
                .trim_start_matches('-')
                .split([' ', '='])
                .next()
                .unwrap_or_default()
                .to_string();
            let value = context(ContextKind::InvalidValue).unwrap_or_default();
            let valid = context(ContextKind::ValidValue).unwrap_or_default();
            CliError::Option(OptionError::NotSupported(format!(
                "{name}={value} (tpio has: {valid})"
            )))
        }
        _ => {
            let text = error.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ")
                .to_string();
            CliError::Usage(first)
        }
    }
}

/// The long names (and aliases) of every job option: the keys a job file may use.
pub fn job_option_names() -> Vec<String> {
    let command = CliArgs::command();
    let outputs = [
        "output-format",
        "output",
        "section",
        "parse-only",
        "stats-interval",
        "stats-file",
        "stats-format",
    ];
    command
        .get_arguments()
        .filter(|arg| arg.get_long().is_some_and(|long| !outputs.contains(&long)))
        .flat_map(|arg| {
            let mut names: Vec<String> = arg.get_long().map(str::to_string).into_iter().collect();
            names.extend(
                arg.get_all_aliases()
                    .unwrap_or_default()
                    .into_iter()
                    .map(str::to_string),
            );
            names
        })
        .filter(|name| !["help", "version"].contains(&name.as_str()))
        .collect()
}

/// The job options given on the command line, as fio echoes them: (long name, last raw value).
fn given_on_command_line(matches: &clap::ArgMatches, argv: &[OsString]) -> Vec<(String, String)> {
    use clap::parser::ValueSource;
    let command = CliArgs::command();
    let outputs = [
        "output-format",
        "output",
        "section",
        "parse-only",
        "stats_interval",
        "stats_file",
        "stats_format",
        "job_files",
    ];
    command
        .get_arguments()
        .filter(|arg| !outputs.contains(&arg.get_id().as_str()))
        .filter(|arg| matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine))
        .filter_map(|arg| {
            let name = arg.get_long()?.to_string();
            let value = matches
                .get_raw(arg.get_id().as_str())
                .and_then(|mut values| values.next_back())
                .map(|value| value.to_string_lossy().into_owned())
                .unwrap_or_default();
            let flag_given_bare = argv.iter().any(|word| {
                word.to_str()
                    .and_then(|word| word.strip_prefix("--"))
                    .is_some_and(|word| {
                        word == name || arg.get_all_aliases().unwrap_or_default().contains(&word)
                    })
            }) && arg
                .get_num_args()
                .is_some_and(|range| range.min_values() == 0);
            Some((
                name,
                if flag_given_bare {
                    String::new()
                } else {
                    value
                },
            ))
        })
        .collect()
}

/// Parses `argv` (program name first) into jobs and output settings.
pub fn parse(argv: &[OsString]) -> Result<(Vec<JobSpec>, OutputSettings), CliError> {
    let matches = CliArgs::command()
        .try_get_matches_from(argv)
        .map_err(clap_error)?;
    let cli = CliArgs::from_arg_matches(&matches).map_err(clap_error)?;
    let output = OutputSettings {
        formats: cli.output_format.clone(),
        path: cli.output.clone(),
        parse_only: cli.parse_only,
        stats: cli
            .stats_interval
            .map(|interval| crate::live_stats::StatsSettings {
                interval,
                file: cli.stats_file.clone(),
                format: cli.stats_format,
            }),
    };
    let on_command_line = given_on_command_line(&matches, argv);
    if cli.job_files.is_empty() {
        let mut spec = cli.job.resolve("job")?;
        spec.given_options = on_command_line;
        return Ok((vec![spec], output));
    }
    let positional: Vec<usize> = matches
        .indices_of("job_files")
        .map(|i| i.collect())
        .unwrap_or_default();
    let overrides: Vec<OsString> = argv
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(index, _)| !positional.contains(index))
        .map(|(_, arg)| arg.clone())
        .collect();
    let names = job_option_names();
    let known = |key: &str| names.iter().any(|name| name == key);
    let mut jobs = Vec::new();
    for path in &cli.job_files {
        for file_job in jobfile::load(path, &known, &cli.section)? {
            let mut args: Vec<OsString> = vec!["tpio".into()];
            args.extend(file_job.args.iter().map(OsString::from));
            args.extend(overrides.iter().cloned());
            let job_error = |message: String| CliError::JobOptions {
                job: file_job.name.clone(),
                message,
            };
            let parsed =
                CliArgs::try_parse_from_args(&args).map_err(|error| match clap_error(error) {
                    refused @ CliError::Option(OptionError::NotSupported(_)) => refused,
                    other => job_error(other.to_string()),
                })?;
            let mut spec = parsed
                .job
                .resolve(&file_job.name)
                .map_err(|error| match error {
                    refused @ OptionError::NotSupported(_) => CliError::Option(refused),
                    other => job_error(other.to_string()),
                })?;
            spec.given_options = file_job.options.clone();
            spec.given_options.extend(on_command_line.iter().cloned());
            spec.global_options = file_job.globals.clone();
            jobs.push(spec);
        }
    }
    Ok((jobs, output))
}

impl CliArgs {
    /// Parses a synthetic argument list (a job file section) without exiting on error.
    fn try_parse_from_args(args: &[OsString]) -> Result<Self, clap::Error> {
        <CliArgs as clap::Parser>::try_parse_from(args)
    }
}

/// Parses, prepares, runs and reports. Returns the process exit status for a completed run
/// (0, or 1 when any job reported an error) or the error that stopped it before any output.
pub fn run(argv: &[OsString]) -> Result<i32, CliError> {
    let (specs, output) = parse(argv)?;
    if output.parse_only {
        return Ok(0);
    }
    if crate::session::wanted(&specs) {
        // Before anything is opened or any thread started: see `crate::session`.
        if let crate::session::Role::Exit(status) = crate::session::enter_own_session()? {
            return Ok(status);
        }
    }
    let prepared = runner::prepare_jobs(&specs)?;
    let show_progress = runner::status_line_wanted(
        &output.formats,
        output.path.is_some(),
        std::io::stdout().is_terminal() && std::io::stderr().is_terminal(),
    );
    let stats = output
        .stats
        .clone()
        .map(|settings| crate::live_stats::StatsWriter::new(settings, &prepared))
        .transpose()?;
    let results = runner::run_jobs(prepared, show_progress, stats.as_ref());
    let mut text = String::new();
    for format in &output.formats {
        match format {
            OutputFormat::Normal => text.push_str(&crate::report::render_normal(&results)),
            OutputFormat::Json | OutputFormat::JsonPlus => {
                let document =
                    crate::report::render_json(&results, *format == OutputFormat::JsonPlus);
                let rendered = serde_json::to_string_pretty(&document)
                    .unwrap_or_else(|error| format!("{{\"error\": \"{error}\"}}"));
                text.push_str(&rendered);
                text.push('\n');
            }
        }
    }
    match &output.path {
        Some(path) => std::fs::write(path, text).map_err(|source| CliError::Output {
            path: path.display().to_string(),
            source,
        })?,
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(|source| CliError::Output {
                    path: "stdout".into(),
                    source,
                })?;
        }
    }
    let failed = results.iter().any(|result| result.error != 0);
    Ok(i32::from(failed))
}
