//! One rank's communicator: joining it, aborting it (from any thread), poisoning the collective
//! after a failure, and finalizing it when dropped.

use std::ffi::{c_char, c_int};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use tch::{Device, Tensor};

use super::cuda::{DeviceGuard, Events};
use super::library::{usable_lib, version_string};
use super::watchdog::Backoff;
use super::{ffi, Failure, NcclCollective, State, NCCL_UNIQUE_ID_BYTES};
use crate::dist::{CollectiveError, Result};

impl NcclCollective {
    /// Joins the communicator that `unique_id` (from [`nccl_unique_id`] on rank 0) names, on
    /// CUDA device `device_index`. Every rank calls this with the same id and world size.
    /// `timeout` bounds how long this waits for all ranks to join, and how long any operation
    /// may take on the GPU.
    pub fn new(
        rank: usize,
        world_size: usize,
        unique_id: &[u8],
        device_index: usize,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        if world_size == 0 || rank >= world_size || world_size > c_int::MAX as usize {
            bail!("NCCL: rank {rank} is outside a world of {world_size}");
        }
        if unique_id.len() != NCCL_UNIQUE_ID_BYTES {
            bail!(
                "NCCL unique id has {} bytes; nccl_unique_id() makes {NCCL_UNIQUE_ID_BYTES}",
                unique_id.len()
            );
        }
        if timeout.is_zero() {
            bail!("collective timeout must be positive");
        }
        let lib = usable_lib()?;
        let count = lib.device_count().map_err(|e| anyhow!(e))?;
        if device_index >= count {
            bail!("NCCL rank {rank} wants cuda:{device_index}, but this machine has {count} CUDA device(s)");
        }
        let events = Events::new(lib, device_index).map_err(|e| anyhow!(e))?;
        let _dev = DeviceGuard::set(lib, device_index).map_err(|e| anyhow!(e))?;
        let mut id = ffi::UniqueId {
            internal: [0; NCCL_UNIQUE_ID_BYTES],
        };
        for (d, s) in id.internal.iter_mut().zip(unique_id) {
            *d = *s as c_char;
        }
        let mut config = ffi::Config::nonblocking();
        let mut comm: ffi::Comm = null_mut();
        // SAFETY: out-parameter comm, id by value, config alive for the call (NCCL copies it).
        let code = unsafe {
            (lib.comm_init_rank_config)(
                &mut comm,
                world_size as c_int,
                id,
                rank as c_int,
                &mut config,
            )
        };
        let this = NcclCollective {
            rank,
            world: world_size,
            device: device_index,
            timeout,
            lib,
            state: Mutex::new(State {
                comm,
                events,
                poisoned: None,
            }),
            abort_requested: AtomicBool::new(false),
            abort_reason: Mutex::new(String::new()),
        };
        let context = || {
            format!(
                "NCCL communicator for rank {rank} of {world_size} on cuda:{device_index} \
                 (NCCL {} from {})",
                version_string(lib.version),
                lib.nccl_path.display()
            )
        };
        if code != ffi::SUCCESS && code != ffi::IN_PROGRESS {
            let f = Failure::Nccl(format!(
                "ncclCommInitRankConfig failed: {}",
                lib.describe(code, comm)
            ));
            let e = this.fail(&mut this.lock(), f);
            return Err(anyhow::Error::new(e).context(context()));
        }
        if comm.is_null() {
            bail!(
                "{}: ncclCommInitRankConfig returned no communicator",
                context()
            );
        }
        {
            let mut st = this.lock();
            let t0 = Instant::now();
            let mut pause = Backoff::new();
            loop {
                match lib.async_state(comm) {
                    Ok(ffi::SUCCESS) => break,
                    Ok(ffi::IN_PROGRESS) if t0.elapsed() > timeout => {
                        let e = this.fail(
                            &mut st,
                            Failure::Timeout {
                                waited_ms: timeout.as_millis() as u64,
                            },
                        );
                        return Err(anyhow::Error::new(e).context(format!(
                            "{}: not every rank joined within {} ms (did all ranks get the same \
                             unique id and world size?)",
                            context(),
                            timeout.as_millis()
                        )));
                    }
                    Ok(ffi::IN_PROGRESS) => pause.pause(),
                    Ok(code) => {
                        let f = Failure::Nccl(format!("init failed: {}", lib.describe(code, comm)));
                        let e = this.fail(&mut st, f);
                        return Err(anyhow::Error::new(e).context(context()));
                    }
                    Err(reason) => {
                        let e = this.fail(&mut st, Failure::Nccl(reason));
                        return Err(anyhow::Error::new(e).context(context()));
                    }
                }
            }
        }
        tracing::info!(
            rank,
            world_size,
            device = device_index,
            nccl = %version_string(lib.version),
            path = %lib.nccl_path.display(),
            "NCCL communicator ready"
        );
        Ok(this)
    }

    /// The CUDA device this rank's tensors live on.
    pub fn device(&self) -> Device {
        Device::Cuda(self.device)
    }

