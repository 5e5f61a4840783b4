//! ResNet encoder with basic blocks (ResNet-18/34) or bottleneck blocks (ResNet-50/101/152),
//! parameter names as in torchvision.
//!
//! Names follow `torchvision.models.resnet` (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`,
//! `layer1.0.conv3.weight`, `layer2.0.downsample.0.weight`, `layer2.0.downsample.1.*`) so a
//! checkpoint's encoder loads into torchvision by dropping the other keys (projector, heads);
//! `worker/tests/torchvision_compat.rs` checks this for `resnet50`. With GroupNorm the norm
//! layers keep their `bn` names for the same reason.

use contrail_common::config::{BlockKind, NormKind, StemKind};
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// GroupNorm always uses this many groups (widths are validated to be multiples of it).
pub const GROUP_NORM_GROUPS: i64 = 8;

/// PyTorch's BatchNorm starts as the identity (weight 1, bias 0); tch's default draws the
/// weight uniformly from [0, 1), which halves every block's output scale on average and is
/// not the network torchvision, lightly or solo-learn train.
fn batch_norm_config() -> nn::BatchNormConfig {
    nn::BatchNormConfig {
        ws_init: nn::Init::Const(1.0),
        ..Default::default()
    }
}

/// A normalisation layer chosen by `model.norm`.
#[derive(Debug)]
pub enum Norm {
    Batch(nn::BatchNorm),
    Group(nn::GroupNorm),
}

impl Norm {
    /// 2-D (N, C, H, W) norm layer.
    pub fn new_2d(p: nn::Path, kind: NormKind, channels: i64) -> Self {
        match kind {
            NormKind::Batch => Norm::Batch(nn::batch_norm2d(p, channels, batch_norm_config())),
            NormKind::Group => Norm::Group(nn::group_norm(
                p,
                GROUP_NORM_GROUPS,
                channels,
                Default::default(),
            )),
        }
    }

    /// 1-D (N, C) norm layer, used in the projector.
    pub fn new_1d(p: nn::Path, kind: NormKind, channels: i64) -> Self {
        match kind {
            NormKind::Batch => Norm::Batch(nn::batch_norm1d(p, channels, batch_norm_config())),
            // GroupNorm accepts (N, C) input as well as (N, C, H, W).
            NormKind::Group => Self::new_2d(p, kind, channels),
        }
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Norm::Batch(bn) => bn.forward_t(xs, train),
            Norm::Group(gn) => nn::Module::forward(gn, xs),
        }
    }
}

/// torchvision initialises convolutions with Kaiming-normal over fan-out (ReLU gain).
fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        bias: false,
        ws_init: nn::Init::Kaiming {
            dist: nn::init::NormalOrUniform::Normal,
            fan: nn::init::FanInOut::FanOut,
            non_linearity: nn::init::NonLinearity::ReLU,
        },
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, k, cfg)
}

#[derive(Debug)]
struct BasicBlock {
    conv1: nn::Conv2D,
    bn1: Norm,
    conv2: nn::Conv2D,
    bn2: Norm,
    downsample: Option<(nn::Conv2D, Norm)>,
}

impl BasicBlock {
    fn new(p: nn::Path, norm: NormKind, c_in: i64, c_out: i64, stride: i64) -> Self {
        let downsample = (stride != 1 || c_in != c_out).then(|| {
            let d = &p / "downsample";
            (
                conv(&d / 0, c_in, c_out, 1, stride, 0),
                Norm::new_2d(&d / 1, norm, c_out),
            )
        });
        Self {
            conv1: conv(&p / "conv1", c_in, c_out, 3, stride, 1),
            bn1: Norm::new_2d(&p / "bn1", norm, c_out),
            conv2: conv(&p / "conv2", c_out, c_out, 3, 1, 1),
            bn2: Norm::new_2d(&p / "bn2", norm, c_out),
            downsample,
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let h = self.bn1.forward_t(&xs.apply(&self.conv1), train).relu();
        let h = self.bn2.forward_t(&h.apply(&self.conv2), train);
        let shortcut = match &self.downsample {
            Some((c, n)) => n.forward_t(&xs.apply(c), train),
            None => xs.shallow_clone(),
        };
        (h + shortcut).relu()
    }
}

/// torchvision's `Bottleneck` (ResNet v1.5: the stride sits on the 3×3 convolution): 1×1 down
/// to `planes`, 3×3, 1×1 up to `4 · planes`.
#[derive(Debug)]
struct Bottleneck {
    conv1: nn::Conv2D,
    bn1: Norm,
    conv2: nn::Conv2D,
    bn2: Norm,
    conv3: nn::Conv2D,
    bn3: Norm,
    downsample: Option<(nn::Conv2D, Norm)>,
}

/// Output channels of a bottleneck block per `planes`.
const BOTTLENECK_EXPANSION: i64 = 4;

impl Bottleneck {
    fn new(p: nn::Path, norm: NormKind, c_in: i64, planes: i64, stride: i64) -> Self {
        let c_out = planes * BOTTLENECK_EXPANSION;
        let downsample = (stride != 1 || c_in != c_out).then(|| {
            let d = &p / "downsample";
            (
                conv(&d / 0, c_in, c_out, 1, stride, 0),
                Norm::new_2d(&d / 1, norm, c_out),
            )
        });
        Self {
            conv1: conv(&p / "conv1", c_in, planes, 1, 1, 0),
            bn1: Norm::new_2d(&p / "bn1", norm, planes),
            conv2: conv(&p / "conv2", planes, planes, 3, stride, 1),
            bn2: Norm::new_2d(&p / "bn2", norm, planes),
            conv3: conv(&p / "conv3", planes, c_out, 1, 1, 0),
            bn3: Norm::new_2d(&p / "bn3", norm, c_out),
            downsample,
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let h = self.bn1.forward_t(&xs.apply(&self.conv1), train).relu();
        let h = self.bn2.forward_t(&h.apply(&self.conv2), train).relu();
        let h = self.bn3.forward_t(&h.apply(&self.conv3), train);
        let shortcut = match &self.downsample {
            Some((c, n)) => n.forward_t(&xs.apply(c), train),
            None => xs.shallow_clone(),
        };
        (h + shortcut).relu()
    }
}

#[derive(Debug)]
enum Block {
    Basic(Box<BasicBlock>),
    Bottleneck(Box<Bottleneck>),
}

impl Block {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Block::Basic(b) => b.forward_t(xs, train),
            Block::Bottleneck(b) => b.forward_t(xs, train),
        }
    }
}

