//! LARS and AdamW against the reference implementations: lightly 1.6.0's LARS, solo-learn's
//! clipped LARS and `torch.optim.AdamW` (torch 2.11.0). The fixtures come from
//! `tests/fixtures/reference/optim/make_fixtures.py`: parameters `w` (4×3) and `b` (3), three
//! fixed gradient pairs and learning rates, and the reference parameters after every step.

use contrail_test_support as support;

use contrail_worker::optim::{
    AdamW, AdamWOptions, GradClip, Lars, LarsOptions, Optimizer, ParamGroups,
};
use serde_json::Value;
use std::collections::HashMap;
use tch::{Kind, Tensor};

const TOLERANCE: f64 = 1e-6;
const STEPS: usize = 3;

struct Fixtures {
    tensors: HashMap<String, Tensor>,
    cases: serde_json::Map<String, Value>,
}

impl Fixtures {
    fn load() -> Self {
        let (tensors, cases) = support::read_fixture(
            &support::fixture_dir("reference/optim"),
            "optim_fixtures.safetensors",
        );
        let cases = cases.as_object().expect("cases.json has \"cases\"").clone();
        Self { tensors, cases }
    }

    fn tensor(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture tensor \"{key}\" missing"))
    }

    fn case(&self, name: &str) -> &Value {
        self.cases
            .get(name)
            .unwrap_or_else(|| panic!("case \"{name}\" missing from cases.json"))
    }
}

fn num(case: &Value, key: &str) -> f64 {
    case[key]
        .as_f64()
        .unwrap_or_else(|| panic!("case field \"{key}\" is not a number"))
}

fn flag(case: &Value, key: &str) -> bool {
    case[key]
        .as_bool()
        .unwrap_or_else(|| panic!("case field \"{key}\" is not a bool"))
}

fn lrs(case: &Value) -> Vec<f64> {
    let lrs: Vec<f64> = case["lrs"]
        .as_array()
        .expect("case has \"lrs\"")
        .iter()
        .map(|v| v.as_f64().expect("lr is a number"))
        .collect();
    assert_eq!(lrs.len(), STEPS);
    lrs
}

fn lars_options(case: &Value) -> LarsOptions {
    LarsOptions {
        momentum: num(case, "momentum"),
        weight_decay: num(case, "weight_decay"),
        eta: num(case, "eta"),
        eps: num(case, "eps"),
        clip: flag(case, "clip"),
        exclude_1d_from_decay: flag(case, "exclude_1d_from_decay"),
        exclude_1d_from_adaptation: flag(case, "exclude_1d_from_adaptation"),
    }
}

fn adamw_options(case: &Value) -> AdamWOptions {
    AdamWOptions {
        beta1: num(case, "beta1"),
        beta2: num(case, "beta2"),
        eps: num(case, "eps"),
        weight_decay: num(case, "weight_decay"),
        exclude_1d_from_decay: flag(case, "exclude_1d_from_decay"),
    }
}

/// Fresh copies of the initial parameters, as (name, leaf requiring grad).
fn initial_params(fx: &Fixtures) -> Vec<(String, Tensor)> {
    ["w", "b"]
        .iter()
        .map(|n| {
            let t = fx
                .tensor(&format!("init.{n}"))
                .copy()
                .set_requires_grad(true);
            (n.to_string(), t)
        })
        .collect()
}

