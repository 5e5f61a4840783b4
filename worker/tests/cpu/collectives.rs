//! TCP collective across real processes: each multi-rank test re-runs this test binary once per
//! rank (filtered to `tcp_rank_child`, with the rank, world size, scenario and a rendezvous
//! folder in the environment). Every child checks its results against values it computes
//! itself from the deterministic inputs of all ranks and panics (non-zero exit) on a mismatch;
//! the parent asserts every child exited as its scenario requires.

use contrail_test_support as support;

use std::time::{Duration, Instant};
use support::ranks::{assert_all_succeeded, child_env, rendezvous, rendezvous_on};

use contrail_common::auth::JobToken;
use contrail_worker::dist::tcp::{TcpBootstrap, TcpCollective, Topology};
use contrail_worker::dist::{Collective, CollectiveError};
use tch::{Kind, Tensor};

/// Runs the child ranks of this file.
fn run_ranks(scenario: &str, world: usize) -> Vec<(Option<i32>, String)> {
    support::ranks::run_ranks("collectives::tcp_rank_child", scenario, world)
}
/// Exit code of the rank that the failure scenario kills.
const DYING_EXIT: i32 = 17;

// ---------------------------------------------------------------------------------------------
// Parent side.

#[test]
fn two_ranks_all_operations() {
    assert_all_succeeded(&run_ranks("ops", 2));
}

#[test]
fn three_ranks_all_operations() {
    assert_all_succeeded(&run_ranks("ops", 3));
}

#[test]
fn ring_only_links_run_every_ring_operation_and_refuse_all_to_all() {
    assert_all_succeeded(&run_ranks("ring_ops", 4));
}

/// 64 ranks, each its own process, connected on ring neighbours only: the all-reduce sums
/// every rank's values, and every process holds the same few sockets (its two neighbours'
/// streams and its listener) where a full mesh would hold 63 × the streams.
#[test]
fn sixty_four_ranks_on_a_ring_each_hold_a_constant_number_of_sockets() {
    let results = run_ranks("ring_scale", 64);
    assert_all_succeeded(&results);
    let lanes = streams_per_peer();
    for (rank, (_, log)) in results.iter().enumerate() {
        let sockets: usize = log
            .lines()
            // The harness prints the test's name on the same line first.
            .find_map(|l| l.split("SOCKETS=").nth(1))
            .unwrap_or_else(|| panic!("rank {rank} reported no socket count:\n{log}"))
            .trim()
            .parse()
            .expect("a count");
        assert_eq!(
            sockets,
            2 * lanes + 1,
            "rank {rank}: {sockets} sockets; a ring rank holds 2 neighbours x {lanes} streams \
             + its listener (a full mesh would hold {} + 1)",
            63 * lanes
        );
    }
}

