//! NCCL collective on one GPU. NCCL refuses two ranks on one GPU, so these run at world size 1
//! (every operation still goes through NCCL: out-of-place ones copy through NCCL's kernels, and
//! all_to_all uses grouped send/receive to this rank), plus a world of 2 whose second rank never
//! arrives, to check that setup times out instead of hanging. Multi-rank arithmetic is covered by
//! the CPU simulations in `dist::nccl`'s unit tests and by the shared TCP tests.
//!
//! Every test but `reports_the_nccl_it_uses` needs a GPU and is ignored without
//! `--include-ignored`. On a GPU machine run with `--include-ignored --nocapture
//! --test-threads=1` to see one "checked: ..." line per verified fact.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use contrail_test_support as support;
use contrail_worker::dist::nccl::{
    nccl_available, nccl_library, nccl_unique_id, NcclCollective, NCCL_UNIQUE_ID_BYTES,
};
use contrail_worker::dist::{all_gather_counts, Collective, CollectiveError};
use tch::{Device, Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A world-1 communicator on cuda:0 (the test fails where there is no GPU).
fn world_of_one() -> NcclCollective {
    support::gpu::cuda();
    // A GPU that tch sees but NCCL cannot use is a failure, not a reason to skip.
    assert!(
        nccl_available(),
        "tch sees a GPU but the NCCL backend is unavailable"
    );
    let id = nccl_unique_id().expect("ncclGetUniqueId");
    assert_eq!(id.len(), NCCL_UNIQUE_ID_BYTES);
    let c = NcclCollective::new(0, 1, &id, 0, TIMEOUT).expect("world-1 NCCL communicator");
    assert_eq!(
        (c.rank(), c.world_size(), c.device()),
        (0, 1, Device::Cuda(0))
    );
    c
}

/// Runs `f` on a thread and fails the test if it takes longer than `limit` (a hang in NCCL
/// must show up as a failure, not as a test run that never ends).
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} did not return within {limit:?}: it hangs"))
}

fn cuda() -> Device {
    support::gpu::cuda()
}

/// A deterministic [rows, cols] tensor of `kind` on the CPU, distinct per `seed`.
fn sample(rows: i64, cols: i64, kind: Kind, seed: i64) -> Tensor {
    let base = Tensor::arange(rows * cols, (Kind::Float, Device::Cpu)).view([rows, cols]);
    let v = (base * 0.37 + seed as f64).sin() * 50.0;
    match kind {
        Kind::Int64 | Kind::Int | Kind::Uint8 => v.abs().to_kind(kind),
        k => v.to_kind(k),
    }
}

/// Exact equality of values, shape and kind, wherever the tensors live.
fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    assert_eq!(got.kind(), want.kind(), "{what}: kind");
    assert!(
        got.to_device(Device::Cpu)
            .equal(&want.to_device(Device::Cpu)),
        "{what}: values differ"
    );
    eprintln!("checked: {what}");
}

const KINDS: [Kind; 5] = [
    Kind::Float,
    Kind::BFloat16,
    Kind::Int64,
    Kind::Half,
    Kind::Double,
];

