//! Summing parameter gradients across ranks in buckets, either after the backward pass or
//! while it runs (overlap, as PyTorch DDP's reducer).
//!
//! **Overlap.** tch has no autograd hooks, so the crate's C++ shim sets libtorch's
//! post-accumulate-grad hook on every parameter ([`crate::torch_ext::grad_hook`]); it fires
//! once a parameter's gradient is final. When every gradient of a bucket is final, the bucket
//! is flattened on the backward thread and handed to a communication thread, which all-reduces
//! it and copies the sums back while backward goes on with the layers below. Buckets launch
//! strictly in plan order (a finished bucket waits for the ones before it), so every rank
//! issues the same collectives in the same order whatever order its hooks fire in. Parameters
//! the backward pass will not reach (unused ones, or gradients set by hand such as SwAV's
//! prototypes and CLIP's logit scale) are found before it starts by walking the autograd
//! graph from its root, and count as final from the start, so they hold no bucket back (the
//! problem DDP's `find_unused_parameters` solves). Whatever is left when backward returns is
//! launched then; the caller waits only for the last bucket.
//!
//! **Plan order.** Backward produces gradients roughly in reverse order of the forward pass,
//! and the crate's parameter names follow the forward pass (torchvision's `layer1`..`layer4`,
//! open_clip's `resblocks.0`..`N`, then projector and heads), so the overlap plan walks the
//! names backwards in natural order (`blocks.10` after `blocks.9`). DDP instead rebuilds its
//! buckets once from the order it observed in the first iteration; a static plan needs no
//! agreement between ranks and survives a regroup unchanged. Without overlap, buckets follow
//! name order, as before overlap existed.

use std::cmp::Ordering;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use super::Collective;
use crate::torch_ext::grad_hook::{reached_leaves, GradHooks, GradReady};

/// DDP's default bucket size (`bucket_cap_mb = 25`).
pub const DEFAULT_BUCKET_MB: f64 = 25.0;

/// How a model's gradients are summed across ranks (`cluster.overlap`, `cluster.bucket_mb`,
/// `cluster.grad_dtype`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradSync {
    /// Reduce buckets during the backward pass (true) or after it.
    pub overlap: bool,
    /// Largest bucket in bytes, counted in the gradients' own type (a single larger gradient
    /// goes alone in its bucket).
    pub bucket_bytes: usize,
    /// Sum in bfloat16 (half the bytes on the wire; the sums are written back into the
    /// float32 gradients) instead of the gradients' own type.
    pub bf16: bool,
}

impl Default for GradSync {
    fn default() -> Self {
        GradSync {
            overlap: true,
            bucket_bytes: bucket_bytes(DEFAULT_BUCKET_MB),
            bf16: false,
        }
    }
}

/// `mb` mebibytes in bytes (at least one byte).
pub fn bucket_bytes(mb: f64) -> usize {
    ((mb * (1u64 << 20) as f64) as usize).max(1)
}

/// What an overlapped reduction did, for logs, benchmarks and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OverlapReport {
    pub buckets: usize,
    /// Buckets handed to the communication thread before backward returned.
    pub launched_during_backward: usize,
}

/// Orders two parameter names with digit runs compared as numbers (`blocks.9` < `blocks.10`).
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let by_value = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if by_value != Ordering::Equal {
                    return by_value;
                }
                (a, b) = (&a[da..], &b[db..]);
            }
            (Some(x), Some(y)) if x != y => return x.cmp(y),
            _ => (a, b) = (&a[1..], &b[1..]),
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|&&c| c == b'0').count();
    &digits[zeros.min(digits.len().saturating_sub(1))..]
}

/// The buckets of `grads` (name, gradient), as indices into `grads`, in the order they are
/// launched: name order, or with `overlap` reverse natural name order. A bucket holds
/// gradients until the next would take it past `bucket_bytes`.
pub fn bucket_plan(grads: &[(String, Tensor)], sync: &GradSync) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..grads.len()).collect();
    if sync.overlap {
        order.sort_by(|&i, &j| natural_cmp(&grads[j].0, &grads[i].0));
    } else {
        order.sort_by(|&i, &j| grads[i].0.cmp(&grads[j].0));
    }
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0usize;
    for i in order {
        let g = &grads[i].1;
        let size = g.numel() * g.kind().elt_size_in_bytes();
        match buckets.last_mut() {
            Some(b) if bytes + size <= sync.bucket_bytes => {
                b.push(i);
                bytes += size;
            }
            _ => {
                buckets.push(vec![i]);
                bytes = size;
            }
        }
    }
    buckets
}

