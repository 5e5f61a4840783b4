//! Expert placement on the coordinator: the placement in force, the router load rank 0
//! reports every step, and the decision to re-plan when the load stays imbalanced.
//!
//! The load signal is the gate's assignments per expert before capacity (the demand, not what
//! survived the drops). Routing does not depend on the placement, so the windowed load stays
//! valid across a placement change. The hand-over protocol is described next to `StepReply`
//! in `common/proto/contrail.proto`.

use contrail_common::config::MoeConfig;
use contrail_common::experts::{
    block_labels, max_mean_ratio, spread_fits, BlockPlacement, ExpertPlacement,
};
use contrail_common::proto;
use contrail_common::status::{ExpertBlockStatus, ExpertStatus};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// A new plan for a block is adopted only when it cuts the worker load's excess over a perfect
/// balance (ratio − 1) by at least this share: smaller gains are not worth moving weights.
pub const MIN_EXCESS_CUT: f64 = 0.2;

/// Replica slots per worker for E experts on W workers: the memory of the default spread.
pub fn slots_per_worker(experts: u32, world: u32) -> u32 {
    (experts / world.max(1)).max(1)
}

/// Plans one block: `load[e]` is expert e's recent load (any unit), every worker gets exactly
/// `slots_per_worker` replicas (raised to ceil(E/W) if that cannot hold every expert, capped
/// at E). Every expert keeps one replica; the spare slots replicate the experts with the
/// highest load per replica. Replicas then go to workers longest-processing-time first (each to
/// the least-loaded worker with a free slot that lacks that expert), and pairwise swaps off the
/// busiest worker polish the result. Deterministic: ties go to the lower index.
pub fn plan_placement(load: &[f64], world: u32, slots_per_worker: u32) -> BlockPlacement {
    let n_exp = load.len();
    assert!(n_exp > 0, "plan_placement needs at least one expert");
    assert!(world > 0, "plan_placement needs at least one worker");
    let n_w = world as usize;
    let slots = (slots_per_worker as usize)
        .max(n_exp.div_ceil(n_w))
        .min(n_exp);
    // A NaN or negative load (a bad report) must not derail the ordering.
    let load: Vec<f64> = load
        .iter()
        .map(|&l| if l.is_finite() && l > 0.0 { l } else { 0.0 })
        .collect();

    // Replica counts. slots ≤ E keeps the total within E·W, so an expert below W replicas is
    // always there to take a spare slot.
    let mut reps = vec![1usize; n_exp];
    for _ in n_exp..n_w * slots {
        let e = (0..n_exp)
            .filter(|&e| reps[e] < n_w)
            .max_by(|&a, &b| {
                (load[a] / reps[a] as f64)
                    .total_cmp(&(load[b] / reps[b] as f64))
                    .then(b.cmp(&a))
            })
            .expect("a spare slot always has an expert with fewer than W replicas");
        reps[e] += 1;
    }
    let weight = |e: usize| load[e] / reps[e] as f64;

    let mut items: Vec<usize> = (0..n_exp)
        .flat_map(|e| std::iter::repeat_n(e, reps[e]))
        .collect();
    items.sort_by(|&a, &b| weight(b).total_cmp(&weight(a)).then(a.cmp(&b)));

    let mut ws = Workers::new(n_w, n_exp, slots);
    for e in items {
        ws.place(e, &weight);
    }

    // Swaps between the busiest worker and another that lower the larger of the two loads.
    // Each strictly lowers the sum of squared loads, so this ends; the cap bounds the time.
    for _ in 0..64 * n_w {
        let m = (0..n_w)
            .max_by(|&a, &b| ws.load[a].total_cmp(&ws.load[b]).then(b.cmp(&a)))
            .expect("at least one worker");
        let mut best: Option<(f64, usize, usize, usize)> = None;
        for o in (0..n_w).filter(|&o| o != m) {
            for &a in ws.held[m].iter().filter(|&&a| !ws.has[o][a]) {
                for &b in ws.held[o].iter().filter(|&&b| !ws.has[m][b]) {
                    let d = weight(a) - weight(b);
                    let worst = (ws.load[m] - d).max(ws.load[o] + d);
                    // Relative margin: rounding must not count as a gain.
                    if d > 0.0
                        && worst < ws.load[m] * (1.0 - 1e-12)
                        && best.is_none_or(|(bw, ..)| worst < bw)
                    {
                        best = Some((worst, o, a, b));
                    }
                }
            }
        }
        let Some((_, o, a, b)) = best else { break };
        ws.remove(m, a, weight(a));
        ws.remove(o, b, weight(b));
        ws.add(m, b, weight(b));
        ws.add(o, a, weight(a));
    }

    let holders = (0..n_exp)
        .map(|e| {
            (0..n_w)
                .filter(|&r| ws.has[r][e])
                .map(|r| r as u32)
                .collect()
        })
        .collect();
    BlockPlacement { holders }
}

