//! Kubernetes manifests for a contrail job, built from typed objects (`k8s-openapi` for the
//! built-in kinds, [`jobset`] for the JobSet CRD), written as a multi-document YAML stream,
//! and applied or deleted through the Kubernetes API ([`apply`]).
//!
//! Two flavours ([`Crd`]):
//! - `JobSet` (needs the JobSet controller): one JobSet with a `coordinator` replicated job
//!   (1 pod) and a `workers` replicated job (an Indexed Job of N pods), started in that order;
//!   plus the job file's ConfigMap and a Service in front of the coordinator's status page.
//! - `None`: a Deployment + Service for the coordinator, an Indexed Job + headless Service
//!   for the workers, and the ConfigMap.
//!
//! The worker pods have one of two shapes ([`Shape`]): one pod per GPU node running one rank
//! per GPU (`--nodes M --gpus-per-node G`, `contrail worker --local-ranks G`), or pods of one
//! rank each (`--workers N`, CPU jobs). `cluster.world_size` counts ranks.
//!
//! Failure handling mirrors contrail's own (docs/kubernetes.md, "Failure handling"): with
//! `cluster.min_workers` (which counts ranks) a failed worker pod is replaced on its own and
//! joins the survivors; otherwise a dead worker fails the job and the JobSet restarts the whole
//! set (`failurePolicy.maxRestarts`), which resumes from the checkpoint. A coordinator with a
//! journal is replaced when its pod crashes and takes the job over from the journal.

pub mod apply;
pub mod jobset;
pub mod shape;

pub use shape::{RdmaResource, Shape};

use anyhow::{bail, Context, Result};
use contrail_common::auth::{JobToken, TOKEN_ENV};
use contrail_common::config::JobConfig;
use jobset::{FailurePolicy, JobSet, JobSetSpec, Network, ReplicatedJob, StartupPolicy};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::batch::v1::{
    Job, JobSpec, JobTemplateSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector,
    PodAffinityTerm, PodAntiAffinity, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    Secret, SecretEnvSource, SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::str::FromStr;

/// The Kubernetes API version the built-in objects are typed against (the `k8s-openapi`
/// feature) and validated against in the tests. Every field used is GA well before it.
pub const KUBERNETES_VERSION: &str = "1.34";
/// Ports inside the pods: coordinator gRPC, coordinator HTTP (status), worker collective.
pub const GRPC_PORT: i32 = 50051;
pub const HTTP_PORT: i32 = 8080;
pub const COLLECTIVE_PORT: i32 = 29500;
/// Where the job file is mounted in the coordinator.
pub const CONFIG_DIR: &str = "/etc/contrail";
pub const CONFIG_KEY: &str = "job.toml";
/// Whole-set restarts before a JobSet is declared failed; each restart resumes from the
/// latest checkpoint.
pub const MAX_RESTARTS: i32 = 3;
/// Longest `--name`: JobSet pod hostnames `<name>-coordinator-0-0` must fit a 63-character
/// DNS label.
pub const MAX_NAME_LEN: usize = 40;

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// The device plugin resource of NVIDIA GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// JobSet's exclusive placement: all pods of each child Job in one domain of the node label
/// given as its value, and no other JobSet Job's pods there. Set on the `workers`
/// ReplicatedJob's template (not on the JobSet), so the CPU coordinator takes no domain.
pub const EXCLUSIVE_TOPOLOGY_ANNOTATION: &str = "alpha.jobset.sigs.k8s.io/exclusive-topology";
/// The node label that names a node (the one-pod-per-node anti-affinity's topology key).
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// The capability that lets a process lock (pin) memory past RLIMIT_MEMLOCK, which RDMA
/// memory registration needs; added to the worker container when it asks for RDMA devices.
pub const IPC_LOCK: &str = "IPC_LOCK";

/// Defaults of the per-GPU sizing flags (docs/kubernetes.md): CPU cores and memory requested
/// per GPU of a worker pod, and its memory-backed /dev/shm per rank. An 8-GPU pod asks for 64
/// cores and 8 × (64 + 8) = 576 GiB, which fits the common 8 × H100 machines (96-208 cores,
/// 1.8-2 TiB) with room for the node's own daemons.
pub const DEFAULT_CPUS_PER_GPU: u32 = 8;
pub const DEFAULT_MEMORY_PER_GPU_GIB: u32 = 64;
pub const DEFAULT_SHM_PER_GPU_GIB: u32 = 8;

/// Which objects run the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crd {
    /// One JobSet (jobset.x-k8s.io/v1alpha2): ordered start-up and whole-set restarts.
    JobSet,
    /// Built-in kinds only: Deployment + Service (coordinator), Indexed Job + headless Service.
    None,
}

