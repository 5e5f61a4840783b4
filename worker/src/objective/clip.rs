//! CLIP's symmetric contrastive loss (as open_clip's `ClipLoss`) over image–text pairs.
//!
//! With L2-normalised rows and `s = exp(logit_scale)`, the logits are `s · img · txtᵀ` (N × N,
//! pair i on the diagonal) and the loss is the mean of the image→text cross entropy (rows) and
//! the text→image one (columns):
//! `L = 1/(2N) · Σ_i [lse_j(s·img_i·txt_j) + lse_j(s·txt_i·img_j) − 2·s·img_i·txt_i]`.
//!
//! Distributed form ("local anchors", as NT-Xent in `simclr`): each rank gets the gathered
//! image and text embeddings of all ranks and adds only the terms of its own pairs, already
//! divided by the global 2N, so the ranks' values sum to `L`. The gradients of the gathered
//! tensors, reduce-scattered (sum), and of `logit_scale`, all-reduced (sum), are then exactly
//! the single-process gradients.
//!
//! `logit_scale` is the learnable log of the temperature's inverse. Like open_clip it is not
//! clamped inside the loss (which would zero its gradient at the bound) but in place after each
//! optimizer step, with `model::logit_scale::clamp_logit_scale_`.

use super::gather::{block_layout, gather_rows, scatter_back};
use super::{StepClock, StepObjective};
use crate::dist::Collective;
use crate::model::ContrastiveModel;
use crate::nn::l2_normalize;
use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

/// Single-process CLIP loss of `img` and `txt` (N × d each, pair i = row i, not yet
/// normalised) with `logit_scale` (0-d, the log of the logit multiplier). Differentiable in all
/// three. Shapes must agree (callers pair rows, so a mismatch is a programming error).
pub fn clip_loss(img: &Tensor, txt: &Tensor, logit_scale: &Tensor) -> Tensor {
    let n = img.size()[0];
    let img = l2_normalize(img);
    let txt = l2_normalize(txt);
    let scale = logit_scale.exp();
    let labels = Tensor::arange(n, (Kind::Int64, img.device()));
    // Both directions written out as open_clip does, rather than one matrix and its transpose.
    let logits_per_image = img.matmul(&txt.tr()) * &scale;
    let logits_per_text = txt.matmul(&img.tr()) * &scale;
    (logits_per_image.cross_entropy_for_logits(&labels)
        + logits_per_text.cross_entropy_for_logits(&labels))
        / 2.0
}

/// Which pairs of the gathered matrices belong to this rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalPairs {
    /// First gathered row of this rank's pairs.
    pub offset: i64,
    /// Number of this rank's pairs (may be 0).
    pub count: i64,
}

/// This rank's share of the global CLIP loss: the image→text terms of its images and the
/// text→image terms of its texts against all `N` gathered rows, divided by `2N`. Summed over
/// ranks it equals [`clip_loss`] of the gathered matrices, and so do the gradients.
/// A rank with `count == 0` gets an exact 0 (still attached to the graph); so does `N == 0`.
pub fn clip_local_loss(
    img_all: &Tensor,
    txt_all: &Tensor,
    logit_scale: &Tensor,
    pairs: LocalPairs,
) -> Result<Tensor> {
    let (si, st) = (img_all.size(), txt_all.size());
    if si.len() != 2 || si != st {
        bail!("CLIP: gathered image {si:?} and text {st:?} embeddings must both be N × d");
    }
    let n = si[0];
    if pairs.offset < 0 || pairs.count < 0 || pairs.offset + pairs.count > n {
        bail!(
            "CLIP: local pairs {}..{} lie outside the {n} gathered rows",
            pairs.offset,
            pairs.offset + pairs.count
        );
    }
    if logit_scale.numel() != 1 {
        bail!(
            "CLIP: logit_scale must be a single value, got shape {:?}",
            logit_scale.size()
        );
    }
    let img = l2_normalize(img_all);
    let txt = l2_normalize(txt_all);
    let scale = logit_scale.reshape([]).exp();
    let img_local = img.narrow(0, pairs.offset, pairs.count);
    let txt_local = txt.narrow(0, pairs.offset, pairs.count);
    let image_to_text = img_local.matmul(&txt.tr()) * &scale;
    let text_to_image = txt_local.matmul(&img.tr()) * &scale;
    let positive =
        (&img_local * &txt_local).sum_dim_intlist([1i64].as_slice(), false, None) * &scale;
    let per_pair =
        image_to_text.logsumexp([1], false) + text_to_image.logsumexp([1], false) - positive * 2.0;
    // max(N, 1): with no pairs anywhere the (empty) sum is 0, not 0/0.
    Ok(per_pair.sum(per_pair.kind()) / (2 * n.max(1)) as f64)
}