/// The planner's working assignment: each worker's replicas, a membership table, and the
/// expected load.
struct Workers {
    held: Vec<Vec<usize>>,
    has: Vec<Vec<bool>>,
    load: Vec<f64>,
    slots: usize,
}

impl Workers {
    fn new(workers: usize, experts: usize, slots: usize) -> Self {
        Self {
            held: vec![Vec::with_capacity(slots); workers],
            has: vec![vec![false; experts]; workers],
            load: vec![0.0; workers],
            slots,
        }
    }

    fn free(&self, r: usize) -> bool {
        self.held[r].len() < self.slots
    }

    /// The least-loaded worker passing `ok`, the lowest rank on ties.
    fn least_loaded(&self, ok: impl Fn(usize) -> bool) -> Option<usize> {
        (0..self.load.len())
            .filter(|&r| ok(r))
            .min_by(|&a, &b| self.load[a].total_cmp(&self.load[b]).then(a.cmp(&b)))
    }

    fn add(&mut self, r: usize, e: usize, w: f64) {
        self.held[r].push(e);
        self.has[r][e] = true;
        self.load[r] += w;
    }

    fn remove(&mut self, r: usize, e: usize, w: f64) {
        self.held[r].retain(|&x| x != e);
        self.has[r][e] = false;
        self.load[r] -= w;
    }

    /// Puts a replica of e on the least-loaded worker with a free slot that lacks e. When
    /// every worker with a free slot already holds e: such a worker u holds fewer experts than
    /// a full worker v that lacks e, so v has some f that u lacks; f moves to u and e goes to v.
    fn place(&mut self, e: usize, weight: &impl Fn(usize) -> f64) {
        let w = weight(e);
        if let Some(r) = self.least_loaded(|r| self.free(r) && !self.has[r][e]) {
            self.add(r, e, w);
            return;
        }
        let u = self
            .least_loaded(|r| self.free(r))
            .expect("an unplaced replica implies a free slot");
        let mut best: Option<(f64, usize, usize)> = None;
        for v in (0..self.held.len()).filter(|&v| !self.has[v][e]) {
            for &f in self.held[v].iter().filter(|&&f| !self.has[u][f]) {
                let worst = (self.load[u] + weight(f)).max(self.load[v] - weight(f) + w);
                if best.is_none_or(|(b, _, _)| worst < b) {
                    best = Some((worst, v, f));
                }
            }
        }
        let (_, v, f) = best.expect("a full worker lacking the expert has one to give away");
        self.remove(v, f, weight(f));
        self.add(u, f, weight(f));
        self.add(v, e, w);
    }
}

/// One block's reported load: the last `window` steps (running sums kept beside them) and
/// totals since the coordinator started.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BlockLoad {
    steps: VecDeque<(Vec<u64>, u64)>,
    window_routed: Vec<u64>,
    window_dropped: u64,
    total_routed: Vec<u64>,
    total_dropped: u64,
}

impl BlockLoad {
    fn new(experts: usize) -> Self {
        Self {
            steps: VecDeque::new(),
            window_routed: vec![0; experts],
            window_dropped: 0,
            total_routed: vec![0; experts],
            total_dropped: 0,
        }
    }

