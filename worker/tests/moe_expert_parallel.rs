//! Expert parallelism across real processes: two stacked MoE blocks (behind a dense layer, so
//! gradients must cross both exchange cuts into an earlier segment) with E experts spread over
//! W TCP ranks must give each rank the outputs, and every parameter the gradient, that one
//! process holding all E experts computes for the same token groups (capacity is per worker,
//! so the reference routes each rank's group on its own). Ranks hold uneven token counts,
//! one none at all.
//!
//! Each child rank builds the reference itself (a one-rank runtime) from the same seed, so it
//! also checks that expert e starts with the same values whichever rank holds it.

mod support;

use contrail_worker::dist::local::LocalGroup;
use contrail_worker::dist::Collective;
use contrail_worker::moe::ExpertInit;
use contrail_worker::moe::{is_expert_param, MoeFeedForward, MoeRuntime, MoeSettings, Pass};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use support::ranks::{assert_all_succeeded, child_env, rendezvous, run_ranks};
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

const WIDTH: i64 = 8;
const HIDDEN: i64 = 12;
const TOLERANCE: f64 = 1e-5;

fn run(scenario: &str, world: usize) {
    assert_all_succeeded(&run_ranks("moe_rank_child", scenario, world));
}

#[test]
fn two_workers_top1_with_dropping() {
    run("e4-k1-drop", 2);
}

#[test]
fn two_workers_top2_with_dropping() {
    run("e4-k2-drop", 2);
}

#[test]
fn two_workers_top1_and_top2_dropless() {
    run("e4-k1-dropless", 2);
    run("e4-k2-dropless", 2);
}

#[test]
fn four_workers_one_expert_each() {
    run("e4-k1-drop", 4);
    run("e4-k2-dropless", 4);
}

#[test]
fn four_workers_two_experts_each_top2_dropping() {
    run("e8-k2-drop", 4);
}

#[test]
fn four_workers_replicated_experts() {
    // E = 2 < W = 4: every expert on two ranks, gradients summed over the replicas.
    run("e2-k2-drop", 4);
    run("e2-k1-dropless", 4);
}

// ---------------------------------------------------------------------------------------------
// Child side.

struct Scenario {
    experts: u32,
    top_k: usize,
    dropping: bool,
}

fn parse(s: &str) -> Scenario {
    let parts: Vec<&str> = s.split('-').collect();
    Scenario {
        experts: parts[0][1..].parse().expect("experts"),
        top_k: parts[1][1..].parse().expect("top_k"),
        dropping: parts[2] == "drop",
    }
}

fn settings(s: &Scenario) -> MoeSettings {
    MoeSettings {
        experts: s.experts,
        top_k: s.top_k,
        capacity_factor: 0.6,
        eval_capacity_factor: 0.0,
        min_capacity: 0,
        dropless: !s.dropping,
        jitter: 0.0,
        // Larger than the defaults so the auxiliary gradients are far above the tolerance.
        balance_loss_coef: 0.1,
        z_loss_coef: 0.01,
    }
}

/// Tokens per rank: uneven, and rank 1 has none.
fn token_counts(world: usize) -> Vec<i64> {
    (0..world)
        .map(|r| if r == 1 { 0 } else { 9 + 5 * r as i64 })
        .collect()
}

/// dense → MoE block 0 → MoE block 1.
struct Net {
    vs: nn::VarStore,
    pre: Tensor,
    ln: Vec<nn::LayerNorm>,
    moe: Vec<MoeFeedForward>,
}

fn build(runtime: &Arc<MoeRuntime>) -> Net {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let pre = root.var(
        "pre",
        &[WIDTH, WIDTH],
        Init::Randn {
            mean: 0.0,
            stdev: 0.4,
        },
    );
    let init = ExpertInit {
        fc_weight: Init::Randn {
            mean: 0.0,
            stdev: 0.3,
        },
        fc_bias: Init::Randn {
            mean: 0.0,
            stdev: 0.1,
        },
        proj_weight: Init::Randn {
            mean: 0.0,
            stdev: 0.3,
        },
        proj_bias: Init::Randn {
            mean: 0.0,
            stdev: 0.1,
        },
    };
    let mut ln = Vec::new();
    let mut moe = Vec::new();
    for b in 0..2 {
        let p = &root / format!("b{b}");
        ln.push(nn::layer_norm(&p / "ln", vec![WIDTH], Default::default()));
        moe.push(MoeFeedForward::new(&(&p / "moe"), runtime, WIDTH, HIDDEN, init).unwrap());
    }
    // The gate starts larger than its default so routing is decisive and drops happen.
    tch::no_grad(|| {
        for (n, t) in vs.variables() {
            if n.ends_with("gate.weight") {
                let _ = t.shallow_clone().g_mul_scalar_(4.0);
            }
        }
    });
    Net { vs, pre, ln, moe }
}

