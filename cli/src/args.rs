//! The `contrail` command line: every subcommand and flag (`--help` prints them).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "contrail",
    version,
    about = "Distributed contrastive training (SimCLR, ...)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Kubernetes: render, launch or delete a job's objects (docs/kubernetes.md).
    K8s {
        #[command(subcommand)]
        command: K8sCommand,
    },
}

#[derive(Subcommand)]
pub enum K8sCommand {
    /// Print (or write) the job's Kubernetes objects as YAML.
    Render {
        #[command(flatten)]
        job: K8sJob,
        /// Write the YAML to this file instead of stdout.
        #[arg(long)]
        out: Option<String>,
    },
    /// Server-side apply the job's objects with the current kubeconfig.
    Launch {
        #[command(flatten)]
        job: K8sJob,
    },
    /// Delete every object of a job launched by contrail (its pods with them).
    Delete {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "default")]
        namespace: String,
    },
}

#[derive(clap::Args)]
pub struct K8sJob {
    /// Job file (TOML).
    #[arg(long)]
    pub config: String,
    /// Override a config key, e.g. `--set train.max_steps=50` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Worker image (`contrail` on its PATH; k8s/docker/worker.Dockerfile). The coordinator
    /// runs `contrail coordinator` from it unless --coordinator-image is given.
    #[arg(long)]
    pub image: String,
    /// Coordinator-only image (`contrail-coordinator` on its PATH, no libtorch;
    /// k8s/docker/coordinator.Dockerfile).
    #[arg(long)]
    pub coordinator_image: Option<String>,
    /// Worker pods (sets cluster.world_size).
    #[arg(long)]
    pub workers: u32,
    /// nvidia.com/gpu limit of each worker pod (0: CPU only).
    #[arg(long, default_value_t = 0)]
    pub gpus_per_worker: u32,
    /// Prefix of the objects' names (default: from the job file's name).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// `jobset` (needs the JobSet controller) or `none` (Deployment + Indexed Job).
    #[arg(long, default_value = "jobset")]
    pub crd: contrail_k8s::Crd,
    /// Run the workers on the node's network (hostNetwork), e.g. for NCCL over InfiniBand.
    #[arg(long)]
    pub host_network: bool,
    /// Set NCCL_SOCKET_IFNAME in the workers (default: unset, NCCL picks).
    #[arg(long)]
    pub nccl_socket_ifname: Option<String>,
    /// Secret whose keys become the pods' environment (AWS_*, GOOGLE_*, AZURE_* credentials).
    #[arg(long)]
    pub secret: Option<String>,
    /// Service account of the pods (workload identity).
    #[arg(long)]
    pub service_account: Option<String>,
}

#[derive(Subcommand)]
pub enum DataCommand {
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
