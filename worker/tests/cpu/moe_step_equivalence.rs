//! Whole training steps of models with MoE blocks, split over ranks (experts spread over
//! them) and micro-batches, must give what one rank holding every expert gives with the whole
//! batch: every rank's variables (its own experts included) match the single rank's.
//!
//! Routing is per token only without capacity dropping (capacity counts a worker's tokens)
//! and without jitter, and the auxiliary losses are per forward pass; so the exact comparison
//! runs dropless with the auxiliary coefficients at 0 — `moe_expert_parallel.rs` checks
//! dropping and the auxiliary gradients at the layer level. The plans include ranks without
//! samples and ranks with fewer micro-batches than others: they must still serve their
//! experts in every pass (idle passes), or the others would wait forever.

use contrail_test_support as support;

use contrail_common::config::{EncoderKind, ObjectiveKind};
use contrail_common::experts::{BlockPlacement, ExpertPlacement};
use contrail_common::JobConfig;
use contrail_worker::dist::local::LocalGroup;
use contrail_worker::dist::Collective;
use contrail_worker::model::{BuildOptions, ContrastiveModel};
use contrail_worker::objective::build_objective;
use contrail_worker::optim;
use contrail_worker::tokenize::ByteTokenizer;
use contrail_worker::train::rebalance::move_experts;
use contrail_worker::train::restore;
use contrail_worker::train::step::{train_step, StepClock};
use std::collections::BTreeMap;
use std::sync::Arc;
use support::{model_config, seeded};
use tch::{Device, Tensor};

const SAMPLES: i64 = 8;
const STEPS: u64 = 2;
const TOLERANCE: f64 = 1e-5;

fn config(kind: &str) -> JobConfig {
    let mut cfg = JobConfig {
        model: model_config(),
        ..Default::default()
    };
    cfg.data.image_size = 16;
    cfg.model.encoder = EncoderKind::Vit;
    cfg.model.vit.patch_size = 8;
    cfg.model.vit.width = 16;
    cfg.model.vit.layers = 2;
    cfg.model.vit.heads = 2;
    cfg.objective.kind = kind.parse().unwrap();
    cfg.optim.momentum = 0.9;
    cfg.optim.weight_decay = 1e-3;
    cfg.moe.experts = 4;
    cfg.moe.vit_blocks = vec![1];
    cfg.moe.top_k = 2;
    cfg.moe.dropless = true;
    cfg.moe.balance_loss_coef = 0.0;
    cfg.moe.z_loss_coef = 0.0;
    if kind == "clip" {
        cfg.model.text.context_length = 8;
        cfg.model.text.width = 16;
        cfg.model.text.layers = 2;
        cfg.model.text.heads = 2;
        cfg.moe.vit_blocks = vec![0];
        cfg.moe.text_blocks = vec![1];
    }
    cfg
}

fn batches(cfg: &JobConfig) -> Vec<(Tensor, Tensor)> {
    support::step_batches(
        cfg.objective.kind == ObjectiveKind::Clip,
        STEPS,
        SAMPLES,
        6,
        0,
    )
}

/// Every rank's variables after `STEPS` steps, rank r's micro-batches sized `plan[r]`.
fn run(cfg: &JobConfig, plan: &[Vec<i64>]) -> Vec<BTreeMap<String, Tensor>> {
    run_moving_experts(cfg, plan, None)
}

