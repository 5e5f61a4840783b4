//! `contrail`: the user-facing command. Thin: every subcommand calls into the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use contrail_worker::{cli_support, local_cluster, runtime};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "contrail",
    version,
    about = "Distributed contrastive training (SimCLR, ...)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
enum K8sCommand {
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
struct K8sJob {
    /// Job file (TOML).
    #[arg(long)]
    config: String,
    /// Override a config key, e.g. `--set train.max_steps=50` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Worker image (`contrail` on its PATH; k8s/docker/worker.Dockerfile). The coordinator
    /// runs `contrail coordinator` from it unless --coordinator-image is given.
    #[arg(long)]
    image: String,
    /// Coordinator-only image (`contrail-coordinator` on its PATH, no libtorch;
    /// k8s/docker/coordinator.Dockerfile).
    #[arg(long)]
    coordinator_image: Option<String>,
    /// Worker pods (sets cluster.world_size).
    #[arg(long)]
    workers: u32,
    /// nvidia.com/gpu limit of each worker pod (0: CPU only).
    #[arg(long, default_value_t = 0)]
    gpus_per_worker: u32,
    /// Prefix of the objects' names (default: from the job file's name).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "default")]
    namespace: String,
    /// `jobset` (needs the JobSet controller) or `none` (Deployment + Indexed Job).
    #[arg(long, default_value = "jobset")]
    crd: contrail_k8s::Crd,
    /// Run the workers on the node's network (hostNetwork), e.g. for NCCL over InfiniBand.
    #[arg(long)]
    host_network: bool,
    /// Set NCCL_SOCKET_IFNAME in the workers (default: unset, NCCL picks).
    #[arg(long)]
    nccl_socket_ifname: Option<String>,
    /// Secret whose keys become the pods' environment (AWS_*, GOOGLE_*, AZURE_* credentials).
    #[arg(long)]
    secret: Option<String>,
    /// Service account of the pods (workload identity).
    #[arg(long)]
    service_account: Option<String>,
}

impl K8sJob {
    fn render(&self) -> anyhow::Result<(contrail_k8s::RenderOptions, Vec<contrail_k8s::Manifest>)> {
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| contrail_k8s::default_name(&self.config));
        let mut opts = contrail_k8s::RenderOptions::new(&name, &self.image, self.workers);
        opts.namespace = self.namespace.clone();
        opts.coordinator_image = self.coordinator_image.clone();
        opts.gpus_per_worker = self.gpus_per_worker;
        opts.crd = self.crd;
        opts.host_network = self.host_network;
        opts.nccl_socket_ifname = self.nccl_socket_ifname.clone();
        opts.secret = self.secret.clone();
        opts.service_account = self.service_account.clone();
        let (cfg, objs) = contrail_k8s::render_file(&self.config, &self.overrides, &opts)?;
        for w in contrail_k8s::warnings(&cfg) {
            eprintln!("warning: {w}");
        }
        Ok((opts, objs))
    }
}

fn k8s(command: K8sCommand) -> anyhow::Result<()> {
    match command {
        K8sCommand::Render { job, out } => {
            let yaml = contrail_k8s::to_yaml(&job.render()?.1)?;
            match out {
                Some(path) => {
                    std::fs::write(&path, yaml).with_context(|| format!("writing {path}"))
                }
                None => {
                    print!("{yaml}");
                    Ok(())
                }
            }
        }
        K8sCommand::Launch { job } => {
            let (opts, objs) = job.render()?;
            for applied in contrail_k8s::apply::launch_blocking(&opts.namespace, &objs)? {
                println!("applied {applied}");
            }
            println!("{}", contrail_k8s::apply::status_hint(&opts));
            Ok(())
        }
        K8sCommand::Delete { name, namespace } => {
            let deleted = contrail_k8s::apply::delete_blocking(&namespace, &name)?;
            if deleted.is_empty() {
                println!("no objects of job {name:?} in namespace {namespace:?}");
            }
            for d in deleted {
                println!("deleted {d}");
            }
            Ok(())
        }
    }
}

#[derive(Subcommand)]
enum DataCommand {
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

fn main() {
    cli_support::init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Local {
            workers,
            config,
            overrides,
            verbose,
        } => local_cluster::run_local(&config, workers, &overrides, verbose),
        Command::Worker {
            coordinator,
            bind,
            connect_wait_secs,
            threads,
        } => runtime::run_worker(&runtime::WorkerOptions {
            torch_threads: threads,
            coordinator,
            collective_bind: bind,
            connect_wait: Duration::from_secs(connect_wait_secs),
        }),
        Command::Coordinator { config, overrides } => {
            cli_support::run_coordinator(&config, &overrides)
        }
        Command::Data {
            command:
                DataCommand::Synth {
                    out,
                    samples,
                    shard_size,
                    image_size,
                    seed,
                    s3_endpoint,
                },
        } => cli_support::synth(&out, samples, shard_size, image_size, seed, &s3_endpoint),
        Command::Status { coordinator, watch } => cli_support::status(&coordinator, watch),
        Command::K8s { command } => k8s(command),
        Command::Info => {
            cli_support::info();
            Ok(())
        }
    };
    if let Err(e) = result.context("contrail failed") {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
