//! The coordinator's state machine driven directly, with a hand-moved clock.

mod common;

use common::registration;
use contrail_common::checkpoint::CheckpointMeta;
use contrail_common::config::JobConfig;
use contrail_common::experts::{BlockPlacement, ExpertPlacement};
use contrail_common::proto;
use contrail_common::shards::{epoch_order, ShardStateSnapshot};
use contrail_common::status::{JobState, WorkerLiveness};
use contrail_coordinator::error::RpcError;
use contrail_coordinator::job::JobBook;
use std::collections::HashMap;

const HEARTBEAT: u64 = 50;
const TIMEOUT: u64 = 200;
const TTL: u64 = 150;

fn config(world_size: u32) -> JobConfig {
    let mut cfg = JobConfig::default();
    cfg.cluster.world_size = world_size;
    cfg.cluster.heartbeat_ms = HEARTBEAT;
    cfg.cluster.worker_timeout_ms = TIMEOUT;
    cfg.cluster.lease_ttl_ms = TTL;
    cfg.train.micro_batch = 4;
    cfg.train.global_batch = 4 * u64::from(world_size);
    cfg.train.epochs = 2;
    cfg.train.seed = 17;
    cfg.validate().expect("test config is valid");
    cfg
}

fn urls(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("memory://sm/shard-{i:02}.tar"))
        .collect()
}

/// A job of `world` workers on `n` shards, with every worker registered (ids in rank order).
fn running(world: u32, n: usize) -> (JobBook, Vec<u64>) {
    running_with(config(world), n)
}

fn running_with(cfg: JobConfig, n: usize) -> (JobBook, Vec<u64>) {
    let world = cfg.cluster.world_size;
    let mut b = JobBook::new(cfg, "toml".into(), urls(n), None);
    let ids = (0..world)
        .map(|r| {
            b.register(&registration("host", &format!("10.0.0.{r}:2950{r}"), 0), 0)
                .unwrap()
                .0
        })
        .collect();
    assert_eq!(b.state(), JobState::Running);
    (b, ids)
}

/// The (rank, address) pairs of a rendezvous reply's linked peers.
fn peers(r: &proto::RendezvousReply) -> Vec<(u32, &str)> {
    r.peers
        .iter()
        .map(|p| (p.rank, p.address.as_str()))
        .collect()
}

fn lease(b: &mut JobBook, id: u64, epoch: u32, now: u64) -> Result<proto::LeaseReply, RpcError> {
    let generation = b.generation();
    b.lease(
        &proto::LeaseRequest {
            worker_id: id,
            generation,
            epoch,
            ..Default::default()
        },
        now,
    )
}

fn heartbeat(
    b: &mut JobBook,
    id: u64,
    generation: u64,
    now: u64,
) -> Result<proto::HeartbeatReply, RpcError> {
    b.heartbeat(
        &proto::HeartbeatRequest {
            worker_id: id,
            generation,
            ..Default::default()
        },
        now,
    )
}

/// Worker `id` leaves with an error ("oom") at `now`.
fn fail_worker(b: &mut JobBook, id: u64, generation: u64, now: u64) {
    b.leave(
        &proto::LeaveRequest {
            worker_id: id,
            generation,
            finished: false,
            error: "oom".into(),
        },
        now,
    )
    .unwrap();
}

fn complete(
    b: &mut JobBook,
    id: u64,
    lease_id: u64,
    samples: u64,
    bad: &[(&str, u64)],
    error: &str,
) {
    let generation = b.generation();
    let bad_samples: HashMap<String, u64> = bad.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    b.complete(
        &proto::CompleteRequest {
            worker_id: id,
            generation,
            lease_id,
            samples,
            bad_samples,
            error: error.into(),
            ..Default::default()
        },
        0,
    )
    .unwrap();
}

#[test]
fn rendezvous_waits_for_the_world_then_ranks_in_registration_order() {
    let mut b = JobBook::new(config(3), "the job".into(), urls(4), None);
    let (a, g) = b.register(&registration("ha", "10.0.0.1:1", 0), 0).unwrap();
    assert_eq!(b.rendezvous(a, g, 0, 1).unwrap(), None);
    assert_eq!(b.state(), JobState::WaitingForWorkers);
    let e = lease(&mut b, a, 0, 1).unwrap_err();
    assert!(e.to_string().contains("1 of 3 workers registered"), "{e}");
    let (c, _) = b.register(&registration("hc", "10.0.0.3:1", 0), 2).unwrap();
    let (d, _) = b.register(&registration("hd", "10.0.0.2:1", 0), 3).unwrap();
    assert_eq!(b.state(), JobState::Running);
    let e = b
        .register(&registration("late", "10.0.0.9:1", 0), 4)
        .unwrap_err();
    assert!(matches!(e, RpcError::ResourceExhausted(_)), "{e:?}");
    for (id, rank) in [(a, 0), (c, 1), (d, 2)] {
        let r = b
            .rendezvous(id, g, 0, 5)
            .unwrap()
            .expect("world is complete");
        assert_eq!(r.rank, rank);
        assert_eq!(r.world_size, 3);
        // A world of 3 is a ring in which every rank neighbours both others.
        let others: Vec<(u32, &str)> = [(0, "10.0.0.1:1"), (1, "10.0.0.3:1"), (2, "10.0.0.2:1")]
            .into_iter()
            .filter(|&(r, _)| r != rank)
            .collect();
        assert_eq!(peers(&r), others);
        assert_eq!(r.job_config_toml, "the job");
        assert_eq!(r.resume_checkpoint, "");
    }
}

/// A rank is told only the addresses its collective links use: its ring neighbours, or
/// every other rank when MoE's all-to-all needs the full mesh.
#[test]
fn rendezvous_replies_carry_the_addresses_of_linked_ranks_only() {
    let (mut b, ids) = running_with(config(8), 8);
    let g = b.generation();
    let addr = |r: u32| format!("10.0.0.{r}:2950{r}");
    for (rank, id) in ids.iter().enumerate() {
        let r = b.rendezvous(*id, g, 0, 1).unwrap().expect("complete");
        assert_eq!(r.rank as usize, rank);
        let (before, after) = ((r.rank + 7) % 8, (r.rank + 1) % 8);
        let mut want = vec![(before, addr(before)), (after, addr(after))];
        want.sort();
        let got: Vec<(u32, String)> = r
            .peers
            .iter()
            .map(|p| (p.rank, p.address.clone()))
            .collect();
        assert_eq!(got, want, "rank {rank}");
    }
    let (mut b, ids) = running_with(moe_config(false), 4);
    let g = b.generation();
    let r = b.rendezvous(ids[1], g, 0, 1).unwrap().expect("complete");
    let got: Vec<u32> = r.peers.iter().map(|p| p.rank).collect();
    assert_eq!(got, [0, 2, 3], "MoE links every pair");
}

#[test]
fn duplicate_collective_address_is_refused() {
    let mut b = JobBook::new(config(2), String::new(), urls(2), None);
    b.register(&registration("h1", "10.0.0.1:29500", 0), 0)
        .unwrap();
    let e = b
        .register(&registration("h2", "10.0.0.1:29500", 0), 0)
        .unwrap_err();
    assert!(e.to_string().contains("already registered"), "{e}");
}