#[test]
fn reports_the_nccl_it_uses() {
    let libtorch = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../libtorch/lib");
    match nccl_library() {
        Ok(info) => {
            assert!(
                info.path.ends_with("nvidia/nccl/lib/libnccl.so.2"),
                "libnccl from {}",
                info.path.display()
            );
            eprintln!(
                "checked: NCCL {} from {} (CUDA runtime {})",
                info.version,
                info.path.display(),
                info.cudart_path.display()
            );
        }
        Err(e) => {
            assert!(
                !libtorch.join("libtorch_cuda.so").exists(),
                "libtorch_cuda.so exists, so libnccl.so.2 should be loaded: {e:#}"
            );
            eprintln!("skipping: CPU-only libtorch ({e:#})");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn all_reduce_sum_on_cuda_tensors() {
    let c = world_of_one();
    for (i, kind) in KINDS.into_iter().enumerate() {
        let want = sample(5, 3, kind, i as i64);
        let mut t = want.to_device(cuda());
        c.all_reduce_sum(&mut t).unwrap();
        assert_same(&t, &want, &format!("all_reduce_sum {kind:?} [5, 3]"));
    }
    // A transposed view goes through a contiguous copy and back.
    let want = sample(4, 6, Kind::Float, 9).tr();
    let mut t = want.to_device(cuda()).tr().contiguous().tr();
    assert!(!t.is_contiguous());
    c.all_reduce_sum(&mut t).unwrap();
    assert_same(&t, &want, "all_reduce_sum on a non-contiguous view");
    // A CPU tensor is staged through the GPU and stays on the CPU.
    let want = sample(2, 2, Kind::Int64, 3);
    let mut t = want.copy();
    c.all_reduce_sum(&mut t).unwrap();
    assert_eq!(t.device(), Device::Cpu);
    assert_same(&t, &want, "all_reduce_sum on a CPU tensor");
    let mut empty = Tensor::zeros([0, 3], (Kind::Float, cuda()));
    c.all_reduce_sum(&mut empty).unwrap();
    assert_eq!(empty.size(), [0, 3]);
    match c.all_reduce_sum(&mut Tensor::zeros([2], (Kind::Bool, cuda()))) {
        Err(CollectiveError::Usage(m)) => assert!(m.contains("Bool"), "{m}"),
        other => panic!("a Bool sum must be refused: {other:?}"),
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn all_gather_copies_rows_through_nccl() {
    let c = world_of_one();
    for (i, kind) in KINDS.into_iter().enumerate() {
        let want = sample(4, 3, kind, 10 + i as i64);
        let got = c.all_gather(&want.to_device(cuda()), &[4]).unwrap();
        assert_eq!(got.device(), cuda());
        assert_same(&got, &want, &format!("all_gather {kind:?} counts [4]"));
    }
    let want = sample(6, 10, Kind::Float, 20).view([2, 3, 10]);
    let got = c.all_gather(&want.to_device(cuda()), &[2]).unwrap();
    assert_same(&got, &want, "all_gather of 3-D rows");
    let got = c
        .all_gather(&Tensor::zeros([0, 3], (Kind::BFloat16, cuda())), &[0])
        .unwrap();
    assert_eq!((got.size(), got.kind()), (vec![0, 3], Kind::BFloat16));
    eprintln!("checked: all_gather of zero rows");
    // Input produced by a long kernel right before the call: NCCL on the null stream must see
    // its final values, not whatever the buffer held before.
    let x = Tensor::randn([2048, 2048], (Kind::Float, cuda()));
    let y = x.matmul(&x).matmul(&x);
    let got = c.all_gather(&y, &[2048]).unwrap();
    assert_same(
        &got,
        &y,
        "all_gather sees the result of a kernel queued just before it",
    );
    assert_eq!(all_gather_counts(&c, 7).unwrap(), [7]);
    eprintln!("checked: all_gather_counts (CPU tensor staged through the GPU)");
    match c.all_gather(&Tensor::zeros([3, 2], (Kind::Float, cuda())), &[2]) {
        Err(CollectiveError::Usage(m)) => assert!(m.contains("passed 3 rows"), "{m}"),
        other => panic!("a row-count mismatch must be refused: {other:?}"),
    }
    // Usage errors are caught before NCCL and do not poison the communicator.
    c.barrier().unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn reduce_scatter_sum_returns_this_ranks_rows() {
    let c = world_of_one();
    for (i, kind) in KINDS.into_iter().enumerate() {
        let want = sample(6, 4, kind, 30 + i as i64);
        let got = c.reduce_scatter_sum(&want.to_device(cuda()), &[6]).unwrap();
        assert_same(
            &got,
            &want,
            &format!("reduce_scatter_sum {kind:?} counts [6]"),
        );
    }
    let got = c
        .reduce_scatter_sum(&Tensor::zeros([0, 4], (Kind::Float, cuda())), &[0])
        .unwrap();
    assert_eq!(got.size(), [0, 4]);
    eprintln!("checked: reduce_scatter_sum of zero rows");
    let want = sample(3, 2, Kind::Double, 40);
    let got = c.reduce_scatter_sum(&want, &[3]).unwrap();
    assert_eq!(got.device(), Device::Cpu);
    assert_same(&got, &want, "reduce_scatter_sum of a CPU tensor");
}

#[test]
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn broadcast_from_root_zero() {
    let c = world_of_one();
    for (i, kind) in KINDS.into_iter().enumerate() {
        let want = sample(3, 5, kind, 50 + i as i64);
        let mut t = want.to_device(cuda());
        c.broadcast(&mut t, 0).unwrap();
        assert_same(&t, &want, &format!("broadcast {kind:?}"));
    }
    let mut t = Tensor::zeros([2], (Kind::Float, cuda()));
    match c.broadcast(&mut t, 1) {
        Err(CollectiveError::Usage(m)) => assert!(m.contains("root 1"), "{m}"),
        other => panic!("root outside the world must be refused: {other:?}"),
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn all_to_all_sends_rows_to_itself_through_nccl() {
    let c = world_of_one();
    for (i, kind) in [Kind::Float, Kind::BFloat16, Kind::Int64, Kind::Uint8]
        .into_iter()
        .enumerate()
    {
        let want = sample(5, 3, kind, 60 + i as i64);
        let (got, counts) = c.all_to_all(&want.to_device(cuda()), &[5]).unwrap();
        assert_eq!(counts, [5]);
        assert_same(&got, &want, &format!("all_to_all {kind:?} send_counts [5]"));
    }
    let (got, counts) = c
        .all_to_all(&Tensor::zeros([0, 3], (Kind::Float, cuda())), &[0])
        .unwrap();
    assert_eq!((got.size(), counts), (vec![0, 3], vec![0]));
    eprintln!("checked: all_to_all of zero rows");
    let want = sample(4, 2, Kind::Float, 70);
    let (got, _) = c.all_to_all(&want, &[4]).unwrap();
    assert_eq!(got.device(), Device::Cpu);
    assert_same(&got, &want, "all_to_all of a CPU tensor");
    // With the receive counts known (MoE's dispatch and combine) there is no round of counts.
    let want = sample(6, 4, Kind::BFloat16, 80);
    let got = c
        .all_to_all_known(&want.to_device(cuda()), &[6], &[6])
        .unwrap();
    assert_same(&got, &want, "all_to_all_known send [6] receive [6]");
    let err = c
        .all_to_all_known(&want.to_device(cuda()), &[6], &[5])
        .unwrap_err();
    assert!(
        matches!(err, CollectiveError::Usage(_)),
        "a receive count that cannot match: {err}"
    );
    // A usage error leaves the communicator usable.
    let got = c.all_to_all_known(&want, &[6], &[6]).unwrap();
    assert_same(&got, &want, "all_to_all_known after a refused call");
    eprintln!("checked: all_to_all_known, and its check of this rank's own count");
}

#[test]
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn barrier_completes() {
    let c = world_of_one();
    for _ in 0..3 {
        c.barrier().unwrap();
    }
    eprintln!("checked: three barriers");
}

#[test]
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn aborted_communicator_fails_every_call_at_once() {
    let c = world_of_one();
    c.barrier().unwrap();
    c.abort("test abort");
    within(
        Duration::from_secs(20),
        "calls on an aborted communicator",
        move || {
            let t0 = Instant::now();
            let mut t = Tensor::ones([4], (Kind::Float, cuda()));
            let errors = [
                c.barrier().unwrap_err(),
                c.all_reduce_sum(&mut t).unwrap_err(),
                c.all_gather(&t, &[4]).unwrap_err(),
                c.reduce_scatter_sum(&t, &[4]).unwrap_err(),
                c.broadcast(&mut t, 0).unwrap_err(),
                c.all_to_all(&t, &[4]).unwrap_err(),
            ];
            for e in &errors {
                match e {
                    CollectiveError::PeerFailed { reason, .. } => {
                        assert!(
                            reason.contains("aborted") && reason.contains("test abort"),
                            "{e}"
                        )
                    }
                    other => panic!("expected PeerFailed after abort, got {other}"),
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(1),
                "poisoned calls must fail at once"
            );
            eprintln!(
                "checked: after abort every operation fails at once: {}",
                errors[0]
            );
            drop(c);
            eprintln!("checked: dropping an aborted communicator returns");
        },
    );
}

/// abort() from another thread ends an operation that is still waiting for the GPU.
#[test]
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn abort_interrupts_an_operation_waiting_for_the_gpu() {
    let c = world_of_one();
    let c = std::sync::Arc::new(c);
    // A queue of big matmuls (few kernels, so the launch queue never fills) that keeps the GPU
    // busy for about three seconds after the collective is issued.
    let x = Tensor::randn([8192, 8192], (Kind::Float, cuda())) / 90.0;
    let mut y = x.matmul(&x);
    tch::Cuda::synchronize(0);
    let t0 = Instant::now();
    for _ in 0..3 {
        y = y.matmul(&x);
    }
    tch::Cuda::synchronize(0);
    let per = t0.elapsed().as_secs_f64() / 3.0;
    let n = ((3.0 / per) as usize).clamp(3, 500);
    let aborter = {
        let c = c.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            c.abort("interrupt test");
        })
    };
    let (result, waited) = within(Duration::from_secs(120), "abort during a wait", move || {
        let t0 = Instant::now();
        for _ in 0..n {
            y = y.matmul(&x);
        }
        let r = c.all_reduce_sum(&mut y);
        (r, t0.elapsed())
    });
    aborter.join().unwrap();
    // Without the abort the call would succeed once the queue drained.
    match result {
        Err(CollectiveError::PeerFailed { reason, .. }) => {
            assert!(reason.contains("interrupt test"), "{reason}")
        }
        other => panic!("expected the abort to end the operation, got {other:?}"),
    }
    within(
        Duration::from_secs(120),
        "the stream after an abort",
        || {
            tch::Cuda::synchronize(0);
        },
    );
    eprintln!(
        "checked: abort() ended an all_reduce after {waited:?} with {:.1} s of GPU work queued \
         ({n} matmuls of {per:.4} s); the stream drained afterwards",
        n as f64 * per
    );
}

/// A world of 2 whose rank 1 never arrives: setup fails with Timeout naming rank 1.
#[test]
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn setup_times_out_when_a_rank_never_joins() {
    support::gpu::cuda();
    let id = nccl_unique_id().expect("ncclGetUniqueId");
    let timeout = Duration::from_secs(3);
    let (result, waited) = within(
        Duration::from_secs(60),
        "setup with a missing rank",
        move || {
            let t0 = Instant::now();
            let r = NcclCollective::new(0, 2, &id, 0, timeout).map(|_| ());
            (r, t0.elapsed())
        },
    );
    let e = result.expect_err("rank 1 never joined");
    match e.downcast_ref::<CollectiveError>() {
        Some(CollectiveError::Timeout {
            rank: 1, waited_ms, ..
        }) => assert_eq!(*waited_ms, 3000),
        other => panic!("expected Timeout naming rank 1, got {other:?} ({e:#})"),
    }
    assert!(
        waited >= timeout && waited < timeout + Duration::from_secs(10),
        "{waited:?}"
    );
    eprintln!("checked: setup without rank 1 failed after {waited:?}: {e:#}");
}

/// A regroup of an NCCL collective aborts the old communicator and joins a fresh one (a new
/// unique id sent over the rebuilt TCP mesh): operations work before and after, at world size
/// 1 (NCCL refuses two ranks on one GPU). A regroup whose peer never comes leaves it unusable
/// with an error, and the next regroup restores it.
#[test]
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn a_regroup_replaces_the_communicator() {
    use contrail_worker::dist::regroup::{Regroupable, Transport};
    use contrail_worker::dist::tcp::TcpCollective;
    let device = cuda();
    within(Duration::from_secs(120), "regrouping NCCL", move || {
        let boot = TcpCollective::bind("127.0.0.1:0").unwrap();
        let addr = boot.local_addr().unwrap().to_string();
        let tcp = boot.connect(0, vec![addr.clone()], TIMEOUT).unwrap();
        let transport = Transport::Nccl {
            device: 0,
            timeout: TIMEOUT,
        };
        let c = Regroupable::new(tcp, transport).expect("generation 1's communicator");
        let sum = |c: &Regroupable| {
            let mut t = sample(4, 3, Kind::Float, 1).to_device(device);
            c.all_reduce_sum(&mut t).expect("all_reduce_sum");
            t
        };
        assert_same(
            &sum(&c),
            &sample(4, 3, Kind::Float, 1),
            "generation 1 all_reduce",
        );
        c.regroup(0, vec![addr.clone()], 2, TIMEOUT)
            .expect("generation 2's communicator");
        assert_same(
            &sum(&c),
            &sample(4, 3, Kind::Float, 1),
            "generation 2 all_reduce",
        );
        let never = TcpCollective::bind("127.0.0.1:0").unwrap();
        let peers = vec![addr.clone(), never.local_addr().unwrap().to_string()];
        assert!(c.regroup(0, peers, 3, Duration::from_millis(500)).is_err());
        let mut t = Tensor::ones([2], (Kind::Float, device));
        assert!(
            c.all_reduce_sum(&mut t).is_err(),
            "no communicator between generations"
        );
        c.regroup(0, vec![addr], 4, TIMEOUT)
            .expect("generation 4's communicator");
        assert_same(
            &sum(&c),
            &sample(4, 3, Kind::Float, 1),
            "generation 4 all_reduce",
        );
    });
}