impl FromStr for Crd {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "jobset" => Ok(Crd::JobSet),
            "none" => Ok(Crd::None),
            _ => bail!("unknown --crd {s:?}: expected \"jobset\" or \"none\""),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RenderOptions {
    /// Prefix of every object's name; a DNS-1035 label of at most [`MAX_NAME_LEN`] characters.
    pub name: String,
    pub namespace: String,
    /// The worker image (`k8s/docker/worker.Dockerfile`: `contrail` on its PATH). The
    /// coordinator runs `contrail coordinator` from it unless `coordinator_image` is given.
    pub image: String,
    /// A coordinator-only image (`k8s/docker/coordinator.Dockerfile`: `contrail-coordinator`
    /// on its PATH, no libtorch), for a much smaller coordinator pod.
    pub coordinator_image: Option<String>,
    /// The worker pods: one per node with one rank per GPU, or one rank each.
    pub shape: Shape,
    /// CPU cores requested per GPU of a worker pod (0: no CPU request). No CPU limit: the
    /// data loaders may use idle cores, and a limit would throttle them.
    pub cpus_per_gpu: u32,
    /// Memory per GPU of a worker pod, in GiB (0: no memory request or limit). The pod's
    /// request and limit are GPUs × (this + `shm_per_gpu_gib`): the memory-backed /dev/shm is
    /// charged to the pod's memory.
    pub memory_per_gpu_gib: u32,
    /// The worker pods' memory-backed /dev/shm, per rank (per GPU), in GiB: the emptyDir's
    /// `sizeLimit` is ranks × this (0: no sizeLimit).
    pub shm_per_gpu_gib: u32,
    /// Device plugin resources for NCCL's InfiniBand/RoCE transport, added to the worker
    /// pods' requests and limits with the IPC_LOCK capability (GPU pods only).
    pub rdma_resources: Vec<RdmaResource>,
    /// JobSet's exclusive placement of the workers' Job in one domain of this node label
    /// ([`EXCLUSIVE_TOPOLOGY_ANNOTATION`]); JobSet flavour only.
    pub exclusive_topology: Option<String>,
    pub crd: Crd,
    /// Workers on the node's network (`hostNetwork`, `dnsPolicy: ClusterFirstWithHostNet`),
    /// for NCCL over the node's interfaces (InfiniBand/RoCE, several NICs).
    pub host_network: bool,
    /// Sets NCCL_SOCKET_IFNAME in the workers (unset: NCCL picks the interface).
    pub nccl_socket_ifname: Option<String>,
    /// Secret whose keys become environment variables of every pod (AWS_*, GOOGLE_*, AZURE_*
    /// object-store credentials). The job file never holds credentials.
    pub secret: Option<String>,
    /// Service account of every pod (workload identity: IRSA, GKE, Azure).
    pub service_account: Option<String>,
    /// What the worker pods run: training (`contrail worker`), or an embedding export.
    pub workload: Workload,
    /// The job token the rendered Secret holds (None: a fresh random one per render). The
    /// coordinator and every worker read it as CONTRAIL_JOB_TOKEN; it is never in the job file.
    pub job_token: Option<String>,
}

/// What the worker pods of a rendered job run.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Workload {
    /// `contrail worker`: the job trains.
    #[default]
    Train,
    /// `contrail embed-worker ARGS`: the pods lease the shards of `data.url` from the
    /// coordinator and write an embedding folder (`--out URL`, `--tower`, `--checkpoint` or
    /// `--random-init`, as `contrail embed` passes them); nothing trains.
    Embed { args: Vec<String> },
}

impl RenderOptions {
    /// Defaults: namespace "default", JobSet flavour, the default per-GPU sizes, no RDMA
    /// devices, no exclusive placement, pod network, no secret.
    pub fn new(name: &str, image: &str, shape: Shape) -> Self {
        Self {
            name: name.into(),
            namespace: "default".into(),
            image: image.into(),
            coordinator_image: None,
            shape,
            cpus_per_gpu: DEFAULT_CPUS_PER_GPU,
            memory_per_gpu_gib: DEFAULT_MEMORY_PER_GPU_GIB,
            shm_per_gpu_gib: DEFAULT_SHM_PER_GPU_GIB,
            rdma_resources: Vec::new(),
            exclusive_topology: None,
            crd: Crd::JobSet,
            host_network: false,
            nccl_socket_ifname: None,
            secret: None,
            service_account: None,
            workload: Workload::Train,
            job_token: None,
        }
    }
}