#[test]
fn leases_follow_the_deterministic_epoch_order_across_workers() {
    let (mut b, ids) = running(2, 7);
    let all = urls(7);
    let expected: Vec<&String> = epoch_order(7, 17, 1).into_iter().map(|i| &all[i]).collect();
    let got: Vec<String> = (0..7)
        .map(|k| lease(&mut b, ids[k % 2], 1, 0).unwrap().shard_url)
        .collect();
    assert_eq!(got.iter().collect::<Vec<_>>(), expected);
}

#[test]
fn epoch_reports_exhausted_while_shards_are_still_leased() {
    let (mut b, ids) = running(2, 3);
    let leases: Vec<_> = (0..3)
        .map(|_| lease(&mut b, ids[0], 0, 0).unwrap())
        .collect();
    assert!(leases
        .iter()
        .all(|l| !l.exhausted && l.expires_in_ms == TTL));
    let r = lease(&mut b, ids[1], 0, 0).unwrap();
    assert!(r.exhausted && r.shard_url.is_empty(), "{r:?}");
    let s = b.status(0);
    assert_eq!(
        (s.shards.leased, s.shards.pending, s.shards.total),
        (3, 0, 3)
    );
    // The next epoch is created on demand and is full again.
    assert!(!lease(&mut b, ids[1], 1, 0).unwrap().exhausted);
    assert_eq!(b.status(0).epoch, 1);
}

#[test]
fn unrenewed_lease_expires_back_to_pending_and_heartbeats_renew() {
    let (mut b, ids) = running(2, 4);
    let g = b.generation();
    let held = lease(&mut b, ids[0], 0, 0).unwrap();
    let lost = lease(&mut b, ids[1], 0, 0).unwrap();
    // Worker 0 heartbeats; worker 1's heartbeat stops renewing after t=0.
    for t in [40, 80, 120, 160] {
        heartbeat(&mut b, ids[0], g, t).unwrap();
        b.tick(t);
    }
    let s = b.status(160);
    assert_eq!(
        (s.shards.leased, s.shards.pending),
        (1, 3),
        "{:?}",
        s.shards
    );
    assert_eq!(s.workers[0].shard, held.shard_url);
    assert_eq!(s.workers[1].shard, "");
    // The expired shard is the next one handed out.
    assert_eq!(
        lease(&mut b, ids[0], 0, 170).unwrap().shard_url,
        lost.shard_url
    );
}

#[test]
fn dead_worker_returns_its_leases_and_fails_the_job_naming_its_rank() {
    // Leases outlive the worker timeout here, so only the death can return them.
    let mut cfg = config(2);
    cfg.cluster.lease_ttl_ms = 10 * TIMEOUT;
    let (mut b, ids) = running_with(cfg, 5);
    let g = b.generation();
    lease(&mut b, ids[0], 0, 0).unwrap();
    let l1 = lease(&mut b, ids[1], 0, 0).unwrap();
    let l2 = lease(&mut b, ids[1], 0, 0).unwrap();
    // Rank 0 keeps heartbeating; rank 1 goes silent after t=0.
    let mut t = 0;
    while b.state() == JobState::Running {
        t += HEARTBEAT;
        heartbeat(&mut b, ids[0], g, t).unwrap();
        b.tick(t);
        assert!(t <= TIMEOUT + HEARTBEAT, "rank 1 was never declared dead");
    }
    assert!(t > TIMEOUT);
    assert_eq!(b.state(), JobState::Failed);
    assert!(
        b.reason().contains("rank 1 (10.0.0.1:29501)"),
        "{}",
        b.reason()
    );
    assert!(
        b.reason().contains("2 shard lease(s) returned"),
        "{}",
        b.reason()
    );
    assert_eq!(b.generation(), g + 1);
    let s = b.status(t);
    assert_eq!(s.workers[1].state, WorkerLiveness::Dead);
    assert_eq!((s.shards.pending, s.shards.leased), (4, 1));
    // The survivor's next heartbeat tells it to stop, with the reason.
    let hb = heartbeat(&mut b, ids[0], g, t + 1).unwrap();
    assert!(hb.stop);
    assert!(hb.reason.contains("rank 1"), "{}", hb.reason);
    // The dead worker is fenced, whatever generation it carries.
    for generation in [g, g + 1] {
        let e = heartbeat(&mut b, ids[1], generation, t + 2).unwrap_err();
        assert!(matches!(e, RpcError::FailedPrecondition(_)), "{e:?}");
        assert!(e.to_string().contains("declared dead"), "{e}");
    }
    let e = b
        .complete(
            &proto::CompleteRequest {
                worker_id: ids[1],
                generation: g,
                lease_id: l1.lease_id,
                samples: 3,
                ..Default::default()
            },
            t + 3,
        )
        .unwrap_err();
    assert!(matches!(e, RpcError::FailedPrecondition(_)), "{e:?}");
    assert_eq!(b.status(t).shards.done, 0);
    let _ = l2;
    // The survivor can still leave; the job stays failed.
    b.leave(
        &proto::LeaveRequest {
            worker_id: ids[0],
            generation: g,
            finished: false,
            error: String::new(),
        },
        t + 4,
    )
    .unwrap();
    assert_eq!(b.state(), JobState::Failed);
    assert!(b.reason().contains("rank 1"), "{}", b.reason());
}

#[test]
fn stale_generation_is_fenced() {
    let (mut b, ids) = running(2, 2);
    let g = b.generation();
    let e = b
        .lease(
            &proto::LeaseRequest {
                worker_id: ids[0],
                generation: g + 5,
                epoch: 0,
                ..Default::default()
            },
            0,
        )
        .unwrap_err();
    assert!(matches!(e, RpcError::FailedPrecondition(_)), "{e:?}");
    assert!(e.to_string().contains("rank 0"), "{e}");
    let e = b
        .report_step(
            &proto::StepReport {
                worker_id: ids[1],
                generation: g - 1,
                step: 1,
                ..Default::default()
            },
            0,
        )
        .unwrap_err();
    assert!(matches!(e, RpcError::FailedPrecondition(_)), "{e:?}");
    let e = heartbeat(&mut b, 999, g, 0).unwrap_err();
    assert!(matches!(e, RpcError::NotFound(_)), "{e:?}");
}

