//! The small subcommands of `contrail`: `data synth`, `status`, `coordinator`.

use anyhow::{Context, Result};
use contrail_common::status::StatusReport;
use contrail_common::JobConfig;
use std::time::Duration;

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONTRAIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Reads a job file and applies `--set` overrides.
pub fn load_config(path: &str, overrides: &[String]) -> Result<(JobConfig, String)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading job file {path}"))?;
    let cfg = JobConfig::from_toml_with_overrides(&text, overrides)
        .with_context(|| format!("in job file {path}"))?;
    let toml = cfg.to_toml();
    Ok((cfg, toml))
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run_coordinator(path: &str, overrides: &[String]) -> Result<()> {
    let (cfg, _) = load_config(path, overrides)?;
    let code = runtime()?.block_on(contrail_coordinator::run_standalone(cfg))?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

pub fn synth(
    out: &str,
    samples: u64,
    shard_size: u64,
    image_size: u32,
    seed: u64,
    s3_endpoint: &str,
) -> Result<()> {
    let rt = runtime()?;
    let started = std::time::Instant::now();
    let summary = rt.block_on(contrail_data::synth::write_synth_dataset(
        out,
        s3_endpoint,
        samples,
        shard_size,
        image_size,
        seed,
    ))?;
    println!(
        "wrote {} samples in {} shards to {} ({:.1}s)",
        summary.samples,
        summary.shards,
        out,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Fetches `/status` from the coordinator's HTTP server.
pub async fn fetch_status(base: &str) -> Result<StatusReport> {
    let url = format!("{}/status", base.trim_end_matches('/'));
    let resp = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .with_context(|| format!("requesting {url}"))?
        .error_for_status()
        .with_context(|| format!("requesting {url}"))?;
    resp.json::<StatusReport>()
        .await
        .with_context(|| format!("parsing the JSON from {url}"))
}

pub fn status(base: &str, watch_secs: u64) -> Result<()> {
    let rt = runtime()?;
    let base = if base.contains("://") {
        base.to_string()
    } else {
        format!("http://{base}")
    };
    loop {
        let report = rt.block_on(fetch_status(&base))?;
        if watch_secs > 0 {
            // Clear the screen so the report redraws in place.
            print!("\x1b[2J\x1b[H");
        }
        println!("{}", contrail_coordinator::render_status_text(&report));
        if watch_secs == 0 || report.state.is_terminal() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(watch_secs));
    }
}

/// `contrail info`: what the linked libtorch can see. A GPU machine that prints
/// `cuda available: false` usually means libtorch_cuda was dropped at link time.
pub fn info() {
    println!("contrail {}", env!("CARGO_PKG_VERSION"));
    println!("libtorch intra-op threads: {}", tch::get_num_threads());
    println!("cuda available: {}", tch::Cuda::is_available());
    println!("cuda devices: {}", tch::Cuda::device_count());
    println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
    if tch::Cuda::is_available() {
        let t = tch::Tensor::ones([1024, 1024], (tch::Kind::Float, tch::Device::Cuda(0)));
        let s = t.matmul(&t).sum(tch::Kind::Float).double_value(&[]);
        println!("cuda matmul check: {s} (expected {})", 1024.0f64.powi(3));
    }
}
