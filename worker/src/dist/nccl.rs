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
//! **Stream.** Every NCCL call and every CUDA event goes on the legacy default stream (the null
//! stream), which is where tch runs its kernels, so a collective sees the results of earlier tch
//! ops and later tch ops see its results without extra synchronisation.
//!
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

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use tch::{Device, Kind, Tensor};

use super::rows::{dim0, row_bytes, row_elems, row_offsets, with_rows};
use super::{Collective, CollectiveError, Result};

/// Length of the id every rank passes to [`NcclCollective::new`] (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// What a user who asked for the NCCL backend on a machine without a GPU reads.
pub const NO_GPU_MESSAGE: &str =
    "cluster.backend = \"nccl\" needs a CUDA GPU; this machine has none";

/// Oldest NCCL whose non-blocking communicators and config layout this module relies on.
const MIN_NCCL_VERSION: c_int = 21800;

/// The C ABI, from `nccl.h` 2.28 and `driver_types.h` 13 as shipped in the PyTorch wheels.
mod ffi {
    use std::ffi::{c_char, c_int, c_uint, c_void};

    pub type Comm = *mut c_void;
    pub type Stream = *mut c_void;
    pub type Event = *mut c_void;

    pub const SUCCESS: c_int = 0;
    pub const INVALID_ARGUMENT: c_int = 4;
    pub const INVALID_USAGE: c_int = 5;
    pub const IN_PROGRESS: c_int = 7;
    pub const SUM: c_int = 0;
    /// Bytes, for operations that only move data.
    pub const UINT8: c_int = 1;
    pub const INT64: c_int = 4;
    pub const FLOAT32: c_int = 7;

    pub const CONFIG_MAGIC: c_uint = 0xcafe_beef;
    pub const CONFIG_UNDEF_INT: c_int = c_int::MIN;
    /// `NCCL_VERSION(2, 17, 0)`: the layout of [`Config`] below. NCCL copies `size` bytes of
    /// an older config and gives every newer field its default.
    pub const CONFIG_VERSION: c_uint = 21700;

    pub const CUDA_SUCCESS: c_int = 0;
    pub const CUDA_ERROR_NOT_READY: c_int = 600;
    pub const CUDA_EVENT_DISABLE_TIMING: c_uint = 0x02;

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct UniqueId {
        pub internal: [c_char; super::NCCL_UNIQUE_ID_BYTES],
    }

    /// The first fields of `ncclConfig_t` (they have not moved since NCCL 2.17).
    #[repr(C)]
    pub struct Config {
        pub size: usize,
        pub magic: c_uint,
        pub version: c_uint,
        pub blocking: c_int,
        pub cga_cluster_size: c_int,
        pub min_ctas: c_int,
        pub max_ctas: c_int,
        pub net_name: *const c_char,
    }

    impl Config {
        pub fn nonblocking() -> Config {
            Config {
                size: std::mem::size_of::<Config>(),
                magic: CONFIG_MAGIC,
                version: CONFIG_VERSION,
                blocking: 0,
                cga_cluster_size: CONFIG_UNDEF_INT,
                min_ctas: CONFIG_UNDEF_INT,
                max_ctas: CONFIG_UNDEF_INT,
                net_name: std::ptr::null(),
            }
        }
    }

    pub type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
    pub type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
    pub type CommInitRankConfig =
        unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int, *mut Config) -> c_int;
    pub type CommGetAsyncError = unsafe extern "C" fn(Comm, *mut c_int) -> c_int;
    pub type CommOp = unsafe extern "C" fn(Comm) -> c_int;
    pub type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
    pub type GetLastError = unsafe extern "C" fn(Comm) -> *const c_char;
    /// ncclAllReduce and ncclReduceScatter: send, recv, count, type, op, comm, stream.
    pub type Reduce = unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int;
    pub type AllGather =
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> c_int;
    pub type Broadcast = unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int;
    pub type Send = unsafe extern "C" fn(*const c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
    pub type Recv = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
    pub type Group = unsafe extern "C" fn() -> c_int;

    pub type CudaGetInt = unsafe extern "C" fn(*mut c_int) -> c_int;
    pub type CudaSetDevice = unsafe extern "C" fn(c_int) -> c_int;
    pub type CudaEventCreateWithFlags = unsafe extern "C" fn(*mut Event, c_uint) -> c_int;
    pub type CudaEventRecord = unsafe extern "C" fn(Event, Stream) -> c_int;
    pub type CudaEventOp = unsafe extern "C" fn(Event) -> c_int;
    pub type CudaGetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
}

/// NCCL's element types, for sums (`ncclDataType_t`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataType {
    Int8 = 0,
    Uint8 = 1,
    Int32 = 2,
    Int64 = 4,
    Float16 = 6,
    Float32 = 7,
    Float64 = 8,
    Bfloat16 = 9,
}

/// The NCCL type a sum over `kind` runs in; kinds NCCL cannot add are a usage error.
fn sum_data_type(kind: Kind, what: &str) -> Result<DataType> {
    Ok(match kind {
        Kind::Float => DataType::Float32,
        Kind::Double => DataType::Float64,
        Kind::Half => DataType::Float16,
        Kind::BFloat16 => DataType::Bfloat16,
        Kind::Int => DataType::Int32,
        Kind::Int64 => DataType::Int64,
        Kind::Int8 => DataType::Int8,
        Kind::Uint8 => DataType::Uint8,
        k => {
            return Err(CollectiveError::Usage(format!(
                "{what}: NCCL sums support Float, Double, Half, BFloat16, Int, Int64, Int8 and \
                 Uint8 tensors, not {k:?}"
            )))
        }
    })
}

