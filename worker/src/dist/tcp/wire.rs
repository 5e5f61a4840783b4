//! What travels on a link once the mesh is up: frames (a 16-byte header of tag, operation
//! number and length, then the payload) and the abort payload that says which rank failed.

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::Failure;

pub(super) const FRAME_DATA: u32 = 0xC0DA_7A01;
pub(super) const FRAME_ABORT: u32 = 0xC0DA_AB07;
pub(super) const HEADER_LEN: usize = 16;

pub(super) fn io_failure(peer: usize, e: &io::Error, timeout: Duration, what: &str) -> Failure {
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

pub(super) fn write_frame(
    mut stream: &TcpStream,
    tag: u32,
    seq: u32,
    payload: &[u8],
) -> io::Result<()> {
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&tag.to_le_bytes());
    header[4..8].copy_from_slice(&seq.to_le_bytes());
    header[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&header)?;
    stream.write_all(payload)
}

pub(super) fn decode_header(h: &[u8; HEADER_LEN]) -> (u32, u32, u64) {
    (
        u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")),
        u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")),
        u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")),
    )
}

/// Abort payload: culprit rank (u32, u32::MAX for usage errors), kind (u8), waited ms (u64),
/// reporter rank (u32), reason (UTF-8).
pub(super) fn encode_abort(f: &Failure, reporter: usize) -> Vec<u8> {
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

pub(super) fn decode_abort(p: &[u8], from: usize) -> Failure {
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