/// [`run`], moving the experts to `placement` after the first step when it is given.
fn run_moving_experts(
    cfg: &JobConfig,
    plan: &[Vec<i64>],
    placement: Option<&ExpertPlacement>,
) -> Vec<BTreeMap<String, Tensor>> {
    let group = LocalGroup::new(plan.len());
    let lr = if cfg.objective.kind == ObjectiveKind::Clip {
        0.05
    } else {
        0.5
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .into_iter()
            .enumerate()
            .map(|(rank, coll)| {
                let data = batches(cfg);
                scope.spawn(move || {
                    tch::set_num_threads(1);
                    let coll: Arc<dyn Collective> = Arc::new(coll);
                    let build = |p: Option<ExpertPlacement>| {
                        let opts = BuildOptions {
                            tokenizer: Some(&ByteTokenizer::new()),
                            experts: Some((coll.clone(), p)),
                        };
                        ContrastiveModel::build(cfg, Device::Cpu, opts)
                    };
                    let mut model = seeded(5, || build(None).unwrap());
                    let mut opt = optim::build(&cfg.optim, model.named_parameters());
                    let mut objective = build_objective(cfg);
                    let counts: Vec<i64> = plan.iter().map(|p| p.iter().sum()).collect();
                    let ranges = support::micro_batch_ranges(plan, rank);
                    for (step, (v1, v2)) in data.iter().enumerate() {
                        let micro = support::slice_micro_batches(v1, v2, &ranges);
                        let clock = StepClock {
                            step: step as u64,
                            total_steps: 10,
                        };
                        if let (1, Some(p)) = (step, placement) {
                            // Under the RNG lock: building draws initial values (then
                            // overwritten), which must not disturb other tests' draws.
                            move_experts(&mut model, &mut opt, p.clone(), &cfg.optim, &mut |p| {
                                seeded(0, || build(Some(p)))
                            })
                            .unwrap_or_else(|e| panic!("rank {rank}: {e:#}"));
                            assert_eq!(model.moe().unwrap().placement(), p);
                        }
                        let out = train_step(
                            &model,
                            opt.as_mut(),
                            objective.as_mut(),
                            &micro,
                            lr,
                            coll.as_ref(),
                            &counts,
                            clock,
                        )
                        .unwrap_or_else(|e| panic!("rank {rank}: {e:#}"));
                        assert_eq!(out.expert_load.len(), cfg.moe.block_count());
                        for l in &out.expert_load {
                            // Every sample's tokens, k = 2 assignments each, over all ranks.
                            let routed: i64 = l.routed.iter().sum();
                            assert!(routed > 0 && routed % (2 * SAMPLES) == 0, "{routed}");
                            assert_eq!(l.dropped, 0, "dropless");
                        }
                    }
                    model
                        .named_variables()
                        .into_iter()
                        .map(|(n, t)| (n, t.detach().copy()))
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn assert_plans_match(kind: &str, plans: &[Vec<Vec<i64>>]) {
    assert_runs_match(&config(kind), plans, None);
}

/// Every plan's ranks end with the single rank's variables (experts compared by global id).
fn assert_runs_match(
    cfg: &JobConfig,
    plans: &[Vec<Vec<i64>>],
    placement: Option<&ExpertPlacement>,
) {
    let kind = cfg.objective.kind.as_str();
    let cfg = cfg.clone();
    let reference = run(&cfg, &[vec![SAMPLES]]).remove(0);
    let initial = seeded(5, || {
        ContrastiveModel::build(
            &cfg,
            Device::Cpu,
            BuildOptions {
                tokenizer: Some(&ByteTokenizer::new()),
                ..Default::default()
            },
        )
        .unwrap()
    });
    let moved = initial
        .named_variables()
        .iter()
        .map(|(n, t)| (t - &reference[n]).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(moved > 1e-3, "{kind}: training must move the parameters");
    for plan in plans {
        for (rank, vars) in run_moving_experts(&cfg, plan, placement).iter().enumerate() {
            let held: usize = match placement {
                Some(p) => p
                    .blocks
                    .iter()
                    .map(|b| b.local_experts(rank as u32).len())
                    .sum(),
                None => cfg.moe.block_count() * (cfg.moe.experts as usize / plan.len()).max(1),
            };
            let experts = vars.keys().filter(|n| n.contains(".moe.experts.")).count();
            assert_eq!(
                experts,
                4 * held,
                "{kind} {plan:?} rank {rank}: 4 tensors for each expert it holds"
            );
            let mut worst = (0.0, String::new());
            for (name, t) in vars {
                let d = (t - &reference[name]).abs().max().double_value(&[]);
                if d > worst.0 {
                    worst = (d, name.clone());
                }
            }
            println!(
                "{kind} {plan:?} rank {rank}: max |Δ| {:.2e} ({})",
                worst.0, worst.1
            );
            assert!(
                worst.0 <= TOLERANCE,
                "{kind} {plan:?} rank {rank}: max |Δ| {} at {}",
                worst.0,
                worst.1
            );
        }
    }
}

#[test]
fn simclr_vit_with_experts_spread_over_ranks_matches_one_rank() {
    assert_plans_match(
        "simclr",
        &[
            vec![vec![5], vec![3]],                   // 2 experts per rank
            vec![vec![0], vec![8]],                   // an idle rank serves its experts
            vec![vec![3], vec![2, 3]],                // an idle pass during accumulation
            vec![vec![2], vec![2], vec![0], vec![4]], // one expert per rank
        ],
    );
}

#[test]
fn resnet_with_a_mixture_of_experts_projector_matches_one_rank() {
    let mut cfg = config("simclr");
    cfg.model.encoder = EncoderKind::Resnet;
    cfg.moe.vit_blocks.clear();
    cfg.moe.projector = true;
    assert_runs_match(
        &cfg,
        &[
            vec![vec![5], vec![3]],
            vec![vec![0], vec![8]],
            vec![vec![3], vec![2, 3]],
            vec![vec![2], vec![2], vec![0], vec![4]],
        ],
        None,
    );
}

#[test]
fn clip_with_experts_in_both_towers_matches_one_rank() {
    assert_plans_match("clip", &[vec![vec![3], vec![0, 5]], vec![vec![6], vec![2]]]);
}

#[test]
fn moving_experts_between_steps_changes_only_where_they_live() {
    // 4 experts on 2 ranks: each expert changes rank, weights and momentum with it.
    let swap = ExpertPlacement {
        version: 2,
        blocks: vec![BlockPlacement {
            holders: vec![vec![1], vec![0], vec![1], vec![0]],
        }],
    };
    assert_runs_match(&config("simclr"), &[vec![vec![5], vec![3]]], Some(&swap));
    // 2 experts on 4 ranks: expert 0 goes from 2 replicas to 3, expert 1 from 2 to 1.
    let mut cfg = config("simclr");
    cfg.moe.experts = 2;
    let hot = ExpertPlacement {
        version: 2,
        blocks: vec![BlockPlacement {
            holders: vec![vec![0, 1, 2], vec![3]],
        }],
    };
    assert_runs_match(
        &cfg,
        &[vec![vec![2], vec![3], vec![0], vec![3]]],
        Some(&hot),
    );
}

/// A worker dies after the first step: the survivors take the experts it held from their
/// surviving replicas (`train::restore`) onto a placement in their new ranks, and the second
/// step, on the 3 left, ends where one rank with the whole batch ends. Two placements: the
/// coordinator's (each expert stays where it survived, nothing travels) and one where every
/// survivor receives an expert it did not hold.
#[test]
fn survivors_take_a_dead_ranks_experts_from_replicas_and_match_one_rank() {
    let mut cfg = config("simclr");
    cfg.moe.experts = 2;
    let reference = run(&cfg, &[vec![SAMPLES]]).remove(0);
    // Spread over 4: expert 0 on {0, 2}, expert 1 on {1, 3}. Rank 1 dies; old ranks 0, 2, 3
    // become 0, 1, 2.
    let survivors = [0u32, 2, 3];
    let kept = BlockPlacement::spread(2, 4).keep_ranks(&survivors).unwrap();
    let moved = BlockPlacement {
        holders: vec![vec![2], vec![0, 1]],
    };
    for target in [kept, moved] {
        let placement = ExpertPlacement {
            version: 2,
            blocks: vec![target.clone()],
        };
        let before: Vec<Vec<i64>> = vec![vec![2], vec![3], vec![0], vec![3]];
        let after: Vec<Vec<i64>> = vec![vec![3], vec![1], vec![4]];
        // All survivors committed the first step: each holds its old experts usably.
        let usable = vec![
            vec![vec![true, false]],
            vec![vec![true, false]],
            vec![vec![false, true]],
        ];
        let group_after =
            std::sync::Mutex::new(LocalGroup::new(3).into_iter().map(Some).collect::<Vec<_>>());
        let results: Vec<Option<BTreeMap<String, Tensor>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = LocalGroup::new(4)
                .into_iter()
                .enumerate()
                .map(|(rank, coll)| {
                    let (cfg, data) = (&cfg, batches(&cfg));
                    let (before, after, usable) = (&before, &after, &usable);
                    let (placement, group_after) = (&placement, &group_after);
                    scope.spawn(move || {
                        tch::set_num_threads(1);
                        let build = |coll: Arc<dyn Collective>, p: Option<ExpertPlacement>| {
                            let opts = BuildOptions {
                                tokenizer: Some(&ByteTokenizer::new()),
                                experts: Some((coll, p)),
                            };
                            ContrastiveModel::build(cfg, Device::Cpu, opts)
                        };
                        let step = |model: &ContrastiveModel,
                                    opt: &mut dyn optim::Optimizer,
                                    coll: &dyn Collective,
                                    plan: &[Vec<i64>],
                                    rank: usize,
                                    i: usize| {
                            let counts: Vec<i64> = plan.iter().map(|p| p.iter().sum()).collect();
                            let ranges = support::micro_batch_ranges(plan, rank);
                            let (v1, v2) = &data[i];
                            let micro = support::slice_micro_batches(v1, v2, &ranges);
                            let clock = StepClock {
                                step: i as u64,
                                total_steps: 10,
                            };
                            train_step(
                                model,
                                opt,
                                build_objective(cfg).as_mut(),
                                &micro,
                                0.5,
                                coll,
                                &counts,
                                clock,
                            )
                            .unwrap_or_else(|e| panic!("rank {rank} step {i}: {e:#}"));
                        };
                        let coll: Arc<dyn Collective> = Arc::new(coll);
                        let model = seeded(5, || build(coll.clone(), None).unwrap());
                        let mut opt = optim::build(&cfg.optim, model.named_parameters());
                        step(&model, opt.as_mut(), coll.as_ref(), before, rank, 0);
                        let new_rank = survivors.iter().position(|&r| r as usize == rank)?;
                        let held = restore::held_experts(&model, 2).unwrap();
                        assert_eq!(held, usable[new_rank], "old rank {rank} holds its spread");
                        let next: Arc<dyn Collective> =
                            Arc::new(group_after.lock().unwrap()[new_rank].take().unwrap());
                        let restored = restore::restore_experts(
                            next.as_ref(),
                            &model,
                            opt.as_ref(),
                            usable,
                            0,
                            placement.clone(),
                            &cfg.optim,
                            &mut |p| seeded(0, || build(next.clone(), Some(p))),
                        )
                        .unwrap_or_else(|e| panic!("rank {new_rank}: {e:#}"));
                        let restore::Restored::Ready(model, mut opt) = restored else {
                            panic!("every expert has a usable replica");
                        };
                        let model = *model;
                        assert_eq!(model.moe().unwrap().placement(), placement);
                        step(&model, opt.as_mut(), next.as_ref(), after, new_rank, 1);
                        Some(
                            model
                                .named_variables()
                                .into_iter()
                                .map(|(n, t)| (n, t.detach().copy()))
                                .collect(),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let survivors_vars: Vec<_> = results.into_iter().flatten().collect();
        assert_eq!(survivors_vars.len(), 3);
        for (rank, vars) in survivors_vars.iter().enumerate() {
            let experts = vars.keys().filter(|n| n.contains(".moe.experts.")).count();
            assert_eq!(experts, 4 * target.local_experts(rank as u32).len());
            for (name, t) in vars {
                let d = (t - &reference[name]).abs().max().double_value(&[]);
                assert!(d <= TOLERANCE, "{target:?} rank {rank}: |Δ| {d} at {name}");
            }
        }
    }
}

/// No survivor holds expert 1 at the agreed step (its replicas stopped a step behind): the
/// restore says so and leaves everything as it was.
#[test]
fn an_expert_without_a_usable_replica_is_not_restored() {
    let mut cfg = config("simclr");
    cfg.moe.experts = 2;
    let placement = ExpertPlacement {
        version: 2,
        blocks: vec![BlockPlacement::spread(2, 2)],
    };
    let outcomes: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = LocalGroup::new(2)
            .into_iter()
            .map(|coll| {
                let (cfg, placement) = (&cfg, &placement);
                scope.spawn(move || {
                    let coll: Arc<dyn Collective> = Arc::new(coll);
                    let model = seeded(5, || {
                        let opts = BuildOptions {
                            tokenizer: None,
                            experts: Some((coll.clone(), None)),
                        };
                        ContrastiveModel::build(cfg, Device::Cpu, opts).unwrap()
                    });
                    let opt = optim::build(&cfg.optim, model.named_parameters());
                    let usable = vec![vec![vec![true, false]], vec![vec![false, false]]];
                    let restored = restore::restore_experts(
                        coll.as_ref(),
                        &model,
                        opt.as_ref(),
                        &usable,
                        0,
                        placement.clone(),
                        &cfg.optim,
                        &mut |_| panic!("nothing is rebuilt"),
                    )
                    .unwrap();
                    matches!(restored, restore::Restored::ExpertsBehind(why) if why.contains("expert 1"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(outcomes, vec![true, true]);
}
