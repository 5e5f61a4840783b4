//! The coordinator under load, at CI size: 480 simulated ranks on 60 nodes drive the real
//! `contrail-coordinator` binary (token and journal on) through 2 epochs of 6,000 shards, one
//! node lost mid-epoch and replaced (`tests/load_sim/mod.rs` says how). No shard may be leased to
//! two live ranks at once and none may be lost. The 2,000-rank run is the benchmark
//! (`cargo run --release -p contrail-coordinator --example load_gen`, bench/coordinator_load).

mod load_sim;
use load_sim as load;

use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_contrail-coordinator");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_ranks_lose_a_node_and_every_shard_is_trained_once() {
    let spec = load::Load {
        nodes: 60,
        ranks_per_node: 8,
        shards: 6_000,
        epochs: 2,
        heartbeat_ms: 500,
        worker_timeout_ms: 2_000,
        shard_ms: 40,
        kill_at: 0.3,
        journal: true,
        lockstep_heartbeats: false,
    };
    let report = tokio::time::timeout(
        Duration::from_secs(150),
        load::run(&spec, BIN.as_ref(), &std::env::temp_dir()),
    )
    .await
    .expect("the simulated job ends within 150 s")
    .expect("the simulated job runs");
    report.print(&spec);
    assert!(
        report.double_leases.is_empty(),
        "shards leased to two live ranks at once: {:?}",
        &report.double_leases[..report.double_leases.len().min(5)]
    );
    assert!(
        report.lost.is_empty(),
        "{} shards never completed, e.g. {:?}",
        report.lost.len(),
        &report.lost[..report.lost.len().min(5)]
    );
    // Every shard of both epochs once; a shard the lost node was reading may be read twice
    // (its lease returned), nothing else.
    assert!(
        report.completed >= 2 * spec.shards,
        "{} completions",
        report.completed
    );
    assert!(
        report.duplicate_completions <= spec.ranks_per_node * 2,
        "{} shards completed twice",
        report.duplicate_completions
    );
    assert!(
        report.loss_to_regroup_s.is_finite(),
        "the survivors never regrouped after the node's loss"
    );
    assert_eq!(
        report.coordinator_exit,
        Some(0),
        "the coordinator ends the job finished"
    );
    assert!(report.journal_writes >= 1.0, "the journal was written");
    assert!(
        report.journal_snapshots >= 1.0 && report.journal_snapshots < report.journal_writes,
        "leases and completions go to the journal as deltas between snapshots: {} writes, {} \
         snapshots",
        report.journal_writes,
        report.journal_snapshots
    );
}
