//! TCP backend of [`Collective`]: a full mesh of plain TCP sockets between the ranks and ring
//! algorithms on top of it, for CPU tensors (and for tests that run several ranks on one host,
//! since NCCL refuses two ranks on one GPU).
//!
//! Construction has two phases so a worker can register its address before its peers are known:
//! [`TcpCollective::bind`] opens the listener, [`TcpBootstrap::connect`] builds the mesh (rank i
//! dials every lower rank and accepts every higher one; a handshake carries the rank, the world
//! size and a job/generation token so a stale process cannot join).
//!
//! Every operation is compiled into a [`Plan`]: an ordered list of segment sends and an ordered
//! list of segment receives. A sender thread and the calling thread (the receiver) run the two
//! lists concurrently, so every link is used in both directions at once; a send that forwards
//! received data waits only for that segment, which pipelines the ring. Each segment travels as
//! a 16-byte header (tag, operation number, length) and its payload; the header lets a rank
//! catch peers that disagree on sizes, and lets a rank that saw a failure tell the others which
//! peer failed (an abort frame) instead of leaving them to time out.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::rows::{self, row_bytes};
use super::{Collective, CollectiveError, Result};

const HELLO_MAGIC: u64 = u64::from_le_bytes(*b"CTRLRING");
const FRAME_DATA: u32 = 0xC0DA_7A01;
const FRAME_ABORT: u32 = 0xC0DA_AB07;
const HEADER_LEN: usize = 16;
/// Pipelining unit (default 512 KiB; `CONTRAIL_TCP_SEGMENT_KIB` overrides it for tuning). Big
/// enough that per-segment costs (a header, a wake-up) vanish next to the copy, small enough
/// that the forwarding rank starts sending early and the reduce scratch stays in cache.
fn segment_bytes() -> usize {
    static V: OnceLock<usize> = OnceLock::new();
    *V.get_or_init(|| {
        env_kib("CONTRAIL_TCP_SEGMENT_KIB")
            .filter(|&b| b > 0)
            .unwrap_or(512 << 10)
    })
}

/// Kernel send/receive buffer asked for on every connection (default 4 MiB, which Linux caps
/// at wmem_max/rmem_max; `CONTRAIL_TCP_SOCKET_BUFFER_KIB=0` keeps the kernel's autotuning).
fn socket_buffer_bytes() -> usize {
    static V: OnceLock<usize> = OnceLock::new();
    *V.get_or_init(|| env_kib("CONTRAIL_TCP_SOCKET_BUFFER_KIB").unwrap_or(4 << 20))
}

