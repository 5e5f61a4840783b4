//! Shared by the multi-process benchmarks: the ranks meet through a folder of address files
//! and the launcher waits for them.

use anyhow::{bail, Result};
use contrail_worker::dist::tcp::TcpCollective;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Runs this binary once per rank with its own arguments plus `--rank R --dir D` (a fresh
/// rendezvous folder named after `bench`), and waits for them all.
pub fn launch_ranks(world: usize, bench: &str) -> Result<()> {
    use anyhow::Context;
    let dir = std::env::temp_dir().join(format!("contrail-{bench}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let exe = std::env::current_exe()?;
    let passed: Vec<String> = std::env::args().skip(1).collect();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(&exe)
                .args(&passed)
                .args(["--rank", &rank.to_string(), "--dir"])
                .arg(&dir)
                .spawn()
                .with_context(|| format!("spawning rank {rank}"))
        })
        .collect::<Result<_>>()?;
    wait_ranks(children, &dir)
}

/// Waits for every rank process, removes the rendezvous `dir`, and fails naming the ranks
/// that failed.
pub fn wait_ranks(children: Vec<Child>, dir: &Path) -> Result<()> {
    let mut failed = Vec::new();
    for (rank, mut child) in children.into_iter().enumerate() {
        if !child.wait()?.success() {
            failed.push(rank);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    if !failed.is_empty() {
        bail!("ranks {failed:?} failed");
    }
    Ok(())
}

/// Publishes this rank's address in `dir`, waits for everyone's, and connects the TCP mesh
/// with `timeout` per collective.
pub fn rendezvous(
    dir: &Path,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<TcpCollective> {
    let boot = TcpCollective::bind("127.0.0.1:0")?;
    let tmp = dir.join(format!("{rank}.tmp"));
    std::fs::write(&tmp, boot.local_addr()?.to_string())?;
    std::fs::rename(&tmp, dir.join(format!("{rank}.addr")))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut addrs = Vec::with_capacity(world);
    for r in 0..world {
        loop {
            if let Ok(a) = std::fs::read_to_string(dir.join(format!("{r}.addr"))) {
                addrs.push(a);
                break;
            }
            if Instant::now() > deadline {
                bail!("rank {r} never published its address");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(boot.connect(rank, addrs, timeout)?)
}
