//! NCCL backend of [`Collective`]: one CUDA device per rank, tensors on that device.
//!
//! **Which libnccl.** It must be the very `libnccl.so.2` that libtorch loaded: with a second
//! copy from the system, `ncclAllReduce` on a tch tensor returned `ncclInvalidArgument` on an
//! H100. libtorch_cuda names `libnccl.so.2` (and `libcudart.so.13`) as NEEDED, so both are in
//! the process before `main`; this module asks the dynamic loader for those already-loaded
//! copies (`dlopen(name, RTLD_NOLOAD)`) and never loads a library of its own. That is also why
//! it does not use cudarc: cudarc 0.19's `nccl` module loads through a private `OnceLock` over
//! a fixed list of names (`libnccl.so`, `libnccl.so.13`, `.12`, `.11`, `.10`, `.9`, `.1`, ...)
//! that can be neither extended nor pointed at a path, and `libnccl.so.2` is not on it: it
//! would pick up a system copy or panic. The dozen C functions used here are declared below
//! from the `nccl.h` that ships with the same wheel (a unit test checks the constants against
//! that header), and nothing needs CUDA at build time.
//!
//! **Stream.** Every NCCL call runs on the communicator's own non-blocking CUDA stream. Before
//! each call an event recorded on the legacy default stream (where tch runs its kernels, and
//! where the tensors the call reads were produced) makes the NCCL stream wait for them, so a
//! collective sees the results of earlier tch ops without blocking the legacy stream: kernels
//! queued there meanwhile (backward, while a gradient bucket is reduced from the
//! communication thread) run beside the NCCL kernels. The results are read only after the
//! `done` event (on the NCCL stream) has completed, so later tch ops see them.

//! **Waiting, timeouts, aborts.** The communicator is created non-blocking (`config.blocking =
//! 0`), so no NCCL call can stall the host: calls return `ncclInProgress` and the calling thread
//! polls `ncclCommGetAsyncError`. Each operation then waits for its own completion before it
//! returns, polling a CUDA event recorded after it, and meanwhile polls the communicator's
//! asynchronous error. The timeout counts from the moment the GPU reaches the collective (an
//! event recorded just before it), so compute queued ahead of it does not count; waiting for
//! the GPU to get there is bounded by the timeout as well. On an error, a timeout or an
//! [`NcclCollective::abort`] request the thread calls `ncclCommAbort`, which makes the NCCL
//! kernel quit, and the collective is poisoned: every later call fails at once with the same
//! error, like the TCP backend. This polling is the watchdog; a separate thread would only add
//! a race with the comm being freed by an abort while the caller is inside NCCL, and a
//! synchronous wait puts each error on the call that caused it (an asynchronous scheme would
//! report it one call late, after handing out garbage). The price is that the CPU waits for the
//! GPU at every collective.
//!
//! NCCL does not say which peer failed, so errors name the other rank when there are two, and
//! otherwise this rank with a note that the culprit is unknown.
//!
//! **Shapes.** Data-moving operations send bytes (`ncclUint8`), so they work for every kind;
//! sums use the tensor's NCCL type. Uneven `counts` in gathers and reduce-scatters are padded
//! to the largest count so NCCL's ring collectives still apply (memory `world * max_count`
//! rows); all-to-all is grouped `ncclSend`/`ncclRecv`, this rank's own rows included, after an
//! all-gather of the counts that `all_to_all_known` skips (no device-to-host sync). CPU
//! tensors (such as the counts in [`super::all_gather_counts`]) are staged through the GPU and
//! results come back on the CPU.
//!
//! The layers, bottom up: `ffi` (the C declarations), `library` (finding the loaded
//! libnccl and CUDA runtime, and what the rest of the process asks about them), `cuda`
//! (device and event guards), `communicator` (joining, aborting, poisoning and freeing a
//! communicator), `watchdog` (running one NCCL call and polling it to completion or
//! timeout), `padding` (uneven counts as NCCL's equal blocks) and `ops` (the
//! [`super::Collective`] operations).

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Duration;

mod communicator;
mod cuda;
mod ffi;
mod library;
mod ops;
mod padding;
mod watchdog;

pub use library::{nccl_available, nccl_library, nccl_unique_id, NcclLibrary};

use cuda::Events;
use library::Lib;

/// Length of the id every rank passes to [`NcclCollective::new`] (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// Joins a new NCCL communicator of `mesh`'s ranks on `cuda:device` (collective): rank 0
/// makes a fresh unique id and sends it over `mesh`, so every generation of a job gets its own
/// communicator.
pub fn join_over(
    mesh: &dyn super::Collective,
    device: usize,
    timeout: Duration,
) -> anyhow::Result<NcclCollective> {
    use anyhow::Context;
    use tch::{Kind, Tensor};
    let rank = mesh.rank();
    let mut id = if rank == 0 {
        Tensor::from_slice(&nccl_unique_id().context("creating the NCCL unique id")?)
    } else {
        Tensor::zeros(
            [NCCL_UNIQUE_ID_BYTES as i64],
            (Kind::Uint8, tch::Device::Cpu),
        )
    };
    mesh.broadcast(&mut id, 0)
        .context("sending the NCCL unique id from rank 0")?;
    let id: Vec<u8> = Vec::try_from(&id).context("reading the NCCL unique id")?;
    NcclCollective::new(rank, mesh.world_size(), &id, device, timeout)
        .with_context(|| format!("rank {rank}: joining the NCCL communicator on cuda:{device}"))
}

/// What a user who asked for the NCCL backend on a machine without a GPU reads.
pub const NO_GPU_MESSAGE: &str =
    "cluster.backend = \"nccl\" needs a CUDA GPU; this machine has none";

/// Why an operation failed, before the suspect rank is attached.
#[derive(Clone, Debug)]
enum Failure {
    /// NCCL or CUDA reported an error; the text says which and what NCCL knows.
    Nccl(String),
    Timeout {
        waited_ms: u64,
    },
    Usage(String),
    /// [`NcclCollective::abort`] was called.
    Aborted(String),
}

struct State {
    /// Null once aborted.
    comm: ffi::Comm,
    events: Events,
    poisoned: Option<Failure>,
}

/// The NCCL collective for one rank. Operations are serialised internally and each returns
/// once its GPU work has finished; after any failure the communicator is aborted and every
/// later call fails at once with the same error.
pub struct NcclCollective {
    rank: usize,
    world: usize,
    device: usize,
    timeout: Duration,
    lib: &'static Lib,
    state: Mutex<State>,
    abort_requested: AtomicBool,
    abort_reason: Mutex<String>,
}

// SAFETY: the raw communicator and event handles are only used under `state`'s lock (NCCL
// allows a communicator to be used from any thread, one thread at a time).
unsafe impl Send for NcclCollective {}
unsafe impl Sync for NcclCollective {}

/// Where the PyTorch wheels' headers and libraries are, for the tests that check this module
/// against them.
#[cfg(test)]
mod wheel {
    use std::path::{Path, PathBuf};

    /// The site-packages folder of the PyTorch that LIBTORCH (or ./libtorch) points at; the
    /// nvidia-* wheels torch depends on live next to it.
    pub(super) fn site_packages() -> Option<PathBuf> {
        let libtorch = std::env::var_os("LIBTORCH")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../libtorch"));
        Some(libtorch.canonicalize().ok()?.parent()?.to_path_buf())
    }

    pub(super) fn read_header(rel: &str) -> Option<String> {
        let path = site_packages()?.join(rel);
        match std::fs::read_to_string(&path) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("skipping: {} not readable ({e})", path.display());
                None
            }
        }
    }
}
