//! Expert parallelism across real processes: two stacked MoE blocks (behind a dense layer, so
//! gradients must cross both exchange cuts into an earlier segment) with E experts spread over
//! W TCP ranks must give each rank the outputs, and every parameter the gradient, that one
//! process holding all E experts computes for the same token groups (capacity is per worker,
//! so the reference routes each rank's group on its own). Ranks hold uneven token counts,
//! one none at all.
//!
//! Each child rank builds the reference itself (a one-rank runtime) from the same seed, so it
//! also checks that expert e starts with the same values whichever rank holds it.
//!
//! On a GPU machine the same scenarios also run with every tensor on the GPU: two processes
//! share it over the TCP backend with host staging (NCCL refuses two ranks on one GPU), so the
//! exchange, the explicit backward and the expert kernels run on CUDA tensors.

use contrail_test_support as support;

use contrail_common::experts::{max_mean_ratio, BlockPlacement, ExpertPlacement};
use contrail_coordinator::experts::plan_placement;
use contrail_worker::dist::local::LocalGroup;
use contrail_worker::dist::staged::HostStaged;
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
/// On a GPU the one-process reference and the ranks run their experts' matmuls on differently
/// shaped batches, so kernels round differently.
const GPU_TOLERANCE: f64 = 1e-4;

