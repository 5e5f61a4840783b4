//! SwAV against lightly 1.6.0 (`SwaVLoss` and `sinkhorn`), then distributed Sinkhorn
//! equivalence: two in-process ranks splitting the batch 5 + 3 must produce the same code rows,
//! the same total loss and the same gradients as one rank holding the whole batch.
//!
//! Fixture: tests/fixtures/reference/swav/swav.safetensors, written by make_fixtures.py next
//! to it (2 high-res + 2 low-res crops, B = 8, K = 5, ε = 0.05, 3 iterations, τ = 0.1; and
//! the same with a queue of 6 scored features per high-res crop).

use contrail_worker::dist::local::LocalGroup;
use contrail_worker::objective::swav::{sinkhorn, swav_loss, swav_loss_with_queue};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};

const TOLERANCE: f64 = 1e-5;
const VIEWS: [&str; 4] = ["high0", "high1", "low0", "low1"];
const SPLIT: [i64; 2] = [5, 3];

/// Loss settings (plain values, so rank threads can share them; tensors are not `Sync`).
#[derive(Clone, Copy)]
struct Params {
    temperature: f64,
    epsilon: f64,
    iterations: usize,
}

struct Fixture {
    all: BTreeMap<String, Tensor>,
    params: Params,
}

impl Fixture {
    fn load() -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/reference/swav/swav.safetensors");
        let all: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
            .unwrap_or_else(|e| {
                panic!(
                    "reading {}: {e} (regenerate with make_fixtures.py)",
                    path.display()
                )
            })
            .into_iter()
            .collect();
        let scalar = |k: &str| {
            all.get(k)
                .unwrap_or_else(|| panic!("fixture lacks {k}"))
                .double_value(&[])
        };
        let (temperature, epsilon) = (scalar("temperature"), scalar("epsilon"));
        let iterations = scalar("iterations") as usize;
        Self {
            all,
            params: Params {
                temperature,
                epsilon,
                iterations,
            },
        }
    }

    fn get(&self, name: &str) -> &Tensor {
        let t = self
            .all
            .get(name)
            .unwrap_or_else(|| panic!("fixture lacks {name}"));
        assert_eq!(t.kind(), Kind::Float, "{name}: fixtures are float32");
        t
    }

    /// Rows `start..start+len` of every view's scores, as fresh leaves with gradient.
    fn leaves(&self, start: i64, len: i64) -> Vec<Tensor> {
        VIEWS
            .iter()
            .map(|v| {
                self.get(v)
                    .narrow(0, start, len)
                    .copy()
                    .set_requires_grad(true)
            })
            .collect()
    }
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let diff = (got - want).abs().max().double_value(&[]);
    println!("{what}: max abs diff {diff:.2e}");
    assert!(diff <= TOLERANCE, "{what}: max abs diff {diff}");
}

/// What one rank computes: codes of both high-res crops, its loss share, d share / d views.
struct RankOut {
    codes: Vec<Tensor>,
    loss: f64,
    grads: Vec<Tensor>,
}

fn run_rank(
    p: Params,
    views: Vec<Tensor>,
    coll: &dyn contrail_worker::dist::Collective,
) -> RankOut {
    let (tau, eps, iters) = (p.temperature, p.epsilon, p.iterations);
    let codes = views[..2]
        .iter()
        .map(|h| sinkhorn(h, eps, iters, coll).expect("sinkhorn"))
        .collect();
    let loss = swav_loss(&views[..2], &views[2..], tau, eps, iters, coll).expect("swav loss");
    assert_eq!(loss.size(), Vec::<i64>::new(), "loss is a scalar");
    let refs: Vec<&Tensor> = views.iter().collect();
    let grads = Tensor::run_backward(&[&loss], &refs, false, false);
    RankOut {
        codes,
        loss: loss.double_value(&[]),
        grads,
    }
}

#[test]
fn world_one_matches_lightly() {
    let f = Fixture::load();
    let coll = LocalGroup::new(1).remove(0);
    let b = f.get("high0").size()[0];
    let out = run_rank(f.params, f.leaves(0, b), &coll);
    for (i, q) in out.codes.iter().enumerate() {
        assert_close(&format!("q{i}"), q, f.get(&format!("q{i}")));
    }
    let want = f.get("loss").reshape([]);
    assert_close("loss", &Tensor::from(out.loss as f32), &want);
    for (v, g) in VIEWS.iter().zip(&out.grads) {
        assert_close(&format!("d/d{v}"), g, f.get(&format!("grad_{v}")));
    }
    println!(
        "loss {:.6} (lightly {:.6})",
        out.loss,
        want.double_value(&[])
    );
}

