//! Failures of real processes: workers and the coordinator SIGKILLed mid-epoch. The job must
//! finish, the audit must show every sample of every epoch trained exactly once, and every
//! worker that finished must hold bit-identical parameters.

use std::cell::RefCell;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use contrail_common::auth::TOKEN_ENV;
use contrail_common::status::StatusReport;
use contrail_test_support::cluster::status;

use crate::local_cluster::{
    child_pids, free_port, spawn_local, status_address, strip_ansi, temp_dir, write_job,
    write_synth, CONTRAIL, JOB_TOKEN,
};

/// Samples of the synthetic dataset the recovery jobs train on (32 shards of 64).
const SAMPLES: u64 = 2048;
/// Epochs the recovery jobs train.
const EPOCHS: u32 = 4;

/// A coordinator and workers started by hand (`contrail coordinator`, `contrail worker`) on
/// one job, so a test can kill and restart each of them. Every process logs to
/// `dir/NAME.stderr` (and a worker's stdout to `dir/NAME.stdout`).
struct HandCluster {
    dir: PathBuf,
    job: PathBuf,
    grpc: String,
    http: String,
    /// `--set` overrides of every coordinator start.
    sets: Vec<String>,
    /// Every process started, by name; killed when the cluster is dropped.
    procs: RefCell<Vec<(String, Child)>>,
}

impl HandCluster {
    /// The job of `write_job` on [`SAMPLES`] samples for [`EPOCHS`] epochs with an audit of
    /// every step, plus `sets`.
    fn new(name: &str, sets: &[&str]) -> Self {
        Self::with_job(name, "", sets)
    }

    /// [`HandCluster::new`] with `extra` TOML sections in the job file.
    fn with_job(name: &str, extra: &str, sets: &[&str]) -> Self {
        let dir = temp_dir(name);
        let job = write_job(&dir, SAMPLES, EPOCHS, extra);
        write_synth(&dir, SAMPLES);
        let grpc = format!("127.0.0.1:{}", free_port());
        let http = format!("127.0.0.1:{}", free_port());
        let mut all = vec![
            format!("cluster.grpc_addr={grpc}"),
            format!("cluster.http_addr={http}"),
            format!("train.epochs={EPOCHS}"),
            format!("audit.url=file://{}", dir.join("audit").display()),
            "audit.flush_every_steps=1".into(),
        ];
        all.extend(sets.iter().map(|s| s.to_string()));
        Self {
            dir,
            job,
            grpc,
            http,
            sets: all,
            procs: Default::default(),
        }
    }

    fn log_file(&self, name: &str, ext: &str) -> std::fs::File {
        std::fs::File::create(self.dir.join(format!("{name}.{ext}"))).unwrap()
    }

    /// Starts `contrail coordinator` as `name`.
    fn coordinator(&self, name: &str) {
        let mut cmd = Command::new(CONTRAIL);
        cmd.args(["coordinator", "--config"]).arg(&self.job);
        for s in &self.sets {
            cmd.args(["--set", s]);
        }
        let child = cmd
            .env(TOKEN_ENV, JOB_TOKEN)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(self.log_file(name, "stderr"))
            .spawn()
            .unwrap();
        self.procs.borrow_mut().push((name.to_string(), child));
    }

    /// Starts `contrail worker` as `name`.
    fn worker(&self, name: &str) {
        self.node_worker(name, 1);
    }

    /// Starts `contrail worker --local-ranks N` as `name`, leading a process group of its
    /// own (with its rank processes).
    fn node_worker(&self, name: &str, local_ranks: u32) {
        let child = Command::new(CONTRAIL)
            .args(["worker", "--coordinator", &format!("http://{}", self.grpc)])
            .args(["--threads", "1", "--local-ranks", &local_ranks.to_string()])
            .process_group(0)
            .env(TOKEN_ENV, JOB_TOKEN)
            .env(
                "CONTRAIL_LOG",
                std::env::var("E2E_WORKER_LOG").unwrap_or("info".into()),
            )
            .current_dir(&self.dir)
            .stderr(self.log_file(name, "stderr"))
            .stdout(self.log_file(name, "stdout"))
            .spawn()
            .unwrap();
        self.procs.borrow_mut().push((name.to_string(), child));
    }