    fn push(&mut self, routed: Vec<u64>, dropped: u64, window: usize) {
        for (e, &n) in routed.iter().enumerate() {
            self.window_routed[e] += n;
            self.total_routed[e] += n;
        }
        self.window_dropped += dropped;
        self.total_dropped += dropped;
        self.steps.push_back((routed, dropped));
        while self.steps.len() > window {
            let (old, d) = self.steps.pop_front().expect("longer than the window");
            for (e, n) in old.into_iter().enumerate() {
                self.window_routed[e] -= n;
            }
            self.window_dropped -= d;
        }
    }

    fn window_load(&self) -> Vec<f64> {
        self.window_routed.iter().map(|&n| n as f64).collect()
    }
}

/// A block whose placement a rebalance changed, with the expected worker load ratio (max/mean)
/// before and after.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockChange {
    pub block: usize,
    pub before: f64,
    pub after: f64,
}

/// The coordinator's expert bookkeeping for a job with MoE blocks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExpertBook {
    experts: u32,
    world: u32,
    labels: Vec<String>,
    rebalance: bool,
    window: u64,
    threshold: f64,
    placement: ExpertPlacement,
    /// Newest version rank 0 reported running with.
    acknowledged: u64,
    /// Step whose report made the coordinator adopt the current placement.
    adopted_at_step: u64,
    rebalances: u64,
    blocks: Vec<BlockLoad>,
    /// Highest step whose load was counted (a report repeated after a retry counts once).
    counted_step: u64,
    /// Counted steps since the last rebalance decision.
    since_decision: u64,
}

impl ExpertBook {
    /// None when MoE is off. `resume_step` is the step training restarts after (0 when fresh).
    pub fn new(moe: &MoeConfig, world: u32, resume_step: u64) -> Option<Self> {
        if !moe.enabled() {
            return None;
        }
        let labels = block_labels(moe);
        // A world the default spread does not fit (after a rollback with fewer workers) gets
        // the planner's placement for an even load.
        let spread = if spread_fits(moe.experts, world) {
            BlockPlacement::spread(moe.experts, world)
        } else {
            let even = vec![1.0; moe.experts as usize];
            plan_placement(&even, world, slots_per_worker(moe.experts, world))
        };
        Some(Self {
            experts: moe.experts,
            world,
            blocks: vec![BlockLoad::new(moe.experts as usize); labels.len()],
            placement: ExpertPlacement {
                version: 1,
                blocks: vec![spread; labels.len()],
            },
            labels,
            rebalance: moe.rebalance,
            window: moe.rebalance_every_steps.max(1),
            threshold: moe.rebalance_threshold,
            acknowledged: 1,
            adopted_at_step: resume_step,
            rebalances: 0,
            counted_step: resume_step,
            since_decision: 0,
        })
    }

    pub fn placement(&self) -> &ExpertPlacement {
        &self.placement
    }

    /// A membership change: `survivors` are the old ranks still alive, in order (the i-th
    /// becomes rank i), and `joining` replacements take the ranks after them. Every expert
    /// keeps its surviving replicas; each replacement gets, in every block, a replica of the
    /// expert with the fewest (the lowest id on a tie). A new placement version, which the
    /// members take at their regroup (no step reply carries it). Err says which expert lost
    /// every replica; the book is then unchanged.
    pub fn regroup(&mut self, survivors: &[u32], joining: usize) -> Result<(), String> {
        let blocks = self
            .placement
            .blocks
            .iter()
            .enumerate()
            .map(|(b, p)| {
                let mut kept = p.keep_ranks(survivors).map_err(|e| {
                    format!(
                        "expert {e} of MoE block {} had no replica on a surviving worker",
                        self.labels.get(b).map_or("?", String::as_str)
                    )
                })?;
                for r in survivors.len()..survivors.len() + joining {
                    let e = (0..kept.holders.len())
                        .min_by_key(|&e| (kept.holders[e].len(), e))
                        .expect("a block has experts");
                    kept.holders[e].push(r as u32);
                }
                Ok(kept)
            })
            .collect::<Result<Vec<_>, String>>()?;
        self.placement = ExpertPlacement {
            version: self.placement.version + 1,
            blocks,
        };
        self.acknowledged = self.placement.version;
        self.world = (survivors.len() + joining) as u32;
        Ok(())
    }

