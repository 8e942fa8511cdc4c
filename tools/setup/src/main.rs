//! tpsetup: check a host for Tidepool and bind devices to vfio-pci. See `tpsetup --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;
use tidepool_setup::{Bdf, BindOptions, Host, HugepageSize, RealKernel};

/// Prepare a host for Tidepool: IOMMU, vfio-pci bindings, hugepages.
///
/// Exit status: 0 done (status: always 0, read its "Missing" list), 1 a device or request
/// failed, 2 bad command line.
#[derive(Parser, Debug)]
#[command(name = "tpsetup", version)]
struct Cli {
    /// Print JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Read /sys, /proc, /dev and /run below DIR (tests, containers); also TPSETUP_SYSFS_ROOT.
    #[arg(long, global = true, value_name = "DIR")]
    sysfs_root: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// IOMMU and groups, NVMe/virtio devices and drivers, hugepages, memlock, /dev/vfio, and
    /// what is missing with the command that fixes it.
    Status,
    /// Give PCI functions to vfio-pci (refuses devices with mounted filesystems, swap or the
    /// root filesystem unless --force).
    Bind {
        /// Bind even if the system uses the device (its filesystems become unreachable).
        #[arg(long)]
        force: bool,
        /// PCI addresses, 0000:01:00.0 or 01:00.0.
        #[arg(value_name = "BDF", required = true)]
        bdfs: Vec<String>,
    },
    /// Give PCI functions back from vfio-pci to the kernel driver they had.
    Unbind {
        /// Unbind even while a process holds the device's /dev/vfio group open.
        #[arg(long)]
        force: bool,
        /// PCI addresses.
        #[arg(value_name = "BDF", required = true)]
        bdfs: Vec<String>,
    },
    /// Like unbind; with no BDF, every device tpsetup bound (remembered in /run/tpsetup).
    Reset {
        /// Unbind even while a process holds the device's /dev/vfio group open.
        #[arg(long)]
        force: bool,
        /// PCI addresses (default: every device tpsetup bound).
        #[arg(value_name = "BDF")]
        bdfs: Vec<String>,
    },
    /// Reserve N hugepages (of --size, system-wide or on --node).
    Hugepages {
        /// Number of pages to have reserved (0 releases them).
        #[arg(value_name = "N")]
        count: String,
        /// Page size: 2M or 1G.
        #[arg(long, default_value = "2M")]
        size: String,
        /// NUMA node (default: the system-wide pool, spread over nodes by the kernel).
        #[arg(long, value_name = "NODE")]
        node: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                print!("{e}");
                return ExitCode::SUCCESS;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                eprint!("{e}");
                return ExitCode::from(2);
            }
            // One line: clap's first, without its "error: " prefix, tips and usage.
            let text = e.render().to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut line = lines.next().unwrap_or("bad command line").to_string();
            if line.ends_with(':') {
                // "the following required arguments were not provided:" names them next.
                line = format!("{line} {}", lines.next().unwrap_or(""));
            }
            eprintln!(
                "tpsetup: {} (see tpsetup --help)",
                line.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("tpsetup: {msg}");
            ExitCode::from(2)
        }
    }
}

/// Runs the command; `Err` is a bad value on the command line (exit 2).
fn run(cli: Cli) -> Result<ExitCode, String> {
    let root = cli
        .sysfs_root
        .or_else(|| std::env::var_os("TPSETUP_SYSFS_ROOT").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/"));
    if !root.is_dir() {
        return Err(format!("--sysfs-root {}: not a directory", root.display()));
    }
    let host = Host::new(root, Box::new(RealKernel));
    match cli.command {
        Command::Status => {
            let status = host.status();
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("serializable")
                );
            } else {
                print!("{status}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bind { force, bdfs } => {
            let bdfs = parse_bdfs(&bdfs)?;
            Ok(each(&bdfs, cli.json, |b| {
                host.bind(b, BindOptions { force })
            }))
        }
        Command::Unbind { force, bdfs } => {
            let bdfs = parse_bdfs(&bdfs)?;
            Ok(each(&bdfs, cli.json, |b| {
                host.unbind(b, BindOptions { force })
            }))
        }
        Command::Reset { force, bdfs } => {
            let mut bdfs = parse_bdfs(&bdfs)?;
            if bdfs.is_empty() {
                bdfs = host.remembered();
                if bdfs.is_empty() && !cli.json {
                    println!("nothing to reset: tpsetup remembers no device it bound (/run/tpsetup is empty)");
                }
            }
            Ok(each(&bdfs, cli.json, |b| {
                host.unbind(b, BindOptions { force })
            }))
        }
        Command::Hugepages { count, size, node } => {
            let count: u64 = count.parse().map_err(|_| {
                format!("bad hugepage count '{count}': expected a whole number like 512")
            })?;
            let size = HugepageSize::parse(&size)?;
            let node = node
                .map(|n| {
                    n.parse::<u32>()
                        .map_err(|_| format!("bad NUMA node '{n}': expected a number like 0"))
                })
                .transpose()?;
            match host.set_hugepages(count, size, node) {
                Ok(out) => {
                    if cli.json {
                        println!("{}", json!({"ok": true, "hugepages": out}));
                    } else {
                        println!("{out}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    if cli.json {
                        println!("{}", json!({"ok": false, "error": e.to_string()}));
                    }
                    eprintln!("tpsetup: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

fn parse_bdfs(texts: &[String]) -> Result<Vec<Bdf>, String> {
    texts
        .iter()
        .map(|t| Bdf::parse(t).map_err(|e| e.to_string()))
        .collect()
}

/// Runs `op` on every device: text lines (notes indented below), or one JSON document with a
/// result per device. Exit 1 when any failed.
fn each(
    bdfs: &[Bdf],
    json_out: bool,
    op: impl Fn(&Bdf) -> Result<tidepool_setup::BindOutcome, tidepool_setup::Error>,
) -> ExitCode {
    let mut failed = false;
    let mut results = Vec::new();
    for bdf in bdfs {
        match op(bdf) {
            Ok(out) => {
                if json_out {
                    let mut v = serde_json::to_value(&out).expect("serializable");
                    v["ok"] = json!(true);
                    results.push(v);
                } else {
                    println!("{out}");
                    for n in &out.notes {
                        println!("  note: {n}");
                    }
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("tpsetup: {e}");
                if json_out {
                    results.push(json!({"bdf": bdf.as_str(), "ok": false, "error": e.to_string()}));
                }
            }
        }
    }
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"results": results})).expect("serializable")
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
