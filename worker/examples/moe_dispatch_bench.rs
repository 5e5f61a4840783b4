//! MoE expert-parallel benchmark (see bench/moe_dispatch/README.md).
//!
//! World ≥ 2 (TCP on loopback; this binary re-runs itself once per rank): one
//! `MoeFeedForward` block with its experts spread over the ranks.
//!
//! - (a) the exchange alone: one real forward is run with a collective that logs every
//!   `all_to_all` it is asked for (the expert-count header, the token dispatch, the combine),
//!   then exactly those calls (same kinds, shapes and split sizes) are replayed `--iters`
//!   times. Reported: time per layer forward, tokens/s, and the bus bandwidth
//!   busbw = (row bytes a rank sends to other ranks, mean over ranks) / time, i.e. the
//!   NCCL-tests all-to-all convention algbw × (n-1)/n for even splits. With `--splits-dir`
//!   every rank writes its split sizes there, so bench/moe_dispatch/gloo_ref.py replays the
//!   same exchange with torch.distributed gloo;
//! - (b) the whole block per training step: `forward_residual` + `MoeRuntime::backward`
//!   (through the exchange cuts, into the block's input), with the time spent inside
//!   `all_to_all` measured by the same wrapper.
//!
//! World 1 (`--world 1 --device cuda [--bf16]`, or cpu): the MoE block forward+backward
//! against a dense MLP of hidden width top_k × expert_hidden (the same active FLOPs when
//! nothing is dropped), both as `h + mlp(ln(h))`.
//!
//! Machine-readable lines for run.sh: `EXCHANGE_MS=`, `BUSBW_GBPS=` (world ≥ 2),
//! `MOE_STEP_MS=`, `DENSE_STEP_MS=` (world 1).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use contrail_common::config::MoeConfig;
use contrail_worker::dist::local::LocalGroup;
use contrail_worker::dist::tcp::TcpCollective;
use contrail_worker::dist::{self, all_gather_counts, Collective};
use contrail_worker::moe::{ExpertInit, MoeFeedForward, MoeRuntime, MoeSettings, Pass};
use contrail_worker::nn::compute::use_bf16_for_cuda_autocast;
use contrail_worker::nn::Compute;
use tch::nn::{self, Init, Module};
use tch::{Device, Kind, Tensor};

#[derive(Parser, Debug)]
struct Args {
    /// Number of processes (TCP on 127.0.0.1); 1 = the MoE-vs-dense comparison on --device.
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// Tokens per worker (ViT-B/16 at batch 42: 197 × 42 ≈ 8192).
    #[arg(long, default_value_t = 8192)]
    tokens: i64,
    /// Model width D.
    #[arg(long, default_value_t = 768)]
    width: i64,
    /// Experts E (spread evenly over the ranks).
    #[arg(long, default_value_t = 8)]
    experts: u32,
    #[arg(long, default_value_t = 2)]
    top_k: u32,
    #[arg(long, default_value_t = 1.25)]
    capacity_factor: f64,
    /// Hidden width of each expert's MLP.
    #[arg(long, default_value_t = 3072)]
    expert_hidden: i64,
    /// Untimed and timed repetitions of the exchange alone (world ≥ 2).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed and timed training steps of the whole block (forward + backward); 0 timed
    /// steps skips the block measurement.
    #[arg(long, default_value_t = 1)]
    block_warmup: usize,
    #[arg(long, default_value_t = 3)]
    block_iters: usize,
    /// libtorch intra-op threads per process.
    #[arg(long, default_value_t = 1)]
    threads: i32,
    /// cpu or cuda (world 1 only; the TCP exchange moves CPU tensors).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// World 1 on cuda: forward under bf16 autocast (the gate stays float32), as training does.
    #[arg(long)]
    bf16: bool,
    /// World ≥ 2: each rank writes its exchange's split sizes to DIR/rank<r>.json.
    #[arg(long)]
    splits_dir: Option<PathBuf>,
    /// Set on the re-executed children: this process's rank.
    #[arg(long, hide = true)]
    rank: Option<usize>,
    /// Set on the re-executed children: the rendezvous folder.
    #[arg(long, hide = true)]
    dir: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.world > 0 && args.tokens > 0 && args.experts > 0,
        "--world, --tokens and --experts must be positive"
    );
    ensure!(
        matches!(args.top_k, 1 | 2),
        "--top-k must be 1 or 2, got {}",
        args.top_k
    );
    if args.world == 1 {
        return run_single(&args);
    }
    ensure!(
        args.device == "cpu" && !args.bf16,
        "world {} runs on the TCP backend with CPU tensors; --device cuda / --bf16 are for --world 1",
        args.world
    );
    ensure!(args.iters > 0, "--iters must be positive");
    match (args.rank, &args.dir) {
        (Some(rank), Some(dir)) => run_rank(&args, rank, dir),
        _ => launch(&args),
    }
}

