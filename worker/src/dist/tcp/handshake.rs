//! Building the links: bind, then dial every lower linked rank and accept every higher one
//! ([`Topology`]: every pair, or only ring neighbours). Each
//! connection opens with a mutual challenge–response under the job token, so a process
//! without the token cannot join, and the token itself never crosses the wire:
//!
//! 1. dialer → acceptor: hello (magic, generation, world, ranks, stream, nonce_d);
//! 2. acceptor → dialer: magic, its rank, nonce_a, MAC(token; "accept", hello, nonce_a, rank);
//! 3. dialer → acceptor: MAC(token; "dial", hello, nonce_a).
//!
//! Each side checks the other's MAC before the connection carries data. The generation
//! (in clear: it is no secret) fences a process of an earlier membership of the same job.
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use super::tuning::{socket_buffer_bytes, streams_per_peer};
use super::{Failure, OpState, TcpCollective};
use crate::dist::{CollectiveError, Result};
use contrail_common::auth::{random_bytes, JobToken};

const HELLO_MAGIC: u64 = u64::from_le_bytes(*b"CTRLRNG2");

/// A bound listener waiting for the peer list; see [`TcpCollective::bind`].
pub struct TcpBootstrap {
    listener: TcpListener,
    token: JobToken,
    generation: u64,
    topology: Topology,
}

/// Which pairs of ranks a TCP collective connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Topology {
    /// Every pair: what all-to-all needs (MoE jobs). O(world) sockets per rank.
    #[default]
    Mesh,
    /// Each rank and its two ring neighbours only: enough for all-reduce, all-gather,
    /// reduce-scatter, broadcast and barrier, with O(1) sockets per rank at any world size.
    /// All-to-all is refused.
    Ring,
}

impl Topology {
    /// Whether `rank` and `peer` (two different ranks of `world`) are connected.
    pub fn linked(self, rank: usize, peer: usize, world: usize) -> bool {
        peer != rank
            && match self {
                Topology::Mesh => true,
                Topology::Ring => peer == (rank + 1) % world || peer == (rank + world - 1) % world,
            }
    }
}

/// The key of a mesh built without a job token (tests, single-process tools): the handshake
/// still runs, but proves nothing a stranger could not also prove.
fn open_token() -> JobToken {
    JobToken::parse("contrail-open-mesh-without-a-job-token").expect("a valid token")
}

impl TcpCollective {
    /// Binds the listener peers will dial (`"0.0.0.0:0"` or `"127.0.0.1:0"` pick a free port).
    pub fn bind(addr: &str) -> io::Result<TcpBootstrap> {
        Ok(TcpBootstrap {
            listener: TcpListener::bind(addr)?,
            token: open_token(),
            generation: 0,
            topology: Topology::Mesh,
        })
    }
}

impl TcpBootstrap {
    pub(super) fn from_parts(
        listener: TcpListener,
        token: JobToken,
        generation: u64,
        topology: Topology,
    ) -> Self {
        Self {
            listener,
            token,
            generation,
            topology,
        }
    }

