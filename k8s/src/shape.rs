//! The job's shape on the cluster: how many worker pods, and how many GPUs and ranks each
//! (docs/kubernetes.md, "The job's shape"), and the RDMA device resources a GPU pod may ask
//! for.

use anyhow::{bail, Result};
use std::str::FromStr;

/// Most ranks one pod may run (`--gpus-per-node`): each has a collective port of its own.
pub const MAX_GPUS_PER_NODE: u32 = 256;

/// How the worker pods of a job are laid out. `cluster.world_size` counts ranks:
/// [`Shape::world_size`] = pods × ranks per pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `--workers N [--gpus-per-worker 0|1]`: N pods of one rank each, CPU only
    /// (`gpus_per_worker` 0) or one GPU each. Several may share a node.
    Workers { workers: u32, gpus_per_worker: u32 },
    /// `--nodes M --gpus-per-node G`: one pod per node (a required pod anti-affinity on the
    /// node's hostname), each with G GPUs and G ranks (`contrail worker --local-ranks G`).
    Nodes { nodes: u32, gpus_per_node: u32 },
}

impl Shape {
    /// The shape from the command line's flags, with the errors a user can act on: exactly
    /// one of `--workers` and `--nodes`, each with its own GPU flag.
    pub fn from_flags(
        workers: Option<u32>,
        gpus_per_worker: Option<u32>,
        nodes: Option<u32>,
        gpus_per_node: Option<u32>,
    ) -> Result<Shape> {
        let shape = match (workers, nodes) {
            (Some(_), Some(_)) => bail!(
                "--workers and --nodes are mutually exclusive: --nodes M --gpus-per-node G runs \
                 one pod per GPU node with G ranks each; --workers N runs N pods of one rank \
                 each (CPU jobs, or one GPU each with --gpus-per-worker 1)"
            ),
            (None, None) => bail!(
                "give the job's shape: --nodes M --gpus-per-node G (one pod per GPU node, one \
                 rank per GPU) or --workers N (one rank per pod: CPU jobs)"
            ),
            (Some(workers), None) => {
                if gpus_per_node.is_some() {
                    bail!("--gpus-per-node goes with --nodes; with --workers use --gpus-per-worker 0|1");
                }
                Shape::Workers {
                    workers,
                    gpus_per_worker: gpus_per_worker.unwrap_or(0),
                }
            }
            (None, Some(nodes)) => {
                if gpus_per_worker.is_some() {
                    bail!(
                        "--gpus-per-worker goes with --workers; with --nodes use --gpus-per-node G"
                    );
                }
                let Some(gpus_per_node) = gpus_per_node else {
                    bail!(
                        "--nodes needs --gpus-per-node G: the GPUs (and ranks) of each node's pod"
                    );
                };
                Shape::Nodes {
                    nodes,
                    gpus_per_node,
                }
            }
        };
        shape.check()?;
        Ok(shape)
    }

    /// Whether the shape can run at all; [`crate::render`] calls it too.
    pub fn check(&self) -> Result<()> {
        match *self {
            Shape::Workers {
                workers,
                gpus_per_worker,
            } => {
                if workers == 0 {
                    bail!("--workers must be at least 1");
                }
                if gpus_per_worker > 1 {
                    bail!(
                        "--gpus-per-worker {gpus_per_worker}: a --workers pod runs one rank, \
                         which trains on one device; for {gpus_per_worker} GPUs per pod use \
                         --nodes M --gpus-per-node {gpus_per_worker} (one pod per node, one \
                         rank per GPU)"
                    );
                }
            }
            Shape::Nodes {
                nodes,
                gpus_per_node,
            } => {
                if nodes == 0 {
                    bail!("--nodes must be at least 1");
                }
                if gpus_per_node == 0 {
                    bail!(
                        "--gpus-per-node must be at least 1; a CPU job runs one rank per pod: \
                         use --workers N"
                    );
                }
                if gpus_per_node > MAX_GPUS_PER_NODE {
                    bail!(
                        "--gpus-per-node {gpus_per_node}: at most {MAX_GPUS_PER_NODE} ranks per \
                         pod (each gets a port of its own)"
                    );
                }
            }
        }
        if self.pods().checked_mul(self.ranks_per_pod()).is_none() {
            bail!("{} ranks do not fit cluster.world_size", self.describe());
        }
        Ok(())
    }