fn settings(args: &Args) -> MoeSettings {
    MoeSettings::from_config(&MoeConfig {
        experts: args.experts,
        top_k: args.top_k,
        capacity_factor: args.capacity_factor,
        ..MoeConfig::default()
    })
}

/// PyTorch's default nn.Linear init, as the dense block's MLP uses.
fn torch_uniform(fan_in: i64) -> Init {
    let b = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

/// `ln_2` and the MoE block, every rank drawing the same values (same seed).
fn build_moe(
    vs: &nn::VarStore,
    runtime: &Arc<MoeRuntime>,
    args: &Args,
) -> Result<(nn::LayerNorm, MoeFeedForward)> {
    tch::manual_seed(1);
    let root = vs.root();
    let ln = nn::layer_norm(&root / "ln_2", vec![args.width], Default::default());
    let init = ExpertInit {
        fc_weight: torch_uniform(args.width),
        fc_bias: torch_uniform(args.width),
        proj_weight: torch_uniform(args.expert_hidden),
        proj_bias: torch_uniform(args.expert_hidden),
    };
    let moe = MoeFeedForward::new(
        &(&root / "moe"),
        runtime,
        args.width,
        args.expert_hidden,
        init,
    )?;
    Ok((ln, moe))
}

fn zero_grads(vs: &nn::VarStore, extra: &mut Tensor) {
    for mut v in vs.trainable_variables() {
        v.zero_grad();
    }
    extra.zero_grad();
}

// ---------------------------------------------------------------------------------------------
// World ≥ 2: processes and rendezvous (as allreduce_bench).

fn launch(args: &Args) -> Result<()> {
    common::launch_ranks(args.world, "moe-bench")
}

/// One `all_to_all` the block asked for.
#[derive(Debug, Clone)]
struct Call {
    kind: Kind,
    /// Shape of one row (the input's dims after the first).
    row: Vec<i64>,
    send: Vec<i64>,
    recv: Vec<i64>,
    /// The values sent, for the Int64 expert-count header.
    values: Option<Vec<i64>>,
    /// Made with the receive counts known (`all_to_all_known`: no count round).
    known: bool,
}

impl Call {
    /// Replays the call on `c` with `input`; returns what arrived and from whom.
    fn replay(&self, c: &TcpCollective, input: &Tensor) -> dist::Result<(Tensor, Vec<i64>)> {
        if self.known {
            let out = c.all_to_all_known(input, &self.send, &self.recv)?;
            Ok((out, self.recv.clone()))
        } else {
            c.all_to_all(input, &self.send)
        }
    }
}

impl Call {
    fn row_bytes(&self) -> i64 {
        self.row.iter().product::<i64>() * self.kind.elt_size_in_bytes() as i64
    }

    /// Bytes this rank sends to other ranks.
    fn off_rank_bytes(&self, rank: usize) -> i64 {
        let rows: i64 = (self.send.iter().enumerate())
            .filter(|(p, _)| *p != rank)
            .map(|(_, n)| n)
            .sum();
        rows * self.row_bytes()
    }
}

/// The TCP collective, timing every `all_to_all` and optionally logging it.
struct Timed {
    inner: TcpCollective,
    a2a_ns: AtomicU64,
    log: Mutex<Option<Vec<Call>>>,
}

impl Timed {
    fn a2a_secs(&self) -> f64 {
        self.a2a_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Adds the time since `t0` and, while logging, records the call.
    fn note(&self, t0: Instant, input: &Tensor, send: &[i64], recv: &[i64], known: bool) {
        self.a2a_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Some(log) = self.log.lock().unwrap().as_mut() {
            let values = (input.kind() == Kind::Int64 && input.dim() == 1).then(|| {
                Vec::<i64>::try_from(input).expect("an Int64 tensor converts to Vec<i64>")
            });
            log.push(Call {
                kind: input.kind(),
                row: input.size()[1..].to_vec(),
                send: send.to_vec(),
                recv: recv.to_vec(),
                values,
                known,
            });
        }
    }
}

impl Collective for Timed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, tensor: &mut Tensor) -> dist::Result<()> {
        self.inner.all_reduce_sum(tensor)
    }
    fn all_gather(&self, local: &Tensor, counts: &[i64]) -> dist::Result<Tensor> {
        self.inner.all_gather(local, counts)
    }
    fn reduce_scatter_sum(&self, full: &Tensor, counts: &[i64]) -> dist::Result<Tensor> {
        self.inner.reduce_scatter_sum(full, counts)
    }
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> dist::Result<()> {
        self.inner.broadcast(tensor, root)
    }
    fn all_to_all(&self, input: &Tensor, send_counts: &[i64]) -> dist::Result<(Tensor, Vec<i64>)> {
        let t0 = Instant::now();
        let out = self.inner.all_to_all(input, send_counts)?;
        self.note(t0, input, send_counts, &out.1, false);
        Ok(out)
    }
    fn all_to_all_known(
        &self,
        input: &Tensor,
        send_counts: &[i64],
        recv_counts: &[i64],
    ) -> dist::Result<Tensor> {
        let t0 = Instant::now();
        let out = self
            .inner
            .all_to_all_known(input, send_counts, recv_counts)?;
        self.note(t0, input, send_counts, recv_counts, true);
        Ok(out)
    }
    fn barrier(&self) -> dist::Result<()> {
        self.inner.barrier()
    }
}

