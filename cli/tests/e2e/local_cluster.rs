//! End to end: real coordinator and worker processes on 127.0.0.1, the synthetic dataset, and
//! the status endpoint, as a user would run them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use contrail_common::auth::TOKEN_ENV;
use contrail_test_support as support;

use support::cluster::{lines_of, status, KillOnDrop};

pub(crate) const CONTRAIL: &str = env!("CARGO_BIN_EXE_contrail");

pub(crate) fn temp_dir(name: &str) -> PathBuf {
    support::cluster::temp_dir("e2e", name)
}

/// A small, fast job: 16×16 crops, a tiny ResNet, 8 images per worker per step.
pub(crate) fn write_job(dir: &Path, samples: u64, epochs: u32, extra: &str) -> PathBuf {
    let job = format!(
        r#"
[data]
url = "file://{data}"
synth_samples = {samples}
synth_shard_size = 64
image_size = 16
# Milder than the SimCLR defaults: 16-pixel crops of 8% of an image carry too little signal
# for a loss curve that falls clearly within a 128-step test.
[data.augment]
crop_scale_min = 0.5
grayscale_p = 0.0
blur_p = 0.0
[model]
layers = [1, 1]
width = 8
projector_hidden = 32
projector_out = 16
[optim]
lr = 0.2
warmup_steps = 5
[train]
global_batch = 16
micro_batch = 8
epochs = {epochs}
log_every = 10
[cluster]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
heartbeat_ms = 200
worker_timeout_ms = 2000
lease_ttl_ms = 3000
collective_timeout_ms = 20000
[checkpoint]
url = "file://{ckpt}"
every_steps = 50
{extra}
"#,
        data = dir.join("data").display(),
        ckpt = dir.join("ckpt").display(),
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, job).unwrap();
    path
}

/// The status address (`host:port`) `contrail local` prints first, read from its `lines`.
pub(crate) fn status_address(lines: &mpsc::Receiver<String>, deadline: Instant) -> String {
    loop {
        assert!(Instant::now() < deadline, "no status URL printed");
        if let Ok(line) = lines.recv_timeout(Duration::from_secs(1)) {
            if let Some(rest) = line.split("status http://").nth(1) {
                return rest.trim_end_matches("/status").trim().to_string();
            }
        }
    }
}

/// `contrail local --workers 2` on `job` in `dir`, its stdout lines streamed.
pub(crate) fn spawn_local(
    dir: &Path,
    job: &Path,
    extra: &[&str],
) -> (mpsc::Receiver<String>, KillOnDrop) {
    spawn_local_shaped(dir, job, &["--workers", "2"], extra)
}

/// `contrail local SHAPE` (e.g. `--nodes 2 --local-ranks 2`) on `job` in `dir`, its stdout
/// lines streamed.
pub(crate) fn spawn_local_shaped(
    dir: &Path,
    job: &Path,
    shape: &[&str],
    extra: &[&str],
) -> (mpsc::Receiver<String>, KillOnDrop) {
    let mut child = Command::new(CONTRAIL)
        .arg("local")
        .args(shape)
        .arg("--config")
        .arg(job)
        .args(extra)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting contrail local");
    let lines = lines_of(&mut child);
    (lines, KillOnDrop(child))
}

