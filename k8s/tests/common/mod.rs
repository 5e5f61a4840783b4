#![allow(dead_code)]

use contrail_common::config::{Backend, JobConfig};
use contrail_k8s::{render, Crd, Manifest, RdmaResource, RenderOptions, Shape};
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

/// The job of [`render_case`]: [`job`] with a global batch every rank gets a micro-batch of
/// (32 × world_size, at least 256), on NCCL when the pods have GPUs.
pub fn job_for(o: &RenderOptions) -> JobConfig {
    let mut cfg = job();
    cfg.train.global_batch = cfg.train.micro_batch * u64::from(o.shape.world_size().max(8));
    if o.shape.gpus_per_pod() > 0 {
        cfg.cluster.backend = Backend::Nccl;
    }
    cfg
}

fn with_shape(crd: Crd, shape: Shape) -> RenderOptions {
    let mut o = RenderOptions::new("simclr-test", "ghcr.io/example/contrail:0.1.0", shape);
    o.namespace = "ml".into();
    o.crd = crd;
    // Fixed, so that two renders of the same options are equal.
    o.job_token = Some(TEST_TOKEN.into());
    o
}

/// `--workers N --gpus-per-worker G`: pods of one rank each.
pub fn opts(crd: Crd, workers: u32, gpus: u32) -> RenderOptions {
    with_shape(
        crd,
        Shape::Workers {
            workers,
            gpus_per_worker: gpus,
        },
    )
}

/// `--nodes M --gpus-per-node G`: one pod per node, G ranks each.
pub fn node_opts(crd: Crd, nodes: u32, gpus: u32) -> RenderOptions {
    with_shape(
        crd,
        Shape::Nodes {
            nodes,
            gpus_per_node: gpus,
        },
    )
}

pub fn rdma(name: &str, count: u32) -> RdmaResource {
    RdmaResource {
        name: name.into(),
        count,
    }
}

/// The job token of the rendered test jobs.
pub const TEST_TOKEN: &str = "k8s-test-job-token-0123456789";

/// Every combination the tests cover: both flavours; 1/2/8 one-rank pods with and without a
/// GPU; one pod per node for 1, 2 and 8 nodes of 8 or 4 GPUs, with RDMA devices, exclusive
/// placement (JobSet), the sizing flags switched off, and the NCCL / credential options on some.
pub fn cases() -> Vec<RenderOptions> {
    let mut out = Vec::new();
    for crd in [Crd::JobSet, Crd::None] {
        for workers in [1, 2, 8] {
            for gpus in [0, 1] {
                out.push(opts(crd, workers, gpus));
            }
        }
        out.push(node_opts(crd, 1, 8));
        let mut o = node_opts(crd, 2, 4);
        o.cpus_per_gpu = 0;
        o.memory_per_gpu_gib = 0;
        o.shm_per_gpu_gib = 0;
        out.push(o);
        let mut o = node_opts(crd, 8, 8);
        o.rdma_resources = vec![rdma("rdma/rdma_shared_device_a", 1)];
        if crd == Crd::JobSet {
            o.exclusive_topology = Some("topology.example.com/block".into());
        }
        out.push(o);
        let mut o = node_opts(crd, 4, 8);
        o.host_network = true;
        o.nccl_socket_ifname = Some("ib0".into());
        o.secret = Some("object-store-creds".into());
        o.service_account = Some("contrail-trainer".into());
        o.rdma_resources = vec![
            rdma("nvidia.com/hostdev", 8),
            rdma("rdma/rdma_shared_device_b", 1),
        ];
        out.push(o);
    }
    out
}

pub fn render_case(o: &RenderOptions) -> Vec<Manifest> {
    render(&job_for(o), o).unwrap()
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
