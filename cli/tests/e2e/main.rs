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

/// Runs the `contrail` binary: (success, stdout, stderr).
fn contrail_output(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_contrail"))
        .args(args)
        .output()
        .expect("runs contrail");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
