#!/usr/bin/env bash
# The coordinator under 2,000 simulated ranks on 250 nodes (job token and journal on), one
# node lost mid-epoch and replaced; see README.md. Extra arguments go to the load generator:
#   bash bench/coordinator_load/run.sh [--nodes 250] [--ranks-per-node 8] [--shards 100000]
#       [--epochs 2] [--heartbeat-ms 500] [--shard-ms 200] [--worker-timeout-ms 5000]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p contrail-coordinator --bins --examples
# 2,000 ranks hold 250 gRPC connections here and the coordinator as many; stay clear of 1,024.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec target/release/examples/load_gen "$@"