/// Entry points of the libnccl and libcudart that libtorch loaded.
struct Lib {
    nccl_path: PathBuf,
    cudart_path: PathBuf,
    version: c_int,
    get_unique_id: ffi::GetUniqueId,
    comm_init_rank_config: ffi::CommInitRankConfig,
    comm_get_async_error: ffi::CommGetAsyncError,
    comm_abort: ffi::CommOp,
    comm_finalize: ffi::CommOp,
    comm_destroy: ffi::CommOp,
    get_error_string: ffi::GetErrorString,
    get_last_error: ffi::GetLastError,
    all_reduce: ffi::Reduce,
    reduce_scatter: ffi::Reduce,
    all_gather: ffi::AllGather,
    broadcast: ffi::Broadcast,
    send: ffi::Send,
    recv: ffi::Recv,
    group_start: ffi::Group,
    group_end: ffi::Group,
    cuda_get_device_count: ffi::CudaGetInt,
    cuda_get_device: ffi::CudaGetInt,
    cuda_set_device: ffi::CudaSetDevice,
    cuda_event_create_with_flags: ffi::CudaEventCreateWithFlags,
    cuda_event_record: ffi::CudaEventRecord,
    cuda_event_query: ffi::CudaEventOp,
    cuda_event_destroy: ffi::CudaEventOp,
    cuda_get_error_string: ffi::CudaGetErrorString,
}

/// The process-wide libraries, resolved once.
fn lib() -> std::result::Result<&'static Lib, String> {
    static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(Lib::load).as_ref().map_err(Clone::clone)
}

/// The last `dlerror()` text of this thread.
fn dl_error() -> String {
    // SAFETY: dlerror returns null or a thread-local NUL-terminated string.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown dynamic loader error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

/// A handle to the first of `names` that is already loaded; never loads anything itself.
fn open_loaded(names: &[&str]) -> std::result::Result<*mut c_void, String> {
    let mut errors = Vec::new();
    for name in names {
        let c = std::ffi::CString::new(*name).expect("library names have no NUL");
        // SAFETY: RTLD_NOLOAD only looks the name up among loaded objects.
        let h = unsafe {
            libc::dlopen(
                c.as_ptr(),
                libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NOLOAD,
            )
        };
        if !h.is_null() {
            return Ok(h);
        }
        errors.push(format!("{name}: {}", dl_error()));
    }
    Err(errors.join("; "))
}

/// Resolves `name` in `handle` as a function pointer of type `F`.
///
/// # Safety
/// `F` must be the C signature of the symbol.
unsafe fn symbol<F: Copy>(handle: *mut c_void, name: &CStr) -> std::result::Result<F, String> {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    let p = libc::dlsym(handle, name.as_ptr());
    if p.is_null() {
        return Err(format!("{}: {}", name.to_string_lossy(), dl_error()));
    }
    Ok(std::mem::transmute_copy::<*mut c_void, F>(&p))
}

/// The file a loaded function lives in, for messages and the library-identity test.
fn object_path(f: *const c_void) -> PathBuf {
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the loader's tables; dli_fname outlives the loaded object.
    if unsafe { libc::dladdr(f, &mut info) } == 0 || info.dli_fname.is_null() {
        return PathBuf::from("<unknown path>");
    }
    PathBuf::from(
        unsafe { CStr::from_ptr(info.dli_fname) }
            .to_string_lossy()
            .into_owned(),
    )
}

impl Lib {
    fn load() -> std::result::Result<Lib, String> {
        let nccl = open_loaded(&["libnccl.so.2"]).map_err(|e| {
            format!(
                "libnccl.so.2 is not loaded in this process ({e}); NCCL must be the copy that \
                 libtorch's CUDA build links, so use a CUDA build of PyTorch 2.11.0 as LIBTORCH"
            )
        })?;
        let cudart = open_loaded(&["libcudart.so.13", "libcudart.so.12"])
            .map_err(|e| format!("libtorch's CUDA runtime is not loaded in this process ({e})"))?;
        // SAFETY: every signature below is the one in nccl.h / cuda_runtime_api.h.
        unsafe {
            let get_version: ffi::GetVersion = symbol(nccl, c"ncclGetVersion")?;
            let mut version = 0;
            if get_version(&mut version) != ffi::SUCCESS {
                return Err("ncclGetVersion failed".into());
            }
            let lib = Lib {
                nccl_path: object_path(get_version as *const c_void),
                cudart_path: PathBuf::new(),
                version,
                get_unique_id: symbol(nccl, c"ncclGetUniqueId")?,
                comm_init_rank_config: symbol(nccl, c"ncclCommInitRankConfig")?,
                comm_get_async_error: symbol(nccl, c"ncclCommGetAsyncError")?,
                comm_abort: symbol(nccl, c"ncclCommAbort")?,
                comm_finalize: symbol(nccl, c"ncclCommFinalize")?,
                comm_destroy: symbol(nccl, c"ncclCommDestroy")?,
                get_error_string: symbol(nccl, c"ncclGetErrorString")?,
                get_last_error: symbol(nccl, c"ncclGetLastError")?,
                all_reduce: symbol(nccl, c"ncclAllReduce")?,
                reduce_scatter: symbol(nccl, c"ncclReduceScatter")?,
                all_gather: symbol(nccl, c"ncclAllGather")?,
                broadcast: symbol(nccl, c"ncclBroadcast")?,
                send: symbol(nccl, c"ncclSend")?,
                recv: symbol(nccl, c"ncclRecv")?,
                group_start: symbol(nccl, c"ncclGroupStart")?,
                group_end: symbol(nccl, c"ncclGroupEnd")?,
                cuda_get_device_count: symbol(cudart, c"cudaGetDeviceCount")?,
                cuda_get_device: symbol(cudart, c"cudaGetDevice")?,
                cuda_set_device: symbol(cudart, c"cudaSetDevice")?,
                cuda_event_create_with_flags: symbol(cudart, c"cudaEventCreateWithFlags")?,
                cuda_event_record: symbol(cudart, c"cudaEventRecord")?,
                cuda_event_query: symbol(cudart, c"cudaEventQuery")?,
                cuda_event_destroy: symbol(cudart, c"cudaEventDestroy")?,
                cuda_get_error_string: symbol(cudart, c"cudaGetErrorString")?,
            };
            let cudart_path = object_path(lib.cuda_get_device_count as *const c_void);
            if version < MIN_NCCL_VERSION {
                return Err(format!(
                    "{} is NCCL {}, older than the 2.18 this backend needs",
                    lib.nccl_path.display(),
                    version_string(version)
                ));
            }
            Ok(Lib { cudart_path, ..lib })
        }
    }

    fn cuda_error(&self, code: c_int) -> String {
        // SAFETY: cudaGetErrorString returns a static string for every code.
        let text = unsafe { CStr::from_ptr((self.cuda_get_error_string)(code)) };
        format!("CUDA error {code}: {}", text.to_string_lossy())
    }

    fn cuda(&self, code: c_int, what: &str) -> std::result::Result<(), String> {
        if code == ffi::CUDA_SUCCESS {
            Ok(())
        } else {
            Err(format!("{what}: {}", self.cuda_error(code)))
        }
    }

    /// Number of CUDA devices, or why there are none.
    fn device_count(&self) -> std::result::Result<usize, String> {
        let mut n = 0;
        // SAFETY: plain out-parameter call.
        let code = unsafe { (self.cuda_get_device_count)(&mut n) };
        self.cuda(code, "cudaGetDeviceCount")?;
        Ok(n.max(0) as usize)
    }

    /// An NCCL result code with its name, NCCL's text and the communicator's last error.
    fn describe(&self, code: c_int, comm: ffi::Comm) -> String {
        // SAFETY: both return static or comm-owned NUL-terminated strings (or null).
        let text = unsafe { (self.get_error_string)(code) };
        let mut s = format!("{} ({code})", result_name(code));
        if !text.is_null() {
            s += &format!(": {}", unsafe { CStr::from_ptr(text) }.to_string_lossy());
        }
        let last = unsafe { (self.get_last_error)(comm) };
        if !last.is_null() {
            let last = unsafe { CStr::from_ptr(last) }.to_string_lossy();
            if !last.trim().is_empty() {
                s += &format!("; NCCL's last error: {}", last.trim());
            }
        }
        s
    }

    /// The communicator's state: `Ok(SUCCESS | IN_PROGRESS | error code)`, or `Err` when the
    /// query itself failed.
    fn async_state(&self, comm: ffi::Comm) -> std::result::Result<c_int, String> {
        let mut state = ffi::SUCCESS;
        // SAFETY: comm is a live communicator (callers never pass an aborted one).
        let code = unsafe { (self.comm_get_async_error)(comm, &mut state) };
        if code != ffi::SUCCESS {
            return Err(format!(
                "ncclCommGetAsyncError failed: {}",
                self.describe(code, comm)
            ));
        }
        Ok(state)
    }
}

fn result_name(code: c_int) -> &'static str {
    match code {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError",
        2 => "ncclSystemError",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage",
        6 => "ncclRemoteError",
        7 => "ncclInProgress",
        _ => "unknown NCCL result",
    }
}