#[test]
fn sample_counts_add_up_and_give_the_step_estimate() {
    let (mut b, ids) = running(2, 6);
    let sizes = [10u64, 12, 9, 11, 8, 14];
    let mut k = 0;
    while let Ok(r) = lease(&mut b, ids[k % 2], 0, 0) {
        if r.exhausted {
            break;
        }
        let error = if k == 5 { "GET failed: 404" } else { "" };
        complete(
            &mut b,
            ids[k % 2],
            r.lease_id,
            if error.is_empty() { sizes[k] } else { 0 },
            &[("decode", 1)],
            error,
        );
        k += 1;
    }
    assert_eq!(k, 6);
    let s = b.status(0);
    assert_eq!(s.shards.total, 6);
    assert_eq!(
        (
            s.shards.done,
            s.shards.failed,
            s.shards.pending,
            s.shards.leased
        ),
        (5, 1, 0, 0)
    );
    assert_eq!(s.bad_samples["decode"], 6);
    // The failed shard contributes no samples: 50 per epoch / global batch 8 = 7 steps (the
    // last one partial) × 2 epochs.
    let per_epoch: u64 = sizes[..5].iter().sum();
    assert_eq!(s.total_steps_estimate, Some(per_epoch.div_ceil(8) * 2));
    let snap: ShardStateSnapshot =
        serde_json::from_str(&b.shard_state(ids[0], b.generation(), None, 0).unwrap()).unwrap();
    assert_eq!(snap.done.values().sum::<u64>(), per_epoch);
    assert_eq!(snap.failed.len(), 1);
}

#[test]
fn steps_feed_progress_from_rank_zero() {
    let (mut b, ids) = running(2, 4);
    let g = b.generation();
    for step in 1..=4u64 {
        for (rank, id) in ids.iter().enumerate() {
            b.report_step(
                &proto::StepReport {
                    worker_id: *id,
                    generation: g,
                    epoch: 0,
                    step,
                    loss: Some(if rank == 0 { 5.0 - step as f64 } else { 99.0 }),
                    global_samples: 8,
                    learning_rate: 0.1,
                    step_seconds: 0.25,
                    ..Default::default()
                },
                step * 250,
            )
            .unwrap();
        }
    }
    let s = b.status(1000);
    assert_eq!((s.step, s.samples_seen, s.loss), (4, 32, Some(1.0)));
    assert_eq!(s.loss_history, vec![(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0)]);
    assert!(
        (s.samples_per_sec.unwrap() - 32.0).abs() < 1e-9,
        "{:?}",
        s.samples_per_sec
    );
    assert_eq!(s.workers[1].step, 4);
    // No shard finished yet: no estimate, no ETA.
    assert_eq!((s.total_steps_estimate, s.eta_seconds), (None, None));
}

#[test]
fn leave_finished_from_all_finishes_and_leave_with_error_fails() {
    let (mut b, ids) = running(2, 2);
    let g = b.generation();
    let leave = |b: &mut JobBook, id, finished, error: &str| {
        b.leave(
            &proto::LeaveRequest {
                worker_id: id,
                generation: g,
                finished,
                error: error.into(),
            },
            0,
        )
    };
    leave(&mut b, ids[0], true, "").unwrap();
    assert_eq!(b.state(), JobState::Running);
    leave(&mut b, ids[1], true, "").unwrap();
    assert_eq!(b.state(), JobState::Finished);

    let (mut b, ids) = running(2, 2);
    leave(&mut b, ids[1], false, "CUDA out of memory").unwrap();
    assert_eq!(b.state(), JobState::Failed);
    assert!(
        b.reason()
            .contains("rank 1 (10.0.0.1:29501) failed: CUDA out of memory"),
        "{}",
        b.reason()
    );
    assert_eq!(b.status(0).workers[1].state, WorkerLiveness::Left);
}

#[test]
fn resume_reports_the_checkpoint_and_skips_done_shards() {
    let all = urls(5);
    let order = epoch_order(5, 17, 1);
    let mut shard_state = ShardStateSnapshot {
        epoch: 1,
        samples_seen: 77,
        ..Default::default()
    };
    shard_state.done.insert(all[order[0]].clone(), 9);
    shard_state.done.insert(all[order[1]].clone(), 9);
    let meta = CheckpointMeta {
        step: 40,
        epoch: 1,
        world_size: 2,
        shard_state,
        config_toml: String::new(),
        created_unix_ms: 0,
        run: String::new(),
    };
    let mut b = JobBook::new(
        config(2),
        String::new(),
        all.clone(),
        Some(("memory://ck/step-00000040".into(), meta)),
    );
    let ids: Vec<u64> = (0..2)
        .map(|r| {
            b.register(&registration("h", &format!("a:{r}"), 0), 0)
                .unwrap()
                .0
        })
        .collect();
    let r = b.rendezvous(ids[1], b.generation(), 0, 0).unwrap().unwrap();
    assert_eq!(
        (r.resume_checkpoint.as_str(), r.resume_step, r.resume_epoch),
        ("memory://ck/step-00000040", 40, 1)
    );
    let s = b.status(0);
    assert_eq!((s.step, s.samples_seen, s.epoch), (40, 77, 1));
    assert_eq!((s.shards.done, s.shards.pending), (2, 3));
    let mut got = Vec::new();
    loop {
        let l = lease(&mut b, ids[0], 1, 0).unwrap();
        if l.exhausted {
            break;
        }
        got.push(l.shard_url);
    }
    let expected: Vec<String> = order[2..].iter().map(|i| all[*i].clone()).collect();
    assert_eq!(got, expected);
}

/// A ViT job with MoE blocks 1 and 3, 8 experts on 4 workers, re-planning every 4 steps.
fn moe_config(rebalance: bool) -> JobConfig {
    let mut cfg = JobConfig::from_toml(
        "[model]\nencoder = \"vit\"\n[model.vit]\nlayers = 4\npatch_size = 8\n\
         [data]\nimage_size = 32\n\
         [moe]\nexperts = 8\nvit_blocks = [1, 3]\nrebalance_every_steps = 4\n\
         rebalance_threshold = 1.2\n",
    )
    .unwrap();
    cfg.moe.rebalance = rebalance;
    let base = config(4);
    cfg.cluster = base.cluster;
    cfg.train = base.train;
    cfg.validate().expect("MoE test config is valid");
    cfg
}

/// Every rank reports `step`; rank 0 sends `routed` for both blocks (1 in 20 dropped) and the
/// placement version it runs, the others send garbage counts that must be ignored. Returns the
/// replies in rank order.
fn moe_step(
    b: &mut JobBook,
    ids: &[u64],
    step: u64,
    routed: &[[u64; 8]; 2],
    version: u64,
) -> Vec<proto::StepReply> {
    let g = b.generation();
    ids.iter()
        .enumerate()
        .map(|(rank, id)| {
            let expert_load = if rank == 0 {
                routed
                    .iter()
                    .enumerate()
                    .map(|(blk, r)| proto::ExpertLoad {
                        block: blk as u32,
                        routed: r.to_vec(),
                        dropped: r.iter().sum::<u64>() / 20,
                    })
                    .collect()
            } else {
                vec![proto::ExpertLoad {
                    block: 9,
                    routed: vec![1_000_000],
                    dropped: 0,
                }]
            };
            b.report_step(
                &proto::StepReport {
                    worker_id: *id,
                    generation: g,
                    step,
                    global_samples: 16,
                    expert_load,
                    placement_version: version,
                    ..Default::default()
                },
                step * 100,
            )
            .unwrap()
        })
        .collect()
}