    /// Checks rank 0's per-block counts before anything of its report is recorded.
    pub fn check(&self, loads: &[proto::ExpertLoad]) -> Result<(), String> {
        let mut seen = vec![false; self.blocks.len()];
        for l in loads {
            let b = l.block as usize;
            if b >= self.blocks.len() {
                return Err(format!(
                    "expert_load names MoE block {b}, but the job has {} ({})",
                    self.blocks.len(),
                    self.labels.join(", ")
                ));
            }
            if std::mem::replace(&mut seen[b], true) {
                return Err(format!("expert_load lists MoE block {b} twice"));
            }
            if l.routed.len() != self.experts as usize {
                return Err(format!(
                    "expert_load of MoE block {b} has {} routed counts; moe.experts is {}",
                    l.routed.len(),
                    self.experts
                ));
            }
        }
        Ok(())
    }

    /// Records rank 0's report of `step` (checked with [`ExpertBook::check`]) and, every
    /// `moe.rebalance_every_steps` counted steps, decides whether to re-plan. Returns the blocks
    /// a new placement changed (empty when none was adopted).
    pub fn report(
        &mut self,
        step: u64,
        loads: &[proto::ExpertLoad],
        placement_version: u64,
    ) -> Vec<BlockChange> {
        if placement_version > self.placement.version {
            tracing::warn!(
                reported = placement_version,
                adopted = self.placement.version,
                "rank 0 reports a placement version the coordinator never adopted; ignored"
            );
        } else {
            self.acknowledged = self.acknowledged.max(placement_version);
        }
        // Steps without counts (MoE evaluation, or a worker that does not send them) leave the
        // window alone.
        if loads.is_empty() || step <= self.counted_step {
            return Vec::new();
        }
        self.counted_step = step;
        let mut per_block = vec![(vec![0u64; self.experts as usize], 0u64); self.blocks.len()];
        for l in loads {
            per_block[l.block as usize] = (l.routed.clone(), l.dropped);
        }
        for (b, (routed, dropped)) in per_block.into_iter().enumerate() {
            self.blocks[b].push(routed, dropped, self.window as usize);
        }
        self.since_decision += 1;
        // A placement still on its way to the workers is not re-planned; the decision waits
        // for its acknowledgement.
        if !self.rebalance || self.since_decision < self.window || self.pending().is_some() {
            return Vec::new();
        }
        self.since_decision = 0;
        self.decide(step)
    }

    /// Re-plans every block whose expected worker load ratio exceeds the threshold, keeps the
    /// plans that cut its excess enough, and adopts them as a new version.
    fn decide(&mut self, step: u64) -> Vec<BlockChange> {
        let slots = slots_per_worker(self.experts, self.world);
        let mut changes = Vec::new();
        let mut blocks = self.placement.blocks.clone();
        for (b, current) in blocks.iter_mut().enumerate() {
            let load = self.blocks[b].window_load();
            if load.iter().sum::<f64>() <= 0.0 {
                continue;
            }
            let before = max_mean_ratio(&current.worker_loads(&load, self.world));
            if before <= self.threshold {
                continue;
            }
            let plan = plan_placement(&load, self.world, slots);
            debug_assert!(plan.validate(self.world).is_ok());
            let after = max_mean_ratio(&plan.worker_loads(&load, self.world));
            if after - 1.0 <= (1.0 - MIN_EXCESS_CUT) * (before - 1.0) && plan != *current {
                *current = plan;
                changes.push(BlockChange {
                    block: b,
                    before,
                    after,
                });
            } else {
                tracing::info!(
                    block = %self.labels[b],
                    worker_load_max_mean = before,
                    best_plan = after,
                    "MoE load is imbalanced, but no placement improves it enough to move experts"
                );
            }
        }
        if !changes.is_empty() {
            self.placement = ExpertPlacement {
                version: self.placement.version + 1,
                blocks,
            };
            self.rebalances += 1;
            self.adopted_at_step = step;
            for c in &changes {
                tracing::info!(
                    version = self.placement.version,
                    step,
                    block = %self.labels[c.block],
                    worker_load_max_mean_before = c.before,
                    worker_load_max_mean_after = c.after,
                    "new expert placement adopted"
                );
            }
        }
        changes
    }

