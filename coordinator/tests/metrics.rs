//! `/metrics` read back by a real Prometheus text parser: the Python client's
//! (`prometheus_client.parser`, pinned and installed into .venv by `scripts/setup.sh`).

use contrail_common::status::{
    EvalPoint, ExpertBlockStatus, ExpertStatus, JobState, ShardCounts, StatusReport,
    WorkerLiveness, WorkerStatus,
};
use contrail_coordinator::metrics::render_metrics;
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Every sample the parser finds: (sample name, labels, value).
fn parse(text: &str) -> Vec<(String, serde_json::Map<String, Value>, f64)> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let script = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = []\n\
        for f in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in f.samples:\n\
        \x20       out.append([s.name, s.labels, s.value, f.type])\n\
        print(json.dumps(out))\n";
    let mut child = Command::new(&python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{} cannot run ({e}): run `bash scripts/setup.sh` (it installs prometheus_client)",
                python.display()
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser rejected the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.into_iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                r[1].as_object().unwrap().clone(),
                r[2].as_f64().unwrap(),
            )
        })
        .collect()
}

fn value(
    samples: &[(String, serde_json::Map<String, Value>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).and_then(Value::as_str) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
        .2
}

fn worker(rank: Option<u32>, id: u64, heartbeat_ms: u64, step: u64) -> WorkerStatus {
    WorkerStatus {
        worker_id: id,
        rank,
        node: "h/a".into(),
        local_rank: 0,
        host: "h".into(),
        address: "127.0.0.1:1".into(),
        state: WorkerLiveness::Alive,
        last_heartbeat_ms: heartbeat_ms,
        shard: String::new(),
        step,
    }
}

#[test]
fn metrics_parse_with_the_conventional_names_and_values() {
    let mut r = StatusReport {
        state: JobState::Running,
        world_size: 2,
        generation: 1,
        epoch: 3,
        step: 120,
        total_steps_estimate: Some(400),
        samples_seen: 7680,
        loss: Some(3.25),
        learning_rate: Some(0.0125),
        samples_per_sec: Some(812.5),
        eta_seconds: Some(90.0),
        uptime_seconds: 42.5,
        workers: vec![
            worker(Some(0), 11, 250, 120),
            worker(Some(1), 12, 1500, 119),
        ],
        shards: ShardCounts {
            total: 16,
            pending: 5,
            leased: 2,
            done: 8,
            failed: 1,
        },
        ..Default::default()
    };
    // Label values that need escaping.
    r.bad_samples.insert("decode".into(), 3);
    r.bad_samples.insert("odd \"quoted\" \\ reason".into(), 1);
    r.experts = Some(ExpertStatus {
        placement_version: 2,
        acknowledged_version: 2,
        rebalances: 1,
        window_steps: 10,
        blocks: vec![ExpertBlockStatus {
            block: 0,
            label: "vit 1".into(),
            load: vec![0.5, 0.25, 0.125, 0.125],
            load_max_mean: 2.0,
            worker_load_max_mean: 1.25,
            dropped_fraction: 0.0625,
            ..Default::default()
        }],
    });
    let round = |step: u64, top1: Option<f64>| EvalPoint {
        step,
        knn_top1: top1,
        knn_top5: top1.map(|t| t + 0.25),
        seconds: 2.5,
        error: if top1.is_none() {
            "no labels".into()
        } else {
            String::new()
        },
        ..Default::default()
    };
    // The latest round that voted is the one reported; the one after it only counts.
    r.eval_history = vec![
        round(0, Some(0.25)),
        EvalPoint {
            zeroshot_top1: Some(0.375),
            retrieval_mean_recall: Some(0.625),
            ..round(100, Some(0.5))
        },
        round(120, None),
    ];
    r.rollbacks = vec!["rank 1 failed; generation 3 (1 workers) rolled back to ...".into()];
    let text = render_metrics(&r);
    let s = parse(&text);
    assert_eq!(value(&s, "contrail_rollbacks_total", &[]), 1.0);
    assert_eq!(value(&s, "contrail_eval_knn_top1", &[]), 0.5);
    assert_eq!(value(&s, "contrail_eval_knn_top5", &[]), 0.75);
    assert_eq!(value(&s, "contrail_eval_step", &[]), 100.0);
    assert_eq!(value(&s, "contrail_eval_zeroshot_top1", &[]), 0.375);
    assert_eq!(value(&s, "contrail_eval_retrieval_mean_recall", &[]), 0.625);
    assert_eq!(value(&s, "contrail_eval_duration_seconds", &[]), 2.5);
    assert_eq!(value(&s, "contrail_eval_rounds_total", &[]), 3.0);
    assert_eq!(value(&s, "contrail_step", &[]), 120.0);
    assert_eq!(value(&s, "contrail_samples_total", &[]), 7680.0);
    assert_eq!(value(&s, "contrail_samples_per_second", &[]), 812.5);
    assert_eq!(value(&s, "contrail_loss", &[]), 3.25);
    assert_eq!(value(&s, "contrail_learning_rate", &[]), 0.0125);
    assert_eq!(
        value(&s, "contrail_job_state", &[("state", "running")]),
        1.0
    );
    assert_eq!(value(&s, "contrail_job_state", &[("state", "failed")]), 0.0);
    for (state, n) in [
        ("pending", 5.0),
        ("leased", 2.0),
        ("done", 8.0),
        ("failed", 1.0),
    ] {
        assert_eq!(value(&s, "contrail_shards", &[("state", state)]), n);
    }
    assert_eq!(
        value(
            &s,
            "contrail_worker_last_heartbeat_seconds",
            &[("rank", "1")]
        ),
        1.5
    );
    assert_eq!(value(&s, "contrail_worker_step", &[("rank", "0")]), 120.0);
    assert_eq!(
        value(&s, "contrail_bad_samples_total", &[("reason", "decode")]),
        3.0
    );
    assert_eq!(
        value(
            &s,
            "contrail_bad_samples_total",
            &[("reason", "odd \"quoted\" \\ reason")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "contrail_expert_load",
            &[("block", "0"), ("expert", "1")]
        ),
        0.25
    );
    assert_eq!(
        value(&s, "contrail_expert_load_max_mean", &[("layer", "vit 1")]),
        2.0
    );
    assert_eq!(
        value(&s, "contrail_expert_dropped_ratio", &[("block", "0")]),
        0.0625
    );
    assert_eq!(value(&s, "contrail_expert_rebalances_total", &[]), 1.0);
    // Every family is typed and explained.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap();
        let base = name.trim_end_matches("_total");
        assert!(
            text.contains(&format!("# TYPE {name} ")) || text.contains(&format!("# TYPE {base} ")),
            "{name} has no TYPE line"
        );
    }
}

#[test]
fn unknown_values_are_left_out_before_the_first_step() {
    let r = StatusReport::default();
    let text = render_metrics(&r);
    let s = parse(&text);
    assert!(!text.contains("contrail_loss "), "{text}");
    assert!(s.iter().all(|(n, _, _)| n != "contrail_expert_load"));
    assert!(!text.contains("contrail_eval_"), "{text}");
    assert_eq!(
        value(
            &s,
            "contrail_job_state",
            &[("state", "waiting_for_workers")]
        ),
        1.0
    );
    assert_eq!(value(&s, "contrail_step", &[]), 0.0);
}