#[test]
fn moe_rendezvous_gives_the_spread_and_status_shows_the_load() {
    let (mut b, ids) = running_with(moe_config(false), 4);
    let r = b.rendezvous(ids[2], b.generation(), 0, 0).unwrap().unwrap();
    let p = ExpertPlacement::from(&r.placement.expect("MoE is on"));
    assert_eq!(p.version, 1);
    assert_eq!(p.blocks, vec![BlockPlacement::spread(8, 4); 2]);
    let routed = [[10, 10, 10, 10, 20, 20, 10, 10], [5; 8]];
    for step in 1..=6 {
        let replies = moe_step(&mut b, &ids, step, &routed, 1);
        assert!(replies.iter().all(|r| r.placement.is_none()));
    }
    let x = b.status(700).experts.expect("MoE is on");
    assert_eq!(
        (x.placement_version, x.rebalances, x.window_steps),
        (1, 0, 4)
    );
    let b0 = &x.blocks[0];
    assert_eq!(b0.label, "vit 1");
    let want: Vec<f64> = routed[0].iter().map(|&n| n as f64 / 100.0).collect();
    assert_eq!(b0.load, want);
    assert!((b0.load_max_mean - 1.6).abs() < 1e-12);
    // Experts 4 and 5 share rank 2: 40 of 100 per step → 1.6 × the mean.
    assert!((b0.worker_load_max_mean - 1.6).abs() < 1e-12);
    assert!((b0.dropped_fraction - 0.05).abs() < 1e-12);
    assert_eq!((b0.window_assignments, b0.total_assignments), (400, 600));
    assert_eq!(x.blocks[1].load, vec![0.125; 8]);
    assert_eq!(x.blocks[1].holders, BlockPlacement::spread(8, 4).holders);
}

#[test]
fn moe_skewed_steps_lead_to_a_new_placement_for_rank_zero_until_acknowledged() {
    let (mut b, ids) = running_with(moe_config(true), 4);
    let skewed = [[40, 30, 5, 5, 5, 5, 5, 5], [10; 8]];
    for step in 1..=3 {
        assert!(moe_step(&mut b, &ids, step, &skewed, 1)
            .iter()
            .all(|r| r.placement.is_none()));
    }
    let before = b.status(0).experts.unwrap().blocks[0].worker_load_max_mean;
    assert!(before > 2.0, "{before}");
    let replies = moe_step(&mut b, &ids, 4, &skewed, 1);
    let wire = replies[0].placement.as_ref().expect("rank 0 hears of v2");
    assert_eq!((wire.version, replies[0].apply_at_step), (2, 5));
    assert!(replies[1..]
        .iter()
        .all(|r| *r == proto::StepReply::default()));
    let v2 = ExpertPlacement::from(wire);
    for blk in &v2.blocks {
        blk.validate(4).unwrap();
    }
    assert_eq!(
        v2.blocks[1],
        BlockPlacement::spread(8, 4),
        "balanced block kept"
    );
    let x = b.status(0).experts.unwrap();
    assert_eq!(
        (x.placement_version, x.acknowledged_version, x.rebalances),
        (2, 1, 1)
    );
    assert!(x.blocks[0].worker_load_max_mean < before);
    assert_eq!(x.blocks[0].holders, v2.blocks[0].holders);
    // Resent (unchanged) until rank 0 reports running v2.
    let again = moe_step(&mut b, &ids, 5, &skewed, 1);
    assert_eq!(again[0].placement.as_ref(), Some(wire));
    let acked = moe_step(&mut b, &ids, 6, &skewed, 2);
    assert!(acked[0].placement.is_none());
    assert_eq!(b.status(0).experts.unwrap().acknowledged_version, 2);
    // The balanced v2 holds through further windows of the same load.
    for step in 7..=20 {
        assert!(moe_step(&mut b, &ids, step, &skewed, 2)[0]
            .placement
            .is_none());
    }
    assert_eq!(b.status(0).experts.unwrap().placement_version, 2);
}

#[test]
fn moe_balanced_steps_keep_the_placement() {
    let (mut b, ids) = running_with(moe_config(true), 4);
    for step in 1..=20 {
        let replies = moe_step(
            &mut b,
            &ids,
            step,
            &[[11, 9, 10, 10, 10, 12, 9, 10], [5; 8]],
            1,
        );
        assert!(replies[0].placement.is_none());
    }
    let x = b.status(0).experts.unwrap();
    assert_eq!((x.placement_version, x.rebalances), (1, 0));
}

#[test]
fn moe_off_has_no_experts_and_a_malformed_report_is_refused_whole() {
    let (mut b, ids) = running(2, 4);
    assert_eq!(b.status(0).experts, None);
    let r = b.rendezvous(ids[0], b.generation(), 0, 0).unwrap().unwrap();
    assert_eq!(r.placement, None);

    let (mut b, ids) = running_with(moe_config(true), 4);
    let e = b
        .report_step(
            &proto::StepReport {
                worker_id: ids[0],
                generation: b.generation(),
                step: 1,
                global_samples: 16,
                expert_load: vec![proto::ExpertLoad {
                    block: 0,
                    routed: vec![1, 2, 3],
                    dropped: 0,
                }],
                ..Default::default()
            },
            0,
        )
        .unwrap_err();
    assert!(matches!(e, RpcError::InvalidArgument(_)), "{e:?}");
    assert!(e.to_string().contains("moe.experts is 8"), "{e}");
    let s = b.status(0);
    assert_eq!((s.step, s.samples_seen), (0, 0));
}

/// Rank 0's evaluation rounds land in the status history; another rank's, or a top-1 that is
/// not a fraction, are refused whole; a round that could not vote keeps its reason.
#[test]
fn evaluations_from_rank_zero_build_the_history() {
    let (mut b, ids) = running(2, 2);
    let g = b.generation();
    let report = |id: u64, step: u64, top1: f64, error: &str| proto::EvalReport {
        worker_id: id,
        generation: g,
        step,
        knn_top1: top1,
        knn_top5: 0.9,
        bank_samples: 2048,
        test_samples: 1024,
        seconds: 1.5,
        error: error.into(),
        ..Default::default()
    };
    b.report_eval(&report(ids[0], 0, 0.5, ""), 0).unwrap();
    let e = b.report_eval(&report(ids[1], 10, 0.6, ""), 0).unwrap_err();
    assert!(matches!(e, RpcError::InvalidArgument(_)), "{e:?}");
    assert!(e.to_string().contains("only rank 0"), "{e}");
    let e = b.report_eval(&report(ids[0], 10, 1.5, ""), 0).unwrap_err();
    assert!(e.to_string().contains("knn_top1 = 1.5"), "{e}");
    b.report_eval(&report(ids[0], 10, 0.7, ""), 0).unwrap();
    // NaN is only "not a fraction" when the round claims to have voted.
    b.report_eval(&report(ids[0], 20, f64::NAN, "no labelled sample"), 0)
        .unwrap();
    // A CLIP round's zero-shot and retrieval: kept when fractions, refused whole otherwise.
    let clip = |zs: f64| proto::EvalReport {
        zeroshot_top1: Some(zs),
        zeroshot_top5: Some(0.95),
        retrieval_mean_recall: Some(0.4),
        ..report(ids[0], 30, 0.8, "")
    };
    let e = b.report_eval(&clip(-0.1), 0).unwrap_err();
    assert!(e.to_string().contains("zeroshot_top1 = -0.1"), "{e}");
    b.report_eval(&clip(0.6), 0).unwrap();
    let h = b.status(0).eval_history;
    assert_eq!(h.len(), 4, "{h:?}");
    assert_eq!(
        (
            h[3].zeroshot_top1,
            h[3].retrieval_mean_recall,
            h[3].image_to_text_r1
        ),
        (Some(0.6), Some(0.4), None)
    );
    assert_eq!(
        h[0].zeroshot_top1, None,
        "a kNN-only round has no zero-shot"
    );
    assert_eq!(
        (h[0].step, h[0].knn_top1, h[0].bank_samples),
        (0, Some(0.5), 2048)
    );
    assert_eq!((h[1].step, h[1].knn_top1), (10, Some(0.7)));
    assert_eq!(
        (h[2].knn_top1, h[2].error.as_str()),
        (None, "no labelled sample")
    );
}