fn run(scenario: &str, world: usize) {
    assert_all_succeeded(&run_ranks(
        "moe_expert_parallel::moe_rank_child",
        scenario,
        world,
    ));
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

#[test]
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn two_workers_on_one_gpu() {
    support::gpu::cuda();
    run("e4-k2-drop-cuda", 2);
    run("e4-k1-dropless-cuda", 2);
    run("e2-k2-drop-cuda", 4);
}

// ---------------------------------------------------------------------------------------------
// Child side.

struct Scenario {
    experts: u32,
    top_k: usize,
    dropping: bool,
    device: Device,
}

/// `e<experts>-k<top_k>-drop|dropless[-cuda]`.
fn parse(s: &str) -> Scenario {
    let parts: Vec<&str> = s.split('-').collect();
    Scenario {
        experts: parts[0][1..].parse().expect("experts"),
        top_k: parts[1][1..].parse().expect("top_k"),
        dropping: parts[2] == "drop",
        device: match parts.get(3) {
            Some(&"cuda") => Device::Cuda(0),
            _ => Device::Cpu,
        },
    }
}

/// Routing without jitter or a capacity minimum; dropless unless `capacity_factor` is given;
/// no auxiliary losses.
fn routing(experts: u32, top_k: usize, capacity_factor: Option<f64>) -> MoeSettings {
    MoeSettings {
        experts,
        top_k,
        capacity_factor: capacity_factor.unwrap_or(1.0),
        eval_capacity_factor: 0.0,
        min_capacity: 0,
        dropless: capacity_factor.is_none(),
        jitter: 0.0,
        balance_loss_coef: 0.0,
        z_loss_coef: 0.0,
    }
}

fn settings(s: &Scenario) -> MoeSettings {
    MoeSettings {
        // Larger than the defaults so the auxiliary gradients are far above the tolerance.
        balance_loss_coef: 0.1,
        z_loss_coef: 0.01,
        ..routing(s.experts, s.top_k, s.dropping.then_some(0.6))
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

/// Built on the CPU (CUDA's generator draws other numbers), then moved to `device`.
fn build(runtime: &Arc<MoeRuntime>, device: Device) -> Net {
    tch::manual_seed(7);
    let mut vs = nn::VarStore::new(Device::Cpu);
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
    // The modules hold shallow clones of the variables, which follow them to the device.
    vs.set_device(device);
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

fn group_inputs(world: usize, device: Device) -> Vec<(Tensor, Tensor)> {
    token_counts(world)
        .into_iter()
        .enumerate()
        .map(|(r, n)| {
            tch::manual_seed(100 + r as i64);
            let x = Tensor::randn([n, WIDTH], (Kind::Float, Device::Cpu));
            let w = Tensor::randn([n, WIDTH], (Kind::Float, Device::Cpu));
            (x.to_device(device), w.to_device(device))
        })
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    if a.numel() == 0 {
        return 0.0;
    }
    (a - b.to_device(a.device())).abs().max().double_value(&[])
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
    let device = scenario.device;
    let tolerance = if device.is_cuda() {
        GPU_TOLERANCE
    } else {
        TOLERANCE
    };
    let (rank, world) = (env.rank, env.world);
    let groups = group_inputs(world, device);
    let total: i64 = token_counts(world).iter().sum();

    // Reference: one process holding every expert, each rank's group routed on its own.
    let single: Arc<dyn Collective> = Arc::new(LocalGroup::new(1).pop().unwrap());
    let ref_rt = MoeRuntime::spread(single, settings(&scenario), 2).unwrap();
    let ref_net = build(&ref_rt, device);
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
    let tcp = rendezvous(&env.dir, rank, world, Duration::from_secs(60));
    let coll: Arc<dyn Collective> = if device.is_cuda() {
        Arc::new(HostStaged::new(tcp))
    } else {
        Arc::new(tcp)
    };
    let rt = MoeRuntime::spread(coll.clone(), settings(&scenario), 2).unwrap();
    let net = build(&rt, device);
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
    assert!(d <= tolerance, "rank {rank}: outputs differ by {d}");

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
            d <= tolerance,
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

// ---------------------------------------------------------------------------------------------
// Rebalancing: ranks as threads (the exchange is the same code; only the load matters here).

/// Rows each rank's experts receive when every rank routes `tokens` through one MoE block
/// whose gate sends most tokens to the experts `hot`, under `placement`; and the global
/// assignments per expert.
fn received_rows(
    experts: u32,
    hot: &[i64],
    placement: &ExpertPlacement,
    world: usize,
) -> (Vec<i64>, Vec<f64>) {
    let settings = routing(experts, 1, None);
    // Drawn here under the tests' RNG lock, not in the rank threads: libtorch has one RNG.
    let inputs: Vec<(Tensor, Tensor)> = support::seeded(0, || {
        (0..world)
            .map(|rank| seeded_tokens_and_gate(experts as i64, hot, rank))
            .collect()
    });
    let results: Vec<(i64, Vec<i64>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = LocalGroup::new(world)
            .into_iter()
            .zip(inputs)
            .map(|(coll, (x, gate))| {
                let (settings, placement) = (settings.clone(), placement.clone());
                scope.spawn(move || {
                    tch::set_num_threads(1);
                    let coll: Arc<dyn Collective> = Arc::new(coll);
                    let rt = MoeRuntime::new(coll, settings, placement).unwrap();
                    let vs = nn::VarStore::new(Device::Cpu);
                    let ln = nn::layer_norm(vs.root() / "ln", vec![WIDTH], Default::default());
                    let init = ExpertInit {
                        fc_weight: Init::Const(0.01),
                        fc_bias: Init::Const(0.0),
                        proj_weight: Init::Const(0.01),
                        proj_bias: Init::Const(0.0),
                    };
                    let block = MoeFeedForward::new(&(vs.root() / "moe"), &rt, WIDTH, HIDDEN, init)
                        .unwrap();
                    tch::no_grad(|| {
                        for (n, t) in vs.variables() {
                            if n.ends_with("gate.weight") {
                                t.shallow_clone().copy_(&gate);
                            }
                        }
                    });
                    rt.begin_pass(Pass {
                        train: true,
                        record: false,
                        count_load: true,
                        aux_weight: 0.0,
                    });
                    let _ = tch::no_grad(|| block.forward_residual(&x, &ln));
                    (rt.take_received()[0], rt.take_load().remove(0).routed)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let received = results.iter().map(|(r, _)| *r).collect();
    let mut load = vec![0.0; experts as usize];
    for (_, routed) in &results {
        for (l, r) in load.iter_mut().zip(routed) {
            *l += *r as f64;
        }
    }
    (received, load)
}

fn seeded_tokens_and_gate(experts: i64, hot: &[i64], rank: usize) -> (Tensor, Tensor) {
    // One unit prototype per expert (centred, as the block's LayerNorm centres tokens); the
    // gate scores a token by its prototype, so a token built from prototype e goes to e.
    tch::manual_seed(500);
    let p = Tensor::randn([experts, WIDTH], (Kind::Float, Device::Cpu));
    let p = &p - p.mean_dim(1, true, Kind::Float);
    let p = &p / p.norm_scalaropt_dim(2.0, [1], true);
    // Nine tokens in ten come from the hot experts' prototypes, the rest from any expert's.
    let ids: Vec<i64> = (0..200i64)
        .map(|t| {
            if t % 10 == 9 {
                t % experts
            } else {
                hot[(t as usize / 10) % hot.len()]
            }
        })
        .collect();
    tch::manual_seed(600 + rank as i64);
    let noise = Tensor::randn([200, WIDTH], (Kind::Float, Device::Cpu)) * 0.05;
    let x = p.index_select(0, &Tensor::from_slice(&ids)) * 3.0 + noise;
    (x, p * 4.0)
}

fn max_mean(v: &[i64]) -> f64 {
    let f: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    max_mean_ratio(&f)
}

/// A skewed workload, routed through the real exchange: the coordinator's planner (fed the
/// measured per-expert load) gives a placement under which the busiest worker receives
/// fewer rows relative to the mean.
#[test]
fn rebalancing_lowers_the_busiest_workers_load_under_skewed_routing() {
    for (experts, world, hot) in [(8u32, 4usize, vec![0i64, 1]), (2, 4, vec![0])] {
        let spread = ExpertPlacement {
            version: 1,
            blocks: vec![BlockPlacement::spread(experts, world as u32)],
        };
        let (before, load) = received_rows(experts, &hot, &spread, world);
        let expert_ratio = max_mean_ratio(&load);
        assert!(expert_ratio > 1.5, "the workload must be skewed: {load:?}");
        let slots = (experts / world as u32).max(1);
        let planned = ExpertPlacement {
            version: 2,
            blocks: vec![plan_placement(&load, world as u32, slots)],
        };
        let (after, load_again) = received_rows(experts, &hot, &planned, world);
        assert_eq!(
            load, load_again,
            "the routing does not depend on the placement"
        );
        let (b, a) = (max_mean(&before), max_mean(&after));
        eprintln!(
            "E={experts} W={world}: rows per worker {before:?} (max/mean {b:.2}) -> {after:?} \
             (max/mean {a:.2}) with holders {:?}",
            planned.blocks[0].holders
        );
        assert!(a < b - 0.2, "rebalancing did not help: {b:.2} -> {a:.2}");
    }
}

/// A peer that never joins the exchange: the forward pass returns (a placeholder), later
/// blocks skip their exchanges, and the failure comes out of `check` and `backward` as an
/// error naming the block, instead of a panic in the worker.
#[test]
fn a_failed_exchange_is_an_error_not_a_panic() {
    let mut group = LocalGroup::with_timeout(2, Duration::from_millis(300));
    let _absent = group.pop().unwrap();
    let coll: Arc<dyn Collective> = Arc::new(group.pop().unwrap());
    let settings = routing(2, 1, None);
    let rt = MoeRuntime::spread(coll, settings, 2).unwrap();
    let (net, x) = support::seeded(7, || {
        let net = build(&rt, Device::Cpu);
        (net, Tensor::randn([5, WIDTH], (Kind::Float, Device::Cpu)))
    });
    rt.begin_pass(Pass {
        train: true,
        record: true,
        count_load: true,
        aux_weight: 0.0,
    });
    let started = std::time::Instant::now();
    let out = net.forward(&x);
    assert_eq!(out.size(), vec![5, WIDTH]);
    // Only the first block waited for the timeout; the second skipped its exchange.
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = rt.check().unwrap_err().to_string();
    assert!(err.contains("MoE block 0"), "{err}");
    let err = rt.backward(&out.sum(Kind::Float)).unwrap_err().to_string();
    assert!(err.contains("MoE exchange failed"), "{err}");
}
