//! The person-readable view of a [`StatusReport`], printed by `contrail status`.

use super::{EvalPoint, ExpertStatus, JobState, StatusReport, WorkerStatus};
use std::fmt::Write;

const BAR_WIDTH: usize = 20;
/// Blocks with more experts show only their busiest ones.
const EXPERTS_LISTED: usize = 16;
const BUSIEST_LISTED: usize = 8;

/// `[#########...........] 45%` for `done` of `total` (clamped to 100%).
pub fn progress_bar(done: u64, total: u64) -> String {
    let frac = if total == 0 {
        0.0
    } else {
        (done as f64 / total as f64).min(1.0)
    };
    let filled = (frac * BAR_WIDTH as f64).floor() as usize;
    format!(
        "[{}{}] {}%",
        "#".repeat(filled),
        ".".repeat(BAR_WIDTH - filled),
        (frac * 100.0).floor() as u64
    )
}

/// Seconds as `h:mm:ss` (rounded; negative and non-finite values show as `?`).
pub fn format_hms(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "?".into();
    }
    let s = seconds.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

pub fn render_status_text(s: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "job {}  (generation {}, world size {}, up {})",
        s.state,
        s.generation,
        s.world_size,
        format_hms(s.uptime_seconds)
    );
    if !s.reason.is_empty() {
        let _ = writeln!(out, "reason: {}", s.reason);
    }
    match s.total_steps_estimate {
        Some(total) => {
            let _ = write!(
                out,
                "step {}/{} {}",
                s.step,
                total,
                progress_bar(s.step, total)
            );
        }
        // The estimate comes from finished shards; a job that has ended needs none.
        None if matches!(s.state, JobState::Finished | JobState::Failed) => {
            let _ = write!(out, "step {}", s.step);
        }
        None => {
            let _ = write!(
                out,
                "step {} (total not known until a shard finishes)",
                s.step
            );
        }
    }
    let _ = write!(out, "  epoch {}", s.epoch);
    if let Some(loss) = s.loss {
        let _ = write!(out, "  loss {loss:.4}");
    }
    if let Some(lr) = s.learning_rate {
        let _ = write!(out, "  lr {lr:.3e}");
    }
    out.push('\n');
    let _ = write!(out, "samples seen {}", s.samples_seen);
    if let Some(rate) = s.samples_per_sec {
        let _ = write!(out, "  {rate:.1} samples/s");
    }
    match (s.state, s.eta_seconds) {
        (JobState::Running, Some(eta)) => {
            let _ = write!(out, "  ETA {}", format_hms(eta));
        }
        (JobState::Running, None) => out.push_str("  ETA ?"),
        _ => {}
    }
    out.push('\n');
    let c = &s.shards;
    let _ = writeln!(
        out,
        "shards (epoch {}): {} done, {} leased, {} pending, {} failed of {}",
        s.epoch, c.done, c.leased, c.pending, c.failed, c.total
    );
    if s.bad_samples.is_empty() {
        out.push_str("bad samples: none\n");
    } else {
        let total: u64 = s.bad_samples.values().sum();
        let parts: Vec<String> = s
            .bad_samples
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(out, "bad samples: {total} ({})", parts.join(", "));
    }
    if let Some(line) = eval_line(&s.eval_history) {
        let _ = writeln!(out, "{line}");
    }
    for r in &s.rollbacks {
        let _ = writeln!(out, "rollback: {r}");
    }
    if let Some(x) = &s.experts {
        render_experts(&mut out, x);
    }
    let _ = writeln!(
        out,
        "workers ({} of {}) on {} node(s):",
        s.workers.len(),
        s.world_size,
        node_count(&s.workers)
    );
    let mut node = None;
    for w in &s.workers {
        // Ranks are node-major, so a node's workers follow each other.
        if node != Some(&w.node) {
            node = Some(&w.node);
            let _ = writeln!(out, "  node {} ({})", w.node, w.host);
        }
        let rank = w.rank.map_or_else(|| "-".to_string(), |r| r.to_string());
        let _ = write!(
            out,
            "    rank {rank:>3} (local {})  {:<21}  {:<5}  step {:>7}  last heard {:>6} ms ago",
            w.local_rank,
            w.address,
            w.state.as_str(),
            w.step,
            w.last_heartbeat_ms
        );
        if !w.shard.is_empty() {
            let _ = write!(out, "  shard {}", w.shard);
        }
        out.push('\n');
    }
    out
}