/// Streams per pair of ranks, as the TCP backend reads it.
fn streams_per_peer() -> usize {
    std::env::var("CONTRAIL_TCP_STREAMS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(4)
}

#[test]
fn killed_rank_is_named_quickly_by_survivors() {
    let results = run_ranks("die", 3);
    for (rank, (_, log)) in results.iter().enumerate().take(2) {
        eprintln!(
            "rank {rank}: {}",
            log.lines()
                .filter(|l| l.contains("got after"))
                .collect::<String>()
        );
    }
    let (code, log) = &results[2];
    assert_eq!(
        *code,
        Some(DYING_EXIT),
        "the dying rank should exit abruptly; output:\n{log}"
    );
    assert_all_succeeded(&results[..2]);
}

#[test]
fn silent_rank_times_out_with_its_name() {
    let results = run_ranks("silent", 2);
    assert_all_succeeded(&results);
}

/// Rendezvous sends only the linked ranks' addresses; a ring rank missing one of its
/// neighbours' says so at once instead of dialing "" until the timeout.
#[test]
fn a_linked_rank_without_an_address_is_a_clear_error() {
    let e = TcpCollective::bind("127.0.0.1:0")
        .expect("bind")
        .with_topology(Topology::Ring)
        .connect(
            1,
            vec![
                String::new(),
                String::new(),
                "127.0.0.1:1".into(),
                String::new(),
            ],
            Duration::from_secs(30),
        )
        .err()
        .expect("rank 0 is a ring neighbour of rank 1 and has no address");
    assert!(matches!(e, CollectiveError::Usage(_)), "{e:?}");
    assert!(e.to_string().contains("rank 1 links to rank 0"), "{e}");
}

#[test]
fn world_of_one_needs_no_sockets() {
    let c = TcpCollective::bind("127.0.0.1:0")
        .expect("bind")
        .connect(0, vec!["unused:1".into()], Duration::from_secs(1))
        .expect("world of one");
    let mut t = Tensor::from_slice(&[1.5f32, 2.5]);
    c.all_reduce_sum(&mut t).expect("all_reduce");
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.5, 2.5]);
    let g = c
        .all_gather(&Tensor::from_slice(&[4i64, 5]), &[2])
        .expect("all_gather");
    assert_eq!(Vec::<i64>::try_from(&g).unwrap(), vec![4, 5]);
    let (a, counts) = c
        .all_to_all(&Tensor::from_slice(&[7i64]), &[1])
        .expect("all_to_all");
    assert_eq!(
        (Vec::<i64>::try_from(&a).unwrap(), counts),
        (vec![7], vec![1])
    );
    c.barrier().expect("barrier");
    let err = c
        .all_gather(&Tensor::from_slice(&[1i64]), &[2])
        .unwrap_err();
    assert!(matches!(err, CollectiveError::Usage(_)), "{err}");
}

/// Two ranks whose bootstraps differ by `setup`: both must fail to connect, quickly.
fn two_ranks_refuse_each_other(
    a: TcpBootstrap,
    b: TcpBootstrap,
) -> (CollectiveError, CollectiveError) {
    let addrs = vec![
        a.local_addr().unwrap().to_string(),
        b.local_addr().unwrap().to_string(),
    ];
    let a2 = addrs.clone();
    let t = std::thread::spawn(move || a.connect(0, a2, Duration::from_millis(800)).err());
    let started = Instant::now();
    let e1 = b
        .connect(1, addrs, Duration::from_millis(800))
        .err()
        .expect("rank 1 must fail");
    let e0 = t.join().unwrap().expect("rank 0 must fail");
    assert!(started.elapsed() < Duration::from_secs(5));
    (e0, e1)
}

fn bind() -> TcpBootstrap {
    TcpCollective::bind("127.0.0.1:0").expect("bind")
}

#[test]
fn peer_with_another_job_token_is_refused() {
    let (e0, e1) = two_ranks_refuse_each_other(
        bind().with_token(JobToken::parse("token-of-the-first-job").unwrap()),
        bind().with_token(JobToken::parse("token-of-another-job!").unwrap()),
    );
    assert!(
        e1.to_string().contains("rank 0") && e1.to_string().contains("token"),
        "{e1}"
    );
    assert!(e0.to_string().contains("rank 1"), "{e0}");
}

#[test]
fn peer_without_a_token_is_refused_by_a_mesh_with_one() {
    let (e0, e1) = two_ranks_refuse_each_other(
        bind().with_token(JobToken::parse("token-of-the-first-job").unwrap()),
        bind(),
    );
    assert!(e1.to_string().contains("token"), "{e1}");
    assert!(e0.to_string().contains("rank 1"), "{e0}");
}

#[test]
fn peer_of_an_earlier_generation_is_refused() {
    let token = JobToken::parse("the-same-job-token").unwrap();
    let (e0, e1) = two_ranks_refuse_each_other(
        bind().with_token(token.clone()).with_generation(3),
        bind().with_token(token).with_generation(2),
    );
    assert!(e1.to_string().contains("rank 0"), "{e1}");
    assert!(e0.to_string().contains("rank 1"), "{e0}");
}

