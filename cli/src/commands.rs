//! The small subcommands of `contrail`: `coordinator`, `data synth`, `data import`, `embed`,
//! `info`; and the process set-up they share (logging, the one async runtime).

use anyhow::{bail, Context, Result};
use contrail_common::JobConfig;
use contrail_data::import::{
    import_idx, import_listing, DatasetManifest, ImportOptions, FASHION_MNIST_CLASSES,
};
use contrail_worker::embed::{
    checkpoint_base, load_model, write_embeddings, EmbedOptions, EmbedTower,
};

use crate::args::EmbedArgs;
use tokio::runtime::Runtime;

/// Logs go to stderr, filtered by `CONTRAIL_LOG` (default: warnings only).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONTRAIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The process's async runtime: coordinator RPCs, heartbeats, shard readers and HTTP all run on
/// it while training keeps the main thread (tch is synchronous), so two threads suffice.
pub fn async_runtime() -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `contrail coordinator`: the coordinator alone, as the `contrail-coordinator` binary.
pub fn run_coordinator(rt: &Runtime, path: &str, overrides: &[String]) -> Result<()> {
    let cfg = JobConfig::from_file(path, overrides)?;
    let code = rt.block_on(contrail_coordinator::run_standalone(cfg))?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// `contrail data index`: dataset.json for shards contrail did not import.
pub fn index(
    rt: &Runtime,
    data: &str,
    s3_endpoint: &str,
    options: &contrail_data::index::IndexOptions,
) -> Result<()> {
    let started = std::time::Instant::now();
    let m = rt.block_on(contrail_data::index::index_shards(
        data,
        s3_endpoint,
        options,
    ))?;
    print_manifest(&m, data, started);
    Ok(())
}

/// `contrail data synth`: the built-in dataset of drawn shapes.
pub fn synth(
    rt: &Runtime,
    out: &str,
    samples: u64,
    shard_size: u64,
    image_size: u32,
    seed: u64,
    s3_endpoint: &str,
) -> Result<()> {
    let started = std::time::Instant::now();
    let summary = rt.block_on(contrail_data::synth::write_synth_dataset(
        out,
        s3_endpoint,
        samples,
        shard_size,
        image_size,
        seed,
    ))?;
    println!(
        "wrote {} samples in {} shards to {} ({:.1}s)",
        summary.samples,
        summary.shards,
        out,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `contrail data import`: a dataset in a layout users have, as WebDataset shards.
pub fn import(rt: &Runtime, format: &str, source: &str, options: ImportOptions) -> Result<()> {
    let started = std::time::Instant::now();
    let manifest = match format {
        "idx" => {
            let mut options = options.clone();
            if options.classes.is_empty() {
                options.classes = (0..10).map(|d| d.to_string()).collect();
            }
            rt.block_on(import_idx(std::path::Path::new(source), &options))?
        }
        "folder" | "csv" => rt.block_on(import_listing(
            format,
            std::path::Path::new(source),
            &options,
            JobConfig::default().data.max_image_pixels,
        ))?,
        other => bail!("data import: format {other:?} must be one of idx, folder, csv"),
    };
    print_manifest(&manifest, &options.out, started);
    Ok(())
}

/// What `data import` and `data index` wrote: each split's counts, the skipped input, where.
fn print_manifest(m: &DatasetManifest, out: &str, started: std::time::Instant) {
    for (split, s) in &m.splits {
        println!(
            "{split}: {} samples in {} shards ({:.1} MB)",
            s.samples,
            s.shards.len(),
            s.bytes as f64 / 1e6
        );
    }
    for (reason, n) in &m.skipped {
        println!("skipped: {n} ({reason})");
    }
    println!(
        "wrote {}/dataset.json in {:.1} s",
        out.trim_end_matches('/'),
        started.elapsed().as_secs_f64()
    );
}

/// Class names from `--classes`: a comma-separated list, or a known dataset's name; empty
/// (the layout's default) when not given.
pub fn class_names(arg: Option<&str>) -> Vec<String> {
    match arg {
        None => Vec::new(),
        Some("fashion-mnist") => FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        Some(list) => list.split(',').map(|s| s.trim().to_string()).collect(),
    }
}

/// `contrail embed`: in this process, or (`--workers N`) through a local coordinator whose job
/// is the dataset, with N `contrail embed-worker` processes sharing its shards.
pub fn embed(rt: &Runtime, args: EmbedArgs) -> Result<()> {
    let mut cfg = JobConfig::from_file(&args.model.config, &args.model.overrides)?;
    if let Some(data) = &args.data {
        cfg.data.url = data.clone();
    }
    let base = checkpoint_base(
        args.model.checkpoint.as_deref(),
        args.model.random_init,
        &cfg,
        "embed",
    )?;
    let started = std::time::Instant::now();
    if args.workers > 0 {
        // The coordinator's job is the export: its data.url is the dataset, its lease book
        // the work list; nothing else of the training job runs.
        cfg.cluster.device = args.device;
        cfg.make_export(args.workers);
        let mut flags = embed_worker_flags(&args.out, args.tower, base.as_deref(), base.is_none());
        flags.extend(["--batch".into(), args.batch.to_string()]);
        let child: Vec<String> = std::iter::once("embed-worker".to_string())
            .chain(flags)
            .collect();
        crate::local_cluster::run_cluster(rt, &cfg, args.workers, 1, &|_| child.clone(), false)?;
        println!(
            "embedded {} with {} workers into {} in {:.1} s",
            cfg.data.url,
            args.workers,
            args.out,
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let options = EmbedOptions {
        data: cfg.data.url.clone(),
        out: args.out.clone(),
        batch: args.batch,
        tower: args.tower,
        device: crate::eval::device_for(args.device)?,
    };
    let (model, loaded) = load_model(rt, &cfg, base.as_deref(), options.device)?;
    let summary = write_embeddings(rt, &cfg, &model, &options)?;
    println!(
        "wrote {} rows in {} parts to {} ({} skipped{}, {} shards) in {:.1} s{}",
        summary.rows,
        summary.parts,
        options.out,
        summary.skipped_total(),
        skipped_reasons(&summary.skipped),
        summary.shards,
        started.elapsed().as_secs_f64(),
        match loaded {
            Some(dir) => format!(", from {dir}"),
            None => ", randomly initialised model".into(),
        }
    );
    println!("time: {}", summary.phases.describe());
    Ok(())
}

/// The flags of `contrail embed-worker` for an export to `out`: the checkpoint base when given
/// (else the job's `checkpoint.url`), or `--random-init`. `contrail embed --workers` and
/// `contrail k8s render --embed-out` start their workers with these.
pub fn embed_worker_flags(
    out: &str,
    tower: EmbedTower,
    checkpoint: Option<&str>,
    random_init: bool,
) -> Vec<String> {
    let mut flags = vec![
        "--out".to_string(),
        out.to_string(),
        "--tower".into(),
        tower.as_str().into(),
    ];
    if let Some(c) = checkpoint {
        flags.extend(["--checkpoint".into(), c.to_string()]);
    }
    if random_init {
        flags.push("--random-init".into());
    }
    flags
}

/// ": 1 corrupt_image, 3 missing_caption" for a summary line, or "" when nothing was skipped.
fn skipped_reasons(skipped: &std::collections::BTreeMap<String, u64>) -> String {
    if skipped.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = skipped.iter().map(|(r, n)| format!("{n} {r}")).collect();
    format!(": {}", parts.join(", "))
}

/// `contrail info`: what the linked libtorch can see. A GPU machine that prints
/// `cuda available: false` usually means libtorch_cuda was dropped at link time.
pub fn info() {
    println!("contrail {}", env!("CARGO_PKG_VERSION"));
    println!("libtorch intra-op threads: {}", tch::get_num_threads());
    println!("cuda available: {}", tch::Cuda::is_available());
    println!("cuda devices: {}", tch::Cuda::device_count());
    println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
    if tch::Cuda::is_available() {
        let t = tch::Tensor::ones([1024, 1024], (tch::Kind::Float, tch::Device::Cuda(0)));
        let s = t.matmul(&t).sum(tch::Kind::Float).double_value(&[]);
        println!("cuda matmul check: {s} (expected {})", 1024.0f64.powi(3));
    }
}