/// `NCCL_VERSION_CODE` as "major.minor.patch" (codes below 2.9 used a narrower encoding).
fn version_string(code: c_int) -> String {
    if code >= 10000 {
        format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, code / 100 % 10, code % 100)
    }
}

/// The libraries, plus at least one visible GPU; errors say which is missing.
fn usable_lib() -> anyhow::Result<&'static Lib> {
    let lib = lib().map_err(|e| {
        anyhow!("cluster.backend = \"nccl\" needs NCCL from libtorch's CUDA build: {e}")
    })?;
    match lib.device_count() {
        Ok(0) => bail!("{NO_GPU_MESSAGE} (the CUDA runtime sees no device)"),
        Ok(_) => Ok(lib),
        Err(e) => bail!("{NO_GPU_MESSAGE} ({e})"),
    }
}

/// Whether this process can run the NCCL backend: libtorch's libnccl and CUDA runtime are
/// loaded, NCCL is at least 2.18, and a CUDA device is visible.
pub fn nccl_available() -> bool {
    usable_lib().is_ok()
}

/// Where the NCCL in use came from, for `contrail info` and the logs.
#[derive(Clone, Debug)]
pub struct NcclLibrary {
    /// The loaded `libnccl.so.2`.
    pub path: PathBuf,
    /// The loaded CUDA runtime NCCL's events are recorded with.
    pub cudart_path: PathBuf,
    /// "major.minor.patch".
    pub version: String,
}

/// Describes the libnccl this process would use (works without a GPU).
pub fn nccl_library() -> anyhow::Result<NcclLibrary> {
    let lib = lib().map_err(|e| anyhow!("{e}"))?;
    Ok(NcclLibrary {
        path: lib.nccl_path.clone(),
        cudart_path: lib.cudart_path.clone(),
        version: version_string(lib.version),
    })
}

/// A fresh communicator id. Call it on rank 0's process: it also starts NCCL's bootstrap
/// listener there, which the other ranks dial (`NCCL_SOCKET_IFNAME` picks the interface).
pub fn nccl_unique_id() -> anyhow::Result<Vec<u8>> {
    let lib = usable_lib()?;
    let mut id = ffi::UniqueId {
        internal: [0; NCCL_UNIQUE_ID_BYTES],
    };
    // SAFETY: out-parameter of the declared size.
    let code = unsafe { (lib.get_unique_id)(&mut id) };
    if code != ffi::SUCCESS {
        bail!(
            "ncclGetUniqueId failed: {} (is a network interface up? NCCL_SOCKET_IFNAME picks one)",
            lib.describe(code, null_mut())
        );
    }
    Ok(id.internal.iter().map(|&b| b as u8).collect())
}

/// Makes `device` current on this thread and restores the previous device when dropped, so the
/// caller's CUDA state is left as it was.
struct DeviceGuard {
    lib: &'static Lib,
    previous: Option<c_int>,
    device: c_int,
}

impl DeviceGuard {
    fn set(lib: &'static Lib, device: usize) -> std::result::Result<DeviceGuard, String> {
        let device = device as c_int;
        let mut current = 0;
        // SAFETY: plain out-parameter call.
        let previous = (unsafe { (lib.cuda_get_device)(&mut current) } == ffi::CUDA_SUCCESS)
            .then_some(current);
        if previous != Some(device) {
            lib.cuda(
                unsafe { (lib.cuda_set_device)(device) },
                &format!("cudaSetDevice({device})"),
            )?;
        }
        Ok(DeviceGuard {
            lib,
            previous,
            device,
        })
    }
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        if let Some(p) = self.previous.filter(|&p| p != self.device) {
            // SAFETY: restoring a device that was current before.
            unsafe { (self.lib.cuda_set_device)(p) };
        }
    }
}

/// The two events every operation records: before the NCCL call and after it.
struct Events {
    lib: &'static Lib,
    device: usize,
    start: ffi::Event,
    done: ffi::Event,
}

