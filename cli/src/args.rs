//! The `contrail` command line: every subcommand and flag (`--help` prints them).

use clap::{Parser, Subcommand};
use contrail_common::config::DeviceSetting;
use contrail_data::embeddings::Tower;
use contrail_worker::embed::EmbedTower;
use contrail_worker::eval::knn::Metric;
use contrail_worker::export::ExportFormat;

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
    /// first if the configured data URL is a local folder holding no shards).
    Local {
        /// Single-rank workers to start (sets cluster.world_size); the same as `--nodes N
        /// --local-ranks 1`.
        #[arg(long, conflicts_with = "nodes")]
        workers: Option<u32>,
        /// Node workers to start (default 2 with --local-ranks 1), each running
        /// --local-ranks ranks: cluster.world_size = nodes × local ranks, ranks node-major.
        #[arg(long)]
        nodes: Option<u32>,
        /// Rank processes per node worker.
        #[arg(long, default_value_t = 1, requires = "nodes")]
        local_ranks: u32,
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
    /// Run one node worker: N rank processes on this machine, one per GPU, each registering
    /// with the coordinator, training and leaving; the node worker supervises them (a rank
    /// that fails stops the node's others: a node is one failure domain) and forwards
    /// SIGTERM/SIGINT to them. Needs the job's token in CONTRAIL_JOB_TOKEN (the same as the
    /// coordinator's).
    Worker {
        #[command(flatten)]
        rank: RankArgs,
        /// Rank processes to run (default: the number of visible GPUs, 1 without GPUs).
        /// With one, the rank runs in this process.
        #[arg(long, env = "CONTRAIL_LOCAL_RANKS")]
        local_ranks: Option<u32>,
        /// GPUs for the ranks, one per rank or one for all (e.g. `0,1`): used as told, even
        /// if another node worker uses them. Default: the first free GPUs of this machine
        /// (node workers on one machine never share one).
        #[arg(long, value_delimiter = ',')]
        gpus: Option<Vec<usize>>,
    },
    /// One rank of a node worker (`contrail worker` starts these; not for direct use).
    #[command(hide = true)]
    Rank {
        #[command(flatten)]
        rank: RankArgs,
        /// The node worker's identity.
        #[arg(long)]
        node: String,
        #[arg(long)]
        local_rank: u32,
        #[arg(long)]
        local_ranks: u32,
        /// The GPU the node worker gave this rank.
        #[arg(long)]
        gpu: Option<usize>,
    },
    /// Run the coordinator alone (same as the `contrail-coordinator` binary). Needs the job's
    /// token in CONTRAIL_JOB_TOKEN; CONTRAIL_STATUS_TOKEN, if set, guards the status endpoints.
    Coordinator {
        #[arg(long)]
        config: String,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Print what this build of contrail sees: libtorch threads, CUDA devices, cuDNN.
    Info,
    /// Print a fresh random job token (64 hex digits) for CONTRAIL_JOB_TOKEN.
    Token,
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
    /// Write a dataset's embeddings from a job's latest checkpoint as an embedding folder
    /// (img_emb/, text_emb/, metadata/; one part per shard; docs/evaluation.md), in this
    /// process or spread over N local worker processes through a coordinator's leases.
    Embed {
        #[command(flatten)]
        args: EmbedArgs,
    },
    /// Write a job's latest checkpoint (or its untrained model) as the Python libraries load
    /// it: `open_clip` (a CLIP ViT model), `timm` (a ViT image tower), `torchvision` (a
    /// ResNet) or `hf` (a BERT text tower); weights in safetensors plus the library's config
    /// (docs/export.md).
    Export {
        #[command(flatten)]
        args: ExportArgs,
    },
    /// One worker of a distributed export: join the coordinator, embed leased shards until
    /// none is left (`contrail embed --workers N` and the Kubernetes export job start these).
    EmbedWorker {
        /// gRPC address of the coordinator (which serves the job: data.url is the dataset).
        #[arg(long, env = "CONTRAIL_COORDINATOR")]
        coordinator: String,
        /// Destination folder URL.
        #[arg(long)]
        out: String,
        /// `image`, `text` (CLIP) or `both` (CLIP).
        #[arg(long, default_value = "image")]
        tower: EmbedTower,
        /// Samples per forward pass.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Checkpoint base URL whose LATEST is loaded (default: the job's checkpoint.url).
        #[arg(long)]
        checkpoint: Option<String>,
        /// Embed with a freshly initialised model instead.
        #[arg(long, conflicts_with = "checkpoint")]
        random_init: bool,
        /// Seconds to keep trying to reach the coordinator at start-up.
        #[arg(long, default_value_t = 120)]
        connect_wait_secs: u64,
        /// libtorch intra-op threads (0: libtorch's default).
        #[arg(long, env = "CONTRAIL_TORCH_THREADS", default_value_t = 0)]
        threads: i32,
    },
    /// Evaluate embeddings: kNN (with whitening), linear probe, zero-shot, retrieval
    /// (docs/evaluation.md).
    Eval {
        #[command(subcommand)]
        command: EvalCommand,
    },
    /// The sample audit of a job (`[audit] url`): prove every sample was trained once.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
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
    /// GPU nodes: one worker pod per node, each running one rank per GPU (`contrail worker
    /// --local-ranks G`); cluster.world_size = nodes × --gpus-per-node.
    #[arg(long, value_name = "M", conflicts_with_all = ["workers", "gpus_per_worker"])]
    pub nodes: Option<u32>,
    /// With --nodes: GPUs (nvidia.com/gpu) and ranks of each node's pod.
    #[arg(long, value_name = "G", requires = "nodes")]
    pub gpus_per_node: Option<u32>,
    /// Worker pods of one rank each, for CPU jobs (or one GPU each with --gpus-per-worker 1);
    /// cluster.world_size = workers. GPU nodes: use --nodes and --gpus-per-node.
    #[arg(long, value_name = "N", conflicts_with = "gpus_per_node")]
    pub workers: Option<u32>,
    /// With --workers: nvidia.com/gpu of each worker pod, 0 (CPU only, the default) or 1.
    #[arg(long, value_name = "0|1", requires = "workers")]
    pub gpus_per_worker: Option<u32>,
    /// CPU cores requested per GPU of a worker pod (0: no CPU request).
    #[arg(long, value_name = "N", default_value_t = contrail_k8s::DEFAULT_CPUS_PER_GPU)]
    pub cpus_per_gpu: u32,
    /// Memory per GPU of a worker pod in GiB; the pod's request and limit are GPUs × (this +
    /// --shm-per-gpu) (0: no memory request or limit).
    #[arg(long, value_name = "GIB", default_value_t = contrail_k8s::DEFAULT_MEMORY_PER_GPU_GIB)]
    pub memory_per_gpu: u32,
    /// Memory-backed /dev/shm per rank (per GPU) in GiB, for NCCL and the data loaders (0: no
    /// size limit).
    #[arg(long, value_name = "GIB", default_value_t = contrail_k8s::DEFAULT_SHM_PER_GPU_GIB)]
    pub shm_per_gpu: u32,
    /// A device plugin resource for NCCL's InfiniBand/RoCE transport, added to the worker pods'
    /// requests and limits with the IPC_LOCK capability, e.g. rdma/rdma_shared_device_a=1 or
    /// nvidia.com/hostdev=8 (repeatable).
    #[arg(long, value_name = "NAME=COUNT")]
    pub rdma_resource: Vec<contrail_k8s::RdmaResource>,
    /// JobSet exclusive placement: all worker pods in one domain of this node label (a rack,
    /// network block or node pool), no other JobSet job's pods there.
    #[arg(long, value_name = "LABEL")]
    pub exclusive_topology: Option<String>,
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
    /// Render an embedding export instead of training: the worker pods run `contrail
    /// embed-worker --out URL`, leasing the shards of the job's data.url (set it with
    /// `--set data.url=...`) from the coordinator.
    #[arg(long, value_name = "URL")]
    pub embed_out: Option<String>,
    /// With --embed-out: `image`, `text` (CLIP) or `both` (CLIP).
    #[arg(long, default_value = "image", requires = "embed_out")]
    pub embed_tower: EmbedTower,
    /// With --embed-out: checkpoint base URL (default: the job's checkpoint.url).
    #[arg(long, requires = "embed_out")]
    pub embed_checkpoint: Option<String>,
    /// With --embed-out: export a freshly initialised model.
    #[arg(long, requires = "embed_out", conflicts_with = "embed_checkpoint")]
    pub embed_random_init: bool,
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Import a dataset as WebDataset shards (OUT/train/, OUT/test/) with OUT/dataset.json
    /// (class names, per-split counts, skipped input); see docs/data.md.
    Import {
        /// Source layout: `idx` (MNIST-style IDX files, plain or gzipped), `folder`
        /// (ROOT/<class>/<image>, with optional ROOT/train and ROOT/test|val) or `csv` (a
        /// CSV/TSV of `image path, caption[, label]`).
        #[arg(long, default_value = "idx")]
        format: String,
        /// Source folder (idx, folder) or listing file (csv), e.g.
        /// /usr/share/datasets/fashion-mnist.
        #[arg(long)]
        source: String,
        /// Destination URL (file://, s3://, gs://, az://, or a plain path).
        #[arg(long)]
        out: String,
        /// Class names in label order, comma-separated, or `fashion-mnist` for its ten.
        /// Default: idx `0`..`9`; folder the sorted folder names; csv the distinct labels.
        #[arg(long)]
        classes: Option<String>,
        /// Caption per sample from its class name (`{}`), e.g. "a photo of a {}." for CLIP.
        #[arg(long)]
        caption_template: Option<String>,
        #[arg(long, default_value_t = 1000)]
        shard_size: usize,
        /// At most this many samples per split.
        #[arg(long)]
        limit: Option<usize>,
        /// Hold out this fraction of every class as the test split (folder and csv layouts
        /// without one), chosen by a hash of each image's path.
        #[arg(long)]
        test_fraction: Option<f64>,
        /// Endpoint override for S3-compatible servers.
        #[arg(long, default_value = "")]
        s3_endpoint: String,
    },
    /// Count the samples of WebDataset shards contrail did not import and write
    /// DATA/dataset.json, so the learning-rate schedule and the ETA know the epoch's length
    /// from step 0 (each shard is read once; see docs/data.md).
    Index {
        /// The folder of `.tar` shards (file://, s3://, gs://, az://, or a plain path); the
        /// job's data.url.
        #[arg(long)]
        data: String,
        /// The split's name in dataset.json (default: the folder's name).
        #[arg(long)]
        split: Option<String>,
        /// Replace an existing dataset.json (an import's holds class names this would drop).
        #[arg(long)]
        overwrite: bool,
        /// Shards read at once.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
        /// Endpoint override for S3-compatible servers.
        #[arg(long, default_value = "")]
        s3_endpoint: String,
    },
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

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Weighted kNN top-1/top-5 of the test embeddings against the labelled train embeddings
    /// (the voting of lightly's knn_predict / solo-learn's WeightedKNNClassifier).
    Knn {
        #[command(flatten)]
        source: EvalSource,
        /// Neighbours that vote.
        #[arg(long, default_value_t = 200)]
        k: i64,
        /// Vote weight exp(similarity / T) (cosine only).
        #[arg(long, default_value_t = 0.1)]
        temperature: f64,
        /// `cosine` (normalised rows) or `euclidean` (raw rows, weight 1/distance).
        #[arg(long, default_value = "cosine")]
        metric: Metric,
        /// Also report kNN after BERT-whitening fitted on the train embeddings.
        #[arg(long)]
        whiten: bool,
        /// Dimensions kept by the whitening (default: all; implies --whiten).
        #[arg(long)]
        whiten_dim: Option<i64>,
        /// Test rows scored at once (memory: 4 × this × --bank-chunk-rows bytes).
        #[arg(long, default_value_t = 1024)]
        chunk_rows: i64,
        /// Train rows scored at once against a chunk of test rows.
        #[arg(long, default_value_t = 65536)]
        bank_chunk_rows: i64,
    },
    /// Linear probe: multinomial logistic regression with L2 on the train embeddings
    /// (scikit-learn's LogisticRegression objective, L-BFGS), top-1/top-5 on the test ones.
    Linear {
        #[command(flatten)]
        source: EvalSource,
        /// Inverse regularisation strength (scikit-learn's C).
        #[arg(long, default_value_t = 1.0)]
        c: f64,
        /// L-BFGS iterations at most.
        #[arg(long, default_value_t = 1000)]
        max_iter: usize,
    },
    /// Zero-shot classification of labelled image embeddings of a CLIP model (`contrail embed`
    /// of a test split): each class's prompts embedded by the model's text tower, averaged,
    /// and the images ranked against them (OpenCLIP's zero-shot classifier).
    Zeroshot {
        /// Embedding folder of the labelled images (img_emb/ + metadata/ with labels).
        #[arg(long)]
        images: String,
        /// The CLIP job's file (TOML): the model and tokenizer.
        #[arg(long)]
        config: String,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Checkpoint base URL whose LATEST is loaded (default: the job's checkpoint.url).
        #[arg(long)]
        checkpoint: Option<String>,
        /// Use a freshly initialised model instead (the chance baseline).
        #[arg(long, conflicts_with = "checkpoint")]
        random_init: bool,
        /// Class names in label order: comma-separated, `fashion-mnist`, a text file (path or
        /// URL) with one name per line, or the URL of an imported dataset's dataset.json (its
        /// `classes`).
        #[arg(long)]
        classes: String,
        /// Prompt template with `{}` for the class name (repeatable; default "a photo of a {}.");
        /// `openai` and `simple` stand for open_clip's sets of 80 and 7 templates.
        #[arg(long = "template")]
        templates: Vec<String>,
        /// Templates from `openai`, `simple`, or a text file (path or URL) with one template
        /// per line.
        #[arg(long = "templates", conflicts_with = "templates")]
        template_set: Option<String>,
        #[arg(long, default_value = "auto")]
        device: DeviceSetting,
        #[arg(long, default_value = "")]
        s3_endpoint: String,
        /// Also write the numbers to this JSON file.
        #[arg(long)]
        json: Option<String>,
    },
    /// Image→text and text→image recall@1/5/10 over the paired img_emb/ and text_emb/ rows of
    /// one embedding folder (as OpenCLIP's get_clip_metrics), or with several captions per
    /// image (`--group-by`, as CLIP_benchmark scores COCO and Flickr).
    Retrieval {
        /// Embedding folder holding both towers (`contrail embed --tower both`).
        #[arg(long)]
        embeddings: String,
        /// Which rows are captions of one image: `key-stem` (keys equal up to their last `_`,
        /// e.g. `000042_0` … `000042_4`) or `label` (equal labels). Default: row i's caption
        /// belongs to row i's image only.
        #[arg(long)]
        group_by: Option<GroupBy>,
        #[arg(long, default_value = "auto")]
        device: DeviceSetting,
        #[arg(long, default_value = "")]
        s3_endpoint: String,
        /// Also write the numbers to this JSON file.
        #[arg(long)]
        json: Option<String>,
    },
}

/// How `contrail eval retrieval --group-by` finds the captions of one image.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum GroupBy {
    /// The sample key without its last `_suffix`.
    KeyStem,
    /// The sample's label.
    Label,
}

/// The model a command loads: a job file, and its checkpoint or its untrained model.
#[derive(clap::Args)]
pub struct ModelSource {
    /// Job file (TOML): the model to build.
    #[arg(long)]
    pub config: String,
    /// Override a config key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Checkpoint base URL whose LATEST is loaded (default: the job's checkpoint.url).
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// Use a freshly initialised model instead (seeded by train.seed: the untrained baseline).
    #[arg(long, conflicts_with = "checkpoint")]
    pub random_init: bool,
}

/// `contrail embed`'s flags.
#[derive(clap::Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelSource,
    /// Shards to embed (default: the job's data.url).
    #[arg(long)]
    pub data: Option<String>,
    /// Destination folder URL.
    #[arg(long)]
    pub out: String,
    /// `image` (img_emb/), `text` (text_emb/, CLIP) or `both` (CLIP).
    #[arg(long, default_value = "image")]
    pub tower: EmbedTower,
    /// Samples per forward pass.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Worker processes sharing the shards through a local coordinator's leases (0: embed in
    /// this process). The coordinator listens on the job's cluster.grpc_addr/http_addr.
    #[arg(long, default_value_t = 0)]
    pub workers: u32,
    /// `auto`, `cpu`, `cuda` or `cuda:N` (with --workers: the job's cluster.device is set to it).
    #[arg(long, default_value = "auto")]
    pub device: DeviceSetting,
}

