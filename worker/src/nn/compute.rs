//! How the model computes on a GPU: bf16 autocast and channels-last layout.
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

use tch::{nn, Kind, Tensor};

/// `c10::DeviceType::CUDA`.
const DEVICE_TYPE_CUDA: i8 = 1;
/// `c10::ScalarType::BFloat16`.
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

/// Whether CUDA autocast currently casts to bf16.
pub fn cuda_autocast_is_bf16() -> bool {
    // SAFETY: a getter of a global in libtorch.
    unsafe { at_autocast_get_autocast_dtype(DEVICE_TYPE_CUDA) == SCALAR_TYPE_BFLOAT16 }
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
    /// Forward (and so backward) under CUDA autocast with bf16.
    pub bf16: bool,
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
        if self.bf16 {
            cuda_autocast(|| f(&xs)).to_kind(Kind::Float)
        } else {
            f(&xs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

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

    #[test]
    fn autocast_dtype_can_be_set_to_bf16() {
        use_bf16_for_cuda_autocast();
        assert!(cuda_autocast_is_bf16());
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