impl Events {
    fn new(lib: &'static Lib, device: usize) -> std::result::Result<Events, String> {
        let _dev = DeviceGuard::set(lib, device)?;
        let mut ev = Events {
            lib,
            device,
            start: null_mut(),
            done: null_mut(),
        };
        for slot in [&mut ev.start, &mut ev.done] {
            // SAFETY: out-parameter; timing is off because only completion is asked about.
            let code =
                unsafe { (lib.cuda_event_create_with_flags)(slot, ffi::CUDA_EVENT_DISABLE_TIMING) };
            lib.cuda(code, "cudaEventCreateWithFlags")?;
        }
        Ok(ev)
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _dev = DeviceGuard::set(self.lib, self.device);
        for e in [self.start, self.done] {
            if !e.is_null() {
                // SAFETY: created by cudaEventCreateWithFlags and no longer recorded.
                unsafe { (self.lib.cuda_event_destroy)(e) };
            }
        }
    }
}

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

    fn lock(&self) -> MutexGuard<'_, State> {
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

    fn to_error(&self, f: &Failure) -> CollectiveError {
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
    fn fail(&self, st: &mut State, f: Failure) -> CollectiveError {
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
    fn begin(&self) -> Result<MutexGuard<'_, State>> {
        let mut st = self.lock();
        if let Some(f) = &st.poisoned {
            return Err(self.to_error(f));
        }
        if let Some(f) = self.pending_failure(&st, "before the collective") {
            return Err(self.fail(&mut st, f));
        }
        Ok(st)
    }

    /// An abort request or an asynchronous NCCL error, if either is pending.
    fn pending_failure(&self, st: &State, what: &str) -> Option<Failure> {
        if let Some(f) = self.abort_failure() {
            return Some(f);
        }
        match self.lib.async_state(st.comm) {
            Ok(ffi::SUCCESS | ffi::IN_PROGRESS) => None,
            Ok(code) => Some(Failure::Nccl(format!(
                "{what}: NCCL reported {}",
                self.lib.describe(code, st.comm)
            ))),
            Err(reason) => Some(Failure::Nccl(reason)),
        }
    }

    /// An NCCL call's error as a failure: argument errors are this rank's bug, the rest are
    /// reported as peer or transport failures.
    fn call_failure(&self, what: &str, code: c_int, comm: ffi::Comm) -> Failure {
        let text = format!("{what}: {}", self.lib.describe(code, comm));
        if code == ffi::INVALID_ARGUMENT || code == ffi::INVALID_USAGE {
            Failure::Usage(text)
        } else {
            Failure::Nccl(text)
        }
    }

    /// Runs one NCCL operation (`issue` makes the NCCL calls on the null stream) and waits
    /// until the GPU has finished it. Any failure aborts and poisons.
    fn run(
        &self,
        st: &mut State,
        what: &str,
        issue: impl FnOnce(&Lib, ffi::Comm) -> c_int,
    ) -> Result<()> {
        let lib = self.lib;
        let _dev = match DeviceGuard::set(lib, self.device) {
            Ok(d) => d,
            Err(e) => return Err(self.fail(st, Failure::Nccl(format!("{what}: {e}")))),
        };
        // SAFETY: event created on this device; null stream = the legacy default stream.
        let code = unsafe { (lib.cuda_event_record)(st.events.start, null_mut()) };
        if let Err(e) = lib.cuda(code, "cudaEventRecord") {
            return Err(self.fail(st, Failure::Nccl(format!("{what}: {e}"))));
        }
        match issue(lib, st.comm) {
            ffi::SUCCESS => {}
            ffi::IN_PROGRESS => self.wait_enqueued(st, what)?,
            code => {
                let f = self.call_failure(what, code, st.comm);
                return Err(self.fail(st, f));
            }
        }
        // SAFETY: as above; recorded after NCCL's kernels, so it completes after them.
        let code = unsafe { (lib.cuda_event_record)(st.events.done, null_mut()) };
        if let Err(e) = lib.cuda(code, "cudaEventRecord") {
            return Err(self.fail(st, Failure::Nccl(format!("{what}: {e}"))));
        }
        self.wait_done(st, what)
    }

    /// A non-blocking communicator returns `ncclInProgress` while it connects or enqueues;
    /// its kernels are on the stream once the state turns to success.
    fn wait_enqueued(&self, st: &mut State, what: &str) -> Result<()> {
        let t0 = Instant::now();
        let mut pause = Backoff::new();
        loop {
            if let Some(f) = self.abort_failure() {
                return Err(self.fail(st, f));
            }
            match self.lib.async_state(st.comm) {
                Ok(ffi::SUCCESS) => return Ok(()),
                Ok(ffi::IN_PROGRESS) => {}
                Ok(code) => {
                    let f = self.call_failure(what, code, st.comm);
                    return Err(self.fail(st, f));
                }
                Err(reason) => return Err(self.fail(st, Failure::Nccl(reason))),
            }
            if t0.elapsed() > self.timeout {
                tracing::warn!(
                    rank = self.rank,
                    what,
                    "NCCL did not finish enqueueing in time"
                );
                return Err(self.fail(st, self.timeout_failure()));
            }
            pause.pause();
        }
    }

    /// Polls the completion event, NCCL's asynchronous error and abort requests until the
    /// operation is done or the timeout passes.
    fn wait_done(&self, st: &mut State, what: &str) -> Result<()> {
        let lib = self.lib;
        let t0 = Instant::now();
        let mut reached: Option<Instant> = None;
        let mut pause = Backoff::new();
        loop {
            // SAFETY: recorded event of this device.
            match unsafe { (lib.cuda_event_query)(st.events.done) } {
                ffi::CUDA_SUCCESS => return Ok(()),
                ffi::CUDA_ERROR_NOT_READY => {}
                code => {
                    let f = Failure::Nccl(format!(
                        "{what}: CUDA failed while the collective ran: {}",
                        lib.cuda_error(code)
                    ));
                    return Err(self.fail(st, f));
                }
            }
            if let Some(f) = self.pending_failure(st, what) {
                return Err(self.fail(st, f));
            }
            if reached.is_none()
                && unsafe { (lib.cuda_event_query)(st.events.start) } == ffi::CUDA_SUCCESS
            {
                reached = Some(Instant::now());
            }
            if reached.unwrap_or(t0).elapsed() > self.timeout {
                if reached.is_none() {
                    tracing::warn!(
                        rank = self.rank,
                        what,
                        "the GPU did not even reach the collective within the timeout"
                    );
                } else {
                    tracing::warn!(
                        rank = self.rank,
                        what,
                        "the collective did not finish in time"
                    );
                }
                return Err(self.fail(st, self.timeout_failure()));
            }
            pause.pause();
        }
    }

    fn abort_failure(&self) -> Option<Failure> {
        self.abort_requested.load(Ordering::Acquire).then(|| {
            Failure::Aborted(
                self.abort_reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            )
        })
    }

    fn timeout_failure(&self) -> Failure {
        Failure::Timeout {
            waited_ms: self.timeout.as_millis() as u64,
        }
    }

    /// `t` on this rank's GPU: itself when already there, a copy when on the CPU (the flag).
    fn stage(&self, t: &Tensor, what: &str) -> Result<(Tensor, bool)> {
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

/// Polling pace: yield for the first rounds (short collectives finish in microseconds), then
/// sleep with doubling pauses up to a millisecond.
struct Backoff {
    rounds: u32,
    sleep: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            rounds: 0,
            sleep: Duration::from_micros(10),
        }
    }

    fn pause(&mut self) {
        if self.rounds < 64 {
            self.rounds += 1;
            std::thread::yield_now();
        } else {
            std::thread::sleep(self.sleep);
            self.sleep = (self.sleep * 2).min(Duration::from_millis(1));
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

/// `rows` rows of which the first `t.size()[0]` are `t` and the rest zeros.
fn pad_rows(t: &Tensor, rows: i64) -> Tensor {
    let n = t.size()[0];
    if n == rows {
        return t.shallow_clone();
    }
    let padded = Tensor::zeros(with_rows(t, rows), (t.kind(), t.device()));
    if n > 0 {
        padded.narrow(0, 0, n).copy_(t);
    }
    padded
}

/// Lays the `counts[p]` rows of each rank p (at `offs[p]` in `full`) out in blocks of `max`
/// rows, block p at row `p * max`, zeros elsewhere: the equal-sized chunks NCCL's
/// reduce-scatter wants.
fn pad_chunks(full: &Tensor, counts: &[i64], offs: &[i64], max: i64) -> Tensor {
    let padded = Tensor::zeros(
        with_rows(full, max * counts.len() as i64),
        (full.kind(), full.device()),
    );
    for (p, (&c, &o)) in counts.iter().zip(offs).enumerate() {
        if c > 0 {
            padded
                .narrow(0, p as i64 * max, c)
                .copy_(&full.narrow(0, o, c));
        }
    }
    padded
}

/// The inverse of padding: the first `counts[p]` rows of every `max`-row block, concatenated.
fn unpad_blocks(blocks: &Tensor, counts: &[i64], max: i64) -> Tensor {
    let parts: Vec<Tensor> = counts
        .iter()
        .enumerate()
        .map(|(p, &c)| blocks.narrow(0, p as i64 * max, c))
        .collect();
    Tensor::cat(&parts, 0)
}

/// Row counts this rank receives in an all-to-all: column `rank` of the gathered
/// `world x world` matrix of send counts (row p is what rank p sends to everyone).
fn received_counts(matrix: &[i64], world: usize, rank: usize) -> Vec<i64> {
    (0..world).map(|p| matrix[p * world + rank]).collect()
}

/// Runs `ops` between ncclGroupStart and ncclGroupEnd; the first error wins.
fn grouped(lib: &Lib, ops: impl FnOnce() -> c_int) -> c_int {
    // SAFETY: group calls take no arguments; every start is matched by an end.
    let code = unsafe { (lib.group_start)() };
    if code != ffi::SUCCESS {
        return code;
    }
    let first = ops();
    let end = unsafe { (lib.group_end)() };
    if first != ffi::SUCCESS {
        first
    } else {
        end
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        let what = "all_reduce_sum";
        let dtype = sum_data_type(tensor.kind(), what)?;
        let (staged, copied) = self.stage(tensor, what)?;
        let in_place = !copied && staged.is_contiguous();
        let work = staged.contiguous();
        let count = work.numel();
        let mut st = self.begin()?;
        if count > 0 {
            let ptr = work.data_ptr();
            self.run(&mut st, what, |lib, comm| unsafe {
                (lib.all_reduce)(ptr, ptr, count, dtype as c_int, ffi::SUM, comm, null_mut())
            })?;
        }
        drop(st);
        if !in_place {
            tensor.copy_(&work);
        }
        Ok(())
    }

    fn all_gather(&self, local: &Tensor, counts: &[i64]) -> Result<Tensor> {
        let what = "all_gather";
        let (_, total) = row_offsets(counts, self.world, what)?;
        let rows = dim0(local, what)?;
        if rows != counts[self.rank] {
            return Err(CollectiveError::Usage(format!(
                "{what}: rank {} passed {rows} rows but counts[{}] = {}",
                self.rank, self.rank, counts[self.rank]
            )));
        }
        let (staged, copied) = self.stage(local, what)?;
        let work = staged.contiguous();
        let row_bytes = row_bytes(&work);
        let max = counts.iter().copied().max().unwrap_or(0);
        let even = counts.iter().all(|&c| c == max);
        let mut st = self.begin()?;
        // Uneven counts: every rank sends `max` rows (its own padded with zeros).
        let send = pad_rows(&work, max);
        let blocks = Tensor::empty(
            with_rows(&work, max * self.world as i64),
            (work.kind(), self.device()),
        );
        let bytes = max as usize * row_bytes;
        if bytes > 0 {
            let (sp, rp) = (send.data_ptr(), blocks.data_ptr());
            self.run(&mut st, what, |lib, comm| unsafe {
                (lib.all_gather)(sp, rp, bytes, ffi::UINT8, comm, null_mut())
            })?;
        }
        drop(st);
        let out = if even {
            blocks
        } else {
            unpad_blocks(&blocks, counts, max)
        };
        debug_assert_eq!(out.size()[0], total);
        Ok(if copied {
            out.to_device(Device::Cpu)
        } else {
            out
        })
    }

    fn reduce_scatter_sum(&self, full: &Tensor, counts: &[i64]) -> Result<Tensor> {
        let what = "reduce_scatter_sum";
        let dtype = sum_data_type(full.kind(), what)?;
        let (offs, total) = row_offsets(counts, self.world, what)?;
        let rows = dim0(full, what)?;
        if rows != total {
            return Err(CollectiveError::Usage(format!(
                "{what}: tensor has {rows} rows but counts sum to {total}"
            )));
        }
        let (staged, copied) = self.stage(full, what)?;
        let work = staged.contiguous();
        let max = counts.iter().copied().max().unwrap_or(0);
        let even = counts.iter().all(|&c| c == max);
        let mut st = self.begin()?;
        let send = if even {
            work.shallow_clone()
        } else {
            pad_chunks(&work, counts, &offs, max)
        };
        let mine = Tensor::empty(with_rows(&work, max), (work.kind(), self.device()));
        let count = max as usize * row_elems(&work);
        if count > 0 {
            let (sp, rp) = (send.data_ptr(), mine.data_ptr());
            self.run(&mut st, what, |lib, comm| unsafe {
                (lib.reduce_scatter)(sp, rp, count, dtype as c_int, ffi::SUM, comm, null_mut())
            })?;
        }
        drop(st);
        let out = mine.narrow(0, 0, counts[self.rank]);
        Ok(if copied {
            out.to_device(Device::Cpu)
        } else {
            out
        })
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let what = "broadcast";
        if root >= self.world {
            return Err(CollectiveError::Usage(format!(
                "{what}: root {root} is outside a world of {}",
                self.world
            )));
        }
        let (staged, copied) = self.stage(tensor, what)?;
        let in_place = !copied && staged.is_contiguous();
        let work = staged.contiguous();
        let bytes = work.numel() * work.kind().elt_size_in_bytes();
        let mut st = self.begin()?;
        if bytes > 0 {
            let ptr = work.data_ptr();
            self.run(&mut st, what, |lib, comm| unsafe {
                (lib.broadcast)(ptr, ptr, bytes, ffi::UINT8, root as c_int, comm, null_mut())
            })?;
        }
        drop(st);
        if !in_place && self.rank != root {
            tensor.copy_(&work);
        }
        Ok(())
    }

    fn all_to_all(&self, input: &Tensor, send_counts: &[i64]) -> Result<(Tensor, Vec<i64>)> {
        self.all_to_all_rows(input, send_counts, None)
    }

    fn all_to_all_known(
        &self,
        input: &Tensor,
        send_counts: &[i64],
        recv_counts: &[i64],
    ) -> Result<Tensor> {
        Ok(self
            .all_to_all_rows(input, send_counts, Some(recv_counts))?
            .0)
    }

    fn barrier(&self) -> Result<()> {
        let mut st = self.begin()?;
        // A one-element sum completes on a rank only once every rank has entered it.
        let t = Tensor::zeros([1], (Kind::Float, self.device()));
        let ptr = t.data_ptr();
        self.run(&mut st, "barrier", |lib, comm| unsafe {
            (lib.all_reduce)(ptr, ptr, 1, ffi::FLOAT32, ffi::SUM, comm, null_mut())
        })
    }
}

impl NcclCollective {
    /// All-to-all of rows. With `known_recv` (what each peer sends this rank) the round of
    /// counts, and the device-to-host copy it needs, are skipped; NCCL cannot check that the
    /// peers really send that much, so a wrong count is undefined (the caller derives it from
    /// an earlier exchange).
    fn all_to_all_rows(
        &self,
        input: &Tensor,
        send_counts: &[i64],
        known_recv: Option<&[i64]>,
    ) -> Result<(Tensor, Vec<i64>)> {
        let what = if known_recv.is_some() {
            "all_to_all_known"
        } else {
            "all_to_all"
        };
        let (send_offs, total) = row_offsets(send_counts, self.world, what)?;
        let rows = dim0(input, what)?;
        if rows != total {
            return Err(CollectiveError::Usage(format!(
                "{what}: input has {rows} rows but send_counts sum to {total}"
            )));
        }
        let (n, r) = (self.world, self.rank);
        if let Some(known) = known_recv {
            // Checked before the communicator is entered: a bad count here is this rank's own
            // mistake, not a peer's, and must not poison the communicator.
            if known.len() != n || known[r] != send_counts[r] || known.iter().any(|&c| c < 0) {
                return Err(CollectiveError::Usage(format!(
                    "{what}: receive counts {known:?} do not fit rank {r} of {n} sending \
                     {send_counts:?}"
                )));
            }
        }
        let (staged, copied) = self.stage(input, what)?;
        let work = staged.contiguous();
        let mut st = self.begin()?;
        let recv_counts = match known_recv {
            Some(known) => known.to_vec(),
            None => {
                // Phase 1: every rank's send counts, so each knows what it receives from whom.
                let mine = Tensor::from_slice(send_counts).to_device(self.device());
                let gathered = Tensor::empty([(n * n) as i64], (Kind::Int64, self.device()));
                let (sp, rp) = (mine.data_ptr(), gathered.data_ptr());
                self.run(&mut st, "all_to_all (counts)", |lib, comm| unsafe {
                    (lib.all_gather)(sp, rp, n, ffi::INT64, comm, null_mut())
                })?;
                let matrix = Vec::<i64>::try_from(&gathered.to_device(Device::Cpu))
                    .expect("an Int64 tensor converts to Vec<i64>");
                received_counts(&matrix, n, r)
            }
        };
        let (recv_offs, recv_total) = match row_offsets(&recv_counts, n, what) {
            Ok(v) => v,
            Err(CollectiveError::Usage(m)) => {
                return Err(self.fail(&mut st, Failure::Usage(format!("peer counts: {m}"))))
            }
            Err(e) => return Err(e),
        };
        let out = Tensor::empty(with_rows(&work, recv_total), (work.kind(), self.device()));
        // Phase 2: one grouped send and receive per peer, this rank included.
        let rb = row_bytes(&work);
        let (ib, ob) = (work.data_ptr() as usize, out.data_ptr() as usize);
        let sends: Vec<(usize, usize, usize)> = (0..n)
            .map(|p| {
                (
                    p,
                    ib + send_offs[p] as usize * rb,
                    send_counts[p] as usize * rb,
                )
            })
            .filter(|s| s.2 > 0)
            .collect();
        let recvs: Vec<(usize, usize, usize)> = (0..n)
            .map(|p| {
                (
                    p,
                    ob + recv_offs[p] as usize * rb,
                    recv_counts[p] as usize * rb,
                )
            })
            .filter(|s| s.2 > 0)
            .collect();
        if !sends.is_empty() || !recvs.is_empty() {
            self.run(&mut st, what, |lib, comm| {
                grouped(lib, || {
                    for &(p, ptr, len) in &sends {
                        let code = unsafe {
                            (lib.send)(
                                ptr as *const c_void,
                                len,
                                ffi::UINT8,
                                p as c_int,
                                comm,
                                null_mut(),
                            )
                        };
                        if code != ffi::SUCCESS {
                            return code;
                        }
                    }
                    for &(p, ptr, len) in &recvs {
                        let code = unsafe {
                            (lib.recv)(
                                ptr as *mut c_void,
                                len,
                                ffi::UINT8,
                                p as c_int,
                                comm,
                                null_mut(),
                            )
                        };
                        if code != ffi::SUCCESS {
                            return code;
                        }
                    }
                    ffi::SUCCESS
                })
            })?;
        }
        drop(st);
        let out = if copied {
            out.to_device(Device::Cpu)
        } else {
            out
        };
        Ok((out, recv_counts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    /// The site-packages folder of the PyTorch that LIBTORCH (or ./libtorch) points at; the
    /// nvidia-* wheels torch depends on live next to it.
    fn site_packages() -> Option<PathBuf> {
        let libtorch = std::env::var_os("LIBTORCH")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../libtorch"));
        Some(libtorch.canonicalize().ok()?.parent()?.to_path_buf())
    }

    fn read_header(rel: &str) -> Option<String> {
        let path = site_packages()?.join(rel);
        match std::fs::read_to_string(&path) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("skipping: {} not readable ({e})", path.display());
                None
            }
        }
    }

    /// `name = value` pairs of the C enum typedef'd as `type_name`.
    fn enum_values(header: &str, type_name: &str) -> HashMap<String, i64> {
        let end = header
            .find(&format!("}} {type_name};"))
            .unwrap_or_else(|| panic!("{type_name} not in header"));
        let start = header[..end].rfind("typedef enum").expect("typedef enum") + 12;
        let body = &header[start..end];
        let body = body.trim_start().trim_start_matches('{');
        let mut out = HashMap::new();
        for item in body.split(',') {
            let item = item.split("/*").next().unwrap_or("");
            let item: String = item
                .lines()
                .filter(|l| !l.trim_start().starts_with("/*") && !l.trim_start().starts_with('*'))
                .collect::<Vec<_>>()
                .join(" ");
            if let Some((name, value)) = item.split_once('=') {
                let value = value.trim();
                let parsed = value
                    .strip_prefix("0x")
                    .map(|h| i64::from_str_radix(h, 16))
                    .unwrap_or_else(|| value.parse());
                if let Ok(v) = parsed {
                    out.insert(name.trim().to_string(), v);
                }
            }
        }
        out
    }

    /// Every ABI constant and the config layout declared in `ffi`, against the nccl.h and
    /// driver_types.h of the wheels whose libraries this module calls.
    #[test]
    fn abi_matches_the_headers_shipped_with_torch() {
        let Some(nccl) = read_header("nvidia/nccl/include/nccl.h") else {
            return;
        };
        let types = enum_values(&nccl, "ncclDataType_t");
        for (ours, name) in [
            (DataType::Int8, "ncclInt8"),
            (DataType::Uint8, "ncclUint8"),
            (DataType::Int32, "ncclInt32"),
            (DataType::Int64, "ncclInt64"),
            (DataType::Float16, "ncclFloat16"),
            (DataType::Float32, "ncclFloat32"),
            (DataType::Float64, "ncclFloat64"),
            (DataType::Bfloat16, "ncclBfloat16"),
        ] {
            assert_eq!(Some(&(ours as i64)), types.get(name), "{name}");
        }
        assert_eq!(types["ncclUint8"], ffi::UINT8 as i64);
        assert_eq!(types["ncclInt64"], ffi::INT64 as i64);
        assert_eq!(types["ncclFloat32"], ffi::FLOAT32 as i64);

        let results = enum_values(&nccl, "ncclResult_t");
        assert_eq!(results["ncclSuccess"], ffi::SUCCESS as i64);
        assert_eq!(results["ncclInvalidArgument"], ffi::INVALID_ARGUMENT as i64);
        assert_eq!(results["ncclInvalidUsage"], ffi::INVALID_USAGE as i64);
        assert_eq!(results["ncclInProgress"], ffi::IN_PROGRESS as i64);
        for (name, &v) in &results {
            if name != "ncclNumResults" {
                assert_eq!(result_name(v as c_int), name);
            }
        }
        assert_eq!(
            enum_values(&nccl, "ncclRedOp_t")["ncclSum"],
            ffi::SUM as i64
        );

        assert!(nccl.contains(&format!(
            "#define NCCL_UNIQUE_ID_BYTES {NCCL_UNIQUE_ID_BYTES}"
        )));
        assert!(nccl.contains("#define NCCL_CONFIG_UNDEF_INT INT_MIN"));
        assert!(nccl.contains(&format!("{:#x},", ffi::CONFIG_MAGIC)));
        // The config's leading fields, in order, are the ones `ffi::Config` declares.
        let end = nccl.find("} ncclConfig_t;").expect("ncclConfig_t");
        let start = nccl[..end].rfind("typedef struct").expect("config struct");
        let fields: Vec<&str> = nccl[start..end]
            .lines()
            .filter_map(|l| l.trim().strip_suffix(';'))
            .filter_map(|l| l.split_whitespace().last())
            .map(|f| f.trim_start_matches('*'))
            .collect();
        let ours = [
            "size",
            "magic",
            "version",
            "blocking",
            "cgaClusterSize",
            "minCTAs",
            "maxCTAs",
            "netName",
        ];
        assert_eq!(
            &fields[..ours.len()],
            &ours[..],
            "ncclConfig_t fields: {fields:?}"
        );
        assert_eq!(std::mem::offset_of!(ffi::Config, blocking), 16);
        assert_eq!(std::mem::offset_of!(ffi::Config, net_name), 32);
        assert_eq!(std::mem::size_of::<ffi::Config>(), 40);

        let Some(driver) = read_header("nvidia/cu13/include/driver_types.h") else {
            return;
        };
        let not_ready = driver
            .lines()
            .find_map(|l| l.trim().strip_prefix("cudaErrorNotReady"))
            .and_then(|v| {
                v.trim()
                    .trim_start_matches('=')
                    .trim()
                    .trim_end_matches(',')
                    .parse()
                    .ok()
            });
        assert_eq!(not_ready, Some(ffi::CUDA_ERROR_NOT_READY));
        assert!(driver.contains(&format!(
            "#define cudaEventDisableTiming              {:#04x}",
            ffi::CUDA_EVENT_DISABLE_TIMING
        )));
        eprintln!("checked: NCCL data types, result codes, ncclSum, id size, config layout, cudaErrorNotReady, cudaEventDisableTiming");
    }

    /// The library found is the wheel's libnccl.so.2 that libtorch_cuda links, not another copy.
    #[test]
    fn uses_the_libnccl_that_libtorch_links() {
        let Some(site) = site_packages() else {
            eprintln!("skipping: LIBTORCH not found");
            return;
        };
        if !site.join("torch/lib/libtorch_cuda.so").exists() {
            eprintln!("skipping: this libtorch has no libtorch_cuda.so (a CPU-only build)");
            assert!(nccl_library().is_err());
            return;
        }
        let info = nccl_library().expect("libtorch_cuda links libnccl.so.2, so it is loaded");
        let want = site
            .join("nvidia/nccl/lib/libnccl.so.2")
            .canonicalize()
            .unwrap();
        assert_eq!(info.path.canonicalize().unwrap(), want);
        let cudart = site.join("nvidia/cu13/lib/libcudart.so.13");
        if let Ok(cudart) = cudart.canonicalize() {
            assert_eq!(info.cudart_path.canonicalize().unwrap(), cudart);
        }
        if let Some(h) = read_header("nvidia/nccl/include/nccl.h") {
            let field = |name: &str| {
                h.lines()
                    .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            let header_version = format!(
                "{}.{}.{}",
                field("NCCL_MAJOR"),
                field("NCCL_MINOR"),
                field("NCCL_PATCH")
            );
            assert_eq!(info.version, header_version);
        }
        eprintln!(
            "checked: NCCL {} from {} with {}",
            info.version,
            info.path.display(),
            info.cudart_path.display()
        );
    }

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

    #[test]
    fn sums_cover_float_and_integer_kinds_only() {
        assert_eq!(
            sum_data_type(Kind::BFloat16, "x").unwrap(),
            DataType::Bfloat16
        );
        assert_eq!(sum_data_type(Kind::Half, "x").unwrap(), DataType::Float16);
        assert_eq!(sum_data_type(Kind::Int64, "x").unwrap(), DataType::Int64);
        assert_eq!(sum_data_type(Kind::Int, "x").unwrap(), DataType::Int32);
        for k in [Kind::Bool, Kind::Int16, Kind::ComplexFloat] {
            match sum_data_type(k, "all_reduce_sum") {
                Err(CollectiveError::Usage(m)) => {
                    assert!(
                        m.starts_with("all_reduce_sum:") && m.contains(&format!("{k:?}")),
                        "{m}"
                    )
                }
                other => panic!("{k:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn version_codes_decode() {
        assert_eq!(version_string(22809), "2.28.9");
        assert_eq!(version_string(21800), "2.18.0");
        assert_eq!(version_string(2708), "2.7.8");
    }

    /// Per-rank inputs for a simulated world: rank r's tensor has `rows[r]` rows of 3 columns.
    fn inputs(rows: &[i64], seed: i64) -> Vec<Tensor> {
        rows.iter()
            .enumerate()
            .map(|(r, &n)| {
                Tensor::arange(n * 3, (Kind::Int64, Device::Cpu)).view([n, 3]) * 100
                    + (r as i64 + 1) * seed
            })
            .collect()
    }

    /// The uneven all_gather as NCCL runs it (every rank contributes `max` padded rows, NCCL
    /// concatenates the blocks in rank order), simulated on the CPU, equals plain concatenation.
    #[test]
    fn padded_all_gather_equals_concatenation() {
        for counts in [
            vec![2i64, 0, 3],
            vec![0, 0, 1],
            vec![4, 4, 4],
            vec![0, 0, 0],
            vec![1],
        ] {
            let locals = inputs(&counts, 7);
            let max = counts.iter().copied().max().unwrap();
            let blocks = Tensor::cat(
                &locals.iter().map(|l| pad_rows(l, max)).collect::<Vec<_>>(),
                0,
            );
            assert_eq!(blocks.size(), [max * counts.len() as i64, 3]);
            let got = unpad_blocks(&blocks, &counts, max);
            assert!(got.equal(&Tensor::cat(&locals, 0)), "counts {counts:?}");
        }
    }

    /// The uneven reduce_scatter as NCCL runs it (chunk q of the elementwise sum of every rank's
    /// padded tensor goes to rank q), simulated on the CPU, gives each rank the sum of its rows.
    #[test]
    fn padded_reduce_scatter_gives_each_rank_its_rows_summed() {
        for counts in [vec![2i64, 0, 3], vec![0, 5, 0], vec![2, 2, 2], vec![3]] {
            let world = counts.len();
            let (offs, total) = row_offsets(&counts, world, "test").unwrap();
            let fulls = inputs(&vec![total; world], 13);
            let max = counts.iter().copied().max().unwrap();
            let summed_padded = fulls
                .iter()
                .map(|f| pad_chunks(f, &counts, &offs, max))
                .reduce(|a, b| a + b)
                .unwrap();
            let summed = fulls.iter().fold(
                Tensor::zeros([total, 3], (Kind::Int64, Device::Cpu)),
                |a, b| a + b,
            );
            for q in 0..world {
                let chunk = summed_padded
                    .narrow(0, q as i64 * max, max)
                    .narrow(0, 0, counts[q]);
                assert!(
                    chunk.equal(&summed.narrow(0, offs[q], counts[q])),
                    "counts {counts:?}, rank {q}"
                );
            }
        }
    }

    #[test]
    fn all_to_all_receives_the_column_of_its_rank() {
        // Row p: what rank p sends to ranks 0, 1, 2.
        let matrix = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(received_counts(&matrix, 3, 0), [1, 4, 7]);
        assert_eq!(received_counts(&matrix, 3, 2), [3, 6, 9]);
        assert_eq!(received_counts(&[5], 1, 0), [5]);
    }
}
