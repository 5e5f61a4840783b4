//! Shared by the multi-process benchmarks: the ranks meet through a folder of address files
//! and the launcher waits for them.

use anyhow::{bail, Result};
use contrail_worker::dist::tcp::TcpCollective;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

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
