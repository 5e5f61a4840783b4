//! `GET /metrics`: the status report in Prometheus' text exposition format (version 0.0.4),
//! with the conventional suffixes (`_total` for counters, `_seconds` for durations). Every
//! family has HELP and TYPE lines; a value that is not known yet (the loss before the first
//! step) is left out rather than reported as 0.

use contrail_common::status::{
    voted_rounds, ExpertBlockStatus, JobState, StatusReport, WorkerLiveness, WorkerStatus,
};
use std::fmt::Write;

/// One number of an MoE block's status.
type BlockValue = fn(&ExpertBlockStatus) -> f64;
/// One number of a worker's status.
type WorkerValue = fn(&WorkerStatus) -> f64;

/// The content type Prometheus expects for this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One metric family being written.
struct Family<'a> {
    out: &'a mut String,
}

fn family<'a>(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
    Family { out }
}

impl Family<'_> {
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            let body: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", body.join(","));
        }
        let _ = writeln!(self.out, " {}", number(value));
        self
    }
}

/// A gauge or counter with a single unlabelled sample, when the value is known.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: Option<f64>) {
    if let Some(v) = value {
        family(out, name, kind, help).sample(name, &[], v);
    }
}

/// Renders `r` for Prometheus.
pub fn render_metrics(r: &StatusReport) -> String {
    let mut out = String::new();
    let o = &mut out;
    let states = [
        JobState::WaitingForWorkers,
        JobState::Running,
        JobState::Finished,
        JobState::Failed,
    ];
    let mut f = family(
        o,
        "contrail_job_state",
        "gauge",
        "1 for the job's current state.",
    );
    for s in states {
        f.sample(
            "contrail_job_state",
            &[("state", s.as_str())],
            f64::from(u8::from(s == r.state)),
        );
    }
    single(
        o,
        "contrail_world_size",
        "gauge",
        "Workers the job runs on.",
        Some(f64::from(r.world_size)),
    );
    single(
        o,
        "contrail_generation",
        "gauge",
        "Rendezvous generation (grows when the world re-forms).",
        Some(r.generation as f64),
    );
    single(
        o,
        "contrail_rollbacks_total",
        "counter",
        "Automatic rollbacks to the latest checkpoint (an MoE worker died).",
        Some(r.rollbacks.len() as f64),
    );
    let j = r.journal.as_ref();
    single(
        o,
        "contrail_journal_writes_total",
        "counter",
        "Writes of the coordinator's journal.",
        j.map(|j| j.writes as f64),
    );
    single(
        o,
        "contrail_journal_last_write_bytes",
        "gauge",
        "Size of the latest journal write.",
        j.map(|j| j.last_write_bytes as f64),
    );
    single(
        o,
        "contrail_journal_snapshots_total",
        "counter",
        "Journal writes of the whole book (the others are deltas of the lease book).",
        j.map(|j| j.snapshots as f64),
    );
    single(
        o,
        "contrail_journal_last_snapshot_bytes",
        "gauge",
        "Size of the latest journal snapshot.",
        j.map(|j| j.last_snapshot_bytes as f64),
    );
    single(
        o,
        "contrail_journal_encode_seconds_total",
        "counter",
        "Time spent encoding journal snapshots (RPCs wait for the books meanwhile) and deltas.",
        j.map(|j| j.encode_seconds_total),
    );
    single(
        o,
        "contrail_journal_write_seconds_total",
        "counter",
        "Time spent writing the journal to its store.",
        j.map(|j| j.write_seconds_total),
    );
    single(
        o,
        "contrail_journal_write_seconds_max",
        "gauge",
        "The longest single journal write.",
        j.map(|j| j.write_seconds_max),
    );
    single(
        o,
        "contrail_epoch",
        "gauge",
        "Current epoch (0-based).",
        Some(f64::from(r.epoch)),
    );
    single(
        o,
        "contrail_step",
        "gauge",
        "Optimizer steps completed.",
        Some(r.step as f64),
    );
    single(
        o,
        "contrail_steps_estimate",
        "gauge",
        "Steps the whole job will take, once it can be estimated.",
        r.total_steps_estimate.map(|s| s as f64),
    );
    single(
        o,
        "contrail_samples_total",
        "counter",
        "Samples trained since the job started, over all workers.",
        Some(r.samples_seen as f64),
    );
    single(
        o,
        "contrail_samples_per_second",
        "gauge",
        "Recent training throughput over all workers.",
        r.samples_per_sec,
    );
    single(
        o,
        "contrail_loss",
        "gauge",
        "Loss of the latest step (rank 0's global-batch loss).",
        r.loss,
    );
    single(
        o,
        "contrail_learning_rate",
        "gauge",
        "Learning rate of the latest step.",
        r.learning_rate,
    );
    single(
        o,
        "contrail_eta_seconds",
        "gauge",
        "Estimated time until the job finishes.",
        r.eta_seconds,
    );
    single(
        o,
        "contrail_uptime_seconds",
        "gauge",
        "Time since the coordinator started.",
        Some(r.uptime_seconds),
    );

    // The latest round that voted; a round that could not vote only counts as a round.
    let voted = voted_rounds(&r.eval_history).map(|(_, latest)| latest);
    if !r.eval_history.is_empty() {
        single(
            o,
            "contrail_eval_rounds_total",
            "counter",
            "Rounds of online evaluation reported (voted or not).",
            Some(r.eval_history.len() as f64),
        );
    }
    for (name, help, value) in [
        (
            "contrail_eval_knn_top1",
            "Held-out weighted-kNN top-1 accuracy (fraction) of the latest evaluation.",
            voted.and_then(|p| p.knn_top1),
        ),
        (
            "contrail_eval_knn_top5",
            "Held-out weighted-kNN top-5 accuracy (fraction) of the latest evaluation.",
            voted.and_then(|p| p.knn_top5),
        ),
        (
            "contrail_eval_zeroshot_top1",
            "Held-out zero-shot top-1 accuracy (fraction) of the latest evaluation (CLIP jobs).",
            voted.and_then(|p| p.zeroshot_top1),
        ),
        (
            "contrail_eval_retrieval_mean_recall",
            "Held-out image-text retrieval mean recall (R@1/5/10 both ways) of the latest evaluation (CLIP jobs).",
            voted.and_then(|p| p.retrieval_mean_recall),
        ),
        (
            "contrail_eval_step",
            "Training step of the model the latest evaluation measured.",
            voted.map(|p| p.step as f64),
        ),
        (
            "contrail_eval_duration_seconds",
            "Wall time of the latest evaluation (embedding, gathering, voting).",
            voted.map(|p| p.seconds),
        ),
    ] {
        single(o, name, "gauge", help, value);
    }

    let mut f = family(
        o,
        "contrail_shards",
        "gauge",
        "Shards of the current epoch by state.",
    );
    let sh = &r.shards;
    for (state, n) in [
        ("pending", sh.pending),
        ("leased", sh.leased),
        ("done", sh.done),
        ("failed", sh.failed),
    ] {
        f.sample("contrail_shards", &[("state", state)], n as f64);
    }
    let mut f = family(
        o,
        "contrail_bad_samples_total",
        "counter",
        "Samples skipped as bad input, by reason.",
    );
    for (reason, n) in &r.bad_samples {
        f.sample(
            "contrail_bad_samples_total",
            &[("reason", reason)],
            *n as f64,
        );
    }

    let mut f = family(o, "contrail_workers", "gauge", "Workers by liveness.");
    for state in [
        WorkerLiveness::Alive,
        WorkerLiveness::Dead,
        WorkerLiveness::Left,
    ] {
        let n = r.workers.iter().filter(|w| w.state == state).count();
        f.sample("contrail_workers", &[("state", state.as_str())], n as f64);
    }
    // Workers are labelled by rank (empty before the rendezvous) and by id, which is unique.
    let worker_labels = |w: &WorkerStatus| {
        (
            w.rank.map(|r| r.to_string()).unwrap_or_default(),
            w.worker_id.to_string(),
        )
    };
    let per_worker: [(&str, &str, WorkerValue); 2] = [
        (
            "contrail_worker_last_heartbeat_seconds",
            "Seconds since the coordinator last heard from the worker.",
            |w| w.last_heartbeat_ms as f64 / 1000.0,
        ),
        (
            "contrail_worker_step",
            "The latest step the worker reported.",
            |w| w.step as f64,
        ),
    ];
    for (name, help, value) in per_worker {
        let mut f = family(o, name, "gauge", help);
        for w in &r.workers {
            let (rank, id) = worker_labels(w);
            f.sample(name, &[("rank", &rank), ("worker_id", &id)], value(w));
        }
    }

    if let Some(e) = &r.experts {
        single(
            o,
            "contrail_expert_placement_version",
            "gauge",
            "Version of the expert placement the coordinator has adopted.",
            Some(e.placement_version as f64),
        );
        single(
            o,
            "contrail_expert_rebalances_total",
            "counter",
            "Expert placements adopted after the initial one.",
            Some(e.rebalances as f64),
        );
        let mut f = family(
            o,
            "contrail_expert_load",
            "gauge",
            "Share of an MoE block's recent assignments each expert received.",
        );
        for b in &e.blocks {
            let block = b.block.to_string();
            for (x, share) in b.load.iter().enumerate() {
                let expert = x.to_string();
                f.sample(
                    "contrail_expert_load",
                    &[("block", &block), ("layer", &b.label), ("expert", &expert)],
                    *share,
                );
            }
        }
        let per_block: [(&str, &str, BlockValue); 3] = [
            (
                "contrail_expert_load_max_mean",
                "max / mean of the experts' recent load (1 is even).",
                |b| b.load_max_mean,
            ),
            (
                "contrail_expert_worker_load_max_mean",
                "max / mean of the workers' expected load under the current placement.",
                |b| b.worker_load_max_mean,
            ),
            (
                "contrail_expert_dropped_ratio",
                "Share of recent assignments dropped for exceeding an expert's capacity.",
                |b| b.dropped_fraction,
            ),
        ];
        for (name, help, value) in per_block {
            let mut f = family(o, name, "gauge", help);
            for b in &e.blocks {
                f.sample(
                    name,
                    &[("block", &b.block.to_string()), ("layer", &b.label)],
                    value(b),
                );
            }
        }
    }
    out
}

/// Prometheus' number syntax: Rust prints non-finite values differently.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}
