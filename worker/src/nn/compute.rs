//! How the model computes on a GPU: bf16 autocast, channels-last layout, and the cuBLAS/cuDNN
//! math settings (TF32, cuDNN autotuning).
//!
//! **bf16.** tch's `autocast` only switches CUDA autocast on and off; the dtype it casts to is
//! a global that defaults to fp16 and that tch does not expose. libtorch does:
//! `at::autocast::set_autocast_dtype(DeviceType, ScalarType)`, a plain exported C++ function of
//! libtorch_cpu. Its two arguments are `int8_t`-backed enums, so on x86-64 and aarch64 it is
//! called exactly like a C function of two `i8`, and we link to it by its mangled name (tch
//! pins PyTorch 2.11.0, so the symbol cannot change under us; a missing symbol would fail the
//! link, not the run). Inside autocast, matmuls and convolutions run in bf16 while the weights
//! stay float32 (autocast casts per op and keeps the casts in the graph, so gradients reach
//! the float32 weights); the model's outputs are cast back to float32 before any loss, and the
//! optimizer state is float32. bf16 has float32's exponent range, so no loss scaling is needed.
//!
//! **channels_last.** tch has no MemoryFormat argument, but a tensor's layout is just its
//! strides: `permute(0,2,3,1).contiguous().permute(0,3,1,2)` is the same NCHW tensor stored as
//! NHWC. Convolution weights are converted once (in place, with `set_data`), inputs on every
//! forward; cuDNN then picks its NHWC tensor-core kernels and returns NHWC outputs, which
//! BatchNorm and ReLU preserve.
//!
//! **TF32 and cuDNN autotuning** (`train.tf32`, `train.cudnn_benchmark`) are process-wide flags
//! of libtorch's `at::globalContext()`. tch 0.24 sets the cuDNN benchmark flag
//! (`tch::Cuda::cudnn_set_benchmark`) but has nothing for TF32 (nor a getter for the benchmark
//! flag), and neither has torch-sys's C API. They are plain exported C++ functions of
//! libtorch_cpu: `at::globalContext()` returns the `Context&`, and the non-virtual members
//! `Context::setAllowTF32CuBLAS(bool)` / `setAllowTF32CuDNN(bool)` take it as their first
//! argument, which on x86-64 and aarch64 is how a C function taking a pointer first is called;
//! we link to them by their mangled names, as for autocast above. These are the legacy setters
//! that Python's `torch.backends.cuda.matmul.allow_tf32` and `torch.backends.cudnn.allow_tf32`
//! call; in PyTorch 2.11 each also sets the newer per-backend precision
//! (`float32Precision(CUDA, MATMUL | CONV | RNN)`), so the legacy and new views stay consistent
//! (libtorch refuses, with an exception, a mix it cannot reconcile). Reading back goes through
//! `Context::float32Precision(backend, op)`, whose three arguments and result are `int`-backed
//! enums.

use contrail_common::config::TrainConfig;
use std::sync::Mutex;
use tch::{nn, Device, Kind, Tensor};

/// `c10::DeviceType::CUDA`.
const DEVICE_TYPE_CUDA: i8 = 1;
/// `c10::ScalarType::Half` and `BFloat16`.
const SCALAR_TYPE_HALF: i8 = 5;
const SCALAR_TYPE_BFLOAT16: i8 = 15;