/// While rank 0 waits for rank 1, strangers connect to its port: random bytes, a truncated
/// hello, a well-formed hello for rank 1 without the token (a rogue), a silent connection and
/// an oversized flood. Rank 0 drops each and the real rank 1 still joins, and the mesh works.
#[test]
fn garbage_and_rogues_on_the_collective_port_change_nothing() {
    use std::io::{Read, Write};
    let token = JobToken::parse("the-real-job-token-here").unwrap();
    let b0 = bind().with_token(token.clone());
    let b1 = bind().with_token(token);
    let addrs = vec![
        b0.local_addr().unwrap().to_string(),
        b1.local_addr().unwrap().to_string(),
    ];
    let target = addrs[0].clone();
    let a0 = addrs.clone();
    let rank0 = std::thread::spawn(move || b0.connect(0, a0, Duration::from_secs(20)));

    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    // A rogue's hello: the right magic and ranks, but it cannot answer the challenge.
    let mut rogue_hello = Vec::new();
    rogue_hello.extend_from_slice(b"CTRLRNG2");
    rogue_hello.extend_from_slice(&0u64.to_le_bytes());
    for v in [2u32, 1, 0, 1 << 16] {
        rogue_hello.extend_from_slice(&v.to_le_bytes());
    }
    rogue_hello.extend_from_slice(&[7u8; 16]);
    let attempts: Vec<Vec<u8>> = vec![
        noise(48),
        noise(7),
        rogue_hello[..20].to_vec(),
        rogue_hello.clone(),
        Vec::new(),
        noise(1 << 20),
    ];
    for bytes in attempts {
        let Ok(mut s) = std::net::TcpStream::connect(&target) else {
            continue;
        };
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let _ = s.write_all(&bytes);
        if bytes == rogue_hello {
            // Rank 0 answers the challenge; the rogue has no proof to send back.
            let mut reply = [0u8; 60];
            let _ = s.read_exact(&mut reply);
            let _ = s.write_all(&[0u8; 32]);
        }
        drop(s);
    }

    let c1 = b1
        .connect(1, addrs, Duration::from_secs(20))
        .expect("rank 1 joins");
    let c0 = rank0.join().unwrap().expect("rank 0 builds the mesh");
    let mut t0 = Tensor::from_slice(&[1.0f32, 2.0]);
    let mut t1 = Tensor::from_slice(&[10.0f32, 20.0]);
    let h = std::thread::spawn(move || {
        c1.all_reduce_sum(&mut t1).unwrap();
        t1
    });
    c0.all_reduce_sum(&mut t0).unwrap();
    let t1 = h.join().unwrap();
    assert_eq!(Vec::<f32>::try_from(&t0).unwrap(), vec![11.0, 22.0]);
    assert_eq!(Vec::<f32>::try_from(&t1).unwrap(), vec![11.0, 22.0]);
}

