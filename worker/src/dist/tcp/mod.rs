//! TCP backend of [`Collective`]: a full mesh of plain TCP sockets between the ranks and ring
//! algorithms on top of it, for CPU tensors (and for tests that run several ranks on one host,
//! since NCCL refuses two ranks on one GPU).
//!
//! Construction has two phases so a worker can register its address before its peers are known:
//! [`TcpCollective::bind`] opens the listener, [`TcpBootstrap::connect`] builds the mesh (rank i
//! dials every lower rank and accepts every higher one; a challenge–response handshake under
//! the job token, with the rank, world size and generation, keeps foreign and stale processes
//! out).
//!
//! Every operation is compiled into a [`Plan`]: an ordered list of segment sends and an ordered
//! list of segment receives. A sender thread and the calling thread (the receiver) run the two
//! lists concurrently, so every link is used in both directions at once; a send that forwards
//! received data waits only for that segment, which pipelines the ring. Each segment travels as
//! a 16-byte header (tag, operation number, length) and its payload; the header lets a rank
//! catch peers that disagree on sizes, and lets a rank that saw a failure tell the others which
//! peer failed (an abort frame) instead of leaving them to time out.
//!
//! The layers, bottom up: `tuning` (environment knobs), `wire` (frames and abort payloads),
//! `handshake` (bind, dial, accept: building the mesh), `plan` (an operation as ordered
//! segment sends and receives, and the ring schedules), `transfer` (runs a plan over the links
//! and poisons the collective on failure) and `ops` (the [`super::Collective`] operations,
//! each written as a plan).

use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use super::CollectiveError;

mod handshake;
mod ops;
mod plan;
mod transfer;
mod tuning;
mod wire;

pub use handshake::{TcpBootstrap, Topology};

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
    /// Kept after the mesh is built, so the survivors of a failure can build a new mesh on
    /// the addresses they registered ([`TcpCollective::into_bootstrap`]).
    listener: TcpListener,
    token: contrail_common::auth::JobToken,
    generation: u64,
    topology: Topology,
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

impl Failure {
    /// The rank the failure is blamed on, if any (a usage error blames nobody).
    fn culprit(&self) -> Option<usize> {
        match self {
            Failure::Peer { rank, .. } | Failure::Timeout { rank, .. } => Some(*rank),
            Failure::Usage(_) => None,
        }
    }

    /// The public error, with the culprit's address from `addr_of`.
    fn to_error(&self, addr_of: impl Fn(usize) -> String) -> CollectiveError {
        match self {
            Failure::Peer { rank, reason } => CollectiveError::PeerFailed {
                rank: *rank,
                addr: addr_of(*rank),
                reason: reason.clone(),
            },
            Failure::Timeout { rank, waited_ms } => CollectiveError::Timeout {
                rank: *rank,
                addr: addr_of(*rank),
                waited_ms: *waited_ms,
            },
            Failure::Usage(m) => CollectiveError::Usage(m.clone()),
        }
    }
}

impl TcpCollective {
    /// Closes every link and gives back the listener (same address, same token), ready to
    /// build the next membership's mesh: `into_bootstrap().with_generation(g).connect(...)`.
    /// Peers still on the old mesh see their links close; a process of the old generation
    /// that dials the new mesh is refused by the handshake.
    pub fn into_bootstrap(self) -> TcpBootstrap {
        TcpBootstrap::from_parts(self.listener, self.token, self.generation, self.topology)
    }

    /// Shuts every connection down from any thread: an operation blocked on a silent peer
    /// fails at once (and poisons the collective) instead of waiting for its timeout.
    pub fn interrupt(&self) {
        for lane in self.links.iter().flatten() {
            let _ = lane.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Which pairs of ranks this collective connected.
    pub fn topology(&self) -> Topology {
        self.topology
    }

    /// The membership generation this mesh was built for.
    pub fn generation(&self) -> u64 {
        self.generation
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
        f.to_error(|r| self.addr_of(r))
    }

    fn addr_of(&self, rank: usize) -> String {
        self.addrs
            .get(rank)
            .cloned()
            .unwrap_or_else(|| "unknown address".to_string())
    }
}
