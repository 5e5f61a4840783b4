//! The end-to-end suite: the `contrail` binary as a user runs it (local clusters of real
//! coordinator and worker processes, `contrail status`, the status page in a browser, the
//! binary's link to libtorch_cuda, `contrail embed` in one process and over leased workers,
//! `contrail eval` on embedding folders, `contrail data index`).
//!
//! `cargo test -p contrail-cli --test e2e [FILTER]`

mod data_cli;
mod embed_cli;
mod eval_cli;
mod export_cli;
mod link;
mod local_cluster;
mod recovery;
mod status_page;
