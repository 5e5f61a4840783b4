//! `contrail eval knn|linear|zeroshot|retrieval`: evaluation of embedding folders written in
//! clip-retrieval's layout (`contrail embed`, or any `img_emb/*.npy` + `metadata/*.parquet`).
//! Each prints a table and, with `--json`, writes the same numbers as JSON.

use anyhow::{Context, Result};
use contrail_common::config::DeviceSetting;
use contrail_common::JobConfig;
use contrail_data::embeddings::{self, Tower};
use contrail_worker::embed::{checkpoint_base, load_model};
use contrail_worker::eval::knn::{self, KnnOptions};
use contrail_worker::eval::linear::{LinearOptions, LinearProbe};
use contrail_worker::eval::whiten::Whitening;
use contrail_worker::eval::{retrieval, zeroshot, Bank};
use contrail_worker::process::caption_tokens;
use contrail_worker::process::device::choose_device;
use contrail_worker::process::evaluation::prompt_classifier;
use serde_json::json;
use tch::{Device, Tensor};
use tokio::runtime::Runtime;

use crate::args::{EvalCommand, EvalSource, GroupBy};

/// Runs one `contrail eval` subcommand.
pub fn run(rt: &Runtime, command: EvalCommand) -> Result<()> {
    match command {
        EvalCommand::Knn {
            source,
            k,
            temperature,
            metric,
            whiten,
            whiten_dim,
            chunk_rows,
            bank_chunk_rows,
        } => {
            let device = device_for(source.device)?;
            let train = load_bank(rt, &source, &source.train, true, device)?;
            let test = load_bank(rt, &source, &source.test, true, device)?;
            let options = KnnOptions {
                k,
                temperature,
                metric,
                chunk_rows,
                bank_chunk_rows,
            };
            let started = std::time::Instant::now();
            let plain = knn::classify(&train, &test, options)?;
            let seconds = started.elapsed().as_secs_f64();
            let mut rows = vec![("kNN".to_string(), plain)];
            let mut report = json!({
                "train": source.train, "test": source.test, "k": k,
                "temperature": temperature, "metric": metric.as_str(),
                "train_rows": train.rows(), "test_rows": test.rows(), "dim": train.dim(),
                "knn": plain, "knn_seconds": seconds,
            });
            if whiten || whiten_dim.is_some() {
                let w = Whitening::fit(&train, whiten_dim)?;
                let white = knn::classify(&w.apply_bank(&train)?, &w.apply_bank(&test)?, options)?;
                let d = whiten_dim.unwrap_or(train.dim());
                rows.push((format!("kNN, whitened to {d} dims"), white));
                report["knn_whitened"] = json!(white);
                report["whiten_dim"] = json!(d);
            }
            println!(
                "kNN (k = {k}, {metric}{}) on {} test rows against {} train rows of dim {}",
                if metric == knn::Metric::Cosine {
                    format!(", T = {temperature}")
                } else {
                    String::new()
                },
                test.rows(),
                train.rows(),
                train.dim()
            );
            print_table(&rows);
            eprintln!("kNN took {seconds:.2} s (after reading the folders)");
            write_json(source.json.as_deref(), &report)
        }
        EvalCommand::Linear {
            source,
            c,
            max_iter,
        } => {
            let device = device_for(source.device)?;
            let train = load_bank(rt, &source, &source.train, true, device)?;
            let test = load_bank(rt, &source, &source.test, true, device)?;
            train.same_dim(&test)?;
            let options = LinearOptions {
                c,
                max_iter,
                ..Default::default()
            };
            eprintln!(
                "fitting a {}-class linear probe on {} rows of dim {} (C = {c})",
                train.classes()?,
                train.rows(),
                train.dim()
            );
            let (probe, fit) = LinearProbe::fit(&train, options)?;
            if !fit.converged {
                eprintln!(
                    "warning: L-BFGS stopped after {max_iter} iterations before converging \
                     (raise --max-iter)"
                );
            }
            let acc = probe.evaluate(&test)?;
            print_table(&[("linear probe".to_string(), acc)]);
            let report = json!({
                "train": source.train, "test": source.test, "c": c,
                "train_rows": train.rows(), "test_rows": test.rows(), "dim": train.dim(),
                "linear": acc, "fit": fit,
            });
            write_json(source.json.as_deref(), &report)
        }
        EvalCommand::Zeroshot {
            images,
            config,
            overrides,
            checkpoint,
            random_init,
            classes,
            templates,
            template_set,
            device: setting,
            s3_endpoint,
            json,
        } => {
            let device = device_for(setting)?;
            let cfg = JobConfig::from_file(&config, &overrides)?;
            let names = zeroshot_classes(rt, &classes, &s3_endpoint)?;
            let templates = match template_set {
                Some(set) if matches!(set.as_str(), "openai" | "simple") => {
                    zeroshot::expand_templates(&[set])
                }
                Some(file) => text_lines(rt, &file, &s3_endpoint, "--templates")?,
                None if templates.is_empty() => zeroshot::DEFAULT_TEMPLATES
                    .iter()
                    .map(|t| t.to_string())
                    .collect(),
                None => zeroshot::expand_templates(&templates),
            };
            zeroshot::check_templates(&templates)?;
            let base = checkpoint_base(checkpoint.as_deref(), random_init, &cfg, "zeroshot")?;
            let (model, loaded) = load_model(rt, &cfg, base.as_deref(), device)?;
            let captions = caption_tokens(rt, &cfg)?.with_context(|| {
                format!(
                    "zeroshot: {config} trains objective.kind = {}, which has no text tower (only clip)",
                    cfg.objective.kind.as_str()
                )
            })?;
            let classifier = prompt_classifier(&model, &captions, &names, &templates)?;
            let e = rt.block_on(embeddings::read(&images, &s3_endpoint, Tower::Image))?;
            let bank = bank(&images, &e, Some(e.labels(&images)?), device)?;
            let acc = zeroshot::evaluate(&bank, &classifier)?;
            println!(
                "zero-shot over {} images, {} classes, {} template(s){}",
                bank.rows(),
                names.len(),
                templates.len(),
                if loaded.is_none() {
                    ", randomly initialised model"
                } else {
                    ""
                }
            );
            print_table(&[("zero-shot".to_string(), acc)]);
            write_json(
                json.as_deref(),
                &json!({
                    "images": images, "classes": names, "templates": templates,
                    "checkpoint": loaded, "rows": bank.rows(), "zeroshot": acc,
                }),
            )
        }
        EvalCommand::Retrieval {
            embeddings,
            group_by,
            device: setting,
            s3_endpoint,
            json,
        } => {
            let device = device_for(setting)?;
            let read = |tower| rt.block_on(embeddings::read(&embeddings, &s3_endpoint, tower));
            let (img, txt) = (read(Tower::Image)?, read(Tower::Text)?);
            let texts = bank(&embeddings, &txt, None, device)?;
            let r = match group_by {
                None => {
                    let images = bank(&embeddings, &img, None, device)?;
                    let r = retrieval::evaluate(&images, &texts, None)?;
                    println!("retrieval over {} image–text pairs", r.pairs);
                    r
                }
                Some(by) => {
                    let (first_rows, image_of) = caption_groups(&embeddings, &img, by)?;
                    let all = bank(&embeddings, &img, None, device)?;
                    let rows = Tensor::from_slice(&first_rows).to_device(device);
                    let images =
                        Bank::new(&embeddings, all.embeddings.index_select(0, &rows), None)?;
                    let r = retrieval::evaluate_grouped(&images, &texts, &image_of, None)?;
                    println!(
                        "retrieval over {} images and {} captions ({:.2} per image)",
                        r.images,
                        r.pairs,
                        r.pairs as f64 / r.images as f64
                    );
                    r
                }
            };
            println!(
                "{:<16} {:>7} {:>7} {:>7} {:>10}",
                "", "R@1", "R@5", "R@10", "mean rank"
            );
            for (name, d) in [
                ("image → text", r.image_to_text),
                ("text → image", r.text_to_image),
            ] {
                println!(
                    "{name:<16} {:>7.2} {:>7.2} {:>7.2} {:>10.2}",
                    100.0 * d.recall[0],
                    100.0 * d.recall[1],
                    100.0 * d.recall[2],
                    d.mean_rank
                );
            }
            println!("mean recall {:.2}", 100.0 * r.mean_recall);
            write_json(
                json.as_deref(),
                &json!({ "embeddings": embeddings, "retrieval": r }),
            )
        }
    }
}