fn run_rank(args: &Args, rank: usize, dir: &Path) -> Result<()> {
    tch::set_num_threads(args.threads);
    let world = args.world;
    let timed = Arc::new(Timed {
        inner: common::rendezvous(dir, rank, world, Duration::from_secs(120))?,
        a2a_ns: AtomicU64::new(0),
        log: Mutex::new(None),
    });
    let coll: Arc<dyn Collective> = timed.clone();
    let runtime = MoeRuntime::spread(coll, settings(args), 1)?;
    let vs = nn::VarStore::new(Device::Cpu);
    let (ln, moe) = build_moe(&vs, &runtime, args)?;
    tch::manual_seed(100 + rank as i64);
    let mut h = Tensor::randn([args.tokens, args.width], (Kind::Float, Device::Cpu));
    let dz = Tensor::randn([args.tokens, args.width], (Kind::Float, Device::Cpu));

    // One training-mode forward, logging the exchanges it makes.
    *timed.log.lock().unwrap() = Some(Vec::new());
    runtime.begin_pass(Pass {
        train: true,
        record: false,
        count_load: true,
        aux_weight: 0.0,
    });
    let _ = tch::no_grad(|| moe.forward_residual(&h, &ln));
    let calls = timed.log.lock().unwrap().take().unwrap_or_default();
    let load = runtime.take_load();
    ensure!(
        calls.len() == 3,
        "expected the block's forward to make 3 all-to-alls (header, dispatch, combine), got {}",
        calls.len()
    );
    let (header, dispatch, combine) = (&calls[0], &calls[1], &calls[2]);
    ensure!(
        dispatch.send == combine.recv && dispatch.recv == combine.send,
        "the combine is not the dispatch reversed: {calls:?}"
    );
    if let Some(d) = &args.splits_dir {
        write_splits(d, rank, world, args, &calls)?;
    }

    // Totals over ranks (untimed): off-rank row bytes of dispatch + combine, routed rows,
    // dropped assignments.
    let off = dispatch.off_rank_bytes(rank) + combine.off_rank_bytes(rank);
    let sent_rows: i64 = dispatch.send.iter().sum();
    let dropped = load[0].dropped;
    let sums = |x: i64| -> Result<i64> { Ok(all_gather_counts(&timed.inner, x)?.iter().sum()) };
    let (off_all, rows_all, dropped_all) = (sums(off)?, sums(sent_rows)?, sums(dropped)?);

    let ex = replay_exchange(&timed.inner, rank, args, header, dispatch, combine)?;

    let block = if args.block_iters > 0 {
        Some(block_steps(
            &timed, &runtime, &vs, &ln, &moe, &mut h, &dz, args,
        )?)
    } else {
        None
    };

    if rank == 0 {
        let n = world as f64;
        let per_rank = off_all as f64 / n;
        let busbw = |secs: f64| per_rank / secs / 1e9;
        println!(
            "contrail tcp MoE exchange: world {world}, {} tokens/worker, D {}, E {} (spread over \
             the ranks), top-{}, capacity factor {}, expert hidden {}; {} streams/peer; {} \
             thread(s) per process; {}",
            args.tokens,
            args.width,
            args.experts,
            args.top_k,
            args.capacity_factor,
            args.expert_hidden,
            std::env::var("CONTRAIL_TCP_STREAMS").unwrap_or_else(|_| "4".into()),
            args.threads,
            alloc_env()
        );
        println!(
            "  routed rows {} per worker on average ({} assignments dropped of {}); {:.1} MiB \
             per rank cross ranks per layer forward (dispatch + combine), {:.1} MiB in all",
            rows_all / world as i64,
            dropped_all,
            world as i64 * args.tokens * args.top_k as i64,
            per_rank / (1 << 20) as f64,
            off_all as f64 / (1 << 20) as f64
        );
        println!(
            "  (a) exchange alone, {} warmup + {} iters: mean {:.2} ms  median {:.2} ms per \
             layer forward (header {:.2} + dispatch {:.2} + combine {:.2} ms)",
            args.warmup,
            args.iters,
            ex.mean * 1e3,
            ex.median * 1e3,
            ex.phases[0] * 1e3,
            ex.phases[1] * 1e3,
            ex.phases[2] * 1e3
        );
        println!(
            "      {:.0} tokens/s per worker ({:.0} in all), busbw {:.3} GB/s (median {:.3}), \
             aggregate {:.3} GB/s",
            args.tokens as f64 / ex.mean,
            args.tokens as f64 * n / ex.mean,
            busbw(ex.mean),
            busbw(ex.median),
            off_all as f64 / ex.mean / 1e9
        );
        if let Some(b) = &block {
            let step = b.fwd + b.bwd;
            println!(
                "  (b) whole block, {} warmup + {} steps: forward {:.1} ms (exchanges {:.1}), \
                 backward {:.1} ms (exchanges {:.1}), step {:.1} ms, {:.0} tokens/s per worker; \
                 exchanges {:.1}% of the step",
                args.block_warmup,
                args.block_iters,
                b.fwd * 1e3,
                b.fwd_a2a * 1e3,
                b.bwd * 1e3,
                b.bwd_a2a * 1e3,
                step * 1e3,
                args.tokens as f64 / step,
                100.0 * (b.fwd_a2a + b.bwd_a2a) / step
            );
            println!("BLOCK_STEP_MS={:.3}", step * 1e3);
        }
        println!("EXCHANGE_MS={:.4}", ex.mean * 1e3);
        println!("BUSBW_GBPS={:.4}", busbw(ex.mean));
    }
    Ok(())
}