/// TCP connections per pair of ranks (default 4; `CONTRAIL_TCP_STREAMS` overrides it, and all
/// ranks must agree). One stream's kernel copies run on the one core that calls send or recv;
/// striping segments over several streams spreads them over several cores, like NCCL's
/// NCCL_NSOCKS_PERTHREAD.
fn streams_per_peer() -> usize {
    std::env::var("CONTRAIL_TCP_STREAMS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n: &usize| (1..=64).contains(&n))
        .unwrap_or(4)
}

/// A KiB count from the environment, in bytes (a KiB multiple: whole elements of every kind).
fn env_kib(name: &str) -> Option<usize> {
    let kib: usize = std::env::var(name).ok()?.trim().parse().ok()?;
    Some(kib << 10)
}

/// A bound listener waiting for the peer list; see [`TcpCollective::bind`].
pub struct TcpBootstrap {
    listener: TcpListener,
    token: u64,
}

/// The TCP collective for one rank. Operations are serialised internally; after any failure
/// the collective is poisoned and every later call fails at once with the same error.
pub struct TcpCollective {
    rank: usize,
    world: usize,
    addrs: Vec<String>,
    /// `links[p][lane]` are the connections to rank p (none for this rank).
    links: Vec<Vec<TcpStream>>,
    lanes: usize,
    timeout: Duration,
    state: Mutex<OpState>,
}

struct OpState {
    seq: u32,
    poisoned: Option<Failure>,
}

/// Why an operation failed, before the peer's address is attached.
#[derive(Clone, Debug)]
enum Failure {
    Peer { rank: usize, reason: String },
    Timeout { rank: usize, waited_ms: u64 },
    Usage(String),
}

impl TcpCollective {
    /// Binds the listener peers will dial (`"0.0.0.0:0"` or `"127.0.0.1:0"` pick a free port).
    pub fn bind(addr: &str) -> io::Result<TcpBootstrap> {
        Ok(TcpBootstrap {
            listener: TcpListener::bind(addr)?,
            token: 0,
        })
    }

    /// The address every peer was reached at, indexed by rank.
    pub fn peer_addrs(&self) -> &[String] {
        &self.addrs
    }

    /// How long a peer may stay silent before an operation fails with `Timeout`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn to_error(&self, f: &Failure) -> CollectiveError {
        match f {
            Failure::Peer { rank, reason } => CollectiveError::PeerFailed {
                rank: *rank,
                addr: self.addr_of(*rank),
                reason: reason.clone(),
            },
            Failure::Timeout { rank, waited_ms } => CollectiveError::Timeout {
                rank: *rank,
                addr: self.addr_of(*rank),
                waited_ms: *waited_ms,
            },
            Failure::Usage(m) => CollectiveError::Usage(m.clone()),
        }
    }

    fn addr_of(&self, rank: usize) -> String {
        self.addrs
            .get(rank)
            .cloned()
            .unwrap_or_else(|| "unknown address".to_string())
    }

    /// Takes the operation lock, refusing to start when poisoned, and numbers the operation.
    /// All-to-all of rows; the round of counts is skipped when `known_recv` gives them.
    fn all_to_all_rows(
        &self,
        input: &Tensor,
        send_counts: &[i64],
        known_recv: Option<&[i64]>,
    ) -> Result<(Tensor, Vec<i64>)> {
        check_cpu(input, "all_to_all")?;
        let (send_offs, total) = row_offsets(send_counts, self.world, "all_to_all")?;
        let rows = dim0(input, "all_to_all")?;
        if rows != total {
            return Err(CollectiveError::Usage(format!(
                "all_to_all: input has {rows} rows but send_counts sum to {total}"
            )));
        }
        let (r, n) = (self.rank, self.world);
        let input = input.contiguous();
        let mut recv_counts = vec![0i64; n];
        recv_counts[r] = send_counts[r];
        if let Some(known) = known_recv {
            if known.len() != n || known[r] != send_counts[r] || known.iter().any(|&c| c < 0) {
                return Err(CollectiveError::Usage(format!(
                    "all_to_all_known: receive counts {known:?} do not fit rank {r} of {n} \
                     sending {send_counts:?}"
                )));
            }
            recv_counts.copy_from_slice(known);
        }
        let mut st = if n > 1 { Some(self.begin()?) } else { None };
        if let Some(st) = st.as_mut().filter(|_| known_recv.is_none()) {
            // Phase 1: every peer learns how many rows it will get from this rank.
            let mut plan = Plan::default();
            for p in self.others() {
                plan.sends.push(SendItem {
                    peer: p,
                    lane: 0,
                    ptr: &send_counts[p] as *const i64 as usize,
                    len: 8,
                    after_recv: None,
                });
            }
            for k in 1..n {
                let p = (r + n - k) % n;
                plan.recvs.push(RecvItem {
                    peer: p,
                    lane: 0,
                    ptr: &mut recv_counts[p] as *mut i64 as usize,
                    len: 8,
                    reduce: None,
                });
            }
            self.execute(st, plan)?;
            if let Some((p, c)) = recv_counts.iter().enumerate().find(|(_, c)| **c < 0) {
                let f = Failure::Usage(format!("all_to_all: rank {p} announced {c} rows"));
                let e = self.to_error(&f);
                st.poisoned = Some(f);
                return Err(e);
            }
        }
        let (recv_offs, recv_total) = row_offsets(&recv_counts, n, "all_to_all")?;
        let out = Tensor::empty(with_rows(&input, recv_total), (input.kind(), Device::Cpu));
        if send_counts[r] > 0 {
            out.narrow(0, recv_offs[r] as i64, send_counts[r])
                .copy_(&input.narrow(0, send_offs[r] as i64, send_counts[r]));
        }
        if let Some(st) = st.as_mut() {
            // Phase 2: at step k send to r+k and receive from r-k, which pairs every sender
            // with a receiver on the same step and so cannot deadlock.
            let rb = row_bytes(&input);
            let (ib, ob) = (input.data_ptr() as usize, out.data_ptr() as usize);
            let mut plan = Plan::default();
            for k in 1..n {
                let p = (r + k) % n;
                let (o, l) = (send_offs[p] * rb, send_counts[p] as usize * rb);
                for (so, sl) in segments(ib + o, l) {
                    plan.sends.push(SendItem {
                        peer: p,
                        lane: 0,
                        ptr: so,
                        len: sl,
                        after_recv: None,
                    });
                }
                let q = (r + n - k) % n;
                let (o, l) = (recv_offs[q] * rb, recv_counts[q] as usize * rb);
                for (ro, rl) in segments(ob + o, l) {
                    plan.recvs.push(RecvItem {
                        peer: q,
                        lane: 0,
                        ptr: ro,
                        len: rl,
                        reduce: None,
                    });
                }
            }
            self.execute(st, plan)?;
        }
        Ok((out, recv_counts))
    }

    fn begin(&self) -> Result<MutexGuard<'_, OpState>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = &st.poisoned {
            return Err(self.to_error(f));
        }
        st.seq = st.seq.wrapping_add(1);
        Ok(st)
    }

    /// Runs a plan under the operation lock; a failure poisons the collective.
    fn execute(&self, st: &mut OpState, mut plan: Plan) -> Result<()> {
        plan.assign_lanes(self.world, self.lanes);
        match self.run_plan(&plan, st.seq) {
            Ok(()) => Ok(()),
            Err(f) => {
                self.abort_everyone(&f, st.seq);
                let e = self.to_error(&f);
                st.poisoned = Some(f);
                Err(e)
            }
        }
    }

    /// After a failed operation, leaves an abort frame on every link but the culprit's, so a
    /// peer that reads from this rank later (in this or its next operation) learns which rank
    /// failed instead of blaming this one when this process exits. Every outgoing stream is at
    /// a frame boundary here: the sender only stops mid-frame on an error with the culprit.
    /// Non-blocking, so a peer that stopped reading cannot stall the error path.
    fn abort_everyone(&self, f: &Failure, seq: u32) {
        let culprit = match f {
            Failure::Peer { rank, .. } | Failure::Timeout { rank, .. } => Some(*rank),
            Failure::Usage(_) => None,
        };
        let payload = encode_abort(f, self.rank);
        for (p, lanes) in self.links.iter().enumerate() {
            if Some(p) == culprit {
                continue;
            }
            for link in lanes {
                if link.set_nonblocking(true).is_ok() {
                    let _ = write_frame(link, FRAME_ABORT, seq, &payload);
                }
            }
        }
    }

    fn link(&self, peer: usize, lane: usize) -> &TcpStream {
        &self.links[peer][lane]
    }

    /// Runs every lane's sends and receives on threads of their own (the last task on the
    /// calling thread), so all streams move data in both directions at once.
    fn run_plan(&self, plan: &Plan, seq: u32) -> std::result::Result<(), Failure> {
        let progress = TransferProgress {
            state: Mutex::new((vec![false; plan.recvs.len()], None)),
            cv: Condvar::new(),
        };
        let mut tasks: Vec<(bool, Vec<usize>)> = Vec::new();
        for lane in 0..self.lanes {
            let sends: Vec<usize> = (0..plan.sends.len())
                .filter(|&i| plan.sends[i].lane == lane)
                .collect();
            let recvs: Vec<usize> = (0..plan.recvs.len())
                .filter(|&i| plan.recvs[i].lane == lane)
                .collect();
            if !sends.is_empty() {
                tasks.push((true, sends));
            }
            if !recvs.is_empty() {
                tasks.push((false, recvs));
            }
        }
        let progress_ref = &progress;
        let run = move |(is_send, items): (bool, Vec<usize>)| {
            if is_send {
                self.run_sends(plan, &items, progress_ref, seq)
            } else {
                self.run_recvs(plan, &items, progress_ref, seq)
            }
        };
        let last = tasks.pop();
        thread::scope(|s| {
            for task in tasks {
                s.spawn(move || run(task));
            }
            if let Some(task) = last {
                run(task);
            }
        });
        let (_, failure) = progress
            .state
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        failure.map_or(Ok(()), Err)
    }

    fn run_sends(&self, plan: &Plan, items: &[usize], progress: &TransferProgress, seq: u32) {
        for (k, &i) in items.iter().enumerate() {
            let item = &plan.sends[i];
            if let Err(f) = progress.wait_for(item.after_recv) {
                self.send_aborts(plan, &items[k..], &f, seq);
                return;
            }
            // SAFETY: the plan's builder guarantees the range lies in a live buffer that no
            // receive item writes while this send can run (see `ring_plan`).
            let payload: &[u8] = if item.len == 0 {
                &[]
            } else {
                unsafe { std::slice::from_raw_parts(item.ptr as *const u8, item.len) }
            };
            if let Err(e) = write_frame(self.link(item.peer, item.lane), FRAME_DATA, seq, payload) {
                let f = io_failure(item.peer, &e, self.timeout, "send to");
                progress.fail(f.clone());
                self.send_aborts(plan, &items[k + 1..], &f, seq);
                return;
            }
        }
    }

    /// Tells every peer this rank still owed data that the operation failed, and why.
    fn send_aborts(&self, plan: &Plan, remaining: &[usize], f: &Failure, seq: u32) {
        let culprit = match f {
            Failure::Peer { rank, .. } | Failure::Timeout { rank, .. } => Some(*rank),
            Failure::Usage(_) => None,
        };
        let payload = encode_abort(f, self.rank);
        let mut told = vec![false; self.world];
        for item in remaining.iter().map(|&i| &plan.sends[i]) {
            if told[item.peer] || Some(item.peer) == culprit {
                continue;
            }
            told[item.peer] = true;
            // Best effort: the peer may be gone too, and its own error will say so.
            let _ = write_frame(self.link(item.peer, item.lane), FRAME_ABORT, seq, &payload);
        }
    }

    fn run_recvs(&self, plan: &Plan, items: &[usize], progress: &TransferProgress, seq: u32) {
        let needs_scratch = items.iter().any(|&i| plan.recvs[i].reduce.is_some());
        // u64 storage keeps the scratch aligned for every element type.
        let mut scratch = vec![
            0u64;
            if needs_scratch {
                segment_bytes() / 8
            } else {
                0
            }
        ];
        for &i in items {
            if progress.failed() {
                return;
            }
            if let Err(f) = self.recv_one(&plan.recvs[i], &mut scratch, seq) {
                progress.fail(f);
                return;
            }
            progress.advance(i);
        }
    }

    fn recv_one(
        &self,
        item: &RecvItem,
        scratch: &mut [u64],
        seq: u32,
    ) -> std::result::Result<(), Failure> {
        let mut stream = self.link(item.peer, item.lane);
        let mut header = [0u8; HEADER_LEN];
        stream
            .read_exact(&mut header)
            .map_err(|e| io_failure(item.peer, &e, self.timeout, "receive from"))?;
        let (tag, their_seq, len) = decode_header(&header);
        if tag == FRAME_ABORT {
            let mut payload = vec![0u8; len.min(1 << 16) as usize];
            stream
                .read_exact(&mut payload)
                .map_err(|e| io_failure(item.peer, &e, self.timeout, "receive from"))?;
            return Err(decode_abort(&payload, item.peer));
        }
        if tag != FRAME_DATA {
            return Err(Failure::Peer {
                rank: item.peer,
                reason: format!("sent a corrupt frame (tag {tag:#x}); is it a contrail peer?"),
            });
        }
        if their_seq != seq || len != item.len as u64 {
            return Err(Failure::Usage(format!(
                "rank {} sent {len} bytes for collective #{their_seq} while rank {} expected {} \
                 bytes for collective #{seq}: ranks called collectives in a different order or \
                 with different shapes/counts",
                item.peer, self.rank, item.len
            )));
        }
        match item.reduce {
            _ if item.len == 0 => {}
            None => {
                // SAFETY: the range lies in the operation's output buffer and nothing else
                // touches it until this segment is marked received.
                let dst = unsafe { std::slice::from_raw_parts_mut(item.ptr as *mut u8, item.len) };
                stream
                    .read_exact(dst)
                    .map_err(|e| io_failure(item.peer, &e, self.timeout, "receive from"))?;
            }
            Some(elem) => {
                // SAFETY: scratch holds segment_bytes() and segments are at most that long.
                let buf = unsafe {
                    std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut u8, item.len)
                };
                stream
                    .read_exact(buf)
                    .map_err(|e| io_failure(item.peer, &e, self.timeout, "receive from"))?;
                // SAFETY: same range argument as above; both are aligned to the element size.
                unsafe { reduce_into(elem, item.ptr, buf.as_ptr(), item.len) };
            }
        }
        Ok(())
    }

    fn others(&self) -> impl Iterator<Item = usize> + '_ {
        (1..self.world).map(move |k| (self.rank + k) % self.world)
    }
}

