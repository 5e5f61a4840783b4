//! MoCo v2's loss: each query is classified against its own key (the positive) and every key
//! in the queue (the negatives), as lightly's `NTXentLoss` with a memory bank computes it.
//!
//! Keys carry no gradient (they come from the momentum encoder) and neither does the queue,
//! so a query's loss depends only on its own row: the distributed form needs no gathered
//! gradient, only the global count to divide by.

use super::l2_normalize;
use tch::{Kind, Tensor};

/// Per-query losses `logsumexp([q·k, q·queue]/τ) − q·k/τ` for `query` (n × d, raw), `key`
/// (n × d, the positives, normalised here) and `queue` (K × d, used as given: it holds unit
/// keys). Differentiable in `query` only.
pub fn moco_query_losses(query: &Tensor, key: &Tensor, queue: &Tensor, temperature: f64) -> Tensor {
    let q = l2_normalize(query);
    let k = l2_normalize(&key.detach());
    let positive = (&q * &k).sum_dim_intlist(&[1i64][..], true, Kind::Float);
    let negatives = q.matmul(&queue.detach().tr());
    let logits = Tensor::cat(&[&positive, &negatives], 1) / temperature;
    logits.logsumexp([1], false) - logits.select(1, 0)
}

/// Mean of [`moco_query_losses`]: the value lightly's `NTXentLoss(memory_bank_size=(K, d))`
/// returns for `(query, key)` when its bank holds `queue`.
pub fn moco_loss(query: &Tensor, key: &Tensor, queue: &Tensor, temperature: f64) -> Tensor {
    moco_query_losses(query, key, queue, temperature).mean(Kind::Float)
}

/// The key encoder's EMA momentum at 0-based `step` of `total_steps`: `base` at the start,
/// rising along a cosine to 1.0 at the end (BYOL's schedule, used by solo-learn's MoCo v2+).
/// With an unknown run length (`total_steps` = 0) it stays at `base`.
pub fn momentum_at(step: u64, total_steps: u64, base: f64) -> f64 {
    if total_steps == 0 {
        return base;
    }
    let progress = (step.min(total_steps) as f64) / total_steps as f64;
    1.0 - (1.0 - base) * ((std::f64::consts::PI * progress).cos() + 1.0) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn momentum_schedule_runs_from_base_to_one() {
        assert_eq!(momentum_at(0, 100, 0.99), 0.99);
        assert!((momentum_at(50, 100, 0.99) - 0.995).abs() < 1e-12);
        assert_eq!(momentum_at(100, 100, 0.99), 1.0);
        assert_eq!(momentum_at(7, 0, 0.99), 0.99);
    }

    #[test]
    fn a_key_equal_to_its_query_beats_a_random_one() {
        tch::manual_seed(0);
        let q = Tensor::randn([4, 8], (Kind::Float, tch::Device::Cpu));
        let queue = l2_normalize(&Tensor::randn([16, 8], (Kind::Float, tch::Device::Cpu)));
        let same = moco_loss(&q, &q, &queue, 0.2).double_value(&[]);
        let other = moco_loss(&q, &q.flip([0]), &queue, 0.2).double_value(&[]);
        assert!(same < other, "{same} !< {other}");
    }
}