    /// The adopted placement while rank 0 has not acknowledged it, and the earliest step it may
    /// apply at.
    pub fn pending(&self) -> Option<(proto::Placement, u64)> {
        (self.placement.version > self.acknowledged).then(|| {
            (
                proto::Placement::from(&self.placement),
                self.adopted_at_step + 1,
            )
        })
    }

    pub fn status(&self) -> ExpertStatus {
        let blocks = self
            .blocks
            .iter()
            .enumerate()
            .map(|(b, l)| {
                let placement = &self.placement.blocks[b];
                let load = l.window_load();
                let assigned: u64 = l.window_routed.iter().sum();
                let share: Vec<f64> = if assigned == 0 {
                    Vec::new()
                } else {
                    load.iter().map(|&n| n / assigned as f64).collect()
                };
                ExpertBlockStatus {
                    block: b as u32,
                    label: self.labels[b].clone(),
                    load_max_mean: max_mean_ratio(&share),
                    worker_load_max_mean: max_mean_ratio(
                        &placement.worker_loads(&load, self.world),
                    ),
                    load: share,
                    dropped_fraction: if assigned == 0 {
                        0.0
                    } else {
                        l.window_dropped as f64 / assigned as f64
                    },
                    window_assignments: assigned,
                    total_assignments: l.total_routed.iter().sum(),
                    holders: placement.holders.clone(),
                }
            })
            .collect();
        ExpertStatus {
            placement_version: self.placement.version,
            acknowledged_version: self.acknowledged,
            rebalances: self.rebalances,
            window_steps: self.blocks.first().map_or(0, |b| b.steps.len() as u64),
            blocks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ratio(p: &BlockPlacement, load: &[f64], world: u32) -> f64 {
        max_mean_ratio(&p.worker_loads(load, world))
    }

    /// Plans, checks the placement's invariants, and returns (spread ratio, planned ratio).
    fn plan_vs_spread(load: &[f64], world: u32) -> (f64, f64) {
        let e = load.len() as u32;
        let plan = plan_placement(load, world, slots_per_worker(e, world));
        plan.validate(world).unwrap();
        let spread = BlockPlacement::spread(e, world);
        (ratio(&spread, load, world), ratio(&plan, load, world))
    }

    fn zipf(n: usize) -> Vec<f64> {
        (1..=n).map(|k| 1.0 / k as f64).collect()
    }

    #[test]
    fn skewed_loads_plan_below_the_spread() {
        // Zipf over 8 experts on 4 workers: the spread pairs the two hottest.
        let (s, p) = plan_vs_spread(&zipf(8), 4);
        assert!(p < s - 0.1, "spread {s}, plan {p}");
        // 2 experts on 4 workers, one 3× hotter: it gets 3 replicas instead of 2.
        let (s, p) = plan_vs_spread(&[3.0, 1.0], 4);
        assert!(p < s - 0.1, "spread {s}, plan {p}");
        // 16 on 4 with one very hot expert whose spread neighbours are the next hottest.
        let mut load: Vec<f64> = (0..16).map(|e| 16.0 - e as f64).collect();
        load[0] = 100.0;
        let (s, p) = plan_vs_spread(&load, 4);
        assert!(p < s - 0.01, "spread {s}, plan {p}");
        // The hot expert's worker then holds it with the three coldest.
        let plan = plan_placement(&load, 4, 4);
        let hot = plan.holders[0][0];
        assert_eq!(plan.local_experts(hot), vec![0, 13, 14, 15]);
    }

    #[test]
    fn hot_experts_are_replicated_and_cold_ones_keep_one() {
        // 4 experts, 8 workers (1 slot each): 4 spare replicas, all to the hot pair.
        let plan = plan_placement(&[10.0, 10.0, 1.0, 1.0], 8, 1);
        plan.validate(8).unwrap();
        let reps: Vec<usize> = plan.holders.iter().map(Vec::len).collect();
        assert_eq!(reps, vec![3, 3, 1, 1]);
    }

    #[test]
    fn uniform_load_stays_balanced() {
        for (e, w) in [(8u32, 4u32), (2, 4), (16, 4), (4, 4), (1, 3), (12, 3)] {
            let (_, p) = plan_vs_spread(&vec![5.0; e as usize], w);
            assert!((p - 1.0).abs() < 1e-9, "{e} experts on {w}: {p}");
        }
    }

    #[test]
    fn a_replica_with_only_its_own_holders_free_is_placed_by_a_swap() {
        // Rank 0 holds expert 0 and has the only free slot; rank 1 is full with 1 and 2.
        let weight = |e: usize| [4.0, 3.0, 1.0][e];
        let mut ws = Workers::new(2, 3, 2);
        ws.add(0, 0, weight(0));
        ws.add(1, 1, weight(1));
        ws.add(1, 2, weight(2));
        ws.place(0, &weight);
        // Either of rank 1's experts can move to rank 0 (loads (7, 5) or (5, 7)); on the tie
        // the first candidate, expert 1, moves and the second replica of 0 takes its slot.
        let mut held = ws.held.clone();
        held.iter_mut().for_each(|h| h.sort_unstable());
        assert_eq!(held, vec![vec![0, 1], vec![0, 2]]);
        assert_eq!(ws.load, vec![7.0, 5.0]);
        assert!(ws.has[1][0] && !ws.has[1][1]);
        let total: f64 = ws.load.iter().sum();
        assert!((total - 12.0).abs() < 1e-12, "{:?}", ws.load);
    }

    #[test]
    fn planning_is_deterministic() {
        let load = [0.3, 0.3, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05];
        assert_eq!(plan_placement(&load, 4, 2), plan_placement(&load, 4, 2));
    }

    /// Random loads and sizes from a seeded LCG: the plan always validates, fills every
    /// worker's slots exactly, and never splits an expert more than W ways.
    #[test]
    fn plans_are_always_valid() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            state >> 33
        };
        for _ in 0..2000 {
            let world = 1 + (next() % 12) as u32;
            let experts = 1 + (next() % 40) as usize;
            let asked = (next() % 4) as u32;
            let load: Vec<f64> = (0..experts)
                .map(|_| match next() % 5 {
                    0 => 0.0,
                    1 => (next() % 1000) as f64 * 100.0,
                    _ => (next() % 1000) as f64,
                })
                .collect();
            let plan = plan_placement(&load, world, asked);
            plan.validate(world)
                .unwrap_or_else(|e| panic!("{experts} on {world} ({load:?}): {e}"));
            let slots = (asked as usize)
                .max(experts.div_ceil(world as usize))
                .min(experts);
            for r in 0..world {
                assert_eq!(plan.local_experts(r).len(), slots, "rank {r}: {plan:?}");
            }
        }
    }