impl TcpBootstrap {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Sets the job/generation token every peer must present (default 0). Use a value that
    /// changes with each restart of the job so a process from an earlier attempt cannot join.
    pub fn with_token(mut self, token: u64) -> Self {
        self.token = token;
        self
    }

    /// Builds the mesh. `peer_addrs[r]` is where rank r listens (this rank's own entry is not
    /// used). Dialing retries until `timeout` has passed, since peers start at different times;
    /// `timeout` is also how long a peer may stay silent during an operation.
    pub fn connect(
        self,
        rank: usize,
        peer_addrs: Vec<String>,
        timeout: Duration,
    ) -> Result<TcpCollective> {
        let world = peer_addrs.len();
        if rank >= world {
            return Err(CollectiveError::Usage(format!(
                "rank {rank} is outside a world of {world} peer addresses"
            )));
        }
        if timeout.is_zero() {
            return Err(CollectiveError::Usage(
                "collective timeout must be positive".into(),
            ));
        }
        let deadline = Instant::now() + timeout;
        let token = self.token;
        let listener = self.listener;
        let peer_addrs_ref = &peer_addrs;
        let lanes = streams_per_peer();
        let mut links: Vec<Vec<Option<TcpStream>>> = (0..world)
            .map(|p| {
                (0..if p == rank { 0 } else { lanes })
                    .map(|_| None)
                    .collect()
            })
            .collect();
        let fail = |f: Failure| {
            let addr = |r: usize| peer_addrs_ref.get(r).cloned().unwrap_or_default();
            match f {
                Failure::Peer { rank, reason } => CollectiveError::PeerFailed {
                    addr: addr(rank),
                    rank,
                    reason,
                },
                Failure::Timeout { rank, waited_ms } => CollectiveError::Timeout {
                    addr: addr(rank),
                    rank,
                    waited_ms,
                },
                Failure::Usage(m) => CollectiveError::Usage(m),
            }
        };
        let (accepted, dialed) = thread::scope(|s| {
            let acceptor =
                s.spawn(|| accept_higher(&listener, rank, world, lanes, token, deadline));
            let mut dialed = Vec::new();
            for (peer, addr) in peer_addrs.iter().enumerate().take(rank) {
                for lane in 0..lanes {
                    let me = Hello {
                        rank,
                        world,
                        lane,
                        lanes,
                        token,
                    };
                    match dial(addr, &me, peer, deadline) {
                        Ok(stream) => dialed.push((peer, lane, stream)),
                        Err(f) => return (Ok(Vec::new()), Err(f)),
                    }
                }
            }
            let accepted = acceptor.join().unwrap_or_else(|_| {
                Err(Failure::Usage(
                    "the connection acceptor thread panicked".into(),
                ))
            });
            (accepted, Ok(dialed))
        });
        for (peer, lane, stream) in dialed
            .map_err(fail)?
            .into_iter()
            .chain(accepted.map_err(fail)?)
        {
            configure(&stream, timeout).map_err(|e| {
                fail(Failure::Peer {
                    rank: peer,
                    reason: format!("could not configure the socket: {e}"),
                })
            })?;
            links[peer][lane] = Some(stream);
        }
        Ok(TcpCollective {
            rank,
            world,
            addrs: peer_addrs,
            links: links
                .into_iter()
                .map(|l| {
                    l.into_iter()
                        .map(|s| s.expect("every lane connected"))
                        .collect()
                })
                .collect(),
            lanes,
            timeout,
            state: Mutex::new(OpState {
                seq: 0,
                poisoned: None,
            }),
        })
    }
}

