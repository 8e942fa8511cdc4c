//! The `tpio` command: `tpio [OPTIONS] [JOBFILE...]` runs jobs; `tpio plot A.json ... -o out.png`
//! draws results. Errors go to stderr with exit status 1 and nothing on stdout.

use std::ffi::OsString;
use std::process::ExitCode;

use tpio::cli::{self, CliError};

/// `tpio plot ...`.
#[cfg(feature = "plot")]
fn plot(argv: &[OsString]) -> Result<i32, CliError> {
    tpio::plot::run(argv).map(|()| 0)
}

/// `tpio plot ...` in a build without plotting (the VM's static tpio).
#[cfg(not(feature = "plot"))]
fn plot(_argv: &[OsString]) -> Result<i32, CliError> {
    Err(CliError::Plot(
        "this tpio was built without the `plot` feature: plot on a host build (cargo build -p tpio)"
            .into(),
    ))
}

/// Runs the command and maps its outcome to an exit status.
fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let outcome = if argv.get(1).is_some_and(|arg| arg == "plot") {
        plot(&argv[1..])
    } else {
        cli::run(&argv)
    };
    match outcome {
        Ok(status) => ExitCode::from(status as u8),
        Err(CliError::Info(text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tpio: {error}");
            ExitCode::FAILURE
        }
    }
}