/// A bucket's gradients as one flat tensor, in bfloat16 with `bf16` (float gradients only).
fn flatten(grads: &[(String, Tensor)], bucket: &[usize], bf16: bool) -> Tensor {
    let parts: Vec<Tensor> = bucket.iter().map(|&i| grads[i].1.reshape([-1])).collect();
    let flat = Tensor::cat(&parts, 0);
    if bf16 && flat.kind() == Kind::Float {
        flat.to_kind(Kind::BFloat16)
    } else {
        flat
    }
}

/// Writes a reduced flat bucket back into its gradients.
fn unflatten(grads: &[(String, Tensor)], bucket: &[usize], flat: &Tensor) {
    let mut at = 0;
    for &i in bucket {
        let g = &grads[i].1;
        let n = g.numel() as i64;
        // copy_ converts a bfloat16 sum back into the gradient's own type.
        let part = flat.narrow(0, at, n).view_as(g).to_device(g.device());
        g.shallow_clone().copy_(&part);
        at += n;
    }
}

fn bucket_label(grads: &[(String, Tensor)], bucket: &[usize]) -> String {
    let first = &grads[bucket[0]].0;
    let last = &grads[bucket[bucket.len() - 1]].0;
    format!("gradient bucket {first} ..= {last}")
}

/// Sums `grads` (name, gradient; the same names and shapes on every rank) across ranks, a
/// bucket at a time, after backward.
pub fn all_reduce_in_buckets(
    coll: &dyn Collective,
    grads: &[(String, Tensor)],
    sync: &GradSync,
) -> Result<()> {
    for bucket in bucket_plan(grads, sync) {
        let mut flat = flatten(grads, &bucket, sync.bf16);
        coll.all_reduce_sum(&mut flat)
            .with_context(|| bucket_label(grads, &bucket))?;
        unflatten(grads, &bucket, &flat);
    }
    Ok(())
}

/// Runs `backward` (a backward pass from `root`) while summing the gradients of `params`
/// (name, parameter; every gradient already defined, the same names and shapes on every
/// rank) across ranks, each bucket as soon as its gradients are final. Nothing else may use
/// `coll` until this returns (the communication thread is using it). Returns when every
/// bucket is summed and written back.
pub fn reduce_during_backward(
    coll: &dyn Collective,
    params: &[(String, Tensor)],
    sync: &GradSync,
    root: &Tensor,
    backward: impl FnOnce() -> Result<()>,
) -> Result<OverlapReport> {
    let grads: Vec<(String, Tensor)> = params.iter().map(|(n, p)| (n.clone(), p.grad())).collect();
    if let Some((name, _)) = grads.iter().find(|(_, g)| !g.defined()) {
        anyhow::bail!("overlapped gradient reduction: {name} has no gradient yet");
    }
    let overlap_order = GradSync {
        overlap: true,
        ..*sync
    };
    let plan = bucket_plan(&grads, &overlap_order);
    let buckets = plan.len();
    // Hooks go on the parameters backward will reach; the others' gradients are final.
    let tensors: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
    let reached = reached_leaves(root, &tensors)?;
    let hooked: Vec<usize> = (0..params.len()).filter(|&i| reached[i]).collect();
    let hooked_tensors: Vec<Tensor> = hooked.iter().map(|&i| tensors[i].shallow_clone()).collect();
    std::thread::scope(|s| {
        let (tx, rx) = channel::<(usize, Tensor)>();
        // tch tensors may move between threads but not be shared: each side gets handles.
        let handles = || -> Vec<(String, Tensor)> {
            grads
                .iter()
                .map(|(n, g)| (n.clone(), g.shallow_clone()))
                .collect()
        };
        let launcher = Arc::new(Launcher::new(
            handles(),
            plan.clone(),
            hooked,
            sync.bf16,
            tx,
        ));
        let (comm_grads, comm_plan) = (handles(), &plan);
        let comm = s.spawn(move || -> Result<()> {
            for (b, mut flat) in rx {
                let bucket = &comm_plan[b];
                coll.all_reduce_sum(&mut flat)
                    .with_context(|| bucket_label(&comm_grads, bucket))?;
                unflatten(&comm_grads, bucket, &flat);
            }
            Ok(())
        });
        // Buckets of parameters backward does not reach may go before it starts.
        launcher.launch_ready();
        let ran = GradHooks::install(&hooked_tensors, launcher.clone()).and_then(|hooks| {
            let r = backward();
            drop(hooks);
            r
        });
        let during = launcher.launched();
        if ran.is_ok() {
            launcher.launch_rest();
        }
        launcher.close();
        let reduced = comm.join().unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "the gradient communication thread panicked"
            ))
        });
        ran?;
        reduced?;
        Ok(OverlapReport {
            buckets,
            launched_during_backward: during,
        })
    })
}