impl Net {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.matmul(&self.pre);
        for (ln, moe) in self.ln.iter().zip(&self.moe) {
            h = moe.forward_residual(&h, ln);
        }
        h
    }

    fn grads(&self) -> BTreeMap<String, Tensor> {
        self.vs
            .variables()
            .into_iter()
            .map(|(n, p)| {
                let g = p.grad();
                let g = if g.defined() {
                    g.copy()
                } else {
                    p.zeros_like()
                };
                (n, g)
            })
            .collect()
    }
}

fn group_inputs(world: usize) -> Vec<(Tensor, Tensor)> {
    token_counts(world)
        .into_iter()
        .enumerate()
        .map(|(r, n)| {
            tch::manual_seed(100 + r as i64);
            let x = Tensor::randn([n, WIDTH], (Kind::Float, Device::Cpu));
            let w = Tensor::randn([n, WIDTH], (Kind::Float, Device::Cpu));
            (x, w)
        })
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    if a.numel() == 0 {
        return 0.0;
    }
    (a - b).abs().max().double_value(&[])
}

/// One training pass over `x` with loss sum(out · w) + the auxiliary losses.
fn train_pass(runtime: &MoeRuntime, net: &Net, x: &Tensor, w: &Tensor, share: f64) -> Tensor {
    runtime.begin_pass(Pass {
        train: true,
        record: true,
        count_load: true,
        aux_weight: share,
    });
    let out = net.forward(x);
    runtime.backward(&(&out * w).sum(Kind::Float)).unwrap();
    out.detach()
}

#[test]
fn moe_rank_child() {
    let Some(env) = child_env() else {
        return;
    };
    tch::set_num_threads(1);
    let scenario = parse(&env.scenario);
    let (rank, world) = (env.rank, env.world);
    let groups = group_inputs(world);
    let total: i64 = token_counts(world).iter().sum();

    // Reference: one process holding every expert, each rank's group routed on its own.
    let single: Arc<dyn Collective> = Arc::new(LocalGroup::new(1).pop().unwrap());
    let ref_rt = MoeRuntime::spread(single, settings(&scenario), 2).unwrap();
    let ref_net = build(&ref_rt);
    let ref_init: BTreeMap<String, Tensor> = ref_net
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect();
    let mut ref_out = Vec::new();
    for (x, w) in &groups {
        let share = x.size()[0] as f64 / total as f64;
        ref_out.push(train_pass(&ref_rt, &ref_net, x, w, share));
    }
    let ref_grads = ref_net.grads();
    let ref_load = ref_rt.take_load();
    let dropped: i64 = ref_load.iter().map(|l| l.dropped).sum();
    if scenario.dropping {
        assert!(dropped > 0, "the dropping scenario must drop assignments");
    } else {
        assert_eq!(dropped, 0, "dropless dropped assignments");
    }

    // Expert parallel.
    let coll: Arc<dyn Collective> =
        Arc::new(rendezvous(&env.dir, rank, world, Duration::from_secs(60)));
    let rt = MoeRuntime::spread(coll.clone(), settings(&scenario), 2).unwrap();
    let net = build(&rt);
    for (name, t) in net.vs.variables() {
        assert_eq!(
            max_diff(&t, &ref_init[&name]),
            0.0,
            "rank {rank}: {name} starts differently from the one-process model"
        );
    }
    let (x, w) = &groups[rank];
    let out = train_pass(&rt, &net, x, w, x.size()[0] as f64 / total as f64);
    let d = max_diff(&out, &ref_out[rank]);
    assert!(d <= TOLERANCE, "rank {rank}: outputs differ by {d}");

    // Data-parallel sum of the shared parameters, replica sum of the experts.
    let mut grads = net.grads();
    for (name, g) in grads.iter_mut() {
        if !is_expert_param(name) {
            coll.all_reduce_sum(g).unwrap();
        }
    }
    let named: Vec<(String, Tensor)> = net.vs.variables().into_iter().collect();
    for (name, p) in &named {
        if !p.grad().defined() {
            // A rank without tokens never reached its experts' parameters.
            (p * 0.0).sum(Kind::Float).backward();
            assert!(
                is_expert_param(name) || x.size()[0] == 0,
                "{name} has no gradient"
            );
        }
    }
    rt.sync_expert_grads(&named).unwrap();
    for (name, p) in &named {
        let g = if is_expert_param(name) {
            p.grad()
        } else {
            grads[name].shallow_clone()
        };
        let d = max_diff(&g, &ref_grads[name]);
        let scale = ref_grads[name].abs().max().double_value(&[]);
        println!("rank {rank}: {name}: |grad| max {scale:.3e}, diff {d:.3e}");
        assert!(
            d <= TOLERANCE,
            "rank {rank}: gradient of {name} differs by {d}"
        );
    }
    let experts_here = named.iter().filter(|(n, _)| is_expert_param(n)).count();
    assert!(experts_here > 0, "rank {rank} holds no expert");

    // The load every rank counted adds up to the reference's.
    for (b, l) in rt.take_load().into_iter().enumerate() {
        let mut routed = Tensor::from_slice(&l.routed);
        coll.all_reduce_sum(&mut routed).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(&routed).unwrap(),
            ref_load[b].routed,
            "block {b} load"
        );
    }
}