fn configure(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let sock = socket2::SockRef::from(stream);
    // Failing to enlarge the buffers costs speed, not correctness.
    let buf = socket_buffer_bytes();
    if buf > 0 {
        let _ = sock.set_send_buffer_size(buf);
        let _ = sock.set_recv_buffer_size(buf);
    }
    Ok(())
}

/// What a dialing rank says first on every connection.
struct Hello {
    rank: usize,
    world: usize,
    lane: usize,
    lanes: usize,
    token: u64,
}

const HELLO_LEN: usize = 32;

impl Hello {
    fn encode(&self, to: usize) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..8].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        b[8..16].copy_from_slice(&self.token.to_le_bytes());
        for (k, v) in [self.world, self.rank, to, self.lane | (self.lanes << 16)]
            .iter()
            .enumerate()
        {
            b[16 + 4 * k..20 + 4 * k].copy_from_slice(&(*v as u32).to_le_bytes());
        }
        b
    }

    /// Returns the hello and the rank it was addressed to, or None if the magic is wrong.
    fn decode(b: &[u8; HELLO_LEN]) -> Option<(Hello, usize)> {
        let u32_at = |k: usize| {
            u32::from_le_bytes(b[16 + 4 * k..20 + 4 * k].try_into().expect("4")) as usize
        };
        if u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")) != HELLO_MAGIC {
            return None;
        }
        let hello = Hello {
            token: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            world: u32_at(0),
            rank: u32_at(1),
            lane: u32_at(3) & 0xFFFF,
            lanes: u32_at(3) >> 16,
        };
        Some((hello, u32_at(2)))
    }
}

