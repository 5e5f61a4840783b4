//! Multi-process tests: the parent re-runs its own test binary once per rank, filtered to a
//! child test, with the rank, world size, scenario and a rendezvous folder in the environment;
//! each child connects a real TCP collective through that folder.

use contrail_worker::dist::tcp::{TcpCollective, Topology};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const ENV_RANK: &str = "CONTRAIL_TCP_TEST_RANK";
const ENV_WORLD: &str = "CONTRAIL_TCP_TEST_WORLD";
const ENV_DIR: &str = "CONTRAIL_TCP_TEST_DIR";
const ENV_SCENARIO: &str = "CONTRAIL_TCP_TEST_SCENARIO";

// ---------------------------------------------------------------------------------------------
// Parent side.

struct Spawned {
    rank: usize,
    child: Child,
    log: PathBuf,
}

/// A fresh rendezvous folder: the same scenario may run more than once in one test process.
fn rendezvous_dir(scenario: &str) -> PathBuf {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    crate::cluster::temp_dir("tcp", &format!("{scenario}-{run}"))
}

/// Runs `world` child ranks of `scenario`, each the test `child_test` of this binary (its full
/// path in the suite, e.g. `collectives::tcp_rank_child`); returns each rank's exit code and log.
pub fn run_ranks(child_test: &str, scenario: &str, world: usize) -> Vec<(Option<i32>, String)> {
    let dir = rendezvous_dir(scenario);
    let exe = std::env::current_exe().expect("test binary path");
    let mut kids: Vec<Spawned> = (0..world)
        .map(|rank| {
            let log = dir.join(format!("rank{rank}.log"));
            let out = std::fs::File::create(&log).expect("create child log");
            let err = out.try_clone().expect("dup child log");
            let child = Command::new(&exe)
                .args(["--exact", child_test, "--nocapture", "--test-threads", "1"])
                .env(ENV_RANK, rank.to_string())
                .env(ENV_WORLD, world.to_string())
                .env(ENV_DIR, &dir)
                .env(ENV_SCENARIO, scenario)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .expect("spawn child rank");
            Spawned { rank, child, log }
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut codes = vec![None; world];
    let mut done = vec![false; world];
    while done.iter().any(|d| !d) {
        for k in kids.iter_mut() {
            if done[k.rank] {
                continue;
            }
            if let Some(status) = k.child.try_wait().expect("wait child") {
                codes[k.rank] = status.code();
                done[k.rank] = true;
            }
        }
        if Instant::now() > deadline {
            for k in kids.iter_mut().filter(|k| !done[k.rank]) {
                let _ = k.child.kill();
                let _ = k.child.wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let result = kids
        .iter()
        .map(|k| {
            (
                codes[k.rank],
                std::fs::read_to_string(&k.log).unwrap_or_default(),
            )
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

pub fn assert_all_succeeded(results: &[(Option<i32>, String)]) {
    for (rank, (code, log)) in results.iter().enumerate() {
        assert_eq!(
            *code,
            Some(0),
            "rank {rank} failed (exit {code:?}); its output:\n{log}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Child side.

/// What a child rank was started with.
pub struct ChildEnv {
    pub rank: usize,
    pub world: usize,
    pub dir: PathBuf,
    pub scenario: String,
}

/// The child's settings, or None when the harness runs the child test directly (then it
/// must do nothing).
pub fn child_env() -> Option<ChildEnv> {
    let rank = std::env::var(ENV_RANK).ok()?.parse().expect("rank");
    let world = std::env::var(ENV_WORLD)
        .expect("world")
        .parse()
        .expect("world");
    Some(ChildEnv {
        rank,
        world,
        dir: PathBuf::from(std::env::var(ENV_DIR).expect("dir")),
        scenario: std::env::var(ENV_SCENARIO).expect("scenario"),
    })
}

/// Publishes this rank's address in `dir`, waits for everyone's, and connects the full mesh.
pub fn rendezvous(dir: &Path, rank: usize, world: usize, timeout: Duration) -> TcpCollective {
    rendezvous_on(dir, rank, world, timeout, Topology::Mesh)
}

/// [`rendezvous`] connecting the pairs `topology` links.
pub fn rendezvous_on(
    dir: &Path,
    rank: usize,
    world: usize,
    timeout: Duration,
    topology: Topology,
) -> TcpCollective {
    let boot = TcpCollective::bind("127.0.0.1:0")
        .expect("bind")
        .with_generation(0xC0FFEE)
        .with_topology(topology);
    let tmp = dir.join(format!("rank{rank}.tmp"));
    std::fs::write(&tmp, boot.local_addr().expect("local addr").to_string()).expect("write addr");
    std::fs::rename(&tmp, dir.join(format!("rank{rank}.addr"))).expect("publish addr");
    let deadline = Instant::now() + Duration::from_secs(60);
    let addrs: Vec<String> = (0..world)
        .map(|r| loop {
            if let Ok(a) = std::fs::read_to_string(dir.join(format!("rank{r}.addr"))) {
                break a;
            }
            assert!(
                Instant::now() < deadline,
                "rank {r} never published its address"
            );
            std::thread::sleep(Duration::from_millis(10));
        })
        .collect();
    boot.connect(rank, addrs, timeout).expect("connect mesh")
}
