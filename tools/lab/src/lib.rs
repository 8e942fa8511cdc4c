//! Tidepool's policy lab: does awaiting maps save memory without failures on bursty loads?
//!
//! The lab replays request traces ([`trace`]: built-in seeded [`workload`]s, or your own CSV)
//! against the **real** `tidepool::pool::Pool` on the `Identity` view (real memfd chunks, real
//! copies; no device needed), configured as four policies ([`policy`]): a static swiotlb, Linux's
//! SWIOTLB_DYNAMIC, the 2024 throttling RFC, and Tidepool. Devices are an in-process model
//! ([`device`]): a clock that holds each mapping for the trace's service time, with per-device
//! queue depths. [`run`] drives one trace on a tokio runtime and samples the pool's memory;
//! [`metrics`] turns that into peak and time-averaged memory, failed maps, map latency
//! percentiles, growth events and throughput; [`report`] runs everything and writes a
//! markdown + JSON table and PNG plots ([`plot`]).
//!
//! ```text
//! cargo run --release -p tidepool-lab -- report --out target/lab
//! cargo run --release -p tidepool-lab -- generate --out traces/
//! cargo run --release -p tidepool-lab -- replay my-trace.csv --out target/lab-mine
//! ```

pub mod capture;
pub mod coco;
pub mod demo;
pub mod device;
pub mod growth;
pub mod metrics;
pub mod nvme;
pub mod plot;
pub mod policy;
pub mod replay;
pub mod report;
pub mod rng;
pub mod run;
pub mod sweep;
pub mod trace;
pub mod tune;
pub mod vhost;
pub mod workload;