/// Dials `peer` until it answers the handshake with the right rank and token, or the deadline.
fn dial(
    addr: &str,
    me: &Hello,
    peer: usize,
    deadline: Instant,
) -> std::result::Result<TcpStream, Failure> {
    let token = me.token;
    let mut last_err = String::from("no attempt finished");
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(Failure::Peer {
                rank: peer,
                reason: format!("could not connect before the deadline; last error: {last_err}"),
            });
        }
        let attempt = (|| -> io::Result<TcpStream> {
            let sa = addr.to_socket_addrs()?.next().ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "address resolved to nothing")
            })?;
            let left = deadline.saturating_duration_since(Instant::now());
            let stream = TcpStream::connect_timeout(
                &sa,
                left.clamp(Duration::from_millis(1), Duration::from_secs(2)),
            )?;
            stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            stream.set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
            (&stream).write_all(&me.encode(peer))?;
            let mut reply = [0u8; 20];
            (&stream).read_exact(&mut reply).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("no handshake reply ({e}): wrong token, world size or stream count?"),
                )
            })?;
            let magic = u64::from_le_bytes(reply[0..8].try_into().expect("8 bytes"));
            let their_token = u64::from_le_bytes(reply[8..16].try_into().expect("8 bytes"));
            let their_rank = u32::from_le_bytes(reply[16..20].try_into().expect("4 bytes"));
            if magic != HELLO_MAGIC || their_token != token || their_rank as usize != peer {
                return Err(io::Error::other(format!(
                    "answered as rank {their_rank} with token {their_token:#x} (wanted rank \
                     {peer}, token {token:#x}): a stale or foreign process"
                )));
            }
            Ok(stream)
        })();
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) => last_err = e.to_string(),
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Accepts `lanes` connections from every rank above `me`, rejecting strangers, until the
/// deadline.
fn accept_higher(
    listener: &TcpListener,
    me: usize,
    world: usize,
    lanes: usize,
    token: u64,
    deadline: Instant,
) -> std::result::Result<Vec<(usize, usize, TcpStream)>, Failure> {
    let mut got: Vec<(usize, usize, TcpStream)> = Vec::new();
    let want = (world - me - 1) * lanes;
    if want == 0 {
        return Ok(got);
    }
    let io_err = |e: io::Error| Failure::Usage(format!("rank {me} could not accept peers: {e}"));
    listener.set_nonblocking(true).map_err(io_err)?;
    while got.len() < want {
        if Instant::now() >= deadline {
            let missing = (me + 1..world)
                .find(|r| got.iter().filter(|(g, _, _)| g == r).count() < lanes)
                .unwrap_or(me + 1);
            return Err(Failure::Peer {
                rank: missing,
                reason: format!("never connected to rank {me} before the deadline"),
            });
        }
        let (stream, from) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        match handshake_accepted(&stream, me, world, lanes, token, deadline, &got) {
            Ok((peer, lane)) => got.push((peer, lane, stream)),
            Err(reason) => {
                tracing::warn!(%from, rank = me, "rejected a collective connection: {reason}")
            }
        }
    }
    let _ = listener.set_nonblocking(false);
    Ok(got)
}

fn handshake_accepted(
    stream: &TcpStream,
    me: usize,
    world: usize,
    lanes: usize,
    token: u64,
    deadline: Instant,
    got: &[(usize, usize, TcpStream)],
) -> std::result::Result<(usize, usize), String> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(1), Duration::from_secs(5));
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    let mut raw = [0u8; HELLO_LEN];
    (&*stream)
        .read_exact(&mut raw)
        .map_err(|e| format!("no hello: {e}"))?;
    let Some((h, to)) = Hello::decode(&raw) else {
        return Err("not a contrail collective hello".into());
    };
    if h.token != token {
        return Err(format!(
            "token {:#x} is not this job's {token:#x} (stale peer?)",
            h.token
        ));
    }
    if h.world != world || to != me || h.rank <= me || h.rank >= world {
        return Err(format!(
            "rank {} of world {} dialed rank {to}; this is rank {me} of {world}",
            h.rank, h.world
        ));
    }
    if h.lanes != lanes || h.lane >= lanes {
        return Err(format!(
            "rank {} uses {} streams per peer, this rank {lanes} (set CONTRAIL_TCP_STREAMS alike)",
            h.rank, h.lanes
        ));
    }
    if got.iter().any(|(g, l, _)| *g == h.rank && *l == h.lane) {
        return Err(format!("rank {} connected stream {} twice", h.rank, h.lane));
    }
    let mut reply = Vec::with_capacity(20);
    reply.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
    reply.extend_from_slice(&token.to_le_bytes());
    reply.extend_from_slice(&(me as u32).to_le_bytes());
    (&*stream)
        .write_all(&reply)
        .map_err(|e| format!("reply failed: {e}"))?;
    Ok((h.rank, h.lane))
}

fn io_failure(peer: usize, e: &io::Error, timeout: Duration, what: &str) -> Failure {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Failure::Timeout {
            rank: peer,
            waited_ms: timeout.as_millis() as u64,
        },
        io::ErrorKind::UnexpectedEof => Failure::Peer {
            rank: peer,
            reason: "closed the connection mid-collective (process exited or was killed?)".into(),
        },
        _ => Failure::Peer {
            rank: peer,
            reason: format!("{what} the peer failed: {e}"),
        },
    }
}

fn write_frame(mut stream: &TcpStream, tag: u32, seq: u32, payload: &[u8]) -> io::Result<()> {
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&tag.to_le_bytes());
    header[4..8].copy_from_slice(&seq.to_le_bytes());
    header[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&header)?;
    stream.write_all(payload)
}

fn decode_header(h: &[u8; HEADER_LEN]) -> (u32, u32, u64) {
    (
        u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")),
        u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")),
        u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")),
    )
}

