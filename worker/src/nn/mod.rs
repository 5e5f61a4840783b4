//! Building blocks below every model, MoE layer and objective: how tensors compute on a GPU
//! ([`compute`]), PyTorch's default initialisation, row normalisation, and the ring buffer that
//! MoCo's and SwAV's queues write into. Nothing here knows a model or a loss.

pub mod compute;

use tch::nn::Init;
use tch::{Kind, Tensor};

pub use compute::Compute;

/// PyTorch's default `nn.Linear`/`nn.Conv2d` init (kaiming-uniform with a = sqrt(5)), which
/// reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in)); tch's own default uses a ReLU gain instead.
pub fn torch_default_uniform(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// Row-wise L2 normalisation as `torch.nn.functional.normalize` (norm clamped at 1e-12, so a
/// zero row stays zero instead of becoming NaN).
pub fn l2_normalize(z: &Tensor) -> Tensor {
    let norm = z.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
    z / norm
}

/// Writes the rows of `rows` (n × d) into the ring buffer `bank` (size × d) starting at row
/// `next`, wrapping at the end; of more rows than the buffer holds only the last ones are
/// kept. Returns how many rows were written. Used by SwAV's and MoCo's queues.
pub fn write_ring(bank: &Tensor, next: i64, rows: &Tensor) -> i64 {
    let size = bank.size()[0];
    let n = rows.size()[0];
    let take = n.min(size);
    let rows = rows
        .narrow(0, n - take, take)
        .detach()
        .to_kind(Kind::Float)
        .to_device(bank.device());
    // At most two contiguous pieces: up to the end of the buffer, then from its start.
    let first = take.min(size - next);
    tch::no_grad(|| {
        bank.narrow(0, next, first).copy_(&rows.narrow(0, 0, first));
        bank.narrow(0, 0, take - first)
            .copy_(&rows.narrow(0, first, take - first));
    });
    take
}