#[test]
fn two_ranks_split_five_three_match_one_rank() {
    let f = Fixture::load();
    let b = f.get("high0").size()[0];
    assert_eq!(
        SPLIT.iter().sum::<i64>(),
        b,
        "split must cover the fixture batch"
    );
    let single = run_rank(f.params, f.leaves(0, b), &LocalGroup::new(1).remove(0));

    let group = LocalGroup::new(SPLIT.len());
    let mut starts = vec![0i64];
    for c in &SPLIT[..SPLIT.len() - 1] {
        starts.push(starts.last().copied().unwrap_or(0) + c);
    }
    let parts: Vec<Vec<Tensor>> = starts
        .iter()
        .zip(SPLIT)
        .map(|(&s, n)| f.leaves(s, n))
        .collect();
    let params = f.params;
    let ranks: Vec<RankOut> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .zip(parts)
            .map(|(c, views)| s.spawn(move || run_rank(params, views, c)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });

    for i in 0..2 {
        let rows: Vec<&Tensor> = ranks.iter().map(|r| &r.codes[i]).collect();
        assert_close(
            &format!("q{i} (2 ranks)"),
            &Tensor::cat(&rows, 0),
            &single.codes[i],
        );
    }
    let total: f64 = ranks.iter().map(|r| r.loss).sum();
    println!(
        "loss shares {:?}, total {total:.6}, one rank {:.6}",
        ranks.iter().map(|r| r.loss).collect::<Vec<_>>(),
        single.loss
    );
    assert!(
        (total - single.loss).abs() <= TOLERANCE,
        "{total} vs {}",
        single.loss
    );
    // Each share is a real part of the loss, not a copy of it.
    assert!((ranks[0].loss - single.loss).abs() > 1e-2);
    for (j, v) in VIEWS.iter().enumerate() {
        let rows: Vec<&Tensor> = ranks.iter().map(|r| &r.grads[j]).collect();
        assert_close(
            &format!("d/d{v} (2 ranks)"),
            &Tensor::cat(&rows, 0),
            &single.grads[j],
        );
    }
}

#[test]
fn codes_of_one_rank_alone_differ_from_distributed_codes() {
    // Guards the test above: without the all-reduce (each rank normalising over its own
    // rows) the codes would differ, so matching them really checks the distributed sums.
    let f = Fixture::load();
    let alone = LocalGroup::new(1).remove(0);
    let local = sinkhorn(
        &f.get("high0").narrow(0, 0, SPLIT[0]),
        f.params.epsilon,
        f.params.iterations,
        &alone,
    )
    .expect("sinkhorn");
    let global = f.get("q0").narrow(0, 0, SPLIT[0]);
    let diff = (&local - &global).abs().max().double_value(&[]);
    assert!(
        diff > 1e-3,
        "local-only codes match global ones (diff {diff})"
    );
}

/// Loss share and d share / d views of one rank with a queue (queue rows `qstart..+qlen`).
fn run_queue_rank(
    f: &Fixture,
    coll: &dyn contrail_worker::dist::Collective,
    (start, len): (i64, i64),
    (qstart, qlen): (i64, i64),
) -> (f64, Vec<Tensor>) {
    let p = f.params;
    let views = f.leaves(start, len);
    let queues: Vec<Tensor> = ["queue0", "queue1"]
        .iter()
        .map(|q| f.get(q).narrow(0, qstart, qlen).copy())
        .collect();
    let loss = swav_loss_with_queue(
        &views[..2],
        &views[2..],
        Some(&queues),
        p.temperature,
        p.epsilon,
        p.iterations,
        coll,
    )
    .expect("swav loss with queue");
    let refs: Vec<&Tensor> = views.iter().collect();
    let grads = Tensor::run_backward(&[&loss], &refs, false, false);
    (loss.double_value(&[]), grads)
}

#[test]
fn queue_matches_lightly_on_one_and_two_ranks() {
    let f = Fixture::load();
    let (b, nq) = (f.get("high0").size()[0], f.get("queue0").size()[0]);
    let want = f.get("queue.loss").double_value(&[0]);
    // The queue must change the loss, or this test would not exercise it.
    assert!((want - f.get("loss").double_value(&[0])).abs() > 1e-3);

    let one = LocalGroup::new(1).remove(0);
    for i in 0..2 {
        let all = Tensor::cat(
            &[f.get(&format!("high{i}")), f.get(&format!("queue{i}"))],
            0,
        );
        let q = sinkhorn(&all, f.params.epsilon, f.params.iterations, &one).expect("sinkhorn");
        assert_close(
            &format!("queue q{i}"),
            &q.narrow(0, 0, b),
            f.get(&format!("queue.q{i}")),
        );
    }
    let (loss, grads) = run_queue_rank(&f, &one, (0, b), (0, nq));
    println!("queue loss {loss:.6} (lightly {want:.6})");
    assert!((loss - want).abs() <= TOLERANCE, "{loss} vs {want}");
    for (v, g) in VIEWS.iter().zip(&grads) {
        assert_close(
            &format!("queue d/d{v}"),
            g,
            f.get(&format!("queue.grad_{v}")),
        );
    }

    // Two ranks: batch 5 + 3, queue 4 + 2 (Sinkhorn is invariant to the order of samples).
    let group = LocalGroup::new(2);
    let (c0, c1) = (&group[0], &group[1]);
    let bq = (SPLIT[0], 4);
    let (r0, r1) = std::thread::scope(|s| {
        // Fixture tensors are not Sync: each thread gets its own copy of the file's tensors.
        let h0 = s.spawn(move || {
            let f = Fixture::load();
            run_queue_rank(&f, c0, (0, bq.0), (0, bq.1))
        });
        let h1 = s.spawn(move || {
            let f = Fixture::load();
            run_queue_rank(&f, c1, (bq.0, b - bq.0), (bq.1, nq - bq.1))
        });
        (h0.join().expect("rank 0"), h1.join().expect("rank 1"))
    });
    let total = r0.0 + r1.0;
    println!("queue loss shares {:.6} + {:.6} = {total:.6}", r0.0, r1.0);
    assert!((total - want).abs() <= TOLERANCE, "{total} vs {want}");
    for (j, v) in VIEWS.iter().enumerate() {
        let g = Tensor::cat(&[&r0.1[j], &r1.1[j]], 0);
        assert_close(
            &format!("queue d/d{v} (2 ranks)"),
            &g,
            f.get(&format!("queue.grad_{v}")),
        );
    }
}