extern "C" {
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_autocast_set_autocast_dtype(device_type: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn at_autocast_get_autocast_dtype(device_type: i8) -> i8;
    #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
    fn at_autocast_set_autocast_enabled(device_type: i8, enabled: bool);
    #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
    fn at_autocast_is_autocast_enabled(device_type: i8) -> bool;
    #[link_name = "_ZN2at8autocast17increment_nestingEv"]
    fn at_autocast_increment_nesting() -> i32;
    #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
    fn at_autocast_decrement_nesting() -> i32;
    #[link_name = "_ZN2at8autocast11clear_cacheEv"]
    fn at_autocast_clear_cache();
}

/// `at::Context`, only ever handled by pointer.
#[repr(C)]
struct AtContext {
    _opaque: [u8; 0],
}

/// `at::Float32Backend::CUDA`.
const FLOAT32_BACKEND_CUDA: i32 = 1;
/// `at::Float32Op::{CONV, MATMUL}`.
const FLOAT32_OP_CONV: i32 = 1;
const FLOAT32_OP_MATMUL: i32 = 3;
/// `at::Float32Precision::TF32`.
const FLOAT32_PRECISION_TF32: i32 = 2;

extern "C" {
    #[link_name = "_ZN2at13globalContextEv"]
    fn at_global_context() -> *mut AtContext;
    #[link_name = "_ZN2at7Context18setAllowTF32CuBLASEb"]
    fn at_context_set_allow_tf32_cublas(ctx: *mut AtContext, allow: bool);
    #[link_name = "_ZN2at7Context17setAllowTF32CuDNNEb"]
    fn at_context_set_allow_tf32_cudnn(ctx: *mut AtContext, allow: bool);
    #[link_name = "_ZNK2at7Context16float32PrecisionENS_14Float32BackendENS_9Float32OpE"]
    fn at_context_float32_precision(ctx: *const AtContext, backend: i32, op: i32) -> i32;
    #[link_name = "_ZNK2at7Context14benchmarkCuDNNEv"]
    fn at_context_benchmark_cudnn(ctx: *const AtContext) -> bool;
}

/// The cuBLAS/cuDNN math settings of a GPU worker (`train.tf32`, `train.cudnn_benchmark`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuMath {
    /// float32 matmuls (cuBLAS) and convolutions (cuDNN) may use TF32 tensor cores.
    pub tf32: bool,
    /// cuDNN times its convolution algorithms per input shape and keeps the fastest.
    pub cudnn_benchmark: bool,
}

impl GpuMath {
    /// What `[train]` asks for.
    pub fn from_train(train: &TrainConfig) -> Self {
        Self {
            tf32: train.tf32,
            cudnn_benchmark: train.cudnn_benchmark,
        }
    }
}

/// The flags are process-wide: setting and reading them back is one step, so that two callers
/// (two workers' set-up in one process, or tests) never see each other's half-applied state.
static GPU_MATH: Mutex<()> = Mutex::new(());

/// The settings libtorch holds now. TF32 counts as on only when both matmuls and
/// convolutions allow it.
pub fn gpu_math_settings() -> GpuMath {
    let _guard = GPU_MATH.lock().unwrap_or_else(|e| e.into_inner());
    read_gpu_math()
}

fn read_gpu_math() -> GpuMath {
    // SAFETY: getters of libtorch's global context (which lives for the whole process), with
    // valid (backend, op) pairs, for which they cannot throw.
    unsafe {
        let ctx = at_global_context();
        let tf32 = |op| {
            at_context_float32_precision(ctx, FLOAT32_BACKEND_CUDA, op) == FLOAT32_PRECISION_TF32
        };
        GpuMath {
            tf32: tf32(FLOAT32_OP_MATMUL) && tf32(FLOAT32_OP_CONV),
            cudnn_benchmark: at_context_benchmark_cudnn(ctx),
        }
    }
}

/// Applies `train.tf32` and `train.cudnn_benchmark` when `device` is a GPU: process-wide, so
/// call it once before training. Returns the settings libtorch holds afterwards, or `None`
/// (nothing changed) on the CPU, where neither applies (libtorch's CPU kernels read neither
/// flag).
pub fn apply_gpu_math_settings(device: Device, settings: GpuMath) -> Option<GpuMath> {
    let _guard = GPU_MATH.lock().unwrap_or_else(|e| e.into_inner());
    let applied = apply_gpu_math_locked(device, settings)?;
    tracing::debug!(
        "GPU math on {device:?}: TF32 {}, cuDNN benchmark {}",
        applied.tf32,
        applied.cudnn_benchmark
    );
    Some(applied)
}

