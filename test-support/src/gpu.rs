//! GPU tests. Each carries `#[ignore = "needs a CUDA GPU ..."]` (written out at every test:
//! `#[ignore]` takes only a literal), so a machine without a GPU
//! reports it as ignored, never as passed; on a GPU machine run the suite with
//! `--include-ignored` (scripts/gpu_carry.sh lists the commands). Run there without CUDA, a
//! GPU test fails at once instead of passing vacuously.
//!
//! [`cpu_and_cuda!`](crate::cpu_and_cuda) writes one test body for both devices: the CPU
//! test runs everywhere, the CUDA one is a GPU test.

use tch::Device;

/// The first CUDA device; panics (failing the test) where there is none.
pub fn cuda() -> Device {
    assert!(
        tch::Cuda::is_available(),
        "this GPU test was run (--include-ignored) on a machine where libtorch sees no CUDA \
         device; `contrail info` shows what it sees"
    );
    Device::Cuda(0)
}

/// `cpu_and_cuda!(fn name(device: Device) { ... })` defines the tests `name::cpu` and
/// `name::cuda` (a GPU test, ignored without `--include-ignored`) over one body.
#[macro_export]
macro_rules! cpu_and_cuda {
    ($(#[$meta:meta])* fn $name:ident($device:ident: Device) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body($device: tch::Device) $body

            #[test]
            fn cpu() {
                body(tch::Device::Cpu)
            }

            #[test]
            #[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
            fn cuda() {
                body($crate::gpu::cuda())
            }
        }
    };
}