// ---------------------------------------------------------------------------------------------
// The distributed step form.

/// CLIP's symmetric image–text loss over every rank's pairs. `z_local` holds this rank's image
/// embeddings, then its caption embeddings.
pub struct Clip;

impl StepObjective for Clip {
    fn loss_and_grad(
        &mut self,
        model: &ContrastiveModel,
        z_local: &Tensor,
        counts: &[i64],
        _clock: StepClock,
        coll: &dyn Collective,
    ) -> Result<(Tensor, Tensor)> {
        let rank = coll.rank();
        let logit_scale = model
            .logit_scale()
            .context("objective \"clip\" needs a CLIP model (text tower and logit scale)")?;
        let (rows, _) = block_layout(counts, rank);
        let device = z_local.device();
        let gathered = gather_rows(z_local, &rows, coll)?;
        let (mut images, mut texts) = (Vec::new(), Vec::new());
        let mut start = 0;
        for &c in counts {
            images.extend(start..start + c);
            texts.extend(start + c..start + 2 * c);
            start += 2 * c;
        }
        let pick =
            |rows: &[i64]| gathered.index_select(0, &Tensor::from_slice(rows).to_device(device));
        let pairs = LocalPairs {
            offset: counts[..rank].iter().sum(),
            count: counts[rank],
        };
        let loss = clip_local_loss(&pick(&images), &pick(&texts), logit_scale, pairs)?;
        // Fills the gathered rows' gradient and adds this rank's share to the logit scale's.
        loss.backward();
        let grad = gathered.grad();
        let d_gathered = if grad.defined() {
            grad
        } else {
            gathered.zeros_like()
        };
        Ok((loss.detach(), scatter_back(d_gathered, &rows, coll)?))
    }