/// One object of the rendered stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Manifest {
    Secret(Secret),
    ConfigMap(ConfigMap),
    Service(Service),
    Deployment(Deployment),
    Job(Job),
    JobSet(JobSet),
}

impl Manifest {
    pub fn kind(&self) -> &'static str {
        match self {
            Manifest::Secret(_) => "Secret",
            Manifest::ConfigMap(_) => "ConfigMap",
            Manifest::Service(_) => "Service",
            Manifest::Deployment(_) => "Deployment",
            Manifest::Job(_) => "Job",
            Manifest::JobSet(_) => jobset::KIND,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Manifest::Secret(o) => &o.metadata,
            Manifest::ConfigMap(o) => &o.metadata,
            Manifest::Service(o) => &o.metadata,
            Manifest::Deployment(o) => &o.metadata,
            Manifest::Job(o) => &o.metadata,
            Manifest::JobSet(o) => &o.metadata,
        }
    }

    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or("")
    }

    /// Reads one object, dispatching on its `kind` (and checking its `apiVersion` through the
    /// typed structs).
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .context("manifest has no `kind`")?
            .to_string();
        let m = match kind.as_str() {
            "Secret" => Manifest::Secret(serde_json::from_value(value)?),
            "ConfigMap" => Manifest::ConfigMap(serde_json::from_value(value)?),
            "Service" => Manifest::Service(serde_json::from_value(value)?),
            "Deployment" => Manifest::Deployment(serde_json::from_value(value)?),
            "Job" => Manifest::Job(serde_json::from_value(value)?),
            jobset::KIND => {
                let js: JobSet = serde_json::from_value(value)?;
                if js.api_version != jobset::API_VERSION {
                    bail!(
                        "JobSet has apiVersion {:?}, expected {:?}",
                        js.api_version,
                        jobset::API_VERSION
                    );
                }
                Manifest::JobSet(js)
            }
            other => bail!("unsupported kind {other:?}"),
        };
        Ok(m)
    }
}

/// The objects as a multi-document YAML stream (`---` between documents).
pub fn to_yaml(manifests: &[Manifest]) -> Result<String> {
    let mut out = String::new();
    for m in manifests {
        out.push_str("---\n");
        out.push_str(
            &serde_norway::to_string(m)
                .with_context(|| format!("writing {} {} as YAML", m.kind(), m.name()))?,
        );
    }
    Ok(out)
}

/// Reads a multi-document YAML stream back into typed objects.
pub fn from_yaml(text: &str) -> Result<Vec<Manifest>> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = serde_json::Value::deserialize(doc)
            .with_context(|| format!("YAML document {i} is not valid YAML"))?;
        if value.is_null() {
            continue; // an empty document (e.g. a trailing `---`)
        }
        out.push(Manifest::from_value(value).with_context(|| format!("in YAML document {i}"))?);
    }
    Ok(out)
}

/// A default object-name prefix from a job file's path: its stem, lower-cased, with every
/// character outside `[a-z0-9-]` turned into `-`, cut to [`MAX_NAME_LEN`].
pub fn default_name(config_path: &str) -> String {
    let stem = std::path::Path::new(config_path)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("contrail");
    let mut s: String = stem
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    s.truncate(MAX_NAME_LEN);
    let s = s.trim_matches('-').to_string();
    if s.is_empty() || !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        format!("contrail-{s}").trim_end_matches('-').to_string()
    } else {
        s
    }
}

/// Checks `name` is usable as the prefix of every object and pod hostname.
pub fn validate_name(name: &str) -> Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !ok_chars
        || !name.starts_with(|c: char| c.is_ascii_lowercase())
        || name.ends_with('-')
    {
        bail!(
            "--name {name:?} must be 1-{MAX_NAME_LEN} characters of a-z, 0-9 and '-', starting \
             with a letter and not ending with '-' (it prefixes Kubernetes object and pod names)"
        );
    }
    Ok(())
}