/// Makes `p.grad()` equal the fixture gradient: backward of `sum(p · g)` gives exactly `g`.
fn set_grads(fx: &Fixtures, params: &[(String, Tensor)], step: usize, opt: &mut dyn Optimizer) {
    opt.zero_grad();
    let loss = params
        .iter()
        .map(|(n, p)| (p * fx.tensor(&format!("grad{step}.{n}"))).sum(Kind::Float))
        .reduce(|a, b| a + b)
        .expect("two parameters");
    loss.backward();
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn assert_matches(fx: &Fixtures, case: &str, step: usize, params: &[(String, Tensor)]) {
    for (n, p) in params {
        let want = fx.tensor(&format!("{case}.step{step}.{n}"));
        let diff = max_abs_diff(&p.detach(), want);
        assert!(
            diff <= TOLERANCE,
            "{case}, step {step}, param {n}: max |Δ| = {diff:e} > {TOLERANCE:e}"
        );
    }
}

type Make = fn(Vec<(String, Tensor)>, &Value) -> Box<dyn Optimizer>;

fn make_lars(params: Vec<(String, Tensor)>, case: &Value) -> Box<dyn Optimizer> {
    Box::new(Lars::new(params, lars_options(case)))
}

fn make_adamw(params: Vec<(String, Tensor)>, case: &Value) -> Box<dyn Optimizer> {
    Box::new(AdamW::new(params, adamw_options(case)))
}

/// AdamW behind `optim.grad_clip_norm`, built the way jobs build it.
fn make_adamw_clipped(params: Vec<(String, Tensor)>, case: &Value) -> Box<dyn Optimizer> {
    let inner = make_adamw(shallow(&params), case);
    Box::new(GradClip::new(inner, params, num(case, "grad_clip_norm")))
}

/// Each parameter in a group of its own rate multiplier (`lr_scales`), as layer decay builds
/// the optimizer.
fn grouped(
    params: Vec<(String, Tensor)>,
    case: &Value,
    make: &dyn Fn(Vec<(String, Tensor)>) -> Box<dyn Optimizer>,
) -> Box<dyn Optimizer> {
    let scales: Vec<f64> = params
        .iter()
        .map(|(n, _)| num(&case["lr_scales"], n))
        .collect();
    Box::new(ParamGroups::new(params, &scales, make))
}

fn make_lars_grouped(params: Vec<(String, Tensor)>, case: &Value) -> Box<dyn Optimizer> {
    grouped(params, case, &|p| make_lars(p, case))
}

fn make_adamw_grouped(params: Vec<(String, Tensor)>, case: &Value) -> Box<dyn Optimizer> {
    grouped(params, case, &|p| make_adamw(p, case))
}

fn shallow(params: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    params
        .iter()
        .map(|(n, p)| (n.clone(), p.shallow_clone()))
        .collect()
}

/// Three steps of `case`, compared with the reference after every step.
fn run_case(case_name: &str, make: Make) {
    let fx = Fixtures::load();
    let case = fx.case(case_name);
    let params = initial_params(&fx);
    let mut opt = make(shallow(&params), case);
    for (k, lr) in lrs(case).into_iter().enumerate() {
        set_grads(&fx, &params, k, opt.as_mut());
        opt.step(lr);
        assert_matches(&fx, case_name, k, &params);
    }
}

/// Steps 0–1, then a checkpoint-style hand-over of parameters and optimizer state to a fresh
/// optimizer, which takes step 2: it must still land on the reference.
fn run_case_with_resume(case_name: &str, make: Make) {
    let fx = Fixtures::load();
    let case = fx.case(case_name);
    let lrs = lrs(case);
    let params = initial_params(&fx);
    let mut opt = make(shallow(&params), case);
    for (k, &lr) in lrs.iter().enumerate().take(2) {
        set_grads(&fx, &params, k, opt.as_mut());
        opt.step(lr);
    }
    let state = opt.state_tensors();
    let resumed: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, p)| (n.clone(), p.detach().copy().set_requires_grad(true)))
        .collect();
    let mut fresh = make(shallow(&resumed), case);
    fresh
        .load_state(&state)
        .expect("state written by the same optimizer loads");
    set_grads(&fx, &resumed, 2, fresh.as_mut());
    fresh.step(lrs[2]);
    assert_matches(&fx, case_name, 2, &resumed);
}

#[test]
fn lars_with_1d_params_excluded_matches_lightly() {
    run_case("lars_excl", make_lars);
}

#[test]
fn lars_on_all_params_matches_lightly() {
    run_case("lars_all", make_lars);
}

#[test]
fn lars_with_clip_matches_solo_learn() {
    run_case("lars_clip", make_lars);
}

#[test]
fn adamw_matches_torch() {
    run_case("adamw", make_adamw);
}

#[test]
fn adamw_with_1d_params_excluded_matches_torch() {
    run_case("adamw_excl", make_adamw);
}

/// The fixture's gradient norms straddle the limit (0.27, 0.35, 0.43 against 0.3): step 0
/// shows the clip leaves small gradients alone, steps 1 and 2 that it scales large ones.
#[test]
fn adamw_with_grad_norm_clipping_matches_torch() {
    run_case("adamw_gradclip", make_adamw_clipped);
}

/// Layer-wise learning-rate decay's parameter groups (`optim.layer_decay`): `b` at a quarter
/// of the step's rate, as PyTorch param groups with their own `lr`.
#[test]
fn parameter_groups_with_their_own_rates_match_torch_and_lightly() {
    run_case("lars_groups", make_lars_grouped);
    run_case("adamw_groups", make_adamw_grouped);
    run_case_with_resume("adamw_groups", make_adamw_grouped);
    // The groups change something: one rate for both lands elsewhere.
    let fx = Fixtures::load();
    let d = max_abs_diff(
        fx.tensor("adamw_groups.step2.b"),
        fx.tensor("adamw.step2.b"),
    );
    assert!(
        d > 100.0 * TOLERANCE,
        "the groups' rates made a difference of only {d:e}"
    );
}

#[test]
fn resumed_state_continues_on_the_reference_path() {
    run_case_with_resume("lars_all", make_lars);
    run_case_with_resume("adamw", make_adamw);
}

#[test]
fn exclusion_switches_change_the_result() {
    // Guards the fixtures themselves: if the switch combinations produced identical numbers,
    // the cases above could not tell a broken switch from a working one.
    let fx = Fixtures::load();
    for (a, b) in [
        ("lars_excl", "lars_all"),
        ("lars_all", "lars_clip"),
        ("adamw", "adamw_excl"),
    ] {
        let d = max_abs_diff(
            fx.tensor(&format!("{a}.step2.b")),
            fx.tensor(&format!("{b}.step2.b")),
        );
        assert!(d > 100.0 * TOLERANCE, "{a} and {b} differ by only {d:e}");
    }
}