/// Abort payload: culprit rank (u32, u32::MAX for usage errors), kind (u8), waited ms (u64),
/// reporter rank (u32), reason (UTF-8).
fn encode_abort(f: &Failure, reporter: usize) -> Vec<u8> {
    let (culprit, kind, waited, reason) = match f {
        Failure::Peer { rank, reason } => (*rank as u32, 0u8, 0u64, reason.as_str()),
        Failure::Timeout { rank, waited_ms } => (*rank as u32, 1, *waited_ms, ""),
        Failure::Usage(m) => (u32::MAX, 2, 0, m.as_str()),
    };
    let mut p = Vec::with_capacity(17 + reason.len());
    p.extend_from_slice(&culprit.to_le_bytes());
    p.push(kind);
    p.extend_from_slice(&waited.to_le_bytes());
    p.extend_from_slice(&(reporter as u32).to_le_bytes());
    p.extend_from_slice(reason.as_bytes());
    p
}

fn decode_abort(p: &[u8], from: usize) -> Failure {
    if p.len() < 17 {
        return Failure::Peer {
            rank: from,
            reason: "sent a truncated abort frame".into(),
        };
    }
    let culprit = u32::from_le_bytes(p[0..4].try_into().expect("4 bytes"));
    let waited_ms = u64::from_le_bytes(p[5..13].try_into().expect("8 bytes"));
    let reporter = u32::from_le_bytes(p[13..17].try_into().expect("4 bytes"));
    let reason = String::from_utf8_lossy(&p[17..]);
    match p[4] {
        0 => Failure::Peer {
            rank: culprit as usize,
            reason: format!("{reason} (reported by rank {reporter})"),
        },
        1 => Failure::Timeout {
            rank: culprit as usize,
            waited_ms,
        },
        _ => Failure::Usage(format!("{reason} (reported by rank {reporter})")),
    }
}

/// Sender/receiver rendezvous of one operation: how many receive items are done, and the
/// first failure either side saw.
struct TransferProgress {
    /// Which receive items are done (lanes finish them out of order), and the first failure.
    state: Mutex<(Vec<bool>, Option<Failure>)>,
    cv: Condvar,
}

impl TransferProgress {
    fn lock(&self) -> MutexGuard<'_, (Vec<bool>, Option<Failure>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_for(&self, recv_index: Option<usize>) -> std::result::Result<(), Failure> {
        let mut st = self.lock();
        loop {
            if let Some(f) = &st.1 {
                return Err(f.clone());
            }
            match recv_index {
                Some(i) if !st.0[i] => {
                    st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                _ => return Ok(()),
            }
        }
    }

    fn advance(&self, i: usize) {
        self.lock().0[i] = true;
        self.cv.notify_all();
    }

    fn fail(&self, f: Failure) {
        let mut st = self.lock();
        if st.1.is_none() {
            st.1 = Some(f);
        }
        drop(st);
        self.cv.notify_all();
    }

    fn failed(&self) -> bool {
        self.lock().1.is_some()
    }
}

#[derive(Clone, Copy, Debug)]
enum Elem {
    F32,
    F64,
    I32,
    I64,
}

/// One segment to send: `len` bytes at address `ptr`, after receive item `after_recv` is done.
struct SendItem {
    peer: usize,
    /// Which of the peer's streams carries it (set by `Plan::assign_lanes`).
    lane: usize,
    ptr: usize,
    len: usize,
    after_recv: Option<usize>,
}

/// One segment to receive into `ptr`, summed into it when `reduce` is set.
struct RecvItem {
    peer: usize,
    lane: usize,
    ptr: usize,
    len: usize,
    reduce: Option<Elem>,
}

#[derive(Default)]
struct Plan {
    sends: Vec<SendItem>,
    recvs: Vec<RecvItem>,
}

impl Plan {
    /// Deals each peer's items round-robin over its streams. The n-th send to a peer is the
    /// n-th receive from this rank on the peer, so both ends pick the same stream.
    fn assign_lanes(&mut self, world: usize, lanes: usize) {
        let mut n = vec![0usize; world];
        for it in &mut self.sends {
            it.lane = n[it.peer] % lanes;
            n[it.peer] += 1;
        }
        let mut n = vec![0usize; world];
        for it in &mut self.recvs {
            it.lane = n[it.peer] % lanes;
            n[it.peer] += 1;
        }
    }
}

/// Splits the byte range `[off, off+len)` into pipelining segments (none when empty).
fn segments(off: usize, len: usize) -> impl Iterator<Item = (usize, usize)> {
    let seg = segment_bytes();
    (0..len.div_ceil(seg)).map(move |j| {
        let start = j * seg;
        (off + start, seg.min(len - start))
    })
}

/// A ring schedule over `chunks` (byte ranges of the buffer at `base`): at step t this rank
/// sends `steps[t].0` to its right neighbour and receives `steps[t].1` from its left one
/// (summing when `steps[t].2`). Every step's send chunk is the chunk received at the step before
/// it, so a send segment waits for exactly that received segment. This is also what makes the
/// shared buffer safe: a rank never receives into a chunk its sender is still reading, because
/// the data for that chunk causally follows the send.
fn ring_plan(
    base: usize,
    chunks: &[(usize, usize)],
    rank: usize,
    world: usize,
    steps: &[(usize, usize, Option<Elem>)],
) -> Plan {
    let right = (rank + 1) % world;
    let left = (rank + world - 1) % world;
    let mut plan = Plan::default();
    let mut prev_recv_first: Option<usize> = None;
    for &(send_chunk, recv_chunk, reduce) in steps {
        let (soff, slen) = chunks[send_chunk];
        for (j, (o, l)) in segments(soff, slen).enumerate() {
            plan.sends.push(SendItem {
                peer: right,
                lane: 0,
                ptr: base + o,
                len: l,
                after_recv: prev_recv_first.map(|first| first + j),
            });
        }
        let first = plan.recvs.len();
        let (roff, rlen) = chunks[recv_chunk];
        for (o, l) in segments(roff, rlen) {
            plan.recvs.push(RecvItem {
                peer: left,
                lane: 0,
                ptr: base + o,
                len: l,
                reduce,
            });
        }
        prev_recv_first = Some(first);
    }
    plan
}