/// How many distinct nodes `workers` run on.
pub fn node_count(workers: &[WorkerStatus]) -> usize {
    workers
        .iter()
        .map(|w| w.node.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// `held-out kNN top-1 68.0% at step 0 -> 75.6% at step 150 (top-5 99.1%; bank 2048, test
/// 1024)`: the first round that voted next to the latest one; None before any round.
pub fn eval_line(history: &[EvalPoint]) -> Option<String> {
    let latest = history.last()?;
    let (Some(top1), Some(top5)) = (latest.knn_top1, latest.knn_top5) else {
        return Some(format!(
            "held-out kNN at step {}: not measured ({})",
            latest.step, latest.error
        ));
    };
    let sets = format!("bank {}, test {}", latest.bank_samples, latest.test_samples);
    let (first, _) = super::voted_rounds(history)?;
    let now = format!("{:.1}% at step {}", 100.0 * top1, latest.step);
    let mut clip = String::new();
    if let Some(z) = latest.zeroshot_top1 {
        clip += &format!("; zero-shot top-1 {:.1}%", 100.0 * z);
    }
    if let Some(r) = latest.retrieval_mean_recall {
        clip += &format!("; retrieval mean recall {:.1}%", 100.0 * r);
    }
    let line = if std::ptr::eq(first, latest) {
        format!(
            "held-out kNN top-1 {now} (top-5 {:.1}%; {sets})",
            100.0 * top5
        )
    } else {
        format!(
            "held-out kNN top-1 {:.1}% at step {} -> {now} (top-5 {:.1}%; {sets})",
            100.0 * first.knn_top1.unwrap_or(0.0),
            first.step,
            100.0 * top5
        )
    };
    Some(line + &clip)
}

/// One line per MoE block: `moe block 0 (vit 1): load max/mean 1.83 (experts 0..7: 31% 12%
/// ...), workers max/mean 1.40, dropped 2.1%, placement v1`.
fn render_experts(out: &mut String, x: &ExpertStatus) {
    let placement = if x.acknowledged_version < x.placement_version {
        format!(
            "placement v{} (pending, workers on v{})",
            x.placement_version, x.acknowledged_version
        )
    } else {
        format!("placement v{}", x.placement_version)
    };
    let pct = |f: f64| format!("{:.0}%", f * 100.0);
    for b in &x.blocks {
        let _ = write!(out, "moe block {} ({}): ", b.block, b.label);
        if b.load.is_empty() {
            let _ = writeln!(out, "no load reported yet, {placement}");
            continue;
        }
        let n = b.load.len();
        let experts = if n <= EXPERTS_LISTED {
            let shares: Vec<String> = b.load.iter().map(|&f| pct(f)).collect();
            format!("experts 0..{}: {}", n - 1, shares.join(" "))
        } else {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &c| b.load[c].total_cmp(&b.load[a]).then(a.cmp(&c)));
            let top: Vec<String> = order[..BUSIEST_LISTED]
                .iter()
                .map(|&e| format!("e{e} {}", pct(b.load[e])))
                .collect();
            format!("{n} experts, busiest {} ...", top.join(" "))
        };
        let _ = writeln!(
            out,
            "load max/mean {:.2} ({experts}), workers max/mean {:.2}, dropped {:.1}%, {placement}",
            b.load_max_mean,
            b.worker_load_max_mean,
            b.dropped_fraction * 100.0
        );
    }
    if x.rebalances > 0 {
        let _ = writeln!(
            out,
            "moe rebalances: {} (load window {} steps)",
            x.rebalances, x.window_steps
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ExpertBlockStatus, ShardCounts, WorkerLiveness};

    #[test]
    fn bar_and_clock_format() {
        assert_eq!(progress_bar(45, 100), "[#########...........] 45%");
        assert_eq!(progress_bar(0, 0), "[....................] 0%");
        assert_eq!(progress_bar(150, 100), "[####################] 100%");
        assert_eq!(format_hms(3725.4), "1:02:05");
        assert_eq!(format_hms(59.6), "0:01:00");
        assert_eq!(format_hms(f64::NAN), "?");
    }

    #[test]
    fn report_lists_progress_shards_workers_and_bad_samples() {
        let mut s = StatusReport {
            state: JobState::Running,
            generation: 1,
            world_size: 2,
            step: 45,
            total_steps_estimate: Some(100),
            eta_seconds: Some(107.0),
            samples_per_sec: Some(512.34),
            loss: Some(1.23456),
            shards: ShardCounts {
                total: 8,
                pending: 4,
                leased: 1,
                done: 3,
                failed: 0,
            },
            workers: vec![
                WorkerStatus {
                    worker_id: 1,
                    rank: Some(0),
                    node: "h/a".into(),
                    local_rank: 0,
                    host: "h".into(),
                    address: "10.0.0.1:29500".into(),
                    state: WorkerLiveness::Alive,
                    last_heartbeat_ms: 120,
                    shard: "s3://b/x-0003.tar".into(),
                    step: 45,
                },
                WorkerStatus {
                    worker_id: 2,
                    rank: Some(1),
                    node: "h/a".into(),
                    local_rank: 1,
                    host: "h".into(),
                    address: "10.0.0.1:29501".into(),
                    state: WorkerLiveness::Alive,
                    last_heartbeat_ms: 90,
                    shard: String::new(),
                    step: 45,
                },
            ],
            ..Default::default()
        };
        s.bad_samples.insert("decode".into(), 3);
        let text = render_status_text(&s);
        for needle in [
            "job running",
            "step 45/100 [#########...........] 45%",
            "loss 1.2346",
            "512.3 samples/s",
            "ETA 0:01:47",
            "3 done, 1 leased, 4 pending, 0 failed of 8",
            "bad samples: 3 (decode 3)",
            "10.0.0.1:29500",
            "s3://b/x-0003.tar",
            "workers (2 of 2) on 1 node(s):\n  node h/a (h)\n    rank   0 (local 0)",
            "\n    rank   1 (local 1)  10.0.0.1:29501",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        s.state = JobState::Failed;
        s.reason = "rank 1 (10.0.0.2:29500) stopped sending heartbeats".into();
        let text = render_status_text(&s);
        assert!(text.contains("reason: rank 1 (10.0.0.2:29500)"), "{text}");
        assert!(!text.contains("ETA"), "{text}");
        // Without an estimate, only a running job says the total is still unknown.
        s.total_steps_estimate = None;
        let text = render_status_text(&s);
        assert!(text.contains("step 45  epoch"), "{text}");
        s.state = JobState::Running;
        let text = render_status_text(&s);
        assert!(text.contains("step 45 (total not known"), "{text}");
    }

    #[test]
    fn moe_blocks_get_one_line_each() {
        let block = |b: u32, load: Vec<f64>| ExpertBlockStatus {
            block: b,
            label: format!("vit {}", 2 * b + 1),
            load_max_mean: 1.83,
            worker_load_max_mean: 1.4,
            dropped_fraction: 0.021,
            load,
            ..Default::default()
        };
        let mut s = StatusReport {
            experts: Some(ExpertStatus {
                placement_version: 2,
                acknowledged_version: 1,
                rebalances: 1,
                window_steps: 50,
                blocks: vec![
                    block(0, vec![0.31, 0.12, 0.57]),
                    block(1, Vec::new()),
                    block(2, (0..20).map(|e| f64::from(e) / 190.0).collect()),
                ],
            }),
            ..Default::default()
        };
        let text = render_status_text(&s);
        for needle in [
            "moe block 0 (vit 1): load max/mean 1.83 (experts 0..2: 31% 12% 57%), workers \
             max/mean 1.40, dropped 2.1%, placement v2 (pending, workers on v1)\n",
            "moe block 1 (vit 3): no load reported yet",
            "moe block 2 (vit 5): load max/mean 1.83 (20 experts, busiest e19 10% e18 9%",
            "moe rebalances: 1 (load window 50 steps)",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        s.experts = None;
        assert!(!render_status_text(&s).contains("moe"));
    }

    #[test]
    fn eval_line_shows_the_first_vote_next_to_the_latest() {
        let point = |step: u64, top1: Option<f64>, error: &str| EvalPoint {
            step,
            knn_top1: top1,
            knn_top5: top1.map(|t| (t + 0.2).min(1.0)),
            bank_samples: 2048,
            test_samples: 1024,
            error: error.into(),
            ..Default::default()
        };
        assert_eq!(eval_line(&[]), None);
        let mut history = vec![point(0, Some(0.68), "")];
        assert_eq!(
            eval_line(&history).unwrap(),
            "held-out kNN top-1 68.0% at step 0 (top-5 88.0%; bank 2048, test 1024)"
        );
        history.push(point(150, Some(0.756), ""));
        assert_eq!(
            eval_line(&history).unwrap(),
            "held-out kNN top-1 68.0% at step 0 -> 75.6% at step 150 (top-5 95.6%; bank 2048, \
             test 1024)"
        );
        history.push(point(200, None, "the bank has no labels"));
        assert_eq!(
            eval_line(&history).unwrap(),
            "held-out kNN at step 200: not measured (the bank has no labels)"
        );
        let s = StatusReport {
            eval_history: history[..2].to_vec(),
            rollbacks: Vec::new(),
            journal: None,
            ..Default::default()
        };
        assert!(render_status_text(&s).contains("-> 75.6% at step 150"));
        // A CLIP round adds its zero-shot and retrieval.
        history.push(EvalPoint {
            zeroshot_top1: Some(0.5),
            retrieval_mean_recall: Some(0.25),
            ..point(250, Some(0.8), "")
        });
        assert!(
            eval_line(&history)
                .unwrap()
                .ends_with("test 1024); zero-shot top-1 50.0%; retrieval mean recall 25.0%"),
            "{}",
            eval_line(&history).unwrap()
        );
    }
}