    /// Sets which pairs of ranks connect (default [`Topology::Mesh`]); every rank of the
    /// collective must use the same.
    pub fn with_topology(mut self, topology: Topology) -> Self {
        self.topology = topology;
        self
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Sets the job token every peer must prove it holds (see the module comment).
    pub fn with_token(mut self, token: JobToken) -> Self {
        self.token = token;
        self
    }

    /// Sets the membership generation every peer must be in (default 0), so a process of an
    /// earlier membership of the job cannot join this one.
    pub fn with_generation(mut self, generation: u64) -> Self {
        self.generation = generation;
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
        self.try_connect(rank, peer_addrs, timeout)
            .map_err(|failed| failed.0)
    }

    /// [`TcpBootstrap::connect`] that hands the bootstrap (its listener) back on failure, so
    /// a later generation can be formed on the same address.
    pub fn try_connect(
        self,
        rank: usize,
        peer_addrs: Vec<String>,
        timeout: Duration,
    ) -> std::result::Result<TcpCollective, Box<(CollectiveError, Self)>> {
        match self.connect_links(rank, &peer_addrs, timeout) {
            Ok((links, lanes)) => Ok(TcpCollective {
                rank,
                world: peer_addrs.len(),
                addrs: peer_addrs,
                links,
                lanes,
                timeout,
                state: Mutex::new(OpState {
                    seq: 0,
                    poisoned: None,
                }),
                listener: self.listener,
                token: self.token,
                generation: self.generation,
                topology: self.topology,
            }),
            Err(e) => Err(Box::new((e, self))),
        }
    }

    /// Every lane to every linked peer, indexed `[peer][lane]` (none to this rank itself or
    /// to a peer the topology does not link).
    fn connect_links(
        &self,
        rank: usize,
        peer_addrs: &[String],
        timeout: Duration,
    ) -> Result<(Vec<Vec<TcpStream>>, usize)> {
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
        let token = &self.token;
        let generation = self.generation;
        let listener = &self.listener;
        let peer_addrs_ref = peer_addrs;
        let lanes = streams_per_peer();
        let topology = self.topology;
        let linked = |p: usize| topology.linked(rank, p, world);
        // The coordinator sends only the linked ranks' addresses: a gap there would
        // otherwise surface as a dial to "" after the whole timeout.
        if let Some(p) = (0..world).find(|&p| linked(p) && peer_addrs[p].is_empty()) {
            return Err(CollectiveError::Usage(format!(
                "rank {rank} links to rank {p} ({topology:?} of {world}) but has no address \
                 for it (does the coordinator link the same ranks?)"
            )));
        }
        let peers = (0..world).filter(|&p| linked(p)).count();
        // The sockets, the listener and some room for the process's other files.
        ensure_open_file_limit(peers * lanes + 64, peers, lanes, world)?;
        let mut links: Vec<Vec<Option<TcpStream>>> = (0..world)
            .map(|p| {
                (0..if linked(p) { lanes } else { 0 })
                    .map(|_| None)
                    .collect()
            })
            .collect();
        let fail =
            |f: Failure| f.to_error(|r: usize| peer_addrs_ref.get(r).cloned().unwrap_or_default());
        let (accepted, dialed) = thread::scope(|s| {
            let acceptor = s.spawn(|| {
                let shape = LinkShape {
                    me: rank,
                    world,
                    lanes,
                    topology,
                };
                accept_higher(listener, &shape, token, generation, deadline)
            });
            let mut dialed = Vec::new();
            for (peer, addr) in peer_addrs.iter().enumerate().take(rank) {
                if !linked(peer) {
                    continue;
                }
                for lane in 0..lanes {
                    let me = Hello {
                        rank,
                        world,
                        lane,
                        lanes,
                        generation,
                        nonce: [0; 16],
                    };
                    match dial(addr, &me, token, peer, deadline) {
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
        let links = links
            .into_iter()
            .map(|l| {
                l.into_iter()
                    .map(|s| s.expect("every lane connected"))
                    .collect()
            })
            .collect();
        Ok((links, lanes))
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
    generation: u64,
    /// The dialer's challenge (fresh for every attempt).
    nonce: [u8; 16],
}

const HELLO_LEN: usize = 48;
/// The acceptor's answer: magic, rank, its challenge and its MAC.
const REPLY_LEN: usize = 8 + 4 + 16 + 32;
const MAC_LEN: usize = 32;

impl Hello {
    fn encode(&self, to: usize) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..8].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        for (k, v) in [self.world, self.rank, to, self.lane | (self.lanes << 16)]
            .iter()
            .enumerate()
        {
            b[16 + 4 * k..20 + 4 * k].copy_from_slice(&(*v as u32).to_le_bytes());
        }
        b[32..48].copy_from_slice(&self.nonce);
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
            generation: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            world: u32_at(0),
            rank: u32_at(1),
            lane: u32_at(3) & 0xFFFF,
            lanes: u32_at(3) >> 16,
            nonce: b[32..48].try_into().expect("16 bytes"),
        };
        Some((hello, u32_at(2)))
    }
}

/// The acceptor's proof: it holds the token and answers this very hello as rank `rank`.
fn accept_mac(token: &JobToken, hello: &[u8], nonce_a: &[u8], rank: u32) -> [u8; 32] {
    token.mac(&[b"accept", hello, nonce_a, &rank.to_le_bytes()])
}

/// The dialer's proof: it holds the token and answers the acceptor's challenge.
fn dial_mac(token: &JobToken, hello: &[u8], nonce_a: &[u8]) -> [u8; 32] {
    token.mac(&[b"dial", hello, nonce_a])
}

/// Dials `peer` until it answers the handshake with the right rank and token, or the deadline.
fn dial(
    addr: &str,
    me: &Hello,
    token: &JobToken,
    peer: usize,
    deadline: Instant,
) -> std::result::Result<TcpStream, Failure> {
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
            let nonce_d = random_bytes::<16>().map_err(io::Error::other)?;
            let hello = Hello {
                nonce: nonce_d,
                ..*me
            }
            .encode(peer);
            (&stream).write_all(&hello)?;
            let mut reply = [0u8; REPLY_LEN];
            (&stream).read_exact(&mut reply).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "no handshake reply ({e}): another job's token or generation, world \
                         size or stream count?"
                    ),
                )
            })?;
            let magic = u64::from_le_bytes(reply[0..8].try_into().expect("8 bytes"));
            let their_rank = u32::from_le_bytes(reply[8..12].try_into().expect("4 bytes"));
            let nonce_a = &reply[12..28];
            if magic != HELLO_MAGIC || their_rank as usize != peer {
                return Err(io::Error::other(format!(
                    "answered as rank {their_rank} (wanted rank {peer}): a stale or foreign \
                     process"
                )));
            }
            if !token.verify(
                &[b"accept", &hello, nonce_a, &their_rank.to_le_bytes()],
                &reply[28..60],
            ) {
                return Err(io::Error::other(
                    "its handshake proof does not match this job's token: a foreign process",
                ));
            }
            (&stream).write_all(&dial_mac(token, &hello, nonce_a))?;
            Ok(stream)
        })();
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) => last_err = e.to_string(),
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Raises this process's soft open-file limit to `needed` when it is lower (up to the hard
/// limit), or fails saying what to raise.
fn ensure_open_file_limit(needed: usize, peers: usize, lanes: usize, world: usize) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain out-parameter call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Ok(()); // Unknown limit: let the sockets themselves report a shortage.
    }
    let needed = needed as libc::rlim_t;
    if lim.rlim_cur >= needed {
        return Ok(());
    }
    if lim.rlim_max < needed {
        return Err(CollectiveError::Usage(format!(
            "the collective needs {peers} peer(s) x {lanes} streams = {} sockets at world size              {world}, but this process may open only {} files (hard limit): raise it (`ulimit              -Hn`, the container's nofile limit), lower CONTRAIL_TCP_STREAMS, or use a job              without all-to-all so only ring neighbours connect",
            peers * lanes,
            lim.rlim_max
        )));
    }
    let raised = libc::rlimit {
        rlim_cur: needed.max(lim.rlim_cur),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: a valid rlimit no higher than the hard limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(CollectiveError::Usage(format!(
            "could not raise the open-file limit from {} to {needed} for the collective's              sockets: {}",
            lim.rlim_cur,
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The shape an acceptor checks its callers against.
struct LinkShape {
    me: usize,
    world: usize,
    lanes: usize,
    topology: Topology,
}

/// Accepts `lanes` connections from every linked rank above `me`, rejecting strangers,
/// until the deadline.
fn accept_higher(
    listener: &TcpListener,
    shape: &LinkShape,
    token: &JobToken,
    generation: u64,
    deadline: Instant,
) -> std::result::Result<Vec<(usize, usize, TcpStream)>, Failure> {
    let (me, world, lanes) = (shape.me, shape.world, shape.lanes);
    let mut got: Vec<(usize, usize, TcpStream)> = Vec::new();
    let higher: Vec<usize> = (me + 1..world)
        .filter(|&p| shape.topology.linked(me, p, world))
        .collect();
    let want = higher.len() * lanes;
    if want == 0 {
        return Ok(got);
    }
    let io_err = |e: io::Error| Failure::Usage(format!("rank {me} could not accept peers: {e}"));
    listener.set_nonblocking(true).map_err(io_err)?;
    while got.len() < want {
        if Instant::now() >= deadline {
            let missing = higher
                .iter()
                .copied()
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
        match handshake_accepted(&stream, shape, token, generation, deadline, &got) {
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
    shape: &LinkShape,
    token: &JobToken,
    generation: u64,
    deadline: Instant,
    got: &[(usize, usize, TcpStream)],
) -> std::result::Result<(usize, usize), String> {
    let (me, world, lanes) = (shape.me, shape.world, shape.lanes);
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
    if h.generation != generation {
        return Err(format!(
            "a peer of generation {} (this mesh is generation {generation}): a stale process?",
            h.generation
        ));
    }
    if h.world != world || to != me || h.rank <= me || h.rank >= world {
        return Err(format!(
            "rank {} of world {} dialed rank {to}; this is rank {me} of {world}",
            h.rank, h.world
        ));
    }
    if !shape.topology.linked(me, h.rank, world) {
        return Err(format!(
            "rank {} dialed rank {me}, which this collective's {:?} topology does not link to              it (do the ranks disagree on the topology?)",
            h.rank, shape.topology
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
    let nonce_a = random_bytes::<16>().map_err(|e| e.to_string())?;
    let mut reply = Vec::with_capacity(REPLY_LEN);
    reply.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
    reply.extend_from_slice(&(me as u32).to_le_bytes());
    reply.extend_from_slice(&nonce_a);
    reply.extend_from_slice(&accept_mac(token, &raw, &nonce_a, me as u32));
    (&*stream)
        .write_all(&reply)
        .map_err(|e| format!("reply failed: {e}"))?;
    let mut proof = [0u8; MAC_LEN];
    (&*stream).read_exact(&mut proof).map_err(|e| {
        format!(
            "no handshake proof from rank {} ({e}): another job's token?",
            h.rank
        )
    })?;
    if !token.verify(&[b"dial", &raw, &nonce_a], &proof) {
        return Err(format!(
            "rank {} failed the challenge: it does not hold this job's token",
            h.rank
        ));
    }
    Ok((h.rank, h.lane))
}
