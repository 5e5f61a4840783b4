//! CLIP's learnable logit scale, a variable of the model (`logit_scale`): its initial value and
//! the clamp that open_clip applies after each optimizer step (the loss itself never clamps,
//! which would zero its gradient at the bound; `objective::clip` uses it as given).

use tch::{Device, Tensor};

/// ln(1/0.07): CLIP's initial logit scale (temperature 0.07).
pub const LOGIT_SCALE_INIT: f64 = 2.659_260_036_932_778;
/// ln(100): open_clip clamps the logit scale to `[0, ln 100]` so logits stay at most 100·cos.
pub const LOGIT_SCALE_MAX: f64 = 4.605_170_185_988_092;

/// A fresh learnable logit scale: a 0-d f32 leaf at [`LOGIT_SCALE_INIT`] with gradient.
pub fn init_logit_scale(device: Device) -> Tensor {
    Tensor::from(LOGIT_SCALE_INIT as f32)
        .to_device(device)
        .set_requires_grad(true)
}

/// Clamps the logit scale in place to `[0, ln 100]`, as open_clip's training loop does after
/// every optimizer step. Keeps the tensor a leaf that requires grad.
pub fn clamp_logit_scale_(logit_scale: &Tensor) {
    tch::no_grad(|| {
        let _ = logit_scale.shallow_clone().clamp_(0.0, LOGIT_SCALE_MAX);
    });
}
