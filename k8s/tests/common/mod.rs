#![allow(dead_code)]

use contrail_common::config::{Backend, JobConfig};
use contrail_k8s::{render, Crd, Manifest, RenderOptions};
use std::path::{Path, PathBuf};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A real job file of the repository; global_batch 256 divides by 32 × {1, 2, 8} workers.
pub fn job() -> JobConfig {
    let path = workspace_root().join("configs/local-simclr.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    JobConfig::from_toml_with_overrides(&text, &["train.global_batch=256".to_string()]).unwrap()
}

pub fn opts(crd: Crd, workers: u32, gpus: u32) -> RenderOptions {
    let mut o = RenderOptions::new("simclr-test", "ghcr.io/example/contrail:0.1.0", workers);
    o.namespace = "ml".into();
    o.crd = crd;
    o.gpus_per_worker = gpus;
    // Fixed, so that two renders of the same options are equal.
    o.job_token = Some(TEST_TOKEN.into());
    o
}

/// The job token of the rendered test jobs.
pub const TEST_TOKEN: &str = "k8s-test-job-token-0123456789";

/// Every combination the tests cover: both flavours, 1/2/8 workers, with and without GPUs,
/// and the NCCL / credential options on some.
pub fn cases() -> Vec<RenderOptions> {
    let mut out = Vec::new();
    for crd in [Crd::JobSet, Crd::None] {
        for workers in [1, 2, 8] {
            for gpus in [0, 1] {
                out.push(opts(crd, workers, gpus));
            }
        }
        let mut o = opts(crd, 4, 8);
        o.host_network = true;
        o.nccl_socket_ifname = Some("eth0".into());
        o.secret = Some("object-store-creds".into());
        o.service_account = Some("contrail-trainer".into());
        out.push(o);
    }
    out
}

pub fn render_case(o: &RenderOptions) -> Vec<Manifest> {
    let mut cfg = job();
    if o.gpus_per_worker > 0 {
        cfg.cluster.backend = Backend::Nccl;
    }
    render(&cfg, o).unwrap()
}

/// `.venv/bin/<tool>` of the workspace, or a panic that says how to install it.
pub fn venv_tool(tool: &str) -> PathBuf {
    let p = workspace_root().join(".venv/bin").join(tool);
    assert!(
        p.exists(),
        "{} is missing: run `bash scripts/setup.sh` (it installs kubernetes-validate into .venv)",
        p.display()
    );
    p
}
