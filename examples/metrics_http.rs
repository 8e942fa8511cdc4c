//! Serves a pool's statistics over HTTP for a Prometheus scraper.
//!
//! ```text
//! cargo run -p tidepool-examples --example metrics_http -- [ADDR] [--nvme BDF] [--requests N]
//! curl http://127.0.0.1:9187/metrics        # Prometheus text exposition 0.0.4
//! curl http://127.0.0.1:9187/metrics.json   # the same families as JSON
//! ```
//!
//! With `--nvme BDF` it opens that NVMe controller (bound to `vfio-pci`, see
//! `nvme_identify`) and exports its pool and its admin queue's counters. Without it, it makes a
//! demonstration pool on the identity view (no device: nothing is mapped for DMA) and a thread
//! that keeps allocating and freeing buffers, sometimes more than the pool holds, so growth,
//! waits and timeouts show up in the numbers. `--requests N` stops after N requests (tests).
//!
//! A Prometheus scrape configuration for it:
//! ```text
//! scrape_configs:
//!   - job_name: tidepool
//!     static_configs: [{ targets: ["127.0.0.1:9187"] }]
//! ```

use std::sync::Arc;
use std::time::Duration;

use tidepool::memory::{MemoryConfig, PageSize};
use tidepool::pool::{Pool, PoolConfig};
use tidepool::share::identity::Identity;
use tidepool_metrics::{sources, Exposition, MetricsError};
use tidepool_nvme::{Controller, ControllerConfig};

/// What the example exports.
enum Source {
    /// A demonstration pool.
    Demo(Pool),
    /// A real controller.
    Nvme { bdf: String, ctrl: Controller },
}

impl Source {
    /// One snapshot of everything exported.
    fn snapshot(&self) -> Result<Exposition, MetricsError> {
        let mut metrics = Exposition::new();
        match self {
            Source::Demo(pool) => sources::pool(&mut metrics, &[("pool", "demo")], &pool.stats())?,
            Source::Nvme { bdf, ctrl } => {
                sources::pool(&mut metrics, &[("controller", bdf)], &ctrl.pool_stats())?;
            }
        }
        Ok(metrics)
    }
}

/// A pool of 4 KiB pages that can grow from 1 to 4 chunks of 1 MiB.
fn demo_pool() -> Pool {
    let config = PoolConfig {
        memory: MemoryConfig {
            page_size: PageSize::Small4K,
            allow_small_pages: true,
        },
        chunk_bytes: 1 << 20,
        prefill_bytes: 1 << 20,
        max_bytes: 4 << 20,
        max_buffer: 256 << 10,
        low_watermark: 256 << 10,
        high_watermark: 2 << 20,
        reserve_bytes: 0,
        ..PoolConfig::default()
    };
    Pool::new(Arc::new(Identity::new()), config).expect("a pool of small pages")
}

/// Allocates and frees forever: bursts that outgrow the pool, then a lull so it shrinks.
fn churn(pool: Pool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        loop {
            let mut held = Vec::new();
            for _ in 0..20 {
                // 20 x 256 KiB wants 5 MiB of a 4 MiB pool: the last ones wait and time out.
                if let Ok(buffer) = pool
                    .alloc_timeout(256 << 10, Duration::from_millis(50))
                    .await
                {
                    held.push(buffer);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(held);
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut addr = "127.0.0.1:9187".to_string();
    let mut bdf = None;
    let mut requests = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--nvme" => bdf = args.next(),
            "--requests" => requests = args.next().and_then(|n| n.parse::<usize>().ok()),
            _ => addr = arg,
        }
    }
    let source = match bdf {
        Some(bdf) => match Controller::open(&bdf, ControllerConfig::default()) {
            Ok(ctrl) => Source::Nvme { bdf, ctrl },
            Err(error) => {
                eprintln!("metrics_http: cannot open {bdf}: {error}");
                std::process::exit(1);
            }
        },
        None => {
            let pool = demo_pool();
            let churned = pool.clone();
            std::thread::spawn(move || churn(churned));
            Source::Demo(pool)
        }
    };
    let server = match tiny_http::Server::http(&addr) {
        Ok(server) => server,
        Err(error) => {
            eprintln!("metrics_http: cannot listen on {addr}: {error}");
            std::process::exit(1);
        }
    };
    eprintln!("metrics_http: serving http://{addr}/metrics and /metrics.json");
    for (served, request) in server.incoming_requests().enumerate() {
        let response = match (request.method(), request.url()) {
            (tiny_http::Method::Get, "/metrics") => source.snapshot().map(|m| {
                (
                    m.to_prometheus(),
                    "text/plain; version=0.0.4; charset=utf-8",
                    200,
                )
            }),
            (tiny_http::Method::Get, "/metrics.json") => source
                .snapshot()
                .map(|m| (m.to_json().to_string(), "application/json", 200)),
            _ => Ok(("not found: try /metrics\n".to_string(), "text/plain", 404)),
        };
        let (body, content_type, status) = response
            .unwrap_or_else(|error| (format!("rendering failed: {error}\n"), "text/plain", 500));
        let header =
            tiny_http::Header::from_bytes("Content-Type", content_type).expect("a valid header");
        let reply = tiny_http::Response::from_string(body)
            .with_status_code(status)
            .with_header(header);
        if let Err(error) = request.respond(reply) {
            eprintln!("metrics_http: a response failed: {error}");
        }
        if requests.is_some_and(|limit| served + 1 >= limit) {
            break;
        }
    }
}
