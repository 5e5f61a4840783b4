//! Learning-rate schedule: linear warm-up, then cosine decay to zero (SimCLR's schedule).

/// Learning rate for 0-based `step` of `total_steps`. Warm-up ramps `peak/warmup, 2·peak/warmup,
/// …, peak` over the first `warmup` steps (never 0, so the first step moves the weights); the
/// cosine then goes from `peak` at step `warmup` to 0 at `total_steps`. Steps past the end give 0.
/// `total_steps == 0` means the run length is not known yet: the rate holds `peak` after warm-up.
pub fn lr_at(step: u64, total_steps: u64, peak: f64, warmup: u64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    if total_steps == 0 {
        return peak;
    }
    if step >= total_steps {
        return 0.0;
    }
    let progress = (step - warmup) as f64 / (total_steps - warmup) as f64;
    0.5 * peak * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let (total, peak, warm) = (110, 2.0, 10);
        assert!((lr_at(0, total, peak, warm) - 0.2).abs() < 1e-12);
        assert!((lr_at(4, total, peak, warm) - 1.0).abs() < 1e-12);
        assert!((lr_at(9, total, peak, warm) - 2.0).abs() < 1e-12);
        assert!((lr_at(10, total, peak, warm) - 2.0).abs() < 1e-12);
        // Half-way through the decay the cosine is at half the peak.
        assert!((lr_at(60, total, peak, warm) - 1.0).abs() < 1e-12);
        assert!(lr_at(109, total, peak, warm) > 0.0);
        assert_eq!(lr_at(110, total, peak, warm), 0.0);
        let decay: Vec<f64> = (10..110).map(|s| lr_at(s, total, peak, warm)).collect();
        assert!(
            decay.windows(2).all(|w| w[1] < w[0]),
            "cosine part must strictly decrease"
        );
    }

    #[test]
    fn no_warmup_and_warmup_longer_than_run() {
        assert_eq!(lr_at(0, 10, 1.0, 0), 1.0);
        // A warm-up longer than the run never reaches the cosine and never divides by zero.
        assert!((lr_at(4, 5, 1.0, 10) - 0.5).abs() < 1e-12);
        // Unknown length: warm up, then hold the peak.
        assert!((lr_at(1, 0, 1.0, 4) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(1000, 0, 1.0, 4), 1.0);
    }
}
