//! Peak learning rate from the base rate and the global batch (`optim.lr_scaling`).
//!
//! * `none`: `lr`.
//! * `linear`: `lr × global_batch / 256` (Goyal et al., "Accurate, Large Minibatch SGD"),
//!   so `lr` is the rate for a batch of 256.
//! * `sqrt`: `lr × √global_batch`, SimCLR's LARS recipe (e.g. 0.075 × √4096 = 4.8).

use contrail_common::config::{LrScaling, OptimConfig};

/// The batch the linear rule's base rate refers to.
pub const LINEAR_REFERENCE_BATCH: f64 = 256.0;

/// The schedule's peak rate for `cfg.lr` at `global_batch` images per optimizer step.
pub fn scaled_peak_lr(cfg: &OptimConfig, global_batch: u64) -> f64 {
    let batch = global_batch as f64;
    match cfg.lr_scaling {
        LrScaling::None => cfg.lr,
        LrScaling::Linear => cfg.lr * batch / LINEAR_REFERENCE_BATCH,
        LrScaling::Sqrt => cfg.lr * batch.sqrt(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(lr: f64, rule: LrScaling) -> OptimConfig {
        OptimConfig {
            lr,
            lr_scaling: rule,
            ..OptimConfig::default()
        }
    }

    #[test]
    fn rules_follow_the_published_recipes() {
        assert_eq!(scaled_peak_lr(&cfg(0.3, LrScaling::None), 4096), 0.3);
        // SimCLR: base 0.3 at 256 → 4.8 at 4096 (linear); 0.075 → 4.8 (sqrt).
        assert!((scaled_peak_lr(&cfg(0.3, LrScaling::Linear), 4096) - 4.8).abs() < 1e-12);
        assert!((scaled_peak_lr(&cfg(0.075, LrScaling::Sqrt), 4096) - 4.8).abs() < 1e-12);
        // Linear at the reference batch is the identity; doubling the batch doubles the rate.
        assert_eq!(scaled_peak_lr(&cfg(0.1, LrScaling::Linear), 256), 0.1);
        let (a, b) = (
            scaled_peak_lr(&cfg(0.1, LrScaling::Linear), 512),
            scaled_peak_lr(&cfg(0.1, LrScaling::Sqrt), 64),
        );
        assert!(
            (a - 0.2).abs() < 1e-12 && (b - 0.8).abs() < 1e-12,
            "{a} {b}"
        );
    }
}
