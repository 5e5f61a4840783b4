//! The coordinator's status page (`GET /`) in a real browser: headless Chromium loads it, runs
//! its script, and the test reads the DOM it built (`--dump-dom`).
//!
//! Needs Chromium (`bash scripts/setup-test.sh` installs Debian's `chromium`). Without it the tests
//! fail, unless `CONTRAIL_SKIP_BROWSER_TEST=1` is set, in which case they say so and pass.
//! `CONTRAIL_STATUS_PAGE_SCREENSHOT=/abs/path.png` saves the live page's screenshot there
//! (that is how `docs/status_page.png` is made).

use contrail_common::status::{
    EvalPoint, ExpertBlockStatus, ExpertStatus, JobState, ShardCounts, StatusReport,
    WorkerLiveness, WorkerStatus,
};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contrail_test_support as support;

use support::cluster::{lines_of, status, KillOnDrop};

const CONTRAIL: &str = env!("CARGO_BIN_EXE_contrail");

fn temp_dir(name: &str) -> PathBuf {
    support::cluster::temp_dir("page", name)
}
/// How long (virtual time) Chromium lets the page run before dumping it: about four polls.
const BUDGET_MS: &str = "4000";

/// The Chromium binary on PATH, or None (after saying why) when the test may be skipped.
/// Panics when Chromium is missing and skipping was not asked for.
fn browser() -> Option<PathBuf> {
    let names = [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ];
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in names {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    if std::env::var("CONTRAIL_SKIP_BROWSER_TEST").as_deref() == Ok("1") {
        eprintln!(
            "skipping the status page browser test: no Chromium on PATH (looked for {}) and \
             CONTRAIL_SKIP_BROWSER_TEST=1",
            names.join(", ")
        );
        return None;
    }
    panic!(
        "the status page test needs a headless browser, but none of {} is on PATH. \
         Run `bash scripts/setup-test.sh` (it installs Debian's chromium package), or set \
         CONTRAIL_SKIP_BROWSER_TEST=1 to skip this test.",
        names.join(", ")
    );
}

/// Runs headless Chromium on `url` with `extra` arguments (its own throwaway profile, so
/// parallel runs never share one) and returns its stdout.
fn run_browser(browser: &Path, profile: &Path, url: &str, extra: &[&str]) -> String {
    let mut child = Command::new(browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={BUDGET_MS}"))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", browser.display()));
    // Read both pipes on threads so a chatty browser never blocks on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let code = loop {
        if let Some(code) = child.try_wait().unwrap() {
            break code;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} did not finish {url} within 90 s; stderr:\n{}",
                browser.display(),
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        code.success(),
        "{} failed on {url} ({code}); stderr:\n{err}",
        browser.display()
    );
    out
}

fn dump_dom(browser: &Path, profile: &Path, url: &str) -> String {
    let dom = run_browser(browser, profile, url, &["--dump-dom"]);
    assert!(dom.contains("</html>"), "no DOM from {url}:\n{dom}");
    dom
}

/// The opening tag of the element with `id` in a DOM dump.
fn tag_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!(" id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let start = dom[..at].rfind('<').unwrap();
    let end = at + dom[at..].find('>').unwrap();
    &dom[start..=end]
}

/// The text right inside the element with `id` (up to its first child tag).
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let tag = tag_of(dom, id);
    let at = dom.find(tag).unwrap() + tag.len();
    let rest = &dom[at..];
    &rest[..rest.find('<').unwrap_or(rest.len())]
}

fn is_hidden(dom: &str, id: &str) -> bool {
    tag_of(dom, id).contains(" hidden")
}

/// `data-rank` of every row of the workers table, in order.
fn worker_ranks(dom: &str) -> Vec<String> {
    let table = &dom[dom.find(tag_of(dom, "workers")).unwrap()..];
    let table = &table[..table.find("</table>").unwrap()];
    table
        .split("<tr data-rank=\"")
        .skip(1)
        .map(|r| r[..r.find('"').unwrap()].to_string())
        .collect()
}