/// The captions of each image under `--group-by`: the first row of every group (its image
/// embedding stands for the group) and, for every row, its group's index. The rows of one
/// group must hold the same image: their image embeddings may differ by rounding only.
fn caption_groups(
    url: &str,
    e: &embeddings::Embeddings,
    by: GroupBy,
) -> Result<(Vec<i64>, Vec<i64>)> {
    if e.records.is_empty() {
        anyhow::bail!("retrieval --group-by: {url} has no metadata (keys, labels)");
    }
    let labels = match by {
        GroupBy::Label => Some(e.labels(url)?),
        GroupBy::KeyStem => None,
    };
    let mut index: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    let mut first_rows = Vec::new();
    let mut image_of = Vec::with_capacity(e.records.len());
    let dim = e.matrix.dim;
    for (row, rec) in e.records.iter().enumerate() {
        let group = match &labels {
            Some(l) => l[row].to_string(),
            None => match rec.key.rsplit_once('_') {
                Some((stem, _)) => stem.to_string(),
                None => anyhow::bail!(
                    "retrieval --group-by key-stem: key {:?} (row {row}) has no `_` before a \
                     caption number",
                    rec.key
                ),
            },
        };
        let next = first_rows.len() as i64;
        let g = *index.entry(group.clone()).or_insert(next);
        if g == next {
            first_rows.push(row as i64);
        } else {
            let first = first_rows[g as usize] as usize;
            let a = &e.matrix.data[first * dim..(first + 1) * dim];
            let b = &e.matrix.data[row * dim..(row + 1) * dim];
            let diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            if diff > 1e-4 {
                anyhow::bail!(
                    "retrieval --group-by: rows {first} and {row} of {url} are in group {group:?} \
                     but hold different images (embeddings differ by {diff})"
                );
            }
        }
        image_of.push(g);
    }
    Ok((first_rows, image_of))
}

