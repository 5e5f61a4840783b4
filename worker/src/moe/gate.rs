//! The router of an MoE block: which experts each token goes to, with what weight, which
//! assignments fit in the experts' capacity, and the auxiliary losses that keep the load
//! balanced. Semantics follow DeepSpeed's `top1gating` / `top2gating` (sharded_moe.py) with
//! random token selection and gate noise off; `tests/fixtures/deepspeed_gating` checks them.
//!
//! - softmax in float32 over `logits` (tokens × experts); the first choice is the argmax, the
//!   second (k = 2) the argmax of the logits with the first masked out;
//! - slots: within an expert, first choices take slots in token order, then second choices in
//!   token order; an assignment whose slot is ≥ the capacity is dropped. So an over-full
//!   expert keeps its first tokens (DeepSpeed's top-1 with RTS off breaks that tie with an
//!   unstable `topk`, so the fixture compares against its RTS code with falling priorities);
//! - weights: k = 1 uses the gate probability; k = 2 renormalises the two kept probabilities
//!   to sum to 1 (a dropped choice gives its share to the other);
//! - balance loss: E · Σ_e f_e · P_e, f_e the fraction of tokens whose *first* choice is e
//!   (before dropping), P_e the mean gate probability of e;
//! - z-loss (ST-MoE): mean over tokens of logsumexp(logits)².

use tch::{Kind, Tensor};

/// How many assignments an expert accepts from one worker's tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Capacity {
    /// ceil(factor × k × tokens / experts), at least `min`.
    Factor { factor: f64, min: i64 },
    /// Nothing is dropped.
    Unlimited,
}

/// DeepSpeed's `_capacity`, including its float32 arithmetic (so a product that lands a hair
/// above an integer rounds up the same way): ceil(tokens / experts × factor × k), ≥ min.
pub fn capacity(tokens: i64, experts: i64, top_k: i64, factor: f64, min: i64) -> i64 {
    let per_expert = (tokens as f64 / experts as f64) as f32;
    let scaled = per_expert * (factor * top_k as f64) as f32;
    (scaled.ceil() as i64).max(min)
}

/// The routing of one worker's tokens. Assignments are the kept (token, expert) pairs, sorted
/// by expert and then by slot.
#[derive(Debug)]
pub struct Routing {
    /// Token index of each kept assignment (Int64).
    pub token: Tensor,
    /// Global expert id of each kept assignment (Int64).
    pub expert: Tensor,
    /// Position of the assignment in its expert's buffer, < capacity (Int64).
    pub slot: Tensor,
    /// Combine weight of each kept assignment (Float, differentiable w.r.t. the logits).
    pub weight: Tensor,
    /// Kept assignments per expert (`sum == token.size()[0]`).
    pub kept_per_expert: Vec<i64>,
    /// Assignments per expert before the capacity cut (k per token in all).
    pub routed_per_expert: Vec<i64>,
    /// Assignments dropped by the capacity cut.
    pub dropped: i64,
    /// The capacity used, None when unlimited.
    pub capacity: Option<i64>,
    /// f_e: the fraction of tokens whose first choice is expert e (before dropping).
    pub first_choice_fraction: Tensor,
    /// E · Σ_e f_e · P_e (0 without tokens).
    pub balance_loss: Tensor,
    /// mean(logsumexp(logits)²) (0 without tokens).
    pub z_loss: Tensor,
}

