//! Our contrastive objectives against the reference libraries: lightly's `NTXentLoss`
//! (lightly 1.6.0, without and with a memory bank, the latter being MoCo v2's loss) and
//! open_clip's `ClipLoss` (open_clip_torch 3.3.0), at world size 1.
//!
//! The fixture (tests/fixtures/reference/objectives/objectives.safetensors, written by
//! make_fixtures.py next to it) holds fixed inputs, the reference loss and the reference
//! gradients w.r.t. the inputs. Each case is checked twice: with the single-process function
//! and with the distributed "local anchors" form summed over simulated ranks (one of them
//! empty), which must reproduce the same global loss and gradients.

use contrail_worker::objective::clip::{clip_local_loss, clip_loss, LocalPairs};
use contrail_worker::objective::moco::{moco_loss, moco_query_losses};
use contrail_worker::objective::{nt_xent_anchor_losses, nt_xent_loss, LocalAnchors};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};

const TOLERANCE: f64 = 1e-5;
/// Per-rank sample counts of the simulated split; the last rank takes the remainder.
const SPLIT: [i64; 3] = [3, 0, 1];

fn fixtures() -> BTreeMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/reference/objectives/objectives.safetensors");
    let tensors = Tensor::read_safetensors(&path).unwrap_or_else(|e| {
        panic!(
            "reading {}: {e} (regenerate with make_fixtures.py)",
            path.display()
        )
    });
    tensors.into_iter().collect()
}

/// Case names with the given prefix, discovered from their `.loss` entries.
fn cases(all: &BTreeMap<String, Tensor>, prefix: &str) -> Vec<String> {
    let found: Vec<String> = all
        .keys()
        .filter_map(|k| k.strip_suffix(".loss"))
        .filter(|c| c.starts_with(prefix))
        .map(str::to_owned)
        .collect();
    assert!(found.len() >= 2, "fixture has only {found:?} for {prefix}*");
    found
}

fn field<'a>(all: &'a BTreeMap<String, Tensor>, case: &str, name: &str) -> &'a Tensor {
    all.get(&format!("{case}.{name}"))
        .unwrap_or_else(|| panic!("fixture lacks {case}.{name}"))
}

fn leaf(t: &Tensor) -> Tensor {
    assert_eq!(t.kind(), Kind::Float, "fixtures are float32");
    t.detach().copy().set_requires_grad(true)
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let diff = (got - want).abs().max().double_value(&[]);
    println!("{what}: max abs diff {diff:.2e}");
    assert!(diff <= TOLERANCE, "{what}: max abs diff {diff}");
}

/// Local sample counts for `n` samples: SPLIT, then whatever is left on one more rank.
fn split(n: i64) -> Vec<i64> {
    let mut counts: Vec<i64> = SPLIT.to_vec();
    let used: i64 = counts.iter().sum();
    assert!(n > used, "case too small for the split");
    counts.push(n - used);
    counts
}

#[test]
fn nt_xent_matches_lightly() {
    let all = fixtures();
    for case in cases(&all, "ntxent_") {
        let (out0, out1) = (field(&all, &case, "out0"), field(&all, &case, "out1"));
        let tau = field(&all, &case, "temperature").double_value(&[]);
        let want = field(&all, &case, "loss");
        let (v1, v2) = (leaf(out0), leaf(out1));
        let loss = nt_xent_loss(&v1, &v2, tau);
        assert_close(&format!("{case} loss"), &loss, want);
        let g = Tensor::run_backward(&[&loss], &[&v1, &v2], false, false);
        assert_close(
            &format!("{case} d/dout0"),
            &g[0],
            field(&all, &case, "grad_out0"),
        );
        assert_close(
            &format!("{case} d/dout1"),
            &g[1],
            field(&all, &case, "grad_out1"),
        );
        println!(
            "{case}: loss {:.6} (lightly {:.6})",
            loss.double_value(&[]),
            want.double_value(&[])
        );
    }
}

#[test]
fn gathered_nt_xent_over_ranks_matches_lightly() {
    let all = fixtures();
    for case in cases(&all, "ntxent_") {
        let (out0, out1) = (field(&all, &case, "out0"), field(&all, &case, "out1"));
        let tau = field(&all, &case, "temperature").double_value(&[]);
        let counts = split(out0.size()[0]);
        // Gathered layout: each rank's block is its view-1 rows, then its view-2 rows.
        let mut blocks = Vec::new();
        let mut start = 0;
        for &b in &counts {
            blocks.push(out0.narrow(0, start, b));
            blocks.push(out1.narrow(0, start, b));
            start += b;
        }
        let n_rows = 2 * start;
        let mut loss = 0.0;
        let mut grad: Option<Tensor> = None;
        let mut offset = 0;
        for &b in &counts {
            // Each rank has its own copy of the gathered matrix.
            let z = leaf(&Tensor::cat(&blocks, 0));
            let local = nt_xent_anchor_losses(&z, LocalAnchors { offset, samples: b }, tau)
                .sum(Kind::Float)
                / n_rows as f64;
            loss += local.double_value(&[]);
            let g = Tensor::run_backward(&[&local], &[&z], false, false).remove(0);
            grad = Some(match grad {
                Some(acc) => acc + g,
                None => g,
            });
            offset += 2 * b;
        }
        let want = field(&all, &case, "loss").double_value(&[]);
        assert!((loss - want).abs() <= TOLERANCE, "{case}: {loss} vs {want}");
        // Undo the gathered layout to compare with lightly's per-view gradients.
        let grad = grad.expect("at least one rank");
        let (mut g0, mut g1, mut at) = (Vec::new(), Vec::new(), 0);
        for &b in &counts {
            g0.push(grad.narrow(0, at, b));
            g1.push(grad.narrow(0, at + b, b));
            at += 2 * b;
        }
        let grad_out0 = field(&all, &case, "grad_out0");
        assert_close(&format!("{case} d/dout0"), &Tensor::cat(&g0, 0), grad_out0);
        let grad_out1 = field(&all, &case, "grad_out1");
        assert_close(&format!("{case} d/dout1"), &Tensor::cat(&g1, 0), grad_out1);
    }
}

