//! MoCo v2 and SwAV steps split over ranks and micro-batches must give exactly what one rank
//! with the whole batch gives, over two steps (so the second step sees the first step's queue
//! and momentum update): query parameters, prototypes, key encoder and queue all compared.
//!
//! GroupNorm makes the forward pass batch-independent, which is what allows an exact
//! comparison; with it, MoCo's shuffle BN must also change nothing, which checks that keys
//! computed on shuffled samples are put back in the right rows.

use contrail_test_support as support;

use contrail_common::config::{EncoderKind, ObjectiveKind};
use contrail_common::JobConfig;
use contrail_worker::dist::local::LocalGroup;
use contrail_worker::dist::Collective;
use contrail_worker::model::{BuildOptions, ContrastiveModel};
use contrail_worker::objective::{build_objective, Moco, StepObjective, Swav};
use contrail_worker::optim::Sgd;
use contrail_worker::tokenize::ByteTokenizer;
use contrail_worker::train::step::{train_step, StepClock};
use support::{max_abs_diff, model_config, seeded};
use tch::{Device, Tensor};

const SAMPLES: i64 = 8;
const STEPS: u64 = 2;
const TOLERANCE: f64 = 1e-5;
const LR: f64 = 0.5;
/// CLIP's shared positional embedding sums the gradients of every token of every sample, so a
/// large step turns float32 summation-order noise into ~2e-5; at this rate it stays below the
/// tolerance while a missing or misscaled gradient is still far outside it.
const CLIP_LR: f64 = 0.05;

fn config(kind: &str) -> JobConfig {
    let mut cfg = JobConfig {
        model: model_config(),
        ..Default::default()
    };
    cfg.data.image_size = 16;
    cfg.objective.kind = kind.parse().unwrap();
    cfg.objective.moco.queue_size = 24;
    cfg.objective.moco.momentum = 0.9;
    cfg.objective.swav.prototypes = 10;
    cfg.objective.swav.freeze_prototypes_steps = 1;
    // SwAV's queue holds each rank's own past features, which legitimately depend on the split.
    cfg.objective.swav.queue_size = 0;
    cfg.train.micro_batch = 2;
    cfg
}

/// `steps` batches of (view1, view2), `SAMPLES` each; for CLIP the second half is caption
/// tokens (start, 5 random bytes, end, pad).
fn batches(cfg: &JobConfig, steps: u64) -> Vec<(Tensor, Tensor)> {
    support::step_batches(
        cfg.objective.kind == ObjectiveKind::Clip,
        steps,
        SAMPLES,
        5,
        1,
    )
}

/// The job's model, identical on every rank and run.
fn model(cfg: &JobConfig) -> ContrastiveModel {
    seeded(5, || {
        ContrastiveModel::build(
            cfg,
            Device::Cpu,
            BuildOptions {
                tokenizer: Some(&ByteTokenizer::new()),
                ..Default::default()
            },
        )
        .unwrap()
    })
}

/// Every variable (deep copies), the losses, for one rank.
type Outcome = (Vec<(String, Tensor)>, Vec<f64>);

/// Runs `STEPS` steps on `plan.len()` ranks; rank r's micro-batches have sizes `plan[r]`,
/// taken from each step's batch in rank order.
fn run(
    cfg: &JobConfig,
    plan: &[Vec<i64>],
    make: &(dyn Fn() -> Box<dyn StepObjective> + Sync),
) -> Vec<Outcome> {
    run_steps(cfg, plan, make, STEPS)
}

