//! contrail-cli: the `contrail` command. It puts the other crates together; each subcommand is
//! a thin call into one of them.
//!
//! - [`args`]: every subcommand and flag.
//! - [`local_cluster`]: `contrail local`, a coordinator process and M node-worker processes.
//! - [`node_worker`]: `contrail worker`, the node worker and its rank processes.
//! - [`status_client`]: `contrail status`, the coordinator's `/status` for people.
//! - [`k8s`]: `contrail k8s render|launch|delete` (the `contrail-k8s` crate).
//! - [`eval`]: `contrail eval knn|linear|retrieval` over embedding folders.
//! - [`commands`]: `coordinator`, `data synth`, `info`, and the process set-up they share.
//!
//! Each rank process is `contrail_worker::process::run_worker`, on the runtime made here.

pub mod args;
pub mod audit;
pub mod commands;
pub mod eval;
pub mod export;
pub mod k8s;
pub mod local_cluster;
pub mod node_worker;
pub mod status_client;