    /// SIGKILLs `name` and reaps it.
    fn kill(&self, name: &str) {
        let mut procs = self.procs.borrow_mut();
        let (_, child) = procs.iter_mut().find(|(n, _)| n == name).expect("started");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGKILLs `name`'s whole process group (a node worker and its ranks: a lost machine)
    /// and reaps it.
    fn kill_node(&self, name: &str) {
        let mut procs = self.procs.borrow_mut();
        let (_, child) = procs.iter_mut().find(|(n, _)| n == name).expect("started");
        // SAFETY: kill(2) on the process group a child this cluster started leads.
        assert_eq!(
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) },
            0
        );
        let _ = child.wait();
    }

    /// Sends `signal` to `name` (e.g. SIGSTOP: a lost node, sockets open and silent).
    fn signal(&self, name: &str, signal: libc::c_int) {
        let procs = self.procs.borrow();
        let (_, child) = procs.iter().find(|(n, _)| n == name).expect("started");
        // SAFETY: kill(2) on a child this cluster started and has not reaped.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
    }

    /// The process id of `name`.
    fn pid(&self, name: &str) -> u32 {
        let procs = self.procs.borrow();
        procs
            .iter()
            .find(|(n, _)| n == name)
            .expect("started")
            .1
            .id()
    }

    /// Waits up to `limit` for `name` to exit; its exit status.
    fn wait_exit(&self, name: &str, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            let code = {
                let mut procs = self.procs.borrow_mut();
                let (_, child) = procs.iter_mut().find(|(n, _)| n == name).expect("started");
                child.try_wait().unwrap()
            };
            if let Some(code) = code {
                return code;
            }
            assert!(
                Instant::now() < deadline,
                "{name} still running after {limit:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the workers `names` to exit, each successfully.
    fn assert_exit_ok(&self, names: &[&str]) {
        for name in names {
            let code = {
                let mut procs = self.procs.borrow_mut();
                let (_, child) = procs.iter_mut().find(|(n, _)| n == name).expect("started");
                child.wait().unwrap()
            };
            assert!(code.success(), "{name} exited with {code}\n{}", self.logs());
        }
    }

    fn read(&self, name: &str, ext: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.{ext}"))).unwrap_or_default()
    }

    /// Every process's stderr and exit status so far, for a failure message.
    fn logs(&self) -> String {
        let mut procs = self.procs.borrow_mut();
        procs
            .iter_mut()
            .map(|(n, child)| {
                let exit = match child.try_wait() {
                    Ok(Some(code)) => format!("exited: {code}"),
                    _ => "running".to_string(),
                };
                format!("--- {n} ({exit}):\n{}", self.read(n, "stderr"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The first status (polled every 50 ms; none while the coordinator is down) for which
    /// `done` holds.
    fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        done: impl Fn(&StatusReport) -> bool,
    ) -> StatusReport {
        let deadline = Instant::now() + limit;
        let mut last = None;
        loop {
            if let Some(s) = status(&self.http) {
                if done(&s) {
                    return s;
                }
                last = Some(s);
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?}; last status: {last:#?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `contrail audit check` must prove every epoch trained exactly once.
    fn assert_audit_exactly_once(&self) {
        assert_audit_exactly_once(&self.dir, || self.logs());
    }

    /// The "final parameters" log line of worker `name`.
    fn final_parameters(&self, name: &str) -> String {
        let err = strip_ansi(&self.read(name, "stderr"));
        err.lines()
            .find(|l| l.contains("final parameters"))
            .unwrap_or_else(|| panic!("{name} logged no final parameters:\n{err}"))
            .to_string()
    }

    /// The workers' final parameter digests must be identical.
    fn assert_same_parameters(&self, workers: &[&str]) {
        let digests: Vec<String> = workers
            .iter()
            .map(|n| {
                let line = self.final_parameters(n);
                let digest = line.split("digest=").nth(1).expect("a digest field");
                digest.split_whitespace().next().unwrap().to_string()
            })
            .collect();
        assert!(
            digests.iter().all(|d| *d == digests[0]),
            "the workers' parameters differ: {digests:?}"
        );
    }

    /// Every replica of an expert must end the same on the workers `names`; returns how many
    /// distinct experts they hold together.
    fn assert_same_expert_replicas(&self, workers: &[&str]) -> usize {
        let mut seen: std::collections::BTreeMap<String, (String, String)> = Default::default();
        for n in workers {
            let line = self.final_parameters(n);
            let field = line.split(" experts=").nth(1).expect("an experts field");
            for entry in field.split_whitespace() {
                let (expert, digest) = entry.rsplit_once('=').expect("expert=digest");
                let first = seen
                    .entry(expert.to_string())
                    .or_insert_with(|| (n.to_string(), digest.to_string()));
                assert_eq!(
                    first.1, digest,
                    "{expert} differs between {} and {n}",
                    first.0
                );
            }
        }
        seen.len()
    }

    fn finished(&self, limit: Duration) -> StatusReport {
        let end = self.wait_for("the job ending", limit, |s| s.state.is_terminal());
        assert_eq!(
            end.state.as_str(),
            "finished",
            "{}\n{}",
            end.reason,
            self.logs()
        );
        end
    }
}

/// `contrail audit check` on `dir/audit` and `dir/data` must prove every epoch trained exactly
/// once; `logs` for a failure message.
fn assert_audit_exactly_once(dir: &std::path::Path, logs: impl Fn() -> String) {
    let out = Command::new(CONTRAIL)
        .args(["audit", "check", "--audit"])
        .arg(format!("file://{}", dir.join("audit").display()))
        .arg("--data")
        .arg(format!("file://{}", dir.join("data").display()))
        .output()
        .unwrap();
    let audit = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{audit}\n{}", logs());
    for epoch in 0..EPOCHS {
        let line = format!("epoch {epoch}: all {SAMPLES} samples trained exactly once");
        assert!(audit.contains(&line), "{audit}");
    }
    eprintln!("{audit}");
}

impl Drop for HandCluster {
    fn drop(&mut self) {
        for (_, mut child) in self.procs.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A coordinator and workers w0, w1, w2 (`cluster.min_workers = 2`, global batch 48, plus
/// `sets`), once training is under way (step 5), and the status then.
fn three_workers_training(name: &str, sets: &[&str]) -> (HandCluster, StatusReport) {
    let mut all = vec![
        "cluster.world_size=3",
        "cluster.min_workers=2",
        "train.global_batch=48",
    ];
    all.extend_from_slice(sets);
    let c = HandCluster::new(name, &all);
    c.coordinator("coordinator");
    for w in ["w0", "w1", "w2"] {
        c.worker(w);
    }
    let before = c.wait_for("training starting", Duration::from_secs(300), |s| {
        s.step >= 5 && s.workers.len() == 3
    });
    (c, before)
}

/// The ranked workers of `s` in rank order: (node, local rank) each.
fn node_slots(s: &StatusReport) -> Vec<(String, u32)> {
    let mut ranked: Vec<_> = s.workers.iter().filter(|w| w.rank.is_some()).collect();
    ranked.sort_by_key(|w| w.rank);
    ranked
        .iter()
        .map(|w| (w.node.clone(), w.local_rank))
        .collect()
}

/// Asserts `slots` (from [`node_slots`]) are two nodes of two ranks, node-major.
fn assert_two_nodes_of_two(slots: &[(String, u32)], what: &str) {
    assert_eq!(slots.len(), 4, "{what}: {slots:?}");
    let locals: Vec<u32> = slots.iter().map(|s| s.1).collect();
    assert_eq!(locals, [0, 1, 0, 1], "{what}: {slots:?}");
    assert!(
        slots[0].0 == slots[1].0 && slots[2].0 == slots[3].0 && slots[0].0 != slots[2].0,
        "{what}: ranks are not node-major: {slots:?}"
    );
}

/// A coordinator and node workers n0, n1 of two ranks each (`contrail worker --local-ranks
/// 2`; `cluster.min_workers = 2`, global batch 64, plus `sets`), once training is under way
/// (step 5), and the status then.
fn two_nodes_training(name: &str, sets: &[&str]) -> (HandCluster, StatusReport) {
    let mut all = vec![
        "cluster.world_size=4",
        "cluster.min_workers=2",
        "train.global_batch=64",
    ];
    all.extend_from_slice(sets);
    let c = HandCluster::new(name, &all);
    c.coordinator("coordinator");
    c.node_worker("n0", 2);
    c.node_worker("n1", 2);
    let before = c.wait_for("training starting", Duration::from_secs(300), |s| {
        s.step >= 5 && node_slots(s).len() == 4
    });
    (c, before)
}

/// `cluster.min_workers = 2`, two node workers of two ranks each (`contrail worker
/// --local-ranks 2`). One node worker's whole process group is SIGKILLed mid-epoch (a lost
/// machine): the other node's two ranks regroup once (one new generation of two ranks, not
/// one per lost rank), a replacement node worker of two ranks joins whole at a step boundary
/// with the contiguous ranks 2–3, the job finishes, and the audit proves every epoch trained
/// exactly once, although the audit is written every 4 steps (the killed ranks' unwritten
/// records come from the survivors).
#[test]
fn a_killed_node_leaves_in_one_regroup_and_a_replacement_node_joins_whole() {
    // The killed ranks' last records are unwritten: the survivors' copies stand in.
    let (c, before) = two_nodes_training("node-kill", &["audit.flush_every_steps=4"]);
    assert_two_nodes_of_two(&node_slots(&before), "at the start");
    c.kill_node("n1");
    let lost = c.wait_for(
        "the surviving node regrouping",
        Duration::from_secs(120),
        |s| s.generation > before.generation,
    );
    assert_eq!(
        (lost.generation, lost.world_size),
        (before.generation + 1, 2),
        "one regroup for the whole node\n{}",
        c.logs()
    );
    let survivors = node_slots(&lost);
    assert!(
        survivors.len() == 2 && survivors[0].0 == survivors[1].0,
        "{survivors:?}"
    );
    c.node_worker("n2", 2);
    let after = c.finished(Duration::from_secs(300));
    assert_eq!(
        after.generation,
        before.generation + 2,
        "one regroup for the lost node and one for the replacement node\n{}",
        c.logs()
    );
    let slots = node_slots(&after);
    assert_two_nodes_of_two(&slots, "at the end");
    assert_eq!(slots[0].0, survivors[0].0, "the survivors keep ranks 0-1");
    c.assert_exit_ok(&["n0", "n2"]);
    c.assert_audit_exactly_once();
    c.assert_same_parameters(&["n0", "n2"]);
}

/// The node worker supervises its ranks. A rank process SIGKILLed alone makes its node
/// worker stop the node's other rank at once and exit with an error naming it (a node is one
/// failure domain); the other node trains on. SIGTERM sent to a node worker alone reaches its
/// ranks, which stop, and the node worker exits.
#[test]
fn a_node_worker_stops_its_ranks_when_one_dies_and_forwards_sigterm() {
    let (c, before) = two_nodes_training("node-supervise", &[]);
    let (ranks0, ranks1) = (child_pids(c.pid("n0")), child_pids(c.pid("n1")));
    assert_eq!(
        (ranks0.len(), ranks1.len()),
        (2, 2),
        "{ranks0:?} {ranks1:?}"
    );
    let gone = |pids: &[u32]| {
        pids.iter()
            .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
    };

    // SAFETY: kill(2) on a grandchild this test started (a rank of n0).
    assert_eq!(
        unsafe { libc::kill(ranks0[1] as libc::pid_t, libc::SIGKILL) },
        0
    );
    let code = c.wait_exit("n0", Duration::from_secs(30));
    assert!(!code.success(), "n0 exited with {code}");
    let err = strip_ansi(&c.read("n0", "stderr"));
    assert!(
        err.contains("local rank 1 exited") && err.contains("other ranks were stopped"),
        "{err}"
    );
    assert!(gone(&ranks0), "a rank of n0 outlived it: {ranks0:?}");
    c.wait_for("the other node regrouping", Duration::from_secs(120), |s| {
        s.generation > before.generation && s.world_size == 2
    });

    c.signal("n1", libc::SIGTERM);
    let code = c.wait_exit("n1", Duration::from_secs(40));
    assert!(!code.success(), "n1 was stopped, it did not finish: {code}");
    assert!(gone(&ranks1), "a rank of n1 outlived SIGTERM: {ranks1:?}");
}

/// `cluster.min_workers = 2`: of 3 workers one is SIGKILLed mid-epoch; the other two regroup
/// as the next generation without restarting and train on with the same global batch; then a
/// replacement joins the running job (taking its state from the members), the job finishes,
/// the audit proves every sample of every epoch was trained exactly once, and all three
/// finish with bit-identical parameters.
#[test]
fn survivors_of_a_killed_worker_regroup_and_finish_the_job() {
    let (c, before) = three_workers_training("regroup", &[]);
    c.kill("w2"); // SIGKILL, mid-epoch (an epoch is 43 steps)

    // Once the survivors regrouped, a replacement starts and joins the running job.
    c.wait_for("the survivors regrouping", Duration::from_secs(120), |s| {
        s.generation > before.generation
    });
    c.worker("w3");
    let after = c.finished(Duration::from_secs(300));
    assert!(after.generation > before.generation, "no new generation");
    assert!(after.step > before.step);
    c.assert_exit_ok(&["w0", "w1", "w3"]);
    let joined = c.read("w3", "stderr");
    assert!(joined.contains("joined the running job"), "{joined}");
    // Ranks follow registration order, so either survivor may be rank 0 of the new world.
    let out0 = c.read("w0", "stdout") + &c.read("w1", "stdout");
    assert!(
        out0.contains("regrouped as generation") && out0.contains("with 2 workers"),
        "{out0}"
    );
    assert!(out0.contains("rank 0 finished"), "{out0}");
    c.assert_audit_exactly_once();
    c.assert_same_parameters(&["w0", "w1", "w3"]);
    eprintln!(
        "killed at step {}, generation {} -> {}; finished at step {}",
        before.step, before.generation, after.generation, after.step
    );
}

/// A lost node: a worker frozen with SIGSTOP keeps its sockets open and sends nothing. The
/// coordinator declares it dead after `worker_timeout_ms`, and the survivors' heartbeats
/// interrupt the collective they wait in (`HeartbeatReply.peer_lost`) instead of waiting out
/// `collective_timeout_ms`, set here to 10 minutes, far beyond the test's bound. They
/// regroup, the job finishes, every sample of every epoch is trained exactly once.
#[test]
fn survivors_of_a_frozen_worker_regroup_without_waiting_for_the_collective_timeout() {
    let (c, before) = three_workers_training("frozen", &["cluster.collective_timeout_ms=600000"]);
    c.signal("w2", libc::SIGSTOP);
    let after = c.finished(Duration::from_secs(120));
    c.kill("w2");
    assert!(after.generation > before.generation, "no new generation");
    c.assert_exit_ok(&["w0", "w1"]);
    let logs = c.read("w0", "stderr") + &c.read("w1", "stderr");
    assert!(logs.contains("interrupting the collective"), "{}", c.logs());
    c.assert_audit_exactly_once();
    c.assert_same_parameters(&["w0", "w1"]);
}

/// The coordinator is SIGKILLed mid-epoch and started again: it takes the job over from its
/// journal (under `checkpoint.url`), the workers keep training on the shards they hold, retry
/// their calls meanwhile and re-attach, and the job finishes with every sample of every epoch
/// trained exactly once. No `cluster.min_workers`: the journal alone keeps the job.
#[test]
fn a_restarted_coordinator_takes_the_job_over_from_its_journal() {
    // A checkpoint every 5 steps: one is usually due while the coordinator is down, and is
    // written once it is back (`checkpoint of step N: waiting for the coordinator`).
    let c = HandCluster::new("coordinator-restart", &["checkpoint.every_steps=5"]);
    c.coordinator("coordinator");
    c.worker("w0");
    c.worker("w1");
    let before = c.wait_for("training starting", Duration::from_secs(300), |s| {
        s.step >= 10 && s.workers.len() == 2
    });
    c.kill("coordinator"); // SIGKILL, mid-epoch (an epoch is 128 steps)
                           // Down for longer than a checkpoint waits for it before handing the write to the
                           // background (2 s).
    std::thread::sleep(Duration::from_millis(3000));
    c.coordinator("coordinator-restarted");
    let resumed = c.wait_for(
        "the restarted coordinator serving",
        Duration::from_secs(60),
        |_| true,
    );
    assert_eq!(
        (resumed.generation, resumed.workers.len()),
        (before.generation, 2),
        "the restarted coordinator must know the same workers\n{}",
        c.logs()
    );
    // Step reports are journaled lazily (within a second), so the restarted coordinator may
    // show an earlier step until the next reports arrive.
    let after = c.finished(Duration::from_secs(300));
    assert!(after.step > before.step);
    assert_eq!(after.generation, before.generation, "no worker was lost");
    c.assert_exit_ok(&["w0", "w1"]);
    let taken = c.read("coordinator-restarted", "stderr");
    assert!(taken.contains("took the running job over"), "{taken}");
    let outage = c.read("w0", "stderr") + &c.read("w1", "stderr");
    assert!(outage.contains("does not answer"), "{}", c.logs());
    c.assert_audit_exactly_once();
    c.assert_same_parameters(&["w0", "w1"]);
    let latest = std::fs::read_to_string(c.dir.join("ckpt/LATEST")).unwrap();
    assert_eq!(latest.trim(), format!("step-{:08}", after.step));
    let out = c.read("w0", "stdout") + &c.read("w1", "stdout");
    let deferred = out
        .lines()
        .filter(|l| l.contains("waiting for the coordinator"))
        .count();
    eprintln!("checkpoints deferred during the outage: {deferred}");
}

/// xorshift64*: the chaos schedule from a seed.
struct Chaos(u64);

impl Chaos {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The seed of a chaos run: `CONTRAIL_CHAOS_SEED`, default 7.
fn chaos_seed() -> Chaos {
    let seed: u64 = std::env::var("CONTRAIL_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    eprintln!("chaos seed {seed} (CONTRAIL_CHAOS_SEED)");
    Chaos(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
}

/// Starts the coordinator and `world` workers of `c`, then makes four kills at random steps
/// (5 to 34 steps apart), each of the coordinator (restarted after a random pause) or of a
/// random worker (a replacement starts once the survivors regrouped, and the next kill waits
/// until it joined and a step was committed with it). Waits for the job to finish; returns
/// the workers alive at the end and the final status.
fn chaos(c: &HandCluster, world: usize, rng: &mut Chaos) -> (Vec<String>, StatusReport) {
    let mut coordinator = "coordinator".to_string();
    c.coordinator(&coordinator);
    let mut workers: Vec<String> = (0..world).map(|i| format!("w{i}")).collect();
    for w in &workers {
        c.worker(w);
    }
    let alive = |n: &StatusReport| {
        n.workers
            .iter()
            .filter(|w| w.state.as_str() == "alive" && w.rank.is_some())
            .count()
    };
    let mut at = 5;
    let mut restarts = 0;
    let mut started = workers.len();
    let mut schedule = Vec::new();
    for event in 0..4 {
        at += 5 + rng.below(30);
        let s = c.wait_for(&format!("step {at}"), Duration::from_secs(120), |s| {
            s.step >= at && s.state.as_str() == "running"
        });
        if rng.below(5) < 2 {
            let pause = 100 + rng.below(1400);
            schedule.push(format!(
                "step {}: coordinator, restarted after {pause} ms",
                s.step
            ));
            eprintln!("{}", schedule.last().unwrap());
            c.kill(&coordinator);
            std::thread::sleep(Duration::from_millis(pause));
            restarts += 1;
            coordinator = format!("coordinator-{restarts}");
            c.coordinator(&coordinator);
        } else {
            let victim = rng.below(workers.len() as u64) as usize;
            let name = workers.remove(victim);
            schedule.push(format!("step {}: worker {name}", s.step));
            eprintln!("{}", schedule.last().unwrap());
            c.kill(&name);
            // The replacement starts once the victim is declared dead (the job has room).
            let left = workers.len();
            let regrouped = c.wait_for(
                &format!("regroup after kill {event}"),
                Duration::from_secs(120),
                |n| n.generation > s.generation && alive(n) == left,
            );
            let name = format!("w{started}");
            started += 1;
            c.worker(&name);
            workers.push(name);
            let joined = c.wait_for(
                &format!("the replacement joining after kill {event}"),
                Duration::from_secs(120),
                |n| {
                    n.state.is_terminal()
                        || (n.generation > regrouped.generation && alive(n) == left + 1)
                },
            );
            // Its first committed step: the members have handed it their state (a kill
            // before that could take the only copy of an expert it was about to receive).
            c.wait_for(
                &format!("a step with the replacement after kill {event}"),
                Duration::from_secs(120),
                |n| n.state.is_terminal() || n.step > joined.step,
            );
        }
    }
    eprintln!("chaos schedule:\n  {}", schedule.join("\n  "));
    let end = c.finished(Duration::from_secs(300));
    (workers, end)
}

/// A seeded chaos run (`CONTRAIL_CHAOS_SEED`, default 7) of a dense job on 3 workers with
/// `cluster.min_workers = 1`: the job finishes within its bound, exactly once, every
/// finishing worker with the same parameters.
#[test]
fn seeded_chaos_of_worker_and_coordinator_kills_keeps_every_guarantee() {
    let c = HandCluster::new(
        "chaos",
        &[
            "cluster.world_size=3",
            "cluster.min_workers=1",
            "train.global_batch=48",
        ],
    );
    // 4 epochs of 43 steps: the four kills fall in the first three.
    let (workers, _) = chaos(&c, 3, &mut chaos_seed());
    let names: Vec<&str> = workers.iter().map(String::as_str).collect();
    c.assert_exit_ok(&names);
    c.assert_audit_exactly_once();
    c.assert_same_parameters(&names);
}

/// The same chaos on an MoE job whose 2 experts each live on 2 of its 4 workers: every
/// worker kill leaves a replica of each expert, so the survivors never roll back, and each
/// replacement takes a replica of the expert left with one. Exactly once, equal shared
/// parameters, equal replicas of both experts at the end.
#[test]
fn seeded_chaos_of_an_moe_job_keeps_every_expert_without_rollback() {
    let c = moe_cluster(
        "moe-chaos",
        &[
            "cluster.world_size=4",
            "cluster.min_workers=3",
            // A multiple of 4 × 4 and of 3 × 4 (workers × micro-batch): 43 steps an epoch.
            "train.micro_batch=4",
            "train.global_batch=48",
        ],
    );
    let (workers, end) = chaos(&c, 4, &mut chaos_seed());
    assert!(end.rollbacks.is_empty(), "{:#?}", end.rollbacks);
    let names: Vec<&str> = workers.iter().map(String::as_str).collect();
    c.assert_exit_ok(&names);
    c.assert_audit_exactly_once();
    c.assert_same_parameters(&names);
    assert_eq!(c.assert_same_expert_replicas(&names), 2);
}

/// A ViT with one MoE block of 2 experts (top-1), and the settings it trains with.
const MOE_JOB: &str = "[model.vit]\npatch_size = 8\nwidth = 32\nlayers = 2\nheads = 2\n\
                       [moe]\nexperts = 2\nvit_blocks = [1]\ntop_k = 1\n";
const MOE_SETS: [&str; 3] = ["model.encoder=vit", "optim.kind=adamw", "optim.lr=0.002"];

/// A hand-started cluster of the [`MOE_JOB`] with `sets`.
fn moe_cluster(name: &str, sets: &[&str]) -> HandCluster {
    let mut all = MOE_SETS.to_vec();
    all.extend_from_slice(sets);
    HandCluster::with_job(name, MOE_JOB, &all)
}

/// MoE with `cluster.min_workers`: two workers, one expert each (`moe.experts = 2`), so the
/// worker SIGKILLed mid-epoch takes the only copy of its expert with it. The survivor rolls
/// back to the latest checkpoint on its own (a new placement: both experts on it), the log and
/// `/status` say so, and the job finishes.
#[test]
fn a_dead_moe_worker_rolls_every_rank_back_to_the_checkpoint() {
    let c = moe_cluster(
        "moe-rollback",
        &[
            "cluster.world_size=2",
            "cluster.min_workers=1",
            "train.global_batch=16",
            "train.epochs=2",
            "checkpoint.every_steps=10",
        ],
    );
    c.coordinator("coordinator");
    for w in ["w0", "w1"] {
        c.worker(w);
    }
    let before = c.wait_for(
        "a checkpoint and a few steps",
        Duration::from_secs(300),
        |s| s.step >= 15 && s.workers.len() == 2,
    );
    // Ranks follow registration order: whichever is not rank 0 dies.
    let victim = if c.read("w0", "stderr").contains("rank=0") {
        "w1"
    } else {
        "w0"
    };
    let survivor = if victim == "w0" { "w1" } else { "w0" };
    c.kill(victim);
    let after = c.finished(Duration::from_secs(300));
    c.assert_exit_ok(&[survivor]);
    assert!(after.generation > before.generation);
    assert_eq!(after.rollbacks.len(), 1, "{:#?}", after.rollbacks);
    assert!(
        after.rollbacks[0].contains("rolled back to") && after.rollbacks[0].contains("step-"),
        "{}",
        after.rollbacks[0]
    );
    let out = c.read(survivor, "stdout");
    assert!(out.contains("rolled back to"), "{out}\n{}", c.logs());
    assert!(out.contains("rank 0 finished"), "{out}");
}

/// MoE with replicas: 2 experts on 4 workers, so each expert lives on two of them. A worker
/// SIGKILLed mid-epoch takes one replica of its expert with it; the other 3 regroup without a
/// rollback, keep the surviving replicas (new ranks, new placement version), and train on
/// from their own state. Then a replacement joins the running job and takes a replica (of the
/// expert left with one) from the members. The job finishes, no checkpoint is read (there is
/// none), the audit proves every sample of every epoch trained exactly once, the shared
/// parameters are bit-identical on all four, and so is every replica of each expert.
#[test]
fn a_dead_moe_worker_whose_expert_has_a_replica_is_replaced_by_it_without_rollback() {
    let c = moe_cluster(
        "moe-replica",
        &[
            "cluster.world_size=4",
            "cluster.min_workers=3",
            // A multiple of 4 × 8 and of 3 × 8 (workers × micro-batch).
            "train.global_batch=96",
        ],
    );
    c.coordinator("coordinator");
    let names = ["w0", "w1", "w2", "w3"];
    for w in names {
        c.worker(w);
    }
    let before = c.wait_for("training starting", Duration::from_secs(300), |s| {
        s.step >= 5 && s.workers.len() == 4
    });
    c.kill("w2"); // SIGKILL, mid-epoch (an epoch is 22 steps)
    let regrouped = c.wait_for("the survivors regrouping", Duration::from_secs(120), |s| {
        s.generation > before.generation
    });
    c.worker("w4");
    let after = c.finished(Duration::from_secs(400));
    let survivors = ["w0", "w1", "w3", "w4"];
    c.assert_exit_ok(&survivors);
    let joined = c.read("w4", "stderr");
    assert!(joined.contains("joined the running job"), "{joined}");
    assert!(
        after.generation > regrouped.generation,
        "the replacement formed none"
    );
    assert!(after.generation > before.generation, "no new generation");
    assert!(after.rollbacks.is_empty(), "{:#?}", after.rollbacks);
    let out: String = survivors.iter().map(|n| c.read(n, "stdout")).collect();
    assert!(
        out.contains("regrouped as generation") && out.contains("with 3 workers"),
        "{out}"
    );
    assert!(out.contains("with 4 workers"), "{out}");
    assert!(!out.contains("rolled back"), "{out}");
    c.assert_audit_exactly_once();
    c.assert_same_parameters(&survivors);
    assert_eq!(
        c.assert_same_expert_replicas(&survivors),
        2,
        "both experts survive"
    );
    eprintln!(
        "killed at step {}, generation {} -> {}; finished at step {}",
        before.step, before.generation, after.generation, after.step
    );
}

/// `contrail local` supervises its coordinator process: SIGKILLed mid-epoch, it is started
/// again, takes the job over from its journal (under `checkpoint.url`) while the workers keep
/// training, and the job finishes with every sample of every epoch trained exactly once.
#[test]
fn contrail_local_starts_a_killed_coordinator_again() {
    let dir = temp_dir("local-restart");
    let job = write_job(&dir, SAMPLES, EPOCHS, "");
    write_synth(&dir, SAMPLES);
    let audit = format!("audit.url=file://{}", dir.join("audit").display());
    let (lines, mut child) = spawn_local(
        &dir,
        &job,
        &[
            "--set",
            "train.global_batch=48",
            "--set",
            &audit,
            "--set",
            "audit.flush_every_steps=1",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    let http = status_address(&lines, deadline);
    let mut seen = Vec::new();
    let before = loop {
        assert!(Instant::now() < deadline, "training never started");
        if let Some(s) = status(&http).filter(|s| s.step >= 5) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let coordinator = child_pids(child.0.id())
        .into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("coordinator"))
        })
        .expect("a coordinator child process");
    // SAFETY: kill(2) on a child of the process this test owns, still running.
    assert_eq!(
        unsafe { libc::kill(coordinator as libc::pid_t, libc::SIGKILL) },
        0
    );
    let code = loop {
        assert!(
            Instant::now() < deadline,
            "the job did not finish: {seen:#?}"
        );
        while let Ok(line) = lines.try_recv() {
            seen.push(line);
        }
        if let Some(code) = child.0.try_wait().unwrap() {
            break code;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    while let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
        seen.push(line);
    }
    let out = seen.join("\n");
    assert!(code.success(), "contrail local exited with {code}:\n{out}");
    assert!(out.contains("starting it again (1 of 3)"), "{out}");
    assert!(
        out.contains("job finished"),
        "the restarted coordinator's final status:\n{out}"
    );
    assert_audit_exactly_once(&dir, || out.clone());
    eprintln!("coordinator killed at step {}", before.step);
    let _ = std::fs::remove_dir_all(&dir);
}