/// With `cluster.min_workers`, a death starts a new generation of the survivors (re-ranked in
/// their old order, the dead worker's leases and theirs back in the pool) instead of failing
/// the job; the survivors' heartbeats are not told to stop, their regroup rendezvous answers
/// with the new membership, and the job finishes when they do. Below `min_workers` it fails.
#[test]
fn survivors_regroup_when_min_workers_allows_and_the_job_finishes_with_them() {
    let mut cfg = config(3);
    cfg.cluster.min_workers = 2;
    cfg.cluster.lease_ttl_ms = 10 * TIMEOUT;
    cfg.train.global_batch = 24;
    let (mut b, ids) = running_with(cfg, 6);
    let g = b.generation();
    lease(&mut b, ids[0], 0, 0).unwrap();
    lease(&mut b, ids[1], 0, 0).unwrap();
    lease(&mut b, ids[1], 0, 0).unwrap();
    // Before anyone died, a regroup rendezvous waits.
    assert_eq!(b.rendezvous(ids[0], g, g, 0).unwrap(), None);
    // Rank 1 (the middle one) goes silent.
    let mut t = 0;
    while b.generation() == g {
        t += HEARTBEAT;
        for id in [ids[0], ids[2]] {
            let hb = heartbeat(&mut b, id, g, t).unwrap();
            assert!(!hb.stop, "{}", hb.reason);
        }
        b.tick(t);
        assert!(t <= TIMEOUT + HEARTBEAT, "rank 1 was never declared dead");
    }
    assert_eq!(b.state(), JobState::Running);
    assert_eq!(b.generation(), g + 1);
    let s = b.status(t);
    assert_eq!(
        (s.shards.pending, s.shards.leased),
        (6, 0),
        "every lease returned"
    );
    // Heartbeats of the old generation keep the survivors alive, not stopped.
    let hb = heartbeat(&mut b, ids[2], g, t + 1).unwrap();
    assert!(!hb.stop, "{}", hb.reason);
    // Each survivor's regroup rendezvous: old ranks 0 and 2 become 0 and 1 of a world of 2.
    for (id, rank) in [(ids[0], 0), (ids[2], 1)] {
        let r = b
            .rendezvous(id, g, g, t + 2)
            .unwrap()
            .expect("a new generation");
        assert_eq!((r.rank, r.world_size, r.generation), (rank, 2, g + 1));
        let other = [(1, "10.0.0.2:29502"), (0, "10.0.0.0:29500")][rank as usize];
        assert_eq!(peers(&r), [other]);
    }
    // The dead worker is fenced from regrouping.
    assert!(b.rendezvous(ids[1], g, g, t + 2).is_err());
    // Old-generation leases are refused; the new generation leases.
    assert!(b
        .lease(
            &proto::LeaseRequest {
                worker_id: ids[0],
                generation: g,
                epoch: 0,
                ..Default::default()
            },
            t + 3
        )
        .is_err());
    lease(&mut b, ids[0], 0, t + 3).unwrap();
    // Both members finish: the job finishes although a worker died.
    for id in [ids[0], ids[2]] {
        b.leave(
            &proto::LeaveRequest {
                worker_id: id,
                generation: g + 1,
                finished: true,
                error: String::new(),
            },
            t + 4,
        )
        .unwrap();
    }
    assert_eq!(b.state(), JobState::Finished);

    // Below min_workers, not waiting for replacements: the job fails at once and says why.
    let mut cfg = config(2);
    cfg.cluster.min_workers = 2;
    cfg.cluster.replacement_wait_ms = 0;
    let (mut b, ids) = running_with(cfg, 2);
    b.leave(
        &proto::LeaveRequest {
            worker_id: ids[1],
            generation: b.generation(),
            finished: false,
            error: "boom".into(),
        },
        1,
    )
    .unwrap();
    assert_eq!(b.state(), JobState::Failed);
    assert!(
        b.reason().contains("fewer than cluster.min_workers = 2"),
        "{}",
        b.reason()
    );
    let _ = ids;
}

/// With `cluster.min_workers`, a worker registering while the job runs waits without a rank;
/// the members' heartbeats ask them to regroup; the first member's regroup rendezvous starts
/// the next generation with the members first and the replacement last, whose rendezvous says
/// `joining` (and carries no checkpoint to resume from). A full world refuses a replacement.
#[test]
fn a_replacement_waits_then_joins_at_the_next_regroup() {
    let mut cfg = config(3);
    cfg.cluster.min_workers = 2;
    cfg.train.global_batch = 24;
    let (mut b, ids) = running_with(cfg, 6);
    let g = b.generation();
    // The world is full: no room for another worker.
    assert!(matches!(
        b.register(&registration("host", "10.0.0.9:29509", 0), 1),
        Err(RpcError::ResourceExhausted(_))
    ));
    // Rank 2 leaves with an error; ranks 0 and 1 regroup as generation g + 1.
    fail_worker(&mut b, ids[2], g, 2);
    assert_eq!((b.state(), b.generation()), (JobState::Running, g + 1));
    for id in [ids[0], ids[1]] {
        b.rendezvous(id, g, g, 3).unwrap().expect("regrouped");
    }
    // A replacement registers; it waits, and the members are asked to regroup.
    let (new, at) = b
        .register(&registration("host", "10.0.0.2:29502", 0), 4)
        .unwrap();
    assert_eq!(at, g + 1);
    assert_eq!(b.rendezvous(new, at, 0, 5).unwrap(), None);
    let hb = heartbeat(&mut b, ids[0], g + 1, 6).unwrap();
    assert!(hb.regroup && !hb.stop, "{hb:?}");
    // Member 0 stops at a step boundary and regroups: generation g + 2 takes the replacement.
    let r0 = b
        .rendezvous(ids[0], g + 1, g + 1, 7)
        .unwrap()
        .expect("regrouped");
    assert_eq!((r0.rank, r0.world_size, r0.generation), (0, 3, g + 2));
    assert!(!r0.joining);
    let r1 = b
        .rendezvous(ids[1], g + 1, g + 1, 7)
        .unwrap()
        .expect("regrouped");
    assert_eq!(r1.rank, 1);
    let rn = b.rendezvous(new, at, 0, 8).unwrap().expect("taken in");
    assert_eq!((rn.rank, rn.world_size, rn.generation), (2, 3, g + 2));
    assert!(rn.joining && rn.resume_checkpoint.is_empty());
    assert!(peers(&r0).contains(&(2, "10.0.0.2:29502")), "{r0:?}");
    assert_eq!(peers(&rn), [(0, "10.0.0.0:29500"), (1, "10.0.0.1:29501")]);
    // Nobody waits any more: no regroup request.
    assert!(!heartbeat(&mut b, ids[0], g + 2, 9).unwrap().regroup);
}