/// dst[i] += src[i] over `len` bytes of elements of type `elem`.
///
/// # Safety
/// Both ranges must be valid, aligned for `elem` and not overlap.
unsafe fn reduce_into(elem: Elem, dst: usize, src: *const u8, len: usize) {
    unsafe fn sum<T: Copy + std::ops::Add<Output = T>>(dst: usize, src: *const u8, len: usize) {
        let n = len / std::mem::size_of::<T>();
        let d = std::slice::from_raw_parts_mut(dst as *mut T, n);
        let s = std::slice::from_raw_parts(src as *const T, n);
        for (a, b) in d.iter_mut().zip(s) {
            *a = *a + *b;
        }
    }
    unsafe fn wrapping<T: Copy>(dst: usize, src: *const u8, len: usize, add: fn(T, T) -> T) {
        let n = len / std::mem::size_of::<T>();
        let d = std::slice::from_raw_parts_mut(dst as *mut T, n);
        let s = std::slice::from_raw_parts(src as *const T, n);
        for (a, b) in d.iter_mut().zip(s) {
            *a = add(*a, *b);
        }
    }
    match elem {
        Elem::F32 => sum::<f32>(dst, src, len),
        Elem::F64 => sum::<f64>(dst, src, len),
        Elem::I32 => wrapping::<i32>(dst, src, len, i32::wrapping_add),
        Elem::I64 => wrapping::<i64>(dst, src, len, i64::wrapping_add),
    }
}

fn sum_elem(kind: Kind, what: &str) -> Result<Elem> {
    match kind {
        Kind::Float => Ok(Elem::F32),
        Kind::Double => Ok(Elem::F64),
        Kind::Int => Ok(Elem::I32),
        Kind::Int64 => Ok(Elem::I64),
        k => Err(CollectiveError::Usage(format!(
            "{what}: sums support Float, Double, Int and Int64 tensors, not {k:?}"
        ))),
    }
}

fn check_cpu(t: &Tensor, what: &str) -> Result<()> {
    match t.device() {
        Device::Cpu => Ok(()),
        d => Err(CollectiveError::Usage(format!(
            "{what}: the TCP collective takes CPU tensors, got one on {d:?}"
        ))),
    }
}

/// [`rows::row_offsets`] as byte-addressing `usize`s.
fn row_offsets(counts: &[i64], world: usize, what: &str) -> Result<(Vec<usize>, usize)> {
    let (offs, total) = rows::row_offsets(counts, world, what)?;
    Ok((
        offs.into_iter().map(|o| o as usize).collect(),
        total as usize,
    ))
}

fn dim0(t: &Tensor, what: &str) -> Result<usize> {
    rows::dim0(t, what).map(|n| n as usize)
}