    /// How long an operation may run on the GPU (and communicator setup may wait) before
    /// the communicator is aborted with `Timeout`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Aborts the communicator from any thread, e.g. when the coordinator reports a peer gone:
    /// an operation in progress notices within one poll (at most a millisecond) and fails once
    /// `ncclCommAbort` returns; every later call fails at once.
    pub fn abort(&self, reason: &str) {
        *self.abort_reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.to_string();
        self.abort_requested.store(true, Ordering::Release);
        // An operation in progress holds the lock and aborts on its next poll.
        let st = match self.state.try_lock() {
            Ok(st) => Some(st),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if let Some(mut st) = st {
            if st.poisoned.is_none() {
                self.fail(&mut st, Failure::Aborted(reason.to_string()));
            }
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// NCCL does not say which peer failed: with two ranks it can only be the other one.
    fn suspect(&self) -> (usize, String) {
        if self.world == 2 {
            (1 - self.rank, "the other NCCL rank".into())
        } else {
            (
                self.rank,
                format!(
                    "NCCL does not name the failing peer; reported by rank {} of {}",
                    self.rank, self.world
                ),
            )
        }
    }

    pub(super) fn to_error(&self, f: &Failure) -> CollectiveError {
        let (rank, addr) = self.suspect();
        match f {
            Failure::Nccl(reason) => CollectiveError::PeerFailed {
                rank,
                addr,
                reason: reason.clone(),
            },
            Failure::Timeout { waited_ms } => CollectiveError::Timeout {
                rank,
                addr,
                waited_ms: *waited_ms,
            },
            Failure::Usage(m) => CollectiveError::Usage(m.clone()),
            Failure::Aborted(reason) => CollectiveError::PeerFailed {
                rank,
                addr,
                reason: format!("communicator aborted on rank {}: {reason}", self.rank),
            },
        }
    }

    /// Aborts the communicator (which also stops its kernels on the GPU) and poisons the
    /// collective with `f`.
    pub(super) fn fail(&self, st: &mut State, f: Failure) -> CollectiveError {
        if !st.comm.is_null() {
            tracing::warn!(rank = self.rank, failure = ?f, "aborting the NCCL communicator");
            let _dev = DeviceGuard::set(self.lib, self.device);
            // SAFETY: live communicator, not used again (set to null below).
            unsafe { (self.lib.comm_abort)(st.comm) };
            st.comm = null_mut();
        }
        let e = self.to_error(&f);
        st.poisoned = Some(f);
        e
    }

    /// Takes the operation lock, refusing to start when poisoned, aborted or when NCCL has
    /// already reported an asynchronous error.
    pub(super) fn begin(&self) -> Result<MutexGuard<'_, State>> {
        let mut st = self.lock();
        if let Some(f) = &st.poisoned {
            return Err(self.to_error(f));
        }
        if let Some(f) = self.pending_failure(&st, "before the collective") {
            return Err(self.fail(&mut st, f));
        }
        Ok(st)
    }

    /// `t` on this rank's GPU: itself when already there, a copy when on the CPU (the flag).
    pub(super) fn stage(&self, t: &Tensor, what: &str) -> Result<(Tensor, bool)> {
        match t.device() {
            Device::Cuda(d) if d == self.device => Ok((t.shallow_clone(), false)),
            Device::Cpu => Ok((t.to_device(self.device()), true)),
            d => Err(CollectiveError::Usage(format!(
                "{what}: the NCCL collective of rank {} runs on cuda:{}, got a tensor on {d:?}",
                self.rank, self.device
            ))),
        }
    }
}

impl Drop for NcclCollective {
    /// Finalizes the communicator (waiting at most the timeout for the other ranks), then
    /// destroys it; aborts instead when it failed or finalizing does not finish.
    fn drop(&mut self) {
        let lib = self.lib;
        let timeout = self.timeout;
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if st.comm.is_null() {
            return;
        }
        let comm = std::mem::replace(&mut st.comm, null_mut());
        let _dev = DeviceGuard::set(lib, self.device);
        let finalized = st.poisoned.is_none() && {
            // SAFETY: live communicator with no operation in flight.
            let code = unsafe { (lib.comm_finalize)(comm) };
            let t0 = Instant::now();
            let mut pause = Backoff::new();
            let mut state = Ok(code);
            while state == Ok(ffi::IN_PROGRESS) && t0.elapsed() <= timeout {
                pause.pause();
                state = lib.async_state(comm);
            }
            state == Ok(ffi::SUCCESS)
        };
        // SAFETY: the communicator is not used after this.
        unsafe {
            if finalized {
                (lib.comm_destroy)(comm);
            } else {
                (lib.comm_abort)(comm);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::library::lib;
    use super::super::{nccl_available, nccl_unique_id, NO_GPU_MESSAGE};
    use super::*;

    #[test]
    fn without_a_gpu_the_error_says_so() {
        if tch::Cuda::device_count() > 0 {
            eprintln!("skipping: this machine has a CUDA GPU");
            return;
        }
        assert!(!nccl_available());
        let e = NcclCollective::new(0, 1, &[0; NCCL_UNIQUE_ID_BYTES], 0, Duration::from_secs(1))
            .err()
            .expect("no GPU, no communicator");
        let id_err = nccl_unique_id().expect_err("no GPU, no unique id");
        for msg in [format!("{e:#}"), format!("{id_err:#}")] {
            if lib().is_ok() {
                assert!(msg.starts_with(NO_GPU_MESSAGE), "{msg}");
            } else {
                assert!(
                    msg.contains("cluster.backend = \"nccl\" needs NCCL"),
                    "{msg}"
                );
            }
        }
        eprintln!("checked: {e:#}");
    }

    #[test]
    fn bad_arguments_are_refused_before_touching_nccl() {
        let t = Duration::from_secs(1);
        let id = [0u8; NCCL_UNIQUE_ID_BYTES];
        let msg = |r: anyhow::Result<NcclCollective>| format!("{:#}", r.err().expect("refused"));
        assert!(msg(NcclCollective::new(2, 2, &id, 0, t)).contains("outside a world of 2"));
        assert!(msg(NcclCollective::new(0, 0, &id, 0, t)).contains("outside a world of 0"));
        assert!(msg(NcclCollective::new(0, 1, &id[..5], 0, t)).contains("has 5 bytes"));
        assert!(msg(NcclCollective::new(0, 1, &id, 0, Duration::ZERO)).contains("positive"));
    }
}