    fn moe(experts: u32, rebalance: bool) -> MoeConfig {
        MoeConfig {
            experts,
            vit_blocks: vec![3, 1],
            rebalance,
            rebalance_every_steps: 4,
            rebalance_threshold: 1.2,
            ..Default::default()
        }
    }

    fn loads(per_block: &[&[u64]]) -> Vec<proto::ExpertLoad> {
        per_block
            .iter()
            .enumerate()
            .map(|(b, r)| proto::ExpertLoad {
                block: b as u32,
                routed: r.to_vec(),
                dropped: r.iter().sum::<u64>() / 10,
            })
            .collect()
    }

    #[test]
    fn window_keeps_the_last_steps_and_totals_everything() {
        let mut book = ExpertBook::new(&moe(4, false), 2, 0).unwrap();
        assert_eq!(book.placement().blocks.len(), 2);
        for step in 1..=6u64 {
            // Block 0 moves its load from expert 0 to expert 3 after step 2.
            let b0: &[u64] = if step <= 2 {
                &[10, 0, 0, 0]
            } else {
                &[0, 0, 0, 10]
            };
            book.report(step, &loads(&[b0, &[5, 5, 5, 5]]), 1);
        }
        // A repeated report is counted once.
        book.report(6, &loads(&[&[0, 0, 0, 10], &[5, 5, 5, 5]]), 1);
        let s = book.status();
        assert_eq!(s.window_steps, 4);
        let b0 = &s.blocks[0];
        assert_eq!(b0.label, "vit 1");
        assert_eq!(b0.load, vec![0.0, 0.0, 0.0, 1.0]);
        assert_eq!((b0.window_assignments, b0.total_assignments), (40, 60));
        assert!((b0.load_max_mean - 4.0).abs() < 1e-12);
        // Expert 3 lives on rank 1 alone: worker loads (0, 40) → max/mean 2.
        assert!((b0.worker_load_max_mean - 2.0).abs() < 1e-12);
        assert!((b0.dropped_fraction - 0.1).abs() < 1e-12);
        assert_eq!(s.blocks[1].load, vec![0.25; 4]);
        assert_eq!(s.blocks[1].label, "vit 3");
        assert_eq!(s.rebalances, 0, "rebalance is off");
    }