/// Three ranks build a mesh; rank 2 dies. The survivors' next operation fails naming rank 2;
/// they then build the next generation's mesh on the same listeners (as ranks 0 and 1 of a
/// world of two), where the operations work again, and a process of the old generation
/// cannot join it.
#[test]
fn survivors_build_the_next_generations_mesh_on_the_same_listeners() {
    let token = JobToken::parse("the-token-of-the-regroup-job").unwrap();
    let boots: Vec<TcpBootstrap> = (0..3)
        .map(|_| bind().with_token(token.clone()).with_generation(1))
        .collect();
    let addrs: Vec<String> = boots
        .iter()
        .map(|b| b.local_addr().unwrap().to_string())
        .collect();
    let timeout = Duration::from_secs(5);
    let mut meshes: Vec<TcpCollective> = std::thread::scope(|s| {
        let hs: Vec<_> = boots
            .into_iter()
            .enumerate()
            .map(|(r, b)| {
                let a = addrs.clone();
                s.spawn(move || b.connect(r, a, timeout).expect("generation 1 mesh"))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    drop(meshes.pop()); // rank 2 dies
    let survivors: Vec<TcpCollective> = std::thread::scope(|s| {
        let hs: Vec<_> = meshes
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let mut t = Tensor::from_slice(&[1.0f32]);
                    let e = c.all_reduce_sum(&mut t).expect_err("rank 2 is gone");
                    assert!(e.to_string().contains("rank 2"), "{e}");
                    assert_eq!(c.generation(), 1);
                    c
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let new_addrs = addrs[..2].to_vec();
    let stale = new_addrs[0].clone();
    let results: Vec<Vec<f32>> = std::thread::scope(|s| {
        let hs: Vec<_> = survivors
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let a = new_addrs.clone();
                s.spawn(move || {
                    let c = c
                        .into_bootstrap()
                        .with_generation(2)
                        .connect(r, a, timeout)
                        .expect("generation 2 mesh");
                    assert_eq!((c.rank(), c.world_size(), c.generation()), (r, 2, 2));
                    let mut t = Tensor::from_slice(&[1.0f32 + r as f32, 10.0]);
                    c.all_reduce_sum(&mut t).unwrap();
                    Vec::<f32>::try_from(&t).unwrap()
                })
            })
            .collect();
        // Meanwhile a process of generation 1 (the dead rank restarted with stale state)
        // dials rank 0 as rank 1 of the old world: refused.
        let intruder = bind().with_token(token.clone()).with_generation(1);
        let e = intruder
            .connect(
                1,
                vec![stale, "127.0.0.1:1".into()],
                Duration::from_millis(600),
            )
            .err()
            .expect("an old-generation process cannot join");
        assert!(e.to_string().contains("rank 0"), "{e}");
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results, vec![vec![3.0, 20.0], vec![3.0, 20.0]]);
}

// ---------------------------------------------------------------------------------------------
// Child side.

/// Entry point of a child rank; a no-op when the test harness runs it directly.
#[test]
fn tcp_rank_child() {
    let Some(env) = child_env() else {
        return;
    };
    let timeout = match env.scenario.as_str() {
        "silent" => Duration::from_millis(1500),
        _ => Duration::from_secs(60),
    };
    let topology = if env.scenario.starts_with("ring") {
        Topology::Ring
    } else {
        Topology::Mesh
    };
    let c = if topology == Topology::Ring {
        rendezvous_on(&env.dir, env.rank, env.world, timeout, topology)
    } else {
        rendezvous(&env.dir, env.rank, env.world, timeout)
    };
    let scenario = env.scenario;
    match scenario.as_str() {
        "ops" => ops(&c),
        "ring_ops" => ring_ops(&c),
        "ring_scale" => ring_scale(&c),
        "die" => die(&c),
        "silent" => silent(&c),
        other => panic!("unknown scenario {other}"),
    }
}

/// Every operation a ring-only collective supports, checked, and all-to-all refused.
fn ring_ops(c: &TcpCollective) {
    let (rank, world) = (c.rank(), c.world_size());
    assert_eq!(c.topology(), Topology::Ring);
    let len = 100_003;
    let mut t = Tensor::from_slice(&(0..len).map(|i| val(i, rank) as f32).collect::<Vec<_>>());
    c.all_reduce_sum(&mut t).expect("all_reduce");
    let got = Vec::<f32>::try_from(&t).unwrap();
    for (i, g) in got.iter().enumerate() {
        let want: f32 = (0..world).map(|r| val(i, r) as f32).sum();
        assert_eq!(*g, want, "all_reduce element {i}");
    }
    let counts: Vec<i64> = (0..world as i64).map(|r| r + 1).collect();
    let local = Tensor::full(
        [rank as i64 + 1, 2],
        rank as i64,
        (Kind::Int64, tch::Device::Cpu),
    );
    let g = Vec::<i64>::try_from(
        &c.all_gather(&local, &counts)
            .expect("all_gather")
            .view([-1]),
    )
    .unwrap();
    let want: Vec<i64> = (0..world as i64)
        .flat_map(|r| std::iter::repeat_n(r, 2 * (r as usize + 1)))
        .collect();
    assert_eq!(g, want, "all_gather");
    let full = Tensor::ones(
        [counts.iter().sum::<i64>()],
        (Kind::Float, tch::Device::Cpu),
    );
    let mine = c
        .reduce_scatter_sum(&full, &counts)
        .expect("reduce_scatter");
    assert_eq!(
        Vec::<f32>::try_from(&mine).unwrap(),
        vec![world as f32; rank + 1],
        "reduce_scatter"
    );
    let mut b = Tensor::full([5], rank as f64, (Kind::Double, tch::Device::Cpu));
    c.broadcast(&mut b, 2).expect("broadcast");
    assert_eq!(Vec::<f64>::try_from(&b).unwrap(), vec![2.0; 5], "broadcast");
    c.barrier().expect("barrier");
    match c.all_to_all(
        &Tensor::zeros([world as i64], (Kind::Float, tch::Device::Cpu)),
        &vec![1; world],
    ) {
        Err(CollectiveError::Usage(m)) => assert!(m.contains("ring"), "{m}"),
        other => panic!("all_to_all on a ring-only collective: {other:?}"),
    }
    c.barrier().expect("barrier after the refusal");
}

/// One all-reduce at scale, then this process's socket count (printed for the parent).
fn ring_scale(c: &TcpCollective) {
    let (rank, world) = (c.rank(), c.world_size());
    let mut t = Tensor::full([4099], (rank + 1) as f64, (Kind::Double, tch::Device::Cpu));
    c.all_reduce_sum(&mut t).expect("all_reduce");
    let want = (world * (world + 1) / 2) as f64;
    let got = Vec::<f64>::try_from(&t).unwrap();
    assert!(
        got.iter().all(|&v| v == want),
        "all_reduce gave {:?}, not {want}",
        &got[..3]
    );
    let sockets = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count();
    println!("SOCKETS={sockets}");
    // Nobody leaves while a peer may still be reading from it.
    c.barrier().expect("barrier");
}

/// Deterministic value of element `i` on rank `r`, exactly representable so sums in any order
/// are exact.
fn val(i: usize, r: usize) -> f64 {
    ((i * 7 + r * 13) % 101) as f64 * 0.25 - 5.0
}

fn ops(c: &TcpCollective) {
    let (rank, world) = (c.rank(), c.world_size());

    for len in [1usize, 7, 1_000_003] {
        // f32
        let mut t = Tensor::from_slice(&(0..len).map(|i| val(i, rank) as f32).collect::<Vec<_>>());
        c.all_reduce_sum(&mut t).expect("all_reduce f32");
        let got = Vec::<f32>::try_from(&t).unwrap();
        for (i, g) in got.iter().enumerate() {
            let want: f32 = (0..world).map(|r| val(i, r) as f32).sum();
            assert_eq!(*g, want, "f32 len {len} element {i}");
        }
        // f64 with an offset f32 could not hold exactly.
        let mut t = Tensor::from_slice(&(0..len).map(|i| 1e12 + val(i, rank)).collect::<Vec<_>>());
        c.all_reduce_sum(&mut t).expect("all_reduce f64");
        let got = Vec::<f64>::try_from(&t).unwrap();
        for (i, g) in got.iter().enumerate() {
            let want: f64 = (0..world).map(|r| 1e12 + val(i, r)).sum();
            assert_eq!(*g, want, "f64 len {len} element {i}");
        }
        // i64 beyond 32 bits.
        let v64 = |i: usize, r: usize| (i as i64) * (r as i64 + 1) + (r as i64) * 5_000_000_007;
        let mut t = Tensor::from_slice(&(0..len).map(|i| v64(i, rank)).collect::<Vec<_>>());
        c.all_reduce_sum(&mut t).expect("all_reduce i64");
        let got = Vec::<i64>::try_from(&t).unwrap();
        for (i, g) in got.iter().enumerate() {
            let want: i64 = (0..world).map(|r| v64(i, r)).sum();
            assert_eq!(*g, want, "i64 len {len} element {i}");
        }
    }

    // i32, 2-D and non-contiguous (a transpose): the result must land in the caller's view.
    let base: Vec<i32> = (0..12).map(|i| i * (rank as i32 + 1)).collect();
    let mut t = Tensor::from_slice(&base).view([3, 4]).tr();
    assert!(!t.is_contiguous());
    c.all_reduce_sum(&mut t).expect("all_reduce i32 transposed");
    let tri: i32 = (1..=world as i32).sum();
    let want = Tensor::from_slice(&(0..12).map(|i| i * tri).collect::<Vec<i32>>())
        .view([3, 4])
        .tr();
    assert!(t.equal(&want), "i32 transposed all-reduce");

    // Reductions refuse kinds they cannot sum, without poisoning the collective.
    let mut b = Tensor::from_slice(&[true, false]);
    assert!(matches!(
        c.all_reduce_sum(&mut b),
        Err(CollectiveError::Usage(_))
    ));

    // all_gather with uneven counts and a rank with zero rows.
    let counts: Vec<i64> = if world == 2 {
        vec![0, 3]
    } else {
        vec![2, 0, 5]
    };
    let rows = |r: usize| -> Vec<f32> {
        (0..counts[r] as usize * 3)
            .map(|k| (r * 1000 + k) as f32)
            .collect()
    };
    let local = Tensor::from_slice(&rows(rank)).view([counts[rank], 3]);
    let g = c.all_gather(&local, &counts).expect("all_gather");
    let total: i64 = counts.iter().sum();
    assert_eq!(g.size(), vec![total, 3]);
    let want: Vec<f32> = (0..world).flat_map(rows).collect();
    assert_eq!(
        Vec::<f32>::try_from(&g.flatten(0, -1)).unwrap(),
        want,
        "all_gather"
    );

    // reduce_scatter with the same uneven counts (Double and Int64).
    let fv = |row: usize, col: usize, r: usize| (row * 3 + col) as f64 * 0.5 + (r * 100) as f64;
    let full: Vec<f64> = (0..total as usize)
        .flat_map(|row| (0..3).map(move |col| fv(row, col, rank)))
        .collect();
    let full = Tensor::from_slice(&full).view([total, 3]);
    let mine = c
        .reduce_scatter_sum(&full, &counts)
        .expect("reduce_scatter f64");
    assert_eq!(mine.size(), vec![counts[rank], 3]);
    let first: usize = counts[..rank].iter().sum::<i64>() as usize;
    let want: Vec<f64> = (first..first + counts[rank] as usize)
        .flat_map(|row| (0..3).map(move |col| (0..world).map(|r| fv(row, col, r)).sum::<f64>()))
        .collect();
    assert_eq!(
        Vec::<f64>::try_from(&mine.flatten(0, -1)).unwrap(),
        want,
        "reduce_scatter"
    );
    let full_i = (&full * 2).to_kind(Kind::Int64);
    let mine_i = c
        .reduce_scatter_sum(&full_i, &counts)
        .expect("reduce_scatter i64");
    let want_i: Vec<i64> = want.iter().map(|v| (v * 2.0) as i64).collect();
    assert_eq!(
        Vec::<i64>::try_from(&mine_i.flatten(0, -1)).unwrap(),
        want_i
    );

    // broadcast from a non-zero root, large enough to be pipelined in several segments.
    let root = 1;
    let payload: Vec<f32> = (0..300_001).map(|i| val(i, 99) as f32).collect();
    let mut t = if rank == root {
        Tensor::from_slice(&payload)
    } else {
        Tensor::zeros([300_001], (Kind::Float, tch::Device::Cpu))
    };
    c.broadcast(&mut t, root).expect("broadcast");
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), payload, "broadcast");

    // all_to_all with uneven per-peer counts, zeros included; a row encodes (src, dst, k).
    let sends = |src: usize, dst: usize| ((src + 2 * dst) % 3) as i64;
    let send_counts: Vec<i64> = (0..world).map(|p| sends(rank, p)).collect();
    let input: Vec<i64> = (0..world)
        .flat_map(|p| (0..sends(rank, p)).flat_map(move |k| [rank as i64, p as i64, k]))
        .collect();
    let input = Tensor::from_slice(&input).view([-1, 3]);
    let (out, recv_counts) = c.all_to_all(&input, &send_counts).expect("all_to_all");
    let want_counts: Vec<i64> = (0..world).map(|q| sends(q, rank)).collect();
    assert_eq!(recv_counts, want_counts, "all_to_all counts");
    let want: Vec<i64> = (0..world)
        .flat_map(|q| (0..sends(q, rank)).flat_map(move |k| [q as i64, rank as i64, k]))
        .collect();
    assert_eq!(
        Vec::<i64>::try_from(&out.flatten(0, -1)).unwrap(),
        want,
        "all_to_all rows"
    );
    // The same exchange with the receive counts known up front (no count round).
    let known = c
        .all_to_all_known(&input, &send_counts, &want_counts)
        .expect("all_to_all_known");
    assert_eq!(
        Vec::<i64>::try_from(&known.flatten(0, -1)).unwrap(),
        want,
        "all_to_all_known rows"
    );

    // barrier really waits: rank 0 arrives 400 ms late, so nobody may leave before that.
    let start = Instant::now();
    if rank == 0 {
        std::thread::sleep(Duration::from_millis(400));
    }
    c.barrier().expect("barrier");
    assert!(
        start.elapsed() >= Duration::from_millis(350),
        "barrier returned early on rank {rank}"
    );
    c.barrier().expect("second barrier");
}

fn die(c: &TcpCollective) {
    c.barrier().expect("barrier before the failure");
    if c.rank() == 2 {
        // Dies in the middle of the all-reduce loop below, without closing anything cleanly.
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            std::process::exit(DYING_EXIT);
        });
    }
    let start = Instant::now();
    let mut t = Tensor::ones([1 << 20], (Kind::Float, tch::Device::Cpu));
    for _ in 0..100_000 {
        if let Err(e) = c.all_reduce_sum(&mut t) {
            let elapsed = start.elapsed();
            let msg = e.to_string();
            eprintln!("rank {} got after {elapsed:?}: {msg}", c.rank());
            assert!(msg.contains("rank 2"), "error should name rank 2: {msg}");
            assert!(
                elapsed < Duration::from_secs(10),
                "took {elapsed:?} to notice"
            );
            // Poisoned: the next call fails at once with the same peer.
            let again = c.barrier().expect_err("poisoned collective must fail");
            assert!(again.to_string().contains("rank 2"), "{again}");
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "rank 2 never died?"
        );
    }
    panic!("all-reduce kept succeeding although rank 2 died");
}

fn silent(c: &TcpCollective) {
    if c.rank() == 1 {
        // Stays alive but never enters the collective.
        std::thread::sleep(Duration::from_millis(4000));
        return;
    }
    let start = Instant::now();
    let mut t = Tensor::ones([1000], (Kind::Float, tch::Device::Cpu));
    let e = c
        .all_reduce_sum(&mut t)
        .expect_err("silent peer must time out");
    let elapsed = start.elapsed();
    assert!(
        matches!(e, CollectiveError::Timeout { rank: 1, .. }),
        "expected a timeout naming rank 1, got {e}"
    );
    assert!(
        elapsed >= Duration::from_millis(1400) && elapsed < Duration::from_millis(3500),
        "timed out after {elapsed:?}, configured 1500 ms"
    );
}