/// Routes `logits` (tokens × experts, any float kind; computed in float32) to `top_k` ∈ {1, 2}
/// experts per token.
pub fn route(logits: &Tensor, top_k: usize, capacity_rule: Capacity) -> Routing {
    assert!(matches!(top_k, 1 | 2), "top_k must be 1 or 2, got {top_k}");
    let logits = logits.to_kind(Kind::Float);
    let (tokens, experts) = match logits.size()[..] {
        [t, e] => (t, e),
        ref s => panic!("gate logits must be tokens × experts, got {s:?}"),
    };
    let device = logits.device();
    let capacity = match capacity_rule {
        Capacity::Factor { factor, min } => {
            Some(capacity(tokens, experts, top_k as i64, factor, min))
        }
        Capacity::Unlimited => None,
    };
    let gates = logits.softmax(-1, Kind::Float);
    let first = gates.argmax(1, false);
    let mask1 = first.one_hot(experts);
    let mut choices = vec![first.shallow_clone()];
    let mut masks = vec![mask1.shallow_clone()];
    if top_k == 2 {
        let except_first = logits.masked_fill(&mask1.to_kind(Kind::Bool), f64::NEG_INFINITY);
        let second = except_first.argmax(1, false);
        masks.push(second.one_hot(experts));
        choices.push(second);
    }

    // Slot of every choice: its rank among the same expert's earlier choices, first choices
    // of all tokens before any second choice.
    let mut taken_before = Tensor::zeros([1, experts], (Kind::Int64, device));
    let mut slots = Vec::with_capacity(top_k);
    for (choice, mask) in choices.iter().zip(&masks) {
        let location = mask.cumsum(0, Kind::Int64) - 1 + &taken_before;
        slots.push(
            location
                .gather(1, &choice.unsqueeze(1), false)
                .squeeze_dim(1),
        );
        taken_before += mask.sum_dim_intlist(0, true, Kind::Int64);
    }
    let keep: Vec<Tensor> = slots
        .iter()
        .map(|s| match capacity {
            Some(c) => s.lt(c),
            None => s.ones_like().to_kind(Kind::Bool),
        })
        .collect();
    let probs: Vec<Tensor> = choices
        .iter()
        .zip(&keep)
        .map(|(c, k)| gates.gather(1, &c.unsqueeze(1), false).squeeze_dim(1) * k)
        .collect();
    let weights: Vec<Tensor> = if top_k == 2 {
        let denom = (&probs[0] + &probs[1]).clamp_min(f32::EPSILON as f64);
        probs.iter().map(|p| p / &denom).collect()
    } else {
        probs
    };

    let token_ids = Tensor::arange(tokens, (Kind::Int64, device));
    let cat = |parts: Vec<Tensor>| Tensor::cat(&parts, 0);
    let all_tokens = cat((0..top_k).map(|_| token_ids.shallow_clone()).collect());
    let all_experts = cat(choices.iter().map(|c| c.shallow_clone()).collect());
    let all_slots = cat(slots);
    let all_weights = cat(weights);
    let all_keep = cat(keep);
    let kept = all_keep.nonzero().squeeze_dim(1);
    let (expert, slot) = (
        all_experts.index_select(0, &kept),
        all_slots.index_select(0, &kept),
    );
    // Slots are distinct within an expert and below tokens × k, so this key orders by
    // (expert, slot) exactly.
    let stride = tokens * top_k as i64 + 1;
    let order = (&expert * stride + &slot).argsort(0, false);
    let kept = kept.index_select(0, &order);

    let routed_per_expert = counts(&all_experts, experts);
    let expert = all_experts.index_select(0, &kept);
    let kept_per_expert = counts(&expert, experts);
    let dropped = routed_per_expert.iter().sum::<i64>() - kept_per_expert.iter().sum::<i64>();

    let first_choice_fraction = if tokens == 0 {
        Tensor::zeros([experts], (Kind::Float, device))
    } else {
        mask1.to_kind(Kind::Float).mean_dim(0, false, Kind::Float)
    };
    let (balance_loss, z_loss) = balance_and_z_loss(&logits, &first_choice_fraction);
    Routing {
        token: all_tokens.index_select(0, &kept),
        expert,
        slot: all_slots.index_select(0, &kept),
        weight: all_weights.index_select(0, &kept),
        kept_per_expert,
        routed_per_expert,
        dropped,
        capacity,
        first_choice_fraction,
        balance_loss,
        z_loss,
    }
}

/// The balance loss E · Σ_e f_e · P_e and the z-loss of `logits`, with f given (the fraction
/// of tokens whose first choice is e: a count, no gradient). Both are 0 without tokens. A
/// caller can evaluate them on a second copy of the logits so that their backward does not
/// share graph nodes with the combine weights'.
pub fn balance_and_z_loss(logits: &Tensor, first_choice_fraction: &Tensor) -> (Tensor, Tensor) {
    let logits = logits.to_kind(Kind::Float);
    let (tokens, experts) = logits.size2().expect("gate logits are tokens × experts");
    if tokens == 0 {
        let zero = || Tensor::zeros([], (Kind::Float, logits.device()));
        return (zero(), zero());
    }
    let me = logits
        .softmax(-1, Kind::Float)
        .mean_dim(0, false, Kind::Float);
    let balance = (me * first_choice_fraction).sum(Kind::Float) * experts as f64;
    let z = logits.logsumexp(-1, false).square().mean(Kind::Float);
    (balance, z)
}