/// A tiny MoE job (16×16 crops, a 2-layer ViT with 4 experts in its second block) that would
/// run for thousands of epochs: the test stops it.
fn write_job(dir: &Path) -> PathBuf {
    let job = format!(
        r#"
[data]
url = "file://{data}"
synth_samples = 1024
synth_shard_size = 64
image_size = 16
[data.augment]
crop_scale_min = 0.5
grayscale_p = 0.0
blur_p = 0.0
[model]
encoder = "vit"
projector_hidden = 32
projector_out = 16
[model.vit]
patch_size = 8
width = 32
layers = 2
heads = 2
[moe]
experts = 4
vit_blocks = [1]
top_k = 1
balance_loss_coef = 2.0
[optim]
kind = "adamw"
lr = 0.002
warmup_steps = 5
[train]
global_batch = 16
micro_batch = 8
epochs = 5000
log_every = 50
[cluster]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
heartbeat_ms = 200
worker_timeout_ms = 2000
lease_ttl_ms = 3000
collective_timeout_ms = 20000
[checkpoint]
url = "file://{ckpt}"
every_steps = 100000
"#,
        data = dir.join("data").display(),
        ckpt = dir.join("ckpt").display(),
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, job).unwrap();
    path
}

#[test]
fn status_page_follows_a_live_local_cluster() {
    let Some(browser) = browser() else { return };
    let dir = temp_dir("live");
    let job = write_job(&dir);
    let mut child = Command::new(CONTRAIL)
        .args(["local", "--workers", "2", "--config"])
        .arg(&job)
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting contrail local");
    let lines = lines_of(&mut child);
    let mut child = KillOnDrop(child);

    // The status address, then a running job with both ranks and a few steps behind it.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut addr = None;
    let mut seen = Vec::new();
    let mut last = None;
    let running = loop {
        assert!(
            Instant::now() < deadline,
            "the local cluster never got going; last status: {last:#?}\n{}",
            seen.join("\n")
        );
        if let Ok(Some(code)) = child.0.try_wait() {
            panic!("contrail local exited early ({code}):\n{}", seen.join("\n"));
        }
        while let Ok(line) = lines.try_recv() {
            if let Some(rest) = line.split("status http://").nth(1) {
                addr = Some(rest.trim_end_matches("/status").trim().to_string());
            }
            seen.push(line);
        }
        if let Some(s) = addr.as_deref().and_then(status) {
            let ranked = s.workers.iter().filter(|w| w.rank.is_some()).count();
            if s.state == JobState::Running && ranked == 2 && s.step >= 20 {
                break s;
            }
            last = Some(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let addr = addr.unwrap();
    let url = format!("http://{addr}/");
    let profile = dir.join("browser-profile");

    let first = dump_dom(&browser, &profile, &url);
    assert!(first.contains("<title>contrail"), "no title:\n{first}");
    assert!(first.contains("<h1>contrail</h1>"), "no heading:\n{first}");
    assert_eq!(text_of(&first, "state"), "running", "{first}");
    assert!(
        is_hidden(&first, "banner"),
        "a banner while running:\n{first}"
    );
    assert!(
        is_hidden(&first, "connection"),
        "page could not poll:\n{first}"
    );
    assert_eq!(worker_ranks(&first), ["0", "1"], "{first}");
    let step_of = |dom: &str| -> u64 {
        let t = text_of(dom, "step");
        t.parse()
            .unwrap_or_else(|_| panic!("#step is {t:?}, not a number:\n{dom}"))
    };
    let first_step = step_of(&first);
    assert!(
        first_step >= running.step,
        "{first_step} < {}",
        running.step
    );
    let loss: f64 = text_of(&first, "loss").parse().expect("#loss is a number");
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    assert_eq!(text_of(&first, "world-size"), "2");
    // The MoE block's per-expert bars: 4 experts.
    assert!(
        !is_hidden(&first, "experts"),
        "no experts section:\n{first}"
    );
    let block = &first[first.find("data-block=\"0\"").expect("no MoE block card")..];
    let bars = &block[block.find("class=\"ebars\"").unwrap()..];
    let bars = &bars[..bars.find("class=\"mean\"").unwrap()];
    assert_eq!(bars.matches("title=\"expert ").count(), 4, "{bars}");

    std::thread::sleep(Duration::from_secs(4));
    let second = dump_dom(&browser, &profile, &url);
    let second_step = step_of(&second);
    assert!(
        second_step > first_step,
        "the page's step did not advance: {first_step} then {second_step}"
    );
    let now = status(&addr).expect("status after the second dump");
    assert!(
        now.step >= second_step,
        "page ahead of /status: {second_step} > {}",
        now.step
    );
    assert_eq!(worker_ranks(&second), ["0", "1"], "{second}");

    let shot = std::env::var_os("CONTRAIL_STATUS_PAGE_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("status_page.png"));
    run_browser(
        &browser,
        &profile,
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,900",
        ],
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {shot:?}: {e}"));
    assert!(png.starts_with(b"\x89PNG"), "{shot:?} is not a PNG");
    // A blank 1280×900 page compresses to a few KB; the rendered page is far more.
    assert!(
        png.len() > 20_000,
        "screenshot of {} bytes: blank?",
        png.len()
    );
    eprintln!("screenshot: {} ({} KB)", shot.display(), png.len() / 1024);

    // Ctrl-C: `contrail local` stops its workers and exits.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
    let stopped = Instant::now();
    while child.0.try_wait().unwrap().is_none() {
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "contrail local ignored Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Serves the page and whatever report `report` holds (503 while it holds None) on
/// 127.0.0.1, like a coordinator would; returns the address.
fn serve_fake(report: Arc<Mutex<Option<StatusReport>>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let request = String::from_utf8_lossy(&request);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (code, kind, body) = match path {
                "/" => (
                    "200 OK",
                    "text/html; charset=utf-8",
                    contrail_coordinator::page::STATUS_PAGE.to_string(),
                ),
                "/status" => match report.lock().unwrap().as_ref() {
                    Some(r) => (
                        "200 OK",
                        "application/json",
                        serde_json::to_string(r).unwrap(),
                    ),
                    None => ("503 Service Unavailable", "text/plain", "down".into()),
                },
                _ => ("404 Not Found", "text/plain", "not found".into()),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {code}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

fn eval_round(step: u64, top1: Option<f64>, error: &str) -> EvalPoint {
    EvalPoint {
        step,
        knn_top1: top1,
        knn_top5: top1.map(|t| (t + 0.2).min(1.0)),
        bank_samples: 2048,
        test_samples: 1024,
        seconds: 3.0,
        error: error.into(),
        ..Default::default()
    }
}

fn worker(rank: Option<u32>, state: WorkerLiveness, shard: &str) -> WorkerStatus {
    WorkerStatus {
        worker_id: rank.map_or(9, |r| r as u64 + 1),
        rank,
        node: format!("node-{}/a", rank.map_or(9, |r| r / 2)),
        local_rank: rank.map_or(0, |r| r % 2),
        host: format!("node-{}", rank.map_or(9, |r| r / 2)),
        address: format!("10.0.0.{}:29500", rank.map_or(9, |r| r + 1)),
        state,
        last_heartbeat_ms: 150,
        shard: shard.into(),
        step: 1234,
    }
}

/// Every job state the page has a banner for, and the parts a live tiny job does not show
/// (dead workers, bad samples, a placement on its way), from reports served by a stand-in.
#[test]
fn status_page_shows_each_job_state() {
    let Some(browser) = browser() else { return };
    let dir = temp_dir("states");
    let profile = dir.join("browser-profile");
    let report = Arc::new(Mutex::new(None));
    let url = format!("http://{}/", serve_fake(report.clone()));

    // Unreachable from the start.
    let dom = dump_dom(&browser, &profile, &url);
    assert!(!is_hidden(&dom, "connection"), "{dom}");
    assert!(
        text_of(&dom, "connection").starts_with("Cannot reach the coordinator"),
        "{dom}"
    );

    // Waiting: one of two workers, no rank yet.
    *report.lock().unwrap() = Some(StatusReport {
        state: JobState::WaitingForWorkers,
        world_size: 2,
        workers: vec![worker(None, WorkerLiveness::Alive, "")],
        shards: ShardCounts {
            total: 16,
            pending: 16,
            ..Default::default()
        },
        ..Default::default()
    });
    let dom = dump_dom(&browser, &profile, &url);
    assert!(is_hidden(&dom, "connection"), "{dom}");
    assert_eq!(text_of(&dom, "state"), "waiting for workers");
    assert!(
        text_of(&dom, "banner").starts_with("Waiting for workers: 1 of 2 registered."),
        "{dom}"
    );
    assert_eq!(worker_ranks(&dom), [""], "{dom}");
    assert!(is_hidden(&dom, "experts"), "{dom}");
    assert!(is_hidden(&dom, "eval"), "{dom}");
    assert_eq!(text_of(&dom, "shards-pending"), "16");

    // Running after an automatic rollback (an MoE worker died): a warning says so.
    *report.lock().unwrap() = Some(StatusReport {
        state: JobState::Running,
        world_size: 1,
        step: 12,
        rollbacks: vec!["rank 1 died; generation 2 (1 workers) rolled back to \
                         file:///ck/step-00000010 (epoch 0, step 10)"
            .into()],
        workers: vec![worker(Some(0), WorkerLiveness::Alive, "")],
        ..Default::default()
    });
    let dom = dump_dom(&browser, &profile, &url);
    assert_eq!(
        text_of(&dom, "banner"),
        "Rolled back to the latest checkpoint once; the latest: rank 1 died; generation 2 \
         (1 workers) rolled back to file:///ck/step-00000010 (epoch 0, step 10)"
    );
    assert!(tag_of(&dom, "banner").contains("warn"), "{dom}");

    // Failed: a dead worker, bad samples, MoE with a placement not yet acknowledged.
    let mut failed = StatusReport {
        state: JobState::Failed,
        reason: "rank 1 (10.0.0.2:29500) died: silent for 2000 ms".into(),
        generation: 3,
        world_size: 3,
        epoch: 2,
        step: 1234,
        total_steps_estimate: Some(5000),
        samples_seen: 19_744,
        loss: Some(1.25),
        learning_rate: Some(3e-4),
        uptime_seconds: 345.0,
        workers: vec![
            worker(Some(2), WorkerLiveness::Left, ""),
            worker(Some(0), WorkerLiveness::Alive, "s3://b/data-000003.tar"),
            worker(Some(1), WorkerLiveness::Dead, ""),
        ],
        shards: ShardCounts {
            total: 100,
            pending: 60,
            leased: 3,
            done: 35,
            failed: 2,
        },
        loss_history: (1..=50).map(|i| (i * 20, 3.0 - i as f64 * 0.03)).collect(),
        eval_history: vec![
            eval_round(0, Some(0.412), ""),
            eval_round(1000, Some(0.7555), ""),
            eval_round(1200, None, "the bank has no labelled sample"),
        ],
        rollbacks: Vec::new(),
        experts: Some(ExpertStatus {
            placement_version: 3,
            acknowledged_version: 2,
            rebalances: 2,
            window_steps: 50,
            blocks: vec![
                ExpertBlockStatus {
                    block: 0,
                    label: "vit 1".into(),
                    load: vec![0.55, 0.15, 0.15, 0.15],
                    load_max_mean: 2.2,
                    worker_load_max_mean: 1.4,
                    dropped_fraction: 0.021,
                    holders: vec![vec![0], vec![1], vec![2], vec![0, 1]],
                    ..Default::default()
                },
                ExpertBlockStatus {
                    block: 1,
                    label: "text 0".into(),
                    load_max_mean: 1.0,
                    worker_load_max_mean: 1.0,
                    ..Default::default()
                },
            ],
        }),
        ..Default::default()
    };
    failed.bad_samples.insert("decode".into(), 12);
    failed.bad_samples.insert("missing_caption".into(), 3);
    *report.lock().unwrap() = Some(failed.clone());
    let dom = dump_dom(&browser, &profile, &url);
    assert_eq!(
        text_of(&dom, "banner"),
        "Job failed at step 1234: rank 1 (10.0.0.2:29500) died: silent for 2000 ms"
    );
    assert!(tag_of(&dom, "banner").contains("bad"), "{dom}");
    // Sorted by rank, whatever order the report has.
    assert_eq!(worker_ranks(&dom), ["0", "1", "2"], "{dom}");
    // A header row starts each node's ranks (ranks 0-1 on node-0, rank 2 on node-1).
    let nodes: Vec<&str> = dom
        .split("<tr class=\"node\" data-node=\"")
        .skip(1)
        .map(|r| &r[..r.find('"').unwrap()])
        .collect();
    assert_eq!(nodes, ["node-0/a", "node-1/a"], "{dom}");
    assert!(
        text_of(&dom, "workers-count").ends_with("on 2 nodes"),
        "{dom}"
    );
    let dead_row = &dom[dom.find("<tr data-rank=\"1\"").unwrap()..];
    let dead_row = &dead_row[..dead_row.find("</tr>").unwrap()];
    assert!(dead_row.contains("class=\"st-dead\">dead<"), "{dead_row}");
    assert!(
        dom.contains(">data-000003.tar<"),
        "shard file name not shown:\n{dom}"
    );
    assert_eq!(text_of(&dom, "step"), "1234");
    assert_eq!(text_of(&dom, "total-steps"), "5000");
    assert_eq!(text_of(&dom, "progress-label"), "24%");
    assert_eq!(text_of(&dom, "lr"), "3.00e-4");
    assert_eq!(text_of(&dom, "bad-total"), "15 skipped");
    let bad = &dom[dom.find(tag_of(&dom, "bad-samples")).unwrap()..];
    let bad = &bad[..bad.find("</ul>").unwrap()];
    assert!(bad.find(">decode<").unwrap() < bad.find(">missing_caption<").unwrap());
    assert!(bad.contains(">12<") && bad.contains(">3<"), "{bad}");
    for (k, n) in [("done", 35), ("leased", 3), ("pending", 60), ("failed", 2)] {
        assert_eq!(text_of(&dom, &format!("shards-{k}")), n.to_string());
    }
    // The latest round that voted, the baseline beside it, and why the last one did not.
    assert!(!is_hidden(&dom, "eval"), "{dom}");
    assert_eq!(text_of(&dom, "eval-top1"), "75.5%");
    assert_eq!(text_of(&dom, "eval-step"), "1000");
    assert_eq!(text_of(&dom, "eval-first"), "41.2% at step 0");
    assert_eq!(text_of(&dom, "eval-sets"), "2048 / 1024");
    assert_eq!(
        text_of(&dom, "eval-error"),
        "step 1200: not measured (the bank has no labelled sample)"
    );
    assert!(!is_hidden(&dom, "experts"), "{dom}");
    let summary = text_of(&dom, "experts-summary");
    assert!(
        summary.starts_with("placement v3 (on its way; workers run v2) · 2 rebalances"),
        "{summary}"
    );
    let blocks = &dom[dom.find(tag_of(&dom, "expert-blocks")).unwrap()..];
    assert!(blocks.contains(">block 0 · vit 1<"), "{blocks}");
    assert!(blocks.contains(">block 1 · text 0<"), "{blocks}");
    assert!(blocks.contains("no load reported yet"), "{blocks}");
    // The hot expert is flagged, its share and holders in the bar's tooltip.
    assert!(
        blocks.contains("class=\"busy\"")
            && blocks.contains("title=\"expert 0: 55.0% of assignments, on rank 0\""),
        "{blocks}"
    );
    assert!(blocks.contains("on ranks 0, 1\""), "{blocks}");
    assert!(
        blocks.contains(">2.20<") && blocks.contains(">2.1%<"),
        "{blocks}"
    );

    // Finished.
    *report.lock().unwrap() = Some(StatusReport {
        state: JobState::Finished,
        reason: String::new(),
        step: 5000,
        samples_seen: 80_000,
        ..failed
    });
    let dom = dump_dom(&browser, &profile, &url);
    assert_eq!(
        text_of(&dom, "banner"),
        "Job finished: 5000 steps, 80,000 samples."
    );
    assert!(tag_of(&dom, "banner").contains("ok"), "{dom}");
    assert_eq!(text_of(&dom, "progress-label"), "100%");
    assert_eq!(text_of(&dom, "eta"), "done");
    let _ = std::fs::remove_dir_all(&dir);
}