/// A replacement that dies while it waits to join (its rendezvous call stops) is declared
/// dead after `worker_timeout_ms` and never taken into a generation: the members are no
/// longer asked to regroup for it, and the generation stays.
#[test]
fn a_replacement_that_dies_while_waiting_is_never_taken_in() {
    let mut cfg = config(3);
    cfg.cluster.min_workers = 2;
    cfg.train.global_batch = 24;
    let (mut b, ids) = running_with(cfg, 6);
    let g = b.generation();
    fail_worker(&mut b, ids[2], g, 0);
    let (ghost, at) = b
        .register(&registration("host", "10.0.0.7:29507", 0), 0)
        .unwrap();
    assert_eq!(b.rendezvous(ghost, at, 0, 10).unwrap(), None);
    assert!(heartbeat(&mut b, ids[0], g + 1, 10).unwrap().regroup);
    // The members keep heartbeating; the replacement's call stopped at t = 10.
    let mut t = 10;
    while t <= 10 + TIMEOUT + HEARTBEAT {
        t += HEARTBEAT;
        for id in [ids[0], ids[1]] {
            heartbeat(&mut b, id, g + 1, t).unwrap();
        }
        b.tick(t);
    }
    let s = b.status(t);
    let w = s.workers.iter().find(|w| w.worker_id == ghost).unwrap();
    assert_eq!(w.state, WorkerLiveness::Dead);
    assert!(!heartbeat(&mut b, ids[0], g + 1, t).unwrap().regroup);
    assert_eq!((b.state(), b.generation()), (JobState::Running, g + 1));
}

/// A survivor's regroup names the peer whose connection failed: that worker, silent since,
/// is declared dead after two heartbeat periods instead of `worker_timeout_ms`; a reported
/// worker that still heartbeats stays alive.
#[test]
fn a_reported_peer_that_stays_silent_dies_after_two_heartbeats() {
    let mut cfg = config(3);
    cfg.cluster.min_workers = 2;
    cfg.train.global_batch = 24;
    let (mut b, ids) = running_with(cfg, 6);
    let g = b.generation();
    // Rank 0 reports rank 1 at t = 0; rank 1 keeps heartbeating: a wrong report.
    assert_eq!(
        b.rendezvous_reporting(ids[0], g, g, Some(1), 0).unwrap(),
        None
    );
    let mut t = 0;
    while t < 4 * HEARTBEAT {
        t += HEARTBEAT;
        for id in &ids {
            heartbeat(&mut b, *id, g, t).unwrap();
        }
        b.tick(t);
    }
    assert_eq!(b.generation(), g, "a live worker was declared dead");
    // Now rank 2 falls silent and rank 1 reports it: dead long before the worker timeout.
    let reported = t;
    assert_eq!(
        b.rendezvous_reporting(ids[1], g, g, Some(2), t).unwrap(),
        None
    );
    while b.generation() == g {
        t += HEARTBEAT / 2;
        for id in [ids[0], ids[1]] {
            heartbeat(&mut b, id, g, t).unwrap();
        }
        b.tick(t);
        assert!(
            t - reported <= 3 * HEARTBEAT,
            "the reported peer was not declared dead"
        );
    }
    assert!(t - reported < TIMEOUT);
    let s = b.status(t);
    let dead = s
        .workers
        .iter()
        .find(|w| w.state == WorkerLiveness::Dead)
        .unwrap();
    assert_eq!(dead.worker_id, ids[2]);
}

/// An MoE worker dies (`cluster.min_workers`): its experts are gone, so no regroup happens
/// until the coordinator has read the latest checkpoint; then the shard book and progress
/// return to it, the survivors form the next generation with a placement over their number,
/// and their rendezvous says `rollback` with the checkpoint; `/status` lists the rollback. A
/// replacement that registers meanwhile waits out the rollback, then joins at the members'
/// next step boundary with a replica of its own; without a checkpoint the job fails.
#[test]
fn a_dead_moe_worker_rolls_the_members_back_to_the_checkpoint() {
    let mut cfg = moe_config(false);
    cfg.cluster.min_workers = 2;
    // 12 experts and 48 samples a step divide evenly over 4 workers and over the 3 left.
    cfg.moe.experts = 12;
    cfg.train.global_batch = 48;
    cfg.validate().unwrap();
    let (mut b, ids) = running_with(cfg.clone(), 6);
    let g = b.generation();
    for id in &ids {
        let l = lease(&mut b, *id, 1, 0).unwrap();
        complete(&mut b, *id, l.lease_id, 10, &[], "");
    }
    fail_worker(&mut b, ids[3], g, 5);
    assert!(b.rollback_due());
    assert_eq!((b.state(), b.generation()), (JobState::Running, g));
    assert_eq!(b.rendezvous(ids[0], g, g, 6).unwrap(), None);
    // A replacement may register; it waits out the rollback.
    let (newcomer, _) = b
        .register(&registration("host", "10.0.0.9:29509", 0), 7)
        .unwrap();

    let urls = urls(6);
    let mut shard_state = ShardStateSnapshot {
        epoch: 1,
        samples_seen: 40,
        ..Default::default()
    };
    shard_state.done.insert(urls[0].clone(), 10);
    let meta = CheckpointMeta {
        step: 40,
        epoch: 1,
        world_size: 4,
        shard_state,
        config_toml: String::new(),
        created_unix_ms: 0,
        run: String::new(),
    };
    b.apply_rollback(Ok(("memory://ck/step-00000040".into(), meta)));
    assert!(!b.rollback_due());
    assert_eq!(b.generation(), g + 1);
    let r = b.rendezvous(ids[0], g, g, 8).unwrap().expect("rolled back");
    assert!(r.rollback && !r.joining);
    assert_eq!((r.world_size, r.resume_step, r.resume_epoch), (3, 40, 1));
    assert_eq!(r.resume_checkpoint, "memory://ck/step-00000040");
    let placement = contrail_common::experts::ExpertPlacement::from(&r.placement.unwrap());
    let holders: std::collections::BTreeSet<u32> = placement.blocks[0]
        .holders
        .iter()
        .flatten()
        .copied()
        .collect();
    assert_eq!(
        holders,
        (0..3).collect(),
        "every expert lives on the 3 members left"
    );
    let s = b.status(9);
    assert_eq!((s.step, s.epoch), (40, 1));
    assert_eq!(s.shards.done, 1, "the book is the checkpoint's");
    assert_eq!(s.rollbacks.len(), 1);
    assert!(s.rollbacks[0].contains("rolled back to memory://ck/step-00000040"));
    assert_eq!(
        b.rendezvous(newcomer, g, 0, 9).unwrap(),
        None,
        "not in the rollback"
    );

    // Then it joins at the members' next step boundary, with a replica of its own.
    let members = [ids[0], ids[1], ids[2]];
    let hb = b
        .heartbeat(
            &proto::HeartbeatRequest {
                worker_id: ids[0],
                generation: g + 1,
                ..Default::default()
            },
            10,
        )
        .unwrap();
    assert!(hb.regroup);
    let r = b.rendezvous(members[0], g + 1, g + 1, 11).unwrap().unwrap();
    assert_eq!((r.generation, r.world_size, r.rollback), (g + 2, 4, false));
    let joined = b.rendezvous(newcomer, g + 1, 0, 12).unwrap().unwrap();
    assert!(joined.joining && !joined.rollback && joined.resume_checkpoint.is_empty());
    assert_eq!(joined.rank, 3);
    let grown = contrail_common::experts::ExpertPlacement::from(&joined.placement.unwrap());
    assert!(grown.version > placement.version);
    for block in &grown.blocks {
        block.validate(4).unwrap();
        assert!(!block.local_experts(3).is_empty());
    }

    // Without a checkpoint to go back to, the job fails and says why.
    let (mut b, ids) = running_with(cfg, 6);
    let g = b.generation();
    fail_worker(&mut b, ids[3], g, 5);
    b.apply_rollback(Err("checkpoint.url is not set".into()));
    assert_eq!(b.state(), JobState::Failed);
    assert!(
        b.reason().contains("no checkpoint to roll back to"),
        "{}",
        b.reason()
    );
}