/// The job file the pods run: `cfg` with `cluster.world_size` = the ranks of all worker pods
/// ([`Shape::world_size`]), `cluster.local_ranks` = the ranks of each pod (training only), and
/// the coordinator listening on every interface at the fixed ports. `cluster.min_workers` is
/// left as it is: it counts ranks too.
pub fn cluster_job_toml(cfg: &JobConfig, opts: &RenderOptions) -> Result<String> {
    let mut cfg = cfg.clone();
    let world = opts.shape.world_size();
    cfg.cluster.world_size = world;
    match opts.workload {
        // Every pod runs this many ranks; the coordinator refuses a node worker that does not.
        Workload::Train => cfg.cluster.local_ranks = opts.shape.ranks_per_pod(),
        Workload::Embed { .. } => cfg.make_export(world),
    }
    cfg.cluster.grpc_addr = format!("0.0.0.0:{GRPC_PORT}");
    cfg.cluster.http_addr = format!("0.0.0.0:{HTTP_PORT}");
    cfg.validate().with_context(|| {
        format!(
            "the job file with cluster.world_size={world} (the ranks of {}); adjust it with \
             e.g. --set train.global_batch=...",
            opts.shape.describe()
        )
    })?;
    Ok(cfg.to_toml())
}

/// Stable DNS name the workers dial the coordinator at.
///
/// JobSet: the coordinator pod's own hostname, `<name>-coordinator-0-0.<name>` (replicated
/// job `coordinator`, job index 0, pod index 0, under the JobSet's headless service
/// `<name>`). It resolves from the workers' namespace via the search path. No-CRD flavour:
/// the coordinator's Service, `<name>-coordinator`.
pub fn coordinator_host(opts: &RenderOptions) -> String {
    match opts.crd {
        Crd::JobSet => format!("{0}-coordinator-0-0.{0}", opts.name),
        Crd::None => format!("{}-coordinator", opts.name),
    }
}

/// URL the workers' `--coordinator` (env CONTRAIL_COORDINATOR) is set to.
pub fn coordinator_url(opts: &RenderOptions) -> String {
    format!("http://{}:{GRPC_PORT}", coordinator_host(opts))
}

/// Renders every object of the job. `cfg` is the parsed job file (with any `--set` applied);
/// the ConfigMap holds it re-serialised with the cluster keys set by [`cluster_job_toml`].
pub fn render(cfg: &JobConfig, opts: &RenderOptions) -> Result<Vec<Manifest>> {
    validate_name(&opts.name)?;
    opts.shape.check()?;
    if opts.image.trim().is_empty() {
        bail!("--image is required (the worker image, with `contrail` on its PATH)");
    }
    if opts.namespace.trim().is_empty() {
        bail!("--namespace must not be empty");
    }
    if opts.shape.gpus_per_pod() == 0 && cfg.cluster.requires_gpu() {
        bail!(
            "the job file asks for GPUs (cluster.backend=\"{}\", cluster.device=\"{}\") but \
             the worker pods have none (--gpus-per-worker is 0): use --nodes M --gpus-per-node G",
            cfg.cluster.backend,
            cfg.cluster.device
        );
    }
    check_devices_and_placement(opts)?;
    let job_toml = cluster_job_toml(cfg, opts)?;
    let replace = Replacement::of(cfg);
    let token = match &opts.job_token {
        Some(t) => JobToken::parse(t).context("--job-token")?,
        None => JobToken::generate()?,
    };

    let mut out = vec![
        Manifest::Secret(token_secret(opts, &token)),
        Manifest::ConfigMap(config_map(opts, job_toml)),
    ];
    out.push(Manifest::Service(coordinator_service(opts)));
    match opts.crd {
        Crd::JobSet => out.push(Manifest::JobSet(job_set(
            opts,
            replace,
            cfg.cluster.journal(&cfg.checkpoint.url).is_some(),
        ))),
        Crd::None => {
            out.push(Manifest::Deployment(coordinator_deployment(opts)));
            out.push(Manifest::Service(workers_service(opts)));
            out.push(Manifest::Job(workers_job(opts, replace)));
        }
    }
    Ok(out)
}

/// The RDMA devices, the export's shape and the exclusive placement: what [`render`] refuses.
fn check_devices_and_placement(opts: &RenderOptions) -> Result<()> {
    let pods = opts.shape.pods();
    if !opts.rdma_resources.is_empty() && opts.shape.gpus_per_pod() == 0 {
        bail!(
            "--rdma-resource is for NCCL's InfiniBand/RoCE transport between GPUs: a CPU job \
             does not use it"
        );
    }
    for (i, r) in opts.rdma_resources.iter().enumerate() {
        if opts.rdma_resources[..i].iter().any(|o| o.name == r.name) {
            bail!("--rdma-resource {} is given twice", r.name);
        }
    }
    if matches!(opts.workload, Workload::Embed { .. }) && opts.shape.ranks_per_pod() > 1 {
        bail!(
            "an embedding export runs one `contrail embed-worker` per pod, on one device: use \
             --workers N (with --gpus-per-worker 1 for GPUs), not {}",
            opts.shape.describe()
        );
    }
    if let Some(label) = &opts.exclusive_topology {
        if opts.crd != Crd::JobSet {
            bail!("--exclusive-topology is JobSet's exclusive placement: it needs --crd jobset");
        }
        shape::validate_label_key(label)?;
        if label == HOSTNAME_LABEL && pods > 1 {
            bail!(
                "--exclusive-topology {HOSTNAME_LABEL} would put all {pods} worker pods (one \
                 Job) on one node: exclusive placement keeps a Job's pods in one domain of the \
                 label; give a label that groups nodes (a rack, a network block, a node pool)"
            );
        }
    }
    Ok(())
}

