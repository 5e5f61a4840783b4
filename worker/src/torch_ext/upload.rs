//! Host-to-GPU copies on a copy stream of their own (one per GPU, from libtorch's stream pool),
//! so a batch's upload runs while the compute stream still runs the previous step's kernels.
//! The compute stream waits for the copy through an event before its next kernel; the host
//! does not wait.

use std::ffi::{c_char, c_int, c_void};
use std::ptr::null_mut;

use tch::{Device, Tensor};

extern "C" {
    fn contrail_upload_on_copy_stream(
        src: *const c_void,
        device_index: c_int,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// `src` (a host tensor; pinned, or the copy is synchronous) copied to `cuda:index` on that
/// GPU's copy stream. Later work on the GPU's current stream sees the copied values.
pub fn to_gpu_on_copy_stream(src: &Tensor, index: usize) -> anyhow::Result<Tensor> {
    let mut out: *mut c_void = null_mut();
    super::call("uploading a batch on the copy stream", |err, len| unsafe {
        contrail_upload_on_copy_stream(src.as_ptr().cast(), index as c_int, &mut out, err, len)
    })?;
    // SAFETY: on success the shim returns a new tensor the caller owns.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// The device index of a CUDA device (None for the CPU and other kinds).
pub fn cuda_index(device: Device) -> Option<usize> {
    match device {
        Device::Cuda(i) => Some(i),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// Runs where a GPU is present (the device check); prints why it skips elsewhere.
    #[test]
    fn an_upload_on_the_copy_stream_is_seen_by_the_compute_stream() {
        if !tch::Cuda::is_available() {
            eprintln!("skipping: no CUDA device");
            return;
        }
        let host = Tensor::arange(1 << 20, (Kind::Float, Device::Cpu)).pin_memory(Device::Cuda(0));
        for _ in 0..5 {
            let gpu = to_gpu_on_copy_stream(&host, 0).unwrap();
            assert_eq!(gpu.device(), Device::Cuda(0));
            // A kernel on the compute stream right after the copy reads the copied values.
            let sum = (&gpu * 1.0).sum(Kind::Double).double_value(&[]);
            let n = (1u64 << 20) as f64;
            assert_eq!(sum, n * (n - 1.0) / 2.0);
        }
    }
}