/// [`apply_gpu_math_settings`] for a caller holding [`GPU_MATH`].
fn apply_gpu_math_locked(device: Device, settings: GpuMath) -> Option<GpuMath> {
    if !device.is_cuda() {
        return None;
    }
    // SAFETY: setters of plain flags of libtorch's global context (alive for the whole
    // process); they do not throw.
    unsafe {
        let ctx = at_global_context();
        at_context_set_allow_tf32_cublas(ctx, settings.tf32);
        at_context_set_allow_tf32_cudnn(ctx, settings.tf32);
    }
    tch::Cuda::cudnn_set_benchmark(settings.cudnn_benchmark);
    Some(read_gpu_math())
}

/// Runs `f` with CUDA autocast on, as `torch.autocast("cuda")` does: enable, count the
/// nesting, and on leaving the outermost region clear the cache of casted weights. tch's own
/// `autocast` calls the deprecated `at::autocast::is_enabled`, which prints a deprecation
/// warning on every call (thousands per epoch), hence this version on the current API.
fn cuda_autocast<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: thread-local autocast state of libtorch, set and restored around `f`.
    unsafe {
        let was = at_autocast_is_autocast_enabled(DEVICE_TYPE_CUDA);
        at_autocast_set_autocast_enabled(DEVICE_TYPE_CUDA, true);
        at_autocast_increment_nesting();
        let out = f();
        if at_autocast_decrement_nesting() == 0 {
            at_autocast_clear_cache();
        }
        at_autocast_set_autocast_enabled(DEVICE_TYPE_CUDA, was);
        out
    }
}

/// Runs `f` with CUDA autocast off (for computations that must stay float32, such as an MoE
/// router), restoring the previous state afterwards.
pub fn without_autocast<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: thread-local autocast state of libtorch, set and restored around `f`.
    unsafe {
        let was = at_autocast_is_autocast_enabled(DEVICE_TYPE_CUDA);
        if !was {
            return f();
        }
        at_autocast_set_autocast_enabled(DEVICE_TYPE_CUDA, false);
        let out = f();
        at_autocast_set_autocast_enabled(DEVICE_TYPE_CUDA, true);
        out
    }
}

/// Makes CUDA autocast cast to bf16 (process-wide; call before training).
pub fn use_bf16_for_cuda_autocast() {
    // SAFETY: a setter of a global in libtorch, taking two valid enum values.
    unsafe { at_autocast_set_autocast_dtype(DEVICE_TYPE_CUDA, SCALAR_TYPE_BFLOAT16) }
}

/// Makes CUDA autocast cast to fp16 (libtorch's default; process-wide). fp16 needs loss
/// scaling ([`crate::optim::LossScaled`]).
pub fn use_fp16_for_cuda_autocast() {
    // SAFETY: a setter of a global in libtorch, taking two valid enum values.
    unsafe { at_autocast_set_autocast_dtype(DEVICE_TYPE_CUDA, SCALAR_TYPE_HALF) }
}

/// Whether CUDA autocast currently casts to bf16.
pub fn cuda_autocast_is_bf16() -> bool {
    // SAFETY: a getter of a global in libtorch.
    unsafe { at_autocast_get_autocast_dtype(DEVICE_TYPE_CUDA) == SCALAR_TYPE_BFLOAT16 }
}

/// Whether CUDA autocast currently casts to fp16.
pub fn cuda_autocast_is_fp16() -> bool {
    // SAFETY: a getter of a global in libtorch.
    unsafe { at_autocast_get_autocast_dtype(DEVICE_TYPE_CUDA) == SCALAR_TYPE_HALF }
}

/// The same 4-D tensor stored channels-last (NHWC strides); other ranks are returned as is.
pub fn channels_last(t: &Tensor) -> Tensor {
    if t.dim() != 4 {
        return t.shallow_clone();
    }
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Whether a 4-D tensor has channels-last strides.
pub fn is_channels_last(t: &Tensor) -> bool {
    t.dim() == 4 && t.stride()[1] == 1 && t.size()[1] > 1
}

/// Converts every 4-D variable (convolution weights) of `vs` to channels-last, in place, so
/// parameters, their gradients and optimizer state created later all use that layout.
pub fn convert_to_channels_last(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            if v.dim() == 4 {
                let nhwc = channels_last(&v);
                v.set_data(&nhwc);
            }
        }
    });
}

