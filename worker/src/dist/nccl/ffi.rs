//! The C ABI, from `nccl.h` 2.28 and `driver_types.h` 13 as shipped in the PyTorch wheels.

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
/// `cudaStreamNonBlocking`: the stream does not synchronise with the legacy default stream.
pub const CUDA_STREAM_NON_BLOCKING: c_uint = 0x01;

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
pub type Reduce =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
pub type AllGather =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> c_int;
pub type Broadcast =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
pub type Send = unsafe extern "C" fn(*const c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
pub type Recv = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
pub type Group = unsafe extern "C" fn() -> c_int;

pub type CudaGetInt = unsafe extern "C" fn(*mut c_int) -> c_int;
pub type CudaSetDevice = unsafe extern "C" fn(c_int) -> c_int;
pub type CudaEventCreateWithFlags = unsafe extern "C" fn(*mut Event, c_uint) -> c_int;
pub type CudaEventRecord = unsafe extern "C" fn(Event, Stream) -> c_int;
pub type CudaEventOp = unsafe extern "C" fn(Event) -> c_int;
pub type CudaStreamCreateWithFlags = unsafe extern "C" fn(*mut Stream, c_uint) -> c_int;
pub type CudaStreamWaitEvent = unsafe extern "C" fn(Stream, Event, c_uint) -> c_int;
pub type CudaStreamDestroy = unsafe extern "C" fn(Stream) -> c_int;
pub type CudaGetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

/// NCCL's element types, for sums (`ncclDataType_t`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    Int8 = 0,
    Uint8 = 1,
    Int32 = 2,
    Int64 = 4,
    Float16 = 6,
    Float32 = 7,
    Float64 = 8,
    Bfloat16 = 9,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::ffi::c_int;

    use super::super::ffi;
    use super::super::library::result_name;
    use super::super::wheel::read_header;
    use super::super::NCCL_UNIQUE_ID_BYTES;
    use super::*;

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
}
