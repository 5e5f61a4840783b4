//! A callback when a parameter's gradient is final in a backward pass (libtorch's
//! post-accumulate-grad hook; PyTorch's `Tensor.register_post_accumulate_grad_hook`).
//!
//! The hook fires once per backward pass and parameter, after every contribution to the
//! parameter's `.grad` has been added, on the thread running the backward pass (the calling
//! thread on the CPU, the autograd engine's device thread on a GPU). A parameter the pass
//! does not reach gets no call.

use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

use tch::Tensor;

type ReadyFn = extern "C" fn(*mut c_void, usize);

extern "C" {
    fn contrail_set_grad_ready_hook(
        param: *const c_void,
        callback: ReadyFn,
        ctx: *mut c_void,
        index: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn contrail_reached_leaves(
        root: *const c_void,
        leaves: *const *const c_void,
        n: usize,
        reached: *mut u8,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn contrail_clear_grad_ready_hook(
        param: *const c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// What a hook calls: `ready(index)` with the index the parameter was given in
/// [`GradHooks::install`]. It runs inside the backward pass: keep it short, and it must not
/// panic (a panic is caught, reported on stderr, and the call dropped).
pub trait GradReady: Send + Sync {
    fn ready(&self, index: usize);
}

/// Hooks on a set of parameters, removed when dropped. The receiver stays alive as long as
/// the hooks (each hook holds a raw pointer to it).
pub struct GradHooks {
    params: Vec<Tensor>,
    /// Boxed twice so the hooks' context is a thin pointer.
    _receiver: Box<Arc<dyn GradReady>>,
}

extern "C" fn trampoline(ctx: *mut c_void, index: usize) {
    // SAFETY: `ctx` is the `Box<Arc<dyn GradReady>>` a live `GradHooks` owns: the hooks are
    // removed in its Drop before the box is freed.
    let receiver = unsafe { &*(ctx as *const Arc<dyn GradReady>) };
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| receiver.ready(index))).is_err() {
        eprintln!("contrail: a gradient-ready hook panicked (parameter {index}); call dropped");
    }
}

impl GradHooks {
    /// Sets a hook on every tensor of `params` (leaves that require grad), calling
    /// `receiver.ready(i)` for `params[i]`. Replaces hooks set earlier on the same tensors.
    pub fn install(params: &[Tensor], receiver: Arc<dyn GradReady>) -> anyhow::Result<GradHooks> {
        let boxed: Box<Arc<dyn GradReady>> = Box::new(receiver);
        let ctx = &*boxed as *const Arc<dyn GradReady> as *mut c_void;
        let mut hooks = GradHooks {
            params: Vec::with_capacity(params.len()),
            _receiver: boxed,
        };
        for (i, p) in params.iter().enumerate() {
            super::call("setting a gradient-ready hook", |err, len| unsafe {
                contrail_set_grad_ready_hook(p.as_ptr().cast(), trampoline, ctx, i, err, len)
            })?;
            // Dropped hooks are cleared from here, so only hooked tensors are listed.
            hooks.params.push(p.shallow_clone());
        }
        Ok(hooks)
    }
}

impl Drop for GradHooks {
    fn drop(&mut self) {
        for p in &self.params {
            if let Err(e) = super::call("removing a gradient-ready hook", |err, len| unsafe {
                contrail_clear_grad_ready_hook(p.as_ptr().cast(), err, len)
            }) {
                // Cannot happen for a tensor the hook was set on; if it did, the hook would
                // call into freed memory, so stop here.
                panic!("{e:#}");
            }
        }
    }
}

/// For each of `leaves`, whether a backward pass from `root` will accumulate a gradient into
/// it (a walk of `root`'s autograd graph; nothing when `root` does not require grad).
pub fn reached_leaves(root: &Tensor, leaves: &[Tensor]) -> anyhow::Result<Vec<bool>> {
    let ptrs: Vec<*const c_void> = leaves.iter().map(|t| t.as_ptr().cast()).collect();
    let mut reached = vec![0u8; leaves.len()];
    super::call("walking the autograd graph", |err, len| unsafe {
        contrail_reached_leaves(
            root.as_ptr().cast(),
            ptrs.as_ptr(),
            ptrs.len(),
            reached.as_mut_ptr(),
            err,
            len,
        )
    })?;
    Ok(reached.into_iter().map(|r| r != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tch::{Device, Kind};

    #[derive(Default)]
    struct Seen(Mutex<Vec<(usize, f64)>>);

    struct Recorder {
        seen: Arc<Seen>,
        params: Mutex<Vec<Tensor>>,
    }

    impl GradReady for Recorder {
        fn ready(&self, index: usize) {
            // The gradient is final when the hook fires: read it here.
            let g = self.params.lock().unwrap()[index]
                .grad()
                .sum(Kind::Double)
                .double_value(&[]);
            self.seen.0.lock().unwrap().push((index, g));
        }
    }

    #[test]
    fn hooks_fire_once_per_reached_parameter_in_backward_order_with_final_grads() {
        let opts = (Kind::Float, Device::Cpu);
        let a = Tensor::ones([3], opts).set_requires_grad(true);
        let b = Tensor::ones([3], opts).set_requires_grad(true);
        let unused = Tensor::ones([3], opts).set_requires_grad(true);
        let params = vec![a.shallow_clone(), b.shallow_clone(), unused.shallow_clone()];
        let seen = Arc::new(Seen::default());
        let hooks = GradHooks::install(
            &params,
            Arc::new(Recorder {
                seen: seen.clone(),
                params: Mutex::new(params.iter().map(|p| p.shallow_clone()).collect()),
            }),
        )
        .unwrap();
        // a is used twice (its grad is the sum of both uses when the hook fires); b feeds
        // the last op, so its gradient is final first.
        let h = (&a * 2.0).sum(Kind::Float) + (&a * 3.0).sum(Kind::Float);
        let loss = (h * b.sum(Kind::Float)).sum(Kind::Float);
        loss.backward();
        let got = seen.0.lock().unwrap().clone();
        assert_eq!(got.len(), 2, "one call per reached parameter: {got:?}");
        let a_call = got.iter().find(|(i, _)| *i == 0).expect("a's hook fired");
        let b_call = got.iter().find(|(i, _)| *i == 1).expect("b's hook fired");
        // d/da = 5 * sum(b) = 15 per element → 45; d/db = sum(5a) = 15 per element → 45.
        assert_eq!(a_call.1, 45.0);
        assert_eq!(b_call.1, 45.0);
        drop(hooks);
        seen.0.lock().unwrap().clear();
        (&a * 1.0).sum(Kind::Float).backward();
        assert!(
            seen.0.lock().unwrap().is_empty(),
            "hooks are gone after drop"
        );
    }

    #[test]
    fn reached_leaves_are_the_ones_backward_accumulates_into() {
        let opts = (Kind::Float, Device::Cpu);
        let a = Tensor::ones([2], opts).set_requires_grad(true);
        let b = Tensor::ones([2], opts).set_requires_grad(true);
        let off_graph = Tensor::ones([2], opts).set_requires_grad(true);
        let root = ((&a * 2.0).relu() * &b).sum(Kind::Float);
        let leaves = [
            a.shallow_clone(),
            off_graph.shallow_clone(),
            b.shallow_clone(),
        ];
        assert_eq!(reached_leaves(&root, &leaves).unwrap(), [true, false, true]);
        // A root without a graph reaches nothing; a leaf root reaches itself.
        let constant = Tensor::ones([], opts);
        assert_eq!(reached_leaves(&constant, &leaves).unwrap(), [false; 3]);
        assert_eq!(reached_leaves(&a, &leaves).unwrap(), [true, false, false]);
    }

    #[test]
    fn a_tensor_that_is_not_a_trainable_leaf_is_refused() {
        let t = Tensor::ones([2], (Kind::Float, Device::Cpu));
        struct Nothing;
        impl GradReady for Nothing {
            fn ready(&self, _: usize) {}
        }
        let err = GradHooks::install(&[t], Arc::new(Nothing))
            .err()
            .expect("a tensor without requires_grad is refused");
        assert!(
            format!("{err:#}").contains("leaf tensor that requires grad"),
            "{err:#}"
        );
    }
}