#[test]
fn clip_matches_open_clip() {
    let all = fixtures();
    for case in cases(&all, "clip_") {
        let img = leaf(field(&all, &case, "image"));
        let txt = leaf(field(&all, &case, "text"));
        let ls = leaf(field(&all, &case, "logit_scale"));
        let want = field(&all, &case, "loss");
        let loss = clip_loss(&img, &txt, &ls);
        assert_close(&format!("{case} loss"), &loss, want);
        let g = Tensor::run_backward(&[&loss], &[&img, &txt, &ls], false, false);
        assert_close(
            &format!("{case} d/dimage"),
            &g[0],
            field(&all, &case, "grad_image"),
        );
        assert_close(
            &format!("{case} d/dtext"),
            &g[1],
            field(&all, &case, "grad_text"),
        );
        let grad_ls = field(&all, &case, "grad_logit_scale");
        assert_close(&format!("{case} d/dlogit_scale"), &g[2], grad_ls);
        println!(
            "{case}: loss {:.6} (open_clip {:.6})",
            loss.double_value(&[]),
            want.double_value(&[])
        );
    }
}

#[test]
fn clip_local_pairs_over_ranks_match_open_clip() {
    let all = fixtures();
    for case in cases(&all, "clip_") {
        let (img, txt) = (field(&all, &case, "image"), field(&all, &case, "text"));
        let ls0 = field(&all, &case, "logit_scale");
        let mut loss = 0.0;
        let mut sums: Option<Vec<Tensor>> = None;
        let mut offset = 0;
        for count in split(img.size()[0]) {
            let (i, t, ls) = (leaf(img), leaf(txt), leaf(ls0));
            let local = clip_local_loss(&i, &t, &ls, LocalPairs { offset, count })
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            loss += local.double_value(&[]);
            let g = Tensor::run_backward(&[&local], &[&i, &t, &ls], false, false);
            sums = Some(match sums {
                Some(acc) => acc.iter().zip(g).map(|(a, g)| a + g).collect(),
                None => g,
            });
            offset += count;
        }
        let want = field(&all, &case, "loss").double_value(&[]);
        assert!((loss - want).abs() <= TOLERANCE, "{case}: {loss} vs {want}");
        let g = sums.expect("at least one rank");
        assert_close(
            &format!("{case} d/dimage"),
            &g[0],
            field(&all, &case, "grad_image"),
        );
        assert_close(
            &format!("{case} d/dtext"),
            &g[1],
            field(&all, &case, "grad_text"),
        );
        let grad_ls = field(&all, &case, "grad_logit_scale");
        assert_close(&format!("{case} d/dlogit_scale"), &g[2], grad_ls);
    }
}

/// MoCo v2's loss with a fixed queue against lightly's `NTXentLoss(memory_bank_size=(K, d))`,
/// and its per-query form summed over simulated ranks (each dividing by the global count).
#[test]
fn moco_matches_lightly_memory_bank() {
    let all = fixtures();
    for case in cases(&all, "moco_") {
        let (query, key) = (field(&all, &case, "query"), field(&all, &case, "key"));
        let queue = field(&all, &case, "queue");
        let tau = field(&all, &case, "temperature").double_value(&[]);
        let want = field(&all, &case, "loss");
        let want_grad = field(&all, &case, "grad_query");

        let q = leaf(query);
        let loss = moco_loss(&q, key, queue, tau);
        assert_close(&format!("{case} loss"), &loss, want);
        let g = Tensor::run_backward(&[&loss], &[&q], false, false);
        assert_close(&format!("{case} d/dquery"), &g[0], want_grad);

        let n = query.size()[0];
        let mut total = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
        let mut grads = Vec::new();
        let mut at = 0;
        for b in split(n) {
            let q = leaf(&query.narrow(0, at, b));
            let share = moco_query_losses(&q, &key.narrow(0, at, b), queue, tau).sum(Kind::Float)
                / n as f64;
            total += share.detach();
            grads.push(if b > 0 {
                Tensor::run_backward(&[&share], &[&q], false, false).remove(0)
            } else {
                q.zeros_like()
            });
            at += b;
        }
        assert_close(&format!("{case} summed shares"), &total, want);
        assert_close(
            &format!("{case} per-rank d/dquery"),
            &Tensor::cat(&grads, 0),
            want_grad,
        );
    }
}