/// The model's compute settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compute {
    /// Forward (and so backward) under CUDA autocast, at the dtype set process-wide
    /// ([`use_bf16_for_cuda_autocast`] or [`use_fp16_for_cuda_autocast`]).
    pub autocast: bool,
    /// Inputs converted to channels-last before the first convolution.
    pub channels_last: bool,
}

impl Compute {
    /// Runs `f` on `xs` with these settings; the result is float32.
    pub fn run(&self, xs: &Tensor, f: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
        let xs = if self.channels_last {
            channels_last(xs)
        } else {
            xs.shallow_clone()
        };
        if self.autocast {
            cuda_autocast(|| f(&xs)).to_kind(Kind::Float)
        } else {
            f(&xs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_last_keeps_values_and_changes_strides() {
        let t = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        let c = channels_last(&t);
        assert!(c.equal(&t));
        assert_eq!(c.size(), t.size());
        assert_eq!(c.stride(), vec![60, 1, 15, 3]);
        assert!(is_channels_last(&c) && !is_channels_last(&t));
    }

    #[test]
    fn var_store_weights_convert_in_place() {
        let vs = nn::VarStore::new(Device::Cpu);
        let conv = nn::conv2d(vs.root() / "c", 3, 8, 3, Default::default());
        let before = conv.ws.copy();
        convert_to_channels_last(&vs);
        assert!(is_channels_last(&vs.variables()["c.weight"]));
        assert!(conv.ws.equal(&before), "values changed");
        assert!(
            is_channels_last(&conv.ws),
            "the module's handle did not follow"
        );
    }

    /// One test for both: the dtype is process-wide and tests run on parallel threads.
    #[test]
    fn autocast_dtype_can_be_set_to_fp16_and_bf16() {
        use_fp16_for_cuda_autocast();
        assert!(cuda_autocast_is_fp16() && !cuda_autocast_is_bf16());
        use_bf16_for_cuda_autocast();
        assert!(cuda_autocast_is_bf16() && !cuda_autocast_is_fp16());
    }

    /// TF32 and cuDNN autotuning are set for a GPU (both ways, read back from libtorch) and
    /// left alone for the CPU. The flags are plain process-wide state, so this runs without a
    /// GPU too.
    #[test]
    fn gpu_math_settings_apply_to_cuda_devices_only() {
        let all = |on| GpuMath {
            tf32: on,
            cudnn_benchmark: on,
        };
        for on in [true, false, true] {
            assert_eq!(
                apply_gpu_math_settings(Device::Cuda(0), all(on)),
                Some(all(on))
            );
        }
        let mixed = GpuMath {
            tf32: false,
            cudnn_benchmark: true,
        };
        assert_eq!(apply_gpu_math_settings(Device::Cuda(1), mixed), Some(mixed));
        assert_eq!(apply_gpu_math_settings(Device::Cpu, all(true)), None);
        // Under the lock, so that no other test's GPU set-up changes the flags meanwhile.
        let _guard = GPU_MATH.lock().unwrap_or_else(|e| e.into_inner());
        let before = read_gpu_math();
        for on in [true, false] {
            assert_eq!(apply_gpu_math_locked(Device::Cpu, all(on)), None);
            assert_eq!(read_gpu_math(), before, "the CPU changed the GPU flags");
        }
    }

    #[test]
    fn gpu_math_follows_the_train_section() {
        let mut train = TrainConfig::default();
        assert_eq!(
            GpuMath::from_train(&train),
            GpuMath {
                tf32: true,
                cudnn_benchmark: true
            }
        );
        train.tf32 = false;
        assert!(!GpuMath::from_train(&train).tf32);
    }

    /// The autocast region switches CUDA autocast on inside and restores it after, nested
    /// regions included.
    #[test]
    fn autocast_region_is_scoped() {
        let enabled = || unsafe { at_autocast_is_autocast_enabled(DEVICE_TYPE_CUDA) };
        assert!(!enabled());
        let inner = cuda_autocast(|| (enabled(), cuda_autocast(enabled)));
        assert_eq!(inner, (true, true));
        assert!(!enabled());
    }
}