/// The allocator settings that decide whether a large tensor costs fresh page faults (see
/// the README): libtorch's THP_MEM_ALLOC_ENABLE and glibc's malloc tunables.
fn alloc_env() -> String {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| "unset".into());
    format!(
        "THP_MEM_ALLOC_ENABLE={} GLIBC_TUNABLES={}",
        var("THP_MEM_ALLOC_ENABLE"),
        var("GLIBC_TUNABLES")
    )
}

fn write_splits(dir: &Path, rank: usize, world: usize, args: &Args, calls: &[Call]) -> Result<()> {
    let calls: Vec<_> = calls
        .iter()
        .map(|c| {
            serde_json::json!({
                "kind": format!("{:?}", c.kind),
                "row": c.row,
                "send": c.send,
                "recv": c.recv,
                "values": c.values,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "rank": rank,
        "world": world,
        "tokens": args.tokens,
        "width": args.width,
        "experts": args.experts,
        "top_k": args.top_k,
        "capacity_factor": args.capacity_factor,
        "calls": calls,
    });
    let path = dir.join(format!("rank{rank}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))
}

struct ExchangeTimes {
    mean: f64,
    median: f64,
    /// Mean seconds of header, dispatch, combine.
    phases: [f64; 3],
}

/// Replays the header, dispatch and combine all-to-alls of one layer forward.
fn replay_exchange(
    c: &TcpCollective,
    rank: usize,
    args: &Args,
    header: &Call,
    dispatch: &Call,
    combine: &Call,
) -> Result<ExchangeTimes> {
    let rows = |call: &Call| {
        let mut shape = vec![call.send.iter().sum::<i64>()];
        shape.extend_from_slice(&call.row);
        Tensor::full(shape.as_slice(), rank as f64, (call.kind, Device::Cpu))
    };
    let header_in = Tensor::from_slice(header.values.as_deref().context("header values")?);
    let (dispatch_in, combine_in) = (rows(dispatch), rows(combine));

    // Correctness once: rows from source s hold the value s, and the counts are the logged ones.
    for (call, input) in [(dispatch, &dispatch_in), (combine, &combine_in)] {
        let (out, recv) = call.replay(c, input)?;
        ensure!(
            recv == call.recv,
            "rank {rank}: replay received {recv:?} rows, the block {:?}",
            call.recv
        );
        let mut at = 0;
        for (s, &n) in recv.iter().enumerate() {
            if n > 0 {
                let part = out.narrow(0, at, n);
                let (lo, hi) = (part.min().double_value(&[]), part.max().double_value(&[]));
                ensure!(
                    lo == s as f64 && hi == s as f64,
                    "rank {rank}: rows from rank {s} hold values in [{lo}, {hi}]"
                );
            }
            at += n;
        }
    }

    let once = |phases: &mut [f64; 3]| -> Result<()> {
        let t0 = Instant::now();
        let _ = header.replay(c, &header_in)?;
        let t1 = Instant::now();
        let _ = dispatch.replay(c, &dispatch_in)?;
        let t2 = Instant::now();
        let _ = combine.replay(c, &combine_in)?;
        let t3 = Instant::now();
        phases[0] += (t1 - t0).as_secs_f64();
        phases[1] += (t2 - t1).as_secs_f64();
        phases[2] += (t3 - t2).as_secs_f64();
        Ok(())
    };
    let mut ignored = [0.0; 3];
    for _ in 0..args.warmup {
        once(&mut ignored)?;
    }
    c.barrier()?;
    let mut phases = [0.0; 3];
    let mut times = Vec::with_capacity(args.iters);
    let start = Instant::now();
    for _ in 0..args.iters {
        let t0 = Instant::now();
        once(&mut phases)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let mean = start.elapsed().as_secs_f64() / args.iters as f64;
    times.sort_by(f64::total_cmp);
    Ok(ExchangeTimes {
        mean,
        median: times[times.len() / 2],
        phases: phases.map(|p| p / args.iters as f64),
    })
}

/// Mean seconds per step of the block's forward and backward, and of the all-to-alls in each.
struct BlockTimes {
    fwd: f64,
    bwd: f64,
    fwd_a2a: f64,
    bwd_a2a: f64,
}

#[allow(clippy::too_many_arguments)]
fn block_steps(
    timed: &Timed,
    runtime: &MoeRuntime,
    vs: &nn::VarStore,
    ln: &nn::LayerNorm,
    moe: &MoeFeedForward,
    h: &mut Tensor,
    dz: &Tensor,
    args: &Args,
) -> Result<BlockTimes> {
    // The block's input needs a gradient, so the backward crosses the cuts into it as it
    // would into the previous transformer block.
    *h = h.detach().set_requires_grad(true);
    let mut t = BlockTimes {
        fwd: 0.0,
        bwd: 0.0,
        fwd_a2a: 0.0,
        bwd_a2a: 0.0,
    };
    for i in 0..args.block_warmup + args.block_iters {
        zero_grads(vs, h);
        runtime.begin_pass(Pass {
            train: true,
            record: true,
            count_load: true,
            aux_weight: 1.0 / args.world as f64,
        });
        timed.barrier()?;
        let a0 = timed.a2a_secs();
        let t0 = Instant::now();
        let out = moe.forward_residual(h, ln);
        let (t1, a1) = (Instant::now(), timed.a2a_secs());
        let root = (&out * dz).sum(Kind::Float);
        runtime.backward(&root)?;
        let (t2, a2) = (Instant::now(), timed.a2a_secs());
        ensure!(
            h.grad().defined(),
            "the backward did not reach the block's input"
        );
        if i >= args.block_warmup {
            t.fwd += (t1 - t0).as_secs_f64();
            t.bwd += (t2 - t1).as_secs_f64();
            t.fwd_a2a += a1 - a0;
            t.bwd_a2a += a2 - a1;
        }
    }
    let n = args.block_iters as f64;
    Ok(BlockTimes {
        fwd: t.fwd / n,
        bwd: t.bwd / n,
        fwd_a2a: t.fwd_a2a / n,
        bwd_a2a: t.bwd_a2a / n,
    })
}

// ---------------------------------------------------------------------------------------------
// World 1: the MoE block against a dense MLP of the same active FLOPs.

fn run_single(args: &Args) -> Result<()> {
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => {
            ensure!(
                tch::Cuda::is_available(),
                "--device cuda: no CUDA device visible"
            );
            Device::Cuda(0)
        }
        other => bail!("--device must be cpu or cuda, got {other}"),
    };
    ensure!(
        !args.bf16 || device.is_cuda(),
        "--bf16 is CUDA autocast; use it with --device cuda"
    );
    ensure!(args.block_iters > 0, "--block-iters must be positive");
    tch::set_num_threads(args.threads);
    if args.bf16 {
        use_bf16_for_cuda_autocast();
    }
    let compute = Compute {
        autocast: args.bf16,
        channels_last: false,
    };
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let coll: Arc<dyn Collective> =
        Arc::new(LocalGroup::new(1).pop().expect("one local collective"));
    let runtime = MoeRuntime::spread(coll, settings(args), 1)?;
    let vs = nn::VarStore::new(device);
    let (ln, moe) = build_moe(&vs, &runtime, args)?;

    let dense_hidden = args.top_k as i64 * args.expert_hidden;
    let dvs = nn::VarStore::new(device);
    let dense = {
        let r = dvs.root();
        let ln = nn::layer_norm(&r / "ln_2", vec![args.width], Default::default());
        let lin = |name: &str, i: i64, o: i64| {
            nn::linear(
                &r / name,
                i,
                o,
                nn::LinearConfig {
                    ws_init: torch_uniform(i),
                    bs_init: Some(torch_uniform(i)),
                    bias: true,
                },
            )
        };
        let fc = lin("c_fc", args.width, dense_hidden);
        let proj = lin("c_proj", dense_hidden, args.width);
        nn::func(move |h| h + h.apply(&ln).apply(&fc).gelu("none").apply(&proj))
    };

    tch::manual_seed(100);
    let opts = (Kind::Float, device);
    let mut h = Tensor::randn([args.tokens, args.width], opts).set_requires_grad(true);
    let dz = Tensor::randn([args.tokens, args.width], opts);

    let mut moe_step = |h: &mut Tensor| -> Result<()> {
        zero_grads(&vs, h);
        runtime.begin_pass(Pass {
            train: true,
            record: true,
            count_load: true,
            aux_weight: 1.0,
        });
        let out = compute.run(h, |x| moe.forward_residual(x, &ln));
        runtime.backward(&(out * &dz).sum(Kind::Float))?;
        Ok(())
    };
    let mut dense_step = |h: &mut Tensor| -> Result<()> {
        zero_grads(&dvs, h);
        let out = compute.run(h, |x| dense.forward(x));
        (out * &dz).sum(Kind::Float).backward();
        Ok(())
    };
    let mut time = |step: &mut dyn FnMut(&mut Tensor) -> Result<()>| -> Result<f64> {
        for _ in 0..args.block_warmup {
            step(&mut h)?;
        }
        sync();
        let t0 = Instant::now();
        for _ in 0..args.block_iters {
            step(&mut h)?;
        }
        sync();
        Ok(t0.elapsed().as_secs_f64() / args.block_iters as f64)
    };
    let moe_s = time(&mut moe_step)?;
    let dense_s = time(&mut dense_step)?;
    let load = runtime.take_load();
    let steps = (args.block_warmup + args.block_iters) as i64;
    let routed: i64 = load[0].routed.iter().sum::<i64>() / steps;
    let dropped = load[0].dropped / steps;

    println!(
        "contrail MoE vs dense, world 1 on {:?}{}: {} tokens, D {}, E {}, top-{}, capacity \
         factor {}, expert hidden {} vs dense hidden {}; {} warmup + {} steps (forward + \
         backward)",
        device,
        if args.bf16 { " (bf16 autocast)" } else { "" },
        args.tokens,
        args.width,
        args.experts,
        args.top_k,
        args.capacity_factor,
        args.expert_hidden,
        dense_hidden,
        args.block_warmup,
        args.block_iters
    );
    println!(
        "  MoE {:.2} ms/step ({:.0} tokens/s; {} of {} assignments dropped per step), dense \
         {:.2} ms/step ({:.0} tokens/s); MoE/dense {:.2}x",
        moe_s * 1e3,
        args.tokens as f64 / moe_s,
        dropped,
        routed,
        dense_s * 1e3,
        args.tokens as f64 / dense_s,
        moe_s / dense_s
    );
    println!("MOE_STEP_MS={:.4}", moe_s * 1e3);
    println!("DENSE_STEP_MS={:.4}", dense_s * 1e3);
    Ok(())
}