fn run_steps(
    cfg: &JobConfig,
    plan: &[Vec<i64>],
    make: &(dyn Fn() -> Box<dyn StepObjective> + Sync),
    steps: u64,
) -> Vec<Outcome> {
    let group = LocalGroup::new(plan.len());
    std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .into_iter()
            .enumerate()
            .map(|(rank, coll)| {
                // Tensors are not Sync: every rank gets its own copy of the batches.
                let data = batches(cfg, steps);
                scope.spawn(move || {
                    tch::set_num_threads(1);
                    let model = model(cfg);
                    let mut opt = Sgd::new(model.named_parameters(), 0.9, 1e-3);
                    let mut objective = make();
                    let counts: Vec<i64> = plan.iter().map(|p| p.iter().sum()).collect();
                    assert_eq!(counts.iter().sum::<i64>(), SAMPLES);
                    let micro_ranges = support::micro_batch_ranges(plan, rank);
                    let mut losses = Vec::new();
                    for (step, (v1, v2)) in data.iter().enumerate() {
                        let micro = support::slice_micro_batches(v1, v2, &micro_ranges);
                        let clock = StepClock {
                            step: step as u64,
                            total_steps: 10,
                        };
                        let out = train_step(
                            &model,
                            &mut opt,
                            objective.as_mut(),
                            &micro,
                            if cfg.objective.kind == ObjectiveKind::Clip {
                                CLIP_LR
                            } else {
                                LR
                            },
                            &coll,
                            &counts,
                            clock,
                        )
                        .unwrap_or_else(|e| panic!("rank {}: {e:#}", coll.rank()));
                        assert_eq!(out.global_samples, SAMPLES);
                        losses.push(out.loss);
                    }
                    let vars = model
                        .named_variables()
                        .into_iter()
                        .map(|(n, t)| (n, t.detach().copy()))
                        .collect();
                    (vars, losses)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn assert_plans_match(
    kind: &str,
    cfg: &JobConfig,
    plans: &[Vec<Vec<i64>>],
    make: &(dyn Fn() -> Box<dyn StepObjective> + Sync),
) -> Vec<(String, Tensor)> {
    let reference = run(cfg, &[vec![SAMPLES]], make).remove(0);
    for plan in plans {
        for (rank, (vars, losses)) in run(cfg, plan, make).iter().enumerate() {
            for (l, r) in losses.iter().zip(&reference.1) {
                assert!(
                    (l - r).abs() < 1e-5,
                    "{kind} {plan:?} rank {rank}: loss {l} vs {r}"
                );
            }
            let (diff, name) = max_abs_diff(vars, &reference.0);
            println!("{kind} {plan:?} rank {rank}: max |Δ| {diff:.2e} ({name})");
            assert!(
                diff <= TOLERANCE,
                "{kind} {plan:?} rank {rank}: max |Δ| {diff} at {name}"
            );
        }
    }
    reference.0
}

fn plans() -> Vec<Vec<Vec<i64>>> {
    vec![
        vec![vec![2, 2, 2, 2]],          // K = 4 on one rank
        vec![vec![5], vec![3]],          // two ranks, uneven
        vec![vec![1], vec![0], vec![7]], // three ranks, one empty
        vec![vec![2, 3], vec![0, 3]],    // accumulation on two ranks with an empty micro-batch
    ]
}

fn var<'a>(vars: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &vars
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1
}

#[test]
fn moco_split_over_ranks_and_micro_batches_equals_one_rank() {
    let cfg = config("moco");
    let make = || build_objective(&cfg);
    let after = assert_plans_match("moco", &cfg, &plans(), &make);
    // The comparison means something only if the steps moved the key encoder and the queue.
    let initial = seeded(5, || {
        ContrastiveModel::build(&cfg, Device::Cpu, BuildOptions::default()).unwrap()
    })
    .named_variables();
    for name in ["conv1.weight", "momentum.conv1.weight", "momentum.queue"] {
        let moved = (var(&after, name) - var(&initial, name))
            .abs()
            .max()
            .double_value(&[]);
        assert!(moved > 1e-4, "{name} moved only {moved}");
    }
    // 2 steps × 2 views × 8 samples = 32 keys went into a queue of 24: it wrapped once.
    assert_eq!(var(&after, "momentum.queue_next").double_value(&[0]), 8.0);
}

#[test]
fn moco_shuffle_bn_puts_keys_back_in_place() {
    let cfg = config("moco");
    // Shuffled key computation, which GroupNorm makes invisible in the result.
    let make = || -> Box<dyn StepObjective> { Box::new(Moco::new(0.2, 0.9, true, 2, 16, 3)) };
    assert_plans_match("moco+shuffle", &cfg, &plans(), &make);
}

#[test]
fn swav_split_over_ranks_and_micro_batches_equals_one_rank() {
    let cfg = config("swav");
    let make = || build_objective(&cfg);
    let after = assert_plans_match("swav", &cfg, &plans(), &make);
    let initial = seeded(5, || {
        ContrastiveModel::build(&cfg, Device::Cpu, BuildOptions::default()).unwrap()
    })
    .named_variables();
    let moved = (var(&after, "prototypes.weight") - var(&initial, "prototypes.weight"))
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        moved > 1e-4,
        "prototypes moved only {moved} after unfreezing"
    );
}

/// While frozen the optimizer leaves the prototypes alone entirely (value and momentum), even
/// with weight decay; the rest of the network trains.
#[test]
fn swav_frozen_prototypes_do_not_move() {
    let mut cfg = config("swav");
    cfg.objective.swav.freeze_prototypes_steps = 5;
    let make = || -> Box<dyn StepObjective> { Box::new(Swav::new(0.1, 0.05, 3, 5, 0)) };
    let (after, _) = run(&cfg, &[vec![SAMPLES]], &make).remove(0);
    let initial = seeded(5, || {
        ContrastiveModel::build(&cfg, Device::Cpu, BuildOptions::default()).unwrap()
    })
    .named_variables();
    let diff = |name: &str| {
        (var(&after, name) - var(&initial, name))
            .abs()
            .max()
            .double_value(&[])
    };
    // Only the re-normalisation before each forward touches them (rounding of unit rows).
    assert!(
        diff("prototypes.weight") < 1e-6,
        "{}",
        diff("prototypes.weight")
    );
    assert!(diff("conv1.weight") > 1e-4);
}

/// The two ranks of a MoCo job keep identical queues and key encoders (every rank enqueues
/// every rank's keys).
#[test]
fn moco_ranks_stay_identical() {
    let cfg = config("moco");
    let make = || build_objective(&cfg);
    let out = run(&cfg, &[vec![5], vec![3]], &make);
    let (diff, name) = max_abs_diff(&out[0].0, &out[1].0);
    assert_eq!(diff, 0.0, "ranks differ at {name}");
}

/// With a queue, the codes of a step once every rank's queue is full take the queued features
/// into account: the loss of the third step differs from a run without a queue, while the
/// first two (queue still filling) are identical.
#[test]
fn swav_queue_joins_once_full() {
    let cfg = config("swav");
    let with_queue = || -> Box<dyn StepObjective> { Box::new(Swav::new(0.1, 0.05, 3, 0, 6)) };
    let without = || -> Box<dyn StepObjective> { Box::new(Swav::new(0.1, 0.05, 3, 0, 0)) };
    let a = run_steps(&cfg, &[vec![5], vec![3]], &with_queue, 3);
    let b = run_steps(&cfg, &[vec![5], vec![3]], &without, 3);
    let (la, lb) = (&a[0].1, &b[0].1);
    assert_eq!(la[..2], lb[..2], "the queue must not be used while filling");
    assert!(
        (la[2] - lb[2]).abs() > 1e-6,
        "queue changed nothing: {la:?} vs {lb:?}"
    );
}

fn clip_config() -> JobConfig {
    let mut cfg = config("clip");
    cfg.model.encoder = EncoderKind::Vit;
    cfg.model.vit.patch_size = 8;
    cfg.model.vit.width = 16;
    cfg.model.vit.layers = 1;
    cfg.model.vit.heads = 2;
    cfg.model.text.context_length = 8;
    cfg.model.text.width = 16;
    cfg.model.text.layers = 1;
    cfg.model.text.heads = 2;
    cfg
}

/// CLIP with a BERT text tower (`model.text.kind = "bert"`, mean pooling, the byte
/// tokenizer's pad masked) split over ranks and micro-batches equals one rank; the BERT's
/// blocks and its projection train.
#[test]
fn clip_with_a_bert_text_tower_split_over_ranks_equals_one_rank() {
    let mut cfg = clip_config();
    cfg.model.text.kind = contrail_common::config::TextKind::Bert;
    cfg.model.text.pooling = contrail_common::config::TextPooling::Mean;
    cfg.model.text.max_positions = 8;
    cfg.validate().unwrap();
    let make = || build_objective(&cfg);
    let after = assert_plans_match("clip-bert", &cfg, &plans(), &make);
    let initial = model(&cfg).named_variables();
    for name in [
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.0.output.LayerNorm.weight",
        "text_projection",
    ] {
        let moved = (var(&after, name) - var(&initial, name))
            .abs()
            .max()
            .double_value(&[]);
        assert!(moved > 1e-6, "{name} moved only {moved}");
    }
}

/// CLIP with LoRA adapters (`[model.adapters]`) split over ranks and micro-batches equals one
/// rank; the adapters train and every base weight of every rank is untouched (frozen weights
/// get no gradient, so the all-reduce never carries them).
#[test]
fn clip_with_lora_adapters_split_over_ranks_equals_one_rank() {
    let mut cfg = clip_config();
    cfg.model.adapters.rank = 2;
    cfg.validate().unwrap();
    let make = || build_objective(&cfg);
    let after = assert_plans_match("clip-lora", &cfg, &plans(), &make);
    let initial = model(&cfg).named_variables();
    let mut adapters_moved = 0;
    for (name, before) in &initial {
        let moved = (var(&after, name) - before).abs().max().double_value(&[]);
        if name.ends_with(".lora_b") {
            adapters_moved += usize::from(moved > 1e-7);
        } else if !name.ends_with(".lora_a") && name != "logit_scale" {
            assert_eq!(moved, 0.0, "{name} is frozen but moved");
        }
    }
    assert!(adapters_moved > 0, "no adapter trained");
}

/// CLIP (ViT image tower, causal text tower, learnable logit scale) split over 2 and 3 ranks
/// and over K = 4 micro-batches equals one rank with the whole batch, over two steps.
#[test]
fn clip_split_over_ranks_and_micro_batches_equals_one_rank() {
    let cfg = clip_config();
    cfg.validate().unwrap();
    let make = || build_objective(&cfg);
    let after = assert_plans_match("clip", &cfg, &plans(), &make);
    let initial = model(&cfg).named_variables();
    for name in [
        "visual.conv1.weight",
        "token_embedding.weight",
        "logit_scale",
    ] {
        let moved = (var(&after, name) - var(&initial, name))
            .abs()
            .max()
            .double_value(&[]);
        assert!(moved > 1e-6, "{name} moved only {moved}");
    }
}
