//! Where a worker computes and how it talks to its peers: the device (`cluster.device`), the
//! collective backend (`cluster.backend`) and the compute settings (`train.precision`,
//! `train.channels_last`), decided from the config and what libtorch sees.

use crate::dist::nccl::NO_GPU_MESSAGE;
use crate::dist::regroup::Transport;
use crate::nn::compute::{use_bf16_for_cuda_autocast, use_fp16_for_cuda_autocast, Compute};
use anyhow::{bail, Result};
use contrail_common::config::{Backend, DeviceSetting, Precision};
use contrail_common::JobConfig;
use std::time::Duration;
use tch::Device;

/// The device `cluster.device` names for a rank that its node worker gave `gpu` (its
/// local rank's claimed GPU; None without GPUs), given `gpus` visible CUDA devices. `auto`
/// and `cuda` are that GPU (`auto` falls back to the CPU); `cuda:N` is GPU N for every rank,
/// as told.
pub fn choose_device(setting: DeviceSetting, gpu: Option<usize>, gpus: usize) -> Result<Device> {
    let given = gpu.filter(|g| *g < gpus);
    match setting {
        DeviceSetting::Auto => Ok(given.map_or(Device::Cpu, Device::Cuda)),
        DeviceSetting::Cpu => Ok(Device::Cpu),
        DeviceSetting::Gpu => given.map(Device::Cuda).ok_or_else(|| {
            anyhow::anyhow!(
                "cluster.device = \"cuda\" but this rank has no GPU: libtorch sees {gpus} and \
                 its node worker gave it none"
            )
        }),
        DeviceSetting::Cuda(_) if gpus == 0 => {
            bail!("cluster.device = \"{setting}\" but libtorch sees no CUDA GPU on this machine")
        }
        DeviceSetting::Cuda(i) if i as usize >= gpus => {
            bail!("cluster.device = \"{setting}\" but this machine has only {gpus} GPU(s)")
        }
        DeviceSetting::Cuda(i) => Ok(Device::Cuda(i as usize)),
    }
}

/// Whether the job runs on NCCL: `"auto"` means NCCL when the worker's device is a GPU.
pub fn use_nccl(backend: Backend, device: Device) -> Result<bool> {
    match (backend, device) {
        (Backend::Nccl, Device::Cuda(_)) => Ok(true),
        (Backend::Nccl, _) => bail!("{NO_GPU_MESSAGE} (cluster.device chose the CPU)"),
        (Backend::Auto, Device::Cuda(_)) => Ok(true),
        _ => Ok(false),
    }
}

/// Autocast (bf16 or fp16) and channels-last as `train.*` ask, for `device`; on a GPU also
/// sets TF32 and cuDNN autotuning (`train.tf32`, `train.cudnn_benchmark`) for the process.
pub fn choose_compute(cfg: &JobConfig, device: Device) -> Result<Compute> {
    let gpu = device.is_cuda();
    let autocast = match (cfg.train.precision, gpu) {
        (Precision::Fp32, _) | (Precision::Auto, false) => false,
        (Precision::Bf16, true) | (Precision::Auto, true) => {
            use_bf16_for_cuda_autocast();
            true
        }
        (Precision::Fp16, true) => {
            use_fp16_for_cuda_autocast();
            true
        }
        (p @ (Precision::Bf16 | Precision::Fp16), false) => bail!(
            "train.precision = \"{}\" needs a CUDA device (autocast runs on GPUs); this \
             worker computes on the CPU: use \"auto\" or \"fp32\"",
            p.as_str()
        ),
    };
    // TF32 and cuDNN autotuning as `train.tf32` / `train.cudnn_benchmark` ask (process-wide;
    // nothing on the CPU).
    crate::nn::compute::apply_gpu_math_settings(
        device,
        crate::nn::compute::GpuMath::from_train(&cfg.train),
    );
    Ok(Compute {
        autocast,
        channels_last: gpu && cfg.train.channels_last,
    })
}

/// What the worker's collective runs on above its TCP mesh. The TCP mesh is always connected
/// first (it is the bootstrap: NCCL's unique id travels over it from rank 0, so no extra
/// coordinator round is needed); with NCCL it then only serves to form generations.
pub fn transport(nccl: bool, device: Device, timeout: Duration) -> Result<Transport> {
    Ok(match (nccl, device) {
        (false, Device::Cuda(_)) => Transport::HostStaged,
        (false, _) => Transport::Tcp,
        (true, Device::Cuda(index)) => Transport::Nccl {
            device: index,
            timeout,
        },
        (true, _) => bail!("{NO_GPU_MESSAGE}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_follow_the_setting() {
        let choose = |s: &str, gpu, gpus| choose_device(s.parse().unwrap(), gpu, gpus);
        assert_eq!(choose("auto", None, 0).unwrap(), Device::Cpu);
        assert_eq!(choose("auto", Some(1), 2).unwrap(), Device::Cuda(1));
        assert_eq!(choose("cpu", Some(0), 8).unwrap(), Device::Cpu);
        assert_eq!(choose("cuda:1", Some(0), 2).unwrap(), Device::Cuda(1));
        let e = choose("cuda:0", None, 0).unwrap_err().to_string();
        assert!(e.contains("no CUDA GPU"), "{e}");
        // "cuda": the node worker's GPU for this rank, never the CPU.
        assert_eq!(choose("cuda", Some(3), 8).unwrap(), Device::Cuda(3));
        let e = choose("cuda", None, 0).unwrap_err().to_string();
        assert!(e.contains("has no GPU"), "{e}");
        let e = choose("cuda:4", Some(0), 2).unwrap_err().to_string();
        assert!(e.contains("only 2 GPU"), "{e}");
        // A name outside the choices never reaches the worker: the job file is refused.
        let e = "gpu".parse::<DeviceSetting>().unwrap_err();
        assert!(e.contains("cuda:N"), "{e}");
    }

    #[test]
    fn nccl_only_on_gpus() {
        assert!(use_nccl(Backend::Auto, Device::Cuda(0)).unwrap());
        assert!(!use_nccl(Backend::Auto, Device::Cpu).unwrap());
        assert!(!use_nccl(Backend::Tcp, Device::Cuda(0)).unwrap());
        let e = use_nccl(Backend::Nccl, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs a CUDA GPU"), "{e}");
    }

    #[test]
    fn precision_auto_is_fp32_on_the_cpu_and_bf16_and_fp16_are_refused_there() {
        let mut cfg = JobConfig::default();
        let c = choose_compute(&cfg, Device::Cpu).unwrap();
        assert_eq!(c, Compute::default());
        cfg.train.precision = Precision::Bf16;
        let e = choose_compute(&cfg, Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("needs a CUDA device"), "{e}");
        cfg.train.precision = Precision::Fp16;
        let e = choose_compute(&cfg, Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("\"fp16\" needs a CUDA device"), "{e}");
        cfg.train.precision = Precision::Fp32;
        let c = choose_compute(&cfg, Device::Cuda(0)).unwrap();
        assert!(!c.autocast && c.channels_last);
    }
}
