//! SimCLR's MLP projection head: Linear → norm → ReLU → Linear.
//!
//! Names mirror an `nn.Sequential` (`projector.0.weight`, `projector.1.*`, `projector.3.*`;
//! index 2 is the ReLU) so the head can be rebuilt in PyTorch from a checkpoint.

use super::resnet::Norm;
use contrail_common::config::NormKind;
use tch::nn;
use tch::Tensor;

/// PyTorch's `nn.Linear` default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
fn torch_linear(p: nn::Path, c_in: i64, c_out: i64, bias: bool) -> nn::Linear {
    let bound = 1.0 / (c_in as f64).sqrt();
    let init = nn::Init::Uniform {
        lo: -bound,
        up: bound,
    };
    nn::linear(
        p,
        c_in,
        c_out,
        nn::LinearConfig {
            ws_init: init,
            bs_init: Some(init),
            bias,
        },
    )
}

#[derive(Debug)]
pub struct Projector {
    fc1: nn::Linear,
    norm: Norm,
    fc2: nn::Linear,
}

impl Projector {
    pub fn new(p: &nn::Path, c_in: i64, hidden: i64, out: i64, norm: NormKind) -> Self {
        Self {
            // The norm right after removes any bias, so the first layer has none.
            fc1: torch_linear(p / 0, c_in, hidden, false),
            norm: Norm::new_1d(p / 1, norm, hidden),
            fc2: torch_linear(p / 3, hidden, out, true),
        }
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let h = self.norm.forward_t(&xs.apply(&self.fc1), train).relu();
        h.apply(&self.fc2)
    }
}