/// `contrail export`'s arguments.
#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelSource,
    /// `open_clip`, `timm`, `torchvision` or `hf` (a BERT text tower for transformers).
    #[arg(long)]
    pub format: ExportFormat,
    /// Destination folder URL (any storage); files in it of the same names are replaced.
    #[arg(long)]
    pub out: String,
}

/// The labelled train and test embedding folders of a classification evaluation.
#[derive(clap::Args)]
pub struct EvalSource {
    /// Embedding folder of the train split (clip-retrieval layout: img_emb/, text_emb/,
    /// metadata/ with a label column), any storage URL.
    #[arg(long)]
    pub train: String,
    /// Embedding folder of the test split.
    #[arg(long)]
    pub test: String,
    /// Which tower's embeddings: `image` (img_emb/) or `text` (text_emb/).
    #[arg(long, default_value = "image", value_parser = parse_tower)]
    pub tower: Tower,
    /// `auto` (GPU 0 when there is one), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSetting,
    /// Endpoint override for S3-compatible servers.
    #[arg(long, default_value = "")]
    pub s3_endpoint: String,
    /// Also write the numbers to this JSON file.
    #[arg(long)]
    pub json: Option<String>,
}

fn parse_tower(s: &str) -> Result<Tower, String> {
    match s {
        "image" => Ok(Tower::Image),
        "text" => Ok(Tower::Text),
        _ => Err(format!("tower {s:?} must be \"image\" or \"text\"")),
    }
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// For every epoch in the audit: was each sample of the dataset trained exactly once?
    /// Exit 0 if so; 1 listing the repeated, missing and unknown samples otherwise.
    Check {
        /// The job's `[audit] url`.
        #[arg(long)]
        audit: String,
        /// The job's `data.url` (the same spec, so shard names match).
        #[arg(long)]
        data: String,
        /// S3-compatible endpoint for s3:// URLs (as `data.s3_endpoint`).
        #[arg(long, default_value = "")]
        s3_endpoint: String,
        /// Also write the per-epoch result as JSON to this file.
        #[arg(long)]
        json: Option<String>,
    },
}

/// What every rank process of a node worker needs.
#[derive(clap::Args, Clone, Debug)]
pub struct RankArgs {
    /// gRPC address of the coordinator.
    #[arg(long, env = "CONTRAIL_COORDINATOR")]
    pub coordinator: String,
    /// Address for the collective backend to listen on (port 0: any free port; with several
    /// local ranks and a fixed port P, local rank i listens on P + i). Must be reachable by
    /// the other workers.
    #[arg(long, env = "CONTRAIL_COLLECTIVE_BIND", default_value = "127.0.0.1:0")]
    pub bind: String,
    /// Seconds to keep trying to reach the coordinator at start-up.
    #[arg(long, default_value_t = 120)]
    pub connect_wait_secs: u64,
    /// libtorch intra-op threads per rank (0: libtorch's default, one per core, or with
    /// several local ranks this machine's cores ÷ local ranks).
    #[arg(long, env = "CONTRAIL_TORCH_THREADS", default_value_t = 0)]
    pub threads: i32,
}