    fn after_update(
        &mut self,
        model: &ContrastiveModel,
        _clock: StepClock,
        _coll: &dyn Collective,
    ) -> Result<()> {
        model.clamp_logit_scale();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::logit_scale::{
        clamp_logit_scale_, init_logit_scale, LOGIT_SCALE_INIT, LOGIT_SCALE_MAX,
    };
    use tch::Device;

    /// Textbook CLIP loss in f64 with explicit loops (no logsumexp trick).
    fn reference(img: &Tensor, txt: &Tensor, logit_scale: f64) -> f64 {
        let rows = |t: &Tensor| -> Vec<Vec<f64>> {
            let t = t.to_kind(Kind::Double);
            let v = Vec::<Vec<f64>>::try_from(&t).expect("2-d tensor");
            v.into_iter()
                .map(|r| {
                    let norm = r.iter().map(|x| x * x).sum::<f64>().sqrt();
                    r.iter().map(|x| x / norm).collect()
                })
                .collect()
        };
        let (a, b) = (rows(img), rows(txt));
        let s = logit_scale.exp();
        let dot = |x: &[f64], y: &[f64]| s * x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>();
        let ce = |q: &[Vec<f64>], k: &[Vec<f64>], i: usize| {
            let denom: f64 = k.iter().map(|kj| dot(&q[i], kj).exp()).sum();
            -(dot(&q[i], &k[i]).exp() / denom).ln()
        };
        let n = a.len();
        (0..n).map(|i| ce(&a, &b, i) + ce(&b, &a, i)).sum::<f64>() / (2 * n) as f64
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Correlated pairs, so the loss and its gradients are far from the uniform case.
    fn pairs(seed: i64, n: i64, d: i64) -> (Tensor, Tensor) {
        tch::manual_seed(seed);
        let img = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
        let txt = Tensor::randn([n, d], (Kind::Float, Device::Cpu)) + &img * 0.5;
        (img, txt)
    }

    #[test]
    fn single_process_matches_reference() {
        let (img, txt) = pairs(7, 6, 5);
        for ls in [0.0, LOGIT_SCALE_INIT, LOGIT_SCALE_MAX] {
            let got = clip_loss(&img, &txt, &Tensor::from(ls as f32)).double_value(&[]);
            let want = reference(&img, &txt, ls);
            assert!(
                (got - want).abs() < 1e-5,
                "logit_scale {ls}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn loss_is_symmetric_in_image_and_text() {
        // Swapping the modalities swaps the two cross entropies; the mean must not change, but
        // each direction alone does, so this catches a one-sided loss.
        let (img, txt) = pairs(8, 5, 4);
        let ls = Tensor::from(1.3f32);
        let ab = clip_loss(&img, &txt, &ls).double_value(&[]);
        let ba = clip_loss(&txt, &img, &ls).double_value(&[]);
        assert!((ab - ba).abs() < 1e-6, "{ab} vs {ba}");
    }

    /// Sums the local contributions of ranks with `counts` pairs each and returns the loss and
    /// the summed gradients w.r.t. image, text and logit scale.
    fn simulated_ranks(
        img: &Tensor,
        txt: &Tensor,
        logit_scale: f64,
        counts: &[i64],
    ) -> (f64, Tensor, Tensor, Tensor) {
        let mut loss = 0.0;
        let mut grads = [img.zeros_like(), txt.zeros_like(), Tensor::from(0f32)];
        let mut offset = 0;
        for &count in counts {
            // Fresh leaves per rank: each rank has its own copy of the gathered tensors.
            let i = img.detach().copy().set_requires_grad(true);
            let t = txt.detach().copy().set_requires_grad(true);
            let ls = Tensor::from(logit_scale as f32).set_requires_grad(true);
            let local = clip_local_loss(&i, &t, &ls, LocalPairs { offset, count })
                .expect("valid local pairs");
            loss += local.double_value(&[]);
            let g = Tensor::run_backward(&[&local], &[&i, &t, &ls], false, false);
            for (acc, g) in grads.iter_mut().zip(&g) {
                *acc += g;
            }
            offset += count;
        }
        let [gi, gt, gs] = grads;
        (loss, gi, gt, gs)
    }

    #[test]
    fn rank_contributions_sum_to_single_process_loss_and_gradients() {
        // Four ranks with uneven shares, one of them empty, 8 pairs in all.
        let (img, txt) = pairs(9, 8, 6);
        let ls0 = 2.1;
        let i = img.copy().set_requires_grad(true);
        let t = txt.copy().set_requires_grad(true);
        let ls = Tensor::from(ls0 as f32).set_requires_grad(true);
        let want = clip_loss(&i, &t, &ls);
        let g = Tensor::run_backward(&[&want], &[&i, &t, &ls], false, false);

        let (loss, gi, gt, gs) = simulated_ranks(&img, &txt, ls0, &[3, 0, 2, 3]);
        let want = want.double_value(&[]);
        assert!((loss - want).abs() <= 1e-5, "loss {loss} vs {want}");
        for (name, got, want) in [("image", &gi, &g[0]), ("text", &gt, &g[1])] {
            let diff = max_abs_diff(got, want);
            assert!(diff <= 1e-5, "d/d{name}: max abs diff {diff}");
        }
        let (gs, want_gs) = (gs.double_value(&[]), g[2].double_value(&[]));
        assert!(
            (gs - want_gs).abs() <= 1e-5,
            "d/dlogit_scale {gs} vs {want_gs}"
        );
        // Non-trivial gradients, so the comparison above could have failed.
        assert!(want_gs.abs() > 1e-3 && g[0].abs().max().double_value(&[]) > 1e-3);
    }

    #[test]
    fn one_rank_alone_is_not_the_global_loss() {
        // Guards the scaling: a rank's share must be divided by the global N, not its own.
        let (img, txt) = pairs(10, 6, 4);
        let ls = Tensor::from(1.0f32);
        let part = clip_local_loss(
            &img,
            &txt,
            &ls,
            LocalPairs {
                offset: 0,
                count: 3,
            },
        )
        .expect("valid")
        .double_value(&[]);
        let rest = clip_local_loss(
            &img,
            &txt,
            &ls,
            LocalPairs {
                offset: 3,
                count: 3,
            },
        )
        .expect("valid")
        .double_value(&[]);
        let whole = clip_loss(&img, &txt, &ls).double_value(&[]);
        assert!(part > 0.0 && rest > 0.0 && part < whole);
        assert!((part + rest - whole).abs() < 1e-5);
    }

    #[test]
    fn empty_rank_and_empty_world_give_zero() {
        let (img, txt) = pairs(11, 4, 3);
        let ls = Tensor::from(1.0f32);
        let zero = clip_local_loss(
            &img,
            &txt,
            &ls,
            LocalPairs {
                offset: 4,
                count: 0,
            },
        )
        .expect("an empty share at the end is valid");
        assert_eq!(zero.double_value(&[]), 0.0);
        let none = Tensor::zeros([0, 3], (Kind::Float, Device::Cpu));
        let zero = clip_local_loss(
            &none,
            &none,
            &ls,
            LocalPairs {
                offset: 0,
                count: 0,
            },
        )
        .expect("no pairs anywhere is valid");
        assert_eq!(zero.double_value(&[]), 0.0);
    }

    #[test]
    fn bad_shapes_and_ranges_are_errors() {
        let (img, txt) = pairs(12, 4, 3);
        let ls = Tensor::from(1.0f32);
        let err = clip_local_loss(
            &img,
            &txt,
            &ls,
            LocalPairs {
                offset: 3,
                count: 2,
            },
        )
        .expect_err("rows 3..5 of 4");
        assert!(err.to_string().contains("3..5"), "{err}");
        let short = txt.narrow(0, 0, 3);
        let err = clip_local_loss(
            &img,
            &short,
            &ls,
            LocalPairs {
                offset: 0,
                count: 1,
            },
        )
        .expect_err("mismatched rows");
        assert!(err.to_string().contains("[3, 3]"), "{err}");
        let two = Tensor::from_slice(&[1.0f32, 2.0]);
        assert!(clip_local_loss(
            &img,
            &txt,
            &two,
            LocalPairs {
                offset: 0,
                count: 1
            }
        )
        .is_err());
    }

    #[test]
    fn logit_scale_starts_at_clip_init_and_clamps_like_open_clip() {
        assert!((LOGIT_SCALE_INIT - (1.0f64 / 0.07).ln()).abs() < 1e-12);
        assert!((LOGIT_SCALE_MAX - 100f64.ln()).abs() < 1e-12);
        let ls = init_logit_scale(Device::Cpu);
        assert!(ls.requires_grad() && ls.is_leaf());
        assert!((ls.double_value(&[]) - LOGIT_SCALE_INIT).abs() < 1e-6);

        for (set, want) in [(7.0, LOGIT_SCALE_MAX), (-0.5, 0.0), (3.0, 3.0)] {
            tch::no_grad(|| {
                let _ = ls.shallow_clone().fill_(set);
            });
            clamp_logit_scale_(&ls);
            let got = ls.double_value(&[]);
            assert!((got - want).abs() < 1e-6, "set {set}: clamped to {got}");
            assert!(ls.requires_grad() && ls.is_leaf());
        }
        // The loss itself does not clamp: above the bound the gradient is still non-zero.
        let (img, txt) = pairs(13, 4, 3);
        let big = Tensor::from(6.0f32).set_requires_grad(true);
        let loss = clip_loss(&img, &txt, &big);
        let g = Tensor::run_backward(&[&loss], &[&big], false, false).remove(0);
        assert!(g.double_value(&[]).abs() > 1e-4);
    }
}
