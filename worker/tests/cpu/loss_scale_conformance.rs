//! fp16's dynamic loss scaling (`train.precision = "fp16"`, `optim::LossScaled`): against
//! `torch.amp.GradScaler` (torch 2.11.0) around `torch.optim.AdamW`, with overflowing steps,
//! from `tests/fixtures/reference/loss_scale/make_fixture.py`; and inside a real training
//! step, where a scaled step must equal the unscaled one and an overflow must skip the step.
//! fp16 autocast itself needs a GPU; the scaling does not, and is what these check.

use contrail_test_support as support;

use contrail_worker::dist::local::LocalGroup;
use contrail_worker::optim::loss_scale::ScaleSettings;
use contrail_worker::optim::{AdamW, AdamWOptions, LossScaled, Optimizer, Sgd};
use contrail_worker::train::step::{simclr_accumulated_step, simclr_train_step};
use serde_json::Value;
use support::{fresh_copy, max_abs_diff, setup};
use tch::{Kind, Tensor};

fn shallow(params: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    params
        .iter()
        .map(|(n, p)| (n.clone(), p.shallow_clone()))
        .collect()
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("cases.json: {key} is not a number"))
}

#[test]
fn loss_scaled_adamw_matches_grad_scaler_through_overflows() {
    let (t, cases) = support::read_fixture(
        &support::fixture_dir("reference/loss_scale"),
        "loss_scale_fixture.safetensors",
    );
    let case = &cases["adamw_gradscaler"];
    let get = |k: &str| {
        t.get(k)
            .unwrap_or_else(|| panic!("fixture tensor {k} missing"))
    };
    let params: Vec<(String, Tensor)> = ["w", "b"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                get(&format!("{n}0")).copy().set_requires_grad(true),
            )
        })
        .collect();
    let s = &case["settings"];
    let settings = ScaleSettings {
        init_scale: num(s, "init_scale"),
        growth_factor: num(s, "growth_factor"),
        backoff_factor: num(s, "backoff_factor"),
        growth_interval: s["growth_interval"].as_u64().expect("growth_interval"),
    };
    let adamw = AdamW::new(
        shallow(&params),
        AdamWOptions {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: num(case, "weight_decay"),
            exclude_1d_from_decay: false,
        },
    );
    let mut opt = LossScaled::with_settings(Box::new(adamw), shallow(&params), settings);
    let overflow = case["overflow_steps"].as_object().expect("overflow_steps");
    let scales = case["scales"].as_array().expect("scales");
    let steps = case["steps"].as_u64().expect("steps") as usize;
    assert!(!overflow.is_empty() && scales.len() == steps);
    for (k, want_scale) in scales.iter().enumerate() {
        opt.zero_grad();
        let scale = opt
            .loss_scale()
            .expect("a loss-scaled optimizer has a scale");
        let loss = params
            .iter()
            .map(|(n, p)| (p * get(&format!("grad{k}.{n}"))).sum(Kind::Float))
            .reduce(|a, b| a + b)
            .expect("two parameters");
        (loss * scale).backward();
        if let Some(v) = overflow.get(&k.to_string()) {
            let bad = if v == "nan" { f64::NAN } else { f64::INFINITY };
            tch::no_grad(|| {
                let _ = params[0].1.grad().get(1).get(2).fill_(bad);
            });
        }
        opt.step(num(case, "lr"));
        for (n, p) in &params {
            let want = get(&format!("step{k}.{n}"));
            let diff = (p.detach() - want).abs().max().double_value(&[]);
            assert!(diff <= 1e-6, "step {k}, {n}: max |Δ| = {diff:e}");
        }
        assert_eq!(
            opt.loss_scale(),
            want_scale.as_f64(),
            "the scale after step {k}"
        );
    }
    assert_eq!(opt.skipped(), overflow.len() as u64);
}

const TEMPERATURE: f64 = 0.2;
const LR: f64 = 0.5;

/// Scaling by a power of two and dividing it out again is exact in float32: with finite
/// gradients a loss-scaled step (one batch, and K = 2 micro-batches) leaves the parameters
/// the unscaled step leaves.
#[test]
fn a_loss_scaled_step_trains_as_the_unscaled_step() {
    let s = setup(11, 8);
    let micro = [
        (s.view1.narrow(0, 0, 4), s.view2.narrow(0, 0, 4)),
        (s.view1.narrow(0, 4, 4), s.view2.narrow(0, 4, 4)),
    ];
    for accumulated in [false, true] {
        let mut results = Vec::new();
        for loss_scaled in [false, true] {
            let coll = LocalGroup::new(1).remove(0);
            let model = fresh_copy(&s.initial);
            let sgd = Box::new(Sgd::new(model.named_parameters(), 0.9, 1e-3));
            let mut opt: Box<dyn Optimizer> = if loss_scaled {
                Box::new(LossScaled::new(sgd, model.named_parameters()))
            } else {
                sgd
            };
            let out = if accumulated {
                simclr_accumulated_step(&model, opt.as_mut(), &micro, TEMPERATURE, LR, &coll)
            } else {
                simclr_train_step(
                    &model,
                    opt.as_mut(),
                    &s.view1,
                    &s.view2,
                    TEMPERATURE,
                    LR,
                    &coll,
                )
            }
            .unwrap_or_else(|e| panic!("step: {e:#}"));
            results.push((model.named_parameters(), out.loss));
        }
        let (diff, at) = max_abs_diff(&results[0].0, &results[1].0);
        assert!(
            diff <= 1e-6,
            "accumulated {accumulated}: {at} differs by {diff:e}"
        );
        assert_eq!(results[0].1, results[1].1, "the loss is not scaled");
        let (moved, _) = max_abs_diff(&results[0].0, &s.initial.named_parameters());
        assert!(moved > 1e-3, "the step changed nothing ({moved:e})");
    }
}

/// A scale so large that the gradients overflow: the step changes no parameter and the
/// scale backs off.
#[test]
fn an_overflowing_step_is_skipped_and_the_scale_backs_off() {
    let s = setup(12, 8);
    let coll = LocalGroup::new(1).remove(0);
    let model = fresh_copy(&s.initial);
    let sgd = Box::new(Sgd::new(model.named_parameters(), 0.9, 1e-3));
    let settings = ScaleSettings {
        init_scale: 1e300,
        ..Default::default()
    };
    let mut opt = LossScaled::with_settings(sgd, model.named_parameters(), settings);
    let out = simclr_train_step(&model, &mut opt, &s.view1, &s.view2, TEMPERATURE, LR, &coll)
        .unwrap_or_else(|e| panic!("step: {e:#}"));
    assert!(out.loss.is_finite(), "{}", out.loss);
    let (diff, at) = max_abs_diff(&model.named_parameters(), &s.initial.named_parameters());
    assert_eq!(diff, 0.0, "{at} changed in a skipped step");
    assert_eq!((opt.skipped(), opt.loss_scale()), (1, Some(0.5e300)));
}