    #[test]
    fn reports_naming_unknown_blocks_or_sizes_are_refused() {
        let book = ExpertBook::new(&moe(4, true), 2, 0).unwrap();
        let mut bad = loads(&[&[1, 1, 1, 1]]);
        bad[0].block = 2;
        assert!(book.check(&bad).unwrap_err().contains("block 2"));
        let bad = loads(&[&[1, 1, 1]]);
        assert!(book.check(&bad).unwrap_err().contains("moe.experts is 4"));
        let mut bad = loads(&[&[1, 1, 1, 1], &[1, 1, 1, 1]]);
        bad[1].block = 0;
        assert!(book.check(&bad).unwrap_err().contains("twice"));
        assert!(book.check(&loads(&[&[1, 1, 1, 1]])).is_ok());
    }

    #[test]
    fn skewed_load_triggers_one_rebalance_until_acknowledged() {
        // 8 experts on 4 workers; the spread puts experts 0 and 1 (the hot ones) together.
        let mut book = ExpertBook::new(&moe(8, true), 4, 0).unwrap();
        let skew: &[u64] = &[40, 30, 5, 5, 5, 5, 5, 5];
        let even: &[u64] = &[10; 8];
        for step in 1..=3 {
            assert!(book.report(step, &loads(&[skew, even]), 1).is_empty());
        }
        assert!(book.pending().is_none());
        let before = book.status().blocks[0].worker_load_max_mean;
        let changes = book.report(4, &loads(&[skew, even]), 1);
        assert_eq!(changes.len(), 1, "only the skewed block moves: {changes:?}");
        assert_eq!(changes[0].block, 0);
        let s = book.status();
        assert_eq!((s.placement_version, s.rebalances), (2, 1));
        let after = s.blocks[0].worker_load_max_mean;
        assert!(after < before, "{after} !< {before}");
        assert!((changes[0].after - after).abs() < 1e-12);
        assert_eq!(s.blocks[1].holders, BlockPlacement::spread(8, 4).holders);
        let (wire, apply_at) = book.pending().expect("rank 0 has not acknowledged v2");
        assert_eq!((wire.version, apply_at), (2, 5));
        // Until rank 0 runs v2 nothing is re-planned, even with a new skew: 40 and 30 on the
        // two experts v2 put together.
        let v2 = book.placement().blocks[0].clone();
        let pair = v2.local_experts(v2.holders[0][0]);
        let mut flipped = vec![5u64; 8];
        flipped[pair[0] as usize] = 40;
        flipped[pair[1] as usize] = 30;
        let flipped = flipped.as_slice();
        for step in 5..=12 {
            book.report(step, &loads(&[flipped, even]), 1);
        }
        assert_eq!(book.status().placement_version, 2);
        // The acknowledgement ends the resend, and the overdue decision follows.
        let changes = book.report(13, &loads(&[flipped, even]), 2);
        assert_eq!(book.status().acknowledged_version, 2);
        assert_eq!(changes.len(), 1);
        assert_eq!(book.status().placement_version, 3);
    }

    #[test]
    fn balanced_load_keeps_the_placement() {
        let mut book = ExpertBook::new(&moe(8, true), 4, 0).unwrap();
        for step in 1..=20 {
            let r: &[u64] = &[10, 11, 9, 10, 10, 12, 9, 10];
            assert!(book.report(step, &loads(&[r, r]), 1).is_empty());
        }
        let s = book.status();
        assert_eq!((s.placement_version, s.rebalances), (1, 0));
        assert!(book.pending().is_none());
    }

    #[test]
    fn moe_off_keeps_no_book() {
        assert!(ExpertBook::new(&MoeConfig::default(), 4, 0).is_none());
    }
}