    /// Worker pods (the Indexed Job's completions).
    pub fn pods(&self) -> u32 {
        match *self {
            Shape::Workers { workers, .. } => workers,
            Shape::Nodes { nodes, .. } => nodes,
        }
    }

    /// `nvidia.com/gpu` of each worker pod.
    pub fn gpus_per_pod(&self) -> u32 {
        match *self {
            Shape::Workers {
                gpus_per_worker, ..
            } => gpus_per_worker,
            Shape::Nodes { gpus_per_node, .. } => gpus_per_node,
        }
    }

    /// Rank processes of each worker pod (`contrail worker --local-ranks`).
    pub fn ranks_per_pod(&self) -> u32 {
        match *self {
            Shape::Workers { .. } => 1,
            Shape::Nodes { gpus_per_node, .. } => gpus_per_node,
        }
    }

    /// `cluster.world_size`: every rank of every pod.
    pub fn world_size(&self) -> u32 {
        self.pods().saturating_mul(self.ranks_per_pod())
    }

    /// One pod per node, enforced by a pod anti-affinity.
    pub fn one_pod_per_node(&self) -> bool {
        matches!(self, Shape::Nodes { .. })
    }

    /// The flags that gave this shape, for messages.
    pub fn describe(&self) -> String {
        match *self {
            Shape::Workers {
                workers,
                gpus_per_worker,
            } => format!("--workers {workers} --gpus-per-worker {gpus_per_worker}"),
            Shape::Nodes {
                nodes,
                gpus_per_node,
            } => format!("--nodes {nodes} × --gpus-per-node {gpus_per_node}"),
        }
    }
}

/// A device-plugin resource for NCCL's InfiniBand/RoCE transport, `--rdma-resource NAME=COUNT`
/// (e.g. `rdma/rdma_shared_device_a=1` from the RDMA shared device plugin, or
/// `nvidia.com/hostdev=8` from the SR-IOV network device plugin), added to the worker pods'
/// requests and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaResource {
    /// An extended resource name, `domain/name`.
    pub name: String,
    pub count: u32,
}

impl FromStr for RdmaResource {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let Some((name, count)) = s.split_once('=') else {
            bail!("--rdma-resource {s:?}: expected NAME=COUNT, e.g. rdma/rdma_shared_device_a=1");
        };
        let (name, count) = (name.trim(), count.trim());
        let count: u32 = match count.parse() {
            Ok(c) if c >= 1 => c,
            _ => bail!("--rdma-resource {s:?}: COUNT must be a whole number of at least 1"),
        };
        let Some((domain, short)) = name.split_once('/') else {
            bail!(
                "--rdma-resource {s:?}: NAME must be a device plugin's resource, DOMAIN/NAME \
                 (e.g. rdma/rdma_shared_device_a or nvidia.com/hostdev)"
            );
        };
        let domain_ok = !domain.is_empty()
            && domain.len() <= 253
            && domain.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        let short_ok = !short.is_empty()
            && short.len() <= 63
            && short
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && short.starts_with(|c: char| c.is_ascii_alphanumeric())
            && short.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !domain_ok || !short_ok {
            bail!("--rdma-resource {s:?}: {name:?} is not a valid extended resource name");
        }
        if domain == "kubernetes.io" || domain.ends_with(".kubernetes.io") {
            bail!("--rdma-resource {s:?}: kubernetes.io names are not device plugin resources");
        }
        if name == crate::GPU_RESOURCE {
            bail!("--rdma-resource {s:?}: the GPUs are set by --gpus-per-node");
        }
        Ok(RdmaResource {
            name: name.to_string(),
            count,
        })
    }
}

/// Checks a node label key for `--exclusive-topology` (`[prefix/]name`, as Kubernetes
/// label keys).
pub fn validate_label_key(key: &str) -> Result<()> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    if !name_ok || !prefix_ok {
        bail!(
            "--exclusive-topology {key:?} is not a node label key ([prefix/]name, e.g. \
             cloud.google.com/gke-nodepool or a rack/block label of your nodes)"
        );
    }
    Ok(())
}
