//! `contrail`: the user-facing command. Thin: parse, make the one async runtime, call into the
//! library (`contrail_cli`) or the worker crate.

use anyhow::Context;
use clap::Parser;
use contrail_cli::args::{Cli, Command, DataCommand};
use contrail_cli::{commands, eval, k8s, local_cluster, status_client};
use contrail_data::import::ImportOptions;
use contrail_worker::embed::EmbedOptions;
use contrail_worker::process::{run_worker, WorkerOptions};
use std::time::Duration;

fn main() {
    commands::init_tracing();
    let cli = Cli::parse();
    let result = commands::async_runtime().and_then(|rt| match cli.command {
        Command::Local {
            workers,
            config,
            overrides,
            verbose,
        } => local_cluster::run_local(&rt, &config, workers, &overrides, verbose),
        Command::Worker {
            coordinator,
            bind,
            connect_wait_secs,
            threads,
        } => run_worker(
            &rt,
            &WorkerOptions {
                torch_threads: threads,
                coordinator,
                collective_bind: bind,
                connect_wait: Duration::from_secs(connect_wait_secs),
            },
        ),
        Command::Coordinator { config, overrides } => {
            commands::run_coordinator(&rt, &config, &overrides)
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
        } => commands::synth(
            &rt,
            &out,
            samples,
            shard_size,
            image_size,
            seed,
            &s3_endpoint,
        ),
        Command::Data {
            command:
                DataCommand::Import {
                    format,
                    source,
                    out,
                    classes,
                    caption_template,
                    shard_size,
                    limit,
                    s3_endpoint,
                },
        } => commands::import(
            &rt,
            &format,
            &source,
            ImportOptions {
                out,
                s3_endpoint,
                shard_size,
                classes: commands::class_names(classes.as_deref()),
                caption_template,
                limit,
            },
        ),
        Command::Status { coordinator, watch } => status_client::status(&rt, &coordinator, watch),
        Command::Embed {
            config,
            overrides,
            checkpoint,
            random_init,
            data,
            out,
            batch,
            part_rows,
            device,
        } => commands::embed(&rt, &config, &overrides, checkpoint, random_init, |cfg| {
            Ok(EmbedOptions {
                data: data.unwrap_or_else(|| cfg.data.url.clone()),
                out,
                batch,
                part_rows,
                device: eval::device_for(device)?,
            })
        }),
        Command::Eval { command } => eval::run(&rt, command),
        Command::K8s { command } => k8s::run(&rt, command),
        Command::Info => {
            commands::info();
            Ok(())
        }
    });
    if let Err(e) = result.context("contrail failed") {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