/// How many entries of `ids` (Int64, values in 0..n) equal each value.
fn counts(ids: &Tensor, n: i64) -> Vec<i64> {
    let c = if ids.numel() == 0 {
        Tensor::zeros([n], (Kind::Int64, ids.device()))
    } else {
        ids.bincount(None::<Tensor>, n)
    };
    Vec::<i64>::try_from(&c.to_device(tch::Device::Cpu)).expect("Int64 counts")
}

/// DeepSpeed's `multiplicative_jitter`: `x · U(1 − ε, 1 + ε)`, elementwise.
pub fn jitter(x: &Tensor, epsilon: f64) -> Tensor {
    if epsilon == 0.0 {
        return x.shallow_clone();
    }
    x * jitter_factor(x, epsilon)
}

/// The factor [`jitter`] multiplies by: U(1 − ε, 1 + ε) of `x`'s shape, without gradient.
pub fn jitter_factor(x: &Tensor, epsilon: f64) -> Tensor {
    x.detach().rand_like() * (2.0 * epsilon) + (1.0 - epsilon)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(rows: &[[f32; 4]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, 4])
    }

    fn vec_i(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(t).unwrap()
    }

    #[test]
    fn capacity_follows_the_formula_and_the_minimum() {
        assert_eq!(capacity(10, 4, 1, 1.0, 0), 3);
        assert_eq!(capacity(10, 4, 2, 1.25, 0), 7);
        assert_eq!(capacity(8, 4, 1, 1.0, 4), 4);
        assert_eq!(capacity(0, 4, 2, 1.0, 1), 1);
    }

    #[test]
    fn top1_keeps_the_first_tokens_of_an_overfull_expert() {
        // Every token prefers expert 2; capacity ceil(4/4 · 1) = 1 keeps token 0 only.
        let l = logits(&[[0.0, 0.0, 3.0, 0.0]; 4]);
        let r = route(
            &l,
            1,
            Capacity::Factor {
                factor: 1.0,
                min: 0,
            },
        );
        assert_eq!(r.capacity, Some(1));
        assert_eq!(vec_i(&r.token), vec![0]);
        assert_eq!(vec_i(&r.expert), vec![2]);
        assert_eq!(r.routed_per_expert, vec![0, 0, 4, 0]);
        assert_eq!(r.kept_per_expert, vec![0, 0, 1, 0]);
        assert_eq!(r.dropped, 3);
        let p = l.softmax(-1, Kind::Float).double_value(&[0, 2]);
        assert!((r.weight.double_value(&[0]) - p).abs() < 1e-7);
        // All tokens on one expert: f = (0,0,1,0), so the loss is E · P_2 = 4p.
        assert!((r.balance_loss.double_value(&[]) - 4.0 * p).abs() < 1e-6);
    }

    #[test]
    fn top2_orders_second_choices_after_all_first_choices_and_renormalises() {
        let l = logits(&[
            [2.0, 1.0, 0.0, 0.0], // 0 then 1
            [1.0, 2.0, 0.0, 0.0], // 1 then 0
            [2.0, 0.0, 1.0, 0.0], // 0 then 2
        ]);
        let r = route(&l, 2, Capacity::Unlimited);
        // expert 0: token 0 (first, slot 0), token 2 (first, slot 1), token 1 (second, slot 2).
        assert_eq!(vec_i(&r.expert), vec![0, 0, 0, 1, 1, 2]);
        assert_eq!(vec_i(&r.token), vec![0, 2, 1, 1, 0, 2]);
        assert_eq!(vec_i(&r.slot), vec![0, 1, 2, 0, 1, 0]);
        let per_token =
            Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)).index_add(0, &r.token, &r.weight);
        assert!((per_token - 1.0).abs().max().double_value(&[]) < 1e-6);
        assert_eq!(r.dropped, 0);
    }

    #[test]
    fn a_dropped_second_choice_leaves_the_first_with_weight_one() {
        // Capacity ceil(2/4 · 0.5 · 2) = 1: expert 1 takes token 1's first choice, so token 0's
        // second choice (expert 1) is dropped.
        let l = logits(&[[2.0, 1.0, 0.0, 0.0], [0.0, 2.0, 1.0, 0.0]]);
        let r = route(
            &l,
            2,
            Capacity::Factor {
                factor: 0.5,
                min: 0,
            },
        );
        assert_eq!(r.capacity, Some(1));
        let pairs: Vec<(i64, i64)> = vec_i(&r.token).into_iter().zip(vec_i(&r.expert)).collect();
        assert_eq!(pairs, vec![(0, 0), (1, 1), (1, 2)]);
        assert!((r.weight.double_value(&[0]) - 1.0).abs() < 1e-6);
        assert_eq!(r.dropped, 1);
    }

    #[test]
    fn no_tokens_routes_nothing_and_the_losses_are_zero() {
        let r = route(
            &Tensor::zeros([0, 4], (Kind::Float, tch::Device::Cpu)),
            2,
            Capacity::Factor {
                factor: 1.0,
                min: 2,
            },
        );
        assert_eq!(r.token.size(), vec![0]);
        assert_eq!(r.routed_per_expert, vec![0; 4]);
        assert_eq!(r.balance_loss.double_value(&[]), 0.0);
        assert_eq!(r.z_loss.double_value(&[]), 0.0);
    }

    #[test]
    fn z_loss_is_the_mean_squared_logsumexp() {
        let l = logits(&[[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]);
        let r = route(&l, 1, Capacity::Unlimited);
        let lse = |v: &[f64]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
        let want = (lse(&[1.0, 2.0, 3.0, 4.0]).powi(2) + lse(&[0.0; 4]).powi(2)) / 2.0;
        assert!((r.z_loss.double_value(&[]) - want).abs() < 1e-5);
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let x = Tensor::ones([1000], (Kind::Float, tch::Device::Cpu));
        let j = jitter(&x, 0.1);
        assert!(j.min().double_value(&[]) >= 0.9 && j.max().double_value(&[]) <= 1.1);
        assert!(j.std(true).double_value(&[]) > 0.01, "noise was drawn");
    }

    #[test]
    fn the_balance_loss_spreads_a_skewed_router() {
        // Tokens share a common direction that the gate maps to expert 0: nearly all of
        // them choose it. Descending the balance loss alone must spread them.
        tch::manual_seed(3);
        let (tokens, dim, experts) = (512, 16, 4);
        let common = Tensor::randn([1, dim], (Kind::Float, tch::Device::Cpu));
        let x = &common * 0.6 + Tensor::randn([tokens, dim], (Kind::Float, tch::Device::Cpu));
        let w = Tensor::randn([experts, dim], (Kind::Float, tch::Device::Cpu)) * 0.1;
        w.get(0).copy_(&(common.squeeze() * 0.5));
        let w = w.set_requires_grad(true);
        let ratio = |r: &Routing| {
            let load: Vec<f64> = r.routed_per_expert.iter().map(|&c| c as f64).collect();
            contrail_common::experts::max_mean_ratio(&load)
        };
        let before = ratio(&route(
            &x.linear::<Tensor>(&w, None),
            1,
            Capacity::Unlimited,
        ));
        for _ in 0..200 {
            let r = route(&x.linear::<Tensor>(&w, None), 1, Capacity::Unlimited);
            let _ = w.grad().defined().then(|| w.grad().zero_());
            r.balance_loss.backward();
            tch::no_grad(|| {
                let _ = w.shallow_clone().g_sub_(&(w.grad() * 0.1));
            });
        }
        let after = ratio(&route(
            &x.linear::<Tensor>(&w, None),
            1,
            Capacity::Unlimited,
        ));
        assert!(before > 2.5, "the router starts skewed: max/mean {before}");
        assert!(after < 1.5, "max/mean {before} -> {after}");
    }
}
