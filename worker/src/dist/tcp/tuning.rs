//! Environment knobs of the TCP backend, read once per process.

use std::sync::OnceLock;

/// Pipelining unit (default 512 KiB; `CONTRAIL_TCP_SEGMENT_KIB` overrides it for tuning). Big
/// enough that per-segment costs (a header, a wake-up) vanish next to the copy, small enough
/// that the forwarding rank starts sending early and the reduce scratch stays in cache.
pub(super) fn segment_bytes() -> usize {
    static V: OnceLock<usize> = OnceLock::new();
    *V.get_or_init(|| {
        env_kib("CONTRAIL_TCP_SEGMENT_KIB")
            .filter(|&b| b > 0)
            .unwrap_or(512 << 10)
    })
}

/// Kernel send/receive buffer asked for on every connection (default 4 MiB, which Linux caps
/// at wmem_max/rmem_max; `CONTRAIL_TCP_SOCKET_BUFFER_KIB=0` keeps the kernel's autotuning).
pub(super) fn socket_buffer_bytes() -> usize {
    static V: OnceLock<usize> = OnceLock::new();
    *V.get_or_init(|| env_kib("CONTRAIL_TCP_SOCKET_BUFFER_KIB").unwrap_or(4 << 20))
}

/// TCP connections per pair of ranks (default 4; `CONTRAIL_TCP_STREAMS` overrides it, and all
/// ranks must agree). One stream's kernel copies run on the one core that calls send or recv;
/// striping segments over several streams spreads them over several cores, like NCCL's
/// NCCL_NSOCKS_PERTHREAD.
pub(super) fn streams_per_peer() -> usize {
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
