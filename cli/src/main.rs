//! `contrail`: the user-facing command. Thin: parse, make the one async runtime, call into the
//! library (`contrail_cli`) or the worker crate.

use anyhow::Context;
use clap::Parser;
use contrail_cli::args::{AuditCommand, Cli, Command, DataCommand};
use contrail_cli::{audit, commands, eval, export, k8s, local_cluster, node_worker, status_client};
use contrail_common::auth::JobToken;
use contrail_data::import::ImportOptions;
use contrail_worker::embed::leased::{run_embed_worker, EmbedWorkerOptions};
use contrail_worker::process::node::NodeRank;
use std::time::Duration;

fn main() {
    commands::init_tracing();
    let cli = Cli::parse();
    let result = commands::async_runtime().and_then(|rt| match cli.command {
        Command::Local {
            workers,
            nodes,
            local_ranks,
            config,
            overrides,
            verbose,
        } => {
            let (nodes, local_ranks) = match (workers, nodes) {
                (Some(w), _) => (w, 1),
                (None, Some(n)) => (n, local_ranks),
                (None, None) => (2, 1),
            };
            local_cluster::run_local(&rt, &config, nodes, local_ranks, &overrides, verbose)
        }
        Command::Worker {
            rank,
            local_ranks,
            gpus,
        } => node_worker::run_node_worker(&rt, &rank, local_ranks, gpus.as_deref()),
        Command::Rank {
            rank,
            node,
            local_rank,
            local_ranks,
            gpu,
        } => JobToken::require_env()
            .context("the rank's job token")
            .and_then(|token| {
                let slot = NodeRank {
                    node,
                    local_rank,
                    local_ranks,
                    gpu,
                };
                node_worker::run_rank(&rt, &rank, slot, token)
            }),
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
                DataCommand::Index {
                    data,
                    split,
                    overwrite,
                    parallel,
                    s3_endpoint,
                },
        } => commands::index(
            &rt,
            &data,
            &s3_endpoint,
            &contrail_data::index::IndexOptions {
                split,
                overwrite,
                parallel,
                ..Default::default()
            },
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
                    test_fraction,
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
                test_fraction,
            },
        ),
        Command::Status { coordinator, watch } => status_client::status(&rt, &coordinator, watch),
        Command::Embed { args } => commands::embed(&rt, args),
        Command::Export { args } => export::run(&rt, args),
        Command::EmbedWorker {
            coordinator,
            out,
            tower,
            batch,
            checkpoint,
            random_init,
            connect_wait_secs,
            threads,
        } => JobToken::require_env()
            .context("the embed worker's job token")
            .and_then(|token| {
                run_embed_worker(
                    &rt,
                    &EmbedWorkerOptions {
                        coordinator,
                        out,
                        tower,
                        batch,
                        checkpoint,
                        random_init,
                        connect_wait: Duration::from_secs(connect_wait_secs),
                        torch_threads: threads,
                        token,
                    },
                )
            })
            .map(|summary| {
                println!(
                    "embed worker: {} parts, {} rows, {} skipped ({})",
                    summary.parts,
                    summary.rows,
                    summary.skipped_total(),
                    summary.phases.describe()
                )
            }),
        Command::Eval { command } => eval::run(&rt, command),
        Command::Audit {
            command:
                AuditCommand::Check {
                    audit,
                    data,
                    s3_endpoint,
                    json,
                },
        } => audit::check_audit(&rt, &audit, &data, &s3_endpoint, json.as_deref()).map(|ok| {
            if !ok {
                eprintln!("audit check failed: not every sample was trained exactly once");
                std::process::exit(1);
            }
        }),
        Command::K8s { command } => k8s::run(&rt, command),
        Command::Token => JobToken::generate()
            .map(|t| println!("{}", t.expose()))
            .map_err(Into::into),
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
