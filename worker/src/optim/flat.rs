//! One flat buffer behind all parameters of an optimizer, so that an elementwise update (SGD,
//! AdamW) is a handful of kernels over the whole model instead of several per parameter, what
//! PyTorch's `foreach` optimizers achieve (tch has no tensor-list ops). On a GPU the per-
//! parameter form launched about 1,000 (SGD) to 2,000 (AdamW) small kernels per step.
//!
//! Each parameter becomes a view into the buffer laid out in the parameter's own memory order,
//! so channels-last convolution weights keep their strides. Gradients are separate tensors
//! (autograd allocates them; tch cannot point `.grad` at a view), so each step gathers them with
//! one `cat` of memory-order views. Optimizer state lives in flat buffers of the same layout,
//! with per-parameter views for checkpoints.
//!
//! Build the optimizer after anything that replaces parameter storage (`set_compute`'s
//! channels-last conversion); a later replacement would detach the parameter from the buffer.

use tch::{Kind, Tensor};

pub struct FlatParams {
    /// The parameters' storage.
    flat: Tensor,
    /// (offset, numel) of each parameter in the buffer.
    segments: Vec<(i64, i64)>,
    /// Each parameter's size and strides, to view other flat buffers the same way.
    layouts: Vec<(Vec<i64>, Vec<i64>)>,
}

/// `t` as a 1-D view in memory order, when its elements are dense in row-major or
/// channels-last order.
fn memory_order_view(t: &Tensor) -> Option<Tensor> {
    if t.is_contiguous() {
        return Some(t.view([-1]));
    }
    let s = t.stride();
    if t.dim() == 4 && s[1] == 1 && s[3] == t.size()[1] {
        let p = t.permute([0, 2, 3, 1]);
        if p.is_contiguous() {
            return Some(p.view([-1]));
        }
    }
    None
}

impl FlatParams {
    /// Moves every parameter into one buffer. `None` (leaving everything as it was) when the
    /// parameters differ in kind or device, are not dense, or there are none.
    pub fn new(params: &[(String, Tensor)]) -> Option<Self> {
        let first = params.first()?.1.shallow_clone();
        let (kind, device) = (first.kind(), first.device());
        if kind != Kind::Float {
            return None;
        }
        let mut views = Vec::with_capacity(params.len());
        for (_, p) in params {
            if p.kind() != kind || p.device() != device {
                return None;
            }
            views.push(memory_order_view(p)?);
        }
        let flat = tch::no_grad(|| Tensor::cat(&views, 0));
        let mut segments = Vec::with_capacity(params.len());
        let mut layouts = Vec::with_capacity(params.len());
        let mut offset = 0;
        tch::no_grad(|| {
            for (_, p) in params {
                let n = p.numel() as i64;
                let view = flat.as_strided(p.size(), p.stride(), offset);
                let mut p = p.shallow_clone();
                p.set_data(&view);
                segments.push((offset, n));
                layouts.push((view.size(), view.stride()));
                offset += n;
            }
        });
        Some(Self {
            flat,
            segments,
            layouts,
        })
    }

    /// The buffer holding every parameter.
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }

    /// A zero buffer of the same layout, for optimizer state.
    pub fn zeros(&self) -> Tensor {
        self.flat.zeros_like()
    }

    /// Parameter `i`'s view into a buffer of the same layout (shares its storage).
    pub fn view(&self, buffer: &Tensor, i: usize) -> Tensor {
        let (size, stride) = &self.layouts[i];
        buffer.as_strided(size.as_slice(), stride.as_slice(), self.segments[i].0)
    }

    /// The gradients of `params` (the same list, in the same order) as one flat tensor, or
    /// `None` when one is missing or not laid out like its parameter.
    pub fn gradients(&self, params: &[(String, Tensor)]) -> Option<Tensor> {
        let mut views = Vec::with_capacity(params.len());
        for ((_, p), (size, stride)) in params.iter().zip(&self.layouts) {
            let g = p.grad();
            if !g.defined() || &g.size() != size || &g.stride() != stride {
                return None;
            }
            views.push(memory_order_view(&g)?);
        }
        Some(Tensor::cat(&views, 0))
    }

    /// One value per parameter, spread over its elements.
    pub fn per_element(&self, values: &[f64]) -> Tensor {
        let counts: Vec<i64> = self.segments.iter().map(|s| s.1).collect();
        Tensor::from_slice(values)
            .to_kind(Kind::Float)
            .to_device(self.flat.device())
            .repeat_interleave_self_tensor(
                &Tensor::from_slice(&counts).to_device(self.flat.device()),
                0,
                None,
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::compute::{channels_last, is_channels_last};
    use tch::Device;

    #[test]
    fn parameters_become_views_that_keep_values_and_layout() {
        let a = Tensor::randn([3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let w = channels_last(&Tensor::randn([2, 3, 2, 2], (Kind::Float, Device::Cpu)))
            .set_requires_grad(true);
        let before = (a.copy(), w.copy());
        let params = vec![
            ("a".to_string(), a.shallow_clone()),
            ("w".to_string(), w.shallow_clone()),
        ];
        let fp = FlatParams::new(&params).unwrap();
        assert!(a.equal(&before.0) && w.equal(&before.1));
        assert!(is_channels_last(&w));
        // Writing the buffer writes the parameters.
        tch::no_grad(|| {
            let _ = fp.flat().shallow_clone().fill_(2.0);
        });
        assert_eq!(a.sum(Kind::Float).double_value(&[]), 24.0);
        assert_eq!(w.sum(Kind::Float).double_value(&[]), 48.0);
        // Gradients gather in the same layout.
        (&a * 1.0 + 0.0).sum(Kind::Float).backward();
        (&w * 3.0).sum(Kind::Float).backward();
        let g = fp.gradients(&params).unwrap();
        assert_eq!(g.size(), vec![36]);
        assert_eq!(fp.view(&g, 1).sum(Kind::Float).double_value(&[]), 72.0);
        let e = fp.per_element(&[1.0, 5.0]);
        assert_eq!(e.sum(Kind::Float).double_value(&[]), 12.0 + 5.0 * 24.0);
    }
}