#[test]
fn local_cluster_trains_and_reports_status() {
    let dir = temp_dir("train");
    // 1024 samples / 16 per step = 64 steps per epoch; 2 epochs = 128 steps. Online
    // evaluation before the first step, after 64 and at the end, on a synthetic held-out set.
    // The audit of which samples each rank trained, a part every 7 steps (and at the end).
    let eval = format!(
        "[eval]\nurl = \"file://{}\"\nsynth_samples = 128\nbank_samples = 512\nk = 20\n\
         every_steps = 64\n[audit]\nurl = \"file://{}\"\nflush_every_steps = 7\n",
        dir.join("held-out").display(),
        dir.join("audit").display()
    );
    let job = write_job(&dir, 1024, 2, &eval);
    // A progress line every step: the loss curve below averages over many steps.
    let (lines, mut child) = spawn_local(&dir, &job, &["--set", "train.log_every=1"]);

    let deadline = Instant::now() + Duration::from_secs(600);
    let mut http_addr = None;
    let mut all_lines = Vec::new();
    let mut seen_steps = Vec::new();
    let mut saw_two_workers = false;
    let mut shard_totals_ok = false;
    let mut status_text: Option<String> = None;
    let mut eval_history = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "local cluster did not finish in time"
        );
        while let Ok(line) = lines.try_recv() {
            if let Some(rest) = line.split("status http://").nth(1) {
                http_addr = Some(rest.trim_end_matches("/status").trim().to_string());
            }
            all_lines.push(line);
        }
        if let Some(addr) = &http_addr {
            if let Some(s) = status(addr) {
                if s.workers.len() == 2 && s.workers.iter().all(|w| w.rank.is_some()) {
                    saw_two_workers = true;
                }
                let sh = &s.shards;
                if sh.total == 16 && sh.pending + sh.leased + sh.done + sh.failed == sh.total {
                    shard_totals_ok = true;
                }
                if s.eval_history.len() >= eval_history.len() {
                    eval_history = s.eval_history.clone();
                }
                if s.state.as_str() == "running" {
                    seen_steps.push(s.step);
                    if status_text.is_none() && s.step > 0 {
                        let out = Command::new(CONTRAIL)
                            .args(["status", "--coordinator", &format!("http://{addr}")])
                            .output()
                            .unwrap();
                        status_text = Some(String::from_utf8_lossy(&out.stdout).to_string());
                    }
                }
            }
        }
        if let Ok(Some(code)) = child.0.try_wait() {
            // Drain what is left of stdout.
            std::thread::sleep(Duration::from_millis(200));
            while let Ok(line) = lines.try_recv() {
                all_lines.push(line);
            }
            assert!(
                code.success(),
                "contrail local failed: {code}\n{}",
                all_lines.join("\n")
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(
        http_addr.is_some(),
        "no status URL printed:\n{}",
        all_lines.join("\n")
    );
    assert!(saw_two_workers, "/status never showed 2 ranked workers");
    assert!(
        shard_totals_ok,
        "/status shard counts never added up to the 16 shards"
    );
    // `contrail status` renders the same report for a person.
    let text = status_text.expect("never ran `contrail status` while the job was running");
    assert!(text.contains("running"), "{text}");
    assert!(
        text.contains('%') && text.contains('['),
        "no progress bar: {text}"
    );
    assert!(
        text.contains("rank   0") && text.contains("rank   1"),
        "{text}"
    );
    seen_steps.dedup();
    assert!(
        seen_steps.len() >= 3,
        "step did not advance in /status: {seen_steps:?}"
    );
    assert!(
        seen_steps.windows(2).all(|w| w[0] <= w[1]),
        "step went backwards: {seen_steps:?}"
    );

    // "rank 0 finished: N steps, E epochs, loss A -> B"
    let done = all_lines
        .iter()
        .find(|l| l.starts_with("rank 0 finished"))
        .unwrap_or_else(|| panic!("no summary line:\n{}", all_lines.join("\n")));
    let steps: u64 = done.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(steps >= 100, "trained only {steps} steps: {done}");
    let losses: Vec<f64> = done
        .rsplit("loss ")
        .next()
        .unwrap()
        .split(" -> ")
        .map(|x| x.trim().parse().unwrap())
        .collect();
    // Progress lines ("epoch E step S  loss L ...") carry every step's loss. Single steps of
    // 16 images are noisy, so compare the mean of the first 10 steps with the last 20.
    let logged: Vec<f64> = all_lines
        .iter()
        .filter(|l| l.starts_with("epoch"))
        .filter_map(|l| l.split("loss ").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(logged.len() as u64, steps, "one progress line per step");
    assert!(
        (logged[0] - losses[0]).abs() < 1e-3,
        "summary and first line disagree"
    );
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let head = mean(&logged[..10]);
    let tail = mean(&logged[logged.len() - 20..]);
    eprintln!("loss: first 10 steps {head:.4}, last 20 steps {tail:.4}");
    assert!(
        tail < head - 0.25,
        "loss did not fall: first 10 steps {head:.4}, last 20 steps {tail:.4}"
    );
    assert!(
        dir.join("ckpt").join("LATEST").exists(),
        "no checkpoint written"
    );

    // Online evaluation: one log line per round, the comparison at the end, and the rounds
    // in /status with the sets' sizes (the final round may land after the last poll).
    for step in [0, 64, 128] {
        let prefix = format!("eval step {step}: held-out kNN top-1 ");
        assert!(
            all_lines.iter().any(|l| l.starts_with(&prefix)),
            "no {prefix:?} line:\n{}",
            all_lines.join("\n")
        );
    }
    let summary = all_lines
        .iter()
        .find(|l| l.starts_with("held-out kNN top-1: "))
        .unwrap_or_else(|| panic!("no evaluation summary:\n{}", all_lines.join("\n")));
    assert!(
        summary.contains("after 128 steps vs ") && summary.contains("randomly initialised"),
        "{summary}"
    );
    assert!(eval_history.len() >= 2, "/status showed {eval_history:?}");
    assert_eq!((eval_history[0].step, eval_history[1].step), (0, 64));
    for p in &eval_history {
        assert_eq!(
            (p.bank_samples, p.test_samples, p.skipped),
            (512, 128, 0),
            "{p:?}"
        );
        assert!(
            p.knn_top1.is_some_and(|t| (0.0..=1.0).contains(&t)),
            "{p:?}"
        );
    }

    // The audit proves both epochs trained every sample exactly once ...
    let audit_url = format!("file://{}", dir.join("audit").display());
    let data_url = format!("file://{}", dir.join("data").display());
    let check = |json: &Path| {
        Command::new(CONTRAIL)
            .args(["audit", "check", "--audit", &audit_url, "--data", &data_url])
            .arg("--json")
            .arg(json)
            .output()
            .unwrap()
    };
    let out = check(&dir.join("audit-ok.json"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for epoch in [0, 1] {
        let line = format!("epoch {epoch}: all 1024 samples trained exactly once");
        assert!(text.contains(&line), "{text}");
    }
    // ... and catches a step recorded twice (as a rank restarted without recovery would).
    let part = std::fs::read_dir(dir.join("audit"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("rank-00001"))
        .expect("rank 1 wrote audit parts");
    std::fs::copy(&part, dir.join("audit/rank-00001-replayed-000000.jsonl")).unwrap();
    let out = check(&dir.join("audit-bad.json"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("repeated: "), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A port for a server a child process binds later. Below Linux's ephemeral range (32768+),
/// so that no outgoing connection of a test running meanwhile can take it between this check
/// and the child's bind (port 0 would be handed out from that range).
pub(crate) fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let seed = std::process::id()
            .wrapping_mul(2_654_435_761)
            .wrapping_add(n * 7919);
        let port = 20_000 + (seed % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The token the coordinator and workers of the hand-started jobs below share.
pub(crate) const JOB_TOKEN: &str = "e2e-job-token-0123456789";

/// `contrail local --nodes 2 --local-ranks 2`: two node workers, each running two rank
/// processes; the four ranks are node-major (ranks 0–1 on one node, 2–3 on the other, each
/// node's in local-rank order), `/status` shows two nodes, and the job trains to the end.
#[test]
fn two_node_workers_of_two_ranks_train_node_major() {
    let dir = temp_dir("nodes");
    let job = write_job(&dir, 512, 2, "");
    let (lines, mut child) = spawn_local_shaped(
        &dir,
        &job,
        &["--nodes", "2", "--local-ranks", "2"],
        &["--set", "train.global_batch=32"],
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    let addr = status_address(&lines, deadline);
    let running = loop {
        assert!(Instant::now() < deadline, "the four ranks never formed");
        if let Some(s) = status(&addr).filter(|s| s.step >= 1) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(running.world_size, 4);
    let ranked: Vec<_> = running
        .workers
        .iter()
        .filter(|w| w.rank.is_some())
        .collect();
    assert_eq!(ranked.len(), 4, "{running:#?}");
    for (i, w) in ranked.iter().enumerate() {
        assert_eq!(w.rank, Some(i as u32), "{running:#?}");
        assert_eq!(w.local_rank, i as u32 % 2, "{running:#?}");
        assert_eq!(
            w.node,
            ranked[i - i % 2].node,
            "ranks 0-1 and 2-3 share a node"
        );
    }
    assert_ne!(ranked[0].node, ranked[2].node);
    assert_eq!(contrail_common::status::node_count(&running.workers), 2);
    // The processes: the coordinator and two node workers, each the parent of two ranks.
    let kids = child_pids(child.0.id());
    assert_eq!(kids.len(), 3, "{kids:?}");
    let ranks: usize = kids.iter().map(|pid| child_pids(*pid).len()).sum();
    assert_eq!(ranks, 4, "each node worker runs two rank processes");
    let code = wait_for_exit(
        &mut child.0,
        Instant::now(),
        Duration::from_secs(300),
        "contrail local --nodes 2 did not finish",
    );
    let out: Vec<String> =
        std::iter::from_fn(|| lines.recv_timeout(Duration::from_secs(10)).ok()).collect();
    assert!(code.success(), "{out:#?}");
    assert!(
        out.iter().any(|l| l.starts_with("rank 0 finished")),
        "{out:#?}"
    );
    let text = out.join("\n");
    assert!(text.contains("on 2 node(s)"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn worker_without_the_jobs_token_cannot_join() {
    let dir = temp_dir("rogue");
    let job = write_job(&dir, 256, 50, "");
    write_synth(&dir, 256);
    let grpc = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let _coordinator = KillOnDrop(
        Command::new(CONTRAIL)
            .args(["coordinator", "--config"])
            .arg(&job)
            .args(["--set", &format!("cluster.grpc_addr={grpc}")])
            .args(["--set", &format!("cluster.http_addr={http}")])
            .env(TOKEN_ENV, JOB_TOKEN)
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for (token, says) in [
        (Some("a-token-of-some-other-job"), "refused this worker"),
        (None, "no job token"),
    ] {
        let mut cmd = Command::new(CONTRAIL);
        cmd.args(["worker", "--coordinator", &format!("http://{grpc}")])
            .args(["--connect-wait-secs", "30"])
            .env_remove(TOKEN_ENV)
            .current_dir(&dir);
        if let Some(t) = token {
            cmd.env(TOKEN_ENV, t);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(says), "{err}");
    }
    // Nobody joined: the coordinator still waits for its workers.
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        if let Some(s) = status(&http) {
            break s;
        }
        assert!(Instant::now() < deadline, "no status");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(s.workers.is_empty(), "{:?}", s.workers);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn killed_worker_returns_its_leases_and_fails_the_job() {
    let dir = temp_dir("kill");
    let job = write_job(&dir, 2048, 50, "");
    let grpc = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    // Write the dataset first so the coordinator sees every shard.
    write_synth(&dir, 2048);
    let coordinator = KillOnDrop(
        Command::new(CONTRAIL)
            .args(["coordinator", "--config"])
            .arg(&job)
            .args(["--set", &format!("cluster.grpc_addr={grpc}")])
            .args(["--set", &format!("cluster.http_addr={http}")])
            .env(TOKEN_ENV, JOB_TOKEN)
            .current_dir(&dir)
            .spawn()
            .unwrap(),
    );
    let worker = |name: &str| {
        Command::new(CONTRAIL)
            .args(["worker", "--coordinator", &format!("http://{grpc}")])
            .env(TOKEN_ENV, JOB_TOKEN)
            .current_dir(&dir)
            .stderr(std::fs::File::create(dir.join(format!("{name}.stderr"))).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut survivor = KillOnDrop(worker("w0"));
    let mut victim = worker("w1");

    // Wait until training is under way.
    let deadline = Instant::now() + Duration::from_secs(300);
    let before = loop {
        assert!(Instant::now() < deadline, "training never started");
        if let Some(s) = status(&http) {
            if s.step >= 5 && s.shards.leased > 0 {
                break s;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(before.state.as_str(), "running");
    victim.kill().unwrap(); // SIGKILL
    let _ = victim.wait();
    let killed_at = Instant::now();

    // Within worker_timeout (2 s) + slack, status reports the failure, and the dead worker
    // holds no lease any more: its shards went back to the pool.
    let mut last = None;
    let after = loop {
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "status did not report the dead worker in time; last status: {last:#?}"
        );
        if let Some(s) = status(&http) {
            if s.state.as_str() == "failed" && s.workers.iter().any(|w| w.state.as_str() == "dead")
            {
                break s;
            }
            last = Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dead: Vec<_> = after
        .workers
        .iter()
        .filter(|w| w.state.as_str() == "dead")
        .collect();
    assert_eq!(
        dead.len(),
        1,
        "exactly the killed worker is dead: {:?}",
        after.workers
    );
    assert_eq!(dead[0].shard, "", "the dead worker still holds a lease");
    let holders = after.workers.iter().filter(|w| !w.shard.is_empty()).count() as u64;
    assert!(
        after.shards.leased <= holders,
        "{} shards leased but only {holders} live workers hold one",
        after.shards.leased
    );
    assert!(!after.reason.is_empty(), "failed without a reason");
    let sh = &after.shards;
    assert_eq!(sh.pending + sh.leased + sh.done + sh.failed, sh.total);

    // The survivor does not hang: it exits with an error within a bounded time.
    let code = wait_for_exit(
        &mut survivor.0,
        killed_at,
        Duration::from_secs(40),
        "the surviving worker hung after its peer was killed",
    );
    assert!(!code.success(), "survivor should fail, not finish");
    let err = std::fs::read_to_string(dir.join("w0.stderr")).unwrap();
    assert!(
        err.contains("error"),
        "survivor's stderr has no error: {err}"
    );
    drop(coordinator);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `contrail local` to completion and returns its stdout lines.
fn run_local(dir: &Path, job: &Path, extra: &[&str]) -> Vec<String> {
    run_local_on(dir, job, 2, extra)
}

fn run_local_on(dir: &Path, job: &Path, workers: u32, extra: &[&str]) -> Vec<String> {
    let out = Command::new(CONTRAIL)
        .args(["local", "--workers", &workers.to_string(), "--config"])
        .arg(job)
        .args(extra)
        .current_dir(dir)
        .output()
        .expect("running contrail local");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "contrail local failed: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().map(str::to_string).collect()
}

#[test]
fn restarted_job_resumes_from_the_latest_checkpoint() {
    let dir = temp_dir("resume");
    let job = write_job(&dir, 1024, 5, "");
    let first = run_local(
        &dir,
        &job,
        &[
            "--set",
            "train.max_steps=20",
            "--set",
            "checkpoint.every_steps=10",
        ],
    );
    assert!(
        first
            .iter()
            .any(|l| l.starts_with("rank 0 finished: 20 steps")),
        "{first:#?}"
    );
    let latest = std::fs::read_to_string(dir.join("ckpt").join("LATEST")).unwrap();
    assert_eq!(latest.trim(), "step-00000020");

    let second = run_local(&dir, &job, &["--set", "train.max_steps=30"]);
    assert!(
        second
            .iter()
            .any(|l| l.contains("resumed from") && l.contains("step 20")),
        "second run did not resume: {second:#?}"
    );
    // A new `contrail local` is a new run (a new job token): rank 0 says whose checkpoint it
    // took and what changed in the job file since.
    assert!(
        second
            .iter()
            .any(|l| l.contains("a checkpoint of an earlier run")
                && l.contains("differs in")
                && l.contains("train.max_steps")),
        "{second:#?}"
    );
    // Only the remaining 10 steps are trained, and the step counter continues from 20.
    assert!(
        second
            .iter()
            .any(|l| l.starts_with("rank 0 finished: 10 steps")),
        "{second:#?}"
    );
    assert!(
        second.iter().any(|l| l.contains("step 30/30")),
        "{second:#?}"
    );
    let latest = std::fs::read_to_string(dir.join("ckpt").join("LATEST")).unwrap();
    assert_eq!(latest.trim(), "step-00000030");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctrl_c_stops_the_local_cluster_and_its_workers() {
    let dir = temp_dir("interrupt");
    let job = write_job(&dir, 2048, 50, "");
    let (lines, mut child) = spawn_local(&dir, &job, &[]);
    let deadline = Instant::now() + Duration::from_secs(300);
    let addr = status_address(&lines, deadline);
    loop {
        assert!(Instant::now() < deadline, "training never started");
        if status(&addr).is_some_and(|s| s.step >= 3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let workers = child_pids(child.0.id());
    assert_eq!(
        workers.len(),
        3,
        "expected the coordinator and 2 worker processes, found {workers:?}"
    );
    // SAFETY: kill(2) with a pid this test spawned and still owns (not yet reaped).
    let sent = unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0, "sending SIGINT failed");
    let stopped_at = Instant::now();
    let code = wait_for_exit(
        &mut child.0,
        stopped_at,
        Duration::from_secs(15),
        "contrail local did not stop after SIGINT",
    );
    assert!(
        !code.success(),
        "an interrupted job must not report success"
    );
    // The coordinator and worker processes are gone too (killed and reaped), and the status
    // server is closed.
    for pid in &workers {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} outlived contrail local"
        );
    }
    assert!(status(&addr).is_none(), "status server still up");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Processes whose parent is `parent` (from /proc; Linux only, as the project is).
pub(crate) fn child_pids(parent: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, ...
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        if after.split_whitespace().nth(1) == Some(&parent.to_string()) {
            pids.push(pid);
        }
    }
    pids
}

/// A JPEG whose SOF0 header claims 60000 × 60000 pixels (3.6 gigapixels).
fn forged_bomb(jpeg: &[u8]) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let sof = out
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline JPEG has an SOF0 marker");
    // marker(2) length(2) precision(1) height(2) width(2)
    out[sof + 5..sof + 7].copy_from_slice(&60000u16.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&60000u16.to_be_bytes());
    out
}

#[test]
fn bad_samples_are_skipped_counted_and_reported_in_status() {
    use contrail_data::synth::render_sample;
    use contrail_data::tar_stream::TarBuilder;

    let dir = temp_dir("bad");
    let job = write_job(&dir, 512, 1, "");
    write_synth(&dir, 512);

    let members = |i: u64| render_sample(7, i, 64).unwrap();
    let jpeg = |i: u64| members(i).into_iter().find(|(e, _)| *e == "jpg").unwrap().1;
    let mut tar = TarBuilder::new();
    for (ext, bytes) in members(0) {
        tar.append(&format!("good-0.{ext}"), &bytes);
    }
    tar.append("corrupt.jpg", &jpeg(1)[..40]);
    tar.append("corrupt.txt", b"a cut-off image");
    tar.append("bomb.jpg", &forged_bomb(&jpeg(2)));
    tar.append("noimage.txt", b"a caption without an image");
    tar.append("badcaption.jpg", &jpeg(3));
    tar.append("badcaption.txt", &[0x61, 0xFF, 0xFE, 0x62]);
    tar.append("cut.jpg", &jpeg(4));
    let full = tar.finish();
    // End-of-archive (1024 zero bytes) plus the last member's padding and 100 of its bytes go:
    // the stream now ends inside cut.jpg.
    let cut_len = full.len() - 1024 - 512;
    std::fs::write(dir.join("data").join("zz-bad.tar"), &full[..cut_len]).unwrap();

    let lines = run_local(&dir, &job, &[]);
    let bad = lines
        .iter()
        .find(|l| l.starts_with("bad samples:"))
        .unwrap_or_else(|| panic!("no bad-sample line: {lines:#?}"));
    for expected in [
        "5 (",
        "corrupt_image 1",
        "decompression_bomb 1",
        "invalid_caption 1",
        "missing_image 1",
        "truncated_tar 1",
    ] {
        assert!(bad.contains(expected), "{expected:?} missing from {bad:?}");
    }
    // The one good sample of the bad shard was trained with the rest: 512 + 1.
    assert!(
        lines.iter().any(|l| l.starts_with("samples seen 513 ")),
        "expected 513 samples seen: {lines:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits for `child` to exit, failing with `hung` if it is still running `limit` after `since`.
fn wait_for_exit(
    child: &mut Child,
    since: Instant,
    limit: Duration,
    hung: &str,
) -> std::process::ExitStatus {
    loop {
        if let Some(code) = child.try_wait().unwrap() {
            return code;
        }
        assert!(since.elapsed() < limit, "{hung}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `contrail data synth` into `dir/data`, 64 samples per shard (as `write_job` configures).
pub(crate) fn write_synth(dir: &Path, samples: u64) {
    let status = Command::new(CONTRAIL)
        .args(["data", "synth", "--shard-size", "64", "--samples"])
        .arg(samples.to_string())
        .arg("--out")
        .arg(dir.join("data"))
        .status()
        .unwrap();
    assert!(status.success(), "contrail data synth failed: {status}");
}

/// MoCo v2, SwAV and CLIP run as whole jobs on two processes: they train, their extra state
/// (key encoder and queue, prototypes, text tower and logit scale) goes into the checkpoint,
/// and a restart resumes from it.
#[test]
fn moco_swav_and_clip_jobs_train_checkpoint_and_resume() {
    for (kind, objective, sets, expect) in [
        (
            "moco",
            "[objective]\nkind = \"moco\"\n[objective.moco]\nqueue_size = 96\n",
            vec![],
            [
                "momentum.queue",
                "momentum.conv1.weight",
                "momentum.queue_next",
            ],
        ),
        (
            "swav",
            "[objective]\nkind = \"swav\"\ntemperature = 0.1\n[objective.swav]\nprototypes = 24\n\
             freeze_prototypes_steps = 3\nqueue_size = 16\n",
            vec![],
            ["prototypes.weight", "conv1.weight", "projector.0.weight"],
        ),
        (
            "clip",
            "[objective]\nkind = \"clip\"\n[model.vit]\npatch_size = 8\nwidth = 16\nlayers = 1\n\
             heads = 2\n[model.text]\ncontext_length = 40\nwidth = 16\nlayers = 1\nheads = 2\n",
            vec!["--set", "model.encoder=vit"],
            [
                "visual.conv1.weight",
                "token_embedding.weight",
                "logit_scale",
            ],
        ),
    ] {
        let dir = temp_dir(kind);
        let job = write_job(&dir, 512, 5, objective);
        let mut args = vec![
            "--set",
            "train.max_steps=8",
            "--set",
            "checkpoint.every_steps=4",
        ];
        args.extend(&sets);
        let first = run_local(&dir, &job, &args);
        assert!(
            first
                .iter()
                .any(|l| l.starts_with("rank 0 finished: 8 steps")),
            "{kind}: {first:#?}"
        );
        let model = dir
            .join("ckpt")
            .join("step-00000008")
            .join("model.safetensors");
        let names: Vec<String> = tch::Tensor::read_safetensors(&model)
            .unwrap_or_else(|e| panic!("{kind}: reading {}: {e}", model.display()))
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for name in expect {
            assert!(
                names.iter().any(|n| n == name),
                "{kind}: checkpoint lacks {name}"
            );
        }
        let mut args = vec!["--set", "train.max_steps=12"];
        args.extend(&sets);
        let second = run_local(&dir, &job, &args);
        assert!(
            second
                .iter()
                .any(|l| l.contains("resumed from") && l.contains("step 8")),
            "{kind}: second run did not resume: {second:#?}"
        );
        assert!(
            second
                .iter()
                .any(|l| l.starts_with("rank 0 finished: 4 steps")),
            "{kind}: {second:#?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A new job can start from another job's weights (`model.init_weights`): every variable of
/// the same model loads, and a resumed job ignores the setting.
#[test]
fn a_job_starts_from_initial_weights() {
    let dir = temp_dir("init");
    let job = write_job(&dir, 256, 5, "");
    run_local(&dir, &job, &["--set", "train.max_steps=4"]);
    let weights = dir
        .join("ckpt")
        .join("step-00000004")
        .join("model.safetensors");
    assert!(weights.exists(), "{}", weights.display());
    let init = format!("model.init_weights=file://{}", weights.display());
    let other = format!("checkpoint.url=file://{}", dir.join("ckpt2").display());
    let out = run_local(
        &dir,
        &job,
        &[
            "--set",
            "train.max_steps=2",
            "--set",
            &init,
            "--set",
            &other,
        ],
    );
    let line = out
        .iter()
        .find(|l| l.starts_with("initial weights from"))
        .unwrap_or_else(|| panic!("no initial-weights line: {out:#?}"));
    assert!(line.contains("loaded into the image tower"), "{line}");
    assert!(
        out.iter()
            .any(|l| l.trim() == "heads kept their initialisation: none"),
        "the checkpoint's projector loads too: {out:#?}"
    );
    assert!(
        out.iter()
            .any(|l| l.trim() == "tensors of the file that match no variable: none"),
        "{out:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Overrides of [`write_job`]'s file for the MoE runs: its [model] is the ResNet's, and SGD at
/// its 0.2 makes the router oscillate between experts where AdamW settles.
const MOE_SETS: [&str; 6] = [
    "--set",
    "model.encoder=vit",
    "--set",
    "optim.kind=adamw",
    "--set",
    "optim.lr=0.002",
];

/// A SimCLR job with an MoE ViT (top-1, 4 experts) on 2 workers, trained 120 steps with the
/// given balance-loss coefficient. Returns rank 0's per-step load ratio (max/mean over the
/// experts), the expert part of `/status` seen while it ran, and `contrail status`'s text.
fn run_moe_job(
    dir: &Path,
    balance_loss_coef: f64,
) -> (
    Vec<f64>,
    Option<contrail_common::status::ExpertStatus>,
    String,
) {
    let moe = format!(
        "[model.vit]\npatch_size = 8\nwidth = 32\nlayers = 2\nheads = 2\n\
         [moe]\nexperts = 4\nvit_blocks = [1]\ntop_k = 1\n\
         balance_loss_coef = {balance_loss_coef}\n"
    );
    let job = write_job(dir, 1024, 5, &moe);
    let mut args = MOE_SETS.to_vec();
    args.extend(["--set", "train.log_every=1", "--set", "train.max_steps=120"]);
    args.extend(["--set", "checkpoint.every_steps=60"]);
    let (lines, mut child) = spawn_local(dir, &job, &args);
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut http_addr, mut all_lines) = (None, Vec::new());
    let (mut expert_status, mut status_text) = (None, String::new());
    loop {
        assert!(Instant::now() < deadline, "MoE job did not finish in time");
        while let Ok(line) = lines.try_recv() {
            if let Some(rest) = line.split("status http://").nth(1) {
                http_addr = Some(rest.trim_end_matches("/status").trim().to_string());
            }
            all_lines.push(line);
        }
        if let (Some(addr), None) = (&http_addr, &expert_status) {
            if let Some(s) = status(addr).filter(|s| s.step > 2) {
                expert_status = s.experts.clone();
                let out = Command::new(CONTRAIL)
                    .args(["status", "--coordinator", &format!("http://{addr}")])
                    .output()
                    .unwrap();
                status_text = String::from_utf8_lossy(&out.stdout).to_string();
            }
        }
        if let Ok(Some(code)) = child.0.try_wait() {
            std::thread::sleep(Duration::from_millis(200));
            while let Ok(line) = lines.try_recv() {
                all_lines.push(line);
            }
            assert!(code.success(), "MoE job failed\n{}", all_lines.join("\n"));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // "moe step load: block 0 max/mean 1.42 dropped 3.1%" after every step's progress line.
    let ratios: Vec<f64> = all_lines
        .iter()
        .filter_map(|l| l.strip_prefix("moe step load: block 0 max/mean "))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(ratios.len(), 120, "one load line per step");
    (ratios, expert_status, status_text)
}

/// MoE end to end: the expert load reaches `/status` and `contrail status`; the balance loss
/// pulls the load ratio down over training and below a run without it; and the
/// checkpoint (every expert by global id, with its optimizer state) resumes on 4 workers and
/// on 1.
#[test]
fn moe_job_reports_expert_load_balances_and_resumes_on_4_and_1_workers() {
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let unbalanced_dir = temp_dir("moe-unbalanced");
    let (unbalanced, _, _) = run_moe_job(&unbalanced_dir, 0.0);
    let _ = std::fs::remove_dir_all(&unbalanced_dir);
    let dir = temp_dir("moe");
    let (balanced, experts, text) = run_moe_job(&dir, 2.0);
    let (free, held) = (mean(&unbalanced[80..]), mean(&balanced[80..]));
    eprintln!(
        "expert load max/mean over the last 20 steps: {free:.3} without the balance loss, \
         {held:.3} with it (first 10 steps {:.3} / {:.3})",
        mean(&unbalanced[..10]),
        mean(&balanced[..10])
    );
    assert!(
        held < free,
        "the balance loss did not even out the load: {held:.3} with it, {free:.3} without"
    );
    let start = mean(&balanced[..10]);
    assert!(
        held < start - 0.1,
        "the balance loss did not pull the load ratio down: {start:.3} -> {held:.3}"
    );

    let experts = experts.expect("/status never showed the expert load");
    assert_eq!(experts.blocks.len(), 1);
    let block = &experts.blocks[0];
    assert_eq!(block.load.len(), 4, "{block:?}");
    assert!(
        (block.load.iter().sum::<f64>() - 1.0).abs() < 1e-6,
        "{block:?}"
    );
    assert!(block.load_max_mean >= 1.0, "{block:?}");
    assert!(text.contains("moe block 0"), "{text}");

    let ckpt = dir.join("ckpt").join("step-00000120");
    let names = |file: &str| -> Vec<String> {
        tch::Tensor::read_safetensors(ckpt.join(file))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    };
    let (model, optim) = (names("model.safetensors"), names("optim.safetensors"));
    for e in 0..4 {
        let w = format!("transformer.resblocks.1.moe.experts.{e}.c_fc.weight");
        assert!(model.contains(&w), "checkpoint lacks {w}");
        assert!(
            optim.contains(&format!("exp_avg.{w}")),
            "checkpoint lacks the optimizer state of {w}"
        );
    }
    let job = dir.join("job.toml");
    for (workers, micro, until, trained) in [(4, "4", "130", "10"), (1, "16", "135", "5")] {
        let sets = [
            "--set".to_string(),
            format!("train.micro_batch={micro}"),
            "--set".to_string(),
            format!("train.max_steps={until}"),
        ];
        let mut args: Vec<&str> = MOE_SETS.to_vec();
        args.extend(sets.iter().map(String::as_str));
        let out = run_local_on(&dir, &job, workers, &args);
        assert!(
            out.iter().any(|l| l.contains("resumed from")),
            "{workers} workers did not resume: {out:#?}"
        );
        assert!(
            out.iter()
                .any(|l| l.starts_with(&format!("rank 0 finished: {trained} steps"))),
            "{workers} workers: {out:#?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Live rebalancing on 4 workers: initial weights make every token choose expert 0 of 2 (the
/// block's LayerNorm bias points along expert 0's gate row), so under the default placement
/// (each expert on 2 workers) half the workers idle. The coordinator adopts a placement with
/// more replicas of expert 0, rank 0 passes it on in-band, and every worker moves its experts
/// after the same step; training goes on to the end on the new placement.
#[test]
fn moe_rebalancing_moves_experts_while_training() {
    let dir = temp_dir("moe-rebalance");
    let width = 32;
    let init = dir.join("skewed.safetensors");
    let block = "transformer.resblocks.1";
    let bias = tch::Tensor::ones([width], (tch::Kind::Float, tch::Device::Cpu));
    let gate = tch::Tensor::cat(
        &[
            tch::Tensor::full([1, width], 3.0, (tch::Kind::Float, tch::Device::Cpu)),
            tch::Tensor::zeros([1, width], (tch::Kind::Float, tch::Device::Cpu)),
        ],
        0,
    );
    tch::Tensor::write_safetensors(
        &[
            (format!("{block}.ln_2.bias"), bias),
            (format!("{block}.moe.gate.weight"), gate),
        ],
        &init,
    )
    .unwrap();
    let moe = format!(
        "[model.vit]\npatch_size = 8\nwidth = {width}\nlayers = 2\nheads = 2\n\
         [moe]\nexperts = 2\nvit_blocks = [1]\ntop_k = 1\nrebalance = true\n\
         rebalance_every_steps = 5\n"
    );
    let job = write_job(&dir, 1024, 5, &moe);
    let init_url = format!("model.init_weights=file://{}", init.display());
    let mut args: Vec<&str> = MOE_SETS.to_vec();
    args.extend([
        "--set",
        &init_url,
        // The file holds two tensors of the tower, not all of it.
        "--set",
        "model.init_partial=true",
        "--set",
        "train.micro_batch=4",
        "--set",
        "train.max_steps=30",
    ]);
    let out = run_local_on(&dir, &job, 4, &args);
    let switch = out
        .iter()
        .find(|l| l.starts_with("expert placement v1 -> v2 after step"))
        .unwrap_or_else(|| panic!("no placement switch: {out:#?}"));
    eprintln!("{switch}");
    assert!(
        out.iter()
            .any(|l| l.starts_with("rank 0 finished: 30 steps")),
        "{out:#?}"
    );
    // The final status: the coordinator's placement is the workers' (acknowledged).
    assert!(
        out.iter().any(|l| l.starts_with("moe block 0")
            && l.contains("placement v2")
            && !l.contains("pending")),
        "{out:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The text of a log without its colour escapes (`ESC [ … m`).
pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