/// ResNet trunk up to global average pooling: (N, 3, H, W) → (N, `out_dim`).
#[derive(Debug)]
pub struct ResNet {
    conv1: nn::Conv2D,
    bn1: Norm,
    stem: StemKind,
    stages: Vec<Vec<Block>>,
    out_dim: i64,
}

impl ResNet {
    /// `layers[i]` blocks in stage i; stage i has `width << i` channels (times 4 at the output
    /// of a bottleneck block) and, after the first, halves the resolution. Variables are
    /// created under `p`.
    pub fn new(
        p: &nn::Path,
        layers: &[u32],
        width: i64,
        block: BlockKind,
        norm: NormKind,
        stem: StemKind,
    ) -> Self {
        let conv1 = match stem {
            StemKind::Cifar => conv(p / "conv1", 3, width, 3, 1, 1),
            StemKind::Imagenet => conv(p / "conv1", 3, width, 7, 2, 3),
        };
        let bn1 = Norm::new_2d(p / "bn1", norm, width);
        let mut c_in = width;
        let mut stages = Vec::with_capacity(layers.len());
        for (i, &blocks) in layers.iter().enumerate() {
            let planes = width << i;
            let sp = p / format!("layer{}", i + 1);
            let stage = (0..blocks as i64)
                .map(|j| {
                    let stride = if i > 0 && j == 0 { 2 } else { 1 };
                    match block {
                        BlockKind::Basic => {
                            let b = BasicBlock::new(&sp / j, norm, c_in, planes, stride);
                            c_in = planes;
                            Block::Basic(Box::new(b))
                        }
                        BlockKind::Bottleneck => {
                            let b = Bottleneck::new(&sp / j, norm, c_in, planes, stride);
                            c_in = planes * BOTTLENECK_EXPANSION;
                            Block::Bottleneck(Box::new(b))
                        }
                    }
                })
                .collect();
            stages.push(stage);
        }
        Self {
            conv1,
            bn1,
            stem,
            stages,
            out_dim: c_in,
        }
    }

    /// Width of the pooled feature vector.
    pub fn out_dim(&self) -> i64 {
        self.out_dim
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut h = self.bn1.forward_t(&xs.apply(&self.conv1), train).relu();
        if self.stem == StemKind::Imagenet {
            h = h.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for block in self.stages.iter().flatten() {
            h = block.forward_t(&h, train);
        }
        h.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_norm_starts_as_the_identity_as_in_pytorch() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let root = vs.root();
        let _net = ResNet::new(
            &root,
            &[1, 1],
            8,
            BlockKind::Basic,
            NormKind::Batch,
            StemKind::Cifar,
        );
        let _head = Norm::new_1d(&root / "head_bn", NormKind::Batch, 4);
        let vars = vs.variables();
        let norms: Vec<_> = vars.iter().filter(|(n, _)| n.contains("bn")).collect();
        assert!(norms.len() >= 8, "{:?}", vars.keys());
        for (name, t) in norms {
            let want = if name.ends_with("weight") { 1.0 } else { 0.0 };
            if name.ends_with("weight") || name.ends_with("bias") {
                let off = (t - want).abs().max().double_value(&[]);
                assert_eq!(off, 0.0, "{name} starts at {want} ± {off}");
            }
        }
    }
}