/// Things in the job file that render but will likely not work on a cluster: local paths,
/// which the pods do not share (no volume is mounted for them).
pub fn warnings(cfg: &JobConfig) -> Vec<String> {
    let local = |u: &str| !u.is_empty() && (u.starts_with("file://") || !u.contains("://"));
    let mut out = Vec::new();
    for (key, url) in [
        ("data.url", &cfg.data.url),
        ("checkpoint.url", &cfg.checkpoint.url),
    ] {
        if local(url) {
            out.push(format!(
                "{key} = {url:?} is a local path: each pod sees only its own filesystem; \
                 point it at object storage (s3://, gs://, az://)"
            ));
        }
    }
    out
}

/// [`warnings`], and what the job's shape makes of the job file: with several ranks per pod a
/// lost pod takes all of them, so a `cluster.min_workers` (which counts ranks) above
/// world_size − ranks per pod fails the job on any pod failure.
pub fn render_warnings(cfg: &JobConfig, opts: &RenderOptions) -> Vec<String> {
    let mut out = warnings(cfg);
    let (world, per_pod) = (opts.shape.world_size(), opts.shape.ranks_per_pod());
    let min = cfg.cluster.min_workers;
    let left = world.saturating_sub(per_pod);
    if min > 0 && per_pod > 1 && min > left {
        let keep = if left == 0 {
            "one pod holds every rank".to_string()
        } else {
            format!("min_workers ≤ {left} keeps them going")
        };
        out.push(format!(
            "cluster.min_workers = {min} counts ranks: a lost pod takes its {per_pod} ranks and \
             leaves {left}, so any pod failure fails the job instead of the survivors training \
             on ({keep})"
        ));
    }
    out
}

/// [`render`] for a job file on disk, with `section.key=value` overrides applied first;
/// returns the parsed job too. A training job is loaded (and so validated) with the cluster
/// keys it will run with, `cluster.world_size` = the ranks and `cluster.local_ranks`, so that
/// e.g. a `cluster.min_workers` of 56 ranks is checked against 8 nodes × 8 GPUs rather than
/// against the file's own `world_size`. (An export keeps the file's: it resizes its batch.)
pub fn render_file(
    config_path: &str,
    overrides: &[String],
    opts: &RenderOptions,
) -> Result<(JobConfig, Vec<Manifest>)> {
    let cfg = if opts.workload == Workload::Train {
        let mut all = overrides.to_vec();
        all.push(format!("cluster.world_size={}", opts.shape.world_size()));
        all.push(format!(
            "cluster.local_ranks={}",
            opts.shape.ranks_per_pod()
        ));
        JobConfig::from_file(config_path, &all).with_context(|| {
            format!(
                "loading the job file with cluster.world_size={} (the ranks of {})",
                opts.shape.world_size(),
                opts.shape.describe()
            )
        })?
    } else {
        JobConfig::from_file(config_path, overrides)?
    };
    let objs = render(&cfg, opts).with_context(|| format!("rendering job file {config_path}"))?;
    Ok((cfg, objs))
}

fn config_map_name(opts: &RenderOptions) -> String {
    format!("{}-config", opts.name)
}

fn coordinator_service_name(opts: &RenderOptions) -> String {
    format!("{}-coordinator", opts.name)
}

fn workers_name(opts: &RenderOptions) -> String {
    format!("{}-workers", opts.name)
}

/// Labels a selector matches: this job's objects of one component.
fn selector_labels(opts: &RenderOptions, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), "contrail".to_string()),
        (LABEL_INSTANCE.to_string(), opts.name.clone()),
        (LABEL_COMPONENT.to_string(), component.to_string()),
    ])
}

fn labels(opts: &RenderOptions, component: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(opts, component);
    l.insert(LABEL_MANAGED_BY.into(), "contrail".into());
    l
}

fn meta(opts: &RenderOptions, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(opts.namespace.clone()),
        labels: Some(labels(opts, component)),
        ..Default::default()
    }
}