/// Counts final gradients per bucket and hands complete buckets, in plan order, to the
/// communication thread. Called from the backward thread by the hooks.
struct Launcher {
    plan: Vec<Vec<usize>>,
    /// The bucket of each hooked parameter, by hook index.
    hook_bucket: Vec<usize>,
    bf16: bool,
    state: Mutex<LaunchState>,
}

struct LaunchState {
    /// The gradients (tensor handles are not Sync, so they live under the lock).
    grads: Vec<(String, Tensor)>,
    /// Gradients not yet final, per bucket.
    pending: Vec<usize>,
    /// The next bucket to launch.
    next: usize,
    /// None once closed.
    tx: Option<Sender<(usize, Tensor)>>,
}

impl Launcher {
    fn new(
        grads: Vec<(String, Tensor)>,
        plan: Vec<Vec<usize>>,
        hooked: Vec<usize>,
        bf16: bool,
        tx: Sender<(usize, Tensor)>,
    ) -> Self {
        let mut bucket_of = vec![0; grads.len()];
        for (b, bucket) in plan.iter().enumerate() {
            for &i in bucket {
                bucket_of[i] = b;
            }
        }
        let hook_bucket: Vec<usize> = hooked.iter().map(|&i| bucket_of[i]).collect();
        let mut pending = vec![0; plan.len()];
        for &b in &hook_bucket {
            pending[b] += 1;
        }
        Launcher {
            plan,
            hook_bucket,
            bf16,
            state: Mutex::new(LaunchState {
                grads,
                pending,
                next: 0,
                tx: Some(tx),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LaunchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Launches buckets from `next` on while `ready` says they may go.
    fn launch_while(&self, st: &mut LaunchState, ready: impl Fn(&LaunchState) -> bool) {
        while st.next < self.plan.len() && ready(st) {
            let b = st.next;
            let flat = flatten(&st.grads, &self.plan[b], self.bf16);
            // A closed channel means the communication thread failed; its error is reported
            // when it is joined, so the send error adds nothing.
            if let Some(tx) = &st.tx {
                let _ = tx.send((b, flat));
            }
            st.next += 1;
        }
    }

    /// Launches the buckets whose gradients are all final, up to the first that is not.
    fn launch_ready(&self) {
        let mut st = self.lock();
        self.launch_while(&mut st, |st| st.pending[st.next] == 0);
    }

    fn launched(&self) -> usize {
        self.lock().next
    }

    fn launch_rest(&self) {
        let mut st = self.lock();
        self.launch_while(&mut st, |_| true);
    }

    fn close(&self) {
        self.lock().tx = None;
    }
}

impl GradReady for Launcher {
    fn ready(&self, hook: usize) {
        let mut st = self.lock();
        let b = self.hook_bucket[hook];
        st.pending[b] = st.pending[b].saturating_sub(1);
        drop(st);
        self.launch_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::local::LocalGroup;
    use tch::{Device, Kind};

    fn named(names: &[&str], sizes: &[i64]) -> Vec<(String, Tensor)> {
        names
            .iter()
            .zip(sizes)
            .map(|(n, &k)| {
                (
                    n.to_string(),
                    Tensor::zeros([k], (Kind::Float, Device::Cpu)),
                )
            })
            .collect()
    }

    #[test]
    fn natural_order_compares_numbers_by_value() {
        let mut names = vec![
            "blocks.10.w",
            "blocks.9.w",
            "blocks.1.w",
            "blocks.2.b",
            "head",
            "blocks.02.a",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            [
                "blocks.1.w",
                "blocks.02.a",
                "blocks.2.b",
                "blocks.9.w",
                "blocks.10.w",
                "head"
            ]
        );
    }

    #[test]
    fn plans_fill_buckets_up_to_the_cap_in_their_order() {
        let grads = named(&["a.1", "a.2", "a.10", "b"], &[4, 4, 4, 10]);
        // 16 bytes = 4 floats per bucket; b (40 bytes) goes alone.
        let overlap = GradSync {
            overlap: true,
            bucket_bytes: 32,
            bf16: false,
        };
        let names = |plan: Vec<Vec<usize>>| -> Vec<Vec<&str>> {
            plan.into_iter()
                .map(|b| b.into_iter().map(|i| grads[i].0.as_str()).collect())
                .collect()
        };
        assert_eq!(
            names(bucket_plan(&grads, &overlap)),
            [vec!["b"], vec!["a.10", "a.2"], vec!["a.1"]]
        );
        let after = GradSync {
            overlap: false,
            ..overlap
        };
        assert_eq!(
            names(bucket_plan(&grads, &after)),
            [vec!["a.1", "a.10"], vec!["a.2"], vec!["b"]]
        );
    }

    /// A four-layer chain plus a parameter the loss never uses, on one rank's data.
    struct Chain {
        params: Vec<(String, Tensor)>,
    }

    impl Chain {
        fn new() -> Chain {
            // Deterministic values without the global RNG (the ranks build theirs at once).
            let wave =
                |n: i64, f: f64| (Tensor::arange(n, (Kind::Float, Device::Cpu)) * f).sin() * 0.5;
            let mut params = Vec::new();
            for l in 0..4 {
                let w = wave(64, 0.37 * (l + 1) as f64).view([8, 8]);
                params.push((format!("layer.{l}.weight"), w.set_requires_grad(true)));
            }
            let unused = wave(8, 0.11).set_requires_grad(true);
            params.push(("zz_unused.weight".to_string(), unused));
            for (_, p) in &params {
                // Every gradient defined (as the step's `ensure_grads_defined` does).
                (p * 0.0).sum(Kind::Float).backward();
            }
            Chain { params }
        }

        fn loss(&self, rank: i64) -> Tensor {
            let mut h = Tensor::ones([3, 8], (Kind::Float, Device::Cpu)) * (rank + 1) as f64;
            for (_, w) in &self.params[..4] {
                h = h.matmul(w).tanh();
            }
            h.sum(Kind::Float)
        }

        fn grads(&self) -> Vec<Tensor> {
            self.params.iter().map(|(_, p)| p.grad().copy()).collect()
        }
    }

    #[test]
    fn overlapped_sums_equal_the_sequential_ones_and_start_during_backward() {
        let world = 2;
        // One bucket per layer (8 × 8 floats = 256 bytes).
        let sync = GradSync {
            overlap: true,
            bucket_bytes: 256,
            bf16: false,
        };
        let run = |overlap: bool| -> Vec<(Vec<Tensor>, OverlapReport)> {
            let colls = LocalGroup::new(world);
            std::thread::scope(|s| {
                let handles: Vec<_> = colls
                    .into_iter()
                    .map(|coll| {
                        s.spawn(move || {
                            let chain = Chain::new();
                            let root = chain.loss(coll.rank() as i64);
                            let report = if overlap {
                                reduce_during_backward(&coll, &chain.params, &sync, &root, || {
                                    root.backward();
                                    Ok(())
                                })
                                .unwrap()
                            } else {
                                root.backward();
                                let grads: Vec<(String, Tensor)> = chain
                                    .params
                                    .iter()
                                    .map(|(n, p)| (n.clone(), p.grad()))
                                    .collect();
                                all_reduce_in_buckets(&coll, &grads, &sync).unwrap();
                                OverlapReport::default()
                            };
                            (chain.grads(), report)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        let overlapped = run(true);
        let sequential = run(false);
        // The sums themselves: rank 0's and rank 1's own gradients added.
        let own: Vec<Vec<Tensor>> = (0..world as i64)
            .map(|r| {
                let chain = Chain::new();
                chain.loss(r).backward();
                chain.grads()
            })
            .collect();
        for (rank, (grads, report)) in overlapped.iter().enumerate() {
            assert_eq!(report.buckets, 5, "rank {rank}");
            // The unused parameter's bucket goes before backward (its gradient is final), each
            // layer's as soon as its hook fires, the first layer's from inside the last hook.
            assert_eq!(
                report.launched_during_backward, report.buckets,
                "rank {rank}: buckets launched before backward returned"
            );
            for (i, g) in grads.iter().enumerate() {
                let expected = &own[0][i] + &own[1][i];
                let diff = (g - &expected).abs().max().double_value(&[]);
                assert!(
                    diff < 1e-6,
                    "rank {rank} parameter {i}: |Δ| {diff} from the sum"
                );
                let seq = (g - &sequential[rank].0[i]).abs().max().double_value(&[]);
                assert_eq!(
                    seq, 0.0,
                    "rank {rank} parameter {i}: overlapped ≠ sequential"
                );
            }
        }
        let moved = own[0][0].abs().sum(Kind::Double).double_value(&[]);
        assert!(moved > 0.0, "the chain's first layer got a gradient at all");
    }
}
