//! `contrail export`: a job's checkpoint (or its untrained model) written in the layout and
//! config of open_clip, timm or torchvision (`contrail_worker::export`), to any storage URL.

use anyhow::{Context, Result};
use contrail_common::checkpoint::{join_url, read_bytes, write_bytes};
use contrail_common::config::{ObjectiveKind, TokenizerSource};
use contrail_common::JobConfig;
use contrail_worker::embed::{checkpoint_base, load_model};
use contrail_worker::export::{export, ExportInput};
use contrail_worker::process::caption_tokens;
use tokio::runtime::Runtime;

use crate::args::ExportArgs;

pub fn run(rt: &Runtime, args: ExportArgs) -> Result<()> {
    let cfg = JobConfig::from_file(&args.model.config, &args.model.overrides)?;
    let base = checkpoint_base(
        args.model.checkpoint.as_deref(),
        args.model.random_init,
        &cfg,
        "export",
    )?;
    let (model, loaded) = load_model(rt, &cfg, base.as_deref(), tch::Device::Cpu)?;
    let captions = caption_tokens(rt, &cfg)?;
    let tokenizer_json = match &cfg.model.text.tokenizer {
        TokenizerSource::Url(url) if cfg.objective.kind == ObjectiveKind::Clip => Some(
            rt.block_on(read_bytes(url, &cfg.data.s3_endpoint))?
                .with_context(|| format!("the tokenizer {url} is gone"))?,
        ),
        _ => None,
    };
    let written = export(
        &ExportInput {
            cfg: &cfg,
            model: &model,
            tokenizer: captions.as_ref().map(|c| c.tokenizer.as_ref()),
            tokenizer_json: tokenizer_json.as_deref(),
        },
        args.format,
    )?;
    let mut total = 0;
    for (name, bytes) in written.files {
        let url = join_url(&args.out, &name);
        total += bytes.len();
        rt.block_on(write_bytes(&url, &cfg.data.s3_endpoint, bytes))
            .with_context(|| format!("writing {url}"))?;
        println!("wrote {url}");
    }
    println!(
        "exported {} to {} for {} ({:.1} MiB)",
        match &loaded {
            Some(dir) => dir.as_str(),
            None => "the randomly initialised model",
        },
        args.out,
        args.format.as_str(),
        total as f64 / (1024.0 * 1024.0)
    );
    for note in written.notes {
        println!("{}", note.replace("DIR", &args.out));
    }
    Ok(())
}