/// Name of the Secret that holds the job token (key [`TOKEN_KEY`]).
pub fn token_secret_name(opts: &RenderOptions) -> String {
    format!("{}-token", opts.name)
}

/// The key of the token in its Secret.
pub const TOKEN_KEY: &str = "token";

fn token_secret(opts: &RenderOptions, token: &JobToken) -> Secret {
    Secret {
        metadata: meta(opts, token_secret_name(opts), "token"),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([(
            TOKEN_KEY.to_string(),
            token.expose().to_string(),
        )])),
        ..Default::default()
    }
}

/// CONTRAIL_JOB_TOKEN from the job's Secret: every pod of the job gets it, nothing else.
fn token_env(opts: &RenderOptions) -> EnvVar {
    EnvVar {
        name: TOKEN_ENV.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: token_secret_name(opts),
                key: TOKEN_KEY.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn config_map(opts: &RenderOptions, job_toml: String) -> ConfigMap {
    ConfigMap {
        metadata: meta(opts, config_map_name(opts), "config"),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), job_toml)])),
        ..Default::default()
    }
}

fn port(name: &str, p: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: p,
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn service_port(name: &str, p: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: p,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// Credentials reach the pods only from the named Secret, as environment variables.
fn env_from(opts: &RenderOptions) -> Option<Vec<EnvFromSource>> {
    opts.secret.as_ref().map(|s| {
        vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: s.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }]
    })
}

