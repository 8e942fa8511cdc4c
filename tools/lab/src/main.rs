//! `tplab`: the policy lab's command line (see the `tidepool_lab` crate doc).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tidepool_lab::policy::Base;
use tidepool_lab::report::{
    report, report_traces, report_traces_with, run_workload_with, Described, ReportOptions,
};
use tidepool_lab::run::RunOptions;
use tidepool_lab::trace::Trace;
use tidepool_lab::{capture, coco, demo, growth, nvme, sweep, vhost, workload};

/// Tidepool's policy lab: static swiotlb vs SWIOTLB_DYNAMIC vs throttling vs Tidepool, on the
/// real pool with an in-process device model.
#[derive(Parser)]
#[command(name = "tplab", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every built-in workload under every policy; write results.md, results.json and plots.
    Report {
        /// Output directory.
        #[arg(long, default_value = "target/lab")]
        out: PathBuf,
        /// Workload seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Workload length factor (1.0 = the published lengths).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Back chunks with 2 MiB hugepages (falls back to locked 4 KiB pages).
        #[arg(long)]
        hugepages: bool,
        /// Only these workloads (repeatable); default all.
        #[arg(long = "workload")]
        workloads: Vec<String>,
    },
    /// Frontier sweep: each policy over its own knobs, per workload; writes sweep.md,
    /// sweep.json and frontier_NAME.png (memory vs p99 / p99.9 map latency).
    Sweep {
        /// Output directory.
        #[arg(long, default_value = "target/lab-sweep")]
        out: PathBuf,
        #[command(flatten)]
        generation: Generation,
        /// Back chunks with 2 MiB hugepages (falls back to locked 4 KiB pages).
        #[arg(long)]
        hugepages: bool,
        /// Built-in workloads (repeatable); default steady, bursty, network, multi.
        #[arg(long = "workload")]
        workloads: Vec<String>,
        /// CSV traces to sweep as well (repeatable).
        #[arg(long = "trace")]
        traces: Vec<PathBuf>,
    },
    /// Convert a captured block I/O trace (ftrace / perf script block_rq_issue +
    /// block_rq_complete, or blkparse D/C lines) into a CSV trace for `replay`.
    Convert {
        /// The capture (text).
        capture: PathBuf,
        /// The CSV trace to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// The demo: one bursty load on a pool that starts at 2 MiB and grows (tidepool) and on a
    /// fixed 2 MiB pool whose maps fail when full; prints a timeline, saves a plot.
    Demo {
        /// Output directory (demo_timeline.png, demo.json).
        #[arg(long, default_value = "target/lab-demo")]
        out: PathBuf,
        /// Load seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Replay workloads through the vhost-user-blk data plane against qemu-storage-daemon
    /// (started per run) under every policy; the same table as `report`, with I/O latency.
    VhostReplay {
        /// Output directory.
        #[arg(long, default_value = "target/lab-vhost")]
        out: PathBuf,
        #[command(flatten)]
        replayed: Replayed,
        /// Throttle the daemon to this many MB/s (10^6 B/s), reads + writes; 0 = unthrottled.
        #[arg(long, default_value_t = 400)]
        mbps: u64,
        /// Image size, MiB.
        #[arg(long, default_value_t = 256)]
        image_mib: u64,
        /// Directory for the daemon's image, socket and log.
        #[arg(long, default_value = "/tmp/tplab-vhost")]
        dir: PathBuf,
        /// Back chunks with 2 MiB hugepages.
        #[arg(long)]
        hugepages: bool,
    },
    /// Replay workloads through the NVMe driver on a controller bound to vfio-pci (opened
    /// afresh per run, its pool made from each policy) under every policy; the same table as
    /// `report`, with I/O latency. In the test VM: the VM test `lab_nvme_replay`.
    NvmeReplay {
        /// The controller's PCI address (bound to vfio-pci), e.g. 0000:00:04.0.
        #[arg(long)]
        bdf: String,
        /// Output directory.
        #[arg(long, default_value = "target/lab-nvme")]
        out: PathBuf,
        #[command(flatten)]
        replayed: Replayed,
        /// The I/O queue's depth.
        #[arg(long, default_value_t = 256)]
        queue_depth: u32,
        /// Back chunks with 2 MiB hugepages.
        #[arg(long)]
        hugepages: bool,
    },
    /// Growth speed: low-watermark crossing → usable chunk, and a burst's new capacity per
    /// second, per view, page size (4 KiB, 2 MiB, 1 GiB) and chunk size.
    Growth {
        /// Output directory (growth.md, growth.json).
        #[arg(long, default_value = "target/lab-growth")]
        out: PathBuf,
        /// Rounds per combination.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Burst size, MiB.
        #[arg(long, default_value_t = 64)]
        burst_mib: u64,
        /// Also through the vhost-user view against qemu-storage-daemon (ADD_MEM_REG included).
        #[arg(long)]
        vhost: bool,
        /// Directory for the daemon's image, socket and log (with --vhost).
        #[arg(long, default_value = "/tmp/tplab-growth")]
        dir: PathBuf,
        /// `PoolConfig::growth_threads` settings to compare (repeatable; 0 = one per CPU,
        /// 1 = one chunk at a time); default 1 and 0, alternating ABBA.
        #[arg(long = "threads")]
        threads: Vec<usize>,
        /// Only these page sizes (repeatable: 4K, 2M, 1G); default all.
        #[arg(long = "page")]
        pages: Vec<String>,
        /// Only these chunk sizes, MiB (repeatable; default 2, 8, 32 and 1024 for 1G pages).
        #[arg(long = "chunk-mib")]
        chunk_mib: Vec<usize>,
        /// Skip the identity view (with --vhost: only the vhost-user rows).
        #[arg(long)]
        no_identity: bool,
    },
    /// CoCo scale: Linux's confidential-VM swiotlb (6 % of memory, at most 1 GiB) against
    /// tidepool on the `coco` multi-device workload.
    Coco {
        /// Output directory (coco.md, coco.json).
        #[arg(long, default_value = "target/lab-coco")]
        out: PathBuf,
        /// Guest memory sizes, GiB (repeatable); default 4 and 16.
        #[arg(long = "vm-gib")]
        vm_gib: Vec<u64>,
        /// The workload (`coco` or `coco-cloud`, or any built-in).
        #[arg(long, default_value = "coco")]
        workload: String,
        #[command(flatten)]
        generation: Generation,
    },
    /// A few tidepool knob sets and the static pool on one workload, repeated in alternating
    /// order: medians and every round (for ranking frontier points on a noisy host).
    Tune {
        /// Output directory (tune.md, tune.json).
        #[arg(long, default_value = "target/lab-tune")]
        out: PathBuf,
        /// A built-in workload.
        #[arg(long, default_value = "bursty")]
        workload: String,
        /// A CSV trace instead of a built-in workload.
        #[arg(long)]
        trace: Option<PathBuf>,
        /// Tidepool knob sets as `tplab sweep` labels them (repeatable), e.g.
        /// `low=4M,halflife=0ms`; `default` for the lab's default.
        #[arg(long = "knobs", required = true)]
        knobs: Vec<String>,
        /// The static pool's size, MiB (default: found by the static search).
        #[arg(long)]
        static_mib: Option<u64>,
        /// Rounds.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        #[command(flatten)]
        generation: Generation,
        /// Back chunks with 2 MiB hugepages (falls back to locked 4 KiB pages).
        #[arg(long)]
        hugepages: bool,
        /// Also write every run's memory samples (samples_CONFIG_roundN.csv; config 0 is
        /// static).
        #[arg(long)]
        samples: bool,
    },
    /// Rewrite a sweep's sweep.md and frontier plots from its sweep.json.
    SweepReplot {
        /// The sweep.json.
        json: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// The page size the sweep ran with, for the text.
        #[arg(long, default_value = "4 KiB locked")]
        pages: String,
    },
    /// Write the built-in workloads as CSV traces (the replay format).
    Generate {
        /// Output directory.
        #[arg(long, default_value = "target/lab/traces")]
        out: PathBuf,
        #[command(flatten)]
        generation: Generation,
    },
    /// Replay a CSV trace (time_us,size,direction,hold_us,may_wait[,device]) under every policy.
    Replay {
        /// The trace file.
        trace: PathBuf,
        /// Output directory.
        #[arg(long, default_value = "target/lab-replay")]
        out: PathBuf,
        /// Back chunks with 2 MiB hugepages.
        #[arg(long)]
        hugepages: bool,
    },
}

/// How built-in workloads are generated.
#[derive(clap::Args)]
struct Generation {
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Workload length factor.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
}

/// What `vhost-replay` and `nvme-replay` replay.
#[derive(clap::Args)]
struct Replayed {
    /// Built-in workloads (repeatable); default bursty and multi.
    #[arg(long = "workload")]
    workloads: Vec<String>,
    /// CSV traces to replay as well (repeatable).
    #[arg(long = "trace")]
    traces: Vec<PathBuf>,
    #[command(flatten)]
    generation: Generation,
}

impl Replayed {
    /// The built-in workloads to replay: those named, or bursty and multi when neither a
    /// workload nor a trace is named.
    fn builtin(&self) -> Vec<String> {
        if self.workloads.is_empty() && self.traces.is_empty() {
            vec!["bursty".to_string(), "multi".to_string()]
        } else {
            self.workloads.clone()
        }
    }
}

fn main() -> ExitCode {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let result = match Cli::parse().cmd {
        Cmd::Report {
            out,
            seed,
            scale,
            hugepages,
            workloads,
        } => {
            let workloads = if workloads.is_empty() {
                workload::WORKLOADS.map(String::from).to_vec()
            } else {
                workloads
            };
            let opts = ReportOptions {
                out: out.clone(),
                seed,
                scale,
                hugepages,
                workloads,
                run: RunOptions::default(),
            };
            report(&opts, command).map(|_| out)
        }
        Cmd::Sweep {
            out,
            generation: Generation { seed, scale },
            hugepages,
            workloads,
            traces,
        } => (|| {
            let builtin = if workloads.is_empty() && traces.is_empty() {
                workload::WORKLOADS.map(String::from).to_vec()
            } else {
                workloads
            };
            let named = workload::named_traces(&builtin, &traces, seed, scale)?;
            let (_, choice) =
                sweep::sweep(&out, named, hugepages, &RunOptions::default(), command)?;
            eprintln!(
                "default chosen: {} ({})",
                choice.chosen.as_deref().unwrap_or("none"),
                choice.why
            );
            Ok(out.clone())
        })(),
        Cmd::Convert { capture, out } => (|| {
            let text = std::fs::read_to_string(&capture)
                .map_err(|e| format!("reading {}: {e}", capture.display()))?;
            let (t, stats) = capture::convert(&text).map_err(|e| e.to_string())?;
            t.save(&out).map_err(|e| e.to_string())?;
            eprintln!(
                "wrote {}: {} requests on {} device(s), {:.1} s; {stats:?}",
                out.display(),
                t.requests.len(),
                t.devices.len(),
                t.span_us() as f64 / 1e6
            );
            Ok(out.clone())
        })(),
        Cmd::Demo { out, seed } => (|| {
            let r = demo::run_demo(&out, seed)?;
            if r.story_holds {
                Ok(out.clone())
            } else {
                Err(format!(
                    "the demo's story did not hold this time (see the timeline above and {})",
                    out.join("demo.json").display()
                ))
            }
        })(),
        Cmd::VhostReplay {
            out,
            replayed,
            mbps,
            image_mib,
            dir,
            hugepages,
        } => (|| {
            let Generation { seed, scale } = replayed.generation;
            let named = workload::named_traces(&replayed.builtin(), &replayed.traces, seed, scale)?;
            let backend = vhost::BackendOptions {
                dir,
                image_bytes: image_mib << 20,
                bps: (mbps > 0).then_some(mbps * 1_000_000),
            };
            let opts = ReportOptions {
                out: out.clone(),
                seed,
                scale,
                hugepages,
                workloads: named.iter().map(|n| n.0.clone()).collect(),
                run: RunOptions::default(),
            };
            let how = Described {
                devices: format!(
                    "Devices are **real**: the vhost-user-blk driver against qemu-storage-daemon \
                     (file image, io_uring{}), one fresh daemon per run; the pool is on the \
                     driver's VhostUserView (chunks are ADD_MEM_REG regions).",
                    if mbps > 0 {
                        format!(", throttled to {mbps} MB/s")
                    } else {
                        String::new()
                    }
                ),
                latency: "I/O (pool wait + device)".into(),
            };
            report_traces_with(&opts, named, command, how, |name, trace| {
                // The daemon takes 32 memory regions (one per chunk): 4 MiB chunks and a
                // 30-chunk cap keep every policy within them.
                let base = Base {
                    chunk_bytes: 4 << 20,
                    cap_bytes: 120 << 20,
                    ..Base::for_trace(trace.max_size(), hugepages)
                };
                run_workload_with(name, trace, base, |t, config, stop| {
                    vhost::replay(t, config, &backend, stop)
                })
            })
            .map(|_| out.clone())
        })(),
        Cmd::NvmeReplay {
            bdf,
            out,
            replayed,
            queue_depth,
            hugepages,
        } => {
            let opts = nvme::NvmeReportOptions {
                nvme: nvme::NvmeOptions::vfio(&bdf, queue_depth),
                out: out.clone(),
                workloads: replayed.builtin(),
                traces: replayed.traces,
                seed: replayed.generation.seed,
                scale: replayed.generation.scale,
                hugepages,
            };
            nvme::report(&opts, command).map(|_| out)
        }
        Cmd::Growth {
            out,
            rounds,
            burst_mib,
            vhost,
            dir,
            threads,
            pages,
            chunk_mib,
            no_identity,
        } => (|| {
            use tidepool::memory::PageSize;
            std::fs::create_dir_all(&out)
                .map_err(|e| format!("creating {}: {e}", out.display()))?;
            const M: usize = 1 << 20;
            let threads = if threads.is_empty() {
                vec![1, 0]
            } else {
                threads
            };
            let page_ok = |p: PageSize| {
                let name = match p {
                    PageSize::Small4K => "4K",
                    PageSize::Huge2M => "2M",
                    PageSize::Huge1G => "1G",
                };
                pages.is_empty() || pages.iter().any(|x| x.eq_ignore_ascii_case(name))
            };
            for p in &pages {
                if !["4K", "2M", "1G"].iter().any(|n| p.eq_ignore_ascii_case(n)) {
                    return Err(format!("--page {p:?}: expected 4K, 2M or 1G"));
                }
            }
            let chunk_ok = |c: usize| chunk_mib.is_empty() || chunk_mib.contains(&(c / M));
            let mut combos: Vec<(PageSize, usize, u64)> = Vec::new();
            for page in [PageSize::Small4K, PageSize::Huge2M] {
                for chunk in [2 * M, 8 * M, 32 * M] {
                    combos.push((page, chunk, burst_mib << 20));
                }
            }
            combos.push((PageSize::Huge1G, 1 << 30, 1 << 30));
            combos.retain(|&(p, c, _)| page_ok(p) && chunk_ok(c));
            if combos.is_empty() {
                return Err("no page size and chunk size left to measure".into());
            }
            let mut rows = Vec::new();
            if !no_identity {
                for &(page, chunk, burst) in &combos {
                    let r = growth::measure(
                        "identity",
                        &mut growth::identity_view,
                        page,
                        chunk,
                        burst,
                        rounds,
                        &threads,
                    );
                    eprintln!("{r:?}");
                    rows.extend(r);
                }
            }
            if vhost {
                let mut daemons = Vec::new();
                let mut n = 0;
                let mut make =
                    || -> Result<std::sync::Arc<dyn tidepool::share::DeviceView>, String> {
                        n += 1;
                        daemons.clear();
                        let b = vhost::Backend::start(&vhost::BackendOptions {
                            dir: dir.join(format!("d{n}")),
                            image_bytes: 64 << 20,
                            bps: None,
                        })?;
                        // The socket file appears at bind(), a moment before listen():
                        // a refused connection is retried for up to a second.
                        let mut tries = 0;
                        let conn = loop {
                            match tidepool_vhost_user_blk::Connection::connect(
                                b.socket(),
                                &Default::default(),
                            ) {
                                Ok(c) => break c,
                                Err(e) if tries < 100 && e.to_string().contains("refused") => {
                                    tries += 1;
                                    std::thread::sleep(std::time::Duration::from_millis(10));
                                }
                                Err(e) => return Err(e.to_string()),
                            }
                        };
                        daemons.push(b);
                        Ok(std::sync::Arc::new(
                            tidepool_vhost_user_blk::VhostUserView::new(
                                conn,
                                tidepool_vhost_user_blk::ViewOptions::new(),
                            ),
                        ))
                    };
                for &(page, chunk, burst) in combos.iter().filter(|c| c.1 < 1 << 30) {
                    // 31 regions: keep the burst within them.
                    let burst = burst.min(24 * chunk as u64);
                    let r = growth::measure(
                        "vhost-user",
                        &mut make,
                        page,
                        chunk,
                        burst,
                        rounds,
                        &threads,
                    );
                    eprintln!("{r:?}");
                    rows.extend(r);
                }
            }
            let json = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
            std::fs::write(out.join("growth.json"), json).map_err(|e| e.to_string())?;
            let md = growth::markdown(&rows, &command);
            print!("{md}");
            std::fs::write(out.join("growth.md"), md).map_err(|e| e.to_string())?;
            Ok(out.clone())
        })(),
        Cmd::Coco {
            out,
            vm_gib,
            generation: Generation { seed, scale },
            workload,
        } => (|| {
            std::fs::create_dir_all(&out)
                .map_err(|e| format!("creating {}: {e}", out.display()))?;
            let vm_gib = if vm_gib.is_empty() {
                vec![4, 16]
            } else {
                vm_gib
            };
            let t = workload::generate(&workload, seed, scale).ok_or_else(|| {
                format!(
                    "unknown workload {workload:?}; built-in: {:?}",
                    workload::ALL_WORKLOADS
                )
            })?;
            eprintln!("coco: {} requests", t.requests.len());
            let rows =
                coco::compare(&t, &vm_gib, &RunOptions::default()).map_err(|e| e.to_string())?;
            let json = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
            std::fs::write(out.join("coco.json"), json).map_err(|e| e.to_string())?;
            let md = coco::markdown(&rows, &command, &workload, t.requests.len());
            print!("{md}");
            std::fs::write(out.join("coco.md"), md).map_err(|e| e.to_string())?;
            Ok(out.clone())
        })(),
        Cmd::Tune {
            out,
            workload: name,
            trace,
            knobs,
            static_mib,
            repeat,
            generation: Generation { seed, scale },
            hugepages,
            samples,
        } => (|| {
            let knobs = knobs
                .iter()
                .map(|k| tidepool_lab::policy::Knobs::parse(k).map_err(|e| format!("--knobs: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            let (name, t) = match trace {
                Some(path) => (
                    workload::trace_name(&path),
                    Trace::load(&path).map_err(|e| e.to_string())?,
                ),
                None => {
                    let t = workload::generate(&name, seed, scale).ok_or_else(|| {
                        format!(
                            "unknown workload {name:?}; built-in: {:?}",
                            workload::ALL_WORKLOADS
                        )
                    })?;
                    (name, t)
                }
            };
            std::fs::create_dir_all(&out)
                .map_err(|e| format!("creating {}: {e}", out.display()))?;
            let rows = tidepool_lab::tune::tune(
                &t,
                hugepages,
                &knobs,
                static_mib.map(|m| m << 20),
                repeat,
                &RunOptions::default(),
                samples.then_some(out.as_path()),
            )
            .map_err(|e| e.to_string())?;
            let json = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
            std::fs::write(out.join("tune.json"), json).map_err(|e| e.to_string())?;
            let md = tidepool_lab::tune::markdown(&rows, &command, &name);
            print!("{md}");
            std::fs::write(out.join("tune.md"), md).map_err(|e| e.to_string())?;
            Ok(out.clone())
        })(),
        Cmd::SweepReplot { json, out, pages } => {
            sweep::replot(&json, &out, command, &pages).map(|c| {
                eprintln!("default chosen: {:?} ({})", c.chosen, c.why);
                out.clone()
            })
        }
        Cmd::Generate {
            out,
            generation: Generation { seed, scale },
        } => (|| {
            std::fs::create_dir_all(&out)
                .map_err(|e| format!("creating {}: {e}", out.display()))?;
            for name in workload::ALL_WORKLOADS {
                let t = workload::generate(name, seed, scale).expect("built-in workload");
                let path = out.join(format!("{name}.csv"));
                t.save(&path).map_err(|e| e.to_string())?;
                eprintln!("wrote {} ({} requests)", path.display(), t.requests.len());
            }
            Ok(out.clone())
        })(),
        Cmd::Replay {
            trace,
            out,
            hugepages,
        } => (|| {
            let t = Trace::load(&trace).map_err(|e| e.to_string())?;
            let name = workload::trace_name(&trace);
            let opts = ReportOptions {
                out: out.clone(),
                seed: 0,
                scale: 1.0,
                hugepages,
                workloads: vec![name.clone()],
                run: RunOptions::default(),
            };
            report_traces(&opts, vec![(name, t)], command).map(|_| out.clone())
        })(),
    };
    match result {
        Ok(out) => {
            eprintln!("done: see {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tplab: {e}");
            ExitCode::FAILURE
        }
    }
}
