//! The coordinator load benchmark: simulated ranks (default 2,000 on 250 nodes) drive the
//! real `contrail-coordinator` binary through a job with the token and the journal on, lose a
//! node mid-epoch and replace it; prints latency per RPC kind, the coordinator's CPU and
//! memory, journal cost and the time from the node's loss to the next generation, and checks
//! that no shard was leased twice at once or lost. See bench/coordinator_load/README.md.
//!
//!   cargo build --release -p contrail-coordinator --bins --examples
//!   target/release/examples/load_gen [--nodes 250] [--ranks-per-node 8] [--shards 100000]
//!       [--epochs 2] [--heartbeat-ms 500] [--shard-ms 200] [--lockstep-heartbeats]
//!       [--no-journal] [--coordinator PATH]

#[path = "../tests/load_sim/mod.rs"]
mod load;

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 250)]
    nodes: usize,
    #[arg(long, default_value_t = 8)]
    ranks_per_node: usize,
    #[arg(long, default_value_t = 100_000)]
    shards: usize,
    #[arg(long, default_value_t = 2)]
    epochs: u32,
    #[arg(long, default_value_t = 500)]
    heartbeat_ms: u64,
    #[arg(long, default_value_t = 5_000)]
    worker_timeout_ms: u64,
    /// Simulated training time per shard.
    #[arg(long, default_value_t = 200)]
    shard_ms: u64,
    /// Lose a node once this fraction of epoch 0 is done.
    #[arg(long, default_value_t = 0.3)]
    kill_at: f64,
    /// Run the coordinator without its journal (to see what journaling costs).
    #[arg(long)]
    no_journal: bool,
    /// Every rank heartbeats at the same instants (workers before their random phase).
    #[arg(long)]
    lockstep_heartbeats: bool,
    /// The coordinator binary (default: contrail-coordinator next to this example's folder).
    #[arg(long)]
    coordinator: Option<PathBuf>,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let a = Args::parse();
    let bin = match a.coordinator {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .and_then(|examples| examples.parent())
            .context("locating the target folder")?
            .join("contrail-coordinator"),
    };
    if !bin.exists() {
        bail!(
            "{} not found: build it (`cargo build --release -p contrail-coordinator --bins`) or pass --coordinator",
            bin.display()
        );
    }
    let spec = load::Load {
        nodes: a.nodes,
        ranks_per_node: a.ranks_per_node,
        shards: a.shards,
        epochs: a.epochs,
        heartbeat_ms: a.heartbeat_ms,
        worker_timeout_ms: a.worker_timeout_ms,
        shard_ms: a.shard_ms,
        kill_at: a.kill_at,
        journal: !a.no_journal,
        lockstep_heartbeats: a.lockstep_heartbeats,
    };
    let report = load::run(&spec, &bin, &std::env::temp_dir()).await?;
    report.print(&spec);
    if !report.double_leases.is_empty() || !report.lost.is_empty() {
        bail!(
            "{} double leases, {} lost shards",
            report.double_leases.len(),
            report.lost.len()
        );
    }
    Ok(())
}