fn coordinator_pod(opts: &RenderOptions, restart_policy: &str) -> PodTemplateSpec {
    let container = Container {
        name: "coordinator".into(),
        // The same server either way: `contrail coordinator` is `contrail-coordinator`.
        image: Some(
            opts.coordinator_image
                .clone()
                .unwrap_or_else(|| opts.image.clone()),
        ),
        command: Some(match &opts.coordinator_image {
            Some(_) => vec!["contrail-coordinator".into()],
            None => vec!["contrail".into(), "coordinator".into()],
        }),
        args: Some(vec![
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        ]),
        ports: Some(vec![port("grpc", GRPC_PORT), port("http", HTTP_PORT)]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::String("http".into()),
                ..Default::default()
            }),
            period_seconds: Some(5),
            ..Default::default()
        }),
        env: Some(vec![token_env(opts)]),
        env_from: env_from(opts),
        volume_mounts: Some(vec![VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    };
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(opts, "coordinator")),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            restart_policy: Some(restart_policy.into()),
            service_account_name: opts.service_account.clone(),
            volumes: Some(vec![Volume {
                name: "config".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: config_map_name(opts),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

fn gib(n: u64) -> Quantity {
    Quantity(format!("{n}Gi"))
}

/// The worker container's requests and limits, none for a CPU pod. GPUs and RDMA devices are
/// extended resources (requests = limits); CPU is a request only (a limit would throttle the
/// data loaders); memory is requested and limited at GPUs × (memory + shm) per GPU, since the
/// memory-backed /dev/shm is charged to the pod.
fn worker_resources(opts: &RenderOptions) -> Option<ResourceRequirements> {
    let gpus = opts.shape.gpus_per_pod();
    if gpus == 0 {
        return None;
    }
    let mut devices = BTreeMap::from([(GPU_RESOURCE.to_string(), Quantity(gpus.to_string()))]);
    for r in &opts.rdma_resources {
        devices.insert(r.name.clone(), Quantity(r.count.to_string()));
    }
    let mut requests = devices.clone();
    let mut limits = devices;
    if opts.cpus_per_gpu > 0 {
        requests.insert(
            "cpu".into(),
            Quantity((u64::from(gpus) * u64::from(opts.cpus_per_gpu)).to_string()),
        );
    }
    if opts.memory_per_gpu_gib > 0 {
        let memory = gib(u64::from(gpus)
            * (u64::from(opts.memory_per_gpu_gib) + u64::from(opts.shm_per_gpu_gib)));
        requests.insert("memory".into(), memory.clone());
        limits.insert("memory".into(), memory);
    }
    Some(ResourceRequirements {
        requests: Some(requests),
        limits: Some(limits),
        ..Default::default()
    })
}

fn worker_pod(opts: &RenderOptions, subdomain: Option<String>) -> PodTemplateSpec {
    let ranks = opts.shape.ranks_per_pod();
    // A rank advertises the address it binds to its peers, so it binds the pod's own IP
    // (0.0.0.0 would be advertised as is). On the pod network local rank i listens on
    // COLLECTIVE_PORT + i (the node worker adds its local rank to a fixed port); on the node's
    // network several workers may share a node, so the port is picked free (0) there.
    let fixed_port = !opts.host_network;
    let collective_port = if fixed_port { COLLECTIVE_PORT } else { 0 };
    let ports = fixed_port.then(|| {
        (0..ranks)
            .map(|i| {
                let name = if ranks == 1 {
                    "collective".to_string()
                } else {
                    format!("collective-{i}")
                };
                port(&name, COLLECTIVE_PORT + i as i32)
            })
            .collect::<Vec<_>>()
    });
    let mut env = vec![
        EnvVar {
            name: "POD_IP".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "status.podIP".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        EnvVar {
            name: "CONTRAIL_COORDINATOR".into(),
            value: Some(coordinator_url(opts)),
            ..Default::default()
        },
        token_env(opts),
    ];
    if let Some(ifname) = &opts.nccl_socket_ifname {
        env.push(EnvVar {
            name: "NCCL_SOCKET_IFNAME".into(),
            value: Some(ifname.clone()),
            ..Default::default()
        });
    }
    // RDMA memory registration pins memory; IPC_LOCK lifts RLIMIT_MEMLOCK for a process that
    // holds it (docs/kubernetes.md, "InfiniBand and RoCE", says what else a node needs).
    let security_context = (!opts.rdma_resources.is_empty()).then(|| SecurityContext {
        capabilities: Some(Capabilities {
            add: Some(vec![IPC_LOCK.into()]),
            ..Default::default()
        }),
        ..Default::default()
    });
    let container = Container {
        name: "worker".into(),
        image: Some(opts.image.clone()),
        command: Some(vec!["contrail".into()]),
        args: Some(match &opts.workload {
            // The node worker: `ranks` rank processes, one per GPU of the pod.
            Workload::Train => vec![
                "worker".into(),
                "--coordinator".into(),
                coordinator_url(opts),
                "--local-ranks".into(),
                ranks.to_string(),
                "--bind".into(),
                format!("$(POD_IP):{collective_port}"),
            ],
            Workload::Embed { args } => std::iter::once("embed-worker".to_string())
                .chain(args.iter().cloned())
                .collect(),
        }),
        ports,
        env: Some(env),
        env_from: env_from(opts),
        resources: worker_resources(opts),
        security_context,
        volume_mounts: Some(vec![VolumeMount {
            name: "dshm".into(),
            mount_path: "/dev/shm".into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    // One pod per node: no two worker pods of this job on one node, whatever their GPU count.
    let affinity = opts.shape.one_pod_per_node().then(|| Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                label_selector: Some(LabelSelector {
                    match_labels: Some(selector_labels(opts, "worker")),
                    ..Default::default()
                }),
                topology_key: HOSTNAME_LABEL.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(opts, "worker")),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            // A dead worker fails the job; the restart happens at the level of the whole job.
            restart_policy: Some("Never".into()),
            subdomain,
            service_account_name: opts.service_account.clone(),
            affinity,
            host_network: opts.host_network.then_some(true),
            dns_policy: opts
                .host_network
                .then(|| "ClusterFirstWithHostNet".to_string()),
            // Data-loader and NCCL shared memory of every rank; the container default is
            // 64 MiB. Memory-backed: it counts against the pod's memory.
            volumes: Some(vec![Volume {
                name: "dshm".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    medium: Some("Memory".into()),
                    size_limit: (opts.shm_per_gpu_gib > 0)
                        .then(|| gib(u64::from(ranks) * u64::from(opts.shm_per_gpu_gib))),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// Whether a failed worker pod is replaced on its own (the survivors train on and the new
/// pod joins them) or fails the worker Job (and, with a JobSet, restarts the whole job).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replacement {
    /// `cluster.min_workers = 0`.
    WholeJob,
    /// Per-index retries of the Indexed Job, a new pod only once the old one is gone.
    PerPod,
}

impl Replacement {
    fn of(cfg: &JobConfig) -> Self {
        if cfg.cluster.min_workers > 0 {
            Replacement::PerPod
        } else {
            Replacement::WholeJob
        }
    }
}

/// How often one worker index may fail and be replaced before the Job gives up on it.
pub const WORKER_RETRIES_PER_INDEX: i32 = 3;

fn workers_job_spec(
    opts: &RenderOptions,
    subdomain: Option<String>,
    replace: Replacement,
) -> JobSpec {
    let n = opts.shape.pods() as i32;
    let base = JobSpec {
        completion_mode: Some("Indexed".into()),
        completions: Some(n),
        parallelism: Some(n),
        template: worker_pod(opts, subdomain),
        ..Default::default()
    };
    match replace {
        Replacement::WholeJob => JobSpec {
            backoff_limit: Some(0),
            ..base
        },
        // A failed index gets a new pod (after the old one has terminated, so two pods of
        // one index never run at once), which registers as a replacement and joins.
        Replacement::PerPod => JobSpec {
            backoff_limit_per_index: Some(WORKER_RETRIES_PER_INDEX),
            pod_replacement_policy: Some("Failed".into()),
            ..base
        },
    }
}

/// ClusterIP service in front of the coordinator: the status page (`kubectl port-forward
/// svc/<name>-coordinator 8080`), and the workers' address in the no-CRD flavour.
fn coordinator_service(opts: &RenderOptions) -> Service {
    Service {
        metadata: meta(opts, coordinator_service_name(opts), "coordinator"),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(opts, "coordinator")),
            ports: Some(vec![
                service_port("grpc", GRPC_PORT),
                service_port("http", HTTP_PORT),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// How often a crashed coordinator pod is replaced (with a journal) before the Job gives up.
pub const COORDINATOR_RETRIES: i32 = 3;

/// `journaled`: the coordinator journals its state (`cluster.journal_url`), so a pod that
/// crashed (killed, evicted, its node lost) is replaced and takes the job over; a coordinator
/// that exits 1 (the job failed) fails the Job at once.
fn job_set(opts: &RenderOptions, replace: Replacement, journaled: bool) -> JobSet {
    let coordinator = ReplicatedJob {
        name: "coordinator".into(),
        replicas: Some(1),
        template: JobTemplateSpec {
            metadata: None,
            spec: Some(JobSpec {
                completions: Some(1),
                parallelism: Some(1),
                backoff_limit: Some(if journaled { COORDINATOR_RETRIES } else { 0 }),
                pod_failure_policy: journaled.then(|| PodFailurePolicy {
                    rules: vec![PodFailurePolicyRule {
                        action: "FailJob".into(),
                        on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                            container_name: None,
                            operator: "In".into(),
                            values: vec![1],
                        }),
                        on_pod_conditions: None,
                    }],
                }),
                template: coordinator_pod(opts, "Never"),
                ..Default::default()
            }),
        },
    };
    let workers = ReplicatedJob {
        name: "workers".into(),
        replicas: Some(1),
        template: JobTemplateSpec {
            // Exclusive placement for the workers' Job only: set on the JobSet, it would give
            // the one-pod coordinator Job a whole domain too.
            metadata: opts.exclusive_topology.as_ref().map(|label| ObjectMeta {
                annotations: Some(BTreeMap::from([(
                    EXCLUSIVE_TOPOLOGY_ANNOTATION.to_string(),
                    label.clone(),
                )])),
                ..Default::default()
            }),
            // JobSet sets the pods' subdomain to its headless service itself.
            spec: Some(workers_job_spec(opts, None, replace)),
        },
    };
    JobSet::new(
        meta(opts, opts.name.clone(), "job"),
        JobSetSpec {
            replicated_jobs: vec![coordinator, workers],
            // Pod hostnames under the JobSet's headless service (not-ready pods are
            // published by default, so the name resolves before the probe passes).
            network: Some(Network {
                enable_dns_hostnames: Some(true),
                ..Default::default()
            }),
            // The coordinator's pod is ready (its /healthz answers) before any worker starts.
            startup_policy: Some(StartupPolicy {
                startup_policy_order: "InOrder".into(),
            }),
            // Any failed child Job restarts the whole set, which resumes from the latest
            // checkpoint; after MAX_RESTARTS the JobSet fails.
            failure_policy: Some(FailurePolicy {
                max_restarts: Some(MAX_RESTARTS),
            }),
            success_policy: None,
        },
    )
}

fn coordinator_deployment(opts: &RenderOptions) -> Deployment {
    Deployment {
        metadata: meta(opts, coordinator_service_name(opts), "coordinator"),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(selector_labels(opts, "coordinator")),
                ..Default::default()
            },
            // Never two coordinators for one job.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            }),
            // Deployments only allow restartPolicy Always.
            template: coordinator_pod(opts, "Always"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Headless service giving the worker pods DNS names `<name>-workers-<index>.<name>-workers`.
fn workers_service(opts: &RenderOptions) -> Service {
    Service {
        metadata: meta(opts, workers_name(opts), "worker"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(opts, "worker")),
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn workers_job(opts: &RenderOptions, replace: Replacement) -> Job {
    Job {
        metadata: meta(opts, workers_name(opts), "worker"),
        spec: Some(workers_job_spec(opts, Some(workers_name(opts)), replace)),
        ..Default::default()
    }
}