fn with_rows(t: &Tensor, rows: usize) -> Vec<i64> {
    rows::with_rows(t, rows as i64)
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        check_cpu(tensor, "all_reduce_sum")?;
        let elem = sum_elem(tensor.kind(), "all_reduce_sum")?;
        if self.world == 1 {
            return Ok(());
        }
        let mut st = self.begin()?;
        let contiguous = tensor.is_contiguous();
        let work = if contiguous {
            tensor.shallow_clone()
        } else {
            tensor.contiguous()
        };
        let esz = work.kind().elt_size_in_bytes();
        let numel = work.numel();
        let n = self.world;
        // Balanced element ranges, so sizes not divisible by the world size are fine.
        let chunks: Vec<(usize, usize)> = (0..n)
            .map(|c| {
                let (a, b) = (c * numel / n, (c + 1) * numel / n);
                (a * esz, (b - a) * esz)
            })
            .collect();
        let r = self.rank;
        let m = |x: usize| x % n;
        // Reduce-scatter leaves rank r owning chunk r, then all-gather circulates the owners.
        let mut steps = Vec::with_capacity(2 * (n - 1));
        for s in 0..n - 1 {
            steps.push((m(r + 2 * n - s - 1), m(r + 2 * n - s - 2), Some(elem)));
        }
        for s in 0..n - 1 {
            steps.push((m(r + n - s), m(r + 2 * n - s - 1), None));
        }
        let plan = ring_plan(work.data_ptr() as usize, &chunks, r, n, &steps);
        self.execute(&mut st, plan)?;
        if !contiguous {
            tensor.copy_(&work);
        }
        Ok(())
    }

    fn all_gather(&self, local: &Tensor, counts: &[i64]) -> Result<Tensor> {
        check_cpu(local, "all_gather")?;
        let (offs, total) = row_offsets(counts, self.world, "all_gather")?;
        let rows = dim0(local, "all_gather")?;
        if rows as i64 != counts[self.rank] {
            return Err(CollectiveError::Usage(format!(
                "all_gather: rank {} passed {rows} rows but counts[{}] = {}",
                self.rank, self.rank, counts[self.rank]
            )));
        }
        let out = Tensor::empty(with_rows(local, total), (local.kind(), Device::Cpu));
        if rows > 0 {
            out.narrow(0, offs[self.rank] as i64, rows as i64)
                .copy_(local);
        }
        if self.world == 1 {
            return Ok(out);
        }
        let mut st = self.begin()?;
        let rb = row_bytes(local);
        let chunks: Vec<(usize, usize)> = (0..self.world)
            .map(|c| (offs[c] * rb, counts[c] as usize * rb))
            .collect();
        let (n, r) = (self.world, self.rank);
        let steps: Vec<_> = (0..n - 1)
            .map(|s| ((r + n - s) % n, (r + 2 * n - s - 1) % n, None))
            .collect();
        let plan = ring_plan(out.data_ptr() as usize, &chunks, r, n, &steps);
        self.execute(&mut st, plan)?;
        Ok(out)
    }

    fn reduce_scatter_sum(&self, full: &Tensor, counts: &[i64]) -> Result<Tensor> {
        check_cpu(full, "reduce_scatter_sum")?;
        let elem = sum_elem(full.kind(), "reduce_scatter_sum")?;
        let (offs, total) = row_offsets(counts, self.world, "reduce_scatter_sum")?;
        let rows = dim0(full, "reduce_scatter_sum")?;
        if rows != total {
            return Err(CollectiveError::Usage(format!(
                "reduce_scatter_sum: tensor has {rows} rows but counts sum to {total}"
            )));
        }
        let (r, n) = (self.rank, self.world);
        let mine = |work: &Tensor| {
            let mut out = Tensor::empty(
                with_rows(full, counts[r] as usize),
                (full.kind(), Device::Cpu),
            );
            if counts[r] > 0 {
                out.copy_(&work.narrow(0, offs[r] as i64, counts[r]));
            }
            out
        };
        if n == 1 {
            return Ok(mine(full));
        }
        let mut st = self.begin()?;
        // The ring sums partial chunks in place, so work on a private contiguous copy.
        let mut work = Tensor::empty(full.size(), (full.kind(), Device::Cpu));
        work.copy_(full);
        let rb = row_bytes(full);
        let chunks: Vec<(usize, usize)> = (0..n)
            .map(|c| (offs[c] * rb, counts[c] as usize * rb))
            .collect();
        let steps: Vec<_> = (0..n - 1)
            .map(|s| ((r + 2 * n - s - 1) % n, (r + 2 * n - s - 2) % n, Some(elem)))
            .collect();
        let plan = ring_plan(work.data_ptr() as usize, &chunks, r, n, &steps);
        self.execute(&mut st, plan)?;
        Ok(mine(&work))
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        check_cpu(tensor, "broadcast")?;
        if root >= self.world {
            return Err(CollectiveError::Usage(format!(
                "broadcast: root {root} is outside a world of {}",
                self.world
            )));
        }
        if self.world == 1 {
            return Ok(());
        }
        let mut st = self.begin()?;
        let contiguous = tensor.is_contiguous();
        let work = if contiguous {
            tensor.shallow_clone()
        } else {
            tensor.contiguous()
        };
        let (r, n) = (self.rank, self.world);
        let len = work.numel() * work.kind().elt_size_in_bytes();
        let base = work.data_ptr() as usize;
        // A pipelined chain root → root+1 → ...: each rank forwards a segment once it has it.
        let mut plan = Plan::default();
        if r != root {
            for (o, l) in segments(0, len) {
                plan.recvs.push(RecvItem {
                    peer: (r + n - 1) % n,
                    lane: 0,
                    ptr: base + o,
                    len: l,
                    reduce: None,
                });
            }
        }
        if (r + 1) % n != root {
            for (j, (o, l)) in segments(0, len).enumerate() {
                plan.sends.push(SendItem {
                    peer: (r + 1) % n,
                    lane: 0,
                    ptr: base + o,
                    len: l,
                    after_recv: (r != root).then_some(j),
                });
            }
        }
        if len == 0 {
            // Zero bytes still synchronise, so a mismatch in shapes is caught by the header.
            if r != root {
                plan.recvs.push(RecvItem {
                    peer: (r + n - 1) % n,
                    lane: 0,
                    ptr: base,
                    len: 0,
                    reduce: None,
                });
            }
            if (r + 1) % n != root {
                plan.sends.push(SendItem {
                    peer: (r + 1) % n,
                    lane: 0,
                    ptr: base,
                    len: 0,
                    after_recv: (r != root).then_some(0),
                });
            }
        }
        self.execute(&mut st, plan)?;
        if !contiguous && r != root {
            tensor.copy_(&work);
        }
        Ok(())
    }

    fn all_to_all(&self, input: &Tensor, send_counts: &[i64]) -> Result<(Tensor, Vec<i64>)> {
        self.all_to_all_rows(input, send_counts, None)
    }

    fn all_to_all_known(
        &self,
        input: &Tensor,
        send_counts: &[i64],
        recv_counts: &[i64],
    ) -> Result<Tensor> {
        Ok(self
            .all_to_all_rows(input, send_counts, Some(recv_counts))?
            .0)
    }

    fn barrier(&self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let mut st = self.begin()?;
        let (r, n) = (self.rank, self.world);
        // Dissemination barrier: after round i every rank has heard, transitively, from 2^(i+1)
        // ranks; ceil(log2 n) rounds of empty frames.
        let mut plan = Plan::default();
        let mut k = 1;
        let mut round: usize = 0;
        while k < n {
            plan.sends.push(SendItem {
                peer: (r + k) % n,
                lane: 0,
                ptr: 0,
                len: 0,
                after_recv: round.checked_sub(1),
            });
            plan.recvs.push(RecvItem {
                peer: (r + n - k) % n,
                lane: 0,
                ptr: 0,
                len: 0,
                reduce: None,
            });
            k *= 2;
            round += 1;
        }
        self.execute(&mut st, plan)
    }
}
