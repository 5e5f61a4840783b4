//! A rank's place on its node: the node worker (`contrail worker --local-ranks N`) that
//! started it, its local rank, and the GPU the node worker gave it.
//!
//! A node worker claims its GPUs before it starts its ranks: one advisory lock file per GPU
//! in a folder every process of the machine shares, held for the node worker's life. So two
//! node workers started by hand on one machine never pick the same GPU (the second takes the
//! next free ones, or fails saying which are taken), unless told which GPUs to use.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// This rank's place on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRank {
    /// The node worker's identity (`host/hex`), the same for all its ranks.
    pub node: String,
    pub local_rank: u32,
    /// Ranks the node worker runs.
    pub local_ranks: u32,
    /// The GPU the node worker gave this rank; None on a machine without one.
    pub gpu: Option<usize>,
}

impl NodeRank {
    /// A fresh node identity: this machine's host name and a random suffix, so a node worker
    /// started again on the same machine (a replacement) is a new node.
    pub fn new_node_id() -> Result<String> {
        let suffix: [u8; 4] =
            contrail_common::auth::random_bytes().context("drawing the node's identity")?;
        let hex: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
        Ok(format!("{}/{hex}", host_name()))
    }
}

/// This machine's host name (`HOSTNAME`, else /etc/hostname).
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The GPUs a node worker's ranks use, local rank i on `gpus[i]`; empty without GPUs. The
/// claimed ones stay locked while this lives.
#[derive(Debug)]
pub struct GpuClaim {
    pub gpus: Vec<usize>,
    _locks: Vec<File>,
}

/// Where GPU lock files live: `CONTRAIL_GPU_LOCK_DIR`, else `contrail-gpu-locks` in the
/// temporary folder (each Kubernetes pod has its own, and its own GPUs).
pub fn gpu_lock_dir() -> PathBuf {
    std::env::var_os("CONTRAIL_GPU_LOCK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("contrail-gpu-locks"))
}

impl GpuClaim {
    /// The first `ranks` GPUs of the `visible` ones that no other node worker on this machine
    /// holds, locked in `lock_dir`. No GPUs: an empty claim (the ranks run on the CPU).
    pub fn claim_free(visible: usize, ranks: usize, lock_dir: &Path) -> Result<Self> {
        if visible == 0 {
            return Ok(Self::none());
        }
        std::fs::create_dir_all(lock_dir)
            .with_context(|| format!("creating the GPU lock folder {}", lock_dir.display()))?;
        let mut gpus = Vec::new();
        let mut locks = Vec::new();
        let mut held = Vec::new();
        for gpu in 0..visible {
            if gpus.len() == ranks {
                break;
            }
            let path = lock_dir.join(format!("gpu-{gpu}.lock"));
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening the GPU lock {}", path.display()))?;
            match file.try_lock() {
                Ok(()) => {
                    // Who holds it, for the error another node worker prints.
                    file.set_len(0)?;
                    writeln!(file, "pid {}", std::process::id())?;
                    gpus.push(gpu);
                    locks.push(file);
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    let owner = std::fs::read_to_string(&path).unwrap_or_default();
                    held.push(format!("{gpu} ({})", owner.trim()));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("locking {}", path.display()))
                }
            }
        }
        if gpus.len() < ranks {
            bail!(
                "this node worker needs {ranks} GPU(s) but only {} of the {visible} visible are \
                 free: GPU {} held by another node worker on this machine (locks in {}); run \
                 fewer ranks (--local-ranks), or choose GPUs with --gpus to share them",
                gpus.len(),
                held.join(", "),
                lock_dir.display()
            );
        }
        Ok(Self {
            gpus,
            _locks: locks,
        })
    }

    /// The GPUs the user named (`--gpus`): one per rank, or one for all; used as told,
    /// shared with whoever else uses them.
    pub fn told(list: &[usize], ranks: usize, visible: usize) -> Result<Self> {
        if let Some(bad) = list.iter().find(|g| **g >= visible) {
            bail!("--gpus names GPU {bad}, but this machine has {visible} visible GPU(s)");
        }
        let gpus = match list.len() {
            1 => vec![list[0]; ranks],
            n if n == ranks => list.to_vec(),
            n => bail!("--gpus names {n} GPU(s) for {ranks} local rank(s): name one per rank, or one for all"),
        };
        Ok(Self {
            gpus,
            _locks: Vec::new(),
        })
    }

    /// No GPU: the ranks run on the CPU.
    pub fn none() -> Self {
        Self {
            gpus: Vec::new(),
            _locks: Vec::new(),
        }
    }

    /// The GPU of local rank `local_rank`, if any.
    pub fn gpu(&self, local_rank: usize) -> Option<usize> {
        self.gpus.get(local_rank).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::device::choose_device;
    use contrail_common::config::DeviceSetting;
    use tch::Device;

    fn lock_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("contrail-gpu-claim-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_lone_node_worker_puts_local_rank_i_on_gpu_i() {
        let dir = lock_dir("lone");
        let claim = GpuClaim::claim_free(8, 8, &dir).unwrap();
        for i in 0..8 {
            let device = choose_device(DeviceSetting::Auto, claim.gpu(i), 8).unwrap();
            assert_eq!(device, Device::Cuda(i));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn two_node_workers_on_one_machine_never_share_a_gpu_unless_told() {
        let dir = lock_dir("two");
        let first = GpuClaim::claim_free(8, 4, &dir).unwrap();
        let second = GpuClaim::claim_free(8, 4, &dir).unwrap();
        assert_eq!(first.gpus, vec![0, 1, 2, 3]);
        assert_eq!(second.gpus, vec![4, 5, 6, 7]);
        // A third finds none free and says which are held, by whom.
        let e = GpuClaim::claim_free(8, 1, &dir).unwrap_err().to_string();
        assert!(e.contains("only 0 of the 8 visible are free"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        // A released claim frees its GPUs.
        drop(first);
        assert_eq!(GpuClaim::claim_free(8, 2, &dir).unwrap().gpus, vec![0, 1]);
        // Told: shared on purpose.
        assert_eq!(GpuClaim::told(&[5], 2, 8).unwrap().gpus, vec![5, 5]);
        assert_eq!(GpuClaim::told(&[6, 7], 2, 8).unwrap().gpus, vec![6, 7]);
        let e = GpuClaim::told(&[1, 2, 3], 2, 8).unwrap_err().to_string();
        assert!(e.contains("3 GPU(s) for 2 local rank(s)"), "{e}");
        let e = GpuClaim::told(&[9], 1, 8).unwrap_err().to_string();
        assert!(e.contains("8 visible"), "{e}");
        drop(second);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_gpus_every_rank_computes_on_the_cpu() {
        let claim = GpuClaim::claim_free(0, 4, &lock_dir("none")).unwrap();
        assert!(claim.gpus.is_empty());
        assert_eq!(
            choose_device(DeviceSetting::Auto, claim.gpu(3), 0).unwrap(),
            Device::Cpu
        );
    }
}