/// 2 experts on 4 workers (each expert on 2 of them), `cluster.min_workers = 2`.
fn replicated_moe_config() -> JobConfig {
    let mut cfg = moe_config(false);
    cfg.cluster.min_workers = 2;
    cfg.moe.experts = 2;
    // 48 samples a step divide evenly over 4 workers and over 3.
    cfg.train.global_batch = 48;
    cfg.validate().unwrap();
    cfg
}

/// An MoE worker dies, but every expert it held has a replica on a survivor: no rollback.
/// The survivors form the next generation at once, with a placement (a new version) that
/// keeps each expert's surviving replicas under their new ranks, and train on from their own
/// state. When a later death takes an expert's last replica, they roll back after all.
#[test]
fn a_dead_moe_worker_whose_experts_have_replicas_leaves_the_survivors_training() {
    let (mut b, ids) = running_with(replicated_moe_config(), 6);
    let g = b.generation();
    // Spread: expert 0 on ranks {0, 2}, expert 1 on {1, 3}. Rank 1 dies.
    fail_worker(&mut b, ids[1], g, 5);
    assert!(!b.rollback_due());
    assert_eq!((b.state(), b.generation()), (JobState::Running, g + 1));
    let r = b.rendezvous(ids[3], g, g, 6).unwrap().expect("regrouped");
    assert!(!r.rollback && !r.joining);
    assert_eq!((r.rank, r.world_size), (2, 3));
    assert_eq!(r.resume_checkpoint, "", "the state comes from the members");
    let p = ExpertPlacement::from(&r.placement.unwrap());
    assert_eq!(p.version, 2);
    let kept = BlockPlacement {
        holders: vec![vec![0, 1], vec![2]],
    };
    assert_eq!(p.blocks, vec![kept; 2]);
    assert!(b.status(7).rollbacks.is_empty());

    // ids[3] (now rank 2) held the last replica of expert 1.
    fail_worker(&mut b, ids[3], g + 1, 8);
    assert!(b.rollback_due());
    assert_eq!(b.generation(), g + 1);
}

/// The survivors find, over their new mesh, that an expert survives only a step behind the
/// others: each member asks for a rollback (the first request counts), and the coordinator
/// rolls them back to the checkpoint with a placement over the 3 left (which the default
/// spread cannot serve: 2 experts on 3 workers).
#[test]
fn members_that_cannot_agree_on_an_moe_state_roll_back_on_request() {
    let (mut b, ids) = running_with(replicated_moe_config(), 6);
    let g = b.generation();
    fail_worker(&mut b, ids[1], g, 5);
    let why = "expert 1 of MoE block 0 survives only a step behind";
    // A stale generation's report is ignored; a member of the new one is heard.
    b.request_rollback(ids[0], g, why).unwrap();
    assert!(!b.rollback_due());
    b.request_rollback(ids[0], g + 1, why).unwrap();
    assert!(b.rollback_due());
    b.request_rollback(ids[2], g + 1, why).unwrap();
    assert!(matches!(
        b.request_rollback(ids[1], g + 1, why),
        Err(RpcError::FailedPrecondition(_))
    ));
    // A replacement registering now does not make the members regroup before the rollback.
    let (newcomer, _) = b
        .register(&registration("host", "10.0.0.9:29509", 0), 6)
        .unwrap();
    assert_eq!(b.rendezvous(ids[0], g + 1, g + 1, 7).unwrap(), None);
    assert_eq!(b.generation(), g + 1);
    let meta = CheckpointMeta {
        step: 20,
        epoch: 0,
        world_size: 4,
        shard_state: ShardStateSnapshot::default(),
        config_toml: String::new(),
        created_unix_ms: 0,
        run: String::new(),
    };
    b.apply_rollback(Ok(("memory://ck/step-00000020".into(), meta)));
    assert_eq!(b.generation(), g + 2);
    let r = b.rendezvous(ids[2], g + 1, g + 1, 8).unwrap().unwrap();
    assert!(r.rollback);
    assert_eq!((r.world_size, r.resume_step), (3, 20));
    assert_eq!(
        b.rendezvous(newcomer, g, 0, 8).unwrap(),
        None,
        "joins after the rollback"
    );
    let p = ExpertPlacement::from(&r.placement.unwrap());
    for block in &p.blocks {
        block.validate(3).unwrap();
    }
    let s = b.status(9);
    assert_eq!(s.rollbacks.len(), 1);
    assert!(s.rollbacks[0].contains(why), "{}", s.rollbacks[0]);

    // A job without MoE blocks has nothing to roll back this way.
    let (mut b, ids) = running_with(config(4), 6);
    let g = b.generation();
    assert!(matches!(
        b.request_rollback(ids[0], g, why),
        Err(RpcError::InvalidArgument(_))
    ));
}

/// Rank `local_rank` of `node`, which runs `local_ranks`.
fn node_rank(
    node: &str,
    local_rank: u32,
    local_ranks: u32,
    address: &str,
) -> proto::RegisterRequest {
    proto::RegisterRequest {
        host: node.into(),
        collective_address: address.into(),
        node: node.into(),
        local_rank,
        local_ranks,
        ..Default::default()
    }
}

