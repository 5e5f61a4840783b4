//! `contrail`: the user-facing command. Thin: every subcommand calls into the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use contrail_worker::{cli_support, local_cluster, runtime};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "contrail",
    version,
    about = "Distributed contrastive training (SimCLR, ...)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a coordinator and N worker processes on this machine (writes the synthetic dataset
    /// first if the configured data URL holds no shards).
    Local {
        /// Worker processes to start (sets cluster.world_size).
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// Job file (TOML).
        #[arg(long)]
        config: String,
        /// Override a config key, e.g. `--set train.max_steps=50` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Show the workers' info-level logs (otherwise only warnings and rank 0's progress lines).
        #[arg(long)]
        verbose: bool,
    },
    /// Run one worker: register with the coordinator, train, leave.
    Worker {
        /// gRPC address of the coordinator.
        #[arg(long, env = "CONTRAIL_COORDINATOR")]
        coordinator: String,
        /// Address for the collective backend to listen on (port 0: any free port). Must be
        /// reachable by the other workers.
        #[arg(long, env = "CONTRAIL_COLLECTIVE_BIND", default_value = "127.0.0.1:0")]
        bind: String,
        /// Seconds to keep trying to reach the coordinator at start-up.
        #[arg(long, default_value_t = 120)]
        connect_wait_secs: u64,
        /// libtorch intra-op threads (0: libtorch's default, one per core). Set it to
        /// cores ÷ workers when several workers share a machine.
        #[arg(long, env = "CONTRAIL_TORCH_THREADS", default_value_t = 0)]
        threads: i32,
    },
    /// Run the coordinator alone (same as the `contrail-coordinator` binary).
    Coordinator {
        #[arg(long)]
        config: String,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Print what this build of contrail sees: libtorch threads, CUDA devices, cuDNN.
    Info,
    /// Datasets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Print a running job's status (from the coordinator's HTTP endpoint).
    Status {
        /// Base URL of the coordinator's status server, e.g. http://127.0.0.1:8080.
        #[arg(long, env = "CONTRAIL_STATUS_URL")]
        coordinator: String,
        /// Refresh every N seconds until the job ends (0: print once).
        #[arg(long, default_value_t = 0)]
        watch: u64,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write the built-in synthetic image-caption dataset as WebDataset shards.
    Synth {
        /// Destination URL (file://, s3://, gs://, az://, or a plain path).
        #[arg(long)]
        out: String,
        #[arg(long, default_value_t = 4096)]
        samples: u64,
        #[arg(long, default_value_t = 256)]
        shard_size: u64,
        /// Side of the square JPEGs.
        #[arg(long, default_value_t = 64)]
        image_size: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Endpoint override for S3-compatible servers.
        #[arg(long, default_value = "")]
        s3_endpoint: String,
    },
}

fn main() {
    cli_support::init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Local {
            workers,
            config,
            overrides,
            verbose,
        } => local_cluster::run_local(&config, workers, &overrides, verbose),
        Command::Worker {
            coordinator,
            bind,
            connect_wait_secs,
            threads,
        } => runtime::run_worker(&runtime::WorkerOptions {
            torch_threads: threads,
            coordinator,
            collective_bind: bind,
            connect_wait: Duration::from_secs(connect_wait_secs),
        }),
        Command::Coordinator { config, overrides } => {
            cli_support::run_coordinator(&config, &overrides)
        }
        Command::Data {
            command:
                DataCommand::Synth {
                    out,
                    samples,
                    shard_size,
                    image_size,
                    seed,
                    s3_endpoint,
                },
        } => cli_support::synth(&out, samples, shard_size, image_size, seed, &s3_endpoint),
        Command::Status { coordinator, watch } => cli_support::status(&coordinator, watch),
        Command::Info => {
            cli_support::info();
            Ok(())
        }
    };
    if let Err(e) = result.context("contrail failed") {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
