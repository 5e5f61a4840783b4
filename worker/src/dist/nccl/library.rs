//! The libnccl and CUDA runtime that libtorch loaded: finding them, checking the version, and
//! what the rest of the process asks about them (is NCCL usable, which copy, a unique id).

use std::ffi::{c_int, c_void, CStr};
use std::path::PathBuf;
use std::ptr::null_mut;
use std::sync::OnceLock;

use anyhow::{anyhow, bail};

use super::{ffi, NCCL_UNIQUE_ID_BYTES, NO_GPU_MESSAGE};

/// Oldest NCCL whose non-blocking communicators and config layout this module relies on.
const MIN_NCCL_VERSION: c_int = 21800;
/// Entry points of the libnccl and libcudart that libtorch loaded.
pub(super) struct Lib {
    pub(super) nccl_path: PathBuf,
    pub(super) cudart_path: PathBuf,
    pub(super) version: c_int,
    pub(super) get_unique_id: ffi::GetUniqueId,
    pub(super) comm_init_rank_config: ffi::CommInitRankConfig,
    pub(super) comm_get_async_error: ffi::CommGetAsyncError,
    pub(super) comm_abort: ffi::CommOp,
    pub(super) comm_finalize: ffi::CommOp,
    pub(super) comm_destroy: ffi::CommOp,
    pub(super) get_error_string: ffi::GetErrorString,
    pub(super) get_last_error: ffi::GetLastError,
    pub(super) all_reduce: ffi::Reduce,
    pub(super) reduce_scatter: ffi::Reduce,
    pub(super) all_gather: ffi::AllGather,
    pub(super) broadcast: ffi::Broadcast,
    pub(super) send: ffi::Send,
    pub(super) recv: ffi::Recv,
    pub(super) group_start: ffi::Group,
    pub(super) group_end: ffi::Group,
    pub(super) cuda_get_device_count: ffi::CudaGetInt,
    pub(super) cuda_get_device: ffi::CudaGetInt,
    pub(super) cuda_set_device: ffi::CudaSetDevice,
    pub(super) cuda_event_create_with_flags: ffi::CudaEventCreateWithFlags,
    pub(super) cuda_event_record: ffi::CudaEventRecord,
    pub(super) cuda_event_query: ffi::CudaEventOp,
    pub(super) cuda_event_destroy: ffi::CudaEventOp,
    pub(super) cuda_stream_create_with_flags: ffi::CudaStreamCreateWithFlags,
    pub(super) cuda_stream_wait_event: ffi::CudaStreamWaitEvent,
    pub(super) cuda_stream_destroy: ffi::CudaStreamDestroy,
    pub(super) cuda_get_error_string: ffi::CudaGetErrorString,
}

/// The process-wide libraries, resolved once.
pub(super) fn lib() -> std::result::Result<&'static Lib, String> {
    static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(Lib::load).as_ref().map_err(Clone::clone)
}

/// The last `dlerror()` text of this thread.
pub(super) fn dl_error() -> String {
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
pub(super) fn open_loaded(names: &[&str]) -> std::result::Result<*mut c_void, String> {
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
pub(super) unsafe fn symbol<F: Copy>(
    handle: *mut c_void,
    name: &CStr,
) -> std::result::Result<F, String> {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    let p = libc::dlsym(handle, name.as_ptr());
    if p.is_null() {
        return Err(format!("{}: {}", name.to_string_lossy(), dl_error()));
    }
    Ok(std::mem::transmute_copy::<*mut c_void, F>(&p))
}

/// The file a loaded function lives in, for messages and the library-identity test.
pub(super) fn object_path(f: *const c_void) -> PathBuf {
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
    pub(super) fn load() -> std::result::Result<Lib, String> {
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
                cuda_stream_create_with_flags: symbol(cudart, c"cudaStreamCreateWithFlags")?,
                cuda_stream_wait_event: symbol(cudart, c"cudaStreamWaitEvent")?,
                cuda_stream_destroy: symbol(cudart, c"cudaStreamDestroy")?,
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

    pub(super) fn cuda_error(&self, code: c_int) -> String {
        // SAFETY: cudaGetErrorString returns a static string for every code.
        let text = unsafe { CStr::from_ptr((self.cuda_get_error_string)(code)) };
        format!("CUDA error {code}: {}", text.to_string_lossy())
    }

    pub(super) fn cuda(&self, code: c_int, what: &str) -> std::result::Result<(), String> {
        if code == ffi::CUDA_SUCCESS {
            Ok(())
        } else {
            Err(format!("{what}: {}", self.cuda_error(code)))
        }
    }

    /// Number of CUDA devices, or why there are none.
    pub(super) fn device_count(&self) -> std::result::Result<usize, String> {
        let mut n = 0;
        // SAFETY: plain out-parameter call.
        let code = unsafe { (self.cuda_get_device_count)(&mut n) };
        self.cuda(code, "cudaGetDeviceCount")?;
        Ok(n.max(0) as usize)
    }

    /// An NCCL result code with its name, NCCL's text and the communicator's last error.
    pub(super) fn describe(&self, code: c_int, comm: ffi::Comm) -> String {
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
    pub(super) fn async_state(&self, comm: ffi::Comm) -> std::result::Result<c_int, String> {
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

pub(super) fn result_name(code: c_int) -> &'static str {
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
pub(super) fn version_string(code: c_int) -> String {
    if code >= 10000 {
        format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, code / 100 % 10, code % 100)
    }
}

/// The libraries, plus at least one visible GPU; errors say which is missing.
pub(super) fn usable_lib() -> anyhow::Result<&'static Lib> {
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

#[cfg(test)]
mod tests {
    use super::super::wheel::{read_header, site_packages};
    use super::*;

    /// The library found is the wheel's libnccl.so.2 that libtorch_cuda links, not another copy.
    #[test]
    pub(super) fn uses_the_libnccl_that_libtorch_links() {
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
    pub(super) fn version_codes_decode() {
        assert_eq!(version_string(22809), "2.28.9");
        assert_eq!(version_string(21800), "2.18.0");
        assert_eq!(version_string(2708), "2.7.8");
    }
}
