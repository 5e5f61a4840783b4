//! `contrail-coordinator --config JOB.toml [--set section.key=value ...]`: runs a job's
//! coordinator standalone. Exits 0 when the job finishes, 1 when it fails, 130 on Ctrl-C.

use anyhow::Result;
use clap::Parser;
use contrail_common::config::JobConfig;

#[derive(Parser, Debug)]
#[command(
    name = "contrail-coordinator",
    about = "contrail job coordinator (gRPC + HTTP status)"
)]
struct Args {
    /// Job file (TOML).
    #[arg(long)]
    config: std::path::PathBuf,
    /// Override a key of the job file, e.g. `--set cluster.world_size=4` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// gRPC listen address (default: cluster.grpc_addr).
    #[arg(long)]
    grpc_addr: Option<String>,
    /// HTTP status listen address (default: cluster.http_addr).
    #[arg(long)]
    http_addr: Option<String>,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // stdout carries the final status report; logs go to stderr.
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("contrail-coordinator: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(args: Args) -> Result<i32> {
    let mut cfg = JobConfig::from_file(&args.config, &args.set)?;
    if let Some(a) = args.grpc_addr {
        cfg.cluster.grpc_addr = a;
    }
    if let Some(a) = args.http_addr {
        cfg.cluster.http_addr = a;
    }
    contrail_coordinator::run_standalone(cfg).await
}