/// Class names for zero-shot: the `classes` of a dataset.json (a URL ending in it), or what
/// `contrail data import --classes` takes.
fn zeroshot_classes(rt: &Runtime, arg: &str, s3_endpoint: &str) -> Result<Vec<String>> {
    let names = match arg.strip_suffix("dataset.json") {
        Some(folder) => {
            rt.block_on(contrail_data::import::read_manifest(folder, s3_endpoint))?
                .classes
        }
        None if arg.contains("://") || std::path::Path::new(arg).is_file() => {
            text_lines(rt, arg, s3_endpoint, "--classes")?
        }
        None => crate::commands::class_names(Some(arg)),
    };
    if names.is_empty() || names.iter().any(|n| n.is_empty()) {
        anyhow::bail!("zeroshot: --classes {arg:?} gives no usable class names");
    }
    Ok(names)
}

/// The non-empty lines of a text file (a path or any storage URL), trimmed.
fn text_lines(rt: &Runtime, arg: &str, s3_endpoint: &str, flag: &str) -> Result<Vec<String>> {
    let bytes = rt
        .block_on(contrail_common::checkpoint::read_bytes(arg, s3_endpoint))
        .with_context(|| format!("{flag}: reading {arg}"))?
        .with_context(|| format!("{flag}: {arg} does not exist"))?;
    let text = String::from_utf8(bytes.to_vec())
        .with_context(|| format!("{flag}: {arg} is not UTF-8 text"))?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if lines.is_empty() {
        anyhow::bail!("{flag}: {arg} holds no lines");
    }
    Ok(lines)
}

/// The device a `--device` setting names on this machine.
pub fn device_for(setting: DeviceSetting) -> Result<Device> {
    choose_device(setting, Some(0), tch::Cuda::device_count() as usize)
}

/// The `tower` embeddings (and labels, when `labelled`) of an embedding folder as a bank.
fn load_bank(
    rt: &Runtime,
    source: &EvalSource,
    url: &str,
    labelled: bool,
    device: Device,
) -> Result<Bank> {
    let e = rt.block_on(embeddings::read(url, &source.s3_endpoint, source.tower))?;
    let labels = if labelled { Some(e.labels(url)?) } else { None };
    bank(url, &e, labels, device)
}

fn bank(
    url: &str,
    e: &embeddings::Embeddings,
    labels: Option<Vec<i64>>,
    device: Device,
) -> Result<Bank> {
    let m = &e.matrix;
    let x = Tensor::from_slice(&m.data)
        .view([m.rows as i64, m.dim as i64])
        .to_device(device);
    let labels = labels.map(|l| Tensor::from_slice(&l));
    Bank::new(url, x, labels).with_context(|| format!("checking {url}"))
}

fn print_table(rows: &[(String, contrail_worker::eval::TopK)]) {
    let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0).max(6);
    println!("{:<width$}  {:>7}  {:>7}", "", "top-1", "top-5");
    for (name, acc) in rows {
        println!(
            "{name:<width$}  {:>7.2}  {:>7.2}",
            100.0 * acc.top1,
            100.0 * acc.top5
        );
    }
}

fn write_json(path: Option<&str>, report: &serde_json::Value) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let text = serde_json::to_string_pretty(report)? + "\n";
    std::fs::write(path, text).with_context(|| format!("writing {path}"))?;
    eprintln!("wrote {path}");
    Ok(())
}