/// Registers (node, local rank) of two-rank nodes in `order`, which completes the world;
/// their worker ids.
fn register_nodes(b: &mut JobBook, order: &[(&str, u32)]) -> Vec<u64> {
    let ids = order
        .iter()
        .enumerate()
        .map(|(i, (node, local))| {
            b.register(&node_rank(node, *local, 2, &format!("10.0.0.{i}:1")), 0)
                .unwrap()
                .0
        })
        .collect();
    assert_eq!(b.state(), JobState::Running);
    ids
}

/// Ranks are node-major whatever order the node workers' ranks register in: node `a` (whose
/// rank registered first) gets ranks 0–1, node `b` ranks 2–3, each node's in local order.
#[test]
fn ranks_are_node_major_in_the_order_nodes_first_registered() {
    let mut b = JobBook::new(config(4), "toml".into(), urls(4), None);
    let ids = register_nodes(&mut b, &[("a", 0), ("b", 1), ("b", 0), ("a", 1)]);
    let rank = |b: &mut JobBook, id| b.rendezvous(id, 1, 0, 1).unwrap().expect("world").rank;
    let ranks: Vec<u32> = ids.iter().map(|id| rank(&mut b, *id)).collect();
    assert_eq!(ranks, vec![0, 3, 2, 1]);
    let status = b.status(2);
    let by_rank: Vec<(String, u32)> = status
        .workers
        .iter()
        .map(|w| (w.node.clone(), w.local_rank))
        .collect();
    assert_eq!(
        by_rank,
        [("a", 0), ("a", 1), ("b", 0), ("b", 1)].map(|(n, l)| (n.to_string(), l))
    );
    assert_eq!(contrail_common::status::node_count(&status.workers), 2);
}

#[test]
fn a_node_slot_is_checked_at_registration() {
    let mut b = JobBook::new(config(4), "toml".into(), urls(4), None);
    b.register(&node_rank("a", 0, 2, "10.0.0.1:1"), 0).unwrap();
    let e = b
        .register(&node_rank("a", 0, 2, "10.0.0.2:1"), 0)
        .unwrap_err();
    assert!(e.to_string().contains("already registered"), "{e}");
    let e = b
        .register(&node_rank("a", 1, 3, "10.0.0.2:1"), 0)
        .unwrap_err();
    assert!(e.to_string().contains("with 2 local ranks before"), "{e}");
    let e = b
        .register(&node_rank("c", 2, 2, "10.0.0.3:1"), 0)
        .unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
}

/// Two nodes of two ranks, `cluster.min_workers = 2`, running.
fn two_nodes_of_two() -> (JobBook, Vec<u64>) {
    let mut cfg = config(4);
    cfg.cluster.min_workers = 2;
    let mut b = JobBook::new(cfg, "toml".into(), urls(8), None);
    let ids = register_nodes(&mut b, &[("a", 0), ("a", 1), ("b", 0), ("b", 1)]);
    (b, ids)
}

/// A node is one failure domain: when a survivor reports rank 2 and it stays silent, rank 2
/// and its node-mate rank 3 (which would otherwise be found only after worker_timeout_ms)
/// leave in one regroup: one new generation of two ranks, not two generations.
#[test]
fn a_dead_node_leaves_whole_in_one_regroup() {
    let (mut b, ids) = two_nodes_of_two();
    let g = b.generation();
    for id in &ids {
        heartbeat(&mut b, *id, g, 10).unwrap();
    }
    // Rank 0 names rank 2 in its regroup call; nothing is decided yet.
    assert_eq!(
        b.rendezvous_reporting(ids[0], g, g, Some(2), 20).unwrap(),
        None
    );
    heartbeat(&mut b, ids[0], g, 40).unwrap();
    heartbeat(&mut b, ids[1], g, 40).unwrap();
    b.tick(20 + 2 * HEARTBEAT + 1);
    assert_eq!(b.generation(), g + 1, "one regroup for the whole node");
    assert_eq!(b.state(), JobState::Running);
    let status = b.status(200);
    let dead: Vec<u64> = status
        .workers
        .iter()
        .filter(|w| w.state == WorkerLiveness::Dead)
        .map(|w| w.worker_id)
        .collect();
    assert_eq!(dead, vec![ids[2], ids[3]]);
    for (i, id) in ids[..2].iter().enumerate() {
        let r = b.rendezvous(*id, g, g, 130).unwrap().expect("regrouped");
        assert_eq!((r.rank, r.world_size, r.generation), (i as u32, 2, g + 1));
    }
    // Nothing more happens when rank 3's own timeout would have passed.
    heartbeat(&mut b, ids[0], g + 1, 300).unwrap();
    heartbeat(&mut b, ids[1], g + 1, 300).unwrap();
    b.tick(310);
    assert_eq!(b.generation(), g + 1);
}

/// A rank that fails takes its node-mate out with it, in the same regroup.
#[test]
fn a_failed_rank_takes_its_node_out_with_it() {
    let (mut b, ids) = two_nodes_of_two();
    let g = b.generation();
    fail_worker(&mut b, ids[1], g, 5);
    assert_eq!((b.state(), b.generation()), (JobState::Running, g + 1));
    let r = b.rendezvous(ids[2], g, g, 6).unwrap().expect("regrouped");
    assert_eq!((r.rank, r.world_size), (0, 2));
    // Node a's other rank is fenced.
    let e = heartbeat(&mut b, ids[0], g, 7).unwrap_err();
    assert!(e.to_string().contains("its node lost rank 1"), "{e}");
}

/// A replacement node joins whole: its first rank waits without asking the members to
/// regroup; once its second rank registered, the members regroup and the node gets the
/// contiguous ranks 2–3 in local order, whatever order they registered in.
#[test]
fn a_replacement_node_joins_whole_with_contiguous_ranks() {
    let (mut b, ids) = two_nodes_of_two();
    let g = b.generation();
    fail_worker(&mut b, ids[3], g, 5);
    assert_eq!(b.generation(), g + 1);
    let g = g + 1;
    let (c1, at) = b.register(&node_rank("c", 1, 2, "10.0.0.8:1"), 10).unwrap();
    assert_eq!(b.rendezvous(c1, at, 0, 11).unwrap(), None);
    let hb = heartbeat(&mut b, ids[0], g, 12).unwrap();
    assert!(!hb.regroup, "half a node does not join: {hb:?}");
    let (c0, _) = b.register(&node_rank("c", 0, 2, "10.0.0.9:1"), 13).unwrap();
    let hb = heartbeat(&mut b, ids[0], g, 14).unwrap();
    assert!(hb.regroup, "{hb:?}");
    let r0 = b.rendezvous(ids[0], g, g, 15).unwrap().expect("regrouped");
    assert_eq!((r0.rank, r0.world_size, r0.generation), (0, 4, g + 1));
    let rc0 = b.rendezvous(c0, at, 0, 16).unwrap().expect("taken in");
    let rc1 = b.rendezvous(c1, at, 0, 16).unwrap().expect("taken in");
    assert_eq!((rc0.rank, rc1.rank), (2, 3));
    assert!(rc0.joining && rc1.joining);
    assert!(peers(&rc0).contains(&(3, "10.0.0.8:1")), "{rc0:?}");
    assert!(peers(&rc1).contains(&(2, "10.0.0.9:1")), "{rc1:?}");
}
