//! tpio: a fio-like block I/O benchmark for Tidepool.
//!
//! tpio speaks fio's language: the same option names (`--rw`, `--bs`, `--iodepth`, `--runtime`,
//! `--verify`, ...), fio's ini job files, fio's human summary and fio's JSON field names, so
//! scripts and plotting tools written for fio work on tpio's output. What it adds is a pluggable
//! [`engine::Engine`] seam so the Tidepool userspace NVMe driver can be measured with the same
//! workloads as the kernel's io_uring path ([`engine::tidepool`]).
//!
//! Module map: [`units`] (fio's number syntax), [`options`] (clap options → [`options::JobSpec`]),
//! [`jobfile`] (ini job files), [`engine`] (the trait; io_uring, null, tidepool and vhost-user-blk engines), [`workload`]
//! (offsets, order, direction), [`verify`] (block headers and checks), [`stats`] (latency
//! statistics), [`runner`] (the per-thread I/O loop), [`report`] (normal and JSON output),
//! [`plot`] (PNG/SVG charts of JSON results), [`cli`] (gluing it together).

pub mod affinity;
pub mod blockdev;
pub mod cli;
pub mod engine;
pub mod jobfile;
pub mod live_stats;
pub mod options;
#[cfg(feature = "plot")]
pub mod plot;
pub mod report;
pub mod runner;
pub mod session;
pub mod stats;
pub mod units;
pub mod uring;
pub mod verify;
pub mod workload;
